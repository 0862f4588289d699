"""Additive (Bahdanau) attention with precomputed key projections.

* :mod:`.op` -- the custom ops (``fastseq::additive_attention`` and its backward),
  their registrations, and the validated functional API (:func:`additive_attention`);
* :mod:`.naive` -- the plain-PyTorch reference;
* :mod:`.triton` -- the fused kernels (one launch forward, online softmax; imported on first use);
* :mod:`.cpp` -- the C++ extension's kernels.
"""
from fastseq.ops.attention.op import additive_attention, additive_attention_backward_op, additive_attention_op

__all__ = ["additive_attention", "additive_attention_backward_op", "additive_attention_op"]
