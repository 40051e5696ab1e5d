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

The Triton kernels in ``lstmgru._kernels`` implement the same recurrences; ``lstmgru._ops``
exposes them as ``lstm_recurrence`` / ``gru_recurrence`` with these functions' arguments and
results, so the two are interchangeable.

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


def needs_grad(*tensors) -> bool:
    """Whether a call must save for backward. Decided by the caller: inside
    ``autograd.Function.forward``, ``ctx.needs_input_grad`` is True even under ``no_grad``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lengths_from_batch_sizes(batch_sizes: Sequence[int], batch: int, device) -> torch.Tensor:
    """Per-row sequence lengths (B,) from packed ``batch_sizes``."""
    sizes = torch.as_tensor(list(batch_sizes), dtype=torch.int64)
    return (sizes.unsqueeze(1) > torch.arange(batch).unsqueeze(0)).sum(0).to(device)


def previous_states(seq: torch.Tensor, init: torch.Tensor, lengths: Optional[torch.Tensor],
                    reverse: bool) -> torch.Tensor:
    """For every step t, the state each row held before step t: (T, B, X).

    ``seq[t]`` is the state after step t (zero where a row is inactive); a row's state
    before its first step is ``init``. Forward in time every row active at t was active at
    t-1, so it is a shift by one step. In reverse, a row of length L (``lengths``, any
    order; None means all T) starts at step L-1 from ``init``.
    """
    T = seq.shape[0]
    prev = torch.empty_like(seq)
    if T == 0:
        return prev
    if not reverse:
        prev[1:] = seq[:-1]
        prev[0] = init
        return prev
    prev[:-1] = seq[1:]
    prev[-1] = init
    if lengths is not None:
        starts = torch.arange(T, device=seq.device).unsqueeze(1) == (lengths - 1).unsqueeze(0)
        prev = torch.where(starts.unsqueeze(-1), init.unsqueeze(0), prev)
    return prev


def recurrent_weight_grad(grad_rec: torch.Tensor, h_prev: torch.Tensor,
                          n_block_operand: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient of ``W_hh`` as ONE GEMM over all steps: sum_t grad_rec_t^T @ h_{t-1}.

    ``grad_rec`` (T, B, G) is the gradient of each step's recurrent product ``h @ W_hh^T``.
    The original GRU (``reset_after=False``) multiplies its n block by ``r * h`` instead of
    ``h``: pass that as ``n_block_operand`` (T, B, H). Operands are taken in the gradient's
    dtype (the kernels return fp32 gradients for low-precision models).
    """
    G = grad_rec.shape[-1]
    rows = grad_rec.reshape(-1, G)
    h_rows = h_prev.reshape(-1, h_prev.shape[-1]).to(rows.dtype)
    if n_block_operand is None:
        return rows.t().mm(h_rows)
    H = n_block_operand.shape[-1]
    n_rows = n_block_operand.reshape(-1, H).to(rows.dtype)
    return torch.cat([rows[:, :G - H].t().mm(h_rows), rows[:, G - H:].t().mm(n_rows)])


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


def _storage(like: torch.Tensor, slots: int, batch: int, width: int, packed: bool):
    """A (slots, B, width) buffer. Packed runs leave rows untouched, so those start at 0."""
    shape = (slots, batch, width)
    return like.new_zeros(shape) if packed else like.new_empty(shape)


def _steps(buffer: torch.Tensor, num_steps: int) -> list:
    """Per-step views of ``buffer``: its own slot per step when it has one per step, else
    slots reused in turn (a ring of 1 or 2). Made once, outside the loop, because creating
    a view costs about as much as a small op, and the loops below are dominated by that."""
    slots = buffer.unbind(0)
    if len(slots) == num_steps:
        return slots
    return (slots * (num_steps // len(slots) + 1))[:num_steps]


def _rows(views, n: int):
    """The first ``n`` rows of each view (the active prefix of a packed step)."""
    return [v[:n] for v in views]


# --------------------------------------------------------------------------------------
# LSTM
# --------------------------------------------------------------------------------------
def _lstm_forward(gates_x, h0, c0, weight_hh, weight_hr, batch_sizes, reverse, save):
    T, B, G = gates_x.shape
    H = G // 4
    P = h0.shape[1]
    packed = batch_sizes is not None
    y = _storage(gates_x, T, B, P, packed)
    act = _storage(gates_x, T if save else 1, B, G, packed)      # i, f, g, o after activation
    cells = _storage(gates_x, T if save else 2, B, H, packed)    # c_t (a ring of 2 suffices)
    # tanh(c_t) is kept for backward: recomputing it costs a full pass of CPU tanh, which is
    # several times slower than sigmoid.
    tanh_cells = _storage(gates_x, T if save else 1, B, H, packed)
    pre = gates_x.new_empty(B, G)
    pre_g = pre[:, 2 * H:3 * H]
    hidden = gates_x.new_empty(B, H)                             # o * tanh(c) before W_hr
    per_step = list(zip(
        gates_x.unbind(0), _steps(act, T), _steps(act[..., :H], T), _steps(act[..., H:2 * H], T),
        _steps(act[..., 2 * H:3 * H], T), _steps(act[..., 3 * H:], T), _steps(cells, T),
        _steps(tanh_cells, T), y.unbind(0)))
    # Detached: out= ops on tensors that require grad take a slower path, even under no_grad.
    w_hh_t = weight_hh.detach().t()
    w_hr_t = weight_hr.detach().t() if weight_hr is not None else None
    h_carry, c_carry = _StateCarry(h0), _StateCarry(c0)
    h_prev, c_prev = h0, c0
    for t in step_order(T, reverse):
        gx, a, i, f, g, o, c, tc, out = per_step[t]
        p, p_g, hid = pre, pre_g, hidden
        if packed:
            n = batch_sizes[t]
            h_prev, c_prev = h_carry.take(n), c_carry.take(n)
            if n != B:
                gx, a, i, f, g, o, c, out, p, p_g, tc, hid = _rows(
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
        return y, h_carry.finish(), c_carry.finish(), act, cells, tanh_cells
    return y, h_prev, c_prev, act, cells, tanh_cells


def _lstm_backward(grad_y, grad_h_n, grad_c_n, act, cells, tanh_c, y, h0, c0, weight_hh,
                   weight_hr, batch_sizes, reverse):
    T, B, G = act.shape
    H = G // 4
    P = y.shape[2]
    packed = batch_sizes is not None
    i, f, g, o = act[..., :H], act[..., H:2 * H], act[..., 2 * H:3 * H], act[..., 3 * H:]
    lengths = None if not packed else lengths_from_batch_sizes(batch_sizes, B, act.device)
    c_prev = previous_states(cells, c0, lengths, reverse)
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

    grad_out = fold_final_grad(grad_y, grad_h_n, y, batch_sizes, reverse)
    grad_gates = act.new_zeros(T, B, G)
    # d h_t of every step is kept only for the projection's weight gradient.
    grad_h = _storage(act, T if weight_hr is not None else 1, B, P, packed)
    # d c flowing back through the forget gate. Rows that have not started yet (in backward
    # order) hold the gradient of their final cell state; rows that are done hold d c_0.
    dc_carry = grad_c_n.clone() if grad_c_n is not None else act.new_zeros(B, H)
    dc = act.new_empty(B, H)
    dc_column = dc.unsqueeze(1)                       # broadcast over the i, f, g gates
    d_hidden = act.new_empty(B, H)
    per_step = list(zip(
        grad_out.unbind(0), _steps(grad_h, T), dc_per_dhidden.unbind(0),
        dpre_ifg_per_dc.unbind(0), dpre_o_per_dhidden.unbind(0), f.unbind(0),
        grad_gates.unbind(0), grad_gates[..., :3 * H].view(T, B, 3, H).unbind(0),
        grad_gates[..., 3 * H:].unbind(0)))
    rows_before, dg_before = 0, None
    for t in step_order(T, not reverse):
        go, dh, k_c, k_ifg, k_o, f_t, dg, dg_ifg, dg_o = per_step[t]
        dcc, dct, dc_col, dhid = dc_carry, dc, dc_column, d_hidden
        n = B
        if packed:
            n = batch_sizes[t]
            if n != B:
                go, dh, k_c, k_ifg, k_o, f_t, dg, dg_ifg, dg_o, dcc, dct, dc_col, dhid = _rows(
                    (go, dh, k_c, k_ifg, k_o, f_t, dg, dg_ifg, dg_o, dcc, dct, dc_col, dhid), n)
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

    grad_weight_hh = recurrent_weight_grad(grad_gates, previous_states(y, h0, lengths, reverse))
    grad_h0 = first_step_rows(grad_gates, batch_sizes, reverse).mm(weight_hh)
    grad_weight_hr = None
    if weight_hr is not None:
        grad_weight_hr = grad_h.reshape(-1, P).t().mm(hidden.reshape(-1, H))
    return grad_gates, grad_h0, dc_carry, grad_weight_hh, grad_weight_hr


# --------------------------------------------------------------------------------------
# GRU
# --------------------------------------------------------------------------------------
def _gru_forward(gates_x, h0, weight_hh, bias_hn, batch_sizes, reverse, reset_after, save):
    T, B, G = gates_x.shape
    H = G // 3
    packed = batch_sizes is not None
    y = _storage(gates_x, T, B, H, packed)
    act = _storage(gates_x, T if save else 1, B, G, packed)        # r, z, n after activation
    # What the backward needs besides the activations: with reset_after the recurrent
    # products h W_hh^T (+ b_hn) (dr needs their n block); without it r * h_{t-1} (the
    # right operand of the n-block weight gradient).
    recurrent = _storage(gates_x, T if save else 1, B, G if reset_after else H, packed)
    w_hh_t = weight_hh.detach().t()       # detached: see _lstm_forward
    w_rz_t, w_n_t = w_hh_t[:, :2 * H], w_hh_t[:, 2 * H:]
    bias_h = None
    if reset_after and bias_hn is not None:
        bias_h = torch.cat([bias_hn.new_zeros(2 * H), bias_hn])
    per_step = list(zip(
        gates_x[..., :2 * H].unbind(0), gates_x[..., 2 * H:].unbind(0),
        _steps(act[..., :2 * H], T), _steps(act[..., :H], T), _steps(act[..., H:2 * H], T),
        _steps(act[..., 2 * H:], T), _steps(recurrent, T),
        _steps(recurrent[..., :2 * H], T) if reset_after else [None] * T,
        _steps(recurrent[..., 2 * H:], T) if reset_after else [None] * T,
        y.unbind(0)))
    h_carry = _StateCarry(h0)
    h_prev = h0
    for t in step_order(T, reverse):
        gx_rz, gx_n, rz, r, z, cand, rec, rec_rz, rec_n, out = per_step[t]
        if packed:
            n = batch_sizes[t]
            h_prev = h_carry.take(n)
            if n != B:
                gx_rz, gx_n, rz, r, z, cand, rec, out = _rows(
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
    return y, (h_carry.finish() if packed else h_prev), act, recurrent


def _gru_backward(grad_y, grad_h_n, act, recurrent, y, h0, weight_hh, bias_hn, batch_sizes,
                  reverse, reset_after):
    T, B, G = act.shape
    H = G // 3
    packed = batch_sizes is not None
    r, z, cand = act[..., :H], act[..., H:2 * H], act[..., 2 * H:]
    lengths = None if not packed else lengths_from_batch_sizes(batch_sizes, B, act.device)
    h_prev = previous_states(y, h0, lengths, reverse)
    # Factors of the gate gradients per unit of d h_t, for all steps at once.
    dcand_pre = (1 - z) * (1 - cand * cand)              # d n_pre / d h_t
    dz_pre = (h_prev - cand) * z * (1 - z)               # d z_pre / d h_t
    grad_out = fold_final_grad(grad_y, grad_h_n, y, batch_sizes, reverse)
    grad_h = _storage(act, T, B, H, packed)
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
        grad_rh = _storage(act, T, B, H, packed)
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
            n = batch_sizes[t]
            if n != B:
                go, dh, dh_col, z_t, k, target, g_rec, g_rec_rz, r_t, dg_n = _rows(
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

    first = lambda seq: first_step_rows(seq, batch_sizes, reverse)  # noqa: E731
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
# autograd Functions and the public entry points
# --------------------------------------------------------------------------------------
class _LSTMRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates_x, h0, c0, weight_hh, weight_hr, batch_sizes, reverse, save):
        y, h_n, c_n, act, cells, tanh_cells = _lstm_forward(gates_x, h0, c0, weight_hh, weight_hr,
                                                            batch_sizes, reverse, save)
        if save:
            ctx.save_for_backward(act, cells, tanh_cells, y, h0, c0, weight_hh, weight_hr)
            ctx.batch_sizes, ctx.reverse = batch_sizes, reverse
        return y, h_n, c_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_h_n, grad_c_n):
        act, cells, tanh_cells, y, h0, c0, weight_hh, weight_hr = ctx.saved_tensors
        grad_gates, grad_h0, grad_c0, grad_w_hh, grad_w_hr = _lstm_backward(
            grad_y, grad_h_n, grad_c_n, act, cells, tanh_cells, y, h0, c0, weight_hh, weight_hr,
            ctx.batch_sizes, ctx.reverse)
        return grad_gates, grad_h0, grad_c0, grad_w_hh, grad_w_hr, None, None, None


class _GRURecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates_x, h0, weight_hh, bias_hn, batch_sizes, reverse, reset_after, save):
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
        return grad_gates, grad_h0, grad_w_hh, grad_b_hn, None, None, None, None


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
    save = needs_grad(gates_x, h0, c0, weight_hh, weight_hr)
    return _LSTMRecurrence.apply(gates_x, h0, c0, weight_hh, weight_hr, batch_sizes, reverse,
                                 save)


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
    save = needs_grad(gates_x, h0, weight_hh, bias_hn)
    return _GRURecurrence.apply(gates_x, h0, weight_hh, bias_hn, batch_sizes, reverse,
                                reset_after, save)
