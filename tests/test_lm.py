"""The language model (fastseq.lm): streams, vocabularies, the model with a carried
state, sampling, generation, training, checkpoints, the CLI and its errors."""
import json
import math

import pytest
import torch

from fastseq.data.streams import StreamBatches
from fastseq.data.text import load_text
from fastseq.data.vocab import (
    CharVocabulary, WordVocabulary, build_vocabulary, vocabulary_from_dict,
)
from fastseq.lm.generate import TextGenerator
from fastseq.lm.model import LanguageModel, LMConfig, detach_state
from fastseq.lm.task import LMTrainConfig, split_documents, train
from fastseq.sampling import draw, filter_logits, greedy

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 40


def _model(rnn_type="lstm", vocab_size=11, layers=2, dropout=0.0, emb=8, hidden=12):
    torch.manual_seed(0)
    return LanguageModel(LMConfig(rnn_type=rnn_type, emb_size=emb, hidden_size=hidden,
                                  num_layers=layers, dropout=dropout, vocab_size=vocab_size))


# --------------------------------------------------------------------------- streams


def test_stream_chunks_continue_row_by_row_and_targets_are_shifted():
    ids = torch.arange(1000)
    sb = StreamBatches(ids, batch_size=3, bptt=7, world_size=1, seed=5)
    chunks = [c for _, c in sb.iterate(0)]
    assert len(chunks) == sb.num_batches == sb.chunks
    for a, b in zip(chunks, chunks[1:]):
        assert torch.equal(b.inputs[:, 0], a.inputs[:, -1] + 1)  # the next token of the same stream
    for c in chunks:
        assert torch.equal(c.targets, c.inputs + 1)
    rows = torch.cat([c.inputs for c in chunks], 1)
    assert rows.unique().numel() == rows.numel()  # streams do not overlap
    assert 0 <= sb.offset(0) < 7 and {sb.offset(e) for e in range(20)} != {sb.offset(0)}
    assert all(StreamBatches(ids, 3, 7, seed=5).num_batches == sb.num_batches for _ in range(2))


def test_stream_ranks_own_disjoint_streams_and_resume_mid_epoch():
    ids = torch.arange(5000)
    sb = StreamBatches(ids, batch_size=2, bptt=5, world_size=2, seed=1)
    r0 = list(sb.iterate(1, rank=0, world_size=2))
    r1 = list(sb.iterate(1, rank=1, world_size=2))
    assert [g for g, _ in r0] == list(range(0, sb.num_batches, 2))
    assert [g for g, _ in r1] == list(range(1, sb.num_batches, 2))
    assert not set(r0[0][1].inputs.flatten().tolist()) & set(r1[0][1].inputs.flatten().tolist())
    tail = list(sb.iterate(1, start=7, rank=1, world_size=2))
    assert [g for g, _ in tail] == [g for g, _ in r1 if g >= 7]
    assert torch.equal(tail[0][1].inputs, dict(r1)[tail[0][0]].inputs)
    with pytest.raises(ValueError, match="world_size"):
        next(sb.iterate(0, world_size=1))


def test_stream_batches_reject_a_text_shorter_than_one_chunk_per_stream():
    with pytest.raises(ValueError, match=r"has 100 tokens, fewer than .* 4 streams"):
        StreamBatches(torch.arange(100), batch_size=4, bptt=30)


# --------------------------------------------------------------------------- vocabularies


def test_char_vocabulary_round_trip_and_unknown_characters():
    v = build_vocabulary("char", [TEXT])
    assert v.vocab_size == len(set(TEXT)) + 2 and (v.eos_id, v.unk_id) == (0, 1)
    assert v.decode(v.encode(TEXT)) == TEXT
    assert v.unknown("Zoë speaks") == ["Z", "ë"]
    assert v.decode(v.encode("Zo")) == "\ufffdo"
    assert isinstance(vocabulary_from_dict(v.to_dict()), CharVocabulary)
    assert vocabulary_from_dict(v.to_dict()).encode(TEXT) == v.encode(TEXT)


def test_word_vocabulary_keeps_newlines_and_the_most_frequent_words():
    every = build_vocabulary("word", [TEXT])
    assert every.decode(every.encode("Speak, speak.\n\nAll:")) == "Speak, speak.\n\nAll:"
    v = build_vocabulary("word", [TEXT], vocab_size=4)
    assert v.vocab_size == 4 and isinstance(v, WordVocabulary)
    assert v.units[2:] == ["\n", "First"]  # the two most frequent: 12 and 4 per copy
    assert v.decode(v.encode("First famish?\n")) == "First \ufffd\n"
    assert vocabulary_from_dict(v.to_dict()).encode(TEXT) == v.encode(TEXT)


def test_subword_vocabulary_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSEQ_CACHE", str(tmp_path))
    v = build_vocabulary("subword", [TEXT], vocab_size=60)
    assert v.vocab_size <= 60 and v.decode(v.encode("Speak, speak.\n\nAll:")) == "Speak, speak.\n\nAll:"
    assert v.unknown("Zoë") and vocabulary_from_dict(v.to_dict()).encode("hear me") == v.encode("hear me")
    with pytest.raises(ValueError, match="vocab_size"):
        build_vocabulary("subword", [TEXT])


def test_split_documents_cuts_by_characters():
    train_docs, val_docs = split_documents(["abcdefghij"], 0.1)
    assert (train_docs, val_docs) == (["abcdefghi"], ["j"])
    train_docs, val_docs = split_documents(["abcde", "fghij"], 0.3)
    assert (train_docs, val_docs) == (["abcde", "fg"], ["hij"])


def test_tiny_shakespeare_is_embedded_with_nanogpts_split():
    corpus = load_text("tinyshakespeare")
    assert corpus.num_characters == 1_115_394
    train_docs, val_docs = split_documents(list(corpus.documents), 0.1)
    assert (len(train_docs[0]), len(val_docs[0])) == (1_003_854, 111_540)
    assert len(set(corpus.documents[0])) == 65


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_truncated_bptt_chunks_equal_one_forward(backend, rnn_type):
    """The state carried over k chunks gives the outputs and final state of one call."""
    model = _model(rnn_type).eval()
    tokens = torch.randint(11, (3, 17))
    with torch.no_grad():
        whole, final = model(tokens)
        parts, state = [], None
        for chunk in tokens.split([5, 1, 7, 4], dim=1):
            logits, state = model(chunk, state)
            state = detach_state(state)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(state if rnn_type == "lstm" else [state], final if rnn_type == "lstm" else [final]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_weights_are_tied_only_when_the_sizes_allow():
    tied = _model(emb=12, hidden=12)
    assert tied.output.weight is tied.embed.weight
    untied = _model(emb=8, hidden=12)
    assert untied.output.weight is not untied.embed.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied_same = sum(p.numel() for p in LanguageModel(LMConfig(
        emb_size=12, hidden_size=12, num_layers=2, dropout=0.0, vocab_size=11, tie_weights=False)).parameters())
    assert n_untied_same - n_tied == 11 * 12


def test_model_rejects_bad_tokens_and_config():
    with pytest.raises(ValueError, match=r"tokens: expected a 2-D int64 tensor"):
        _model()(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="rnn_type"):
        LMConfig(rnn_type="rnn", vocab_size=5)
    with pytest.raises(ValueError, match="dropout"):
        LMConfig(dropout=1.0, vocab_size=5)


# --------------------------------------------------------------------------- sampling


def test_top_k_1_and_a_tiny_temperature_equal_greedy():
    logits = torch.randn(6, 30)
    logits[0, 3] = logits[0, 7] = logits[0].max() + 1  # a tie: greedy takes the lower id
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    want = greedy(logits)
    assert want[0] == 3
    assert torch.equal(draw(filter_logits(logits, top_k=1), gens), want)
    assert torch.equal(draw(filter_logits(logits[1:], temperature=1e-4), gens[1:]), want[1:])


def test_top_p_keeps_exactly_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25]])
    kept = lambda p: torch.isfinite(filter_logits(probs.log(), top_p=p))  # noqa: E731
    assert kept(0.5)[0].tolist() == [True, False, False, False]      # 0.5 reaches 0.5
    assert kept(0.51)[0].tolist() == [True, True, False, False]
    assert kept(0.8)[1].tolist() == [False, False, True, True]       # 0.5 + 0.3 reaches 0.8
    assert kept(0.81)[1].tolist() == [False, True, True, True]
    assert kept(0.5)[2].tolist() == [True, True, False, False]       # ties: by token id
    assert kept(1e-9).sum(-1).tolist() == [1, 1, 1]                  # never empty
    assert kept(1.0).all()
    k2 = torch.isfinite(filter_logits(probs.log(), top_k=2, top_p=0.99))
    assert k2[2].tolist() == [True, True, False, False]  # top-k first, then top-p of what is left


def test_draw_samples_a_row_the_same_alone_or_in_a_batch():
    logits = torch.randn(5, 40)
    batch = torch.stack([draw(logits, [torch.Generator().manual_seed(10 + i) for i in range(5)])
                         for _ in range(1)])[0]
    alone = [int(draw(logits[i:i + 1], [torch.Generator().manual_seed(10 + i)])) for i in range(5)]
    assert batch.tolist() == alone
    counts = torch.bincount(draw(torch.tensor([[0.0, math.log(3.0)]]).expand(4000, 2),
                                 [torch.Generator().manual_seed(i) for i in range(4000)]), minlength=2)
    assert 0.70 < counts[1] / 4000 < 0.80  # p = 0.75


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_sampling_rejects_values_out_of_range(kw, match):
    with pytest.raises(ValueError, match=match):
        filter_logits(torch.randn(2, 5), **kw)


# --------------------------------------------------------------------------- generation


def _generator():
    vocab = build_vocabulary("char", [TEXT])
    return TextGenerator(_model(vocab_size=vocab.vocab_size, dropout=0.1), vocab)


def test_same_seed_same_text_in_one_batch_or_one_sample_at_a_time():
    gen = _generator()
    batch = gen.generate("First", max_new_tokens=40, num_samples=3, seed=7, temperature=1.3, top_p=0.9)
    alone = [gen.generate("First", max_new_tokens=40, seed=7 + i, temperature=1.3, top_p=0.9)[0]
             for i in range(3)]
    assert batch == alone and len(set(batch)) > 1
    assert gen.model.training  # dropout was off while generating, and the mode is restored


def test_greedy_generation_and_stop_strings_and_streaming():
    gen = _generator()
    full = gen.generate("Spe", max_new_tokens=30, greedy_decoding=True)[0]
    assert gen.generate("Spe", max_new_tokens=30, top_k=1, seed=3)[0] == full
    pieces = []
    streamed = gen.generate("Spe", max_new_tokens=30, greedy_decoding=True, on_text=pieces.append)[0]
    assert "".join(pieces) == streamed == full
    if len(full) > 4:
        stop = full[2:4]
        cut = gen.generate("Spe", max_new_tokens=30, greedy_decoding=True, stop=[stop])[0]
        assert cut == full[: full.find(stop)]


def test_generation_rejects_bad_arguments():
    gen = _generator()
    with pytest.raises(ValueError, match=r"prompt: 2 char\(s\) not in the model's vocabulary: 'Z', 'ë'"):
        gen.generate("Zoë")
    for kw, match in [(dict(temperature=0), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
                      (dict(max_new_tokens=0), "max_new_tokens"), (dict(num_samples=0), "num_samples"),
                      (dict(stop=[""]), "stop")]:
        with pytest.raises(ValueError, match=match):
            gen.generate("First", **kw)
    gen.generate("First", max_new_tokens=2, temperature=0, greedy_decoding=True)  # greedy needs none


# --------------------------------------------------------------------------- training


def _config(tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    values = {"corpus": str(corpus), "out": str(tmp_path / "run"), "batch_size": 4, "bptt": 16,
              "lr": 0.02, "warmup_steps": 0, "eval_every": 30, "max_steps": 60, "progress": False,
              "sample_tokens": 20, "eval_streams": 2, "threads": 1,
              "model": {"emb_size": 16, "hidden_size": 32, "num_layers": 1, "dropout": 0.0}}
    values.update(kw)
    return LMTrainConfig.from_dict(values)


def test_a_short_run_lowers_the_validation_loss_and_round_trips_its_checkpoint(tmp_path):
    cfg = _config(tmp_path)
    result = train(cfg)
    vocab = build_vocabulary("char", split_documents([TEXT], 0.1)[:1][0])
    uniform = math.log(vocab.vocab_size)
    # Stated margin: at least 1.5 nats below the uniform distribution (3.56 nats; measured 60
    # updates of 4 x 16 characters: 1.59 nats). The text is repetitive, so it is learnt fast.
    assert result["val_loss"] < uniform - 1.5
    assert result["val_bpc"] == pytest.approx(result["val_loss"] / math.log(2))
    assert (tmp_path / "run" / "sample.txt").read_text() == result["sample"]
    gen = TextGenerator.from_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    assert gen.vocabulary.to_dict() == vocab.to_dict()
    from fastseq.lm.task import evaluate

    again = evaluate(tmp_path / "run" / "best.pt", device="cpu")
    assert again["loss"] == pytest.approx(result["val_loss"], abs=1e-4)
    assert again["characters"] == result["val_characters"]


def test_resume_continues_the_carried_state_exactly(tmp_path):
    """Training 30 updates equals 14, an interruption, and --resume (the carried state is in last.pt)."""
    full = train(_config(tmp_path / "a", eval_every=0, save_every=0, max_steps=30, sample_tokens=0))
    train(_config(tmp_path / "b", max_steps=14, eval_every=14, sample_tokens=0))
    resumed = train(_config(tmp_path / "b", max_steps=30, eval_every=14, sample_tokens=0), resume=True)
    log_a = (tmp_path / "a" / "run" / "train_log.csv").read_text().splitlines()
    log_b = (tmp_path / "b" / "run" / "train_log.csv").read_text().splitlines()
    loss = lambda lines: [line.split(",")[3] for line in lines[1:]]  # noqa: E731
    assert loss(log_b) == loss(log_a) and len(loss(log_a)) == 30
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="'vocabulary'"):
        _config(tmp_path, vocabulary="byte")
    with pytest.raises(ValueError, match="'vocab_size'"):
        _config(tmp_path, vocabulary="subword")
    with pytest.raises(ValueError, match="'bptt'"):
        _config(tmp_path, bptt=0)
    with pytest.raises(ValueError, match=r"config key 'task': this is a 'lm' config"):
        LMTrainConfig.from_dict({"task": "translation"})
    assert LMTrainConfig.from_dict(_config(tmp_path).to_dict()).to_dict() == _config(tmp_path).to_dict()


def test_too_short_and_empty_corpora_fail_with_one_clear_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("To be or not to be.\n" * 3)
    with pytest.raises(ValueError, match=r"fewer than the .* streams"):
        train(_config(tmp_path, corpus=str(short), batch_size=8, bptt=16))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="hold no text"):
        train(_config(tmp_path, corpus=str(empty)))


# --------------------------------------------------------------------------- the CLI


def _cli(capsys, *argv):
    from fastseq.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_trains_generates_and_evaluates(tmp_path, capsys):
    cfg = _config(tmp_path)
    (tmp_path / "lm.yaml").write_text(json.dumps({"task": "lm", **{
        k: v for k, v in cfg.to_dict().items() if k != "task"}}))
    code, out, err = _cli(capsys, "train", "--config", str(tmp_path / "lm.yaml"), "--max-steps", "20")
    assert code == 0, err
    assert "char-level" in out and "bits/char" in out
    ckpt = str(tmp_path / "run" / "best.pt")
    code, out, err = _cli(capsys, "generate", ckpt, "--prompt", "First", "--max-new-tokens", "25", "--seed", "3")
    assert code == 0 and out.startswith("First") and len(out) >= len("First") + 1
    code, out2, _ = _cli(capsys, "generate", ckpt, "--prompt", "First", "--max-new-tokens", "25", "--seed", "3")
    assert out2 == out
    code, out, _ = _cli(capsys, "generate", ckpt, "--prompt", "All", "--num-samples", "2", "--max-new-tokens", "5")
    assert code == 0 and out.count("=== sample") == 2
    code, out, _ = _cli(capsys, "evaluate", "--checkpoint", ckpt)
    assert code == 0 and json.loads(out)["split"] == "val" and json.loads(out)["bpc"] > 0


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "Zoë"], "not in the model's vocabulary"),
    (["--top-p", "0"], r"--top-p: expected a value in \(0, 1\]"),
    (["--top-p", "1.2"], "--top-p"),
    (["--top-k", "-1"], "--top-k: expected >= 0"),
    (["--temperature", "0"], r"--temperature: expected > 0, got 0.0 \(--greedy"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_cli_generate_bad_input_gets_one_line(tmp_path, capsys, argv, match):
    train(_config(tmp_path, max_steps=2, eval_every=2, sample_tokens=0))
    code, out, err = _cli(capsys, "generate", str(tmp_path / "run" / "best.pt"), *argv)
    assert code != 0 and out == ""
    import re

    assert re.search(match, str(code) + err), (code, err)


def test_cli_generate_refuses_a_translation_checkpoint(tmp_path, capsys):
    from fastseq.training.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "mt.pt", {"model": {}}, format="fastseq.seq2seq")
    code, out, err = _cli(capsys, "generate", str(tmp_path / "mt.pt"))
    assert "is not a fastseq.lm checkpoint (it is a fastseq.seq2seq checkpoint)" in str(code) + err


def test_bf16_autocast_training_carries_a_float32_state(tmp_path):
    cfg = _config(tmp_path, precision="bf16", max_steps=6, eval_every=6, sample_tokens=5)
    result = train(cfg)
    assert result["precision"] == "bf16" and math.isfinite(result["val_loss"])
    from fastseq.training.checkpoint import load_checkpoint

    (h, c), = load_checkpoint(tmp_path / "run" / "last.pt")["task_state"]
    assert h.dtype == c.dtype == torch.float32 and h.shape == (1, 4, 32)


@pytest.mark.slow
def test_torchrun_two_processes_train_their_own_streams(tmp_path):
    """torchrun --nproc_per_node 2 (DDP, gloo): each rank carries the state of its own
    streams (saved per rank in last.pt); the run trains and evaluates."""
    import subprocess
    import sys

    cfg = _config(tmp_path, max_steps=6, eval_every=6, sample_tokens=0)
    (tmp_path / "lm.yaml").write_text(json.dumps(cfg.to_dict()))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "fastseq", "train", "--config", str(tmp_path / "lm.yaml")],
                   check=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    from fastseq.training.checkpoint import load_checkpoint

    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["world_size"] == 2 and last["step"] == 6
    (h0, _), (h1, _) = last["task_state"]
    assert h0.shape == h1.shape == (1, 4, 32) and not torch.equal(h0, h1)  # different streams
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and math.isfinite(metrics["val_loss"])


def test_sampling_and_streams_reject_bad_tensors():
    with pytest.raises(ValueError, match=r"logits: expected a 2-D floating-point tensor \[N, V\], got shape \(5,\)"):
        filter_logits(torch.randn(5), top_k=2)
    with pytest.raises(ValueError, match="logits: expected a 2-D floating-point tensor"):
        draw(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="generators: expected one per row"):
        draw(torch.randn(2, 3), [None])
    with pytest.raises(ValueError, match=r"ids: expected a 1-D integer tensor .* dtype torch.float32"):
        StreamBatches(torch.zeros(100), batch_size=2, bptt=4)
