"""Cell variants (layer_norm, zoneout, recurrent_dropout, weight_drop) and forward(reset=...).

Every equation is held against a naive step loop written here, independently of
``lstmgru/cells/variants.py``. Masks are reproduced by re-seeding and drawing them in the
documented order (per layer-direction: weight mask, recurrent mask, zoneout mask).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmgru

T, B, I, H = 5, 3, 4, 6


# ------------------------------------------------------------------ naive oracles
def ln(v, gain, bias=None):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    out = (v - mean) / torch.sqrt(var + 1e-5) * gain
    return out if bias is None else out + bias


def naive_lstm(x, h, c, p, norm=False, keep=None, zone_p=0.0, rmask=None, wmask=None,
               cuts=None, reverse=False):
    """p: dict w_ih, w_hh, b_ih, b_hh (+ g_ih, g_hh, g_c, b_c). cuts[t]: zero entering t."""
    w_hh = p["w_hh"] if wmask is None else p["w_hh"] * wmask
    ys = [None] * x.shape[0]
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        if cuts is not None and cuts[t] is not None:
            h = h * (~cuts[t]).unsqueeze(1)
            c = c * (~cuts[t]).unsqueeze(1)
        hm = h if rmask is None else h * rmask
        gx, gh = x[t] @ p["w_ih"].t(), hm @ w_hh.t()
        if norm:
            gx, gh = ln(gx, p["g_ih"]), ln(gh, p["g_hh"])
        a = gx + gh + p["b_ih"] + p["b_hh"]
        i, f, g, o = a[:, :H].sigmoid(), a[:, H:2 * H].sigmoid(), a[:, 2 * H:3 * H].tanh(), \
            a[:, 3 * H:].sigmoid()
        c = f * c + i * g
        h_new = o * torch.tanh(ln(c, p["g_c"], p["b_c"]) if norm else c)
        if keep is not None:
            h_new = keep[t] * h + (1 - keep[t]) * h_new
        elif zone_p:
            h_new = zone_p * h + (1 - zone_p) * h_new
        h = h_new
        ys[t] = h
    return torch.stack(ys), h, c


def naive_gru(x, h, p, norm=False, keep=None, zone_p=0.0, rmask=None, wmask=None, cuts=None,
              reverse=False, reset_after=True):
    w_hh = p["w_hh"] if wmask is None else p["w_hh"] * wmask
    ys = [None] * x.shape[0]
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        if cuts is not None and cuts[t] is not None:
            h = h * (~cuts[t]).unsqueeze(1)
        hm = h if rmask is None else h * rmask
        gx = x[t] @ p["w_ih"].t()
        if norm:
            gx = ln(gx, p["g_ih"])
        gx = gx + p["b_ih"]
        if reset_after:
            gh = hm @ w_hh.t()
            if norm:
                gh = ln(gh, p["g_hh"])
            gh = gh + p["b_hh"]
            r = torch.sigmoid(gx[:, :H] + gh[:, :H])
            z = torch.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
            n = torch.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
        else:
            r = torch.sigmoid(gx[:, :H] + hm @ w_hh[:H].t() + p["b_hh"][:H])
            z = torch.sigmoid(gx[:, H:2 * H] + hm @ w_hh[H:2 * H].t() + p["b_hh"][H:2 * H])
            n = torch.tanh(gx[:, 2 * H:] + (r * hm) @ w_hh[2 * H:].t() + p["b_hh"][2 * H:])
        h_new = (1 - z) * n + z * h
        if keep is not None:
            h_new = keep[t] * h + (1 - keep[t]) * h_new
        elif zone_p:
            h_new = zone_p * h + (1 - zone_p) * h_new
        h = h_new
        ys[t] = h
    return torch.stack(ys), h


def params(m, suffix="_l0"):
    cell = isinstance(m, (lstmgru.LSTMCell, lstmgru.GRUCell))
    s = "" if cell else suffix
    p = {"w_ih": getattr(m, "weight_ih" + s), "w_hh": getattr(m, "weight_hh" + s),
         "b_ih": getattr(m, "bias_ih" + s), "b_hh": getattr(m, "bias_hh" + s)}
    for k, name in (("g_ih", "ln_ih_weight"), ("g_hh", "ln_hh_weight"), ("g_c", "ln_c_weight"),
                    ("b_c", "ln_c_bias")):
        if hasattr(m, name + s):
            p[k] = getattr(m, name + s)
    return p


def randomize(m):
    with torch.no_grad():
        for name, w in m.named_parameters():
            if name.startswith("ln_"):
                w.uniform_(0.5, 1.5) if "weight" in name else w.uniform_(-0.5, 0.5)


def make(cls, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    m = cls(I, H, dtype=dtype, **kw)
    randomize(m)
    return m


def data(dtype=torch.float64, batch=B, steps=T):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, I, generator=g, dtype=dtype)
    h0 = torch.randn(batch, H, generator=g, dtype=dtype)
    c0 = torch.randn(batch, H, generator=g, dtype=dtype)
    return x, h0, c0


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------ equations
@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_norm_lstm_matches_naive(bidirectional):
    m = make(lstmgru.LSTM, layer_norm=True, bidirectional=bidirectional).eval()
    x, h0, c0 = data()
    D = 2 if bidirectional else 1
    y, (h_n, c_n) = m(x, (h0.expand(D, B, H), c0.expand(D, B, H)))
    yf, hf, cf = naive_lstm(x, h0, c0, params(m), norm=True)
    close(y[..., :H], yf)
    close(h_n[0], hf)
    close(c_n[0], cf)
    if bidirectional:
        yr, hr, cr = naive_lstm(x, h0, c0, params(m, "_l0_reverse"), norm=True, reverse=True)
        close(y[..., H:], yr)
        close(h_n[1], hr)
        close(c_n[1], cr)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_norm_gru_matches_naive(bidirectional):
    m = make(lstmgru.GRU, layer_norm=True, bidirectional=bidirectional).eval()
    x, h0, _ = data()
    D = 2 if bidirectional else 1
    y, h_n = m(x, h0.expand(D, B, H).contiguous())
    yf, hf = naive_gru(x, h0, params(m), norm=True)
    close(y[..., :H], yf)
    close(h_n[0], hf)
    if bidirectional:
        yr, hr = naive_gru(x, h0, params(m, "_l0_reverse"), norm=True, reverse=True)
        close(y[..., H:], yr)
        close(h_n[1], hr)


def test_layer_norm_parameters_names_order_and_init():
    m = lstmgru.LSTM(I, H, num_layers=2, bidirectional=True, layer_norm=True)
    names = list(m.state_dict())
    expected = []
    for k in range(2):
        for suffix in ("", "_reverse"):
            expected += [f"{n}_l{k}{suffix}" for n in (
                "weight_ih", "weight_hh", "bias_ih", "bias_hh", "ln_ih_weight", "ln_hh_weight",
                "ln_c_weight", "ln_c_bias")]
    assert names == expected
    assert m.ln_ih_weight_l1_reverse.shape == (4 * H,) and m.ln_c_bias_l0.shape == (H,)
    assert torch.equal(m.ln_hh_weight_l0, torch.ones(4 * H))
    assert torch.equal(m.ln_c_bias_l1, torch.zeros(H))
    g = lstmgru.GRU(I, H, layer_norm=True)
    assert list(g.state_dict()) == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                                    "ln_ih_weight_l0", "ln_hh_weight_l0"]
    assert list(lstmgru.LSTMCell(I, H, layer_norm=True).state_dict())[4:] == [
        "ln_ih_weight", "ln_hh_weight", "ln_c_weight", "ln_c_bias"]
    assert list(lstmgru.GRUCell(I, H, layer_norm=True).state_dict())[4:] == [
        "ln_ih_weight", "ln_hh_weight"]
    # the other parameters draw exactly what torch.nn draws
    torch.manual_seed(3)
    ours = lstmgru.LSTM(I, H, layer_norm=True)
    torch.manual_seed(3)
    theirs = torch.nn.LSTM(I, H)
    for name, w in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], w)


def test_defaults_keep_torch_state_dict_and_output():
    for ours_cls, theirs_cls in ((lstmgru.LSTM, torch.nn.LSTM), (lstmgru.GRU, torch.nn.GRU)):
        ours = ours_cls(I, H, layer_norm=False, zoneout=0.0, recurrent_dropout=0.0,
                        weight_drop=0.0, dtype=torch.float64)
        theirs = theirs_cls(I, H, dtype=torch.float64)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
        x = data()[0]
        close(ours(x)[0], theirs(x)[0])


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_zoneout_training_and_eval_match_naive(cell):
    m = make(getattr(lstmgru, cell), zoneout=0.3)
    x, h0, c0 = data()
    p = 0.3
    torch.manual_seed(7)
    y = m(x, (h0[None], c0[None]) if cell == "LSTM" else h0[None])[0]
    torch.manual_seed(7)
    keep = torch.bernoulli(torch.full((T, B, H), p, dtype=torch.float64))
    assert 0 < keep.mean() < 1
    naive = naive_lstm(x, h0, c0, params(m), keep=keep) if cell == "LSTM" else \
        naive_gru(x, h0, params(m), keep=keep)
    close(y, naive[0])
    m.eval()
    y = m(x, (h0[None], c0[None]) if cell == "LSTM" else h0[None])[0]
    naive = naive_lstm(x, h0, c0, params(m), zone_p=p) if cell == "LSTM" else \
        naive_gru(x, h0, params(m), zone_p=p)
    close(y, naive[0])


@pytest.mark.parametrize("cell,reset_after", [("LSTM", True), ("GRU", True), ("GRU", False)])
def test_recurrent_dropout_and_weight_drop_match_naive(cell, reset_after):
    kw = {} if cell == "LSTM" else {"reset_after": reset_after}
    m = make(getattr(lstmgru, cell), recurrent_dropout=0.4, weight_drop=0.5, **kw)
    x, h0, c0 = data()
    hx = (h0[None], c0[None]) if cell == "LSTM" else h0[None]
    w_before = m.weight_hh_l0.detach().clone()
    torch.manual_seed(11)
    y = m(x, hx)[0]
    torch.manual_seed(11)
    wmask = F.dropout(torch.ones(4 * H if cell == "LSTM" else 3 * H, H, dtype=torch.float64), 0.5)
    rmask = F.dropout(torch.ones(B, H, dtype=torch.float64), 0.4)
    assert set(rmask.unique().tolist()) <= {0.0, 1 / 0.6} and (rmask == 0).any()
    naive = naive_lstm(x, h0, c0, params(m), rmask=rmask, wmask=wmask) if cell == "LSTM" else \
        naive_gru(x, h0, params(m), rmask=rmask, wmask=wmask, reset_after=reset_after)
    close(y, naive[0])
    assert torch.equal(m.weight_hh_l0.detach(), w_before)
    # eval: nothing (and torch.nn's own kernels may run it)
    m.eval()
    naive = naive_lstm(x, h0, c0, params(m)) if cell == "LSTM" else \
        naive_gru(x, h0, params(m), reset_after=reset_after)
    close(m(x, hx)[0], naive[0])


def test_all_variants_together_match_naive_lstm():
    m = make(lstmgru.LSTM, layer_norm=True, zoneout=0.2, recurrent_dropout=0.3, weight_drop=0.25)
    x, h0, c0 = data()
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[2, 0] = reset[3, 2] = True
    torch.manual_seed(5)
    y, (h_n, c_n) = m(x, (h0[None], c0[None]), reset=reset)
    torch.manual_seed(5)
    wmask = F.dropout(torch.ones(4 * H, H, dtype=torch.float64), 0.25)
    rmask = F.dropout(torch.ones(B, H, dtype=torch.float64), 0.3)
    keep = torch.bernoulli(torch.full((T, B, H), 0.2, dtype=torch.float64))
    yn, hn, cn = naive_lstm(x, h0, c0, params(m), norm=True, keep=keep, rmask=rmask,
                            wmask=wmask, cuts=list(reset))
    close(y, yn)
    close(h_n[0], hn)
    close(c_n[0], cn)


# ------------------------------------------------------------------ limit cases
def test_zoneout_one_keeps_h0():
    for training in (True, False):
        m = make(lstmgru.GRU, zoneout=1.0).train(training)
        x, h0, _ = data()
        y, h_n = m(x, h0[None])
        close(y, h0.expand(T, B, H))
        m = make(lstmgru.LSTM, zoneout=1.0).train(training)
        y, (h_n, c_n) = m(x, (h0[None], data()[2][None]))
        close(y, h0.expand(T, B, H))


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_recurrent_dropout_one_removes_recurrent_term(cell):
    m = make(getattr(lstmgru, cell), recurrent_dropout=1.0)
    x, h0, c0 = data()
    hx = (h0[None], c0[None]) if cell == "LSTM" else h0[None]
    plain = make(getattr(lstmgru, cell))
    with torch.no_grad():
        plain.weight_hh_l0.zero_()
    close(m(x, hx)[0], plain(x, hx)[0])


def test_weight_drop_one_removes_recurrent_weights():
    m = make(lstmgru.LSTM, weight_drop=1.0)
    plain = make(lstmgru.LSTM)
    with torch.no_grad():
        plain.weight_hh_l0.zero_()
    x, h0, c0 = data()
    close(m(x, (h0[None], c0[None]))[0], plain(x, (h0[None], c0[None]))[0])


def test_zero_probabilities_equal_plain_module():
    x = data()[0]
    m = make(lstmgru.LSTM, zoneout=0.0, recurrent_dropout=0.0, weight_drop=0.0)
    plain = make(lstmgru.LSTM)
    close(m(x)[0], plain(x)[0])


# ------------------------------------------------------------------ resets
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_reset_every_step_equals_independent_steps(cell):
    m = make(getattr(lstmgru, cell), layer_norm=True, bidirectional=True).eval()
    x, h0, c0 = data()
    hx = (h0.expand(2, B, H), c0.expand(2, B, H)) if cell == "LSTM" else \
        h0.expand(2, B, H).contiguous()
    y = m(x, hx, reset=torch.ones(T, B, dtype=torch.bool))[0]
    # every forward step starts from zero; the reverse half of hx enters step T-1 only
    for t in range(T):
        init = None if t < T - 1 else hx
        if init is not None:
            zero_fwd = (torch.zeros(2, B, H, dtype=x.dtype),) * 2
            init = (torch.stack([zero_fwd[0][0], hx[0][1]]),
                    torch.stack([zero_fwd[1][0], hx[1][1]])) if cell == "LSTM" else \
                torch.stack([zero_fwd[0][0], hx[1]])
        close(y[t], m(x[t:t + 1], init)[0][0])


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_reset_in_the_middle_equals_two_sequences(cell):
    m = make(getattr(lstmgru, cell), layer_norm=True, bidirectional=True).eval()
    x, h0, c0 = data(batch=1)
    k = 2
    reset = torch.zeros(T, 1, dtype=torch.bool)
    reset[k] = True
    z = torch.zeros(1, H, dtype=x.dtype)
    if cell == "LSTM":
        hx = (torch.stack([h0, h0 + 1]), torch.stack([c0, c0 - 1]))
        first = (torch.stack([hx[0][0], z]), torch.stack([hx[1][0], z]))
        second = (torch.stack([z, hx[0][1]]), torch.stack([z, hx[1][1]]))
    else:
        hx = torch.stack([h0, h0 + 1])
        first, second = torch.stack([hx[0], z]), torch.stack([z, hx[1]])
    y, final = m(x, hx, reset=reset)
    y1, f1 = m(x[:k], first)
    y2, f2 = m(x[k:], second)
    close(y, torch.cat([y1, y2]))
    finals = final if cell == "LSTM" else (final,)
    f1s = f1 if cell == "LSTM" else (f1,)
    f2s = f2 if cell == "LSTM" else (f2,)
    for got, a, b in zip(finals, f1s, f2s):
        close(got[0], b[0])   # forward: ends in the second part
        close(got[1], a[1])   # reverse: ends at step 0, in the first part


def test_reverse_reset_at_step_zero_and_outputs_are_not_zeroed():
    m = make(lstmgru.GRU, bidirectional=True).eval()
    x, h0, _ = data()
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[0] = True  # reverse: cuts nothing (no step -1); forward: hx never enters
    y, h_n = m(x, h0.expand(2, B, H).contiguous(), reset=reset)
    y0, h_n0 = m(x, torch.stack([torch.zeros(B, H, dtype=x.dtype), h0]))
    close(y, y0)
    close(h_n, h_n0)
    assert (y.abs() > 0).all()


def test_no_gradient_across_a_reset():
    m = make(lstmgru.LSTM, zoneout=0.5)
    x, h0, c0 = data()
    x.requires_grad_(True)
    h0.requires_grad_(True)
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[3, 1] = True
    y = m(x, (h0[None], c0[None]), reset=reset)[0]
    y[3:, 1].sum().backward()
    assert torch.count_nonzero(x.grad[:3, 1]) == 0 and torch.count_nonzero(h0.grad[1]) == 0
    assert torch.count_nonzero(x.grad[3:, 1]) > 0


def test_reset_layouts_batch_first_unbatched_and_packed():
    m = make(lstmgru.GRU, zoneout=0.2).eval()
    x = data()[0]
    reset = torch.rand(T, B, generator=torch.Generator().manual_seed(2)) < 0.4
    y = m(x, reset=reset)[0]
    mb = make(lstmgru.GRU, zoneout=0.2, batch_first=True).eval()
    close(mb(x.transpose(0, 1), reset=reset.t())[0], y.transpose(0, 1))
    for b in range(B):
        close(m(x[:, b], reset=reset[:, b])[0], y[:, b])
    # packed, unsorted lengths; reset in the original batch order, entries past a length ignored
    lengths = torch.tensor([3, 5, 2])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, h_n = m(packed, reset=reset)
    out, _ = pad_packed_sequence(out)
    for b in range(B):
        L = int(lengths[b])
        yb, hb = m(x[:L, b:b + 1], reset=reset[:L, b:b + 1])
        close(out[:L, b], yb[:, 0])
        close(h_n[0, b], hb[0, 0])
    with pytest.raises(ValueError):
        m(x, reset=reset.t())
    with pytest.raises(ValueError):
        m(x, reset=reset.float())


def test_packed_reverse_reset():
    m = make(lstmgru.LSTM, bidirectional=True).eval()
    x = data()[0]
    reset = torch.rand(T, B, generator=torch.Generator().manual_seed(4)) < 0.5
    lengths = torch.tensor([4, 2, 5])
    out, (h_n, c_n) = m(pack_padded_sequence(x, lengths, enforce_sorted=False), reset=reset)
    out, _ = pad_packed_sequence(out)
    for b in range(B):
        L = int(lengths[b])
        yb, (hb, cb) = m(x[:L, b:b + 1], reset=reset[:L, b:b + 1])
        close(out[:L, b], yb[:, 0])
        close(h_n[:, b], hb[:, 0])
        close(c_n[:, b], cb[:, 0])


# ------------------------------------------------------------------ cells
def test_cells_match_one_step_of_the_layer():
    x, h0, c0 = data()
    reset = torch.tensor([True, False, True])
    for cell_cls, layer_cls in ((lstmgru.LSTMCell, lstmgru.LSTM),
                                (lstmgru.GRUCell, lstmgru.GRU)):
        cell = make(cell_cls, layer_norm=True, zoneout=0.3).eval()
        layer = make(layer_cls, layer_norm=True, zoneout=0.3).eval()
        layer.load_state_dict({k + "_l0": v for k, v in cell.state_dict().items()})
        lstm = cell_cls is lstmgru.LSTMCell
        got = cell(x[0], (h0, c0) if lstm else h0, reset=reset)
        want = layer(x[:1], (h0[None], c0[None]) if lstm else h0[None], reset=reset[None])[1]
        if lstm:
            close(got[0], want[0][0])
            close(got[1], want[1][0])
        else:
            close(got, want[0])
        unbatched = cell(x[0, 0], (h0[0], c0[0]) if lstm else h0[0], reset=torch.tensor(True))
        fresh = cell(x[0, 0])
        close(unbatched[0] if lstm else unbatched, fresh[0] if lstm else fresh)


# ------------------------------------------------------------------ gradients, seeds, errors
@pytest.mark.parametrize("cell,reset_after", [("LSTM", True), ("GRU", True), ("GRU", False)])
def test_gradcheck_with_all_variants(cell, reset_after):
    kw = {"layer_norm": reset_after}
    if cell == "GRU":
        kw["reset_after"] = reset_after
    m = make(getattr(lstmgru, cell), zoneout=0.3, recurrent_dropout=0.2, weight_drop=0.2,
             bidirectional=True, **kw)
    x, h0, c0 = data(batch=2, steps=3)
    reset = torch.tensor([[False, False], [True, False], [False, True]])
    names = [n for n, _ in m.named_parameters()]
    flat = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    h = h0.expand(2, 2, H).clone().requires_grad_(True)
    c = c0.expand(2, 2, H).clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)

    def f(x, h, c, *weights):
        torch.manual_seed(9)
        out = torch.func.functional_call(m, dict(zip(names, weights)),
                                         (x, (h, c) if cell == "LSTM" else h),
                                         {"reset": reset})
        return out[0], out[1][0] if cell == "LSTM" else out[1]

    assert torch.autograd.gradcheck(f, (x, h, c, *flat), fast_mode=True)


def test_double_backward_runs():
    m = make(lstmgru.GRU, layer_norm=True, zoneout=0.3)
    x = data()[0].requires_grad_(True)
    torch.manual_seed(1)
    g, = torch.autograd.grad(m(x)[0].pow(2).sum(), x, create_graph=True)
    g.sum().backward()
    assert m.weight_hh_l0.grad is not None


def test_masks_follow_torch_rng():
    m = make(lstmgru.LSTM, zoneout=0.3, recurrent_dropout=0.3, weight_drop=0.3, num_layers=2)
    x = data()[0]
    torch.manual_seed(21)
    a = m(x)[0]
    torch.manual_seed(21)
    b = m(x)[0]
    c = m(x)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.1", True, None, math.nan])
@pytest.mark.parametrize("name", ["zoneout", "recurrent_dropout", "weight_drop"])
def test_bad_probabilities(bad, name):
    for cls in (lstmgru.LSTM, lstmgru.GRU, lstmgru.LSTMCell, lstmgru.GRUCell):
        with pytest.raises(ValueError):
            cls(I, H, **{name: bad})


def test_refusals_and_routing():
    with pytest.raises(ValueError):
        lstmgru.GRU(I, H, layer_norm=True, reset_after=False)
    with pytest.raises(ValueError):
        lstmgru.GRUCell(I, H, layer_norm=True, reset_after=False)
    with pytest.raises(ValueError):
        lstmgru.LSTM(I, H, proj_size=2, layer_norm=True)
    m = lstmgru.LSTM(I, H, layer_norm=True)
    x = torch.randn(T, B, I)
    with lstmgru.use_backend("native"), pytest.raises(RuntimeError, match="layer_norm"):
        m(x)
    # Resets after t=0 are beyond torch's kernels (those at t=0 only zero the initial state:
    # tests/test_step_path.py).
    late = torch.zeros(T, B, dtype=torch.bool)
    late[1, 0] = True
    with lstmgru.use_backend("native"), pytest.raises(RuntimeError, match="reset"):
        lstmgru.GRU(I, H)(x, reset=late)
    with lstmgru.use_backend("reference"):
        m(x)
    assert m.variants == ("layer_norm",)
    # recurrent_dropout/weight_drop are not in force in eval: torch's kernels may run it
    e = lstmgru.GRU(I, H, recurrent_dropout=0.5, weight_drop=0.5).eval()
    with lstmgru.use_backend("native"):
        e(x)
    with pytest.raises(ValueError):
        lstmgru.to_torch(lstmgru.GRU(I, H, zoneout=0.1))
