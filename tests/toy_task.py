"""A second model for the shared trainer, written the way the RNN language model will be:
next-token prediction on B contiguous integer streams, truncated BPTT with the hidden
state carried from batch to batch (and saved for an exact resume), its own batches,
loss, validation (loss and perplexity) and final test. It imports nothing from
fastseq.seq2seq (nor fastseq.data): fastseq.training is all it needs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastseq.training.config import TrainConfig
from fastseq.training.task import Runtime, Task


@dataclass
class ToyModelConfig:
    """The toy model's ``model:`` section."""

    emb_size: int = 8
    hidden_size: int = 16
    dropout: float = 0.1

    def __post_init__(self):
        for name in ("emb_size", "hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")


@dataclass
class ToyConfig(TrainConfig):
    BEST_METRICS = ("val_loss", "val_ppl")

    out: str = "runs/toy"
    vocab: int = 11
    streams: int = 4                  # B contiguous streams
    bptt: int = 8                     # tokens per stream and batch
    train_tokens: int = 400
    model: ToyModelConfig = field(default_factory=ToyModelConfig)

    def validate(self) -> None:
        super().validate()
        for key in ("vocab", "streams", "bptt", "train_tokens"):
            if getattr(self, key) <= 0:
                raise ValueError(f"config key {key!r}: expected > 0, got {getattr(self, key)}")


def token_stream(n: int, vocab: int, seed: int) -> np.ndarray:
    """``x[t+1] = (3 x[t] + 1) mod vocab``, with one token in ten replaced at random."""
    rng = np.random.default_rng(seed)
    x = np.empty(n, dtype=np.int64)
    x[0] = rng.integers(vocab)
    for t in range(1, n):
        x[t] = rng.integers(vocab) if rng.random() < 0.1 else (3 * x[t - 1] + 1) % vocab
    return x


class StreamBatches:
    """Batch ``g`` of every epoch: columns ``[g*bptt, (g+1)*bptt)`` of the ``[B, L]`` streams
    (inputs) and the same shifted by one (targets), as ``(g, inputs, targets)``."""

    def __init__(self, tokens: np.ndarray, streams: int, bptt: int):
        length = len(tokens) // streams
        self.data = torch.from_numpy(tokens[: length * streams].reshape(streams, length))
        self.bptt = bptt
        self.num_batches = (length - 1) // bptt

    def iterate(self, epoch: int, start: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[Tuple[int, Tuple[int, Tensor, Tensor]]]:
        for g in range(start, self.num_batches):
            if g % world_size == rank:
                s = g * self.bptt
                yield g, (g, self.data[:, s:s + self.bptt], self.data[:, s + 1:s + self.bptt + 1])


class ToyLM(nn.Module):
    def __init__(self, vocab: int, cfg: ToyModelConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.emb_size)
        self.rnn = nn.GRU(cfg.emb_size, cfg.hidden_size, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_size, vocab)

    def forward(self, x: Tensor, hidden: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        y, hidden = self.rnn(self.dropout(self.embed(x)), hidden)
        return self.out(self.dropout(y)), hidden


class ToyTask(Task):
    checkpoint_format = "fastseq.toy"
    metrics = {"val_loss": "min", "val_ppl": "min"}
    plot_metric = ("val_ppl", "validation perplexity")

    cfg: ToyConfig

    def setup(self, runtime: Runtime) -> None:
        super().setup(runtime)
        cfg = self.cfg
        self.batches = StreamBatches(token_stream(cfg.train_tokens, cfg.vocab, cfg.seed), cfg.streams, cfg.bptt)
        self.val = StreamBatches(token_stream(200, cfg.vocab, cfg.seed + 1), cfg.streams, cfg.bptt)
        self.test = StreamBatches(token_stream(200, cfg.vocab, cfg.seed + 2), cfg.streams, cfg.bptt)
        self.hidden: Optional[Tensor] = None  # carried from batch to batch

    def train_batches(self) -> StreamBatches:
        return self.batches

    def build_model(self) -> nn.Module:
        return ToyLM(self.cfg.vocab, self.cfg.model)

    def num_tokens(self, batch) -> int:
        return batch[2].numel()

    def loss(self, model: nn.Module, batch) -> Tuple[Tensor, int]:
        g, x, y = batch
        if g == 0:
            self.hidden = None  # a new epoch starts the streams again
        x, y = x.to(self.runtime.device), y.to(self.runtime.device)
        with self.runtime.precision.autocast():
            logits, hidden = model(x, self.hidden)
        self.hidden = hidden.detach()  # truncated BPTT
        return F.cross_entropy(logits.reshape(-1, self.cfg.vocab).float(), y.reshape(-1)), y.numel()

    def train_state(self) -> Any:
        return {"hidden": None if self.hidden is None else self.hidden.cpu()}

    def load_train_state(self, state: Any) -> None:
        hidden = state["hidden"]
        self.hidden = None if hidden is None else hidden.to(self.runtime.device)

    @torch.no_grad()
    def _mean_loss(self, model: nn.Module, batches: StreamBatches) -> float:
        was_training = model.training
        model.eval()
        hidden, total, n = None, 0.0, 0
        for _, (_, x, y) in batches.iterate(0):
            logits, hidden = model(x.to(self.runtime.device), hidden)
            total += float(F.cross_entropy(logits.reshape(-1, self.cfg.vocab).float(), y.reshape(-1),
                                           reduction="sum"))
            n += y.numel()
        model.train(was_training)
        return total / n

    def validate(self, model: nn.Module) -> Dict[str, float]:
        loss = self._mean_loss(model, self.val)
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    def checkpoint_extras(self) -> Dict[str, Any]:
        return {"vocab": self.cfg.vocab, "model_config": asdict(self.cfg.model)}

    def finish(self, model: nn.Module, best: Mapping[str, Any]) -> Dict[str, Any]:
        loss = self._mean_loss(model, self.test)
        return {"test_loss": loss, "test_ppl": math.exp(loss)}
