"""Sequence plumbing shared by every cell and every implementation.

Everything here is about time steps and rows, never about a cell's gate math: the order a
direction walks the steps, which rows are active at a step (``Lengths``), the state each step
started from, the gradient of the final state folded into the output gradient, and the
gradient of a recurrent weight as ONE GEMM over all steps.

Shapes: ``T`` steps, ``B`` batch rows; ``X`` stands for whatever width a state has.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch


class Lengths(NamedTuple):
    """Per-row sequence lengths of a batch whose rows are sorted by length, in the forms the
    implementations use.

    Made once per forward call by the module (from a ``PackedSequence``'s batch sizes or from
    ``lengths=``) and handed down as is, so no layer converts one form into another.

    ``batch_sizes``: T non-increasing ints, the number of active rows at each step (rows are
    sorted by length, so the active rows of step t are the prefix ``[:batch_sizes[t]]``), or
    None where they are not known on the host (``lengths=`` on a device: reading them there
    would wait for the device; the ops that need them rebuild them, ``from_per_row``).
    ``per_row``: int64 (B,) on the data's device, non-increasing; row b is active at step t
    iff ``t < per_row[b]``.
    ``host``: the same int64 (B,) on the CPU where it is known there without a copy from a
    device (a ``PackedSequence``'s batch sizes, ``lengths=`` given as a list or CPU tensor),
    else None.
    """

    batch_sizes: Optional[tuple]
    per_row: torch.Tensor
    host: Optional[torch.Tensor] = None

    @staticmethod
    def from_batch_sizes(batch_sizes: Sequence[int], batch: int, device) -> "Lengths":
        sizes = torch.as_tensor(list(batch_sizes), dtype=torch.int64)
        per_row = (sizes.unsqueeze(1) > torch.arange(batch).unsqueeze(0)).sum(0)
        return Lengths(tuple(int(s) for s in batch_sizes), per_row.to(device), per_row)

    @staticmethod
    def from_per_row(per_row: torch.Tensor, num_steps: int) -> "Lengths":
        """The same, from the per-row tensor: how a recurrence op gets it back, since op
        arguments are tensors. Rows must be sorted by length, as packed batches are."""
        steps = torch.arange(num_steps, device=per_row.device)
        sizes = (per_row.unsqueeze(0) > steps.unsqueeze(1)).sum(1)
        return Lengths(tuple(sizes.tolist()), per_row)

    def packed_rows(self) -> torch.Tensor:
        """For each row of the packed data, its row in the padded (T * B, .) layout."""
        sizes = torch.tensor(self.batch_sizes, dtype=torch.int64)
        return packed_row_index(sizes, self.batch_sizes[0]).to(self.per_row.device)

    def pad(self, data: torch.Tensor) -> torch.Tensor:
        """Packed data (N, X) -> (T, B, X), zeros where a row is inactive."""
        T, B = len(self.batch_sizes), self.batch_sizes[0]
        padded = data.new_zeros(T * B, *data.shape[1:])
        return padded.index_copy(0, self.packed_rows(), data).view(T, B, *data.shape[1:])


def packed_row_index(batch_sizes: torch.Tensor, batch: int) -> torch.Tensor:
    """For each row of packed data, its row in the padded (T * B) layout, on the CPU.

    Packed data lists the active rows of step 0, then of step 1, ..., each a prefix of the
    length-sorted rows. Packing and unpacking are plain indexing with this (not torch's
    ``pack_padded_sequence``/``pad_packed_sequence``), so they have forward-mode AD and
    torch.func rules, work on the meta device and allow rows of length 0."""
    total = int(batch_sizes.sum())
    step = torch.repeat_interleave(torch.arange(len(batch_sizes)), batch_sizes,
                                   output_size=total)
    starts = batch_sizes.cumsum(0) - batch_sizes
    return step * batch + torch.arange(total) - starts[step]


def _index_of_sorted_lengths(host: torch.Tensor, num_steps: int, device) -> torch.Tensor:
    batch_sizes = (host.unsqueeze(0) > torch.arange(num_steps).unsqueeze(1)).sum(1)
    return packed_row_index(batch_sizes, host.numel()).to(device)


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def lengths_argument(lengths, batch: int, mode: str) -> Tuple[torch.Tensor, bool]:
    """The ``lengths=`` argument of a layer call as an int64 (B,) tensor on the device it came
    on, and whether that is the host (a list, or a CPU tensor). Checks its type and shape; the
    values are for ``check_length_values``, where they are on the host."""
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"{mode}: lengths must be an integer tensor or a list of ints, got "
                             f"a {lengths.dtype} tensor")
        if tuple(lengths.shape) != (batch,):
            raise ValueError(f"{mode}: expected lengths of shape ({batch},) (one length per "
                             f"batch row), got {tuple(lengths.shape)}")
        on_host = lengths.device.type == "cpu"
        per_row = lengths.to(torch.int64)
    elif isinstance(lengths, (list, tuple)):
        bad = [v for v in lengths if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise ValueError(f"{mode}: lengths must be an integer tensor or a list of ints, got "
                             f"a list holding {bad[0]!r} ({type(bad[0]).__name__})")
        if len(lengths) != batch:
            raise ValueError(f"{mode}: expected lengths of shape ({batch},) (one length per "
                             f"batch row), got ({len(lengths)},)")
        on_host = True
        per_row = torch.tensor(list(lengths), dtype=torch.int64)
    else:
        raise ValueError(f"{mode}: lengths must be an integer tensor or a list of ints, got "
                         f"{type(lengths).__name__}")
    return per_row, on_host


def check_length_values(host: torch.Tensor, num_steps: int, mode: str) -> None:
    """``lengths=`` on the host must lie in [0, T]."""
    if host.numel() == 0:
        return
    low, high = int(host.min()), int(host.max())
    if low < 0 or high > num_steps:
        row = int(host.argmin()) if low < 0 else int(host.argmax())
        raise ValueError(f"{mode}: lengths must lie in [0, {num_steps}] (0 to the input's "
                         f"number of steps), got {int(host[row])} at row {row}")


def keep_initial_state(final: torch.Tensor, initial: torch.Tensor,
                       per_row: torch.Tensor) -> torch.Tensor:
    """A row of length 0 takes no step: its final state IS its initial state, gradient
    included (the recurrences' backward loops only see rows that ran). (B, X) or (D, B, X)."""
    return torch.where((per_row == 0).unsqueeze(-1), initial, final)


def may_hold_empty_rows(lengths: Optional["Lengths"]) -> bool:
    """Whether some row may have length 0: known on the host (sorted, so the last is the
    shortest), else assumed (a device's values are not read)."""
    if lengths is None:
        return False
    if lengths.host is None:
        return True
    return lengths.host.numel() > 0 and int(lengths.host[-1]) == 0


def invert_permutation(permutation: torch.Tensor) -> torch.Tensor:
    """The indices that undo ``index_select(dim, permutation)`` (as torch.nn.utils.rnn does)."""
    inverse = torch.empty_like(permutation)
    return inverse.scatter_(0, permutation, torch.arange(permutation.numel(),
                                                         device=permutation.device))


def pack_rows(padded: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """The packed data (sum of lengths, X) of ``padded`` (T, B, X), whose rows are sorted by
    length with ``host`` (B,) on the CPU: what ``pack_padded_sequence`` gives, except that
    rows of length 0 (last, being sorted) are allowed and hold nothing."""
    index = _index_of_sorted_lengths(host, padded.shape[0], padded.device)
    return padded.flatten(0, 1).index_select(0, index)


def unpack_rows(data: torch.Tensor, host: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_rows``: (T, B, X) shaped like ``like``, zero past each length."""
    index = _index_of_sorted_lengths(host, like.shape[0], like.device)
    padded = like.new_zeros(like.shape[0] * like.shape[1], *like.shape[2:])
    return padded.index_copy(0, index, data).view_as(like)


def step_order(num_steps: int, reverse: bool) -> range:
    """The time steps in the order a direction processes them."""
    return range(num_steps - 1, -1, -1) if reverse else range(num_steps)


def needs_grad(*tensors) -> bool:
    """Whether a call must save for backward. Decided by the caller: inside
    ``autograd.Function.forward``, ``ctx.needs_input_grad`` is True even under ``no_grad``.
    While ``torch.jit.trace`` records, the answer becomes a constant of the trace, so it must
    not depend on the grad mode: the trace check re-traces under ``no_grad``, and a trace made
    under ``no_grad`` may later be trained."""
    return ((torch.is_grad_enabled() or torch.jit.is_tracing())
            and any(t is not None and t.requires_grad for t in tensors))


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
    """``seq[t_first(b), b]`` for every row b: the step where row b started (B, X); 0 for a
    row of length 0, which never starts."""
    if not reverse:
        return seq[0]
    if lengths is None:
        return seq[-1]
    sizes = lengths.batch_sizes
    out = torch.zeros_like(seq[0])
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
