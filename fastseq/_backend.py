"""Backend selection: which implementation of an op runs for a given tensor.

Backends
--------
``reference``
    Plain PyTorch (``fastseq.ops.reference``): any device, any float dtype.
    It is the ground truth in tests.
``triton``
    Fused Triton kernels (``fastseq.ops.triton``): CUDA tensors, or CPU tensors
    when the Triton interpreter is on (``TRITON_INTERPRET=1``, read by Triton
    when fastseq is imported). float32, float16, bfloat16.
``cpp``
    The C++ extension (``csrc/``, built with ``torch.utils.cpp_extension`` on
    first use, see :mod:`fastseq.ops.cpp`): fused ATen CPU kernels for CPU
    tensors, and its CUDA kernels for CUDA tensors when it was built with CUDA.
``cuda``
    The C++ extension's CUDA kernels only (CUDA tensors; for machines without Triton).
``auto`` (default)
    CUDA tensors: ``triton`` if Triton works, else the C++ extension's CUDA
    kernels, else ``reference``. CPU tensors: ``cpp`` if the extension builds
    (float32/float64), else ``reference``. A failed build never breaks an op:
    it warns once, naming the reason, and the reference runs.

The backend is chosen with the environment variable ``FASTSEQ_BACKEND``
(``auto|triton|cuda|cpp|reference``), :func:`set_backend`, or the
:func:`backend` context manager. :func:`report` says which work here and why not.

Shape limits
------------
A fused backend that runs on a tensor may still be unable to take a given
*shape*: a Triton grid axis past 65535 (the attention puts B on grid axis 1),
Triton's int32 element offsets past ``2**31 - 1`` (very large hidden sizes,
``H*H*G`` weights), the CUDA kernels' ``2**31 - 1`` blocks on grid axis 0.
Each fused backend module has an ``unsupported_reason(family, t, sizes)``
next to its launch code (:mod:`fastseq.ops.triton.rnn`, ``.attention``,
``.cell``, :mod:`fastseq.ops.cpp_ops`) that returns None or an
:class:`Unsupported` (a stable ``kind`` and a message naming the shape and the
limit). :func:`fastseq.ops._dispatch.implementation` asks it on every call and,
for a shape the backend cannot take, falls back -- Triton to the C++ extension
if that can run (and take the shape), else to the reference -- with one
``RuntimeWarning`` per (backend, kind of limit) (:func:`warn_limit`). This holds
for a forced backend too (``FASTSEQ_BACKEND=triton``): forcing picks the
backend for every shape it can take; a shape it cannot take still runs, on the
fallback, with the warning, never a crash or a silently wrong answer. (A
forced backend that cannot run on the *tensor* at all -- wrong device or
dtype, Triton not importable -- still raises, see :func:`select`.)
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Iterator, NamedTuple, Optional, Tuple

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")
CPP_DTYPES = (torch.float32, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_state = {"backend": None, "poison": os.environ.get("FASTSEQ_POISON", "") == "1"}


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force: set_backend()'s value, else $FASTSEQ_BACKEND, else 'auto'."""
    if _state["backend"] is not None:
        return _state["backend"]
    env = os.environ.get("FASTSEQ_BACKEND", "auto").strip().lower() or "auto"
    try:
        return _check_name(env)
    except ValueError as exc:
        raise ValueError(f"FASTSEQ_BACKEND: {exc}") from None


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every fastseq op (``None`` returns to $FASTSEQ_BACKEND/auto).

    Raises:
        ValueError: ``name`` is not one of ``auto``, ``triton``, ``cuda``, ``cpp``, ``reference``.
    """
    _state["backend"] = None if name is None else _check_name(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    old = _state["backend"]
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = old


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_status() -> Tuple[bool, str]:
    """(importable, reason): whether the Triton kernels can be imported here."""
    try:
        import triton  # noqa: F401
        from fastseq.ops.triton import attention, cell, rnn  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return False, f"triton does not import: {type(exc).__name__}: {exc}"
    return True, "ok"


def triton_reason(t: torch.Tensor) -> Optional[str]:
    """None if the Triton kernels can run on tensor ``t``, else why not."""
    ok, why = triton_status()
    if not ok:
        return why
    if t.dtype not in TRITON_DTYPES:
        return f"dtype {t.dtype} is not supported by the Triton kernels (float32, float16, bfloat16)"
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu":
        if interpreter_on():
            if t.dtype == torch.bfloat16:
                return "the Triton interpreter has no bfloat16 arithmetic"
            return None
        return "Triton runs on CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
    return f"device {t.device} is not supported by Triton"


def cpp_status() -> Tuple[bool, str]:
    """(ok, reason): whether the C++ extension builds and loads here (builds on first call)."""
    from fastseq.ops import cpp

    return cpp.status()


def cpp_reason(t: torch.Tensor) -> Optional[str]:
    """None if the C++ extension can run on tensor ``t``, else why not (may build it)."""
    if t.device.type not in ("cpu", "cuda"):
        return f"device {t.device} is not supported by the C++ extension"
    if t.dtype not in CPP_DTYPES + ((torch.float16, torch.bfloat16) if t.device.type == "cuda" else ()):
        return f"dtype {t.dtype} is not supported by the C++ extension on {t.device.type}"
    ok, why = cpp_status()
    if not ok:
        return why
    if t.device.type == "cuda":
        from fastseq.ops import cpp

        if not cpp.has_cuda():
            return "the C++ extension was built without CUDA (CPU-only torch or no nvcc)"
    return None


_warned = set()


def _warn_once(key: str, msg: str, stacklevel: int = 3) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


class Unsupported(NamedTuple):
    """Why a fused backend cannot take a shape (see "Shape limits" above).

    ``kind`` is a stable name of the limit (``"grid"``, ``"int32-index"``, ...):
    one warning is issued per (backend, kind). ``message`` names the shape and
    the limit.
    """

    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


def extent(t: torch.Tensor) -> int:
    """Elements a kernel may address from ``t``'s data pointer: 1 + the largest
    offset ``sum((size - 1) * stride)`` (0 for an empty tensor). Equals
    ``numel()`` for a contiguous tensor; larger for a strided view."""
    if t.is_contiguous():
        return t.numel()
    e = 1
    for n, s in zip(t.shape, t.stride()):
        if n == 0:
            return 0
        e += (n - 1) * abs(s)
    return e


def warn_limit(backend_name: str, fallback: str, why: Unsupported) -> None:
    """The one warning for a shape ``backend_name`` cannot take (once per backend and kind)."""
    _warn_once(
        f"limit:{backend_name}:{why.kind}",
        f"fastseq: the {backend_name} backend cannot take this shape ({why.message}); "
        f"running it on the {fallback} backend instead (warned once per limit)",
        stacklevel=5,
    )


def select(t: torch.Tensor) -> str:
    """The backend that runs an op whose main input is ``t``: 'triton', 'cpp' or 'reference'.

    Only the tensor's device and dtype count here; shape limits are applied on
    top by :func:`fastseq.ops._dispatch.implementation` (fallback with a warning).

    Raises:
        RuntimeError: a backend is forced ('triton', 'cuda', 'cpp') but cannot run
        on ``t``; the message says why.
    """
    name = get_backend()
    if name == "reference":
        return "reference"
    if name == "triton":
        why = triton_reason(t)
        if why is not None:
            raise RuntimeError(f"FASTSEQ_BACKEND=triton, but it cannot run here: {why}")
        return "triton"
    if name in ("cpp", "cuda"):
        why = "the 'cuda' backend takes CUDA tensors" if name == "cuda" and t.device.type != "cuda" \
            else cpp_reason(t)
        if why is not None:
            raise RuntimeError(f"FASTSEQ_BACKEND={name}, but it cannot run here: {why}")
        return "cpp"
    # auto
    if t.device.type == "cuda":
        if triton_reason(t) is None:
            return "triton"
        if t.dtype in CPP_DTYPES + (torch.float16, torch.bfloat16) and cpp_reason(t) is None:
            return "cpp"
        return "reference"
    if t.device.type == "cpu" and t.dtype in CPP_DTYPES:
        why = cpp_reason(t)
        if why is None:
            return "cpp"
        _warn_once("cpp", f"fastseq: the C++ extension is unavailable ({why}); "
                          "CPU ops run on the reference path")
    return "reference"


def report() -> "dict[str, str]":
    """Each backend and whether it works on this machine: 'ok' or the reason it does not."""
    out = {"reference": "ok"}
    ok, why = triton_status()
    if ok and not torch.cuda.is_available() and not interpreter_on():
        why = "no CUDA device (CPU tensors need the Triton interpreter, TRITON_INTERPRET=1)"
    out["triton"] = why
    ok, why = cpp_status()
    out["cpp"] = why
    if not torch.cuda.is_available():
        out["cuda"] = "no CUDA device"
    elif not ok:
        out["cuda"] = why
    else:
        from fastseq.ops import cpp

        out["cuda"] = "ok" if cpp.has_cuda() else "the C++ extension was built without CUDA"
    return out


def allow_tf32() -> bool:
    """float32 dots use TF32 only when the user opted in through torch's flag."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def poison() -> bool:
    return _state["poison"]


def set_poison(flag: bool) -> None:
    """Testing aid: outputs are filled with NaN before kernels write them."""
    _state["poison"] = bool(flag)


def empty(shape, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Allocate an output; NaN-filled when poisoning is on (catches unwritten elements)."""
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if _state["poison"] and out.is_floating_point():
        out.fill_(float("nan"))
    return out
