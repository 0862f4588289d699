"""Time per teacher-forced step of the Luong decoder flow: the fused op
(:func:`fastseq.ops.luong_gru_decode`, 3 launches per step) against the same
decoder on eager torch.nn ops (:class:`fastseq.seq2seq.eager.EagerLuongDecoder`:
``nn.GRUCell``, the attention's layers, ``cat``, the attention-vector layer), on
the same parameters (bench/NOTES.md v0.11).

Run in this process on CPU tensors::

    OMP_NUM_THREADS=2 TRITON_INTERPRET=1 python bench/luong_probe.py [--out FILE] [--rounds N] [--backends cpp,reference]

(``TRITON_INTERPRET=1``: for the launch count on the Triton backend.)

Sizes: ``multi30k-cpu`` (the default CPU config's decoder: E 128, H 256, A 256,
encoder states 512; B 64, T 20, S 20, about the token batches' shape) and
``tiny`` (B 1, H 4: the host cost alone). Cases: ``fwd`` (inputs require grad),
``bwd`` (the backward of a fixed cotangent on the states), ``fwd-nograd``. Each
figure is the median over rounds of (wall time of one call) / T, in µs. The
launches per step (``launches.count_ops``, no gradient, on the Triton backend)
are counted for both.
The output layer and the loss, the same for both, are not timed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch

SIZES = {
    "multi30k-cpu": dict(B=64, T=20, S=20, E=128, H=256, A=256, enc=256),
    "tiny": dict(B=1, T=32, S=2, E=4, H=4, A=4, enc=2),
}
IMPLS = ("fused", "eager")


def _setup(B, T, S, E, H, A, enc, seed=0):
    from fastseq.seq2seq.eager import EagerLuongDecoder
    from fastseq.seq2seq.model import ModelConfig, Seq2Seq

    torch.manual_seed(seed)
    cfg = ModelConfig(src_vocab_size=50, tgt_vocab_size=50, emb_size=E, enc_hidden_size=enc, dec_hidden_size=H,
                      attn_size=A, dropout=0.0, decoder_flow="luong")
    model = Seq2Seq(cfg)
    src = torch.randint(4, 50, (B, S))
    lens = torch.tensor([S] + [max(1, S - b % S) for b in range(1, B)])
    tgt = torch.randint(4, 50, (B, T))
    with torch.no_grad():
        memory = model.encode(src, lens)
    memory = type(memory)(*(t.detach().requires_grad_(t.is_floating_point()) for t in memory[:4]))
    return model.decoder, EagerLuongDecoder(model.decoder), memory, tgt


def _states(impl, dec, eager, memory, tgt):
    """The decoder states ``[B, T, 2H]`` for ``tgt`` (what the output layer would read)."""
    from fastseq import ops

    if impl == "fused":
        _, gi = dec.embed_inputs(tgt)
        states, _ = ops.luong_gru_decode(gi, memory.init_state, memory.proj_keys,
                                         dec.precompute_values(memory.values), dec.step_weights(), memory.mask)
        return states
    emb, _ = eager.embed_inputs(tgt)
    state, out = memory.init_state, []
    for t in range(tgt.shape[1]):
        state, _, _ = eager.step(emb[:, t], state, memory)
        out.append(state)
    return torch.stack(out, 1)


def launches_per_step(impl, dec, eager, memory, tgt) -> float:
    """Launches per step with no gradient, counted on the Triton backend (its kernels are
    counted by name; the C++ ops are not, see ``launches.count_ops``); NaN without Triton."""
    import fastseq
    from fastseq.backend import alloc, selection
    from fastseq.ops import launches

    if not selection.triton_status()[0] or not selection.interpreter_on():
        return float("nan")
    poison = alloc.poison()
    alloc.set_poison(False)
    try:
        with torch.no_grad(), fastseq.backend("triton"):
            _states(impl, dec, eager, memory, tgt[:, :1])  # warm-up (compile)
            n1 = launches.count_ops(_states, impl, dec, eager, memory, tgt[:, :1])
            n2 = launches.count_ops(_states, impl, dec, eager, memory, tgt[:, :5])
    finally:
        alloc.set_poison(poison)
    return (sum(n2.values()) - sum(n1.values())) / 4


def _median_us(fn, rounds: int) -> List[float]:
    fn()
    fn()  # warm-up (builds, caches)
    return [fn() for _ in range(rounds)]


def measure(backend: str, size: str, rounds: int) -> List[Dict]:
    import fastseq
    from fastseq.ops import launches

    cfg = SIZES[size]
    T = cfg["T"]
    dec, eager, memory, tgt = _setup(**cfg)
    leaves = [p for p in dec.parameters()] + [memory.values, memory.proj_keys, memory.init_state]
    out = []
    with fastseq.backend(backend):
        for impl in IMPLS:
            gs = torch.randn(tgt.shape[0], T, 2 * cfg["H"], generator=torch.Generator().manual_seed(1))

            def fwd():
                t0 = time.perf_counter()
                _states(impl, dec, eager, memory, tgt)
                return (time.perf_counter() - t0) * 1e6 / T

            def bwd():
                s = _states(impl, dec, eager, memory, tgt)
                t0 = time.perf_counter()
                torch.autograd.grad(s, leaves, gs, allow_unused=True)
                return (time.perf_counter() - t0) * 1e6 / T

            def fwd_nograd():
                with torch.no_grad():
                    t0 = time.perf_counter()
                    _states(impl, dec, eager, memory, tgt)
                    return (time.perf_counter() - t0) * 1e6 / T

            per_step = launches_per_step(impl, dec, eager, memory, tgt)
            for case, fn in (("fwd", fwd), ("bwd", bwd), ("fwd-nograd", fwd_nograd)):
                us = _median_us(fn, rounds)
                out.append({"backend": backend, "size": size, **cfg, "impl": impl, "case": case,
                            "median_us_per_step": statistics.median(us), "min_us_per_step": min(us),
                            "max_us_per_step": max(us), "rounds": rounds, "launches_per_step_nograd": per_step})
                print(f"[luong] {backend:9s} {size:12s} {impl:5s} {case:10s} median "
                      f"{out[-1]['median_us_per_step']:9.2f} us/step (min {min(us):.2f}); "
                      f"{per_step:g} launches/step", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--backends", default="cpp,reference")
    p.add_argument("--sizes", default=",".join(SIZES))
    args = p.parse_args(argv)
    results = []
    for backend in args.backends.split(","):
        for size in args.sizes.split(","):
            results.extend(measure(backend, size, args.rounds))
    doc = {
        "what": "time per teacher-forced Luong decoder step: luong_gru_decode vs the eager torch.nn decoder",
        "command": "OMP_NUM_THREADS=" + str(os.environ.get("OMP_NUM_THREADS")) + " TRITON_INTERPRET="
                   + str(os.environ.get("TRITON_INTERPRET")) + " python bench/luong_probe.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu": platform.processor() or platform.machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "note": "CPU tensors, this process; median over rounds of (wall time of one call) / T",
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
    return doc


if __name__ == "__main__":
    main()
