"""The suites of ``fastseq bench``, by name; each module has ``run(ctx)`` (see :mod:`fastseq.bench.core`).

* ``layer``: GRU/LSTM layers, forward and forward+backward, dense and packed, uni- and bidirectional,
  against torch.nn (oneDNN / cuDNN), an eager loop over torch.nn cells, and FlashRNN (GPU).
* ``cell``: GRUCell/LSTMCell, one step, against torch.nn's cells.
* ``attention``: additive attention, one query and many, against the eager formula.
* ``decoder_step``: the three-launch attention-GRU decoder step against the eager decoder.
* ``train_step``: a whole seq2seq training step against the same model on eager torch.nn
  modules and torch.compile of it.
* ``decode``: greedy and beam search against the eager model.
* ``lm``: the language model's training step (characters/s) and token-by-token generation
  (tokens/s) against the same model on torch.nn.
* ``host``: host (Python) time per launched step of the Triton kernels, with Triton's launch
  path driven by a stub driver, so launch overhead is measured without a GPU.
* ``sync`` (CUDA only, run when named): the persistent kernels' fixed cost per step, the grid
  barrier and the state's exchange, alone, by three ways to synchronise.
"""
import importlib
from types import ModuleType

#: Suite names in the order a full run goes through them.
NAMES = ("layer", "cell", "attention", "decoder_step", "train_step", "decode", "lm", "host")
#: Suites that need a CUDA device: run only when named (``--suite sync``).
CUDA_ONLY = ("sync",)


def load(name: str) -> ModuleType:
    """The suite module ``name`` (imported when a run needs it).

    Raises:
        KeyError: no such suite.
    """
    if name not in NAMES + CUDA_ONLY:
        raise KeyError(f"suite: expected one of {NAMES + CUDA_ONLY}, got {name!r}")
    return importlib.import_module(f"fastseq.bench.suites.{name}")
