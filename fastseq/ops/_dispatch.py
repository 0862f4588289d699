"""The one dispatcher: which implementation of an op runs for a given tensor."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Dict, Tuple

from torch import Tensor

from fastseq import _backend
from fastseq.ops import reference


def implementation(t: Tensor, triton_module: str) -> Tuple[ModuleType, Dict[str, Any]]:
    """(module, extra kwargs) implementing an op whose main input is ``t``.

    ``triton_module`` names the module under :mod:`fastseq.ops.triton` holding the
    fused kernels; the reference (:mod:`fastseq.ops.reference`) has the same
    function names and signatures, minus the keyword arguments returned here.
    Which one runs is decided by :func:`fastseq._backend.select`.
    """
    if _backend.select(t) == "triton":
        mod = importlib.import_module(f"fastseq.ops.triton.{triton_module}")
        return mod, {"allow_tf32": _backend.allow_tf32()}
    return reference, {}
