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
from .. import _registration
from ..._sequence import Lengths, input_projection
from ..variants import LayerVariants, dropped_weight
from ..variants import input_projection as variant_input_projection
from . import native, reference


def layer(x: torch.Tensor, weights, h0: torch.Tensor, c0: torch.Tensor,
          lengths: Optional[Lengths], reverse: bool, recurrence,
          variants: Optional[LayerVariants] = None):
    """One layer-direction over x (T, B, I) -> y (T, B, P), h_n (B, P), c_n (B, H).

    ``weights`` = (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr), absent ones None. Both
    biases enter the gates additively, so they join the input projection (ONE GEMM over all
    steps) and the recurrence sees only ``h @ W_hh^T``. With ``variants``
    (``lstmgru.cells.variants``) LN_ih and weight drop act here, the rest in the recurrence
    (the plain recurrence when nothing is left for the loop: weight drop alone).
    """
    weight_ih, weight_hh, bias_ih, bias_hh, weight_hr = weights
    if (variants is None and recurrence is reference.lstm_recurrence
            and torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and backends.auto_while_compiling()
            and reference.onednn_takes(x, weights, lengths)):
        # Compiled under "auto" (which passed over "native": its op would be unrolled), where
        # torch.nn's kernel (oneDNN) computes the layer: that kernel, as an op. Not in an
        # exported program, which must run on any device (the oneDNN op is CPU-only).
        return reference.onednn_layer(x, weights, h0, c0, reverse)
    bias = None if bias_ih is None else bias_ih + bias_hh
    if variants is None:
        gates_x = input_projection(x, weight_ih, bias)
        return recurrence(gates_x, h0, c0, weight_hh, weight_hr, lengths, reverse)
    gates_x = variant_input_projection(x, weight_ih, bias, variants.ln_ih_weight)
    weight_hh = dropped_weight(weight_hh, variants.weight_mask)
    return recurrence(gates_x, h0, c0, weight_hh, weight_hr, lengths, reverse,
                      variants.step if variants.step.in_force() else None)


def _own_kernel_reason(case: backends.Case) -> Optional[str]:
    if case.proj_size:
        return "the LSTM kernels have no projection (proj_size > 0); it runs on the reference"
    return None


def _family_recurrence(family):
    def recurrence(gates_x, h0, c0, weight_hh, weight_hr, lengths, reverse, variants=None):
        from . import triton_glue  # imports triton: only when a kernel runs

        chosen = family or _triton.cost_model_family("lstm", gates_x, c0.shape[1], True,
                                                     variants)
        return triton_glue.lstm_recurrence(gates_x, h0, c0, weight_hh, weight_hr, lengths,
                                           reverse, chosen, variants)
    return recurrence


_registration.register(
    (("LSTM", native.module_forward), ("LSTMCell", native.cell_forward)), native,
    reference.lstm_recurrence, _family_recurrence, "lstm", _own_kernel_reason,
    kernel_variants=("layer_norm", "zoneout", "recurrent_dropout", "weight_drop", "reset"))
