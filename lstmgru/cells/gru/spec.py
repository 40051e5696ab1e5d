"""The GRU as its equations, one step at a time: the specification and the tests' oracle.

Gates are stacked r, z, n in ``weight_ih`` (3H, I) and ``weight_hh`` (3H, H). Two forms of
the candidate n: ``reset_after=True`` is torch.nn's and cuDNN's, ``reset_after=False`` is the
original GRU (Cho et al. 2014; Keras ``reset_after=False``), where the reset gate acts on h
before the recurrent product. Naive on purpose, and differentiable by autograd to any order.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._sequence import step_order


def recurrence(gates_x: torch.Tensor, h0: torch.Tensor, weight_hh: torch.Tensor,
               bias_hn: Optional[torch.Tensor] = None, per_row: Optional[torch.Tensor] = None,
               reverse: bool = False, reset_after: bool = True):
    """gates_x (T, B, 3H) = x W_ih^T + b_ih + every recurrent bias that adds (b_hr, b_hz, and
    b_hn when ``reset_after=False``); ``bias_hn`` (H,) only with ``reset_after``, where it
    sits inside ``r * (W_hn h + b_hn)``. ``per_row`` as in the LSTM's ``recurrence``.
    Returns y (T, B, H) (0 where inactive), h_n."""
    T, B = gates_x.shape[:2]
    w_hr, w_hz, w_hn = weight_hh.chunk(3, dim=0)
    h = h0
    ys = [None] * T
    for t in step_order(T, reverse):
        x_r, x_z, x_n = gates_x[t].chunk(3, dim=1)
        r = torch.sigmoid(x_r + h @ w_hr.t())
        z = torch.sigmoid(x_z + h @ w_hz.t())
        if reset_after:
            h_n = h @ w_hn.t()
            n = torch.tanh(x_n + r * (h_n if bias_hn is None else h_n + bias_hn))
        else:
            n = torch.tanh(x_n + (r * h) @ w_hn.t())
        h_new = (1 - z) * n + z * h
        if per_row is None:
            h, ys[t] = h_new, h_new
            continue
        active = (t < per_row).unsqueeze(1)
        h = torch.where(active, h_new, h)
        ys[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h


def gru_spec(x: torch.Tensor, h0: torch.Tensor, weight_ih: torch.Tensor,
             weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor] = None,
             bias_hh: Optional[torch.Tensor] = None, per_row: Optional[torch.Tensor] = None,
             reverse: bool = False, reset_after: bool = True):
    """One layer-direction from its input x (T, B, I): the projection, then ``recurrence``."""
    H = h0.shape[1]
    gates_x = x @ weight_ih.t()
    bias_hn = None
    if bias_ih is not None:
        if reset_after:
            gates_x = gates_x + bias_ih + torch.cat([bias_hh[:2 * H], bias_hh.new_zeros(H)])
            bias_hn = bias_hh[2 * H:]
        else:
            gates_x = gates_x + bias_ih + bias_hh
    return recurrence(gates_x, h0, weight_hh, bias_hn, per_row, reverse, reset_after)
