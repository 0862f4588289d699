"""The attention seq2seq end to end on a slice of Multi30k: training lowers the
validation loss, search returns valid sequences, checkpoints reload exactly,
and the CLI runs."""
import io
import json
import math

import pytest
import torch

from fastseq.cli import main
from fastseq.data.corpus import load_corpus
from fastseq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from fastseq.seq2seq.model import ModelConfig, Seq2Seq
from fastseq.seq2seq.search import beam_search, greedy_search, sample
from fastseq.seq2seq.task import Seq2SeqConfig, train
from fastseq.seq2seq.translate import Translator

TINY = dict(
    src_vocab_size=400, tgt_vocab_size=400,
    model=dict(emb_size=32, enc_hidden_size=48, dec_hidden_size=48, attn_size=32, readout_size=32, dropout=0.1),
    train_limit=3000, val_limit=200, test_limit=40,
    max_tokens=1500, max_len=40, lr=3e-3, warmup_steps=10, epochs=3, beam_size=3, progress=False,
)
# An untrained model predicts about uniformly: loss ~ ln(vocab) ~ 6. Training
# must bring validation loss at least this far below ln(vocab).
MARGIN = 1.5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTSEQ_CACHE", str(tmp_path_factory.mktemp("cache")))
        cfg = Seq2SeqConfig.from_dict(dict(TINY, out=str(out)))
        result = train(cfg)
    return cfg, result, out


def test_training_lowers_validation_loss(trained):
    cfg, result, out = trained
    losses = [h["val_loss"] for h in result["history"]]
    assert len(losses) == cfg.epochs
    assert losses[-1] < losses[0], losses
    assert losses[-1] < math.log(cfg.tgt_vocab_size) - MARGIN, losses
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_bleu"] == result["test_bleu"] >= 0.0


def test_checkpoint_reloads_and_translates_identically(trained):
    cfg, result, out = trained
    translator = Translator.from_checkpoint(out / "best.pt", device="cpu")
    src = [s for s, _ in load_corpus("multi30k").read("test", max_lines=cfg.test_limit)]
    hyps = translator.translate(src, method="beam", beam_size=cfg.beam_size, alpha=cfg.length_penalty,
                                batch_size=cfg.eval_batch_size)
    assert hyps == (out / "test.hyp").read_text(encoding="utf-8").splitlines()


def test_search_returns_valid_sequences(trained):
    cfg, result, out = trained
    translator = Translator.from_checkpoint(out / "best.pt", device="cpu")
    model, V = translator.model, translator.model.config.tgt_vocab_size
    src = torch.randint(4, model.config.src_vocab_size, (5, 7))
    lengths = torch.tensor([7, 1, 3, 5, 2])
    src[torch.arange(7)[None] >= lengths[:, None]] = PAD_ID
    for hyps in (
        greedy_search(model, src, lengths, BOS_ID, EOS_ID, max_len=12),
        beam_search(model, src, lengths, BOS_ID, EOS_ID, beam_size=4, max_len=12),
        sample(model, src, lengths, BOS_ID, EOS_ID, max_len=12, top_k=5,
               generator=torch.Generator().manual_seed(0)),
    ):
        assert len(hyps) == 5
        for h in hyps:
            assert len(h) <= 12
            assert all(0 <= t < V and t not in (PAD_ID, BOS_ID, EOS_ID) for t in h)
    # Beam search with one beam and no length penalty is greedy search.
    assert beam_search(model, src, lengths, BOS_ID, EOS_ID, beam_size=1, alpha=0.0, max_len=12) == \
        greedy_search(model, src, lengths, BOS_ID, EOS_ID, max_len=12)


def test_beam_search_scores_at_least_greedy():
    """With alpha=0, the hypothesis beam search returns has a log-prob >= that of the
    greedy one, for every sentence where both end (eos) within max_len. The output
    layer's eos bias is raised a little so that greedy decoding ends too; every row
    is checked (an untrained model's greedy path alone would never emit eos)."""
    torch.manual_seed(0)
    cfg = ModelConfig(src_vocab_size=12, tgt_vocab_size=6, emb_size=8, enc_hidden_size=8,
                      dec_hidden_size=8, attn_size=8, readout_size=8, dropout=0.0)
    model = Seq2Seq(cfg).eval()
    with torch.no_grad():
        model.decoder.output.bias[EOS_ID] += 0.5
    src = torch.randint(4, 12, (3, 5))
    lengths = torch.tensor([5, 5, 5])

    @torch.no_grad()
    def logprob(seq, row):
        toks = torch.tensor([[BOS_ID] + seq + [EOS_ID]])
        logits = model(src[row:row + 1], lengths[row:row + 1], toks[:, :-1])
        return float(torch.log_softmax(logits, -1)[0].gather(1, toks[0, 1:, None]).sum())

    max_len = 8
    greedy = greedy_search(model, src, lengths, BOS_ID, EOS_ID, max_len=max_len)
    beam = beam_search(model, src, lengths, BOS_ID, EOS_ID, beam_size=6, alpha=0.0, max_len=max_len)
    checked = 0
    for row in range(3):
        if len(greedy[row]) < max_len and len(beam[row]) < max_len:  # both ended with eos
            assert logprob(beam[row], row) >= logprob(greedy[row], row) - 1e-5
            checked += 1
    assert checked == 3, (greedy, beam)
    assert any(g != b for g, b in zip(greedy, beam))  # beam search found something else somewhere


def test_cli_train_translate_evaluate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTSEQ_CACHE", str(tmp_path / "cache"))
    cfg = dict(TINY, epochs=1, max_steps=5, train_limit=500, val_limit=20, test_limit=10)
    (tmp_path / "c.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()))
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "test BLEU" in summary and "5 steps" in summary
    monkeypatch.setattr("sys.stdin", io.StringIO("Ein Hund läuft.\nZwei Männer.\n"))
    assert main(["translate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--method", "greedy"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--split", "val",
                 "--method", "greedy"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sentences"] == 1014 and 0 <= report["bleu"] <= 100


def test_cli_rejects_unknown_config_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: 1\nhidden: 3\n")
    with pytest.raises(SystemExit, match=r"unknown config key\(s\) \['hidden'\]; valid keys:"):
        main(["train", "--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "bad2.yaml").write_text("epochs: many\n")
    with pytest.raises(SystemExit, match="'epochs': expected int"):
        main(["train", "--config", str(tmp_path / "bad2.yaml")])


def test_cli_info(capsys):
    """One row per backend with the status fastseq.backend.report() gives (ok, or the reason)."""
    from fastseq.backend.selection import report

    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("torch ") for line in lines)
    rows = {line.split()[0]: line.split()[1] for line in lines if line.startswith("  ")}
    assert rows == {name: "ok" if why == "ok" else "unavailable" for name, why in report().items()}
    assert set(rows) == {"reference", "triton", "cpp", "cuda"}
