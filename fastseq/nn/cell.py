"""Drop-in replacements for ``torch.nn.GRUCell`` and ``torch.nn.LSTMCell``.

One step of the recurrence: the input projection is one ``F.linear``, and the
recurrent product plus the gate nonlinearities run in the same fused op as the
full-sequence layers (a length-1 sequence). Errors are those of torch.nn for the
same input (:mod:`fastseq.ops.validation`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastseq import ops
from fastseq.ops import validation

__all__ = ["GRUCell", "LSTMCell"]


def _check_cell_input(cell: torch.nn.RNNCellBase, input: Tensor, hx: Tuple[Optional[Tensor], ...],
                      names: Tuple[str, ...]) -> bool:
    """Validate like torch.nn (same exception classes); returns True for unbatched (1-D) input."""
    validation.tensor("input", input)
    for name, h in zip(names, hx):
        validation.optional_tensor(name, h)
    if input.dim() not in (1, 2):
        raise ValueError(
            f"input: expected a 1-D (unbatched) or 2-D (batched) tensor, "
            f"got {input.dim()}-D with shape {tuple(input.shape)}"
        )
    if input.shape[-1] != cell.input_size:
        raise RuntimeError(
            f"input: expected size(-1) == input_size={cell.input_size}, got shape {tuple(input.shape)}"
        )
    w = cell.weight_hh
    if input.device != w.device:
        raise RuntimeError(f"input: expected device {w.device} (the module's parameters), got {input.device}")
    autocast = torch.is_autocast_enabled(input.device.type)
    validation.floating("input", input)
    if input.dtype != w.dtype and not autocast:
        raise RuntimeError(f"input: expected dtype {w.dtype} (the module's parameters), got {input.dtype}")
    unbatched = input.dim() == 1
    expected = (cell.hidden_size,) if unbatched else (input.shape[0], cell.hidden_size)
    for name, h in zip(names, hx):
        if h is None:
            continue
        validation.shape(name, h, expected)
        if h.device != input.device:
            raise RuntimeError(f"{name}: expected device {input.device} (that of input), got {h.device}")
        if h.dtype != input.dtype and not (autocast and h.is_floating_point()):
            raise RuntimeError(f"{name}: expected dtype {input.dtype} (that of input), got {h.dtype}")
    return unbatched


def _recurrent_params(cell: torch.nn.RNNCellBase, dtype: torch.dtype):
    w_hh, b_hh = cell.weight_hh, cell.bias_hh
    if w_hh.dtype != dtype:  # autocast
        w_hh = w_hh.to(dtype)
        b_hh = b_hh.to(dtype) if b_hh is not None else None
    return w_hh, b_hh


class GRUCell(torch.nn.GRUCell):
    r"""GRU cell, a drop-in for :class:`torch.nn.GRUCell` (Cho et al. 2014).

    Args:
        input: ``[B, input_size]`` or ``[input_size]`` (unbatched).
        hx: h ``[B, hidden_size]`` (or ``[hidden_size]``); zeros if omitted.

    Returns:
        h' with the shape of ``hx``.

    Raises:
        ValueError: ``input`` not 1-D or 2-D.
        RuntimeError: a wrong size, dtype or device of ``input`` or ``hx``.
        fastseq.ops.validation.ArgumentTypeError: an argument that is not a tensor.
        (The classes torch.nn raises for the same input; each message names the
        argument, the expected and the actual value.)
    """

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        unbatched = _check_cell_input(self, input, (hx,), ("hx",))
        x = input.unsqueeze(0) if unbatched else input
        gi = F.linear(x, self.weight_ih, self.bias_ih)
        h = x.new_zeros((x.shape[0], self.hidden_size), dtype=gi.dtype) if hx is None else \
            (hx.unsqueeze(0) if unbatched else hx).to(gi.dtype)
        w_hh, b_hh = _recurrent_params(self, gi.dtype)
        h_new = ops.gru(gi.unsqueeze(0), h, w_hh, b_hh)[0]
        return h_new.squeeze(0) if unbatched else h_new


class LSTMCell(torch.nn.LSTMCell):
    r"""LSTM cell, a drop-in for :class:`torch.nn.LSTMCell` (gate order i, f, g, o).

    Args:
        input: ``[B, input_size]`` or ``[input_size]`` (unbatched).
        hx: ``(h, c)``, each ``[B, hidden_size]`` (or ``[hidden_size]``); zeros if omitted.

    Returns:
        ``(h', c')`` with the shapes of ``hx``.

    Raises:
        As :class:`GRUCell`; also RuntimeError for an ``hx`` tuple whose length is not
        2, or whose ``h`` and ``c`` dtypes differ (torch.nn.LSTMCell promotes them on
        the CPU; fastseq rejects).
    """

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        h0, c0 = (None, None) if hx is None else \
            validation.state_pair(hx, "(h, c) for LSTMCell", ("hx[0] (h)", "hx[1] (c)"))
        unbatched = _check_cell_input(self, input, (h0, c0), ("hx[0] (h)", "hx[1] (c)"))
        x = input.unsqueeze(0) if unbatched else input
        gi = F.linear(x, self.weight_ih, self.bias_ih)
        shape = (x.shape[0], self.hidden_size)
        if hx is None:
            h0 = c0 = x.new_zeros(shape, dtype=gi.dtype)
        else:
            h0, c0 = (t.unsqueeze(0) if unbatched else t for t in (h0, c0))
            h0, c0 = h0.to(gi.dtype), c0.to(gi.dtype)
        w_hh, b_hh = _recurrent_params(self, gi.dtype)
        hs, cs = ops.lstm(gi.unsqueeze(0), h0, c0, w_hh, b_hh)
        h, c = hs[0], cs[0]
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)
