"""Where a training run is: saved in ``last.pt`` (``"state"``) and restored by ``--resume``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class TrainState:
    """The run's position and its evaluation record; plain data, so it round-trips
    through ``dataclasses.asdict`` and ``TrainState(**d)``."""

    step: int = 0                 # updates done
    epoch: int = 0                # current epoch (0-based)
    batches_done: int = 0         # global batches of the current epoch already consumed
    tokens: int = 0               # tokens trained on (all processes)
    train_time: float = 0.0       # seconds spent in updates
    elapsed: float = 0.0          # wall seconds of the run before this process started
    best: float = math.inf        # best value of the (minimised) best-metric score
    best_step: int = -1
    bad_evals: int = 0            # evaluations since the last improvement
    best_val_loss: float = math.inf
    kept: List[List[float]] = field(default_factory=list)  # [score, step] of kept step checkpoints
    history: List[Dict[str, float]] = field(default_factory=list)  # evaluation records
    stopped_early: bool = False
    skipped_updates: int = 0      # updates dropped for a non-finite loss or gradient
    skipped_in_a_row: int = 0
