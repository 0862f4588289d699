"""A run's outputs: the JSON of every record, a Markdown table of fastseq over each
baseline, and PNG plots of those ratios.

JSON (``<device>-<date>[-tag].json``)::

    {"device", "driver", "torch", "triton", "cuda", "commit", "date", "command",
     "ceilings": {"copy_GBps", "matmul_fp32_TFLOPs", "matmul_bf16_TFLOPs"},
     "records": [{"suite", "case", "impl", "dtype", "median_ms", "min_ms", "max_ms", "n", "floor_ms"}]}

Table (``.md``): one row per (suite, case, dtype); fastseq's time (its fastest
backend, named) and, for each baseline timed on the same case, fastseq's time
over the baseline's (below 1: fastseq is faster), and fastseq's time over the
floor. Plot (``.png``): those ratios per case, one panel per suite.
"""
from __future__ import annotations

import io
import json
import math
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastseq.bench.core import FASTSEQ
from fastseq.fileio import atomic_write

Key = Tuple[str, str, str]  # suite, case, dtype


def write_json(result: Dict[str, Any], path: Path) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(result, indent=1).encode("utf-8"))


def _group(records: Sequence[Dict[str, Any]]) -> "OrderedDict[Key, Dict[str, Dict[str, Any]]]":
    groups: "OrderedDict[Key, Dict[str, Dict[str, Any]]]" = OrderedDict()
    for r in records:
        groups.setdefault((r["suite"], r["case"], r["dtype"]), {})[r["impl"]] = r
    return groups


def best_fastseq(impls: Dict[str, Dict[str, Any]]) -> Optional[Tuple[str, float]]:
    """The fastest fastseq backend timed on a case: (impl, median ms)."""
    mine = [(name, r["median_ms"]) for name, r in impls.items() if name.startswith(FASTSEQ)]
    return min(mine, key=lambda x: x[1]) if mine else None


def ratios(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per case: fastseq's best time, and its ratio to each baseline and to the floor."""
    rows = []
    for (suite, case, dtype), impls in _group(records).items():
        best = best_fastseq(impls)
        if best is None:
            continue
        name, t = best
        floor = next((r.get("floor_ms") for r in impls.values() if r.get("floor_ms")), None)
        rows.append({
            "suite": suite, "case": case, "dtype": dtype, "fastseq": name, "fastseq_ms": t,
            "vs": {b: t / r["median_ms"] for b, r in impls.items()
                   if not b.startswith(FASTSEQ) and r["median_ms"] > 0},
            "baseline_ms": {b: r["median_ms"] for b, r in impls.items() if not b.startswith(FASTSEQ)},
            "over_floor": t / floor if floor else None,
        })
    return rows


def markdown(result: Dict[str, Any]) -> str:
    """The table (see the module docstring), with the run's device, versions and command."""
    rows = ratios(result["records"])
    out = [f"# fastseq bench: {result['device']}",
           "",
           f"torch {result['torch']}, triton {result['triton']}, CUDA {result['cuda']}, commit {result['commit']}, "
           f"{result['date']}. Command: `{result['command']}`.",
           "",
           "Ceilings: " + ", ".join(f"{k} {v:.4g}" for k, v in result["ceilings"].items() if v is not None) + ".",
           "",
           "Each cell: fastseq's median time over the baseline's (below 1: fastseq is faster); fastseq is its "
           "fastest backend on the case. `/floor`: fastseq's time over the least time the case's bytes and "
           "flops allow here.",
           ""]
    by_suite: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_suite[r["suite"]].append(r)
    for suite, srows in by_suite.items():
        baselines = sorted({b for r in srows for b in r["vs"]})
        out += [f"## {suite}", "",
                "| case | dtype | fastseq (ms) | " + " | ".join(f"/ {b}" for b in baselines) + " | / floor |",
                "|---|---|---|" + "---|" * len(baselines) + "---|"]
        for r in srows:
            cells = [f"{r['vs'][b]:.2f}" if b in r["vs"] else "–" for b in baselines]
            cells = [f"**{c}**" if c not in ("–",) and float(c) > 1 else c for c in cells]
            floor = f"{r['over_floor']:.1f}" if r["over_floor"] else "–"
            out.append(f"| {r['case']} | {r['dtype']} | {r['fastseq_ms']:.3g} ({r['fastseq'].split('-', 1)[-1]}) | "
                       + " | ".join(cells) + f" | {floor} |")
        out.append("")
    if result.get("errors"):
        out += ["## Errors", ""] + [f"* {e}" for e in result["errors"]] + [""]
    return "\n".join(out)


def write_markdown(result: Dict[str, Any], path: Path) -> None:
    with atomic_write(path) as f:
        f.write(markdown(result).encode("utf-8"))


def plot(result: Dict[str, Any], path: Path) -> Optional[Path]:
    """One PNG: per suite a panel of fastseq/baseline ratios per case (1 marked)."""
    rows = ratios(result["records"])
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(OrderedDict.fromkeys(r["suite"] for r in rows))
    counts = [sum(1 for r in rows if r["suite"] == s) for s in suites]
    fig, axes = plt.subplots(len(suites), 1, figsize=(11, 1.0 + sum(0.9 + 0.22 * n for n in counts)),
                             gridspec_kw={"height_ratios": [0.9 + 0.22 * n for n in counts]}, squeeze=False)
    for ax, suite in zip(axes[:, 0], suites):
        srows = [r for r in rows if r["suite"] == suite]
        baselines = sorted({b for r in srows for b in r["vs"]})
        labels = [f"{r['case']} {r['dtype']}" for r in srows]
        height = 0.8 / max(len(baselines), 1)
        for i, b in enumerate(baselines):
            ys = [k + i * height for k in range(len(srows))]
            xs = [r["vs"].get(b, math.nan) for r in srows]
            ax.barh(ys, xs, height=height, label=f"fastseq / {b}")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlim(0, max(1.2, 1.05 * max((x for r in srows for x in r["vs"].values()), default=1.0)))
        ax.set_yticks([k + 0.4 - height / 2 for k in range(len(srows))])
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{suite}: fastseq time / baseline time (< 1: fastseq faster)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"fastseq bench, {result['device']}, {result['date']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path) as f:
        f.write(buf.getvalue())
    return path
