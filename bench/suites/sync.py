"""The persistent kernels' fixed cost per step, alone (CUDA only): barrier and state exchange.

Every persistent recurrence kernel (csrc/cuda/persistent_*.cu) spends each step on a grid
barrier and on every block reading the new state h_t from L2, besides its products and gate
math; bench/step_model.py *assumes* the barrier (0.7 µs, 0.25 µs more for a cluster barrier)
and models the read. This suite times exactly that part with the extension's benchmark kernel
``fastseq_cpp::persistent_sync_probe`` (csrc/cuda/persistent_sync_probe.cu): ``steps`` steps in
which each of ``blocks`` blocks (one per SM) writes its slice of a double-buffered state
buffer, the blocks synchronise, and every block reads the whole buffer into a checksum.

Cases ``sync-blocks{N}-{bytes}-T{steps}[-cluster{C}]``: N blocks, ``bytes`` the state read by
every block per step (``16B``: 16 bytes per block, the barrier alone; ``24KB``: h of LSTM
B 16, H 768 in bfloat16; ``48KB``: the same h as the tagged forward's 32-bit words;
``96KB``: B 64); ``cluster{C}``: a cluster barrier of C blocks after
the grid's, per step (the cluster backward's pair). Implementations, the ways to synchronise:

* ``grid``: cooperative_groups' grid barrier, what the kernels use;
* ``flags``: per-block arrival flags (one word per block, release / acquire), no shared counter;
* ``tagged``: no barrier: each 32-bit word carries its step in its high half, the reader
  re-reads until the step is there (NCCL's LL protocol).

Before timing, each mode's checksums are checked against the exact sum (a mode whose
barrier does not hold reads words of another step and fails). Records: ms per call of
``steps`` steps (one launch, plus a fill of the buffer and a zeroed flag array); the note
gives µs per step (the median over steps). On a CPU there is nothing to time: the suite
raises (it is not in a default run's suites).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from fastseq.bench.core import Context

SUITE = "sync"
MODES = ("grid", "flags", "tagged")
KB = 1024


def grid(ctx: Context, sms: int) -> List[Tuple[int, int, int, int]]:
    """(blocks, bytes per step, steps, cluster) of the run's grid, blocks at most ``sms``."""
    small = 16  # bytes per block: the barrier alone
    cases = ctx.grid.pick(
        tiny=[(2, 2 * small, 8, 1)],
        quick=[(b, by, 1024, 1) for b in (48, 96, sms) for by in (b * small, 24 * KB, 48 * KB, 96 * KB)]
        + [(96, 96 * small, 1024, c) for c in (2, 4, 8)],
        cpu=[(2, 2 * small, 8, 1)],
        full=[(b, by, 2048, 1) for b in (16, 32, 48, 64, 96, 128, sms)
              for by in (b * small, 12 * KB, 24 * KB, 48 * KB, 96 * KB)]
        + [(b, b * small, 2048, c) for b in (32, 64, 96, 128) for c in (2, 4, 8)],
    )
    seen, out = set(), []
    for blocks, nbytes, steps, cluster in cases:
        blocks = min(blocks, sms) // cluster * cluster
        if blocks > 0 and (blocks, nbytes, cluster) not in seen:
            seen.add((blocks, nbytes, cluster))
            out.append((blocks, nbytes, steps, cluster))
    return out


def words_per_block(blocks: int, nbytes: int) -> int:
    """32-bit words each block writes per step: ``nbytes`` over the blocks, a multiple of 4."""
    return max(4, -(-nbytes // (4 * blocks * 4)) * 4)


def size_name(nbytes: int) -> str:
    return f"{nbytes // KB}KB" if nbytes >= KB else f"{nbytes}B"


def case_name(blocks: int, nbytes: int, steps: int, cluster: int) -> str:
    return f"sync-blocks{blocks}-{size_name(nbytes)}-T{steps}" + (f"-cluster{cluster}" if cluster > 1 else "")


def checksum(blocks: int, words: int, steps: int) -> int:
    """Each block's total when every step's barrier holds (csrc/cuda/persistent_sync_probe.cu)."""
    return sum(words * ((t * blocks + j + 1) & 0xFFFF) for t in range(steps) for j in range(blocks))


def run(ctx: Context) -> None:
    if not ctx.cuda:
        raise RuntimeError("sync: the persistent kernels' probe needs a CUDA device (--device cuda)")
    from fastseq.backend import extension

    ops = extension.load()
    sms = torch.cuda.get_device_properties(ctx.device).multi_processor_count
    for blocks, nbytes, steps, cluster in grid(ctx, sms):
        name = case_name(blocks, nbytes, steps, cluster)
        ctx.attempt(f"{SUITE} {name}", lambda b=blocks, n=nbytes, s=steps, c=cluster:
                    time_case(ctx, ops, b, n, s, c))


def time_case(ctx: Context, ops, blocks: int, nbytes: int, steps: int, cluster: int) -> None:
    """Check and time one case on ``ctx.device``: every mode that launches, through ``ops``
    (``torch.ops.fastseq_cpp``, or the tests' emulated library on CPU tensors).

    Raises:
        ValueError: a mode's checksums are wrong (its synchronisation did not hold).
        RuntimeError: no mode launches at this shape (the plans' reasons).
    """
    name = case_name(blocks, nbytes, steps, cluster)
    words = words_per_block(blocks, nbytes)
    buf = torch.empty(2, blocks * words, dtype=torch.int32, device=ctx.device)
    want = checksum(blocks, words, steps)
    calls: Dict[str, object] = {}
    notes: List[str] = []
    for mode in MODES:
        try:
            sums = ops.persistent_sync_probe(buf, blocks, steps, mode, cluster)
        except RuntimeError as err:  # the device cannot launch this shape (the plan's reason)
            notes.append(f"{mode} left out: {str(err).splitlines()[0][:160]}")
            continue
        got = sums.sum(1).tolist()
        if got != [want] * blocks:
            raise ValueError(f"{name} {mode}: checksums {sorted(set(got))[:4]} != {want}: the barrier did not hold")
        calls[mode] = lambda mode=mode: ops.persistent_sync_probe(buf, blocks, steps, mode, cluster)
    if not calls:
        raise RuntimeError(f"{name}: no mode launches: {'; '.join(notes)}")
    before = len(ctx.records)
    ctx.time(SUITE, name, torch.int32, calls, note="; ".join(notes))
    for rec in ctx.records[before:]:
        per_step = rec.median_ms * 1e3 / steps
        rec.note = "; ".join(x for x in (f"{per_step:.3f} us per step ({words * blocks * 4} bytes read per block "
                                         f"per step)", rec.note) if x)
