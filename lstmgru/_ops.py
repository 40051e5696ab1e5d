"""Glue between lstmgru and the Triton kernels: the only importer of ``lstmgru._kernels``.

The kernel launchers are registered as ``torch.library`` custom ops (``lstmgru::*``) with
fake implementations and autograd formulas, so ``torch.compile`` can trace through them
without a graph break and ``torch.library.opcheck`` can check them. The kernels produce the
gate gradients; the weight gradients are GEMMs over all steps here (no atomics, so results
are bit-identical run to run).

``lstm_recurrence`` and ``gru_recurrence`` at the bottom take the same arguments and return
the same results as their twins in ``lstmgru.reference``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._kernels import gru as gru_kernels
from ._kernels import lstm as lstm_kernels
from .reference import (lengths_from_batch_sizes, needs_grad, previous_states,
                        recurrent_weight_grad)


def _nothing(like: Tensor) -> Tensor:
    """Stands in for a saved tensor that inference does not keep (custom ops return tensors)."""
    return like.new_empty(0)


# --------------------------------------------------------------------------------------
# LSTM
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# GRU
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Entry points with the signatures of lstmgru.reference
# --------------------------------------------------------------------------------------
def _lengths(batch_sizes: Optional[Sequence[int]], batch: int, device) -> Optional[Tensor]:
    return None if batch_sizes is None else lengths_from_batch_sizes(batch_sizes, batch, device)


def lstm_recurrence(gates_x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor,
                    weight_hr: Optional[Tensor] = None,
                    batch_sizes: Optional[Sequence[int]] = None, reverse: bool = False):
    """``lstmgru.reference.lstm_recurrence`` on the Triton kernels, which have no projection
    (the dispatcher routes ``proj_size`` to the reference)."""
    if weight_hr is not None:
        raise ValueError("the Triton LSTM kernels have no projection (weight_hr)")
    lengths = _lengths(batch_sizes, gates_x.shape[1], gates_x.device)
    training = needs_grad(gates_x, h0, c0, weight_hh)
    y, h_n, c_n, _, _ = lstm_forward(gates_x.contiguous(), h0.contiguous(), c0.contiguous(),
                                     weight_hh.contiguous(), lengths, reverse, training)
    return y, h_n, c_n


def gru_recurrence(gates_x: Tensor, h0: Tensor, weight_hh: Tensor, bias_hn: Optional[Tensor] = None,
                   batch_sizes: Optional[Sequence[int]] = None, reverse: bool = False,
                   reset_after: bool = True):
    """``lstmgru.reference.gru_recurrence`` on the Triton kernels."""
    lengths = _lengths(batch_sizes, gates_x.shape[1], gates_x.device)
    training = needs_grad(gates_x, h0, weight_hh, bias_hn)
    y, h_n, _, _ = gru_forward(gates_x.contiguous(), h0.contiguous(), weight_hh.contiguous(),
                               None if bias_hn is None else bias_hn.contiguous(), lengths,
                               reverse, reset_after, training)
    return y, h_n
