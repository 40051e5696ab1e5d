"""The GRU recurrence with cell variants (``lstmgru.cells.variants``) in plain PyTorch."""
from __future__ import annotations

from typing import Optional

import torch

from ..._sequence import Lengths
from ..variants import StepVariants, gru_steps


def gru_recurrence(gates_x: torch.Tensor, h0: torch.Tensor, weight_hh: torch.Tensor,
                   bias_hn: Optional[torch.Tensor], lengths: Optional[Lengths], reverse: bool,
                   reset_after: bool, variants: StepVariants):
    per_row = None if lengths is None else lengths.per_row
    return gru_steps(gates_x, h0, weight_hh, bias_hn, per_row, reverse, reset_after, variants)
