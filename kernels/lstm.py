"""Fused LSTM recurrence: one persistent Triton kernel for the forward, one for the backward.

The input projection ``gates_x = x @ W_ih^T + b_ih + b_hh`` is computed outside for all steps as
one GEMM; these kernels run only the sequential part. Gate order is torch.nn's: i, f, g, o, stacked
in the rows of ``weight_hh`` (4H x H) and in the last dimension of ``gates_x`` (T, B, 4H).

Parallel layout (both kernels): the grid is over batch tiles. A program owns BLOCK_B whole rows of
the state for all T steps, so it never waits for another program and one launch covers the whole
sequence. Within a step it loops over hidden-column chunks of BLOCK_H and, per chunk, over the
reduction dimension in BLOCK_K pieces. The state of its rows lives in fp32 scratch in global memory
because a chunk needs all H columns of h_{t-1}, which other threads of the program produced; a
``tl.debug_barrier()`` (a CTA barrier on the GPU) separates the steps.

Conventions (absent arguments, contiguity, 64-bit offsets, dot precision, block shapes) are
``_common.py``'s. Lengths: row b is active at time t iff t < lengths[b]. An inactive row keeps its state and outputs
0, in both directions, so a reversed row simply starts at t = lengths[b] - 1 from (h0, c0).

Cell variants (``lstmgru.cells.variants``), each behind a constexpr flag so that the plain
kernels compile as without them; their masks are the caller's, made once per call, and both
kernels read them:

* cuts (T, B) bool (HAS_CUTS): the state entering step t is zero where cuts[t, b] (h and c,
  for the product, zoneout's kept value and the length-keep alike); already direction-adjusted
  and clear at inactive positions (``entering_cuts``), so both directions apply it at step t.
* recurrent_mask (B, H) (HAS_RMASK): the gates read (h_{t-1} * m) W_hh^T; nothing else sees m.
* zoneout (ZONEOUT): 1 = training, h_t = where(keep[t], h_{t-1}, h~_t) with zoneout_keep
  (T, B, H) bool; 2 = eval, h_t = p h_{t-1} + (1 - p) h~_t. c is not zoned out; y_t is h_t.
"""
import torch
import triton
import triton.language as tl

from . import _launch
from ._common import Blocks, contiguous, dot_precision
from ._math import sigmoid, tanh

# An H100 has 132 SMs. Beyond about one wave of programs, a wider batch tile is cheaper than a
# second wave, because each program re-reads weight_hh every step whatever its tile height.
_ONE_WAVE = 128


def lstm_blocks(batch: int, hidden: int, dtype: torch.dtype) -> Blocks:
    """Block shapes the launchers pick (on the GPU and in tests) for a batch x hidden problem."""
    block_b = 16
    while block_b < 64 and triton.cdiv(batch, block_b) > _ONE_WAVE:
        block_b *= 2
    block_h = min(64, max(16, triton.next_power_of_2(hidden)))
    # One K slice of the four gates' weights is then at most 32 KB whatever the dtype, so two
    # pipeline stages stay well inside an H100's 227 KB of shared memory.
    k_cap = 32 if dtype.itemsize == 4 else 64
    block_k = min(k_cap, max(16, triton.next_power_of_2(hidden)))
    # Four fp32 gate accumulators of block_b x block_h: at most 64 registers per thread.
    num_warps = 4 if block_b * block_h <= 2048 else 8
    return Blocks(block_b, block_h, block_k, num_warps, num_stages=2)


@triton.jit
def _load_pair_fp32(a_ptr, b_ptr, a_out_ptr, b_out_ptr, rows2, row_ok, H,
                    HAS_A: tl.constexpr, HAS_B: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Copy this program's rows of two (B, H) tensors into fp32 (B, H) buffers, zeros for an
    absent one: the initial (h, c) of the forward, the final (dh, dc) of the backward."""
    for j in range(0, H, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H)
        mask = row_ok[:, None] & (cols < H)[None, :]
        st = rows2 * H + cols[None, :]  # rows2 is int64
        if HAS_A:
            a = tl.load(a_ptr + st, mask=mask, other=0.0).to(tl.float32)
        else:
            a = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
        if HAS_B:
            b = tl.load(b_ptr + st, mask=mask, other=0.0).to(tl.float32)
        else:
            b = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
        tl.store(a_out_ptr + st, a, mask=mask)
        tl.store(b_out_ptr + st, b, mask=mask)


# F.layer_norm's epsilon, the variants' (lstmgru.cells.variants.EPS)
EPS = tl.constexpr(1e-5)


@triton.jit
def _layer_norm_cols(v, w_ptr, b_ptr, cols, col_ok, mean, rstd):
    """(v - mean) * rstd * w[cols] + b[cols] for a (BLOCK_B, BLOCK_H) chunk, row statistics
    mean and rstd (BLOCK_B,)."""
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return (v - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def _normed(rec_ptrs, gx_ptrs, w_ptrs, mask, col_ok, mean, rstd):
    """One gate's pre-activation under LN_hh: LN_hh(rec)[cols] (gain only) + gates_x."""
    rec = tl.load(rec_ptrs, mask=mask, other=0.0)
    w = tl.load(w_ptrs, mask=col_ok, other=0.0).to(tl.float32)
    gx = tl.load(gx_ptrs, mask=mask, other=0.0).to(tl.float32)
    return (rec - mean[:, None]) * rstd[:, None] * w[None, :] + gx


@triton.jit
def _merge_row_stats(count, mean, m2, v, col_ok, n_valid):
    """Each row's running count, mean and sum of squared deviations (m2), with one more
    (BLOCK_B, BLOCK_H) chunk ``v`` (valid in its first ``n_valid`` columns, where col_ok)
    merged in by Chan et al.'s pairwise update: stable where sum(x^2)/n - mean^2 would
    cancel (values far from 0)."""
    n = n_valid.to(tl.float32)
    chunk_mean = tl.sum(tl.where(col_ok[None, :], v, 0.0), axis=1) / n
    dev = tl.where(col_ok[None, :], v - chunk_mean[:, None], 0.0)
    total = count + n
    delta = chunk_mean - mean
    mean = mean + delta * (n / total)
    m2 = m2 + tl.sum(dev * dev, axis=1) + delta * delta * (count * n / total)
    return total, mean, m2


@triton.jit
def _gate_products(acc_i, acc_f, acc_g, acc_o, h_rd, rmask_ptr, w_ptr, rows2, row_ok, cols,
                   col_ok, ks, cut, H, HAS_CUTS: tl.constexpr, HAS_RMASK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc_q += (h_{t-1} * m) @ W_q[cols]^T for the four gates, h_{t-1} zero in cut rows."""
    # Gate q's rows of weight_hh for these columns: weight_hh[q*H + cols, k].
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * H + ks[None, :]
    h_ptrs = h_rd + rows2 * H + ks[None, :]
    if HAS_RMASK:
        m_ptrs = rmask_ptr + rows2 * H + ks[None, :]
    for k0 in range(0, H, BLOCK_K):
        k_ok = (k0 + ks) < H
        # The product runs in the weights' dtype (tensor cores for fp16/bf16) with an fp32
        # accumulator; DOT_PRECISION decides TF32 for fp32 weights (_common.py).
        hk = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_CUTS:
            hk = tl.where(cut, 0.0, hk)
        if HAS_RMASK:
            hk = hk * tl.load(m_ptrs, mask=row_ok[:, None] & k_ok[None, :],
                              other=0.0).to(tl.float32)
            m_ptrs += BLOCK_K
        hk = hk.to(w_ptr.dtype.element_ty)
        w_mask = col_ok[:, None] & k_ok[None, :]
        w_i = tl.load(w_ptrs, mask=w_mask, other=0.0)
        w_f = tl.load(w_ptrs + H * H, mask=w_mask, other=0.0)
        w_g = tl.load(w_ptrs + 2 * H * H, mask=w_mask, other=0.0)
        w_o = tl.load(w_ptrs + 3 * H * H, mask=w_mask, other=0.0)
        acc_i = tl.dot(hk, tl.trans(w_i), acc_i, input_precision=DOT_PRECISION)
        acc_f = tl.dot(hk, tl.trans(w_f), acc_f, input_precision=DOT_PRECISION)
        acc_g = tl.dot(hk, tl.trans(w_g), acc_g, input_precision=DOT_PRECISION)
        acc_o = tl.dot(hk, tl.trans(w_o), acc_o, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _new_cell(pre_i, pre_f, pre_g, pre_o, c_buf_ptr, act_t, c_seq_t, st, g_off, mask, active,
              cut, H, HAS_LENGTHS: tl.constexpr, HAS_CUTS: tl.constexpr,
              TRAINING: tl.constexpr):
    """The gates and c_t from the pre-activations: c_t goes to c_buf (and c_seq), the gates
    to act when TRAINING. Inactive rows keep c and get zero gates. Returns (c_t, o)."""
    i = sigmoid(pre_i)
    f = sigmoid(pre_f)
    g = tanh(pre_g)
    o = sigmoid(pre_o)
    c_prev = tl.load(c_buf_ptr + st, mask=mask, other=0.0)
    if HAS_CUTS:
        c_prev = tl.where(cut, 0.0, c_prev)
    c = f * c_prev + i * g
    if HAS_LENGTHS:
        c = tl.where(active, c, c_prev)
        i = tl.where(active, i, 0.0)
        f = tl.where(active, f, 0.0)
        g = tl.where(active, g, 0.0)
        o = tl.where(active, o, 0.0)
    tl.store(c_buf_ptr + st, c, mask=mask)
    if TRAINING:
        tl.store(act_t + g_off, i, mask=mask)
        tl.store(act_t + g_off + H, f, mask=mask)
        tl.store(act_t + g_off + 2 * H, g, mask=mask)
        tl.store(act_t + g_off + 3 * H, o, mask=mask)
        # The kept state at inactive positions too: a reversed row's first active step
        # reads its c_prev from the following (inactive) time step.
        tl.store(c_seq_t + st, c, mask=mask)
    return c, o


@triton.jit
def _new_hidden(h, h_rd, h_wr, y_t, keep_t, st, mask, active, cut, zoneout_p,
                HAS_LENGTHS: tl.constexpr, HAS_CUTS: tl.constexpr, ZONEOUT: tl.constexpr):
    """h_t from h~_t = o * tanh(.): zoneout, then inactive rows keep h_{t-1}; stores h_t to
    the state buffer and (0 where inactive) to y."""
    if HAS_LENGTHS or ZONEOUT != 0:
        h_prev = tl.load(h_rd + st, mask=mask, other=0.0)
        if HAS_CUTS:
            h_prev = tl.where(cut, 0.0, h_prev)
    if ZONEOUT == 1:
        keep = tl.load(keep_t + st, mask=mask, other=0) != 0
        h = tl.where(keep, h_prev, h)
    elif ZONEOUT == 2:
        h = zoneout_p * h_prev + (1.0 - zoneout_p) * h
    out = h
    if HAS_LENGTHS:
        h = tl.where(active, h, h_prev)
        out = tl.where(active, out, 0.0)
    tl.store(h_wr + st, h, mask=mask)
    tl.store(y_t + st, out.to(y_t.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])
def _lstm_fwd_kernel(
    gx_ptr, w_ptr, h0_ptr, c0_ptr, len_ptr, cut_ptr, rmask_ptr, keep_ptr,
    ln_ptr, ln_c_w_ptr, ln_c_b_ptr,
    y_ptr, hn_ptr, cn_ptr, act_ptr, c_seq_ptr, rec_ptr, stats_ptr,
    h_buf_ptr, c_buf_ptr, o_buf_ptr,
    T, B, H, BH, zoneout_p, rec_step,
    HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_CUTS: tl.constexpr, HAS_RMASK: tl.constexpr, ZONEOUT: tl.constexpr,
    LAYER_NORM: tl.constexpr,
    REVERSE: tl.constexpr, TRAINING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows2 = rows.to(tl.int64)[:, None]  # int64: every offset below is derived from it
    ks = tl.arange(0, BLOCK_K)
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=row_ok, other=0)

    # h is double-buffered: every chunk of step t reads all of h_{t-1} while the step writes h_t.
    _load_pair_fp32(h0_ptr, c0_ptr, h_buf_ptr, c_buf_ptr, rows2, row_ok, H, HAS_H0, HAS_C0,
                    BLOCK_B, BLOCK_H)
    tl.debug_barrier()

    for s in range(0, T):
        t = T - 1 - s if REVERSE else s
        t64 = t.to(tl.int64)
        gx_t = gx_ptr + t64 * (4 * BH)
        y_t = y_ptr + t64 * BH
        keep_t = keep_ptr
        if ZONEOUT == 1:
            keep_t = keep_ptr + t64 * BH
        act_t = act_ptr
        c_seq_t = c_seq_ptr
        if TRAINING:
            act_t = act_ptr + t64 * (4 * BH)
            c_seq_t = c_seq_ptr + t64 * BH
        h_rd = h_buf_ptr + (s % 2) * BH
        h_wr = h_buf_ptr + ((s + 1) % 2) * BH
        # (Stand-ins where a flag is off: the helpers read them only under their flags.)
        active = row_ok[:, None]
        cut = row_ok[:, None]
        if HAS_LENGTHS:
            active = (t < lens)[:, None]
        if HAS_CUTS:
            # Rather than zeroing the scratch state (another pass and barrier), every read of
            # the state entering this step sees zeros in the cut rows.
            cut = (tl.load(cut_ptr + t64 * B + rows, mask=row_ok, other=0) != 0)[:, None]
        if LAYER_NORM:
            # Three passes over the columns, as LN needs each row's statistics over all gates
            # (then over c) before any column goes on: (1) the raw product to rec and its row
            # statistics; (2) LN_hh, the gates and c_t, with c's; (3) LN_c and h_t.
            rec_t = rec_ptr + t64 * rec_step
            count = tl.zeros((BLOCK_B,), tl.float32)
            mean = tl.zeros((BLOCK_B,), tl.float32)
            m2 = tl.zeros((BLOCK_B,), tl.float32)
            for j in range(0, H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                col_ok = cols < H
                mask = row_ok[:, None] & col_ok[None, :]
                g_off = rows2 * (4 * H) + cols[None, :]
                zero = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
                r_i, r_f, r_g, r_o = _gate_products(zero, zero, zero, zero, h_rd, rmask_ptr,
                                                    w_ptr, rows2, row_ok, cols, col_ok, ks, cut,
                                                    H, HAS_CUTS, HAS_RMASK, DOT_PRECISION,
                                                    BLOCK_K)
                tl.store(rec_t + g_off, r_i, mask=mask)
                tl.store(rec_t + g_off + H, r_f, mask=mask)
                tl.store(rec_t + g_off + 2 * H, r_g, mask=mask)
                tl.store(rec_t + g_off + 3 * H, r_o, mask=mask)
                n_valid = tl.minimum(H - j, BLOCK_H)
                count, mean, m2 = _merge_row_stats(count, mean, m2, r_i, col_ok, n_valid)
                count, mean, m2 = _merge_row_stats(count, mean, m2, r_f, col_ok, n_valid)
                count, mean, m2 = _merge_row_stats(count, mean, m2, r_g, col_ok, n_valid)
                count, mean, m2 = _merge_row_stats(count, mean, m2, r_o, col_ok, n_valid)
            rstd = 1.0 / tl.sqrt(m2 / (4 * H) + EPS)
            tl.debug_barrier()
            count_c = tl.zeros((BLOCK_B,), tl.float32)
            mean_c = tl.zeros((BLOCK_B,), tl.float32)
            m2_c = tl.zeros((BLOCK_B,), tl.float32)
            for j in range(0, H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                col_ok = cols < H
                mask = row_ok[:, None] & col_ok[None, :]
                st = rows2 * H + cols[None, :]
                g_off = rows2 * (4 * H) + cols[None, :]
                pre_i = _normed(rec_t + g_off, gx_t + g_off, ln_ptr + cols, mask, col_ok,
                                mean, rstd)
                pre_f = _normed(rec_t + g_off + H, gx_t + g_off + H, ln_ptr + H + cols, mask,
                                col_ok, mean, rstd)
                pre_g = _normed(rec_t + g_off + 2 * H, gx_t + g_off + 2 * H,
                                ln_ptr + 2 * H + cols, mask, col_ok, mean, rstd)
                pre_o = _normed(rec_t + g_off + 3 * H, gx_t + g_off + 3 * H,
                                ln_ptr + 3 * H + cols, mask, col_ok, mean, rstd)
                c, o = _new_cell(pre_i, pre_f, pre_g, pre_o, c_buf_ptr, act_t, c_seq_t, st,
                                 g_off, mask, active, cut, H, HAS_LENGTHS, HAS_CUTS, TRAINING)
                tl.store(o_buf_ptr + st, o, mask=mask)
                # (an inactive row's statistics are of its kept c: unused, its h is kept too)
                count_c, mean_c, m2_c = _merge_row_stats(count_c, mean_c, m2_c, c, col_ok,
                                                         tl.minimum(H - j, BLOCK_H))
            rstd_c = 1.0 / tl.sqrt(m2_c / H + EPS)
            if TRAINING:
                stats_t = stats_ptr + (t64 * B + rows) * 4
                tl.store(stats_t, mean, mask=row_ok)
                tl.store(stats_t + 1, rstd, mask=row_ok)
                tl.store(stats_t + 2, mean_c, mask=row_ok)
                tl.store(stats_t + 3, rstd_c, mask=row_ok)
            tl.debug_barrier()
            for j in range(0, H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                col_ok = cols < H
                mask = row_ok[:, None] & col_ok[None, :]
                st = rows2 * H + cols[None, :]
                c = tl.load(c_buf_ptr + st, mask=mask, other=0.0)
                o = tl.load(o_buf_ptr + st, mask=mask, other=0.0)
                c_normed = _layer_norm_cols(c, ln_c_w_ptr, ln_c_b_ptr, cols, col_ok, mean_c,
                                            rstd_c)
                _new_hidden(o * tanh(c_normed), h_rd, h_wr, y_t, keep_t, st, mask, active, cut,
                            zoneout_p, HAS_LENGTHS, HAS_CUTS, ZONEOUT)
        else:
            for j in range(0, H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                col_ok = cols < H
                mask = row_ok[:, None] & col_ok[None, :]
                st = rows2 * H + cols[None, :]
                g_off = rows2 * (4 * H) + cols[None, :]
                acc_i = tl.load(gx_t + g_off, mask=mask, other=0.0).to(tl.float32)
                acc_f = tl.load(gx_t + g_off + H, mask=mask, other=0.0).to(tl.float32)
                acc_g = tl.load(gx_t + g_off + 2 * H, mask=mask, other=0.0).to(tl.float32)
                acc_o = tl.load(gx_t + g_off + 3 * H, mask=mask, other=0.0).to(tl.float32)
                acc_i, acc_f, acc_g, acc_o = _gate_products(
                    acc_i, acc_f, acc_g, acc_o, h_rd, rmask_ptr, w_ptr, rows2, row_ok, cols,
                    col_ok, ks, cut, H, HAS_CUTS, HAS_RMASK, DOT_PRECISION, BLOCK_K)
                c, o = _new_cell(acc_i, acc_f, acc_g, acc_o, c_buf_ptr, act_t, c_seq_t, st,
                                 g_off, mask, active, cut, H, HAS_LENGTHS, HAS_CUTS, TRAINING)
                _new_hidden(o * tanh(c), h_rd, h_wr, y_t, keep_t, st, mask, active, cut,
                            zoneout_p, HAS_LENGTHS, HAS_CUTS, ZONEOUT)
        tl.debug_barrier()

    h_fin = h_buf_ptr + (T % 2) * BH
    for j in range(0, H, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H)
        mask = row_ok[:, None] & (cols < H)[None, :]
        st = rows2 * H + cols[None, :]
        h = tl.load(h_fin + st, mask=mask, other=0.0)
        c = tl.load(c_buf_ptr + st, mask=mask, other=0.0)
        tl.store(hn_ptr + st, h.to(hn_ptr.dtype.element_ty), mask=mask)
        tl.store(cn_ptr + st, c.to(cn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_into_step(dh_ptr, gy_ptr, keep_t, gy_t, st, mask, active, zoneout_p,
                    HAS_GY: tl.constexpr, HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr):
    """dL/dh_t split as the step's backward needs it: (the share through h~_t, zoneout's share
    straight to h_{t-1} (dh_next itself for inactive rows), dh_next)."""
    dh_next = tl.load(dh_ptr + st, mask=mask, other=0.0)
    dh = dh_next
    if HAS_GY:
        # Added for inactive rows too: their gate gradients are zeroed and what dh_ptr passes
        # on there is dh_next.
        dh += tl.load(gy_t + st, mask=mask, other=0.0).to(tl.float32)
    dh_direct = dh_next
    if ZONEOUT == 1:
        keep = tl.load(keep_t + st, mask=mask, other=0) != 0
        dh_direct = tl.where(keep, dh, 0.0)
        dh = tl.where(keep, 0.0, dh)
    elif ZONEOUT == 2:
        dh_direct = zoneout_p * dh
        dh = (1.0 - zoneout_p) * dh
    if ZONEOUT != 0 and HAS_LENGTHS:
        dh_direct = tl.where(active, dh_direct, dh_next)
    return dh, dh_direct, dh_next


@triton.jit
def _gain_sums(sums, dots, da, w_ptrs, rec_ptrs, mask, col_ok, mean, rstd):
    """One gate chunk's part of sum(v) and sum(v * rec_hat), v = LN_hh's gain * da."""
    v = da * tl.load(w_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rec_hat = (tl.load(rec_ptrs, mask=mask, other=0.0) - mean[:, None]) * rstd[:, None]
    return sums + tl.sum(v, axis=1), dots + tl.sum(v * rec_hat, axis=1)


@triton.jit(do_not_specialize=["T"])
def _lstm_bwd_kernel(
    gy_ptr, ghn_ptr, gcn_ptr, act_ptr, c_seq_ptr, c0_ptr, w_ptr, len_ptr,
    cut_ptr, rmask_ptr, keep_ptr,
    ln_ptr, ln_c_w_ptr, ln_c_b_ptr, rec_ptr, stats_ptr,
    dgx_ptr, dh_ptr, dc_ptr, drec_ptr, dcn_ptr,
    T, B, H, BH, zoneout_p,
    HAS_GY: tl.constexpr, HAS_GHN: tl.constexpr, HAS_GCN: tl.constexpr, HAS_C0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_CUTS: tl.constexpr, HAS_RMASK: tl.constexpr,
    ZONEOUT: tl.constexpr, LAYER_NORM: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows2 = rows.to(tl.int64)[:, None]  # int64: every offset below is derived from it
    ks = tl.arange(0, BLOCK_K)
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=row_ok, other=0)

    # dh_ptr / dc_ptr carry dL/dh and dL/dc of the state flowing backwards; after step 0 they are
    # the gradients of h0 and c0, so they double as the outputs.
    _load_pair_fp32(ghn_ptr, gcn_ptr, dh_ptr, dc_ptr, rows2, row_ok, H, HAS_GHN, HAS_GCN,
                    BLOCK_B, BLOCK_H)
    tl.debug_barrier()

    for s in range(0, T):
        # Undo the forward's steps last to first; the forward's first step (s == T - 1 here)
        # started from c0 rather than from a saved c.
        t = s if REVERSE else T - 1 - s
        t_prev = t + 1 if REVERSE else t - 1
        is_first = s == T - 1
        not_first = s < T - 1
        t64 = t.to(tl.int64)
        act_t = act_ptr + t64 * (4 * BH)
        dgx_t = dgx_ptr + t64 * (4 * BH)
        c_seq_t = c_seq_ptr + t64 * BH
        c_seq_prev = c_seq_ptr + t_prev.to(tl.int64) * BH
        gy_t = gy_ptr
        if HAS_GY:
            gy_t = gy_ptr + t64 * BH
        keep_t = keep_ptr
        if ZONEOUT == 1:
            keep_t = keep_ptr + t64 * BH
        # (Stand-ins where a flag is off: read only under their flags.)
        active = row_ok[:, None]
        cut = row_ok[:, None]
        if HAS_LENGTHS:
            active = (t < lens)[:, None]
        if HAS_CUTS:
            # Nothing flows across a cut: the state entering step t was zero, not c_{t-1}/h_{t-1}.
            cut = (tl.load(cut_ptr + t64 * B + rows, mask=row_ok, other=0) != 0)[:, None]
        # The product of phase 2 reads the gradient of h_in @ W_hh^T: the gate gradients, or
        # under LN_hh their image through its backward (drec).
        da_src = dgx_t
        if LAYER_NORM:
            rec_t = rec_ptr + t64 * (4 * BH)
            drec_t = drec_ptr + t64 * (4 * BH)
            dcn_t = dcn_ptr + t64 * BH
            da_src = drec_t
            stats_t = stats_ptr + (t64 * B + rows) * 4
            mean = tl.load(stats_t, mask=row_ok, other=0.0)
            rstd = tl.load(stats_t + 1, mask=row_ok, other=0.0)
            mean_c = tl.load(stats_t + 2, mask=row_ok, other=0.0)
            rstd_c = tl.load(stats_t + 3, mask=row_ok, other=0.0)
            # Phase 0: LN_c's backward needs two row sums over all H columns of u = gain_c *
            # dL/dLN_c(c): sum(u) and sum(u * c_hat). dL/dLN_c(c) also goes out (dcn), for
            # the gain's and bias' gradients.
            u_sums = tl.zeros((BLOCK_B,), tl.float32)
            u_dots = tl.zeros((BLOCK_B,), tl.float32)
            for j in range(0, H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                col_ok = cols < H
                mask = row_ok[:, None] & col_ok[None, :]
                st = rows2 * H + cols[None, :]
                o = tl.load(act_t + rows2 * (4 * H) + 3 * H + cols[None, :], mask=mask,
                            other=0.0)
                c = tl.load(c_seq_t + st, mask=mask, other=0.0)
                dh, dh_direct, dh_next = _grad_into_step(dh_ptr, gy_ptr, keep_t, gy_t, st, mask,
                                                         active, zoneout_p, HAS_GY, HAS_LENGTHS,
                                                         ZONEOUT)
                c_hat = (c - mean_c[:, None]) * rstd_c[:, None]
                tc = tanh(_layer_norm_cols(c, ln_c_w_ptr, ln_c_b_ptr, cols, col_ok, mean_c,
                                           rstd_c))
                d_cn = dh * o * (1.0 - tc * tc)  # o is 0 at inactive positions
                tl.store(dcn_t + st, d_cn, mask=mask)
                u = d_cn * tl.load(ln_c_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                u_sums += tl.sum(u, axis=1)
                u_dots += tl.sum(u * c_hat, axis=1)
            u_mean = u_sums / H
            u_dot_mean = u_dots / H
            g_sums = tl.zeros((BLOCK_B,), tl.float32)
            g_dots = tl.zeros((BLOCK_B,), tl.float32)

        # Phase 1: gate gradients of this step, elementwise per chunk.
        for j in range(0, H, BLOCK_H):
            cols = j + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            st = rows2 * H + cols[None, :]
            g_off = rows2 * (4 * H) + cols[None, :]
            i = tl.load(act_t + g_off, mask=mask, other=0.0)
            f = tl.load(act_t + g_off + H, mask=mask, other=0.0)
            g = tl.load(act_t + g_off + 2 * H, mask=mask, other=0.0)
            o = tl.load(act_t + g_off + 3 * H, mask=mask, other=0.0)
            c = tl.load(c_seq_t + st, mask=mask, other=0.0)
            # tl.where, not `mask & is_first`: triton 3.9's interpreter turns a bool tensor & a
            # bool scalar into integers, which tl.load rejects as a mask.
            c_prev = tl.load(c_seq_prev + st, mask=tl.where(not_first, mask, False), other=0.0)
            if HAS_C0:
                c_prev += tl.load(c0_ptr + st, mask=tl.where(is_first, mask, False),
                                  other=0.0).to(tl.float32)
            if HAS_CUTS:
                c_prev = tl.where(cut, 0.0, c_prev)
            dh, dh_direct, dh_next = _grad_into_step(dh_ptr, gy_ptr, keep_t, gy_t, st, mask,
                                                     active, zoneout_p, HAS_GY, HAS_LENGTHS,
                                                     ZONEOUT)
            if ZONEOUT != 0:
                # The direct share waits in dh_ptr (phase 2 adds it to the product).
                tl.store(dh_ptr + st, dh_direct, mask=mask)
            dc_next = tl.load(dc_ptr + st, mask=mask, other=0.0)
            if LAYER_NORM:
                c_hat = (c - mean_c[:, None]) * rstd_c[:, None]
                tc = tanh(_layer_norm_cols(c, ln_c_w_ptr, ln_c_b_ptr, cols, col_ok, mean_c,
                                           rstd_c))
                u = dh * o * (1.0 - tc * tc) * tl.load(ln_c_w_ptr + cols, mask=col_ok,
                                                       other=0.0).to(tl.float32)
                # LayerNorm's backward: rstd * (u - mean(u) - c_hat * mean(u * c_hat))
                dc = dc_next + rstd_c[:, None] * (u - u_mean[:, None]
                                                  - c_hat * u_dot_mean[:, None])
            else:
                tc = tanh(c)
                dc = dc_next + dh * o * (1.0 - tc * tc)
            da_i = dc * g * i * (1.0 - i)
            da_f = dc * c_prev * f * (1.0 - f)
            da_g = dc * i * (1.0 - g * g)
            da_o = dh * tc * o * (1.0 - o)
            dc = dc * f
            if HAS_LENGTHS:
                da_i = tl.where(active, da_i, 0.0)
                da_f = tl.where(active, da_f, 0.0)
                da_g = tl.where(active, da_g, 0.0)
                da_o = tl.where(active, da_o, 0.0)
                dc = tl.where(active, dc, dc_next)
            if HAS_CUTS:
                dc = tl.where(cut, 0.0, dc)
            tl.store(dgx_t + g_off, da_i, mask=mask)
            tl.store(dgx_t + g_off + H, da_f, mask=mask)
            tl.store(dgx_t + g_off + 2 * H, da_g, mask=mask)
            tl.store(dgx_t + g_off + 3 * H, da_o, mask=mask)
            tl.store(dc_ptr + st, dc, mask=mask)
            if LAYER_NORM:
                # LN_hh's backward needs, over all 4H, sum(v) and sum(v * rec_hat), v = gain * da.
                g_sums, g_dots = _gain_sums(g_sums, g_dots, da_i, ln_ptr + cols, rec_t + g_off,
                                            mask, col_ok, mean, rstd)
                g_sums, g_dots = _gain_sums(g_sums, g_dots, da_f, ln_ptr + H + cols,
                                            rec_t + g_off + H, mask, col_ok, mean, rstd)
                g_sums, g_dots = _gain_sums(g_sums, g_dots, da_g, ln_ptr + 2 * H + cols,
                                            rec_t + g_off + 2 * H, mask, col_ok, mean, rstd)
                g_sums, g_dots = _gain_sums(g_sums, g_dots, da_o, ln_ptr + 3 * H + cols,
                                            rec_t + g_off + 3 * H, mask, col_ok, mean, rstd)
        tl.debug_barrier()

        if LAYER_NORM:
            # Phase 1b: drec = rstd * (v - mean(v) - rec_hat * mean(v * rec_hat)).
            v_mean = g_sums / (4 * H)
            v_dot_mean = g_dots / (4 * H)
            for j in range(0, 4 * H, BLOCK_H):
                cols = j + tl.arange(0, BLOCK_H)
                col_ok = cols < 4 * H
                mask = row_ok[:, None] & col_ok[None, :]
                g_off = rows2 * (4 * H) + cols[None, :]
                v = tl.load(dgx_t + g_off, mask=mask, other=0.0) * tl.load(
                    ln_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                rec_hat = (tl.load(rec_t + g_off, mask=mask, other=0.0)
                           - mean[:, None]) * rstd[:, None]
                drec = rstd[:, None] * (v - v_mean[:, None] - rec_hat * v_dot_mean[:, None])
                tl.store(drec_t + g_off, drec, mask=mask)
            tl.debug_barrier()

        # Phase 2: dL/dh_{t-1} = da @ weight_hh, reading all 4H gradients of the own rows that
        # phase 1 just wrote (fp32, cast to the weights' dtype for the product).
        for j in range(0, H, BLOCK_H):
            cols = j + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            st = rows2 * H + cols[None, :]
            acc = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
            for q in tl.static_range(4):
                da_ptrs = da_src + rows2 * (4 * H) + q * H + ks[None, :]
                w_ptrs = w_ptr + (q * H + ks.to(tl.int64)[:, None]) * H + cols[None, :]
                for k0 in range(0, H, BLOCK_K):
                    k_ok = (k0 + ks) < H
                    da = tl.load(da_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    da = da.to(w_ptr.dtype.element_ty)
                    w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                    acc = tl.dot(da, w, acc, input_precision=DOT_PRECISION)
                    da_ptrs += BLOCK_K
                    w_ptrs += BLOCK_K * H
            if HAS_RMASK:
                acc = acc * tl.load(rmask_ptr + st, mask=mask, other=0.0).to(tl.float32)
            if ZONEOUT != 0:
                # Phase 1 left zoneout's direct share here (dh_next itself for inactive rows).
                direct = tl.load(dh_ptr + st, mask=mask, other=0.0)
                if HAS_LENGTHS:
                    acc = tl.where(active, acc + direct, direct)
                else:
                    acc += direct
            elif HAS_LENGTHS:
                # An inactive step passed h through unchanged, and so does its gradient.
                acc = tl.where(active, acc, tl.load(dh_ptr + st, mask=mask, other=0.0))
            if HAS_CUTS:
                acc = tl.where(cut, 0.0, acc)
            tl.store(dh_ptr + st, acc, mask=mask)
        tl.debug_barrier()


def _check(name, tensor, shape, dtype, device):
    if tensor.shape != shape or tensor.dtype != dtype or tensor.device != device:
        raise ValueError(
            f"{name}: expected {tuple(shape)} {dtype} on {device}, "
            f"got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
        )


def _check_common(B, H, dtype, device, h0, c0, weight_hh, lengths):
    _check("weight_hh", weight_hh, (4 * H, H), dtype, device)
    if h0 is not None:
        _check("h0", h0, (B, H), dtype, device)
    if c0 is not None:
        _check("c0", c0, (B, H), dtype, device)
    if lengths is not None:
        if lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"lengths must be int32 or int64, got {lengths.dtype}")
        _check("lengths", lengths, (B,), lengths.dtype, device)


class _Variants:
    """The cell variants of one call, checked and laid out as both kernels take them."""

    def __init__(self, T, B, H, dtype, device, cuts, recurrent_mask, zoneout, zoneout_keep):
        if cuts is not None:
            _check("cuts", cuts, (T, B), torch.bool, device)
        if recurrent_mask is not None:
            _check("recurrent_mask", recurrent_mask, (B, H), dtype, device)
        if (not isinstance(zoneout, (int, float)) or isinstance(zoneout, bool)
                or not 0 <= zoneout <= 1):
            raise ValueError(f"zoneout must be a number in [0, 1], got {zoneout!r}")
        if zoneout_keep is not None:
            if zoneout == 0:
                raise ValueError("zoneout_keep is given but zoneout is 0")
            _check("zoneout_keep", zoneout_keep, (T, B, H), torch.bool, device)
        # Bool masks go in as bytes (the same storage) and are compared with 0 in the kernels.
        self.cuts = None if cuts is None else contiguous(cuts).view(torch.uint8)
        self.recurrent_mask = contiguous(recurrent_mask)
        self.keep = None if zoneout_keep is None else contiguous(zoneout_keep).view(torch.uint8)
        self.zoneout = float(zoneout)
        # 0: no zoneout; 1: training (the keep mask); 2: eval (the expectation, weight p).
        self.mode = 0 if zoneout == 0 else (1 if zoneout_keep is not None else 2)

    def pointers(self):
        return self.cuts, self.recurrent_mask, self.keep

    def flags(self):
        return dict(HAS_CUTS=self.cuts is not None, HAS_RMASK=self.recurrent_mask is not None,
                    ZONEOUT=self.mode)


def _layer_norm_weights(layer_norm, H, dtype, device):
    """The three LayerNorm vectors, checked and dense, or () without layer_norm."""
    if layer_norm is None:
        return ()
    names = ("ln_hh_weight", "ln_c_weight", "ln_c_bias")
    for name, tensor, size in zip(names, layer_norm, (4 * H, H, H)):
        _check(name, tensor, (size,), dtype, device)
    return tuple(contiguous(tensor) for tensor in layer_norm)


def lstm_forward(gates_x, h0, c0, weight_hh, lengths, reverse: bool, training: bool,
                 cuts=None, recurrent_mask=None, zoneout=0.0, zoneout_keep=None,
                 layer_norm=None):
    """Run the LSTM recurrence over all T steps in one launch.

    gates_x: (T, B, 4H) contiguous, fp32/fp16/bf16, = x @ W_ih^T + b_ih + b_hh for every step.
    h0, c0: (B, H) in gates_x.dtype, or None for zeros. weight_hh: (4H, H) in gates_x.dtype.
    lengths: None (every row runs T steps) or an int32/int64 (B,) tensor on the same device, any
    order; row b is active at time t iff t < lengths[b]. reverse: run t = T-1 down to 0.
    Cell variants (the module docstring): cuts (T, B) bool, recurrent_mask (B, H) in
    gates_x.dtype, zoneout p in [0, 1] with zoneout_keep (T, B, H) bool (training form) or None
    (eval form); layer_norm = (ln_hh_weight (4H,), ln_c_weight (H,), ln_c_bias (H,)) in
    gates_x.dtype, or None; then gates_x = LN_ih(x W_ih^T) + b_ih + b_hh. The defaults are the
    plain LSTM.

    Returns (y, h_n, c_n, saved): y (T, B, H) is 0 at inactive positions; h_n, c_n (B, H) are each
    row's state after its last active step; all three in gates_x.dtype. ``saved`` is None unless
    ``training``; then it is (gates, c_seq), both fp32: gates (T, B, 4H) holds the activations
    i, f, g, o (0 at inactive positions) and c_seq (T, B, H) the cell state after every time step
    (the kept state at inactive positions). fp32 so that low-precision models get gate gradients
    from the same fp32 values the forward computed. With layer_norm, ``saved`` also holds rec
    (T, B, 4H), the raw recurrent product before LN_hh, and stats (T, B, 4): each row's mean
    and 1/std under LN_hh and under LN_c (c_seq is LN_c's input).
    """
    T, B, G = gates_x.shape
    H = G // 4
    device, dtype = gates_x.device, gates_x.dtype
    if G != 4 * H:
        raise ValueError(f"gates_x must be a (T, B, 4H) tensor, got {tuple(gates_x.shape)}")
    _check_common(B, H, dtype, device, h0, c0, weight_hh, lengths)
    variants = _Variants(T, B, H, dtype, device, cuts, recurrent_mask, zoneout, zoneout_keep)
    norms = _layer_norm_weights(layer_norm, H, dtype, device)
    gates_x, h0, c0, weight_hh = (contiguous(t) for t in (gates_x, h0, c0, weight_hh))

    y = torch.empty((T, B, H), device=device, dtype=dtype)
    h_n = torch.empty((B, H), device=device, dtype=dtype)
    c_n = torch.empty((B, H), device=device, dtype=dtype)
    fp32 = {"device": device, "dtype": torch.float32}
    saved = None
    if training:
        saved = (torch.empty((T, B, 4 * H), **fp32), torch.empty((T, B, H), **fp32))
        if norms:
            saved += (torch.empty((T, B, 4 * H), **fp32), torch.empty((T, B, 4), **fp32))
    if B == 0:
        return y, h_n, c_n, saved

    blocks = lstm_blocks(B, H, dtype)
    h_buf = torch.empty((2, B, H), **fp32)
    c_buf = torch.empty((B, H), **fp32)
    act, c_seq = saved[:2] if training else (None, None)
    rec = stats = o_buf = None
    rec_step = 0  # elements between the steps' rec: 0 reuses one (B, 4H) scratch in inference
    if norms:
        o_buf = torch.empty((B, H), **fp32)
        if training:
            rec, stats = saved[2:]
            rec_step = 4 * B * H
        else:
            rec = torch.empty((B, 4 * H), **fp32)
    _launch.launch(
        _lstm_fwd_kernel, (triton.cdiv(B, blocks.block_b),),
        gates_x, weight_hh, h0, c0, contiguous(lengths), *variants.pointers(),
        *(norms or (None, None, None)),
        y, h_n, c_n, act, c_seq, rec, stats, h_buf, c_buf, o_buf,
        T, B, H, B * H, variants.zoneout, rec_step,
        HAS_H0=h0 is not None, HAS_C0=c0 is not None, HAS_LENGTHS=lengths is not None,
        **variants.flags(), LAYER_NORM=bool(norms),
        REVERSE=bool(reverse), TRAINING=bool(training),
        DOT_PRECISION=dot_precision(dtype, device),
        BLOCK_B=blocks.block_b, BLOCK_H=blocks.block_h, BLOCK_K=blocks.block_k,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return y, h_n, c_n, saved


def lstm_backward(grad_y, grad_h_n, grad_c_n, saved, y, h0, c0, weight_hh, lengths, reverse: bool,
                  cuts=None, recurrent_mask=None, zoneout=0.0, zoneout_keep=None,
                  layer_norm=None):
    """Reverse recurrence of ``lstm_forward`` in one launch, producing the gate gradients.

    grad_y (T, B, H), grad_h_n, grad_c_n (B, H): any dtype and strides, any may be None (zeros).
    saved, h0, c0, weight_hh, lengths, reverse and the variants (cuts, recurrent_mask, zoneout,
    zoneout_keep, layer_norm): as given to / returned by ``lstm_forward``.
    y and h0 are not read: the gate gradients need only the saved activations and cell states
    (the caller uses y and h0 for grad(weight_hh) = grad_rec^T @ (h_prev * m), h_prev cut).

    Returns fp32 (grad_gates_x (T, B, 4H), grad_h0 (B, H), grad_c0 (B, H)); grad_gates_x is the
    gradient w.r.t. the gate pre-activations and exactly 0 at inactive positions. With
    layer_norm also (grad_rec (T, B, 4H), the gradient of the raw product h_in @ W_hh^T, and
    grad_cn (T, B, H), that of LN_c's output): the caller's for the weight and gain gradients.
    Without it, grad_rec is grad_gates_x.
    """
    act, c_seq, *ln_saved = saved
    T, B, G = act.shape
    H = G // 4
    device, dtype = act.device, weight_hh.dtype
    _check_common(B, H, dtype, device, None, c0, weight_hh, lengths)
    variants = _Variants(T, B, H, dtype, device, cuts, recurrent_mask, zoneout, zoneout_keep)
    norms = _layer_norm_weights(layer_norm, H, dtype, device)
    if bool(norms) != bool(ln_saved):
        raise ValueError("layer_norm must be given to the backward exactly when the forward "
                         "had it (saved holds rec and stats then)")
    # Autograd may hand over strided or expanded gradients (e.g. from y.sum()); the kernel
    # indexes them as dense tensors.
    grads = []
    for name, grad, shape in (("grad_y", grad_y, (T, B, H)), ("grad_h_n", grad_h_n, (B, H)),
                              ("grad_c_n", grad_c_n, (B, H))):
        if grad is not None:
            _check(name, grad, shape, grad.dtype, device)
        grads.append(contiguous(grad))
    grad_y, grad_h_n, grad_c_n = grads
    c0, weight_hh = contiguous(c0), contiguous(weight_hh)

    fp32 = {"device": device, "dtype": torch.float32}
    grad_gates_x = torch.empty((T, B, 4 * H), **fp32)
    grad_h0 = torch.empty((B, H), **fp32)
    grad_c0 = torch.empty((B, H), **fp32)
    rec, stats = ln_saved if norms else (None, None)
    grad_rec = torch.empty((T, B, 4 * H), **fp32) if norms else None
    grad_cn = torch.empty((T, B, H), **fp32) if norms else None
    results = (grad_gates_x, grad_h0, grad_c0) + ((grad_rec, grad_cn) if norms else ())
    if B == 0:
        return results

    blocks = lstm_blocks(B, H, dtype)
    _launch.launch(
        _lstm_bwd_kernel, (triton.cdiv(B, blocks.block_b),),
        grad_y, grad_h_n, grad_c_n, act, c_seq, c0, weight_hh, contiguous(lengths),
        *variants.pointers(), *(norms or (None, None, None)), rec, stats,
        grad_gates_x, grad_h0, grad_c0, grad_rec, grad_cn,
        T, B, H, B * H, variants.zoneout,
        HAS_GY=grad_y is not None, HAS_GHN=grad_h_n is not None, HAS_GCN=grad_c_n is not None,
        HAS_C0=c0 is not None, HAS_LENGTHS=lengths is not None, **variants.flags(),
        LAYER_NORM=bool(norms), REVERSE=bool(reverse),
        DOT_PRECISION=dot_precision(dtype, device),
        BLOCK_B=blocks.block_b, BLOCK_H=blocks.block_h, BLOCK_K=blocks.block_k,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return results
