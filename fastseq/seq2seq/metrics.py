"""Corpus-level BLEU and chrF through sacrebleu (Post 2018), on detokenised text."""
from __future__ import annotations

from typing import Dict, Sequence

import sacrebleu


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """sacreBLEU (13a tokenisation, cased) and chrF2 of detokenised hypotheses.

    Returns:
        ``{"bleu": float, "chrf": float}`` on the 0-100 scale.

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"hypotheses: expected {len(references)} lines (one per reference), got {len(hypotheses)}"
        )
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)])
    chrf = sacrebleu.corpus_chrf(list(hypotheses), [list(references)])
    return {"bleu": float(bleu.score), "chrf": float(chrf.score)}
