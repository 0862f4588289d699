"""Host (Python) time per launch of fastseq's Triton kernels.

Run by the ``host`` suite (:mod:`fastseq.bench.suites.host`) as a script, in a
subprocess started with :func:`stubdriver.subprocess_env` (the stand-in
``libcuda.so.1`` first on ``LD_LIBRARY_PATH``, ``TRITON_INTERPRET`` unset)::

    python bench/host_probe.py '{"B": 64, "H": 512, "T": 128, "dtypes": ["float32"], "rounds": 15}'

It prints one JSON object on its last line: ``{"triton", "torch", "launcher",
"device", "cases": [{"case", "impl", "dtype", "launches", "us": [microseconds per
launch, one per round], "note"}]}``.

What a launch costs there is the whole host path of one step: fastseq's loop and
slicing, the ``counted`` wrapper, Triton's heuristics and binder, the cache
lookup, the launcher's argument unpacking, each tensor's ``data_ptr()`` and
pointer check; not the driver's ``cuLaunchKernelEx`` (a few microseconds on a
GPU). The tensors are CPU tensors, so allocations are the CPU allocator's, not
CUDA's caching allocator.

On a GPU the suite also calls :func:`measure` with ``device="cuda"`` in its own
process: the same calls on CUDA tensors through the real driver, timed on the
host with the GPU's queue drained before each call (enqueue time, the launch
included).

In both, the backward's weight-gradient product (one matrix product after the
step loop) is left out: it is no launch overhead, and on the CPU it would dominate.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

if __package__:
    from . import stubdriver
else:  # run as a script (the host suite does): bench/ is sys.path[0]
    import stubdriver

OPS = ("gru-fwd", "gru-bwd", "lstm-fwd", "lstm-bwd", "attention-fwd", "cell-fwd", "decode", "bare")
#: Sizes of the ``decode`` case, its own and small: the step's matrix products and the
#: backward's reductions run on the CPU here, so only small sizes leave the host path.
DECODE_SIZES = dict(B=2, T=32, H=16, S=4, A=16, D=16)


def _timer(fn: Callable[[], object], rounds: int, launches_per_call: int,
           sync: Optional[Callable[[], None]]) -> List[float]:
    """Microseconds per launch of ``fn`` (one call per round), after two warm-up calls.
    ``sync`` runs before and after each timed call, outside the timed window."""
    fn()
    fn()
    out = []
    for _ in range(rounds):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6 / launches_per_call)
    if sync:
        sync()
    return out


def main(cfg: dict) -> dict:
    """Activate the stub driver and measure on CPU tensors."""
    stubdriver.activate(cfg.get("arch", 90))
    return measure(cfg, "cpu")


def measure(cfg: dict, device: str) -> dict:
    """Time the cases of ``cfg`` on ``device``: ``cpu`` under the stub driver (:func:`main`)
    or ``cuda`` with the real driver.

    ``cfg``: ``B``, ``H``, ``T`` (recurrence sizes; the attention uses ``S`` (32), ``A``
    (H), ``D`` (2H)), ``dtypes`` (names), ``rounds``, ``calls`` (calls per round of
    the one-launch ops, 32), ``ops`` (a subset of :data:`OPS`), ``prebound`` (also
    time the GRU step kernel through Triton's full launch path at every step, True).
    """
    import torch

    from fastseq.ops.recurrence import triton as rnn

    # The weight-gradient product after the backward's step loop is not a launch.
    weight_grads = rnn.weight_grads
    rnn.weight_grads = lambda dg, h0, hs, w_hh, has_bias: (w_hh, w_hh.new_empty((0,)))
    try:
        cases = _Cases(cfg, device).run()
    finally:
        rnn.weight_grads = weight_grads
    import triton

    launcher = ("Triton's CudaDriver and C launcher on a stand-in libcuda.so.1 (cuLaunchKernelEx a no-op)"
                if device == "cpu" else "the CUDA driver")
    return {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "launcher": launcher, "device": device, "pid": os.getpid(), "cases": cases}


class _Cases:
    def __init__(self, cfg: dict, device: str):
        import torch

        self.torch = torch
        self.cfg, self.device = cfg, device
        self.stub = device == "cpu"
        self.sync = None if self.stub else torch.cuda.synchronize
        self.how = "stub driver" if self.stub else "CUDA driver, GPU queue drained before each timed call"
        self.rounds = cfg["rounds"]
        self.calls = cfg.get("calls", 32)
        self.ops = set(cfg.get("ops", OPS))
        self.out: List[Dict] = []

    def case(self, name: str, impl: str, dtype, fn: Callable[[], object], what: str,
             per_call: Optional[int] = None) -> None:
        """Time ``fn``; launches per call: fastseq's launch counter (or ``per_call``),
        checked against the stub driver's count."""
        from fastseq.ops import launches

        with launches.count() as n:
            before = stubdriver.launches() if self.stub else 0
            fn()
            reached = stubdriver.launches() - before if self.stub else None
        count = sum(n.values()) if per_call is None else per_call
        if self.stub and reached != count:
            raise RuntimeError(f"{name}: {count} launches expected but {reached} reached the driver")
        us = _timer(fn, self.rounds, count, self.sync)
        self.out.append({"case": name, "impl": impl, "dtype": str(dtype).replace("torch.", ""), "launches": count,
                         "us": us, "note": f"host time per launch, {self.how}: {what}"})
        print(f"[host] {name} {self.out[-1]['dtype']} {impl}: median {statistics.median(us):.2f} us/launch "
              f"({count} launches per call, {self.how})", file=sys.stderr, flush=True)

    def loop(self, f: Callable[[], object], k: int) -> Callable[[], None]:
        def run():
            for _ in range(k):
                f()
        return run

    def run(self) -> List[Dict]:
        for dname in self.cfg["dtypes"]:
            self.dtype_cases(getattr(self.torch, dname))
            if "decode" in self.ops and dname == "float32":
                self.decode(getattr(self.torch, dname))
        if "bare" in self.ops:
            self.bare()
        return self.out

    def dtype_cases(self, dt) -> None:
        torch = self.torch
        from fastseq.ops.attention import triton as attn
        from fastseq.ops.decoder_step import triton as cell
        from fastseq.ops.recurrence import triton as rnn

        cfg, ops, dev = self.cfg, self.ops, self.device
        B, H, T = cfg["B"], cfg["H"], cfg["T"]
        g = torch.Generator().manual_seed(1)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dt)

        size = f"B{B}-H{H}-T{T}"
        for kind, G in (("gru", 3), ("lstm", 4)):
            if f"{kind}-fwd" not in ops and f"{kind}-bwd" not in ops:
                continue
            gi, h0, c0 = rnd(T, B, G * H), rnd(B, H), rnd(B, H)
            w, b = rnd(G * H, H, scale=H ** -0.5), rnd(G * H)
            if kind == "gru":
                def fwd():
                    return rnn.gru_recurrence_forward(gi, h0, w, b, None, True)
            else:
                def fwd():
                    return rnn.lstm_recurrence_forward(gi, h0, c0, w, b, None, True)
            if f"{kind}-fwd" in ops:
                self.case(f"host-{kind}-fwd-{size}", "fastseq-triton", dt, fwd,
                          "one forward call (T step launches, gates saved) / T")
            if f"{kind}-bwd" in ops:
                saved = fwd()
                grad = rnd(T, B, H)
                if kind == "gru":
                    hs, gates = saved

                    def bwd():
                        return rnn.gru_recurrence_backward(grad, h0, w, hs, gates, None, True)
                else:
                    hs, cs, gates = saved

                    def bwd():
                        return rnn.lstm_recurrence_backward(grad, None, h0, c0, w, hs, cs, gates, None, True)
                self.case(f"host-{kind}-bwd-{size}", "fastseq-triton", dt, bwd,
                          "one backward call (T step launches + 1 final) / (T + 1); the weight-gradient "
                          "product after the loop left out")
            if kind == "gru" and "gru-fwd" in ops and cfg.get("prebound", True):
                self.prebound(rnn, gi, h0, w, b, B, H, T, dt, size)

        if "attention-fwd" in ops:
            S, A, D = cfg.get("S", 32), cfg.get("A", H), cfg.get("D", 2 * H)
            q, K, V = rnd(B, 1, A), rnd(B, S, A), rnd(B, S, D)
            e = rnd(A, scale=A ** -0.5)
            mask = torch.ones(B, S, dtype=torch.bool)
            mask[1:, S // 2:] = False
            mask = mask.to(dev)
            self.case(f"host-attention-fwd-B{B}-S{S}-A{A}-D{D}-T1", "fastseq-triton", dt,
                      self.loop(lambda: attn.additive_attention_forward(q, K, V, e, mask), self.calls),
                      f"one decoder-step attention call (one query, a mask) = 1 launch; {self.calls} calls "
                      "per round", per_call=self.calls)

        if "cell-fwd" in ops:
            D = cfg.get("D", 2 * H)
            gi, ctx, w_ic = rnd(B, 3 * H), rnd(B, D), rnd(3 * H, D, scale=D ** -0.5)
            gh, bh, h = rnd(B, 3 * H), rnd(3 * H), rnd(B, H)
            self.case(f"host-cell-fwd-B{B}-H{H}-D{D}", "fastseq-triton", dt,
                      self.loop(lambda: cell.gru_context_cell_forward(gi, ctx, w_ic, gh, bh, h, False), self.calls),
                      f"one decoder-cell forward call (no gates saved) = 1 launch; {self.calls} calls per round",
                      per_call=self.calls)

    def decode(self, dt) -> None:
        """The teacher-forced decoder on the Triton kernels: T calls of ``attention_gru_step``
        (impl ``step-loop``) vs one ``attention_gru_decode`` (impl ``decode-op``), forward
        (inputs requiring grad) and backward; figures per decoder step (2 Triton launches
        and one matrix product forward, 2 launches backward), sizes :data:`DECODE_SIZES`
        (``cfg["decode"]``). On CPU tensors the ops' backend selection is pointed at Triton
        (it only picks Triton there under the interpreter); the matrix products and the
        backward's torch reductions run on the CPU, so part of each figure is arithmetic."""
        torch = self.torch
        import fastseq
        from fastseq import ops
        from fastseq.backend import selection
        from fastseq.ops import StepWeights

        c = dict(DECODE_SIZES, **self.cfg.get("decode", {}))
        B, T, H, S, A, D = (c[k] for k in ("B", "T", "H", "S", "A", "D"))
        if self.stub:
            selection._SELECTED[("triton", "cpu", dt, False)] = "triton"
            torch.set_flush_denormal(True)  # the kernels write nothing: outputs hold whatever memory held
        g = torch.Generator().manual_seed(2)

        def leaf(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(self.device, dt).requires_grad_(True)

        gi, h0, keys, values = leaf(B, T, 3 * H), leaf(B, H), leaf(B, S, A), leaf(B, S, D)
        sw = StepWeights(leaf(A + 3 * H, H, scale=H ** -0.5), leaf(3 * H), leaf(A, scale=A ** -0.5),
                         leaf(3 * H, D, scale=D ** -0.5))
        mask = (torch.arange(S)[None, :] < torch.tensor([max(1, S - b) for b in range(B)])[:, None]).to(self.device)
        leaves = [gi, h0, keys, values, *sw]
        gs, gc = torch.randn(B, T, H).to(self.device, dt), torch.randn(B, T, D).to(self.device, dt)

        def loop():
            h, st, cs = h0, [], []
            for gi_t in gi.unbind(1):
                h, ctx, _ = ops.attention_gru_step(gi_t, h, keys, values, sw, mask)
                st.append(h)
                cs.append(ctx)
            return torch.stack(st, 1), torch.stack(cs, 1)

        def one_op():
            s, ctx, _ = ops.attention_gru_decode(gi, h0, keys, values, sw, mask)
            return s, ctx

        size = f"B{B}-T{T}-H{H}-S{S}-A{A}-D{D}"
        from fastseq.ops import launches

        with fastseq.backend("triton"):
            for impl, f in (("step-loop", loop), ("decode-op", one_op)):
                def fwd():
                    return f()

                def bwd_timed():
                    s, ctx = f()
                    if self.sync:
                        self.sync()
                    t0 = time.perf_counter()
                    torch.autograd.grad([s, ctx], leaves, [gs, gc])
                    if self.sync:
                        self.sync()
                    return time.perf_counter() - t0

                with launches.count() as n:
                    before = stubdriver.launches() if self.stub else 0
                    s, ctx = fwd()
                    torch.autograd.grad([s, ctx], leaves, [gs, gc])
                    reached = stubdriver.launches() - before if self.stub else None
                count = sum(n.values())
                if count != 4 * T or (self.stub and reached != count):
                    raise RuntimeError(f"decode {impl}: {4 * T} launches expected, counted {count}, "
                                       f"reached the driver {reached}")
                us = _timer(fwd, self.rounds, T, self.sync)
                self.out.append({"case": f"host-decode-fwd-{size}", "impl": f"fastseq-triton-{impl}",
                                 "dtype": str(dt).replace("torch.", ""), "launches": 2 * T, "us": us,
                                 "note": f"host time per decoder step, {self.how}: one teacher-forced forward "
                                         "(inputs require grad; 2 launches + 1 matrix product per step) / T"})
                bwd_timed()
                us = [bwd_timed() * 1e6 / T for _ in range(self.rounds)]
                self.out.append({"case": f"host-decode-bwd-{size}", "impl": f"fastseq-triton-{impl}",
                                 "dtype": str(dt).replace("torch.", ""), "launches": 2 * T, "us": us,
                                 "note": f"host time per decoder step, {self.how}: the backward of the "
                                         "teacher-forced decoder (2 launches + torch ops per step) / T"})
                for rec in self.out[-2:]:
                    print(f"[host] {rec['case']} {impl}: median {statistics.median(rec['us']):.2f} us/step",
                          file=sys.stderr, flush=True)

    def prebound(self, rnn, gi, h0, w, b, B, H, T, dt, size) -> None:
        """The GRU forward's T launches each through Triton's whole launch path (``kernel[grid](...)``:
        binder, specialisation, cache lookup), arguments prepared beforehand: what every step cost
        before the step loops were bound once (:func:`fastseq.ops.triton_utils.launch_steps`)."""
        torch = self.torch
        kern = rnn._gru_fwd_step_kernel.kernel
        grid, kw = rnn._launch_args(B, H)
        hs = torch.empty(T, B, H, dtype=dt, device=self.device)
        gates = torch.empty(T, B, 4 * H, dtype=dt, device=self.device)
        state = torch.zeros(2, B, H, dtype=torch.float32, device=self.device)
        launch = kern[grid]
        flags = dict(HAS_BIAS=True, HAS_LENGTHS=False, SAVE_GATES=True, PACKED=False, **kw)

        def run():
            for t in range(T):
                launch(gi, state, h0, w, b, None, hs, gates, None, t, B, H, T, T * B, 3 * H, H, **flags)
        self.case(f"host-gru-fwd-{size}", "triton-jit-path", dt, run,
                  "the GRU step kernel launched through Triton's full launch path at every step, arguments "
                  "prepared beforehand (the per-step cost before the step loops were bound once)", per_call=T)

    def bare(self) -> None:
        import triton
        import triton.language as tl

        @triton.jit
        def _bare(x_ptr, n, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK)
            tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1.0, mask=o < n)

        x = self.torch.zeros(1024, device=self.device)
        k = 4 * self.calls
        self.case("host-bare-3arg", "bare-triton-launch", self.torch.float32,
                  self.loop(lambda: _bare[(1,)](x, 1024, BLOCK=1024), k),
                  f"a 3-argument kernel (pointer, int, constexpr); {k} launches per round", per_call=k)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
