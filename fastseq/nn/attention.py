"""Additive (Bahdanau) attention module."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fastseq import ops
from fastseq.ops import validation

__all__ = ["AdditiveAttention"]


class AdditiveAttention(nn.Module):
    r"""Additive attention (Bahdanau, Cho & Bengio 2015, "Neural Machine Translation
    by Jointly Learning to Align and Translate", eq. 6):

    .. math:: e_{ij} = v^\top \tanh(W_a s_{i-1} + U_a h_j),\quad
              \alpha_{ij} = \mathrm{softmax}_j(e_{ij}),\quad c_i = \sum_j \alpha_{ij} h_j

    Parameters map one-to-one onto the usual implementations:

    ============================  ===================  ==========================  ===================
    fastseq                       shape                joeynmt BahdanauAttention   PyTorch tutorial
    ============================  ===================  ==========================  ===================
    ``query_layer.weight`` (W_a)  ``[A, query_size]``  ``query_layer.weight``      ``Wa.weight``
    ``key_layer.weight`` (U_a)    ``[A, key_size]``    ``key_layer.weight``        ``Ua.weight``
    ``key_layer.bias``            ``[A]`` (bias=True)  --                          ``Ua.bias`` (+ ``Wa.bias``)
    ``energy_layer.weight`` (v)   ``[1, A]``           ``energy_layer.weight``     ``Va.weight``
    ============================  ===================  ==========================  ===================

    so a joeynmt state_dict loads as is, and :meth:`load_from` takes the others.

    The key projection ``U_a h`` depends only on the source, so it is computed
    once per batch with :meth:`precompute_keys` and reused at every decoder step.
    The scores, softmax and weighted sum run in one fused op
    (:func:`fastseq.ops.additive_attention`) that never materialises the
    ``[B, S, A]`` tanh tensor.

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

    def precompute_keys(self, keys: Tensor) -> Tensor:
        """``keys [B, S, key_size]`` -> ``proj_keys [B, S, A]`` = U_a h (+ bias), once per source batch.

        Raises:
            fastseq.ops.validation.ArgumentTypeError: ``keys`` is not a tensor.
            ValueError: ``keys`` is not 3-D.
            RuntimeError: ``keys.size(-1) != key_size``; not of the module's dtype or device.
        """
        validation.tensor("keys", keys)
        if keys.dim() != 3:
            raise ValueError(
                f"keys: expected a 3-D tensor (B, S, key_size={self.key_size}), got shape {tuple(keys.shape)}"
            )
        if keys.shape[-1] != self.key_size:
            raise RuntimeError(
                f"keys: expected size(-1) == key_size={self.key_size}, got shape {tuple(keys.shape)}"
            )
        self._check_like_params("keys", keys, self.key_layer.weight)
        return self.key_layer(keys)

    @staticmethod
    def _check_like_params(name: str, t: Tensor, w: Tensor) -> None:
        if t.device != w.device:
            raise RuntimeError(f"{name}: expected device {w.device} (the module's parameters), got {t.device}")
        validation.floating(name, t)
        if t.dtype != w.dtype and not torch.is_autocast_enabled(t.device.type):
            raise RuntimeError(f"{name}: expected dtype {w.dtype} (the module's parameters), got {t.dtype}")

    project_keys = precompute_keys  # the 0.1 name

    def forward(self, query: Tensor, proj_keys: Tensor, values: Tensor,
                mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Attend from ``query`` over the source.

        Args:
            query: ``[B, query_size]`` decoder state s_{i-1}, or ``[B, T, query_size]``
                for T independent queries (e.g. teacher-forced attention after the RNN).
            proj_keys: ``[B, S, A]`` from :meth:`precompute_keys`.
            values: ``[B, S, V]`` encoder states h_j.
            mask: bool ``[B, S]``, True at real (non-padding) positions; or
            lengths: int ``[B]`` source lengths. At most one; neither: no padding.

        Returns:
            context ``[B, V]`` (or ``[B, T, V]``) and weights ``[B, S]`` (or
            ``[B, T, S]``; zero at padding, rows sum to 1), in the input dtype.

        Raises:
            fastseq.ops.validation.ArgumentTypeError: an argument that is not a tensor.
            ValueError: ``query`` not 2-D or 3-D; both ``mask`` and ``lengths``.
            RuntimeError: sizes, dtypes or devices that disagree, or a source of
            zero length (each message names the argument).
        """
        for name, t in (("query", query), ("proj_keys", proj_keys), ("values", values)):
            validation.tensor(name, t)
        expected = f"query: expected shape (B, {self.query_size}) or (B, T, {self.query_size}), "
        if query.dim() not in (2, 3):
            raise ValueError(expected + f"got {tuple(query.shape)}")
        if query.shape[-1] != self.query_size:
            raise RuntimeError(expected + f"got {tuple(query.shape)}")
        if proj_keys.dim() != 3 or proj_keys.shape[-1] != self.hidden_size:
            raise RuntimeError(
                f"proj_keys: expected shape ({query.shape[0]}, S, {self.hidden_size}), "
                f"got {tuple(proj_keys.shape)}"
            )
        w = self.query_layer.weight
        self._check_like_params("query", query, w)
        if not torch.is_autocast_enabled(query.device.type):
            for name, t in (("proj_keys", proj_keys), ("values", values)):
                if t.dtype != query.dtype:
                    raise RuntimeError(f"{name}: expected dtype {query.dtype} (that of query), got {t.dtype}")
        q = self.query_layer(query)
        energy = self.energy_layer.weight
        if torch.is_autocast_enabled(q.device.type):  # custom ops are not autocast: match q's dtype
            energy, proj_keys, values = energy.to(q.dtype), proj_keys.to(q.dtype), values.to(q.dtype)
        return ops.additive_attention(q, proj_keys, values, energy, mask, lengths)

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
