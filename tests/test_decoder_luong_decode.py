"""The Luong decoder recurrence as one op (``fastseq::luong_gru_decode``): outputs
and every gradient equal the flow written out in plain torch ops (GRU cell on
``[E y; a]``, additive attention from the new state over the *unprojected*
values, ``a = tanh(W_c [s; c] + b_c)``) on every backend; bad inputs get clear
errors; opcheck and torch.compile; one autograd node; launches per step."""
import pytest
import torch
import torch.nn.functional as F
from parity import assert_close

from conftest import DEVICE, require
import fastseq
from fastseq import ops
from fastseq.backend import alloc
from fastseq.ops import LuongWeights
from fastseq.ops import launches
from fastseq.ops.decoder_step import luong


def _inputs(B, T, H, S, A, D, dtype, bias, masking, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype).requires_grad_(True)

    gi, h0 = rnd(B, T, 3 * H), rnd(B, 2 * H)
    keys, values = rnd(B, S, A), rnd(B, S, D)
    # w_a, w_cs, w_cc, w_hh, b_att, b_hh, energy, w_ia
    w = [rnd(A, H, scale=H ** -0.5), rnd(H, H, scale=H ** -0.5), rnd(H, D, scale=D ** -0.5),
         rnd(3 * H, H, scale=H ** -0.5), rnd(H) if bias else None, rnd(3 * H) if bias else None,
         rnd(1, A, scale=A ** -0.5), rnd(3 * H, H, scale=H ** -0.5)]
    lens = torch.tensor([S, 1] + [1 + (3 * b) % S for b in range(2, B)])[:B]
    mask = lengths = None
    if masking == "mask":
        mask = (torch.arange(S)[None, :] < lens[:, None]).to(DEVICE)
    elif masking == "lengths":
        lengths = lens.to(DEVICE)
    return gi, h0, keys, values, w, mask, lengths


def _fused(gi, h0, keys, values, w, mask, lengths):
    w_a, w_cs, w_cc, w_hh, b_att, b_hh, energy, w_ia = w
    return ops.luong_gru_decode(gi, h0, keys, F.linear(values, w_cc),
                                LuongWeights.build(w_a, w_cs, w_hh, b_att, b_hh, energy, w_ia), mask, lengths)


def _plain(gi, h0, keys, values, w, mask, lengths):
    """The flow in plain torch ops, from the formulas (Luong et al. 2015 eq. 5, additive scores)."""
    w_a, w_cs, w_cc, w_hh, b_att, b_hh, energy, w_ia = w
    H = w_hh.shape[1]
    s, a = h0[:, :H], h0[:, H:]
    S = keys.shape[1]
    valid = mask if mask is not None else (
        torch.arange(S, device=keys.device)[None] < lengths[:, None] if lengths is not None else None)
    states, alphas = [], []
    for gi_t in gi.unbind(1):
        x = gi_t + a @ w_ia.t()
        hh = s @ w_hh.t() + (b_hh if b_hh is not None else 0)
        r = torch.sigmoid(x[:, :H] + hh[:, :H])
        z = torch.sigmoid(x[:, H:2 * H] + hh[:, H:2 * H])
        n = torch.tanh(x[:, 2 * H:] + r * hh[:, 2 * H:])
        s = (1 - z) * n + z * s
        e = torch.tanh((s @ w_a.t()).unsqueeze(1) + keys) @ energy.reshape(-1)
        if valid is not None:
            e = e.masked_fill(~valid, float("-inf"))
        alpha = torch.softmax(e, -1)
        c = torch.bmm(alpha.unsqueeze(1), values).squeeze(1)
        a = torch.tanh(F.linear(torch.cat([s, c], 1), torch.cat([w_cs, w_cc], 1), b_att))
        states.append(torch.cat([s, a], 1))
        alphas.append(alpha)
    return torch.stack(states, 1), torch.stack(alphas, 1)


def _run(fn, xs, seed):
    """Outputs and the gradients of every leaf under a random cotangent on both outputs."""
    gi, h0, keys, values, w, mask, lengths = xs
    outs = fn(gi, h0, keys, values, w, mask, lengths)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in outs)
    leaves = [gi, h0, keys, values] + [x for x in w if x is not None]
    return [o.detach() for o in outs], torch.autograd.grad(loss, leaves)


NAMES = ["states", "weights"]
GRADS = ["gi_emb", "h0", "proj_keys", "values", "w_a", "w_cs", "w_cc", "w_hh", "b_att", "b_hh", "energy", "w_ia"]


def _compare(name, dtype, B, T, H, S, A, D, bias, masking, seed=0):
    require(name)
    xs = _inputs(B, T, H, S, A, D, dtype, bias, masking, seed)
    with fastseq.backend(name):
        got = _run(_fused, xs, seed + 1)
    want = _run(_plain, xs, seed + 1)
    for n, a, b in zip(NAMES, got[0], want[0]):
        assert_close(a, b, name=n)
    grads = [n for n in GRADS if bias or n not in ("b_att", "b_hh")]
    assert len(got[1]) == len(grads)
    for n, a, b in zip(grads, got[1], want[1]):
        assert torch.isfinite(a).all(), n
        assert a.abs().sum() > 0, n  # every input takes part
        assert_close(a, b, name=f"grad {n}")


@pytest.mark.parametrize("name", ["reference", "cpp"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masking", ["mask", "lengths", None])
def test_luong_decode_equals_the_formulas_float64(name, T, bias, masking):
    _compare(name, torch.float64, B=4, T=T, H=5, S=7, A=6, D=3, bias=bias, masking=masking, seed=T)


@pytest.mark.parametrize("T,bias,masking", [(1, True, "mask"), (4, False, "lengths"), (3, True, None)])
def test_luong_decode_equals_the_formulas_triton_float32(T, bias, masking):
    _compare("triton", torch.float32, B=3, T=T, H=4, S=5, A=3, D=6, bias=bias, masking=masking, seed=10 + T)


def test_luong_decode_gradcheck_float64():
    gi, h0, keys, values, w, mask, _ = _inputs(2, 3, 3, 4, 2, 3, torch.float64, True, "mask", seed=5)
    pv = F.linear(values, w[2]).detach().requires_grad_(True)
    args = (gi, h0, keys, pv, w[0], w[1], w[3], w[4], w[5], w[6], w[7])
    with fastseq.backend("reference"):
        assert torch.autograd.gradcheck(
            lambda *t: ops.luong_gru_decode(t[0], t[1], t[2], t[3], LuongWeights.build(*t[4:]), mask), args)


def test_luong_decode_is_one_autograd_node():
    gi, h0, keys, values, w, mask, _ = _inputs(2, 6, 3, 4, 2, 3, torch.float32, True, "mask", seed=3)
    with fastseq.backend("reference"):
        states, weights = _fused(gi, h0, keys, values, w, mask, None)
    node = states.grad_fn
    assert node is weights.grad_fn
    assert all(f is None or "luong_gru_decode" not in f.name() or f is node for f, _ in node.next_functions)
    # Its inputs: leaves, the projected values and the w_cat concatenation; nothing per step.
    assert sum(1 for f, _ in node.next_functions if f is not None) <= 9


def test_luong_decode_no_grad_and_empty_target(backend):
    gi, h0, keys, values, w, mask, _ = _inputs(3, 4, 4, 5, 3, 2, torch.float32, True, "mask", seed=7)
    with torch.no_grad():
        got = _fused(gi, h0, keys, values, w, mask, None)
        want = _plain(gi, h0, keys, values, w, mask, None)
        for n, a, b in zip(NAMES, got, want):
            assert_close(a, b, name=n)
        states, weights = _fused(gi[:, :0], h0, keys, values, w, mask, None)
    assert states.shape == (3, 0, 8) and weights.shape == (3, 0, 5)
    # Gradients through an empty target: zero for h0, none of the rest is read.
    states, _ = _fused(gi[:, :0], h0, keys, values, w, mask, None)
    (g,) = torch.autograd.grad(states.sum() + h0.sum(), [h0])
    assert_close(g, torch.ones_like(h0))


def test_luong_decode_launches_per_step():
    """Per step (no gradient, the Triton backend: every fastseq kernel is counted):
    the fused cell, one product (addmm), and the fused attention with the attention
    vector's add and tanh in its epilogue: 3 launches; the loop adds no other op."""
    require("triton")
    gi, h0, keys, values, w, mask, _ = _inputs(3, 8, 4, 5, 3, 2, torch.float32, True, "mask", seed=7)
    poison = alloc.poison()
    alloc.set_poison(False)  # NaN-filling outputs is a test aid, not a launch of the op
    try:
        with torch.no_grad(), fastseq.backend("triton"):
            pv = F.linear(values, w[2])
            sw = LuongWeights.build(w[0], w[1], w[3], w[4], w[5], w[6], w[7])
            ops.luong_gru_decode(gi[:, :1], h0, keys, pv, sw, mask)  # warm-up (compile)
            short = launches.count_ops(ops.luong_gru_decode, gi[:, :2], h0, keys, pv, sw, mask)
            long = launches.count_ops(ops.luong_gru_decode, gi, h0, keys, pv, sw, mask)
    finally:
        alloc.set_poison(poison)
    per_step = {k: (long[k] - short.get(k, 0)) / 6 for k in long if long[k] != short.get(k, 0)}
    assert per_step == {"aten::addmm": 1, "triton::_attention_fwd_kernel": 1,
                        "triton::_gru_context_cell_fwd_kernel": 1}, per_step


def test_luong_decode_bad_input():
    gi, h0, keys, values, w, mask, _ = _inputs(2, 3, 4, 5, 3, 6, torch.float32, True, "mask", seed=0)
    pv = F.linear(values, w[2])
    sw = LuongWeights.build(w[0], w[1], w[3], w[4], w[5], w[6], w[7])
    f = ops.luong_gru_decode
    with pytest.raises(TypeError, match="weights: expected a LuongWeights"):
        f(gi, h0, keys, pv, tuple(sw), mask)
    with pytest.raises(TypeError, match="proj_values"):
        f(gi, h0, keys, pv.tolist(), sw, mask)
    with pytest.raises(RuntimeError, match=r"gi_emb: expected a 3-D tensor \(B, T, 3\*H\) = \(B, T, 12\).*"
                                           r"got shape \(2, 12\)"):
        f(gi[:, 0], h0, keys, pv, sw, mask)
    with pytest.raises(RuntimeError, match=r"h0: expected shape \(B, 2\*H\) = \(2, 8\), got \(2, 4\)"):
        f(gi, h0[:, :4], keys, pv, sw, mask)
    with pytest.raises(RuntimeError, match=r"proj_keys: expected shape \(2, S, 3\), got \(2, 5, 4\)"):
        f(gi, h0, torch.zeros(2, 5, 4, device=DEVICE), pv, sw, mask)
    with pytest.raises(RuntimeError, match=r"proj_values: expected shape \(B, S, H\) = \(2, 5, 4\), got \(2, 5, 6\)"):
        f(gi, h0, keys, values, sw, mask)
    with pytest.raises(RuntimeError, match=r"weights.w_cat: expected a 2-D tensor \(A \+ 4\*H, H\) with A = 3"):
        f(gi, h0, keys, pv, sw._replace(w_cat=sw.w_cat[1:]), mask)
    with pytest.raises(RuntimeError, match=r"weights.w_ia: expected shape \(3\*H, H\) = \(12, 4\), got \(12, 3\)"):
        f(gi, h0, keys, pv, sw._replace(w_ia=sw.w_ia[:, :3]), mask)
    with pytest.raises(RuntimeError, match=r"weights.b_att: expected shape \(H,\) = \(4,\), got \(3,\)"):
        f(gi, h0, keys, pv, sw._replace(b_att=sw.b_att[1:]), mask)
    with pytest.raises(RuntimeError, match=r"weights.b_hh: expected shape \(3\*H,\) = \(12,\), got \(11,\)"):
        f(gi, h0, keys, pv, sw._replace(b_hh=sw.b_hh[1:]), mask)
    with pytest.raises(RuntimeError, match=r"weights.energy: expected a 1-D tensor \[A\]"):
        f(gi, h0, keys, pv, sw._replace(energy=sw.energy.reshape(1, 1, 3)), mask)
    with pytest.raises(RuntimeError, match=r"proj_values: expected dtype torch.float32 \(that of gi_emb\)"):
        f(gi, h0, keys, pv.double(), sw, mask)
    with pytest.raises(RuntimeError, match=r"gi_emb: expected a floating"):
        f(gi.long(), h0, keys, pv, sw, mask)
    with pytest.raises(RuntimeError, match=r"h0: expected device"):
        f(gi, h0.to("meta"), keys, pv, sw, mask)
    with pytest.raises(ValueError, match="mask, lengths: pass at most one"):
        f(gi, h0, keys, pv, sw, mask, torch.tensor([5, 1], device=DEVICE))
    with pytest.raises(RuntimeError, match=r"lengths: expected values <= S = 5, got max 6"):
        f(gi, h0, keys, pv, sw, None, torch.tensor([6, 1], device=DEVICE))
    with pytest.raises(RuntimeError, match="proj_keys: the source is empty"):
        f(gi, h0, keys[:, :0], pv[:, :0], sw)


def test_luong_decode_save_false_cannot_be_differentiated():
    gi, h0, keys, values, w, mask, _ = _inputs(2, 3, 4, 5, 3, 6, torch.float32, True, "mask", seed=0)
    pv = F.linear(values, w[2])
    sw = LuongWeights.build(w[0], w[1], w[3], w[4], w[5], w[6], w[7])
    states, *_ = luong.luong_gru_decode_op(gi, h0, keys, pv, *sw, mask, None, False)
    with pytest.raises(RuntimeError, match="save=False"):
        states.sum().backward()


def test_luong_decode_opcheck():
    B, T, S, A, H = 2, 3, 5, 4, 4
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])

    def r(*s):
        return torch.randn(*s, requires_grad=True)

    for b_att, b_hh, m, lengths in ((r(H), r(3 * H), mask, None), (None, None, None, torch.tensor([5, 2]))):
        args = (r(B, T, 3 * H), r(B, 2 * H), r(B, S, A), r(B, S, H), r(A + 4 * H, H), b_att, b_hh, r(A),
                r(3 * H, H), m, lengths, True)
        torch.library.opcheck(luong.luong_gru_decode_op, args)


def test_luong_decode_compiles_fullgraph():
    gi, h0, keys, values, w, mask, _ = _inputs(2, 4, 3, 5, 2, 3, torch.float32, True, "mask", seed=9)

    def f(gi, h0, keys, values, *w):
        s, a = _fused(gi, h0, keys, values, list(w), mask, None)
        return s.sum() + (a * a).sum()

    args = (gi, h0, keys, values, *w)
    want = f(*args)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        assert_close(a, b)
