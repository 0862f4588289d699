"""Host time per teacher-forced decoder step: T calls of ``attention_gru_step`` vs one
``attention_gru_decode`` (bench/NOTES.md v0.7, "the teacher-forced decoder loop as one op").

Run in this process on CPU tensors, at sizes where a step's arithmetic is small
next to the host's time, on the ``cpp`` and ``reference`` backends::

    OMP_NUM_THREADS=1 python -m fastseq.bench.decode_probe [--out FILE] [--rounds N]

(or ``python bench/decode_probe.py`` from the repository root). Cases, per backend and
size: ``fwd`` -- the training forward (inputs require grad), ``bwd`` -- the backward of
a fixed cotangent on states and contexts, ``fwd-nograd`` -- the forward under
``torch.no_grad`` (search-like: neither form dispatches per step there). Each figure
is the median over rounds of (wall time of one call) / T, in microseconds; the
``small`` size has some arithmetic in it (a few µs per step on one core), the ``tiny``
size almost none, so ``tiny`` is the host cost.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

SIZES = {
    "small": dict(B=8, T=32, H=64, S=16, A=64, D=128),
    "tiny": dict(B=1, T=32, H=4, S=2, A=4, D=4),
}


def _inputs(B, T, H, S, A, D, seed=0):
    from fastseq.ops import StepWeights

    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).requires_grad_(True)

    gi, h0, keys, values = rnd(B, T, 3 * H), rnd(B, H), rnd(B, S, A), rnd(B, S, D)
    w = [rnd(A, H, scale=H ** -0.5), rnd(3 * H, H, scale=H ** -0.5), rnd(3 * H), rnd(A, scale=A ** -0.5),
         rnd(3 * H, D, scale=D ** -0.5)]
    mask = torch.arange(S)[None, :] < torch.tensor([S] + [max(1, S - b) for b in range(1, B)])[:, None]
    return gi, h0, keys, values, w, mask, StepWeights


def _step_loop(gi, h0, keys, values, sw, mask):
    from fastseq import ops

    h, states, contexts = h0, [], []
    for gi_t in gi.unbind(1):
        h, c, _ = ops.attention_gru_step(gi_t, h, keys, values, sw, mask)
        states.append(h)
        contexts.append(c)
    return torch.stack(states, 1), torch.stack(contexts, 1)


def _decode_op(gi, h0, keys, values, sw, mask):
    from fastseq import ops

    s, c, _ = ops.attention_gru_decode(gi, h0, keys, values, sw, mask)
    return s, c


def _luong_op(gi, h0, keys, values, sw, mask):
    """The Luong flow's op on the same sizes (values stand for the projected values,
    ``D = H`` is not needed: the op reads ``[B, S, H]``, so they are cut to H columns)."""
    from fastseq.ops.decoder_step.luong import LuongWeights, luong_gru_decode

    H = h0.shape[1]
    w_cat, b_hh, energy, w_ic = sw
    A = energy.shape[0]
    lw = LuongWeights(torch.cat([w_cat[:A], w_cat[A:A + H], w_cat[A:]]),
                      b_hh[:H], b_hh, energy, w_ic[:, :H].contiguous())
    s, _ = luong_gru_decode(gi, torch.cat([h0, h0], 1), keys, values[..., :H].contiguous(), lw, mask)
    return (s,)


@contextlib.contextmanager
def _python_loops():
    """The decode ops' loops in Python on every backend (the C++ backend's state before
    ``csrc/cpu/decode.cpp``): the registry's ``cpp`` loop entries point at the reference
    backend's entries, the Python loops (whose steps the registry still runs on C++)."""
    from fastseq.backend import registry
    from fastseq.ops.decoder_step import decode, luong

    names = [m.LOOP for m in (decode, luong)] + [m.BACKWARD_LOOP for m in (decode, luong)]
    saved = [(name, registry.get(name, "cpp")) for name in names]
    for name in names:
        registry.register(name, "cpp", registry.get(name, "reference"))
    try:
        yield
    finally:
        for name, impl in saved:
            registry.register(name, "cpp", impl)


# name -> (the call, the decode ops' loops in Python?)
IMPLS = {"step-loop": (_step_loop, False), "decode-op": (_decode_op, False),
         "decode-op-python-loop": (_decode_op, True), "luong-op": (_luong_op, False),
         "luong-op-python-loop": (_luong_op, True)}


def _median_us(fn: Callable[[], float], rounds: int) -> List[float]:
    fn()
    fn()
    return [fn() for _ in range(rounds)]


def measure(backend: str, size: str, impl: str, rounds: int) -> List[Dict]:
    import fastseq

    cfg = SIZES[size]
    T = cfg["T"]
    gi, h0, keys, values, w, mask, StepWeights = _inputs(**cfg)
    f, python_loops = IMPLS[impl]
    out = []
    with fastseq.backend(backend), (_python_loops() if python_loops else contextlib.nullcontext()):
        sw = StepWeights.build(*w)  # built once, as Decoder.forward does per batch
        sw = StepWeights(*(t.detach().requires_grad_(True) for t in sw))
        leaves = [gi, h0, keys, values, *sw]
        cotangents = [torch.randn(o.shape) for o in f(gi, h0, keys, values, sw, mask)]

        def fwd():
            t0 = time.perf_counter()
            f(gi, h0, keys, values, sw, mask)
            return (time.perf_counter() - t0) * 1e6 / T

        def bwd():
            outs = f(gi, h0, keys, values, sw, mask)
            t0 = time.perf_counter()
            torch.autograd.grad(outs, leaves, cotangents, allow_unused=True)
            return (time.perf_counter() - t0) * 1e6 / T

        def fwd_nograd():
            with torch.no_grad():
                t0 = time.perf_counter()
                f(gi, h0, keys, values, sw, mask)
                return (time.perf_counter() - t0) * 1e6 / T

        for case, fn in (("fwd", fwd), ("bwd", bwd), ("fwd-nograd", fwd_nograd)):
            us = _median_us(fn, rounds)
            out.append({"backend": backend, "size": size, **cfg, "impl": impl, "case": case,
                        "median_us_per_step": statistics.median(us), "min_us_per_step": min(us),
                        "max_us_per_step": max(us), "rounds": rounds})
            print(f"[decode] {backend:9s} {size:5s} {impl:21s} {case:10s} median {out[-1]['median_us_per_step']:8.2f} "
                  f"us/step (min {min(us):.2f})", file=sys.stderr, flush=True)
    return out


class _NoopGraph:
    """Stands in for a captured CUDA graph whose replay costs nothing here: what is left of a
    :class:`fastseq.backend.graphs.GraphCache` call is its own host work (the signature, the
    lookup, the input copies and the output clones, on CPU tensors)."""

    def replay(self):
        pass


def graph_cache_overhead(rounds: int) -> List[Dict]:
    """Host time of one GraphCache call around the Bahdanau C++ loop (tiny and small sizes),
    with the graph's replay replaced by a no-op: per call, not per step."""
    from fastseq.backend import graphs
    from fastseq.ops.decoder_step import cpp

    class Probe(graphs.GraphCache):
        def _graphable(self, first):
            return True

        def _new_graph(self, static):
            return _NoopGraph(), self.fn(*static)

    out = []
    for size, cfg in SIZES.items():
        gi, h0, keys, values, w, mask, StepWeights = _inputs(**cfg)
        sw = StepWeights.build(*w)
        args = [t.detach() for t in (gi, h0, keys, values, sw.w_cat, sw.b_hh)] + [
            sw.energy.detach().reshape(-1), sw.w_ic.detach(), mask, None, True]
        cache = Probe(cpp.attention_gru_decode_forward, "probe", min_calls=1, enabled=True)
        fresh = [a.clone() if isinstance(a, torch.Tensor) and i in (0, 1) else a for i, a in enumerate(args)]

        def call():
            t0 = time.perf_counter()
            cache(*fresh)  # gi_emb and h0 at new addresses (copied), the rest in place
            return (time.perf_counter() - t0) * 1e6

        us = _median_us(call, rounds * 20)
        out.append({"size": size, **cfg, "case": "graph-cache-call-noop-replay", "median_us_per_call":
                    statistics.median(us), "min_us_per_call": min(us), "rounds": rounds * 20})
        print(f"[decode] GraphCache call, no-op replay, {size}: median {statistics.median(us):.2f} us/call "
              f"(min {min(us):.2f})", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--backends", default="cpp,reference")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    args = p.parse_args(argv)
    results = []
    for backend in args.backends.split(","):
        for size in SIZES:
            for impl in args.impls.split(","):
                results.extend(measure(backend, size, impl, args.rounds))
    if "cpp" in args.backends.split(","):
        results.extend(graph_cache_overhead(args.rounds))
    doc = {
        "what": "host time per teacher-forced decoder step: T x attention_gru_step vs one attention_gru_decode "
                "(its loop in C++ on the cpp backend, or in Python) vs one luong_gru_decode (same)",
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/decode_probe.py " + " ".join(argv or sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu": platform.processor() or platform.machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "note": "CPU tensors, this process; median over rounds of (wall time of one call) / T; the machine's "
                "2 cores were shared with other sessions",
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
    return doc


if __name__ == "__main__":
    main()
