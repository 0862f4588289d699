"""Tests of the data pipeline (fastseq.data): corpus files, tokenizers, batching."""
from __future__ import annotations

import gzip
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fastseq.data import batching as batching_mod
from fastseq.data import lines as lines_mod
from fastseq.data import tokenizer as tokenizer_mod
from fastseq.data.batching import Batch, PairDataset, TokenBatchSampler, collate, encode_pairs
from fastseq.data.corpus import load_corpus
from fastseq.data.lines import read_lines, read_parallel
from fastseq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_tokenizer

SUBSET = 2000  # training lines for the test tokenizers: enough for vocab 600, trains in < 1 s


def write_lines(path: Path, lines: list[str]) -> Path:
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text))
    else:
        path.write_bytes(text)
    return path


@pytest.fixture(scope="module")
def multi30k_pairs() -> dict[str, list[tuple[str, str]]]:
    corpus = load_corpus("multi30k")
    return {split: corpus.read(split) for split in corpus.splits}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spm")


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def tokenizers(request, multi30k_pairs, cache_dir) -> tuple[Tokenizer, Tokenizer]:
    train = multi30k_pairs["train"][:SUBSET]
    src_tok = train_tokenizer([s for s, _ in train], 600, request.param, cache_dir)
    tgt_tok = train_tokenizer([t for _, t in train], 500, request.param, cache_dir)
    return src_tok, tgt_tok


# --------------------------------------------------------------------------- corpus loading


def test_multi30k_split_sizes(multi30k_pairs):
    sizes = {split: len(pairs) for split, pairs in multi30k_pairs.items()}
    assert sizes == {"train": 29000, "val": 1014, "test": 1000}
    assert multi30k_pairs["train"][0] == (
        "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
        "Two young, White males are outside near many bushes.",
    )
    assert all(s == s.strip() and t == t.strip() for s, t in multi30k_pairs["train"])


def test_multi30k_reverse_direction():
    corpus = load_corpus("multi30k", src_lang="en", tgt_lang="de")
    src_path, tgt_path = corpus.splits["test"]
    assert (src_path.name, tgt_path.name) == ("test2016.en.gz", "test2016.de.gz")


def test_directory_corpus_normalises_split_names(tmp_path):
    write_lines(tmp_path / "train.de.gz", ["a", "b"])
    write_lines(tmp_path / "train.en", ["A", "B"])
    write_lines(tmp_path / "dev.de", ["c"])
    write_lines(tmp_path / "dev.en", ["C"])
    corpus = load_corpus(str(tmp_path))
    assert set(corpus.splits) == {"train", "val"}
    assert corpus.read("train") == [("a", "A"), ("b", "B")]
    assert corpus.read("val") == [("c", "C")]
    with pytest.raises(KeyError, match="test"):
        corpus.read("test")


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_corpus(str(missing))


def test_missing_train_split(tmp_path):
    write_lines(tmp_path / "test.de", ["a"])
    write_lines(tmp_path / "test.en", ["A"])
    with pytest.raises(FileNotFoundError, match=r"train\.de\[\.gz\] and train\.en\[\.gz\]"):
        load_corpus(str(tmp_path))


def test_missing_one_side(tmp_path):
    write_lines(tmp_path / "train.de", ["a"])
    with pytest.raises(FileNotFoundError, match=r"train\.en or train\.en\.gz"):
        load_corpus(str(tmp_path))


def test_ambiguous_split(tmp_path):
    for stem in ("train", "val", "dev"):
        write_lines(tmp_path / f"{stem}.de", ["a"])
        write_lines(tmp_path / f"{stem}.en", ["A"])
    with pytest.raises(ValueError, match="ambiguous"):
        load_corpus(str(tmp_path))


def test_read_lines_strips_and_splits_on_newline_only(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(" a \n\nb\u2028c\n".encode("utf-8"))
    assert read_lines(path) == ["a", "", "b\u2028c"]
    path.write_bytes(b"a\nb")
    assert read_lines(path) == ["a", "b"]
    path.write_bytes(b"")
    assert read_lines(path) == []


@pytest.mark.parametrize("name", ["bad.txt", "bad.txt.gz"])
def test_invalid_utf8_names_file_and_line(tmp_path, name):
    raw = "ok\nstill ok\n".encode("utf-8") + b"bad \xff byte\nok\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(ValueError, match=rf"{name}: invalid UTF-8 on line 3"):
        read_lines(path)


def test_mismatched_line_counts_names_counts_and_files(tmp_path):
    src = write_lines(tmp_path / "a.de", ["1", "2", "3"])
    tgt = write_lines(tmp_path / "b.en", ["1", "2"])
    with pytest.raises(ValueError) as info:
        read_parallel(src, tgt)
    message = str(info.value)
    assert "3 lines" in message and "2 lines" in message
    assert str(src) in message and str(tgt) in message


def test_read_parallel_drops_empty_pairs_and_limits_lines(tmp_path, caplog):
    src = write_lines(tmp_path / "a.de", ["eins", "", "drei", "vier"])
    tgt = write_lines(tmp_path / "a.en", ["one", "two", " ", "four"])
    with caplog.at_level(logging.WARNING, logger=lines_mod.__name__):
        assert read_parallel(src, tgt) == [("eins", "one"), ("vier", "four")]
    assert "dropped 2 of 4 pairs" in caplog.text
    assert read_parallel(src, tgt, max_lines=1) == [("eins", "one")]


# --------------------------------------------------------------------------- tokenizers


def test_special_ids(tokenizers):
    src_tok, _ = tokenizers
    assert (src_tok.pad_id, src_tok.unk_id, src_tok.bos_id, src_tok.eos_id) == (0, 1, 2, 3)
    assert src_tok.vocab_size == 600
    sentence = "Ein Mann fährt Fahrrad."
    ids = src_tok.encode(sentence)
    assert not {PAD_ID, BOS_ID, EOS_ID} & set(ids)
    assert src_tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID]) == sentence
    assert src_tok.decode(torch.tensor(ids)) == sentence


def test_round_trip(tokenizers, multi30k_pairs):
    src_tok, tgt_tok = tokenizers
    val = multi30k_pairs["val"][:200]
    for tok, sentences in ((src_tok, [s for s, _ in val]), (tgt_tok, [t for _, t in val])):
        # Training normalises non-breaking and repeated spaces; these sentences have none.
        sentences = [s for s in sentences if "\xa0" not in s and "  " not in s]
        assert [tok.decode(tok.encode(s)) for s in sentences] == sentences
        assert tok.encode_batch(sentences) == [tok.encode(s) for s in sentences]


def test_bytes_and_pickle_round_trip(tokenizers, multi30k_pairs):
    src_tok, _ = tokenizers
    sentences = [s for s, _ in multi30k_pairs["test"][:100]]
    for copy in (Tokenizer.from_bytes(src_tok.to_bytes()), pickle.loads(pickle.dumps(src_tok))):
        assert copy.to_bytes() == src_tok.to_bytes()
        assert copy.encode_batch(sentences) == src_tok.encode_batch(sentences)


def test_cache_hit_does_not_retrain(tmp_path, monkeypatch):
    lines = [t for _, t in load_corpus("multi30k").read("val")]
    first = train_tokenizer(lines, 300, "bpe", cache_dir=tmp_path)
    (cache_file,) = tmp_path.iterdir()  # only the model: no temporary file left behind
    assert cache_file.name.startswith("bpe300-") and cache_file.suffix == ".model"
    mtime = cache_file.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("cache miss: the tokenizer was retrained")

    monkeypatch.setattr(tokenizer_mod, "_train_sentencepiece", fail)
    second = train_tokenizer(list(lines), 300, "bpe", cache_dir=tmp_path)
    assert second.to_bytes() == first.to_bytes()
    assert cache_file.stat().st_mtime_ns == mtime
    for changed in ({"vocab_size": 310}, {"model_type": "unigram"}, {"character_coverage": 0.99}):
        kwargs = {"vocab_size": 300, "model_type": "bpe", **changed}
        with pytest.raises(AssertionError, match="cache miss"):
            train_tokenizer(lines, cache_dir=tmp_path, **kwargs)
    with pytest.raises(AssertionError, match="cache miss"):
        train_tokenizer(lines[:-1], 300, "bpe", cache_dir=tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSEQ_CACHE", str(tmp_path))
    assert tokenizer_mod.default_cache_dir() == tmp_path / "spm"
    monkeypatch.delenv("FASTSEQ_CACHE")
    assert tokenizer_mod.default_cache_dir() == Path.home() / ".cache" / "fastseq" / "spm"


def test_unknown_model_type():
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(["a b c"], 10, "word")


# --------------------------------------------------------------------------- batching


def test_encode_pairs_adds_special_ids_and_filters(tokenizers, caplog):
    src_tok, tgt_tok = tokenizers
    pairs = [("Ein Hund.", "A dog."), ("Ein sehr, sehr, sehr großer Hund rennt.", "A dog runs.")]
    encoded = encode_pairs(pairs, src_tok, tgt_tok)
    (src_ids, tgt_ids), _ = encoded
    assert src_ids == src_tok.encode("Ein Hund.") + [EOS_ID]
    assert tgt_ids == [BOS_ID] + tgt_tok.encode("A dog.") + [EOS_ID]
    max_len = len(encoded[1][0]) - 1
    with caplog.at_level(logging.INFO, logger=batching_mod.__name__):
        assert encode_pairs(pairs, src_tok, tgt_tok, max_len=max_len) == encoded[:1]
    assert "dropped 1 of 2 pairs" in caplog.text


@pytest.fixture
def lengths() -> np.ndarray:
    return np.random.default_rng(0).integers(1, 60, size=1000)


def test_sampler_covers_every_index_once_within_budget(lengths):
    sampler = TokenBatchSampler(lengths, max_tokens=300, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert all(len(batch) * lengths[batch].max() <= 300 for batch in batches)


def test_sampler_is_deterministic_per_seed_and_epoch(lengths):
    def epoch_batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = TokenBatchSampler(lengths, max_tokens=300, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(0, 3) == epoch_batches(0, 3)
    assert epoch_batches(0, 3) != epoch_batches(0, 4)
    assert epoch_batches(0, 3) != epoch_batches(1, 3)


def test_sampler_without_shuffle_is_sorted_and_fixed(lengths):
    sampler = TokenBatchSampler(lengths, max_tokens=300, shuffle=False)
    batches = list(sampler)
    sampler.set_epoch(5)
    assert list(sampler) == batches
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert np.all(np.diff(lengths[flat]) >= 0)


def test_sampler_rejects_example_over_budget():
    with pytest.raises(ValueError, match="example 2 has 9 tokens"):
        TokenBatchSampler([1, 2, 9], max_tokens=8)


def test_collate_shapes_and_padding():
    examples = [
        (7, [5, 6, EOS_ID], [BOS_ID, 8, EOS_ID]),
        (3, [5, EOS_ID], [BOS_ID, 8, 9, 10, EOS_ID]),
    ]
    batch = collate(examples)
    assert batch.src.tolist() == [[5, 6, EOS_ID], [5, EOS_ID, PAD_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 8, PAD_ID, PAD_ID], [BOS_ID, 8, 9, 10]]
    assert batch.tgt_out.tolist() == [[8, EOS_ID, PAD_ID, PAD_ID], [8, 9, 10, EOS_ID]]
    assert batch.src_lengths.tolist() == [3, 2]
    assert batch.tgt_lengths.tolist() == [2, 4]
    assert batch.indices.tolist() == [7, 3]
    assert batch.num_tgt_tokens == 6
    for tensor in (batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_out, batch.indices):
        assert tensor.dtype == torch.int64
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.tgt_out, batch.tgt_out)


def test_collate_rejects_empty_batch():
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_dataloader_pipeline(tokenizers, multi30k_pairs):
    src_tok, tgt_tok = tokenizers
    pairs = multi30k_pairs["val"][:300]
    dataset = PairDataset(encode_pairs(pairs, src_tok, tgt_tok))
    sampler = TokenBatchSampler(dataset.lengths(), max_tokens=500, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    decoded = {}
    for batch in loader:
        assert batch.src.numel() <= 500 and batch.tgt_in.numel() <= 500
        for index, row in zip(batch.indices.tolist(), batch.tgt_out):
            decoded[index] = tgt_tok.decode(row)
    assert sorted(decoded) == list(range(len(pairs)))
    expected = [tgt_tok.decode(tgt_tok.encode(tgt)) for _, tgt in pairs]
    assert [decoded[i] for i in range(len(pairs))] == expected
