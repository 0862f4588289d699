"""Host (Python) time per launched step of fastseq's Triton kernels.

fastseq's recurrences launch one kernel per time step and the decoder step three per
token, so the host's time per launch bounds them whenever a step's GPU work is
shorter (bench/NOTES.md v0.1, v0.2). This suite measures that time without a GPU:
a subprocess (``bench/host_probe.py``, ``TRITON_INTERPRET`` unset) runs Triton's own
CUDA driver and C launcher on a stand-in ``libcuda.so.1`` whose ``cuLaunchKernelEx``
does nothing (:mod:`fastseq.bench.stubdriver`), and times the real launch functions
on CPU tensors. The stand-in never reaches this process.

Cases (``host-<op>-<sizes>``), per dtype (float32 and bfloat16; the tiny grid: the
run's dtypes):

* ``gru-fwd``, ``lstm-fwd``: one forward call over T steps, per launch (T launches);
* ``gru-bwd``, ``lstm-bwd``: one backward call, per launch (T + 1 launches; the
  weight-gradient product after the loop is left out);
* ``attention-fwd``: the decoder step's attention (one query, a mask), 1 launch;
* ``cell-fwd``: the decoder's fused GRU cell, 1 launch;
* ``decode-fwd``, ``decode-bwd``: the teacher-forced decoder on the Triton kernels, T calls
  of ``attention_gru_step`` (impl ``fastseq-triton-step-loop``) vs one
  ``attention_gru_decode`` (impl ``fastseq-triton-decode-op``), per decoder step, at
  the probe's own small sizes (``host_probe.DECODE_SIZES``: its matrix products run
  on the CPU); float32 only;
* ``bare-3arg``: a 3-argument kernel (pointer, int, constexpr), for reference
  (impl ``bare-triton-launch``);
* the GRU forward's step kernel launched through Triton's full launch path at every
  step (impl ``triton-jit-path``), for comparison: fastseq's step loops launch the
  first step that way and the others through the compiled kernel's launcher
  (:func:`fastseq.ops.triton_utils.launch_steps`).

Records: ``median_ms``/``min_ms``/``max_ms`` are the time per launch in ms over the
rounds, with a ``note`` saying how it was measured.

On a GPU (``--device cuda``) the suite also times the same calls on CUDA tensors
through the real driver in this process (impl suffix ``@cuda-driver``): host time of
the calls with the GPU's queue drained before each, so the launch itself is
included. That is the figure to compare with the GPU time per step; the stub figure
says how much of it is Python, and is what this suite reports on a CPU machine.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

from fastseq.bench import host_probe, stubdriver
from fastseq.bench.core import Context, Record

SUITE = "host"
PROBE = Path(host_probe.__file__).resolve()
TIMEOUT_S = 600


def configs(ctx: Context) -> List[Dict[str, Any]]:
    """The probe configurations of the run's grid."""
    if ctx.grid.tiny:
        return [dict(B=4, H=32, T=8, S=8, rounds=ctx.rounds, calls=8, prebound=False,
                     ops=["gru-fwd", "lstm-fwd", "attention-fwd", "cell-fwd", "bare"],
                     dtypes=[str(d).replace("torch.", "") for d in ctx.dtypes])]
    both = ["float32", "bfloat16"]
    base = dict(B=64, H=512, T=128, rounds=ctx.rounds, dtypes=both)
    return ctx.grid.pick(tiny=None, quick=[base], cpu=[base],
                         full=[base, dict(base, B=256, H=1024, prebound=False)])


def _fastseq_root() -> str:
    import fastseq

    return str(Path(fastseq.__file__).resolve().parent.parent)


def run_probe(cfg: Dict[str, Any], timeout: float = TIMEOUT_S) -> Dict[str, Any]:
    """Run ``host_probe.py`` on the stub driver in a subprocess and return its JSON.

    The subprocess imports the same fastseq as this process (its folder first on
    ``PYTHONPATH``).

    Raises:
        RuntimeError: the stand-in driver did not build, or the probe failed (its output's end).
    """
    lib = stubdriver.build()
    env = stubdriver.subprocess_env(lib)
    env["PYTHONPATH"] = os.pathsep.join([_fastseq_root()] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    proc = subprocess.run([sys.executable, str(PROBE), json.dumps(cfg)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"host probe failed (rc {proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _records(ctx: Context, result: Dict[str, Any], impl_suffix: str = "") -> None:
    for c in result["cases"]:
        ms = [u / 1e3 for u in c["us"]]
        note = f"{c['note']} (Triton {result['triton']}, torch {result['torch']})"
        rec = Record(SUITE, c["case"], c["impl"] + impl_suffix, c["dtype"], statistics.median(ms), min(ms), max(ms),
                     len(ms), None, note)
        ctx.records.append(rec)
        if ctx.verbose:
            print(f"[{SUITE}] {c['case']} {c['dtype']} {rec.impl}: median {rec.median_ms * 1e3:.2f} us per launch "
                  f"(min {rec.min_ms * 1e3:.2f}, max {rec.max_ms * 1e3:.2f}, n {rec.n})", flush=True)


def run(ctx: Context) -> None:
    for cfg in configs(ctx):
        what = f"{SUITE} B{cfg['B']} H{cfg['H']} T{cfg['T']}"
        ctx.attempt(f"{what} (stub driver)", lambda cfg=cfg: _records(ctx, run_probe(cfg)))
        if ctx.cuda:
            def real(cfg=cfg):
                result = host_probe.measure(dict(cfg, dtypes=[str(d).replace("torch.", "") for d in ctx.dtypes]),
                                            "cuda")
                _records(ctx, result, "@cuda-driver")
            ctx.attempt(f"{what} (CUDA driver)", real)
