"""The decoder's GRU context cell on the C++ extension (``csrc/cpu/cell.cpp``, ``csrc/cuda/cell_kernels.cu``).

Signatures and outputs are :mod:`.naive`'s (``torch.ops.fastseq_cpp.<name>``,
built on first use by :mod:`fastseq.backend.extension`); any shape.
"""
from __future__ import annotations

from fastseq.backend import extension


def gru_context_cell_forward(gi, context, w_ic, gh, b_hh, h, save_gates):
    return tuple(extension.load().gru_context_cell_forward(gi, context, w_ic, gh, b_hh, h, save_gates))


def gru_context_cell_backward(grad_h, gates, h, context, w_ic, has_bias):
    return tuple(extension.load().gru_context_cell_backward(grad_h, gates, h, context, w_ic, has_bias))
