"""Sequence plumbing shared by every cell and every implementation.

Everything here is about time steps and rows, never about a cell's gate math: the order a
direction walks the steps, which rows are active at a step (``Lengths``), the state each step
started from, the gradient of the final state folded into the output gradient, and the
gradient of a recurrent weight as ONE GEMM over all steps.

Shapes: ``T`` steps, ``B`` batch rows; ``X`` stands for whatever width a state has.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch


class Lengths(NamedTuple):
    """Per-row sequence lengths of a packed batch, in both forms the implementations use.

    Made once per forward call by the module (``Lengths.from_batch_sizes``) and handed down
    as is, so no layer converts one form into the other.

    ``batch_sizes``: T non-increasing ints, the number of active rows at each step (rows are
    sorted by length, so the active rows of step t are the prefix ``[:batch_sizes[t]]``).
    ``per_row``: int64 (B,) on the data's device; row b is active at step t iff
    ``t < per_row[b]``.
    """

    batch_sizes: tuple
    per_row: torch.Tensor

    @staticmethod
    def from_batch_sizes(batch_sizes: Sequence[int], batch: int, device) -> "Lengths":
        sizes = torch.as_tensor(list(batch_sizes), dtype=torch.int64)
        per_row = (sizes.unsqueeze(1) > torch.arange(batch).unsqueeze(0)).sum(0)
        return Lengths(tuple(int(s) for s in batch_sizes), per_row.to(device))

    @staticmethod
    def from_per_row(per_row: torch.Tensor, num_steps: int) -> "Lengths":
        """The same, from the per-row tensor: how a recurrence op gets it back, since op
        arguments are tensors. Rows must be sorted by length, as packed batches are."""
        steps = torch.arange(num_steps, device=per_row.device)
        sizes = (per_row.unsqueeze(0) > steps.unsqueeze(1)).sum(1)
        return Lengths(tuple(sizes.tolist()), per_row)

    def packed_rows(self) -> torch.Tensor:
        """For each row of the packed data, its row in the padded (T * B, .) layout: packed
        data lists the active rows of step 0, then of step 1, ..., each a prefix."""
        sizes = torch.tensor(self.batch_sizes, dtype=torch.int64)
        total, batch = int(sizes.sum()), self.batch_sizes[0]
        step = torch.repeat_interleave(torch.arange(len(sizes)), sizes, output_size=total)
        starts = sizes.cumsum(0) - sizes
        return (step * batch + torch.arange(total) - starts[step]).to(self.per_row.device)

    def pad(self, data: torch.Tensor) -> torch.Tensor:
        """Packed data (N, X) -> (T, B, X), zeros where a row is inactive. Unlike torch's
        ``pad_packed_sequence``, plain indexing: it has forward-mode AD and torch.func rules."""
        T, B = len(self.batch_sizes), self.batch_sizes[0]
        padded = data.new_zeros(T * B, *data.shape[1:])
        return padded.index_copy(0, self.packed_rows(), data).view(T, B, *data.shape[1:])

    def pack(self, seq: torch.Tensor) -> torch.Tensor:
        """(T, B, X) -> the packed data (N, X): the inverse of ``pad``."""
        return seq.flatten(0, 1).index_select(0, self.packed_rows())


def step_order(num_steps: int, reverse: bool) -> range:
    """The time steps in the order a direction processes them."""
    return range(num_steps - 1, -1, -1) if reverse else range(num_steps)


def needs_grad(*tensors) -> bool:
    """Whether a call must save for backward. Decided by the caller: inside
    ``autograd.Function.forward``, ``ctx.needs_input_grad`` is True even under ``no_grad``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def input_projection(x: torch.Tensor, weight_ih: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ weight_ih^T + bias`` for all (T, B) rows at once: (T, B, I) -> (T, B, G)."""
    T, B, _ = x.shape
    rows = x.reshape(T * B, x.shape[2])
    if bias is None:
        gates = torch.mm(rows, weight_ih.t())
    else:
        gates = torch.addmm(bias, rows, weight_ih.t())
    return gates.view(T, B, weight_ih.shape[0])


def previous_states(seq: torch.Tensor, init: torch.Tensor, per_row: Optional[torch.Tensor],
                    reverse: bool) -> torch.Tensor:
    """For every step t, the state each row held before step t: (T, B, X).

    ``seq[t]`` is the state after step t (zero where a row is inactive); a row's state
    before its first step is ``init``. Forward in time every row active at t was active at
    t-1, so it is a shift by one step. In reverse, a row of length L (``per_row``, the
    ``Lengths.per_row`` tensor; None means all T) starts at step L-1 from ``init``.
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
    if per_row is not None:
        starts = torch.arange(T, device=seq.device).unsqueeze(1) == (per_row - 1).unsqueeze(0)
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
                    like: torch.Tensor, lengths: Optional[Lengths], reverse: bool) -> torch.Tensor:
    """``grad_y`` with the gradient of the final state added where each row ends.

    ``h_n`` of a row IS its output at its last processed step, so the gradient of ``h_n``
    simply joins the output gradient there; the backward loops then need no special case.
    """
    grad = torch.zeros_like(like) if grad_y is None else grad_y.clone()
    if grad_final is None or grad.shape[0] == 0:
        return grad
    if reverse or lengths is None:
        grad[0 if reverse else -1] += grad_final
        return grad
    sizes = lengths.batch_sizes
    T = grad.shape[0]
    for t in range(T):
        ends_after = sizes[t + 1] if t + 1 < T else 0
        if sizes[t] > ends_after:
            rows = slice(ends_after, sizes[t])
            grad[t, rows] += grad_final[rows]
    return grad


def first_step_rows(seq: torch.Tensor, lengths: Optional[Lengths], reverse: bool) -> torch.Tensor:
    """``seq[t_first(b), b]`` for every row b: the step where row b started (B, X)."""
    if not reverse:
        return seq[0]
    if lengths is None:
        return seq[-1]
    sizes = lengths.batch_sizes
    out = torch.empty_like(seq[0])
    T = seq.shape[0]
    for t in range(T):
        started_before = sizes[t + 1] if t + 1 < T else 0
        if sizes[t] > started_before:
            rows = slice(started_before, sizes[t])
            out[rows] = seq[t, rows]
    return out


class StateCarry:
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


def storage(like: torch.Tensor, slots: int, batch: int, width: int, packed: bool):
    """A (slots, B, width) buffer. Packed runs leave rows untouched, so those start at 0."""
    shape = (slots, batch, width)
    return like.new_zeros(shape) if packed else like.new_empty(shape)


def step_views(buffer: torch.Tensor, num_steps: int) -> list:
    """Per-step views of ``buffer``: its own slot per step when it has one per step, else
    slots reused in turn (a ring of 1 or 2). Made once, outside the loop, because creating
    a view costs about as much as a small op, and the reference loops are dominated by that."""
    slots = buffer.unbind(0)
    if len(slots) == num_steps:
        return slots
    return (slots * (num_steps // len(slots) + 1))[:num_steps]


def prefix_rows(views, n: int):
    """The first ``n`` rows of each view (the active prefix of a packed step)."""
    return [v[:n] for v in views]
