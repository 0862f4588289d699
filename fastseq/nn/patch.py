"""``fastseq.patch``: swap torch.nn recurrent modules for fastseq's, in place."""
from __future__ import annotations

import warnings

import torch

from fastseq.nn.cell import GRUCell, LSTMCell
from fastseq.nn.rnn import GRU, LSTM

_SWAPS = {
    torch.nn.GRU: GRU,
    torch.nn.LSTM: LSTM,
    torch.nn.GRUCell: GRUCell,
    torch.nn.LSTMCell: LSTMCell,
}


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Make every ``torch.nn.GRU/LSTM/GRUCell/LSTMCell`` inside ``model`` a fastseq module.

    The swap is in place: each module keeps its identity, parameters, buffers,
    hooks and state_dict keys (fastseq's classes subclass torch's and add no
    state), so optimizers and checkpoints stay valid. Subclasses of the torch
    classes are left alone (their forward may be custom), and so are LSTMs with
    ``proj_size > 0``, with a warning.

    Returns:
        ``model`` itself, for chaining. Also works when ``model`` is itself an RNN.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        target = _SWAPS.get(type(module))
        if target is None:
            continue
        if getattr(module, "proj_size", 0):
            warnings.warn(
                f"fastseq.patch: {name or 'model'} is an LSTM with proj_size={module.proj_size}, "
                "which fastseq does not fuse; left as torch.nn.LSTM",
                stacklevel=2,
            )
            continue
        module.__class__ = target
    return model
