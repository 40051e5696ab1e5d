"""LSTMCell and GRUCell against torch.nn's cells."""
import pytest
import torch

import lstmgru
from _parity import assert_close, weighted_loss


def _run_cell(cell, x, hx):
    x = x.detach().clone().requires_grad_()
    if hx is not None:
        hx = tuple(h.detach().clone().requires_grad_() for h in hx) if isinstance(hx, tuple) \
            else hx.detach().clone().requires_grad_()
    cell.zero_grad(set_to_none=True)
    out = cell(x, hx)
    outs = out if isinstance(out, tuple) else (out,)
    weighted_loss(outs).backward()
    result = {f"out[{i}]": o for i, o in enumerate(outs)}
    result["x.grad"] = x.grad
    if hx is not None:
        for i, h in enumerate(hx if isinstance(hx, tuple) else (hx,)):
            result[f"hx[{i}].grad"] = h.grad
    result.update({f"{n}.grad": p.grad for n, p in cell.named_parameters()})
    return result


@pytest.mark.parametrize("op", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("give_hx", [True, False])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cell_parity(op, bias, batched, give_hx, dtype, atol, backend):
    torch.manual_seed(21)
    ref = getattr(torch.nn, op)(5, 7, bias=bias, dtype=dtype)
    ours = getattr(lstmgru, op)(5, 7, bias=bias, dtype=dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    lead = (4,) if batched else ()
    x = torch.randn(*lead, 5, dtype=dtype)
    hx = None
    if give_hx:
        hx = torch.randn(*lead, 7, dtype=dtype)
        if op == "LSTMCell":
            hx = (hx, torch.randn(*lead, 7, dtype=dtype))
    a, b = _run_cell(ours, x, hx), _run_cell(ref, x, hx)
    for key in b:
        assert_close(a[key], b[key], key, atol)


@pytest.mark.parametrize("op", ["LSTMCell", "GRUCell"])
def test_cell_batch_zero(op):
    ours = getattr(lstmgru, op)(3, 4)
    out = ours(torch.randn(0, 3))
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.shape == (0, 4) for o in outs)


def test_cell_matches_one_layer_step():
    """A cell step is one step of the layer with the same weights."""
    torch.manual_seed(22)
    layer = lstmgru.GRU(3, 4).double()
    cell = lstmgru.GRUCell(3, 4).double()
    cell.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})
    x, h = torch.randn(1, 2, 3, dtype=torch.float64), torch.randn(1, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(cell(x[0], h[0]), layer(x, h)[0][0], atol=1e-12, rtol=0)
