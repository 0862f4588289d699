"""GPU-only checks (skipped, with the reason, on machines without CUDA): the
auto backend picks the Triton kernels for CUDA tensors, and the modules match
torch.nn (cuDNN) at realistic sizes in float32 and bfloat16."""
import pytest
import torch
from parity import ieee_fp32

import fastseq
import fastseq.nn as fnn
from fastseq.backend import extension, selection

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Relative error ||a - b|| / ||b|| against torch.nn in float32 (cuDNN, TF32 off: ieee_fp32()).
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def test_auto_backend_uses_triton_on_cuda():
    """Triton for its dtypes; float64, which Triton does not take, on the C++ extension's
    CUDA kernels when it has them (selection.select's rule), else on the reference."""
    ok, _ = selection.cpp_status()  # builds the extension, with its CUDA kernels where nvcc is found
    with fastseq.backend("auto"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert selection.select(torch.empty(1, device="cuda", dtype=dtype)) == "triton"
        want = "cpp" if ok and extension.has_cuda() else "reference"
        assert selection.select(torch.empty(1, device="cuda", dtype=torch.float64)) == want


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_layer_at_realistic_size(kind, dtype, packed):
    B, T, I, H = 64, 32, 256, 512
    fast = getattr(fnn, kind)(I, H, bidirectional=True, batch_first=True).cuda()
    ref = getattr(torch.nn, kind)(I, H, bidirectional=True, batch_first=True).cuda()
    ref.load_state_dict(fast.state_dict())
    fast = fast.to(dtype)
    x = torch.randn(B, T, I, device="cuda")
    lengths = torch.randint(1, T + 1, (B,)) if packed else None

    def run(module, inp_dtype):
        xi = x.to(inp_dtype).requires_grad_(True)
        inp = xi if lengths is None else torch.nn.utils.rnn.pack_padded_sequence(
            xi, lengths, batch_first=True, enforce_sorted=False)
        out, _ = module(inp)
        out = out.data if lengths is not None else out
        g = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        (out.float() * g).sum().backward()
        return out.float(), xi.grad.float(), {n: p.grad.float() for n, p in module.named_parameters()}

    got = run(fast, dtype)
    with ieee_fp32():
        want = run(ref, torch.float32)
    for name, a, b in [("output", got[0], want[0]), ("grad input", got[1], want[1])] + \
            [(f"grad {n}", got[2][n], want[2][n]) for n in want[2]]:
        err = float((a - b).norm() / b.norm())
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]}"


def test_decoder_step_launches_at_most_three_cuda_kernels():
    """The fused decoder step, counted by the CUDA profiler (not the CPU-side op count)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from fastseq.seq2seq.model import ModelConfig, Seq2Seq

    model = Seq2Seq(ModelConfig(src_vocab_size=100, tgt_vocab_size=100)).cuda().eval()
    src = torch.randint(4, 100, (64, 32), device="cuda")
    lens = torch.full((64,), 32)
    dec = model.decoder
    with torch.no_grad():
        memory = model.encode(src, lens)
        weights = dec.step_weights()
        _, gi = dec.embed_inputs(src[:, :1])
        for _ in range(3):
            dec.step(gi[:, 0], memory.init_state, memory, weights)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec.step(gi[:, 0], memory.init_state, memory, weights)
            torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    assert 1 <= len(kernels) <= 3, kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_matches_eager_at_realistic_size(dtype):
    """B=64, S=T=32, H=A=512: the fused decoder against the eager torch.nn decoder (fp32)."""
    from fastseq.seq2seq.eager import EagerDecoder
    from fastseq.seq2seq.model import ModelConfig, Seq2Seq

    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(src_vocab_size=500, tgt_vocab_size=500, dropout=0.0)).cuda()
    src = torch.randint(4, 500, (64, 32), device="cuda")
    lens = torch.randint(1, 33, (64,))
    tgt = torch.randint(4, 500, (64, 32), device="cuda")

    def run(dec, autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            logits = dec(tgt, model.encode(src, lens))
        (logits.float() * torch.linspace(-1, 1, logits.shape[-1], device="cuda")).sum().backward()
        return logits.float(), {n: p.grad.float() for n, p in model.decoder.named_parameters()
                                if p.grad is not None}

    got = run(model.decoder, dtype != torch.float32)
    with ieee_fp32():
        want = run(EagerDecoder(model.decoder), False)
    for name, a, b in [("logits", got[0], want[0])] + [(n, got[1][n], want[1][n]) for n in want[1]]:
        err = float((a - b).norm() / b.norm())
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]}"


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_decoding_with_cuda_graphs_equals_direct_launches(monkeypatch, search):
    """FASTSEQ_CUDA_GRAPHS=1: each decoding step is a replayed CUDA graph
    (fastseq.backend.graphs.StepGraph); the tokens equal the direct launches'."""
    from fastseq.backend import graphs
    from fastseq.seq2seq import search as S
    from fastseq.seq2seq.model import ModelConfig, Seq2Seq

    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(src_vocab_size=300, tgt_vocab_size=300)).cuda().eval()
    src = torch.randint(4, 300, (16, 20), device="cuda")
    lens = torch.randint(5, 21, (16,))
    run = (lambda: S.greedy_search(model, src, lens, 1, 2, max_len=12)) if search == "greedy" else \
        (lambda: S.beam_search(model, src, lens, 1, 2, beam_size=4, max_len=12))
    monkeypatch.setenv("FASTSEQ_CUDA_GRAPHS", "0")
    want = run()
    replays = []
    original = graphs.StepGraph.__call__

    def counting(self, *inputs):
        out = original(self, *inputs)
        replays.append((self.replays, self.failed))
        return out

    monkeypatch.setattr(graphs.StepGraph, "__call__", counting)
    monkeypatch.setenv("FASTSEQ_CUDA_GRAPHS", "1")
    got = run()
    assert got == want
    assert replays and replays[-1][1] is None, f"capture failed: {replays[-1][1]}"
    assert replays[-1][0] >= 1


@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("flow", ["bahdanau", "luong"])
def test_teacher_forced_decoder_loop_as_cuda_graph_equals_direct(monkeypatch, backend, flow):
    """The decoder loops' GraphCache (FASTSEQ_CUDA_GRAPHS=1; fastseq.backend.graphs.GraphCache):
    training forward and backward of a repeated shape replay one captured graph each, with
    outputs and gradients equal to the direct launches' bit for bit."""
    from fastseq.backend import registry
    from fastseq.seq2seq.model import ModelConfig, Seq2Seq
    from fastseq.ops.decoder_step import decode, luong

    if backend == "cpp" and not (selection.cpp_status()[0] and extension.has_cuda()):
        pytest.skip("the C++ extension has no CUDA kernels here")
    module = decode if flow == "bahdanau" else luong
    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(src_vocab_size=300, tgt_vocab_size=300, decoder_flow=flow)).cuda()
    src = torch.randint(4, 300, (16, 20), device="cuda")
    tgt = torch.randint(4, 300, (16, 14), device="cuda")
    lens = torch.randint(5, 21, (16,))

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(src, lens, tgt).float().square().mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    values = torch.empty(1, device="cuda")
    with fastseq.backend(backend):
        caches = [registry.implementation(name, values, {"B": 16, "S": 20})
                  for name in (module.LOOP, module.BACKWARD_LOOP)]
        for c in caches:
            monkeypatch.setattr(c, "enabled", False)
        model.eval()  # no dropout: the runs must be comparable
        want = run()
        for c in caches:
            monkeypatch.setattr(c, "enabled", True)
        got = [run() for _ in range(3)][-1]
    assert all(c.captures >= 1 and c.replays >= 1 for c in caches), [(c.captures, c.replays) for c in caches]
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output/grad {i} differs by {(g.double() - w.double()).abs().max().item()}"


# FASTSEQ_CUDA_PERSISTENT / _MMA / _CLUSTER settings of the C++ extension's whole-sequence kernels
# (csrc/cuda/bindings.cpp): the shared-memory kernels, the tensor-core block kernels, and the
# tensor-core forward with the cluster backward (sm_90). 1 raises when the kernel does not apply.
_PERSISTENT_SETTINGS = {
    "shared-memory": {"FASTSEQ_CUDA_PERSISTENT": "1", "FASTSEQ_CUDA_PERSISTENT_MMA": "0"},
    "mma-block": {"FASTSEQ_CUDA_PERSISTENT": "1", "FASTSEQ_CUDA_PERSISTENT_CLUSTER": "0"},
    "mma-cluster": {"FASTSEQ_CUDA_PERSISTENT": "1", "FASTSEQ_CUDA_PERSISTENT_CLUSTER": "8"},
}


@pytest.mark.persistent_kernels  # bench/gpu_check.sh: its own stage, after the others (a hang or fault ends only it)
@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("setting", sorted(_PERSISTENT_SETTINGS))
def test_persistent_cuda_kernels_match_the_per_step_path(monkeypatch, kind, setting):
    """The persistent CUDA kernels (one cooperative launch per layer and direction; the MMA ones in
    bfloat16, the shared-memory one in float32) give the per-step path's output and gradients on
    the C++ backend, B 16, H 256, T 24, dense input. Skipped, with the reason, when the extension
    has no CUDA kernels; a kernel that does not apply on this device fails (FASTSEQ_CUDA_PERSISTENT=1)."""
    _check_persistent_setting(monkeypatch, kind, setting, _PERSISTENT_SETTINGS[setting])


@pytest.mark.tagged_exchange  # bench/gpu_check.sh: a stage of its own, after the persistent benchmarks
@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_tagged_exchange_matches_the_per_step_path(monkeypatch, kind):
    """The tensor-core forward without a grid barrier (FASTSEQ_CUDA_PERSISTENT_SYNC=tagged: h_t
    exchanged as words carrying their step) gives the per-step path's output and gradients, as
    test_persistent_cuda_kernels_match_the_per_step_path; T 24 crosses the buffers' reuse 12
    times. A wrong ordering on hardware shows as a wrong result or a hang (the stage's cap)."""
    settings = {"FASTSEQ_CUDA_PERSISTENT": "1", "FASTSEQ_CUDA_PERSISTENT_CLUSTER": "0",
                "FASTSEQ_CUDA_PERSISTENT_SYNC": "tagged"}
    _check_persistent_setting(monkeypatch, kind, "mma-tagged", settings)


def _check_persistent_setting(monkeypatch, kind, setting, settings):
    ok, why = selection.cpp_status()
    if not ok or not extension.has_cuda():
        pytest.skip(f"the C++ extension has no CUDA kernels here: {why}")
    dtype = torch.float32 if setting == "shared-memory" else torch.bfloat16
    B, T, H = 16, 24, 256
    torch.manual_seed(0)
    layer = getattr(fnn, kind)(H, H).cuda().to(dtype)
    x = torch.randn(T, B, H, device="cuda", dtype=dtype)
    g = torch.randn(T, B, H, device="cuda")

    def run():
        xi = x.clone().requires_grad_(True)
        out, _ = layer(xi)  # dense input: the packed ops always run per step
        (out.float() * g).sum().backward()
        grads = [out.float(), xi.grad.float()] + [p.grad.float() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return grads

    with fastseq.backend("cpp"):
        monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "0")
        want = run()
        for var, value in settings.items():
            monkeypatch.setenv(var, value)
        got = run()
    for i, (a, b) in enumerate(zip(got, want)):
        err = float((a - b).norm() / b.norm().clamp_min(1e-12))
        assert err < TOL[dtype], f"{setting} {kind} output/grad {i}: relative error {err:.2e} >= {TOL[dtype]}"
