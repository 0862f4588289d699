"""Subword tokenizers: sentencepiece models, trained once and cached.

    src_tok = train_tokenizer(source_sentences, vocab_size=8000)   # or loaded from the cache
    ids = src_tok.encode("Ein Hund läuft.")
    text = src_tok.decode(ids)
    blob = src_tok.to_bytes()                  # stored in checkpoints; Tokenizer(blob) rebuilds it

Special token ids are fixed for every tokenizer: pad=0, unk=1, bos=2, eos=3.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import sentencepiece as spm
import torch

from fastseq.data.lines import PathLike
from fastseq.fileio import atomic_write

logger = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe")


class Tokenizer:
    """A trained sentencepiece subword model.

    Special ids: ``pad_id=0``, ``unk_id=1``, ``bos_id=2``, ``eos_id=3``. :meth:`encode` adds no
    bos/eos; :meth:`decode` drops pad/bos/eos and returns detokenised text (unknown pieces decode
    to ``" ⁇ "``). Text is NFKC-normalised and runs of spaces are collapsed, so
    ``decode(encode(s)) == s`` for normal single-spaced sentences whose characters were seen in
    training. Tokenizers pickle, and :meth:`to_bytes` gives the serialized model to store in a
    checkpoint.

    Args:
        model_proto: a serialized sentencepiece model, as returned by :meth:`to_bytes`.

    Raises:
        RuntimeError: ``model_proto`` is not a sentencepiece model (raised by sentencepiece).
        ValueError: the model's special ids are not pad=0, unk=1, bos=2, eos=3.
    """

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, model_proto: bytes) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        special_ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if special_ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"special ids (pad, unk, bos, eos) are {special_ids}, expected (0, 1, 2, 3)"
            )

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> Tokenizer:
        """Rebuild a tokenizer from :meth:`to_bytes` output (same as ``Tokenizer(model_proto)``)."""
        return cls(model_proto)

    def to_bytes(self) -> bytes:
        """The serialized sentencepiece model proto."""
        return self._sp.serialized_model_proto()

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ids included."""
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Subword ids of ``text``, without bos/eos."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts at once (multi-threaded inside sentencepiece)."""
        return self._sp.encode(list(texts))

    def decode(self, ids: Union[Sequence[int], torch.Tensor]) -> str:
        """Detokenised text of a 1-D id sequence; pad, bos and eos ids are skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._sp.decode(ids)


def default_cache_dir() -> Path:
    """``$FASTSEQ_CACHE/spm`` if ``FASTSEQ_CACHE`` is set, else ``~/.cache/fastseq/spm``."""
    root = os.environ.get("FASTSEQ_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "fastseq") / "spm"


def train_tokenizer(
    lines: Sequence[str],
    vocab_size: int,
    model_type: str = "unigram",
    cache_dir: Optional[PathLike] = None,
    character_coverage: float = 1.0,
) -> Tokenizer:
    """Train a sentencepiece model on ``lines``, or load it from the cache if trained before.

    The cache file is ``{cache_dir}/{model_type}{vocab_size}-{key}.model``, where ``key`` hashes
    the text of ``lines`` together with every trainer option (vocab size, model type, character
    coverage, special ids, ...), so any change retrains. Files are written atomically (temporary
    file + ``os.replace``), so concurrent runs never read a partial model.

    Args:
        lines: training sentences of one language (typically the train split of one side).
        vocab_size: number of ids including the 4 special ids. For ``"unigram"`` it is an upper
            bound: a small corpus may yield fewer pieces (read :attr:`Tokenizer.vocab_size`).
        model_type: ``"unigram"`` or ``"bpe"``.
        cache_dir: where models are cached; default :func:`default_cache_dir`.
        character_coverage: fraction of characters covered by the vocabulary; rarer characters
            map to unk (1.0 suits alphabetic languages).

    Raises:
        ValueError: unknown ``model_type``.
        RuntimeError: sentencepiece failed, e.g. ``vocab_size`` is too small for the characters
            of the text, or too large for ``"bpe"``.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    options = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "character_coverage": character_coverage,
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "hard_vocab_limit": False,  # unigram: small corpora may allow fewer than vocab_size pieces
        "input_sentence_size": 2_000_000,  # random subsample above this many sentences
        "shuffle_input_sentence": True,
    }
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache_dir / f"{model_type}{vocab_size}-{_cache_key(lines, options)}.model"
    if cache_file.is_file():
        logger.info("loading cached tokenizer %s", cache_file)
        return Tokenizer(cache_file.read_bytes())
    logger.info("training %s tokenizer (vocab %d) on %d lines", model_type, vocab_size, len(lines))
    model_proto = _train_sentencepiece(lines, options)
    with atomic_write(cache_file) as f:
        f.write(model_proto)
    return Tokenizer(model_proto)


def _cache_key(lines: Sequence[str], options: Mapping[str, object]) -> str:
    """Hex digest identifying (text content, trainer options)."""
    text_hash = hashlib.sha256()
    for line in lines:
        text_hash.update(line.encode("utf-8") + b"\n")
    key = json.dumps({"text_sha256": text_hash.hexdigest(), **options}, sort_keys=True)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def _train_sentencepiece(lines: Sequence[str], options: Mapping[str, object]) -> bytes:
    """Train in memory with sentencepiece's logging (below errors) off; return the model proto."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, num_threads=2, minloglevel=2, **options
    )
    return model.getvalue()



def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """SHA-256 (hex) of the serialized model: identifies the tokenizer data was encoded with."""
    return hashlib.sha256(tokenizer.to_bytes()).hexdigest()
