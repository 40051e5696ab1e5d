"""The LSTM recurrence in plain PyTorch, fast: the CPU path for what torch cannot compute, and
the path every device can run.

One call runs one layer in one direction over all steps. The input projection is done by the
caller for every step at once (``gates_x``); what stays is the sequential part,
``h_{t-1} @ W_hh^T`` plus the gate math, as an ``autograd.Function`` with an explicit backward:

* the forward keeps only the cell states (besides its inputs and its output y, which autograd
  holds anyway): 5H values per step and row with ``gates_x``, what cuDNN's reserve space holds;
* the backward first recomputes the gate activations of all steps from ``gates_x`` and the
  saved states, as ONE matrix product ``h_{t-1} @ W_hh^T`` over all steps (cheap beside the
  sequential loop, which multiplies one step at a time);
* then it runs a reverse loop producing the gradient of every gate pre-activation at every
  step; what does not depend on the recurrence (products of saved activations) is computed for
  all steps at once before the loop, so each step is a handful of in-place ops;
* the gradients of ``W_hh`` and ``W_hr`` are each ONE matrix product over all steps.

``spec.py`` beside this file is the same function written as the equations; the tests hold the
two against each other and against torch.nn. ``lengths`` (packed input): see
``lstmgru._sequence.Lengths``; inactive rows keep their state and output zeros, and with
``reverse`` a row starts at its own last step.
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
from .variants_reference import lstm_recurrence as variant_recurrence

# --------------------------------------------------------------------------------------
def _lstm_forward(gates_x, h0, c0, weight_hh, weight_hr, lengths, reverse, save):
    T, B, G = gates_x.shape
    H = G // 4
    P = h0.shape[1]
    packed = lengths is not None
    y = storage(gates_x, T, B, P, packed)
    act = storage(gates_x, 1, B, G, packed)                     # i, f, g, o after activation
    cells = storage(gates_x, T if save else 2, B, H, packed)    # c_t (a ring of 2 suffices)
    tanh_cells = storage(gates_x, 1, B, H, packed)
    pre = gates_x.new_empty(B, G)
    pre_g = pre[:, 2 * H:3 * H]
    hidden = gates_x.new_empty(B, H)                             # o * tanh(c) before W_hr
    per_step = list(zip(
        gates_x.unbind(0), step_views(act, T), step_views(act[..., :H], T),
        step_views(act[..., H:2 * H], T),
        step_views(act[..., 2 * H:3 * H], T), step_views(act[..., 3 * H:], T), step_views(cells, T),
        step_views(tanh_cells, T), y.unbind(0)))
    # Detached: out= ops on tensors that require grad take a slower path, even under no_grad.
    w_hh_t = weight_hh.detach().t()
    w_hr_t = weight_hr.detach().t() if weight_hr is not None else None
    h_carry, c_carry = StateCarry(h0), StateCarry(c0)
    h_prev, c_prev = h0, c0
    for t in step_order(T, reverse):
        gx, a, i, f, g, o, c, tc, out = per_step[t]
        p, p_g, hid = pre, pre_g, hidden
        if packed:
            n = lengths.batch_sizes[t]
            h_prev, c_prev = h_carry.take(n), c_carry.take(n)
            if n != B:
                gx, a, i, f, g, o, c, out, p, p_g, tc, hid = prefix_rows(
                    (gx, a, i, f, g, o, c, out, p, p_g, tc, hid), n)
        torch.addmm(gx, h_prev, w_hh_t, out=p)
        torch.sigmoid(p, out=a)
        torch.tanh(p_g, out=g)
        torch.mul(f, c_prev, out=c)
        c.addcmul_(i, g)
        torch.tanh(c, out=tc)
        if w_hr_t is None:
            torch.mul(o, tc, out=out)
        else:
            torch.mul(o, tc, out=hid)
            torch.mm(hid, w_hr_t, out=out)
        h_prev, c_prev = out, c
        if packed:
            h_carry.put(out)
            c_carry.put(c)
    if packed:
        return y, h_carry.finish(), c_carry.finish(), cells
    return y, h_prev, c_prev, cells


def recomputed_activations(gates_x: Tensor, h_prev: Tensor, weight_hh: Tensor) -> Tensor:
    """The gate activations i, f, g, o of every step (T, B, 4H), from the input part of the
    pre-activations and the state entering each step: ONE matrix product over all steps."""
    T, B, G = gates_x.shape
    H = G // 4
    act = torch.addmm(gates_x.reshape(T * B, G), h_prev.reshape(T * B, -1),
                      weight_hh.detach().t()).view(T, B, G)
    torch.tanh(act[..., 2 * H:3 * H], out=act[..., 2 * H:3 * H])
    act[..., :2 * H].sigmoid_()
    act[..., 3 * H:].sigmoid_()
    return act


def _lstm_backward(grad_y, grad_h_n, grad_c_n, gates_x, cells, y, h0, c0, weight_hh,
                   weight_hr, lengths, reverse):
    T, B, G = gates_x.shape
    H = G // 4
    P = y.shape[2]
    packed = lengths is not None
    per_row = None if lengths is None else lengths.per_row
    h_prev = previous_states(y, h0, per_row, reverse)
    act = recomputed_activations(gates_x, h_prev, weight_hh)
    tanh_c = torch.tanh(cells)
    i, f, g, o = act[..., :H], act[..., H:2 * H], act[..., 2 * H:3 * H], act[..., 3 * H:]
    c_prev = previous_states(cells, c0, per_row, reverse)
    # Everything that does not depend on the recurrent gradient, for all steps at once:
    #   d c_t          = d c_{t+1} * f_{t+1} + d hidden_t * o_t * (1 - tanh(c_t)^2)
    #   d pre_{i,f,g}  = d c_t * [g i(1-i), c_{t-1} f(1-f), i (1-g^2)]
    #   d pre_o        = d hidden_t * tanh(c_t) o(1-o)
    # where hidden_t = o * tanh(c_t) is h_t before the projection (h_t itself without one).
    dc_per_dhidden = o * (1 - tanh_c * tanh_c)
    dpre_ifg_per_dc = torch.stack(
        [g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], dim=2)   # (T, B, 3, H)
    dpre_o_per_dhidden = tanh_c * o * (1 - o)
    del c_prev
    hidden = o * tanh_c if weight_hr is not None else None

    grad_out = fold_final_grad(grad_y, grad_h_n, y, lengths, reverse)
    grad_gates = act.new_zeros(T, B, G)
    # d h_t of every step is kept only for the projection's weight gradient.
    grad_h = storage(act, T if weight_hr is not None else 1, B, P, packed)
    # d c flowing back through the forget gate. Rows that have not started yet (in backward
    # order) hold the gradient of their final cell state; rows that are done hold d c_0.
    dc_carry = grad_c_n.clone() if grad_c_n is not None else act.new_zeros(B, H)
    dc = act.new_empty(B, H)
    dc_column = dc.unsqueeze(1)                       # broadcast over the i, f, g gates
    d_hidden = act.new_empty(B, H)
    per_step = list(zip(
        grad_out.unbind(0), step_views(grad_h, T), dc_per_dhidden.unbind(0),
        dpre_ifg_per_dc.unbind(0), dpre_o_per_dhidden.unbind(0), f.unbind(0),
        grad_gates.unbind(0), grad_gates[..., :3 * H].view(T, B, 3, H).unbind(0),
        grad_gates[..., 3 * H:].unbind(0)))
    rows_before, dg_before = 0, None
    for t in step_order(T, not reverse):
        go, dh, k_c, k_ifg, k_o, f_t, dg, dg_ifg, dg_o = per_step[t]
        dcc, dct, dc_col, dhid = dc_carry, dc, dc_column, d_hidden
        n = B
        if packed:
            n = lengths.batch_sizes[t]
            if n != B:
                (go, dh, k_c, k_ifg, k_o, f_t, dg, dg_ifg, dg_o, dcc, dct, dc_col,
                 dhid) = prefix_rows((go, dh, k_c, k_ifg, k_o, f_t, dg, dg_ifg, dg_o, dcc, dct,
                                      dc_col, dhid), n)
        # d h_t = d out_t + d gates_{t+1} @ W_hh (rows that ran at t+1)
        if dg_before is not None and n <= rows_before:
            torch.addmm(go, dg_before[:n] if n != rows_before else dg_before, weight_hh, out=dh)
        else:
            dh.copy_(go)
            if dg_before is not None:
                dh[:rows_before].addmm_(dg_before, weight_hh)
        if weight_hr is None:
            dhid = dh
        else:
            torch.mm(dh, weight_hr, out=dhid)
        torch.addcmul(dcc, dhid, k_c, out=dct)
        torch.mul(k_ifg, dc_col, out=dg_ifg)
        torch.mul(k_o, dhid, out=dg_o)
        torch.mul(dct, f_t, out=dcc)
        rows_before, dg_before = n, dg

    grad_weight_hh = recurrent_weight_grad(grad_gates, h_prev)
    grad_h0 = first_step_rows(grad_gates, lengths, reverse).mm(weight_hh)
    grad_weight_hr = None
    if weight_hr is not None:
        grad_weight_hr = grad_h.reshape(-1, P).t().mm(hidden.reshape(-1, H))
    return grad_gates, grad_h0, dc_carry, grad_weight_hh, grad_weight_hr


# --------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile and torch.export) and the autograd.Function
# --------------------------------------------------------------------------------------
@torch.library.custom_op("lstmgru::lstm_reference", mutates_args=())
def lstm_reference(gates_x: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor,
                   weight_hr: Optional[Tensor], per_row: Optional[Tensor], reverse: bool,
                   save: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    lengths = None if per_row is None else Lengths.from_per_row(per_row, gates_x.shape[0])
    y, h_n, c_n, cells = _lstm_forward(gates_x, h0, c0, weight_hh, weight_hr, lengths, reverse,
                                       save)
    if not save:  # nothing kept (an own tensor: results must not alias)
        cells = gates_x.new_empty(0)
    # h_n and c_n may be views of y and cells; op results must not alias one another.
    return y, h_n.clone(), c_n.clone(), cells


@lstm_reference.register_fake
def _(gates_x, h0, c0, weight_hh, weight_hr, per_row, reverse, save):
    T, B, G = gates_x.shape
    H, P = G // 4, h0.shape[1]
    cells = gates_x.new_empty(T, B, H) if save else gates_x.new_empty(0)
    return (gates_x.new_empty(T, B, P), h0.new_empty(B, P), c0.new_empty(B, H), cells)


@torch.library.custom_op("lstmgru::lstm_reference_backward", mutates_args=())
def lstm_reference_backward(grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Tensor,
                            gates_x: Tensor, cells: Tensor, y: Tensor, h0: Tensor, c0: Tensor,
                            weight_hh: Tensor, weight_hr: Optional[Tensor],
                            per_row: Optional[Tensor],
                            reverse: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    lengths = None if per_row is None else Lengths.from_per_row(per_row, gates_x.shape[0])
    grads = _lstm_backward(grad_y, grad_h_n, grad_c_n, gates_x, cells, y, h0, c0,
                           weight_hh, weight_hr, lengths, reverse)
    grad_gates, grad_h0, grad_c0, grad_w_hh, grad_w_hr = grads
    return (grad_gates, grad_h0, grad_c0, grad_w_hh,
            grad_w_hr if grad_w_hr is not None else gates_x.new_empty(0))


@lstm_reference_backward.register_fake
def _(grad_y, grad_h_n, grad_c_n, gates_x, cells, y, h0, c0, weight_hh, weight_hr,
      per_row, reverse):
    return (torch.empty_like(gates_x), torch.empty_like(h0), torch.empty_like(c0),
            torch.empty_like(weight_hh),
            torch.empty_like(weight_hr) if weight_hr is not None else gates_x.new_empty(0))


# Batch rows are dimension 1 of (T, B, .) tensors and 0 of (B, .) ones. The backward's
# weight gradients sum over rows: under vmap it runs per slice.
register_row_vmap(lstm_reference, (1, 0, 0, None, None, 0, None, None), (1, 0, 0, 1))
register_row_vmap(lstm_reference_backward, (1, 0, 0, 1, 1, 1, 0, 0, None, None, 0, None),
                  None)


def _fast_backward(grads, saved, inputs, outputs, options):
    gates_x, h0, c0, weight_hh, weight_hr, per_row = inputs
    grad_gates, grad_h0, grad_c0, grad_w_hh, grad_w_hr = \
        torch.ops.lstmgru.lstm_reference_backward(*grads, gates_x, *saved, outputs[0], h0, c0,
                                                  weight_hh, weight_hr, per_row, *options)
    return grad_gates, grad_h0, grad_c0, grad_w_hh, grad_w_hr if weight_hr is not None else None


_LSTMRecurrence = recurrence_function("LSTMReferenceRecurrence", "lstmgru::lstm_reference",
                                      _fast_backward, spec.recurrence, num_inputs=6,
                                      num_outputs=3)


# --------------------------------------------------------------------------------------
# torch's own LSTM layer (oneDNN) as an op: what a traced float32 CPU layer runs
# --------------------------------------------------------------------------------------
# In eager mode "native" runs torch.nn's forward, which on the CPU reaches oneDNN's LSTM
# layer, one call per layer-direction (aten::mkldnn_rnn_layer) and its backward
# (aten::mkldnn_rnn_layer_backward). Traced, torch's RNN op would be unrolled over the steps,
# so under torch.compile / torch.export the reference runs instead; where oneDNN computes the
# layer (float32 CPU tensors, no projection, no lengths, no variants) it runs these two ATen
# ops inside an lstmgru op, opaque to the tracer: the same kernels as eager torch.nn, so the
# same numbers bit for bit, at the same speed. A backward that must itself be differentiable
# recomputes through the spec, as for every recurrence.
_ONEDNN_LSTM = 2  # ideep::rnn_kind::LSTM: the mode torch passes to aten::mkldnn_rnn_layer
_ONEDNN_BUILT = torch.backends.mkldnn.is_available()  # a constant; dynamo skips the call


def onednn_takes(x: torch.Tensor, weights, lengths: Optional[Lengths]) -> bool:
    """Whether ``onednn_layer`` computes this layer-direction (``weights`` as ``layer``'s).
    (``torch.backends.mkldnn.flags(enabled=False)`` is not consulted: dynamo cannot read it.)"""
    return (x.is_cpu and x.dtype == torch.float32 and weights[4] is None and lengths is None
            and _ONEDNN_BUILT)


def _onednn_args(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, train):
    has_biases = bias_ih is not None
    if not has_biases:  # ignored by oneDNN, but the op takes tensors
        bias_ih = bias_hh = weight_ih.new_zeros(weight_ih.shape[0])
    return (x.contiguous(), weight_ih, weight_hh, bias_ih, bias_hh,
            h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous(), reverse, [],
            _ONEDNN_LSTM, c0.shape[1], 1, has_biases, False, False, train)


@torch.library.custom_op("lstmgru::lstm_onednn", mutates_args=(), device_types="cpu")
def lstm_onednn(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Optional[Tensor], bias_hh: Optional[Tensor], per_row: Optional[Tensor],
                reverse: bool, save: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if per_row is not None:
        raise ValueError("lstmgru::lstm_onednn takes no lengths (oneDNN's layer has none)")
    # oneDNN keeps its workspace for the backward only where grad mode is on: an
    # autograd.Function's forward runs with it off.
    with torch.set_grad_enabled(save):
        y, h_n, c_n, workspace = torch.ops.aten.mkldnn_rnn_layer(
            *_onednn_args(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, save))
    h_n, c_n = h_n.squeeze(0), c_n.squeeze(0)
    if not save:
        nothing = x.new_empty(0)
        return y, h_n, c_n, x.new_empty(0, dtype=torch.uint8), nothing, nothing.clone()
    # oneDNN's backward takes the final states too; the recurrence Function keeps only y of
    # the results, so they travel with the workspace (copies: op results must not alias).
    return y, h_n, c_n, workspace, h_n.clone(), c_n.clone()


@lstm_onednn.register_fake
def _(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, per_row, reverse, save):
    T, B, _ = x.shape
    H = c0.shape[1]
    # oneDNN sizes its workspace itself: a size known only when the op has run.
    workspace_size = torch.library.get_ctx().new_dynamic_size() if save else 0
    kept = (B, H) if save else (0,)
    return (x.new_empty(T, B, H), h0.new_empty(B, H), c0.new_empty(B, H),
            x.new_empty(workspace_size, dtype=torch.uint8), h0.new_empty(kept),
            c0.new_empty(kept))


@torch.library.custom_op("lstmgru::lstm_onednn_backward", mutates_args=(), device_types="cpu")
def lstm_onednn_backward(grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, workspace: Tensor,
                         h_n: Tensor, c_n: Tensor, y: Tensor, x: Tensor, h0: Tensor, c0: Tensor,
                         weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                         bias_hh: Optional[Tensor], reverse: bool
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    (x, weight_ih, weight_hh, b_ih, b_hh, hx, cx, reverse, batch_sizes, mode, hidden_size,
     num_layers, has_biases, bidirectional, batch_first, train) = _onednn_args(
        x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, True)
    grads = torch.ops.aten.mkldnn_rnn_layer_backward(
        x, weight_ih, weight_hh, b_ih, b_hh, hx, cx, y, h_n.unsqueeze(0), c_n.unsqueeze(0),
        grad_y, grad_h_n.unsqueeze(0), grad_c_n.unsqueeze(0), reverse, mode, hidden_size,
        num_layers, has_biases, train, bidirectional, batch_sizes, batch_first, workspace)
    grad_x, grad_w_ih, grad_w_hh, grad_b, _, grad_h0, grad_c0 = grads
    # oneDNN has one bias: both biases get its gradient (op results must not alias).
    grad_b_ih = grad_b if bias_ih is not None else x.new_empty(0)
    grad_b_hh = grad_b.clone() if bias_ih is not None else x.new_empty(0)
    return (grad_x, grad_h0.squeeze(0), grad_c0.squeeze(0), grad_w_ih, grad_w_hh, grad_b_ih,
            grad_b_hh)


@lstm_onednn_backward.register_fake
def _(grad_y, grad_h_n, grad_c_n, workspace, h_n, c_n, y, x, h0, c0, weight_ih, weight_hh,
      bias_ih, bias_hh, reverse):
    bias_like = (lambda b: torch.empty_like(b)) if bias_ih is not None else \
        (lambda b: x.new_empty(0))
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(c0),
            torch.empty_like(weight_ih), torch.empty_like(weight_hh), bias_like(bias_ih),
            bias_like(bias_hh))


def _onednn_fast_backward(grads, saved, inputs, outputs, options):
    x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, _ = inputs
    (reverse,) = options
    result = torch.ops.lstmgru.lstm_onednn_backward(
        *grads, *saved, *outputs, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, reverse)
    if bias_ih is None:
        return (*result[:5], None, None)
    return result


def _onednn_spec(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, per_row, reverse):
    return spec.lstm_spec(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, None, per_row,
                          reverse)


_LSTMOneDNN = recurrence_function("LSTMOneDNNLayer", "lstmgru::lstm_onednn",
                                  _onednn_fast_backward, _onednn_spec, num_inputs=8,
                                  num_outputs=3)


def onednn_layer(x: torch.Tensor, weights, h0: torch.Tensor, c0: torch.Tensor, reverse: bool):
    """One LSTM layer-direction on oneDNN, from its input x (T, B, I): ``layer``'s function
    (see ``onednn_takes`` for where it applies). Returns y (T, B, H), h_n, c_n."""
    weight_ih, weight_hh, bias_ih, bias_hh, _ = weights
    save = needs_grad(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    y, h_n, c_n, *_ = _LSTMOneDNN.apply(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, None,
                                       reverse, save)
    return y, h_n, c_n


def lstm_recurrence(gates_x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                    weight_hh: torch.Tensor, weight_hr: Optional[torch.Tensor] = None,
                    lengths: Optional[Lengths] = None, reverse: bool = False,
                    variants: Optional[StepVariants] = None):
    """One LSTM layer-direction over all steps.

    Args:
        gates_x: (T, B, 4H) ``x @ W_ih^T + b_ih + b_hh`` for every step, gates i, f, g, o.
        h0: (B, P); c0: (B, H).
        weight_hh: (4H, P). weight_hr: (P, H) or None (no projection).
        lengths, reverse: see the module docstring.
        variants: the cell variants' part in the loop (``lstmgru.cells.variants``), or None.

    Returns:
        y (T, B, P) with zeros where a row is inactive, h_n (B, P), c_n (B, H); the same
        function as ``spec.recurrence`` (``variants.lstm_steps`` with variants).
    """
    if variants is not None:
        return variant_recurrence(gates_x, h0, c0, weight_hh, weight_hr, lengths, reverse,
                                  variants)
    save = needs_grad(gates_x, h0, c0, weight_hh, weight_hr)
    per_row = None if lengths is None else lengths.per_row
    y, h_n, c_n, *_ = _LSTMRecurrence.apply(gates_x, h0, c0, weight_hh, weight_hr, per_row,
                                            reverse, save)
    return y, h_n, c_n
