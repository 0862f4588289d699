"""The Luong decoder flow (``decoder_flow: luong``, input feeding, additive scores):
the model against the eager torch.nn reference (logits and every gradient), the
three search functions against the eager model, the option's validation, its
round trip through configs and checkpoints, and a toy task it learns."""
import pytest
import torch
from parity import assert_close, ieee_fp32

from conftest import DEVICE, require
import fastseq
from fastseq.seq2seq.eager import EagerLuongDecoder, EagerSeq2Seq
from fastseq.seq2seq.model import Architecture, Decoder, LuongDecoder, ModelConfig, Seq2Seq, masked_cross_entropy
from fastseq.seq2seq.search import beam_search, greedy_search, sample
from fastseq.seq2seq.task import Seq2SeqConfig
from fastseq.training.checkpoint import load_checkpoint, save_checkpoint

BOS, EOS = 2, 3
CFG = dict(src_vocab_size=30, tgt_vocab_size=25, emb_size=8, enc_hidden_size=10, dec_hidden_size=12,
           attn_size=9, readout_size=7, dropout=0.0, decoder_flow="luong")


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Seq2Seq(ModelConfig(**CFG)).to(DEVICE, dtype)
    src = torch.randint(4, 30, (4, 11))
    lens = torch.tensor([11, 1, 6, 8])
    for i, n in enumerate(lens.tolist()):
        src[i, n:] = 0
    tgt = torch.randint(4, 25, (4, 6))
    return model, src.to(DEVICE), lens, tgt.to(DEVICE)


def test_decoder_flow_picks_the_decoder():
    model, *_ = _model()
    assert type(model.decoder) is LuongDecoder
    assert not hasattr(model.decoder, "readout")
    H, D = CFG["dec_hidden_size"], 2 * CFG["enc_hidden_size"]
    assert model.decoder.cell.weight_ih.shape == (3 * H, CFG["emb_size"] + H)  # [E y; a]
    assert model.decoder.att_vector_layer.weight.shape == (H, H + D)
    assert model.decoder.att_vector_layer.bias is not None
    assert model.decoder.output.weight.shape == (CFG["tgt_vocab_size"], H)
    assert type(Seq2Seq(ModelConfig(**dict(CFG, decoder_flow="bahdanau"))).decoder) is Decoder
    assert type(EagerSeq2Seq(model).decoder) is EagerLuongDecoder


def test_initial_state_is_bridge_and_zero_attention_vector():
    model, src, lens, _ = _model(torch.float64)
    memory = model.encode(src, lens)
    H = CFG["dec_hidden_size"]
    assert memory.init_state.shape == (4, 2 * H)
    _, final = model.encoder(src, lens)
    assert_close(memory.init_state[:, :H], torch.tanh(model.decoder.bridge(final)))
    assert not memory.init_state[:, H:].any()


def _grads(m, model, src, lens, tgt, seed):
    """Logits and the gradients of every model parameter and of the decoder's memory."""
    memory = m.encode(src, lens)
    # Detached leaves; the projected values (Luong: V W_cc^T) are dropped, so that the
    # decoder recomputes them from the leaf ``values`` and its gradient reaches it.
    memory = type(memory)(*(t.detach().requires_grad_(t.is_floating_point()) for t in memory[:4]))
    logits = m.decoder(tgt, memory)
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed)).to(logits)
    dec = list(model.decoder.parameters()) + [memory.values, memory.proj_keys, memory.init_state]
    dec_grads = torch.autograd.grad(logits, dec, g, allow_unused=True)
    full = m(src, lens, tgt)  # the whole model, the encoder included
    all_grads = torch.autograd.grad(full, list(model.parameters()), g, allow_unused=True)
    return logits.detach(), full.detach(), dec_grads, all_grads


@pytest.mark.parametrize("name,dtype", [("reference", torch.float64), ("cpp", torch.float64),
                                        ("reference", torch.float32), ("triton", torch.float32)])
def test_luong_model_matches_eager_torch_nn(name, dtype):
    """The Luong model == the eager torch.nn reference on the same parameters: logits,
    the gradients of every parameter (decoder and encoder) and of the encoder memory."""
    require(name)
    model, src, lens, tgt = _model(dtype)
    with fastseq.backend(name):
        got = _grads(model, model, src, lens, tgt, seed=1)
    with ieee_fp32():
        want = _grads(EagerSeq2Seq(model), model, src, lens, tgt, seed=1)
    assert_close(got[0], want[0], name="decoder logits")
    assert_close(got[1], want[1], name="model logits")
    dec_names = [n for n, _ in model.decoder.named_parameters()] + ["values", "proj_keys", "init_state"]
    all_names = [n for n, _ in model.named_parameters()]
    for pname, a, b in zip(dec_names, got[2], want[2]):
        if b is None:  # the bridge: the memory was detached from it
            assert a is None or not a.any(), pname
            continue
        assert_close(a, b, name=f"decoder grad {pname}")
    for pname, a, b in zip(all_names, got[3], want[3]):
        assert a is not None and b is not None, pname  # every parameter takes part
        assert_close(a, b, name=f"grad {pname}")


def test_luong_step_matches_the_formulas_float64():
    """One step by hand: s_1 = GRU(s_0, [E y; a_0]) with a_0 = 0, attention from s_1,
    a_1 = tanh(W_c [s_1; c_1]), logits = W_o a_1."""
    model, src, lens, tgt = _model(torch.float64)
    dec = model.decoder
    H = dec.hidden_size
    with torch.no_grad(), fastseq.backend("reference"):
        memory = model.encode(src, lens)
        emb, gi = dec.embed_inputs(tgt[:, :1])
        state, context, weights = dec.step(gi[:, 0], memory.init_state, memory)
        s0 = memory.init_state[:, :H]
        s1 = torch.nn.GRUCell.forward(dec.cell, torch.cat([emb[:, 0], torch.zeros_like(s0)], -1), s0)
        c1, w1 = dec.attention(s1, memory.proj_keys, memory.values, mask=memory.mask)
        a1 = torch.tanh(dec.att_vector_layer(torch.cat([s1, c1], -1)))
        assert_close(state, torch.cat([s1, a1], -1))
        assert_close(context, c1)
        assert_close(weights, w1)
        assert_close(dec.logits(state, context, emb[:, 0]), dec.output(a1))
        assert_close(model(src, lens, tgt[:, :1])[:, 0], dec.output(a1))


@pytest.mark.parametrize("name", ["reference", "cpp"])  # the float64 backends (Triton: no float64)
def test_search_matches_eager_float64(name):
    """Greedy, beam (3) and sampling give the eager model's tokens (float64)."""
    require(name)
    with fastseq.backend(name):
        _search_matches_eager()


def _search_matches_eager():
    model, src, lens, _ = _model(torch.float64)
    model.eval()
    with torch.no_grad():
        model.decoder.output.bias[EOS] += 1.0  # let some hypotheses end before max_len
    eager = EagerSeq2Seq(model)
    for search, kw in ((greedy_search, {}), (beam_search, {"beam_size": 3}),
                       (sample, {"top_k": 5}), (sample, {"temperature": 0.7})):
        def run(m):
            extra = {"generator": torch.Generator().manual_seed(7)} if search is sample else {}
            return search(m, src, lens, BOS, EOS, max_len=8, **kw, **extra)
        got = run(model)
        assert got == run(eager), (search.__name__, kw)
        assert any(len(h) < 8 for h in got)  # some ended with eos
    # Beam search with one beam and no length penalty is greedy search.
    assert beam_search(model, src, lens, BOS, EOS, beam_size=1, alpha=0.0, max_len=8) == \
        greedy_search(model, src, lens, BOS, EOS, max_len=8)


def test_beam_search_is_exact_when_the_beam_holds_every_prefix():
    """No eos (every hypothesis runs L steps), alpha=0 and a beam of V^(L-1): beam
    search keeps every prefix, so it must return the argmax of the teacher-forced
    log-probability over all V^L sequences. That holds only if every reorder moves
    the whole state [s; a] with its hypothesis (beam search that reorders s but
    feeds back the unreordered a returns other sequences for seeds 2 and 3 here)."""
    V, L = 6, 3
    seqs = torch.cartesian_prod(*[torch.arange(V)] * L)  # [V^L, L]
    tgt_in = torch.cat([torch.full((len(seqs), 1), BOS), seqs[:, :-1]], 1)
    differs = 0
    for seed in range(4):
        torch.manual_seed(seed)
        cfg = ModelConfig(src_vocab_size=12, tgt_vocab_size=V, emb_size=8, enc_hidden_size=8,
                          dec_hidden_size=8, attn_size=8, dropout=0.0, decoder_flow="luong")
        model = Seq2Seq(cfg).double().eval()
        with torch.no_grad():  # a decoder whose distributions depend on its inputs
            for p in model.decoder.parameters():
                p.normal_(0, 0.5)
            model.decoder.output.bias.zero_()
        src = torch.randint(4, 12, (2, 5))
        lengths = torch.tensor([5, 3])
        src[1, 3:] = 0
        beam = beam_search(model, src, lengths, BOS, -1, beam_size=V ** (L - 1), alpha=0.0, max_len=L)
        greedy = greedy_search(model, src, lengths, BOS, -1, max_len=L)
        with torch.no_grad():
            for row in range(2):
                n = len(seqs)
                logits = model(src[row:row + 1].expand(n, -1), lengths[row:row + 1].expand(n), tgt_in)
                scores = torch.log_softmax(logits, -1).gather(2, seqs[:, :, None]).sum((1, 2))
                assert beam[row] == seqs[scores.argmax()].tolist(), (seed, row, beam[row])
        differs += beam != greedy
    assert differs  # beam search found something greedy search did not


def test_bad_decoder_flow_is_rejected():
    with pytest.raises(ValueError, match=r"^decoder_flow: expected 'bahdanau' or 'luong', got 'luong2'"):
        Architecture(decoder_flow="luong2")
    with pytest.raises(ValueError, match=r"^decoder_flow:"):
        ModelConfig(**dict(CFG, decoder_flow="Luong"))
    with pytest.raises(ValueError, match=r"config key 'model.decoder_flow': expected 'bahdanau' or 'luong'"):
        Seq2SeqConfig.from_dict({"model": {"decoder_flow": "attention"}})


def test_decoder_flow_round_trips_through_configs(tmp_path):
    from fastseq.cli import _train_config, build_parser

    assert Architecture().decoder_flow == "bahdanau"
    conf = tmp_path / "c.yaml"
    conf.write_text("model:\n  emb_size: 64\n  decoder_flow: luong\n")
    cfg = _train_config(build_parser().parse_args(["train", "--config", str(conf)]))
    assert cfg.model == Architecture(emb_size=64, decoder_flow="luong")
    assert Seq2SeqConfig.from_dict(cfg.to_dict()).model.decoder_flow == "luong"
    args = build_parser().parse_args(["train", "--config", str(conf), "--set", "model.decoder_flow=bahdanau"])
    assert _train_config(args).model.decoder_flow == "bahdanau"
    assert ModelConfig.of(cfg.model, 10, 11).decoder_flow == "luong"


def test_decoder_flow_round_trips_through_checkpoints(tmp_path):
    model, src, lens, tgt = _model()
    model.eval()
    save_checkpoint(tmp_path / "m.pt", {"model_config": model.config.to_dict(), "model": model.state_dict()},
                    format="fastseq.seq2seq")
    ckpt = load_checkpoint(tmp_path / "m.pt", format="fastseq.seq2seq")
    assert ckpt["model_config"]["decoder_flow"] == "luong"
    again = Seq2Seq(ModelConfig(**ckpt["model_config"])).to(DEVICE)
    again.load_state_dict(ckpt["model"])
    again.eval()
    assert type(again.decoder) is LuongDecoder
    with torch.no_grad():
        assert torch.equal(again(src, lens, tgt), model(src, lens, tgt))
    # A checkpoint written before the option existed has no decoder_flow: Bahdanau.
    old = {k: v for k, v in ModelConfig(**dict(CFG, decoder_flow="bahdanau")).to_dict().items()
           if k != "decoder_flow"}
    bahdanau = Seq2Seq(ModelConfig(**old))
    assert bahdanau.config.decoder_flow == "bahdanau" and type(bahdanau.decoder) is Decoder


def test_luong_model_learns_a_copy_task():
    """Copy a random sequence of 3..6 tokens: 200 Adam updates bring the loss from about
    ln(V) to a small fraction of it."""
    torch.manual_seed(0)
    V = 12
    cfg = ModelConfig(src_vocab_size=V, tgt_vocab_size=V, emb_size=16, enc_hidden_size=32,
                      dec_hidden_size=32, attn_size=32, dropout=0.0, decoder_flow="luong")
    model = Seq2Seq(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)

    def batch(B=32):
        lens = torch.randint(3, 7, (B,), generator=g)
        src = torch.randint(4, V, (B, 6), generator=g)
        src[torch.arange(6)[None] >= lens[:, None]] = 0
        tgt = torch.zeros(B, 7, dtype=torch.long)
        tgt[:, :6] = src
        tgt[torch.arange(B), lens] = EOS
        tgt_in = torch.cat([torch.full((B, 1), BOS), tgt[:, :-1]], 1)
        tgt_in[tgt_in == EOS] = 0
        return src, lens, tgt_in, tgt

    losses = []
    for _ in range(200):
        src, lens, tgt_in, tgt = batch()
        loss, _ = masked_cross_entropy(model(src, lens, tgt_in), tgt)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 1.8 and last < 0.25, (first, last)
    model.eval()
    src, lens, _, tgt = batch(8)
    hyps = greedy_search(model, src, lens, BOS, EOS, max_len=10)
    refs = [row[:n] for row, n in zip(src.tolist(), lens.tolist())]
    assert sum(h == r for h, r in zip(hyps, refs)) >= 6, (hyps, refs)


def test_step_bad_input_names_the_argument():
    model, src, lens, tgt = _model()
    dec = model.decoder
    H = CFG["dec_hidden_size"]
    with torch.no_grad():
        memory = model.encode(src, lens)
        _, gi = dec.embed_inputs(tgt[:, :1])
        with pytest.raises(RuntimeError, match=rf"state: expected \[s; a\] of shape \(B, 2\*H\) = \(B, {2 * H}\), "
                                               rf"got \(4, {H}\)"):
            dec.step(gi[:, 0], memory.init_state[:, :H], memory)  # s alone, as the Bahdanau flow's state
        with pytest.raises(RuntimeError, match=rf"gi_emb: expected shape \(B, 3\*H\) = \(4, {3 * H}\), "
                                               rf"got \(4, 1, {3 * H}\)"):
            dec.step(gi, memory.init_state, memory)
        with pytest.raises(RuntimeError, match=r"mask: expected shape \(B, S\) = \(4, 11\), got \(4, 3\)"):
            dec.step(gi[:, 0], memory.init_state, memory._replace(mask=memory.mask[:, :3]))
