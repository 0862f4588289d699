"""The teacher-forced decoder recurrence as one op (Bahdanau et al. 2015, appendix A).

In training the decoder's inputs are known for every step (teacher forcing), so
the whole recurrence ``s_0 -> s_1 .. s_T`` is one call::

    for i in 1..T:
        [q; gh] = s_{i-1} [W_a; W_hh]^T                         one matrix product
        c_i, alpha_i = additive_attention(q, K, V, v, mask)     the attention implementation
        s_i = GRU(gi_emb_i + c_i W_ic^T, gh + b_hh, s_{i-1})   the context-cell implementation

Op::

    fastseq::attention_gru_decode(gi_emb [B,T,3H], h0 [B,H], proj_keys [B,S,A], values [B,S,D],
                                  w_cat [A+3H,H], b_hh? [3H], energy [A], w_ic [3H,D],
                                  mask? [B,S] bool, lengths? [B], save)
        -> (states [B,T,H], contexts [B,T,D], weights [B,T,S],
            gates [T,B,4H] or [0], queries [T,B,A] or [0])
    fastseq::attention_gru_decode_backward(grad_states?, grad_contexts?, grad_weights?, gi_emb, h0,
                                           proj_keys, values, w_cat, energy, w_ic, states, contexts,
                                           weights, gates, queries, has_bias)
        -> (grad_gi_emb, grad_h0, grad_proj_keys, grad_values, grad_w_cat,
            grad_b_hh ([0] without bias), grad_energy, grad_w_ic)

The step is the same three computations as :func:`fastseq.ops.attention_gru_step`,
but the loop runs inside one custom op: the backend's implementations of
``additive_attention`` and ``gru_context_cell`` (:mod:`fastseq.backend.registry`,
chosen once per call) are called directly at every step, with no torch.library
dispatch and no autograd node per step. The forward saves, per step, the GRU
gates (``r, z, n, gh_n + b_hn``), the attention query and the attention weights;
the backward runs ``t = T-1 .. 0`` through the registered backward
implementations of the two ops, carrying ``grad s_{t-1}``, and accumulates the
gradients of the shared tensors (``proj_keys``, ``values``, ``energy``, ``w_ic``,
``b_hh``); ``grad w_cat`` is one matrix product over all steps after the loop.

The gates and queries are the op's last two outputs only because a custom op's
backward can save only its inputs and outputs; :func:`attention_gru_decode`
returns the first three. ``torch.compile`` traces the op (fake implementations
of both ops).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from fastseq.backend import alloc, graphs, registry, selection
from fastseq.backend.registry import direct_call_ok, needs_grad
from fastseq.ops import validation
from fastseq.ops.attention import op as attention_op
from fastseq.ops.decoder_step import cpp
from fastseq.ops.decoder_step import op as step_op
from fastseq.ops.decoder_step.op import StepWeights

__all__ = ["attention_gru_decode", "attention_gru_decode_op", "attention_gru_decode_backward_op",
           "decode_forward", "decode_backward"]

OP, BACKWARD_OP = "attention_gru_decode", "attention_gru_decode_backward"
#: The loops' names in :mod:`fastseq.backend.registry`: the reference and Triton
#: backends run the Python loops below (each step's implementations chosen by the
#: registry), the C++ backend its loop in C++ (``csrc/cpu/decode.cpp``).
LOOP, BACKWARD_LOOP = "attention_gru_decode_loop", "attention_gru_decode_loop_backward"


def _attention(op: str, q: Tensor, proj_keys: Tensor, values: Tensor) -> Callable:
    """The implementation :func:`fastseq.ops.additive_attention` would run for one step."""
    return attention_op.implementation(op, q, proj_keys, values)


def _cell(op: str, like: Tensor, h: Tensor, context: Tensor, *strided: Tensor) -> Callable:
    """The implementation :func:`fastseq.ops.gru_context_cell` would run for one step."""
    return step_op.implementation(op, like, h, context, *strided)


def decode_forward(
    gi_emb: Tensor, h0: Tensor, proj_keys: Tensor, values: Tensor, w_cat: Tensor, b_hh: Optional[Tensor],
    energy: Tensor, w_ic: Tensor, mask: Optional[Tensor], lengths: Optional[Tensor], save: bool,
    attention: Optional[Callable] = None, cell: Optional[Callable] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward loop; arguments and outputs as the op's (unchecked).

    ``attention`` / ``cell``: the step implementations (signatures of
    :func:`fastseq.ops.attention.naive.additive_attention_forward` and
    :func:`fastseq.ops.decoder_step.naive.gru_context_cell_forward`), run in the
    Python loop; both None: the registry's loop for these tensors (:data:`LOOP`:
    the C++ loop on the C++ backend, else the Python loop with the registry's
    step implementations, chosen at the first step).
    """
    B, T, _ = gi_emb.shape
    H, A = h0.shape[1], energy.shape[0]
    S, D = values.shape[1], values.shape[2]
    if T == 0:
        return (alloc.empty((B, 0, H), h0), alloc.empty((B, 0, D), values), alloc.empty((B, 0, S), values),
                gi_emb.new_empty((0, B, 4 * H) if save else (0,)), gi_emb.new_empty((0, B, A) if save else (0,)))
    args = (gi_emb, h0, proj_keys, values, w_cat, b_hh, energy, w_ic, mask, lengths, save)
    if attention is None and cell is None:
        return registry.implementation(LOOP, values, {"B": B, "S": S})(*args)
    return _python_forward(*args, attention=attention, cell=cell)


def _python_forward(
    gi_emb: Tensor, h0: Tensor, proj_keys: Tensor, values: Tensor, w_cat: Tensor, b_hh: Optional[Tensor],
    energy: Tensor, w_ic: Tensor, mask: Optional[Tensor], lengths: Optional[Tensor], save: bool,
    attention: Optional[Callable] = None, cell: Optional[Callable] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward loop in Python (T >= 1): the reference and Triton backends' implementation."""
    A = energy.shape[0]
    w_t = w_cat.t()
    h = h0
    states: List[Tensor] = []
    contexts: List[Tensor] = []
    alphas: List[Tensor] = []
    gates: List[Tensor] = []
    queries: List[Tensor] = []
    for gi in gi_emb.unbind(1):
        p = h.mm(w_t)
        q = p[:, :A].unsqueeze(1)
        if attention is None:
            attention = _attention(attention_op.FORWARD, q, proj_keys, values)
        c, alpha = attention(q, proj_keys, values, energy, mask, lengths)
        c = c.squeeze(1)
        gh = p[:, A:]
        if cell is None:
            cell = _cell(step_op.FORWARD, gi, h, c, gi, gh)
        h, g = cell(gi, c, w_ic, gh, b_hh, h, save)
        states.append(h)
        contexts.append(c)
        alphas.append(alpha)
        if save:
            gates.append(g)
            queries.append(p[:, :A])
    out_states, out_contexts, out_weights = torch.stack(states, 1), torch.stack(contexts, 1), torch.cat(alphas, 1)
    if not save:
        empty = gi_emb.new_empty((0,))
        return out_states, out_contexts, out_weights, empty, empty.clone()
    return out_states, out_contexts, out_weights, torch.stack(gates), torch.stack(queries)


def decode_backward(
    grad_states: Optional[Tensor], grad_contexts: Optional[Tensor], grad_weights: Optional[Tensor],
    gi_emb: Tensor, h0: Tensor, proj_keys: Tensor, values: Tensor, w_cat: Tensor, energy: Tensor, w_ic: Tensor,
    states: Tensor, contexts: Tensor, weights: Tensor, gates: Tensor, queries: Tensor, has_bias: bool,
    attention: Optional[Callable] = None, cell: Optional[Callable] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward loop ``t = T-1 .. 0``; arguments and outputs as the backward op's (unchecked).

    ``attention`` / ``cell``: the step backward implementations (signatures of
    :func:`fastseq.ops.attention.naive.additive_attention_backward` and
    :func:`fastseq.ops.decoder_step.naive.gru_context_cell_backward`), run in the
    Python loop; both None: the registry's loop (:data:`BACKWARD_LOOP`).
    """
    B, T, H = states.shape
    if T == 0:
        return (torch.zeros_like(gi_emb), torch.zeros_like(h0), torch.zeros_like(proj_keys),
                torch.zeros_like(values), torch.zeros_like(w_cat),
                w_ic.new_zeros((3 * H,)) if has_bias else w_ic.new_empty((0,)), torch.zeros_like(energy),
                torch.zeros_like(w_ic))
    args = (grad_states, grad_contexts, grad_weights, gi_emb, h0, proj_keys, values, w_cat, energy, w_ic, states,
            contexts, weights, gates, queries, has_bias)
    if attention is None and cell is None:
        return registry.implementation(BACKWARD_LOOP, values, {"B": B, "S": values.shape[1]})(*args)
    return _python_backward(*args, attention=attention, cell=cell)


def _python_backward(
    grad_states: Optional[Tensor], grad_contexts: Optional[Tensor], grad_weights: Optional[Tensor],
    gi_emb: Tensor, h0: Tensor, proj_keys: Tensor, values: Tensor, w_cat: Tensor, energy: Tensor, w_ic: Tensor,
    states: Tensor, contexts: Tensor, weights: Tensor, gates: Tensor, queries: Tensor, has_bias: bool,
    attention: Optional[Callable] = None, cell: Optional[Callable] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward loop in Python (T >= 1): the reference and Triton backends' implementation."""
    B, T, H = states.shape
    d_keys, d_values = torch.zeros_like(proj_keys), torch.zeros_like(values)
    d_energy, d_w_ic = torch.zeros_like(energy), torch.zeros_like(w_ic)
    d_b = w_ic.new_zeros((3 * H,)) if has_bias else w_ic.new_empty((0,))
    # Step-major copies, so that every step's slice is contiguous.
    hs = states.transpose(0, 1).contiguous()  # [T, B, H]: s_1 .. s_T
    cs = contexts.transpose(0, 1).contiguous()
    ws = weights.transpose(0, 1).contiguous()
    gs = None if grad_states is None else grad_states.transpose(0, 1).contiguous()
    gc = None if grad_contexts is None else grad_contexts.transpose(0, 1).contiguous()
    gw = None if grad_weights is None else grad_weights.transpose(0, 1).contiguous()
    d_gi: List[Tensor] = [gi_emb] * T
    d_p: List[Tensor] = [gi_emb] * T
    dh = None
    for t in range(T - 1, -1, -1):
        h_prev = h0 if t == 0 else hs[t - 1]
        if dh is None:
            dh = torch.zeros_like(h0) if gs is None else gs[t]
        elif gs is not None:
            dh = dh + gs[t]
        c = cs[t]
        if cell is None:
            cell = _cell(step_op.BACKWARD, gates, h_prev, c)
        dgi, dctx, dw, dgh, db, dh_direct = cell(dh, gates[t], h_prev, c, w_ic, has_bias)
        if gc is not None:
            dctx = dctx + gc[t]
        q = queries[t].unsqueeze(1)
        if attention is None:
            attention = _attention(attention_op.BACKWARD, q, proj_keys, values)
        dq, dk, dv, de = attention(dctx.unsqueeze(1), None if gw is None else gw[t].unsqueeze(1), q, proj_keys,
                                   values, energy, ws[t].unsqueeze(1))
        dp = torch.cat([dq.squeeze(1), dgh], 1)
        dh = dh_direct.addmm(dp, w_cat)
        d_gi[t], d_p[t] = dgi, dp
        d_keys.add_(dk)
        d_values.add_(dv)
        d_energy.add_(de)
        d_w_ic.add_(dw)
        if has_bias:
            d_b.add_(db)
    # grad w_cat = sum_t dp_t^T s_{t-1}: one product over all steps.
    prev = torch.cat([h0.unsqueeze(0), hs[:-1]]).reshape(T * B, H)
    d_w_cat = torch.stack(d_p).reshape(T * B, -1).t().mm(prev).to(w_cat.dtype)
    return torch.stack(d_gi, 1), dh, d_keys, d_values, d_w_cat, d_b, d_energy, d_w_ic


# Each loop is one call per sequence, so on CUDA with FASTSEQ_CUDA_GRAPHS=1 a repeated shape
# replays it as one CUDA graph (:class:`fastseq.backend.graphs.GraphCache`).
registry.register(LOOP, "reference", graphs.GraphCache(_python_forward, f"{OP} (reference)"))
registry.register(BACKWARD_LOOP, "reference", graphs.GraphCache(_python_backward, f"{BACKWARD_OP} (reference)"))
registry.register(LOOP, "cpp", cpp.loop_implementation("attention_gru_decode_forward"))
registry.register(BACKWARD_LOOP, "cpp", cpp.loop_implementation("attention_gru_decode_backward"))
registry.register(LOOP, "triton", graphs.GraphCache(_python_forward, f"{OP} (triton)"))
registry.register(BACKWARD_LOOP, "triton", graphs.GraphCache(_python_backward, f"{BACKWARD_OP} (triton)"))


@torch.library.custom_op(f"fastseq::{OP}", mutates_args=())
def attention_gru_decode_op(
    gi_emb: Tensor, h0: Tensor, proj_keys: Tensor, values: Tensor, w_cat: Tensor, b_hh: Optional[Tensor],
    energy: Tensor, w_ic: Tensor, mask: Optional[Tensor], lengths: Optional[Tensor], save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Unchecked op; see :func:`attention_gru_decode` and :func:`decode_forward`."""
    return decode_forward(gi_emb, h0, proj_keys, values, w_cat, b_hh, energy, w_ic, mask, lengths, save)


@attention_gru_decode_op.register_fake
def _(gi_emb, h0, proj_keys, values, w_cat, b_hh, energy, w_ic, mask, lengths, save):
    B, T, _ = gi_emb.shape
    H, A = h0.shape[1], energy.shape[0]
    S, D = values.shape[1], values.shape[2]
    return (h0.new_empty((B, T, H)), values.new_empty((B, T, D)), values.new_empty((B, T, S)),
            gi_emb.new_empty((T, B, 4 * H) if save else (0,)), gi_emb.new_empty((T, B, A) if save else (0,)))


@torch.library.custom_op(f"fastseq::{BACKWARD_OP}", mutates_args=())
def attention_gru_decode_backward_op(
    grad_states: Optional[Tensor], grad_contexts: Optional[Tensor], grad_weights: Optional[Tensor],
    gi_emb: Tensor, h0: Tensor, proj_keys: Tensor, values: Tensor, w_cat: Tensor, energy: Tensor, w_ic: Tensor,
    states: Tensor, contexts: Tensor, weights: Tensor, gates: Tensor, queries: Tensor, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``attention_gru_decode``: grads w.r.t. gi_emb, h0, proj_keys, values, w_cat,
    b_hh ([0] without bias), energy, w_ic."""
    return decode_backward(grad_states, grad_contexts, grad_weights, gi_emb, h0, proj_keys, values, w_cat, energy,
                           w_ic, states, contexts, weights, gates, queries, has_bias)


@attention_gru_decode_backward_op.register_fake
def _(grad_states, grad_contexts, grad_weights, gi_emb, h0, proj_keys, values, w_cat, energy, w_ic, states,
      contexts, weights, gates, queries, has_bias):
    H = h0.shape[1]
    return (torch.empty_like(gi_emb), torch.empty_like(h0), torch.empty_like(proj_keys), torch.empty_like(values),
            torch.empty_like(w_cat), w_ic.new_empty((3 * H,) if has_bias else (0,)), torch.empty_like(energy),
            torch.empty_like(w_ic))


def _setup_context(ctx, inputs, output):
    gi_emb, h0, proj_keys, values, w_cat, b_hh, energy, w_ic, _mask, _lengths, save = inputs
    states, contexts, weights, gates, queries = output
    ctx.save = save
    ctx.has_bias = b_hh is not None
    ctx.backend = selection.forced()
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gi_emb, h0, proj_keys, values, w_cat, energy, w_ic, states, contexts, weights, gates,
                          queries)


def _backward(ctx, grad_states, grad_contexts, grad_weights, _grad_gates, _grad_queries):
    if not ctx.save:
        raise RuntimeError(
            "fastseq::attention_gru_decode was called with save=False, so it cannot be differentiated; "
            "call it with save=True when gradients are needed"
        )
    gi_emb, h0, proj_keys, values, w_cat, energy, w_ic, states, contexts, weights, gates, queries = ctx.saved_tensors
    with selection.backend(ctx.backend):
        d_gi, d_h0, d_k, d_v, d_w, d_b, d_e, d_wic = attention_gru_decode_backward_op(
            grad_states, grad_contexts, grad_weights, gi_emb, h0, proj_keys, values, w_cat, energy, w_ic,
            states, contexts, weights, gates, queries, ctx.has_bias,
        )
    return d_gi, d_h0, d_k, d_v, d_w, (d_b if ctx.has_bias else None), d_e, d_wic, None, None, None


torch.library.register_autograd(f"fastseq::{OP}", _backward, setup_context=_setup_context)


def attention_gru_decode(
    gi_emb: Tensor,
    h0: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    weights: StepWeights,
    mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The teacher-forced GRU decoder with additive attention over T steps, one op.

    Bahdanau, Cho & Bengio 2015, appendix A (GRU of Cho et al. 2014): for
    ``i = 1..T``, with ``s_0 = h0``,

    .. math:: q_i = W_a s_{i-1},\quad
              c_i, \alpha_i = \mathrm{attention}(q_i, K, V, v),\quad
              s_i = \mathrm{GRU}(x_i W_{ie}^\top + b_{ih} + c_i W_{ic}^\top,\ s_{i-1})

    Equal to T calls of :func:`fastseq.ops.attention_gru_step` (same backend,
    same math, outputs and gradients), without a custom-op call and autograd
    node per step (see the module docstring).

    Args:
        gi_emb: ``[B, T, 3H]`` the embedding part of the GRU input projection for
            every step, with ``b_ih`` (gate order r, z, n).
        h0: ``[B, H]`` the initial state s_0.
        proj_keys: ``[B, S, A]`` = U_a h_enc; values: ``[B, S, D]`` (the encoder states).
        weights: :class:`StepWeights` (w_cat ``[A + 3H, H]``, b_hh ``[3H]`` or None,
            energy ``[A]``, w_ic ``[3H, D]``).
        mask: bool ``[B, S]``, True at valid source positions; or
        lengths: int ``[B]`` source lengths; at most one (neither: all valid).

    All floating tensors share one dtype (float32, float64, float16, bfloat16; half
    inputs are computed in float32 inside each step, as the step ops) and device.

    Returns:
        states ``[B, T, H]`` (s_1 .. s_T), contexts ``[B, T, D]`` (c_1 .. c_T),
        attention weights ``[B, T, S]``; all differentiable.

    Raises:
        fastseq.ops.validation.ArgumentTypeError: ``weights`` is not a
            :class:`StepWeights`, or an argument is not a tensor.
        ValueError: both ``mask`` and ``lengths``.
        RuntimeError: a shape, dtype or device that does not fit; a zero-length
            source or a length > S (each message names the argument, the expected
            and the actual value).
    """
    step_op.check_step_weights(weights)
    for name, t in (("gi_emb", gi_emb), ("h0", h0), ("proj_keys", proj_keys), ("values", values),
                    ("weights.w_cat", weights.w_cat), ("weights.energy", weights.energy),
                    ("weights.w_ic", weights.w_ic)):
        validation.tensor(name, t)
    validation.optional_tensor("weights.b_hh", weights.b_hh)
    w_cat, b_hh, energy, w_ic = weights
    if energy.dim() == 2 and energy.shape[0] == 1:
        energy = energy.reshape(-1)
    A, H = step_op.step_sizes(w_cat, energy)
    if gi_emb.dim() != 3 or gi_emb.shape[2] != 3 * H:
        raise RuntimeError(f"gi_emb: expected a 3-D tensor (B, T, 3*H) = (B, T, {3 * H}) "
                           f"(H from weights.w_cat), got shape {tuple(gi_emb.shape)}")
    B, T = gi_emb.shape[:2]
    validation.shape("h0", h0, (B, H), "(B, H) = ")
    if proj_keys.dim() != 3 or proj_keys.shape[0] != B or proj_keys.shape[2] != A:
        raise RuntimeError(f"proj_keys: expected shape ({B}, S, {A}), got {tuple(proj_keys.shape)}")
    S = proj_keys.shape[1]
    if values.dim() != 3 or tuple(values.shape[:2]) != (B, S):
        raise RuntimeError(f"values: expected shape ({B}, {S}, D), got {tuple(values.shape)}")
    D = values.shape[2]
    validation.shape("weights.w_ic", w_ic, (3 * H, D), "(3*H, D) = ")
    if b_hh is not None:
        validation.shape("weights.b_hh", b_hh, (3 * H,), "(3*H,) = ")
    validation.floating("gi_emb", gi_emb)
    others = (("h0", h0), ("proj_keys", proj_keys), ("values", values), ("weights.w_cat", w_cat),
              ("weights.energy", energy), ("weights.w_ic", w_ic))
    for name, t in others + ((("weights.b_hh", b_hh),) if b_hh is not None else ()):
        validation.like(name, t, gi_emb, "gi_emb")
    if S == 0 and B > 0:
        raise RuntimeError("proj_keys: the source is empty (S = 0); every source needs at least one position")
    validation.source(mask, lengths, B, S, values.device)
    if lengths is not None:
        lengths = lengths.to(values.device)
    args = (gi_emb, h0, proj_keys, values, w_cat, b_hh, energy, w_ic, mask, lengths)
    save = needs_grad(gi_emb, h0, proj_keys, values, w_cat, b_hh, energy, w_ic)
    if not save and direct_call_ok():
        out = decode_forward(*args, False)
    else:
        out = attention_gru_decode_op(*args, save)
    return out[0], out[1], out[2]
