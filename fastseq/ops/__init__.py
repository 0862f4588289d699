"""The op layer: one folder per op, each with its custom op, its plain-PyTorch
reference (``naive.py``) and its per-backend launch code (``triton.py``, ``cpp.py``),
registered in :mod:`fastseq.backend.registry`.

* :mod:`.recurrence` -- GRU/LSTM recurrences (:func:`gru`, :func:`lstm`, packed and
  bidirectional forms);
* :mod:`.attention` -- additive attention (:func:`additive_attention`);
* :mod:`.decoder_step` -- the attention decoder's GRU context cell and step
  (:func:`gru_context_cell`, :func:`attention_gru_step`, :class:`StepWeights`) and the
  teacher-forced decoder recurrence as one op (:func:`attention_gru_decode`), and the
  Luong flow's as one op (:func:`luong_gru_decode`, :class:`LuongWeights`);
* :mod:`.validation` -- the argument checks and their error classes, shared with :mod:`fastseq.nn`;
* :mod:`.triton_utils` -- the Triton primitives every op's kernels use;
* :mod:`.launches` -- the kernel-launch counter.
"""
from fastseq.ops.attention import additive_attention
from fastseq.ops.decoder_step import (
    LuongWeights, StepWeights, attention_gru_decode, attention_gru_step, gru_context_cell, luong_gru_decode,
)
from fastseq.ops.recurrence import (
    fuses_directions, gru, gru_bidirectional, gru_packed, gru_packed_recurrence, gru_recurrence, lstm,
    lstm_bidirectional, lstm_packed, lstm_packed_recurrence, lstm_recurrence, packed_final_rows,
)

__all__ = [
    "LuongWeights", "StepWeights", "additive_attention", "attention_gru_decode", "attention_gru_step", "fuses_directions", "gru", "gru_bidirectional",
    "gru_context_cell", "gru_packed", "gru_packed_recurrence", "gru_recurrence", "lstm", "lstm_bidirectional",
    "lstm_packed", "lstm_packed_recurrence",
    "lstm_recurrence", "luong_gru_decode", "packed_final_rows",
]
