"""The additive-attention op: the reference against the equation differentiated
by autograd (float64), the fused Triton kernels against the reference (under the
Triton interpreter on CPU, natively on a GPU), and bad input.

Every case compares context, weights and the gradients w.r.t. q, K, V and v,
with a random upstream gradient on both outputs."""
import pytest
import torch
from parity import assert_close

from conftest import DEVICE, TRITON
import fastseq
from fastseq import ops
from fastseq.ops.attention import naive as reference


def _naive(q, k, v, e, valid):
    """The equation, written out: q [B,T,A], k [B,S,A], v [B,S,D], e [A], valid [B,S]."""
    B, T, _ = q.shape
    S = k.shape[1]
    scores = torch.empty(B, T, S, dtype=q.dtype)
    for t in range(T):
        scores[:, t] = (torch.tanh(q[:, t, None, :] + k) * e).sum(-1)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    w = torch.softmax(scores, -1)
    return w @ v, w


def _inputs(B, T, S, A, D, dtype, how, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, e = rnd(B, T, A), rnd(B, S, A), rnd(B, S, D), rnd(A)
    lens = torch.randint(1, S + 1, (B,), generator=g)
    lens[0] = 1  # a length-1 source
    lens[-1] = S
    valid = torch.arange(S)[None] < lens[:, None]
    if how == "mask":  # padded rows plus holes inside the valid region
        valid = valid & (torch.rand(B, S, generator=g) > 0.2)
        valid[:, 0] = True
    if how == "none":
        valid = torch.ones(B, S, dtype=torch.bool)
    mask = valid if how == "mask" else None
    lengths = lens if how == "lengths" else None
    cast = lambda x: x.to(device, dtype)  # noqa: E731
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    return (cast(q), cast(k), cast(v), cast(e)), dev(mask), dev(lengths), valid


def _grads(fn, tensors, seed):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    ctx, w = fn(*tensors)
    g = torch.Generator().manual_seed(seed)
    gc = torch.randn(ctx.shape, generator=g).to(ctx)
    gw = torch.randn(w.shape, generator=g).to(w)
    grads = torch.autograd.grad((ctx * gc).sum() + (w * gw).sum(), tensors)
    return ctx.detach(), w.detach(), grads


@pytest.mark.parametrize("how", ["mask", "lengths", "none"])
@pytest.mark.parametrize("T", [1, 3])
def test_reference_matches_equation_float64(how, T):
    (q, k, v, e), mask, lengths, valid = _inputs(3, T, 7, 5, 4, torch.float64, how, seed=T)
    with fastseq.backend("reference"):
        got = _grads(lambda *x: ops.additive_attention(*x, mask=mask, lengths=lengths), (q, k, v, e), 1)
    want = _grads(lambda *x: _naive(*x, valid), (q, k, v, e), 1)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    assert torch.all(got[1][~valid[:, None, :].expand_as(got[1])] == 0)
    for name, a, b in zip("qKVv", got[2], want[2]):
        assert_close(a, b, name=f"grad {name}")


def test_reference_gradcheck_float64():
    (q, k, v, e), mask, _, _ = _inputs(2, 2, 5, 3, 2, torch.float64, "mask", seed=3)
    xs = [t.requires_grad_(True) for t in (q, k, v, e)]
    with fastseq.backend("reference"):
        assert torch.autograd.gradcheck(
            lambda *x: ops.additive_attention(*x, mask=mask), xs, check_undefined_grad=True
        )


# (B, T, S, A, D): one query (decoder step), a few (broadcast path), many (tl.dot
# path); S and A and D below, at and above the interpreter's 16-wide tiles.
SHAPES = [(3, 1, 1, 4, 3), (4, 1, 20, 24, 18), (2, 3, 17, 16, 33), (2, 20, 37, 8, 5), (5, 1, 16, 16, 16)]
TRITON_DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]


@pytest.mark.skipif(not TRITON, reason="Triton backend not available here")
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("B,T,S,A,D", SHAPES)
@pytest.mark.parametrize("how", ["mask", "lengths", "none"])
def test_triton_matches_reference(B, T, S, A, D, how, dtype):
    tensors, mask, lengths, _ = _inputs(B, T, S, A, D, dtype, how, seed=S * 10 + T, device=DEVICE)
    fn = lambda *x: ops.additive_attention(*x, mask=mask, lengths=lengths)  # noqa: E731
    with fastseq.backend("triton"):
        got = _grads(fn, tensors, seed=2)
    with fastseq.backend("reference"):
        want = _grads(fn, tensors, seed=2)
    names = ["context", "weights", "grad q", "grad K", "grad V", "grad v"]
    for name, a, b in zip(names, got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
        assert a.dtype == b.dtype == dtype, name
        assert_close(a, b, dtype, name)


@pytest.mark.skipif(not TRITON, reason="Triton backend not available here")
def test_triton_context_only_gradient():
    """Only the context is used downstream (the decoder's case): grad_weights is None."""
    tensors, mask, _, _ = _inputs(3, 1, 19, 8, 6, torch.float32, "mask", seed=5, device=DEVICE)
    res = {}
    for name in ("triton", "reference"):
        xs = [t.clone().requires_grad_(True) for t in tensors]
        with fastseq.backend(name):
            ctx, _ = ops.additive_attention(*xs, mask=mask)
            res[name] = torch.autograd.grad(ctx.square().sum(), xs)
    for a, b in zip(res["triton"], res["reference"]):
        assert_close(a, b)


def test_single_query_equals_multi_query(backend):
    (q, k, v, e), mask, _, _ = _inputs(3, 4, 9, 5, 6, torch.float32, "mask", seed=7, device=DEVICE)
    ctx, w = ops.additive_attention(q, k, v, e, mask=mask)
    for t in range(4):
        c1, w1 = ops.additive_attention(q[:, t], k, v, e, mask=mask)
        assert_close(c1, ctx[:, t])
        assert_close(w1, w[:, t])


def test_lengths_equal_mask(backend):
    (q, k, v, e), _, lengths, valid = _inputs(4, 2, 11, 5, 3, torch.float32, "lengths", seed=9, device=DEVICE)
    a = ops.additive_attention(q, k, v, e, lengths=lengths)
    b = ops.additive_attention(q, k, v, e, mask=valid.to(DEVICE))
    for x, y in zip(a, b):
        assert_close(x, y)


def test_energy_as_linear_weight():
    (q, k, v, e), *_ = _inputs(2, 1, 4, 3, 2, torch.float32, "none", seed=1)
    assert_close(ops.additive_attention(q, k, v, e)[0], ops.additive_attention(q, k, v, e[None, :])[0])


def test_reference_half_inputs_computed_in_float32():
    (q, k, v, e), mask, _, _ = _inputs(2, 1, 6, 4, 3, torch.bfloat16, "mask", seed=2)
    ctx, w = reference.additive_attention_forward(q, k, v, e, mask)
    ctx32, w32 = reference.additive_attention_forward(q.float(), k.float(), v.float(), e.float(), mask)
    assert ctx.dtype == w.dtype == torch.bfloat16
    assert_close(ctx, ctx32.to(ctx.dtype))


# --------------------------------------------------------------------- bad input


def _ok():
    (q, k, v, e), *_ = _inputs(2, 1, 3, 4, 5, torch.float32, "none", seed=0)
    return q[:, 0], k, v, e


def test_zero_length_source_raises(backend):
    q, k, v, e = _ok()
    with pytest.raises(RuntimeError, match=r"mask: row 1 has no True entry \(a zero-length source\)"):
        ops.additive_attention(q, k, v, e, mask=torch.tensor([[True, False, False], [False] * 3]))
    with pytest.raises(RuntimeError, match="lengths: every source needs length >= 1"):
        ops.additive_attention(q, k, v, e, lengths=torch.tensor([2, 0]))
    with pytest.raises(RuntimeError, match="the source is empty"):
        ops.additive_attention(q, k[:, :0], v[:, :0], e)


@pytest.mark.parametrize("change,exc,match", [
    (dict(q=torch.randn(2, 5)), RuntimeError, r"query: expected shape \(2, 4\) or \(2, T, 4\), got \(2, 5\)"),
    (dict(q=torch.randn(3, 4)), RuntimeError, r"query: expected shape \(2, 4\)"),
    (dict(k=torch.randn(2, 3)), RuntimeError, r"proj_keys: expected a 3-D tensor"),
    (dict(v=torch.randn(2, 4, 5)), RuntimeError, r"values: expected shape \(2, 3, D\), got \(2, 4, 5\)"),
    (dict(e=torch.randn(3)), RuntimeError, r"energy: expected shape \(4,\) or \(1, 4\), got \(3,\)"),
    (dict(e=torch.randn(4, dtype=torch.float64)), RuntimeError, r"energy: expected dtype torch.float32 \(that of values\)"),
    (dict(mask=torch.ones(2, 3, dtype=torch.long)), RuntimeError, r"mask: expected a bool tensor, got torch.int64"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), RuntimeError, r"mask: expected shape \(B, S\) = \(2, 3\), got \(2, 4\)"),
    (dict(lengths=torch.tensor([1, 4])), RuntimeError, r"lengths: expected values <= S = 3, got max 4"),
    (dict(lengths=torch.tensor([1.0, 2.0])), RuntimeError, r"lengths: expected an int32/int64 tensor"),
    (dict(lengths=torch.tensor([1, 2, 3])), RuntimeError, r"lengths: expected shape \(2,\), got \(3,\)"),
    (dict(mask=torch.ones(2, 3, dtype=torch.bool), lengths=torch.tensor([1, 2])), ValueError, "pass at most one"),
    (dict(q=[[0.0]]), TypeError, "query: expected a Tensor, got list"),
])
def test_bad_input_names_the_argument(change, exc, match):
    q, k, v, e = _ok()
    args = dict(q=q, k=k, v=v, e=e, mask=None, lengths=None)
    args.update(change)
    with pytest.raises(exc, match=match):
        ops.additive_attention(args["q"], args["k"], args["v"], args["e"], mask=args["mask"],
                               lengths=args["lengths"])


@pytest.mark.parametrize("T", [1, 3])
def test_out_bias_epilogue_every_backend(backend, T):
    """The implementations' ``out_bias`` (used by the Luong decoder op): the first
    output becomes ``tanh(out_bias + context)``, on every backend, with a row-strided
    out_bias read in place (a column slice of a wider matrix, as the op passes it)."""
    from fastseq.ops.attention import op as attention_op

    g = torch.Generator().manual_seed(T)
    B, S, A, D = 3, 5, 4, 6
    q, k, v = (torch.randn(*s, generator=g).to(DEVICE) for s in ((B, T, A), (B, S, A), (B, S, D)))
    e = torch.randn(A, generator=g).to(DEVICE)
    wide = torch.randn(B, T, D + 7, generator=g).to(DEVICE)
    ob = wide[..., 2:2 + D]  # strides (T * (D + 7), D + 7, 1)
    lengths = torch.tensor([5, 1, 3], device=DEVICE)
    impl = attention_op.implementation(attention_op.FORWARD, q, k, v)
    ctx, w = impl(q, k, v, e, None, lengths)
    out, w2 = impl(q, k, v, e, None, lengths, ob)
    assert_close(w2, w)
    assert_close(out, torch.tanh(ob + ctx))
    want, _ = reference.additive_attention_forward(q, k, v, e, None, lengths, ob)
    assert_close(out, want)
