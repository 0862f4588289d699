"""The GRU and LSTM recurrences over precomputed input projections.

* :mod:`.op` -- the custom ops (``fastseq::gru_recurrence``, ...), their
  registrations, and the validated functional API (:func:`gru`, :func:`lstm`);
* :mod:`.naive` -- the plain-PyTorch reference and the gate formulas;
* :mod:`.triton` -- the fused Triton kernels (imported on first use);
* :mod:`.cpp` -- the C++ extension's kernels.
"""
from fastseq.ops.recurrence.op import (
    gru, gru_recurrence, gru_recurrence_backward, lstm, lstm_recurrence, lstm_recurrence_backward,
)

__all__ = ["gru", "gru_recurrence", "gru_recurrence_backward", "lstm", "lstm_recurrence",
           "lstm_recurrence_backward"]
