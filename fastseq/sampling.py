"""Choosing the next token from a model's logits: greedy, temperature, top-k, top-p (nucleus).

Shared by the language model's generation (:mod:`fastseq.lm.generate`) and the
seq2seq model's sampling (:mod:`fastseq.seq2seq.search`).

* temperature ``tau``: ``softmax(logits / tau)``; ``tau -> 0`` tends to greedy.
* top-k (Fan, Lewis & Dauphin 2018): keep the ``k`` most probable tokens.
* top-p (Holtzman et al. 2020, "nucleus sampling"): keep the smallest set of the
  most probable tokens whose probability reaches ``p``.

Ties are broken by token id (the lower id ranks first), so top-k keeps exactly
``k`` tokens, top-p exactly the smallest such set, and top-k = 1 is
:func:`greedy` (``argmax``, which also returns the lowest id among equal maxima).

Each row draws with its own ``torch.Generator``, by inverting its cumulative
distribution at one uniform number, so a row's choice depends only on its own
logits and generator: row ``i`` of a batch gives the same token as that row alone
with the same generator.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["check_sampling", "draw", "filter_logits", "greedy"]


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError for values out of range: ``temperature`` <= 0, ``top_k`` < 0
    (0: no limit), ``top_p`` outside (0, 1]."""
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected > 0 (use greedy decoding for the argmax), got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k: expected an integer >= 0 (0 = no limit), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p: expected a value in (0, 1] (1 = no limit), got {top_p!r}")


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        what = (f"shape {tuple(logits.shape)}, dtype {logits.dtype}" if isinstance(logits, Tensor)
                else type(logits).__name__)
        raise ValueError(f"logits: expected a 2-D floating-point tensor [N, V], got {what}")


def greedy(logits: Tensor) -> Tensor:
    """``[N, V]`` -> ``[N]`` int64: the most probable token of each row (the lowest id on ties)."""
    return logits.argmax(dim=-1)


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``logits / temperature`` with the tokens outside top-k and top-p set to ``-inf``.

    Args:
        logits: ``[N, V]`` floating point (computed in float32).
        temperature: > 0. top_k: keep the ``top_k`` most probable (0: all).
        top_p: keep the smallest most-probable set with probability >= ``top_p`` (1: all),
            measured after the temperature and top-k.

    Returns:
        ``[N, V]`` float32; every row keeps at least its most probable token.

    Raises:
        ValueError: as :func:`check_sampling`; ``logits`` is not a 2-D floating-point tensor.
    """
    check_sampling(temperature, top_k, top_p)
    _check_logits(logits)
    scores = logits.float() / temperature
    V = scores.shape[-1]
    if (top_k == 0 or top_k >= V) and top_p >= 1:
        return scores
    # Stable sort by descending score: equal scores keep id order (ties by id).
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranked = scores.gather(-1, order)
    keep = torch.ones_like(ranked, dtype=torch.bool)
    if 0 < top_k < V:
        keep[:, top_k:] = False
        ranked = ranked.masked_fill(~keep, float("-inf"))
    if top_p < 1:
        probs = torch.softmax(ranked, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above
        keep &= before < top_p
        keep[:, 0] = True
    removed = torch.zeros_like(keep).scatter(-1, order, ~keep)
    return scores.masked_fill(removed, float("-inf"))


def draw(logits: Tensor, generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> Tensor:
    """One token per row from ``softmax(logits)`` (``[N, V]``, filtered by
    :func:`filter_logits`) -> ``[N]`` int64.

    Args:
        generators: one per row (None: torch's default generator), each drawing one
            uniform number per call, on the logits' device.

    Raises:
        ValueError: ``logits`` is not a 2-D floating-point tensor; ``generators`` does not
            have one entry per row.
    """
    _check_logits(logits)
    N = logits.shape[0]
    if generators is None:
        generators = [None] * N
    if len(generators) != N:
        raise ValueError(f"generators: expected one per row ({N}), got {len(generators)}")
    u = torch.stack([torch.rand((), device=logits.device, generator=g) for g in generators])
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)
    # The first token whose cumulative probability exceeds u * total (total ~ 1).
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    # Never past the last token that has probability (rounding at the top of the cdf).
    last = (logits > float("-inf")).long().cumsum(-1).argmax(-1)
    return torch.minimum(index, last)
