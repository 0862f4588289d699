"""Markdown table from a pytest-benchmark JSON of bench/test_cpu_speed.py:
median time per group, fastseq vs torch, and the ratio (< 1: fastseq faster)."""
import json
import sys
from collections import defaultdict


def main(path):
    data = json.load(open(path))
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["params"]["impl"]] = b["stats"]["median"] * 1e3
    print("| case | fastseq (ms) | torch.nn (ms) | fastseq / torch |")
    print("|---|---|---|---|")
    for g in sorted(groups):
        f, t = groups[g].get("fastseq"), groups[g].get("torch")
        if f is None or t is None:
            continue
        print(f"| {g} | {f:.2f} | {t:.2f} | {f / t:.2f} |")
    mi = data.get("machine_info", {})
    print(f"\n{mi.get('cpu', {}).get('brand_raw', '')}, {data.get('datetime', '')}")


if __name__ == "__main__":
    main(sys.argv[1])
