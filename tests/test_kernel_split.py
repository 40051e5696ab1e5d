"""Split-hidden kernels (lstmgru._kernels.split) against independent fp64 step loops.

The programs of a split launch wait for each other every step, which the stock interpreter
(one program after another) cannot run: without CUDA, every launch here runs inside
``parallel_programs`` (tests/_parallel_interpreter.py), which gives each program its own
thread. That proves the protocol and the indexing, not the GPU's memory ordering or
co-residency; those need the GPU run of this same file. The layouts are the ones the launchers
pick for an H100 (132 SMs stand in for the device's SM count on the CPU), or forced narrower
slices where a default would give a single program. The fp64 oracles are the step loops of
test_kernel_lstm.py and test_kernel_gru.py, written independently of any kernel.
"""
import contextlib
import math

import pytest
import torch

pytest.importorskip("triton")

from lstmgru._kernels import _launch as kernel_launch  # noqa: E402  (after the skip: needs triton)
from lstmgru._kernels import split as K  # noqa: E402
from _parallel_interpreter import parallel_programs  # noqa: E402
from test_kernel_gru import (assert_close, h_prev_from_outputs, naive_gru,  # noqa: E402
                             weight_grad)
from test_kernel_lstm import h_prev_of, reference_lstm  # noqa: E402

pytestmark = pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def programs(plan, shake=0.0, seed=None, synced=True):
    """Context in which split launches can run: the GPU as it is, or one thread per program
    (then checked to have run all of the plan's programs at once, which holds where they sync:
    ``synced``). ``shake`` makes the threads yield at random memory accesses, to try other
    interleavings."""
    if DEVICE == "cuda":
        yield
        return
    with parallel_programs(timeout_s=120.0, shake=shake, seed=seed) as stats:
        yield
    assert stats.launches > 0
    if synced:
        assert stats.max_concurrent == plan.programs


def plan_for(B, H, dtype, cell, block_j=None):
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 132
    return K.split_plan(B, H, dtype, sms, cell, block_j=block_j)


def randn(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)


# fp32: IEEE products and fp32 state, so only fp32 rounding separates kernel and reference.
FP32 = 1e-5
# fp16: each step's exchanged operand is rounded to fp16 for the product and the outputs are
# fp16 (relative step ~5e-4); as in the batch-tiled kernels' tests.
FP16 = 3e-3


# --------------------------------------------------------------------------------------
# LSTM
# --------------------------------------------------------------------------------------
def check_lstm(T, B, H, dtype=torch.float32, reverse=False, with_state=True, lengths=None,
               block_j=None, min_programs=2, tol=FP32, seed=0, lengths_dtype=torch.int64,
               shake=0.0):
    gen = torch.Generator().manual_seed(seed)
    gates_x = randn(gen, T, B, 4 * H, dtype=dtype)
    weight_hh = randn(gen, 4 * H, H, dtype=dtype, scale=1.0 / math.sqrt(H))
    h0 = randn(gen, B, H, dtype=dtype) if with_state else None
    c0 = randn(gen, B, H, dtype=dtype) if with_state else None
    lens = None if lengths is None else torch.tensor(lengths, dtype=lengths_dtype, device=DEVICE)
    grad_y, grad_hn, grad_cn = (randn(gen, *shape, dtype=dtype)
                                for shape in ((T, B, H), (B, H), (B, H)))
    plan = plan_for(B, H, dtype, "lstm", block_j)
    assert plan.programs >= min_programs

    start = kernel_launch.launches
    with programs(plan, shake, seed):
        y, h_n, c_n, saved = K.lstm_forward(gates_x, h0, c0, weight_hh, lens, reverse, True,
                                            plan=plan)
        assert kernel_launch.launches - start == 1
        dgx, dh0, dc0 = K.lstm_backward(grad_y, grad_hn, grad_cn, saved, y, h0, c0, weight_hh,
                                        lens, reverse, plan=plan)
        assert kernel_launch.launches - start == 2

    # The reference starts from the very same (already rounded) inputs, in fp64.
    gx64 = gates_x.cpu().double().requires_grad_()
    w64 = weight_hh.cpu().double().requires_grad_()
    zeros = torch.zeros(B, H, dtype=torch.float64)
    h064 = (h0.cpu().double() if with_state else zeros.clone()).requires_grad_()
    c064 = (c0.cpu().double() if with_state else zeros.clone()).requires_grad_()
    lens_cpu = None if lens is None else lens.cpu()
    y64, hn64, cn64, act64 = reference_lstm(gx64, h064, c064, w64, lens_cpu, reverse)
    loss = ((y64 * grad_y.cpu().double()).sum() + (hn64 * grad_hn.cpu().double()).sum()
            + (cn64 * grad_cn.cpu().double()).sum())
    loss.backward()
    h_prev = h_prev_of(y.cpu().double(), h064.detach(), lens_cpu, reverse)
    dw = torch.einsum("tbg,tbh->gh", dgx.cpu().double(), h_prev)

    assert y.dtype == h_n.dtype == c_n.dtype == dtype
    assert all(x.dtype == torch.float32 for x in (*saved, dgx, dh0, dc0))
    assert_close("y", y, y64, tol)
    assert_close("h_n", h_n, hn64, tol)
    assert_close("c_n", c_n, cn64, tol)
    assert_close("saved gates", saved[0], act64, tol)
    assert_close("grad gates_x", dgx, gx64.grad, tol)
    assert_close("grad h0", dh0, h064.grad, tol)
    assert_close("grad c0", dc0, c064.grad, tol)
    assert_close("grad weight_hh", dw, w64.grad, tol)
    if lens is not None:
        inactive = torch.arange(T)[:, None] >= lens_cpu[None, :]
        assert (y.cpu()[inactive] == 0).all() and (dgx.cpu()[inactive] == 0).all()


LSTM_CASES = [
    # H=40 at one row: 5 programs of 8 units, multiply-and-sum products.
    pytest.param(dict(T=8, B=1, H=40), id="H40-B1"),
    pytest.param(dict(T=6, B=3, H=40, reverse=True, with_state=False, lengths=[6, 2, 0]),
                 id="H40-B3-lengths-reverse-nostate"),
    # 18 rows: tensor-core products, two batch groups (one mostly padding) of 3 programs each.
    pytest.param(dict(T=5, B=18, H=40, lengths=[5, 2, 0, 1, 3, 4, 5, 5, 1, 2, 3, 4, 5, 5, 4, 3,
                                                2, 1], shake=0.2), id="H40-B18-lengths-shake"),
    # A forced 16-unit slice: 2 groups x 4 programs.
    pytest.param(dict(T=4, B=18, H=64, reverse=True, block_j=16, min_programs=8,
                      lengths=[4, 1, 3, 2] * 4 + [0, 4], lengths_dtype=torch.int32),
                 id="H64-B18-slice16-lengths-reverse-int32"),
    # Hidden size not a multiple of the slice: the last program is partly masked.
    pytest.param(dict(T=12, B=2, H=20), id="H20-B2-T12"),
    # 17 programs: the backward adds the partial sums 16 slices at a time, so twice.
    pytest.param(dict(T=3, B=1, H=136, min_programs=17), id="H136-B1-17-programs"),
]


@pytest.mark.parametrize("case", LSTM_CASES)
def test_lstm_fp32_matches_fp64_reference(case):
    check_lstm(**case)


@pytest.mark.parametrize("case", [
    pytest.param(dict(T=5, B=18, H=40, reverse=True), id="H40-B18-dot"),
    pytest.param(dict(T=5, B=3, H=64, block_j=8, min_programs=8, with_state=False,
                      lengths=[5, 2, 3]), id="H64-B3-slice8-lengths"),
])
def test_lstm_fp16_matches_fp64_reference(case):
    check_lstm(dtype=torch.float16, tol=FP16, **case)


# bf16 keeps 8 mantissa bits: 8x the fp16 bound (as in the batch-tiled kernels' tests).
BF16 = 8 * FP16


def test_lstm_bf16_multiply_and_sum():
    # Up to 8 rows the products run without tl.dot, so bf16 runs in the interpreter too.
    assert not plan_for(3, 40, torch.bfloat16, "lstm").use_dot
    check_lstm(T=5, B=3, H=40, dtype=torch.bfloat16, lengths=[5, 2, 3], tol=BF16)


@pytest.mark.skipif(DEVICE != "cuda", reason="triton 3.9's interpreter gets bf16 tl.dot wrong; "
                    "bf16 tensor-core products run on the GPU only")
def test_lstm_bf16_tensor_cores_gpu():
    check_lstm(T=5, B=18, H=80, dtype=torch.bfloat16, lengths=[5, 2, 3] * 6, tol=BF16)


# --------------------------------------------------------------------------------------
# GRU
# --------------------------------------------------------------------------------------
def check_gru(T, B, H, reset_after, dtype=torch.float32, has_h0=True, has_bias=True,
              reverse=False, lengths=None, block_j=None, min_programs=2, tol=FP32, seed=0,
              shake=0.0):
    gen = torch.Generator().manual_seed(seed)
    gates_x = randn(gen, T, B, 3 * H, dtype=dtype)
    h0 = randn(gen, B, H, dtype=dtype) if has_h0 else None
    weight_hh = randn(gen, 3 * H, H, dtype=dtype, scale=H ** -0.5)
    bias_hn = randn(gen, H, dtype=dtype, scale=0.5) if has_bias and reset_after else None
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=DEVICE)
    grad_y, grad_hn = randn(gen, T, B, H, dtype=dtype), randn(gen, B, H, dtype=dtype)
    plan = plan_for(B, H, dtype, "gru", block_j)
    assert plan.programs >= min_programs

    start = kernel_launch.launches
    with programs(plan, shake, seed):
        y, h_n, saved = K.gru_forward(gates_x, h0, weight_hh, bias_hn, lens, reverse,
                                      reset_after, True, plan=plan)
        assert kernel_launch.launches - start == 1
        ggx, ggh, gh0 = K.gru_backward(grad_y, grad_hn, saved, y, h0, weight_hh, bias_hn, lens,
                                       reverse, reset_after, plan=plan)
        assert kernel_launch.launches - start == 2

    # An absent h0 is zeros, whose gradient is still defined (and returned).
    h0_ref = torch.zeros(B, H, dtype=torch.float64) if h0 is None else h0
    ref_in = [None if v is None else v.cpu().double().requires_grad_()
              for v in (gates_x, h0_ref, weight_hh, bias_hn)]
    lens_cpu = None if lens is None else lens.cpu()
    y_ref, hn_ref = naive_gru(*ref_in, lens_cpu, reverse, reset_after)
    ((y_ref * grad_y.cpu().double()).sum() + (hn_ref * grad_hn.cpu().double()).sum()).backward()
    gx_ref, h0_ref, w_ref, b_ref = ref_in

    assert y.dtype == h_n.dtype == dtype
    assert len(saved) == (2 if reset_after else 1)
    assert all(x.dtype == torch.float32 for x in (*saved, ggx, ggh, gh0))
    assert_close("y", y, y_ref, tol)
    assert_close("h_n", h_n, hn_ref, tol)
    assert_close("grad gates_x", ggx, gx_ref.grad, tol)
    assert_close("grad h0", gh0, h0_ref.grad, tol)
    h_prev = h_prev_from_outputs(y.cpu().double(), None if h0 is None else h0.cpu(), lens_cpu,
                                 reverse)
    assert_close("grad weight_hh",
                 weight_grad(ggh.cpu().double(), saved[0].cpu(), h_prev, reset_after),
                 w_ref.grad, tol)
    if bias_hn is not None:
        assert_close("grad bias_hn", ggh[..., 2 * H:].sum((0, 1)), b_ref.grad, tol)
    if lens is not None:
        inactive = torch.arange(T)[:, None] >= lens_cpu[None, :]
        assert (y.cpu()[inactive] == 0).all()
        assert (ggx.cpu()[inactive] == 0).all() and (ggh.cpu()[inactive] == 0).all()


GRU_CASES = [
    pytest.param(dict(T=6, B=3, H=40, reverse=True, lengths=[6, 2, 0], shake=0.2),
                 id="H40-B3-lengths-reverse-shake"),
    pytest.param(dict(T=5, B=1, H=40, has_h0=False, has_bias=False), id="H40-B1-noh0-nobias"),
    pytest.param(dict(T=5, B=18, H=40, lengths=[5, 2, 0, 1, 3, 4, 5, 5, 1, 2, 3, 4, 5, 5, 4, 3,
                                                2, 1]), id="H40-B18-lengths"),
    pytest.param(dict(T=9, B=2, H=20, reverse=True), id="H20-B2-T9-reverse"),
    pytest.param(dict(T=3, B=1, H=136, min_programs=17), id="H136-B1-17-programs"),
]


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "original"])
@pytest.mark.parametrize("case", GRU_CASES)
def test_gru_fp32_matches_fp64_reference(case, reset_after):
    check_gru(reset_after=reset_after, **case)


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "original"])
@pytest.mark.parametrize("case", [
    pytest.param(dict(T=4, B=18, H=64, reverse=True, block_j=16, min_programs=8),
                 id="H64-B18-slice16-reverse"),
    pytest.param(dict(T=5, B=3, H=64, block_j=8, min_programs=8, lengths=[5, 2, 3]),
                 id="H64-B3-slice8-lengths"),
])
def test_gru_fp16_matches_fp64_reference(case, reset_after):
    check_gru(reset_after=reset_after, dtype=torch.float16, tol=FP16, **case)


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "original"])
def test_gru_bf16_multiply_and_sum(reset_after):
    check_gru(5, 3, 40, reset_after, dtype=torch.bfloat16, lengths=[5, 2, 3], tol=BF16)


@pytest.mark.skipif(DEVICE != "cuda", reason="triton 3.9's interpreter gets bf16 tl.dot wrong; "
                    "bf16 tensor-core products run on the GPU only")
@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "original"])
def test_gru_bf16_tensor_cores_gpu(reset_after):
    check_gru(5, 18, 80, reset_after, dtype=torch.bfloat16, lengths=[5, 2, 3] * 6, tol=BF16)


# --------------------------------------------------------------------------------------
# Launch behaviour
# --------------------------------------------------------------------------------------
def test_inference_saves_nothing_and_matches_training():
    gen = torch.Generator().manual_seed(4)
    T, B, H = 4, 3, 40
    gates_x = randn(gen, T, B, 4 * H, dtype=torch.float32)
    weight_hh = randn(gen, 4 * H, H, dtype=torch.float32, scale=H ** -0.5)
    lens = torch.tensor([4, 1, 3], device=DEVICE)
    with programs(plan_for(B, H, torch.float32, "lstm")):
        train = K.lstm_forward(gates_x, None, None, weight_hh, lens, True, True)
        infer = K.lstm_forward(gates_x, None, None, weight_hh, lens, True, False)
    assert infer[3] is None
    for a, b in zip(train[:3], infer[:3]):
        assert torch.equal(a, b)


def test_empty_sequence_returns_initial_state():
    gen = torch.Generator().manual_seed(8)
    B, H = 3, 40
    h0, c0 = randn(gen, B, H, dtype=torch.float32), randn(gen, B, H, dtype=torch.float32)
    w = randn(gen, 4 * H, H, dtype=torch.float32)
    # No step, so no sync: a program may finish before the last one starts.
    with programs(plan_for(B, H, torch.float32, "lstm"), synced=False):
        y, h_n, c_n, saved = K.lstm_forward(torch.empty(0, B, 4 * H, device=DEVICE), h0, c0, w,
                                            None, False, True)
        ghn, gcn = randn(gen, B, H, dtype=torch.float32), randn(gen, B, H, dtype=torch.float32)
        dgx, dh0, dc0 = K.lstm_backward(None, ghn, gcn, saved, y, h0, c0, w, None, False)
    assert torch.equal(h_n, h0) and torch.equal(c_n, c0)
    assert dgx.shape == (0, B, 4 * H) and torch.equal(dh0, ghn) and torch.equal(dc0, gcn)


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "original"])
def test_gru_one_hidden_unit(reset_after):
    # H=1 is far below one slice: a single program, mostly masked.
    check_gru(4, 2, 1, reset_after, min_programs=1)


def test_empty_batch_launches_nothing():
    start = kernel_launch.launches
    gx = torch.randn(3, 0, 80, device=DEVICE)
    w = torch.randn(80, 20, device=DEVICE)
    y, h_n, c_n, saved = K.lstm_forward(gx, None, None, w, None, False, True)
    grads = K.lstm_backward(torch.empty_like(y), None, None, saved, y, None, None, w, None, False)
    assert [g.shape for g in grads] == [(3, 0, 80), (0, 20), (0, 20)]
    y, h_n, saved = K.gru_forward(gx[..., :60], None, w[:60], None, None, False, False, True)
    grads = K.gru_backward(None, None, saved, y, None, w[:60], None, None, False, False)
    assert [g.shape for g in grads] == [(3, 0, 60), (3, 0, 60), (0, 20)]
    assert kernel_launch.launches == start


@pytest.mark.skipif(DEVICE != "cpu", reason="uses the interpreter's one-program-at-a-time order")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the abandoned steps
def test_a_wait_that_times_out_raises(monkeypatch):
    # The stock interpreter runs program 0 to the end before program 1 starts, so program 0's
    # first wait can never be satisfied: the bounded poll must give up, the launch must end,
    # and the launcher must say what happened instead of hanging.
    monkeypatch.setattr(K, "_MAX_SPINS", 3)
    gates_x = torch.randn(3, 1, 160)
    weight_hh = torch.randn(160, 40) / 40
    assert plan_for(1, 40, torch.float32, "lstm").programs > 1
    with pytest.raises(RuntimeError, match=r"waited more than 3 polls.*P=5 programs"):
        K.lstm_forward(gates_x, None, None, weight_hh, None, False, False)


def test_plan_that_does_not_cover_the_problem_is_refused():
    plan = plan_for(18, 64, torch.float32, "lstm")._replace(groups=1)
    with pytest.raises(ValueError, match="does not cover"):
        K.lstm_forward(torch.randn(2, 18, 256, device=DEVICE), None, None,
                       torch.randn(256, 64, device=DEVICE), None, False, False, plan=plan)


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------
def test_supports_names_what_it_cannot_do():
    assert "float64" in K.supports(4, 40, torch.float64, DEVICE)
    assert K.supports(4, 40, torch.float32, DEVICE) is None
    assert K.supports(16, 1024, torch.float16, DEVICE, cell="gru") is None
    # Far too many rows for one wave of programs that each hold a weight slice.
    assert K.supports(100_000, 1024, torch.float16, DEVICE) is not None


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3, 8, 9, 16, 18, 64, 128])
@pytest.mark.parametrize("H", [1, 20, 40, 64, 256, 768, 1024])
def test_plans_are_valid_for_the_gpu(B, H, dtype, cell):
    plan, reason = K._plan_or_reason(B, H, dtype, 132, K._GATES[cell])
    if plan is None:
        assert reason
        return
    assert plan.programs == plan.groups * plan.slices <= 132
    assert plan.groups * plan.block_b >= B and plan.slices * plan.block_j >= H
    assert plan.block_k >= max(16, H)
    head = plan.block_k - plan.k_tail
    for size in (plan.block_b, plan.block_j, head):
        assert size & (size - 1) == 0  # tl.arange: powers of two
    # The hidden size's pieces: a head, and a tail only where it pads less than one power of
    # two would (never more than a power of two's padding either way).
    assert plan.block_k <= max(16, 1 << (H - 1).bit_length())
    if plan.k_tail:
        assert plan.k_tail >= 16 and plan.k_tail & (plan.k_tail - 1) == 0
        assert head >= plan.k_tail and head < H
    if plan.use_dot:
        # tl.dot needs M, N, K >= 16: M = block_b; the forward's N and the backward's K are
        # 4 * block_j for the LSTM and (padded) 16 or more for the GRU; the forward's K is a
        # split_k-th of the head (a split_k_tail-th of the tail).
        assert plan.block_b >= 16 and head // plan.split_k >= 16
        if plan.k_tail:
            assert plan.k_tail // plan.split_k_tail >= 16
    else:
        assert B <= 8 and plan.groups == 1
    assert plan.block_j >= 8
    if H == 40:
        assert plan.programs >= 2  # the CPU tests exercise the sync at this size


def test_plans_at_the_sizes_that_matter():
    # One row at H=1024 in fp16: 128 programs of 8 units, 64 KB of weight_hh each.
    plan = K.split_plan(1, 1024, torch.float16, 132)
    assert (plan.programs, plan.block_j, plan.use_dot) == (128, 8, False)
    # 16 rows: the same 128 programs on the tensor cores, the reduction split over 8 warps.
    plan = K.split_plan(16, 1024, torch.float16, 132)
    assert (plan.programs, plan.block_j, plan.block_b, plan.split_k, plan.use_dot) == (
        128, 8, 16, 8, True)
    # The GRU the same (its n block padded to the 16 rows tl.dot needs): 48 KB of weights.
    plan = K.split_plan(16, 1024, torch.float16, 132, "gru")
    assert (plan.programs, plan.block_j, plan.use_dot) == (128, 8, True)
    # H=768 is held as 512 + 256 columns, not padded to 1024.
    plan = K.split_plan(16, 768, torch.float16, 132)
    assert (plan.block_k, plan.k_tail, plan.split_k, plan.split_k_tail) == (768, 256, 8, 8)
    # 18 rows: two batch groups that sync only among themselves.
    plan = K.split_plan(18, 768, torch.float16, 132, "gru")
    assert (plan.groups, plan.slices) == (2, 48)


@pytest.mark.parametrize("B,H,dtype,cell", [
    (256, 512, torch.float16, "lstm"), (256, 512, torch.bfloat16, "lstm"),
    (256, 512, torch.float16, "gru"), (128, 512, torch.float32, "lstm"),
    (128, 512, torch.float32, "gru")])
def test_wider_batch_tiles_get_their_own_slice_width(B, H, dtype, cell):
    # 16-row tiles leave too few programs per group for a slice that fits in registers; a
    # 32-row tile halves the groups, so each group's slices are half as wide and fit.
    plan = K.split_plan(B, H, dtype, 132, cell)
    assert plan.block_b == 32
    assert plan.programs == plan.groups * plan.slices <= 132
    assert plan.slices * plan.block_j >= H
    assert K._GATES[cell] * plan.block_j * plan.block_k * dtype.itemsize <= K._WEIGHT_BYTES
