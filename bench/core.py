"""The benchmark machinery every suite uses: records, the run context, timing, correctness checks.

A suite (``fastseq/bench/suites/<name>.py``, the checkout's ``bench/suites/``) has
``run(ctx: Context) -> None``: for each case it builds every implementation on
the same weights and inputs, checks them against each other (a fast wrong
answer cannot win), and calls :meth:`Context.time`, which times them together
and appends one :class:`Record` per implementation.

Timing (:meth:`Context.time`):

* **CPU**: interleaved rounds in one process: every round runs each
  implementation once, in an order shuffled per round (seeded), after one
  warm-up call each, so load and frequency drift on a shared machine hit all of
  them alike (bench/NOTES.md v0.3's A/B method). Wall time of each call.
* **CUDA**: the same interleaved rounds; each call timed with CUDA events
  around it (device time, launch latency included when the host is the bound),
  after ``warmup`` calls each.

Either way the median, min and max over the rounds are recorded. Suites pass
callables that rotate over several input sets, so caches do not flatter
repeated calls (:func:`rotating`).
"""
from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

# Implementations: "fastseq-<backend>" for fastseq's backends; the others name what users run instead.
FASTSEQ = "fastseq"


@dataclass
class Record:
    """One implementation timed on one case (the JSON's ``records`` entries).

    ``case`` holds the sizes (``gru-fwdbwd-B64-H512-T128-bi-packed``) and is the same
    string for every implementation timed on it. Times in milliseconds;
    ``floor_ms``: the least time the case's bytes and flops allow on this machine
    (:mod:`fastseq.bench.roofline`), None where not modelled.
    """

    suite: str
    case: str
    impl: str
    dtype: str
    median_ms: float
    min_ms: float
    max_ms: float
    n: int
    floor_ms: Optional[float] = None
    note: str = ""

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if not d["note"]:
            del d["note"]
        return d


@dataclass
class Grid:
    """Which sizes a run covers: ``tiny`` (CI: seconds per suite), ``quick`` (the GPU
    check: a few cases per suite), ``cpu`` (the reduced grid a CPU can run in
    minutes, every suite), ``full`` (the GPU grid)."""

    name: str

    @property
    def tiny(self) -> bool:
        return self.name == "tiny"

    def pick(self, tiny, quick, cpu, full):
        return {"tiny": tiny, "quick": quick, "cpu": cpu, "full": full}[self.name]


GRIDS = ("tiny", "quick", "cpu", "full")


@dataclass
class Context:
    """What a suite gets: device, dtypes, grid, timing settings, ceilings; it collects the records."""

    device: torch.device
    dtypes: Sequence[torch.dtype]
    grid: Grid
    rounds: int = 15
    warmup: int = 2
    seed: int = 0
    ceilings: Dict[str, Optional[float]] = field(default_factory=dict)
    records: List[Record] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    verbose: bool = True

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def fastseq_backends(self, dtype: torch.dtype) -> List[str]:
        """The fastseq backends that run on this device and dtype, as timed here:
        on CUDA ``triton``, ``cuda`` (the extension's kernels) and ``reference``; on the
        CPU ``cpp`` and ``reference`` (Triton's interpreter is a correctness tool, not timed)."""
        from fastseq.backend import selection

        probe = torch.empty(1, device=self.device, dtype=dtype)
        names = []
        if self.cuda:
            if selection.triton_reason(probe) is None:
                names.append("triton")
            if selection.cpp_reason(probe) is None:
                names.append("cuda")
        elif selection.cpp_reason(probe) is None:
            names.append("cpp")
        names.append("reference")
        return names

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, suite: str, case: str, dtype: torch.dtype, impls: Mapping[str, Callable[[], Any]],
             floor_ms: Optional[float] = None, rounds: Optional[int] = None, note: str = "") -> None:
        """Time ``impls`` (name -> zero-argument callable) in interleaved rounds and
        append a :class:`Record` for each (see the module docstring)."""
        rounds = rounds or self.rounds
        names = list(impls)
        for name in names:  # warm-up (compilation, caches, autotuning)
            for _ in range(self.warmup):
                impls[name]()
        self.sync()
        times: Dict[str, List[float]] = {name: [] for name in names}
        rng = random.Random(f"{self.seed}/{suite}/{case}")
        for _ in range(rounds):
            order = names[:]
            rng.shuffle(order)
            for name in order:
                times[name].append(self._one(impls[name]))
        dt = str(dtype).replace("torch.", "")
        for name in names:
            ts = times[name]
            rec = Record(suite, case, name, dt, statistics.median(ts), min(ts), max(ts), len(ts), floor_ms, note)
            self.records.append(rec)
            if self.verbose:
                floor = f", floor {floor_ms:.3g} ms" if floor_ms else ""
                print(f"[{suite}] {case} {dt} {name}: median {rec.median_ms:.4g} ms "
                      f"(min {rec.min_ms:.4g}, max {rec.max_ms:.4g}, n {rec.n}{floor})", flush=True)

    def _one(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def attempt(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one case's set-up and timing; an exception is recorded (not fatal to the run)."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a benchmark run reports, it does not stop
            msg = f"{what}: {type(exc).__name__}: {str(exc)[:500]}"
            self.errors.append(msg)
            print(f"!! {msg}", flush=True)
            return None


def rotating(sets: Sequence[Any]) -> Callable[[], Any]:
    """A function returning ``sets[0], sets[1], ...`` cyclically (input sets rotated per call)."""
    state = {"i": -1}

    def nxt():
        state["i"] = (state["i"] + 1) % len(sets)
        return sets[state["i"]]
    return nxt


TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def check_close(what: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative error ``||got - want|| / ||want||`` under the dtype's bound, else ValueError:
    implementations are compared before they are timed."""
    a, b = got.detach().double().cpu(), want.detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    err = float((a - b).norm()) / max(float(b.norm()), 1e-30)
    if not err <= TOLERANCE[dtype]:  # also catches NaN
        raise ValueError(f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]:g} ({dtype})")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def ms(seconds: float) -> float:
    return seconds * 1e3


def finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x)
