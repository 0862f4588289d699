"""Plain-PyTorch reference of the GRU and LSTM recurrences, written for clarity.

This is the ground truth the fused backends are tested against, and the path
for dtypes and devices no fused backend takes. Every function has the
signature and output layout of its counterparts in :mod:`.triton` and
:mod:`.cpp` (the registry's convention: absent outputs are empty ``[0]``
tensors).

The gate formulas are written once here (:func:`gru_gates`,
:func:`gru_gates_backward`, :func:`lstm_gates`, :func:`lstm_gates_backward`)
and used by the recurrences and by the decoder step's GRU cell
(:mod:`fastseq.ops.decoder_step.naive`).

Conventions (shared by all backends)
------------------------------------
* Time-major: ``gi`` is ``[T, B, G*H]``, the input projection
  ``x W_ih^T + b_ih`` for every step, computed by one matrix product outside
  the recurrence. ``G = 3`` for the GRU (gate order r, z, n) and ``G = 4`` for
  the LSTM (gate order i, f, g, o), exactly as ``torch.nn.GRU``/``LSTM``.
* ``lengths``: optional int ``[B]``. Row ``b`` is updated only at steps
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

from fastseq.backend.alloc import compute_dtype

def _valid(lengths: Optional[Tensor], t: int, like: Tensor) -> Optional[Tensor]:
    """[B, 1] bool: rows still running at step t (None: all rows)."""
    if lengths is None:
        return None
    return (lengths.to(like.device) > t).unsqueeze(1)


def _absent(like: Tensor) -> Tensor:
    """The registry's placeholder for an absent output."""
    return like.new_empty((0,))


# --------------------------------------------------------------- gate formulas


def gru_gates(x_r: Tensor, x_z: Tensor, x_n: Tensor, h_r: Tensor, h_z: Tensor, h_n: Tensor,
              h: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """GRU gates and update from the input-side (``x_*``) and hidden-side (``h_*``,
    bias included) pre-activations: returns ``(r, z, n, h')``."""
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return r, z, n, (1 - z) * n + z * h


def gru_gates_backward(dh: Tensor, r: Tensor, z: Tensor, n: Tensor, h_n: Tensor,
                       h: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`gru_gates` for the gradient ``dh`` reaching ``h'``:
    returns the pre-activation gradients ``(dr, dz, dn)`` (input side; the
    hidden side of ``n`` is ``dn * r``) and the direct gradient into ``h``, ``dh * z``."""
    dn = dh * (1 - z) * (1 - n * n)
    dz = dh * (h - n) * z * (1 - z)
    dr = dn * h_n * r * (1 - r)
    return dr, dz, dn, dh * z


def lstm_gates(p_i: Tensor, p_f: Tensor, p_g: Tensor, p_o: Tensor,
               c: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """LSTM gates and update from the pre-activations: returns ``(i, f, g, o, c', h')``."""
    i, f, g, o = torch.sigmoid(p_i), torch.sigmoid(p_f), torch.tanh(p_g), torch.sigmoid(p_o)
    c_new = f * c + i * g
    return i, f, g, o, c_new, o * torch.tanh(c_new)


def lstm_gates_backward(dh: Tensor, dc: Tensor, i: Tensor, f: Tensor, g: Tensor, o: Tensor,
                        c_new: Tensor, c: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`lstm_gates` for the gradients ``dh``, ``dc`` reaching ``h'``
    and ``c'``: returns the pre-activation gradients ``(di, df, dg, do)`` and the
    gradient into ``c``, ``dc_total * f``."""
    tc = torch.tanh(c_new)
    dc_tot = dc + dh * o * (1 - tc * tc)
    d_o = dh * tc * o * (1 - o)
    d_i = dc_tot * g * i * (1 - i)
    d_f = dc_tot * c * f * (1 - f)
    d_g = dc_tot * i * (1 - g * g)
    return d_i, d_f, d_g, d_o, dc_tot * f


# --------------------------------------------------------------------------- GRU


def gru_recurrence_forward(
    gi: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    lengths: Optional[Tensor],
    save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """GRU recurrence over T steps.

    Args:
        gi: ``[T, B, 3H]`` input projection (r, z, n).
        h0: ``[B, H]`` initial state.
        w_hh: ``[3H, H]`` recurrent weights; b_hh: ``[3H]`` or None.
        lengths: int ``[B]`` or None (see module docstring).
        save_gates: keep what the backward needs.

    Returns:
        hs: ``[T, B, H]`` state after every step.
        gates: ``[T, B, 4H]`` = (r, z, n, hn) per step if ``save_gates``, else an
        empty ``[0]`` tensor.
    """
    T, B, _ = gi.shape
    H = h0.shape[1]
    cd = compute_dtype(gi)
    w = w_hh.to(cd)
    b = b_hh.to(cd) if b_hh is not None else None
    h = h0.to(cd)
    hs, gates = [], []
    for t in range(T):
        x_r, x_z, x_n = gi[t].to(cd).chunk(3, dim=1)
        h_r, h_z, h_n = torch.nn.functional.linear(h, w, b).chunk(3, dim=1)
        r, z, n, h_new = gru_gates(x_r, x_z, x_n, h_r, h_z, h_n, h)
        valid = _valid(lengths, t, h)
        h = h_new if valid is None else torch.where(valid, h_new, h)
        hs.append(h)
        if save_gates:
            gates.append(torch.cat([r, z, n, h_n], dim=1))
    hs_t = torch.stack(hs).to(gi.dtype) if T else gi.new_empty((0, B, H))
    if save_gates:
        g = torch.stack(gates).to(gi.dtype) if T else gi.new_empty((0, B, 4 * H))
    else:
        g = _absent(gi)
    return hs_t, g


def gru_recurrence_backward(
    grad_hs: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    hs: Tensor,
    gates: Tensor,
    lengths: Optional[Tensor],
    has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`gru_recurrence_forward` (hand-derived, checked against autograd).

    Args:
        grad_hs: ``[T, B, H]`` gradient w.r.t. ``hs`` (includes that of h_n = hs[-1]).
        Others as saved by the forward.

    Returns:
        grad_gi ``[T, B, 3H]``, grad_h0 ``[B, H]``, grad_w_hh ``[3H, H]``,
        grad_b_hh ``[3H]`` (empty ``[0]`` when ``has_bias`` is False).
    """
    T, B, H = hs.shape
    cd = compute_dtype(hs)
    w = w_hh.to(cd)
    dgi = grad_hs.new_zeros((T, B, 3 * H), dtype=cd)
    dgh = grad_hs.new_zeros((T, B, 3 * H), dtype=cd)
    dh = grad_hs.new_zeros((B, H), dtype=cd)  # gradient flowing into h_t from step t+1
    for t in range(T - 1, -1, -1):
        dh = dh + grad_hs[t].to(cd)
        r, z, n, h_n = gates[t].to(cd).chunk(4, dim=1)
        h_prev = (hs[t - 1] if t > 0 else h0).to(cd)
        dr, dz, dn, dh_direct = gru_gates_backward(dh, r, z, n, h_n, h_prev)
        gi_grad = torch.cat([dr, dz, dn], dim=1)
        gh_grad = torch.cat([dr, dz, dn * r], dim=1)
        dh_prev = gh_grad @ w + dh_direct
        valid = _valid(lengths, t, dh)
        if valid is not None:
            # Select rather than multiply: a padded step's gates may hold NaN/Inf
            # (from padding in gi), and 0 * NaN would leak into the gradients.
            gi_grad = gi_grad.masked_fill(~valid, 0.0)
            gh_grad = gh_grad.masked_fill(~valid, 0.0)
            dh_prev = torch.where(valid, dh_prev, dh)
        dgi[t] = gi_grad
        dgh[t] = gh_grad
        dh = dh_prev
    h_prev_all = torch.cat([h0.unsqueeze(0), hs[:-1]], dim=0).to(cd)
    dw_hh = dgh.reshape(T * B, 3 * H).t() @ h_prev_all.reshape(T * B, H)
    db_hh = dgh.sum(dim=(0, 1)).to(w_hh.dtype) if has_bias else _absent(w_hh)
    return dgi.to(hs.dtype), dh.to(h0.dtype), dw_hh.to(w_hh.dtype), db_hh


# -------------------------------------------------------------------------- LSTM


def lstm_recurrence_forward(
    gi: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    lengths: Optional[Tensor],
    save_gates: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """LSTM recurrence over T steps.

    Args:
        gi: ``[T, B, 4H]`` input projection (i, f, g, o).
        h0, c0: ``[B, H]`` initial states.
        w_hh: ``[4H, H]``; b_hh: ``[4H]`` or None; lengths: int ``[B]`` or None.

    Returns:
        hs, cs: ``[T, B, H]`` hidden and cell state after every step.
        gates: ``[T, B, 4H]`` activated (i, f, g, o) if ``save_gates``, else ``[0]``.
    """
    T, B, _ = gi.shape
    H = h0.shape[1]
    cd = compute_dtype(gi)
    w = w_hh.to(cd)
    b = b_hh.to(cd) if b_hh is not None else None
    h, c = h0.to(cd), c0.to(cd)
    hs, cs, gates = [], [], []
    for t in range(T):
        pre = gi[t].to(cd) + torch.nn.functional.linear(h, w, b)
        i, f, g, o, c_new, h_new = lstm_gates(*pre.chunk(4, dim=1), c)
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
        g_t = _absent(gi)
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
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`lstm_recurrence_forward`.

    Returns:
        grad_gi ``[T, B, 4H]``, grad_h0, grad_c0 ``[B, H]``, grad_w_hh ``[4H, H]``,
        grad_b_hh ``[4H]`` (empty ``[0]`` when ``has_bias`` is False).
    """
    T, B, H = hs.shape
    cd = compute_dtype(hs)
    w = w_hh.to(cd)
    dg_all = grad_hs.new_zeros((T, B, 4 * H), dtype=cd)
    dh = grad_hs.new_zeros((B, H), dtype=cd)
    dc = grad_hs.new_zeros((B, H), dtype=cd)
    for t in range(T - 1, -1, -1):
        dh = dh + grad_hs[t].to(cd)
        dc_in = dc + grad_cs[t].to(cd)
        i, f, g, o = gates[t].to(cd).chunk(4, dim=1)
        c_prev = (cs[t - 1] if t > 0 else c0).to(cd)
        d_i, d_f, d_g, d_o, dc_prev = lstm_gates_backward(dh, dc_in, i, f, g, o, cs[t].to(cd), c_prev)
        dg = torch.cat([d_i, d_f, d_g, d_o], dim=1)
        dh_prev = dg @ w
        valid = _valid(lengths, t, dh)
        if valid is not None:
            dg = dg.masked_fill(~valid, 0.0)  # select, not multiply: see the GRU backward
            dh_prev = torch.where(valid, dh_prev, dh)
            dc_prev = torch.where(valid, dc_prev, dc_in)
        dg_all[t] = dg
        dh, dc = dh_prev, dc_prev
    h_prev_all = torch.cat([h0.unsqueeze(0), hs[:-1]], dim=0).to(cd)
    dw_hh = dg_all.reshape(T * B, 4 * H).t() @ h_prev_all.reshape(T * B, H)
    db_hh = dg_all.sum(dim=(0, 1)).to(w_hh.dtype) if has_bias else _absent(w_hh)
    return dg_all.to(hs.dtype), dh.to(h0.dtype), dc.to(c0.dtype), dw_hh.to(w_hh.dtype), db_hh
