"""fastseq.backend.graphs off the GPU: StepGraph calls the step directly (no capture),
whatever the setting; GraphCache's signatures, capture counts, eviction, output clones
and capture-failure fallback, with a stand-in for the CUDA graph. The GPU behaviour
(capture, replay, same results as direct launches) is tested in tests/test_gpu.py."""
import pytest
import torch

from conftest import FakeCudaGraph
from fastseq.backend import graphs


def test_step_graph_runs_the_step_directly_on_cpu(monkeypatch):
    calls = []

    def step(prev, state):
        calls.append(1)
        return state * 2 + prev.unsqueeze(1), state + 1

    monkeypatch.setenv("FASTSEQ_CUDA_GRAPHS", "1")
    g = graphs.StepGraph(step)
    assert g.enabled
    prev, state = torch.arange(3.0), torch.ones(3, 2)
    for _ in range(3):
        out, state = g(prev, state)
    assert len(calls) == 3 and g.graph is None and g.replays == 0 and g.failed is None
    assert torch.equal(state, torch.full((3, 2), 4.0))
    assert torch.equal(out, torch.full((3, 2), 6.0) + torch.arange(3.0).unsqueeze(1))


def test_step_graph_is_off_by_default(monkeypatch):
    monkeypatch.delenv("FASTSEQ_CUDA_GRAPHS", raising=False)
    assert not graphs.StepGraph(lambda x: x).enabled
    assert graphs.StepGraph(lambda x: x, enabled=True).enabled


# GraphCache: the cache logic off the GPU, with conftest.FakeCudaGraph standing in for the
# CUDA graph.

class _CpuGraphCache(graphs.GraphCache):
    def _graphable(self, first):
        return True

    def _new_graph(self, static):
        g = FakeCudaGraph(self.fn, static)
        return g, g.outputs


def _loop(x, w, flag):
    """A stand-in for a decoder loop: tensors, None/bool arguments, a tuple of outputs."""
    y = x @ w
    return (y * 2 if flag else y, y.sum(0))


def test_graph_cache_captures_repeated_shapes_and_replays_them():
    calls = []

    def fn(*a):
        calls.append(1)
        return _loop(*a)

    cache = _CpuGraphCache(fn, "loop", max_graphs=2, min_calls=2, enabled=True)
    w = torch.randn(3, 4)
    for i in range(4):
        x = torch.randn(5, 3)
        got = cache(x, w, True)
        want = _loop(x, w, True)
        assert all(torch.equal(g, e) for g, e in zip(got, want)), f"call {i}"
    # call 1 direct, call 2 captures (one run) and replays, calls 3-4 replay
    assert cache.captures == 1 and cache.replays == 3 and len(cache) == 1
    assert len(calls) == 1 + 1 + 3
    # outputs are clones: changing one does not change the next call's
    out = cache(x, w, True)
    out[0].zero_()
    assert torch.equal(cache(x, w, True)[0], _loop(x, w, True)[0])
    # a plain argument and a shape are part of the signature
    for x2, flag in ((x, False), (torch.randn(6, 3), True)):
        cache(x2, w, flag)
        assert torch.equal(cache(x2, w, flag)[0], _loop(x2, w, flag)[0])
    assert cache.captures == 3 and len(cache) == 2 and cache.evictions == 1  # at most max_graphs kept


def test_graph_cache_capture_failure_falls_back_once(recwarn):
    from fastseq.backend import warn

    class Failing(_CpuGraphCache):
        attempts = 0

        def _new_graph(self, static):
            Failing.attempts += 1
            raise RuntimeError("operation not permitted when stream is capturing")

    warn.forget_warnings()
    cache = Failing(_loop, "loop", min_calls=1, enabled=True)
    x, w = torch.randn(5, 3), torch.randn(3, 4)
    for _ in range(3):
        assert torch.equal(cache(x, w, True)[0], _loop(x, w, True)[0])
    assert Failing.attempts == 1 and len(cache) == 0 and cache.replays == 0
    msgs = [str(r.message) for r in recwarn if "CUDA graph capture of loop failed" in str(r.message)]
    assert len(msgs) == 1 and "not permitted" in msgs[0]


def test_graph_cache_off_the_gpu_or_disabled_calls_directly(monkeypatch):
    monkeypatch.setenv("FASTSEQ_CUDA_GRAPHS", "1")
    real = graphs.GraphCache(_loop, "loop", min_calls=1)
    assert real.enabled
    x, w = torch.randn(5, 3), torch.randn(3, 4)
    assert torch.equal(real(x, w, True)[0], _loop(x, w, True)[0]) and real.captures == 0  # CPU tensors
    off = _CpuGraphCache(_loop, "loop", min_calls=1, enabled=False)
    off(x, w, True)
    assert off.captures == 0
    monkeypatch.delenv("FASTSEQ_CUDA_GRAPHS")
    assert not graphs.GraphCache(_loop, "loop").enabled
    with pytest.raises(ValueError, match="max_graphs and min_calls"):
        graphs.GraphCache(_loop, "loop", max_graphs=0)


def test_graph_caches_switches_every_cache_for_a_block():
    """graph_caches(True/False) overrides each cache's own setting inside the block, nests,
    and restores the outer setting (here: none) on exit."""
    x, w = torch.randn(5, 3), torch.randn(3, 4)
    off = _CpuGraphCache(_loop, "off", min_calls=1, enabled=False)
    on = _CpuGraphCache(_loop, "on", min_calls=1, enabled=True)
    with graphs.graph_caches(True):
        off(x, w, True)
        with graphs.graph_caches(False):
            on(x, w, True)
            assert on.captures == 0
        on(x, w, True)
    assert off.captures == 1 and on.captures == 1
    off(torch.randn(6, 3), w, True)  # outside: its own setting again (off)
    assert off.captures == 1


def test_graph_cache_size_defaults_to_32_or_the_environment(monkeypatch):
    """GraphCache keeps DEFAULT_MAX_GRAPHS (32) graphs unless FASTSEQ_CUDA_GRAPHS_MAX says
    otherwise (read when the cache is made); a value that is not a positive integer raises
    naming the variable."""
    monkeypatch.delenv("FASTSEQ_CUDA_GRAPHS_MAX", raising=False)
    assert graphs.GraphCache(_loop, "loop").max_graphs == graphs.DEFAULT_MAX_GRAPHS == 32
    monkeypatch.setenv("FASTSEQ_CUDA_GRAPHS_MAX", "5")
    assert graphs.GraphCache(_loop, "loop").max_graphs == 5
    assert graphs.GraphCache(_loop, "loop", max_graphs=3).max_graphs == 3
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv("FASTSEQ_CUDA_GRAPHS_MAX", bad)
        with pytest.raises(ValueError, match="FASTSEQ_CUDA_GRAPHS_MAX"):
            graphs.GraphCache(_loop, "loop")


@pytest.mark.parametrize("max_graphs,min_calls", [(2, 2), (3, 1), (1, 3)])
def test_replay_simulation_is_the_graph_caches_policy(max_graphs, min_calls):
    """bench/graph_replay.py's replay_counts (the NOTES' replay rates of the main job's batch
    shapes) counts what GraphCache does on the same sequence of signatures: replays, captures,
    evictions."""
    from conftest import checkout_bench

    checkout_bench()
    from fastseq.bench.graph_replay import replay_counts

    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(1, 6, (60,), generator=gen).tolist()  # 5 shapes, revisited in a random order
    cache = _CpuGraphCache(_loop, "loop", max_graphs=max_graphs, min_calls=min_calls, enabled=True)
    w = torch.randn(3, 2)
    for r in rows:
        cache(torch.randn(r, 3), w, True)
    got = replay_counts(rows, max_graphs, min_calls)
    assert got == {"calls": 60, "replays": cache.replays, "captures": cache.captures, "evictions": cache.evictions}
    assert got["replays"] > 0 and got["evictions"] > 0  # min_calls = 1: every call replays
    with pytest.raises(ValueError, match="max_graphs"):
        replay_counts(rows, 0)
