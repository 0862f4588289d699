"""Additive (Bahdanau) attention op.

Today this is the reference implementation differentiated by autograd; the
fused Triton kernel and decoder step plug in here behind the same signature.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from fastseq.ops import reference


def additive_attention(
    query: Tensor,
    proj_keys: Tensor,
    values: Tensor,
    energy_weight: Tensor,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """See :func:`fastseq.ops.reference.additive_attention` (shapes, equation)."""
    return reference.additive_attention(query, proj_keys, values, energy_weight, mask)
