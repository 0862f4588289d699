"""Plain-PyTorch reference of every fastseq op, written for clarity.

This is the ground truth the fused kernels are tested against, and the CPU
path. Every function here has the exact signature and output layout of its
fused counterpart in :mod:`fastseq.ops.triton`.

Conventions (shared by all backends)
------------------------------------
* Time-major: ``gi`` is ``[T, B, G*H]``, the input projection
  ``x W_ih^T + b_ih`` for every step, computed by one matrix product outside
  the recurrence. ``G = 3`` for the GRU (gate order r, z, n) and ``G = 4`` for
  the LSTM (gate order i, f, g, o), exactly as ``torch.nn.GRU``/``LSTM``.
* ``lengths``: optional int64 ``[B]``. Row ``b`` is updated only at steps
  ``t < lengths[b]``; after that its state passes through unchanged, so
  ``hs[T-1]`` is every row's final state.
* Half-precision inputs are computed in float32 and cast back.

GRU (Cho et al. 2014; torch.nn.GRU's form)::

    r = sigmoid(gi_r + W_hr h + b_hr)
    z = sigmoid(gi_z + W_hz h + b_hz)
    hn = W_hn h + b_hn
    n = tanh(gi_n + r * hn)
    h' = (1 - z) * n + z * h

LSTM (Hochreiter & Schmidhuber 1997; torch.nn.LSTM's form)::

    i, f, g, o = sigmoid(.), sigmoid(.), tanh(.), sigmoid(.)  of gi + W_hh h + b_hh
    c' = f * c + i * g
    h' = o * tanh(c')
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in _HALF else t.dtype


def _valid(lengths: Optional[Tensor], t: int, like: Tensor) -> Optional[Tensor]:
    """[B, 1] bool: rows still running at step t (None: all rows)."""
    if lengths is None:
        return None
    return (lengths.to(like.device) > t).unsqueeze(1)


# --------------------------------------------------------------------------- GRU


def gru_recurrence_forward(
    gi: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    lengths: Optional[Tensor],
    save_gates: bool = True,
) -> Tuple[Tensor, Tensor]:
    """GRU recurrence over T steps.

    Args:
        gi: ``[T, B, 3H]`` input projection (r, z, n).
        h0: ``[B, H]`` initial state.
        w_hh: ``[3H, H]`` recurrent weights; b_hh: ``[3H]`` or None.
        lengths: int64 ``[B]`` or None (see module docstring).
        save_gates: keep what the backward needs.

    Returns:
        hs: ``[T, B, H]`` state after every step.
        gates: ``[T, B, 4H]`` = (r, z, n, hn) per step if ``save_gates``, else an
        empty ``[0]`` tensor.
    """
    T, B, _ = gi.shape
    H = h0.shape[1]
    cd = _compute_dtype(gi)
    w = w_hh.to(cd)
    b = b_hh.to(cd) if b_hh is not None else None
    h = h0.to(cd)
    hs, gates = [], []
    for t in range(T):
        x_r, x_z, x_n = gi[t].to(cd).chunk(3, dim=1)
        hh = torch.nn.functional.linear(h, w, b)
        h_r, h_z, h_n = hh.chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h_new = (1 - z) * n + z * h
        valid = _valid(lengths, t, h)
        h = h_new if valid is None else torch.where(valid, h_new, h)
        hs.append(h)
        if save_gates:
            gates.append(torch.cat([r, z, n, h_n], dim=1))
    hs_t = torch.stack(hs).to(gi.dtype) if T else gi.new_empty((0, B, H))
    if save_gates:
        g = torch.stack(gates).to(gi.dtype) if T else gi.new_empty((0, B, 4 * H))
    else:
        g = gi.new_empty((0,))
    return hs_t, g


def gru_recurrence_backward(
    grad_hs: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    hs: Tensor,
    gates: Tensor,
    lengths: Optional[Tensor],
    has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Backward of :func:`gru_recurrence_forward` (hand-derived, checked against autograd).

    Args:
        grad_hs: ``[T, B, H]`` gradient w.r.t. ``hs`` (includes that of h_n = hs[-1]).
        Others as saved by the forward.

    Returns:
        grad_gi ``[T, B, 3H]``, grad_h0 ``[B, H]``, grad_w_hh ``[3H, H]``,
        grad_b_hh ``[3H]`` (None when ``has_bias`` is False).
    """
    T, B, H = hs.shape
    cd = _compute_dtype(hs)
    w = w_hh.to(cd)
    dgi = grad_hs.new_zeros((T, B, 3 * H), dtype=cd)
    dgh = grad_hs.new_zeros((T, B, 3 * H), dtype=cd)
    dh = grad_hs.new_zeros((B, H), dtype=cd)  # gradient flowing into h_t from step t+1
    for t in range(T - 1, -1, -1):
        dh = dh + grad_hs[t].to(cd)
        r, z, n, h_n = gates[t].to(cd).chunk(4, dim=1)
        h_prev = (hs[t - 1] if t > 0 else h0).to(cd)
        dn = dh * (1 - z)
        dz = dh * (h_prev - n)
        dn_pre = dn * (1 - n * n)
        dz_pre = dz * z * (1 - z)
        dr_pre = dn_pre * h_n * r * (1 - r)
        valid = _valid(lengths, t, dh)
        gi_grad = torch.cat([dr_pre, dz_pre, dn_pre], dim=1)
        gh_grad = torch.cat([dr_pre, dz_pre, dn_pre * r], dim=1)
        dh_prev = gh_grad @ w + dh * z
        if valid is not None:
            gi_grad = gi_grad * valid
            gh_grad = gh_grad * valid
            dh_prev = torch.where(valid, dh_prev, dh)
        dgi[t] = gi_grad
        dgh[t] = gh_grad
        dh = dh_prev
    h_prev_all = torch.cat([h0.unsqueeze(0), hs[:-1]], dim=0).to(cd)
    dw_hh = dgh.reshape(T * B, 3 * H).t() @ h_prev_all.reshape(T * B, H)
    db_hh = dgh.sum(dim=(0, 1)) if has_bias else None
    out_dt = hs.dtype
    return (
        dgi.to(out_dt),
        dh.to(h0.dtype),
        dw_hh.to(w_hh.dtype),
        db_hh.to(w_hh.dtype) if db_hh is not None else None,
    )


# -------------------------------------------------------------------------- LSTM


def lstm_recurrence_forward(
    gi: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    lengths: Optional[Tensor],
    save_gates: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """LSTM recurrence over T steps.

    Args:
        gi: ``[T, B, 4H]`` input projection (i, f, g, o).
        h0, c0: ``[B, H]`` initial states.
        w_hh: ``[4H, H]``; b_hh: ``[4H]`` or None; lengths: int64 ``[B]`` or None.

    Returns:
        hs, cs: ``[T, B, H]`` hidden and cell state after every step.
        gates: ``[T, B, 4H]`` activated (i, f, g, o) if ``save_gates``, else ``[0]``.
    """
    T, B, _ = gi.shape
    H = h0.shape[1]
    cd = _compute_dtype(gi)
    w = w_hh.to(cd)
    b = b_hh.to(cd) if b_hh is not None else None
    h, c = h0.to(cd), c0.to(cd)
    hs, cs, gates = [], [], []
    for t in range(T):
        pre = gi[t].to(cd) + torch.nn.functional.linear(h, w, b)
        p_i, p_f, p_g, p_o = pre.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(p_i), torch.sigmoid(p_f), torch.tanh(p_g), torch.sigmoid(p_o)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        valid = _valid(lengths, t, h)
        if valid is None:
            h, c = h_new, c_new
        else:
            h, c = torch.where(valid, h_new, h), torch.where(valid, c_new, c)
        hs.append(h)
        cs.append(c)
        if save_gates:
            gates.append(torch.cat([i, f, g, o], dim=1))
    if T:
        hs_t, cs_t = torch.stack(hs).to(gi.dtype), torch.stack(cs).to(gi.dtype)
    else:
        hs_t, cs_t = gi.new_empty((0, B, H)), gi.new_empty((0, B, H))
    if save_gates:
        g_t = torch.stack(gates).to(gi.dtype) if T else gi.new_empty((0, B, 4 * H))
    else:
        g_t = gi.new_empty((0,))
    return hs_t, cs_t, g_t


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
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Backward of :func:`lstm_recurrence_forward`.

    Returns:
        grad_gi ``[T, B, 4H]``, grad_h0, grad_c0 ``[B, H]``, grad_w_hh ``[4H, H]``,
        grad_b_hh ``[4H]`` (None when ``has_bias`` is False).
    """
    T, B, H = hs.shape
    cd = _compute_dtype(hs)
    w = w_hh.to(cd)
    dg_all = grad_hs.new_zeros((T, B, 4 * H), dtype=cd)
    dh = grad_hs.new_zeros((B, H), dtype=cd)
    dc = grad_hs.new_zeros((B, H), dtype=cd)
    for t in range(T - 1, -1, -1):
        dh = dh + grad_hs[t].to(cd)
        dc_in = dc + grad_cs[t].to(cd)
        i, f, g, o = gates[t].to(cd).chunk(4, dim=1)
        c = cs[t].to(cd)
        c_prev = (cs[t - 1] if t > 0 else c0).to(cd)
        tc = torch.tanh(c)
        dc_tot = dc_in + dh * o * (1 - tc * tc)
        d_o = dh * tc * o * (1 - o)
        d_i = dc_tot * g * i * (1 - i)
        d_f = dc_tot * c_prev * f * (1 - f)
        d_g = dc_tot * i * (1 - g * g)
        dg = torch.cat([d_i, d_f, d_g, d_o], dim=1)
        dh_prev = dg @ w
        dc_prev = dc_tot * f
        valid = _valid(lengths, t, dh)
        if valid is not None:
            dg = dg * valid
            dh_prev = torch.where(valid, dh_prev, dh)
            dc_prev = torch.where(valid, dc_prev, dc_in)
        dg_all[t] = dg
        dh, dc = dh_prev, dc_prev
    h_prev_all = torch.cat([h0.unsqueeze(0), hs[:-1]], dim=0).to(cd)
    dw_hh = dg_all.reshape(T * B, 4 * H).t() @ h_prev_all.reshape(T * B, H)
    db_hh = dg_all.sum(dim=(0, 1)) if has_bias else None
    return (
        dg_all.to(hs.dtype),
        dh.to(h0.dtype),
        dc.to(c0.dtype),
        dw_hh.to(w_hh.dtype),
        db_hh.to(w_hh.dtype) if db_hh is not None else None,
    )


# --------------------------------------------------------------------- attention


def additive_attention(
    query: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    energy_weight: Tensor,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Additive (Bahdanau) attention with precomputed key projections.

    energy_j = v^T tanh(query + proj_keys_j) (Bahdanau et al. 2015, eq. 6, with
    the query already projected: ``query = W_a s_{i-1}`` and ``proj_keys = U_a h``);
    weights = softmax over source positions j where ``mask`` is True;
    context = sum_j weights_j * values_j.

    Args:
        query: ``[B, A]`` projected decoder state.
        proj_keys: ``[B, S, A]`` projected encoder states.
        values: ``[B, S, V]`` encoder states.
        energy_weight: ``[1, A]`` (the energy layer ``v``).
        mask: bool ``[B, S]``, True at real source positions; None: all real.

    Returns:
        context ``[B, V]``, weights ``[B, S]`` (rows sum to 1).
    """
    energy = torch.tanh(query.unsqueeze(1) + proj_keys) @ energy_weight.squeeze(0)  # [B, S]
    if mask is not None:
        energy = energy.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(energy.float(), dim=-1).to(values.dtype)
    context = torch.bmm(weights.unsqueeze(1), values).squeeze(1)
    return context, weights
