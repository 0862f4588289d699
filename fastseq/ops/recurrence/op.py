"""GRU/LSTM recurrences as torch.library custom ops, their registrations, and the functional API.

Ops (all time-major; :mod:`.naive` has the equations)::

    fastseq::gru_recurrence(gi, h0, w_hh, b_hh?, lengths?, save_gates) -> (hs, gates)
    fastseq::gru_recurrence_backward(grad_hs, h0, w_hh, hs, gates, lengths?, has_bias)
        -> (grad_gi, grad_h0, grad_w_hh, grad_b_hh)
    fastseq::lstm_recurrence(gi, h0, c0, w_hh, b_hh?, lengths?, save_gates) -> (hs, cs, gates)
    fastseq::lstm_recurrence_backward(...)

Each op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)``
traces models that use them, and an autograd formula registered with
``torch.library.register_autograd`` that calls the backward op under the
backend setting in force at the forward. The input projection
``x W_ih^T + b_ih`` is *not* part of the op: callers compute it for all steps
with one matrix product and autograd differentiates it.

Each op has one implementation per backend in the registry
(:mod:`fastseq.backend.registry`): :mod:`.naive` (reference), :mod:`.triton`
(imported on first use), :mod:`.cpp` (the C++ extension). The packed ops
(``fastseq::gru_packed_recurrence``, ...) and the bidirectional ops
(``fastseq::gru_bidirectional_recurrence``, ...: both directions of a layer at
once, :mod:`.directions`) have the same three.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastseq.backend import registry, selection
from fastseq.backend.registry import Implementation, needs_grad
from fastseq.ops import validation
from fastseq.ops.recurrence import cpp, directions, naive

__all__ = ["gru", "gru_packed", "gru_packed_recurrence", "gru_packed_recurrence_backward", "gru_recurrence",
           "gru_recurrence_backward", "lstm", "lstm_packed", "lstm_packed_recurrence",
           "lstm_packed_recurrence_backward", "lstm_recurrence", "lstm_recurrence_backward",
           "packed_final_rows"]

GRU_FORWARD, GRU_BACKWARD = "gru_recurrence", "gru_recurrence_backward"
LSTM_FORWARD, LSTM_BACKWARD = "lstm_recurrence", "lstm_recurrence_backward"


# ------------------------------------------------------------------ registry


def _triton():
    """The Triton kernels, imported on first use (importing Triton costs ~0.3 s and needs it)."""
    from fastseq.ops.recurrence import triton as kernels

    return kernels


def sequence_kernels_on() -> bool:
    """``FASTSEQ_TRITON_SEQUENCE=1``: dense recurrences on the Triton backend run as one
    launch per call (:mod:`.triton_sequence`, the time loop inside the kernel) where
    they fit, instead of one bound launch per step (:mod:`.triton`). Off by default
    until a GPU has measured which is faster (bench/NOTES.md v0.7)."""
    return os.environ.get("FASTSEQ_TRITON_SEQUENCE", "0") == "1"


def _triton_dense(name: str, gates: int, h0_arg: int) -> Implementation:
    """The Triton implementation of dense op function ``name``: :mod:`.triton`'s per-step
    form, or :mod:`.triton_sequence`'s when :func:`sequence_kernels_on` and it fits
    (``h0`` is argument ``h0_arg``)."""
    def load():
        from fastseq.ops.recurrence import triton_sequence

        per_step, sequence = getattr(_triton(), name), getattr(triton_sequence, name)

        def run(*args):
            h0 = args[h0_arg]
            if sequence_kernels_on() and triton_sequence.fits(h0.shape[0], h0.shape[1], gates, h0.dtype, h0.device):
                return sequence(*args)
            return per_step(*args)
        return run, _triton().limits
    return Implementation(load=load)


registry.register(GRU_FORWARD, "reference", naive.gru_recurrence_forward)
registry.register(GRU_FORWARD, "cpp", cpp.gru_recurrence_forward)
registry.register(GRU_FORWARD, "triton", _triton_dense("gru_recurrence_forward", 3, 1))
registry.register(GRU_BACKWARD, "reference", naive.gru_recurrence_backward)
registry.register(GRU_BACKWARD, "cpp", cpp.gru_recurrence_backward)
registry.register(GRU_BACKWARD, "triton", _triton_dense("gru_recurrence_backward", 3, 1))
registry.register(LSTM_FORWARD, "reference", naive.lstm_recurrence_forward)
registry.register(LSTM_FORWARD, "cpp", cpp.lstm_recurrence_forward)
registry.register(LSTM_FORWARD, "triton", _triton_dense("lstm_recurrence_forward", 4, 1))
registry.register(LSTM_BACKWARD, "reference", naive.lstm_recurrence_backward)
registry.register(LSTM_BACKWARD, "cpp", cpp.lstm_recurrence_backward)
registry.register(LSTM_BACKWARD, "triton", _triton_dense("lstm_recurrence_backward", 4, 2))


GRU_PACKED, GRU_PACKED_BACKWARD = "gru_packed_recurrence", "gru_packed_recurrence_backward"
LSTM_PACKED, LSTM_PACKED_BACKWARD = "lstm_packed_recurrence", "lstm_packed_recurrence_backward"

registry.register(GRU_PACKED, "reference", naive.gru_packed_recurrence_forward)
registry.register(GRU_PACKED, "cpp", cpp.gru_packed_recurrence_forward)
registry.register(GRU_PACKED, "triton", Implementation(
    load=lambda: (_triton().gru_packed_recurrence_forward, _triton().limits)))
registry.register(GRU_PACKED_BACKWARD, "reference", naive.gru_packed_recurrence_backward)
registry.register(GRU_PACKED_BACKWARD, "cpp", cpp.gru_packed_recurrence_backward)
registry.register(GRU_PACKED_BACKWARD, "triton", Implementation(
    load=lambda: (_triton().gru_packed_recurrence_backward, _triton().limits)))
registry.register(LSTM_PACKED, "reference", naive.lstm_packed_recurrence_forward)
registry.register(LSTM_PACKED, "cpp", cpp.lstm_packed_recurrence_forward)
registry.register(LSTM_PACKED, "triton", Implementation(
    load=lambda: (_triton().lstm_packed_recurrence_forward, _triton().limits)))
registry.register(LSTM_PACKED_BACKWARD, "reference", naive.lstm_packed_recurrence_backward)
registry.register(LSTM_PACKED_BACKWARD, "cpp", cpp.lstm_packed_recurrence_backward)
registry.register(LSTM_PACKED_BACKWARD, "triton", Implementation(
    load=lambda: (_triton().lstm_packed_recurrence_backward, _triton().limits)))


def _impl(op: str, t: Tensor, T: int, B: int, H: int, G: int):
    """The implementation of ``op`` for a ``G``-gate recurrence of these sizes on tensor ``t``."""
    return registry.implementation(op, t, {"T": T, "B": B, "H": H, "G": G})


def _grad_or_zeros(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _not_saved(op: str) -> RuntimeError:
    return RuntimeError(f"fastseq::{op} was called with save_gates=False, so it cannot be "
                        "differentiated; call it with save_gates=True when gradients are needed")


# --------------------------------------------------------------------------- GRU


@torch.library.custom_op(f"fastseq::{GRU_FORWARD}", mutates_args=())
def gru_recurrence(
    gi: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    lengths: Optional[Tensor],
    save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """GRU recurrence. gi ``[T,B,3H]``, h0 ``[B,H]`` -> hs ``[T,B,H]``, gates ``[T,B,4H]`` (or ``[0]``)."""
    fn = _impl(GRU_FORWARD, gi, gi.shape[0], gi.shape[1], h0.shape[1], 3)
    return fn(gi, h0, w_hh, b_hh, lengths, save_gates)


@gru_recurrence.register_fake
def _(gi, h0, w_hh, b_hh, lengths, save_gates):
    T, B, _ = gi.shape
    H = h0.shape[1]
    gates = gi.new_empty((T, B, 4 * H)) if save_gates else gi.new_empty((0,))
    return gi.new_empty((T, B, H)), gates


@torch.library.custom_op(f"fastseq::{GRU_BACKWARD}", mutates_args=())
def gru_recurrence_backward(
    grad_hs: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    hs: Tensor,
    gates: Tensor,
    lengths: Optional[Tensor],
    has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``gru_recurrence``; grad_b_hh is an empty ``[0]`` tensor when has_bias is False."""
    fn = _impl(GRU_BACKWARD, hs, *hs.shape, 3)
    return fn(grad_hs, h0, w_hh, hs, gates, lengths, has_bias)


@gru_recurrence_backward.register_fake
def _(grad_hs, h0, w_hh, hs, gates, lengths, has_bias):
    T, B, H = hs.shape
    db = w_hh.new_empty((w_hh.shape[0],)) if has_bias else w_hh.new_empty((0,))
    return hs.new_empty((T, B, 3 * H)), torch.empty_like(h0), torch.empty_like(w_hh), db


def _gru_setup_context(ctx, inputs, output):
    gi, h0, w_hh, b_hh, lengths, save_gates = inputs
    hs, gates = output
    ctx.has_bias = b_hh is not None
    ctx.save_gates = save_gates
    ctx.backend = selection.forced()
    ctx.set_materialize_grads(False)  # absent gradients stay None (_grad_or_zeros)
    ctx.save_for_backward(h0, w_hh, hs, gates, lengths)


def _gru_backward(ctx, grad_hs, _grad_gates):
    if not ctx.save_gates:
        raise _not_saved(GRU_FORWARD)
    h0, w_hh, hs, gates, lengths = ctx.saved_tensors
    grad_hs = _grad_or_zeros(grad_hs, hs).contiguous()
    with selection.backend(ctx.backend):
        dgi, dh0, dw, db = gru_recurrence_backward(grad_hs, h0, w_hh, hs, gates, lengths, ctx.has_bias)
    return dgi, dh0, dw, (db if ctx.has_bias else None), None, None


torch.library.register_autograd(f"fastseq::{GRU_FORWARD}", _gru_backward, setup_context=_gru_setup_context)


# -------------------------------------------------------------------------- LSTM


@torch.library.custom_op(f"fastseq::{LSTM_FORWARD}", mutates_args=())
def lstm_recurrence(
    gi: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    lengths: Optional[Tensor],
    save_gates: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """LSTM recurrence. gi ``[T,B,4H]`` -> hs, cs ``[T,B,H]``, gates ``[T,B,4H]`` (or ``[0]``)."""
    fn = _impl(LSTM_FORWARD, gi, gi.shape[0], gi.shape[1], h0.shape[1], 4)
    return fn(gi, h0, c0, w_hh, b_hh, lengths, save_gates)


@lstm_recurrence.register_fake
def _(gi, h0, c0, w_hh, b_hh, lengths, save_gates):
    T, B, _ = gi.shape
    H = h0.shape[1]
    gates = gi.new_empty((T, B, 4 * H)) if save_gates else gi.new_empty((0,))
    return gi.new_empty((T, B, H)), gi.new_empty((T, B, H)), gates


@torch.library.custom_op(f"fastseq::{LSTM_BACKWARD}", mutates_args=())
def lstm_recurrence_backward(
    grad_hs: Tensor,
    grad_cs: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    hs: Tensor,
    cs: Tensor,
    gates: Tensor,
    lengths: Optional[Tensor],
    has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``lstm_recurrence``; grad_b_hh is ``[0]`` when has_bias is False."""
    fn = _impl(LSTM_BACKWARD, hs, *hs.shape, 4)
    return fn(grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, lengths, has_bias)


@lstm_recurrence_backward.register_fake
def _(grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, lengths, has_bias):
    T, B, H = hs.shape
    db = w_hh.new_empty((w_hh.shape[0],)) if has_bias else w_hh.new_empty((0,))
    return (
        hs.new_empty((T, B, 4 * H)),
        torch.empty_like(h0),
        torch.empty_like(c0),
        torch.empty_like(w_hh),
        db,
    )


def _lstm_setup_context(ctx, inputs, output):
    gi, h0, c0, w_hh, b_hh, lengths, save_gates = inputs
    hs, cs, gates = output
    ctx.has_bias = b_hh is not None
    ctx.save_gates = save_gates
    ctx.backend = selection.forced()
    ctx.set_materialize_grads(False)  # absent gradients stay None (_grad_or_zeros)
    ctx.save_for_backward(h0, c0, w_hh, hs, cs, gates, lengths)


def _lstm_backward(ctx, grad_hs, grad_cs, _grad_gates):
    if not ctx.save_gates:
        raise _not_saved(LSTM_FORWARD)
    h0, c0, w_hh, hs, cs, gates, lengths = ctx.saved_tensors
    grad_hs = _grad_or_zeros(grad_hs, hs).contiguous()
    grad_cs = _grad_or_zeros(grad_cs, cs).contiguous()
    with selection.backend(ctx.backend):
        dgi, dh0, dc0, dw, db = lstm_recurrence_backward(
            grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, lengths, ctx.has_bias
        )
    return dgi, dh0, dc0, dw, (db if ctx.has_bias else None), None, None


torch.library.register_autograd(f"fastseq::{LSTM_FORWARD}", _lstm_backward, setup_context=_lstm_setup_context)


# ---------------------------------------------------------------- packed layout
#
# The same recurrences on a PackedSequence's own layout (naive.py, "packed
# layout"): gi [N, G*H], batch_sizes int64 [T] on the CPU, reverse for the
# second direction of a bidirectional layer. Step t computes only its
# batch_sizes[t] rows.


def _packed_impl(op: str, t: Tensor, N: int, B: int, H: int, G: int, T: int):
    return registry.implementation(op, t, {"N": N, "B": B, "H": H, "G": G, "T": T})


@torch.library.custom_op(f"fastseq::{GRU_PACKED}", mutates_args=())
def gru_packed_recurrence(
    gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Tensor, reverse: bool,
    save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """Packed GRU recurrence. gi ``[N,3H]``, h0 ``[B,H]`` -> hs ``[N,H]``, gates ``[N,4H]`` (or ``[0]``)."""
    fn = _packed_impl(GRU_PACKED, gi, gi.shape[0], h0.shape[0], h0.shape[1], 3, batch_sizes.shape[0])
    return fn(gi, h0, w_hh, b_hh, batch_sizes, reverse, save_gates)


@gru_packed_recurrence.register_fake
def _(gi, h0, w_hh, b_hh, batch_sizes, reverse, save_gates):
    N, H = gi.shape[0], h0.shape[1]
    gates = gi.new_empty((N, 4 * H)) if save_gates else gi.new_empty((0,))
    return gi.new_empty((N, H)), gates


@torch.library.custom_op(f"fastseq::{GRU_PACKED_BACKWARD}", mutates_args=())
def gru_packed_recurrence_backward(
    grad_hs: Tensor, h0: Tensor, w_hh: Tensor, hs: Tensor, gates: Tensor, batch_sizes: Tensor,
    reverse: bool, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``gru_packed_recurrence``; grad_b_hh is ``[0]`` when has_bias is False."""
    fn = _packed_impl(GRU_PACKED_BACKWARD, hs, hs.shape[0], h0.shape[0], h0.shape[1], 3, batch_sizes.shape[0])
    return fn(grad_hs, h0, w_hh, hs, gates, batch_sizes, reverse, has_bias)


@gru_packed_recurrence_backward.register_fake
def _(grad_hs, h0, w_hh, hs, gates, batch_sizes, reverse, has_bias):
    N, H = hs.shape
    db = w_hh.new_empty((w_hh.shape[0],)) if has_bias else w_hh.new_empty((0,))
    return hs.new_empty((N, 3 * H)), torch.empty_like(h0), torch.empty_like(w_hh), db


def _gru_packed_setup_context(ctx, inputs, output):
    gi, h0, w_hh, b_hh, batch_sizes, reverse, save_gates = inputs
    hs, gates = output
    ctx.has_bias, ctx.save_gates, ctx.reverse = b_hh is not None, save_gates, reverse
    ctx.backend = selection.forced()
    ctx.set_materialize_grads(False)  # absent gradients stay None (_grad_or_zeros)
    ctx.save_for_backward(h0, w_hh, hs, gates, batch_sizes)


def _gru_packed_backward(ctx, grad_hs, _grad_gates):
    if not ctx.save_gates:
        raise _not_saved(GRU_PACKED)
    h0, w_hh, hs, gates, batch_sizes = ctx.saved_tensors
    grad_hs = _grad_or_zeros(grad_hs, hs).contiguous()
    with selection.backend(ctx.backend):
        dgi, dh0, dw, db = gru_packed_recurrence_backward(
            grad_hs, h0, w_hh, hs, gates, batch_sizes, ctx.reverse, ctx.has_bias)
    return dgi, dh0, dw, (db if ctx.has_bias else None), None, None, None


torch.library.register_autograd(f"fastseq::{GRU_PACKED}", _gru_packed_backward,
                                setup_context=_gru_packed_setup_context)


@torch.library.custom_op(f"fastseq::{LSTM_PACKED}", mutates_args=())
def lstm_packed_recurrence(
    gi: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Tensor,
    reverse: bool, save_gates: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Packed LSTM recurrence. gi ``[N,4H]`` -> hs, cs ``[N,H]``, gates ``[N,4H]`` (or ``[0]``)."""
    fn = _packed_impl(LSTM_PACKED, gi, gi.shape[0], h0.shape[0], h0.shape[1], 4, batch_sizes.shape[0])
    return fn(gi, h0, c0, w_hh, b_hh, batch_sizes, reverse, save_gates)


@lstm_packed_recurrence.register_fake
def _(gi, h0, c0, w_hh, b_hh, batch_sizes, reverse, save_gates):
    N, H = gi.shape[0], h0.shape[1]
    gates = gi.new_empty((N, 4 * H)) if save_gates else gi.new_empty((0,))
    return gi.new_empty((N, H)), gi.new_empty((N, H)), gates


@torch.library.custom_op(f"fastseq::{LSTM_PACKED_BACKWARD}", mutates_args=())
def lstm_packed_recurrence_backward(
    grad_hs: Tensor, grad_cs: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, hs: Tensor, cs: Tensor,
    gates: Tensor, batch_sizes: Tensor, reverse: bool, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``lstm_packed_recurrence``; grad_b_hh is ``[0]`` when has_bias is False."""
    fn = _packed_impl(LSTM_PACKED_BACKWARD, hs, hs.shape[0], h0.shape[0], h0.shape[1], 4, batch_sizes.shape[0])
    return fn(grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, batch_sizes, reverse, has_bias)


@lstm_packed_recurrence_backward.register_fake
def _(grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, batch_sizes, reverse, has_bias):
    N, H = hs.shape
    db = w_hh.new_empty((w_hh.shape[0],)) if has_bias else w_hh.new_empty((0,))
    return (hs.new_empty((N, 4 * H)), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_hh), db)


def _lstm_packed_setup_context(ctx, inputs, output):
    gi, h0, c0, w_hh, b_hh, batch_sizes, reverse, save_gates = inputs
    hs, cs, gates = output
    ctx.has_bias, ctx.save_gates, ctx.reverse = b_hh is not None, save_gates, reverse
    ctx.backend = selection.forced()
    ctx.set_materialize_grads(False)  # absent gradients stay None (_grad_or_zeros)
    ctx.save_for_backward(h0, c0, w_hh, hs, cs, gates, batch_sizes)


def _lstm_packed_backward(ctx, grad_hs, grad_cs, _grad_gates):
    if not ctx.save_gates:
        raise _not_saved(LSTM_PACKED)
    h0, c0, w_hh, hs, cs, gates, batch_sizes = ctx.saved_tensors
    grad_hs = _grad_or_zeros(grad_hs, hs).contiguous()
    grad_cs = _grad_or_zeros(grad_cs, cs).contiguous()
    with selection.backend(ctx.backend):
        dgi, dh0, dc0, dw, db = lstm_packed_recurrence_backward(
            grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, batch_sizes, ctx.reverse, ctx.has_bias)
    return dgi, dh0, dc0, dw, (db if ctx.has_bias else None), None, None, None


torch.library.register_autograd(f"fastseq::{LSTM_PACKED}", _lstm_packed_backward,
                                setup_context=_lstm_packed_setup_context)


# Both directions of a bidirectional layer at once (:mod:`.directions`): gi
# [N, 2*G*H] from one GEMM, h0/c0 [2, B, H], w_hh [2, G*H, H], b_hh [2, G*H];
# hs/cs [N, 2H] (the layer's output), gates [2, N, 4H]. Triton runs both
# directions in one launch per step; the reference and C++ backends compose
# their packed ops.

GRU_BIDIR, GRU_BIDIR_BACKWARD = "gru_bidirectional_recurrence", "gru_bidirectional_recurrence_backward"
LSTM_BIDIR, LSTM_BIDIR_BACKWARD = "lstm_bidirectional_recurrence", "lstm_bidirectional_recurrence_backward"

registry.register(GRU_BIDIR, "reference", directions.gru_forward(naive.gru_packed_recurrence_forward))
registry.register(GRU_BIDIR, "cpp", directions.gru_forward(cpp.gru_packed_recurrence_forward))
registry.register(GRU_BIDIR, "triton", Implementation(
    load=lambda: (_triton().gru_bidirectional_recurrence_forward, _triton().limits)))
registry.register(GRU_BIDIR_BACKWARD, "reference", directions.gru_backward(naive.gru_packed_recurrence_backward))
registry.register(GRU_BIDIR_BACKWARD, "cpp", directions.gru_backward(cpp.gru_packed_recurrence_backward))
registry.register(GRU_BIDIR_BACKWARD, "triton", Implementation(
    load=lambda: (_triton().gru_bidirectional_recurrence_backward, _triton().limits)))
registry.register(LSTM_BIDIR, "reference", directions.lstm_forward(naive.lstm_packed_recurrence_forward))
registry.register(LSTM_BIDIR, "cpp", directions.lstm_forward(cpp.lstm_packed_recurrence_forward))
registry.register(LSTM_BIDIR, "triton", Implementation(
    load=lambda: (_triton().lstm_bidirectional_recurrence_forward, _triton().limits)))
registry.register(LSTM_BIDIR_BACKWARD, "reference", directions.lstm_backward(naive.lstm_packed_recurrence_backward))
registry.register(LSTM_BIDIR_BACKWARD, "cpp", directions.lstm_backward(cpp.lstm_packed_recurrence_backward))
registry.register(LSTM_BIDIR_BACKWARD, "triton", Implementation(
    load=lambda: (_triton().lstm_bidirectional_recurrence_backward, _triton().limits)))


def _bidir_sizes(N: int, h0: Tensor, G: int, T: int):
    return {"N": N, "B": h0.shape[1], "H": h0.shape[2], "G": G, "T": T}


@torch.library.custom_op(f"fastseq::{GRU_BIDIR}", mutates_args=())
def gru_bidirectional_recurrence(
    gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Tensor, save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """Both directions of a bidirectional GRU layer. gi ``[N,6H]``, h0 ``[2,B,H]`` -> hs
    ``[N,2H]``, gates ``[2,N,4H]`` (or ``[0]``)."""
    fn = registry.implementation(GRU_BIDIR, gi, _bidir_sizes(gi.shape[0], h0, 3, batch_sizes.shape[0]))
    return fn(gi, h0, w_hh, b_hh, batch_sizes, save_gates)


@gru_bidirectional_recurrence.register_fake
def _(gi, h0, w_hh, b_hh, batch_sizes, save_gates):
    N, H = gi.shape[0], h0.shape[2]
    gates = gi.new_empty((2, N, 4 * H)) if save_gates else gi.new_empty((0,))
    return gi.new_empty((N, 2 * H)), gates


@torch.library.custom_op(f"fastseq::{GRU_BIDIR_BACKWARD}", mutates_args=())
def gru_bidirectional_recurrence_backward(
    grad_hs: Tensor, h0: Tensor, w_hh: Tensor, hs: Tensor, gates: Tensor, batch_sizes: Tensor, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``gru_bidirectional_recurrence``; grad_b_hh is ``[0]`` when has_bias is False."""
    fn = registry.implementation(GRU_BIDIR_BACKWARD, hs, _bidir_sizes(hs.shape[0], h0, 3, batch_sizes.shape[0]))
    return fn(grad_hs, h0, w_hh, hs, gates, batch_sizes, has_bias)


@gru_bidirectional_recurrence_backward.register_fake
def _(grad_hs, h0, w_hh, hs, gates, batch_sizes, has_bias):
    N, H = hs.shape[0], h0.shape[2]
    db = w_hh.new_empty(w_hh.shape[:2]) if has_bias else w_hh.new_empty((0,))
    return hs.new_empty((N, 6 * H)), torch.empty_like(h0), torch.empty_like(w_hh), db


def _gru_bidir_setup_context(ctx, inputs, output):
    gi, h0, w_hh, b_hh, batch_sizes, save_gates = inputs
    hs, gates = output
    ctx.has_bias, ctx.save_gates = b_hh is not None, save_gates
    ctx.backend = selection.forced()
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h0, w_hh, hs, gates, batch_sizes)


def _gru_bidir_backward(ctx, grad_hs, _grad_gates):
    if not ctx.save_gates:
        raise _not_saved(GRU_BIDIR)
    h0, w_hh, hs, gates, batch_sizes = ctx.saved_tensors
    grad_hs = _grad_or_zeros(grad_hs, hs).contiguous()
    with selection.backend(ctx.backend):
        dgi, dh0, dw, db = gru_bidirectional_recurrence_backward(grad_hs, h0, w_hh, hs, gates, batch_sizes,
                                                                 ctx.has_bias)
    return dgi, dh0, dw, (db if ctx.has_bias else None), None, None


torch.library.register_autograd(f"fastseq::{GRU_BIDIR}", _gru_bidir_backward, setup_context=_gru_bidir_setup_context)


@torch.library.custom_op(f"fastseq::{LSTM_BIDIR}", mutates_args=())
def lstm_bidirectional_recurrence(
    gi: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Tensor,
    save_gates: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Both directions of a bidirectional LSTM layer. gi ``[N,8H]`` -> hs, cs ``[N,2H]``,
    gates ``[2,N,4H]`` (or ``[0]``)."""
    fn = registry.implementation(LSTM_BIDIR, gi, _bidir_sizes(gi.shape[0], h0, 4, batch_sizes.shape[0]))
    return fn(gi, h0, c0, w_hh, b_hh, batch_sizes, save_gates)


@lstm_bidirectional_recurrence.register_fake
def _(gi, h0, c0, w_hh, b_hh, batch_sizes, save_gates):
    N, H = gi.shape[0], h0.shape[2]
    gates = gi.new_empty((2, N, 4 * H)) if save_gates else gi.new_empty((0,))
    return gi.new_empty((N, 2 * H)), gi.new_empty((N, 2 * H)), gates


@torch.library.custom_op(f"fastseq::{LSTM_BIDIR_BACKWARD}", mutates_args=())
def lstm_bidirectional_recurrence_backward(
    grad_hs: Tensor, grad_cs: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, hs: Tensor, cs: Tensor,
    gates: Tensor, batch_sizes: Tensor, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``lstm_bidirectional_recurrence``; grad_b_hh is ``[0]`` when has_bias is False."""
    fn = registry.implementation(LSTM_BIDIR_BACKWARD, hs, _bidir_sizes(hs.shape[0], h0, 4, batch_sizes.shape[0]))
    return fn(grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, batch_sizes, has_bias)


@lstm_bidirectional_recurrence_backward.register_fake
def _(grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, batch_sizes, has_bias):
    N, H = hs.shape[0], h0.shape[2]
    db = w_hh.new_empty(w_hh.shape[:2]) if has_bias else w_hh.new_empty((0,))
    return hs.new_empty((N, 8 * H)), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_hh), db


def _lstm_bidir_setup_context(ctx, inputs, output):
    gi, h0, c0, w_hh, b_hh, batch_sizes, save_gates = inputs
    hs, cs, gates = output
    ctx.has_bias, ctx.save_gates = b_hh is not None, save_gates
    ctx.backend = selection.forced()
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h0, c0, w_hh, hs, cs, gates, batch_sizes)


def _lstm_bidir_backward(ctx, grad_hs, grad_cs, _grad_gates):
    if not ctx.save_gates:
        raise _not_saved(LSTM_BIDIR)
    h0, c0, w_hh, hs, cs, gates, batch_sizes = ctx.saved_tensors
    grad_hs = _grad_or_zeros(grad_hs, hs).contiguous()
    grad_cs = _grad_or_zeros(grad_cs, cs).contiguous()
    with selection.backend(ctx.backend):
        dgi, dh0, dc0, dw, db = lstm_bidirectional_recurrence_backward(
            grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, batch_sizes, ctx.has_bias)
    return dgi, dh0, dc0, dw, (db if ctx.has_bias else None), None, None


torch.library.register_autograd(f"fastseq::{LSTM_BIDIR}", _lstm_bidir_backward,
                                setup_context=_lstm_bidir_setup_context)


# ----------------------------------------------------------------- functional API


def _check_args(gates: int, gi: Tensor, states: Tuple[Tuple[str, Tensor], ...], w_hh: Tensor,
                b_hh: Optional[Tensor], lengths: Optional[Tensor]) -> Optional[Tensor]:
    """Validate a recurrence call (:mod:`fastseq.ops.validation`'s conventions).

    Returns ``lengths`` checked (values in ``[1, T]``) and on gi's device.
    """
    validation.tensor("gi", gi)
    for name, t in states:
        validation.tensor(name, t)
    validation.tensor("w_hh", w_hh)
    validation.optional_tensor("b_hh", b_hh)
    if gi.dim() != 3:
        raise RuntimeError(f"gi: expected a 3-D tensor [T, B, {gates}*H], got shape {tuple(gi.shape)}")
    T, B, GH = gi.shape
    for name, t in states:
        if t.dim() != 2:
            raise RuntimeError(f"{name}: expected a 2-D tensor [B, H], got shape {tuple(t.shape)}")
    H = states[0][1].shape[1]
    if GH != gates * H:
        raise RuntimeError(f"gi: expected size(2) == {gates}*H = {gates * H} (H from h0), "
                           f"got shape {tuple(gi.shape)}")
    for name, t in states:
        validation.shape(name, t, (B, H), "(B, H) = ")
    validation.shape("w_hh", w_hh, (gates * H, H))
    if b_hh is not None:
        validation.shape("b_hh", b_hh, (gates * H,))
    validation.floating("gi", gi)
    for name, t in states + (("w_hh", w_hh),) + ((("b_hh", b_hh),) if b_hh is not None else ()):
        validation.like(name, t, gi, "gi")
    return validation.lengths("lengths", lengths, B, T, gi.device)


def gru(
    gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tensor:
    """GRU recurrence over precomputed input projections (Cho et al. 2014, torch.nn.GRU's form);
    saves gates only when a gradient is needed.

    Args:
        gi: ``[T, B, 3H]`` = ``x W_ih^T + b_ih`` for every step (gate order r, z, n).
        h0: ``[B, H]``. w_hh: ``[3H, H]``. b_hh: ``[3H]`` or None.
        lengths: int32/int64 ``[B]`` on the CPU or gi's device, or None (every row
            runs T steps). Every value in ``[1, T]``; any order (sorted or not: rows
            are independent). Row ``b`` updates at steps ``t < lengths[b]`` only.
            CPU lengths are checked without a device sync; device lengths are
            checked once per tensor object and version (one sync, cached).

    Returns:
        hs ``[T, B, H]``: the state after every step; rows past their length
        carry their final state, so ``hs[-1]`` is h_n. (T = 0 or B = 0 give an
        empty ``hs``.)

    Raises:
        fastseq.ops.validation.ArgumentTypeError: an argument that is not a tensor.
        RuntimeError: a shape, dtype or device that does not fit; ``lengths`` < 1 or > T.
        (Each message names the argument, the expected and the actual value.)
    """
    lengths = _check_args(3, gi, (("h0", h0),), w_hh, b_hh, lengths)
    if not torch.compiler.is_compiling():
        sizes = {"T": gi.shape[0], "B": gi.shape[1], "H": h0.shape[1], "G": 3}
        name = registry.choose(GRU_FORWARD, gi, sizes)
        if name == "cpp":  # autograd in C++ (cpp.py)
            return cpp.gru_recurrence(gi, h0, w_hh, b_hh, lengths)
        if not needs_grad(gi, h0, w_hh, b_hh):
            return registry.get(GRU_FORWARD, name).fn(gi, h0, w_hh, b_hh, lengths, False)[0]
    hs, _ = gru_recurrence(gi, h0, w_hh, b_hh, lengths, needs_grad(gi, h0, w_hh, b_hh))
    return hs


def lstm(
    gi: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """LSTM recurrence over precomputed input projections (Hochreiter & Schmidhuber 1997,
    torch.nn.LSTM's form; gate order i, f, g, o).

    Args:
        gi: ``[T, B, 4H]``; h0, c0: ``[B, H]``; w_hh: ``[4H, H]``; b_hh: ``[4H]`` or None;
        lengths: as :func:`gru`.

    Returns:
        (hs, cs), each ``[T, B, H]``; ``hs[-1]``, ``cs[-1]`` are h_n, c_n.

    Raises:
        ArgumentTypeError / RuntimeError: as :func:`gru`.
    """
    lengths = _check_args(4, gi, (("h0", h0), ("c0", c0)), w_hh, b_hh, lengths)
    if not torch.compiler.is_compiling():
        sizes = {"T": gi.shape[0], "B": gi.shape[1], "H": h0.shape[1], "G": 4}
        name = registry.choose(LSTM_FORWARD, gi, sizes)
        if name == "cpp":
            return cpp.lstm_recurrence(gi, h0, c0, w_hh, b_hh, lengths)
        if not needs_grad(gi, h0, c0, w_hh, b_hh):
            hs, cs, _ = registry.get(LSTM_FORWARD, name).fn(gi, h0, c0, w_hh, b_hh, lengths, False)
            return hs, cs
    hs, cs, _ = lstm_recurrence(gi, h0, c0, w_hh, b_hh, lengths, needs_grad(gi, h0, c0, w_hh, b_hh))
    return hs, cs


def _check_packed(gates: int, gi: Tensor, states: Tuple[Tuple[str, Tensor], ...], w_hh: Tensor,
                  b_hh: Optional[Tensor], batch_sizes: Tensor) -> None:
    validation.tensor("gi", gi)
    for name, t in states:
        validation.tensor(name, t)
    validation.tensor("w_hh", w_hh)
    validation.optional_tensor("b_hh", b_hh)
    if gi.dim() != 2:
        raise RuntimeError(f"gi: expected a 2-D tensor [N, {gates}*H] (packed), got shape {tuple(gi.shape)}")
    for name, t in states:
        if t.dim() != 2:
            raise RuntimeError(f"{name}: expected a 2-D tensor [B, H], got shape {tuple(t.shape)}")
    B, H = states[0][1].shape
    if gi.shape[1] != gates * H:
        raise RuntimeError(f"gi: expected size(1) == {gates}*H = {gates * H} (H from h0), "
                           f"got shape {tuple(gi.shape)}")
    for name, t in states:
        validation.shape(name, t, (B, H), "(B, H) = ")
    validation.shape("w_hh", w_hh, (gates * H, H))
    if b_hh is not None:
        validation.shape("b_hh", b_hh, (gates * H,))
    validation.floating("gi", gi)
    for name, t in states + (("w_hh", w_hh),) + ((("b_hh", b_hh),) if b_hh is not None else ()):
        validation.like(name, t, gi, "gi")
    validation.batch_sizes("batch_sizes", batch_sizes, B, gi.shape[0])


def gru_packed(gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Tensor,
               reverse: bool = False) -> Tensor:
    """GRU recurrence on a PackedSequence's layout (cuDNN's packed mode): step ``t``
    computes only the ``batch_sizes[t]`` rows still running.

    Args:
        gi: ``[N, 3H]`` = ``data W_ih^T + b_ih`` for a PackedSequence's ``data [N, I]``.
        h0: ``[B, H]`` in the packed (sorted) row order; B = batch_sizes[0].
        w_hh: ``[3H, H]``. b_hh: ``[3H]`` or None.
        batch_sizes: the PackedSequence's int64 CPU ``[T]`` (non-increasing).
        reverse: run from each row's last step back to its first (the reverse
            direction of a bidirectional layer), starting from ``h0``.

    Returns:
        hs ``[N, H]``, packed like gi. Each row's final state is at
        :func:`packed_final_rows`.

    Raises:
        ArgumentTypeError / RuntimeError: as :func:`gru`; ``batch_sizes`` not
        a PackedSequence's (not int64 CPU 1-D, increasing, first != B, sum != N).
    """
    _check_packed(3, gi, (("h0", h0),), w_hh, b_hh, batch_sizes)
    if not torch.compiler.is_compiling():
        sizes = {"N": gi.shape[0], "B": h0.shape[0], "H": h0.shape[1], "G": 3, "T": batch_sizes.shape[0]}
        name = registry.choose(GRU_PACKED, gi, sizes)
        if name == "cpp":
            return cpp.gru_packed_recurrence(gi, h0, w_hh, b_hh, batch_sizes, reverse)
        if not needs_grad(gi, h0, w_hh, b_hh):
            fn = registry.get(GRU_PACKED, name).fn
            return fn(gi, h0, w_hh, b_hh, batch_sizes, reverse, False)[0]
    hs, _ = gru_packed_recurrence(gi, h0, w_hh, b_hh, batch_sizes, reverse, needs_grad(gi, h0, w_hh, b_hh))
    return hs


def lstm_packed(gi: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor],
                batch_sizes: Tensor, reverse: bool = False) -> Tuple[Tensor, Tensor]:
    """LSTM recurrence on a PackedSequence's layout; as :func:`gru_packed` with
    gi ``[N, 4H]``, c0 ``[B, H]``, w_hh ``[4H, H]``. Returns (hs, cs), each ``[N, H]``."""
    _check_packed(4, gi, (("h0", h0), ("c0", c0)), w_hh, b_hh, batch_sizes)
    if not torch.compiler.is_compiling():
        sizes = {"N": gi.shape[0], "B": h0.shape[0], "H": h0.shape[1], "G": 4, "T": batch_sizes.shape[0]}
        name = registry.choose(LSTM_PACKED, gi, sizes)
        if name == "cpp":
            return cpp.lstm_packed_recurrence(gi, h0, c0, w_hh, b_hh, batch_sizes, reverse)
        if not needs_grad(gi, h0, c0, w_hh, b_hh):
            fn = registry.get(LSTM_PACKED, name).fn
            hs, cs, _ = fn(gi, h0, c0, w_hh, b_hh, batch_sizes, reverse, False)
            return hs, cs
    hs, cs, _ = lstm_packed_recurrence(gi, h0, c0, w_hh, b_hh, batch_sizes, reverse,
                                       needs_grad(gi, h0, c0, w_hh, b_hh))
    return hs, cs


def packed_final_rows(batch_sizes: Tensor, reverse: bool = False) -> Tensor:
    """int64 ``[B]`` (CPU): where each sequence's final state lies in a packed ``hs``.

    The forward direction ends at each row's last step (row b at
    ``offsets[lengths[b] - 1] + b``); the reverse direction ends at step 0
    (rows ``0 .. B-1``).

    Raises:
        ArgumentTypeError / RuntimeError: ``batch_sizes`` is not a PackedSequence's
        (as :func:`gru_packed`).
    """
    ok = isinstance(batch_sizes, Tensor) and batch_sizes.dim() == 1 and batch_sizes.numel() > 0
    B, N = (int(batch_sizes[0]), int(batch_sizes.sum())) if ok else (0, 0)
    validation.batch_sizes("batch_sizes", batch_sizes, B, N)
    rows = torch.arange(B)
    if reverse:
        return rows
    lengths = (batch_sizes.unsqueeze(0) > rows.unsqueeze(1)).sum(1)  # [B], sorted
    offsets = torch.cumsum(batch_sizes, 0) - batch_sizes
    return offsets[lengths - 1] + rows


def _check_bidirectional(gates: int, gi: Tensor, states: Tuple[Tuple[str, Tensor], ...], w_hh: Tensor,
                         b_hh: Optional[Tensor], batch_sizes: Tensor) -> None:
    validation.tensor("gi", gi)
    for name, t in states:
        validation.tensor(name, t)
    validation.tensor("w_hh", w_hh)
    validation.optional_tensor("b_hh", b_hh)
    for name, t in states:
        if t.dim() != 3 or t.shape[0] != 2:
            raise RuntimeError(f"{name}: expected a 3-D tensor [2, B, H] (one state per direction), "
                               f"got shape {tuple(t.shape)}")
    _, B, H = states[0][1].shape
    if gi.dim() != 2 or gi.shape[1] != 2 * gates * H:
        raise RuntimeError(f"gi: expected a 2-D tensor [N, 2*{gates}*H] = [N, {2 * gates * H}] (both directions' "
                           f"input projections, H from h0), got shape {tuple(gi.shape)}")
    for name, t in states:
        validation.shape(name, t, (2, B, H), "(2, B, H) = ")
    validation.shape("w_hh", w_hh, (2, gates * H, H))
    if b_hh is not None:
        validation.shape("b_hh", b_hh, (2, gates * H))
    validation.floating("gi", gi)
    for name, t in states + (("w_hh", w_hh),) + ((("b_hh", b_hh),) if b_hh is not None else ()):
        validation.like(name, t, gi, "gi")
    validation.batch_sizes("batch_sizes", batch_sizes, B, gi.shape[0])


def fuses_directions(t: Tensor, B: int, H: int, gates: int, T: int) -> bool:
    """Whether the backend that runs a recurrence on ``t`` (same device and dtype) runs
    both directions of a bidirectional layer in one launch per step (Triton); the other
    backends compose one-direction ops, and a bidirectional layer is cheaper calling
    those itself (no column copies of gi). False inside a torch.compile trace."""
    if torch.compiler.is_compiling():  # traces keep the one-direction custom ops
        return False
    name = GRU_BIDIR if gates == 3 else LSTM_BIDIR
    return registry.choose(name, t, lambda: {"N": B * T, "B": B, "H": H, "G": gates, "T": T}) == "triton"


def gru_bidirectional(gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Tensor) -> Tensor:
    """Both directions of a bidirectional GRU layer on a PackedSequence's layout, at once.

    Args:
        gi: ``[N, 6H]``: ``data [W_ih; W_ih_reverse]^T + [b_ih; b_ih_reverse]``, one GEMM
            for both directions (direction d in columns ``3H*d .. 3H*(d+1)``).
        h0: ``[2, B, H]`` (forward, reverse), packed (sorted) row order.
        w_hh: ``[2, 3H, H]``. b_hh: ``[2, 3H]`` or None.
        batch_sizes: the PackedSequence's int64 CPU ``[T]``; dense input is every row
            T long (``torch.full((T,), B)``, rows ``t*B + b``).

    Returns:
        hs ``[N, 2H]``: the layer's output, forward direction in columns ``:H``, reverse
        in ``H:``. Final states: forward at :func:`packed_final_rows`, reverse at rows
        ``0 .. B-1``.

    Raises:
        ArgumentTypeError / RuntimeError: as :func:`gru_packed` (shapes with the
        direction dimension: h0 ``[2, B, H]``, w_hh ``[2, 3H, H]``, b_hh ``[2, 3H]``).
    """
    _check_bidirectional(3, gi, (("h0", h0),), w_hh, b_hh, batch_sizes)
    hs, _ = gru_bidirectional_recurrence(gi, h0, w_hh, b_hh, batch_sizes, needs_grad(gi, h0, w_hh, b_hh))
    return hs


def lstm_bidirectional(gi: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor],
                       batch_sizes: Tensor) -> Tuple[Tensor, Tensor]:
    """Both directions of a bidirectional LSTM layer at once; as :func:`gru_bidirectional`
    with gi ``[N, 8H]``, c0 ``[2, B, H]``, w_hh ``[2, 4H, H]``, b_hh ``[2, 4H]``. Returns
    (hs, cs), each ``[N, 2H]``."""
    _check_bidirectional(4, gi, (("h0", h0), ("c0", c0)), w_hh, b_hh, batch_sizes)
    hs, cs, _ = lstm_bidirectional_recurrence(gi, h0, c0, w_hh, b_hh, batch_sizes,
                                              needs_grad(gi, h0, c0, w_hh, b_hh))
    return hs, cs
