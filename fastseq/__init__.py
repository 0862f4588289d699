"""fastseq: fused GRU/LSTM and additive-attention kernels as drop-in PyTorch modules."""
from fastseq._backend import backend, get_backend, set_backend
from fastseq.nn.patch import patch

__version__ = "0.1.0"

__all__ = ["__version__", "backend", "get_backend", "patch", "set_backend"]
