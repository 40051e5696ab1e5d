"""The kernel families behind the registry, through the modules (Triton's interpreter on CPU
tensors): "triton-split" runs the split-hidden persistent kernels, exactly one launch per
layer-direction forward and one backward, and matches torch.nn; "triton-tiled" names the
batch-tiled family; "triton" picks one per call from the cost model."""
import pytest
import torch

pytest.importorskip("triton")

import lstmgru  # noqa: E402
from _parallel_interpreter import parallel_programs  # noqa: E402
from _parity import compare_runs, run_rnn  # noqa: E402
from lstmgru._kernels import _launch, cost_model  # noqa: E402

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def _interpreter_only():
    if not lstmgru._triton.interpreter_enabled():
        pytest.skip("runs the kernels in Triton's interpreter (TRITON_INTERPRET=1)")


@pytest.mark.parametrize("op,kw", [("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False})])
@pytest.mark.parametrize("packed", [False, True])
def test_split_family_through_the_module(op, kw, packed):
    torch.manual_seed(41)
    ours = getattr(lstmgru, op)(5, 40, bidirectional=True, **kw)
    # torch.nn has no reset_after=False: the fp64 reference path is the oracle there.
    if kw:
        oracle = getattr(lstmgru, op)(5, 40, bidirectional=True, dtype=torch.float64, **kw)
    else:
        oracle = getattr(torch.nn, op)(5, 40, bidirectional=True, dtype=torch.float64)
    oracle.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(6, 3, 5)
    if packed:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([6, 2, 4]),
                                                    enforce_sorted=False)
    with lstmgru.use_backend("triton-split"), parallel_programs(timeout_s=300) as stats:
        before = _launch.launches
        got = run_rnn(ours, x, None)
        assert _launch.launches - before == 4  # (forward + backward) x 2 directions
    assert stats.max_concurrent >= 2, "the split kernels ran without cross-program sync"
    x64 = x if not packed else x._replace(data=x.data.double())
    with lstmgru.use_backend("reference"):
        want = run_rnn(oracle, x.double() if not packed else x64, None)
    compare_runs({k: v.double() for k, v in got.items()}, want, atol=2e-5)


def test_split_family_refuses_float64_and_names_why():
    m = lstmgru.LSTM(5, 40).double()
    with lstmgru.use_backend("triton-split"), pytest.raises(RuntimeError, match="float64"):
        m(torch.randn(3, 2, 5, dtype=torch.float64))


@pytest.mark.parametrize("name", ["triton-tiled", "triton"])
def test_other_family_names_run_the_kernels(name):
    """On CPU tensors (the interpreter) "triton" is the tiled family: the stock interpreter
    cannot run the split family's co-resident programs."""
    torch.manual_seed(42)
    m = lstmgru.GRU(5, 40)
    x = torch.randn(4, 2, 5)
    with lstmgru.use_backend(name), parallel_programs(timeout_s=300):
        before = _launch.launches
        y, _ = m(x)
        assert _launch.launches - before == 1
    with lstmgru.use_backend("reference"):
        torch.testing.assert_close(y, m(x)[0], atol=2e-5, rtol=0)


def test_cost_model_prefers_split_where_the_tiled_family_rereads_weights():
    """PREDICTIONS (uncalibrated constants): at cuDNN's published point (B=16, H=768, fp16) the
    tiled family re-reads 4.7 MB of weights per step; the split family keeps them in registers."""
    half = torch.float16
    assert cost_model.choose("lstm", 16, 768, half, 132) == "split"
    assert cost_model.tiled_step_us("lstm", 16, 768, half, 132) > \
        10 * cost_model.split_step_us("lstm", 16, 768, half, 132)
    assert cost_model.choose("gru", 1, 40, torch.float32, 132) == "tiled"


@pytest.mark.parametrize("name,op,kw", [("triton-tiled", "LSTM", {}),
                                        ("triton-split", "GRU", {"reset_after": False})])
def test_second_order_gradients_on_the_kernels(name, op, kw):
    """A gradient penalty through the kernels: the backward under create_graph recomputes
    through the spec, so the penalty's gradients equal the reference's (fp32 rounding)."""
    torch.manual_seed(43)
    m = getattr(lstmgru, op)(5, 20, **kw)
    x = torch.randn(3, 2, 5)
    results = []
    for backend in (name, "reference"):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with lstmgru.use_backend(backend), parallel_programs(timeout_s=300):
            out, _ = m(xi)
            (gx,) = torch.autograd.grad((out * out).sum(), xi, create_graph=True)
            (gx * gx).sum().backward()
        results.append([gx.detach(), xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
