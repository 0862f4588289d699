"""A model of one recurrence step of the per-step Triton kernels on an H100/H200
(bench/NOTES.md v0.7; a prediction until a GPU measures it).

    python -m fastseq.bench.step_model            # the NOTES table (bf16 forward)

Per step, the forward kernel reads from L2: ``W_hh`` once per row tile, the
previous state's rows once per hidden tile, and gi / the fp32 state / hs / gates
once. Tensor-core work is negligible at these sizes, so a step is its L2 bytes
over ``min(L2 bandwidth, CTAs x per-CTA bandwidth)`` (the constants of
:mod:`fastseq.ops.triton_utils`, whose ``pick_blocks`` minimises this term) plus
a dependent-launch gap and the gate math after the last product (assumptions).

    python -m fastseq.bench.step_model            # also the W-resident persistent kernel's table

:func:`resident_step`: the W_RESIDENT whole-sequence kernel
(fastseq/ops/recurrence/triton_sequence.py, bench/NOTES.md "Prediction: the
W-resident persistent kernel"): no launch and no W_hh from L2 per step; instead a
grid barrier, the previous state's rows from L2 to every program, the product's
shared-memory traffic (as the sm_90a compile lays it out), tensor-core time and the
same gate math.

:func:`mma_step`: the CUDA tensor-core persistent forward
(csrc/cuda/persistent_mma_kernels.cu, bench/NOTES.md v0.9): W_hh in registers as
``mma.sync`` operands, so no W traffic at all per step; a grid barrier, each block's
copy of ``h_{t-1}`` from L2, the tensor-core product, the partial sums of the warps'
K slices through shared memory, and the same gate math.

:func:`mma_backward_step`: the CUDA tensor-core persistent backward (the same file,
bench/NOTES.md v0.13): W_hh^T in shared memory, so per step a grid barrier, each
block's copy of ``dG[t]`` from L2, the W^T tiles and the partial sums through shared
memory, the tensor-core product, and the gate-gradient math.

:func:`mma_cluster_backward_step`: the cluster backward (the same file, bench/NOTES.md
v0.14): the product split along K inside thread-block clusters, so each block reads
1 / cluster of ``dG[t]`` from L2, plus a cluster barrier and the other ranks' partial
sums through distributed shared memory.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from fastseq.ops.triton_utils import L2_BYTES_PER_S, L2_BYTES_PER_S_PER_CTA, gpu_blocks

LAUNCH_GAP_S = 1.0e-6  # between dependent kernels in one stream (assumption)
GATES_S = 0.4e-6  # gate math and stores after the last product (assumption)
# GATES_S split in two (v0.16; assumptions): the round trip of the step's inputs that the epilogue
# loads after the product (gi, b_hh, c and h of t-1; the backward's saved gates, grad_hs, hs / cs),
# issued together: one L2 round trip (a gi read that misses L2, as at T 1024, costs an HBM one, more),
# and what is left: the partial sums from shared memory, the gate formulas' dependent chain
# (~150 cycles) and the stores' issue. A kernel that loads the inputs ahead of the product
# (the CUDA persistent kernels since v0.16) pays only GATE_MATH_S, as long as the work between the
# loads and their use takes at least INPUT_LOAD_S.
INPUT_LOAD_S = 0.3e-6
GATE_MATH_S = GATES_S - INPUT_LOAD_S
# Elements (row, unit) per thread whose inputs the kernels load ahead (persistent_mma_kernels.cu:
# kPrefetch, kBwdPrefetch).
PREFETCH_ELEMENTS = 3
BWD_PREFETCH_ELEMENTS = 4
THREADS = 256  # per block of the CUDA persistent kernels

# The W-resident persistent kernel (assumptions until a GPU measures them):
BARRIER_S = 0.7e-6  # per-row-block atomic barrier among <= 132 CTAs: release add + acquire poll via L2
# The tagged exchange's wait (the tensor-core forward with FASTSEQ_CUDA_PERSISTENT_SYNC=tagged): the
# last producer's word on its way to L2, then a poll's way back: about one L2 round trip (assumption).
TAGGED_WAIT_S = 0.3e-6
CLOCK_HZ = 1.98e9  # H200 SM boost clock
SMEM_BYTES_PER_CLOCK = 128  # shared-memory bandwidth of one SM (32 banks x 4 B)
TENSOR_FLOPS_PER_SM = 989e12 / 132  # dense bf16 wgmma peak per SM (H100/H200 SXM)
MMA_SYNC_FRACTION = 0.5  # mma.sync (HMMA.16816) reaches this share of the wgmma peak (assumption)
SMS = 132  # H100 / H200 SXM
ROW_TILE = 32  # the tensor-core forward's rows per batch tile when it splits the batch (kRowTile)
# cuDNN's one published time at these sizes: FlashRNN's benchmark (NX-AI/flashrnn,
# speed_experiments/kernel_speed_benchmark.py and its head_dim--lstm.svg; H100, B 16, H 768,
# T 1024): torch.nn.LSTM(768, 768) in float16 (the plotted "PT nn.LSTM"), 2.01 ms forward and
# 5.19 ms forward + backward, per step:
CUDNN_LSTM_B16_H768_PUBLISHED_S = 2.01e-3 / 1024
CUDNN_LSTM_B16_H768_BWD_PUBLISHED_S = (5.19e-3 - 2.01e-3) / 1024
# Those times include the layer's input projection x W_ih^T (forward) and, in the backward, its
# two gradients and dW_hh: matrix products that fastseq's layer runs through cuBLAS as well,
# outside the recurrence kernels this file models. The recurrence alone, less one [B, I] x [I, 4H]
# product per step forward and three backward at GEMM_FLOPS_PER_S (an assumption: 60% of the
# dense fp16 peak for these [16384 x 768] x [768 x 3072] products):
GEMM_FLOPS_PER_S = 0.6 * 989e12
CUDNN_PROJECTION_S = 2 * 16 * 4 * 768 * 768 / GEMM_FLOPS_PER_S  # ~0.13 us per step
CUDNN_LSTM_B16_H768_S = CUDNN_LSTM_B16_H768_PUBLISHED_S - CUDNN_PROJECTION_S  # ~1.84 us (estimate)
CUDNN_LSTM_B16_H768_BWD_S = CUDNN_LSTM_B16_H768_BWD_PUBLISHED_S - 3 * CUDNN_PROJECTION_S  # ~2.72 us (estimate)


def step(kind: str, B: int, H: int, elem: int = 2, prefetch: bool = True) -> Dict[str, float]:
    """The modelled forward step of a ``kind`` ("gru"/"lstm") layer: tile, CTAs, L2 bytes
    (total and by part) and seconds (L2 and total). ``elem``: bytes per element (bf16: 2).
    The gate term is :func:`epilogue_s` with the L2 term as the cover: the kernel loads its
    tile's gi, b_hh and state before its K loop (v0.17, every element); ``prefetch=False``:
    after it, as up to v0.16 (:data:`GATES_S`)."""
    G = 3 if kind == "gru" else 4
    blk = gpu_blocks(B, H)
    n_b, n_h = -(-B // blk.BLOCK_B), -(-H // blk.BLOCK_H)
    ctas = n_b * n_h
    w = n_b * G * H * H * elem
    state = n_h * B * H * elem
    rest = B * G * H * elem + 3 * B * H * 4 + B * H * elem + B * 4 * H * elem
    l2_s = (w + state + rest) / min(L2_BYTES_PER_S, ctas * L2_BYTES_PER_S_PER_CTA)
    elements = blk.BLOCK_B * blk.BLOCK_H
    gates_s = epilogue_s(elements, -(-elements // THREADS) if prefetch else 0, l2_s)
    return {"BLOCK_B": blk.BLOCK_B, "BLOCK_H": blk.BLOCK_H, "num_warps": blk.num_warps, "ctas": ctas,
            "w_bytes": w, "state_bytes": state, "rest_bytes": rest, "l2_s": l2_s, "gates_s": gates_s,
            "step_s": l2_s + LAUNCH_GAP_S + gates_s}


def resident_step(kind: str, B: int, H: int, elem: int = 2, w_in_registers: bool = False,
                  prefetch: bool = True) -> Dict[str, float]:
    """The modelled forward step of the W_RESIDENT sequence kernel, every term in seconds.

    Tiles as :func:`fastseq.ops.recurrence.triton_sequence.plan` picks them on a GPU:
    ``BLOCK_B = pow2(B, 16, 32)`` rows, ``BLOCK_H = 16`` units, one hidden tile per
    program (``ctas = cdiv(B, BLOCK_B) * cdiv(H, 16)``), 8 warps, ``KP = next_pow2(H)``.
    The product is ``W [64, KP] @ h^T [KP, BLOCK_B]`` (four gates x 16 units; the GRU's
    padded to four), a wgmma whose operands both sit in shared memory (the sm_90a TTGIR
    under Triton 3.9: W staged once before the time loop, ``h^T`` staged every step; the
    two warpgroups split N, so each reads all of W).

    * ``barrier_s``: :data:`BARRIER_S` (no launch gap);
    * ``l2_s``: each program's ``BLOCK_B x H`` rows of ``h_{t-1}`` (``elem`` bytes) and its
      tile's gi / state / outputs, over ``min(L2_BYTES_PER_S / ctas, L2_BYTES_PER_S_PER_CTA)``
      per program (the constants of the v0.7 model);
    * ``smem_s``: W read by each warpgroup (``2 x 64 x KP``; 0 with ``w_in_registers``,
      the wgmma register operand that Triton does not emit here), ``h^T`` stored and read
      once (``2 x BLOCK_B x KP``), elements of ``elem`` bytes, over
      :data:`SMEM_BYTES_PER_CLOCK` x :data:`CLOCK_HZ`;
    * ``mma_s``: ``2 x 64 x BLOCK_B x KP`` FLOP at :data:`TENSOR_FLOPS_PER_SM` (overlaps
      the shared-memory reads: the product costs ``max(smem_s, mma_s)``);
    * ``gates_s``: :func:`epilogue_s` with the h read and the product (``l2_s + max(smem_s,
      mma_s)``) as the cover: the kernel loads its tile's gi, b_hh and state ahead of the
      product (v0.17: every element of the tile, 1-2 per thread); ``prefetch=False``: after it,
      as up to v0.16 (:data:`GATES_S`).

    ``picked``: whether the plan chooses the variant at these sizes (half weights) under
    Triton 3.9 and 3.6 (``triton_sequence.resident_fits``' limits, from the compiles).
    """
    G = 3 if kind == "gru" else 4
    bb = max(16, min(32, 1 << (max(B, 1) - 1).bit_length()))
    kp = max(16, 1 << (H - 1).bit_length())
    ctas = -(-B // bb) * -(-H // 16)
    h_rows = bb * H * elem
    tile = bb * 16 * (G * elem + 2 * 4 + 2 * 4 + 2 * elem)  # gi; h, c fp32 in and out; hs, cs
    per_cta_bw = min(L2_BYTES_PER_S / ctas, L2_BYTES_PER_S_PER_CTA)
    l2_s = (h_rows + tile) / per_cta_bw
    w_smem = 0 if w_in_registers else 2 * 64 * kp * elem
    smem_bytes = w_smem + 2 * bb * kp * elem
    smem_s = smem_bytes / (SMEM_BYTES_PER_CLOCK * CLOCK_HZ)
    mma_s = 2 * 64 * bb * kp / TENSOR_FLOPS_PER_SM
    elements = bb * 16
    gates_s = epilogue_s(elements, -(-elements // THREADS) if prefetch else 0, l2_s + max(smem_s, mma_s))
    step_s = BARRIER_S + l2_s + max(smem_s, mma_s) + gates_s
    from fastseq.ops.recurrence.triton_sequence import resident_limits

    picked = {}
    for name, new in (("triton3.9", True), ("triton3.6", False)):
        w_max, op_max = resident_limits(new)
        picked[name] = ctas <= 132 and 64 * kp * elem <= w_max and bb * kp * elem <= op_max
    return {"BLOCK_B": bb, "KP": kp, "ctas": ctas, "picked": picked, "w_slice_bytes": 64 * kp * elem,
            "smem_bytes": smem_bytes, "barrier_s": BARRIER_S, "l2_s": l2_s, "smem_s": smem_s, "mma_s": mma_s,
            "gates_s": gates_s, "step_s": step_s}


def resident_table(sizes=((16, 512), (16, 768), (16, 1024), (64, 512), (64, 768), (64, 1024))) -> List[str]:
    """The NOTES table of :func:`resident_step` (bf16), as compiled and with W as a register operand."""
    lines = ["| layer | B | H | picked (3.9 / 3.6) | CTAs (rows × KP) | barrier µs | L2 µs | smem KB, µs | MMA µs "
             "| gates µs | **step µs** | inputs after the product (v0.16) µs | W in registers: smem µs, step µs "
             f"| ÷ cuDNN's {CUDNN_LSTM_B16_H768_S * 1e6:.2f} µs (as compiled / W in registers) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("gru", "lstm"):
        for B, H in sizes:
            m, r = resident_step(kind, B, H), resident_step(kind, B, H, w_in_registers=True)
            late = resident_step(kind, B, H, prefetch=False)
            vs = vs_cudnn(kind, B, H, CUDNN_LSTM_B16_H768_S, m["step_s"], r["step_s"])
            yn = " / ".join("yes" if m["picked"][v] else "no" for v in ("triton3.9", "triton3.6"))
            lines.append(f"| {kind.upper()} | {B} | {H} | {yn} | {m['ctas']} ({m['BLOCK_B']} × {m['KP']}) | "
                         f"{m['barrier_s'] * 1e6:.2f} | {m['l2_s'] * 1e6:.2f} | {m['smem_bytes'] / 1024:.0f}, "
                         f"{m['smem_s'] * 1e6:.2f} | {m['mma_s'] * 1e6:.2f} | {m['gates_s'] * 1e6:.2f} | "
                         f"**{m['step_s'] * 1e6:.2f}** | {late['step_s'] * 1e6:.2f} | "
                         f"{r['smem_s'] * 1e6:.2f}, {r['step_s'] * 1e6:.2f} | "
                         f"{vs} |")
    return lines


def vs_cudnn(kind: str, B: int, H: int, cudnn_s: float, *step_s: float) -> str:
    """The tables' last column: ``step_s / cudnn_s`` (several joined by " / ") at the one size
    with a published cuDNN figure (LSTM B 16, H 768), "–" elsewhere."""
    if (kind, B, H) != ("lstm", 16, 768):
        return "–"
    return "**" + " / ".join(f"{s / cudnn_s:.2f}×" for s in step_s) + "**"


def epilogue_s(elements: int, slots: int, cover_s: float) -> float:
    """The gate term of a persistent step whose block applies the gates to ``elements`` (row,
    unit) pairs with :data:`THREADS` threads: :data:`GATES_S` when the inputs are loaded after the
    product (``slots`` 0, or more elements per thread than ``slots``, the ones whose inputs are
    loaded ahead); else :data:`GATE_MATH_S` plus whatever of :data:`INPUT_LOAD_S` the work between
    the loads and their use (``cover_s``) does not hide."""
    if slots == 0 or -(-elements // THREADS) > slots:
        return GATES_S
    return GATE_MATH_S + max(0.0, INPUT_LOAD_S - cover_s)


def mma_step(kind: str, B: int, H: int, elem: int = 2, row_tiles: Optional[int] = None,
             split_batch: bool = True, tagged: bool = False, prefetch: bool = True) -> Dict[str, float]:
    """The modelled forward step of the CUDA tensor-core persistent kernel, every term in seconds.

    Blocks as ``recurrence_persistent_mma_plan`` picks them by default: while the padded batch
    ``Bp = cdiv(B, 16)·16`` is at most 32 rows, one row tile and the fewest blocks of at most
    ``32 // G`` hidden units; above, tiles of 32 rows (or two) with the fewest blocks of at most
    ``64 // G`` units each when ``tiles x blocks`` fits the :data:`SMS` (``row_tiles``: that many
    tiles, as ``FASTSEQ_CUDA_PERSISTENT_ROW_TILES``; ``split_batch=False``: one tile of blocks of
    at most ``32 // G`` units whatever B, the v0.9 layout). ``G·units`` W_hh rows
    padded to ``MR = 16·m_tiles``, 8 warps splitting ``kt = cdiv(H, 16)`` k-tiles (``kpw =
    cdiv(kt, 8)`` each, ``warps = cdiv(kt, kpw)`` active); each block works on its tile's rows.

    * ``barrier_s``: :data:`BARRIER_S`;
    * ``l2_s``: each block's read of its tile's rows of the ``h_{t-1}`` operand (``rows x Kp``,
      ``elem`` bytes) and its units' gi / fp32 state in and out / hs, cs / next operand, over
      ``min(L2_BYTES_PER_S / ctas, L2_BYTES_PER_S_PER_CTA)`` (the v0.7 constants);
    * ``mma_s``: ``2·MR·Bp·Kp`` FLOP at :data:`MMA_SYNC_FRACTION` of
      :data:`TENSOR_FLOPS_PER_SM`;
    * ``smem_s``: the partial sums, ``warps·MR·Bp`` fp32 stored and ``warps·G·units·B`` read,
      over :data:`SMEM_BYTES_PER_CLOCK` x :data:`CLOCK_HZ` (W costs no shared memory per step);
    * ``gates_s``: :func:`epilogue_s` with the product's terms (``l2_s + mma_s + smem_s``) as the
      cover: the kernel loads the inputs of its first :data:`PREFETCH_ELEMENTS` elements per thread
      before the product (v0.16; not the tagged kernels with 8 k-tiles per warp, short of
      registers); ``prefetch=False``: after it, as up to v0.15 (:data:`GATES_S`).

    ``tagged``: the tagged exchange (``FASTSEQ_CUDA_PERSISTENT_SYNC=tagged``, NOTES v0.15): blocks
    of at most ``32 // G`` units whatever the batch; no grid barrier but :data:`TAGGED_WAIT_S`
    (the last word's way to L2 and a poll's way back); the ``h_{t-1}`` operand read as 32-bit
    words (twice the bytes) and staged through shared memory (written and read once more).

    The terms add up (no overlap assumed between the loads, the product and the
    reduction of one step: they depend on each other).
    """
    G = 3 if kind == "gru" else 4
    bp = -(-B // 16) * 16
    tiles, max_units = 1, 32 // G
    if not split_batch:
        pass
    elif row_tiles is None and bp > ROW_TILE:  # the plan's default batch split (v0.14)
        cap = (32 if tagged else 64) // G
        split_ctas = -(-H // -(-H // -(-H // cap)))
        for r in (-(-bp // ROW_TILE), 2):
            if r * split_ctas <= SMS:
                tiles, max_units = r, cap
                break
    elif row_tiles:
        tiles = -(-(bp // 16) // -(-(bp // 16) // row_tiles))
        max_units = (32 if tagged else 64) // G
    rows = -(-(bp // 16) // tiles) * 16  # padded rows per tile
    per_tile = -(-H // max_units)
    units = -(-H // per_tile)
    per_tile = -(-H // units)
    ctas = tiles * per_tile
    m_tiles = -(-(G * units) // 16)
    mr = 16 * m_tiles
    kt = -(-H // 16)
    kpw = -(-kt // 8)
    warps = -(-kt // kpw)
    kp = kt * 16
    h_op = rows * kp * (4 if tagged else elem)
    real_rows = min(B, rows)
    tile = real_rows * units * (G * elem + 2 * 4 + 2 * 4 + 2 * elem + elem)
    per_cta_bw = min(L2_BYTES_PER_S / ctas, L2_BYTES_PER_S_PER_CTA)
    l2_s = (h_op + tile) / per_cta_bw
    mma_s = 2 * mr * rows * kp / (MMA_SYNC_FRACTION * TENSOR_FLOPS_PER_SM)
    smem_bytes = warps * mr * rows * 4 + warps * G * units * real_rows * 4 + (2 * rows * kp * elem if tagged else 0)
    smem_s = smem_bytes / (SMEM_BYTES_PER_CLOCK * CLOCK_HZ)
    barrier_s = TAGGED_WAIT_S if tagged else BARRIER_S
    slots = 0 if not prefetch or (tagged and kpw > 4) else PREFETCH_ELEMENTS
    gates_s = epilogue_s(units * real_rows, slots, l2_s + mma_s + smem_s)
    step_s = barrier_s + l2_s + mma_s + smem_s + gates_s
    return {"ctas": ctas, "row_tiles": tiles, "rows_per_tile": rows, "units": units, "m_tiles": m_tiles,
            "k_tiles_per_warp": kpw, "warps": warps, "h_op_bytes": h_op, "smem_bytes": smem_bytes,
            "barrier_s": barrier_s, "l2_s": l2_s, "mma_s": mma_s, "smem_s": smem_s, "gates_s": gates_s,
            "step_s": step_s}


def mma_table(sizes=((16, 512), (16, 768), (16, 1024), (64, 512), (64, 768), (64, 1024)), T: int = 128) -> List[str]:
    """The table of :func:`mma_step` (bf16) with the plan's row tiles (NOTES v0.14), next to the
    v0.9 layout's step (one tile: ``split_batch=False``)."""
    lines = ["| layer | B | H | row tiles × blocks × units (k-tiles per warp) | barrier µs | L2 µs (h rows KB) "
             f"| MMA µs | partial sums µs | gates µs | **step µs** | inputs after the product (v0.15) µs "
             f"| v0.9 layout µs | T = {T} forward, ms | ÷ cuDNN's {CUDNN_LSTM_B16_H768_S * 1e6:.2f} µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("gru", "lstm"):
        for B, H in sizes:
            m = mma_step(kind, B, H)
            late = mma_step(kind, B, H, prefetch=False)
            one = mma_step(kind, B, H, split_batch=False, prefetch=False)
            vs = vs_cudnn(kind, B, H, CUDNN_LSTM_B16_H768_S, m["step_s"])
            lines.append(f"| {kind.upper()} | {B} | {H} | {m['row_tiles']} × {m['ctas'] // m['row_tiles']} × "
                         f"{m['units']} ({m['k_tiles_per_warp']}) | "
                         f"{m['barrier_s'] * 1e6:.2f} | {m['l2_s'] * 1e6:.2f} ({m['h_op_bytes'] / 1024:.0f}) | "
                         f"{m['mma_s'] * 1e6:.2f} | {m['smem_s'] * 1e6:.2f} | {m['gates_s'] * 1e6:.2f} | "
                         f"**{m['step_s'] * 1e6:.2f}** | {late['step_s'] * 1e6:.2f} | {one['step_s'] * 1e6:.2f} | "
                         f"{m['step_s'] * T * 1e3:.2f} | {vs} |")
    return lines


def mma_tagged_table(sizes=((8, 512), (16, 256), (16, 512), (16, 768), (16, 1024), (64, 512), (64, 768),
                              (64, 1024))) -> List[str]:
    """The tensor-core forward's step with the tagged exchange next to the grid barrier's (bf16;
    :func:`mma_step` with ``tagged``; NOTES v0.15): what the barrier's removal saves against
    what reading h as twice the bytes costs."""
    lines = ["| layer | B | H | blocks (tagged) | wait µs | L2 µs (h words KB) | staging + partial sums µs "
             "| **tagged step µs** | grid-barrier step µs | tagged − grid µs "
             f"| ÷ cuDNN's {CUDNN_LSTM_B16_H768_S * 1e6:.2f} µs (tagged / grid) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("gru", "lstm"):
        for B, H in sizes:
            t, g = mma_step(kind, B, H, tagged=True), mma_step(kind, B, H)
            vs = vs_cudnn(kind, B, H, CUDNN_LSTM_B16_H768_S, t["step_s"], g["step_s"])
            lines.append(f"| {kind.upper()} | {B} | {H} | {t['ctas']} | {t['barrier_s'] * 1e6:.2f} | "
                         f"{t['l2_s'] * 1e6:.2f} ({t['h_op_bytes'] / 1024:.0f}) | {t['smem_s'] * 1e6:.2f} | "
                         f"**{t['step_s'] * 1e6:.2f}** | {g['step_s'] * 1e6:.2f} | "
                         f"{(t['step_s'] - g['step_s']) * 1e6:+.2f} | {vs} |")
    return lines


def mma_backward_step(kind: str, B: int, H: int, elem: int = 2, prefetch: bool = True) -> Dict[str, float]:
    """The modelled backward step of the CUDA tensor-core persistent backward, every term in seconds.

    Blocks as ``recurrence_persistent_mma_backward_plan`` picks them by default: 16
    hidden units each (``ctas = cdiv(H, 16)``, one 16-row tile of W_hh^T), 8 warps
    splitting ``kt = cdiv(G·H, 16)`` k-tiles, ``Bp = cdiv(B, 16)·16``.

    * ``barrier_s``: :data:`BARRIER_S`, one per step (between phase 1 and the product);
    * ``l2_s``: each block's read of the whole ``dG[t]`` operand (``Bp x Kp``, ``elem``
      bytes, ``Kp = kt·16``) and its units' phase-1 traffic (grad_hs, the saved gates, the
      previous h / c in; dh, dc in and out; dG in fp32, grad_gi and the operand out), over
      the per-CTA L2 rate of :func:`mma_step`;
    * ``smem_w_s``: the W^T tiles read from shared memory, once per 64 batch rows
      (``16·Kp·elem·cdiv(Bp, 64)``), plus the partial sums (``warps·16·Bp`` fp32 stored,
      ``warps·units·B`` read), over :data:`SMEM_BYTES_PER_CLOCK` x :data:`CLOCK_HZ`;
    * ``mma_s``: ``2·16·Bp·Kp`` FLOP at :data:`MMA_SYNC_FRACTION` of :data:`TENSOR_FLOPS_PER_SM`;
    * ``gates_s``: phase 1's gate-gradient math: :func:`epilogue_s`, the inputs of the first
      :data:`BWD_PREFETCH_ELEMENTS` elements per thread loaded during the previous step's product
      (``l2_s + smem_s + mma_s`` its cover) and the carried dh in shared memory (v0.16);
      ``prefetch=False``: loaded after the barrier, as up to v0.15 (:data:`GATES_S`).

    Added, not overlapped, as in :func:`mma_step`.
    """
    G = 3 if kind == "gru" else 4
    units = min(H, 16)
    ctas = -(-H // units)
    kt = -(-(G * H) // 16)
    kpw = -(-kt // 8)
    warps = -(-kt // kpw)
    bp, kp = -(-B // 16) * 16, kt * 16
    dg_op = bp * kp * elem
    phase1 = B * units * (elem + (G + 1) * elem + elem + 2 * 4 + 2 * 4 + G * 4 + 2 * G * elem)
    per_cta_bw = min(L2_BYTES_PER_S / ctas, L2_BYTES_PER_S_PER_CTA)
    l2_s = (dg_op + phase1) / per_cta_bw
    smem_bytes = 16 * kp * elem * -(-bp // 64) + warps * 16 * bp * 4 + warps * units * B * 4
    smem_s = smem_bytes / (SMEM_BYTES_PER_CLOCK * CLOCK_HZ)
    mma_s = 2 * 16 * bp * kp / (MMA_SYNC_FRACTION * TENSOR_FLOPS_PER_SM)
    gates_s = epilogue_s(B * units, BWD_PREFETCH_ELEMENTS if prefetch else 0, l2_s + smem_s + mma_s)
    step_s = BARRIER_S + l2_s + smem_s + mma_s + gates_s
    return {"ctas": ctas, "units": units, "k_tiles_per_warp": kpw, "warps": warps, "dg_op_bytes": dg_op,
            "smem_bytes": smem_bytes, "barrier_s": BARRIER_S, "l2_s": l2_s, "smem_s": smem_s, "mma_s": mma_s,
            "gates_s": gates_s, "step_s": step_s}


def mma_backward_table(sizes=((16, 512), (16, 768), (16, 1024), (64, 512), (64, 768), (64, 1024)),
                       T: int = 128) -> List[str]:
    """The NOTES v0.13 table of :func:`mma_backward_step` (bf16)."""
    lines = ["| layer | B | H | blocks × units (k-tiles per warp) | barrier µs | L2 µs (dG operand KB) | "
             f"W^T + partial sums from smem µs | MMA µs | gates µs | **step µs** | inputs after the barrier "
             f"(v0.15) µs | T = {T} backward, ms | ÷ cuDNN's {CUDNN_LSTM_B16_H768_BWD_S * 1e6:.2f} µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("gru", "lstm"):
        for B, H in sizes:
            m = mma_backward_step(kind, B, H)
            late = mma_backward_step(kind, B, H, prefetch=False)
            vs = vs_cudnn(kind, B, H, CUDNN_LSTM_B16_H768_BWD_S, m["step_s"])
            lines.append(f"| {kind.upper()} | {B} | {H} | {m['ctas']} × {m['units']} ({m['k_tiles_per_warp']}) | "
                         f"{m['barrier_s'] * 1e6:.2f} | {m['l2_s'] * 1e6:.2f} ({m['dg_op_bytes'] / 1024:.0f}) | "
                         f"{m['smem_s'] * 1e6:.2f} | {m['mma_s'] * 1e6:.2f} | {m['gates_s'] * 1e6:.2f} | "
                         f"**{m['step_s'] * 1e6:.2f}** | {late['step_s'] * 1e6:.2f} | {m['step_s'] * T * 1e3:.2f} | "
                         f"{vs} |")
    return lines


# The cluster backward (assumptions until a GPU measures them):
CLUSTER_BARRIER_S = 0.25e-6  # barrier.cluster arrive (release) + wait (acquire) among <= 8 CTAs of one GPC
DSMEM_BYTES_PER_CLOCK = 32  # one SM's reads of other SMs' shared memory (as the per-CTA L2 rate)


def cluster_size(H: int, units: int = 16) -> int:
    """The cluster size ``recurrence_persistent_mma_backward_plan`` picks on auto: the largest
    of 8, 4, 2 that is at most the block count and keeps ``size x units <= 128`` columns (1: none
    applies, the block kernel runs)."""
    blocks = -(-H // units)
    for size in (8, 4, 2):
        if size <= blocks and size * units <= 128:
            return size
    return 1


def mma_cluster_backward_step(kind: str, B: int, H: int, elem: int = 2, prefetch: bool = True) -> Dict[str, float]:
    """The modelled backward step of the cluster backward (csrc/cuda/persistent_mma_kernels.cu,
    bench/NOTES.md v0.14), every term in seconds: :func:`mma_backward_step`'s blocks (16 units
    each) in clusters of :func:`cluster_size`, each rank holding ``ktr = cdiv(kt, CL)`` k-tiles
    of W_hh^T for the cluster's ``CL·16`` columns (``m_tiles = CL``, ``kparts = 8 / m_tiles``).

    * ``barrier_s``: :data:`BARRIER_S` (the grid barrier, one per step);
    * ``l2_s``: the rank's slice of ``dG[t]`` (``Bp x 16·ktr``, ``elem`` bytes) and the block's
      phase-1 traffic (as :func:`mma_backward_step`), over the per-CTA L2 rate;
    * ``smem_s``: the W^T slice once per 64 batch rows, the partial sums stored
      (``kparts·MR·Bp`` fp32) and the block's own rank's share read, over the SM's
      shared-memory rate;
    * ``mma_s``: ``2·MR·Bp·16·ktr`` FLOP at :data:`MMA_SYNC_FRACTION` of the SM's peak;
    * ``cluster_barrier_s``: :data:`CLUSTER_BARRIER_S`;
    * ``dsmem_s``: the other ranks' partial sums of the block's units
      (``units·B·(CL-1)·kparts`` fp32) over :data:`DSMEM_BYTES_PER_CLOCK` x :data:`CLOCK_HZ`;
    * ``gates_s``: as :func:`mma_backward_step`'s, the cover being everything from the grid
      barrier to phase 1 (``l2_s + smem_s + mma_s + cluster_barrier_s + dsmem_s``).

    Added, not overlapped. With clusters of 1 (H < 32) this is the block kernel's model."""
    G = 3 if kind == "gru" else 4
    if cluster_size(H) == 1:
        m = mma_backward_step(kind, B, H, elem, prefetch)
        return {**m, "cluster": 1, "cluster_barrier_s": 0.0, "dsmem_s": 0.0}
    units = 16
    size = cluster_size(H, units)
    ctas = -(-(-(-H // units)) // size) * size
    m_tiles = -(-(size * units) // 16)
    mr = 16 * m_tiles
    kparts = 8 // m_tiles
    kt = -(-(G * H) // 16)
    ktr = -(-kt // size)
    bp = -(-B // 16) * 16
    dg_slice = bp * 16 * ktr * elem
    phase1 = B * units * (elem + (G + 1) * elem + elem + 2 * 4 + 2 * 4 + G * 4 + 2 * G * elem)
    per_cta_bw = min(L2_BYTES_PER_S / ctas, L2_BYTES_PER_S_PER_CTA)
    l2_s = (dg_slice + phase1) / per_cta_bw
    smem_bytes = mr * 16 * ktr * elem * -(-bp // 64) + kparts * mr * bp * 4 + units * B * kparts * 4
    smem_s = smem_bytes / (SMEM_BYTES_PER_CLOCK * CLOCK_HZ)
    mma_s = 2 * mr * bp * 16 * ktr / (MMA_SYNC_FRACTION * TENSOR_FLOPS_PER_SM)
    dsmem_bytes = units * B * (size - 1) * kparts * 4
    dsmem_s = dsmem_bytes / (DSMEM_BYTES_PER_CLOCK * CLOCK_HZ)
    gates_s = epilogue_s(B * units, BWD_PREFETCH_ELEMENTS if prefetch else 0,
                         l2_s + smem_s + mma_s + CLUSTER_BARRIER_S + dsmem_s)
    step_s = BARRIER_S + l2_s + smem_s + mma_s + CLUSTER_BARRIER_S + dsmem_s + gates_s
    return {"ctas": ctas, "cluster": size, "units": units, "m_tiles": m_tiles, "k_tiles_per_rank": ktr,
            "dg_slice_bytes": dg_slice, "dsmem_bytes": dsmem_bytes, "smem_bytes": smem_bytes,
            "barrier_s": BARRIER_S, "l2_s": l2_s, "smem_s": smem_s, "mma_s": mma_s,
            "cluster_barrier_s": CLUSTER_BARRIER_S, "dsmem_s": dsmem_s, "gates_s": gates_s, "step_s": step_s}


def mma_cluster_backward_table(sizes=((16, 512), (16, 768), (16, 1024), (64, 512), (64, 768), (64, 1024)),
                               T: int = 128) -> List[str]:
    """The NOTES v0.14 table of :func:`mma_cluster_backward_step` (bf16), next to the block kernel's step."""
    lines = ["| layer | B | H | blocks (cluster × k-tiles per rank) | barriers µs (grid + cluster) | "
             "L2 µs (dG slice KB) | W^T + partial sums from smem µs | MMA µs | DSMEM µs (KB) | gates µs | "
             f"**step µs** | inputs after the barrier (v0.15) µs | block kernel µs | T = {T} backward, ms | "
             f"÷ cuDNN's {CUDNN_LSTM_B16_H768_BWD_S * 1e6:.2f} µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("gru", "lstm"):
        for B, H in sizes:
            m = mma_cluster_backward_step(kind, B, H)
            late = mma_cluster_backward_step(kind, B, H, prefetch=False)
            old = mma_backward_step(kind, B, H)
            vs = vs_cudnn(kind, B, H, CUDNN_LSTM_B16_H768_BWD_S, m["step_s"])
            lines.append(f"| {kind.upper()} | {B} | {H} | {m['ctas']} ({m['cluster']} × {m['k_tiles_per_rank']}) | "
                         f"{m['barrier_s'] * 1e6:.2f} + {m['cluster_barrier_s'] * 1e6:.2f} | "
                         f"{m['l2_s'] * 1e6:.2f} ({m['dg_slice_bytes'] / 1024:.0f}) | {m['smem_s'] * 1e6:.2f} | "
                         f"{m['mma_s'] * 1e6:.2f} | {m['dsmem_s'] * 1e6:.2f} ({m['dsmem_bytes'] / 1024:.0f}) | "
                         f"{m['gates_s'] * 1e6:.2f} | **{m['step_s'] * 1e6:.2f}** | {late['step_s'] * 1e6:.2f} | "
                         f"{old['step_s'] * 1e6:.2f} | "
                         f"{m['step_s'] * T * 1e3:.2f} | {vs} |")
    return lines


def table(sizes=((16, 512), (16, 768), (16, 1024), (64, 512), (64, 768), (64, 1024)), T: int = 128) -> List[str]:
    lines = ["| layer | B | H | tile (rows × units), warps | CTAs | L2 MB (W_hh + state + rest) | L2 µs | step µs "
             f"| inputs after the product (v0.16) µs | T = {T} forward, ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("gru", "lstm"):
        for B, H in sizes:
            m = step(kind, B, H)
            mb = (m["w_bytes"] + m["state_bytes"] + m["rest_bytes"]) / 1e6
            lines.append(f"| {kind.upper()} | {B} | {H} | {m['BLOCK_B']} × {m['BLOCK_H']}, {m['num_warps']} | "
                         f"{m['ctas']} | {mb:.1f} ({m['w_bytes'] / 1e6:.1f} + {m['state_bytes'] / 1e6:.1f} + "
                         f"{m['rest_bytes'] / 1e6:.1f}) | {m['l2_s'] * 1e6:.2f} | {m['step_s'] * 1e6:.1f} | "
                         f"{step(kind, B, H, prefetch=False)['step_s'] * 1e6:.1f} | {m['step_s'] * T * 1e3:.2f} |")
    return lines


if __name__ == "__main__":
    print("\n".join(table()))
    print()
    print("\n".join(resident_table()))
    print()
    print("\n".join(mma_table()))
    print()
    print("\n".join(mma_tagged_table()))
    print()
    print("\n".join(mma_backward_table()))
    print()
    print("\n".join(mma_cluster_backward_table()))
