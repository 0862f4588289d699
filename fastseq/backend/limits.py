"""Shape limits of the fused backends, and the one warning for a shape one cannot take.

A fused backend that runs on a tensor may still be unable to take a given
*shape*: a grid axis past CUDA's limit, Triton's int32 element offsets past
``2**31 - 1`` (very large hidden sizes, ``G*H*H`` weights), the CUDA kernels'
blocks on grid axis 0. Each backend's launch code declares its limits as a
function ``limits(sizes) -> Optional[Unsupported]`` registered with the
implementation (:func:`fastseq.backend.registry.register`); the registry asks
it on every call (cached per shape) and, for a shape the backend cannot take,
falls back -- Triton to the C++ extension if that can run (and take the
shape), else to the reference -- with one ``RuntimeWarning`` per (backend,
kind of limit) (:func:`warn_limit`). This holds for a forced backend too: forcing
picks the backend for every shape it can take; a shape it cannot take still
runs, on the fallback, with the warning, never a crash or a silently wrong answer.

The hardware and compiler constants are defined here, once, and read at call
time (tests lower them to exercise the fallback on small tensors).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fastseq.backend.warn import warn_once

#: CUDA's limit on grid axes 1 and 2 (axis 0 allows 2**31 - 1).
MAX_GRID_YZ = 65535
#: CUDA's limit on grid axis 0 (launched as an unsigned int; the C++ CUDA kernels' axis).
MAX_GRID_X = 2**31 - 1
#: Triton kernels index with int32 element offsets.
MAX_INDEX = 2**31 - 1


class Unsupported(NamedTuple):
    """Why a fused backend cannot take a shape.

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
    warn_once(
        f"limit:{backend_name}:{why.kind}",
        f"fastseq: the {backend_name} backend cannot take this shape ({why.message}); "
        f"running it on the {fallback} backend instead (warned once per limit)",
    )
