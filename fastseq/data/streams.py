"""A token stream as contiguous streams for truncated backpropagation through time.

A language model's training text (one 1-D tensor of token ids) is cut into
``world_size x batch_size`` contiguous streams of equal length; process ``rank``
owns streams ``[rank*B, (rank+1)*B)``. Chunk ``k`` of a process is the
``[B, T]`` window ``k*T .. k*T+T-1`` of each of its streams (inputs) and the
same window one token later (targets), so chunk ``k+1`` continues chunk ``k``
row by row and the model's final state of one chunk is the initial state of
the next (detached: truncated BPTT, Williams & Peng 1990; Zaremba et al. 2014).

Each epoch starts the streams at a random offset in ``[0, T)`` (drawn from the
seed and the epoch), so chunk boundaries move between epochs; the number of
chunks is the same every epoch. Global batch ``g`` of an epoch is chunk
``g // world_size`` of rank ``g % world_size``, which is the contract of
:class:`fastseq.training.task.TrainBatches`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Tuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class StreamChunk:
    """One chunk of a process's streams.

    Attributes:
        inputs: ``[B, T]`` int64 token ids. targets: ``[B, T]`` int64, ``inputs`` shifted by one.
        epoch: the epoch. index: the chunk's position in the epoch (0: the streams start;
            a carried state must be reset).
    """

    inputs: Tensor
    targets: Tensor
    epoch: int
    index: int

    @property
    def num_tokens(self) -> int:
        return self.targets.numel()


class StreamBatches:
    """Truncated-BPTT chunks of ``ids`` (see the module docstring).

    Args:
        ids: 1-D int64 token ids of the training text.
        batch_size: streams per process (B). bptt: tokens per chunk (T).
        world_size: processes; each owns ``batch_size`` streams.
        seed: with the epoch, picks the epoch's start offset.

    Raises:
        ValueError: ``ids`` is not a 1-D integer tensor, ``batch_size``/``bptt``/``world_size`` < 1, or
            the text is too short for one chunk of every stream (the message gives both sizes).
    """

    def __init__(self, ids: Tensor, batch_size: int, bptt: int, world_size: int = 1, seed: int = 0):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"ids: expected a 1-D integer tensor of token ids, got shape "
                             f"{tuple(ids.shape)}, dtype {ids.dtype}")
        for name, value in (("batch_size", batch_size), ("bptt", bptt), ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"{name}: expected >= 1, got {value}")
        streams = world_size * batch_size
        self.ids, self.batch_size, self.bptt, self.world_size, self.seed = ids, batch_size, bptt, world_size, seed
        self.stream_length = (ids.numel() - bptt) // streams  # room for any offset in [0, T)
        self.chunks = max(self.stream_length, 0) // bptt
        if self.chunks == 0:
            need = streams * bptt + bptt
            raise ValueError(
                f"the training text has {ids.numel()} tokens, fewer than the {need} that one chunk of "
                f"bptt={bptt} tokens for each of {streams} streams (batch_size={batch_size} x "
                f"{world_size} process(es)) needs; lower batch_size or bptt, or give more text"
            )

    @property
    def num_batches(self) -> int:
        """Global batches per epoch: chunks per stream x processes."""
        return self.chunks * self.world_size

    def offset(self, epoch: int) -> int:
        """The streams' start offset in epoch ``epoch``, in ``[0, bptt)``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return int(torch.randint(self.bptt, (), generator=g))

    def chunk(self, epoch: int, index: int, rank: int = 0) -> StreamChunk:
        """Chunk ``index`` of ``rank``'s streams in ``epoch``."""
        B, T = self.batch_size, self.bptt
        starts = self.offset(epoch) + (rank * B + torch.arange(B)) * self.stream_length + index * T
        positions = starts[:, None] + torch.arange(T)[None, :]
        return StreamChunk(self.ids[positions], self.ids[positions + 1], epoch, index)

    def iterate(self, epoch: int, start: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[Tuple[int, StreamChunk]]:
        """``(g, chunk)`` for the global batches ``g >= start`` of ``rank``.

        Raises:
            ValueError: ``world_size`` differs from the one the streams were laid out for.
        """
        if world_size != self.world_size:
            raise ValueError(f"world_size: the streams were laid out for {self.world_size} "
                             f"process(es), got {world_size}")
        first = -(-max(start - rank, 0) // world_size)  # the first chunk index k with k*W + rank >= start
        for k in range(first, self.chunks):
            yield k * world_size + rank, self.chunk(epoch, k, rank)
