"""torch.compile(fullgraph=True) traces modules built on fastseq's custom ops
(fake implementations + registered autograd) and agrees with eager.

Tracing a subclass of torch.nn.GRU/LSTM needs Dynamo's ``allow_rnn`` flag, which
fastseq leaves alone on import (tests/test_dropin.py); these tests opt in the way
the README says, scoped to the compiled call."""
import pytest
import torch
from parity import assert_close

import fastseq.nn as fnn
from conftest import DEVICE


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = fnn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.cell = fnn.GRUCell(12, 5)
        self.out = torch.nn.Linear(5, 3)

    def forward(self, x):
        y, (h, c) = self.enc(x)
        s = self.cell(y[:, -1])
        s = self.cell(y[:, 0], s)
        return self.out(s)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(compile_backend):
    model = Tiny().to(DEVICE)
    x = torch.randn(3, 5, 4, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    eager_out = model(x)
    with torch._dynamo.config.patch(allow_rnn=True):
        comp_out = compiled(x)
    assert_close(comp_out, eager_out)
    g = torch.randn_like(eager_out)
    params = list(model.parameters())
    want = torch.autograd.grad(eager_out, params, g)
    got = torch.autograd.grad(comp_out, params, g)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_compile_without_the_flag_runs_the_rnn_eagerly():
    """Without the opt-in, torch.compile (not fullgraph) still runs the model: the
    fastseq RNN runs eagerly at a graph break; with fullgraph it is refused."""
    torch._dynamo.reset()
    model = Tiny().to(DEVICE)
    x = torch.randn(3, 5, 4, device=DEVICE)
    assert torch._dynamo.config.allow_rnn is False
    assert_close(torch.compile(model, backend="aot_eager")(x), model(x))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="allow_rnn"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(x)


def test_custom_op_opcheck():
    """torch.library.opcheck: schema, fake impl and autograd registration are consistent."""
    from fastseq.ops import recurrence as rnn

    T, B, H = 3, 2, 4
    gi = torch.randn(T, B, 3 * H, requires_grad=True)
    args = (gi, torch.randn(B, H), torch.randn(3 * H, H, requires_grad=True), torch.randn(3 * H), None, True)
    torch.library.opcheck(rnn.gru_recurrence, args)
    gi4 = torch.randn(T, B, 4 * H, requires_grad=True)
    lens = torch.tensor([3, 1])
    args = (gi4, torch.randn(B, H), torch.randn(B, H), torch.randn(4 * H, H, requires_grad=True), None, lens, True)
    torch.library.opcheck(rnn.lstm_recurrence, args)


def test_attention_and_cell_opcheck():
    from fastseq.ops import attention
    from fastseq.ops import decoder_step as decoder

    B, T, S, A, D, H = 2, 3, 5, 4, 3, 4
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    args = (torch.randn(B, T, A, requires_grad=True), torch.randn(B, S, A, requires_grad=True),
            torch.randn(B, S, D, requires_grad=True), torch.randn(A, requires_grad=True), mask, None)
    torch.library.opcheck(attention.additive_attention_op, args)
    args = (torch.randn(B, 3 * H, requires_grad=True), torch.randn(B, D, requires_grad=True),
            torch.randn(3 * H, D, requires_grad=True), torch.randn(B, 3 * H, requires_grad=True),
            torch.randn(3 * H, requires_grad=True), torch.randn(B, H, requires_grad=True), True)
    torch.library.opcheck(decoder.gru_context_cell_op, args)


def test_decoder_compiles_fullgraph():
    """The teacher-forced attention decoder (fused step ops) under torch.compile(fullgraph=True)."""
    from fastseq.seq2seq.model import ModelConfig, Seq2Seq

    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(src_vocab_size=20, tgt_vocab_size=15, emb_size=6, enc_hidden_size=5,
                                dec_hidden_size=7, attn_size=4, readout_size=5, dropout=0.0)).to(DEVICE)
    src = torch.randint(4, 20, (3, 6), device=DEVICE)
    lens = torch.tensor([6, 2, 4])
    tgt = torch.randint(4, 15, (3, 4), device=DEVICE)
    memory = model.encode(src, lens)
    compiled = torch.compile(model.decoder, fullgraph=True, backend="aot_eager")
    want, got = model.decoder(tgt, memory), compiled(tgt, memory)
    assert_close(got, want)
    params = list(model.decoder.parameters())
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, params, g, retain_graph=True),
                    torch.autograd.grad(want, params, g, retain_graph=True)):
        assert_close(a, b)
