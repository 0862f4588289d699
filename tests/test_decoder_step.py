"""The fused decoder step: the GRU context cell op against the reference and
autograd, the whole teacher-forced decoder (forward and backward) against the
same decoder on eager torch.nn operations with the same weights, the launch
count of one step, and search never recomputing the key projection."""
import pytest
import torch
from parity import assert_close, ieee_fp32

from conftest import DEVICE, TRITON, require
import fastseq
from fastseq import ops
from fastseq.backend import alloc
from fastseq.ops import launches
from fastseq.seq2seq.eager import EagerDecoder
from fastseq.seq2seq.model import ModelConfig, Seq2Seq
from fastseq.seq2seq.search import beam_search, greedy_search


def _cell_inputs(B, H, D, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)  # noqa: E731
    wide = rnd(B, 5 + 3 * H)  # gh as a column slice of a wider product, as in the decoder
    xs = [rnd(B, 3 * H), rnd(B, D), rnd(3 * H, D, scale=D ** -0.5), wide, rnd(3 * H) if bias else None,
          rnd(B, H)]
    return [None if x is None else x.to(DEVICE, dtype) for x in xs]


def _cell_grads(xs, seed):
    xs = [None if x is None else x.detach().clone().requires_grad_(True) for x in xs]
    gi, ctx, w, wide, b, h = xs
    out = ops.gru_context_cell(gi, ctx, w, wide[:, 5:], b, h)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    leaves = [x for x in xs if x is not None]
    return out.detach(), torch.autograd.grad(out, leaves, g)


def _eager_cell(gi, ctx, w, wide, b, h):
    H = h.shape[1]
    x = gi + ctx @ w.t()
    a = wide[:, 5:] + (0 if b is None else b)
    r = torch.sigmoid(x[:, :H] + a[:, :H])
    z = torch.sigmoid(x[:, H:2 * H] + a[:, H:2 * H])
    n = torch.tanh(x[:, 2 * H:] + r * a[:, 2 * H:])
    return (1 - z) * n + z * h


@pytest.mark.parametrize("bias", [True, False])
def test_cell_reference_matches_autograd_float64(bias):
    xs = _cell_inputs(3, 5, 7, torch.float64, bias, seed=1)
    with fastseq.backend("reference"):
        out, grads = _cell_grads(xs, 2)
    leaves = [x.detach().clone().requires_grad_(True) for x in xs if x is not None]
    it = iter(leaves)
    args = [None if x is None else next(it) for x in xs]
    want = _eager_cell(*args)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)).to(want)
    assert_close(out, want.detach())
    for a, b in zip(grads, torch.autograd.grad(want, leaves, g)):
        assert_close(a, b)


def test_cell_gradcheck_float64():
    gi, ctx, w, wide, b, h = [x.detach().requires_grad_(True) for x in
                              _cell_inputs(2, 3, 4, torch.float64, True, seed=4)]
    with fastseq.backend("reference"):
        assert torch.autograd.gradcheck(
            lambda *t: ops.gru_context_cell(t[0], t[1], t[2], t[3][:, 5:], t[4], t[5]),
            (gi, ctx, w, wide, b, h),
        )


@pytest.mark.skipif(not TRITON, reason="Triton backend not available here")
@pytest.mark.parametrize("B,H,D", [(1, 1, 1), (3, 5, 7), (20, 18, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_triton_matches_reference(B, H, D, bias):
    xs = _cell_inputs(B, H, D, torch.float32, bias, seed=B + H + D)
    with fastseq.backend("triton"):
        got = _cell_grads(xs, 3)
    with fastseq.backend("reference"):
        want = _cell_grads(xs, 3)
    assert_close(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert torch.isfinite(a).all()
        assert_close(a, b)


def test_cell_bad_input():
    gi, ctx, w, wide, b, h = _cell_inputs(2, 3, 4, torch.float32, True, seed=0)
    with pytest.raises(RuntimeError, match=r"w_ic: expected shape \(9, 4\), got \(9, 5\)"):
        ops.gru_context_cell(gi, ctx, torch.randn(9, 5, device=DEVICE), wide[:, 5:], b, h)
    with pytest.raises(RuntimeError, match=r"gh: expected shape \(2, 9\)"):
        ops.gru_context_cell(gi, ctx, w, wide, b, h)
    with pytest.raises(RuntimeError, match=r"h: expected dtype torch.float32 \(that of gi\), got torch.float64"):
        ops.gru_context_cell(gi, ctx, w, wide[:, 5:], b, h.double())


# ------------------------------------------------------------- whole decoder

CFG = dict(src_vocab_size=30, tgt_vocab_size=25, emb_size=8, enc_hidden_size=10, dec_hidden_size=12,
           attn_size=9, readout_size=7, dropout=0.0)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Seq2Seq(ModelConfig(**CFG)).to(DEVICE, dtype)
    src = torch.randint(4, 30, (4, 11))
    lens = torch.tensor([11, 1, 6, 17 // 2])
    for i, n in enumerate(lens.tolist()):
        src[i, n:] = 0
    tgt = torch.randint(4, 25, (4, 6))
    return model, src.to(DEVICE), lens, tgt.to(DEVICE)


def _decoder_grads(decoder, model, src, lens, tgt, seed):
    memory = model.encode(src, lens)
    memory = type(memory)(*(None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in memory))
    logits = decoder(tgt, memory)
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed)).to(logits)
    params = [p for p in model.decoder.parameters()]
    leaves = params + [memory.values, memory.proj_keys, memory.init_state]
    return logits.detach(), torch.autograd.grad(logits, leaves, g, allow_unused=True)


@pytest.mark.parametrize("name,dtype", [("reference", torch.float64), ("reference", torch.float32),
                                        ("triton", torch.float32)])
def test_decoder_matches_eager_torch_nn(name, dtype):
    """fastseq's decoder (3 launches per step) == the eager torch.nn decoder, same weights:
    logits and the gradients of every decoder parameter and of the encoder memory."""
    require(name)
    model, src, lens, tgt = _model(dtype)
    with fastseq.backend(name):
        got = _decoder_grads(model.decoder, model, src, lens, tgt, seed=1)
    with ieee_fp32():  # torch.nn's float32 products on CUDA without TF32
        want = _decoder_grads(EagerDecoder(model.decoder), model, src, lens, tgt, seed=1)
    assert_close(got[0], want[0], name="logits")
    names = [n for n, _ in model.decoder.named_parameters()] + ["values", "proj_keys", "init_state"]
    for pname, a, b in zip(names, got[1], want[1]):
        if b is None:
            assert a is None or not a.any(), pname
            continue
        assert_close(a, b, name=f"grad {pname}")


@pytest.mark.skipif(not TRITON, reason="Triton backend not available here")
def test_decoder_step_launches_three_kernels():
    """One decoder step = 1 GEMM ([W_a; W_hh]) + fused attention + fused context-GRU cell."""
    model, src, lens, tgt = _model()
    dec = model.decoder
    with fastseq.backend("triton"), torch.no_grad():
        memory = model.encode(src, lens)
        weights = dec.step_weights()
        _, gi = dec.embed_inputs(tgt[:, :1])
        dec.step(gi[:, 0], memory.init_state, memory, weights)  # warm-up (compile, mask check)
        poison = alloc.poison()
        alloc.set_poison(False)  # NaN-filling outputs is a test aid, not a launch of the op
        try:
            n = launches.count_ops(dec.step, gi[:, 0], memory.init_state, memory, weights)
        finally:
            alloc.set_poison(poison)
    assert n == {"aten::matmul": 1, "triton::_attention_fwd_kernel": 1,
                 "triton::_gru_context_cell_fwd_kernel": 1}, n
    assert sum(n.values()) == 3


def test_search_computes_the_key_projection_once(backend):
    model, src, lens, _ = _model()
    model.eval()
    calls = []
    hook = model.decoder.attention.key_layer.register_forward_hook(lambda *a: calls.append(1))
    try:
        greedy_search(model, src, lens, bos_id=2, eos_id=3, max_len=6)
        assert len(calls) == 1
        beam_search(model, src, lens, bos_id=2, eos_id=3, beam_size=3, max_len=6)
        assert len(calls) == 2
    finally:
        hook.remove()


@pytest.mark.skipif(not TRITON, reason="Triton backend not available here")
def test_search_agrees_across_backends():
    model, src, lens, _ = _model()
    model.eval()
    out = {}
    for name in ("reference", "triton"):
        with fastseq.backend(name):
            out[name] = (greedy_search(model, src, lens, 2, 3, max_len=8),
                         beam_search(model, src, lens, 2, 3, beam_size=3, max_len=8))
    assert out["reference"] == out["triton"]


def test_eager_seq2seq_baseline_searches_like_the_model(backend):
    """The eager torch.nn baseline (used by the CPU/GPU benchmarks) decodes the same."""
    from fastseq.seq2seq.eager import EagerSeq2Seq

    model, src, lens, _ = _model()
    model.eval()
    eager = EagerSeq2Seq(model)
    assert greedy_search(eager, src, lens, 2, 3, max_len=8) == greedy_search(model, src, lens, 2, 3, max_len=8)
    assert beam_search(eager, src, lens, 2, 3, beam_size=3, max_len=8) == \
        beam_search(model, src, lens, 2, 3, beam_size=3, max_len=8)
