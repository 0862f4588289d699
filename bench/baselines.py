"""Baselines that need an optional package: FlashRNN (GPU).

``flashrnn_call(kind, rnn, dtype)`` returns ``fn(x, lengths) -> output [T, B, H]``
running FlashRNN's fused CUDA kernel on ``rnn``'s weights (a one-layer,
unidirectional, time-major torch.nn.GRU/LSTM on a GPU), or None when the
``flashrnn`` package does not import or does not support the case. It is carried to
a GPU machine as a wheel (bench/gpu_check.sh); a CPU run never has it.

FlashRNN's API (read from its source, version 1.0.8, ``flashrnn/flashrnn/flashrnn.py``
and the pointwise kernels)::

    states, last = flashrnn.flashrnn(Wx, R, b, states=None, function="lstm"|"gru",
                                     backend="cuda_fused", dtype="bfloat16"|"float32"|"float16")
    Wx [B, T, G, N, D]   input pre-activations (x W_ih^T + b_ih), N heads of size D (here N=1, D=H)
    R  [Gr, N, D, D]     recurrent weights: gate g's pre-activation is R[g, n] @ y (rows: units)
    b  [Gt, N, D]        biases added inside the kernel
    states [S, B, T, N, D]   every step's states; states[0] is h

The weights map exactly from torch.nn's:

* LSTM: FlashRNN's gates are (i, f, z, o) with c' = f c + i tanh(z), h = o tanh(c'),
  torch.nn's (i, f, g, o) with the same formulas: ``R = W_hh.view(4, 1, H, H)``,
  ``b = b_hh.view(4, 1, H)``, ``Wx = x W_ih^T + b_ih``.
* GRU: FlashRNN has 3 recurrent gates (g, r, z), 3 input gates (r, z, n) and 4 biases
  (g, r, z, n): r = sigmoid(Wx_r + R_r y + b_r), z = sigmoid(Wx_z + R_z y + b_z),
  h' = z h + (1 - z) tanh(Wx_n + b_n + r (R_g y + b_g)) -- torch.nn.GRU with
  g = W_hn h + b_hn: ``R = [W_hn; W_hr; W_hz]``, ``b = [b_hn; b_hr; b_hz; 0]``,
  ``Wx = x W_ih^T + b_ih`` in torch's (r, z, n) order. FlashRNN runs its GRU on the
  alternating ``cuda`` kernel even when ``cuda_fused`` is asked for (it says so).

The layer suite still checks the output against torch.nn before timing it.

FlashRNN compiles a CUDA extension per configuration (function, hidden size, batch
size, dtype) on first use, which can take minutes. ``FASTSEQ_FLASHRNN_BUDGET_S``
(unset: no limit) caps the seconds spent in first calls: once spent, ``flashrnn_call``
returns None, so a timed run is not eaten by builds.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional, Tuple

import torch

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_FIRST_CALLS = {"seconds": 0.0, "built": set()}


def _budget_left() -> bool:
    budget = os.environ.get("FASTSEQ_FLASHRNN_BUDGET_S")
    return not budget or _FIRST_CALLS["seconds"] < float(budget)


def _weights(kind: str, rnn: torch.nn.RNNBase, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlashRNN's ``R`` and ``b`` (leaf tensors that take gradients) from torch.nn's weights."""
    H = rnn.hidden_size
    with torch.no_grad():
        w_hh = rnn.weight_hh_l0.detach()
        b_hh = rnn.bias_hh_l0.detach() if rnn.bias else w_hh.new_zeros(w_hh.shape[0])
        if kind == "lstm":
            R, b = w_hh.reshape(4, 1, H, H), b_hh.reshape(4, 1, H)
        else:
            w_r, w_z, w_n = w_hh.chunk(3)
            b_r, b_z, b_n = b_hh.chunk(3)
            R = torch.stack([w_n, w_r, w_z]).reshape(3, 1, H, H)
            b = torch.stack([b_n, b_r, b_z, torch.zeros_like(b_n)]).reshape(4, 1, H)
    return (R.to(dtype).contiguous().requires_grad_(True), b.to(dtype).contiguous().requires_grad_(True))


def flashrnn_call(kind: str, rnn: torch.nn.RNNBase, dtype: torch.dtype,
                  example: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
                  backend: str = "cuda_fused") -> Optional[Callable]:
    """FlashRNN on ``rnn``'s weights as ``fn(x [T, B, H_in], lengths=None) -> [T, B, H]``, or None.

    ``backend``: FlashRNN's; ``"vanilla"`` (its PyTorch loop, any device) checks the weight
    mapping without a GPU (tests/test_baselines.py).

    None when: ``flashrnn`` does not import; the layer is not one-layer, unidirectional,
    time-major, without projections, on a GPU (but for ``vanilla``); the dtype is not one FlashRNN has; the
    first-call budget (``FASTSEQ_FLASHRNN_BUDGET_S``) is spent; or, with ``example``
    (``(x, lengths)``), a trial call on it fails (the reason goes to stderr).
    The returned function has ``note`` (what runs) and raises ValueError on packed input.
    """
    try:
        import flashrnn as _flashrnn

        flash = _flashrnn.flashrnn
    except Exception:  # noqa: BLE001 - an optional baseline: absent here
        return None
    kind = kind.lower()
    if (kind not in ("gru", "lstm") or rnn.num_layers != 1 or rnn.bidirectional or rnn.batch_first
            or getattr(rnn, "proj_size", 0) or dtype not in _DTYPES
            or (backend != "vanilla" and not rnn.weight_hh_l0.is_cuda)
            or not _budget_left()):
        return None
    H, G = rnn.hidden_size, 3 if kind == "gru" else 4
    R, b = _weights(kind, rnn, dtype)
    w_ih = rnn.weight_ih_l0
    b_ih = rnn.bias_ih_l0 if rnn.bias else None
    name = _DTYPES[dtype]
    version = getattr(_flashrnn, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as _v

            version = _v("flashrnn")
        except Exception:  # noqa: BLE001
            version = "?"

    def call(x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        if lengths is not None:
            raise ValueError("flashrnn baseline: dense input only (no lengths)")
        T, B, _ = x.shape
        key = (kind, B, H, name, backend)
        first = key not in _FIRST_CALLS["built"]
        t0 = time.time()
        gi = torch.nn.functional.linear(x, w_ih, b_ih)  # [T, B, G*H], gates in torch's order
        Wx = gi.reshape(T, B, G, 1, H).transpose(0, 1)  # [B, T, G, N=1, D=H]
        states, _ = flash(Wx, R, b, function=kind, backend=backend, dtype=name)
        out = states[0].reshape(B, T, H).transpose(0, 1)  # h of every step, [T, B, H]
        if first:
            if out.is_cuda:
                torch.cuda.synchronize()
            _FIRST_CALLS["seconds"] += time.time() - t0
            _FIRST_CALLS["built"].add(key)
        return out

    call.note = (f"FlashRNN {version} flashrnn(backend={backend!r}, dtype={name!r}) on torch.nn's weights "
                 f"(gates mapped, see fastseq/bench/baselines.py); input projection by torch"
                 + ("; FlashRNN runs GRU on its alternating 'cuda' kernel" if kind == "gru" else ""))
    if example is not None:
        try:
            with torch.no_grad():
                call(*example)
        except Exception as exc:  # noqa: BLE001 - a baseline that fails is left out, with the reason
            print(f"flashrnn baseline left out ({kind}, H={H}, {name}): {type(exc).__name__}: {str(exc)[:300]}",
                  file=sys.stderr, flush=True)
            return None
    return call
