"""The GRU on torch's own kernels: ATen's loop on the CPU, cuDNN on CUDA.

As for the LSTM (``lstmgru/cells/lstm/native.py``), this is torch.nn's own forward run on our
module, bit for bit. torch computes only the ``reset_after=True`` form.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backends import Case
from .._native import probe, variants_reason  # noqa: F401  (probe: auto's check)


def supports(case: Case) -> Optional[str]:
    if not case.reset_after:
        return ("torch's GRU is the reset_after=True form; the original GRU "
                "(reset_after=False) runs on 'reference' or 'triton'")
    return variants_reason(case)


module_forward = torch.nn.GRU.forward
cell_forward = torch.nn.GRUCell.forward
