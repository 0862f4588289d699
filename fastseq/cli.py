"""The ``fastseq`` command: train, preprocess, translate, evaluate, info, bench.

    fastseq train --config fastseq/configs/multi30k-cpu.yaml --out runs/m30k
    echo "Ein Hund läuft." | fastseq translate --checkpoint runs/m30k/best.pt
    fastseq evaluate --checkpoint runs/m30k/best.pt --split test
    fastseq info
    fastseq bench --quick
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
# Errors about the user's input (config, files, data) or the machine (disk full,
# permissions), reported as one line, not a traceback. UnicodeDecodeError is a ValueError.
USER_ERRORS = (ValueError, OSError)
# The model jobs' libraries: the "models" extra (pyproject.toml); the kernels need none of them.
MODEL_EXTRAS = ("numpy", "sentencepiece", "sacrebleu", "tqdm", "yaml", "matplotlib")


def _yaml_error(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _load_yaml(path: str) -> Dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        # Allow a bare config name, e.g. "multi30k-cpu".
        named = CONFIG_DIR / (path if path.endswith(".yaml") else f"{path}.yaml")
        if not named.is_file():
            raise SystemExit(f"fastseq: --config {path}: no such file (nor {named})")
        p = named
    try:
        with p.open(encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}  # data only: no tags that build objects
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SystemExit(f"fastseq: --config {p}: not valid YAML ({_yaml_error(exc)})")
    if not isinstance(data, dict):
        raise SystemExit(f"fastseq: --config {p}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def _train_config(args: argparse.Namespace):
    """Seq2SeqConfig from --config, then the flags, then --set KEY=VALUE (YAML values;
    dotted keys such as model.dropout reach into the config's sections)."""
    import yaml

    from fastseq.seq2seq.task import Seq2SeqConfig

    values = _load_yaml(args.config) if args.config else {}
    for key in ("corpus", "out", "data_dir", "epochs", "max_steps", "max_minutes", "device", "seed",
                "threads"):
        v = getattr(args, key, None)
        if v is not None:
            values[key] = v
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"fastseq {args.command}: --set {item!r}: expected KEY=VALUE")
        try:
            values[key.strip()] = yaml.safe_load(text)  # data only, never evaluated
        except yaml.YAMLError as exc:
            raise SystemExit(f"fastseq {args.command}: --set {item!r}: not a valid YAML value "
                             f"({_yaml_error(exc)})")
    if getattr(args, "no_progress", False):
        values["progress"] = False
    return Seq2SeqConfig.from_dict(values)  # a ValueError becomes one line in main()


def _cmd_train(args: argparse.Namespace) -> int:
    from fastseq.seq2seq.task import train
    from fastseq.training.faults import TrainingError, TrainingInterrupted

    cfg = _train_config(args)
    try:
        result = train(cfg, resume=args.resume)
    except TrainingInterrupted as exc:
        print(f"fastseq train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except TrainingError as exc:
        raise SystemExit(f"fastseq train: {exc}")
    if not result:  # torchrun: ranks other than 0 report nothing
        return 0
    test = (f"test BLEU {result['test_bleu']:.2f} chrF {result['test_chrf']:.2f} (beam {cfg.beam_size})"
            if "test_bleu" in result else "no test split")
    procs = f" x {result['world_size']} processes" if result["world_size"] > 1 else ""
    bleu = f"{result['val_bleu']:.2f}" if result["val_bleu"] >= 0 else "n/a"
    print(
        f"fastseq train: {cfg.corpus} {cfg.src_lang}->{cfg.tgt_lang}, {result['steps']} steps / "
        f"{result['epochs']} epochs in {result['wall_time_s'] / 60:.1f} min on {result['device']}{procs} "
        f"({result['precision']}), {result['tokens_per_s']:.0f} target tok/s, best val BLEU "
        f"{bleu} (step {result['best_step']}), {test}; checkpoint {cfg.out}/best.pt"
    )
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from fastseq.seq2seq.task import prepare_data

    cfg = _train_config(args)
    shards, src_tok, tgt_tok = prepare_data(cfg)
    meta = shards.meta
    print(f"fastseq preprocess: {meta['num_pairs']} pairs in {shards.num_shards} shard(s) under "
          f"{shards.directory} (vocab {src_tok.vocab_size}/{tgt_tok.vocab_size}; dropped "
          f"{meta['dropped_empty']} empty, {meta['dropped_too_long']} longer than {meta['max_len']})")
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    from fastseq.seq2seq.translate import Translator

    translator = Translator.from_checkpoint(args.checkpoint, device=args.device)
    lines = _read_stdin_lines()
    for hyp in translator.translate(lines, method=args.method, beam_size=args.beam_size,
                                    alpha=args.length_penalty, batch_size=args.batch_size,
                                    temperature=args.temperature, top_k=args.top_k, seed=args.seed):
        print(hyp)
    return 0


def _read_stdin_lines() -> List[str]:
    """stdin as UTF-8 lines (no newlines).

    Raises:
        ValueError: invalid UTF-8, naming the line and the byte offset in it.
    """
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream without bytes underneath (e.g. io.StringIO)
        return [line.rstrip("\r\n") for line in sys.stdin]
    lines = []
    for n, raw in enumerate(stream, start=1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"stdin line {n}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return lines


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fastseq.data.corpus import load_corpus
    from fastseq.seq2seq.metrics import corpus_scores
    from fastseq.seq2seq.translate import Translator

    translator = Translator.from_checkpoint(args.checkpoint, device=args.device)
    corpus = load_corpus(args.corpus, args.src_lang, args.tgt_lang)
    if args.split not in corpus.splits:
        raise ValueError(f"--split {args.split}: corpus {args.corpus!r} has no such split "
                         f"(it has {sorted(corpus.splits)})")
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
    from fastseq.backend import selection

    what = {"reference": "plain PyTorch, any device and float dtype",
            "triton": "fused Triton kernels (CUDA tensors)",
            "cpp": "C++ extension: fused ATen kernels (CPU tensors)",
            "cuda": "C++ extension: CUDA kernels (CUDA tensors, without Triton)"}
    return [{"backend": name, "status": "ok" if why == "ok" else "unavailable",
             "detail": what[name] if why == "ok" else why}
            for name, why in selection.report().items()]


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastseq.bench.run import run

    result = run(args, args.argv[args.argv.index("bench") + 1:])  # recorded as the run's command
    return 1 if result["errors"] and not result["records"] else 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import fastseq

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
    print(f"backend   {fastseq.get_backend()} (FASTSEQ_BACKEND / fastseq.set_backend)")
    for row in backend_report():
        print(f"  {row['backend']:<10} {row['status']:<12} {row['detail']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastseq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", help="YAML file of Seq2SeqConfig keys (the model's under "
                                        "'model:'), or a bundled name (multi30k-cpu, "
                                        "multi30k-gpu, tatoeba-deu-eng-cpu)")
        q.add_argument("--corpus", help="'multi30k' or a directory of {split}.{lang}[.gz] files")
        q.add_argument("--out", help="output directory for checkpoints, logs and metrics")
        q.add_argument("--data-dir", dest="data_dir", help="preprocessed shards (default OUT/data)")
        q.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override any config key (repeatable), e.g. --set accum_steps=4 "
                            "or --set model.dropout=0.2")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("train", help="train a seq2seq model (YAML config and/or flags); under "
                                     "torchrun, DistributedDataParallel over the processes")
    config_args(p)
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", dest="max_steps", type=int, help="stop after this many updates")
    p.add_argument("--max-minutes", dest="max_minutes", type=float,
                   help="stop training after this much wall time (then test)")
    p.add_argument("--device", help="auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt exactly where it stopped")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("preprocess", help="train the tokenizers and write the token-id shards "
                                          "that train reads (done by train when missing)")
    config_args(p)
    p.set_defaults(func=_cmd_preprocess)

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

    from fastseq.bench.run import build_parser as bench_parser

    p = sub.add_parser("bench", help="time fastseq against torch.nn and the other baselines "
                                     "(JSON, Markdown table, plot)")
    bench_parser(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; errors in the user's input end it with one line on
    stderr and status 1 (SystemExit), Ctrl-C with status 130, never a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in MODEL_EXTRAS:
            raise
        raise SystemExit(f"fastseq {args.command}: needs the model jobs' dependencies ({exc.name} is not "
                         "installed): pip install 'fastseq[models]'")
    except USER_ERRORS as exc:
        if args.verbose:
            logging.getLogger("fastseq").exception("fastseq %s failed", args.command)
        raise SystemExit(f"fastseq {args.command}: {exc}")
    except KeyboardInterrupt:
        print(f"fastseq {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
