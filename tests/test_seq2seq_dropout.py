"""``model.dropout_on``: where the translation model's dropout applies (the
dropout-placement ablation of issue 19): the embeddings, the output layer's input,
or both (the default, unchanged from before the option)."""
import pytest
import torch
from torch import nn

from fastseq.seq2seq.model import Architecture, ModelConfig, Seq2Seq

CFG = dict(src_vocab_size=30, tgt_vocab_size=25, emb_size=8, enc_hidden_size=10, dec_hidden_size=12,
           attn_size=9, readout_size=7, dropout=0.5)


def test_bad_value_names_the_field():
    with pytest.raises(ValueError, match=r"dropout_on: expected one of 'embeddings\+output', 'embeddings', "
                                         r"'output', got 'attention'"):
        Architecture(dropout_on="attention")
    assert Architecture().to_dict()["dropout_on"] == "embeddings+output"


@pytest.mark.parametrize("flow", ["bahdanau", "luong"])
@pytest.mark.parametrize("on,emb,out", [("embeddings+output", True, True), ("embeddings", True, False),
                                        ("output", False, True)])
def test_dropout_applies_where_configured(flow, on, emb, out):
    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(**CFG, decoder_flow=flow, dropout_on=on)).train()
    dec = model.decoder
    for m, want in ((model.encoder.dropout, emb), (dec.dropout, emb), (dec.output_dropout, out)):
        assert isinstance(m, nn.Dropout if want else nn.Identity)
    tokens = torch.randint(4, 25, (3, 5))
    e1, _ = dec.embed_inputs(tokens)
    e2, _ = dec.embed_inputs(tokens)
    assert torch.equal(e1, e2) is not emb  # random masks differ between calls where dropout applies
    H = CFG["dec_hidden_size"]
    state = torch.randn(3, 5, 2 * H if flow == "luong" else H)
    ctx, embv = torch.randn(3, 5, 2 * CFG["enc_hidden_size"]), torch.randn(3, 5, CFG["emb_size"])
    l1, l2 = dec.logits(state, ctx, embv), dec.logits(state, ctx, embv)
    assert torch.equal(l1, l2) is not out
    model.eval()
    assert torch.equal(dec.logits(state, ctx, embv), dec.logits(state, ctx, embv))
