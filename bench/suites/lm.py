"""The language model (fastseq.lm): a training step and token-by-token generation, fastseq
against the same model on torch.nn.

Model: :class:`~fastseq.lm.model.LanguageModel` at the sizes of the
``shakespeare-char-cpu`` config on a CPU (2-layer LSTM 512, embeddings 512, tied,
vocabulary 67) and ``shakespeare-char-gpu`` on a GPU; a toy model in the tiny grid.
Dropout 0 (random masks would differ between implementations).

Cases:

* ``lm-train-B{B}-T{T}-<sizes>``: one truncated-BPTT update as the trainer runs it:
  the forward over a ``[B, T]`` chunk from a carried (detached) state, the
  cross-entropy over the ``B T`` targets, the backward, clipping to 1.0, Adam and
  ``zero_grad``. Characters (tokens) per second = ``B T / time``.
* ``lm-generate-B{B}-N{N}-<sizes>``: ``N`` new tokens for ``B`` samples from a
  carried state, as :class:`~fastseq.lm.generate.TextGenerator` makes them: per
  token one step of the model (``[B, 1]`` through the layers) and the draw
  (temperature 0.8, top-k 0, top-p 1), under ``torch.no_grad``. Tokens per second
  = ``B N / time``.

Implementations: ``fastseq-<backend>`` (the backend forced) and ``torch.nn``: the
same weights in a copy of the model whose fastseq layers are swapped back to
torch.nn's (:func:`fastseq.unpatch`; cuDNN on a GPU, oneDNN/ATen on a CPU).
Correctness first: the training step's loss and gradients, and the generation's
logits, are checked against ``torch.nn`` in float32 before timing. Each
implementation has its own model copy and Adam, updated by the same batches in
the same order (so its n-th timed call starts from the same weights).

Floor: flops ``2 B T (L 4H (E + H) + H V)`` x3 with the backward (LSTM; 3H for the
GRU); bytes 48 per parameter for the update; none for generation (latency-bound).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import fastseq
from fastseq.bench import roofline
from fastseq.bench.core import Context, check_outputs, dtype_name, rotating
from fastseq.lm.model import LanguageModel, LMConfig, detach_state
from fastseq.sampling import draw, filter_logits

SUITE = "lm"
SETS = 3
LR, CLIP_NORM, TEMPERATURE = 2e-3, 1.0, 0.8


def model_config(ctx: Context) -> LMConfig:
    """The suite's model: the CPU or GPU config's sizes, a toy one in the tiny grid."""
    if ctx.grid.tiny:
        return LMConfig(emb_size=16, hidden_size=16, num_layers=2, dropout=0.0, vocab_size=67)
    size = 1024 if ctx.cuda else 512
    return LMConfig(emb_size=size, hidden_size=size, num_layers=2 if not ctx.cuda else 3, dropout=0.0,
                    vocab_size=67)


def sizes(cfg: LMConfig) -> str:
    return f"{cfg.rnn_type}{cfg.num_layers}x{cfg.hidden_size}-E{cfg.emb_size}-V{cfg.vocab_size}"


def train_grid(ctx: Context) -> List[Tuple[int, int]]:
    return ctx.grid.pick(tiny=[(4, 8)], quick=[(128, 256)], cpu=[(32, 64), (64, 128)], full=[(64, 256), (128, 256)])


def generate_grid(ctx: Context) -> List[Tuple[int, int]]:
    return ctx.grid.pick(tiny=[(1, 4)], quick=[(1, 64)], cpu=[(1, 64), (8, 64)], full=[(1, 256), (16, 256)])


def floor(B: int, T: int, cfg: LMConfig, n_params: int, dtype, ceilings) -> Optional[float]:
    G = 4 if cfg.rnn_type == "lstm" else 3
    H, E, L, V = cfg.hidden_size, cfg.emb_size, cfg.num_layers, cfg.vocab_size
    per_token = 2 * (G * H * (E + H) + (L - 1) * G * H * (2 * H) + H * V)
    return roofline.floor_ms(48.0 * n_params, 3.0 * B * T * per_token, dtype, ceilings)


def torch_nn_copy(model: LanguageModel) -> LanguageModel:
    """The same model and weights with torch.nn's layers (what a user has without fastseq)."""
    return fastseq.unpatch(copy.deepcopy(model))


class Replica:
    """One implementation's model, Adam and carried state."""

    def __init__(self, ctx: Context, model: LanguageModel, backend: Optional[str], dtype: torch.dtype):
        self.ctx, self.model, self.backend, self.dtype = ctx, model, backend, dtype
        self.params = list(model.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=LR)
        self.state = None

    def scope(self):
        return fastseq.backend(self.backend) if self.backend else contextlib.nullcontext()

    def loss(self, x: Tensor, y: Tensor, state) -> Tuple[Tensor, object]:
        with self.ctx.autocast(self.dtype):
            logits, state = self.model(x, state)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)), state

    def loss_and_grads(self, x: Tensor, y: Tensor) -> Tuple[Tensor, ...]:
        with self.scope():
            loss, _ = self.loss(x, y, None)
            return (loss,) + torch.autograd.grad(loss, self.params)

    def step(self, x: Tensor, y: Tensor) -> None:
        with self.scope():
            loss, state = self.loss(x, y, self.state)
            loss.backward()
        self.state = detach_state(state)
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def generate(self, tokens: Tensor, state, n: int, gens: List[torch.Generator]) -> None:
        with self.scope(), self.ctx.autocast(self.dtype):
            for _ in range(n):
                logits, state = self.model(tokens, state)
                tokens = draw(filter_logits(logits[:, -1], TEMPERATURE), gens)[:, None]


def run(ctx: Context) -> None:
    cfg = model_config(ctx)
    for dtype in ctx.dtypes:
        for B, T in train_grid(ctx):
            name = f"lm-train-B{B}-T{T}-{sizes(cfg)}"
            ctx.attempt(f"{SUITE} {name} {dtype_name(dtype)}", lambda: _train(ctx, cfg, B, T, dtype, name))
        for B, N in generate_grid(ctx):
            name = f"lm-generate-B{B}-N{N}-{sizes(cfg)}"
            ctx.attempt(f"{SUITE} {name} {dtype_name(dtype)}", lambda: _generate(ctx, cfg, B, N, dtype, name))


def _replicas(ctx: Context, initial: LanguageModel, dtype: torch.dtype) -> Dict[str, Replica]:
    out = {f"fastseq-{b}": Replica(ctx, copy.deepcopy(initial), b, dtype) for b in ctx.fastseq_backends(dtype)}
    out["torch.nn"] = Replica(ctx, torch_nn_copy(initial), None, dtype)
    return out


def _train(ctx: Context, cfg: LMConfig, B: int, T: int, dtype, name: str) -> None:
    dev = ctx.device
    torch.manual_seed(ctx.seed)
    initial = LanguageModel(cfg).to(dev).train()
    g = torch.Generator().manual_seed(ctx.seed + 1)
    sets = []
    for _ in range(SETS):
        ids = torch.randint(cfg.vocab_size, (B, T + 1), generator=g).to(dev)
        sets.append((ids[:, :-1], ids[:, 1:]))
    replicas = _replicas(ctx, initial, dtype)
    labels = ["loss"] + [f"grad {n}" for n, _ in initial.named_parameters()]
    base = replicas["torch.nn"].loss_and_grads(*sets[0])
    want = base if dtype == torch.float32 else \
        Replica(ctx, torch_nn_copy(initial), None, torch.float32).loss_and_grads(*sets[0])
    for impl, r in replicas.items():
        check_outputs(f"{name} {impl}", labels, r.loss_and_grads(*sets[0]), want, dtype, base)

    def timed(r: Replica) -> Callable[[], None]:
        nxt = rotating(sets)
        return lambda: r.step(*nxt())

    ctx.time(SUITE, name, dtype, {impl: timed(r) for impl, r in replicas.items()},
             floor_ms=floor(B, T, cfg, sum(p.numel() for p in initial.parameters()), dtype, ctx.ceilings),
             note=f"{B * T} tokens per call" + ("" if ctx.cuda else "; CPU: oneDNN/ATen for torch.nn"))


def _generate(ctx: Context, cfg: LMConfig, B: int, N: int, dtype, name: str) -> None:
    dev = ctx.device
    torch.manual_seed(ctx.seed)
    initial = LanguageModel(cfg).to(dev).eval()
    g = torch.Generator().manual_seed(ctx.seed + 2)
    prompt = torch.randint(cfg.vocab_size, (B, 16), generator=g).to(dev)
    replicas = _replicas(ctx, initial, dtype)
    for r in replicas.values():
        r.model.eval()
    with torch.no_grad():  # the prompt, then one step: logits against torch.nn in float32
        ref = replicas["torch.nn"]
        _, state = ref.model(prompt)
        want = ref.model(prompt[:, -1:], state)[0]
        for impl, r in replicas.items():
            with r.scope(), ctx.autocast(dtype):
                _, s = r.model(prompt)
                got = r.model(prompt[:, -1:], s)[0]
            check_outputs(f"{name} {impl}", ["logits"], (got.float(),), (want,), dtype, (want,))
            with r.scope():
                r.state = r.model(prompt)[1]

    def timed(r: Replica) -> Callable[[], None]:
        gens = [torch.Generator(device=dev).manual_seed(i) for i in range(B)]
        return lambda: r.generate(prompt[:, -1:], r.state, N, gens)

    ctx.time(SUITE, name, dtype, {impl: timed(r) for impl, r in replicas.items()},
             note=f"{B * N} tokens per call (B {B} x {N} steps), temperature {TEMPERATURE}")
