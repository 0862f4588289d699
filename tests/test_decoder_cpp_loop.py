"""The teacher-forced decoder loops in C++ (``csrc/cpu/decode.cpp``): the C++ backend's
implementation of ``attention_gru_decode`` and ``luong_gru_decode`` (forward and
backward) equals the Python loop over the same C++ step kernels bit for bit, on
every dtype the C++ backend takes, with and without biases, masks, saved gates
and each output's gradient; the registry runs it for the C++ backend."""
import itertools

import pytest
import torch

import fastseq
from conftest import FakeCudaGraph
from fastseq.backend import graphs, registry
from fastseq.ops.attention import cpp as attention_cpp
from fastseq.ops.decoder_step import cpp, decode, luong



@pytest.fixture(autouse=True)
def _extension(cpp_ops):
    """Every test here needs the C++ extension; a failed build fails them (no skip)."""
    return cpp_ops

B, T, H, S, A, D = 3, 5, 8, 4, 6, 7
STEPS_FWD = dict(attention=attention_cpp.additive_attention_forward, cell=cpp.gru_context_cell_forward)
STEPS_BWD = dict(attention=attention_cpp.additive_attention_backward, cell=cpp.gru_context_cell_backward)
CASES = list(itertools.product([torch.float64, torch.float32, torch.bfloat16], [True, False],
                               ["none", "mask", "lengths"]))


def _rnd(g, dtype):
    return lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)


def _source(masking):
    lens = torch.tensor([S, 1, 3])
    mask = (torch.arange(S)[None] < lens[:, None]) if masking == "mask" else None
    return mask, (lens if masking == "lengths" else None)


def _equal(got, want, what):
    assert len(got) == len(want)
    for i, (x, y) in enumerate(zip(got, want)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: output {i}: {x.dtype} {tuple(x.shape)}"
        assert torch.equal(x, y), f"{what}: output {i} differs by {(x.double() - y.double()).abs().max().item()}"


@pytest.mark.parametrize("dtype,bias,masking", CASES)
def test_bahdanau_loop_equals_python_loop(dtype, bias, masking):
    r = _rnd(torch.Generator().manual_seed(0), dtype)
    mask, lengths = _source(masking)
    gi, h0, keys, values = r(B, T, 3 * H), r(B, H), r(B, S, A), r(B, S, D)
    w_cat, b_hh, energy, w_ic = r(A + 3 * H, H), (r(3 * H) if bias else None), r(A), r(3 * H, D)
    for save in (False, True):
        args = (gi, h0, keys, values, w_cat, b_hh, energy, w_ic, mask, lengths, save)
        out = cpp.attention_gru_decode_forward(*args)
        _equal(out, decode.decode_forward(*args, **STEPS_FWD), f"forward save={save}")
    states, contexts, weights, gates, queries = out
    for grads in ((r(B, T, H), r(B, T, D), r(B, T, S)), (r(B, T, H), None, None), (None, r(B, T, D), None),
                  (None, None, r(B, T, S))):
        args = (*grads, gi, h0, keys, values, w_cat, energy, w_ic, states, contexts, weights, gates, queries, bias)
        _equal(cpp.attention_gru_decode_backward(*args), decode.decode_backward(*args, **STEPS_BWD),
               f"backward, grads given {[g is not None for g in grads]}")


@pytest.mark.parametrize("dtype,bias,masking", CASES)
def test_luong_loop_equals_python_loop(dtype, bias, masking):
    r = _rnd(torch.Generator().manual_seed(1), dtype)
    mask, lengths = _source(masking)
    gi, h0, keys, proj_values = r(B, T, 3 * H), r(B, 2 * H), r(B, S, A), r(B, S, H)
    w_cat, b_att, b_hh = r(A + 4 * H, H), (r(H) if bias else None), (r(3 * H) if bias else None)
    energy, w_ia = r(A), r(3 * H, H)
    for save in (False, True):
        args = (gi, h0, keys, proj_values, w_cat, b_att, b_hh, energy, w_ia, mask, lengths, save)
        out = cpp.luong_gru_decode_forward(*args)
        _equal(out, luong.luong_decode_forward(*args, **STEPS_FWD), f"forward save={save}")
    states, weights, gates, queries = out
    for grads in ((r(B, T, 2 * H), r(B, T, S)), (r(B, T, 2 * H), None), (None, r(B, T, S))):
        args = (*grads, h0, keys, proj_values, w_cat, energy, w_ia, states, weights, gates, queries, bias, bias)
        _equal(cpp.luong_gru_decode_backward(*args), luong.luong_decode_backward(*args, **STEPS_BWD),
               f"backward, grads given {[g is not None for g in grads]}")


def test_registry_runs_the_cpp_loops_on_the_cpp_backend():
    values = torch.zeros(B, S, D)
    with fastseq.backend("cpp"):
        for module in (decode, luong):
            fwd = registry.implementation(module.LOOP, values, {"B": B, "S": S})
            bwd = registry.implementation(module.BACKWARD_LOOP, values, {"B": B, "S": S})
            assert isinstance(fwd, graphs.GraphCache) and isinstance(bwd, graphs.GraphCache)
            assert fwd.fn is getattr(cpp, f"{module.OP}_forward")
            assert bwd.fn is getattr(cpp, f"{module.OP}_backward")
    with fastseq.backend("reference"):
        assert registry.implementation(decode.LOOP, values, {"B": B, "S": S}).fn is decode._python_forward


def test_cpp_loop_rejects_zero_steps_and_missing_ops():
    gi = torch.zeros(B, 0, 3 * H)
    with pytest.raises(RuntimeError, match="gi_emb: expected \\[B, T, 3H\\] with T >= 1"):
        cpp.attention_gru_decode_forward(gi, torch.zeros(B, H), torch.zeros(B, S, A), torch.zeros(B, S, D),
                                         torch.zeros(A + 3 * H, H), None, torch.zeros(A), torch.zeros(3 * H, D),
                                         None, None, False)
    # A library built before the loops existed: the registry entry reports it does not load.
    assert "no_such_loop" in (cpp.loop_implementation("no_such_loop").load_error() or "")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("flow", ["bahdanau", "luong"])
def test_training_through_the_graph_cache_equals_direct(monkeypatch, backend, flow):
    """The seq2seq model's training step with the decoder loops replayed from the registry's
    GraphCache (a stand-in graph off the GPU: static inputs and outputs, replay in place)
    gives the same loss and gradients as direct calls, bit for bit; the backward replays too."""
    from fastseq.seq2seq.model import ModelConfig, Seq2Seq

    def new_graph(self, static):
        g = FakeCudaGraph(self.fn, static)
        return g, g.outputs

    module = decode if flow == "bahdanau" else luong
    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(src_vocab_size=40, tgt_vocab_size=40, emb_size=8, enc_hidden_size=8,
                                dec_hidden_size=8, attn_size=8, decoder_flow=flow)).eval()
    src, tgt, lens = torch.randint(4, 40, (3, 6)), torch.randint(4, 40, (3, 5)), torch.tensor([6, 2, 4])

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(src, lens, tgt).square().mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    with fastseq.backend(backend):
        want = run()
        caches = [registry.implementation(name, torch.empty(1), {"B": 3, "S": 6})
                  for name in (module.LOOP, module.BACKWARD_LOOP)]
        monkeypatch.setattr(graphs.GraphCache, "_graphable", lambda self, first: True)
        monkeypatch.setattr(graphs.GraphCache, "_new_graph", new_graph)
        for c in caches:
            monkeypatch.setattr(c, "enabled", True)
        got = [run() for _ in range(3)]
    assert [(c.captures, c.replays) for c in caches] == [(1, 2), (1, 2)]
    for r in got:
        for i, (g, w) in enumerate(zip(r, want)):
            assert torch.equal(g, w), f"loss/grad {i} differs"
