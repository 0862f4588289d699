"""Additive (Bahdanau) attention as a torch.library custom op.

Ops (see :mod:`fastseq.ops.reference` for the equations)::

    fastseq::additive_attention(query [B,T,A], proj_keys [B,S,A], values [B,S,D],
                                energy [A], mask? [B,S] bool, lengths? [B])
        -> (context [B,T,D], weights [B,T,S])
    fastseq::additive_attention_backward(grad_context, grad_weights?, query,
                                         proj_keys, values, energy, weights)
        -> (grad_query, grad_proj_keys, grad_values, grad_energy)

Both have fake implementations (``torch.compile(fullgraph=True)`` traces them)
and the forward's autograd formula calls the backward op. The backward
recomputes ``tanh(q + K)`` instead of saving it: only ``weights`` is saved.
The fused Triton kernels (:mod:`fastseq.ops.triton.attention`) run on CUDA
tensors; the reference elsewhere (:func:`fastseq._backend.select`).

:func:`additive_attention` is the validated functional entry point.
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastseq import _backend
from fastseq.ops import _checks
from fastseq.ops._dispatch import direct_call_ok, implementation

__all__ = ["additive_attention", "check_source"]


def _impl(query: Tensor, proj_keys: Tensor, values: Tensor):
    """The module implementing the attention for these (3-D query) inputs; a shape a
    fused backend cannot take falls back (:func:`fastseq.ops._dispatch.implementation`)."""
    def sizes():
        B, T, A = query.shape
        return {"B": B, "T": T, "S": proj_keys.shape[1], "A": A, "D": values.shape[2],
                "extent": max(_backend.extent(query), _backend.extent(proj_keys), _backend.extent(values))}

    return implementation(values, "attention", sizes)


@torch.library.custom_op("fastseq::additive_attention", mutates_args=())
def additive_attention_op(
    query: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    energy: Tensor,
    mask: Optional[Tensor],
    lengths: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Unchecked op: query ``[B,T,A]`` -> context ``[B,T,D]``, weights ``[B,T,S]``."""
    mod, kw = _impl(query, proj_keys, values)
    return mod.additive_attention_forward(query, proj_keys, values, energy, mask, lengths, **kw)


@additive_attention_op.register_fake
def _(query, proj_keys, values, energy, mask, lengths):
    B, T, _ = query.shape
    S, D = values.shape[1], values.shape[2]
    return values.new_empty((B, T, D)), values.new_empty((B, T, S))


@torch.library.custom_op("fastseq::additive_attention_backward", mutates_args=())
def additive_attention_backward_op(
    grad_context: Tensor,
    grad_weights: Optional[Tensor],
    query: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    energy: Tensor,
    weights: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``additive_attention``: grads w.r.t. query, proj_keys, values, energy."""
    mod, kw = _impl(query, proj_keys, values)
    return mod.additive_attention_backward(
        grad_context, grad_weights, query, proj_keys, values, energy, weights, **kw
    )


@additive_attention_backward_op.register_fake
def _(grad_context, grad_weights, query, proj_keys, values, energy, weights):
    return (torch.empty_like(query), torch.empty_like(proj_keys), torch.empty_like(values),
            torch.empty_like(energy))


def _setup_context(ctx, inputs, output):
    query, proj_keys, values, energy, _mask, _lengths = inputs
    _context, weights = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, proj_keys, values, energy, weights)


def _backward(ctx, grad_context, grad_weights):
    query, proj_keys, values, energy, weights = ctx.saved_tensors
    if grad_context is None:
        B, T, _ = query.shape
        grad_context = values.new_zeros((B, T, values.shape[2]))
    dq, dk, dv, de = additive_attention_backward_op(
        grad_context.contiguous(), grad_weights, query, proj_keys, values, energy, weights
    )
    return dq, dk, dv, de, None, None


torch.library.register_autograd(
    "fastseq::additive_attention", _backward, setup_context=_setup_context
)


# ------------------------------------------------------------------ validation

# Masks already checked for empty sources. A decoder passes the same tensor at
# every step, so the check (a device-to-host sync) runs once per source batch,
# not per step; a mask or lengths tensor is treated as immutable once passed in
# (lengths use the same per-tensor cache, fastseq.ops._checks.value_range).
_CHECKED: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()


def check_source(mask: Optional[Tensor], lengths: Optional[Tensor], B: int, S: int,
                 device: torch.device) -> None:
    """Validate a source mask or lengths.

    Raises:
        ValueError: both given; wrong shape; a zero-length source (a row of
            ``mask`` with no True entry, or ``lengths`` < 1); ``lengths`` > S.
        TypeError: ``mask`` / ``lengths`` is not a tensor; ``mask`` is not bool,
            or ``lengths`` is not an int32/int64 tensor.
        RuntimeError: ``mask`` not on ``device``; ``lengths`` neither on the CPU
            nor on ``device``.
    """
    _checks.optional_tensor("mask", mask)
    _checks.optional_tensor("lengths", lengths)
    if mask is not None and lengths is not None:
        raise ValueError("mask, lengths: pass at most one of them")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != (B, S):
            raise ValueError(f"mask: expected shape (B, S) = {(B, S)}, got {tuple(mask.shape)}")
        if mask.device != device:
            raise RuntimeError(f"mask: expected device {device} (that of values), got {mask.device}")
    if lengths is not None:
        _checks.lengths_layout("lengths", lengths, B, device)
    t = mask if mask is not None else lengths
    if t is None or B == 0 or torch.compiler.is_compiling() or "meta" in (t.device.type, device.type):
        return
    if mask is not None:
        if _CHECKED.get(id(t)) is t:
            return
        if not bool(mask.any(dim=1).all()):
            row = int((~mask.any(dim=1)).nonzero()[0, 0])
            raise ValueError(f"mask: row {row} has no True entry (a zero-length source); "
                             "every source needs at least one position")
        _CHECKED[id(t)] = t
    else:
        lo, hi = _checks.value_range(lengths)
        if lo < 1:
            raise ValueError(f"lengths: every source needs length >= 1 (zero-length source), got min {lo}")
        if hi > S:
            raise ValueError(f"lengths: expected values <= S = {S}, got max {hi}")


def additive_attention(
    query: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    energy: Tensor,
    mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Additive attention with precomputed key projections (Bahdanau et al. 2015, eq. 6).

    .. math:: e_{tj} = v^\top \tanh(q_t + K_j),\quad
              \alpha_{tj} = \mathrm{softmax}_j(e_{tj}),\quad c_t = \sum_j \alpha_{tj} V_j

    Args:
        query: ``[B, A]`` (one query per row, e.g. ``W_a s_{i-1}``) or ``[B, T, A]``
            (the multi-query form: T queries per row that do not depend on each other).
        proj_keys: ``[B, S, A]`` projected keys ``U_a h``, computed once per source batch.
        values: ``[B, S, D]`` (usually the encoder states h).
        energy: the energy vector v, ``[A]`` or ``[1, A]`` (an ``nn.Linear(A, 1)`` weight).
        mask: bool ``[B, S]``, True at valid source positions; or
        lengths: int ``[B]``, valid positions ``j < lengths[b]``. At most one of the two;
            neither: every position is valid.

    All floating tensors share one dtype (float32, float64, float16, bfloat16) and
    device. Half inputs are computed in float32.

    Returns:
        context ``[B, D]`` or ``[B, T, D]``, and weights ``[B, S]`` or ``[B, T, S]``
        (zero at invalid positions, rows sum to 1), in the input dtype.

    Raises:
        ValueError: a shape that does not fit, or a zero-length source.
        TypeError / RuntimeError: a dtype / device that does not fit.
        (Each message names the argument, the expected and the actual value.)
        A non-tensor argument gives a TypeError naming it.
    """
    for name, t in (("query", query), ("proj_keys", proj_keys), ("values", values), ("energy", energy)):
        _checks.tensor(name, t)
    if proj_keys.dim() != 3:
        raise ValueError(f"proj_keys: expected a 3-D tensor [B, S, A], got shape {tuple(proj_keys.shape)}")
    B, S, A = proj_keys.shape
    single = query.dim() == 2
    if query.dim() not in (2, 3) or query.shape[0] != B or query.shape[-1] != A:
        raise ValueError(f"query: expected shape ({B}, {A}) or ({B}, T, {A}), got {tuple(query.shape)}")
    if values.dim() != 3 or tuple(values.shape[:2]) != (B, S):
        raise ValueError(f"values: expected shape ({B}, {S}, D), got {tuple(values.shape)}")
    if energy.dim() == 2 and energy.shape[0] == 1:
        energy = energy.reshape(-1)
    if tuple(energy.shape) != (A,):
        raise ValueError(f"energy: expected shape ({A},) or (1, {A}), got {tuple(energy.shape)}")
    if not values.is_floating_point():
        raise TypeError(f"values: expected a floating-point dtype, got {values.dtype}")
    for name, t in (("query", query), ("proj_keys", proj_keys), ("energy", energy)):
        if t.dtype != values.dtype:
            raise TypeError(f"{name}: expected dtype {values.dtype} (that of values), got {t.dtype}")
        if t.device != values.device:
            raise RuntimeError(f"{name}: expected device {values.device} (that of values), got {t.device}")
    if S == 0 and B > 0:
        raise ValueError("proj_keys: the source is empty (S = 0); every source needs at least one position")
    check_source(mask, lengths, B, S, values.device)
    if lengths is not None:
        lengths = lengths.to(values.device)
    q = query.unsqueeze(1) if single else query
    if direct_call_ok(q, proj_keys, values, energy):
        mod, kw = _impl(q, proj_keys, values)
        context, weights = mod.additive_attention_forward(q, proj_keys, values, energy, mask, lengths, **kw)
    else:
        context, weights = additive_attention_op(q, proj_keys, values, energy, mask, lengths)
    if single:
        return context.squeeze(1), weights.squeeze(1)
    return context, weights
