"""CUDA-graph capture of both kernel families, forward and backward (skipped without CUDA).

A launch that reads a device value on the host (``.item()``) cannot be captured, and stops the
CPU from queueing ahead. Here the launchers of the tiled and the split family are captured in
``torch.cuda.graph`` and replayed on new inputs: the replay must give what an eager call gives
on the same inputs, bit for bit (both are the same kernels on the same data). The same calls
also run under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising
call. The modules are captured too (forward and backward through autograd).
"""
import contextlib

import pytest
import torch

import lstmgru

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

T, B, H = 12, 16, 256


def _kernels(family):
    from lstmgru._kernels import gru, lstm, split
    return (split, split) if family == "split" else (lstm, gru)


def _static_inputs(cell, dtype, seed):
    gates = 4 if cell == "lstm" else 3
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)
    return dict(gates_x=randn(T, B, gates * H), weight_hh=randn(gates * H, H, scale=H ** -0.5),
                h0=randn(B, H), c0=randn(B, H), grad_y=randn(T, B, H), grad_h_n=randn(B, H),
                grad_c_n=randn(B, H),
                lengths=torch.randint(1, T + 1, (B,), generator=gen, device="cuda"))


def _step(family, cell, inp):
    """One forward and backward of the recurrence through the family's launchers."""
    lstm_mod, gru_mod = _kernels(family)
    if cell == "lstm":
        y, h_n, c_n, saved = lstm_mod.lstm_forward(inp["gates_x"], inp["h0"], inp["c0"],
                                                   inp["weight_hh"], inp["lengths"], False, True)
        grads = lstm_mod.lstm_backward(inp["grad_y"], inp["grad_h_n"], inp["grad_c_n"], saved, y,
                                       inp["h0"], inp["c0"], inp["weight_hh"], inp["lengths"],
                                       False)
        return (y, h_n, c_n) + tuple(grads)
    reset_after = cell == "gru"
    y, h_n, saved = gru_mod.gru_forward(inp["gates_x"], inp["h0"], inp["weight_hh"], None,
                                        inp["lengths"], True, reset_after, True)
    grads = gru_mod.gru_backward(inp["grad_y"], inp["grad_h_n"], saved, y, inp["h0"],
                                 inp["weight_hh"], None, inp["lengths"], True, reset_after)
    return (y, h_n) + tuple(grads)


@contextlib.contextmanager
def _sync_debug_errors():
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


@pytest.mark.parametrize("family", ["tiled", "split"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_orig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_launchers_capture_and_replay(family, cell, dtype):
    from lstmgru._kernels import split
    static = _static_inputs(cell, dtype, seed=0)
    # Warm up (compiles the kernels) on a side stream, as torch.cuda.graph requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), _sync_debug_errors():
        _step(family, cell, static)
    torch.cuda.current_stream().wait_stream(side)
    split.check_errors(wait=True)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _step(family, cell, static)
    fresh = _static_inputs(cell, dtype, seed=1)
    for name, tensor in fresh.items():
        static[name].copy_(tensor)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [o.clone() for o in outputs]
    with _sync_debug_errors():
        eager = _step(family, cell, fresh)
    torch.cuda.synchronize()
    split.check_errors(wait=True)
    for r, e in zip(replayed, eager):
        assert torch.equal(r, e)
    # A second replay on the same inputs gives the same again (no state left in the graph).
    graph.replay()
    torch.cuda.synchronize()
    for o, r in zip(outputs, replayed):
        assert torch.equal(o, r)


@pytest.mark.parametrize("backend", ["triton-tiled", "triton-split"])
@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_modules_capture_forward_and_backward(backend, op):
    torch.manual_seed(0)
    model = getattr(lstmgru, op)(H, H, device="cuda")
    static_x = torch.randn(T, B, H, device="cuda")
    weights = torch.randn(T, B, H, device="cuda")

    def step():
        model.zero_grad(set_to_none=False)
        y, _ = model(static_x)
        (y * weights).sum().backward()
        return y

    with lstmgru.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = step()
        new_x = torch.randn(T, B, H, device="cuda")
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        replayed = [static_y.clone()] + [p.grad.clone() for p in model.parameters()]
        eager_y = step()
        eager = [eager_y] + [p.grad for p in model.parameters()]
    for r, e in zip(replayed, eager):
        assert torch.equal(r, e)
