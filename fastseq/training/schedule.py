"""Learning-rate schedule: linear warm-up, then a decay, times a plateau factor.

``lr(step) = base_lr * warmup(step) * decay(step) * plateau``, for the update
with 0-based index ``step``:

* warm-up: ``min(1, (step + 1) / warmup_steps)`` (Goyal et al. 2017);
* decay after warm-up, by ``kind``: ``"constant"`` (1), ``"inverse_sqrt"``
  (``sqrt(warmup_steps / (step + 1))``, Vaswani et al. 2017), ``"linear"`` or
  ``"cosine"`` (Loshchilov & Hutter 2017) from 1 down to ``min_ratio`` at
  ``total_steps``;
* plateau: multiplied by ``plateau_decay`` each time validation does not
  improve (:meth:`LRSchedule.plateau`); 1.0 turns it off.

The schedule is stateful only through its plateau factor; it round-trips
through :meth:`state_dict` so a resumed run continues on the same curve.
"""
from __future__ import annotations

import math
from typing import Any, Dict

KINDS = ("constant", "inverse_sqrt", "linear", "cosine")


class LRSchedule:
    """See the module docstring.

    Raises:
        ValueError: unknown ``kind``; ``linear``/``cosine`` without ``total_steps``;
            a ratio or factor outside (0, 1].
    """

    def __init__(self, base_lr: float, kind: str = "constant", warmup_steps: int = 0,
                 total_steps: int = 0, min_ratio: float = 0.0, plateau_decay: float = 1.0):
        if kind not in KINDS:
            raise ValueError(f"lr_schedule: expected one of {KINDS}, got {kind!r}")
        if kind in ("linear", "cosine") and total_steps <= warmup_steps:
            raise ValueError(f"lr_schedule {kind!r} needs total_steps > warmup_steps "
                             f"(got {total_steps} and {warmup_steps})")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: expected in [0, 1], got {min_ratio}")
        if not 0.0 < plateau_decay <= 1.0:
            raise ValueError(f"lr_decay: expected in (0, 1], got {plateau_decay}")
        self.base_lr, self.kind, self.warmup_steps = base_lr, kind, warmup_steps
        self.total_steps, self.min_ratio, self.plateau_decay = total_steps, min_ratio, plateau_decay
        self.scale = 1.0

    def __call__(self, step: int) -> float:
        """Learning rate of update ``step`` (0-based)."""
        n = step + 1
        factor = min(1.0, n / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "inverse_sqrt" and n > self.warmup_steps:
            factor = math.sqrt(max(self.warmup_steps, 1) / n)
        elif self.kind in ("linear", "cosine") and n > self.warmup_steps:
            progress = min(1.0, (n - self.warmup_steps) / (self.total_steps - self.warmup_steps))
            shape = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
            factor = self.min_ratio + (1.0 - self.min_ratio) * shape
        return self.base_lr * factor * self.scale

    def plateau(self) -> None:
        """Validation did not improve: multiply every later rate by ``plateau_decay``."""
        self.scale *= self.plateau_decay

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scale = float(state["scale"])
