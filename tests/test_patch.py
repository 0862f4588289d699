"""fastseq.patch swaps torch.nn recurrent modules in place, keeping parameters."""
import warnings

import torch
from parity import assert_close

import fastseq
import fastseq.nn as fnn


class NMTLike(torch.nn.Module):
    """Shaped like the recurrent encoders/decoders of the common NMT toolkits."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.encoder = torch.nn.GRU(8, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.bridge = torch.nn.Linear(12, 6)
        self.layers = torch.nn.ModuleList([torch.nn.LSTMCell(8, 6), torch.nn.GRUCell(6, 6)])
        self.proj = torch.nn.LSTM(4, 6, proj_size=3)

    def forward(self, src):
        y, h = self.encoder(self.emb(src))
        s = torch.tanh(self.bridge(torch.cat([h[-2], h[-1]], -1)))
        c = torch.zeros_like(s)
        outs = []
        for t in range(src.shape[1]):
            s2, c = self.layers[0](self.emb(src[:, t]), (s, c))
            s = self.layers[1](s2, s)
            outs.append(s)
        return torch.stack(outs, 1).sum() + y.sum()


def test_patch_keeps_parameters_and_results():
    torch.manual_seed(0)
    model = NMTLike()
    src = torch.randint(0, 20, (3, 5))
    ids = {n: id(p) for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    want = model(src)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fastseq.patch(model) is model
    assert any("proj_size" in str(w.message) for w in caught)
    assert type(model.encoder) is fnn.GRU
    assert type(model.layers[0]) is fnn.LSTMCell and type(model.layers[1]) is fnn.GRUCell
    assert type(model.proj) is torch.nn.LSTM  # projected LSTM left alone
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    assert list(model.state_dict()) == keys
    got = model(src)
    got.backward()
    assert_close(got, want)
    for n, g in want_grads.items():
        assert_close(dict(model.named_parameters())[n].grad, g)


def test_patch_a_bare_module():
    m = torch.nn.LSTM(3, 4)
    fastseq.patch(m)
    assert type(m) is fnn.LSTM


def test_patch_rejects_a_non_module():
    import pytest

    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got dict"):
        fastseq.patch({"encoder": torch.nn.GRU(3, 4)})
