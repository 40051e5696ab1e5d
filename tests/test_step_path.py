"""Small calls: resets that all fall at t=0 run where a plain call runs (torch's kernel on the
CPU) with the reset rows' initial state zeroed. Checked against the reference recurrence
applying the resets itself (the fold turned off), forward and first gradients, every layout,
reverse and multi-layer; and bit for bit against torch.nn given the zeroed state."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstmgru
from lstmgru import backends, modules

from _parity import weighted_loss

TOL = 1e-12  # fp64: torch's kernel and the reference round differently, by far less


def _no_fold(monkeypatch):
    """The reference's own reset semantics: the fold turned off."""
    monkeypatch.setattr(modules._RNNBase, "_fold_resets", lambda self, i, h, r: (h, r))
    monkeypatch.setattr(modules._CellBase, "_fold_resets", lambda self, i, h, r: (h, r))


def _implementation_names(monkeypatch):
    chosen = []
    original = backends.select

    def noting(case):
        implementation = original(case)
        chosen.append(implementation.name)
        return implementation

    monkeypatch.setattr(backends, "select", noting)
    return chosen


def _run(module, x, hx, reset):
    """Outputs, and the gradients of x, hx and every parameter."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    states = [s.detach().clone().requires_grad_() for s in hx]
    given = tuple(states) if len(states) == 2 else states[0]
    out = module(x, given, reset=reset)
    outs = list(out[:1]) + (list(out[1]) if isinstance(out[1], tuple) else [out[1]]) \
        if isinstance(out, tuple) and not isinstance(module, nn.LSTMCell) else \
        (list(out) if isinstance(out, tuple) else [out])
    weighted_loss(outs).backward()
    grads = [x.grad] + [s.grad for s in states] + [p.grad for p in module.parameters()]
    return [o.detach() for o in outs], grads


def _assert_same(got, want, atol):
    for i, (a, b) in enumerate(zip(got[0], want[0])):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=f"output {i}")
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=f"gradient {i}")


def _layer_case(cell, steps, batch_first, bidirectional, num_layers, batched=True, seed=0):
    torch.manual_seed(seed)
    module = getattr(lstmgru, cell)(3, 4, num_layers=num_layers, bidirectional=bidirectional,
                                    batch_first=batch_first, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    B, D = 5, 2 if bidirectional else 1
    x = torch.randn(*((B, steps) if batch_first else (steps, B)), 3, generator=g,
                    dtype=torch.float64)
    hx = [torch.randn(num_layers * D, B, 4, generator=g, dtype=torch.float64)
          for _ in range(2 if cell == "LSTM" else 1)]
    reset = torch.zeros(steps, B, dtype=torch.bool)
    reset[0] = torch.tensor([True, False, True, True, False])
    if batch_first:
        reset = reset.t().contiguous()
    if not batched:
        x, hx, reset = x[:, 0] if batch_first else x[:, 0], [h[:, 0] for h in hx], \
            (reset[0] if batch_first else reset[:, 0])
    return module, x, hx, reset


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("steps,batch_first,bidirectional,num_layers", [
    (1, False, False, 1), (1, True, True, 2), (6, False, True, 2), (6, True, False, 3),
    (4, False, True, 1)])
def test_resets_at_t0_on_torch_kernel_equal_the_reference(cell, steps, batch_first,
                                                          bidirectional, num_layers,
                                                          monkeypatch):
    module, x, hx, reset = _layer_case(cell, steps, batch_first, bidirectional, num_layers)
    chosen = _implementation_names(monkeypatch)
    got = _run(module, x, hx, reset)
    assert chosen == ["native"]  # torch's kernel, not the reference
    # The reference applying the resets itself.
    with pytest.MonkeyPatch.context() as patch:
        _no_fold(patch)
        with lstmgru.use_backend("reference"):
            want = _run(module, x, hx, reset)
    assert chosen[-1] == "reference"
    _assert_same(got, want, TOL)
    # Bit for bit against torch.nn given the zeroed state (both on torch's kernel).
    theirs = getattr(nn, cell)(3, 4, num_layers=num_layers, bidirectional=bidirectional,
                               batch_first=batch_first, dtype=torch.float64)
    theirs.load_state_dict(module.state_dict())
    rows = reset[:, 0] if batch_first else reset[0]
    directions = 2 if bidirectional else 1
    keep = torch.ones(num_layers * directions, x.shape[0 if batch_first else 1], 1,
                      dtype=torch.float64)
    keep[::directions, rows] = 0  # forward directions only
    zeroed = [h.detach() * keep for h in hx]
    out = theirs(x, tuple(zeroed) if cell == "LSTM" else zeroed[0])
    assert torch.equal(got[0][0], out[0])


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_unbatched_and_packed_resets_at_t0(cell, monkeypatch):
    module, x, hx, reset = _layer_case(cell, 3, False, True, 2, batched=False)
    chosen = _implementation_names(monkeypatch)
    got = _run(module, x, hx, reset)
    with pytest.MonkeyPatch.context() as patch:
        _no_fold(patch)
        with lstmgru.use_backend("reference"):
            want = _run(module, x, hx, reset)
    assert chosen == ["native", "reference"]
    _assert_same(got, want, TOL)

    module, x, hx, reset = _layer_case(cell, 4, False, True, 2)
    packed = pack_padded_sequence(x, torch.tensor([2, 4, 1, 3, 4]), enforce_sorted=False)
    chosen.clear()
    runs = []
    for fold in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            if not fold:
                _no_fold(patch)
            with lstmgru.use_backend("auto" if fold else "reference"):
                states = tuple(hx) if cell == "LSTM" else hx[0]
                out = module(packed, states, reset=reset)
                runs.append([out[0].data] + (list(out[1]) if cell == "LSTM" else [out[1]]))
    assert chosen == ["native", "reference"]
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("batched", [True, False])
def test_cell_resets_run_on_torch_kernel_and_equal_the_reference(cell, batched, monkeypatch):
    torch.manual_seed(0)
    module = getattr(lstmgru, cell)(3, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    hx = [torch.randn(5, 4, generator=g, dtype=torch.float64)
          for _ in range(2 if cell == "LSTMCell" else 1)]
    reset = torch.tensor([True, False, True, True, False])
    if not batched:
        x, hx, reset = x[0], [h[0] for h in hx], reset[0]
    chosen = _implementation_names(monkeypatch)
    got = _run(module, x, hx, reset)
    with pytest.MonkeyPatch.context() as patch:
        _no_fold(patch)
        with lstmgru.use_backend("reference"):
            want = _run(module, x, hx, reset)
    assert chosen == ["native", "reference"]
    _assert_same(got, want, TOL)
    # A reset row's state has no gradient; the others' does.
    rows = reset if batched else reset.reshape(1)
    grad_h = got[1][1].reshape(len(rows), -1)
    assert (grad_h[rows] == 0).all() and (grad_h[~rows] != 0).all()


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_resets_after_t0_keep_the_reference_and_no_state_means_no_reset(cell, monkeypatch):
    module, x, hx, reset = _layer_case(cell, 4, False, False, 1)
    reset[2, 1] = True  # a reset after t=0: the reference applies every reset
    chosen = _implementation_names(monkeypatch)
    got = _run(module, x, hx, reset)
    assert chosen == ["reference"]
    # hx=None: zero initial state anyway, so the resets at t=0 change nothing.
    reset[2, 1] = False
    chosen.clear()
    out = module(x, reset=reset)[0]
    assert chosen == ["native"]
    torch.testing.assert_close(out, module(x)[0], rtol=0, atol=0)
    # A malformed reset is still refused by the call's own checks.
    with pytest.raises(ValueError, match="reset must be a bool tensor"):
        module(x, tuple(hx) if cell == "LSTM" else hx[0], reset=reset.int())
    with pytest.raises(ValueError, match=r"expected reset of shape \(4, 5\), got \(4, 4\)"):
        module(x, tuple(hx) if cell == "LSTM" else hx[0], reset=reset[:, :4])
    del got


def test_resets_at_t0_with_variants_keep_the_variants():
    # The fold only removes the reset: layer_norm still runs on the reference.
    torch.manual_seed(0)
    module = lstmgru.GRU(3, 4, layer_norm=True, dtype=torch.float64)
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    h = torch.randn(1, 2, 4, dtype=torch.float64)
    reset = torch.tensor([[True, False], [False, False], [False, False]])
    got = module(x, h, reset=reset)[0]
    with pytest.MonkeyPatch.context() as patch:
        _no_fold(patch)
        want = module(x, h, reset=reset)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
