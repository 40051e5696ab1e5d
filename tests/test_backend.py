"""The backend contract: names from the registry, environment variable read at call time,
context manager, context-local state, auto's order, and explicit names that never fall back."""
import contextvars
import threading

import pytest
import torch

import lstmgru
from lstmgru import backends


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    token = backends._choice.set(None)
    monkeypatch.delenv("LSTMGRU_BACKEND", raising=False)
    yield
    backends._choice.reset(token)


def test_default_is_auto():
    assert lstmgru.get_backend() == "auto"


def test_names_come_from_the_registry():
    assert backends.names() == ("auto", "native", "reference", "triton", "triton-split",
                                "triton-tiled")


@pytest.mark.parametrize("name", ["auto", "reference", "native", "triton"])
def test_set_and_get(name):
    lstmgru.set_backend(name)
    assert lstmgru.get_backend() == name


def test_unknown_name_raises_value_error():
    with pytest.raises(ValueError, match="cuda"):
        lstmgru.set_backend("cuda")
    with pytest.raises(ValueError):
        with lstmgru.use_backend("cudnn"):
            pass


def test_environment_variable_read_at_call_time(monkeypatch):
    monkeypatch.setenv("LSTMGRU_BACKEND", "reference")
    assert lstmgru.get_backend() == "reference"
    monkeypatch.setenv("LSTMGRU_BACKEND", "triton")
    assert lstmgru.get_backend() == "triton"
    monkeypatch.setenv("LSTMGRU_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LSTMGRU_BACKEND"):
        lstmgru.get_backend()


def test_use_backend_restores(monkeypatch):
    lstmgru.set_backend("reference")
    with lstmgru.use_backend("triton"):
        assert lstmgru.get_backend() == "triton"
        with lstmgru.use_backend("auto"):
            assert lstmgru.get_backend() == "auto"
        assert lstmgru.get_backend() == "triton"
    assert lstmgru.get_backend() == "reference"
    with pytest.raises(KeyError):
        with lstmgru.use_backend("triton"):
            raise KeyError("boom")
    assert lstmgru.get_backend() == "reference"


@pytest.mark.parametrize("op", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_explicit_triton_on_cpu_without_interpreter_raises(op, monkeypatch):
    # Import the kernels first: @triton.jit decides on the interpreter when a kernel is
    # defined, so kernels first imported here under "0" would stay compiled-only for the
    # tests that follow.
    pytest.importorskip("lstmgru._kernels.lstm")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = getattr(lstmgru, op)(3, 4)
    x = torch.randn(2, 3) if "Cell" in op else torch.randn(5, 2, 3)
    with lstmgru.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            m(x)
    m(x)  # auto runs the reference on the CPU


def test_explicit_triton_with_projection_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    m = lstmgru.LSTM(3, 4, proj_size=2)
    with lstmgru.use_backend("triton"):
        with pytest.raises(RuntimeError, match="proj_size"):
            m(torch.randn(5, 2, 3))


def test_explicit_triton_float64_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    m = lstmgru.GRU(3, 4).double()
    with lstmgru.use_backend("triton"):
        with pytest.raises(RuntimeError, match="float64"):
            m(torch.randn(5, 2, 3, dtype=torch.float64))


def _case(cell="LSTM", device="cpu", dtype=torch.float32, **kw):
    return backends.Case(cell, device, dtype, hidden_size=8, batch=2, **kw)


def test_auto_on_cpu_never_uses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for cell in ("LSTM", "GRU", "LSTMCell", "GRUCell"):
        assert backends.select(_case(cell)).name == "native"


def test_auto_order_per_case():
    assert backends.select(_case("GRU", reset_after=False)).name == "reference"
    assert backends.select(_case("GRUCell", reset_after=False)).name == "reference"
    assert backends.select(_case("LSTM", variants=("zoneout",))).name == "reference"
    assert backends.select(_case("LSTM", proj_size=3)).name == "native"
    assert backends.select(_case("LSTM", dtype=torch.float64)).name == "native"
    # On CUDA cuDNN comes first until a calibration entry says otherwise (test_calibration.py);
    # the kernels take what it cannot.
    assert backends.AUTO_ORDER["cuda"] == ("native", "triton", "reference")


@pytest.mark.parametrize("op", ["GRU", "GRUCell"])
def test_explicit_native_original_gru_raises(op):
    m = getattr(lstmgru, op)(3, 4, reset_after=False)
    x = torch.randn(2, 3) if "Cell" in op else torch.randn(5, 2, 3)
    with lstmgru.use_backend("native"):
        with pytest.raises(RuntimeError, match="reset_after=False"):
            m(x)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_auto_on_cpu_is_torch_bit_for_bit(op):
    """Where torch computes the same function, auto runs torch's own kernel: equal bits,
    forward and backward, including inter-layer dropout under the same seed."""
    torch.manual_seed(5)
    kw = {} if "Cell" in op else dict(num_layers=2, bidirectional=True, dropout=0.3)
    ref = getattr(torch.nn, op)(3, 6, **kw)
    ours = getattr(lstmgru, op)(3, 6, **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3) if "Cell" in op else torch.randn(7, 2, 3)
    results = []
    for m in (ours, ref):
        torch.manual_seed(11)
        out = m(x)
        out = out[0] if isinstance(out, tuple) else out
        out.pow(2).sum().backward()
        results.append([out] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_backend_is_context_local():
    """A thread starts from the default, whatever another thread chose."""
    lstmgru.set_backend("reference")
    seen = {}
    thread = threading.Thread(target=lambda: seen.setdefault("name", lstmgru.get_backend()))
    thread.start()
    thread.join()
    assert seen["name"] == "auto"
    assert lstmgru.get_backend() == "reference"
    assert contextvars.copy_context().run(lstmgru.get_backend) == "reference"
