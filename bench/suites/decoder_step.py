"""The attention decoder: fastseq's fused step against the same decoder on eager torch.nn ops.

The decoder of :mod:`fastseq.seq2seq.model` (GRU with additive attention, the
sizes of a training config: ``multi30k-gpu`` on a GPU, ``multi30k-cpu`` on a CPU,
a toy model in the tiny grid), over a fixed encoder memory: values
``[B, S, D]`` (D = 2 x encoder hidden), projected keys ``[B, S, A]``, a source
mask (lengths drawn in ``[S/2, S]``, row 0 full) and an initial state.

Cases (model sizes as :func:`~fastseq.bench.core.seq2seq_sizes` writes them):

* ``decoder-fwdbwd-B{B}-S{S}-T{T}-<sizes>``: teacher-forced decoding of T target
  steps (``Decoder.forward``: the embedding, T steps, the readout and output
  layers over the vocabulary) plus the backward of ``(logits * g).sum()`` to every
  decoder parameter it uses and to the memory (values, keys, initial state): the
  part of a seq2seq training step that cuDNN cannot run as one kernel.
* ``decoder-step-B{B}-S{S}-<sizes>``: one decoding step, forward only: a token's
  embedding (and, for fastseq, its part of the GRU input projection) and
  ``Decoder.step`` (:func:`fastseq.ops.attention_gru_step`: three launches), the
  state after it, its context and attention weights; what search runs per step
  before the output layer. The step's stacked weights are built once, outside.

Implementations, on the same weights (shared) and inputs, checked before they
are timed against ``eager`` in float32 (every output and, for ``fwdbwd``, every
gradient; :func:`~fastseq.bench.core.check_outputs`, with ``eager`` in the case's
dtype as the baseline):

* ``fastseq-<backend>``: the model's :class:`~fastseq.seq2seq.model.Decoder` with
  the backend forced;
* ``eager``: :class:`fastseq.seq2seq.eager.EagerDecoder` on the same parameters
  (per step ``query_layer``, ``tanh(q + K)``, ``energy_layer``, ``masked_fill``,
  ``softmax``, ``bmm``, ``cat``, torch.nn.GRUCell), as the common toolkits write it;
* ``eager-compiled``: ``torch.compile`` of it (for ``fwdbwd`` the T-step loop
  unrolled into one graph and its backward: ~20 s of compilation on a 2-core CPU
  at T = 16, growing with T, so only in the ``cpu`` and ``full`` grids, not in
  the GPU check's ``quick`` one; the single step in every grid but tiny). A
  compilation that fails is recorded in the run's errors and the case is timed
  without it.

Precision: float32; half dtypes run as training runs them, float32 parameters
under ``torch.autocast`` (:meth:`Context.autocast`), with the memory in the half
dtype (as ``Seq2Seq.encode`` makes it under autocast). Dropout is 0: random masks
would differ between implementations (its cost, pointwise on the embeddings and
the readout, is the same in all of them).

Floor: flops = per step ``2 B H (A + 3H)`` (query and hidden projections),
``B S (3A + 2D)`` (attention), ``6 B H D`` (context projection), and for
``fwdbwd`` over all T steps the embedding projection ``6 B T E H``, the readout
``2 B T (H + D + E) R`` and the output layer ``2 B T R V``; bytes = every weight
used (float32) and the memory once (first touch: the steps reread them from
cache), plus the states and the logits written; x3 with the backward. Per step,
the math is microseconds on a GPU, so launch latency (3 launches per fused step
against >= 12 eager) is the bound the cases measure.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import fastseq
from fastseq.bench import roofline
from fastseq.bench.core import (Context, check_outputs, compiled, dtype_name, forward_backward, rotating,
                                seq2seq_model, seq2seq_sizes, upcast)
from fastseq.seq2seq.eager import EagerDecoder
from fastseq.seq2seq.model import Memory, ModelConfig, Seq2Seq

SUITE = "decoder_step"
SETS = 3  # input sets rotated per call
# decoder parameters the decoder's forward does not use (the key projection and the
# bridge run once per source batch, in Seq2Seq.encode)
UNUSED = ("attention.key_layer.", "bridge.")


def grid(ctx: Context) -> List[Tuple[str, int, int, int]]:
    """(mode, B, S, T) of the run's grid (T = 1 for the single step)."""
    return ctx.grid.pick(
        tiny=[("fwdbwd", 2, 6, 4), ("step", 2, 6, 1)],
        quick=[("fwdbwd", 64, 32, 32), ("step", 1, 32, 1), ("step", 64, 32, 1)],
        cpu=[("fwdbwd", 16, 16, 12), ("step", 1, 16, 1), ("step", 64, 16, 1)],
        full=[("fwdbwd", b, 32, 32) for b in (8, 64, 256)] + [("fwdbwd", 64, 64, 64)]
        + [("step", b, s, 1) for b in (1, 8, 64, 320) for s in (32, 64)],
    )


def case_name(mode, B, S, T, cfg: ModelConfig) -> str:
    if mode == "step":
        return f"decoder-step-B{B}-S{S}-{seq2seq_sizes(cfg)}"
    return f"decoder-{mode}-B{B}-S{S}-T{T}-{seq2seq_sizes(cfg)}"


def floor(mode, B, S, T, cfg: ModelConfig, dtype, ceilings) -> Optional[float]:
    E, H, A, R, V = cfg.emb_size, cfg.dec_hidden_size, cfg.attn_size, cfg.readout_size, cfg.tgt_vocab_size
    D = 2 * cfg.enc_hidden_size
    elt = torch.finfo(dtype).bits // 8
    step_flops = 2.0 * B * H * (A + 3 * H) + B * S * (3 * A + 2 * D) + 6.0 * B * H * D
    step_params = (A + 3 * H) * H + 3 * H * (E + D) + 6 * H + A  # W_a, W_hh, W_ih, biases, v
    memory_bytes = elt * B * S * (A + D) + B * S  # keys, values, mask
    if mode == "step":  # the step's weights are cast once per batch (autocast): elt bytes each
        flops = step_flops + 6.0 * B * E * H
        n_bytes = elt * step_params + memory_bytes + elt * B * (2 * H + D + S)
        return roofline.floor_ms(n_bytes, flops, dtype, ceilings)
    flops = T * step_flops + 6.0 * B * T * E * H + 2.0 * B * T * ((H + D + E) * R + R * V)
    params = step_params + V * E + (H + D + E + 1) * R + (R + 1) * V  # + embedding, readout, output
    n_bytes = 4 * params + memory_bytes + elt * B * (H + T * (H + D + V))
    return roofline.floor_ms(3 * n_bytes, 3 * flops, dtype, ceilings)


def run(ctx: Context) -> None:
    cfg = seq2seq_model(ctx)
    for mode, B, S, T in grid(ctx):
        for dtype in ctx.dtypes:
            name = case_name(mode, B, S, T, cfg)
            ctx.attempt(f"{SUITE} {name} {dtype_name(dtype)}", lambda: _case(ctx, cfg, mode, B, S, T, dtype, name))


def _case(ctx: Context, cfg: ModelConfig, mode, B, S, T, dtype, name) -> None:
    dev = ctx.device
    torch.manual_seed(ctx.seed)
    decoder = Seq2Seq(cfg).decoder.to(dev)
    eager = EagerDecoder(decoder)
    used = {n: p for n, p in decoder.named_parameters() if not n.startswith(UNUSED)}
    params = list(used.values())
    H, D = cfg.dec_hidden_size, 2 * cfg.enc_hidden_size
    g = torch.Generator().manual_seed(ctx.seed + 1)

    def memory_set() -> Tuple[Tensor, ...]:
        """values, proj_keys, mask, state (the initial state, or the step's s_{i-1})."""
        lengths = torch.randint(max(1, S // 2), S + 1, (B,), generator=g)
        lengths[0] = S
        mask = (torch.arange(S)[None, :] < lengths[:, None]).to(dev)
        values = torch.randn(B, S, D, generator=g).to(dev)
        state = torch.tanh(torch.randn(B, H, generator=g)).to(dev)
        with torch.no_grad(), ctx.autocast(dtype):
            proj_keys = decoder.attention.precompute_keys(values)
        half = proj_keys.dtype
        return values.to(half), proj_keys, mask, state.to(half)

    def tokens(*shape: int) -> Tensor:
        return torch.randint(4, cfg.tgt_vocab_size, shape, generator=g).to(dev)

    sets = []  # (inputs, cotangents or None)
    for _ in range(SETS):
        values, proj_keys, mask, state = memory_set()
        if mode == "step":
            sets.append(((tokens(B), state, values, proj_keys, mask), None))
        else:
            cot = (torch.randn(B, T, cfg.tgt_vocab_size, generator=g).to(dev, dtype),)
            sets.append(((tokens(B, T), values, proj_keys, mask, state), cot))

    def forward(dec, half: bool) -> Callable:
        """The decoder's outputs from a set's inputs (autocast to ``dtype`` if ``half``)."""
        dt = dtype if half else torch.float32
        if mode == "step":
            with ctx.autocast(dt):
                weights = dec.step_weights()  # built once per batch, as search does

            def fn(tok, state, values, proj_keys, mask):
                with ctx.autocast(dt):
                    _, gi = dec.embed_inputs(tok[:, None])
                    return dec.step(gi[:, 0], state, Memory(values, proj_keys, mask, state), weights)
        else:
            def fn(tgt_in, values, proj_keys, mask, state):
                with ctx.autocast(dt):
                    return (dec(tgt_in, Memory(values, proj_keys, mask, state)),)
        return fn

    def call(fn: Callable, backend: Optional[str] = None) -> Callable:
        def go(inputs, cotangents):
            with fastseq.backend(backend) if backend else contextlib.nullcontext():
                return forward_backward(fn, inputs, cotangents, params if cotangents else ())
        return go

    calls: Dict[str, Callable] = {f"fastseq-{b}": call(forward(decoder, True), b)
                                  for b in ctx.fastseq_backends(dtype)}
    calls["eager"] = call(forward(eager, True))

    # correctness first: against the eager decoder in float32
    inputs, cotangents = sets[0]
    labels = ["logits"] if mode == "fwdbwd" else ["state", "context", "attention weights"]
    if mode == "fwdbwd":
        labels += ["grad values", "grad proj_keys", "grad init_state"] + [f"grad {n}" for n in used]
    want = call(forward(eager, False))(upcast(inputs), upcast(cotangents))
    base = calls["eager"](inputs, cotangents)

    def check(impl: str) -> bool:
        return check_outputs(f"{name} {impl}", labels, calls[impl](inputs, cotangents), want, dtype, base)

    for impl in list(calls):
        check(impl)
    if ctx.grid.name in (("quick", "cpu", "full") if mode == "step" else ("cpu", "full")):
        calls["eager-compiled"] = call(compiled(forward(eager, True)))
        if not ctx.attempt(f"{SUITE} {name} {dtype_name(dtype)} eager-compiled", lambda: check("eager-compiled")):
            del calls["eager-compiled"]

    nxt = rotating(sets)
    ctx.time(SUITE, name, dtype, {impl: (lambda fn=fn: fn(*nxt())) for impl, fn in calls.items()},
             floor_ms=floor(mode, B, S, T, cfg, dtype, ctx.ceilings),
             note="" if ctx.cuda else "CPU: ATen/oneDNN for eager")
