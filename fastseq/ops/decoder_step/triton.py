"""Fused GRU cell of the attention decoder, in Triton.

Same semantics as :func:`.naive.gru_context_cell_forward`: the
decoder GRU's input projection is ``gi + context W_ic^T`` (``gi``: its embedding
part with ``b_ih``, precomputed for all steps; ``W_ic``: the context columns of
``W_ih``), and its hidden projection is ``gh + b_hh`` with ``gh = W_hh s`` given.

Forward (one launch): grid ``(cdiv(B, BLOCK_B), cdiv(H, BLOCK_H))``; each program
computes ``context W_ic^T`` for the three gate columns of its hidden tile with
``tl.dot`` over ``D`` (one fp32 accumulator per gate, each ``context`` chunk read
once for all three; on tensor cores for half-precision weights,
:func:`fastseq.ops.triton_utils.dot_acc`), adds ``gi``, ``gh`` and ``b_hh``, applies the gates and the state
update, and writes ``s'`` and the gates the backward needs, ``(r, z, n, gh_n)``.

Backward: one pointwise launch turns ``grad_s'`` and the saved gates into
``grad_gi`` (pre-activation gradients, also ``grad`` of the input projection),
``grad_gh`` and the direct ``grad_s``; ``grad_context = grad_gi W_ic`` and
``grad_W_ic = grad_gi^T context`` are two matrix products and
``grad_b_hh = sum_b grad_gh`` a reduction (torch).
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import triton
import triton.language as tl
from torch import Tensor

from fastseq.backend import alloc, limits as backend_limits
from fastseq.ops.launches import counted
from fastseq.ops.recurrence.triton import gru_gates, gru_gates_backward
from fastseq.ops.triton_utils import (
    cdiv, contiguous_or_none, dot_acc, hidden_tile_limits, load_row, load_tile, load_tile_native, pick_blocks,
    precision, rows_contiguous, store_tile, tile_offsets,
)

__all__ = ["gru_context_cell_forward", "gru_context_cell_backward", "limits"]


@triton.jit
def _gru_context_cell_fwd_kernel(
    gi_ptr,  # [B, 3H] (row stride stride_gi)
    c_ptr,  # [B, D] context (contiguous)
    w_ptr,  # [3H, D] W_ic (contiguous)
    gh_ptr,  # [B, 3H] W_hh h without bias (row stride stride_gh)
    b_ptr,  # [3H] b_hh or None
    h_ptr,  # [B, H] previous state (row stride stride_h)
    out_ptr,  # [B, H] out: new state (contiguous)
    gates_ptr,  # [B, 4H] out: (r, z, n, gh_n) or None
    B, H, D, stride_gi, stride_gh, stride_h,
    SAVE_GATES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_b, offs_j, mask_b, mask_j = tile_offsets(B, H, BLOCK_B, BLOCK_H)
    # The inputs that do not depend on the context product, loaded ahead of it: their round trip
    # overlaps the product's instead of following it (bench/NOTES.md v0.17).
    gi_r = load_tile(gi_ptr, offs_b, offs_j, stride_gi, 1, mask_b, mask_j)
    gi_z = load_tile(gi_ptr + H, offs_b, offs_j, stride_gi, 1, mask_b, mask_j)
    gi_n = load_tile(gi_ptr + 2 * H, offs_b, offs_j, stride_gi, 1, mask_b, mask_j)
    h_r = load_tile(gh_ptr, offs_b, offs_j, stride_gh, 1, mask_b, mask_j)
    h_z = load_tile(gh_ptr + H, offs_b, offs_j, stride_gh, 1, mask_b, mask_j)
    hn = load_tile(gh_ptr + 2 * H, offs_b, offs_j, stride_gh, 1, mask_b, mask_j)
    if HAS_BIAS:
        h_r += load_row(b_ptr, offs_j, mask_j)
        h_z += load_row(b_ptr + H, offs_j, mask_j)
        hn += load_row(b_ptr + 2 * H, offs_j, mask_j)
    h_prev = load_tile(h_ptr, offs_b, offs_j, stride_h, 1, mask_b, mask_j)
    acc_r = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        c = load_tile(c_ptr, offs_b, offs_k, D, 1, mask_b, mask_k)
        # W^T tiles: (k, j) -> W_ic[g*H + j, k]
        acc_r = dot_acc(c, load_tile_native(w_ptr, offs_k, offs_j, 1, D, mask_k, mask_j), acc_r, PRECISION)
        acc_z = dot_acc(c, load_tile_native(w_ptr + H * D, offs_k, offs_j, 1, D, mask_k, mask_j), acc_z, PRECISION)
        acc_n = dot_acc(c, load_tile_native(w_ptr + 2 * H * D, offs_k, offs_j, 1, D, mask_k, mask_j), acc_n,
                        PRECISION)
    x_r = acc_r + gi_r
    x_z = acc_z + gi_z
    x_n = acc_n + gi_n
    r, z, n, h_new = gru_gates(x_r, x_z, x_n, h_r, h_z, hn, h_prev)
    store_tile(out_ptr, h_new, offs_b, offs_j, H, mask_b, mask_j)
    if SAVE_GATES:
        store_tile(gates_ptr, r, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(gates_ptr + H, z, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(gates_ptr + 2 * H, n, offs_b, offs_j, 4 * H, mask_b, mask_j)
        store_tile(gates_ptr + 3 * H, hn, offs_b, offs_j, 4 * H, mask_b, mask_j)


@triton.jit
def _gru_context_cell_bwd_kernel(
    dh_ptr,  # [B, H] grad of the new state (contiguous)
    gates_ptr,  # [B, 4H] (r, z, n, gh_n)
    h_ptr,  # [B, H] previous state (row stride stride_h)
    dgi_ptr,  # [B, 3H] out: grad of gi (pre-activation gradients)
    dgh_ptr,  # [B, 3H] out: grad of gh
    dhp_ptr,  # [B, H] out: direct grad of the previous state, dh * z
    B, H, stride_h,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    offs_b, offs_j, mask_b, mask_j = tile_offsets(B, H, BLOCK_B, BLOCK_H)
    dh = load_tile(dh_ptr, offs_b, offs_j, H, 1, mask_b, mask_j)
    r = load_tile(gates_ptr, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    z = load_tile(gates_ptr + H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    n = load_tile(gates_ptr + 2 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    hn = load_tile(gates_ptr + 3 * H, offs_b, offs_j, 4 * H, 1, mask_b, mask_j)
    h = load_tile(h_ptr, offs_b, offs_j, stride_h, 1, mask_b, mask_j)
    dr, dz, dn, dh_direct = gru_gates_backward(dh, r, z, n, hn, h)
    store_tile(dgi_ptr, dr, offs_b, offs_j, 3 * H, mask_b, mask_j)
    store_tile(dgi_ptr + H, dz, offs_b, offs_j, 3 * H, mask_b, mask_j)
    store_tile(dgi_ptr + 2 * H, dn, offs_b, offs_j, 3 * H, mask_b, mask_j)
    store_tile(dgh_ptr, dr, offs_b, offs_j, 3 * H, mask_b, mask_j)
    store_tile(dgh_ptr + H, dz, offs_b, offs_j, 3 * H, mask_b, mask_j)
    store_tile(dgh_ptr + 2 * H, dn * r, offs_b, offs_j, 3 * H, mask_b, mask_j)
    store_tile(dhp_ptr, dh_direct, offs_b, offs_j, H, mask_b, mask_j)


_fwd = counted(_gru_context_cell_fwd_kernel)
_bwd = counted(_gru_context_cell_bwd_kernel)


def limits(sizes: Mapping[str, int]) -> Optional[backend_limits.Unsupported]:
    """None if the cell kernels can take ``sizes`` = ``{"B", "H", "D", "extent"}``
    (``extent``: the largest :func:`fastseq.backend.extent` of the row-strided
    inputs gi, gh, h), else why not.

    Limits: ``cdiv(H, BLOCK_H)`` hidden tiles on grid axis 1, and every tensor a
    launch indexes (``[B, 4H]`` gates, ``w_ic [3H, D]``, ``context [B, D]``, the
    inputs) within int32 offsets (:func:`fastseq.ops.triton_utils.hidden_tile_limits`).
    """
    B, H, D = sizes["B"], sizes["H"], sizes["D"]
    n = max(sizes["extent"], B * 4 * H, 3 * H * D, B * D)
    return hidden_tile_limits(B, H, n, f"B={B}, H={H}, D={D}: a tensor of {n} elements")


def gru_context_cell_forward(
    gi: Tensor, context: Tensor, w_ic: Tensor, gh: Tensor, b_hh: Optional[Tensor], h: Tensor,
    save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """One fused launch; arguments and returns as the reference's."""
    B, H = h.shape
    D = context.shape[1]
    out = alloc.empty((B, H), gi)
    gates = alloc.empty((B, 4 * H) if save_gates else (0,), gi)
    if B == 0 or H == 0:
        return out, gates
    gi, gh, h = rows_contiguous(gi), rows_contiguous(gh), rows_contiguous(h)
    c, w = context.contiguous(), w_ic.contiguous()
    # pick_blocks' tiles, rows capped at 32: at 64 rows (B >= 128) the fp32 cell spills
    # 8 bytes under ptxas 13.4 (Triton 3.9); at 32 it does not (tests/test_kernel_resources.py).
    blk = pick_blocks(B, H)
    blk = blk._replace(BLOCK_B=min(blk.BLOCK_B, 32))
    grid = (cdiv(B, blk.BLOCK_B), cdiv(H, blk.BLOCK_H))
    b = contiguous_or_none(b_hh)
    _fwd[grid](
        gi, c, w, gh, b, h, out, gates if save_gates else None,
        B, H, D, gi.stride(0), gh.stride(0), h.stride(0),
        SAVE_GATES=save_gates, HAS_BIAS=b is not None, BLOCK_B=blk.BLOCK_B, BLOCK_H=blk.BLOCK_H, BLOCK_K=blk.BLOCK_K,
        PRECISION=precision(), num_warps=blk.num_warps,
    )
    return out, gates


def gru_context_cell_backward(
    grad_h: Tensor, gates: Tensor, h: Tensor, context: Tensor, w_ic: Tensor, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One pointwise launch plus two matrix products; returns as the reference's."""
    B, H = h.shape
    dgi = alloc.empty((B, 3 * H), gates)
    dgh = alloc.empty((B, 3 * H), gates)
    dhp = alloc.empty((B, H), h)
    if B and H:
        h = rows_contiguous(h)
        blk = pick_blocks(B, H)
        grid = (cdiv(B, blk.BLOCK_B), cdiv(H, blk.BLOCK_H))
        _bwd[grid](grad_h.contiguous(), gates.contiguous(), h, dgi, dgh, dhp, B, H, h.stride(0),
                   BLOCK_B=blk.BLOCK_B, BLOCK_H=blk.BLOCK_H, num_warps=blk.num_warps)
    dctx = (dgi @ w_ic.to(dgi.dtype)).to(context.dtype)
    dw = (dgi.t() @ context.to(dgi.dtype)).to(w_ic.dtype)
    db = dgh.sum(0).to(w_ic.dtype) if has_bias else w_ic.new_empty((0,))
    return dgi, dctx, dw, dgh, db, dhp
