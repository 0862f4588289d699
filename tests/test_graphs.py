"""fastseq.backend.graphs.StepGraph off the GPU: it calls the step directly (no
capture), whatever the setting; the GPU behaviour (capture, replay, same tokens as
direct launches) is tested in tests/test_gpu.py."""
import torch

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
