"""The GRU (both forms) on the fused Triton kernels (``lstmgru._kernels.gru``); structure as in
``lstmgru/cells/lstm/triton_glue.py``. ``gru_recurrence`` takes the arguments of
``reference.gru_recurrence`` and returns its results.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._autograd import recurrence_function, register_row_vmap
from ..._sequence import Lengths, needs_grad, previous_states, recurrent_weight_grad
from . import spec
from ..lstm.triton_glue import FAMILIES, _nothing


@torch.library.custom_op("lstmgru::gru_forward", mutates_args=())
def gru_forward(gates_x: Tensor, h0: Tensor, weight_hh: Tensor, bias_hn: Optional[Tensor],
                lengths: Optional[Tensor], reverse: bool, reset_after: bool, family: str,
                training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    y, h_n, saved = FAMILIES[family].gru_forward(gates_x, h0, weight_hh, bias_hn, lengths,
                                                 reverse, reset_after, training)
    if not training:
        return y, h_n, _nothing(y), _nothing(y)
    # reset_after saves (gates, gh_n); the original GRU only the gates.
    return y, h_n, saved[0], saved[1] if reset_after else _nothing(y)


@gru_forward.register_fake
def _(gates_x, h0, weight_hh, bias_hn, lengths, reverse, reset_after, family, training):
    T, B, G = gates_x.shape
    H = G // 3
    y = gates_x.new_empty(T, B, H)
    fp32 = {"dtype": torch.float32}
    gates = gates_x.new_empty(T, B, G, **fp32) if training else _nothing(y)
    gh_n = gates_x.new_empty(T, B, H, **fp32) if training and reset_after else _nothing(y)
    return y, h0.new_empty(B, H), gates, gh_n


@torch.library.custom_op("lstmgru::gru_backward", mutates_args=())
def gru_backward(grad_y: Optional[Tensor], grad_h_n: Optional[Tensor], gates: Tensor,
                 gh_n: Tensor, y: Tensor, h0: Tensor, weight_hh: Tensor,
                 lengths: Optional[Tensor], reverse: bool, reset_after: bool,
                 family: str) -> Tuple[Tensor, Tensor, Tensor]:
    saved = (gates, gh_n) if reset_after else (gates,)
    return FAMILIES[family].gru_backward(grad_y, grad_h_n, saved, y, h0, weight_hh, None,
                                         lengths, reverse, reset_after)


@gru_backward.register_fake
def _(grad_y, grad_h_n, gates, gh_n, y, h0, weight_hh, lengths, reverse, reset_after, family):
    T, B, G = gates.shape
    fp32 = {"dtype": torch.float32}
    return (gates.new_empty(T, B, G, **fp32), gates.new_empty(T, B, G, **fp32),
            gates.new_empty(B, G // 3, **fp32))


register_row_vmap(gru_forward, (1, 0, None, None, 0, None, None, None, None), (1, 0, 1, 1))
register_row_vmap(gru_backward, (1, 0, 1, 1, 1, 0, None, 0, None, None, None), None)


def _fast_backward(grads, saved, inputs, outputs, options):
    gates_x, h0, weight_hh, bias_hn, per_row = inputs
    reverse, reset_after, family = options
    gates, gh_n = saved
    y = outputs[0]
    grad_gates_x, grad_rec, grad_h0 = torch.ops.lstmgru.gru_backward(
        *grads, gates, gh_n, y, h0, weight_hh, per_row, reverse, reset_after, family)
    h_prev = previous_states(y, h0, per_row, reverse)
    H = h0.shape[-1]
    # The original GRU's n block multiplies r * h_{t-1}.
    rh = None if reset_after else gates[..., :H].float() * h_prev.float()
    grad_weight_hh = recurrent_weight_grad(grad_rec, h_prev, n_block_operand=rh)
    grad_bias_hn = None
    if bias_hn is not None:
        grad_bias_hn = grad_rec[..., 2 * H:].sum((0, 1)).to(bias_hn.dtype)
    return (grad_gates_x.to(gates_x.dtype), grad_h0.to(h0.dtype),
            grad_weight_hh.to(weight_hh.dtype), grad_bias_hn)


def _spec(gates_x, h0, weight_hh, bias_hn, per_row, reverse, reset_after, family):
    return spec.recurrence(gates_x, h0, weight_hh, bias_hn, per_row, reverse, reset_after)


_GRUKernelRecurrence = recurrence_function("GRUKernelRecurrence", "lstmgru::gru_forward",
                                           _fast_backward, _spec, num_inputs=5,
                                           num_outputs=2)


def gru_recurrence(gates_x: Tensor, h0: Tensor, weight_hh: Tensor,
                   bias_hn: Optional[Tensor] = None, lengths: Optional[Lengths] = None,
                   reverse: bool = False, reset_after: bool = True, family: str = "tiled",
                   variants=None):
    """``reference.gru_recurrence`` on the kernels of ``family`` ("tiled" or "split")."""
    if variants is not None:
        raise NotImplementedError("the GRU kernels do not implement the cell variants yet")
    per_row = None if lengths is None else lengths.per_row
    training = needs_grad(gates_x, h0, weight_hh, bias_hn)
    y, h_n, *_ = _GRUKernelRecurrence.apply(gates_x, h0, weight_hh, bias_hn, per_row, reverse,
                                            reset_after, family, training)
    return y, h_n
