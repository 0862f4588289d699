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


class ToolkitNMT(torch.nn.Module):
    """How recurrent NMT toolkits call the modules: a bidirectional GRU encoder over a
    PackedSequence of unsorted lengths, and a decoder that calls a GRU once per target
    step with a length-1 input (attention and input feeding in between)."""

    def __init__(self, vocab=17, emb=8, hidden=6):
        super().__init__()
        self.src_emb = torch.nn.Embedding(vocab, emb)
        self.tgt_emb = torch.nn.Embedding(vocab, emb)
        self.encoder = torch.nn.GRU(emb, hidden, batch_first=True, bidirectional=True)
        self.bridge = torch.nn.Linear(2 * hidden, hidden)
        self.decoder = torch.nn.GRU(emb + hidden, hidden, batch_first=True)
        self.attn = torch.nn.Linear(hidden, 2 * hidden, bias=False)
        self.att_out = torch.nn.Linear(3 * hidden, hidden)
        self.out = torch.nn.Linear(hidden, vocab)

    def forward(self, src, src_lengths, tgt_in):
        packed = torch.nn.utils.rnn.pack_padded_sequence(self.src_emb(src), src_lengths, batch_first=True,
                                                         enforce_sorted=False)
        enc, h = self.encoder(packed)
        enc, _ = torch.nn.utils.rnn.pad_packed_sequence(enc, batch_first=True, total_length=src.shape[1])
        mask = torch.arange(src.shape[1])[None, :] < src_lengths[:, None]
        s = torch.tanh(self.bridge(torch.cat([h[0], h[1]], -1))).unsqueeze(0)
        feed = torch.zeros(src.shape[0], s.shape[-1], dtype=enc.dtype)
        logits = []
        for t in range(tgt_in.shape[1]):
            step_in = torch.cat([self.tgt_emb(tgt_in[:, t]), feed], -1).unsqueeze(1)
            y, s = self.decoder(step_in, s)  # T = 1
            scores = torch.bmm(enc, self.attn(y).transpose(1, 2)).squeeze(2).masked_fill(~mask, float("-inf"))
            ctx = torch.bmm(scores.softmax(-1).unsqueeze(1), enc).squeeze(1)
            feed = torch.tanh(self.att_out(torch.cat([y.squeeze(1), ctx], -1)))
            logits.append(self.out(feed))
        return torch.stack(logits, 1)


def _train(model, batches, steps):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for src, lens, tgt in batches[:steps]:
        logits = model(src, lens, tgt[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1),
                                                 ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_patched_model_trains_like_unpatched(backend):
    """Same seed, same batches: a toolkit-style model patched with fastseq.patch gives
    the losses of the unpatched model at every one of several training updates
    (packed bidirectional encoder, one decoder GRU call per target step)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(0)
    plain = ToolkitNMT().to(dtype)
    patched = ToolkitNMT().to(dtype)
    patched.load_state_dict(plain.state_dict())
    fastseq.patch(patched)
    assert type(patched.encoder) is fnn.GRU and type(patched.decoder) is fnn.GRU
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(6):
        B, S, T = 5, 7, 6
        lens = torch.randint(2, S + 1, (B,), generator=g)
        src = torch.randint(1, 17, (B, S), generator=g) * (torch.arange(S)[None, :] < lens[:, None])
        batches.append((src, lens, torch.randint(1, 17, (B, T), generator=g)))
    want = _train(plain, batches, 6)
    with fastseq.backend(backend):
        got = _train(patched, batches, 6)
    assert bool(want[-1] < want[0])  # the updates do something
    assert_close(got, want, dtype, "losses over 6 updates")
    for (n, p), q in zip(patched.named_parameters(), plain.parameters()):
        assert_close(p, q, dtype, f"{n} after 6 updates")
