"""Fused Triton kernels for the fastseq recurrences (see :mod:`fastseq.ops.triton.rnn`)."""
