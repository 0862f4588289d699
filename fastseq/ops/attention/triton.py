"""Fused additive (Bahdanau) attention in Triton, forward and backward.

Same semantics and layouts as :func:`.naive.additive_attention_forward`:
queries ``q [B, T, A]``, projected keys ``K [B, S, A]``, values ``V [B, S, D]``,
energy vector ``v [A]``; ``energy[t, j] = v^T tanh(q_t + K_j)``, softmax over the
valid positions, ``context_t = sum_j weights[t, j] V_j``.

Every ``tanh(q_t + K_j)`` element (the ``[B, T, S, A]`` tensor that never touches
memory) is computed exactly once in the forward and once in the backward.

Forward (one launch)
--------------------
Grid ``(cdiv(T, BLOCK_T), B)``. A program owns ``BLOCK_T`` queries of one row
``b`` and makes three passes:

1. scores: for each ``BLOCK_S`` source tile, ``e = sum_A v * tanh(q + K)`` over
   the whole ``A`` (``BLOCK_A`` chunks, accumulated in a ``[BLOCK_T, BLOCK_S,
   BLOCK_A]`` register tile and reduced once per source tile), invalid
   positions set to ``-inf``; the raw fp32 scores are stored and a running
   max ``m`` and sum ``l`` kept (online softmax, Milakov & Gimelshein 2018);
2. weights: ``p = exp(e - m - log l)`` over the stored ``[BLOCK_T, S]`` scores,
   written as fp32 (in place when the weights are fp32; to an fp32 scratch
   buffer, plus the weights in their own dtype, for half weights, so the
   context uses unrounded weights);
3. context: for each ``BLOCK_D`` slice of ``D``, ``sum_j p_j V_j`` over the source
   tiles, reading ``p`` back (``[BLOCK_T, S]`` fp32 per slice: no ``A`` factor).

``p @ V`` uses ``tl.dot`` when ``BLOCK_T >= 16`` (the multi-query form; for half
values on tensor cores, the fp32 weights rounded to the values' dtype for the
product, :func:`fastseq.ops.triton_utils.dot_acc`), and a broadcast-and-sum
otherwise (one decoder step has ``T = 1``). The program
reads its own stores back (passes 2 and 3), with a CTA barrier in between.

Backward
--------
The softmax and weighted-sum part (``grad_energy``, ``grad_values``) are two
batched matrix products and a pointwise pass, shared with the reference
(:func:`.naive.attention_score_grad`). The energy part, the only
one with an ``A`` factor, is one fused launch that recomputes
``u = tanh(q_t + K_j)``: grid ``(cdiv(A, BLOCK_A), B, cdiv(S, BLOCK_S))``; the
program for an ``A`` chunk and a source tile loops over all queries in
``BLOCK_T`` tiles and forms ``h = grad_energy * (1 - u^2)``, accumulating
``grad_K[j] = v * sum_t h`` (it owns those elements), writing
``grad_q = v * sum_{j in tile} h`` (complete when one source tile covers S,
else a per-tile partial) and its partial ``grad_v = sum grad_energy * u``; the
partials are summed by torch afterwards (no atomics, deterministic).

tanh: half-precision inputs (bfloat16, float16) on a GPU use the one-instruction
``tanh.approx.f32`` (:func:`fastseq.ops.triton_utils.tanh_fast`, relative error
~2^-11); float32 inputs and the interpreter use the exact formula.

Precision: every load is cast to fp32, all arithmetic is fp32; outputs in the
input dtypes.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastseq.backend import alloc, limits as backend_limits
from fastseq.backend.selection import interpreter_on
from fastseq.ops.attention.naive import attention_score_grad
from fastseq.ops.launches import counted
from fastseq.ops.triton_utils import cdiv, dot_acc, fast_tanh_ok, next_pow2, precision, tanh_fast

__all__ = ["additive_attention_forward", "additive_attention_backward", "limits"]

_NEG = tl.constexpr(-1.0e30)  # running-max start: finite, so exp(m - m_new) never sees inf - inf


@triton.jit
def _energy_tile(
    q_ptr, k_ptr, e_ptr, offs_t, offs_s, mask_t, mask_s, A, stride_qt, stride_ks,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, FAST: tl.constexpr,
):
    """``[BLOCK_T, BLOCK_S]`` fp32 scores v^T tanh(q_t + K_j) over the whole of A.

    The products are accumulated in a ``[BLOCK_T, BLOCK_S, BLOCK_A]`` tile over the
    ``A`` chunks and reduced over ``A`` once at the end (one cross-lane reduction per
    tile, not one per chunk)."""
    acc = tl.zeros((BLOCK_T, BLOCK_S, BLOCK_A), dtype=tl.float32)
    for a0 in range(0, A, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        mask_a = offs_a < A
        q = tl.load(q_ptr + offs_t[:, None] * stride_qt + offs_a[None, :],
                    mask=mask_t[:, None] & mask_a[None, :], other=0.0).to(tl.float32)
        k = tl.load(k_ptr + offs_s[:, None] * stride_ks + offs_a[None, :],
                    mask=mask_s[:, None] & mask_a[None, :], other=0.0).to(tl.float32)
        v = tl.load(e_ptr + offs_a, mask=mask_a, other=0.0).to(tl.float32)
        acc += tanh_fast(q[:, None, :] + k[None, :, :], FAST) * v[None, None, :]
    return tl.sum(acc, axis=2)


@triton.jit
def _valid_positions(mask_ptr, len_ptr, b, offs_s, S, stride_mb,
                     HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """``[BLOCK_S]`` bool: source positions of row ``b`` that take part in the softmax."""
    valid = offs_s < S
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + b * stride_mb + offs_s, mask=offs_s < S, other=0) != 0)
    if HAS_LENGTHS:
        valid = valid & (offs_s < tl.load(len_ptr + b))
    return valid


@triton.jit
def _attention_fwd_kernel(
    q_ptr,  # [B, T, A] (last dim contiguous)
    k_ptr,  # [B, S, A] (last dim contiguous)
    v_ptr,  # [B, S, D] (last dim contiguous)
    e_ptr,  # [A]
    mask_ptr,  # [B, S] uint8 or None
    len_ptr,  # [B] int64 or None
    ob_ptr,  # [B, T, D] (last dim contiguous) or None: the context output is tanh(out_bias + context)
    ctx_ptr,  # [B, T, D] out (contiguous)
    w_ptr,  # [B, T, S] out (contiguous)
    sc_ptr,  # [B, T, S] fp32 scratch: raw scores, then fp32 weights (w_ptr itself when SCRATCH is False)
    T, S, A, D,
    stride_qb, stride_qt, stride_kb, stride_ks, stride_vb, stride_vs, stride_mb, stride_obb, stride_obt,
    HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_OUT_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    SCRATCH: tl.constexpr,  # sc_ptr is a separate buffer (weights not fp32)
    FAST: tl.constexpr,  # approximate tanh (half inputs on a GPU)
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    q_row = q_ptr + b * stride_qb
    k_row = k_ptr + b * stride_kb
    v_row = v_ptr + b * stride_vb
    w_rows = w_ptr + b * T * S + offs_t[:, None] * S
    sc_rows = sc_ptr + b * T * S + offs_t[:, None] * S

    # Pass 1: raw scores (each tanh(q_t + K_j) once), running max and sum.
    m_i = tl.full((BLOCK_T,), _NEG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_s = offs_s < S
        valid = _valid_positions(mask_ptr, len_ptr, b, offs_s, S, stride_mb, HAS_MASK, HAS_LENGTHS)
        e = _energy_tile(q_row, k_row, e_ptr, offs_t, offs_s, mask_t, in_s, A, stride_qt, stride_ks,
                         BLOCK_T, BLOCK_S, BLOCK_A, FAST)
        e = tl.where(valid[None, :], e, float("-inf"))
        tl.store(sc_rows + offs_s[None, :], e, mask=mask_t[:, None] & in_s[None, :])
        m_new = tl.maximum(m_i, tl.max(e, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(e - m_new[:, None]), axis=1)
        m_i = m_new
    tl.debug_barrier()

    # Pass 2: weights = exp(e - logsumexp), fp32 in sc (and in w's dtype when separate).
    lse = m_i + tl.log(l_i)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        wm = mask_t[:, None] & (offs_s < S)[None, :]
        p = tl.exp(tl.load(sc_rows + offs_s[None, :], mask=wm, other=float("-inf")) - lse[:, None])
        tl.store(sc_rows + offs_s[None, :], p, mask=wm)
        if SCRATCH:
            tl.store(w_rows + offs_s[None, :], p.to(w_ptr.dtype.element_ty), mask=wm)
    tl.debug_barrier()

    # Pass 3: context = weights @ V, one BLOCK_D slice at a time.
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            valid = _valid_positions(mask_ptr, len_ptr, b, offs_s, S, stride_mb, HAS_MASK, HAS_LENGTHS)
            p = tl.load(sc_rows + offs_s[None, :], mask=mask_t[:, None] & (offs_s < S)[None, :],
                        other=0.0).to(tl.float32)
            vals = tl.load(v_row + offs_s[:, None] * stride_vs + offs_d[None, :],
                           mask=valid[:, None] & mask_d[None, :], other=0.0)
            if USE_DOT:  # half values: the weights rounded to their dtype, on tensor cores (dot_acc)
                acc = dot_acc(p, vals, acc, PRECISION)
            else:
                acc += tl.sum(p[:, :, None] * vals.to(tl.float32)[None, :, :], axis=1)
        if HAS_OUT_BIAS:  # the attention vector tanh(out_bias + context) (Luong flow, projected values)
            ob = tl.load(ob_ptr + b * stride_obb + offs_t[:, None] * stride_obt + offs_d[None, :],
                         mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc = tanh_fast(ob + acc, FAST)
        ctx_ptrs = ctx_ptr + (b * T + offs_t[:, None]) * D + offs_d[None, :]
        tl.store(ctx_ptrs, acc.to(ctx_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _attention_energy_bwd_kernel(
    q_ptr,  # [B, T, A] (last dim contiguous)
    k_ptr,  # [B, S, A] (last dim contiguous)
    e_ptr,  # [A]
    de_ptr,  # [B, T, S] fp32 contiguous: gradient w.r.t. the scores
    dk_ptr,  # [B, S, A] out (contiguous)
    dq_ptr,  # [n_s, B, T, A] out: grad_q per source tile (fp32 partials; the output itself when n_s = 1)
    dv_ptr,  # [n_s, B, A] fp32 out: per-source-tile partial grad of v
    B, T, S, A,
    stride_qb, stride_qt, stride_kb, stride_ks,
    FAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
):
    pid_a = tl.program_id(0)
    b = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_s = offs_s < S
    mask_a = offs_a < A
    q_row = q_ptr + b * stride_qb
    de_row = de_ptr + b * T * S
    dq_part = dq_ptr + (pid_s * B + b) * T * A
    k = tl.load(k_ptr + b * stride_kb + offs_s[:, None] * stride_ks + offs_a[None, :],
                mask=mask_s[:, None] & mask_a[None, :], other=0.0).to(tl.float32)
    v = tl.load(e_ptr + offs_a, mask=mask_a, other=0.0).to(tl.float32)
    hk = tl.zeros((BLOCK_S, BLOCK_A), dtype=tl.float32)  # sum_t de (1 - u^2)
    du = tl.zeros((BLOCK_S, BLOCK_A), dtype=tl.float32)  # sum_t de u
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        q = tl.load(q_row + offs_t[:, None] * stride_qt + offs_a[None, :],
                    mask=mask_t[:, None] & mask_a[None, :], other=0.0).to(tl.float32)
        de = tl.load(de_row + offs_t[:, None] * S + offs_s[None, :],
                     mask=mask_t[:, None] & mask_s[None, :], other=0.0)
        u = tanh_fast(q[:, None, :] + k[None, :, :], FAST)  # [BT, BS, BA], each element once
        deu = de[:, :, None] * u
        h = de[:, :, None] - deu * u  # de (1 - u^2)
        hk += tl.sum(h, axis=0)
        du += tl.sum(deu, axis=0)
        tl.store(dq_part + offs_t[:, None] * A + offs_a[None, :],
                 (tl.sum(h, axis=1) * v[None, :]).to(dq_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & mask_a[None, :])
    tl.store(dk_ptr + (b * S + offs_s[:, None]) * A + offs_a[None, :],
             (hk * v[None, :]).to(dk_ptr.dtype.element_ty), mask=mask_s[:, None] & mask_a[None, :])
    tl.store(dv_ptr + (pid_s * B + b) * A + offs_a, tl.sum(du, axis=0), mask=mask_a)


_fwd = counted(_attention_fwd_kernel)
_energy_bwd = counted(_attention_energy_bwd_kernel)


# ------------------------------------------------------------------ launchers


class _Blocks(NamedTuple):
    BLOCK_T: int
    BLOCK_S: int
    BLOCK_A: int
    BLOCK_D: int
    num_warps: int


def _p2(n: int) -> int:
    return next_pow2(n)


def _fwd_blocks(T: int, S: int, A: int, D: int) -> _Blocks:
    """Forward tile sizes (the one place they are chosen; not autotuned yet).

    ``BLOCK_T`` follows T (1 for a decoder step) up to 16, where ``p @ V`` switches
    to ``tl.dot``. A program (8 warps) owns a whole row's ``[BLOCK_T, S]`` scores,
    so the grid is small (``B`` programs for a decoder step) and each program
    works through its loads in sequence: the ``[BLOCK_T, BLOCK_S, BLOCK_A]``
    energy accumulator and the ``[BLOCK_T, BLOCK_S, BLOCK_D]`` broadcast
    product are 8192 elements (32 fp32 registers per thread), the ``tl.dot``
    form takes 16-wide source tiles (``[16, 16, 32]`` energy tiles: 128-byte fp32
    rows of q and K) and 64-wide context slices (at sm_90a, bf16, B=64, S=32:
    32-wide source tiles spill under Triton 3.9, 128-wide slices cost ~60
    more registers). Under the interpreter the tiles stay at
    16 so the numpy emulation stays small and the multi-tile paths run.
    """
    bt = min(_p2(T), 16)
    if interpreter_on():
        return _Blocks(bt, 16, 16, 16, 1)
    warps = 8
    tile = 1024 * warps
    bs = min(_p2(S), 16 if bt >= 16 else 32)
    ba = max(4, min(_p2(A), tile // (bt * bs)))
    bd = 64 if bt >= 16 else max(16, min(_p2(D), tile // (bt * bs)))
    return _Blocks(bt, bs, ba, bd, warps)


def _bwd_blocks(T: int, S: int, A: int) -> _Blocks:
    """Energy-backward tile sizes: ``A`` chunks of 64-128 (256-512-byte fp32 rows) on the
    grid, a source tile of up to 32, and as many queries per step as keep the
    ``[BLOCK_T, BLOCK_S, BLOCK_A]`` tile at 4096 elements (16 at the interpreter's)."""
    if interpreter_on():
        return _Blocks(min(_p2(T), 16), 16, 16, 0, 1)
    bs = min(_p2(S), 32)
    bt = min(_p2(T), max(1, 4096 // (bs * 64)))
    ba = min(_p2(A), 128, max(16, 4096 // (bt * bs)))
    return _Blocks(bt, bs, ba, 0, 4)


def limits(sizes: Mapping[str, int]) -> Optional[backend_limits.Unsupported]:
    """None if the attention kernels can take ``sizes`` = ``{"B", "T", "S", "A", "D",
    "extent"}`` (``extent``: the largest :func:`fastseq.backend.extent` of query,
    proj_keys and values, which may be strided views), else why not.

    Limits: B (grid axis 1) and the backward's ``cdiv(S, BLOCK_S)`` source tiles
    (grid axis 2) at most ``MAX_GRID_YZ``; every
    tensor a launch indexes -- the inputs, ``weights [B, T, S]``, ``context [B, T, D]``,
    the backward's ``[n_s, B, T, A]`` partials -- within int32 offsets
    (:mod:`fastseq.backend.limits`).
    """
    B, T, S, A, D = sizes["B"], sizes["T"], sizes["S"], sizes["A"], sizes["D"]
    max_grid, max_index = backend_limits.MAX_GRID_YZ, backend_limits.MAX_INDEX
    if B > max_grid:
        return backend_limits.Unsupported("grid", f"B={B} batch rows on grid axis 1, past the limit {max_grid}")
    n_s = cdiv(S, _bwd_blocks(T, S, A).BLOCK_S)
    if n_s > max_grid:
        return backend_limits.Unsupported(
            "grid", f"S={S}: {n_s} source tiles on grid axis 2, past the limit {max_grid}"
        )
    n = max(sizes["extent"], B * T * S, B * T * D, B * S * A, n_s * B * T * A)
    if n > max_index:
        return backend_limits.Unsupported(
            "int32-index",
            f"B={B}, T={T}, S={S}, A={A}, D={D}: a tensor of {n} elements, past the Triton "
            f"kernels' int32 offsets (at most {max_index})",
        )
    return None


def _last_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def additive_attention_forward(
    query: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    energy: Tensor,
    mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    out_bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Fused additive attention (one launch); arguments as the reference's (``out_bias``:
    the first output is ``tanh(out_bias + context)``, the tanh in the epilogue).

    Grid ``(cdiv(T, BLOCK_T), B)``; each ``tanh(q_t + K_j)`` element is computed once.

    Returns:
        context ``[B, T, D]``, weights ``[B, T, S]`` in ``values``' dtype.
    """
    B, T, A = query.shape
    S, D = values.shape[1], values.shape[2]
    context = alloc.empty((B, T, D), values)
    weights = alloc.empty((B, T, S), values)
    if B == 0 or T == 0 or D == 0:
        if weights.numel():
            weights.zero_()
        return context, weights
    q, k, v = _last_contiguous(query), _last_contiguous(proj_keys), _last_contiguous(values)
    e = energy.contiguous()
    m = None if mask is None else mask.to(device=values.device).contiguous().view(torch.uint8)
    lens = None if lengths is None else lengths.to(device=values.device, dtype=torch.int64).contiguous()
    ob = None if out_bias is None else _last_contiguous(out_bias)
    # Raw scores and the weights the context uses stay fp32 (half weights would round them).
    scores = weights if weights.dtype == torch.float32 else torch.empty(
        (B, T, S), device=values.device, dtype=torch.float32)
    blk = _fwd_blocks(T, S, A, D)
    _fwd[(cdiv(T, blk.BLOCK_T), B)](
        q, k, v, e, m, lens, ob, context, weights, scores,
        T, S, A, D,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        0 if m is None else m.stride(0), 0 if ob is None else ob.stride(0), 0 if ob is None else ob.stride(1),
        HAS_MASK=m is not None, HAS_LENGTHS=lens is not None, HAS_OUT_BIAS=ob is not None,
        USE_DOT=blk.BLOCK_T >= 16,
        SCRATCH=scores is not weights, FAST=fast_tanh_ok(values.dtype),
        BLOCK_T=blk.BLOCK_T, BLOCK_S=blk.BLOCK_S, BLOCK_A=blk.BLOCK_A, BLOCK_D=blk.BLOCK_D,
        PRECISION=precision(), num_warps=blk.num_warps,
    )
    return context, weights


def additive_attention_backward(
    grad_context: Tensor,
    grad_weights: Optional[Tensor],
    query: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    energy: Tensor,
    weights: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (query, proj_keys, values, energy); tanh(q + K) is recomputed,
    each element once (one launch, grid ``(cdiv(A, BLOCK_A), B, cdiv(S, BLOCK_S))``)."""
    B, T, A = query.shape
    S = proj_keys.shape[1]
    de, dvalues = attention_score_grad(grad_context, grad_weights, values, weights)
    de = de.float().contiguous()
    blk = _bwd_blocks(T, S, A)
    n_s = cdiv(S, blk.BLOCK_S)
    dk = alloc.empty(proj_keys.shape, proj_keys)
    if B == 0 or T == 0 or S == 0 or A == 0:
        dk.zero_()
        return torch.zeros_like(query), dk, dvalues.to(values.dtype), torch.zeros_like(energy)
    # One source tile: grad_q is complete in the kernel, written in query's dtype.
    dq = alloc.empty((B, T, A), query) if n_s == 1 else alloc.empty((n_s, B, T, A), query, torch.float32)
    dv = alloc.empty((n_s, B, A), query, torch.float32)
    q, k = _last_contiguous(query), _last_contiguous(proj_keys)
    _energy_bwd[(cdiv(A, blk.BLOCK_A), B, n_s)](
        q, k, energy.contiguous(), de, dk, dq, dv,
        B, T, S, A, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        FAST=fast_tanh_ok(query.dtype),
        BLOCK_T=blk.BLOCK_T, BLOCK_S=blk.BLOCK_S, BLOCK_A=blk.BLOCK_A, num_warps=blk.num_warps,
    )
    if n_s > 1:
        dq = dq.sum(0).to(query.dtype)
    return dq, dk, dvalues.to(values.dtype), dv.sum((0, 1)).to(energy.dtype)
