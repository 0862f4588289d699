"""Training loop: teacher forcing, masked label-smoothed cross-entropy, gradient
clipping, Adam with warm-up and plateau decay, validation BLEU every epoch, and
atomic checkpoints (``last.pt`` every epoch, ``best.pt`` on the best validation BLEU).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping

import torch
from tqdm.auto import tqdm

from fastseq._io import atomic_write
from fastseq.seq2seq.checkpoint import load_checkpoint, save_checkpoint
from fastseq.seq2seq.data import (
    PairDataset, TokenBatchSampler, collate, encode_pairs, load_corpus, train_tokenizer,
)
from fastseq.seq2seq.metrics import corpus_scores
from fastseq.seq2seq.model import ModelConfig, Seq2Seq, masked_cross_entropy
from fastseq.seq2seq.translate import Translator, pick_device

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a training run needs; a YAML config file holds these keys."""

    corpus: str = "multi30k"          # 'multi30k' (embedded) or a directory of {split}.{lang}[.gz]
    src_lang: str = "de"
    tgt_lang: str = "en"
    out: str = "runs/multi30k"        # checkpoints, metrics.json
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
    max_tokens: int = 4096            # padded tokens per batch
    max_len: int = 100                # drop training pairs longer than this (subword tokens)
    lr: float = 1e-3
    warmup_steps: int = 200
    lr_decay: float = 0.5             # multiply lr when validation loss does not improve
    clip_norm: float = 1.0
    label_smoothing: float = 0.1
    # evaluation
    beam_size: int = 5
    length_penalty: float = 0.6
    eval_batch_size: int = 128
    # data subsets (0: all), for quick runs and tests
    train_limit: int = 0
    val_limit: int = 0
    test_limit: int = 0
    # machine
    device: str = "auto"
    threads: int = 0                  # torch CPU threads (0: torch's default)
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
                    "beam_size", "eval_batch_size"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"config key {key!r}: expected > 0, got {getattr(self, key)}")
        for key in ["max_steps", "warmup_steps", "train_limit", "val_limit", "test_limit", "threads"]:
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r}: expected >= 0, got {getattr(self, key)}")
        if self.max_minutes < 0:
            raise ValueError(f"config key 'max_minutes': expected >= 0, got {self.max_minutes}")
        if not self.lr > 0:
            raise ValueError(f"config key 'lr': expected > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"config key 'label_smoothing': expected in [0, 1), got {self.label_smoothing}")
        if self.tokenizer not in ("unigram", "bpe"):
            raise ValueError(f"config key 'tokenizer': expected 'unigram' or 'bpe', got {self.tokenizer!r}")
        self.model_config(1, 1)  # checks the model fields

    def model_config(self, src_vocab: int, tgt_vocab: int) -> ModelConfig:
        return ModelConfig(
            src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab, emb_size=self.emb_size,
            enc_hidden_size=self.enc_hidden_size, dec_hidden_size=self.dec_hidden_size,
            attn_size=self.attn_size, enc_layers=self.enc_layers, rnn_type=self.rnn_type,
            readout_size=self.readout_size, dropout=self.dropout,
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _budget_spent(cfg: TrainConfig, step: int, t_start: float) -> bool:
    """True once max_steps updates or max_minutes of wall time are used up."""
    if cfg.max_steps and step >= cfg.max_steps:
        return True
    return bool(cfg.max_minutes) and time.time() - t_start >= 60.0 * cfg.max_minutes


def _limit(pairs: List, n: int) -> List:
    return pairs[:n] if n else pairs


@torch.no_grad()
def validation_loss(model: Seq2Seq, loader, device: torch.device) -> float:
    """Mean per-token cross-entropy (no label smoothing) over ``loader``."""
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        batch = batch.to(device)
        logits = model(batch.src, batch.src_lengths, batch.tgt_in)
        loss, k = masked_cross_entropy(logits, batch.tgt_out)
        total += float(loss) * k
        n += k
    model.train()
    return total / max(n, 1)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train on ``cfg.corpus``, evaluate on its test split, and return the metrics.

    Writes ``{out}/last.pt``, ``{out}/best.pt`` and ``{out}/metrics.json``.
    """
    cfg.validate()
    _seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = load_corpus(cfg.corpus, cfg.src_lang, cfg.tgt_lang)
    train_pairs = _limit(corpus.read("train"), cfg.train_limit)
    src_tok = train_tokenizer([s for s, _ in train_pairs], cfg.src_vocab_size, cfg.tokenizer)
    tgt_tok = train_tokenizer([t for _, t in train_pairs], cfg.tgt_vocab_size, cfg.tokenizer)
    train_set = PairDataset(encode_pairs(train_pairs, src_tok, tgt_tok, max_len=cfg.max_len))
    sampler = TokenBatchSampler(train_set.lengths(), cfg.max_tokens, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate)
    val_pairs = _limit(corpus.read("val"), cfg.val_limit) if "val" in corpus.splits else []
    val_set = PairDataset(encode_pairs(val_pairs, src_tok, tgt_tok))
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_sampler=TokenBatchSampler(val_set.lengths(), cfg.max_tokens, shuffle=False),
        collate_fn=collate,
    )

    model_cfg = cfg.model_config(src_tok.vocab_size, tgt_tok.vocab_size)
    model = Seq2Seq(model_cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    translator = Translator(model, src_tok, tgt_tok)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %s, %.1fM parameters, device %s", model_cfg, n_params / 1e6, device)

    def payload(**extra):
        return {
            "model_config": model_cfg.to_dict(), "train_config": asdict(cfg), "model": model.state_dict(),
            "src_tokenizer": src_tok.to_bytes(), "tgt_tokenizer": tgt_tok.to_bytes(), **extra,
        }

    step, lr_scale, best_val_loss, best_bleu = 0, 1.0, math.inf, -1.0
    history: List[Dict[str, float]] = []
    t_start = time.time()
    train_tokens, train_time = 0, 0.0
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   dynamic_ncols=True, leave=False)
        model.train()
        for batch in bar:
            t0 = time.time()
            batch = batch.to(device)
            lr = cfg.lr * lr_scale * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(batch.src, batch.src_lengths, batch.tgt_in)
            loss, n_tok = masked_cross_entropy(logits, batch.tgt_out, cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            optimizer.step()
            step += 1
            loss_value = loss.item()
            dt = time.time() - t0
            train_tokens += n_tok
            train_time += dt
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{train_tokens / train_time:.0f}",
                            lr=f"{lr:.2e}", refresh=False)
            if _budget_spent(cfg, step, t_start):
                break
        bar.close()
        val_loss = validation_loss(model, val_loader, device) if len(val_set) else float("nan")
        val_bleu = -1.0
        if val_pairs:
            hyps = translator.translate([s for s, _ in val_pairs], method="greedy",
                                        batch_size=cfg.eval_batch_size)
            val_bleu = corpus_scores(hyps, [t for _, t in val_pairs])["bleu"]
        if val_loss < best_val_loss:
            best_val_loss = val_loss
        elif not math.isnan(val_loss):
            lr_scale *= cfg.lr_decay
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_value, "val_loss": val_loss,
                  "val_bleu": val_bleu, "lr": lr, "elapsed_s": time.time() - t_start}
        history.append(record)
        tqdm.write(
            f"epoch {epoch + 1}: step {step}, train loss {loss_value:.3f}, val loss {val_loss:.3f}, "
            f"val BLEU (greedy) {val_bleu:.2f}, {train_tokens / max(train_time, 1e-9):.0f} tok/s, "
            f"{time.time() - t_start:.0f}s"
        ) if cfg.progress else logger.info("%s", record)
        save_checkpoint(out / "last.pt", payload(step=step, epoch=epoch + 1, metrics=record,
                                                 optimizer=optimizer.state_dict()))
        if val_bleu > best_bleu or not val_pairs:
            best_bleu = val_bleu
            save_checkpoint(out / "best.pt", payload(step=step, epoch=epoch + 1, metrics=record))
        if _budget_spent(cfg, step, t_start):
            break

    # Test with the best checkpoint.
    best = load_checkpoint(out / "best.pt")
    model.load_state_dict(best["model"])
    result: Dict[str, Any] = {
        "steps": step, "epochs": len(history), "train_time_s": train_time,
        "wall_time_s": time.time() - t_start, "tokens_per_s": train_tokens / max(train_time, 1e-9),
        "best_epoch": best["epoch"], "val_bleu": best["metrics"]["val_bleu"], "device": str(device),
        "parameters": n_params, "history": history,
    }
    if "test" in corpus.splits:
        test_pairs = _limit(corpus.read("test"), cfg.test_limit)
        hyps = translator.translate([s for s, _ in test_pairs], method="beam", beam_size=cfg.beam_size,
                                    alpha=cfg.length_penalty, batch_size=cfg.eval_batch_size)
        scores = corpus_scores(hyps, [t for _, t in test_pairs])
        result.update(test_bleu=scores["bleu"], test_chrf=scores["chrf"])
        (out / "test.hyp").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    with atomic_write(out / "metrics.json") as f:
        f.write(json.dumps({"config": asdict(cfg), **result}, indent=2).encode("utf-8"))
    return result
