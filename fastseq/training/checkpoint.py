"""Checkpoints: written atomically, read without executing code, checked by a digest.

A checkpoint is a dict saved with ``torch.save``: ``format`` (which model it is
for, e.g. ``"fastseq.seq2seq"``: :attr:`fastseq.training.task.Task.checkpoint_format`),
``version`` (of this container), ``digest`` and the payload: what the task
stores so inference needs nothing else (model config, state_dict, tokenizers)
and, in ``last.pt``, the full training state (:mod:`fastseq.training.trainer`).
It is loaded with ``torch.load(weights_only=True)``, so a checkpoint file
cannot run code.

Integrity: ``torch.load`` does not verify the zip's CRCs, so a flipped bit in
tensor data loads silently as a different number. Each checkpoint therefore
carries a SHA-256 ``digest`` of its contents (every tensor's bytes, dtype and
shape, every string and number, in order), recomputed on load; a mismatch is
reported as a corrupted file. Checkpoints without a digest (written before
0.2) load unchecked.

``--resume`` reads ``last.pt`` through :func:`load_resume_checkpoint`, which
falls back to ``last.prev.pt`` (the state before, kept by
``save_checkpoint(keep_previous=...)``) when ``last.pt`` is missing or damaged.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from fastseq.fileio import atomic_write, link_atomic

logger = logging.getLogger(__name__)

FORMAT_PREFIX = "fastseq."  # every fastseq checkpoint's format starts with it
VERSION = 1


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    """Hash ``obj`` (nested dicts/lists/tuples of tensors, arrays, bytes, str,
    numbers, bools, None) canonically: type tags and lengths, so different
    structures never hash alike."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(b"T" + str(t.dtype).encode() + struct.pack("<q", t.dim())
                 + struct.pack(f"<{t.dim()}q", *t.shape))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, np.ndarray):
        _feed(h, torch.from_numpy(np.ascontiguousarray(obj)))
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<q", len(obj)))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<q", len(obj)))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"B" + struct.pack("<q", len(obj)) + bytes(obj))
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"S" + struct.pack("<q", len(data)) + data)
    elif obj is None or isinstance(obj, (bool, int, float, torch.dtype, torch.device)):
        h.update(b"V" + repr(obj).encode())
    else:  # anything else torch.load(weights_only=True) can return
        h.update(b"R" + type(obj).__name__.encode() + repr(obj).encode())


def digest(payload: Dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's contents, the ``digest`` entry excluded."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "digest"})
    return h.hexdigest()


def save_checkpoint(path: Union[str, os.PathLike], payload: Dict[str, Any],
                    keep_previous: Optional[Union[str, os.PathLike]] = None, *, format: str) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same
    directory, flushed and fsynced, then ``os.replace`` (and the directory
    fsynced). A crash or a kill mid-write leaves the previous file at ``path``
    intact. The file carries a digest of its contents (see the module docstring).

    Args:
        format: what the checkpoint is for, ``"fastseq.<model>"`` (e.g.
            ``"fastseq.seq2seq"``); :func:`load_checkpoint` can require it.
        keep_previous: if given and ``path`` exists, ``path``'s current file is
            first linked there (atomically), so one older good state survives
            even if the new file is later damaged.

    Raises:
        OSError: the file cannot be written (e.g. the disk is full); the
            previous file at ``path`` is then left as it was.
        ValueError: ``format`` does not start with ``"fastseq."``.
    """
    if not format.startswith(FORMAT_PREFIX):
        raise ValueError(f"checkpoint format {format!r}: expected a name starting with {FORMAT_PREFIX!r}")
    full = {"format": format, "version": VERSION, **payload}
    full["digest"] = digest(full)
    if keep_previous is not None and Path(path).is_file():
        link_atomic(path, keep_previous)
    with atomic_write(path) as f:
        torch.save(full, f)


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu",
                    format: Optional[str] = None) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain
    data only, so loading a checkpoint never runs code from it.

    Args:
        format: the checkpoint must be of this format (e.g. ``"fastseq.seq2seq"``);
            None accepts any fastseq checkpoint.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable fastseq checkpoint (truncated,
            corrupted, its digest does not match, holds objects other than
            tensors and plain data, or is another format); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"checkpoint {path} cannot be read, it is truncated, corrupted or not a "
                         f"checkpoint ({type(exc).__name__}: {first[:300]})") from None
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if format is not None and found != format:
        raise ValueError(f"checkpoint {path} is not a {format} checkpoint"
                         + (f" (it is a {found} checkpoint)" if isinstance(found, str) else ""))
    if not (isinstance(found, str) and found.startswith(FORMAT_PREFIX)):
        raise ValueError(f"checkpoint {path} is not a fastseq checkpoint")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"checkpoint {path}: format version {ckpt.get('version')} is not supported (expected {VERSION})")
    if "digest" in ckpt:
        try:
            actual = digest(ckpt)
        except Exception as exc:  # noqa: BLE001 - a corrupted structure
            actual = f"unhashable ({type(exc).__name__})"
        if actual != ckpt["digest"]:
            raise ValueError(f"checkpoint {path} is corrupted: its contents do not match the digest "
                             f"written with it (expected {str(ckpt['digest'])[:16]}..., got {actual[:16]}...)")
    return ckpt


def load_resume_checkpoint(out: Union[str, os.PathLike], format: str) -> Dict[str, Any]:
    """The checkpoint ``--resume`` continues from: ``{out}/last.pt``, or
    ``last.prev.pt`` (with a warning) when ``last.pt`` is missing or unreadable.

    Args:
        out: the run's output directory.
        format: the task's checkpoint format.

    Raises:
        FileNotFoundError: neither file exists.
        ValueError: neither is a readable checkpoint of ``format`` with training
            state (the message gives each file's error).
    """
    out = Path(out)
    errors = []
    for name in ("last.pt", "last.prev.pt"):
        path = out / name
        if not path.is_file():
            errors.append(f"{path}: no such file")
            continue
        try:
            ckpt = load_checkpoint(path, format=format)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if ckpt.get("state") is None:
            errors.append(f"{path} holds no training state")
            continue
        if errors:
            logger.warning("--resume: %s; resuming from %s (step %d) instead", "; ".join(errors),
                           path, ckpt["step"])
        return ckpt
    if all(e.endswith("no such file") for e in errors):
        raise FileNotFoundError(f"--resume: no checkpoint at {out / 'last.pt'}")
    raise ValueError("--resume: no usable checkpoint: " + "; ".join(errors))


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
