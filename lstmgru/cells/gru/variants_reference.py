"""The GRU recurrence with cell variants (``lstmgru.cells.variants``) in plain PyTorch, fast.

The equations are ``variants.gru_steps`` (both forms; ``layer_norm`` with ``reset_after``
only); this computes the same function with an explicit backward, as a pair of
``torch.library`` ops inside one ``autograd.Function`` like the LSTM's
``variants_reference.py``, which explains the layout.

What the forward keeps: the gate activations r, z, n; per step ``W_hn h + b_hn`` (torch's
form) or ``r * h_in`` (the original form, the n block's operand); with ``layer_norm`` the raw
recurrent product and LN_hh's mean and 1/std. The states entering each step are the outputs
shifted by one, so they are not kept.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._autograd import recurrence_function, register_row_vmap
from ..._sequence import Lengths, needs_grad, previous_states, step_order
from ..variants import (EPS, StepVariants, active_factors, carry_factors, nothing,
                        gru_steps, keep_factors, layer_norm_backward, layer_norm_stats_dtype,
                        step_value)

def _forward(gates_x, h0, weight_hh, bias_hn, ln_hh_weight, recurrent_mask, zoneout_keep, cuts,
             per_row, reverse, reset_after, zoneout, save):
    T, B, G = gates_x.shape
    H = G // 3
    layer_norm = ln_hh_weight is not None
    keep = keep_factors(cuts, gates_x)
    carry = carry_factors(zoneout, zoneout_keep, per_row, T, gates_x)
    active = active_factors(per_row, T, gates_x)
    # Detached: out= ops on tensors that require grad take a slower path.
    w = weight_hh.detach()
    w_t, w_rz_t, w_n_t = w.t(), w[:2 * H].t(), w[2 * H:].t()
    y = gates_x.new_empty(T, B, H)
    act = gates_x.new_empty(T, B, G)     # r, z, n
    aux = gates_x.new_empty(T, B, H)     # W_hn h + b_hn (reset_after), else r * h_in
    rec = gates_x.new_empty(T, B, G) if layer_norm else None  # h_in @ W_hh^T, before LN_hh
    stats = [[None] * T for _ in range(2)]                     # LN_hh's mean and 1/std
    gx_steps, act_steps, aux_steps, y_steps = (gates_x.unbind(0), act.unbind(0), aux.unbind(0),
                                               y.unbind(0))
    rec_steps = rec.unbind(0) if layer_norm else None
    h = h0
    for t in step_order(T, reverse):
        if keep is not None:
            h = h * keep[t]
        h_in = h if recurrent_mask is None else h * recurrent_mask
        gx, a = gx_steps[t], act_steps[t]
        rz, n = a[:, :2 * H], a[:, 2 * H:]
        if reset_after:
            if layer_norm:
                torch.mm(h_in, w_t, out=rec_steps[t])
                product, stats[0][t], stats[1][t] = torch.native_layer_norm(
                    rec_steps[t], (G,), ln_hh_weight, None, EPS)
            else:
                product = torch.mm(h_in, w_t)
            torch.sigmoid(product[:, :2 * H].add_(gx[:, :2 * H]), out=rz)
            hn = aux_steps[t]
            if bias_hn is None:
                hn.copy_(product[:, 2 * H:])
            else:
                torch.add(product[:, 2 * H:], bias_hn, out=hn)
            torch.tanh(torch.addcmul(gx[:, 2 * H:], a[:, :H], hn), out=n)
        else:
            torch.sigmoid(torch.addmm(gx[:, :2 * H], h_in, w_rz_t), out=rz)
            rh = torch.mul(a[:, :H], h_in, out=aux_steps[t])
            torch.tanh(torch.addmm(gx[:, 2 * H:], rh, w_n_t), out=n)
        # h~ = (1 - z) * n + z * h
        h_new = torch.sub(h, n, out=y_steps[t]).mul_(a[:, H:2 * H]).add_(n)
        c_t = step_value(carry, t)
        if c_t is not None:
            h_new.lerp_(h, c_t)
        if active is not None:
            h = h_new.clone()
            h_new.mul_(active[t])
        else:
            h = h_new
    if not save:
        return y, h.clone(), tuple(nothing(y) for _ in range(4))
    # (2, T, B, 1): each step's slice dense, as ATen's CPU layer-norm backward reads it.
    stats = torch.stack([torch.stack(kind) for kind in stats]) if layer_norm else nothing(y)
    return y, h.clone(), (act, aux, rec if layer_norm else nothing(y), stats)


def _backward(grad_y, grad_h_n, act, aux, rec, stats, y, h0, weight_hh, bias_hn, ln_hh_weight,
              recurrent_mask, zoneout_keep, cuts, per_row, reverse, reset_after, zoneout):
    T, B, G = act.shape
    H = G // 3
    layer_norm = ln_hh_weight is not None
    keep = keep_factors(cuts, act)
    carry = carry_factors(zoneout, zoneout_keep, per_row, T, act)
    w = weight_hh.detach()
    w_rz, w_n = w[:2 * H], w[2 * H:]
    h_prevs = previous_states(y, h0, per_row, reverse)
    if keep is not None:
        h_prevs = h_prevs * keep
    h_ins = h_prevs if recurrent_mask is None else h_prevs * recurrent_mask
    if per_row is not None:
        grad_y = grad_y * active_factors(per_row, T, act)  # y is constant 0 where inactive
    # What does not depend on the recurrence, for all steps at once, with dh~ the gradient of
    # h~ = (1 - z) n + z h (an inactive row's dh~ is 0: its carry is 1):
    #   da_z = dh~ * factors[0],  da_n = dh~ * factors[1],  dL/dh_prev gets dh~ * z, and
    #   da_r = da_n * factors[2] (torch's form) or (da_n @ W_hn) * factors[2] (original).
    r, z, n = act.split(H, dim=2)
    factors = act.new_empty(3, T, B, H)
    torch.sub(h_prevs, n, out=factors[0]).mul_(z).mul_(1 - z)       # (h - n) z (1 - z)
    torch.mul(n, n, out=factors[1]).neg_().add_(1).mul_(1 - z)      # (1 - n^2) (1 - z)
    # r (1 - r) times what r multiplies: W_hn h + b_hn, or h_in
    torch.addcmul(r, r, r, value=-1, out=factors[2]).mul_(aux if reset_after else h_ins)
    grad_gates = act.new_empty(T, B, G)  # of the pre-activations: gates_x's gradient
    # of the recurrent product h_in @ W_hh^T (reset_after: the n block is W_hn h + b_hn's)
    grad_rec = act.new_empty(T, B, G) if reset_after else None
    raw_grad_rec = [None] * T            # with layer_norm: of LN_hh's input, per step
    grad_y_steps, gate_steps = grad_y.unbind(0), grad_gates.unbind(0)
    dh = grad_h_n
    for t in reversed(step_order(T, reverse)):
        dh_t = dh + grad_y_steps[t]
        c_t = step_value(carry, t)
        dh_new = dh_t if c_t is None else dh_t * (1 - c_t)
        da = gate_steps[t]
        da_r, da_z, da_n = da[:, :H], da[:, H:2 * H], da[:, 2 * H:]
        torch.mul(dh_new, factors[0, t], out=da_z)
        torch.mul(dh_new, factors[1, t], out=da_n)
        if reset_after:
            torch.mul(da_n, factors[2, t], out=da_r)
            g = grad_rec[t]
            g[:, :2 * H] = da[:, :2 * H]
            torch.mul(da_n, r[t], out=g[:, 2 * H:])
            if layer_norm:
                g = layer_norm_backward(g, rec[t], (G,), stats[0, t], stats[1, t],
                                         ln_hh_weight, None, (True, False, False))[0]
                raw_grad_rec[t] = g
            dh = g @ w
        else:
            d_rh = da_n @ w_n
            torch.mul(d_rh, factors[2, t], out=da_r)
            dh = torch.addmm(d_rh * r[t], da[:, :2 * H], w_rz)
        if recurrent_mask is not None:
            dh.mul_(recurrent_mask)
        dh.addcmul_(dh_new, z[t])
        if c_t is not None:
            dh.add_(dh_t * c_t)
        if keep is not None:
            dh.mul_(keep[t])
    grad_b_hn = nothing(act)
    grad_ln = nothing(act)
    rows = T * B
    if reset_after:
        if bias_hn is not None:
            grad_b_hn = grad_rec[..., 2 * H:].sum((0, 1))
        if layer_norm:
            # LN_hh's gain over all steps and rows at once, from the saved statistics
            grad_ln = layer_norm_backward(
                grad_rec.view(rows, G), rec.view(rows, G), (G,), stats[0].view(rows, 1),
                stats[1].view(rows, 1), ln_hh_weight, None, (False, True, False))[1]
            grad_rec = torch.stack(raw_grad_rec)
        grad_w_hh = grad_rec.reshape(rows, G).t().mm(h_ins.reshape(rows, H))
    else:
        grad_w_hh = torch.cat([grad_gates[..., :2 * H].reshape(rows, 2 * H).t().mm(
            h_ins.reshape(rows, H)), grad_gates[..., 2 * H:].reshape(rows, H).t().mm(
            aux.reshape(rows, H))])
    return grad_gates, dh.clone(), grad_w_hh, grad_b_hn, grad_ln


# --------------------------------------------------------------------------------------
# torch.library ops and the autograd.Function
# --------------------------------------------------------------------------------------
@torch.library.custom_op("lstmgru::gru_variants_reference", mutates_args=())
def gru_variants_reference(
        gates_x: Tensor, h0: Tensor, weight_hh: Tensor, bias_hn: Optional[Tensor],
        ln_hh_weight: Optional[Tensor], recurrent_mask: Optional[Tensor],
        zoneout_keep: Optional[Tensor], cuts: Optional[Tensor], per_row: Optional[Tensor],
        reverse: bool, reset_after: bool, zoneout: float, save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, h_n, saved = _forward(gates_x, h0, weight_hh, bias_hn, ln_hh_weight, recurrent_mask,
                             zoneout_keep, cuts, per_row, reverse, reset_after, zoneout, save)
    return (y, h_n, *saved)


@gru_variants_reference.register_fake
def _(gates_x, h0, weight_hh, bias_hn, ln_hh_weight, recurrent_mask, zoneout_keep, cuts,
      per_row, reverse, reset_after, zoneout, save):
    T, B, G = gates_x.shape
    H = G // 3
    y = gates_x.new_empty(T, B, H)
    if not save:
        return (y, h0.new_empty(B, H)) + tuple(nothing(y) for _ in range(4))
    layer_norm = ln_hh_weight is not None
    return (y, h0.new_empty(B, H), gates_x.new_empty(T, B, G), gates_x.new_empty(T, B, H),
            gates_x.new_empty(T, B, G) if layer_norm else nothing(y),
            gates_x.new_empty(2, T, B, 1, dtype=layer_norm_stats_dtype(gates_x, ln_hh_weight))
            if layer_norm else nothing(y))


@torch.library.custom_op("lstmgru::gru_variants_reference_backward", mutates_args=())
def gru_variants_reference_backward(
        grad_y: Tensor, grad_h_n: Tensor, act: Tensor, aux: Tensor, rec: Tensor, stats: Tensor,
        y: Tensor, h0: Tensor, weight_hh: Tensor, bias_hn: Optional[Tensor],
        ln_hh_weight: Optional[Tensor], recurrent_mask: Optional[Tensor],
        zoneout_keep: Optional[Tensor], cuts: Optional[Tensor], per_row: Optional[Tensor],
        reverse: bool, reset_after: bool, zoneout: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(grad_y, grad_h_n, act, aux, rec, stats, y, h0, weight_hh, bias_hn,
                     ln_hh_weight, recurrent_mask, zoneout_keep, cuts, per_row, reverse,
                     reset_after, zoneout)


@gru_variants_reference_backward.register_fake
def _(grad_y, grad_h_n, act, aux, rec, stats, y, h0, weight_hh, bias_hn, ln_hh_weight,
      recurrent_mask, zoneout_keep, cuts, per_row, reverse, reset_after, zoneout):
    return (torch.empty_like(act), torch.empty_like(h0), torch.empty_like(weight_hh),
            torch.empty_like(bias_hn) if bias_hn is not None and reset_after else nothing(act),
            torch.empty_like(ln_hh_weight) if ln_hh_weight is not None else nothing(act))


# Batch rows: gates_x, zoneout_keep, cuts (T, B, .); h0, recurrent_mask, lengths (B, .);
# the saved LayerNorm statistics (2, T, B, 1).
register_row_vmap(gru_variants_reference,
                  (1, 0, None, None, None, 0, 1, 1, 0, None, None, None, None),
                  (1, 0, 1, 1, 1, 2))
register_row_vmap(gru_variants_reference_backward,
                  (1, 0, 1, 1, 1, 2, 1, 0, None, None, None, 0, 1, 1, 0, None, None, None), None)


def _fast_backward(grads, saved, inputs, outputs, options):
    (gates_x, h0, weight_hh, bias_hn, ln_hh_weight, recurrent_mask, zoneout_keep, cuts,
     per_row) = inputs
    grad_gates, grad_h0, grad_w_hh, grad_b_hn, grad_ln = (
        torch.ops.lstmgru.gru_variants_reference_backward(
            *grads, *saved, outputs[0], h0, weight_hh, bias_hn, ln_hh_weight, recurrent_mask,
            zoneout_keep, cuts, per_row, *options))
    return (grad_gates, grad_h0, grad_w_hh, grad_b_hn if bias_hn is not None else None,
            grad_ln if ln_hh_weight is not None else None, None, None, None)


def _spec(gates_x, h0, weight_hh, bias_hn, ln_hh_weight, recurrent_mask, zoneout_keep, cuts,
          per_row, reverse, reset_after, zoneout):
    return gru_steps(gates_x, h0, weight_hh, bias_hn, per_row, reverse, reset_after,
                     StepVariants(ln_hh_weight, None, None, recurrent_mask, zoneout,
                                  zoneout_keep, cuts))


_GRUVariantsRecurrence = recurrence_function(
    "GRUVariantsReferenceRecurrence", "lstmgru::gru_variants_reference", _fast_backward, _spec,
    num_inputs=9, num_outputs=2)


def gru_recurrence(gates_x: Tensor, h0: Tensor, weight_hh: Tensor, bias_hn: Optional[Tensor],
                   lengths: Optional[Lengths], reverse: bool, reset_after: bool,
                   variants: StepVariants):
    """``reference.gru_recurrence`` with ``variants``: the function ``variants.gru_steps``."""
    per_row = None if lengths is None else lengths.per_row
    v = variants
    save = needs_grad(gates_x, h0, weight_hh, bias_hn, v.ln_hh_weight)
    y, h_n, *_ = _GRUVariantsRecurrence.apply(
        gates_x, h0, weight_hh, bias_hn, v.ln_hh_weight, v.recurrent_mask, v.zoneout_keep,
        v.cuts, per_row, reverse, reset_after, float(v.zoneout), save)
    return y, h_n
