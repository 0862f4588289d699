"""The recurrent language model: embedding, N-layer LSTM or GRU, output layer.

    x_t = dropout(E w_t)                               E: [V, emb_size]
    h_t = RNN(x_t, h_{t-1})                            fastseq.nn.LSTM / GRU, num_layers,
                                                       dropout between layers
    p(w_{t+1} | w_{<=t}) = softmax(W_o dropout(h_t) + b_o)

(Mikolov et al. 2010; Zaremba, Sutskever & Vinyals 2014 for the LSTM with
dropout between layers and on the output.) With ``tie_weights`` and
``emb_size == hidden_size`` the output matrix is the embedding matrix,
``W_o = E`` (Press & Wolf 2017; Inan, Khosravi & Socher 2017): fewer
parameters, and usually a lower perplexity at word and subword level; when the
sizes differ the weights are not tied.

The recurrence runs through :mod:`fastseq.nn`'s fused layers: a training chunk
``[B, T]`` is one call per layer stack, and a generation step (``T = 1``) is one
fused step per layer, with the state carried between calls.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from fastseq.nn import GRU, LSTM

CHECKPOINT_FORMAT = "fastseq.lm"  # the ``format`` of this model's checkpoints

State = Union[Tensor, Tuple[Tensor, Tensor]]  # GRU: h [L, B, H]; LSTM: (h, c)


@dataclass(kw_only=True)
class LMArchitecture:
    """The model's settings that a training config's ``model:`` section holds (the
    vocabulary size comes from the corpus).

    Raises:
        ValueError: a value out of range (the message starts with the field's name).
    """

    rnn_type: str = "lstm"       # lstm | gru
    emb_size: int = 512
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.2         # on the embeddings, between layers and before the output layer
    tie_weights: bool = True     # output matrix = embedding matrix when emb_size == hidden_size

    def __post_init__(self):
        if self.rnn_type not in ("gru", "lstm"):
            raise ValueError(f"rnn_type: expected 'gru' or 'lstm', got {self.rnn_type!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{f.name}: expected a positive integer, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")

    @property
    def tied(self) -> bool:
        """Whether the output matrix is the embedding matrix."""
        return self.tie_weights and self.emb_size == self.hidden_size

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class LMConfig(LMArchitecture):
    """Everything :class:`LanguageModel` is built from: the :class:`LMArchitecture` and
    the vocabulary size. Checkpoints store it (``to_dict``)."""

    vocab_size: int

    @classmethod
    def of(cls, architecture: LMArchitecture, vocab_size: int) -> "LMConfig":
        return cls(vocab_size=vocab_size, **asdict(architecture))


class LanguageModel(nn.Module):
    """An RNN language model (see the module docstring).

    Args:
        config: :class:`LMConfig`.
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.emb_size)
        rnn = LSTM if c.rnn_type == "lstm" else GRU
        self.rnn = rnn(c.emb_size, c.hidden_size, num_layers=c.num_layers, batch_first=True,
                       dropout=c.dropout if c.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(c.dropout)
        self.output = nn.Linear(c.hidden_size, c.vocab_size)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.output.bias)
        if c.tied:
            self.output.weight = self.embed.weight
        else:
            nn.init.uniform_(self.output.weight, -0.1, 0.1)

    def initial_state(self, batch_size: int, device: Optional[torch.device] = None,
                      dtype: torch.dtype = torch.float32) -> State:
        """Zeros: ``[num_layers, B, hidden_size]`` (a pair for the LSTM)."""
        c = self.config
        h = torch.zeros(c.num_layers, batch_size, c.hidden_size, device=device, dtype=dtype)
        return (h, torch.zeros_like(h)) if c.rnn_type == "lstm" else h

    def forward(self, tokens: Tensor, state: Optional[State] = None) -> Tuple[Tensor, State]:
        """Next-token logits for every position.

        Args:
            tokens: ``[B, T]`` int64 token ids.
            state: the state after the previous tokens (:meth:`initial_state`'s
                shapes), or None for zeros.

        Returns:
            logits ``[B, T, vocab_size]`` (logits[:, t] predicts token t + 1), and the
            state after the last token.

        Raises:
            ValueError: ``tokens`` is not a 2-D integer tensor.
        """
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens: expected a 2-D int64 tensor [B, T], got shape "
                             f"{tuple(tokens.shape)} and dtype {tokens.dtype}")
        x = self.dropout(self.embed(tokens))
        out, state = self.rnn(x, state)
        return self.output(self.dropout(out)), state


def detach_state(state: State) -> State:
    """``state`` cut from the graph (truncated BPTT), as float32 (an autocast run's
    state may come back in half precision)."""
    if isinstance(state, tuple):
        return tuple(s.detach().float() for s in state)  # type: ignore[return-value]
    return state.detach().float()
