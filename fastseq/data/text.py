"""Plain-text corpora for language models: the embedded Tiny Shakespeare, or any text files.

    corpus = load_text("tinyshakespeare")              # bundled with fastseq (public domain)
    corpus = load_text(["novel1.txt", "novel2.txt.gz"])  # any UTF-8 files, each one document
    train_text, val_text = corpus.documents[0][:n], ...  # see fastseq.lm.task for the split

Files are read whole and unchanged (no line splitting or stripping) with
:func:`fastseq.data.lines.read_text`: UTF-8, gzip if named ``*.gz``, errors
naming the file and line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Tuple, Union

from fastseq.data.lines import read_text

TINY_SHAKESPEARE = Path(__file__).resolve().parent / "tinyshakespeare" / "input.txt.gz"
EMBEDDED = {"tinyshakespeare": (TINY_SHAKESPEARE,)}


@dataclass(frozen=True)
class TextCorpus:
    """The documents of a text corpus, in order.

    Attributes:
        name: ``"tinyshakespeare"`` or the files' paths joined by ``","``.
        paths: the files read, one document each.
        documents: the text of each file, unchanged.
    """

    name: str
    paths: Tuple[Path, ...]
    documents: Tuple[str, ...]

    @property
    def num_characters(self) -> int:
        """Characters over all documents."""
        return sum(len(d) for d in self.documents)


def load_text(spec: Union[str, Sequence[str]]) -> TextCorpus:
    """Read a text corpus.

    Args:
        spec: ``"tinyshakespeare"`` (embedded; 1,115,394 characters, see
            ``fastseq/data/tinyshakespeare/README.md``), a path, a comma-separated list of
            paths, or a sequence of paths. Each file is one document.

    Raises:
        FileNotFoundError: a path that is not a file (the message names it).
        ValueError: no path given, a file that is not valid UTF-8 or a broken gzip file
            (naming the file and line), or a corpus with no characters at all.
    """
    if isinstance(spec, str):
        if spec in EMBEDDED:
            paths = EMBEDDED[spec]
        else:
            paths = tuple(Path(p.strip()).expanduser() for p in spec.split(",") if p.strip())
    else:
        paths = tuple(Path(p).expanduser() for p in spec)
    if not paths:
        raise ValueError(f"corpus: expected 'tinyshakespeare' or one or more text files, got {spec!r}")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"corpus: {p} is not a file (expected 'tinyshakespeare' or text files)")
    documents = tuple(read_text(p) for p in paths)
    name = spec if isinstance(spec, str) and spec in EMBEDDED else ",".join(str(p) for p in paths)
    corpus = TextCorpus(name=name, paths=paths, documents=documents)
    if corpus.num_characters == 0:
        raise ValueError(f"corpus {name!r}: the file(s) hold no text")
    return corpus
