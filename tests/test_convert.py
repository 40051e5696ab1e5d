"""lstmgru.convert / lstmgru.to_torch: whole models, both ways, state kept, outputs unchanged."""
from __future__ import annotations

import abc
import copy
import io
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmgru

from _parity import weighted_loss

# fp64: the reference path and torch's kernels round differently, by far less than this.
TOL = 1e-12
RNN_TYPES = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)
OUR_TYPES = (lstmgru.LSTM, lstmgru.GRU, lstmgru.LSTMCell, lstmgru.GRUCell)


class Model(nn.Module):
    """RNNs nested in a ModuleDict, a Sequential and a ModuleList, and cells used in a loop."""

    def __init__(self, rnn=nn, dtype=torch.float64):
        super().__init__()
        kw = {"dtype": dtype}
        self.encoder = nn.ModuleDict({"rnn": nn.Sequential(
            rnn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=4, **kw))})
        self.blocks = nn.ModuleList([nn.Linear(8, 5, **kw), rnn.GRU(5, 4, batch_first=True, **kw)])
        self.lstm_cell = rnn.LSTMCell(4, 3, **kw)
        self.gru_cell = rnn.GRUCell(3, 2, bias=False, **kw)

    def forward(self, x):                                  # x: (T, B, 3)
        y, (h, c) = self.encoder["rnn"](x)                 # (T, B, 8)
        z = self.blocks[0](y).transpose(0, 1)              # (B, T, 5)
        z, g = self.blocks[1](z)                           # (B, T, 4)
        hc, outs = None, []
        hg = torch.zeros(x.shape[1], 2, dtype=x.dtype)
        for t in range(z.shape[1]):
            hc = self.lstm_cell(z[:, t], hc)
            hg = self.gru_cell(hc[0], hg)
            outs.append(hg)
        return [y, h, c, z, g, hc[1], torch.stack(outs)]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Model(**kw)


def _x(seed=1, dtype=torch.float64):
    return torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _run(model, x):
    """Outputs, the input's gradient and every parameter's gradient (by name)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    outputs = model(x)
    weighted_loss(outputs).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return [o.detach() for o in outputs], x.grad.clone(), grads


def _assert_same_run(got, want):
    (out_g, xg_g, grads_g), (out_w, xg_w, grads_w) = got, want
    assert len(out_g) == len(out_w)
    for i, (a, b) in enumerate(zip(out_g, out_w)):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=f"output {i}")
    torch.testing.assert_close(xg_g, xg_w, rtol=0, atol=TOL, msg="input gradient")
    assert grads_g.keys() == grads_w.keys()
    for name in grads_w:
        torch.testing.assert_close(grads_g[name], grads_w[name], rtol=0, atol=TOL,
                                   msg=f"gradient of {name}")


def _rnn_modules(model):
    return [m for m in model.modules() if isinstance(m, RNN_TYPES + OUR_TYPES)]


def _kinds(model):
    """The RNN modules' classes, a parametrized module's as it was before parametrize."""
    return [type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)
            for m in _rnn_modules(model)]


def test_nested_model_same_outputs_and_gradients(backend):
    model, x = _model(), _x()
    want = _run(model, x)
    params = dict(model.named_parameters())
    converted = lstmgru.convert(model)
    assert converted is model
    kinds = [type(m) for m in _rnn_modules(model)]
    assert kinds == [lstmgru.LSTM, lstmgru.GRU, lstmgru.LSTMCell, lstmgru.GRUCell]
    # The parameters themselves, under the same names, in the same order.
    assert list(model.named_parameters()) == list(params.items())
    assert all(model.get_parameter(n) is p for n, p in params.items())
    _assert_same_run(_run(model, x), want)


def test_round_trip_gives_the_original_numbers(backend):
    model, x = _model(), _x()
    want = _run(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    back = lstmgru.to_torch(lstmgru.convert(model))
    assert back is model
    assert [type(m) for m in _rnn_modules(model)] == list(RNN_TYPES)  # exact classes
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    got = _run(model, x)
    for a, b in zip(got[0], want[0]):
        assert torch.equal(a, b)
    assert torch.equal(got[1], want[1])
    assert all(torch.equal(got[2][n], want[2][n]) for n in want[2])


def test_to_torch_of_an_lstmgru_model():
    ours, x = _model(rnn=lstmgru), _x()
    want = _run(ours, x)
    theirs = lstmgru.to_torch(ours)
    assert [type(m) for m in _rnn_modules(theirs)] == list(RNN_TYPES)
    _assert_same_run(_run(theirs, x), want)


@pytest.mark.parametrize("make", [
    lambda: nn.LSTM(3, 5, num_layers=3, bias=False, batch_first=True, dropout=0.25,
                    bidirectional=True, proj_size=2),
    lambda: nn.GRU(3, 5, num_layers=2, bias=False, batch_first=True, dropout=0.5,
                   bidirectional=True),
    lambda: nn.LSTMCell(3, 5, bias=False),
    lambda: nn.GRUCell(3, 5, bias=False),
], ids=["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_constructor_options_are_kept(make):
    theirs = make()
    options = {k: v for k, v in vars(theirs).items() if not k.startswith("_")}
    ours = lstmgru.convert(theirs)
    assert ours.extra_repr() == theirs.extra_repr()
    assert {k: getattr(ours, k) for k in options} == options
    back = lstmgru.to_torch(ours)
    assert {k: v for k, v in vars(back).items() if not k.startswith("_")} == options
    if isinstance(theirs, nn.RNNBase):
        assert ours._flat_weights_names == back._flat_weights_names == theirs._flat_weights_names


def test_root_module_is_replaced_and_returned():
    rnn = nn.GRU(3, 4, dtype=torch.float64)
    ours = lstmgru.convert(rnn)
    assert type(ours) is lstmgru.GRU and ours is not rnn
    assert ours.weight_ih_l0 is rnn.weight_ih_l0
    back = lstmgru.to_torch(ours)
    assert type(back) is nn.GRU and back.weight_hh_l0 is rnn.weight_hh_l0
    cell = lstmgru.to_torch(lstmgru.LSTMCell(2, 3))
    assert type(cell) is nn.LSTMCell
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        lstmgru.convert([rnn])


def test_adam_state_survives_and_training_continues_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(3, 5, num_layers=2, dtype=torch.float64),
                          nn.ModuleList([nn.GRUCell(5, 4, dtype=torch.float64)]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs = [_x(seed) for seed in range(5)]

    def step(model, opt, x):
        opt.zero_grad()
        y, _ = model[0](x)
        h = None
        for t in range(y.shape[0]):
            h = model[1][0](y[t], h)
        loss = (h ** 2).sum()
        loss.backward()
        opt.step()
        return loss.detach()

    step(model, opt, xs[0])
    ref_model, ref_opt = copy.deepcopy((model, opt))  # one copy: ref_opt holds ref_model's
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    lstmgru.convert(model)
    assert isinstance(model[0], lstmgru.LSTM) and isinstance(model[1][0], lstmgru.GRUCell)
    for p in model.parameters():  # every parameter keeps its state (exp_avg, exp_avg_sq, step)
        assert set(opt.state[p]) == set(before[p])
        assert all(torch.equal(opt.state[p][k], before[p][k]) for k in before[p])
    for x in xs[1:]:
        torch.testing.assert_close(step(model, opt, x), step(ref_model, ref_opt, x),
                                   rtol=0, atol=TOL)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=TOL, msg=name)


def test_device_dtype_training_and_requires_grad_are_kept():
    model = _model(dtype=torch.float32).eval()
    model.encoder["rnn"][0].weight_hh_l1_reverse.requires_grad_(False)
    model.gru_cell.weight_ih.requires_grad_(False)
    model.lstm_cell.train()  # a child in another mode than its parent
    flags = [(n, p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()]
    modes = [(n, m.training) for n, m in model.named_modules()]
    lstmgru.convert(model)
    assert [(n, p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()] == flags
    assert [(n, m.training) for n, m in model.named_modules()] == modes
    assert model.gru_cell.training is False and model.lstm_cell.training is True


def test_buffers_children_and_instance_attributes_are_kept():
    rnn = nn.LSTM(3, 4)
    rnn.register_buffer("scale", torch.tensor(2.0))
    rnn.register_buffer("scratch", torch.zeros(3), persistent=False)
    rnn.extra = nn.Linear(4, 4)
    rnn.qconfig = "a tag"
    ours = lstmgru.convert(rnn)
    assert ours.scale is rnn.scale and ours.scratch is rnn.scratch and ours.extra is rnn.extra
    assert ours.qconfig == "a tag"
    assert list(ours.state_dict()) == list(rnn.state_dict())  # "scratch" stays non-persistent
    back = lstmgru.to_torch(ours)
    assert back.qconfig == "a tag" and back.scale is rnn.scale
    assert not hasattr(back, "reset_after") and not hasattr(lstmgru.to_torch(
        lstmgru.GRUCell(2, 3)), "mode")  # lstmgru's own attributes do not travel


def test_hooks_are_kept():
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4, dtype=torch.float64)
    calls = []
    handles = [
        rnn.register_forward_pre_hook(lambda m, a: calls.append("pre")),
        rnn.register_forward_hook(lambda m, a, kw, out: calls.append("fwd"), with_kwargs=True),
        rnn.register_full_backward_hook(lambda m, gi, go: calls.append("bwd")),
        rnn.register_state_dict_post_hook(lambda m, sd, prefix, local: calls.append("sd")),
    ]
    grad_hook = rnn.weight_hh_l0.register_hook(lambda g: calls.append("grad"))
    ours = lstmgru.convert(rnn)
    for name in set(nn.Module().__dict__) - {"training", "_parameters", "_buffers",
                                            "_non_persistent_buffers_set", "_modules"}:
        assert ours.__dict__[name] is rnn.__dict__[name], name  # the dictionaries themselves
    y, _ = ours(_x().requires_grad_())
    y.sum().backward()
    ours.state_dict()
    assert sorted(calls) == sorted(["pre", "fwd", "bwd", "grad", "sd"])
    for handle in handles:  # the old handles remove the hooks from the new module
        handle.remove()
    grad_hook.remove()
    calls.clear()
    y, _ = ours(_x().requires_grad_())
    y.sum().backward()
    ours.state_dict()
    assert calls == []


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal", "spectral_norm", "two"])
def test_parametrizations_move_over(kind, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(3, 4, dtype=torch.float64), nn.GRU(4, 4, dtype=torch.float64))
    for rnn in model:
        if kind in ("weight_norm", "two"):
            parametrizations.weight_norm(rnn, "weight_hh_l0")
        if kind in ("orthogonal", "two"):
            parametrizations.orthogonal(rnn, "weight_hh_l0" if kind == "orthogonal"
                                        else "weight_ih_l0")
        if kind == "spectral_norm":
            parametrizations.spectral_norm(rnn, "weight_hh_l0")
    model.eval()  # spectral_norm's power iteration runs in training mode only

    def run(model, x):
        model.zero_grad(set_to_none=True)
        y, _ = model[1](model[0](x)[0])
        weighted_loss([y]).backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    x = _x()
    y_want, g_want = run(model, x)
    lists = [dict(rnn.parametrizations) for rnn in model]
    keys = list(model.state_dict())
    lstmgru.convert(model)
    for rnn, old in zip(model, lists):
        assert isinstance(rnn, (lstmgru.LSTM, lstmgru.GRU))
        assert parametrize.is_parametrized(rnn)
        assert set(rnn.parametrizations) == set(old)
        assert all(rnn.parametrizations[n] is old[n] for n in old)
        assert "weight_hh_l0" not in rnn._parameters
    assert list(model.state_dict()) == keys
    y_got, g_got = run(model, x)
    torch.testing.assert_close(y_got, y_want, rtol=0, atol=TOL)
    assert g_got.keys() == g_want.keys()
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], rtol=0, atol=TOL, msg=n)
    # ...and back: torch.nn's modules, parametrized the same way.
    lstmgru.to_torch(model)
    assert _kinds(model) == [nn.LSTM, nn.GRU]
    y_back, _ = run(model, x)
    torch.testing.assert_close(y_back, y_want, rtol=0, atol=TOL)


def test_spectral_norm_in_training_mode_steps_like_torch():
    # In training mode every evaluation of the weight advances the power iteration (buffers
    # u, v in place), so the two must evaluate it equally often. The reference is built
    # afresh: a deep copy's weak references to the weights point at the original's, which
    # changes how often its first forward evaluates them.
    def make():
        torch.manual_seed(0)
        model = nn.LSTM(3, 4, dtype=torch.float64)
        parametrizations.spectral_norm(model, "weight_hh_l0")
        return model

    ref, ours = make(), lstmgru.convert(make())
    for seed in range(3):
        with torch.no_grad():
            torch.testing.assert_close(ours(_x(seed))[0], ref(_x(seed))[0], rtol=0, atol=TOL)


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning")
def test_old_style_weight_norm_keeps_working():
    # torch.nn.utils.weight_norm: parameters weight_g / weight_v, the weight a plain
    # attribute, recomputed by a forward pre-hook.
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4, dtype=torch.float64)
    nn.utils.weight_norm(rnn, "weight_hh_l0")
    want = rnn(_x())[0]
    ours = lstmgru.convert(rnn)
    torch.testing.assert_close(ours(_x())[0], want, rtol=0, atol=TOL)
    with torch.no_grad():
        ours.weight_hh_l0_g.mul_(2)
        rnn.weight_hh_l0_g.mul_(2)  # the same parameter: doubled twice
    torch.testing.assert_close(ours(_x())[0], rnn(_x())[0], rtol=0, atol=TOL)
    assert not torch.allclose(ours(_x())[0], want)


def test_to_torch_refuses_the_original_gru_and_names_the_module():
    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.rnn = lstmgru.GRU(3, 4, reset_after=False)
    model.decoder = nn.ModuleList([lstmgru.LSTM(4, 4), lstmgru.GRUCell(4, 4, reset_after=False)])
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as info:
        lstmgru.to_torch(model)
    message = str(info.value)
    assert "'encoder.rnn' (GRU): reset_after=False" in message
    assert "'decoder.1' (GRUCell): reset_after=False" in message
    assert "original GRU" in message and "decoder.0" not in message
    assert [type(m) for m in model.modules()] == before  # nothing was converted
    with pytest.raises(ValueError, match="the model itself .GRU.: reset_after=False"):
        lstmgru.to_torch(lstmgru.GRU(3, 4, reset_after=False))


def test_to_torch_refuses_cell_variants():
    rnn = lstmgru.LSTM(3, 4)
    rnn.variants = ("zoneout",)
    with pytest.raises(ValueError, match=r"variants=\('zoneout',\)"):
        lstmgru.to_torch(nn.Sequential(rnn))
    rnn.variants = ()
    assert type(lstmgru.to_torch(rnn)) is nn.LSTM


def test_lstmgru_modules_are_never_converted_again():
    ours = lstmgru.LSTM(3, 4)
    model = nn.Sequential(ours, nn.GRU(4, 4))
    lstmgru.convert(model)
    assert model[0] is ours and type(model[1]) is lstmgru.GRU
    again = model[1]
    assert lstmgru.convert(model) is model and model[1] is again

    # A future lstmgru may derive its modules from torch.nn's: still ours, not converted.
    class FutureLSTM(lstmgru.LSTM, nn.LSTM):
        pass

    future = lstmgru.LSTM(3, 4)
    future.__class__ = FutureLSTM
    assert isinstance(future, nn.LSTM)
    assert lstmgru.convert(future) is future
    assert type(lstmgru.to_torch(future)) is nn.LSTM


def test_a_shared_module_is_replaced_by_one_module():
    rnn = nn.LSTM(3, 3)
    model = nn.Sequential(rnn, nn.Sequential(rnn))
    lstmgru.convert(model)
    assert type(model[0]) is lstmgru.LSTM and model[1][0] is model[0]


def test_meta_device_model_converts_without_data():
    with torch.device("meta"):
        model = _model()
        parametrizations.weight_norm(model.lstm_cell, "weight_hh")
    params = list(model.parameters())
    lstmgru.convert(model)
    assert _kinds(model) == list(OUR_TYPES)
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(p.is_meta for p in model.parameters())
    lstmgru.to_torch(model)
    assert _kinds(model) == list(RNN_TYPES)
    model.to_empty(device="cpu")  # and it materialises as usual
    assert not any(p.is_meta for p in model.parameters())


def test_deepcopy_and_to_of_a_converted_model(backend):
    model, x = _model(), _x()
    lstmgru.convert(model)
    want = _run(model, x)
    clone = copy.deepcopy(model)
    assert not any(p is q for p, q in zip(clone.parameters(), model.parameters()))
    assert [type(m) for m in _rnn_modules(clone)] == list(OUR_TYPES)
    _assert_same_run(_run(clone, x), want)
    # The flat-weight lists follow .to() and load_state_dict like torch.nn's.
    clone.float().double()
    clone.load_state_dict(model.state_dict())
    _assert_same_run(_run(clone, x), want)


def test_deepcopy_of_a_converted_parametrized_model():
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 4, dtype=torch.float64)
    parametrizations.weight_norm(rnn, "weight_hh_l0")
    ours = lstmgru.convert(rnn)
    clone = copy.deepcopy(ours)  # (torch's parametrized RNNs copy only before a forward)
    assert clone.parametrizations.weight_hh_l0 is not ours.parametrizations.weight_hh_l0
    with torch.no_grad():
        torch.testing.assert_close(clone(_x())[0], ours(_x())[0], rtol=0, atol=0)


# ------------------------------------------------------------------ subclasses keep their class
class _Describes:
    """A mixin, as packages put beside nn.LSTM."""

    def describe(self):
        return f"{type(self).__name__}({self.input_size}->{self.hidden_size})"


class _TakesLengths(abc.ABC, nn.RNNBase):
    """pytorch-forecasting's pattern: an abstract mixin over nn.RNNBase (abc.ABC first, whose
    __slots__ change the instance layout) whose forward packs per-row lengths, then calls
    torch.nn's forward."""

    uses_lengths = True

    @abc.abstractmethod
    def handle_no_encoding(self, hidden):
        """Implemented by the concrete classes (a check that they stay concrete)."""

    @property
    def output_size(self):
        return self.hidden_size * (2 if self.bidirectional else 1)

    def forward(self, x, hx=None, lengths=None, enforce_sorted=True):
        if lengths is None:
            return super().forward(x, hx)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=self.batch_first,
                                      enforce_sorted=enforce_sorted)
        out, state = super().forward(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=self.batch_first, total_length=x.shape[1])
        return out, state


class _LengthsLSTMBase(_TakesLengths, nn.LSTM):
    def handle_no_encoding(self, hidden):
        return hidden


class LengthsLSTM(_Describes, _LengthsLSTMBase):
    """A second level and a mixin, with an __init__ of its own that takes an argument torch.nn
    does not."""

    def __init__(self, input_size, hidden_size, *, label, **kwargs):
        super().__init__(input_size, hidden_size, batch_first=True, **kwargs)
        self.label = label


class LengthsGRU(_TakesLengths, nn.GRU):
    def handle_no_encoding(self, hidden):
        return hidden


class ScaledCell(nn.GRUCell):
    def forward(self, x, hx=None):
        return 0.5 * super().forward(x, hx)


def _lengths_batch(seed=3, input_size=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, input_size, generator=g, dtype=dtype)  # (B, T, I), batch_first
    return x, torch.tensor([3, 6, 1, 4])  # unsorted, variable


def _lengths_run(model, x, lengths):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out, state = model(x, lengths=lengths, enforce_sorted=False)
    states = list(state) if isinstance(state, tuple) else [state]
    loss = weighted_loss([out] + states)
    loss.backward()
    return loss.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("make", [
    lambda: LengthsLSTM(3, 5, label="enc", num_layers=2, bidirectional=True, dtype=torch.float64),
    lambda: LengthsGRU(3, 5, batch_first=True, num_layers=2, dtype=torch.float64),
], ids=["lstm", "gru"])
def test_a_subclass_that_packs_lengths_gives_torch_nn_numbers(make, backend):
    torch.manual_seed(0)
    theirs = make()
    ours = lstmgru.convert(copy.deepcopy(theirs))
    assert type(ours) is not type(theirs) and isinstance(ours, type(theirs))
    x, lengths = _lengths_batch()
    with lstmgru.use_backend(backend):
        got = _lengths_run(ours, x, lengths)
    want = _lengths_run(theirs, x, lengths)
    tol = 0 if backend == "native" else TOL  # native runs torch's own kernel: bit for bit
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=tol, msg="loss")
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=tol, msg="input gradient")
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=tol, msg=name)


def test_training_a_converted_subclass_steps_like_torch_nn(backend):
    torch.manual_seed(0)
    theirs = LengthsLSTM(3, 4, label="x", dtype=torch.float64)
    ours = lstmgru.convert(copy.deepcopy(theirs))
    x, lengths = _lengths_batch(seed=5)
    for model in (theirs, ours):
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        with lstmgru.use_backend(backend):
            for step in range(4):
                optimizer.zero_grad()
                out, _ = model(x + step, lengths=lengths, enforce_sorted=False)
                weighted_loss([out]).backward()
                optimizer.step()
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_a_converted_subclass_keeps_everything_it_defines():
    model = nn.Sequential(LengthsLSTM(3, 4, label="enc"), nn.Linear(4, 2))
    model[0].extra_state = "kept"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is lost, so no warning
        lstmgru.convert(model)
    rnn = model[0]
    derived = type(rnn)
    # The user's classes first, lstmgru's where torch.nn's were, nothing of torch.nn's RNNs.
    assert LengthsLSTM.__mro__[:7] == (LengthsLSTM, _Describes, _LengthsLSTMBase, _TakesLengths,
                                       abc.ABC, nn.LSTM, nn.RNNBase)
    assert derived.__mro__ == (derived,) + LengthsLSTM.__mro__[:5] + lstmgru.LSTM.__mro__
    assert isinstance(rnn, (LengthsLSTM, _TakesLengths, _Describes, abc.ABC, lstmgru.LSTM))
    assert not isinstance(rnn, (nn.LSTM, nn.RNNBase))
    assert rnn.handle_no_encoding(3) == 3
    assert derived.__name__ == "LengthsLSTM" and derived.__module__ == LengthsLSTM.__module__
    assert (rnn.label, rnn.extra_state, rnn.uses_lengths, rnn.output_size) == ("enc", "kept",
                                                                               True, 4)
    assert rnn.describe() == "LengthsLSTM(3->4)"
    assert repr(rnn).startswith("LengthsLSTM(3, 4, batch_first=True)")
    # One derived class per user class.
    assert type(lstmgru.convert(LengthsLSTM(2, 3, label="y"))) is derived
    # super().forward reaches lstmgru's forward, which takes lstmgru's own arguments.
    x = torch.randn(2, 3, 3)
    reset = torch.zeros(2, 3, dtype=torch.bool)
    torch.testing.assert_close(super(_TakesLengths, rnn).forward(x, reset=reset)[0],
                               rnn(x)[0], rtol=0, atol=0)  # no reset: torch's kernel
    # to_torch gives back the user's class itself, in working order.
    back = lstmgru.to_torch(model)[0]
    assert type(back) is LengthsLSTM and back.label == "enc" and back.extra_state == "kept"
    lengths = torch.tensor([3, 1])
    torch.testing.assert_close(back(x, lengths=lengths, enforce_sorted=False)[0],
                               rnn(x, lengths=lengths, enforce_sorted=False)[0], rtol=0, atol=0)
    assert "label" not in vars(nn.LSTM(3, 4))  # (torch.nn's class was not touched)


def test_converted_cell_subclass_and_the_round_trip():
    torch.manual_seed(0)
    theirs = ScaledCell(3, 4, dtype=torch.float64)
    ours = lstmgru.convert(copy.deepcopy(theirs))
    assert isinstance(ours, (ScaledCell, lstmgru.GRUCell)) and type(ours).__mro__[1] is ScaledCell
    x, h = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x, h), theirs(x, h), rtol=0, atol=0)
    assert type(lstmgru.to_torch(ours)) is ScaledCell


def test_a_parametrized_subclass_converts_both_ways(backend):
    torch.manual_seed(0)
    theirs = LengthsGRU(3, 4, batch_first=True, dtype=torch.float64)
    parametrizations.weight_norm(theirs, "weight_hh_l0")
    assert type(theirs).__name__ == "ParametrizedLengthsGRU"
    ours = lstmgru.convert(copy.deepcopy(theirs))
    assert parametrize.is_parametrized(ours, "weight_hh_l0")
    assert type(ours).__bases__[0] is lstmgru.convert.__globals__["_DERIVED"][LengthsGRU]
    x, lengths = _lengths_batch(input_size=3)
    with lstmgru.use_backend(backend):
        got = _lengths_run(ours, x, lengths)
    want = _lengths_run(theirs, x, lengths)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=TOL)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=TOL, msg=name)
    back = lstmgru.to_torch(ours)
    assert type(back).__bases__[0] is LengthsGRU and type(back).__name__ == "ParametrizedLengthsGRU"


def test_a_subclass_overriding_what_only_torch_calls_is_named_without_python_internals():
    class Checks(nn.LSTM, abc.ABC):
        def check_forward_args(self, input, hidden, batch_sizes):
            return super().check_forward_args(input, hidden, batch_sizes)

        def helper(self):
            return 1

    with pytest.warns(UserWarning) as caught:
        converted = lstmgru.convert(nn.Sequential(Checks(3, 4)))
    message = str(caught[0].message)
    assert message.startswith("convert: '0' is a ")
    assert "overrides check_forward_args: only torch's own kernel path calls" in message
    for internal in ("_abc_impl", "__module__", "__dict__", "helper"):
        assert internal not in message
    assert converted[0].helper() == 1


def test_to_torch_of_a_subclass_of_an_lstmgru_class_names_what_is_lost():
    class LastStep(lstmgru.GRU):
        def forward(self, x, hx=None):
            return super().forward(x, hx)[0][-1]

    with pytest.warns(UserWarning, match=r"'1' is a .*LastStep, a subclass of lstmgru.GRU; it "
                      r"becomes a plain torch.nn.GRU, so what the subclass defines \(forward\) "
                      r"is not carried"):
        model = lstmgru.to_torch(nn.Sequential(nn.Linear(3, 3), LastStep(3, 4)))
    assert type(model[1]) is nn.GRU


# ------------------------------------------------------------------ pickling and loading
def _converted_model():
    torch.manual_seed(0)
    return lstmgru.convert(nn.ModuleList([LengthsLSTM(3, 4, label="enc"), nn.GRU(3, 2),
                                          ScaledCell(3, 2)]))


def _outputs(model):
    x, lengths = _lengths_batch(dtype=torch.float32)
    return [model[0](x, lengths=lengths, enforce_sorted=False)[0], model[1](x)[0],
            model[2](x[:, 0])]


def _assert_same_model(got, want):
    assert [type(m) for m in got] == [type(m) for m in want]
    assert got[0].label == "enc"
    for a, b in zip(_outputs(got), _outputs(want)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pickle_deepcopy_and_torch_save_of_converted_subclasses():
    model = _converted_model()
    _assert_same_model(pickle.loads(pickle.dumps(model)), model)
    _assert_same_model(copy.deepcopy(model), model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    _assert_same_model(torch.load(buffer, weights_only=False), model)


def test_weights_only_load_of_a_whole_model():
    # lstmgru's classes are allowed by `import lstmgru`.
    plain = lstmgru.LSTM(3, 4, num_layers=2, layer_norm=True)
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(loaded(x)[0], plain(x)[0], rtol=0, atol=0)
    # A converted subclass: the user allows their own classes, and the message names them.
    model = _converted_model()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    with pytest.raises(Exception, match=r"add_safe_globals\(\[torch.nn.modules.container."
                                        r"ModuleList\]\)"):
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    with torch.serialization.safe_globals([nn.ModuleList]):
        with pytest.raises(Exception, match=rf"add_safe_globals\(\[{__name__}.LengthsLSTM\]\)"):
            torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    with torch.serialization.safe_globals([nn.ModuleList, nn.GRU, LengthsLSTM, ScaledCell]):
        _assert_same_model(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), model)


def test_a_converted_subclass_unpickles_in_a_new_process(tmp_path):
    # In a new process the derived class does not exist yet: unpickling makes it.
    (tmp_path / "user_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Doubled(nn.GRU):
            def __init__(self, size, factor):
                super().__init__(size, size)
                self.factor = factor

            def forward(self, x, hx=None):
                return self.factor * super().forward(x, hx)[0]
    """))
    path = str(tmp_path / "model.pt")
    script = textwrap.dedent("""
        import sys, torch, lstmgru
        from user_models import Doubled
        path = sys.argv[2]
        x = torch.ones(2, 1, 3)
        if sys.argv[1] == "save":
            torch.manual_seed(0)
            torch.save(lstmgru.convert(Doubled(3, 2.0)), path)
            torch.save(torch.load(path, weights_only=False)(x), path + ".out")
        else:
            torch.serialization.add_safe_globals([Doubled])
            model = torch.load(path, weights_only=True)
            assert type(model).__mro__[1:3] == (Doubled, lstmgru.GRU), type(model).__mro__
            assert model.factor == 2.0
            assert torch.equal(model(x), torch.load(path + ".out")), "outputs differ"
            print("loaded")
    """)
    env = {"PYTHONPATH": str(tmp_path), "PATH": ""}
    for step in ("save", "load"):
        run = subprocess.run([sys.executable, "-c", script, step, path], env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "loaded"
