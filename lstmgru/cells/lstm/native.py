"""The LSTM on torch's own kernels: oneDNN on the CPU, cuDNN on CUDA.

This IS torch.nn's forward (``torch.nn.LSTM.forward`` and ``torch.nn.LSTMCell.forward``), run
on our module, which keeps torch.nn's flat-weight bookkeeping (``lstmgru.modules``); so the
results are torch.nn's bit for bit, its argument checks and messages included.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backends import Case
from .._native import probe, variants_reason  # noqa: F401  (probe: auto's check)


def supports(case: Case) -> Optional[str]:
    return variants_reason(case)


module_forward = torch.nn.LSTM.forward
cell_forward = torch.nn.LSTMCell.forward
