"""The LSTM as its equations, one step at a time: the specification and the tests' oracle.

Deliberately naive (no saved buffers, no explicit backward: autograd differentiates it), so
that it can be read against the paper and against torch.nn's documentation. Gates are stacked
i, f, g, o in ``weight_ih`` (4H, I) and ``weight_hh`` (4H, P).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._sequence import step_order


def lstm_spec(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, weight_ih: torch.Tensor,
              weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor] = None,
              bias_hh: Optional[torch.Tensor] = None, weight_hr: Optional[torch.Tensor] = None,
              lengths: Optional[torch.Tensor] = None, reverse: bool = False):
    """x (T, B, I), h0 (B, P), c0 (B, H); ``lengths`` (B,): row b runs steps t < lengths[b]
    and keeps its state elsewhere. Returns y (T, B, P) (0 where inactive), h_n, c_n."""
    T, B = x.shape[:2]
    h, c = h0, c0
    ys = [None] * T
    for t in step_order(T, reverse):
        a = x[t] @ weight_ih.t() + h @ weight_hh.t()
        if bias_ih is not None:
            a = a + bias_ih + bias_hh
        i, f, g, o = a.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        if weight_hr is not None:
            h_new = h_new @ weight_hr.t()
        active = torch.ones(B, 1, dtype=torch.bool, device=x.device) if lengths is None \
            else (t < lengths).unsqueeze(1)
        c = torch.where(active, c_new, c)
        h = torch.where(active, h_new, h)
        ys[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c
