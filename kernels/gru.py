"""Fused GRU recurrence: one persistent Triton launch per forward call and one per backward call.

Gate order r, z, n, stacked in the rows of ``weight_hh`` (3H x H). The input projection
``gates_x = x @ W_ih^T + b_ih (+ the recurrent biases that fold)`` is one GEMM done by the caller;
these kernels run only the sequential part.

Two variants of the candidate gate n:
  reset_after=True  (torch.nn, cuDNN):  n = tanh(gx_n + r * (h @ W_hn^T + b_hn))
  reset_after=False (original GRU, Keras reset_after=False):  n = tanh(gx_n + (r * h) @ W_hn^T)
and in both  r = sigmoid(gx_r + h @ W_hr^T),  z = sigmoid(gx_z + h @ W_hz^T),
h' = (1 - z) * n + z * h.

Conventions (absent arguments, contiguity, 64-bit offsets, dot precision, block shapes) are
``_common.py``'s.

Kernel structure. The grid runs over batch tiles: each program owns BLOCK_B whole rows of the
state for all T steps, so no program ever waits on another (no grid barrier, which the
interpreter, running programs one after another, could not honour). Within a step the program
walks the hidden columns in chunks of BLOCK_H and, for each chunk, forms the recurrent product by
a loop over BLOCK_K slices of the reduction, then applies the gate math in registers:
pre-activations never go to global memory. The state lives in a small fp32 double buffer (the
chunk loop needs all of h_{t-1} while it writes h_t); threads of a program hand it over through
memory, so every phase ends with tl.debug_barrier().
"""
import torch
import triton
import triton.language as tl

from . import _launch
from ._common import Blocks, contiguous, dot_precision
from ._math import sigmoid, tanh


@triton.jit
def _dot_wt(acc, a_ptr, a_rows, row_mask, w_ptr, cols, H, DOT_PRECISION: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """acc += A[rows, :H] @ W[cols, :H]^T.

    A is fp32 with row offsets ``a_rows`` (int64, (BLOCK_B,)); W is row-major with H columns.
    A is cast to W's dtype so that fp16/bf16 weights run on tensor cores; the sum stays fp32.
    """
    cmask = cols < H
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * H
    for k in range(0, H, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        kmask = ks < H
        a = tl.load(a_ptr + a_rows[:, None] + ks[None, :], mask=row_mask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(w_cols + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _dot_w(acc, a_ptr, a_rows, row_mask, w_ptr, cols, H, DOT_PRECISION: tl.constexpr,
           BLOCK_K: tl.constexpr):
    """acc += A[rows, :H] @ W[:H, cols]; same conventions as _dot_wt (backward direction).

    Casting the fp32 gradient to fp16 can flush tiny values; that is the usual fp16 trade (loss
    scaling exists for it) and what cuDNN does, and bf16 keeps fp32's range.
    """
    cmask = cols < H
    w_cols = w_ptr + cols[None, :]
    for k in range(0, H, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        kmask = ks < H
        a = tl.load(a_ptr + a_rows[:, None] + ks[None, :], mask=row_mask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(w_cols + ks.to(tl.int64)[:, None] * H, mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _copy_rows(src_ptr, dst_ptr, rows, row_mask, H, HAS_SRC: tl.constexpr, BLOCK_B: tl.constexpr,
               BLOCK_H: tl.constexpr):
    """dst[rows, :H] = src[rows, :H] (or 0 when there is no src), cast to dst's dtype."""
    offs = rows.to(tl.int64)[:, None] * H
    for j in range(0, H, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H)
        m = row_mask[:, None] & (cols < H)[None, :]
        if HAS_SRC:
            v = tl.load(src_ptr + offs + cols[None, :], mask=m, other=0.0).to(tl.float32)
        else:
            v = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
        tl.store(dst_ptr + offs + cols[None, :], v.to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["T"])
def _gru_fwd_kernel(
    gx_ptr, h0_ptr, w_ptr, bhn_ptr, len_ptr,          # inputs
    y_ptr, hn_ptr, gates_ptr, ghn_ptr,                # outputs (gates, ghn only when TRAINING)
    hbuf_ptr, rh_ptr, z_ptr,                          # fp32 scratch
    T, B, H,
    HAS_H0: tl.constexpr, HAS_BHN: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    REVERSE: tl.constexpr, RESET_AFTER: tl.constexpr, TRAINING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=row_mask, other=0)
    out_ty = y_ptr.dtype.element_ty

    _copy_rows(h0_ptr, hbuf_ptr, rows, row_mask, H, HAS_H0, BLOCK_B, BLOCK_H)
    tl.debug_barrier()

    for s in range(T):
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        cur = s % 2
        h_rows = (cur * B + rows).to(tl.int64) * H          # h_{t-1}, fp32
        nxt_rows = ((1 - cur) * B + rows).to(tl.int64) * H  # h_t, fp32
        x_rows = (t.to(tl.int64) * B + rows) * (3 * H)      # gates_x[t], saved gates[t]
        y_rows = (t.to(tl.int64) * B + rows) * H            # y[t], saved ghn[t]
        s_rows = rows.to(tl.int64) * H                      # rh, z scratch
        if HAS_LENGTHS:
            active = row_mask & (t < lens)
        else:
            active = row_mask

        if RESET_AFTER:
            for j in range(0, H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                cmask = cols < H
                m = row_mask[:, None] & cmask[None, :]
                am = active[:, None] & cmask[None, :]
                zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
                gh_r = _dot_wt(zero, hbuf_ptr, h_rows, row_mask, w_ptr, cols, H,
                               DOT_PRECISION, BLOCK_K)
                gh_z = _dot_wt(zero, hbuf_ptr, h_rows, row_mask, w_ptr + H * H, cols, H,
                               DOT_PRECISION, BLOCK_K)
                gh_n = _dot_wt(zero, hbuf_ptr, h_rows, row_mask, w_ptr + 2 * H * H, cols, H,
                               DOT_PRECISION, BLOCK_K)
                if HAS_BHN:
                    gh_n += tl.load(bhn_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                gx = gx_ptr + x_rows[:, None] + cols[None, :]
                x_r = tl.load(gx, mask=m, other=0.0).to(tl.float32)
                x_z = tl.load(gx + H, mask=m, other=0.0).to(tl.float32)
                x_n = tl.load(gx + 2 * H, mask=m, other=0.0).to(tl.float32)
                r = sigmoid(x_r + gh_r)
                z = sigmoid(x_z + gh_z)
                n = tanh(x_n + r * gh_n)
                h_prev = tl.load(hbuf_ptr + h_rows[:, None] + cols[None, :], mask=m, other=0.0)
                h_new = tl.where(am, (1.0 - z) * n + z * h_prev, h_prev)
                tl.store(hbuf_ptr + nxt_rows[:, None] + cols[None, :], h_new, mask=m)
                tl.store(y_ptr + y_rows[:, None] + cols[None, :],
                         tl.where(am, h_new, 0.0).to(out_ty), mask=m)
                if TRAINING:
                    # Zeros at inactive positions: the caller multiplies saved r into a GEMM,
                    # where uninitialised memory (possibly NaN) would poison 0 * NaN.
                    g = gates_ptr + x_rows[:, None] + cols[None, :]
                    tl.store(g, tl.where(am, r, 0.0), mask=m)
                    tl.store(g + H, tl.where(am, z, 0.0), mask=m)
                    tl.store(g + 2 * H, tl.where(am, n, 0.0), mask=m)
                    tl.store(ghn_ptr + y_rows[:, None] + cols[None, :],
                             tl.where(am, gh_n, 0.0), mask=m)
        else:
            # Phase 1: r and z for every column; r * h_{t-1} goes to scratch because the
            # n-block product below reduces over all hidden columns of it.
            for j in range(0, H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                cmask = cols < H
                m = row_mask[:, None] & cmask[None, :]
                am = active[:, None] & cmask[None, :]
                zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
                gh_r = _dot_wt(zero, hbuf_ptr, h_rows, row_mask, w_ptr, cols, H,
                               DOT_PRECISION, BLOCK_K)
                gh_z = _dot_wt(zero, hbuf_ptr, h_rows, row_mask, w_ptr + H * H, cols, H,
                               DOT_PRECISION, BLOCK_K)
                gx = gx_ptr + x_rows[:, None] + cols[None, :]
                r = sigmoid(tl.load(gx, mask=m, other=0.0).to(tl.float32) + gh_r)
                z = sigmoid(tl.load(gx + H, mask=m, other=0.0).to(tl.float32) + gh_z)
                h_prev = tl.load(hbuf_ptr + h_rows[:, None] + cols[None, :], mask=m, other=0.0)
                tl.store(rh_ptr + s_rows[:, None] + cols[None, :], r * h_prev, mask=m)
                tl.store(z_ptr + s_rows[:, None] + cols[None, :], z, mask=m)
                if TRAINING:
                    g = gates_ptr + x_rows[:, None] + cols[None, :]
                    tl.store(g, tl.where(am, r, 0.0), mask=m)
                    tl.store(g + H, tl.where(am, z, 0.0), mask=m)
            tl.debug_barrier()
            # Phase 2: n = tanh(gx_n + (r * h) @ W_hn^T) and the state update.
            for j in range(0, H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                cmask = cols < H
                m = row_mask[:, None] & cmask[None, :]
                am = active[:, None] & cmask[None, :]
                zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
                gh_n = _dot_wt(zero, rh_ptr, s_rows, row_mask, w_ptr + 2 * H * H, cols, H,
                               DOT_PRECISION, BLOCK_K)
                x_n = tl.load(gx_ptr + x_rows[:, None] + 2 * H + cols[None, :], mask=m,
                              other=0.0).to(tl.float32)
                n = tanh(x_n + gh_n)
                z = tl.load(z_ptr + s_rows[:, None] + cols[None, :], mask=m, other=0.0)
                h_prev = tl.load(hbuf_ptr + h_rows[:, None] + cols[None, :], mask=m, other=0.0)
                h_new = tl.where(am, (1.0 - z) * n + z * h_prev, h_prev)
                tl.store(hbuf_ptr + nxt_rows[:, None] + cols[None, :], h_new, mask=m)
                tl.store(y_ptr + y_rows[:, None] + cols[None, :],
                         tl.where(am, h_new, 0.0).to(out_ty), mask=m)
                if TRAINING:
                    tl.store(gates_ptr + x_rows[:, None] + 2 * H + cols[None, :],
                             tl.where(am, n, 0.0), mask=m)
        tl.debug_barrier()

    _copy_rows(hbuf_ptr + (T % 2) * B * H, hn_ptr, rows, row_mask, H, True, BLOCK_B, BLOCK_H)


@triton.jit
def _load_h_prev(y_ptr, h0_ptr, t, rows, row_mask, lens, cols, cmask, B, H,
                 HAS_H0: tl.constexpr, REVERSE: tl.constexpr):
    """h_{t-1} (in processing order) of step t for an active row, rebuilt from the outputs: the
    forward wrote the state of every active step to y, so only each row's first step needs h0.
    lens: (BLOCK_B,) row lengths."""
    if REVERSE:
        tp = t + 1
        from_y = row_mask & (tp < lens)
    else:
        tp = t - 1
        # tl.where rather than `row_mask & (tp >= 0)`: triton 3.9's interpreter turns a scalar
        # int1 & a block of int1 into an int32 mask, which tl.load rejects.
        from_y = tl.where(tp >= 0, row_mask, False)
    offs = (tp.to(tl.int64) * B + rows) * H
    h = tl.load(y_ptr + offs[:, None] + cols[None, :], mask=from_y[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    if HAS_H0:
        from_h0 = row_mask & (from_y == 0)
        h0 = tl.load(h0_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :],
                     mask=from_h0[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        h = tl.where(from_y[:, None], h, h0)
    return h


@triton.jit(do_not_specialize=["T"])
def _gru_bwd_kernel(
    gy_ptr, ghn_out_ptr, gates_ptr, ghn_ptr, y_ptr, h0_ptr, w_ptr, len_ptr,   # inputs
    ggx_ptr, ggh_ptr, gh0_ptr,                                               # fp32 outputs
    dh_ptr,                                                                  # fp32 scratch
    T, B, H,
    HAS_GY: tl.constexpr, HAS_GHN_OUT: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, RESET_AFTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=row_mask, other=0)
    else:
        lens = tl.full((BLOCK_B,), T, tl.int32)

    # dh carries dLoss/dh_t from later steps; inactive steps pass it through unchanged, which is
    # exactly how h_n reaches each row's last active step.
    _copy_rows(ghn_out_ptr, dh_ptr, rows, row_mask, H, HAS_GHN_OUT, BLOCK_B, BLOCK_H)
    tl.debug_barrier()

    for s in range(T):
        # Walk the forward's processing order backwards.
        if REVERSE:
            t = s
        else:
            t = T - 1 - s
        cur = s % 2
        dh_rows = (cur * B + rows).to(tl.int64) * H
        nxt_rows = ((1 - cur) * B + rows).to(tl.int64) * H
        x_rows = (t.to(tl.int64) * B + rows) * (3 * H)
        y_rows = (t.to(tl.int64) * B + rows) * H
        if HAS_LENGTHS:
            active = row_mask & (t < lens)
        else:
            active = row_mask

        # Phase 1: elementwise gate gradients for every column (for reset_after=False only the
        # n gate: the r gradient needs (dn-gradient @ W_hn), a reduction over all columns).
        for j in range(0, H, BLOCK_H):
            cols = j + tl.arange(0, BLOCK_H)
            cmask = cols < H
            m = row_mask[:, None] & cmask[None, :]
            am = active[:, None] & cmask[None, :]
            dh = tl.load(dh_ptr + dh_rows[:, None] + cols[None, :], mask=m, other=0.0)
            if HAS_GY:
                # y is 0 (a constant) at inactive positions, so their grad_y is ignored.
                dh += tl.load(gy_ptr + y_rows[:, None] + cols[None, :], mask=am,
                              other=0.0).to(tl.float32)
            g = gates_ptr + x_rows[:, None] + cols[None, :]
            z = tl.load(g + H, mask=am, other=0.0).to(tl.float32)
            n = tl.load(g + 2 * H, mask=am, other=0.0).to(tl.float32)
            da_n = tl.where(am, dh * (1.0 - z) * (1.0 - n * n), 0.0)
            gx_out = ggx_ptr + x_rows[:, None] + cols[None, :]
            gh_out = ggh_ptr + x_rows[:, None] + cols[None, :]
            tl.store(gx_out + 2 * H, da_n, mask=m)
            if RESET_AFTER:
                r = tl.load(g, mask=am, other=0.0).to(tl.float32)
                gh_n = tl.load(ghn_ptr + y_rows[:, None] + cols[None, :], mask=am,
                               other=0.0).to(tl.float32)
                h_prev = _load_h_prev(y_ptr, h0_ptr, t, rows, row_mask, lens, cols, cmask, B, H,
                                      HAS_H0, REVERSE)
                da_r = tl.where(am, da_n * gh_n * r * (1.0 - r), 0.0)
                da_z = tl.where(am, dh * (h_prev - n) * z * (1.0 - z), 0.0)
                tl.store(gx_out, da_r, mask=m)
                tl.store(gx_out + H, da_z, mask=m)
                tl.store(gh_out, da_r, mask=m)
                tl.store(gh_out + H, da_z, mask=m)
                tl.store(gh_out + 2 * H, da_n * r, mask=m)
                tl.store(dh_ptr + nxt_rows[:, None] + cols[None, :], tl.where(am, dh * z, dh),
                         mask=m)
            else:
                tl.store(gh_out + 2 * H, da_n, mask=m)
        tl.debug_barrier()

        if not RESET_AFTER:
            # Phase 2: d(r*h) = da_n @ W_hn feeds the r gradient and the direct path to h_{t-1}.
            for j in range(0, H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                cmask = cols < H
                m = row_mask[:, None] & cmask[None, :]
                am = active[:, None] & cmask[None, :]
                zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
                d_rh = _dot_w(zero, ggh_ptr + 2 * H, x_rows, row_mask, w_ptr + 2 * H * H, cols, H,
                              DOT_PRECISION, BLOCK_K)
                dh = tl.load(dh_ptr + dh_rows[:, None] + cols[None, :], mask=m, other=0.0)
                if HAS_GY:
                    dh += tl.load(gy_ptr + y_rows[:, None] + cols[None, :], mask=am,
                                  other=0.0).to(tl.float32)
                g = gates_ptr + x_rows[:, None] + cols[None, :]
                r = tl.load(g, mask=am, other=0.0).to(tl.float32)
                z = tl.load(g + H, mask=am, other=0.0).to(tl.float32)
                n = tl.load(g + 2 * H, mask=am, other=0.0).to(tl.float32)
                h_prev = _load_h_prev(y_ptr, h0_ptr, t, rows, row_mask, lens, cols, cmask, B, H,
                                      HAS_H0, REVERSE)
                da_r = tl.where(am, d_rh * h_prev * r * (1.0 - r), 0.0)
                da_z = tl.where(am, dh * (h_prev - n) * z * (1.0 - z), 0.0)
                gx_out = ggx_ptr + x_rows[:, None] + cols[None, :]
                gh_out = ggh_ptr + x_rows[:, None] + cols[None, :]
                tl.store(gx_out, da_r, mask=m)
                tl.store(gx_out + H, da_z, mask=m)
                tl.store(gh_out, da_r, mask=m)
                tl.store(gh_out + H, da_z, mask=m)
                tl.store(dh_ptr + nxt_rows[:, None] + cols[None, :],
                         tl.where(am, dh * z + d_rh * r, dh), mask=m)
            tl.debug_barrier()

        # Last phase: dh_{t-1} += the gate gradients of the recurrent products @ W_hh
        # (all three blocks for reset_after=True, r and z for reset_after=False). Inactive rows
        # have zero gate gradients, so they keep dh unchanged.
        for j in range(0, H, BLOCK_H):
            cols = j + tl.arange(0, BLOCK_H)
            m = row_mask[:, None] & (cols < H)[None, :]
            acc = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
            acc = _dot_w(acc, ggh_ptr, x_rows, row_mask, w_ptr, cols, H, DOT_PRECISION, BLOCK_K)
            acc = _dot_w(acc, ggh_ptr + H, x_rows, row_mask, w_ptr + H * H, cols, H,
                         DOT_PRECISION, BLOCK_K)
            if RESET_AFTER:
                acc = _dot_w(acc, ggh_ptr + 2 * H, x_rows, row_mask, w_ptr + 2 * H * H, cols, H,
                             DOT_PRECISION, BLOCK_K)
            dst = dh_ptr + nxt_rows[:, None] + cols[None, :]
            tl.store(dst, tl.load(dst, mask=m, other=0.0) + acc, mask=m)
        tl.debug_barrier()

    _copy_rows(dh_ptr + (T % 2) * B * H, gh0_ptr, rows, row_mask, H, True, BLOCK_B, BLOCK_H)


def gru_blocks(B: int, H: int) -> Blocks:
    """Tile shapes and launch options for a batch of B rows and hidden size H.

    The interpreter tests call this too, so they run the tile shapes the GPU compiles.
    block_b: tl.dot needs >= 16 rows. Programs are the only parallelism across SMs, so the tile
    stays at 16 rows until the grid would exceed about 128 programs, then grows to share each
    program's per-step read of W_hh among more rows.
    block_h, block_k: the column chunk shrinks as block_b grows (block_b * block_h <= 1024) and
    the reduction slice is at most 32, because with 8 warps and no software pipelining
    (num_stages=1: the inner loops are short and their trip count is only known at run time)
    those are the largest tiles that ptxas fits in registers without spills (checked by compiling
    offline for sm_90 with triton 3.9; not yet run or timed on a GPU).
    Never below 16 (tl.dot); powers of two, padded and masked inside the kernels.
    """
    block_b = min(64, max(16, triton.next_power_of_2(triton.cdiv(max(B, 1), 128))))
    block_h = min(1024 // block_b, max(16, triton.next_power_of_2(H)))
    block_k = min(32, max(16, triton.next_power_of_2(H)))
    return Blocks(block_b, block_h, block_k, num_warps=8, num_stages=1)


def gru_forward(gates_x, h0, weight_hh, bias_hn, lengths, reverse: bool, reset_after: bool,
                training: bool):
    """Run the GRU recurrence over all T steps in one launch.

    gates_x (T, B, 3H) contiguous fp32/fp16/bf16: x @ W_ih^T + every bias that folds.
    h0 (B, H) or None (zeros); weight_hh (3H, H); bias_hn (H,) or None (reset_after=True only).
    lengths None or int (B,): row b is active at step t iff t < lengths[b]; inactive rows keep
    their state and get y = 0. reverse: steps run t = T-1 .. 0.
    Returns y (T, B, H), h_n (B, H) in gates_x.dtype, and saved: None unless training, else
    (gates (T, B, 3H) = [r, z, n], zero where inactive,) plus, for reset_after=True,
    gh_n (T, B, H) = h_{t-1} @ W_hn^T + b_hn, which the r gradient needs. Saved tensors are
    fp32 (as in the LSTM kernels), so low-precision models get gate gradients from the values
    the forward computed, not from rounded copies.
    """
    T, B, G = gates_x.shape
    H = G // 3
    if G != 3 * H or tuple(weight_hh.shape) != (3 * H, H):
        raise ValueError(f"gates_x {tuple(gates_x.shape)} and weight_hh {tuple(weight_hh.shape)} "
                         "do not describe a GRU (3H gates of H)")
    if bias_hn is not None and not reset_after:
        raise ValueError("bias_hn only exists for reset_after=True; fold it into gates_x")
    dev, dtype = gates_x.device, gates_x.dtype
    y = torch.empty(T, B, H, device=dev, dtype=dtype)
    h_n = torch.empty(B, H, device=dev, dtype=dtype)
    fp32 = torch.float32
    gates = torch.empty(T, B, 3 * H, device=dev, dtype=fp32) if training else None
    gh_n = torch.empty(T, B, H, device=dev, dtype=fp32) if training and reset_after else None
    saved = None
    if training:
        saved = (gates, gh_n) if reset_after else (gates,)
    if B == 0:
        return y, h_n, saved

    blocks = gru_blocks(B, H)
    hbuf = torch.empty(2, B, H, device=dev, dtype=torch.float32)
    rh = z = None
    if not reset_after:
        rh = torch.empty(B, H, device=dev, dtype=torch.float32)
        z = torch.empty(B, H, device=dev, dtype=torch.float32)
    _launch.launch(
        _gru_fwd_kernel, (triton.cdiv(B, blocks.block_b),),
        contiguous(gates_x), contiguous(h0), contiguous(weight_hh), contiguous(bias_hn),
        contiguous(lengths),
        y, h_n, gates, gh_n, hbuf, rh, z,
        T, B, H,
        HAS_H0=h0 is not None, HAS_BHN=bias_hn is not None, HAS_LENGTHS=lengths is not None,
        REVERSE=bool(reverse), RESET_AFTER=bool(reset_after), TRAINING=bool(training),
        DOT_PRECISION=dot_precision(dtype, dev), BLOCK_B=blocks.block_b, BLOCK_H=blocks.block_h,
        BLOCK_K=blocks.block_k, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return y, h_n, saved


def gru_backward(grad_y, grad_h_n, saved, y, h0, weight_hh, bias_hn, lengths, reverse: bool,
                 reset_after: bool):
    """Reverse recurrence of gru_forward in one launch; weight gradients are left to the caller.

    grad_y (T, B, H) and grad_h_n (B, H) may be None (zeros). saved, y, h0, lengths, reverse and
    reset_after as given to / returned by gru_forward (h_{t-1} is rebuilt from y and h0).
    Returns fp32 (grad_gates_x (T, B, 3H), grad_gates_h (T, B, 3H), grad_h0 (B, H)), where
    grad_gates_h is the gradient w.r.t. each step's recurrent products: [h W_hr^T, h W_hz^T,
    h W_hn^T + b_hn] for reset_after=True, [h W_hr^T, h W_hz^T, (r*h) W_hn^T] otherwise.
    Both gate gradients are 0 at inactive positions.
    """
    del bias_hn  # b_hn enters the backward only through the saved gh_n
    gates = saved[0]
    T, B, G = gates.shape
    H = G // 3
    dev = gates.device
    grad_gx = torch.empty(T, B, G, device=dev, dtype=torch.float32)
    grad_gh = torch.empty(T, B, G, device=dev, dtype=torch.float32)
    grad_h0 = torch.empty(B, H, device=dev, dtype=torch.float32)
    if B == 0:
        return grad_gx, grad_gh, grad_h0

    blocks = gru_blocks(B, H)
    dh = torch.empty(2, B, H, device=dev, dtype=torch.float32)
    _launch.launch(
        _gru_bwd_kernel, (triton.cdiv(B, blocks.block_b),),
        contiguous(grad_y), contiguous(grad_h_n), gates, saved[1] if reset_after else None,
        contiguous(y), contiguous(h0), contiguous(weight_hh), contiguous(lengths),
        grad_gx, grad_gh, grad_h0, dh,
        T, B, H,
        HAS_GY=grad_y is not None, HAS_GHN_OUT=grad_h_n is not None, HAS_H0=h0 is not None,
        HAS_LENGTHS=lengths is not None, REVERSE=bool(reverse), RESET_AFTER=bool(reset_after),
        DOT_PRECISION=dot_precision(weight_hh.dtype, dev), BLOCK_B=blocks.block_b,
        BLOCK_H=blocks.block_h, BLOCK_K=blocks.block_k, num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    return grad_gx, grad_gh, grad_h0
