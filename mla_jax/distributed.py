"""Several processes, one run: starting `jax.distributed`, multi-slice meshes, barriers.

Every process runs the same `train.py`; `initialize` joins them before JAX touches a device:

    info = initialize(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=i)
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1, "sequence": 1}, dcn="data=2")

Where the settings come from, first match wins:
  flags        --coordinator_address / --num_processes / --process_id (all three)
  environment  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (all three)
  Slurm        SLURM_NTASKS > 1 (jax reads SLURM_PROCID, SLURM_STEP_NODELIST, SLURM_JOB_ID)
  TPU pod      TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES naming more than one worker
and otherwise the run is one process and nothing is initialised (single-process runs are exactly
what they were). Bad settings are a `DistributedError`: one line naming the flag.

A multi-slice mesh (`dcn`) splits each mesh axis into slices x devices per slice: the slow
network (DCN between TPU slices, or between hosts of a GPU cluster) carries only the axes named
in `dcn`, usually data parallelism, whose gradient all-reduce is once per step.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_NODELIST")
DEFAULT_TIMEOUT_S = 300


class DistributedError(ValueError):
  """Bad or failed multi-process settings; the message names the flag."""


def _tpu_workers(environ: Mapping[str, str]) -> int:
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  return len([h for h in hosts.split(",") if h.strip()])


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, environ: Mapping[str, str] | None = None):
  """How this process joins the others, or None when the run is a single process.

  Returns {'source': 'flags' | 'env' | 'slurm' | 'tpu', 'coordinator_address', 'num_processes',
  'process_id'}; for slurm and tpu the unset values are None (jax.distributed detects them).
  """
  env = os.environ if environ is None else environ
  flags = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if any(v is not None for v in flags.values()):
    source, values = "flags", flags
  elif any(k in env for k in (ENV_ADDRESS, ENV_COUNT, ENV_ID)):
    source = "env"
    try:
      values = {"coordinator_address": env.get(ENV_ADDRESS),
                "num_processes": int(env[ENV_COUNT]) if ENV_COUNT in env else None,
                "process_id": int(env[ENV_ID]) if ENV_ID in env else None}
    except ValueError:
      raise DistributedError(f"{ENV_COUNT} / {ENV_ID}: must be integers, got "
                             f"{env.get(ENV_COUNT)!r} / {env.get(ENV_ID)!r}") from None
  elif all(k in env for k in SLURM_VARS):
    tasks = int(env["SLURM_NTASKS"])
    return None if tasks == 1 else {"source": "slurm", "coordinator_address": None,
                                    "num_processes": tasks, "process_id": None}
  elif _tpu_workers(env) > 1:
    return {"source": "tpu", "coordinator_address": None, "num_processes": None,
            "process_id": None}
  else:
    return None
  names = {"flags": {"coordinator_address": "--coordinator_address",
                     "num_processes": "--num_processes", "process_id": "--process_id"},
           "env": {"coordinator_address": ENV_ADDRESS, "num_processes": ENV_COUNT,
                   "process_id": ENV_ID}}[source]
  slurm_tasks = int(env["SLURM_NTASKS"]) if all(k in env for k in SLURM_VARS) else None
  missing = [names[k] for k, v in values.items() if v is None]
  if missing and slurm_tasks is None:
    given = [names[k] for k, v in values.items() if v is not None]
    raise DistributedError(f"{missing[0]}: needed with {given[0]} (a multi-process run sets "
                           f"{', '.join(names.values())})")
  n, i, addr = values["num_processes"], values["process_id"], values["coordinator_address"]
  if n is not None and n < 1:
    raise DistributedError(f"{names['num_processes']}: must be >= 1, got {n}")
  if slurm_tasks is not None and n is not None and n != slurm_tasks:
    raise DistributedError(f"{names['num_processes']}: {n} processes, but Slurm started "
                           f"SLURM_NTASKS={slurm_tasks} tasks")
  if i is not None and n is not None and not 0 <= i < n:
    raise DistributedError(f"{names['process_id']}: {i} is not in [0, {n}) "
                           f"({names['num_processes']}={n})")
  if addr is not None and (":" not in addr or not addr.rsplit(":", 1)[1].isdigit()):
    raise DistributedError(f"{names['coordinator_address']}: {addr!r} is not HOST:PORT")
  return {"source": source, **values}


def wait_for_coordinator(address: str, timeout_s: float, flag: str) -> None:
  """Returns once address (HOST:PORT) accepts a TCP connection; DistributedError naming `flag`
  after timeout_s. jax's own client may abort the process (not raise) when the coordinator never
  answers, so the processes other than 0 check first and fail with one line."""
  import socket
  import time

  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f"{flag}: no coordinator answered at {address} within --distributed_timeout="
            f"{timeout_s:g} s ({e.strerror or e}); is process 0 running there, with the same "
            "address, and the port open?") from None
      time.sleep(0.2)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = DEFAULT_TIMEOUT_S,
               environ: Mapping[str, str] | None = None) -> dict | None:
  """Joins the other processes (see the module docstring); None when the run is one process.

  Must run before anything asks JAX for a device. A coordinator that does not answer within
  timeout_s, or a peer count that differs from num_processes, is a DistributedError.
  """
  s = settings(coordinator_address, num_processes, process_id, environ)
  if s is None:
    return None
  import jax

  # CPU processes need a collectives backend for cross-process all-reduces (no effect on GPU/TPU).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  addr_flag = {"flags": "--coordinator_address", "env": ENV_ADDRESS}.get(s["source"],
                                                                        s["source"])
  if s["coordinator_address"] and s["process_id"]:  # process 0 is the coordinator
    wait_for_coordinator(s["coordinator_address"], timeout_s, addr_flag)
  try:
    jax.distributed.initialize(s["coordinator_address"], s["num_processes"], s["process_id"],
                               initialization_timeout=int(timeout_s))
  except Exception as e:  # noqa: BLE001 - grpc / XLA errors of every kind: one line
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise DistributedError(
        f"{addr_flag}: could not join {s['coordinator_address'] or 'the coordinator'} as process "
        f"{s['process_id']} of {s['num_processes']} within --distributed_timeout={timeout_s} s: "
        f"is every process started with the same address and process count? ({first})") from None
  if s["num_processes"] is not None and jax.process_count() != s["num_processes"]:
    raise DistributedError(f"--num_processes: this process was told {s['num_processes']}, but "
                           f"the coordinator counts {jax.process_count()} processes")
  return {**s, "num_processes": jax.process_count(), "process_id": jax.process_index()}


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op for one process)."""
  import jax

  if jax.process_count() > 1:
    from orbax.checkpoint import multihost

    multihost.sync_global_processes(f"mla_jax_{name}")


# Meshes ----------------------------------------------------------------------------------------


def parse_dcn(text: str) -> dict[str, int]:
  """'data=2,fsdp=1' -> {'data': 2, 'fsdp': 1, 'tensor': 1, 'sequence': 1}; errors name mesh.dcn."""
  from mla_jax.core.sharding import MESH_AXES

  sizes = {a: 1 for a in MESH_AXES}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, _, value = item.partition("=")
    name = name.strip()
    if name not in sizes:
      raise ValueError(f"mesh.dcn: {name!r} is not a mesh axis {MESH_AXES}")
    if not value.strip().isdigit() or int(value) < 1:
      raise ValueError(f"mesh.dcn: {item!r} needs a positive slice count, as in 'data=2'")
    sizes[name] = int(value)
  return sizes


def granules(devices: Sequence) -> tuple[str, int]:
  """The unit the slow network connects: TPU slices if devices report more than one, else
  processes (hosts of a GPU cluster, or local CPU processes). Returns (attribute, count)."""
  slices = {getattr(d, "slice_index", None) for d in devices}
  if len(slices) > 1 and None not in slices:
    return "slice_index", len(slices)
  return "process_index", len({d.process_index for d in devices})


def make_mesh(sizes: Mapping[str, int], dcn: str | Mapping[str, int] = "", devices=None):
  """The training mesh: `core.sharding.make_mesh` for one slice, a hybrid mesh otherwise.

  sizes: total devices per mesh axis (resolved, no -1). dcn: slices per axis, e.g. 'data=2';
  each axis then has sizes[a] // dcn[a] devices inside a slice. Empty with several TPU slices:
  all slices on 'data'. Errors name mesh.dcn.
  """
  import jax
  from jax.experimental import mesh_utils
  from jax.sharding import AxisType, Mesh

  from mla_jax.core import sharding as shd

  devices = list(devices if devices is not None else jax.devices())
  dcn_sizes = parse_dcn(dcn) if isinstance(dcn, str) else {**parse_dcn(""), **dcn}
  attr, count = granules(devices)
  if math.prod(dcn_sizes.values()) == 1:
    if attr == "process_index" or count == 1:
      return shd.make_mesh(sizes, devices)
    dcn_sizes["data"] = count  # several TPU slices and no plan: data parallel across them
  what = "TPU slices" if attr == "slice_index" else "processes"
  if math.prod(dcn_sizes.values()) != count:
    raise ValueError(f"mesh.dcn: {dcn or dict(dcn_sizes)} makes {math.prod(dcn_sizes.values())} "
                     f"slices but there are {count} ({what})")
  for a, n in dcn_sizes.items():
    if sizes[a] % n:
      raise ValueError(f"mesh.dcn: {a}={n} does not divide mesh.{a}={sizes[a]}")
  axes = tuple(sizes)
  ici = [sizes[a] // dcn_sizes[a] for a in axes]
  array = mesh_utils.create_hybrid_device_mesh(ici, [dcn_sizes[a] for a in axes], devices,
                                               process_is_granule=attr == "process_index")
  return Mesh(array, axes, axis_types=(AxisType.Auto,) * len(axes))
