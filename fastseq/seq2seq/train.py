"""Training: teacher forcing, masked label-smoothed cross-entropy, gradient
clipping, Adam with warm-up and decay, on one process or many (torchrun/DDP),
streaming token-budget batches from preprocessed shards, with exact resume.

One run, ``train(cfg)``:

1. **Data** (:func:`prepare_data`): sentencepiece tokenizers trained on a
   bounded sample of the training split, then the split tokenised once into
   memory-mapped shards (:mod:`fastseq.data.shards`) under ``data_dir``;
   both are reused by later runs with the same settings. Batches are read
   lazily, one shard at a time, so memory does not grow with the corpus.
2. **Updates**: each update sums the gradients of ``accum_steps`` micro-batches
   on each of ``world_size`` processes and normalises by the target tokens of
   the whole global batch, so the update is the same whatever the split
   between processes and accumulation (a 2-process run with ``accum_steps=1``
   equals a 1-process run with ``accum_steps=2``). Global batch ``g`` of an
   epoch goes to rank ``g % world_size``. bf16 autocast on GPUs (fp16 with a
   GradScaler when asked).
3. **Evaluation** (rank 0, every ``eval_every`` updates or once per epoch):
   validation loss and greedy BLEU; plateau decay of the learning rate;
   early stopping after ``patience`` evaluations without improvement.
4. **Checkpoints** (rank 0, atomic): ``checkpoints/step-N.pt`` at each
   evaluation, keeping the ``keep_checkpoints`` best; ``best.pt`` the best of
   them; ``last.pt`` (full training state: model, optimizer, scaler, schedule,
   every rank's RNG states, data position) at each evaluation and every
   ``save_every`` updates. ``train(cfg, resume=True)`` continues from
   ``last.pt`` on exactly the trajectory of an uninterrupted run.
5. **Logs**: ``train_log.csv`` / ``eval_log.csv`` (:mod:`.runlog`), a PNG of
   the curves, and ``metrics.json`` with the test BLEU of ``best.pt``.

Faults:

- **Non-finite loss or gradients**: detected before the optimizer step (the
  weights are never updated with NaN/Inf). ``nonfinite_loss: skip`` (default)
  drops that update with a warning and stops with :class:`TrainingError` after
  ``max_skipped_updates`` in a row; ``stop`` raises :class:`TrainingError` at
  once. fp16 overflow steps are the GradScaler's business and are not counted.
- **SIGINT / SIGTERM** (Ctrl-C, ``kill``, torchrun shutting down): the run
  finishes the current update, writes ``last.pt`` atomically and raises
  :class:`TrainingInterrupted`; ``fastseq train`` then exits with status
  128 + the signal number. A second signal interrupts at once (still safe:
  every write is atomic).
- **Checkpoints** are written atomically, with a digest
  (:mod:`.checkpoint`); the previous ``last.pt`` is kept as ``last.prev.pt``,
  and ``--resume`` falls back to it, with a warning, when ``last.pt`` is unreadable.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from tqdm.auto import tqdm

from fastseq.fileio import atomic_write, link_atomic, remove_stale_tmp
from fastseq.seq2seq import distributed
from fastseq.seq2seq.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fastseq.data.batching import (
    Batch, PairDataset, StreamingBatches, TokenBatchSampler, collate, encode_pairs,
)
from fastseq.data.corpus import load_corpus
from fastseq.data.lines import sample_pairs
from fastseq.data.shards import ShardedCorpus, preprocess
from fastseq.data.tokenizer import Tokenizer, train_tokenizer
from fastseq.seq2seq.metrics import corpus_scores
from fastseq.seq2seq.model import ModelConfig, Seq2Seq, masked_cross_entropy
from fastseq.seq2seq.runlog import EVAL_FIELDS, TRAIN_FIELDS, CsvLog, plot_curves
from fastseq.seq2seq.schedule import KINDS, LRSchedule
from fastseq.seq2seq.translate import Translator, pick_device

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BEST_METRICS = ("val_bleu", "val_loss")
NONFINITE_POLICIES = ("skip", "stop")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. non-finite losses); the message says why and
    which checkpoint holds the last good state."""


class TrainingInterrupted(Exception):
    """Raised by :func:`train` after SIGINT/SIGTERM, once ``last.pt`` is written.

    Attributes:
        signum: the signal number. step: the update ``last.pt`` holds. path: ``last.pt``.
    """

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; "
                         f"the training state is saved in {path} (continue with --resume)")


@dataclass
class TrainConfig:
    """Everything a training run needs; a YAML config file holds these keys."""

    corpus: str = "multi30k"          # 'multi30k' (embedded) or a directory of {split}.{lang}[.gz]
    src_lang: str = "de"
    tgt_lang: str = "en"
    out: str = "runs/multi30k"        # checkpoints, logs, metrics.json
    # data
    data_dir: str = ""                # preprocessed shards + tokenizers (default {out}/data)
    shard_size: int = 100_000         # pairs per shard
    tokenizer_sample: int = 1_000_000  # training pairs sampled to train the tokenizers
    # tokenizer
    tokenizer: str = "unigram"        # sentencepiece model type: unigram | bpe
    src_vocab_size: int = 8000
    tgt_vocab_size: int = 6000
    # model (see fastseq.seq2seq.model.ModelConfig)
    emb_size: int = 256
    enc_hidden_size: int = 512
    dec_hidden_size: int = 512
    attn_size: int = 512
    enc_layers: int = 1
    rnn_type: str = "gru"
    readout_size: int = 256
    dropout: float = 0.3
    # optimisation
    epochs: int = 10
    max_steps: int = 0                # stop after this many updates (0: no limit)
    max_minutes: float = 0.0          # stop training after this much wall time (0: no limit)
    max_tokens: int = 4096            # padded tokens per micro-batch (per process)
    accum_steps: int = 1              # micro-batches per update and process
    max_len: int = 100                # drop training pairs longer than this (subword tokens)
    precision: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    lr: float = 1e-3
    lr_schedule: str = "constant"     # after warm-up: constant | inverse_sqrt | linear | cosine
    min_lr_ratio: float = 0.0         # linear/cosine: final lr / lr
    warmup_steps: int = 200
    lr_decay: float = 0.5             # multiply lr when validation loss does not improve (1: off)
    clip_norm: float = 1.0
    label_smoothing: float = 0.1
    nonfinite_loss: str = "skip"      # non-finite loss/gradients: skip the update | stop
    max_skipped_updates: int = 10     # skip: stop after this many non-finite updates in a row
    # evaluation and checkpoints
    eval_every: int = 0               # evaluate + checkpoint every N updates (0: once per epoch)
    save_every: int = 0               # also write last.pt every N updates (0: only at evaluations)
    keep_checkpoints: int = 3         # step checkpoints kept: the best K by best_metric
    best_metric: str = "val_bleu"     # val_bleu (greedy) | val_loss
    patience: int = 0                 # early stopping: evaluations without improvement (0: off)
    val_bleu: bool = True             # greedy-decode the validation set at each evaluation
    beam_size: int = 5
    length_penalty: float = 0.6
    eval_batch_size: int = 128
    # data subsets (0: all), for quick runs and tests
    train_limit: int = 0
    val_limit: int = 0
    test_limit: int = 0
    # machine
    device: str = "auto"
    threads: int = 0                  # torch CPU threads per process (0: torch's default)
    seed: int = 1234
    progress: bool = True

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping (e.g. parsed YAML), checking keys and values.

        Raises:
            ValueError: an unknown key (the message lists the valid ones), or a
                value of the wrong type or range.
        """
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(names)}")
        kwargs = {}
        for key, value in values.items():
            kind = {"int": int, "float": float, "str": str, "bool": bool}[names[key].type]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"config key {key!r}: expected {kind.__name__}, got {value!r}")
            kwargs[key] = value
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError for values out of range, before any work starts."""
        positive = ["src_vocab_size", "tgt_vocab_size", "epochs", "max_tokens", "max_len",
                    "beam_size", "eval_batch_size", "accum_steps", "shard_size", "tokenizer_sample",
                    "keep_checkpoints", "max_skipped_updates"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"config key {key!r}: expected > 0, got {getattr(self, key)}")
        for key in ["max_steps", "warmup_steps", "train_limit", "val_limit", "test_limit", "threads",
                    "eval_every", "save_every", "patience"]:
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r}: expected >= 0, got {getattr(self, key)}")
        if self.max_minutes < 0:
            raise ValueError(f"config key 'max_minutes': expected >= 0, got {self.max_minutes}")
        if not self.lr > 0:
            raise ValueError(f"config key 'lr': expected > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"config key 'label_smoothing': expected in [0, 1), got {self.label_smoothing}")
        if not self.clip_norm > 0:
            raise ValueError(f"config key 'clip_norm': expected > 0, got {self.clip_norm}")
        choices = {"tokenizer": ("unigram", "bpe"), "precision": PRECISIONS, "lr_schedule": KINDS,
                   "best_metric": BEST_METRICS, "nonfinite_loss": NONFINITE_POLICIES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config key {key!r}: expected one of {allowed}, got {getattr(self, key)!r}")
        if self.lr_schedule in ("linear", "cosine") and not self.max_steps:
            raise ValueError(f"config key 'lr_schedule': {self.lr_schedule!r} decays to max_steps; set max_steps")
        LRSchedule(self.lr, self.lr_schedule, self.warmup_steps, self.max_steps, self.min_lr_ratio,
                   self.lr_decay)  # checks the schedule's values
        self.model_config(1, 1)  # checks the model fields

    def model_config(self, src_vocab: int, tgt_vocab: int) -> ModelConfig:
        return ModelConfig(
            src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab, emb_size=self.emb_size,
            enc_hidden_size=self.enc_hidden_size, dec_hidden_size=self.dec_hidden_size,
            attn_size=self.attn_size, enc_layers=self.enc_layers, rnn_type=self.rnn_type,
            readout_size=self.readout_size, dropout=self.dropout,
        )


# --------------------------------------------------------------------------- data


def _data_settings(cfg: TrainConfig, src_path: Path, tgt_path: Path) -> Dict[str, Any]:
    """What the preprocessed data depends on: reuse it only if these match."""
    return {
        "source_files": [str(src_path.resolve()), str(tgt_path.resolve())],
        "tokenizer": cfg.tokenizer, "src_vocab_size": cfg.src_vocab_size,
        "tgt_vocab_size": cfg.tgt_vocab_size, "tokenizer_sample": cfg.tokenizer_sample,
        "max_len": cfg.max_len, "train_limit": cfg.train_limit, "seed": cfg.seed,
    }


def prepare_data(cfg: TrainConfig, ctx: distributed.Context = distributed.Context()
                 ) -> Tuple[ShardedCorpus, Tokenizer, Tokenizer]:
    """Tokenizers and preprocessed shards of the training split, made once.

    ``{data_dir}/meta.json`` and the shards come from :func:`shards.preprocess`;
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
    data_dir = Path(cfg.data_dir) if cfg.data_dir else Path(cfg.out) / "data"
    settings = _data_settings(cfg, src_path, tgt_path)
    if ctx.is_main:
        if (data_dir / "meta.json").is_file():
            old = json.loads((data_dir / "settings.json").read_text()) if (data_dir / "settings.json").is_file() else {}
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            if changed:
                raise ValueError(
                    f"data_dir {data_dir} was prepared with other settings ({', '.join(changed)}); "
                    "delete it or choose another data_dir"
                )
        else:
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
            with atomic_write(data_dir / "settings.json") as f:
                f.write(json.dumps(settings, indent=2).encode("utf-8"))
    ctx.barrier()
    shards = ShardedCorpus(data_dir)
    missing = [n for n in ("src.model", "tgt.model", "settings.json") if not (data_dir / n).is_file()]
    if missing:
        raise ValueError(f"data_dir {data_dir}: {', '.join(missing)} missing (interrupted preparation?); "
                         "delete the directory and run again")
    src_tok = Tokenizer((data_dir / "src.model").read_bytes())
    tgt_tok = Tokenizer((data_dir / "tgt.model").read_bytes())
    shards.check_tokenizers(src_tok, tgt_tok)
    return shards, src_tok, tgt_tok


# --------------------------------------------------------------------------- helpers


def _limit(pairs: List, n: int) -> List:
    return pairs[:n] if n else pairs


def _autocast(cfg: TrainConfig, device: torch.device):
    """(autocast context factory, GradScaler) for ``cfg.precision`` on ``device``.

    Raises:
        ValueError: fp16 (or bf16 where unsupported) requested on a device without it.
    """
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device (training on {device}); use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision 'bf16': this CUDA device does not support bfloat16; use fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    return autocast, scaler, precision


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


@dataclass
class TrainState:
    """Where a run is; saved in ``last.pt`` and restored by ``--resume``."""

    step: int = 0                 # updates done
    epoch: int = 0                # current epoch (0-based)
    batches_done: int = 0         # global batches of the current epoch already consumed
    tokens: int = 0               # target tokens trained on (all processes)
    train_time: float = 0.0       # seconds spent in updates
    elapsed: float = 0.0          # wall seconds of the run before this process started
    best: float = math.inf        # best value of the (minimised) best metric
    best_step: int = -1
    bad_evals: int = 0            # evaluations since the last improvement
    best_val_loss: float = math.inf
    kept: List[List[float]] = field(default_factory=list)  # [score, step] of kept step checkpoints
    history: List[Dict[str, float]] = field(default_factory=list)  # evaluation records
    stopped_early: bool = False
    skipped_updates: int = 0      # updates dropped for a non-finite loss or gradient
    skipped_in_a_row: int = 0


def _load_resume_state(out: Path) -> Dict[str, Any]:
    """The checkpoint ``--resume`` continues from: ``last.pt``, or ``last.prev.pt``
    (with a warning) when ``last.pt`` is missing or unreadable.

    Raises:
        FileNotFoundError: neither file exists.
        ValueError: neither is a readable checkpoint with training state (the
            message gives each file's error).
    """
    errors = []
    for name in ("last.pt", "last.prev.pt"):
        path = out / name
        if not path.is_file():
            errors.append(f"{path}: no such file")
            continue
        try:
            ckpt = load_checkpoint(path)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if ckpt.get("state") is None:
            errors.append(f"{path} holds no training state")
            continue
        if errors:
            logger.warning("--resume: %s; resuming from %s (step %d) instead", "; ".join(errors),
                           path, ckpt["step"])
        return ckpt
    if all(e.endswith("no such file") for e in errors):
        raise FileNotFoundError(f"--resume: no checkpoint at {out / 'last.pt'}")
    raise ValueError("--resume: no usable checkpoint: " + "; ".join(errors))


def _group(it: Iterator[Tuple[int, Batch]], n: int) -> Iterator[List[Batch]]:
    """Consecutive groups of ``n`` batches (an incomplete last group is dropped)."""
    group: List[Batch] = []
    for _, batch in it:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


# --------------------------------------------------------------------------- training


def train(cfg: TrainConfig, resume: bool = False) -> Dict[str, Any]:
    """Train on ``cfg.corpus``, evaluate on its test split, and return the metrics.

    Under torchrun, every process calls this; rank 0 writes everything and
    returns the metrics (the others return ``{}``).

    Args:
        resume: continue from ``{out}/last.pt`` (model, optimizer, scaler,
            schedule, RNG states, data position); the losses then continue
            exactly as in an uninterrupted run with the same world size.

    Raises:
        FileNotFoundError: ``resume`` but no ``last.pt`` in ``out``.
        ValueError: bad config values, or data that does not fit them.
    """
    cfg.validate()
    device = pick_device(cfg.device)
    ctx = distributed.setup(device)
    try:
        return _Trainer(cfg, ctx, resume).run()
    finally:
        distributed.teardown(ctx)


class _Trainer:
    def __init__(self, cfg: TrainConfig, ctx: distributed.Context, resume: bool):
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.out = Path(cfg.out)
        self.t_process = time.time()
        self.autocast, self.scaler, self.precision = _autocast(cfg, self.device)  # checks first
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        resume_ckpt = _load_resume_state(self.out) if resume else None
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in (self.out, self.out / "checkpoints"):  # left by a killed writer
                remove_stale_tmp(stale)
        self.shards, self.src_tok, self.tgt_tok = prepare_data(cfg, ctx)
        meta = self.shards.meta
        if ctx.is_main and (meta["dropped_empty"] or meta["dropped_too_long"]):
            logger.warning("training data: %d pairs kept; dropped %d with an empty side and %d longer "
                           "than max_len=%d subword tokens", meta["num_pairs"], meta["dropped_empty"],
                           meta["dropped_too_long"], meta["max_len"])
        self.batches = StreamingBatches(self.shards, cfg.max_tokens, seed=cfg.seed)
        self.per_update = ctx.world_size * cfg.accum_steps
        self.updates_per_epoch = self.batches.num_batches // self.per_update
        if self.updates_per_epoch == 0:
            raise ValueError(
                f"the training data makes {self.batches.num_batches} batches of max_tokens={cfg.max_tokens}, "
                f"fewer than one update needs (world_size {ctx.world_size} x accum_steps {cfg.accum_steps})"
            )

        corpus = load_corpus(cfg.corpus, cfg.src_lang, cfg.tgt_lang)
        self.corpus = corpus
        self.val_pairs = _limit(corpus.read("val"), cfg.val_limit) if "val" in corpus.splits else []
        val_set = PairDataset(encode_pairs(self.val_pairs, self.src_tok, self.tgt_tok))
        self.val_loader = torch.utils.data.DataLoader(
            val_set, collate_fn=collate, batch_sampler=TokenBatchSampler(
                val_set.lengths(), max([cfg.max_tokens, *val_set.lengths()]), shuffle=False),
        ) if len(val_set) else None

        self.model_cfg = cfg.model_config(self.src_tok.vocab_size, self.tgt_tok.vocab_size)
        self.model = Seq2Seq(self.model_cfg).to(self.device)
        if ctx.rank:  # distinct dropout masks per process; the weights are already equal
            torch.manual_seed(cfg.seed + ctx.rank)
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
        ) if ctx.distributed else None
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.schedule = LRSchedule(cfg.lr, cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps,
                                   cfg.min_lr_ratio, cfg.lr_decay)
        self.translator = Translator(self.model, self.src_tok, self.tgt_tok)
        self.state = TrainState()
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        if ctx.is_main:
            resume_step = self.state.step if resume_ckpt is not None else None
            self.train_log = CsvLog(self.out / "train_log.csv", TRAIN_FIELDS, resume_step)
            self.eval_log = CsvLog(self.out / "eval_log.csv", EVAL_FIELDS, resume_step)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.n_params = n_params
        logger.info("model: %s, %.1fM parameters, device %s, %d process(es), precision %s, "
                    "%d updates per epoch", self.model_cfg, n_params / 1e6, self.device,
                    ctx.world_size, self.precision, self.updates_per_epoch)

    # ----------------------------------------------------------------- state

    def _payload(self, full: bool) -> Dict[str, Any]:
        payload = {
            "model_config": self.model_cfg.to_dict(), "train_config": asdict(self.cfg),
            "model": self.model.state_dict(), "src_tokenizer": self.src_tok.to_bytes(),
            "tgt_tokenizer": self.tgt_tok.to_bytes(), "step": self.state.step,
            "epoch": self.state.epoch, "metrics": self.state.history[-1] if self.state.history else {},
        }
        if full:
            payload.update(
                optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                schedule=self.schedule.state_dict(), state=asdict(self.state),
                world_size=self.ctx.world_size, accum_steps=self.cfg.accum_steps,
                elapsed=self._elapsed(),
            )
        return payload

    def _restore(self, ckpt: Dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.state = TrainState(**ckpt["state"])
        self.state.elapsed = float(ckpt["elapsed"])
        rngs = ckpt["rng"]
        if ckpt["world_size"] == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank])
        else:
            logger.warning("resuming %d process(es) from a %d-process checkpoint: dropout masks "
                           "will differ from the original run", self.ctx.world_size, ckpt["world_size"])
        logger.info("resumed from step %d (epoch %d, %d batches into it)", self.state.step,
                    self.state.epoch + 1, self.state.batches_done)

    def _epochs_done(self) -> float:
        """Epochs trained so far, fractional inside an epoch."""
        st = self.state
        return st.epoch + st.batches_done / (self.updates_per_epoch * self.per_update)

    def _elapsed(self) -> float:
        return self.state.elapsed + time.time() - self.t_process

    def _save_last(self) -> None:
        rngs = self.ctx.gather(rng_state())  # collective: every rank calls it
        if self.ctx.is_main:
            save_checkpoint(self.out / "last.pt", {**self._payload(full=True), "rng": rngs},
                            keep_previous=self.out / "last.prev.pt")

    # ----------------------------------------------------------------- loop

    def run(self) -> Dict[str, Any]:
        cfg, st = self.cfg, self.state
        with self._signals():
            stop = st.stopped_early or self._budget_spent()
            while st.epoch < cfg.epochs and not stop:
                stop = self._epoch()
                if self._interrupted:
                    break
                if st.batches_done >= self.updates_per_epoch * self.per_update:  # epoch complete
                    st.epoch += 1
                    st.batches_done = 0
                    if not cfg.eval_every:
                        stop = self._evaluate() or stop
            if not self._interrupted and self.ctx.any(bool(self._signal)):  # during an evaluation
                self._interrupted = self._signal or int(signal.SIGTERM)
            if self._interrupted:
                self._save_last()  # collective: every rank learnt of the signal together
                if self.ctx.is_main:
                    for log in (self.train_log, self.eval_log):
                        log.close()
                raise TrainingInterrupted(self._interrupted, st.step, self.out / "last.pt")
            if st.history == [] or st.history[-1]["step"] != st.step:
                self._evaluate()  # the final state is always evaluated and checkpointed
        self.ctx.barrier()
        return self._finish() if self.ctx.is_main else {}

    @contextlib.contextmanager
    def _signals(self):
        """While training: SIGINT/SIGTERM set ``_signal``; the loop then saves and stops.
        A second signal gets the previous handler (Ctrl-C twice interrupts at once)."""
        self._signal = 0
        self._interrupted = 0
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            self._signal = signum
            for s, h in previous.items():
                signal.signal(s, h)
            logger.warning("%s received: saving last.pt after this update, then stopping "
                           "(send it again to stop at once)", signal.Signals(signum).name)

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _epoch(self) -> bool:
        """Updates until the end of the epoch; True if training must stop."""
        cfg, ctx, st = self.cfg, self.ctx, self.state
        remaining = self.updates_per_epoch - st.batches_done // self.per_update
        it = self.batches.iterate(st.epoch, start=st.batches_done, rank=ctx.rank, world_size=ctx.world_size)
        bar = tqdm(total=self.updates_per_epoch, initial=self.updates_per_epoch - remaining,
                   desc=f"epoch {st.epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and ctx.is_main),
                   dynamic_ncols=True, leave=False)
        self.model.train()
        try:
            for micro in _group(it, cfg.accum_steps):
                if remaining == 0:
                    break
                loss, tokens, lr, dt = self._update(micro)
                remaining -= 1
                st.batches_done += self.per_update
                st.train_time += dt
                bar.update()
                updated = math.isfinite(loss)  # False: skipped for a non-finite loss
                if updated:
                    st.step += 1
                    st.tokens += tokens
                    if ctx.is_main:
                        self.train_log.write(step=st.step, epoch=self._epochs_done(), loss=loss, lr=lr,
                                             tokens=tokens, tokens_per_s=tokens / max(dt, 1e-9),
                                             elapsed_s=self._elapsed())
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{st.tokens / max(st.train_time, 1e-9):.0f}",
                                        lr=f"{lr:.2e}", refresh=False)
                # One collective per update: budget spent, or a signal received, on any rank.
                budget, signalled = ctx.all_reduce_sum([float(self._budget_spent()), float(self._signal)])
                if signalled:
                    self._interrupted = self._signal or int(signal.SIGTERM)  # maybe another rank's
                    return True
                if not updated:
                    continue
                stop = budget > 0
                if cfg.eval_every and st.step % cfg.eval_every == 0:
                    stop = self._evaluate() or stop
                elif cfg.save_every and st.step % cfg.save_every == 0:
                    self._save_last()
                if stop:
                    return True
        finally:
            bar.close()
        return False

    def _update(self, micro: List[Batch]) -> Tuple[float, int, float, float]:
        """One optimizer update over this process's micro-batches.

        Returns (mean training loss of the global batch, its target tokens, lr, seconds)."""
        cfg, ctx = self.cfg, self.ctx
        t0 = time.time()
        lr = self.schedule(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n_local = sum(b.num_tgt_tokens for b in micro)
        (n_global,) = ctx.all_reduce_sum([float(n_local)])
        net = self.ddp if self.ddp is not None else self.model
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            batch = batch.to(self.device, non_blocking=True)
            last = i == len(micro) - 1
            with (net.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()):
                with self.autocast():
                    logits = net(batch.src, batch.src_lengths, batch.tgt_in)
                loss, n_tok = masked_cross_entropy(logits, batch.tgt_out, cfg.label_smoothing)
                # Sum over this micro-batch's tokens / tokens of the global batch; DDP
                # averages over processes, hence * world_size.
                self.scaler.scale(loss * (n_tok * ctx.world_size / n_global)).backward()
            loss_sum += float(loss.detach()) * n_tok
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm))
        # Gradients are already averaged over processes, and the loss sum is reduced
        # here, so every rank takes the same decision below.
        (loss_total,) = ctx.all_reduce_sum([loss_sum])
        loss_mean = loss_total / n_global
        # Under fp16, an overflowing gradient with a finite loss is the GradScaler's
        # normal business: its step() skips the update and lowers the scale.
        scaler_overflow = self.scaler.is_enabled() and math.isfinite(loss_mean)
        if math.isfinite(loss_mean) and (math.isfinite(grad_norm) or scaler_overflow):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped_in_a_row = 0
            return loss_mean, int(n_global), lr, time.time() - t0
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()
        self._nonfinite(loss_mean, grad_norm)
        return float("nan"), int(n_global), lr, time.time() - t0

    def _nonfinite(self, loss: float, grad_norm: float) -> None:
        """Count a dropped update; raise TrainingError when the policy says stop."""
        cfg, st = self.cfg, self.state
        st.skipped_updates += 1
        st.skipped_in_a_row += 1
        what = (f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} (loss {loss}, "
                f"gradient norm {grad_norm}) at update {st.step + 1} (epoch {st.epoch + 1}, global "
                f"batches {st.batches_done}-{st.batches_done + self.per_update - 1})")
        last = self.out / "last.pt"
        saved = f"{last} holds the last saved state" if last.is_file() else "no checkpoint was saved yet"
        advice = ("lower lr, raise warmup_steps, lower clip_norm, or train in fp32/bf16 "
                  "instead of fp16")
        if cfg.nonfinite_loss == "stop":
            raise TrainingError(f"{what}; the weights were not updated; stopping (nonfinite_loss: stop). "
                                f"{saved}. Try: {advice}, or nonfinite_loss: skip")
        if st.skipped_in_a_row >= cfg.max_skipped_updates:
            raise TrainingError(f"{what}: {st.skipped_in_a_row} non-finite updates in a row "
                                f"(max_skipped_updates={cfg.max_skipped_updates}); stopping. {saved}. "
                                f"Try: {advice}")
        logger.warning("%s: update skipped (%d in a row, %d in all)", what, st.skipped_in_a_row,
                       st.skipped_updates)

    def _budget_spent(self) -> bool:
        cfg = self.cfg
        if cfg.max_steps and self.state.step >= cfg.max_steps:
            return True
        return bool(cfg.max_minutes) and self._elapsed() >= 60.0 * cfg.max_minutes

    # ----------------------------------------------------------------- evaluation

    def _evaluate(self) -> bool:
        """Validate (rank 0), update the schedule and checkpoints; True to stop early."""
        cfg, st = self.cfg, self.state
        decision = None
        if self.ctx.is_main:
            decision = self._validate_and_save()
        stop, plateau, record = self.ctx.broadcast(decision)
        if plateau:
            self.schedule.plateau()
        if not self.ctx.is_main:
            st.history.append(record)
        st.stopped_early = stop
        self._save_last()
        return stop

    def _validate_and_save(self) -> Tuple[bool, bool, Dict[str, float]]:
        cfg, st = self.cfg, self.state
        t0 = time.time()
        val_loss = (validation_loss(self.model, self.val_loader, self.device, self.autocast)
                    if self.val_loader is not None else float("nan"))
        val_bleu = -1.0
        if self.val_pairs and cfg.val_bleu:
            with self.autocast():
                hyps = self.translator.translate([s for s, _ in self.val_pairs], method="greedy",
                                                 batch_size=cfg.eval_batch_size)
            val_bleu = corpus_scores(hyps, [t for _, t in self.val_pairs])["bleu"]
        plateau = False
        if val_loss < st.best_val_loss:
            st.best_val_loss = val_loss
        elif not math.isnan(val_loss):
            plateau = True
        score = -val_bleu if cfg.best_metric == "val_bleu" and val_bleu >= 0 else val_loss
        if math.isnan(score):
            score = -float(st.step)  # nothing to validate on: the latest is the best
        improved = score < st.best
        if improved:
            st.best, st.best_step, st.bad_evals = score, st.step, 0
        else:
            st.bad_evals += 1
        stop = bool(cfg.patience) and st.bad_evals >= cfg.patience
        lr = self.schedule(st.step) * (cfg.lr_decay if plateau else 1.0)
        record = {"epoch": self._epochs_done(), "step": st.step, "val_loss": val_loss,
                  "val_bleu": val_bleu, "lr": lr, "elapsed_s": self._elapsed()}
        st.history.append(record)
        self.eval_log.write(step=st.step, epoch=record["epoch"], val_loss=val_loss, val_bleu=val_bleu,
                            lr=lr, elapsed_s=record["elapsed_s"])
        self._keep(score)
        msg = (f"step {st.step}: val loss {val_loss:.3f}, val BLEU (greedy) {val_bleu:.2f}, "
               f"{st.tokens / max(st.train_time, 1e-9):.0f} tok/s, {self._elapsed():.0f}s "
               f"(eval {time.time() - t0:.0f}s)" + (", early stop" if stop else ""))
        tqdm.write(msg) if cfg.progress else logger.info("%s", msg)
        return stop, plateau, record

    def _keep(self, score: float) -> None:
        """Write checkpoints/step-N.pt; keep the best K; point best.pt at the best."""
        st, ckdir = self.state, self.out / "checkpoints"
        path = ckdir / f"step-{st.step:08d}.pt"
        save_checkpoint(path, self._payload(full=False))
        st.kept = sorted([k for k in st.kept if k[1] != st.step] + [[score, st.step]])
        for _, step in st.kept[self.cfg.keep_checkpoints:]:
            (ckdir / f"step-{int(step):08d}.pt").unlink(missing_ok=True)
        st.kept = st.kept[: self.cfg.keep_checkpoints]
        best_step = int(st.kept[0][1])
        link_atomic(ckdir / f"step-{best_step:08d}.pt", self.out / "best.pt")

    # ----------------------------------------------------------------- end

    def _finish(self) -> Dict[str, Any]:
        cfg, st = self.cfg, self.state
        for log in (self.train_log, self.eval_log):
            log.close()
        curves = plot_curves(self.out)
        best = load_checkpoint(self.out / "best.pt")
        self.model.load_state_dict(best["model"])
        result: Dict[str, Any] = {
            "steps": st.step, "epochs": round(self._epochs_done(), 2), "train_time_s": st.train_time,
            "wall_time_s": self._elapsed(), "tokens_per_s": st.tokens / max(st.train_time, 1e-9),
            "best_step": best["step"], "best_epoch": best["epoch"],
            "val_bleu": best["metrics"].get("val_bleu", -1.0), "device": str(self.device),
            "world_size": self.ctx.world_size, "precision": self.precision, "parameters": self.n_params,
            "train_pairs": self.shards.num_pairs, "stopped_early": st.stopped_early,
            "skipped_updates": st.skipped_updates,
            "dropped_empty": self.shards.meta["dropped_empty"],
            "dropped_too_long": self.shards.meta["dropped_too_long"],
            "history": st.history, "curves": str(curves),
        }
        if "test" in self.corpus.splits:
            test_pairs = _limit(self.corpus.read("test"), cfg.test_limit)
            with self.autocast():
                hyps = self.translator.translate([s for s, _ in test_pairs], method="beam",
                                                 beam_size=cfg.beam_size, alpha=cfg.length_penalty,
                                                 batch_size=cfg.eval_batch_size)
            scores = corpus_scores(hyps, [t for _, t in test_pairs])
            result.update(test_bleu=scores["bleu"], test_chrf=scores["chrf"])
            with atomic_write(self.out / "test.hyp") as f:
                f.write(("\n".join(hyps) + "\n").encode("utf-8"))
        with atomic_write(self.out / "metrics.json") as f:
            f.write(json.dumps({"config": asdict(cfg), **result}, indent=2).encode("utf-8"))
        return result
