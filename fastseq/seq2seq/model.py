"""Attention encoder-decoder (Bahdanau, Cho & Bengio 2015), built on fastseq's modules.

* Encoder: embedding, bidirectional GRU or LSTM (``fastseq.nn.GRU``/``LSTM``)
  over packed, variable-length source batches.
* Decoder (``decoder_flow: bahdanau``, the default, :class:`Decoder`): GRU
  (Cho et al. 2014) with additive attention. At step i, the attention query is
  the previous state s_{i-1}; the GRU input is ``[E y_{i-1}; c_i]``; the output
  layer reads ``tanh(W_r [s_i; c_i; E y_{i-1}])``.
  The initial state is ``tanh(W_s [h_fwd_n; h_bwd_n])``.
* Decoder (``decoder_flow: luong``, :class:`LuongDecoder`): the Luong et al.
  (2015) flow with input feeding, as Joey NMT's RecurrentDecoder, with the
  attention scored additively: the GRU input is ``[E y_{i-1}; a_{i-1}]``, the
  new state s_i is the attention query, ``a_i = tanh(W_c [s_i; c_i])`` and the
  logits are ``W_o a_i``. See :class:`LuongDecoder`.

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
:meth:`Decoder.step`. The Luong flow runs the same way through its own op,
:func:`fastseq.ops.luong_gru_decode` (the attention on values projected once per
source batch; see :class:`LuongDecoder`).

Both decoders offer the interface the search functions (:mod:`fastseq.seq2seq.search`)
and the eager reference (:mod:`fastseq.seq2seq.eager`) use: ``embed_inputs``,
``step_weights``, ``step``, ``logits`` and ``initial_state``. The decoder state
passed from step to step is one tensor: s_i ``[B, H]`` for the Bahdanau flow,
``[s_i; a_i]`` ``[B, 2H]`` for the Luong flow (so beam search reorders both
with one ``index_select``).
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
DECODER_FLOWS = ("bahdanau", "luong")  # Architecture.decoder_flow
INITS = ("torch", "xavier")  # Architecture.init
DROPOUT_PLACES = ("embeddings+output", "embeddings", "output")  # Architecture.dropout_on


@dataclass(kw_only=True)
class Architecture:
    """The model's settings that a training config's ``model:`` section holds (the
    vocabulary sizes come from the tokenizers: see :class:`ModelConfig`).
    ``rnn_type`` is the encoder's ('gru' or 'lstm'); the decoder is a GRU.
    ``decoder_flow`` is 'bahdanau' (:class:`Decoder`, the default) or 'luong'
    (:class:`LuongDecoder`; it has no readout layer, so ``readout_size`` is unused).
    ``init`` is the parameters' initialisation: 'torch' (each torch.nn module's
    own default, the default) or 'xavier' (:func:`xavier_init_`, as Joey NMT's).
    ``dropout_on`` says where ``dropout`` applies: 'embeddings+output' (the
    default: the source and target embeddings, and the output layer's input),
    'embeddings' or 'output' (one of the two); between stacked encoder layers it
    always applies.

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
    decoder_flow: str = "bahdanau"
    init: str = "torch"
    dropout_on: str = "embeddings+output"

    def __post_init__(self):
        if self.rnn_type not in ("gru", "lstm"):
            raise ValueError(f"rnn_type: expected 'gru' or 'lstm', got {self.rnn_type!r}")
        if self.decoder_flow not in DECODER_FLOWS:
            raise ValueError(f"decoder_flow: expected 'bahdanau' or 'luong', got {self.decoder_flow!r}")
        if self.init not in INITS:
            raise ValueError(f"init: expected 'torch' or 'xavier', got {self.init!r}")
        if self.dropout_on not in DROPOUT_PLACES:
            raise ValueError(f"dropout_on: expected one of {', '.join(map(repr, DROPOUT_PLACES))}, "
                             f"got {self.dropout_on!r}")
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
    ``[B, S]`` (True at real tokens), init_state: the decoder's initial state
    (its ``initial_state``): ``[B, dec_hidden]`` (Bahdanau flow) or
    ``[B, 2*dec_hidden]`` = ``[s_0; a_0]`` (Luong flow); proj_values: the
    decoder's ``precompute_values`` (Luong flow: ``[B, S, dec_hidden]`` =
    ``V W_cc^T``; None for the Bahdanau flow, and where absent the Luong
    decoder computes it at each step).
    """

    values: Tensor
    proj_keys: Tensor
    mask: Tensor
    init_state: Tensor
    proj_values: Optional[Tensor] = None

    def index_select(self, index: Tensor) -> "Memory":
        """Rows ``index`` of every field (e.g. to expand a batch to beams)."""
        return Memory(*(None if t is None else t.index_select(0, index) for t in self))


def _dropout(cfg: Architecture, place: str) -> nn.Module:
    """``nn.Dropout(cfg.dropout)`` where ``cfg.dropout_on`` includes ``place``, else ``nn.Identity``."""
    return nn.Dropout(cfg.dropout) if place in cfg.dropout_on.split("+") else nn.Identity()


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
        self.dropout = _dropout(cfg, "embeddings")

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


class DecoderBase(nn.Module):
    """What both decoder flows share: the target embedding, the bridge to the
    initial state, the additive attention, the GRU cell (input size
    ``cell_input_size``) and the dropouts (``dropout`` on the target embeddings,
    ``output_dropout`` on the output layer's input), and :meth:`embed_inputs` (the embedding part of the
    cell's input projection for all target steps in one matrix product)."""

    def __init__(self, cfg: ModelConfig, cell_input_size: int):
        super().__init__()
        ctx = 2 * cfg.enc_hidden_size
        self.emb_size = cfg.emb_size
        self.hidden_size = cfg.dec_hidden_size
        self.embed = nn.Embedding(cfg.tgt_vocab_size, cfg.emb_size, padding_idx=PAD_ID)
        self.bridge = nn.Linear(ctx, cfg.dec_hidden_size)
        self.attention = AdditiveAttention(cfg.dec_hidden_size, ctx, cfg.attn_size)
        self.cell = GRUCell(cell_input_size, cfg.dec_hidden_size)
        self.dropout = _dropout(cfg, "embeddings")  # on the target embeddings
        self.output_dropout = _dropout(cfg, "output")  # on the output layer's input

    def embed_inputs(self, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """tokens ``[B, T]`` -> (embeddings ``[B, T, E]``, their part of the GRU input
        projection ``[B, T, 3H]`` including b_ih), one matrix product for all steps."""
        emb = self.dropout(self.embed(tokens))
        gi_emb = F.linear(emb, self.cell.weight_ih[:, : self.emb_size], self.cell.bias_ih)
        return emb, gi_emb

    def initial_state(self, final: Tensor) -> Tensor:
        """The decoder state before the first step, from the encoder's final states
        ``[B, 2*enc_hidden]``: s_0 = ``tanh(W_s final)`` ``[B, H]``."""
        return torch.tanh(self.bridge(final))

    def precompute_values(self, values: Tensor) -> Optional[Tensor]:
        """What the decoder precomputes from the encoder states besides the keys
        (:attr:`Memory.proj_values`); None here."""
        return None


class Decoder(DecoderBase):
    """GRU decoder with additive attention, the Bahdanau flow (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        ctx = 2 * cfg.enc_hidden_size
        super().__init__(cfg, cfg.emb_size + ctx)
        self.readout = nn.Linear(cfg.dec_hidden_size + ctx + cfg.emb_size, cfg.readout_size)
        self.output = nn.Linear(cfg.readout_size, cfg.tgt_vocab_size)

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
        return self.output(self.output_dropout(r))

    def forward(self, tgt_in: Tensor, memory: Memory) -> Tensor:
        """Teacher-forced decoding: tgt_in ``[B, T]`` (bos + tokens) -> logits ``[B, T, V]``."""
        emb, gi_emb = self.embed_inputs(tgt_in)
        sw = self.step_weights()
        dt = sw.w_cat.dtype
        # The T steps of :meth:`step` in one op (same math, one autograd node).
        states, contexts, _ = ops.attention_gru_decode(
            gi_emb.to(dt), memory.init_state.to(dt), memory.proj_keys.to(dt), memory.values.to(dt), sw, memory.mask)
        return self.logits(states, contexts, emb)


class LuongDecoder(DecoderBase):
    r"""GRU decoder in the Luong et al. (2015, section 3.3) flow with input feeding,
    as Joey NMT's RecurrentDecoder, the attention scored additively (Bahdanau):

    .. math:: s_i = \mathrm{GRU}(s_{i-1}, [E y_{i-1}; a_{i-1}]),\quad
              c_i = \mathrm{attention}(s_i, h),\quad
              a_i = \tanh(W_c [s_i; c_i]),\quad
              \mathrm{logits}_i = W_o\,\mathrm{dropout}(a_i)

    with ``a_0 = 0`` and ``s_0 = tanh(W_s [h_fwd_n; h_bwd_n])``. The attention
    query is the *new* state s_i (the Bahdanau flow's is s_{i-1}), and the
    attention vector a_i is both the output layer's input and the next step's
    input feed. There is no readout layer (``readout_size`` is unused).

    The decoder state carried from step to step (``Memory.init_state``, what
    :meth:`step` takes and returns, what beam search reorders) is the one tensor
    ``[s_i; a_i]`` ``[B, 2H]``.

    Training runs the T teacher-forced steps as one op,
    :func:`fastseq.ops.luong_gru_decode`, and search runs it one step at a time
    (T = 1): per step the fused GRU cell (:func:`fastseq.ops.gru_context_cell`,
    which adds ``a_{i-1} W_ia^T`` to the precomputed embedding part), one
    product for the query, the attention vector's state part and the next
    step's hidden projection, and the fused attention on the *projected values*
    ``V' = V W_cc^T`` (:meth:`precompute_values`, once per source batch, so that
    the attention's output is ``W_cc c_i``), then an add and a tanh. The
    parameters are the eager layers' (``att_vector_layer`` is read as ``[W_cs | W_cc]``):
    checkpoints do not depend on how the step runs.

    Parameters (besides the shared ones of :class:`DecoderBase`; the cell's input
    is ``[E y; a]``, size E + H): ``att_vector_layer`` (W_c, ``[H, H + 2*enc_hidden]``
    with bias, Joey NMT's name) and ``output`` (W_o, ``[V, H]`` with bias).
    """

    def __init__(self, cfg: ModelConfig):
        ctx = 2 * cfg.enc_hidden_size
        H = cfg.dec_hidden_size
        super().__init__(cfg, cfg.emb_size + H)
        self.att_vector_layer = nn.Linear(H + ctx, H)
        self.output = nn.Linear(H, cfg.tgt_vocab_size)

    def initial_state(self, final: Tensor) -> Tensor:
        """``[s_0; a_0]`` ``[B, 2H]``: s_0 = ``tanh(W_s final)``, a_0 = 0."""
        s0 = super().initial_state(final)
        return torch.cat([s0, torch.zeros_like(s0)], dim=-1)

    def precompute_values(self, values: Tensor) -> Tensor:
        """``V' = V W_cc^T`` ``[B, S, H]`` from the encoder states ``[B, S, 2*enc_hidden]``:
        the attention over V' gives ``W_cc c_i`` (see the class docstring)."""
        return F.linear(values, self.att_vector_layer.weight[:, self.hidden_size:])

    def step_weights(self) -> ops.LuongWeights:
        """The step's weights stacked (:class:`fastseq.ops.LuongWeights`) and, under
        autocast, cast to the autocast dtype, once per batch."""
        att, cell, H = self.attention, self.cell, self.hidden_size
        dev = cell.weight_hh.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return ops.LuongWeights.build(
            att.query_layer.weight, self.att_vector_layer.weight[:, :H], cell.weight_hh, self.att_vector_layer.bias,
            cell.bias_hh, att.energy_layer.weight, cell.weight_ih[:, self.emb_size:], dtype=dtype,
        )

    def _proj_values(self, memory: Memory) -> Tensor:
        return self.precompute_values(memory.values) if memory.proj_values is None else memory.proj_values

    def step(self, gi_emb: Tensor, state: Tensor, memory: Memory,
             weights: Optional[ops.LuongWeights] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """One decoder step (:func:`fastseq.ops.luong_gru_decode` with T = 1).

        Args:
            gi_emb: ``[B, 3H]`` embedding part of the GRU input projection (with b_ih).
            state: ``[s_{i-1}; a_{i-1}]`` ``[B, 2H]``. memory: see :class:`Memory`.
            weights: from :meth:`step_weights` (built here if None).

        Returns:
            ``[s_i; a_i]`` ``[B, 2H]``, context c_i ``[B, 2*enc_hidden]`` (``alpha_i V``,
            one batched product: the step itself never forms it), weights ``[B, S]``.

        Raises:
            RuntimeError: ``state`` or ``gi_emb`` of the wrong shape (the message
                names the argument, the expected and the actual shape); the rest as
                :func:`fastseq.ops.luong_gru_decode`.
        """
        H = self.hidden_size
        if not isinstance(state, Tensor) or state.dim() != 2 or state.shape[1] != 2 * H:
            got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise RuntimeError(f"state: expected [s; a] of shape (B, 2*H) = (B, {2 * H}), got {got}")
        if not isinstance(gi_emb, Tensor) or tuple(gi_emb.shape) != (state.shape[0], 3 * H):
            got = tuple(gi_emb.shape) if isinstance(gi_emb, Tensor) else type(gi_emb).__name__
            raise RuntimeError(f"gi_emb: expected shape (B, 3*H) = ({state.shape[0]}, {3 * H}), got {got}")
        sw = self.step_weights() if weights is None else weights
        dt = sw.w_cat.dtype
        states, attn = ops.luong_gru_decode(
            gi_emb.to(dt).unsqueeze(1), state.to(dt), memory.proj_keys.to(dt), self._proj_values(memory).to(dt),
            sw, memory.mask)
        context = torch.bmm(attn, memory.values.to(attn.dtype)).squeeze(1)
        return states[:, 0], context, attn[:, 0]

    def logits(self, state: Tensor, context: Optional[Tensor] = None, emb: Optional[Tensor] = None) -> Tensor:
        """Output layer over the states ``[..., 2H]`` (``[s_i; a_i]``) -> ``[..., V]``:
        ``W_o dropout(a_i)``. ``context`` and ``emb`` are not read (the step's
        interface passes them; a_i already holds the context)."""
        return self.output(self.output_dropout(state[..., self.hidden_size:]))

    def forward(self, tgt_in: Tensor, memory: Memory) -> Tensor:
        """Teacher-forced decoding: tgt_in ``[B, T]`` (bos + tokens) -> logits ``[B, T, V]``
        (:func:`fastseq.ops.luong_gru_decode`: the T steps of :meth:`step` in one op)."""
        _, gi_emb = self.embed_inputs(tgt_in)
        sw = self.step_weights()
        dt = sw.w_cat.dtype
        states, _ = ops.luong_gru_decode(gi_emb.to(dt), memory.init_state.to(dt), memory.proj_keys.to(dt),
                                         self._proj_values(memory).to(dt), sw, memory.mask)
        return self.logits(states)


class Seq2Seq(nn.Module):
    """The whole model: :class:`Encoder` and an attention decoder, :class:`Decoder`
    or :class:`LuongDecoder` as ``cfg.decoder_flow`` says; with ``cfg.init ==
    'xavier'`` the parameters are then re-initialised by :func:`xavier_init_`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = LuongDecoder(cfg) if cfg.decoder_flow == "luong" else Decoder(cfg)
        if cfg.init == "xavier":
            xavier_init_(self)

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
        proj_values = self.decoder.precompute_values(values)
        if proj_values is not None:
            proj_values = proj_values.to(proj_keys.dtype)
        values = values.to(proj_keys.dtype)  # autocast: one cast here, not one per step
        return Memory(values, proj_keys, mask, self.decoder.initial_state(final), proj_values)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """src ``[B, S]``, src_lengths ``[B]``, tgt_in ``[B, T]`` -> logits ``[B, T, V]``."""
        return self.decoder(tgt_in, self.encode(src, src_lengths))


@torch.no_grad()
def xavier_init_(model: nn.Module, embed_std: float = 0.1) -> None:
    """Joey NMT-style initialisation of ``model``'s parameters, in place:

    * every ``nn.Linear`` weight: ``xavier_uniform_`` (gain 1), i.e.
      U(-b, b) with b = sqrt(6 / (fan_in + fan_out));
    * the recurrent layers' and cells' (``nn.RNNBase``/``nn.RNNCellBase``: the
      encoder's GRU/LSTM, the decoder's GRUCell) input and hidden weight
      matrices: ``xavier_uniform_`` per gate block (each ``[H, in]`` block of
      ``W_ih``/``W_hh`` alone, so b = sqrt(6 / (in + H)));
    * every bias: zero;
    * embeddings: N(0, ``embed_std``), the padding row zero.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, embed_std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            for name, p in m.named_parameters(recurse=False):
                if name.startswith("weight_"):
                    for block in p.chunk(p.shape[0] // m.hidden_size):  # one per gate
                        nn.init.xavier_uniform_(block)
                elif name.startswith("bias_"):
                    nn.init.zeros_(p)


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
