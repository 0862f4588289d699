"""Attention sequence-to-sequence model on the fused GRU/LSTM kernels: data, model, training."""
