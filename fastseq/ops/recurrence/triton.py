"""Fused Triton kernels for the GRU and LSTM recurrences.

Same signatures, semantics and output layouts as :mod:`.naive`
(time-major ``[T, B, ...]``, gate order r,z,n / i,f,g,o, ``lengths`` masking,
saved ``gates`` layout). The input projection ``gi = x W_ih^T + b_ih`` is
computed outside, for all steps at once; these kernels only run the recurrence.

Kernel design
-------------
Forward: one launch per time step, the host loops over ``t``; the loop is bound
once (:func:`fastseq.ops.triton_utils.launch_steps`): the first step goes through
Triton's launch path, the others call the compiled kernel's launcher with the
same arguments except the step index ``s`` (no per-step slicing, heuristics or
binder: ~2 us of host time per step instead of 20-30, bench/NOTES.md v0.7). So
every argument is the same at every step: the kernels take whole ``[N, ...]``
tensors (dense: ``N = T*B``, row ``t*B + b``) and find step ``s``'s rows
themselves (:func:`_step`: from ``s`` for dense input, from a step table for
packed input). The grid is ``(cdiv(B, BLOCK_B), cdiv(H, BLOCK_H))``; each
program owns a ``[BLOCK_B, BLOCK_H]`` tile of (batch rows, hidden units) ``j`` and

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

The running state is carried in an fp32 ping-pong buffer ``[2, B, H]`` (step
``s`` reads slot ``(s+1) % 2`` and writes slot ``s % 2``; both start as h0), so
no launch reads what it writes and half-precision inputs do not round the state
at every step (the reference works the same way); ``hs``/``cs`` are written in
the input dtype. The product's operand ``h_{t-1}`` is read from ``hs`` (the
previous step's rows, or h0): for half inputs that is exactly the fp32 state
rounded to the input dtype, which the tensor-core product needs anyway, at half
the bytes of reading the fp32 state once per hidden tile.

Backward: one launch per step, ``t = T-1 .. 0``, same grid, bound the same way.
Notation: ``dG_t`` ``[B, G*H]`` (fp32, kept for all steps) is the pre-activation
gradient on the hidden side of step ``t`` (GRU: ``(dr, dz, dn * r)``, LSTM:
``(di, df, dg, do)``), zero for rows that do not update at ``t``. The program
for step ``t`` and tile ``(b, j)``

1. forms the gradient reaching ``h_t``: ``grad_hs[t] + dG_{t+1}[b, :] @ W_hh[:, j]``
   (``tl.dot`` over ``G*H``; ``dG_{t+1}`` was fully written by the previous
   launch) ``+`` the direct term left by step ``t+1`` for this tile (GRU:
   ``dh_{t+1} z_{t+1}``; LSTM: 0; for a row that did not update at ``t+1``, the
   whole ``dh_{t+1}`` passes through; likewise ``dc``), in a per-row ``[B, H]``
   carry buffer that each launch reads and rewrites for its own tiles only;
2. applies the pointwise gate backward of step ``t`` and writes ``dgi[t]``,
   ``dG_t`` and the direct terms for step ``t-1``.

A last launch (shared by the GRU and LSTM) turns step 0's terms into ``dh0``
(and ``dc0``). No atomics. After the loop, the weight gradients are formed as
single matrix products over all steps (torch, fp32)::

    dW_hh = dG.reshape(T*B, G*H)^T @ [h0; hs[:-1]].reshape(T*B, H)
    db_hh = dG.sum((0, 1))

Packed layout (``*_packed_recurrence_*``, :mod:`.naive`'s "packed layout"): the
same step kernels with ``PACKED``: an int64 step table on the device gives each
step's row offset and row count, the previous step's (rows ``b >= n_prev`` start
there from h0: the reverse direction) and the next step's (the backward's carry
goes only to the ``n_next`` rows the next step reads from this one). The grid
covers the largest step; programs past a step's rows return at once. dW_hh is
one product over the N packed rows with each row's previous state gathered once.

Precision: states, gates and every accumulation are fp32. The recurrent products
run on the weights' dtype (:func:`fastseq.ops.triton_utils.dot_acc`): for
half-precision weights the fp32 state (forward) or dG (backward) is rounded to
that dtype for the ``tl.dot`` (tensor cores, fp32 accumulation), as cuDNN's
half-precision recurrences do; float32 uses ``input_precision="ieee"`` unless the
user opted in to TF32 (``torch.backends.cuda.matmul.allow_tf32``). Outputs are in
the input dtype; ``dw_hh``/``db_hh`` in ``w_hh``'s dtype.

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
    contiguous_or_none, dot_acc, hidden_tile_limits, launch_steps, load_row, load_tile, load_tile_native, pick_blocks,
    precision, store_tile, tanh, tile_offsets,
)

__all__ = [
    "gru_recurrence_forward", "gru_recurrence_backward", "lstm_recurrence_forward", "lstm_recurrence_backward",
    "gru_packed_recurrence_forward", "gru_packed_recurrence_backward", "lstm_packed_recurrence_forward",
    "lstm_packed_recurrence_backward", "gru_bidirectional_recurrence_forward", "gru_bidirectional_recurrence_backward",
    "lstm_bidirectional_recurrence_forward", "lstm_bidirectional_recurrence_backward", "limits", "gru_gates",
    "gru_gates_backward", "lstm_gates", "lstm_gates_backward", "w_hh_t_tile",
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
def _step(steps_ptr, d, s, B, S, PACKED: tl.constexpr):
    """Step ``s``'s rows in direction ``d``: ``(off, n, p_off, n_prev, nx_off, n_next)`` --
    its first row and row count in the ``[N, ...]`` tensors, those of the step it reads
    its previous state from (``n_prev`` rows; the others read the initial state) and of
    the step after it in processing order (``n_next`` of whose rows read this step).
    Packed: row ``s`` of direction ``d``'s int64 step table (:meth:`_PackedPlan.rows`);
    dense (one direction): step ``s`` is time ``s``, ``B`` rows each, ``S`` steps."""
    if PACKED:
        row = steps_ptr + (d * S + s) * 6
        off = tl.load(row)
        n = tl.load(row + 1)
        p_off = tl.load(row + 2)
        n_prev = tl.load(row + 3)
        nx_off = tl.load(row + 4)
        n_next = tl.load(row + 5)
    else:
        off = s.to(tl.int64) * B
        n = B
        p_off = off - B
        n_prev = tl.where(s > 0, B, 0)
        nx_off = off + B
        n_next = tl.where(s + 1 < S, B, 0)
    return off, n, p_off, n_prev, nx_off, n_next


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
def _load_prev(ptr, stride, init_ptr, H, offs_b, offs_c, mask_b, mask_c, n_prev):
    """fp32 tile of the previous states (columns ``offs_c``): rows ``b < n_prev`` from
    ``ptr`` (the previous step's rows, ``stride`` apart), the others from ``init_ptr``
    (h0 or c0, ``[B, H]``)."""
    from_prev = offs_b < n_prev
    x = load_tile(ptr, offs_b, offs_c, stride, 1, mask_b & from_prev, mask_c)
    x_init = load_tile(init_ptr, offs_b, offs_c, H, 1, mask_b & (offs_b >= n_prev), mask_c)
    return tl.where(from_prev[:, None], x, x_init)


@triton.jit
def w_hh_t_tile(w_ptr, gate, offs_k, offs_j, H, mask_k, mask_j):
    """``[BLOCK_K, BLOCK_H]`` tile of gate ``gate``'s ``W^T`` in W's dtype: (k, j) -> W[gate*H + j, k]."""
    return load_tile_native(w_ptr + gate * H * H, offs_k, offs_j, 1, H, mask_k, mask_j)


@triton.jit
def _carry_dot(
    dg_ptr, w_ptr, offs_b, offs_j, mask_b, mask_j, H, GH,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dG[b, :] @ W_hh[:, j]`` for the tile: dG ``[B, GH]`` fp32, W_hh ``[GH, H]``; fp32 result."""
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for m0 in range(0, GH, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        mask_m = offs_m < GH
        a = load_tile(dg_ptr, offs_b, offs_m, GH, 1, mask_b, mask_m)
        w = load_tile_native(w_ptr, offs_m, offs_j, H, 1, mask_m, mask_j)
        acc = dot_acc(a, w, acc, PRECISION)
    return acc


# ---------------------------------------------------------------- GRU kernels


@triton.jit(do_not_specialize=["s"])
def _gru_fwd_step_kernel(
    gi_ptr,  # [N, D*3H] input projections of all steps (dense: N = T*B, row t*B + b), row stride stride_x
    state_ptr,  # [D, 2, B, H] fp32 state: step s reads slot (s+1) % 2, writes slot s % 2 (both start as h0)
    h0_ptr,  # [D, B, H] h0: with hs, the product's operand (h_{t-1} in the input dtype)
    w_ptr,  # [D, 3H, H] W_hh
    b_ptr,  # [D, 3H] b_hh or None
    len_ptr,  # [B] int64 lengths or None
    hs_ptr,  # [N, D*H] out: hs, row stride stride_y
    gates_ptr,  # [D, N, 4H] out: (r, z, n, hn) or None
    steps_ptr,  # int64 [D, S, 6] step tables (packed) or None (dense)
    s, B, H, S, N, stride_x, stride_y,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE_GATES: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    d = tl.program_id(2)  # direction (grid axis 2: both directions of a bidirectional layer at once)
    off, n, p_off, n_prev, _, _ = _step(steps_ptr, d, s, B, S, PACKED)
    if tl.program_id(0) * BLOCK_B >= n:  # a packed step with fewer rows than the grid covers
        return
    offs_b, offs_j, mask_b, mask_j = tile_offsets(n, H, BLOCK_B, BLOCK_H)
    state_ptr += d * 2 * B * H
    h_ptr = state_ptr + ((s + 1) % 2) * B * H
    w_ptr += d * 3 * H * H
    gi_ptr += off * stride_x + d * 3 * H
    # The tile's inputs that do not depend on the product, loaded ahead of it: their round trip
    # overlaps the product's instead of following it (bench/NOTES.md v0.17).
    x_r = load_tile(gi_ptr, offs_b, offs_j, stride_x, 1, mask_b, mask_j)
    x_z = load_tile(gi_ptr + H, offs_b, offs_j, stride_x, 1, mask_b, mask_j)
    x_n = load_tile(gi_ptr + 2 * H, offs_b, offs_j, stride_x, 1, mask_b, mask_j)
    h_prev = load_tile(h_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    valid = _rows_valid(len_ptr, offs_b, mask_b, s, HAS_LENGTHS)
    if HAS_BIAS:
        b_ptr += d * 3 * H
        b_r = load_row(b_ptr, offs_j, mask_j)
        b_z = load_row(b_ptr + H, offs_j, mask_j)
        b_n = load_row(b_ptr + 2 * H, offs_j, mask_j)
    # Recurrent product h_{t-1} W_hh^T for the three gates of this tile.
    acc_r = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        h = _load_prev(hs_ptr + p_off * stride_y + d * H, stride_y, h0_ptr + d * B * H, H, offs_b, offs_k,
                       mask_b, mask_k, n_prev)
        acc_r = dot_acc(h, w_hh_t_tile(w_ptr, 0, offs_k, offs_j, H, mask_k, mask_j), acc_r, PRECISION)
        acc_z = dot_acc(h, w_hh_t_tile(w_ptr, 1, offs_k, offs_j, H, mask_k, mask_j), acc_z, PRECISION)
        acc_n = dot_acc(h, w_hh_t_tile(w_ptr, 2, offs_k, offs_j, H, mask_k, mask_j), acc_n, PRECISION)
    if HAS_BIAS:
        acc_r += b_r
        acc_z += b_z
        acc_n += b_n
    # Gates and state update.
    r, z, n_gate, h_new = gru_gates(x_r, x_z, x_n, acc_r, acc_z, acc_n, h_prev)
    h_new = tl.where(valid, h_new, h_prev)
    store_tile(hs_ptr + off * stride_y + d * H, h_new, offs_b, offs_j, stride_y, mask_b, mask_j)
    store_tile(state_ptr + (s % 2) * B * H, h_new, offs_b, offs_j, H, mask_b, mask_j)
    if SAVE_GATES:
        g_ptr = gates_ptr + d * N * 4 * H + off * 4 * H
        store_tile(g_ptr, r, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(g_ptr + H, z, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(g_ptr + 2 * H, n_gate, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(g_ptr + 3 * H, acc_n, offs_b, offs_j, 4 * H, mask_b, mask_j)


@triton.jit(do_not_specialize=["s", "S"])
def _gru_bwd_step_kernel(
    grad_h_ptr,  # [N, D*H] grad_hs, row stride stride_y
    gates_ptr,  # [D, N, 4H] (r, z, n, hn) saved by the forward
    hs_ptr,  # [N, D*H] the forward's hs (previous states), row stride stride_y
    h0_ptr,  # [D, B, H] h0
    w_ptr,  # [D, 3H, H] W_hh
    len_ptr,  # [B] int64 lengths or None
    dg_ptr,  # [D, N, 3H] fp32 dG: reads the next step's rows, writes this step's = (dr, dz, dn * r)
    dh_ptr,  # [D, B, H] fp32 direct term into each row's previous state (read and rewritten in place)
    dgi_ptr,  # [N, D*3H] out: dgi = (dr, dz, dn), row stride stride_x
    steps_ptr,  # int64 [D, S, 6] step tables (packed) or None (dense)
    s, B, H, S, N, stride_x, stride_y,
    HAS_LENGTHS: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    d = tl.program_id(2)  # direction
    off, n, p_off, n_prev, nx_off, n_next = _step(steps_ptr, d, s, B, S, PACKED)
    if tl.program_id(0) * BLOCK_B >= n:
        return
    offs_b, offs_j, mask_b, mask_j = tile_offsets(n, H, BLOCK_B, BLOCK_H)
    w_ptr += d * 3 * H * H
    dg_ptr += d * N * 3 * H
    dh_ptr += d * B * H
    # Total gradient reaching h_t: only rows b < n_next have a next step (reading this one).
    carry_b = mask_b & (offs_b < n_next)
    dh = load_tile(grad_h_ptr + off * stride_y + d * H, offs_b, offs_j, stride_y, 1, mask_b, mask_j)
    dh += load_tile(dh_ptr, offs_b, offs_j, H, 1, carry_b, mask_j)
    # The saved gates, h_{t-1} and the lengths, loaded ahead of the product (bench/NOTES.md v0.17).
    g_ptr = gates_ptr + d * N * 4 * H + off * 4 * H
    r = load_tile(g_ptr, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    z = load_tile(g_ptr + H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    n_gate = load_tile(g_ptr + 2 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    hn = load_tile(g_ptr + 3 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    h_prev = _load_prev(hs_ptr + p_off * stride_y + d * H, stride_y, h0_ptr + d * B * H, H, offs_b, offs_j,
                        mask_b, mask_j, n_prev)
    valid = _rows_valid(len_ptr, offs_b, mask_b, s, HAS_LENGTHS)
    if n_next > 0:
        dh += _carry_dot(dg_ptr + nx_off * 3 * H, w_ptr, offs_b, offs_j, carry_b, mask_j, H, 3 * H,
                         BLOCK_B, BLOCK_H, BLOCK_K, PRECISION)
    # Pointwise gate backward of step t.
    dr_pre, dz_pre, dn_pre, dh_direct = gru_gates_backward(dh, r, z, n_gate, hn, h_prev)
    dr_pre = tl.where(valid, dr_pre, 0.0)
    dz_pre = tl.where(valid, dz_pre, 0.0)
    dn_pre = tl.where(valid, dn_pre, 0.0)
    dgi_ptr += off * stride_x + d * 3 * H
    store_tile(dgi_ptr, dr_pre, offs_b, offs_j, stride_x, mask_b, mask_j)
    store_tile(dgi_ptr + H, dz_pre, offs_b, offs_j, stride_x, mask_b, mask_j)
    store_tile(dgi_ptr + 2 * H, dn_pre, offs_b, offs_j, stride_x, mask_b, mask_j)
    dg_ptr += off * 3 * H
    store_tile(dg_ptr, dr_pre, offs_b, offs_j, 3 * H, mask_b, mask_j)
    store_tile(dg_ptr + H, dz_pre, offs_b, offs_j, 3 * H, mask_b, mask_j)
    # Select after the product: a padded step's saved r may be NaN/Inf (padding in
    # gi), and 0 * NaN would carry into step t-1 through the matmul.
    store_tile(dg_ptr + 2 * H, tl.where(valid, dn_pre * r, 0.0), offs_b, offs_j, 3 * H, mask_b, mask_j)
    # Direct (non-matmul) part of the gradient into h_{t-1} (tile-local: in place).
    store_tile(dh_ptr, tl.where(valid, dh_direct, dh), offs_b, offs_j, H, mask_b, mask_j)


# --------------------------------------------------------------- LSTM kernels


@triton.jit(do_not_specialize=["s"])
def _lstm_fwd_step_kernel(
    gi_ptr,  # [N, D*4H] input projections of all steps, row stride stride_x
    state_ptr,  # [D, 2, B, H] fp32 h state (ping-pong as the GRU's; both slots start as h0)
    cstate_ptr,  # [D, 2, B, H] fp32 c state (likewise, c0)
    h0_ptr,  # [D, B, H] h0: with hs, the product's operand (h_{t-1} in the input dtype)
    w_ptr,  # [D, 4H, H] W_hh
    b_ptr,  # [D, 4H] b_hh or None
    len_ptr,  # [B] int64 lengths or None
    hs_ptr,  # [N, D*H] out: hs, row stride stride_y
    cs_ptr,  # [N, D*H] out: cs, row stride stride_y
    gates_ptr,  # [D, N, 4H] out: activated (i, f, g, o) or None
    steps_ptr,  # int64 [D, S, 6] step tables (packed) or None (dense)
    s, B, H, S, N, stride_x, stride_y,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE_GATES: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    d = tl.program_id(2)  # direction
    off, n, p_off, n_prev, _, _ = _step(steps_ptr, d, s, B, S, PACKED)
    if tl.program_id(0) * BLOCK_B >= n:
        return
    offs_b, offs_j, mask_b, mask_j = tile_offsets(n, H, BLOCK_B, BLOCK_H)
    state_ptr += d * 2 * B * H
    cstate_ptr += d * 2 * B * H
    h_ptr = state_ptr + ((s + 1) % 2) * B * H
    w_ptr += d * 4 * H * H
    gi_ptr += off * stride_x + d * 4 * H
    # The tile's inputs that do not depend on the product, loaded ahead of it (as the GRU's).
    x_i = load_tile(gi_ptr, offs_b, offs_j, stride_x, 1, mask_b, mask_j)
    x_f = load_tile(gi_ptr + H, offs_b, offs_j, stride_x, 1, mask_b, mask_j)
    x_g = load_tile(gi_ptr + 2 * H, offs_b, offs_j, stride_x, 1, mask_b, mask_j)
    x_o = load_tile(gi_ptr + 3 * H, offs_b, offs_j, stride_x, 1, mask_b, mask_j)
    h_prev = load_tile(h_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    c_prev = load_tile(cstate_ptr + ((s + 1) % 2) * B * H, offs_b, offs_j, H, 1, mask_b, mask_j)
    valid = _rows_valid(len_ptr, offs_b, mask_b, s, HAS_LENGTHS)
    if HAS_BIAS:
        b_ptr += d * 4 * H
        b_i = load_row(b_ptr, offs_j, mask_j)
        b_f = load_row(b_ptr + H, offs_j, mask_j)
        b_g = load_row(b_ptr + 2 * H, offs_j, mask_j)
        b_o = load_row(b_ptr + 3 * H, offs_j, mask_j)
    # Recurrent product h_{t-1} W_hh^T for the four gates of this tile.
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        h = _load_prev(hs_ptr + p_off * stride_y + d * H, stride_y, h0_ptr + d * B * H, H, offs_b, offs_k,
                       mask_b, mask_k, n_prev)
        acc_i = dot_acc(h, w_hh_t_tile(w_ptr, 0, offs_k, offs_j, H, mask_k, mask_j), acc_i, PRECISION)
        acc_f = dot_acc(h, w_hh_t_tile(w_ptr, 1, offs_k, offs_j, H, mask_k, mask_j), acc_f, PRECISION)
        acc_g = dot_acc(h, w_hh_t_tile(w_ptr, 2, offs_k, offs_j, H, mask_k, mask_j), acc_g, PRECISION)
        acc_o = dot_acc(h, w_hh_t_tile(w_ptr, 3, offs_k, offs_j, H, mask_k, mask_j), acc_o, PRECISION)
    if HAS_BIAS:
        acc_i += b_i
        acc_f += b_f
        acc_g += b_g
        acc_o += b_o
    # Gates and state update.
    i, f, g, o, c_new, h_new = lstm_gates(acc_i + x_i, acc_f + x_f, acc_g + x_g, acc_o + x_o, c_prev)
    h_new = tl.where(valid, h_new, h_prev)
    c_new = tl.where(valid, c_new, c_prev)
    store_tile(hs_ptr + off * stride_y + d * H, h_new, offs_b, offs_j, stride_y, mask_b, mask_j)
    store_tile(cs_ptr + off * stride_y + d * H, c_new, offs_b, offs_j, stride_y, mask_b, mask_j)
    store_tile(state_ptr + (s % 2) * B * H, h_new, offs_b, offs_j, H, mask_b, mask_j)
    store_tile(cstate_ptr + (s % 2) * B * H, c_new, offs_b, offs_j, H, mask_b, mask_j)
    if SAVE_GATES:
        g_ptr = gates_ptr + d * N * 4 * H + off * 4 * H
        store_tile(g_ptr, i, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(g_ptr + H, f, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(g_ptr + 2 * H, g, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(g_ptr + 3 * H, o, offs_b, offs_j, 4 * H, mask_b, mask_j)


@triton.jit(do_not_specialize=["s", "S"])
def _lstm_bwd_step_kernel(
    grad_h_ptr,  # [N, D*H] grad_hs, row stride stride_y
    grad_c_ptr,  # [N, D*H] grad_cs or None, row stride stride_y
    gates_ptr,  # [D, N, 4H] (i, f, g, o) saved by the forward
    cs_ptr,  # [N, D*H] the forward's cs, row stride stride_y
    c0_ptr,  # [D, B, H] c0
    w_ptr,  # [D, 4H, H] W_hh
    len_ptr,  # [B] int64 lengths or None
    dg_ptr,  # [D, N, 4H] fp32 dG: reads the next step's rows, writes this step's = (di, df, dg, do)
    dh_ptr,  # [D, B, H] fp32 direct term into each row's previous h (in place)
    dc_ptr,  # [D, B, H] fp32 gradient into each row's previous c (in place)
    dgi_ptr,  # [N, D*4H] out: dgi in the input dtype (row stride stride_x), or None (then dgi is dG)
    steps_ptr,  # int64 [D, S, 6] step tables (packed) or None (dense)
    s, B, H, S, N, stride_x, stride_y,
    HAS_LENGTHS: tl.constexpr, HAS_GRAD_C: tl.constexpr, STORE_DGI: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    d = tl.program_id(2)  # direction
    off, n, p_off, n_prev, nx_off, n_next = _step(steps_ptr, d, s, B, S, PACKED)
    if tl.program_id(0) * BLOCK_B >= n:
        return
    offs_b, offs_j, mask_b, mask_j = tile_offsets(n, H, BLOCK_B, BLOCK_H)
    w_ptr += d * 4 * H * H
    dg_ptr += d * N * 4 * H
    dh_ptr += d * B * H
    dc_ptr += d * B * H
    # Total gradients reaching h_t and c_t.
    carry_b = mask_b & (offs_b < n_next)
    dh = load_tile(grad_h_ptr + off * stride_y + d * H, offs_b, offs_j, stride_y, 1, mask_b, mask_j)
    if HAS_GRAD_C:
        dc = load_tile(grad_c_ptr + off * stride_y + d * H, offs_b, offs_j, stride_y, 1, mask_b, mask_j)
    else:
        dc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    dh += load_tile(dh_ptr, offs_b, offs_j, H, 1, carry_b, mask_j)
    dc += load_tile(dc_ptr, offs_b, offs_j, H, 1, carry_b, mask_j)
    # The saved gates, c_t, c_{t-1} and the lengths, loaded ahead of the product (as the GRU's).
    g_ptr = gates_ptr + d * N * 4 * H + off * 4 * H
    i = load_tile(g_ptr, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    f = load_tile(g_ptr + H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    g = load_tile(g_ptr + 2 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    o = load_tile(g_ptr + 3 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    c = load_tile(cs_ptr + off * stride_y + d * H, offs_b, offs_j, stride_y, 1, mask_b, mask_j)
    c_prev = _load_prev(cs_ptr + p_off * stride_y + d * H, stride_y, c0_ptr + d * B * H, H, offs_b, offs_j,
                        mask_b, mask_j, n_prev)
    valid = _rows_valid(len_ptr, offs_b, mask_b, s, HAS_LENGTHS)
    if n_next > 0:
        dh += _carry_dot(dg_ptr + nx_off * 4 * H, w_ptr, offs_b, offs_j, carry_b, mask_j, H, 4 * H,
                         BLOCK_B, BLOCK_H, BLOCK_K, PRECISION)
    # Pointwise gate backward of step t.
    d_i, d_f, d_g, d_o, dc_prev = lstm_gates_backward(dh, dc, i, f, g, o, c, c_prev)
    d_i = tl.where(valid, d_i, 0.0)
    d_f = tl.where(valid, d_f, 0.0)
    d_g = tl.where(valid, d_g, 0.0)
    d_o = tl.where(valid, d_o, 0.0)
    dg_ptr += off * 4 * H
    store_tile(dg_ptr, d_i, offs_b, offs_j, 4 * H, mask_b, mask_j)
    store_tile(dg_ptr + H, d_f, offs_b, offs_j, 4 * H, mask_b, mask_j)
    store_tile(dg_ptr + 2 * H, d_g, offs_b, offs_j, 4 * H, mask_b, mask_j)
    store_tile(dg_ptr + 3 * H, d_o, offs_b, offs_j, 4 * H, mask_b, mask_j)
    if STORE_DGI:
        dgi_ptr += off * stride_x + d * 4 * H
        store_tile(dgi_ptr, d_i, offs_b, offs_j, stride_x, mask_b, mask_j)
        store_tile(dgi_ptr + H, d_f, offs_b, offs_j, stride_x, mask_b, mask_j)
        store_tile(dgi_ptr + 2 * H, d_g, offs_b, offs_j, stride_x, mask_b, mask_j)
        store_tile(dgi_ptr + 3 * H, d_o, offs_b, offs_j, stride_x, mask_b, mask_j)
    # Gradients into step t-1: h only through the matmul (next launch) unless the row
    # did not update; c through the forget gate. Tile-local: in place.
    store_tile(dh_ptr, tl.where(valid, 0.0, dh), offs_b, offs_j, H, mask_b, mask_j)
    store_tile(dc_ptr, tl.where(valid, dc_prev, dc), offs_b, offs_j, H, mask_b, mask_j)


# ------------------------------------------------------------- shared final


@triton.jit
def _rnn_bwd_final_kernel(
    dg_ptr,  # [B, GH] fp32 dG of the (step, row) that read h0[b]
    w_ptr,  # [GH, H] W_hh
    dh_ptr,  # [B, H] fp32 direct term into h0 left by the first step
    dc_ptr,  # [B, H] fp32 gradient into c0 left by the first step, or None (GRU)
    dh0_ptr,  # [B, H] out
    dc0_ptr,  # [B, H] out (LSTM) or None
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
    grid = (-(-B // blk.BLOCK_B), -(-H // blk.BLOCK_H))
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
    ``{"N", "B", "H", "G", "T"}``.

    Limits: the kernels index a step's rows from the start of ``[N, 4H]`` with
    64-bit row offsets and 32-bit offsets within a step, so a step's ``[B, 4H]``
    and ``W_hh [G*H, H]`` must be within int32 offsets; and the ``cdiv(H, BLOCK_H)``
    hidden tiles within grid axis 1 (:func:`fastseq.ops.triton_utils.hidden_tile_limits`).
    """
    B, H, G = sizes["B"], sizes["H"], sizes["G"]
    n = max(B * 4 * H, G * H * H)
    return hidden_tile_limits(B, H, n, f"B={B}, H={H}: a per-step [B, 4H] tensor or W_hh [{G}*H, H] "
                                       f"has {n} elements")


def prep_lengths(lengths: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    if lengths is None:
        return None
    return lengths.to(device=like.device, dtype=torch.int64).contiguous()


def _initial_state(x: Tensor) -> Tensor:
    """fp32 ping-pong state buffer ``[2, B, H]`` (``[D, 2, B, H]`` for ``x [D, B, H]``) with
    ``x`` in both slots (the forward kernels read slot ``(s+1) % 2`` at step ``s``; rows
    that start later, on the packed reverse direction, find their initial state in
    either slot)."""
    x = x.float().unsqueeze(-3)
    return x.expand(*x.shape[:-3], 2, *x.shape[-2:]).contiguous()


def _weight_grads_rows(dg: Tensor, h_prev: Tensor, w_hh: Tensor, has_bias: bool) -> Tuple[Tensor, Tensor]:
    """dW_hh = dG^T h_prev and db_hh = sum dG (``[0]`` without a bias), as one fp32
    product over all (step, row) pairs: dG ``[M, G*H]`` fp32, h_prev ``[M, H]`` fp32
    each pair's previous state."""
    dw = dg.t() @ h_prev
    db = dg.sum(dim=0).to(w_hh.dtype) if has_bias else w_hh.new_empty((0,))
    return dw.to(w_hh.dtype), db


def weight_grads(dg: Tensor, h0: Tensor, hs: Tensor, w_hh: Tensor, has_bias: bool) -> Tuple[Tensor, Tensor]:
    """:func:`_weight_grads_rows` of a time-major recurrence: dG ``[T, B, G*H]``, h_prev = [h0; hs[:-1]]."""
    T, B, GH = dg.shape
    H = hs.shape[2]
    h_prev = torch.cat([h0.unsqueeze(0).float(), hs[:-1].float()], dim=0)
    return _weight_grads_rows(dg.reshape(T * B, GH), h_prev.reshape(T * B, H), w_hh, has_bias)


def empty_backward(dgi_shape, h0, w_hh, hs, has_bias, n_state):
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
    """GRU recurrence (one fused launch per step, bound once: :func:`launch_steps`).

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
    lens = prep_lengths(lengths, gi)
    grid, kw = _launch_args(B, H)
    launch_steps(
        _gru_fwd_step_kernel, grid, range(T),
        [gi, _initial_state(h0), h0, w, b, lens, hs, gates if save_gates else None, None,
         0, B, H, T, T * B, 3 * H, H],
        HAS_BIAS=b is not None, HAS_LENGTHS=lens is not None, SAVE_GATES=save_gates, PACKED=False, **kw,
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
        return empty_backward((T, B, 3 * H), h0, w_hh, hs, has_bias, 1)
    if gates.dim() != 3:
        raise ValueError("gru_recurrence_backward needs the gates saved by gru_recurrence_forward(save_gates=True)")
    grad_hs, h0, w, hs, gates = (x.contiguous() for x in (grad_hs, h0, w_hh, hs, gates))
    lens = prep_lengths(lengths, hs)
    grid, kw = _launch_args(B, H)
    dgi = alloc.empty((T, B, 3 * H), hs)
    dg = alloc.empty((T, B, 3 * H), hs, torch.float32)
    dh_buf = alloc.empty((B, H), hs, torch.float32)
    launch_steps(
        _gru_bwd_step_kernel, grid, range(T - 1, -1, -1),
        [grad_hs, gates, hs, h0, w, lens, dg, dh_buf, dgi, None, 0, B, H, T, T * B, 3 * H, H],
        HAS_LENGTHS=lens is not None, PACKED=False, **kw,
    )
    dh0 = alloc.empty((B, H), h0)
    _rnn_bwd_final_kernel[grid](dg[0], w, dh_buf, None, dh0, None, B, H, 3 * H, HAS_C=False, **kw)
    dw, db = weight_grads(dg, h0, hs, w_hh, has_bias)
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
    """LSTM recurrence (one fused launch per step, bound once: :func:`launch_steps`).

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
    gi, h0, w, b = gi.contiguous(), h0.contiguous(), w_hh.contiguous(), contiguous_or_none(b_hh)
    lens = prep_lengths(lengths, gi)
    grid, kw = _launch_args(B, H)
    launch_steps(
        _lstm_fwd_step_kernel, grid, range(T),
        [gi, _initial_state(h0), _initial_state(c0), h0, w, b, lens, hs, cs, gates if save_gates else None, None,
         0, B, H, T, T * B, 4 * H, H],
        HAS_BIAS=b is not None, HAS_LENGTHS=lens is not None, SAVE_GATES=save_gates, PACKED=False, **kw,
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
        return empty_backward((T, B, 4 * H), h0, w_hh, hs, has_bias, 2)
    if gates.dim() != 3:
        raise ValueError("lstm_recurrence_backward needs the gates saved by lstm_recurrence_forward(save_gates=True)")
    grad_hs, h0, c0, w, cs, gates = (x.contiguous() for x in (grad_hs, h0, c0, w_hh, cs, gates))
    hs, grad_cs = hs.contiguous(), contiguous_or_none(grad_cs)
    lens = prep_lengths(lengths, hs)
    grid, kw = _launch_args(B, H)
    dg = alloc.empty((T, B, 4 * H), hs, torch.float32)
    # float32: dgi is dG itself; otherwise a separate copy in the input dtype.
    dgi = dg if hs.dtype == torch.float32 else alloc.empty((T, B, 4 * H), hs)
    dh_buf = alloc.empty((B, H), hs, torch.float32)
    dc_buf = alloc.empty((B, H), hs, torch.float32)
    launch_steps(
        _lstm_bwd_step_kernel, grid, range(T - 1, -1, -1),
        [grad_hs, grad_cs, gates, cs, c0, w, lens, dg, dh_buf, dc_buf, None if dgi is dg else dgi, None,
         0, B, H, T, T * B, 4 * H, H],
        HAS_LENGTHS=lens is not None, HAS_GRAD_C=grad_cs is not None, STORE_DGI=dgi is not dg, PACKED=False, **kw,
    )
    dh0 = alloc.empty((B, H), h0)
    dc0 = alloc.empty((B, H), c0)
    _rnn_bwd_final_kernel[grid](dg[0], w, dh_buf, dc_buf, dh0, dc0, B, H, 4 * H, HAS_C=True, **kw)
    dw, db = weight_grads(dg, h0, hs, w_hh, has_bias)
    return dgi, dh0, dc0, dw, db


# ---------------------------------------------------------------- packed layout
#
# The same step kernels on a PackedSequence's layout (naive.py, "packed layout";
# the steps and their previous-state rows from naive.packed_steps), with a step
# table on the device instead of per-step views: launch s covers step s's ``n``
# rows at row offset ``off`` (the grid covers the largest step, programs past
# ``n`` return at once); the forward's rows ``b < n_prev`` continue a sequence of
# the previous step, the others (reverse direction: rows starting there) find
# their initial state in the ping-pong buffer, which no earlier step wrote for
# them. The backward runs the steps in reverse processing order with one
# ``[B, H]`` carry buffer indexed by row: a launch reads and rewrites only its
# own (row, hidden) tiles (tile-local, so in place), and only rows ``b <
# n_next`` (those the next step reads from this one) receive a carry. After the
# loop, each row's carry holds the direct term into its h0 row, and dh0 adds
# ``dG @ W_hh`` of the (step, row) that read h0[b]; dW_hh = dG^T h_prev over all
# N packed rows.


class _PackedPlan:
    """What a packed call needs from ``batch_sizes``, computed once per call.

    ``steps``: :func:`naive.packed_steps` in processing order, ``(offset, rows,
    prev_offset, prev_rows)``; :meth:`table` is the kernels' step table.
    The backward also calls :meth:`gather_rows`.
    """

    def __init__(self, batch_sizes: Tensor, reverse: bool):
        from fastseq.ops.recurrence.naive import packed_steps

        self.steps = list(packed_steps(batch_sizes, reverse))

    def rows(self) -> list:
        """Per step ``(off, n, p_off, n_prev, nx_off, n_next)``, ``nx_*`` of the step after
        it in processing order (``n_next`` = its rows that read this step; 0 for the last)."""
        rows = []
        for s, (off, n, p_off, p_n) in enumerate(self.steps):
            nx_off, _, _, nx_n = self.steps[s + 1] if s + 1 < len(self.steps) else (0, 0, 0, 0)
            rows.append((off, n, p_off, p_n, nx_off, nx_n))
        return rows

    def table(self, device) -> Tensor:
        """The kernels' step table: int64 ``[S, 6]`` on ``device`` (:meth:`rows`)."""
        return torch.tensor(self.rows(), dtype=torch.int64).to(device, non_blocking=True)

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
    plan = _PackedPlan(batch_sizes, reverse)
    S = len(plan.steps)
    launch_steps(
        _gru_fwd_step_kernel, grid, range(S),
        [gi, _initial_state(h0), h0, w, b, None, hs, gates if save_gates else None, plan.table(gi.device),
         0, B, H, S, N, 3 * H, H],
        HAS_BIAS=b is not None, HAS_LENGTHS=False, SAVE_GATES=save_gates, PACKED=True, **kw,
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
        return empty_backward((N, 3 * H), h0, w_hh, hs, has_bias, 1)
    if gates.dim() != 2:
        raise ValueError("gru_packed_recurrence_backward needs the gates saved by "
                         "gru_packed_recurrence_forward(save_gates=True)")
    grad_hs, h0, w, hs, gates = (x.contiguous() for x in (grad_hs, h0, w_hh, hs, gates))
    grid, kw = _launch_args(B, H)
    plan = _PackedPlan(batch_sizes, reverse)
    S = len(plan.steps)
    dgi = alloc.empty((N, 3 * H), hs)
    dg = alloc.empty((N, 3 * H), hs, torch.float32)
    dh_buf = alloc.empty((B, H), hs, torch.float32)  # per row; read and rewritten in place
    launch_steps(
        _gru_bwd_step_kernel, grid, range(S - 1, -1, -1),
        [grad_hs, gates, hs, h0, w, None, dg, dh_buf, dgi, plan.table(hs.device), 0, B, H, S, N, 3 * H, H],
        HAS_LENGTHS=False, PACKED=True, **kw,
    )
    prev_rows, h0_rows = plan.gather_rows(B, hs.device)
    dh0 = alloc.empty((B, H), h0)
    dg_h0 = dg if h0_rows is None else dg[h0_rows]
    _rnn_bwd_final_kernel[grid](dg_h0, w, dh_buf, None, dh0, None, B, H, 3 * H, HAS_C=False, **kw)
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
    gi, h0, w, b = gi.contiguous(), h0.contiguous(), w_hh.contiguous(), contiguous_or_none(b_hh)
    grid, kw = _launch_args(B, H)
    plan = _PackedPlan(batch_sizes, reverse)
    S = len(plan.steps)
    launch_steps(
        _lstm_fwd_step_kernel, grid, range(S),
        [gi, _initial_state(h0), _initial_state(c0), h0, w, b, None, hs, cs, gates if save_gates else None,
         plan.table(gi.device), 0, B, H, S, N, 4 * H, H],
        HAS_BIAS=b is not None, HAS_LENGTHS=False, SAVE_GATES=save_gates, PACKED=True, **kw,
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
        return empty_backward((N, 4 * H), h0, w_hh, hs, has_bias, 2)
    if gates.dim() != 2:
        raise ValueError("lstm_packed_recurrence_backward needs the gates saved by "
                         "lstm_packed_recurrence_forward(save_gates=True)")
    grad_hs, h0, c0, w, cs, gates = (x.contiguous() for x in (grad_hs, h0, c0, w_hh, cs, gates))
    hs, grad_cs = hs.contiguous(), contiguous_or_none(grad_cs)
    grid, kw = _launch_args(B, H)
    plan = _PackedPlan(batch_sizes, reverse)
    S = len(plan.steps)
    dg = alloc.empty((N, 4 * H), hs, torch.float32)
    dgi = dg if hs.dtype == torch.float32 else alloc.empty((N, 4 * H), hs)
    dh_buf = alloc.empty((B, H), hs, torch.float32)  # per row; read and rewritten in place
    dc_buf = alloc.empty((B, H), hs, torch.float32)
    launch_steps(
        _lstm_bwd_step_kernel, grid, range(S - 1, -1, -1),
        [grad_hs, grad_cs, gates, cs, c0, w, None, dg, dh_buf, dc_buf, None if dgi is dg else dgi,
         plan.table(hs.device), 0, B, H, S, N, 4 * H, H],
        HAS_LENGTHS=False, HAS_GRAD_C=grad_cs is not None, STORE_DGI=dgi is not dg, PACKED=True, **kw,
    )
    prev_rows, h0_rows = plan.gather_rows(B, hs.device)
    dh0 = alloc.empty((B, H), h0)
    dc0 = alloc.empty((B, H), c0)
    dg_h0 = dg if h0_rows is None else dg[h0_rows]
    _rnn_bwd_final_kernel[grid](dg_h0, w, dh_buf, dc_buf, dh0, dc0, B, H, 4 * H, HAS_C=True, **kw)
    dw, db = _weight_grads_rows(dg, _packed_prev_states(hs, h0, prev_rows, h0_rows), w_hh, has_bias)
    return dgi, dh0, dc0, dw, db


# ------------------------------------------------------ both directions at once
#
# Both directions of a bidirectional layer on one packed layout, one launch per
# step for both (grid axis 2 = direction; direction 1 runs each row from its last
# step back). The input projections of both directions come from one GEMM, gi
# ``[N, 2*G*H]`` (direction d in columns ``d*G*H ..``), and hs is written straight
# into the layer's output ``[N, 2H]`` (direction d in columns ``d*H ..``): no
# concatenation before or after. Dense input is the packed layout with every row
# T steps long.


def _bidirectional_plans(batch_sizes: Tensor, device):
    """(plans, int64 ``[2, S, 6]`` step tables on ``device``) of the forward and reverse directions."""
    plans = (_PackedPlan(batch_sizes, False), _PackedPlan(batch_sizes, True))
    tables = torch.tensor([plans[0].rows(), plans[1].rows()], dtype=torch.int64).to(device, non_blocking=True)
    return plans, tables


def _bidirectional_weight_grads(dg, hs, h0, w_hh, has_bias, plans, B):
    """Per direction: :func:`_weight_grads_rows` over its N packed rows, and the (step,
    row) dG rows that read h0 (for dh0). Returns (dw ``[2, GH, H]``, db ``[2, GH]`` or
    ``[0]``, [dG rows of h0 per direction])."""
    H = h0.shape[2]
    dws, dbs, dg_h0 = [], [], []
    for d in range(2):
        prev_rows, h0_rows = plans[d].gather_rows(B, hs.device)
        dw, db = _weight_grads_rows(dg[d], _packed_prev_states(hs[:, d * H:(d + 1) * H], h0[d], prev_rows, h0_rows),
                                    w_hh[d], has_bias)
        dws.append(dw)
        dbs.append(db)
        dg_h0.append(dg[d] if h0_rows is None else dg[d][h0_rows])
    db = torch.stack(dbs) if has_bias else w_hh.new_empty((0,))
    return torch.stack(dws), db, dg_h0


def gru_bidirectional_recurrence_forward(
    gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Tensor, save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """Both directions of a bidirectional GRU layer (one launch per step for both).

    Args and returns: :func:`fastseq.ops.recurrence.naive.gru_bidirectional_recurrence_forward`
    (gi ``[N, 6H]``, h0 ``[2, B, H]``, w_hh ``[2, 3H, H]``, b_hh ``[2, 3H]`` or None ->
    hs ``[N, 2H]``, gates ``[2, N, 4H]`` or ``[0]``).
    """
    N, (_, B, H) = gi.shape[0], h0.shape
    hs = alloc.empty((N, 2 * H), gi)
    gates = alloc.empty((2, N, 4 * H) if save_gates else (0,), gi)
    if N == 0 or B == 0 or H == 0:
        return hs, gates
    gi, h0, w, b = gi.contiguous(), h0.contiguous(), w_hh.contiguous(), contiguous_or_none(b_hh)
    grid, kw = _launch_args(B, H)
    _, tables = _bidirectional_plans(batch_sizes, gi.device)
    S = batch_sizes.shape[0]
    launch_steps(
        _gru_fwd_step_kernel, grid + (2,), range(S),
        [gi, _initial_state(h0), h0, w, b, None, hs, gates if save_gates else None, tables,
         0, B, H, S, N, 6 * H, 2 * H],
        HAS_BIAS=b is not None, HAS_LENGTHS=False, SAVE_GATES=save_gates, PACKED=True, **kw,
    )
    return hs, gates


def gru_bidirectional_recurrence_backward(
    grad_hs: Tensor, h0: Tensor, w_hh: Tensor, hs: Tensor, gates: Tensor, batch_sizes: Tensor, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`gru_bidirectional_recurrence_forward` (one launch per step for
    both directions). Returns dgi ``[N, 6H]``, dh0 ``[2, B, H]``, dw_hh ``[2, 3H, H]``,
    db_hh ``[2, 3H]`` (``[0]`` without a bias)."""
    N, (_, B, H) = hs.shape[0], h0.shape
    if N == 0 or B == 0 or H == 0:
        dgi, dh0, dw, db = empty_backward((N, 6 * H), h0, w_hh, hs, has_bias, 1)
        return dgi, dh0, dw, (w_hh.new_zeros(w_hh.shape[:2]) if has_bias else db)
    if gates.dim() != 3:
        raise ValueError("gru_bidirectional_recurrence_backward needs the gates saved by "
                         "gru_bidirectional_recurrence_forward(save_gates=True)")
    grad_hs, h0, w, hs, gates = (x.contiguous() for x in (grad_hs, h0, w_hh, hs, gates))
    grid, kw = _launch_args(B, H)
    plans, tables = _bidirectional_plans(batch_sizes, hs.device)
    S = batch_sizes.shape[0]
    dgi = alloc.empty((N, 6 * H), hs)
    dg = alloc.empty((2, N, 3 * H), hs, torch.float32)
    dh_buf = alloc.empty((2, B, H), hs, torch.float32)
    launch_steps(
        _gru_bwd_step_kernel, grid + (2,), range(S - 1, -1, -1),
        [grad_hs, gates, hs, h0, w, None, dg, dh_buf, dgi, tables, 0, B, H, S, N, 6 * H, 2 * H],
        HAS_LENGTHS=False, PACKED=True, **kw,
    )
    dw, db, dg_h0 = _bidirectional_weight_grads(dg, hs, h0, w_hh, has_bias, plans, B)
    dh0 = alloc.empty((2, B, H), h0)
    for d in range(2):
        _rnn_bwd_final_kernel[grid](dg_h0[d], w[d], dh_buf[d], None, dh0[d], None, B, H, 3 * H, HAS_C=False, **kw)
    return dgi, dh0, dw, db


def lstm_bidirectional_recurrence_forward(
    gi: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Tensor,
    save_gates: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Both directions of a bidirectional LSTM layer (one launch per step for both);
    as :func:`gru_bidirectional_recurrence_forward` with gi ``[N, 8H]``, c0 ``[2, B, H]``,
    w_hh ``[2, 4H, H]``. Returns hs, cs ``[N, 2H]``, gates ``[2, N, 4H]`` or ``[0]``."""
    N, (_, B, H) = gi.shape[0], h0.shape
    hs = alloc.empty((N, 2 * H), gi)
    cs = alloc.empty((N, 2 * H), gi)
    gates = alloc.empty((2, N, 4 * H) if save_gates else (0,), gi)
    if N == 0 or B == 0 or H == 0:
        return hs, cs, gates
    gi, h0, w, b = gi.contiguous(), h0.contiguous(), w_hh.contiguous(), contiguous_or_none(b_hh)
    grid, kw = _launch_args(B, H)
    _, tables = _bidirectional_plans(batch_sizes, gi.device)
    S = batch_sizes.shape[0]
    launch_steps(
        _lstm_fwd_step_kernel, grid + (2,), range(S),
        [gi, _initial_state(h0), _initial_state(c0), h0, w, b, None, hs, cs, gates if save_gates else None, tables,
         0, B, H, S, N, 8 * H, 2 * H],
        HAS_BIAS=b is not None, HAS_LENGTHS=False, SAVE_GATES=save_gates, PACKED=True, **kw,
    )
    return hs, cs, gates


def lstm_bidirectional_recurrence_backward(
    grad_hs: Tensor, grad_cs: Optional[Tensor], h0: Tensor, c0: Tensor, w_hh: Tensor, hs: Tensor, cs: Tensor,
    gates: Tensor, batch_sizes: Tensor, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`lstm_bidirectional_recurrence_forward` (``grad_cs`` may be None:
    zeros). Returns dgi ``[N, 8H]``, dh0, dc0 ``[2, B, H]``, dw_hh ``[2, 4H, H]``, db_hh
    ``[2, 4H]`` (``[0]`` without a bias)."""
    N, (_, B, H) = hs.shape[0], h0.shape
    if N == 0 or B == 0 or H == 0:
        dgi, dh0, dc0, dw, db = empty_backward((N, 8 * H), h0, w_hh, hs, has_bias, 2)
        return dgi, dh0, dc0, dw, (w_hh.new_zeros(w_hh.shape[:2]) if has_bias else db)
    if gates.dim() != 3:
        raise ValueError("lstm_bidirectional_recurrence_backward needs the gates saved by "
                         "lstm_bidirectional_recurrence_forward(save_gates=True)")
    grad_hs, h0, c0, w, cs, gates = (x.contiguous() for x in (grad_hs, h0, c0, w_hh, cs, gates))
    hs, grad_cs = hs.contiguous(), contiguous_or_none(grad_cs)
    grid, kw = _launch_args(B, H)
    plans, tables = _bidirectional_plans(batch_sizes, hs.device)
    S = batch_sizes.shape[0]
    dg = alloc.empty((2, N, 4 * H), hs, torch.float32)
    dgi = alloc.empty((N, 8 * H), hs)
    dh_buf = alloc.empty((2, B, H), hs, torch.float32)
    dc_buf = alloc.empty((2, B, H), hs, torch.float32)
    launch_steps(
        _lstm_bwd_step_kernel, grid + (2,), range(S - 1, -1, -1),
        [grad_hs, grad_cs, gates, cs, c0, w, None, dg, dh_buf, dc_buf, dgi, tables, 0, B, H, S, N, 8 * H, 2 * H],
        HAS_LENGTHS=False, HAS_GRAD_C=grad_cs is not None, STORE_DGI=True, PACKED=True, **kw,
    )
    dw, db, dg_h0 = _bidirectional_weight_grads(dg, hs, h0, w_hh, has_bias, plans, B)
    dh0 = alloc.empty((2, B, H), h0)
    dc0 = alloc.empty((2, B, H), c0)
    for d in range(2):
        _rnn_bwd_final_kernel[grid](dg_h0[d], w[d], dh_buf[d], dc_buf[d], dh0[d], dc0[d], B, H, 4 * H, HAS_C=True,
                                    **kw)
    return dgi, dh0, dc0, dw, db
