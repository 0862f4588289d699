"""A model of one recurrence step of the per-step Triton kernels on an H100/H200
(bench/NOTES.md v0.7; a prediction until a GPU measures it).

    python -m fastseq.bench.step_model            # the NOTES table (bf16 forward)

Per step, the forward kernel reads from L2: ``W_hh`` once per row tile, the
previous state's rows once per hidden tile, and gi / the fp32 state / hs / gates
once. Tensor-core work is negligible at these sizes, so a step is its L2 bytes
over ``min(L2 bandwidth, CTAs x per-CTA bandwidth)`` (the constants of
:mod:`fastseq.ops.triton_utils`, whose ``pick_blocks`` minimises this term) plus
a dependent-launch gap and the gate math after the last product (assumptions).
"""
from __future__ import annotations

from typing import Dict, List

from fastseq.ops.triton_utils import L2_BYTES_PER_S, L2_BYTES_PER_S_PER_CTA, gpu_blocks

LAUNCH_GAP_S = 1.0e-6  # between dependent kernels in one stream (assumption)
GATES_S = 0.4e-6  # gate math and stores after the last product (assumption)


def step(kind: str, B: int, H: int, elem: int = 2) -> Dict[str, float]:
    """The modelled forward step of a ``kind`` ("gru"/"lstm") layer: tile, CTAs, L2 bytes
    (total and by part) and seconds (L2 and total). ``elem``: bytes per element (bf16: 2)."""
    G = 3 if kind == "gru" else 4
    blk = gpu_blocks(B, H)
    n_b, n_h = -(-B // blk.BLOCK_B), -(-H // blk.BLOCK_H)
    ctas = n_b * n_h
    w = n_b * G * H * H * elem
    state = n_h * B * H * elem
    rest = B * G * H * elem + 3 * B * H * 4 + B * H * elem + B * 4 * H * elem
    l2_s = (w + state + rest) / min(L2_BYTES_PER_S, ctas * L2_BYTES_PER_S_PER_CTA)
    return {"BLOCK_B": blk.BLOCK_B, "BLOCK_H": blk.BLOCK_H, "num_warps": blk.num_warps, "ctas": ctas,
            "w_bytes": w, "state_bytes": state, "rest_bytes": rest, "l2_s": l2_s,
            "step_s": l2_s + LAUNCH_GAP_S + GATES_S}


def table(sizes=((16, 512), (16, 768), (16, 1024), (64, 512), (64, 768), (64, 1024)), T: int = 128) -> List[str]:
    lines = ["| layer | B | H | tile (rows × units), warps | CTAs | L2 MB (W_hh + state + rest) | L2 µs | step µs "
             f"| T = {T} forward, ms |", "|---|---|---|---|---|---|---|---|---|"]
    for kind in ("gru", "lstm"):
        for B, H in sizes:
            m = step(kind, B, H)
            mb = (m["w_bytes"] + m["state_bytes"] + m["rest_bytes"]) / 1e6
            lines.append(f"| {kind.upper()} | {B} | {H} | {m['BLOCK_B']} × {m['BLOCK_H']}, {m['num_warps']} | "
                         f"{m['ctas']} | {mb:.1f} ({m['w_bytes'] / 1e6:.1f} + {m['state_bytes'] / 1e6:.1f} + "
                         f"{m['rest_bytes'] / 1e6:.1f}) | {m['l2_s'] * 1e6:.2f} | {m['step_s'] * 1e6:.1f} | "
                         f"{m['step_s'] * T * 1e3:.2f} |")
    return lines


if __name__ == "__main__":
    print("\n".join(table()))
