"""Both directions of a bidirectional layer, from a backend's one-direction packed recurrence.

The fused form (``fastseq::gru_bidirectional_recurrence`` and the LSTM's, in
:mod:`.op`) takes the input projections of both directions from one GEMM and
writes the layer's output directly::

    gi   [N, 2*G*H]  direction d in columns d*G*H .. (d+1)*G*H   (G = 3 GRU, 4 LSTM)
    h0   [2, B, H]   (c0 likewise)     w_hh [2, G*H, H]     b_hh [2, G*H] or None
    hs   [N, 2*H]    direction d in columns d*H .. (d+1)*H   (cs likewise)
    gates [2, N, 4H] or [0]

on a PackedSequence's layout (``batch_sizes``); direction 0 runs forward, direction 1
from each row's last step back (:func:`fastseq.ops.recurrence.naive.packed_steps`).
Triton runs both directions in one launch per step (:mod:`.triton`); the reference
and the C++ backend are these compositions of their packed ops, one direction after
the other (the C++ backend's CPU threads already split each step's rows).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["gru_forward", "gru_backward", "lstm_forward", "lstm_backward"]


def _cols(x: Tensor, d: int, width: int) -> Tensor:
    return x[:, d * width:(d + 1) * width].contiguous()


def _bias(b: Optional[Tensor], d: int) -> Optional[Tensor]:
    return None if b is None else b[d]


def gru_forward(packed_forward: Callable) -> Callable:
    """The bidirectional GRU forward from ``packed_forward(gi, h0, w_hh, b_hh, batch_sizes,
    reverse, save_gates) -> (hs, gates)``."""
    def forward(gi, h0, w_hh, b_hh, batch_sizes, save_gates):
        GH = w_hh.shape[1]
        outs = [packed_forward(_cols(gi, d, GH), h0[d], w_hh[d], _bias(b_hh, d), batch_sizes, bool(d), save_gates)
                for d in range(2)]
        gates = torch.stack([o[1] for o in outs]) if save_gates else outs[0][1]
        return torch.cat([o[0] for o in outs], dim=1), gates
    return forward


def gru_backward(packed_backward: Callable) -> Callable:
    """The bidirectional GRU backward from ``packed_backward(grad_hs, h0, w_hh, hs, gates,
    batch_sizes, reverse, has_bias) -> (dgi, dh0, dw_hh, db_hh)``."""
    def backward(grad_hs, h0, w_hh, hs, gates, batch_sizes, has_bias):
        H = h0.shape[2]
        outs = [packed_backward(_cols(grad_hs, d, H), h0[d], w_hh[d], _cols(hs, d, H), gates[d], batch_sizes,
                                bool(d), has_bias) for d in range(2)]
        db = torch.stack([o[3] for o in outs]) if has_bias else outs[0][3]
        return (torch.cat([o[0] for o in outs], dim=1), torch.stack([o[1] for o in outs]),
                torch.stack([o[2] for o in outs]), db)
    return backward


def lstm_forward(packed_forward: Callable) -> Callable:
    """The bidirectional LSTM forward from ``packed_forward(gi, h0, c0, w_hh, b_hh,
    batch_sizes, reverse, save_gates) -> (hs, cs, gates)``."""
    def forward(gi, h0, c0, w_hh, b_hh, batch_sizes, save_gates):
        GH = w_hh.shape[1]
        outs = [packed_forward(_cols(gi, d, GH), h0[d], c0[d], w_hh[d], _bias(b_hh, d), batch_sizes, bool(d),
                               save_gates) for d in range(2)]
        gates = torch.stack([o[2] for o in outs]) if save_gates else outs[0][2]
        return torch.cat([o[0] for o in outs], dim=1), torch.cat([o[1] for o in outs], dim=1), gates
    return forward


def lstm_backward(packed_backward: Callable) -> Callable:
    """The bidirectional LSTM backward from ``packed_backward(grad_hs, grad_cs, h0, c0,
    w_hh, hs, cs, gates, batch_sizes, reverse, has_bias) -> (dgi, dh0, dc0, dw_hh, db_hh)``."""
    def backward(grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, batch_sizes, has_bias):
        H = h0.shape[2]
        outs = [packed_backward(_cols(grad_hs, d, H), None if grad_cs is None else _cols(grad_cs, d, H), h0[d],
                                c0[d], w_hh[d], _cols(hs, d, H), _cols(cs, d, H), gates[d], batch_sizes, bool(d),
                                has_bias) for d in range(2)]
        db = torch.stack([o[4] for o in outs]) if has_bias else outs[0][4]
        return (torch.cat([o[0] for o in outs], dim=1), torch.stack([o[1] for o in outs]),
                torch.stack([o[2] for o in outs]), torch.stack([o[3] for o in outs]), db)
    return backward
