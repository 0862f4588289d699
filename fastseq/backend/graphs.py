"""One decoding step as a replayed CUDA graph: the host cost of a step is one graph launch.

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

import os
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from fastseq.backend import warn

__all__ = ["StepGraph", "enabled_by_default"]

Outputs = Union[Tensor, Tuple[Tensor, ...]]


def enabled_by_default() -> bool:
    """``FASTSEQ_CUDA_GRAPHS`` set to 1 (default off)."""
    return os.environ.get("FASTSEQ_CUDA_GRAPHS", "0") == "1"


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
            side = torch.cuda.Stream(device=static[0].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles kernels and settles the allocator outside the capture
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self.fn(*static)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to direct launches
            self.failed = f"{type(exc).__name__}: {exc}"
            warn.warn_once("cuda-graph-capture", f"fastseq: CUDA graph capture of a decoding step failed "
                           f"({self.failed[:200]}); running the step's kernels directly")
            return self.fn(*inputs)
        self.graph, self._inputs, self._outputs, self._signature = graph, static, outputs, _signature(inputs)
        return self(*inputs)
