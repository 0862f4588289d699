"""The C++ (ATen) CPU recurrence ops (csrc/cpu, loaded by fastseq.backend.extension)
against the reference, op by op: every output and every gradient output, with
and without a bias, with lengths (including 1 and T) and without, through both
ways the ops run a step (the per-thread BLAS path and the at::mm_out path,
forced with FASTSEQ_CPP_GEMM=aten).

A failed build fails these tests (it does not skip them)."""
import pytest
import torch
from parity import assert_close

from fastseq.backend import extension
from fastseq.ops.recurrence import naive as reference

@pytest.fixture
def ops(cpp_ops):
    return cpp_ops


@pytest.fixture
def two_threads():
    """Two intra-op threads (on any machine), so the BIG_SIZES take the threaded splits."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _close(name, got, want, dtype):
    assert_close(got, want, dtype, name)


def _lengths(mode, T, B, g):
    if mode is None:
        return None
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = 1
    if B > 1:
        lens[-1] = T
    return lens if mode == "int64" else lens.to(torch.int32)


def _make(G, T, B, H, dtype, bias, lengths, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, k=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * k).to(dtype)  # noqa: E731
    return (rnd(T, B, G * H, k=scale), rnd(B, H), rnd(B, H), rnd(G * H, H, k=H ** -0.5),
            rnd(G * H) if bias else None, _lengths(lengths, T, B, g))


def _check_grads(names, got, want, dtype, has_bias):
    assert len(got) == len(want)
    for name, a, e in zip(names, got, want):
        if name == "grad b_hh" and not has_bias:  # absent: an empty [0] tensor in every backend
            assert a.shape == e.shape == (0,), f"{name}: expected empty [0] tensors, got {tuple(a.shape)}"
        else:
            _close(name, a, e, dtype)


DTYPES = [torch.float32, torch.float64]
SIZES = [(T, B, H) for T in (1, 6) for B in (1, 5) for H in (1, 7, 16)]
# Big enough to be shared between threads: the hidden units split (small
# batches: B = 2 multiplies W_hh gate by gate, B >= 4 a repacked copy; H = 72
# and 136 leave a ragged last slice), the batch rows split (B = 19: ragged
# too), and rows spanning two blocks of the pointwise kernels (300 > 256).
# float32 runs the units split's forward product on csrc/cpu/gemm.h up to 32
# rows: B = 1 and 8 take its 1-row and 4-row tiles, H = 108 and 70 a K that is
# not a multiple of 8 and slices that are not multiples of its 3 or 4 columns.
BIG_SIZES = [(6, 5, 72), (4, 2, 136), (5, 19, 40), (3, 4, 300), (3, 1, 108), (3, 8, 70)]
CASES = [(True, None), (False, None), (True, "int64"), (False, "int64")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,H", SIZES)
@pytest.mark.parametrize("bias,lengths", CASES)
def test_gru_ops(ops, gemm, dtype, T, B, H, bias, lengths):
    _check_gru(ops, dtype, T, B, H, bias, lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,H", BIG_SIZES)
@pytest.mark.parametrize("bias,lengths", [(True, "int64"), (False, None)])
def test_gru_ops_threaded(ops, gemm, two_threads, dtype, T, B, H, bias, lengths):
    _check_gru(ops, dtype, T, B, H, bias, lengths)


def _check_gru(ops, dtype, T, B, H, bias, lengths):
    gi, h0, _, w, b, lens = _make(3, T, B, H, dtype, bias, lengths, seed=T * 100 + B * 10 + H)
    hs, gates = ops.gru_recurrence_forward(gi, h0, w, b, lens, True)
    hs_r, gates_r = reference.gru_recurrence_forward(gi, h0, w, b, lens, True)
    _close("hs", hs, hs_r, dtype)
    _close("gates", gates, gates_r, dtype)
    hs_n, none = ops.gru_recurrence_forward(gi, h0, w, b, lens, False)
    assert none.shape == (0,) and none.dtype == dtype
    _close("hs (no gates)", hs_n, hs_r, dtype)

    grad = torch.randn(hs.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    got = ops.gru_recurrence_backward(grad, h0, w, hs_r, gates_r, lens, bias)
    want = reference.gru_recurrence_backward(grad, h0, w, hs_r, gates_r, lens, bias)
    _check_grads(["grad gi", "grad h0", "grad w_hh", "grad b_hh"], got, want, dtype, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,H", SIZES)
@pytest.mark.parametrize("bias,lengths", CASES)
def test_lstm_ops(ops, gemm, dtype, T, B, H, bias, lengths):
    _check_lstm(ops, dtype, T, B, H, bias, lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,H", BIG_SIZES)
@pytest.mark.parametrize("bias,lengths", [(True, "int64"), (False, None)])
def test_lstm_ops_threaded(ops, gemm, two_threads, dtype, T, B, H, bias, lengths):
    _check_lstm(ops, dtype, T, B, H, bias, lengths)


def _check_lstm(ops, dtype, T, B, H, bias, lengths):
    gi, h0, c0, w, b, lens = _make(4, T, B, H, dtype, bias, lengths, seed=T * 100 + B * 10 + H + 7)
    hs, cs, gates = ops.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True)
    hs_r, cs_r, gates_r = reference.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True)
    _close("hs", hs, hs_r, dtype)
    _close("cs", cs, cs_r, dtype)
    _close("gates", gates, gates_r, dtype)
    hs_n, cs_n, none = ops.lstm_recurrence_forward(gi, h0, c0, w, b, lens, False)
    assert none.shape == (0,) and none.dtype == dtype
    _close("hs (no gates)", hs_n, hs_r, dtype)
    _close("cs (no gates)", cs_n, cs_r, dtype)

    g = torch.Generator().manual_seed(2)
    grad_h = torch.randn(hs.shape, generator=g, dtype=torch.float64).to(dtype)
    grad_c = torch.randn(cs.shape, generator=g, dtype=torch.float64).to(dtype)
    got = ops.lstm_recurrence_backward(grad_h, grad_c, h0, c0, w, hs_r, cs_r, gates_r, lens, bias)
    want = reference.lstm_recurrence_backward(grad_h, grad_c, h0, c0, w, hs_r, cs_r, gates_r, lens, bias)
    _check_grads(["grad gi", "grad h0", "grad c0", "grad w_hh", "grad b_hh"], got, want, dtype, bias)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_saturated_gates_and_int32_lengths(ops, gemm, kind):
    """Large pre-activations (sigmoid/tanh saturate, exp clamps) and int32 lengths, float32."""
    T, B, H, dtype = 6, 5, 16, torch.float32
    G = 3 if kind == "gru" else 4
    gi, h0, c0, w, b, lens = _make(G, T, B, H, dtype, True, "int32", seed=11, scale=30.0)
    if kind == "gru":
        got = ops.gru_recurrence_forward(gi, h0, w, b, lens, True)
        want = reference.gru_recurrence_forward(gi, h0, w, b, lens, True)
        names = ["hs", "gates"]
    else:
        got = ops.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True)
        want = reference.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True)
        names = ["hs", "cs", "gates"]
    for name, a, e in zip(names, got, want):
        assert torch.isfinite(a).all(), name
        _close(name, a, e, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(ops, gemm, dtype):
    T, B, H = 6, 5, 16
    gi, h0, c0, w, b, lens = _make(3, T, B, H, dtype, True, "int64", seed=3)
    hs, gates = ops.gru_recurrence_forward(gi, h0, w, b, lens, True)
    hs_r, gates_r = reference.gru_recurrence_forward(gi, h0, w, b, lens, True)
    _close("gru hs", hs, hs_r, dtype)
    _close("gru gates", gates, gates_r, dtype)
    grad = torch.randn(hs.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = ops.gru_recurrence_backward(grad, h0, w, hs_r, gates_r, lens, True)
    want = reference.gru_recurrence_backward(grad, h0, w, hs_r, gates_r, lens, True)
    _check_grads(["grad gi", "grad h0", "grad w_hh", "grad b_hh"], got, want, dtype, True)

    gi, h0, c0, w, b, lens = _make(4, T, B, H, dtype, False, None, seed=4)
    hs, cs, gates = ops.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True)
    hs_r, cs_r, gates_r = reference.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True)
    for name, a, e in zip(["hs", "cs", "gates"], (hs, cs, gates), (hs_r, cs_r, gates_r)):
        _close(f"lstm {name}", a, e, dtype)
    g = torch.Generator().manual_seed(2)
    grad_h = torch.randn(hs.shape, generator=g).to(dtype)
    grad_c = torch.randn(cs.shape, generator=g).to(dtype)
    got = ops.lstm_recurrence_backward(grad_h, grad_c, h0, c0, w, hs_r, cs_r, gates_r, lens, False)
    want = reference.lstm_recurrence_backward(grad_h, grad_c, h0, c0, w, hs_r, cs_r, gates_r, lens, False)
    _check_grads(["grad gi", "grad h0", "grad c0", "grad w_hh", "grad b_hh"], got, want, dtype, False)


def test_non_contiguous_inputs(ops):
    """Strided inputs (a transposed weight, a batch-first gi seen time-major) give the same result."""
    T, B, H, dtype = 6, 5, 7, torch.float64
    gi, h0, _, w, b, lens = _make(3, T, B, H, dtype, True, "int64", seed=5)
    gi_nc = gi.transpose(0, 1).contiguous().transpose(0, 1)
    w_nc = w.t().contiguous().t()
    got = ops.gru_recurrence_forward(gi_nc, h0, w_nc, b, lens, True)
    want = reference.gru_recurrence_forward(gi, h0, w, b, lens, True)
    for name, a, e in zip(["hs", "gates"], got, want):
        _close(name, a, e, dtype)


def test_bad_arguments_raise(ops):
    gi = torch.randn(4, 2, 3 * 8)
    h0 = torch.randn(2, 8)
    w = torch.randn(3 * 8, 8)
    with pytest.raises(RuntimeError, match="w_hh"):
        ops.gru_recurrence_forward(gi, h0, w[:, :4], None, None, True)
    with pytest.raises(RuntimeError, match="gi"):
        ops.gru_recurrence_forward(gi[..., :-1], h0, w, None, None, True)
    with pytest.raises(RuntimeError, match="lengths"):
        ops.gru_recurrence_forward(gi, h0, w, None, torch.ones(3, dtype=torch.int64), True)


def test_status_and_registered_names(ops):
    assert extension.status() == (True, "ok")
    for name in ("gru_recurrence_forward", "gru_recurrence_backward",
                 "lstm_recurrence_forward", "lstm_recurrence_backward"):
        assert hasattr(torch.ops.fastseq_cpp, name)
