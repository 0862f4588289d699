"""Helpers of bench/gpu_check.sh, run by path (``python bench/gpu_check.py COMMAND ...``).

Commands:

* ``env OUT.json``: versions, the device and its driver (``nvidia-smi``), torch's
  TF32 defaults, the ptxas Triton uses; printed and written.
* ``run REPO MODULE [ARGS...]``: run ``python -m MODULE ARGS`` with ``fastseq.bench``
  taken from ``REPO/bench`` whatever is installed (an editable install of another
  checkout maps ``fastseq.bench`` elsewhere; ``PYTHONPATH`` alone does not reach it,
  since ``bench/`` is not inside ``fastseq/``).
* ``junit-failed XML TEXT``: exit 0 if a test whose id contains ``TEXT`` failed or errored.
* ``merge-bench REPO OUT_DIR JSON...``: the ``fastseq bench`` results of the check's
  invocations as one ``bench.json`` and ``bench.md``.
* ``summary W OUT``: ``OUT/summary.json`` from the stage table ``W/stages.tsv`` and
  whatever the stages left (never fails on a missing or broken input).

Standard library only, except ``env`` (torch, and Triton if present) and
``merge-bench`` (fastseq's report module).
"""
from __future__ import annotations

import datetime
import glob
import importlib
import importlib.util
import json
import os
import platform
import runpy
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Any, Dict, List

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # run as a script: bench/'s modules (core, report, run, ...) must not be top-level names


def _alias_bench(repo: str) -> None:
    """Make ``fastseq.bench`` the package in ``repo/bench`` (before anything imports it)."""
    import fastseq

    path = os.path.join(repo, "bench")
    spec = importlib.util.spec_from_file_location("fastseq.bench", os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastseq.bench"] = mod
    spec.loader.exec_module(mod)
    fastseq.bench = mod


def cmd_run(repo: str, module: str, *args: str) -> None:
    _alias_bench(repo)
    sys.argv = [module] + list(args)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _version(name: str) -> str:
    try:
        return str(importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        return f"missing: {type(exc).__name__}"


def _cmd(args: List[str], timeout: float = 20) -> str:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        return (p.stdout or p.stderr).strip()
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {type(exc).__name__}: {exc}"


def cmd_env(out: str) -> None:
    env: Dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                           "nproc": os.cpu_count(), "machine": platform.machine(),
                           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    for m in ("torch", "triton", "numpy", "pytest", "xdist", "pytest_timeout", "hypothesis", "setuptools", "ninja",
              "flashrnn", "einops", "matplotlib"):
        env[m] = _version(m)
    import torch

    env["torch_cuda"] = torch.version.cuda
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    try:
        env["cudnn_rnn_fp32_precision"] = torch.backends.cudnn.rnn.fp32_precision
    except Exception as exc:  # noqa: BLE001 - API differs between torch versions
        env["cudnn_rnn_fp32_precision"] = f"unavailable: {type(exc).__name__}"
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        env["CUDA_HOME"] = CUDA_HOME
        nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
        env["nvcc"] = _cmd([nvcc, "--version"]).splitlines()[-1] if nvcc else None
    except Exception as exc:  # noqa: BLE001
        env["nvcc"] = f"unavailable: {exc}"
    env["gcc"] = _cmd(["gcc", "--version"]).splitlines()[0] if shutil.which("gcc") else None
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   mem_gib=round(p.total_memory / 2 ** 30, 1),
                   l2_mb=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1))
        q = ("name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,"
             "memory.used,memory.total,persistence_mode,compute_mode,mig.mode.current")
        env["nvidia_smi"] = _cmd(["nvidia-smi", f"--query-gpu={q}", "--format=csv"])
    try:
        from triton.backends.nvidia import compiler

        ptxas = compiler.get_ptxas(90).path
        env["triton_ptxas_sm90"] = {"path": ptxas, "version": _cmd([ptxas, "--version"]).splitlines()[-1]}
    except Exception as exc:  # noqa: BLE001
        env["triton_ptxas_sm90"] = f"unavailable: {type(exc).__name__}: {exc}"
    try:
        from fastseq.backend import selection

        env["fastseq_triton_status"] = list(selection.triton_status())
    except Exception as exc:  # noqa: BLE001
        env["fastseq_import"] = f"{type(exc).__name__}: {exc}"
    with open(out, "w") as f:
        json.dump(env, f, indent=1)
    print(json.dumps(env, indent=1))


def _testcases(path: str):
    root = ET.parse(path).getroot()
    return root, list(root.iter("testcase"))


def cmd_junit_failed(path: str, text: str) -> int:
    try:
        _, cases = _testcases(path)
    except Exception:  # noqa: BLE001 - no report: nothing failed that we know of
        return 1
    for tc in cases:
        tid = f"{tc.get('classname')}::{tc.get('name')}"
        if text in tid and (tc.find("failure") is not None or tc.find("error") is not None):
            return 0
    return 1


def junit(path: str) -> Any:
    if not os.path.exists(path):
        return "missing"
    try:
        root, cases = _testcases(path)
    except Exception as exc:  # noqa: BLE001
        return f"unparsable: {exc}"
    suites = [root] if root.tag == "testsuite" else list(root)
    agg: Dict[str, Any] = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
    agg["time_s"] = round(sum(float(x.get("time", 0)) for x in suites), 1)
    bad, skips = [], {}
    for tc in cases:
        for tag in ("failure", "error"):
            el = tc.find(tag)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                bad.append(f"{tc.get('classname')}::{tc.get('name')} [{tag}] {(msg[0] if msg else '')[:240]}")
        el = tc.find("skipped")
        if el is not None:
            m = (el.get("message") or "")[:120]
            skips[m] = skips.get(m, 0) + 1
    agg["failed"] = bad[:60]
    agg["skip_reasons"] = skips
    return agg


def _load(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {type(exc).__name__}: {exc}"


def cmd_merge_bench(repo: str, out_dir: str, *files: str) -> None:
    _alias_bench(repo)
    from fastseq.bench import report

    parts = [p for p in (_load(f) for f in files) if isinstance(p, dict)]
    if not parts:
        print("merge-bench: no bench results")
        return
    merged = dict(parts[0])
    merged["records"] = [r for p in parts for r in p.get("records", [])]
    merged["errors"] = [e for p in parts for e in p.get("errors", [])]
    merged["command"] = " ; ".join(p.get("command", "") for p in parts)
    merged["parts"] = [{k: p.get(k) for k in ("command", "date", "ceilings")} for p in parts]
    report.write_json(merged, __import__("pathlib").Path(out_dir, "bench.json"))
    report.write_markdown(merged, __import__("pathlib").Path(out_dir, "bench.md"))
    print(f"merge-bench: {len(merged['records'])} records, {len(merged['errors'])} errors from {len(parts)} runs")


def _tail(path: str, n: int = 15) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            return [ln[:300] for ln in f.read().splitlines()[-n:]]
    except OSError as exc:
        return [repr(exc)]


def cmd_summary(w: str, out: str) -> None:
    s: Dict[str, Any] = {"dry": os.environ.get("GPU_CHECK_MODE") == "dry",
                         "written": datetime.datetime.now().isoformat(timespec="seconds"),
                         "budget_s": int(os.environ.get("BUDGET_S", "0") or 0),
                         "stages": []}
    try:
        start = int(open(os.path.join(w, "start")).read().strip())
        s["wall_s"] = round(datetime.datetime.now().timestamp() - start, 1)
    except (OSError, ValueError):
        pass
    try:
        lines = open(os.path.join(w, "stages.tsv")).read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split("\t")
        if len(parts) < 4:
            continue
        name, rc, ms, t = parts[:4]
        status = ("skipped" if rc == "skipped" else "ok" if rc == "0" else
                  "timeout" if rc in ("124", "137") else "failed")
        st = {"stage": name, "rc": rc, "status": status, "s": round(int(ms) / 1000, 1), "timeout_s": int(t)}
        if status in ("failed", "timeout"):
            st["log_tail"] = _tail(os.path.join(w, f"{name}.log"))
        s["stages"].append(st)
    s["env"] = _load(os.path.join(w, "env.json"))
    s["ext"] = _load(os.path.join(w, "ext.json"))
    s["junit"] = {n: junit(os.path.join(out, f"junit_{n}.xml")) for n in ("gpu", "parity")}
    if os.path.exists(os.path.join(w, "junit_parity_notf32.xml")) or os.path.exists(
            os.path.join(out, "junit_parity_notf32.xml")):
        p = os.path.join(out, "junit_parity_notf32.xml")
        s["junit"]["parity_notf32"] = junit(p if os.path.exists(p) else os.path.join(w, "junit_parity_notf32.xml"))
    if os.path.exists(os.path.join(w, "junit_persistent.xml")):  # the test_persistent stage (GPU only)
        s["junit"]["persistent"] = junit(os.path.join(w, "junit_persistent.xml"))
    b = _load(os.path.join(out, "bench.json"))
    if isinstance(b, dict):
        recs = b.get("records", [])
        s["bench"] = {"records": len(recs), "errors": b.get("errors", [])[:40], "ceilings": b.get("ceilings"),
                      "brief": [f"{r['suite']} {r['case']} {r['dtype']} {r['impl']}: {r['median_ms']:.4g} ms"
                                for r in recs][:150]}
    else:
        s["bench"] = b
    k = _load(os.path.join(out, "kernels.json"))
    if isinstance(k, dict):
        rows = k.get("kernels", [])
        s["kernels"] = {key: k.get(key) for key in ("triton", "mode", "grid", "n_kernels", "n_spilling", "ptxas",
                                                    "stub_s", "cuda_s", "wall_s")}
        s["kernels"]["errors"] = k.get("errors", [])[:20]
        s["kernels"]["spilling"] = [
            f"{r['kernel']} {r['constexprs']} {r['pointer_dtypes'].get('h_ptr', '')}: regs {r.get('regs')}, "
            f"spill {r.get('spill_stores')}/{r.get('spill_loads')} B, stack {r.get('stack_frame')}, "
            f"smem {r['shared']}; {','.join(r['used_by'][:3])}"
            for r in rows if (r.get("spill_stores") or 0) > 0][:40]
        s["kernels"]["not_launched"] = sum(1 for r in rows if k.get("mode") == "stub+cuda" and not r.get("launched"))
    else:
        s["kernels"] = k
    s["files"] = {os.path.relpath(p, out): os.path.getsize(p)
                  for p in sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True)) if os.path.isfile(p)}
    s["ok"] = all(st["status"] in ("ok", "skipped") for st in s["stages"]) and bool(s["stages"])
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    brief = {"ok": s["ok"], "wall_s": s.get("wall_s"),
             "stages": [f"{st['stage']}: {st['status']} ({st['rc']}) {st['s']} s / {st['timeout_s']} s"
                        for st in s["stages"]]}
    for n, j in s["junit"].items():
        brief[f"junit_{n}"] = ({key: j[key] for key in ("tests", "failures", "errors", "skipped", "time_s")}
                               if isinstance(j, dict) else j)
    if isinstance(s.get("kernels"), dict):
        brief["kernels"] = {key: s["kernels"].get(key) for key in ("n_kernels", "n_spilling", "mode")}
    if isinstance(s.get("bench"), dict):
        brief["bench"] = {"records": s["bench"]["records"], "errors": len(s["bench"]["errors"])}
    print(json.dumps(brief, indent=1))


def main(argv: List[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "run":
        cmd_run(*args)
        return 0
    if cmd == "env":
        cmd_env(*args)
        return 0
    if cmd == "junit-failed":
        return cmd_junit_failed(*args)
    if cmd == "merge-bench":
        cmd_merge_bench(*args)
        return 0
    if cmd == "summary":
        cmd_summary(*args)
        return 0
    print(f"unknown command {cmd!r}\n{__doc__}")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
