"""Issue 17, target 3: the compiled Triton kernels at the benchmark suites' GPU sizes.

Every fastseq Triton kernel is compiled for sm_90a exactly as the host code launches
it at every size of the ``layer``, ``cell``, ``attention`` and ``decoder_step`` suites'
GPU grids (``quick`` and ``full``), in float32 and bfloat16
(``python -m fastseq.bench.kernels --grid ci --mode stub``: the real launch functions
on CPU tensors, on the stub CUDA driver of bench/stubdriver.py; no GPU needed). From
the compiled kernels' ptxas report, SASS (``cuobjdump -sass``) and Triton IR:

(a) no kernel spills registers (0 bytes of spill stores and of spill loads);
(b) every kernel that takes bf16/fp16 tensors and calls ``tl.dot`` has tensor-core
    instructions (``HMMA``, or Hopper's ``HGMMA``);
(c) no float32 kernel without the TF32 opt-in has any (its products are IEEE fp32);
(d) the Triton and ptxas versions the check ran under are stated (printed, and in
    every failure message).

Plus a positive control: the float32 jobs with TF32 opted in (``-tf32``) show tensor
cores in every kernel with a ``tl.dot``, so the SASS count does see them.

The check runs once per session (a module-scoped fixture; measured 2026-12-01 on this
project's shared 2-core CPU machine: 3 min 51 s with an empty Triton cache, about 3 min
with a warm one, which spares the compiles but not the ptxas -v re-runs; 209 kernels
from 196 jobs). The assertions are parametrized per job
(op, sizes, dtype); a failure lists each offending kernel with its tile and flags.
Under another Triton, run this file with that Python, e.g.
``PYTHONPATH=$PWD /tmp/venv36/bin/python -m pytest -q tests/test_kernel_resources.py``.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import checkout_bench

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
HALF = ("bf16", "fp16")


def _bench_kernels():
    """``fastseq.bench.kernels`` of this checkout (:func:`conftest.checkout_bench`)."""
    checkout_bench()
    from fastseq.bench import kernels

    return kernels


kernels = _bench_kernels()
try:
    JOBS = {kernels.label(j): j for j in kernels.jobs("ci")}
    JOBS_ERROR = None
except Exception as exc:  # noqa: BLE001 - reported by test_the_grid_is_the_suites_sizes
    JOBS, JOBS_ERROR = {}, f"{type(exc).__name__}: {exc}"
HALF_JOBS = [k for k, j in JOBS.items() if j["dtype"] in ("bfloat16", "float16")]
FP32_JOBS = [k for k, j in JOBS.items() if j["dtype"] == "float32" and not j.get("tf32")]
TF32_JOBS = [k for k, j in JOBS.items() if j.get("tf32")]


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """The check's JSON (``fastseq.bench.kernels --grid ci --mode stub``), run once, in subprocesses."""
    pytest.importorskip("triton", reason="the kernels are Triton kernels: Triton is not installed")
    from fastseq.bench import stubdriver

    try:
        stubdriver.build()
    except RuntimeError as exc:
        pytest.skip(f"the stub CUDA driver cannot be built here (it needs a C compiler): {exc}")
    out = tmp_path_factory.mktemp("kernel_resources") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "run", str(ROOT), "fastseq.bench.kernels",
           "--grid", "ci", "--mode", "stub", "--jobs", str(max(1, min(n, 12))), "--timeout", "2400",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=3000)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"the check failed (rc {proc.returncode}): {' '.join(cmd)}\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", pytrace=False)
    result = json.loads(out.read_text())
    result["json_path"] = str(out)
    return result


def _versions(result) -> str:
    return f"Triton {result['triton']}, ptxas {result['ptxas']['version']}, {result['arch']}"


def _rows(result, job: str):
    rows = [r for r in result["kernels"] if job in r["used_by"]]
    assert rows, f"{_versions(result)}: job {job} compiled no kernel (errors: {result['errors'][:5]})"
    return rows


def _describe(r) -> str:
    c = r["constexprs"]
    tile = " ".join(f"{k}={v}" for k, v in sorted(c.items()) if k.startswith("BLOCK_"))
    flags = " ".join(f"{k}={v}" for k, v in sorted(c.items()) if not k.startswith("BLOCK_"))
    dtypes = ",".join(sorted({v.lstrip("*") for v in r["pointer_dtypes"].values()}))
    sass = r.get("sass") or {}
    return (f"{r['kernel']} [{dtypes}] {tile} num_warps={r['num_warps']} ({flags}): regs {r.get('regs')}, "
            f"spill stores/loads {r.get('spill_stores')}/{r.get('spill_loads')} B, stack {r.get('stack_frame')} B, "
            f"dots {r.get('dot_dtypes')}, MMA {(r.get('mma') or {}).get('instructions')}, "
            f"FFMA {sass.get('FFMA')}, hash {r['hash']}, used by {', '.join(r['used_by'][:4])}")


def _mma(r) -> int:
    return sum(r["sass"].get(op, 0) for op in kernels.MMA_OPS)


def test_the_grid_is_the_suites_sizes():
    """The job list (read from the suites' grid() functions) has every suite's op in both dtypes."""
    assert JOBS_ERROR is None, f"listing the suites' sizes failed: {JOBS_ERROR}"
    ops = {(j["op"], j["dtype"]) for j in JOBS.values()}
    assert ops == {(op, dt) for op in ("gru", "lstm", "cell", "attention") for dt in ("float32", "bfloat16")}
    assert any(j.get("packed") for j in JOBS.values()) and any(j["op"] == "attention" and j["T"] > 1
                                                                  for j in JOBS.values())
    assert any(j.get("steps") == 1 for j in JOBS.values())  # the cell suite's single steps
    assert TF32_JOBS and HALF_JOBS and FP32_JOBS


def test_the_check_ran_every_job_and_read_every_kernel(check, capsys):
    """(d) and completeness: the versions, no error, every job compiled, every kernel measured."""
    import triton

    with capsys.disabled():
        print(f"\nkernel resources (--grid ci): {_versions(check)}, torch {check['torch']}: {check['n_kernels']} "
              f"kernels from {len(check['jobs'])} jobs, {check['n_spilling']} spilling, {check['n_tensor_cores']} of "
              f"the {check['n_with_dot']} with a tl.dot on tensor cores; {check['wall_s']} s; {check['json_path']}")
    assert check["triton"] == triton.__version__, _versions(check)
    assert check["grid"] == "ci" and check["arch"] == "sm_90a"
    assert check["jobs"] == list(JOBS), "the check ran another job list than this test collected"
    assert not check["errors"], f"{_versions(check)}: {check['errors'][:10]}"
    used = {u for r in check["kernels"] for u in r["used_by"]}
    assert used == set(JOBS), f"jobs that compiled no kernel: {sorted(set(JOBS) - used)}"
    half_dots = [r for r in check["kernels"] if r["n_dots"] and r["job_dtypes"] == ["bfloat16"]]
    assert half_dots, "no bfloat16 kernel with a tl.dot: the tensor-core test would check nothing"
    for r in check["kernels"]:
        assert "ptxas_error" not in r and "sass_error" not in r, (_versions(check), r)
        assert isinstance(r["regs"], int) and r["regs"] > 0, _describe(r)
        assert isinstance(r.get("sass"), dict) and r["sass"]["FFMA"] + _mma(r) > 0, _describe(r)
        assert r["cubin"]["REG"] == r["regs"], _describe(r)  # the ptxas re-run is the cubin's compile


@pytest.mark.parametrize("job", list(JOBS))
def test_no_spills(check, job):
    """(a) 0 bytes of spill stores and spill loads in every kernel the job launches."""
    bad = [r for r in _rows(check, job) if r.get("spill_stores") != 0 or r.get("spill_loads") != 0]
    assert not bad, f"{_versions(check)}: {job}: {len(bad)} kernel(s) spill:\n  " + "\n  ".join(map(_describe, bad))


@pytest.mark.parametrize("job", HALF_JOBS)
def test_half_precision_dots_use_tensor_cores(check, job):
    """(b) a kernel taking bf16/fp16 tensors with a tl.dot has HMMA or HGMMA instructions."""
    rows = [r for r in _rows(check, job)  # none for the attention with one query (no tl.dot by design)
            if r["n_dots"] and any(v.lstrip("*") in HALF for v in r["pointer_dtypes"].values())]
    bad = [r for r in rows if _mma(r) == 0]
    assert not bad, (f"{_versions(check)}: {job}: {len(bad)} of {len(rows)} half-precision kernel(s) with a tl.dot "
                     f"have no tensor-core instruction:\n  " + "\n  ".join(map(_describe, bad)))


@pytest.mark.parametrize("job", FP32_JOBS)
def test_float32_without_tf32_is_ieee(check, job):
    """(c) float32 without the TF32 opt-in: no tensor-core instruction (IEEE fp32 products)."""
    rows = _rows(check, job)
    assert all(r["job_dtypes"] == ["float32"] for r in rows), [(r["kernel"], r["job_dtypes"]) for r in rows]
    bad = [r for r in rows if _mma(r) or r["constexprs"].get("PRECISION", "ieee") != "ieee"]
    assert not bad, (f"{_versions(check)}: {job}: {len(bad)} float32 kernel(s) with tensor cores or TF32 "
                     f"without the opt-in:\n  " + "\n  ".join(map(_describe, bad)))


STEP_KERNELS = ("_gru_fwd_step_kernel", "_lstm_fwd_step_kernel", "_gru_bwd_step_kernel", "_lstm_bwd_step_kernel",
                "_gru_context_cell_fwd_kernel")


@pytest.mark.parametrize("job", [j for j in HALF_JOBS if JOBS[j]["op"] in ("gru", "lstm", "cell")])
def test_recurrence_steps_load_their_inputs_ahead_of_the_product(check, job):
    """The half-precision per-step recurrence kernels and the decoder's context cell issue no
    plain global load after their last tensor-core instruction: the forward's gi, b_hh, state
    and lengths, the backward's saved gates, states and lengths, the cell's gi, gh and b_hh are
    loaded before the product (bench/NOTES.md v0.17; before it, at B 16, 32-unit tiles, bf16:
    24 and 34 loads followed the GRU and LSTM forward's product, 26 and 30 the backward's, 31
    the context cell's)."""
    rows = [r for r in _rows(check, job) if r["kernel"] in STEP_KERNELS]
    assert rows, f"{_versions(check)}: {job}: no recurrence step kernel"
    bad = [r for r in rows if r.get("sass_ldg_after_mma") != 0]
    assert not bad, (f"{_versions(check)}: {job}: loads after the product:\n  " + "\n  ".join(
        f"{_describe(r)}: {r.get('sass_ldg_after_mma')}" for r in bad))


@pytest.mark.parametrize("job", TF32_JOBS)
def test_tf32_opt_in_uses_tensor_cores(check, job):
    """The positive control: with TF32 opted in, every float32 kernel with a tl.dot shows tensor cores."""
    rows = [r for r in _rows(check, job) if r["n_dots"]]
    assert rows, f"{_versions(check)}: {job}: no kernel with a tl.dot"
    bad = [r for r in rows if r["constexprs"].get("PRECISION") == "tf32" and _mma(r) == 0]
    assert not bad, (f"{_versions(check)}: {job}: TF32 dots without tensor-core instructions:\n  "
                     + "\n  ".join(map(_describe, bad)))


SASS = """
        /*0100*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;       /* 0x000000000c04723c */
                                                                              /* 0x000fe20000041804 */
        /*0110*/              @!P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0120*/                   HFMA2.MMA R28, -RZ, RZ, 0, 2.3e-07 ;
        /*0130*/               @P1 FFMA R26, R12, R36.reuse, R201 ;
        /*0140*/                   FFMA.FTZ R1, R2, R3, R4 ;
        /*0150*/                   MUFU.EX2 R5, R6 ;
        /*0160*/                   STL.64 [R1+0x8], R2 ;
"""


def test_sass_ldg_after_mma_counts_plain_loads_past_the_last_product():
    sass = SASS + """
        /*0170*/                   LDG.E.U16 R7, desc[UR8][R4.64] ;
        /*0180*/                   LDG.E.STRONG.GPU R8, desc[UR8][R4.64] ;
"""
    assert kernels.sass_ldg_after_mma(sass) == 1  # the .STRONG poll is not counted
    assert kernels.sass_ldg_after_mma("        /*0170*/                   LDG.E.U16 R7, desc[UR8][R4.64] ;") is None


def test_sass_counts_reads_base_opcodes():
    counts, mma = kernels.sass_counts(SASS)
    assert mma == {"HMMA.16816.F32.BF16": 1, "HGMMA.64x64x16.F32.BF16": 1}  # HFMA2.MMA is not one
    assert (counts["HMMA"], counts["HGMMA"], counts["FFMA"], counts["MUFU"], counts["STL"]) == (1, 1, 2, 1, 1)
    assert counts["IMMA"] == counts["LDL"] == 0


def test_dot_dtypes_reads_the_operand_types():
    ttir = ("%a = tt.dot %x, %w, %acc : tensor<16x32xf32> * tensor<32x16xf32> -> tensor<16x16xf32> loc(#l)\n"
            "%b = tt.dot %x, %w, %acc, inputPrecision = tf32 : tensor<16x32xf32> * tensor<32x16xf32> "
            "-> tensor<16x16xf32> loc(#l)\n"
            "%c = tt.dot %p, %q, %acc : tensor<64x32xbf16> * tensor<32x64xbf16> -> tensor<64x64xf32> loc(#l)\n")
    assert kernels.dot_dtypes(ttir) == {"f32*f32->f32": 1, "f32*f32->f32 (tf32)": 1, "bf16*bf16->f32": 1}


def test_skips_only_without_a_c_compiler():
    """The check's only skip is the stub driver's build; on a machine with gcc it runs."""
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("no C compiler: the check above skips too")
    from fastseq.bench import stubdriver

    assert (stubdriver.build() / stubdriver.LIB).exists()
