"""Cell variants of the LSTM and the GRU: layer normalisation, zoneout, recurrent dropout,
weight drop (DropConnect on ``weight_hh``), and per-step state resets.

This is both the specification of the variants and, for now, their only implementation (the
``reference`` backend routes every call with a variant in force here; ``native`` and
``triton`` refuse them). It is a plain step loop of torch ops, differentiated by autograd to
any order; the plain cells keep their fast recurrences (``lstm/reference.py``,
``gru/reference.py``), which this file never touches.

Equations, per layer-direction, with ``LN(v; g, b) = (v - mean) / sqrt(var + 1e-5) * g + b``
over the whole last axis (F.layer_norm's form, biased variance)::

    LSTM  a  = LN_ih(x W_ih^T) + LN_hh((h*m) W_hh'^T) + b_ih + b_hh        (gates i, f, g, o)
          c' = f * c + i * g        h~ = o * tanh(LN_c(c'))     (then h~ W_hr^T with proj_size)
    GRU   [r_x, z_x, n_x] = LN_ih(x W_ih^T) + b_ih
          [r_h, z_h, n_h] = LN_hh((h*m) W_hh'^T) + b_hh
          r = sigmoid(r_x + r_h)   z = sigmoid(z_x + z_h)   n = tanh(n_x + r * n_h)
          (reset_after=False, no LN: n = tanh(n_x + (r * (h*m)) W_hn'^T + b_hn))
          h~ = (1 - z) * n + z * h
    zoneout  training: h_t = k * h_{t-1} + (1 - k) * h~_t,  k ~ Bernoulli(p) per (t, b, unit)
             eval:     h_t = p * h_{t-1} + (1 - p) * h~_t                (LSTM's c: not zoned)

Without ``layer_norm`` the LNs are the identity. ``m`` is the recurrent-dropout mask (one per
call and layer-direction, (B, P), entries 0 or 1/(1-p)); ``W_hh' = W_hh * M`` the weight-drop
mask (one per call and layer-direction, over the matrix, entries 0 or 1/(1-p)). Both only in
training. The carried state and the GRU's ``z * h`` use the unmasked h.

Resets (``reset`` (T, B) bool): forward in time, where ``reset[t, b]`` the state entering
step t for row b is zero (h and c). In reverse, ``reset[t, b]`` zeroes the state leaving step
t backwards, i.e. the state entering step t-1; the initial state always enters step T-1.
Where a row is inactive (packed input, past its length) the reset is ignored.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .._sequence import step_order

EPS = 1e-5
NAMES = ("layer_norm", "zoneout", "recurrent_dropout", "weight_drop")


def check_probability(name: str, value) -> float:
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not 0 <= value <= 1):
        raise ValueError(f"{name} should be a number in range [0, 1], got {value!r}")
    return float(value)


class Options(NamedTuple):
    """The variants of one module call, as the recurrences take them."""

    layer_norm: bool = False
    zoneout: float = 0.0
    recurrent_dropout: float = 0.0   # 0 unless training
    weight_drop: float = 0.0         # 0 unless training
    training: bool = False           # selects zoneout's form

    @staticmethod
    def of(module, training: bool) -> "Options":
        return Options(bool(module.layer_norm), float(module.zoneout),
                       float(module.recurrent_dropout) if training else 0.0,
                       float(module.weight_drop) if training else 0.0, bool(training))

    def in_force(self) -> Tuple[str, ...]:
        return tuple(name for name, on in zip(NAMES, (
            self.layer_norm, self.zoneout > 0, self.recurrent_dropout > 0,
            self.weight_drop > 0)) if on)


class Masks(NamedTuple):
    weight: Optional[torch.Tensor] = None      # like weight_hh
    recurrent: Optional[torch.Tensor] = None   # (B, P)
    zoneout: Optional[torch.Tensor] = None     # (T, B, P), 1 where the unit keeps its state


def _dropout_mask(shape, p: float, like: torch.Tensor) -> torch.Tensor:
    """Entries 0 or 1/(1-p), each kept with probability 1-p (all zero for p=1)."""
    return F.dropout(like.new_ones(shape), p, training=True)


def draw_masks(options: Options, weight_hh: torch.Tensor, num_steps: int, batch: int,
               width: int) -> Masks:
    """One layer-direction's masks for one call, from torch's RNG (weight, recurrent, zoneout
    in that order)."""
    weight = recurrent = zone = None
    if options.weight_drop > 0:
        weight = _dropout_mask(weight_hh.shape, options.weight_drop, weight_hh.detach())
    if options.recurrent_dropout > 0:
        recurrent = _dropout_mask((batch, width), options.recurrent_dropout, weight_hh.detach())
    if options.zoneout > 0 and options.training:
        zone = torch.bernoulli(weight_hh.detach().new_full((num_steps, batch, width),
                                                           options.zoneout))
    return Masks(weight, recurrent, zone)


def entering_cuts(reset: Optional[torch.Tensor], per_row: Optional[torch.Tensor],
                  reverse: bool) -> Optional[torch.Tensor]:
    """(T, B, 1) bool: where the state entering step t is zeroed (see the module docstring)."""
    if reset is None:
        return None
    T = reset.shape[0]
    if per_row is not None:
        steps = torch.arange(T, device=reset.device).unsqueeze(1)
        reset = reset & (steps < per_row.to(reset.device).unsqueeze(0))
    if reverse:
        reset = torch.cat([reset[1:], torch.zeros_like(reset[:1])])
    return reset.unsqueeze(2)


def _ln(v: torch.Tensor, gain: torch.Tensor, bias: Optional[torch.Tensor] = None):
    return F.layer_norm(v, (v.shape[-1],), gain, bias, EPS)


def _zone(h_prev, h_new, options: Options, keep: Optional[torch.Tensor]):
    if options.zoneout <= 0:
        return h_new
    if keep is not None:
        return keep * h_prev + (1 - keep) * h_new
    p = options.zoneout
    return p * h_prev + (1 - p) * h_new


def _select_active(t, per_row, new, old):
    if per_row is None:
        return new, new
    active = (t < per_row).unsqueeze(1)
    return torch.where(active, new, old), torch.where(active, new, torch.zeros_like(new))


def lstm_layer(x: torch.Tensor, weights, norms, h0: torch.Tensor, c0: torch.Tensor,
               per_row: Optional[torch.Tensor], reverse: bool, options: Options, masks: Masks,
               reset: Optional[torch.Tensor]):
    """One LSTM layer-direction with variants: x (T, B, I) -> y (T, B, P), h_n, c_n.

    ``weights`` = (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr); ``norms`` =
    (ln_ih_weight, ln_hh_weight, ln_c_weight, ln_c_bias) with ``options.layer_norm``, else
    None. ``per_row`` (B,) lengths or None; ``reset`` (T, B) bool or None."""
    weight_ih, weight_hh, bias_ih, bias_hh, weight_hr = weights
    if masks.weight is not None:
        weight_hh = weight_hh * masks.weight
    T = x.shape[0]
    gates_x = x @ weight_ih.t()
    if norms is not None:
        gates_x = _ln(gates_x, norms[0])
    if bias_ih is not None:
        gates_x = gates_x + (bias_ih + bias_hh)
    cuts = entering_cuts(reset, per_row, reverse)
    h, c = h0, c0
    ys = [None] * T
    for t in step_order(T, reverse):
        if cuts is not None:
            h = torch.where(cuts[t], torch.zeros_like(h), h)
            c = torch.where(cuts[t], torch.zeros_like(c), c)
        h_in = h if masks.recurrent is None else h * masks.recurrent
        rec = h_in @ weight_hh.t()
        if norms is not None:
            rec = _ln(rec, norms[1])
        i, f, g, o = (gates_x[t] + rec).chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new if norms is None else _ln(c_new, norms[2], norms[3]))
        if weight_hr is not None:
            h_new = h_new @ weight_hr.t()
        h_new = _zone(h, h_new, options, None if masks.zoneout is None else masks.zoneout[t])
        c, _ = _select_active(t, per_row, c_new, c)
        h, ys[t] = _select_active(t, per_row, h_new, h)
    return torch.stack(ys), h, c


def gru_layer(x: torch.Tensor, weights, norms, h0: torch.Tensor,
              per_row: Optional[torch.Tensor], reverse: bool, reset_after: bool,
              options: Options, masks: Masks, reset: Optional[torch.Tensor]):
    """One GRU layer-direction with variants: x (T, B, I) -> y (T, B, H), h_n.

    ``weights`` = (weight_ih, weight_hh, bias_ih, bias_hh); ``norms`` = (ln_ih_weight,
    ln_hh_weight) with ``options.layer_norm`` (reset_after only), else None."""
    weight_ih, weight_hh, bias_ih, bias_hh = weights
    if masks.weight is not None:
        weight_hh = weight_hh * masks.weight
    T = x.shape[0]
    H = h0.shape[1]
    gates_x = x @ weight_ih.t()
    if norms is not None:
        gates_x = _ln(gates_x, norms[0])
    if bias_ih is not None:
        gates_x = gates_x + bias_ih
    w_rz, w_n = weight_hh[:2 * H], weight_hh[2 * H:]
    cuts = entering_cuts(reset, per_row, reverse)
    h = h0
    ys = [None] * T
    for t in step_order(T, reverse):
        if cuts is not None:
            h = torch.where(cuts[t], torch.zeros_like(h), h)
        h_in = h if masks.recurrent is None else h * masks.recurrent
        x_r, x_z, x_n = gates_x[t].chunk(3, dim=1)
        if reset_after:
            rec = h_in @ weight_hh.t()
            if norms is not None:
                rec = _ln(rec, norms[1])
            if bias_hh is not None:
                rec = rec + bias_hh
            h_r, h_z, h_n = rec.chunk(3, dim=1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
        else:
            rec = h_in @ w_rz.t()
            if bias_hh is not None:
                rec = rec + bias_hh[:2 * H]
            h_r, h_z = rec.chunk(2, dim=1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            rec_n = (r * h_in) @ w_n.t()
            if bias_hh is not None:
                rec_n = rec_n + bias_hh[2 * H:]
            n = torch.tanh(x_n + rec_n)
        h_new = (1 - z) * n + z * h
        h_new = _zone(h, h_new, options, None if masks.zoneout is None else masks.zoneout[t])
        h, ys[t] = _select_active(t, per_row, h_new, h)
    return torch.stack(ys), h
