"""Precision of a training run: fp32, or bf16/fp16 autocast (fp16 with a GradScaler).

``precision: auto`` is bf16 on CUDA devices that support it and fp32 elsewhere.
The autocast context is entered by the task around its forward passes
(:attr:`fastseq.training.task.Runtime.precision`); the trainer scales the loss
and steps the optimizer through :attr:`Precision.scaler` (a no-op unless fp16).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class Precision:
    """The resolved precision of a run on one device.

    Attributes:
        name: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        dtype: the autocast dtype (None for fp32).
        scaler: a ``torch.amp.GradScaler``, enabled for fp16 only.

    Raises:
        ValueError: an unknown precision, or fp16 (or bf16 where unsupported) requested on a
            device without it.
    """

    def __init__(self, precision: str, device: torch.device):
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if precision == "fp16" and device.type != "cuda":
            raise ValueError(f"precision 'fp16' needs a CUDA device (training on {device}); use bf16 or fp32")
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision 'bf16': this CUDA device does not support bfloat16; use fp16")
        self.name = precision
        self.device_type = device.type
        self.dtype: Optional[torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> ContextManager:
        """A fresh autocast context for the forward pass (a null context for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)
