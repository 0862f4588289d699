"""Text files line by line: plain or gzip, UTF-8, with errors that name the file and line.

Every reader here splits on ``"\\n"`` only and strips surrounding whitespace from each line:

* :func:`read_text`: a whole file as it is (no splitting, no stripping: a language model's corpus);
* :func:`read_lines`, :func:`read_parallel`: a whole file (or two aligned files) in memory;
* :func:`iter_lines`, :func:`iter_parallel`: streamed in blocks of ``LINE_BLOCK`` lines, for
  files of any size;
* :func:`sample_lines`, :func:`sample_pairs`: a bounded uniform sample in one streaming pass
  (to train a tokenizer on a huge corpus);
* :func:`open_binary` and :func:`read_block`: the building blocks of the streaming readers.

Errors: a missing file raises ``FileNotFoundError``; invalid UTF-8, a truncated or corrupted
gzip file, and aligned files of different lengths raise ``ValueError`` naming the file(s) and
the line.
"""
from __future__ import annotations

import gzip
import itertools
import logging
import os
import random
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

import numpy as np

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Pair = tuple[str, str]


def read_text(path: PathLike) -> str:
    """The whole of a UTF-8 text file (gzip-compressed if its name ends in ``.gz``), unchanged:
    no line splitting, no stripping.

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
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_number = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: invalid UTF-8 on line {line_number} ({err.reason})") from err


def read_lines(path: PathLike) -> list[str]:
    """Read a UTF-8 text file (gzip-compressed if its name ends in ``.gz``), one string per line.

    Lines are split on ``"\\n"`` only and stripped of surrounding whitespace; a final newline does
    not produce an extra empty line.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not valid UTF-8 (the message names the file and the line number),
            or a gzip file is truncated or corrupted.
    """
    text = read_text(path)
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
    with open_binary(src_path) as src_file, open_binary(tgt_path) as tgt_file:
        line_number = 0  # lines yielded so far
        while True:
            src_lines = read_block(src_file, src_path, line_number + 1)
            tgt_lines = read_block(tgt_file, tgt_path, line_number + 1)
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


def iter_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """Stream one text file, for files too large for :func:`read_lines`.

    The file is read like in :func:`iter_parallel` (blocks of ``LINE_BLOCK`` lines, memory
    bounded by one block).

    Yields:
        ``(line number, line)``: the 1-based line number and the line stripped of surrounding
        whitespace; empty lines are yielded too.

    Raises:
        FileNotFoundError: the file does not exist (raised on the first ``next()``).
        ValueError: a line is not valid UTF-8 (the message names the file and the line number),
            or a gzip file is truncated or corrupted.
    """
    path = Path(path)
    with open_binary(path) as file:
        line_number = 0  # lines yielded so far
        while lines := read_block(file, path, line_number + 1):
            yield from zip(itertools.count(line_number + 1), lines)
            line_number += len(lines)


def _gzip_message(path: Path, line: int, err: BaseException) -> str:
    return (f"{path}: cannot read past line {line - 1}: the file is truncated or not valid gzip "
            f"({type(err).__name__}: {err})")


def open_binary(path: PathLike) -> BinaryIO:
    """``path`` opened for binary reading, through gzip if its name ends in ``.gz``."""
    path = Path(path)
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_block(file: BinaryIO, path: Path, first_line: int) -> list[str]:
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


# --------------------------------------------------------------------------- sampling


def sample_lines(path: PathLike, n: int, seed: int = 0) -> list[str]:
    """A uniform random sample of at most ``n`` non-empty lines of a text file.

    Reservoir sampling (Algorithm R) over one streaming pass: memory is ``O(n)`` lines whatever
    the file size, so a tokenizer can be trained on a bounded sample of a huge corpus
    (``train_tokenizer(sample_lines(path, 2_000_000), ...)``).

    Args:
        path: UTF-8 text file, gzip-compressed if its name ends in ``.gz``.
        n: sample size; a file with at most ``n`` non-empty lines is returned whole, in order.
        seed: the same (file, n, seed) always gives the same sample.

    Returns:
        The sampled lines, stripped of surrounding whitespace, never empty.

    Raises:
        ValueError: ``n`` is negative, or a line is not valid UTF-8 (the message names the file
            and the line number).
    """
    if n < 0:
        raise ValueError(f"sample size n must be >= 0, got {n}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    reservoir: list[str] = []
    seen = 0  # non-empty lines before the current block
    next_line = 1
    with open_binary(path) as file:
        while lines := read_block(file, path, next_line):
            next_line += len(lines)
            candidates = [line for line in lines if line]
            filled = min(n - len(reservoir), len(candidates))
            reservoir += candidates[:filled]
            candidates = candidates[filled:]
            seen += filled
            if not candidates:
                continue
            # Candidate i is non-empty line number seen + i (0-based): it replaces slot j, drawn
            # uniformly from [0, seen + i], if j < n. Applied in order, as in the serial loop.
            slots = rng.integers(0, seen + 1 + np.arange(len(candidates)))
            for i in np.flatnonzero(slots < n).tolist():
                reservoir[slots[i]] = candidates[i]
            seen += len(candidates)
    return reservoir


def sample_pairs(src_path: PathLike, tgt_path: PathLike, n: int, limit: int = 0,
                 seed: int = 0) -> list[Pair]:
    """A uniform sample (reservoir, Vitter's algorithm R) of at most ``n``
    non-empty pairs among the first ``limit`` lines (0: all), in O(n) memory.
    With ``n`` at least the number of pairs, all of them in file order.

    Raises:
        ValueError: ``n < 1`` or ``limit < 0``; the files' own errors (see ``iter_parallel``).
    """
    if n < 1 or limit < 0:
        raise ValueError(f"sample_pairs: expected n >= 1 and limit >= 0, got n={n}, limit={limit}")
    rng = random.Random(seed)
    sample: list[Pair] = []
    seen = 0
    for line_no, src, tgt in iter_parallel(src_path, tgt_path):
        if limit and line_no > limit:
            break
        if not (src and tgt):
            continue
        if len(sample) < n:
            sample.append((src, tgt))
        else:
            j = rng.randrange(seen + 1)
            if j < n:
                sample[j] = (src, tgt)
        seen += 1
    return sample
