"""The test suite's one comparison of computed tensors, and its tolerance model.

``assert_close(got, want, dtype)`` passes when

* ``got`` and ``want`` have the same shape (and, unless ``cast`` is given, the same dtype);
* NaN, +Inf and -Inf sit at the same positions in both (a kernel that leaves an
  output unwritten shows up here: outputs are NaN-poisoned before kernels
  write them, see conftest.py);
* on the finite positions, in float64,

      ||got - want||_2  <=  rtol * ||want||_2  +  atol * sqrt(n)        (n = finite elements)

  with ``(rtol, atol) = TOLERANCE[dtype]``, ``dtype`` the precision the result
  was computed in (the inputs' dtype; float32 for half inputs whose reference ran
  in float32 is still judged at the half dtype of the output).

Why a norm and not elementwise bounds: the ops are long sums and recurrences
(T steps, H-wide products), whose rounding differs between two correct
implementations by a few units of the working precision *relative to the
whole result*; elementwise relative bounds fail on entries that happen to be
near zero, elementwise absolute bounds depend on the scale. The rtol values are
a few hundred units of roundoff for float32/float64 (unit roundoff 6e-8, 1.1e-16),
and ~10-20 for the half dtypes (4.9e-4, 3.9e-3), whose outputs (and the
attention weights inside the backward) are rounded once more; atol is a noise
floor of about two half ulps at 1 for tensors whose true value is ~0. A wrong
formula is off by O(1).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch

TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (3e-2, 3e-3),
}


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: Optional[torch.dtype] = None, name: str = "",
                 cast: bool = False) -> None:
    """``got`` matches ``want`` under the model above; ``dtype`` defaults to ``want.dtype``.

    ``cast=True`` compares tensors of different dtypes (e.g. a float32 kernel against a
    float64 reference), judged at ``dtype``.
    """
    label = f"{name}: " if name else ""
    dtype = dtype or want.dtype
    assert got.shape == want.shape, f"{label}shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not cast:
        assert got.dtype == want.dtype, f"{label}dtype {got.dtype} != {want.dtype}"
    if not want.is_floating_point():
        assert torch.equal(got, want), f"{label}values differ"
        return
    a, b = got.detach().double().cpu(), want.detach().double().cpu()
    for what, fn in (("NaN", torch.isnan), ("+Inf", lambda t: t == math.inf), ("-Inf", lambda t: t == -math.inf)):
        ma, mb = fn(a), fn(b)
        if not torch.equal(ma, mb):
            where = (ma != mb).nonzero()[0].tolist()
            raise AssertionError(f"{label}{what} at different positions (first at {where}: "
                                 f"got {a[tuple(where)].item()}, want {b[tuple(where)].item()})")
    finite = torch.isfinite(b)
    a, b = a[finite], b[finite]
    rtol, atol = TOLERANCE[dtype]
    err, norm = float((a - b).norm()), float(b.norm())
    bound = rtol * norm + atol * math.sqrt(max(b.numel(), 1))
    assert err <= bound, (f"{label}||got - want|| = {err:.3e} > {bound:.3e} = {rtol:g} * ||want|| ({norm:.3e}) "
                          f"+ {atol:g} * sqrt({b.numel()}) [{dtype}]; max abs diff "
                          f"{float((a - b).abs().max()) if b.numel() else 0.0:.3e}")


def assert_all_close(got, want, dtype: Optional[torch.dtype] = None, names=None, cast: bool = False) -> None:
    """:func:`assert_close` over two equal-length sequences of tensors."""
    got, want = list(got), list(want)
    assert len(got) == len(want), f"{len(got)} tensors != {len(want)}"
    names = list(names) if names is not None else [str(i) for i in range(len(want))]
    for n, a, b in zip(names, got, want):
        assert_close(a, b, dtype, n, cast)


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Run the block with torch's float32 products in IEEE fp32, no TF32: cuDNN's RNNs
    (``torch.backends.cudnn.rnn.fp32_precision``, ``"tf32"`` by default) and matmuls
    (``torch.set_float32_matmul_precision``, ``torch.backends.cuda.matmul.fp32_precision``).

    For the torch.nn side of a float32 comparison on CUDA: fastseq's float32 math
    is IEEE unless the user opts in to TF32, while cuDNN's GRU/LSTM use TF32 by
    default, which differs by ~1e-3 relative, far beyond the float32 tolerance.
    Every setting changed is restored afterwards, also on error. On a CPU-only
    machine nothing that runs depends on these settings.

    Inside the block torch's legacy ``torch.backends.cudnn.allow_tf32`` cannot be
    read (torch refuses once cuDNN's RNN and convolution settings differ); torch.nn's
    RNNs ask for the RNN setting only.
    """
    b = torch.backends
    saved = (torch.get_float32_matmul_precision(), b.cuda.matmul.fp32_precision,
             b.mkldnn.matmul.fp32_precision, b.cudnn.rnn.fp32_precision)
    try:
        # The legacy setting too: cuBLAS refuses a per-op setting that contradicts it.
        torch.set_float32_matmul_precision("highest")  # also sets cuda.matmul and mkldnn.matmul to "ieee"
        b.cuda.matmul.fp32_precision = "ieee"
        b.cudnn.rnn.fp32_precision = "ieee"
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])  # first: it overwrites the per-op settings
        b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision, b.cudnn.rnn.fp32_precision = saved[1:]
