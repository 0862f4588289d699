"""Decoding: greedy search, beam search with length penalty, and sampling.

All three encode the source once (:meth:`Seq2Seq.encode`: encoder states,
key projections, mask) and then only run decoder steps; with
``FASTSEQ_CUDA_GRAPHS=1`` on a GPU each step is a replayed CUDA graph
(:class:`fastseq.backend.graphs.StepGraph`: one graph launch per token). Beam search expands
that memory to ``B * beam`` rows once; beams of one sentence share their source,
so reordering hypotheses reorders decoder states only, never keys or values.
The functions work with either decoder flow (``decoder_flow``): they only use the
decoder's step interface, and its state is one tensor (s_i, or ``[s_i; a_i]`` in
the Luong flow), reordered with one ``index_select``.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor

from fastseq.backend.graphs import StepGraph
from fastseq.ops import StepWeights
from fastseq.sampling import filter_logits
from fastseq.seq2seq.model import Memory, Seq2Seq


def _max_steps(src_lengths: Tensor, max_len: Optional[int]) -> int:
    if max_len is not None:
        return max_len
    return int(src_lengths.max()) * 2 + 10


def _strip(tokens: Tensor, eos_id: int) -> List[List[int]]:
    """Cut each row of ``tokens [B, T]`` at its first eos (eos excluded)."""
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


def _step_log_probs(model: Seq2Seq, prev: Tensor, state: Tensor, memory: Memory,
                    weights: StepWeights, temperature: float = 1.0):
    dec = model.decoder
    emb, gi_emb = dec.embed_inputs(prev.unsqueeze(1))
    state, context, _ = dec.step(gi_emb[:, 0], state, memory, weights)
    logits = dec.logits(state, context, emb[:, 0]).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1), state


def _decode(model: Seq2Seq, src: Tensor, src_lengths: Tensor, bos_id: int, eos_id: int,
            max_len: Optional[int], choose: Callable[[Tensor], Tensor],
            temperature: float = 1.0) -> List[List[int]]:
    """Left-to-right decoding of one hypothesis per sentence; ``choose`` maps
    log-probabilities ``[B, V]`` to the next tokens ``[B]``."""
    memory = model.encode(src, src_lengths)
    weights = model.decoder.step_weights()
    B = src.shape[0]
    prev = torch.full((B,), bos_id, dtype=torch.long, device=src.device)
    state = memory.init_state
    out, done = [], torch.zeros(B, dtype=torch.bool, device=src.device)
    step = StepGraph(lambda p, s: _step_log_probs(model, p, s, memory, weights, temperature))
    for _ in range(_max_steps(src_lengths, max_len)):
        log_probs, state = step(prev, state)
        prev = choose(log_probs)
        out.append(prev)
        done |= prev == eos_id
        if bool(done.all()):
            break
    return _strip(torch.stack(out, 1), eos_id)


@torch.no_grad()
def greedy_search(model: Seq2Seq, src: Tensor, src_lengths: Tensor, bos_id: int, eos_id: int,
                  max_len: Optional[int] = None) -> List[List[int]]:
    """Most probable next token at every step.

    Args:
        src: ``[B, S]`` int64; src_lengths: ``[B]``; max_len: steps (default 2*S+10).

    Returns:
        B token-id lists, without bos/eos.
    """
    return _decode(model, src, src_lengths, bos_id, eos_id, max_len,
                   choose=lambda log_probs: log_probs.argmax(dim=-1))


@torch.no_grad()
def sample(model: Seq2Seq, src: Tensor, src_lengths: Tensor, bos_id: int, eos_id: int,
           max_len: Optional[int] = None, temperature: float = 1.0, top_k: int = 0,
           generator: Optional[torch.Generator] = None) -> List[List[int]]:
    """Ancestral sampling from ``softmax(logits / temperature)``, optionally top-k
    (:func:`fastseq.sampling.filter_logits`: exactly k tokens, ties by token id).

    Returns:
        B token-id lists, without bos/eos.

    Raises:
        ValueError: temperature <= 0 or top_k < 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k: expected >= 0 (0 = no limit), got {top_k}")

    def choose(log_probs: Tensor) -> Tensor:
        probs = torch.softmax(filter_logits(log_probs, top_k=top_k), dim=-1)  # temperature: in log_probs
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _decode(model, src, src_lengths, bos_id, eos_id, max_len, choose, temperature)


def length_penalty(length: Tensor, alpha: float) -> Tensor:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, eq. 14)."""
    return ((5.0 + length.float()) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model: Seq2Seq, src: Tensor, src_lengths: Tensor, bos_id: int, eos_id: int,
                beam_size: int = 5, max_len: Optional[int] = None,
                alpha: float = 0.6) -> List[List[int]]:
    """Beam search; the final hypothesis maximises log P(Y|X) / length_penalty(|Y|, alpha).

    Args:
        beam_size: hypotheses kept per sentence (>= 1). alpha: length-penalty
            exponent (0 = raw log-probability).

    Returns:
        B token-id lists, without bos/eos.

    Raises:
        ValueError: beam_size < 1.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size: expected >= 1, got {beam_size}")
    device = src.device
    B, K = src.shape[0], beam_size
    memory = model.encode(src, src_lengths)
    # Expand the source memory to B*K rows once; never recomputed or reordered.
    memory = memory.index_select(torch.arange(B, device=device).repeat_interleave(K))
    weights = model.decoder.step_weights()
    state = memory.init_state
    prev = torch.full((B * K,), bos_id, dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis per sentence at the start
    finished = torch.zeros(B * K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B * K, dtype=torch.long, device=device)
    history = torch.empty((B * K, 0), dtype=torch.long, device=device)
    base = (torch.arange(B, device=device) * K).unsqueeze(1)  # [B, 1]
    step = StepGraph(lambda p, s: _step_log_probs(model, p, s, memory, weights))
    for _ in range(_max_steps(src_lengths, max_len)):
        log_probs, state = step(prev, state)
        V = log_probs.shape[-1]
        # A finished hypothesis only extends with eos, at no cost.
        frozen = torch.full_like(log_probs[0], float("-inf"))
        frozen[eos_id] = 0.0
        log_probs = torch.where(finished.unsqueeze(1), frozen, log_probs)
        cand = (scores.view(B * K, 1) + log_probs).view(B, K * V)
        scores, flat = cand.topk(K, dim=-1)  # [B, K]
        origin = (base + flat // V).view(-1)  # source row in [0, B*K)
        prev = (flat % V).view(-1)
        state = state.index_select(0, origin)
        history = torch.cat([history.index_select(0, origin), prev.unsqueeze(1)], dim=1)
        was_finished = finished.index_select(0, origin)
        lengths = lengths.index_select(0, origin) + (~was_finished).long()
        finished = was_finished | (prev == eos_id)
        if bool(finished.all()):
            break
    normalised = scores / length_penalty(lengths.view(B, K), alpha)
    best = base.squeeze(1) + normalised.argmax(dim=-1)
    return _strip(history.index_select(0, best), eos_id)
