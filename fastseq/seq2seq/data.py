"""Data pipeline for the seq2seq model: parallel corpora, subword tokenisers, token-count batches.

Typical use::

    corpus = load_corpus("multi30k")                      # German -> English
    train_pairs = corpus.read("train")
    src_tok = train_tokenizer([s for s, _ in train_pairs], vocab_size=8000)
    tgt_tok = train_tokenizer([t for _, t in train_pairs], vocab_size=6000)
    dataset = PairDataset(encode_pairs(train_pairs, src_tok, tgt_tok, max_len=128))
    sampler = TokenBatchSampler(dataset.lengths(), max_tokens=4096, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = batch.to(device)
            ...

Special token ids are fixed for every tokenizer: pad=0, unk=1, bos=2, eos=3.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import sentencepiece as spm
import torch

from fastseq.fileio import atomic_write

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Pair = tuple[str, str]
EncodedPair = tuple[list[int], list[int]]
Example = tuple[int, Sequence[int], Sequence[int]]

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe")

MULTI30K_DIR = Path(__file__).resolve().parent.parent / "data" / "multi30k"
# Normalised split name -> file stems accepted for it.
_MULTI30K_STEMS = {"train": ("train",), "val": ("val",), "test": ("test2016",)}
_DIRECTORY_STEMS = {"train": ("train",), "val": ("val", "valid", "dev"), "test": ("test",)}


# --------------------------------------------------------------------------- corpus loading


@dataclass(frozen=True)
class ParallelCorpus:
    """A parallel corpus on disk: one aligned (source file, target file) pair per split.

    Attributes:
        name: ``"multi30k"`` or the directory the corpus was loaded from.
        src_lang: source language code, also the source file suffix (e.g. ``"de"``).
        tgt_lang: target language code (e.g. ``"en"``).
        splits: split name (``"train"``, ``"val"``, ``"test"``) -> (source path, target path).
    """

    name: str
    src_lang: str
    tgt_lang: str
    splits: dict[str, tuple[Path, Path]]

    def read(self, split: str, max_lines: Optional[int] = None) -> list[Pair]:
        """Read one split with :func:`read_parallel`.

        Raises:
            KeyError: the corpus has no such split.
        """
        if split not in self.splits:
            available = sorted(self.splits)
            raise KeyError(f"corpus {self.name!r} has no split {split!r}; it has {available}")
        src_path, tgt_path = self.splits[split]
        return read_parallel(src_path, tgt_path, max_lines=max_lines)


def load_corpus(
    spec: str = "multi30k", src_lang: str = "de", tgt_lang: str = "en"
) -> ParallelCorpus:
    """Locate the files of a parallel corpus.

    Args:
        spec: ``"multi30k"`` for the embedded Multi30k corpus (languages de/en; splits train, val
            and test = the 2016 Flickr test set), or a directory holding ``{split}.{lang}`` or
            ``{split}.{lang}.gz`` files. In a directory, ``train`` is required; ``val`` (also found
            as ``valid`` or ``dev``) and ``test`` are optional.
        src_lang: source language, the file suffix of the source side.
        tgt_lang: target language.

    Returns:
        A :class:`ParallelCorpus` whose splits are named ``train``, ``val`` and ``test``.

    Raises:
        FileNotFoundError: ``spec`` is neither ``"multi30k"`` nor a directory, a required split
            is missing, or a split has a file for only one of the two languages.
        ValueError: ``src_lang == tgt_lang``, or a split is ambiguous (e.g. both ``val.de`` and
            ``dev.de``, or both ``train.de`` and ``train.de.gz``).
    """
    if src_lang == tgt_lang:
        raise ValueError(f"source and target language are both {src_lang!r}")
    if spec == "multi30k":
        directory, stems, required = MULTI30K_DIR, _MULTI30K_STEMS, tuple(_MULTI30K_STEMS)
    else:
        directory, stems, required = Path(spec).expanduser(), _DIRECTORY_STEMS, ("train",)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"corpus {spec!r} is neither 'multi30k' nor an existing directory"
            )
    splits = _find_splits(directory, stems, (src_lang, tgt_lang), required)
    return ParallelCorpus(name=spec, src_lang=src_lang, tgt_lang=tgt_lang, splits=splits)


def _find_splits(
    directory: Path,
    stems: Mapping[str, tuple[str, ...]],
    langs: tuple[str, str],
    required: tuple[str, ...],
) -> dict[str, tuple[Path, Path]]:
    """Map each split name to its (src, tgt) files; raise if a required split has none."""
    splits = {}
    for split, split_stems in stems.items():
        files = _find_split(directory, split_stems, langs)
        if files is not None:
            splits[split] = files
        elif split in required:
            expected = " and ".join(f"{split_stems[0]}.{lang}[.gz]" for lang in langs)
            raise FileNotFoundError(f"{directory}: no {split!r} split, expected files {expected}")
    return splits


def _find_split(
    directory: Path, stems: tuple[str, ...], langs: tuple[str, str]
) -> Optional[tuple[Path, Path]]:
    """The (src, tgt) files of the one stem with files in ``directory``; None if no stem has any."""
    present = [
        stem for stem in stems if any(_existing_files(directory, stem, lang) for lang in langs)
    ]
    if not present:
        return None
    if len(present) > 1:
        raise ValueError(f"{directory}: ambiguous split, there are files for each of {present}")
    stem = present[0]
    src_lang, tgt_lang = langs
    return _single_file(directory, stem, src_lang), _single_file(directory, stem, tgt_lang)


def _existing_files(directory: Path, stem: str, lang: str) -> list[Path]:
    candidates = (directory / f"{stem}.{lang}", directory / f"{stem}.{lang}.gz")
    return [path for path in candidates if path.is_file()]


def _single_file(directory: Path, stem: str, lang: str) -> Path:
    """The one file for ``stem`` in language ``lang`` (plain or gzip)."""
    files = _existing_files(directory, stem, lang)
    if not files:
        raise FileNotFoundError(
            f"{directory}: split {stem!r} has no {lang!r} side, "
            f"expected {stem}.{lang} or {stem}.{lang}.gz"
        )
    if len(files) > 1:
        raise ValueError(f"{directory}: both {files[0].name} and {files[1].name} exist; keep one")
    return files[0]


def read_lines(path: PathLike) -> list[str]:
    """Read a UTF-8 text file (gzip-compressed if its name ends in ``.gz``), one string per line.

    Lines are split on ``"\\n"`` only and stripped of surrounding whitespace; a final newline does
    not produce an extra empty line.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not valid UTF-8 (the message names the file and the line number),
            or a gzip file is truncated or corrupted.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        try:
            data = f.read()
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise ValueError(_gzip_message(path, 1, err)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_number = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: invalid UTF-8 on line {line_number} ({err.reason})") from err
    text = text.removesuffix("\n")
    return [line.strip() for line in text.split("\n")] if text else []


def read_parallel(
    src_path: PathLike, tgt_path: PathLike, max_lines: Optional[int] = None
) -> list[Pair]:
    """Read two aligned files into (source, target) sentence pairs.

    Args:
        src_path, tgt_path: files as read by :func:`read_lines`; line i of one translates line i
            of the other.
        max_lines: keep only the first ``max_lines`` lines (before empty pairs are dropped).

    Returns:
        The pairs in file order. Pairs with an empty side are dropped; how many is logged as a
        warning.

    Raises:
        ValueError: the files have different line counts (the message names both counts and both
            files) or are not valid UTF-8.
    """
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise ValueError(
            f"parallel files differ in length: {len(src_lines)} lines in {src_path} "
            f"but {len(tgt_lines)} lines in {tgt_path}"
        )
    pairs = list(zip(src_lines[:max_lines], tgt_lines[:max_lines]))
    kept = [(src, tgt) for src, tgt in pairs if src and tgt]
    if len(kept) < len(pairs):
        logger.warning("%s / %s: dropped %d of %d pairs with an empty side", src_path, tgt_path,
                       len(pairs) - len(kept), len(pairs))
    return kept


LINE_BLOCK = 4096  # lines decoded at once by the streaming readers


def iter_parallel(src_path: PathLike, tgt_path: PathLike) -> Iterator[tuple[int, str, str]]:
    """Stream two aligned files, for corpora too large for :func:`read_parallel`.

    Files are UTF-8, gzip-compressed if the name ends in ``.gz``, split on ``"\\n"`` only (a final
    newline does not produce an extra empty line). They are read in blocks of
    ``LINE_BLOCK`` lines, so memory use is two blocks whatever the file size.

    Yields:
        ``(line number, source line, target line)``: the 1-based line number and both lines
        stripped of surrounding whitespace. Empty lines are yielded too; filtering is the
        caller's choice.

    Raises:
        FileNotFoundError: a file does not exist (raised on the first ``next()``).
        ValueError: a line is not valid UTF-8 (the message names the file and the line number),
            or the files have different line counts (the message names both files and both
            counts). The latter is raised on reaching the end of the shorter file, before the
            pairs of its last block are yielded.
    """
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    with _open_binary(src_path) as src_file, _open_binary(tgt_path) as tgt_file:
        line_number = 0  # lines yielded so far
        while True:
            src_lines = _read_block(src_file, src_path, line_number + 1)
            tgt_lines = _read_block(tgt_file, tgt_path, line_number + 1)
            if len(src_lines) != len(tgt_lines):
                src_count = line_number + len(src_lines) + sum(1 for _ in src_file)
                tgt_count = line_number + len(tgt_lines) + sum(1 for _ in tgt_file)
                raise ValueError(
                    f"parallel files differ in length: {src_count} lines in {src_path} "
                    f"but {tgt_count} lines in {tgt_path}"
                )
            if not src_lines:
                return
            yield from zip(itertools.count(line_number + 1), src_lines, tgt_lines)
            line_number += len(src_lines)


def _gzip_message(path: Path, line: int, err: BaseException) -> str:
    return (f"{path}: cannot read past line {line - 1}: the file is truncated or not valid gzip "
            f"({type(err).__name__}: {err})")


def _open_binary(path: Path) -> BinaryIO:
    """``path`` opened for binary reading, through gzip if its name ends in ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_block(file: BinaryIO, path: Path, first_line: int) -> list[str]:
    """The next (up to) ``LINE_BLOCK`` lines of ``file``, decoded and stripped; [] at its end.

    Args:
        file: a binary file (lines end at ``b"\\n"``).
        path: its name, for error messages.
        first_line: the 1-based number of the next line, for error messages.

    Raises:
        ValueError: a line is not valid UTF-8 (the message names ``path`` and the line number),
            or a gzip file is truncated or corrupted.
    """
    try:
        raw = list(itertools.islice(file, LINE_BLOCK))
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(_gzip_message(path, first_line, err)) from None
    data = b"".join(raw)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_number = first_line + data.count(b"\n", 0, err.start)
        raise ValueError(f"{path}: invalid UTF-8 on line {line_number} ({err.reason})") from err
    # Every raw line but the last ends in "\n", so the split has len(raw) parts and, if the
    # last line ends in "\n" too, an empty one after them.
    return [line.strip() for line in text.split("\n")[: len(raw)]]


# --------------------------------------------------------------------------- tokenisation


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


# --------------------------------------------------------------------------- batching


def encode_pairs(
    pairs: Sequence[Pair], src_tok: Tokenizer, tgt_tok: Tokenizer, max_len: Optional[int] = None
) -> list[EncodedPair]:
    """Encode sentence pairs to ids: ``src_ids = ids + [eos]``, ``tgt_ids = [bos] + ids + [eos]``.

    Args:
        pairs: (source, target) sentences.
        src_tok, tgt_tok: tokenizers of the two languages.
        max_len: if given, pairs whose ``src_ids`` or ``tgt_ids`` (special ids included) are
            longer than ``max_len`` are dropped and the count is logged; the result then no
            longer lines up with ``pairs``. Leave it None for evaluation sets.

    Returns:
        (src_ids, tgt_ids) lists of ints, in the order of ``pairs``.
    """
    src_ids = [ids + [EOS_ID] for ids in src_tok.encode_batch([src for src, _ in pairs])]
    tgt_ids = [[BOS_ID] + ids + [EOS_ID] for ids in tgt_tok.encode_batch([tgt for _, tgt in pairs])]
    encoded = list(zip(src_ids, tgt_ids))
    if max_len is None:
        return encoded
    kept = [(src, tgt) for src, tgt in encoded if len(src) <= max_len and len(tgt) <= max_len]
    if len(kept) < len(encoded):
        logger.info("dropped %d of %d pairs longer than max_len=%d tokens",
                    len(encoded) - len(kept), len(encoded), max_len)
    return kept


class PairDataset(torch.utils.data.Dataset):
    """Encoded pairs for a ``DataLoader``.

    Item ``i`` is ``(i, src_ids, tgt_ids)``, the example form :func:`collate` expects.
    """

    def __init__(self, pairs: Sequence[EncodedPair]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Example:
        src_ids, tgt_ids = self.pairs[index]
        return index, src_ids, tgt_ids

    def lengths(self) -> list[int]:
        """``max(len(src_ids), len(tgt_ids))`` of each pair: the lengths to batch by."""
        return [max(len(src_ids), len(tgt_ids)) for src_ids, tgt_ids in self.pairs]


class TokenBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of example indices whose padded size stays within a token budget.

    Examples are sorted by length and packed greedily, so each batch holds examples of similar
    length and ``len(batch) * max(length in batch) <= max_tokens``. With ``shuffle=True``, equal
    lengths are ordered randomly before packing and the order of the batches is permuted, both
    drawn from a numpy Generator seeded with ``(seed, epoch)``: an epoch's batches are
    reproducible and differ between epochs. With ``shuffle=False``, batches come in ascending
    length order, the same every epoch; ``Batch.indices`` leads back to the original order.
    Every index appears in exactly one batch per epoch.

    Args:
        lengths: size of each example in tokens, e.g. :meth:`PairDataset.lengths` (longer side).
        max_tokens: budget for ``batch size * longest example`` (padded tokens of the longer side).
        shuffle: randomise batches (training) or not (evaluation).
        seed: base seed of the shuffling.

    Raises:
        ValueError: an example is longer than ``max_tokens`` (the message names its index).
    """

    def __init__(
        self, lengths: Sequence[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.size and self.lengths.max() > max_tokens:
            index = int(self.lengths.argmax())
            raise ValueError(
                f"example {index} has {self.lengths[index]} tokens, "
                f"more than max_tokens={max_tokens}; "
                "raise max_tokens or filter long examples (encode_pairs(max_len=...))"
            )
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._by_length = np.argsort(self.lengths, kind="stable")
        # The packing depends only on the sorted lengths, so the count is the same every epoch.
        self._num_batches = len(self._pack(self._by_length))

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling of the next iteration (call before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:
            return iter(self._pack(self._by_length))
        rng = np.random.default_rng([self.seed, self.epoch])
        permutation = rng.permutation(len(self.lengths))
        order = permutation[np.argsort(self.lengths[permutation], kind="stable")]
        batches = self._pack(order)
        return iter([batches[i] for i in rng.permutation(len(batches))])

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        """Cut indices sorted by ascending length into consecutive batches within the budget."""
        return pack_by_length(order, self.lengths, self.max_tokens)


def pack_by_length(order: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    """Cut example indices sorted by ascending length into consecutive batches within a budget.

    Greedy: a batch is closed when adding the next example would make
    ``len(batch) * length of that example > max_tokens``. Since ``order`` is sorted by length,
    the last example of a batch is its longest, so every batch satisfies
    ``len(batch) * max(length in batch) <= max_tokens`` (as long as no single example exceeds
    ``max_tokens``, which the callers check).

    Args:
        order: ``[N]`` integer array, indices into ``lengths`` in ascending order of length.
        lengths: ``[M]`` integer array, the size of each example in tokens.
        max_tokens: budget for ``batch size * longest example``.

    Returns:
        The batches, lists of indices taken from ``order`` in its order; together they hold each
        index of ``order`` exactly once.
    """
    batches: list[list[int]] = []
    batch: list[int] = []
    for index, length in zip(order.tolist(), lengths[order].tolist()):
        if batch and (len(batch) + 1) * length > max_tokens:
            batches.append(batch)
            batch = []
        batch.append(index)
    if batch:
        batches.append(batch)
    return batches


@dataclass
class Batch:
    """A padded mini-batch; all tensors int64, padded on the right with the pad id.

    B is the batch size, S the longest ``src_ids`` and T the longest ``tgt_ids`` minus one.

    Attributes:
        src: ``[B, S]`` source ids ending in eos.
        src_lengths: ``[B]`` unpadded source lengths.
        tgt_in: ``[B, T]`` decoder inputs: bos + target ids (no final eos).
        tgt_out: ``[B, T]`` decoder labels: target ids + eos (``tgt_in`` shifted left by one).
        tgt_lengths: ``[B]`` unpadded lengths of ``tgt_in`` / ``tgt_out``.
        indices: ``[B]`` dataset index of each row.
    """

    src: torch.Tensor
    src_lengths: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    tgt_lengths: torch.Tensor
    indices: torch.Tensor

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in pinned memory (called by ``DataLoader(pin_memory=True)``)."""
        return self._apply(torch.Tensor.pin_memory)

    @property
    def num_tgt_tokens(self) -> int:
        """Number of non-pad target tokens, i.e. of predicted labels."""
        return int(self.tgt_lengths.sum())

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(**{field.name: fn(getattr(self, field.name)) for field in fields(self)})


def collate(examples: Sequence[Example], pad_id: int = PAD_ID) -> Batch:
    """Pad ``(index, src_ids, tgt_ids)`` examples (:class:`PairDataset` items) into a Batch.

    ``tgt_ids`` must start with bos and end with eos, as made by :func:`encode_pairs`.

    Raises:
        ValueError: ``examples`` is empty, or a ``tgt_ids`` has fewer than 2 ids.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    indices, src_seqs, tgt_seqs = zip(*examples)
    if min(len(tgt) for tgt in tgt_seqs) < 2:
        raise ValueError("every tgt_ids needs at least 2 ids (bos ... eos)")
    return Batch(
        src=_pad(src_seqs, pad_id),
        src_lengths=torch.tensor([len(ids) for ids in src_seqs], dtype=torch.int64),
        tgt_in=_pad([ids[:-1] for ids in tgt_seqs], pad_id),
        tgt_out=_pad([ids[1:] for ids in tgt_seqs], pad_id),
        tgt_lengths=torch.tensor([len(ids) - 1 for ids in tgt_seqs], dtype=torch.int64),
        indices=torch.tensor(indices, dtype=torch.int64),
    )


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """``[len(seqs), longest]`` int64 tensor of the sequences, right-padded with ``pad_id``."""
    width = max(len(ids) for ids in seqs)
    rows = [list(ids) + [pad_id] * (width - len(ids)) for ids in seqs]
    return torch.tensor(rows, dtype=torch.int64)
