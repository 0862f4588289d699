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


# ------------------------------------------------------------- packed layout

# (batch_sizes, H, bias): ties; all equal (a dense batch); B = 1; T = 1; rows over
# two row tiles (16) with H not a tile multiple.
PACKED_CASES = [([5, 5, 3, 3, 1], 20, True), ([4, 4, 4], 16, False), ([1, 1, 1], 5, True),
                ([3], 7, False), ([18, 17, 5], 9, True)]


def _packed_case(kind, reverse, batch_sizes, H, bias, dtype):
    """Triton's packed forward (gates saved and not) and backward against the reference's."""
    from fastseq.ops.recurrence import triton as tri

    G = 3 if kind == "gru" else 4
    bs = torch.tensor(batch_sizes, dtype=torch.int64)
    N, B = int(bs.sum()), batch_sizes[0]
    g = torch.Generator().manual_seed(N * 10 + H + G + reverse)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype)  # noqa: E731
    gi, h0, c0, w = rnd(N, G * H), rnd(B, H), rnd(B, H), rnd(G * H, H, scale=H ** -0.5)
    b = rnd(G * H) if bias else None
    states = (h0,) if kind == "gru" else (h0, c0)
    fwd = getattr(tri, f"{kind}_packed_recurrence_forward")
    fwd_r = getattr(reference, f"{kind}_packed_recurrence_forward")
    got = fwd(gi, *states, w, b, bs, reverse, True)
    want = fwd_r(gi, *states, w, b, bs, reverse, True)
    for name, a, e in zip(["hs", "gates"] if kind == "gru" else ["hs", "cs", "gates"], got, want):
        _close(name, a, e, dtype)
    no_gates = fwd(gi, *states, w, b, bs, reverse, False)
    assert no_gates[-1].numel() == 0
    for a, e in zip(no_gates[:-1], got[:-1]):
        assert torch.equal(a, e), "save_gates=False changed the states"
    grads = [rnd(N, H) for _ in states]
    bwd = getattr(tri, f"{kind}_packed_recurrence_backward")
    bwd_r = getattr(reference, f"{kind}_packed_recurrence_backward")
    saved = want if kind == "lstm" else (want[0], want[1])
    got = bwd(*grads, *states, w, *saved, bs, reverse, bias)
    want = bwd_r(*grads, *states, w, *saved, bs, reverse, bias)
    names = ["grad gi"] + [f"grad {s}0" for s in "hc"[:len(states)]] + ["grad w_hh", "grad b_hh"]
    assert len(got) == len(want) == len(names)
    for name, a, e in zip(names, got, want):
        _close(name, a, e, dtype)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("batch_sizes,H,bias", PACKED_CASES, ids=lambda c: str(c))
def test_packed_kernels(kind, reverse, batch_sizes, H, bias):
    _packed_case(kind, reverse, batch_sizes, H, bias, torch.float32)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("reverse", [False, True])
def test_packed_kernels_half(kind, reverse):
    """Half inputs: the state runs in fp32 ping-pong buffers between the packed steps."""
    _packed_case(kind, reverse, [5, 5, 3, 3, 1], 20, True, DTYPES[1])


def test_packed_launches_one_kernel_per_step():
    """One launch per step forward; per step plus the final one backward."""
    from fastseq.ops import launches
    from fastseq.ops.recurrence import triton as tri

    bs = torch.tensor([3, 2, 2, 1])
    gi, h0, w = torch.randn(8, 3 * 4), torch.randn(3, 4), torch.randn(3 * 4, 4)
    gi, h0, w = gi.to(DEVICE), h0.to(DEVICE), w.to(DEVICE)
    with launches.count() as n:
        hs, gates = tri.gru_packed_recurrence_forward(gi, h0, w, None, bs, True, True)
    assert n == {"_gru_fwd_step_kernel": 4}
    with launches.count() as n:
        tri.gru_packed_recurrence_backward(torch.ones_like(hs), h0, w, hs, gates, bs, True, False)
    assert n == {"_gru_bwd_step_kernel": 4, "_rnn_bwd_final_kernel": 1}


# ------------------------------------------------ both directions in one launch


def _bidirectional_case(kind, batch_sizes, H, bias, dtype):
    """Triton's bidirectional ops (both directions per launch) against the reference's
    composition of its packed ops (fastseq.ops.recurrence.directions)."""
    from fastseq.ops.recurrence import directions
    from fastseq.ops.recurrence import triton as tri

    G = 3 if kind == "gru" else 4
    bs = torch.tensor(batch_sizes, dtype=torch.int64)
    N, B = int(bs.sum()), batch_sizes[0]
    g = torch.Generator().manual_seed(N * 10 + H + G)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype)  # noqa: E731
    gi, h0, c0, w = rnd(N, 2 * G * H), rnd(2, B, H), rnd(2, B, H), rnd(2, G * H, H, scale=H ** -0.5)
    b = rnd(2, G * H) if bias else None
    states = (h0,) if kind == "gru" else (h0, c0)
    fwd = getattr(tri, f"{kind}_bidirectional_recurrence_forward")
    fwd_r = getattr(directions, f"{kind}_forward")(getattr(reference, f"{kind}_packed_recurrence_forward"))
    got = fwd(gi, *states, w, b, bs, True)
    want = fwd_r(gi, *states, w, b, bs, True)
    assert got[0].shape == (N, 2 * H) and got[-1].shape == (2, N, 4 * H)
    for name, a, e in zip(["hs", "gates"] if kind == "gru" else ["hs", "cs", "gates"], got, want):
        _close(name, a, e, dtype)
    no_gates = fwd(gi, *states, w, b, bs, False)
    assert no_gates[-1].numel() == 0
    for a, e in zip(no_gates[:-1], got[:-1]):
        assert torch.equal(a, e), "save_gates=False changed the states"
    grads = [rnd(N, 2 * H) for _ in states]
    bwd = getattr(tri, f"{kind}_bidirectional_recurrence_backward")
    bwd_r = getattr(directions, f"{kind}_backward")(getattr(reference, f"{kind}_packed_recurrence_backward"))
    saved = want if kind == "lstm" else (want[0], want[1])
    got = bwd(*grads, *states, w, *saved, bs, bias)
    want = bwd_r(*grads, *states, w, *saved, bs, bias)
    names = ["grad gi"] + [f"grad {s}0" for s in "hc"[:len(states)]] + ["grad w_hh", "grad b_hh"]
    assert len(got) == len(want) == len(names)
    for name, a, e in zip(names, got, want):
        _close(name, a, e, dtype)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("batch_sizes,H,bias", PACKED_CASES, ids=lambda c: str(c))
def test_bidirectional_kernels(kind, batch_sizes, H, bias):
    _bidirectional_case(kind, batch_sizes, H, bias, torch.float32)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_bidirectional_kernels_half(kind):
    _bidirectional_case(kind, [5, 5, 3, 3, 1], 20, True, DTYPES[1])


def test_bidirectional_launches_one_kernel_per_step_for_both_directions():
    """T launches forward for both directions (not 2T); T + one final per direction backward."""
    from fastseq.ops import launches
    from fastseq.ops.recurrence import triton as tri

    bs = torch.tensor([3, 2, 2, 1])
    gi, h0, w = torch.randn(8, 6 * 4), torch.randn(2, 3, 4), torch.randn(2, 3 * 4, 4)
    gi, h0, w = gi.to(DEVICE), h0.to(DEVICE), w.to(DEVICE)
    with launches.count() as n:
        hs, gates = tri.gru_bidirectional_recurrence_forward(gi, h0, w, None, bs, True)
    assert n == {"_gru_fwd_step_kernel": 4}
    with launches.count() as n:
        tri.gru_bidirectional_recurrence_backward(torch.ones_like(hs), h0, w, hs, gates, bs, False)
    assert n == {"_gru_bwd_step_kernel": 4, "_rnn_bwd_final_kernel": 2}
