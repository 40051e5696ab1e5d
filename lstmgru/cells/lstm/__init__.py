"""The LSTM cell: one layer-direction, and the registration of its implementations.

Gates i, f, g, o are stacked in ``weight_ih`` (4H, I) and ``weight_hh`` (4H, P)::

    i, f, o = sigmoid(.)   g = tanh(.)   of  x W_ih^T + b_ih + h W_hh^T + b_hh
    c' = f * c + i * g     h' = o * tanh(c')     (then h' = h' W_hr^T with proj_size)

``spec.lstm_spec`` is that, as code.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _triton, backends
from ..._sequence import Lengths, input_projection
from . import native, reference


def layer(x: torch.Tensor, weights, h0: torch.Tensor, c0: torch.Tensor,
          lengths: Optional[Lengths], reverse: bool, recurrence):
    """One layer-direction over x (T, B, I) -> y (T, B, P), h_n (B, P), c_n (B, H).

    ``weights`` = (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr), absent ones None. Both
    biases enter the gates additively, so they join the input projection (ONE GEMM over all
    steps) and the recurrence sees only ``h @ W_hh^T``.
    """
    weight_ih, weight_hh, bias_ih, bias_hh, weight_hr = weights
    bias = None if bias_ih is None else bias_ih + bias_hh
    gates_x = input_projection(x, weight_ih, bias)
    return recurrence(gates_x, h0, c0, weight_hh, weight_hr, lengths, reverse)


def _triton_supports(case: backends.Case) -> Optional[str]:
    reason = _triton.unavailable_reason(case.device_type, case.dtype)
    if reason is not None:
        return reason
    if case.proj_size:
        return "the LSTM kernels have no projection (proj_size > 0); it runs on the reference"
    if case.variants:
        return f"the kernels do not implement {', '.join(case.variants)} yet"
    return None


def _split_supports(case: backends.Case) -> Optional[str]:
    return _triton_supports(case) or _triton.split_reason("lstm", case.batch, case.hidden_size,
                                                          case.dtype, case.device_type)


def _family_recurrence(family):
    def recurrence(gates_x, h0, c0, weight_hh, weight_hr, lengths, reverse):
        from . import triton_glue  # imports triton: only when a kernel runs

        chosen = family or _triton.cost_model_family("lstm", gates_x, c0.shape[1], True)
        return triton_glue.lstm_recurrence(gates_x, h0, c0, weight_hh, weight_hr, lengths,
                                           reverse, chosen)
    return recurrence


def _reference_supports(case: backends.Case) -> Optional[str]:
    return None


for _cell, _native_forward in (("LSTM", native.module_forward), ("LSTMCell", native.cell_forward)):
    backends.register(_cell, backends.Implementation(
        "native", native.supports, module_forward=_native_forward))
    backends.register(_cell, backends.Implementation(
        "reference", _reference_supports, recurrence=reference.lstm_recurrence))
    # "triton" picks the family per call from the cost model; the others name one.
    backends.register(_cell, backends.Implementation(
        "triton", _triton_supports, recurrence=_family_recurrence(None)))
    backends.register(_cell, backends.Implementation(
        "triton-tiled", _triton_supports, recurrence=_family_recurrence("tiled")))
    backends.register(_cell, backends.Implementation(
        "triton-split", _split_supports, recurrence=_family_recurrence("split")))
