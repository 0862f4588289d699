"""Prepared-data directories: made once, reused by later runs only when made with the same settings.

A model's data preparation (tokenizers trained, corpus encoded into shards) writes its files
into ``data_dir`` and, last, ``settings.json``: what the data depends on (source files,
vocabulary sizes, length limit, seed, ...). A later run calls :func:`is_prepared` with its own
settings: it reuses the directory if they match and refuses it, naming the settings that
differ, if not::

    if not is_prepared(data_dir, settings):
        ...  # train tokenizers, preprocess, write the files
        write_settings(data_dir, settings)
    require_files(data_dir, ["src.model", "tgt.model"])
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from fastseq.data.lines import PathLike
from fastseq.fileio import atomic_write

SETTINGS_FILE = "settings.json"


def is_prepared(data_dir: PathLike, settings: Mapping[str, Any], marker: str = "meta.json") -> bool:
    """Whether ``data_dir`` holds data prepared with ``settings``.

    Args:
        data_dir: the directory.
        settings: JSON-serialisable values the data depends on.
        marker: the file whose presence means the data was prepared.

    Returns:
        False if ``marker`` is absent (nothing prepared yet), True if the data was prepared
        with these settings.

    Raises:
        ValueError: the data was prepared with other settings (the message names them).
    """
    data_dir = Path(data_dir)
    if not (data_dir / marker).is_file():
        return False
    path = data_dir / SETTINGS_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    changed = sorted(k for k in settings if old.get(k) != settings[k])
    if changed:
        raise ValueError(
            f"data_dir {data_dir} was prepared with other settings ({', '.join(changed)}); "
            "delete it or choose another data_dir"
        )
    return True


def write_settings(data_dir: PathLike, settings: Mapping[str, Any]) -> None:
    """Write ``settings.json`` (atomically); call it once every other file is written."""
    with atomic_write(Path(data_dir) / SETTINGS_FILE) as f:
        f.write(json.dumps(settings, indent=2).encode("utf-8"))


def require_files(data_dir: PathLike, names: Iterable[str]) -> None:
    """Check that a prepared ``data_dir`` has every file of ``names`` (and ``settings.json``).

    Raises:
        ValueError: some are missing (the message lists them).
    """
    data_dir = Path(data_dir)
    missing = [n for n in (*names, SETTINGS_FILE) if not (data_dir / n).is_file()]
    if missing:
        raise ValueError(f"data_dir {data_dir}: {', '.join(missing)} missing (interrupted preparation?); "
                         "delete the directory and run again")
