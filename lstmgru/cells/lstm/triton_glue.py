"""The LSTM on the fused Triton kernels (``lstmgru._kernels.lstm``): torch.library custom ops
with fake implementations inside one ``autograd.Function`` (``lstmgru._autograd``), so
``torch.compile`` and ``torch.export`` keep them opaque, ``torch.func`` accepts them and a
backward under ``create_graph`` is differentiable again. The kernels produce the gate
gradients; the weight gradient is one GEMM over all steps here (no atomics: bit-identical run
to run).

Imported only when a kernel runs, so ``import lstmgru`` needs no triton.
``lstm_recurrence`` takes the arguments of ``reference.lstm_recurrence`` and returns its results.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._autograd import recurrence_function, register_row_vmap
from ..._sequence import Lengths, needs_grad, previous_states, recurrent_weight_grad
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


@torch.library.custom_op("lstmgru::lstm_forward", mutates_args=())
def lstm_forward(gates_x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor,
                 lengths: Optional[Tensor], reverse: bool, family: str,
                 training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, h_n, c_n, saved = FAMILIES[family].lstm_forward(gates_x, h0, c0, weight_hh, lengths,
                                                       reverse, training)
    gates, cells = saved if training else (_nothing(y), _nothing(y))
    return y, h_n, c_n, gates, cells


@lstm_forward.register_fake
def _(gates_x, h0, c0, weight_hh, lengths, reverse, family, training):
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
                  weight_hh: Tensor, lengths: Optional[Tensor], reverse: bool,
                  family: str) -> Tuple[Tensor, Tensor, Tensor]:
    # y and h0 are not read by the kernels (they only feed the weight gradient, below).
    return FAMILIES[family].lstm_backward(grad_y, grad_h_n, grad_c_n, (gates, cells), None, None,
                                          c0, weight_hh, lengths, reverse)


@lstm_backward.register_fake
def _(grad_y, grad_h_n, grad_c_n, gates, cells, c0, weight_hh, lengths, reverse, family):
    T, B, G = gates.shape
    return gates.new_empty(T, B, G), gates.new_empty(B, G // 4), gates.new_empty(B, G // 4)


register_row_vmap(lstm_forward, (1, 0, 0, None, 0, None, None, None), (1, 0, 0, 1, 1))
register_row_vmap(lstm_backward, (1, 0, 0, 1, 1, 0, None, 0, None, None), None)


def _fast_backward(grads, saved, inputs, outputs, options):
    gates_x, h0, c0, weight_hh, per_row = inputs
    reverse, family = options
    grad_gates, grad_h0, grad_c0 = torch.ops.lstmgru.lstm_backward(*grads, *saved, c0, weight_hh,
                                                                   per_row, reverse, family)
    grad_weight_hh = recurrent_weight_grad(grad_gates,
                                           previous_states(outputs[0], h0, per_row, reverse))
    return (grad_gates.to(gates_x.dtype), grad_h0.to(h0.dtype), grad_c0.to(c0.dtype),
            grad_weight_hh.to(weight_hh.dtype))


def _spec(gates_x, h0, c0, weight_hh, per_row, reverse, family):
    return spec.recurrence(gates_x, h0, c0, weight_hh, None, per_row, reverse)


_LSTMKernelRecurrence = recurrence_function("LSTMKernelRecurrence",
                                            "lstmgru::lstm_forward", _fast_backward,
                                            _spec, num_inputs=5, num_outputs=3)


def lstm_recurrence(gates_x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor,
                    weight_hr: Optional[Tensor] = None, lengths: Optional[Lengths] = None,
                    reverse: bool = False, family: str = "tiled", variants=None):
    """``reference.lstm_recurrence`` on the kernels of ``family`` ("tiled" or "split"). They
    have no projection: the registry never sends ``proj_size`` here."""
    if weight_hr is not None:
        raise ValueError("the Triton LSTM kernels have no projection (weight_hr)")
    if variants is not None:
        raise NotImplementedError("the LSTM kernels do not implement the cell variants yet")
    per_row = None if lengths is None else lengths.per_row
    training = needs_grad(gates_x, h0, c0, weight_hh)
    y, h_n, c_n, *_ = _LSTMKernelRecurrence.apply(gates_x, h0, c0, weight_hh, per_row, reverse,
                                                  family, training)
    return y, h_n, c_n
