"""Fused additive (Bahdanau) attention in Triton, forward and backward.

Same semantics and layouts as :func:`.naive.additive_attention_forward`:
queries ``q [B, T, A]``, projected keys ``K [B, S, A]``, values ``V [B, S, D]``,
energy vector ``v [A]``; ``energy[t, j] = v^T tanh(q_t + K_j)``, softmax over the
valid positions, ``context_t = sum_j weights[t, j] V_j``.

Forward (one launch)
--------------------
Grid ``(cdiv(T, BLOCK_T), B, cdiv(D, BLOCK_D))``. A program owns ``BLOCK_T``
queries of one row ``b`` and a ``BLOCK_D`` slice of the context, and makes one
pass over the source in ``BLOCK_S`` tiles with an online softmax (running max
``m``, running sum ``l``, rescaled accumulator), as in FlashAttention
(Dao et al. 2022, Algorithm 1) but with additive scores::

    for each source tile j:
        e = sum over A chunks of v * tanh(q[:, None, :] + K[None, j, :])   # [BT, BS], registers
        m' = max(m, max_j e);  p = exp(e - m');  l = l e^{m - m'} + sum_j p
        acc = acc e^{m - m'} + p @ V[j, d-slice]

so the ``[B, T, S, A]`` tensor of ``tanh`` arguments never touches memory.
The weights are an output, so the program with ``d``-slice 0 writes the raw
fp32 scores as it goes and, after the pass, turns them into
``exp(e - m - log l)`` (a ``[T, S]`` read and write, no ``A`` factor): in
place for fp32 weights; for half weights the scores go to an fp32 scratch
buffer, so the weights are the rounded softmax of the fp32 scores, not the
softmax of rounded scores. With
several ``d``-slices the scores are recomputed per slice (cheap: decode-time
attention is launch-bound, and it keeps every program independent).
``p @ V`` uses ``tl.dot`` when ``BLOCK_T >= 16`` (the multi-query form), and a
broadcast-and-sum otherwise (one decoder step has ``T = 1``).

Backward
--------
The softmax and weighted-sum part (``grad_energy``, ``grad_values``) are two
batched matrix products and a pointwise pass, shared with the reference
(:func:`.naive.attention_score_grad`). The energy part, the only
one with an ``A`` factor, is one fused launch that recomputes
``u = tanh(q_t + K_j)`` tile by tile: grid ``(cdiv(S, BLOCK_S), B)``; the
program for source tile ``j`` loops over ``A`` chunks and all queries and forms
``g = grad_energy * v * (1 - u^2)``, writing ``grad_K[j] = sum_t g`` (it owns
those rows), its partial ``grad_q = sum_{j in tile} g`` and partial
``grad_v = sum grad_energy * u``; the partials over source tiles are summed
by torch afterwards (no atomics, deterministic).

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
from fastseq.ops.triton_utils import precision, tanh

__all__ = ["additive_attention_forward", "additive_attention_backward", "limits"]

_NEG = tl.constexpr(-1.0e30)  # running-max start: finite, so exp(m - m_new) never sees inf - inf


@triton.jit
def _energy_tile(
    q_ptr, k_ptr, e_ptr, offs_t, offs_s, mask_t, mask_s, A, stride_qt, stride_ks,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """``[BLOCK_T, BLOCK_S]`` fp32 scores v^T tanh(q_t + K_j), A in BLOCK_A chunks."""
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    for a0 in range(0, A, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        mask_a = offs_a < A
        q = tl.load(q_ptr + offs_t[:, None] * stride_qt + offs_a[None, :],
                    mask=mask_t[:, None] & mask_a[None, :], other=0.0).to(tl.float32)
        k = tl.load(k_ptr + offs_s[:, None] * stride_ks + offs_a[None, :],
                    mask=mask_s[:, None] & mask_a[None, :], other=0.0).to(tl.float32)
        v = tl.load(e_ptr + offs_a, mask=mask_a, other=0.0).to(tl.float32)
        u = tanh(q[:, None, :] + k[None, :, :])
        acc += tl.sum(u * v[None, None, :], axis=2)
    return acc


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


@triton.heuristics(
    {
        "HAS_MASK": lambda a: a["mask_ptr"] is not None,
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "USE_DOT": lambda a: a["BLOCK_T"] >= 16,
    }
)
@triton.jit
def _attention_fwd_kernel(
    q_ptr,  # [B, T, A] (last dim contiguous)
    k_ptr,  # [B, S, A] (last dim contiguous)
    v_ptr,  # [B, S, D] (last dim contiguous)
    e_ptr,  # [A]
    mask_ptr,  # [B, S] uint8 or None
    len_ptr,  # [B] int64 or None
    ctx_ptr,  # [B, T, D] out (contiguous)
    w_ptr,  # [B, T, S] out (contiguous)
    sc_ptr,  # [B, T, S] fp32 raw scores (contiguous; w_ptr itself when the weights are fp32)
    T, S, A, D,
    stride_qb, stride_qt, stride_kb, stride_ks, stride_vb, stride_vs, stride_mb,
    HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < D
    q_row = q_ptr + b * stride_qb
    k_row = k_ptr + b * stride_kb
    v_row = v_ptr + b * stride_vb
    w_rows = w_ptr + b * T * S + offs_t[:, None] * S
    sc_rows = sc_ptr + b * T * S + offs_t[:, None] * S
    write_w = pid_d == 0
    mask_tw = mask_t & ((offs_t * 0 + pid_d) == 0)  # rows whose weights this program writes

    m_i = tl.full((BLOCK_T,), _NEG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_s = offs_s < S
        valid = _valid_positions(mask_ptr, len_ptr, b, offs_s, S, stride_mb, HAS_MASK, HAS_LENGTHS)
        e = _energy_tile(q_row, k_row, e_ptr, offs_t, offs_s, mask_t, in_s, A, stride_qt, stride_ks,
                         BLOCK_T, BLOCK_S, BLOCK_A)
        e = tl.where(valid[None, :], e, float("-inf"))
        tl.store(sc_rows + offs_s[None, :], e, mask=mask_tw[:, None] & in_s[None, :])
        m_new = tl.maximum(m_i, tl.max(e, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(e - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vals = tl.load(v_row + offs_s[:, None] * stride_vs + offs_d[None, :],
                       mask=valid[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        if USE_DOT:
            pv = tl.dot(p, vals, input_precision=PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * vals[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    acc = acc / l_i[:, None]
    ctx_ptrs = ctx_ptr + (b * T + offs_t[:, None]) * D + offs_d[None, :]
    tl.store(ctx_ptrs, acc.to(ctx_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])
    if write_w:
        # Normalise the raw scores this program stored: weights = exp(e - logsumexp).
        tl.debug_barrier()
        lse = m_i + tl.log(l_i)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            wm = mask_t[:, None] & (offs_s < S)[None, :]
            e = tl.load(sc_rows + offs_s[None, :], mask=wm, other=float("-inf"))
            tl.store(w_rows + offs_s[None, :], tl.exp(e - lse[:, None]).to(w_ptr.dtype.element_ty),
                     mask=wm)


@triton.jit
def _attention_energy_bwd_kernel(
    q_ptr,  # [B, T, A] (last dim contiguous)
    k_ptr,  # [B, S, A] (last dim contiguous)
    e_ptr,  # [A]
    de_ptr,  # [B, T, S] fp32 contiguous: gradient w.r.t. the scores
    dk_ptr,  # [B, S, A] out (contiguous)
    dq_ptr,  # [n_s, B, T, A] fp32 out: per-source-tile partial grad_q
    dv_ptr,  # [n_s, B, A] fp32 out: per-source-tile partial grad of v
    B, T, S, A,
    stride_qb, stride_qt, stride_kb, stride_ks,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
):
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    q_row = q_ptr + b * stride_qb
    de_row = de_ptr + b * T * S
    dq_part = dq_ptr + (pid_s * B + b) * T * A
    for a0 in range(0, A, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        mask_a = offs_a < A
        k = tl.load(k_ptr + b * stride_kb + offs_s[:, None] * stride_ks + offs_a[None, :],
                    mask=mask_s[:, None] & mask_a[None, :], other=0.0).to(tl.float32)
        v = tl.load(e_ptr + offs_a, mask=mask_a, other=0.0).to(tl.float32)
        dk = tl.zeros((BLOCK_S, BLOCK_A), dtype=tl.float32)
        dv = tl.zeros((BLOCK_A,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask_t = offs_t < T
            q = tl.load(q_row + offs_t[:, None] * stride_qt + offs_a[None, :],
                        mask=mask_t[:, None] & mask_a[None, :], other=0.0).to(tl.float32)
            de = tl.load(de_row + offs_t[:, None] * S + offs_s[None, :],
                         mask=mask_t[:, None] & mask_s[None, :], other=0.0)
            u = tanh(q[:, None, :] + k[None, :, :])  # [BT, BS, BA]
            deu = de[:, :, None] * u
            g = (de[:, :, None] - deu * u) * v[None, None, :]  # de * (1 - u^2) * v
            dk += tl.sum(g, axis=0)
            dv += tl.sum(tl.sum(deu, axis=0), axis=0)
            tl.store(dq_part + offs_t[:, None] * A + offs_a[None, :], tl.sum(g, axis=1),
                     mask=mask_t[:, None] & mask_a[None, :])
        tl.store(dk_ptr + (b * S + offs_s[:, None]) * A + offs_a[None, :],
                 dk.to(dk_ptr.dtype.element_ty), mask=mask_s[:, None] & mask_a[None, :])
        tl.store(dv_ptr + (pid_s * B + b) * A + offs_a, dv, mask=mask_a)


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
    return triton.next_power_of_2(max(int(n), 1))


def _fwd_blocks(T: int, S: int, A: int, D: int) -> _Blocks:
    """Tile sizes (the one place they are chosen; not autotuned yet).

    ``BLOCK_T`` follows T (1 for a decoder step) up to 16, where ``p @ V`` switches
    to ``tl.dot``. The ``[BLOCK_T, BLOCK_S, BLOCK_A]`` tanh tile and the
    ``[BLOCK_T, BLOCK_S, BLOCK_D]`` broadcast product are kept at 4096 elements
    (32 fp32 registers per thread at 4 warps). Under the interpreter the tiles
    stay at 16 so the numpy emulation stays small and multi-tile paths run.
    """
    bt = min(_p2(T), 16)
    if interpreter_on():
        return _Blocks(bt, 16, 16, 16, 1)
    bs = min(_p2(S), 32)
    ba = max(4, min(_p2(A), 4096 // (bt * bs)))
    bd = 64 if bt >= 16 else max(16, min(_p2(D), 4096 // (bt * bs)))
    return _Blocks(bt, bs, ba, bd, 4)


def _bwd_blocks(T: int, S: int, A: int) -> _Blocks:
    bt = min(_p2(T), 16)
    if interpreter_on():
        return _Blocks(bt, 16, 16, 0, 1)
    bs = min(_p2(S), 64)
    ba = max(4, min(_p2(A), 4096 // (bt * bs)))
    return _Blocks(bt, bs, ba, 0, 4)


def limits(sizes: Mapping[str, int]) -> Optional[backend_limits.Unsupported]:
    """None if the attention kernels can take ``sizes`` = ``{"B", "T", "S", "A", "D",
    "extent"}`` (``extent``: the largest :func:`fastseq.backend.extent` of query,
    proj_keys and values, which may be strided views), else why not.

    Limits: B (grid axis 1, forward and backward) and the ``cdiv(D, BLOCK_D)``
    context slices (grid axis 2) at most ``MAX_GRID_YZ``; every tensor a launch
    indexes -- the inputs, ``weights [B, T, S]``, ``context [B, T, D]``, the
    backward's ``[n_s, B, T, A]`` partials -- within int32 offsets
    (:mod:`fastseq.backend.limits`).
    """
    B, T, S, A, D = sizes["B"], sizes["T"], sizes["S"], sizes["A"], sizes["D"]
    max_grid, max_index = backend_limits.MAX_GRID_YZ, backend_limits.MAX_INDEX
    if B > max_grid:
        return backend_limits.Unsupported("grid", f"B={B} batch rows on grid axis 1, past the limit {max_grid}")
    d_tiles = triton.cdiv(D, _fwd_blocks(T, S, A, D).BLOCK_D)
    if d_tiles > max_grid:
        return backend_limits.Unsupported(
            "grid", f"D={D}: {d_tiles} context slices on grid axis 2, past the limit {max_grid}"
        )
    n_s = triton.cdiv(S, _bwd_blocks(T, S, A).BLOCK_S)
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
) -> Tuple[Tensor, Tensor]:
    """Fused additive attention (one launch); arguments as the reference's.

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
    # Raw scores stay fp32 (half weights would round them before the softmax).
    scores = weights if weights.dtype == torch.float32 else torch.empty(
        (B, T, S), device=values.device, dtype=torch.float32)
    blk = _fwd_blocks(T, S, A, D)
    grid = (triton.cdiv(T, blk.BLOCK_T), B, triton.cdiv(D, blk.BLOCK_D))
    _fwd[grid](
        q, k, v, e, m, lens, context, weights, scores,
        T, S, A, D,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        0 if m is None else m.stride(0),
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
    """Gradients w.r.t. (query, proj_keys, values, energy); tanh(q + K) is recomputed."""
    B, T, A = query.shape
    S = proj_keys.shape[1]
    de, dvalues = attention_score_grad(grad_context, grad_weights, values, weights)
    de = de.float().contiguous()
    blk = _bwd_blocks(T, S, A)
    n_s = triton.cdiv(S, blk.BLOCK_S)
    dk = alloc.empty(proj_keys.shape, proj_keys)
    if B == 0 or T == 0 or S == 0 or A == 0:
        dk.zero_()
        return torch.zeros_like(query), dk, dvalues.to(values.dtype), torch.zeros_like(energy)
    dq = alloc.empty((n_s, B, T, A), query, torch.float32)
    dv = alloc.empty((n_s, B, A), query, torch.float32)
    q, k = _last_contiguous(query), _last_contiguous(proj_keys)
    _energy_bwd[(n_s, B)](
        q, k, energy.contiguous(), de, dk, dq, dv,
        B, T, S, A, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        BLOCK_T=blk.BLOCK_T, BLOCK_S=blk.BLOCK_S, BLOCK_A=blk.BLOCK_A, num_warps=blk.num_warps,
    )
    dq = dq[0] if n_s == 1 else dq.sum(0)
    return (dq.to(query.dtype), dk, dvalues.to(values.dtype),
            dv.sum((0, 1)).to(energy.dtype))
