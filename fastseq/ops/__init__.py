"""The op layer: reference math, fused Triton kernels, and the custom ops that dispatch between them."""
from fastseq.ops.attention import additive_attention
from fastseq.ops.rnn import gru, gru_recurrence, lstm, lstm_recurrence

__all__ = ["additive_attention", "gru", "gru_recurrence", "lstm", "lstm_recurrence"]
