"""Inputs like torch.nn: every public op and module validates its input, accepts
what torch.nn accepts with the same result, and falls back on shapes a kernel
cannot take.

Public surface covered: ``fastseq.ops.gru``, ``ops.lstm``,
``ops.additive_attention``, ``ops.gru_context_cell``, ``ops.attention_gru_step``
and the modules ``fastseq.nn.GRU``, ``LSTM``, ``GRUCell``, ``LSTMCell``,
``AdditiveAttention`` (``forward`` and ``precompute_keys``).

Three groups, each a registry of cases and one parametrized test; every case
runs on every backend available here (reference, triton under the
interpreter, cpp), inside the test, so one case is one test id:

``bad-<id>`` (:data:`BAD`, :func:`test_bad_input`)
    One bad input: a wrong rank, size, dtype or device (``meta`` tensors give
    a device mismatch on a CPU machine), bad ``lengths`` (<= 0, > T, wrong
    count, float dtype, ...), a non-tensor argument, a bad mask. Each case is
    (id, call, exception type, substrings); the message must contain every
    substring: at least the argument's name and the actual bad
    value/shape/dtype. Cases marked ``torch_too`` are module calls that
    torch.nn also rejects; the test checks torch.nn raises for them as well,
    and that fastseq's exception is an instance of torch.nn's exception class
    (so ``except RuntimeError:`` written for torch.nn catches fastseq's), so
    fastseq rejects exactly where torch.nn does, with torch.nn's class.
``like-torch-<id>`` (:data:`LIKE`, :func:`test_like_torch`)
    An input torch.nn accepts: empty batch, non-contiguous, transposed,
    expanded (stride 0) and sliced inputs and states, unbatched input, NaN and
    Inf, batch_first, PackedSequence with enforce_sorted=False. fastseq's
    outputs and gradients (input, states, every parameter; random upstream
    gradient) must equal torch.nn's, NaN/Inf at the same places
    (tests/parity.py's ``assert_close``). For AdditiveAttention, which has no
    torch.nn counterpart, the comparison is the plain-PyTorch formula.
``test_limit_*``
    A shape a fused backend cannot take (limits lowered by monkeypatching
    the module constants, which tests the mechanism on small tensors): the
    result equals the reference and exactly one RuntimeWarning is issued for
    repeated calls; and the real limits (B > 65535 attention rows, ``G*H*H``
    past int32, ...) are named. ``test_lengths_values_are_checked_once_per_tensor``:
    the cost side of the lengths check.

Counting (the README's "N bad inputs tried")::

    python -m pytest --collect-only -q tests/reliability/test_rel_inputs.py | grep -c "\\[bad-"
    python -m pytest --collect-only -q tests/reliability/test_rel_inputs.py | grep -c "\\[like-torch-"

or ``PYTHONPATH=. python tests/reliability/test_rel_inputs.py`` (prints both counts).
Each case runs on every available backend inside its one test item, so the
counts are of distinct inputs, not of (input, backend) runs.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Type

import pytest
import torch
from parity import assert_all_close, assert_close
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastseq
import fastseq.nn as fnn
from conftest import ALL_BACKENDS, available, require
from fastseq import ops
from fastseq.backend import extent, limits, registry, warn
from fastseq.ops.decoder_step import StepWeights

META = torch.device("meta")


def backend_names() -> List[str]:
    """The backends that run here (the C++ extension is built on first call, not at collection)."""
    return [name for name in ALL_BACKENDS if available(name, "cpu")]


def r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def ints(*values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype)


# =============================================================== bad inputs


class Bad(NamedTuple):
    id: str
    call: Callable[[], object]  # makes the call (tiny tensors; some built at import)
    exc: Type[BaseException]
    subs: Tuple[str, ...]  # substrings the message must contain
    torch_too: Optional[Callable[[], object]] = None  # the same call on torch.nn, which raises too


BAD: List[Bad] = []


def bad(id: str, exc, subs: Sequence[str], call, torch_call=None) -> None:
    BAD.append(Bad(id, call, exc, tuple(subs), torch_call))


def mod_bad(id: str, exc, subs: Sequence[str], build, call, torch_raises: bool = True) -> None:
    """A module case: ``build(nn_namespace)`` makes the module (fastseq.nn or
    torch.nn), ``call(module)`` makes the bad call; torch.nn must raise too
    unless ``torch_raises`` is False (a documented difference)."""

    def fast():
        torch.manual_seed(0)
        return call(build(fnn))

    def ref():
        torch.manual_seed(0)
        return call(build(torch.nn))

    bad(id, exc, subs, fast, ref if torch_raises else None)


# ---- ops.gru / ops.lstm ---------------------------------------------------
# T=3, B=2, H=4
def _rnn_args(G, **over):
    a = dict(gi=r(3, 2, G * 4), h0=r(2, 4), w_hh=r(G * 4, 4), b_hh=r(G * 4), lengths=None)
    if G == 4:
        a["c0"] = r(2, 4)
    a.update(over)
    return a


def _call_rnn(G, **over):
    a = _rnn_args(G, **over)
    if G == 3:
        return lambda: ops.gru(a["gi"], a["h0"], a["w_hh"], a["b_hh"], a["lengths"])
    return lambda: ops.lstm(a["gi"], a["h0"], a["c0"], a["w_hh"], a["b_hh"], a["lengths"])


for _op, _G in (("gru", 3), ("lstm", 4)):
    def _case(id, exc, subs, G=_G, op=_op, **over):
        bad(f"ops.{op}-{id}", exc, subs, lambda: _call_rnn(G, **over)())

    GH = 4 * _G
    # non-tensor arguments
    _case("gi-list", TypeError, ["gi", "list"], gi=[[0.0] * GH] * 2)
    _case("gi-none", TypeError, ["gi", "NoneType"], gi=None)
    _case("h0-none", TypeError, ["h0", "NoneType"], h0=None)
    _case("w_hh-none", TypeError, ["w_hh", "NoneType"], w_hh=None)
    _case("b_hh-list", TypeError, ["b_hh", "list"], b_hh=[0.0] * GH)
    _case("lengths-list", TypeError, ["lengths", "list"], lengths=[1, 2])
    # rank and size
    _case("gi-2d", RuntimeError, ["gi", "3-D", f"(2, {GH})"], gi=r(2, GH))
    _case("gi-4d", RuntimeError, ["gi", "3-D", f"(1, 3, 2, {GH})"], gi=r(1, 3, 2, GH))
    _case("gi-wrong-gates", RuntimeError, ["gi", f"{_G}*H = {GH}", f"(3, 2, {GH + 1})"], gi=r(3, 2, GH + 1))
    _case("h0-1d", RuntimeError, ["h0", "2-D", "(4,)"], h0=r(4))
    _case("h0-3d", RuntimeError, ["h0", "2-D", "(1, 2, 4)"], h0=r(1, 2, 4))
    _case("h0-wrong-batch", RuntimeError, ["h0", "(2, 4)", "(3, 4)"], h0=r(3, 4))
    _case("w_hh-transposed-shape", RuntimeError, ["w_hh", f"({GH}, 4)", f"(4, {GH})"], w_hh=r(4, GH))
    _case("b_hh-wrong-size", RuntimeError, ["b_hh", f"({GH},)", f"({GH - 1},)"], b_hh=r(GH - 1))
    # dtype
    _case("gi-int", RuntimeError, ["gi", "floating-point", "torch.int64"],
          gi=torch.ones(3, 2, GH, dtype=torch.int64), h0=torch.ones(2, 4, dtype=torch.int64),
          w_hh=torch.ones(GH, 4, dtype=torch.int64), b_hh=None)
    _case("h0-float64", RuntimeError, ["h0", "torch.float32", "torch.float64"], h0=r(2, 4, dtype=torch.float64))
    _case("w_hh-float16", RuntimeError, ["w_hh", "torch.float16"], w_hh=r(GH, 4).half())
    _case("b_hh-float64", RuntimeError, ["b_hh", "torch.float64"], b_hh=r(GH, dtype=torch.float64))
    # device
    _case("h0-meta", RuntimeError, ["h0", "device", "meta"], h0=r(2, 4, device=META))
    _case("w_hh-meta", RuntimeError, ["w_hh", "meta"], w_hh=r(GH, 4, device=META))
    _case("b_hh-meta", RuntimeError, ["b_hh", "meta"], b_hh=r(GH, device=META))
    _case("lengths-meta", RuntimeError, ["lengths", "meta"], lengths=torch.ones(2, dtype=torch.int64, device=META))
    # lengths values, count, dtype
    _case("lengths-zero", RuntimeError, ["lengths", ">= 1", "got 0"], lengths=ints(3, 0))
    _case("lengths-negative", RuntimeError, ["lengths", ">= 1", "got -2"], lengths=ints(-2, 1))
    _case("lengths-past-T", RuntimeError, ["lengths", "<= T = 3", "got 4"], lengths=ints(4, 1))
    _case("lengths-past-T-int32", RuntimeError, ["lengths", "<= T = 3", "got 7"], lengths=ints(1, 7, dtype=torch.int32))
    _case("lengths-wrong-count", RuntimeError, ["lengths", "(2,)", "(3,)"], lengths=ints(1, 2, 3))
    _case("lengths-2d", RuntimeError, ["lengths", "(2,)", "(1, 2)"], lengths=torch.tensor([[1, 2]]))
    _case("lengths-float", RuntimeError, ["lengths", "int32/int64", "torch.float32"], lengths=torch.tensor([1.0, 2.0]))
    _case("lengths-bool", RuntimeError, ["lengths", "torch.bool"], lengths=torch.tensor([True, True]))
    _case("lengths-int16", RuntimeError, ["lengths", "torch.int16"], lengths=ints(1, 2, dtype=torch.int16))
    if _G == 4:
        _case("c0-list", TypeError, ["c0", "list"], c0=[[0.0] * 4] * 2)
        _case("c0-wrong-shape", RuntimeError, ["c0", "(2, 4)", "(2, 5)"], c0=r(2, 5))
        _case("c0-float64", RuntimeError, ["c0", "torch.float64"], c0=r(2, 4, dtype=torch.float64))
        _case("c0-meta", RuntimeError, ["c0", "meta"], c0=r(2, 4, device=META))


# ---- ops.additive_attention -------------------------------------------------
# B=2, S=5, A=4, D=3, T=2 (multi-query) or single query
def _att(**over):
    a = dict(query=r(2, 4), proj_keys=r(2, 5, 4), values=r(2, 5, 3), energy=r(4), mask=None, lengths=None)
    a.update(over)
    return lambda: ops.additive_attention(a["query"], a["proj_keys"], a["values"], a["energy"],
                                          mask=a["mask"], lengths=a["lengths"])


def _att_case(id, exc, subs, **over):
    bad(f"ops.additive_attention-{id}", exc, subs, lambda: _att(**over)())


_att_case("query-list", TypeError, ["query", "list"], query=[[0.0] * 4] * 2)
_att_case("proj_keys-none", TypeError, ["proj_keys", "NoneType"], proj_keys=None)
_att_case("values-list", TypeError, ["values", "list"], values=[0.0])
_att_case("energy-none", TypeError, ["energy", "NoneType"], energy=None)
_att_case("mask-list", TypeError, ["mask", "list"], mask=[[True] * 5] * 2)
_att_case("lengths-tuple", TypeError, ["lengths", "tuple"], lengths=(1, 2))
_att_case("proj_keys-2d", RuntimeError, ["proj_keys", "3-D", "(5, 4)"], proj_keys=r(5, 4))
_att_case("query-1d", RuntimeError, ["query", "(4,)"], query=r(4))
_att_case("query-4d", RuntimeError, ["query", "(2, 1, 1, 4)"], query=r(2, 1, 1, 4))
_att_case("query-wrong-batch", RuntimeError, ["query", "(3, 4)"], query=r(3, 4))
_att_case("query-wrong-A", RuntimeError, ["query", "(2, 4)", "(2, 6)"], query=r(2, 6))
_att_case("query-3d-wrong-A", RuntimeError, ["query", "(2, 2, 6)"], query=r(2, 2, 6))
_att_case("values-wrong-S", RuntimeError, ["values", "(2, 5, D)", "(2, 6, 3)"], values=r(2, 6, 3))
_att_case("values-2d", RuntimeError, ["values", "(2, 5)"], values=r(2, 5))
_att_case("energy-wrong-A", RuntimeError, ["energy", "(4,)", "(5,)"], energy=r(5))
_att_case("energy-2-rows", RuntimeError, ["energy", "(1, 4)", "(2, 4)"], energy=r(2, 4))
_att_case("values-int", RuntimeError, ["values", "floating-point", "torch.int64"],
          query=torch.ones(2, 4, dtype=torch.int64), proj_keys=torch.ones(2, 5, 4, dtype=torch.int64),
          values=torch.ones(2, 5, 3, dtype=torch.int64), energy=torch.ones(4, dtype=torch.int64))
_att_case("query-float64", RuntimeError, ["query", "torch.float32", "torch.float64"], query=r(2, 4, dtype=torch.float64))
_att_case("proj_keys-float16", RuntimeError, ["proj_keys", "torch.float16"], proj_keys=r(2, 5, 4).half())
_att_case("energy-float64", RuntimeError, ["energy", "torch.float64"], energy=r(4, dtype=torch.float64))
_att_case("query-meta", RuntimeError, ["query", "meta"], query=r(2, 4, device=META))
_att_case("proj_keys-meta", RuntimeError, ["proj_keys", "meta"], proj_keys=r(2, 5, 4, device=META))
_att_case("energy-meta", RuntimeError, ["energy", "meta"], energy=r(4, device=META))
_att_case("mask-meta", RuntimeError, ["mask", "meta"], mask=torch.ones(2, 5, dtype=torch.bool, device=META))
_att_case("lengths-meta", RuntimeError, ["lengths", "meta"], lengths=torch.ones(2, dtype=torch.int64, device=META))
_att_case("mask-float", RuntimeError, ["mask", "bool", "torch.float32"], mask=torch.ones(2, 5))
_att_case("mask-uint8", RuntimeError, ["mask", "bool", "torch.uint8"], mask=torch.ones(2, 5, dtype=torch.uint8))
_att_case("mask-wrong-shape", RuntimeError, ["mask", "(2, 5)", "(2, 4)"], mask=torch.ones(2, 4, dtype=torch.bool))
_att_case("mask-3d", RuntimeError, ["mask", "(2, 5)", "(2, 1, 5)"], mask=torch.ones(2, 1, 5, dtype=torch.bool))
_att_case("mask-empty-row", RuntimeError, ["mask", "row 1", "no True"],
          mask=torch.tensor([[True] * 5, [False] * 5]))
_att_case("lengths-zero", RuntimeError, ["lengths", ">= 1", "min 0"], lengths=ints(5, 0))
_att_case("lengths-past-S", RuntimeError, ["lengths", "<= S = 5", "max 6"], lengths=ints(6, 1))
_att_case("lengths-wrong-count", RuntimeError, ["lengths", "(2,)", "(1,)"], lengths=ints(1))
_att_case("lengths-float", RuntimeError, ["lengths", "int32/int64", "torch.float32"], lengths=torch.tensor([1.0, 2.0]))
_att_case("mask-and-lengths", ValueError, ["mask, lengths", "at most one"],
          mask=torch.ones(2, 5, dtype=torch.bool), lengths=ints(1, 2))
_att_case("empty-source", RuntimeError, ["proj_keys", "S = 0"], proj_keys=r(2, 0, 4), values=r(2, 0, 3))


# ---- ops.gru_context_cell ----------------------------------------------------
# B=2, H=4, D=3
def _cell(**over):
    a = dict(gi=r(2, 12), context=r(2, 3), w_ic=r(12, 3), gh=r(2, 12), b_hh=r(12), h=r(2, 4))
    a.update(over)
    return lambda: ops.gru_context_cell(a["gi"], a["context"], a["w_ic"], a["gh"], a["b_hh"], a["h"])


def _cell_case(id, exc, subs, **over):
    bad(f"ops.gru_context_cell-{id}", exc, subs, lambda: _cell(**over)())


_cell_case("gi-list", TypeError, ["gi", "list"], gi=[0.0])
_cell_case("context-none", TypeError, ["context", "NoneType"], context=None)
_cell_case("w_ic-list", TypeError, ["w_ic", "list"], w_ic=[0.0])
_cell_case("gh-none", TypeError, ["gh", "NoneType"], gh=None)
_cell_case("b_hh-list", TypeError, ["b_hh", "list"], b_hh=[0.0] * 12)
_cell_case("h-none", TypeError, ["h", "NoneType"], h=None)
_cell_case("h-1d", RuntimeError, ["h", "2-D", "(4,)"], h=r(4))
_cell_case("context-wrong-batch", RuntimeError, ["context", "(2, D)", "(3, 3)"], context=r(3, 3))
_cell_case("gi-wrong-size", RuntimeError, ["gi", "(2, 12)", "(2, 11)"], gi=r(2, 11))
_cell_case("gh-wrong-batch", RuntimeError, ["gh", "(2, 12)", "(1, 12)"], gh=r(1, 12))
_cell_case("w_ic-wrong-shape", RuntimeError, ["w_ic", "(12, 3)", "(3, 12)"], w_ic=r(3, 12))
_cell_case("b_hh-wrong-size", RuntimeError, ["b_hh", "(12,)", "(8,)"], b_hh=r(8))
_cell_case("gi-int", RuntimeError, ["gi", "floating-point", "torch.int64"], gi=torch.ones(2, 12, dtype=torch.int64))
_cell_case("context-float64", RuntimeError, ["context", "torch.float64"], context=r(2, 3, dtype=torch.float64))
_cell_case("h-float16", RuntimeError, ["h", "torch.float16"], h=r(2, 4).half())
_cell_case("context-meta", RuntimeError, ["context", "meta"], context=r(2, 3, device=META))
_cell_case("h-meta", RuntimeError, ["h", "meta"], h=r(2, 4, device=META))


# ---- ops.attention_gru_step ---------------------------------------------------
# B=2, H=4, A=5, D=3, S=6
def _step(**over):
    w = StepWeights.build(r(5, 4), r(12, 4), r(12), r(5), r(12, 3))
    a = dict(gi=r(2, 12), h=r(2, 4), proj_keys=r(2, 6, 5), values=r(2, 6, 3), weights=w, mask=None, lengths=None)
    a.update(over)
    return lambda: ops.attention_gru_step(a["gi"], a["h"], a["proj_keys"], a["values"], a["weights"],
                                          mask=a["mask"], lengths=a["lengths"])


def _step_case(id, exc, subs, **over):
    bad(f"ops.attention_gru_step-{id}", exc, subs, lambda: _step(**over)())


_step_case("weights-tuple", TypeError, ["weights", "StepWeights", "tuple"], weights=(1, 2, 3, 4))
_step_case("h-list", TypeError, ["h", "list"], h=[[0.0] * 4] * 2)
_step_case("h-1d", RuntimeError, ["h", "2-D", "(4,)"], h=r(4))
_step_case("h-wrong-H", RuntimeError, ["h", "(2, 4)", "(2, 5)"], h=r(2, 5))
_step_case("h-float64", RuntimeError, ["h", "torch.float64"], h=r(2, 4, dtype=torch.float64))
_step_case("h-meta", RuntimeError, ["h", "meta"], h=r(2, 4, device=META))
_step_case("gi-wrong-size", RuntimeError, ["gi", "(2, 12)", "(2, 9)"], gi=r(2, 9))
_step_case("proj_keys-wrong-A", RuntimeError, ["query", "(2, 5)"], proj_keys=r(2, 6, 7))
_step_case("values-wrong-S", RuntimeError, ["values", "(2, 6, D)", "(2, 5, 3)"], values=r(2, 5, 3))
_step_case("lengths-past-S", RuntimeError, ["lengths", "<= S = 6", "max 9"], lengths=ints(9, 1))
_step_case("mask-float", RuntimeError, ["mask", "torch.float32"], mask=torch.ones(2, 6))
_step_case("lengths-list", TypeError, ["lengths", "list"], lengths=[1, 2])


# ---- nn.GRU / nn.LSTM -----------------------------------------------------------
def _GRU(nn):
    return nn.GRU(4, 3)


def _LSTM(nn):
    return nn.LSTM(4, 3)


for _name, _build in (("GRU", _GRU), ("LSTM", _LSTM)):
    def _mcase(id, exc, subs, call, torch_raises=True, name=_name, build=_build):
        mod_bad(f"nn.{name}-{id}", exc, subs, build, call, torch_raises)

    _mcase("input-list", TypeError, ["input", "list"], lambda m: m([[0.0] * 4]))
    _mcase("input-none", TypeError, ["input", "NoneType"], lambda m: m(None))
    _mcase("input-1d", ValueError, ["input", "1-D", "(4,)"], lambda m: m(r(4)))
    _mcase("input-4d", ValueError, ["input", "4-D", "(1, 2, 3, 4)"], lambda m: m(r(1, 2, 3, 4)))
    _mcase("input-wrong-features", RuntimeError, ["input", "input_size=4", "(3, 2, 5)"], lambda m: m(r(3, 2, 5)))
    _mcase("input-int", ValueError, ["input", "torch.int64"], lambda m: m(torch.ones(3, 2, 4, dtype=torch.int64)))
    _mcase("input-bool", ValueError, ["input", "torch.bool"], lambda m: m(torch.ones(3, 2, 4, dtype=torch.bool)))
    _mcase("input-float64", ValueError, ["input", "torch.float32", "torch.float64"],
           lambda m: m(r(3, 2, 4, dtype=torch.float64)))
    _mcase("input-meta", RuntimeError, ["input", "meta"], lambda m: m(r(3, 2, 4, device=META)))
    _mcase("input-T0", RuntimeError, ["input", "sequence length", "(0, 2, 4)"], lambda m: m(r(0, 2, 4)))
    _mcase("input-unbatched-T0", RuntimeError, ["input", "sequence length", "(0, 4)"], lambda m: m(r(0, 4)))
    if _name == "GRU":
        _mcase("hx-list", TypeError, ["hx", "list"], lambda m: m(r(3, 2, 4), [[[0.0] * 3] * 2]))
        _mcase("h_0-2d-for-batched", RuntimeError, ["h_0", "(1, 2, 3)", "(2, 3)"], lambda m: m(r(3, 2, 4), r(2, 3)))
        _mcase("h_0-3d-for-unbatched", RuntimeError, ["h_0", "2-D", "(1, 1, 3)"], lambda m: m(r(3, 4), r(1, 1, 3)))
        _mcase("h_0-wrong-batch", RuntimeError, ["h_0", "(1, 2, 3)", "(1, 3, 3)"], lambda m: m(r(3, 2, 4), r(1, 3, 3)))
        _mcase("h_0-wrong-layers", RuntimeError, ["h_0", "(1, 2, 3)", "(2, 2, 3)"], lambda m: m(r(3, 2, 4), r(2, 2, 3)))
        _mcase("h_0-wrong-hidden", RuntimeError, ["h_0", "(1, 2, 3)", "(1, 2, 4)"], lambda m: m(r(3, 2, 4), r(1, 2, 4)))
        _mcase("h_0-float64", RuntimeError, ["h_0", "torch.float32", "torch.float64"],
               lambda m: m(r(3, 2, 4), r(1, 2, 3, dtype=torch.float64)))
        _mcase("h_0-meta", RuntimeError, ["h_0", "meta"], lambda m: m(r(3, 2, 4), r(1, 2, 3, device=META)))
        _mcase("h_0-unbatched-wrong-hidden", RuntimeError, ["h_0", "(1, 5)"], lambda m: m(r(3, 4), r(1, 5)))
    else:
        _mcase("hx-tensor", TypeError, ["hx", "tuple (h_0, c_0)", "Tensor"], lambda m: m(r(3, 2, 4), r(1, 2, 3)))
        _mcase("hx-3-tuple", RuntimeError, ["hx", "tuple of length 3"],
               lambda m: m(r(3, 2, 4), (r(1, 2, 3), r(1, 2, 3), r(1, 2, 3))))
        _mcase("hx-1-tuple", RuntimeError, ["hx", "tuple of length 1"], lambda m: m(r(3, 2, 4), (r(1, 2, 3),)))
        _mcase("c_0-list", TypeError, ["c_0", "list"], lambda m: m(r(3, 2, 4), (r(1, 2, 3), [[[0.0] * 3] * 2])))
        _mcase("h_0-wrong-batch", RuntimeError, ["h_0", "(1, 2, 3)", "(1, 1, 3)"],
               lambda m: m(r(3, 2, 4), (r(1, 1, 3), r(1, 2, 3))))
        _mcase("c_0-wrong-batch", RuntimeError, ["c_0", "(1, 2, 3)", "(1, 3, 3)"],
               lambda m: m(r(3, 2, 4), (r(1, 2, 3), r(1, 3, 3))))
        _mcase("c_0-2d-for-batched", RuntimeError, ["c_0", "(1, 2, 3)", "(2, 3)"],
               lambda m: m(r(3, 2, 4), (r(1, 2, 3), r(2, 3))))
        _mcase("c_0-3d-for-unbatched", RuntimeError, ["c_0", "2-D", "(1, 1, 3)"],
               lambda m: m(r(3, 4), (r(1, 3), r(1, 1, 3))))
        _mcase("h_0-float64", RuntimeError, ["h_0", "torch.float64"],
               lambda m: m(r(3, 2, 4), (r(1, 2, 3, dtype=torch.float64), r(1, 2, 3))))
        _mcase("c_0-float64", RuntimeError, ["c_0", "torch.float64"],
               lambda m: m(r(3, 2, 4), (r(1, 2, 3), r(1, 2, 3, dtype=torch.float64))))
        _mcase("c_0-meta", RuntimeError, ["c_0", "meta"],
               lambda m: m(r(3, 2, 4), (r(1, 2, 3), r(1, 2, 3, device=META))))


mod_bad("nn.GRU-batch_first-h_0-wrong-batch", RuntimeError, ["h_0", "(1, 2, 3)", "(1, 3, 3)"],
        lambda nn: nn.GRU(4, 3, batch_first=True), lambda m: m(r(2, 3, 4), r(1, 3, 3)))
mod_bad("nn.GRU-bidirectional-h_0-one-direction", RuntimeError, ["h_0", "(2, 2, 3)", "(1, 2, 3)"],
        lambda nn: nn.GRU(4, 3, bidirectional=True), lambda m: m(r(3, 2, 4), r(1, 2, 3)))
# torch.nn accepts this one by accident: with enforce_sorted=False it index_selects the
# first B rows of h_0 by sorted_indices, so a larger batch of states goes through
# silently (and raises with enforce_sorted=True); fastseq rejects it either way.
mod_bad("nn.LSTM-packed-h_0-wrong-batch", RuntimeError, ["h_0", "(1, 2, 3)", "(1, 3, 3)"], _LSTM,
        lambda m: m(pack_padded_sequence(r(3, 2, 4), [3, 1], enforce_sorted=False), (r(1, 3, 3), r(1, 3, 3))),
        torch_raises=False)
mod_bad("nn.LSTM-packed-sorted-h_0-wrong-batch", RuntimeError, ["h_0", "(1, 2, 3)", "(1, 3, 3)"], _LSTM,
        lambda m: m(pack_padded_sequence(r(3, 2, 4), [3, 1]), (r(1, 3, 3), r(1, 3, 3))))
mod_bad("nn.GRU-packed-wrong-features", RuntimeError, ["input", "input_size=4", "(5, 5)"], _GRU,
        lambda m: m(pack_padded_sequence(r(3, 2, 5), [2, 3], enforce_sorted=False)))
mod_bad("nn.GRU-packed-float64", ValueError, ["input", "torch.float64"], _GRU,
        lambda m: m(pack_padded_sequence(r(3, 2, 4, dtype=torch.float64), [2, 3], enforce_sorted=False)))
mod_bad("nn.GRU-packed-h_0-float64", RuntimeError, ["h_0", "torch.float64"], _GRU,
        lambda m: m(pack_padded_sequence(r(3, 2, 4), [2, 3], enforce_sorted=False), r(1, 2, 3, dtype=torch.float64)))


# ---- nn.GRUCell / nn.LSTMCell ---------------------------------------------------
def _GRUCell(nn):
    return nn.GRUCell(4, 3)


def _LSTMCell(nn):
    return nn.LSTMCell(4, 3)


for _name, _build in (("GRUCell", _GRUCell), ("LSTMCell", _LSTMCell)):
    def _ccase(id, exc, subs, call, torch_raises=True, name=_name, build=_build):
        mod_bad(f"nn.{name}-{id}", exc, subs, build, call, torch_raises)

    _ccase("input-list", TypeError, ["input", "list"], lambda m: m([[0.0] * 4]))
    _ccase("input-3d", ValueError, ["input", "3-D", "(1, 2, 4)"], lambda m: m(r(1, 2, 4)))
    _ccase("input-0d", ValueError, ["input", "0-D", "()"], lambda m: m(torch.tensor(1.0)))
    _ccase("input-wrong-features", RuntimeError, ["input", "input_size=4", "(2, 5)"], lambda m: m(r(2, 5)))
    _ccase("input-int", RuntimeError, ["input", "torch.int64"], lambda m: m(torch.ones(2, 4, dtype=torch.int64)))
    _ccase("input-float64", RuntimeError, ["input", "torch.float64"], lambda m: m(r(2, 4, dtype=torch.float64)))
    _ccase("input-meta", RuntimeError, ["input", "meta"], lambda m: m(r(2, 4, device=META)))
    if _name == "GRUCell":
        _ccase("hx-list", TypeError, ["hx", "list"], lambda m: m(r(2, 4), [[0.0] * 3] * 2))
        _ccase("hx-wrong-batch", RuntimeError, ["hx", "(2, 3)", "(3, 3)"], lambda m: m(r(2, 4), r(3, 3)))
        _ccase("hx-wrong-hidden", RuntimeError, ["hx", "(2, 3)", "(2, 4)"], lambda m: m(r(2, 4), r(2, 4)))
        _ccase("hx-2d-for-unbatched", RuntimeError, ["hx", "(3,)", "(1, 3)"], lambda m: m(r(4), r(1, 3)))
        _ccase("hx-float64", RuntimeError, ["hx", "torch.float32", "torch.float64"],
               lambda m: m(r(2, 4), r(2, 3, dtype=torch.float64)))
        _ccase("hx-meta", RuntimeError, ["hx", "meta"], lambda m: m(r(2, 4), r(2, 3, device=META)))
    else:
        _ccase("hx-tensor", TypeError, ["hx", "tuple (h, c)", "Tensor"], lambda m: m(r(2, 4), r(2, 3)))
        _ccase("hx-3-tuple", RuntimeError, ["hx", "tuple of length 3"], lambda m: m(r(2, 4), (r(2, 3),) * 3))
        _ccase("hx-h-none", TypeError, ["hx[0]", "NoneType"], lambda m: m(r(2, 4), (None, r(2, 3))))
        _ccase("hx-c-list", TypeError, ["hx[1]", "list"], lambda m: m(r(2, 4), (r(2, 3), [[0.0] * 3] * 2)))
        _ccase("hx-h-wrong-batch", RuntimeError, ["hx[0]", "(2, 3)", "(1, 3)"], lambda m: m(r(2, 4), (r(1, 3), r(2, 3))))
        _ccase("hx-c-wrong-hidden", RuntimeError, ["hx[1]", "(2, 3)", "(2, 5)"], lambda m: m(r(2, 4), (r(2, 3), r(2, 5))))
        _ccase("hx-h-float64", RuntimeError, ["hx[0]", "torch.float64"],
               lambda m: m(r(2, 4), (r(2, 3, dtype=torch.float64), r(2, 3))))
        # torch.nn.LSTMCell on CPU accepts a float64 c with float32 h and returns float64
        # (type promotion in its pointwise part); fastseq rejects mixed state dtypes.
        _ccase("hx-c-float64", RuntimeError, ["hx[1]", "torch.float64"],
               lambda m: m(r(2, 4), (r(2, 3), r(2, 3, dtype=torch.float64))), torch_raises=False)
        _ccase("hx-c-meta", RuntimeError, ["hx[1]", "meta"], lambda m: m(r(2, 4), (r(2, 3), r(2, 3, device=META))))


# ---- nn.AdditiveAttention ---------------------------------------------------------
# query_size 3, key_size 5, A 4; B=2, S=6
def _attn_mod(call):
    def run():
        torch.manual_seed(0)
        return call(fnn.AdditiveAttention(3, 5, 4))
    return run


def _amod(id, exc, subs, call):
    bad(f"nn.AdditiveAttention-{id}", exc, subs, _attn_mod(call))


def _fwd(**over):
    a = dict(query=r(2, 3), proj_keys=r(2, 6, 4), values=r(2, 6, 5), mask=None, lengths=None)
    a.update(over)
    return lambda m: m(a["query"], a["proj_keys"], a["values"], mask=a["mask"], lengths=a["lengths"])


_amod("keys-list", TypeError, ["keys", "list"], lambda m: m.precompute_keys([[0.0] * 5]))
_amod("keys-2d", ValueError, ["keys", "3-D", "(6, 5)"], lambda m: m.precompute_keys(r(6, 5)))
_amod("keys-wrong-features", RuntimeError, ["keys", "key_size=5", "(2, 6, 4)"], lambda m: m.precompute_keys(r(2, 6, 4)))
_amod("keys-int", RuntimeError, ["keys", "torch.int64"],
      lambda m: m.precompute_keys(torch.ones(2, 6, 5, dtype=torch.int64)))
_amod("keys-float64", RuntimeError, ["keys", "torch.float64"],
      lambda m: m.precompute_keys(r(2, 6, 5, dtype=torch.float64)))
_amod("keys-meta", RuntimeError, ["keys", "meta"], lambda m: m.precompute_keys(r(2, 6, 5, device=META)))
_amod("query-list", TypeError, ["query", "list"], lambda m: _fwd(query=[[0.0] * 3] * 2)(m))
_amod("query-wrong-size", RuntimeError, ["query", "(B, 3)", "(2, 4)"], lambda m: _fwd(query=r(2, 4))(m))
_amod("query-1d", ValueError, ["query", "(3,)"], lambda m: _fwd(query=r(3))(m))
_amod("query-int", RuntimeError, ["query", "torch.int64"], lambda m: _fwd(query=torch.ones(2, 3, dtype=torch.int64))(m))
_amod("query-float64", RuntimeError, ["query", "torch.float64"], lambda m: _fwd(query=r(2, 3, dtype=torch.float64))(m))
_amod("query-meta", RuntimeError, ["query", "meta"], lambda m: _fwd(query=r(2, 3, device=META))(m))
_amod("proj_keys-none", TypeError, ["proj_keys", "NoneType"], lambda m: _fwd(proj_keys=None)(m))
_amod("proj_keys-wrong-A", RuntimeError, ["proj_keys", "(2, 6, 7)"], lambda m: _fwd(proj_keys=r(2, 6, 7))(m))
_amod("proj_keys-wrong-batch", RuntimeError, ["query", "(3, 4)"], lambda m: _fwd(proj_keys=r(3, 6, 4))(m))
_amod("values-float64", RuntimeError, ["values", "torch.float64"],
      lambda m: _fwd(values=r(2, 6, 5, dtype=torch.float64))(m))
_amod("values-list", TypeError, ["values", "list"], lambda m: _fwd(values=[0.0])(m))
_amod("values-wrong-S", RuntimeError, ["values", "(2, 6, D)", "(2, 5, 5)"], lambda m: _fwd(values=r(2, 5, 5))(m))
_amod("mask-float", RuntimeError, ["mask", "torch.float32"], lambda m: _fwd(mask=torch.ones(2, 6))(m))
_amod("mask-empty-row", RuntimeError, ["mask", "row 0"], lambda m: _fwd(mask=torch.tensor([[False] * 6, [True] * 6]))(m))
_amod("lengths-past-S", RuntimeError, ["lengths", "<= S = 6", "max 7"], lambda m: _fwd(lengths=ints(7, 2))(m))
_amod("lengths-zero", RuntimeError, ["lengths", ">= 1", "min 0"], lambda m: _fwd(lengths=ints(0, 2))(m))


@pytest.mark.parametrize("case", BAD, ids=[f"bad-{c.id}" for c in BAD])
def test_bad_input(case: Bad):
    """The call raises ``case.exc`` whose message names the argument and the bad value,
    on every backend (with and without autograd, which take different paths)."""
    assert len({c.id for c in BAD}) == len(BAD), "case ids must be unique"
    for name in backend_names():
        for grad in (False, True):
            with fastseq.backend(name), torch.set_grad_enabled(grad):
                with pytest.raises(case.exc) as info:
                    case.call()
            msg = str(info.value)
            missing = [s for s in case.subs if s not in msg]
            assert not missing, f"[{name}] message {msg!r} lacks {missing}"
    if case.torch_too is not None:
        with pytest.raises(Exception) as torch_info:
            case.torch_too()
        torch_cls = type(torch_info.value)
        assert isinstance(info.value, torch_cls), (
            f"torch.nn raises {torch_cls.__name__} ({torch_info.value}); fastseq raises "
            f"{type(info.value).__name__}, not a subclass of it")


# ============================================================ like torch.nn


class Like(NamedTuple):
    id: str
    build: Callable[[], Tuple[object, List[torch.Tensor], Callable]]
    # build() -> (torch.nn module or None, leaf tensors, call(module, *leaves) -> outputs);
    # module None: call(None, *leaves) is fastseq's and ``plain`` the plain-PyTorch one
    plain: Optional[Callable] = None


LIKE: List[Like] = []


def like(id: str, plain=None):
    def deco(build):
        LIKE.append(Like(id, build, plain))
        return build
    return deco


def _nan_at(x, *idx, value=float("nan")):
    x = x.clone()
    x[idx] = value
    return x


def _packed(x, lengths, batch_first=False):
    return pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)


# -- empty batch
@like("GRU-empty-batch")
def _():
    return torch.nn.GRU(4, 3, num_layers=2), [r(3, 0, 4), r(2, 0, 3)], lambda m, x, h: m(x, h)


@like("LSTM-empty-batch-batch_first-bidirectional")
def _():
    return (torch.nn.LSTM(4, 3, batch_first=True, bidirectional=True), [r(0, 3, 4)], lambda m, x: m(x))


@like("GRUCell-empty-batch")
def _():
    return torch.nn.GRUCell(4, 3), [r(0, 4), r(0, 3)], lambda m, x, h: m(x, h)


@like("LSTMCell-empty-batch")
def _():
    return torch.nn.LSTMCell(4, 3), [r(0, 4)], lambda m, x: m(x)


# -- non-contiguous, transposed, expanded, sliced
@like("GRU-sliced-input-and-h_0")
def _():
    return (torch.nn.GRU(4, 3), [r(4, 3, 9), r(2, 3, 6)],
            lambda m, x, h: m(x[1:, :, ::2][..., :4], h[1:, :, 1::2]))


@like("GRU-transposed-input-time-major")
def _():
    return torch.nn.GRU(4, 5), [r(3, 4, 4)], lambda m, x: m(x.transpose(0, 1))  # [B,T,I] -> [T,B,I]


@like("LSTM-transposed-input-batch_first")
def _():
    return (torch.nn.LSTM(4, 3, batch_first=True), [r(4, 2, 4), r(1, 3, 2), r(1, 2, 3)],
            lambda m, x, h, c: m(x.transpose(0, 1), (h.transpose(1, 2), c)))


@like("GRU-expanded-input-and-h_0")
def _():
    return (torch.nn.GRU(4, 3), [r(3, 1, 4), r(1, 1, 3)],
            lambda m, x, h: m(x.expand(3, 3, 4), h.expand(1, 3, 3)))


@like("LSTM-expanded-states-bidirectional")
def _():
    return (torch.nn.LSTM(4, 3, bidirectional=True), [r(2, 2, 4), r(3), r(1, 1, 3)],
            lambda m, x, h, c: m(x, (h.expand(2, 2, 3), c.expand(2, 2, 3))))


@like("GRU-expanded-over-time")
def _():
    return torch.nn.GRU(4, 3), [r(1, 2, 4)], lambda m, x: m(x.expand(4, 2, 4))


@like("GRUCell-transposed-input-expanded-hx")
def _():
    return torch.nn.GRUCell(4, 3), [r(4, 2), r(3)], lambda m, x, h: m(x.t(), h.expand(2, 3))


@like("LSTMCell-sliced-input-transposed-hx")
def _():
    return (torch.nn.LSTMCell(4, 3), [r(3, 8), r(3, 3), r(3, 3)],
            lambda m, x, h, c: m(x[:, 1::2], (h.t(), c[:, :].t())))


# -- unbatched
@like("GRU-unbatched-with-h_0-2-layers")
def _():
    return torch.nn.GRU(4, 3, num_layers=2), [r(3, 4), r(2, 3)], lambda m, x, h: m(x, h)


@like("LSTM-unbatched-bidirectional")
def _():
    return torch.nn.LSTM(4, 3, bidirectional=True), [r(3, 4)], lambda m, x: m(x)


@like("GRUCell-unbatched")
def _():
    return torch.nn.GRUCell(4, 3), [r(4), r(3)], lambda m, x, h: m(x, h)


@like("LSTMCell-unbatched")
def _():
    return torch.nn.LSTMCell(4, 3), [r(4), r(3), r(3)], lambda m, x, h, c: m(x, (h, c))


# -- NaN and Inf
@like("GRU-nan-in-input")
def _():
    return torch.nn.GRU(4, 3), [_nan_at(r(3, 3, 4), 1, 1, 2)], lambda m, x: m(x)


@like("GRU-inf-in-input")
def _():
    x = _nan_at(_nan_at(r(3, 3, 4), 0, 0, 1, value=float("inf")), 2, 2, 3, value=float("-inf"))
    return torch.nn.GRU(4, 3), [x], lambda m, x: m(x)


@like("LSTM-nan-in-input-bidirectional")
def _():
    return torch.nn.LSTM(4, 3, bidirectional=True), [_nan_at(r(3, 3, 4), 1, 0, 0)], lambda m, x: m(x)


@like("LSTM-inf-in-input")
def _():
    x = _nan_at(_nan_at(r(3, 2, 4), 0, 1, 0, value=float("inf")), 1, 0, 2, value=float("-inf"))
    return torch.nn.LSTM(4, 3), [x], lambda m, x: m(x)


@like("GRU-nan-in-h_0")
def _():
    return torch.nn.GRU(4, 3), [r(2, 3, 4), _nan_at(r(1, 3, 3), 0, 2, 1)], lambda m, x, h: m(x, h)


@like("LSTM-inf-in-c_0")
def _():
    return (torch.nn.LSTM(4, 3), [r(2, 2, 4), r(1, 2, 3), _nan_at(r(1, 2, 3), 0, 0, 1, value=float("inf"))],
            lambda m, x, h, c: m(x, (h, c)))


@like("GRUCell-nan-in-input")
def _():
    return torch.nn.GRUCell(4, 3), [_nan_at(r(3, 4), 1, 0), r(3, 3)], lambda m, x, h: m(x, h)


@like("LSTMCell-inf-in-input")
def _():
    return torch.nn.LSTMCell(4, 3), [_nan_at(r(2, 4), 0, 3, value=float("inf"))], lambda m, x: m(x)


# -- batch_first, packed (unsorted)
@like("GRU-batch_first-bidirectional-2-layers")
def _():
    return (torch.nn.GRU(4, 3, num_layers=2, bidirectional=True, batch_first=True), [r(2, 3, 4), r(4, 2, 3)],
            lambda m, x, h: m(x, h))


@like("GRU-packed-unsorted")
def _():
    return torch.nn.GRU(4, 3), [r(4, 3, 4), r(1, 3, 3)], lambda m, x, h: m(_packed(x, [2, 4, 1]), h)


@like("LSTM-packed-unsorted-batch_first-bidirectional")
def _():
    return (torch.nn.LSTM(4, 3, batch_first=True, bidirectional=True), [r(3, 4, 4)],
            lambda m, x: m(_packed(x, [3, 1, 4], batch_first=True)))


@like("LSTM-packed-unsorted-nan-in-padding")
def _():
    # NaN only in the padding (dropped by packing): outputs are finite, as torch.nn's
    return torch.nn.LSTM(4, 3), [_nan_at(r(3, 2, 4), 2, 0, 1)], lambda m, x: m(_packed(x, [2, 3]))


@like("GRU-packed-unsorted-2-layers-bidirectional-with-h_0")
def _():
    return (torch.nn.GRU(4, 3, num_layers=2, bidirectional=True), [r(3, 3, 4), r(4, 3, 3)],
            lambda m, x, h: m(_packed(x, [1, 3, 2]), h))


# -- AdditiveAttention against the plain formula (no torch.nn counterpart)
def _attention_like(query, keys, values, mask=None):
    def fast(att, q, k, v):
        qq, kk, vv = query(q), keys(k), values(v)
        return att(qq, att.precompute_keys(kk), vv, mask=mask)

    def plain(att, q, k, v):
        qq, kk, vv = query(q), keys(k), values(v)
        if qq.dim() == 3:
            qp = att.query_layer(qq)  # [B, T, A]
            kp = att.key_layer(kk)  # [B, S, A]
            e = torch.tanh(qp.unsqueeze(2) + kp.unsqueeze(1)) @ att.energy_layer.weight.reshape(-1)  # [B,T,S]
            if mask is not None:
                e = e.masked_fill(~mask.unsqueeze(1), float("-inf"))
        else:
            e = torch.tanh(att.query_layer(qq).unsqueeze(1) + att.key_layer(kk)) @ att.energy_layer.weight.reshape(-1)
            if mask is not None:
                e = e.masked_fill(~mask, float("-inf"))
        w = torch.softmax(e, dim=-1)
        return (w @ vv, w) if qq.dim() == 3 else ((w.unsqueeze(1) @ vv).squeeze(1), w)

    return fast, plain


def _att_like(id, leaves, query, keys, values, mask=None):
    fast, plain = _attention_like(query, keys, values, mask)

    def build():
        torch.manual_seed(1)
        return None, leaves(), fast

    LIKE.append(Like(f"AdditiveAttention-{id}", build, plain))


_att_like("empty-batch", lambda: [r(0, 3), r(0, 4, 5), r(0, 4, 6)], lambda q: q, lambda k: k, lambda v: v)
_att_like("transposed-keys-and-values", lambda: [r(2, 3), r(4, 2, 5), r(2, 6, 4)],
          lambda q: q, lambda k: k.transpose(0, 1), lambda v: v.transpose(1, 2))
_att_like("expanded-values-sliced-query", lambda: [r(2, 7), r(2, 4, 5), r(1, 4, 6)],
          lambda q: q[:, 2:5], lambda k: k, lambda v: v.expand(2, 4, 6))
_att_like("multi-query-transposed", lambda: [r(2, 2, 3), r(2, 4, 5), r(2, 4, 6)],
          lambda q: q.transpose(0, 1), lambda k: k, lambda v: v)
_att_like("nan-in-query-row", lambda: [_nan_at(r(2, 3), 1, 0), r(2, 4, 5), r(2, 4, 6)],
          lambda q: q, lambda k: k, lambda v: v)
_att_like("inf-in-values", lambda: [r(2, 3), r(2, 4, 5), _nan_at(r(2, 4, 6), 0, 2, 1, value=float("inf"))],
          lambda q: q, lambda k: k, lambda v: v)
_att_like("nan-in-key-masked-rows-kept", lambda: [r(2, 3), _nan_at(r(2, 4, 5), 1, 1, 0), r(2, 4, 6)],
          lambda q: q, lambda k: k, lambda v: v, mask=torch.tensor([[True, True, False, True], [True] * 4]))


# -- the ops on views and non-finite padding, against the reference backend (plain
#    PyTorch, which takes any strides); the views are made from the leaves inside the call
def _op_like(id):
    def deco(build):
        LIKE.append(Like(f"ops.{id}", build, "reference"))
        return build
    return deco


_LENS = ints(3, 1, 2)


@_op_like("gru-transposed-gi-expanded-h0-transposed-w_hh-strided-b_hh")
def _():
    T, B, H = 3, 3, 5
    return None, [r(B, T, 6 * H), r(1, H), r(H, 3 * H), r(6 * H)], \
        lambda _m, gi, h0, w, b: ops.gru(gi.transpose(0, 1)[..., ::2], h0.expand(B, H), w.t(), b[::2], _LENS)


@_op_like("lstm-permuted-gi-expanded-states-int32-lengths")
def _():
    T, B, H = 3, 3, 5
    return None, [r(T, 4 * H, B), r(B, 1), r(H), r(H, 4 * H), r(4 * H, 2)], \
        lambda _m, gi, h0, c0, w, b: ops.lstm(gi.permute(0, 2, 1), h0.expand(B, H), c0.expand(B, H), w.t(),
                                             b[:, 1], _LENS.to(torch.int32))


@_op_like("gru-nan-and-inf-past-lengths")
def _():
    gi = r(3, 3, 15)
    gi[2, 1] = float("nan")  # row 1 has length 1, row 2 length 2: steps past them are padding
    gi[1, 1, 3] = float("inf")
    gi[2, 2] = float("-inf")
    return None, [gi, r(3, 5), r(15, 5), r(15)], lambda _m, gi, h0, w, b: ops.gru(gi, h0, w, b, _LENS)


@_op_like("lstm-nan-past-lengths")
def _():
    gi = r(3, 3, 20)
    gi[1:, 1] = float("nan")
    return None, [gi, r(3, 5), r(3, 5), r(20, 5)], lambda _m, gi, h0, c0, w: ops.lstm(gi, h0, c0, w, None, _LENS)


@_op_like("additive_attention-transposed-strided-expanded")
def _():
    B, S, A, D = 3, 5, 4, 6
    return None, [r(A, B), r(B, S, 2 * A), r(D, S, 1), r(2 * A)], \
        lambda _m, q, k, v, e: ops.additive_attention(q.t(), k[..., 1::2], v.permute(2, 1, 0).expand(B, S, D),
                                                      e[::2], lengths=ints(5, 2, 3))


@_op_like("additive_attention-multi-query-transposed-mask")
def _():
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return None, [r(3, 4, 2), r(3, 5, 4), r(3, 5, 6), r(1, 4)], \
        lambda _m, q, k, v, e: ops.additive_attention(q.transpose(1, 2), k, v, e, mask=mask)


@_op_like("additive_attention-nan-inf-in-padding")
def _():
    k, v = r(2, 5, 4), r(2, 5, 3)
    k[0, 3, 1] = float("nan")
    v[1, 2, 2] = float("inf")
    v[0, 4, 0] = float("nan")
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 1, 1]], dtype=torch.bool)
    return None, [r(2, 2, 4), k, v, r(4)], lambda _m, q, k, v, e: ops.additive_attention(q, k, v, e, mask=mask)


@_op_like("additive_attention-empty-batch")
def _():
    return None, [r(0, 4), r(0, 5, 4), r(0, 5, 3), r(4)], lambda _m, q, k, v, e: ops.additive_attention(q, k, v, e)


@_op_like("gru_context_cell-transposed-and-column-slices")
def _():
    B, H, D = 3, 5, 6
    return None, [r(3 * H, B), r(B, 2 * D), r(D, 3 * H), r(B, 6 * H), r(3 * H), r(H, B)], \
        lambda _m, gi, c, w, gh, b, h: ops.gru_context_cell(gi.t(), c[:, ::2], w.t(), gh[:, 3 * H:], b, h.t())


@_op_like("gru_context_cell-empty-batch")
def _():
    return None, [r(0, 15), r(0, 6), r(15, 6), r(0, 15), r(15), r(0, 5)], \
        lambda _m, *a: ops.gru_context_cell(*a)


@_op_like("attention_gru_step-expanded-h-sliced-keys")
def _():
    B, H, A, D, S = 3, 4, 5, 6, 4
    def call(_m, gi, h, k, v, wa, whh, bhh, e, wic):
        w = StepWeights.build(wa, whh, bhh, e, wic)
        return ops.attention_gru_step(gi, h.expand(B, H), k[:, :S], v, w, lengths=ints(4, 1, 3))
    return None, [r(B, 3 * H), r(1, H), r(B, S + 2, A), r(B, S, D), r(A, H), r(3 * H, H), r(3 * H), r(1, A),
                  r(3 * H, D)], call


def _outputs(out) -> List[torch.Tensor]:
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _outputs(o)]


def _forward_backward(module, leaves, call):
    """Outputs, then gradients w.r.t. the leaves and every parameter, under a fixed
    random upstream gradient."""
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    outs = _outputs(call(module, *leaves))
    g = torch.Generator().manual_seed(7)
    ups = [torch.randn(o.shape, generator=g) for o in outs]
    params = [] if module is None else list(module.parameters())
    loss = sum((o * u).sum() for o, u in zip(outs, ups))
    grads = torch.autograd.grad(loss, leaves + params, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves + params, grads)]
    return [o.detach() for o in outs], grads


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("case", LIKE, ids=[f"like-torch-{c.id}" for c in LIKE])
def test_like_torch(case: Like):
    """fastseq gives torch.nn's outputs and gradients (NaN/Inf at the same places) on
    every backend."""
    assert len({c.id for c in LIKE}) == len(LIKE), "case ids must be unique"
    torch.manual_seed(0)
    ref_mod, leaves, call = case.build()
    if case.plain == "reference":  # an op: the reference backend
        fast_mod = None
        with fastseq.backend("reference"):
            want = _forward_backward(None, leaves, call)
    elif ref_mod is None:  # AdditiveAttention: the plain formula on the same module
        torch.manual_seed(0)
        fast_mod = fnn.AdditiveAttention(3, 5, 4, bias=True)
        want = _forward_backward(fast_mod, leaves, case.plain)
    else:
        fast_mod = fnn.patch(copy.deepcopy(ref_mod))
        assert type(fast_mod).__module__.startswith("fastseq")
        want = _forward_backward(ref_mod, leaves, call)
    for name in backend_names():
        with fastseq.backend(name):
            got = _forward_backward(fast_mod, leaves, call)
        for kind, gs, ws in (("output", got[0], want[0]), ("grad", got[1], want[1])):
            assert len(gs) == len(ws)
            for i, (a, b) in enumerate(zip(gs, ws)):
                assert_close(a, b, name=f"[{name}] {kind} {i}")


# ============================================================ shape limits


@pytest.fixture
def fresh_warnings(monkeypatch):
    """No limit warned yet, and no cached shape decision (the tests lower the limits)."""
    monkeypatch.setattr(warn, "_warned", set())
    registry.clear_decisions()
    yield
    registry.clear_decisions()


def _limit_warnings(record) -> List[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)
            and "cannot take this shape" in str(w.message)]


def _gru_inputs():
    torch.manual_seed(3)
    T, B, H = 3, 3, 5
    return [r(T, B, 3 * H), r(B, H), r(3 * H, H), r(3 * H)], ints(3, 1, 2)


def _attention_inputs():
    torch.manual_seed(4)
    return [r(3, 2, 4), r(3, 5, 4), r(3, 5, 6), r(4)], ints(5, 2, 3)


def _cell_inputs():
    torch.manual_seed(5)
    B, H, D = 3, 4, 5
    return [r(B, 3 * H), r(B, D), r(3 * H, D), r(B, 3 * H), r(3 * H), r(B, H)]


def _grads(fn, leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    outs = _outputs(fn(*leaves))
    loss = sum((o * (1.0 + o.detach())).sum() for o in outs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


def _check_fallback(forced, patch, fn, leaves, monkeypatch, kind):
    """Under the forced backend with lowered limits: the reference's results, and
    exactly one limit warning over repeated calls (forward, backward, no-grad)."""
    with fastseq.backend("reference"):
        want = _grads(fn, leaves)
    for mod, attr, value in patch:
        monkeypatch.setattr(mod, attr, value)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with fastseq.backend(forced):
            for _ in range(3):
                got = _grads(fn, leaves)
                with torch.no_grad():
                    fn(*leaves)
    msgs = _limit_warnings(record)
    assert len(msgs) == 1, msgs
    assert f"the {forced} backend cannot take this shape" in msgs[0] and kind in msgs[0], msgs[0]
    for a, b in zip(got, want):
        assert_close(a, b)
    return msgs[0]


@pytest.mark.parametrize("limit", ["int32-index", "grid"])
def test_limit_fallback_triton_rnn(limit, monkeypatch, fresh_warnings):
    """limit-triton-rnn: a GRU/LSTM past the Triton kernels' int32 offsets or grid runs
    elsewhere (cpp when it builds, else reference), with one warning."""
    require("triton", "cpu")
    patch = [(limits, "MAX_INDEX", 10)] if limit == "int32-index" else [(limits, "MAX_GRID_YZ", 0)]
    (gi, h0, w, b), lengths = _gru_inputs()
    msg = _check_fallback("triton", patch, lambda *a: ops.gru(*a, lengths=lengths), [gi, h0, w, b],
                          monkeypatch, "H=5")
    assert ("int32 offsets (at most 10)" if limit == "int32-index" else "past the limit 0") in msg
    c0 = r(3, 5)
    _check_lstm = lambda gi4, h, c, w4, b4: ops.lstm(gi4, h, c, w4, b4, lengths=lengths)  # noqa: E731
    monkeypatch.setattr(warn, "_warned", set())
    torch.manual_seed(6)  # (another shape: decided afresh)
    _check_fallback("triton", patch, _check_lstm, [r(3, 3, 20), h0, c0, r(20, 5), r(20)], monkeypatch, "H=5")


def test_limit_fallback_triton_attention_grid(monkeypatch, fresh_warnings):
    """limit-triton-attention: B past grid axis 1 (65535 on CUDA; lowered to 2 here)."""
    require("triton", "cpu")
    leaves, lengths = _attention_inputs()
    msg = _check_fallback("triton", [(limits, "MAX_GRID_YZ", 2)],
                          lambda *a: ops.additive_attention(*a, lengths=lengths), leaves, monkeypatch, "B=3")
    assert "grid axis 1, past the limit 2" in msg
    assert ("cpp backend" if available("cpp", "cpu") else "reference backend") in msg


def test_limit_fallback_triton_attention_strided_extent(monkeypatch, fresh_warnings):
    """A strided view addresses more elements than it holds: the int32 check uses the extent."""
    require("triton", "cpu")
    leaves, _ = _attention_inputs()
    big = r(3, 5, 600)
    with fastseq.backend("triton"), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monkeypatch.setattr(limits, "MAX_INDEX", 1000)
        view = big[:, :, ::100]
        assert view.numel() == 90 and extent(view) > 1000
        ctx, w = ops.additive_attention(leaves[0], leaves[1], view, leaves[3])
    assert len(_limit_warnings(record)) == 1
    with fastseq.backend("reference"):
        want = ops.additive_attention(leaves[0], leaves[1], view, leaves[3])
    assert_all_close((ctx, w), want)


def test_limit_fallback_triton_cell(monkeypatch, fresh_warnings):
    """limit-triton-cell: the decoder's GRU context cell past the int32 offsets."""
    require("triton", "cpu")
    _check_fallback("triton", [(limits, "MAX_INDEX", 20)], ops.gru_context_cell, _cell_inputs(), monkeypatch,
                    "D=5")


def test_limit_fallback_cpp_goes_to_reference(monkeypatch, fresh_warnings):
    """limit-cpp: a shape the C++ kernels cannot take runs on the reference, one warning.
    (The C++ limits apply to CUDA tensors only, so the check itself is replaced here.)"""
    require("cpp", "cpu")
    for op in ("gru_recurrence", "gru_recurrence_backward", "additive_attention"):
        impl = registry.Implementation(registry.get(op, "cpp").fn, limited_devices=("cpu",),
                                       limits=lambda sizes, op=op: limits.Unsupported("grid", f"{op}: B={sizes['B']} (test limit)"))
        monkeypatch.setitem(registry._REGISTRY[op], "cpp", impl)
    (gi, h0, w, b), lengths = _gru_inputs()
    msg = _check_fallback("cpp", [], lambda *a: ops.gru(*a, lengths=lengths), [gi, h0, w, b], monkeypatch,
                          "gru_recurrence: B=3 (test limit)")
    assert "reference backend" in msg
    leaves, lengths = _attention_inputs()
    # same (backend, kind): no second warning
    with warnings.catch_warnings(record=True) as record, fastseq.backend("cpp"):
        warnings.simplefilter("always")
        ops.additive_attention(*leaves, lengths=lengths)
    assert _limit_warnings(record) == []


def test_cpp_cuda_limits_name_the_shape():
    """The C++ extension's CUDA limits (registered for CUDA tensors only): B*T blocks on grid axis 0."""
    from fastseq.ops.attention import cpp

    impl = registry.get("additive_attention", "cpp")
    assert impl.unsupported(torch.empty(1), {"B": 2**20, "T": 2**20, "S": 1}) is None  # a CPU tensor
    why = cpp.limits({"B": 2**20, "T": 2**12, "S": 3})
    assert why.kind == "grid" and "B=1048576, T=4096" in why.message and str(2**31 - 1) in why.message
    assert cpp.limits({"B": 64, "T": 100, "S": 50}) is None
    assert not registry.get("gru_recurrence", "cpp").has_limits(torch.empty(1))


def test_triton_limits_at_real_sizes():
    """The real limits: B > 65535 attention rows, H*H*G past int32, and what fits."""
    require("triton", "cpu")
    from fastseq.ops.attention import triton as attention
    from fastseq.ops.decoder_step import triton as cell
    from fastseq.ops.recurrence import triton as rnn

    assert attention.limits(dict(B=65536, T=1, S=4, A=8, D=8, extent=1)).kind == "grid"
    assert attention.limits(dict(B=65535, T=1, S=4, A=8, D=8, extent=1)) is None
    big = attention.limits(dict(B=64, T=1, S=2**16, A=2**10, D=8, extent=1))
    assert big.kind == "int32-index" and "S=65536" in big.message
    assert rnn.limits(dict(T=1, B=1, H=23170, G=4)) is None
    huge = rnn.limits(dict(T=1, B=1, H=23171, G=4))
    assert huge.kind == "int32-index" and "H=23171" in huge.message
    assert cell.limits(dict(B=8, H=2**15, D=2**15, extent=1)).kind == "int32-index"


if __name__ == "__main__":  # counts for the README
    print(f"bad inputs: {len(BAD)}; like-torch cases: {len(LIKE)}")


# ======================================================= lengths check cost


def test_lengths_values_are_checked_once_per_tensor(monkeypatch):
    """``lengths`` values are looked at once per tensor object (a device tensor's
    check is a sync, so a decoder or a layer stack pays it once), and an nn.GRU
    on a PackedSequence looks at no lengths at all: the packed ops take its
    ``batch_sizes`` (a CPU tensor, checked on the CPU, no device sync)."""
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t, *a, **k: calls.append(tuple(t.shape)) or real(t, *a, **k))
    (gi, h0, w, b), lengths = _gru_inputs()
    with fastseq.backend("reference"):
        ops.gru(gi, h0, w, b, lengths)
        ops.gru(gi, h0, w, b, lengths)
        assert calls == [(3,)]
        ops.gru(gi, h0, w, b, lengths.clone())  # another tensor: checked again
        assert len(calls) == 2
        with pytest.raises(RuntimeError, match="lengths: expected every length <= T = 3, got 4"):
            ops.gru(gi, h0, w, b, ints(1, 4, 2))
        calls.clear()
        gru = fnn.GRU(4, 3, num_layers=3, bidirectional=True)
        gru(_packed(r(4, 3, 4), [2, 4, 1]))
        assert calls == []
