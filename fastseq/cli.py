"""The ``fastseq`` command: train, preprocess, translate, generate, evaluate, info, bench.

    fastseq train --config fastseq/configs/multi30k-cpu.yaml --out runs/m30k
    echo "Ein Hund läuft." | fastseq translate --checkpoint runs/m30k/best.pt
    fastseq evaluate --checkpoint runs/m30k/best.pt --split test
    fastseq train --config shakespeare-char-cpu --out runs/shakespeare    # language model
    fastseq generate runs/shakespeare/best.pt --prompt "ROMEO:" --temperature 0.8
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


TASKS = ("translation", "lm")  # the config key ``task``: which model job a config trains


def _config_class(task: Any):
    """The config class of ``task`` (the config key, default "translation")."""
    if task == "lm":
        from fastseq.lm.task import LMTrainConfig

        return LMTrainConfig
    if task == "translation":
        from fastseq.seq2seq.task import Seq2SeqConfig

        return Seq2SeqConfig
    raise ValueError(f"config key 'task': expected one of {TASKS}, got {task!r}")


def _train_config(args: argparse.Namespace):
    """The job's config (Seq2SeqConfig, or LMTrainConfig for ``task: lm``) from --config,
    then the flags, then --set KEY=VALUE (YAML values; dotted keys such as model.dropout
    reach into the config's sections)."""
    import yaml

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
    return _config_class(values.get("task", "translation")).from_dict(values)  # ValueError: one line


def _cmd_train(args: argparse.Namespace) -> int:
    from fastseq.training.faults import TrainingError, TrainingInterrupted

    cfg = _train_config(args)
    if cfg.TASK == "lm":
        from fastseq.lm.task import train
    else:
        from fastseq.seq2seq.task import train
    try:
        result = train(cfg, resume=args.resume)
    except TrainingInterrupted as exc:
        print(f"fastseq train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except TrainingError as exc:
        raise SystemExit(f"fastseq train: {exc}")
    if not result:  # torchrun: ranks other than 0 report nothing
        return 0
    procs = f" x {result['world_size']} processes" if result["world_size"] > 1 else ""
    if cfg.TASK == "lm":
        m = cfg.model
        print(
            f"fastseq train: {cfg.corpus} ({result['vocabulary']}-level, vocab {result['vocab_size']}), "
            f"{m.num_layers}-layer {m.rnn_type.upper()} {m.hidden_size}, {result['parameters'] / 1e6:.2f}M "
            f"parameters, {result['steps']} steps / {result['epochs']} epochs in "
            f"{result['wall_time_s'] / 60:.1f} min on {result['device']}{procs} ({result['precision']}), "
            f"{result['tokens_per_s']:.0f} tok/s; best val loss {result['val_loss']:.4f} nats/token, "
            f"{result['val_bpc']:.4f} bits/char, ppl {result['val_ppl']:.2f} (step {result['best_step']}); "
            f"checkpoint {cfg.out}/best.pt" + (f", sample {cfg.out}/sample.txt" if "sample" in result else "")
        )
        return 0
    test = (f"test BLEU {result['test_bleu']:.2f} chrF {result['test_chrf']:.2f} (beam {cfg.beam_size})"
            if "test_bleu" in result else "no test split")
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
    if cfg.TASK != "translation":
        raise ValueError(f"preprocess: a {cfg.TASK!r} config has nothing to preprocess "
                         "(train reads its text directly)")
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
    from fastseq.training.checkpoint import load_checkpoint

    if load_checkpoint(args.checkpoint)["format"] == "fastseq.lm":
        from fastseq.lm.task import evaluate

        split = args.split or "val"
        print(json.dumps(evaluate(args.checkpoint, corpus=args.corpus or "", split=split, device=args.device)))
        return 0
    from fastseq.data.corpus import load_corpus
    from fastseq.seq2seq.metrics import corpus_scores
    from fastseq.seq2seq.translate import Translator

    args.corpus, args.split = args.corpus or "multi30k", args.split or "test"
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


def _cmd_generate(args: argparse.Namespace) -> int:
    from fastseq.lm.generate import TextGenerator

    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("--prompt and --prompt-file: give one, not both")
    if args.prompt_file is not None:
        from fastseq.data.lines import read_text

        prompt = read_text(args.prompt_file)
    else:
        prompt = args.prompt or ""
    if not args.greedy and not args.temperature > 0:
        raise ValueError(f"--temperature: expected > 0, got {args.temperature} (--greedy takes the "
                         "most probable token)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p: expected a value in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k: expected >= 0 (0: no limit), got {args.top_k}")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--num-samples", args.num_samples)):
        if value < 1:
            raise ValueError(f"{flag}: expected >= 1, got {value}")
    gen = TextGenerator.from_checkpoint(args.checkpoint, device=args.device)
    gen.encode_prompt(prompt)  # a prompt outside the vocabulary fails before anything is printed
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, greedy_decoding=args.greedy, seed=args.seed, stop=args.stop or ())

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.num_samples == 1:  # streamed as it is made
        write(prompt)
        gen.generate(prompt, on_text=write, **kw)
        write("\n")
        return 0
    for i, text in enumerate(gen.generate(prompt, num_samples=args.num_samples, **kw)):
        write(f"{'' if i == 0 else chr(10)}=== sample {i + 1} (seed {args.seed + i}) ===\n{prompt}{text}\n")
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
        q.add_argument("--config", help="YAML file of config keys (the model's under 'model:'; "
                                        "'task: lm' for a language model), or a bundled name "
                                        "(multi30k-cpu, multi30k-gpu, tatoeba-deu-eng-cpu, "
                                        "shakespeare-char-cpu, shakespeare-char-gpu)")
        q.add_argument("--corpus", help="translation: 'multi30k' or a directory of {split}.{lang}[.gz] "
                                        "files; language model: 'tinyshakespeare' or text file(s)")
        q.add_argument("--out", help="output directory for checkpoints, logs and metrics")
        q.add_argument("--data-dir", dest="data_dir", help="preprocessed shards (default OUT/data)")
        q.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override any config key (repeatable), e.g. --set accum_steps=4 "
                            "or --set model.dropout=0.2")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("train", help="train a translation model or (task: lm) a language model "
                                     "(YAML config and/or flags); under torchrun, "
                                     "DistributedDataParallel over the processes")
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

    p = sub.add_parser("evaluate", help="translation: BLEU and chrF (sacrebleu) on a corpus split; "
                                        "language model: loss, bits per character, perplexity")
    decoding_args(p, sampling=False)
    p.add_argument("--corpus", help="translation: 'multi30k' (default) or a directory; language "
                                    "model: text file(s) to evaluate whole (default: the checkpoint's "
                                    "own corpus, --split)")
    p.add_argument("--src-lang", dest="src_lang", default="de")
    p.add_argument("--tgt-lang", dest="tgt_lang", default="en")
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="translation: default test; language model: train or val (default)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("generate", help="sample text from a language model checkpoint (streamed)")
    p.add_argument("checkpoint", help="best.pt or last.pt of a language model (fastseq train, task: lm)")
    p.add_argument("--prompt", help="text to continue (default: start on a new line)")
    p.add_argument("--prompt-file", dest="prompt_file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
    p.add_argument("--top-k", dest="top_k", type=int, default=0, help="sample from the k most probable (0: all)")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0,
                   help="nucleus: sample from the smallest set with probability >= p (1: all)")
    p.add_argument("--greedy", action="store_true", help="take the most probable token (no sampling)")
    p.add_argument("--num-samples", dest="num_samples", type=int, default=1,
                   help="samples decoded together as one batch (printed when done; 1: streamed)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end a sample where TEXT appears (repeatable); the end-of-sequence token always does")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_generate)

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
