"""Translation of raw sentences with a trained model (greedy, beam or sampling)."""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

import torch

from fastseq.data.tokenizer import BOS_ID, EOS_ID, Tokenizer
from fastseq.seq2seq.model import CHECKPOINT_FORMAT, PAD_ID, ModelConfig, Seq2Seq
from fastseq.seq2seq.search import beam_search, greedy_search, sample
from fastseq.training.checkpoint import load_checkpoint
from fastseq.training.distributed import pick_device

__all__ = ["METHODS", "Translator", "pick_device"]

METHODS = ("greedy", "beam", "sample")


class Translator:
    """A model with its tokenizers: raw source sentences in, detokenised text out."""

    def __init__(self, model: Seq2Seq, src_tok: Tokenizer, tgt_tok: Tokenizer):
        self.model, self.src_tok, self.tgt_tok = model, src_tok, tgt_tok

    @classmethod
    def from_checkpoint(cls, path, device: Union[str, torch.device] = "auto") -> "Translator":
        """Load a checkpoint written by ``fastseq train`` (see :mod:`fastseq.training.checkpoint`):
        its model config, weights and tokenizers."""
        device = pick_device(device) if isinstance(device, str) else device
        ckpt = load_checkpoint(path, map_location="cpu", format=CHECKPOINT_FORMAT)
        model = Seq2Seq(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return cls(model.to(device).eval(), Tokenizer.from_bytes(ckpt["src_tokenizer"]),
                   Tokenizer.from_bytes(ckpt["tgt_tokenizer"]))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def translate(self, sentences: Sequence[str], method: str = "beam", beam_size: int = 5,
                  alpha: float = 0.6, batch_size: int = 64, max_len: Optional[int] = None,
                  temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> List[str]:
        """Translate ``sentences`` (raw text), batching sentences of similar length.

        Raises:
            ValueError: unknown ``method``; ``batch_size`` or ``beam_size`` < 1;
                ``max_len`` < 1; ``alpha`` < 0; ``temperature`` <= 0; ``top_k`` < 0.
            TypeError: ``sentences`` is a single string, or holds non-strings.
        """
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if isinstance(sentences, str):
            raise TypeError("sentences: expected a sequence of strings, got a single str")
        bad = next((i for i, t in enumerate(sentences) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"sentences: expected strings, got {type(sentences[bad]).__name__} at index {bad}")
        for name, value, lo in (("batch_size", batch_size, 1), ("beam_size", beam_size, 1)):
            if not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len: expected None or an integer >= 1, got {max_len!r}")
        if not alpha >= 0:
            raise ValueError(f"alpha: expected >= 0 (length-penalty exponent), got {alpha!r}")
        if method == "sample" and not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature!r}")
        if method == "sample" and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k: expected an integer >= 0 (0 = no limit), got {top_k!r}")
        if not sentences:
            return []
        was_training = self.model.training
        self.model.eval()
        ids = [self.src_tok.encode(s) + [EOS_ID] for s in sentences]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: List[Optional[str]] = [None] * len(ids)
        gen = torch.Generator(device=self.device).manual_seed(seed) if method == "sample" else None
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            src, lengths = self._pad([ids[i] for i in chunk])
            kw = dict(bos_id=BOS_ID, eos_id=EOS_ID, max_len=max_len)
            if method == "greedy":
                hyps = greedy_search(self.model, src, lengths, **kw)
            elif method == "beam":
                hyps = beam_search(self.model, src, lengths, beam_size=beam_size, alpha=alpha, **kw)
            else:
                hyps = sample(self.model, src, lengths, temperature=temperature, top_k=top_k,
                              generator=gen, **kw)
            for i, h in zip(chunk, hyps):
                out[i] = self.tgt_tok.decode(h)
        self.model.train(was_training)
        return out  # type: ignore[return-value]

    def _pad(self, seqs: Iterable[List[int]]):
        seqs = list(seqs)
        S = max(len(s) for s in seqs)
        src = torch.full((len(seqs), S), PAD_ID, dtype=torch.long)
        for row, s in enumerate(seqs):
            src[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        return src.to(self.device), lengths.to(self.device)
