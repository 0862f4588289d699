"""The GRU/LSTM recurrences on the C++ extension (``csrc/cpu/rnn.cpp``, ``csrc/cuda/rnn_kernels.cu``).

Each function calls ``torch.ops.fastseq_cpp.<name>`` (built on first use by
:mod:`fastseq.backend.extension`; PyTorch's dispatcher picks the CPU or CUDA
kernel by the tensors' device). Signatures and outputs are :mod:`.naive`'s;
:func:`gru_recurrence`, :func:`lstm_recurrence`, :func:`gru_packed_recurrence` and
:func:`lstm_packed_recurrence` run the forward with its autograd recorded in C++
(``csrc/cpu/autograd.cpp``): the backward runs without Python.
absent outputs are empty ``[0]`` tensors, as the C++ ops return them. The
kernels loop over time with capped grid-stride loops on CUDA and int64
indexing on the CPU: they take any shape (no limits registered).
"""
from __future__ import annotations

from fastseq.backend import extension


def gru_recurrence_forward(gi, h0, w_hh, b_hh, lengths, save_gates):
    return tuple(extension.load().gru_recurrence_forward(gi, h0, w_hh, b_hh, lengths, save_gates))


def gru_recurrence_backward(grad_hs, h0, w_hh, hs, gates, lengths, has_bias):
    return tuple(extension.load().gru_recurrence_backward(grad_hs, h0, w_hh, hs, gates, lengths, has_bias))


def lstm_recurrence_forward(gi, h0, c0, w_hh, b_hh, lengths, save_gates):
    return tuple(extension.load().lstm_recurrence_forward(gi, h0, c0, w_hh, b_hh, lengths, save_gates))


def lstm_recurrence_backward(grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, lengths, has_bias):
    return tuple(extension.load().lstm_recurrence_backward(
        grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, lengths, has_bias))


def gru_packed_recurrence_forward(gi, h0, w_hh, b_hh, batch_sizes, reverse, save_gates):
    return tuple(extension.load().gru_packed_recurrence_forward(gi, h0, w_hh, b_hh, batch_sizes, reverse,
                                                                save_gates))


def gru_packed_recurrence_backward(grad_hs, h0, w_hh, hs, gates, batch_sizes, reverse, has_bias):
    return tuple(extension.load().gru_packed_recurrence_backward(
        grad_hs, h0, w_hh, hs, gates, batch_sizes, reverse, has_bias))


def lstm_packed_recurrence_forward(gi, h0, c0, w_hh, b_hh, batch_sizes, reverse, save_gates):
    return tuple(extension.load().lstm_packed_recurrence_forward(gi, h0, c0, w_hh, b_hh, batch_sizes, reverse,
                                                                 save_gates))


def lstm_packed_recurrence_backward(grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, batch_sizes, reverse,
                                    has_bias):
    return tuple(extension.load().lstm_packed_recurrence_backward(
        grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, batch_sizes, reverse, has_bias))


# ------------------------------------------------------- autograd in C++ (no Python backward)


def gru_recurrence(gi, h0, w_hh, b_hh, lengths):
    return extension.load().gru_recurrence(gi, h0, w_hh, b_hh, lengths)


def lstm_recurrence(gi, h0, c0, w_hh, b_hh, lengths):
    return tuple(extension.load().lstm_recurrence(gi, h0, c0, w_hh, b_hh, lengths))


def gru_packed_recurrence(gi, h0, w_hh, b_hh, batch_sizes, reverse):
    return extension.load().gru_packed_recurrence(gi, h0, w_hh, b_hh, batch_sizes, reverse)


def lstm_packed_recurrence(gi, h0, c0, w_hh, b_hh, batch_sizes, reverse):
    return tuple(extension.load().lstm_packed_recurrence(gi, h0, c0, w_hh, b_hh, batch_sizes, reverse))
