"""Compile checks of the CUDA sources under csrc/cuda (compiled, never run here).

* Every ``csrc/cuda/*.cu`` is compiled by nvcc to an object file for sm_80 and
  for sm_90 (one nvcc run per file and arch), with the macros
  ``torch.utils.cpp_extension`` passes to nvcc (``-D__CUDA_NO_HALF_OPERATORS__``
  and friends), so the kernels also build the way the extension loader builds
  them. Skipped when nvcc is not found (PATH, ``$CUDA_HOME/bin``,
  ``/usr/local/cuda/bin``).
* The kernel sources must not include ATen / c10 / torch headers (they are
  built by nvcc without torch's CUDA headers, which the CPU wheel lacks).
* ``csrc/cuda/bindings.cpp`` (the ATen side) gets a syntax-only compile with
  the host compiler against this torch's headers and the CUDA toolkit's
  headers, in C++20 as ``torch.utils.cpp_extension`` builds it, with
  ``-D_GLIBCXX_USE_CXX11_ABI`` matching torch. A CPU-only torch wheel ships
  ``c10/cuda/*.h`` but not the one header generated when torch is built with
  CUDA, ``c10/cuda/impl/cuda_cmake_macros.h`` (it only defines
  ``C10_CUDA_BUILD_SHARED_LIBS`` and version numbers); when it is missing the
  test writes that one-line stand-in into a temporary include directory and
  says so in its output. Everything else (ATen, c10/cuda/CUDAStream.h,
  CUDAGuard.h, torch/library.h, cuda_runtime.h) is the real header. This
  checks syntax and types (templates included), not linking: the ops'
  schemas are checked against their definitions only when the library is
  loaded, which needs a CUDA build of torch.

Nothing here runs on a GPU. As a stand-in, the ``emulated`` tests (marked
``slow``, about a minute the first time: one host-compiler build cached under
the system temp directory) compile the same kernel sources and bindings.cpp
with the host compiler and ``-DFASTSEQ_CUDA_HOST_EMULATION``: every kernel
launch then runs on CPU threads (csrc/cuda/emu/host_emulation.h: blocks in
turn, a block's threads concurrently, real barriers and warp shuffles; a
cooperative launch runs all its blocks at once with a real grid barrier) on CPU
tensors, with the ATen side (GEMMs, state carry, dtype handling) unchanged,
registered as ``torch.ops.fastseq_cuda_emu`` with the schemas of the CPU ops
(so their match with the C++ signatures is checked on load). The results are
compared with the references (fastseq/ops/<op>/naive.py) for float32/float64/float16/bfloat16.
This checks the kernels' indexing and arithmetic and the glue code, not
anything GPU-specific (timing, occupancy, races the emulation does not
expose, cuBLAS).
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("80", "90")

# What torch.utils.cpp_extension adds to every nvcc command line (COMMON_NVCC_FLAGS).
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]

_TIMEOUT_S = 600


def _nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def _cuda_include() -> Optional[Path]:
    """The CUDA toolkit's include directory (holding cuda_runtime.h)."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "include")
    nvcc = _nvcc()
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for cand in candidates:
        if (cand / "cuda_runtime.h").is_file():
            return cand
    return None


def _run(cmd: List[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S)


def _report(cmd: List[str], proc: subprocess.CompletedProcess) -> str:
    return (f"command: {' '.join(cmd)}\nexit status: {proc.returncode}\n"
            f"--- stderr ---\n{proc.stderr[-20000:]}\n--- stdout ---\n{proc.stdout[-5000:]}")


def test_cuda_sources_present():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"
    assert (CUDA_DIR / "kernels.h").is_file()
    assert (CUDA_DIR / "bindings.cpp").is_file()


@pytest.mark.parametrize("path", CU_FILES + sorted(CUDA_DIR.glob("*.cuh")) + [CUDA_DIR / "kernels.h"],
                         ids=lambda p: p.name)
def test_kernel_sources_include_no_torch_headers(path):
    """The nvcc-compiled side must not depend on ATen / c10 / torch headers."""
    bad = [m.group(0) for m in re.finditer(r'#\s*include\s*[<"](ATen|c10|torch|caffe2)/[^>"]*[>"]',
                                           path.read_text())]
    assert not bad, f"{path.name} includes {bad}"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(path, arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, nor in $CUDA_HOME/bin or /usr/local/cuda/bin)")
    obj = tmp_path / f"{path.stem}.sm_{arch}.o"
    cmd = [nvcc, "-c", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           *TORCH_NVCC_DEFINES, "-Xcompiler", "-fPIC", str(path), "-o", str(obj)]
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, "nvcc failed\n" + _report(cmd, proc)
    assert obj.is_file() and obj.stat().st_size > 0


def test_persistent_kernels_do_not_spill(tmp_path):
    """ptxas -v for sm_90 on persistent_kernels.cu: every kernel (forward and backward, GRU
    and LSTM, four dtypes) compiles without register spills or a stack frame, and within the
    65536 / 256 = 255 registers a thread of its 256-thread block may use (the kernels
    run one block per SM, so their registers never limit the occupancy they need)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, nor in $CUDA_HOME/bin or /usr/local/cuda/bin)")
    path = CUDA_DIR / "persistent_kernels.cu"
    cmd = [nvcc, "-c", "-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", *TORCH_NVCC_DEFINES,
           "-Xcompiler", "-fPIC", "-Xptxas", "-v", str(path), "-o", str(tmp_path / "persistent.o")]
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, "nvcc failed\n" + _report(cmd, proc)
    info = proc.stdout + proc.stderr
    entries = re.findall(r"Compiling entry function '([^']+)'", info)
    assert len(entries) == 16, f"expected 16 kernels (fwd/bwd x GRU/LSTM x 4 dtypes), got {len(entries)}\n{info}"
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", info)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", info)]
    assert len(frames) == len(regs) == 16, info
    assert all(f == ("0", "0", "0") for f in frames), "stack frame or spills\n" + info
    assert max(regs) <= 255, info
    print(f"ptxas sm_90: registers {min(regs)}..{max(regs)}, no spills")


def _cuobjdump() -> Optional[str]:
    """cuobjdump from PATH, the CUDA toolkit, or the copy Triton ships; None if none is found."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    nvcc = _nvcc()
    if nvcc and (Path(os.path.realpath(nvcc)).parent / "cuobjdump").is_file():
        return str(Path(os.path.realpath(nvcc)).parent / "cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(cand) if cand.is_file() else None


def test_persistent_mma_kernels_registers_and_tensor_cores(tmp_path):
    """ptxas -v for sm_90 on persistent_mma_kernels.cu: its 84 kernels -- 48 forwards (GRU / LSTM,
    float16 / bfloat16, 1-4 W tiles of 16 rows, 2 / 4 / 8 k-tiles per warp) that hold W_hh in
    registers, 24 of them again with the tagged exchange (1-2 W tiles), 8 block backwards (GRU /
    LSTM, float16 / bfloat16, 1-2 W^T tiles), 4 cluster backwards (GRU / LSTM, float16 /
    bfloat16) -- compile without spilling (no stack frame, no spill bytes, <= 255 registers);
    and, where a cuobjdump is found, each kernel's SASS has tensor-core MMAs (HMMA.16816.F32,
    .BF16 for bfloat16) and no local-memory load or store (LDL / STL), the cluster backwards
    have the cluster barrier (UCGABAR_ARV / _WAIT), the grid-barrier forwards the barrier's
    atomic and fence (ATOM, MEMBAR), and the tagged forwards neither, only their strong 16-byte
    loads and strong stores (LDG.E.128.STRONG.GPU, STG.E.STRONG.GPU); and the step inputs that do
    not depend on the product are loaded ahead of it: in the forwards (but the tagged ones with 8
    k-tiles per warp) at least G 16-bit gi loads before the first HMMA, in the backwards at least 5
    global loads (the saved gates, grad_hs) between the grid barrier and the product."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, nor in $CUDA_HOME/bin or /usr/local/cuda/bin)")
    path = CUDA_DIR / "persistent_mma_kernels.cu"
    obj = tmp_path / "persistent_mma.o"
    cmd = [nvcc, "-c", "-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", *TORCH_NVCC_DEFINES,
           "-Xcompiler", "-fPIC", "-Xptxas", "-v", str(path), "-o", str(obj)]
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, "nvcc failed\n" + _report(cmd, proc)
    info = proc.stdout + proc.stderr
    entries = re.findall(r"Compiling entry function '([^']+)'", info)
    assert len(entries) == 84, f"expected 84 kernels, got {len(entries)}\n{info}"
    assert sum("mma_fwd_kernel" in e and "Lb1E" in e for e in entries) == 24, entries  # TG = true
    assert sum("mma_bwd_kernel" in e for e in entries) == 8, entries
    assert sum("mma_cluster_bwd_kernel" in e for e in entries) == 4, entries
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", info)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", info)]
    assert len(frames) == len(regs) == 84, info
    assert all(f == ("0", "0", "0") for f in frames), "stack frame or spills\n" + info
    assert max(regs) <= 255, info
    print(f"ptxas sm_90: 84 kernels, registers {min(regs)}..{max(regs)}, no spills")
    tool = _cuobjdump()
    if tool is None:
        print("no cuobjdump found: SASS not checked")
        return
    sass = _run([tool, "-sass", str(obj)], tmp_path)
    assert sass.returncode == 0, sass.stderr
    funcs = re.split(r"\n\s+Function : ", sass.stdout)[1:]
    assert len(funcs) == 84, f"cuobjdump listed {len(funcs)} functions"
    for f in funcs:
        name, body = f.split("\n", 1)
        want = "HMMA.16816.F32.BF16" if "bfloat16" in name else "HMMA.16816.F32 "
        assert want in body, f"{name}: no {want.strip()} in its SASS"
        assert not re.search(r"\s(LDL|STL)[\s.]", body), f"{name}: local-memory traffic in its SASS"
        if "cluster_bwd" in name:
            assert "UCGABAR_ARV" in body and "UCGABAR_WAIT" in body, f"{name}: no cluster barrier in its SASS"
        if "mma_fwd_kernel" in name and "Lb1E" in name:  # the tagged exchange: no barrier, no fence
            assert "LDG.E.128.STRONG.GPU" in body and "STG.E.STRONG.GPU" in body, f"{name}: no tagged accesses"
            assert "ATOM" not in body and "MEMBAR" not in body, f"{name}: a barrier or fence in its SASS"
        elif "mma_fwd_kernel" in name:
            assert "ATOM" in body and "MEMBAR" in body, f"{name}: no grid barrier in its SASS"
        ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", body)
        if "mma_fwd_kernel" in name:
            # The step's inputs ahead of its product (all but the tagged kernels with 8 k-tiles per
            # warp): before the first HMMA, the W_hh staging load and at least G 16-bit loads of gi.
            G, kpw, tagged = re.search(r"Li([34])ELi\dELi(\d)ELb([01])E", name).groups()
            if not (tagged == "1" and kpw == "8"):
                first = next(i for i, o in enumerate(ops) if o.startswith("HMMA"))
                loads = sum(o.startswith("LDG.E.U16") for o in ops[:first])
                assert loads >= 1 + int(G), f"{name}: {loads} 16-bit global loads before the first HMMA"
        else:
            # The backwards: the next step's inputs (at least the 4 saved gates and grad_hs) loaded
            # between the grid barrier's atomic and the product's first HMMA.
            barrier = next(i for i, o in enumerate(ops) if o.startswith("ATOM"))
            first = next(i for i, o in enumerate(ops) if i > barrier and o.startswith("HMMA"))
            loads = sum(o.startswith("LDG") for o in ops[barrier:first])
            assert loads >= 5, f"{name}: {loads} global loads between the grid barrier and the product"
    print("SASS: every kernel has HMMA.16816.F32 tensor-core MMAs, no LDL / STL; cluster barriers in the "
          "cluster backwards; the tagged forwards without a barrier or fence; the step inputs loaded "
          "ahead of the product")


def test_bindings_syntax(tmp_path):
    """Syntax-only compile of bindings.cpp (see the module docstring for what it covers)."""
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++ / c++ / $CXX) found")
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("CUDA toolkit headers (cuda_runtime.h) not found")
    torch_incs = [Path(p) for p in cpp_extension.include_paths()]
    if not any((p / "c10" / "cuda" / "CUDAStream.h").is_file() for p in torch_incs):
        pytest.skip("this torch install ships no c10/cuda headers")

    include_flags: List[str] = []
    shim_note = ""
    if not any((p / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for p in torch_incs):
        # Generated only by CUDA builds of torch (see the module docstring).
        shim = tmp_path / "shim"
        (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
        (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        include_flags += ["-isystem", str(shim)]
        shim_note = "stand-in c10/cuda/impl/cuda_cmake_macros.h used (CPU-only torch wheel)"
    for p in torch_incs:
        include_flags += ["-isystem", str(p)]
    include_flags += ["-isystem", str(cuda_inc)]

    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           *include_flags, str(CUDA_DIR / "bindings.cpp")]
    proc = _run(cmd, tmp_path)
    if shim_note:
        print(shim_note)
    assert proc.returncode == 0, "host compiler failed\n" + _report(cmd, proc)
    warnings = [ln for ln in proc.stderr.splitlines() if "warning:" in ln and str(CUDA_DIR) in ln]
    assert not warnings, "warnings in bindings.cpp\n" + "\n".join(warnings)


# ------------------------------------------------------------------------------------------------
# Host emulation: the kernels' arithmetic and the ATen glue against the reference (no GPU).

_EMU_NAME = "fastseq_cuda_emu"
_EMU_DEFINES = ["-DFASTSEQ_CUDA_HOST_EMULATION", f"-DFASTSEQ_CPP_LIBRARY={_EMU_NAME}", *TORCH_NVCC_DEFINES[:3]]
# The decoder loops (device-generic C++, csrc/cpu/decode.cpp) built into the emulated library too:
# their steps then run the emulated CUDA kernels.
_EMU_CPU_SOURCES = [CUDA_DIR.parent / "cpu" / "decode.cpp"]


def _emu_build_dir(extra: List[str]) -> Path:
    import torch

    h = hashlib.sha256()
    for p in sorted(CUDA_DIR.rglob("*")) + sorted(CUDA_DIR.parent.glob("cpu/*.h")) + _EMU_CPU_SOURCES:
        if p.is_file():
            h.update(str(p.relative_to(CUDA_DIR.parent)).encode())
            h.update(p.read_bytes())
    h.update(repr((extra, torch.__version__, os.environ.get("CXX", ""))).encode())
    return Path(tempfile.gettempdir()) / f"fastseq-cuda-emu-{h.hexdigest()[:16]}"


@functools.lru_cache(maxsize=None)
def _emu_ops():
    """Build (or reuse) and load the emulated library once per process; None + reason if impossible."""
    import torch
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX") or "g++") is None and shutil.which("c++") is None:
        return None, "no host C++ compiler"
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        return None, "CUDA toolkit headers (cuda_runtime.h, cuda_fp16.h) not found"
    cflags = ["-O1", "-pthread", *_EMU_DEFINES]
    bdir = _emu_build_dir(cflags + [str(cuda_inc)])
    bdir.mkdir(parents=True, exist_ok=True)
    sources = [str(CUDA_DIR / "bindings.cpp")] + [str(p) for p in _EMU_CPU_SOURCES]
    for cu in CU_FILES:  # the .cu files, compiled as C++ by the host compiler
        wrapper = bdir / f"emu_{cu.stem}.cpp"
        text = f'#include "{cu}"\n'
        if not wrapper.is_file() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    if not hasattr(torch.ops, _EMU_NAME) or not hasattr(getattr(torch.ops, _EMU_NAME), "gru_recurrence_forward"):
        cpp_extension.load(name=_EMU_NAME, sources=sources, extra_cflags=cflags, extra_ldflags=["-pthread"],
                           extra_include_paths=[str(cuda_inc), str(CUDA_DIR)], build_directory=str(bdir),
                           is_python_module=False, verbose=False)
    return getattr(torch.ops, _EMU_NAME), ""


@pytest.fixture(scope="module")
def emu():
    ops, why = _emu_ops()
    if ops is None:
        pytest.skip(why)
    return ops


_DTYPES = ("float32", "float64", "float16", "bfloat16")


def _close(got, want, dt_name, what):
    import torch
    from parity import assert_close

    if want.shape == (0,):  # an absent output: an empty [0] tensor in every backend
        assert got.shape == (0,), f"{what}: expected an empty [0] tensor, got {tuple(got.shape)}"
        return
    assert_close(got, want, getattr(torch, dt_name), what)


def _all_close(got, want, dt_name, what):
    assert len(got) == len(want), f"{what}: {len(got)} outputs, reference {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        _close(g, w, dt_name, f"{what}[{i}]")


@pytest.mark.slow
@pytest.mark.parametrize("dt_name", _DTYPES)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_emulated_recurrences(emu, cell, dt_name):
    import torch
    from fastseq.ops.recurrence import naive as R

    dt = getattr(torch, dt_name)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dt)

    T, B, H = 5, 4, 7
    G = 3 if cell == "gru" else 4
    for bias in (True, False):
        for lengths in (torch.tensor([5, 2, 0, 3]), torch.tensor([5, 5, 1, 4], dtype=torch.int32), None):
            for save in (True, False):
                # gi as a slice of a wider product (row stride > G*H): strided input path.
                gi = rnd(T, B, G * H + 3)[:, :, 3:]
                h0, c0 = rnd(B, H), rnd(B, H)
                w = rnd(G * H, H, scale=0.4)
                b = rnd(G * H) if bias else None
                tag = f"{cell} {dt_name} bias={bias} lengths={lengths is not None} save={save}"
                if cell == "gru":
                    got = emu.gru_recurrence_forward(gi, h0, w, b, lengths, save)
                    want = R.gru_recurrence_forward(gi, h0, w, b, lengths, save)
                else:
                    got = emu.lstm_recurrence_forward(gi, h0, c0, w, b, lengths, save)
                    want = R.lstm_recurrence_forward(gi, h0, c0, w, b, lengths, save)
                _all_close(got, want, dt_name, f"forward {tag}")
                if not save:
                    continue
                grad_hs = rnd(T, B, H)
                if cell == "gru":
                    hs, gates = want
                    got = emu.gru_recurrence_backward(grad_hs, h0, w, hs, gates, lengths, bias)
                    want = R.gru_recurrence_backward(grad_hs, h0, w, hs, gates, lengths, bias)
                else:
                    hs, cs, gates = want
                    grad_cs = rnd(T, B, H)
                    got = emu.lstm_recurrence_backward(grad_hs, grad_cs, h0, c0, w, hs, cs, gates, lengths, bias)
                    want = R.lstm_recurrence_backward(grad_hs, grad_cs, h0, c0, w, hs, cs, gates, lengths, bias)
                _all_close(got, want, dt_name, f"backward {tag}")


# ------------------------------------------------------------------------------------------------
# The persistent forward (csrc/cuda/persistent_kernels.cu): one cooperative launch for all T steps,
# forced with FASTSEQ_CUDA_PERSISTENT=1 (under the emulation "auto" is the per-step loop). The
# emulated cooperative launch runs all blocks at once with a real grid barrier
# (csrc/cuda/emu/host_emulation.h); the emulated device has 8 SMs, so at most 8 blocks.

def _persistent_case(cell, dt, gen, T, B, H, bias, lengths):
    import torch

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dt)

    G = 3 if cell == "gru" else 4
    gi = rnd(T, B, G * H + 3)[:, :, 3:]  # a column slice: rows G*H + 3 apart
    return gi, rnd(B, H), rnd(B, H), rnd(G * H, H, scale=0.4), (rnd(G * H) if bias else None), lengths


def _persistent_forward(emu, cell, case, save):
    gi, h0, c0, w, b, lengths = case
    if cell == "gru":
        return emu.gru_recurrence_forward(gi, h0, w, b, lengths, save)
    return emu.lstm_recurrence_forward(gi, h0, c0, w, b, lengths, save)


def _reference_forward(cell, case, save):
    from fastseq.ops.recurrence import naive as R

    gi, h0, c0, w, b, lengths = case
    if cell == "gru":
        return R.gru_recurrence_forward(gi, h0, w, b, lengths, save)
    return R.lstm_recurrence_forward(gi, h0, c0, w, b, lengths, save)


@pytest.mark.slow
@pytest.mark.parametrize("dt_name", _DTYPES)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_emulated_persistent_forward(emu, cell, dt_name, monkeypatch):
    """The persistent forward against the reference: grids of 1 block, of fewer blocks than
    units (several units per block), of blocks that own no unit (6 and 8 blocks for H = 7 and
    5), a batch staged in two tiles (H = 80 on one block: 4 rows per tile, B = 6); lengths
    unsorted with 1 and 0, bias or not, save_gates both, T = 1 and T = 5. Every launch must
    cross exactly T - 1 grid barriers."""
    import torch

    dt = getattr(torch, dt_name)
    gen = torch.Generator().manual_seed(5)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "1")
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_MMA", "0")  # the shared-memory kernel (the next test: MMA)
    half = dt_name in ("float16", "bfloat16")  # the same code as float32 but the conversions: fewer cases
    grids = [(1, 7), (3, 7), (6, 7), (8, 5), (1, 80)] if not half else [(3, 7), (8, 5)]
    lengths_cases = (torch.tensor([3, 5, 1, 4, 2, 5]), torch.tensor([5, 1, 5, 0, 2, 2], dtype=torch.int32), None)
    B = 6
    for k, (blocks, H) in enumerate(grids):
        monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", str(blocks))
        for T in (5, 1):
            for i, lengths in enumerate(lengths_cases):
                bias = (i + k) % 2 == 0
                case = _persistent_case(cell, dt, gen, T, B, H, bias, lengths)
                for save in (True, False):
                    tag = (f"{cell} {dt_name} blocks={blocks} H={H} T={T} bias={bias} "
                           f"lengths={None if lengths is None else lengths.tolist()} save={save}")
                    before = emu.emulated_grid_syncs()
                    got = _persistent_forward(emu, cell, case, save)
                    assert emu.emulated_grid_syncs() - before == T - 1, f"{tag}: grid barriers crossed"
                    _all_close(got, _reference_forward(cell, case, save), dt_name, f"persistent forward {tag}")


# (blocks or None for the default, H, B): one block; three; blocks that own no unit; two 16-row
# batch tiles and two 16-row W tiles (units 7: 21 / 28 rows); 24 blocks with two k-tiles per warp
# (H = 136: 9 k-tiles over 8 warps), 23 of them owning units.
_MMA_GRIDS = ((None, 7, 6), (3, 7, 6), (8, 5, 6), (5, 33, 20), (24, 136, 4))


@pytest.mark.slow
@pytest.mark.parametrize("dt_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_emulated_persistent_mma_forward(emu, cell, dt_name, monkeypatch):
    """The tensor-core persistent forward (csrc/cuda/persistent_mma_kernels.cu: W_hh in
    registers as wmma fragments, the emulation's stand-in of nvcuda::wmma) against the
    reference, at the grids of _MMA_GRIDS, lengths with 0 and 1 or none, bias or not,
    save_gates both, T = 5 and 1. Every launch must cross T - 1 grid barriers and run exactly
    T * blocks * k_tiles * m_tiles * ceil(B / 16) warp MMAs (so the plan's tiles are the
    ones described in kernels.h, and no launch fell back to the shared-memory kernel), with no
    shared-memory bank conflict (test_emulated_smem_bank_model's model)."""
    import torch

    dt = getattr(torch, dt_name)
    gen = torch.Generator().manual_seed(11)
    G = 3 if cell == "gru" else 4
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "1")
    monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_MMA", raising=False)
    for k, (blocks, H, B) in enumerate(_MMA_GRIDS):
        if blocks is None:
            monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", raising=False)
        else:
            monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", str(blocks))
        units = -(-H // blocks) if blocks else min(H, 32 // G)
        n_blocks = blocks or -(-H // units)
        lengths_cases = (torch.tensor([3, 5, 1, 4, 2, 5, 0, 2, 4, 4, 1, 3, 5, 5, 2, 1, 3, 4, 5, 2][:B]), None)
        for T in ((5, 1) if H < 100 else (3,)):
            for i, lengths in enumerate(lengths_cases):
                bias = (i + k) % 2 == 0
                case = _persistent_case(cell, dt, gen, T, B, H, bias, lengths)
                for save in ((True, False) if H < 100 else (True,)):
                    tag = (f"{cell} {dt_name} blocks={blocks} H={H} B={B} T={T} bias={bias} "
                           f"lengths={lengths is not None} save={save}")
                    syncs, mmas = emu.emulated_grid_syncs(), emu.emulated_mma_count()
                    emu.emulated_take_smem_conflict_ways()
                    got = _persistent_forward(emu, cell, case, save)
                    assert emu.emulated_take_smem_conflict_ways() == 1, f"{tag}: shared-memory bank conflicts"
                    assert emu.emulated_grid_syncs() - syncs == T - 1, f"{tag}: grid barriers crossed"
                    want_mmas = T * n_blocks * (-(-H // 16)) * (-(-G * units // 16)) * (-(-B // 16))
                    assert emu.emulated_mma_count() - mmas == want_mmas, f"{tag}: warp MMAs"
                    _all_close(got, _reference_forward(cell, case, save), dt_name, f"mma persistent forward {tag}")


# (blocks or None, H, B): _MMA_GRIDS, then B 40 split into two row tiles of 32 (the tagged exchange
# keeps blocks of at most 32 / G units there).
_MMA_TAGGED_GRIDS = _MMA_GRIDS + ((None, 40, 40),)


@pytest.mark.slow
@pytest.mark.parametrize("dt_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_emulated_persistent_mma_forward_tagged(emu, cell, dt_name, monkeypatch):
    """The tensor-core forward with the tagged exchange (FASTSEQ_CUDA_PERSISTENT_SYNC=tagged: h_t
    as 32-bit words carrying their step, no grid barrier) at the grids of _MMA_TAGGED_GRIDS,
    lengths with 0 or none, bias or not, T = 4 and 1: the launched plan is the tagged one
    (emulated_last_mma_plan) with blocks of at most 32 / G units and none without a unit (8 blocks
    asked for H 5 give 5: a block that only reads would not be waited for), no grid barrier is crossed,
    the warp MMAs are the grid-barrier kernel's (T * blocks per tile * k_tiles * m_tiles * ceil(B / 16)),
    no shared-memory bank conflict (the staging tiles included), and every output equals the
    grid-barrier kernel's bit for bit (same operands, same order) and so the reference's within
    the dtype's bounds. Without the barriers (FASTSEQ_CUDA_EMU_GRID_SYNC=off: the blocks in turn,
    a wait for another block's words gives up) a grid of several blocks differs from the
    reference, so the check can fail."""
    import torch

    dt = getattr(torch, dt_name)
    gen = torch.Generator().manual_seed(23)
    G = 3 if cell == "gru" else 4
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "1")
    monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_MMA", raising=False)
    monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_ROW_TILES", raising=False)
    for k, (blocks, H, B) in enumerate(_MMA_TAGGED_GRIDS):
        if blocks is None:
            monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", raising=False)
        else:
            monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", str(blocks))
        lengths_cases = (torch.tensor([3, 4, 1, 4, 2, 4, 0, 2, 4, 4, 1, 3, 4, 4, 2, 1, 3, 4, 4, 2] * 2)[:B], None)
        if H >= 100:  # 24 blocks of 256 emulated threads polling: seconds per launch
            lengths_cases = (None,)
        for T in ((4, 1) if H < 100 else (3,)):
            for i, lengths in enumerate(lengths_cases):
                bias = (i + k) % 2 == 0
                case = _persistent_case(cell, dt, gen, T, B, H, bias, lengths)
                tag = f"{cell} {dt_name} blocks={blocks} H={H} B={B} T={T} bias={bias} lengths={lengths is not None}"
                monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_SYNC", raising=False)
                grid_out = _persistent_forward(emu, cell, case, True)
                monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_SYNC", "tagged")
                syncs, mmas = emu.emulated_grid_syncs(), emu.emulated_mma_count()
                emu.emulated_take_smem_conflict_ways()
                got = _persistent_forward(emu, cell, case, True)
                assert emu.emulated_take_smem_conflict_ways() == 1, f"{tag}: shared-memory bank conflicts"
                assert emu.emulated_grid_syncs() == syncs, f"{tag}: a grid barrier in the tagged kernel"
                nblk, units, rows, m_tiles, _, _, tiles, tagged = emu.emulated_last_mma_plan()
                assert tagged == 1 and G * units <= 32 and m_tiles <= 2, f"{tag}: plan"
                assert nblk == tiles * -(-H // units), f"{tag}: a block without a unit (the tagged plan drops them)"
                want_mmas = T * (nblk // tiles) * (-(-H // 16)) * m_tiles * (-(-B // 16))  # each tile's rows once
                assert emu.emulated_mma_count() - mmas == want_mmas, f"{tag}: warp MMAs"
                for n, (a, b) in enumerate(zip(got, grid_out)):
                    assert torch.equal(a, b), f"{tag}: output {n} differs from the grid-barrier kernel's"
                _all_close(got, _reference_forward(cell, case, True), dt_name, f"tagged persistent forward {tag}")
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", "3")
    monkeypatch.setenv("FASTSEQ_CUDA_EMU_GRID_SYNC", "off")
    case = _persistent_case(cell, dt, gen, 4, 6, 7, True, None)
    with pytest.raises(AssertionError):
        _all_close(_persistent_forward(emu, cell, case, True), _reference_forward(cell, case, True), dt_name,
                   "tagged forward without waiting")


def test_emulated_persistent_sync_setting(emu, monkeypatch):
    """FASTSEQ_CUDA_PERSISTENT_SYNC takes grid or tagged; anything else raises naming it."""
    import torch

    gen = torch.Generator().manual_seed(24)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "1")
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_SYNC", "barrier")
    case = _persistent_case("gru", torch.bfloat16, gen, 2, 3, 5, False, None)
    with pytest.raises(RuntimeError, match="FASTSEQ_CUDA_PERSISTENT_SYNC: expected grid or tagged, got 'barrier'"):
        _persistent_forward(emu, "gru", case, True)


# (blocks per tile or None, FASTSEQ_CUDA_PERSISTENT_ROW_TILES or None, H, B, expected row tiles, rows
# per tile): B 40 (48 padded rows) split by default into 2 tiles of 32 (the second with 8 real
# rows), blocks of up to 64 / G units (4 W tiles); 3 tiles asked of B 20 (2 tiles of 16: no empty
# tile); 2 asked of B 6 (one tile of 16, blocks of up to 64 / G units: 3 W tiles of 11 units);
# B 64 split by default into 2 tiles of 32 at H 136 (two k-tiles per warp); one tile of B 72 asked
# (80 padded rows, one block of 16 units: 1,152 elements for 256 threads, past the 3 per thread whose
# inputs the kernel loads before the product).
_MMA_ROW_TILE_GRIDS = ((None, None, 40, 40, 2, 32), (None, "3", 20, 20, 2, 16), (3, "2", 33, 6, 1, 16),
                       (None, None, 136, 64, 2, 32), (None, "1", 16, 72, 1, 80))


@pytest.mark.slow
@pytest.mark.parametrize("dt_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_emulated_persistent_mma_forward_row_tiles(emu, cell, dt_name, monkeypatch):
    """The tensor-core forward with the batch split into row tiles (each block reads only its
    tile's rows of h_{t-1}; blocks of up to 64 / G units, 3-4 W tiles) against the reference,
    at the grids of _MMA_ROW_TILE_GRIDS, lengths with 0 or none, bias or not, T = 3 and 1: the
    launched plan's row tiles, rows per tile and units (emulated_last_mma_plan), T - 1 grid
    barriers, exactly T * (blocks per tile) * k_tiles * m_tiles * ceil(B / 16) warp MMAs (each
    tile's rows once), no shared-memory bank conflict."""
    import torch

    dt = getattr(torch, dt_name)
    gen = torch.Generator().manual_seed(21)
    G = 3 if cell == "gru" else 4
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "1")
    monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_MMA", raising=False)
    for k, (blocks, row_tiles, H, B, want_tiles, want_rows) in enumerate(_MMA_ROW_TILE_GRIDS):
        for var, value in (("FASTSEQ_CUDA_PERSISTENT_BLOCKS", blocks), ("FASTSEQ_CUDA_PERSISTENT_ROW_TILES", row_tiles)):
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, str(value))
        max_units = 64 // G
        per_tile = blocks or -(-H // -(-H // -(-H // max_units)))
        units = -(-H // per_tile)
        lengths_cases = (torch.tensor([3, 1, 0, 2, 3] * 15)[:B], None)
        for T in (3, 1):
            for i, lengths in enumerate(lengths_cases):
                bias = (i + k) % 2 == 0
                case = _persistent_case(cell, dt, gen, T, B, H, bias, lengths)
                tag = f"{cell} {dt_name} blocks={blocks} row_tiles={row_tiles} H={H} B={B} T={T} bias={bias}"
                syncs, mmas = emu.emulated_grid_syncs(), emu.emulated_mma_count()
                emu.emulated_take_smem_conflict_ways()
                got = _persistent_forward(emu, cell, case, True)
                assert emu.emulated_take_smem_conflict_ways() == 1, f"{tag}: shared-memory bank conflicts"
                nblk, got_units, rows, m_tiles, _, _, tiles, _ = emu.emulated_last_mma_plan()
                assert (tiles, rows, got_units) == (want_tiles, want_rows, units), f"{tag}: plan"
                assert nblk == tiles * per_tile and m_tiles == -(-G * units // 16), f"{tag}: plan"
                assert emu.emulated_grid_syncs() - syncs == T - 1, f"{tag}: grid barriers crossed"
                want_mmas = T * per_tile * (-(-H // 16)) * m_tiles * (-(-B // 16))
                assert emu.emulated_mma_count() - mmas == want_mmas, f"{tag}: warp MMAs"
                _all_close(got, _reference_forward(cell, case, True), dt_name, f"row-tiled mma forward {tag}")


@pytest.mark.slow
def test_emulated_persistent_mma_choice(emu, monkeypatch):
    """Which persistent forward runs, and that the tests can fail: FASTSEQ_CUDA_PERSISTENT_MMA=0,
    float32 and a block of more than 32 / G units (LSTM, 2 blocks for H = 40) take the
    shared-memory kernel (no MMA, still correct); a bad value raises naming the variable; without
    the grid barrier (FASTSEQ_CUDA_EMU_GRID_SYNC=off) a 3-block forward differs from the reference."""
    import torch

    gen = torch.Generator().manual_seed(12)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "1")
    for blocks, H, dt, mma_env in ((3, 7, torch.bfloat16, "0"), (3, 7, torch.float32, None),
                                   (2, 40, torch.bfloat16, None)):
        monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", str(blocks))
        if mma_env is None:
            monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_MMA", raising=False)
        else:
            monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_MMA", mma_env)
        case = _persistent_case("lstm", dt, gen, 4, 5, H, True, None)
        syncs, mmas = emu.emulated_grid_syncs(), emu.emulated_mma_count()
        got = _persistent_forward(emu, "lstm", case, True)
        tag = f"blocks={blocks} H={H} {dt} FASTSEQ_CUDA_PERSISTENT_MMA={mma_env}"
        assert emu.emulated_grid_syncs() - syncs == 3, f"{tag}: not the persistent kernel"
        assert emu.emulated_mma_count() == mmas, f"{tag}: ran the tensor-core kernel"
        _all_close(got, _reference_forward("lstm", case, True), str(dt).split(".")[1], tag)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_MMA", "yes")
    with pytest.raises(RuntimeError, match="FASTSEQ_CUDA_PERSISTENT_MMA"):
        _persistent_forward(emu, "lstm", case, True)
    monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_MMA")
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", "3")
    monkeypatch.setenv("FASTSEQ_CUDA_EMU_GRID_SYNC", "off")
    case = _persistent_case("gru", torch.bfloat16, gen, 5, 4, 7, True, None)
    mmas = emu.emulated_mma_count()
    got = _persistent_forward(emu, "gru", case, True)
    assert emu.emulated_mma_count() > mmas
    with pytest.raises(AssertionError):
        _all_close(got, _reference_forward("gru", case, True), "bfloat16", "without a grid barrier")


def _persistent_backward(ops, cell, case, fwd, grads, bias):
    gi, h0, c0, w, b, lengths = case
    if cell == "gru":
        hs, gates = fwd
        return ops.gru_recurrence_backward(grads[0], h0, w, hs, gates, lengths, bias)
    hs, cs, gates = fwd
    return ops.lstm_recurrence_backward(grads[0], grads[1], h0, c0, w, hs, cs, gates, lengths, bias)


@pytest.mark.slow
@pytest.mark.parametrize("dt_name", _DTYPES)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_emulated_persistent_backward(emu, cell, dt_name, monkeypatch):
    """The persistent backward against the reference backward (on the reference forward's
    outputs), with the grids, lengths, bias and T of the forward test; a batch in two tiles
    of dG rows (H = 40 on one block: 7 rows per tile, B = 9). Every launch must cross exactly
    T grid barriers (one per step, between the gate gradients and the recurrent product)."""
    import torch
    from fastseq.ops.recurrence import naive as R

    dt = getattr(torch, dt_name)
    gen = torch.Generator().manual_seed(8)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "1")
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_MMA", "0")  # the shared-memory kernel (the next test: MMA)
    half = dt_name in ("float16", "bfloat16")
    grids = [(1, 7, 6), (3, 7, 6), (6, 7, 6), (8, 5, 6), (1, 40, 9)] if not half else [(3, 7, 6), (8, 5, 6)]
    for k, (blocks, H, B) in enumerate(grids):
        monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", str(blocks))
        lengths_cases = (torch.tensor([3, 5, 1, 4, 2, 5, 1, 2, 3][:B]),
                         torch.tensor([5, 1, 5, 0, 2, 2, 4, 4, 1][:B], dtype=torch.int32), None)
        for T in (5, 1):
            for i, lengths in enumerate(lengths_cases):
                bias = (i + k) % 2 == 0
                case = _persistent_case(cell, dt, gen, T, B, H, bias, lengths)
                fwd = _reference_forward(cell, case, True)
                grads = [(torch.randn(T, B, H, generator=gen)).to(dt) for _ in range(2)]
                tag = (f"{cell} {dt_name} blocks={blocks} H={H} B={B} T={T} bias={bias} "
                       f"lengths={None if lengths is None else lengths.tolist()}")
                before = emu.emulated_grid_syncs()
                got = _persistent_backward(emu, cell, case, fwd, grads, bias)
                assert emu.emulated_grid_syncs() - before == T, f"{tag}: grid barriers crossed"
                _all_close(got, _persistent_backward(R, cell, case, fwd, grads, bias), dt_name,
                           f"persistent backward {tag}")


def test_emulated_smem_bank_model(emu):
    """emu/host_emulation.h's bank-conflict model, on its own: a 16-bit fragment load whose rows
    are a multiple of 128 bytes apart reads its 8-row phases from one bank quad (8 ways), rows 16
    bytes further apart are conflict-free; a float accumulator store with rows a multiple of 128
    bytes apart puts a half-warp's 4 rows in the same banks (4 ways), 32 bytes further apart none.
    The pitches are the kernels' (persistent_mma_kernels.cu: operand_pitch, partial_pitch) before
    and after the padding."""
    for pitch, ways in ((64, 8), (3072, 8), (32, 4), (16, 2), (72, 1), (3080, 1), (24, 1)):
        assert emu.emulated_smem_ways_at_pitch(pitch, False) == ways, f"16-bit fragment, pitch {pitch}"
    for pitch, ways in ((64, 4), (16, 2), (32, 4), (72, 1), (24, 1), (40, 1)):
        assert emu.emulated_smem_ways_at_pitch(pitch, True) == ways, f"accumulator store, pitch {pitch}"


# (blocks or None for the default, H, B): the default grid (16-unit blocks: H = 40 -> 3 blocks, the
# last with 8 units); one block of 7 units; blocks that own no unit; 2 W^T tiles (20 units, one
# block) with two 16-row batch tiles; 7-unit blocks with two k-tiles per warp (K = G * H = 135 / 180
# -> 9 / 12 k-tiles over 8 warps) and one with 3 (LSTM H = 100 on 4 blocks: 25 k-tiles); one block
# of 16 units for B 72 (1,152 elements for 256 threads, past the 4 per thread whose inputs the
# kernel loads during the previous step's product).
_MMA_BWD_GRIDS = ((None, 40, 6), (1, 7, 6), (8, 5, 6), (1, 20, 20), (7, 45, 4), (4, 100, 3), (1, 16, 72))


@pytest.mark.slow
@pytest.mark.parametrize("dt_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_emulated_persistent_mma_backward(emu, cell, dt_name, monkeypatch):
    """The tensor-core persistent backward (csrc/cuda/persistent_mma_kernels.cu: W_hh^T in
    shared memory, dG[t] in the storage dtype, the emulation's wmma) against the reference
    backward on the reference forward's outputs, at the grids of _MMA_BWD_GRIDS, lengths with
    0 and 1 or none, bias or not, T = 4 and 1. Every launch must cross T grid barriers and run
    exactly T * (blocks that own units) * ceil(G * H / 16) * ceil(units / 16) * ceil(B / 16)
    warp MMAs (the tiles of kernels.h; no fallback to the shared-memory kernel), with no
    shared-memory bank conflict (test_emulated_smem_bank_model's model)."""
    import torch
    from fastseq.ops.recurrence import naive as R

    dt = getattr(torch, dt_name)
    gen = torch.Generator().manual_seed(13)
    G = 3 if cell == "gru" else 4
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "1")
    monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_MMA", raising=False)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_CLUSTER", "0")  # the block kernel (the next test: clusters)
    for k, (blocks, H, B) in enumerate(_MMA_BWD_GRIDS):
        if blocks is None:
            monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", raising=False)
        else:
            monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", str(blocks))
        units = -(-H // blocks) if blocks else min(H, 16)
        owning = -(-H // units)
        lengths_cases = (torch.tensor([3, 4, 1, 4, 2, 0, 1, 2, 3, 4, 4, 1, 3, 2, 2, 1, 3, 4, 4, 2] * 4)[:B], None)
        for T in (4, 1):
            for i, lengths in enumerate(lengths_cases):
                bias = (i + k) % 2 == 0
                case = _persistent_case(cell, dt, gen, T, B, H, bias, lengths)
                fwd = _reference_forward(cell, case, True)
                grads = [(torch.randn(T, B, H, generator=gen)).to(dt) for _ in range(2)]
                tag = (f"{cell} {dt_name} blocks={blocks} H={H} B={B} T={T} bias={bias} "
                       f"lengths={lengths is not None}")
                syncs, mmas = emu.emulated_grid_syncs(), emu.emulated_mma_count()
                emu.emulated_take_smem_conflict_ways()
                got = _persistent_backward(emu, cell, case, fwd, grads, bias)
                assert emu.emulated_take_smem_conflict_ways() == 1, f"{tag}: shared-memory bank conflicts"
                assert emu.emulated_grid_syncs() - syncs == T, f"{tag}: grid barriers crossed"
                want_mmas = T * owning * (-(-G * H // 16)) * (-(-units // 16)) * (-(-B // 16))
                assert emu.emulated_mma_count() - mmas == want_mmas, f"{tag}: warp MMAs"
                _all_close(got, _persistent_backward(R, cell, case, fwd, grads, bias), dt_name,
                           f"mma persistent backward {tag}")
    # It can fail: without the grid barrier, blocks read dG[t] before the others wrote it.
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", "3")
    monkeypatch.setenv("FASTSEQ_CUDA_EMU_GRID_SYNC", "off")
    case = _persistent_case(cell, dt, gen, 4, 5, 20, True, None)
    fwd = _reference_forward(cell, case, True)
    grads = [(torch.randn(4, 5, 20, generator=gen)).to(dt) for _ in range(2)]
    mmas = emu.emulated_mma_count()
    got = _persistent_backward(emu, cell, case, fwd, grads, True)
    assert emu.emulated_mma_count() > mmas
    with pytest.raises(AssertionError):
        _all_close(got, _persistent_backward(R, cell, case, fwd, grads, True), dt_name, "without a grid barrier")


# (blocks or None for the default, FASTSEQ_CUDA_PERSISTENT_CLUSTER, H, B, expected cluster size):
# the default grid, auto (H = 40: 3 blocks of 16 -> clusters of 2, a 4th block without units);
# auto at 9 blocks of 15 units -> clusters of 8 (120 columns, 8 m-tiles: one per warp, no K split
# among warps) with two batch tiles; 3-unit blocks in a cluster of 4 asked for by name (K = 21 /
# 28: 2 k-tiles, so ranks 2 and 3 hold none; 8 warps split each rank's tile); 7 blocks of 15
# units in clusters of 2 (K = 300 / 400: 19 / 25 k-tiles, odd splits); one block of 5 units in a
# cluster of 8 (7 blocks without units, 3 m-tiles: 2 of the 8 warps idle); 2 blocks of 16 units
# in a cluster of 2 for B 72 (1,152 elements per block, past the 4 per thread prefetched).
_MMA_CLUSTER_GRIDS = ((None, "auto", 40, 6, 2), (None, None, 130, 20, 8), (3, "4", 7, 6, 4),
                      (7, "2", 100, 3, 2), (1, "8", 5, 4, 8), (2, "2", 32, 72, 2))


@pytest.mark.slow
@pytest.mark.parametrize("dt_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_emulated_persistent_mma_cluster_backward(emu, cell, dt_name, monkeypatch):
    """The cluster backward (persistent_mma_kernels.cu: the product split along K = G*H inside
    thread-block clusters, partial sums summed through distributed shared memory) against the
    reference backward, at the grids of _MMA_CLUSTER_GRIDS, lengths with 0 and 1 or none, bias or
    not, T = 3 and 1. Every launch must cross T grid barriers and T + 1 barriers per cluster, and
    run exactly T * clusters * ceil(cluster * units / 16) * ceil(G * H / 16) * ceil(B / 16) warp
    MMAs (each cluster's tiles once, whatever the split among its ranks and warps), with no
    shared-memory bank conflict (test_emulated_smem_bank_model's model)."""
    import torch
    from fastseq.ops.recurrence import naive as R

    dt = getattr(torch, dt_name)
    gen = torch.Generator().manual_seed(17)
    G = 3 if cell == "gru" else 4
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "1")
    monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_MMA", raising=False)
    for k, (blocks, cluster, H, B, size) in enumerate(_MMA_CLUSTER_GRIDS):
        for var, value in (("FASTSEQ_CUDA_PERSISTENT_BLOCKS", blocks), ("FASTSEQ_CUDA_PERSISTENT_CLUSTER", cluster)):
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, str(value))
        units = -(-H // blocks) if blocks else -(-H // -(-H // 16))
        grid = -(-(blocks or -(-H // units)) // size) * size
        clusters = grid // size
        lengths_cases = (torch.tensor([3, 1, 0, 2, 3, 1, 2, 3, 3, 1, 2, 0, 3, 2, 1, 1, 3, 2, 3, 2] * 4)[:B], None)
        for T in (3, 1):
            for i, lengths in enumerate(lengths_cases):
                bias = (i + k) % 2 == 0
                case = _persistent_case(cell, dt, gen, T, B, H, bias, lengths)
                fwd = _reference_forward(cell, case, True)
                grads = [(torch.randn(T, B, H, generator=gen)).to(dt) for _ in range(2)]
                tag = (f"{cell} {dt_name} blocks={blocks} cluster={cluster} H={H} B={B} T={T} bias={bias} "
                       f"lengths={lengths is not None}")
                syncs, csyncs = emu.emulated_grid_syncs(), emu.emulated_cluster_syncs()
                mmas = emu.emulated_mma_count()
                emu.emulated_take_smem_conflict_ways()
                got = _persistent_backward(emu, cell, case, fwd, grads, bias)
                assert emu.emulated_take_smem_conflict_ways() == 1, f"{tag}: shared-memory bank conflicts"
                assert emu.emulated_grid_syncs() - syncs == T, f"{tag}: grid barriers crossed"
                assert emu.emulated_cluster_syncs() - csyncs == clusters * (T + 1), f"{tag}: cluster barriers"
                want_mmas = T * clusters * (-(-size * units // 16)) * (-(-G * H // 16)) * (-(-B // 16))
                assert emu.emulated_mma_count() - mmas == want_mmas, f"{tag}: warp MMAs"
                _all_close(got, _persistent_backward(R, cell, case, fwd, grads, bias), dt_name,
                           f"cluster persistent backward {tag}")


@pytest.mark.slow
def test_emulated_persistent_mma_cluster_choice(emu, monkeypatch):
    """Which backward runs, and that the cluster test can fail: one block (auto) takes the block
    kernel (no cluster barrier, its MMA count); a cluster size asked for by name that does not
    apply (8 x 20 units > 128 columns) raises under FASTSEQ_CUDA_PERSISTENT=1 naming the reason, a
    value other than auto / 0 / 2 / 4 / 8 naming the variable; 4 blocks of 5 units in a cluster of 4
    match the reference; a refused cluster launch (FASTSEQ_CUDA_EMU_CLUSTER_LAUNCH=fail) raises for
    a size asked for by name and falls back to the block kernel on auto; without the barriers (FASTSEQ_CUDA_EMU_GRID_SYNC=off: the
    blocks in turn) a clustered backward differs from the reference."""
    import torch
    from fastseq.ops.recurrence import naive as R

    gen = torch.Generator().manual_seed(18)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "1")
    monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_MMA", raising=False)
    monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_CLUSTER", raising=False)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", "1")
    case = _persistent_case("lstm", torch.bfloat16, gen, 3, 5, 7, True, None)
    fwd = _reference_forward("lstm", case, True)
    grads = [torch.randn(3, 5, 7, generator=gen).to(torch.bfloat16) for _ in range(2)]
    want = _persistent_backward(R, "lstm", case, fwd, grads, True)
    csyncs, mmas = emu.emulated_cluster_syncs(), emu.emulated_mma_count()
    _all_close(_persistent_backward(emu, "lstm", case, fwd, grads, True), want, "bfloat16", "one block, auto")
    assert emu.emulated_cluster_syncs() == csyncs, "one block ran the cluster kernel"
    assert emu.emulated_mma_count() - mmas == 3 * 1 * 2 * 1, "the block kernel's MMAs"  # T, blocks, k-tiles, rows
    big = _persistent_case("lstm", torch.bfloat16, gen, 2, 3, 20, True, None)
    big_fwd = _reference_forward("lstm", big, True)
    big_grads = [torch.randn(2, 3, 20, generator=gen).to(torch.bfloat16) for _ in range(2)]
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_CLUSTER", "8")
    with pytest.raises(RuntimeError, match="128 W_hh columns"):
        _persistent_backward(emu, "lstm", big, big_fwd, big_grads, True)
    for bad in ("3", "eight"):
        monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_CLUSTER", bad)
        with pytest.raises(RuntimeError, match="FASTSEQ_CUDA_PERSISTENT_CLUSTER"):
            _persistent_backward(emu, "lstm", big, big_fwd, big_grads, True)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_CLUSTER", "4")
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", "4")
    _all_close(_persistent_backward(emu, "lstm", big, big_fwd, big_grads, True),
               _persistent_backward(R, "lstm", big, big_fwd, big_grads, True), "bfloat16", "4 x 5 units, cluster 4")
    # A device that refuses the cluster launch: auto falls back to the block kernel (same result,
    # no cluster barrier); a size asked for by name raises.
    monkeypatch.setenv("FASTSEQ_CUDA_EMU_CLUSTER_LAUNCH", "fail")
    with pytest.raises(RuntimeError, match="kernel launch failed"):
        _persistent_backward(emu, "lstm", big, big_fwd, big_grads, True)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_CLUSTER", "auto")
    csyncs, syncs = emu.emulated_cluster_syncs(), emu.emulated_grid_syncs()
    _all_close(_persistent_backward(emu, "lstm", big, big_fwd, big_grads, True),
               _persistent_backward(R, "lstm", big, big_fwd, big_grads, True), "bfloat16", "refused cluster launch")
    assert emu.emulated_cluster_syncs() == csyncs and emu.emulated_grid_syncs() - syncs == 2
    monkeypatch.delenv("FASTSEQ_CUDA_EMU_CLUSTER_LAUNCH")
    monkeypatch.setenv("FASTSEQ_CUDA_EMU_GRID_SYNC", "off")
    mmas = emu.emulated_mma_count()
    got = _persistent_backward(emu, "lstm", big, big_fwd, big_grads, True)
    assert emu.emulated_mma_count() > mmas
    with pytest.raises(AssertionError):
        _all_close(got, _persistent_backward(R, "lstm", big, big_fwd, big_grads, True), "bfloat16",
                   "without the barriers")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["grid", "flags", "tagged"])
def test_emulated_sync_probe(emu, mode, monkeypatch):
    """The `sync` suite's kernel (persistent_sync_probe.cu): each mode's exchange gives every
    block the checksum of all blocks' words of every step (one block, 3, and 8 = the emulated
    device's SMs; clusters of 2 and 4 add their barrier), the grid mode crosses one grid barrier
    per step and the others none, a cluster one cluster barrier per step and cluster; with the
    barriers switched off (FASTSEQ_CUDA_EMU_GRID_SYNC=off: the blocks in turn, and a wait for
    another block's flag or word gives up) the checksums of a grid of several blocks are wrong,
    so the check can fail. The op writes the buffer it is given (its step tags)."""
    import torch
    from fastseq.bench.suites.sync import checksum

    monkeypatch.delenv("FASTSEQ_CUDA_EMU_GRID_SYNC", raising=False)
    steps = 5
    for blocks, words, cluster in ((1, 4, 1), (3, 8, 1), (4, 4, 2), (8, 4, 4)):
        buf = torch.zeros(2, blocks * words, dtype=torch.int32)
        syncs, csyncs = emu.emulated_grid_syncs(), emu.emulated_cluster_syncs()
        sums = emu.persistent_sync_probe(buf, blocks, steps, mode, cluster)
        tag = f"{mode} blocks={blocks} words={words} cluster={cluster}"
        assert sums.shape == (blocks, 256) and sums.dtype == torch.int64, tag
        want = checksum(blocks, words, steps)
        assert sums.sum(1).tolist() == [want] * blocks, f"{tag}: checksums"
        assert emu.emulated_grid_syncs() - syncs == (steps if mode == "grid" else 0), f"{tag}: grid barriers"
        assert emu.emulated_cluster_syncs() - csyncs == (steps * blocks // cluster if cluster > 1 else 0), tag
        last = (steps - 1) & 1  # the buffer the last step wrote: block 0's words
        low = buf[last, :words] & 0xFFFF
        assert low.tolist() == [((steps - 1) * blocks + 1) & 0xFFFF] * words, f"{tag}: buffer"
    monkeypatch.setenv("FASTSEQ_CUDA_EMU_GRID_SYNC", "off")
    sums = emu.persistent_sync_probe(torch.zeros(2, 3 * 4, dtype=torch.int32), 3, steps, mode, 1)
    assert sums.sum(1).tolist() != [checksum(3, 4, steps)] * 3, f"{mode}: no barrier, same checksums"


@pytest.mark.slow
def test_sync_suite_on_the_emulated_kernel(emu):
    """The `sync` benchmark suite's case (bench/suites/sync.py) driven through the emulated
    kernel: every mode passes the suite's own checksum check and gets a record with its time
    per step; the case's name gives its sizes."""
    import torch
    from fastseq.bench.core import Context, Grid
    from fastseq.bench.suites import sync

    ctx = Context(device=torch.device("cpu"), dtypes=[torch.float32], grid=Grid("tiny"), rounds=2, warmup=0,
                  verbose=False)
    sync.time_case(ctx, emu, 4, 4 * 32, 6, 2)
    assert [r.impl for r in ctx.records] == list(sync.MODES), ctx.records
    for r in ctx.records:
        assert r.case == "sync-blocks4-128B-T6-cluster2" and r.suite == "sync" and r.n == 2
        assert "us per step (128 bytes read per block per step)" in r.note, r.note


def test_emulated_sync_probe_bad_arguments(emu):
    """persistent_sync_probe names the argument it rejects (RuntimeError, as every extension op),
    and the plan's reason when the emulated device (8 SMs) cannot hold the grid."""
    import torch

    buf = torch.zeros(2, 8, dtype=torch.int32)
    cases = [
        (lambda: emu.persistent_sync_probe(buf.float(), 2, 1, "grid"), "buffer: expected int32"),
        (lambda: emu.persistent_sync_probe(torch.zeros(2, 6, dtype=torch.int32), 2, 1, "grid"), "multiple of 4"),
        (lambda: emu.persistent_sync_probe(torch.zeros(3, 8, dtype=torch.int32), 2, 1, "grid"), "buffer"),
        (lambda: emu.persistent_sync_probe(buf, 0, 1, "grid"), "blocks: expected a positive integer"),
        (lambda: emu.persistent_sync_probe(buf, 2, 0, "grid"), "steps: expected a positive integer"),
        (lambda: emu.persistent_sync_probe(buf, 2, 1, "spin"), "mode: expected grid, flags or tagged, got 'spin'"),
        (lambda: emu.persistent_sync_probe(buf, 2, 1, "grid", 3), "cluster: expected 1, 2, 4 or 8, got 3"),
        (lambda: emu.persistent_sync_probe(buf, 2, 1, "grid", 4), "positive multiple of the cluster size"),
        (lambda: emu.persistent_sync_probe(torch.zeros(2, 16 * 4, dtype=torch.int32), 16, 1, "flags"),
         "more blocks than SMs"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call()


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_emulated_persistent_needs_the_barrier(emu, cell, monkeypatch):
    """The tests above can fail: with the emulated grid barrier switched off
    (FASTSEQ_CUDA_EMU_GRID_SYNC=off: the blocks run in turn, no barrier), a grid of several
    blocks reads other blocks' state (forward) or gate gradients (backward) before they are
    written and the result differs from the reference; one block needs no barrier and still
    matches, nor does a forward of one step."""
    import torch

    gen = torch.Generator().manual_seed(6)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "1")
    monkeypatch.setenv("FASTSEQ_CUDA_EMU_GRID_SYNC", "off")
    from fastseq.ops.recurrence import naive as R

    for blocks, T, needs_barrier in ((4, 5, True), (1, 5, False), (4, 1, False)):
        monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", str(blocks))
        case = _persistent_case(cell, torch.float32, gen, T, 4, 7, True, None)
        fwd = _reference_forward(cell, case, True)
        grads = [torch.randn(T, 4, 7, generator=gen) for _ in range(2)]
        before = emu.emulated_grid_syncs()
        got_fwd = _persistent_forward(emu, cell, case, True)
        got_bwd = _persistent_backward(emu, cell, case, fwd, grads, True)
        assert emu.emulated_grid_syncs() == before, "a switched-off barrier was counted"
        want_bwd = _persistent_backward(R, cell, case, fwd, grads, True)
        tag = f"{cell} blocks={blocks} T={T} without a grid barrier"
        if needs_barrier:
            with pytest.raises(AssertionError):
                _all_close(got_fwd, fwd, "float32", "forward " + tag)
        else:
            _all_close(got_fwd, fwd, "float32", "forward " + tag)
        # The backward needs its barrier even at T = 1 (dG of all blocks before the product).
        if blocks > 1:
            with pytest.raises(AssertionError):
                _all_close(got_bwd, want_bwd, "float32", "backward " + tag)
        else:
            _all_close(got_bwd, want_bwd, "float32", "backward " + tag)


@pytest.mark.slow
def test_emulated_persistent_forward_choice(emu, monkeypatch):
    """FASTSEQ_CUDA_PERSISTENT: unset, 0 and auto (no device under the emulation) run the
    per-step loop (no grid barrier); 1 raises when the kernel does not apply (W_hh slice too large for
    a block's shared memory, more blocks than the emulated 8 SMs, W_hh in another dtype than
    gi); bad values raise; T = 0 returns empty outputs on the persistent setting."""
    import torch
    from fastseq.ops.recurrence import naive as R

    gen = torch.Generator().manual_seed(7)
    case = _persistent_case("lstm", torch.float32, gen, 3, 2, 5, True, None)
    for mode in (None, "0", "auto"):
        if mode is None:
            monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT", raising=False)
        else:
            monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", mode)
        before = emu.emulated_grid_syncs()
        _all_close(_persistent_forward(emu, "lstm", case, True), _reference_forward("lstm", case, True),
                   "float32", f"FASTSEQ_CUDA_PERSISTENT={mode}")
        assert emu.emulated_grid_syncs() == before, f"FASTSEQ_CUDA_PERSISTENT={mode} ran the persistent kernel"
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "1")
    h0 = torch.randn(2, 300, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="do not fit"):  # 8 blocks: 4 * 38 * 300 * 8 B = 365 KB each
        emu.lstm_recurrence_forward(torch.randn(3, 2, 1200, dtype=torch.float64), h0, h0,
                                    torch.randn(1200, 300, dtype=torch.float64), None, None, False)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", "9")
    with pytest.raises(RuntimeError, match="more blocks"):
        _persistent_forward(emu, "lstm", case, True)
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT_BLOCKS", "2")
    gi, h0, c0, w, b, lengths = case
    with pytest.raises(RuntimeError, match="dtype"):
        emu.lstm_recurrence_forward(gi.half(), h0.half(), c0.half(), w, None, None, True)
    hs, gates = emu.gru_recurrence_forward(torch.randn(0, 2, 9), torch.randn(2, 3), torch.randn(9, 3), None, None,
                                           True)
    assert tuple(hs.shape) == (0, 2, 3) and tuple(gates.shape) == (0, 2, 12)
    for var, bad in (("FASTSEQ_CUDA_PERSISTENT", "yes"), ("FASTSEQ_CUDA_PERSISTENT_BLOCKS", "0"),
                     ("FASTSEQ_CUDA_PERSISTENT_BLOCKS", "4x")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(RuntimeError, match=var):
            _persistent_forward(emu, "lstm", case, True)
        monkeypatch.setenv(var, "1" if var == "FASTSEQ_CUDA_PERSISTENT" else "2")
    # Both paths on the same call give the same result (the persistent one checked above against naive).
    want = R.lstm_recurrence_forward(*case[:4], case[4], case[5], True)
    _all_close(_persistent_forward(emu, "lstm", case, True), want, "float32", "persistent, 2 blocks")


# batch_sizes of the packed tests: ties, all equal, B = 1, T = 1.
_PACKED_BATCH_SIZES = ([4, 4, 3, 1, 1], [3, 3, 3], [1, 1, 1, 1], [5], [5, 2])


@pytest.mark.slow
@pytest.mark.parametrize("dt_name", _DTYPES)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_emulated_packed_recurrences(emu, cell, dt_name):
    """The packed ops (the dense kernels on a step's rows, h0 for rows that start
    late in the reverse direction) against naive.py's packed functions."""
    import torch
    from fastseq.ops.recurrence import naive as R

    dt = getattr(torch, dt_name)
    gen = torch.Generator().manual_seed(4)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dt)

    H = 6
    G = 3 if cell == "gru" else 4
    # Half dtypes share every code path with float32 but the conversions: fewer cases.
    for sizes in _PACKED_BATCH_SIZES if dt_name in ("float32", "float64") else _PACKED_BATCH_SIZES[:2]:
        batch_sizes = torch.tensor(sizes, dtype=torch.int64)
        N, B = sum(sizes), sizes[0]
        for reverse in (False, True):
            for bias in (True, False):
                gi = rnd(N, G * H + 2)[:, 2:]  # a column slice: rows G*H + 2 apart
                h0, c0 = rnd(B, H), rnd(B, H)
                w = rnd(G * H, H, scale=0.4)
                b = rnd(G * H) if bias else None
                tag = f"{cell} {dt_name} batch_sizes={sizes} reverse={reverse} bias={bias}"
                if cell == "gru":
                    _all_close(emu.gru_packed_recurrence_forward(gi, h0, w, b, batch_sizes, reverse, False),
                               R.gru_packed_recurrence_forward(gi, h0, w, b, batch_sizes, reverse, False),
                               dt_name, f"forward save=False {tag}")
                    want = R.gru_packed_recurrence_forward(gi, h0, w, b, batch_sizes, reverse, True)
                    got = emu.gru_packed_recurrence_forward(gi, h0, w, b, batch_sizes, reverse, True)
                    _all_close(got, want, dt_name, f"forward {tag}")
                    hs, gates = want
                    grad_hs = rnd(N, H)
                    got = emu.gru_packed_recurrence_backward(grad_hs, h0, w, hs, gates, batch_sizes, reverse, bias)
                    want = R.gru_packed_recurrence_backward(grad_hs, h0, w, hs, gates, batch_sizes, reverse, bias)
                else:
                    _all_close(emu.lstm_packed_recurrence_forward(gi, h0, c0, w, b, batch_sizes, reverse, False),
                               R.lstm_packed_recurrence_forward(gi, h0, c0, w, b, batch_sizes, reverse, False),
                               dt_name, f"forward save=False {tag}")
                    want = R.lstm_packed_recurrence_forward(gi, h0, c0, w, b, batch_sizes, reverse, True)
                    got = emu.lstm_packed_recurrence_forward(gi, h0, c0, w, b, batch_sizes, reverse, True)
                    _all_close(got, want, dt_name, f"forward {tag}")
                    hs, cs, gates = want
                    grad_hs, grad_cs = rnd(N, H), rnd(N, H)
                    got = emu.lstm_packed_recurrence_backward(grad_hs, grad_cs, h0, c0, w, hs, cs, gates,
                                                              batch_sizes, reverse, bias)
                    want = R.lstm_packed_recurrence_backward(grad_hs, grad_cs, h0, c0, w, hs, cs, gates,
                                                             batch_sizes, reverse, bias)
                _all_close(got, want, dt_name, f"backward {tag}")


@pytest.mark.slow
def test_emulated_packed_recurrence_checks(emu):
    """Empty sequences and the batch_sizes checks of the packed ops."""
    import torch

    H = 3
    h0, w = torch.randn(2, H), torch.randn(3 * H, H)
    # N = 0 (no steps): empty outputs of the right shapes.
    hs, gates = emu.gru_packed_recurrence_forward(torch.randn(0, 3 * H), h0, w, None,
                                                  torch.zeros(0, dtype=torch.int64), True, True)
    assert tuple(hs.shape) == (0, H) and tuple(gates.shape) == (0, 4 * H)
    grads = emu.gru_packed_recurrence_backward(torch.randn(0, H), h0, w, hs, gates,
                                               torch.zeros(0, dtype=torch.int64), False, True)
    assert [tuple(x.shape) for x in grads] == [(0, 3 * H), (2, H), (3 * H, H), (3 * H,)]
    assert not grads[1].any() and not grads[2].any()
    gi = torch.randn(3, 3 * H)
    for bad in ([1, 2], [2, 2], [3], [2, 2, -1]):  # increasing; sum != N; > B; negative
        with pytest.raises(RuntimeError, match="batch_sizes"):
            emu.gru_packed_recurrence_forward(gi, h0, w, None, torch.tensor(bad), False, True)
    with pytest.raises(RuntimeError, match="batch_sizes"):  # not int64
        emu.gru_packed_recurrence_forward(gi, h0, w, None, torch.tensor([2, 1], dtype=torch.int32), False, True)


@pytest.mark.slow
@pytest.mark.parametrize("dt_name", _DTYPES)
def test_emulated_attention(emu, dt_name):
    import torch
    from fastseq.ops.attention import naive as R

    dt = getattr(torch, dt_name)
    gen = torch.Generator().manual_seed(1)
    B, T, S, A, D = 3, 2, 37, 40, 33

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dt)

    mask = torch.rand(B, S, generator=gen) > 0.3
    mask[:, 0] = True
    cases = {
        "none": (None, None),
        "lengths": (None, torch.tensor([S, 11, 1])),
        "mask": (mask, None),
        "mask+lengths": (mask, torch.tensor([3, 3, 3])),  # the mask wins
        "broadcast mask": (mask[:1], None),
    }
    for name, (m, lengths) in cases.items():
        q, k, v, e = rnd(B, T, A), rnd(B, S, A), rnd(B, S, D), rnd(A)
        got = emu.additive_attention_forward(q, k, v, e, m, lengths)
        want = R.additive_attention_forward(q, k, v, e, m, lengths)
        _all_close(got, want, dt_name, f"forward {name}")
        context, weights = want
        grad_context, grad_weights = rnd(B, T, D), rnd(B, T, S)
        for gw in (None, grad_weights):
            got = emu.additive_attention_backward(grad_context, gw, q, k, v, e, weights)
            want = R.additive_attention_backward(grad_context, gw, q, k, v, e, weights)
            _all_close(got, want, dt_name, f"backward {name} grad_weights={gw is not None}")


@pytest.mark.slow
def test_emulated_attention_edge_cases(emu):
    import torch
    from fastseq.ops.attention import naive as R

    gen = torch.Generator().manual_seed(2)
    # Scores too large for shared memory (float64: S > 6016): the global-workspace path
    # (the same code for float32 from S > 12032, which is slow to emulate).
    S = 6100
    q, k = torch.randn(2, 1, 4, generator=gen).double(), torch.randn(2, S, 4, generator=gen).double()
    v, e = torch.randn(2, S, 3, generator=gen).double(), torch.randn(4, generator=gen).double()
    lengths = torch.tensor([S, 17])
    _all_close(emu.additive_attention_forward(q, k, v, e, None, lengths),
               R.additive_attention_forward(q, k, v, e, None, lengths), "float64", f"workspace S={S}")
    # Mixed dtypes (float32 queries, float16 keys/values): computed in float32 like the reference.
    q, k = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 5, 8, generator=gen).half()
    v, e = torch.randn(2, 5, 6, generator=gen).half(), torch.randn(8, generator=gen)
    want = R.additive_attention_forward(q, k, v, e, None, None)
    _all_close(emu.additive_attention_forward(q, k, v, e, None, None), want, "float16", "mixed forward")
    gc = torch.randn(2, 3, 6, generator=gen).half()
    _all_close(emu.additive_attention_backward(gc, None, q, k, v, e, want[1]),
               R.additive_attention_backward(gc, None, q, k, v, e, want[1]), "float16", "mixed backward")
    # A row without valid positions: NaN weights, as the reference's softmax.
    m = torch.tensor([[True] * 5, [False] * 5])
    q, k, v, e = (torch.randn(2, 1, 8, generator=gen), torch.randn(2, 5, 8, generator=gen),
                  torch.randn(2, 5, 6, generator=gen), torch.randn(8, generator=gen))
    _all_close(emu.additive_attention_forward(q, k, v, e, m, None), R.additive_attention_forward(q, k, v, e, m, None),
               "float32", "all-masked row")
    # Empty sizes.
    for B, T, S in ((2, 3, 0), (2, 0, 4), (0, 2, 3)):
        q, k = torch.randn(B, T, 8, generator=gen), torch.randn(B, S, 8, generator=gen)
        v, e = torch.randn(B, S, 6, generator=gen), torch.randn(8, generator=gen)
        got = emu.additive_attention_forward(q, k, v, e, None, None)
        assert [tuple(x.shape) for x in got] == [(B, T, 6), (B, T, S)]
        gb = emu.additive_attention_backward(torch.randn(B, T, 6, generator=gen), None, q, k, v, e, got[1])
        assert [tuple(x.shape) for x in gb] == [(B, T, 8), (B, S, 8), (B, S, 6), (8,)]


@pytest.mark.slow
@pytest.mark.parametrize("dt_name", _DTYPES)
def test_emulated_context_cell(emu, dt_name):
    import torch
    from fastseq.ops.decoder_step import naive as R

    dt = getattr(torch, dt_name)
    gen = torch.Generator().manual_seed(3)
    B, H, D = 5, 9, 11

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dt)

    for bias in (True, False):
        for save in (True, False):
            gi, context, w_ic = rnd(B, 3 * H), rnd(B, D), rnd(3 * H, D, scale=0.3)
            gh = rnd(B, 3 * H + 4)[:, 4:]  # a column slice of a wider product
            b, h = (rnd(3 * H) if bias else None), rnd(B, H)
            tag = f"{dt_name} bias={bias} save={save}"
            want = R.gru_context_cell_forward(gi, context, w_ic, gh, b, h, save)
            _all_close(emu.gru_context_cell_forward(gi, context, w_ic, gh, b, h, save), want, dt_name,
                       f"forward {tag}")
            if save:
                grad_h = rnd(B, H)
                _all_close(emu.gru_context_cell_backward(grad_h, want[1], h, context, w_ic, bias),
                           R.gru_context_cell_backward(grad_h, want[1], h, context, w_ic, bias), dt_name,
                           f"backward {tag}")


@pytest.mark.slow
@pytest.mark.parametrize("flow", ["bahdanau", "luong"])
@pytest.mark.parametrize("dt_name", ["float32", "bfloat16"])
def test_emulated_decode_loops(emu, flow, dt_name):
    """The C++ decoder loops (csrc/cpu/decode.cpp) dispatch every step to the CUDA kernels
    (emulated): outputs and gradients equal the Python loop over the same kernels, bit for bit."""
    import torch
    from fastseq.ops.decoder_step import decode, luong

    dt = getattr(torch, dt_name)
    g = torch.Generator().manual_seed(3)
    B, T, H, S, A, D = 3, 4, 8, 5, 6, 7

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dt)

    lengths = torch.tensor([S, 1, 3])
    fwd = dict(attention=emu.additive_attention_forward, cell=emu.gru_context_cell_forward)
    bwd = dict(attention=emu.additive_attention_backward, cell=emu.gru_context_cell_backward)
    if flow == "bahdanau":
        args = (r(B, T, 3 * H), r(B, H), r(B, S, A), r(B, S, D), r(A + 3 * H, H), r(3 * H), r(A), r(3 * H, D),
                None, lengths, True)
        out = tuple(emu.attention_gru_decode_forward(*args))
        want = decode.decode_forward(*args, **fwd)
        bargs = (r(B, T, H), r(B, T, D), r(B, T, S), *args[:5], *args[6:8], *out, True)
        got_b = tuple(emu.attention_gru_decode_backward(*bargs))
        want_b = decode.decode_backward(*bargs, **bwd)
    else:
        args = (r(B, T, 3 * H), r(B, 2 * H), r(B, S, A), r(B, S, H), r(A + 4 * H, H), r(H), r(3 * H), r(A),
                r(3 * H, H), None, lengths, True)
        out = tuple(emu.luong_gru_decode_forward(*args))
        want = luong.luong_decode_forward(*args, **fwd)
        bargs = (r(B, T, 2 * H), r(B, T, S), *args[1:5], *args[7:9], *out, True, True)
        got_b = tuple(emu.luong_gru_decode_backward(*bargs))
        want_b = luong.luong_decode_backward(*bargs, **bwd)
    for what, got, ref in (("forward", out, want), ("backward", got_b, want_b)):
        assert len(got) == len(ref)
        for i, (x, y) in enumerate(zip(got, ref)):
            assert torch.equal(x, y), f"{flow} {what} output {i} differs"


def test_emulated_recurrence_empty_sizes(emu):
    import torch

    for T, B, H in ((0, 3, 4), (3, 0, 4), (3, 2, 0), (1, 1, 1)):
        gi, h0, w = torch.randn(T, B, 3 * H), torch.randn(B, H), torch.randn(3 * H, H)
        hs, gates = emu.gru_recurrence_forward(gi, h0, w, None, None, True)
        assert tuple(hs.shape) == (T, B, H) and tuple(gates.shape) == (T, B, 4 * H)
        grads = emu.gru_recurrence_backward(torch.randn(T, B, H), h0, w, hs, gates, None, True)
        assert [tuple(x.shape) for x in grads] == [(T, B, 3 * H), (B, H), (3 * H, H), (3 * H,)]
        c0, w4 = torch.randn(B, H), torch.randn(4 * H, H)
        hs, cs, gates = emu.lstm_recurrence_forward(torch.randn(T, B, 4 * H), h0, c0, w4, None, None, True)
        grads = emu.lstm_recurrence_backward(torch.randn(T, B, H), torch.randn(T, B, H), h0, c0, w4, hs, cs,
                                             gates, None, False)
        assert [tuple(x.shape) for x in grads] == [(T, B, 4 * H), (B, H), (B, H), (4 * H, H), (0,)]
