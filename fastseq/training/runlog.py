"""Training logs: CSV scalars (one row per update, one per evaluation) and a PNG
plot of the training curves.

``{out}/train_log.csv``: step, epoch, loss (the task's training loss of the
update, mean over its tokens), lr, tokens (tokens in the update, all
processes), tokens_per_s, elapsed_s. ``{out}/eval_log.csv``: step, epoch, the
task's validation metrics (:func:`eval_fields`; seq2seq: val_loss, val_bleu),
lr, elapsed_s. Rows are flushed as they are written, so a killed run keeps its
log; a resumed run first drops the rows after the step it resumes from, so the
file always describes one trajectory.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from fastseq.fileio import atomic_write

TRAIN_FIELDS = ("step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s")


def eval_fields(metrics: Sequence[str]) -> Tuple[str, ...]:
    """Columns of ``eval_log.csv`` for a task's validation ``metrics`` (in order)."""
    return ("step", "epoch", *metrics, "lr", "elapsed_s")


def read_csv(path: Union[str, os.PathLike]) -> List[Dict[str, float]]:
    """Rows of a log written by :class:`CsvLog`, values as floats.

    A last line cut short by a kill (too few fields, or not a number) is dropped.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({k: float(v) for k, v in row.items()})
            except (TypeError, ValueError):  # a partial last line (None or "1.2e")
                continue
    return rows


class CsvLog:
    """Append rows of ``fields`` to a CSV file.

    Args:
        path: the file. fields: column names (the first must be ``"step"``).
        resume_step: None starts a new file; otherwise the rows up to and
            including this step are kept (the file is rewritten atomically) and
            new rows are appended after them.
    """

    def __init__(self, path: Union[str, os.PathLike], fields: Sequence[str],
                 resume_step: Optional[int] = None):
        self.path, self.fields = Path(path), tuple(fields)
        kept = [r for r in read_csv(self.path) if r["step"] <= resume_step] if resume_step is not None else []
        with atomic_write(self.path) as f:
            text = ",".join(self.fields) + "\n" + "".join(self._line(r) for r in kept)
            f.write(text.encode("utf-8"))
        self._file = self.path.open("a", encoding="utf-8", buffering=1)

    def _line(self, row: Dict[str, float]) -> str:
        return ",".join(_fmt(row[k]) for k in self.fields) + "\n"

    def write(self, **row: float) -> None:
        self._file.write(self._line(row))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))  # shortest exact round trip


def plot_curves(out_dir: Union[str, os.PathLike], png: str = "curves.png", metric: Optional[str] = None,
                metric_title: Optional[str] = None) -> Path:
    """Plot training and validation loss, one more validation metric, learning
    rate and tokens/s against the update step from the two CSV logs in
    ``out_dir``; write ``png``.

    Args:
        metric: the eval-log column of the second panel (e.g. ``"val_bleu"``);
            negative or NaN values (not computed) are left out. None: the panel
            stays empty.
        metric_title: that panel's title (default: ``metric``).

    Returns:
        The path of the PNG file (written atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    train_rows = read_csv(out_dir / "train_log.csv")
    eval_rows = read_csv(out_dir / "eval_log.csv")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax = axes[0, 0]
    if train_rows:
        steps = [r["step"] for r in train_rows]
        ax.plot(steps, [r["loss"] for r in train_rows], lw=0.5, alpha=0.35, label="train (per update)")
        ax.plot(steps, _smooth([r["loss"] for r in train_rows]), lw=1.5, label="train (moving average)")
    evals = [r for r in eval_rows if not math.isnan(r["val_loss"])]
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    ax.set(title="cross-entropy (nats / token)", xlabel="update")
    ax.legend()
    ax = axes[0, 1]
    if metric is not None:
        points = [r for r in eval_rows if r.get(metric, -1.0) >= 0]  # NaN >= 0 is False
        ax.plot([r["step"] for r in points], [r[metric] for r in points], "o-", color="C2")
    ax.set(title=metric_title or metric or "", xlabel="update")
    ax = axes[1, 0]
    ax.plot([r["step"] for r in train_rows], [r["lr"] for r in train_rows], color="C3")
    ax.set(title="learning rate", xlabel="update")
    ax = axes[1, 1]
    ax.plot([r["step"] for r in train_rows], _smooth([r["tokens_per_s"] for r in train_rows]), color="C4")
    ax.set(title="tokens / s (moving average)", xlabel="update")
    path = out_dir / png
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def _smooth(values: Sequence[float], window: int = 50) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out
