"""Text generation with a trained language model: a prompt in, new text out.

    gen = TextGenerator.from_checkpoint("runs/shakespeare/best.pt")
    texts = gen.generate("ROMEO:", max_new_tokens=500, temperature=0.8, top_k=0, top_p=0.95,
                         num_samples=3, seed=1, stop=["\\n\\n"], on_text=print)

The prompt runs through the model's layers in one call (all of its tokens at
once); then each new token is one fused step per layer with the state carried,
and all samples are decoded together as one batch. Each token is drawn from
``softmax(logits / temperature)`` restricted by top-k and top-p
(:mod:`fastseq.sampling`), or taken as the argmax with ``greedy``.

Seeds: sample ``i`` draws from its own generator seeded with ``seed + i``, so
``num_samples=3, seed=5`` gives the three texts that ``seed=5``, ``6`` and ``7``
give one at a time.

A sample ends at ``max_new_tokens``, at the end-of-sequence token, or where one of
the ``stop`` strings appears (the text is cut before it).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch

from fastseq.data.vocab import Vocabulary, vocabulary_from_dict
from fastseq.lm.model import CHECKPOINT_FORMAT, LanguageModel, LMConfig
from fastseq.sampling import check_sampling, draw, filter_logits, greedy
from fastseq.training.checkpoint import load_checkpoint
from fastseq.training.distributed import pick_device

__all__ = ["TextGenerator"]


class TextGenerator:
    """A language model with its vocabulary: text in, sampled text out.

    Args:
        model: a :class:`~fastseq.lm.model.LanguageModel`. vocabulary: its vocabulary.
    """

    def __init__(self, model: LanguageModel, vocabulary: Vocabulary):
        self.model, self.vocabulary = model, vocabulary

    @classmethod
    def from_checkpoint(cls, path, device: Union[str, torch.device] = "auto") -> "TextGenerator":
        """Load a checkpoint written by ``fastseq train`` for a language model.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a fastseq checkpoint, or one of another model kind (e.g. a
                translation model); a damaged file.
        """
        device = pick_device(device) if isinstance(device, str) else device
        ckpt = load_checkpoint(path, map_location="cpu", format=CHECKPOINT_FORMAT)
        model = LanguageModel(LMConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return cls(model.to(device).eval(), vocabulary_from_dict(ckpt["vocabulary"]))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_prompt(self, prompt: str) -> List[int]:
        """The prompt's token ids; an empty prompt is the newline token (a text starts
        on a new line), or end-of-sequence when the vocabulary has no newline.

        Raises:
            ValueError: the prompt holds units (characters, words) outside the vocabulary;
                the message lists them.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
        unknown = self.vocabulary.unknown(prompt)
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
            raise ValueError(f"prompt: {len(unknown)} {self.vocabulary.kind}(s) not in the model's "
                             f"vocabulary: {shown}")
        return self.vocabulary.encode(prompt) if prompt else [self.vocabulary.newline_id]

    @torch.no_grad()
    def generate(self, prompt: str = "", max_new_tokens: int = 500, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy_decoding: bool = False,
                 num_samples: int = 1, seed: int = 0, stop: Sequence[str] = (),
                 on_text: Optional[Callable[[str], None]] = None) -> List[str]:
        """Continue ``prompt`` ``num_samples`` times.

        Args:
            prompt: text to continue (see :meth:`encode_prompt`).
            max_new_tokens: at most this many tokens per sample (>= 1).
            temperature, top_k, top_p: as :func:`fastseq.sampling.filter_logits`.
            greedy_decoding: take the most probable token every step (the sampling
                arguments are then not used; every sample is the same).
            num_samples: texts decoded together as one batch.
            seed: sample ``i`` uses a generator seeded with ``seed + i``.
            stop: strings that end a sample (cut before them).
            on_text: called with each new piece of sample 0's text as it is made
                (streaming; only with ``num_samples == 1``). Text that might be the
                start of a stop string is held back until it is not.

        Returns:
            The ``num_samples`` generated texts, without the prompt.

        Raises:
            ValueError: a value out of range (the message names the argument), or a
                prompt outside the vocabulary.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected an integer >= 1, got {num_samples!r}")
        if not greedy_decoding:
            check_sampling(temperature, top_k, top_p)
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop: expected non-empty strings, got {list(stop)!r}")
        if on_text is not None and num_samples != 1:
            raise ValueError(f"on_text: streaming needs num_samples == 1, got {num_samples}")
        prompt_ids = self.encode_prompt(prompt)
        model, vocab, device = self.model, self.vocabulary, self.device
        was_training = model.training
        model.eval()
        gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(num_samples)]
        tokens = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
        logits, state = model(tokens)  # the whole prompt in one call
        logits = logits[:, -1]
        ids: List[List[int]] = [[] for _ in range(num_samples)]
        texts = [""] * num_samples
        done = [False] * num_samples
        hold = max((len(s) for s in stop), default=1) - 1
        emitted = 0
        follow = bool(stop) or on_text is not None  # the text is needed while decoding
        for _ in range(max_new_tokens):
            nxt = greedy(logits) if greedy_decoding else draw(
                filter_logits(logits, temperature, top_k, top_p), gens)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t == vocab.eos_id:
                    done[i] = True
                    continue
                ids[i].append(t)
                if follow:
                    texts[i], done[i] = _cut(vocab.decode(ids[i]), stop)
            if on_text is not None:
                end = len(texts[0]) if done[0] else max(len(texts[0]) - hold, emitted)
                if end > emitted:
                    on_text(texts[0][emitted:end])
                    emitted = end
            if all(done):
                break
            logits, state = model(nxt[:, None], state)  # one fused step per layer
            logits = logits[:, -1]
        if on_text is not None and len(texts[0]) > emitted:
            on_text(texts[0][emitted:])
        model.train(was_training)
        return texts if follow else [vocab.decode(x) for x in ids]


def _cut(text: str, stop: Sequence[str]):
    """(``text`` cut before the first stop string in it, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)
