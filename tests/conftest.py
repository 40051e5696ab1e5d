import os

# Triton reads TRITON_INTERPRET when it is imported, so it must be decided before any test
# module imports triton. Without a GPU the interpreter is the only way to run the kernels.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(params=["reference", "native"])
def backend(request):
    """Runs a test on every implementation that takes CPU cases of torch.nn's function."""
    import lstmgru

    with lstmgru.use_backend(request.param):
        yield request.param
