"""``fastseq.patch`` / ``fastseq.unpatch``: swap torch.nn recurrent modules for fastseq's, and back, in place."""
from __future__ import annotations

import torch

from fastseq.backend.warn import warn
from fastseq.nn.cell import GRUCell, LSTMCell
from fastseq.nn.rnn import GRU, LSTM

_SWAPS = {
    torch.nn.GRU: GRU,
    torch.nn.LSTM: LSTM,
    torch.nn.GRUCell: GRUCell,
    torch.nn.LSTMCell: LSTMCell,
}
_UNSWAPS = {fast: plain for plain, fast in _SWAPS.items()}


def _check_module(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Make every ``torch.nn.GRU/LSTM/GRUCell/LSTMCell`` inside ``model`` a fastseq module.

    The swap is in place: each module keeps its identity, parameters, buffers,
    hooks and state_dict keys (fastseq's classes subclass torch's and add no
    state), so optimizers and checkpoints stay valid, and a patched model's
    ``state_dict`` loads into the unpatched model (and back) as it is.
    Subclasses of the torch classes are left alone (their forward may be
    custom), and so are LSTMs with ``proj_size > 0``, with a warning.

    ``torch.save(model)`` of a patched model pickles fastseq's classes, so
    loading it needs fastseq; :func:`unpatch` first (or save the ``state_dict``)
    for a file plain PyTorch loads.

    Returns:
        ``model`` itself, for chaining. Also works when ``model`` is itself an RNN.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    _check_module(model)
    for name, module in model.named_modules():
        target = _SWAPS.get(type(module))
        if target is None:
            continue
        if getattr(module, "proj_size", 0):
            warn(f"fastseq.patch: {name or 'model'} is an LSTM with proj_size={module.proj_size}, "
                 "which fastseq does not fuse; left as torch.nn.LSTM", UserWarning)
            continue
        module.__class__ = target
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch`: every fastseq ``GRU/LSTM/GRUCell/LSTMCell`` inside ``model``
    becomes the torch.nn class again, in place (same identity, parameters, hooks).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    _check_module(model)
    for module in model.modules():
        target = _UNSWAPS.get(type(module))
        if target is not None:
            module.__class__ = target
    return model
