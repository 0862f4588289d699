"""Training the attention seq2seq: its config, data preparation and :class:`~fastseq.training.task.Task`.

The loop, faults, checkpoints and logs are :mod:`fastseq.training`'s; this
module adds what is particular to translation:

1. **Config** (:class:`Seq2SeqConfig`): the generic training fields, the
   corpus, tokenizer, batching, loss and decoding fields, and the model's
   :class:`~fastseq.seq2seq.model.Architecture` nested as ``model``.
2. **Data** (:func:`prepare_data`): sentencepiece tokenizers trained on a
   bounded sample of the training split, then the split tokenised once into
   memory-mapped shards (:mod:`fastseq.data.shards`) under ``data_dir``; both
   are reused by later runs with the same settings. Batches are token-budget,
   length-bucketed :class:`~fastseq.data.batching.StreamingBatches`, read one
   shard at a time, so memory does not grow with the corpus.
3. **Loss**: teacher forcing, label-smoothed cross-entropy over the target
   tokens (:func:`~fastseq.seq2seq.model.masked_cross_entropy`).
4. **Validation**: cross-entropy (no smoothing) and greedy BLEU (sacreBLEU);
   ``best_metric`` is ``val_bleu`` (falling back to ``val_loss`` when BLEU is
   off) or ``val_loss``.
5. **Test**: beam search with ``best.pt`` on the test split; BLEU and chrF in
   ``metrics.json``, the translations in ``test.hyp``.

Checkpoints (format ``fastseq.seq2seq``) carry the model config and both
tokenizers, so ``fastseq translate`` needs nothing else.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

from fastseq.data.batching import Batch, PairDataset, StreamingBatches, TokenBatchSampler, collate, encode_pairs
from fastseq.data.corpus import load_corpus
from fastseq.data.lines import sample_pairs
from fastseq.data.prepared import is_prepared, require_files, write_settings
from fastseq.data.shards import ShardedCorpus, preprocess
from fastseq.data.tokenizer import MODEL_TYPES, Tokenizer, train_tokenizer
from fastseq.fileio import atomic_write
from fastseq.seq2seq.metrics import corpus_scores
from fastseq.seq2seq.model import CHECKPOINT_FORMAT, Architecture, ModelConfig, Seq2Seq, masked_cross_entropy
from fastseq.seq2seq.translate import Translator
from fastseq.training import trainer
from fastseq.training.config import TrainConfig
from fastseq.training.distributed import Context
from fastseq.training.task import Runtime, Task

logger = logging.getLogger(__name__)


@dataclass
class Seq2SeqConfig(TrainConfig):
    """A seq2seq training run: :class:`~fastseq.training.config.TrainConfig`'s
    fields, these, and the model's :class:`~fastseq.seq2seq.model.Architecture`
    as the ``model`` section. A YAML config file holds these keys."""

    BEST_METRICS: ClassVar[Tuple[str, ...]] = ("val_bleu", "val_loss")
    TASK: ClassVar[str] = "translation"

    out: str = "runs/multi30k"
    best_metric: str = "val_bleu"     # val_bleu (greedy) | val_loss
    # corpus
    corpus: str = "multi30k"          # 'multi30k' (embedded) or a directory of {split}.{lang}[.gz]
    src_lang: str = "de"
    tgt_lang: str = "en"
    # data
    data_dir: str = ""                # preprocessed shards + tokenizers (default {out}/data)
    shard_size: int = 100_000         # pairs per shard
    tokenizer_sample: int = 1_000_000  # training pairs sampled to train the tokenizers
    # tokenizer
    tokenizer: str = "unigram"        # sentencepiece model type: unigram | bpe
    src_vocab_size: int = 8000
    tgt_vocab_size: int = 6000
    # batches and loss
    max_tokens: int = 4096            # padded tokens per micro-batch (per process)
    max_len: int = 100                # drop training pairs longer than this (subword tokens)
    label_smoothing: float = 0.1
    # evaluation
    val_bleu: bool = True             # greedy-decode the validation set at each evaluation
    beam_size: int = 5
    length_penalty: float = 0.6
    eval_batch_size: int = 128
    # data subsets (0: all), for quick runs and tests
    train_limit: int = 0
    val_limit: int = 0
    test_limit: int = 0
    # the model (fastseq.seq2seq.model.Architecture; vocabulary sizes from the tokenizers)
    model: Architecture = field(default_factory=Architecture)

    def validate(self) -> None:
        super().validate()
        positive = ["src_vocab_size", "tgt_vocab_size", "max_tokens", "max_len", "beam_size",
                    "eval_batch_size", "shard_size", "tokenizer_sample"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"config key {key!r}: expected > 0, got {getattr(self, key)}")
        for key in ["train_limit", "val_limit", "test_limit"]:
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r}: expected >= 0, got {getattr(self, key)}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"config key 'label_smoothing': expected in [0, 1), got {self.label_smoothing}")
        if self.tokenizer not in MODEL_TYPES:
            raise ValueError(f"config key 'tokenizer': expected one of {MODEL_TYPES}, got {self.tokenizer!r}")

    def data_path(self) -> Path:
        """``data_dir``, or ``{out}/data`` when it is empty."""
        return Path(self.data_dir) if self.data_dir else Path(self.out) / "data"


# --------------------------------------------------------------------------- data


def _data_settings(cfg: Seq2SeqConfig, src_path: Path, tgt_path: Path) -> Dict[str, Any]:
    """What the preprocessed data depends on: reuse it only if these match."""
    return {
        "source_files": [str(src_path.resolve()), str(tgt_path.resolve())],
        "tokenizer": cfg.tokenizer, "src_vocab_size": cfg.src_vocab_size,
        "tgt_vocab_size": cfg.tgt_vocab_size, "tokenizer_sample": cfg.tokenizer_sample,
        "max_len": cfg.max_len, "train_limit": cfg.train_limit, "seed": cfg.seed,
    }


def prepare_data(cfg: Seq2SeqConfig, ctx: Context = Context()) -> Tuple[ShardedCorpus, Tokenizer, Tokenizer]:
    """Tokenizers and preprocessed shards of the training split, made once.

    ``{data_dir}/meta.json`` and the shards come from :func:`fastseq.data.shards.preprocess`;
    ``src.model``/``tgt.model`` (sentencepiece) and ``settings.json`` are
    written beside them. Rank 0 prepares; the other ranks wait and then read.

    Raises:
        ValueError: ``data_dir`` holds data prepared with other settings (the
            message lists them), or the corpus has no train split.
    """
    corpus = load_corpus(cfg.corpus, cfg.src_lang, cfg.tgt_lang)
    if "train" not in corpus.splits:
        raise ValueError(f"corpus {cfg.corpus!r}: no train split")
    src_path, tgt_path = corpus.splits["train"]
    data_dir = cfg.data_path()
    settings = _data_settings(cfg, src_path, tgt_path)
    if ctx.is_main and not is_prepared(data_dir, settings):
        t0 = time.time()
        pairs = sample_pairs(src_path, tgt_path, cfg.tokenizer_sample, cfg.train_limit, cfg.seed)
        src_tok = train_tokenizer([s for s, _ in pairs], cfg.src_vocab_size, cfg.tokenizer)
        tgt_tok = train_tokenizer([t for _, t in pairs], cfg.tgt_vocab_size, cfg.tokenizer)
        del pairs
        logger.info("tokenizers trained in %.1fs", time.time() - t0)
        preprocess(src_path, tgt_path, src_tok, tgt_tok, data_dir, max_len=cfg.max_len,
                   max_lines=cfg.train_limit or None, shard_size=cfg.shard_size,
                   progress=cfg.progress)
        for name, tok in (("src.model", src_tok), ("tgt.model", tgt_tok)):
            with atomic_write(data_dir / name) as f:
                f.write(tok.to_bytes())
        write_settings(data_dir, settings)
    ctx.barrier()
    shards = ShardedCorpus(data_dir)
    require_files(data_dir, ["src.model", "tgt.model"])
    src_tok = Tokenizer((data_dir / "src.model").read_bytes())
    tgt_tok = Tokenizer((data_dir / "tgt.model").read_bytes())
    shards.check_tokenizers(src_tok, tgt_tok)
    return shards, src_tok, tgt_tok


def _limit(pairs: List, n: int) -> List:
    return pairs[:n] if n else pairs


@torch.no_grad()
def validation_loss(model: Seq2Seq, loader, device: torch.device, autocast=contextlib.nullcontext) -> float:
    """Mean per-token cross-entropy (no label smoothing) over ``loader``."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        batch = batch.to(device)
        with autocast():
            logits = model(batch.src, batch.src_lengths, batch.tgt_in)
        loss, k = masked_cross_entropy(logits, batch.tgt_out)
        total += float(loss) * k
        n += k
    model.train(was_training)
    return total / max(n, 1)


# --------------------------------------------------------------------------- the task


class Seq2SeqTask(Task):
    """The seq2seq model's part of training (see the module docstring)."""

    checkpoint_format = CHECKPOINT_FORMAT
    metrics = {"val_loss": "min", "val_bleu": "max"}
    plot_metric = ("val_bleu", "validation BLEU (greedy, sacreBLEU)")

    cfg: Seq2SeqConfig

    def setup(self, runtime: Runtime) -> None:
        super().setup(runtime)
        cfg, ctx = self.cfg, runtime.ctx
        self.shards, self.src_tok, self.tgt_tok = prepare_data(cfg, ctx)
        meta = self.shards.meta
        if ctx.is_main and (meta["dropped_empty"] or meta["dropped_too_long"]):
            logger.warning("training data: %d pairs kept; dropped %d with an empty side and %d longer "
                           "than max_len=%d subword tokens", meta["num_pairs"], meta["dropped_empty"],
                           meta["dropped_too_long"], meta["max_len"])
        self.corpus = load_corpus(cfg.corpus, cfg.src_lang, cfg.tgt_lang)
        self.val_pairs = _limit(self.corpus.read("val"), cfg.val_limit) if "val" in self.corpus.splits else []
        val_set = PairDataset(encode_pairs(self.val_pairs, self.src_tok, self.tgt_tok))
        # Iterating a DataLoader draws its base seed from torch's generator: validation
        # takes one draw, as it always has (the dropout masks after it depend on it).
        self.val_loader = torch.utils.data.DataLoader(
            val_set, collate_fn=collate, batch_sampler=TokenBatchSampler(
                val_set.lengths(), max([cfg.max_tokens, *val_set.lengths()]), shuffle=False),
        ) if len(val_set) else None

    def train_batches(self) -> StreamingBatches:
        return StreamingBatches(self.shards, self.cfg.max_tokens, seed=self.cfg.seed)

    def build_model(self) -> Seq2Seq:
        self.model_config = ModelConfig.of(self.cfg.model, self.src_tok.vocab_size, self.tgt_tok.vocab_size)
        return Seq2Seq(self.model_config)

    def num_tokens(self, batch: Batch) -> int:
        return batch.num_tgt_tokens

    def loss(self, model: nn.Module, batch: Batch) -> Tuple[Tensor, int]:
        batch = batch.to(self.runtime.device, non_blocking=True)
        with self.runtime.precision.autocast():
            logits = model(batch.src, batch.src_lengths, batch.tgt_in)
        return masked_cross_entropy(logits, batch.tgt_out, self.cfg.label_smoothing)

    def validate(self, model: nn.Module) -> Dict[str, float]:
        cfg, rt = self.cfg, self.runtime
        val_loss = (validation_loss(model, self.val_loader, rt.device, rt.precision.autocast)
                    if self.val_loader is not None else float("nan"))
        val_bleu = -1.0  # not computed
        if self.val_pairs and cfg.val_bleu:
            translator = Translator(model, self.src_tok, self.tgt_tok)
            with rt.precision.autocast():
                hyps = translator.translate([s for s, _ in self.val_pairs], method="greedy",
                                            batch_size=cfg.eval_batch_size)
            val_bleu = corpus_scores(hyps, [t for _, t in self.val_pairs])["bleu"]
        return {"val_loss": val_loss, "val_bleu": val_bleu}

    def score(self, metrics: Mapping[str, float]) -> float:
        bleu = metrics["val_bleu"]
        return -bleu if self.cfg.best_metric == "val_bleu" and bleu >= 0 else metrics["val_loss"]

    def describe(self, metrics: Mapping[str, float]) -> str:
        return f"val loss {metrics['val_loss']:.3f}, val BLEU (greedy) {metrics['val_bleu']:.2f}"

    def checkpoint_extras(self) -> Dict[str, Any]:
        return {"model_config": self.model_config.to_dict(), "src_tokenizer": self.src_tok.to_bytes(),
                "tgt_tokenizer": self.tgt_tok.to_bytes()}

    def finish(self, model: nn.Module, best: Mapping[str, Any]) -> Dict[str, Any]:
        cfg, meta = self.cfg, self.shards.meta
        result: Dict[str, Any] = {
            "val_bleu": best["metrics"].get("val_bleu", -1.0), "train_pairs": self.shards.num_pairs,
            "dropped_empty": meta["dropped_empty"], "dropped_too_long": meta["dropped_too_long"],
        }
        if "test" in self.corpus.splits:
            test_pairs = _limit(self.corpus.read("test"), cfg.test_limit)
            translator = Translator(model, self.src_tok, self.tgt_tok)
            with self.runtime.precision.autocast():
                hyps = translator.translate([s for s, _ in test_pairs], method="beam",
                                            beam_size=cfg.beam_size, alpha=cfg.length_penalty,
                                            batch_size=cfg.eval_batch_size)
            scores = corpus_scores(hyps, [t for _, t in test_pairs])
            result.update(test_bleu=scores["bleu"], test_chrf=scores["chrf"])
            with atomic_write(self.runtime.out / "test.hyp") as f:
                f.write(("\n".join(hyps) + "\n").encode("utf-8"))
        return result


def train(cfg: Seq2SeqConfig, resume: bool = False) -> Dict[str, Any]:
    """Train a seq2seq model on ``cfg.corpus``, test it, and return the metrics
    (:func:`fastseq.training.trainer.train` with a :class:`Seq2SeqTask`)."""
    return trainer.train(Seq2SeqTask(cfg), resume=resume)
