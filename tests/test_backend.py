"""The backend contract: names, environment variable read at call time, context manager,
and an explicit "triton" that never falls back silently."""
import pytest
import torch

import lstmgru
from lstmgru import _dispatch


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    monkeypatch.setattr(_dispatch, "_explicit_backend", None)
    monkeypatch.delenv("LSTMGRU_BACKEND", raising=False)
    yield


def test_default_is_auto():
    assert lstmgru.get_backend() == "auto"


@pytest.mark.parametrize("name", ["auto", "reference", "triton"])
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


def test_auto_on_cpu_never_uses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.choose(torch.device("cpu"), None) == "reference"
