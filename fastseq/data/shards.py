"""Token-id shards of a parallel corpus on disk: written once, memory-mapped when read.

Corpora of any size, with memory bounded by one shard:

* :func:`preprocess` streams a parallel corpus once, encodes it and writes it as shards of
  token ids (numpy ``.npy`` files, memory-mapped when read);
* :class:`ShardedCorpus` opens the result; :class:`Shard` is one shard, memory-mapped.

:class:`fastseq.data.batching.StreamingBatches` yields token-budget batches from a
:class:`ShardedCorpus`; :func:`fastseq.data.lines.sample_lines` draws the bounded sample of a
huge file to train the tokenizers on.

Typical use::

    from fastseq.data.lines import sample_lines
    from fastseq.data.tokenizer import train_tokenizer

    src_tok = train_tokenizer(sample_lines("train.de.gz", 2_000_000), vocab_size=16000)
    tgt_tok = train_tokenizer(sample_lines("train.en.gz", 2_000_000), vocab_size=16000)
    corpus = preprocess("train.de.gz", "train.en.gz", src_tok, tgt_tok, "train-shards",
                        max_len=128)
    # ... in a later run: corpus = ShardedCorpus("train-shards")
    corpus.check_tokenizers(src_tok, tgt_tok)

Directory layout written by :func:`preprocess`, for shard ``k`` (5 digits)::

    meta.json                  format, counts, dtype, vocab sizes, tokenizer hashes, sources
    shard-0000k.src.npy        [src_tokens] uint16 or int32: the shard's src_ids, concatenated
    shard-0000k.tgt.npy        [tgt_tokens] same dtype: every tgt_ids, concatenated
    shard-0000k.offsets.npy    [n + 1, 2] int64: column 0 src offsets, column 1 tgt offsets

Pair ``j`` of a shard is ``src[offsets[j, 0]:offsets[j + 1, 0]]`` and
``tgt[offsets[j, 1]:offsets[j + 1, 1]]``, with ids as made by
:func:`~fastseq.data.batching.encode_pairs` (``src_ids = ids + [eos]``,
``tgt_ids = [bos] + ids + [eos]``). Pairs are numbered globally in file order (after dropping),
shard after shard; ``Batch.indices`` holds these global numbers.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from fastseq.data.lines import PathLike, iter_parallel
from fastseq.data.tokenizer import BOS_ID, EOS_ID, Tokenizer, tokenizer_sha256

logger = logging.getLogger(__name__)

FORMAT = "fastseq.shards"
VERSION = 1
META_FILE = "meta.json"
UINT16_MAX_VOCAB = 65536  # ids 0..65535 fit in uint16
_META_FIELDS = {
    "format": str,
    "version": int,
    "num_pairs": int,
    "shards": list,
    "dtype": str,
    "src_vocab_size": int,
    "tgt_vocab_size": int,
    "src_tokenizer_sha256": str,
    "tgt_tokenizer_sha256": str,
    "lines_read": int,
    "dropped_empty": int,
    "dropped_too_long": int,
    "max_len": (int, type(None)),
    "source_files": list,
}
_SHARD_FIELDS = ("name", "num_pairs", "src_tokens", "tgt_tokens")
_DTYPES = ("uint16", "int32")


# --------------------------------------------------------------------------- preprocessing


@dataclass
class _Encoded:
    """Encoded pairs, ids concatenated: the pairs of one chunk, or pairs waiting for a shard."""

    src: np.ndarray  # [sum(src_lengths)] token ids
    src_lengths: np.ndarray  # [n] int64
    tgt: np.ndarray  # [sum(tgt_lengths)] token ids
    tgt_lengths: np.ndarray  # [n] int64

    def __len__(self) -> int:
        return len(self.src_lengths)

    @staticmethod
    def concat(parts: Sequence[_Encoded]) -> _Encoded:
        """The pairs of ``parts``, in order, in one _Encoded."""
        return _Encoded(
            src=np.concatenate([part.src for part in parts]),
            src_lengths=np.concatenate([part.src_lengths for part in parts]),
            tgt=np.concatenate([part.tgt for part in parts]),
            tgt_lengths=np.concatenate([part.tgt_lengths for part in parts]),
        )

    def split(self, k: int) -> tuple[_Encoded, _Encoded]:
        """The first ``k`` pairs (views) and a copy of the rest (so ``self`` can be freed)."""
        src_cut, tgt_cut = int(self.src_lengths[:k].sum()), int(self.tgt_lengths[:k].sum())
        head = _Encoded(self.src[:src_cut], self.src_lengths[:k],
                        self.tgt[:tgt_cut], self.tgt_lengths[:k])
        tail = _Encoded(self.src[src_cut:].copy(), self.src_lengths[k:].copy(),
                        self.tgt[tgt_cut:].copy(), self.tgt_lengths[k:].copy())
        return head, tail


def _encode_side(
    tokenizer: Tokenizer, lines: Sequence[str], with_bos: bool, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Encode lines, append eos to each (and prepend bos if ``with_bos``), concatenate.

    Returns:
        ``(ids, lengths)``: ``[sum(lengths)]`` ids of ``dtype`` and ``[len(lines)]`` int64
        lengths, special ids included.
    """
    encoded = tokenizer.encode_batch(lines)
    raw_lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    raw = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype,
                      count=int(raw_lengths.sum()))
    prefix = int(with_bos)
    lengths = raw_lengths + prefix + 1
    ids = np.full(int(lengths.sum()), EOS_ID, dtype=dtype)
    row_starts = np.cumsum(lengths) - lengths
    if with_bos:
        ids[row_starts] = BOS_ID
    # Row r's tokens move from raw_starts[r] onwards to row_starts[r] + prefix onwards.
    raw_starts = np.cumsum(raw_lengths) - raw_lengths
    ids[np.arange(len(raw)) + np.repeat(row_starts + prefix - raw_starts, raw_lengths)] = raw
    return ids, lengths


def _encode_chunk(
    src_lines: Sequence[str],
    tgt_lines: Sequence[str],
    src_tok: Tokenizer,
    tgt_tok: Tokenizer,
    dtype: np.dtype,
    max_len: Optional[int],
) -> tuple[_Encoded, int]:
    """Encode like ``encode_pairs``; return the kept pairs and how many were too long."""
    src, src_lengths = _encode_side(src_tok, src_lines, False, dtype)
    tgt, tgt_lengths = _encode_side(tgt_tok, tgt_lines, True, dtype)
    chunk = _Encoded(src, src_lengths, tgt, tgt_lengths)
    if max_len is None:
        return chunk, 0
    keep = (src_lengths <= max_len) & (tgt_lengths <= max_len)
    if keep.all():
        return chunk, 0
    kept = _Encoded(src[np.repeat(keep, src_lengths)], src_lengths[keep],
                    tgt[np.repeat(keep, tgt_lengths)], tgt_lengths[keep])
    return kept, int((~keep).sum())


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _save(path: Path, array: np.ndarray) -> None:
    """``np.save`` then fsync, so the file is complete on disk before the directory is renamed."""
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


class _ShardWriter:
    """Collects encoded chunks and writes a shard each time ``shard_size`` pairs are pending."""

    def __init__(self, directory: Path, shard_size: int) -> None:
        self.directory = directory
        self.shard_size = shard_size
        self.shards: list[dict[str, Any]] = []
        self._pending: list[_Encoded] = []
        self._num_pending = 0

    def add(self, chunk: _Encoded) -> None:
        self._pending.append(chunk)
        self._num_pending += len(chunk)
        while self._num_pending >= self.shard_size:
            shard, rest = _Encoded.concat(self._pending).split(self.shard_size)
            self._write(shard)
            self._pending, self._num_pending = [rest], len(rest)

    def finish(self) -> None:
        """Write the last, partial shard (if any pair is pending)."""
        if self._num_pending:
            self._write(_Encoded.concat(self._pending))
        self._pending, self._num_pending = [], 0

    def _write(self, shard: _Encoded) -> None:
        name = _shard_name(len(self.shards))
        offsets = np.zeros((len(shard) + 1, 2), dtype=np.int64)
        np.cumsum(shard.src_lengths, out=offsets[1:, 0])
        np.cumsum(shard.tgt_lengths, out=offsets[1:, 1])
        _save(self.directory / f"{name}.src.npy", shard.src)
        _save(self.directory / f"{name}.tgt.npy", shard.tgt)
        _save(self.directory / f"{name}.offsets.npy", offsets)
        self.shards.append({"name": name, "num_pairs": len(shard),
                            "src_tokens": len(shard.src), "tgt_tokens": len(shard.tgt)})


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def preprocess(
    src_path: PathLike,
    tgt_path: PathLike,
    src_tok: Tokenizer,
    tgt_tok: Tokenizer,
    out_dir: PathLike,
    *,
    max_len: Optional[int] = None,
    max_lines: Optional[int] = None,
    shard_size: int = 100_000,
    chunk_size: int = 10_000,
    progress: bool = True,
) -> ShardedCorpus:
    """Encode a parallel corpus of any size into token-id shards (layout in the module docstring).

    The files are streamed with :func:`~fastseq.data.lines.iter_parallel` and encoded
    ``chunk_size`` pairs at a time exactly like :func:`~fastseq.data.batching.encode_pairs`;
    memory holds at most one shard plus one chunk, never the corpus. Everything is written into
    the temporary sibling directory ``{out_dir}.tmp-{pid}``, renamed to ``out_dir`` at the end:
    an interrupted run never leaves a partial ``out_dir`` (the temporary directory is removed on
    an exception; a killed process leaves it behind, to delete by hand).

    Args:
        src_path, tgt_path: aligned text files (gzip if the name ends in ``.gz``).
        src_tok, tgt_tok: tokenizers of the two sides; their sha256 is stored so that
            :meth:`ShardedCorpus.check_tokenizers` can reject other tokenizers later.
        out_dir: the directory to create; it must not exist.
        max_len: if given, pairs whose ``src_ids`` or ``tgt_ids`` (special ids included) are
            longer are dropped (and counted in ``meta.json``). At least 2.
        max_lines: if given, read only the first ``max_lines`` lines (quick runs, tests).
        shard_size: pairs per shard (the last shard may have fewer).
        chunk_size: pairs encoded per ``encode_batch`` call.
        progress: show a tqdm progress bar over the lines read.

    Pairs with an empty side are dropped (and counted). Ids are stored as uint16 when both
    vocabularies have at most 65536 ids, else int32. Dropped counts and speed are logged at
    INFO level.

    Returns:
        The :class:`ShardedCorpus` of ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` exists (checked before and after the work).
        ValueError: ``max_len < 2``, ``shard_size`` or ``chunk_size`` < 1, or the files are
            not valid UTF-8 or differ in line count (see ``iter_parallel``).
    """
    if max_len is not None and max_len < 2:
        raise ValueError(f"max_len must be >= 2 (tgt_ids has bos and eos) or None, got {max_len}")
    _check_positive("shard_size", shard_size)
    _check_positive("chunk_size", chunk_size)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another out_dir")
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp_dir.exists():  # left by a killed run of an earlier process with the same pid
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    try:
        meta = _write_corpus(src_path, tgt_path, src_tok, tgt_tok, tmp_dir, max_len, max_lines,
                             shard_size, chunk_size, progress)
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} was created while preprocessing into it")
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("wrote %d pairs in %d shards to %s", meta["num_pairs"], len(meta["shards"]),
                out_dir)
    return ShardedCorpus(out_dir)


def _write_corpus(
    src_path: PathLike,
    tgt_path: PathLike,
    src_tok: Tokenizer,
    tgt_tok: Tokenizer,
    directory: Path,
    max_len: Optional[int],
    max_lines: Optional[int],
    shard_size: int,
    chunk_size: int,
    progress: bool,
) -> dict[str, Any]:
    """The work of :func:`preprocess` inside ``directory``; returns the meta written."""
    small_vocab = max(src_tok.vocab_size, tgt_tok.vocab_size) <= UINT16_MAX_VOCAB
    dtype = np.dtype(np.uint16 if small_vocab else np.int32)
    writer = _ShardWriter(directory, shard_size)
    lines_read = dropped_empty = dropped_too_long = 0
    src_lines: list[str] = []
    tgt_lines: list[str] = []
    started = time.perf_counter()
    with tqdm(desc="preprocess", unit=" lines", unit_scale=True, disable=not progress) as bar:

        def flush() -> None:
            nonlocal dropped_too_long
            chunk, too_long = _encode_chunk(src_lines, tgt_lines, src_tok, tgt_tok, dtype, max_len)
            dropped_too_long += too_long
            writer.add(chunk)
            src_lines.clear()
            tgt_lines.clear()
            bar.update(lines_read - bar.n)

        for line_no, src, tgt in iter_parallel(src_path, tgt_path):
            if max_lines is not None and line_no > max_lines:
                break
            lines_read = line_no
            if not (src and tgt):
                dropped_empty += 1
                continue
            src_lines.append(src)
            tgt_lines.append(tgt)
            if len(src_lines) == chunk_size:
                flush()
        if src_lines:
            flush()
        bar.update(lines_read - bar.n)
    writer.finish()
    elapsed = time.perf_counter() - started
    num_pairs = sum(shard["num_pairs"] for shard in writer.shards)
    logger.info(
        "%s / %s: %d lines read, dropped %d pairs with an empty side and %d longer than "
        "max_len=%s; kept %d pairs in %.1f s (%.0f pairs/s)", src_path, tgt_path, lines_read,
        dropped_empty, dropped_too_long, max_len, num_pairs, elapsed,
        num_pairs / max(elapsed, 1e-9),
    )
    if not num_pairs:
        logger.warning("%s / %s: no pairs left to write", src_path, tgt_path)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "num_pairs": num_pairs,
        "shards": writer.shards,
        "dtype": dtype.name,
        "src_vocab_size": src_tok.vocab_size,
        "tgt_vocab_size": tgt_tok.vocab_size,
        "src_tokenizer_sha256": tokenizer_sha256(src_tok),
        "tgt_tokenizer_sha256": tokenizer_sha256(tgt_tok),
        "lines_read": lines_read,
        "dropped_empty": dropped_empty,
        "dropped_too_long": dropped_too_long,
        "max_len": max_len,
        "max_lines": max_lines,
        "source_files": [os.path.abspath(src_path), os.path.abspath(tgt_path)],
    }
    with open(directory / META_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return meta



# --------------------------------------------------------------------------- reading


def _pair_lengths(offsets: np.ndarray) -> np.ndarray:
    """``[n]`` int64 ``max(len(src_ids), len(tgt_ids))`` from ``[n + 1, 2]`` offsets."""
    return np.diff(offsets, axis=0).max(axis=1)


class Shard:
    """One shard, memory-mapped: its pairs are read from disk only when indexed.

    Attributes:
        index: the shard number.
        start: global index of the shard's first pair (pairs of earlier shards).
        src: ``[src_tokens]`` memmap (uint16 or int32), every ``src_ids`` concatenated.
        tgt: ``[tgt_tokens]`` memmap, every ``tgt_ids`` concatenated.
        offsets: ``[n + 1, 2]`` int64 memmap, column 0 into ``src``, column 1 into ``tgt``.
    """

    def __init__(self, index: int, start: int, src: np.ndarray, tgt: np.ndarray,
                 offsets: np.ndarray) -> None:
        self.index = index
        self.start = start
        self.src = src
        self.tgt = tgt
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """``[n]`` int64 ``max(len(src_ids), len(tgt_ids))`` of each pair (reads the offsets)."""
        return _pair_lengths(np.asarray(self.offsets))

    def example(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """``(src_ids, tgt_ids)`` of local pair ``j``, as 1-D arrays of the shard's dtype.

        Raises:
            IndexError: ``j`` is not in ``[0, len(self))``.
        """
        if not 0 <= j < len(self):
            raise IndexError(f"pair {j} out of range for shard {self.index} of {len(self)} pairs")
        (src_start, tgt_start), (src_end, tgt_end) = self.offsets[j], self.offsets[j + 1]
        return np.array(self.src[src_start:src_end]), np.array(self.tgt[tgt_start:tgt_end])


class ShardedCorpus:
    """A corpus written by :func:`preprocess`, opened read-only.

    Args:
        directory: the ``out_dir`` of :func:`preprocess`.

    Attributes:
        directory: as given, a Path.
        meta: the parsed ``meta.json`` (counts, dtype, vocab sizes, tokenizer hashes, ...).
        num_pairs: pairs in all shards.
        num_shards: number of shards.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: ``meta.json`` is missing or not valid JSON, is not of format
            ``fastseq.shards`` version 1, lacks a field or has one of the wrong type, its counts
            disagree, or a shard file is missing (each message names the directory).
    """

    def __init__(self, directory: PathLike) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"sharded corpus directory {self.directory} does not exist")
        self.meta = self._read_meta()
        shards = self.meta["shards"]
        self.num_pairs: int = self.meta["num_pairs"]
        self.num_shards = len(shards)
        self._starts = [0, *itertools.accumulate(shard["num_pairs"] for shard in shards)]

    def _read_meta(self) -> dict[str, Any]:
        path = self.directory / META_FILE
        if not path.is_file():
            raise ValueError(
                f"{self.directory} is not a preprocessed corpus: it has no {META_FILE}"
            )
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{path}: format is {found!r}, expected {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path}: version {meta.get('version')!r}, this fastseq reads "
                             f"version {VERSION}")
        for field, types in _META_FIELDS.items():
            if field not in meta:
                raise ValueError(f"{path}: missing field {field!r}")
            if not isinstance(meta[field], types):
                raise ValueError(f"{path}: field {field!r} is {meta[field]!r}, of the wrong type")
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: dtype {meta['dtype']!r}, expected one of {_DTYPES}")
        for i, shard in enumerate(meta["shards"]):
            missing = [f for f in _SHARD_FIELDS if not isinstance(shard, dict) or f not in shard]
            if missing:
                raise ValueError(f"{path}: shard {i} lacks {missing}")
            for kind in ("src", "tgt", "offsets"):
                file = self.directory / f"{shard['name']}.{kind}.npy"
                if not file.is_file():
                    raise ValueError(f"{self.directory}: shard file {file.name} is missing")
        total = sum(shard["num_pairs"] for shard in meta["shards"])
        if total != meta["num_pairs"]:
            raise ValueError(f"{path}: num_pairs is {meta['num_pairs']} but the shards hold "
                             f"{total} pairs")
        return meta

    def _check_shard(self, i: int) -> None:
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range, {self.directory} has {self.num_shards}")

    def _load(self, i: int, kind: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """Memory-map one file of (existing) shard ``i``; check its shape and dtype."""
        file = self.directory / f"{self.meta['shards'][i]['name']}.{kind}.npy"
        array = np.load(file, mmap_mode="r")
        if array.shape != shape or array.dtype != np.dtype(dtype):
            raise ValueError(f"{file}: shape {array.shape} dtype {array.dtype}, expected "
                             f"shape {shape} dtype {dtype} from {META_FILE}")
        return array

    def _offsets(self, i: int) -> np.ndarray:
        """The offsets memmap of shard ``i``, checked against meta.json (shape, first, last)."""
        self._check_shard(i)
        info = self.meta["shards"][i]
        offsets = self._load(i, "offsets", (info["num_pairs"] + 1, 2), "int64")
        ends = (info["src_tokens"], info["tgt_tokens"])
        if tuple(offsets[0]) != (0, 0) or tuple(offsets[-1]) != ends:
            raise ValueError(f"{self.directory / info['name']}.offsets.npy: offsets run from "
                             f"{offsets[0].tolist()} to {offsets[-1].tolist()}, expected [0, 0] "
                             f"to {list(ends)} from {META_FILE}")
        return offsets

    def shard_start(self, i: int) -> int:
        """Global index of the first pair of shard ``i`` (the pairs of the shards before it).

        Raises:
            IndexError: no shard ``i``.
        """
        self._check_shard(i)
        return self._starts[i]

    def shard_lengths(self, i: int) -> np.ndarray:
        """``[n]`` int64 ``max(len(src_ids), len(tgt_ids))`` of each pair of shard ``i``.

        Only the shard's offsets are read.

        Raises:
            IndexError: no shard ``i``.
            ValueError: the offsets file does not match ``meta.json``.
        """
        return _pair_lengths(np.asarray(self._offsets(i)))

    def open_shard(self, i: int) -> Shard:
        """Memory-map shard ``i``; pages are read on access and released with the Shard.

        Raises:
            IndexError: no shard ``i``.
            ValueError: a file's shape or dtype does not match ``meta.json``.
        """
        offsets = self._offsets(i)
        info, dtype = self.meta["shards"][i], self.meta["dtype"]
        src = self._load(i, "src", (info["src_tokens"],), dtype)
        tgt = self._load(i, "tgt", (info["tgt_tokens"],), dtype)
        return Shard(i, self.shard_start(i), src, tgt, offsets)

    def check_tokenizers(self, src_tok: Tokenizer, tgt_tok: Tokenizer) -> None:
        """Check that these are the tokenizers the corpus was encoded with (by sha256).

        Raises:
            ValueError: a tokenizer differs (the message names the side and both hashes).
        """
        for side, tokenizer in (("src", src_tok), ("tgt", tgt_tok)):
            expected, actual = self.meta[f"{side}_tokenizer_sha256"], tokenizer_sha256(tokenizer)
            if actual != expected:
                raise ValueError(
                    f"{self.directory} was encoded with a different {side} tokenizer "
                    f"(sha256 {expected[:12]}..., given {actual[:12]}...); use the tokenizer "
                    "it was preprocessed with, or preprocess again"
                )

