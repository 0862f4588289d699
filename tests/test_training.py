"""The shared training package on its own: a second model (tests/toy_task.py, a next-token
model on integer streams with a carried hidden state) trains through the same trainer
with checkpoints, logs and an exact resume, importing nothing of fastseq.seq2seq; the
config's nested sections and dotted keys. (The package layering: tests/test_structure.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastseq.training.checkpoint import load_checkpoint, save_checkpoint
from fastseq.training.config import TrainConfig, nest
from fastseq.training.runlog import read_csv
from fastseq.training.trainer import train
from toy_task import ToyConfig, ToyModelConfig, ToyTask

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
BASE = {"lr": 0.01, "warmup_steps": 0, "threads": 1, "progress": False, "epochs": 3,
        "model.hidden_size": 16, "model.dropout": 0.1}


def _cfg(out: Path, **values) -> ToyConfig:
    return ToyConfig.from_dict({**BASE, "out": str(out), **values})


def _losses(out: Path):
    return [(int(r["step"]), r["loss"]) for r in read_csv(out / "train_log.csv")]


def test_a_second_model_trains_through_the_shared_trainer(tmp_path):
    """12 batches an epoch: 20 updates cross an epoch boundary (the task resets its carried
    state there); evaluations every 4 updates keep the 2 best checkpoints; the task's
    metrics make the eval log's columns; its checkpoints carry its format and extras."""
    cfg = _cfg(tmp_path / "run", max_steps=20, eval_every=4, keep_checkpoints=2)
    result = train(ToyTask(cfg))
    out = tmp_path / "run"
    assert result["steps"] == 20 and result["epochs"] == pytest.approx(20 / 12, abs=0.01)
    assert result["test_ppl"] > 1.0 and "test_loss" in result
    header = (out / "eval_log.csv").read_text().splitlines()[0]
    assert header == "step,epoch,val_loss,val_ppl,lr,elapsed_s"
    evals = read_csv(out / "eval_log.csv")
    assert [int(r["step"]) for r in evals] == [4, 8, 12, 16, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, evals  # it learns the stream
    assert len(list((out / "checkpoints").iterdir())) == 2
    best = load_checkpoint(out / "best.pt", format="fastseq.toy")
    assert best["model_config"] == {"emb_size": 8, "hidden_size": 16, "dropout": 0.1}
    assert best["train_config"]["model"]["hidden_size"] == 16
    assert best["step"] == min(evals, key=lambda r: r["val_loss"])["step"]
    last = load_checkpoint(out / "last.pt", format="fastseq.toy")
    (hidden,) = [s["hidden"] for s in last["task_state"]]
    assert hidden.shape == (1, cfg.streams, 16)  # the carried state, saved for the resume
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"] == {"emb_size": 8, "hidden_size": 16, "dropout": 0.1}
    assert (out / "curves.png").stat().st_size > 10_000
    # Another task's checkpoints are refused by --resume.
    with pytest.raises(ValueError, match="is not a fastseq.seq2seq checkpoint"):
        from fastseq.training.checkpoint import load_resume_checkpoint

        load_resume_checkpoint(out, "fastseq.seq2seq")


def test_a_second_model_resumes_exactly(tmp_path):
    """Stopped after 9 updates and resumed, the run continues on exactly the trajectory
    of an uninterrupted one (losses bit for bit, final weights equal), across an epoch
    boundary: last.pt holds the task's carried hidden state. Without that state the
    resumed losses differ, so the equality is not an accident."""
    full = _cfg(tmp_path / "full", max_steps=20, eval_every=3)
    train(ToyTask(full))
    cut = _cfg(tmp_path / "cut", max_steps=9, eval_every=3)
    train(ToyTask(cut))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 9
    cut.max_steps = 20
    assert train(ToyTask(cut), resume=True)["steps"] == 20
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name

    blind = _cfg(tmp_path / "blind", max_steps=9, eval_every=3)
    train(ToyTask(blind))
    ckpt = load_checkpoint(tmp_path / "blind" / "last.pt")
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "version", "digest", "task_state")}
    save_checkpoint(tmp_path / "blind" / "last.pt", payload, format="fastseq.toy")
    blind.max_steps = 12
    train(ToyTask(blind), resume=True)
    resumed = _losses(tmp_path / "blind")
    assert resumed[:9] == _losses(tmp_path / "full")[:9]
    assert resumed[9:12] != _losses(tmp_path / "full")[9:12]


def test_a_second_model_imports_nothing_of_seq2seq(tmp_path):
    """In a fresh interpreter: the toy task trains, and no fastseq.seq2seq module was imported."""
    code = (
        "import sys\n"
        "from toy_task import ToyConfig, ToyTask\n"
        "from fastseq.training.trainer import train\n"
        f"cfg = ToyConfig.from_dict({{'out': {str(tmp_path / 'run')!r}, 'max_steps': 3, 'threads': 1,"
        " 'progress': False})\n"
        "assert train(ToyTask(cfg))['steps'] == 3\n"
        "print(sorted(m for m in sys.modules if m.startswith('fastseq.')))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    modules = res.stdout.strip().splitlines()[-1]
    assert "fastseq.training.trainer" in modules
    assert "fastseq.seq2seq" not in modules and "fastseq.data" not in modules, modules


def test_config_sections_and_dotted_keys():
    cfg = ToyConfig.from_dict({"model": {"emb_size": 4}, "model.dropout": 0.0, "bptt": 5})
    assert cfg.model == ToyModelConfig(emb_size=4, dropout=0.0) and cfg.bptt == 5
    assert cfg.to_dict()["model"] == {"emb_size": 4, "hidden_size": 16, "dropout": 0.0}
    assert ToyConfig.from_dict({"model": None}).model == ToyModelConfig()  # "model:" left empty
    assert nest({"a.b.c": 1, "a": {"b": {"d": 2}}, "a.b.e": 3}) == {"a": {"b": {"c": 1, "d": 2, "e": 3}}}
    assert nest({"a": {"b": {"c": 1}}, "a.b.c": 2}) == {"a": {"b": {"c": 2}}}
    with pytest.raises(ValueError, match=r"config key 'model.hidden_size': expected a positive integer, got 0"):
        ToyConfig.from_dict({"model.hidden_size": 0})
    with pytest.raises(ValueError, match=r"config key 'model.emb_size': expected int, got 'x'"):
        ToyConfig.from_dict({"model": {"emb_size": "x"}})
    with pytest.raises(ValueError, match=r"'hidden_size' is a key of the 'model' section: model.hidden_size"):
        ToyConfig.from_dict({"hidden_size": 3})
    with pytest.raises(ValueError, match=r"'model.epochs'\].*not a key of the 'model' section"):
        ToyConfig.from_dict({"model.epochs": 3})
    with pytest.raises(ValueError, match=r"config key 'lr.x': 'lr' is 0.1, not a section"):
        nest({"lr": 0.1, "lr.x": 1})
    with pytest.raises(ValueError, match="empty name"):
        nest({"model.": 1})
    with pytest.raises(ValueError, match=r"'best_metric': expected one of \('val_loss', 'val_ppl'\)"):
        ToyConfig.from_dict({"best_metric": "val_bleu"})
    cfg = ToyConfig.from_dict({})
    cfg.model.dropout = 2.0  # changed after parsing: validate() checks the sections again
    with pytest.raises(ValueError, match="config key 'model.dropout': expected a value in"):
        cfg.validate()
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0  # the generic fields alone
