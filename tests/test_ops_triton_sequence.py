"""The whole-sequence Triton recurrence kernels (fastseq/ops/recurrence/triton_sequence.py).

On CPU, under the Triton interpreter: the one-program-per-row-block variant (no grid
barrier) against the reference, every output and gradient (outputs NaN-poisoned),
lengths (unsorted, including 1), sizes that are not tile multiples, T = 1, with and
without a bias, float32 and float16; one launch per forward and per backward. The
grid-barrier variant deadlocks under the interpreter (it runs programs one after
another), so here it is only compiled: both variants for sm_90a on the stub driver
(bench/stubdriver.py), with Triton 3.9 and the GPU image's Triton 3.6 where its venv
exists, with no register spills.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parity import assert_close

from conftest import DEVICE, TRITON
from fastseq.ops.recurrence import naive as reference

pytestmark = pytest.mark.skipif(not TRITON, reason="Triton backend not available here")

DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]
ROOT = Path(__file__).resolve().parent.parent


def _make(G, T, B, H, dtype, bias, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype)  # noqa: E731
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = 1
        lens = lens.to(DEVICE)
    return (rnd(T, B, G * H), rnd(B, H), rnd(B, H), rnd(G * H, H, scale=H ** -0.5),
            rnd(G * H) if bias else None, lens)


# (T, B, H): T = 1; one row and hidden tile; rows over two row tiles (16) and H not a
# tile multiple; three hidden tiles.
SHAPES = [(1, 1, 5), (3, 2, 16), (5, 17, 20), (2, 3, 33)]
CASES = [(True, False), (False, True), (True, True)]  # (bias, lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,H", SHAPES)
@pytest.mark.parametrize("bias,lengths", CASES)
def test_gru_sequence_kernels(dtype, T, B, H, bias, lengths):
    from fastseq.ops.recurrence import triton_sequence as seq

    gi, h0, _, w, b, lens = _make(3, T, B, H, dtype, bias, lengths, seed=T * 100 + B * 10 + H)
    hs, gates = seq.gru_recurrence_forward(gi, h0, w, b, lens, True)
    hs_r, gates_r = reference.gru_recurrence_forward(gi, h0, w, b, lens, True)
    assert_close(hs, hs_r, dtype, "hs")
    assert_close(gates, gates_r, dtype, "gates")
    hs_n, none = seq.gru_recurrence_forward(gi, h0, w, b, lens, False)
    assert none.numel() == 0
    assert torch.equal(hs_n, hs), "save_gates=False changed hs"
    grad = torch.randn(hs.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = seq.gru_recurrence_backward(grad, h0, w, hs_r, gates_r, lens, bias)
    want = reference.gru_recurrence_backward(grad, h0, w, hs_r, gates_r, lens, bias)
    assert len(got) == len(want) == 4
    for name, a, e in zip(["grad gi", "grad h0", "grad w_hh", "grad b_hh"], got, want):
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,H", SHAPES)
@pytest.mark.parametrize("bias,lengths", CASES)
def test_lstm_sequence_kernels(dtype, T, B, H, bias, lengths):
    from fastseq.ops.recurrence import triton_sequence as seq

    gi, h0, c0, w, b, lens = _make(4, T, B, H, dtype, bias, lengths, seed=T * 100 + B * 10 + H + 7)
    hs, cs, gates = seq.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True)
    hs_r, cs_r, gates_r = reference.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True)
    assert_close(hs, hs_r, dtype, "hs")
    assert_close(cs, cs_r, dtype, "cs")
    assert_close(gates, gates_r, dtype, "gates")
    g = torch.Generator().manual_seed(2)
    grad_h = torch.randn(hs.shape, generator=g).to(DEVICE, dtype)
    grad_c = torch.randn(cs.shape, generator=g).to(DEVICE, dtype)
    for gc in (grad_c, None):
        got = seq.lstm_recurrence_backward(grad_h, gc, h0, c0, w, hs_r, cs_r, gates_r, lens, bias)
        gc_r = torch.zeros_like(grad_c) if gc is None else gc  # the reference takes no None
        want = reference.lstm_recurrence_backward(grad_h, gc_r, h0, c0, w, hs_r, cs_r, gates_r, lens, bias)
        assert len(got) == len(want) == 5
        for name, a, e in zip(["grad gi", "grad h0", "grad c0", "grad w_hh", "grad b_hh"], got, want):
            assert_close(a, e, dtype, f"{name} (grad_cs {'given' if gc is not None else 'None'})")



# W_RESIDENT (each program keeps its W_hh slice on chip for all steps): under the
# interpreter one program per row block owns the whole hidden size (BLOCK_H = KP =
# next_pow2(H)); rows over two row tiles, H not a power of two, one row.
RESIDENT_SHAPES = [(3, 2, 16), (5, 17, 20), (4, 1, 33)]


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's one-program W_RESIDENT case")
@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("T,B,H", RESIDENT_SHAPES)
@pytest.mark.parametrize("bias,lengths", CASES)
def test_w_resident_sequence_kernels(kind, T, B, H, bias, lengths, monkeypatch):
    """The W_RESIDENT variant (forward and backward) against the reference, float32, every
    output and gradient; each launch checked to be that variant."""
    from fastseq.ops.recurrence import triton_sequence as seq

    used = []
    kw = seq._kw
    monkeypatch.setattr(seq, "_kw", lambda p: used.append((p.w_resident, p.KP, p.n_h, p.BLOCK_H)) or kw(p))
    G, dtype = (3 if kind == "gru" else 4), torch.float32
    gi, h0, c0, w, b, lens = _make(G, T, B, H, dtype, bias, lengths, seed=T * 100 + B * 10 + H + 11)
    g = torch.Generator().manual_seed(3)
    grad_h = torch.randn(T, B, H, generator=g).to(DEVICE, dtype)
    grad_c = torch.randn(T, B, H, generator=g).to(DEVICE, dtype)
    if kind == "gru":
        hs, gates = seq.gru_recurrence_forward(gi, h0, w, b, lens, True, w_resident=True)
        hs_r, gates_r = reference.gru_recurrence_forward(gi, h0, w, b, lens, True)
        outs = [("hs", hs, hs_r), ("gates", gates, gates_r)]
        got = seq.gru_recurrence_backward(grad_h, h0, w, hs_r, gates_r, lens, bias, w_resident=True)
        want = reference.gru_recurrence_backward(grad_h, h0, w, hs_r, gates_r, lens, bias)
        names = ["grad gi", "grad h0", "grad w_hh", "grad b_hh"]
    else:
        hs, cs, gates = seq.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True, w_resident=True)
        hs_r, cs_r, gates_r = reference.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True)
        outs = [("hs", hs, hs_r), ("cs", cs, cs_r), ("gates", gates, gates_r)]
        got = seq.lstm_recurrence_backward(grad_h, grad_c, h0, c0, w, hs_r, cs_r, gates_r, lens, bias,
                                           w_resident=True)
        want = reference.lstm_recurrence_backward(grad_h, grad_c, h0, c0, w, hs_r, cs_r, gates_r, lens, bias)
        names = ["grad gi", "grad h0", "grad c0", "grad w_hh", "grad b_hh"]
    for name, a, e in outs:
        assert_close(a, e, dtype, name)
    assert len(got) == len(want) == len(names)
    for name, a, e in zip(names, got, want):
        assert_close(a, e, dtype, name)
    kp = max(16, 1 << (H - 1).bit_length())
    assert used == [(True, kp, 1, kp)] * 2, used


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's plan")
def test_w_resident_plan():
    """Forced under the interpreter (one program, the tile covers H); chosen on a GPU only
    where every program owns one hidden tile and the forward's shared memory fits (the
    stub/CPU plan models 132 SMs); refused with a programs_per_rows other than that."""
    from fastseq.ops.recurrence import triton_sequence as seq

    cpu = torch.device("cpu")
    p = seq.plan(17, 33, cpu, w_resident=True)
    assert (p.w_resident, p.n_b, p.n_h, p.BLOCK_H, p.KP, p.grid_sync) == (True, 2, 1, 64, 64, False)
    assert p.prefetch  # the interpreter runs the prefetching forward; the other variant, the late loads
    assert not seq.plan(17, 33, cpu).w_resident and not seq.plan(17, 33, cpu).prefetch
    # Loads ahead of the product (v0.17): everywhere under Triton 3.9; under 3.6 not the LSTM's 32-row tiles.
    assert seq.resident_prefetch(16, 4, False) and seq.resident_prefetch(32, 3, False)
    assert not seq.resident_prefetch(32, 4, False) and seq.resident_prefetch(32, 4, True)
    with pytest.raises(ValueError, match="programs_per_rows"):
        seq.plan(4, 64, cpu, programs_per_rows=2, w_resident=True)
    bf16, f32 = torch.bfloat16, torch.float32
    # 64 * KP * elem <= 128 KiB (Triton 3.9) or 64 KiB, BLOCK_B * KP * elem <= 32 KiB, n_b * cdiv(H, 16) <= 132
    new = seq.RESIDENT_W_BYTES == 128 * 1024
    assert seq.RESIDENT_W_BYTES == (128 if seq._TRITON_AT_LEAST_3_9 else 64) * 1024
    assert seq.resident_fits(16, 512, 4, bf16, cpu) and seq.resident_fits(64, 512, 3, bf16, cpu)
    assert seq.resident_fits(16, 1024, 4, bf16, cpu) == seq.resident_fits(16, 768, 3, bf16, cpu) == new
    assert seq.resident_fits(64, 512, 4, torch.float16, cpu)
    assert not seq.resident_fits(16, 256, 4, f32, cpu)  # fp32: only when forced
    assert not seq.resident_fits(64, 1024, 4, bf16, cpu)  # 32 x 1024 operand: spills
    assert not seq.resident_fits(16, 2048, 4, bf16, cpu)  # KP = 2048: 256 KiB of W
    assert not seq.resident_fits(128, 1024, 4, bf16, cpu)  # 4 row blocks x 64 tiles > 132 SMs

def test_per_step_and_sequence_gates_interchange():
    """The sequence forward's gates feed the per-step backward and the other way round."""
    from fastseq.ops.recurrence import triton as per_step
    from fastseq.ops.recurrence import triton_sequence as seq

    gi, h0, _, w, b, lens = _make(3, 4, 5, 18, torch.float32, True, True, seed=3)
    hs, gates = seq.gru_recurrence_forward(gi, h0, w, b, lens, True)
    hs_p, gates_p = per_step.gru_recurrence_forward(gi, h0, w, b, lens, True)
    assert_close(gates, gates_p, torch.float32, "gates")
    grad = torch.randn(hs.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    a = per_step.gru_recurrence_backward(grad, h0, w, hs, gates, lens, True)
    e = seq.gru_recurrence_backward(grad, h0, w, hs_p, gates_p, lens, True)
    for name, x, y in zip(["grad gi", "grad h0", "grad w_hh", "grad b_hh"], a, e):
        assert_close(x, y, torch.float32, name)


def test_one_launch_per_call():
    """Forward: one launch for all T steps; backward: one (dh0 included), then torch's product."""
    from fastseq.ops import launches
    from fastseq.ops.recurrence import triton_sequence as seq

    T, B, H = 6, 3, 20
    for kind, G in (("gru", 3), ("lstm", 4)):
        gi, h0, c0, w, b, lens = _make(G, T, B, H, torch.float32, True, True, seed=5)
        grad = torch.ones(T, B, H, device=DEVICE)
        with launches.count() as n:
            if kind == "gru":
                hs, gates = seq.gru_recurrence_forward(gi, h0, w, b, lens, True)
            else:
                hs, cs, gates = seq.lstm_recurrence_forward(gi, h0, c0, w, b, lens, True)
        assert n == {f"_{kind}_seq_fwd_kernel": 1}
        with launches.count() as n:
            if kind == "gru":
                seq.gru_recurrence_backward(grad, h0, w, hs, gates, lens, True)
            else:
                seq.lstm_recurrence_backward(grad, None, h0, c0, w, hs, cs, gates, lens, True)
        assert n == {f"_{kind}_seq_bwd_kernel": 1}


def test_empty_and_unsaved_gates():
    from fastseq.ops.recurrence import triton_sequence as seq

    gi, h0, _, w, b, _ = _make(3, 0, 2, 5, torch.float32, True, False, seed=6)
    hs, gates = seq.gru_recurrence_forward(gi, h0, w, b, None, True)
    assert hs.shape == (0, 2, 5) and gates.shape == (0, 2, 20)
    dgi, dh0, dw, db = seq.gru_recurrence_backward(hs, h0, w, hs, gates, None, True)
    assert dgi.shape == (0, 2, 15) and torch.equal(dh0, torch.zeros_like(h0)) and torch.equal(dw, torch.zeros_like(w))
    gi, h0, _, w, b, _ = _make(3, 2, 2, 5, torch.float32, True, False, seed=6)
    hs, none = seq.gru_recurrence_forward(gi, h0, w, b, None, False)
    with pytest.raises(ValueError, match="save_gates=True"):
        seq.gru_recurrence_backward(hs, h0, w, hs, none, None, True)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's limits")
def test_grid_barrier_refused_under_interpreter():
    from fastseq.ops.recurrence import triton_sequence as seq

    with pytest.raises(ValueError, match="interpreter"):
        seq.plan(4, 64, torch.device("cpu"), programs_per_rows=2)
    with pytest.raises(ValueError, match=">= 1"):
        seq.plan(4, 64, torch.device("cpu"), programs_per_rows=0)
    p = seq.plan(17, 33, torch.device("cpu"))
    assert (p.n_b, p.n_h, p.grid_sync) == (2, 1, False)


def test_fits():
    from fastseq.ops.recurrence import triton_sequence as seq

    dev = torch.device(DEVICE)
    assert seq.fits(64, 512, 3, torch.float32, dev)
    assert seq.fits(64, 512, 4, torch.float16, dev)
    assert not seq.fits(64, 512, 3, torch.float64, dev)
    assert not seq.fits(8, 2 ** 15, 4, torch.float32, dev)  # W_hh [4H, H] past int32 offsets
    assert not seq.fits(2 ** 20, 2 ** 10, 4, torch.float32, dev)  # a step's [B, 4H] past int32 offsets


# ------------------------------------------------------------- compiled, stub driver


def _pythons():
    out = [pytest.param(sys.executable, id="triton-here")]
    venv36 = Path("/tmp/venv36/bin/python")
    out.append(pytest.param(str(venv36), id="triton-3.6", marks=pytest.mark.skipif(
        not venv36.exists(), reason="no Triton 3.6 venv at /tmp/venv36 (the GPU image's version)")))
    return out


def _probe(python, cfg):
    """bench/sequence_probe.py's output for ``cfg`` under ``python`` on the stub driver
    (skips where the stub driver cannot be built)."""
    code = (
        "import json, subprocess, sys\n"
        "from bench import stubdriver\n"
        "try:\n"
        "    lib = stubdriver.build()\n"
        "except RuntimeError as exc:\n"
        "    print(json.dumps({'skip': str(exc)})); sys.exit(0)\n"
        "env = stubdriver.subprocess_env(lib)\n"
        f"env['PYTHONPATH'] = {str(ROOT)!r}\n"
        "env.setdefault('TRITON_DEFAULT_FP_FUSION', '1')\n"
        f"cfg = {json.dumps(cfg)!r}\n"
        f"p = subprocess.run([sys.executable, {str(ROOT / 'bench' / 'sequence_probe.py')!r}, cfg], env=env,\n"
        "                   capture_output=True, text=True, timeout=1500)\n"
        "sys.stderr.write(p.stderr[-3000:])\n"
        "print(p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else\n"
        "      json.dumps({'error': f'rc {p.returncode}: ' + p.stderr[-3000:]}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([python, "-c", code], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=1600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(f"stub driver cannot be built here: {res['skip']}")
    return res


@pytest.mark.slow
@pytest.mark.parametrize("python", _pythons())
def test_sequence_kernels_compile_without_spills(python, tmp_path):
    """Both variants (one program per row block; the grid barrier) of the four kernels, as the
    host functions launch them, compile for sm_90a with no spills at B in {8, 64}, H in
    {512, 1024}, float32 and bfloat16; the grid-barrier variant's PTX has the release
    arrival and the acquire poll, the other has neither; the bf16 backwards issue no plain
    global load after their product in the time loop."""
    res = _probe(python, {"mode": "compile", "B": [8, 64], "H": [512, 1024], "dtypes": ["float32", "bfloat16"]})
    assert "error" not in res, res["error"]
    assert res["errors"] == []
    rows = res["kernels"]
    names = {"_gru_seq_fwd_kernel", "_gru_seq_bwd_kernel", "_lstm_seq_fwd_kernel", "_lstm_seq_bwd_kernel"}
    for sync in (False, True):
        assert {r["kernel"] for r in rows if r["grid_sync"] == sync} == names, sync
    assert {r["pointer_dtypes"].get("w_ptr") for r in rows} == {"*fp32", "*bf16"}
    spilling = [(r["kernel"], r["constexprs"], r["spill_stores"], r["spill_loads"]) for r in rows
                if r.get("spill_stores") != 0 or r.get("spill_loads") != 0 or r.get("ptxas_error")]
    assert not spilling, spilling
    for r in rows:
        assert r["ptx_release"] == r["ptx_acquire"] == r["grid_sync"], (r["kernel"], r["constexprs"])
        assert not r["w_resident"]
    # The backwards load the saved gates and states ahead of the carried product (v0.17; before it
    # 6 (GRU) and 8 (LSTM) plain loads followed the product in the bf16 time loop).
    bf16_bwd = [r for r in rows if r["kernel"].endswith("_bwd_kernel") and r["pointer_dtypes"]["w_ptr"] == "*bf16"]
    assert {(r["kernel"], r["grid_sync"]) for r in bf16_bwd} == {
        (k, sync) for k in ("_gru_seq_bwd_kernel", "_lstm_seq_bwd_kernel") for sync in (False, True)}
    for r in bf16_bwd:
        assert r["sass_mma_loop"]["LDG_after_mma"] == 0, (r["kernel"], r["used_by"], r["sass_mma_loop"])


@pytest.mark.slow
@pytest.mark.parametrize("python", _pythons())
def test_w_resident_forward_compiles(python):
    """The W_RESIDENT forward kernels where the plan picks them on an H100/H200 (132 SMs:
    the grid barrier among one program per hidden tile; resident_fits) compile for sm_90a
    with no spills (bfloat16: B in {16, 64} at H = 512, and B = 16 at H = 1024 under Triton
    3.9), every product on tensor cores (wgmma), and W_hh loaded and staged in shared
    memory once, before the time loop (the TTGIR), read there by the loop's one product
    per step; the step's own inputs (gi, b_hh: plain global loads in the SASS) are loaded
    ahead of the product, none after it (before v0.17: 0 ahead, 9 after, LSTM B 16 H 512), except
    where :func:`resident_prefetch` keeps them after it (Triton 3.6, the LSTM's 32-row tiles)."""
    from fastseq.ops.recurrence import triton_sequence as seq

    cases = [[16, 512, "bfloat16"], [64, 512, "bfloat16"]]
    new = python == sys.executable and seq._TRITON_AT_LEAST_3_9
    if new:  # the size only 3.9's limits admit
        cases += [[16, 1024, "bfloat16"]]
    res = _probe(python, {"mode": "compile", "resident": True, "backward": False, "cases": cases})
    assert "error" not in res, res["error"]
    assert res["errors"] == []
    rows = res["kernels"]
    assert {r["kernel"] for r in rows} == {"_gru_seq_fwd_kernel", "_lstm_seq_fwd_kernel"}
    assert len(rows) == 2 * 2 * len(cases)  # GRU/LSTM x gates saved or not x sizes
    for B, H, dtype in cases:
        assert seq.resident_fits(B, H, 4, getattr(torch, dtype), torch.device("cpu")), (B, H, dtype)
    for r in rows:
        what = (r["kernel"], r["used_by"], r["regs"], r["spill_stores"], r["time_loop"])
        assert r["w_resident"] and r["grid_sync"], what
        assert r["spill_stores"] == r["spill_loads"] == 0 and not r.get("ptxas_error"), what
        assert any(k.startswith("HGMMA") for k in r["mma"]["instructions"]), what
        loop = r["time_loop"]
        assert loop["hoisted"] and loop["w_load_before"] == loop["w_local_alloc_before"] == 1, what
        assert loop["dots_in_loop"] == 1 and loop.get("w_load_in_loop", 0) == 0, what
        sass_loop, gates = r["sass_mma_loop"], 3 if r["kernel"].startswith("_gru") else 4
        assert r["constexprs"]["PREFETCH"] == seq.resident_prefetch(r["constexprs"]["BLOCK_B"], gates, new), what
        if r["constexprs"]["PREFETCH"]:
            assert sass_loop["LDG_after_mma"] == 0 and sass_loop["LDG_before_mma"] >= gates, (what, sass_loop)
        else:  # Triton 3.6, the LSTM's 32-row tiles: after the product, as before v0.17
            assert sass_loop["LDG_before_mma"] == 0 and sass_loop["LDG_after_mma"] >= gates, (what, sass_loop)


def test_registry_runs_the_sequence_kernels_when_asked(monkeypatch):
    """FASTSEQ_TRITON_SEQUENCE=1: fastseq.ops.gru on the Triton backend is one launch per
    call (the sequence kernel); unset, one per step (the per-step kernels)."""
    import fastseq
    from fastseq import ops
    from fastseq.ops import launches

    gi, h0, w = (torch.randn(*s).to(DEVICE) for s in ((4, 3, 24), (3, 8), (24, 8)))
    with fastseq.backend("triton"):
        monkeypatch.delenv("FASTSEQ_TRITON_SEQUENCE", raising=False)
        with launches.count() as per_step:
            want = ops.gru(gi, h0, w, None)
        monkeypatch.setenv("FASTSEQ_TRITON_SEQUENCE", "1")
        with launches.count() as sequence:
            got = ops.gru(gi, h0, w, None)
    assert per_step == {"_gru_fwd_step_kernel": 4}
    assert sequence == {"_gru_seq_fwd_kernel": 1}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
