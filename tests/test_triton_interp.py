"""The Triton backend end to end through the modules, against torch.nn.

Without a GPU, conftest sets TRITON_INTERPRET=1 and the kernels run in Triton's interpreter
on CPU tensors, with the block shapes the GPU uses (the launchers pick them). Every test
counts kernel launches, so a silent fallback to the reference cannot pass.
"""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

pytest.importorskip("triton")

import lstmgru  # noqa: E402
from lstmgru._kernels import _launch  # noqa: E402
from _parity import compare_runs, run_rnn  # noqa: E402
from test_parity import random_hx  # noqa: E402

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton_backend():
    with lstmgru.use_backend("triton"):
        yield


def _pair(op, I, H, reset_after=True, **kwargs):
    """(ours, oracle): torch.nn where it can compute the model, else our reference path."""
    extra = {} if reset_after else {"reset_after": False}
    ours = getattr(lstmgru, op)(I, H, device=DEVICE, **kwargs, **extra)
    if reset_after:
        oracle = getattr(torch.nn, op)(I, H, device=DEVICE, **kwargs)
    else:
        oracle = getattr(lstmgru, op)(I, H, device=DEVICE, **kwargs, **extra).double()
    oracle.load_state_dict(ours.state_dict())
    return ours, oracle


def _run_counted(module, x, hx):
    before = _launch.launches
    result = run_rnn(module, x, hx)
    return result, _launch.launches - before


def _as_double(result):
    return {k: v.double() for k, v in result.items()}


CONFIGS = [
    # op, reset_after, I, H, T, B, layers, bidirectional, batch_first, give_hx
    ("LSTM", True, 3, 20, 4, 3, 2, True, True, True),
    ("LSTM", True, 5, 33, 3, 1, 1, False, False, False),
    ("LSTM", True, 4, 80, 3, 18, 1, True, False, True),
    ("GRU", True, 3, 20, 4, 3, 2, True, True, True),
    ("GRU", True, 5, 33, 3, 1, 1, False, False, False),
    ("GRU", True, 4, 80, 3, 18, 1, True, False, True),
    ("GRU", False, 3, 20, 4, 3, 2, True, False, True),
    ("GRU", False, 4, 50, 3, 18, 1, False, True, False),
]


@pytest.mark.parametrize("op,reset_after,I,H,T,B,layers,bidir,batch_first,give_hx", CONFIGS)
def test_matches_torch(op, reset_after, I, H, T, B, layers, bidir, batch_first, give_hx):
    torch.manual_seed(I * 100 + H)
    kwargs = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first)
    ours, oracle = _pair(op, I, H, reset_after, **kwargs)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), device=DEVICE)
    hx = random_hx(op, layers, 2 if bidir else 1, B, H, 0, torch.float32) if give_hx else None
    if hx is not None:
        hx = tuple(h.to(DEVICE) for h in hx) if op == "LSTM" else hx.to(DEVICE)
    mine, launches = _run_counted(ours, x, hx)
    assert launches == 2 * layers * (2 if bidir else 1)   # one forward + one backward each
    if reset_after:
        theirs = run_rnn(oracle, x, hx)
    else:
        with lstmgru.use_backend("reference"):
            theirs = run_rnn(oracle, x.double(), None if hx is None else hx.double())
    # fp32 kernels with IEEE products and fp32 state against torch.nn's fp32 (or an fp64
    # oracle): rounding differences only.
    compare_runs(_as_double(mine), _as_double(theirs), 1e-5)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_packed_unsorted(op):
    torch.manual_seed(5)
    ours, oracle = _pair(op, 3, 20, num_layers=1, bidirectional=True)
    lengths = [2, 5, 1, 4]
    packed = pack_padded_sequence(torch.randn(5, 4, 3, device=DEVICE), lengths,
                                  enforce_sorted=False)
    mine, launches = _run_counted(ours, packed, None)
    assert launches == 4
    compare_runs(mine, run_rnn(oracle, packed, None), 1e-5)


def test_inference_launches_once_per_layer_direction():
    m = lstmgru.GRU(3, 20, num_layers=3, bidirectional=True, device=DEVICE)
    before = _launch.launches
    with torch.no_grad():
        m(torch.randn(4, 2, 3, device=DEVICE))
    assert _launch.launches - before == 6


@pytest.mark.parametrize("op", ["LSTMCell", "GRUCell"])
def test_cells(op):
    torch.manual_seed(6)
    ours = getattr(lstmgru, op)(4, 20, device=DEVICE)
    ref = getattr(torch.nn, op)(4, 20, device=DEVICE)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, device=DEVICE)
    before = _launch.launches
    out = ours(x)
    assert _launch.launches - before == 1
    theirs = ref(x)
    for a, b in zip(out if isinstance(out, tuple) else (out,),
                    theirs if isinstance(theirs, tuple) else (theirs,)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_fp16_against_fp64(op):
    """fp16 storage and fp16 products, fp32 state: error of the order of fp16's 1e-3 steps."""
    torch.manual_seed(7)
    ours = getattr(lstmgru, op)(4, 20, device=DEVICE).half()
    oracle = getattr(torch.nn, op)(4, 20, device=DEVICE).double()
    oracle.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 4, device=DEVICE)
    y = ours(x.half())[0]
    y_ref = oracle(x.double())[0]
    torch.testing.assert_close(y.double(), y_ref, atol=3e-3, rtol=0)


def test_auto_on_cpu_uses_reference_even_in_interpreter():
    if DEVICE == "cuda":
        pytest.skip("auto picks the kernels on CUDA")
    m = lstmgru.LSTM(3, 20)
    before = _launch.launches
    with lstmgru.use_backend("auto"):
        m(torch.randn(4, 2, 3))
    assert _launch.launches == before


def test_autocast_runs_the_kernels():
    """Under autocast the input projection runs in the autocast dtype, and so does the
    recurrence (as cuDNN does). fp16 here: the interpreter's bf16 tl.dot is broken."""
    if DEVICE == "cpu" and not torch.amp.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast")
    torch.manual_seed(8)
    m = lstmgru.LSTM(4, 20, device=DEVICE)
    oracle = torch.nn.LSTM(4, 20, device=DEVICE).double()
    oracle.load_state_dict(m.state_dict())
    x = torch.randn(5, 3, 4, device=DEVICE)
    before = _launch.launches
    with torch.autocast(DEVICE, dtype=torch.float16):
        y, _ = m(x)
    assert _launch.launches - before == 1
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), oracle(x.double())[0], atol=5e-3, rtol=0)


def test_opcheck():
    """torch.library's own checks of schema, fake (meta) implementation and autograd."""
    from lstmgru.cells.gru import triton_glue as _gru_ops  # noqa: F401  (registers the ops)
    from lstmgru.cells.lstm import triton_glue as _lstm_ops  # noqa: F401

    torch.manual_seed(9)
    T, B, H = 3, 2, 16

    def rnd(*shape):
        return torch.randn(*shape, device=DEVICE, requires_grad=True)

    lengths = torch.tensor([3, 2], device=DEVICE)
    torch.library.opcheck(torch.ops.lstmgru.lstm_forward.default,
                          (rnd(T, B, 4 * H), rnd(B, H), rnd(B, H), rnd(4 * H, H), None, None, None,
                           None, None, None, lengths, True, "tiled", 0.0, True))
    torch.library.opcheck(torch.ops.lstmgru.gru_forward.default,
                          (rnd(T, B, 3 * H), rnd(B, H), rnd(3 * H, H), rnd(H), None, None, None, None,
                           None, False, True, "tiled", 0.0, True))
    torch.library.opcheck(torch.ops.lstmgru.gru_forward.default,
                          (rnd(T, B, 3 * H), rnd(B, H), rnd(3 * H, H), None, None, None, None, None,
                           lengths, True, False, "tiled", 0.0, True))


@pytest.mark.parametrize("op", ["lstm", "gru"])
def test_custom_ops_compile_without_graph_break(op):
    """fullgraph=True fails on any graph break: the custom ops (fake impls and autograd
    registered with torch.library) must be traceable. aot_eager: no C++ compiler needed."""
    from lstmgru.cells.gru import triton_glue as gru_ops
    from lstmgru.cells.lstm import triton_glue as lstm_ops

    torch.manual_seed(10)
    T, B, H = 3, 2, 16
    G = (4 if op == "lstm" else 3) * H
    gx = torch.randn(T, B, G, device=DEVICE, requires_grad=True)
    w = torch.randn(G, H, device=DEVICE, requires_grad=True)
    h0, c0 = torch.randn(B, H, device=DEVICE), torch.randn(B, H, device=DEVICE)

    def loss(gx, w):
        if op == "lstm":
            y, h, _ = lstm_ops.lstm_recurrence(gx, h0, c0, w)
        else:
            y, h = gru_ops.gru_recurrence(gx, h0, w, reset_after=False)
        return (y * y).sum() + h.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(gx, w), (gx, w))
    expected = torch.autograd.grad(loss(gx, w), (gx, w))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
