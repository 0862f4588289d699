"""The C++ (ATen) CPU additive-attention op and decoder GRU context cell
(csrc/cpu/attention.cpp, csrc/cpu/cell.cpp) against the references (naive.py):
every output and every gradient output, float32 and float64, with a mask, with
lengths and with neither, and a column-slice gh for the cell.

The two sources are built here as a standalone extension whose ops live in the
``fastseq_cpp_attn_test`` namespace (-DFASTSEQ_CPP_LIBRARY=...), so that the
test never clashes with the full ``fastseq_cpp`` library that other tests (and
conftest) load into the same process. The build is cached under
``$FASTSEQ_CACHE/test-ext`` (default ``~/.cache/fastseq/test-ext``) in a
directory named after a hash of the sources, the flags and the torch version.
A failed build FAILS these tests (it does not skip them).
"""
import hashlib
import os
from pathlib import Path

import pytest
import torch
from parity import assert_close

from fastseq.ops.attention import naive as attention_ref
from fastseq.ops.decoder_step import naive as cell_ref

ROOT = Path(__file__).resolve().parent.parent
CPU_SRC = ROOT / "csrc" / "cpu"
SOURCES = [CPU_SRC / "attention.cpp", CPU_SRC / "cell.cpp"]
HEADERS = sorted(CPU_SRC.glob("*.h"))  # every header the two sources may include
LIB = "fastseq_cpp_attn_test"

def _openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _cflags():
    # The flags fastseq.ops.cpp builds the library with, plus the test namespace.
    flags = ["-O3", "-DNDEBUG", "-fno-trapping-math", "-fno-math-errno", f"-DFASTSEQ_CPP_LIBRARY={LIB}"]
    return flags + (["-fopenmp"] if _openmp() else [])


def _build_dir() -> Path:
    h = hashlib.sha256()
    for p in SOURCES + HEADERS:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(repr((_cflags(), torch.__version__, torch.version.git_version)).encode())
    root = os.environ.get("FASTSEQ_CACHE") or os.path.join(Path.home(), ".cache", "fastseq")
    return Path(root) / "test-ext" / f"attn-{h.hexdigest()[:16]}"


@pytest.fixture(scope="module")
def ops():
    from torch.utils import cpp_extension

    try:
        bdir = _build_dir()
        bdir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=LIB,
            sources=[str(p) for p in SOURCES],
            extra_cflags=_cflags(),
            extra_ldflags=["-fopenmp"] if _openmp() else [],
            extra_include_paths=[str(CPU_SRC)],
            build_directory=str(bdir),
            verbose=False,
            is_python_module=False,
        )
        return getattr(torch.ops, LIB)
    except Exception as exc:  # noqa: BLE001 - a build failure fails the tests
        pytest.fail(f"building/loading {LIB} failed: {type(exc).__name__}: {exc}", pytrace=False)


def _close(name, got, want, dtype):
    assert_close(got, want, dtype, name)


def _rnd(g, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ------------------------------------------------------------------- attention


def _attention_inputs(B, T, S, A, D, dtype, masking, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = _rnd(g, dtype, B, T, A), _rnd(g, dtype, B, S, A)
    v, e = _rnd(g, dtype, B, S, D), _rnd(g, dtype, A)
    mask = lengths = None
    if masking == "mask":
        mask = torch.rand(B, S, generator=g) < 0.6  # holes anywhere
        mask[torch.arange(B), torch.randint(0, S, (B,), generator=g)] = True  # >= 1 valid per row
        mask[0, :] = False
        mask[0, S - 1] = True  # a row whose only valid position is the last
    elif masking in ("lengths", "lengths32"):
        lengths = torch.randint(1, S + 1, (B,), generator=g)
        lengths[0] = 1
        if B > 1:
            lengths[-1] = S
        if masking == "lengths32":
            lengths = lengths.to(torch.int32)
    return q, k, v, e, mask, lengths, g


def _check_attention(ops, q, k, v, e, mask, lengths, g, dtype):
    ctx, w = ops.additive_attention_forward(q, k, v, e, mask, lengths)
    ctx_r, w_r = attention_ref.additive_attention_forward(q, k, v, e, mask, lengths)
    _close("context", ctx, ctx_r, dtype)
    _close("weights", w, w_r, dtype)
    names = ("grad query", "grad proj_keys", "grad values", "grad energy")
    gc = _rnd(g, dtype, *ctx.shape)
    for gw in (None, _rnd(g, dtype, *w.shape)):
        got = ops.additive_attention_backward(gc, gw, q, k, v, e, w)
        want = attention_ref.additive_attention_backward(gc, gw, q, k, v, e, w_r)
        assert len(got) == 4
        for name, a, b in zip(names, got, want):
            _close(f"{name} (grad_weights {'given' if gw is not None else 'None'})", a, b, dtype)
    return ctx, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masking", [None, "mask", "lengths"])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("D", [1, 3, 20])
@pytest.mark.parametrize("A", [1, 4, 33])
@pytest.mark.parametrize("S", [1, 5, 17])
@pytest.mark.parametrize("T", [1, 3])
def test_attention_parity(ops, T, S, A, D, B, masking, dtype):
    seed = ((((T * 31 + S) * 37 + A) * 41 + D) * 43 + B) * 7 + (masking is not None) + (masking == "mask")
    q, k, v, e, mask, lengths, g = _attention_inputs(B, T, S, A, D, dtype, masking, seed)
    _, w = _check_attention(ops, q, k, v, e, mask, lengths, g, dtype)
    valid = attention_ref.source_mask(mask, lengths, B, S, w.device)
    if valid is not None:
        assert (w.masked_select(~valid.unsqueeze(1)) == 0).all(), "weights must be 0 at invalid positions"
    assert_close(w.sum(-1), torch.ones(B, T, dtype=dtype), name="weights' row sums")


def _check_attention_accuracy(ops, q, k, v, e, mask, lengths, g):
    """float32 against the float64 reference of the same inputs, judged at float32
    (tests/parity.py): at sizes where the gradients sum hundreds of terms, the
    float32 reference is itself rounding noise away from the true result, so the
    op is compared with the float64 result instead."""
    up = [t.double() for t in (q, k, v, e)]
    got = ops.additive_attention_forward(q, k, v, e, mask, lengths)
    true = attention_ref.additive_attention_forward(*up, mask, lengths)
    gc, gw = _rnd(g, torch.float32, *got[0].shape), _rnd(g, torch.float32, *got[1].shape)
    got += ops.additive_attention_backward(gc, gw, q, k, v, e, got[1])
    true += attention_ref.additive_attention_backward(gc.double(), gw.double(), *up, true[1])
    names = ("context", "weights", "grad query", "grad proj_keys", "grad values", "grad energy")
    for name, a, t in zip(names, got, true):
        assert a.dtype == torch.float32, name
        assert_close(a, t, torch.float32, name, cast=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_int32_lengths_and_large(ops, dtype):
    """int32 lengths; sizes where the backward splits the source into chunks and
    both loops run on several threads."""
    for B, T, S, A, D in ((2, 5, 40, 64, 48), (40, 2, 9, 70, 33), (3, 1, 64, 128, 16)):
        for masking, seed in (("lengths32", B + T + S), ("mask", B * T * S)):
            q, k, v, e, mask, lengths, g = _attention_inputs(B, T, S, A, D, dtype, masking, seed)
            if dtype == torch.float64:
                _check_attention(ops, q, k, v, e, mask, lengths, g, dtype)
            else:
                _check_attention_accuracy(ops, q, k, v, e, mask, lengths, g)


def test_attention_large_scores(ops):
    """Inputs where tanh saturates and the softmax is peaked: float64 parity, and
    float32 accuracy against float64 (large scores amplify rounding: a score off
    by 1e-6 moves its softmax weight by 1e-6 relative, so the float32 reference
    is itself further than 1e-5 from the exact result)."""
    for dtype in (torch.float64, torch.float32):
        q, k, v, e, mask, lengths, g = _attention_inputs(4, 3, 17, 33, 20, dtype, "lengths", 5)
        q, k, e = q * 4, k * 4, e * 3
        if dtype == torch.float64:
            _check_attention(ops, q, k, v, e, mask, lengths, g, dtype)
        else:
            _check_attention_accuracy(ops, q, k, v, e, mask, lengths, g)


def test_attention_noncontiguous(ops):
    """Views with arbitrary strides are accepted (and read correctly)."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(3)
    B, T, S, A, D = 3, 2, 7, 9, 5
    q = _rnd(g, dtype, A, T, B).permute(2, 1, 0)
    k = _rnd(g, dtype, B, S, 2 * A)[:, :, ::2]
    v = _rnd(g, dtype, S, B, D).transpose(0, 1)
    e = _rnd(g, dtype, 3 * A)[1::3]
    mask = (torch.rand(S, B, generator=g) < 0.7).t()
    mask[:, 0] = True
    _check_attention(ops, q, k, v, e, mask, None, g, dtype)


def test_attention_mask_wins_over_lengths(ops):
    """Given both, the mask is used (the reference's rule)."""
    dtype = torch.float64
    q, k, v, e, mask, _, g = _attention_inputs(4, 2, 6, 5, 3, dtype, "mask", 11)
    lengths = torch.ones(4, dtype=torch.int64)
    ctx, w = ops.additive_attention_forward(q, k, v, e, mask, lengths)
    ctx_r, w_r = attention_ref.additive_attention_forward(q, k, v, e, mask, lengths)
    _close("context", ctx, ctx_r, dtype)
    _close("weights", w, w_r, dtype)


def test_attention_edge_cases(ops):
    """A row with no valid position gives NaN (as the reference's softmax of
    -inf); S = 0 gives empty weights and a zero context; B = 0 and T = 0 work."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(5)
    q, k, v, e = _rnd(g, dtype, 2, 2, 4), _rnd(g, dtype, 2, 3, 4), _rnd(g, dtype, 2, 3, 5), _rnd(g, dtype, 4)
    lengths = torch.tensor([0, 2])
    ctx, w = ops.additive_attention_forward(q, k, v, e, None, lengths)
    ctx_r, w_r = attention_ref.additive_attention_forward(q, k, v, e, None, lengths)
    assert torch.isnan(w[0]).all() and torch.isnan(ctx[0]).all()
    _close("context", ctx, ctx_r, dtype)
    _close("weights", w, w_r, dtype)
    for B, T, S, A, D in ((2, 2, 0, 4, 5), (0, 2, 3, 4, 5), (2, 0, 3, 4, 5), (2, 2, 3, 0, 5), (2, 2, 3, 4, 0)):
        q, k, v, e = _rnd(g, dtype, B, T, A), _rnd(g, dtype, B, S, A), _rnd(g, dtype, B, S, D), _rnd(g, dtype, A)
        _check_attention(ops, q, k, v, e, None, None, g, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_half(ops, dtype):
    """Half inputs are computed in float32 and the results cast back."""
    q, k, v, e, mask, lengths, g = _attention_inputs(4, 3, 17, 33, 20, dtype, "lengths", 9)
    _check_attention(ops, q, k, v, e, mask, lengths, g, dtype)


def test_attention_autograd(ops):
    """The C++ backward against autograd through the reference forward (float64)."""
    dtype = torch.float64
    q, k, v, e, mask, lengths, g = _attention_inputs(3, 2, 6, 7, 4, dtype, "mask", 21)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, e)]
    ctx, w = attention_ref.additive_attention_forward(*leaves, mask, lengths)
    gc, gw = _rnd(g, dtype, *ctx.shape), _rnd(g, dtype, *w.shape)
    want = torch.autograd.grad((ctx * gc).sum() + (w * gw).sum(), leaves)
    got = ops.additive_attention_backward(gc, gw, q, k, v, e, w.detach())
    for name, a, b in zip(("query", "proj_keys", "values", "energy"), got, want):
        _close(f"grad {name}", a, b, dtype)


def test_attention_deterministic(ops):
    """Bitwise the same on every run and for any number of threads."""
    dtype = torch.float32
    q, k, v, e, _, lengths, g = _attention_inputs(3, 4, 40, 96, 24, dtype, "lengths", 2)
    ctx, w = ops.additive_attention_forward(q, k, v, e, None, lengths)
    gc, gw = _rnd(g, dtype, *ctx.shape), _rnd(g, dtype, *w.shape)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            runs.append(ops.additive_attention_forward(q, k, v, e, None, lengths)
                        + ops.additive_attention_backward(gc, gw, q, k, v, e, w))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_attention_argument_checks(ops):
    q, k, v, e = torch.randn(2, 1, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(4)
    with pytest.raises(RuntimeError, match="proj_keys"):
        ops.additive_attention_forward(q, torch.randn(2, 3, 5), v, e, None, None)
    with pytest.raises(RuntimeError, match="energy"):
        ops.additive_attention_forward(q, k, v, torch.randn(5), None, None)
    with pytest.raises(RuntimeError, match="mask"):
        ops.additive_attention_forward(q, k, v, e, torch.ones(2, 3, dtype=torch.uint8), None)
    with pytest.raises(RuntimeError, match="lengths"):
        ops.additive_attention_forward(q, k, v, e, None, torch.ones(2))
    with pytest.raises(RuntimeError, match="weights"):
        ops.additive_attention_backward(torch.randn(2, 1, 5), None, q, k, v, e, torch.randn(2, 1, 4))


# -------------------------------------------------------------------- GRU cell


def _cell_inputs(B, H, D, dtype, bias, seed):
    """gi, gh and h as column slices of wider tensors (row stride != width)."""
    g = torch.Generator().manual_seed(seed)
    gi = _rnd(g, dtype, B, 3 * H + 5)[:, 2:2 + 3 * H]
    context = _rnd(g, dtype, B, D)
    w_ic = _rnd(g, dtype, 3 * H, D, scale=D ** -0.5)
    gh = _rnd(g, dtype, B, 4 * H + 3)[:, H:4 * H]  # e.g. the W_hh part of a fused [query; gh] product
    b_hh = _rnd(g, dtype, 3 * H) if bias else None
    h = _rnd(g, dtype, B, H + 2)[:, 1:1 + H]
    return gi, context, w_ic, gh, b_hh, h, g


def _check_cell(ops, B, H, D, dtype, bias, seed):
    gi, context, w_ic, gh, b_hh, h, g = _cell_inputs(B, H, D, dtype, bias, seed)
    assert B == 1 or gh.stride(0) != gh.shape[1]
    out, gates = ops.gru_context_cell_forward(gi, context, w_ic, gh, b_hh, h, True)
    out_r, gates_r = cell_ref.gru_context_cell_forward(gi, context, w_ic, gh, b_hh, h, True)
    _close("h'", out, out_r, dtype)
    _close("gates", gates, gates_r, dtype)
    out_n, none = ops.gru_context_cell_forward(gi, context, w_ic, gh, b_hh, h, False)
    assert none.shape == (0,) and none.dtype == dtype
    _close("h' (no gates)", out_n, out_r, dtype)

    grad_h = _rnd(g, dtype, B, H)
    names = ("grad gi", "grad context", "grad w_ic", "grad gh", "grad b_hh", "grad h")
    got = ops.gru_context_cell_backward(grad_h, gates, h, context, w_ic, bias)
    want = cell_ref.gru_context_cell_backward(grad_h, gates_r, h, context, w_ic, bias)
    assert len(got) == 6
    for name, a, b in zip(names, got, want):
        if name == "grad b_hh" and not bias:  # absent: an empty [0] tensor in every backend
            assert a.shape == b.shape == (0,), f"{name}: expected empty [0] tensors, got {tuple(a.shape)}"
        else:
            _close(name, a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("D", [1, 7])
@pytest.mark.parametrize("H", [1, 5, 16])
@pytest.mark.parametrize("B", [1, 3])
def test_cell_parity(ops, B, H, D, bias, dtype):
    _check_cell(ops, B, H, D, dtype, bias, seed=B * 100 + H * 10 + D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cell_large(ops, dtype):
    """Enough rows for the pointwise passes to run on several threads."""
    _check_cell(ops, 300, 64, 48, dtype, True, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cell_half(ops, dtype):
    _check_cell(ops, 3, 16, 7, dtype, True, seed=2)


def test_cell_autograd(ops):
    """The C++ backward against autograd through the reference forward (float64)."""
    dtype = torch.float64
    gi, context, w_ic, gh, b_hh, h, g = _cell_inputs(3, 5, 4, dtype, True, 7)
    leaves = [t.clone().requires_grad_() for t in (gi, context, w_ic, gh, b_hh, h)]
    out, _ = cell_ref.gru_context_cell_forward(*leaves, False)
    grad_h = _rnd(g, dtype, 3, 5)
    want = torch.autograd.grad((out * grad_h).sum(), leaves)
    _, gates = ops.gru_context_cell_forward(gi, context, w_ic, gh, b_hh, h, True)
    d_gi, d_ctx, d_w, d_gh, d_b, d_h = ops.gru_context_cell_backward(grad_h, gates, h, context, w_ic, True)
    for name, a, b in zip(("gi", "context", "w_ic", "gh", "b_hh", "h"), (d_gi, d_ctx, d_w, d_gh, d_b, d_h), want):
        _close(f"grad {name}", a, b, dtype)


def test_cell_argument_checks(ops):
    B, H, D = 2, 3, 4
    gi, ctx, w, gh, h = torch.randn(B, 3 * H), torch.randn(B, D), torch.randn(3 * H, D), torch.randn(B, 3 * H), \
        torch.randn(B, H)
    with pytest.raises(RuntimeError, match="w_ic"):
        ops.gru_context_cell_forward(gi, ctx, torch.randn(3 * H, D + 1), gh, None, h, True)
    with pytest.raises(RuntimeError, match="b_hh"):
        ops.gru_context_cell_forward(gi, ctx, w, gh, torch.randn(H), h, True)
    with pytest.raises(RuntimeError, match="gates"):
        ops.gru_context_cell_backward(torch.randn(B, H), torch.empty(0), h, ctx, w, True)
