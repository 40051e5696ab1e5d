"""Cell variants of the LSTM and the GRU: layer normalisation, zoneout, recurrent dropout,
weight drop (DropConnect on ``weight_hh``), and per-step state resets.

This file is the variants' specification and what every implementation shares: the options
and their checks, the masks (drawn once per call and layer-direction from torch's RNG), the
parts outside the time loop (LN_ih, weight drop), and ``lstm_steps`` / ``gru_steps``, the
equations as naive step loops differentiated by autograd to any order. Those are the oracle
of the fast recurrences (``lstm/variants_reference.py``, ``gru/variants_reference.py`` and the
tiled Triton kernels) and what they recompute through under ``create_graph``.

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

from .._sequence import input_projection as plain_input_projection
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
    zoneout: Optional[torch.Tensor] = None     # (T, B, P) bool, True where the unit keeps its state


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
                                                           options.zoneout)).bool()
    return Masks(weight, recurrent, zone)


def entering_cuts(reset: Optional[torch.Tensor], per_row: Optional[torch.Tensor],
                  reverse: bool) -> Optional[torch.Tensor]:
    """(T, B) bool: where the state entering step t is zeroed (see the module docstring).
    Positions where a row is inactive never cut."""
    if reset is None:
        return None
    T = reset.shape[0]
    if per_row is not None:
        steps = torch.arange(T, device=reset.device).unsqueeze(1)
        reset = reset & (steps < per_row.to(reset.device).unsqueeze(0))
    if reverse:
        reset = torch.cat([reset[1:], torch.zeros_like(reset[:1])])
    return reset.contiguous()


class StepVariants(NamedTuple):
    """What a recurrence applies inside its time loop, for one layer-direction and one call.

    Weight drop and ``LN_ih`` act outside the loop (the layer function hands the recurrence
    ``weight_hh * mask`` and a normalised input projection), so they are not here."""

    ln_hh_weight: Optional[torch.Tensor] = None    # (G,): LN_hh over the recurrent product
    ln_c_weight: Optional[torch.Tensor] = None     # (H,): the LSTM's LN_c gain ...
    ln_c_bias: Optional[torch.Tensor] = None       # (H,): ... and bias
    recurrent_mask: Optional[torch.Tensor] = None  # (B, P), entries 0 or 1/(1-p)
    zoneout: float = 0.0                           # p
    zoneout_keep: Optional[torch.Tensor] = None    # (T, B, P) bool, training; None: eval form
    cuts: Optional[torch.Tensor] = None            # (T, B) bool (``entering_cuts``)

    @property
    def layer_norm(self) -> bool:
        return self.ln_hh_weight is not None

    def in_force(self) -> Tuple[str, ...]:
        """The names of what this applies (those a recurrence must implement)."""
        return tuple(name for name, on in (
            ("layer_norm", self.layer_norm), ("zoneout", self.zoneout > 0),
            ("recurrent_dropout", self.recurrent_mask is not None),
            ("reset", self.cuts is not None)) if on)


def step_variants(options: Options, masks: Masks, norms, cuts) -> StepVariants:
    """The loop's part of one layer-direction's variants (``norms`` as the layers take them)."""
    ln = (None, None, None) if norms is None else (tuple(norms[1:]) + (None, None))[:3]
    return StepVariants(*ln, masks.recurrent, options.zoneout, masks.zoneout, cuts)


def _ln(v: torch.Tensor, gain: torch.Tensor, bias: Optional[torch.Tensor] = None):
    return F.layer_norm(v, (v.shape[-1],), gain, bias, EPS)


def zone(h_prev: torch.Tensor, h_new: torch.Tensor, variants: StepVariants, t: int):
    """Zoneout of step t: each unit keeps ``h_prev`` (training: where the mask says; eval:
    in expectation, with weight p)."""
    if variants.zoneout <= 0:
        return h_new
    if variants.zoneout_keep is not None:
        return torch.where(variants.zoneout_keep[t], h_prev, h_new)
    p = variants.zoneout
    return p * h_prev + (1 - p) * h_new


def _cut(state: torch.Tensor, variants: StepVariants, t: int) -> torch.Tensor:
    if variants.cuts is None:
        return state
    return torch.where(variants.cuts[t].unsqueeze(1), torch.zeros_like(state), state)


def _select_active(t, per_row, new, old):
    if per_row is None:
        return new, new
    active = (t < per_row).unsqueeze(1)
    return torch.where(active, new, old), torch.where(active, new, torch.zeros_like(new))


# --------------------------------------------------------------------------------------
# The recurrences with variants as equations: naive step loops, differentiable to any order.
# They are the oracle of the fast paths and what those recompute under create_graph.
# --------------------------------------------------------------------------------------
def lstm_steps(gates_x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
               weight_hh: torch.Tensor, weight_hr: Optional[torch.Tensor],
               per_row: Optional[torch.Tensor], reverse: bool, variants: StepVariants):
    """The LSTM recurrence with ``variants``: gates_x (T, B, 4H) = LN_ih(x W_ih^T) + b_ih +
    b_hh; ``weight_hh`` already weight-dropped. Returns y (T, B, P), h_n, c_n."""
    T = gates_x.shape[0]
    h, c = h0, c0
    ys = [None] * T
    for t in step_order(T, reverse):
        h, c = _cut(h, variants, t), _cut(c, variants, t)
        h_in = h if variants.recurrent_mask is None else h * variants.recurrent_mask
        rec = h_in @ weight_hh.t()
        if variants.layer_norm:
            rec = _ln(rec, variants.ln_hh_weight)
        i, f, g, o = (gates_x[t] + rec).chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        c_out = c_new if not variants.layer_norm else _ln(c_new, variants.ln_c_weight,
                                                           variants.ln_c_bias)
        h_new = o * torch.tanh(c_out)
        if weight_hr is not None:
            h_new = h_new @ weight_hr.t()
        h_new = zone(h, h_new, variants, t)
        c, _ = _select_active(t, per_row, c_new, c)
        h, ys[t] = _select_active(t, per_row, h_new, h)
    return torch.stack(ys), h, c


def gru_steps(gates_x: torch.Tensor, h0: torch.Tensor, weight_hh: torch.Tensor,
              bias_hn: Optional[torch.Tensor], per_row: Optional[torch.Tensor], reverse: bool,
              reset_after: bool, variants: StepVariants):
    """The GRU recurrence with ``variants``: gates_x (T, B, 3H) = LN_ih(x W_ih^T) + the
    additive biases, as ``gru.spec.recurrence`` takes it; with ``layer_norm``, LN_hh acts on
    ``h W_hh^T`` before ``bias_hn`` joins its n block. Returns y (T, B, H), h_n."""
    T = gates_x.shape[0]
    H = h0.shape[1]
    w_rz, w_n = weight_hh[:2 * H], weight_hh[2 * H:]
    h = h0
    ys = [None] * T
    for t in step_order(T, reverse):
        h = _cut(h, variants, t)
        h_in = h if variants.recurrent_mask is None else h * variants.recurrent_mask
        x_r, x_z, x_n = gates_x[t].chunk(3, dim=1)
        if reset_after:
            rec = h_in @ weight_hh.t()
            if variants.layer_norm:
                rec = _ln(rec, variants.ln_hh_weight)
            h_r, h_z, h_n = rec.chunk(3, dim=1)
            if bias_hn is not None:
                h_n = h_n + bias_hn
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
        else:
            h_r, h_z = (h_in @ w_rz.t()).chunk(2, dim=1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + (r * h_in) @ w_n.t())
        h_new = zone(h, (1 - z) * n + z * h, variants, t)
        h, ys[t] = _select_active(t, per_row, h_new, h)
    return torch.stack(ys), h


# --------------------------------------------------------------------------------------
# What the fast recurrences share: the variants as per-step factors.
# --------------------------------------------------------------------------------------
def carry_factors(zoneout: float, zoneout_keep: Optional[torch.Tensor],
                  per_row: Optional[torch.Tensor], T: int, like: torch.Tensor):
    """How much of the state entering each step it leaves unchanged: zoneout's kept share (the
    0/1 mask in training, p in eval) and 1 where a row is inactive (packed input). A (T, B, X)
    tensor (X = 1 or the state width), a float, or None (the step replaces the state).
    Every step then ends with ``h = lerp(h_new, h_prev, carry)``, and its backward splits
    dL/dh the same way."""
    carry = None
    if zoneout > 0:
        carry = zoneout if zoneout_keep is None else zoneout_keep.to(like.dtype)
    if per_row is None:
        return carry
    inactive = 1 - active_factors(per_row, T, like)
    if carry is None:
        return inactive
    return torch.maximum(inactive, inactive.new_tensor(carry) if isinstance(carry, float)
                         else carry)


def keep_factors(cuts: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """(T, B, 1) in the run dtype: 0 where the state entering the step is cut, else 1."""
    return None if cuts is None else (~cuts).unsqueeze(2).to(like.dtype)


def active_factors(per_row: Optional[torch.Tensor], T: int,
                   like: torch.Tensor) -> Optional[torch.Tensor]:
    """(T, B, 1) in the run dtype: 1 where a row is active, or None for no lengths."""
    if per_row is None:
        return None
    steps = torch.arange(T, device=like.device).unsqueeze(1)
    return (steps < per_row.unsqueeze(0)).unsqueeze(2).to(like.dtype)


layer_norm_backward = torch.ops.aten.native_layer_norm_backward


def layer_norm_stats_dtype(like: torch.Tensor, gain: torch.Tensor) -> torch.dtype:
    """The dtype of ATen's layer-norm mean and 1/std for inputs like ``like`` (it differs by
    device: half inputs give float statistics on CUDA)."""
    size = gain.shape[0]
    return torch.native_layer_norm(like.new_empty(1, size), (size,), gain, None, EPS)[1].dtype


def nothing(like: torch.Tensor) -> torch.Tensor:
    """Stands in for a result an op does not compute (custom ops return tensors, not None)."""
    return like.new_empty(0)


def step_value(carry, t):
    """Step t's entry of ``carry_factors``' result."""
    return carry if carry is None or isinstance(carry, float) else carry[t]


# --------------------------------------------------------------------------------------
# Layer-directions with variants: the parts outside the loop, then a recurrence.
# --------------------------------------------------------------------------------------
def input_projection(x: torch.Tensor, weight_ih: torch.Tensor, bias: Optional[torch.Tensor],
                     ln_ih_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """``LN_ih(x W_ih^T) + bias`` for all steps at once (plain ``x W_ih^T + bias`` without LN)."""
    if ln_ih_weight is None:
        return plain_input_projection(x, weight_ih, bias)
    gates_x = _ln(plain_input_projection(x, weight_ih, None), ln_ih_weight)
    return gates_x if bias is None else gates_x + bias


def dropped_weight(weight_hh: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Weight drop: the recurrence runs on ``weight_hh * mask``; the parameter is untouched."""
    return weight_hh if mask is None else weight_hh * mask


class LayerVariants(NamedTuple):
    """One layer-direction's variants for one call, as a cell's ``layer`` function takes them."""

    ln_ih_weight: Optional[torch.Tensor]   # LN_ih's gain, or None
    weight_mask: Optional[torch.Tensor]    # weight drop's mask over weight_hh, or None
    step: StepVariants                     # what the recurrence applies in its loop


def layer_variants(options: Options, norms, weight_hh: torch.Tensor, num_steps: int, batch: int,
                   width: int, reset: Optional[torch.Tensor], per_row: Optional[torch.Tensor],
                   reverse: bool) -> LayerVariants:
    """Draws one layer-direction's masks (``draw_masks``) and turns ``reset`` (T, B) into the
    direction's cuts. ``norms`` = (ln_ih, ln_hh[, ln_c_weight, ln_c_bias]) or None."""
    masks = draw_masks(options, weight_hh, num_steps, batch, width)
    cuts = entering_cuts(reset, per_row, reverse)
    return LayerVariants(None if norms is None else norms[0], masks.weight,
                         step_variants(options, masks, norms, cuts))
