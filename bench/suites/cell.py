"""GRUCell and LSTMCell, one step: fastseq against torch.nn's cells.

Cases: ``{grucell,lstmcell}-{fwd,fwdbwd}-B{B}-H{H}``, input size = H (decoder
sizes). ``fwd`` runs under ``torch.no_grad``; ``fwdbwd`` is the forward plus the
backward of ``sum_k (out_k * g_k).sum()`` over the outputs (h', and c' for the
LSTM) to the input, the state and every parameter.

Implementations, all on the same weights and inputs, checked before they are
timed against torch.nn's cell in float32 (outputs and, for ``fwdbwd``, every
gradient; :func:`~fastseq.bench.core.check_outputs` with torch.nn in the case's
dtype as the baseline):

* ``fastseq-<backend>``: :class:`fastseq.nn.GRUCell`/``LSTMCell`` with the backend
  forced (every one available on the device: :meth:`Context.fastseq_backends`);
* ``torch.nn``: torch.nn.GRUCell/LSTMCell (two matrix products, then ATen's fused
  cell kernel on a GPU, its pointwise ops on the CPU; cuBLAS with TF32 off for
  float32 on a GPU, fastseq's default precision); ``torch.nn-tf32``: the same
  with TF32 matrix products (float32 on a GPU).

Floor: bytes = input + state + weights + biases + outputs, flops = the input and
recurrent products ``2 B G H (I + H)`` (G = 3 gates for the GRU, 4 for the
LSTM); x3 with the backward. At small B one step is too small to come near
either rate on a GPU: launch latency (a few microseconds per kernel) is the
bound there, and the cases show how close each implementation gets to it. The
weights are the same at every call, so where they fit in a CPU's cache (H 512:
3-4 MB) they are read faster than the copy rate and a time below the floor is
possible.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import fastseq
import fastseq.nn as fnn
from fastseq.bench import roofline
from fastseq.bench.core import Context, check_outputs, dtype_name, forward_backward, rotating, upcast

SUITE = "cell"
SETS = 3  # input sets rotated per call


def grid(ctx: Context) -> List[Tuple[str, str, int, int]]:
    """(kind, mode, B, H) of the run's grid."""
    shapes = ctx.grid.pick(
        tiny=[(4, 32)],
        quick=[(8, 512), (64, 512), (128, 1024)],
        cpu=[(b, h) for b in (1, 16, 30, 64, 128) for h in (256, 512)] + [(128, 1024)],
        full=[(b, h) for b in (1, 8, 32, 64, 128) for h in (256, 512, 1024)],
    )
    return [(k, m, *s) for k, m, s in itertools.product(("grucell", "lstmcell"), ("fwd", "fwdbwd"), shapes)]


def case_name(kind, mode, B, H) -> str:
    return f"{kind}-{mode}-B{B}-H{H}"


def floor(kind, mode, B, H, dtype, ceilings) -> Optional[float]:
    G, n_state = (3, 1) if kind == "grucell" else (4, 2)  # gates; state tensors (h; h and c)
    I = H  # noqa: E741 - input size
    elt = torch.finfo(dtype).bits // 8
    flops = 2.0 * B * G * H * (I + H)
    n_bytes = elt * (B * I + 2 * n_state * B * H + G * H * (I + H) + 2 * G * H)
    k = 3.0 if mode == "fwdbwd" else 1.0
    return roofline.floor_ms(k * n_bytes, k * flops, dtype, ceilings)


@contextlib.contextmanager
def tf32_matmul(enabled: bool) -> Iterator[None]:
    """cuBLAS TF32 on or off for the body (torch.nn's cells are matrix products)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def outputs(cell: torch.nn.Module, x: Tensor, state: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    """The cell's outputs as a tuple: (h',) or (h', c')."""
    out = cell(x, tuple(state)) if len(state) == 2 else cell(x, state[0])
    return out if isinstance(out, tuple) else (out,)


def run(ctx: Context) -> None:
    for kind, mode, B, H in grid(ctx):
        for dtype in ctx.dtypes:
            name = case_name(kind, mode, B, H)
            ctx.attempt(f"{SUITE} {name} {dtype_name(dtype)}", lambda: _case(ctx, kind, mode, B, H, dtype, name))


def _case(ctx: Context, kind, mode, B, H, dtype, name) -> None:
    dev = ctx.device
    torch.manual_seed(ctx.seed)
    cls_name = "GRUCell" if kind == "grucell" else "LSTMCell"
    ref = getattr(torch.nn, cls_name)(H, H).to(dev, dtype)
    fast = getattr(fnn, cls_name)(H, H).to(dev, dtype)
    fast.load_state_dict(ref.state_dict())
    truth = ref if dtype == torch.float32 else copy.deepcopy(ref).float()  # the check's reference
    n_state = 1 if kind == "grucell" else 2
    g = torch.Generator().manual_seed(ctx.seed + 1)

    def randn(n: int) -> Tuple[Tensor, ...]:
        return tuple(torch.randn(B, H, generator=g).to(dev, dtype) for _ in range(n))

    # input sets: ((x, h[, c]), cotangents of (h'[, c']) or None)
    sets = [(randn(1 + n_state), randn(n_state) if mode == "fwdbwd" else None) for _ in range(SETS)]

    def step(module: torch.nn.Module, context: Callable[[], ContextManager]):
        def call(inputs, cotangents):
            with context():
                return forward_backward(lambda x, *state: outputs(module, x, state), inputs, cotangents,
                                        list(module.parameters()) if cotangents else ())
        return call

    calls: Dict[str, Callable] = {}
    for backend in ctx.fastseq_backends(dtype):
        calls[f"fastseq-{backend}"] = step(fast, lambda backend=backend: fastseq.backend(backend))
    calls["torch.nn"] = step(ref, lambda: tf32_matmul(False))
    if ctx.cuda and dtype == torch.float32:
        calls["torch.nn-tf32"] = step(ref, lambda: tf32_matmul(True))

    # correctness first: outputs (and gradients) against torch.nn's cell in float32
    inputs, cotangents = sets[0]
    labels = ["h'", "c'"][:n_state]
    if mode == "fwdbwd":
        labels += ["grad x", "grad h", "grad c"][:1 + n_state] + [f"grad {p}" for p, _ in ref.named_parameters()]
    want = step(truth, contextlib.nullcontext)(upcast(inputs), upcast(cotangents))
    base = calls["torch.nn"](inputs, cotangents)
    for impl, fn in calls.items():
        if impl != "torch.nn-tf32":
            check_outputs(f"{name} {impl}", labels, fn(inputs, cotangents), want, dtype, base)

    nxt = rotating(sets)
    ctx.time(SUITE, name, dtype, {impl: (lambda fn=fn: fn(*nxt())) for impl, fn in calls.items()},
             floor_ms=floor(kind, mode, B, H, dtype, ctx.ceilings),
             note="" if ctx.cuda else "CPU: ATen for torch.nn")
