"""Backend selection: FASTSEQ_BACKEND, set_backend, the context manager, clear errors."""
import pytest
import torch

import fastseq
from fastseq import _backend
from fastseq.ops import rnn


def test_env_and_context_manager(monkeypatch):
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    assert fastseq.get_backend() == "reference"
    with fastseq.backend("auto"):
        assert fastseq.get_backend() == "auto"
        with fastseq.backend("triton"):
            assert fastseq.get_backend() == "triton"
        assert fastseq.get_backend() == "auto"
    assert fastseq.get_backend() == "reference"


def test_bad_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'triton', 'cuda', 'cpp', 'reference'\), got 'cuDNN'"):
        fastseq.set_backend("cuDNN")
    monkeypatch.setenv("FASTSEQ_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTSEQ_BACKEND"):
        fastseq.get_backend()


def test_auto_on_cpu_uses_the_cpp_extension_when_it_builds():
    ok, _ = _backend.cpp_status()
    with fastseq.backend("auto"):
        assert _backend.select(torch.empty(1)) == ("cpp" if ok else "reference")
        assert _backend.select(torch.empty(1, dtype=torch.float64)) == ("cpp" if ok else "reference")
        assert _backend.select(torch.empty(1, dtype=torch.bfloat16)) == "reference"


def test_failed_cpp_build_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backend, "cpp_status", lambda: (False, "CalledProcessError: g++ failed"))
    monkeypatch.setattr(_backend, "_warned", set())
    with fastseq.backend("auto"):
        with pytest.warns(RuntimeWarning, match="C.. extension is unavailable .CalledProcessError: g.. failed."):
            assert _backend.select(torch.empty(1)) == "reference"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _backend.select(torch.empty(1)) == "reference"  # warned once only
        out = rnn.gru(torch.randn(2, 1, 6), torch.randn(1, 2), torch.randn(6, 2))
        assert out.shape == (2, 1, 2)
    with fastseq.backend("cpp"), pytest.raises(RuntimeError, match="FASTSEQ_BACKEND=cpp, but it cannot run here: CalledProcessError"):
        _backend.select(torch.empty(1))


def test_forced_cuda_backend_needs_cuda_tensors():
    with fastseq.backend("cuda"), pytest.raises(RuntimeError, match="the 'cuda' backend takes CUDA tensors"):
        _backend.select(torch.empty(1))


def test_forced_triton_explains_why_it_cannot_run(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the Triton backend can run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gi, h0, w = torch.randn(2, 1, 6), torch.randn(1, 2), torch.randn(6, 2)
    with fastseq.backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rnn.gru(gi, h0, w)
    with fastseq.backend("triton"), pytest.raises(RuntimeError, match="dtype torch.float64"):
        rnn.gru(gi.double(), h0.double(), w.double())


def test_env_var_forces_triton_on_cpu_under_the_interpreter(monkeypatch):
    if "triton" not in __import__("conftest").BACKENDS or torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter on a CPU machine")
    monkeypatch.setenv("FASTSEQ_BACKEND", "triton")
    assert _backend.select(torch.empty(1)) == "triton"
    calls = []
    from fastseq.ops.triton import rnn as tri

    real = tri.gru_recurrence_forward
    monkeypatch.setattr(tri, "gru_recurrence_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    rnn.gru(torch.randn(2, 1, 6), torch.randn(1, 2), torch.randn(6, 2))
    assert calls == [1]


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 1, 5), torch.randn(1, 2), torch.randn(6, 2)), r"gi: expected size\(2\) == 3\*H = 6"),
    ((torch.randn(2, 6), torch.randn(1, 2), torch.randn(6, 2)), "gi: expected a 3-D tensor"),
    ((torch.randn(2, 1, 6), torch.randn(3, 2), torch.randn(6, 2)), r"h0: expected shape \(B, H\) = \(1, 2\), got \(3, 2\)"),
    ((torch.randn(2, 1, 6), torch.randn(1, 2), torch.randn(2, 6)), r"w_hh: expected shape \(6, 2\), got \(2, 6\)"),
    ((torch.randn(2, 1, 6), torch.randn(1, 2, dtype=torch.float64), torch.randn(6, 2)), "h0: expected dtype torch.float32"),
])
def test_op_arguments_are_validated(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rnn.gru(*args)


def test_op_lengths_are_validated():
    with pytest.raises(ValueError, match=r"lengths: expected shape \(1,\), got \(2,\)"):
        rnn.gru(torch.randn(2, 1, 6), torch.randn(1, 2), torch.randn(6, 2), lengths=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="lengths: expected an int32/int64 tensor"):
        rnn.lstm(torch.randn(2, 1, 8), torch.randn(1, 2), torch.randn(1, 2), torch.randn(8, 2),
                 lengths=torch.tensor([1.0]))
