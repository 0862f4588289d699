"""Data, config and CLI faults: each bad input ends the command with one line
naming the file/key/flag and what is wrong (a ``SystemExit`` message, status 1),
before any work is done -- never a traceback. Empty and over-long lines are
dropped and counted. Config values are YAML data, never evaluated.

Every case here counts towards the README's "bad inputs tried" figure
(test ids start with ``bad-``).
"""
import gzip
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fastseq.cli import main
from fastseq.data.shards import ShardedCorpus

REPO = Path(__file__).resolve().parents[2]
WORDS = ("der die das ein eine hund katze mann frau kind läuft spielt sitzt auf im park "
         "haus wasser ball rot blau groß klein schnell").split()
SMALL = ["--set", "src_vocab_size=60", "--set", "tgt_vocab_size=60", "--set", "tokenizer=bpe",
         "--no-progress"]


def _sentences(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def _corpus(directory: Path, src=None, tgt=None, n=300) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    src = _sentences(n, 1) if src is None else src
    tgt = _sentences(n, 2) if tgt is None else tgt
    for lang, lines in (("de", src), ("en", tgt)):
        data = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode("utf-8")
        (directory / f"train.{lang}").write_bytes(data)
    return directory


def _fails(argv, *fragments):
    """Run the CLI; it must exit with a one-line message holding every fragment."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    msg = str(info.value.code)
    assert isinstance(info.value.code, str) and "\n" not in msg.strip(), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


# ------------------------------------------------------------------ data faults


def _preprocess(tmp_path, corpus):
    return ["preprocess", "--corpus", str(corpus), "--set", f"data_dir={tmp_path / 'data'}", *SMALL]


def test_bad_missing_corpus_directory(tmp_path):
    _fails(_preprocess(tmp_path, tmp_path / "nope"), "fastseq preprocess:", str(tmp_path / "nope"),
           "neither 'multi30k' nor an existing directory")


def test_bad_missing_target_file(tmp_path):
    d = _corpus(tmp_path / "c")
    (d / "train.en").unlink()
    _fails(_preprocess(tmp_path, d), "split 'train' has no 'en' side", "train.en")


def test_bad_mismatched_line_counts(tmp_path):
    d = _corpus(tmp_path / "c", src=_sentences(300, 1), tgt=_sentences(297, 2))
    _fails(_preprocess(tmp_path, d), "parallel files differ in length", "300 lines in", "297 lines in",
           "train.de", "train.en")


def test_bad_invalid_utf8_names_file_and_line(tmp_path):
    lines = [s.encode() for s in _sentences(300, 1)]
    lines[41] = b"ein hund \xff\xfe l\xe4uft"  # Latin-1 bytes, not UTF-8
    d = _corpus(tmp_path / "c", src=b"\n".join(lines) + b"\n")
    _fails(_preprocess(tmp_path, d), "train.de: invalid UTF-8 on line 42")


def test_bad_truncated_gzip(tmp_path):
    d = _corpus(tmp_path / "c")
    data = gzip.compress((d / "train.en").read_bytes())
    (d / "train.en").unlink()
    (d / "train.en.gz").write_bytes(data[: len(data) // 2])
    _fails(_preprocess(tmp_path, d), "train.en.gz", "truncated or not valid gzip")


def test_bad_data_dir_prepared_differently(tmp_path):
    d = _corpus(tmp_path / "c")
    assert main(_preprocess(tmp_path, d)) == 0
    _fails(_preprocess(tmp_path, d)[:-1] + ["--set", "max_len=50", "--no-progress"],
           "prepared with other settings (max_len)")


def test_empty_and_overlong_lines_are_dropped_and_counted(tmp_path, capsys):
    src, tgt = _sentences(300, 1), _sentences(300, 2)
    for i in (3, 50, 77):
        src[i] = ""
    for i in (10, 11):
        tgt[i] = "   "  # whitespace only counts as empty
    for i in (100, 200, 250, 299):
        src[i] = " ".join(WORDS * 20)  # ~460 words, far over max_len
    d = _corpus(tmp_path / "c", src=src, tgt=tgt)
    assert main(_preprocess(tmp_path, d) + ["--set", "max_len=60"]) == 0
    out = capsys.readouterr().out
    assert "291 pairs" in out and "dropped 5 empty, 4 longer than 60" in out, out
    meta = ShardedCorpus(tmp_path / "data").meta
    assert (meta["num_pairs"], meta["dropped_empty"], meta["dropped_too_long"]) == (291, 5, 4)


# ------------------------------------------------------------------ config faults

BAD_VALUES = [
    ("lr=-1", "'lr': expected > 0, got -1.0"),
    ("lr=abc", "'lr': expected float, got 'abc'"),
    ("epochs=0", "'epochs': expected > 0, got 0"),
    ("epochs=1.5", "'epochs': expected int, got 1.5"),
    ("max_tokens=true", "'max_tokens': expected int, got True"),
    ("model.dropout=1.5", "config key 'model.dropout': expected a value in [0, 1), got 1.5"),
    ("label_smoothing=1", "'label_smoothing': expected in [0, 1), got 1.0"),
    ("clip_norm=0", "'clip_norm': expected > 0, got 0.0"),
    ("model.rnn_type=rnn", "'model.rnn_type': expected 'gru' or 'lstm', got 'rnn'"),
    ("precision=fp8", "'precision': expected one of ('auto', 'fp32', 'bf16', 'fp16'), got 'fp8'"),
    ("lr_schedule=cosine", "'lr_schedule': 'cosine' decays to max_steps; set max_steps"),
    ("lr_schedule=step", "'lr_schedule': expected one of"),
    ("best_metric=bleu", "'best_metric': expected one of ('val_bleu', 'val_loss'), got 'bleu'"),
    ("tokenizer=wordpiece", "'tokenizer': expected one of ('unigram', 'bpe'), got 'wordpiece'"),
    ("nonfinite_loss=ignore", "'nonfinite_loss': expected one of ('skip', 'stop'), got 'ignore'"),
    ("max_skipped_updates=0", "'max_skipped_updates': expected > 0, got 0"),
    ("accum_steps=-2", "'accum_steps': expected > 0, got -2"),
    ("keep_checkpoints=0", "'keep_checkpoints': expected > 0, got 0"),
    ("patience=-1", "'patience': expected >= 0, got -1"),
    ("max_minutes=-5", "'max_minutes': expected >= 0, got -5.0"),
    ("threads=-1", "'threads': expected >= 0, got -1"),
    ("model.enc_hidden_size=0", "'model.enc_hidden_size': expected a positive integer, got 0"),
    ("model.emb_size=8.5", "'model.emb_size': expected int, got 8.5"),
    ("model=8", "config key 'model': expected a section"),
    ("dropout=0.2", "unknown config key(s) ['dropout']", "'dropout' is a key of the 'model' section: model.dropout"),
    ("model.src_vocab_size=9", "unknown config key(s) ['model.src_vocab_size']",
     "'src_vocab_size' is not a key of the 'model' section but of the level above"),
    ("src_vocab_size=[1, 2]", "'src_vocab_size': expected int, got [1, 2]"),
    ("corpus=null", "'corpus': expected str, got None"),
    ("acum_steps=2", "unknown config key(s) ['acum_steps']; valid keys: [", "'accum_steps'"),
]


@pytest.mark.parametrize("item,expected", [(c[0], c[1:]) for c in BAD_VALUES],
                         ids=[f"bad-config-{c[0]}" for c in BAD_VALUES])
@pytest.mark.parametrize("command", ["train", "preprocess"])
def test_bad_config_value_rejected_before_work(tmp_path, command, item, expected):
    out = tmp_path / "run"
    _fails([command, "--out", str(out), "--set", item], f"fastseq {command}:", *expected)
    assert not out.exists() and not (tmp_path / "data").exists()


def test_bad_config_file_values(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("epochs: 3\nlr: [0.1]\n")
    _fails(["train", "--config", str(conf)], "'lr': expected float, got [0.1]")
    conf.write_text("- just\n- a list\n")
    _fails(["train", "--config", str(conf)], "expected a mapping of keys to values, got list")
    conf.write_text("epochs: [1, 2\n")
    _fails(["train", "--config", str(conf)], f"--config {conf}: not valid YAML")
    conf.write_bytes(b"corpus: caf\xe9\n")
    _fails(["train", "--config", str(conf)], "not valid YAML")
    _fails(["train", "--config", str(tmp_path / "none.yaml")], "no such file")
    _fails(["train", "--set", "lr"], "--set 'lr': expected KEY=VALUE")
    _fails(["train", "--set", "lr=[0.1"], "--set 'lr=[0.1': not a valid YAML value")
    _fails(["train", "--epochs", "0"], "'epochs': expected > 0, got 0")


def test_bad_config_cannot_run_code(tmp_path):
    """YAML tags that would build Python objects are refused by safe_load; the
    command in them never runs (config file or --set)."""
    marker = tmp_path / "pwned"
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    conf = tmp_path / "c.yaml"
    conf.write_text(f"epochs: {payload}\n")
    _fails(["train", "--config", str(conf)], "not valid YAML", "python/object/apply:os.system")
    _fails(["train", "--set", f"epochs={payload}"], "not a valid YAML value")
    assert not marker.exists()


# ------------------------------------------------------------------ translate / evaluate faults


def test_bad_checkpoint_arguments(tmp_path):
    _fails(["translate", "--checkpoint", str(tmp_path / "none.pt")], "fastseq translate:",
           "checkpoint: no file at", "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    _fails(["evaluate", "--checkpoint", str(tmp_path / "junk.pt")], "fastseq evaluate:",
           f"checkpoint {tmp_path / 'junk.pt'} cannot be read")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from fastseq.training.checkpoint import save_checkpoint
    from fastseq.data.tokenizer import Tokenizer, train_tokenizer
    from fastseq.seq2seq.model import ModelConfig, Seq2Seq

    d = tmp_path_factory.mktemp("ckpt")
    src_tok = train_tokenizer(_sentences(300, 1), 60, "bpe")
    tgt_tok = train_tokenizer(_sentences(300, 2), 60, "bpe")
    cfg = ModelConfig(src_vocab_size=src_tok.vocab_size, tgt_vocab_size=tgt_tok.vocab_size, emb_size=8,
                      enc_hidden_size=8, dec_hidden_size=8, attn_size=8, readout_size=8)
    save_checkpoint(d / "m.pt", {"model_config": cfg.to_dict(), "model": Seq2Seq(cfg).state_dict(),
                                 "src_tokenizer": src_tok.to_bytes(), "tgt_tokenizer": tgt_tok.to_bytes(),
                                 "step": 0, "epoch": 0, "metrics": {}}, format="fastseq.seq2seq")
    assert isinstance(Tokenizer.from_bytes(src_tok.to_bytes()).vocab_size, int)
    return d / "m.pt"


def test_bad_translate_input_and_options(tiny_checkpoint, tmp_path):
    """Subprocess runs, to see exactly what a user sees on stderr."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def run(args, stdin: bytes):
        return subprocess.run([sys.executable, "-m", "fastseq", "translate", "--checkpoint",
                               str(tiny_checkpoint), "--device", "cpu", *args], input=stdin,
                              capture_output=True, env=env, timeout=300)

    ok = run(["--method", "greedy"], "ein hund\n\nkatze läuft\n".encode())
    assert ok.returncode == 0, ok.stderr.decode()[-2000:]
    assert len(ok.stdout.decode().split("\n")) == 4  # three lines out (one empty input line kept)
    cases = [
        (["--method", "greedy"], b"ein hund\n\xff\xfe katze\n", "stdin line 2: invalid UTF-8"),
        (["--beam-size", "0"], b"ein hund\n", "beam_size: expected an integer >= 1, got 0"),
        (["--batch-size", "0"], b"ein hund\n", "batch_size: expected an integer >= 1, got 0"),
        (["--method", "sample", "--temperature", "0"], b"ein hund\n", "temperature: expected > 0, got 0.0"),
        (["--length-penalty", "-1"], b"ein hund\n", "alpha: expected >= 0"),
    ]
    for args, stdin, fragment in cases:
        res = run(args, stdin)
        err = res.stderr.decode()
        assert res.returncode == 1 and fragment in err and "Traceback" not in err, (args, err[-2000:])
        assert len(err.strip().splitlines()) == 1, err


def test_bad_evaluate_split(tiny_checkpoint, tmp_path):
    d = _corpus(tmp_path / "c")
    _fails(["evaluate", "--checkpoint", str(tiny_checkpoint), "--corpus", str(d), "--split", "test",
            "--device", "cpu"], "--split test: corpus", "has no such split (it has ['train'])")


def test_cli_reports_the_config_error_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fastseq", "train", "--set", "model.dropout=2"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "fastseq train: config key 'model.dropout': expected a value in [0, 1), got 2.0"
