"""Training faults: non-finite losses (skip or stop), SIGINT/SIGTERM (a final
atomic checkpoint, a clean exit, then --resume), and an unreadable last.pt
(--resume falls back to last.prev.pt).

Runs use a tiny model on a slice of Multi30k, one CPU thread; the signal tests
run ``python -m fastseq train`` as a subprocess and signal it mid-run.
"""
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastseq.seq2seq import task as task_mod
from fastseq.seq2seq.task import Seq2SeqConfig, train
from fastseq.training import trainer as trainer_mod
from fastseq.training.checkpoint import load_checkpoint
from fastseq.training.faults import TrainingError, TrainingInterrupted
from fastseq.training.runlog import read_csv

REPO = Path(__file__).resolve().parents[2]
TINY = dict(
    src_vocab_size=300, tgt_vocab_size=300,
    model=dict(emb_size=16, enc_hidden_size=24, dec_hidden_size=24, attn_size=16, readout_size=16, dropout=0.1),
    train_limit=1200, val_limit=40, test_limit=10,
    max_tokens=600, max_len=40, lr=3e-3, warmup_steps=5, epochs=2, beam_size=2, threads=1,
    val_bleu=False, progress=False,
)


def _cfg(**values) -> Seq2SeqConfig:
    return Seq2SeqConfig.from_dict(dict(TINY, **values))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tokenizers and shards shared by the runs of this module (prepared once)."""
    d = tmp_path_factory.mktemp("data") / "data"
    task_mod.prepare_data(_cfg(data_dir=str(d)))
    return str(d)


def _poison_loss(monkeypatch, bad_calls):
    """Make the training loss NaN on the given (1-based) training forward passes."""
    real = task_mod.masked_cross_entropy
    calls = {"n": 0}

    def loss_fn(logits, targets, label_smoothing=0.0):
        loss, n = real(logits, targets, label_smoothing)
        if torch.is_grad_enabled():  # training, not validation
            calls["n"] += 1
            if calls["n"] in bad_calls:
                loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(task_mod, "masked_cross_entropy", loss_fn)
    return calls


def _all_finite(model_state):
    return all(torch.isfinite(t).all() for t in model_state.values() if t.is_floating_point())


def test_nonfinite_loss_skips_the_update(tmp_path, data_dir, monkeypatch, caplog):
    """nonfinite_loss=skip: the NaN updates are dropped with a warning, the
    weights stay finite, the step count and logs only hold real updates."""
    _poison_loss(monkeypatch, {3, 4, 9})
    cfg = _cfg(data_dir=data_dir, out=str(tmp_path / "run"), max_steps=10,
                      test_limit=2)
    with caplog.at_level(logging.WARNING, logger="fastseq.training"):
        result = train(cfg)
    assert result["skipped_updates"] == 3 and result["steps"] == 10
    warnings = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(warnings) == 3 and "non-finite loss (loss nan" in warnings[0]
    rows = read_csv(tmp_path / "run" / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert all(math.isfinite(r["loss"]) for r in rows)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert _all_finite(last["model"]) and last["state"]["skipped_updates"] == 3
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_updates"] == 3


def test_nonfinite_loss_stop_policy_raises_before_updating(tmp_path, data_dir, monkeypatch):
    _poison_loss(monkeypatch, {5})
    cfg = _cfg(data_dir=data_dir, out=str(tmp_path / "run"), max_steps=10,
                      save_every=2, nonfinite_loss="stop")
    with pytest.raises(TrainingError, match=r"non-finite loss .* at update 5 .*weights were not updated.*"
                                            r"last.pt holds the last saved state"):
        train(cfg)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["step"] == 4 and _all_finite(last["model"])


def test_too_many_nonfinite_updates_in_a_row_stop(tmp_path, data_dir, monkeypatch):
    _poison_loss(monkeypatch, set(range(3, 100)))
    cfg = _cfg(data_dir=data_dir, out=str(tmp_path / "run"), max_steps=20,
                      max_skipped_updates=4)
    with pytest.raises(TrainingError, match=r"4 non-finite updates in a row \(max_skipped_updates=4\)"):
        train(cfg)


def test_nonfinite_config_values_are_checked():
    with pytest.raises(ValueError, match="'nonfinite_loss': expected one of"):
        Seq2SeqConfig.from_dict({"nonfinite_loss": "ignore"})
    with pytest.raises(ValueError, match="'max_skipped_updates': expected > 0"):
        Seq2SeqConfig.from_dict({"max_skipped_updates": 0})


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _steps(out: Path):
    path = out / "train_log.csv"
    return [int(r["step"]) for r in read_csv(path)] if path.is_file() else []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_final_checkpoint_and_exits_cleanly(tmp_path, data_dir, sig):
    """A signal mid-epoch: the run saves last.pt at the update it reached, exits
    with 128 + signum and a one-line message (no traceback), and --resume goes on
    from exactly there."""
    conf = tmp_path / "c.yaml"
    conf.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in
                              dict(TINY, data_dir=data_dir, max_steps=400, epochs=50).items()))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastseq", "train", "--config", str(conf), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(_steps(out)) >= 5:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, stderr[-2000:])
    assert "Traceback" not in stderr
    steps = _steps(out)
    assert 5 <= steps[-1] < 400
    assert f"interrupted by {sig.name} at step {steps[-1]}" in stderr
    last = load_checkpoint(out / "last.pt")
    assert last["step"] == steps[-1] and last["state"]["step"] == steps[-1]
    assert not list(out.glob(".*.tmp"))

    resumed = subprocess.run(cmd + ["--resume", "--max-steps", str(steps[-1] + 3), "--set", "test_limit=2"],
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _steps(out) == list(range(1, steps[-1] + 4))


def test_resume_falls_back_to_the_previous_state_when_last_is_corrupted(tmp_path, data_dir, caplog):
    cfg = _cfg(data_dir=data_dir, out=str(tmp_path / "run"), max_steps=6, save_every=4,
                      eval_every=100, test_limit=2)
    train(cfg)
    out = tmp_path / "run"
    prev_step = load_checkpoint(out / "last.prev.pt")["step"]
    assert prev_step == 4  # saved at step 4; last.pt at the final step 6
    data = bytearray((out / "last.pt").read_bytes())
    (out / "last.pt").write_bytes(bytes(data[: len(data) // 2]))  # truncated
    cfg.max_steps = 8
    with caplog.at_level(logging.WARNING, logger="fastseq.training"):
        result = train(cfg, resume=True)
    assert any("resuming from" in r.getMessage() and "last.prev.pt" in r.getMessage()
               and "cannot be read" in r.getMessage() for r in caplog.records)
    assert result["steps"] == 8
    assert [int(r["step"]) for r in read_csv(out / "train_log.csv")] == list(range(1, 9))
    # Both damaged: a clear error naming both files.
    for name in ("last.pt", "last.prev.pt"):
        (out / name).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"--resume: no usable checkpoint: .*last.pt.*last.prev.pt"):
        train(cfg, resume=True)


def _to_previous_layout(path: Path) -> None:
    """Rewrite a last.pt the way fastseq wrote it before fastseq.training: a flat
    train_config (the model's keys at the top level), model_config in the old field
    order (vocabulary sizes first), no task_state."""
    from fastseq.training.checkpoint import save_checkpoint

    ckpt = load_checkpoint(path)
    flat = {k: v for k, v in ckpt["train_config"].items() if k != "model"}
    flat.update(ckpt["train_config"]["model"])
    mc = ckpt["model_config"]
    old_mc = {"src_vocab_size": mc["src_vocab_size"], "tgt_vocab_size": mc["tgt_vocab_size"],
              **{k: v for k, v in mc.items() if not k.endswith("_vocab_size")}}
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "version", "digest", "task_state")}
    payload.update(train_config=flat, model_config=old_mc)
    save_checkpoint(path, payload, format="fastseq.seq2seq")


def test_resume_from_a_last_pt_of_the_previous_layout(tmp_path, data_dir):
    """A last.pt written before the shared training package (flat train_config, no
    task_state) resumes, on exactly the trajectory of an uninterrupted run."""
    full = _cfg(data_dir=data_dir, out=str(tmp_path / "full"), max_steps=6, eval_every=2, test_limit=2)
    train(full)
    cut = _cfg(data_dir=data_dir, out=str(tmp_path / "cut"), max_steps=4, eval_every=2, test_limit=2)
    train(cut)
    _to_previous_layout(tmp_path / "cut" / "last.pt")
    assert "task_state" not in load_checkpoint(tmp_path / "cut" / "last.pt")
    cut.max_steps = 6
    assert train(cut, resume=True)["steps"] == 6
    rows = [read_csv(tmp_path / run / "train_log.csv") for run in ("full", "cut")]
    assert [(r["step"], r["loss"]) for r in rows[0]] == [(r["step"], r["loss"]) for r in rows[1]]
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("full", "cut"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_interrupt_in_process_raises_after_saving(tmp_path, data_dir, monkeypatch):
    """The library call (not the CLI): a SIGTERM delivered during an update makes
    train() save last.pt and raise TrainingInterrupted carrying the step."""
    real_update = trainer_mod.Trainer._update
    calls = {"n": 0}

    def update(self, micro):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by fastseq's handler
        return real_update(self, micro)

    monkeypatch.setattr(trainer_mod.Trainer, "_update", update)
    cfg = _cfg(data_dir=data_dir, out=str(tmp_path / "run"), max_steps=10)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg)
    assert info.value.signum == signal.SIGTERM and info.value.step == 3
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def _worker_pid(parent: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (Linux /proc)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise LookupError(f"no worker with RANK={rank} under pid {parent}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigterm_to_one_torchrun_worker_stops_every_rank_at_the_same_update(tmp_path, data_dir):
    """Under torchrun (2 gloo processes), SIGTERM reaching only rank 1 is shared at
    the next update: both ranks stop together, rank 0 writes last.pt for that
    update, and a --resume run continues from it."""
    conf = tmp_path / "c.yaml"
    conf.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in
                              dict(TINY, data_dir=data_dir, max_steps=400, epochs=50).items()))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastseq", "train", "--config", str(conf), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(_steps(out)) >= 4:
            os.kill(_worker_pid(proc.pid, 1), signal.SIGTERM)
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0  # torchrun reports its workers' non-zero exits
    steps = _steps(out)
    assert 4 <= steps[-1] < 400
    # Both ranks print it, for the same update; rank 0 gathered both ranks' RNG states.
    assert stderr.count(f"interrupted by SIGTERM at step {steps[-1]};") == 2, stderr[-3000:]
    last = load_checkpoint(out / "last.pt")
    assert last["step"] == steps[-1] and last["world_size"] == 2 and len(last["rng"]) == 2

    resumed = subprocess.run(cmd + ["--resume", "--max-steps", str(steps[-1] + 2), "--set", "test_limit=2"],
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _steps(out) == list(range(1, steps[-1] + 3))
