"""Triton primitives shared by every op's kernels, and their tile sizes and limits.

``@triton.jit`` helpers (inlined into the kernels that call them):
:func:`tanh`, :func:`tanh_fast`, :func:`load_tile`, :func:`store_tile`, :func:`load_row`,
:func:`tile_offsets`. Host side: :func:`pick_blocks` (the one place the
``[B, H]`` tile sizes are chosen), :func:`hidden_tile_limits` (the limits of
kernels tiled that way, against :mod:`fastseq.backend.limits`), and small
layout helpers, and :func:`fast_tanh_ok` (whether a launch may pass
``FAST=True`` to :func:`tanh_fast`). Importing this module imports Triton; the ops import their
Triton kernels lazily (see each op's ``op.py``).
"""
from __future__ import annotations

import functools

from typing import Any, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs
from triton.runtime import driver

from fastseq.backend import limits
from fastseq.backend.selection import allow_tf32, interpreter_on
from fastseq.ops import launches

# ------------------------------------------------------------------ jit helpers


@triton.jit
def tanh(x):
    """tanh(x) = 2 sigmoid(2x) - 1 (portable across Triton versions)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def tanh_fast(x, FAST: tl.constexpr):
    """tanh of ``x`` in float32: one hardware instruction when ``FAST``, else :func:`tanh`.

    ``FAST=True``: PTX ``tanh.approx.f32`` through ``tl.inline_asm_elementwise``, one
    MUFU.TANH per element on sm_75 and newer (NVIDIA only). The PTX ISA gives its
    maximum relative error as about 2^-10.987 (and subnormal results flushed to
    zero), so it is meant for kernels whose inputs and outputs are half precision
    (bfloat16, float16: a unit roundoff of 2^-8 / 2^-11, rounded once more on output);
    float32 results stay on the exact formula. The interpreter cannot run inline
    assembly: the host must pass ``FAST=False`` there. :func:`fast_tanh_ok` is the
    host side of this policy: pass ``FAST=fast_tanh_ok(dtype)``.

    ``FAST=False``: ``2 sigmoid(2x) - 1`` (:func:`tanh`; 2 MUFU and ~30 other
    instructions per element, float32 accuracy).

    Args:
        x: a tensor of any shape; it is computed in float32 (cast if needed).
        FAST: a compile-time bool.
    Returns:
        float32 tensor of ``x``'s shape.
    """
    x = x.to(tl.float32)
    if FAST:
        y = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1,
        )
    else:
        y = tanh(x)
    return y


@triton.jit
def tile_offsets(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row / hidden-unit offsets and in-bounds masks of this program's ``[BLOCK_B, BLOCK_H]`` tile
    (grid axis 0 over rows, axis 1 over hidden units)."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    return offs_b, offs_j, offs_b < B, offs_j < H


@triton.jit
def load_tile(ptr, offs_r, offs_c, stride_r, stride_c, mask_r, mask_c):
    """fp32 tile ``ptr[offs_r * stride_r + offs_c * stride_c]``, zero out of bounds."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    return tl.load(ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def load_tile_native(ptr, offs_r, offs_c, stride_r, stride_c, mask_r, mask_c):
    """Like :func:`load_tile`, in the pointer's own dtype (a ``tl.dot`` operand kept half)."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    return tl.load(ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0)


@triton.jit
def dot_acc(a, w, acc, PRECISION: tl.constexpr):
    """``acc + a @ w`` with fp32 accumulation, on tensor cores for half weights.

    ``a``: fp32 tile (a state or gradient kept in fp32); ``w``: a tile in the weights'
    dtype (:func:`load_tile_native`). Half ``w`` (bf16/fp16): ``a`` is rounded to ``w``'s
    dtype and the product runs as an HMMA/WGMMA with fp32 accumulation (cuDNN's
    half-precision recurrences round the state for the product the same way); fp32
    ``w``: IEEE fp32 unless ``PRECISION`` is ``"tf32"`` (:func:`precision`).
    """
    if w.dtype == tl.float32:
        out = tl.dot(a, w, acc, input_precision=PRECISION)
    else:
        out = tl.dot(a.to(w.dtype), w, acc)
    return out


@triton.jit
def store_tile(ptr, value, offs_r, offs_c, stride_r, mask_r, mask_c):
    """Store a tile of a row-major matrix, cast to the pointer's dtype."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :]
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def load_row(ptr, offs, mask):
    """fp32 ``[1, N]`` row vector (a bias slice)."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)[None, :]


# ------------------------------------------------------------------ host side


class Blocks(NamedTuple):
    """Tile sizes of a kernel tiled over ``[B, H]``, and its warps."""

    BLOCK_B: int
    BLOCK_H: int
    BLOCK_K: int
    num_warps: int


def next_pow2(n: int) -> int:
    """The power of two at or above ``n`` (>= 1), in plain Python: ``triton.next_power_of_2``
    and ``triton.cdiv`` are ConstexprFunctions that cost ~3 us per call from the host."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``, in plain Python (see :func:`next_pow2`)."""
    return -(-a // b)


def pow2(n: int, lo: int, hi: int) -> int:
    """The power of two at or above ``n``, clamped to ``[lo, hi]``."""
    return max(lo, min(hi, next_pow2(n)))


# The machine the tile choice is modelled on (H100/H200 SXM): SMs, and the L2 read
# bandwidth of the whole GPU and of one 4-8-warp CTA (32 B/clock at 1.98 GHz: half the
# SM's 64 B/clock port, for a CTA without deep pipelining). Assumptions until a GPU
# calibrates them (bench/NOTES.md v0.7).
TARGET_SMS = 132
L2_BYTES_PER_S = 5.5e12
L2_BYTES_PER_S_PER_CTA = 32 * 1.98e9


def pick_blocks(B: int, H: int) -> Blocks:
    """Tile sizes for a ``[B, H]`` state (the one place they are chosen; no autotuning yet).

    Under the interpreter everything is 16, which keeps the numpy emulation small
    and exercises the multi-tile and masking paths. On a GPU the kernels tiled this
    way (a step of the recurrence, the decoder cell) stream ``W [G*H, H]`` and the
    state from L2 once per step: every row tile re-reads W and every hidden tile
    re-reads the state rows. The tiles minimise the modelled L2 time of one step,

        (cdiv(B, BLOCK_B) * G*H*H + cdiv(H, BLOCK_H) * B*H) * 2 bytes
        / min(L2_BYTES_PER_S, programs * L2_BYTES_PER_S_PER_CTA)

    (G = 4, half-precision bytes; the same choice serves the GRU), over ``BLOCK_B``
    a power of two up to B (at most 64: B <= 8 pays no padded rows; ``tl.dot`` takes
    M >= 1 on NVIDIA GPUs) and ``BLOCK_H`` in {16, 32, 64}, with at most 1024
    accumulator elements per gate; ties go to more programs. Warps: 8, except 4 for
    one-row tiles. Both limits come from ptxas's spills (tests/test_kernel_resources.py
    checks every suite size under Triton 3.9 and 3.6): with 4 warps ptxas 13.4 spills
    12-20 bytes in the fp32 LSTM forward at 32 x 16 and the bf16 one at 2 x 16; with
    8, ptxas 12.8 spills 4 bytes in the fp32 GRU forward at 1 x 16 and 12 at 64 x 32,
    and the fp32 LSTM forward at 64 x 32 needs more than 255 registers with 4.
    Filling all 132 SMs with 16 x 16 tiles would re-read W_hh once per 16 rows: at
    B = 64, H = 1024 that is 4x the bytes of 64-row tiles (bench/NOTES.md v0.7).

    Remembered per (B, H): choosing costs ~17 us of Python, a cache hit ~0.3 us,
    and a decoder asks at every step.
    """
    return _pick_blocks(int(B), int(H), interpreter_on())


def gpu_blocks(B: int, H: int) -> Blocks:
    """:func:`pick_blocks`' choice on a GPU, whether or not the interpreter is on here
    (bench/step_model.py models the tiles a GPU run would use)."""
    return _pick_blocks(int(B), int(H), False)


@functools.lru_cache(maxsize=4096)
def _pick_blocks(B: int, H: int, interpreted: bool) -> Blocks:
    if interpreted:
        return Blocks(16, 16, 16, 1)
    best = None
    block_b = 1
    while True:
        for block_h in (16, 32, 64):
            if block_b * block_h > 1024:
                continue
            n_b, n_h = -(-B // block_b), -(-H // block_h)
            programs = n_b * n_h
            seconds = (n_b * 4 * H * H + n_h * B * H) * 2 / min(L2_BYTES_PER_S, programs * L2_BYTES_PER_S_PER_CTA)
            key = (seconds, -programs)
            if best is None or key < best[0]:
                best = (key, block_b, block_h)
        if block_b >= min(B, 64):
            break
        block_b *= 2
    _, block_b, block_h = best
    return Blocks(block_b, block_h, pow2(H, 16, 32), 4 if block_b == 1 else 8)


def _hooked(hook: Any) -> bool:
    """Whether a Triton launch hook is set (a non-empty ``HookChain`` in Triton 3.6 and 3.9)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch_steps(kernel, grid, steps: Sequence[int], args: Sequence[Any], **constexprs: Any) -> None:
    """``kernel[grid](*args, **constexprs)`` once per step ``s`` in ``steps``, bound once.

    ``kernel``: a :class:`fastseq.ops.launches.counted` Triton kernel with a runtime
    argument named ``s`` (declared ``do_not_specialize``); ``args``: every runtime
    argument in order (the value at ``s``'s position is replaced); ``constexprs``:
    the constexpr arguments and launch options (``num_warps``).

    The first step goes through Triton's whole launch path (binder, specialisation,
    cache lookup, compile on first use: 15-25 us of Python per launch, bench/NOTES.md
    v0.4); it returns the compiled kernel, and every later step calls that kernel's
    launcher directly with the same argument values except ``s`` (~2 us per launch,
    measured on the stub driver). That is exact because nothing else changes between
    steps: the same pointers and sizes give Triton the same specialisation (pointer
    alignment, integer divisibility), and ``s`` is not specialised. Pointers are
    passed as integers after the first launch (checked there by Triton).

    Falls back to the full path at every step under the interpreter, when Triton's
    launch hooks are set (its profiler), or while the torch profiler records (so
    each launch keeps its ``triton::<kernel>`` range). Launches are counted as
    :func:`fastseq.ops.launches.count` expects.
    """
    steps = list(steps)
    if not steps:
        return
    names = kernel.arg_names
    i = names.index("s")
    args = list(args)
    args[i] = steps[0]
    launch = kernel[grid]
    compiled = launch(*args, **constexprs)
    if len(steps) == 1:
        return
    if (compiled is None or interpreter_on() or _hooked(knobs.runtime.launch_enter_hook)
            or _hooked(knobs.runtime.launch_exit_hook) or torch.autograd.profiler._is_profiler_enabled):
        for s in steps[1:]:
            args[i] = s
            launch(*args, **constexprs)
        return
    if hasattr(compiled, "result"):  # Triton 3.6's asynchronous compile handle
        compiled = compiled.result()
    named = dict(zip(names, args))
    named.update(constexprs)
    values = [named[n] for n in names]
    values = [v.data_ptr() if isinstance(v, Tensor) else v for v in values]
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    g = tuple(grid) + (1, 1)
    for s in steps[1:]:
        values[i] = s
        run(g[0], g[1], g[2], stream, function, metadata, None, None, None, *values)
    launches.record(kernel.name, len(steps) - 1)


def fast_tanh_ok(dtype: torch.dtype) -> bool:
    """Whether a kernel whose inputs are ``dtype`` may pass ``FAST=True`` to :func:`tanh_fast`:
    half dtypes (bfloat16, float16) on a compiled NVIDIA target. False under the Triton
    interpreter (no inline assembly) and on ROCm (no PTX), and for float32/float64,
    whose parity bound the approximate tanh (relative error ~2^-11) would not meet."""
    if dtype not in (torch.bfloat16, torch.float16) or interpreter_on():
        return False
    return getattr(torch.version, "hip", None) is None


def precision() -> str:
    """``tl.dot``'s ``input_precision`` for float32 operands: TF32 only when the user
    opted in with ``torch.backends.cuda.matmul.allow_tf32 = True``."""
    return "tf32" if allow_tf32() else "ieee"


def hidden_tile_limits(B: int, H: int, n: int, what: str) -> Optional[limits.Unsupported]:
    """The limits of kernels tiled over ``[B, H]`` (the recurrence and the decoder cell):
    the largest tensor a launch indexes (``n`` elements, described by ``what``) within
    int32 offsets, and the ``cdiv(H, BLOCK_H)`` hidden tiles within grid axis 1."""
    if n > limits.MAX_INDEX:
        return limits.Unsupported(
            "int32-index", f"{what}, past the Triton kernels' int32 offsets (at most {limits.MAX_INDEX})"
        )
    tiles = cdiv(H, pick_blocks(B, H).BLOCK_H)
    if tiles > limits.MAX_GRID_YZ:
        return limits.Unsupported(
            "grid", f"H={H}: {tiles} hidden tiles on grid axis 1, past the limit {limits.MAX_GRID_YZ}"
        )
    return None


def contiguous_or_none(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.contiguous()


def rows_contiguous(x: Tensor) -> Tensor:
    """``x`` if its last dimension is contiguous (a column slice is fine), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()
