r"""Run a multi-process job on this machine: N CPU processes, each with its own fake devices.

  python3 scripts/launch_local.py --num_processes=2 [--devices_per_process=2] -- \
      --config=configs/lm.py:size=tiny --workdir=/tmp/mh --config.train.steps=20

Everything after `--` goes to train.py (or --script). Process i gets JAX_COORDINATOR_ADDRESS
(127.0.0.1 and a free port), JAX_NUM_PROCESSES, JAX_PROCESS_ID=i, JAX_PLATFORMS=cpu and
XLA_FLAGS asking for --devices_per_process host devices, so the processes together form one
jax.distributed job, as the hosts of a pod would. Their output is streamed line by line with a
`[p<i>]` prefix (stderr to stderr). When a process fails the others are stopped with a message
naming it, and the launcher exits with its code; Ctrl-C / SIGTERM is passed on to every process
(train.py then checkpoints and exits 0).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACE_S = 5.0  # after a failure, how long the others get to exit on SIGTERM before SIGKILL


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(i: int, n: int, devices: int, port: int, base: dict | None = None) -> dict:
  """Process i's environment: the jax.distributed variables and its fake CPU devices."""
  env = dict(os.environ if base is None else base)
  xla = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
             JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"{xla.strip()} --xla_force_host_platform_device_count={devices}".strip())
  return env


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
      out.flush()
  stream.close()


def launch(num_processes: int, devices: int, args: list[str], script: str = "train.py",
           port: int = 0) -> int:
  """Starts the processes, streams their output, returns the job's exit code (0: all 0)."""
  port = port or free_port()
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(num_processes):
    p = subprocess.Popen([sys.executable, script, *args], cwd=REPO, text=True, bufsize=1,
                         env=process_env(i, num_processes, devices, port),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(p)
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      t = threading.Thread(target=_pump, args=(stream, f"[p{i}]", out, lock), daemon=True)
      t.start()
      pumps.append(t)

  def forward(signum, frame):  # preemption or Ctrl-C: every process checkpoints and exits
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, forward)
  code = 0
  while [p.poll() for p in procs].count(None):  # poll every process (any() would stop early)
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
    if failed:
      i, code = failed[0]
      alive = [p for p in procs if p.poll() is None]
      with lock:
        print(f"launch_local: process {i} exited with code {code}; stopping the other "
              f"{len(alive)} process(es)", file=sys.stderr, flush=True)
      for p in alive:
        p.terminate()
      deadline = time.monotonic() + GRACE_S
      while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
        time.sleep(0.05)
      for p in alive:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.05)
  for p in procs:
    p.wait()
  for t in pumps:
    t.join(timeout=5)
  if code == 0:
    code = next((p.returncode for p in procs if p.returncode != 0), 0)
    if code:
      i = next(i for i, p in enumerate(procs) if p.returncode != 0)
      print(f"launch_local: process {i} exited with code {code}", file=sys.stderr)
  return code


def main(argv: list[str]) -> int:
  ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (
      argv, [])
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   usage="launch_local.py --num_processes=N [options] -- ARGS")
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=2,
                      help="fake CPU devices in each process (default 2)")
  parser.add_argument("--script", default="train.py", help="what each process runs")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  a = parser.parse_args(ours)
  for name in ("num_processes", "devices_per_process"):
    if getattr(a, name) < 1:
      print(f"error: --{name}: must be >= 1, got {getattr(a, name)}", file=sys.stderr)
      return 1
  return launch(a.num_processes, a.devices_per_process, rest, a.script, a.port)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
