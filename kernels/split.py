"""Split-hidden, weight-stationary persistent kernels for the LSTM and GRU recurrences.

Same launchers, arguments and results as ``lstm.py`` and ``gru.py`` (the glue can swap them);
what differs is how the work is spread over the GPU. The batch-tiled kernels give one program
16 batch rows and all hidden units, so at a small batch one SM re-reads all of weight_hh from L2
every step. Here the hidden units are split instead.

Layout (``split_plan``). P = groups x slices programs, all co-resident (P <= SM count). Program
``pid`` serves batch group ``pid // slices`` (BLOCK_B rows) and hidden slice ``pid % slices``
(BLOCK_J units j0 .. j0 + BLOCK_J - 1) with ALL of their gates: weight_hh rows q*H + j for every
gate q. So the cell state and the gate math stay inside the program. Before the time loop each
program loads the rows of weight_hh for its units once into registers, (gates * BLOCK_J, H),
and keeps them for all T steps, in the forward and in the backward.

Exchange, through global memory in fp32. Forward: a step's product h_{t-1} @ W^T needs the
whole h_{t-1} of the group's rows; each program stores its slice in a two-slot ring buffer
indexed by step parity and reads all of it. Backward: dL/dh_{t-1} = dgates @ W reduces over the
gate rows, which are spread over the programs, so each program multiplies its OWN gate
gradients by its own rows, giving a partial sum for every unit, and stores it; each program
then adds up the group's partials for its own units (a reduce-scatter: a quarter of the traffic
of exchanging all gate gradients, a wide output for the tensor cores, and the same stationary
rows as the forward).

Sync (dataflow, no counting barrier). Every program owns a monotone epoch flag, an int32 on its
own 128-byte line, counting the values it has published in this launch (flags are a fresh
zeroed tensor per launch, so nothing is ever reset). Producer: store its slice,
``tl.debug_barrier()`` (all warps' stores are issued before the flag moves), then one release
atomic add. Consumer: poll the flags of every program in its group until all reach the epoch
it needs, then ``tl.debug_barrier()`` so every warp reads after the acquires. On the GPU each
thread spins on its flag with ``ld.global.acquire.gpu`` inside inline assembly (a load, not a
read-modify-write; the spin cannot be hoisted, and no CTA barrier runs per poll); Triton's
interpreter, which runs no inline assembly, polls with acquire atomics instead (the ``POLL``
constexpr, chosen by ``_poll_form``: everything else is the same kernel). Two ring slots
suffice: a program overwrites a slot only after every program of its group has published the
following value, which each does only after reading that slot (the partial sums' slots
likewise alternate with the parity of the epoch being published). Every wait is bounded:
after ``max_spins`` polls the program records the epoch in the launch's error word, stops
waiting for the rest of the launch (so the launch ends instead of hanging the process).

Error word, read without a host sync. The launcher never waits for the GPU: after each launch
it queues a copy of the error word to pinned host memory and records an event; every later
split launch (and ``check_errors()``) first reads the words whose events have completed, and
raises RuntimeError naming the timed-out launch if one is set. So a timeout surfaces at the
first split launch or ``check_errors()`` after the bad launch finished (its results are
wrong); ``check_errors(wait=True)`` waits for all pending launches, and ``LSTMGRU_DEBUG_SYNC=1``
does that after every launch (raising at the launch itself, at the cost of a host sync). A
launch captured in a CUDA graph is not checked (nothing runs on the host at replay); debug
such a case outside the graph. In the interpreter the launch has finished when it returns,
so its word is read at once. Flags and error word are fresh device tensors per launch
(zeroed asynchronously, which a CUDA graph replays): no epoch state lives on the host.

Phases per step (each is one publish + one wait): LSTM forward and backward, GRU with
reset_after=True: one. The original GRU (reset_after=False) needs two in both directions,
because its candidate product reads r*h_{t-1} of all units (forward) and the r gradient needs
the n-gate gradients of all units (backward); each phase depends on the previous one, so no
reordering saves the second sync (exchanging r instead of r*h costs the same).

Products: fp16/bf16 operands on tensor cores (tl.dot, fp32 accumulator) when the batch tile has
at least 16 rows, else broadcast-multiply-and-sum on the CUDA cores (tl.dot cannot take fewer than
16 rows; padding 1 row to 16 would waste 16x). The forward's tensor-core product has a skinny
output (16 rows x gates * BLOCK_J) and a long reduction (H), so it is a batched tl.dot over
SPLIT_K pieces of the reduction, one per warp, summed afterwards; a plain tl.dot would make
every warp hold a copy of the weights (checked by compiling for sm_90). Either way the
exchanged fp32 operand is rounded to the weights' dtype first, so both paths compute the same
thing. State and accumulators fp32. The hidden size (the forward's reduction, the backward's
output width) is held as a power-of-two head and, where that pads less or the size is 1024 or
more, a power-of-two tail (``SplitPlan.k_tail``): H=768 is 512 + 256 columns, not 1024, and
the backward forms and stores its partial sums one piece at a time, so only one piece's
accumulator is live beside the stationary weights (no local memory in the time loop).

Lengths: row b is active at time t iff t < lengths[b]; an inactive row keeps its state and
outputs 0 in both directions, so a reversed row starts at t = lengths[b] - 1 from (h0, c0).
"""
import os
import threading
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import _launch
from ._common import dot_precision
from ._math import sigmoid, tanh

# Stand-in SM count where there is no CUDA device (the interpreter): an H100's.
_DEFAULT_SMS = 132
# int32 flags one 128-byte line apart, so no two programs' flags share a cache line.
_FLAG_STRIDE = 32
# Polls before a wait gives up. One poll is an L2 round trip (around a microsecond on an H100),
# so this is about a second of GPU time, far beyond any healthy step.
_MAX_SPINS = 1 << 20
# Per-program register budget for the stationary weight slice, and for the exchanged operand
# tile of the tensor-core path (elements of BLOCK_B x padded H). An SM has 256 KB of registers.
_WEIGHT_BYTES = 128 * 1024
_TILE_ELEMS = 16 * 1024
# Gates per hidden unit.
_GATES = {"lstm": 4, "gru": 3}


class SplitPlan(NamedTuple):
    programs: int     # P = groups * slices, all co-resident
    groups: int       # batch groups; a group's programs sync only among themselves
    slices: int       # programs per group, each owning block_j hidden units
    block_j: int      # hidden units per program (with all their gates)
    block_b: int      # batch rows per group
    block_k: int      # the hidden size padded (the reduction, held whole): head + k_tail
    split_k: int      # pieces of the forward's reduction, one per warp (tensor-core path)
    num_warps: int
    use_dot: bool     # tensor-core products (block_b >= 16) or CUDA-core multiply-and-sum
    # The hidden size is held as two power-of-two pieces, a head of block_k - k_tail columns
    # and a tail of k_tail (0: none), where that pads less or H >= 1024 (_hidden_pieces):
    # H=768 is 512 + 256, not 1024. The forward's tail is split in split_k_tail pieces.
    k_tail: int = 0
    split_k_tail: int = 1


# From this padded hidden size on, the backward's partial sums (BLOCK_B x hidden, fp32) are
# formed in two pieces even where that saves no padding: one 1024-wide piece does not fit
# in registers beside the stationary weights (fp32 at H=1024 spilled inside the time loop).
_PIECES_FROM = 1024


def _hidden_pieces(H):
    """(padded hidden size, tail): a power-of-two head (at least 16) and, where it saves
    padding or the hidden size is large (_PIECES_FROM), a power-of-two tail of at least 16
    (tl.dot's smallest K) after it."""
    whole = max(16, triton.next_power_of_2(H))
    head = whole // 2
    tail = max(16, triton.next_power_of_2(H - head)) if H > head else 0
    if tail and (head + tail < whole or whole >= _PIECES_FROM):
        return head + tail, tail
    return whole, 0


def _plan_or_reason(B, H, dtype, num_sms, gates, block_j=None):
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None, f"the split kernels support float32, float16 and bfloat16, not {dtype}"
    if H < 1:
        return None, "hidden size must be at least 1"
    if gates * H * max(H, B) >= 2**31:
        return None, f"batch {B} x hidden {H} is too large (int32 offsets within a step)"
    block_k, k_tail = _hidden_pieces(H)
    # Up to 8 rows: multiply-and-sum over the real rows. From 9 rows on, a 16-row tensor-core
    # tile wastes at most half of itself, and wider tiles keep the grid within one wave.
    use_dot = B > 8
    candidates = [16, 32, 64] if use_dot else [triton.next_power_of_2(max(B, 1))]
    # At least 8 units, so that a program's stores stay vectorised. (tl.dot needs N, K >= 16:
    # the LSTM's products have N or K = 4 * block_j; the GRU pads its n block to 16 rows.)
    min_j = 8
    reason = None
    for block_b in candidates:
        groups = triton.cdiv(max(B, 1), block_b)
        per_group = num_sms // groups
        if per_group < 1:
            reason = f"{groups} batch groups of {block_b} rows exceed {num_sms} SMs"
            continue
        # Recomputed per batch tile: fewer, wider groups leave more programs per group.
        if block_j is None:
            width = max(min_j, triton.next_power_of_2(triton.cdiv(H, per_group)))
        elif block_j < min_j:
            return None, f"block_j {block_j} is below the {min_j} units this path needs"
        else:
            width = block_j
        slices = triton.cdiv(H, width)
        if groups * slices > num_sms:
            reason = f"{groups} x {slices} programs exceed {num_sms} SMs"
            continue
        weight_bytes = gates * width * block_k * dtype.itemsize
        if weight_bytes > _WEIGHT_BYTES:
            reason = (f"a weight slice of {weight_bytes // 1024} KB per program "
                      f"(> {_WEIGHT_BYTES // 1024} KB of registers)")
            continue
        if use_dot and block_b * block_k > _TILE_ELEMS:
            reason = f"an operand tile of {block_b} x {block_k} is too large for registers"
            continue
        num_warps = 8 if weight_bytes > 32 * 1024 else 4
        split_k = min(num_warps, (block_k - k_tail) // 16)
        split_k_tail = max(1, min(num_warps, k_tail // 16))
        return SplitPlan(groups * slices, groups, slices, width, block_b, block_k, split_k,
                         num_warps, use_dot, k_tail, split_k_tail), None
    return None, f"no split layout for batch {B}, hidden {H}, {dtype}: {reason}"


def split_plan(B: int, H: int, dtype: torch.dtype, num_sms: int, cell: str = "lstm",
               block_j: Optional[int] = None) -> SplitPlan:
    """The layout the launchers use for batch B, hidden size H and ``num_sms`` SMs.

    The slice is as narrow as the SM count allows (more SMs share each step's product), but at
    least 8 units; ``block_j`` forces another width (a power of two, for tests and tuning).
    Raises ValueError with the reason when no layout fits (see ``supports``)."""
    if block_j is not None and (block_j < 1 or block_j & (block_j - 1)):
        raise ValueError(f"block_j must be a power of two, got {block_j}")
    plan, reason = _plan_or_reason(B, H, dtype, num_sms, _GATES[cell], block_j)
    if plan is None:
        raise ValueError(reason)
    return plan


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _poll_form() -> int:
    """POLL_LD_ACQUIRE where the kernels are compiled for the GPU, POLL_INTERPRETED in
    Triton's interpreter (which cannot run inline assembly)."""
    return POLL_INTERPRETED if _interpreting() else POLL_LD_ACQUIRE


def supports(B: int, H: int, dtype: torch.dtype, device, cell: str = "lstm") -> Optional[str]:
    """None if the split kernels can run this case, else the reason they cannot."""
    device = torch.device(device)
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return f"the split kernels run on CUDA devices (or in Triton's interpreter), not {device}"
    return _plan_or_reason(B, H, dtype, _num_sms(device), _GATES[cell])[1]


# --------------------------------------------------------------------------------------
# Building blocks: synchronisation, stationary weights, products
# --------------------------------------------------------------------------------------
@triton.jit
def _publish(flag_ptr, pid, FLAG_STRIDE: tl.constexpr):
    """Announce one more published value of this program (its stores precede the flag)."""
    # Every warp's stores are issued before the single release below, which then orders them
    # before the flag for the other programs.
    tl.debug_barrier()
    tl.atomic_add(flag_ptr + pid * FLAG_STRIDE, 1, sem="release", scope="gpu")


# How a wait polls (the POLL constexpr). The GPU form is one acquire load per flag and
# thread, spinning inside the inline assembly: no read-modify-write, no CTA barrier per poll.
# Triton's interpreter runs no inline assembly, so it polls with acquire atomics instead; the
# rest of every kernel is the same code in both.
POLL_INTERPRETED = tl.constexpr(0)
POLL_LD_ACQUIRE = tl.constexpr(1)

# Spin on one flag: load with acquire semantics until it reaches the target or the budget of
# polls is spent; the last value seen is the result. Labels inside { } are local to the block,
# so the assembly can be inlined once per element.
_SPIN_ASM = tl.constexpr("""{
    .reg .pred %p_done;
    .reg .u32 %n;
    mov.u32 %n, 0;
    SPIN:
    ld.global.acquire.gpu.b32 $0, [$1];
    setp.ge.s32 %p_done, $0, $2;
    @%p_done bra DONE;
    add.u32 %n, %n, 1;
    setp.lt.u32 %p_done, %n, $3;
    @%p_done bra SPIN;
    DONE:
}""")


@triton.jit
def _poll_flags(ptrs, targets, spins_left, POLL: tl.constexpr):
    """The flags at ``ptrs`` once each reaches its target, or as they were when the budget of
    ``spins_left`` polls ran out."""
    if POLL == POLL_LD_ACQUIRE:
        seen = tl.inline_asm_elementwise(_SPIN_ASM, "=r,l,r,r", [ptrs, targets, spins_left],
                                         dtype=tl.int32, is_pure=False, pack=1)
    else:
        # An acquire atomic, not a plain load: a load spin may be hoisted out of the loop.
        seen = tl.atomic_add(ptrs, 0, sem="acquire", scope="gpu")
        spins = 0
        while (tl.min(seen - targets, axis=0) < 0) & (spins < spins_left):
            seen = tl.atomic_add(ptrs, 0, sem="acquire", scope="gpu")
            spins += 1
    return seen


@triton.jit
def _wait(flag_ptr, first, count, target, spins_left, err_ptr, err_code,
          FLAG_STRIDE: tl.constexpr, COUNT_PAD: tl.constexpr, POLL: tl.constexpr):
    """Poll the flags of programs first .. first + count - 1 until all are >= target.

    Returns the poll budget for the next wait: unchanged after success, 0 after a timeout (the
    error word then holds err_code, and later waits of this launch fall straight through)."""
    idx = tl.arange(0, COUNT_PAD)
    ok = idx < count
    # Padding lanes poll the group's first flag against 0, which every flag meets at once.
    ptrs = flag_ptr + (first + tl.where(ok, idx, 0)) * FLAG_STRIDE
    targets = tl.where(ok, target, 0)
    seen = _poll_flags(ptrs, targets, spins_left, POLL)
    if tl.min(seen - targets, axis=0) < 0:
        tl.atomic_max(err_ptr, err_code)
        spins_left = 0
    # Every warp reads the exchanged data only after the acquires (made by other warps too).
    tl.debug_barrier()
    return spins_left


@triton.jit
def _weight_rows(w_ptr, q0, j0, j_end, H, k0, NQ: tl.constexpr, BLOCK_J: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """(NQ * BLOCK_J, BLOCK_K) with [q * BLOCK_J + j, k] = weight[(q0 + q) * H + j0 + j, k0 + k]:
    the rows of this program's units for NQ consecutive gates, columns k0 .. k0 + BLOCK_K - 1
    (one piece of the hidden size, see SplitPlan.k_tail), zero for units >= j_end and columns
    >= H."""
    r = tl.arange(0, NQ * BLOCK_J)
    unit = j0 + r % BLOCK_J
    ks = k0 + tl.arange(0, BLOCK_K)
    rows = (q0 + r // BLOCK_J) * H + unit
    mask = (unit < j_end)[:, None] & (ks < H)[None, :]
    return tl.load(w_ptr + rows.to(tl.int64)[:, None] * H + ks[None, :], mask=mask, other=0.0)


@triton.jit
def _weight_rows_split_k(w_ptr, q0, j0, j_end, H, k0, NQ: tl.constexpr,
                         BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The same rows as _weight_rows, transposed and cut along the reduction into SPLIT_K
    pieces: (SPLIT_K, BLOCK_K // SPLIT_K, NQ * BLOCK_J), the batched operand of _h_times_wt."""
    KC: tl.constexpr = BLOCK_K // SPLIT_K
    r = tl.arange(0, NQ * BLOCK_J)
    unit = j0 + r % BLOCK_J
    rows = (q0 + r // BLOCK_J) * H + unit
    ks = k0 + tl.arange(0, SPLIT_K)[:, None, None] * KC + tl.arange(0, KC)[None, :, None]
    mask = (unit < j_end)[None, None, :] & (ks < H)
    return tl.load(w_ptr + rows.to(tl.int64)[None, None, :] * H + ks, mask=mask, other=0.0)


@triton.jit
def _own_gate_cols(q0, j0, j_end, H, NQ: tl.constexpr, BLOCK_J: tl.constexpr):
    """Columns q*H + j0 + j (q = q0 .. q0 + NQ - 1) of a (., gates * H) row, laid out like
    _weight_rows' rows, and their mask (units < j_end): this program's gate values in a row
    of all gates."""
    r = tl.arange(0, NQ * BLOCK_J)
    unit = j0 + r % BLOCK_J
    return (q0 + r // BLOCK_J) * H + unit, unit < j_end


@triton.jit
def _h_times_wt(a_ptr, row0, B, H, k0, w, w2, HAS_W2: tl.constexpr, USE_DOT: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_B: tl.constexpr):
    """(BLOCK_B, N) fp32 = A[row0 + b, k0:k0 + K] @ W^T for the stationary piece W of N rows
    and K columns (of the hidden size), and the same with w2 when HAS_W2 (the operand is then
    read once for both products).

    A is an fp32 (B, H) exchange buffer; it is rounded to the weights' dtype first. With
    USE_DOT, w is _weight_rows_split_k's (SPLIT_K, KC, N): a batched tensor-core product whose
    batch runs over pieces of the reduction, so the warps split K instead of all holding copies
    of a skinny (N <= 64) output tile; the pieces are summed at the end. Otherwise w is
    _weight_rows' (N, BLOCK_K) and each row of A is multiplied and summed on the CUDA cores."""
    b = tl.arange(0, BLOCK_B)
    if USE_DOT:
        SPLIT_K: tl.constexpr = w.shape[0]
        KC: tl.constexpr = w.shape[1]
        ks = k0 + tl.arange(0, SPLIT_K)[:, None, None] * KC + tl.arange(0, KC)[None, None, :]
        rows = (row0 + b)[None, :, None]
        a = tl.load(a_ptr + rows * H + ks, mask=(rows < B) & (ks < H), other=0.0).to(w.dtype)
        acc = tl.sum(tl.dot(a, w, input_precision=PRECISION), axis=0)
        acc2 = acc
        if HAS_W2:
            acc2 = tl.sum(tl.dot(a, w2, input_precision=PRECISION), axis=0)
    else:
        N: tl.constexpr = w.shape[0]
        N2: tl.constexpr = w2.shape[0]
        BLOCK_K: tl.constexpr = w.shape[1]
        ks = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_B, N), tl.float32)
        acc2 = tl.zeros((BLOCK_B, N2), tl.float32)
        for i in tl.static_range(BLOCK_B):
            a = tl.load(a_ptr + (row0 + i) * H + ks, mask=tl.where(row0 + i < B, ks < H, False),
                        other=0.0)
            a = a.to(w.dtype).to(tl.float32)[None, :]
            acc = tl.where(b[:, None] == i, tl.sum(w.to(tl.float32) * a, axis=1)[None, :], acc)
            if HAS_W2:
                acc2 = tl.where(b[:, None] == i, tl.sum(w2.to(tl.float32) * a, axis=1)[None, :],
                                acc2)
    return acc, acc2


@triton.jit
def _own_times_w(d_ptr, stride, row0, B, cols, cols_ok, w, USE_DOT: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_B: tl.constexpr):
    """(BLOCK_B, BLOCK_K) fp32 = D[row0 + b, cols] @ w: this program's share of
    dL/dh_{t-1} for ALL hidden units, from its own gate gradients (K of them, at ``cols`` of
    the fp32 rows of D) and its stationary rows w (K, BLOCK_K) of weight_hh.

    The backward's reduction runs over the gate rows, which are spread over the programs, so
    each program produces a partial sum of every unit and the owners add them up
    (_sum_partials): a reduce-scatter, which moves a quarter of the data of exchanging all gate
    gradients and gives the tensor cores a wide (N = hidden size) output."""
    BLOCK_K: tl.constexpr = w.shape[1]
    b = tl.arange(0, BLOCK_B)
    if USE_DOT:
        rows = row0 + b
        d = tl.load(d_ptr + rows[:, None] * stride + cols[None, :],
                    mask=(rows < B)[:, None] & cols_ok[None, :], other=0.0)
        acc = tl.dot(d.to(w.dtype), w, input_precision=PRECISION)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
        for i in tl.static_range(BLOCK_B):
            d = tl.load(d_ptr + (row0 + i) * stride + cols,
                        mask=tl.where(row0 + i < B, cols_ok, False), other=0.0)
            d = d.to(w.dtype).to(tl.float32)[:, None]
            acc = tl.where(b[:, None] == i, tl.sum(w.to(tl.float32) * d, axis=0)[None, :], acc)
    return acc


@triton.jit
def _store_partial(part_ptr, slot, index, slices, row0, B, H, k0, acc, BLOCK_B: tl.constexpr):
    """part[slot, index, row0 + b, k0:k0 + K] = acc (K = acc's width, columns < H);
    part is fp32 (2, slices, B, H)."""
    BLOCK_K: tl.constexpr = acc.shape[1]
    rows = row0 + tl.arange(0, BLOCK_B)
    ks = k0 + tl.arange(0, BLOCK_K)
    base = (slot * slices + index).to(tl.int64) * B * H
    tl.store(part_ptr + base + rows[:, None] * H + ks[None, :], acc,
             mask=(rows < B)[:, None] & (ks < H)[None, :])


@triton.jit
def _stationary(w_ptr, q0, j0, j_end, H, NQ: tl.constexpr, BLOCK_J: tl.constexpr,
                SPLIT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT_K_TAIL: tl.constexpr, K_TAIL: tl.constexpr):
    """This program's stationary rows of NQ gates as two pieces of the hidden size: columns
    0 .. BLOCK_K - 1 and, when K_TAIL > 0, BLOCK_K .. BLOCK_K + K_TAIL - 1 (the tail is the
    head again when there is none, and then unused). SPLIT: the forward's tensor-core operand
    (_weight_rows_split_k), else _weight_rows'."""
    if SPLIT:
        w = _weight_rows_split_k(w_ptr, q0, j0, j_end, H, 0, NQ, BLOCK_J, SPLIT_K, BLOCK_K)
    else:
        w = _weight_rows(w_ptr, q0, j0, j_end, H, 0, NQ, BLOCK_J, BLOCK_K)
    w_tail = w
    if K_TAIL > 0:
        if SPLIT:
            w_tail = _weight_rows_split_k(w_ptr, q0, j0, j_end, H, BLOCK_K, NQ, BLOCK_J,
                                          SPLIT_K_TAIL, K_TAIL)
        else:
            w_tail = _weight_rows(w_ptr, q0, j0, j_end, H, BLOCK_K, NQ, BLOCK_J, K_TAIL)
    return w, w_tail


@triton.jit
def _h_times_stationary(a_ptr, row0, B, H, w, w_tail, w2, w2_tail, HAS_W2: tl.constexpr,
                        USE_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_K: tl.constexpr, K_TAIL: tl.constexpr):
    """_h_times_wt over both pieces of the hidden size (see _stationary), summed."""
    acc, acc2 = _h_times_wt(a_ptr, row0, B, H, 0, w, w2, HAS_W2, USE_DOT, PRECISION, BLOCK_B)
    if K_TAIL > 0:
        tail, tail2 = _h_times_wt(a_ptr, row0, B, H, BLOCK_K, w_tail, w2_tail, HAS_W2, USE_DOT,
                                  PRECISION, BLOCK_B)
        acc += tail
        acc2 += tail2
    return acc, acc2


@triton.jit
def _publish_partials(part_ptr, slot, index, slices, row0, B, H, d_ptr, stride, cols, cols_ok,
                      w, w_tail, cols2, cols2_ok, w2, w2_tail, HAS_W2: tl.constexpr,
                      USE_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_K: tl.constexpr, K_TAIL: tl.constexpr):
    """Store this program's partial dL/dh of every unit (_own_times_w of its gate gradients at
    ``cols``, plus those at ``cols2`` when HAS_W2) into slot ``slot``, one piece of the hidden
    size at a time: each piece's product is stored before the next is formed, so only one
    piece's (BLOCK_B, piece) accumulator is live."""
    part = _own_times_w(d_ptr, stride, row0, B, cols, cols_ok, w, USE_DOT, PRECISION, BLOCK_B)
    if HAS_W2:
        part += _own_times_w(d_ptr, stride, row0, B, cols2, cols2_ok, w2, USE_DOT, PRECISION,
                             BLOCK_B)
    _store_partial(part_ptr, slot, index, slices, row0, B, H, 0, part, BLOCK_B)
    if K_TAIL > 0:
        part = _own_times_w(d_ptr, stride, row0, B, cols, cols_ok, w_tail, USE_DOT, PRECISION,
                            BLOCK_B)
        if HAS_W2:
            part += _own_times_w(d_ptr, stride, row0, B, cols2, cols2_ok, w2_tail, USE_DOT,
                                 PRECISION, BLOCK_B)
        _store_partial(part_ptr, slot, index, slices, row0, B, H, BLOCK_K, part, BLOCK_B)


@triton.jit
def _sum_partials(part_ptr, slot, slices, row0, B, H, units, BLOCK_B: tl.constexpr,
                  CHUNK: tl.constexpr):
    """sum over all slices of part[slot, slice, row0 + b, units]: (BLOCK_B, BLOCK_J) fp32,
    CHUNK slices at a time (a bounded register tile), in a fixed order (bit-identical from run
    to run)."""
    BLOCK_J: tl.constexpr = units.shape[0]
    rows = (row0 + tl.arange(0, BLOCK_B))[None, :, None]
    row_ok = (rows < B) & (units < H)[None, None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_J), tl.float32)
    for c in range(0, slices, CHUNK):
        sl = c + tl.arange(0, CHUNK)[:, None, None]
        offs = ((slot * slices + sl).to(tl.int64) * B + rows) * H + units[None, None, :]
        acc += tl.sum(tl.load(part_ptr + offs, mask=(sl < slices) & row_ok, other=0.0), axis=0)
    return acc


@triton.jit
def _split2(x, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr):
    """(BLOCK_B, 2 * BLOCK_J) with gate-major columns -> two (BLOCK_B, BLOCK_J) gates."""
    x = tl.permute(tl.reshape(x, (BLOCK_B, 2, BLOCK_J)), (0, 2, 1))
    return tl.split(x)


@triton.jit
def _split4(x, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr):
    """(BLOCK_B, 4 * BLOCK_J) with gate-major columns -> four (BLOCK_B, BLOCK_J) gates."""
    # Gate q = 2 * hi + lo; tl.split takes the last (size-2) axis, so move hi and lo there.
    x = tl.permute(tl.reshape(x, (BLOCK_B, 2, 2, BLOCK_J)), (0, 3, 1, 2))
    lo0, lo1 = tl.split(x)
    g0, g2 = tl.split(lo0)
    g1, g3 = tl.split(lo1)
    return g0, g1, g2, g3


@triton.jit
def _load_or_zeros(ptr, offs, mask, HAS: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_J: tl.constexpr):
    if HAS:
        v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.zeros((BLOCK_B, BLOCK_J), tl.float32)
    return v


# --------------------------------------------------------------------------------------
# LSTM
# --------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "max_spins"])
def _lstm_fwd_kernel(
    gx_ptr, h0_ptr, c0_ptr, w_ptr, len_ptr,          # inputs
    y_ptr, hn_ptr, cn_ptr, act_ptr, c_seq_ptr,        # outputs (act, c_seq only when TRAINING)
    ring_ptr, flag_ptr, err_ptr,                     # exchange and sync
    T, B, H, max_spins,
    HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    REVERSE: tl.constexpr, TRAINING: tl.constexpr, USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr, SLICES: tl.constexpr, SLICES_PAD: tl.constexpr,
    FLAG_STRIDE: tl.constexpr, POLL: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K_TAIL: tl.constexpr, K_TAIL: tl.constexpr,
):
    pid = tl.program_id(0)
    first = (pid // SLICES) * SLICES           # the first program of this batch group
    row0 = (pid // SLICES) * BLOCK_B
    j0 = (pid % SLICES) * BLOCK_J
    rows = row0 + tl.arange(0, BLOCK_B)
    units = j0 + tl.arange(0, BLOCK_J)
    mask = (rows < B)[:, None] & (units < H)[None, :]
    st = rows[:, None] * H + units[None, :]            # own slice of a (B, H) tensor
    g_off = rows[:, None] * (4 * H) + units[None, :]   # own slice of gate i in a (B, 4H) row
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=rows < B, other=0)

    # Loaded once, used in every step: gates i, f, g, o of this program's units.
    w, w_tail = _stationary(w_ptr, 0, j0, H, H, 4, BLOCK_J, USE_DOT, SPLIT_K, BLOCK_K,
                            SPLIT_K_TAIL, K_TAIL)
    # The own slice of the state never leaves the program: h for the kept state of inactive
    # rows, c entirely.
    h = _load_or_zeros(h0_ptr, st, mask, HAS_H0, BLOCK_B, BLOCK_J)
    c = _load_or_zeros(c0_ptr, st, mask, HAS_C0, BLOCK_B, BLOCK_J)
    tl.store(ring_ptr + st, h, mask=mask)
    _publish(flag_ptr, pid, FLAG_STRIDE)
    spins = max_spins

    for s in range(0, T):
        t = T - 1 - s if REVERSE else s
        t64 = t.to(tl.int64)
        # h_{t-1} of all units of the group is published once every flag reaches s + 1.
        spins = _wait(flag_ptr, first, SLICES, s + 1, spins, err_ptr, s + 1, FLAG_STRIDE,
                      SLICES_PAD, POLL)
        acc, _ = _h_times_stationary(ring_ptr + (s % 2) * B * H, row0, B, H, w, w_tail, w,
                                     w_tail, False, USE_DOT, PRECISION, BLOCK_B, BLOCK_K,
                                     K_TAIL)
        p_i, p_f, p_g, p_o = _split4(acc, BLOCK_B, BLOCK_J)
        gx_t = gx_ptr + t64 * (4 * B * H) + g_off
        i = sigmoid(p_i + tl.load(gx_t, mask=mask, other=0.0).to(tl.float32))
        f = sigmoid(p_f + tl.load(gx_t + H, mask=mask, other=0.0).to(tl.float32))
        g = tanh(p_g + tl.load(gx_t + 2 * H, mask=mask, other=0.0).to(tl.float32))
        o = sigmoid(p_o + tl.load(gx_t + 3 * H, mask=mask, other=0.0).to(tl.float32))
        c_new = f * c + i * g
        h_new = o * tanh(c_new)
        out = h_new
        if HAS_LENGTHS:
            active = (t < lens)[:, None]
            c_new = tl.where(active, c_new, c)
            h_new = tl.where(active, h_new, h)
            out = tl.where(active, out, 0.0)
            i = tl.where(active, i, 0.0)
            f = tl.where(active, f, 0.0)
            g = tl.where(active, g, 0.0)
            o = tl.where(active, o, 0.0)
        c = c_new
        h = h_new
        tl.store(ring_ptr + ((s + 1) % 2) * B * H + st, h, mask=mask)
        _publish(flag_ptr, pid, FLAG_STRIDE)
        tl.store(y_ptr + t64 * (B * H) + st, out.to(y_ptr.dtype.element_ty), mask=mask)
        if TRAINING:
            act_t = act_ptr + t64 * (4 * B * H) + g_off
            tl.store(act_t, i, mask=mask)
            tl.store(act_t + H, f, mask=mask)
            tl.store(act_t + 2 * H, g, mask=mask)
            tl.store(act_t + 3 * H, o, mask=mask)
            # The kept state at inactive positions too: a reversed row's first active step
            # reads its c_prev from the following (inactive) time step.
            tl.store(c_seq_ptr + t64 * (B * H) + st, c, mask=mask)

    tl.store(hn_ptr + st, h.to(hn_ptr.dtype.element_ty), mask=mask)
    tl.store(cn_ptr + st, c.to(cn_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "max_spins"])
def _lstm_bwd_kernel(
    gy_ptr, ghn_ptr, gcn_ptr, act_ptr, c_seq_ptr, c0_ptr, w_ptr, len_ptr,   # inputs
    dgx_ptr, dh0_ptr, dc0_ptr,                                            # fp32 outputs
    part_ptr, flag_ptr, err_ptr,                                          # exchange and sync
    T, B, H, max_spins,
    HAS_GY: tl.constexpr, HAS_GHN: tl.constexpr, HAS_GCN: tl.constexpr, HAS_C0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr, SLICES: tl.constexpr, SLICES_PAD: tl.constexpr,
    PART_CHUNK: tl.constexpr,
    FLAG_STRIDE: tl.constexpr, POLL: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K_TAIL: tl.constexpr, K_TAIL: tl.constexpr,
):
    pid = tl.program_id(0)
    first = (pid // SLICES) * SLICES
    row0 = (pid // SLICES) * BLOCK_B
    j0 = (pid % SLICES) * BLOCK_J
    rows = row0 + tl.arange(0, BLOCK_B)
    units = j0 + tl.arange(0, BLOCK_J)
    mask = (rows < B)[:, None] & (units < H)[None, :]
    st = rows[:, None] * H + units[None, :]
    g_off = rows[:, None] * (4 * H) + units[None, :]
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=rows < B, other=0)
    own_cols, own_ok = _own_gate_cols(0, j0, H, H, 4, BLOCK_J)

    # The forward's rows of weight_hh for this program's units, loaded once: with them it
    # turns its own gate gradients into a partial dL/dh_{t-1} of every unit.
    w, w_tail = _stationary(w_ptr, 0, j0, H, H, 4, BLOCK_J, False, 1, BLOCK_K, 1, K_TAIL)
    # dL/dh and dL/dc of the own units flowing backwards; after the last step they are the
    # gradients of h0 and c0.
    dh = _load_or_zeros(ghn_ptr, st, mask, HAS_GHN, BLOCK_B, BLOCK_J)
    dc = _load_or_zeros(gcn_ptr, st, mask, HAS_GCN, BLOCK_B, BLOCK_J)
    spins = max_spins

    for s in range(0, T):
        # Undo the forward's steps last to first; its first step (s == T - 1 here) started
        # from c0 rather than from a saved c.
        t = s if REVERSE else T - 1 - s
        t_prev = t + 1 if REVERSE else t - 1
        t64 = t.to(tl.int64)
        act_t = act_ptr + t64 * (4 * B * H) + g_off
        i = tl.load(act_t, mask=mask, other=0.0)
        f = tl.load(act_t + H, mask=mask, other=0.0)
        g = tl.load(act_t + 2 * H, mask=mask, other=0.0)
        o = tl.load(act_t + 3 * H, mask=mask, other=0.0)
        c = tl.load(c_seq_ptr + t64 * (B * H) + st, mask=mask, other=0.0)
        # tl.where, not `mask & (s < T - 1)`: triton 3.9's interpreter turns a bool tensor &
        # a bool scalar into integers, which tl.load rejects as a mask.
        c_prev = tl.load(c_seq_ptr + t_prev.to(tl.int64) * (B * H) + st,
                         mask=tl.where(s < T - 1, mask, False), other=0.0)
        if HAS_C0:
            c_prev += tl.load(c0_ptr + st, mask=tl.where(s == T - 1, mask, False),
                              other=0.0).to(tl.float32)
        dh_t = dh
        if HAS_GY:
            # Added for inactive rows too: their gate gradients are zeroed below and the
            # carried dh is kept as it was.
            dh_t += tl.load(gy_ptr + t64 * (B * H) + st, mask=mask, other=0.0).to(tl.float32)
        tc = tanh(c)
        dc_t = dc + dh_t * o * (1.0 - tc * tc)
        da_i = dc_t * g * i * (1.0 - i)
        da_f = dc_t * c_prev * f * (1.0 - f)
        da_g = dc_t * i * (1.0 - g * g)
        da_o = dh_t * tc * o * (1.0 - o)
        dc_t = dc_t * f
        if HAS_LENGTHS:
            active = (t < lens)[:, None]
            da_i = tl.where(active, da_i, 0.0)
            da_f = tl.where(active, da_f, 0.0)
            da_g = tl.where(active, da_g, 0.0)
            da_o = tl.where(active, da_o, 0.0)
            dc_t = tl.where(active, dc_t, dc)
        dc = dc_t
        dgx_t = dgx_ptr + t64 * (4 * B * H)
        tl.store(dgx_t + g_off, da_i, mask=mask)
        tl.store(dgx_t + g_off + H, da_f, mask=mask)
        tl.store(dgx_t + g_off + 2 * H, da_g, mask=mask)
        tl.store(dgx_t + g_off + 3 * H, da_o, mask=mask)
        # Read back as one gate-major operand row by the other warps of this program.
        tl.debug_barrier()
        _publish_partials(part_ptr, s % 2, pid % SLICES, SLICES, row0, B, H, dgx_t, 4 * H,
                          own_cols, own_ok, w, w_tail, own_cols, own_ok, w, w_tail, False,
                          USE_DOT, PRECISION, BLOCK_B, BLOCK_K, K_TAIL)
        _publish(flag_ptr, pid, FLAG_STRIDE)
        spins = _wait(flag_ptr, first, SLICES, s + 1, spins, err_ptr, s + 1, FLAG_STRIDE,
                      SLICES_PAD, POLL)
        acc = _sum_partials(part_ptr, s % 2, SLICES, row0, B, H, units, BLOCK_B, PART_CHUNK)
        if HAS_LENGTHS:
            # An inactive step passed h through unchanged, and so does its gradient.
            acc = tl.where(active, acc, dh)
        dh = acc

    tl.store(dh0_ptr + st, dh, mask=mask)
    tl.store(dc0_ptr + st, dc, mask=mask)


# --------------------------------------------------------------------------------------
# GRU (gates r, z, n)
# --------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "max_spins"])
def _gru_fwd_kernel(
    gx_ptr, h0_ptr, w_ptr, bhn_ptr, len_ptr,          # inputs
    y_ptr, hn_ptr, gates_ptr, ghn_ptr,                # outputs (gates, ghn only when TRAINING)
    ring_ptr, rh_ptr, flag_ptr, err_ptr,              # exchange and sync
    T, B, H, max_spins,
    HAS_H0: tl.constexpr, HAS_BHN: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    REVERSE: tl.constexpr, RESET_AFTER: tl.constexpr, TRAINING: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr, SLICES: tl.constexpr,
    SLICES_PAD: tl.constexpr, FLAG_STRIDE: tl.constexpr, POLL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K_TAIL: tl.constexpr, K_TAIL: tl.constexpr,
):
    pid = tl.program_id(0)
    first = (pid // SLICES) * SLICES
    row0 = (pid // SLICES) * BLOCK_B
    j0 = (pid % SLICES) * BLOCK_J
    rows = row0 + tl.arange(0, BLOCK_B)
    units = j0 + tl.arange(0, BLOCK_J)
    mask = (rows < B)[:, None] & (units < H)[None, :]
    st = rows[:, None] * H + units[None, :]
    g_off = rows[:, None] * (3 * H) + units[None, :]
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=rows < B, other=0)

    # Loaded once: the r and z rows of this program's units together (one product), n apart
    # (reset_after=False multiplies it with r * h instead of h). The n block has BLOCK_N rows:
    # BLOCK_J, or 2 * BLOCK_J with zero rows where tl.dot needs 16 and BLOCK_J is 8.
    n_end = tl.minimum(j0 + BLOCK_J, H)
    w_rz, w_rz_tail = _stationary(w_ptr, 0, j0, H, H, 2, BLOCK_J, USE_DOT, SPLIT_K, BLOCK_K,
                                  SPLIT_K_TAIL, K_TAIL)
    w_n, w_n_tail = _stationary(w_ptr, 2, j0, n_end, H, 1, BLOCK_N, USE_DOT, SPLIT_K, BLOCK_K,
                                SPLIT_K_TAIL, K_TAIL)
    if HAS_BHN:
        b_n = tl.load(bhn_ptr + units, mask=units < H, other=0.0).to(tl.float32)[None, :]
    h = _load_or_zeros(h0_ptr, st, mask, HAS_H0, BLOCK_B, BLOCK_J)
    tl.store(ring_ptr + st, h, mask=mask)
    _publish(flag_ptr, pid, FLAG_STRIDE)
    spins = max_spins

    for s in range(0, T):
        t = T - 1 - s if REVERSE else s
        t64 = t.to(tl.int64)
        # Epochs: reset_after publishes h once per step; the original GRU publishes r * h_{t-1}
        # and then h_t, so its step s starts at epoch 2s + 1.
        if RESET_AFTER:
            epoch = s + 1
        else:
            epoch = 2 * s + 1
        spins = _wait(flag_ptr, first, SLICES, epoch, spins, err_ptr, epoch, FLAG_STRIDE,
                      SLICES_PAD, POLL)
        h_all = ring_ptr + (s % 2) * B * H
        acc_rz, gh_n = _h_times_stationary(h_all, row0, B, H, w_rz, w_rz_tail, w_n, w_n_tail,
                                           RESET_AFTER, USE_DOT, PRECISION, BLOCK_B, BLOCK_K,
                                           K_TAIL)
        p_r, p_z = _split2(acc_rz, BLOCK_B, BLOCK_J)
        if BLOCK_N != BLOCK_J:
            gh_n, _ = _split2(gh_n, BLOCK_B, BLOCK_J)
        gx_t = gx_ptr + t64 * (3 * B * H) + g_off
        r = sigmoid(p_r + tl.load(gx_t, mask=mask, other=0.0).to(tl.float32))
        z = sigmoid(p_z + tl.load(gx_t + H, mask=mask, other=0.0).to(tl.float32))
        x_n = tl.load(gx_t + 2 * H, mask=mask, other=0.0).to(tl.float32)
        if RESET_AFTER:
            if HAS_BHN:
                gh_n += b_n
            n = tanh(x_n + r * gh_n)
        else:
            # The candidate's product reduces over r * h_{t-1} of every unit: a second exchange.
            # One buffer suffices: it is rewritten only after every program published h_t.
            tl.store(rh_ptr + st, r * h, mask=mask)
            _publish(flag_ptr, pid, FLAG_STRIDE)
            spins = _wait(flag_ptr, first, SLICES, epoch + 1, spins, err_ptr, epoch + 1,
                          FLAG_STRIDE, SLICES_PAD, POLL)
            gh_n, _ = _h_times_stationary(rh_ptr, row0, B, H, w_n, w_n_tail, w_n, w_n_tail,
                                          False, USE_DOT, PRECISION, BLOCK_B, BLOCK_K, K_TAIL)
            if BLOCK_N != BLOCK_J:
                gh_n, _ = _split2(gh_n, BLOCK_B, BLOCK_J)
            n = tanh(x_n + gh_n)
        h_new = (1.0 - z) * n + z * h
        out = h_new
        if HAS_LENGTHS:
            active = (t < lens)[:, None]
            h_new = tl.where(active, h_new, h)
            out = tl.where(active, out, 0.0)
            # Zeros at inactive positions: the caller multiplies saved r into a GEMM, where
            # uninitialised memory (possibly NaN) would poison 0 * NaN.
            r = tl.where(active, r, 0.0)
            z = tl.where(active, z, 0.0)
            n = tl.where(active, n, 0.0)
            if RESET_AFTER:
                gh_n = tl.where(active, gh_n, 0.0)
        h = h_new
        tl.store(ring_ptr + ((s + 1) % 2) * B * H + st, h, mask=mask)
        _publish(flag_ptr, pid, FLAG_STRIDE)
        tl.store(y_ptr + t64 * (B * H) + st, out.to(y_ptr.dtype.element_ty), mask=mask)
        if TRAINING:
            gates_t = gates_ptr + t64 * (3 * B * H) + g_off
            tl.store(gates_t, r, mask=mask)
            tl.store(gates_t + H, z, mask=mask)
            tl.store(gates_t + 2 * H, n, mask=mask)
            if RESET_AFTER:
                tl.store(ghn_ptr + t64 * (B * H) + st, gh_n, mask=mask)

    tl.store(hn_ptr + st, h.to(hn_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "max_spins"])
def _gru_bwd_kernel(
    gy_ptr, ghn_out_ptr, gates_ptr, ghn_ptr, y_ptr, h0_ptr, w_ptr, len_ptr,   # inputs
    ggx_ptr, ggh_ptr, gh0_ptr,                                               # fp32 outputs
    part_ptr, flag_ptr, err_ptr,                                             # exchange, sync
    T, B, H, max_spins,
    HAS_GY: tl.constexpr, HAS_GHN_OUT: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, RESET_AFTER: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr, SLICES: tl.constexpr,
    SLICES_PAD: tl.constexpr, PART_CHUNK: tl.constexpr, FLAG_STRIDE: tl.constexpr,
    POLL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K_TAIL: tl.constexpr, K_TAIL: tl.constexpr,
):
    pid = tl.program_id(0)
    first = (pid // SLICES) * SLICES
    row0 = (pid // SLICES) * BLOCK_B
    j0 = (pid % SLICES) * BLOCK_J
    rows = row0 + tl.arange(0, BLOCK_B)
    units = j0 + tl.arange(0, BLOCK_J)
    mask = (rows < B)[:, None] & (units < H)[None, :]
    st = rows[:, None] * H + units[None, :]
    g_off = rows[:, None] * (3 * H) + units[None, :]
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=rows < B, other=0)
    else:
        lens = tl.full((BLOCK_B,), T, tl.int32)
    # The forward's rows of this program's units, loaded once (see _own_times_w); the n block
    # padded to BLOCK_N rows as in the forward (here it is the K of the tensor-core product).
    n_end = tl.minimum(j0 + BLOCK_J, H)
    rz_cols, rz_ok = _own_gate_cols(0, j0, H, H, 2, BLOCK_J)
    n_cols, n_ok = _own_gate_cols(2, j0, n_end, H, 1, BLOCK_N)
    w_rz, w_rz_tail = _stationary(w_ptr, 0, j0, H, H, 2, BLOCK_J, False, 1, BLOCK_K, 1,
                                  K_TAIL)
    w_n, w_n_tail = _stationary(w_ptr, 2, j0, n_end, H, 1, BLOCK_N, False, 1, BLOCK_K, 1,
                                K_TAIL)
    # dL/dh_t of the own units from later steps; inactive steps pass it through unchanged,
    # which is how h_n reaches each row's last active step.
    dh = _load_or_zeros(ghn_out_ptr, st, mask, HAS_GHN_OUT, BLOCK_B, BLOCK_J)
    spins = max_spins

    for s in range(0, T):
        t = s if REVERSE else T - 1 - s
        t64 = t.to(tl.int64)
        active = (t < lens)[:, None]
        am = mask & active
        dh_t = dh
        if HAS_GY:
            # y is 0 (a constant) at inactive positions, so their grad_y is ignored.
            dh_t += tl.load(gy_ptr + t64 * (B * H) + st, mask=am, other=0.0).to(tl.float32)
        gates_t = gates_ptr + t64 * (3 * B * H) + g_off
        r = tl.load(gates_t, mask=am, other=0.0)
        z = tl.load(gates_t + H, mask=am, other=0.0)
        n = tl.load(gates_t + 2 * H, mask=am, other=0.0)
        # h_{t-1} in processing order, rebuilt from the outputs: the forward wrote the state of
        # every active step to y, so only a row's first step reads h0.
        if REVERSE:
            from_y = am & (t + 1 < lens)[:, None]
            t_prev = t + 1
        else:
            from_y = tl.where(t > 0, am, False)
            t_prev = t - 1
        h_prev = tl.load(y_ptr + t_prev.to(tl.int64) * (B * H) + st, mask=from_y,
                         other=0.0).to(tl.float32)
        if HAS_H0:
            h_prev += tl.load(h0_ptr + st, mask=am & (from_y == 0), other=0.0).to(tl.float32)
        da_n = tl.where(am, dh_t * (1.0 - z) * (1.0 - n * n), 0.0)
        da_z = tl.where(am, dh_t * (h_prev - n) * z * (1.0 - z), 0.0)
        ggx_t = ggx_ptr + t64 * (3 * B * H)
        ggh_t = ggh_ptr + t64 * (3 * B * H)
        # Each exchange: store the own gate gradients, turn them into partial sums for all
        # units (read back from grad_gates_h by the other warps: hence the CTA barrier), publish,
        # wait, add up the partials of the own units. The slot is the parity of the epoch.
        if RESET_AFTER:
            gh_n = tl.load(ghn_ptr + t64 * (B * H) + st, mask=am, other=0.0)
            da_r = tl.where(am, da_n * gh_n * r * (1.0 - r), 0.0)
            tl.store(ggx_t + g_off, da_r, mask=mask)
            tl.store(ggx_t + g_off + H, da_z, mask=mask)
            tl.store(ggx_t + g_off + 2 * H, da_n, mask=mask)
            tl.store(ggh_t + g_off, da_r, mask=mask)
            tl.store(ggh_t + g_off + H, da_z, mask=mask)
            tl.store(ggh_t + g_off + 2 * H, da_n * r, mask=mask)
            tl.debug_barrier()
            _publish_partials(part_ptr, s % 2, pid % SLICES, SLICES, row0, B, H, ggh_t, 3 * H,
                              rz_cols, rz_ok, w_rz, w_rz_tail, n_cols, n_ok, w_n, w_n_tail, True,
                              USE_DOT, PRECISION, BLOCK_B, BLOCK_K, K_TAIL)
            _publish(flag_ptr, pid, FLAG_STRIDE)
            spins = _wait(flag_ptr, first, SLICES, s + 1, spins, err_ptr, s + 1, FLAG_STRIDE,
                          SLICES_PAD, POLL)
            acc = _sum_partials(part_ptr, s % 2, SLICES, row0, B, H, units, BLOCK_B,
                                PART_CHUNK)
            dh = tl.where(active, dh_t * z + acc, dh)
        else:
            # Phase 1: the n-gate gradients of all units give d(r * h) = da_n @ W_hn, which the
            # r gradient needs. Phase 2: the r and z gradients of all units give the rest of dh.
            tl.store(ggx_t + g_off + 2 * H, da_n, mask=mask)
            tl.store(ggh_t + g_off + 2 * H, da_n, mask=mask)
            tl.debug_barrier()
            _publish_partials(part_ptr, 0, pid % SLICES, SLICES, row0, B, H, ggh_t, 3 * H,
                              n_cols, n_ok, w_n, w_n_tail, n_cols, n_ok, w_n, w_n_tail, False,
                              USE_DOT, PRECISION, BLOCK_B, BLOCK_K, K_TAIL)
            _publish(flag_ptr, pid, FLAG_STRIDE)
            spins = _wait(flag_ptr, first, SLICES, 2 * s + 1, spins, err_ptr, 2 * s + 1,
                          FLAG_STRIDE, SLICES_PAD, POLL)
            d_rh = _sum_partials(part_ptr, 0, SLICES, row0, B, H, units, BLOCK_B, PART_CHUNK)
            da_r = tl.where(am, d_rh * h_prev * r * (1.0 - r), 0.0)
            tl.store(ggx_t + g_off, da_r, mask=mask)
            tl.store(ggx_t + g_off + H, da_z, mask=mask)
            tl.store(ggh_t + g_off, da_r, mask=mask)
            tl.store(ggh_t + g_off + H, da_z, mask=mask)
            tl.debug_barrier()
            _publish_partials(part_ptr, 1, pid % SLICES, SLICES, row0, B, H, ggh_t, 3 * H,
                              rz_cols, rz_ok, w_rz, w_rz_tail, rz_cols, rz_ok, w_rz, w_rz_tail,
                              False, USE_DOT, PRECISION, BLOCK_B, BLOCK_K, K_TAIL)
            _publish(flag_ptr, pid, FLAG_STRIDE)
            spins = _wait(flag_ptr, first, SLICES, 2 * s + 2, spins, err_ptr, 2 * s + 2,
                          FLAG_STRIDE, SLICES_PAD, POLL)
            acc = _sum_partials(part_ptr, 1, SLICES, row0, B, H, units, BLOCK_B, PART_CHUNK)
            dh = tl.where(active, dh_t * z + d_rh * r + acc, dh)

    tl.store(gh0_ptr + st, dh, mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def _check(name, tensor, shape, dtype, device):
    if tensor.shape != shape or tensor.dtype != dtype or tensor.device != device:
        raise ValueError(
            f"{name}: expected {tuple(shape)} {dtype} on {device}, "
            f"got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_lengths(lengths, B, device):
    if lengths is not None:
        if lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"lengths must be int32 or int64, got {lengths.dtype}")
        _check("lengths", lengths, (B,), lengths.dtype, device)


def _dense(grad, name, shape, device):
    # Autograd may hand over strided or expanded gradients (e.g. from y.sum()); the kernels
    # index them as dense tensors.
    if grad is None:
        return None
    grad = grad.contiguous()
    _check(name, grad, shape, grad.dtype, device)
    return grad


def _resolve_plan(B, H, dtype, device, cell, plan):
    if plan is not None:
        covers = (plan.programs == plan.groups * plan.slices and plan.block_k >= H
                  and (plan.block_k - plan.k_tail) % plan.split_k == 0
                  and plan.k_tail % plan.split_k_tail == 0
                  and plan.groups * plan.block_b >= B and plan.slices * plan.block_j >= H)
        if not covers:
            raise ValueError(f"{plan} does not cover batch {B} x hidden {H}")
        return plan
    reason = supports(B, H, dtype, device, cell)
    if reason is not None:
        raise ValueError(f"split {cell.upper()} kernels: {reason}")
    return split_plan(B, H, dtype, _num_sms(device), cell)


def _partials(plan, B, H, device):
    """The backward's exchange: each program's partial dL/dh of every unit, two slots."""
    return torch.empty((2, plan.slices, B, H), device=device, dtype=torch.float32)


def _part_chunk(plan):
    # Partial sums added 16 slices at a time: a (16, block_b, block_j) tile per load.
    return min(16, triton.next_power_of_2(plan.slices))


def _run(kernel, plan, what, device, tensors, scalars, **meta):
    """One launch of P co-resident programs with fresh flags and a fresh error word.

    The kernel's arguments are ``*tensors, flags, error word, *scalars, max_spins``. Nothing
    here waits for the GPU (see "Error word" in the module docstring): earlier launches'
    finished error words are checked first, this one's is read back once it has finished."""
    check_errors()
    flags = torch.zeros((plan.programs, _FLAG_STRIDE), device=device, dtype=torch.int32)
    err = torch.zeros((1,), device=device, dtype=torch.int32)
    if device.type == "cuda":
        # The driver refuses a grid that cannot be co-resident instead of deadlocking in it.
        meta["launch_cooperative_grid"] = True
    _launch.launch(
        kernel, (plan.programs,), *tensors, flags, err, *scalars, _MAX_SPINS,
        SLICES=plan.slices, SLICES_PAD=triton.next_power_of_2(plan.slices),
        FLAG_STRIDE=_FLAG_STRIDE, USE_DOT=plan.use_dot, BLOCK_B=plan.block_b,
        BLOCK_J=plan.block_j, SPLIT_K=plan.split_k, BLOCK_K=plan.block_k - plan.k_tail,
        SPLIT_K_TAIL=plan.split_k_tail, K_TAIL=plan.k_tail,
        num_warps=plan.num_warps, num_stages=1, POLL=_poll_form(),
        **meta,
    )
    _watch(err, what, plan)


# --------------------------------------------------------------------------------------
# Error words, read back without a host sync
# --------------------------------------------------------------------------------------
class _PendingError(NamedTuple):
    done: object          # torch.cuda.Event recorded after the launch (None: already done)
    word: torch.Tensor    # host memory holding the launch's error word once ``done``
    what: str
    plan: SplitPlan


# Launches whose error word has not been read yet, oldest first, and the lock that guards
# the list (launches may come from several threads).
_pending = []
_pending_lock = threading.Lock()


def _debug_sync() -> bool:
    return os.environ.get("LSTMGRU_DEBUG_SYNC") == "1"


def _watch(err, what, plan):
    """Arrange for a launch's error word to be read once the launch has finished."""
    if err.device.type != "cuda":
        # The interpreter returns after the launch has run, and err is host memory.
        entry = _PendingError(None, err, what, plan)
    elif torch.cuda.is_current_stream_capturing():
        # A captured launch runs at each replay, where nothing on the host follows it: its
        # error word is not read back (see the module docstring).
        return
    else:
        word = torch.empty((1,), dtype=torch.int32, pin_memory=True)
        word.copy_(err, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(err.device))
        entry = _PendingError(done, word, what, plan)
    with _pending_lock:
        _pending.append(entry)
    check_errors(wait=_debug_sync())


def check_errors(wait: bool = False) -> None:
    """Raise RuntimeError if a finished split launch of this process timed out in a wait.

    Each launch's error word is copied to host memory behind the launch and read here once
    the copy is done: at the start of every split launch, and whenever this is called.
    ``wait=True`` first waits for every pending launch (a host sync: for tests, the end of a
    training step, or ``LSTMGRU_DEBUG_SYNC=1``, which does it after every launch)."""
    if not _pending:
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        # Querying or waiting for an event is not allowed while a stream is being captured;
        # the words stay pending until the first check after the capture.
        return
    with _pending_lock:
        if wait:
            for entry in _pending:
                if entry.done is not None:
                    entry.done.synchronize()
        finished = [e for e in _pending if e.done is None or e.done.query()]
        for entry in finished:
            _pending.remove(entry)
    for entry in finished:
        # Host memory, written before ``done``: no device access, no wait.
        epoch = int(entry.word.numpy()[0])
        if epoch:
            raise RuntimeError(_timeout_message(entry.what, entry.plan, epoch))


def _timeout_message(what, plan, epoch):
    # The error word holds the highest epoch a wait gave up on: the n-th value each program
    # publishes (one per step; two for the original GRU; 1 is h0 or the first).
    return (f"split {what}: a program waited more than {_MAX_SPINS} polls for the other "
            f"programs of its batch group (epoch {epoch}; P={plan.programs} programs, grid "
            f"({plan.programs},), {plan.groups} group(s) of {plan.slices}); the programs were "
            f"probably not all resident at once. Its results are wrong; the launch's error "
            f"word was read after it finished, so later launches may have run meanwhile")


def lstm_forward(gates_x, h0, c0, weight_hh, lengths, reverse: bool, training: bool, *,
                 plan: Optional[SplitPlan] = None):
    """Run the LSTM recurrence over all T steps in one launch; contract of lstm.lstm_forward.

    gates_x (T, B, 4H) contiguous fp32/fp16/bf16; h0, c0 (B, H) or None; weight_hh (4H, H);
    lengths None or int (B,); reverse. Returns (y, h_n, c_n, saved) with saved None unless
    ``training``, else fp32 (gates (T, B, 4H) = activations i, f, g, o, 0 where inactive,
    c_seq (T, B, H) = the cell state after every step, kept where inactive): the same tensors
    as the batch-tiled kernels save, so either backward can follow either forward.
    ``plan`` overrides the layout (tests, benchmarks); by default ``split_plan`` picks it.
    """
    T, B, G = gates_x.shape
    H = G // 4
    device, dtype = gates_x.device, gates_x.dtype
    if G != 4 * H or not gates_x.is_contiguous():
        raise ValueError(f"gates_x must be a contiguous (T, B, 4H) tensor, got {gates_x.shape}")
    _check("weight_hh", weight_hh, (4 * H, H), dtype, device)
    for name, state in (("h0", h0), ("c0", c0)):
        if state is not None:
            _check(name, state, (B, H), dtype, device)
    _check_lengths(lengths, B, device)

    y = torch.empty((T, B, H), device=device, dtype=dtype)
    h_n = torch.empty((B, H), device=device, dtype=dtype)
    c_n = torch.empty((B, H), device=device, dtype=dtype)
    saved = None
    if training:
        saved = (torch.empty((T, B, 4 * H), device=device, dtype=torch.float32),
                 torch.empty((T, B, H), device=device, dtype=torch.float32))
    if B == 0:
        return y, h_n, c_n, saved
    plan = _resolve_plan(B, H, dtype, device, "lstm", plan)
    ring = torch.empty((2, B, H), device=device, dtype=torch.float32)
    act, c_seq = saved if training else (None, None)
    _run(_lstm_fwd_kernel, plan, "LSTM forward", device,
         (gates_x, h0, c0, weight_hh, lengths, y, h_n, c_n, act, c_seq, ring), (T, B, H),
         HAS_H0=h0 is not None, HAS_C0=c0 is not None, HAS_LENGTHS=lengths is not None,
         REVERSE=bool(reverse), TRAINING=bool(training), PRECISION=dot_precision(dtype, device))
    return y, h_n, c_n, saved


def lstm_backward(grad_y, grad_h_n, grad_c_n, saved, y, h0, c0, weight_hh, lengths,
                  reverse: bool, *, plan: Optional[SplitPlan] = None):
    """Reverse recurrence of ``lstm_forward`` in one launch; contract of lstm.lstm_backward.

    grad_y (T, B, H), grad_h_n, grad_c_n (B, H): any dtype and strides, any may be None.
    y and h0 are not read (the caller needs them for grad(weight_hh)). Returns fp32
    (grad_gates_x (T, B, 4H), 0 where inactive, grad_h0 (B, H), grad_c0 (B, H)).
    """
    act, c_seq = saved
    T, B, G = act.shape
    H = G // 4
    device, dtype = act.device, weight_hh.dtype
    _check("weight_hh", weight_hh, (4 * H, H), dtype, device)
    if c0 is not None:
        _check("c0", c0, (B, H), dtype, device)
    _check_lengths(lengths, B, device)
    grad_y = _dense(grad_y, "grad_y", (T, B, H), device)
    grad_h_n = _dense(grad_h_n, "grad_h_n", (B, H), device)
    grad_c_n = _dense(grad_c_n, "grad_c_n", (B, H), device)

    grad_gates_x = torch.empty((T, B, 4 * H), device=device, dtype=torch.float32)
    grad_h0 = torch.empty((B, H), device=device, dtype=torch.float32)
    grad_c0 = torch.empty((B, H), device=device, dtype=torch.float32)
    if B == 0:
        return grad_gates_x, grad_h0, grad_c0
    plan = _resolve_plan(B, H, dtype, device, "lstm", plan)
    _run(_lstm_bwd_kernel, plan, "LSTM backward", device,
         (grad_y, grad_h_n, grad_c_n, act, c_seq, c0, weight_hh, lengths,
          grad_gates_x, grad_h0, grad_c0, _partials(plan, B, H, device)), (T, B, H),
         HAS_GY=grad_y is not None, HAS_GHN=grad_h_n is not None, HAS_GCN=grad_c_n is not None,
         HAS_C0=c0 is not None, HAS_LENGTHS=lengths is not None, REVERSE=bool(reverse),
         PART_CHUNK=_part_chunk(plan), PRECISION=dot_precision(dtype, device))
    return grad_gates_x, grad_h0, grad_c0


def _gru_n_rows(plan):
    # tl.dot needs 16 rows of the n block (N in the forward, K in the backward).
    return max(plan.block_j, 16) if plan.use_dot else plan.block_j


def gru_forward(gates_x, h0, weight_hh, bias_hn, lengths, reverse: bool, reset_after: bool,
                training: bool, *, plan: Optional[SplitPlan] = None):
    """Run the GRU recurrence over all T steps in one launch; contract of gru.gru_forward.

    gates_x (T, B, 3H) fp32/fp16/bf16: x @ W_ih^T + every bias that folds; h0 (B, H) or None;
    weight_hh (3H, H); bias_hn (H,) or None (reset_after=True only); lengths None or int (B,).
    Returns y (T, B, H), h_n (B, H) in gates_x.dtype, and saved: None unless training, else
    fp32 (gates (T, B, 3H) = [r, z, n], 0 where inactive,) plus, for reset_after=True,
    gh_n (T, B, H) = h_{t-1} @ W_hn^T + b_hn: the tensors the batch-tiled kernels save.
    ``plan`` overrides the layout (tests, benchmarks).
    """
    T, B, G = gates_x.shape
    H = G // 3
    if G != 3 * H or tuple(weight_hh.shape) != (3 * H, H):
        raise ValueError(f"gates_x {tuple(gates_x.shape)} and weight_hh {tuple(weight_hh.shape)} "
                         "do not describe a GRU (3H gates of H)")
    if bias_hn is not None and not reset_after:
        raise ValueError("bias_hn only exists for reset_after=True; fold it into gates_x")
    device, dtype = gates_x.device, gates_x.dtype
    _check_lengths(lengths, B, device)
    y = torch.empty((T, B, H), device=device, dtype=dtype)
    h_n = torch.empty((B, H), device=device, dtype=dtype)
    saved = None
    if training:
        gates = torch.empty((T, B, 3 * H), device=device, dtype=torch.float32)
        saved = (gates,)
        if reset_after:
            saved += (torch.empty((T, B, H), device=device, dtype=torch.float32),)
    if B == 0:
        return y, h_n, saved
    plan = _resolve_plan(B, H, dtype, device, "gru", plan)
    ring = torch.empty((2, B, H), device=device, dtype=torch.float32)
    rh = None if reset_after else torch.empty((B, H), device=device, dtype=torch.float32)
    gates, gh_n = (saved + (None,))[:2] if training else (None, None)
    _run(_gru_fwd_kernel, plan, "GRU forward", device,
         (gates_x.contiguous(), None if h0 is None else h0.contiguous(), weight_hh.contiguous(),
          None if bias_hn is None else bias_hn.contiguous(), lengths,
          y, h_n, gates, gh_n, ring, rh), (T, B, H),
         HAS_H0=h0 is not None, HAS_BHN=bias_hn is not None, HAS_LENGTHS=lengths is not None,
         REVERSE=bool(reverse), RESET_AFTER=bool(reset_after), TRAINING=bool(training),
         BLOCK_N=_gru_n_rows(plan), PRECISION=dot_precision(dtype, device))
    return y, h_n, saved


def gru_backward(grad_y, grad_h_n, saved, y, h0, weight_hh, bias_hn, lengths, reverse: bool,
                 reset_after: bool, *, plan: Optional[SplitPlan] = None):
    """Reverse recurrence of ``gru_forward`` in one launch; contract of gru.gru_backward.

    grad_y (T, B, H), grad_h_n (B, H) may be None; h_{t-1} is rebuilt from y and h0.
    Returns fp32 (grad_gates_x (T, B, 3H), grad_gates_h (T, B, 3H), grad_h0 (B, H)), where
    grad_gates_h is the gradient w.r.t. each step's recurrent products ([h W_hr^T, h W_hz^T,
    h W_hn^T + b_hn] for reset_after=True, [h W_hr^T, h W_hz^T, (r*h) W_hn^T] otherwise);
    both 0 at inactive positions.
    """
    del bias_hn  # b_hn enters the backward only through the saved gh_n
    gates = saved[0]
    T, B, G = gates.shape
    H = G // 3
    device = gates.device
    _check_lengths(lengths, B, device)
    grad_y = _dense(grad_y, "grad_y", (T, B, H), device)
    grad_h_n = _dense(grad_h_n, "grad_h_n", (B, H), device)
    grad_gx = torch.empty((T, B, G), device=device, dtype=torch.float32)
    grad_gh = torch.empty((T, B, G), device=device, dtype=torch.float32)
    grad_h0 = torch.empty((B, H), device=device, dtype=torch.float32)
    if B == 0:
        return grad_gx, grad_gh, grad_h0
    plan = _resolve_plan(B, H, weight_hh.dtype, device, "gru", plan)
    _run(_gru_bwd_kernel, plan, "GRU backward", device,
         (grad_y, grad_h_n, gates, saved[1] if reset_after else None, y.contiguous(),
          None if h0 is None else h0.contiguous(), weight_hh.contiguous(), lengths,
          grad_gx, grad_gh, grad_h0, _partials(plan, B, H, device)), (T, B, H),
         HAS_GY=grad_y is not None, HAS_GHN_OUT=grad_h_n is not None, HAS_H0=h0 is not None,
         HAS_LENGTHS=lengths is not None, REVERSE=bool(reverse), RESET_AFTER=bool(reset_after),
         BLOCK_N=_gru_n_rows(plan), PART_CHUNK=_part_chunk(plan),
         PRECISION=dot_precision(weight_hh.dtype, device))
    return grad_gx, grad_gh, grad_h0
