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


@pytest.fixture(autouse=True, scope="session")
def _ieee_fp32_products_on_cuda():
    """On a GPU every suite compares fp32 against float64 with IEEE-sized tolerances, while
    torch's default lets cuDNN's RNN, and so the kernels, multiply fp32 in TF32 (~1e-3 off).
    Tests that want TF32 ask for it (``tests/test_gpu.py``)."""
    if not _has_cuda:
        yield
        return
    from _precision import fp32_precision

    with fp32_precision("ieee"):
        yield


@pytest.fixture(params=["reference", "native"])
def backend(request):
    """Runs a test on every implementation that takes CPU cases of torch.nn's function."""
    import lstmgru

    with lstmgru.use_backend(request.param):
        yield request.param
