"""Drop-in replacements for ``torch.nn.GRU`` and ``torch.nn.LSTM``.

The classes subclass the torch.nn ones, so constructor arguments, parameter
names, shapes, initialisation and ``state_dict`` are torch's own; only
``forward`` changes. Per layer and direction it computes the input projection
for all steps with one matrix product (both directions stacked into one GEMM)
and runs the recurrence through the fused op
(:func:`fastseq.ops.gru` / :func:`fastseq.ops.lstm`).

Variable-length input (``PackedSequence``) is handled inside the recurrence:
rows stop updating after their length, and the reverse direction reads each
row reversed within its own length, exactly as cuDNN's packed mode does.

Errors are those of torch.nn for the same input (:mod:`fastseq.ops.validation`).

``torch.compile``: Dynamo refuses to trace any subclass of torch.nn.GRU/LSTM
unless ``torch._dynamo.config.allow_rnn`` is set. fastseq does not set it (that
would change how Dynamo treats your own torch.nn RNNs); without it, a compiled
model runs these modules eagerly at a graph break. To trace them
(``fullgraph=True``), opt in around the compiled call::

    with torch._dynamo.config.patch(allow_rnn=True):
        out = compiled_model(x)
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastseq import ops
from fastseq.ops import validation
from fastseq.ops.validation import ArgumentTypeError

__all__ = ["GRU", "LSTM"]


def reverse_padded(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Reverse time-major ``x [T, B, ...]`` within each row's length.

    Positions ``t >= lengths[b]`` are left where they are. The map is its own
    inverse, so the same call turns reversed outputs back into input order.
    """
    if lengths is None:
        return x.flip(0)
    T, B = x.shape[0], x.shape[1]
    t = torch.arange(T, device=x.device).unsqueeze(1)  # [T, 1]
    lens = lengths.to(x.device).unsqueeze(0)  # [1, B]
    idx = torch.where(t < lens, lens - 1 - t, t)  # [T, B]
    idx = idx.view(T, B, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, idx)


class _FusedRNNBase:
    """forward() shared by GRU and LSTM; subclasses set ``_IS_LSTM``."""

    _IS_LSTM = False

    # -- input handling -----------------------------------------------------
    def _prepare(self, input, hx):
        """Bring input/hx to time-major padded form.

        Returns (x [T,B,I], lengths or None, hx as a tuple of [D*L,B,H] or None,
        (kind, packed input or None)) where kind says how to shape the output.
        """
        if isinstance(input, PackedSequence):
            # lengths stay on the CPU here (pad_packed_sequence returns them there):
            # forward() checks them on the CPU and moves them to the device once.
            x, lengths = pad_packed_sequence(input, batch_first=False)
            lengths = lengths.to(dtype=torch.int64)
            if x.shape[-1] != self.input_size:
                raise RuntimeError(
                    f"input: expected size(-1) == input_size={self.input_size}, "
                    f"got a PackedSequence with data of shape {tuple(input.data.shape)}"
                )
            if hx is not None:
                hx = self._as_tuple(hx)
                self._check_hx(hx, x.shape[1])
            return x, lengths, hx, ("packed", input)
        if not isinstance(input, Tensor):
            raise ArgumentTypeError(
                f"input: expected a Tensor or PackedSequence, got {type(input).__name__}"
            )
        if input.dim() not in (2, 3):
            raise ValueError(
                f"input: expected a 2-D (unbatched) or 3-D (batched) tensor, "
                f"got {input.dim()}-D with shape {tuple(input.shape)}"
            )
        unbatched = input.dim() == 2
        if hx is not None:
            hx = self._as_tuple(hx)
        if unbatched:
            x = input.unsqueeze(1)
            if hx is not None:
                for name, h in zip(("h_0", "c_0"), hx):
                    if h.dim() != 2:
                        raise RuntimeError(
                            f"{name}: for unbatched 2-D input expected a 2-D hidden state, "
                            f"got {h.dim()}-D with shape {tuple(h.shape)}"
                        )
                self._check_hx(hx, None)
                hx = tuple(h.unsqueeze(1) for h in hx)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        if x.shape[-1] != self.input_size:
            raise RuntimeError(
                f"input: expected size(-1) == input_size={self.input_size}, "
                f"got shape {tuple(input.shape)}"
            )
        if x.shape[0] == 0:  # torch.nn raises too ("Expected sequence length to be larger than 0")
            raise RuntimeError(
                f"input: expected a sequence length >= 1, got shape {tuple(input.shape)} "
                f"(sequence length 0)"
            )
        if hx is not None and not unbatched:
            self._check_hx(hx, x.shape[1])
        return x, None, hx, ("unbatched" if unbatched else "dense", None)

    def _as_tuple(self, hx) -> Tuple[Tensor, ...]:
        if self._IS_LSTM:
            return validation.state_pair(hx, "(h_0, c_0) for LSTM", ("hx[0] (h_0)", "hx[1] (c_0)"))
        if not isinstance(hx, Tensor):
            raise ArgumentTypeError(f"hx: expected a Tensor h_0 for GRU, got {type(hx).__name__}")
        return (hx,)

    def _check_hx(self, hx: Tuple[Tensor, ...], batch: Optional[int]) -> None:
        """hx shapes for a batch of ``batch`` rows (None: unbatched input, 2-D states)."""
        D = 2 if self.bidirectional else 1
        if batch is None:
            expected, layout = (D * self.num_layers, self.hidden_size), "(num_layers*num_directions, hidden_size)"
        else:
            expected = (D * self.num_layers, batch, self.hidden_size)
            layout = "(num_layers*num_directions, batch, hidden_size)"
        for name, h in zip(("h_0", "c_0"), hx):
            validation.shape(name, h, expected, f"{layout} = ")

    def _check_params(self, x: Tensor) -> None:
        w = self.weight_hh_l0
        if x.device != w.device:
            raise RuntimeError(
                f"input: expected device {w.device} (the module's parameters), got {x.device}"
            )
        validation.floating("input", x, ValueError)
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"input: expected dtype {w.dtype} (the module's parameters), got {x.dtype}"
            )

    # -- the layer stack ------------------------------------------------------
    def _layer_params(self, layer: int, direction: int) -> List[Optional[Tensor]]:
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
        if not self.bias:
            return [getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx), None, None]
        return [getattr(self, n + sfx) for n in names]

    def _run(self, x: Tensor, lengths: Optional[Tensor], h0s, c0s):
        D = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            params = [self._layer_params(layer, d) for d in range(D)]
            # One GEMM for the input projection of every step and both directions.
            w_ih = torch.cat([p[0] for p in params]) if D > 1 else params[0][0]
            # An LSTM adds b_ih and b_hh to the same pre-activations: fold b_hh into the
            # projection's bias (one fused addmm; autograd gives both the same gradient).
            fold = self._IS_LSTM and self.bias
            b_ih = None
            if self.bias:
                b_ih = torch.cat([p[2] + p[3] if fold else p[2] for p in params])
            # A contiguous input lets F.linear fuse the bias into the GEMM (addmm).
            gi_all = F.linear(x.contiguous(), w_ih, b_ih)
            gi_dirs = gi_all.chunk(D, dim=-1)
            outs = []
            for d in range(D):
                gi = gi_dirs[d] if d == 0 else reverse_padded(gi_dirs[d], lengths)
                w_hh, b_hh = params[d][1], (None if fold else params[d][3])
                if w_hh.dtype != gi.dtype:  # autocast: run the recurrence in gi's dtype
                    w_hh = w_hh.to(gi.dtype)
                    b_hh = b_hh.to(gi.dtype) if b_hh is not None else None
                k = layer * D + d
                h0 = h0s[k].to(gi.dtype)
                if self._IS_LSTM:
                    hs, cs = ops.lstm(gi.contiguous(), h0, c0s[k].to(gi.dtype), w_hh, b_hh, lengths)
                    c_n.append(cs[-1])
                else:
                    hs = ops.gru(gi.contiguous(), h0, w_hh, b_hh, lengths)
                h_n.append(hs[-1])
                outs.append(hs if d == 0 else reverse_padded(hs, lengths))
            x = torch.cat(outs, dim=-1) if D > 1 else outs[0]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, p=self.dropout, training=True)
        return x, torch.stack(h_n), (torch.stack(c_n) if self._IS_LSTM else None)

    def forward(self, input, hx=None):  # noqa: D401 - torch.nn signature
        x, lengths, hx, (kind, packed) = self._prepare(input, hx)
        self._check_params(x)
        D = 2 if self.bidirectional else 1
        B = x.shape[1]
        if hx is None:
            zeros = x.new_zeros((D * self.num_layers, B, self.hidden_size))
            h0s, c0s = zeros, zeros
        else:
            h0s = hx[0]
            c0s = hx[1] if self._IS_LSTM else None
            autocast = torch.is_autocast_enabled(x.device.type)
            for name, h in zip(("h_0", "c_0"), hx):
                if h.device != x.device:
                    raise RuntimeError(f"{name}: expected device {x.device}, got {h.device}")
                if h.dtype != x.dtype and not (autocast and h.is_floating_point()):
                    raise RuntimeError(f"{name}: expected dtype {x.dtype} (that of input), got {h.dtype}")
        if lengths is not None:  # checked on the CPU, moved once; the ops reuse the check
            lengths = validation.lengths("lengths", lengths, B, x.shape[0], x.device)
        y, h_n, c_n = self._run(x, lengths, h0s, c0s)
        if kind == "packed":
            order = packed.sorted_indices
            y_sorted = y if order is None else y.index_select(1, order)
            # The sorted lengths from the (CPU) batch sizes: no device-to-host copy.
            bs = packed.batch_sizes
            lens_sorted = (bs.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)
            data = pack_padded_sequence(y_sorted, lens_sorted, enforce_sorted=True).data
            out = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        elif kind == "unbatched":
            out = y.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        else:
            out = y.transpose(0, 1) if self.batch_first else y
        if self._IS_LSTM:
            return out, (h_n, c_n)
        return out, h_n


class GRU(_FusedRNNBase, torch.nn.GRU):
    r"""Multi-layer GRU, a drop-in for :class:`torch.nn.GRU` (Cho et al. 2014).

    Same constructor (input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device, dtype), same
    parameters and state_dict, same forward:

    Args:
        input: ``[T, B, input_size]`` (``[B, T, input_size]`` if batch_first),
            ``[T, input_size]`` unbatched, or a ``PackedSequence``. float32,
            float16, bfloat16 (fused on CUDA) or float64 (reference path).
        hx: h_0, ``[D*num_layers, B, hidden_size]`` (``[D*num_layers, hidden_size]``
            unbatched); zeros if omitted. D = 2 if bidirectional else 1.

    Returns:
        (output, h_n): output ``[T, B, D*hidden_size]`` (or packed / batch_first /
        unbatched as the input), h_n ``[D*num_layers, B, hidden_size]``.

    Raises:
        RuntimeError: a wrong size of ``input`` or ``hx``, a wrong device, a
            dtype of ``hx`` other than the input's, a sequence length of 0.
        ValueError: ``input`` not 2-D or 3-D; its dtype not the parameters'.
        fastseq.ops.validation.ArgumentTypeError: ``input`` or ``hx`` of the wrong
            Python type. (The classes torch.nn raises for the same input; each
            message names the argument, the expected and the actual value.)
    """

    _IS_LSTM = False


class LSTM(_FusedRNNBase, torch.nn.LSTM):
    r"""Multi-layer LSTM, a drop-in for :class:`torch.nn.LSTM` (Hochreiter & Schmidhuber 1997).

    As :class:`GRU`, with ``hx = (h_0, c_0)`` and returning
    ``(output, (h_n, c_n))``; gate order i, f, g, o as torch.nn.LSTM.

    Raises:
        NotImplementedError: ``proj_size > 0`` (projected LSTMs are not fused yet).
    """

    _IS_LSTM = True

    def __init__(self, *args, **kwargs):
        proj = kwargs.get("proj_size", args[7] if len(args) > 7 else 0)
        if proj:
            raise NotImplementedError(
                f"fastseq.nn.LSTM: proj_size > 0 is not supported (got proj_size={proj}); "
                "use torch.nn.LSTM for projected LSTMs"
            )
        super().__init__(*args, **kwargs)
