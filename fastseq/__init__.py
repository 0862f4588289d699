"""fastseq: fused GRU/LSTM and additive-attention kernels as drop-in PyTorch modules.

Importing fastseq changes no torch setting (no global flag, no default dtype);
the C++ extension is built on first use, Triton is imported on first use.
"""
from fastseq import backend  # the package; also the context manager: with fastseq.backend("reference")
from fastseq.backend.selection import get_backend, set_backend
from fastseq.nn.patch import patch, unpatch

__version__ = "0.1.0"

__all__ = ["__version__", "backend", "get_backend", "patch", "set_backend", "unpatch"]
