"""Backend selection and the registry: FASTSEQ_BACKEND, set_backend, the context
manager (per thread), the registry's contents and dispatch, clear errors."""
import threading
import warnings

import pytest
import torch

import fastseq
from conftest import TRITON, available
from fastseq.backend import registry, selection, warn
from fastseq.ops import recurrence as rnn

OPS = ("gru_recurrence", "gru_recurrence_backward", "lstm_recurrence", "lstm_recurrence_backward",
       "gru_packed_recurrence", "gru_packed_recurrence_backward", "lstm_packed_recurrence",
       "lstm_packed_recurrence_backward", "gru_bidirectional_recurrence", "gru_bidirectional_recurrence_backward",
       "lstm_bidirectional_recurrence", "lstm_bidirectional_recurrence_backward",
       "additive_attention", "additive_attention_backward", "gru_context_cell", "gru_context_cell_backward",
       "attention_gru_decode_loop", "attention_gru_decode_loop_backward", "luong_gru_decode_loop",
       "luong_gru_decode_loop_backward")


def test_env_and_context_manager(monkeypatch):
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    assert fastseq.get_backend() == "reference"
    with fastseq.backend("auto"):
        assert fastseq.get_backend() == "auto"
        with fastseq.backend("triton"):
            assert fastseq.get_backend() == "triton"
        assert fastseq.get_backend() == "auto"
    assert fastseq.get_backend() == "reference"


def test_the_package_is_also_the_context_manager():
    """``fastseq.backend`` is the package (import it like any module) and, called,
    the context manager."""
    import types

    import fastseq.backend as package

    assert isinstance(package, types.ModuleType) and fastseq.backend is package
    assert package.registry is registry and package.selection is selection
    with fastseq.backend("reference"):
        assert fastseq.get_backend() == "reference"


def test_set_backend_and_reset(monkeypatch):
    monkeypatch.delenv("FASTSEQ_BACKEND", raising=False)
    try:
        fastseq.set_backend("reference")
        assert fastseq.get_backend() == "reference"
    finally:
        fastseq.set_backend(None)
    assert fastseq.get_backend() == "auto"


def test_backend_choice_is_per_thread(monkeypatch):
    """A backend forced in one thread is not in force in another, even while it is."""
    monkeypatch.delenv("FASTSEQ_BACKEND", raising=False)
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with fastseq.backend("reference"):
            seen["worker"] = fastseq.get_backend()
            inside.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main, while the worker forces reference"] = fastseq.get_backend()
    with fastseq.backend("cpp"):
        seen["new thread, while main forces cpp"] = []
        probe = threading.Thread(target=lambda: seen["new thread, while main forces cpp"].append(fastseq.get_backend()))
        probe.start()
        probe.join()
    release.set()
    t.join()
    assert seen == {"worker": "reference", "main, while the worker forces reference": "auto",
                    "new thread, while main forces cpp": ["auto"]}


def test_backward_runs_on_the_forward_backend(monkeypatch):
    """The backward op runs under the backend forced at the forward, even when the
    forced block has ended before backward() (autograd may run it on another thread)."""
    seen = []
    impl = registry.get("gru_recurrence_backward", "reference")
    real = impl.fn
    monkeypatch.setattr(impl, "_fn", lambda *a: seen.append(fastseq.get_backend()) or real(*a))
    gi = torch.randn(3, 2, 6, requires_grad=True)
    with fastseq.backend("reference"):
        hs = rnn.gru(gi, torch.randn(2, 2), torch.randn(6, 2))
    with fastseq.backend("cpp" if available("cpp", "cpu") else "auto"):
        hs.sum().backward()
    assert seen == ["reference"]


def test_bad_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'triton', 'cuda', 'cpp', 'reference'\), got 'cuDNN'"):
        fastseq.set_backend("cuDNN")
    with pytest.raises(ValueError, match="got 'fast'"):
        with fastseq.backend("fast"):
            pass
    monkeypatch.setenv("FASTSEQ_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTSEQ_BACKEND"):
        fastseq.get_backend()


def test_registry_has_every_op_on_every_backend():
    assert registry.registered() == {op: ("reference", "cpp", "triton") for op in OPS}
    with pytest.raises(KeyError, match="no 'cuda' implementation of op 'gru_recurrence'"):
        registry.get("gru_recurrence", "cuda")
    with pytest.raises(ValueError, match="backend: expected 'reference', 'triton' or 'cpp'"):
        registry.register("gru_recurrence", "cuda", lambda *a: None)


def test_absent_outputs_are_empty_tensors_in_every_backend():
    """One convention: a bias gradient without a bias, or gates not saved, is an empty [0] tensor."""
    gi, h0, w = torch.randn(2, 3, 6), torch.randn(3, 2), torch.randn(6, 2)
    for name in ("reference", "cpp", "triton"):
        if not available(name, "cpu"):
            continue
        with fastseq.backend(name):
            hs, gates = registry.implementation("gru_recurrence", gi)(gi, h0, w, None, None, False)
            assert gates.shape == (0,), name
            hs, gates = registry.implementation("gru_recurrence", gi)(gi, h0, w, None, None, True)
            out = registry.implementation("gru_recurrence_backward", hs)(
                torch.ones_like(hs), h0, w, hs, gates, None, False)
            assert out[3].shape == (0,), name


def test_auto_on_cpu_uses_the_cpp_extension_when_it_builds():
    ok, _ = selection.cpp_status()
    with fastseq.backend("auto"):
        assert selection.select(torch.empty(1)) == ("cpp" if ok else "reference")
        assert selection.select(torch.empty(1, dtype=torch.float64)) == ("cpp" if ok else "reference")
        assert selection.select(torch.empty(1, dtype=torch.bfloat16)) == "reference"


def test_failed_cpp_build_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(selection, "cpp_status", lambda: (False, "CalledProcessError: g++ failed"))
    monkeypatch.setattr(selection, "_SELECTED", {})  # decisions made under the patched status, dropped after
    monkeypatch.setattr(warn, "_warned", set())
    with fastseq.backend("auto"):
        with pytest.warns(RuntimeWarning, match="C.. extension is unavailable .CalledProcessError: g.. failed.") as rec:
            assert selection.select(torch.empty(1)) == "reference"
        assert rec[0].filename == __file__  # attributed to the caller, not to fastseq
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert selection.select(torch.empty(1)) == "reference"  # warned once only
        out = rnn.gru(torch.randn(2, 1, 6), torch.randn(1, 2), torch.randn(6, 2))
        assert out.shape == (2, 1, 2)
    with fastseq.backend("cpp"), pytest.raises(RuntimeError, match="FASTSEQ_BACKEND=cpp, but it cannot run here: CalledProcessError"):
        selection.select(torch.empty(1))


@pytest.mark.parametrize("devices,arch_list,build_cuda,want", [
    (0, None, None, False),   # CUDA torch, no GPU, no arch list: torch's builder would fail
    (0, "8.0;9.0", None, True),
    (1, None, None, True),
    (1, None, "0", False),
])
def test_cuda_kernels_are_built_only_with_an_architecture(monkeypatch, devices, arch_list, build_cuda, want):
    """A CUDA build of torch on a machine with no GPU and no TORCH_CUDA_ARCH_LIST builds
    the CPU kernels only (torch's cpp_extension has no architecture to compile for)."""
    from torch.utils import cpp_extension

    from fastseq.backend import extension

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    for name, value in (("TORCH_CUDA_ARCH_LIST", arch_list), ("FASTSEQ_BUILD_CUDA", build_cuda)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert extension.want_cuda() is want
    assert any(p.suffix == ".cu" for p in extension.sources()) is want


def test_triton_kernels_that_do_not_load_fall_back_under_auto(monkeypatch):
    """fastseq's Triton kernels failing to import (e.g. an incompatible Triton) is not
    fatal under auto: the op runs on the next backend, with one warning; forced, it raises."""
    impl = registry.Implementation(load=lambda: (_ for _ in ()).throw(ImportError("no kernels here")))
    monkeypatch.setitem(registry._REGISTRY["gru_recurrence"], "triton", impl)
    monkeypatch.setattr(selection, "select", lambda t: "triton")
    monkeypatch.setattr(warn, "_warned", set())
    gi = torch.randn(2, 1, 6)
    with fastseq.backend("auto"), pytest.warns(RuntimeWarning, match="does not load .ImportError: no kernels here."):
        assert registry.choose("gru_recurrence", gi) in ("cpp", "reference")
    with fastseq.backend("triton"), pytest.raises(RuntimeError, match="gru_recurrence does not load"):
        registry.choose("gru_recurrence", gi)


def test_forced_cuda_backend_needs_cuda_tensors():
    with fastseq.backend("cuda"), pytest.raises(RuntimeError, match="the 'cuda' backend takes CUDA tensors"):
        selection.select(torch.empty(1))


def test_forced_triton_explains_why_it_cannot_run(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the Triton backend can run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gi, h0, w = torch.randn(2, 1, 6), torch.randn(1, 2), torch.randn(6, 2)
    with fastseq.backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rnn.gru(gi, h0, w)
    with fastseq.backend("triton"), pytest.raises(RuntimeError, match="dtype torch.float64"):
        rnn.gru(gi.double(), h0.double(), w.double())


@pytest.mark.skipif(not TRITON or torch.cuda.is_available(), reason="needs the Triton interpreter on a CPU machine")
def test_env_var_forces_triton_on_cpu_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("FASTSEQ_BACKEND", "triton")
    assert selection.select(torch.empty(1)) == "triton"
    calls = []
    impl = registry.get("gru_recurrence", "triton")
    real = impl.fn
    monkeypatch.setattr(impl, "_fn", lambda *a: calls.append(1) or real(*a))
    rnn.gru(torch.randn(2, 1, 6), torch.randn(1, 2), torch.randn(6, 2))
    assert calls == [1]


@pytest.mark.parametrize("args,exc,match", [
    ((torch.randn(2, 1, 5), torch.randn(1, 2), torch.randn(6, 2)), RuntimeError, r"gi: expected size\(2\) == 3\*H = 6"),
    ((torch.randn(2, 6), torch.randn(1, 2), torch.randn(6, 2)), RuntimeError, "gi: expected a 3-D tensor"),
    ((torch.randn(2, 1, 6), torch.randn(3, 2), torch.randn(6, 2)), RuntimeError,
     r"h0: expected shape \(B, H\) = \(1, 2\), got \(3, 2\)"),
    ((torch.randn(2, 1, 6), torch.randn(1, 2), torch.randn(2, 6)), RuntimeError, r"w_hh: expected shape \(6, 2\), got \(2, 6\)"),
    ((torch.randn(2, 1, 6), torch.randn(1, 2, dtype=torch.float64), torch.randn(6, 2)), RuntimeError,
     "h0: expected dtype torch.float32"),
    (([0.0], torch.randn(1, 2), torch.randn(6, 2)), TypeError, "gi: expected a Tensor, got list"),
])
def test_op_arguments_are_validated(args, exc, match):
    with pytest.raises(exc, match=match):
        rnn.gru(*args)


def test_op_lengths_are_validated():
    with pytest.raises(RuntimeError, match=r"lengths: expected shape \(1,\), got \(2,\)"):
        rnn.gru(torch.randn(2, 1, 6), torch.randn(1, 2), torch.randn(6, 2), lengths=torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="lengths: expected an int32/int64 tensor"):
        rnn.lstm(torch.randn(2, 1, 8), torch.randn(1, 2), torch.randn(1, 2), torch.randn(8, 2),
                 lengths=torch.tensor([1.0]))
