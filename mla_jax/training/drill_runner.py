"""How the fault drills run train.py: as subprocesses of this checkout, forked from an
interpreter that has imported jax once (preload: ~4 s less per run) or started plain, with
timeouts, captured output and, for the disk drill, a failing disk made real.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

# The checkout whose train.py the drills run (mla_jax/training/ -> the repo root).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 300  # seconds, per train.py run
# train.py on a failing disk, without needing one (tests run as root, so read-only permissions
# would not stop the writes). orbax's CheckpointManager.save is wrapped so that, for the steps in
# $DRILL_ENOSPC_STEPS, it raises ENOSPC at once (a synchronous failure), and for the steps in
# $DRILL_EFBIG_STEPS, no file may grow past 16 KiB while that save runs: RLIMIT_FSIZE binds root
# too and Python ignores SIGXFSZ, so orbax's background writer fails with "File too large". (The
# embedding alone is 64 KiB; a 64 KiB limit let some saves through, as orbax packs arrays into
# files depending on timing. The run's own stderr file stays under 16 KiB.)
_FAULTY_DISK = r"""
import errno, os, resource, runpy, sys
import orbax.checkpoint as ocp
steps = lambda name: {int(s) for s in os.environ.get(name, "").split(",") if s}
enospc, efbig = steps("DRILL_ENOSPC_STEPS"), steps("DRILL_EFBIG_STEPS")
save = ocp.CheckpointManager.save
def faulty_save(self, step, *args, **kwargs):
  limit = 16 * 1024 if step in efbig else resource.RLIM_INFINITY
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
  if step in enospc:
    raise OSError(errno.ENOSPC, "No space left on device (simulated by fault_drill)")
  return save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = faulty_save
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


# Starting Python fast ----------------------------------------------------------------------------
# Every drill, and every CLI test, starts `python train.py ...` (or eval.py, a script); importing
# jax, flax, orbax and the trainer is ~4 s of CPU each time, more than a tiny run itself. With
# preload() on, a server process imports them once and forks a child per command: a real process
# (its own pid, exit status, signals, stdout / stderr files, environment, working directory) that
# runs the script as `__main__` exactly as `python SCRIPT ARGS` would, minus the imports. Only
# environment variables read at interpreter or jax start (JAX_*, PYTHON*, GLIBC_TUNABLES, LD_*)
# must match the server's; commands that differ there, or that are not `python SCRIPT` /
# `python -c CODE`, start a plain subprocess.
_SERVER = r"""
import json, os, runpy, select, signal, sys
import absl.app, ml_collections.config_flags, orbax.checkpoint, tensorboardX  # noqa: F401
import mla_jax.cli, mla_jax.evaluation.report, mla_jax.evaluation.workdir_eval  # noqa: F401
import mla_jax.host_memory, mla_jax.training.trainer  # noqa: F401
reply, children = sys.stdout, {}
print("ready", file=reply, flush=True)

def reap():
  while children:
    pid, status = os.waitpid(-1, os.WNOHANG)
    if not pid:
      return
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    path = children.pop(pid)
    with open(path + ".tmp", "w") as f:
      f.write(str(rc))
    os.replace(path + ".tmp", path)

def child(req):
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  for fd, path in ((1, req["out"]), (2, req["err"])):
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(f, fd)
    os.close(f)
  os.environ.clear()
  os.environ.update(req["env"])
  os.chdir(req["cwd"])
  argv = req["argv"]
  sys.orig_argv = [sys.executable, *argv]  # what a re-exec (host_memory) starts again
  if argv[0] == "-c":
    sys.argv, sys.path[0] = list(argv[:1]) + argv[2:], ""
    exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
  else:
    sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
    runpy.run_path(os.path.abspath(argv[0]), run_name="__main__")

while True:
  ready, _, _ = select.select([sys.stdin], [], [], 0.02)
  reap()
  if not ready:
    continue
  line = sys.stdin.readline()
  if not line:  # the client is gone: so are its commands
    for pid in children:
      os.kill(pid, signal.SIGKILL)
    break
  req = json.loads(line)
  pid = os.fork()
  if pid == 0:
    del children, reply
    child(req)  # ends like `python SCRIPT`: SystemExit, an exception or the end, then teardown
    sys.exit(0)
  children[pid] = req["rc"]
  print(pid, file=reply, flush=True)
"""
# Read when the interpreter or jax starts: a forked child must see what the server saw.
_START_ENV = ("JAX_", "PYTHON", "GLIBC_TUNABLES", "LD_", "MALLOC_")
_server = {"on": False, "proc": None, "env": None, "lock": threading.Lock()}


def preload(on: bool = True) -> None:
  """Commands started after this (start, Proc, run_python) fork from one preloaded Python, which
  the first of them starts; it stops when this process exits."""
  _server["on"] = on


def _start_env(e: dict) -> dict:
  from mla_jax import host_memory

  e = host_memory.hugepage_malloc_env(e) or e  # as after the entry point's own re-exec
  # PYTHONUNBUFFERED aside: the server always writes unbuffered (nothing is lost to a kill).
  return {k: v for k, v in e.items() if k.startswith(_START_ENV) and k != "PYTHONUNBUFFERED"}


def _server_for(e: dict):
  """The server's Popen when commands with environment e may fork from it, else None."""
  if not _server["on"]:
    return None
  with _server["lock"]:
    if _server["proc"] is None:
      from mla_jax import host_memory

      start = {**(host_memory.hugepage_malloc_env(e) or e), "PYTHONUNBUFFERED": "1"}
      proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=REPO, env=start, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
      if proc.stdout.readline().strip() != "ready":
        proc.kill()
        _server["on"] = False
        return None
      _server.update(proc=proc, env=_start_env(start))
      atexit.register(_stop_server)
  return _server["proc"] if _start_env(e) == _server["env"] else None


def _stop_server() -> None:
  proc = _server["proc"]
  if proc is not None and proc.poll() is None:
    proc.stdin.close()
    proc.wait(timeout=30)


class Forked:
  """A child of the preloaded server, with the part of Popen's interface the drills use."""

  def __init__(self, server, cmd, cwd, e, out: str, err: str):
    from mla_jax import host_memory

    self.rc_path = f"{out}.rc"
    e = host_memory.hugepage_malloc_env(e) or e  # the server's, so the entry point needs no re-exec
    req = dict(argv=cmd[1:], cwd=cwd, env=e, out=out, err=err, rc=self.rc_path)
    with _server["lock"]:
      server.stdin.write(json.dumps(req) + "\n")
      server.stdin.flush()
      self.pid = int(server.stdout.readline())
    self.returncode = None

  def poll(self):
    if self.returncode is None and os.path.exists(self.rc_path):
      with open(self.rc_path) as f:
        self.returncode = int(f.read())
    return self.returncode

  def wait(self, timeout=None):
    deadline = None if timeout is None else time.monotonic() + timeout
    while self.poll() is None:
      if deadline is not None and time.monotonic() > deadline:
        raise subprocess.TimeoutExpired(str(self.pid), timeout)
      time.sleep(0.01)
    return self.returncode

  def send_signal(self, sig) -> None:
    if self.poll() is None:
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)


def start(cmd: list[str], cwd: str, e: dict, out: str, err: str):
  """`cmd` with stdout / stderr to the files out / err: a Forked child of the preloaded server
  when preload() is on and cmd is `python SCRIPT ...` or `python -c CODE ...` with a compatible
  environment, else a subprocess.Popen."""
  forkable = cmd[0] == sys.executable and len(cmd) > 1 and (cmd[1] == "-c"
                                                            or not cmd[1].startswith("-"))
  server = _server_for(e) if forkable else None
  if server is not None:
    return Forked(server, cmd, cwd, e, out, err)
  with open(out, "w") as o, open(err, "w") as r:
    return subprocess.Popen(cmd, cwd=cwd, env=e, stdout=o, stderr=r)


def run_python(args, cwd: str = REPO, env: dict | None = None,
               timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
  """`python *args` (a script of this checkout and its arguments) to completion, like
  subprocess.run(..., capture_output=True, text=True); through the preloaded server when on."""
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
    p = start([sys.executable, *args], cwd, dict(os.environ if env is None else env), out, err)
    try:
      p.wait(timeout)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
      raise
    with open(out) as f, open(err) as g:
      return subprocess.CompletedProcess([sys.executable, *args], p.returncode, f.read(),
                                         g.read())


class DrillError(AssertionError):
  pass


def check(cond, message: str):
  if not cond:
    raise DrillError(message)


# Running train.py -------------------------------------------------------------------------------


def env(devices: int = 1) -> dict:
  """The subprocess environment: CPU, `devices` fake devices, the repo's compilation cache."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  e.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
           JAX_COMPILATION_CACHE_DIR=os.path.join(REPO, ".jax_cache"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return e


@dataclasses.dataclass
class Run:
  args: list
  rc: int
  out: str
  err: str
  seconds: float

  @property
  def last_line(self) -> str:
    lines = [l for l in self.err.replace("\r", "\n").splitlines() if l.strip()]
    return lines[-1] if lines else ""

  def describe(self) -> str:
    tail = "\n".join(self.err.replace("\r", "\n").splitlines()[-15:])
    return f"rc={self.rc} after {self.seconds:.1f}s: {' '.join(self.args)}\n{tail}"


class Proc:
  """A train.py process whose stdout / stderr go to files next to its workdir."""

  def __init__(self, workdir: str, args, devices=1, enospc=(), efbig=()):
    self.workdir, self.args = workdir, list(args)
    os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
    self.log = f"{workdir}.{int(time.time() * 1000) % 10**8}"
    e = env(devices)
    if enospc or efbig:
      e["DRILL_ENOSPC_STEPS"] = ",".join(map(str, enospc))
      e["DRILL_EFBIG_STEPS"] = ",".join(map(str, efbig))
      cmd = [sys.executable, "-c", _FAULTY_DISK]
    else:
      cmd = [sys.executable, "train.py"]
    self.t0 = time.perf_counter()
    cmd = cmd + [f"--workdir={workdir}"] + self.args
    # Output goes to files, except under a file-size limit (it would stop the log files too):
    # then to pipes, read by wait().
    self.piped = bool(efbig)
    if self.piped:
      self.p = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    else:
      self.p = start(cmd, REPO, e, self.log + ".out", self.log + ".err")

  def wait(self, timeout=TIMEOUT) -> Run:
    try:
      piped = self.p.communicate(timeout=timeout) if self.piped else self.p.wait(timeout)
    except subprocess.TimeoutExpired:
      self.p.kill()
      piped = self.p.communicate() if self.piped else self.p.wait()
    if self.piped:
      for ext, text in zip((".out", ".err"), piped):
        with open(self.log + ext, "w") as f:
          f.write(text)
    with open(self.log + ".out") as f, open(self.log + ".err") as g:
      return Run(self.args, self.p.returncode, f.read(), g.read(), time.perf_counter() - self.t0)

  def wait_for_step(self, k: int, timeout=TIMEOUT, need_checkpoint=False) -> int:
    """Polls metrics.jsonl until it logs a step >= k (and, with need_checkpoint, a checkpoint is
    committed); returns that step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      step = last_logged_step(self.workdir)
      if step >= k and (ckpt_steps(self.workdir) or not need_checkpoint):
        return step
      if self.p.poll() is not None:
        raise DrillError(f"train.py ended before step {k}: {self.wait().describe()}")
      time.sleep(0.01)
    raise DrillError(f"no step {k} logged after {timeout}s")


def fresh(base: str, name: str) -> str:
  """base/name, or base/name_2, ... : a workdir no earlier drill used."""
  path, i = os.path.join(base, name), 1
  while os.path.exists(path):
    i += 1
    path = os.path.join(base, f"{name}_{i}")
  return path


def run(workdir: str, args, **kw) -> Run:
  return Proc(workdir, args, **kw).wait()


def run_parallel(jobs, workers: int = 4, **kw) -> list[Run]:
  """[(workdir, args), ...] -> their Runs, `workers` at a time (for runs that fail fast)."""
  results, running, todo = {}, {}, list(enumerate(jobs))
  while todo or running:
    while todo and len(running) < workers:
      i, (wd, args) = todo.pop(0)
      running[i] = Proc(wd, args, **kw)
    for i, proc in list(running.items()):
      if proc.p.poll() is not None:
        results[i] = proc.wait()
        del running[i]
    time.sleep(0.02)
  return [results[i] for i in range(len(jobs))]


# Reading a workdir ------------------------------------------------------------------------------


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl, also of a run still writing it (the library's reader skips a partial line)."""
  from mla_jax.storage.workdir import read_metrics as read

  return read(workdir)


def last_logged_step(workdir: str) -> int:
  return max((r["step"] for r in read_metrics(workdir)), default=0)


def ckpt_steps(workdir: str) -> list[int]:
  """Committed step directories, as orbax sees them (tmp and moved-aside ones excluded)."""
  from mla_jax.storage.checkpoint import checkpoint_steps

  return checkpoint_steps(os.path.join(workdir, "checkpoints"))


def tmp_dirs(workdir: str) -> list[str]:
  return sorted(os.path.basename(p) for p in glob.glob(
      os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))
