"""Backend selection: which implementation of an op runs for a given tensor.

Backends
--------
``reference``
    Plain PyTorch (``fastseq.ops.reference``): any device, any float dtype.
    It is the ground truth in tests and the CPU path.
``triton``
    Fused Triton kernels (``fastseq.ops.triton``): CUDA tensors, or CPU tensors
    when the Triton interpreter is on (``TRITON_INTERPRET=1``, read by Triton
    when fastseq is imported). float32, float16, bfloat16.
``auto`` (default)
    ``triton`` for CUDA tensors when Triton imports and the dtype is supported,
    otherwise ``reference``.

The backend is chosen with the environment variable ``FASTSEQ_BACKEND``
(``auto|triton|reference``), :func:`set_backend`, or the :func:`backend`
context manager.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional, Tuple

import torch

BACKENDS = ("auto", "triton", "reference")
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
        ValueError: ``name`` is not one of ``auto``, ``triton``, ``reference``.
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


def select(t: torch.Tensor) -> str:
    """The backend that runs an op whose main input is ``t``.

    Raises:
        RuntimeError: the 'triton' backend is forced but cannot run on ``t``.
    """
    name = get_backend()
    if name == "reference":
        return "reference"
    why = triton_reason(t)
    if name == "triton":
        if why is not None:
            raise RuntimeError(f"FASTSEQ_BACKEND=triton, but it cannot run here: {why}")
        return "triton"
    # auto: Triton on GPUs, the reference elsewhere (the interpreter is opt-in).
    if why is None and t.device.type == "cuda":
        return "triton"
    return "reference"


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
