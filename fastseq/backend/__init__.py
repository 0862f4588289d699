"""Backends: which implementation of an op runs, and the shared machinery of the fused ones.

* :mod:`.selection` -- the setting (``FASTSEQ_BACKEND``, :func:`set_backend`,
  :func:`backend`, per thread), and the choice by device and dtype;
* :mod:`.registry` -- ``{op: {backend: implementation}}`` and the dispatcher,
  with shape-limit fallback;
* :mod:`.limits` -- hardware/compiler limits, :class:`Unsupported`, the fallback warning;
* :mod:`.extension` -- builds and loads the C++/CUDA extension (``csrc/``);
* :mod:`.alloc` -- output allocation (NaN poison for tests);
* :mod:`.warn` -- warnings attributed to the user's frame.

This package imports nothing from :mod:`fastseq.ops`; the ops register their
implementations here.
"""
from fastseq.backend.limits import Unsupported, extent
from fastseq.backend.selection import (
    BACKENDS, allow_tf32, backend, cpp_reason, cpp_status, get_backend, interpreter_on, report,
    select, set_backend, triton_reason, triton_status,
)

__all__ = [
    "BACKENDS", "Unsupported", "allow_tf32", "backend", "cpp_reason", "cpp_status", "extent",
    "get_backend", "interpreter_on", "report", "select", "set_backend", "triton_reason", "triton_status",
]
