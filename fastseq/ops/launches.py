"""Kernel-launch accounting for fastseq's own kernels.

Every Triton kernel (``fastseq/ops/<op>/triton.py``) is wrapped with :func:`counted`,
so each launch is recorded while a :func:`count` block is open. Tests use it to
state how many kernels one decoder step launches; on a GPU the same count is
cross-checked with the CUDA profiler (tests/test_gpu.py).
"""
from __future__ import annotations

import collections
import contextlib
import inspect
from typing import Iterator, List

import torch

_active: List["collections.Counter[str]"] = []


@contextlib.contextmanager
def count() -> Iterator["collections.Counter[str]"]:
    """Count fastseq kernel launches inside the block, by kernel name.

    Example::

        with launches.count() as n:
            decoder.step(...)
        total = sum(n.values())
    """
    counter: "collections.Counter[str]" = collections.Counter()
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.remove(counter)


def record(name: str, n: int = 1) -> None:
    """Record ``n`` launches of kernel ``name`` in every open :func:`count` block (for
    launch paths that bypass :class:`counted`, e.g. a bound step loop)."""
    for c in _active:
        c[name] += n


class counted:
    """Wrap a Triton kernel so ``kernel[grid](...)`` records one launch."""

    def __init__(self, kernel):
        self.kernel = kernel
        fn = kernel
        while hasattr(fn, "fn"):  # heuristics/autotune wrappers
            fn = fn.fn
        self.name = getattr(fn, "__name__", repr(kernel))
        # The kernel's parameter names, in order (bound launches need them).
        self.arg_names = list(getattr(fn, "arg_names", None) or inspect.signature(fn).parameters)

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            record(self.name)
            if torch.autograd.profiler._is_profiler_enabled:
                with torch.profiler.record_function(f"triton::{self.name}"):
                    return launch(*args, **kwargs)
            return launch(*args, **kwargs)

        return run


# Aten ops that only allocate or make a view: they launch no kernel on a GPU.
# (``dropout``, ``to`` and ``contiguous`` are no-ops unless they call a child op --
# native_dropout, _to_copy, clone -- which is then counted in their place.)
NO_KERNEL_OPS = frozenset(
    "aten::" + name for name in (
        "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view",
        "_unsafe_view", "reshape", "_reshape_alias", "slice", "select", "as_strided", "t",
        "transpose", "permute", "unsqueeze", "squeeze", "expand", "detach", "alias", "lift_fresh",
        "resize_", "contiguous", "to", "numpy_T", "split", "unbind", "chunk", "narrow",
        "is_nonzero", "item", "resolve_conj", "resolve_neg", "dropout", "_local_scalar_dense", "result_type", "size", "stride", "dim",
    )
)


def count_ops(fn, *args, **kwargs) -> "collections.Counter[str]":
    """Run ``fn(*args, **kwargs)`` once and count the kernels it launches, by name.

    Uses the torch profiler's op tree: every fastseq Triton launch counts once
    (as ``triton::<kernel>``), and so does every *outermost* aten op that is not
    an allocation or a view (:data:`NO_KERNEL_OPS`); ops nested inside a counted
    op, or inside a Triton launch (the interpreter's host copies), are not
    counted again, and fastseq's custom ops are transparent (their contents
    count). On a GPU each counted op is one kernel launch for the ops a decoder
    step uses (``mm``, pointwise ops, ``softmax``, ``bmm``, ``cat``); this lets
    tests state launch counts on a CPU-only machine. tests/test_gpu.py checks
    the count against the CUDA profiler's kernel list on a GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args, **kwargs)
    out: "collections.Counter[str]" = collections.Counter()
    for e in prof.events():
        name = e.name
        if name.startswith("triton::"):
            counted_here = True
        elif name.startswith("aten::") and name not in NO_KERNEL_OPS:
            counted_here = True
        else:
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("triton::") or (
                parent.name.startswith("aten::") and parent.name not in NO_KERNEL_OPS
            ):
                nested = True
                break
            parent = parent.cpu_parent
        if counted_here and not nested:
            out[name] += 1
    return out
