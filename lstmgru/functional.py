"""One layer in one direction: the input projection as ONE GEMM over all steps, then the
recurrence on the backend that ``lstmgru._dispatch`` picks.

Biases that enter the gates additively are folded into the projection: both LSTM biases,
and for the GRU ``b_ir + b_hr``, ``b_iz + b_hz`` (and ``b_in + b_hn`` in the original,
``reset_after=False`` form). Only the GRU's ``b_hn`` with ``reset_after=True`` stays with
the recurrence, since it sits inside ``r * (W_hn h + b_hn)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _dispatch, reference


def input_projection(x: torch.Tensor, weight_ih: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ weight_ih^T + bias`` for all (T, B) rows at once: (T, B, I) -> (T, B, G)."""
    T, B, _ = x.shape
    rows = x.reshape(T * B, x.shape[2])
    if bias is None:
        gates = torch.mm(rows, weight_ih.t())
    else:
        gates = torch.addmm(bias, rows, weight_ih.t())
    return gates.view(T, B, weight_ih.shape[0])


def _kernel_gap(dtype: torch.dtype, *, proj: bool) -> Optional[str]:
    """Why the Triton kernels cannot take this case, or None. Imports no Triton code."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the kernels support float32, float16 and bfloat16, not {dtype}"
    if proj:
        return "LSTM with proj_size > 0 runs on the reference path: the kernels have no projection"
    return None


def lstm_layer(x: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
               bias_ih: Optional[torch.Tensor], bias_hh: Optional[torch.Tensor],
               weight_hr: Optional[torch.Tensor], h0: torch.Tensor, c0: torch.Tensor,
               batch_sizes: Optional[Sequence[int]] = None, reverse: bool = False):
    """LSTM over x (T, B, I) -> y (T, B, P), h_n (B, P), c_n (B, H)."""
    bias = None if bias_ih is None else bias_ih + bias_hh
    gates_x = input_projection(x, weight_ih, bias)
    gap = _kernel_gap(gates_x.dtype, proj=weight_hr is not None)
    if _dispatch.choose(gates_x.device, gap) == "triton":
        from . import _ops

        return _ops.lstm_recurrence(gates_x, h0, c0, weight_hh, None, batch_sizes, reverse)
    return reference.lstm_recurrence(gates_x, h0, c0, weight_hh, weight_hr, batch_sizes, reverse)


def gru_layer(x: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
              bias_ih: Optional[torch.Tensor], bias_hh: Optional[torch.Tensor], h0: torch.Tensor,
              batch_sizes: Optional[Sequence[int]] = None, reverse: bool = False,
              reset_after: bool = True):
    """GRU over x (T, B, I) -> y (T, B, H), h_n (B, H)."""
    bias = bias_hn = None
    if bias_ih is not None:
        H = weight_hh.shape[1]
        if reset_after:
            bias = torch.cat([bias_ih[:2 * H] + bias_hh[:2 * H], bias_ih[2 * H:]])
            bias_hn = bias_hh[2 * H:]
        else:
            bias = bias_ih + bias_hh
    gates_x = input_projection(x, weight_ih, bias)
    gap = _kernel_gap(gates_x.dtype, proj=False)
    if _dispatch.choose(gates_x.device, gap) == "triton":
        from . import _ops

        return _ops.gru_recurrence(gates_x, h0, weight_hh, bias_hn, batch_sizes, reverse,
                                   reset_after)
    return reference.gru_recurrence(gates_x, h0, weight_hh, bias_hn, batch_sizes, reverse,
                                    reset_after)
