"""The LSTM on the fused Triton kernels (``lstmgru._kernels.lstm``): torch.library custom ops
with fake implementations inside one ``autograd.Function`` (``lstmgru._autograd``), so
``torch.compile`` and ``torch.export`` keep them opaque, ``torch.func`` accepts them and a
backward under ``create_graph`` is differentiable again. The kernels produce the gate
gradients; the weight gradient is one GEMM over all steps here (no atomics: bit-identical run
to run).

Imported only when a kernel runs, so ``import lstmgru`` needs no triton.
``lstm_recurrence`` takes the arguments of ``reference.lstm_recurrence`` and returns its results.
The tiled family also takes the cell variants' part in the loop (``StepVariants``: resets,
recurrent dropout, zoneout; not layer_norm); their masks are op inputs, made by the caller.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._autograd import recurrence_function, register_row_vmap
from ..._sequence import Lengths, needs_grad, previous_states, recurrent_weight_grad
from ..variants import StepVariants, lstm_steps
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


def _nothing(like: Tensor) -> Tensor:
    """Stands in for a saved tensor that inference does not keep (custom ops return tensors)."""
    return like.new_empty(0)


def _variant_args(cuts, recurrent_mask, zoneout, zoneout_keep) -> dict:
    """The variants as keyword arguments of the tiled launchers; none for the plain LSTM, so
    the split family (which takes no variants: ``lstm_recurrence`` refuses them) runs too."""
    args = dict(cuts=cuts, recurrent_mask=recurrent_mask, zoneout_keep=zoneout_keep)
    args = {name: mask for name, mask in args.items() if mask is not None}
    if zoneout > 0:
        args["zoneout"] = zoneout
    return args


@torch.library.custom_op("lstmgru::lstm_forward", mutates_args=())
def lstm_forward(gates_x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor,
                 cuts: Optional[Tensor], recurrent_mask: Optional[Tensor],
                 zoneout_keep: Optional[Tensor], lengths: Optional[Tensor], reverse: bool,
                 family: str, zoneout: float,
                 training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, h_n, c_n, saved = FAMILIES[family].lstm_forward(
        gates_x, h0, c0, weight_hh, lengths, reverse, training,
        **_variant_args(cuts, recurrent_mask, zoneout, zoneout_keep))
    gates, cells = saved if training else (_nothing(y), _nothing(y))
    return y, h_n, c_n, gates, cells


@lstm_forward.register_fake
def _(gates_x, h0, c0, weight_hh, cuts, recurrent_mask, zoneout_keep, lengths, reverse, family,
      zoneout, training):
    T, B, G = gates_x.shape
    H = G // 4
    y = gates_x.new_empty(T, B, H)
    if not training:
        return y, h0.new_empty(B, H), c0.new_empty(B, H), _nothing(y), _nothing(y)
    fp32 = {"dtype": torch.float32}
    return (y, h0.new_empty(B, H), c0.new_empty(B, H), gates_x.new_empty(T, B, G, **fp32),
            gates_x.new_empty(T, B, H, **fp32))


@torch.library.custom_op("lstmgru::lstm_backward", mutates_args=())
def lstm_backward(grad_y: Optional[Tensor], grad_h_n: Optional[Tensor],
                  grad_c_n: Optional[Tensor], gates: Tensor, cells: Tensor, c0: Tensor,
                  weight_hh: Tensor, cuts: Optional[Tensor], recurrent_mask: Optional[Tensor],
                  zoneout_keep: Optional[Tensor], lengths: Optional[Tensor], reverse: bool,
                  family: str, zoneout: float) -> Tuple[Tensor, Tensor, Tensor]:
    # y and h0 are not read by the kernels (they only feed the weight gradient, below).
    return FAMILIES[family].lstm_backward(
        grad_y, grad_h_n, grad_c_n, (gates, cells), None, None, c0, weight_hh, lengths, reverse,
        **_variant_args(cuts, recurrent_mask, zoneout, zoneout_keep))


@lstm_backward.register_fake
def _(grad_y, grad_h_n, grad_c_n, gates, cells, c0, weight_hh, cuts, recurrent_mask,
      zoneout_keep, lengths, reverse, family, zoneout):
    T, B, G = gates.shape
    return gates.new_empty(T, B, G), gates.new_empty(B, G // 4), gates.new_empty(B, G // 4)


# Batch rows: cuts (T, B) and zoneout_keep (T, B, H) along dim 1, recurrent_mask (B, H) dim 0.
register_row_vmap(lstm_forward, (1, 0, 0, None, 1, 0, 1, 0, None, None, None, None),
                  (1, 0, 0, 1, 1))
register_row_vmap(lstm_backward, (1, 0, 0, 1, 1, 0, None, 1, 0, 1, 0, None, None, None), None)


def _fast_backward(grads, saved, inputs, outputs, options):
    gates_x, h0, c0, weight_hh, cuts, recurrent_mask, zoneout_keep, per_row = inputs
    reverse, family, zoneout = options
    grad_gates, grad_h0, grad_c0 = torch.ops.lstmgru.lstm_backward(
        *grads, *saved, c0, weight_hh, cuts, recurrent_mask, zoneout_keep, per_row, reverse,
        family, zoneout)
    # The product's operand at each step: the state entering it, cut, then masked.
    h_prev = previous_states(outputs[0], h0, per_row, reverse)
    if cuts is not None:
        h_prev = h_prev.masked_fill(cuts.unsqueeze(2), 0)
    if recurrent_mask is not None:
        h_prev = h_prev * recurrent_mask
    grad_weight_hh = recurrent_weight_grad(grad_gates, h_prev)
    return (grad_gates.to(gates_x.dtype), grad_h0.to(h0.dtype), grad_c0.to(c0.dtype),
            grad_weight_hh.to(weight_hh.dtype), None, None, None)


def _spec(gates_x, h0, c0, weight_hh, cuts, recurrent_mask, zoneout_keep, per_row, reverse,
          family, zoneout):
    if cuts is None and recurrent_mask is None and zoneout == 0:
        return spec.recurrence(gates_x, h0, c0, weight_hh, None, per_row, reverse)
    variants = StepVariants(recurrent_mask=recurrent_mask, zoneout=zoneout,
                            zoneout_keep=zoneout_keep, cuts=cuts)
    return lstm_steps(gates_x, h0, c0, weight_hh, None, per_row, reverse, variants)


_LSTMKernelRecurrence = recurrence_function("LSTMKernelRecurrence",
                                            "lstmgru::lstm_forward", _fast_backward,
                                            _spec, num_inputs=8, num_outputs=3)


def lstm_recurrence(gates_x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor,
                    weight_hr: Optional[Tensor] = None, lengths: Optional[Lengths] = None,
                    reverse: bool = False, family: str = "tiled",
                    variants: Optional[StepVariants] = None):
    """``reference.lstm_recurrence`` on the kernels of ``family`` ("tiled" or "split"). They
    have no projection: the registry never sends ``proj_size`` here. ``variants``: resets,
    recurrent dropout and zoneout, on the tiled family only (the registry routes them there);
    not layer_norm (the registry runs it on the reference)."""
    if weight_hr is not None:
        raise ValueError("the Triton LSTM kernels have no projection (weight_hr)")
    if variants is None:
        variants = StepVariants()
    elif variants.layer_norm:
        raise ValueError("the Triton LSTM kernels do not implement layer_norm")
    elif family != "tiled" and variants.in_force():
        raise ValueError(f"the {family!r} LSTM kernel family takes no cell variants "
                         f"({', '.join(variants.in_force())}); the tiled family does")
    per_row = None if lengths is None else lengths.per_row
    training = needs_grad(gates_x, h0, c0, weight_hh)
    y, h_n, c_n, *_ = _LSTMKernelRecurrence.apply(
        gates_x, h0, c0, weight_hh, variants.cuts, variants.recurrent_mask,
        variants.zoneout_keep, per_row, reverse, family, float(variants.zoneout), training)
    return y, h_n, c_n
