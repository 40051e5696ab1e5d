"""The GRU cell, both forms: one layer-direction, and the registration of its implementations.

Gates r, z, n are stacked in ``weight_ih`` (3H, I) and ``weight_hh`` (3H, H)::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)     z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))     reset_after=True (torch.nn, cuDNN)
    n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)     reset_after=False (the original GRU)
    h' = (1 - z) * n + z * h

``spec.gru_spec`` is that, as code.
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


def layer(x: torch.Tensor, weights, h0: torch.Tensor, lengths: Optional[Lengths],
          reverse: bool, reset_after: bool, recurrence,
          variants: Optional[LayerVariants] = None):
    """One layer-direction over x (T, B, I) -> y (T, B, H), h_n (B, H).

    ``weights`` = (weight_ih, weight_hh, bias_ih, bias_hh), biases None without ``bias``. The
    biases that enter additively join the input projection (ONE GEMM over all steps): b_hr,
    b_hz, and b_hn too when ``reset_after=False``. With ``reset_after=True`` b_hn sits inside
    ``r * (W_hn h + b_hn)`` and stays with the recurrence. With ``variants``
    (``lstmgru.cells.variants``) LN_ih and weight drop act here, the rest in the recurrence
    (the plain recurrence when nothing is left for the loop: weight drop alone).
    """
    weight_ih, weight_hh, bias_ih, bias_hh = weights
    if (recurrence is reference.gru_recurrence and torch.compiler.is_compiling()
            and not torch.compiler.is_exporting() and backends.auto_while_compiling()
            and reference.aten_inference_takes(x, weights, h0, lengths, reset_after, variants)):
        # Compiled inference under "auto" (which passed over "native": its loop would be
        # unrolled) where torch.nn's kernel (ATen's loop) computes the layer: that kernel,
        # as an op. Not in an exported program, which must run on any device (the op is
        # CPU-only).
        return reference.gru_aten_inference(x, h0, weight_ih, weight_hh, bias_ih, bias_hh,
                                            reverse)
    bias = bias_hn = None
    if bias_ih is not None:
        H = weight_hh.shape[1]
        if reset_after:
            bias = torch.cat([bias_ih[:2 * H] + bias_hh[:2 * H], bias_ih[2 * H:]])
            bias_hn = bias_hh[2 * H:]
        else:
            bias = bias_ih + bias_hh
    if variants is None:
        gates_x = input_projection(x, weight_ih, bias)
        return recurrence(gates_x, h0, weight_hh, bias_hn, lengths, reverse, reset_after)
    gates_x = variant_input_projection(x, weight_ih, bias, variants.ln_ih_weight)
    weight_hh = dropped_weight(weight_hh, variants.weight_mask)
    return recurrence(gates_x, h0, weight_hh, bias_hn, lengths, reverse, reset_after,
                      variants.step if variants.step.in_force() else None)


def _family_recurrence(family):
    def recurrence(gates_x, h0, weight_hh, bias_hn, lengths, reverse, reset_after,
                   variants=None):
        from . import triton_glue  # imports triton: only when a kernel runs

        chosen = family or _triton.cost_model_family("gru", gates_x, h0.shape[1], reset_after,
                                                     variants)
        return triton_glue.gru_recurrence(gates_x, h0, weight_hh, bias_hn, lengths, reverse,
                                          reset_after, chosen, variants)
    return recurrence


_registration.register(
    (("GRU", native.module_forward), ("GRUCell", native.cell_forward)), native,
    reference.gru_recurrence, _family_recurrence, "gru",
    kernel_variants=("layer_norm", "zoneout", "recurrent_dropout", "weight_drop",
                     "reset"))
