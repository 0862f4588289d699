"""Fused Triton kernels for the GRU and LSTM recurrences.

Same signatures, semantics and output layouts as :mod:`.naive`
(time-major ``[T, B, ...]``, gate order r,z,n / i,f,g,o, ``lengths`` masking,
saved ``gates`` layout). The input projection ``gi = x W_ih^T + b_ih`` is
computed outside, for all steps at once; these kernels only run the recurrence.

Kernel design
-------------
Forward: one launch per time step, the host loops over ``t``. The grid is
``(cdiv(B, BLOCK_B), cdiv(H, BLOCK_H))``; each program owns a
``[BLOCK_B, BLOCK_H]`` tile of (batch rows, hidden units) ``j`` and

1. computes the recurrent product ``h_{t-1} W_hh^T`` for its tile with
   ``tl.dot`` over ``K = H`` in ``BLOCK_K`` chunks, one fp32 accumulator per
   gate (3 for the GRU, 4 for the LSTM; gate ``g`` uses rows ``g*H + j`` of
   ``W_hh``), reading each ``h_{t-1}`` chunk once for all gates;
2. adds ``b_hh`` and ``gi[t]``, applies the gate nonlinearities and the state
   update (all fused, all in fp32);
3. masks by ``lengths`` (row ``b`` updates only at ``t < lengths[b]``, else the
   state passes through) and writes ``h_t`` (and ``c_t``), plus, when
   ``SAVE_GATES``, the gates the backward needs: GRU ``(r, z, n, hn)`` with
   ``hn = W_hn h + b_hn``, LSTM activated ``(i, f, g, o)``.

For half-precision inputs the running state is also kept in fp32 ping-pong
buffers so the recurrence does not round the state to half at every step (the
reference works the same way); ``hs``/``cs`` are written in the input dtype.

Backward: one launch per step, ``t = T-1 .. 0``, same grid. Notation: ``dG_t``
``[B, G*H]`` (fp32, kept for all steps) is the pre-activation gradient on the
hidden side of step ``t`` (GRU: ``(dr, dz, dn * r)``, LSTM: ``(di, df, dg, do)``),
zero for rows that do not update at ``t``. The program for step ``t`` and tile
``(b, j)``

1. forms the gradient reaching ``h_t``: ``grad_hs[t] + dG_{t+1}[b, :] @ W_hh[:, j]``
   (``tl.dot`` over ``G*H``; ``dG_{t+1}`` was fully written by the previous
   launch) ``+`` the direct term left by step ``t+1`` for this tile (GRU:
   ``dh_{t+1} z_{t+1}``; LSTM: 0; for a row that did not update at ``t+1``, the
   whole ``dh_{t+1}`` passes through; likewise ``dc``);
2. applies the pointwise gate backward of step ``t`` and writes ``dgi[t]``,
   ``dG_t`` and the direct terms for step ``t-1`` (tile-local, fp32, ping-pong
   buffers, so no launch reads what the same launch writes).

A last launch (shared by the GRU and LSTM) turns step 0's terms into ``dh0``
(and ``dc0``). No atomics. After the loop, the weight gradients are formed as
single matrix products over all steps (torch, fp32)::

    dW_hh = dG.reshape(T*B, G*H)^T @ [h0; hs[:-1]].reshape(T*B, H)
    db_hh = dG.sum((0, 1))

Packed layout (``*_packed_recurrence_*``, :mod:`.naive`'s "packed layout"): the
same step kernels, each launch over only its step's ``batch_sizes[t]`` rows
(views at the step's offset in ``gi``/``hs``/``gates``). Rows ``b >= n_prev``
read their previous state from ``h0`` through a second pointer (``h_alt``; the
reverse direction's rows that start at that step); the backward's carry goes
only to the ``n_next`` rows the next step reads from this one, and its per-row
carry buffer is updated in place. dW_hh is one product over the N packed rows
with each row's previous state gathered once.

Precision: loads are cast to fp32 and every product and accumulation is fp32;
``tl.dot`` uses ``input_precision="ieee"`` unless the user opted in to TF32
(``torch.backends.cuda.matmul.allow_tf32``). Outputs are in the input dtype;
``dw_hh``/``db_hh`` in ``w_hh``'s dtype.

The gate formulas are written once, as ``@triton.jit`` functions
(:func:`gru_gates`, :func:`gru_gates_backward`, :func:`lstm_gates`,
:func:`lstm_gates_backward`), used by these kernels and by the decoder step's
GRU cell kernels (:mod:`fastseq.ops.decoder_step.triton`).
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastseq.backend import alloc, limits as backend_limits
from fastseq.ops.launches import counted
from fastseq.ops.triton_utils import (
    contiguous_or_none, hidden_tile_limits, load_row, load_tile, pick_blocks, precision, store_tile, tanh,
    tile_offsets,
)

__all__ = [
    "gru_recurrence_forward", "gru_recurrence_backward", "lstm_recurrence_forward", "lstm_recurrence_backward",
    "gru_packed_recurrence_forward", "gru_packed_recurrence_backward", "lstm_packed_recurrence_forward",
    "lstm_packed_recurrence_backward", "limits", "gru_gates", "gru_gates_backward", "lstm_gates", "lstm_gates_backward",
]


# ------------------------------------------------------------- gate formulas


@triton.jit
def gru_gates(x_r, x_z, x_n, h_r, h_z, h_n, h):
    """GRU gates and update from the input-side (``x_*``) and hidden-side (``h_*``,
    bias included) pre-activations, fp32 tiles: returns ``(r, z, n, h')``."""
    r = tl.sigmoid(x_r + h_r)
    z = tl.sigmoid(x_z + h_z)
    n = tanh(x_n + r * h_n)
    return r, z, n, (1.0 - z) * n + z * h


@triton.jit
def gru_gates_backward(dh, r, z, n, h_n, h):
    """Backward of :func:`gru_gates` for the gradient ``dh`` reaching ``h'``: the
    pre-activation gradients ``(dr, dz, dn)`` (input side; the hidden side of ``n``
    is ``dn * r``) and the direct gradient into ``h``, ``dh * z``."""
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (h - n) * z * (1.0 - z)
    dr = dn * h_n * r * (1.0 - r)
    return dr, dz, dn, dh * z


@triton.jit
def lstm_gates(p_i, p_f, p_g, p_o, c):
    """LSTM gates and update from the pre-activations: ``(i, f, g, o, c', h')``."""
    i = tl.sigmoid(p_i)
    f = tl.sigmoid(p_f)
    g = tanh(p_g)
    o = tl.sigmoid(p_o)
    c_new = f * c + i * g
    return i, f, g, o, c_new, o * tanh(c_new)


@triton.jit
def lstm_gates_backward(dh, dc, i, f, g, o, c_new, c):
    """Backward of :func:`lstm_gates` for the gradients ``dh``, ``dc`` reaching ``h'``
    and ``c'``: the pre-activation gradients ``(di, df, dg, do)`` and the gradient
    into ``c``, ``dc_total * f``."""
    tc = tanh(c_new)
    dc_tot = dc + dh * o * (1.0 - tc * tc)
    d_o = dh * tc * o * (1.0 - o)
    d_i = dc_tot * g * i * (1.0 - i)
    d_f = dc_tot * c * f * (1.0 - f)
    d_g = dc_tot * i * (1.0 - g * g)
    return d_i, d_f, d_g, d_o, dc_tot * f


# ------------------------------------------------------------------ jit helpers


@triton.jit
def _rows_valid(len_ptr, offs_b, mask_b, t, HAS_LENGTHS: tl.constexpr):
    """``[BLOCK_B, 1]`` bool: rows that update at step ``t`` (``t < lengths[b]``)."""
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + offs_b, mask=mask_b, other=0)
        valid = lens > t
    else:
        valid = offs_b >= 0
    return valid[:, None]


@triton.jit
def _load_prev(ptr, alt_ptr, offs_b, offs_c, H, mask_b, mask_c, n_prev, HAS_ALT: tl.constexpr):
    """fp32 tile of a previous state ``[B, H]`` (columns ``offs_c``): row ``b`` from ``ptr``,
    or, when ``HAS_ALT``, rows ``b >= n_prev`` from ``alt_ptr`` (packed layout: rows whose
    previous state is the initial one, see :func:`fastseq.ops.recurrence.naive.packed_steps`)."""
    if HAS_ALT:
        from_prev = offs_b < n_prev
        x = load_tile(ptr, offs_b, offs_c, H, 1, mask_b & from_prev, mask_c)
        x_alt = load_tile(alt_ptr, offs_b, offs_c, H, 1, mask_b & (offs_b >= n_prev), mask_c)
        x = tl.where(from_prev[:, None], x, x_alt)
    else:
        x = load_tile(ptr, offs_b, offs_c, H, 1, mask_b, mask_c)
    return x


@triton.jit
def _w_t_tile(w_ptr, gate, offs_k, offs_j, H, mask_k, mask_j):
    """``[BLOCK_K, BLOCK_H]`` fp32 tile of gate ``gate``'s ``W^T``: (k, j) -> W[gate*H + j, k]."""
    return load_tile(w_ptr + gate * H * H, offs_k, offs_j, 1, H, mask_k, mask_j)


@triton.jit
def _carry_dot(
    dg_ptr, w_ptr, offs_b, offs_j, mask_b, mask_j, H, GH,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dG[b, :] @ W_hh[:, j]`` for the tile: dG ``[B, GH]``, W_hh ``[GH, H]``, fp32."""
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for m0 in range(0, GH, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        mask_m = offs_m < GH
        a = load_tile(dg_ptr, offs_b, offs_m, GH, 1, mask_b, mask_m)
        w = load_tile(w_ptr, offs_m, offs_j, H, 1, mask_m, mask_j)
        acc += tl.dot(a, w, input_precision=PRECISION)
    return acc


# ---------------------------------------------------------------- GRU kernels


@triton.heuristics(
    {
        "HAS_BIAS": lambda a: a["b_ptr"] is not None,
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "SAVE_GATES": lambda a: a["gates_ptr"] is not None,
        "STORE_STATE": lambda a: a["hst_ptr"] is not None,
        "HAS_ALT": lambda a: a["h_alt_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["t", "B", "n_prev"])
def _gru_fwd_step_kernel(
    gi_ptr,  # [B, 3H] gi[t]
    h_ptr,  # [B, H] h_{t-1} (any float dtype)
    h_alt_ptr,  # [B, H] h0: rows b >= n_prev read h_{t-1} here (packed), or None
    w_ptr,  # [3H, H] W_hh
    b_ptr,  # [3H] b_hh or None
    len_ptr,  # [B] int64 lengths or None
    hs_ptr,  # [B, H] out: hs[t]
    hst_ptr,  # [B, H] out: fp32 copy of h_t (half inputs) or None
    gates_ptr,  # [B, 4H] out: gates[t] = (r, z, n, hn) or None
    t, B, H, n_prev,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    SAVE_GATES: tl.constexpr, STORE_STATE: tl.constexpr, HAS_ALT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_b, offs_j, mask_b, mask_j = tile_offsets(B, H, BLOCK_B, BLOCK_H)
    # Recurrent product h_{t-1} W_hh^T for the three gates of this tile.
    acc_r = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        h = _load_prev(h_ptr, h_alt_ptr, offs_b, offs_k, H, mask_b, mask_k, n_prev, HAS_ALT)
        acc_r += tl.dot(h, _w_t_tile(w_ptr, 0, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
        acc_z += tl.dot(h, _w_t_tile(w_ptr, 1, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
        acc_n += tl.dot(h, _w_t_tile(w_ptr, 2, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
    if HAS_BIAS:
        acc_r += load_row(b_ptr, offs_j, mask_j)
        acc_z += load_row(b_ptr + H, offs_j, mask_j)
        acc_n += load_row(b_ptr + 2 * H, offs_j, mask_j)
    # Gates and state update.
    x_r = load_tile(gi_ptr, offs_b, offs_j, 3 * H, 1, mask_b, mask_j)
    x_z = load_tile(gi_ptr + H, offs_b, offs_j, 3 * H, 1, mask_b, mask_j)
    x_n = load_tile(gi_ptr + 2 * H, offs_b, offs_j, 3 * H, 1, mask_b, mask_j)
    h_prev = _load_prev(h_ptr, h_alt_ptr, offs_b, offs_j, H, mask_b, mask_j, n_prev, HAS_ALT)
    r, z, n, h_new = gru_gates(x_r, x_z, x_n, acc_r, acc_z, acc_n, h_prev)
    h_new = tl.where(_rows_valid(len_ptr, offs_b, mask_b, t, HAS_LENGTHS), h_new, h_prev)
    store_tile(hs_ptr, h_new, offs_b, offs_j, H, mask_b, mask_j)
    if STORE_STATE:
        store_tile(hst_ptr, h_new, offs_b, offs_j, H, mask_b, mask_j)
    if SAVE_GATES:
        store_tile(gates_ptr, r, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(gates_ptr + H, z, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(gates_ptr + 2 * H, n, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(gates_ptr + 3 * H, acc_n, offs_b, offs_j, 4 * H, mask_b, mask_j)


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "HAS_ALT": lambda a: a["h_alt_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["t", "B", "n_prev", "n_next"])
def _gru_bwd_step_kernel(
    grad_h_ptr,  # [B, H] grad_hs[t]
    gates_ptr,  # [B, 4H] gates[t] = (r, z, n, hn)
    h_ptr,  # [B, H] h_{t-1}
    h_alt_ptr,  # [B, H] h0: rows b >= n_prev read h_{t-1} here (packed), or None
    w_ptr,  # [3H, H] W_hh
    len_ptr,  # [B] int64 lengths or None
    dg_next_ptr,  # [n_next, 3H] fp32 dG_{t+1} (unused when not HAS_NEXT)
    dh_next_ptr,  # [B, H] fp32 direct term into h_t left by step t+1 (rows < n_next)
    dgi_ptr,  # [B, 3H] out: dgi[t] = (dr, dz, dn)
    dg_ptr,  # [B, 3H] out: fp32 dG_t = (dr, dz, dn * r)
    dh_ptr,  # [B, H] out: fp32 direct term into h_{t-1} (may be dh_next_ptr: tile-local)
    t, B, H, n_prev, n_next,
    HAS_NEXT: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_ALT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_b, offs_j, mask_b, mask_j = tile_offsets(B, H, BLOCK_B, BLOCK_H)
    # Total gradient reaching h_t.
    dh = load_tile(grad_h_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    if HAS_NEXT:  # only rows b < n_next have a step t+1 (packed layout; n_next = B when dense)
        carry_b = mask_b & (offs_b < n_next)
        dh += load_tile(dh_next_ptr, offs_b, offs_j, H, 1, carry_b, mask_j)
        dh += _carry_dot(dg_next_ptr, w_ptr, offs_b, offs_j, carry_b, mask_j, H, 3 * H,
                         BLOCK_B, BLOCK_H, BLOCK_K, PRECISION)
    # Pointwise gate backward of step t.
    r = load_tile(gates_ptr, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    z = load_tile(gates_ptr + H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    n = load_tile(gates_ptr + 2 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    hn = load_tile(gates_ptr + 3 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    h_prev = _load_prev(h_ptr, h_alt_ptr, offs_b, offs_j, H, mask_b, mask_j, n_prev, HAS_ALT)
    dr_pre, dz_pre, dn_pre, dh_direct = gru_gates_backward(dh, r, z, n, hn, h_prev)
    valid = _rows_valid(len_ptr, offs_b, mask_b, t, HAS_LENGTHS)
    dr_pre = tl.where(valid, dr_pre, 0.0)
    dz_pre = tl.where(valid, dz_pre, 0.0)
    dn_pre = tl.where(valid, dn_pre, 0.0)
    store_tile(dgi_ptr, dr_pre, offs_b, offs_j, 3 * H, mask_b, mask_j)
    store_tile(dgi_ptr + H, dz_pre, offs_b, offs_j, 3 * H, mask_b, mask_j)
    store_tile(dgi_ptr + 2 * H, dn_pre, offs_b, offs_j, 3 * H, mask_b, mask_j)
    store_tile(dg_ptr, dr_pre, offs_b, offs_j, 3 * H, mask_b, mask_j)
    store_tile(dg_ptr + H, dz_pre, offs_b, offs_j, 3 * H, mask_b, mask_j)
    # Select after the product: a padded step's saved r may be NaN/Inf (padding in
    # gi), and 0 * NaN would carry into step t-1 through the matmul.
    store_tile(dg_ptr + 2 * H, tl.where(valid, dn_pre * r, 0.0), offs_b, offs_j, 3 * H, mask_b, mask_j)
    # Direct (non-matmul) part of the gradient into h_{t-1}.
    store_tile(dh_ptr, tl.where(valid, dh_direct, dh), offs_b, offs_j, H, mask_b, mask_j)


# --------------------------------------------------------------- LSTM kernels


@triton.heuristics(
    {
        "HAS_BIAS": lambda a: a["b_ptr"] is not None,
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "SAVE_GATES": lambda a: a["gates_ptr"] is not None,
        "STORE_STATE": lambda a: a["hst_ptr"] is not None,
        "HAS_ALT": lambda a: a["h_alt_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["t", "B", "n_prev"])
def _lstm_fwd_step_kernel(
    gi_ptr,  # [B, 4H] gi[t]
    h_ptr,  # [B, H] h_{t-1}
    c_ptr,  # [B, H] c_{t-1}
    h_alt_ptr,  # [B, H] h0: rows b >= n_prev read h_{t-1} here (packed), or None
    c_alt_ptr,  # [B, H] c0: likewise c_{t-1} (used iff h_alt_ptr is given)
    w_ptr,  # [4H, H] W_hh
    b_ptr,  # [4H] b_hh or None
    len_ptr,  # [B] int64 lengths or None
    hs_ptr,  # [B, H] out: hs[t]
    cs_ptr,  # [B, H] out: cs[t]
    hst_ptr,  # [B, H] out: fp32 copy of h_t (half inputs) or None
    cst_ptr,  # [B, H] out: fp32 copy of c_t (used iff hst_ptr is given)
    gates_ptr,  # [B, 4H] out: gates[t] = activated (i, f, g, o) or None
    t, B, H, n_prev,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    SAVE_GATES: tl.constexpr, STORE_STATE: tl.constexpr, HAS_ALT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_b, offs_j, mask_b, mask_j = tile_offsets(B, H, BLOCK_B, BLOCK_H)
    # Recurrent product h_{t-1} W_hh^T for the four gates of this tile.
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        h = _load_prev(h_ptr, h_alt_ptr, offs_b, offs_k, H, mask_b, mask_k, n_prev, HAS_ALT)
        acc_i += tl.dot(h, _w_t_tile(w_ptr, 0, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
        acc_f += tl.dot(h, _w_t_tile(w_ptr, 1, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
        acc_g += tl.dot(h, _w_t_tile(w_ptr, 2, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
        acc_o += tl.dot(h, _w_t_tile(w_ptr, 3, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
    if HAS_BIAS:
        acc_i += load_row(b_ptr, offs_j, mask_j)
        acc_f += load_row(b_ptr + H, offs_j, mask_j)
        acc_g += load_row(b_ptr + 2 * H, offs_j, mask_j)
        acc_o += load_row(b_ptr + 3 * H, offs_j, mask_j)
    # Gates and state update.
    h_prev = _load_prev(h_ptr, h_alt_ptr, offs_b, offs_j, H, mask_b, mask_j, n_prev, HAS_ALT)
    c_prev = _load_prev(c_ptr, c_alt_ptr, offs_b, offs_j, H, mask_b, mask_j, n_prev, HAS_ALT)
    i, f, g, o, c_new, h_new = lstm_gates(
        acc_i + load_tile(gi_ptr, offs_b, offs_j, 4 * H, 1, mask_b, mask_j),
        acc_f + load_tile(gi_ptr + H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j),
        acc_g + load_tile(gi_ptr + 2 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j),
        acc_o + load_tile(gi_ptr + 3 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j),
        c_prev,
    )
    valid = _rows_valid(len_ptr, offs_b, mask_b, t, HAS_LENGTHS)
    h_new = tl.where(valid, h_new, h_prev)
    c_new = tl.where(valid, c_new, c_prev)
    store_tile(hs_ptr, h_new, offs_b, offs_j, H, mask_b, mask_j)
    store_tile(cs_ptr, c_new, offs_b, offs_j, H, mask_b, mask_j)
    if STORE_STATE:
        store_tile(hst_ptr, h_new, offs_b, offs_j, H, mask_b, mask_j)
        store_tile(cst_ptr, c_new, offs_b, offs_j, H, mask_b, mask_j)
    if SAVE_GATES:
        store_tile(gates_ptr, i, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(gates_ptr + H, f, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(gates_ptr + 2 * H, g, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(gates_ptr + 3 * H, o, offs_b, offs_j, 4 * H, mask_b, mask_j)


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "HAS_GRAD_C": lambda a: a["grad_c_ptr"] is not None,
        "STORE_DGI": lambda a: a["dgi_ptr"] is not None,
        "HAS_ALT": lambda a: a["c_alt_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["t", "B", "n_prev", "n_next"])
def _lstm_bwd_step_kernel(
    grad_h_ptr,  # [B, H] grad_hs[t]
    grad_c_ptr,  # [B, H] grad_cs[t] or None
    gates_ptr,  # [B, 4H] gates[t] = (i, f, g, o)
    c_ptr,  # [B, H] c_t
    c_prev_ptr,  # [B, H] c_{t-1}
    c_alt_ptr,  # [B, H] c0: rows b >= n_prev read c_{t-1} here (packed), or None
    w_ptr,  # [4H, H] W_hh
    len_ptr,  # [B] int64 lengths or None
    dg_next_ptr,  # [n_next, 4H] fp32 dG_{t+1} (unused when not HAS_NEXT)
    dh_next_ptr,  # [B, H] fp32 direct term into h_t left by step t+1 (rows < n_next)
    dc_next_ptr,  # [B, H] fp32 gradient into c_t left by step t+1 (rows < n_next)
    dgi_ptr,  # [B, 4H] out: dgi[t] in the input dtype, or None (then dgi is dG)
    dg_ptr,  # [B, 4H] out: fp32 dG_t = (di, df, dg, do) pre-activation
    dh_ptr,  # [B, H] out: fp32 direct term into h_{t-1} (may be dh_next_ptr: tile-local)
    dc_ptr,  # [B, H] out: fp32 gradient into c_{t-1} (may be dc_next_ptr)
    t, B, H, n_prev, n_next,
    HAS_NEXT: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_GRAD_C: tl.constexpr, STORE_DGI: tl.constexpr, HAS_ALT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_b, offs_j, mask_b, mask_j = tile_offsets(B, H, BLOCK_B, BLOCK_H)
    # Total gradients reaching h_t and c_t.
    dh = load_tile(grad_h_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    if HAS_GRAD_C:
        dc = load_tile(grad_c_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    else:
        dc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_NEXT:  # only rows b < n_next have a step t+1 (packed layout; n_next = B when dense)
        carry_b = mask_b & (offs_b < n_next)
        dh += load_tile(dh_next_ptr, offs_b, offs_j, H, 1, carry_b, mask_j)
        dh += _carry_dot(dg_next_ptr, w_ptr, offs_b, offs_j, carry_b, mask_j, H, 4 * H,
                         BLOCK_B, BLOCK_H, BLOCK_K, PRECISION)
        dc += load_tile(dc_next_ptr, offs_b, offs_j, H, 1, carry_b, mask_j)
    # Pointwise gate backward of step t.
    i = load_tile(gates_ptr, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    f = load_tile(gates_ptr + H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    g = load_tile(gates_ptr + 2 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    o = load_tile(gates_ptr + 3 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    c = load_tile(c_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    c_prev = _load_prev(c_prev_ptr, c_alt_ptr, offs_b, offs_j, H, mask_b, mask_j, n_prev, HAS_ALT)
    d_i, d_f, d_g, d_o, dc_prev = lstm_gates_backward(dh, dc, i, f, g, o, c, c_prev)
    valid = _rows_valid(len_ptr, offs_b, mask_b, t, HAS_LENGTHS)
    d_i = tl.where(valid, d_i, 0.0)
    d_f = tl.where(valid, d_f, 0.0)
    d_g = tl.where(valid, d_g, 0.0)
    d_o = tl.where(valid, d_o, 0.0)
    store_tile(dg_ptr, d_i, offs_b, offs_j, 4 * H, mask_b, mask_j)
    store_tile(dg_ptr + H, d_f, offs_b, offs_j, 4 * H, mask_b, mask_j)
    store_tile(dg_ptr + 2 * H, d_g, offs_b, offs_j, 4 * H, mask_b, mask_j)
    store_tile(dg_ptr + 3 * H, d_o, offs_b, offs_j, 4 * H, mask_b, mask_j)
    if STORE_DGI:
        store_tile(dgi_ptr, d_i, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(dgi_ptr + H, d_f, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(dgi_ptr + 2 * H, d_g, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(dgi_ptr + 3 * H, d_o, offs_b, offs_j, 4 * H, mask_b, mask_j)
    # Gradients into step t-1: h only through the matmul (next launch) unless the row
    # did not update; c through the forget gate.
    store_tile(dh_ptr, tl.where(valid, 0.0, dh), offs_b, offs_j, H, mask_b, mask_j)
    store_tile(dc_ptr, tl.where(valid, dc_prev, dc), offs_b, offs_j, H, mask_b, mask_j)


# ------------------------------------------------------------- shared final


@triton.heuristics({"HAS_C": lambda a: a["dc_ptr"] is not None})
@triton.jit
def _rnn_bwd_final_kernel(
    dg_ptr,  # [B, GH] fp32 dG_0
    w_ptr,  # [GH, H] W_hh
    dh_ptr,  # [B, H] fp32 direct term into h0 left by step 0
    dc_ptr,  # [B, H] fp32 gradient into c0 left by step 0, or None (GRU)
    dh0_ptr,  # [B, H] out
    dc0_ptr,  # [B, H] out (LSTM)
    B, H, GH,
    HAS_C: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_b, offs_j, mask_b, mask_j = tile_offsets(B, H, BLOCK_B, BLOCK_H)
    dh = load_tile(dh_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    dh += _carry_dot(dg_ptr, w_ptr, offs_b, offs_j, mask_b, mask_j, H, GH,
                     BLOCK_B, BLOCK_H, BLOCK_K, PRECISION)
    store_tile(dh0_ptr, dh, offs_b, offs_j, H, mask_b, mask_j)
    if HAS_C:
        dc = load_tile(dc_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
        store_tile(dc0_ptr, dc, offs_b, offs_j, H, mask_b, mask_j)


# ------------------------------------------------------------------ host side


# Every launch is recorded while fastseq.ops.launches.count() is open.
_gru_fwd_step_kernel = counted(_gru_fwd_step_kernel)
_gru_bwd_step_kernel = counted(_gru_bwd_step_kernel)
_lstm_fwd_step_kernel = counted(_lstm_fwd_step_kernel)
_lstm_bwd_step_kernel = counted(_lstm_bwd_step_kernel)
_rnn_bwd_final_kernel = counted(_rnn_bwd_final_kernel)


def _launch_args(B: int, H: int):
    """(grid, constexpr/launch kwargs) shared by every kernel of one call."""
    blk = pick_blocks(B, H)
    grid = (triton.cdiv(B, blk.BLOCK_B), triton.cdiv(H, blk.BLOCK_H))
    kw = dict(
        BLOCK_B=blk.BLOCK_B,
        BLOCK_H=blk.BLOCK_H,
        BLOCK_K=blk.BLOCK_K,
        PRECISION=precision(),
        num_warps=blk.num_warps,
    )
    return grid, kw


def limits(sizes: Mapping[str, int]) -> Optional[backend_limits.Unsupported]:
    """None if the recurrence kernels can take ``sizes`` = ``{"T", "B", "H", "G"}``
    (G = 3 for the GRU, 4 for the LSTM), else why not. The packed ops pass
    ``{"N", "B", "H", "G", "T"}``; their launches index views at a step's offset
    (no offset past a step's ``[B, 4H]``), so N does not enter.

    Limits: the largest tensor a launch indexes -- a step's ``[B, 4H]`` gates or
    ``[B, G*H]`` gradient, or ``W_hh [G*H, H]`` -- within int32 offsets, and the
    ``cdiv(H, BLOCK_H)`` hidden tiles within grid axis 1
    (:func:`fastseq.ops.triton_utils.hidden_tile_limits`).
    """
    B, H, G = sizes["B"], sizes["H"], sizes["G"]
    n = max(B * 4 * H, G * H * H)
    return hidden_tile_limits(B, H, n, f"B={B}, H={H}: a per-step [B, 4H] tensor or W_hh [{G}*H, H] "
                                       f"has {n} elements")


def _prep_lengths(lengths: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    if lengths is None:
        return None
    return lengths.to(device=like.device, dtype=torch.int64).contiguous()


def _weight_grads_rows(dg: Tensor, h_prev: Tensor, w_hh: Tensor, has_bias: bool) -> Tuple[Tensor, Tensor]:
    """dW_hh = dG^T h_prev and db_hh = sum dG (``[0]`` without a bias), as one fp32
    product over all (step, row) pairs: dG ``[M, G*H]`` fp32, h_prev ``[M, H]`` fp32
    each pair's previous state."""
    dw = dg.t() @ h_prev
    db = dg.sum(dim=0).to(w_hh.dtype) if has_bias else w_hh.new_empty((0,))
    return dw.to(w_hh.dtype), db


def _weight_grads(dg: Tensor, h0: Tensor, hs: Tensor, w_hh: Tensor, has_bias: bool) -> Tuple[Tensor, Tensor]:
    """:func:`_weight_grads_rows` of a time-major recurrence: dG ``[T, B, G*H]``, h_prev = [h0; hs[:-1]]."""
    T, B, GH = dg.shape
    H = hs.shape[2]
    h_prev = torch.cat([h0.unsqueeze(0).float(), hs[:-1].float()], dim=0)
    return _weight_grads_rows(dg.reshape(T * B, GH), h_prev.reshape(T * B, H), w_hh, has_bias)


def _empty_backward(dgi_shape, h0, w_hh, hs, has_bias, n_state):
    """Backward for a zero-sized problem (no kernel launches)."""
    dgi = torch.zeros(dgi_shape, device=hs.device, dtype=hs.dtype)
    states = [torch.zeros_like(h0) for _ in range(n_state)]
    dw = torch.zeros_like(w_hh)
    db = w_hh.new_zeros((w_hh.shape[0],)) if has_bias else w_hh.new_empty((0,))
    return (dgi, *states, dw, db)


def gru_recurrence_forward(
    gi: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    lengths: Optional[Tensor],
    save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """GRU recurrence (one fused launch per step).

    Args:
        gi: ``[T, B, 3H]`` input projection (r, z, n); h0: ``[B, H]``;
        w_hh: ``[3H, H]``; b_hh: ``[3H]`` or None; lengths: int ``[B]`` or None.
        save_gates: also return what the backward needs.

    Returns:
        hs ``[T, B, H]``; gates ``[T, B, 4H]`` = (r, z, n, hn) or an empty ``[0]``.
    """
    T, B, _ = gi.shape
    H = h0.shape[1]
    hs = alloc.empty((T, B, H), gi)
    gates = alloc.empty((T, B, 4 * H) if save_gates else (0,), gi)
    if T == 0 or B == 0 or H == 0:
        return hs, gates
    gi, h0, w, b = gi.contiguous(), h0.contiguous(), w_hh.contiguous(), contiguous_or_none(b_hh)
    lens = _prep_lengths(lengths, gi)
    grid, kw = _launch_args(B, H)
    # Half inputs: carry the state in fp32 (ping-pong, never read and written by one launch).
    state = None if gi.dtype == torch.float32 else alloc.empty((2, B, H), gi, torch.float32)
    for t in range(T):
        if t == 0:
            h_prev = h0
        else:
            h_prev = hs[t - 1] if state is None else state[(t - 1) % 2]
        _gru_fwd_step_kernel[grid](
            gi[t], h_prev, None, w, b, lens,
            hs[t], None if state is None else state[t % 2],
            gates[t] if save_gates else None,
            t, B, H, B, **kw,
        )
    return hs, gates


def gru_recurrence_backward(
    grad_hs: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    hs: Tensor,
    gates: Tensor,
    lengths: Optional[Tensor],
    has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`gru_recurrence_forward` (one fused launch per step, t = T-1 .. 0).

    Args:
        grad_hs: ``[T, B, H]`` gradient w.r.t. ``hs`` (includes that of h_n);
        h0 ``[B, H]``, w_hh ``[3H, H]``, hs ``[T, B, H]``, gates ``[T, B, 4H]`` as
        saved by the forward; lengths int ``[B]`` or None.

    Returns:
        dgi ``[T, B, 3H]``, dh0 ``[B, H]``, dw_hh ``[3H, H]``, db_hh ``[3H]`` (``[0]`` without a bias).
    """
    T, B, H = hs.shape
    if T == 0 or B == 0 or H == 0:
        return _empty_backward((T, B, 3 * H), h0, w_hh, hs, has_bias, 1)
    if gates.dim() != 3:
        raise ValueError("gru_recurrence_backward needs the gates saved by gru_recurrence_forward(save_gates=True)")
    grad_hs, h0, w, hs, gates = (x.contiguous() for x in (grad_hs, h0, w_hh, hs, gates))
    lens = _prep_lengths(lengths, hs)
    grid, kw = _launch_args(B, H)
    dgi = alloc.empty((T, B, 3 * H), hs)
    dg = alloc.empty((T, B, 3 * H), hs, torch.float32)
    dh_buf = alloc.empty((2, B, H), hs, torch.float32)
    for t in range(T - 1, -1, -1):
        nxt = min(t + 1, T - 1)  # any valid slice when there is no step t+1
        _gru_bwd_step_kernel[grid](
            grad_hs[t], gates[t], h0 if t == 0 else hs[t - 1], None, w, lens,
            dg[nxt], dh_buf[(t + 1) % 2],
            dgi[t], dg[t], dh_buf[t % 2],
            t, B, H, B, B, HAS_NEXT=t < T - 1, **kw,
        )
    dh0 = alloc.empty((B, H), h0)
    _rnn_bwd_final_kernel[grid](dg[0], w, dh_buf[0], None, dh0, None, B, H, 3 * H, **kw)
    dw, db = _weight_grads(dg, h0, hs, w_hh, has_bias)
    return dgi, dh0, dw, db


def lstm_recurrence_forward(
    gi: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    lengths: Optional[Tensor],
    save_gates: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """LSTM recurrence (one fused launch per step).

    Args:
        gi: ``[T, B, 4H]`` input projection (i, f, g, o); h0, c0: ``[B, H]``;
        w_hh: ``[4H, H]``; b_hh: ``[4H]`` or None; lengths: int ``[B]`` or None.

    Returns:
        hs, cs ``[T, B, H]``; gates ``[T, B, 4H]`` activated (i, f, g, o) or ``[0]``.
    """
    T, B, _ = gi.shape
    H = h0.shape[1]
    hs = alloc.empty((T, B, H), gi)
    cs = alloc.empty((T, B, H), gi)
    gates = alloc.empty((T, B, 4 * H) if save_gates else (0,), gi)
    if T == 0 or B == 0 or H == 0:
        return hs, cs, gates
    gi, h0, c0, w, b = gi.contiguous(), h0.contiguous(), c0.contiguous(), w_hh.contiguous(), contiguous_or_none(b_hh)
    lens = _prep_lengths(lengths, gi)
    grid, kw = _launch_args(B, H)
    half = gi.dtype != torch.float32
    hst = alloc.empty((2, B, H), gi, torch.float32) if half else None
    cst = alloc.empty((2, B, H), gi, torch.float32) if half else None
    for t in range(T):
        if t == 0:
            h_prev, c_prev = h0, c0
        elif half:
            h_prev, c_prev = hst[(t - 1) % 2], cst[(t - 1) % 2]
        else:
            h_prev, c_prev = hs[t - 1], cs[t - 1]
        _lstm_fwd_step_kernel[grid](
            gi[t], h_prev, c_prev, None, None, w, b, lens,
            hs[t], cs[t],
            hst[t % 2] if half else None, cst[t % 2] if half else None,
            gates[t] if save_gates else None,
            t, B, H, B, **kw,
        )
    return hs, cs, gates


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
    """Backward of :func:`lstm_recurrence_forward` (one fused launch per step, t = T-1 .. 0).

    Args:
        grad_hs, grad_cs: ``[T, B, H]`` gradients w.r.t. ``hs`` and ``cs``
        (``grad_cs`` may be None: zeros); the rest as saved by the forward.

    Returns:
        dgi ``[T, B, 4H]``, dh0 ``[B, H]``, dc0 ``[B, H]``, dw_hh ``[4H, H]``,
        db_hh ``[4H]`` (``[0]`` without a bias).
    """
    T, B, H = hs.shape
    if T == 0 or B == 0 or H == 0:
        return _empty_backward((T, B, 4 * H), h0, w_hh, hs, has_bias, 2)
    if gates.dim() != 3:
        raise ValueError("lstm_recurrence_backward needs the gates saved by lstm_recurrence_forward(save_gates=True)")
    grad_hs, h0, c0, w, cs, gates = (x.contiguous() for x in (grad_hs, h0, c0, w_hh, cs, gates))
    hs, grad_cs = hs.contiguous(), contiguous_or_none(grad_cs)
    lens = _prep_lengths(lengths, hs)
    grid, kw = _launch_args(B, H)
    dg = alloc.empty((T, B, 4 * H), hs, torch.float32)
    # float32: dgi is dG itself; otherwise a separate copy in the input dtype.
    dgi = dg if hs.dtype == torch.float32 else alloc.empty((T, B, 4 * H), hs)
    dh_buf = alloc.empty((2, B, H), hs, torch.float32)
    dc_buf = alloc.empty((2, B, H), hs, torch.float32)
    for t in range(T - 1, -1, -1):
        nxt = min(t + 1, T - 1)
        _lstm_bwd_step_kernel[grid](
            grad_hs[t], None if grad_cs is None else grad_cs[t],
            gates[t], cs[t], c0 if t == 0 else cs[t - 1], None, w, lens,
            dg[nxt], dh_buf[(t + 1) % 2], dc_buf[(t + 1) % 2],
            None if dgi is dg else dgi[t], dg[t], dh_buf[t % 2], dc_buf[t % 2],
            t, B, H, B, B, HAS_NEXT=t < T - 1, **kw,
        )
    dh0 = alloc.empty((B, H), h0)
    dc0 = alloc.empty((B, H), c0)
    _rnn_bwd_final_kernel[grid](dg[0], w, dh_buf[0], dc_buf[0], dh0, dc0, B, H, 4 * H, **kw)
    dw, db = _weight_grads(dg, h0, hs, w_hh, has_bias)
    return dgi, dh0, dc0, dw, db


# ---------------------------------------------------------------- packed layout
#
# The same step kernels on a PackedSequence's layout (naive.py, "packed layout";
# the steps and their previous-state rows from naive.packed_steps): a launch
# covers only the step's ``n`` rows (views of gi/hs/gates at the step's offset);
# rows ``b < n_prev`` read their previous state at the previous step's rows
# (``prev_offset + b``), the others (reverse direction: rows starting there) from
# h0 through the kernels' ``h_alt`` pointer. The backward runs the steps in
# reverse processing order with one ``[B, H]`` carry buffer indexed by row: a
# launch reads and rewrites only its own (row, hidden) tiles (tile-local, so in
# place), rows not running at a step are not touched, and only rows ``b <
# n_next`` (those the next step reads from this one) receive a carry. After the
# loop, each row's carry holds the direct term into its h0 row, and dh0 adds
# ``dG @ W_hh`` of the (step, row) that read h0[b]; dW_hh = dG^T h_prev over all
# N packed rows.


class _PackedPlan:
    """What a packed call needs from ``batch_sizes``, computed once per call.

    ``steps``: :func:`naive.packed_steps` in processing order, ``(offset, rows,
    prev_offset, prev_rows, grid_rows)`` (``grid_rows`` the launch's row blocks).
    The backward also calls :meth:`gather_rows`.
    """

    def __init__(self, batch_sizes: Tensor, reverse: bool, block_b: int):
        from fastseq.ops.recurrence.naive import packed_steps

        self.steps = [(off, n, p_off, p_n, triton.cdiv(n, block_b))
                      for off, n, p_off, p_n in packed_steps(batch_sizes, reverse)]

    def gather_rows(self, B: int, device) -> Tuple[Tensor, Optional[Tensor]]:
        """(prev_rows, h0_rows): int64 ``[N]``, the packed row holding each packed
        row's previous state (0 for the rows that read h0), and int64 ``[B]``, the
        packed row that reads ``h0[b]`` -- None when that is row b itself (the forward
        direction: step 0 holds rows 0 .. B-1). Vectorised on the CPU, one copy each."""
        offs, ns, p_offs, p_ns = (torch.tensor([s[k] for s in self.steps], dtype=torch.int64) for k in range(4))
        step = torch.repeat_interleave(torch.arange(len(self.steps)), ns)  # per (step, row), processing order
        b = torch.arange(step.numel()) - (torch.cumsum(ns, 0) - ns)[step]
        row = offs[step] + b
        from_prev = b < p_ns[step]
        prev = torch.empty(step.numel(), dtype=torch.int64)
        prev[row] = torch.where(from_prev, p_offs[step] + b, 0)
        h0_rows = torch.empty(B, dtype=torch.int64)
        h0_rows[b[~from_prev]] = row[~from_prev]
        if torch.equal(h0_rows, torch.arange(B)):
            return prev.to(device), None
        return prev.to(device), h0_rows.to(device)


def _packed_prev_states(hs: Tensor, h0: Tensor, prev_rows: Tensor, h0_rows: Optional[Tensor]) -> Tensor:
    """fp32 ``[N, H]``: each packed row's previous state (see :meth:`_PackedPlan.gather_rows`)."""
    out = hs.float()[prev_rows]
    if h0_rows is None:
        out[:h0.shape[0]] = h0.float()
    else:
        out[h0_rows] = h0.float()
    return out


def _packed_prev(s: int, steps, hs: Tensor, state: Optional[Tensor], init: Tensor):
    """(pointer tensor, alt tensor or None, n_prev) of step ``s``'s previous state:
    rows ``b < n_prev`` at ``hs[prev_offset + b]`` (or, for half inputs, the fp32
    ping-pong ``state[(s-1) % 2][b]``), the others at ``init[b]``."""
    _, n, p_off, p_n, _ = steps[s]
    if p_n == 0:
        return init, None, n
    prev = hs[p_off:] if state is None else state[(s - 1) % 2]
    return prev, (init if p_n < n else None), p_n


def _packed_next(s: int, steps, dg: Tensor):
    """(dG rows of the step after ``s`` in processing order, n_next: its rows that read
    step ``s``, has_next)."""
    if s + 1 == len(steps):
        return dg, 0, False
    off, _, _, p_n, _ = steps[s + 1]
    return dg[off:], p_n, True


def gru_packed_recurrence_forward(
    gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Tensor,
    reverse: bool, save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """GRU recurrence on a packed sequence (one fused launch per step over its rows).

    Args and returns: :func:`fastseq.ops.recurrence.naive.gru_packed_recurrence_forward`
    (gi ``[N, 3H]``, h0 ``[B, H]``, batch_sizes int64 CPU ``[T]`` -> hs ``[N, H]``,
    gates ``[N, 4H]`` or ``[0]``).
    """
    N, (B, H) = gi.shape[0], h0.shape
    hs = alloc.empty((N, H), gi)
    gates = alloc.empty((N, 4 * H) if save_gates else (0,), gi)
    if N == 0 or B == 0 or H == 0:
        return hs, gates
    gi, h0, w, b = gi.contiguous(), h0.contiguous(), w_hh.contiguous(), contiguous_or_none(b_hh)
    grid, kw = _launch_args(B, H)
    plan = _PackedPlan(batch_sizes, reverse, kw["BLOCK_B"])
    state = None if gi.dtype == torch.float32 else alloc.empty((2, B, H), gi, torch.float32)
    for s, (off, n, _, _, rows) in enumerate(plan.steps):
        h_prev, h_alt, n_prev = _packed_prev(s, plan.steps, hs, state, h0)
        _gru_fwd_step_kernel[(rows, grid[1])](
            gi[off:], h_prev, h_alt, w, b, None,
            hs[off:], None if state is None else state[s % 2],
            gates[off:] if save_gates else None,
            0, n, H, n_prev, **kw,
        )
    return hs, gates


def gru_packed_recurrence_backward(
    grad_hs: Tensor, h0: Tensor, w_hh: Tensor, hs: Tensor, gates: Tensor, batch_sizes: Tensor,
    reverse: bool, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`gru_packed_recurrence_forward` (one fused launch per step, in
    reverse processing order). Returns dgi ``[N, 3H]``, dh0 ``[B, H]``, dw_hh
    ``[3H, H]``, db_hh ``[3H]`` (``[0]`` without a bias)."""
    N, H = hs.shape
    B = h0.shape[0]
    if N == 0 or B == 0 or H == 0:
        return _empty_backward((N, 3 * H), h0, w_hh, hs, has_bias, 1)
    if gates.dim() != 2:
        raise ValueError("gru_packed_recurrence_backward needs the gates saved by "
                         "gru_packed_recurrence_forward(save_gates=True)")
    grad_hs, h0, w, hs, gates = (x.contiguous() for x in (grad_hs, h0, w_hh, hs, gates))
    grid, kw = _launch_args(B, H)
    plan = _PackedPlan(batch_sizes, reverse, kw["BLOCK_B"])
    dgi = alloc.empty((N, 3 * H), hs)
    dg = alloc.empty((N, 3 * H), hs, torch.float32)
    dh_buf = alloc.empty((B, H), hs, torch.float32)  # per row; read and rewritten in place
    for s in range(len(plan.steps) - 1, -1, -1):
        off, n, _, _, rows = plan.steps[s]
        h_prev, h_alt, n_prev = _packed_prev(s, plan.steps, hs, None, h0)
        dg_next, n_next, has_next = _packed_next(s, plan.steps, dg)
        _gru_bwd_step_kernel[(rows, grid[1])](
            grad_hs[off:], gates[off:], h_prev, h_alt, w, None,
            dg_next, dh_buf,
            dgi[off:], dg[off:], dh_buf,
            0, n, H, n_prev, n_next, HAS_NEXT=has_next, **kw,
        )
    prev_rows, h0_rows = plan.gather_rows(B, hs.device)
    dh0 = alloc.empty((B, H), h0)
    dg_h0 = dg if h0_rows is None else dg[h0_rows]
    _rnn_bwd_final_kernel[grid](dg_h0, w, dh_buf, None, dh0, None, B, H, 3 * H, **kw)
    dw, db = _weight_grads_rows(dg, _packed_prev_states(hs, h0, prev_rows, h0_rows), w_hh, has_bias)
    return dgi, dh0, dw, db


def lstm_packed_recurrence_forward(
    gi: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Tensor,
    reverse: bool, save_gates: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """LSTM recurrence on a packed sequence (one fused launch per step over its rows).

    Args and returns: :func:`fastseq.ops.recurrence.naive.lstm_packed_recurrence_forward`
    (gi ``[N, 4H]`` -> hs, cs ``[N, H]``, gates ``[N, 4H]`` or ``[0]``).
    """
    N, (B, H) = gi.shape[0], h0.shape
    hs = alloc.empty((N, H), gi)
    cs = alloc.empty((N, H), gi)
    gates = alloc.empty((N, 4 * H) if save_gates else (0,), gi)
    if N == 0 or B == 0 or H == 0:
        return hs, cs, gates
    gi, h0, c0, w, b = gi.contiguous(), h0.contiguous(), c0.contiguous(), w_hh.contiguous(), contiguous_or_none(b_hh)
    grid, kw = _launch_args(B, H)
    plan = _PackedPlan(batch_sizes, reverse, kw["BLOCK_B"])
    half = gi.dtype != torch.float32
    hst = alloc.empty((2, B, H), gi, torch.float32) if half else None
    cst = alloc.empty((2, B, H), gi, torch.float32) if half else None
    for s, (off, n, _, _, rows) in enumerate(plan.steps):
        h_prev, h_alt, n_prev = _packed_prev(s, plan.steps, hs, hst, h0)
        c_prev, c_alt, _ = _packed_prev(s, plan.steps, cs, cst, c0)
        _lstm_fwd_step_kernel[(rows, grid[1])](
            gi[off:], h_prev, c_prev, h_alt, c_alt, w, b, None,
            hs[off:], cs[off:],
            hst[s % 2] if half else None, cst[s % 2] if half else None,
            gates[off:] if save_gates else None,
            0, n, H, n_prev, **kw,
        )
    return hs, cs, gates


def lstm_packed_recurrence_backward(
    grad_hs: Tensor, grad_cs: Optional[Tensor], h0: Tensor, c0: Tensor, w_hh: Tensor, hs: Tensor, cs: Tensor,
    gates: Tensor, batch_sizes: Tensor, reverse: bool, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`lstm_packed_recurrence_forward` (``grad_cs`` may be None: zeros).
    Returns dgi ``[N, 4H]``, dh0, dc0 ``[B, H]``, dw_hh ``[4H, H]``, db_hh ``[4H]`` (``[0]``
    without a bias)."""
    N, H = hs.shape
    B = h0.shape[0]
    if N == 0 or B == 0 or H == 0:
        return _empty_backward((N, 4 * H), h0, w_hh, hs, has_bias, 2)
    if gates.dim() != 2:
        raise ValueError("lstm_packed_recurrence_backward needs the gates saved by "
                         "lstm_packed_recurrence_forward(save_gates=True)")
    grad_hs, h0, c0, w, cs, gates = (x.contiguous() for x in (grad_hs, h0, c0, w_hh, cs, gates))
    hs, grad_cs = hs.contiguous(), contiguous_or_none(grad_cs)
    grid, kw = _launch_args(B, H)
    plan = _PackedPlan(batch_sizes, reverse, kw["BLOCK_B"])
    dg = alloc.empty((N, 4 * H), hs, torch.float32)
    dgi = dg if hs.dtype == torch.float32 else alloc.empty((N, 4 * H), hs)
    dh_buf = alloc.empty((B, H), hs, torch.float32)  # per row; read and rewritten in place
    dc_buf = alloc.empty((B, H), hs, torch.float32)
    for s in range(len(plan.steps) - 1, -1, -1):
        off, n, _, _, rows = plan.steps[s]
        c_prev, c_alt, n_prev = _packed_prev(s, plan.steps, cs, None, c0)
        dg_next, n_next, has_next = _packed_next(s, plan.steps, dg)
        _lstm_bwd_step_kernel[(rows, grid[1])](
            grad_hs[off:], None if grad_cs is None else grad_cs[off:],
            gates[off:], cs[off:], c_prev, c_alt, w, None,
            dg_next, dh_buf, dc_buf,
            None if dgi is dg else dgi[off:], dg[off:], dh_buf, dc_buf,
            0, n, H, n_prev, n_next, HAS_NEXT=has_next, **kw,
        )
    prev_rows, h0_rows = plan.gather_rows(B, hs.device)
    dh0 = alloc.empty((B, H), h0)
    dc0 = alloc.empty((B, H), c0)
    dg_h0 = dg if h0_rows is None else dg[h0_rows]
    _rnn_bwd_final_kernel[grid](dg_h0, w, dh_buf, dc_buf, dh0, dc0, B, H, 4 * H, **kw)
    dw, db = _weight_grads_rows(dg, _packed_prev_states(hs, h0, prev_rows, h0_rows), w_hh, has_bias)
    return dgi, dh0, dc0, dw, db
