"""Summarise training runs of an ablation: validation BLEU by update, by target
tokens seen and by wall-clock time, for each run directory (``fastseq train
--out DIR``), into one JSON file and a Markdown table.

    python -m fastseq.bench.ablation --runs RUN_DIR [RUN_DIR ...] --out bench/results/NAME \\
        --command "the command that produced the runs" [--note "machine, load"]

Reads each run's ``metrics.json`` (its config), ``train_log.csv`` (tokens and
seconds per update) and ``eval_log.csv`` (validation metrics); writes
``NAME.json`` (everything, with the machine's torch version and the date) and
``NAME.md`` (one row per run: validation BLEU at each evaluation, the first
update and the tokens at which it reached ``--bleu`` (25 by default), median
target tokens per second, and the config keys in which the run differs from the
first one).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fastseq.fileio import atomic_write
from fastseq.training.runlog import read_csv


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


IGNORED_KEYS = {"out", "data_dir", "max_steps", "max_minutes", "progress"}


def summarise_run(run: Path, bleu: float = 25.0) -> Dict[str, Any]:
    """One run directory's curves: evaluations with the updates, target tokens seen and
    seconds (training time only and wall time) at each, and when ``bleu`` was first reached.

    Raises:
        FileNotFoundError: the directory has no ``train_log.csv`` or ``eval_log.csv``.
    """
    train, evals = read_csv(run / "train_log.csv"), read_csv(run / "eval_log.csv")
    if not train or not evals:
        raise FileNotFoundError(f"run {run}: expected train_log.csv and eval_log.csv with rows")
    config = {}
    metrics_path = run / "metrics.json"
    if metrics_path.is_file():
        config = json.loads(metrics_path.read_text(encoding="utf-8")).get("config", {})
    tokens, seconds, cum = 0.0, 0.0, {}
    for row in train:
        tokens += row["tokens"]
        seconds += row["tokens"] / max(row["tokens_per_s"], 1e-9)
        cum[int(row["step"])] = (tokens, seconds)
    points = []
    for e in evals:
        step = int(e["step"])
        tok, sec = cum.get(step, (float("nan"), float("nan")))
        points.append({"step": step, "epoch": round(e["epoch"], 3), "target_tokens": int(tok),
                       "train_s": round(sec, 1), "elapsed_s": round(e["elapsed_s"], 1),
                       "val_bleu": e.get("val_bleu"), "val_loss": e.get("val_loss")})
    first = next((p for p in points if p["val_bleu"] is not None and p["val_bleu"] >= bleu), None)
    rates = [r["tokens_per_s"] for r in train[5:]] or [r["tokens_per_s"] for r in train]
    return {"run": run.name, "config": config, "evaluations": points,
            "median_target_tokens_per_s": round(statistics.median(rates), 1),
            "updates": int(train[-1]["step"]), "target_tokens": int(tokens),
            f"first_val_bleu_{bleu:g}": first}


def _model_defaults() -> Dict[str, Any]:
    """``model.<field>`` defaults of the seq2seq Architecture: a run written before a field
    existed ran with its default."""
    from fastseq.seq2seq.model import Architecture

    return {f"model.{k}": v for k, v in Architecture().to_dict().items()}


def _differences(configs: Sequence[Dict[str, Any]]) -> List[str]:
    defaults = _model_defaults()
    flat = [{**defaults, **_flatten(c)} if "model" in c else _flatten(c) for c in configs]
    base = flat[0] if flat else {}
    out = []
    for f in flat:
        keys = sorted(k for k in set(base) | set(f) if k not in IGNORED_KEYS and base.get(k) != f.get(k))
        out.append(", ".join(f"{k}={f.get(k)}" for k in keys) or "(the first run)")
    return out


def table(runs: Sequence[Dict[str, Any]], bleu: float = 25.0) -> List[str]:
    """The Markdown table of :func:`summarise_run` results (the first run is the base)."""
    steps = sorted({p["step"] for r in runs for p in r["evaluations"]})
    head = ["run", "differs from the first in", *[f"BLEU @{s}" for s in steps],
            f"first BLEU ≥ {bleu:g}: update, M tokens", "target tok/s (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, diff in zip(runs, _differences([r["config"] for r in runs])):
        by_step = {p["step"]: p["val_bleu"] for p in r["evaluations"]}
        cells = [f"{by_step[s]:.1f}" if by_step.get(s) is not None else "" for s in steps]
        first = r[f"first_val_bleu_{bleu:g}"]
        reach = f"{first['step']}, {first['target_tokens'] / 1e6:.2f}" if first else "not reached"
        lines.append("| " + " | ".join([r["run"], diff, *cells, reach, f"{r['median_target_tokens_per_s']:.0f}"]) + " |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastseq.bench.ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="run directories (the first is the base)")
    p.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    p.add_argument("--command", required=True, help="the command that produced the runs (stored)")
    p.add_argument("--note", default="", help="machine, load, anything a reader needs (stored)")
    p.add_argument("--bleu", type=float, default=25.0, help="the validation BLEU to report reaching")
    args = p.parse_args(argv)
    import torch

    runs = [summarise_run(Path(r), args.bleu) for r in args.runs]
    result = {"command": args.command, "note": args.note, "date": _dt.date.today().isoformat(),
              "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
              "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = "\n".join([f"Command: `{args.command}`", "", args.note, "", *table(runs, args.bleu)]) + "\n"
    for suffix, text in ((".json", json.dumps(result, indent=1) + "\n"), (".md", md)):
        with atomic_write(out.with_suffix(suffix)) as f:
            f.write(text.encode("utf-8"))
    print(md)


if __name__ == "__main__":
    main()
