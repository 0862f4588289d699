"""The GRU and LSTM recurrences over precomputed input projections.

* :mod:`.op` -- the custom ops (``fastseq::gru_recurrence``, ...), their
  registrations, and the validated functional API (:func:`gru`, :func:`lstm`, and :func:`gru_packed`,
  :func:`lstm_packed` on a PackedSequence's layout, :func:`gru_bidirectional`,
  :func:`lstm_bidirectional`: both directions of a layer at once);
* :mod:`.directions` -- the bidirectional ops composed from a backend's packed ops;
* :mod:`.naive` -- the plain-PyTorch reference and the gate formulas;
* :mod:`.triton` -- the fused Triton kernels (imported on first use);
* :mod:`.cpp` -- the C++ extension's kernels.
"""
from fastseq.ops.recurrence.op import (
    fuses_directions, gru, gru_bidirectional, gru_bidirectional_recurrence, gru_packed, gru_packed_recurrence,
    gru_packed_recurrence_backward, gru_recurrence, gru_recurrence_backward, lstm, lstm_bidirectional,
    lstm_bidirectional_recurrence, lstm_packed, lstm_packed_recurrence, lstm_packed_recurrence_backward,
    lstm_recurrence, lstm_recurrence_backward, packed_final_rows,
)

__all__ = [
    "fuses_directions", "gru", "gru_bidirectional", "gru_bidirectional_recurrence", "gru_packed",
    "gru_packed_recurrence", "gru_packed_recurrence_backward", "gru_recurrence", "gru_recurrence_backward", "lstm",
    "lstm_bidirectional", "lstm_bidirectional_recurrence", "lstm_packed", "lstm_packed_recurrence",
    "lstm_packed_recurrence_backward", "lstm_recurrence", "lstm_recurrence_backward", "packed_final_rows",
]
