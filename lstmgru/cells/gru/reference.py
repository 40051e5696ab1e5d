"""The GRU recurrence in plain PyTorch, fast, in both forms: ``reset_after=True`` (torch.nn,
cuDNN) and ``reset_after=False`` (the original GRU, which torch cannot compute and which runs
here or in the kernels).

Structure as in ``lstmgru/cells/lstm/reference.py``: the caller projects the input for all
steps; this is the sequential part as an ``autograd.Function`` with an explicit backward whose
per-step work is a few in-place ops, and the ``W_hh`` gradient is one GEMM over all steps.
The forward keeps nothing of its own: the backward recomputes the gates of all steps from
``gates_x`` and the outputs (the states), with one GEMM over all steps (two for the original
GRU), so the backward holds 4H values per step and row with ``gates_x`` (cuDNN's reserve: 6H).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._autograd import recurrence_function, register_row_vmap
from ..._sequence import (Lengths, StateCarry, first_step_rows, fold_final_grad, needs_grad,
                          prefix_rows, previous_states, recurrent_weight_grad, step_order,
                          step_views, storage)
from ..variants import StepVariants
from . import spec
from .variants_reference import gru_recurrence as variant_recurrence

# --------------------------------------------------------------------------------------
def _gru_forward(gates_x, h0, weight_hh, bias_hn, lengths, reverse, reset_after):
    T, B, G = gates_x.shape
    H = G // 3
    packed = lengths is not None
    y = storage(gates_x, T, B, H, packed)
    act = storage(gates_x, 1, B, G, packed)        # r, z, n after activation
    # with reset_after the recurrent products h W_hh^T (+ b_hn); without it r * h_{t-1}
    recurrent = storage(gates_x, 1, B, G if reset_after else H, packed)
    w_hh_t = weight_hh.detach().t()       # detached: see _lstm_forward
    w_rz_t, w_n_t = w_hh_t[:, :2 * H], w_hh_t[:, 2 * H:]
    bias_h = None
    if reset_after and bias_hn is not None:
        bias_h = torch.cat([bias_hn.new_zeros(2 * H), bias_hn])
    per_step = list(zip(
        gates_x[..., :2 * H].unbind(0), gates_x[..., 2 * H:].unbind(0),
        step_views(act[..., :2 * H], T), step_views(act[..., :H], T),
        step_views(act[..., H:2 * H], T),
        step_views(act[..., 2 * H:], T), step_views(recurrent, T),
        step_views(recurrent[..., :2 * H], T) if reset_after else [None] * T,
        step_views(recurrent[..., 2 * H:], T) if reset_after else [None] * T,
        y.unbind(0)))
    h_carry = StateCarry(h0)
    h_prev = h0
    for t in step_order(T, reverse):
        gx_rz, gx_n, rz, r, z, cand, rec, rec_rz, rec_n, out = per_step[t]
        if packed:
            n = lengths.batch_sizes[t]
            h_prev = h_carry.take(n)
            if n != B:
                gx_rz, gx_n, rz, r, z, cand, rec, out = prefix_rows(
                    (gx_rz, gx_n, rz, r, z, cand, rec, out), n)
                if reset_after:
                    rec_rz, rec_n = rec_rz[:n], rec_n[:n]
        if reset_after:
            if bias_h is None:
                torch.mm(h_prev, w_hh_t, out=rec)
            else:
                torch.addmm(bias_h, h_prev, w_hh_t, out=rec)
            torch.add(gx_rz, rec_rz, out=rz).sigmoid_()
            torch.addcmul(gx_n, r, rec_n, out=cand).tanh_()
        else:
            torch.addmm(gx_rz, h_prev, w_rz_t, out=rz).sigmoid_()
            torch.mul(r, h_prev, out=rec)
            torch.addmm(gx_n, rec, w_n_t, out=cand).tanh_()
        # h_t = (1 - z) * n + z * h_{t-1} = lerp(n, h_{t-1}, z)
        torch.lerp(cand, h_prev, z, out=out)
        h_prev = out
        if packed:
            h_carry.put(out)
    return y, (h_carry.finish() if packed else h_prev)


def _recomputed_gates(gates_x, h_prev, weight_hh, bias_hn, reset_after):
    """The forward's gate activations r, z, n of every step (T, B, 3H) and what the backward
    needs beside them: with reset_after the recurrent products h W_hh^T (+ b_hn) (dr needs
    their n block); without it r * h_{t-1} (the n block's weight-gradient operand)."""
    T, B, G = gates_x.shape
    H = G // 3
    rows = h_prev.reshape(T * B, H)
    w_hh_t = weight_hh.detach().t()
    if reset_after:
        recurrent = torch.mm(rows, w_hh_t).view(T, B, G)
        if bias_hn is not None:
            recurrent[..., 2 * H:] += bias_hn.detach()
        act = torch.add(gates_x, recurrent)
        act[..., :2 * H].sigmoid_()
        torch.addcmul(gates_x[..., 2 * H:], act[..., :H], recurrent[..., 2 * H:],
                      out=act[..., 2 * H:]).tanh_()
        return act, recurrent
    rz = torch.addmm(gates_x[..., :2 * H].reshape(T * B, 2 * H), rows,
                     w_hh_t[:, :2 * H]).sigmoid_().view(T, B, 2 * H)
    recurrent = rz[..., :H] * h_prev
    cand = torch.addmm(gates_x[..., 2 * H:].reshape(T * B, H), recurrent.view(T * B, H),
                       w_hh_t[:, 2 * H:]).tanh_().view(T, B, H)
    return torch.cat([rz, cand], dim=2), recurrent


def _gru_backward(grad_y, grad_h_n, gates_x, y, h0, weight_hh, bias_hn, lengths, reverse,
                  reset_after):
    T, B, G = gates_x.shape
    H = G // 3
    packed = lengths is not None
    per_row = None if lengths is None else lengths.per_row
    h_prev = previous_states(y, h0, per_row, reverse)
    act, recurrent = _recomputed_gates(gates_x, h_prev, weight_hh, bias_hn, reset_after)
    r, z, cand = act[..., :H], act[..., H:2 * H], act[..., 2 * H:]
    # Factors of the gate gradients per unit of d h_t, for all steps at once.
    dcand_pre = (1 - z) * (1 - cand * cand)              # d n_pre / d h_t
    dz_pre = (h_prev - cand) * z * (1 - z)               # d z_pre / d h_t
    grad_out = fold_final_grad(grad_y, grad_h_n, y, lengths, reverse)
    grad_h = storage(act, T, B, H, packed)
    grad_gates = act.new_zeros(T, B, G)
    w_rz, w_n = weight_hh[:2 * H], weight_hh[2 * H:]
    if reset_after:
        # n_pre = gx_n + r * gh_n, so d gh = d h_t * [dr_pre, dz_pre, dn_pre * r]: every
        # gradient of the recurrent products is d h_t times a known factor.
        dr_pre = dcand_pre * recurrent[..., 2 * H:] * r * (1 - r)
        factors = torch.stack([dr_pre, dz_pre, dcand_pre * r], dim=2)      # (T, B, 3, H)
        del dr_pre
        grad_rec = act.new_zeros(T, B, G)
        targets = grad_rec.view(T, B, 3, H)
    else:
        # n_pre = gx_n + (r * h) W_hn^T: d r_pre = (d n_pre W_hn) * h * r (1 - r)
        dr_pre_per_drh = h_prev * r * (1 - r)
        factors = torch.stack([dz_pre, dcand_pre], dim=2)                  # (T, B, 2, H)
        grad_rec = grad_gates                  # all biases are folded: the same gradients
        targets = grad_gates[..., H:].view(T, B, 2, H)
        grad_rh = storage(act, T, B, H, packed)
    del dz_pre
    per_step = list(zip(
        grad_out.unbind(0), grad_h.unbind(0), grad_h.unsqueeze(2).unbind(0), z.unbind(0),
        factors.unbind(0),
        targets.unbind(0), grad_rec.unbind(0), grad_rec[..., :2 * H].unbind(0),
        r.unbind(0),
        grad_rh.unbind(0) if not reset_after else [None] * T,
        grad_gates[..., :H].unbind(0) if not reset_after else [None] * T,
        grad_gates[..., 2 * H:].unbind(0),
        dr_pre_per_drh.unbind(0) if not reset_after else [None] * T))
    rows_before, before = 0, None
    for t in step_order(T, not reverse):
        go, dh, dh_col, z_t, k, target, g_rec, g_rec_rz, r_t, d_rh, dg_r, dg_n, k_r = per_step[t]
        n = B
        if packed:
            n = lengths.batch_sizes[t]
            if n != B:
                go, dh, dh_col, z_t, k, target, g_rec, g_rec_rz, r_t, dg_n = prefix_rows(
                    (go, dh, dh_col, z_t, k, target, g_rec, g_rec_rz, r_t, dg_n), n)
                if not reset_after:
                    d_rh, dg_r, k_r = d_rh[:n], dg_r[:n], k_r[:n]
        # d h_t = d out_t + what step t+1 sent back to h_t: through its recurrent products
        # and through z * h_t (and r * h_t without reset_after).
        if before is None:
            dh.copy_(go)
        else:
            dh_b, z_b, g_rec_b, g_rec_rz_b, r_b, d_rh_b = before
            m = min(n, rows_before)
            if m == n == rows_before:
                mm_into = dh
                if reset_after:
                    torch.addmm(go, g_rec_b, weight_hh, out=dh)
                else:
                    torch.addmm(go, g_rec_rz_b, w_rz, out=dh)
            else:
                dh.copy_(go)
                mm_into = dh[:m]
                if reset_after:
                    mm_into.addmm_(g_rec_b[:m], weight_hh)
                else:
                    mm_into.addmm_(g_rec_rz_b[:m], w_rz)
            if not reset_after:
                mm_into.addcmul_(d_rh_b[:m], r_b[:m])
            mm_into.addcmul_(dh_b[:m], z_b[:m])
        torch.mul(k, dh_col, out=target)
        if not reset_after:
            torch.mm(dg_n, w_n, out=d_rh)
            torch.mul(d_rh, k_r, out=dg_r)
        rows_before, before = n, (dh, z_t, g_rec, g_rec_rz, r_t, d_rh)

    first = lambda seq: first_step_rows(seq, lengths, reverse)  # noqa: E731
    grad_h0 = first(grad_h * z)
    if reset_after:
        grad_gates.copy_(grad_rec)
        grad_gates[..., 2 * H:] = grad_h * dcand_pre
        grad_weight_hh = recurrent_weight_grad(grad_rec, h_prev)
        grad_bias_hn = grad_rec[..., 2 * H:].sum((0, 1)) if bias_hn is not None else None
        grad_h0 += first(grad_rec).mm(weight_hh)
    else:
        grad_weight_hh = recurrent_weight_grad(grad_gates, h_prev, n_block_operand=recurrent)
        grad_bias_hn = None
        grad_h0 += first(grad_gates[..., :2 * H]).mm(w_rz)
        grad_h0 += first(grad_rh * r)
    return grad_gates, grad_h0, grad_weight_hh, grad_bias_hn


# --------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile and torch.export) and the autograd.Function
# --------------------------------------------------------------------------------------
@torch.library.custom_op("lstmgru::gru_reference", mutates_args=())
def gru_reference(gates_x: Tensor, h0: Tensor, weight_hh: Tensor, bias_hn: Optional[Tensor],
                  per_row: Optional[Tensor], reverse: bool, reset_after: bool,
                  save: bool) -> Tuple[Tensor, Tensor]:
    # ``save`` stays in the signature of every recurrence op; this one keeps nothing.
    lengths = None if per_row is None else Lengths.from_per_row(per_row, gates_x.shape[0])
    y, h_n = _gru_forward(gates_x, h0, weight_hh, bias_hn, lengths, reverse, reset_after)
    return y, h_n.clone()  # h_n may be a view of y: results must not alias


@gru_reference.register_fake
def _(gates_x, h0, weight_hh, bias_hn, per_row, reverse, reset_after, save):
    T, B, G = gates_x.shape
    return gates_x.new_empty(T, B, G // 3), h0.new_empty(B, G // 3)


@torch.library.custom_op("lstmgru::gru_reference_backward", mutates_args=())
def gru_reference_backward(grad_y: Tensor, grad_h_n: Tensor, gates_x: Tensor, y: Tensor,
                           h0: Tensor, weight_hh: Tensor, bias_hn: Optional[Tensor],
                           per_row: Optional[Tensor], reverse: bool,
                           reset_after: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    lengths = None if per_row is None else Lengths.from_per_row(per_row, gates_x.shape[0])
    grad_gates, grad_h0, grad_w_hh, grad_b_hn = _gru_backward(
        grad_y, grad_h_n, gates_x, y, h0, weight_hh, bias_hn, lengths, reverse, reset_after)
    return (grad_gates, grad_h0, grad_w_hh,
            grad_b_hn if grad_b_hn is not None else gates_x.new_empty(0))


@gru_reference_backward.register_fake
def _(grad_y, grad_h_n, gates_x, y, h0, weight_hh, bias_hn, per_row, reverse, reset_after):
    return (torch.empty_like(gates_x), torch.empty_like(h0), torch.empty_like(weight_hh),
            torch.empty_like(bias_hn) if bias_hn is not None else gates_x.new_empty(0))


# Batch rows: as for the LSTM's ops (lstm/reference.py).
register_row_vmap(gru_reference, (1, 0, None, None, 0, None, None, None), (1, 0))
register_row_vmap(gru_reference_backward, (1, 0, 1, 1, 0, None, None, 0, None, None), None)


def _fast_backward(grads, saved, inputs, outputs, options):
    gates_x, h0, weight_hh, bias_hn, per_row = inputs
    grad_gates, grad_h0, grad_w_hh, grad_b_hn = torch.ops.lstmgru.gru_reference_backward(
        *grads, gates_x, outputs[0], h0, weight_hh, bias_hn, per_row, *options)
    return grad_gates, grad_h0, grad_w_hh, grad_b_hn if bias_hn is not None else None


_GRURecurrence = recurrence_function("GRUReferenceRecurrence", "lstmgru::gru_reference",
                                     _fast_backward, spec.recurrence, num_inputs=5,
                                     num_outputs=2)


# --------------------------------------------------------------------------------------
# torch's own GRU layer (ATen's loop) as an op: what a traced CPU layer runs without gradients
# --------------------------------------------------------------------------------------
# In eager mode "native" runs torch.nn's forward: on the CPU, ATen's C++ loop over the steps.
# Traced, that loop would be unrolled, so under torch.compile the reference runs instead.
# Where no gradient is needed (inference: no_grad, inference_mode, frozen weights) it runs
# torch's own GRU layer inside an lstmgru op, opaque to the tracer: the same C++ loop as eager
# torch.nn, without the reference's per-step Python overhead. With gradients the reference
# recurrence stays: torch's GRU differentiates its loop step by step through autograd, and the
# reference's explicit backward is faster than that.
@torch.library.custom_op("lstmgru::gru_aten_inference", mutates_args=(), device_types="cpu")
def gru_aten_inference(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                       bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
                       reverse: bool) -> Tuple[Tensor, Tensor]:
    weights = [weight_ih, weight_hh] + ([bias_ih, bias_hh] if bias_ih is not None else [])
    # A single-direction ATen GRU runs forward in time; the reverse direction of torch.nn's
    # bidirectional layer is the same steps over the flipped sequence.
    steps = x.flip(0) if reverse else x
    y, h_n = torch._VF.gru(steps, h0.unsqueeze(0), weights, bias_ih is not None, 1, 0.0,
                           False, False, False)
    return (y.flip(0) if reverse else y), h_n.squeeze(0)


@gru_aten_inference.register_fake
def _(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, reverse):
    return x.new_empty(x.shape[0], x.shape[1], h0.shape[1]), torch.empty_like(h0)


def aten_inference_takes(x: torch.Tensor, weights, h0: torch.Tensor, lengths, reset_after: bool,
                         variants) -> bool:
    """Whether ``gru_aten_inference`` computes this layer-direction: torch's form of the GRU
    on CPU tensors, no lengths, no variants, and nothing that needs a gradient."""
    return (x.is_cpu and reset_after and lengths is None and variants is None
            and not needs_grad(x, h0, *weights))


def gru_recurrence(gates_x: torch.Tensor, h0: torch.Tensor, weight_hh: torch.Tensor,
                   bias_hn: Optional[torch.Tensor] = None, lengths: Optional[Lengths] = None,
                   reverse: bool = False, reset_after: bool = True,
                   variants: Optional[StepVariants] = None):
    """One GRU layer-direction over all steps.

    Args:
        gates_x: (T, B, 3H) ``x @ W_ih^T + b_ih`` plus every recurrent bias that can be
            folded: ``b_hr, b_hz`` (and ``b_hn`` too when ``reset_after=False``). Gates r, z, n.
        h0: (B, H). weight_hh: (3H, H).
        bias_hn: (H,) or None; only with ``reset_after``, where it sits inside ``r * (...)``.
        lengths, reverse: see ``lstmgru._sequence.Lengths`` and the LSTM's reference.

    Returns:
        y (T, B, H) with zeros where a row is inactive, h_n (B, H): the same function as
        ``spec.recurrence`` (``variants.gru_steps`` with ``variants``, the cell variants'
        part in the loop).
    """
    if variants is not None:
        return variant_recurrence(gates_x, h0, weight_hh, bias_hn, lengths, reverse,
                                  reset_after, variants)
    save = needs_grad(gates_x, h0, weight_hh, bias_hn)
    per_row = None if lengths is None else lengths.per_row
    y, h_n, *_ = _GRURecurrence.apply(gates_x, h0, weight_hh, bias_hn, per_row, reverse,
                                      reset_after, save)
    return y, h_n
