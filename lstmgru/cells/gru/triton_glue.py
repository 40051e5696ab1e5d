"""The GRU (both forms) on the fused Triton kernels (``lstmgru._kernels.gru``); structure as in
``lstmgru/cells/lstm/triton_glue.py``. ``gru_recurrence`` takes the arguments of
``reference.gru_recurrence`` and returns its results; the tiled family also takes the cell
variants of the loop (``variants.StepVariants``; layer_norm with reset_after=True only).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._autograd import recurrence_function, register_row_vmap
from ..._sequence import Lengths, needs_grad, previous_states, recurrent_weight_grad
from .. import variants as cell_variants
from . import spec
from ..lstm.triton_glue import FAMILIES
from ..variants import nothing


def _variant_kwargs(cuts, recurrent_mask, zoneout, zoneout_keep, ln_hh_weight):
    """The kernels' variant arguments, or none at all (the split family takes no variants, and
    gru_recurrence never sends it any)."""
    if cuts is None and recurrent_mask is None and zoneout == 0 and ln_hh_weight is None:
        return {}
    return dict(cuts=cuts, recurrent_mask=recurrent_mask, zoneout=zoneout,
                zoneout_keep=zoneout_keep, ln_hh_weight=ln_hh_weight)


@torch.library.custom_op("lstmgru::gru_forward", mutates_args=())
def gru_forward(gates_x: Tensor, h0: Tensor, weight_hh: Tensor, bias_hn: Optional[Tensor],
                cuts: Optional[Tensor], recurrent_mask: Optional[Tensor],
                zoneout_keep: Optional[Tensor], ln_hh_weight: Optional[Tensor],
                lengths: Optional[Tensor], reverse: bool, reset_after: bool, family: str,
                zoneout: float,
                training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, h_n, saved = FAMILIES[family].gru_forward(
        gates_x, h0, weight_hh, bias_hn, lengths, reverse, reset_after, training,
        **_variant_kwargs(cuts, recurrent_mask, zoneout, zoneout_keep, ln_hh_weight))
    # reset_after saves (gates, gh_n), the original GRU only the gates; LN adds (xhat, rstd).
    gates = saved[0] if training else None
    gh_n = saved[1] if training and reset_after else None
    xhat, rstd = saved[2:4] if training and ln_hh_weight is not None else (None, None)
    return (y, h_n) + tuple(nothing(y) if s is None else s for s in (gates, gh_n, xhat, rstd))


@gru_forward.register_fake
def _(gates_x, h0, weight_hh, bias_hn, cuts, recurrent_mask, zoneout_keep, ln_hh_weight,
      lengths, reverse, reset_after, family, zoneout, training):
    T, B, G = gates_x.shape
    H = G // 3
    y = gates_x.new_empty(T, B, H)
    fp32 = {"dtype": torch.float32}
    gates = gates_x.new_empty(T, B, G, **fp32) if training else nothing(y)
    gh_n = gates_x.new_empty(T, B, H, **fp32) if training and reset_after else nothing(y)
    ln = training and ln_hh_weight is not None
    xhat = gates_x.new_empty(T, B, G, **fp32) if ln else nothing(y)
    rstd = gates_x.new_empty(T, B, **fp32) if ln else nothing(y)
    return y, h0.new_empty(B, H), gates, gh_n, xhat, rstd


@torch.library.custom_op("lstmgru::gru_backward", mutates_args=())
def gru_backward(grad_y: Optional[Tensor], grad_h_n: Optional[Tensor], gates: Tensor,
                 gh_n: Tensor, xhat: Tensor, rstd: Tensor, y: Tensor, h0: Tensor,
                 weight_hh: Tensor, cuts: Optional[Tensor], recurrent_mask: Optional[Tensor],
                 zoneout_keep: Optional[Tensor], ln_hh_weight: Optional[Tensor],
                 lengths: Optional[Tensor], reverse: bool, reset_after: bool, family: str,
                 zoneout: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    saved = (gates, gh_n) if reset_after else (gates,)
    if ln_hh_weight is not None:
        saved += (xhat, rstd)
    grads = FAMILIES[family].gru_backward(
        grad_y, grad_h_n, saved, y, h0, weight_hh, None, lengths, reverse, reset_after,
        **_variant_kwargs(cuts, recurrent_mask, zoneout, zoneout_keep, ln_hh_weight))
    # The fourth result, the gradient of LN_hh's output, only exists with LN.
    return tuple(grads) if ln_hh_weight is not None else tuple(grads) + (nothing(gates),)


@gru_backward.register_fake
def _(grad_y, grad_h_n, gates, gh_n, xhat, rstd, y, h0, weight_hh, cuts, recurrent_mask,
      zoneout_keep, ln_hh_weight, lengths, reverse, reset_after, family, zoneout):
    T, B, G = gates.shape
    fp32 = {"dtype": torch.float32}
    grad_ln = gates.new_empty(T, B, G, **fp32) if ln_hh_weight is not None else \
        nothing(gates)
    return (gates.new_empty(T, B, G, **fp32), gates.new_empty(T, B, G, **fp32),
            gates.new_empty(B, G // 3, **fp32), grad_ln)


# Row dimensions: cuts (T, B) 1, recurrent_mask (B, H) 0, zoneout_keep (T, B, H) 1, the saved
# xhat (T, B, 3H) and rstd (T, B) 1; ln_hh_weight is shared.
register_row_vmap(gru_forward,
                  (1, 0, None, None, 1, 0, 1, None, 0, None, None, None, None, None),
                  (1, 0, 1, 1, 1, 1))
register_row_vmap(gru_backward,
                  (1, 0, 1, 1, 1, 1, 1, 0, None, 1, 0, 1, None, 0, None, None, None, None),
                  None)


def _fast_backward(grads, saved, inputs, outputs, options):
    (gates_x, h0, weight_hh, bias_hn, cuts, recurrent_mask, zoneout_keep, ln_hh_weight,
     per_row) = inputs
    reverse, reset_after, family, zoneout = options
    gates, gh_n, xhat, rstd = saved
    y = outputs[0]
    grad_gates_x, grad_rec, grad_h0, grad_ln = torch.ops.lstmgru.gru_backward(
        *grads, gates, gh_n, xhat, rstd, y, h0, weight_hh, cuts, recurrent_mask, zoneout_keep,
        ln_hh_weight, per_row, reverse, reset_after, family, zoneout)
    # The products read h_{t-1} as the step saw it: zero where cut, times the recurrent mask.
    h_prev = previous_states(y, h0, per_row, reverse).float()
    if cuts is not None:
        h_prev = h_prev * cell_variants.keep_factors(cuts, h_prev)
    if recurrent_mask is not None:
        h_prev = h_prev * recurrent_mask.float()
    H = h0.shape[-1]
    # The original GRU's n block multiplies r * (h_{t-1} * m).
    rh = None if reset_after else gates[..., :H].float() * h_prev
    grad_weight_hh = recurrent_weight_grad(grad_rec, h_prev, n_block_operand=rh)
    # With LN_hh, b_hn and the gain come after the normalisation: their gradient is LN's
    # output gradient, not the product's.
    grad_out = grad_rec if ln_hh_weight is None else grad_ln
    grad_bias_hn = grad_ln_hh = None
    if bias_hn is not None:
        grad_bias_hn = grad_out[..., 2 * H:].sum((0, 1)).to(bias_hn.dtype)
    if ln_hh_weight is not None:
        grad_ln_hh = (grad_ln * xhat).sum((0, 1)).to(ln_hh_weight.dtype)
    return (grad_gates_x.to(gates_x.dtype), grad_h0.to(h0.dtype),
            grad_weight_hh.to(weight_hh.dtype), grad_bias_hn, None, None, None, grad_ln_hh)


def _spec(gates_x, h0, weight_hh, bias_hn, cuts, recurrent_mask, zoneout_keep, ln_hh_weight,
          per_row, reverse, reset_after, family, zoneout):
    if (cuts is None and recurrent_mask is None and zoneout == 0
            and ln_hh_weight is None):
        return spec.recurrence(gates_x, h0, weight_hh, bias_hn, per_row, reverse, reset_after)
    step = cell_variants.StepVariants(ln_hh_weight=ln_hh_weight,
                                      recurrent_mask=recurrent_mask, zoneout=zoneout,
                                      zoneout_keep=zoneout_keep, cuts=cuts)
    return cell_variants.gru_steps(gates_x, h0, weight_hh, bias_hn, per_row, reverse,
                                   reset_after, step)


_GRUKernelRecurrence = recurrence_function("GRUKernelRecurrence", "lstmgru::gru_forward",
                                           _fast_backward, _spec, num_inputs=9,
                                           num_outputs=2)


def gru_recurrence(gates_x: Tensor, h0: Tensor, weight_hh: Tensor,
                   bias_hn: Optional[Tensor] = None, lengths: Optional[Lengths] = None,
                   reverse: bool = False, reset_after: bool = True, family: str = "tiled",
                   variants: Optional[cell_variants.StepVariants] = None):
    """``reference.gru_recurrence`` on the kernels of ``family`` ("tiled" or "split"), with
    the loop's cell ``variants`` (tiled family only; layer_norm with reset_after=True only)."""
    if variants is not None and not variants.in_force():
        variants = None
    if variants is not None:
        if variants.layer_norm and not reset_after:
            raise ValueError("layer_norm is defined for the GRU with reset_after=True only")
        if family == "split":
            raise ValueError(f"the split kernel family takes no cell variants (got "
                             f"{', '.join(variants.in_force())}); the tiled family does")
    else:
        variants = cell_variants.StepVariants()
    per_row = None if lengths is None else lengths.per_row
    training = needs_grad(gates_x, h0, weight_hh, bias_hn, variants.ln_hh_weight)
    y, h_n, *_ = _GRUKernelRecurrence.apply(
        gates_x, h0, weight_hh, bias_hn, variants.cuts, variants.recurrent_mask,
        variants.zoneout_keep if variants.zoneout > 0 else None, variants.ln_hh_weight,
        per_row, reverse, reset_after, family, float(variants.zoneout), training)
    return y, h_n
