"""The teacher-forced decoder recurrence as one op (``fastseq::attention_gru_decode``):
outputs and every gradient equal T calls of ``attention_gru_step`` on the same
backend; bad inputs get clear errors; opcheck and torch.compile; one autograd
node for the whole sequence."""
import pytest
import torch
from parity import assert_close

from conftest import DEVICE, require
import fastseq
from fastseq import ops
from fastseq.ops import StepWeights
from fastseq.ops.decoder_step import decode


def _inputs(B, T, H, S, A, D, dtype, bias, masking, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype).requires_grad_(True)

    gi, h0 = rnd(B, T, 3 * H), rnd(B, H)
    keys, values = rnd(B, S, A), rnd(B, S, D)
    w = [rnd(A, H, scale=H ** -0.5), rnd(3 * H, H, scale=H ** -0.5), rnd(3 * H) if bias else None,
         rnd(1, A, scale=A ** -0.5), rnd(3 * H, D, scale=D ** -0.5)]
    lens = torch.tensor([S, 1] + [1 + (3 * b) % S for b in range(2, B)])[:B]
    mask = lengths = None
    if masking == "mask":
        mask = (torch.arange(S)[None, :] < lens[:, None]).to(DEVICE)
    elif masking == "lengths":
        lengths = lens.to(DEVICE)
    return gi, h0, keys, values, w, mask, lengths


def _run(fn_decode, xs, seed):
    """Outputs and the gradients of every leaf under a random cotangent on all three outputs."""
    gi, h0, keys, values, w, mask, lengths = xs
    sw = StepWeights.build(w[0], w[1], w[2], w[3], w[4])
    outs = fn_decode(gi, h0, keys, values, sw, mask, lengths)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in outs)
    leaves = [gi, h0, keys, values] + [x for x in w if x is not None]
    return [o.detach() for o in outs], torch.autograd.grad(loss, leaves)


def _step_loop(gi, h0, keys, values, sw, mask, lengths):
    h, states, contexts, alphas = h0, [], [], []
    for gi_t in gi.unbind(1):
        h, c, a = ops.attention_gru_step(gi_t, h, keys, values, sw, mask, lengths)
        states.append(h)
        contexts.append(c)
        alphas.append(a)
    return torch.stack(states, 1), torch.stack(contexts, 1), torch.stack(alphas, 1)


NAMES = ["states", "contexts", "weights"]
GRADS = ["gi_emb", "h0", "proj_keys", "values", "w_a", "w_hh", "b_hh", "energy", "w_ic"]


def _compare(name, dtype, B, T, H, S, A, D, bias, masking, seed=0):
    require(name)
    xs = _inputs(B, T, H, S, A, D, dtype, bias, masking, seed)
    with fastseq.backend(name):
        got = _run(ops.attention_gru_decode, xs, seed + 1)
        want = _run(_step_loop, xs, seed + 1)
    for n, a, b in zip(NAMES, got[0], want[0]):
        assert_close(a, b, name=n)
    grads = [n for n in GRADS if bias or n != "b_hh"]
    assert len(got[1]) == len(grads)
    for n, a, b in zip(grads, got[1], want[1]):
        assert torch.isfinite(a).all(), n
        assert_close(a, b, name=f"grad {n}")


@pytest.mark.parametrize("name", ["reference", "cpp"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masking", ["mask", "lengths", None])
def test_decode_equals_step_loop_float64(name, T, bias, masking):
    _compare(name, torch.float64, B=4, T=T, H=5, S=7, A=6, D=3, bias=bias, masking=masking, seed=T)


@pytest.mark.parametrize("T,bias,masking", [(1, True, "mask"), (4, False, "lengths"), (3, True, None)])
def test_decode_equals_step_loop_triton_float32(T, bias, masking):
    _compare("triton", torch.float32, B=3, T=T, H=4, S=5, A=3, D=6, bias=bias, masking=masking, seed=10 + T)


def test_decode_gradcheck_float64():
    xs = _inputs(2, 3, 3, 4, 2, 3, torch.float64, True, "mask", seed=5)
    gi, h0, keys, values, w, mask, _ = xs
    with fastseq.backend("reference"):
        assert torch.autograd.gradcheck(
            lambda *t: ops.attention_gru_decode(t[0], t[1], t[2], t[3], StepWeights.build(*t[4:]), mask),
            (gi, h0, keys, values, *w),
        )


def test_decode_is_one_autograd_node():
    gi, h0, keys, values, w, mask, _ = _inputs(2, 6, 3, 4, 2, 3, torch.float32, True, "mask", seed=3)
    with fastseq.backend("reference"):
        states, contexts, _ = ops.attention_gru_decode(gi, h0, keys, values, StepWeights.build(*w), mask)
    node = states.grad_fn
    assert node is contexts.grad_fn
    assert all(f is None or "attention_gru_decode" not in f.name() or f is node
               for f, _ in node.next_functions)
    # Its inputs are the leaves and the w_cat concatenation: no per-step node behind it.
    assert sum(1 for f, _ in node.next_functions if f is not None) <= 9


def test_decode_no_grad_and_empty_target(backend):
    gi, h0, keys, values, w, mask, _ = _inputs(3, 4, 4, 5, 3, 2, torch.float32, True, "mask", seed=7)
    sw = StepWeights.build(*w)
    with torch.no_grad():
        got = ops.attention_gru_decode(gi, h0, keys, values, sw, mask)
        want = _step_loop(gi, h0, keys, values, sw, mask, None)
    for n, a, b in zip(NAMES, got, want):
        assert_close(a, b, name=n)
    states, contexts, weights = ops.attention_gru_decode(gi[:, :0], h0, keys, values, sw, mask)
    assert states.shape == (3, 0, 4) and contexts.shape == (3, 0, 2) and weights.shape == (3, 0, 5)


def test_decode_bad_input():
    gi, h0, keys, values, w, mask, lengths = _inputs(2, 3, 4, 5, 3, 6, torch.float32, True, "mask", seed=0)
    sw = StepWeights.build(*w)
    with pytest.raises(TypeError, match="weights: expected a StepWeights"):
        ops.attention_gru_decode(gi, h0, keys, values, tuple(sw), mask)
    with pytest.raises(TypeError, match="gi_emb"):
        ops.attention_gru_decode(gi.tolist(), h0, keys, values, sw, mask)
    with pytest.raises(RuntimeError, match=r"gi_emb: expected a 3-D tensor \(B, T, 3\*H\) = \(B, T, 12\).*"
                                           r"got shape \(2, 12\)"):
        ops.attention_gru_decode(gi[:, 0], h0, keys, values, sw, mask)
    with pytest.raises(RuntimeError, match=r"gi_emb: expected .* got shape \(2, 3, 11\)"):
        ops.attention_gru_decode(gi[..., :11], h0, keys, values, sw, mask)
    with pytest.raises(RuntimeError, match=r"h0: expected shape \(B, H\) = \(2, 4\), got \(2, 5\)"):
        ops.attention_gru_decode(gi, torch.zeros(2, 5, device=DEVICE), keys, values, sw, mask)
    with pytest.raises(RuntimeError, match=r"proj_keys: expected shape \(2, S, 3\), got \(2, 5, 4\)"):
        ops.attention_gru_decode(gi, h0, torch.zeros(2, 5, 4, device=DEVICE), values, sw, mask)
    with pytest.raises(RuntimeError, match=r"values: expected shape \(2, 5, D\), got \(2, 4, 6\)"):
        ops.attention_gru_decode(gi, h0, keys, values[:, :4], sw, mask)
    with pytest.raises(RuntimeError, match=r"weights.w_ic: expected shape \(3\*H, D\) = \(12, 6\), got \(12, 5\)"):
        ops.attention_gru_decode(gi, h0, keys, values, sw._replace(w_ic=sw.w_ic[:, :5]), mask)
    with pytest.raises(RuntimeError, match=r"weights.w_cat: expected a 2-D tensor \(A \+ 3\*H, H\) with A = 3"):
        ops.attention_gru_decode(gi, h0, keys, values, sw._replace(w_cat=sw.w_cat[1:]), mask)
    with pytest.raises(RuntimeError, match=r"weights.b_hh: expected shape \(3\*H,\) = \(12,\), got \(11,\)"):
        ops.attention_gru_decode(gi, h0, keys, values, sw._replace(b_hh=sw.b_hh[1:]), mask)
    with pytest.raises(RuntimeError, match=r"weights.energy: expected a 1-D tensor \[A\]"):
        ops.attention_gru_decode(gi, h0, keys, values, sw._replace(energy=sw.energy.reshape(1, 1, 3)), mask)
    with pytest.raises(RuntimeError, match=r"h0: expected dtype torch.float32 \(that of gi_emb\), got torch.float64"):
        ops.attention_gru_decode(gi, h0.double(), keys, values, sw, mask)
    with pytest.raises(RuntimeError, match=r"values: expected dtype torch.float32 \(that of gi_emb\)"):
        ops.attention_gru_decode(gi, h0, keys, values.double(), sw, mask)
    with pytest.raises(RuntimeError, match=r"gi_emb: expected a floating"):
        ops.attention_gru_decode(gi.long(), h0, keys, values, sw, mask)
    with pytest.raises(RuntimeError, match=r"h0: expected device"):
        ops.attention_gru_decode(gi, h0.to("meta"), keys, values, sw, mask)
    with pytest.raises(ValueError, match="mask, lengths: pass at most one"):
        ops.attention_gru_decode(gi, h0, keys, values, sw, mask, torch.tensor([5, 1], device=DEVICE))
    with pytest.raises(RuntimeError, match=r"mask: expected a bool tensor"):
        ops.attention_gru_decode(gi, h0, keys, values, sw, mask.int())
    with pytest.raises(RuntimeError, match=r"lengths: expected values <= S = 5, got max 6"):
        ops.attention_gru_decode(gi, h0, keys, values, sw, None, torch.tensor([6, 1], device=DEVICE))
    with pytest.raises(RuntimeError, match="mask: row 1 has no True entry"):
        ops.attention_gru_decode(gi, h0, keys, values, sw, mask & torch.tensor([[True], [False]], device=DEVICE))


def test_decode_opcheck():
    B, T, S, A, D, H = 2, 3, 5, 4, 3, 4
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])

    def r(*s):
        return torch.randn(*s, requires_grad=True)

    for b_hh, m, lengths in ((r(3 * H), mask, None), (None, None, torch.tensor([5, 2]))):
        args = (r(B, T, 3 * H), r(B, H), r(B, S, A), r(B, S, D), r(A + 3 * H, H), b_hh, r(A), r(3 * H, D),
                m, lengths, True)
        torch.library.opcheck(decode.attention_gru_decode_op, args)


def test_decode_compiles_fullgraph():
    xs = _inputs(2, 4, 3, 5, 2, 3, torch.float32, True, "mask", seed=9)
    gi, h0, keys, values, w, mask, _ = xs

    def f(gi, h0, keys, values, w_a, w_hh, b_hh, energy, w_ic):
        s, c, a = ops.attention_gru_decode(gi, h0, keys, values, StepWeights.build(w_a, w_hh, b_hh, energy, w_ic),
                                           mask)
        return s.sum() + (c * c).sum() + (a * a).sum()

    args = (gi, h0, keys, values, *w)
    want = f(*args)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        assert_close(a, b)
