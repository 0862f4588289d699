"""The Triton attention kernels' structure (fastseq/ops/attention/triton.py): every
``tanh(q_t + K_j)`` element is computed once in the forward and once in the backward,
the multi-tile paths (several source tiles, context slices, A chunks and query
blocks at once) agree with the reference, and the approximate tanh
(:func:`fastseq.ops.triton_utils.tanh_fast`) is chosen only for half inputs on a
compiled target, where it compiles to MUFU.TANH."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parity import assert_close

import fastseq
from conftest import DEVICE, TRITON
from fastseq import ops

pytestmark = pytest.mark.skipif(not TRITON, reason="Triton backend not available here")

HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter has no bf16 arithmetic


def _inputs(B, T, S, A, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, T, A), (B, S, A), (B, S, D)))
    e = torch.randn(A, generator=g) / math.sqrt(A)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[-1] = S
    mask = (torch.arange(S)[None] < lengths[:, None]) & (torch.rand(B, S, generator=g) > 0.2)
    mask[:, 0] = True
    return [x.to(DEVICE, dtype) for x in (q, k, v, e)], mask.to(DEVICE), lengths.to(DEVICE)


def _run(tensors, mask, lengths, seed):
    xs = [t.detach().clone().requires_grad_(True) for t in tensors]
    ctx, w = ops.additive_attention(*xs, mask=mask, lengths=lengths)
    g = torch.Generator().manual_seed(seed)
    gc, gw = (torch.randn(x.shape, generator=g).to(x) for x in (ctx, w))
    grads = torch.autograd.grad((ctx * gc).sum() + (w * gw).sum(), xs)
    return (ctx.detach(), w.detach()) + tuple(grads)


# (B, T, S, A, D): each crosses the interpreter's 16-wide tiles (and, the last, a GPU's
# 32-wide source tile and 64-wide context slice) in S, A and D; T = 1 (a decoder step),
# T = 5 (broadcast path, one query block), T = 37 (tl.dot path, three query blocks).
MULTI_TILE = [(3, 1, 40, 40, 50), (2, 5, 33, 17, 70), (2, 37, 35, 24, 130)]


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize("how", ["mask", "lengths"])
@pytest.mark.parametrize("B,T,S,A,D", MULTI_TILE)
def test_multi_tile_matches_reference(B, T, S, A, D, how, dtype):
    tensors, mask, lengths = _inputs(B, T, S, A, D, dtype, seed=B * T + S)
    mask, lengths = (mask, None) if how == "mask" else (None, lengths)
    with fastseq.backend("triton"):
        got = _run(tensors, mask, lengths, seed=4)
    with fastseq.backend("reference"):
        want = _run(tensors, mask, lengths, seed=4)
    for name, a, b in zip(["context", "weights", "grad q", "grad K", "grad V", "grad v"], got, want):
        assert_close(a, b, dtype, name)


@pytest.mark.skipif(DEVICE != "cpu", reason="counts tanh calls under the Triton interpreter")
def test_energy_computed_once_per_element(monkeypatch):
    """Sizes that fill every tile exactly: the forward evaluates tanh on B*T*S*A
    elements (not once per context slice: D = 48 is three interpreter slices), and
    the backward on B*T*S*A more."""
    from fastseq.ops.attention import triton as kernels

    counted = {"n": 0}
    real = kernels.tanh_fast

    def counting_tanh_fast(x, FAST):
        counted["n"] += math.prod(int(d) for d in x.shape)
        return real(x, FAST)

    monkeypatch.setattr(kernels, "tanh_fast", counting_tanh_fast)
    B, T, S, A, D = 2, 16, 32, 32, 48
    tensors, mask, _ = _inputs(B, T, S, A, D, torch.float32, seed=1)
    xs = [t.clone().requires_grad_(True) for t in tensors]
    with fastseq.backend("triton"):
        ctx, _ = ops.additive_attention(*xs, mask=mask)
        assert counted["n"] == B * T * S * A
        torch.autograd.grad(ctx.sum(), xs)
    assert counted["n"] == 2 * B * T * S * A


def test_fast_tanh_only_for_half_inputs_on_a_compiled_target(monkeypatch):
    from fastseq.ops import triton_utils

    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    monkeypatch.setattr(triton_utils, "interpreter_on", lambda: True)
    assert not any(triton_utils.fast_tanh_ok(d) for d in dtypes)
    monkeypatch.setattr(triton_utils, "interpreter_on", lambda: False)
    assert [triton_utils.fast_tanh_ok(d) for d in dtypes] == [True, True, False, False]


_SASS_SCRIPT = r"""
import os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastseq.ops.attention import triton as kernels

fn = kernels._attention_energy_bwd_kernel
while not isinstance(fn, triton.runtime.jit.JITFunction):
    fn = fn.fn
sig = {p.name: "constexpr" if p.is_constexpr else
       ("*fp32" if p.name in ("de_ptr", "dv_ptr") else "*bf16") if p.name.endswith("_ptr") else "i32"
       for p in fn.params}
for fast in (True, False):
    consts = dict(FAST=fast, BLOCK_T=2, BLOCK_S=32, BLOCK_A=64)
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    sass = "unavailable"
    try:
        from triton import knobs
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"]); f.flush()
            sass = str(subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True,
                                      text=True, timeout=120).stdout.count("MUFU.TANH"))
    except Exception:  # no cuobjdump: the PTX check still runs
        sass = "unavailable"
    print(f"FAST={fast} ptx={ck.asm['ptx'].count('tanh.approx.f32')} sass={sass}")
"""


def test_fast_tanh_compiles_to_one_mufu_tanh_for_sm90():
    """The energy backward with FAST=True compiles (without a GPU) for sm_90a to
    tanh.approx.f32 in the PTX and MUFU.TANH in the SASS; with FAST=False to neither."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", _SASS_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    fast = dict(kv.split("=") for kv in lines["FAST=True"].split())
    exact = dict(kv.split("=") for kv in lines["FAST=False"].split())
    assert int(fast["ptx"]) > 0 and int(exact["ptx"]) == 0, proc.stdout
    if fast["sass"] != "unavailable":
        assert int(fast["sass"]) > 0 and int(exact["sass"]) == 0, proc.stdout
