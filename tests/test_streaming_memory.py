"""Memory and speed of the large-corpus path (sample_lines -> preprocess -> StreamingBatches).

Each corpus size runs in a fresh subprocess (this file run as a script) so that its peak
resident memory (``VmHWM``, see ``_peak_rss_kib``) is its own: generate N synthetic pairs, train
tiny tokenizers on a 20k-line sample, preprocess into shards of 100k pairs, stream one full epoch
with ``max_tokens=8192`` touching every batch. The script prints one JSON line of figures.

The claim checked: memory does not grow with the corpus. Peak RSS with 4M pairs must be within
``GROWTH_MARGIN_KIB`` (64 MiB) of the peak with 1M pairs; each peak must be below
``PEAK_RSS_LIMIT_KIB`` (768 MiB) and at most ``DATA_PATH_LIMIT_KIB`` (128 MiB) above the RSS
after importing torch and fastseq. Measured on a shared 2-core CPU machine, for both sizes:

* torch 2.13 (CPU wheel): peak 262-263 MiB, of which 229 MiB is the imports;
* torch 2.11 (CUDA 13 wheel, no GPU): peak 561 MiB, of which 526 MiB is the imports;

so the data path itself takes 33-36 MiB. The test takes about 60 s there (4M pairs:
preprocessing ~30 s, 130k pairs/s).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZES = (1_000_000, 4_000_000)
GROWTH_MARGIN_KIB = 64 * 1024
PEAK_RSS_LIMIT_KIB = 768 * 1024
DATA_PATH_LIMIT_KIB = 128 * 1024
MAX_TOKENS = 8192
SHARD_SIZE = 100_000
SAMPLE_LINES = 20_000


def _peak_rss_kib() -> int:
    """This process's peak resident memory in KiB: ``VmHWM`` from /proc/self/status.

    Not ``ru_maxrss``: on Linux that survives fork and exec, so a child started by a
    larger process (pytest, with torch and every earlier test loaded) reports the
    parent's size. ``ru_maxrss`` only where there is no /proc.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _generate(src_path: Path, tgt_path: Path, num_pairs: int, seed: int = 0) -> None:
    """Write ``num_pairs`` aligned lines of 3-12 random words (300-word vocabularies) per side.

    Lines are drawn from a pool of 50k random sentences per side, so writing costs one ``join``
    per chunk of 100k lines; memory stays at the pools plus one chunk.
    """
    rng = random.Random(seed)
    indices = np.random.default_rng(seed)

    def sentence_pool() -> np.ndarray:
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8)))
                 for _ in range(300)]
        sentences = [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(50_000)]
        return np.array(sentences, dtype=object)

    with open(src_path, "w", encoding="utf-8") as src, open(tgt_path, "w", encoding="utf-8") as tgt:
        files = ((src, sentence_pool()), (tgt, sentence_pool()))
        for start in range(0, num_pairs, 100_000):
            size = min(100_000, num_pairs - start)
            for file, pool in files:
                lines = pool[indices.integers(0, len(pool), size)].tolist()
                file.write("\n".join(lines) + "\n")


def run_pipeline(num_pairs: int, work_dir: Path) -> dict[str, float]:
    """The measured pipeline, in this process; returns the figures (RSS in KiB).

    The baseline is the peak RSS after importing fastseq (and so torch), before any data work.
    """
    from fastseq.data.batching import StreamingBatches
    from fastseq.data.lines import sample_lines
    from fastseq.data.shards import preprocess
    from fastseq.data.tokenizer import train_tokenizer

    baseline = _peak_rss_kib()
    src_path, tgt_path = work_dir / "train.src", work_dir / "train.tgt"
    started = time.perf_counter()
    _generate(src_path, tgt_path, num_pairs)
    generate_s = time.perf_counter() - started

    started = time.perf_counter()
    src_tok = train_tokenizer(sample_lines(src_path, SAMPLE_LINES), 400, cache_dir=work_dir)
    tgt_tok = train_tokenizer(sample_lines(tgt_path, SAMPLE_LINES), 400, cache_dir=work_dir)
    tokenizer_s = time.perf_counter() - started

    started = time.perf_counter()
    corpus = preprocess(src_path, tgt_path, src_tok, tgt_tok, work_dir / "shards",
                        shard_size=SHARD_SIZE, progress=False)
    preprocess_s = time.perf_counter() - started
    after_preprocess = _peak_rss_kib()

    started = time.perf_counter()
    batches = StreamingBatches(corpus, MAX_TOKENS, seed=0)
    setup_s = time.perf_counter() - started
    started = time.perf_counter()
    num_batches = pairs = tokens = 0
    for _, batch in batches.iterate(0):
        num_batches += 1
        pairs += len(batch.indices)
        tokens += int(batch.src_lengths.sum()) + batch.num_tgt_tokens
    stream_s = time.perf_counter() - started
    if (num_batches, pairs) != (batches.num_batches, corpus.num_pairs):
        raise AssertionError(f"streamed {num_batches} batches of {pairs} pairs, expected "
                             f"{batches.num_batches} of {corpus.num_pairs}")
    peak = _peak_rss_kib()
    return {
        "num_pairs": num_pairs,
        "num_shards": corpus.num_shards,
        "num_batches": num_batches,
        "baseline_rss_kib": baseline,
        "peak_rss_after_preprocess_kib": after_preprocess,
        "peak_rss_kib": peak,
        "generate_s": round(generate_s, 2),
        "tokenizers_s": round(tokenizer_s, 2),
        "preprocess_s": round(preprocess_s, 2),
        "preprocess_pairs_per_s": round(num_pairs / preprocess_s),
        "stream_setup_s": round(setup_s, 2),
        "stream_s": round(stream_s, 2),
        "stream_batches_per_s": round(num_batches / stream_s, 1),
        "stream_tokens_per_s": round(tokens / stream_s),
    }


def _measure(num_pairs: int) -> dict[str, float]:
    """Run the pipeline in a fresh interpreter; its figures."""
    with tempfile.TemporaryDirectory(prefix="fastseq-memory-") as work_dir:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run(
            [sys.executable, __file__, "--pairs", str(num_pairs), "--work-dir", work_dir],
            capture_output=True, text=True, env=env, check=False,
        )
    if result.returncode != 0:
        raise AssertionError(f"pipeline for {num_pairs} pairs failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_corpus_size():
    figures = {n: _measure(n) for n in SIZES}
    for n, fig in figures.items():
        print(f"\n{n:>9,} pairs: {json.dumps(fig)}")
    small, large = (figures[n]["peak_rss_kib"] for n in SIZES)
    assert large <= small + GROWTH_MARGIN_KIB, (
        f"peak RSS grew from {small} KiB ({SIZES[0]} pairs) to {large} KiB ({SIZES[1]} pairs)")
    for n, fig in figures.items():
        assert fig["peak_rss_kib"] <= PEAK_RSS_LIMIT_KIB, (
            f"{n} pairs: peak RSS {fig['peak_rss_kib']} KiB over {PEAK_RSS_LIMIT_KIB} KiB")
        above_imports = fig["peak_rss_kib"] - fig["baseline_rss_kib"]
        assert above_imports <= DATA_PATH_LIMIT_KIB, (
            f"{n} pairs: peak RSS {above_imports} KiB above the imports, over "
            f"{DATA_PATH_LIMIT_KIB} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    args = parser.parse_args()
    print(json.dumps(run_pipeline(args.pairs, args.work_dir)))


if __name__ == "__main__":
    main()
