"""Which backend runs an op for a given tensor: the setting in force, and device/dtype rules.

Backends
--------
``reference``
    Plain PyTorch (``fastseq/ops/<op>/naive.py``): any device, any float dtype.
    It is the ground truth in tests.
``triton``
    Fused Triton kernels (``fastseq/ops/<op>/triton.py``): CUDA tensors, or CPU
    tensors when the Triton interpreter is on (``TRITON_INTERPRET=1``, read by
    Triton when it is imported). float32, float16, bfloat16.
``cpp``
    The C++ extension (``csrc/``, built by :mod:`fastseq.backend.extension` on
    first use): fused ATen CPU kernels for CPU tensors (float32, float64), and its
    CUDA kernels for CUDA tensors when it was built with CUDA.
``cuda``
    The C++ extension's CUDA kernels only (CUDA tensors; for machines without Triton).
``auto`` (default)
    CUDA tensors: ``triton`` if Triton works, else the C++ extension's CUDA
    kernels, else ``reference``. CPU tensors: ``cpp`` if the extension builds
    (float32/float64), else ``reference``. A failed build never breaks an op:
    it warns once, naming the reason, and the reference runs.

The setting
-----------
``FASTSEQ_BACKEND`` (``auto|triton|cuda|cpp|reference``) is the process-wide
default. :func:`set_backend` and the :func:`backend` context manager override
it **for the current thread (context) only**: they are stored in a
:class:`contextvars.ContextVar`, so one thread (or asyncio task) forcing a
backend never switches another's. New threads start from the default. An
op's backward runs under the setting that was in force at its forward, even
when autograd runs it on another thread (the custom ops record it).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator, Optional, Tuple

import torch

from fastseq.backend import extension
from fastseq.backend.warn import warn_once

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")
CPP_DTYPES = (torch.float32, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_forced: "contextvars.ContextVar[Optional[str]]" = contextvars.ContextVar("fastseq_backend", default=None)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force here: this context's :func:`set_backend` / :func:`backend`
    value, else ``$FASTSEQ_BACKEND``, else ``'auto'``.

    Raises:
        ValueError: ``$FASTSEQ_BACKEND`` is not a backend name.
    """
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("FASTSEQ_BACKEND", "auto").strip().lower() or "auto"
    try:
        return _check_name(env)
    except ValueError as exc:
        raise ValueError(f"FASTSEQ_BACKEND: {exc}") from None


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every fastseq op run by this thread (context);
    ``None`` returns to ``$FASTSEQ_BACKEND`` / ``auto``.

    Raises:
        ValueError: ``name`` is not one of ``auto``, ``triton``, ``cuda``, ``cpp``, ``reference``.
    """
    _forced.set(None if name is None else _check_name(name))


@contextlib.contextmanager
def backend(name: Optional[str]) -> Iterator[None]:
    """Run the block with backend ``name`` forced in this thread (context) only.

    ``None`` runs it under ``$FASTSEQ_BACKEND`` / ``auto``. Other threads are
    not affected.

    Raises:
        ValueError: ``name`` is not a backend name.
    """
    token = _forced.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced() -> Optional[str]:
    """This context's forced backend (None: none forced). Ops record it at forward
    time and re-apply it in their backward (see the module docstring)."""
    return _forced.get()


def interpreter_on() -> bool:
    """Whether the Triton interpreter is on (``TRITON_INTERPRET`` set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_status() -> Tuple[bool, str]:
    """(importable, reason): whether Triton imports here (checked once per process)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
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
    return extension.status()


def cpp_reason(t: torch.Tensor) -> Optional[str]:
    """None if the C++ extension can run on tensor ``t``, else why not (may build it)."""
    if t.device.type not in ("cpu", "cuda"):
        return f"device {t.device} is not supported by the C++ extension"
    if t.dtype not in CPP_DTYPES + ((torch.float16, torch.bfloat16) if t.device.type == "cuda" else ()):
        return f"dtype {t.dtype} is not supported by the C++ extension on {t.device.type}"
    ok, why = cpp_status()
    if not ok:
        return why
    if t.device.type == "cuda" and not extension.has_cuda():
        return "the C++ extension was built without CUDA (CPU-only torch or no nvcc)"
    return None


# (setting, device type, dtype, interpreter on) -> backend; what select() decided,
# kept because it is asked on every op call (~5 us of checks otherwise). What it
# depends on besides its key -- whether Triton imports, whether the C++ extension
# loads and has CUDA kernels -- is fixed for the life of a process.
_SELECTED: dict = {}


def select(t: torch.Tensor) -> str:
    """The backend that runs an op whose main input is ``t``: 'triton', 'cpp' or 'reference'.

    Only the tensor's device and dtype count here; shape limits are applied on
    top by :func:`fastseq.backend.registry.implementation` (fallback with a warning).

    Raises:
        RuntimeError: a backend is forced ('triton', 'cuda', 'cpp') but cannot run
        on ``t``; the message says why.
    """
    name = get_backend()
    key = (name, t.device.type, t.dtype, interpreter_on())
    chosen = _SELECTED.get(key)
    if chosen is None:
        chosen = _SELECTED[key] = _select(name, t)
    return chosen


def _select(name: str, t: torch.Tensor) -> str:
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
        if cpp_reason(t) is None:
            return "cpp"
        return "reference"
    if t.device.type == "cpu" and t.dtype in CPP_DTYPES:
        why = cpp_reason(t)
        if why is None:
            return "cpp"
        warn_once("cpp-unavailable", f"fastseq: the C++ extension is unavailable ({why}); "
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
        out["cuda"] = "ok" if extension.has_cuda() else "the C++ extension was built without CUDA"
    return out


def allow_tf32() -> bool:
    """float32 dots use TF32 only when the user opted in through torch's flag."""
    return bool(torch.backends.cuda.matmul.allow_tf32)
