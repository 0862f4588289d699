"""The decoder's GRU context cell and the teacher-forced decoder loops on the C++ extension
(``csrc/cpu/cell.cpp``, ``csrc/cuda/cell_kernels.cu``, ``csrc/cpu/decode.cpp``).

Signatures and outputs are :mod:`.naive`'s for the cell; the loops' are those of
:func:`.decode.decode_forward` / :func:`.decode.decode_backward` and
:func:`.luong.luong_decode_forward` / :func:`.luong.luong_decode_backward`
without the ``attention`` / ``cell`` arguments (T >= 1: the callers return the
T = 0 outputs themselves). ``torch.ops.fastseq_cpp.<name>``, built on first use
by :mod:`fastseq.backend.extension`. The loops run the extension's attention and
cell at every step, so they take the shapes those take (:func:`loop_limits`).
"""
from __future__ import annotations

from typing import Mapping, Optional

from fastseq.backend import extension, graphs, limits as backend_limits
from fastseq.backend.registry import Implementation
from fastseq.ops.attention import cpp as attention_cpp


def gru_context_cell_forward(gi, context, w_ic, gh, b_hh, h, save_gates):
    return tuple(extension.load().gru_context_cell_forward(gi, context, w_ic, gh, b_hh, h, save_gates))


def gru_context_cell_backward(grad_h, gates, h, context, w_ic, has_bias):
    return tuple(extension.load().gru_context_cell_backward(grad_h, gates, h, context, w_ic, has_bias))


def loop_limits(sizes: Mapping[str, int]) -> Optional[backend_limits.Unsupported]:
    """The loops' limit (CUDA): every step launches the attention with one query per row,
    sizes ``{"B", "S"}``; see :func:`fastseq.ops.attention.cpp.limits`."""
    return attention_cpp.limits({"B": sizes["B"], "T": 1, "S": sizes["S"]})


def loop_implementation(name: str) -> Implementation:
    """The registry entry of the C++ loop ``name`` (one of the four below), wrapped in a
    :class:`fastseq.backend.graphs.GraphCache` (on CUDA with ``FASTSEQ_CUDA_GRAPHS=1``
    each call of a repeated shape is one graph launch; otherwise the loop runs directly).
    Loaded on first use; a library built before the loops existed fails to load it,
    and the registry runs the Python loop instead (one warning)."""
    def load():
        getattr(extension.load(), name)  # AttributeError if this build lacks the op
        return graphs.GraphCache(globals()[name], f"fastseq_cpp::{name}"), loop_limits

    return Implementation(load=load, limited_devices=("cuda",))


def attention_gru_decode_forward(gi_emb, h0, proj_keys, values, w_cat, b_hh, energy, w_ic, mask, lengths, save):
    return tuple(extension.load().attention_gru_decode_forward(gi_emb, h0, proj_keys, values, w_cat, b_hh, energy,
                                                               w_ic, mask, lengths, save))


def attention_gru_decode_backward(grad_states, grad_contexts, grad_weights, gi_emb, h0, proj_keys, values, w_cat,
                                  energy, w_ic, states, contexts, weights, gates, queries, has_bias):
    return tuple(extension.load().attention_gru_decode_backward(
        grad_states, grad_contexts, grad_weights, gi_emb, h0, proj_keys, values, w_cat, energy, w_ic, states,
        contexts, weights, gates, queries, has_bias))


def luong_gru_decode_forward(gi_emb, h0, proj_keys, proj_values, w_cat, b_att, b_hh, energy, w_ia, mask, lengths,
                             save):
    return tuple(extension.load().luong_gru_decode_forward(gi_emb, h0, proj_keys, proj_values, w_cat, b_att, b_hh,
                                                           energy, w_ia, mask, lengths, save))


def luong_gru_decode_backward(grad_states, grad_weights, h0, proj_keys, proj_values, w_cat, energy, w_ia, states,
                              weights, gates, queries, has_att_bias, has_bias):
    return tuple(extension.load().luong_gru_decode_backward(
        grad_states, grad_weights, h0, proj_keys, proj_values, w_cat, energy, w_ia, states, weights, gates,
        queries, has_att_bias, has_bias))
