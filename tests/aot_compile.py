"""Compile every fastseq Triton kernel for a GPU target without a GPU.

The interpreter runs kernels as numpy and misses what only the compiler checks
(non-constexpr globals, layouts, dot shapes, dtype rules), so CI also compiles
each kernel to a cubin for sm_90 (H100/H200) and sm_80, in float32 and
bfloat16. Run as a script in a process *without* TRITON_INTERPRET (the test does).
"""
import os
import sys

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastseq.ops.attention import triton as attention  # noqa: E402
from fastseq.ops.decoder_step import triton as cell  # noqa: E402
from fastseq.ops.recurrence import triton as rnn  # noqa: E402


def _jit(k):
    while not isinstance(k, triton.runtime.jit.JITFunction):
        k = getattr(k, "kernel", None) or k.fn
    return k


def _variants(fn):
    """Constexpr assignments to compile: every flag on; block sizes as on a GPU."""
    base = {}
    for p in fn.params:
        if not p.is_constexpr:
            continue
        if p.name == "PRECISION":
            base[p.name] = "ieee"
        elif p.name.startswith("BLOCK_"):
            base[p.name] = 16 if p.name == "BLOCK_T" else 32
        else:
            base[p.name] = True
    out = [base]
    if "USE_DOT" in base:  # the single-query (broadcast) form too
        out.append(dict(base, USE_DOT=False, BLOCK_T=1, BLOCK_A=128, BLOCK_D=128))
    return out


def _signature(fn, dtype):
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = {"len_ptr": "*i64", "mask_ptr": "*u8", "steps_ptr": "*i64"}.get(p.name, "*" + dtype)
        else:
            sig[p.name] = "i32"
    return sig


def main():
    kernels = [getattr(mod, name) for mod in (rnn, attention, cell) for name in dir(mod)
               if name.endswith("_kernel")]
    n = 0
    for arch in (90, 80):
        target = GPUTarget("cuda", arch, 64)
        for k in kernels:
            fn = _jit(k)
            for dtype in ("fp32", "bf16"):
                for consts in _variants(fn):
                    src = ASTSource(fn=fn, signature=_signature(fn, dtype), constexprs=consts)
                    compiled = triton.compile(src, target=target, options={"num_warps": 4})
                    assert compiled.asm["cubin"], fn.__name__
                    n += 1
    print(f"compiled {n} kernel variants for sm_90 and sm_80")
    return 0


if __name__ == "__main__":
    sys.exit(main())
