"""Attention encoder-decoder (Bahdanau, Cho & Bengio 2015), built on fastseq's modules.

* Encoder: embedding, bidirectional GRU or LSTM (``fastseq.nn.GRU``/``LSTM``)
  over packed, variable-length source batches.
* Decoder: GRU (Cho et al. 2014) with additive attention. At step i, the
  attention query is the previous state s_{i-1}; the GRU input is
  ``[E y_{i-1}; c_i]``; the output layer reads ``tanh(W_r [s_i; c_i; E y_{i-1}])``.
  The initial state is ``tanh(W_s [h_fwd_n; h_bwd_n])``.

The key projection ``U_a h`` is computed once per source batch
(:meth:`Seq2Seq.encode`) and reused at every decoder step, in training and in
search. The embedding part of the GRU input projection is computed for all
target steps with one matrix product before the decoding loop. Each step is
then :func:`fastseq.ops.attention_gru_step`: three kernel launches (one GEMM
for the attention query and the GRU's hidden projection together, the fused
additive attention, and one kernel for the context projection and the GRU
gates), differentiated exactly by autograd. In training (teacher forcing) the
T steps run as one op, :func:`fastseq.ops.attention_gru_decode` (the same
launches, with no custom-op call or autograd node per step); search calls
:meth:`Decoder.step`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastseq import ops
from fastseq.ops import StepWeights
from fastseq.nn import GRU, LSTM, AdditiveAttention, GRUCell

PAD_ID = 0


CHECKPOINT_FORMAT = "fastseq.seq2seq"  # the ``format`` of this model's checkpoints


@dataclass(kw_only=True)
class Architecture:
    """The model's settings that a training config's ``model:`` section holds (the
    vocabulary sizes come from the tokenizers: see :class:`ModelConfig`).
    ``rnn_type`` is the encoder's ('gru' or 'lstm'); the decoder is a GRU.

    Raises:
        ValueError: a value out of range (the message starts with the field's name).
    """

    emb_size: int = 256
    enc_hidden_size: int = 512
    dec_hidden_size: int = 512
    attn_size: int = 512
    enc_layers: int = 1
    rnn_type: str = "gru"
    readout_size: int = 256
    dropout: float = 0.3

    def __post_init__(self):
        if self.rnn_type not in ("gru", "lstm"):
            raise ValueError(f"rnn_type: expected 'gru' or 'lstm', got {self.rnn_type!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"{f.name}: expected a positive integer, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class ModelConfig(Architecture):
    """Everything :class:`Seq2Seq` is built from: the :class:`Architecture` and the
    vocabulary sizes (keyword arguments only). Checkpoints store it (``to_dict``)."""

    src_vocab_size: int
    tgt_vocab_size: int

    @classmethod
    def of(cls, architecture: Architecture, src_vocab_size: int, tgt_vocab_size: int) -> "ModelConfig":
        """The config of ``architecture`` with these vocabularies."""
        return cls(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, **asdict(architecture))


class Memory(NamedTuple):
    """What the decoder attends to, computed once per source batch.

    values ``[B, S, 2*enc_hidden]``, proj_keys ``[B, S, attn]``, mask bool
    ``[B, S]`` (True at real tokens), init_state ``[B, dec_hidden]``.
    """

    values: Tensor
    proj_keys: Tensor
    mask: Tensor
    init_state: Tensor

    def index_select(self, index: Tensor) -> "Memory":
        """Rows ``index`` of every field (e.g. to expand a batch to beams)."""
        return Memory(*(t.index_select(0, index) for t in self))


class Encoder(nn.Module):
    """Embedding and bidirectional RNN over a padded source batch."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.src_vocab_size, cfg.emb_size, padding_idx=PAD_ID)
        rnn_cls = GRU if cfg.rnn_type == "gru" else LSTM
        self.rnn = rnn_cls(
            cfg.emb_size, cfg.enc_hidden_size, num_layers=cfg.enc_layers, batch_first=True,
            bidirectional=True, dropout=cfg.dropout if cfg.enc_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, src: Tensor, src_lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """src ``[B, S]`` int64, src_lengths ``[B]`` -> outputs ``[B, S, 2H]``, final ``[B, 2H]``."""
        x = self.dropout(self.embed(src))
        packed = pack_padded_sequence(x, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h_n = self.rnn(packed)
        if isinstance(h_n, tuple):  # LSTM: (h_n, c_n)
            h_n = h_n[0]
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        final = torch.cat([h_n[-2], h_n[-1]], dim=-1)  # last layer, forward and backward
        return out, final


class Decoder(nn.Module):
    """GRU decoder with additive attention (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ctx = 2 * cfg.enc_hidden_size
        self.emb_size = cfg.emb_size
        self.embed = nn.Embedding(cfg.tgt_vocab_size, cfg.emb_size, padding_idx=PAD_ID)
        self.bridge = nn.Linear(ctx, cfg.dec_hidden_size)
        self.attention = AdditiveAttention(cfg.dec_hidden_size, ctx, cfg.attn_size)
        self.cell = GRUCell(cfg.emb_size + ctx, cfg.dec_hidden_size)
        self.readout = nn.Linear(cfg.dec_hidden_size + ctx + cfg.emb_size, cfg.readout_size)
        self.output = nn.Linear(cfg.readout_size, cfg.tgt_vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def embed_inputs(self, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """tokens ``[B, T]`` -> (embeddings ``[B, T, E]``, their part of the GRU input
        projection ``[B, T, 3H]`` including b_ih), one matrix product for all steps."""
        emb = self.dropout(self.embed(tokens))
        gi_emb = F.linear(emb, self.cell.weight_ih[:, : self.emb_size], self.cell.bias_ih)
        return emb, gi_emb

    def step_weights(self) -> StepWeights:
        """The step's weights stacked and cast once per batch (see :class:`StepWeights`).

        Under autocast they are cast to the autocast dtype here, once, instead of
        at every step.
        """
        att, cell = self.attention, self.cell
        dev = cell.weight_hh.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return StepWeights.build(
            att.query_layer.weight, cell.weight_hh, cell.bias_hh, att.energy_layer.weight,
            cell.weight_ih[:, self.emb_size:], dtype=dtype,
        )

    def step(self, gi_emb: Tensor, state: Tensor, memory: Memory,
             weights: Optional[StepWeights] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """One decoder step (:func:`fastseq.ops.attention_gru_step`, three launches).

        Args:
            gi_emb: ``[B, 3H]`` embedding part of the GRU input projection.
            state: s_{i-1} ``[B, H]``. memory: see :class:`Memory`.
            weights: from :meth:`step_weights`; pass it when running many steps
                (built here otherwise).

        Returns:
            s_i ``[B, H]``, context c_i ``[B, 2*enc_hidden]``, weights ``[B, S]``.
        """
        sw = self.step_weights() if weights is None else weights
        dt = sw.w_cat.dtype
        return ops.attention_gru_step(gi_emb.to(dt), state.to(dt), memory.proj_keys.to(dt),
                                      memory.values.to(dt), sw, memory.mask)

    def logits(self, state: Tensor, context: Tensor, emb: Tensor) -> Tensor:
        """Output layer over ``[..., H]``, ``[..., 2*enc_hidden]``, ``[..., E]`` -> ``[..., V]``."""
        r = torch.tanh(self.readout(torch.cat([state, context, emb], dim=-1)))
        return self.output(self.dropout(r))

    def forward(self, tgt_in: Tensor, memory: Memory) -> Tensor:
        """Teacher-forced decoding: tgt_in ``[B, T]`` (bos + tokens) -> logits ``[B, T, V]``."""
        emb, gi_emb = self.embed_inputs(tgt_in)
        sw = self.step_weights()
        dt = sw.w_cat.dtype
        # The T steps of :meth:`step` in one op (same math, one autograd node).
        states, contexts, _ = ops.attention_gru_decode(
            gi_emb.to(dt), memory.init_state.to(dt), memory.proj_keys.to(dt), memory.values.to(dt), sw, memory.mask)
        return self.logits(states, contexts, emb)


class Seq2Seq(nn.Module):
    """The whole model: :class:`Encoder` and attention :class:`Decoder`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, src: Tensor, src_lengths: Tensor) -> Memory:
        """Run the encoder and precompute everything the decoder reuses.

        Raises:
            ValueError: a source length is 0 or larger than ``src.shape[1]``.
        """
        if src_lengths.numel() and (int(src_lengths.min()) < 1 or int(src_lengths.max()) > src.shape[1]):
            raise ValueError(
                f"src_lengths: expected values in [1, {src.shape[1]}], "
                f"got min {int(src_lengths.min())}, max {int(src_lengths.max())}"
            )
        values, final = self.encoder(src, src_lengths)
        mask = torch.arange(src.shape[1], device=src.device)[None, :] < src_lengths.to(src.device)[:, None]
        proj_keys = self.decoder.attention.precompute_keys(values)
        values = values.to(proj_keys.dtype)  # autocast: one cast here, not one per step
        init_state = torch.tanh(self.decoder.bridge(final))
        return Memory(values, proj_keys, mask, init_state)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """src ``[B, S]``, src_lengths ``[B]``, tgt_in ``[B, T]`` -> logits ``[B, T, V]``."""
        return self.decoder(tgt_in, self.encode(src, src_lengths))


def masked_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0,
                         pad_id: int = PAD_ID) -> Tuple[Tensor, int]:
    """Mean token cross-entropy over non-padding targets.

    Args:
        logits: ``[B, T, V]``. targets: ``[B, T]`` int64 (``pad_id`` is ignored).
        label_smoothing: in [0, 1) (Szegedy et al. 2016).

    Returns:
        (loss, number of target tokens).
    """
    n_tokens = int((targets != pad_id).sum())
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=pad_id,
        label_smoothing=label_smoothing, reduction="sum",
    )
    return loss / max(n_tokens, 1), n_tokens
