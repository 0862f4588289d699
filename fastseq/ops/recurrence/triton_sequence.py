"""Whole-sequence Triton kernels for the GRU and LSTM recurrences: one launch per call.

Same signatures, semantics and outputs as the per-step kernels of
:mod:`fastseq.ops.recurrence.triton` (dense time-major layout, optional
``lengths``, saved ``gates`` in the same layout, so either backward consumes
either forward's gates); the gate formulas are that module's ``@triton.jit``
functions (:func:`~fastseq.ops.recurrence.triton.gru_gates` and the others).
What changes is the host cost: the per-step kernels launch once per time step
(20-30 us of Python per step, ``bench/NOTES.md`` "v0.4"); these run the time
loop inside the kernel, so a forward or a backward is one launch (plus, for the
grid-barrier variant, one ``torch.zeros`` of the barrier counters).

Kernel design
-------------
Grid ``(n_b, n_h)``, ``n_b = cdiv(B, BLOCK_B)`` row blocks, ``n_h`` programs per
row block. Program ``(b, p)`` owns rows ``[b*BLOCK_B, (b+1)*BLOCK_B)`` and the
hidden tiles ``p, p + n_h, p + 2 n_h, ...`` (``BLOCK_H`` units each) and, for
every step ``t`` in order,

1. for each of its hidden tiles ``j``: the recurrent product ``h_{t-1} W_hh^T``
   for the tile (``tl.dot`` over ``K = H`` in ``BLOCK_K`` chunks, one fp32
   accumulator per gate), the gates, the ``lengths`` mask, and the stores of
   ``hs[t]`` (``cs[t]``), ``gates[t]`` when saving, and the fp32 state ``h_t``
   (``c_t``) into a ping-pong buffer ``state[t % 2]`` (``h0`` is copied into
   ``state[1]`` first). The state is fp32 for every input dtype (the per-step
   kernels do the same for half inputs).
2. a barrier among the ``n_h`` programs of its row block (rows are independent,
   so only those programs share ``h_t``) before step ``t + 1`` reads it:

   * ``n_h == 1`` (``GRID_SYNC`` false): the program itself wrote every tile of
     its rows' ``h_t``; ``tl.debug_barrier()`` (``bar.sync``, which orders the
     CTA's global-memory accesses) is the whole barrier. This variant runs under
     Triton's interpreter (CI) and, on a GPU, when one program per row block is
     chosen.
   * ``n_h > 1`` (``GRID_SYNC`` true): a counter per row block (int32, zeroed by
     the host per call). Each program ends step ``t`` with ``bar.sync``, one
     ``atomic_add(+1, sem="release", scope="gpu")`` and spins on
     ``atomic_add(0, sem="acquire")`` until the counter reaches
     ``(t + 2) * n_h`` (the ``h0`` copy is arrival 1), then ``bar.sync`` again
     (the cooperative-groups grid-sync pattern; Triton executes a scalar atomic
     once per program). Loads of buffers other programs write during the launch
     (the state; the backward's ``dG_{t+1}``) use ``cache_modifier=".cg"`` (L2,
     not the SM's non-coherent L1). **Co-residency**: a program spins until all
     ``n_h`` programs of its row block have arrived, so they must all be resident
     at once; the host caps the grid at the device's SM count
     (``multi_processor_count``: ``n_b * n_h <= SMs``), and every program fits one
     SM alone, so all programs are resident once the GPU has no other work that
     never finishes (a concurrent persistent kernel, or an MPS client limited to
     fewer SMs than reported, could deadlock it). The interpreter runs programs
     one after another, so this variant deadlocks there; it is compiled on CPU
     (the stub driver), not run.

``W_hh`` is read from global memory (L2: ``3H x H`` fp32 is 12 MiB at H = 1024,
well inside an H100/H200's 50 MiB L2) at every step, not kept in registers: a
program's slice is ``G * BLOCK_H * H`` elements (192 KiB fp32 for the GRU at
``BLOCK_H = 16``, H = 1024), past the register file of the 4 warps that hold it.

**W_RESIDENT** (constexpr; :attr:`Plan.w_resident`): each program owns exactly one
hidden tile (``n_h = cdiv(H, BLOCK_H)``, ``BLOCK_H = 16`` on a GPU) and loads its
``W_hh`` slice with the whole K extent ``KP = next_pow2(H)`` once, before the time
loop, then carries it through all T steps: no W_hh traffic from L2 per step.

* Forward: the four gates' rows stacked, ``W [4 * BLOCK_H, KP]`` (the GRU's three
  padded to four, zero), and one product per step, transposed so W is the left
  operand: ``W @ h_{t-1}^T -> [64, BLOCK_B]``, split into the gates
  (:func:`_resident_gates`). ``h_{t-1}`` is read from ``hs[t-1]`` (``h0``) in the input
  dtype, the values the product rounds the fp32 state to. On sm_90a (Triton 3.9 and
  3.6) this is a warpgroup MMA (``HGMMA.64x8x16`` bf16 at 16 rows) whose operands both
  come from shared memory: Triton hoists W's staging (``local_alloc``) out of the time
  loop, so W stays in shared memory (128 KiB bf16 at H = 1024) for the whole launch and
  is read from there by each step's wgmma (by both warpgroups: they split N); ``h^T``
  is staged every step. W never returns to registers (Triton does not make it the
  wgmma's register operand). 8 warps: with 4, the W prologue and the loop spill.
* Backward: per gate ``[KP, BLOCK_H]`` tiles of ``W_hh[g*H + m, j]`` carried the same
  way, ``dG_{t+1}`` rows of each gate times its tile (:func:`_resident_carry`). Its
  ``16 x 16`` products leave most warps nothing to split (``mma.sync``, warps repeating
  the product): on sm_90a it compiles clean only at B = 16, H = 512 in bf16 and spills
  elsewhere (44 B to 2 KB), so the plan never picks it for a backward; it runs when
  forced (``w_resident=True``) and under the interpreter.
* The forward loads each step's gi, b_hh and state ahead of its product (``PREFETCH``,
  :func:`resident_prefetch`: everywhere under Triton 3.9; under 3.6 not the LSTM's 32-row
  tiles, which spill so), so their round trip overlaps the h read and the product
  (bench/NOTES.md v0.17); the other variant loads them after its product.
* Chosen (:func:`plan`) on CUDA for a forward when :func:`resident_fits`: ``n_b *
  cdiv(H, 16) <= SMs`` and the shared-memory stagings within what compiles without
  spills (:data:`RESIDENT_W_BYTES`, :data:`RESIDENT_OPERAND_BYTES`), half weights only:
  under Triton 3.9 up to H = 1024 at B <= 16 and H = 512 at B <= 32; under Triton 3.6
  (the GPU image) only up to H = 512: its ptxas spills inside the time loop at
  KP = 1024. fp32 (IEEE product, no tensor cores) only when forced. Under the interpreter
  only when forced: one program per row block then owns all of H (``BLOCK_H = KP``).
* **Prediction, not measured** (bench/NOTES.md "Prediction: the W-resident persistent
  kernel", v0.17, ``python -m fastseq.bench.step_model``): 1.8-2.7 us per step where chosen,
  2.6 us at LSTM B = 16, H = 768 against cuDNN's ~1.84 us: the W reads from shared memory
  every step and the state broadcast to every program replace the L2 re-reads of W_hh
  (and under Triton 3.6 that size is not picked: it spills).

Tiles on a GPU (:func:`_blocks`): ``BLOCK_B = 16 or 32`` rows, ``BLOCK_H = 32 or
16`` units, ``BLOCK_K = 32``, 4 warps, no software pipelining of the K loop
(``num_stages=1``) and ``maxnreg=255`` (:data:`MAX_REGISTERS`): with those no
kernel spills (sm_90a, Triton 3.6 and 3.9, B in {8, 64}, H in {512, 1024}, fp32
and bf16). Prediction, not measured (no GPU yet): without the pipelining each K
chunk waits for its L2 loads, so a step costs about ``H / BLOCK_K`` L2 round trips
per hidden tile a program owns; a larger ``BLOCK_K`` or a pipelined loop that
fits the registers is the first thing to tune on a GPU.

Backward: the same grid and barriers, ``t = T-1 .. 0``. Program ``(b, p)``, for
each of its tiles, forms the gradient reaching ``h_t``: ``grad_hs[t] + direct
term left by step t+1 (fp32 [B, H] buffer, tile-local) + dG_{t+1}[b, :] @
W_hh[:, j]`` (``tl.dot`` over ``G*H``; ``dG_{t+1}`` was written by all programs of
the row block before the last barrier), applies the pointwise gate backward and
writes ``dgi[t]``, ``dG_t`` (fp32 ``[T, B, G*H]``, kept for the weight gradients;
GRU ``(dr, dz, dn * r)``, LSTM ``(di, df, dg, do)``) and the direct terms for
step ``t - 1``. After the last barrier, ``dh0 = direct term + dG_0 @ W_hh`` (and
``dc0``) in the same launch. The weight gradients are one torch product after the
kernel, as in the per-step backward::

    dW_hh = dG.reshape(T*B, G*H)^T @ [h0; hs[:-1]].reshape(T*B, H)    (fp32)
    db_hh = dG.sum((0, 1))

Precision: as the per-step kernels (loads cast to fp32, fp32 products and
accumulation, ``tl.dot`` with ``input_precision="ieee"`` unless TF32 is opted in).
Element offsets: a step's base offset is formed in int64 (``t * B * G * H`` may
pass int32 for long sequences); within a step, int32 as the per-step kernels.

Host functions: :func:`gru_recurrence_forward`, :func:`gru_recurrence_backward`,
:func:`lstm_recurrence_forward`, :func:`lstm_recurrence_backward` (the per-step
module's signatures, plus a keyword-only ``programs_per_rows`` to force ``n_h``),
:func:`fits` (when these kernels apply) and :func:`plan` (the grid a call uses).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastseq.backend import alloc, limits as backend_limits
from fastseq.backend.selection import interpreter_on
from fastseq.ops.launches import counted
from fastseq.ops.recurrence.triton import gru_gates, gru_gates_backward, lstm_gates, lstm_gates_backward
from fastseq.ops.recurrence.triton import empty_backward, prep_lengths, w_hh_t_tile, weight_grads
from fastseq.ops.triton_utils import (
    TARGET_SMS, cdiv, contiguous_or_none, dot_acc, load_row, load_tile, load_tile_native, next_pow2, pow2, precision,
    store_tile,
)

_TRITON_AT_LEAST_3_9 = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9)

__all__ = [
    "gru_recurrence_forward", "gru_recurrence_backward", "lstm_recurrence_forward", "lstm_recurrence_backward",
    "fits", "plan", "Plan",
]


# ------------------------------------------------------------------ jit helpers


@triton.jit
def _step_barrier(sync_ptr, row_block, arrivals, GRID_SYNC: tl.constexpr):
    """Barrier among the programs of row block ``row_block`` (see the module docstring).

    ``arrivals``: the value of the row block's counter ``sync_ptr[row_block]`` that
    means every program has arrived (the number of barriers so far, this one
    included, times ``n_h``)."""
    tl.debug_barrier()
    if GRID_SYNC:
        counter = sync_ptr + row_block
        tl.atomic_add(counter, 1, sem="release", scope="gpu")
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        while seen < arrivals:
            seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


@triton.jit
def _load_shared_native(ptr, offs_r, offs_c, stride_r, mask_r, mask_c, GRID_SYNC: tl.constexpr):
    """Tile ``ptr[offs_r * stride_r + offs_c]`` in the pointer's dtype of a buffer other programs
    write in this launch: read from L2 (``.cg``) when programs synchronise through the grid barrier."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :]
    m = mask_r[:, None] & mask_c[None, :]
    if GRID_SYNC:
        x = tl.load(ptrs, mask=m, other=0.0, cache_modifier=".cg")
    else:
        x = tl.load(ptrs, mask=m, other=0.0)
    return x


@triton.jit
def _load_shared(ptr, offs_r, offs_c, stride_r, mask_r, mask_c, GRID_SYNC: tl.constexpr):
    """:func:`_load_shared_native` in fp32."""
    return _load_shared_native(ptr, offs_r, offs_c, stride_r, mask_r, mask_c, GRID_SYNC).to(tl.float32)


@triton.jit
def _carry(
    dg_ptr, w_ptr, offs_b, offs_j, mask_b, mask_j, H, GH,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, GRID_SYNC: tl.constexpr,
):
    """``dG[b, :] @ W_hh[:, j]`` for one tile: dG ``[B, GH]`` fp32 (written by the row
    block's programs), W_hh ``[GH, H]``; fp32."""
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for m0 in range(0, GH, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        mask_m = offs_m < GH
        a = _load_shared(dg_ptr, offs_b, offs_m, GH, mask_b, mask_m, GRID_SYNC)
        w = load_tile_native(w_ptr, offs_m, offs_j, H, 1, mask_m, mask_j)
        acc = dot_acc(a, w, acc, PRECISION)
    return acc


@triton.jit
def _copy_initial(src_ptr, dst_ptr, offs_b, mask_b, H, tile0, tile_step, BLOCK_H: tl.constexpr):
    """The program's tiles of ``src [B, H]`` (any dtype) into ``dst [B, H]`` (fp32)."""
    for j0 in range(tile0, H, tile_step):
        offs_j = j0 + tl.arange(0, BLOCK_H)
        mask_j = offs_j < H
        x = load_tile(src_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
        store_tile(dst_ptr, x, offs_b, offs_j, H, mask_b, mask_j)


@triton.jit
def _resident_operand(hs_ptr, h0_ptr, t, BH64, offs_b, mask_b, offs_kp, mask_kp, H, GRID_SYNC: tl.constexpr):
    """W_RESIDENT forward: the product's operand, ``h_{t-1}`` rows as ``[KP, BLOCK_B]``
    (transposed), read from ``hs[t-1]`` (``h0`` at t = 0) in the input dtype, as the
    per-step kernels do: the values :func:`dot_acc` would round the fp32 state to, half
    the bytes from L2 and in shared memory for half inputs (fp32: the state itself)."""
    if t > 0:
        h = _load_shared_native(hs_ptr + (t - 1) * BH64, offs_b, offs_kp, H, mask_b, mask_kp, GRID_SYNC)
    else:
        h = _load_shared_native(h0_ptr, offs_b, offs_kp, H, mask_b, mask_kp, GRID_SYNC)
    return tl.trans(h)


@triton.jit
def _resident_w_gates(w_ptr, offs_kp, mask_kp, tile0, H, G: tl.constexpr, BLOCK_H: tl.constexpr):
    """W_RESIDENT forward: the hidden tile at ``tile0``'s ``W_hh`` rows of all gates stacked,
    ``[4 * BLOCK_H, KP]``: ``(g * BLOCK_H + u, k) -> W_hh[g*H + tile0 + u, k]`` (zero past H, and
    for ``g >= G``: the GRU's three gates are padded to four), in W's dtype; loaded once,
    before the time loop."""
    offs_c = tl.arange(0, 4 * BLOCK_H)
    gate = offs_c // BLOCK_H
    offs_j = tile0 + offs_c % BLOCK_H
    return load_tile_native(w_ptr, gate * H + offs_j, offs_kp, H, 1, (gate < G) & (offs_j < H), mask_kp)


@triton.jit
def _resident_gates(w, h_t, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """W_RESIDENT forward: the four gates' ``[BLOCK_B, BLOCK_H]`` fp32 products (the fourth is
    zero for the GRU) as one product per step, transposed: ``w [4 * BLOCK_H, KP]``
    (:func:`_resident_w_gates`) ``@ h_t [KP, BLOCK_B]`` (:func:`_resident_operand`). W is
    the left operand, M = 64 rows: on Hopper a warpgroup MMA (wgmma), whose left operand
    may come from registers and whose right one, the state, is staged once in shared
    memory for the warpgroup (as the right operand of ``mma.sync`` the state would be
    read by every warp)."""
    acc = dot_acc(w, h_t, tl.zeros((4 * BLOCK_H, BLOCK_B), dtype=tl.float32), PRECISION)
    # rows g * BLOCK_H + u, g = 2 * g_hi + g_lo -> [batch rows, u, g_hi, g_lo]
    acc = tl.permute(tl.reshape(acc, (2, 2, BLOCK_H, BLOCK_B)), (3, 2, 0, 1))
    even, odd = tl.split(acc)  # g_lo = 0: gates 0, 2; g_lo = 1: gates 1, 3
    g0, g2 = tl.split(even)
    g1, g3 = tl.split(odd)
    return g0, g1, g2, g3


@triton.jit
def _resident_dot(h, w, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """W_RESIDENT backward: ``h [BLOCK_B, KP] @ w [KP, BLOCK_H]`` (fp32 result) with a carried tile."""
    return dot_acc(h, w, tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32), PRECISION)


@triton.jit
def _resident_w(w_ptr, gate, offs_kp, mask_kp, tile0, H, BLOCK_H: tl.constexpr):
    """W_RESIDENT backward: ``[KP, BLOCK_H]`` tile ``(m, j) -> W_hh[gate*H + m, j]`` of the hidden
    tile at ``tile0`` (zero past H), in W's dtype; loaded once, before the time loop."""
    offs_j = tile0 + tl.arange(0, BLOCK_H)
    return load_tile_native(w_ptr + gate * H * H, offs_kp, offs_j, H, 1, mask_kp, offs_j < H)


@triton.jit
def _resident_carry(
    dg_ptr, gate, w, offs_b, mask_b, offs_kp, mask_kp, H, GH,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, GRID_SYNC: tl.constexpr,
):
    """W_RESIDENT backward: gate ``gate``'s share of :func:`_carry`, ``dG[b, gate*H:(gate+1)*H] @ w``
    with the carried tile ``w`` (:func:`_resident_w`); fp32."""
    a = _load_shared(dg_ptr + gate * H, offs_b, offs_kp, GH, mask_b, mask_kp, GRID_SYNC)
    return _resident_dot(a, w, BLOCK_B, BLOCK_H, PRECISION)


@triton.jit
def _resident_carry_gates(
    dg_ptr, v0, v1, v2, v3, offs_b, mask_b, offs_kp, mask_kp, H,
    G: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    GRID_SYNC: tl.constexpr,
):
    """W_RESIDENT backward: :func:`_carry` with the carried tiles, the sum of each gate's
    :func:`_resident_carry` over ``G`` gates (``v3`` unused when ``G`` is 3)."""
    acc = _resident_carry(dg_ptr, 0, v0, offs_b, mask_b, offs_kp, mask_kp, H, G * H,
                          BLOCK_B, BLOCK_H, PRECISION, GRID_SYNC)
    acc += _resident_carry(dg_ptr, 1, v1, offs_b, mask_b, offs_kp, mask_kp, H, G * H,
                           BLOCK_B, BLOCK_H, PRECISION, GRID_SYNC)
    acc += _resident_carry(dg_ptr, 2, v2, offs_b, mask_b, offs_kp, mask_kp, H, G * H,
                           BLOCK_B, BLOCK_H, PRECISION, GRID_SYNC)
    if G == 4:
        acc += _resident_carry(dg_ptr, 3, v3, offs_b, mask_b, offs_kp, mask_kp, H, G * H,
                               BLOCK_B, BLOCK_H, PRECISION, GRID_SYNC)
    return acc


@triton.jit
def _inputs(gi_t, b_ptr, h_in, c_in, offs_b, offs_j, mask_b, mask_j, H, G: tl.constexpr, HAS_BIAS: tl.constexpr,
            GRID_SYNC: tl.constexpr, BLOCK_H: tl.constexpr):
    """The forward step's inputs of one tile that do not depend on its product, fp32: the ``G``
    gates' gi ``[BLOCK_B, BLOCK_H]`` tiles (the fourth a copy of the third when ``G`` is 3),
    ``h_{t-1}`` from the state ``h_in`` and, for the LSTM, ``c_{t-1}`` from ``c_in`` (tile-local;
    for the GRU a copy of ``h_{t-1}``), and the ``G`` b_hh rows ``[1, BLOCK_H]`` (zero without a
    bias). The forwards call it ahead of the product where :attr:`Plan.prefetch` (the loads'
    round trip then overlaps the h read and the product, bench/NOTES.md v0.17), after it
    elsewhere."""
    x0 = load_tile(gi_t, offs_b, offs_j, G * H, 1, mask_b, mask_j)
    x1 = load_tile(gi_t + H, offs_b, offs_j, G * H, 1, mask_b, mask_j)
    x2 = load_tile(gi_t + 2 * H, offs_b, offs_j, G * H, 1, mask_b, mask_j)
    h_prev = _load_shared(h_in, offs_b, offs_j, H, mask_b, mask_j, GRID_SYNC)
    if G == 4:
        x3 = load_tile(gi_t + 3 * H, offs_b, offs_j, G * H, 1, mask_b, mask_j)
        c_prev = load_tile(c_in, offs_b, offs_j, H, 1, mask_b, mask_j)  # tile-local
    else:
        x3 = x2
        c_prev = h_prev
    if HAS_BIAS:
        b0 = load_row(b_ptr, offs_j, mask_j)
        b1 = load_row(b_ptr + H, offs_j, mask_j)
        b2 = load_row(b_ptr + 2 * H, offs_j, mask_j)
        if G == 4:
            b3 = load_row(b_ptr + 3 * H, offs_j, mask_j)
        else:
            b3 = b2
    else:
        b0 = tl.zeros((1, BLOCK_H), dtype=tl.float32)
        b1 = b0
        b2 = b0
        b3 = b0
    return x0, x1, x2, x3, h_prev, c_prev, b0, b1, b2, b3


# ------------------------------------------------------------------ GRU kernels


@triton.heuristics(
    {
        "HAS_BIAS": lambda a: a["b_ptr"] is not None,
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "SAVE_GATES": lambda a: a["gates_ptr"] is not None,
        "GRID_SYNC": lambda a: a["sync_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["T", "B"])
def _gru_seq_fwd_kernel(
    gi_ptr,  # [T, B, 3H] input projection (r, z, n)
    h0_ptr,  # [B, H]
    w_ptr,  # [3H, H] W_hh
    b_ptr,  # [3H] b_hh or None
    len_ptr,  # [B] int64 lengths or None
    hs_ptr,  # [T, B, H] out
    state_ptr,  # [2, B, H] fp32 scratch: h_t at state[t % 2], h0 at state[1]
    gates_ptr,  # [T, B, 4H] out: (r, z, n, hn) or None
    sync_ptr,  # [n_b] int32 zeros: barrier counters (n_h > 1), or None
    T, B, H,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE_GATES: tl.constexpr, GRID_SYNC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, W_RESIDENT: tl.constexpr, KP: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid_b = tl.program_id(0)
    n_h = tl.num_programs(1)
    tile0 = tl.program_id(1) * BLOCK_H
    tile_step = n_h * BLOCK_H
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + offs_b, mask=mask_b, other=0)[:, None]
    BH = B * H
    BH64 = B.to(tl.int64) * H  # a step's base offset is formed in int64
    _copy_initial(h0_ptr, state_ptr + BH, offs_b, mask_b, H, tile0, tile_step, BLOCK_H)
    if W_RESIDENT:  # the program's one hidden tile: its W_hh^T slices, loaded once for all T steps
        offs_kp = tl.arange(0, KP)
        mask_kp = offs_kp < H
        w_res = _resident_w_gates(w_ptr, offs_kp, mask_kp, tile0, H, 3, BLOCK_H)
    _step_barrier(sync_ptr, pid_b, n_h, GRID_SYNC)
    for t in range(0, T):
        h_in = state_ptr + ((t + 1) % 2) * BH
        h_out = state_ptr + (t % 2) * BH
        gi_t = gi_ptr + t * (3 * BH64)
        for j0 in range(tile0, H, tile_step):  # W_RESIDENT: one tile, j0 = tile0
            offs_j = j0 + tl.arange(0, BLOCK_H)
            mask_j = offs_j < H
            if PREFETCH:  # the step's own inputs loaded ahead of the product (:func:`_inputs`)
                x_r, x_z, x_n, _, h_prev, _, b_r, b_z, b_n, _ = _inputs(
                    gi_t, b_ptr, h_in, h_in, offs_b, offs_j, mask_b, mask_j, H, 3, HAS_BIAS, GRID_SYNC, BLOCK_H)
            if W_RESIDENT:
                h = _resident_operand(hs_ptr, h0_ptr, t, BH64, offs_b, mask_b, offs_kp, mask_kp, H, GRID_SYNC)
                acc_r, acc_z, acc_n, _ = _resident_gates(w_res, h, BLOCK_B, BLOCK_H, PRECISION)
            else:
                acc_r = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                acc_z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                acc_n = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    mask_k = offs_k < H
                    h = _load_shared(h_in, offs_b, offs_k, H, mask_b, mask_k, GRID_SYNC)
                    acc_r = dot_acc(h, w_hh_t_tile(w_ptr, 0, offs_k, offs_j, H, mask_k, mask_j), acc_r, PRECISION)
                    acc_z = dot_acc(h, w_hh_t_tile(w_ptr, 1, offs_k, offs_j, H, mask_k, mask_j), acc_z, PRECISION)
                    acc_n = dot_acc(h, w_hh_t_tile(w_ptr, 2, offs_k, offs_j, H, mask_k, mask_j), acc_n, PRECISION)
            if not PREFETCH:
                x_r, x_z, x_n, _, h_prev, _, b_r, b_z, b_n, _ = _inputs(
                    gi_t, b_ptr, h_in, h_in, offs_b, offs_j, mask_b, mask_j, H, 3, HAS_BIAS, GRID_SYNC, BLOCK_H)
            if HAS_BIAS:
                acc_r += b_r
                acc_z += b_z
                acc_n += b_n
            r, z, n, h_new = gru_gates(x_r, x_z, x_n, acc_r, acc_z, acc_n, h_prev)
            if HAS_LENGTHS:
                h_new = tl.where(lens > t, h_new, h_prev)
            store_tile(hs_ptr + t * BH64, h_new, offs_b, offs_j, H, mask_b, mask_j)
            store_tile(h_out, h_new, offs_b, offs_j, H, mask_b, mask_j)
            if SAVE_GATES:
                g_t = gates_ptr + t * (4 * BH64)
                store_tile(g_t, r, offs_b, offs_j, 4 * H, mask_b, mask_j)
                store_tile(g_t + H, z, offs_b, offs_j, 4 * H, mask_b, mask_j)
                store_tile(g_t + 2 * H, n, offs_b, offs_j, 4 * H, mask_b, mask_j)
                store_tile(g_t + 3 * H, acc_n, offs_b, offs_j, 4 * H, mask_b, mask_j)
        _step_barrier(sync_ptr, pid_b, (t + 2) * n_h, GRID_SYNC)


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "GRID_SYNC": lambda a: a["sync_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["T", "B"])
def _gru_seq_bwd_kernel(
    grad_h_ptr,  # [T, B, H] grad_hs
    gates_ptr,  # [T, B, 4H] (r, z, n, hn)
    hs_ptr,  # [T, B, H]
    h0_ptr,  # [B, H]
    w_ptr,  # [3H, H] W_hh
    len_ptr,  # [B] int64 lengths or None
    dgi_ptr,  # [T, B, 3H] out: (dr, dz, dn)
    dg_ptr,  # [T, B, 3H] fp32 out: dG = (dr, dz, dn * r)
    dh_ptr,  # [B, H] fp32 scratch: direct term into h_{t-1} (tile-local)
    dh0_ptr,  # [B, H] out
    sync_ptr,  # [n_b] int32 zeros, or None
    T, B, H,
    HAS_LENGTHS: tl.constexpr, GRID_SYNC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, W_RESIDENT: tl.constexpr, KP: tl.constexpr,
):
    pid_b = tl.program_id(0)
    n_h = tl.num_programs(1)
    tile0 = tl.program_id(1) * BLOCK_H
    tile_step = n_h * BLOCK_H
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + offs_b, mask=mask_b, other=0)[:, None]
    BH = B * H
    BH64 = B.to(tl.int64) * H  # a step's base offset is formed in int64
    if W_RESIDENT:  # the program's one hidden tile: its W_hh columns, loaded once for all T steps
        offs_kp = tl.arange(0, KP)
        mask_kp = offs_kp < H
        v_r = _resident_w(w_ptr, 0, offs_kp, mask_kp, tile0, H, BLOCK_H)
        v_z = _resident_w(w_ptr, 1, offs_kp, mask_kp, tile0, H, BLOCK_H)
        v_n = _resident_w(w_ptr, 2, offs_kp, mask_kp, tile0, H, BLOCK_H)
    for s in range(0, T):
        t = T - 1 - s
        dg_t = dg_ptr + t * (3 * BH64)
        dgi_t = dgi_ptr + t * (3 * BH64)
        g_t = gates_ptr + t * (4 * BH64)
        for j0 in range(tile0, H, tile_step):
            offs_j = j0 + tl.arange(0, BLOCK_H)
            mask_j = offs_j < H
            dh = load_tile(grad_h_ptr + t * BH64, offs_b, offs_j, H, 1, mask_b, mask_j)
            # The saved gates and h_{t-1}, loaded ahead of the product (bench/NOTES.md v0.17).
            r = load_tile(g_t, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
            z = load_tile(g_t + H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
            n = load_tile(g_t + 2 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
            hn = load_tile(g_t + 3 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
            if t > 0:
                h_prev = load_tile(hs_ptr + (t - 1) * BH64, offs_b, offs_j, H, 1, mask_b, mask_j)
            else:
                h_prev = load_tile(h0_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
            if s > 0:
                dh += load_tile(dh_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
                if W_RESIDENT:
                    dh += _resident_carry_gates(dg_t + 3 * BH, v_r, v_z, v_n, v_n, offs_b, mask_b, offs_kp, mask_kp, H,
                                                3, BLOCK_B, BLOCK_H, PRECISION, GRID_SYNC)
                else:
                    dh += _carry(dg_t + 3 * BH, w_ptr, offs_b, offs_j, mask_b, mask_j, H, 3 * H,
                                 BLOCK_B, BLOCK_H, BLOCK_K, PRECISION, GRID_SYNC)
            dr, dz, dn, dh_direct = gru_gates_backward(dh, r, z, n, hn, h_prev)
            dn_h = dn * r
            if HAS_LENGTHS:
                valid = lens > t
                dr = tl.where(valid, dr, 0.0)
                dz = tl.where(valid, dz, 0.0)
                dn = tl.where(valid, dn, 0.0)
                # Select after the product: a padded step's saved r may be NaN/Inf.
                dn_h = tl.where(valid, dn_h, 0.0)
                dh_direct = tl.where(valid, dh_direct, dh)
            store_tile(dgi_t, dr, offs_b, offs_j, 3 * H, mask_b, mask_j)
            store_tile(dgi_t + H, dz, offs_b, offs_j, 3 * H, mask_b, mask_j)
            store_tile(dgi_t + 2 * H, dn, offs_b, offs_j, 3 * H, mask_b, mask_j)
            store_tile(dg_t, dr, offs_b, offs_j, 3 * H, mask_b, mask_j)
            store_tile(dg_t + H, dz, offs_b, offs_j, 3 * H, mask_b, mask_j)
            store_tile(dg_t + 2 * H, dn_h, offs_b, offs_j, 3 * H, mask_b, mask_j)
            store_tile(dh_ptr, dh_direct, offs_b, offs_j, H, mask_b, mask_j)
        _step_barrier(sync_ptr, pid_b, (s + 1) * n_h, GRID_SYNC)
    # dh0 = direct term + dG_0 @ W_hh.
    for j0 in range(tile0, H, tile_step):
        offs_j = j0 + tl.arange(0, BLOCK_H)
        mask_j = offs_j < H
        dh = load_tile(dh_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
        if W_RESIDENT:
            dh += _resident_carry_gates(dg_ptr, v_r, v_z, v_n, v_n, offs_b, mask_b, offs_kp, mask_kp, H,
                                        3, BLOCK_B, BLOCK_H, PRECISION, GRID_SYNC)
        else:
            dh += _carry(dg_ptr, w_ptr, offs_b, offs_j, mask_b, mask_j, H, 3 * H,
                         BLOCK_B, BLOCK_H, BLOCK_K, PRECISION, GRID_SYNC)
        store_tile(dh0_ptr, dh, offs_b, offs_j, H, mask_b, mask_j)


# ------------------------------------------------------------------ LSTM kernels


@triton.heuristics(
    {
        "HAS_BIAS": lambda a: a["b_ptr"] is not None,
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "SAVE_GATES": lambda a: a["gates_ptr"] is not None,
        "GRID_SYNC": lambda a: a["sync_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["T", "B"])
def _lstm_seq_fwd_kernel(
    gi_ptr,  # [T, B, 4H] input projection (i, f, g, o)
    h0_ptr,  # [B, H]
    c0_ptr,  # [B, H]
    w_ptr,  # [4H, H] W_hh
    b_ptr,  # [4H] b_hh or None
    len_ptr,  # [B] int64 lengths or None
    hs_ptr,  # [T, B, H] out
    cs_ptr,  # [T, B, H] out
    state_ptr,  # [2, 2, B, H] fp32 scratch: (h_t, c_t) at state[t % 2], (h0, c0) at state[1]
    gates_ptr,  # [T, B, 4H] out: activated (i, f, g, o) or None
    sync_ptr,  # [n_b] int32 zeros, or None
    T, B, H,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE_GATES: tl.constexpr, GRID_SYNC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, W_RESIDENT: tl.constexpr, KP: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid_b = tl.program_id(0)
    n_h = tl.num_programs(1)
    tile0 = tl.program_id(1) * BLOCK_H
    tile_step = n_h * BLOCK_H
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + offs_b, mask=mask_b, other=0)[:, None]
    BH = B * H
    BH64 = B.to(tl.int64) * H  # a step's base offset is formed in int64
    _copy_initial(h0_ptr, state_ptr + 2 * BH, offs_b, mask_b, H, tile0, tile_step, BLOCK_H)
    _copy_initial(c0_ptr, state_ptr + 3 * BH, offs_b, mask_b, H, tile0, tile_step, BLOCK_H)
    if W_RESIDENT:  # the program's one hidden tile: its W_hh^T slices, loaded once for all T steps
        offs_kp = tl.arange(0, KP)
        mask_kp = offs_kp < H
        w_res = _resident_w_gates(w_ptr, offs_kp, mask_kp, tile0, H, 4, BLOCK_H)
    _step_barrier(sync_ptr, pid_b, n_h, GRID_SYNC)
    for t in range(0, T):
        h_in = state_ptr + ((t + 1) % 2) * (2 * BH)
        h_out = state_ptr + (t % 2) * (2 * BH)
        gi_t = gi_ptr + t * (4 * BH64)
        for j0 in range(tile0, H, tile_step):  # W_RESIDENT: one tile, j0 = tile0
            offs_j = j0 + tl.arange(0, BLOCK_H)
            mask_j = offs_j < H
            if PREFETCH:  # the step's own inputs loaded ahead of the product (:func:`_inputs`)
                x_i, x_f, x_g, x_o, h_prev, c_prev, b_i, b_f, b_g, b_o = _inputs(
                    gi_t, b_ptr, h_in, h_in + BH, offs_b, offs_j, mask_b, mask_j, H, 4, HAS_BIAS, GRID_SYNC, BLOCK_H)
            if W_RESIDENT:
                h = _resident_operand(hs_ptr, h0_ptr, t, BH64, offs_b, mask_b, offs_kp, mask_kp, H, GRID_SYNC)
                acc_i, acc_f, acc_g, acc_o = _resident_gates(w_res, h, BLOCK_B, BLOCK_H, PRECISION)
            else:
                acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    mask_k = offs_k < H
                    h = _load_shared(h_in, offs_b, offs_k, H, mask_b, mask_k, GRID_SYNC)
                    acc_i = dot_acc(h, w_hh_t_tile(w_ptr, 0, offs_k, offs_j, H, mask_k, mask_j), acc_i, PRECISION)
                    acc_f = dot_acc(h, w_hh_t_tile(w_ptr, 1, offs_k, offs_j, H, mask_k, mask_j), acc_f, PRECISION)
                    acc_g = dot_acc(h, w_hh_t_tile(w_ptr, 2, offs_k, offs_j, H, mask_k, mask_j), acc_g, PRECISION)
                    acc_o = dot_acc(h, w_hh_t_tile(w_ptr, 3, offs_k, offs_j, H, mask_k, mask_j), acc_o, PRECISION)
            if not PREFETCH:
                x_i, x_f, x_g, x_o, h_prev, c_prev, b_i, b_f, b_g, b_o = _inputs(
                    gi_t, b_ptr, h_in, h_in + BH, offs_b, offs_j, mask_b, mask_j, H, 4, HAS_BIAS, GRID_SYNC, BLOCK_H)
            if HAS_BIAS:
                acc_i += b_i
                acc_f += b_f
                acc_g += b_g
                acc_o += b_o
            i, f, g, o, c_new, h_new = lstm_gates(acc_i + x_i, acc_f + x_f, acc_g + x_g, acc_o + x_o, c_prev)
            if HAS_LENGTHS:
                valid = lens > t
                h_new = tl.where(valid, h_new, h_prev)
                c_new = tl.where(valid, c_new, c_prev)
            store_tile(hs_ptr + t * BH64, h_new, offs_b, offs_j, H, mask_b, mask_j)
            store_tile(cs_ptr + t * BH64, c_new, offs_b, offs_j, H, mask_b, mask_j)
            store_tile(h_out, h_new, offs_b, offs_j, H, mask_b, mask_j)
            store_tile(h_out + BH, c_new, offs_b, offs_j, H, mask_b, mask_j)
            if SAVE_GATES:
                g_t = gates_ptr + t * (4 * BH64)
                store_tile(g_t, i, offs_b, offs_j, 4 * H, mask_b, mask_j)
                store_tile(g_t + H, f, offs_b, offs_j, 4 * H, mask_b, mask_j)
                store_tile(g_t + 2 * H, g, offs_b, offs_j, 4 * H, mask_b, mask_j)
                store_tile(g_t + 3 * H, o, offs_b, offs_j, 4 * H, mask_b, mask_j)
        _step_barrier(sync_ptr, pid_b, (t + 2) * n_h, GRID_SYNC)


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "HAS_GRAD_C": lambda a: a["grad_c_ptr"] is not None,
        "STORE_DGI": lambda a: a["dgi_ptr"] is not None,
        "GRID_SYNC": lambda a: a["sync_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["T", "B"])
def _lstm_seq_bwd_kernel(
    grad_h_ptr,  # [T, B, H] grad_hs
    grad_c_ptr,  # [T, B, H] grad_cs or None
    gates_ptr,  # [T, B, 4H] activated (i, f, g, o)
    cs_ptr,  # [T, B, H]
    c0_ptr,  # [B, H]
    w_ptr,  # [4H, H] W_hh
    len_ptr,  # [B] int64 lengths or None
    dgi_ptr,  # [T, B, 4H] out in the input dtype, or None (then dgi is dG)
    dg_ptr,  # [T, B, 4H] fp32 out: dG = (di, df, dg, do)
    dh_ptr,  # [B, H] fp32 scratch: direct term into h_{t-1} (tile-local)
    dc_ptr,  # [B, H] fp32 scratch: gradient into c_{t-1} (tile-local)
    dh0_ptr,  # [B, H] out
    dc0_ptr,  # [B, H] out
    sync_ptr,  # [n_b] int32 zeros, or None
    T, B, H,
    HAS_LENGTHS: tl.constexpr, HAS_GRAD_C: tl.constexpr, STORE_DGI: tl.constexpr, GRID_SYNC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, W_RESIDENT: tl.constexpr, KP: tl.constexpr,
):
    pid_b = tl.program_id(0)
    n_h = tl.num_programs(1)
    tile0 = tl.program_id(1) * BLOCK_H
    tile_step = n_h * BLOCK_H
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + offs_b, mask=mask_b, other=0)[:, None]
    BH = B * H
    BH64 = B.to(tl.int64) * H  # a step's base offset is formed in int64
    if W_RESIDENT:  # the program's one hidden tile: its W_hh columns, loaded once for all T steps
        offs_kp = tl.arange(0, KP)
        mask_kp = offs_kp < H
        v_i = _resident_w(w_ptr, 0, offs_kp, mask_kp, tile0, H, BLOCK_H)
        v_f = _resident_w(w_ptr, 1, offs_kp, mask_kp, tile0, H, BLOCK_H)
        v_g = _resident_w(w_ptr, 2, offs_kp, mask_kp, tile0, H, BLOCK_H)
        v_o = _resident_w(w_ptr, 3, offs_kp, mask_kp, tile0, H, BLOCK_H)
    for s in range(0, T):
        t = T - 1 - s
        dg_t = dg_ptr + t * (4 * BH64)
        g_t = gates_ptr + t * (4 * BH64)
        for j0 in range(tile0, H, tile_step):
            offs_j = j0 + tl.arange(0, BLOCK_H)
            mask_j = offs_j < H
            dh = load_tile(grad_h_ptr + t * BH64, offs_b, offs_j, H, 1, mask_b, mask_j)
            if HAS_GRAD_C:
                dc = load_tile(grad_c_ptr + t * BH64, offs_b, offs_j, H, 1, mask_b, mask_j)
            else:
                dc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            # The saved gates, c_t and c_{t-1}, loaded ahead of the product (as the GRU's).
            i = load_tile(g_t, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
            f = load_tile(g_t + H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
            g = load_tile(g_t + 2 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
            o = load_tile(g_t + 3 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
            c = load_tile(cs_ptr + t * BH64, offs_b, offs_j, H, 1, mask_b, mask_j)
            if t > 0:
                c_prev = load_tile(cs_ptr + (t - 1) * BH64, offs_b, offs_j, H, 1, mask_b, mask_j)
            else:
                c_prev = load_tile(c0_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
            if s > 0:
                dh += load_tile(dh_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
                dc += load_tile(dc_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
                if W_RESIDENT:
                    dh += _resident_carry_gates(dg_t + 4 * BH, v_i, v_f, v_g, v_o, offs_b, mask_b, offs_kp, mask_kp, H,
                                                4, BLOCK_B, BLOCK_H, PRECISION, GRID_SYNC)
                else:
                    dh += _carry(dg_t + 4 * BH, w_ptr, offs_b, offs_j, mask_b, mask_j, H, 4 * H,
                                 BLOCK_B, BLOCK_H, BLOCK_K, PRECISION, GRID_SYNC)
            d_i, d_f, d_g, d_o, dc_prev = lstm_gates_backward(dh, dc, i, f, g, o, c, c_prev)
            # h_{t-1} gets its gradient only through the matmul, unless the row did not update.
            dh_direct = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            if HAS_LENGTHS:
                valid = lens > t
                d_i = tl.where(valid, d_i, 0.0)
                d_f = tl.where(valid, d_f, 0.0)
                d_g = tl.where(valid, d_g, 0.0)
                d_o = tl.where(valid, d_o, 0.0)
                dh_direct = tl.where(valid, dh_direct, dh)
                dc_prev = tl.where(valid, dc_prev, dc)
            store_tile(dg_t, d_i, offs_b, offs_j, 4 * H, mask_b, mask_j)
            store_tile(dg_t + H, d_f, offs_b, offs_j, 4 * H, mask_b, mask_j)
            store_tile(dg_t + 2 * H, d_g, offs_b, offs_j, 4 * H, mask_b, mask_j)
            store_tile(dg_t + 3 * H, d_o, offs_b, offs_j, 4 * H, mask_b, mask_j)
            if STORE_DGI:
                dgi_t = dgi_ptr + t * (4 * BH64)
                store_tile(dgi_t, d_i, offs_b, offs_j, 4 * H, mask_b, mask_j)
                store_tile(dgi_t + H, d_f, offs_b, offs_j, 4 * H, mask_b, mask_j)
                store_tile(dgi_t + 2 * H, d_g, offs_b, offs_j, 4 * H, mask_b, mask_j)
                store_tile(dgi_t + 3 * H, d_o, offs_b, offs_j, 4 * H, mask_b, mask_j)
            store_tile(dh_ptr, dh_direct, offs_b, offs_j, H, mask_b, mask_j)
            store_tile(dc_ptr, dc_prev, offs_b, offs_j, H, mask_b, mask_j)
        _step_barrier(sync_ptr, pid_b, (s + 1) * n_h, GRID_SYNC)
    # dh0 = direct term + dG_0 @ W_hh; dc0 = what step 0 left.
    for j0 in range(tile0, H, tile_step):
        offs_j = j0 + tl.arange(0, BLOCK_H)
        mask_j = offs_j < H
        dh = load_tile(dh_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
        if W_RESIDENT:
            dh += _resident_carry_gates(dg_ptr, v_i, v_f, v_g, v_o, offs_b, mask_b, offs_kp, mask_kp, H,
                                        4, BLOCK_B, BLOCK_H, PRECISION, GRID_SYNC)
        else:
            dh += _carry(dg_ptr, w_ptr, offs_b, offs_j, mask_b, mask_j, H, 4 * H,
                         BLOCK_B, BLOCK_H, BLOCK_K, PRECISION, GRID_SYNC)
        store_tile(dh0_ptr, dh, offs_b, offs_j, H, mask_b, mask_j)
        dc = load_tile(dc_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
        store_tile(dc0_ptr, dc, offs_b, offs_j, H, mask_b, mask_j)


# ------------------------------------------------------------------ host side


# Every launch is recorded while fastseq.ops.launches.count() is open.
_gru_seq_fwd_kernel = counted(_gru_seq_fwd_kernel)
_gru_seq_bwd_kernel = counted(_gru_seq_bwd_kernel)
_lstm_seq_fwd_kernel = counted(_lstm_seq_fwd_kernel)
_lstm_seq_bwd_kernel = counted(_lstm_seq_bwd_kernel)


class Plan(NamedTuple):
    """How one call runs: tiles, warps, and the grid ``(n_b, n_h)``; ``grid_sync``
    is ``n_h > 1`` (the grid-barrier variant). ``w_resident``: the W_RESIDENT variant
    (each program owns exactly one hidden tile and keeps its ``W_hh`` slice, K extent
    ``KP = next_pow2(H)``, on chip for all T steps); ``KP`` is 1 without it. ``prefetch``:
    the forward loads each step's gi, b_hh and state ahead of the product
    (:func:`resident_prefetch`; the W_RESIDENT variant only)."""

    BLOCK_B: int
    BLOCK_H: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    n_b: int
    n_h: int
    w_resident: bool = False
    KP: int = 1
    prefetch: bool = False

    @property
    def grid_sync(self) -> bool:
        return self.n_h > 1


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    """SMs of ``device``; off CUDA (the stub driver's compile runs) the modelled H100/H200's."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return TARGET_SMS


def _blocks(B: int, interpreted: bool) -> Tuple[int, int, int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps, num_stages). Interpreter: 16 everywhere (the
    ``tl.dot`` minimum; small numpy emulation, multi-tile paths exercised). GPU: the row
    tile covers the batch up to 32 rows, the hidden tile is 32 units (16 at 32 rows), and
    the K loop is not software-pipelined (``num_stages=1``: with Triton's default 3
    stages the cp.async buffers and the G fp32 accumulators spill at 255 registers).
    The launch also passes ``maxnreg=255`` (:data:`MAX_REGISTERS`)."""
    if interpreted:
        return 16, 16, 16, 1, 1
    block_b = pow2(B, 16, 32)
    return block_b, (16 if block_b == 32 else 32), 32, 4, 1


#: ``maxnreg`` of every GPU launch. Without it ptxas aims at several CTAs per SM and
#: spills a few loop-invariant values (8-24 bytes at 64-168 registers); these kernels
#: run at most one program per SM by design (:func:`plan`), so occupancy buys nothing
#: and the whole register file is theirs. With it and ``num_stages=1`` no kernel spills
#: at B in {8, 64}, H in {512, 1024}, fp32 and bf16, both variants (Triton 3.6 and 3.9,
#: sm_90a; tests/test_ops_triton_sequence.py checks it).
MAX_REGISTERS = 255

#: W_RESIDENT on a GPU: rows x units of a program's tile, and its warps.
RESIDENT_BLOCK_H = 16
RESIDENT_WARPS = 8
#: W_RESIDENT's limits on a GPU, from its sm_90a compiles (bench/NOTES.md "Prediction: the
#: W-resident persistent kernel"): the carried W slice ``4 * BLOCK_H * KP`` and the per-step
#: product operand ``BLOCK_B * KP`` (both staged in shared memory; elements of W's dtype,
#: bytes). Within both the forward compiles without spills; past them it spills inside the
#: time loop or needs more shared memory than a block has. Triton 3.9 (ptxas 13.4): a
#: 128 KiB slice (bf16 KP = 1024 at 16 rows; fp32 KP = 512 at 16 rows) is clean, a 32 x
#: 1024 bf16 operand spills 8-36 B. Triton 3.6 (ptxas 12.8, the GPU image's): the same
#: 128 KiB slices spill 88-348 B (bf16) and 3.4 KB (fp32), all inside the time loop, so
#: older Tritons get 64 KiB (bf16 KP = 512).
def resident_limits(triton_at_least_3_9: bool) -> Tuple[int, int]:
    """(:data:`RESIDENT_W_BYTES`, :data:`RESIDENT_OPERAND_BYTES`) under Triton >= 3.9 or an older one."""
    return (128 if triton_at_least_3_9 else 64) * 1024, 32 * 1024


RESIDENT_W_BYTES, RESIDENT_OPERAND_BYTES = resident_limits(_TRITON_AT_LEAST_3_9)


def resident_prefetch(block_b: int, G: int, triton_at_least_3_9: bool = _TRITON_AT_LEAST_3_9) -> bool:
    """Whether the W_RESIDENT forward of ``G`` gates with ``block_b``-row tiles loads each step's
    gi, b_hh and state ahead of the product (``PREFETCH``; bench/NOTES.md v0.17). From the sm_90a
    compiles at the sizes :func:`resident_fits` admits: everywhere under Triton 3.9 (147-231
    registers, no spills); under Triton 3.6 (the GPU image's) all but the LSTM's 32-row tiles,
    which spill 64 B at 255 registers with the gates saved, and keep the loads after the product.
    The other variant never prefetches: its LSTM forward spills 4 B (B 16, H 512, Triton 3.9)."""
    return triton_at_least_3_9 or not (G == 4 and block_b > 16)


def _resident_blocks(B: int, H: int, interpreted: bool) -> Tuple[int, int, int, int, int]:
    """W_RESIDENT tiles. Interpreter: one program per row block owns all of H
    (``BLOCK_H = next_pow2(H)``, 16 rows). GPU: :func:`_blocks`' rows,
    :data:`RESIDENT_BLOCK_H` units, :data:`RESIDENT_WARPS` warps."""
    if interpreted:
        return 16, max(16, next_pow2(H)), 16, 1, 1
    return _blocks(B, False)[0], RESIDENT_BLOCK_H, 32, RESIDENT_WARPS, 1


def resident_fits(B: int, H: int, G: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the plan picks the W_RESIDENT variant for a forward on a GPU (``device``
    CUDA, or elsewhere as the modelled H100/H200): half weights (bf16/fp16: a tensor-core
    product; fp32's IEEE product is FMA-bound, and spills under Triton 3.6 even at
    H = 256; it runs when forced), every program owns exactly one hidden
    tile (``n_b * cdiv(H, BLOCK_H) <= SMs``, all co-resident), the W slice ``4 * BLOCK_H *
    KP`` is within :data:`RESIDENT_W_BYTES` and the product operand ``BLOCK_B * KP`` within
    :data:`RESIDENT_OPERAND_BYTES` (``KP = next_pow2(H)``, elements of ``dtype``; ``G``
    does not enter: the GRU's slice is padded to four gates). Triton 3.9: H <= 1024 at
    B <= 16 and H <= 512 at B <= 32. Older Tritons: H <= 512 at B <= 32. (Compiled in
    bf16; fp16 by the same rule.)"""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    bb, bh = _resident_blocks(B, H, False)[:2]
    elem, kp = torch.empty((), dtype=dtype).element_size(), next_pow2(H)
    return (cdiv(B, bb) * cdiv(H, bh) <= _sms(torch.device(device))
            and 4 * bh * kp * elem <= RESIDENT_W_BYTES and bb * kp * elem <= RESIDENT_OPERAND_BYTES)


def plan(B: int, H: int, device: torch.device, programs_per_rows: Optional[int] = None, *,
         G: int = 4, dtype: torch.dtype = torch.float32, w_resident: Optional[bool] = None) -> Plan:
    """The grid and tiles of a call with a ``[B, H]`` state on ``device``.

    ``w_resident`` (the W_RESIDENT variant): forced by True/False; None chooses it on
    CUDA when :func:`resident_fits` (``G`` gates, W's ``dtype``), never under the
    interpreter. With it, ``n_h = cdiv(H, BLOCK_H)`` (one hidden tile per program; 1
    under the interpreter, where the tile covers H).

    Otherwise ``n_h`` (programs per row block): ``programs_per_rows`` if given, else on
    CUDA ``min(cdiv(H, BLOCK_H), SMs // n_b)`` (at least 1) -- every program co-resident,
    one per SM at most, as the grid barrier needs -- and 1 elsewhere (the interpreter
    runs programs one after another).

    Raises:
        ValueError: ``programs_per_rows`` < 1, or > 1 under the interpreter (the grid
        barrier would deadlock there); ``w_resident=True`` with a ``programs_per_rows``
        other than one tile per program, or on a GPU where it does not fit
        (:func:`resident_fits`).
    """
    interpreted = interpreter_on()
    if programs_per_rows is not None and (programs_per_rows < 1 or (programs_per_rows > 1 and interpreted)):
        raise ValueError(f"programs_per_rows={programs_per_rows}: must be >= 1, and 1 under the Triton "
                         "interpreter (the grid barrier needs co-resident programs)")
    if w_resident is None:
        w_resident = (device.type == "cuda" and not interpreted and programs_per_rows is None
                      and resident_fits(B, H, G, dtype, device))
    if w_resident:
        bb, bh, bk, nw, ns = _resident_blocks(B, H, interpreted)
        n_b, n_h = cdiv(B, bb), cdiv(H, bh)
        if not interpreted and not resident_fits(B, H, G, dtype, device):
            raise ValueError(f"w_resident=True: B={B}, H={H}, G={G}, {dtype} does not fit (resident_fits)")
        if programs_per_rows is not None and programs_per_rows != n_h:
            raise ValueError(f"w_resident=True needs one hidden tile per program: programs_per_rows={n_h}, "
                             f"not {programs_per_rows}")
        return Plan(bb, bh, bk, nw, ns, n_b, n_h, True, max(16, next_pow2(H)), resident_prefetch(bb, G))
    bb, bh, bk, nw, ns = _blocks(B, interpreted)
    n_b = cdiv(B, bb)
    tiles = cdiv(H, bh)
    if programs_per_rows is not None:
        n_h = min(int(programs_per_rows), tiles)
    elif device.type == "cuda" and not interpreted:
        n_h = max(1, min(tiles, _sms(device) // n_b))
    else:
        n_h = 1
    return Plan(bb, bh, bk, nw, ns, n_b, n_h)


def fits(B: int, H: int, G: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the sequence kernels take a call: ``G`` = 3 (GRU) or 4 (LSTM), ``[B, H]``
    state of ``dtype`` on ``device``.

    True when: the dtype is float32, float16 or bfloat16; the device is CUDA, or CPU
    under the Triton interpreter; a step's ``[B, 4H]``/``[B, G*H]`` tensors, the
    ``[2, 2, B, H]`` state and ``W_hh [G*H, H]`` are within int32 element offsets (a
    step's base offset is int64, so T does not enter); and the grid's row blocks fit
    grid axis 0. The grid barrier's co-residency (``n_b * n_h <= SMs``) holds by
    construction (:func:`plan`), so it is no condition here; with more row blocks
    than SMs the plan falls back to ``n_h = 1`` (no grid barrier), which is correct
    but runs each row block's whole hidden size on one SM.

    Not a speed predicate: where the sequence kernel beats the per-step kernels on a
    GPU is not measured yet (no GPU in the session that wrote it).
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    device = torch.device(device)
    if device.type != "cuda" and not (device.type == "cpu" and interpreter_on()):
        return False
    n = max(B * 4 * H, 4 * B * H, G * H * H)
    if n > backend_limits.MAX_INDEX:
        return False
    return cdiv(B, _blocks(B, interpreter_on())[0]) <= backend_limits.MAX_GRID_X


def _kw(p: Plan) -> dict:
    kw = dict(BLOCK_B=p.BLOCK_B, BLOCK_H=p.BLOCK_H, BLOCK_K=p.BLOCK_K, PRECISION=precision(),
              W_RESIDENT=p.w_resident, KP=p.KP, num_warps=p.num_warps, num_stages=p.num_stages)
    if not interpreter_on():
        kw["maxnreg"] = MAX_REGISTERS
    return kw


def _sync(p: Plan, like: Tensor) -> Optional[Tensor]:
    """The grid barrier's counters (one per row block, zeroed), or None without it."""
    return torch.zeros(p.n_b, dtype=torch.int32, device=like.device) if p.grid_sync else None


def gru_recurrence_forward(
    gi: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    lengths: Optional[Tensor],
    save_gates: bool,
    *,
    programs_per_rows: Optional[int] = None,
    w_resident: Optional[bool] = None,
) -> Tuple[Tensor, Tensor]:
    """GRU recurrence, all steps in one launch.

    Args:
        gi: ``[T, B, 3H]`` input projection (r, z, n); h0: ``[B, H]``;
        w_hh: ``[3H, H]``; b_hh: ``[3H]`` or None; lengths: int ``[B]`` or None.
        save_gates: also return what the backward needs.
        programs_per_rows: force ``n_h`` (:func:`plan`); None chooses.
        w_resident: force the W_RESIDENT variant on or off (:func:`plan`); None chooses.

    Returns:
        hs ``[T, B, H]``; gates ``[T, B, 4H]`` = (r, z, n, hn) or an empty ``[0]``
        (the layout of :func:`fastseq.ops.recurrence.triton.gru_recurrence_forward`).
    """
    T, B, _ = gi.shape
    H = h0.shape[1]
    hs = alloc.empty((T, B, H), gi)
    gates = alloc.empty((T, B, 4 * H) if save_gates else (0,), gi)
    if T == 0 or B == 0 or H == 0:
        return hs, gates
    gi, h0, w, b = gi.contiguous(), h0.contiguous(), w_hh.contiguous(), contiguous_or_none(b_hh)
    p = plan(B, H, gi.device, programs_per_rows, G=3, dtype=w.dtype, w_resident=w_resident)
    state = alloc.empty((2, B, H), gi, torch.float32)
    _gru_seq_fwd_kernel[(p.n_b, p.n_h)](
        gi, h0, w, b, prep_lengths(lengths, gi), hs, state, gates if save_gates else None, _sync(p, gi),
        T, B, H, PREFETCH=p.prefetch, **_kw(p),
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
    *,
    programs_per_rows: Optional[int] = None,
    w_resident: Optional[bool] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`gru_recurrence_forward` (one launch for all steps, then the
    weight-gradient product).

    Args:
        grad_hs: ``[T, B, H]`` gradient w.r.t. ``hs`` (includes that of h_n);
        h0 ``[B, H]``, w_hh ``[3H, H]``, hs ``[T, B, H]``, gates ``[T, B, 4H]`` as
        saved by either GRU forward; lengths int ``[B]`` or None.

    Returns:
        dgi ``[T, B, 3H]``, dh0 ``[B, H]``, dw_hh ``[3H, H]``, db_hh ``[3H]`` (``[0]`` without a bias).

    Raises:
        ValueError: ``gates`` was not saved (``save_gates=False``).
    """
    T, B, H = hs.shape
    if T == 0 or B == 0 or H == 0:
        return empty_backward((T, B, 3 * H), h0, w_hh, hs, has_bias, 1)
    if gates.dim() != 3:
        raise ValueError("gru_recurrence_backward needs the gates saved by gru_recurrence_forward(save_gates=True)")
    grad_hs, h0, w, hs, gates = (x.contiguous() for x in (grad_hs, h0, w_hh, hs, gates))
    # W_RESIDENT only when asked: its backward spills at most sizes (bench/NOTES.md).
    p = plan(B, H, hs.device, programs_per_rows, G=3, dtype=w.dtype, w_resident=bool(w_resident))
    dgi = alloc.empty((T, B, 3 * H), hs)
    dg = alloc.empty((T, B, 3 * H), hs, torch.float32)
    dh_buf = alloc.empty((B, H), hs, torch.float32)
    dh0 = alloc.empty((B, H), h0)
    _gru_seq_bwd_kernel[(p.n_b, p.n_h)](
        grad_hs, gates, hs, h0, w, prep_lengths(lengths, hs), dgi, dg, dh_buf, dh0, _sync(p, hs),
        T, B, H, **_kw(p),
    )
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
    *,
    programs_per_rows: Optional[int] = None,
    w_resident: Optional[bool] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """LSTM recurrence, all steps in one launch.

    Args:
        gi: ``[T, B, 4H]`` input projection (i, f, g, o); h0, c0: ``[B, H]``;
        w_hh: ``[4H, H]``; b_hh: ``[4H]`` or None; lengths: int ``[B]`` or None.
        programs_per_rows: force ``n_h`` (:func:`plan`); None chooses.
        w_resident: force the W_RESIDENT variant on or off (:func:`plan`); None chooses.

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
    p = plan(B, H, gi.device, programs_per_rows, G=4, dtype=w.dtype, w_resident=w_resident)
    state = alloc.empty((2, 2, B, H), gi, torch.float32)
    _lstm_seq_fwd_kernel[(p.n_b, p.n_h)](
        gi, h0, c0, w, b, prep_lengths(lengths, gi), hs, cs, state, gates if save_gates else None,
        _sync(p, gi), T, B, H, PREFETCH=p.prefetch, **_kw(p),
    )
    return hs, cs, gates


def lstm_recurrence_backward(
    grad_hs: Tensor,
    grad_cs: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    hs: Tensor,
    cs: Tensor,
    gates: Tensor,
    lengths: Optional[Tensor],
    has_bias: bool,
    *,
    programs_per_rows: Optional[int] = None,
    w_resident: Optional[bool] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`lstm_recurrence_forward` (one launch for all steps, then the
    weight-gradient product).

    Args:
        grad_hs, grad_cs: ``[T, B, H]`` gradients w.r.t. ``hs`` and ``cs``
        (``grad_cs`` may be None: zeros); the rest as saved by either LSTM forward.

    Returns:
        dgi ``[T, B, 4H]``, dh0 ``[B, H]``, dc0 ``[B, H]``, dw_hh ``[4H, H]``,
        db_hh ``[4H]`` (``[0]`` without a bias).

    Raises:
        ValueError: ``gates`` was not saved (``save_gates=False``).
    """
    T, B, H = hs.shape
    if T == 0 or B == 0 or H == 0:
        return empty_backward((T, B, 4 * H), h0, w_hh, hs, has_bias, 2)
    if gates.dim() != 3:
        raise ValueError("lstm_recurrence_backward needs the gates saved by lstm_recurrence_forward(save_gates=True)")
    grad_hs, h0, c0, w, cs, gates = (x.contiguous() for x in (grad_hs, h0, c0, w_hh, cs, gates))
    hs, grad_cs = hs.contiguous(), contiguous_or_none(grad_cs)
    # W_RESIDENT only when asked: its backward spills at most sizes (bench/NOTES.md).
    p = plan(B, H, hs.device, programs_per_rows, G=4, dtype=w.dtype, w_resident=bool(w_resident))
    dg = alloc.empty((T, B, 4 * H), hs, torch.float32)
    # float32: dgi is dG itself; otherwise a separate copy in the input dtype.
    dgi = dg if hs.dtype == torch.float32 else alloc.empty((T, B, 4 * H), hs)
    dh_buf = alloc.empty((B, H), hs, torch.float32)
    dc_buf = alloc.empty((B, H), hs, torch.float32)
    dh0 = alloc.empty((B, H), h0)
    dc0 = alloc.empty((B, H), c0)
    _lstm_seq_bwd_kernel[(p.n_b, p.n_h)](
        grad_hs, grad_cs, gates, cs, c0, w, prep_lengths(lengths, hs),
        None if dgi is dg else dgi, dg, dh_buf, dc_buf, dh0, dc0, _sync(p, hs),
        T, B, H, **_kw(p),
    )
    dw, db = weight_grads(dg, h0, hs, w_hh, has_bias)
    return dgi, dh0, dc0, dw, db
