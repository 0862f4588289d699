"""GRU/LSTM recurrences as torch.library custom ops, and the one dispatcher.

Ops (all time-major; see :mod:`fastseq.ops.reference` for the equations)::

    fastseq::gru_recurrence(gi, h0, w_hh, b_hh?, lengths?, save_gates) -> (hs, gates)
    fastseq::gru_recurrence_backward(grad_hs, h0, w_hh, hs, gates, lengths?, has_bias)
        -> (grad_gi, grad_h0, grad_w_hh, grad_b_hh)
    fastseq::lstm_recurrence(gi, h0, c0, w_hh, b_hh?, lengths?, save_gates) -> (hs, cs, gates)
    fastseq::lstm_recurrence_backward(...)

Each op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)``
traces models that use them, and an autograd formula registered with
``torch.library.register_autograd`` that calls the backward op. The input
projection ``x W_ih^T + b_ih`` is *not* part of the op: callers compute it for
all steps with one matrix product and autograd differentiates it.

The implementation behind each op is picked per call by
:func:`fastseq._backend.select`: fused Triton kernels on CUDA tensors (or on CPU
tensors under the Triton interpreter when forced), else the reference.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastseq.ops import _checks
from fastseq.ops._dispatch import direct_call_ok, implementation, needs_grad

_LIB = "fastseq"


def _impl(t: Tensor, T: int, B: int, H: int, G: int):
    """The module implementing a ``G``-gate recurrence of these sizes on tensor ``t``
    (Triton, C++ or reference; a shape a fused backend cannot take falls back)."""
    return implementation(t, "rnn", {"T": T, "B": B, "H": H, "G": G})


def _grad_or_zeros(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


# --------------------------------------------------------------------------- GRU


@torch.library.custom_op(f"{_LIB}::gru_recurrence", mutates_args=())
def gru_recurrence(
    gi: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    lengths: Optional[Tensor],
    save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """GRU recurrence. gi ``[T,B,3H]``, h0 ``[B,H]`` -> hs ``[T,B,H]``, gates ``[T,B,4H]`` (or ``[0]``)."""
    mod, kw = _impl(gi, gi.shape[0], gi.shape[1], h0.shape[1], 3)
    return mod.gru_recurrence_forward(gi, h0, w_hh, b_hh, lengths, save_gates, **kw)


@gru_recurrence.register_fake
def _(gi, h0, w_hh, b_hh, lengths, save_gates):
    T, B, _ = gi.shape
    H = h0.shape[1]
    gates = gi.new_empty((T, B, 4 * H)) if save_gates else gi.new_empty((0,))
    return gi.new_empty((T, B, H)), gates


@torch.library.custom_op(f"{_LIB}::gru_recurrence_backward", mutates_args=())
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
    mod, kw = _impl(hs, *hs.shape, 3)
    out = mod.gru_recurrence_backward(grad_hs, h0, w_hh, hs, gates, lengths, has_bias, **kw)
    dgi, dh0, dw, db = out
    return dgi, dh0, dw, db if db is not None else w_hh.new_empty((0,))


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
    ctx.save_for_backward(h0, w_hh, hs, gates, lengths)


def _gru_backward(ctx, grad_hs, _grad_gates):
    if not ctx.save_gates:
        raise RuntimeError(
            "fastseq::gru_recurrence was called with save_gates=False, so it cannot be "
            "differentiated; call it with save_gates=True when gradients are needed"
        )
    h0, w_hh, hs, gates, lengths = ctx.saved_tensors
    grad_hs = _grad_or_zeros(grad_hs, hs).contiguous()
    dgi, dh0, dw, db = gru_recurrence_backward(grad_hs, h0, w_hh, hs, gates, lengths, ctx.has_bias)
    return dgi, dh0, dw, (db if ctx.has_bias else None), None, None


torch.library.register_autograd(
    f"{_LIB}::gru_recurrence", _gru_backward, setup_context=_gru_setup_context
)


# -------------------------------------------------------------------------- LSTM


@torch.library.custom_op(f"{_LIB}::lstm_recurrence", mutates_args=())
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
    mod, kw = _impl(gi, gi.shape[0], gi.shape[1], h0.shape[1], 4)
    return mod.lstm_recurrence_forward(gi, h0, c0, w_hh, b_hh, lengths, save_gates, **kw)


@lstm_recurrence.register_fake
def _(gi, h0, c0, w_hh, b_hh, lengths, save_gates):
    T, B, _ = gi.shape
    H = h0.shape[1]
    gates = gi.new_empty((T, B, 4 * H)) if save_gates else gi.new_empty((0,))
    return gi.new_empty((T, B, H)), gi.new_empty((T, B, H)), gates


@torch.library.custom_op(f"{_LIB}::lstm_recurrence_backward", mutates_args=())
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
    mod, kw = _impl(hs, *hs.shape, 4)
    out = mod.lstm_recurrence_backward(
        grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, lengths, has_bias, **kw
    )
    dgi, dh0, dc0, dw, db = out
    return dgi, dh0, dc0, dw, db if db is not None else w_hh.new_empty((0,))


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
    ctx.save_for_backward(h0, c0, w_hh, hs, cs, gates, lengths)


def _lstm_backward(ctx, grad_hs, grad_cs, _grad_gates):
    if not ctx.save_gates:
        raise RuntimeError(
            "fastseq::lstm_recurrence was called with save_gates=False, so it cannot be "
            "differentiated; call it with save_gates=True when gradients are needed"
        )
    h0, c0, w_hh, hs, cs, gates, lengths = ctx.saved_tensors
    grad_hs = _grad_or_zeros(grad_hs, hs).contiguous()
    grad_cs = _grad_or_zeros(grad_cs, cs).contiguous()
    dgi, dh0, dc0, dw, db = lstm_recurrence_backward(
        grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, lengths, ctx.has_bias
    )
    return dgi, dh0, dc0, dw, (db if ctx.has_bias else None), None, None


torch.library.register_autograd(
    f"{_LIB}::lstm_recurrence", _lstm_backward, setup_context=_lstm_setup_context
)


# ----------------------------------------------------------------- functional API


def _check_args(gates: int, gi: Tensor, states: Tuple[Tuple[str, Tensor], ...], w_hh: Tensor,
                b_hh: Optional[Tensor], lengths: Optional[Tensor]) -> Optional[Tensor]:
    """Validate a recurrence call; errors name the argument, the expected and the actual value.

    Returns ``lengths`` checked (values in ``[1, T]``) and on gi's device.
    """
    _checks.tensor("gi", gi)
    for name, t in states:
        _checks.tensor(name, t)
    _checks.tensor("w_hh", w_hh)
    _checks.optional_tensor("b_hh", b_hh)
    if gi.dim() != 3:
        raise ValueError(f"gi: expected a 3-D tensor [T, B, {gates}*H], got shape {tuple(gi.shape)}")
    T, B, GH = gi.shape
    for name, t in states:
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor [B, H], got shape {tuple(t.shape)}")
    H = states[0][1].shape[1]
    if GH != gates * H:
        raise ValueError(f"gi: expected size(2) == {gates}*H = {gates * H} (H from h0), got shape {tuple(gi.shape)}")
    for name, t in states:
        if tuple(t.shape) != (B, H):
            raise ValueError(f"{name}: expected shape (B, H) = {(B, H)}, got {tuple(t.shape)}")
    if tuple(w_hh.shape) != (gates * H, H):
        raise ValueError(f"w_hh: expected shape {(gates * H, H)}, got {tuple(w_hh.shape)}")
    if b_hh is not None and tuple(b_hh.shape) != (gates * H,):
        raise ValueError(f"b_hh: expected shape {(gates * H,)}, got {tuple(b_hh.shape)}")
    if not gi.is_floating_point():
        raise TypeError(f"gi: expected a floating-point dtype, got {gi.dtype}")
    for name, t in states + (("w_hh", w_hh),) + ((("b_hh", b_hh),) if b_hh is not None else ()):
        if t.dtype != gi.dtype:
            raise TypeError(f"{name}: expected dtype {gi.dtype} (that of gi), got {t.dtype}")
        if t.device != gi.device:
            raise RuntimeError(f"{name}: expected device {gi.device} (that of gi), got {t.device}")
    return _checks.lengths("lengths", lengths, B, T, gi.device)


def gru(
    gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tensor:
    """GRU recurrence over precomputed input projections; saves gates only when needed.

    Args:
        gi: ``[T, B, 3H]`` = ``x W_ih^T + b_ih`` for every step (gate order r, z, n).
        h0: ``[B, H]``. w_hh: ``[3H, H]``. b_hh: ``[3H]`` or None.
        lengths: int32/int64 ``[B]`` on the CPU or gi's device, or None (every row
            runs T steps). Every value in ``[1, T]``; any order (sorted or not: rows
            are independent). Row ``b`` updates at steps ``t < lengths[b]`` only.
            CPU lengths are checked without a device sync; device lengths are
            checked once per tensor object (one sync, cached).

    Returns:
        hs ``[T, B, H]``: the state after every step; rows past their length
        carry their final state, so ``hs[-1]`` is h_n. (T = 0 or B = 0 give an
        empty ``hs``.)

    Raises:
        TypeError: an argument that is not a tensor; a dtype that does not fit.
        ValueError: a shape that does not fit; ``lengths`` < 1 or > T.
        RuntimeError: a device that does not fit.
        (Each message names the argument, the expected and the actual value.)
    """
    lengths = _check_args(3, gi, (("h0", h0),), w_hh, b_hh, lengths)
    if direct_call_ok(gi, h0, w_hh, b_hh):
        mod, kw = _impl(gi, gi.shape[0], gi.shape[1], h0.shape[1], 3)
        return mod.gru_recurrence_forward(gi, h0, w_hh, b_hh, lengths, False, **kw)[0]
    hs, _ = gru_recurrence(gi, h0, w_hh, b_hh, lengths, needs_grad(gi, h0, w_hh, b_hh))
    return hs


def lstm(
    gi: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """LSTM recurrence over precomputed input projections (gate order i, f, g, o).

    Args:
        gi: ``[T, B, 4H]``; h0, c0: ``[B, H]``; w_hh: ``[4H, H]``; b_hh: ``[4H]`` or None;
        lengths: as :func:`gru`.

    Returns:
        (hs, cs), each ``[T, B, H]``; ``hs[-1]``, ``cs[-1]`` are h_n, c_n.

    Raises:
        TypeError / ValueError / RuntimeError: as :func:`gru`.
    """
    lengths = _check_args(4, gi, (("h0", h0), ("c0", c0)), w_hh, b_hh, lengths)
    if direct_call_ok(gi, h0, c0, w_hh, b_hh):
        mod, kw = _impl(gi, gi.shape[0], gi.shape[1], h0.shape[1], 4)
        hs, cs, _ = mod.lstm_recurrence_forward(gi, h0, c0, w_hh, b_hh, lengths, False, **kw)
        return hs, cs
    hs, cs, _ = lstm_recurrence(
        gi, h0, c0, w_hh, b_hh, lengths, needs_grad(gi, h0, c0, w_hh, b_hh)
    )
    return hs, cs
