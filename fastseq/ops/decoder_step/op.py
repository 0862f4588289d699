"""The fused step of a GRU decoder with additive attention.

Decoder step i (Bahdanau et al. 2015, appendix A; GRU of Cho et al. 2014): the
previous state s_{i-1} is the attention query; the GRU input is ``[E y_{i-1}; c_i]``.
With ``W_ih = [W_ie | W_ic]`` split into embedding and context columns, the
embedding part ``gi_emb = E y W_ie^T + b_ih`` is computed for every step before
the loop (one matrix product), and a step is three kernel launches::

    1. [q; gh] = s_{i-1} [W_a; W_hh]^T                    one GEMM (cuBLAS), no bias
    2. c_i, alpha_i = additive_attention(q, K, V, v)      fastseq::additive_attention
    3. s_i = GRU(gi_emb + c_i W_ic^T, gh + b_hh, s_{i-1})  fastseq::gru_context_cell

(``b_hh`` is added inside step 3, so step 1 is a plain matrix product: one
cuBLAS kernel, no bias copy.)

Ops::

    fastseq::gru_context_cell(gi [B,3H], context [B,D], w_ic [3H,D], gh [B,3H],
                              b_hh? [3H], h [B,H], save_gates) -> (h' [B,H], gates [B,4H])
    fastseq::gru_context_cell_backward(grad_h, gates, h, context, w_ic, has_bias)
        -> (grad_gi, grad_context, grad_w_ic, grad_gh, grad_b_hh, grad_h)

Autograd differentiates the step exactly: step 1 is a native matrix product,
steps 2 and 3 have registered backward ops (run under the backend setting of
the forward). The cell's implementations, one per backend, are in the registry:
:mod:`.naive`, :mod:`.triton` (imported on first use), :mod:`.cpp`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fastseq.backend import registry, selection
from fastseq.backend.limits import extent
from fastseq.backend.registry import Implementation, direct_call_ok, needs_grad
from fastseq.ops import validation
from fastseq.ops.attention import additive_attention
from fastseq.ops.decoder_step import cpp, naive

__all__ = ["StepWeights", "attention_gru_step", "check_step_weights", "step_sizes", "gru_context_cell",
           "gru_context_cell_op", "gru_context_cell_backward_op", "implementation"]

FORWARD, BACKWARD = "gru_context_cell", "gru_context_cell_backward"


def _triton():
    """The Triton kernels, imported on first use."""
    from fastseq.ops.decoder_step import triton as kernels

    return kernels


registry.register(FORWARD, "reference", naive.gru_context_cell_forward)
registry.register(FORWARD, "cpp", cpp.gru_context_cell_forward)
registry.register(FORWARD, "triton", Implementation(
    load=lambda: (_triton().gru_context_cell_forward, _triton().limits)))
registry.register(BACKWARD, "reference", naive.gru_context_cell_backward)
registry.register(BACKWARD, "cpp", cpp.gru_context_cell_backward)
registry.register(BACKWARD, "triton", Implementation(
    load=lambda: (_triton().gru_context_cell_backward, _triton().limits)))


def implementation(op: str, t: Tensor, h: Tensor, context: Tensor, *strided: Tensor):
    """The registered implementation of ``op`` (:data:`FORWARD` or :data:`BACKWARD`) that
    runs for these inputs (``strided``: the row-strided ones the kernels read in
    place); a shape a fused backend cannot take falls back. The decoder loops call
    it once per sequence and then call the implementation at every step."""
    def sizes():
        B, H = h.shape
        return {"B": B, "H": H, "D": context.shape[1],
                "extent": max([extent(h)] + [extent(x) for x in strided])}

    return registry.implementation(op, t, sizes)


@torch.library.custom_op(f"fastseq::{FORWARD}", mutates_args=())
def gru_context_cell_op(
    gi: Tensor, context: Tensor, w_ic: Tensor, gh: Tensor, b_hh: Optional[Tensor], h: Tensor,
    save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """Unchecked op; see :func:`.naive.gru_context_cell_forward`."""
    return implementation(FORWARD, gi, h, context, gi, gh)(gi, context, w_ic, gh, b_hh, h, save_gates)


@gru_context_cell_op.register_fake
def _(gi, context, w_ic, gh, b_hh, h, save_gates):
    B, H = h.shape
    return gi.new_empty((B, H)), gi.new_empty((B, 4 * H) if save_gates else (0,))


@torch.library.custom_op(f"fastseq::{BACKWARD}", mutates_args=())
def gru_context_cell_backward_op(
    grad_h: Tensor, gates: Tensor, h: Tensor, context: Tensor, w_ic: Tensor, has_bias: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``gru_context_cell``: grads w.r.t. gi, context, w_ic, gh, b_hh ([0] without bias), h."""
    return implementation(BACKWARD, gates, h, context)(grad_h, gates, h, context, w_ic, has_bias)


@gru_context_cell_backward_op.register_fake
def _(grad_h, gates, h, context, w_ic, has_bias):
    B, H = h.shape
    db = w_ic.new_empty((3 * H,) if has_bias else (0,))
    return (gates.new_empty((B, 3 * H)), torch.empty_like(context), torch.empty_like(w_ic),
            gates.new_empty((B, 3 * H)), db, torch.empty_like(h))


def _setup_context(ctx, inputs, output):
    gi, context, w_ic, gh, b_hh, h, save_gates = inputs
    ctx.save_gates = save_gates
    ctx.has_bias = b_hh is not None
    ctx.backend = selection.forced()
    ctx.save_for_backward(context, w_ic, h, output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the (never used) gates output


def _backward(ctx, grad_h, _grad_gates):
    if not ctx.save_gates:
        raise RuntimeError(
            "fastseq::gru_context_cell was called with save_gates=False, so it cannot be "
            "differentiated; call it with save_gates=True when gradients are needed"
        )
    context, w_ic, h, gates = ctx.saved_tensors
    grad_h = torch.zeros_like(h) if grad_h is None else grad_h
    with selection.backend(ctx.backend):
        dgi, dctx, dw, dgh, db, dh = gru_context_cell_backward_op(
            grad_h.contiguous(), gates, h, context, w_ic, ctx.has_bias
        )
    return dgi, dctx, dw, dgh, (db if ctx.has_bias else None), dh, None


torch.library.register_autograd(f"fastseq::{FORWARD}", _backward, setup_context=_setup_context)


def gru_context_cell(gi: Tensor, context: Tensor, w_ic: Tensor, gh: Tensor,
                     b_hh: Optional[Tensor], h: Tensor) -> Tensor:
    """One GRU step whose input projection is ``gi + context W_ic^T`` (gate order r, z, n).

    With ``a = gh + b_hh``: ``r = σ(gi_r + c W_ic,r^T + a_r)``, ``z = σ(...)``,
    ``n = tanh(gi_n + c W_ic,n^T + r * a_n)``, ``h' = (1 - z) n + z h``
    (torch.nn.GRUCell's equations with the input projection split in two).

    Args:
        gi: ``[B, 3H]`` the rest of the input projection (with ``b_ih``).
        context: ``[B, D]``. w_ic: ``[3H, D]``.
        gh: ``[B, 3H]`` = ``h W_hh^T`` (a column slice of a wider matrix is fine).
        b_hh: ``[3H]`` or None. h: ``[B, H]`` the previous state.

    Returns:
        h' ``[B, H]`` in the input dtype.

    Raises:
        fastseq.ops.validation.ArgumentTypeError: an argument that is not a tensor.
        RuntimeError: a shape, dtype or device that does not fit (the message names
        the argument, the expected and the actual value).
    """
    for name, t in (("gi", gi), ("context", context), ("w_ic", w_ic), ("gh", gh), ("h", h)):
        validation.tensor(name, t)
    validation.optional_tensor("b_hh", b_hh)
    if h.dim() != 2:
        raise RuntimeError(f"h: expected a 2-D tensor [B, H], got shape {tuple(h.shape)}")
    B, H = h.shape
    if context.dim() != 2 or context.shape[0] != B:
        raise RuntimeError(f"context: expected shape ({B}, D), got {tuple(context.shape)}")
    D = context.shape[1]
    validation.shape("gi", gi, (B, 3 * H))
    validation.shape("gh", gh, (B, 3 * H))
    validation.shape("w_ic", w_ic, (3 * H, D))
    validation.floating("gi", gi)
    if b_hh is not None:
        validation.shape("b_hh", b_hh, (3 * H,))
    others = (("context", context), ("w_ic", w_ic), ("gh", gh), ("h", h))
    for name, t in others + ((("b_hh", b_hh),) if b_hh is not None else ()):
        validation.like(name, t, gi, "gi")
    save = needs_grad(gi, context, w_ic, gh, b_hh, h)
    if not save and direct_call_ok():
        return implementation(FORWARD, gi, h, context, gi, gh)(gi, context, w_ic, gh, b_hh, h, False)[0]
    return gru_context_cell_op(gi, context, w_ic, gh, b_hh, h, save)[0]


class StepWeights(NamedTuple):
    """The decoder's weights arranged for :func:`attention_gru_step`, built once per batch.

    w_cat ``[A + 3H, H]`` = ``[W_a; W_hh]`` (stacked, so the query and the
    hidden projection are one product), b_hh ``[3H]`` or None, energy ``[A]`` = v,
    w_ic ``[3H, D]`` the context columns of ``W_ih``.
    """

    w_cat: Tensor
    b_hh: Optional[Tensor]
    energy: Tensor
    w_ic: Tensor

    @classmethod
    def build(cls, query_weight: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], energy: Tensor,
              w_ic: Tensor, dtype: Optional[torch.dtype] = None) -> "StepWeights":
        """Stack (and cast, if ``dtype``) once; autograd flows back to the parameters."""
        out = cls(torch.cat([query_weight, w_hh]), b_hh, energy.reshape(-1), w_ic.contiguous())
        if dtype is not None:
            out = cls(*(t.to(dtype) if t is not None else None for t in out))
        return out


def check_step_weights(weights) -> None:
    """Raise ArgumentTypeError unless ``weights`` is a :class:`StepWeights`."""
    if not isinstance(weights, StepWeights):
        raise validation.ArgumentTypeError(
            f"weights: expected a StepWeights (StepWeights.build(...)), got {type(weights).__name__}")


def step_sizes(w_cat: Tensor, energy: Tensor) -> Tuple[int, int]:
    """(A, H) of the stacked weights ``w_cat`` ``[A + 3H, H]`` and ``energy`` ``[A]``.

    Raises:
        RuntimeError: ``energy`` is not 1-D, or ``w_cat`` is not ``(A + 3*H, H)``.
    """
    if energy.dim() != 1:
        raise RuntimeError(f"weights.energy: expected a 1-D tensor [A], got shape {tuple(energy.shape)}")
    A = energy.shape[0]
    if w_cat.dim() != 2 or w_cat.shape[0] != A + 3 * w_cat.shape[1]:
        raise RuntimeError(f"weights.w_cat: expected a 2-D tensor (A + 3*H, H) with A = {A} "
                           f"(from weights.energy), got shape {tuple(w_cat.shape)}")
    return A, w_cat.shape[1]


def attention_gru_step(
    gi: Tensor,
    h: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    weights: StepWeights,
    mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One decoder step in three launches (see the module docstring).

    Args:
        gi: ``[B, 3H]`` embedding part of the GRU input projection (with ``b_ih``).
        h: ``[B, H]`` the previous state s_{i-1}.
        proj_keys: ``[B, S, A]`` = U_a h_enc; values: ``[B, S, D]``.
        weights: :class:`StepWeights`. mask / lengths: as :func:`additive_attention`.

    Returns:
        s_i ``[B, H]``, context c_i ``[B, D]``, attention weights ``[B, S]``.

    Raises:
        fastseq.ops.validation.ArgumentTypeError: ``weights`` is not a
        :class:`StepWeights`, or an argument is not a tensor.
        ValueError / RuntimeError: as :func:`additive_attention` and :func:`gru_context_cell`.
    """
    check_step_weights(weights)
    validation.tensor("h", h)
    w_cat = weights.w_cat
    A, _ = step_sizes(w_cat, weights.energy)
    if h.dim() != 2:
        raise RuntimeError(f"h: expected a 2-D tensor [B, H], got shape {tuple(h.shape)}")
    if h.shape[1] != w_cat.shape[1]:
        raise RuntimeError(f"h: expected shape (B, H) = ({h.shape[0]}, {w_cat.shape[1]}) "
                           f"(H from weights.w_cat), got {tuple(h.shape)}")
    validation.like("h", h, w_cat, "weights.w_cat")
    p = h @ weights.w_cat.t()
    context, alpha = additive_attention(p[:, :A], proj_keys, values, weights.energy, mask, lengths)
    return gru_context_cell(gi, context, weights.w_ic, p[:, A:], weights.b_hh, h), context, alpha
