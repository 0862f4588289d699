"""Every fastseq Triton kernel as the host code launches it: registers, spills, shared memory.

    python -m fastseq.bench.kernels --out kernels.json            # the full grid
    python -m fastseq.bench.kernels --out k.json --grid tiny      # a few kernels (CI, the dry GPU check)
    python -m fastseq.bench.kernels --grid ci --mode stub --out bench/results/   # the suites' sizes

``--grid ci`` is every launch of the benchmark suites' GPU grids (:func:`suite_jobs`);
tests/test_kernel_resources.py runs it (no GPU needed) and asserts no spills, tensor
cores in the half-precision kernels' products and none in IEEE float32. From a
checkout whose installed ``fastseq.bench`` is another one, or with another Python
(e.g. the Triton 3.6 one)::

    PY=/tmp/venv36/bin/python; PYTHONPATH=$PWD $PY bench/gpu_check.py run $PWD fastseq.bench.kernels \
        --grid ci --mode stub --out bench/results/     # -> kernels-sm90a-triton3.6.0-<date>.json
    PYTHONPATH=$PWD $PY -m pytest -q tests/test_kernel_resources.py   # the same assertions

The kernels are not compiled from hand-written constexprs: the real launch functions
(``fastseq/ops/<op>/triton.py``) are called for a grid of sizes and dtypes, so every
specialisation is exactly what the host code picks (``pick_blocks``, the attention's
block choice, the ``@triton.heuristics`` flags, Triton's divisibility
specialisation of pointers and sizes). Without a GPU (``--mode stub``) they run on
CPU tensors in worker processes on the stub driver (:mod:`fastseq.bench.stubdriver`):
Triton compiles each variant for sm_90a with its own ptxas, and the launch itself
is skipped. On a GPU (``--mode cuda``, or ``auto`` there) the stub pass runs first
(in parallel; it fills Triton's cache) and then the same calls run on CUDA tensors
in this process, so each row also says whether that specialisation was actually
launched, with the driver's register and local-memory figures.

Resources per compiled kernel:

* ``regs``, ``spill_stores``, ``spill_loads``, ``stack_frame``: ptxas's ``-v``
  report, from running the ptxas Triton used (its version is recorded) on the
  kernel's PTX with Triton's flags again (Triton discards that report);
* ``cubin``: ``cuobjdump -res-usage`` of the cubin Triton built (``REG``,
  ``STACK``, ``SHARED``, ``LOCAL``), which checks the re-run (its ``REG`` must equal
  ``regs``);
* ``shared``: the dynamic shared memory Triton launches the kernel with;
  ``num_warps``, ``num_stages``;
* ``sass``: static instruction counts in the cubin's SASS (``cuobjdump -sass``,
  :func:`sass_counts`): the tensor-core ``HMMA`` (mma.sync), ``HGMMA`` (Hopper's
  wgmma), ``IMMA``..., and ``FFMA``, ``MUFU``, ``LDL``/``STL`` (local memory);
  ``mma``: ``{"tensor_cores": bool, "instructions": {"HMMA.16816.F32.BF16": n, ...}}``
  (the modifiers name the shape and operand types);
* ``n_dots``, ``dot_dtypes``: the kernel's ``tl.dot`` calls and their operand and
  accumulator types from its Triton IR (``["bf16*bf16->f32"]``; ``f32*f32->f32`` when
  half operands were cast to fp32 first) (:func:`dot_dtypes`); ``job_dtypes``: the
  dtypes of the jobs that launched it;
* on a GPU: ``driver_regs``, ``driver_local_bytes`` (``cuFuncGetAttribute``).

Sizes (``--grid full``): B in {8, 64, 256}, H in {512, 1024}, float32 and bfloat16,
for the GRU and LSTM recurrences (forward with and without saved gates, backward),
the decoder cell (D = 2H) and, at B = 64, lengths and packed input (both directions),
the attention (one query and 32; A = H, D = 2H, S = 32) and float32 with TF32
opted in. ``--grid ci``: :func:`suite_jobs` (about 200 jobs, about 210 kernels).

Output: ``{"triton", "torch", "arch", "ptxas", "mode", "grid", "jobs": [...],
"kernels": [rows], "errors": [...], "n_kernels", "n_spilling", "n_with_dot",
"n_tensor_cores"}``; a table on stdout.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__:
    from . import stubdriver
else:  # a worker, run as a script: bench/ is sys.path[0]
    import stubdriver

MODULES = ("fastseq.ops.recurrence.triton", "fastseq.ops.attention.triton", "fastseq.ops.decoder_step.triton")


# ------------------------------------------------------------------ the grid


GRIDS = ("tiny", "quick", "ci", "full")


def jobs(grid: str) -> List[Dict[str, Any]]:
    """The calls to make: one dict per (op, sizes, dtype, variant).

    Recurrence jobs (``op`` gru/lstm): ``saves`` (forward without/with the gates the
    backward needs; default both), ``bwd``, ``steps`` (time steps, default 2: the
    first and a later one), ``dense`` (the dense op, default True; ``lengths``: with
    per-row lengths), ``packed`` (the packed op: ``fwd``/``rev`` on ragged lengths,
    ``full-rev`` reversed on a full batch, which is how a dense bidirectional layer
    runs its reverse direction).
    """
    if grid == "ci":
        return suite_jobs()
    out: List[Dict[str, Any]] = []
    if grid == "tiny":  # the host suite's tiny cases exactly: one Triton cache fill serves both
        for kind in ("gru", "lstm"):
            out.append(dict(op=kind, B=4, H=32, dtype="float32", bwd=False, saves=[True]))
        out.append(dict(op="attention", B=4, T=1, S=8, A=32, D=64, dtype="float32", bwd=False))
        out.append(dict(op="cell", B=4, H=32, D=64, dtype="float32", bwd=False, saves=[False]))
        return out
    Bs, Hs = ((8, 64, 256), (512, 1024)) if grid == "full" else ((8, 256), (1024,))
    for dtype in ("float32", "bfloat16"):
        for B in Bs:
            for H in Hs:
                for kind in ("gru", "lstm"):
                    out.append(dict(op=kind, B=B, H=H, dtype=dtype, bwd=True))
                out.append(dict(op="cell", B=B, H=H, D=2 * H, dtype=dtype, bwd=True))
        if grid == "full":
            for H in Hs:
                for kind in ("gru", "lstm"):
                    out.append(dict(op=kind, B=64, H=H, dtype=dtype, bwd=True, lengths=True,
                                    packed=["fwd", "rev"]))
                for T in (1, 32):
                    out.append(dict(op="attention", B=64, T=T, S=32, A=H, D=2 * H, dtype=dtype, bwd=True))
    if grid == "full":
        for kind in ("gru", "lstm"):
            out.append(dict(op=kind, B=64, H=512, dtype="float32", bwd=True, tf32=True))
        out.append(dict(op="cell", B=64, H=512, D=1024, dtype="float32", bwd=True, tf32=True))
        out.append(dict(op="attention", B=64, T=32, S=32, A=512, D=1024, dtype="float32", bwd=True, tf32=True))
    return out


def suite_jobs(grids=("quick", "full"), dtypes=("float32", "bfloat16"),
               tf32_controls: bool = True) -> List[Dict[str, Any]]:
    """Every Triton launch the benchmark suites make on a GPU, as jobs (``--grid ci``).

    The ``layer``, ``cell``, ``attention`` and ``decoder_step`` suites' ``grids``
    (``quick``: the first GPU check; ``full``: ``fastseq bench`` on a GPU), read from
    the suites' own ``grid()`` functions, each in every one of ``dtypes``. Cases that
    launch one op at the same sizes are merged into one job (a layer's ``fwd`` and
    ``fwdbwd`` modes, its T = 32 and T = 128 runs, uni- and bidirectional: the
    recurrence kernels specialise on neither T nor the step).

    How the cases launch the kernels (fastseq.nn.rnn, fastseq.nn.cell, fastseq.seq2seq.model):

    * layer ``(kind, mode, B, H, T, bi, packed)``: dense input -> the dense op, and for a
      bidirectional layer the packed op reversed on a full batch (its reverse
      direction); packed input -> the packed op on ragged lengths (also reversed if
      bidirectional). ``fwd`` runs without the saved gates, ``fwdbwd`` with them and
      the backward;
    * cell ``(kind, mode, B, H)``: the dense recurrence op for one step;
    * attention ``(mode, B, T, S, A, D)``: with a mask;
    * decoder_step ``(mode, B, S, T)``: ``attention_gru_step`` per target token: the
      attention with one query and a mask (A = attn_size, D = 2 enc_hidden_size) and
      the GRU context cell (H = dec_hidden_size, D = 2 enc_hidden_size) of the
      ``multi30k-gpu`` model, the one the suite times on a GPU.

    ``tf32_controls``: also the ``full`` grid's four float32 jobs with TF32 opted in
    (labels ending ``-tf32``), where tensor cores are expected in float32: a positive
    control for the SASS count.
    """
    import torch

    from .core import Context, Grid, seq2seq_model
    from .suites import attention, cell, decoder_step, layer

    merged: Dict[tuple, Dict[str, Any]] = {}

    def add(job: Dict[str, Any]) -> None:
        key = tuple((k, job[k]) for k in ("op", "B", "T", "S", "A", "H", "D", "steps", "dtype") if k in job)
        m = merged.get(key)
        if m is None:
            merged[key] = dict(job, saves=list(job.get("saves", [])), packed=list(job.get("packed", [])))
            return
        m["saves"] = sorted(set(m["saves"]) | set(job.get("saves", [])))
        m["packed"] = sorted(set(m["packed"]) | set(job.get("packed", [])))
        m["bwd"] = m["bwd"] or job["bwd"]
        m["dense"] = m.get("dense", True) or job.get("dense", True)

    for name in grids:
        ctx = Context(device=torch.device("cuda"), dtypes=[], grid=Grid(name), verbose=False)
        cfg = seq2seq_model(ctx)
        for dtype in dtypes:
            for kind, mode, B, H, T, bi, packed in layer.grid(ctx):
                bwd = mode == "fwdbwd"
                if packed:
                    variants = dict(dense=False, packed=["fwd", "rev"] if bi else ["fwd"])
                else:
                    variants = dict(dense=True, packed=["full-rev"] if bi else [])
                add(dict(op=kind, B=B, H=H, dtype=dtype, bwd=bwd, saves=[bwd], steps=min(T, 2), **variants))
            for kind, mode, B, H in cell.grid(ctx):
                bwd = mode == "fwdbwd"
                add(dict(op=kind[:-len("cell")], B=B, H=H, dtype=dtype, bwd=bwd, saves=[bwd], steps=1, dense=True))
            for mode, B, T, S, A, D in attention.grid(ctx):
                add(dict(op="attention", B=B, T=T, S=S, A=A, D=D, dtype=dtype, bwd=mode == "fwdbwd"))
            for mode, B, S, T in decoder_step.grid(ctx):
                bwd, D = mode == "fwdbwd", 2 * cfg.enc_hidden_size
                add(dict(op="attention", B=B, T=1, S=S, A=cfg.attn_size, D=D, dtype=dtype, bwd=bwd))
                add(dict(op="cell", B=B, H=cfg.dec_hidden_size, D=D, dtype=dtype, bwd=bwd, saves=[bwd]))
    out = []
    for job in merged.values():
        for k in ("packed", "saves"):
            if not job[k]:
                del job[k]
        out.append(job)
    if tf32_controls:  # float32 with TF32 opted in (no suite's fastseq run): their dots must use tensor cores
        for op in ("gru", "lstm"):
            out.append(dict(op=op, B=64, H=512, dtype="float32", bwd=True, tf32=True))
        out.append(dict(op="cell", B=64, H=512, D=1024, dtype="float32", bwd=True, tf32=True))
        out.append(dict(op="attention", B=64, T=32, S=32, A=512, D=1024, dtype="float32", bwd=True, tf32=True))
    return out


def label(job: Dict[str, Any]) -> str:
    """``lstm-B256-H1024-bfloat16``, plus the variants that differ from the defaults."""
    parts = [job["op"]] + [f"{k}{job[k]}" for k in ("B", "T", "S", "A", "H", "D") if k in job]
    if job.get("steps", 2) != 2:
        parts.append(f"steps{job['steps']}")
    parts.append(job["dtype"])
    parts += [k for k in ("lengths", "tf32") if job.get(k)]
    if job.get("dense") is False:
        parts.append("nodense")
    if job.get("packed"):
        parts.append("packed:" + ",".join(job["packed"]))
    if not job.get("bwd"):
        parts.append("fwdonly")
    return "-".join(parts)


# ------------------------------------------------------------------ running the calls


def _run_job(job: Dict[str, Any], device: str) -> None:
    import torch

    from fastseq.ops.attention import triton as attn
    from fastseq.ops.decoder_step import triton as cell
    from fastseq.ops.recurrence import triton as rnn

    dt = getattr(torch, job["dtype"])
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    op, B = job["op"], job["B"]
    saves = job.get("saves", [False, True])  # forward without and with the gates the backward needs
    if op in ("gru", "lstm"):
        H, T, G = job["H"], job.get("steps", 2), 3 if op == "gru" else 4  # T = 2: first and later steps
        gi, h0, c0, w, b = rnd(T, B, G * H), rnd(B, H), rnd(B, H), rnd(G * H, H, scale=H ** -0.5), rnd(G * H)
        for save in saves:
            if not job.get("dense", True):
                break
            lens = torch.tensor([T] + [1] * (B - 1)) if job.get("lengths") else None
            if op == "gru":
                hs, gates = rnn.gru_recurrence_forward(gi, h0, w, b, lens, save)
                if save and job.get("bwd"):
                    rnn.gru_recurrence_backward(rnd(T, B, H), h0, w, hs, gates, lens, True)
            else:
                hs, cs, gates = rnn.lstm_recurrence_forward(gi, h0, c0, w, b, lens, save)
                if save and job.get("bwd"):
                    rnn.lstm_recurrence_backward(rnd(T, B, H), None, h0, c0, w, hs, cs, gates, lens, True)
        for variant in job.get("packed", []):
            # ragged: lengths T, T-1, ..., 1, 1, ... (the reverse direction's later steps
            # start rows from h0); full-rev: every row T steps (a dense bidirectional layer)
            if variant == "full-rev":
                lengths = torch.full((B,), T)
            else:
                lengths = torch.tensor([max(1, T - i) for i in range(B)])
            bs = torch.tensor([int((lengths > t).sum()) for t in range(T)], dtype=torch.int64)
            N, rev = int(bs.sum()), variant != "fwd"
            pgi = rnd(N, G * H)
            for save in saves:
                if op == "gru":
                    hs, gates = rnn.gru_packed_recurrence_forward(pgi, h0, w, b, bs, rev, save)
                    if save and job.get("bwd"):
                        rnn.gru_packed_recurrence_backward(rnd(N, H), h0, w, hs, gates, bs, rev, True)
                else:
                    hs, cs, gates = rnn.lstm_packed_recurrence_forward(pgi, h0, c0, w, b, bs, rev, save)
                    if save and job.get("bwd"):
                        rnn.lstm_packed_recurrence_backward(rnd(N, H), None, h0, c0, w, hs, cs, gates, bs, rev,
                                                            True)
    elif op == "cell":
        H, D = job["H"], job["D"]
        gi, ctx, w_ic = rnd(B, 3 * H), rnd(B, D), rnd(3 * H, D, scale=D ** -0.5)
        gh, bh, h = rnd(B, 3 * H), rnd(3 * H), rnd(B, H)
        for save in saves:
            _, gates = cell.gru_context_cell_forward(gi, ctx, w_ic, gh, bh, h, save)
            if save and job.get("bwd"):
                cell.gru_context_cell_backward(rnd(B, H), gates, h, ctx, w_ic, True)
    elif op == "attention":
        T, S, A, D = job["T"], job["S"], job["A"], job["D"]
        q, K, V, e = rnd(B, T, A), rnd(B, S, A), rnd(B, S, D), rnd(A, scale=A ** -0.5)
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[1:, S // 2:] = False
        ctx, w = attn.additive_attention_forward(q, K, V, e, mask.to(device))
        if job.get("bwd"):
            attn.additive_attention_backward(rnd(B, T, D), None, q, K, V, e, w)
    else:
        raise ValueError(f"unknown op {op!r}")


def _jit_functions() -> Dict[str, Any]:
    """name -> JITFunction of every fastseq kernel (through the counted/heuristics wrappers)."""
    import importlib

    import triton

    out = {}
    for modname in MODULES:
        mod = importlib.import_module(modname)
        for name in dir(mod):
            k = getattr(mod, name)
            for _ in range(4):
                if isinstance(k, triton.runtime.jit.JITFunction) or k is None:
                    break
                k = getattr(k, "kernel", None) or getattr(k, "fn", None)
            if isinstance(k, triton.runtime.jit.JITFunction):
                out[k.__name__] = k
    return out


def _compiled(fns: Dict[str, Any]):
    """(kernel name, CompiledKernel) of everything in the JIT functions' in-memory caches."""
    for name, fn in fns.items():
        for entry in fn.device_caches.values():
            for ck in entry[0].values():
                yield name, fn, ck


def _describe(name: str, fn, ck) -> Dict[str, Any]:
    """What the JIT chose for one compiled kernel: constexprs, specialisation, pointer dtypes, metadata."""
    src = ck.src
    names = fn.arg_names

    def arg(key):
        idx = key[0] if isinstance(key, tuple) else key
        return names[idx] if isinstance(idx, int) and idx < len(names) else str(key)

    consts = {}
    for key, v in getattr(src, "constants", {}).items():
        n = arg(key)
        consts[n] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    sig = {arg(k) if not isinstance(k, str) else k: str(v) for k, v in getattr(src, "signature", {}).items()}
    pointers = {k: v for k, v in sig.items() if v.startswith("*")}
    spec = []
    for key, attrs in (getattr(src, "attrs", None) or {}).items():
        text = str(attrs)
        if "divisibility" in text:
            spec.append(arg(key))
    md = ck.metadata
    dots = dot_dtypes(ck.asm.get("ttir", ""))
    return {
        "kernel": name, "hash": ck.hash[:16],
        "constexprs": {k: v for k, v in consts.items() if k.isupper()},
        "none_args": sorted(k for k, v in consts.items() if v is None),
        "pointer_dtypes": pointers, "divisible_by_16": sorted(spec),
        "num_warps": md.num_warps, "num_stages": md.num_stages, "shared": md.shared,
        "n_dots": sum(dots.values()), "dot_dtypes": sorted(dots),
    }


_DOT = re.compile(r"= tt\.dot (?P<attrs>[^:]*): tensor<(?:\d+x)+(?P<a>\w+)> \* tensor<(?:\d+x)+(?P<b>\w+)> "
                  r"-> tensor<(?:\d+x)+(?P<c>\w+)>")


def dot_dtypes(ttir: str) -> Dict[str, int]:
    """The ``tl.dot`` calls of a kernel, from its Triton IR (``ttir``, before any lowering):
    ``{"bf16*bf16->f32": n, ...}``, the operand and accumulator element types, with
    ``(tf32)``-style suffixes where the IR names an input precision. A dot whose
    operands were cast to fp32 in the kernel shows as ``f32*f32->f32``."""
    out: Dict[str, int] = {}
    for m in _DOT.finditer(ttir):
        prec = re.search(r"inputPrecision = (\w+)", m.group("attrs"))
        key = f"{m.group('a')}*{m.group('b')}->{m.group('c')}" + (f" ({prec.group(1)})" if prec else "")
        out[key] = out.get(key, 0) + 1
    return out


def worker(job_list: List[Dict[str, Any]], device: str, dump: Optional[str],
           deadline: Optional[float] = None) -> Dict[str, Any]:
    """Run ``job_list`` on ``device`` and describe each compiled kernel (per job: the kernels it launched).

    ``dump``: a folder where each kernel's PTX and cubin are written (``<hash>.ptx``/``.cubin``).
    ``deadline`` (``time.time()``): jobs not started by then are reported, not run.
    """
    import torch

    fns = _jit_functions()
    rows: Dict[str, Dict[str, Any]] = {}
    errors = []
    for i, job in enumerate(job_list):
        if deadline is not None and time.time() > deadline:
            errors.append(f"{device}: {len(job_list) - i} jobs not run (time limit): "
                          + ", ".join(label(j) for j in job_list[i:i + 8]) + (" ..." if len(job_list) - i > 8 else ""))
            break
        for fn in fns.values():  # the launched set per job: empty the in-memory caches (disk cache stays)
            fn.device_caches.clear()
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = bool(job.get("tf32"))
        t0 = time.time()
        try:
            _run_job(job, device)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - one job's failure is reported, the rest still run
            errors.append(f"{label(job)}: {type(exc).__name__}: {str(exc)[:400]}")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        for name, fn, ck in _compiled(fns):
            row = rows.get(ck.hash)
            if row is None:
                row = rows[ck.hash] = _describe(name, fn, ck)
                row["used_by"] = []
                if dump:
                    Path(dump, ck.hash[:16] + ".ptx").write_text(ck.asm["ptx"])
                    Path(dump, ck.hash[:16] + ".cubin").write_bytes(ck.asm["cubin"])
            row["used_by"].append(label(job))
            if device == "cuda" and getattr(ck, "function", None) is not None:
                row["driver_regs"] = ck.n_regs
                row["driver_local_bytes"] = ck.n_spills * 4 if ck.n_spills is not None else None
                row["launched"] = True
        print(f"[kernels] {label(job)}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    return {"rows": list(rows.values()), "errors": errors}


# ------------------------------------------------------------------ resources from ptxas / cuobjdump


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
    "barriers": re.compile(r"used (\d+) barriers"),
}


def ptxas_tool(arch: int):
    """(path, flags) of the ptxas Triton uses for ``arch`` and the flags of its ``make_cubin``."""
    from triton.backends.nvidia import compiler

    path = compiler.get_ptxas(arch).path
    src = inspect.getsource(compiler.CUDABackend.make_cubin)
    flags = ["-lineinfo", "-v"]
    if "--regAllocOptLevel=2" in src:
        flags.append("--regAllocOptLevel=2")
    return path, flags


def ptxas_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        return f"unknown ({exc})"


def resources(ptx: Path, cubin: Path, ptxas: str, flags: List[str], arch: str) -> Dict[str, Any]:
    """ptxas -v on the PTX (registers, spills, stack) and cuobjdump -res-usage on the cubin."""
    out: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([ptxas, *flags, f"--gpu-name={arch}", str(ptx), "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        out["ptxas_error"] = log[-500:]
    for key, rx in _PTXAS.items():
        m = rx.search(log)
        out[key] = int(m.group(1)) if m else (0 if key in ("static_smem",) else None)
    try:
        from triton import knobs

        cuobjdump = knobs.nvidia.cuobjdump.path
        res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True,
                             timeout=60).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
        if m:
            out["cubin"] = dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))
    except Exception as exc:  # noqa: BLE001 - the cross-check is optional
        out["cubin"] = f"unavailable: {type(exc).__name__}: {exc}"
        return out
    proc = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or "Function" not in proc.stdout:
        out["sass_error"] = (proc.stderr or proc.stdout)[-500:] or f"cuobjdump -sass: rc {proc.returncode}"
        return out
    out["sass"], mma = sass_counts(proc.stdout)
    out["mma"] = {"tensor_cores": bool(mma), "instructions": mma}
    out["sass_mma_loop"] = sass_mma_loop(proc.stdout)
    out["sass_ldg_after_mma"] = sass_ldg_after_mma(proc.stdout)
    return out


_SASS_ADDR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)([^;]*);", re.MULTILINE)
LOOP_OPS = ("HMMA", "HGMMA", "LDL", "STL", "LDG", "STG", "LDS", "STS", "LDSM", "BAR")


def _instructions(sass: str) -> List[tuple]:
    """``(address, base opcode, the rest up to ';')`` of each instruction in ``cuobjdump -sass`` text."""
    return [(int(a, 16), op, rest) for a, op, rest in _SASS_ADDR.findall(sass)]


def _plain_load(op: str, rest: str) -> bool:
    """A global load without ``.STRONG`` (not a barrier poll, not a ``.cg`` read of other programs' writes)."""
    return op == "LDG" and ".STRONG" not in rest


def sass_mma_loop(sass: str) -> Optional[Dict[str, int]]:
    """Static counts of :data:`LOOP_OPS` inside the outermost loop of the SASS that holds a
    tensor-core instruction (a loop: a backward ``BRA``; the whole-sequence kernels' time
    loop): whether spills (``LDL``/``STL``) or global loads sit in the loop or before it.
    Also ``LDG_before_mma`` and ``LDG_after_mma``: the loop's plain global loads (``LDG``
    without ``.STRONG``: not the barrier's poll, not the ``.cg`` reads of what other programs
    wrote) from the loop's top to its first tensor-core instruction, and from its last one
    to the loop's end: where a step's own inputs (gi, b_hh) are loaded, ahead of the product
    or after it. None without such a loop."""
    ins = _instructions(sass)
    loops = []
    for addr, op, rest in ins:
        m = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    best = None
    for lo, hi in loops:
        if any(lo <= a <= hi and op in MMA_OPS for a, op, _ in ins) and (best is None or hi - lo > best[1] - best[0]):
            best = (lo, hi)
    if best is None:
        return None
    out = {op: sum(1 for a, o, _ in ins if best[0] <= a <= best[1] and o == op) for op in LOOP_OPS}
    mma = [a for a, o, _ in ins if best[0] <= a <= best[1] and o in MMA_OPS]
    plain = [a for a, o, rest in ins if best[0] <= a <= best[1] and _plain_load(o, rest)]
    out["LDG_before_mma"] = sum(1 for a in plain if a < mma[0])
    out["LDG_after_mma"] = sum(1 for a in plain if a > mma[-1])
    return out


def sass_ldg_after_mma(sass: str) -> Optional[int]:
    """Plain global loads (``LDG`` without ``.STRONG``) placed after the kernel's last tensor-core
    instruction: in a per-step kernel, the inputs its epilogue waits for after the product (gi,
    b_hh, the state, lengths) unless it loads them ahead. None without a tensor-core instruction."""
    ins = _instructions(sass)
    mma = [a for a, o, _ in ins if o in MMA_OPS]
    if not mma:
        return None
    return sum(1 for a, o, rest in ins if _plain_load(o, rest) and a > mma[-1])


SASS_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA", "FFMA", "FMUL", "FADD", "MUFU", "LDL", "STL")
MMA_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA")  # tensor-core matrix instructions
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)",
                        re.MULTILINE)


def sass_counts(sass: str):
    """Static instruction counts of a kernel's SASS (``cuobjdump -sass`` text).

    Returns ``(counts, mma)``: ``counts`` maps each opcode of :data:`SASS_OPS` to how
    many instructions in the code have it as base opcode (``HMMA.16816.F32.BF16`` counts
    as ``HMMA``; ``HFMA2.MMA``, a half FMA, is not a tensor-core instruction); ``mma``
    maps each tensor-core instruction (:data:`MMA_OPS`) with its modifiers, which
    name the shape and the operand types (e.g. ``HGMMA.64x64x16.F32.BF16``), to its count.
    Sites in the code, not executed instructions: a loop body counts once.
    """
    counts = {op: 0 for op in SASS_OPS}
    mma: Dict[str, int] = {}
    for m in _SASS_LINE.finditer(sass):
        full = m.group(1)
        base = full.split(".")[0]
        if base in counts:
            counts[base] += 1
        if base in MMA_OPS:
            mma[full] = mma.get(full, 0) + 1
    return counts, mma


# ------------------------------------------------------------------ driver


def _split(items: List[Any], n: int) -> List[List[Any]]:
    parts = [items[i::n] for i in range(n)]
    return [p for p in parts if p]


def _fastseq_root() -> str:
    import fastseq

    return str(Path(fastseq.__file__).resolve().parent.parent)


def stub_pass(job_list: List[Dict[str, Any]], n_jobs: int, dump: str, timeout: float) -> Dict[str, Any]:
    """The jobs on the stub driver, in ``n_jobs`` worker processes."""
    lib = stubdriver.build()
    env = stubdriver.subprocess_env(lib)
    env["PYTHONPATH"] = os.pathsep.join([_fastseq_root()] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = []
    for part in _split(job_list, n_jobs):
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(part), "--dump", dump],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rows, errors = [], []
    deadline = time.time() + timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            errors.append(f"worker {p.pid}: timed out")
        sys.stderr.write(err[-4000:] if p.returncode else "")
        lines = out.strip().splitlines()
        if p.returncode != 0 or not lines:
            errors.append(f"worker {p.pid}: rc {p.returncode}: {err[-800:]}")
            continue
        res = json.loads(lines[-1])
        rows += res["rows"]
        errors += res["errors"]
    return {"rows": rows, "errors": errors}


def merge(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """One row per kernel hash; ``used_by`` and the driver's figures merged."""
    out: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        m = out.get(r["hash"])
        if m is None:
            out[r["hash"]] = dict(r, used_by=list(r["used_by"]))
            continue
        m["used_by"] += [u for u in r["used_by"] if u not in m["used_by"]]
        for k in ("driver_regs", "driver_local_bytes", "launched"):
            if k in r:
                m[k] = r[k]
    return out


def _dtypes(pointers: Dict[str, str]) -> str:
    """``bf16`` or ``bf16 h,c:fp32``: the kernel's main pointer dtype, and the pointers that differ."""
    dts = {k[:-4] if k.endswith("_ptr") else k: v.lstrip("*") for k, v in pointers.items()
           if v.lstrip("*") not in ("i64", "u8")}
    if not dts:
        return "-"
    counts: Dict[str, int] = {}
    for v in dts.values():
        counts[v] = counts.get(v, 0) + 1
    main = max(counts, key=lambda v: (counts[v], v != "fp32"))
    other: Dict[str, List[str]] = {}
    for k, v in dts.items():
        if v != main:
            other.setdefault(v, []).append(k)
    return " ".join([main] + [",".join(ks) + ":" + v for v, ks in other.items()])


def table(rows: List[Dict[str, Any]]) -> str:
    head = (f"{'kernel':30s} {'dtypes':22s} {'BLOCK_*':14s} {'flags':28s} {'w':>2s} {'regs':>4s} {'spill st/ld':>11s} "
            f"{'stack':>5s} {'smem':>6s} {'dots':12s} {'mma':>5s}  sizes")
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r["constexprs"]
        blocks = "".join(f"{k[6:]}{v}" for k, v in sorted(c.items()) if k.startswith("BLOCK_"))
        flags = ",".join(k.replace("HAS_", "").replace("_", "").lower()[:6] + ("" if v else "-")
                         for k, v in sorted(c.items()) if isinstance(v, bool))
        flags += ",tf32" if c.get("PRECISION") == "tf32" else ""
        dtype = _dtypes(r["pointer_dtypes"])
        spill = f"{r.get('spill_stores')}/{r.get('spill_loads')}"
        sizes = ",".join(sorted({u.split('-float')[0].split('-bfloat')[0] for u in r["used_by"]}))[:70]
        dots = ",".join(d.split("->")[0] for d in r.get("dot_dtypes", [])) or "-"
        sass = r.get("sass") or {}
        mma = "?" if not sass else str(sum(sass.get(op, 0) for op in MMA_OPS))
        lines.append(f"{r['kernel'][:30]:30s} {dtype[:22]:22s} {blocks:14s} {flags[:28]:28s} {r['num_warps']:>2d} "
                     f"{str(r.get('regs')):>4s} {spill:>11s} {str(r.get('stack_frame')):>5s} {r['shared']:>6d} "
                     f"{dots[:12]:12s} {mma:>5s}  {sizes}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastseq.bench.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON output file; a folder (existing, or ending in /): "
                                 "FOLDER/kernels-sm90a-triton<version>-<date>.json")
    p.add_argument("--grid", choices=GRIDS, default="full",
                   help="ci: every launch of the benchmark suites' GPU grids (suite_jobs), float32 and bfloat16")
    p.add_argument("--list", action="store_true", help="print the grid's jobs and exit")
    p.add_argument("--mode", choices=("auto", "stub", "cuda"), default="auto",
                   help="stub: compile on the stub driver (no GPU); cuda: launch on the GPU; "
                        "auto: stub, then cuda when a GPU is present")
    p.add_argument("--jobs", type=int, default=0, help="stub worker processes (default: CPUs, at most 12)")
    p.add_argument("--arch", type=int, default=90, help="stub target (90: sm_90a)")
    p.add_argument("--timeout", type=float, default=900, help="seconds for the stub pass")
    p.add_argument("--cuda-timeout", type=float, default=0,
                   help="seconds the GPU pass may start jobs after the stub pass's time limit (default 0)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dump", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:  # a stub worker process
        stubdriver.activate(args.arch)
        print(json.dumps(worker(json.loads(args.worker), "cpu", args.dump)))
        return 0

    if args.list:
        for job in jobs(args.grid):
            print(label(job))
        return 0

    import torch
    import triton

    t0 = time.time()
    cuda = torch.cuda.is_available()
    mode = args.mode if args.mode != "auto" else ("stub+cuda" if cuda else "stub")
    if "cuda" in mode and not cuda:
        raise SystemExit("--mode cuda: no CUDA device here")
    job_list = jobs(args.grid)
    n_jobs = args.jobs or max(1, min(12, os.cpu_count() or 1, len(job_list)))
    dump = tempfile.mkdtemp(prefix="fastseq-kernels-")
    result: Dict[str, Any] = {"triton": triton.__version__, "torch": torch.__version__, "mode": mode,
                              "grid": args.grid, "arch": f"sm_{args.arch}a", "jobs": [label(j) for j in job_list],
                              "errors": []}
    try:
        rows: List[Dict[str, Any]] = []
        if "stub" in mode:
            try:
                res = stub_pass(job_list, n_jobs, dump, args.timeout)
            except Exception as exc:  # noqa: BLE001 - e.g. no C compiler: the GPU pass can still run
                res = {"rows": [], "errors": [f"stub pass: {type(exc).__name__}: {str(exc)[:800]}"]}
            rows += res["rows"]
            result["errors"] += res["errors"]
            result["stub_s"] = round(time.time() - t0, 1)
        if "cuda" in mode:
            t1 = time.time()
            res = worker(job_list, "cuda", dump, deadline=t0 + args.timeout + (args.cuda_timeout or 0))
            for r in res["rows"]:
                r.setdefault("launched", True)
            rows += res["rows"]
            result["errors"] += res["errors"]
            result["cuda_s"] = round(time.time() - t1, 1)
            result["device"] = torch.cuda.get_device_name()
        merged = merge(rows)
        path, flags = ptxas_tool(args.arch)
        result["ptxas"] = {"path": path, "version": ptxas_version(path), "flags": flags}
        arch = f"sm_{args.arch}a" if args.arch >= 90 else f"sm_{args.arch}"

        def res_of(h):
            return h, resources(Path(dump, h + ".ptx"), Path(dump, h + ".cubin"), path, flags, arch)
        with concurrent.futures.ThreadPoolExecutor(max_workers=n_jobs) as ex:
            for h, r in ex.map(res_of, [h for h in merged if Path(dump, h + ".ptx").exists()]):
                merged[h].update(r)
        out_rows = sorted(merged.values(), key=lambda r: (r["kernel"], str(r["pointer_dtypes"]),
                                                          sorted(r["constexprs"].items(), key=str)))
        dtype_of = {label(j): j["dtype"] for j in job_list}
        for r in out_rows:
            r["job_dtypes"] = sorted({dtype_of[u] for u in r["used_by"] if u in dtype_of})
            cub = r.get("cubin")
            if isinstance(cub, dict) and r.get("regs") is not None and cub["REG"] != r["regs"]:
                r["regs_mismatch"] = f"ptxas re-run {r['regs']} != cubin {cub['REG']}"
        result["kernels"] = out_rows
        result["n_kernels"] = len(out_rows)
        result["n_spilling"] = sum(1 for r in out_rows if (r.get("spill_stores") or 0) > 0)
        result["n_with_dot"] = sum(1 for r in out_rows if r.get("n_dots"))
        result["n_tensor_cores"] = sum(1 for r in out_rows if (r.get("mma") or {}).get("tensor_cores"))
        result["wall_s"] = round(time.time() - t0, 1)
    finally:
        shutil.rmtree(dump, ignore_errors=True)
    print(table(result.get("kernels", [])))
    print(f"{result.get('n_kernels', 0)} kernels, {result.get('n_spilling', 0)} spilling, "
          f"{result.get('n_tensor_cores', 0)} of the {result.get('n_with_dot', 0)} with a tl.dot on tensor cores; "
          f"Triton {triton.__version__}, "
          f"ptxas {result.get('ptxas', {}).get('version')}, {result.get('wall_s')} s; errors: {len(result['errors'])}")
    for e in result["errors"]:
        print("!!", e)
    if args.out:
        out = Path(args.out)
        if args.out.endswith(("/", os.sep)) or out.is_dir():
            arch = result["arch"].replace("_", "")
            out = out / f"kernels-{arch}-triton{triton.__version__}-{time.strftime('%Y-%m-%d')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return 0 if result.get("kernels") else 1


if __name__ == "__main__":
    sys.exit(main())
