"""Additive (Bahdanau) attention as a torch.library custom op, its registrations, and the functional API.

Ops (:mod:`.naive` has the equations)::

    fastseq::additive_attention(query [B,T,A], proj_keys [B,S,A], values [B,S,D],
                                energy [A], mask? [B,S] bool, lengths? [B])
        -> (context [B,T,D], weights [B,T,S])
    fastseq::additive_attention_backward(grad_context, grad_weights?, query,
                                         proj_keys, values, energy, weights)
        -> (grad_query, grad_proj_keys, grad_values, grad_energy)

Both have fake implementations (``torch.compile(fullgraph=True)`` traces them)
and the forward's autograd formula calls the backward op under the backend
setting of the forward. The backward recomputes ``tanh(q + K)`` instead of
saving it: only ``weights`` is saved. Implementations, one per backend, in the
registry: :mod:`.naive`, :mod:`.triton` (imported on first use), :mod:`.cpp`.

:func:`additive_attention` is the validated functional entry point.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastseq.backend import registry, selection
from fastseq.backend.limits import extent
from fastseq.backend.registry import Implementation, direct_call_ok
from fastseq.ops import validation
from fastseq.ops.attention import cpp, naive

__all__ = ["additive_attention", "additive_attention_op", "additive_attention_backward_op", "implementation"]

FORWARD, BACKWARD = "additive_attention", "additive_attention_backward"


def _triton():
    """The Triton kernels, imported on first use."""
    from fastseq.ops.attention import triton as kernels

    return kernels


registry.register(FORWARD, "reference", naive.additive_attention_forward)
registry.register(FORWARD, "cpp", Implementation(cpp.additive_attention_forward, limits=cpp.limits,
                                                 limited_devices=("cuda",)))
registry.register(FORWARD, "triton", Implementation(
    load=lambda: (_triton().additive_attention_forward, _triton().limits)))
registry.register(BACKWARD, "reference", naive.additive_attention_backward)
registry.register(BACKWARD, "cpp", Implementation(cpp.additive_attention_backward, limits=cpp.limits,
                                                  limited_devices=("cuda",)))
registry.register(BACKWARD, "triton", Implementation(
    load=lambda: (_triton().additive_attention_backward, _triton().limits)))


def implementation(op: str, query: Tensor, proj_keys: Tensor, values: Tensor):
    """The registered implementation of ``op`` (:data:`FORWARD` or :data:`BACKWARD`) that
    runs for these (3-D query) inputs; a shape a fused backend cannot take falls
    back (:func:`fastseq.backend.registry.choose`). The decoder loops call it once
    per sequence and then call the implementation at every step."""
    def sizes():
        B, T, A = query.shape
        return {"B": B, "T": T, "S": proj_keys.shape[1], "A": A, "D": values.shape[2],
                "extent": max(extent(query), extent(proj_keys), extent(values))}

    return registry.implementation(op, values, sizes)


@torch.library.custom_op(f"fastseq::{FORWARD}", mutates_args=())
def additive_attention_op(
    query: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    energy: Tensor,
    mask: Optional[Tensor],
    lengths: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Unchecked op: query ``[B,T,A]`` -> context ``[B,T,D]``, weights ``[B,T,S]``."""
    return implementation(FORWARD, query, proj_keys, values)(query, proj_keys, values, energy, mask, lengths)


@additive_attention_op.register_fake
def _(query, proj_keys, values, energy, mask, lengths):
    B, T, _ = query.shape
    S, D = values.shape[1], values.shape[2]
    return values.new_empty((B, T, D)), values.new_empty((B, T, S))


@torch.library.custom_op(f"fastseq::{BACKWARD}", mutates_args=())
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
    fn = implementation(BACKWARD, query, proj_keys, values)
    return fn(grad_context, grad_weights, query, proj_keys, values, energy, weights)


@additive_attention_backward_op.register_fake
def _(grad_context, grad_weights, query, proj_keys, values, energy, weights):
    return (torch.empty_like(query), torch.empty_like(proj_keys), torch.empty_like(values),
            torch.empty_like(energy))


def _setup_context(ctx, inputs, output):
    query, proj_keys, values, energy, _mask, _lengths = inputs
    _context, weights = output
    ctx.set_materialize_grads(False)
    ctx.backend = selection.forced()
    ctx.save_for_backward(query, proj_keys, values, energy, weights)


def _backward(ctx, grad_context, grad_weights):
    query, proj_keys, values, energy, weights = ctx.saved_tensors
    if grad_context is None:
        B, T, _ = query.shape
        grad_context = values.new_zeros((B, T, values.shape[2]))
    with selection.backend(ctx.backend):
        dq, dk, dv, de = additive_attention_backward_op(
            grad_context.contiguous(), grad_weights, query, proj_keys, values, energy, weights
        )
    return dq, dk, dv, de, None, None


torch.library.register_autograd(f"fastseq::{FORWARD}", _backward, setup_context=_setup_context)


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
        fastseq.ops.validation.ArgumentTypeError: an argument that is not a tensor.
        ValueError: both ``mask`` and ``lengths``.
        RuntimeError: a shape, dtype or device that does not fit; a zero-length
            source; a length > S. (Each message names the argument, the expected
            and the actual value.)
    """
    for name, t in (("query", query), ("proj_keys", proj_keys), ("values", values), ("energy", energy)):
        validation.tensor(name, t)
    if proj_keys.dim() != 3:
        raise RuntimeError(f"proj_keys: expected a 3-D tensor [B, S, A], got shape {tuple(proj_keys.shape)}")
    B, S, A = proj_keys.shape
    single = query.dim() == 2
    if query.dim() not in (2, 3) or query.shape[0] != B or query.shape[-1] != A:
        raise RuntimeError(f"query: expected shape ({B}, {A}) or ({B}, T, {A}), got {tuple(query.shape)}")
    if values.dim() != 3 or tuple(values.shape[:2]) != (B, S):
        raise RuntimeError(f"values: expected shape ({B}, {S}, D), got {tuple(values.shape)}")
    if energy.dim() == 2 and energy.shape[0] == 1:
        energy = energy.reshape(-1)
    if tuple(energy.shape) != (A,):
        raise RuntimeError(f"energy: expected shape ({A},) or (1, {A}), got {tuple(energy.shape)}")
    validation.floating("values", values)
    for name, t in (("query", query), ("proj_keys", proj_keys), ("energy", energy)):
        validation.like(name, t, values, "values")
    if S == 0 and B > 0:
        raise RuntimeError("proj_keys: the source is empty (S = 0); every source needs at least one position")
    validation.source(mask, lengths, B, S, values.device)
    if lengths is not None:
        lengths = lengths.to(values.device)
    q = query.unsqueeze(1) if single else query
    if direct_call_ok(q, proj_keys, values, energy):
        context, weights = implementation(FORWARD, q, proj_keys, values)(q, proj_keys, values, energy, mask, lengths)
    else:
        context, weights = additive_attention_op(q, proj_keys, values, energy, mask, lengths)
    if single:
        return context.squeeze(1), weights.squeeze(1)
    return context, weights
