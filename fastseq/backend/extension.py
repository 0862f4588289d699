"""Builder and loader of the C++ extension: fused ATen CPU kernels and CUDA kernels of every op.

``load()`` returns ``torch.ops.fastseq_cpp``. It first looks for an
ahead-of-time build (``fastseq/_C*.so``, from ``FASTSEQ_BUILD_EXT=1 pip install
--no-build-isolation .``), else compiles ``csrc/cpu/*.cpp`` (plus
``csrc/cuda/*.cu`` and ``csrc/cuda/bindings.cpp`` when torch has CUDA, nvcc
is found and there is an architecture to compile for, see :func:`want_cuda`)
with :func:`torch.utils.cpp_extension.load` on first use (about a minute; one
line on stderr says so) and caches the build in a per-user directory. The ops are registered for the CPU (and CUDA) dispatch keys, so
PyTorch's dispatcher picks the kernel by the tensors' device; they mirror
:mod:`fastseq.ops` (each op folder's ``cpp.py`` calls them)::

    gru_recurrence_forward(gi, h0, w_hh, b_hh?, lengths?, save_gates=True) -> (hs, gates)
    gru_recurrence_backward(grad_hs, h0, w_hh, hs, gates, lengths?, has_bias)
        -> (grad_gi, grad_h0, grad_w_hh, grad_b_hh)
    lstm_recurrence_forward(gi, h0, c0, w_hh, b_hh?, lengths?, save_gates=True) -> (hs, cs, gates)
    lstm_recurrence_backward(grad_hs, grad_cs, h0, c0, w_hh, hs, cs, gates, lengths?, has_bias)
        -> (grad_gi, grad_h0, grad_c0, grad_w_hh, grad_b_hh)
    additive_attention_forward(query, proj_keys, values, energy, mask?, lengths?) -> (context, weights)
    additive_attention_backward(grad_context, grad_weights?, query, proj_keys, values, energy, weights)
        -> (grad_query, grad_proj_keys, grad_values, grad_energy)
    gru_context_cell_forward(gi, context, w_ic, gh, b_hh?, h, save_gates) -> (h', gates)
    gru_context_cell_backward(grad_h, gates, h, context, w_ic, has_bias)
        -> (grad_gi, grad_context, grad_w_ic, grad_gh, grad_b_hh, grad_h)

Absent outputs (``grad_b_hh`` without a bias, gates not saved) are empty ``[0]``
tensors, the convention of every backend.

Build cache: ``$FASTSEQ_CACHE/ext/<torch version>-<hash>`` or, without
``FASTSEQ_CACHE``, ``~/.cache/fastseq/ext/<torch version>-<hash>``; the hash
covers the sources (``csrc/*.h``, every ``csrc/cpu/*.cpp`` and ``*.h``), their folder, the
flags and the torch/Python versions, so a change to any of them builds afresh
in a new directory (old directories are not removed). Importing this module
builds nothing.

``FASTSEQ_CPP_GEMM=aten`` (read at every call) makes the recurrence ops use
``at::mm_out`` for their per-step products instead of calling the BLAS
(MKL) that ATen uses directly; see ``csrc/cpu/rnn.cpp``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch

NAME = "fastseq_cpp"
_OPS = ("gru_recurrence_forward", "gru_recurrence_backward",
        "lstm_recurrence_forward", "lstm_recurrence_backward",
        "additive_attention_forward", "additive_attention_backward",
        "gru_context_cell_forward", "gru_context_cell_backward")
_BUILD_MSG = "fastseq: building the C++ extension (first use, ~1 min) ..."


def csrc_dir() -> Path:
    """The csrc/ folder: ``<package parent>/csrc`` (a source checkout or editable install),
    else ``fastseq/csrc`` (an installed wheel: setup.py copies the sources into the package).

    Raises:
        FileNotFoundError: neither exists.
    """
    pkg = Path(__file__).resolve().parent.parent  # .../fastseq
    candidates = (pkg.parent / "csrc", pkg / "csrc")
    for cand in candidates:
        if (cand / "cpu").is_dir():
            return cand
    raise FileNotFoundError(
        "fastseq: the C++ sources (csrc/cpu) were not found; looked in "
        + ", ".join(str(c) for c in candidates)
    )


def want_cuda() -> bool:
    """Build the CUDA kernels too: torch has CUDA, nvcc is found, FASTSEQ_BUILD_CUDA is not 0,
    and there is an architecture to compile for: a visible CUDA device or ``TORCH_CUDA_ARCH_LIST``.

    Without either (a CUDA build of torch on a machine with no GPU), torch's
    builder has no architecture and fails (``IndexError`` in
    ``_get_cuda_arch_flags``), which would lose the CPU kernels too; the CUDA
    kernels could not run in such a process anyway.
    """
    if torch.version.cuda is None or os.environ.get("FASTSEQ_BUILD_CUDA", "1") == "0":
        return False
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and (csrc_dir() / "cuda").is_dir()


def sources() -> List[Path]:
    src = sorted((csrc_dir() / "cpu").glob("*.cpp"))
    if want_cuda():  # csrc/cuda/emu/ is a test-only CPU emulation: not part of the build
        cuda = csrc_dir() / "cuda"
        src += sorted(cuda.glob("*.cu")) + sorted(cuda.glob("*.cpp"))
    return src


def _headers() -> List[Path]:
    hdr = sorted(csrc_dir().glob("*.h")) + sorted((csrc_dir() / "cpu").glob("*.h"))
    if want_cuda():
        cuda = csrc_dir() / "cuda"
        hdr += sorted(cuda.glob("*.h")) + sorted(cuda.glob("*.cuh"))
    return hdr


def _openmp() -> bool:
    """Whether ATen's intra-op parallel backend is OpenMP (at::parallel_for then needs -fopenmp)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def cflags() -> List[str]:
    # No -march=native: the float kernels carry their own AVX2+FMA build, picked
    # at run time, so a cache directory shared between machines stays safe.
    # -fno-trapping-math (as torch itself is built) lets GCC if-convert, hence
    # vectorise, the clamps and selects in the activation loops.
    flags = ["-O3", "-DNDEBUG", "-fno-trapping-math", "-fno-math-errno"]
    if _openmp():
        flags.append("-fopenmp")
    return flags


def ldflags() -> List[str]:
    # -fopenmp links libgomp.so.1, the soname torch already loaded: one OpenMP runtime.
    return ["-fopenmp"] if _openmp() else []


def build_dir() -> Path:
    """This build's cache directory (not created here)."""
    h = hashlib.sha256()
    for p in sources() + _headers():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    # The checkout's path too: ninja's build file names the sources by absolute
    # path, so two checkouts sharing a directory would rebuild each other's.
    for item in (str(csrc_dir()), cflags(), ldflags(), torch.__version__, torch.version.git_version,
                 os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
                 sys.implementation.cache_tag, platform.machine(), os.environ.get("CXX", "")):
        h.update(repr(item).encode())
    root = os.environ.get("FASTSEQ_CACHE") or os.path.join(Path.home(), ".cache", "fastseq")
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", torch.__version__)
    return Path(root) / "ext" / f"{tag}-{h.hexdigest()[:16]}"


def _registered(key: str = "CPU") -> bool:
    """The ops have kernels for dispatch key ``key`` (the library was loaded before)."""
    try:
        return all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAME}::{op}", key) for op in _OPS
        )
    except Exception:  # pragma: no cover - private API drift
        return False


def has_cuda() -> bool:
    """The loaded extension has CUDA kernels (call after :func:`load` succeeded)."""
    return _registered("CUDA")


def _aot_library() -> Optional[Path]:
    """An ahead-of-time build inside the package (``fastseq/_C*.so``), if any."""
    pkg = Path(__file__).resolve().parent.parent
    found = sorted(pkg.glob("_C*.so"))
    return found[0] if found else None


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """Make ``ninja`` findable for the build: torch runs it from ``PATH``, and the
    ``ninja`` package fastseq depends on puts it in its own ``BIN_DIR``, which is on
    ``PATH`` only in an activated environment. ``PATH`` is restored afterwards."""
    old = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI package (a fastseq dependency)

            if ninja.BIN_DIR:
                os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, old]) if old else ninja.BIN_DIR
        except ImportError:  # torch's own error names the missing ninja
            pass
    try:
        yield
    finally:
        os.environ["PATH"] = old


@functools.lru_cache(maxsize=None)
def _try_load() -> Tuple[Optional[object], Optional[BaseException]]:
    """Build (or reuse) and load the library once per process; failures are cached too."""
    try:
        aot = _aot_library()
        if not _registered() and aot is not None:
            torch.ops.load_library(str(aot))
        if not _registered():
            from torch.utils import cpp_extension

            bdir = build_dir()
            bdir.mkdir(parents=True, exist_ok=True)
            if not (bdir / f"{NAME}.so").exists():
                print(_BUILD_MSG, file=sys.stderr, flush=True)
            with _ninja_on_path():
                cpp_extension.load(
                    name=NAME,
                    sources=[str(p) for p in sources()],
                    extra_cflags=cflags(),
                    extra_ldflags=ldflags(),
                    extra_include_paths=[str(csrc_dir())] + [str(csrc_dir() / d) for d in ("cpu", "cuda")
                                                              if (csrc_dir() / d).is_dir()],
                    build_directory=str(bdir),
                    verbose=False,
                    is_python_module=False,
                )
        return torch.ops.fastseq_cpp, None
    except Exception as exc:  # noqa: BLE001 - reported through status()/load()
        return None, exc


_DETAIL = re.compile(r"error:|fatal error|not found|undefined (reference|symbol)|no such file|cannot find",
                     re.IGNORECASE)


def _describe(exc: BaseException, width: int = 300) -> str:
    """'<type>: <first line> | <the first compiler/linker error line>' (each line cut to ``width``)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    picked = lines[:1]
    # A compiler error is further down than the command line that failed.
    detail = next((ln for ln in lines[1:] if _DETAIL.search(ln)), None)
    if detail is not None:
        picked.append(detail)
    else:
        picked.extend(lines[1:3])
    text = " | ".join(ln if len(ln) <= width else ln[:width] + "..." for ln in picked)
    return f"{type(exc).__name__}: {text}"


def load():
    """Build on first use and return ``torch.ops.fastseq_cpp``.

    Raises:
        RuntimeError: the extension could not be built or loaded (the reason,
        also given by :func:`status`, is in the message; the original exception
        is chained).
    """
    ops, exc = _try_load()
    if exc is not None:
        raise RuntimeError(f"fastseq: the C++ extension is unavailable: {_describe(exc)}") from exc
    return ops


def status() -> Tuple[bool, str]:
    """(ok, reason): whether the C++ extension builds and loads here. Never raises."""
    try:
        ops, exc = _try_load()
        if exc is not None:
            return False, _describe(exc)
        return True, "ok"
    except Exception as exc:  # noqa: BLE001 - the contract is "never raises"
        return False, _describe(exc)
