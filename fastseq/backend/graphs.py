"""Replayed CUDA graphs: a decoding step (:class:`StepGraph`) and a whole teacher-forced
decoder loop (:class:`GraphCache`) cost one graph launch of host time.

A decoder step launches a handful of kernels (a GEMM, the attention, the GRU
cell, the output layer, a log-softmax), each through its host path: 20-50 us of
Python per launch measured on CPU (bench/NOTES.md v0.4), against a few
microseconds of GPU work per kernel at translation sizes. Autoregressive decoding
runs the same step with the same shapes for every token of a batch, so the step
can be captured once into a ``torch.cuda.CUDAGraph`` and replayed: per token, the
inputs are copied into the graph's static buffers and one ``cudaGraphLaunch``
runs every kernel of the step (~3 us of host time, a prediction until a GPU
confirms it).

:class:`StepGraph` does that for any ``fn(*tensors) -> tensor or tuple of
tensors`` whose output shapes depend only on the input shapes. It is opt-in:
``FASTSEQ_CUDA_GRAPHS=1`` (or ``StepGraph(fn, enabled=True)``); the default
stays the direct launches until a GPU run has validated the graphs against them
(tests/test_gpu.py). It falls back to calling ``fn`` directly -- and stays there
-- on CPU tensors, when disabled, or when the capture fails (an op that waits for
the host, e.g. ``.item()``, cannot be captured); a fallback warns once.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from fastseq.backend import warn

__all__ = ["DEFAULT_MAX_GRAPHS", "GraphCache", "StepGraph", "default_max_graphs", "enabled_by_default", "graph_caches"]

_FORCED: Optional[bool] = None  # graph_caches()'s setting, None outside it

Outputs = Union[Tensor, Tuple[Tensor, ...]]


def enabled_by_default() -> bool:
    """``FASTSEQ_CUDA_GRAPHS`` set to 1 (default off)."""
    return os.environ.get("FASTSEQ_CUDA_GRAPHS", "0") == "1"


# Graphs a GraphCache keeps by default. The main job's batches (multi30k-cpu, 4,096-token
# batches, 7 epochs) have 33 distinct shapes; an LRU of 16 graphs replays 84% of the
# decoder-loop calls (127 captures), one of 32 replays 96% (31 captures; bench/graph_replay.py,
# bench/results/cpu-graph-replay-multi30k-2026-12-02.json, bench/NOTES.md v0.14).
DEFAULT_MAX_GRAPHS = 32


def default_max_graphs() -> int:
    """``FASTSEQ_CUDA_GRAPHS_MAX`` (a positive integer), else :data:`DEFAULT_MAX_GRAPHS`.

    Raises:
        ValueError: the variable is set to something else, naming it and the value.
    """
    value = os.environ.get("FASTSEQ_CUDA_GRAPHS_MAX", "")
    if not value:
        return DEFAULT_MAX_GRAPHS
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"FASTSEQ_CUDA_GRAPHS_MAX: expected a positive integer, got {value!r}")
    return n


@contextlib.contextmanager
def graph_caches(enabled: bool) -> Iterator[None]:
    """Every :class:`GraphCache` (the decoder loops') on or off inside the block, whatever
    ``FASTSEQ_CUDA_GRAPHS`` and their ``enabled`` say; for benchmarks and tests that compare
    the two in one process. Process-wide (not per thread); nests, restoring the outer
    setting on exit. :class:`StepGraph` keeps its own setting."""
    global _FORCED
    outer, _FORCED = _FORCED, bool(enabled)
    try:
        yield
    finally:
        _FORCED = outer


def _capture(fn: Callable, static: tuple, warmups: int):
    """``fn(*static)`` captured as a CUDA graph after ``warmups`` runs on a side stream (they
    compile kernels and settle the allocator outside the capture): the graph and the outputs."""
    side = torch.cuda.Stream(device=next(a for a in static if isinstance(a, Tensor)).device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static)
    return graph, outputs


def _signature(inputs: Tuple[Tensor, ...]):
    return tuple((x.shape, x.dtype, x.device) for x in inputs)


class StepGraph:
    """``fn`` run as a CUDA graph replayed at every call (see the module docstring).

    Args:
        fn: the step, a function of tensors returning a tensor or a tuple of tensors;
            everything else it reads (weights, encoder memory) must stay at the same
            addresses while this object is used (it is captured by address).
        enabled: capture on CUDA; None: :func:`enabled_by_default`.

    Calling it returns ``fn(*inputs)``; with a graph, the returned tensors are the
    graph's static output buffers: valid until the next call (clone what you keep).
    Inputs with other shapes, dtypes or devices than the first call's are run
    directly (no recapture).
    """

    def __init__(self, fn: Callable[..., Outputs], enabled: Optional[bool] = None):
        self.fn = fn
        self.enabled = enabled_by_default() if enabled is None else bool(enabled)
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.failed: Optional[str] = None  # why the capture failed, if it did
        self.replays = 0
        self._inputs: Tuple[Tensor, ...] = ()
        self._outputs: Outputs = ()
        self._signature = None

    def __call__(self, *inputs: Tensor) -> Outputs:
        if not self.enabled or self.failed is not None or not inputs or inputs[0].device.type != "cuda":
            return self.fn(*inputs)
        if self.graph is None:
            return self._capture(inputs)
        if _signature(inputs) != self._signature:
            return self.fn(*inputs)
        for static, x in zip(self._inputs, inputs):
            if static.data_ptr() != x.data_ptr():
                static.copy_(x)
        self.graph.replay()
        self.replays += 1
        return self._outputs

    def _capture(self, inputs: Tuple[Tensor, ...]) -> Outputs:
        static = tuple(x.clone() for x in inputs)
        try:
            graph, outputs = _capture(self.fn, static, warmups=2)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to direct launches
            self.failed = f"{type(exc).__name__}: {exc}"
            warn.warn_once("cuda-graph-capture", f"fastseq: CUDA graph capture of a decoding step failed "
                           f"({self.failed[:200]}); running the step's kernels directly")
            return self.fn(*inputs)
        self.graph, self._inputs, self._outputs, self._signature = graph, static, outputs, _signature(inputs)
        return self(*inputs)


def _arg_key(x):
    if isinstance(x, Tensor):
        return (tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
    return x


class GraphCache:
    """``fn`` replayed from a CUDA graph captured per argument signature, for whole-sequence ops.

    The teacher-forced decoder loops (``csrc/cpu/decode.cpp``) launch a few kernels per
    step from one C++ call; captured, a call is one ``cudaGraphLaunch`` whatever T is:
    0 host time per step. Training batches are bucketed by length, so their shapes
    repeat; a signature (every tensor's shape, strides, dtype and device, and every
    other argument's value) is captured the ``min_calls``-th time it is seen (the
    first calls run directly: they also warm up cuBLAS and the allocator), and at most
    ``max_graphs`` graphs are kept (least recently used evicted, its memory freed).

    A replay copies the tensor arguments into the graph's static inputs and returns
    **clones** of its static outputs (autograd keeps them past the next replay). It
    calls ``fn`` directly on CPU tensors, when disabled, inside another capture, for a
    signature whose capture failed (warned once), and while fewer than ``min_calls``
    calls have seen it. Opt-in like :class:`StepGraph` (``FASTSEQ_CUDA_GRAPHS=1``,
    ``enabled=True``, or :func:`graph_caches` for a block) until a GPU run has compared
    it with the direct launches (tests/test_gpu.py).

    Args:
        fn: a function of tensors, None and plain values returning a tuple of tensors,
            whose launches depend only on the signature and which waits for nothing on
            the host (no ``.item()``), e.g. the C++ decoder loops.
        name: for the warning.
        max_graphs: graphs kept (>= 1); None: :func:`default_max_graphs` (32, or
            ``FASTSEQ_CUDA_GRAPHS_MAX``), read here.
        min_calls: calls of a signature before it is captured (>= 1).
        enabled: None: :func:`enabled_by_default`.
    """

    def __init__(self, fn: Callable[..., Tuple[Tensor, ...]], name: str, max_graphs: Optional[int] = None,
                 min_calls: int = 2, enabled: Optional[bool] = None):
        if max_graphs is None:
            max_graphs = default_max_graphs()
        if max_graphs < 1 or min_calls < 1:
            raise ValueError(f"GraphCache: max_graphs and min_calls must be >= 1, got {max_graphs}, {min_calls}")
        self.fn, self.name, self.max_graphs, self.min_calls = fn, name, max_graphs, min_calls
        self.enabled = enabled_by_default() if enabled is None else bool(enabled)
        self._graphs: "OrderedDict[tuple, tuple]" = OrderedDict()  # key -> (graph, static args, static outputs)
        self._seen: Dict[tuple, int] = {}
        self._failed: Dict[tuple, str] = {}
        self.captures = self.replays = self.evictions = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, *args) -> Tuple[Tensor, ...]:
        first = next((a for a in args if isinstance(a, Tensor)), None)
        on = self.enabled if _FORCED is None else _FORCED
        if not on or first is None or not self._graphable(first):
            return self.fn(*args)
        key = tuple(_arg_key(a) for a in args)
        entry = self._graphs.get(key)
        if entry is None:
            if key in self._failed:
                return self.fn(*args)
            if len(self._seen) >= 4096:  # many one-off shapes: forget the counts, keep memory bounded
                self._seen.clear()
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < self.min_calls:
                return self.fn(*args)
            entry = self._capture(key, args)
            if entry is None:
                return self.fn(*args)
        self._graphs.move_to_end(key)
        graph, static, outputs = entry
        for st, a in zip(static, args):
            if isinstance(st, Tensor) and st.data_ptr() != a.data_ptr():
                st.copy_(a)
        graph.replay()
        self.replays += 1
        with torch.no_grad():
            return tuple(o.clone() for o in outputs)

    def _graphable(self, first: Tensor) -> bool:
        """A CUDA tensor, outside another capture (tests replace this off the GPU)."""
        return first.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()

    def _new_graph(self, static: tuple):
        """Capture ``fn(*static)``: the graph and its outputs (tests replace this off the GPU)."""
        return _capture(self.fn, static, warmups=1)

    def _capture(self, key: tuple, args: tuple):
        with torch.no_grad():
            static = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
        try:
            graph, outputs = self._new_graph(static)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to direct launches
            self._failed[key] = f"{type(exc).__name__}: {exc}"
            warn.warn_once(f"cuda-graph-capture:{self.name}",
                           f"fastseq: CUDA graph capture of {self.name} failed ({self._failed[key][:200]}); "
                           f"running its kernels directly for that shape")
            return None
        self._seen.pop(key, None)
        if len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
            self.evictions += 1
        self._graphs[key] = (graph, static, tuple(outputs))
        self.captures += 1
        return self._graphs[key]
