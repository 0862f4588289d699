"""Test setup: on a machine without a GPU, the Triton kernels run under the
Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported),
and every output is NaN-poisoned before kernels write it.

Which backends run here is decided lazily, at test time: the C++ extension is
built (or loaded from its cache) the first time a test asks for the ``cpp``
backend (:func:`available`, the ``backend`` and ``cpp_ops`` fixtures), never
while tests are being collected.
"""
import functools
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from fastseq.backend import alloc, extension, selection  # noqa: E402

alloc.set_poison(True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_BACKENDS = ("reference", "triton", "cpp")
# Triton needs no build: known at collection (for skipif marks).
TRITON = selection.triton_status()[0] and (torch.cuda.is_available() or selection.interpreter_on())


@functools.lru_cache(maxsize=None)
def unavailable(name: str, device: str = DEVICE):
    """None if backend ``name`` runs on ``device`` tensors here, else why not (``cpp``:
    builds the extension, cached; on CUDA it needs the extension's CUDA kernels; ``triton``
    on CPU tensors needs the interpreter)."""
    if name == "reference":
        return None
    if name == "triton":
        ok, why = selection.triton_status()
        if not ok:
            return why
        if device == "cpu" and not selection.interpreter_on():
            return "Triton runs on CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
        return None
    ok, why = selection.cpp_status()
    if not ok:
        return why
    if device == "cuda" and not extension.has_cuda():
        return "the C++ extension was built without CUDA kernels"
    return None


def available(name: str, device: str = DEVICE) -> bool:
    return unavailable(name, device) is None


def require(name: str, device: str = DEVICE) -> None:
    """Skip the calling test (with the reason) if backend ``name`` does not run on ``device`` here."""
    why = unavailable(name, device)
    if why is not None:
        pytest.skip(f"backend {name} not available here: {why}")


@pytest.fixture(params=list(ALL_BACKENDS))
def backend(request):
    """Run the test once per backend, forcing it for every fastseq op."""
    require(request.param)
    with selection.backend(request.param):
        yield request.param


@pytest.fixture(scope="session")
def cpp_ops():
    """``torch.ops.fastseq_cpp``, built on first use; a failed build fails the test."""
    try:
        return extension.load()
    except Exception as exc:  # noqa: BLE001 - a build failure fails the tests that need it
        pytest.fail(f"building/loading the C++ extension failed: {exc}", pytrace=False)


@pytest.fixture(params=["auto", "aten"])
def gemm(request, monkeypatch):
    """Which step implementation runs: 'auto' (BLAS where available) or the ATen fallback."""
    if request.param == "aten":
        monkeypatch.setenv("FASTSEQ_CPP_GEMM", "aten")
    else:
        monkeypatch.delenv("FASTSEQ_CPP_GEMM", raising=False)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def checkout_bench():
    """The ``fastseq.bench`` package of this checkout. bench/ is installed as ``fastseq.bench``;
    a checkout run through PYTHONPATH, whose installed ``fastseq.bench`` maps elsewhere
    (or nowhere), gets this checkout's bench/ as that package, as bench/gpu_check.py does."""
    import importlib.util
    import sys
    from pathlib import Path

    import fastseq

    bench = Path(__file__).resolve().parent.parent / "bench"
    try:
        import fastseq.bench as pkg

        if Path(pkg.__path__[0]).resolve() != bench:
            raise ImportError(f"fastseq.bench is {pkg.__path__[0]}, not {bench}")
    except ImportError:
        spec = importlib.util.spec_from_file_location("fastseq.bench", bench / "__init__.py",
                                                      submodule_search_locations=[str(bench)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["fastseq.bench"] = pkg
        spec.loader.exec_module(pkg)
        fastseq.bench = pkg
    return pkg


class FakeCudaGraph:
    """A stand-in for a captured ``torch.cuda.CUDAGraph`` of ``fn(*static)`` off the GPU, with
    its semantics: the outputs are fixed buffers made at capture, and ``replay()``
    recomputes them in place from whatever the static inputs hold then."""

    def __init__(self, fn, static):
        self.fn, self.static = fn, static
        self.outputs = fn(*static)

    def replay(self):
        for o, new in zip(self.outputs, self.fn(*self.static)):
            o.copy_(new)
