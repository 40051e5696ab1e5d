"""Where torch's kernel cannot run a case's dtype on this machine, auto does not pick it.

The case that motivates it: under ``torch.autocast("cpu", dtype=torch.bfloat16)`` torch's LSTM
needs oneDNN's bf16 LSTM, which CPUs without AVX-512 bf16 lack ("could not create a primitive
descriptor for the LSTM forward propagation primitive"). The tests hold on either kind of CPU:
they ask torch's kernel directly what it does here, and check that the probe says the same and
that auto's result matches a float64 oracle whichever path ran."""
import logging
import subprocess
import sys

import pytest
import torch

import lstmgru
from lstmgru import backends
from lstmgru.cells import _native


def _torch_kernel_error(m, x):
    """What torch's own LSTM does with this call under bf16 autocast: None or its error."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x)[0].float().sum().backward()
    except RuntimeError as error:
        return str(error)
    return None


@pytest.fixture
def fresh():
    _native._probe.cache_clear()
    backends._select.cache_clear()
    backends._log_once.cache_clear()
    yield
    _native._probe.cache_clear()
    backends._select.cache_clear()


def test_bf16_lstm_under_cpu_autocast_matches_float64(fresh, caplog):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(6, 10, num_layers=2)
    ours = lstmgru.LSTM(6, 10, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, 3, 6)
    torch_error = _torch_kernel_error(torch.nn.LSTM(6, 10), x)

    with caplog.at_level(logging.INFO, logger="lstmgru"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = ours(x)
            chosen = backends.select(backends.Case("LSTM", "cpu", torch.bfloat16, 10, 3)).name
        (out.float().pow(2).sum() + h.float().sum() + c.float().sum()).backward()
    assert out.dtype == torch.bfloat16  # as torch.nn gives under autocast

    verdict = _native._probe("LSTM", "cpu", torch.bfloat16, True)
    # The probe says what torch's kernel really does here, and auto follows it.
    assert (verdict is None) == (torch_error is None), (verdict, torch_error)
    if torch_error is None:
        assert chosen == "native"
    else:
        assert chosen == "reference"
        assert torch_error.splitlines()[0] in verdict
        logged = [r.getMessage() for r in caplog.records if r.name == "lstmgru"]
        assert any("not on 'native'" in m and "autocast" in m for m in logged), logged

    # The float64 oracle: torch.nn in float64 with the same weights, the bf16-rounded weights
    # and input autocast computes from (so the tolerance covers bf16 arithmetic only).
    oracle = torch.nn.LSTM(6, 10, num_layers=2).double()
    oracle.load_state_dict({k: v.bfloat16().double() for k, v in ref.state_dict().items()})
    out64, (h64, c64) = oracle(x.bfloat16().double())
    (out64.pow(2).sum() + h64.sum() + c64.sum()).backward()
    # bf16 keeps 8 bits of mantissa (a rounding is up to 2^-9 = 2e-3 relative); over 7 steps
    # and 2 layers of bf16 products, 1e-2 on values of order 1 (gradients scaled to it) is a
    # few roundings (seen: 1.5e-3 on the outputs, 5.5e-3 on the scaled gradients).
    tol = dict(atol=1e-2, rtol=0)
    for got, want in [(out, out64), (h, h64), (c, c64)]:
        torch.testing.assert_close(got.double(), want, **tol)
    for (name, p), p64 in zip(ours.named_parameters(), oracle.parameters()):
        scale = p64.grad.abs().max().item()
        torch.testing.assert_close(p.grad.double() / scale, p64.grad / scale, **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_explicit_native_raises_torchs_own_error(fresh):
    x = torch.randn(4, 2, 3)
    torch_error = _torch_kernel_error(torch.nn.LSTM(3, 5), x)
    if torch_error is None:
        pytest.skip("torch's bf16 LSTM runs under autocast on this CPU")
    m = lstmgru.LSTM(3, 5)
    with lstmgru.use_backend("native"), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError) as raised:
            m(x)
    assert str(raised.value).splitlines()[0] == torch_error.splitlines()[0]


def test_the_probe_runs_once_and_draws_no_random_numbers(fresh):
    case = backends.Case("LSTM", "cpu", torch.bfloat16, 10, 3, autocast=True)
    state = torch.random.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = _native.probe(case)
        second = _native.probe(case)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first == second
    assert _native._probe.cache_info().misses == 1


def test_the_probe_answers_the_same_under_inference_mode_and_no_grad(fresh):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _native._probe("LSTM", "cpu", torch.bfloat16, True)
        _native._probe.cache_clear()
        with torch.inference_mode():
            assert _native._probe("LSTM", "cpu", torch.bfloat16, True) == expected
        _native._probe.cache_clear()
        with torch.no_grad():
            assert _native._probe("LSTM", "cpu", torch.bfloat16, True) == expected


def test_bf16_weights_without_autocast_are_probed_apart(fresh):
    """Without autocast, bf16 weights take another path in torch (it runs here where the
    autocast one may not): a separate verdict, and auto follows torch."""
    torch.manual_seed(1)
    m = torch.nn.LSTM(3, 5).bfloat16()
    x = torch.randn(4, 2, 3).bfloat16()
    try:
        m(x)[0].float().sum().backward()
        runs = True
    except RuntimeError:
        runs = False
    case = backends.Case("LSTM", "cpu", torch.bfloat16, 5, 2)
    assert (_native.probe(case) is None) == runs
    assert backends.select(case).name == ("native" if runs else "reference")


def test_no_probe_where_probing_is_not_safe_or_not_needed(fresh):
    for case in [backends.Case("LSTM", "cpu", torch.float32, 5, 2, autocast=True),
                 backends.Case("LSTM", "cpu", torch.float64, 5, 2),
                 backends.Case("LSTM", "cpu", torch.bfloat16, 5, 0, transform="torch.compile"),
                 backends.Case("LSTM", "cpu", torch.bfloat16, 5, 2, transform="torch.func"),
                 backends.Case("LSTM", "meta", torch.bfloat16, 5, 2),
                 backends.Case("LSTM", "cuda", torch.bfloat16, 5, 2)]:  # no CUDA here
        assert _native.probe(case) is None, case
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # a dispatch mode: the probe's tensors would not be real
        assert _native.probe(backends.Case("LSTM", "cpu", torch.bfloat16, 5, 2)) is None
    assert _native._probe.cache_info().currsize == 0


def test_import_runs_no_probe():
    code = ("import lstmgru; from lstmgru.cells import _native; "
            "print(_native._probe.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "0"
