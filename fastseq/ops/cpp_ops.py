"""The C++ extension's ops behind the reference's function names and signatures.

:func:`fastseq.ops._dispatch.implementation` returns this module for the
``cpp`` (and ``cuda``) backends; each function calls
``torch.ops.fastseq_cpp.<name>`` (built on first use by :mod:`fastseq.ops.cpp`;
PyTorch's dispatcher picks the CPU or CUDA kernel by the tensors' device) and
turns the empty ``[0]`` tensors the C++ ops return for absent outputs back into
``None``, as the reference returns them.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from fastseq import _backend
from fastseq.ops import cpp

# What the CUDA kernels cannot take (module constants, so tests can lower them).
# The CPU kernels index with int64 and guard their BLAS calls; they have no limit.
CUDA_MAX_GRID_X = 2**31 - 1  # blocks on grid axis 0 (launched as unsigned int)
CUDA_ATTN_KEY_CHUNK = 8  # source positions per block of the attention keys backward (kChunk)


def cuda_limits(family: str, sizes) -> Optional[_backend.Unsupported]:
    """The CUDA kernels' limits (csrc/cuda/*.cu launch code): the attention
    forward and query backward launch one block per query (``B*T`` blocks), the
    keys backward one per ``(b, chunk of 8 source positions)``; the recurrence
    and cell kernels use capped grid-stride loops (no limit)."""
    if family != "attention":
        return None
    B, T, S = sizes["B"], sizes["T"], sizes["S"]
    blocks = max(B * T, B * -(-S // CUDA_ATTN_KEY_CHUNK))
    if blocks > CUDA_MAX_GRID_X:
        return _backend.Unsupported(
            "grid", f"B={B}, T={T}, S={S}: {blocks} blocks on grid axis 0, past the limit {CUDA_MAX_GRID_X}"
        )
    return None


# The CPU kernels index with int64 and loop over any size: no shape limits, so the
# dispatcher does not ask (tests set this to exercise the fallback on CPU).
CPU_SHAPE_LIMITS = False


def unsupported_reason(family: str, t: Tensor, sizes) -> Optional[_backend.Unsupported]:
    """None if the extension's kernels for ``t``'s device can take ``sizes`` (as the
    Triton modules' ``unsupported_reason``), else why not."""
    if t.device.type != "cuda":
        return None
    return cuda_limits(family, sizes)


def _optional(t: Tensor, present: bool) -> Optional[Tensor]:
    """The C++ op's placeholder ``[0]`` tensor becomes None when the output is absent."""
    return t if present else None


def gru_recurrence_forward(gi, h0, w_hh, b_hh, lengths, save_gates):
    return tuple(cpp.load().gru_recurrence_forward(gi, h0, w_hh, b_hh, lengths, save_gates))


def gru_recurrence_backward(grad_hs, h0, w_hh, hs, gates, lengths, has_bias):
    dgi, dh0, dw, db = cpp.load().gru_recurrence_backward(grad_hs, h0, w_hh, hs, gates, lengths, has_bias)
    return dgi, dh0, dw, _optional(db, has_bias)


def lstm_recurrence_forward(gi, h0, c0, w_hh, b_hh, lengths, save_gates):
    return tuple(cpp.load().lstm_recurrence_forward(gi, h0, c0, w_hh, b_hh, lengths, save_gates))


def lstm_recurrence_backward(grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, lengths, has_bias):
    dgi, dh0, dc0, dw, db = cpp.load().lstm_recurrence_backward(
        grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, lengths, has_bias
    )
    return dgi, dh0, dc0, dw, _optional(db, has_bias)


def additive_attention_forward(query, proj_keys, values, energy, mask=None, lengths=None):
    return tuple(cpp.load().additive_attention_forward(query, proj_keys, values, energy, mask, lengths))


def additive_attention_backward(grad_context, grad_weights, query, proj_keys, values, energy, weights):
    return tuple(cpp.load().additive_attention_backward(
        grad_context, grad_weights, query, proj_keys, values, energy, weights
    ))


def gru_context_cell_forward(gi, context, w_ic, gh, b_hh, h, save_gates):
    return tuple(cpp.load().gru_context_cell_forward(gi, context, w_ic, gh, b_hh, h, save_gates))


def gru_context_cell_backward(grad_h, gates, h, context, w_ic, has_bias):
    dgi, dctx, dw, dgh, db, dh = cpp.load().gru_context_cell_backward(grad_h, gates, h, context, w_ic, has_bias)
    return dgi, dctx, dw, dgh, _optional(db, has_bias), dh
