"""Argument checks shared by the ops and the nn modules, and the errors they raise.

Every error names the argument, the expected and the actual value, in the form
``"name: expected X, got Y"``, and is an instance of the exception class
torch.nn raises for the same input, so code written against torch.nn catches it:

=====================================================  ===========================================
what is wrong                                          class
=====================================================  ===========================================
an argument that is not a tensor (or not a tuple)      :class:`ArgumentTypeError` -- a TypeError,
                                                       also an AttributeError and an IndexError,
                                                       what torch.nn happens to raise there
an ``hx`` tuple with the wrong number of states        :class:`ArgumentCountError` -- a
                                                       RuntimeError, also an IndexError (torch.nn
                                                       raises either, by the length)
the rank of a module's ``input``; the dtype of a       ValueError (as torch.nn)
GRU/LSTM ``input`` against its parameters; an
invalid combination (``mask`` and ``lengths``)
any other size, rank, dtype or device; ``lengths`` or  RuntimeError (as torch.nn and ATen)
``mask`` values; a sequence of length 0
=====================================================  ===========================================

Where fastseq checks more than torch.nn (``lengths`` values, a mask row with
no valid position, mixed ``h``/``c`` dtypes in an LSTMCell), it raises the
class torch uses for that kind of error (RuntimeError).

Value checks on integer tensors (``lengths``) and masks need the values on the
host. For a CPU tensor that is free; for a device tensor it is one
device-to-host sync, so the result is cached per tensor object *and version*
(:attr:`torch.Tensor._version` counts in-place writes): a decoder passes the
same ``lengths`` or mask at every step and pays the sync once per source
batch, and a tensor refilled in place is checked again. Tensors made under
``torch.inference_mode`` have no version counter and are checked at every
call. Under ``torch.compile`` value checks are skipped (they are data-dependent).
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

INT_DTYPES = (torch.int32, torch.int64)


class ArgumentTypeError(TypeError, AttributeError, IndexError):
    """An argument of the wrong Python type (not a tensor, not a tuple).

    A TypeError; also an AttributeError and an IndexError, which is what torch.nn
    raises for the same calls (``'list' object has no attribute 'dim'``), so code
    written against torch.nn still catches it.
    """


class ArgumentCountError(RuntimeError, IndexError):
    """A tuple argument with the wrong number of tensors (an LSTM's ``hx``).

    A RuntimeError, as torch.nn raises for a tuple that is too long; also an
    IndexError, as torch.nn raises for one that is too short.
    """


# ------------------------------------------------------------------ arguments


def tensor(name: str, t) -> Tensor:
    """``t`` if it is a Tensor, else :class:`ArgumentTypeError` naming ``name``."""
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    return t


def optional_tensor(name: str, t) -> Optional[Tensor]:
    """``t`` if it is None or a Tensor, else :class:`ArgumentTypeError` naming ``name``."""
    if t is not None and not isinstance(t, Tensor):
        raise ArgumentTypeError(f"{name}: expected a Tensor or None, got {type(t).__name__}")
    return t


def state_pair(hx, what: str, names: Tuple[str, str]) -> Tuple[Tensor, Tensor]:
    """An LSTM's ``hx``: a tuple (or list) of two tensors, else the error torch.nn's class
    for it (``what``: e.g. ``"(h_0, c_0) for LSTM"``; ``names``: the two tensors' names)."""
    if not isinstance(hx, (tuple, list)):
        raise ArgumentTypeError(f"hx: expected a tuple {what}, got {type(hx).__name__}")
    if len(hx) != 2:
        raise ArgumentCountError(f"hx: expected a tuple {what}, got a {type(hx).__name__} of length {len(hx)}")
    return tensor(names[0], hx[0]), tensor(names[1], hx[1])


def shape(name: str, t: Tensor, expected: Sequence[int], what: str = "") -> None:
    """RuntimeError unless ``t.shape == expected`` (``what``: how the expected shape reads, e.g. "(B, H) = ")."""
    if tuple(t.shape) != tuple(expected):
        raise RuntimeError(f"{name}: expected shape {what}{tuple(expected)}, got {tuple(t.shape)}")


def like(name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    """RuntimeError unless ``t`` has ``ref``'s dtype and device."""
    if t.dtype != ref.dtype:
        raise RuntimeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise RuntimeError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")


def floating(name: str, t: Tensor, exc=RuntimeError) -> None:
    """``exc`` unless ``t`` has a floating-point dtype."""
    if not t.is_floating_point():
        raise exc(f"{name}: expected a floating-point dtype, got {t.dtype}")


# ------------------------------------------------------------ integer values

# id(tensor) -> (weak reference, version, min, max) of integer tensors already looked at.
_RANGES: Dict[int, Tuple["weakref.ref[Tensor]", int, int, int]] = {}
# id(mask) -> (weak reference, version) of masks already checked for empty rows.
_MASKS: Dict[int, Tuple["weakref.ref[Tensor]", int]] = {}


def _version(t: Tensor) -> Optional[int]:
    """``t._version``, or None for a tensor without a version counter (inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _cached(cache: Dict[int, tuple], t: Tensor) -> Optional[tuple]:
    hit = cache.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] is not None and hit[1] == _version(t):
        return hit
    return None


def _remember(cache: Dict[int, tuple], t: Tensor, *values) -> None:
    version = _version(t)
    if version is None:
        return
    key = id(t)

    def forget(ref, key=key):
        hit = cache.get(key)
        if hit is not None and hit[0] is ref:
            del cache[key]

    cache[key] = (weakref.ref(t, forget), version, *values)


def value_range(t: Tensor) -> Tuple[int, int]:
    """(min, max) of a non-empty integer tensor; cached per tensor object and version."""
    hit = _cached(_RANGES, t)
    if hit is not None:
        return hit[2], hit[3]
    mn, mx = torch.aminmax(t)
    lo, hi = int(mn), int(mx)
    _remember(_RANGES, t, lo, hi)
    return lo, hi


def _skip_values(*ts: Tensor) -> bool:
    return torch.compiler.is_compiling() or any(t.device.type == "meta" for t in ts)


def lengths_layout(name: str, t, B: int, device: torch.device) -> None:
    """Check that ``t`` is an int32/int64 tensor of shape ``(B,)`` on the CPU or ``device``
    (its values are not looked at).

    Raises:
        ArgumentTypeError: not a tensor. RuntimeError: not int32/int64, a wrong
        shape, or on a device other than the CPU and ``device``.
    """
    tensor(name, t)
    if t.dtype not in INT_DTYPES:
        raise RuntimeError(f"{name}: expected an int32/int64 tensor, got {t.dtype}")
    if tuple(t.shape) != (B,):
        raise RuntimeError(f"{name}: expected shape ({B},), got {tuple(t.shape)}")
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
        ArgumentTypeError: not a tensor. RuntimeError: not int32/int64, a wrong
        shape, a value < 1 or > T, or on a device other than the CPU and ``device``.
    """
    if t is None:
        return None
    lengths_layout(name, t, B, device)
    if B == 0 or _skip_values(t) or device.type == "meta":
        return t if t.device == device or device.type == "meta" else t.to(device)
    lo, hi = value_range(t)
    if lo < 1:
        raise RuntimeError(f"{name}: expected every length >= 1, got {lo} "
                           f"(at index {int((t < 1).nonzero()[0, 0])})")
    if hi > T:
        raise RuntimeError(f"{name}: expected every length <= {what} = {T}, got {hi} "
                           f"(at index {int((t > T).nonzero()[0, 0])})")
    if t.device == device:
        return t
    moved = t.to(device)
    _remember(_RANGES, moved, lo, hi)
    return moved


def batch_sizes(name: str, t, B: int, N: int) -> None:
    """Validate a PackedSequence's ``batch_sizes`` for a packed recurrence of ``N``
    rows and ``B`` sequences: an int64 CPU tensor ``[T]``, T >= 1, non-increasing,
    every value in ``[1, B]``, the first equal to ``B``, summing to ``N``.

    Raises:
        ArgumentTypeError: not a tensor. RuntimeError: anything else.
    """
    tensor(name, t)
    if t.dtype != torch.int64 or t.device.type != "cpu" or t.dim() != 1:
        raise RuntimeError(f"{name}: expected a 1-D int64 CPU tensor (a PackedSequence's), "
                           f"got {t.dim()}-D {t.dtype} on {t.device}")
    if t.numel() == 0:
        raise RuntimeError(f"{name}: expected at least one step, got shape {tuple(t.shape)}")
    if _skip_values(t):
        return
    first, total = int(t[0]), int(t.sum())
    if first != B:
        raise RuntimeError(f"{name}: expected batch_sizes[0] == B = {B} (rows of h0), got {first}")
    if total != N:
        raise RuntimeError(f"{name}: expected a sum of N = {N} (rows of gi), got {total}")
    if t.numel() > 1 and bool((t[1:] > t[:-1]).any()) or int(t[-1]) < 1:
        raise RuntimeError(f"{name}: expected non-increasing values >= 1 (sorted by length, "
                           f"as in a PackedSequence), got {t.tolist()}")


def source(mask: Optional[Tensor], lengths_: Optional[Tensor], B: int, S: int, device: torch.device) -> None:
    """Validate an attention source mask or source lengths (at most one of them).

    Raises:
        ValueError: both given.
        ArgumentTypeError: ``mask`` / ``lengths`` is not a tensor.
        RuntimeError: ``mask`` not bool, not ``(B, S)`` or not on ``device``;
            ``lengths`` not int32/int64, not ``(B,)`` or on another device; a
            zero-length source (a mask row with no True entry, or a length < 1);
            a length > S.
    """
    optional_tensor("mask", mask)
    optional_tensor("lengths", lengths_)
    if mask is not None and lengths_ is not None:
        raise ValueError("mask, lengths: pass at most one of them")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise RuntimeError(f"mask: expected a bool tensor, got {mask.dtype}")
        shape("mask", mask, (B, S), "(B, S) = ")
        if mask.device != device:
            raise RuntimeError(f"mask: expected device {device} (that of values), got {mask.device}")
        if B == 0 or _skip_values(mask) or device.type == "meta" or _cached(_MASKS, mask) is not None:
            return
        if not bool(mask.any(dim=1).all()):
            row = int((~mask.any(dim=1)).nonzero()[0, 0])
            raise RuntimeError(f"mask: row {row} has no True entry (a zero-length source); "
                               "every source needs at least one position")
        _remember(_MASKS, mask)
    elif lengths_ is not None:
        lengths_layout("lengths", lengths_, B, device)
        if B == 0 or _skip_values(lengths_) or device.type == "meta":
            return
        lo, hi = value_range(lengths_)
        if lo < 1:
            raise RuntimeError(f"lengths: every source needs length >= 1 (zero-length source), got min {lo}")
        if hi > S:
            raise RuntimeError(f"lengths: expected values <= S = {S}, got max {hi}")
