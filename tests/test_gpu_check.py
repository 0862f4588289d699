"""bench/gpu_check.sh, the first GPU check, in its dry mode (CPU, tiny sizes): every stage
runs and records its exit code, the summary is always written, every JSON parses, at most
8 files come back, and the checkout is left as it was."""
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ["env", "install", "flashrnn", "ext", "kernels", "test_gpu", "test_persistent", "bench_sync", "parity",
          "parity_notf32", "bench", "bench_persistent", "test_tagged", "bench_step", "bench_more"]
MUST_PASS = ["env", "install", "ext", "kernels", "test_gpu", "parity", "bench", "bench_step", "bench_more"]


def _git_status():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    proc = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=all"],
                          capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


@pytest.mark.slow
def test_dry_run_writes_a_summary_of_every_stage(tmp_path):
    pytest.importorskip("triton")
    for tool in ("bash", "timeout", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT", "BUDGET_S")}
    env.update(GPU_CHECK_DRY="1", OUT=str(out), PY=sys.executable, TMPDIR=str(tmp_path))
    before = _git_status()
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=900)
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry"] is True, log
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == STAGES, (list(stages), log)
    for name, s in stages.items():
        assert s["rc"] != "", name
    for name in MUST_PASS:
        assert stages[name]["status"] == "ok", (name, stages[name], log)
    assert stages["flashrnn"]["status"] == stages["parity_notf32"]["status"] == "skipped"
    assert stages["test_persistent"]["status"] == stages["bench_persistent"]["status"] == "skipped"  # no device
    assert stages["bench_sync"]["status"] == stages["test_tagged"]["status"] == "skipped"
    assert summary["wall_s"] < 600

    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text())
        if p.suffix == ".xml":
            ET.parse(p)
    assert summary["junit"]["gpu"]["skipped"] == summary["junit"]["gpu"]["tests"] > 0  # no device: all skip
    assert summary["junit"]["parity"]["tests"] > 0 and summary["junit"]["parity"]["failures"] == 0

    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["n_kernels"] >= 4 and not kernels["errors"]
    for row in kernels["kernels"]:
        assert isinstance(row["regs"], int) and row["regs"] > 0, row
        assert row["spill_stores"] is not None and row["shared"] >= 0, row
        if isinstance(row.get("cubin"), dict):
            assert row["cubin"]["REG"] == row["regs"], row

    bench = json.loads((out / "bench.json").read_text())
    from fastseq.bench.suites import NAMES

    assert {r["suite"] for r in bench["records"]} == set(NAMES), bench.get("errors")  # every suite, tiny grid
    host = [r for r in bench["records"] if r["suite"] == "host"]
    assert {r["impl"] for r in host} >= {"fastseq-triton", "bare-triton-launch"}, host
    for r in host:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"], r
        assert "host time per launch, stub driver" in r["note"], r

    assert not (ROOT / "fastseq" / "_C_gpucheck.so").exists()
    assert _git_status() == before
