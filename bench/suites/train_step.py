"""The whole seq2seq training step: fastseq's model against the same model on eager torch.nn ops.

One step of the trainer (:mod:`fastseq.training.trainer`) on a synthetic batch:
the forward (:class:`~fastseq.seq2seq.model.Seq2Seq`: embeddings, the packed
bidirectional GRU encoder, the key projection, T teacher-forced decoder steps,
the readout and output layers), the masked cross-entropy with label smoothing,
the backward, gradient clipping, the Adam step and ``zero_grad``. Model sizes of
the ``multi30k-gpu`` training config on a GPU, ``multi30k-cpu`` on a CPU (a toy
model in the tiny grid); label smoothing 0.1, clip norm 1.0 and Adam as in both
configs (the values do not change the work).

Cases: ``train-B{B}-S{S}-T{T}-<sizes>`` (:func:`~fastseq.bench.core.seq2seq_sizes`).
Batches as training's token-budget batches are (``max_tokens`` 8192 on a GPU,
4096 on a CPU, so ``B x max(S, T)`` is near it in the full grid, smaller on a CPU
to keep the run in minutes): source ids ``[B, S]`` with lengths uniform in
``[S/2, S]`` (one row of S), packed by the encoder; targets likewise in
``[T/2, T]``, ``tgt_in`` = bos + tokens, ``tgt_out`` = tokens + eos, padded
(:func:`~fastseq.bench.core.token_batch`).

Implementations:

* ``fastseq-<backend>``: the model with the backend forced;
* ``fastseq-<backend>-graphs`` (CUDA only): the same with the teacher-forced decoder
  loops replayed as CUDA graphs (:func:`fastseq.backend.graphs.graph_caches`, as
  ``FASTSEQ_CUDA_GRAPHS=1`` does): one graph launch per loop call after a shape's
  second call, against the per-step launches of ``fastseq-<backend>``;
* ``eager``: :class:`fastseq.seq2seq.eager.EagerSeq2Seq`, the same model on eager
  torch.nn modules (the encoder through torch.nn.GRU's own forward: cuDNN on a
  GPU, oneDNN/ATen on a CPU; the decoder as :class:`~fastseq.seq2seq.eager.EagerDecoder`);
* ``eager-compiled``: ``torch.compile`` of ``EagerSeq2Seq`` (its forward, with the
  T decoder steps unrolled, and its backward; the loss, clipping and Adam step
  stay eager, as in the trainer). Compiling it takes tens of seconds on a 2-core
  CPU, growing with T, so only in the ``cpu`` and ``full`` grids, not in the GPU
  check's ``quick`` one. A compilation that fails is recorded in the run's errors.

Identical weights: every implementation has its own copy of the model and its own
Adam, all made from one initial model, and its own rotation over the same input
sets, so its n-th timed call starts from the weights after the same n - 1 updates
on the same batches: identical up to rounding. Restoring one snapshot before each
call was the other way; it would add a copy of the weights and of Adam's two
moments (3x the model) to every timed call, and the updates change the values,
not the work. Before timing, from the initial weights, each implementation's loss
and every parameter's gradient (before clipping and the step) are checked
against ``eager`` in float32 (:func:`~fastseq.bench.core.check_outputs`, with
``eager`` in the case's dtype as the baseline: in bfloat16 some gradients, such
as the attention query layer's, are sums of cancelling terms that the eager model
itself gets only to 10-20%).

Precision: float32; half dtypes as training runs them, float32 parameters and
Adam with the forward under ``torch.autocast`` (:meth:`Context.autocast`), the loss
in float32. Dropout is 0: random masks would differ between implementations.

Floor: flops = the encoder ``2 x 2 n_src 3He (E + He)`` (n_src: real source
tokens), the key projection ``2 B S D A``, the decoder over ``B T`` positions (per
position ``2 H (A + 3H) + S (3A + 2D) + 6 H (D + E) + 2 (H + D + E) R + 2 R V``),
x3 with the backward; bytes = 48 bytes per parameter (read in the forward and
backward, gradient written, clipping's two passes, Adam's read of weight,
gradient and two moments and write of three) and 4 passes over the ``[B, T, V]``
logits in float32 (written, read by the loss, its gradient written and read).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import fastseq
from fastseq.backend.graphs import graph_caches
from fastseq.bench import roofline
from fastseq.bench.core import (Context, check_outputs, compiled, dtype_name, rotating, seq2seq_model,
                                seq2seq_sizes, token_batch)
from fastseq.seq2seq.eager import EagerSeq2Seq
from fastseq.seq2seq.model import PAD_ID, ModelConfig, Seq2Seq, masked_cross_entropy

SUITE = "train_step"
SETS = 3  # input sets rotated per call
BOS, EOS = 2, 3  # fastseq.data.tokenizer's ids
LR, LABEL_SMOOTHING, CLIP_NORM = 1e-3, 0.1, 1.0


def grid(ctx: Context) -> List[Tuple[int, int, int]]:
    """(B, S, T) of the run's grid."""
    return ctx.grid.pick(
        tiny=[(4, 6, 6)],
        quick=[(256, 32, 32)],
        cpu=[(64, 16, 16)],
        full=[(128, 32, 32), (256, 32, 32), (512, 16, 16), (128, 64, 64)],
    )


def case_name(B, S, T, cfg: ModelConfig) -> str:
    return f"train-B{B}-S{S}-T{T}-{seq2seq_sizes(cfg)}"


def floor(B, S, T, n_src: int, n_params: int, cfg: ModelConfig, dtype, ceilings) -> Optional[float]:
    E, He, H, A = cfg.emb_size, cfg.enc_hidden_size, cfg.dec_hidden_size, cfg.attn_size
    R, V, D = cfg.readout_size, cfg.tgt_vocab_size, 2 * cfg.enc_hidden_size
    per_position = 2 * H * (A + 3 * H) + S * (3 * A + 2 * D) + 6 * H * (D + E) + 2 * (H + D + E) * R + 2 * R * V
    flops = 2.0 * 2 * n_src * 3 * He * (E + He) + 2.0 * B * S * D * A + 1.0 * B * T * per_position
    n_bytes = 48.0 * n_params + 4 * 4.0 * B * T * V
    return roofline.floor_ms(n_bytes, 3 * flops, dtype, ceilings)


def batch(B: int, S: int, T: int, cfg: ModelConfig, g: torch.Generator, device) -> Tuple[Tensor, ...]:
    """(src, src_lengths, tgt_in, tgt_out) on ``device`` (see the module docstring)."""
    src, src_lengths = token_batch(B, S, cfg.src_vocab_size, g, pad_id=PAD_ID)
    tokens, lengths = token_batch(B, T - 1, cfg.tgt_vocab_size, g, pad_id=PAD_ID)  # the targets without bos/eos
    tgt_in = torch.cat([torch.full((B, 1), BOS), tokens], 1)
    tgt_out = torch.cat([tokens, torch.full((B, 1), PAD_ID)], 1)
    tgt_out[torch.arange(B), lengths] = EOS
    return tuple(t.to(device) for t in (src, src_lengths, tgt_in, tgt_out))


def run(ctx: Context) -> None:
    cfg = seq2seq_model(ctx)
    for B, S, T in grid(ctx):
        for dtype in ctx.dtypes:
            name = case_name(B, S, T, cfg)
            ctx.attempt(f"{SUITE} {name} {dtype_name(dtype)}", lambda: _case(ctx, cfg, B, S, T, dtype, name))


class Replica:
    """One implementation's own copy of the model and Adam, and its training step."""

    def __init__(self, ctx: Context, initial: Seq2Seq, wrap: Callable[[Seq2Seq], Callable],
                 backend: Optional[str], dtype: torch.dtype, graphs: bool = False):
        self.ctx, self.dtype, self.backend, self.graphs = ctx, dtype, backend, graphs
        self.model = copy.deepcopy(initial)
        self.forward = wrap(self.model)
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=LR)

    def loss(self, src, src_lengths, tgt_in, tgt_out) -> Tensor:
        with self.ctx.autocast(self.dtype):
            logits = self.forward(src, src_lengths, tgt_in)
        return masked_cross_entropy(logits, tgt_out, LABEL_SMOOTHING)[0]

    def backend_context(self):
        stack = contextlib.ExitStack()
        if self.backend:
            stack.enter_context(fastseq.backend(self.backend))
        if self.graphs:
            stack.enter_context(graph_caches(True))
        return stack

    def loss_and_grads(self, inputs) -> Tuple[Tensor, ...]:
        """The loss and every parameter's gradient, no update (the correctness check)."""
        with self.backend_context():
            loss = self.loss(*inputs)
            return (loss,) + torch.autograd.grad(loss, self.params)

    def step(self, inputs) -> None:
        """The trainer's step: loss, backward, clipping, Adam, zero_grad."""
        with self.backend_context():
            self.loss(*inputs).backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _case(ctx: Context, cfg: ModelConfig, B, S, T, dtype, name) -> None:
    dev = ctx.device
    torch.manual_seed(ctx.seed)
    initial = Seq2Seq(cfg).to(dev).train()
    g = torch.Generator().manual_seed(ctx.seed + 1)
    sets = [batch(B, S, T, cfg, g, dev) for _ in range(SETS)]

    replicas: Dict[str, Replica] = {f"fastseq-{b}": Replica(ctx, initial, lambda m: m, b, dtype)
                                    for b in ctx.fastseq_backends(dtype)}
    if ctx.cuda:  # the decoder loops replayed as CUDA graphs (GraphCache), forward and backward
        replicas.update({f"fastseq-{b}-graphs": Replica(ctx, initial, lambda m: m, b, dtype, graphs=True)
                         for b in ctx.fastseq_backends(dtype)})
    replicas["eager"] = Replica(ctx, initial, EagerSeq2Seq, None, dtype)

    # correctness first: from the initial weights, against the eager model in float32
    labels = ["loss"] + [f"grad {n}" for n, _ in initial.named_parameters()]
    base = replicas["eager"].loss_and_grads(sets[0])
    want = base if dtype == torch.float32 else \
        Replica(ctx, initial, EagerSeq2Seq, None, torch.float32).loss_and_grads(sets[0])

    def check(impl: str) -> bool:
        return check_outputs(f"{name} {impl}", labels, replicas[impl].loss_and_grads(sets[0]), want, dtype, base)

    for impl in list(replicas):
        check(impl)
    if ctx.grid.name in ("cpu", "full"):
        replicas["eager-compiled"] = Replica(ctx, initial, lambda m: compiled(EagerSeq2Seq(m)), None, dtype)
        if not ctx.attempt(f"{SUITE} {name} {dtype_name(dtype)} eager-compiled", lambda: check("eager-compiled")):
            del replicas["eager-compiled"]

    def timed(replica: Replica) -> Callable[[], None]:
        nxt = rotating(sets)  # its own rotation: the n-th call of every replica gets the same batch
        return lambda: replica.step(nxt())

    n_src = int(sets[0][1].sum())
    ctx.time(SUITE, name, dtype, {impl: timed(r) for impl, r in replicas.items()},
             floor_ms=floor(B, S, T, n_src, sum(p.numel() for p in initial.parameters()), cfg, dtype,
                            ctx.ceilings),
             note="" if ctx.cuda else "CPU: oneDNN/ATen for eager")
