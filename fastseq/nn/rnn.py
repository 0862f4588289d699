"""Drop-in replacements for ``torch.nn.GRU`` and ``torch.nn.LSTM``.

The classes subclass the torch.nn ones, so constructor arguments, parameter
names, shapes, initialisation and ``state_dict`` are torch's own; only
``forward`` changes. Per layer and direction it computes the input projection
for all steps with one matrix product and runs the recurrence through the
fused op (:func:`fastseq.ops.gru` / :func:`fastseq.ops.lstm`; the reverse
direction through :func:`fastseq.ops.gru_packed` / :func:`fastseq.ops.lstm_packed`
with ``reverse=True``, which reads and writes the steps in time order).

Variable-length input (``PackedSequence``) stays packed, as in cuDNN's packed
mode: the input projection covers only the N real tokens, step t of the
recurrence computes only the ``batch_sizes[t]`` rows still running
(:func:`fastseq.ops.gru_packed`), and the reverse direction runs on the same
packed rows from each row's last step back (no padding, no reversal copies).

Bidirectional layers on the Triton backend run both directions at once
(:func:`fastseq.ops.gru_bidirectional`): one GEMM for both directions' input
projections, one launch per step for both recurrences, the output written in
place of the concatenation. The other backends run one direction after the other.

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
from torch.nn.utils.rnn import PackedSequence

from fastseq import ops
from fastseq.ops import validation
from fastseq.ops.validation import ArgumentTypeError

__all__ = ["GRU", "LSTM"]


class _FusedRNNBase:
    """forward() shared by GRU and LSTM; subclasses set ``_IS_LSTM``."""

    _IS_LSTM = False

    # -- input handling -----------------------------------------------------
    def _prepare(self, input, hx):
        """Check input/hx and bring dense input to time-major form.

        Returns (x: [T,B,I], or the packed data [N,I]; hx as a tuple of
        [D*L,B,H] or None; (kind, packed input or None)) where kind
        ("dense", "unbatched", "packed") says how to shape the output.
        """
        if isinstance(input, PackedSequence):
            # Packed input stays packed: the recurrence runs on its layout (rows sorted
            # by length, step t computes only batch_sizes[t] rows), see _run_packed.
            if input.data.dim() != 2 or input.data.shape[-1] != self.input_size:
                raise RuntimeError(
                    f"input: expected size(-1) == input_size={self.input_size}, "
                    f"got a PackedSequence with data of shape {tuple(input.data.shape)}"
                )
            if hx is not None:
                hx = self._as_tuple(hx)
                self._check_hx(hx, int(input.batch_sizes[0]))
            return input.data, hx, ("packed", input)
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
        return x, hx, ("unbatched" if unbatched else "dense", None)

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
    _PARAM_NAMES: dict = {}

    def _layer_params(self, layer: int, direction: int) -> List[Optional[Tensor]]:
        key = (layer, direction, self.bias)
        names = self._PARAM_NAMES.get(key)
        if names is None:
            sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
            names = tuple(n + sfx for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[:4 if self.bias else 2])
            self._PARAM_NAMES[key] = names
        params = [getattr(self, n) for n in names]
        return params if self.bias else params + [None, None]

    def _direction_inputs(self, x: Tensor, layer: int, d: int):
        """(gi, w_hh, b_hh) of one layer and direction: the input projection of every
        row of ``x`` (one GEMM; an LSTM's b_hh folded into its bias, one fused addmm
        whose autograd gives both biases the same gradient) and the recurrent weights
        in gi's dtype (autocast)."""
        w_ih, w_hh, b_ih, b_hh = self._layer_params(layer, d)
        if self._IS_LSTM and b_hh is not None:
            b_ih, b_hh = b_ih + b_hh, None
        gi = F.linear(x, w_ih, b_ih)
        if w_hh.dtype != gi.dtype:  # autocast: run the recurrence in gi's dtype
            w_hh = w_hh.to(gi.dtype)
            b_hh = b_hh.to(gi.dtype) if b_hh is not None else None
        return gi, w_hh, b_hh

    def _bidirectional_layer(self, x: Tensor, layer: int, h0s: Tensor, c0s: Optional[Tensor], bs: Tensor,
                             final: Tensor):
        """Both directions of bidirectional ``layer`` at once (:func:`fastseq.ops.gru_bidirectional`:
        one launch per step for both, Triton): x ``[N, I]`` on the packed layout ``bs``
        -> (out ``[N, 2H]``, [h_n forward, reverse], [c_n forward, reverse] or []).
        ``final``: the forward direction's final rows (the reverse ends at rows 0 .. B-1)."""
        H = self.hidden_size
        fw, rv = self._layer_params(layer, 0), self._layer_params(layer, 1)
        w_ih = torch.cat([fw[0], rv[0]])
        b_ih, b_hh = None, None
        if self.bias:
            if self._IS_LSTM:  # b_hh folded into the GEMM's bias, as in _direction_inputs
                b_ih = torch.cat([fw[2] + fw[3], rv[2] + rv[3]])
            else:
                b_ih, b_hh = torch.cat([fw[2], rv[2]]), torch.stack([fw[3], rv[3]])
        gi = F.linear(x, w_ih, b_ih)
        w_hh = torch.stack([fw[1], rv[1]]).to(gi.dtype)
        b_hh = b_hh.to(gi.dtype) if b_hh is not None else None
        k = slice(2 * layer, 2 * layer + 2)
        h0 = h0s[k].to(gi.dtype)
        B = h0.shape[1]
        if self._IS_LSTM:
            out, cs = ops.lstm_bidirectional(gi, h0, c0s[k].to(gi.dtype), w_hh, None, bs)
            c_n = [cs[final, :H], cs[:B, H:]]
        else:
            out, c_n = ops.gru_bidirectional(gi, h0, w_hh, b_hh, bs), []
        return out, [out[final, :H], out[:B, H:]], c_n

    def _run(self, x: Tensor, h0s, c0s):
        """The layer stack on dense time-major input ``x [T, B, I]`` -> ``[T, B, D*H]``.

        The reverse direction runs the packed recurrence with every row T steps long
        (``reverse=True`` reads and writes the rows in time order: no flipped copies).
        """
        D = 2 if self.bidirectional else 1
        T, B = x.shape[0], x.shape[1]
        H = self.hidden_size
        full = torch.full((T,), B, dtype=torch.int64) if D > 1 else None  # batch_sizes of the dense batch
        h_n, c_n = [], []
        G = 4 if self._IS_LSTM else 3
        if D > 1 and B > 0 and ops.fuses_directions(x, B, H, G, T):
            final = torch.arange((T - 1) * B, T * B, device=x.device)
            for layer in range(self.num_layers):
                out, h, c = self._bidirectional_layer(x.reshape(T * B, x.shape[-1]), layer, h0s, c0s, full, final)
                x = out.view(T, B, 2 * H)
                h_n += h
                c_n += c
                if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                    x = F.dropout(x, p=self.dropout, training=True)
            return x, torch.stack(h_n), (torch.stack(c_n) if self._IS_LSTM else None)
        for layer in range(self.num_layers):
            x = x.contiguous()  # lets F.linear fuse the bias into the GEMM (addmm)
            outs = []
            for d in range(D):
                gi, w_hh, b_hh = self._direction_inputs(x, layer, d)
                k = layer * D + d
                h0 = h0s[k] if h0s.dtype == gi.dtype else h0s[k].to(gi.dtype)
                # (an empty batch has no packed layout: its reverse direction is the empty dense op)
                packed_reverse = d == 1 and B > 0
                if self._IS_LSTM:
                    c0 = c0s[k] if c0s.dtype == gi.dtype else c0s[k].to(gi.dtype)
                    if not packed_reverse:
                        hs, cs = ops.lstm(gi, h0, c0, w_hh, b_hh)
                    else:
                        hs, cs = (t.view(T, B, H) for t in ops.lstm_packed(
                            gi.view(T * B, gi.shape[-1]), h0, c0, w_hh, b_hh, full, reverse=True))
                    c_n.append(cs[0] if packed_reverse else cs[-1])
                elif not packed_reverse:
                    hs = ops.gru(gi, h0, w_hh, b_hh)
                else:
                    hs = ops.gru_packed(gi.view(T * B, gi.shape[-1]), h0, w_hh, b_hh, full,
                                        reverse=True).view(T, B, H)
                h_n.append(hs[0] if packed_reverse else hs[-1])
                outs.append(hs)
            x = torch.cat(outs, dim=-1) if D > 1 else outs[0]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, p=self.dropout, training=True)
        if len(h_n) == 1:
            return x, h_n[0].unsqueeze(0), (c_n[0].unsqueeze(0) if self._IS_LSTM else None)
        return x, torch.stack(h_n), (torch.stack(c_n) if self._IS_LSTM else None)

    def _run_packed(self, packed: PackedSequence, h0s: Tensor, c0s: Optional[Tensor]):
        """The layer stack on a PackedSequence's layout: data ``[N, I]`` -> ``[N, D*H]``.

        h0s/c0s are in the packed (sorted) row order. Per layer and direction: one
        GEMM for the input projection of the N real rows (no padding), then the
        packed recurrence; the reverse direction reads the same packed rows.
        """
        D = 2 if self.bidirectional else 1
        bs = packed.batch_sizes
        final = [ops.packed_final_rows(bs, reverse=bool(d)) for d in range(D)]
        x = packed.data
        h_n, c_n = [], []
        if D > 1 and ops.fuses_directions(x, int(bs[0]), self.hidden_size, 4 if self._IS_LSTM else 3, bs.shape[0]):
            rows = final[0].to(x.device)
            for layer in range(self.num_layers):
                x, h, c = self._bidirectional_layer(x, layer, h0s, c0s, bs, rows)
                h_n += h
                c_n += c
                if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                    x = F.dropout(x, p=self.dropout, training=True)
            return x, torch.stack(h_n), (torch.stack(c_n) if self._IS_LSTM else None)
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                gi, w_hh, b_hh = self._direction_inputs(x, layer, d)
                k = layer * D + d
                h0 = h0s[k].to(gi.dtype)
                rows = final[d].to(gi.device)
                if self._IS_LSTM:
                    hs, cs = ops.lstm_packed(gi, h0, c0s[k].to(gi.dtype), w_hh, b_hh, bs, reverse=bool(d))
                    c_n.append(cs.index_select(0, rows))
                else:
                    hs = ops.gru_packed(gi, h0, w_hh, b_hh, bs, reverse=bool(d))
                h_n.append(hs.index_select(0, rows))
                outs.append(hs)
            x = torch.cat(outs, dim=-1) if D > 1 else outs[0]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, p=self.dropout, training=True)
        return x, torch.stack(h_n), (torch.stack(c_n) if self._IS_LSTM else None)

    def forward(self, input, hx=None):  # noqa: D401 - torch.nn signature
        x, hx, (kind, packed) = self._prepare(input, hx)
        self._check_params(x)
        D = 2 if self.bidirectional else 1
        B = x.shape[1] if kind != "packed" else int(packed.batch_sizes[0])
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
        if kind == "packed":
            order = packed.sorted_indices
            if hx is not None and order is not None:  # hx in the caller's order -> packed order
                h0s = h0s.index_select(1, order)
                c0s = c0s.index_select(1, order) if c0s is not None else None
            y, h_n, c_n = self._run_packed(packed, h0s, c0s)
            back = packed.unsorted_indices
            if back is not None:
                h_n = h_n.index_select(1, back)
                c_n = c_n.index_select(1, back) if c_n is not None else None
            out = PackedSequence(y, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
            return (out, (h_n, c_n)) if self._IS_LSTM else (out, h_n)
        y, h_n, c_n = self._run(x, h0s, c0s)
        if kind == "unbatched":
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
