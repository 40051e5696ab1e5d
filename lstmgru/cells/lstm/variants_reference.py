"""The LSTM recurrence with cell variants (``lstmgru.cells.variants``) in plain PyTorch."""
from __future__ import annotations

from typing import Optional

import torch

from ..._sequence import Lengths
from ..variants import StepVariants, lstm_steps


def lstm_recurrence(gates_x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                    weight_hh: torch.Tensor, weight_hr: Optional[torch.Tensor],
                    lengths: Optional[Lengths], reverse: bool, variants: StepVariants):
    per_row = None if lengths is None else lengths.per_row
    return lstm_steps(gates_x, h0, c0, weight_hh, weight_hr, per_row, reverse, variants)
