"""Output allocation for the kernels, with an optional NaN poison that catches unwritten elements."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

_poison = {"on": os.environ.get("FASTSEQ_POISON", "") == "1"}


def poison() -> bool:
    """Whether outputs are NaN-filled before kernels write them (``FASTSEQ_POISON=1`` or :func:`set_poison`)."""
    return _poison["on"]


def set_poison(flag: bool) -> None:
    """Testing aid: fill every output with NaN before the kernels write it, so an
    element a kernel forgets to write shows up as NaN in a parity test."""
    _poison["on"] = bool(flag)


def empty(shape: Sequence[int], like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialised output on ``like``'s device (NaN-filled when poisoning is on)."""
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if _poison["on"] and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype fastseq computes in for inputs of ``t``'s dtype: float32 for
    float16/bfloat16, else ``t``'s own (every backend accumulates half inputs in fp32)."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
