"""The op layer: reference math, fused Triton kernels, and the custom ops that dispatch between them."""
from fastseq.ops.attention import additive_attention
from fastseq.ops.decoder import StepWeights, attention_gru_step, gru_context_cell
from fastseq.ops.rnn import gru, gru_recurrence, lstm, lstm_recurrence

__all__ = [
    "StepWeights", "additive_attention", "attention_gru_step", "gru", "gru_context_cell",
    "gru_recurrence", "lstm", "lstm_recurrence",
]
