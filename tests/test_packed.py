"""The packed recurrences (a PackedSequence's own layout, cuDNN's packed mode):

* the reference's hand-written backward against autograd through its forward,
  and gradcheck through the custom ops (float64);
* the reference against the padded recurrence with lengths (same states at
  every valid position, same final states), both directions;
* the C++ CPU ops against the reference, op by op, through every way the ops
  split work (one thread; two threads by rows and by units; the ATen path);
* the errors for a ``batch_sizes`` that is not a PackedSequence's.

The nn-level parity (fastseq.nn.GRU/LSTM on packed input against torch.nn, on
every backend) is in test_rnn_parity.py.
"""
import pytest
import torch
from parity import assert_close

import fastseq
from fastseq import ops
from fastseq.ops.validation import ArgumentTypeError
from fastseq.ops.recurrence import naive as reference


def _batch_sizes(lengths):
    """A PackedSequence's batch_sizes for these lengths (any order)."""
    lengths = torch.as_tensor(lengths)
    T = int(lengths.max())
    return (lengths.unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1).to(torch.int64)


# lengths of the batch (sorted or not: only the batch sizes matter): ties,
# all equal (dense), one row, one step, a long tail of short rows.
LENGTHS = [[5, 3, 3, 1], [4, 4, 4], [6], [1, 1], [7, 6, 2, 2, 2, 1, 1]]


def _make(G, lengths, H, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    bs = _batch_sizes(lengths)
    N, B = int(bs.sum()), int(bs[0])
    rnd = lambda *s, k=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * k).to(dtype)  # noqa: E731
    return (rnd(N, G * H), rnd(B, H), rnd(B, H), rnd(G * H, H, k=H ** -0.5), rnd(G * H) if bias else None, bs)


# ------------------------------------------------------------------- reference


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS[:2] + LENGTHS[4:])
def test_reference_backward_matches_autograd(reverse, lengths):
    gi, h0, c0, w, b, bs = _make(3, lengths, 5, torch.float64, True, seed=1)
    leaves = [t.clone().requires_grad_(True) for t in (gi, h0, w, b)]
    # autograd through the forward: the reference writes into preallocated tensors,
    # so differentiate a functional copy (the padded reference with lengths, packed)
    hs, gates = reference.gru_packed_recurrence_forward(*[t.detach() for t in leaves], bs, reverse, True)
    grad = torch.randn_like(hs)
    got = reference.gru_packed_recurrence_backward(grad, h0, w, hs, gates, bs, reverse, True)
    want = torch.autograd.grad(_padded_gru(*leaves, bs, reverse), leaves, grad)
    for name, a, e in zip(["gi", "h0", "w_hh", "b_hh"], got, want):
        assert_close(a, e, name=name)

    gi, h0, c0, w, b, bs = _make(4, lengths, 5, torch.float64, True, seed=2)
    leaves = [t.clone().requires_grad_(True) for t in (gi, h0, c0, w, b)]
    hs, cs, gates = reference.lstm_packed_recurrence_forward(*[t.detach() for t in leaves], bs, reverse, True)
    gh, gc = torch.randn_like(hs), torch.randn_like(cs)
    got = reference.lstm_packed_recurrence_backward(gh, gc, h0, c0, w, hs, cs, gates, bs, reverse, True)
    want = torch.autograd.grad(_padded_lstm(*leaves, bs, reverse), leaves, (gh, gc))
    for name, a, e in zip(["gi", "h0", "c0", "w_hh", "b_hh"], got, want):
        assert_close(a, e, name=name)


def _to_padded(packed: torch.Tensor, bs: torch.Tensor, reverse: bool):
    """packed [N, X] -> padded [T, B, X] (reversed within each length if reverse), the lengths, the index."""
    T, B = bs.numel(), int(bs[0])
    lengths = (bs.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)
    offsets = torch.cumsum(bs, 0) - bs
    t = torch.arange(T).unsqueeze(1).expand(T, B)
    src_t = torch.where(t < lengths, lengths - 1 - t, t) if reverse else t
    idx = (offsets[src_t.clamp(max=T - 1)] + torch.arange(B)).clamp(max=packed.shape[0] - 1)
    padded = packed[idx.reshape(-1)].reshape(T, B, -1)
    return padded, lengths, idx


def _from_padded(padded: torch.Tensor, bs: torch.Tensor, reverse: bool):
    """The inverse of _to_padded on the valid positions: padded [T, B, X] -> packed [N, X]."""
    T, B = bs.numel(), int(bs[0])
    lengths = (bs.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)
    rows = []
    for t in range(T):
        n = int(bs[t])
        b = torch.arange(n)
        src_t = (lengths[:n] - 1 - t) if reverse else torch.full((n,), t)
        rows.append(padded[src_t, b])
    return torch.cat(rows)


def _padded_gru(gi, h0, w, b, bs, reverse):
    padded, lengths, _ = _to_padded(gi, bs, reverse)
    hs, _ = reference.gru_recurrence_forward(padded, h0, w, b, lengths, False)
    return _from_padded(hs, bs, reverse)


def _padded_lstm(gi, h0, c0, w, b, bs, reverse):
    padded, lengths, _ = _to_padded(gi, bs, reverse)
    hs, cs, _ = reference.lstm_recurrence_forward(padded, h0, c0, w, b, lengths, False)
    return _from_padded(hs, bs, reverse), _from_padded(cs, bs, reverse)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_reference_equals_padded_recurrence_with_lengths(reverse, lengths):
    """The packed op is the padded recurrence with lengths (each row reversed within
    its length for the reverse direction), computed only where rows run."""
    gi, h0, c0, w, b, bs = _make(4, lengths, 6, torch.float64, True, seed=3)
    hs, cs, _ = reference.lstm_packed_recurrence_forward(gi, h0, c0, w, b, bs, reverse, False)
    want_h, want_c = _padded_lstm(gi, h0, c0, w, b, bs, reverse)
    assert_close(hs, want_h, name="hs")
    assert_close(cs, want_c, name="cs")
    # the final states where packed_final_rows says they are
    padded, lengths, _ = _to_padded(gi, bs, reverse)
    hs_pad, _, _ = reference.lstm_recurrence_forward(padded, h0, c0, w, b, lengths, False)
    assert_close(hs[ops.packed_final_rows(bs, reverse)], hs_pad[-1], name="final state")


@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_packed_custom_ops_float64(reverse):
    gi, h0, c0, w, b, bs = _make(3, [3, 2, 2], 3, torch.float64, True, seed=4)
    args = [t.clone().requires_grad_(True) for t in (gi, h0, w, b)]
    with fastseq.backend("reference"):
        assert torch.autograd.gradcheck(lambda *a: ops.gru_packed(*a, bs, reverse=reverse), args)
        gi, h0, c0, w, b, bs = _make(4, [3, 2, 2], 3, torch.float64, True, seed=5)
        args = [t.clone().requires_grad_(True) for t in (gi, h0, c0, w, b)]
        assert torch.autograd.gradcheck(lambda *a: ops.lstm_packed(*a, bs, reverse=reverse), args)


# ------------------------------------------------------------------------ C++


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


# (lengths, H): small; then sizes that two threads split by units (few rows,
# H >= 64: B = 3 with a gemm.h product, B = 6 a repacked W_hh) and by rows
# (B = 70, split by the rows' work, not their count).
CPP_CASES = [(lens, 7) for lens in LENGTHS] + [
    ([5, 4, 4], 72), ([6, 5, 5, 3, 2, 1], 136), ([7] + [6] * 30 + [2] * 39, 40),
]


def _close(name, got, want, dtype):
    assert_close(got, want, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lengths,H", CPP_CASES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_cpp_gru_packed_ops(cpp_ops, gemm, threads, dtype, lengths, H, reverse, bias):
    gi, h0, _, w, b, bs = _make(3, lengths, H, dtype, bias, seed=len(lengths) * 10 + H)
    hs, gates = cpp_ops.gru_packed_recurrence_forward(gi, h0, w, b, bs, reverse, True)
    hs_r, gates_r = reference.gru_packed_recurrence_forward(gi, h0, w, b, bs, reverse, True)
    _close("hs", hs, hs_r, dtype)
    _close("gates", gates, gates_r, dtype)
    hs_n, none = cpp_ops.gru_packed_recurrence_forward(gi, h0, w, b, bs, reverse, False)
    assert none.shape == (0,)
    _close("hs (no gates)", hs_n, hs_r, dtype)
    grad = torch.randn(hs.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    got = cpp_ops.gru_packed_recurrence_backward(grad, h0, w, hs_r, gates_r, bs, reverse, bias)
    want = reference.gru_packed_recurrence_backward(grad, h0, w, hs_r, gates_r, bs, reverse, bias)
    for name, a, e in zip(["grad gi", "grad h0", "grad w_hh"], got, want):
        _close(name, a, e, dtype)
    if bias:
        _close("grad b_hh", got[3], want[3], dtype)
    else:
        assert got[3].shape == want[3].shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lengths,H", CPP_CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_cpp_lstm_packed_ops(cpp_ops, gemm, threads, dtype, lengths, H, reverse):
    gi, h0, c0, w, b, bs = _make(4, lengths, H, dtype, True, seed=len(lengths) * 10 + H + 7)
    hs, cs, gates = cpp_ops.lstm_packed_recurrence_forward(gi, h0, c0, w, b, bs, reverse, True)
    hs_r, cs_r, gates_r = reference.lstm_packed_recurrence_forward(gi, h0, c0, w, b, bs, reverse, True)
    _close("hs", hs, hs_r, dtype)
    _close("cs", cs, cs_r, dtype)
    _close("gates", gates, gates_r, dtype)
    g = torch.Generator().manual_seed(2)
    gh = torch.randn(hs.shape, generator=g, dtype=torch.float64).to(dtype)
    gc = torch.randn(cs.shape, generator=g, dtype=torch.float64).to(dtype)
    got = cpp_ops.lstm_packed_recurrence_backward(gh, gc, h0, c0, w, hs_r, cs_r, gates_r, bs, reverse, True)
    want = reference.lstm_packed_recurrence_backward(gh, gc, h0, c0, w, hs_r, cs_r, gates_r, bs, reverse, True)
    for name, a, e in zip(["grad gi", "grad h0", "grad c0", "grad w_hh", "grad b_hh"], got, want):
        _close(name, a, e, dtype)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([3, 2], dtype=torch.int32), "int64 CPU"),
    (torch.tensor([[3, 2]]), "1-D"),
    (torch.tensor([], dtype=torch.int64), "at least one step"),
    (torch.tensor([2, 2, 1]), r"batch_sizes\[0\] == B = 3"),
    (torch.tensor([3, 1, 1]), "a sum of N = 6"),
    (torch.tensor([3, 1, 2]), "non-increasing"),
])
def test_bad_batch_sizes_raise_clearly(bad, match):
    gi, h0, _, w, b, _ = _make(3, [3, 2, 1], 4, torch.float32, True, seed=0)
    with pytest.raises(RuntimeError, match="batch_sizes: expected.*" + match):
        ops.gru_packed(gi, h0, w, b, bad)


@pytest.mark.parametrize("bad,exc,match", [
    ([3, 1], ArgumentTypeError, "batch_sizes: expected a Tensor"),
    (torch.tensor([3, 1], dtype=torch.int32), RuntimeError, "int64 CPU"),
    (torch.tensor([1, 3]), RuntimeError, "non-increasing"),
    (torch.tensor([], dtype=torch.int64), RuntimeError, "at least one step"),
])
def test_packed_final_rows_rejects_bad_batch_sizes(bad, exc, match):
    with pytest.raises(exc, match=match):
        ops.packed_final_rows(bad)


def test_packed_final_rows():
    bs = _batch_sizes([4, 2, 2, 1])  # [4, 3, 1, 1]
    assert bs.tolist() == [4, 3, 1, 1]
    # row 0 ends at step 3 (offset 8), rows 1, 2 at step 1 (offset 4), row 3 at step 0
    assert ops.packed_final_rows(bs).tolist() == [8, 5, 6, 3]
    assert ops.packed_final_rows(bs, reverse=True).tolist() == [0, 1, 2, 3]


# ------------------------------------------------- the C++ backend's autograd


@pytest.mark.parametrize("reverse", [False, True])
def test_cpp_autograd_gradcheck_float64(cpp_ops, reverse):
    """With the C++ backend, ops.gru/lstm (dense, lengths) and ops.gru_packed/lstm_packed
    record their backward in C++ (csrc/cpu/autograd.cpp): gradcheck through it."""
    with fastseq.backend("cpp"):
        gi, h0, c0, w, b, bs = _make(3, [3, 2, 2], 3, torch.float64, True, seed=6)
        args = [t.clone().requires_grad_(True) for t in (gi, h0, w, b)]
        out = ops.gru_packed(*args, bs, reverse=reverse)
        assert type(out.grad_fn).__name__ == "CppFunction"  # not the Python custom op's node
        assert torch.autograd.gradcheck(lambda *a: ops.gru_packed(*a, bs, reverse=reverse), args)
        gi, h0, c0, w, b, bs = _make(4, [3, 2, 2], 3, torch.float64, False, seed=7)
        args = [t.clone().requires_grad_(True) for t in (gi, h0, c0, w)]
        assert torch.autograd.gradcheck(lambda *a: ops.lstm_packed(*a, None, bs, reverse=reverse), args)

        g = torch.Generator().manual_seed(8)
        lengths = torch.tensor([3, 1]) if reverse else None
        dense = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
                 for s in ((3, 2, 9), (2, 3), (9, 3), (9,))]
        assert torch.autograd.gradcheck(lambda *a: ops.gru(*a, lengths=lengths), dense)
        dense = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
                 for s in ((3, 2, 12), (2, 3), (2, 3), (12, 3), (12,))]
        assert torch.autograd.gradcheck(lambda *a: ops.lstm(*a, lengths=lengths), dense)


def test_cpp_autograd_without_grad_saves_nothing_and_says_so(cpp_ops):
    gi, h0, _, w, b, _ = _make(3, [2, 2], 4, torch.float32, True, seed=9)
    with fastseq.backend("cpp"), torch.no_grad():
        hs = cpp_ops.gru_recurrence(gi.unsqueeze(1).reshape(2, 2, 12), h0, w, b, None)
    assert hs.grad_fn is None
    # a leaf that starts requiring grad after the fact gets no graph through hs
    with fastseq.backend("cpp"):
        out = cpp_ops.gru_recurrence(gi.reshape(2, 2, 12).requires_grad_(True), h0, w, b, None)
    assert out.grad_fn is not None
    out.sum().backward()


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("packed", [False, True])
def test_cpp_backward_without_h0_gradient(cpp_ops, kind, packed):
    """grad_h0=False (h0/c0 need no gradient: the C++ autograd asks for it only when
    needed) returns an empty [0] gradient for h0/c0 and the same other gradients;
    through the C++ autograd, an h0 without requires_grad changes nothing else."""
    G = 3 if kind == "gru" else 4
    gi, h0, c0, w, b, bs = _make(G, [4, 3, 3, 1], 72, torch.float64, True, seed=10)
    g = torch.Generator().manual_seed(11)
    if not packed:  # T = 4 steps of the same B = 4 rows
        gi = torch.randn(4, 4, G * 72, generator=g, dtype=torch.float64)
    fwd = getattr(cpp_ops, f"{kind}_{'packed_' if packed else ''}recurrence_forward")
    bwd = getattr(cpp_ops, f"{kind}_{'packed_' if packed else ''}recurrence_backward")
    tail = (bs, True) if packed else (None,)
    if kind == "gru":
        hs, gates = fwd(gi, h0, w, b, *tail, True)
        grads = (torch.randn(hs.shape, generator=g, dtype=torch.float64),)
        states, saved = (h0,), (w, hs, gates)
    else:
        hs, cs, gates = fwd(gi, h0, c0, w, b, *tail, True)
        grads = (torch.randn(hs.shape, generator=g, dtype=torch.float64),
                 torch.randn(cs.shape, generator=g, dtype=torch.float64))
        states, saved = (h0, c0), (w, hs, cs, gates)
    full = bwd(*grads, *states, *saved, *tail, True, True)
    part = bwd(*grads, *states, *saved, *tail, True, False)
    n_states = len(states)
    for i, (a, e) in enumerate(zip(part, full)):
        if 1 <= i <= n_states:
            assert a.shape == (0,), f"output {i}: expected an empty [0] state gradient, got {tuple(a.shape)}"
        else:
            assert_close(a, e, name=f"output {i}")
    # through the autograd: h0 without a gradient, the rest unchanged
    with fastseq.backend("cpp"):
        x = gi.clone().requires_grad_(True)
        fn = ops.gru_packed if packed else ops.gru
        if kind == "gru":
            out = fn(x, h0, w, b, bs, reverse=True) if packed else fn(x, h0, w, b)
        else:
            fn = ops.lstm_packed if packed else ops.lstm
            out = (fn(x, h0, c0, w, b, bs, reverse=True) if packed else fn(x, h0, c0, w, b))[0]
        (out * grads[0]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------ both directions at once


def _make_bidir(G, lengths, H, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    bs = _batch_sizes(lengths)
    N, B = int(bs.sum()), int(bs[0])
    rnd = lambda *s, k=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * k).to(dtype)  # noqa: E731
    return (rnd(N, 2 * G * H), rnd(2, B, H), rnd(2, B, H), rnd(2, G * H, H, k=H ** -0.5),
            rnd(2, G * H) if bias else None, bs)


def test_gradcheck_bidirectional_custom_ops_float64():
    """The bidirectional ops' registered backward (reference composition) against finite differences."""
    gi, h0, c0, w, b, bs = _make_bidir(3, [3, 2, 2], 3, torch.float64, True, seed=6)
    args = [t.clone().requires_grad_(True) for t in (gi, h0, w, b)]
    with fastseq.backend("reference"):
        assert torch.autograd.gradcheck(lambda *a: ops.gru_bidirectional(*a, bs), args)
        gi, h0, c0, w, b, bs = _make_bidir(4, [3, 2, 2], 3, torch.float64, True, seed=7)
        args = [t.clone().requires_grad_(True) for t in (gi, h0, c0, w, b)]
        assert torch.autograd.gradcheck(lambda *a: ops.lstm_bidirectional(*a, bs), args)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_bidirectional_equals_both_packed_directions(kind):
    """hs [N, 2H] = [forward packed hs | reverse packed hs] (reference)."""
    G = 3 if kind == "gru" else 4
    gi, h0, c0, w, b, bs = _make_bidir(G, [5, 3, 3, 1], 6, torch.float64, True, seed=8)
    with fastseq.backend("reference"):
        if kind == "gru":
            hs = ops.gru_bidirectional(gi, h0, w, b, bs)
            parts = [ops.gru_packed(gi[:, d * 18:(d + 1) * 18], h0[d], w[d], b[d], bs, reverse=bool(d))
                     for d in range(2)]
        else:
            hs, cs = ops.lstm_bidirectional(gi, h0, c0, w, b, bs)
            parts = [ops.lstm_packed(gi[:, d * 24:(d + 1) * 24], h0[d], c0[d], w[d], b[d], bs, reverse=bool(d))[0]
                     for d in range(2)]
    assert torch.equal(hs, torch.cat(parts, dim=1))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_cpp_bidirectional_composition_matches_reference(cpp_ops, kind):
    """The C++ backend's bidirectional ops (its packed ops composed) against the
    reference's, forward and every gradient, with a random upstream gradient."""
    from fastseq.ops.recurrence import cpp, directions

    G = 3 if kind == "gru" else 4
    gi, h0, c0, w, b, bs = _make_bidir(G, [7, 6, 2, 2, 1], 9, torch.float64, True, seed=9)
    states = (h0,) if kind == "gru" else (h0, c0)
    fwd = getattr(directions, f"{kind}_forward")
    bwd = getattr(directions, f"{kind}_backward")
    got = fwd(getattr(cpp, f"{kind}_packed_recurrence_forward"))(gi, *states, w, b, bs, True)
    want = fwd(getattr(reference, f"{kind}_packed_recurrence_forward"))(gi, *states, w, b, bs, True)
    for name, a, e in zip(["hs", "cs", "gates"] if kind == "lstm" else ["hs", "gates"], got, want):
        assert_close(a, e, name=name)
    g = torch.Generator().manual_seed(10)
    grads = [torch.randn(want[0].shape, generator=g, dtype=torch.float64) for _ in states]
    saved = want if kind == "lstm" else (want[0], want[1])
    got = bwd(getattr(cpp, f"{kind}_packed_recurrence_backward"))(*grads, *states, w, *saved, bs, True)
    want = bwd(getattr(reference, f"{kind}_packed_recurrence_backward"))(*grads, *states, w, *saved, bs, True)
    names = ["grad gi"] + [f"grad {s}0" for s in "hc"[:len(states)]] + ["grad w_hh", "grad b_hh"]
    assert len(got) == len(want) == len(names)
    for name, a, e in zip(names, got, want):
        assert_close(a, e, name=name)


@pytest.mark.parametrize("bad,match", [
    (dict(h0=torch.zeros(3, 4)), r"h0: expected a 3-D tensor \[2, B, H\]"),
    (dict(gi=torch.zeros(8, 12)), r"gi: expected a 2-D tensor \[N, 2\*3\*H\] = \[N, 24\]"),
    (dict(w_hh=torch.zeros(12, 4)), r"w_hh"),
    (dict(w_hh=torch.zeros(2, 12, 4, dtype=torch.float64)), r"w_hh: expected dtype torch.float32 \(that of gi\)"),
    (dict(gi=torch.zeros(8, 24, dtype=torch.int64)), r"gi: expected a floating-point dtype"),
    (dict(h0=torch.zeros(2, 3, 4, device="meta")), r"h0: expected device cpu \(that of gi\), got meta"),
    (dict(batch_sizes=torch.tensor([3, 2, 2, 2])), r"batch_sizes: expected a sum of N = 8"),
])
def test_bidirectional_bad_shapes_raise_clearly(bad, match):
    args = dict(gi=torch.zeros(8, 24), h0=torch.zeros(2, 3, 4), w_hh=torch.zeros(2, 12, 4), b_hh=None,
                batch_sizes=torch.tensor([3, 2, 2, 1]))
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        ops.gru_bidirectional(**args)
