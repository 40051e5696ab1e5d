"""Plain-PyTorch LSTM and GRU recurrences: the readable specification and the CPU path.

One call runs one layer in one direction over all time steps. The input projection
``x @ W_ih^T + biases`` is NOT done here: the caller computes it for every step with one
GEMM and passes it in as ``gates_x``. What stays is the part that is truly sequential,
``h_{t-1} @ W_hh^T`` plus the gate math, written as an ``autograd.Function`` with an
explicit backward:

* the forward saves the gate activations and the cell states, nothing per-step else;
* the backward is a reverse loop that produces the gradient of every gate pre-activation
  at every step; everything in it that does not depend on the recurrence (the products of
  saved activations) is computed for all steps at once before the loop, so each step is a
  handful of in-place ops;
* the gradient of ``W_hh`` (and of ``W_hr``) is ONE matrix product over all steps.

The Triton kernels in ``lstmgru._kernels`` implement exactly these functions, with the
same arguments and results, so the two are interchangeable (see ``lstmgru._ops``).

Shapes: ``T`` steps, ``B`` batch rows, ``H`` hidden size, ``P`` the size of ``h``
(``proj_size`` for a projected LSTM, else ``H``).

``batch_sizes`` (packed sequences): ``None``, or a list of ``T`` non-increasing ints with
``batch_sizes[0] == B``; rows are sorted by length, so at step ``t`` the active rows are the
prefix ``[:batch_sizes[t]]``. Inactive rows keep their state and output zeros. With
``reverse`` a row starts at its own last step and runs back to step 0, like torch.nn.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

BatchSizes = Optional[Sequence[int]]


# --------------------------------------------------------------------------------------
# Bookkeeping shared by every recurrence (and by the Triton glue in lstmgru._ops)
# --------------------------------------------------------------------------------------
def step_order(num_steps: int, reverse: bool) -> range:
    """The time steps in the order a direction processes them."""
    return range(num_steps - 1, -1, -1) if reverse else range(num_steps)


def active_rows(batch_sizes: BatchSizes, t: int, batch: int) -> int:
    return batch if batch_sizes is None else batch_sizes[t]


def lengths_from_batch_sizes(batch_sizes: Sequence[int], batch: int, device) -> torch.Tensor:
    """Per-row sequence lengths (B,) from packed ``batch_sizes``."""
    sizes = torch.as_tensor(list(batch_sizes), dtype=torch.int64)
    return (sizes.unsqueeze(1) > torch.arange(batch).unsqueeze(0)).sum(0).to(device)


def previous_states(seq: torch.Tensor, init: torch.Tensor, batch_sizes: BatchSizes,
                    reverse: bool) -> torch.Tensor:
    """For every step t, the state each row held before step t: (T, B, X).

    ``seq[t]`` is the state after step t. A row's state before its first step is ``init``.
    Forward, every active row at t was active at t-1, so it is a shift by one step. In
    reverse with packed rows, a row whose length is L starts at step L-1 from ``init``.
    """
    prev = torch.empty_like(seq)
    if seq.shape[0] == 0:
        return prev
    if reverse:
        prev[:-1] = seq[1:]
        prev[-1] = init
        if batch_sizes is not None:
            for t in range(seq.shape[0] - 1):
                started, now = batch_sizes[t + 1], batch_sizes[t]
                if now > started:
                    prev[t, started:now] = init[started:now]
    else:
        prev[1:] = seq[:-1]
        prev[0] = init
    return prev


def fold_final_grad(grad_y: Optional[torch.Tensor], grad_final: Optional[torch.Tensor],
                    like: torch.Tensor, batch_sizes: BatchSizes, reverse: bool) -> torch.Tensor:
    """``grad_y`` with the gradient of the final state added where each row ends.

    ``h_n`` of a row IS its output at its last processed step, so the gradient of ``h_n``
    simply joins the output gradient there; the backward loops then need no special case.
    """
    grad = torch.zeros_like(like) if grad_y is None else grad_y.clone()
    if grad_final is None or grad.shape[0] == 0:
        return grad
    if reverse or batch_sizes is None:
        grad[0 if reverse else -1] += grad_final
        return grad
    T = grad.shape[0]
    for t in range(T):
        ends_after = batch_sizes[t + 1] if t + 1 < T else 0
        if batch_sizes[t] > ends_after:
            rows = slice(ends_after, batch_sizes[t])
            grad[t, rows] += grad_final[rows]
    return grad


def first_step_rows(seq: torch.Tensor, batch_sizes: BatchSizes, reverse: bool) -> torch.Tensor:
    """``seq[t_first(b), b]`` for every row b: the step where row b started (B, X)."""
    if not reverse:
        return seq[0]
    if batch_sizes is None:
        return seq[-1]
    out = torch.empty_like(seq[0])
    T = seq.shape[0]
    for t in range(T):
        started_before = batch_sizes[t + 1] if t + 1 < T else 0
        if batch_sizes[t] > started_before:
            rows = slice(started_before, batch_sizes[t])
            out[rows] = seq[t, rows]
    return out


class _StateCarry:
    """The state (h or c) that each step starts from, tracking the active-row prefix.

    Forward in time the prefix only shrinks, so the previous step's rows are sliced. In
    reverse (packed) it grows: rows that join start from their initial state. Rows that
    leave are recorded as final states.
    """

    def __init__(self, init: torch.Tensor):
        self.init = init
        self.current = init
        self.final = torch.empty_like(init)

    def take(self, rows: int) -> torch.Tensor:
        have = self.current.shape[0]
        if rows < have:
            self.final[rows:have] = self.current[rows:have]
            self.current = self.current[:rows]
        elif rows > have:
            self.current = torch.cat([self.current, self.init[have:rows]])
        return self.current

    def put(self, state: torch.Tensor) -> None:
        self.current = state

    def finish(self) -> torch.Tensor:
        self.final[: self.current.shape[0]] = self.current
        return self.final


def _row_buffer(like: torch.Tensor, steps: int, batch: int, width: int, save: bool,
                packed: bool) -> torch.Tensor:
    """(T, B, width) storage when saved for backward, else one reusable (1, B, width) slot."""
    shape = (steps if save else 1, batch, width)
    return like.new_zeros(shape) if packed else like.new_empty(shape)


# --------------------------------------------------------------------------------------
# LSTM
# --------------------------------------------------------------------------------------
def _lstm_forward(gates_x, h0, c0, weight_hh, weight_hr, batch_sizes, reverse, save):
    T, B, G = gates_x.shape
    H = G // 4
    P = h0.shape[1]
    packed = batch_sizes is not None
    y = gates_x.new_zeros(T, B, P) if packed else gates_x.new_empty(T, B, P)
    act = _row_buffer(gates_x, T, B, G, save, packed)        # i, f, g, o after activation
    cells = _row_buffer(gates_x, T if save else 2, B, H, True, packed)
    pre = gates_x.new_empty(B, G)
    tanh_c = gates_x.new_empty(B, H)
    hidden = gates_x.new_empty(B, H) if weight_hr is not None else None
    w_hh_t = weight_hh.t()
    w_hr_t = weight_hr.t() if weight_hr is not None else None
    h_carry, c_carry = _StateCarry(h0), _StateCarry(c0)
    for step, t in enumerate(step_order(T, reverse)):
        n = active_rows(batch_sizes, t, B)
        h_prev, c_prev = h_carry.take(n), c_carry.take(n)
        a = act[t if save else 0, :n]
        c = cells[t if save else step % 2, :n]
        torch.addmm(gates_x[t, :n], h_prev, w_hh_t, out=pre[:n])
        torch.sigmoid(pre[:n], out=a)
        torch.tanh(pre[:n, 2 * H:3 * H], out=a[:, 2 * H:3 * H])
        torch.mul(a[:, H:2 * H], c_prev, out=c)
        c.addcmul_(a[:, :H], a[:, 2 * H:3 * H])
        torch.tanh(c, out=tanh_c[:n])
        if weight_hr is None:
            torch.mul(a[:, 3 * H:], tanh_c[:n], out=y[t, :n])
        else:
            torch.mul(a[:, 3 * H:], tanh_c[:n], out=hidden[:n])
            torch.mm(hidden[:n], w_hr_t, out=y[t, :n])
        h_carry.put(y[t, :n])
        c_carry.put(c)
    return y, h_carry.finish(), c_carry.finish(), act, cells


def _lstm_backward(grad_y, grad_h_n, grad_c_n, act, cells, y, h0, c0, weight_hh, weight_hr,
                   batch_sizes, reverse):
    T, B, G = act.shape
    H = G // 4
    i, f, g, o = act[..., :H], act[..., H:2 * H], act[..., 2 * H:3 * H], act[..., 3 * H:]
    tanh_c = torch.tanh(cells)
    c_prev = previous_states(cells, c0, batch_sizes, reverse)
    # Everything that does not depend on the recurrent gradient, for all steps at once:
    #   d c_t        = d c_{t+1} * f_{t+1} + d hidden_t * o_t * (1 - tanh(c_t)^2)
    #   d pre_{i,f,g} = d c_t * [g i(1-i), c_{t-1} f(1-f), i (1-g^2)]
    #   d pre_o       = d hidden_t * tanh(c_t) o(1-o)
    dc_from_hidden = o * (1 - tanh_c * tanh_c)
    dpre_ifg_per_dc = torch.stack(
        [g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], dim=2)   # (T, B, 3, H)
    dpre_o_per_dhidden = tanh_c * o * (1 - o)
    del tanh_c, c_prev

    P = y.shape[2]
    grad_out = fold_final_grad(grad_y, grad_h_n, y, batch_sizes, reverse)
    packed = batch_sizes is not None
    grad_gates = act.new_zeros(T, B, G)
    grad_h = act.new_zeros(T, B, P) if packed else act.new_empty(T, B, P)
    # d c flowing back through the forget gate; rows that have not started (in backward
    # order) hold the gradient of their final cell state.
    dc_carry = grad_c_n.clone() if grad_c_n is not None else act.new_zeros(B, H)
    dc = act.new_empty(B, H)
    d_hidden = act.new_empty(B, H) if weight_hr is not None else None
    rows_before = 0
    dg_before = None
    for t in step_order(T, not reverse):
        n = active_rows(batch_sizes, t, B)
        dh = grad_h[t, :n]
        if dg_before is not None and n <= rows_before:
            torch.addmm(grad_out[t, :n], dg_before[:n], weight_hh, out=dh)
        else:
            dh.copy_(grad_out[t, :n])
            if dg_before is not None:
                dh[:rows_before].addmm_(dg_before, weight_hh)
        if weight_hr is None:
            dhid = dh
        else:
            dhid = torch.mm(dh, weight_hr, out=d_hidden[:n])
        torch.addcmul(dc_carry[:n], dhid, dc_from_hidden[t, :n], out=dc[:n])
        dg = grad_gates[t, :n]
        torch.mul(dpre_ifg_per_dc[t, :n], dc[:n].unsqueeze(1), out=dg[:, :3 * H].view(n, 3, H))
        torch.mul(dpre_o_per_dhidden[t, :n], dhid, out=dg[:, 3 * H:])
        torch.mul(dc[:n], f[t, :n], out=dc_carry[:n])
        rows_before, dg_before = n, dg

    h_prev = previous_states(y, h0, batch_sizes, reverse)
    grad_weight_hh = grad_gates.reshape(-1, G).t().mm(h_prev.reshape(-1, P))
    grad_h0 = first_step_rows(grad_gates, batch_sizes, reverse).mm(weight_hh)
    grad_weight_hr = None
    if weight_hr is not None:
        hidden = o * torch.tanh(cells)
        grad_weight_hr = grad_h.reshape(-1, P).t().mm(hidden.reshape(-1, H))
    return grad_gates, grad_h0, dc_carry, grad_weight_hh, grad_weight_hr


# --------------------------------------------------------------------------------------
# GRU
# --------------------------------------------------------------------------------------
def _gru_forward(gates_x, h0, weight_hh, bias_hn, batch_sizes, reverse, reset_after, save):
    T, B, G = gates_x.shape
    H = G // 3
    packed = batch_sizes is not None
    y = gates_x.new_zeros(T, B, H) if packed else gates_x.new_empty(T, B, H)
    act = _row_buffer(gates_x, T, B, G, save, packed)        # r, z, n after activation
    # What the backward needs besides the activations: with reset_after the recurrent
    # products h W_hh^T (+ b_hn) (dr needs their n block); without it r * h_{t-1} (the
    # right operand of the n-block weight gradient).
    recurrent = _row_buffer(gates_x, T, B, G if reset_after else H, save, packed)
    diff = gates_x.new_empty(B, H)
    w_hh_t = weight_hh.t()
    bias_h = None
    if reset_after and bias_hn is not None:
        bias_h = torch.cat([bias_hn.new_zeros(2 * H), bias_hn])
    h_carry = _StateCarry(h0)
    for t in step_order(T, reverse):
        n = active_rows(batch_sizes, t, B)
        h_prev = h_carry.take(n)
        a = act[t if save else 0, :n]
        rz, r, z, cand = a[:, :2 * H], a[:, :H], a[:, H:2 * H], a[:, 2 * H:]
        rec = recurrent[t if save else 0, :n]
        if reset_after:
            if bias_h is None:
                torch.mm(h_prev, w_hh_t, out=rec)
            else:
                torch.addmm(bias_h, h_prev, w_hh_t, out=rec)
            torch.add(gates_x[t, :n, :2 * H], rec[:, :2 * H], out=rz).sigmoid_()
            torch.addcmul(gates_x[t, :n, 2 * H:], r, rec[:, 2 * H:], out=cand).tanh_()
        else:
            torch.addmm(gates_x[t, :n, :2 * H], h_prev, w_hh_t[:, :2 * H], out=rz).sigmoid_()
            torch.mul(r, h_prev, out=rec)
            torch.addmm(gates_x[t, :n, 2 * H:], rec, w_hh_t[:, 2 * H:], out=cand).tanh_()
        # h_t = (1 - z) * n + z * h_{t-1} = n + z * (h_{t-1} - n)
        torch.sub(h_prev, cand, out=diff[:n])
        torch.addcmul(cand, z, diff[:n], out=y[t, :n])
        h_carry.put(y[t, :n])
    return y, h_carry.finish(), act, recurrent


def _gru_backward(grad_y, grad_h_n, act, recurrent, y, h0, weight_hh, bias_hn, batch_sizes,
                  reverse, reset_after):
    T, B, G = act.shape
    H = G // 3
    r, z, cand = act[..., :H], act[..., H:2 * H], act[..., 2 * H:]
    h_prev = previous_states(y, h0, batch_sizes, reverse)
    # Factors of the gate gradients per unit of d h_t, for all steps at once.
    dcand_pre = (1 - z) * (1 - cand * cand)              # d n_pre / d h_t
    dz_pre = (h_prev - cand) * z * (1 - z)               # d z_pre / d h_t
    packed = batch_sizes is not None
    grad_out = fold_final_grad(grad_y, grad_h_n, y, batch_sizes, reverse)
    grad_h = act.new_zeros(T, B, H) if packed else act.new_empty(T, B, H)
    if reset_after:
        # n_pre = gx_n + r * gh_n: d gh = d h_t * [dr_pre, dz_pre, dn_pre * r]
        dr_pre = dcand_pre * recurrent[..., 2 * H:] * r * (1 - r)
        grad_rec_per_dh = torch.stack([dr_pre, dz_pre, dcand_pre * r], dim=2)   # (T, B, 3, H)
        del dr_pre
        grad_rec = act.new_zeros(T, B, G)
    else:
        # n_pre = gx_n + (r * h) W_hn^T: d r_pre = (d n_pre W_hn) * h * r (1 - r)
        dr_pre_per_drh = h_prev * r * (1 - r)
        zn_per_dh = torch.stack([dz_pre, dcand_pre], dim=2)                      # (T, B, 2, H)
        grad_gates = act.new_zeros(T, B, G)
        grad_rh = act.new_zeros(T, B, H) if packed else act.new_empty(T, B, H)
    del dz_pre

    rows_before = 0
    t_before = None
    for t in step_order(T, not reverse):
        n = active_rows(batch_sizes, t, B)
        dh = grad_h[t, :n]
        # d h_t = d out_t + (everything step t+1 sent back to h_t)
        m = min(n, rows_before)
        if t_before is not None and m == n:
            if reset_after:
                torch.addmm(grad_out[t, :n], grad_rec[t_before, :n], weight_hh, out=dh)
            else:
                torch.addmm(grad_out[t, :n], grad_gates[t_before, :n, :2 * H],
                            weight_hh[:2 * H], out=dh)
        else:
            dh.copy_(grad_out[t, :n])
            if t_before is not None:
                if reset_after:
                    dh[:m].addmm_(grad_rec[t_before, :m], weight_hh)
                else:
                    dh[:m].addmm_(grad_gates[t_before, :m, :2 * H], weight_hh[:2 * H])
        if t_before is not None:
            if not reset_after:
                dh[:m].addcmul_(grad_rh[t_before, :m], r[t_before, :m])
            dh[:m].addcmul_(grad_h[t_before, :m], z[t_before, :m])
        if reset_after:
            torch.mul(grad_rec_per_dh[t, :n], dh.unsqueeze(1), out=grad_rec[t, :n].view(n, 3, H))
        else:
            dg = grad_gates[t, :n]
            torch.mul(zn_per_dh[t, :n], dh.unsqueeze(1), out=dg[:, H:].view(n, 2, H))
            torch.mm(dg[:, 2 * H:], weight_hh[2 * H:], out=grad_rh[t, :n])
            torch.mul(grad_rh[t, :n], dr_pre_per_drh[t, :n], out=dg[:, :H])
        rows_before, t_before = n, t

    first = lambda seq: first_step_rows(seq, batch_sizes, reverse)  # noqa: E731
    grad_h0 = first(grad_h * z)
    if reset_after:
        grad_gates = grad_rec.clone()
        grad_gates[..., 2 * H:] = grad_h * dcand_pre
        grad_weight_hh = grad_rec.reshape(-1, G).t().mm(h_prev.reshape(-1, H))
        grad_bias_hn = grad_rec[..., 2 * H:].sum((0, 1)) if bias_hn is not None else None
        grad_h0 += first(grad_rec).mm(weight_hh)
    else:
        grad_weight_hh = torch.cat([
            grad_gates[..., :2 * H].reshape(-1, 2 * H).t().mm(h_prev.reshape(-1, H)),
            grad_gates[..., 2 * H:].reshape(-1, H).t().mm(recurrent.reshape(-1, H)),
        ])
        grad_bias_hn = None
        grad_h0 += first(grad_gates[..., :2 * H]).mm(weight_hh[:2 * H])
        grad_h0 += first(grad_rh * r)
    return grad_gates, grad_h0, grad_weight_hh, grad_bias_hn


# --------------------------------------------------------------------------------------
# autograd Functions and the public entry points
# --------------------------------------------------------------------------------------
class _LSTMRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates_x, h0, c0, weight_hh, weight_hr, batch_sizes, reverse):
        save = any(ctx.needs_input_grad)
        y, h_n, c_n, act, cells = _lstm_forward(gates_x, h0, c0, weight_hh, weight_hr,
                                                batch_sizes, reverse, save)
        if save:
            ctx.save_for_backward(act, cells, y, h0, c0, weight_hh, weight_hr)
            ctx.batch_sizes, ctx.reverse = batch_sizes, reverse
        return y, h_n, c_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_h_n, grad_c_n):
        act, cells, y, h0, c0, weight_hh, weight_hr = ctx.saved_tensors
        grad_gates, grad_h0, grad_c0, grad_w_hh, grad_w_hr = _lstm_backward(
            grad_y, grad_h_n, grad_c_n, act, cells, y, h0, c0, weight_hh, weight_hr,
            ctx.batch_sizes, ctx.reverse)
        return grad_gates, grad_h0, grad_c0, grad_w_hh, grad_w_hr, None, None


class _GRURecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates_x, h0, weight_hh, bias_hn, batch_sizes, reverse, reset_after):
        save = any(ctx.needs_input_grad)
        y, h_n, act, recurrent = _gru_forward(gates_x, h0, weight_hh, bias_hn, batch_sizes,
                                              reverse, reset_after, save)
        if save:
            ctx.save_for_backward(act, recurrent, y, h0, weight_hh, bias_hn)
            ctx.batch_sizes, ctx.reverse, ctx.reset_after = batch_sizes, reverse, reset_after
        return y, h_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_h_n):
        act, recurrent, y, h0, weight_hh, bias_hn = ctx.saved_tensors
        grad_gates, grad_h0, grad_w_hh, grad_b_hn = _gru_backward(
            grad_y, grad_h_n, act, recurrent, y, h0, weight_hh, bias_hn, ctx.batch_sizes,
            ctx.reverse, ctx.reset_after)
        return grad_gates, grad_h0, grad_w_hh, grad_b_hn, None, None, None


def lstm_recurrence(gates_x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                    weight_hh: torch.Tensor, weight_hr: Optional[torch.Tensor] = None,
                    batch_sizes: BatchSizes = None, reverse: bool = False):
    """One LSTM layer-direction over all steps.

    Args:
        gates_x: (T, B, 4H) ``x @ W_ih^T + b_ih + b_hh`` for every step, gates i, f, g, o.
        h0: (B, P); c0: (B, H).
        weight_hh: (4H, P). weight_hr: (P, H) or None (no projection).
        batch_sizes, reverse: see the module docstring.

    Equations (per step t, in processing order)::

        i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of  gates_x[t] + h @ weight_hh^T
        c = f * c + i * g
        h = o * tanh(c)            (then h = h @ weight_hr^T with a projection)

    Returns:
        y (T, B, P) with zeros where a row is inactive, h_n (B, P), c_n (B, H).
    """
    return _LSTMRecurrence.apply(gates_x, h0, c0, weight_hh, weight_hr, batch_sizes, reverse)


def gru_recurrence(gates_x: torch.Tensor, h0: torch.Tensor, weight_hh: torch.Tensor,
                   bias_hn: Optional[torch.Tensor] = None, batch_sizes: BatchSizes = None,
                   reverse: bool = False, reset_after: bool = True):
    """One GRU layer-direction over all steps.

    Args:
        gates_x: (T, B, 3H) ``x @ W_ih^T + b_ih`` plus every recurrent bias that can be
            folded: ``b_hr, b_hz`` (and ``b_hn`` too when ``reset_after=False``). Gates r, z, n.
        h0: (B, H). weight_hh: (3H, H).
        bias_hn: (H,) or None; only with ``reset_after``, where it sits inside ``r * (...)``.

    Equations (per step t, in processing order)::

        r, z = sigmoid(gates_x[t, r|z] + h @ W_h{r,z}^T)
        n = tanh(gates_x[t, n] + r * (h @ W_hn^T + b_hn))      reset_after=True (torch.nn)
        n = tanh(gates_x[t, n] + (r * h) @ W_hn^T)             reset_after=False (original)
        h = (1 - z) * n + z * h

    Returns:
        y (T, B, H) with zeros where a row is inactive, h_n (B, H).
    """
    return _GRURecurrence.apply(gates_x, h0, weight_hh, bias_hn, batch_sizes, reverse,
                                reset_after)
