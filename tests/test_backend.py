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
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'triton', 'reference'\), got 'cuDNN'"):
        fastseq.set_backend("cuDNN")
    monkeypatch.setenv("FASTSEQ_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTSEQ_BACKEND"):
        fastseq.get_backend()


def test_auto_uses_reference_on_cpu_and_float64():
    with fastseq.backend("auto"):
        assert _backend.select(torch.empty(1)) == "reference"
        assert _backend.select(torch.empty(1, dtype=torch.float64)) == "reference"


def test_forced_triton_explains_why_it_cannot_run(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the Triton backend can run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gi, h0, w = torch.randn(2, 1, 6), torch.randn(1, 2), torch.randn(6, 2)
    with fastseq.backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rnn.gru(gi, h0, w)
    with fastseq.backend("triton"), pytest.raises(RuntimeError, match="dtype torch.float64"):
        rnn.gru(gi.double(), h0.double(), w.double())
