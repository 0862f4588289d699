"""The same attention decoder on eager torch.nn operations: the baseline.

:class:`EagerDecoder` wraps a :class:`fastseq.seq2seq.model.Decoder` and runs it
the way the common toolkits and tutorials write it: per step, ``query_layer``,
``tanh(q + K)``, ``energy_layer``, ``masked_fill``, ``softmax``, ``bmm``,
``cat`` and ``torch.nn.GRUCell`` (cuDNN/ATen's own cell). It shares the wrapped
decoder's parameters (no copies), so the two give the same outputs and
gradients up to rounding: it is the parity reference for the fused decoder step
and the eager baseline in the benchmarks.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from fastseq.seq2seq.model import Decoder, Memory

__all__ = ["EagerDecoder"]


class EagerDecoder(nn.Module):
    """Eager torch.nn version of ``decoder`` (shares its parameters)."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def step(self, emb: Tensor, state: Tensor, memory: Memory) -> Tuple[Tensor, Tensor, Tensor]:
        """emb ``[B, E]``, state ``[B, H]`` -> (state, context ``[B, D]``, weights ``[B, S]``)."""
        d = self.decoder
        att = d.attention
        q = att.query_layer(state)
        energy = att.energy_layer(torch.tanh(q.unsqueeze(1) + memory.proj_keys)).squeeze(2)
        energy = energy.masked_fill(~memory.mask, float("-inf"))
        weights = torch.softmax(energy, dim=-1)
        context = torch.bmm(weights.unsqueeze(1), memory.values).squeeze(1)
        # torch.nn.GRUCell's own forward on the decoder's (fastseq) cell parameters.
        state = nn.GRUCell.forward(d.cell, torch.cat([emb, context], dim=-1), state)
        return state, context, weights

    def forward(self, tgt_in: Tensor, memory: Memory) -> Tensor:
        """Teacher-forced decoding: tgt_in ``[B, T]`` -> logits ``[B, T, V]``."""
        d = self.decoder
        emb = d.dropout(d.embed(tgt_in))
        state = memory.init_state
        states, contexts = [], []
        for t in range(tgt_in.shape[1]):
            state, context, _ = self.step(emb[:, t], state, memory)
            states.append(state)
            contexts.append(context)
        return d.logits(torch.stack(states, 1), torch.stack(contexts, 1), emb)
