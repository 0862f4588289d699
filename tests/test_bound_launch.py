"""Bound step loops (:func:`fastseq.ops.triton_utils.launch_steps`) pass the GPU exactly
what Triton's full launch path passes, step by step.

Runs tests/bound_launch_probe.py in a subprocess on the stub driver
(bench/stubdriver.py: Triton's real CUDA driver and C launcher, a stand-in
libcuda whose ``cuLaunchKernelEx`` records each launch's grid and parameter bytes):
the GRU forward, the GRU backward with lengths and the packed LSTM backward (None
arguments around the step index), in float32 and bfloat16."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TRITON

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not TRITON or shutil.which("gcc") is None, reason="needs Triton and a C compiler")
def test_bound_step_loops_pass_the_same_launches_as_tritons_launch_path():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import stubdriver
    finally:
        sys.path.pop(0)
    env = stubdriver.subprocess_env(stubdriver.build())
    env["PYTHONPATH"] = str(ROOT)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "bound_launch_probe.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(cases) == 6
    for c in cases:
        n = len(c["steps"])
        assert c["launches"] == [n, n], c
        assert c["equal"], f"{c['case']}: the bound launches' grids or parameters differ from Triton's launch path"
        assert c["s_values"] == c["steps"], c  # the step index is the one parameter that changes
        assert c["params"] >= 10, c
