"""Checkpoints: written atomically, read without executing code.

A checkpoint is a dict saved with ``torch.save``; it holds the model config,
the state_dict, both tokenizers (sentencepiece model bytes) and metadata, so
``fastseq translate`` needs nothing else. It is loaded with
``torch.load(weights_only=True)``, so a checkpoint file cannot run code.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from fastseq._io import atomic_write

FORMAT = "fastseq.seq2seq"
VERSION = 1


def save_checkpoint(path: Union[str, os.PathLike], payload: Dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same
    directory, flushed and fsynced, then ``os.replace``. A crash mid-write
    leaves the previous file at ``path`` intact."""
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, f)


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable fastseq checkpoint (truncated,
            corrupted, or another format); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a {FORMAT} checkpoint")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"checkpoint {path}: format version {ckpt.get('version')} is not supported (expected {VERSION})")
    return ckpt


def rng_state() -> Dict[str, Any]:
    """The random states a training step draws from (Python, numpy, torch CPU and
    CUDA), in a form ``torch.load(weights_only=True)`` reads back."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
