"""What a training run does when something goes wrong: non-finite updates, signals.

- **Non-finite loss or gradients** (:class:`NonFinitePolicy`): the trainer
  detects them before the optimizer step (the weights are never updated with
  NaN/Inf). ``nonfinite_loss: skip`` drops that update with a warning and stops
  with :class:`TrainingError` after ``max_skipped_updates`` in a row; ``stop``
  raises :class:`TrainingError` at once. fp16 overflow steps are the
  GradScaler's business and are not counted.
- **SIGINT / SIGTERM** (:class:`StopSignals`): the run finishes the current
  update, writes ``last.pt`` atomically and raises :class:`TrainingInterrupted`;
  ``fastseq train`` then exits with status 128 + the signal number. A second
  signal interrupts at once (still safe: every write is atomic).
"""
from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path

from fastseq.training.state import TrainState

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("skip", "stop")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. non-finite losses); the message says why and
    which checkpoint holds the last good state."""


class TrainingInterrupted(Exception):
    """Raised by the trainer after SIGINT/SIGTERM, once ``last.pt`` is written.

    Attributes:
        signum: the signal number. step: the update ``last.pt`` holds. path: ``last.pt``.
    """

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; "
                         f"the training state is saved in {path} (continue with --resume)")


class NonFinitePolicy:
    """Counts dropped updates in a :class:`TrainState` and decides whether to go on.

    Args:
        policy: ``"skip"`` or ``"stop"`` (see the module docstring).
        max_in_a_row: with ``skip``, the non-finite updates in a row that stop the run.
        last: the run's ``last.pt``, named in the error message.
    """

    def __init__(self, policy: str, max_in_a_row: int, last: Path):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_loss: expected one of {NONFINITE_POLICIES}, got {policy!r}")
        self.policy, self.max_in_a_row, self.last = policy, max_in_a_row, last

    def record(self, state: TrainState, loss: float, grad_norm: float, per_update: int) -> None:
        """Count a dropped update (the one after ``state.step``).

        Raises:
            TrainingError: the policy says stop.
        """
        st = state
        st.skipped_updates += 1
        st.skipped_in_a_row += 1
        what = (f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} (loss {loss}, "
                f"gradient norm {grad_norm}) at update {st.step + 1} (epoch {st.epoch + 1}, global "
                f"batches {st.batches_done}-{st.batches_done + per_update - 1})")
        saved = f"{self.last} holds the last saved state" if self.last.is_file() else "no checkpoint was saved yet"
        advice = ("lower lr, raise warmup_steps, lower clip_norm, or train in fp32/bf16 "
                  "instead of fp16")
        if self.policy == "stop":
            raise TrainingError(f"{what}; the weights were not updated; stopping (nonfinite_loss: stop). "
                                f"{saved}. Try: {advice}, or nonfinite_loss: skip")
        if st.skipped_in_a_row >= self.max_in_a_row:
            raise TrainingError(f"{what}: {st.skipped_in_a_row} non-finite updates in a row "
                                f"(max_skipped_updates={self.max_in_a_row}); stopping. {saved}. "
                                f"Try: {advice}")
        logger.warning("%s: update skipped (%d in a row, %d in all)", what, st.skipped_in_a_row,
                       st.skipped_updates)


class StopSignals:
    """While entered: SIGINT/SIGTERM set :attr:`received` (the signal number)
    instead of stopping the process; the training loop then saves and stops.
    The first signal restores the previous handlers, so a second one gets them
    (Ctrl-C twice interrupts at once). Outside the main thread, where handlers
    cannot be set, it does nothing."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        self.received = 0
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._previous:
            signal.signal(s, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.received = signum
        self._restore()
        logger.warning("%s received: saving last.pt after this update, then stopping "
                       "(send it again to stop at once)", signal.Signals(signum).name)

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def __exit__(self, *exc) -> None:
        self._restore()
        self._previous = {}
