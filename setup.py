"""Build shim: metadata lives in pyproject.toml.

By default fastseq installs as pure Python: the Triton kernels compile at run
time and the C++ extension (csrc/) is built on first use by
torch.utils.cpp_extension.load (JIT, cached per user; see
fastseq/backend/extension.py). A wheel carries the C++/CUDA sources inside the
package (``fastseq/csrc/``, copied by ``build_py`` below), so an installed
fastseq builds its extension the same way; ninja comes from the ``ninja``
package on PyPI (a dependency).

The benchmark suite in bench/ is installed as ``fastseq.bench`` (``fastseq bench``).

Ahead of time: ``FASTSEQ_BUILD_EXT=1 pip install --no-build-isolation .``
builds it here as ``fastseq/_C*.so`` (CPU kernels; plus the CUDA kernels when
torch has CUDA, nvcc is found and a GPU is visible or ``TORCH_CUDA_ARCH_LIST``
names the architectures; ``FASTSEQ_BUILD_CUDA=0`` skips them). The
build needs torch installed already, hence ``--no-build-isolation``.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_csrc(build_py):
    """Also copy csrc/ (the C++/CUDA sources and headers) into the built package as fastseq/csrc/."""

    def run(self):
        super().run()
        src = os.path.join(HERE, "csrc")
        dst = os.path.join(self.build_lib, "fastseq", "csrc")
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.so"))


ext_modules, cmdclass = [], {"build_py": build_py_with_csrc}
if os.environ.get("FASTSEQ_BUILD_EXT", "") == "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    # The same rule as fastseq.backend.extension.want_cuda(): with no GPU and no
    # TORCH_CUDA_ARCH_LIST, torch's builder has no architecture to compile for.
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and bool(cuda)
                and os.environ.get("FASTSEQ_BUILD_CUDA", "1") != "0"
                and (bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or torch.cuda.device_count() > 0))
    omp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    cxx = ["-O3", "-DNDEBUG", "-fno-trapping-math", "-fno-math-errno"] + (["-fopenmp"] if omp else [])
    kw = dict(
        include_dirs=[os.path.join(HERE, "csrc"), os.path.join(HERE, "csrc", "cpu"), os.path.join(HERE, "csrc", "cuda")],
        extra_link_args=["-fopenmp"] if omp else [],
    )
    if use_cuda:
        ext = CUDAExtension("fastseq._C", cpu + cuda, define_macros=[("FASTSEQ_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, **kw)
    else:
        ext = CppExtension("fastseq._C", cpu, extra_compile_args={"cxx": cxx}, **kw)
    ext_modules = [ext]
    cmdclass["build_ext"] = BuildExtension

# bench/ (the benchmark suite, `fastseq bench`) is installed as the package fastseq.bench.
packages = find_packages(include=["fastseq", "fastseq.*"])
packages += ["fastseq.bench"] + ["fastseq.bench." + p for p in find_packages(where="bench")]
setup(packages=packages, package_dir={"fastseq.bench": "bench"}, ext_modules=ext_modules, cmdclass=cmdclass)
