"""GRU and LSTM layers: fastseq against what users would run instead.

Cases: ``{gru,lstm}-{fwd,fwdbwd}-B{B}-H{H}-T{T}-{uni,bi}-{dense,packed}``, input size
= H, one layer. ``fwd`` runs under ``torch.no_grad``; ``fwdbwd`` is the forward plus
the backward of ``(output * g).sum()`` to the input and every parameter. Packed
input has lengths drawn uniformly in ``[T/4, T]`` (one row of T), as a
``PackedSequence`` with ``enforce_sorted=False``; its output is taken as it comes
(the packed data, no padding). T = 1 cases are one decoder step per call (a
layer called once per target token). Run with ``--threads 1`` and ``--threads 2``
for the thread counts (one process per core under DDP; two cores).

Implementations, all on the same weights and inputs, checked against torch.nn
before they are timed:

* ``fastseq-<backend>``: :class:`fastseq.nn.GRU`/``LSTM`` with the backend forced
  (every one available on the device: :meth:`Context.fastseq_backends`);
* ``fastseq-cpp-persistent``, ``fastseq-cpp-persistent-cluster`` (CUDA, dense input,
  the C++ backend's CUDA kernels): the whole-sequence kernels, one cooperative launch
  per layer and direction (``FASTSEQ_CUDA_PERSISTENT=1``; half precision on tensor
  cores), the backward as the block kernel (``FASTSEQ_CUDA_PERSISTENT_CLUSTER=0``) or
  in thread-block clusters (``=auto``). A setting that does not apply to the case (or
  the device) is left out, with a note. Opt-in, as the kernels have not run on a GPU
  yet and a fault there would end the process's later cases:
  ``FASTSEQ_BENCH_PERSISTENT=1`` adds them; ``=only`` times only them, next to
  cuDNN timed again in the same rounds as ``torch.nn-rerun`` (bench/gpu_check.sh's
  last stage, in its own process);
* ``torch.nn``: torch.nn.GRU/LSTM (oneDNN/ATen on the CPU; cuDNN on a GPU, with
  TF32 off for float32, fastseq's default precision); ``torch.nn-tf32``: cuDNN with
  TF32 on (float32 on a GPU);
* ``eager-cells``: a Python loop over torch.nn.GRUCell/LSTMCell, one call per step
  and direction, padded rows held by ``torch.where`` (the loop users write by hand);
* ``flashrnn``: FlashRNN's fused kernel (GPU, dense, unidirectional, when the
  ``flashrnn`` package imports; its cases are skipped with a note otherwise).

Floor: bytes = input + weights + output (x3 with the backward), flops = the input
projection and recurrent products (x3 with the backward), at the machine's
measured rates (:mod:`fastseq.bench.roofline`).
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastseq
import fastseq.nn as fnn
from fastseq.bench import roofline
from fastseq.bench.baselines import flashrnn_call
from fastseq.bench.core import Context, check_close, dtype_name, rotating

SUITE = "layer"
SETS = 3  # input sets rotated per call


def grid(ctx: Context) -> List[Tuple[str, str, int, int, int, bool, bool]]:
    """(kind, mode, B, H, T, bidirectional, packed) of the run's grid."""
    kinds, modes = ("gru", "lstm"), ("fwd", "fwdbwd")
    shapes = ctx.grid.pick(
        tiny=[(4, 32, 8, False, False), (4, 32, 8, True, True)],
        quick=[(8, 512, 128, False, False), (64, 512, 128, False, False), (64, 512, 128, True, True),
               (256, 1024, 32, False, False)],
        cpu=[(b, h, 32, bi, pk) for b in (1, 8, 16, 64) for h in (256, 512)
             for bi, pk in ((False, False), (False, True), (True, False), (True, True))
             if b in (16, 64) or not (pk and not bi)]
        # one decoder step per call (T = 1, the layer called once per target token)
        + [(b, h, 1, False, False) for b in (1, 30, 128) for h in (256, 512)],
        full=[(b, h, t, bi, pk) for b in (1, 8, 64, 256) for h in (256, 512, 1024) for t in (32, 128)
              for bi in (False, True) for pk in (False, True)],
    )
    return [(k, m, *s) for k, m, s in itertools.product(kinds, modes, shapes)]


def case_name(kind, mode, B, H, T, bi, packed) -> str:
    return f"{kind}-{mode}-B{B}-H{H}-T{T}-{'bi' if bi else 'uni'}-{'packed' if packed else 'dense'}"


def floor(kind, mode, B, H, T, bi, n_tokens, dtype, ceilings) -> Optional[float]:
    G, D, I = (3 if kind == "gru" else 4), (2 if bi else 1), H
    elt = torch.finfo(dtype).bits // 8
    flops = 2.0 * n_tokens * D * G * H * (I + H)
    n_bytes = elt * (n_tokens * I + D * G * H * (I + H) + n_tokens * D * H)
    k = 3.0 if mode == "fwdbwd" else 1.0
    return roofline.floor_ms(k * n_bytes, k * flops, dtype, ceilings)


class EagerCells(torch.nn.Module):
    """One layer as a loop over torch.nn cells (each direction its own cell), the same
    weights as ``rnn``; padded steps keep the state (``torch.where``); time-major."""

    def __init__(self, rnn: torch.nn.RNNBase):
        super().__init__()
        cell_cls = torch.nn.GRUCell if isinstance(rnn, torch.nn.GRU) else torch.nn.LSTMCell
        self.lstm = cell_cls is torch.nn.LSTMCell
        self.cells = torch.nn.ModuleList()
        for sfx in [""] + (["_reverse"] if rnn.bidirectional else []):
            cell = cell_cls(rnn.input_size, rnn.hidden_size, bias=rnn.bias).to(rnn.weight_hh_l0)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).data = getattr(rnn, f"{name}_l0{sfx}").data
            self.cells.append(cell)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        T, B, _ = x.shape
        H = self.cells[0].hidden_size
        outs = []
        for d, cell in enumerate(self.cells):
            h = x.new_zeros(B, H)
            state = (h, h) if self.lstm else h
            ys = [None] * T
            steps = range(T) if d == 0 else range(T - 1, -1, -1)
            for t in steps:
                new = cell(x[t], state)
                if lengths is not None:
                    valid = (lengths > t).unsqueeze(1)
                    new = tuple(torch.where(valid, n, s) for n, s in zip(new, state)) if self.lstm \
                        else torch.where(valid, new, state)
                state = new
                ys[t] = state[0] if self.lstm else state
            outs.append(torch.stack(ys))
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]


# The whole-sequence CUDA kernels' settings (csrc/cuda/bindings.cpp), by variant.
PERSISTENT_VARIANTS = {
    "fastseq-cpp-persistent": {"FASTSEQ_CUDA_PERSISTENT": "1", "FASTSEQ_CUDA_PERSISTENT_CLUSTER": "0"},
    "fastseq-cpp-persistent-cluster": {"FASTSEQ_CUDA_PERSISTENT": "1", "FASTSEQ_CUDA_PERSISTENT_CLUSTER": "auto"},
}


def persistent_mode() -> str:
    """``FASTSEQ_BENCH_PERSISTENT``: "0" (unset: no persistent variants), "1" (added) or
    "only" (they and cuDNN alone are timed).

    Raises:
        ValueError: another value, naming the variable.
    """
    mode = os.environ.get("FASTSEQ_BENCH_PERSISTENT", "0") or "0"
    if mode not in ("0", "1", "only"):
        raise ValueError(f"FASTSEQ_BENCH_PERSISTENT: expected 0, 1 or only, got {mode!r}")
    return mode


@contextlib.contextmanager
def environment(settings: Dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``settings`` for the block, restored after (the extension
    reads these variables at every call)."""
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(ctx: Context) -> None:
    persistent = persistent_mode()
    for kind, mode, B, H, T, bi, packed in grid(ctx):
        if persistent == "only" and (packed or not ctx.cuda):
            continue  # the persistent kernels take dense input on CUDA only
        for dtype in ctx.dtypes:
            name = case_name(kind, mode, B, H, T, bi, packed)
            ctx.attempt(f"{SUITE} {name} {dtype_name(dtype)}",
                        lambda: _case(ctx, kind, mode, B, H, T, bi, packed, dtype, name))


def _case(ctx: Context, kind, mode, B, H, T, bi, packed, dtype, name) -> None:
    dev = ctx.device
    torch.manual_seed(ctx.seed)
    ref = getattr(torch.nn, kind.upper())(H, H, bidirectional=bi).to(dev, dtype)
    fast = getattr(fnn, kind.upper())(H, H, bidirectional=bi).to(dev, dtype)
    fast.load_state_dict(ref.state_dict())
    cells = EagerCells(ref)
    g = torch.Generator().manual_seed(ctx.seed + 1)
    sets = []
    for _ in range(SETS):
        x = torch.randn(T, B, H, generator=g).to(dev, dtype)
        lengths = None
        if packed:
            lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=g)
            lengths[0] = T
        sets.append((x, lengths))
    n_tokens = int(sets[0][1].sum()) if packed else T * B

    def inputs(x, lengths):
        return pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x

    def module_call(module: torch.nn.Module, x, lengths) -> torch.Tensor:
        out, _ = module(inputs(x, lengths))
        return out.data if isinstance(out, PackedSequence) else out

    def cells_call(x, lengths) -> torch.Tensor:
        if lengths is None:
            return cells(x, None)
        return pack_padded_sequence(cells(x, lengths.to(dev)), lengths, enforce_sorted=False).data

    calls: Dict[str, Callable] = {}
    for backend in ctx.fastseq_backends(dtype):
        def fast_call(x, lengths, backend=backend):
            with fastseq.backend(backend):
                return module_call(fast, x, lengths)
        calls[f"fastseq-{backend}"] = fast_call
    tf32_variants = [("torch.nn", False)] + ([("torch.nn-tf32", True)] if ctx.cuda and dtype == torch.float32 else [])
    for label, tf32 in tf32_variants:
        def torch_call(x, lengths, tf32=tf32):
            old = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32
            try:
                return module_call(ref, x, lengths)
            finally:
                torch.backends.cudnn.allow_tf32 = old
        calls[label] = torch_call
    calls["eager-cells"] = cells_call
    envs: Dict[str, Dict[str, str]] = {}
    notes: List[str] = []
    persistent = persistent_mode()
    if persistent != "0" and ctx.cuda and not packed and "cpp" in ctx.fastseq_backends(dtype):
        for label, settings in PERSISTENT_VARIANTS.items():
            if label.endswith("-cluster") and dtype not in (torch.float16, torch.bfloat16):
                continue  # the clusters are the tensor-core backward's: float32 would time the same kernel twice
            def persistent_call(x, lengths, settings=settings):
                with fastseq.backend("cpp"), environment(settings):
                    return module_call(fast, x, lengths)
            try:  # forward and backward once: a kernel that does not apply raises (FASTSEQ_CUDA_PERSISTENT=1)
                x_try = sets[0][0].detach().requires_grad_(True)
                with environment(settings):
                    persistent_call(x_try, None).float().sum().backward()
                for p in fast.parameters():
                    p.grad = None
            except RuntimeError as err:
                notes.append(f"{label} left out: {str(err).splitlines()[0][:160]}")
                continue
            calls[label] = persistent_call
            envs[label] = settings
    if ctx.cuda and not bi and not packed:
        flash = flashrnn_call(kind, ref, dtype)
        if flash is not None:
            calls["flashrnn"] = flash

    # correctness first: every implementation's output against torch.nn (TF32 off)
    x0, l0 = sets[0]
    with torch.no_grad():
        want = calls["torch.nn"](x0, l0)
        for impl, fn in calls.items():
            if impl != "torch.nn-tf32":
                check_close(f"{name} {impl}", fn(x0, l0), want, dtype)

    nxt = rotating(sets)
    # one output gradient per input set (packed outputs have that set's N rows)
    grads = [torch.randn(*((int(lens.sum()),) if packed else (T, B)), (2 if bi else 1) * H,
                         generator=g).to(dev, dtype) for _, lens in sets]
    nxt_grad = rotating(grads)
    params = list(ref.parameters()) + list(fast.parameters()) + list(cells.parameters())

    def timed(fn, settings):
        if mode == "fwd":
            def go():
                with torch.no_grad():
                    fn(*nxt())
        else:
            def go():
                x, lengths = nxt()
                x = x.detach().requires_grad_(True)
                with environment(settings):  # the backward's kernels read the settings too
                    out = fn(x, lengths)
                    (out.float() * nxt_grad().float()).sum().backward()
                for p in params:
                    p.grad = None
        return go

    note = "; ".join(([] if ctx.cuda else ["CPU: oneDNN/ATen for torch.nn"]) + notes)
    impls = {impl: timed(fn, envs.get(impl, {})) for impl, fn in calls.items()}
    if persistent == "only":
        if not envs:
            raise RuntimeError(f"no persistent kernel applies: {note}")
        impls = {**{impl: impls[impl] for impl in envs}, "torch.nn-rerun": impls["torch.nn"]}
    ctx.time(SUITE, name, dtype, impls, floor_ms=floor(kind, mode, B, H, T, bi, n_tokens, dtype, ctx.ceilings),
             note=note)
