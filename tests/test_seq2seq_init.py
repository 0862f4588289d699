"""The seq2seq model's ``init`` option: 'torch' is each torch.nn module's own default,
exactly as before the option existed; 'xavier' (Joey NMT style) gives the stated
statistics (xavier_uniform_ bounds, per gate block for the recurrent weights,
zero biases, N(0, 0.1) embeddings with a zero padding row)."""
import math

import pytest
import torch
from torch import nn

from fastseq.seq2seq.model import PAD_ID, Architecture, ModelConfig, Seq2Seq, xavier_init_
from fastseq.seq2seq.task import Seq2SeqConfig

SIZES = dict(src_vocab_size=40, tgt_vocab_size=50, emb_size=16, enc_hidden_size=24, dec_hidden_size=32,
             attn_size=20, readout_size=28, dropout=0.0)
FLOWS = [("bahdanau", "gru"), ("luong", "gru"), ("bahdanau", "lstm"), ("luong", "lstm")]


def _torch_modules(flow: str, rnn_type: str):
    """The model's modules built from plain torch.nn, in the model's construction order."""
    E, He, H, A, R = (SIZES[k] for k in ("emb_size", "enc_hidden_size", "dec_hidden_size", "attn_size",
                                         "readout_size"))
    D, V = 2 * He, SIZES["tgt_vocab_size"]
    mods = [nn.Embedding(SIZES["src_vocab_size"], E, padding_idx=PAD_ID),
            (nn.GRU if rnn_type == "gru" else nn.LSTM)(E, He, batch_first=True, bidirectional=True),
            nn.Embedding(V, E, padding_idx=PAD_ID), nn.Linear(D, H),
            nn.Linear(H, A, bias=False), nn.Linear(D, A, bias=False), nn.Linear(A, 1, bias=False)]
    if flow == "bahdanau":
        mods += [nn.GRUCell(E + D, H), nn.Linear(H + D + E, R), nn.Linear(R, V)]
    else:
        mods += [nn.GRUCell(E + H, H), nn.Linear(H + D, H), nn.Linear(H, V)]
    return mods


@pytest.mark.parametrize("flow,rnn_type", FLOWS)
def test_torch_init_is_torch_nn_defaults_bit_for_bit(flow, rnn_type):
    """init='torch' (the default) draws the same numbers as the plain torch.nn modules
    built in the same order from the same seed: today's initialisation, unchanged."""
    cfg = dict(SIZES, decoder_flow=flow, rnn_type=rnn_type)
    torch.manual_seed(3)
    model = Seq2Seq(ModelConfig(**cfg, init="torch"))
    torch.manual_seed(3)
    default = Seq2Seq(ModelConfig(**cfg))
    torch.manual_seed(3)
    want = [p for m in _torch_modules(flow, rnn_type) for p in m.parameters()]
    got = list(model.parameters())
    assert [p.shape for p in got] == [p.shape for p in want]
    for (name, a), b, c in zip(model.named_parameters(), want, default.parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(a, c), name


def _bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def _check_uniform(w: torch.Tensor, bound: float, what: str) -> None:
    """All of ``w`` in [-bound, bound]; for enough elements, the max near the bound
    and the standard deviation near bound / sqrt(3) (that of U(-bound, bound))."""
    assert float(w.abs().max()) <= bound, what
    if w.numel() >= 200:
        assert float(w.abs().max()) > 0.9 * bound, what
        assert abs(float(w.std()) / (bound / math.sqrt(3)) - 1) < 0.15, what


@pytest.mark.parametrize("flow,rnn_type", FLOWS)
def test_xavier_init_statistics(flow, rnn_type):
    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(**SIZES, decoder_flow=flow, rnn_type=rnn_type, init="xavier"))
    model.requires_grad_(False)  # plain numbers below
    checked = set()
    for mname, m in model.named_modules():
        if isinstance(m, nn.Linear):
            _check_uniform(m.weight, _bound(m.in_features, m.out_features), mname)
            checked.add(f"{mname}.weight")
        elif isinstance(m, nn.Embedding):
            assert not m.weight[PAD_ID].any(), mname
            rest = m.weight[PAD_ID + 1:]
            assert abs(float(rest.std()) / 0.1 - 1) < 0.1 and abs(float(rest.mean())) < 0.02, mname
            checked.add(f"{mname}.weight")
        elif isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            for pname, p in m.named_parameters(recurse=False):
                if not pname.startswith("weight_"):
                    continue
                H, fan_in = m.hidden_size, p.shape[1]
                gates = 3 if isinstance(m, (nn.GRU, nn.GRUCell)) else 4
                assert p.shape[0] == gates * H
                for g, block in enumerate(p.chunk(gates)):
                    _check_uniform(block, _bound(fan_in, H), f"{mname}.{pname} gate {g}")
                # per gate block, not over the whole [gates*H, in] matrix (whose bound is smaller)
                assert float(p.abs().max()) > _bound(fan_in, gates * H), f"{mname}.{pname}"
                checked.add(f"{mname}.{pname}")
    biases = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("bias")]
    assert biases and all(not dict(model.named_parameters())[n].any() for n in biases)
    assert checked | set(biases) == {n for n, _ in model.named_parameters()}  # every parameter covered


def test_xavier_differs_from_torch_and_still_trains_a_step():
    torch.manual_seed(0)
    a = Seq2Seq(ModelConfig(**SIZES))
    torch.manual_seed(0)
    b = Seq2Seq(ModelConfig(**SIZES, init="xavier"))
    assert not torch.equal(a.decoder.output.bias, b.decoder.output.bias)
    src = torch.randint(4, 40, (3, 5))
    logits = b(src, torch.tensor([5, 4, 2]), torch.randint(4, 50, (3, 4)))
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in b.parameters())
    # the function alone, on any module
    lin = nn.Linear(30, 10)
    xavier_init_(lin)
    assert not lin.bias.any() and float(lin.weight.detach().abs().max()) <= _bound(30, 10)


def test_bad_init_is_rejected_and_init_round_trips():
    with pytest.raises(ValueError, match=r"^init: expected 'torch' or 'xavier', got 'kaiming'"):
        Architecture(init="kaiming")
    with pytest.raises(ValueError, match=r"config key 'model.init': expected 'torch' or 'xavier'"):
        Seq2SeqConfig.from_dict({"model": {"init": "normal"}})
    assert Architecture().init == "torch"
    cfg = Seq2SeqConfig.from_dict({"model": {"init": "xavier", "decoder_flow": "luong"}})
    assert Seq2SeqConfig.from_dict(cfg.to_dict()).model == cfg.model
    mc = ModelConfig.of(cfg.model, 10, 11)
    assert ModelConfig(**mc.to_dict()) == mc and mc.init == "xavier"
    old = {k: v for k, v in mc.to_dict().items() if k not in ("init", "decoder_flow")}  # an older checkpoint
    assert (ModelConfig(**old).init, ModelConfig(**old).decoder_flow) == ("torch", "bahdanau")
