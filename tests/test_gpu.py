"""GPU checks of the Triton kernels (skipped without CUDA): against an fp64 reference and
against cuDNN, long sequences, and run-to-run determinism.

fp32 runs with IEEE products (``_ieee_fp32_products``, and conftest's session default): torch's default lets cuDNN's RNN, and so
the kernels, use TF32, whose ~1e-3 errors would swamp fp32 tolerances. One test runs TF32 on
purpose, with its own tolerance."""
import pytest
import torch

import lstmgru
from _precision import fp32_precision
from lstmgru._kernels import _launch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _ieee_fp32_products():
    with fp32_precision("ieee"):
        yield


def _models(op, I, H, dtype, **kwargs):
    ours = getattr(lstmgru, op)(I, H, device="cuda", dtype=dtype, **kwargs)
    cudnn = getattr(torch.nn, op)(I, H, device="cuda", dtype=dtype, **kwargs)
    exact = getattr(torch.nn, op)(I, H, device="cuda", dtype=torch.float64, **kwargs)
    cudnn.load_state_dict(ours.state_dict())
    exact.load_state_dict(ours.state_dict())
    return ours, cudnn, exact


def _forward_backward(module, x):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y, _ = module(x)
    weights = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=torch.float64)
    (y.double() * weights.view_as(y)).sum().backward()
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return y.detach(), grads


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("B,H", [(1, 128), (16, 256), (64, 1024), (5, 100)])
def test_fp32_tight(op, B, H):
    torch.manual_seed(B + H)
    ours, cudnn, exact = _models(op, H, H, torch.float32)
    x = torch.randn(64, B, H, device="cuda")
    with lstmgru.use_backend("triton"):
        before = _launch.launches
        y, grads = _forward_backward(ours, x)
        assert _launch.launches - before == 2
    y64, grads64 = _forward_backward(exact, x.double())
    assert _err(y, y64) < 1e-4
    for g, g64 in zip(grads, grads64):
        assert _err(g, g64) < 1e-3 * max(1.0, g64.abs().max().item())


# TF32 keeps 10 of fp32's 23 mantissa bits: every operand of the recurrent product is rounded
# by up to 2^-11 (4.9e-4) relative. Summed over H = 256 terms of random sign and carried through
# 64 steps, that gives output errors around 1e-3 (a review reported about 8e-4 for such tests).
# 4e-3 is four times that, still far below what a wrong index or a race gives (order 1e-1).
# Gradients (relative to their largest value) pass through the same rounding once more.
TF32_OUT_TOL, TF32_GRAD_TOL = 4e-3, 1e-2


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8,
                    reason="TF32 needs an Ampere or newer GPU")
@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_fp32_with_tf32_products(op):
    """Allowing TF32 through torch's API reaches the kernels: the products change, within
    TF32's own tolerance of float64."""
    torch.manual_seed(8)
    ours, _, exact = _models(op, 256, 256, torch.float32)
    x = torch.randn(64, 16, 256, device="cuda")
    with lstmgru.use_backend("triton"):
        y_ieee, _ = _forward_backward(ours, x)
        with fp32_precision("tf32"):
            y, grads = _forward_backward(ours, x)
    y64, grads64 = _forward_backward(exact, x.double())
    assert not torch.equal(y, y_ieee), "TF32 was allowed but the kernels' products did not change"
    assert _err(y, y64) < TF32_OUT_TOL
    for g, g64 in zip(grads, grads64):
        assert _err(g, g64) < TF32_GRAD_TOL * max(1.0, g64.abs().max().item())


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H", [(16, 256), (64, 768)])
def test_half_no_worse_than_twice_cudnn(op, dtype, B, H):
    torch.manual_seed(H)
    ours, cudnn, exact = _models(op, H, H, dtype)
    x = torch.randn(256, B, H, device="cuda")
    with lstmgru.use_backend("triton"):
        y, grads = _forward_backward(ours, x.to(dtype))
    try:
        y_c, grads_c = _forward_backward(cudnn, x.to(dtype))
    except RuntimeError as error:  # bf16 RNNs need cuDNN >= 9.13 (DESIGN.md section 4)
        pytest.skip(f"torch.nn.{op} cannot run in {dtype} on this GPU: {error}")
    y64, grads64 = _forward_backward(exact, x.double())
    assert _err(y, y64) <= 2 * _err(y_c, y64) + 1e-3
    for g, g_c, g64 in zip(grads, grads_c, grads64):
        assert _err(g, g64) <= 2 * _err(g_c, g64) + 1e-3 * g64.abs().max().item()


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_long_sequence(op):
    torch.manual_seed(4096)
    ours, cudnn, exact = _models(op, 64, 128, torch.float32)
    x = torch.randn(4096, 8, 64, device="cuda")
    with lstmgru.use_backend("triton"):
        y, grads = _forward_backward(ours, x)
    y64, grads64 = _forward_backward(exact, x.double())
    assert _err(y, y64) < 1e-3
    for g, g64 in zip(grads, grads64):
        assert _err(g, g64) < 1e-2 * max(1.0, g64.abs().max().item())


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_deterministic(op):
    torch.manual_seed(1)
    ours, _, _ = _models(op, 256, 256, torch.bfloat16, num_layers=2, bidirectional=True)
    x = torch.randn(128, 32, 256, device="cuda", dtype=torch.bfloat16)
    with lstmgru.use_backend("triton"):
        y1, g1 = _forward_backward(ours, x)
        y2, g2 = _forward_backward(ours, x)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_auto_on_cuda_runs_cudnn_until_measured_and_the_kernels_for_what_only_they_compute(
        monkeypatch, tmp_path):
    # Without a calibration entry for this GPU (lstmgru.calibration), auto runs cuDNN.
    from lstmgru import backends, calibration

    monkeypatch.setenv(calibration.CACHE_ENV, str(tmp_path))  # no user table
    calibration.reload()
    backends._select.cache_clear()
    x = torch.randn(10, 4, 32, device="cuda")
    for kw, launches in (({}, 0), ({"reset_after": False}, 1)):
        m = lstmgru.GRU(32, 64, device="cuda", **kw)
        before = _launch.launches
        with lstmgru.use_backend("auto"), torch.no_grad():
            m(x)
        assert _launch.launches - before == launches, kw


@pytest.mark.parametrize("op,kw", [("LSTM", {}), ("LSTM", {"layer_norm": True}), ("GRU", {}),
                                   ("GRU", {"layer_norm": True}), ("GRU", {"reset_after": False})])
def test_variants_on_the_kernels_match_the_reference(op, kw):
    """zoneout, recurrent_dropout, weight_drop and resets (and layer_norm) on the tiled kernels
    against the reference on the same device (same seed: the module draws the same masks for
    both)."""
    torch.manual_seed(5)
    m = getattr(lstmgru, op)(48, 96, num_layers=2, bidirectional=True, device="cuda",
                             zoneout=0.2, recurrent_dropout=0.3, weight_drop=0.3, **kw)
    x = torch.randn(40, 6, 48, device="cuda")
    reset = torch.rand(40, 6, device="cuda") < 0.1
    results = []
    for backend in ("triton", "reference"):
        torch.manual_seed(11)
        xi = x.clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        with lstmgru.use_backend(backend):
            before = _launch.launches
            y, _ = m(xi, reset=reset)
            (y * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
            launched = _launch.launches - before
        assert launched == (8 if backend == "triton" else 0)
        results.append([y.detach(), xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert _err(a, b) < 1e-3 * max(1.0, b.abs().max().item())


def test_auto_runs_the_variants_on_the_kernels():
    x = torch.randn(10, 4, 32, device="cuda")
    for cell, kw in (("LSTM", {"layer_norm": True}), ("GRU", {"layer_norm": True}),
                     ("LSTM", {"zoneout": 0.1})):
        m = getattr(lstmgru, cell)(32, 64, device="cuda", **kw).eval()
        before = _launch.launches
        with torch.no_grad():
            m(x)
        assert _launch.launches - before == 1, (cell, kw)
