"""The one dispatcher: which implementation of an op runs for a given tensor."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable, Dict, Tuple, Union

import torch
from torch import Tensor

from fastseq import _backend
from fastseq.ops import reference


def _module(name: str, family: str) -> Tuple[ModuleType, Dict[str, Any]]:
    if name == "triton":
        mod = importlib.import_module(f"fastseq.ops.triton.{family}")
        return mod, {"allow_tf32": _backend.allow_tf32()}
    if name == "cpp":
        from fastseq.ops import cpp_ops

        return cpp_ops, {}
    return reference, {}


def implementation(t: Tensor, family: str,
                   sizes: Union[None, Dict[str, Any], Callable[[], Dict[str, Any]]] = None
                   ) -> Tuple[ModuleType, Dict[str, Any]]:
    """(module, extra kwargs) implementing an op whose main input is ``t``.

    ``family`` (``"rnn"``, ``"attention"``, ``"cell"``) names the module under
    :mod:`fastseq.ops.triton` holding the fused kernels; the reference
    (:mod:`fastseq.ops.reference`) and the C++ extension's wrappers
    (:mod:`fastseq.ops.cpp_ops`) have the same function names and signatures,
    minus the keyword arguments returned here.
    Which one runs is decided by :func:`fastseq._backend.select` (device and
    dtype), then by the shape: ``sizes`` (the op's dimensions, see each fused
    module's ``unsupported_reason``; or a callable returning them, called only
    when a fused backend is chosen) is checked against the chosen backend's
    limits, and a shape it cannot take falls back -- Triton to the C++
    extension when that can run and take it, else the reference -- with one
    RuntimeWarning per (backend, kind of limit). Forced backends fall back too
    (documented in :mod:`fastseq._backend`, "Shape limits"). The decision is
    cached per (backend, family, device, dtype, sizes).
    """
    name = _backend.select(t)
    if name != "reference" and sizes is not None and _shape_limited(name, t):
        if callable(sizes):
            sizes = sizes()
        key = (name, family, t.is_cuda, t.dtype, *sizes.values())
        final = _DECISIONS.get(key)
        if final is None:
            final = _fall_back(name, family, t, sizes)
            if len(_DECISIONS) >= _MAX_DECISIONS:
                _DECISIONS.clear()
            _DECISIONS[key] = final
        name = final
    return _module(name, family)


def _shape_limited(name: str, t: Tensor) -> bool:
    """Whether backend ``name`` has shape limits on ``t``'s device. The C++ CPU kernels
    take any shape (``cpp_ops.CPU_SHAPE_LIMITS`` is False), so the CPU inference path,
    where a decoder step costs tens of microseconds, skips the per-call check."""
    if name == "cpp" and not t.is_cuda:
        from fastseq.ops import cpp_ops

        return cpp_ops.CPU_SHAPE_LIMITS
    return True


# (backend, family, is CUDA, dtype, *sizes) -> the backend that runs it. The limit
# checks cost a few microseconds of Python, which a decoder step would pay every
# step; shapes repeat, so each is decided once. Tests that lower a limit constant
# call clear_decisions().
_DECISIONS: Dict[tuple, str] = {}
_MAX_DECISIONS = 4096


def clear_decisions() -> None:
    """Forget the cached shape decisions (after changing a backend's limit constants)."""
    _DECISIONS.clear()


def _fall_back(name: str, family: str, t: Tensor, sizes: Dict[str, Any]) -> str:
    """``name`` if its module takes ``sizes``, else the fallback (warning once per limit)."""
    while name != "reference":
        mod, _ = _module(name, family)
        why = mod.unsupported_reason(family, t, sizes)
        if why is None:
            break
        nxt = "cpp" if name == "triton" and _backend.cpp_reason(t) is None else "reference"
        _backend.warn_limit(name, nxt, why)
        name = nxt
    return name


def needs_grad(*tensors) -> bool:
    """Autograd will need a backward through an op taking ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def direct_call_ok(*tensors) -> bool:
    """True when an op can skip its torch.library wrapper and call the implementation
    directly: nothing needs a gradient and no torch.compile trace is running. The
    wrapper (autograd + fake tensors) costs ~30 us per call, which is most of a
    small decoder step at inference time; the result is the same.
    """
    return not torch.compiler.is_compiling() and not needs_grad(*tensors)
