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

import contextlib
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple

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
    skip: Sequence[str] = ()  # implementations not timed (still checked for correctness)

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

    def autocast(self, dtype: torch.dtype) -> ContextManager:
        """Autocast to ``dtype`` on this device, a null context for float32: the model
        suites run half precision as training does (float32 parameters under autocast,
        :mod:`fastseq.training.precision`)."""
        if dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def time(self, suite: str, case: str, dtype: torch.dtype, impls: Mapping[str, Callable[[], Any]],
             floor_ms: Optional[float] = None, rounds: Optional[int] = None, note: str = "") -> None:
        """Time ``impls`` (name -> zero-argument callable) in interleaved rounds and
        append a :class:`Record` for each (see the module docstring)."""
        rounds = rounds or self.rounds
        names = [name for name in impls if name not in self.skip]
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


def forward_backward(fn: Callable[..., Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
                     cotangents: Optional[Sequence[torch.Tensor]] = None,
                     params: Sequence[torch.Tensor] = ()) -> Tuple[torch.Tensor, ...]:
    """What a suite's ``fwd`` and ``fwdbwd`` cases check and time.

    ``cotangents`` None: ``fn(*inputs)``'s outputs under ``torch.no_grad``. Else the
    outputs, then the gradients of ``sum_k (out_k * cotangents_k).sum()`` (in float32;
    outputs past the cotangents are left out) to the floating ``inputs`` (each a
    fresh leaf) and to ``params``, from ``torch.autograd.grad`` (no ``.grad`` is left
    to reset between calls)."""
    if cotangents is None:
        with torch.no_grad():
            return tuple(fn(*inputs))
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = tuple(fn(*leaves))
    loss = sum((o.float() * g.float()).sum() for o, g in zip(outs, cotangents))
    wrt = [x for x in leaves if x.requires_grad] + list(params)
    return outs + tuple(torch.autograd.grad(loss, wrt))


def upcast(tensors: Optional[Sequence[torch.Tensor]]) -> Optional[Tuple[torch.Tensor, ...]]:
    """float32 copies of the floating tensors (the others as they are; None for None):
    the inputs of a check's float32 reference."""
    if tensors is None:
        return None
    return tuple(t.float() if t.is_floating_point() else t for t in tensors)


def compiled(fn: Callable, **kwargs: Any) -> Callable:
    """``torch.compile(fn, **kwargs)`` after ``torch.compiler.reset()``, so each case
    compiles its own graphs: dynamo caches graphs per code object, and one function
    compiled at a suite's many shapes would reach its recompile limit and then run
    eagerly, unannounced, under the compiled baseline's name. Compilation happens at
    the first call (a suite's correctness check, before timing), and fails there."""
    torch.compiler.reset()
    return torch.compile(fn, **kwargs)


def token_batch(B: int, width: int, vocab: int, generator: torch.Generator,
                pad_id: int = 0, first_id: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
    """``B`` random token sequences padded to ``width``: ids ``[B, width]`` int64, uniform
    in ``[first_id, vocab)`` (the ids below are the specials: pad, unk, bos, eos), ``pad_id``
    after each row's length; lengths ``[B]`` uniform in ``[ceil(width / 2), width]``
    (a length-bucketed batch, as training's token-budget batches are), row 0 of full length
    so every input set of a case has the same shape. CPU tensors."""
    lengths = torch.randint((width + 1) // 2, width + 1, (B,), generator=generator)
    lengths[0] = width
    ids = torch.randint(first_id, vocab, (B, width), generator=generator)
    ids.masked_fill_(torch.arange(width)[None, :] >= lengths[:, None], pad_id)
    return ids, lengths


def seq2seq_config(name: str, **overrides: Any):
    """The :class:`fastseq.seq2seq.model.ModelConfig` of the training config
    ``fastseq/configs/<name>.yaml`` (its ``model:`` section and vocabulary sizes), with
    ``overrides`` (e.g. ``dropout=0.0``, or the smaller sizes of a tiny grid)."""
    import yaml

    import fastseq
    from fastseq.seq2seq.model import ModelConfig

    path = Path(fastseq.__file__).resolve().parent / "configs" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return ModelConfig(**{**data.get("model", {}), "src_vocab_size": data["src_vocab_size"],
                          "tgt_vocab_size": data["tgt_vocab_size"], **overrides})


def seq2seq_model(ctx: "Context"):
    """The model the seq2seq suites time, dropout off: the ``multi30k-gpu`` sizes on a
    GPU, ``multi30k-cpu`` on a CPU, a toy model (16 wide, vocabularies of 64) in the tiny grid;
    always the Bahdanau decoder flow (the suites time its fused three-launch step,
    :func:`fastseq.ops.attention_gru_step`; the Luong flow's op,
    :func:`fastseq.ops.luong_gru_decode`, is timed by bench/luong_probe.py)."""
    if ctx.grid.tiny:
        return seq2seq_config("multi30k-cpu", emb_size=16, enc_hidden_size=16, dec_hidden_size=16, attn_size=16,
                              readout_size=16, src_vocab_size=64, tgt_vocab_size=64, dropout=0.0,
                              decoder_flow="bahdanau")
    return seq2seq_config("multi30k-gpu" if ctx.cuda else "multi30k-cpu", dropout=0.0, decoder_flow="bahdanau")


def seq2seq_sizes(cfg: Any) -> str:
    """A model's sizes for case names: ``E256-H512-A512-R256-V8000-6000`` (embedding,
    encoder[-decoder] hidden, attention, readout, source-target vocabularies)."""
    h = (f"{cfg.enc_hidden_size}" if cfg.enc_hidden_size == cfg.dec_hidden_size
         else f"{cfg.enc_hidden_size}-{cfg.dec_hidden_size}")
    return (f"E{cfg.emb_size}-H{h}-A{cfg.attn_size}-R{cfg.readout_size}"
            f"-V{cfg.src_vocab_size}-{cfg.tgt_vocab_size}")


TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float64 (NaN when either holds a NaN)."""
    a, b = got.detach().double().cpu(), want.detach().double().cpu()
    return float((a - b).norm()) / max(float(b.norm()), 1e-30)


def check_close(what: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
                baseline: Optional[torch.Tensor] = None) -> None:
    """Relative error ``||got - want|| / ||want||`` under the dtype's bound, else ValueError:
    implementations are compared before they are timed.

    ``baseline``: the same output from the baseline implementation in the same dtype;
    the bound is then twice the baseline's own error where that is larger (an
    ill-conditioned output, e.g. a gradient summed from cancelling terms in bfloat16,
    which the baseline itself misses by more than the dtype's bound)."""
    if got.shape != want.shape:
        raise ValueError(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    bound = TOLERANCE[dtype]
    if baseline is not None:
        bound = max(bound, 2 * relative_error(baseline, want))
    err = relative_error(got, want)
    if not err <= bound:  # also catches NaN
        raise ValueError(f"{what}: relative error {err:.3g} > {bound:.3g} ({dtype})")


def check_outputs(what: str, labels: Sequence[str], got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
                  dtype: torch.dtype, baseline: Optional[Sequence[torch.Tensor]] = None) -> bool:
    """:func:`check_close` on each labelled output (``what label`` in a failure's
    message); the sequences must be of one length. True (a value for :meth:`Context.attempt`)."""
    n = len(labels)
    if not len(got) == len(want) == n or (baseline is not None and len(baseline) != n):
        raise ValueError(f"{what}: {len(got)} outputs, {len(want)} expected, {n} labels")
    for i, label in enumerate(labels):
        check_close(f"{what} {label}", got[i], want[i], dtype, None if baseline is None else baseline[i])
    return True


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def ms(seconds: float) -> float:
    return seconds * 1e3


def finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x)
