r"""The teacher-forced Luong decoder recurrence (input feeding, additive scores) as one op.

The Luong et al. (2015, section 3.3) flow as Joey NMT's RecurrentDecoder, with
the attention scored additively (Bahdanau et al. 2015, eq. 6): for ``i = 1..T``,

.. math:: s_i = \mathrm{GRU}(x_i W_{ie}^\top + b_{ih} + a_{i-1} W_{ia}^\top,\ s_{i-1}),\quad
          c_i, \alpha_i = \mathrm{attention}(W_a s_i, K, V, v),\quad
          a_i = \tanh(W_{cs} s_i + W_{cc} c_i + b_c)

(``W_c = [W_cs | W_cc]`` is the attention-vector layer split into its state and
context columns). Two rewrites make a step three launches:

* **Projected values.** ``W_cc c_i = \sum_j \alpha_{ij} (W_cc V_j)`` (the weighted
  sum is linear), so ``V' = V W_cc^T`` ``[B, S, H]`` is computed once per source
  batch (like the keys ``K = U_a V``) and the attention runs on V' directly: its
  output is ``W_cc c_i``, and ``c_i`` itself is never formed (:func:`luong_gru_decode`
  does not return it; ``c_i = \alpha_i V`` when a caller wants it).
* **One product per step for three layers.** The query of step i, the
  attention-vector's state part of step i and the GRU's hidden projection of
  step i+1 all read s_i: ``[q_i; u_i; gh_{i+1}] = s_i [W_a; W_cs; W_hh]^T``.

A step is then::

    1. s_i = GRU(gi_emb_i + a_{i-1} W_ia^T, gh_i + b_hh, s_{i-1})    the context-cell implementation
    2. [q_i; u_i; gh_{i+1}] = s_i w_cat^T + [0; b_c; 0]               one GEMM (addmm)
    3. a_i = tanh(u_i + attention(q_i, K, V', v))                      the attention implementation
                                                                      (``out_bias = u_i``: the add
                                                                      and tanh in its epilogue)

(``gh_1 = s_0 W_hh^T`` is one more product before the loop.) The backend's
implementations of ``gru_context_cell`` and ``additive_attention`` (chosen once
per call from :mod:`fastseq.backend.registry`) are called directly, with no
custom-op call or autograd node per step, as in :mod:`.decode`. The backward
runs ``t = T-1 .. 0`` through their registered backward implementations (the
attention's backward is the plain one: ``grad x = grad a (1 - a^2)`` comes
first, one ``tanh_backward`` kernel) and ends with one product over all steps
for ``grad w_cat``.

Ops::

    fastseq::luong_gru_decode(gi_emb [B,T,3H], h0 [B,2H], proj_keys [B,S,A],
                              proj_values [B,S,H], w_cat [A+4H,H], b_att? [H], b_hh? [3H],
                              energy [A], w_ia [3H,H], mask? [B,S] bool, lengths? [B], save)
        -> (states [B,T,2H], weights [B,T,S], gates [T,B,4H] or [0], queries [T,B,A] or [0])
    fastseq::luong_gru_decode_backward(grad_states?, grad_weights?, h0, proj_keys, proj_values,
                                       w_cat, energy, w_ia, states, weights, gates, queries,
                                       has_att_bias, has_bias)
        -> (grad_gi_emb, grad_h0, grad_proj_keys, grad_proj_values, grad_w_cat,
            grad_b_att ([0] without), grad_b_hh ([0] without), grad_energy, grad_w_ia)

``h0`` and every row of ``states`` are ``[s; a]``: the decoder state the Luong
decoder carries (and beam search reorders) as one tensor. The gates and queries
are outputs only so that the backward can read them (a custom op's backward can
save only its inputs and outputs); :func:`luong_gru_decode` returns the first two.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fastseq.backend import alloc, graphs, registry, selection
from fastseq.backend.registry import direct_call_ok, needs_grad
from fastseq.ops import validation
from fastseq.ops.attention import op as attention_op
from fastseq.ops.decoder_step import cpp
from fastseq.ops.decoder_step import op as step_op

__all__ = ["LuongWeights", "luong_gru_decode", "luong_gru_decode_op", "luong_gru_decode_backward_op",
           "luong_decode_forward", "luong_decode_backward"]

OP, BACKWARD_OP = "luong_gru_decode", "luong_gru_decode_backward"
#: The loops' names in :mod:`fastseq.backend.registry` (as in :mod:`.decode`: the
#: Python loops on the reference and Triton backends, ``csrc/cpu/decode.cpp`` on
#: the C++ backend).
LOOP, BACKWARD_LOOP = "luong_gru_decode_loop", "luong_gru_decode_loop_backward"


class LuongWeights(NamedTuple):
    """The Luong decoder's weights arranged for :func:`luong_gru_decode`, built once per batch.

    w_cat ``[A + 4H, H]`` = ``[W_a; W_cs; W_hh]`` (the query layer, the state columns
    of the attention-vector layer, the GRU's hidden weights: one product per step),
    b_att ``[H]`` or None (the attention-vector layer's bias), b_hh ``[3H]`` or None,
    energy ``[A]`` = v, w_ia ``[3H, H]`` the columns of the GRU's ``W_ih`` that read
    the fed-back attention vector.
    """

    w_cat: Tensor
    b_att: Optional[Tensor]
    b_hh: Optional[Tensor]
    energy: Tensor
    w_ia: Tensor

    @classmethod
    def build(cls, query_weight: Tensor, att_state_weight: Tensor, w_hh: Tensor, b_att: Optional[Tensor],
              b_hh: Optional[Tensor], energy: Tensor, w_ia: Tensor,
              dtype: Optional[torch.dtype] = None) -> "LuongWeights":
        """Stack (and cast, if ``dtype``) once; autograd flows back to the parameters.

        ``att_state_weight``: ``W_cs`` ``[H, H]``, the first H columns of the
        attention-vector layer's weight ``W_c`` ``[H, H + D]``.
        """
        out = cls(torch.cat([query_weight, att_state_weight, w_hh]), b_att, b_hh, energy.reshape(-1),
                  w_ia.contiguous())
        if dtype is not None:
            out = cls(*(t.to(dtype) if t is not None else None for t in out))
        return out


def _bias_cat(b_att: Optional[Tensor], A: int, H: int) -> Optional[Tensor]:
    """``[0_A; b_att; 0_3H]``, the bias of the per-step product (None without b_att)."""
    if b_att is None:
        return None
    return torch.cat([b_att.new_zeros((A,)), b_att, b_att.new_zeros((3 * H,))])


def luong_decode_forward(
    gi_emb: Tensor, h0: Tensor, proj_keys: Tensor, proj_values: Tensor, w_cat: Tensor, b_att: Optional[Tensor],
    b_hh: Optional[Tensor], energy: Tensor, w_ia: Tensor, mask: Optional[Tensor], lengths: Optional[Tensor],
    save: bool, attention: Optional[Callable] = None, cell: Optional[Callable] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward loop; arguments and outputs as the op's (unchecked).

    ``attention`` / ``cell``: the step implementations (signatures of
    :func:`fastseq.ops.attention.naive.additive_attention_forward` and
    :func:`fastseq.ops.decoder_step.naive.gru_context_cell_forward`), run in the
    Python loop; both None: the registry's loop for these tensors (:data:`LOOP`:
    the C++ loop on the C++ backend, else the Python loop with the registry's
    step implementations, chosen at the first step).
    """
    B, T, _ = gi_emb.shape
    H, A, S = w_cat.shape[1], energy.shape[0], proj_keys.shape[1]
    if T == 0:
        return (alloc.empty((B, 0, 2 * H), h0), alloc.empty((B, 0, S), proj_values),
                gi_emb.new_empty((0, B, 4 * H) if save else (0,)), gi_emb.new_empty((0, B, A) if save else (0,)))
    args = (gi_emb, h0, proj_keys, proj_values, w_cat, b_att, b_hh, energy, w_ia, mask, lengths, save)
    if attention is None and cell is None:
        return registry.implementation(LOOP, proj_values, {"B": B, "S": S})(*args)
    return _python_forward(*args, attention=attention, cell=cell)


def _python_forward(
    gi_emb: Tensor, h0: Tensor, proj_keys: Tensor, proj_values: Tensor, w_cat: Tensor, b_att: Optional[Tensor],
    b_hh: Optional[Tensor], energy: Tensor, w_ia: Tensor, mask: Optional[Tensor], lengths: Optional[Tensor],
    save: bool, attention: Optional[Callable] = None, cell: Optional[Callable] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward loop in Python (T >= 1): the reference and Triton backends' implementation."""
    H, A = w_cat.shape[1], energy.shape[0]
    w_t = w_cat.t()
    bias = _bias_cat(b_att, A, H)
    s, a = h0[:, :H].contiguous(), h0[:, H:].contiguous()
    gh = s.mm(w_cat[A + H:].t())
    ss: List[Tensor] = []
    aa: List[Tensor] = []
    alphas: List[Tensor] = []
    gates: List[Tensor] = []
    queries: List[Tensor] = []
    for gi in gi_emb.unbind(1):
        if cell is None:
            cell = step_op.implementation(step_op.FORWARD, gi, s, a, gi, gh)
        s, g = cell(gi, a, w_ia, gh, b_hh, s, save)
        p = s.mm(w_t) if bias is None else torch.addmm(bias, s, w_t)
        q = p[:, :A].unsqueeze(1)
        if attention is None:
            attention = attention_op.implementation(attention_op.FORWARD, q, proj_keys, proj_values)
        a, alpha = attention(q, proj_keys, proj_values, energy, mask, lengths, p[:, A:A + H].unsqueeze(1))
        a = a.squeeze(1)
        gh = p[:, A + H:]
        ss.append(s)
        aa.append(a)
        alphas.append(alpha)
        if save:
            gates.append(g)
            queries.append(p[:, :A])
    states = torch.cat([torch.stack(ss, 1), torch.stack(aa, 1)], 2)
    weights = torch.cat(alphas, 1)
    if not save:
        empty = gi_emb.new_empty((0,))
        return states, weights, empty, empty.clone()
    return states, weights, torch.stack(gates), torch.stack(queries)


def luong_decode_backward(
    grad_states: Optional[Tensor], grad_weights: Optional[Tensor], h0: Tensor, proj_keys: Tensor,
    proj_values: Tensor, w_cat: Tensor, energy: Tensor, w_ia: Tensor, states: Tensor, weights: Tensor,
    gates: Tensor, queries: Tensor, has_att_bias: bool, has_bias: bool,
    attention: Optional[Callable] = None, cell: Optional[Callable] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward loop ``t = T-1 .. 0``; arguments and outputs as the backward op's (unchecked).

    ``attention`` / ``cell``: the step backward implementations (signatures of
    :func:`fastseq.ops.attention.naive.additive_attention_backward` and
    :func:`fastseq.ops.decoder_step.naive.gru_context_cell_backward`), run in the
    Python loop; both None: the registry's loop (:data:`BACKWARD_LOOP`).
    """
    B, T, H2 = states.shape
    H = H2 // 2
    if T == 0:
        return (h0.new_zeros((B, 0, 3 * H)), torch.zeros_like(h0), torch.zeros_like(proj_keys),
                torch.zeros_like(proj_values), torch.zeros_like(w_cat),
                w_cat.new_zeros((H,)) if has_att_bias else w_cat.new_empty((0,)),
                w_ia.new_zeros((3 * H,)) if has_bias else w_ia.new_empty((0,)), torch.zeros_like(energy),
                torch.zeros_like(w_ia))
    args = (grad_states, grad_weights, h0, proj_keys, proj_values, w_cat, energy, w_ia, states, weights, gates,
            queries, has_att_bias, has_bias)
    if attention is None and cell is None:
        return registry.implementation(BACKWARD_LOOP, proj_values, {"B": B, "S": proj_keys.shape[1]})(*args)
    return _python_backward(*args, attention=attention, cell=cell)


def _python_backward(
    grad_states: Optional[Tensor], grad_weights: Optional[Tensor], h0: Tensor, proj_keys: Tensor,
    proj_values: Tensor, w_cat: Tensor, energy: Tensor, w_ia: Tensor, states: Tensor, weights: Tensor,
    gates: Tensor, queries: Tensor, has_att_bias: bool, has_bias: bool,
    attention: Optional[Callable] = None, cell: Optional[Callable] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward loop in Python (T >= 1): the reference and Triton backends' implementation."""
    B, T, H2 = states.shape
    H, A = H2 // 2, energy.shape[0]
    d_keys, d_values = torch.zeros_like(proj_keys), torch.zeros_like(proj_values)
    d_energy, d_w_ia = torch.zeros_like(energy), torch.zeros_like(w_ia)
    d_batt = w_cat.new_zeros((H,)) if has_att_bias else w_cat.new_empty((0,))
    d_bhh = w_ia.new_zeros((3 * H,)) if has_bias else w_ia.new_empty((0,))
    # Step-major copies, so that every step's slice is contiguous.
    st = states.transpose(0, 1).contiguous()  # [T, B, 2H]: [s_i; a_i], i = 1..T
    ss, aa = st[:, :, :H], st[:, :, H:]
    ws = weights.transpose(0, 1).contiguous()
    gs = None if grad_states is None else grad_states.transpose(0, 1).contiguous()
    gw = None if grad_weights is None else grad_weights.transpose(0, 1).contiguous()
    s0, a0 = h0[:, :H].contiguous(), h0[:, H:].contiguous()
    d_gi: List[Tensor] = [h0] * T
    d_p: List[Tensor] = [h0] * T
    ds = da = None
    dgh = w_cat.new_zeros((B, 3 * H))  # grad of gh_{T+1}: not used by any step
    for t in range(T - 1, -1, -1):
        # grads of s_{t+1} and a_{t+1}: from the next step (carried) and from the outputs
        if gs is not None:
            ds = gs[t, :, :H] if ds is None else ds + gs[t, :, :H]
            da = gs[t, :, H:] if da is None else da + gs[t, :, H:]
        if ds is None:
            ds = torch.zeros_like(s0)
        if da is None:
            dx = torch.zeros_like(s0)
        else:
            dx = torch.ops.aten.tanh_backward(da, aa[t])  # da (1 - a^2): through a = tanh(x), one kernel
        q = queries[t].unsqueeze(1)
        if attention is None:
            attention = attention_op.implementation(attention_op.BACKWARD, q, proj_keys, proj_values)
        dq, dk, dv, de = attention(dx.unsqueeze(1), None if gw is None else gw[t].unsqueeze(1), q, proj_keys,
                                   proj_values, energy, ws[t].unsqueeze(1))
        dp = torch.cat([dq.squeeze(1), dx, dgh], 1)
        ds = ds.addmm(dp, w_cat)  # + grad through [q; u; gh] = s w_cat^T
        d_p[t] = dp
        d_keys.add_(dk)
        d_values.add_(dv)
        d_energy.add_(de)
        if has_att_bias:
            d_batt.add_(dx.sum(0))
        s_prev = s0 if t == 0 else ss[t - 1]
        a_prev = a0 if t == 0 else aa[t - 1]
        if cell is None:
            cell = step_op.implementation(step_op.BACKWARD, gates, s_prev, a_prev)
        dgi, da, dw, dgh, db, ds = cell(ds, gates[t], s_prev, a_prev, w_ia, has_bias)
        d_gi[t] = dgi
        d_w_ia.add_(dw)
        if has_bias:
            d_bhh.add_(db)
    # gh_1 = s_0 W_hh^T, the product before the loop.
    w_hh = w_cat[A + H:]
    d_s0 = ds.addmm(dgh, w_hh)
    # grad w_cat = sum_t dp_t^T s_{t+1} (one product over all steps) + the W_hh rows' dgh_1^T s_0.
    d_w_cat = torch.stack(d_p).reshape(T * B, -1).t().mm(ss.reshape(T * B, H))
    d_w_cat[A + H:].addmm_(dgh.t(), s0)
    d_h0 = torch.cat([d_s0, da], 1)
    return (torch.stack(d_gi, 1), d_h0, d_keys, d_values, d_w_cat.to(w_cat.dtype), d_batt, d_bhh, d_energy,
            d_w_ia)


# Each loop is one call per sequence, so on CUDA with FASTSEQ_CUDA_GRAPHS=1 a repeated shape
# replays it as one CUDA graph (:class:`fastseq.backend.graphs.GraphCache`).
registry.register(LOOP, "reference", graphs.GraphCache(_python_forward, f"{OP} (reference)"))
registry.register(BACKWARD_LOOP, "reference", graphs.GraphCache(_python_backward, f"{BACKWARD_OP} (reference)"))
registry.register(LOOP, "cpp", cpp.loop_implementation("luong_gru_decode_forward"))
registry.register(BACKWARD_LOOP, "cpp", cpp.loop_implementation("luong_gru_decode_backward"))
registry.register(LOOP, "triton", graphs.GraphCache(_python_forward, f"{OP} (triton)"))
registry.register(BACKWARD_LOOP, "triton", graphs.GraphCache(_python_backward, f"{BACKWARD_OP} (triton)"))


@torch.library.custom_op(f"fastseq::{OP}", mutates_args=())
def luong_gru_decode_op(
    gi_emb: Tensor, h0: Tensor, proj_keys: Tensor, proj_values: Tensor, w_cat: Tensor, b_att: Optional[Tensor],
    b_hh: Optional[Tensor], energy: Tensor, w_ia: Tensor, mask: Optional[Tensor], lengths: Optional[Tensor],
    save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unchecked op; see :func:`luong_gru_decode` and :func:`luong_decode_forward`."""
    return luong_decode_forward(gi_emb, h0, proj_keys, proj_values, w_cat, b_att, b_hh, energy, w_ia, mask,
                                lengths, save)


@luong_gru_decode_op.register_fake
def _(gi_emb, h0, proj_keys, proj_values, w_cat, b_att, b_hh, energy, w_ia, mask, lengths, save):
    B, T, _ = gi_emb.shape
    H, A, S = w_cat.shape[1], energy.shape[0], proj_keys.shape[1]
    return (h0.new_empty((B, T, 2 * H)), proj_values.new_empty((B, T, S)),
            gi_emb.new_empty((T, B, 4 * H) if save else (0,)), gi_emb.new_empty((T, B, A) if save else (0,)))


@torch.library.custom_op(f"fastseq::{BACKWARD_OP}", mutates_args=())
def luong_gru_decode_backward_op(
    grad_states: Optional[Tensor], grad_weights: Optional[Tensor], h0: Tensor, proj_keys: Tensor,
    proj_values: Tensor, w_cat: Tensor, energy: Tensor, w_ia: Tensor, states: Tensor, weights: Tensor,
    gates: Tensor, queries: Tensor, has_att_bias: bool, has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``luong_gru_decode``: grads w.r.t. gi_emb, h0, proj_keys, proj_values, w_cat,
    b_att ([0] without), b_hh ([0] without), energy, w_ia."""
    return luong_decode_backward(grad_states, grad_weights, h0, proj_keys, proj_values, w_cat, energy, w_ia,
                                 states, weights, gates, queries, has_att_bias, has_bias)


@luong_gru_decode_backward_op.register_fake
def _(grad_states, grad_weights, h0, proj_keys, proj_values, w_cat, energy, w_ia, states, weights, gates,
      queries, has_att_bias, has_bias):
    B, T, H2 = states.shape
    H = H2 // 2
    return (gates.new_empty((B, T, 3 * H)), torch.empty_like(h0), torch.empty_like(proj_keys),
            torch.empty_like(proj_values), torch.empty_like(w_cat), w_cat.new_empty((H,) if has_att_bias else (0,)),
            w_ia.new_empty((3 * H,) if has_bias else (0,)), torch.empty_like(energy), torch.empty_like(w_ia))


def _setup_context(ctx, inputs, output):
    gi_emb, h0, proj_keys, proj_values, w_cat, b_att, b_hh, energy, w_ia, _mask, _lengths, save = inputs
    states, weights, gates, queries = output
    ctx.save = save
    ctx.has_att_bias = b_att is not None
    ctx.has_bias = b_hh is not None
    ctx.backend = selection.forced()
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h0, proj_keys, proj_values, w_cat, energy, w_ia, states, weights, gates, queries)


def _backward(ctx, grad_states, grad_weights, _grad_gates, _grad_queries):
    if not ctx.save:
        raise RuntimeError(
            "fastseq::luong_gru_decode was called with save=False, so it cannot be differentiated; "
            "call it with save=True when gradients are needed"
        )
    h0, proj_keys, proj_values, w_cat, energy, w_ia, states, weights, gates, queries = ctx.saved_tensors
    with selection.backend(ctx.backend):
        d_gi, d_h0, d_k, d_v, d_w, d_batt, d_bhh, d_e, d_wia = luong_gru_decode_backward_op(
            grad_states, grad_weights, h0, proj_keys, proj_values, w_cat, energy, w_ia, states, weights, gates,
            queries, ctx.has_att_bias, ctx.has_bias,
        )
    return (d_gi, d_h0, d_k, d_v, d_w, (d_batt if ctx.has_att_bias else None), (d_bhh if ctx.has_bias else None),
            d_e, d_wia, None, None, None)


torch.library.register_autograd(f"fastseq::{OP}", _backward, setup_context=_setup_context)


def luong_gru_decode(
    gi_emb: Tensor,
    h0: Tensor,
    proj_keys: Tensor,
    proj_values: Tensor,
    weights: LuongWeights,
    mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    r"""The teacher-forced Luong GRU decoder (input feeding, additive attention) over T steps, one op.

    For ``i = 1..T`` with ``[s_0; a_0] = h0`` (see the module docstring):

    .. math:: s_i = \mathrm{GRU}(x_i W_{ie}^\top + b_{ih} + a_{i-1} W_{ia}^\top,\ s_{i-1}),\quad
              \alpha_i = \mathrm{softmax}_j(v^\top \tanh(W_a s_i + K_j)),\quad
              a_i = \tanh(W_{cs} s_i + \textstyle\sum_j \alpha_{ij} V'_j + b_c)

    with ``V' = V W_cc^T``: the same as ``a_i = tanh(W_c [s_i; c_i] + b_c)``,
    ``c_i = \sum_j \alpha_{ij} V_j`` (Luong et al. 2015, eq. 5; Bahdanau et al. 2015,
    eq. 6 for the scores). Differentiable in every tensor argument.

    Args:
        gi_emb: ``[B, T, 3H]`` the embedding part of the GRU input projection for
            every step, with ``b_ih`` (gate order r, z, n).
        h0: ``[B, 2H]`` = ``[s_0; a_0]``.
        proj_keys: ``[B, S, A]`` = ``U_a V`` (encoder states V).
        proj_values: ``[B, S, H]`` = ``V W_cc^T`` (no bias).
        weights: :class:`LuongWeights` (w_cat ``[A + 4H, H]``, b_att ``[H]`` or None,
            b_hh ``[3H]`` or None, energy ``[A]``, w_ia ``[3H, H]``).
        mask: bool ``[B, S]``, True at valid source positions; or
        lengths: int ``[B]`` source lengths; at most one (neither: all valid).

    All floating tensors share one dtype (float32, float64, float16, bfloat16; half
    inputs are computed in float32 inside the cell and the attention) and device.

    Returns:
        states ``[B, T, 2H]`` (``[s_i; a_i]``, i = 1..T) and attention weights ``[B, T, S]``.

    Raises:
        fastseq.ops.validation.ArgumentTypeError: ``weights`` is not a
            :class:`LuongWeights`, or an argument is not a tensor.
        ValueError: both ``mask`` and ``lengths``.
        RuntimeError: a shape, dtype or device that does not fit; a zero-length
            source or a length > S (each message names the argument, the expected
            and the actual value).
    """
    if not isinstance(weights, LuongWeights):
        raise validation.ArgumentTypeError(
            f"weights: expected a LuongWeights (LuongWeights.build(...)), got {type(weights).__name__}")
    for name, t in (("gi_emb", gi_emb), ("h0", h0), ("proj_keys", proj_keys), ("proj_values", proj_values),
                    ("weights.w_cat", weights.w_cat), ("weights.energy", weights.energy),
                    ("weights.w_ia", weights.w_ia)):
        validation.tensor(name, t)
    validation.optional_tensor("weights.b_att", weights.b_att)
    validation.optional_tensor("weights.b_hh", weights.b_hh)
    w_cat, b_att, b_hh, energy, w_ia = weights
    if energy.dim() == 2 and energy.shape[0] == 1:
        energy = energy.reshape(-1)
    if energy.dim() != 1:
        raise RuntimeError(f"weights.energy: expected a 1-D tensor [A], got shape {tuple(energy.shape)}")
    A = energy.shape[0]
    if w_cat.dim() != 2 or w_cat.shape[0] != A + 4 * w_cat.shape[1]:
        raise RuntimeError(f"weights.w_cat: expected a 2-D tensor (A + 4*H, H) with A = {A} "
                           f"(from weights.energy), got shape {tuple(w_cat.shape)}")
    H = w_cat.shape[1]
    if gi_emb.dim() != 3 or gi_emb.shape[2] != 3 * H:
        raise RuntimeError(f"gi_emb: expected a 3-D tensor (B, T, 3*H) = (B, T, {3 * H}) "
                           f"(H from weights.w_cat), got shape {tuple(gi_emb.shape)}")
    B, T = gi_emb.shape[:2]
    validation.shape("h0", h0, (B, 2 * H), "(B, 2*H) = ")
    if proj_keys.dim() != 3 or proj_keys.shape[0] != B or proj_keys.shape[2] != A:
        raise RuntimeError(f"proj_keys: expected shape ({B}, S, {A}), got {tuple(proj_keys.shape)}")
    S = proj_keys.shape[1]
    validation.shape("proj_values", proj_values, (B, S, H), "(B, S, H) = ")
    validation.shape("weights.w_ia", w_ia, (3 * H, H), "(3*H, H) = ")
    if b_att is not None:
        validation.shape("weights.b_att", b_att, (H,), "(H,) = ")
    if b_hh is not None:
        validation.shape("weights.b_hh", b_hh, (3 * H,), "(3*H,) = ")
    validation.floating("gi_emb", gi_emb)
    others = (("h0", h0), ("proj_keys", proj_keys), ("proj_values", proj_values), ("weights.w_cat", w_cat),
              ("weights.energy", energy), ("weights.w_ia", w_ia))
    optional = tuple((n, t) for n, t in (("weights.b_att", b_att), ("weights.b_hh", b_hh)) if t is not None)
    for name, t in others + optional:
        validation.like(name, t, gi_emb, "gi_emb")
    if S == 0 and B > 0:
        raise RuntimeError("proj_keys: the source is empty (S = 0); every source needs at least one position")
    validation.source(mask, lengths, B, S, proj_values.device)
    if lengths is not None:
        lengths = lengths.to(proj_values.device)
    args = (gi_emb, h0, proj_keys, proj_values, w_cat, b_att, b_hh, energy, w_ia, mask, lengths)
    save = needs_grad(gi_emb, h0, proj_keys, proj_values, w_cat, b_att, b_hh, energy, w_ia)
    if not save and direct_call_ok():
        out = luong_decode_forward(*args, False)
    else:
        out = luong_gru_decode_op(*args, save)
    return out[0], out[1]
