"""Greedy and beam search: fastseq's model against the same model on eager torch.nn ops.

:func:`fastseq.seq2seq.search.greedy_search` and ``beam_search`` (beam 5, length
penalty 0.6) over a batch of sources, for exactly L steps (eos id -1: no
hypothesis ends early, so every implementation does the same work). The model
has the sizes of the ``multi30k-gpu`` training config on a GPU, ``multi30k-cpu``
on a CPU (a toy model in the tiny grid), random weights, dropout 0, eval mode.

Cases: ``{greedy,beam5}-B{B}-S{S}-L{L}-<sizes>``
(:func:`~fastseq.bench.core.seq2seq_sizes`): B sources of up to S tokens
(lengths uniform in ``[S/2, S]``, one row of S), L decoding steps (B x 5 rows for
the beam).

Implementations, on the same weights (shared) and sources, through the same
search functions (only the model's ``encode``, ``embed_inputs``, ``step`` and
``logits`` differ):

* ``fastseq-<backend>``: the model with the backend forced (the fused encoder and
  decoder step);
* ``eager``: :class:`fastseq.seq2seq.eager.EagerSeq2Seq` (torch.nn.GRU's own
  forward for the encoder: cuDNN on a GPU, oneDNN/ATen on a CPU; the eager
  decoder step).

Checked before timing: the encoder states, initial state, first decoder state
and first step's log-probabilities against ``eager`` in float32
(:func:`~fastseq.bench.core.check_outputs`). The hypotheses are then compared
row by row with ``eager``'s, and the count that agree is the records' note. They
need not all agree: both pick the arg max (or top k) of log-probabilities that
differ by rounding, so a near-tie can go either way, and once one token differs,
so does the rest of that hypothesis (random weights give flat distributions with
many near-ties; bfloat16 rounds far more than float32). A real fault shows in the
check of the log-probabilities, which is what gates the timing.

Precision: float32; half dtypes under ``torch.autocast`` (float32 parameters), as
:mod:`fastseq.seq2seq.translate` decodes.

Floor: flops = the encoder ``2 x 2 n_src 3He (E + He)``, the key projection
``2 B S D A``, and per step and row ``2 H (A + 3H) + S (3A + 2D) + 6 H (D + E) +
2 (H + D + E) R + 2 R V``; bytes = every parameter once (first touch: the steps
reread them from cache) in float32, the memory (keys and values) once, and per
step the ``[rows, V]`` log-probabilities (written, read by the arg max / top k)
in float32. The steps are sequential and each is a few small kernels, so on a
GPU launch latency, not the floor, bounds both implementations.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import fastseq
from fastseq.bench import roofline
from fastseq.bench.core import (Context, check_outputs, dtype_name, rotating, seq2seq_model, seq2seq_sizes,
                                token_batch)
from fastseq.seq2seq.eager import EagerSeq2Seq
from fastseq.seq2seq.model import PAD_ID, ModelConfig, Seq2Seq
from fastseq.seq2seq.search import beam_search, greedy_search

SUITE = "decode"
SETS = 3  # source batches rotated per call
BOS = 2  # fastseq.data.tokenizer's id
NO_EOS = -1  # no token is eos: every search runs max_len steps
BEAM = 5


def grid(ctx: Context) -> List[Tuple[str, int, int, int]]:
    """(method, B, S, L) of the run's grid."""
    shapes = ctx.grid.pick(
        tiny=[(2, 6, 5)],
        quick=[(1, 24, 32), (64, 24, 32)],
        cpu=[(1, 16, 24), (8, 16, 24)],
        full=[(b, 24, 32) for b in (1, 8, 64, 256)],
    )
    return [(method, *s) for method in ("greedy", f"beam{BEAM}") for s in shapes]


def case_name(method, B, S, L, cfg: ModelConfig) -> str:
    return f"{method}-B{B}-S{S}-L{L}-{seq2seq_sizes(cfg)}"


def floor(method, B, S, L, n_src: int, n_params: int, cfg: ModelConfig, dtype, ceilings) -> Optional[float]:
    E, He, H, A = cfg.emb_size, cfg.enc_hidden_size, cfg.dec_hidden_size, cfg.attn_size
    R, V, D = cfg.readout_size, cfg.tgt_vocab_size, 2 * cfg.enc_hidden_size
    rows = B if method == "greedy" else B * BEAM
    per_row = 2 * H * (A + 3 * H) + S * (3 * A + 2 * D) + 6 * H * (D + E) + 2 * (H + D + E) * R + 2 * R * V
    flops = 2.0 * 2 * n_src * 3 * He * (E + He) + 2.0 * B * S * D * A + 1.0 * L * rows * per_row
    elt = torch.finfo(dtype).bits // 8
    n_bytes = 4.0 * n_params + elt * B * S * (A + D) + 2 * 4.0 * L * rows * V
    return roofline.floor_ms(n_bytes, flops, dtype, ceilings)


def first_step(model, src: Tensor, src_lengths: Tensor) -> Tuple[Tensor, ...]:
    """The encoder states, the initial state, and the first step's state and log-probabilities."""
    memory = model.encode(src, src_lengths)
    dec = model.decoder
    emb, gi = dec.embed_inputs(torch.full((src.shape[0], 1), BOS, device=src.device))
    state, context, _ = dec.step(gi[:, 0], memory.init_state, memory, dec.step_weights())
    log_probs = torch.log_softmax(dec.logits(state, context, emb[:, 0]).float(), dim=-1)
    return memory.values, memory.init_state, state, log_probs


def run(ctx: Context) -> None:
    cfg = seq2seq_model(ctx)
    for method, B, S, L in grid(ctx):
        for dtype in ctx.dtypes:
            name = case_name(method, B, S, L, cfg)
            ctx.attempt(f"{SUITE} {name} {dtype_name(dtype)}",
                        lambda: _case(ctx, cfg, method, B, S, L, dtype, name))


def _case(ctx: Context, cfg: ModelConfig, method, B, S, L, dtype, name) -> None:
    dev = ctx.device
    torch.manual_seed(ctx.seed)
    model = Seq2Seq(cfg).to(dev).eval()
    eager = EagerSeq2Seq(model)
    g = torch.Generator().manual_seed(ctx.seed + 1)
    sets = [tuple(t.to(dev) for t in token_batch(B, S, cfg.src_vocab_size, g, pad_id=PAD_ID)) for _ in range(SETS)]

    def search(m, src, src_lengths) -> List[List[int]]:
        if method == "greedy":
            return greedy_search(m, src, src_lengths, BOS, NO_EOS, max_len=L)
        return beam_search(m, src, src_lengths, BOS, NO_EOS, beam_size=BEAM, max_len=L)

    def call(fn: Callable, m, backend: Optional[str], half: bool = True) -> Callable:
        def go(src, src_lengths):
            forced = fastseq.backend(backend) if backend else contextlib.nullcontext()
            with forced, torch.no_grad(), ctx.autocast(dtype if half else torch.float32):
                return fn(m, src, src_lengths)
        return go

    backends = ctx.fastseq_backends(dtype)
    impls: Dict[str, Tuple] = {**{f"fastseq-{b}": (model, b) for b in backends}, "eager": (eager, None)}

    # correctness first: the first step against the eager model in float32
    labels = ["encoder states", "initial state", "state", "log-probs"]
    want = call(first_step, eager, None, half=False)(*sets[0])
    base = call(first_step, eager, None)(*sets[0])
    for impl, (m, b) in impls.items():
        check_outputs(f"{name} {impl}", labels, call(first_step, m, b)(*sets[0]), want, dtype, base)
    calls = {impl: call(search, m, b) for impl, (m, b) in impls.items()}
    reference = calls["eager"](*sets[0])
    agree = [f"{impl} {sum(h == r for h, r in zip(fn(*sets[0]), reference))}/{B}"
             for impl, fn in calls.items() if impl != "eager"]

    nxt = rotating(sets)
    n_src = int(sets[0][1].sum())
    ctx.time(SUITE, name, dtype, {impl: (lambda fn=fn: fn(*nxt())) for impl, fn in calls.items()},
             floor_ms=floor(method, B, S, L, n_src, sum(p.numel() for p in model.parameters()), cfg, dtype,
                            ctx.ceilings),
             note="hypotheses identical to eager's: " + ", ".join(agree))
