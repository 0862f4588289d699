"""How many teacher-forced decoder-loop calls of a training job a CUDA-graph cache replays
(bench/NOTES.md v0.14): the batch shapes of a config's epochs, fed to the policy of
:class:`fastseq.backend.graphs.GraphCache` (capture on the ``min_calls``-th sighting of a
shape, keep at most ``max_graphs``, least recently used out). Runs on CPU, no GPU: only the
batcher runs, not the model::

    python -m fastseq.bench.graph_replay --config multi30k-cpu --epochs 7 \\
        --max-graphs 16 32 64 --out bench/results/cpu-graph-replay-multi30k.json

A decoder loop's signature is its batch's ``(B, S, T)`` (source and target widths; the
model's sizes are fixed within a run), which is what :func:`batch_shapes` lists. The
data are prepared as ``fastseq train`` prepares them (into the config's ``data_dir``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Hashable, List, Sequence, Tuple


def replay_counts(keys: Sequence[Hashable], max_graphs: int, min_calls: int = 2) -> Dict[str, int]:
    """:class:`~fastseq.backend.graphs.GraphCache`'s policy over the call signatures ``keys``:
    how many calls replay a graph, how many capture one (the capturing call replays too) and
    how many graphs are evicted.

    Raises:
        ValueError: ``max_graphs`` or ``min_calls`` below 1.
    """
    if max_graphs < 1 or min_calls < 1:
        raise ValueError(f"max_graphs and min_calls must be >= 1, got {max_graphs}, {min_calls}")
    graphs: "OrderedDict[Hashable, None]" = OrderedDict()
    seen: Dict[Hashable, int] = {}
    replays = captures = evictions = 0
    for key in keys:
        if key not in graphs:
            if len(seen) >= 4096:
                seen.clear()
            seen[key] = seen.get(key, 0) + 1
            if seen[key] < min_calls:
                continue
            seen.pop(key)
            if len(graphs) >= max_graphs:
                graphs.popitem(last=False)
                evictions += 1
            graphs[key] = None
            captures += 1
        graphs.move_to_end(key)
        replays += 1
    return {"calls": len(keys), "replays": replays, "captures": captures, "evictions": evictions}


def batch_shapes(config: str, epochs: int) -> Tuple[List[Tuple[int, int, int]], Dict]:
    """The ``(B, S, T)`` of every training batch of ``epochs`` epochs of the translation
    config ``config`` (a name under fastseq/configs or a path), in order, and the config's
    batching settings."""
    import yaml

    import fastseq
    from fastseq.data.batching import StreamingBatches
    from fastseq.seq2seq.task import Seq2SeqConfig, prepare_data

    path = Path(config)
    if not path.is_file():
        path = Path(fastseq.__file__).resolve().parent / "configs" / f"{config}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    names = {f.name for f in dataclasses.fields(Seq2SeqConfig)}
    cfg = Seq2SeqConfig(**{k: v for k, v in data.items() if k in names and k != "model"})
    shards, _, _ = prepare_data(cfg)
    shapes = []
    for epoch in range(epochs):
        for _, batch in StreamingBatches(shards, cfg.max_tokens, seed=cfg.seed).iterate(epoch, start=0, rank=0,
                                                                                         world_size=1):
            shapes.append((int(batch.src.shape[0]), int(batch.src.shape[1]), int(batch.tgt_in.shape[1])))
    return shapes, {"config": str(path), "corpus": cfg.corpus, "max_tokens": cfg.max_tokens, "max_len": cfg.max_len,
                    "seed": cfg.seed}


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="multi30k-cpu")
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--max-graphs", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--min-calls", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    shapes, settings = batch_shapes(args.config, args.epochs)
    rows = []
    for n in args.max_graphs:
        r = replay_counts(shapes, n, args.min_calls)
        rows.append({"max_graphs": n, **r, "replay_fraction": r["replays"] / max(1, r["calls"])})
        print(f"max_graphs {n:3d}: {r['replays']}/{r['calls']} calls replayed ({100 * rows[-1]['replay_fraction']:.0f}%), "
              f"{r['captures']} captures, {r['evictions']} evictions")
    doc = {"command": "python -m fastseq.bench.graph_replay " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.date.today().isoformat(), "host": platform.node(), "python": platform.python_version(),
           **settings, "epochs": args.epochs, "batches": len(shapes), "distinct_shapes": len(set(shapes)),
           "min_calls": args.min_calls, "results": rows}
    print(f"{len(shapes)} batches, {doc['distinct_shapes']} distinct (B, S, T)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc


if __name__ == "__main__":
    main()
