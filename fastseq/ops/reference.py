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
            dg = dg.masked_fill(~valid, 0.0)  # select, not multiply: see the GRU backward
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
#
# Additive (Bahdanau) attention with precomputed key projections (Bahdanau, Cho &
# Bengio 2015, eq. 6; the query and keys already projected: q = W_a s, K = U_a h):
#
#     energy[b, t, j] = v^T tanh(q[b, t] + K[b, j])
#     weights[b, t]   = softmax_j(energy[b, t, j])   over valid positions j
#     context[b, t]   = sum_j weights[b, t, j] V[b, j]
#
# Queries are always ``[B, T, A]`` here (T = 1 for one decoder step; T > 1 is the
# multi-query form for queries that do not depend on the previous step).


def source_mask(mask: Optional[Tensor], lengths: Optional[Tensor], B: int, S: int,
                device: torch.device) -> Optional[Tensor]:
    """bool ``[B, S]`` valid positions from a mask or lengths (None: all valid)."""
    if mask is not None:
        return mask.to(device)
    if lengths is not None:
        return torch.arange(S, device=device)[None, :] < lengths.to(device)[:, None]
    return None


def additive_attention_forward(
    query: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    energy: Tensor,
    mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Additive attention, every query against every source position.

    Args:
        query: ``[B, T, A]`` projected queries q = W_a s.
        proj_keys: ``[B, S, A]`` projected keys K = U_a h.
        values: ``[B, S, D]`` values V (encoder states).
        energy: ``[A]`` the energy vector v.
        mask: bool ``[B, S]``, True at valid positions; or ``lengths`` int ``[B]``
            (positions ``j < lengths[b]`` are valid); neither: all valid.

    Returns:
        context ``[B, T, D]`` and weights ``[B, T, S]`` (zero at invalid
        positions, rows sum to 1), in the dtype of ``values``. Half inputs are
        computed in float32.
    """
    cd = _compute_dtype(values)
    q, k, v, e = query.to(cd), proj_keys.to(cd), values.to(cd), energy.to(cd)
    scores = torch.tanh(q.unsqueeze(2) + k.unsqueeze(1)) @ e  # [B, T, S]
    valid = source_mask(mask, lengths, k.shape[0], k.shape[1], k.device)
    if valid is not None:
        scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
        # Padding values take no part (as in the fused kernels, which never read
        # them): a NaN/Inf there must not turn 0 * value into NaN.
        v = v.masked_fill(~valid.unsqueeze(-1), 0.0)
    weights = torch.softmax(scores, dim=-1)
    context = weights @ v
    return context.to(values.dtype), weights.to(values.dtype)


def attention_score_grad(
    grad_context: Tensor, grad_weights: Optional[Tensor], values: Tensor, weights: Tensor
) -> Tuple[Tensor, Tensor]:
    """Backward through the softmax and the weighted sum (shared by all backends).

    With ``dw = grad_context V^T + grad_weights``::

        grad_energy = weights * (dw - sum_j weights_j dw_j)     [B, T, S]
        grad_values = weights^T grad_context                    [B, S, D]

    Returns (grad_energy, grad_values) in float32 (float64 for float64 inputs).
    """
    cd = _compute_dtype(values)
    w, dc = weights.to(cd), grad_context.to(cd)
    dw = dc @ values.to(cd).transpose(1, 2)
    if grad_weights is not None:
        dw = dw + grad_weights.to(cd)
    grad_energy = w * (dw - (w * dw).sum(-1, keepdim=True))
    return grad_energy, w.transpose(1, 2) @ dc


def additive_attention_backward(
    grad_context: Tensor,
    grad_weights: Optional[Tensor],
    query: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    energy: Tensor,
    weights: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`additive_attention_forward`; tanh(q + K) is recomputed.

    With ``u = tanh(q_t + K_j)`` and ``g = grad_energy * v * (1 - u^2)``::

        grad_query[t] = sum_j g[t, j],   grad_proj_keys[j] = sum_t g[t, j],
        grad_energy_vector = sum_{b, t, j} grad_energy[b, t, j] u[b, t, j]

    Returns:
        (grad_query, grad_proj_keys, grad_values, grad_energy_vector), each in its
        input's dtype.
    """
    cd = _compute_dtype(values)
    de, dvalues = attention_score_grad(grad_context, grad_weights, values, weights)
    e = energy.to(cd)
    u = torch.tanh(query.to(cd).unsqueeze(2) + proj_keys.to(cd).unsqueeze(1))  # [B, T, S, A]
    g = de.unsqueeze(-1) * (1 - u * u) * e
    dq, dk = g.sum(2), g.sum(1)
    de_vec = (de.unsqueeze(-1) * u).sum((0, 1, 2))
    return dq.to(query.dtype), dk.to(proj_keys.dtype), dvalues.to(values.dtype), de_vec.to(energy.dtype)


# ------------------------------------------------- GRU cell of the attention decoder
#
# The decoder GRU's input is [E y_{i-1}; c_i]. Its embedding part of the input
# projection (``gi_emb``, with b_ih) is computed for all steps at once, and its
# hidden projection ``gh = W_hh s + b_hh`` comes out of the same matrix product
# as the attention query. What is left per step is fused here:
#
#     gi = gi_emb + c W_ic^T                 (W_ic: the context columns of W_ih)
#     r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z)
#     n = tanh(gi_n + r * gh_n),  s' = (1 - z) * n + z * s


def gru_context_cell_forward(
    gi: Tensor, context: Tensor, w_ic: Tensor, gh: Tensor, b_hh: Optional[Tensor], h: Tensor,
    save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """One GRU step whose input projection is ``gi + context W_ic^T``.

    Args:
        gi: ``[B, 3H]``; context: ``[B, D]``; w_ic: ``[3H, D]``; gh: ``[B, 3H]``
        (``W_hh h``, without bias); b_hh: ``[3H]`` or None; h: ``[B, H]`` the
        previous state.

    Returns:
        h' ``[B, H]``; gates ``[B, 4H]`` = (r, z, n, gh_n) or an empty ``[0]``.
    """
    cd = _compute_dtype(gi)
    H = h.shape[1]
    x = gi.to(cd) + context.to(cd) @ w_ic.to(cd).t()
    hh = gh.to(cd) if b_hh is None else gh.to(cd) + b_hh.to(cd)
    r = torch.sigmoid(x[:, :H] + hh[:, :H])
    z = torch.sigmoid(x[:, H:2 * H] + hh[:, H:2 * H])
    n = torch.tanh(x[:, 2 * H:] + r * hh[:, 2 * H:])
    h_new = (1 - z) * n + z * h.to(cd)
    gates = torch.cat([r, z, n, hh[:, 2 * H:]], 1).to(gi.dtype) if save_gates else gi.new_empty((0,))
    return h_new.to(gi.dtype), gates


def gru_context_cell_backward(
    grad_h: Tensor, gates: Tensor, h: Tensor, context: Tensor, w_ic: Tensor, has_bias: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Tensor]:
    """Gradients of :func:`gru_context_cell_forward`.

    Returns:
        (grad_gi ``[B, 3H]``, grad_context ``[B, D]``, grad_w_ic ``[3H, D]``,
        grad_gh ``[B, 3H]``, grad_b_hh ``[3H]`` (None without bias), grad_h
        ``[B, H]``), each in its input's dtype.
    """
    cd = _compute_dtype(h)
    H = h.shape[1]
    g = gates.to(cd)
    r, z, n, hn = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
    dh = grad_h.to(cd)
    dn = dh * (1 - z) * (1 - n * n)
    dz = dh * (h.to(cd) - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    dgi = torch.cat([dr, dz, dn], 1)
    dgh = torch.cat([dr, dz, dn * r], 1)
    dctx = dgi @ w_ic.to(cd)
    dw = dgi.t() @ context.to(cd)
    db = dgh.sum(0).to(w_ic.dtype) if has_bias else None
    return (dgi.to(gates.dtype), dctx.to(context.dtype), dw.to(w_ic.dtype), dgh.to(gates.dtype), db,
            (dh * z).to(h.dtype))
