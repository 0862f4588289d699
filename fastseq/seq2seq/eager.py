"""The same attention decoder on eager torch.nn operations: the baseline.

:class:`EagerDecoder` wraps a :class:`fastseq.seq2seq.model.Decoder` and runs it
the way the common toolkits and tutorials write it: per step, ``query_layer``,
``tanh(q + K)``, ``energy_layer``, ``masked_fill``, ``softmax``, ``bmm``,
``cat`` and ``torch.nn.GRUCell`` (cuDNN/ATen's own cell). It shares the wrapped
decoder's parameters (no copies), so the two give the same outputs and
gradients up to rounding: it is the parity reference for the fused decoder step
and the eager baseline in the benchmarks. :class:`EagerSeq2Seq` does the same
for a whole :class:`~fastseq.seq2seq.model.Seq2Seq` (its encoder runs through
``torch.nn.GRU/LSTM``'s own forward: cuDNN on GPUs, oneDNN/ATen on CPUs), and
works with the search functions in :mod:`fastseq.seq2seq.search`.

:class:`EagerLuongDecoder` is the same for a
:class:`~fastseq.seq2seq.model.LuongDecoder` (``decoder_flow: luong``): per step
``torch.nn.GRUCell`` on ``[E y_{i-1}; a_{i-1}]``, the eager attention from the
new state, ``cat``, ``tanh`` and the linear layers. :class:`EagerSeq2Seq` picks
the one that fits the model's decoder.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastseq.seq2seq.model import Decoder, LuongDecoder, Memory, Seq2Seq

__all__ = ["EagerDecoder", "EagerLuongDecoder", "EagerSeq2Seq"]


class EagerDecoder(nn.Module):
    """Eager torch.nn version of ``decoder`` (shares its parameters)."""

    def __init__(self, decoder: Union[Decoder, LuongDecoder]):
        super().__init__()
        self.decoder = decoder

    # The interface the search functions use (see Decoder): the "input projection"
    # of the eager decoder is the embedding itself; there are no stacked weights.
    def embed_inputs(self, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        emb = self.decoder.dropout(self.decoder.embed(tokens))
        return emb, emb

    def step_weights(self) -> None:
        return None

    def logits(self, state: Tensor, context: Tensor, emb: Tensor) -> Tensor:
        return self.decoder.logits(state, context, emb)

    def attend(self, query: Tensor, memory: Memory) -> Tuple[Tensor, Tensor]:
        """Eager additive attention: query ``[B, H]`` -> (context ``[B, D]``, weights ``[B, S]``)."""
        att = self.decoder.attention
        q = att.query_layer(query)
        energy = att.energy_layer(torch.tanh(q.unsqueeze(1) + memory.proj_keys)).squeeze(2)
        energy = energy.masked_fill(~memory.mask, float("-inf"))
        weights = torch.softmax(energy, dim=-1)
        return torch.bmm(weights.unsqueeze(1), memory.values).squeeze(1), weights

    def step(self, emb: Tensor, state: Tensor, memory: Memory,
             weights: Optional[object] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """emb ``[B, E]``, state ``[B, H]`` -> (state, context ``[B, D]``, weights ``[B, S]``)."""
        d = self.decoder
        context, weights = self.attend(state, memory)
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


class EagerLuongDecoder(EagerDecoder):
    """Eager torch.nn version of a :class:`LuongDecoder` (shares its parameters);
    the state is ``[s; a]`` ``[B, 2H]`` as there."""

    def step(self, emb: Tensor, state: Tensor, memory: Memory,
             weights: Optional[object] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """emb ``[B, E]``, state ``[s_{i-1}; a_{i-1}]`` ``[B, 2H]`` -> (``[s_i; a_i]``,
        context ``[B, D]``, weights ``[B, S]``)."""
        d = self.decoder
        H = d.hidden_size
        s_prev, a_prev = state[:, :H], state[:, H:]
        # torch.nn.GRUCell's own forward on the decoder's (fastseq) cell parameters.
        s = nn.GRUCell.forward(d.cell, torch.cat([emb, a_prev], dim=-1), s_prev)
        context, weights = self.attend(s, memory)
        a = torch.tanh(d.att_vector_layer(torch.cat([s, context], dim=-1)))
        return torch.cat([s, a], dim=-1), context, weights


class EagerSeq2Seq(nn.Module):
    """Eager torch.nn version of a whole :class:`Seq2Seq` (shares its parameters)."""

    def __init__(self, model: Seq2Seq):
        super().__init__()
        self.model = model
        self.config = model.config
        eager = EagerLuongDecoder if isinstance(model.decoder, LuongDecoder) else EagerDecoder
        self.decoder = eager(model.decoder)

    def encode(self, src: Tensor, src_lengths: Tensor) -> Memory:
        """As :meth:`Seq2Seq.encode`, with the encoder RNN on torch.nn's own kernels."""
        m = self.model
        enc = m.encoder
        x = enc.dropout(enc.embed(src))
        packed = pack_padded_sequence(x, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        rnn_base = nn.GRU if isinstance(enc.rnn, nn.GRU) else nn.LSTM
        out, h_n = rnn_base.forward(enc.rnn, packed)
        if isinstance(h_n, tuple):
            h_n = h_n[0]
        values, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        final = torch.cat([h_n[-2], h_n[-1]], dim=-1)
        mask = torch.arange(src.shape[1], device=src.device)[None, :] < src_lengths.to(src.device)[:, None]
        proj_keys = m.decoder.attention.key_layer(values)
        return Memory(values, proj_keys, mask, m.decoder.initial_state(final))

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        return self.decoder(tgt_in, self.encode(src, src_lengths))
