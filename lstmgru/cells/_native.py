"""What every cell's native implementation shares: what torch's own kernels cannot compute."""
from __future__ import annotations

from typing import Optional

from ..backends import Case


def variants_reason(case: Case) -> Optional[str]:
    if case.transform == "torch.compile":
        # Traced, torch's RNN op decomposes into per-step ops: a graph unrolled over a fixed T.
        return ("under torch.compile/torch.export torch's RNN op is unrolled over the steps; "
                "the recurrence runs as one lstmgru op instead")
    if case.transform == "torch.func":
        return "torch's RNN kernels have no torch.func (vmap) rules"
    if case.transform == "forward-mode AD":
        # oneDNN's LSTM (float32 on the CPU) raises: mkldnn_rnn_layer has no forward-AD formula
        return "torch's oneDNN LSTM kernel has no forward-mode AD formula"
    if case.variants:
        return f"torch's kernels compute none of the cell variants ({', '.join(case.variants)})"
    return None
