"""Additive attention on the C++ extension (``csrc/cpu/attention.cpp``, ``csrc/cuda/attention_kernels.cu``).

Signatures and outputs are :mod:`.naive`'s (``torch.ops.fastseq_cpp.<name>``,
built on first use by :mod:`fastseq.backend.extension`). The CPU kernels index
with int64 and loop over any size; the CUDA kernels have the grid limit of
:func:`limits` (registered for CUDA tensors only).
"""
from __future__ import annotations

from typing import Mapping, Optional

from fastseq.backend import extension, limits as backend_limits

#: Source positions per block of the CUDA keys backward (``kChunk`` in csrc/cuda/attention_kernels.cu).
CUDA_KEY_CHUNK = 8


def limits(sizes: Mapping[str, int]) -> Optional[backend_limits.Unsupported]:
    """The CUDA kernels' limit: the forward and query backward launch one block per
    query (``B*T`` blocks), the keys backward one per ``(b, chunk of 8 source
    positions)``, all on grid axis 0 (at most ``MAX_GRID_X``)."""
    B, T, S = sizes["B"], sizes["T"], sizes["S"]
    blocks = max(B * T, B * -(-S // CUDA_KEY_CHUNK))
    if blocks > backend_limits.MAX_GRID_X:
        return backend_limits.Unsupported(
            "grid", f"B={B}, T={T}, S={S}: {blocks} blocks on grid axis 0, past the limit {backend_limits.MAX_GRID_X}"
        )
    return None


def additive_attention_forward(query, proj_keys, values, energy, mask, lengths, out_bias=None):
    return tuple(extension.load().additive_attention_forward(query, proj_keys, values, energy, mask, lengths,
                                                             out_bias))


def additive_attention_backward(grad_context, grad_weights, query, proj_keys, values, energy, weights):
    return tuple(extension.load().additive_attention_backward(
        grad_context, grad_weights, query, proj_keys, values, energy, weights))
