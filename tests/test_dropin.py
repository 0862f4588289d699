"""The drop-in contract, checked against torch.nn itself: importing fastseq changes
no torch setting; warnings name the user's line; validation stays right when a
lengths/mask tensor is refilled in place; a patched model saves and loads like a
torch.nn one (state_dict both ways, unpatch for a plain pickle).

The exception classes are checked against torch.nn's, input by input, in
tests/reliability/test_rel_inputs.py (``bad-nn.*`` cases); the backend's per-thread
scope in tests/test_backend.py."""
import io
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from parity import assert_close

import fastseq
import fastseq.nn as fnn
from conftest import available
from fastseq import ops
from fastseq.backend import limits, registry, warn

ROOT = Path(__file__).resolve().parent.parent


def test_import_changes_no_torch_global():
    """A fresh interpreter: every Dynamo/Inductor-independent torch setting and every
    Dynamo config value is the same before and after ``import fastseq`` (and its
    nn, ops and backend modules)."""
    script = textwrap.dedent("""
        import json, warnings
        import torch, torch._dynamo

        def snapshot():
            b = torch.backends
            return {
                "dynamo": {k: repr(v) for k, v in torch._dynamo.config.get_config_copy().items()},
                "default_dtype": str(torch.get_default_dtype()),
                "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(),
                "grad": torch.is_grad_enabled(),
                "deterministic": torch.are_deterministic_algorithms_enabled(),
                "matmul_precision": torch.get_float32_matmul_precision(),
                "cuda_tf32": b.cuda.matmul.allow_tf32,
                "cudnn": [b.cudnn.enabled, b.cudnn.benchmark, b.cudnn.deterministic, b.cudnn.allow_tf32],
                "mkldnn": b.mkldnn.enabled,
                "anomaly": torch.is_anomaly_enabled(),
                "warning_filters": repr(warnings.filters),
            }

        before = snapshot()
        import fastseq, fastseq.nn, fastseq.ops, fastseq.backend  # noqa: F401
        after = snapshot()
        print(json.dumps({"same": before == after, "allow_rnn": torch._dynamo.config.allow_rnn,
                          "diff": {k: [before[k], after[k]] for k in before if before[k] != after[k]}}))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"same": True, "allow_rnn": False, "diff": {}}


def test_limit_warning_names_the_callers_line(monkeypatch):
    """A warning raised deep inside an op called through torch.nn.Module.__call__ is
    attributed to this file, so ``filterwarnings(module=...)`` written for user code works."""
    monkeypatch.setattr(warn, "_warned", set())
    for op in ("gru_recurrence", "gru_recurrence_backward"):
        impl = registry.Implementation(registry.get(op, "reference").fn, limits=lambda sizes: limits.Unsupported(
            "grid", f"H={sizes['H']} (test limit)"))
        monkeypatch.setitem(registry._REGISTRY[op], "cpp", impl)
        monkeypatch.setitem(registry._REGISTRY[op], "triton", impl)
    registry.clear_decisions()
    gru = fnn.GRU(4, 3)
    backend = "cpp" if available("cpp", "cpu") else "triton" if available("triton", "cpu") else None
    if backend is None:
        pytest.skip("needs a fused backend")
    with fastseq.backend(backend), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        gru(torch.randn(2, 1, 4))  # the line the warning must name
    registry.clear_decisions()
    hits = [w for w in record if "cannot take this shape" in str(w.message)]
    assert len(hits) == 1 and hits[0].filename == __file__, [(w.filename, str(w.message)) for w in record]
    # and a user's module filter matches it
    monkeypatch.setattr(warn, "_warned", set())
    with fastseq.backend(backend), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module="test_dropin")
        gru(torch.randn(2, 1, 4))
    registry.clear_decisions()
    assert [w for w in record if "cannot take this shape" in str(w.message)] == []


def test_patch_warning_names_the_callers_line():
    model = torch.nn.Sequential(torch.nn.LSTM(4, 6, proj_size=3))
    with pytest.warns(UserWarning, match="proj_size=3") as record:
        fastseq.patch(model)
    assert record[0].filename == __file__
    assert type(model[0]) is torch.nn.LSTM


@pytest.mark.parametrize("refill", ["lengths", "mask"])
def test_refilled_lengths_or_mask_are_checked_again(backend, refill):
    """A lengths/mask tensor passed once (valid) and then refilled in place with an
    invalid value is rejected on the next call, not silently used (the check is
    cached per tensor *version*)."""
    q, k, v, e = torch.randn(2, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(4)
    if refill == "lengths":
        lengths = torch.tensor([3, 2])
        ops.additive_attention(q, k, v, e, lengths=lengths)
        lengths[1] = 0
        with pytest.raises(RuntimeError, match="lengths: every source needs length >= 1"):
            ops.additive_attention(q, k, v, e, lengths=lengths)
        gi, h0, w = torch.randn(3, 2, 6), torch.randn(2, 2), torch.randn(6, 2)
        lens = torch.tensor([3, 1])
        ops.gru(gi, h0, w, lengths=lens)
        lens.fill_(4)
        with pytest.raises(RuntimeError, match="lengths: expected every length <= T = 3, got 4"):
            ops.gru(gi, h0, w, lengths=lens)
    else:
        mask = torch.tensor([[True, True, False], [True, False, False]])
        ops.additive_attention(q, k, v, e, mask=mask)
        mask[1] = False  # an all-False row: a zero-length source
        with pytest.raises(RuntimeError, match="mask: row 1 has no True entry"):
            ops.additive_attention(q, k, v, e, mask=mask)


def test_checks_are_cached_per_version(monkeypatch):
    """The cost side: an unchanged tensor is looked at once (a decoder pays one sync per batch)."""
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t, *a, **k: calls.append(1) or real(t, *a, **k))
    q, k, v, e = torch.randn(2, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(4)
    lengths = torch.tensor([3, 2])
    with fastseq.backend("reference"):
        for _ in range(3):
            ops.additive_attention(q, k, v, e, lengths=lengths)
        assert len(calls) == 1
        lengths[0] = 2  # a write bumps the version: checked again, once
        for _ in range(2):
            ops.additive_attention(q, k, v, e, lengths=lengths)
        assert len(calls) == 2
        with torch.inference_mode():  # no version counter: checked every call
            frozen = torch.tensor([3, 2])
            for _ in range(2):
                ops.additive_attention(q, k, v, e, lengths=frozen)
        assert len(calls) == 4


class _Tagger(torch.nn.Module):
    """A model as users write it: torch.nn recurrent modules inside."""

    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.GRU(5, 7, num_layers=2, bidirectional=True, batch_first=True)
        self.cell = torch.nn.LSTMCell(14, 6)
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        h, _ = self.cell(y[:, -1])
        return self.out(h)


def test_patched_state_dict_loads_into_torch_nn_and_back():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5)
    plain = _Tagger()
    want = plain(x)
    patched = fastseq.patch(_Tagger())
    assert type(patched.rnn) is fnn.GRU and type(patched.cell) is fnn.LSTMCell
    patched.load_state_dict(plain.state_dict())  # torch.nn -> fastseq
    assert list(patched.state_dict()) == list(plain.state_dict())
    assert_close(patched(x), want)
    fresh = _Tagger()
    fresh.load_state_dict(patched.state_dict())  # fastseq -> torch.nn
    assert_close(fresh(x), want)
    buf = io.BytesIO()
    torch.save(patched.state_dict(), buf)  # a state_dict file: plain tensors
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert_close(fresh(x), want)


def test_torch_save_of_a_patched_model():
    """torch.save(model) pickles classes: a patched model loads (with fastseq installed)
    as fastseq modules; after unpatch() it is plain torch.nn and loads without fastseq."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5)
    model = fastseq.patch(_Tagger())
    want = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.rnn) is fnn.GRU
    assert_close(loaded(x), want)
    fastseq.unpatch(model)
    assert type(model.rnn) is torch.nn.GRU and type(model.cell) is torch.nn.LSTMCell
    buf = io.BytesIO()
    torch.save(model, buf)
    assert b"fastseq" not in buf.getvalue()
    assert_close(model(x), want)
