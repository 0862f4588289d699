"""Vocabularies of a language model: characters, words or subwords, text <-> token ids.

    vocab = build_vocabulary("char", [train_text])      # or "word", "subword"
    ids = vocab.encode("To be, or not to be")           # list of ints
    vocab.decode(ids)                                   # the text again
    vocab.unknown("Zoë")                                # ['ë']: units not in the vocabulary
    same = vocabulary_from_dict(vocab.to_dict())        # stored in checkpoints

Every vocabulary has an end-of-sequence id (``eos_id``; a language model's corpus
puts one between documents, and generation stops at it) and an unknown id
(``unk_id``): a unit of text unseen in training encodes to it, and decodes to
``"\\ufffd"`` (the replacement character). Newlines are tokens of every kind, so
line structure survives a round trip.

* ``char``: one id per character of the training text (sorted by code point) after
  ``<eos>`` = 0 and ``<unk>`` = 1. Lossless on text whose characters were seen.
* ``word``: whitespace-separated words and ``"\\n"``, the ``max_size`` most frequent
  (ties by first occurrence) after ``<eos>`` and ``<unk>``; decoding joins words
  with one space (runs of spaces and tabs are not kept).
* ``subword``: a sentencepiece model (:mod:`fastseq.data.tokenizer`, unigram)
  trained on the lines of the training text, plus one id for ``"\\n"`` after its
  pieces; its own ``eos``/``unk`` ids (3 and 1). Text is NFKC-normalised and runs
  of spaces collapsed, as the seq2seq tokenizers do.
"""
from __future__ import annotations

import abc
import re
from collections import Counter
from typing import Any, ClassVar, Dict, List, Mapping, Sequence, Type

KINDS = ("char", "word", "subword")
EOS, UNK = "<eos>", "<unk>"
UNKNOWN_TEXT = "\ufffd"
_WORD = re.compile(r"\n|[^\s]+")


class Vocabulary(abc.ABC):
    """Text <-> token ids (see the module docstring).

    Attributes:
        kind: ``"char"``, ``"word"`` or ``"subword"``.
        eos_id, unk_id: the end-of-sequence and unknown ids.
    """

    kind: ClassVar[str]
    eos_id: int
    unk_id: int

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """The number of ids, special ids included."""

    @abc.abstractmethod
    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no eos added); unseen units become ``unk_id``."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ``eos_id`` decodes to nothing, ``unk_id`` to ``"\\ufffd"``."""

    @abc.abstractmethod
    def unknown(self, text: str) -> List[str]:
        """The distinct units of ``text`` that are not in the vocabulary, in order of appearance."""

    @abc.abstractmethod
    def to_dict(self) -> Dict[str, Any]:
        """Plain data (``kind`` and what rebuilds it), as stored in checkpoints."""

    @property
    def newline_id(self) -> int:
        """The id of ``"\\n"`` (generation with an empty prompt starts from it), else ``eos_id``."""
        ids = self.encode("\n")
        return ids[0] if len(ids) == 1 and ids[0] != self.unk_id else self.eos_id


class _TableVocabulary(Vocabulary):
    """A vocabulary that is a list of units: ``<eos>``, ``<unk>``, then the units."""

    eos_id, unk_id = 0, 1

    def __init__(self, units: Sequence[str]):
        units = list(units)
        if units[:2] != [EOS, UNK] or len(set(units)) != len(units):
            raise ValueError(f"{self.kind} vocabulary: expected distinct units after {[EOS, UNK]}")
        self.units = units
        self.index = {u: i for i, u in enumerate(units)}

    @property
    def vocab_size(self) -> int:
        return len(self.units)

    def _split(self, text: str) -> List[str]:
        raise NotImplementedError

    def encode(self, text: str) -> List[int]:
        index, unk = self.index, self.unk_id
        return [index.get(u, unk) for u in self._split(text)]

    def unknown(self, text: str) -> List[str]:
        return list(dict.fromkeys(u for u in self._split(text) if u not in self.index or u in (EOS, UNK)))

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "units": self.units}


class CharVocabulary(_TableVocabulary):
    """Characters (see the module docstring)."""

    kind = "char"

    @classmethod
    def build(cls, texts: Sequence[str]) -> "CharVocabulary":
        chars = set()
        for t in texts:
            chars.update(t)
        return cls([EOS, UNK] + sorted(chars))

    def _split(self, text: str) -> List[str]:
        return list(text)

    def decode(self, ids: Sequence[int]) -> str:
        units = self.units
        return "".join("" if i == 0 else UNKNOWN_TEXT if i == 1 else units[i] for i in ids)


class WordVocabulary(_TableVocabulary):
    """Whitespace-separated words and newlines (see the module docstring)."""

    kind = "word"

    @classmethod
    def build(cls, texts: Sequence[str], max_size: int) -> "WordVocabulary":
        counts: Counter = Counter()
        for t in texts:
            counts.update(_WORD.findall(t))
        keep = max(max_size - 2, 1)
        return cls([EOS, UNK] + [w for w, _ in counts.most_common(keep)])

    def _split(self, text: str) -> List[str]:
        return _WORD.findall(text)

    def decode(self, ids: Sequence[int]) -> str:
        out: List[str] = []
        for i in ids:
            if i == self.eos_id:
                continue
            word = UNKNOWN_TEXT if i == self.unk_id else self.units[i]
            if out and word != "\n" and out[-1] != "\n":
                out.append(" ")
            out.append(word)
        return "".join(out)


class SubwordVocabulary(Vocabulary):
    """A sentencepiece model and a newline id (see the module docstring)."""

    kind = "subword"

    def __init__(self, model_proto: bytes):
        from fastseq.data.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(model_proto)
        self.eos_id, self.unk_id = self.tokenizer.eos_id, self.tokenizer.unk_id
        self.newline = self.tokenizer.vocab_size  # one id after the pieces

    @classmethod
    def build(cls, texts: Sequence[str], vocab_size: int) -> "SubwordVocabulary":
        from fastseq.data.tokenizer import train_tokenizer

        lines = [line for t in texts for line in t.split("\n") if line.strip()]
        return cls(train_tokenizer(lines, vocab_size - 1).to_bytes())

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size + 1

    def encode(self, text: str) -> List[int]:
        lines = text.split("\n")
        pieces = self.tokenizer.encode_batch(lines)
        out: List[int] = []
        for n, ids in enumerate(pieces):
            if n:
                out.append(self.newline)
            out.extend(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        lines, current = [], []
        for i in ids:
            if i == self.newline:
                lines.append(current)
                current = []
            elif i != self.eos_id:
                current.append(i)
        lines.append(current)
        return "\n".join(self.tokenizer.decode(line).replace(" \u2047 ", UNKNOWN_TEXT) for line in lines)

    def unknown(self, text: str) -> List[str]:
        tok = self.tokenizer
        return [c for c in dict.fromkeys(text) if not c.isspace() and tok.unk_id in tok.encode(c)]

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "model": self.tokenizer.to_bytes()}


_KINDS: Mapping[str, Type[Vocabulary]] = {
    "char": CharVocabulary, "word": WordVocabulary, "subword": SubwordVocabulary}


def build_vocabulary(kind: str, texts: Sequence[str], vocab_size: int = 0) -> Vocabulary:
    """A vocabulary of ``kind`` built from ``texts`` (the training text).

    Args:
        kind: ``"char"``, ``"word"`` or ``"subword"``.
        vocab_size: word: the most ids (0: every word); subword: the sentencepiece
            model's size plus the newline id (required); char: ignored (every character).

    Raises:
        ValueError: unknown ``kind``; ``vocab_size`` < 0, or 0 for ``"subword"``.
    """
    if kind not in KINDS:
        raise ValueError(f"vocabulary: expected one of {KINDS}, got {kind!r}")
    if vocab_size < 0 or (kind == "subword" and vocab_size == 0):
        raise ValueError(f"vocab_size: expected > 0 for {kind!r} vocabularies, got {vocab_size}")
    if kind == "char":
        return CharVocabulary.build(texts)
    if kind == "word":
        return WordVocabulary.build(texts, vocab_size or 1 << 62)
    return SubwordVocabulary.build(texts, vocab_size)


def vocabulary_from_dict(data: Mapping[str, Any]) -> Vocabulary:
    """The vocabulary :meth:`Vocabulary.to_dict` describes.

    Raises:
        ValueError: an unknown ``kind`` or a malformed description.
    """
    kind = data.get("kind")
    if kind == "subword":
        return SubwordVocabulary(data["model"])
    if kind in ("char", "word"):
        return _KINDS[kind](data["units"])
    raise ValueError(f"vocabulary: unknown kind {kind!r}, expected one of {KINDS}")
