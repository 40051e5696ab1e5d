"""Forward-mode AD through every recurrence: torch.func.jvp, jacfwd, hessian and the dual
tensors of torch.autograd.forward_ad.

Oracles: torch.nn's own forward-mode AD on the CPU in float64 (what it computes), and for the
functions torch cannot compute (the original GRU, the cell variants) a central finite
difference of the same module with the same masks, plus the exact identity
<u, J v> = <J^T u, v> against the reverse mode (whose gradients test_variants.py and
test_parity.py hold against naive loops and torch.nn). Tangents are taken with respect to
the input, the initial states and every parameter at once.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import lstmgru

F64 = torch.float64
T, B, I, H = 4, 3, 3, 4
TOL = 1e-10


def _twins(op, **kw):
    """Our module and torch.nn's with the same float64 weights."""
    ours = getattr(lstmgru, op)(I, H, dtype=F64, **kw)
    theirs = getattr(torch.nn, op)(I, H, dtype=F64, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _call(module, packed_lengths=None, reset=None):
    """A function of (x, states, params) returning a tuple of tensors, for any module."""
    def run(x, states, params):
        if packed_lengths is not None:
            # x is the packed data: pack_padded_sequence has no forward-AD formula in torch.
            x = packed_lengths._replace(data=x)
        hx = tuple(states) if module.__class__.__name__.startswith("LSTM") else states[0]
        kwargs = {} if reset is None else {"reset": reset}
        out = functional_call(module, params, (x, hx), kwargs)
        if packed_lengths is not None:
            out = (out[0].data, *out[1:])
        flat = []
        for item in out if isinstance(out, tuple) else (out,):
            flat.extend(item if isinstance(item, tuple) else (item,))
        return tuple(flat)
    return run


def _primals(module, x_shape, num_states, state_shape):
    x = torch.randn(*x_shape, dtype=F64)
    states = tuple(torch.randn(*shape, dtype=F64) for shape in state_shape[:num_states])
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    return x, states, params


def _random_like(tree):
    return torch.utils._pytree.tree_map(torch.randn_like, tree)


def _jvp(fn, primals, tangents, mode):
    if mode == "torch.func":
        return torch.func.jvp(fn, primals, tangents)[1]
    with fwAD.dual_level():
        duals = torch.utils._pytree.tree_map(fwAD.make_dual, primals, tangents)
        return tuple(fwAD.unpack_dual(out).tangent for out in fn(*duals))


def _assert_close(got, want, atol=TOL, rtol=0.0):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g is not None, "no tangent where torch.nn has one"
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def _state_shapes(op, kw, batched=True):
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    if op.endswith("Cell"):
        return [(B, H), (B, H)]
    out = kw.get("proj_size") or H
    return [(layers, B, out), (layers, B, H)]


@pytest.fixture(params=["reference", "auto"])
def backend(request):
    """The reference, and "auto" (torch's own kernel where torch can run the call: under dual
    tensors; never under torch.func, whose transforms torch's RNN kernels do not take)."""
    with lstmgru.use_backend(request.param):
        yield request.param


CASES = [
    ("LSTM", {"proj_size": 2}),
    ("LSTM", {"num_layers": 2, "bidirectional": True}),
    ("GRU", {"num_layers": 2, "bidirectional": True}),
    ("LSTMCell", {}),
    ("GRUCell", {}),
]


# ------------------------------------------------------------------ against torch.nn
@pytest.mark.parametrize("mode", ["torch.func", "dual"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("op,kw", CASES)
def test_jvp_matches_torch_nn(backend, op, kw, packed, mode):
    if packed and op.endswith("Cell"):
        pytest.skip("cells take no sequences")
    torch.manual_seed(71)
    ours, theirs = _twins(op, **kw)
    cell = op.endswith("Cell")
    x, states, params = _primals(ours, (B, I) if cell else (T, B, I),
                                 2 if op.startswith("LSTM") else 1, _state_shapes(op, kw))
    lengths = None
    if packed:
        lengths = pack_padded_sequence(x, torch.tensor([4, 2, 3]), enforce_sorted=False)
        x = lengths.data
    tangents = _random_like((x, states, params))
    # torch.nn's dual tensors are the oracle: torch.func.jvp of torch.nn's packed call fails
    # inside torch ("Cannot access data pointer of Tensor that doesn't have storage").
    want = _jvp(_call(theirs, lengths), (x, states, params), tangents, "dual")
    got = _jvp(_call(ours, lengths), (x, states, params), tangents, mode)
    _assert_close(got, want)


@pytest.mark.parametrize("op,kw", [("LSTM", {"proj_size": 2, "bidirectional": True}),
                                   ("GRU", {"num_layers": 2}), ("LSTMCell", {}),
                                   ("GRUCell", {})])
def test_jacfwd_and_hessian_match_torch_nn(backend, op, kw):
    torch.manual_seed(72)
    ours, theirs = _twins(op, **kw)
    cell = op.endswith("Cell")
    x = torch.randn(*((B, I) if cell else (T, B, I)), dtype=F64)

    def output(module):
        return lambda x: (module(x)[0] if op != "GRUCell" else module(x))

    weights = torch.randn_like(output(theirs)(x))

    def loss(module):
        return lambda x: (output(module)(x) * weights).sum()

    _assert_close((torch.func.jacfwd(output(ours))(x),),
                  (torch.func.jacfwd(output(theirs))(x),))
    _assert_close((torch.func.hessian(loss(ours))(x),), (torch.func.hessian(loss(theirs))(x),))


def test_auto_path_under_forward_ad():
    """What runs under forward-mode AD with backend "auto" on the CPU: the reference, both under
    torch.func transforms (torch's RNN kernels have no functorch rules) and with dual tensors
    (torch's float32 oneDNN LSTM has no forward-AD formula: test_dual_tensors_in_float32)."""
    from lstmgru import backends

    chosen = []
    original = backends._select

    def spy(backend, case):
        impl = original(backend, case)
        chosen.append(impl.name)
        return impl

    m = lstmgru.LSTM(I, H, dtype=F64)
    x = torch.randn(T, B, I, dtype=F64)
    backends._select = spy
    try:
        torch.func.jvp(lambda x: m(x)[0], (x,), (torch.randn_like(x),))
        with fwAD.dual_level():
            m(fwAD.make_dual(x, torch.randn_like(x)))
    finally:
        backends._select = original
    assert chosen == ["reference", "reference"]


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_dual_tensors_in_float32(op):
    """torch.nn's float32 CPU LSTM raises under dual tensors (oneDNN's mkldnn_rnn_layer has no
    forward-AD formula); ours runs, and agrees with torch.nn's float64 tangent."""
    torch.manual_seed(77)
    ours = getattr(lstmgru, op)(I, H)
    theirs = getattr(torch.nn, op)(I, H, dtype=F64)
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x, v = torch.randn(T, B, I), torch.randn(T, B, I)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(fwAD.make_dual(x, v))[0]).tangent
        want = fwAD.unpack_dual(theirs(fwAD.make_dual(x.double(), v.double()))[0]).tangent
    # float32 primal and tangent against float64: fp32 rounding over T steps.
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ beyond torch.nn
def _finite_difference(fn, primals, tangents, eps=1e-5):
    """The fourth-order central difference (f(-2e) - 8 f(-e) + 8 f(e) - f(2e)) / 12e."""
    def at(step):
        return fn(*torch.utils._pytree.tree_map(lambda p, t: p + step * t, primals, tangents))
    points = [at(k * eps) for k in (-2, -1, 1, 2)]
    return tuple((a - 8 * b + 8 * c - d) / (12 * eps) for a, b, c, d in zip(*points))


def _check_against_oracles(fn, primals, tangents):
    got = torch.func.jvp(fn, primals, tangents)[1]
    # A finite difference is not exact: truncation ~eps^4 f^(5) (LayerNorm of a small
    # recurrent product has large high derivatives) and rounding ~1e-16 / eps; 1e-7, not
    # 1e-10. The exact check is the identity below.
    _assert_close(got, _finite_difference(fn, primals, tangents), atol=1e-7)
    # Exact: <u, J v> = <J^T u, v>, with J^T u from the reverse mode.
    outputs, pullback = torch.func.vjp(fn, *primals)
    cotangents = tuple(torch.randn_like(o) for o in outputs)
    pulled = pullback(cotangents)
    lhs = sum((u * jv).sum() for u, jv in zip(cotangents, got))
    rhs = sum((a * b).sum() for a, b in zip(torch.utils._pytree.tree_leaves(pulled),
                                             torch.utils._pytree.tree_leaves(tangents)))
    torch.testing.assert_close(lhs, rhs, atol=TOL, rtol=TOL)
    with fwAD.dual_level():
        duals = torch.utils._pytree.tree_map(fwAD.make_dual, primals, tangents)
        dual_got = tuple(fwAD.unpack_dual(out).tangent for out in fn(*duals))
    _assert_close(dual_got, got)


VARIANTS = [
    ("GRU", {"reset_after": False}),
    ("GRU", {"reset_after": False, "bidirectional": True, "num_layers": 2}),
    ("LSTM", {"layer_norm": True}),
    ("GRU", {"layer_norm": True}),
    ("LSTM", {"zoneout": 0.3}),
    ("GRU", {"zoneout": 0.3, "reset_after": False}),
    ("LSTM", {"recurrent_dropout": 0.4, "proj_size": 2}),
    ("GRU", {"recurrent_dropout": 0.4}),
    ("LSTM", {"weight_drop": 0.3, "bidirectional": True}),
    ("GRU", {"weight_drop": 0.3}),
    ("LSTM", {"layer_norm": True, "zoneout": 0.2, "recurrent_dropout": 0.3,
              "weight_drop": 0.2, "bidirectional": True}),
]


def _seeded(fn, seed):
    """The same masks at every call: drawn once per call from a fixed seed."""
    def run(*args):
        torch.manual_seed(seed)
        return fn(*args)
    return run


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
@pytest.mark.parametrize("op,kw", VARIANTS)
def test_variants_and_original_gru_against_oracles(op, kw, with_reset, packed):
    torch.manual_seed(73)
    m = getattr(lstmgru, op)(I, H, dtype=F64, **kw).train()
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    out = kw.get("proj_size") or H
    x, states, params = _primals(m, (T, B, I), 2 if op == "LSTM" else 1,
                                 [(layers, B, out), (layers, B, H)])
    reset = torch.tensor([[False, True, False], [True, False, False], [False, False, True],
                          [False, True, False]]) if with_reset else None
    lengths = None
    if packed:
        lengths = pack_padded_sequence(x, torch.tensor([4, 2, 3]), enforce_sorted=False)
        x = lengths.data
    fn = _seeded(_call(m, lengths, reset), 5)
    _check_against_oracles(fn, (x, states, params), _random_like((x, states, params)))


def test_variant_cells_against_oracles():
    torch.manual_seed(74)
    for op in ("LSTMCell", "GRUCell"):
        kw = {"layer_norm": True}
        m = getattr(lstmgru, op)(I, H, dtype=F64, **kw)
        x, states, params = _primals(m, (B, I), 2 if op == "LSTMCell" else 1,
                                     [(B, H), (B, H)])
        _check_against_oracles(_call(m), (x, states, params), _random_like((x, states, params)))


# ------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("op,kw", [("LSTM", {"proj_size": 2, "bidirectional": True}),
                                   ("GRU", {"reset_after": False}),
                                   ("LSTM", {"layer_norm": True, "zoneout": 0.3}),
                                   ("GRU", {"layer_norm": True, "recurrent_dropout": 0.3})])
def test_gradcheck_with_forward_ad(op, kw):
    torch.manual_seed(75)
    m = getattr(lstmgru, op)(2, 3, dtype=F64, **kw).train()
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    fn = _seeded(lambda x: m(x)[0], 6)
    assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True)


# ------------------------------------------------------------------ kernels (interpreter)
@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["torch.func", "dual"])
@pytest.mark.parametrize("op,kw", [("LSTM", {"bidirectional": True}), ("GRU", {}),
                                   ("GRU", {"reset_after": False}),
                                   ("LSTM", {"layer_norm": True, "zoneout": 0.2}),
                                   ("GRU", {"recurrent_dropout": 0.3, "layer_norm": True})])
def test_kernels_in_the_interpreter(op, kw, mode):
    pytest.importorskip("triton")
    if not lstmgru._triton.interpreter_enabled():
        pytest.skip("runs the kernels in Triton's interpreter (TRITON_INTERPRET=1)")
    torch.manual_seed(76)
    m = getattr(lstmgru, op)(I, 16, **kw).train()
    x = torch.randn(T, B, I)
    params = {name: p.detach().clone() for name, p in m.named_parameters()}
    tangents = _random_like((x, params))
    fn = _seeded(lambda x, params: tuple(
        o for item in functional_call(m, params, (x,))
        for o in (item if isinstance(item, tuple) else (item,))), 7)
    from lstmgru._kernels import _launch

    before = _launch.launches
    with lstmgru.use_backend("triton-tiled"):
        got = _jvp(fn, (x, params), tangents, mode)
    assert _launch.launches > before, "the kernels did not run"
    # The oracle is the reference on the same float32 module (the same masks: they are drawn
    # per dtype), itself held against torch.nn and finite differences in float64 above.
    with lstmgru.use_backend("reference"):
        want = _jvp(fn, (x, params), tangents, "torch.func")
    # Both primals run in float32, in different orders of operations: 1e-5 is fp32 rounding
    # accumulated over T steps on O(1) values.
    _assert_close(got, want, atol=1e-5, rtol=1e-5)
