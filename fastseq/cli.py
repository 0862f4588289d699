"""The ``fastseq`` command: train, translate, evaluate, info.

    fastseq train --config fastseq/configs/multi30k-cpu.yaml --out runs/m30k
    echo "Ein Hund läuft." | fastseq translate --checkpoint runs/m30k/best.pt
    fastseq evaluate --checkpoint runs/m30k/best.pt --split test
    fastseq info
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _load_yaml(path: str) -> Dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        # Allow a bare config name, e.g. "multi30k-cpu".
        named = CONFIG_DIR / (path if path.endswith(".yaml") else f"{path}.yaml")
        if not named.is_file():
            raise SystemExit(f"fastseq: --config {path}: no such file (nor {named})")
        p = named
    with p.open(encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"fastseq: --config {p}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def _cmd_train(args: argparse.Namespace) -> int:
    from fastseq.seq2seq.train import TrainConfig, train

    values = _load_yaml(args.config) if args.config else {}
    for key in ("corpus", "out", "epochs", "max_steps", "max_minutes", "device", "seed", "threads"):
        v = getattr(args, key)
        if v is not None:
            values[key] = v
    if args.no_progress:
        values["progress"] = False
    try:
        cfg = TrainConfig.from_dict(values)
    except ValueError as exc:
        raise SystemExit(f"fastseq train: {exc}")
    result = train(cfg)
    test = (f"test BLEU {result['test_bleu']:.2f} chrF {result['test_chrf']:.2f} (beam {cfg.beam_size})"
            if "test_bleu" in result else "no test split")
    print(
        f"fastseq train: {cfg.corpus} {cfg.src_lang}->{cfg.tgt_lang}, {result['steps']} steps / "
        f"{result['epochs']} epochs in {result['wall_time_s'] / 60:.1f} min on {result['device']}, "
        f"{result['tokens_per_s']:.0f} target tok/s, best val BLEU {result['val_bleu']:.2f} "
        f"(epoch {result['best_epoch']}), {test}; checkpoint {cfg.out}/best.pt"
    )
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    from fastseq.seq2seq.translate import Translator

    translator = Translator.from_checkpoint(args.checkpoint, device=args.device)
    lines = [line.rstrip("\n") for line in sys.stdin]
    for hyp in translator.translate(lines, method=args.method, beam_size=args.beam_size,
                                    alpha=args.length_penalty, batch_size=args.batch_size,
                                    temperature=args.temperature, top_k=args.top_k, seed=args.seed):
        print(hyp)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fastseq.seq2seq.data import load_corpus
    from fastseq.seq2seq.metrics import corpus_scores
    from fastseq.seq2seq.translate import Translator

    translator = Translator.from_checkpoint(args.checkpoint, device=args.device)
    corpus = load_corpus(args.corpus, args.src_lang, args.tgt_lang)
    pairs = corpus.read(args.split)
    hyps = translator.translate([s for s, _ in pairs], method=args.method, beam_size=args.beam_size,
                                alpha=args.length_penalty, batch_size=args.batch_size)
    scores = corpus_scores(hyps, [t for _, t in pairs])
    print(json.dumps({"corpus": args.corpus, "split": args.split, "method": args.method,
                      "beam_size": args.beam_size if args.method == "beam" else None,
                      "sentences": len(pairs), **{k: round(v, 2) for k, v in scores.items()}}))
    return 0


def backend_report() -> List[Dict[str, str]]:
    """One row per backend: whether it runs here, and why not (builds the C++ extension if needed)."""
    from fastseq import _backend

    what = {"reference": "plain PyTorch, any device and float dtype",
            "triton": "fused Triton kernels (CUDA tensors)",
            "cpp": "C++ extension: fused ATen kernels (CPU tensors)",
            "cuda": "C++ extension: CUDA kernels (CUDA tensors, without Triton)"}
    return [{"backend": name, "status": "ok" if why == "ok" else "unavailable",
             "detail": what[name] if why == "ok" else why}
            for name, why in _backend.report().items()]


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import fastseq
    from fastseq import _backend

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001 - report any import failure
        triton_version = f"not importable ({type(exc).__name__})"
    print(f"fastseq   {fastseq.__version__}")
    print(f"python    {platform.python_version()} ({platform.platform()})")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"triton    {triton_version}")
    if torch.cuda.is_available():
        print(f"device    cuda: {torch.cuda.get_device_name()}")
    else:
        print(f"device    cpu ({torch.get_num_threads()} threads); no CUDA device")
    print(f"backend   {_backend.get_backend()} (FASTSEQ_BACKEND / fastseq.set_backend)")
    for row in backend_report():
        print(f"  {row['backend']:<10} {row['status']:<12} {row['detail']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastseq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a seq2seq model (YAML config and/or flags)")
    p.add_argument("--config", help="YAML file of TrainConfig keys, or a bundled name (multi30k-cpu, multi30k-gpu)")
    p.add_argument("--corpus", help="'multi30k' or a directory of {split}.{lang}[.gz] files")
    p.add_argument("--out", help="output directory for checkpoints and metrics")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", dest="max_steps", type=int, help="stop after this many updates")
    p.add_argument("--max-minutes", dest="max_minutes", type=float,
                   help="stop training after this much wall time (then test)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    def decoding_args(q: argparse.ArgumentParser, sampling: bool) -> None:
        q.add_argument("--checkpoint", required=True, help="best.pt or last.pt from fastseq train")
        q.add_argument("--device", default="auto")
        methods = ["greedy", "beam", "sample"] if sampling else ["greedy", "beam"]
        q.add_argument("--method", choices=methods, default="beam")
        q.add_argument("--beam-size", dest="beam_size", type=int, default=5)
        q.add_argument("--length-penalty", dest="length_penalty", type=float, default=0.6,
                       help="GNMT length-penalty exponent alpha")
        q.add_argument("--batch-size", dest="batch_size", type=int, default=64)

    p = sub.add_parser("translate", help="translate stdin to stdout, one sentence per line")
    decoding_args(p, sampling=True)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", dest="top_k", type=int, default=0, help="sample from the k best (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=_cmd_translate)

    p = sub.add_parser("evaluate", help="BLEU and chrF (sacrebleu) on a corpus split")
    decoding_args(p, sampling=False)
    p.add_argument("--corpus", default="multi30k")
    p.add_argument("--src-lang", dest="src_lang", default="de")
    p.add_argument("--tgt-lang", dest="tgt_lang", default="en")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("info", help="versions, device, and which backends work here")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
