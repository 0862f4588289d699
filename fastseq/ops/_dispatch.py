"""The one dispatcher: which implementation of an op runs for a given tensor."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from fastseq import _backend
from fastseq.ops import reference


def implementation(t: Tensor, triton_module: str) -> Tuple[ModuleType, Dict[str, Any]]:
    """(module, extra kwargs) implementing an op whose main input is ``t``.

    ``triton_module`` names the module under :mod:`fastseq.ops.triton` holding the
    fused kernels; the reference (:mod:`fastseq.ops.reference`) and the C++
    extension's wrappers (:mod:`fastseq.ops.cpp_ops`) have the same function names
    and signatures, minus the keyword arguments returned here.
    Which one runs is decided by :func:`fastseq._backend.select`.
    """
    name = _backend.select(t)
    if name == "triton":
        mod = importlib.import_module(f"fastseq.ops.triton.{triton_module}")
        return mod, {"allow_tf32": _backend.allow_tf32()}
    if name == "cpp":
        from fastseq.ops import cpp_ops

        return cpp_ops, {}
    return reference, {}


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
