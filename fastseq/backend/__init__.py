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

The package is also callable: ``fastseq.backend(name)`` is
:func:`fastseq.backend.selection.backend`, the context manager that forces a
backend in this thread (``with fastseq.backend("reference"): ...``), so the
package and the public context manager share the one name without one hiding
the other (``import fastseq.backend`` gives this package).
"""
import sys
import types

from fastseq.backend.limits import Unsupported, extent
from fastseq.backend.selection import (
    BACKENDS, allow_tf32, backend, cpp_reason, cpp_status, get_backend, interpreter_on, report,
    select, set_backend, triton_reason, triton_status,
)

__all__ = [
    "BACKENDS", "Unsupported", "allow_tf32", "backend", "cpp_reason", "cpp_status", "extent",
    "get_backend", "interpreter_on", "report", "select", "set_backend", "triton_reason", "triton_status",
]


class _CallablePackage(types.ModuleType):
    def __call__(self, name):
        """``fastseq.backend(name)``: :func:`fastseq.backend.selection.backend`."""
        return backend(name)


sys.modules[__name__].__class__ = _CallablePackage
