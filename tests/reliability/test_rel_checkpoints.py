"""Checkpoint faults: a writer killed at random moments, truncated and bit-flipped
files, a full disk, stale temporary files, and files that try to run code.

The writer under test is :func:`fastseq.training.checkpoint.save_checkpoint` with
``keep_previous``, exactly the call ``fastseq train`` makes for ``last.pt``.
Each kill trial forks a child that writes checkpoints in a loop and SIGKILLs it
after a random delay; every trial then checks that ``last.pt`` (and
``last.prev.pt``) load and hold a complete, self-consistent state. The counts
are printed (``pytest -s``) and quoted in the README.
"""
import errno
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from fastseq.fileio import link_atomic, remove_stale_tmp
from fastseq.seq2seq.model import CHECKPOINT_FORMAT
from fastseq.training import checkpoint as ckmod
from fastseq.training.checkpoint import digest, load_checkpoint, save_checkpoint

KILL_TRIALS = 200
N_FLOATS = 1 << 20  # 4 MiB of tensor data per checkpoint: a write takes long enough to be hit


def _payload(step: int, n: int = N_FLOATS):
    """A checkpoint whose every part encodes ``step``, so a mix of two states is detectable."""
    return {
        "step": step,
        "model": {"w": torch.full((n,), float(step)), "b": torch.arange(step % 97, dtype=torch.int64)},
        "src_tokenizer": bytes([step % 256]) * 4096,
        "state": {"step": step, "history": [{"step": float(step)}]},
    }


def _consistent(ck) -> bool:
    step = ck["step"]
    w = ck["model"]["w"]
    return (w.numel() == N_FLOATS and bool((w == float(step)).all())
            and ck["model"]["b"].numel() == step % 97
            and ck["src_tokenizer"] == bytes([step % 256]) * 4096
            and ck["state"]["step"] == step)


def _writer(directory: str, first_step: int) -> None:  # runs in a forked child
    torch.set_num_threads(1)  # no OpenMP pool in a forked child
    out = Path(directory)
    step = first_step
    while True:
        step += 1
        save_checkpoint(out / "last.pt", _payload(step), keep_previous=out / "last.prev.pt",
                        format=CHECKPOINT_FORMAT)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_sigkill_during_save_never_corrupts_last_checkpoint(tmp_path):
    """KILL_TRIALS writers are SIGKILLed at random moments (uniform over ~4
    writes); after each, last.pt and last.prev.pt load with a matching digest and
    hold one complete state each, last.prev.pt the same or an older one."""
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    t0 = time.perf_counter()
    save_checkpoint(tmp_path / "probe.pt", _payload(1), format=CHECKPOINT_FORMAT)
    write_s = time.perf_counter() - t0
    (tmp_path / "probe.pt").unlink()
    step = 0
    mid_write = corrupted = no_file = 0
    for _ in range(KILL_TRIALS):
        proc = ctx.Process(target=_writer, args=(str(tmp_path), step))
        proc.start()
        time.sleep(rng.uniform(0, 4 * write_s))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        stale = list(tmp_path.glob(".*.tmp"))
        mid_write += bool(stale)
        if not (tmp_path / "last.pt").exists():
            no_file += 1  # killed before the first write finished
            continue
        try:
            last = load_checkpoint(tmp_path / "last.pt")
            ok = _consistent(last)
            if (tmp_path / "last.prev.pt").exists():
                prev = load_checkpoint(tmp_path / "last.prev.pt")
                ok = ok and _consistent(prev) and prev["step"] <= last["step"]
        except ValueError:
            ok = False
        corrupted += not ok
        step = last["step"] if ok else step
        remove_stale_tmp(tmp_path)  # what the trainer does when it starts
    print(f"\n{KILL_TRIALS} SIGKILL trials (one write ~{write_s * 1e3:.0f} ms): {mid_write} killed "
          f"mid-write (temporary file left), {no_file} before the first write, "
          f"{corrupted} corrupted last.pt/last.prev.pt; last step {step}")
    assert corrupted == 0
    assert mid_write >= KILL_TRIALS // 10, "too few kills landed inside a write to mean anything"
    assert not list(tmp_path.glob(".*.tmp"))


def _real_checkpoint(path: Path) -> None:
    """A small but real seq2seq checkpoint (model, tokenizers, metadata)."""
    from fastseq.seq2seq.model import ModelConfig, Seq2Seq

    cfg = ModelConfig(src_vocab_size=50, tgt_vocab_size=40, emb_size=8, enc_hidden_size=8,
                      dec_hidden_size=8, attn_size=8, readout_size=8)
    model = Seq2Seq(cfg)
    save_checkpoint(path, {"model_config": cfg.to_dict(), "model": model.state_dict(),
                           "src_tokenizer": b"\x01\x02" * 300, "tgt_tokenizer": b"\x03" * 200,
                           "step": 7, "epoch": 1, "metrics": {"val_bleu": 12.5}}, format=CHECKPOINT_FORMAT)


def test_truncated_and_bit_flipped_checkpoints_are_rejected(tmp_path):
    """Every truncation is a clear ValueError naming the file; every single-bit
    flip is either rejected or loads content-identical (a byte torch.load
    ignores); none loads different numbers. The good file beside stays loadable."""
    good = tmp_path / "good.pt"
    _real_checkpoint(good)
    data = good.read_bytes()
    reference = load_checkpoint(good)
    rng = random.Random(1)
    bad = tmp_path / "bad.pt"
    truncations = sorted(rng.sample(range(len(data)), 60)) + [0, 1, len(data) - 1]
    for n in truncations:
        bad.write_bytes(data[:n])
        with pytest.raises(ValueError, match=f"checkpoint {bad}"):
            load_checkpoint(bad)
    rejected = identical = 0
    flips = 300
    for _ in range(flips):
        b = bytearray(data)
        pos = rng.randrange(len(b))
        b[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(b))
        try:
            ck = load_checkpoint(bad)
        except ValueError as exc:
            assert str(bad) in str(exc)
            rejected += 1
            continue
        assert digest(ck) == digest(reference), f"bit flip at byte {pos} loaded different contents"
        identical += 1
    print(f"\n{len(truncations)} truncations rejected; {flips} bit flips: {rejected} rejected, "
          f"{identical} loaded identical contents, 0 loaded different contents")
    assert digest(load_checkpoint(good)) == digest(reference)


def test_torch_load_alone_misses_a_flip_the_digest_catches(tmp_path):
    """Why the digest exists: torch.load does not check CRCs, so a flipped bit in
    tensor data loads as another number."""
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(1000)}}, format=CHECKPOINT_FORMAT)
    data = bytearray(path.read_bytes())
    offset = bytes(data).find(bytes(4000))  # the tensor's zero bytes
    assert offset > 0
    data[offset + 2] ^= 0x40
    path.write_bytes(bytes(data))
    raw = torch.load(path, weights_only=True)
    assert raw["model"]["w"].abs().sum() > 0  # torch.load: silently different
    with pytest.raises(ValueError, match="is corrupted: its contents do not match the digest"):
        load_checkpoint(path)


def test_a_full_disk_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC halfway through a write: the error says so, the previous file is
    untouched and loadable, and no temporary file is left."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(3, n=1000), format=CHECKPOINT_FORMAT)
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckmod.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, _payload(4, n=1000), keep_previous=tmp_path / "last.prev.pt",
                        format=CHECKPOINT_FORMAT)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_stale_temporary_files_are_removed(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".best.pt.999.tmp").write_bytes(b"half")
    (tmp_path / "keep.tmp").write_bytes(b"user file")  # not ours: no leading dot
    assert remove_stale_tmp(tmp_path / "last.pt") == 1
    assert remove_stale_tmp(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp"]


def test_relinking_best_to_the_same_checkpoint_leaves_no_temporary_file(tmp_path):
    """best.pt pointed again at the step checkpoint it already names (the best did not
    change): rename(2) of one link over another of the same file does nothing, so the
    temporary link must be removed by hand."""
    (tmp_path / "step-1.pt").write_bytes(b"one")
    (tmp_path / "step-2.pt").write_bytes(b"two")
    for src in ("step-1.pt", "step-1.pt", "step-2.pt", "step-2.pt"):
        link_atomic(tmp_path / src, tmp_path / "best.pt")
        assert (tmp_path / "best.pt").read_bytes() == (tmp_path / src).read_bytes()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "step-1.pt", "step-2.pt"]


class _Exploit:
    """Pickles to a call of os.system: what a malicious checkpoint would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_cannot_run_code(tmp_path):
    """A file whose pickle calls os.system is refused by weights_only loading,
    with a clear error; the command never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": ckmod.VERSION, "model": _Exploit(marker)}, path)
    with pytest.raises(ValueError, match=f"checkpoint {path} cannot be read"):
        load_checkpoint(path)
    from fastseq.seq2seq.translate import Translator

    with pytest.raises(ValueError, match="cannot be read"):
        Translator.from_checkpoint(path, device="cpu")
    assert not marker.exists()


def test_checkpoint_of_another_format_or_version_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="is not a fastseq checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="is not a fastseq.seq2seq checkpoint"):
        load_checkpoint(path, format=CHECKPOINT_FORMAT)
    # Another model's checkpoint: readable as a checkpoint, refused where a seq2seq one is needed.
    save_checkpoint(path, {"model": {"w": torch.zeros(2)}}, format="fastseq.lm")
    assert load_checkpoint(path)["format"] == "fastseq.lm"
    with pytest.raises(ValueError, match=r"is not a fastseq.seq2seq checkpoint \(it is a fastseq.lm checkpoint\)"):
        load_checkpoint(path, format=CHECKPOINT_FORMAT)
    from fastseq.seq2seq.translate import Translator

    with pytest.raises(ValueError, match="is not a fastseq.seq2seq checkpoint"):
        Translator.from_checkpoint(path, device="cpu")
    with pytest.raises(ValueError, match="expected a name starting with 'fastseq.'"):
        save_checkpoint(path, {}, format="seq2seq")
    torch.save({"format": CHECKPOINT_FORMAT, "version": 99}, path)
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no file at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_of_the_previous_layout_translates(tmp_path):
    """A checkpoint as fastseq wrote it before fastseq.training (flat train_config with the
    model's keys, model_config with the vocabulary sizes first, the same digest) loads for
    translate/evaluate, with the same weights."""
    from fastseq.seq2seq.model import ModelConfig, Seq2Seq
    from fastseq.seq2seq.translate import Translator

    torch.manual_seed(0)
    cfg = ModelConfig(src_vocab_size=50, tgt_vocab_size=40, emb_size=8, enc_hidden_size=8,
                      dec_hidden_size=8, attn_size=8, readout_size=8)
    old_model_config = {"src_vocab_size": 50, "tgt_vocab_size": 40, "emb_size": 8, "enc_hidden_size": 8,
                        "dec_hidden_size": 8, "attn_size": 8, "enc_layers": 1, "rnn_type": "gru",
                        "readout_size": 8, "dropout": 0.3}
    old_train_config = {"corpus": "multi30k", "src_lang": "de", "tgt_lang": "en", "out": "runs/x",
                        "src_vocab_size": 50, "tgt_vocab_size": 40, "emb_size": 8, "dropout": 0.3,
                        "epochs": 1, "lr": 0.001}
    model = Seq2Seq(cfg)
    from fastseq.data.tokenizer import train_tokenizer

    words = "ein hund eine katze der mann die frau läuft spielt im park".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(i % 5 + 2)) for i in range(200)]
    tok = train_tokenizer(lines, 40, "bpe", cache_dir=tmp_path)
    full = {"format": "fastseq.seq2seq", "version": 1, "model_config": old_model_config,
            "train_config": old_train_config, "model": model.state_dict(),
            "src_tokenizer": tok.to_bytes(), "tgt_tokenizer": tok.to_bytes(), "step": 3, "epoch": 0,
            "metrics": {"step": 3, "val_loss": 4.0, "val_bleu": 1.0}}
    full["digest"] = digest(full)
    torch.save(full, tmp_path / "old.pt")
    translator = Translator.from_checkpoint(tmp_path / "old.pt", device="cpu")
    assert translator.model.config == cfg
    for name, w in model.state_dict().items():
        assert torch.equal(translator.model.state_dict()[name], w), name
    assert len(translator.translate(["ein hund läuft"], method="greedy", max_len=5)) == 1
