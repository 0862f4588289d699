"""Training features of ``fastseq train``: exact resume after a kill, torchrun/DDP
equivalence with gradient accumulation, checkpoints kept, early stopping, the
learning-rate schedule, the CSV logs and the plot.

The end-to-end runs are subprocesses (``python -m fastseq train``, and
``torch.distributed.run`` for two gloo processes) on a tiny model and a slice
of Multi30k, one CPU thread per process.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from parity import assert_close

from fastseq.cli import main
from fastseq.data.lines import sample_pairs
from fastseq.seq2seq.task import Seq2SeqConfig, train
from fastseq.training.checkpoint import load_checkpoint
from fastseq.training.runlog import CsvLog, read_csv
from fastseq.training.schedule import LRSchedule

MODEL = dict(emb_size=16, enc_hidden_size=24, dec_hidden_size=24, attn_size=16, readout_size=16, dropout=0.1)
TINY = dict(
    src_vocab_size=300, tgt_vocab_size=300, model=MODEL, train_limit=1200, val_limit=40, test_limit=10,
    max_tokens=600, max_len=40, lr=3e-3, warmup_steps=5, epochs=2, beam_size=2, threads=1,
    val_bleu=False, progress=False,
)
REPO = Path(__file__).resolve().parent.parent


def _env(cache):
    env = dict(os.environ, FASTSEQ_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _cfg(**values) -> Seq2SeqConfig:
    return Seq2SeqConfig.from_dict(dict(TINY, **values))


def _write_config(path, **values):
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()) + "\n")
    return path


def _losses(out):
    return [(int(r["step"]), r["loss"]) for r in read_csv(out / "train_log.csv")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_killed_run_resumes_on_the_same_trajectory(tmp_path, cache):
    """SIGKILL a run mid-epoch, resume it from last.pt: the per-update training
    losses and the final weights equal those of an uninterrupted run exactly."""
    conf = _write_config(tmp_path / "c.yaml", **TINY, max_steps=40, save_every=4, eval_every=15,
                         data_dir=str(tmp_path / "data"))
    cmd = [sys.executable, "-m", "fastseq", "train", "--config", str(conf)]
    env = _env(cache)
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], env=env, check=True, timeout=600)
    full = _losses(tmp_path / "full")
    assert [s for s, _ in full] == list(range(1, 41))

    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "cut")], env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [s for s, _ in _losses(tmp_path / "cut")]
        if steps and 10 <= steps[-1]:  # past the step-8 checkpoint, mid-epoch
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = _losses(tmp_path / "cut")[-1][0]
    assert killed_at < 40
    resumed_from = load_checkpoint(tmp_path / "cut" / "last.pt")["step"]
    assert 8 <= resumed_from <= killed_at

    subprocess.run(cmd + ["--out", str(tmp_path / "cut"), "--resume"], env=env, check=True, timeout=600)
    assert _losses(tmp_path / "cut") == full  # step for step, bit for bit
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    metrics = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert metrics["steps"] == 40 and (tmp_path / "cut" / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_accumulation(tmp_path, cache):
    """torchrun --nproc_per_node 2 (DDP, gloo, accum_steps=1) and one process
    with accum_steps=2 see the same global batches and make the same updates:
    same losses and parameters after 6 updates up to float summation order
    (stated tolerance: rtol 1e-4, atol 1e-5 on the weights)."""
    base = dict(TINY, model=dict(MODEL, dropout=0.0), max_steps=6, eval_every=0, data_dir=str(tmp_path / "data"))
    env = _env(cache)
    one = _write_config(tmp_path / "one.yaml", **base, accum_steps=2)
    two = _write_config(tmp_path / "two.yaml", **base, accum_steps=1)
    subprocess.run([sys.executable, "-m", "fastseq", "train", "--config", str(one),
                    "--out", str(tmp_path / "one")], env=env, check=True, timeout=600)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "fastseq", "train", "--config", str(two), "--out", str(tmp_path / "two")],
                   env=env, check=True, timeout=600)
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, 7))
    for (_, a), (_, b) in zip(l1, l2):
        assert a == pytest.approx(b, rel=1e-5)
    c1 = load_checkpoint(tmp_path / "one" / "last.pt")
    c2 = load_checkpoint(tmp_path / "two" / "last.pt")
    assert c1["world_size"] == 1 and c2["world_size"] == 2
    assert c2["state"]["tokens"] == c1["state"]["tokens"] > 0
    max_diff = 0.0
    for name, w in c1["model"].items():
        assert_close(c2["model"][name], w, name=name)  # float32 sums in another order (gloo)
        max_diff = max(max_diff, float((c2["model"][name] - w).abs().max()))
    print(f"max |w_2proc - w_1proc| after 6 updates: {max_diff:.2e}")


def test_checkpoints_keep_the_best_k_and_early_stopping(tmp_path, cache, monkeypatch):
    """With lr so small that the weights cannot change, validation never
    improves: patience 2 stops after the 3rd evaluation; 2 step checkpoints
    are kept, best.pt is the first (best) one, last.pt is resumable."""
    monkeypatch.setenv("FASTSEQ_CACHE", str(cache))
    cfg = _cfg(lr=1e-30, warmup_steps=0, lr_decay=1.0, out=str(tmp_path / "run"),
               eval_every=2, keep_checkpoints=2, patience=2, best_metric="val_loss", max_steps=50)
    result = train(cfg)
    assert result["stopped_early"] and result["steps"] == 6, result["steps"]
    evals = read_csv(tmp_path / "run" / "eval_log.csv")
    assert [int(r["step"]) for r in evals] == [2, 4, 6]
    assert len({r["val_loss"] for r in evals}) == 1  # nothing could change
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-00000002.pt", "step-00000004.pt"]
    assert load_checkpoint(tmp_path / "run" / "best.pt")["step"] == 2
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["stopped_early"]


def test_bf16_autocast_training_on_cpu(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("FASTSEQ_CACHE", str(cache))
    cfg = _cfg(test_limit=4, out=str(tmp_path / "run"), precision="bf16", max_steps=3)
    result = train(cfg)
    assert result["precision"] == "bf16" and result["steps"] == 3
    losses = [r["loss"] for r in read_csv(tmp_path / "run" / "train_log.csv")]
    assert all(math.isfinite(x) for x in losses)


def test_fp16_on_cpu_is_rejected_before_work(tmp_path):
    with pytest.raises(ValueError, match="fp16.*needs a CUDA device"):
        train(_cfg(out=str(tmp_path / "run"), precision="fp16", device="cpu"))
    assert not (tmp_path / "run" / "data").exists()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint at .*last.pt"):
        train(_cfg(out=str(tmp_path / "none")), resume=True)


def test_data_prepared_with_other_settings_is_not_reused(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("FASTSEQ_CACHE", str(cache))
    data = str(tmp_path / "data")
    assert main(["preprocess", "--set", f"data_dir={data}", "--set", "train_limit=300",
                 "--set", "src_vocab_size=200", "--set", "tgt_vocab_size=200"]) == 0
    with pytest.raises(SystemExit, match="prepared with other settings.*src_vocab_size"):
        main(["preprocess", "--set", f"data_dir={data}", "--set", "train_limit=300",
              "--set", "src_vocab_size=250", "--set", "tgt_vocab_size=200"])


def test_cli_set_rejects_bad_keys_and_values():
    with pytest.raises(SystemExit, match=r"unknown config key\(s\) \['acum_steps'\]"):
        main(["train", "--set", "acum_steps=2"])
    with pytest.raises(SystemExit, match="'accum_steps': expected > 0, got 0"):
        main(["train", "--set", "accum_steps=0"])
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        main(["train", "--set", "accum_steps"])
    with pytest.raises(SystemExit, match="'precision': expected one of"):
        main(["train", "--set", "precision=fp8"])
    # Model keys live in the model section: a flat one is refused with the dotted name to use.
    with pytest.raises(SystemExit, match=r"unknown config key\(s\) \['dropout'\].*model\.dropout"):
        main(["train", "--set", "dropout=0.2"])
    with pytest.raises(SystemExit, match="config key 'model.dropout': expected float, got 'x'"):
        main(["train", "--set", "model.dropout=x"])


def test_config_model_section_yaml_and_dotted_overrides(tmp_path):
    """The model's settings are one nested section, from YAML and from dotted --set keys
    (applied after the file); the flat training keys keep their names."""
    from fastseq.cli import _train_config, build_parser
    from fastseq.seq2seq.model import Architecture

    conf = tmp_path / "c.yaml"
    conf.write_text("lr: 0.002\nsrc_vocab_size: 500\nmodel:\n  emb_size: 64\n  dropout: 0.1\n")
    args = build_parser().parse_args(["train", "--config", str(conf), "--set", "model.dropout=0.25",
                                      "--set", "model.rnn_type=lstm", "--set", "accum_steps=2"])
    cfg = _train_config(args)
    assert cfg.model == Architecture(emb_size=64, dropout=0.25, rnn_type="lstm")
    assert (cfg.lr, cfg.src_vocab_size, cfg.accum_steps) == (0.002, 500, 2)
    assert cfg.to_dict()["model"]["dropout"] == 0.25 and "dropout" not in cfg.to_dict()
    assert Seq2SeqConfig.from_dict({"model": {"dropout": 0.1}, "model.dropout": 0.2}).model.dropout == 0.2
    default = Seq2SeqConfig.from_dict({})
    assert default.model == Architecture() and default.out == "runs/multi30k"
    assert default.best_metric == "val_bleu"


def test_lr_schedule():
    s = LRSchedule(1.0, "inverse_sqrt", warmup_steps=4)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(15) == pytest.approx(math.sqrt(4 / 16))
    c = LRSchedule(2.0, "cosine", warmup_steps=2, total_steps=12, min_ratio=0.1)
    assert c(1) == 2.0 and c(11) == pytest.approx(0.2) and c(6) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    lin = LRSchedule(1.0, "linear", warmup_steps=0, total_steps=10)
    assert lin(4) == pytest.approx(0.5)
    p = LRSchedule(1.0, "constant", plateau_decay=0.5)
    p.plateau()
    q = LRSchedule(1.0, "constant", plateau_decay=0.5)
    q.load_state_dict(p.state_dict())
    assert q(10) == p(10) == 0.5
    with pytest.raises(ValueError, match="needs total_steps"):
        LRSchedule(1.0, "cosine", warmup_steps=5)


def test_csv_log_resume_drops_later_rows_and_a_torn_line(tmp_path):
    log = CsvLog(tmp_path / "l.csv", ("step", "loss"))
    for s in range(1, 6):
        log.write(step=s, loss=s / 3)
    log.close()
    with open(tmp_path / "l.csv", "a") as f:
        f.write("6,0.33")  # a kill mid-write: no newline, then the next row starts
    log = CsvLog(tmp_path / "l.csv", ("step", "loss"), resume_step=3)
    log.write(step=4, loss=9.0)
    log.close()
    rows = read_csv(tmp_path / "l.csv")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1 / 3), (2, 2 / 3), (3, 1.0), (4, 9.0)]


def test_sample_pairs_is_bounded_and_in_file_order_when_small(tmp_path):
    (tmp_path / "a.de").write_text("".join(f"s{i}\n" for i in range(100)))
    (tmp_path / "a.en").write_text("".join(("" if i == 5 else f"t{i}") + "\n" for i in range(100)))
    all_pairs = sample_pairs(tmp_path / "a.de", tmp_path / "a.en", 1000)
    assert len(all_pairs) == 99 and all_pairs[:5] == [(f"s{i}", f"t{i}") for i in range(5)]
    some = sample_pairs(tmp_path / "a.de", tmp_path / "a.en", 10, seed=3)
    assert len(some) == 10 and some == sample_pairs(tmp_path / "a.de", tmp_path / "a.en", 10, seed=3)
    assert sample_pairs(tmp_path / "a.de", tmp_path / "a.en", 1000, limit=20)[-1] == ("s19", "t19")
