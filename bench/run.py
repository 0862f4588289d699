"""``fastseq bench``: run the suites, write the JSON, the Markdown table and the plot.

    fastseq bench                                  # every suite; the CPU grid on a CPU, the full grid on a GPU
    fastseq bench --quick --device cuda            # the small grid of the first GPU check
    fastseq bench --suite layer cell --grid tiny   # a few cases (CI runs every suite this way)

Outputs go to ``--out`` (default: ``bench/results`` in a checkout, else the
current directory) as ``<device>-<date>[-<tag>].json``, ``.md`` and ``.png``.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from fastseq.bench import report, roofline
from fastseq.bench.core import GRIDS, Context, Grid
from fastseq.bench import suites


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: reported as None
        return None


def _checkout() -> Optional[Path]:
    """The source checkout this package runs from (``bench/`` beside ``fastseq/``), if any."""
    here = Path(__file__).resolve().parent
    root = here.parent
    return root if (root / "fastseq").is_dir() and (root / "csrc").is_dir() else None


def _commit(root: Optional[Path]) -> str:
    if root is not None:
        try:
            out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, timeout=10)
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            if out.returncode == 0:
                return out.stdout.strip() + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    import fastseq

    return f"fastseq {fastseq.__version__}"


def environment(device: torch.device) -> Dict[str, Any]:
    """What the figures depend on: device, driver, versions, threads."""
    env: Dict[str, Any] = {"torch": torch.__version__, "triton": _version("triton"), "cuda": torch.version.cuda,
                           "python": platform.python_version()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        env["device"] = f"{cpu} ({torch.get_num_threads()} threads)"
        env["driver"] = None
    return env


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="fastseq bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", nargs="+", choices=suites.NAMES + suites.CUDA_ONLY, default=list(suites.NAMES),
                   help=f"suites to run (default: all but the CUDA-only {', '.join(suites.CUDA_ONLY)})")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--grid", choices=GRIDS, default=None,
                   help="sizes: tiny (CI), quick (GPU check), cpu (reduced, default on a CPU), full (default on a GPU)")
    p.add_argument("--quick", action="store_true", help="same as --grid quick")
    p.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: float32 on a CPU; float32 and bfloat16 on a GPU")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default: 15; tiny: 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per implementation (default: 2; tiny: 1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip", nargs="+", default=[], metavar="IMPL",
                   help="implementations not to time, e.g. fastseq-reference eager-cells (still checked)")
    p.add_argument("--tag", default="", help="appended to the output file names")
    p.add_argument("--out", default=None, help="output folder (default: bench/results in a checkout, else .)")
    return p


def run(args: argparse.Namespace, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = Grid(args.grid or ("quick" if args.quick else ("full" if device.type == "cuda" else "cpu")))
    dtypes = [getattr(torch, d) for d in (args.dtype or (["float32", "bfloat16"] if device.type == "cuda"
                                                          else ["float32"]))]
    for name, value in (("--rounds", args.rounds), ("--warmup", args.warmup)):
        if value is not None and value < (1 if name == "--rounds" else 0):
            raise ValueError(f"{name}: expected >= {1 if name == '--rounds' else 0}, got {value}")
    ctx = Context(device=device, dtypes=dtypes, grid=grid, skip=tuple(args.skip),
                  rounds=args.rounds or (3 if grid.tiny else 15), warmup=args.warmup if args.warmup is not None
                  else (1 if grid.tiny else 2))
    root = _checkout()
    out_dir = Path(args.out) if args.out else (root / "bench" / "results" if root else Path.cwd())
    t0 = time.time()
    ctx.ceilings = roofline.measure(device, quick=grid.name in ("tiny", "quick"))
    print("ceilings: " + ", ".join(f"{k} {v:.4g}" for k, v in ctx.ceilings.items() if v), flush=True)
    for name in args.suite:
        start = time.time()
        ctx.attempt(f"suite {name}", lambda name=name: suites.load(name).run(ctx))
        print(f"== suite {name}: {time.time() - start:.1f} s", flush=True)
    date = datetime.date.today().isoformat()
    result = {
        **environment(device), "commit": _commit(root),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "fastseq bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "grid": grid.name, "threads": torch.get_num_threads(), "wall_s": round(time.time() - t0, 1),
        "ceilings": ctx.ceilings, "records": [r.to_dict() for r in ctx.records], "errors": ctx.errors,
    }
    stem = f"{device.type}-{date}" + (f"-{args.tag}" if args.tag else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    report.write_json(result, paths[0])
    report.write_markdown(result, paths[1])
    png = report.plot(result, out_dir / f"{stem}.png")
    print("wrote " + ", ".join(str(p) for p in paths + ([png] if png else [])), flush=True)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args, argv)
    return 1 if result["errors"] and not result["records"] else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
