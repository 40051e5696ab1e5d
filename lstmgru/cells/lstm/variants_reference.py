"""The LSTM recurrence with cell variants (``lstmgru.cells.variants``) in plain PyTorch, fast.

The equations are ``variants.lstm_steps``; this computes the same function with an explicit
backward, as a pair of ``torch.library`` ops inside one ``autograd.Function`` like the plain
reference (``reference.py``), so autograd records one node per layer-direction rather than
some twenty per step, and ``torch.compile`` sees one opaque op rather than an unrolled loop.

What the forward keeps for the backward (the rest is recomputed from it):
* the gate activations, the cell states and tanh of the (normalised) cell states;
* the state entering each step (after any reset cut): the weight gradient's operand, and
  zoneout's kept value;
* with ``layer_norm``: the raw recurrent product and both LayerNorms' mean and 1/std.
Masks are the caller's, made once per call; the backward reads them again.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._autograd import recurrence_function, register_row_vmap
from ..._sequence import Lengths, needs_grad, previous_states, step_order
from ..variants import (EPS, StepVariants, active_factors, carry_factors, nothing,
                        keep_factors, layer_norm_backward, layer_norm_stats_dtype, lstm_steps,
                        step_value)

def _forward(gates_x, h0, c0, weight_hh, weight_hr, ln_hh_weight, ln_c_weight, ln_c_bias,
             recurrent_mask, zoneout_keep, cuts, per_row, reverse, zoneout, save):
    T, B, G = gates_x.shape
    H, P = G // 4, h0.shape[1]
    layer_norm = ln_hh_weight is not None
    keep = keep_factors(cuts, gates_x)
    carry = carry_factors(zoneout, zoneout_keep, per_row, T, gates_x)
    active = active_factors(per_row, T, gates_x)
    # Detached: out= ops on tensors that require grad take a slower path.
    w_hh_t = weight_hh.detach().t()
    w_hr_t = None if weight_hr is None else weight_hr.detach().t()
    y = gates_x.new_empty(T, B, P)
    act = gates_x.new_empty(T, B, G)         # i, f, g, o after activation
    cells = gates_x.new_empty(T, B, H)       # c after each step (kept state where inactive)
    tanh_cells = gates_x.new_empty(T, B, H)  # tanh of c, or of LN_c(c)
    rec = gates_x.new_empty(T, B, G) if layer_norm else None  # h_in @ W_hh^T, before LN_hh
    stats = [[None] * T for _ in range(4)]   # mean, 1/std of LN_hh and of LN_c, per step
    # Per-step views made once (indexing in the loop costs more than the small ops it feeds).
    gx_steps, act_steps, y_steps = gates_x.unbind(0), act.unbind(0), y.unbind(0)
    cell_steps, tanh_steps = cells.unbind(0), tanh_cells.unbind(0)
    rec_steps = rec.unbind(0) if layer_norm else None
    h, c = h0, c0
    for t in step_order(T, reverse):
        if keep is not None:
            h, c = h * keep[t], c * keep[t]
        h_in = h if recurrent_mask is None else h * recurrent_mask
        if layer_norm:
            torch.mm(h_in, w_hh_t, out=rec_steps[t])
            pre, mean, rstd = torch.native_layer_norm(rec_steps[t], (G,), ln_hh_weight, None,
                                                      EPS)
            pre.add_(gx_steps[t])
            stats[0][t], stats[1][t] = mean, rstd
        else:
            pre = torch.addmm(gx_steps[t], h_in, w_hh_t)
        a = act_steps[t]
        torch.sigmoid(pre, out=a)
        torch.tanh(pre[:, 2 * H:3 * H], out=a[:, 2 * H:3 * H])
        i, f, g, o = a.split(H, dim=1)
        c_new = torch.mul(f, c, out=cell_steps[t]).addcmul_(i, g)
        if layer_norm:
            c_normed, mean, rstd = torch.native_layer_norm(c_new, (H,), ln_c_weight, ln_c_bias,
                                                           EPS)
            stats[2][t], stats[3][t] = mean, rstd
            torch.tanh(c_normed, out=tanh_steps[t])
        else:
            torch.tanh(c_new, out=tanh_steps[t])
        if active is not None:
            # an inactive row keeps its state; the backward reads it from cells
            c_new.lerp_(c, 1 - active[t])
        if w_hr_t is None:
            h_new = torch.mul(o, tanh_steps[t], out=y_steps[t])
        else:
            h_new = torch.mm(o * tanh_steps[t], w_hr_t, out=y_steps[t])
        c_t = step_value(carry, t)
        if c_t is not None:
            h_new.lerp_(h, c_t)
        h, c = h_new.clone() if active is not None else h_new, c_new
        if active is not None:
            y_steps[t].mul_(active[t])
    if not save:
        return y, h.clone(), c.clone(), tuple(nothing(y) for _ in range(5))
    # (4, T, B, 1): each step's slice dense, as ATen's CPU layer-norm backward reads it.
    stats = torch.stack([torch.stack(kind) for kind in stats]) if layer_norm else nothing(y)
    return y, h.clone(), c.clone(), (act, cells, tanh_cells,
                                     rec if layer_norm else nothing(y), stats)


def _backward(grad_y, grad_h_n, grad_c_n, act, cells, tanh_cells, rec, stats, y, h0, c0,
              weight_hh, weight_hr, ln_hh_weight, ln_c_weight, ln_c_bias, recurrent_mask,
              zoneout_keep, cuts, per_row, reverse, zoneout):
    T, B, G = act.shape
    H = G // 4
    layer_norm = ln_hh_weight is not None
    keep = keep_factors(cuts, act)
    carry = carry_factors(zoneout, zoneout_keep, per_row, T, act)
    active = active_factors(per_row, T, act)
    w_hh, w_hr = weight_hh.detach(), None if weight_hr is None else weight_hr.detach()
    # The states entering each step, after the cut: the weight gradient's operand and the
    # forget gate's.
    h_prevs = previous_states(y, h0, per_row, reverse)
    c_prevs = previous_states(cells, c0, per_row, reverse)
    if keep is not None:
        h_prevs, c_prevs = h_prevs * keep, c_prevs * keep
    # What does not depend on the recurrence, for all steps at once: with dc the gradient of
    # the new cell state and dh~ that of o * tanh(.), the gate gradients are
    #   (da_i, da_f, da_g) = dc * factors[:, :, :3],   da_o = dh~ * factors[:, :, 3],
    # and dh~ * factors[:, :, 4] is the gradient of tanh's input. Built in place in one
    # buffer: large temporaries are what costs here. Inactive rows get 0 factors.
    i, f, g, o = act.split(H, dim=2)
    factors = act.new_empty(T, B, 5, H)
    torch.addcmul(i, i, i, value=-1, out=factors[:, :, 0]).mul_(g)         # g i (1 - i)
    torch.addcmul(f, f, f, value=-1, out=factors[:, :, 1]).mul_(c_prevs)   # c f (1 - f)
    torch.mul(g, g, out=factors[:, :, 2]).neg_().add_(1).mul_(i)           # i (1 - g^2)
    torch.addcmul(o, o, o, value=-1, out=factors[:, :, 3]).mul_(tanh_cells)  # tc o (1 - o)
    torch.mul(tanh_cells, tanh_cells, out=factors[:, :, 4]).neg_().add_(1).mul_(o)
    forget = f
    if active is not None:
        factors.mul_(active.unsqueeze(3))
        forget = torch.where(active.bool(), f, 1.0)  # inactive: dc passes through
        grad_y = grad_y * active                       # y is constant 0 there
    c_factors, o_factor, tanh_factor = factors[:, :, :3], factors[:, :, 3], factors[:, :, 4]
    grad_gates = act.new_empty(T, B, G)       # of the pre-activations: gates_x's gradient
    grad_gates_c = grad_gates.view(T, B, 4, H)[:, :, :3]
    grad_rec = [None] * T                     # of h_in @ W_hh^T (LN_hh's input), per step
    grad_tanh_in = act.new_empty(T, B, H) if layer_norm else None  # LN_c's output gradient
    grad_proj = act.new_empty(T, B, y.shape[2]) if w_hr is not None else None
    grad_y_steps, grad_gate_steps = grad_y.unbind(0), grad_gates.unbind(0)
    dh, dc = grad_h_n, grad_c_n
    for t in reversed(step_order(T, reverse)):
        dh_t = dh + grad_y_steps[t]
        c_t = step_value(carry, t)
        dh_new = dh_t if c_t is None else dh_t * (1 - c_t)
        if w_hr is not None:
            grad_proj[t] = dh_new
            dh_new = dh_new @ w_hr
        torch.mul(dh_new, o_factor[t], out=grad_gate_steps[t][:, 3 * H:])
        if layer_norm:
            d_tanh_in = torch.mul(dh_new, tanh_factor[t], out=grad_tanh_in[t])
            d_tanh_in = layer_norm_backward(d_tanh_in, cells[t], (H,), stats[2, t],
                                             stats[3, t], ln_c_weight, ln_c_bias,
                                             (True, False, False))[0]
            dc_t = d_tanh_in.add_(dc)
        else:
            dc_t = torch.addcmul(dc, dh_new, tanh_factor[t])
        torch.mul(dc_t.unsqueeze(1), c_factors[t], out=grad_gates_c[t])
        dc = dc_t * forget[t]
        da = grad_gate_steps[t]
        if layer_norm:
            da = layer_norm_backward(da, rec[t], (G,), stats[0, t], stats[1, t], ln_hh_weight,
                                      None, (True, False, False))[0]
            grad_rec[t] = da
        dh = da @ w_hh
        if recurrent_mask is not None:
            dh.mul_(recurrent_mask)
        if c_t is not None:
            dh.add_(dh_t * c_t)
        if keep is not None:
            dh.mul_(keep[t])
            dc.mul_(keep[t])
    grad_rec = torch.stack(grad_rec) if layer_norm else grad_gates
    operand = h_prevs if recurrent_mask is None else h_prevs * recurrent_mask
    grad_w_hh = grad_rec.reshape(-1, G).t().mm(operand.reshape(-1, operand.shape[2]))
    grad_w_hr = nothing(act)
    if w_hr is not None:
        hidden = (o * tanh_cells).reshape(-1, H)
        grad_w_hr = grad_proj.reshape(-1, grad_proj.shape[2]).t().mm(hidden)
    grad_ln = tuple(nothing(act) for _ in range(3))
    if layer_norm:
        # The gains' (and LN_c's bias') gradients over all steps and rows: ATen's layer-norm
        # backward on the (T * B) rows at once, with the saved statistics.
        rows = T * B
        grad_ln_hh = layer_norm_backward(
            grad_gates.view(rows, G), rec.view(rows, G), (G,), stats[0].view(rows, 1),
            stats[1].view(rows, 1), ln_hh_weight, None, (False, True, False))[1]
        _, grad_ln_c, grad_ln_c_bias = layer_norm_backward(
            grad_tanh_in.view(rows, H), cells.view(rows, H), (H,), stats[2].view(rows, 1),
            stats[3].view(rows, 1), ln_c_weight, ln_c_bias, (False, True, True))
        grad_ln = (grad_ln_hh, grad_ln_c, grad_ln_c_bias)
    return grad_gates, dh.clone(), dc.clone(), grad_w_hh, grad_w_hr, *grad_ln


# --------------------------------------------------------------------------------------
# torch.library ops and the autograd.Function
# --------------------------------------------------------------------------------------
@torch.library.custom_op("lstmgru::lstm_variants_reference", mutates_args=())
def lstm_variants_reference(
        gates_x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor, weight_hr: Optional[Tensor],
        ln_hh_weight: Optional[Tensor], ln_c_weight: Optional[Tensor],
        ln_c_bias: Optional[Tensor], recurrent_mask: Optional[Tensor],
        zoneout_keep: Optional[Tensor], cuts: Optional[Tensor], per_row: Optional[Tensor],
        reverse: bool, zoneout: float, save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, h_n, c_n, saved = _forward(gates_x, h0, c0, weight_hh, weight_hr, ln_hh_weight,
                                  ln_c_weight, ln_c_bias, recurrent_mask, zoneout_keep, cuts,
                                  per_row, reverse, zoneout, save)
    return (y, h_n, c_n, *saved)


@lstm_variants_reference.register_fake
def _(gates_x, h0, c0, weight_hh, weight_hr, ln_hh_weight, ln_c_weight, ln_c_bias,
      recurrent_mask, zoneout_keep, cuts, per_row, reverse, zoneout, save):
    T, B, G = gates_x.shape
    H, P = G // 4, h0.shape[1]
    y = gates_x.new_empty(T, B, P)
    if not save:
        return (y, h0.new_empty(B, P), c0.new_empty(B, H)) + tuple(nothing(y) for _ in range(5))
    layer_norm = ln_hh_weight is not None
    return (y, h0.new_empty(B, P), c0.new_empty(B, H), gates_x.new_empty(T, B, G),
            gates_x.new_empty(T, B, H), gates_x.new_empty(T, B, H),
            gates_x.new_empty(T, B, G) if layer_norm else nothing(y),
            gates_x.new_empty(4, T, B, 1, dtype=layer_norm_stats_dtype(gates_x, ln_hh_weight))
            if layer_norm else nothing(y))


@torch.library.custom_op("lstmgru::lstm_variants_reference_backward", mutates_args=())
def lstm_variants_reference_backward(
        grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, act: Tensor, cells: Tensor,
        tanh_cells: Tensor, rec: Tensor, stats: Tensor, y: Tensor, h0: Tensor, c0: Tensor,
        weight_hh: Tensor, weight_hr: Optional[Tensor], ln_hh_weight: Optional[Tensor],
        ln_c_weight: Optional[Tensor], ln_c_bias: Optional[Tensor],
        recurrent_mask: Optional[Tensor], zoneout_keep: Optional[Tensor], cuts: Optional[Tensor],
        per_row: Optional[Tensor], reverse: bool, zoneout: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(grad_y, grad_h_n, grad_c_n, act, cells, tanh_cells, rec, stats, y, h0,
                     c0, weight_hh, weight_hr, ln_hh_weight, ln_c_weight, ln_c_bias,
                     recurrent_mask, zoneout_keep, cuts, per_row, reverse, zoneout)


@lstm_variants_reference_backward.register_fake
def _(grad_y, grad_h_n, grad_c_n, act, cells, tanh_cells, rec, stats, y, h0, c0, weight_hh,
      weight_hr, ln_hh_weight, ln_c_weight, ln_c_bias, recurrent_mask, zoneout_keep, cuts,
      per_row, reverse, zoneout):
    layer_norm = ln_hh_weight is not None
    return (torch.empty_like(act), torch.empty_like(h0), torch.empty_like(c0),
            torch.empty_like(weight_hh),
            torch.empty_like(weight_hr) if weight_hr is not None else nothing(act),
            torch.empty_like(ln_hh_weight) if layer_norm else nothing(act),
            torch.empty_like(ln_c_weight) if layer_norm else nothing(act),
            torch.empty_like(ln_c_bias) if layer_norm else nothing(act))


# Batch rows: gates_x, zoneout_keep, cuts (T, B, .); h0, c0, recurrent_mask, lengths (B, .);
# the saved LayerNorm statistics (4, T, B, 1).
register_row_vmap(lstm_variants_reference,
                  (1, 0, 0, None, None, None, None, None, 0, 1, 1, 0, None, None, None),
                  (1, 0, 0, 1, 1, 1, 1, 2))
register_row_vmap(lstm_variants_reference_backward,
                  (1, 0, 0, 1, 1, 1, 1, 2, 1, 0, 0, None, None, None, None, None, 0, 1, 1, 0,
                   None, None), None)


def _fast_backward(grads, saved, inputs, outputs, options):
    (gates_x, h0, c0, weight_hh, weight_hr, ln_hh_weight, ln_c_weight, ln_c_bias,
     recurrent_mask, zoneout_keep, cuts, per_row) = inputs
    (grad_gates, grad_h0, grad_c0, grad_w_hh, grad_w_hr, grad_ln_hh, grad_ln_c,
     grad_ln_c_bias) = torch.ops.lstmgru.lstm_variants_reference_backward(
        *grads, *saved, outputs[0], h0, c0, weight_hh, weight_hr, ln_hh_weight, ln_c_weight,
        ln_c_bias, recurrent_mask, zoneout_keep, cuts, per_row, *options)
    layer_norm = ln_hh_weight is not None
    return (grad_gates, grad_h0, grad_c0, grad_w_hh,
            grad_w_hr if weight_hr is not None else None,
            grad_ln_hh if layer_norm else None, grad_ln_c if layer_norm else None,
            grad_ln_c_bias if layer_norm else None, None, None, None)


def _spec(gates_x, h0, c0, weight_hh, weight_hr, ln_hh_weight, ln_c_weight, ln_c_bias,
          recurrent_mask, zoneout_keep, cuts, per_row, reverse, zoneout):
    return lstm_steps(gates_x, h0, c0, weight_hh, weight_hr, per_row, reverse, StepVariants(
        ln_hh_weight, ln_c_weight, ln_c_bias, recurrent_mask, zoneout, zoneout_keep, cuts))


_LSTMVariantsRecurrence = recurrence_function(
    "LSTMVariantsReferenceRecurrence", "lstmgru::lstm_variants_reference", _fast_backward,
    _spec, num_inputs=12, num_outputs=3)


def lstm_recurrence(gates_x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor,
                    weight_hr: Optional[Tensor], lengths: Optional[Lengths], reverse: bool,
                    variants: StepVariants):
    """``reference.lstm_recurrence`` with ``variants``: the function ``variants.lstm_steps``."""
    per_row = None if lengths is None else lengths.per_row
    v = variants
    save = needs_grad(gates_x, h0, c0, weight_hh, weight_hr, v.ln_hh_weight, v.ln_c_weight,
                      v.ln_c_bias)
    y, h_n, c_n, *_ = _LSTMVariantsRecurrence.apply(
        gates_x, h0, c0, weight_hh, weight_hr, v.ln_hh_weight, v.ln_c_weight, v.ln_c_bias,
        v.recurrent_mask, v.zoneout_keep, v.cuts, per_row, reverse, float(v.zoneout), save)
    return y, h_n, c_n
