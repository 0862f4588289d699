"""Argument checks shared by the public ops and modules.

Every error names the argument, the expected and the actual value, in the
form ``"name: expected X, got Y"``.

Value checks on integer tensors (``lengths``) need the values on the host. For
a CPU tensor that is free; for a device tensor it is one device-to-host sync,
so the result is cached per tensor object (a weak reference: the cache never
keeps a tensor alive). A decoder passes the same ``lengths`` at every step,
so the sync happens once per source batch, not per step. A tensor passed in
as ``lengths`` is treated as immutable from then on; under
``torch.compile`` value checks are skipped (they are data-dependent).
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

_INT_DTYPES = (torch.int32, torch.int64)

# id(tensor) -> (weak reference, min, max) of integer tensors already looked at.
_RANGES: Dict[int, Tuple["weakref.ref[Tensor]", int, int]] = {}


def tensor(name: str, t) -> Tensor:
    """``t`` if it is a Tensor, else TypeError naming ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    return t


def optional_tensor(name: str, t) -> Optional[Tensor]:
    """``t`` if it is None or a Tensor, else TypeError naming ``name``."""
    if t is not None and not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor or None, got {type(t).__name__}")
    return t


def value_range(t: Tensor) -> Tuple[int, int]:
    """(min, max) of a non-empty integer tensor; cached per tensor object."""
    key = id(t)
    hit = _RANGES.get(key)
    if hit is not None and hit[0]() is t:
        return hit[1], hit[2]
    mn, mx = torch.aminmax(t)
    lo, hi = int(mn), int(mx)
    _remember(t, lo, hi)
    return lo, hi


def _remember(t: Tensor, lo: int, hi: int) -> None:
    key = id(t)
    try:
        ref = weakref.ref(t, lambda _r, key=key: _forget(key, _r))
    except TypeError:  # pragma: no cover - tensors support weak references
        return
    _RANGES[key] = (ref, lo, hi)


def _forget(key: int, ref) -> None:
    hit = _RANGES.get(key)
    if hit is not None and hit[0] is ref:
        del _RANGES[key]


def lengths_layout(name: str, t, B: int, device: torch.device) -> None:
    """Check that ``t`` is an int32/int64 tensor of shape ``(B,)`` on the CPU or ``device``
    (its values are not looked at).

    Raises:
        TypeError: not a tensor, or not int32/int64. ValueError: wrong shape.
        RuntimeError: on a device other than the CPU and ``device``.
    """
    tensor(name, t)
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: expected an int32/int64 tensor, got {t.dtype}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name}: expected shape ({B},), got {tuple(t.shape)}")
    if t.device.type != "cpu" and t.device != device:
        where = "a CPU tensor" if device.type == "cpu" else f"a CPU tensor or one on {device}"
        raise RuntimeError(f"{name}: expected {where}, got a tensor on {t.device}")


def lengths(name: str, t, B: int, T: int, device: torch.device, what: str = "T") -> Optional[Tensor]:
    """Validate sequence lengths and return them on ``device`` (None stays None).

    ``t`` must be an int32/int64 tensor of shape ``(B,)`` on the CPU or on
    ``device``, with every value in ``[1, T]`` (``what`` names the bound in the
    message). Any order is fine (sorted or not). A CPU tensor is checked on the
    CPU before it is moved, so the check costs no device sync; the moved copy
    is remembered as checked.

    Raises:
        TypeError: not a tensor, or not int32/int64.
        ValueError: wrong shape, or a value < 1 or > T.
        RuntimeError: on a device other than the CPU and ``device``.
    """
    if t is None:
        return None
    lengths_layout(name, t, B, device)
    if B == 0 or torch.compiler.is_compiling() or t.device.type == "meta" or device.type == "meta":
        return t if t.device == device or device.type == "meta" else t.to(device)
    lo, hi = value_range(t)
    if lo < 1:
        raise ValueError(f"{name}: expected every length >= 1, got {lo} "
                         f"(at index {int((t < 1).nonzero()[0, 0])})")
    if hi > T:
        raise ValueError(f"{name}: expected every length <= {what} = {T}, got {hi} "
                         f"(at index {int((t > T).nonzero()[0, 0])})")
    if t.device == device:
        return t
    moved = t.to(device)
    _remember(moved, lo, hi)
    return moved
