"""CPU speed of fastseq's C++ backend against what users would run instead:
torch.nn.GRU/LSTM (oneDNN/ATen kernels) and the same seq2seq on eager torch.nn
operations. pytest-benchmark; not part of the CI test run (CI's testpaths is tests/).

    python -m pytest bench/test_cpu_speed.py --benchmark-json bench/results/cpu-<date>.json
    python bench/cpu_table.py bench/results/cpu-<date>.json      # Markdown table

Every group times both implementations on the same weights and inputs; the
``group`` name holds the sizes. Each module's forward is checked against the
other before timing, so a fast wrong answer cannot win.
"""
import pytest
import torch

import fastseq
import fastseq.nn as fnn
from fastseq.backend import selection

pytest.importorskip("pytest_benchmark")

if not selection.cpp_status()[0]:
    pytest.skip(f"C++ extension unavailable: {selection.cpp_status()[1]}", allow_module_level=True)

T, I = 32, 256


def _pair(kind, H, bidirectional=False):
    torch.manual_seed(0)
    fast = getattr(fnn, kind)(I, H, batch_first=True, bidirectional=bidirectional)
    ref = getattr(torch.nn, kind)(I, H, batch_first=True, bidirectional=bidirectional)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _run(impl, fast, ref, fn):
    if impl == "fastseq":
        with fastseq.backend("cpp"):
            return fn(fast)
    return fn(ref)


@pytest.mark.parametrize("impl", ["fastseq", "torch"])
@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("H", [256, 512])
@pytest.mark.parametrize("B", [1, 8, 32])
def test_inference(benchmark, impl, kind, H, B):
    benchmark.group = f"{kind} inference B={B} H={H} T={T}"
    fast, ref = _pair(kind, H)
    x = torch.randn(B, T, I)
    with torch.no_grad():
        want = ref(x)[0]
        with fastseq.backend("cpp"):
            torch.testing.assert_close(fast(x)[0], want, rtol=1e-4, atol=1e-5)
        benchmark(lambda: _run(impl, fast, ref, lambda m: m(x)))


@pytest.mark.parametrize("impl", ["fastseq", "torch"])
@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("H", [256, 512])
def test_training_step(benchmark, impl, kind, H):
    B = 64
    benchmark.group = f"{kind} forward+backward B={B} H={H} T={T}"
    fast, ref = _pair(kind, H)
    x = torch.randn(B, T, I, requires_grad=True)
    g = torch.randn(B, T, H)

    def step(m):
        out = m(x)[0]
        out.backward(g)
        return out

    benchmark(lambda: _run(impl, fast, ref, step))


@pytest.fixture(scope="module")
def seq2seq():
    """The multi30k-cpu model's sizes, random weights, 16 real-length sources."""
    from fastseq.seq2seq.eager import EagerSeq2Seq
    from fastseq.seq2seq.model import ModelConfig, Seq2Seq

    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(src_vocab_size=6000, tgt_vocab_size=6000, emb_size=128,
                                enc_hidden_size=256, dec_hidden_size=256, attn_size=256,
                                readout_size=256, dropout=0.0)).eval()
    lens = torch.randint(6, 20, (16,))
    src = torch.randint(4, 6000, (16, int(lens.max())))
    for i, n in enumerate(lens.tolist()):
        src[i, n:] = 0
    return model, EagerSeq2Seq(model), src, lens


@pytest.mark.parametrize("impl", ["fastseq", "torch"])
@pytest.mark.parametrize("method", ["greedy", "beam5"])
@pytest.mark.parametrize("B", [1, 16])
def test_translate(benchmark, seq2seq, impl, method, B):
    from fastseq.seq2seq.search import beam_search, greedy_search

    model, eager, src, lens = seq2seq
    src, lens = src[:B, : int(lens[:B].max())], lens[:B]
    benchmark.group = f"seq2seq translate {method} B={B} (30 steps)"
    # eos_id -1: every run decodes exactly 30 steps, so both do the same work.
    if method == "greedy":
        fn = lambda m: greedy_search(m, src, lens, 2, -1, max_len=30)  # noqa: E731
    else:
        fn = lambda m: beam_search(m, src, lens, 2, -1, beam_size=5, max_len=30)  # noqa: E731
    with fastseq.backend("cpp"):
        assert fn(model) == fn(eager)
    benchmark(lambda: _run(impl, model, eager, fn))
