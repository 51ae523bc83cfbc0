"""What watches the loop: a preemption (SIGTERM), a profiled window of steps, and
divergence (runs of skipped, non-finite steps; which checkpoints are good)."""

import signal

from absl import logging
import jax

from flamingo_jax.training import checkpointing


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


class Preemption:
  """SIGTERM sets a flag; the loop saves and stops after the current step.

  One process: a Python handler. Several: JAX's preemption service (started by
  `jax.distributed.initialize`) catches SIGTERM itself and agrees on a step at which every
  process stops (`reached_preemption`), without a host synchronisation per step, so no
  handler of ours is installed over its own."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: finishing this step, saving, exiting")
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Profile:
  """`train.profile_steps = (first, last)`: a jax.profiler trace of those steps (input,
  dispatch and device work) in WORKDIR/profile, for TensorBoard's profile plugin or Perfetto."""

  def __init__(self, steps, directory: str):
    if steps and (len(steps) != 2 or not 0 < steps[0] <= steps[1]):
      raise ValueError(f"train.profile_steps is {tuple(steps)}; expected (first, last) with "
                       f"0 < first <= last")
    self.first, self.last = (steps or (0, 0))
    self.directory, self.active = directory, False

  def before(self, step: int) -> None:
    if step == self.first and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, metrics) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(metrics)            # the traced steps' device work, whole
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profile of steps from %d in %s", self.first, self.directory)


class DivergenceJudge:
  """Which updates were skipped and which checkpoints are good, read from the steps' flags
  in bulk at log and save steps (no host sync on every step)."""

  def __init__(self, ckpt: checkpointing.Checkpointer, limit: int, resumed_step: int | None):
    self.ckpt, self.limit = ckpt, limit
    self.verified = ckpt.verified_steps()
    self.unverified = ([resumed_step] if resumed_step is not None
                       and resumed_step not in self.verified else [])   # saved, not judged
    self.pending = []
    self.run = 0                     # skipped steps in a row
    self.skipped_updates = 0
    self.last_skipped = False

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics["skipped"], metrics["finite_loss"]))

  def saved(self, step: int) -> None:
    self.unverified.append(step)

  def update(self) -> tuple[int, int] | None:
    """Judges the pending steps; (first, last) step of a run of `limit` skipped steps in a
    row when one happened (the steps after it are dropped: they are about to be undone)."""
    steps = [step for step, _, _ in self.pending]
    flags = jax.device_get([(skipped, finite) for _, skipped, finite in self.pending])
    self.pending = []
    for step, (skipped, finite_loss) in zip(steps, flags):
      self.skipped_updates += int(skipped)
      self.last_skipped = bool(skipped)
      self.run = self.run + 1 if skipped else 0
      if finite_loss and self.unverified:     # the saved parameters gave a finite loss
        self.verified.update(self.unverified)
        self.ckpt.mark_verified(self.verified)
        self.unverified.clear()
      if self.run >= self.limit:
        streak = (step - self.run + 1, step)
        self.run = 0
        return streak
    return None

  def set_aside_diverged(self) -> tuple[int | None, list[str]]:
    """(last good step or None, paths moved): checkpoints newer than the last good one, and
    those saved since the parameters were last judged, go to moved_aside/."""
    self.ckpt.wait()
    steps = self.ckpt.all_steps()
    good = max((s for s in steps if s in self.verified), default=None)
    suspect = sorted(s for s in steps
                     if s in self.unverified or (good is not None and s > good))
    self.unverified.clear()
    return good, self.ckpt.move_steps_aside(suspect, "diverged")
