"""Stopping cleanly: SIGTERM / SIGINT set a flag the loop reads between steps and evaluation
reads between batches; with several processes they agree on the step to stop after."""

from __future__ import annotations

import collections
import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


class StopFlag:
  """SIGTERM / SIGINT ask the loop to finish its step, checkpoint and exit cleanly."""

  def __init__(self):
    self.requested = None
    self.previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self.previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some test runners): no handler
        pass

  def _handle(self, signum, frame):
    if self.requested is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C means now
    self.requested = signal.Signals(signum).name

  def restore(self):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


class AgreedStop:
  """Several processes must stop after the same step (the checkpoint is a collective), but a
  SIGTERM reaches each at its own moment. Each step every process contributes its flag to a
  tiny max-reduction, dispatched asynchronously like the step; the result of step s is read at
  step s + lag, when it is done, so all processes see the same value at the same step and the
  host never waits for it. One process: the local flag, at once (no collective)."""

  def __init__(self, flag: StopFlag, lag: int):
    self.flag, self.lag, self.votes, self.agreed = flag, lag, collections.deque(), False
    if jax.process_count() == 1:
      return
    from jax.sharding import Mesh

    rows = [[d for d in jax.devices() if d.process_index == p] for p in range(jax.process_count())]
    mesh = Mesh(np.array(rows), ("process", "local"))
    self.sharding = NamedSharding(mesh, PartitionSpec("process"))
    self.vote = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

  @property
  def requested(self) -> str | None:
    if jax.process_count() == 1:
      return self.flag.requested
    return (self.flag.requested or "SIGTERM (another process)") if self.agreed else None

  def step_done(self) -> None:
    if jax.process_count() == 1:
      return
    local = np.array([self.flag.requested is not None], np.int32)
    self.votes.append(self.vote(jax.make_array_from_process_local_data(self.sharding, local)))
    if len(self.votes) > self.lag:
      self.agreed = self.agreed or bool(self.votes.popleft())

  def now(self) -> bool:
    """For work between steps (evaluation, batch by batch): whether to stop now. Several processes
    agree synchronously (one tiny collective per call), so all leave at the same batch."""
    if jax.process_count() == 1:
      return self.flag.requested is not None
    local = np.array([self.flag.requested is not None], np.int32)
    self.agreed = self.agreed or bool(
        self.vote(jax.make_array_from_process_local_data(self.sharding, local)))
    return self.agreed
