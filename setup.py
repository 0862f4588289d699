"""Build shim: metadata lives in pyproject.toml.

The C++/CUDA fallback (csrc/) will be built here through
torch.utils.cpp_extension when FASTSEQ_BUILD_EXT=1; today fastseq is pure Python
(Triton kernels compile at run time).
"""
from setuptools import setup

setup()
