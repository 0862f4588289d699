"""The ``host`` benchmark suite: host time per launch of the Triton kernels on the stub driver
(a subprocess running Triton's own CUDA driver and launcher on a stand-in libcuda)."""
import os
import shutil

import pytest
import torch

from conftest import TRITON


@pytest.mark.skipif(not TRITON or shutil.which("gcc") is None, reason="needs Triton and a C compiler")
def test_host_suite_times_every_launch_on_the_stub_driver():
    from fastseq.bench.core import Context, Grid
    from fastseq.bench.suites import host

    ctx = Context(device=torch.device("cpu"), dtypes=[torch.float32], grid=Grid("tiny"), rounds=2, verbose=False)
    host.run(ctx)
    assert not ctx.errors, ctx.errors
    by = {(r.case, r.impl): r for r in ctx.records}
    assert set(by) == {
        ("host-gru-fwd-B4-H32-T8", "fastseq-triton"), ("host-lstm-fwd-B4-H32-T8", "fastseq-triton"),
        ("host-attention-fwd-B4-S8-A32-D64-T1", "fastseq-triton"), ("host-cell-fwd-B4-H32-D64", "fastseq-triton"),
        ("host-bare-3arg", "bare-triton-launch"),
    }
    for r in ctx.records:
        assert r.suite == "host" and r.dtype == "float32" and r.n == 2
        assert 0 < r.min_ms <= r.median_ms <= r.max_ms < 50, r  # ms per launch
        assert r.note.startswith("host time per launch, stub driver"), r.note
    # The stand-in driver stayed in the subprocess.
    assert "FASTSEQ_STUB_DRIVER" not in os.environ


def test_stub_driver_refuses_a_process_not_started_for_it():
    from fastseq.bench import stubdriver

    with pytest.raises(RuntimeError, match="stub driver"):
        stubdriver.activate()
