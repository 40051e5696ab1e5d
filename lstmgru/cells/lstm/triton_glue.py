"""The LSTM on the fused Triton kernels (``lstmgru._kernels.lstm``): torch.library custom ops
with fake implementations inside one ``autograd.Function`` (``lstmgru._autograd``), so
``torch.compile`` and ``torch.export`` keep them opaque, ``torch.func`` accepts them and a
backward under ``create_graph`` is differentiable again. The kernels produce the gate
gradients; the weight gradient is one GEMM over all steps here (no atomics: bit-identical run
to run).

Imported only when a kernel runs, so ``import lstmgru`` needs no triton.
``lstm_recurrence`` takes the arguments of ``reference.lstm_recurrence`` and returns its results.
The tiled family also takes the cell variants' part in the loop (``StepVariants``: resets,
recurrent dropout, zoneout, layer_norm); their masks are op inputs, made by the caller, and
the LayerNorm gains are differentiable inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._autograd import recurrence_function, register_row_vmap
from ..._sequence import Lengths, needs_grad, previous_states, recurrent_weight_grad
from ..variants import StepVariants, lstm_steps, nothing
from ..._kernels import gru as tiled_gru_kernels
from ..._kernels import lstm as tiled_lstm_kernels
from ..._kernels import split as split_kernels
from . import spec


class _Tiled:
    """The batch-tiled family: lstm.py and gru.py, under one name like split.py."""

    lstm_forward = staticmethod(tiled_lstm_kernels.lstm_forward)
    lstm_backward = staticmethod(tiled_lstm_kernels.lstm_backward)
    gru_forward = staticmethod(tiled_gru_kernels.gru_forward)
    gru_backward = staticmethod(tiled_gru_kernels.gru_backward)


# The kernel families by name: the batch-tiled kernels and the split-hidden persistent ones
# take the same arguments and return the same results (lstmgru._kernels.*).
FAMILIES = {"tiled": _Tiled, "split": split_kernels}


def _variant_args(cuts, recurrent_mask, zoneout, zoneout_keep, layer_norm) -> dict:
    """The variants as keyword arguments of the tiled launchers; none for the plain LSTM, so
    the split family (which takes no variants: ``lstm_recurrence`` refuses them) runs too."""
    args = dict(cuts=cuts, recurrent_mask=recurrent_mask, zoneout_keep=zoneout_keep)
    args = {name: mask for name, mask in args.items() if mask is not None}
    if zoneout > 0:
        args["zoneout"] = zoneout
    if layer_norm[0] is not None:
        args["layer_norm"] = layer_norm
    return args


@torch.library.custom_op("lstmgru::lstm_forward", mutates_args=())
def lstm_forward(gates_x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor,
                 ln_hh_weight: Optional[Tensor], ln_c_weight: Optional[Tensor],
                 ln_c_bias: Optional[Tensor], cuts: Optional[Tensor],
                 recurrent_mask: Optional[Tensor], zoneout_keep: Optional[Tensor],
                 lengths: Optional[Tensor], reverse: bool, family: str, zoneout: float,
                 training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, h_n, c_n, saved = FAMILIES[family].lstm_forward(
        gates_x, h0, c0, weight_hh, lengths, reverse, training,
        **_variant_args(cuts, recurrent_mask, zoneout, zoneout_keep,
                        (ln_hh_weight, ln_c_weight, ln_c_bias)))
    if not training:
        saved = ()
    # gates, cells; with layer_norm also rec and stats
    saved = tuple(saved) + tuple(nothing(y) for _ in range(4 - len(saved)))
    return (y, h_n, c_n, *saved)


@lstm_forward.register_fake
def _(gates_x, h0, c0, weight_hh, ln_hh_weight, ln_c_weight, ln_c_bias, cuts, recurrent_mask,
      zoneout_keep, lengths, reverse, family, zoneout, training):
    T, B, G = gates_x.shape
    H = G // 4
    y = gates_x.new_empty(T, B, H)
    states = (y, h0.new_empty(B, H), c0.new_empty(B, H))
    if not training:
        return states + tuple(nothing(y) for _ in range(4))
    fp32 = {"dtype": torch.float32}
    saved = (gates_x.new_empty(T, B, G, **fp32), gates_x.new_empty(T, B, H, **fp32))
    if ln_hh_weight is not None:
        return states + saved + (gates_x.new_empty(T, B, G, **fp32),
                                 gates_x.new_empty(T, B, 4, **fp32))
    return states + saved + (nothing(y), nothing(y))


@torch.library.custom_op("lstmgru::lstm_backward", mutates_args=())
def lstm_backward(grad_y: Optional[Tensor], grad_h_n: Optional[Tensor],
                  grad_c_n: Optional[Tensor], gates: Tensor, cells: Tensor, rec: Tensor,
                  stats: Tensor, c0: Tensor, weight_hh: Tensor, ln_hh_weight: Optional[Tensor],
                  ln_c_weight: Optional[Tensor], ln_c_bias: Optional[Tensor],
                  cuts: Optional[Tensor], recurrent_mask: Optional[Tensor],
                  zoneout_keep: Optional[Tensor], lengths: Optional[Tensor], reverse: bool,
                  family: str, zoneout: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    layer_norm = (ln_hh_weight, ln_c_weight, ln_c_bias)
    saved = (gates, cells) + ((rec, stats) if ln_hh_weight is not None else ())
    # y and h0 are not read by the kernels (they only feed the weight gradient, below).
    grads = FAMILIES[family].lstm_backward(
        grad_y, grad_h_n, grad_c_n, saved, None, None, c0, weight_hh, lengths, reverse,
        **_variant_args(cuts, recurrent_mask, zoneout, zoneout_keep, layer_norm))
    # grad_gates_x, grad_h0, grad_c0; with layer_norm also grad_rec, grad_cn
    return tuple(grads) + tuple(nothing(gates) for _ in range(5 - len(grads)))


@lstm_backward.register_fake
def _(grad_y, grad_h_n, grad_c_n, gates, cells, rec, stats, c0, weight_hh, ln_hh_weight,
      ln_c_weight, ln_c_bias, cuts, recurrent_mask, zoneout_keep, lengths, reverse, family,
      zoneout):
    T, B, G = gates.shape
    grads = (gates.new_empty(T, B, G), gates.new_empty(B, G // 4), gates.new_empty(B, G // 4))
    if ln_hh_weight is None:
        return grads + (nothing(gates), nothing(gates))
    return grads + (gates.new_empty(T, B, G), gates.new_empty(T, B, G // 4))


# Batch rows: cuts (T, B) and zoneout_keep (T, B, H) along dim 1, recurrent_mask (B, H) dim 0.
register_row_vmap(lstm_forward,
                  (1, 0, 0, None, None, None, None, 1, 0, 1, 0, None, None, None, None),
                  (1, 0, 0, 1, 1, 1, 1))
register_row_vmap(lstm_backward,
                  (1, 0, 0, 1, 1, 1, 1, 0, None, None, None, None, 1, 0, 1, 0, None, None,
                   None), None)


def _fast_backward(grads, saved, inputs, outputs, options):
    (gates_x, h0, c0, weight_hh, ln_hh_weight, ln_c_weight, ln_c_bias, cuts, recurrent_mask,
     zoneout_keep, per_row) = inputs
    reverse, family, zoneout = options
    grad_gates, grad_h0, grad_c0, grad_rec, grad_cn = torch.ops.lstmgru.lstm_backward(
        *grads, *saved, c0, weight_hh, ln_hh_weight, ln_c_weight, ln_c_bias, cuts,
        recurrent_mask, zoneout_keep, per_row, reverse, family, zoneout)
    layer_norm = ln_hh_weight is not None
    # The product's operand at each step: the state entering it, cut, then masked.
    h_prev = previous_states(outputs[0], h0, per_row, reverse)
    if cuts is not None:
        h_prev = h_prev.masked_fill(cuts.unsqueeze(2), 0)
    if recurrent_mask is not None:
        h_prev = h_prev * recurrent_mask
    grad_weight_hh = recurrent_weight_grad(grad_rec if layer_norm else grad_gates, h_prev)
    grad_ln = (None, None, None)
    if layer_norm:
        # The gains' and LN_c bias' gradients over all steps and rows, from the saved
        # statistics (mean, 1/std of LN_hh, then of LN_c, per row and step).
        gates, cells, rec, stats = saved
        rec_hat = (rec - stats[..., 0:1]) * stats[..., 1:2]
        c_hat = (cells - stats[..., 2:3]) * stats[..., 3:4]
        grad_ln = ((grad_gates * rec_hat).sum((0, 1)).to(ln_hh_weight.dtype),
                   (grad_cn * c_hat).sum((0, 1)).to(ln_c_weight.dtype),
                   grad_cn.sum((0, 1)).to(ln_c_bias.dtype))
    return (grad_gates.to(gates_x.dtype), grad_h0.to(h0.dtype), grad_c0.to(c0.dtype),
            grad_weight_hh.to(weight_hh.dtype), *grad_ln, None, None, None)


def _spec(gates_x, h0, c0, weight_hh, ln_hh_weight, ln_c_weight, ln_c_bias, cuts,
          recurrent_mask, zoneout_keep, per_row, reverse, family, zoneout):
    variants = StepVariants(ln_hh_weight, ln_c_weight, ln_c_bias, recurrent_mask, zoneout,
                            zoneout_keep, cuts)
    if not variants.in_force():
        return spec.recurrence(gates_x, h0, c0, weight_hh, None, per_row, reverse)
    return lstm_steps(gates_x, h0, c0, weight_hh, None, per_row, reverse, variants)


_LSTMKernelRecurrence = recurrence_function("LSTMKernelRecurrence",
                                            "lstmgru::lstm_forward", _fast_backward,
                                            _spec, num_inputs=11, num_outputs=3)


def lstm_recurrence(gates_x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor,
                    weight_hr: Optional[Tensor] = None, lengths: Optional[Lengths] = None,
                    reverse: bool = False, family: str = "tiled",
                    variants: Optional[StepVariants] = None):
    """``reference.lstm_recurrence`` on the kernels of ``family`` ("tiled" or "split"). They
    have no projection: the registry never sends ``proj_size`` here. ``variants``: resets,
    recurrent dropout, zoneout and layer_norm, on the tiled family only (the registry routes
    them there)."""
    if weight_hr is not None:
        raise ValueError("the Triton LSTM kernels have no projection (weight_hr)")
    if variants is None:
        variants = StepVariants()
    elif family != "tiled" and variants.in_force():
        raise ValueError(f"the {family!r} LSTM kernel family takes no cell variants "
                         f"({', '.join(variants.in_force())}); the tiled family does")
    per_row = None if lengths is None else lengths.per_row
    v = variants
    training = needs_grad(gates_x, h0, c0, weight_hh, v.ln_hh_weight, v.ln_c_weight,
                          v.ln_c_bias)
    y, h_n, c_n, *_ = _LSTMKernelRecurrence.apply(
        gates_x, h0, c0, weight_hh, v.ln_hh_weight, v.ln_c_weight, v.ln_c_bias, v.cuts,
        v.recurrent_mask, v.zoneout_keep, per_row, reverse, family, float(v.zoneout), training)
    return y, h_n, c_n
