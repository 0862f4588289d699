"""Batches of parallel examples: token-budget packing, padding, in memory or streamed from shards.

* :func:`encode_pairs` turns sentence pairs into the example ids every batch is made of
  (``src_ids = ids + [eos]``, ``tgt_ids = [bos] + ids + [eos]``);
* :func:`pack_by_length` cuts length-sorted examples into batches within a token budget;
* :class:`TokenBatchSampler` (with :class:`PairDataset` and :func:`collate`, for a
  ``torch.utils.data.DataLoader``) batches examples held in memory;
* :class:`StreamingBatches` batches a :class:`~fastseq.data.shards.ShardedCorpus` one shard at
  a time, resumable at any batch and split across data-parallel ranks;
* :class:`Batch` is what both yield: padded ``src``/``tgt_in``/``tgt_out`` tensors.

In memory::

    dataset = PairDataset(encode_pairs(train_pairs, src_tok, tgt_tok, max_len=128))
    sampler = TokenBatchSampler(dataset.lengths(), max_tokens=4096, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = batch.to(device)
            ...

Streamed::

    batches = StreamingBatches(ShardedCorpus("train-shards"), max_tokens=8192, seed=0)
    for epoch in range(num_epochs):
        for g, batch in batches.iterate(epoch, start=0, rank=rank, world_size=world_size):
            ...
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from fastseq.data.lines import Pair
from fastseq.data.shards import Shard, ShardedCorpus
from fastseq.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

logger = logging.getLogger(__name__)

EncodedPair = tuple[list[int], list[int]]
Example = tuple[int, Sequence[int], Sequence[int]]


# --------------------------------------------------------------------------- in memory


def encode_pairs(
    pairs: Sequence[Pair], src_tok: Tokenizer, tgt_tok: Tokenizer, max_len: Optional[int] = None
) -> list[EncodedPair]:
    """Encode sentence pairs to ids: ``src_ids = ids + [eos]``, ``tgt_ids = [bos] + ids + [eos]``.

    Args:
        pairs: (source, target) sentences.
        src_tok, tgt_tok: tokenizers of the two languages.
        max_len: if given, pairs whose ``src_ids`` or ``tgt_ids`` (special ids included) are
            longer than ``max_len`` are dropped and the count is logged; the result then no
            longer lines up with ``pairs``. Leave it None for evaluation sets.

    Returns:
        (src_ids, tgt_ids) lists of ints, in the order of ``pairs``.
    """
    src_ids = [ids + [EOS_ID] for ids in src_tok.encode_batch([src for src, _ in pairs])]
    tgt_ids = [[BOS_ID] + ids + [EOS_ID] for ids in tgt_tok.encode_batch([tgt for _, tgt in pairs])]
    encoded = list(zip(src_ids, tgt_ids))
    if max_len is None:
        return encoded
    kept = [(src, tgt) for src, tgt in encoded if len(src) <= max_len and len(tgt) <= max_len]
    if len(kept) < len(encoded):
        logger.info("dropped %d of %d pairs longer than max_len=%d tokens",
                    len(encoded) - len(kept), len(encoded), max_len)
    return kept


class PairDataset(torch.utils.data.Dataset):
    """Encoded pairs for a ``DataLoader``.

    Item ``i`` is ``(i, src_ids, tgt_ids)``, the example form :func:`collate` expects.
    """

    def __init__(self, pairs: Sequence[EncodedPair]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Example:
        src_ids, tgt_ids = self.pairs[index]
        return index, src_ids, tgt_ids

    def lengths(self) -> list[int]:
        """``max(len(src_ids), len(tgt_ids))`` of each pair: the lengths to batch by."""
        return [max(len(src_ids), len(tgt_ids)) for src_ids, tgt_ids in self.pairs]


class TokenBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of example indices whose padded size stays within a token budget.

    Examples are sorted by length and packed greedily, so each batch holds examples of similar
    length and ``len(batch) * max(length in batch) <= max_tokens``. With ``shuffle=True``, equal
    lengths are ordered randomly before packing and the order of the batches is permuted, both
    drawn from a numpy Generator seeded with ``(seed, epoch)``: an epoch's batches are
    reproducible and differ between epochs. With ``shuffle=False``, batches come in ascending
    length order, the same every epoch; ``Batch.indices`` leads back to the original order.
    Every index appears in exactly one batch per epoch.

    Args:
        lengths: size of each example in tokens, e.g. :meth:`PairDataset.lengths` (longer side).
        max_tokens: budget for ``batch size * longest example`` (padded tokens of the longer side).
        shuffle: randomise batches (training) or not (evaluation).
        seed: base seed of the shuffling.

    Raises:
        ValueError: an example is longer than ``max_tokens`` (the message names its index).
    """

    def __init__(
        self, lengths: Sequence[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.size and self.lengths.max() > max_tokens:
            index = int(self.lengths.argmax())
            raise ValueError(
                f"example {index} has {self.lengths[index]} tokens, "
                f"more than max_tokens={max_tokens}; "
                "raise max_tokens or filter long examples (encode_pairs(max_len=...))"
            )
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._by_length = np.argsort(self.lengths, kind="stable")
        # The packing depends only on the sorted lengths, so the count is the same every epoch.
        self._num_batches = len(self._pack(self._by_length))

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling of the next iteration (call before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:
            return iter(self._pack(self._by_length))
        rng = np.random.default_rng([self.seed, self.epoch])
        permutation = rng.permutation(len(self.lengths))
        order = permutation[np.argsort(self.lengths[permutation], kind="stable")]
        batches = self._pack(order)
        return iter([batches[i] for i in rng.permutation(len(batches))])

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        """Cut indices sorted by ascending length into consecutive batches within the budget."""
        return pack_by_length(order, self.lengths, self.max_tokens)


def pack_by_length(order: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    """Cut example indices sorted by ascending length into consecutive batches within a budget.

    Greedy: a batch is closed when adding the next example would make
    ``len(batch) * length of that example > max_tokens``. Since ``order`` is sorted by length,
    the last example of a batch is its longest, so every batch satisfies
    ``len(batch) * max(length in batch) <= max_tokens`` (as long as no single example exceeds
    ``max_tokens``, which the callers check).

    Args:
        order: ``[N]`` integer array, indices into ``lengths`` in ascending order of length.
        lengths: ``[M]`` integer array, the size of each example in tokens.
        max_tokens: budget for ``batch size * longest example``.

    Returns:
        The batches, lists of indices taken from ``order`` in its order; together they hold each
        index of ``order`` exactly once.
    """
    batches: list[list[int]] = []
    batch: list[int] = []
    for index, length in zip(order.tolist(), lengths[order].tolist()):
        if batch and (len(batch) + 1) * length > max_tokens:
            batches.append(batch)
            batch = []
        batch.append(index)
    if batch:
        batches.append(batch)
    return batches


@dataclass
class Batch:
    """A padded mini-batch; all tensors int64, padded on the right with the pad id.

    B is the batch size, S the longest ``src_ids`` and T the longest ``tgt_ids`` minus one.

    Attributes:
        src: ``[B, S]`` source ids ending in eos.
        src_lengths: ``[B]`` unpadded source lengths.
        tgt_in: ``[B, T]`` decoder inputs: bos + target ids (no final eos).
        tgt_out: ``[B, T]`` decoder labels: target ids + eos (``tgt_in`` shifted left by one).
        tgt_lengths: ``[B]`` unpadded lengths of ``tgt_in`` / ``tgt_out``.
        indices: ``[B]`` dataset index of each row.
    """

    src: torch.Tensor
    src_lengths: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    tgt_lengths: torch.Tensor
    indices: torch.Tensor

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in pinned memory (called by ``DataLoader(pin_memory=True)``)."""
        return self._apply(torch.Tensor.pin_memory)

    @property
    def num_tgt_tokens(self) -> int:
        """Number of non-pad target tokens, i.e. of predicted labels."""
        return int(self.tgt_lengths.sum())

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(**{field.name: fn(getattr(self, field.name)) for field in fields(self)})


def collate(examples: Sequence[Example], pad_id: int = PAD_ID) -> Batch:
    """Pad ``(index, src_ids, tgt_ids)`` examples (:class:`PairDataset` items) into a Batch.

    ``tgt_ids`` must start with bos and end with eos, as made by :func:`encode_pairs`.

    Raises:
        ValueError: ``examples`` is empty, or a ``tgt_ids`` has fewer than 2 ids.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    indices, src_seqs, tgt_seqs = zip(*examples)
    if min(len(tgt) for tgt in tgt_seqs) < 2:
        raise ValueError("every tgt_ids needs at least 2 ids (bos ... eos)")
    return Batch(
        src=_pad(src_seqs, pad_id),
        src_lengths=torch.tensor([len(ids) for ids in src_seqs], dtype=torch.int64),
        tgt_in=_pad([ids[:-1] for ids in tgt_seqs], pad_id),
        tgt_out=_pad([ids[1:] for ids in tgt_seqs], pad_id),
        tgt_lengths=torch.tensor([len(ids) - 1 for ids in tgt_seqs], dtype=torch.int64),
        indices=torch.tensor(indices, dtype=torch.int64),
    )


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """``[len(seqs), longest]`` int64 tensor of the sequences, right-padded with ``pad_id``."""
    width = max(len(ids) for ids in seqs)
    rows = [list(ids) + [pad_id] * (width - len(ids)) for ids in seqs]
    return torch.tensor(rows, dtype=torch.int64)


# --------------------------------------------------------------------------- streamed from shards


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class StreamingBatches:
    """Token-budget, length-bucketed batches of a :class:`ShardedCorpus`, one shard at a time.

    Each epoch visits the shards in an order drawn from ``default_rng([seed, epoch])``. Within
    shard ``s`` a Generator ``rng = default_rng([seed, epoch, s])`` orders equal lengths
    randomly (``permutation``, then a stable sort by length), the examples are packed with
    :func:`pack_by_length` and the shard's batches are permuted by the same
    ``rng``. With a single shard the Generator is ``default_rng([seed, epoch])``, so the batches
    are exactly those of :class:`TokenBatchSampler` for the same lengths and
    seed. With ``shuffle=False`` shards come in order, each one's batches in ascending length.
    Batches never mix shards; every pair is in exactly one batch per epoch, and each batch
    satisfies ``len(batch) * max(length in batch) <= max_tokens`` (length = longer side).

    Memory: one shard's lengths and batch lists plus its memory-mapped pages, released when the
    next shard is opened; construction reads each shard's offsets once (``O(num_pairs)`` time).

    Args:
        corpus: the shards.
        max_tokens: budget for ``batch size * longest example`` (padded tokens of the longer side).
        shuffle: randomise (training) or not (evaluation).
        seed: base seed of the shuffling.

    Raises:
        ValueError: ``max_tokens < 1``, or a pair is longer than ``max_tokens`` (the message names
            the shard, the pair's index in it, its length and ``max_tokens``).
    """

    def __init__(
        self, corpus: ShardedCorpus, max_tokens: int, *, shuffle: bool = True, seed: int = 0
    ) -> None:
        _check_positive("max_tokens", max_tokens)
        self.corpus = corpus
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        # Packing depends only on the sorted lengths, so each shard's count is the same every
        # epoch; storing the counts lets iterate() skip whole shards without opening them.
        self._shard_batches: list[int] = []
        for s in range(corpus.num_shards):
            lengths = corpus.shard_lengths(s)
            if lengths.size and lengths.max() > max_tokens:
                j = int(lengths.argmax())
                raise ValueError(
                    f"{corpus.directory}: pair {j} of shard {s} has {lengths[j]} tokens, more "
                    f"than max_tokens={max_tokens}; raise max_tokens or preprocess with max_len"
                )
            order = np.argsort(lengths, kind="stable")
            self._shard_batches.append(len(pack_by_length(order, lengths, max_tokens)))
        self._num_batches = sum(self._shard_batches)

    @property
    def num_batches(self) -> int:
        """Batches per epoch, all shards and ranks together (the same for every epoch)."""
        return self._num_batches

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that ``iter(self)`` yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        return (batch for _, batch in self.iterate(self.epoch))

    def iterate(
        self, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[int, Batch]]:
        """The batches of an epoch with their global index, for resuming and data parallelism.

        Yields ``(g, batch)`` for each global batch index ``g`` (0-based over the epoch, all
        shards) with ``g >= start`` and ``g % world_size == rank``, in increasing ``g``. Skipped
        batches cost nothing but, in shards that must be opened, reading their offsets: their
        tokens are not read and whole shards of skipped batches are not opened. ``Batch.indices``
        holds global pair indices (file order after dropping). Batches equal what
        :func:`collate` makes of the same ``(index, src_ids, tgt_ids)``.
        When ``num_batches`` is not a multiple of ``world_size``, the first
        ``num_batches % world_size`` ranks get one batch more; a data-parallel loop that needs
        equal step counts stops after ``num_batches // world_size`` batches.

        Args:
            epoch: selects the shuffling.
            start: first global batch index to yield, to resume an epoch: after ``k`` steps of
                each of ``world_size`` ranks, ``start = k * world_size``.
            rank, world_size: this process's share of the batches.

        Raises:
            ValueError: ``start < 0``, ``world_size < 1`` or ``rank`` not in ``[0, world_size)``.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        _check_positive("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        num_shards = self.corpus.num_shards
        if self.shuffle:
            shard_order = np.random.default_rng([self.seed, epoch]).permutation(num_shards)
        else:
            shard_order = np.arange(num_shards)
        first = 0  # global index of the current shard's first batch
        for s in shard_order.tolist():
            end = first + self._shard_batches[s]
            g = max(first, start)
            g += (rank - g) % world_size  # first index of this rank at or after g
            if g < end:
                shard = self.corpus.open_shard(s)
                batches = self._shard_batches_of(shard, epoch, num_shards)
                for index in range(g, end, world_size):
                    yield index, _collate_shard(shard, batches[index - first])
                del shard, batches  # unmap this shard before the next one is opened
            first = end

    def _shard_batches_of(self, shard: Shard, epoch: int, num_shards: int) -> list[list[int]]:
        """The batches (local indices) of one shard in this epoch's order."""
        lengths = shard.lengths()
        if not self.shuffle:
            return pack_by_length(np.argsort(lengths, kind="stable"), lengths, self.max_tokens)
        seed = [self.seed, epoch] if num_shards == 1 else [self.seed, epoch, shard.index]
        rng = np.random.default_rng(seed)
        permutation = rng.permutation(len(lengths))
        order = permutation[np.argsort(lengths[permutation], kind="stable")]
        batches = pack_by_length(order, lengths, self.max_tokens)
        return [batches[i] for i in rng.permutation(len(batches))]


def _gather(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[B, max(lengths)]`` int64, row b ``tokens[starts[b]:starts[b] + lengths[b]]`` padded."""
    columns = np.arange(int(lengths.max()))
    inside = columns < lengths[:, None]
    out = np.full(inside.shape, PAD_ID, dtype=np.int64)
    out[inside] = tokens[(starts[:, None] + columns)[inside]]
    return out


def _collate_shard(shard: Shard, batch: list[int]) -> Batch:
    """:func:`collate` of local pairs ``batch``, read from the memmaps."""
    local = np.asarray(batch, dtype=np.int64)
    starts, ends = shard.offsets[local], shard.offsets[local + 1]
    src_lengths, tgt_lengths = (ends - starts).T
    tgt_lengths = tgt_lengths - 1  # of tgt_in and tgt_out: tgt_ids minus eos, or minus bos
    return Batch(
        src=torch.from_numpy(_gather(shard.src, starts[:, 0], src_lengths)),
        src_lengths=torch.from_numpy(np.ascontiguousarray(src_lengths)),
        tgt_in=torch.from_numpy(_gather(shard.tgt, starts[:, 1], tgt_lengths)),
        tgt_out=torch.from_numpy(_gather(shard.tgt, starts[:, 1] + 1, tgt_lengths)),
        tgt_lengths=torch.from_numpy(tgt_lengths),
        indices=torch.from_numpy(local + shard.start),
    )
