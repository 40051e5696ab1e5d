"""Fused LSTM kernels (lstmgru._kernels.lstm) against a naive fp64 step loop with autograd.

Without CUDA these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU
tensors, with the block shapes the launchers pick for the GPU; with CUDA they run on the GPU.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from lstmgru._kernels import _launch as kernel_launch  # noqa: E402  (after the skip: needs triton)
from lstmgru._kernels import lstm as K  # noqa: E402

pytestmark = pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_lstm(gates_x, h0, c0, weight_hh, lengths, reverse):
    """Plain step loop, written independently of the kernels; same contract as lstm_forward.

    Returns y, h_n, c_n and the gate activations (0 at inactive positions, like saved[0])."""
    T, B, G = gates_x.shape
    H = G // 4
    h, c = h0, c0
    ys = [None] * T
    acts = [None] * T
    for s in range(T):
        t = T - 1 - s if reverse else s
        a = gates_x[t] + h @ weight_hh.T
        i, f, g, o = a.split(H, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        if lengths is None:
            active = torch.ones(B, 1, dtype=torch.bool)
        else:
            active = (t < lengths)[:, None]
        c = torch.where(active, c_new, c)
        h = torch.where(active, h_new, h)
        ys[t] = torch.where(active, h_new, torch.zeros_like(h_new))
        acts[t] = torch.where(active, torch.cat([i, f, g, o], dim=1), torch.zeros_like(a))
    return torch.stack(ys), h, c, torch.stack(acts)


def h_prev_of(y, h0, lengths, reverse):
    """h_{t-1} seen by each active step, rebuilt from y and h0 as the caller does for grad(W_hh)."""
    T, B, _ = y.shape
    lens = torch.full((B,), T) if lengths is None else lengths
    h_prev = torch.empty_like(y)
    for t in range(T):
        if reverse:
            follows = y[t + 1] if t + 1 < T else h0
            h_prev[t] = torch.where((t + 1 < lens)[:, None], follows, h0)
        else:
            h_prev[t] = y[t - 1] if t > 0 else h0
    return h_prev


def make_inputs(T, B, H, dtype, with_state, lengths, seed, lengths_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

    gates_x = randn(T, B, 4 * H)
    weight_hh = randn(4 * H, H, scale=1.0 / math.sqrt(H))
    h0 = randn(B, H) if with_state else None
    c0 = randn(B, H) if with_state else None
    lens = None if lengths is None else torch.tensor(lengths, dtype=lengths_dtype, device=DEVICE)
    return gates_x, h0, c0, weight_hh, lens


def check_case(T, B, H, dtype, reverse, with_state, lengths, tol, seed=0,
               lengths_dtype=torch.int64):
    gates_x, h0, c0, weight_hh, lens = make_inputs(T, B, H, dtype, with_state, lengths, seed,
                                                   lengths_dtype)
    y, h_n, c_n, saved = K.lstm_forward(gates_x, h0, c0, weight_hh, lens, reverse, True)

    # The reference starts from the very same (already rounded) inputs, in fp64.
    gx64 = gates_x.cpu().double().requires_grad_()
    w64 = weight_hh.cpu().double().requires_grad_()
    zeros = torch.zeros(B, H, dtype=torch.float64)
    h064 = (h0.cpu().double() if with_state else zeros.clone()).requires_grad_()
    c064 = (c0.cpu().double() if with_state else zeros.clone()).requires_grad_()
    lens_cpu = None if lens is None else lens.cpu()
    y64, hn64, cn64, act64 = reference_lstm(gx64, h064, c064, w64, lens_cpu, reverse)

    # A loss that weights every output element differently; the weights arrive in the outputs'
    # dtype, as autograd would hand them to the backward.
    gen = torch.Generator().manual_seed(seed + 1)
    gy, ghn, gcn = (torch.randn(x.shape, generator=gen).to(dtype) for x in (y64, hn64, cn64))
    loss = (y64 * gy.double()).sum() + (hn64 * ghn.double()).sum() + (cn64 * gcn.double()).sum()
    loss.backward()

    dgx, dh0, dc0 = K.lstm_backward(gy.to(DEVICE), ghn.to(DEVICE), gcn.to(DEVICE), saved, y, h0, c0,
                                    weight_hh, lens, reverse)
    h0_used = h0.cpu().double() if with_state else zeros
    h_prev = h_prev_of(y.cpu().double(), h0_used, lens_cpu, reverse)
    dw = torch.einsum("tbg,tbh->gh", dgx.cpu().double(), h_prev)

    def close(name, got, want):
        torch.testing.assert_close(got.cpu().double(), want.detach(), atol=tol, rtol=tol,
                                   msg=lambda m: f"{name}: {m}")

    close("y", y, y64)
    close("h_n", h_n, hn64)
    close("c_n", c_n, cn64)
    close("saved[0]", saved[0], act64)
    close("grad gates_x", dgx, gx64.grad)
    close("grad h0", dh0, h064.grad)
    close("grad c0", dc0, c064.grad)
    close("grad weight_hh", dw, w64.grad)
    if lens is not None:
        inactive = torch.arange(T)[:, None] >= lens_cpu[None, :]
        assert (y.cpu()[inactive] == 0).all()
        assert (dgx.cpu()[inactive] == 0).all()


# fp32: the kernels compute in fp32 with IEEE products, so only fp32 rounding separates them
# from the fp64 reference.
FP32 = 1e-5
CASES = [
    pytest.param(dict(T=5, B=3, H=20, reverse=False, with_state=True, lengths=None), id="H20"),
    pytest.param(dict(T=4, B=1, H=50, reverse=True, with_state=False, lengths=None),
                 id="H50-batch1-reverse-nostate"),
    pytest.param(dict(T=3, B=18, H=80, reverse=False, with_state=True, lengths=None),
                 id="H80-chunks-batch18"),
    pytest.param(dict(T=6, B=5, H=20, reverse=False, with_state=True, lengths=[4, 6, 1, 0, 2]),
                 id="lengths"),
    pytest.param(dict(T=6, B=5, H=20, reverse=True, with_state=True, lengths=[4, 6, 1, 0, 2],
                      lengths_dtype=torch.int32), id="lengths-reverse-int32"),
    pytest.param(dict(T=1, B=2, H=16, reverse=False, with_state=True, lengths=None), id="T1"),
    pytest.param(dict(T=3, B=2, H=1, reverse=True, with_state=True, lengths=None), id="H1"),
]


@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_fp64_reference(case):
    check_case(dtype=torch.float32, tol=FP32, **case)


# fp16: h is rounded to fp16 before each recurrent product and the gate gradients before the
# backward product (tensor-core inputs, as cuDNN does), and y / h_n / c_n are returned in fp16
# (relative step 2^-11 ~ 5e-4); those roundings compound over the steps.
FP16 = 2e-3


@pytest.mark.parametrize("case", [
    pytest.param(dict(T=4, B=18, H=50, reverse=True, with_state=True, lengths=None), id="H50"),
    pytest.param(dict(T=5, B=5, H=80, reverse=False, with_state=False,
                      lengths=[5, 2, 3, 1, 4]), id="H80-lengths"),
])
def test_fp16_matches_fp64_reference(case):
    check_case(dtype=torch.float16, tol=FP16, **case)


@pytest.mark.skipif(DEVICE != "cuda", reason="triton 3.9's interpreter gets bf16 tl.dot wrong")
def test_bf16_matches_fp64_reference():
    # bf16 has 3 fewer mantissa bits than fp16 (relative step 2^-8 ~ 4e-3): 8x the fp16 tolerance.
    check_case(T=5, B=18, H=80, dtype=torch.bfloat16, reverse=False, with_state=True,
               lengths=[5, 2, 3, 1, 4, 5, 5, 2, 3, 1, 4, 5, 5, 2, 3, 1, 4, 5], tol=8 * FP16)


def test_one_launch_per_forward_and_per_backward():
    start = kernel_launch.launches
    gates_x, h0, c0, weight_hh, lens = make_inputs(7, 18, 20, torch.float32, True, None, seed=3)
    y, h_n, c_n, saved = K.lstm_forward(gates_x, h0, c0, weight_hh, lens, False, True)
    assert kernel_launch.launches - start == 1
    K.lstm_backward(torch.randn_like(y), None, None, saved, y, h0, c0, weight_hh, lens, False)
    assert kernel_launch.launches - start == 2


def test_inference_saves_nothing_and_matches_training():
    gates_x, h0, c0, weight_hh, lens = make_inputs(4, 3, 20, torch.float32, True, [4, 1, 3], seed=4)
    train = K.lstm_forward(gates_x, h0, c0, weight_hh, lens, True, True)
    infer = K.lstm_forward(gates_x, h0, c0, weight_hh, lens, True, False)
    assert infer[3] is None
    for a, b in zip(train[:3], infer[:3]):
        assert torch.equal(a, b)
    # Bit-identical from run to run: no atomics, fixed reduction order.
    assert torch.equal(K.lstm_forward(gates_x, h0, c0, weight_hh, lens, True, False)[0], infer[0])


def test_missing_gradients_are_zeros():
    gates_x, h0, c0, weight_hh, lens = make_inputs(3, 2, 20, torch.float32, True, None, seed=5)
    y, h_n, c_n, saved = K.lstm_forward(gates_x, h0, c0, weight_hh, lens, False, True)
    gy = torch.randn_like(y)
    none = K.lstm_backward(gy, None, None, saved, y, h0, c0, weight_hh, lens, False)
    zero = K.lstm_backward(gy, torch.zeros_like(h_n), torch.zeros_like(c_n), saved, y, h0, c0,
                           weight_hh, lens, False)
    for a, b in zip(none, zero):
        assert torch.equal(a, b)
    nothing = K.lstm_backward(None, None, None, saved, y, h0, c0, weight_hh, lens, False)
    assert all((g == 0).all() for g in nothing)


def test_expanded_gradients_are_accepted():
    gates_x, h0, c0, weight_hh, lens = make_inputs(3, 2, 20, torch.float32, True, None, seed=7)
    y, h_n, c_n, saved = K.lstm_forward(gates_x, h0, c0, weight_hh, lens, False, True)
    ones = torch.ones((), device=DEVICE)  # what y.sum().backward() hands to the backward
    expanded = K.lstm_backward(ones.expand_as(y), ones.expand_as(h_n), None, saved, y, h0, c0,
                               weight_hh, lens, False)
    dense = K.lstm_backward(torch.ones_like(y), torch.ones_like(h_n), None, saved, y, h0, c0,
                            weight_hh, lens, False)
    for a, b in zip(expanded, dense):
        assert torch.equal(a, b)


def test_wide_batch_tile():
    # Enough rows that the launcher widens the batch tile beyond 16 (one wave of programs).
    B = 16 * 128 + 1
    assert K.lstm_blocks(B, 16, torch.float32).block_b == 32
    check_case(T=2, B=B, H=16, dtype=torch.float32, reverse=False, with_state=True,
               lengths=None, tol=FP32)


def test_empty_sequence_returns_initial_state():
    gates_x, h0, c0, weight_hh, lens = make_inputs(0, 3, 20, torch.float32, True, None, seed=8)
    y, h_n, c_n, saved = K.lstm_forward(gates_x, h0, c0, weight_hh, lens, False, True)
    assert y.shape == (0, 3, 20) and torch.equal(h_n, h0) and torch.equal(c_n, c0)
    ghn, gcn = torch.randn_like(h_n), torch.randn_like(c_n)
    dgx, dh0, dc0 = K.lstm_backward(None, ghn, gcn, saved, y, h0, c0, weight_hh, lens, False)
    assert dgx.shape == (0, 3, 80) and torch.equal(dh0, ghn) and torch.equal(dc0, gcn)


def test_empty_batch_launches_nothing():
    start = kernel_launch.launches
    gates_x, h0, c0, weight_hh, lens = make_inputs(3, 0, 20, torch.float32, True, None, seed=6)
    y, h_n, c_n, saved = K.lstm_forward(gates_x, h0, c0, weight_hh, lens, False, True)
    assert y.shape == (3, 0, 20) and h_n.shape == (0, 20) and c_n.shape == (0, 20)
    grads = K.lstm_backward(torch.empty_like(y), None, None, saved, y, h0, c0, weight_hh, lens,
                            False)
    assert [g.shape for g in grads] == [(3, 0, 80), (0, 20), (0, 20)]
    assert kernel_launch.launches == start


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 16, 18, 2048, 2049, 10**5])
@pytest.mark.parametrize("hidden", [1, 20, 64, 80, 1024, 4096])
def test_block_shapes_are_valid_for_the_gpu(batch, hidden, dtype):
    blocks = K.lstm_blocks(batch, hidden, dtype)
    for size in (blocks.block_b, blocks.block_h, blocks.block_k):
        assert size >= 16 and size & (size - 1) == 0  # tl.dot: dims >= 16, powers of two
    assert blocks.num_warps in (4, 8) and blocks.num_stages >= 1
