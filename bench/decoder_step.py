"""Time the attention decoder's training step: fastseq's fused step against the
same decoder on eager torch.nn operations (shared weights).

Times teacher-forced decoding of T target steps over a fixed encoder memory
(values, projected keys, mask, initial state) plus the backward pass to every
decoder parameter and the memory: the part of a seq2seq training step that
cuDNN cannot run. Median of ``--repeats`` timed runs after ``--warmup``; on a
GPU, timed with CUDA events.

    python bench/decoder_step.py --device cuda --dtype float32 bfloat16 --out bench/results/x.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

from fastseq.seq2seq.eager import EagerDecoder
from fastseq.seq2seq.model import Memory, ModelConfig, Seq2Seq


def _timer(device):
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


def bench(args, dtype: torch.dtype):
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig(src_vocab_size=args.vocab, tgt_vocab_size=args.vocab, emb_size=args.emb,
                      enc_hidden_size=args.enc_hidden, dec_hidden_size=args.hidden,
                      attn_size=args.attn, dropout=0.0)
    model = Seq2Seq(cfg).to(device)
    B, S, T = args.batch, args.src_len, args.tgt_len
    D = 2 * args.enc_hidden
    g = torch.Generator(device="cpu").manual_seed(1)
    # Several input sets, rotated, so caches do not flatter repeated runs.
    sets = []
    for i in range(3):
        lens = torch.randint(S // 2, S + 1, (B,), generator=g)
        lens[0] = S
        mask = (torch.arange(S)[None] < lens[:, None]).to(device)
        values = torch.randn(B, S, D, generator=g).to(device)
        sets.append(dict(
            values=values, proj_keys=model.decoder.attention.precompute_keys(values).detach(),
            mask=mask, init_state=torch.randn(B, args.hidden, generator=g).to(device),
            tgt=torch.randint(4, args.vocab, (B, T), generator=g).to(device)))
    autocast = dtype != torch.float32
    impls = {"fastseq": model.decoder, "eager": EagerDecoder(model.decoder)}
    timer = _timer(device)
    out = []
    for name, dec in impls.items():
        def step(i=[0]):  # noqa: B006 - rotating index
            s = sets[i[0] % len(sets)]
            i[0] += 1
            mem = Memory(s["values"].requires_grad_(True), s["proj_keys"].requires_grad_(True), s["mask"],
                         s["init_state"].requires_grad_(True))
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                logits = dec(s["tgt"], mem)
            logits.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        for _ in range(args.warmup):
            step()
        times = [timer(step) for _ in range(args.repeats)]
        out.append({"case": f"decoder-train-B{B}-S{S}-T{T}-H{args.hidden}-A{args.attn}-D{D}",
                    "impl": name, "dtype": str(dtype).replace("torch.", ""),
                    "median_ms": statistics.median(times), "min_ms": min(times)})
        print(f"{out[-1]['case']} {out[-1]['dtype']:>8} {name:>8}: median {out[-1]['median_ms']:.2f} ms, "
              f"min {out[-1]['min_ms']:.2f} ms", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--src-len", type=int, default=32)
    p.add_argument("--tgt-len", type=int, default=32)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--attn", type=int, default=512)
    p.add_argument("--enc-hidden", type=int, default=512)
    p.add_argument("--emb", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    records = [r for d in args.dtype for r in bench(args, getattr(torch, d))]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "triton": _version("triton"), "cuda": torch.version.cuda, "commit": commit,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv), "records": records,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
