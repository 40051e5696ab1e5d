"""The precision of fp32 products on CUDA, for the GPU tests."""
import contextlib

import torch


@contextlib.contextmanager
def fp32_precision(precision):
    """fp32 products in ``precision`` ("ieee" or "tf32") inside the block, through the API this
    torch has: ``torch.backends.cudnn.rnn.fp32_precision`` (torch >= 2.9, what cuDNN's RNN and
    the kernels follow; the legacy getter raises once it differs from the conv setting), else
    ``torch.backends.cudnn.allow_tf32``. Restored afterwards."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and isinstance(getattr(rnn, "fp32_precision", None), str):
        saved = rnn.fp32_precision
        rnn.fp32_precision = precision
        try:
            yield
        finally:
            rnn.fp32_precision = saved
    else:
        saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = saved
