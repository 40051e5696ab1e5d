"""Fused GRU recurrence: one persistent Triton launch per forward call and one per backward call.

Gate order r, z, n, stacked in the rows of ``weight_hh`` (3H x H). The input projection
``gates_x = x @ W_ih^T + b_ih (+ the recurrent biases that fold)`` is one GEMM done by the caller;
these kernels run only the sequential part.

Two variants of the candidate gate n:
  reset_after=True  (torch.nn, cuDNN):  n = tanh(gx_n + r * (h @ W_hn^T + b_hn))
  reset_after=False (original GRU, Keras reset_after=False):  n = tanh(gx_n + (r * h) @ W_hn^T)
and in both  r = sigmoid(gx_r + h @ W_hr^T),  z = sigmoid(gx_z + h @ W_hz^T),
h' = (1 - z) * n + z * h.

Cell variants (``lstmgru.cells.variants``), each behind a constexpr flag so that a call
without them compiles to the plain kernels: per-step state resets (``cuts`` (T, B): the state
entering step t of row b is zero), recurrent dropout (``recurrent_mask`` (B, H): every
recurrent product reads h * m, while z * h and the carried state keep h) and zoneout
(``zoneout_keep`` (T, B, H): h_t = h_{t-1} where kept, else h'; or, in eval form,
h_t = p h_{t-1} + (1 - p) h'). The masks are drawn by the caller and read by both launches.
With reset_after=True also layer_norm's LN_hh (``ln_hh_weight`` (3H,), no bias): each row's
whole 3H product is normalised before b_hn joins the n block; the product first goes to a
scratch row (the statistics span all column chunks), and the backward adds one phase per
step for LN's own row reductions.

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

LN_EPS = tl.constexpr(1e-5)  # F.layer_norm's default, as lstmgru.cells.variants.EPS


@triton.jit
def _dot_wt(acc, a_ptr, a_rows, row_mask, w_ptr, cols, H, m_ptr, m_rows, HAS_M: tl.constexpr,
            DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += (A * M)[rows, :H] @ W[cols, :H]^T (M only when HAS_M).

    A is fp32 with row offsets ``a_rows`` (int64, (BLOCK_B,)); W is row-major with H columns.
    Rows outside ``row_mask`` read as zero. M (the recurrent-dropout mask, row offsets
    ``m_rows``) multiplies A in fp32, before A is cast to W's dtype so that fp16/bf16 weights
    run on tensor cores; the sum stays fp32.
    """
    cmask = cols < H
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * H
    for k in range(0, H, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        kmask = ks < H
        amask = row_mask[:, None] & kmask[None, :]
        a = tl.load(a_ptr + a_rows[:, None] + ks[None, :], mask=amask, other=0.0)
        if HAS_M:
            a = a * tl.load(m_ptr + m_rows[:, None] + ks[None, :], mask=amask,
                            other=0.0).to(tl.float32)
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


@triton.jit
def _zone(h_prev, h_new, zk_ptr, offs, mask, zo_p, ZONEOUT: tl.constexpr):
    """Zoneout of one step by ZONEOUT mode: 0 none (h_new), 1 training (h_prev where the mask
    at ``offs`` says), 2 eval (p h_prev + (1 - p) h_new)."""
    if ZONEOUT == 1:
        kept = tl.load(zk_ptr + offs, mask=mask, other=0) != 0
        h_new = tl.where(kept, h_prev, h_new)
    elif ZONEOUT == 2:
        h_new = zo_p * h_prev + (1.0 - zo_p) * h_new
    return h_new


@triton.jit(do_not_specialize=["T"])
def _gru_fwd_kernel(
    gx_ptr, h0_ptr, w_ptr, bhn_ptr, len_ptr,          # inputs
    cuts_ptr, rmask_ptr, zk_ptr, zo_p, lng_ptr,       # variants (each only with its flag)
    y_ptr, hn_ptr, gates_ptr, ghn_ptr,                # outputs (gates, ghn only when TRAINING)
    xhat_ptr, rstd_ptr,                               # outputs (HAS_LN and TRAINING)
    hbuf_ptr, rh_ptr, z_ptr, rec_ptr,                 # fp32 scratch
    T, B, H,
    HAS_H0: tl.constexpr, HAS_BHN: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_CUTS: tl.constexpr, HAS_RMASK: tl.constexpr, ZONEOUT: tl.constexpr,
    HAS_LN: tl.constexpr,
    REVERSE: tl.constexpr, RESET_AFTER: tl.constexpr, TRAINING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=row_mask, other=0)
    out_ty = y_ptr.dtype.element_ty
    s_rows = rows.to(tl.int64) * H                      # rh, z scratch; recurrent mask

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
        y_rows = (t.to(tl.int64) * B + rows) * H            # y[t], saved ghn[t], zoneout_keep[t]
        if HAS_LENGTHS:
            active = row_mask & (t < lens)
        else:
            active = row_mask
        # A cut row reads its entering state as zero (masked loads), everywhere in the step.
        if HAS_CUTS:
            cut = tl.load(cuts_ptr + t.to(tl.int64) * B + rows, mask=row_mask, other=0) != 0
            live = row_mask & (cut == 0)
        else:
            live = row_mask

        if RESET_AFTER:
            if HAS_LN:
                # LN_hh normalises each row's whole 3H product, so the product goes to scratch
                # first; its statistics take two passes (mean, then squared deviations).
                rec_rows = rows.to(tl.int64) * (3 * H)
                row_sum = tl.zeros((BLOCK_B,), tl.float32)
                for j in range(0, H, BLOCK_H):
                    cols = j + tl.arange(0, BLOCK_H)
                    m = row_mask[:, None] & (cols < H)[None, :]
                    rec = rec_ptr + rec_rows[:, None] + cols[None, :]
                    for k in tl.static_range(3):
                        zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
                        part = _dot_wt(zero, hbuf_ptr, h_rows, live, w_ptr + k * H * H, cols, H,
                                       rmask_ptr, s_rows, HAS_RMASK, DOT_PRECISION, BLOCK_K)
                        tl.store(rec + k * H, part, mask=m)
                        row_sum += tl.sum(tl.where(m, part, 0.0), axis=1)
                mean = row_sum / (3 * H)
                tl.debug_barrier()
                row_sq = tl.zeros((BLOCK_B,), tl.float32)
                for j in range(0, H, BLOCK_H):
                    cols = j + tl.arange(0, BLOCK_H)
                    m = row_mask[:, None] & (cols < H)[None, :]
                    for k in tl.static_range(3):
                        part = tl.load(rec_ptr + rec_rows[:, None] + k * H + cols[None, :],
                                       mask=m, other=0.0)
                        dev = tl.where(m, part - mean[:, None], 0.0)
                        row_sq += tl.sum(dev * dev, axis=1)
                rstd = 1.0 / tl.sqrt(row_sq / (3 * H) + LN_EPS)
                if TRAINING:
                    tl.store(rstd_ptr + t.to(tl.int64) * B + rows, rstd, mask=row_mask)
            for j in range(0, H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                cmask = cols < H
                m = row_mask[:, None] & cmask[None, :]
                am = active[:, None] & cmask[None, :]
                if HAS_LN:
                    rec = rec_ptr + rec_rows[:, None] + cols[None, :]
                    xh_r = (tl.load(rec, mask=m, other=0.0) - mean[:, None]) * rstd[:, None]
                    xh_z = (tl.load(rec + H, mask=m, other=0.0) - mean[:, None]) * rstd[:, None]
                    xh_n = (tl.load(rec + 2 * H, mask=m, other=0.0) - mean[:, None]) * \
                        rstd[:, None]
                    lng = lng_ptr + cols
                    gh_r = xh_r * tl.load(lng, mask=cmask, other=0.0).to(tl.float32)[None, :]
                    gh_z = xh_z * tl.load(lng + H, mask=cmask, other=0.0).to(tl.float32)[None, :]
                    gh_n = xh_n * tl.load(lng + 2 * H, mask=cmask,
                                          other=0.0).to(tl.float32)[None, :]
                    if TRAINING:
                        xs = xhat_ptr + x_rows[:, None] + cols[None, :]
                        tl.store(xs, tl.where(am, xh_r, 0.0), mask=m)
                        tl.store(xs + H, tl.where(am, xh_z, 0.0), mask=m)
                        tl.store(xs + 2 * H, tl.where(am, xh_n, 0.0), mask=m)
                else:
                    zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
                    gh_r = _dot_wt(zero, hbuf_ptr, h_rows, live, w_ptr, cols, H,
                                   rmask_ptr, s_rows, HAS_RMASK, DOT_PRECISION, BLOCK_K)
                    gh_z = _dot_wt(zero, hbuf_ptr, h_rows, live, w_ptr + H * H, cols, H,
                                   rmask_ptr, s_rows, HAS_RMASK, DOT_PRECISION, BLOCK_K)
                    gh_n = _dot_wt(zero, hbuf_ptr, h_rows, live, w_ptr + 2 * H * H, cols, H,
                                   rmask_ptr, s_rows, HAS_RMASK, DOT_PRECISION, BLOCK_K)
                if HAS_BHN:
                    gh_n += tl.load(bhn_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                gx = gx_ptr + x_rows[:, None] + cols[None, :]
                x_r = tl.load(gx, mask=m, other=0.0).to(tl.float32)
                x_z = tl.load(gx + H, mask=m, other=0.0).to(tl.float32)
                x_n = tl.load(gx + 2 * H, mask=m, other=0.0).to(tl.float32)
                r = sigmoid(x_r + gh_r)
                z = sigmoid(x_z + gh_z)
                n = tanh(x_n + r * gh_n)
                h_prev = tl.load(hbuf_ptr + h_rows[:, None] + cols[None, :],
                                 mask=live[:, None] & cmask[None, :], other=0.0)
                h_new = _zone(h_prev, (1.0 - z) * n + z * h_prev, zk_ptr,
                              y_rows[:, None] + cols[None, :], am, zo_p, ZONEOUT)
                h_new = tl.where(am, h_new, h_prev)
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
            # Phase 1: r and z for every column; r * (h_{t-1} * m) goes to scratch because the
            # n-block product below reduces over all hidden columns of it.
            for j in range(0, H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                cmask = cols < H
                m = row_mask[:, None] & cmask[None, :]
                am = active[:, None] & cmask[None, :]
                zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
                gh_r = _dot_wt(zero, hbuf_ptr, h_rows, live, w_ptr, cols, H,
                               rmask_ptr, s_rows, HAS_RMASK, DOT_PRECISION, BLOCK_K)
                gh_z = _dot_wt(zero, hbuf_ptr, h_rows, live, w_ptr + H * H, cols, H,
                               rmask_ptr, s_rows, HAS_RMASK, DOT_PRECISION, BLOCK_K)
                gx = gx_ptr + x_rows[:, None] + cols[None, :]
                r = sigmoid(tl.load(gx, mask=m, other=0.0).to(tl.float32) + gh_r)
                z = sigmoid(tl.load(gx + H, mask=m, other=0.0).to(tl.float32) + gh_z)
                h_in = tl.load(hbuf_ptr + h_rows[:, None] + cols[None, :],
                               mask=live[:, None] & cmask[None, :], other=0.0)
                if HAS_RMASK:
                    h_in = h_in * tl.load(rmask_ptr + s_rows[:, None] + cols[None, :], mask=m,
                                          other=0.0).to(tl.float32)
                tl.store(rh_ptr + s_rows[:, None] + cols[None, :], r * h_in, mask=m)
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
                               rmask_ptr, s_rows, False, DOT_PRECISION, BLOCK_K)
                x_n = tl.load(gx_ptr + x_rows[:, None] + 2 * H + cols[None, :], mask=m,
                              other=0.0).to(tl.float32)
                n = tanh(x_n + gh_n)
                z = tl.load(z_ptr + s_rows[:, None] + cols[None, :], mask=m, other=0.0)
                h_prev = tl.load(hbuf_ptr + h_rows[:, None] + cols[None, :],
                                 mask=live[:, None] & cmask[None, :], other=0.0)
                h_new = _zone(h_prev, (1.0 - z) * n + z * h_prev, zk_ptr,
                              y_rows[:, None] + cols[None, :], am, zo_p, ZONEOUT)
                h_new = tl.where(am, h_new, h_prev)
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


@triton.jit
def _kept_share(dh, zk_ptr, offs, mask, zo_p, ZONEOUT: tl.constexpr):
    """The share of dLoss/dh_t that zoneout hands straight to h_{t-1} (ZONEOUT 1 or 2)."""
    if ZONEOUT == 1:
        return tl.where(tl.load(zk_ptr + offs, mask=mask, other=0) != 0, dh, 0.0)
    else:
        return zo_p * dh


@triton.jit(do_not_specialize=["T"])
def _gru_bwd_kernel(
    gy_ptr, ghn_out_ptr, gates_ptr, ghn_ptr, y_ptr, h0_ptr, w_ptr, len_ptr,   # inputs
    cuts_ptr, rmask_ptr, zk_ptr, zo_p, lng_ptr, xhat_ptr, rstd_ptr,          # variants
    ggx_ptr, ggh_ptr, gh0_ptr, gln_ptr,                                      # fp32 outputs
    dh_ptr,                                                                  # fp32 scratch
    T, B, H,
    HAS_GY: tl.constexpr, HAS_GHN_OUT: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_CUTS: tl.constexpr, HAS_RMASK: tl.constexpr,
    ZONEOUT: tl.constexpr, HAS_LN: tl.constexpr, REVERSE: tl.constexpr, RESET_AFTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=row_mask, other=0)
    else:
        lens = tl.full((BLOCK_B,), T, tl.int32)
    s_rows = rows.to(tl.int64) * H   # recurrent mask

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
        if HAS_CUTS:
            cut = tl.load(cuts_ptr + t.to(tl.int64) * B + rows, mask=row_mask, other=0) != 0

        # Phase 1: elementwise gate gradients for every column (for reset_after=False only the
        # n gate: the r gradient needs (dn-gradient @ W_hn), a reduction over all columns).
        # With zoneout, dh splits into the share through h' (dh_new) and the kept one (dh_kept),
        # which goes straight to h_{t-1}.
        if HAS_LN:
            # LN_hh's backward needs two row sums over all 3H: of g * dLoss/dLN and of
            # g * dLoss/dLN * xhat (dLN goes to gln, the product's gradient to ggh below).
            ln_s1 = tl.zeros((BLOCK_B,), tl.float32)
            ln_s2 = tl.zeros((BLOCK_B,), tl.float32)
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
            dh_new = dh
            if ZONEOUT != 0:
                dh_kept = _kept_share(dh, zk_ptr, y_rows[:, None] + cols[None, :], am, zo_p,
                                      ZONEOUT)
                dh_new = dh - dh_kept
            g = gates_ptr + x_rows[:, None] + cols[None, :]
            z = tl.load(g + H, mask=am, other=0.0).to(tl.float32)
            n = tl.load(g + 2 * H, mask=am, other=0.0).to(tl.float32)
            da_n = tl.where(am, dh_new * (1.0 - z) * (1.0 - n * n), 0.0)
            gx_out = ggx_ptr + x_rows[:, None] + cols[None, :]
            gh_out = ggh_ptr + x_rows[:, None] + cols[None, :]
            tl.store(gx_out + 2 * H, da_n, mask=m)
            if RESET_AFTER:
                r = tl.load(g, mask=am, other=0.0).to(tl.float32)
                gh_n = tl.load(ghn_ptr + y_rows[:, None] + cols[None, :], mask=am,
                               other=0.0).to(tl.float32)
                h_prev = _load_h_prev(y_ptr, h0_ptr, t, rows, row_mask, lens, cols, cmask, B, H,
                                      HAS_H0, REVERSE)
                if HAS_CUTS:
                    h_prev = tl.where(cut[:, None], 0.0, h_prev)
                da_r = tl.where(am, da_n * gh_n * r * (1.0 - r), 0.0)
                da_z = tl.where(am, dh_new * (h_prev - n) * z * (1.0 - z), 0.0)
                tl.store(gx_out, da_r, mask=m)
                tl.store(gx_out + H, da_z, mask=m)
                if HAS_LN:
                    gh_out = gln_ptr + x_rows[:, None] + cols[None, :]
                    xs = xhat_ptr + x_rows[:, None] + cols[None, :]
                    lng = lng_ptr + cols
                    for k in tl.static_range(3):
                        if k == 0:
                            d_ln = da_r
                        elif k == 1:
                            d_ln = da_z
                        else:
                            d_ln = da_n * r
                        d_xh = d_ln * tl.load(lng + k * H, mask=cmask,
                                              other=0.0).to(tl.float32)[None, :]
                        xh = tl.load(xs + k * H, mask=am, other=0.0)
                        ln_s1 += tl.sum(tl.where(am, d_xh, 0.0), axis=1)
                        ln_s2 += tl.sum(tl.where(am, d_xh * xh, 0.0), axis=1)
                tl.store(gh_out, da_r, mask=m)
                tl.store(gh_out + H, da_z, mask=m)
                tl.store(gh_out + 2 * H, da_n * r, mask=m)
                dh_prev = dh_new * z
                if ZONEOUT != 0:
                    dh_prev += dh_kept
                tl.store(dh_ptr + nxt_rows[:, None] + cols[None, :], tl.where(am, dh_prev, dh),
                         mask=m)
            else:
                tl.store(gh_out + 2 * H, da_n, mask=m)
        tl.debug_barrier()

        if HAS_LN:
            # The product's gradient: rstd * (g dLN - mean(g dLN) - xhat mean(g dLN xhat)).
            ln_rstd = tl.load(rstd_ptr + t.to(tl.int64) * B + rows, mask=row_mask, other=0.0)
            ln_m1 = ln_s1 / (3 * H)
            ln_m2 = ln_s2 / (3 * H)
            for j in range(0, H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                cmask = cols < H
                m = row_mask[:, None] & cmask[None, :]
                am = active[:, None] & cmask[None, :]
                for k in tl.static_range(3):
                    offs = x_rows[:, None] + k * H + cols[None, :]
                    d_xh = tl.load(gln_ptr + offs, mask=m, other=0.0) * tl.load(
                        lng_ptr + k * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                    xh = tl.load(xhat_ptr + offs, mask=m, other=0.0)
                    d_rec = ln_rstd[:, None] * (d_xh - ln_m1[:, None] - xh * ln_m2[:, None])
                    tl.store(ggh_ptr + offs, tl.where(am, d_rec, 0.0), mask=m)
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
                dh_new = dh
                if ZONEOUT != 0:
                    dh_kept = _kept_share(dh, zk_ptr, y_rows[:, None] + cols[None, :], am, zo_p,
                                          ZONEOUT)
                    dh_new = dh - dh_kept
                g = gates_ptr + x_rows[:, None] + cols[None, :]
                r = tl.load(g, mask=am, other=0.0).to(tl.float32)
                z = tl.load(g + H, mask=am, other=0.0).to(tl.float32)
                n = tl.load(g + 2 * H, mask=am, other=0.0).to(tl.float32)
                h_prev = _load_h_prev(y_ptr, h0_ptr, t, rows, row_mask, lens, cols, cmask, B, H,
                                      HAS_H0, REVERSE)
                if HAS_CUTS:
                    h_prev = tl.where(cut[:, None], 0.0, h_prev)
                # The n block's product reads r * (h * m): its gradient reaches h through r * m.
                h_in = h_prev
                r_in = r
                if HAS_RMASK:
                    mk = tl.load(rmask_ptr + s_rows[:, None] + cols[None, :], mask=m,
                                 other=0.0).to(tl.float32)
                    h_in = h_prev * mk
                    r_in = r * mk
                da_r = tl.where(am, d_rh * h_in * r * (1.0 - r), 0.0)
                da_z = tl.where(am, dh_new * (h_prev - n) * z * (1.0 - z), 0.0)
                gx_out = ggx_ptr + x_rows[:, None] + cols[None, :]
                gh_out = ggh_ptr + x_rows[:, None] + cols[None, :]
                tl.store(gx_out, da_r, mask=m)
                tl.store(gx_out + H, da_z, mask=m)
                tl.store(gh_out, da_r, mask=m)
                tl.store(gh_out + H, da_z, mask=m)
                dh_prev = dh_new * z + d_rh * r_in
                if ZONEOUT != 0:
                    dh_prev += dh_kept
                tl.store(dh_ptr + nxt_rows[:, None] + cols[None, :], tl.where(am, dh_prev, dh),
                         mask=m)
            tl.debug_barrier()

        # Last phase: dh_{t-1} += the gate gradients of the recurrent products @ W_hh
        # (all three blocks for reset_after=True, r and z for reset_after=False), times the
        # recurrent mask those products read h through. Inactive rows have zero gate
        # gradients, so they keep dh unchanged. Nothing flows back across a cut.
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
            if HAS_RMASK:
                acc = acc * tl.load(rmask_ptr + s_rows[:, None] + cols[None, :], mask=m,
                                    other=0.0).to(tl.float32)
            dst = dh_ptr + nxt_rows[:, None] + cols[None, :]
            dh_prev = tl.load(dst, mask=m, other=0.0) + acc
            if HAS_CUTS:
                dh_prev = tl.where(cut[:, None], 0.0, dh_prev)
            tl.store(dst, dh_prev, mask=m)
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


def _variant_args(T, B, H, dtype, cuts, recurrent_mask, zoneout, zoneout_keep):
    """Checks the variant arguments; returns the kernels' (cuts, recurrent_mask, zoneout_keep,
    p, ZONEOUT mode). Bool masks go in as uint8 views (no copy), which every Triton backend
    loads alike. zoneout_keep is ignored when zoneout is 0, as in ``variants.zone``."""
    if cuts is not None:
        if cuts.dtype != torch.bool or tuple(cuts.shape) != (T, B):
            raise ValueError(f"cuts should be a bool tensor of shape {(T, B)}, got "
                             f"{cuts.dtype} {tuple(cuts.shape)}")
        cuts = contiguous(cuts).view(torch.uint8)
    if recurrent_mask is not None:
        if recurrent_mask.dtype != dtype or tuple(recurrent_mask.shape) != (B, H):
            raise ValueError(f"recurrent_mask should be a {dtype} tensor of shape {(B, H)} "
                             f"(the run dtype), got {recurrent_mask.dtype} "
                             f"{tuple(recurrent_mask.shape)}")
        recurrent_mask = contiguous(recurrent_mask)
    zoneout = float(zoneout)
    if not 0.0 <= zoneout <= 1.0:
        raise ValueError(f"zoneout should be a probability in [0, 1], got {zoneout}")
    if zoneout_keep is not None:
        if zoneout_keep.dtype != torch.bool or tuple(zoneout_keep.shape) != (T, B, H):
            raise ValueError(f"zoneout_keep should be a bool tensor of shape {(T, B, H)}, got "
                             f"{zoneout_keep.dtype} {tuple(zoneout_keep.shape)}")
    if zoneout == 0.0:
        return cuts, recurrent_mask, None, 0.0, 0
    if zoneout_keep is None:
        return cuts, recurrent_mask, None, zoneout, 2
    return cuts, recurrent_mask, contiguous(zoneout_keep).view(torch.uint8), zoneout, 1


def _check_ln(ln_hh_weight, H, reset_after):
    if ln_hh_weight is None:
        return
    if not reset_after:
        raise ValueError("ln_hh_weight (layer_norm) is defined for reset_after=True only")
    if tuple(ln_hh_weight.shape) != (3 * H,):
        raise ValueError(f"ln_hh_weight should have shape {(3 * H,)}, got "
                         f"{tuple(ln_hh_weight.shape)}")


def gru_forward(gates_x, h0, weight_hh, bias_hn, lengths, reverse: bool, reset_after: bool,
                training: bool, cuts=None, recurrent_mask=None, zoneout: float = 0.0,
                zoneout_keep=None, ln_hh_weight=None):
    """Run the GRU recurrence over all T steps in one launch.

    gates_x (T, B, 3H) contiguous fp32/fp16/bf16: x @ W_ih^T + every bias that folds.
    h0 (B, H) or None (zeros); weight_hh (3H, H); bias_hn (H,) or None (reset_after=True only).
    lengths None or int (B,): row b is active at step t iff t < lengths[b]; inactive rows keep
    their state and get y = 0. reverse: steps run t = T-1 .. 0.
    Cell variants (module docstring), all optional: cuts (T, B) bool, already in processing
    order and clear at inactive positions (``variants.entering_cuts``); recurrent_mask (B, H)
    in gates_x.dtype; zoneout p with zoneout_keep (T, B, H) bool (training), or without it
    (eval form). y is the zoned state, which is also what the next step receives.
    ln_hh_weight (3H,) (reset_after=True only): LN_hh, without bias, over each row's 3H
    recurrent product before b_hn joins the n block.
    Returns y (T, B, H), h_n (B, H) in gates_x.dtype, and saved: None unless training, else
    (gates (T, B, 3H) = [r, z, n], zero where inactive,) plus, for reset_after=True,
    gh_n (T, B, H) = h_{t-1} @ W_hn^T + b_hn, which the r gradient needs. Saved tensors are
    fp32 (as in the LSTM kernels), so low-precision models get gate gradients from the values
    the forward computed, not from rounded copies. With ln_hh_weight, saved also holds xhat
    (T, B, 3H), the normalised product (zero where inactive), and rstd (T, B), its rows'
    1 / sqrt(var + eps).
    """
    T, B, G = gates_x.shape
    H = G // 3
    if G != 3 * H or tuple(weight_hh.shape) != (3 * H, H):
        raise ValueError(f"gates_x {tuple(gates_x.shape)} and weight_hh {tuple(weight_hh.shape)} "
                         "do not describe a GRU (3H gates of H)")
    if bias_hn is not None and not reset_after:
        raise ValueError("bias_hn only exists for reset_after=True; fold it into gates_x")
    dev, dtype = gates_x.device, gates_x.dtype
    cuts, recurrent_mask, zoneout_keep, zoneout, zone_mode = _variant_args(
        T, B, H, dtype, cuts, recurrent_mask, zoneout, zoneout_keep)
    _check_ln(ln_hh_weight, H, reset_after)
    has_ln = ln_hh_weight is not None
    y = torch.empty(T, B, H, device=dev, dtype=dtype)
    h_n = torch.empty(B, H, device=dev, dtype=dtype)
    fp32 = torch.float32
    gates = torch.empty(T, B, 3 * H, device=dev, dtype=fp32) if training else None
    gh_n = torch.empty(T, B, H, device=dev, dtype=fp32) if training and reset_after else None
    xhat = torch.empty(T, B, 3 * H, device=dev, dtype=fp32) if training and has_ln else None
    rstd = torch.empty(T, B, device=dev, dtype=fp32) if training and has_ln else None
    saved = None
    if training:
        saved = (gates, gh_n) if reset_after else (gates,)
        if has_ln:
            saved += (xhat, rstd)
    if B == 0:
        return y, h_n, saved

    blocks = gru_blocks(B, H)
    hbuf = torch.empty(2, B, H, device=dev, dtype=torch.float32)
    rh = z = None
    if not reset_after:
        rh = torch.empty(B, H, device=dev, dtype=torch.float32)
        z = torch.empty(B, H, device=dev, dtype=torch.float32)
    rec = torch.empty(B, 3 * H, device=dev, dtype=torch.float32) if has_ln else None
    _launch.launch(
        _gru_fwd_kernel, (triton.cdiv(B, blocks.block_b),),
        contiguous(gates_x), contiguous(h0), contiguous(weight_hh), contiguous(bias_hn),
        contiguous(lengths), cuts, recurrent_mask, zoneout_keep, zoneout,
        contiguous(ln_hh_weight),
        y, h_n, gates, gh_n, xhat, rstd, hbuf, rh, z, rec,
        T, B, H,
        HAS_H0=h0 is not None, HAS_BHN=bias_hn is not None, HAS_LENGTHS=lengths is not None,
        HAS_CUTS=cuts is not None, HAS_RMASK=recurrent_mask is not None, ZONEOUT=zone_mode,
        HAS_LN=has_ln,
        REVERSE=bool(reverse), RESET_AFTER=bool(reset_after), TRAINING=bool(training),
        DOT_PRECISION=dot_precision(dtype, dev), BLOCK_B=blocks.block_b, BLOCK_H=blocks.block_h,
        BLOCK_K=blocks.block_k, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return y, h_n, saved


def gru_backward(grad_y, grad_h_n, saved, y, h0, weight_hh, bias_hn, lengths, reverse: bool,
                 reset_after: bool, cuts=None, recurrent_mask=None, zoneout: float = 0.0,
                 zoneout_keep=None, ln_hh_weight=None):
    """Reverse recurrence of gru_forward in one launch; weight gradients are left to the caller.

    grad_y (T, B, H) and grad_h_n (B, H) may be None (zeros). saved, y, h0, lengths, reverse and
    reset_after, and the variants as given to / returned by gru_forward (h_{t-1} is rebuilt
    from y and h0, then cut).
    Returns fp32 (grad_gates_x (T, B, 3H), grad_gates_h (T, B, 3H), grad_h0 (B, H)), where
    grad_gates_h is the gradient w.r.t. each step's recurrent products: [h W_hr^T, h W_hz^T,
    h W_hn^T + b_hn] for reset_after=True, [h W_hr^T, h W_hz^T, (r*h) W_hn^T] otherwise.
    With recurrent_mask the products read h * m, so the weight gradient's operand is
    h_{t-1} * m (r * h_{t-1} * m for the n block of reset_after=False), with h_{t-1} zero
    where cut. Both gate gradients are 0 at inactive positions.
    With ln_hh_weight, grad_gates_h is the gradient of the product before LN_hh, and a fourth
    result follows: grad_ln (T, B, 3H), the gradient of LN_hh's output (its n block is b_hn's,
    and grad_ln * xhat summed over steps and rows is the gain's).
    """
    del bias_hn  # b_hn enters the backward only through the saved gh_n
    gates = saved[0]
    T, B, G = gates.shape
    H = G // 3
    dev = gates.device
    cuts, recurrent_mask, zoneout_keep, zoneout, zone_mode = _variant_args(
        T, B, H, y.dtype, cuts, recurrent_mask, zoneout, zoneout_keep)
    _check_ln(ln_hh_weight, H, reset_after)
    has_ln = ln_hh_weight is not None
    grad_gx = torch.empty(T, B, G, device=dev, dtype=torch.float32)
    grad_gh = torch.empty(T, B, G, device=dev, dtype=torch.float32)
    grad_h0 = torch.empty(B, H, device=dev, dtype=torch.float32)
    grad_ln = torch.empty(T, B, G, device=dev, dtype=torch.float32) if has_ln else None
    results = (grad_gx, grad_gh, grad_h0) + ((grad_ln,) if has_ln else ())
    if B == 0:
        return results

    blocks = gru_blocks(B, H)
    dh = torch.empty(2, B, H, device=dev, dtype=torch.float32)
    _launch.launch(
        _gru_bwd_kernel, (triton.cdiv(B, blocks.block_b),),
        contiguous(grad_y), contiguous(grad_h_n), gates, saved[1] if reset_after else None,
        contiguous(y), contiguous(h0), contiguous(weight_hh), contiguous(lengths),
        cuts, recurrent_mask, zoneout_keep, zoneout, contiguous(ln_hh_weight),
        saved[2] if has_ln else None, saved[3] if has_ln else None,
        grad_gx, grad_gh, grad_h0, grad_ln, dh,
        T, B, H,
        HAS_GY=grad_y is not None, HAS_GHN_OUT=grad_h_n is not None, HAS_H0=h0 is not None,
        HAS_LENGTHS=lengths is not None, HAS_CUTS=cuts is not None,
        HAS_RMASK=recurrent_mask is not None, ZONEOUT=zone_mode, HAS_LN=has_ln,
        REVERSE=bool(reverse), RESET_AFTER=bool(reset_after),
        DOT_PRECISION=dot_precision(weight_hh.dtype, dev), BLOCK_B=blocks.block_b,
        BLOCK_H=blocks.block_h, BLOCK_K=blocks.block_k, num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    return results
