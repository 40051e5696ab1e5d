"""The LSTM as its equations, one step at a time: the specification and the tests' oracle.

Deliberately naive (no saved buffers, no explicit backward: autograd differentiates it, to any
order), so that it can be read against the paper and against torch.nn's documentation. Gates
are stacked i, f, g, o in ``weight_ih`` (4H, I) and ``weight_hh`` (4H, P). The fast paths
recompute through ``recurrence`` when a backward must itself be differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._sequence import step_order


def recurrence(gates_x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
               weight_hh: torch.Tensor, weight_hr: Optional[torch.Tensor] = None,
               per_row: Optional[torch.Tensor] = None, reverse: bool = False):
    """gates_x (T, B, 4H) = x W_ih^T + b_ih + b_hh; h0 (B, P), c0 (B, H); ``per_row`` (B,):
    row b runs steps t < per_row[b] and keeps its state elsewhere.
    Returns y (T, B, P) (0 where inactive), h_n, c_n."""
    T, B = gates_x.shape[:2]
    h, c = h0, c0
    ys = [None] * T
    for t in step_order(T, reverse):
        i, f, g, o = (gates_x[t] + h @ weight_hh.t()).chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        if weight_hr is not None:
            h_new = h_new @ weight_hr.t()
        if per_row is None:
            h, c, ys[t] = h_new, c_new, h_new
            continue
        active = (t < per_row).unsqueeze(1)
        c = torch.where(active, c_new, c)
        h = torch.where(active, h_new, h)
        ys[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c


def lstm_spec(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, weight_ih: torch.Tensor,
              weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor] = None,
              bias_hh: Optional[torch.Tensor] = None, weight_hr: Optional[torch.Tensor] = None,
              per_row: Optional[torch.Tensor] = None, reverse: bool = False):
    """One layer-direction from its input x (T, B, I): the projection, then ``recurrence``."""
    gates_x = x @ weight_ih.t()
    if bias_ih is not None:
        gates_x = gates_x + bias_ih + bias_hh
    return recurrence(gates_x, h0, c0, weight_hh, weight_hr, per_row, reverse)
