"""Host-memory settings that keep XLA:CPU training steps from page-faulting.

XLA:CPU mallocs each executable's temporary buffer at every run (tens of MB for a small step,
gigabytes for a width-512 step). That is above glibc's mmap threshold, so every step maps fresh
pages, faults each one in on first touch (the kernel zeroes it) and unmaps it at the end. Two
fixes, both glibc-only:

  tune_malloc()        raises the mmap and trim thresholds in this process, so the buffer stays in
                       the heap and is reused across steps.
  hugepage_malloc_env  the `glibc.malloc.hugetlb=1` tunable asks the kernel for transparent huge
                       pages for the heap (fewer faults and TLB misses on multi-GB buffers).
                       glibc reads tunables only at process start, so entry points re-exec
                       themselves once with it set (`reexec_with_hugepage_malloc`).

Both change the whole process, so the library never calls them: entry points (train.py, eval.py,
scripts/bench_train.py) call `configure_entry_point()` before anything else runs; a program that
calls `training.trainer.train` itself may call it too. Accelerator backends are unaffected (their
buffers are device memory). MLA_JAX_HOST_MALLOC=0 leaves malloc alone. What each setting gained on
the project's CPU machines: docs/performance.md.
"""

import ctypes
import os
import platform
import sys

OPT_OUT = "MLA_JAX_HOST_MALLOC"
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
# mallopt takes a C int: 2**31 - 1 is the largest threshold it can express (2**32 wraps to 0).
_THRESHOLD = 2**31 - 1
_HUGETLB = "glibc.malloc.hugetlb=1"
_tuned = False


def _enabled(environ=None) -> bool:
  return (os.environ if environ is None else environ).get(OPT_OUT, "1") != "0"


def _glibc_version() -> tuple[int, ...] | None:
  if sys.platform != "linux":
    return None
  lib, version = platform.libc_ver()
  if lib != "glibc" or not version:
    return None
  return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def tune_malloc() -> bool:
  """Keeps large allocations in glibc's heap (no mmap/munmap per XLA step). Idempotent; returns
  whether the settings are in effect (False off glibc or with MLA_JAX_HOST_MALLOC=0)."""
  global _tuned
  if _tuned:
    return True
  if not _enabled() or _glibc_version() is None:
    return False
  libc = ctypes.CDLL(None)  # the C library this interpreter is linked against
  # Both are needed: with only the mmap threshold raised, free() trims the heap top back to the
  # kernel after each step and the next step faults the pages in again.
  _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
                and libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
  return _tuned


def hugepage_malloc_env(environ=None) -> dict[str, str] | None:
  """The environment to re-exec with so malloc uses transparent huge pages, or None when it
  already does, cannot (not glibc >= 2.35, THP disabled) or is opted out of."""
  env = dict(os.environ if environ is None else environ)
  version = _glibc_version()
  if not _enabled(env) or version is None or version < (2, 35):
    return None
  tunables = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb=" in tunables:  # already set, by us or by the user: respect it
    return None
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      if "[never]" in f.read():
        return None
  except OSError:
    return None
  env["GLIBC_TUNABLES"] = f"{tunables}:{_HUGETLB}" if tunables else _HUGETLB
  return env


def reexec_with_hugepage_malloc() -> None:
  """Call first thing in an entry point's `__main__` (before any JAX computation): replaces the
  process with the same command line under `hugepage_malloc_env()`, once; otherwise returns.
  The PID, arguments, stdio and signals are unchanged, so launchers and Ctrl-C behave the same."""
  env = hugepage_malloc_env()
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def configure_entry_point() -> None:
  """Both settings, for a script's `__main__` before it runs anything."""
  reexec_with_hugepage_malloc()
  tune_malloc()
