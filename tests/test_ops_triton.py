"""The Triton kernels against the reference, op by op (under the Triton
interpreter on CPU, natively on a GPU): every output and gradient, poisoned
outputs, lengths (unsorted, including 1), sizes that are not tile multiples."""
import pytest
import torch
from parity import assert_close

from conftest import DEVICE, TRITON
from fastseq.ops.recurrence import naive as reference

pytestmark = pytest.mark.skipif(not TRITON, reason="Triton backend not available here")

DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]


def _close(name, got, want, dtype):
    assert_close(got, want, dtype, name)


def _make(G, T, B, H, dtype, bias, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype)  # noqa: E731
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = 1
        lens = lens.to(DEVICE)
    return (rnd(T, B, G * H), rnd(B, H), rnd(B, H), rnd(G * H, H, scale=H ** -0.5),
            rnd(G * H) if bias else None, lens)


SHAPES = [(1, 1, 5), (3, 2, 16), (5, 17, 20), (2, 3, 33)]  # (T, B, H)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,H", SHAPES)
@pytest.mark.parametrize("bias,lengths", [(True, False), (False, True), (True, True)])
def test_gru_kernels(dtype, T, B, H, bias, lengths):
    from fastseq.ops.recurrence import triton as tri

    gi, h0, _, w, b, lens = _make(3, T, B, H, dtype, bias, lengths, seed=T * 100 + B * 10 + H)
    hs, gates = tri.gru_recurrence_forward(gi, h0, w, b, lens, True)
    hs_r, gates_r = reference.gru_recurrence_forward(gi, h0, w, b, lens, True)
    _close("hs", hs, hs_r, dtype)
    _close("gates", gates, gates_r, dtype)
    hs_n, none = tri.gru_recurrence_forward(gi, h0, w, b, lens, False)
    assert none.numel() == 0
    _close("hs (no gates)", hs_n, hs_r, dtype)
    grad = torch.randn(hs.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = tri.gru_recurrence_backward(grad, h0, w, hs_r, gates_r, lens, bias)
    want = reference.gru_recurrence_backward(grad, h0, w, hs_r, gates_r, lens, bias)
    for name, a, e in zip(["grad gi", "grad h0", "grad w_hh", "grad b_hh"], got, want):
        if e is None:
            assert a is None, name
        else:
            _close(name, a, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,H", SHAPES)
@pytest.mark.parametrize("bias,lengths", [(True, False), (False, True), (True, True)])
def test_lstm_kernels(dtype, T, B, H, bias, lengths):
    from fastseq.ops.recurrence import triton as tri

    gi, h0, c0, w, b, lens = _make(4, T, B, H, dtype, bias, lengths, seed=T * 100 + B * 10 + H + 7)
    hs, cs, gates = tri.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True)
    hs_r, cs_r, gates_r = reference.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True)
    _close("hs", hs, hs_r, dtype)
    _close("cs", cs, cs_r, dtype)
    _close("gates", gates, gates_r, dtype)
    g = torch.Generator().manual_seed(2)
    grad_h = torch.randn(hs.shape, generator=g).to(DEVICE, dtype)
    grad_c = torch.randn(cs.shape, generator=g).to(DEVICE, dtype)
    got = tri.lstm_recurrence_backward(grad_h, grad_c, h0, c0, w, hs_r, cs_r, gates_r, lens, bias)
    want = reference.lstm_recurrence_backward(grad_h, grad_c, h0, c0, w, hs_r, cs_r, gates_r, lens, bias)
    for name, a, e in zip(["grad gi", "grad h0", "grad c0", "grad w_hh", "grad b_hh"], got, want):
        if e is None:
            assert a is None, name
        else:
            _close(name, a, e, dtype)
