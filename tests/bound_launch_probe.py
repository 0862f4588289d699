"""Run on the stub driver by tests/test_bound_launch.py (a subprocess started with
``stubdriver.subprocess_env``): launches fastseq's step kernels through Triton's full
launch path at every step and through :func:`fastseq.ops.triton_utils.launch_steps`,
records what reaches ``cuLaunchKernelEx`` (grid and parameter bytes) for both, and
prints a JSON summary on its last line."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import stubdriver  # noqa: E402

stubdriver.activate(90)

import torch  # noqa: E402

from fastseq.ops.recurrence import triton as rnn  # noqa: E402
from fastseq.ops.triton_utils import launch_steps  # noqa: E402

_SIZES = {"i1": 1, "i8": 1, "i16": 2, "i32": 4, "u32": 4, "i64": 8, "u64": 8, "fp32": 4, "fp64": 8}


def _param_sizes(compiled):
    """Bytes of each runtime parameter the launcher passes, in order (constexprs are not passed)."""
    out = []
    for ty in compiled.src.signature.values():
        ty = str(ty)
        if ty == "constexpr":
            continue
        out.append(8 if ty.startswith("*") else _SIZES[ty])
    return out


def _compare(name, kernel, grid, steps, args, flags):
    si = kernel.arg_names.index("s")
    args = list(args)
    args[si] = steps[0]
    sizes = _param_sizes(kernel.kernel[grid](*args, **flags))
    stubdriver.record(sizes)
    for s in steps:
        args[si] = s
        kernel.kernel[grid](*args, **flags)
    full = stubdriver.recorded(len(sizes))
    stubdriver.record(sizes)
    launch_steps(kernel, grid, steps, args, **flags)
    bound = stubdriver.recorded(len(sizes))
    stubdriver.record([])
    k = _s_param(args, si)
    s_values = [int.from_bytes(p[k], "little", signed=True) for _, p in bound]
    return {"case": name, "launches": [len(full), len(bound)], "equal": full == bound, "steps": list(steps),
            "s_values": s_values, "params": len(sizes)}


def _s_param(args, si):
    """Index of ``s`` among the runtime parameters: the runtime arguments before it
    (arguments that are None are constexprs, not passed)."""
    return sum(1 for a in args[:si] if a is not None)


def main():
    torch.manual_seed(0)
    T, B, H = 5, 6, 32
    out = []
    for dt in (torch.float32, torch.bfloat16):
        gi, w, b = torch.randn(T, B, 3 * H, dtype=dt), torch.randn(3 * H, H, dtype=dt), torch.randn(3 * H, dtype=dt)
        h0 = torch.randn(B, H, dtype=dt)
        hs, gates = torch.empty(T, B, H, dtype=dt), torch.empty(T, B, 4 * H, dtype=dt)
        grid, kw = rnn._launch_args(B, H)
        args = [gi, rnn._initial_state(h0), h0, w, b, None, hs, gates, None, 0, B, H, T, T * B, 3 * H, H]
        flags = dict(HAS_BIAS=True, HAS_LENGTHS=False, SAVE_GATES=True, PACKED=False, **kw)
        out.append(_compare(f"gru-fwd-{dt}", rnn._gru_fwd_step_kernel, grid, list(range(T)), args, flags))
        lens = torch.tensor([5, 1, 3, 2, 5, 4])
        dg, dh, dgi = torch.empty(T, B, 3 * H), torch.empty(B, H), torch.empty(T, B, 3 * H, dtype=dt)
        args = [hs, gates, hs, h0, w, lens, dg, dh, dgi, None, 0, B, H, T, T * B, 3 * H, H]
        flags = dict(HAS_LENGTHS=True, PACKED=False, **kw)
        out.append(_compare(f"gru-bwd-lengths-{dt}", rnn._gru_bwd_step_kernel, grid, list(range(T - 1, -1, -1)),
                            args, flags))
        # Packed LSTM backward (a step table, no grad_cs: None arguments around s).
        bs = torch.tensor([4, 3, 3, 1])
        plan = rnn._PackedPlan(bs, True)
        N, S = int(bs.sum()), len(plan.steps)
        w4 = torch.randn(4 * H, H, dtype=dt)
        cs, g4 = torch.randn(N, H, dtype=dt), torch.randn(N, 4 * H, dtype=dt)
        dg4 = torch.empty(N, 4 * H)
        args = [cs, None, g4, cs, h0[:4], w4, None, dg4, dh[:4], dh[:4].clone(), torch.empty(N, 4 * H, dtype=dt),
                plan.table("cpu"), 0, 4, H, S, N, 4 * H, H]
        grid4, kw4 = rnn._launch_args(4, H)
        flags = dict(HAS_LENGTHS=False, HAS_GRAD_C=False, STORE_DGI=True, PACKED=True, **kw4)
        out.append(_compare(f"lstm-bwd-packed-{dt}", rnn._lstm_bwd_step_kernel, grid4, list(range(S - 1, -1, -1)),
                            args, flags))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
