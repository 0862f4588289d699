"""When to evaluate and save, what an evaluation decides, and which checkpoints are kept.

- Scheduling (:func:`due`): evaluate every ``eval_every`` updates (0: at the end
  of each epoch), write ``last.pt`` every ``save_every`` updates in between, and
  always evaluate the final state.
- Decisions (:func:`judge`): the best score so far (the task's score, lower is
  better; the latest state when there is nothing to validate on), early
  stopping after ``patience`` evaluations without improvement, and a plateau
  (validation loss not improving) that decays the learning rate.
- Retention (:class:`CheckpointRetention`): ``checkpoints/step-N.pt`` at each
  evaluation, the ``keep_checkpoints`` best kept, ``best.pt`` a link to the best.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Tuple

from fastseq.fileio import link_atomic
from fastseq.training.state import TrainState


def due(step: int, every: int) -> bool:
    """Whether an action done every ``every`` updates (0: never) is due after update ``step``."""
    return bool(every) and step % every == 0


def judge(state: TrainState, score: float, val_loss: float, patience: int) -> Tuple[float, bool, bool]:
    """Record an evaluation of the state after update ``state.step`` in ``state``.

    Args:
        score: the task's score of this evaluation (lower is better); NaN when there was
            nothing to score on, which makes the latest state the best.
        val_loss: the validation loss (NaN: none); not improving on the best is a plateau.
        patience: evaluations without improvement that stop the run (0: never).

    Returns:
        ``(score, plateau, stop)``: the score the state is ranked by, whether the
        validation loss reached a plateau, whether to stop early.
    """
    st = state
    plateau = False
    if val_loss < st.best_val_loss:
        st.best_val_loss = val_loss
    elif not math.isnan(val_loss):
        plateau = True
    if math.isnan(score):
        score = -float(st.step)  # nothing to validate on: the latest is the best
    if score < st.best:
        st.best, st.best_step, st.bad_evals = score, st.step, 0
    else:
        st.bad_evals += 1
    stop = bool(patience) and st.bad_evals >= patience
    return score, plateau, stop


class CheckpointRetention:
    """``{out}/checkpoints/step-NNNNNNNN.pt``: the ``keep`` best by score, and
    ``{out}/best.pt`` naming the best of them (a hard link, replaced atomically)."""

    def __init__(self, out: Path, keep: int):
        self.directory, self.best, self.keep = out / "checkpoints", out / "best.pt", keep

    def path(self, step: int) -> Path:
        return self.directory / f"step-{int(step):08d}.pt"

    def add(self, state: TrainState, score: float, write: Callable[[Path], None]) -> None:
        """Write the checkpoint of ``state.step`` with ``write(path)``, rank it by
        ``score`` among ``state.kept``, delete those past the best ``keep`` and
        point ``best.pt`` at the best."""
        write(self.path(state.step))
        kept = sorted([k for k in state.kept if k[1] != state.step] + [[score, state.step]])
        for _, step in kept[self.keep:]:
            self.path(step).unlink(missing_ok=True)
        state.kept = kept[: self.keep]
        link_atomic(self.path(state.kept[0][1]), self.best)
