"""Tests of the large-corpus data path: streaming reads, sampling, shards, streamed batches."""
from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastseq.data import batching as batching_mod
from fastseq.data import lines as lines_mod
from fastseq.data import shards as shards_mod
from fastseq.data.batching import StreamingBatches, TokenBatchSampler, collate, encode_pairs
from fastseq.data.corpus import load_corpus
from fastseq.data.lines import iter_lines, iter_parallel, read_parallel, sample_lines
from fastseq.data.shards import ShardedCorpus, preprocess
from fastseq.data.tokenizer import Tokenizer, train_tokenizer

NUM_PAIRS = 2000  # Multi30k training pairs for the batching tests


def write_lines(path: Path, lines: list[str], final_newline: bool = True) -> Path:
    text = "\n".join(lines) + ("\n" if final_newline and lines else "")
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return load_corpus("multi30k").read("train", max_lines=NUM_PAIRS)


@pytest.fixture(scope="module")
def tokenizers(pairs, tmp_path_factory) -> tuple[Tokenizer, Tokenizer]:
    cache_dir = tmp_path_factory.mktemp("spm")
    src_tok = train_tokenizer([s for s, _ in pairs], 200, cache_dir=cache_dir)
    tgt_tok = train_tokenizer([t for _, t in pairs], 150, cache_dir=cache_dir)
    return src_tok, tgt_tok


@pytest.fixture(scope="module")
def small_files(pairs, tmp_path_factory) -> tuple[Path, Path]:
    """60 lines of Multi30k with empty sides at lines 5 (src), 12 (tgt), 20 (both); gzip src."""
    directory = tmp_path_factory.mktemp("small")
    src = [s for s, _ in pairs[:60]]
    tgt = [t for _, t in pairs[:60]]
    src[4], tgt[11], src[19], tgt[19] = "", "  ", "", ""
    return write_lines(directory / "c.de.gz", src), write_lines(directory / "c.en", tgt)


@pytest.fixture(scope="module")
def corpus(pairs, tokenizers, tmp_path_factory) -> ShardedCorpus:
    """NUM_PAIRS pairs in 7 shards (6 of 300 and one of 200)."""
    directory = tmp_path_factory.mktemp("corpus")
    src_path = write_lines(directory / "train.de", [s for s, _ in pairs])
    tgt_path = write_lines(directory / "train.en", [t for _, t in pairs])
    return preprocess(src_path, tgt_path, *tokenizers, directory / "shards", shard_size=300,
                      chunk_size=128, progress=False)


@pytest.fixture(scope="module")
def encoded(pairs, tokenizers) -> list[tuple[list[int], list[int]]]:
    return encode_pairs(pairs, *tokenizers)


def read_back(corpus: ShardedCorpus) -> list[tuple[list[int], list[int]]]:
    examples = []
    for i in range(corpus.num_shards):
        shard = corpus.open_shard(i)
        examples += [tuple(ids.tolist() for ids in shard.example(j)) for j in range(len(shard))]
    return examples


def batch_indices(batches: StreamingBatches, epoch: int, **kwargs) -> list[tuple[int, list[int]]]:
    return [(g, batch.indices.tolist()) for g, batch in batches.iterate(epoch, **kwargs)]


# --------------------------------------------------------------------------- streaming reads


def test_iter_parallel_streams_every_line(tmp_path):
    src = write_lines(tmp_path / "a.gz", ["  eins ", "", "drei"], final_newline=False)
    tgt = write_lines(tmp_path / "b", ["one", "two\r", " "])
    assert list(iter_parallel(src, tgt)) == [(1, "eins", "one"), (2, "", "two"), (3, "drei", "")]
    empty = write_lines(tmp_path / "empty", [])
    assert list(iter_parallel(empty, empty)) == []


def test_iter_lines_streams_one_file_across_blocks(tmp_path, monkeypatch):
    """The one-file reader (a language model's corpus): same splitting and stripping as
    iter_parallel, line numbers across blocks, errors naming the file and the line."""
    monkeypatch.setattr(lines_mod, "LINE_BLOCK", 3)
    path = write_lines(tmp_path / "t.gz", [" a ", "", "c\r", "d", "e"], final_newline=False)
    assert list(iter_lines(path)) == [(1, "a"), (2, ""), (3, "c"), (4, "d"), (5, "e")]
    assert list(iter_lines(write_lines(tmp_path / "empty", []))) == []
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a\nb\nc\nd\n\xff e\n")
    with pytest.raises(ValueError, match=rf"{bad}: invalid UTF-8 on line 5"):
        list(iter_lines(bad))
    with pytest.raises(FileNotFoundError):
        next(iter_lines(tmp_path / "missing.txt"))


@pytest.mark.parametrize("src_count, tgt_count", [(5, 3), (3, 5), (0, 2)])
def test_iter_parallel_length_mismatch(tmp_path, src_count, tgt_count):
    src = write_lines(tmp_path / "x.de", [f"s{i}" for i in range(src_count)])
    tgt = write_lines(tmp_path / "x.en.gz", [f"t{i}" for i in range(tgt_count)])
    expected = f"{src_count} lines in {src} but {tgt_count} lines in {tgt}"
    with pytest.raises(ValueError, match="differ in length") as info:
        list(iter_parallel(src, tgt))
    assert expected in str(info.value)


def test_iter_parallel_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(lines_mod, "LINE_BLOCK", 3)
    src = write_lines(tmp_path / "s.gz", [f"s{i}" for i in range(1, 11)], final_newline=False)
    tgt = write_lines(tmp_path / "t", [f"t{i}" for i in range(1, 11)])
    assert list(iter_parallel(src, tgt)) == [(i, f"s{i}", f"t{i}") for i in range(1, 11)]
    short = write_lines(tmp_path / "short", [f"t{i}" for i in range(1, 8)])
    with pytest.raises(ValueError, match=f"10 lines in {src} but 7 lines in {short}"):
        list(iter_parallel(src, short))
    bad = tmp_path / "bad"
    bad.write_bytes(b"".join(b"t%d\n" % i for i in range(1, 8)) + b"\xc3\n" + b"t9\nt10\n")
    with pytest.raises(ValueError, match=f"{bad}: invalid UTF-8 on line 8"):
        list(iter_parallel(src, bad))


def test_iter_parallel_invalid_utf8(tmp_path):
    src = write_lines(tmp_path / "ok.de", ["a", "b", "c"])
    tgt = tmp_path / "bad.en"
    tgt.write_bytes(b"a\nb\n\xff c\n")
    with pytest.raises(ValueError, match=rf"{tgt}: invalid UTF-8 on line 3"):
        list(iter_parallel(src, tgt))


@pytest.mark.parametrize("block", [64, lines_mod.LINE_BLOCK])
def test_sample_lines(tmp_path, monkeypatch, block):
    monkeypatch.setattr(lines_mod, "LINE_BLOCK", block)
    lines = [f"line {i}" for i in range(1000)]
    path = write_lines(tmp_path / "l.gz", [line if i % 10 else "" for i, line in enumerate(lines)])
    non_empty = {line for i, line in enumerate(lines) if i % 10}
    sample = sample_lines(path, 50, seed=3)
    assert len(sample) == len(set(sample)) == 50 and set(sample) <= non_empty
    assert sample == sample_lines(path, 50, seed=3)
    assert sample != sample_lines(path, 50, seed=4)
    assert sample_lines(path, 5000) == [line for i, line in enumerate(lines) if i % 10]
    assert sample_lines(path, 0) == []
    # Uniform: the mean line number over many samples is near the middle of the file.
    numbers = [int(line.split()[1]) for seed in range(40) for line in sample_lines(path, 50, seed)]
    assert abs(np.mean(numbers) - 500) < 25
    with pytest.raises(ValueError, match="n must be >= 0"):
        sample_lines(path, -1)


# --------------------------------------------------------------------------- preprocessing


def test_round_trip_equals_encode_pairs(small_files, tokenizers, tmp_path):
    src_path, tgt_path = small_files
    out = tmp_path / "out"
    corpus = preprocess(src_path, tgt_path, *tokenizers, out, shard_size=7, chunk_size=5,
                        progress=False)
    expected = encode_pairs(read_parallel(src_path, tgt_path), *tokenizers)
    assert corpus.num_pairs == len(expected) == 57
    assert corpus.num_shards == 9  # 8 * 7 + 1
    assert read_back(corpus) == expected

    meta = json.loads((out / "meta.json").read_text())
    assert meta == corpus.meta
    assert (meta["format"], meta["version"], meta["dtype"]) == ("fastseq.shards", 1, "uint16")
    assert (meta["lines_read"], meta["dropped_empty"], meta["dropped_too_long"]) == (60, 3, 0)
    assert [s["num_pairs"] for s in meta["shards"]] == [7] * 8 + [1]
    assert meta["source_files"] == [str(src_path), str(tgt_path)]
    assert (meta["src_vocab_size"], meta["tgt_vocab_size"]) == tuple(
        tok.vocab_size for tok in tokenizers)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the temporary directory is gone

    offsets = np.load(out / "shard-00003.offsets.npy", mmap_mode="r")
    src = np.load(out / "shard-00003.src.npy", mmap_mode="r")
    assert isinstance(offsets, np.memmap) and offsets.dtype == np.int64
    assert offsets.shape == (8, 2) and offsets[0].tolist() == [0, 0]
    assert src.dtype == np.uint16 and len(src) == offsets[-1, 0] == meta["shards"][3]["src_tokens"]
    src_ids, tgt_ids = corpus.open_shard(3).example(2)
    assert (src_ids.tolist(), tgt_ids.tolist()) == expected[3 * 7 + 2]
    lengths = corpus.shard_lengths(3)
    assert lengths.dtype == np.int64
    assert lengths.tolist() == [max(map(len, pair)) for pair in expected[21:28]]


def test_max_len_drops_and_counts(small_files, tokenizers, tmp_path, caplog):
    src_path, tgt_path = small_files
    pairs = read_parallel(src_path, tgt_path)
    all_pairs = encode_pairs(pairs, *tokenizers)
    max_len = int(np.median([max(map(len, pair)) for pair in all_pairs]))
    expected = encode_pairs(pairs, *tokenizers, max_len=max_len)
    assert 0 < len(expected) < len(all_pairs)
    with caplog.at_level(logging.INFO, logger=shards_mod.__name__):
        corpus = preprocess(src_path, tgt_path, *tokenizers, tmp_path / "out", max_len=max_len,
                            shard_size=4, chunk_size=3, progress=True)
    assert read_back(corpus) == expected
    too_long = len(all_pairs) - len(expected)
    assert corpus.meta["dropped_too_long"] == too_long
    assert corpus.meta["dropped_empty"] == 3 and corpus.meta["max_len"] == max_len
    assert (f"dropped 3 pairs with an empty side and {too_long} longer than max_len={max_len}"
            in caplog.text)


def test_int32_when_a_vocabulary_exceeds_uint16(small_files, tokenizers, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "UINT16_MAX_VOCAB", 100)  # the test tokenizers have 150 and 200
    corpus = preprocess(*small_files, *tokenizers, tmp_path / "out", shard_size=10,
                        progress=False)
    assert corpus.meta["dtype"] == "int32"
    assert corpus.open_shard(0).src.dtype == np.int32
    assert read_back(corpus) == encode_pairs(read_parallel(*small_files), *tokenizers)


def test_existing_out_dir_is_refused(small_files, tokenizers, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError, match=str(out)):
        preprocess(*small_files, *tokenizers, out, progress=False)
    assert os.listdir(out) == []


def test_failure_leaves_nothing(small_files, tokenizers, tmp_path, monkeypatch):
    calls = []

    def failing_encode(self, texts):
        calls.append(len(texts))
        if len(calls) == 5:
            raise RuntimeError("encoder crashed")
        return self._sp.encode(list(texts))

    monkeypatch.setattr(Tokenizer, "encode_batch", failing_encode)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        # chunks of 5 pairs and shards of 3: shard files exist when the 3rd chunk fails
        preprocess(*small_files, *tokenizers, tmp_path / "out", shard_size=3, chunk_size=5,
                   progress=False)
    assert os.listdir(tmp_path) == []


def test_mismatched_files_leave_nothing(tokenizers, tmp_path):
    src = write_lines(tmp_path / "m.de", ["ein Hund"] * 30)
    tgt = write_lines(tmp_path / "m.en", ["a dog"] * 29)
    out_parent = tmp_path / "out"
    with pytest.raises(ValueError, match=f"30 lines in {src} but 29 lines in {tgt}"):
        preprocess(src, tgt, *tokenizers, out_parent / "shards", shard_size=4, chunk_size=4,
                   progress=False)
    assert os.listdir(out_parent) == []


def test_invalid_utf8_names_file_and_line(tokenizers, tmp_path):
    src = tmp_path / "u.de"
    src.write_bytes(b"ein Hund\nzwei\xc3\x28 Hunde\n")
    tgt = write_lines(tmp_path / "u.en", ["a dog", "two dogs"])
    with pytest.raises(ValueError, match=rf"{src}: invalid UTF-8 on line 2"):
        preprocess(src, tgt, *tokenizers, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- reading


def test_corpus_validation(corpus, tmp_path):
    meta = corpus.meta
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardedCorpus(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no meta.json"):
        ShardedCorpus(tmp_path)

    def write_meta(name: str, content: dict) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        for file in corpus.directory.iterdir():
            if file.name != "meta.json":
                os.symlink(file, directory / file.name)
        (directory / "meta.json").write_text(json.dumps(content))
        return directory

    assert ShardedCorpus(write_meta("copy", meta)).num_pairs == NUM_PAIRS
    with pytest.raises(ValueError, match="format is 'other'"):
        ShardedCorpus(write_meta("format", {**meta, "format": "other"}))
    with pytest.raises(ValueError, match="version 2"):
        ShardedCorpus(write_meta("version", {**meta, "version": 2}))
    without_dtype = {key: value for key, value in meta.items() if key != "dtype"}
    with pytest.raises(ValueError, match="missing field 'dtype'"):
        ShardedCorpus(write_meta("field", without_dtype))
    with pytest.raises(ValueError, match="num_pairs is 5 but the shards hold 2000"):
        ShardedCorpus(write_meta("count", {**meta, "num_pairs": 5}))
    renamed = [{**s, "name": "gone"} if i == 2 else s for i, s in enumerate(meta["shards"])]
    with pytest.raises(ValueError, match="shard file gone.src.npy is missing"):
        ShardedCorpus(write_meta("missing", {**meta, "shards": renamed}))
    wrong_size = [{**s, "src_tokens": 1} if i == 1 else s for i, s in enumerate(meta["shards"])]
    bad = ShardedCorpus(write_meta("size", {**meta, "shards": wrong_size}))
    with pytest.raises(ValueError, match="shard-00001.offsets.npy: offsets run from"):
        bad.open_shard(1)
    bad.open_shard(0)
    bad = ShardedCorpus(write_meta("dtype", {**meta, "dtype": "int32"}))
    with pytest.raises(ValueError, match="shard-00000.src.npy: shape .* dtype uint16, expected"):
        bad.open_shard(0)
    with pytest.raises(IndexError, match="shard 7 out of range"):
        corpus.open_shard(7)


def test_check_tokenizers(corpus, tokenizers):
    src_tok, tgt_tok = tokenizers
    corpus.check_tokenizers(src_tok, tgt_tok)
    with pytest.raises(ValueError, match="different tgt tokenizer"):
        corpus.check_tokenizers(src_tok, src_tok)
    with pytest.raises(ValueError, match="different src tokenizer"):
        corpus.check_tokenizers(tgt_tok, tgt_tok)


# --------------------------------------------------------------------------- batching


def test_streaming_covers_every_pair_once_within_budget(corpus, encoded):
    max_tokens = 400
    batches = StreamingBatches(corpus, max_tokens, seed=5)
    lengths = [max(map(len, pair)) for pair in encoded]
    seen = []
    for g, (index, batch) in enumerate(batches.iterate(0)):
        assert index == g
        rows = batch.indices.tolist()
        assert len(rows) * max(lengths[i] for i in rows) <= max_tokens
        assert len({i // 300 for i in rows}) == 1  # batches never mix shards
        seen += rows
    assert sorted(seen) == list(range(NUM_PAIRS))
    assert len(batches) == batches.num_batches == g + 1


def test_streaming_batches_equal_collate(corpus, encoded):
    for shuffle in (True, False):
        for _, batch in StreamingBatches(corpus, 300, shuffle=shuffle).iterate(2):
            rows = batch.indices.tolist()
            expected = collate([(i, *encoded[i]) for i in rows])
            for name in ("src", "src_lengths", "tgt_in", "tgt_out", "tgt_lengths", "indices"):
                actual = getattr(batch, name)
                assert actual.dtype == torch.int64 and actual.is_contiguous()
                assert torch.equal(actual, getattr(expected, name)), name


def test_streaming_is_deterministic_and_differs_between_epochs(corpus):
    batches = StreamingBatches(corpus, 500, seed=1)
    epoch0 = batch_indices(batches, 0)
    assert epoch0 == batch_indices(StreamingBatches(corpus, 500, seed=1), 0)
    epoch1 = batch_indices(batches, 1)
    assert epoch1 != epoch0 and len(epoch1) == len(epoch0) == batches.num_batches
    assert batch_indices(StreamingBatches(corpus, 500, seed=2), 0) != epoch0
    batches.set_epoch(1)
    assert [batch.indices.tolist() for batch in batches] == [rows for _, rows in epoch1]
    # Without shuffling: shards in order, ascending length within each, the same every epoch.
    ordered = StreamingBatches(corpus, 500, shuffle=False)
    flat = [i for _, rows in batch_indices(ordered, 0) for i in rows]
    assert [i // 300 for i in flat] == sorted(i // 300 for i in flat)
    assert batch_indices(ordered, 0) == batch_indices(ordered, 3)


def test_resume_and_ranks(corpus, monkeypatch):
    batches = StreamingBatches(corpus, 500, seed=1)
    full = batch_indices(batches, 4)
    n = len(full)
    for start in (0, 1, 17, n - 1, n, n + 5):
        assert batch_indices(batches, 4, start=start) == full[start:]
    for world_size in (2, 3):
        parts = [batch_indices(batches, 4, rank=r, world_size=world_size)
                 for r in range(world_size)]
        for rank, part in enumerate(parts):
            assert part == [item for item in full if item[0] % world_size == rank]
        assert sorted(item for part in parts for item in part) == full
    assert batch_indices(batches, 4, start=30, rank=1, world_size=3) == [
        item for item in full[30:] if item[0] % 3 == 1]

    # Skipped batches are never collated; shards with nothing to yield are never opened.
    opened, collated = [], []
    open_shard, collate_shard = ShardedCorpus.open_shard, batching_mod._collate_shard
    monkeypatch.setattr(ShardedCorpus, "open_shard",
                        lambda self, i: opened.append(i) or open_shard(self, i))
    monkeypatch.setattr(batching_mod, "_collate_shard",
                        lambda shard, rows: collated.append(rows) or collate_shard(shard, rows))
    tail = batch_indices(batches, 4, start=n - 3, rank=0, world_size=2)
    assert len(collated) == len(tail) <= 2
    assert len(opened) == 1


def test_single_shard_matches_token_batch_sampler(pairs, tokenizers, encoded, tmp_path):
    src_path = write_lines(tmp_path / "a.de", [s for s, _ in pairs])
    tgt_path = write_lines(tmp_path / "a.en", [t for _, t in pairs])
    corpus = preprocess(src_path, tgt_path, *tokenizers, tmp_path / "one", progress=False)
    assert corpus.num_shards == 1
    lengths = [max(map(len, pair)) for pair in encoded]
    for shuffle in (True, False):
        sampler = TokenBatchSampler(lengths, 700, shuffle=shuffle, seed=9)
        streaming = StreamingBatches(corpus, 700, shuffle=shuffle, seed=9)
        assert streaming.num_batches == len(sampler)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            assert [rows for _, rows in batch_indices(streaming, epoch)] == list(sampler)


def test_too_long_example_and_arguments(corpus, encoded):
    longest = max(max(map(len, pair)) for pair in encoded)
    with pytest.raises(ValueError, match=rf"has {longest} tokens, more than max_tokens="
                                         rf"{longest - 1}"):
        StreamingBatches(corpus, longest - 1)
    batches = StreamingBatches(corpus, longest)
    with pytest.raises(ValueError, match="rank must be in"):
        next(batches.iterate(0, rank=2, world_size=2))
    with pytest.raises(ValueError, match="start must be >= 0"):
        next(batches.iterate(0, start=-1))
