"""The LSTM on the fused Triton kernels (``lstmgru._kernels.lstm``): torch.library custom ops
with fake implementations and autograd, so ``torch.compile`` traces through them and
``torch.library.opcheck`` can check them. The kernels produce the gate gradients; the weight
gradient is one GEMM over all steps here (no atomics: bit-identical run to run).

Imported only when a kernel runs, so ``import lstmgru`` needs no triton.
``lstm_recurrence`` takes the arguments of ``reference.lstm_recurrence`` and returns its results.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._sequence import Lengths, needs_grad, previous_states, recurrent_weight_grad
from ..._kernels import lstm as lstm_kernels


def _nothing(like: Tensor) -> Tensor:
    """Stands in for a saved tensor that inference does not keep (custom ops return tensors)."""
    return like.new_empty(0)


@torch.library.custom_op("lstmgru::lstm_forward", mutates_args=())
def lstm_forward(gates_x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor,
                 lengths: Optional[Tensor], reverse: bool,
                 training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, h_n, c_n, saved = lstm_kernels.lstm_forward(gates_x, h0, c0, weight_hh, lengths, reverse,
                                                   training)
    gates, cells = saved if training else (_nothing(y), _nothing(y))
    return y, h_n, c_n, gates, cells


@lstm_forward.register_fake
def _(gates_x, h0, c0, weight_hh, lengths, reverse, training):
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
                  weight_hh: Tensor, lengths: Optional[Tensor],
                  reverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    # y and h0 are not read by the kernel (they only feed the weight gradient, below).
    return lstm_kernels.lstm_backward(grad_y, grad_h_n, grad_c_n, (gates, cells), None, None, c0,
                                      weight_hh, lengths, reverse)


@lstm_backward.register_fake
def _(grad_y, grad_h_n, grad_c_n, gates, cells, c0, weight_hh, lengths, reverse):
    T, B, G = gates.shape
    return gates.new_empty(T, B, G), gates.new_empty(B, G // 4), gates.new_empty(B, G // 4)


def _lstm_setup_context(ctx, inputs, output):
    gates_x, h0, c0, weight_hh, lengths, reverse, training = inputs
    y, _, _, gates, cells = output
    ctx.save_for_backward(y, h0, c0, weight_hh, lengths, gates, cells)
    ctx.reverse, ctx.training, ctx.gates_dtype = reverse, training, gates_x.dtype


def _lstm_autograd(ctx, grad_y, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    if not ctx.training:
        raise RuntimeError("lstmgru: the LSTM kernel ran without saving for backward "
                           "(training=False) but a gradient was requested")
    y, h0, c0, weight_hh, lengths, gates, cells = ctx.saved_tensors
    grad_gates, grad_h0, grad_c0 = lstm_backward(grad_y, grad_h_n, grad_c_n, gates, cells, c0,
                                                 weight_hh, lengths, ctx.reverse)
    grad_weight_hh = recurrent_weight_grad(grad_gates, previous_states(y, h0, lengths, ctx.reverse))
    return (grad_gates.to(ctx.gates_dtype), grad_h0.to(h0.dtype), grad_c0.to(c0.dtype),
            grad_weight_hh.to(weight_hh.dtype), None, None, None)


lstm_forward.register_autograd(_lstm_autograd, setup_context=_lstm_setup_context)


def lstm_recurrence(gates_x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor,
                    weight_hr: Optional[Tensor] = None, lengths: Optional[Lengths] = None,
                    reverse: bool = False):
    """``reference.lstm_recurrence`` on the kernels. They have no projection: the registry
    never sends ``proj_size`` here (``triton`` says so in ``supports``)."""
    if weight_hr is not None:
        raise ValueError("the Triton LSTM kernels have no projection (weight_hr)")
    per_row = None if lengths is None else lengths.per_row
    training = needs_grad(gates_x, h0, c0, weight_hh)
    y, h_n, c_n, _, _ = lstm_forward(gates_x.contiguous(), h0.contiguous(), c0.contiguous(),
                                     weight_hh.contiguous(), per_row, reverse, training)
    return y, h_n, c_n
