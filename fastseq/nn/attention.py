"""Additive (Bahdanau) attention module."""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fastseq import ops

__all__ = ["AdditiveAttention"]

# Masks already checked for empty rows. A decoder passes the same mask at every
# step, so the check (a device-to-host sync) runs once per source batch, not per step;
# a mask is treated as immutable once passed in.
_CHECKED_MASKS: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def _check_nonempty_rows(mask: Tensor) -> None:
    if _CHECKED_MASKS.get(id(mask)) is mask:
        return
    if not bool(mask.any(dim=1).all()):
        raise ValueError("mask: every row needs at least one True entry (zero-length source)")
    _CHECKED_MASKS[id(mask)] = mask


class AdditiveAttention(nn.Module):
    r"""Additive attention (Bahdanau, Cho & Bengio 2015, "Neural Machine Translation
    by Jointly Learning to Align and Translate", eq. 6):

    .. math:: e_{ij} = v^\top \tanh(W_a s_{i-1} + U_a h_j),\quad
              \alpha_{ij} = \mathrm{softmax}_j(e_{ij}),\quad c_i = \sum_j \alpha_{ij} h_j

    Parameters map one-to-one onto the usual implementations:
    ``query_layer.weight`` = W_a ``[A, query_size]``, ``key_layer.weight`` = U_a
    ``[A, key_size]`` (and ``key_layer.bias`` when ``bias=True``),
    ``energy_layer.weight`` = v ``[1, A]``. This is joeynmt's ``BahdanauAttention``
    layout (same names); see :meth:`load_from` for other layouts.

    The key projection ``U_a h`` depends only on the source, so it is computed
    once per batch with :meth:`project_keys` and reused at every decoder step.

    Args:
        query_size: decoder state size. key_size: encoder output size.
        hidden_size: attention size A. bias: bias in the key layer.
    """

    def __init__(self, query_size: int, key_size: int, hidden_size: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.query_size, self.key_size, self.hidden_size = query_size, key_size, hidden_size
        self.query_layer = nn.Linear(query_size, hidden_size, bias=False, **kw)
        self.key_layer = nn.Linear(key_size, hidden_size, bias=bias, **kw)
        self.energy_layer = nn.Linear(hidden_size, 1, bias=False, **kw)

    def project_keys(self, keys: Tensor) -> Tensor:
        """``keys [B, S, key_size]`` -> ``proj_keys [B, S, A]`` = U_a h."""
        if keys.shape[-1] != self.key_size:
            raise ValueError(
                f"keys: expected size(-1) == key_size={self.key_size}, got shape {tuple(keys.shape)}"
            )
        return self.key_layer(keys)

    def forward(self, query: Tensor, proj_keys: Tensor, values: Tensor,
                mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Attend from ``query`` over the source.

        Args:
            query: ``[B, query_size]`` decoder state s_{i-1}.
            proj_keys: ``[B, S, A]`` from :meth:`project_keys`.
            values: ``[B, S, V]`` encoder states h_j.
            mask: bool ``[B, S]``, True at real (non-padding) positions.

        Returns:
            context ``[B, V]`` and weights ``[B, S]`` (float, rows sum to 1).

        Raises:
            ValueError: shapes disagree (the message names the argument), or a
            row of ``mask`` has no True entry (a zero-length source).
        """
        B = query.shape[0]
        if query.dim() != 2 or query.shape[1] != self.query_size:
            raise ValueError(f"query: expected shape (B, {self.query_size}), got {tuple(query.shape)}")
        if proj_keys.dim() != 3 or proj_keys.shape[0] != B or proj_keys.shape[2] != self.hidden_size:
            raise ValueError(
                f"proj_keys: expected shape ({B}, S, {self.hidden_size}), got {tuple(proj_keys.shape)}"
            )
        S = proj_keys.shape[1]
        if values.dim() != 3 or values.shape[:2] != proj_keys.shape[:2]:
            raise ValueError(f"values: expected shape ({B}, {S}, V), got {tuple(values.shape)}")
        if mask is not None:
            if mask.shape != (B, S) or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask: expected a bool tensor of shape ({B}, {S}), got {mask.dtype} {tuple(mask.shape)}"
                )
            if not torch.compiler.is_compiling():
                _check_nonempty_rows(mask)
        return ops.additive_attention(self.query_layer(query), proj_keys, values,
                                      self.energy_layer.weight, mask)

    @torch.no_grad()
    def load_from(self, query_weight: Tensor, key_weight: Tensor, energy_weight: Tensor,
                  key_bias: Optional[Tensor] = None) -> "AdditiveAttention":
        """Copy weights from another implementation's layers.

        Args:
            query_weight: W_a ``[A, query_size]`` (e.g. ``W_a.weight`` in the
                PyTorch seq2seq tutorials, ``query_layer.weight`` in joeynmt).
            key_weight: U_a ``[A, key_size]`` (``U_a.weight`` / ``key_layer.weight``).
            energy_weight: v ``[1, A]`` or ``[A]`` (``V_a.weight`` / ``energy_layer.weight``).
            key_bias: ``[A]``; needs ``bias=True``. A bias on the query layer can be
                folded in here (both are added before tanh).
        """
        self.query_layer.weight.copy_(query_weight)
        self.key_layer.weight.copy_(key_weight)
        self.energy_layer.weight.copy_(energy_weight.reshape(1, -1))
        if key_bias is not None:
            if self.key_layer.bias is None:
                raise ValueError("key_bias: this module was built with bias=False")
            self.key_layer.bias.copy_(key_bias)
        return self
