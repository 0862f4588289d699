"""Additive (Bahdanau) attention: fastseq's fused op against the eager formula users write.

Cases: ``attention-{fwd,fwdbwd}-B{B}-T{T}-S{S}-A{A}-D{D}``: B rows, T queries per
row (T = 1: one decoder step; T > 1: the multi-query form, queries that do not
depend on each other, e.g. attention after the RNN), S source positions of which
the first ``lengths[b]`` are valid (drawn in ``[S/2, S]``, row 0 full; passed as
a bool mask ``[B, S]``), attention size A, value size D (2A: a bidirectional
encoder's states). The inputs are those of the op: projected queries
``q [B, T, A]``, projected keys ``K [B, S, A]``, values ``V [B, S, D]``, the energy
vector ``v [A]`` (the query and key projections are matrix products outside it,
the same for everyone). ``fwd`` runs under ``torch.no_grad``; ``fwdbwd`` is the
forward plus the backward of ``(context * g).sum()`` to q, K, V and v.

Implementations, all on the same inputs, checked before they are timed against
the eager formula in float32 (context, weights and, for ``fwdbwd``, every
gradient; :func:`~fastseq.bench.core.check_outputs`, with ``eager`` in the case's
dtype as the baseline):

* ``fastseq-<backend>``: :func:`fastseq.ops.additive_attention` with the backend
  forced (one pass over the source, online softmax; the ``[B, T, S, A]`` tanh
  tensor is never written);
* ``eager``: the formula as users write it (:func:`eager_attention`):
  ``tanh(q[:, :, None] + K[:, None]) @ v``, ``masked_fill``, ``softmax``, ``bmm``,
  in the case's dtype;
* ``eager-compiled``: ``torch.compile`` of it (Inductor fuses the pointwise ops
  into the reduction); not in the tiny grid, where compiling would take most of
  the run. A compilation that fails is recorded in the run's errors.

Floor: bytes = q + K + V + mask + context + weights; flops = ``B T S (3A + 2D)``
(add, tanh and the dot with v over A, the weighted sum over D); x3 with the
backward. The ``[B, T, S, A]`` tensor the eager formula writes and reads back is
not in it (a fused kernel needs none), so it is the gap the fused op can close;
at T = 1 on a GPU, launch latency (a few microseconds) dominates both.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import fastseq
from fastseq import ops
from fastseq.bench import roofline
from fastseq.bench.core import Context, check_outputs, compiled, dtype_name, forward_backward, rotating, upcast

SUITE = "attention"
SETS = 3  # input sets rotated per call


def grid(ctx: Context) -> List[Tuple[str, int, int, int, int, int]]:
    """(mode, B, T, S, A, D) of the run's grid."""
    shapes = ctx.grid.pick(
        tiny=[(2, 1, 8, 16, 32), (2, 4, 8, 16, 32)],
        quick=[(64, 1, 32, 512, 1024), (64, 32, 32, 512, 1024), (256, 1, 128, 512, 1024)],
        cpu=[(1, 1, 32, 256, 512), (64, 1, 32, 256, 512), (64, 1, 32, 512, 1024), (8, 32, 32, 256, 512)],
        full=[(b, t, s, a, 2 * a) for b in (1, 8, 64, 256) for t in (1, 32) for s in (32, 128) for a in (256, 512)],
    )
    return [(mode, *s) for mode in ("fwd", "fwdbwd") for s in shapes]


def case_name(mode, B, T, S, A, D) -> str:
    return f"attention-{mode}-B{B}-T{T}-S{S}-A{A}-D{D}"


def floor(mode, B, T, S, A, D, dtype, ceilings) -> Optional[float]:
    elt = torch.finfo(dtype).bits // 8
    flops = 1.0 * B * T * S * (3 * A + 2 * D)
    n_bytes = elt * (B * T * A + B * S * (A + D) + A + B * T * (D + S)) + B * S
    k = 3.0 if mode == "fwdbwd" else 1.0
    return roofline.floor_ms(k * n_bytes, k * flops, dtype, ceilings)


def eager_attention(q: Tensor, K: Tensor, V: Tensor, v: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Additive attention as users write it: context ``[B, T, D]`` and weights ``[B, T, S]``."""
    scores = torch.tanh(q[:, :, None] + K[:, None]) @ v  # [B, T, S, A] @ [A] -> [B, T, S]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.bmm(weights, V), weights


def run(ctx: Context) -> None:
    for mode, B, T, S, A, D in grid(ctx):
        for dtype in ctx.dtypes:
            name = case_name(mode, B, T, S, A, D)
            ctx.attempt(f"{SUITE} {name} {dtype_name(dtype)}",
                        lambda: _case(ctx, mode, B, T, S, A, D, dtype, name))


def _case(ctx: Context, mode, B, T, S, A, D, dtype, name) -> None:
    dev = ctx.device
    g = torch.Generator().manual_seed(ctx.seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(dev, dtype)

    sets = []  # ((q, K, V, v, mask), cotangents or None)
    for _ in range(SETS):
        lengths = torch.randint(max(1, S // 2), S + 1, (B,), generator=g)
        lengths[0] = S
        mask = (torch.arange(S)[None, :] < lengths[:, None]).to(dev)
        inputs = (randn(B, T, A), randn(B, S, A), randn(B, S, D), randn(A), mask)
        sets.append((inputs, (randn(B, T, D),) if mode == "fwdbwd" else None))

    def fused(q, K, V, v, mask):
        return ops.additive_attention(q, K, V, v, mask=mask)

    def call(fn: Callable, backend: Optional[str] = None) -> Callable:
        def go(inputs, cotangents):
            with fastseq.backend(backend) if backend else contextlib.nullcontext():
                return forward_backward(fn, inputs, cotangents)
        return go

    calls: Dict[str, Callable] = {f"fastseq-{b}": call(fused, b) for b in ctx.fastseq_backends(dtype)}
    calls["eager"] = call(eager_attention)

    # correctness first: against the eager formula in float32
    inputs, cotangents = sets[0]
    labels = ["context", "weights"] + (["grad q", "grad K", "grad V", "grad v"] if mode == "fwdbwd" else [])
    want = call(eager_attention)(upcast(inputs), upcast(cotangents))
    base = calls["eager"](inputs, cotangents)

    def check(impl: str) -> bool:
        return check_outputs(f"{name} {impl}", labels, calls[impl](inputs, cotangents), want, dtype, base)

    for impl in list(calls):
        check(impl)
    if not ctx.grid.tiny:
        calls["eager-compiled"] = call(compiled(eager_attention))
        if not ctx.attempt(f"{SUITE} {name} {dtype_name(dtype)} eager-compiled", lambda: check("eager-compiled")):
            del calls["eager-compiled"]

    nxt = rotating(sets)
    ctx.time(SUITE, name, dtype, {impl: (lambda fn=fn: fn(*nxt())) for impl, fn in calls.items()},
             floor_ms=floor(mode, B, T, S, A, D, dtype, ctx.ceilings))
