"""Drop-in beyond forward/backward: second-order autograd, torch.func, parametrizations,
pruning, the meta device, FakeTensorMode, torch.compile and torch.export, side by side with
torch.nn on the same weights.

Each runs on the implementations that take CPU tensors: "native" (torch's own kernels, what
auto picks where torch computes the same function) and "reference" (ours, the path of
everything torch cannot compute), unless torch itself cannot do the thing (torch.func's
vmap), where our path is compared against a loop of ordinary calls.
"""
import pytest
import torch
from torch.func import functional_call, grad, jacrev, vjp, vmap
from torch.nn.utils import parametrizations, prune

import lstmgru
from _parity import assert_close

F64 = torch.float64
CASES = [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("GRU", {}), ("GRUCell", {}),
         ("LSTMCell", {})]


def _pair(op, dtype=F64, **kw):
    torch.manual_seed(3)
    layer_kw = {} if "Cell" in op else dict(num_layers=2, bidirectional=True)
    ref = getattr(torch.nn, op)(3, 4, dtype=dtype, **layer_kw, **kw)
    ours = getattr(lstmgru, op)(3, 4, dtype=dtype, **layer_kw, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _input(op, dtype=F64, batch=2):
    return torch.randn(batch, 3, dtype=dtype) if "Cell" in op else torch.randn(4, batch, 3,
                                                                                dtype=dtype)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _weights(out):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(out.shape, generator=gen, dtype=out.dtype)


@pytest.mark.parametrize("op,kw", CASES)
def test_gradgradcheck(op, kw):
    """Double backward of the reference recurrences (the kernels' twin is in the interpreter
    suite), through the whole module: input and initial state."""
    ours, _ = _pair(op, **kw)
    x = _input(op).requires_grad_()
    with lstmgru.use_backend("reference"):
        assert torch.autograd.gradgradcheck(lambda inp: _first(ours(inp)), (x,))


def test_gradgradcheck_original_gru_and_packed():
    gru = lstmgru.GRU(3, 4, reset_after=False, bidirectional=True, dtype=F64)
    x = torch.randn(4, 3, 3, dtype=F64, requires_grad=True)

    def run(inp):
        packed = torch.nn.utils.rnn.pack_padded_sequence(inp, [4, 2, 1], enforce_sorted=False)
        return ours_out(gru(packed)[0].data)

    ours_out = lambda t: t  # noqa: E731
    assert torch.autograd.gradgradcheck(run, (x,))


@pytest.mark.parametrize("op,kw", CASES)
def test_hessian_hvp_vhp_jvp_match_torch(op, kw, backend):
    ours, ref = _pair(op, **kw)
    x = _input(op, batch=1)
    v = torch.randn_like(x)
    results = []
    for m in (ours, ref):
        f = lambda inp: (_first(m(inp)) ** 3 * _weights(_first(m(inp)))).sum()  # noqa: B023,E731
        AF = torch.autograd.functional
        results.append([AF.hessian(f, x), AF.hvp(f, x, v)[1], AF.vhp(f, x, v)[1],
                        AF.jvp(lambda inp: _first(m(inp)), x, v)[1]])  # noqa: B023
    for name, a, b in zip(("hessian", "hvp", "vhp", "jvp"), *results):
        assert b.abs().max() > 0, f"torch.nn's {name} is zero: the test would prove nothing"
        assert_close(a, b, name, atol=1e-10)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_gradient_penalty_create_graph(op, backend):
    """WGAN-GP / meta-learning: grads with create_graph, then a backward through them."""
    results = []
    inp = _input(op)
    for m in _pair(op):
        x = inp.clone().requires_grad_()
        params = list(m.parameters())
        out = _first(m(x))
        grads = torch.autograd.grad((out * _weights(out)).sum(), [x, *params],
                                    create_graph=True, allow_unused=True)
        assert all(g is not None for g in grads)
        penalty = sum((g ** 2).sum() for g in grads)
        penalty.backward()
        results.append([g.detach() for g in grads] + [p.grad for p in params] + [x.grad])
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, f"item {i}", atol=1e-10)


@pytest.mark.parametrize("op,kw", CASES)
def test_torch_func_grad_jacrev_vjp(op, kw):
    ours, ref = _pair(op, **kw)
    x = _input(op)
    params = {k: v.detach() for k, v in ours.named_parameters()}

    def loss(p, inp, module):
        out = _first(functional_call(module, p, (inp,)))
        return (out * _weights(out)).sum()

    got = grad(loss)(params, x, ours)
    want = grad(loss)(params, x, ref)
    for k in params:
        assert_close(got[k], want[k], k, atol=1e-10)
    assert_close(jacrev(lambda inp: _first(ours(inp)))(x),
                 jacrev(lambda inp: _first(ref(inp)))(x), "jacrev", atol=1e-10)
    out, pullback = vjp(lambda inp: _first(ours(inp)), x)
    expected = torch.autograd.grad(_first(ref(x.requires_grad_())), x, _weights(out))[0]
    assert_close(pullback(_weights(out))[0], expected, "vjp", atol=1e-10)


@pytest.mark.parametrize("op,kw", [("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False}),
                                   ("LSTMCell", {}), ("GRUCell", {})])
def test_vmap_and_per_sample_gradients(op, kw):
    """torch.nn cannot be vmapped; ours is, and equals a loop of ordinary calls."""
    ours, _ = _pair(op, **kw) if "reset_after" not in kw else (
        getattr(lstmgru, op)(3, 4, dtype=F64, num_layers=2, **kw), None)
    samples = torch.stack([_input(op, batch=1)[..., 0, :] if "Cell" not in op
                           else _input(op, batch=1)[0] for _ in range(3)])
    params = {k: v.detach() for k, v in ours.named_parameters()}

    def loss(p, sample):
        out = _first(functional_call(ours, p, (sample,)))
        return (out ** 2).sum()

    outputs = vmap(lambda s: _first(ours(s)))(samples)
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, samples)
    for i in range(len(samples)):
        assert_close(outputs[i], _first(ours(samples[i])), "output", atol=1e-12)
        ours.zero_grad()
        (_first(ours(samples[i])) ** 2).sum().backward()
        for k, p in ours.named_parameters():
            assert_close(per_sample[k][i], p.grad, f"{k}[{i}]", atol=1e-10)


def test_forward_mode_jvp_matches_torch():
    """Forward-mode AD works as on torch.nn (tests/test_forward_ad.py covers it in full)."""
    ours, ref = _pair("LSTM")
    x = _input("LSTM")
    v = torch.randn_like(x)
    got = torch.func.jvp(lambda inp: ours(inp)[0], (x,), (v,))[1]
    want = torch.func.jvp(lambda inp: ref(inp)[0], (x,), (v,))[1]
    assert_close(got, want, "jvp", atol=1e-10)


@pytest.mark.parametrize("how", ["weight_norm", "orthogonal", "spectral_norm", "legacy",
                                 "prune", "plain tensor"])
def test_reparametrizations_match_torch(how, backend):
    outs = []
    x = _input("LSTM", dtype=torch.float32)
    for m in _pair("LSTM", dtype=torch.float32):
        torch.manual_seed(0)
        if how == "weight_norm":
            parametrizations.weight_norm(m, "weight_hh_l0")
        elif how == "orthogonal":
            parametrizations.orthogonal(m, "weight_hh_l1_reverse")
        elif how == "spectral_norm":
            parametrizations.spectral_norm(m, "weight_ih_l0")
        elif how == "legacy":
            torch.nn.utils.weight_norm(m, "weight_hh_l0")
        elif how == "prune":
            prune.l1_unstructured(m, "weight_hh_l0", amount=0.4)
        else:
            del m.weight_hh_l0
            m.weight_hh_l0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
        out = m(x)[0]
        out.pow(2).sum().backward()
        outs.append([out] + [p.grad for p in m.parameters()])
    for i, (a, b) in enumerate(zip(*outs)):
        assert_close(a, b, f"item {i}", atol=1e-5)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_meta_device_and_fake_tensors(op, backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = getattr(lstmgru, op)(3, 4, device="meta")
    out = m(_input(op, dtype=torch.float32).to("meta"))
    assert _first(out).device.type == "meta"
    with FakeTensorMode():
        m = getattr(lstmgru, op)(3, 4)
        shape = _first(m(_input(op, dtype=torch.float32))).shape
    assert shape == ((2, 4) if "Cell" in op else (4, 2, 4))


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_packed_dropout_equals_torch_bit_for_bit(op, backend):
    """Inter-layer dropout on packed input draws torch.nn's mask: it is applied where torch
    applies it, on the packed data."""
    ours, ref = _pair(op, dtype=torch.float32, dropout=0.4)
    ours.train(), ref.train()
    x = torch.randn(5, 3, 3)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 2, 4], enforce_sorted=False)
    results = []
    for m in (ours, ref):
        torch.manual_seed(17)
        out, _ = m(packed)
        results.append(out.data)
    if backend == "native":
        assert torch.equal(*results)
    else:  # the same mask; the values differ by rounding only
        assert_close(results[0], results[1], "packed dropout", atol=1e-6)
        assert torch.equal(results[0] == 0, results[1] == 0)


@pytest.mark.parametrize("op", ["LSTMCell", "GRUCell"])
def test_cells_accept_hidden_size_zero_like_torch(op, backend):
    ours, ref = getattr(lstmgru, op)(10, 0), getattr(torch.nn, op)(10, 0)
    x = torch.randn(3, 10)
    got, want = _first(ours(x)), _first(ref(x))
    assert got.shape == want.shape == (3, 0)
