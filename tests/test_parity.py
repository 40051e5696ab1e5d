"""Parity with torch.nn on shared weights: outputs, final states, and gradients of the input,
the initial states and every parameter by name, over a generated set of configurations."""
import itertools
import random
import zlib

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstmgru
from _parity import compare_runs, run_rnn

# fp64: both sides are exact up to rounding order. fp32: accumulated rounding over a few
# steps and two layers, relative to values of order 1.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _configs():
    rng = random.Random(2026)
    grid = list(itertools.product(
        ["LSTM", "GRU"], [1, 2, 3], [False, True], [False, True], [True, False], [0, 2],
        [True, False]))
    cases = []
    for op, layers, bidir, batch_first, bias, proj, give_hx in grid:
        if op == "GRU" and proj:
            continue
        cases.append((op, layers, bidir, batch_first, bias, proj, give_hx))
    rng.shuffle(cases)
    return cases[:48]


def build_pair(op, input_size, hidden_size, dtype, **kwargs):
    ref = getattr(torch.nn, op)(input_size, hidden_size, dtype=dtype, **kwargs)
    ours = getattr(lstmgru, op)(input_size, hidden_size, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def random_hx(op, layers, directions, batch, hidden, proj, dtype, batched=True):
    shape = (layers * directions, batch) if batched else (layers * directions,)
    h0 = torch.randn(*shape, proj or hidden, dtype=dtype)
    if op == "LSTM":
        return (h0, torch.randn(*shape, hidden, dtype=dtype))
    return h0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("op,layers,bidir,batch_first,bias,proj,give_hx", _configs())
def test_random_config(op, layers, bidir, batch_first, bias, proj, give_hx, dtype, backend):
    torch.manual_seed(zlib.crc32(repr((op, layers, bidir, batch_first, bias, proj, give_hx)).encode()))
    input_size, hidden = random.Random(repr((op, bidir, batch_first, bias, proj))).choice(
        [(3, 5), (7, 4), (1, 6), (2, 9)])
    kwargs = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first, bias=bias)
    if proj:
        kwargs["proj_size"] = proj
    ours, ref = build_pair(op, input_size, hidden, dtype, **kwargs)
    T, B = 5, 3
    x = torch.randn((B, T, input_size) if batch_first else (T, B, input_size), dtype=dtype)
    hx = random_hx(op, layers, 2 if bidir else 1, B, hidden, proj, dtype) if give_hx else None
    compare_runs(run_rnn(ours, x, hx), run_rnn(ref, x, hx), TOLERANCE[dtype])


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 1, 1), (10, 32, 1, 50), (17, 2, 9, 33)])
def test_shapes(op, T, B, I, H, backend):
    torch.manual_seed(T * 1000 + H)
    ours, ref = build_pair(op, I, H, torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    compare_runs(run_rnn(ours, x, None), run_rnn(ref, x, None), 1e-10)


@pytest.mark.parametrize("op,proj", [("LSTM", 0), ("LSTM", 3), ("GRU", 0)])
def test_unbatched(op, proj, backend):
    torch.manual_seed(7)
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=proj) if proj else \
        dict(num_layers=2, bidirectional=True)
    ours, ref = build_pair(op, 4, 6, torch.float64, **kwargs)
    x = torch.randn(5, 4, dtype=torch.float64)
    for hx in (None, random_hx(op, 2, 2, None, 6, proj, torch.float64, batched=False)):
        a, b = run_rnn(ours, x, hx), run_rnn(ref, x, hx)
        assert a["output"].shape == b["output"].shape == (5, 2 * (proj or 6))
        compare_runs(a, b, 1e-10)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_batch_size_zero(op):
    ours, ref = build_pair(op, 3, 4, torch.float32, num_layers=2)
    x = torch.randn(5, 0, 3)
    y, final = ours(x)
    y_ref, final_ref = ref(x)
    assert y.shape == y_ref.shape
    finals = final if op == "GRU" else final[0]
    finals_ref = final_ref if op == "GRU" else final_ref[0]
    assert finals.shape == finals_ref.shape


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_nan_propagates_like_torch(op):
    torch.manual_seed(3)
    ours, ref = build_pair(op, 3, 4, torch.float64, num_layers=2, bidirectional=True)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    x[2, 1, 0] = float("nan")
    y, _ = ours(x)
    y_ref, _ = ref(x)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.isnan(y).any() and not torch.isnan(y).all()
    torch.testing.assert_close(y.nan_to_num(0.0), y_ref.nan_to_num(0.0), atol=1e-10, rtol=0)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_dropout_between_layers(op):
    """Training-mode dropout hits every layer's output but the last, as in torch.nn: with
    p=1 every layer after the first sees zeros, so the output depends only on the biases."""
    torch.manual_seed(5)
    ours, ref = build_pair(op, 3, 4, torch.float64, num_layers=3, dropout=1.0)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    ours.train(), ref.train()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-10, rtol=0)
    ours.eval()
    assert not torch.allclose(ours(x)[0], ref(x)[0])  # p=1 dropout is off in eval: output changes
    ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-10, rtol=0)
    mid = getattr(lstmgru, op)(3, 64, num_layers=2, dropout=0.5).double().train()
    outs = [mid(x)[0] for _ in range(2)]
    assert not torch.equal(outs[0], outs[1]), "dropout p=0.5 in training must be random"


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_state_dict_both_ways(op):
    kwargs = dict(num_layers=2, bidirectional=True, bias=True)
    if op == "LSTM":
        kwargs["proj_size"] = 2
    ref = getattr(torch.nn, op)(3, 5, **kwargs)
    ours = getattr(lstmgru, op)(3, 5, **kwargs)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == \
        [(n, p.shape) for n, p in ref.named_parameters()]
    ours.load_state_dict(ref.state_dict(), strict=True)
    fresh = getattr(torch.nn, op)(3, 5, **kwargs)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for (n, a), (_, b) in zip(fresh.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("op", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_init_distribution_and_repr(op):
    torch.manual_seed(17)
    args = (3, 400)
    ours = getattr(lstmgru, op)(*args)
    bound = 1 / 400 ** 0.5
    for name, p in ours.named_parameters():
        assert p.abs().max() <= bound, name
        assert p.abs().max() > 0.95 * bound, name      # uniform fills the whole range
        assert abs(p.mean().item()) < 0.05 * bound, name
    if "Cell" in op:
        assert repr(ours) == repr(getattr(torch.nn, op)(*args))
    kwargs = dict(num_layers=2, bias=False, batch_first=True, dropout=0.25, bidirectional=True)
    if "Cell" not in op:
        assert repr(getattr(lstmgru, op)(3, 5, **kwargs)) == repr(getattr(torch.nn, op)(3, 5, **kwargs))
    if op == "LSTM":
        assert repr(lstmgru.LSTM(3, 5, proj_size=2)) == repr(torch.nn.LSTM(3, 5, proj_size=2))


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("packed", [False, True])
def test_no_grad_matches_grad_mode(op, packed):
    """Inference (nothing saved, ring buffers) computes exactly what training computes."""
    torch.manual_seed(19)
    m = getattr(lstmgru, op)(3, 5, num_layers=2, bidirectional=True).double()
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    inp = pack_padded_sequence(x, [6, 2, 5, 1], enforce_sorted=False) if packed else x
    out_grad, final_grad = m(inp)
    with torch.no_grad():
        out, final = m(inp)
    with torch.inference_mode():
        out_inf, final_inf = m(inp)
    data = (lambda o: o.data) if packed else (lambda o: o)
    assert torch.equal(data(out), data(out_grad).detach())
    assert torch.equal(data(out_inf), data(out))
    for a, b in zip(final if op == "LSTM" else (final,),
                    final_grad if op == "LSTM" else (final_grad,)):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_autocast_like_torch(op, backend):
    """Under CPU autocast torch.nn runs the LSTM in the autocast dtype and the GRU in the
    input's dtype (its CPU autocast list has the LSTM only); ours does the same."""
    torch.manual_seed(23)
    ours, ref = build_pair(op, 3, 8, torch.float32)
    x = torch.randn(5, 2, 3)
    for inp in (x, x.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            try:
                y_ref, _ = ref(inp)
            except RuntimeError as error:
                # oneDNN's bf16 LSTM needs AVX-512 ("could not create a primitive
                # descriptor" on AVX2-only CPUs): nothing to compare against here.
                pytest.skip(f"torch.nn's own {op} fails on this machine: {error}")
            with lstmgru.use_backend(backend):
                y, _ = ours(inp)
        assert y.dtype == y_ref.dtype
        expected = torch.bfloat16 if op == "LSTM" or inp.dtype == torch.bfloat16 else torch.float32
        assert y.dtype == expected
        # bfloat16 (8 bits of mantissa) somewhere on each side: torch's native GRU returns
        # float32 but autocast still runs its inner matmuls in bfloat16.
        torch.testing.assert_close(y.float(), y_ref.float(), atol=3e-2, rtol=0)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_batch_size_zero_backward(op):
    ours = getattr(lstmgru, op)(3, 4, num_layers=2)
    x = torch.randn(5, 0, 3, requires_grad=True)
    y, _ = ours(x)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())
