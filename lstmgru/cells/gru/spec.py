"""The GRU as its equations, one step at a time: the specification and the tests' oracle.

Gates are stacked r, z, n in ``weight_ih`` (3H, I) and ``weight_hh`` (3H, H). Two forms of
the candidate n: ``reset_after=True`` is torch.nn's and cuDNN's, ``reset_after=False`` is the
original GRU (Cho et al. 2014; Keras ``reset_after=False``), where the reset gate acts on h
before the recurrent product. Differentiable by autograd; naive on purpose.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._sequence import step_order


def gru_spec(x: torch.Tensor, h0: torch.Tensor, weight_ih: torch.Tensor,
             weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor] = None,
             bias_hh: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None,
             reverse: bool = False, reset_after: bool = True):
    """x (T, B, I), h0 (B, H); ``lengths`` as in ``lstm_spec``. Returns y (T, B, H), h_n."""
    T, B = x.shape[:2]
    H = h0.shape[1]
    b_ih = bias_ih if bias_ih is not None else x.new_zeros(3 * H)
    b_hh = bias_hh if bias_hh is not None else x.new_zeros(3 * H)
    w_hr, w_hz, w_hn = weight_hh.chunk(3, dim=0)
    b_hr, b_hz, b_hn = b_hh.chunk(3)
    h = h0
    ys = [None] * T
    for t in step_order(T, reverse):
        x_r, x_z, x_n = (x[t] @ weight_ih.t() + b_ih).chunk(3, dim=1)
        r = torch.sigmoid(x_r + h @ w_hr.t() + b_hr)
        z = torch.sigmoid(x_z + h @ w_hz.t() + b_hz)
        if reset_after:
            n = torch.tanh(x_n + r * (h @ w_hn.t() + b_hn))
        else:
            n = torch.tanh(x_n + (r * h) @ w_hn.t() + b_hn)
        h_new = (1 - z) * n + z * h
        active = torch.ones(B, 1, dtype=torch.bool, device=x.device) if lengths is None \
            else (t < lengths).unsqueeze(1)
        h = torch.where(active, h_new, h)
        ys[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h
