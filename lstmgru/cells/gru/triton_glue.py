"""The GRU (both forms) on the fused Triton kernels (``lstmgru._kernels.gru``); structure as in
``lstmgru/cells/lstm/triton_glue.py``. ``gru_recurrence`` takes the arguments of
``reference.gru_recurrence`` and returns its results.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._sequence import Lengths, needs_grad, previous_states, recurrent_weight_grad
from ..._kernels import gru as gru_kernels
from ..lstm.triton_glue import _nothing


@torch.library.custom_op("lstmgru::gru_forward", mutates_args=())
def gru_forward(gates_x: Tensor, h0: Tensor, weight_hh: Tensor, bias_hn: Optional[Tensor],
                lengths: Optional[Tensor], reverse: bool, reset_after: bool,
                training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    y, h_n, saved = gru_kernels.gru_forward(gates_x, h0, weight_hh, bias_hn, lengths, reverse,
                                            reset_after, training)
    if not training:
        return y, h_n, _nothing(y), _nothing(y)
    # reset_after saves (gates, gh_n); the original GRU only the gates.
    return y, h_n, saved[0], saved[1] if reset_after else _nothing(y)


@gru_forward.register_fake
def _(gates_x, h0, weight_hh, bias_hn, lengths, reverse, reset_after, training):
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
                 lengths: Optional[Tensor], reverse: bool,
                 reset_after: bool) -> Tuple[Tensor, Tensor, Tensor]:
    saved = (gates, gh_n) if reset_after else (gates,)
    return gru_kernels.gru_backward(grad_y, grad_h_n, saved, y, h0, weight_hh, None, lengths,
                                    reverse, reset_after)


@gru_backward.register_fake
def _(grad_y, grad_h_n, gates, gh_n, y, h0, weight_hh, lengths, reverse, reset_after):
    T, B, G = gates.shape
    fp32 = {"dtype": torch.float32}
    return (gates.new_empty(T, B, G, **fp32), gates.new_empty(T, B, G, **fp32),
            gates.new_empty(B, G // 3, **fp32))


def _gru_setup_context(ctx, inputs, output):
    gates_x, h0, weight_hh, bias_hn, lengths, reverse, reset_after, training = inputs
    y, _, gates, gh_n = output
    ctx.save_for_backward(y, h0, weight_hh, bias_hn, lengths, gates, gh_n)
    ctx.reverse, ctx.reset_after, ctx.training = reverse, reset_after, training
    ctx.gates_dtype = gates_x.dtype


def _gru_autograd(ctx, grad_y, grad_h_n, _grad_gates, _grad_gh_n):
    if not ctx.training:
        raise RuntimeError("lstmgru: the GRU kernel ran without saving for backward "
                           "(training=False) but a gradient was requested")
    y, h0, weight_hh, bias_hn, lengths, gates, gh_n = ctx.saved_tensors
    grad_gates_x, grad_rec, grad_h0 = gru_backward(grad_y, grad_h_n, gates, gh_n, y, h0,
                                                   weight_hh, lengths, ctx.reverse,
                                                   ctx.reset_after)
    h_prev = previous_states(y, h0, lengths, ctx.reverse)
    H = h0.shape[-1]
    # The original GRU's n block multiplies r * h_{t-1}.
    rh = None if ctx.reset_after else gates[..., :H].float() * h_prev.float()
    grad_weight_hh = recurrent_weight_grad(grad_rec, h_prev, n_block_operand=rh)
    grad_bias_hn = None
    if bias_hn is not None:
        grad_bias_hn = grad_rec[..., 2 * H:].sum((0, 1)).to(bias_hn.dtype)
    return (grad_gates_x.to(ctx.gates_dtype), grad_h0.to(h0.dtype),
            grad_weight_hh.to(weight_hh.dtype), grad_bias_hn, None, None, None, None)


gru_forward.register_autograd(_gru_autograd, setup_context=_gru_setup_context)


def gru_recurrence(gates_x: Tensor, h0: Tensor, weight_hh: Tensor, bias_hn: Optional[Tensor] = None,
                   lengths: Optional[Lengths] = None, reverse: bool = False,
                   reset_after: bool = True):
    """``reference.gru_recurrence`` on the kernels."""
    per_row = None if lengths is None else lengths.per_row
    training = needs_grad(gates_x, h0, weight_hh, bias_hn)
    y, h_n, _, _ = gru_forward(gates_x.contiguous(), h0.contiguous(), weight_hh.contiguous(),
                               None if bias_hn is None else bias_hn.contiguous(), per_row,
                               reverse, reset_after, training)
    return y, h_n
