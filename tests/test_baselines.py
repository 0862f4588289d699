"""The FlashRNN baseline's weight mapping (bench/baselines.py), checked against torch.nn on
FlashRNN's own PyTorch backend (``vanilla``), which takes the same weight layout as its
CUDA kernels. Skipped where the optional ``flashrnn`` package is not installed."""
import pytest
import torch

pytest.importorskip("flashrnn")


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("bias", [True, False])
def test_flashrnn_weights_map_from_torch_nn(kind, bias):
    from fastseq.bench.baselines import flashrnn_call

    torch.manual_seed(0)
    T, B, I, H = 5, 3, 6, 8
    rnn = getattr(torch.nn, kind.upper())(I, H, bias=bias).double().float()
    call = flashrnn_call(kind, rnn, torch.float32, backend="vanilla")
    assert call is not None and "FlashRNN" in call.note
    x = torch.randn(T, B, I)
    with torch.no_grad():
        want, _ = rnn(x)
        got = call(x)
    assert got.shape == (T, B, H)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense input only"):
        call(x, torch.full((B,), T))


def test_flashrnn_leaves_out_what_it_cannot_run():
    from fastseq.bench.baselines import flashrnn_call

    for rnn in (torch.nn.GRU(4, 8, bidirectional=True), torch.nn.LSTM(4, 8, num_layers=2),
                torch.nn.LSTM(4, 8, batch_first=True), torch.nn.LSTM(4, 8, proj_size=4)):
        assert flashrnn_call(type(rnn).__name__.lower(), rnn, torch.float32, backend="vanilla") is None
    assert flashrnn_call("lstm", torch.nn.LSTM(4, 8), torch.float32) is None  # cuda_fused needs a GPU
