"""Plain-PyTorch reference of additive (Bahdanau) attention, written for clarity.

Additive attention with precomputed key projections (Bahdanau, Cho & Bengio
2015, eq. 6; the query and keys already projected: q = W_a s, K = U_a h)::

    energy[b, t, j] = v^T tanh(q[b, t] + K[b, j])
    weights[b, t]   = softmax_j(energy[b, t, j])   over valid positions j
    context[b, t]   = sum_j weights[b, t, j] V[b, j]

Queries are always ``[B, T, A]`` here (T = 1 for one decoder step; T > 1 is the
multi-query form for queries that do not depend on the previous step). The
ground truth of :mod:`.triton` and :mod:`.cpp`, with their signatures and
outputs. :func:`attention_score_grad` (the softmax and weighted-sum part of the
backward) is shared with the Triton backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastseq.backend.alloc import compute_dtype


def source_mask(mask: Optional[Tensor], lengths: Optional[Tensor], B: int, S: int,
                device: torch.device) -> Optional[Tensor]:
    """bool ``[B, S]`` valid positions from a mask or lengths (None: all valid)."""
    if mask is not None:
        return mask.to(device)
    if lengths is not None:
        return torch.arange(S, device=device)[None, :] < lengths.to(device)[:, None]
    return None


def additive_attention_forward(
    query: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    energy: Tensor,
    mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    out_bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Additive attention, every query against every source position.

    Args:
        query: ``[B, T, A]`` projected queries q = W_a s.
        proj_keys: ``[B, S, A]`` projected keys K = U_a h.
        values: ``[B, S, D]`` values V (encoder states).
        energy: ``[A]`` the energy vector v.
        mask: bool ``[B, S]``, True at valid positions; or ``lengths`` int ``[B]``
            (positions ``j < lengths[b]`` are valid); neither: all valid.
        out_bias: ``[B, T, D]`` (any strides) or None. Given, the first output is
            ``tanh(out_bias + context)`` instead of the context: the attention
            vector of the Luong flow when ``values`` are projected
            (:mod:`fastseq.ops.decoder_step.luong`). Not part of the public op.

    Returns:
        context ``[B, T, D]`` (or the attention vector) and weights ``[B, T, S]``
        (zero at invalid positions, rows sum to 1), in the dtype of ``values``.
        Half inputs are computed in float32.
    """
    cd = compute_dtype(values)
    q, k, v, e = query.to(cd), proj_keys.to(cd), values.to(cd), energy.to(cd)
    scores = torch.tanh(q.unsqueeze(2) + k.unsqueeze(1)) @ e  # [B, T, S]
    valid = source_mask(mask, lengths, k.shape[0], k.shape[1], k.device)
    if valid is not None:
        scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
        # Padding values take no part (as in the fused kernels, which never read
        # them): a NaN/Inf there must not turn 0 * value into NaN.
        v = v.masked_fill(~valid.unsqueeze(-1), 0.0)
    weights = torch.softmax(scores, dim=-1)
    context = weights @ v
    if out_bias is not None:
        context = torch.tanh(out_bias.to(cd) + context)
    return context.to(values.dtype), weights.to(values.dtype)


def attention_score_grad(
    grad_context: Tensor, grad_weights: Optional[Tensor], values: Tensor, weights: Tensor
) -> Tuple[Tensor, Tensor]:
    """Backward through the softmax and the weighted sum (shared by all backends).

    With ``dw = grad_context V^T + grad_weights``::

        grad_energy = weights * (dw - sum_j weights_j dw_j)     [B, T, S]
        grad_values = weights^T grad_context                    [B, S, D]

    Returns (grad_energy, grad_values) in float32 (float64 for float64 inputs).
    """
    cd = compute_dtype(values)
    w, dc = weights.to(cd), grad_context.to(cd)
    dw = dc @ values.to(cd).transpose(1, 2)
    if grad_weights is not None:
        dw = dw + grad_weights.to(cd)
    grad_energy = w * (dw - (w * dw).sum(-1, keepdim=True))
    return grad_energy, w.transpose(1, 2) @ dc


def additive_attention_backward(
    grad_context: Tensor,
    grad_weights: Optional[Tensor],
    query: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    energy: Tensor,
    weights: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`additive_attention_forward`; tanh(q + K) is recomputed.

    With ``u = tanh(q_t + K_j)`` and ``g = grad_energy * v * (1 - u^2)``::

        grad_query[t] = sum_j g[t, j],   grad_proj_keys[j] = sum_t g[t, j],
        grad_energy_vector = sum_{b, t, j} grad_energy[b, t, j] u[b, t, j]

    Returns:
        (grad_query, grad_proj_keys, grad_values, grad_energy_vector), each in its
        input's dtype.
    """
    cd = compute_dtype(values)
    de, dvalues = attention_score_grad(grad_context, grad_weights, values, weights)
    e = energy.to(cd)
    u = torch.tanh(query.to(cd).unsqueeze(2) + proj_keys.to(cd).unsqueeze(1))  # [B, T, S, A]
    g = de.unsqueeze(-1) * (1 - u * u) * e
    dq, dk = g.sum(2), g.sum(1)
    de_vec = (de.unsqueeze(-1) * u).sum((0, 1, 2))
    return dq.to(query.dtype), dk.to(proj_keys.dtype), dvalues.to(values.dtype), de_vec.to(energy.dtype)


