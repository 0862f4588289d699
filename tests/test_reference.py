"""The references' hand-written backward against autograd through their forward (float64),
and torch.autograd.gradcheck through the custom ops."""
import pytest
import torch
from parity import assert_close

from fastseq.ops import recurrence as rnn
from fastseq.ops.recurrence import naive as reference


def _inputs(G, T=4, B=3, H=5, lengths=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(dtype=torch.float64, generator=g)
    gi = torch.randn(T, B, G * H, **kw)
    h0 = torch.randn(B, H, **kw)
    c0 = torch.randn(B, H, **kw)
    w = torch.randn(G * H, H, **kw) * 0.5
    b = torch.randn(G * H, **kw)
    lens = torch.tensor([T, 1, 2][:B]) if lengths else None
    return gi, h0, c0, w, b, lens


@pytest.mark.parametrize("lengths", [False, True])
def test_gru_backward_matches_autograd(lengths):
    gi, h0, _, w, b, lens = _inputs(3, lengths=lengths)
    leaves = [t.clone().requires_grad_(True) for t in (gi, h0, w, b)]
    hs, gates = reference.gru_recurrence_forward(*leaves, lens, True)
    grad = torch.randn_like(hs)
    want = torch.autograd.grad(hs, leaves, grad)
    got = reference.gru_recurrence_backward(grad, h0, w, hs.detach(), gates.detach(), lens, True)
    for name, a, e in zip(["gi", "h0", "w_hh", "b_hh"], got, want):
        assert_close(a, e, name=name)


@pytest.mark.parametrize("lengths", [False, True])
def test_lstm_backward_matches_autograd(lengths):
    gi, h0, c0, w, b, lens = _inputs(4, lengths=lengths)
    leaves = [t.clone().requires_grad_(True) for t in (gi, h0, c0, w, b)]
    hs, cs, gates = reference.lstm_recurrence_forward(*leaves, lens, True)
    gh, gc = torch.randn_like(hs), torch.randn_like(cs)
    want = torch.autograd.grad((hs, cs), leaves, (gh, gc))
    got = reference.lstm_recurrence_backward(gh, gc, h0, c0, w, hs.detach(), cs.detach(),
                                             gates.detach(), lens, True)
    for name, a, e in zip(["gi", "h0", "c0", "w_hh", "b_hh"], got, want):
        assert_close(a, e, name=name)


@pytest.mark.parametrize("lengths", [False, True])
def test_gradcheck_custom_ops_float64(lengths):
    """gradcheck through the registered autograd formulas (the reference runs float64)."""
    gi, h0, c0, w, b, lens = _inputs(3, T=3, B=2, H=3, lengths=lengths)
    args = [t.clone().requires_grad_(True) for t in (gi, h0, w, b)]
    assert torch.autograd.gradcheck(lambda *a: rnn.gru(*a, lengths=lens), args)
    gi, h0, c0, w, b, lens = _inputs(4, T=3, B=2, H=3, lengths=lengths)
    args = [t.clone().requires_grad_(True) for t in (gi, h0, c0, w, b)]
    assert torch.autograd.gradcheck(lambda *a: rnn.lstm(*a, lengths=lens), args)


def test_inference_does_not_save_gates(backend):
    """save_gates=False returns the same states with an empty [0] gates tensor; the
    functional API saves gates only when a gradient is needed; an op run without
    saved gates refuses to differentiate, saying why."""
    gi, h0, c0, w, b, lens = _inputs(3)
    dtype = torch.float32 if backend == "triton" else torch.float64
    gi, h0, c0, w, b = (t.to(dtype) for t in (gi, h0, c0, w, b))
    hs, gates = rnn.gru_recurrence(gi, h0, w, b, lens, True)
    hs_n, none = rnn.gru_recurrence(gi, h0, w, b, lens, False)
    assert gates.shape == (*hs.shape[:2], 4 * hs.shape[2]) and none.shape == (0,)
    assert torch.equal(hs_n, hs)
    w = w.requires_grad_(True)
    with torch.no_grad():
        assert torch.equal(rnn.gru(gi, h0, w, b, lens), hs)
    leaf = gi.clone().requires_grad_(True)
    out, gates = rnn.gru_recurrence(leaf, h0, w, b, lens, False)
    assert gates.shape == (0,)
    with pytest.raises(RuntimeError, match="called with save_gates=False, so it cannot be differentiated"):
        out.sum().backward()
    w4 = torch.randn(4 * 5, 5, dtype=dtype)
    hs4, cs4, gates4 = rnn.lstm_recurrence(torch.randn(4, 3, 20, dtype=dtype), h0, c0, w4, None, lens, False)
    assert gates4.shape == (0,) and hs4.shape == cs4.shape == (4, 3, 5)
