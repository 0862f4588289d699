"""The fused step of a GRU decoder with additive attention (Bahdanau et al. 2015; Luong et al. 2015).

* :mod:`.op` -- the decoder GRU's context cell as a custom op
  (``fastseq::gru_context_cell``), its registrations, :func:`gru_context_cell`,
  and the three-launch step :func:`attention_gru_step` with its :class:`StepWeights`;
* :mod:`.decode` -- the whole teacher-forced decoder recurrence as one op
  (``fastseq::attention_gru_decode``, :func:`attention_gru_decode`);
* :mod:`.luong` -- the Luong flow's teacher-forced recurrence (input feeding, the
  attention from the new state, projected values) as one op
  (``fastseq::luong_gru_decode``, :func:`luong_gru_decode`, :class:`LuongWeights`);
* :mod:`.naive` -- the plain-PyTorch reference of the cell;
* :mod:`.triton` -- the fused cell kernels (imported on first use);
* :mod:`.cpp` -- the C++ extension's kernels.
"""
from fastseq.ops.decoder_step.decode import attention_gru_decode, attention_gru_decode_op
from fastseq.ops.decoder_step.luong import LuongWeights, luong_gru_decode, luong_gru_decode_op
from fastseq.ops.decoder_step.op import (
    StepWeights, attention_gru_step, gru_context_cell, gru_context_cell_backward_op, gru_context_cell_op,
)

__all__ = ["LuongWeights", "StepWeights", "attention_gru_decode", "attention_gru_decode_op", "attention_gru_step",
           "gru_context_cell", "gru_context_cell_backward_op", "gru_context_cell_op", "luong_gru_decode",
           "luong_gru_decode_op"]
