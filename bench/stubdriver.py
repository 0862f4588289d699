"""Triton's CUDA driver on a machine without a GPU: everything real except the launch.

:func:`build` compiles ``bench/stub_cuda.c`` into a stand-in ``libcuda.so.1`` (gcc and
the ``cuda.h`` that Triton ships; cached by source hash). A process started with
:func:`subprocess_env` loads it instead of a real driver; there :func:`activate` makes
Triton's own ``CudaDriver`` (its ``cuda_utils`` module and C launcher, compiled and
linked against the stand-in) the active driver, for an sm_90 target. Then
``kernel[grid](...)`` runs Triton's whole launch path -- the binder, specialisation
and cache lookup, the compile on first use (ptxas for sm_90a), the launcher's
argument unpacking and each tensor's ``data_ptr()`` and pointer check -- on CPU
tensors, and the stand-in's ``cuLaunchKernelEx`` only counts the launch
(:func:`launches`).

Used by the ``host`` suite (host time per launch, :mod:`fastseq.bench.host_probe`)
and :mod:`fastseq.bench.kernels` (every launched specialisation, compiled without a
GPU). The stand-in must never reach the process that runs the rest of a benchmark,
so both run it in a subprocess with ``TRITON_INTERPRET`` unset.

Differences from a real launch, beside the launch itself: the current device and
stream come from constants instead of ``torch.cuda`` (two cheap calls on a GPU), and
kernel loading returns no register counts (``n_regs = n_spills = 0``; kernels.py reads
them from ptxas).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional

SOURCE = Path(__file__).with_name("stub_cuda.c")
LIB = "libcuda.so.1"
COUNTER = "fastseq_stub_launches"


def _cuda_include() -> Path:
    import triton.backends.nvidia as nv

    return Path(nv.__file__).resolve().parent / "include"


def build(cache: Optional[os.PathLike] = None) -> Path:
    """Compile the stand-in driver (once per source and Triton version) and return its folder.

    Raises:
        RuntimeError: no C compiler, or the compile failed (the message says why).
    """
    import triton

    include = _cuda_include()
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + triton.__version__.encode() + str(include).encode()).hexdigest()[:16]
    root = Path(cache or os.environ.get("FASTSEQ_STUB_CUDA_DIR") or Path(tempfile.gettempdir()) / "fastseq-stub-cuda")
    out = root / key
    lib = out / LIB
    if lib.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "gcc")
    tmp = out / f".{LIB}.{os.getpid()}"
    cmd = [cc, "-O2", "-shared", "-fPIC", f"-I{include}", f"-Wl,-soname,{LIB}", "-o", str(tmp), str(SOURCE)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"stub libcuda: {cc} failed to run: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"stub libcuda: {' '.join(cmd)} failed: {proc.stderr[-1500:]}")
    os.replace(tmp, lib)  # atomic: concurrent builders agree
    so = out / "libcuda.so"
    if not so.exists():
        try:
            so.symlink_to(LIB)
        except FileExistsError:
            pass
    return out


def subprocess_env(lib_dir: os.PathLike, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment of a process that runs Triton on the stand-in driver."""
    env = dict(os.environ if base is None else base)
    env.pop("TRITON_INTERPRET", None)
    lib_dir = str(lib_dir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([lib_dir] + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env["TRITON_LIBCUDA_PATH"] = lib_dir
    env["CUDA_VISIBLE_DEVICES"] = ""  # torch must never touch a real GPU from this process
    env["FASTSEQ_STUB_DRIVER"] = lib_dir
    return env


def _library() -> ctypes.CDLL:
    return ctypes.CDLL(LIB)  # resolved through LD_LIBRARY_PATH, as Triton's dlopen does


def launches() -> int:
    """The number of launches the stand-in has received in this process."""
    return ctypes.c_ulonglong.in_dll(_library(), COUNTER).value


def record(sizes) -> None:
    """Start recording each launch's grid and parameters: ``sizes[i]`` bytes (1-8) of
    parameter ``i`` (the kernel's runtime arguments in order, as the launcher passes
    them); resets the launch count. ``record([])`` stops. See :func:`recorded`."""
    lib = _library()
    arr = (ctypes.c_int * 64).in_dll(lib, "fastseq_stub_param_sizes")
    if len(sizes) > 64 or any(not 1 <= int(n) <= 8 for n in sizes):
        raise ValueError(f"record: 1-8 bytes for each of at most 64 parameters, got {list(sizes)}")
    for i in range(64):
        arr[i] = int(sizes[i]) if i < len(sizes) else 0
    ctypes.c_ulonglong.in_dll(lib, COUNTER).value = 0


def recorded(n_params: int):
    """``[(grid, [bytes of each parameter])]`` of the launches since :func:`record` (at most 512)."""
    lib = _library()
    params = ((ctypes.c_ubyte * (64 * 8)) * 512).in_dll(lib, "fastseq_stub_params")
    grids = ((ctypes.c_uint * 3) * 512).in_dll(lib, "fastseq_stub_grids")
    sizes = (ctypes.c_int * 64).in_dll(lib, "fastseq_stub_param_sizes")
    out = []
    for k in range(min(launches(), 512)):
        raw = bytes(params[k])
        out.append((tuple(grids[k]), [raw[8 * i:8 * i + sizes[i]] for i in range(n_params)]))
    return out


def activate(arch: int = 90) -> None:
    """Make Triton's CUDA driver, running on the stand-in, the active driver (target sm_``arch``).

    Raises:
        RuntimeError: not started with :func:`subprocess_env`, or the ``libcuda.so.1``
        found is a real driver, or the interpreter is on.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("stub driver: TRITON_INTERPRET is set")
    if not os.environ.get("FASTSEQ_STUB_DRIVER"):
        raise RuntimeError("stub driver: start this process with bench.stubdriver.subprocess_env()")
    try:
        launches()
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"stub driver: the libcuda.so.1 loaded here is not the stand-in ({exc})") from exc

    import torch
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime.driver import driver

    major, minor = divmod(arch, 10)

    class StubCudaDriver(CudaDriver):
        def __init__(self):
            super().__init__()  # compiles and loads cuda_utils against the stand-in
            self.get_device_capability = lambda device=None: (major, minor)
            self.get_current_stream = lambda device=None: 0
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None

        def get_active_torch_device(self):
            return torch.device("cpu")

        @staticmethod
        def is_active():
            return True

    driver.set_active(StubCudaDriver())
