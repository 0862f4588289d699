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


# ------------------------------------------------------------- packed layout
#
# The packed ops run on a PackedSequence's own layout (cuDNN's packed mode):
# ``gi`` is ``[N, G*H]`` with the rows of step ``t`` at ``offsets[t] ..
# offsets[t] + batch_sizes[t]`` (``offsets`` the exclusive cumulative sum of
# ``batch_sizes``), rows sorted by decreasing length, so step ``t`` computes
# only the ``batch_sizes[t]`` rows still running. The forward direction runs
# t = 0 .. T-1 and reads row b's previous state from step t-1; the reverse
# direction (``reverse=True``) runs t = T-1 .. 0 and reads it from step t+1
# when row b is there (``b < batch_sizes[t+1]``), else from ``h0[b]`` (the
# row starts at its last step). The outputs ``hs`` (and ``cs``, ``gates``)
# are in the same packed layout.


def packed_steps(batch_sizes: Tensor, reverse: bool):
    """The steps of a packed recurrence in the order they run.

    Args:
        batch_sizes: int64 ``[T]`` (CPU), non-increasing, as in a PackedSequence.
        reverse: the reverse direction (t = T-1 .. 0).

    Returns:
        a list of ``(offset, rows, prev_offset, prev_rows)`` per step: the step's
        rows are ``offset .. offset + rows``; rows ``b < prev_rows`` read their
        previous state at ``prev_offset + b``, the others from ``h0[b]``
        (``prev_rows = 0`` at the first step).
    """
    bs = [int(v) for v in batch_sizes.tolist()]
    offsets = [0] * len(bs)
    for t in range(1, len(bs)):
        offsets[t] = offsets[t - 1] + bs[t - 1]
    order = range(len(bs) - 1, -1, -1) if reverse else range(len(bs))
    steps, prev = [], None
    for t in order:
        if prev is None:
            steps.append((offsets[t], bs[t], 0, 0))
        else:
            steps.append((offsets[t], bs[t], offsets[prev], min(bs[prev], bs[t])))
        prev = t
    return steps


def _prev_packed(states: Tensor, init: Tensor, rows: int, prev_offset: int, prev_rows: int) -> Tensor:
    """``[rows, H]``: the previous state of a step's rows (see :func:`packed_steps`)."""
    if prev_rows == rows:
        return states[prev_offset:prev_offset + rows]
    if prev_rows == 0:
        return init[:rows]
    return torch.cat([states[prev_offset:prev_offset + prev_rows], init[prev_rows:rows]])


def gru_packed_recurrence_forward(
    gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Tensor,
    reverse: bool, save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """GRU recurrence over a packed sequence (layout: see above).

    Args:
        gi: ``[N, 3H]`` input projection of every (step, row) in packed order.
        h0: ``[B, H]``, B = batch_sizes[0], rows in the packed (sorted) order.
        w_hh: ``[3H, H]``; b_hh: ``[3H]`` or None.
        batch_sizes: int64 ``[T]`` CPU, non-increasing, summing to N.
        reverse: run t = T-1 .. 0 (the reverse direction of a bidirectional layer).
        save_gates: keep what the backward needs.

    Returns:
        hs ``[N, H]`` (packed), gates ``[N, 4H]`` (r, z, n, hn) or ``[0]``.
    """
    N = gi.shape[0]
    H = h0.shape[1]
    cd = compute_dtype(gi)
    w = w_hh.to(cd)
    b = b_hh.to(cd) if b_hh is not None else None
    h_init = h0.to(cd)
    hs = gi.new_empty((N, H), dtype=cd)
    gates = gi.new_empty((N, 4 * H), dtype=cd) if save_gates else None
    for off, n, p_off, p_n in packed_steps(batch_sizes, reverse):
        h = _prev_packed(hs, h_init, n, p_off, p_n)
        x_r, x_z, x_n = gi[off:off + n].to(cd).chunk(3, dim=1)
        h_r, h_z, h_n = torch.nn.functional.linear(h, w, b).chunk(3, dim=1)
        r, z, nn_, h_new = gru_gates(x_r, x_z, x_n, h_r, h_z, h_n, h)
        hs[off:off + n] = h_new
        if gates is not None:
            gates[off:off + n] = torch.cat([r, z, nn_, h_n], dim=1)
    return hs.to(gi.dtype), (gates.to(gi.dtype) if gates is not None else _absent(gi))


def gru_packed_recurrence_backward(
    grad_hs: Tensor, h0: Tensor, w_hh: Tensor, hs: Tensor, gates: Tensor, batch_sizes: Tensor,
    reverse: bool, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`gru_packed_recurrence_forward`.

    Returns:
        grad_gi ``[N, 3H]``, grad_h0 ``[B, H]``, grad_w_hh ``[3H, H]``, grad_b_hh
        ``[3H]`` (``[0]`` when ``has_bias`` is False).
    """
    N, H = hs.shape
    B = h0.shape[0]
    cd = compute_dtype(hs)
    w = w_hh.to(cd)
    hs_c, h_init = hs.to(cd), h0.to(cd)
    dgi = grad_hs.new_zeros((N, 3 * H), dtype=cd)
    dgh = grad_hs.new_zeros((N, 3 * H), dtype=cd)
    h_prev_all = grad_hs.new_zeros((N, H), dtype=cd)
    dh = grad_hs.new_zeros((B, H), dtype=cd)  # row b: the gradient into its state at the step it reaches
    for off, n, p_off, p_n in reversed(packed_steps(batch_sizes, reverse)):
        d = dh[:n] + grad_hs[off:off + n].to(cd)
        r, z, nn_, h_n = gates[off:off + n].to(cd).chunk(4, dim=1)
        h_prev = _prev_packed(hs_c, h_init, n, p_off, p_n)
        dr, dz, dn, dh_direct = gru_gates_backward(d, r, z, nn_, h_n, h_prev)
        dgi[off:off + n] = torch.cat([dr, dz, dn], dim=1)
        dgh[off:off + n] = torch.cat([dr, dz, dn * r], dim=1)
        h_prev_all[off:off + n] = h_prev
        dh[:n] = dgh[off:off + n] @ w + dh_direct
    dw_hh = dgh.t() @ h_prev_all
    db_hh = dgh.sum(dim=0).to(w_hh.dtype) if has_bias else _absent(w_hh)
    return dgi.to(hs.dtype), dh.to(h0.dtype), dw_hh.to(w_hh.dtype), db_hh


def lstm_packed_recurrence_forward(
    gi: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Tensor,
    reverse: bool, save_gates: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """LSTM recurrence over a packed sequence: gi ``[N, 4H]`` -> hs, cs ``[N, H]``,
    gates ``[N, 4H]`` (activated i, f, g, o) or ``[0]``. Arguments as
    :func:`gru_packed_recurrence_forward`, with c0 ``[B, H]``."""
    N = gi.shape[0]
    H = h0.shape[1]
    cd = compute_dtype(gi)
    w = w_hh.to(cd)
    b = b_hh.to(cd) if b_hh is not None else None
    h_init, c_init = h0.to(cd), c0.to(cd)
    hs = gi.new_empty((N, H), dtype=cd)
    cs = gi.new_empty((N, H), dtype=cd)
    gates = gi.new_empty((N, 4 * H), dtype=cd) if save_gates else None
    for off, n, p_off, p_n in packed_steps(batch_sizes, reverse):
        h = _prev_packed(hs, h_init, n, p_off, p_n)
        c = _prev_packed(cs, c_init, n, p_off, p_n)
        pre = gi[off:off + n].to(cd) + torch.nn.functional.linear(h, w, b)
        i, f, g, o, c_new, h_new = lstm_gates(*pre.chunk(4, dim=1), c)
        hs[off:off + n] = h_new
        cs[off:off + n] = c_new
        if gates is not None:
            gates[off:off + n] = torch.cat([i, f, g, o], dim=1)
    g_out = gates.to(gi.dtype) if gates is not None else _absent(gi)
    return hs.to(gi.dtype), cs.to(gi.dtype), g_out


def lstm_packed_recurrence_backward(
    grad_hs: Tensor, grad_cs: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, hs: Tensor, cs: Tensor,
    gates: Tensor, batch_sizes: Tensor, reverse: bool, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`lstm_packed_recurrence_forward`.

    Returns:
        grad_gi ``[N, 4H]``, grad_h0, grad_c0 ``[B, H]``, grad_w_hh ``[4H, H]``,
        grad_b_hh ``[4H]`` (``[0]`` when ``has_bias`` is False).
    """
    N, H = hs.shape
    B = h0.shape[0]
    cd = compute_dtype(hs)
    w = w_hh.to(cd)
    hs_c, cs_c, h_init, c_init = hs.to(cd), cs.to(cd), h0.to(cd), c0.to(cd)
    dg_all = grad_hs.new_zeros((N, 4 * H), dtype=cd)
    h_prev_all = grad_hs.new_zeros((N, H), dtype=cd)
    dh = grad_hs.new_zeros((B, H), dtype=cd)
    dc = grad_hs.new_zeros((B, H), dtype=cd)
    for off, n, p_off, p_n in reversed(packed_steps(batch_sizes, reverse)):
        d_h = dh[:n] + grad_hs[off:off + n].to(cd)
        d_c = dc[:n] + grad_cs[off:off + n].to(cd)
        i, f, g, o = gates[off:off + n].to(cd).chunk(4, dim=1)
        c_prev = _prev_packed(cs_c, c_init, n, p_off, p_n)
        d_i, d_f, d_g, d_o, dc_prev = lstm_gates_backward(d_h, d_c, i, f, g, o, cs_c[off:off + n], c_prev)
        dg = torch.cat([d_i, d_f, d_g, d_o], dim=1)
        dg_all[off:off + n] = dg
        h_prev_all[off:off + n] = _prev_packed(hs_c, h_init, n, p_off, p_n)
        dh[:n] = dg @ w
        dc[:n] = dc_prev
    dw_hh = dg_all.t() @ h_prev_all
    db_hh = dg_all.sum(dim=0).to(w_hh.dtype) if has_bias else _absent(w_hh)
    return dg_all.to(hs.dtype), dh.to(h0.dtype), dc.to(c0.dtype), dw_hh.to(w_hh.dtype), db_hh
