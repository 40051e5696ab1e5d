"""What torch.nn's RNNs do that lstmgru's modules do differently (README, "Known limits"):
each limit either raises a clear error, works, or is pinned here so that the README stays true.
"""
import warnings

import pytest
import torch

import lstmgru

MODULES = [
    lambda: lstmgru.LSTM(4, 8),
    lambda: lstmgru.GRU(4, 8, reset_after=False),
    lambda: lstmgru.LSTMCell(4, 8),
    lambda: lstmgru.GRUCell(4, 8, layer_norm=True),
]


# --- torch.jit.script: a clear error naming what works instead ---------------------------------
@pytest.mark.parametrize("make", MODULES)
def test_jit_script_raises_a_clear_error(make):
    module = make()
    name = f"lstmgru.{type(module).__name__}"
    with pytest.raises(RuntimeError, match=f"torch.jit.script cannot compile {name}:") as info, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module)
    message = str(info.value)
    for suggestion in ("torch.compile", "torch.export", "lstmgru.to_torch"):
        assert suggestion in message, message


def test_jit_script_raises_for_an_lstmgru_module_inside_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), lstmgru.GRUCell(4, 8))
    with pytest.raises(RuntimeError, match="cannot compile lstmgru.GRUCell"):
        torch.jit.script(model)


def test_jit_script_after_to_torch_reaches_torchscript():
    """to_torch gives torch.nn modules, which reach TorchScript itself (no lstmgru error)."""
    torch.manual_seed(0)
    module = lstmgru.LSTM(4, 8, num_layers=2)
    x = torch.randn(6, 3, 4)
    expected = module(x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own notice
        scripted = torch.jit.script(lstmgru.to_torch(module))
    # torch 2.13 scripts torch.nn.LSTM into a module without a forward (TorchScript is
    # deprecated there); where the scripted module runs, it computes the same
    if hasattr(scripted, "forward"):
        torch.testing.assert_close(scripted(x)[0], expected, rtol=0, atol=0)


# --- torch.jit.trace off the native path: the trace check passes, the trace is right -----------
TRACED = [
    ("GRU reset_after=False", lambda: lstmgru.GRU(4, 8, reset_after=False), "auto", 3),
    ("GRU layer_norm", lambda: lstmgru.GRU(4, 8, layer_norm=True), "auto", 3),
    ("LSTM 2-layer bidirectional, reference",
     lambda: lstmgru.LSTM(4, 8, num_layers=2, bidirectional=True), "reference", 3),
    ("LSTM layer_norm zoneout, eval", lambda: lstmgru.LSTM(4, 8, layer_norm=True,
                                                           zoneout=0.2).eval(), "auto", 3),
    ("GRUCell reset_after=False", lambda: lstmgru.GRUCell(4, 8, reset_after=False), "auto", 2),
    ("LSTMCell layer_norm", lambda: lstmgru.LSTMCell(4, 8, layer_norm=True), "auto", 2),
]


def _first(out):
    out = out[0] if isinstance(out, tuple) else out
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name,make,backend,rank", TRACED, ids=[t[0] for t in TRACED])
@pytest.mark.parametrize("traced_with_grad", [True, False], ids=["grad", "no_grad"])
def test_jit_trace_off_the_native_path(name, make, backend, rank, traced_with_grad):
    """The trace check (which re-traces under no_grad) passes, and the trace computes the module's
    outputs and gradients on a new shape, whichever grad mode it was traced in (a trace made
    under no_grad used to save nothing for the backward)."""
    torch.manual_seed(0)
    module = make()
    example = torch.randn(5, 3, 4) if rank == 3 else torch.randn(3, 4)
    fresh = torch.randn(7, 2, 4) if rank == 3 else torch.randn(2, 4)
    with lstmgru.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.set_grad_enabled(traced_with_grad):
            traced = torch.jit.trace(module, (example,))  # check_trace=True, the default
        x1 = fresh.clone().requires_grad_(True)
        x2 = fresh.clone().requires_grad_(True)
        got, want = _first(traced(x1)), _first(module(x2))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        weights = torch.randn_like(want)
        grads = torch.autograd.grad((got * weights).sum(), [x1, *module.parameters()])
        expected = torch.autograd.grad((want * weights).sum(), [x2, *module.parameters()])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


# --- quantize_dynamic: passes lstmgru's modules over; to_torch first quantizes them ------------
quantization = pytest.importorskip("torch.ao.quantization")


def _quantize_dynamic(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization's own notice
        return quantization.quantize_dynamic(model, {torch.nn.LSTM, torch.nn.Linear},
                                             dtype=torch.qint8)


def test_quantize_dynamic_leaves_lstmgru_modules_in_float():
    """quantize_dynamic looks modules up by exact type: lstmgru's pass unchanged (README)."""
    model = torch.nn.Sequential(lstmgru.LSTM(4, 8))
    quantized = _quantize_dynamic(model)
    assert type(quantized[0]) is lstmgru.LSTM
    assert quantized[0].weight_hh_l0.dtype == torch.float32


def test_quantize_dynamic_after_to_torch_quantizes():
    if "fbgemm" not in torch.backends.quantized.supported_engines and \
            "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("no quantized engine in this torch build")
    torch.manual_seed(0)
    model = torch.nn.Sequential(lstmgru.LSTM(4, 16))
    x = torch.randn(10, 3, 4)
    expected = model(x)[0]
    quantized = _quantize_dynamic(lstmgru.to_torch(model))
    assert type(quantized[0]) is torch.ao.nn.quantized.dynamic.LSTM
    # int8 weights: the outputs (in (-1, 1)) move by about the weights' rounding, not more
    torch.testing.assert_close(quantized[0](x)[0], expected, rtol=0, atol=0.05)


# --- isinstance: lstmgru's modules are not torch.nn's classes (README explains why) ------------
def test_isinstance_of_torch_nn_classes_is_false():
    assert not isinstance(lstmgru.LSTM(4, 8), torch.nn.LSTM)
    assert not isinstance(lstmgru.GRU(4, 8), torch.nn.GRU)
    assert not isinstance(lstmgru.LSTMCell(4, 8), torch.nn.LSTMCell)
    assert not isinstance(lstmgru.GRUCell(4, 8), torch.nn.GRUCell)
