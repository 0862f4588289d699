"""Plain-PyTorch reference of the attention decoder's GRU context cell.

The decoder GRU's input is ``[E y_{i-1}; c_i]``. Its embedding part of the
input projection (``gi_emb``, with ``b_ih``) is computed for all steps at once,
and its hidden projection ``gh = W_hh s`` comes out of the same matrix product
as the attention query. What is left per step is fused here::

    gi = gi_emb + c W_ic^T                 (W_ic: the context columns of W_ih)
    r = sigmoid(gi_r + gh_r + b_hr), z = sigmoid(gi_z + gh_z + b_hz)
    n = tanh(gi_n + r * (gh_n + b_hn)),  s' = (1 - z) * n + z * s

The gate formulas are the recurrence's (:func:`fastseq.ops.recurrence.naive.gru_gates`
and :func:`~fastseq.ops.recurrence.naive.gru_gates_backward`). Signatures and
outputs are those of :mod:`.triton` and :mod:`.cpp`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastseq.backend.alloc import compute_dtype
from fastseq.ops.recurrence.naive import gru_gates, gru_gates_backward


def gru_context_cell_forward(
    gi: Tensor, context: Tensor, w_ic: Tensor, gh: Tensor, b_hh: Optional[Tensor], h: Tensor,
    save_gates: bool,
) -> Tuple[Tensor, Tensor]:
    """One GRU step whose input projection is ``gi + context W_ic^T``.

    Args:
        gi: ``[B, 3H]``; context: ``[B, D]``; w_ic: ``[3H, D]``; gh: ``[B, 3H]``
        (``W_hh h``, without bias); b_hh: ``[3H]`` or None; h: ``[B, H]`` the
        previous state.

    Returns:
        h' ``[B, H]``; gates ``[B, 4H]`` = (r, z, n, gh_n + b_hn) or an empty ``[0]``.
    """
    cd = compute_dtype(gi)
    x = gi.to(cd) + context.to(cd) @ w_ic.to(cd).t()
    hh = gh.to(cd) if b_hh is None else gh.to(cd) + b_hh.to(cd)
    x_r, x_z, x_n = x.chunk(3, dim=1)
    h_r, h_z, h_n = hh.chunk(3, dim=1)
    r, z, n, h_new = gru_gates(x_r, x_z, x_n, h_r, h_z, h_n, h.to(cd))
    gates = torch.cat([r, z, n, h_n], 1).to(gi.dtype) if save_gates else gi.new_empty((0,))
    return h_new.to(gi.dtype), gates


def gru_context_cell_backward(
    grad_h: Tensor, gates: Tensor, h: Tensor, context: Tensor, w_ic: Tensor, has_bias: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`gru_context_cell_forward`.

    Returns:
        (grad_gi ``[B, 3H]``, grad_context ``[B, D]``, grad_w_ic ``[3H, D]``,
        grad_gh ``[B, 3H]``, grad_b_hh ``[3H]`` (empty ``[0]`` without bias),
        grad_h ``[B, H]``), each in its input's dtype.
    """
    cd = compute_dtype(h)
    r, z, n, hn = gates.to(cd).chunk(4, dim=1)
    dr, dz, dn, dh_direct = gru_gates_backward(grad_h.to(cd), r, z, n, hn, h.to(cd))
    dgi = torch.cat([dr, dz, dn], 1)
    dgh = torch.cat([dr, dz, dn * r], 1)
    dctx = dgi @ w_ic.to(cd)
    dw = dgi.t() @ context.to(cd)
    db = dgh.sum(0).to(w_ic.dtype) if has_bias else w_ic.new_empty((0,))
    return (dgi.to(gates.dtype), dctx.to(context.dtype), dw.to(w_ic.dtype), dgh.to(gates.dtype), db,
            dh_direct.to(h.dtype))
