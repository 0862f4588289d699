"""Training the language model: its config, data and :class:`~fastseq.training.task.Task`.

The loop, faults, checkpoints, logs, DDP and exact resume are
:mod:`fastseq.training`'s; this module adds what is particular to language
modelling:

1. **Config** (:class:`LMTrainConfig`): the generic training fields, the corpus,
   vocabulary and truncated-BPTT fields, and the model's
   :class:`~fastseq.lm.model.LMArchitecture` nested as ``model``.
2. **Data** (:func:`prepare_text`): the corpus's documents (each followed by the
   end-of-sequence token but the last) split by characters: the first
   ``1 - val_fraction`` for training, the rest for validation (Tiny Shakespeare:
   1,003,854 / 111,540 characters, nanoGPT's ``shakespeare_char`` split), or a
   separate ``val_corpus``. The vocabulary is built from the training text only;
   validation units it has not seen count as ``<unk>``.
3. **Batches**: :class:`~fastseq.data.streams.StreamBatches`, ``batch_size``
   contiguous streams per process cut into ``bptt``-token chunks, a random start
   offset per epoch; the model's state is carried from chunk to chunk, detached,
   and reset when the streams restart. The carried state is part of ``last.pt``
   (exact resume).
4. **Loss**: mean cross-entropy over the chunk's tokens (nats per token).
5. **Validation**: the validation text as ``eval_streams`` contiguous streams, the
   state carried across all of it: ``val_loss`` (nats per token), ``val_bpc``
   (bits per character: the total nats / ln 2 / the characters the predicted
   tokens cover) and ``val_ppl`` (``exp(val_loss)``, per token).
6. **End**: a sample from ``best.pt`` (``sample_tokens`` tokens, temperature
   ``sample_temperature``, seed ``seed``) in ``sample.txt`` and ``metrics.json``.

Checkpoints (format ``fastseq.lm``) carry the model config and the vocabulary,
so ``fastseq generate`` needs nothing else.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastseq.data.streams import StreamBatches, StreamChunk
from fastseq.data.text import load_text
from fastseq.data.vocab import KINDS, Vocabulary, build_vocabulary
from fastseq.fileio import atomic_write
from fastseq.lm.generate import TextGenerator
from fastseq.lm.model import CHECKPOINT_FORMAT, LanguageModel, LMArchitecture, LMConfig, State, detach_state
from fastseq.training import trainer
from fastseq.training.config import TrainConfig
from fastseq.training.task import Runtime, Task

logger = logging.getLogger(__name__)


@dataclass
class LMTrainConfig(TrainConfig):
    """A language-model training run: :class:`~fastseq.training.config.TrainConfig`'s
    fields, these, and the model's :class:`~fastseq.lm.model.LMArchitecture` as the
    ``model`` section. A YAML config file holds these keys (and ``task: lm``)."""

    TASK: ClassVar[str] = "lm"

    out: str = "runs/shakespeare"
    # corpus
    corpus: str = "tinyshakespeare"   # 'tinyshakespeare' (embedded) or text file(s), comma-separated
    val_corpus: str = ""              # validation file(s); empty: the last val_fraction of corpus
    val_fraction: float = 0.1
    # vocabulary
    vocabulary: str = "char"          # char | word | subword (sentencepiece)
    vocab_size: int = 0               # word: most ids (0: all words); subword: required
    # batches (truncated BPTT)
    batch_size: int = 64              # contiguous streams per process
    bptt: int = 128                   # tokens per chunk (backpropagation length)
    # evaluation
    eval_streams: int = 64            # the validation text as this many contiguous streams
    sample_tokens: int = 500          # tokens of the sample written at the end (0: none)
    sample_temperature: float = 0.8
    # the model (fastseq.lm.model.LMArchitecture; the vocabulary size from the corpus)
    model: LMArchitecture = field(default_factory=LMArchitecture)

    def validate(self) -> None:
        super().validate()
        for key in ["batch_size", "bptt", "eval_streams"]:
            if getattr(self, key) <= 0:
                raise ValueError(f"config key {key!r}: expected > 0, got {getattr(self, key)}")
        for key in ["vocab_size", "sample_tokens"]:
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r}: expected >= 0, got {getattr(self, key)}")
        if self.vocabulary not in KINDS:
            raise ValueError(f"config key 'vocabulary': expected one of {KINDS}, got {self.vocabulary!r}")
        if self.vocabulary == "subword" and self.vocab_size == 0:
            raise ValueError("config key 'vocab_size': a subword vocabulary needs its size (> 0)")
        if not self.val_corpus and not 0 < self.val_fraction < 1:
            raise ValueError(f"config key 'val_fraction': expected a value in (0, 1), got {self.val_fraction}")
        if not self.sample_temperature > 0:
            raise ValueError(f"config key 'sample_temperature': expected > 0, got {self.sample_temperature}")


# --------------------------------------------------------------------------- data


@dataclass
class TextData:
    """The corpus prepared for training: vocabulary, token ids, validation characters."""

    vocabulary: Vocabulary
    train_ids: Tensor        # 1-D int64
    val_ids: Tensor          # 1-D int64 (may be empty)
    train_characters: int
    val_characters: int


def encode_documents(vocab: Vocabulary, documents: List[str]) -> Tensor:
    """The documents' ids, joined by the end-of-sequence id."""
    ids: List[int] = []
    for n, doc in enumerate(documents):
        if n:
            ids.append(vocab.eos_id)
        ids.extend(vocab.encode(doc))
    return torch.tensor(ids, dtype=torch.long)


def split_documents(documents: List[str], val_fraction: float) -> Tuple[List[str], List[str]]:
    """The first ``1 - val_fraction`` of the characters (over all documents, in order) and
    the rest; a document may be cut in two. The split point is
    ``int(characters * (1 - val_fraction))``."""
    total = sum(len(d) for d in documents)
    cut = int(total * (1 - val_fraction))
    train, val, seen = [], [], 0
    for doc in documents:
        if seen + len(doc) <= cut:
            train.append(doc)
        elif seen >= cut:
            val.append(doc)
        else:
            train.append(doc[: cut - seen])
            val.append(doc[cut - seen:])
        seen += len(doc)
    return train, val


def split_text(cfg: LMTrainConfig) -> Tuple[List[str], List[str]]:
    """The training and validation documents of ``cfg`` (see the module docstring).

    Raises:
        FileNotFoundError / ValueError: as :func:`fastseq.data.text.load_text`; an empty
            training or validation text.
    """
    corpus = load_text(cfg.corpus)
    if cfg.val_corpus:
        train_docs, val_docs = list(corpus.documents), list(load_text(cfg.val_corpus).documents)
    else:
        train_docs, val_docs = split_documents(list(corpus.documents), cfg.val_fraction)
    if not any(train_docs):
        raise ValueError(f"corpus {cfg.corpus!r}: no training text")
    if not any(val_docs):
        raise ValueError(f"corpus {cfg.corpus!r}: no validation text (val_fraction {cfg.val_fraction})")
    return train_docs, val_docs


def prepare_text(cfg: LMTrainConfig) -> TextData:
    """Read and split (:func:`split_text`), build the vocabulary (training text only), encode."""
    train_docs, val_docs = split_text(cfg)
    vocab = build_vocabulary(cfg.vocabulary, train_docs, cfg.vocab_size)
    return TextData(vocab, encode_documents(vocab, train_docs), encode_documents(vocab, val_docs),
                    sum(map(len, train_docs)), sum(map(len, val_docs)))


@torch.no_grad()
def stream_loss(model: LanguageModel, ids: Tensor, streams: int, bptt: int, device: torch.device,
                autocast=contextlib.nullcontext) -> Tuple[float, int]:
    """(total nats, predicted tokens) of ``model`` on ``ids`` read as ``streams`` contiguous
    streams (the last ``(len - 1) % streams`` tokens are not predicted), the state carried
    across each stream. ``model`` is left in the mode it came in."""
    streams = max(1, min(streams, (ids.numel() - 1)))
    length = (ids.numel() - 1) // streams
    if length <= 0:
        return 0.0, 0
    inputs = ids[: streams * length].view(streams, length)
    targets = ids[1: streams * length + 1].view(streams, length)
    was_training = model.training
    model.eval()
    total, state = 0.0, None
    for t in range(0, length, bptt):
        x = inputs[:, t: t + bptt].to(device)
        y = targets[:, t: t + bptt].to(device)
        with autocast():
            logits, state = model(x, state)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                        reduction="sum"))
    model.train(was_training)
    return total, streams * length


def text_metrics(model: LanguageModel, ids: Tensor, characters: int, streams: int, bptt: int,
                 device: torch.device, autocast=contextlib.nullcontext) -> Dict[str, float]:
    """``loss`` (nats per token), ``bpc`` (bits per character) and ``ppl`` (per token) of
    ``model`` on ``ids`` (:func:`stream_loss`), whose text has ``characters`` characters;
    NaN when no token is predicted. The characters the predicted tokens cover are
    ``predicted * characters / len(ids)``."""
    nats, n = stream_loss(model, ids, streams, bptt, device, autocast)
    if n == 0:
        return {"loss": math.nan, "bpc": math.nan, "ppl": math.nan}
    loss = nats / n
    covered = n * characters / ids.numel()
    return {"loss": loss, "bpc": nats / math.log(2) / covered, "ppl": math.exp(min(loss, 700.0))}


# --------------------------------------------------------------------------- the task


class LMTask(Task):
    """The language model's part of training (see the module docstring)."""

    checkpoint_format = CHECKPOINT_FORMAT
    metrics = {"val_loss": "min", "val_bpc": "min", "val_ppl": "min"}
    plot_metric = ("val_bpc", "validation bits per character")

    cfg: LMTrainConfig

    def setup(self, runtime: Runtime) -> None:
        super().setup(runtime)
        ctx = runtime.ctx
        if not ctx.is_main:  # rank 0 first: a subword vocabulary is trained once, then cached
            ctx.barrier()
        self.data = prepare_text(self.cfg)
        if ctx.is_main:
            ctx.barrier()
        self.state: Optional[State] = None
        d = self.data
        if ctx.is_main:
            logger.info("corpus %s: %d training / %d validation characters, %d / %d tokens, "
                        "%s vocabulary of %d", self.cfg.corpus, d.train_characters, d.val_characters,
                        d.train_ids.numel(), d.val_ids.numel(), d.vocabulary.kind, d.vocabulary.vocab_size)

    def train_batches(self) -> StreamBatches:
        cfg = self.cfg
        return StreamBatches(self.data.train_ids, cfg.batch_size, cfg.bptt,
                             world_size=self.runtime.ctx.world_size, seed=cfg.seed)

    def build_model(self) -> LanguageModel:
        self.model_config = LMConfig.of(self.cfg.model, self.data.vocabulary.vocab_size)
        return LanguageModel(self.model_config)

    def num_tokens(self, batch: StreamChunk) -> int:
        return batch.num_tokens

    def loss(self, model: nn.Module, batch: StreamChunk) -> Tuple[Tensor, int]:
        rt = self.runtime
        if batch.index == 0:  # the streams restart at a new offset
            self.state = None
        state = self.state
        if state is not None:
            state = tuple(s.to(rt.device) for s in state) if isinstance(state, tuple) else state.to(rt.device)
        x = batch.inputs.to(rt.device, non_blocking=True)
        y = batch.targets.to(rt.device, non_blocking=True)
        with rt.precision.autocast():
            logits, state = model(x, state)
        self.state = detach_state(state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        return loss, batch.num_tokens

    def train_state(self) -> Any:
        s = self.state
        if s is None:
            return None
        return tuple(t.cpu() for t in s) if isinstance(s, tuple) else s.cpu()

    def load_train_state(self, state: Any) -> None:
        self.state = state

    def validate(self, model: nn.Module) -> Dict[str, float]:
        cfg, rt, d = self.cfg, self.runtime, self.data
        m = text_metrics(model, d.val_ids, d.val_characters, cfg.eval_streams, cfg.bptt, rt.device,
                         rt.precision.autocast)
        return {"val_" + k: v for k, v in m.items()}

    def describe(self, metrics: Mapping[str, float]) -> str:
        return (f"val loss {metrics['val_loss']:.4f} nats/token, {metrics['val_bpc']:.4f} bits/char, "
                f"ppl {metrics['val_ppl']:.2f}")

    def checkpoint_extras(self) -> Dict[str, Any]:
        return {"model_config": self.model_config.to_dict(), "vocabulary": self.data.vocabulary.to_dict()}

    def finish(self, model: nn.Module, best: Mapping[str, Any]) -> Dict[str, Any]:
        cfg, d = self.cfg, self.data
        result: Dict[str, Any] = {
            **{k: best["metrics"].get(k, math.nan) for k in self.metrics},
            "vocabulary": d.vocabulary.kind, "vocab_size": d.vocabulary.vocab_size,
            "train_characters": d.train_characters, "val_characters": d.val_characters,
            "train_tokens": d.train_ids.numel(), "val_tokens": d.val_ids.numel(),
        }
        if cfg.sample_tokens:
            gen = TextGenerator(model, d.vocabulary)
            with self.runtime.precision.autocast():
                text = gen.generate("", max_new_tokens=cfg.sample_tokens,
                                    temperature=cfg.sample_temperature, seed=cfg.seed)[0]
            with atomic_write(self.runtime.out / "sample.txt") as f:
                f.write(text.encode("utf-8"))
            result["sample"] = text
        return result


def train(cfg: LMTrainConfig, resume: bool = False) -> Dict[str, Any]:
    """Train a language model on ``cfg.corpus`` and return the metrics
    (:func:`fastseq.training.trainer.train` with an :class:`LMTask`)."""
    return trainer.train(LMTask(cfg), resume=resume)


def evaluate(checkpoint, corpus: str = "", split: str = "val", device: str = "auto") -> Dict[str, Any]:
    """Loss, bits per character and perplexity of a language-model checkpoint.

    Args:
        corpus: text file(s) to evaluate whole (see :func:`fastseq.data.text.load_text`);
            empty: the ``split`` ("train" or "val") of the checkpoint's own corpus.

    Raises:
        FileNotFoundError / ValueError: no such checkpoint or corpus; a checkpoint of another
            model kind; an unknown ``split``.
    """
    from fastseq.training.checkpoint import load_checkpoint

    if split not in ("train", "val"):
        raise ValueError(f"split: a language model's splits are 'train' and 'val', got {split!r}")
    gen = TextGenerator.from_checkpoint(checkpoint, device=device)
    cfg = LMTrainConfig.from_dict(load_checkpoint(checkpoint, format=CHECKPOINT_FORMAT)["train_config"])
    if corpus:
        docs = list(load_text(corpus).documents)
    else:
        docs = split_text(cfg)[0 if split == "train" else 1]
    ids = encode_documents(gen.vocabulary, docs)
    characters = sum(map(len, docs))
    m = text_metrics(gen.model, ids, characters, cfg.eval_streams, cfg.bptt, gen.device)
    return {"corpus": corpus or cfg.corpus, "split": None if corpus else split, "tokens": ids.numel(),
            "characters": characters, "unknown_tokens": int((ids == gen.vocabulary.unk_id).sum()),
            **{k: round(v, 4) for k, v in m.items()}}
