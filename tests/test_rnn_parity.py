"""fastseq.nn.GRU/LSTM/GRUCell/LSTMCell against torch.nn, on every backend here.

Each case compares outputs, final states and the gradients w.r.t. the input,
h_0 (c_0) and every parameter, under a random upstream gradient, with fresh
random inputs. Outputs are NaN-poisoned before kernels write them (conftest).

Error bound: tests/parity.py's tolerance model (a norm bound per dtype). The
torch.nn side runs under ``ieee_fp32()``: on CUDA, cuDNN's float32 RNNs would
otherwise use TF32.
"""
import contextlib

import pytest
import torch
from parity import assert_close, ieee_fp32
from torch.nn.utils.rnn import pack_padded_sequence

import fastseq.nn as fnn
from conftest import DEVICE

PAIRS = {"GRU": (fnn.GRU, torch.nn.GRU), "LSTM": (fnn.LSTM, torch.nn.LSTM)}
CELLS = {"GRUCell": (fnn.GRUCell, torch.nn.GRUCell), "LSTMCell": (fnn.LSTMCell, torch.nn.LSTMCell)}

# (num_layers, bidirectional, batch_first, B, T, input_size, hidden_size, packed, bias, give_h0)
CASES = [
    (1, False, False, 3, 5, 4, 7, False, True, True),
    (2, True, True, 2, 4, 3, 6, False, True, False),
    (3, True, False, 3, 3, 5, 5, True, True, True),     # 3 layers, packed, unsorted lengths
    (1, False, True, 1, 1, 3, 9, False, True, True),    # B = 1, T = 1
    (1, True, False, 4, 6, 5, 20, True, True, False),   # H spans two tiles, packed
    (2, False, False, 3, 4, 4, 33, True, False, True),  # H = 33, no bias, packed
    (1, False, False, 17, 3, 4, 6, False, True, True),  # B spans two tiles
    (1, False, True, 30, 1, 12, 16, False, True, True),  # one decoder step per call (T = 1)
    (1, True, False, 70, 5, 4, 40, True, True, True),    # packed, rows split between threads by their work
    (2, True, False, 6, 5, 4, 72, True, True, False),    # packed, hidden units split between threads
]


def dtypes_for(backend: str):
    if backend in ("reference", "cpp"):
        return [torch.float64, torch.float32]
    return [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


def _run(module, x, h0, packed_lengths, batch_first, grads):
    """Forward + backward; returns (out, states, input grad, state grads, param grads)."""
    x = x.detach().clone().requires_grad_(True)
    states_in = None
    if h0 is not None:
        states_in = tuple(h.detach().clone().requires_grad_(True) for h in h0)
    inp = x
    if packed_lengths is not None:
        inp = pack_padded_sequence(x, packed_lengths, batch_first=batch_first, enforce_sorted=False)
    hx = None if states_in is None else (states_in if len(states_in) == 2 else states_in[0])
    out, states = module(inp, hx)
    out_t = out.data if packed_lengths is not None else out
    states = states if isinstance(states, tuple) else (states,)
    loss = (out_t.float() * grads[0]).sum() + sum((s.float() * g).sum() for s, g in zip(states, grads[1:]))
    loss.backward()
    param_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    state_grads = tuple(h.grad for h in states_in) if states_in is not None else ()
    return out_t.detach(), tuple(s.detach() for s in states), x.grad, state_grads, param_grads


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "L{}-bi{}-bf{}-B{}-T{}-I{}-H{}-packed{}-bias{}-h0{}".format(*c))
def test_layer_matches_torch(backend, kind, case):
    layers, bidir, batch_first, B, T, I, H, packed, bias, give_h0 = case
    fast_cls, torch_cls = PAIRS[kind]
    for dtype in dtypes_for(backend):
        ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        fast = fast_cls(I, H, num_layers=layers, bias=bias, batch_first=batch_first,
                        bidirectional=bidir).to(DEVICE, dtype)
        ref = torch_cls(I, H, num_layers=layers, bias=bias, batch_first=batch_first,
                        bidirectional=bidir).to(DEVICE, ref_dtype)
        ref.load_state_dict({k: v.to(ref_dtype) for k, v in fast.state_dict().items()})
        shape = (B, T, I) if batch_first else (T, B, I)
        x = torch.randn(shape, device=DEVICE).to(dtype)
        D = 2 if bidir else 1
        h0 = None
        if give_h0:
            n_states = 2 if kind == "LSTM" else 1
            h0 = tuple(torch.randn(D * layers, B, H, device=DEVICE).to(dtype) for _ in range(n_states))
        lengths = None
        if packed:
            lengths = torch.randint(1, T + 1, (B,))
            lengths[torch.randint(0, B, (1,))] = T  # unsorted, and the longest is T
        out_len = int(lengths.sum()) if packed else None
        out_shape = (out_len, D * H) if packed else shape[:2] + (D * H,)
        grads = [torch.randn(out_shape, device=DEVICE)]
        grads += [torch.randn(D * layers, B, H, device=DEVICE) for _ in range(2 if kind == "LSTM" else 1)]
        got = _run(fast, x, h0, lengths, batch_first, grads)
        with ieee_fp32():
            want = _run(ref, x.to(ref_dtype), None if h0 is None else tuple(h.to(ref_dtype) for h in h0),
                        lengths, batch_first, grads)
        # (bfloat16 on a GPU is judged against torch.nn in float32, at bfloat16's tolerance)
        assert_close(got[0], want[0], dtype, "output", cast=True)
        for i, (a, b) in enumerate(zip(got[1], want[1])):
            assert_close(a, b, dtype, f"final state {i}", cast=True)
        assert_close(got[2], want[2], dtype, "grad input", cast=True)
        for i, (a, b) in enumerate(zip(got[3], want[3])):
            assert_close(a, b, dtype, f"grad state {i}", cast=True)
        assert set(got[4]) == set(want[4])
        for name in want[4]:
            assert_close(got[4][name], want[4][name], dtype, f"grad {name}", cast=True)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_unbatched_input(backend, kind):
    fast_cls, torch_cls = PAIRS[kind]
    fast = fast_cls(3, 5, bidirectional=True).to(DEVICE)
    ref = torch_cls(3, 5, bidirectional=True).to(DEVICE)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(4, 3, device=DEVICE)
    h = torch.randn(2, 5, device=DEVICE)
    hx = (h, torch.randn(2, 5, device=DEVICE)) if kind == "LSTM" else h
    out, st = fast(x, hx)
    with ieee_fp32():
        out_ref, st_ref = ref(x, hx)
    assert_close(out, out_ref, torch.float32, "output")
    for a, b in zip(st if kind == "LSTM" else (st,), st_ref if kind == "LSTM" else (st_ref,)):
        assert a.shape == (2, 5)
        assert_close(a, b, torch.float32, "state")


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("B,I,H,give_hx", [(1, 3, 5, True), (4, 6, 18, False), (None, 3, 5, True)])
def test_cell_matches_torch(backend, kind, B, I, H, give_hx):
    fast_cls, torch_cls = CELLS[kind]
    for dtype in dtypes_for(backend):
        fast = fast_cls(I, H).to(DEVICE, dtype)
        ref = torch_cls(I, H).to(DEVICE, dtype)
        ref.load_state_dict(fast.state_dict())
        batch = () if B is None else (B,)
        x = torch.randn(batch + (I,), device=DEVICE, dtype=dtype)
        hx = None
        if give_hx:
            hx = torch.randn(batch + (H,), device=DEVICE, dtype=dtype)
            if kind == "LSTMCell":
                hx = (hx, torch.randn(batch + (H,), device=DEVICE, dtype=dtype))
        results = []
        for module, precision in ((fast, contextlib.nullcontext()), (ref, ieee_fp32())):
            xi = x.clone().requires_grad_(True)
            with precision:
                out = module(xi, hx)
                outs = out if isinstance(out, tuple) else (out,)
                g = [torch.ones_like(o).normal_(generator=torch.Generator(DEVICE).manual_seed(i))
                     for i, o in enumerate(outs)]
                sum((o * gi).sum() for o, gi in zip(outs, g)).backward()
            results.append((outs, xi.grad, {n: p.grad for n, p in module.named_parameters()}))
        (outs_f, gx_f, gp_f), (outs_r, gx_r, gp_r) = results
        for a, b in zip(outs_f, outs_r):
            assert_close(a, b, dtype, "output")
        assert_close(gx_f, gx_r, dtype, "grad input")
        for name in gp_r:
            assert_close(gp_f[name], gp_r[name], dtype, f"grad {name}")


def test_same_parameters_and_state_dict_as_torch():
    torch.manual_seed(0)
    a = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, bias=False)
    torch.manual_seed(0)
    b = fnn.LSTM(4, 6, num_layers=2, bidirectional=True, bias=False)
    assert isinstance(b, torch.nn.LSTM)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # same initialisation, same shapes
    b.load_state_dict(sa)  # checkpoints load both ways


def test_proj_size_raises_clearly():
    with pytest.raises(NotImplementedError, match="proj_size"):
        fnn.LSTM(4, 6, proj_size=3)


@pytest.mark.parametrize("bad,exc,match", [  # exc: the class torch.nn.GRU raises for the same input
    (lambda m: m(torch.randn(5, 2, 3)), RuntimeError, r"input: expected size\(-1\) == input_size=4"),
    (lambda m: m(torch.randn(5, 2, 4, 1)), ValueError, "input: expected a 2-D .* got 4-D"),
    (lambda m: m(torch.randn(5, 2, 4), torch.randn(1, 3, 6)), RuntimeError,
     r"h_0: expected shape .*\(1, 2, 6\), got \(1, 3, 6\)"),
    (lambda m: m(torch.randn(5, 2, 4, dtype=torch.float64)), ValueError, "input: expected dtype torch.float32"),
])
def test_bad_input_names_the_argument(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad(fnn.GRU(4, 6))
    with pytest.raises(exc):
        bad(torch.nn.GRU(4, 6))


def test_dropout_between_layers_is_applied_in_training_only():
    m = fnn.GRU(4, 6, num_layers=2, dropout=0.5)
    x = torch.randn(5, 3, 4)
    m.eval()
    y1, _ = m(x)
    y2, _ = m(x)
    assert torch.equal(y1, y2)
    m.train()
    y3, _ = m(x)
    assert not torch.allclose(y1, y3)


def _precision_modules():
    b = torch.backends
    return {"generic": b, "cuda.matmul": b.cuda.matmul, "cudnn": b.cudnn, "cudnn.conv": b.cudnn.conv,
            "cudnn.rnn": b.cudnn.rnn, "mkldnn": b.mkldnn, "mkldnn.matmul": b.mkldnn.matmul,
            "mkldnn.conv": b.mkldnn.conv, "mkldnn.rnn": b.mkldnn.rnn}


def _fp32_settings():
    """Every float32-precision setting of torch's: the legacy matmul one, and per backend/op."""
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            **{name: mod.fp32_precision for name, mod in _precision_modules().items()}}


@pytest.fixture
def restore_fp32_settings():
    saved = _fp32_settings()
    yield
    torch.set_float32_matmul_precision(saved["float32_matmul_precision"])  # first: it also sets per-op ones
    for name, mod in _precision_modules().items():
        mod.fp32_precision = saved[name]
    assert _fp32_settings() == saved


@pytest.mark.parametrize("start", ["default", "high", "medium"])
def test_ieee_fp32_turns_tf32_off_and_restores_every_setting(restore_fp32_settings, start):
    """The torch.nn side of the float32 comparisons: cuDNN RNNs and matmuls in IEEE fp32
    inside, every setting as it was afterwards (also after an error), and on the CPU
    the same results inside as outside."""
    if start != "default":  # TF32 (and bf16 on oneDNN) products turned on through the legacy setting
        torch.set_float32_matmul_precision(start)
    before = _fp32_settings()
    assert before["cudnn.rnn"] == "tf32"  # torch's default: cuDNN's float32 RNNs use TF32
    rnn = torch.nn.GRU(4, 6)
    x = torch.randn(3, 2, 4)
    with pytest.raises(KeyError, match="inside"), ieee_fp32():
        inside = _fp32_settings()
        assert torch.backends.cuda.matmul.allow_tf32 is False  # cuBLAS's own (consistency-checked) answer
        out_inside, _ = rnn(x)
        raise KeyError("inside")
    assert inside["cudnn.rnn"] == "ieee" and inside["cuda.matmul"] == "ieee"
    assert inside["float32_matmul_precision"] == "highest"
    assert inside["cudnn.conv"] == before["cudnn.conv"]  # only the RNN setting of cuDNN's
    assert _fp32_settings() == before
    assert torch.backends.cuda.matmul.allow_tf32 is (start != "default")
    if start == "default":
        assert torch.backends.cudnn.allow_tf32 is True  # the legacy view is consistent again
        assert torch.equal(rnn(x)[0], out_inside)
