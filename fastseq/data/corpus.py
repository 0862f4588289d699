"""Parallel corpora on disk: which files hold which split, and the embedded Multi30k.

    corpus = load_corpus("multi30k")                  # German -> English, bundled with fastseq
    corpus = load_corpus("data/tatoeba_deu_eng")      # {split}.{lang}[.gz] files in a directory
    train_pairs = corpus.read("train")                # [(source, target), ...]
    src_path, tgt_path = corpus.splits["train"]       # for the streaming readers

Files are read with :mod:`fastseq.data.lines` (UTF-8, gzip if named ``*.gz``, errors naming
the file and line).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from fastseq.data.lines import Pair, read_parallel

MULTI30K_DIR = Path(__file__).resolve().parent / "multi30k"
# Normalised split name -> file stems accepted for it.
_MULTI30K_STEMS = {"train": ("train",), "val": ("val",), "test": ("test2016",)}
_DIRECTORY_STEMS = {"train": ("train",), "val": ("val", "valid", "dev"), "test": ("test",)}


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

