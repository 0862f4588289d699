"""The whole-sequence recurrence kernels (:mod:`fastseq.ops.recurrence.triton_sequence`) on the
stub driver: their compiled resources, and the host time of a call.

Run as a script in a process started with :func:`stubdriver.subprocess_env` (no GPU,
``TRITON_INTERPRET`` unset; tests/test_ops_triton_sequence.py and the commands in
``bench/NOTES.md`` do)::

    python bench/sequence_probe.py '{"mode": "compile", "B": [8, 64], "H": [512, 1024],
                                     "dtypes": ["float32", "bfloat16"]}'
    python bench/sequence_probe.py '{"mode": "host", "B": 64, "H": 512, "T": 128,
                                     "dtypes": ["float32"], "rounds": 20}'
    python bench/sequence_probe.py '{"mode": "compile", "resident": true, "ignore_fits": true,
                                     "B": [16, 64], "H": [512, 768, 1024],
                                     "dtypes": ["bfloat16", "float32"]}'

``compile``: calls the real host functions (forward with and without saved gates,
backward; GRU and LSTM; T = 2) for each size and dtype, once with one program per
row block (``n_h = 1``, the intra-program barrier) and once with the grid barrier
(``n_h = min(hidden tiles, SMS // n_b)``, ``SMS`` = 132, an H100/H200 SXM), so every
launched specialisation is compiled by Triton for sm_90a; then ptxas ``-v`` on each
one's PTX (:func:`kernels.resources`). Prints ``{"triton", "ptxas", "kernels":
[{"kernel", "grid_sync", "constexprs", "regs", "spill_stores", "spill_loads",
"ptx_release", "ptx_acquire", "used_by", ...}], "errors"}``. ``"resident": true``: the
W_RESIDENT variant instead (``w_resident=True``, one hidden tile per program), with
``time_loop`` per kernel (where W_hh is loaded, staged and read relative to the time
loop, from the TTGIR: :func:`time_loop_placement`); ``"ignore_fits": true`` compiles it
also where the plan would not pick it; ``"backward": false`` compiles forwards only;
``"cases": [[B, H, dtype], ...]`` replaces the ``B`` x ``H`` x ``dtypes`` product.

``host``: microseconds per call of each forward (gates saved) and backward (the
weight-gradient product left out, as in :mod:`host_probe`), for both variants,
after two warm-up calls; launches per call checked against the stub driver's count.
Also the per-step kernels' forward and backward of :mod:`fastseq.ops.recurrence.triton`
at the same sizes, for comparison. Prints ``{"triton", "cases": [{"case", "dtype",
"launches", "us": [per call], "us_per_step": [per call / T]}]}``.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

if __package__:
    from . import kernels, stubdriver
else:  # run as a script: bench/ is sys.path[0]
    import kernels
    import stubdriver

SMS = 132


def _jits():
    import triton

    from fastseq.ops.recurrence import triton_sequence as ts

    out = {}
    for name in ("_gru_seq_fwd_kernel", "_gru_seq_bwd_kernel", "_lstm_seq_fwd_kernel", "_lstm_seq_bwd_kernel"):
        k = getattr(ts, name)
        while not isinstance(k, triton.runtime.jit.JITFunction):
            k = getattr(k, "kernel", None) or k.fn
        out[name] = k
    return out


def _calls(kind, B, H, T, dt, n_h, rnd):
    """(forward, backward) closures of one configuration (``n_h``: programs per row block;
    ``"resident"``: the W_RESIDENT variant, one hidden tile per program)."""
    from fastseq.ops.recurrence import triton_sequence as ts

    G = 3 if kind == "gru" else 4
    gi, h0, c0, w, b = rnd(T, B, G * H), rnd(B, H), rnd(B, H), rnd(G * H, H, scale=H ** -0.5), rnd(G * H)
    grad = rnd(T, B, H)
    kw = dict(w_resident=True) if n_h == "resident" else dict(programs_per_rows=n_h, w_resident=False)
    if kind == "gru":
        def fwd(save=True):
            return ts.gru_recurrence_forward(gi, h0, w, b, None, save, **kw)
        hs, gates = fwd()

        def bwd():
            return ts.gru_recurrence_backward(grad, h0, w, hs, gates, None, True, **kw)
    else:
        def fwd(save=True):
            return ts.lstm_recurrence_forward(gi, h0, c0, w, b, None, save, **kw)
        hs, cs, gates = fwd()

        def bwd():
            return ts.lstm_recurrence_backward(grad, None, h0, c0, w, hs, cs, gates, None, True, **kw)
    return fwd, bwd


def _variants(B, H, resident=False):
    from fastseq.ops.recurrence import triton_sequence as ts

    if resident:
        return ["resident"]
    p = ts.plan(B, H, __import__("torch").device("cpu"), 1)
    tiles = -(-H // p.BLOCK_H)
    return [1, max(2, min(tiles, SMS // p.n_b))]


def time_loop_placement(ttgir: str):
    """Where the W_RESIDENT kernels' ``W_hh`` operand lives, from the TTGIR: counts of its
    global loads (``tt.load``), shared-memory stagings (``ttg.local_alloc``) and reads
    (``ttg.local_load``) before and inside the time loop (the kernel's outermost
    ``scf.for``/``scf.while`` that contains a ``tt.dot``), and the dots inside it. The
    resident tiles are the values the kernels name ``w_res`` (forward) and ``v_*``
    (backward). ``hoisted``: W is loaded and staged before the loop, never inside it."""
    import re

    lines = ttgir.splitlines()
    loop = None
    for i, ln in enumerate(lines):
        m = re.match(r"^(\s*)(?:%\S+ = )?scf\.(?:for|while)\b", ln)
        if not m or len(m.group(1)) != 4:
            continue
        end = next((j for j in range(i + 1, len(lines))
                    if re.match(r"^ {4}\}(?! (?:do|else))", lines[j])), len(lines))
        if any(re.search(r"= (tt\.dot|ttng\.warp_group_dot) ", lines[k]) for k in range(i, end)):
            loop = (i, end)
            break
    out = {"loop_found": loop is not None}
    rx = re.compile(r"^\s*%(w_res|v_[ifgorzn])\w* = (tt\.load|ttg\.local_alloc|ttg\.local_load)\b")
    for i, ln in enumerate(lines):
        m = rx.match(ln)
        if not m:
            continue
        op = m.group(2).split(".")[-1]
        where = "in_loop" if loop and loop[0] < i < loop[1] else "before"
        out[f"w_{op}_{where}"] = out.get(f"w_{op}_{where}", 0) + 1
    if loop:
        out["dots_in_loop"] = sum(bool(re.search(r"= (tt\.dot|ttng\.warp_group_dot) ", lines[k])) for k in range(*loop))
    out["hoisted"] = bool(out.get("w_load_before")) and not out.get("w_load_in_loop") \
        and not out.get("w_local_alloc_in_loop")
    return out


def compile_mode(cfg):
    import tempfile
    from pathlib import Path

    import torch

    fns = _jits()
    dump = tempfile.mkdtemp(prefix="fastseq-seq-")
    rows, errors = {}, []
    g = torch.Generator().manual_seed(0)
    # "cases": [[B, H, dtype], ...] instead of the product of "B", "H" and "dtypes"
    cases = cfg.get("cases") or [(B, H, d) for d in cfg["dtypes"] for B in cfg["B"] for H in cfg["H"]]
    for B, H, dname in cases:
        dt = getattr(torch, dname)

        def rnd(*shape, scale=1.0, dt=dt):
            return (torch.randn(*shape, generator=g) * scale).to(dt)
        if True:
            if True:
                for n_h in _variants(B, H, cfg.get("resident", False)):
                    for kind in ("gru", "lstm"):
                        label = f"{kind}-B{B}-H{H}-{dname}-{'resident' if n_h == 'resident' else f'nh{n_h}'}"
                        for fn in fns.values():
                            fn.device_caches.clear()
                        try:
                            fwd, bwd = _calls(kind, B, H, 2, dt, n_h, rnd)
                            fwd(False)
                            if cfg.get("backward", True):
                                bwd()
                        except Exception as exc:  # noqa: BLE001 - reported
                            errors.append(f"{label}: {type(exc).__name__}: {str(exc)[:600]}")
                        for name, fn, ck in kernels._compiled(fns):
                            row = rows.get(ck.hash)
                            if row is None:
                                row = rows[ck.hash] = kernels._describe(name, fn, ck)
                                row["grid_sync"] = bool(row["constexprs"].get("GRID_SYNC"))
                                row["w_resident"] = bool(row["constexprs"].get("W_RESIDENT"))
                                row["time_loop"] = time_loop_placement(ck.asm["ttgir"])
                                row["used_by"] = []
                                Path(dump, ck.hash[:16] + ".ptx").write_text(ck.asm["ptx"])
                                Path(dump, ck.hash[:16] + ".cubin").write_bytes(ck.asm["cubin"])
                                ptx = ck.asm["ptx"]  # the grid barrier: release arrival, acquire poll
                                row["ptx_release"] = ".gpu.release." in ptx or ".release.gpu." in ptx
                                row["ptx_acquire"] = ".gpu.acquire." in ptx or ".acquire.gpu." in ptx
                            row["used_by"].append(label)
    path, flags = kernels.ptxas_tool(90)
    for h, row in rows.items():
        row.update(kernels.resources(Path(dump, h[:16] + ".ptx"), Path(dump, h[:16] + ".cubin"), path, flags,
                                     "sm_90a"))
    import triton

    return {"triton": triton.__version__, "ptxas": kernels.ptxas_version(path), "kernels": list(rows.values()),
            "errors": errors}


def host_mode(cfg):
    import torch
    import triton

    from fastseq.ops import launches
    from fastseq.ops.recurrence import triton as per_step
    from fastseq.ops.recurrence import triton_sequence as ts

    B, H, T, rounds = cfg["B"], cfg["H"], cfg["T"], cfg["rounds"]
    # The weight-gradient product after the kernels is no launch overhead (host_probe does the same).
    saved = ts.weight_grads, per_step.weight_grads
    ts.weight_grads = per_step.weight_grads = lambda dg, h0, hs, w_hh, has_bias: (w_hh, w_hh.new_empty((0,)))
    g = torch.Generator().manual_seed(1)
    cases = []
    try:
        for dname in cfg["dtypes"]:
            dt = getattr(torch, dname)

            def rnd(*shape, scale=1.0):
                return (torch.randn(*shape, generator=g) * scale).to(dt)
            for kind in ("gru", "lstm"):
                G = 3 if kind == "gru" else 4
                impls = [(f"sequence-nh{n_h}", _calls(kind, B, H, T, dt, n_h, rnd)) for n_h in _variants(B, H)]
                gi, h0, c0, w, b = rnd(T, B, G * H), rnd(B, H), rnd(B, H), rnd(G * H, H, scale=H ** -0.5), rnd(G * H)
                grad = rnd(T, B, H)
                if kind == "gru":
                    hs, gates = per_step.gru_recurrence_forward(gi, h0, w, b, None, True)
                    impls.append(("per-step", (
                        lambda: per_step.gru_recurrence_forward(gi, h0, w, b, None, True),
                        lambda: per_step.gru_recurrence_backward(grad, h0, w, hs, gates, None, True))))
                else:
                    hs, cs, gates = per_step.lstm_recurrence_forward(gi, h0, c0, w, b, None, True)
                    impls.append(("per-step", (
                        lambda: per_step.lstm_recurrence_forward(gi, h0, c0, w, b, None, True),
                        lambda: per_step.lstm_recurrence_backward(grad, None, h0, c0, w, hs, cs, gates, None, True))))
                for impl, (fwd, bwd) in impls:
                    for what, fn in (("fwd", fwd), ("bwd", bwd)):
                        with launches.count() as n:
                            before = stubdriver.launches()
                            fn()
                            reached = stubdriver.launches() - before
                        if reached != sum(n.values()):
                            raise RuntimeError(f"{kind}-{what} {impl}: {sum(n.values())} launches counted, "
                                               f"{reached} reached the driver")
                        fn()
                        fn()
                        us = []
                        for _ in range(rounds):
                            t0 = time.perf_counter()
                            fn()
                            us.append((time.perf_counter() - t0) * 1e6)
                        cases.append({"case": f"{kind}-{what}-B{B}-H{H}-T{T}", "impl": impl, "dtype": dname,
                                      "launches": reached, "us": us, "us_per_step": [u / T for u in us]})
                        print(f"[seq-host] {kind}-{what} {dname} {impl}: {reached} launches, min "
                              f"{min(us):.1f} us/call = {min(us) / T:.2f} us/step, median "
                              f"{statistics.median(us) / T:.2f} us/step", file=sys.stderr, flush=True)
    finally:
        ts.weight_grads, per_step.weight_grads = saved
    return {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "launcher": "Triton's CudaDriver and C launcher on a stand-in libcuda.so.1 (cuLaunchKernelEx a no-op)",
            "cfg": cfg, "cases": cases}


def main(cfg):
    stubdriver.activate(cfg.get("arch", 90))
    if cfg.get("blocks"):  # experiments: (BLOCK_B, BLOCK_H, BLOCK_K, num_warps, num_stages) for every call
        from fastseq.ops.recurrence import triton_sequence as ts

        blocks = tuple(cfg["blocks"])
        ts._blocks = lambda B, interpreted: blocks
    if cfg.get("ignore_fits"):  # compile W_RESIDENT where the plan would not pick it (resident_fits)
        from fastseq.ops.recurrence import triton_sequence as ts

        ts.resident_fits = lambda *args, **kw: True
    if cfg.get("kw"):  # experiments: extra launch options (e.g. maxnreg) for every call
        from fastseq.ops.recurrence import triton_sequence as ts

        kw = ts._kw
        ts._kw = lambda p: dict(kw(p), **cfg["kw"])
    return compile_mode(cfg) if cfg["mode"] == "compile" else host_mode(cfg)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
