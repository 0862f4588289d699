"""AdditiveAttention against its equation written out with eager torch ops."""
import pytest
import torch
from parity import assert_close

from fastseq.nn import AdditiveAttention


def _eager(att, s, keys, mask):
    e = att.energy_layer.weight @ torch.tanh(
        (att.query_layer.weight @ s.T).T.unsqueeze(1) + keys @ att.key_layer.weight.T
    ).transpose(1, 2)  # [B, 1, S]
    e = e.squeeze(1).masked_fill(~mask, float("-inf"))
    w = torch.softmax(e, -1)
    return (w.unsqueeze(1) @ keys).squeeze(1), w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_equation_and_gradients(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        dtype = torch.float32  # float64 always runs on the reference
    B, S, Q, K, A = 3, 7, 5, 6, 4
    att = AdditiveAttention(Q, K, A).to(dtype)
    s = torch.randn(B, Q, dtype=dtype, requires_grad=True)
    keys = torch.randn(B, S, K, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([7, 1, 4])
    mask = torch.arange(S)[None] < lengths[:, None]
    ctx, w = att(s, att.precompute_keys(keys), keys, mask)
    ctx_e, w_e = _eager(att, s, keys, mask)
    assert_close(ctx, ctx_e)
    assert_close(w, w_e)
    assert torch.all(w[~mask] == 0)
    g = torch.randn_like(ctx)
    params = [s, keys] + list(att.parameters())
    for a, b in zip(torch.autograd.grad(ctx, params, g), torch.autograd.grad(ctx_e, params, g)):
        assert_close(a, b)


def test_zero_length_source_raises():
    att = AdditiveAttention(2, 3, 4)
    keys = torch.randn(2, 3, 3)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(RuntimeError, match="zero-length source"):
        att(torch.randn(2, 2), att.precompute_keys(keys), keys, mask)


def test_bad_shapes_name_the_argument():
    att = AdditiveAttention(2, 3, 4)
    keys = torch.randn(2, 5, 3)
    with pytest.raises(RuntimeError, match="query: expected shape"):
        att(torch.randn(2, 3), att.precompute_keys(keys), keys)
    with pytest.raises(ValueError, match="query: expected shape"):  # rank, as torch.nn modules
        att(torch.randn(2, 1, 1, 2), att.precompute_keys(keys), keys)
    with pytest.raises(RuntimeError, match="keys: expected size"):
        att.precompute_keys(torch.randn(2, 5, 4))


def test_load_from_other_layout(backend):
    """Weights in the PyTorch seq2seq tutorial's layout (Wa, Ua with a bias, Va) give
    that tutorial's attention: scores Va(tanh(Wa(s) + Ua(h))), softmax, weighted sum."""
    att = AdditiveAttention(2, 3, 4, bias=True)
    Wa, Ua, v, b = torch.randn(4, 2), torch.randn(4, 3), torch.randn(4), torch.randn(4)
    att.load_from(Wa, Ua, v.reshape(1, 4), key_bias=b)
    s, keys = torch.randn(5, 2), torch.randn(5, 6, 3)
    scores = torch.tanh((s @ Wa.T).unsqueeze(1) + keys @ Ua.T + b) @ v  # [B, S]
    w_want = torch.softmax(scores, -1)
    ctx, w = att(s, att.precompute_keys(keys), keys)
    assert_close(w, w_want)
    assert_close(ctx, (w_want.unsqueeze(1) @ keys).squeeze(1))
    with pytest.raises(ValueError, match="key_bias: this module was built with bias=False"):
        AdditiveAttention(2, 3, 4).load_from(Wa, Ua, v, key_bias=b)


def test_multi_query_and_lengths(backend):
    att = AdditiveAttention(3, 4, 5)
    keys = torch.randn(2, 6, 4)
    s = torch.randn(2, 7, 3)
    lengths = torch.tensor([6, 2])
    mask = torch.arange(6)[None] < lengths[:, None]
    ctx, w = att(s, att.precompute_keys(keys), keys, lengths=lengths)
    assert ctx.shape == (2, 7, 4) and w.shape == (2, 7, 6)
    for t in (0, 6):
        c1, w1 = att(s[:, t], att.precompute_keys(keys), keys, mask)
        assert_close(c1, ctx[:, t])
        assert_close(w1, w[:, t])


def test_state_dict_matches_joeynmt_layout():
    """Parameter names and shapes of joeynmt's BahdanauAttention (query_layer, key_layer, energy_layer)."""
    att = AdditiveAttention(query_size=6, key_size=8, hidden_size=5)
    assert {k: tuple(v.shape) for k, v in att.state_dict().items()} == {
        "query_layer.weight": (5, 6), "key_layer.weight": (5, 8), "energy_layer.weight": (1, 5)}
