"""Test setup: on a machine without a GPU, the Triton kernels run under the
Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported),
and every output is NaN-poisoned before kernels write it."""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from fastseq import _backend  # noqa: E402

_backend.set_poison(True)


def _available_backends():
    names = ["reference"]
    ok, _ = _backend.triton_status()
    if ok and (torch.cuda.is_available() or _backend.interpreter_on()):
        names.append("triton")
    if _backend.cpp_status()[0]:  # builds the C++ extension on first use (cached)
        names.append("cpp")
    return names


BACKENDS = _available_backends()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["reference", "triton", "cpp"])
def backend(request):
    """Run the test once per backend, forcing it for every fastseq op."""
    name = request.param
    if name not in BACKENDS:
        why = _backend.cpp_status()[1] if name == "cpp" else _backend.triton_status()[1]
        pytest.skip(f"backend {name} not available here: {why}")
    with _backend.backend(name):
        yield name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
