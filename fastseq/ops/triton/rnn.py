"""Fused Triton kernels for the GRU and LSTM recurrences.

Same signatures, semantics and output layouts as :mod:`fastseq.ops.reference`
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

Precision: loads are cast to fp32 and every product and accumulation is fp32;
``tl.dot`` uses ``input_precision="ieee"`` unless the caller passes
``allow_tf32=True``. Outputs are in the input dtype; ``dw_hh``/``db_hh`` in
``w_hh``'s dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastseq import _backend
from fastseq.ops.launches import counted

__all__ = ["gru_recurrence_forward", "gru_recurrence_backward", "lstm_recurrence_forward", "lstm_recurrence_backward"]


# ------------------------------------------------------------------ jit helpers


@triton.jit
def _tanh(x):
    """tanh(x) = 2 sigmoid(2x) - 1 (portable across Triton versions)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _tile_offsets(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row / hidden-unit offsets and in-bounds masks of this program's tile."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    return offs_b, offs_j, offs_b < B, offs_j < H


@triton.jit
def _load_tile(ptr, offs_r, offs_c, stride_r, stride_c, mask_r, mask_c):
    """fp32 tile ``ptr[offs_r * stride_r + offs_c * stride_c]``, zero out of bounds."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    return tl.load(ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, value, offs_r, offs_c, stride_r, mask_r, mask_c):
    """Store a tile of a row-major matrix, cast to the pointer's dtype."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :]
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def _load_row(ptr, offs, mask):
    """fp32 ``[1, N]`` row vector (a bias slice)."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)[None, :]


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
def _w_t_tile(w_ptr, gate, offs_k, offs_j, H, mask_k, mask_j):
    """``[BLOCK_K, BLOCK_H]`` fp32 tile of gate ``gate``'s ``W^T``: (k, j) -> W[gate*H + j, k]."""
    return _load_tile(w_ptr + gate * H * H, offs_k, offs_j, 1, H, mask_k, mask_j)


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
        a = _load_tile(dg_ptr, offs_b, offs_m, GH, 1, mask_b, mask_m)
        w = _load_tile(w_ptr, offs_m, offs_j, H, 1, mask_m, mask_j)
        acc += tl.dot(a, w, input_precision=PRECISION)
    return acc


# ---------------------------------------------------------------- GRU kernels


@triton.heuristics(
    {
        "HAS_BIAS": lambda a: a["b_ptr"] is not None,
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "SAVE_GATES": lambda a: a["gates_ptr"] is not None,
        "STORE_STATE": lambda a: a["hst_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["t"])
def _gru_fwd_step_kernel(
    gi_ptr,  # [B, 3H] gi[t]
    h_ptr,  # [B, H] h_{t-1} (any float dtype)
    w_ptr,  # [3H, H] W_hh
    b_ptr,  # [3H] b_hh or None
    len_ptr,  # [B] int64 lengths or None
    hs_ptr,  # [B, H] out: hs[t]
    hst_ptr,  # [B, H] out: fp32 copy of h_t (half inputs) or None
    gates_ptr,  # [B, 4H] out: gates[t] = (r, z, n, hn) or None
    t, B, H,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    SAVE_GATES: tl.constexpr, STORE_STATE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_b, offs_j, mask_b, mask_j = _tile_offsets(B, H, BLOCK_B, BLOCK_H)
    # Recurrent product h_{t-1} W_hh^T for the three gates of this tile.
    acc_r = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        h = _load_tile(h_ptr, offs_b, offs_k, H, 1, mask_b, mask_k)
        acc_r += tl.dot(h, _w_t_tile(w_ptr, 0, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
        acc_z += tl.dot(h, _w_t_tile(w_ptr, 1, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
        acc_n += tl.dot(h, _w_t_tile(w_ptr, 2, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
    if HAS_BIAS:
        acc_r += _load_row(b_ptr, offs_j, mask_j)
        acc_z += _load_row(b_ptr + H, offs_j, mask_j)
        acc_n += _load_row(b_ptr + 2 * H, offs_j, mask_j)
    # Gates and state update.
    x_r = _load_tile(gi_ptr, offs_b, offs_j, 3 * H, 1, mask_b, mask_j)
    x_z = _load_tile(gi_ptr + H, offs_b, offs_j, 3 * H, 1, mask_b, mask_j)
    x_n = _load_tile(gi_ptr + 2 * H, offs_b, offs_j, 3 * H, 1, mask_b, mask_j)
    r = tl.sigmoid(x_r + acc_r)
    z = tl.sigmoid(x_z + acc_z)
    n = _tanh(x_n + r * acc_n)
    h_prev = _load_tile(h_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    h_new = (1.0 - z) * n + z * h_prev
    h_new = tl.where(_rows_valid(len_ptr, offs_b, mask_b, t, HAS_LENGTHS), h_new, h_prev)
    _store_tile(hs_ptr, h_new, offs_b, offs_j, H, mask_b, mask_j)
    if STORE_STATE:
        _store_tile(hst_ptr, h_new, offs_b, offs_j, H, mask_b, mask_j)
    if SAVE_GATES:
        _store_tile(gates_ptr, r, offs_b, offs_j, 4 * H, mask_b, mask_j)
        _store_tile(gates_ptr + H, z, offs_b, offs_j, 4 * H, mask_b, mask_j)
        _store_tile(gates_ptr + 2 * H, n, offs_b, offs_j, 4 * H, mask_b, mask_j)
        _store_tile(gates_ptr + 3 * H, acc_n, offs_b, offs_j, 4 * H, mask_b, mask_j)


@triton.heuristics({"HAS_LENGTHS": lambda a: a["len_ptr"] is not None})
@triton.jit(do_not_specialize=["t"])
def _gru_bwd_step_kernel(
    grad_h_ptr,  # [B, H] grad_hs[t]
    gates_ptr,  # [B, 4H] gates[t] = (r, z, n, hn)
    h_ptr,  # [B, H] h_{t-1}
    w_ptr,  # [3H, H] W_hh
    len_ptr,  # [B] int64 lengths or None
    dg_next_ptr,  # [B, 3H] fp32 dG_{t+1} (unused when not HAS_NEXT)
    dh_next_ptr,  # [B, H] fp32 direct term into h_t left by step t+1
    dgi_ptr,  # [B, 3H] out: dgi[t] = (dr, dz, dn)
    dg_ptr,  # [B, 3H] out: fp32 dG_t = (dr, dz, dn * r)
    dh_ptr,  # [B, H] out: fp32 direct term into h_{t-1}
    t, B, H,
    HAS_NEXT: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_b, offs_j, mask_b, mask_j = _tile_offsets(B, H, BLOCK_B, BLOCK_H)
    # Total gradient reaching h_t.
    dh = _load_tile(grad_h_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    if HAS_NEXT:
        dh += _load_tile(dh_next_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
        dh += _carry_dot(dg_next_ptr, w_ptr, offs_b, offs_j, mask_b, mask_j, H, 3 * H,
                         BLOCK_B, BLOCK_H, BLOCK_K, PRECISION)
    # Pointwise gate backward of step t.
    r = _load_tile(gates_ptr, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    z = _load_tile(gates_ptr + H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    n = _load_tile(gates_ptr + 2 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    hn = _load_tile(gates_ptr + 3 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    h_prev = _load_tile(h_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    dn_pre = dh * (1.0 - z) * (1.0 - n * n)
    dz_pre = dh * (h_prev - n) * z * (1.0 - z)
    dr_pre = dn_pre * hn * r * (1.0 - r)
    valid = _rows_valid(len_ptr, offs_b, mask_b, t, HAS_LENGTHS)
    dr_pre = tl.where(valid, dr_pre, 0.0)
    dz_pre = tl.where(valid, dz_pre, 0.0)
    dn_pre = tl.where(valid, dn_pre, 0.0)
    _store_tile(dgi_ptr, dr_pre, offs_b, offs_j, 3 * H, mask_b, mask_j)
    _store_tile(dgi_ptr + H, dz_pre, offs_b, offs_j, 3 * H, mask_b, mask_j)
    _store_tile(dgi_ptr + 2 * H, dn_pre, offs_b, offs_j, 3 * H, mask_b, mask_j)
    _store_tile(dg_ptr, dr_pre, offs_b, offs_j, 3 * H, mask_b, mask_j)
    _store_tile(dg_ptr + H, dz_pre, offs_b, offs_j, 3 * H, mask_b, mask_j)
    # Select after the product: a padded step's saved r may be NaN/Inf (padding in
    # gi), and 0 * NaN would carry into step t-1 through the matmul.
    _store_tile(dg_ptr + 2 * H, tl.where(valid, dn_pre * r, 0.0), offs_b, offs_j, 3 * H, mask_b, mask_j)
    # Direct (non-matmul) part of the gradient into h_{t-1}.
    _store_tile(dh_ptr, tl.where(valid, dh * z, dh), offs_b, offs_j, H, mask_b, mask_j)


# --------------------------------------------------------------- LSTM kernels


@triton.heuristics(
    {
        "HAS_BIAS": lambda a: a["b_ptr"] is not None,
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "SAVE_GATES": lambda a: a["gates_ptr"] is not None,
        "STORE_STATE": lambda a: a["hst_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["t"])
def _lstm_fwd_step_kernel(
    gi_ptr,  # [B, 4H] gi[t]
    h_ptr,  # [B, H] h_{t-1}
    c_ptr,  # [B, H] c_{t-1}
    w_ptr,  # [4H, H] W_hh
    b_ptr,  # [4H] b_hh or None
    len_ptr,  # [B] int64 lengths or None
    hs_ptr,  # [B, H] out: hs[t]
    cs_ptr,  # [B, H] out: cs[t]
    hst_ptr,  # [B, H] out: fp32 copy of h_t (half inputs) or None
    cst_ptr,  # [B, H] out: fp32 copy of c_t (used iff hst_ptr is given)
    gates_ptr,  # [B, 4H] out: gates[t] = activated (i, f, g, o) or None
    t, B, H,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    SAVE_GATES: tl.constexpr, STORE_STATE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_b, offs_j, mask_b, mask_j = _tile_offsets(B, H, BLOCK_B, BLOCK_H)
    # Recurrent product h_{t-1} W_hh^T for the four gates of this tile.
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        h = _load_tile(h_ptr, offs_b, offs_k, H, 1, mask_b, mask_k)
        acc_i += tl.dot(h, _w_t_tile(w_ptr, 0, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
        acc_f += tl.dot(h, _w_t_tile(w_ptr, 1, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
        acc_g += tl.dot(h, _w_t_tile(w_ptr, 2, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
        acc_o += tl.dot(h, _w_t_tile(w_ptr, 3, offs_k, offs_j, H, mask_k, mask_j), input_precision=PRECISION)
    if HAS_BIAS:
        acc_i += _load_row(b_ptr, offs_j, mask_j)
        acc_f += _load_row(b_ptr + H, offs_j, mask_j)
        acc_g += _load_row(b_ptr + 2 * H, offs_j, mask_j)
        acc_o += _load_row(b_ptr + 3 * H, offs_j, mask_j)
    # Gates and state update.
    i = tl.sigmoid(acc_i + _load_tile(gi_ptr, offs_b, offs_j, 4 * H, 1, mask_b, mask_j))
    f = tl.sigmoid(acc_f + _load_tile(gi_ptr + H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j))
    g = _tanh(acc_g + _load_tile(gi_ptr + 2 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j))
    o = tl.sigmoid(acc_o + _load_tile(gi_ptr + 3 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j))
    h_prev = _load_tile(h_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    c_prev = _load_tile(c_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    c_new = f * c_prev + i * g
    h_new = o * _tanh(c_new)
    valid = _rows_valid(len_ptr, offs_b, mask_b, t, HAS_LENGTHS)
    h_new = tl.where(valid, h_new, h_prev)
    c_new = tl.where(valid, c_new, c_prev)
    _store_tile(hs_ptr, h_new, offs_b, offs_j, H, mask_b, mask_j)
    _store_tile(cs_ptr, c_new, offs_b, offs_j, H, mask_b, mask_j)
    if STORE_STATE:
        _store_tile(hst_ptr, h_new, offs_b, offs_j, H, mask_b, mask_j)
        _store_tile(cst_ptr, c_new, offs_b, offs_j, H, mask_b, mask_j)
    if SAVE_GATES:
        _store_tile(gates_ptr, i, offs_b, offs_j, 4 * H, mask_b, mask_j)
        _store_tile(gates_ptr + H, f, offs_b, offs_j, 4 * H, mask_b, mask_j)
        _store_tile(gates_ptr + 2 * H, g, offs_b, offs_j, 4 * H, mask_b, mask_j)
        _store_tile(gates_ptr + 3 * H, o, offs_b, offs_j, 4 * H, mask_b, mask_j)


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "HAS_GRAD_C": lambda a: a["grad_c_ptr"] is not None,
        "STORE_DGI": lambda a: a["dgi_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["t"])
def _lstm_bwd_step_kernel(
    grad_h_ptr,  # [B, H] grad_hs[t]
    grad_c_ptr,  # [B, H] grad_cs[t] or None
    gates_ptr,  # [B, 4H] gates[t] = (i, f, g, o)
    c_ptr,  # [B, H] c_t
    c_prev_ptr,  # [B, H] c_{t-1}
    w_ptr,  # [4H, H] W_hh
    len_ptr,  # [B] int64 lengths or None
    dg_next_ptr,  # [B, 4H] fp32 dG_{t+1} (unused when not HAS_NEXT)
    dh_next_ptr,  # [B, H] fp32 direct term into h_t left by step t+1
    dc_next_ptr,  # [B, H] fp32 gradient into c_t left by step t+1
    dgi_ptr,  # [B, 4H] out: dgi[t] in the input dtype, or None (then dgi is dG)
    dg_ptr,  # [B, 4H] out: fp32 dG_t = (di, df, dg, do) pre-activation
    dh_ptr,  # [B, H] out: fp32 direct term into h_{t-1}
    dc_ptr,  # [B, H] out: fp32 gradient into c_{t-1}
    t, B, H,
    HAS_NEXT: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_GRAD_C: tl.constexpr, STORE_DGI: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_b, offs_j, mask_b, mask_j = _tile_offsets(B, H, BLOCK_B, BLOCK_H)
    # Total gradients reaching h_t and c_t.
    dh = _load_tile(grad_h_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    if HAS_GRAD_C:
        dc = _load_tile(grad_c_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    else:
        dc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_NEXT:
        dh += _load_tile(dh_next_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
        dh += _carry_dot(dg_next_ptr, w_ptr, offs_b, offs_j, mask_b, mask_j, H, 4 * H,
                         BLOCK_B, BLOCK_H, BLOCK_K, PRECISION)
        dc += _load_tile(dc_next_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    # Pointwise gate backward of step t.
    i = _load_tile(gates_ptr, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    f = _load_tile(gates_ptr + H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    g = _load_tile(gates_ptr + 2 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    o = _load_tile(gates_ptr + 3 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    c = _load_tile(c_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    c_prev = _load_tile(c_prev_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    tc = _tanh(c)
    dc_tot = dc + dh * o * (1.0 - tc * tc)
    valid = _rows_valid(len_ptr, offs_b, mask_b, t, HAS_LENGTHS)
    d_i = tl.where(valid, dc_tot * g * i * (1.0 - i), 0.0)
    d_f = tl.where(valid, dc_tot * c_prev * f * (1.0 - f), 0.0)
    d_g = tl.where(valid, dc_tot * i * (1.0 - g * g), 0.0)
    d_o = tl.where(valid, dh * tc * o * (1.0 - o), 0.0)
    _store_tile(dg_ptr, d_i, offs_b, offs_j, 4 * H, mask_b, mask_j)
    _store_tile(dg_ptr + H, d_f, offs_b, offs_j, 4 * H, mask_b, mask_j)
    _store_tile(dg_ptr + 2 * H, d_g, offs_b, offs_j, 4 * H, mask_b, mask_j)
    _store_tile(dg_ptr + 3 * H, d_o, offs_b, offs_j, 4 * H, mask_b, mask_j)
    if STORE_DGI:
        _store_tile(dgi_ptr, d_i, offs_b, offs_j, 4 * H, mask_b, mask_j)
        _store_tile(dgi_ptr + H, d_f, offs_b, offs_j, 4 * H, mask_b, mask_j)
        _store_tile(dgi_ptr + 2 * H, d_g, offs_b, offs_j, 4 * H, mask_b, mask_j)
        _store_tile(dgi_ptr + 3 * H, d_o, offs_b, offs_j, 4 * H, mask_b, mask_j)
    # Gradients into step t-1: h only through the matmul (next launch) unless the row
    # did not update; c through the forget gate.
    _store_tile(dh_ptr, tl.where(valid, 0.0, dh), offs_b, offs_j, H, mask_b, mask_j)
    _store_tile(dc_ptr, tl.where(valid, dc_tot * f, dc), offs_b, offs_j, H, mask_b, mask_j)


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
    offs_b, offs_j, mask_b, mask_j = _tile_offsets(B, H, BLOCK_B, BLOCK_H)
    dh = _load_tile(dh_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    dh += _carry_dot(dg_ptr, w_ptr, offs_b, offs_j, mask_b, mask_j, H, GH,
                     BLOCK_B, BLOCK_H, BLOCK_K, PRECISION)
    _store_tile(dh0_ptr, dh, offs_b, offs_j, H, mask_b, mask_j)
    if HAS_C:
        dc = _load_tile(dc_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
        _store_tile(dc0_ptr, dc, offs_b, offs_j, H, mask_b, mask_j)


# ------------------------------------------------------------------ host side


# Every launch is recorded while fastseq.ops.launches.count() is open.
_gru_fwd_step_kernel = counted(_gru_fwd_step_kernel)
_gru_bwd_step_kernel = counted(_gru_bwd_step_kernel)
_lstm_fwd_step_kernel = counted(_lstm_fwd_step_kernel)
_lstm_bwd_step_kernel = counted(_lstm_bwd_step_kernel)
_rnn_bwd_final_kernel = counted(_rnn_bwd_final_kernel)


class _Blocks(NamedTuple):
    BLOCK_B: int
    BLOCK_H: int
    BLOCK_K: int
    num_warps: int


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _pick_blocks(B: int, H: int) -> _Blocks:
    """Tile sizes for a ``[B, H]`` state (the one place they are chosen; no autotuning yet).

    Under the interpreter everything is 16 (the ``tl.dot`` minimum), which keeps the
    numpy emulation small and exercises the multi-tile and masking paths. On a GPU
    the hidden tile shrinks until there are enough programs to fill the machine.
    """
    if _backend.interpreter_on():
        return _Blocks(16, 16, 16, 1)
    block_b = _pow2(B, 16, 32)
    block_h = _pow2(H, 16, 64)
    while block_h > 16 and triton.cdiv(B, block_b) * triton.cdiv(H, block_h) < 128:
        block_h //= 2
    block_k = _pow2(H, 16, 32)
    return _Blocks(block_b, block_h, block_k, 4)


def _launch_args(B: int, H: int, allow_tf32: bool):
    """(grid, constexpr/launch kwargs) shared by every kernel of one call."""
    blk = _pick_blocks(B, H)
    grid = (triton.cdiv(B, blk.BLOCK_B), triton.cdiv(H, blk.BLOCK_H))
    kw = dict(
        BLOCK_B=blk.BLOCK_B,
        BLOCK_H=blk.BLOCK_H,
        BLOCK_K=blk.BLOCK_K,
        PRECISION="tf32" if allow_tf32 else "ieee",
        num_warps=blk.num_warps,
    )
    return grid, kw


# ------------------------------------------------------------------ limits

# What these kernels cannot take (module constants, so tests can lower them).
MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0: 2**31 - 1)
MAX_INDEX = 2**31 - 1  # element offsets inside a kernel are int32


def unsupported_reason(family: str, t: Tensor, sizes) -> Optional[_backend.Unsupported]:
    """None if the recurrence kernels can take ``sizes`` = ``{"T", "B", "H", "G"}``
    (G = 3 for the GRU, 4 for the LSTM), else why not (:class:`fastseq._backend.Unsupported`).

    Limits: the largest tensor a launch indexes -- a step's ``[B, 4H]`` gates or
    ``[B, G*H]`` gradient, or ``W_hh [G*H, H]`` -- must have at most ``MAX_INDEX``
    elements (int32 offsets), and the ``cdiv(H, BLOCK_H)`` hidden tiles fit grid axis 1.
    """
    B, H, G = sizes["B"], sizes["H"], sizes["G"]
    n = max(B * 4 * H, G * H * H)
    return hidden_tile_limits(B, H, n, f"B={B}, H={H}: a per-step [B, 4H] tensor or W_hh [{G}*H, H] "
                                       f"has {n} elements", MAX_INDEX, MAX_GRID_YZ)


def hidden_tile_limits(B: int, H: int, n: int, what: str, max_index: int,
                       max_grid: int) -> Optional[_backend.Unsupported]:
    """The limits of kernels tiled over ``[B, H]`` (these and :mod:`.cell`'s): the
    largest tensor a launch indexes (``n`` elements, described by ``what``) within
    int32 offsets, and the ``cdiv(H, BLOCK_H)`` hidden tiles within grid axis 1."""
    if n > max_index:
        return _backend.Unsupported(
            "int32-index", f"{what}, past the Triton kernels' int32 offsets (at most {max_index})"
        )
    tiles = triton.cdiv(H, _pick_blocks(B, H).BLOCK_H)
    if tiles > max_grid:
        return _backend.Unsupported(
            "grid", f"H={H}: {tiles} hidden tiles on grid axis 1, past the limit {max_grid}"
        )
    return None


def _prep_lengths(lengths: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    if lengths is None:
        return None
    return lengths.to(device=like.device, dtype=torch.int64).contiguous()


def _contig(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.contiguous()


def _weight_grads(
    dg: Tensor, h0: Tensor, hs: Tensor, w_hh: Tensor, has_bias: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """dW_hh = dG^T [h0; hs[:-1]] and db_hh = sum dG, as one fp32 product over all steps."""
    T, B, GH = dg.shape
    H = hs.shape[2]
    h_prev = torch.cat([h0.unsqueeze(0).float(), hs[:-1].float()], dim=0)
    dw = dg.reshape(T * B, GH).t() @ h_prev.reshape(T * B, H)
    db = dg.sum(dim=(0, 1)) if has_bias else None
    return dw.to(w_hh.dtype), (db.to(w_hh.dtype) if db is not None else None)


def _empty_backward(T, B, H, G, h0, w_hh, hs, has_bias, n_state):
    """Backward for a zero-sized problem (no kernel launches)."""
    dgi = torch.zeros((T, B, G * H), device=hs.device, dtype=hs.dtype)
    states = [torch.zeros_like(h0) for _ in range(n_state)]
    dw = torch.zeros_like(w_hh)
    db = torch.zeros((w_hh.shape[0],), device=w_hh.device, dtype=w_hh.dtype) if has_bias else None
    return (dgi, *states, dw, db)


def gru_recurrence_forward(
    gi: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    lengths: Optional[Tensor],
    save_gates: bool,
    allow_tf32: bool = False,
) -> Tuple[Tensor, Tensor]:
    """GRU recurrence (one fused launch per step).

    Args:
        gi: ``[T, B, 3H]`` input projection (r, z, n); h0: ``[B, H]``;
        w_hh: ``[3H, H]``; b_hh: ``[3H]`` or None; lengths: int ``[B]`` or None.
        save_gates: also return what the backward needs.
        allow_tf32: let ``tl.dot`` use TF32 for float32 operands.

    Returns:
        hs ``[T, B, H]``; gates ``[T, B, 4H]`` = (r, z, n, hn) or an empty ``[0]``.
    """
    T, B, _ = gi.shape
    H = h0.shape[1]
    hs = _backend.empty((T, B, H), gi)
    gates = _backend.empty((T, B, 4 * H) if save_gates else (0,), gi)
    if T == 0 or B == 0 or H == 0:
        return hs, gates
    gi, h0, w, b = gi.contiguous(), h0.contiguous(), w_hh.contiguous(), _contig(b_hh)
    lens = _prep_lengths(lengths, gi)
    grid, kw = _launch_args(B, H, allow_tf32)
    # Half inputs: carry the state in fp32 (ping-pong, never read and written by one launch).
    state = None if gi.dtype == torch.float32 else _backend.empty((2, B, H), gi, torch.float32)
    for t in range(T):
        if t == 0:
            h_prev = h0
        else:
            h_prev = hs[t - 1] if state is None else state[(t - 1) % 2]
        _gru_fwd_step_kernel[grid](
            gi[t], h_prev, w, b, lens,
            hs[t], None if state is None else state[t % 2],
            gates[t] if save_gates else None,
            t, B, H, **kw,
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
    allow_tf32: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Backward of :func:`gru_recurrence_forward` (one fused launch per step, t = T-1 .. 0).

    Args:
        grad_hs: ``[T, B, H]`` gradient w.r.t. ``hs`` (includes that of h_n);
        h0 ``[B, H]``, w_hh ``[3H, H]``, hs ``[T, B, H]``, gates ``[T, B, 4H]`` as
        saved by the forward; lengths int ``[B]`` or None.

    Returns:
        dgi ``[T, B, 3H]``, dh0 ``[B, H]``, dw_hh ``[3H, H]``, db_hh ``[3H]`` or None.
    """
    T, B, H = hs.shape
    if T == 0 or B == 0 or H == 0:
        return _empty_backward(T, B, H, 3, h0, w_hh, hs, has_bias, 1)
    if gates.dim() != 3:
        raise ValueError("gru_recurrence_backward needs the gates saved by gru_recurrence_forward(save_gates=True)")
    grad_hs, h0, w, hs, gates = (x.contiguous() for x in (grad_hs, h0, w_hh, hs, gates))
    lens = _prep_lengths(lengths, hs)
    grid, kw = _launch_args(B, H, allow_tf32)
    dgi = _backend.empty((T, B, 3 * H), hs)
    dg = _backend.empty((T, B, 3 * H), hs, torch.float32)
    dh_buf = _backend.empty((2, B, H), hs, torch.float32)
    for t in range(T - 1, -1, -1):
        nxt = min(t + 1, T - 1)  # any valid slice when there is no step t+1
        _gru_bwd_step_kernel[grid](
            grad_hs[t], gates[t], h0 if t == 0 else hs[t - 1], w, lens,
            dg[nxt], dh_buf[(t + 1) % 2],
            dgi[t], dg[t], dh_buf[t % 2],
            t, B, H, HAS_NEXT=t < T - 1, **kw,
        )
    dh0 = _backend.empty((B, H), h0)
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
    allow_tf32: bool = False,
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
    hs = _backend.empty((T, B, H), gi)
    cs = _backend.empty((T, B, H), gi)
    gates = _backend.empty((T, B, 4 * H) if save_gates else (0,), gi)
    if T == 0 or B == 0 or H == 0:
        return hs, cs, gates
    gi, h0, c0, w, b = gi.contiguous(), h0.contiguous(), c0.contiguous(), w_hh.contiguous(), _contig(b_hh)
    lens = _prep_lengths(lengths, gi)
    grid, kw = _launch_args(B, H, allow_tf32)
    half = gi.dtype != torch.float32
    hst = _backend.empty((2, B, H), gi, torch.float32) if half else None
    cst = _backend.empty((2, B, H), gi, torch.float32) if half else None
    for t in range(T):
        if t == 0:
            h_prev, c_prev = h0, c0
        elif half:
            h_prev, c_prev = hst[(t - 1) % 2], cst[(t - 1) % 2]
        else:
            h_prev, c_prev = hs[t - 1], cs[t - 1]
        _lstm_fwd_step_kernel[grid](
            gi[t], h_prev, c_prev, w, b, lens,
            hs[t], cs[t],
            hst[t % 2] if half else None, cst[t % 2] if half else None,
            gates[t] if save_gates else None,
            t, B, H, **kw,
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
    allow_tf32: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Backward of :func:`lstm_recurrence_forward` (one fused launch per step, t = T-1 .. 0).

    Args:
        grad_hs, grad_cs: ``[T, B, H]`` gradients w.r.t. ``hs`` and ``cs``
        (``grad_cs`` may be None: zeros); the rest as saved by the forward.

    Returns:
        dgi ``[T, B, 4H]``, dh0 ``[B, H]``, dc0 ``[B, H]``, dw_hh ``[4H, H]``,
        db_hh ``[4H]`` or None.
    """
    T, B, H = hs.shape
    if T == 0 or B == 0 or H == 0:
        return _empty_backward(T, B, H, 4, h0, w_hh, hs, has_bias, 2)
    if gates.dim() != 3:
        raise ValueError("lstm_recurrence_backward needs the gates saved by lstm_recurrence_forward(save_gates=True)")
    grad_hs, h0, c0, w, cs, gates = (x.contiguous() for x in (grad_hs, h0, c0, w_hh, cs, gates))
    hs, grad_cs = hs.contiguous(), _contig(grad_cs)
    lens = _prep_lengths(lengths, hs)
    grid, kw = _launch_args(B, H, allow_tf32)
    dg = _backend.empty((T, B, 4 * H), hs, torch.float32)
    # float32: dgi is dG itself; otherwise a separate copy in the input dtype.
    dgi = dg if hs.dtype == torch.float32 else _backend.empty((T, B, 4 * H), hs)
    dh_buf = _backend.empty((2, B, H), hs, torch.float32)
    dc_buf = _backend.empty((2, B, H), hs, torch.float32)
    for t in range(T - 1, -1, -1):
        nxt = min(t + 1, T - 1)
        _lstm_bwd_step_kernel[grid](
            grad_hs[t], None if grad_cs is None else grad_cs[t],
            gates[t], cs[t], c0 if t == 0 else cs[t - 1], w, lens,
            dg[nxt], dh_buf[(t + 1) % 2], dc_buf[(t + 1) % 2],
            None if dgi is dg else dgi[t], dg[t], dh_buf[t % 2], dc_buf[t % 2],
            t, B, H, HAS_NEXT=t < T - 1, **kw,
        )
    dh0 = _backend.empty((B, H), h0)
    dc0 = _backend.empty((B, H), c0)
    _rnn_bwd_final_kernel[grid](dg[0], w, dh_buf[0], dc_buf[0], dh0, dc0, B, H, 4 * H, **kw)
    dw, db = _weight_grads(dg, h0, hs, w_hh, has_bias)
    return dgi, dh0, dc0, dw, db
