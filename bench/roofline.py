"""Ceilings measured once per run, and the floor of a case: the least time its
bytes and flops allow on this machine.

Ceilings (:func:`measure`): ``copy_GBps`` (a large device-to-device copy,
bytes read plus bytes written), ``matmul_fp32_TFLOPs`` and
``matmul_bf16_TFLOPs`` (a square matrix product; float32 with TF32 off on CUDA,
as fastseq's default). Floor (:func:`floor_ms`): ``max(bytes / copy rate,
flops / matmul rate)`` for the case's dtype -- a lower bound no implementation
can beat, which says how far each is from the machine's limit
(``achieved / floor`` in the report). It ignores launch latency and the
sequential dependency of a recurrence's steps, both of which the suites'
notes point out where they dominate.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch


def _best_ms(fn, device: torch.device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def measure(device: torch.device, quick: bool = False) -> Dict[str, Optional[float]]:
    """The machine's copy bandwidth and matrix rates on ``device`` (best of a few repeats)."""
    cuda = device.type == "cuda"
    n_bytes = (1 << 30 if cuda else 1 << 27) >> (2 if quick else 0)
    src = torch.empty(n_bytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy_ms = _best_ms(lambda: dst.copy_(src), device, 5)
    out: Dict[str, Optional[float]] = {"copy_GBps": 2 * n_bytes / (copy_ms * 1e-3) / 1e9}
    n = (8192 if cuda else 1024) // (2 if quick else 1)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        for name, dtype in (("matmul_fp32_TFLOPs", torch.float32), ("matmul_bf16_TFLOPs", torch.bfloat16)):
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            t = _best_ms(lambda: a @ b, device, 3 if cuda else 2)
            out[name] = 2 * n ** 3 / (t * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return out


def floor_ms(n_bytes: float, flops: float, dtype: torch.dtype, ceilings: Dict[str, Optional[float]]) -> Optional[float]:
    """``max(bytes / copy rate, flops / matmul rate)`` in ms (bf16/fp16 at the bf16 rate), or None."""
    bw = ceilings.get("copy_GBps")
    rate = ceilings.get("matmul_bf16_TFLOPs" if dtype in (torch.bfloat16, torch.float16) else "matmul_fp32_TFLOPs")
    if not bw or not rate:
        return None
    return max(n_bytes / (bw * 1e9), flops / (rate * 1e12)) * 1e3
