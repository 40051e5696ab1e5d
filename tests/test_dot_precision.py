"""The fp32 product precision of the kernels follows the setting torch.nn's cuDNN RNN obeys.

torch >= 2.9 has per-op fp32 precisions ("ieee", "tf32", "none" = ask the parent), and its
legacy getter ``torch.backends.cudnn.allow_tf32`` raises once the RNN and convolution settings
differ. ``dot_precision`` must follow the new API, never raise, and read the legacy flag only
where the new API does not exist. No GPU is needed: the decision only looks at the settings and
at the device type.
"""
import itertools

import pytest
import torch

from lstmgru._kernels import _common
from lstmgru._kernels._common import dot_precision, fp32_rnn_allows_tf32

CUDA = torch.device("cuda")
HAS_NEW_API = hasattr(torch.backends.cudnn, "rnn") and hasattr(
    torch.backends.cudnn.rnn, "fp32_precision")
needs_new_api = pytest.mark.skipif(not HAS_NEW_API, reason="torch < 2.9: no fp32_precision API")
PRECISIONS = ("ieee", "tf32", "none")


@pytest.fixture(autouse=True)
def restore_precision_flags():
    """Every test changes global torch flags; put them back as they were."""
    backends = torch.backends
    legacy = backends.cudnn.allow_tf32  # the defaults are consistent, so this does not raise
    saved = {}
    if HAS_NEW_API:
        saved = {obj: obj.fp32_precision for obj in (
            backends, backends.cudnn, backends.cudnn.rnn, backends.cudnn.conv,
            backends.cuda.matmul)}
    yield
    backends.cudnn.allow_tf32 = legacy  # writes the RNN and conv settings: restore them after
    for obj, value in saved.items():
        obj.fp32_precision = value


def expected_tf32(rnn, cudnn_all, generic):
    """The spec, written out: the first setting that is not "none", from the most specific."""
    for value in (rnn, cudnn_all, generic):
        if value != "none":
            return value == "tf32"
    return False


@needs_new_api
@pytest.mark.parametrize("rnn,cudnn_all,generic", list(itertools.product(PRECISIONS, repeat=3)))
def test_new_api_every_combination(rnn, cudnn_all, generic):
    torch.backends.fp32_precision = generic
    torch.backends.cudnn.fp32_precision = cudnn_all
    torch.backends.cudnn.rnn.fp32_precision = rnn
    want = "tf32" if expected_tf32(rnn, cudnn_all, generic) else "ieee"
    assert dot_precision(torch.float32, CUDA) == want
    # Half precisions and CPU tensors (the interpreter) never take the option.
    assert dot_precision(torch.float16, CUDA) == "ieee"
    assert dot_precision(torch.bfloat16, CUDA) == "ieee"
    assert dot_precision(torch.float32, torch.device("cpu")) == "ieee"


@needs_new_api
def test_rnn_ieee_alone_does_not_raise():
    """The user's natural setting: cuDNN RNNs in IEEE. torch's legacy getter then raises (the
    crash this guards against); dot_precision answers IEEE."""
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    with pytest.raises(RuntimeError, match="different TF32 flags"):
        torch.backends.cudnn.allow_tf32
    assert dot_precision(torch.float32, CUDA) == "ieee"
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert dot_precision(torch.float32, CUDA) == "tf32"


@needs_new_api
@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("rnn", PRECISIONS)
def test_mixed_apis_never_raise(legacy, rnn):
    """Legacy flag set first, then the new one (or the reverse): the last word wins, as it does
    for cuDNN's RNN, whose setting the legacy setter writes."""
    torch.backends.cudnn.allow_tf32 = legacy
    torch.backends.cudnn.rnn.fp32_precision = rnn
    # The legacy setter leaves the RNN at "tf32" or "none" (which then inherits).
    parent = torch.backends.cudnn.fp32_precision
    generic = torch.backends.fp32_precision
    want = expected_tf32(rnn, parent, generic)
    assert dot_precision(torch.float32, CUDA) == ("tf32" if want else "ieee")
    torch.backends.cudnn.rnn.fp32_precision = rnn
    torch.backends.cudnn.allow_tf32 = legacy
    assert dot_precision(torch.float32, CUDA) == ("tf32" if legacy else "ieee")


@needs_new_api
def test_default_follows_cudnn_rnn_default():
    """torch's default (allow_tf32 on for cuDNN) is TF32 for cuDNN's RNN, so for us too."""
    torch.backends.cudnn.allow_tf32 = True
    assert torch.backends.cudnn.rnn.fp32_precision == "tf32"
    assert fp32_rnn_allows_tf32()


@pytest.mark.parametrize("legacy", [True, False])
def test_legacy_flag_without_the_new_api(monkeypatch, legacy):
    """torch < 2.9 has only the legacy flag: it decides there."""
    monkeypatch.setattr(_common, "_fp32_precision_of", None)
    torch.backends.cudnn.allow_tf32 = legacy
    assert dot_precision(torch.float32, CUDA) == ("tf32" if legacy else "ieee")
