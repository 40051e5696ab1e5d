"""The article's (original) GRU: ``lstmgru.GRU(reset_after=False)`` and ``GRUCell``.

torch.nn and cuDNN only compute the GRU with the reset gate applied *after* the recurrent
product, ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``. The seed article writes the
original form, ``n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)``, which lstmgru offers with
``reset_after=False`` on the same parameters. The oracle here is a step-by-step float64
implementation of the article's equations written in this file, independent of lstmgru;
outputs and the gradients of the input, the initial state and every parameter (by name)
must agree.
"""
from __future__ import annotations

import os

import pytest
import torch

import lstmgru

DT = torch.float64
# fp64 on both sides, same operations in a different order: agreement is near machine
# precision; 1e-10 leaves room for T-step accumulation without hiding a wrong formula.
TOL = dict(rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- oracle
def article_cell(x, h, w_ih, w_hh, b_ih, b_hh, update="torch"):
    """One step of the original GRU, written gate by gate as in the article.

    ``update="torch"``: h' = (1 - z) * n + z * h   (torch.nn's convention)
    ``update="article"``: h' = (1 - z) * h + z * n (the article's convention)
    Weights follow torch's layout: rows r, z, n.
    """
    hidden = h.shape[-1]
    w_ir, w_iz, w_in = w_ih.split(hidden, 0)
    w_hr, w_hz, w_hn = w_hh.split(hidden, 0)
    if b_ih is None:
        b_ir = b_iz = b_in = b_hr = b_hz = b_hn = 0.0
    else:
        b_ir, b_iz, b_in = b_ih.split(hidden, 0)
        b_hr, b_hz, b_hn = b_hh.split(hidden, 0)
    r = torch.sigmoid(x @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
    z = torch.sigmoid(x @ w_iz.T + b_iz + h @ w_hz.T + b_hz)
    n = torch.tanh(x @ w_in.T + b_in + (r * h) @ w_hn.T + b_hn)
    if update == "torch":
        return (1 - z) * n + z * h
    return (1 - z) * h + z * n


def article_gru(x, h0, params, num_layers, bidirectional, batch_first, bias, update="torch"):
    """Multi-layer (bi)directional original GRU by explicit loops. Returns (output, h_n)."""
    if batch_first:
        x = x.transpose(0, 1)
    seq_len = x.shape[0]
    directions = 2 if bidirectional else 1
    layer_input = x
    finals = []
    for layer in range(num_layers):
        outs = []
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
            w_ih, w_hh = params["weight_ih" + sfx], params["weight_hh" + sfx]
            b_ih = params["bias_ih" + sfx] if bias else None
            b_hh = params["bias_hh" + sfx] if bias else None
            h = h0[layer * directions + d]
            steps = range(seq_len - 1, -1, -1) if d == 1 else range(seq_len)
            ys = [None] * seq_len
            for t in steps:
                h = article_cell(layer_input[t], h, w_ih, w_hh, b_ih, b_hh, update)
                ys[t] = h
            outs.append(torch.stack(ys))
            finals.append(h)
        layer_input = torch.cat(outs, dim=-1)
    out = layer_input.transpose(0, 1) if batch_first else layer_input
    return out, torch.stack(finals)


# ----------------------------------------------------------------------------- helpers
def _randomize(module, gen, scale=0.5):
    # Non-default, non-trivial values everywhere (biases included) so that a bias that is
    # dropped, swapped or misplaced shows up in the comparison.
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _weighted_loss(tensors, gen):
    # Each output element gets its own weight, so a permutation of outputs is detected.
    return sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in tensors)


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=False)


CONFIGS = [
    # num_layers, bidirectional, batch_first, bias
    (1, False, False, True),
    (1, False, True, True),
    (2, False, False, True),
    (1, True, False, True),
    (3, True, True, True),
    (2, True, False, False),
]


@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias", CONFIGS)
def test_gru_reset_before_matches_article(num_layers, bidirectional, batch_first, bias):
    gen = torch.Generator().manual_seed(1000 + num_layers * 10 + bidirectional * 2 + batch_first)
    input_size, hidden, seq_len, batch = 5, 7, 6, 3
    directions = 2 if bidirectional else 1
    gru = lstmgru.GRU(
        input_size,
        hidden,
        num_layers=num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        reset_after=False,
        dtype=DT,
    )
    _randomize(gru, gen)
    shape = (batch, seq_len, input_size) if batch_first else (seq_len, batch, input_size)
    x = torch.randn(shape, generator=gen, dtype=DT, requires_grad=True)
    h0 = torch.randn(num_layers * directions, batch, hidden, generator=gen, dtype=DT,
                     requires_grad=True)

    out, hn = gru(x, h0)

    names = [n for n, _ in gru.named_parameters()]
    ref_params = {n: p.detach().clone().requires_grad_(True) for n, p in gru.named_parameters()}
    x_ref = x.detach().clone().requires_grad_(True)
    h0_ref = h0.detach().clone().requires_grad_(True)
    out_ref, hn_ref = article_gru(x_ref, h0_ref, ref_params, num_layers, bidirectional,
                                  batch_first, bias)

    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(hn, hn_ref, **TOL)

    loss_gen = torch.Generator().manual_seed(7)
    loss = _weighted_loss([out, hn], loss_gen)
    loss_gen.manual_seed(7)
    loss_ref = _weighted_loss([out_ref, hn_ref], loss_gen)
    got = _grads(loss, [x, h0, *[dict(gru.named_parameters())[n] for n in names]])
    want = _grads(loss_ref, [x_ref, h0_ref, *[ref_params[n] for n in names]])
    for name, g, w in zip(["input", "h0", *names], got, want):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_gru_reset_before_default_h0():
    # No h0 means zeros, as in torch.nn.
    gen = torch.Generator().manual_seed(3)
    gru = lstmgru.GRU(4, 6, num_layers=2, reset_after=False, dtype=DT)
    _randomize(gru, gen)
    x = torch.randn(5, 2, 4, generator=gen, dtype=DT)
    params = dict(gru.named_parameters())
    out_ref, hn_ref = article_gru(x, torch.zeros(2, 2, 6, dtype=DT), params, 2, False, False,
                                  True)
    out, hn = gru(x)
    torch.testing.assert_close(out.detach(), out_ref.detach(), **TOL)
    torch.testing.assert_close(hn.detach(), hn_ref.detach(), **TOL)


def test_gru_reset_before_unbatched():
    gen = torch.Generator().manual_seed(4)
    gru = lstmgru.GRU(4, 6, reset_after=False, dtype=DT)
    _randomize(gru, gen)
    x = torch.randn(5, 4, generator=gen, dtype=DT)
    h0 = torch.randn(1, 6, generator=gen, dtype=DT)
    out, hn = gru(x, h0)
    out_ref, hn_ref = article_gru(x[:, None], h0[:, None], dict(gru.named_parameters()), 1,
                                  False, False, True)
    torch.testing.assert_close(out.detach(), out_ref[:, 0].detach(), **TOL)
    torch.testing.assert_close(hn.detach(), hn_ref[:, 0].detach(), **TOL)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_grucell_reset_before_matches_article(bias, batched):
    gen = torch.Generator().manual_seed(11 + bias + 2 * batched)
    cell = lstmgru.GRUCell(5, 7, bias=bias, reset_after=False, dtype=DT)
    _randomize(cell, gen)
    x_shape, h_shape = ((3, 5), (3, 7)) if batched else ((5,), (7,))
    x = torch.randn(x_shape, generator=gen, dtype=DT, requires_grad=True)
    h = torch.randn(h_shape, generator=gen, dtype=DT, requires_grad=True)
    h1 = cell(x, h)

    names = [n for n, _ in cell.named_parameters()]
    ref = {n: p.detach().clone().requires_grad_(True) for n, p in cell.named_parameters()}
    x_ref = x.detach().clone().requires_grad_(True)
    h_ref = h.detach().clone().requires_grad_(True)
    h1_ref = article_cell(x_ref, h_ref, ref["weight_ih"], ref["weight_hh"],
                          ref.get("bias_ih"), ref.get("bias_hh"))
    torch.testing.assert_close(h1, h1_ref, **TOL)

    w = torch.randn(h1.shape, generator=gen, dtype=DT)
    got = _grads((h1 * w).sum(), [x, h, *[dict(cell.named_parameters())[n] for n in names]])
    want = _grads((h1_ref * w).sum(), [x_ref, h_ref, *[ref[n] for n in names]])
    for name, g, wnt in zip(["input", "hx", *names], got, want):
        torch.testing.assert_close(g, wnt, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_grucell_reset_before_default_hx():
    gen = torch.Generator().manual_seed(12)
    cell = lstmgru.GRUCell(5, 7, reset_after=False, dtype=DT)
    _randomize(cell, gen)
    x = torch.randn(3, 5, generator=gen, dtype=DT)
    p = dict(cell.named_parameters())
    want = article_cell(x, torch.zeros(3, 7, dtype=DT), p["weight_ih"], p["weight_hh"],
                        p["bias_ih"], p["bias_hh"])
    torch.testing.assert_close(cell(x).detach(), want.detach(), **TOL)


def test_reset_before_and_after_differ_on_same_weights():
    # The switch must change the function: with b_hn != 0 and r != 1 the two forms differ.
    gen = torch.Generator().manual_seed(5)
    before = lstmgru.GRU(4, 6, reset_after=False, dtype=DT)
    after = lstmgru.GRU(4, 6, reset_after=True, dtype=DT)
    _randomize(before, gen)
    after.load_state_dict(before.state_dict())
    x = torch.randn(5, 2, 4, generator=gen, dtype=DT)
    out_before, _ = before(x)
    out_after, _ = after(x)
    assert (out_before - out_after).abs().max().item() > 1e-3
    # and reset_after=True is torch.nn.GRU, on the very same state_dict
    ref = torch.nn.GRU(4, 6, dtype=DT)
    ref.load_state_dict(before.state_dict())
    torch.testing.assert_close(out_after, ref(x)[0], **TOL)

    cell_before = lstmgru.GRUCell(4, 6, reset_after=False, dtype=DT)
    _randomize(cell_before, gen)
    cell_after = lstmgru.GRUCell(4, 6, reset_after=True, dtype=DT)
    cell_after.load_state_dict(cell_before.state_dict())
    h = torch.randn(2, 6, generator=gen, dtype=DT)
    assert (cell_before(x[0], h) - cell_after(x[0], h)).abs().max().item() > 1e-3


def test_reset_before_keeps_torch_parameter_names_and_shapes():
    # Drop-in: the state_dict of the original GRU has exactly torch.nn.GRU's keys and shapes.
    ours = lstmgru.GRU(3, 5, num_layers=2, bidirectional=True, reset_after=False)
    ref = torch.nn.GRU(3, 5, num_layers=2, bidirectional=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    ours_cell = lstmgru.GRUCell(3, 5, reset_after=False)
    ref_cell = torch.nn.GRUCell(3, 5)
    assert {k: v.shape for k, v in ours_cell.state_dict().items()} == {
        k: v.shape for k, v in ref_cell.state_dict().items()
    }


def _negate_update_gate(module, hidden):
    # z = sigmoid(a)  ->  sigmoid(-a) = 1 - z: negate the z rows of both matrices and biases.
    with torch.no_grad():
        for name, p in module.named_parameters():
            p[hidden : 2 * hidden].neg_()


@pytest.mark.parametrize("reset_after", [False, True])
def test_article_update_convention_is_torch_with_negated_z(reset_after):
    """The article writes h' = (1 - z) h + z h~; torch writes h' = (1 - z) n + z h.

    They are the same function once z's weights and biases are negated, because
    sigmoid(-a) = 1 - sigmoid(a). So an article model (article convention) converts to
    lstmgru by negating the z blocks, and runs with reset_after=False; the torch-form
    gated product (reset_after=True) obeys the same identity.
    """
    gen = torch.Generator().manual_seed(21 + reset_after)
    hidden = 6
    article_params = lstmgru.GRU(4, hidden, reset_after=reset_after, dtype=DT)
    _randomize(article_params, gen)
    x = torch.randn(7, 3, 4, generator=gen, dtype=DT)
    h0 = torch.randn(1, 3, hidden, generator=gen, dtype=DT)

    converted = lstmgru.GRU(4, hidden, reset_after=reset_after, dtype=DT)
    converted.load_state_dict(article_params.state_dict())
    _negate_update_gate(converted, hidden)
    out, hn = converted(x, h0)

    if reset_after:
        # Article's update rule on torch's gated product, written out here.
        p = {n: v.detach() for n, v in article_params.named_parameters()}
        h = h0[0]
        ys = []
        for t in range(x.shape[0]):
            gi = x[t] @ p["weight_ih_l0"].T + p["bias_ih_l0"]
            gh = h @ p["weight_hh_l0"].T + p["bias_hh_l0"]
            i_r, i_z, i_n = gi.split(hidden, -1)
            h_r, h_z, h_n = gh.split(hidden, -1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * h + z * n
            ys.append(h)
        out_ref, hn_ref = torch.stack(ys), h[None]
    else:
        out_ref, hn_ref = article_gru(x, h0, dict(article_params.named_parameters()), 1,
                                      False, False, True, update="article")
    torch.testing.assert_close(out.detach(), out_ref.detach(), **TOL)
    torch.testing.assert_close(hn.detach(), hn_ref.detach(), **TOL)
    # Without the negation the two conventions differ: the identity is not vacuous.
    plain, _ = article_params(x, h0)
    assert (plain - out_ref).abs().max().item() > 1e-3


def _fp32_against_fp64_oracle(device, num_layers, bidirectional, tol):
    """The module in fp32 on `device` vs the fp64 oracle: outputs and every gradient."""
    gen = torch.Generator().manual_seed(31 + num_layers + 2 * bidirectional)
    input_size, hidden, batch, seq_len = 16, 32, 4, 6
    directions = 2 if bidirectional else 1
    gru = lstmgru.GRU(input_size, hidden, num_layers=num_layers, bidirectional=bidirectional,
                      batch_first=True, reset_after=False, dtype=DT)
    _randomize(gru, gen, scale=0.3)
    x64 = torch.randn(batch, seq_len, input_size, generator=gen, dtype=DT, requires_grad=True)
    h64 = torch.randn(num_layers * directions, batch, hidden, generator=gen, dtype=DT,
                      requires_grad=True)
    names = [n for n, _ in gru.named_parameters()]
    ref = {n: p.detach().clone().requires_grad_(True) for n, p in gru.named_parameters()}
    out_ref, hn_ref = article_gru(x64, h64, ref, num_layers, bidirectional, True, True)
    w_out = torch.randn(out_ref.shape, generator=gen, dtype=DT)
    w_hn = torch.randn(hn_ref.shape, generator=gen, dtype=DT)
    want = _grads((out_ref * w_out).sum() + (hn_ref * w_hn).sum(),
                  [x64, h64, *[ref[n] for n in names]])

    gru = gru.to(device=device, dtype=torch.float32)
    x = x64.detach().float().to(device).requires_grad_(True)
    h0 = h64.detach().float().to(device).requires_grad_(True)
    out, hn = gru(x, h0)
    loss = (out * w_out.float().to(device)).sum() + (hn * w_hn.float().to(device)).sum()
    params = dict(gru.named_parameters())
    got = _grads(loss, [x, h0, *[params[n] for n in names]])
    torch.testing.assert_close(out.double().cpu(), out_ref.detach(), **tol)
    torch.testing.assert_close(hn.double().cpu(), hn_ref.detach(), **tol)
    for name, g, w in zip(["input", "h0", *names], got, want):
        torch.testing.assert_close(g.double().cpu(), w, **tol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1")
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_gru_reset_before_triton_interpreter_matches_fp64_oracle(num_layers, bidirectional):
    # Block shapes as on the GPU (dims >= 16), fp32: the kernels' own math, run on the CPU.
    pytest.importorskip("triton")
    with lstmgru.use_backend("triton"):
        # fp32 over 6 steps and up to two layers: errors of a few fp32 ulps of O(1) values.
        _fp32_against_fp64_oracle("cpu", num_layers, bidirectional, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_gru_reset_before_cuda_matches_fp64_oracle(num_layers, bidirectional):
    # The default backend on a GPU (the fused kernels). fp32 inputs use IEEE products unless
    # the user allowed TF32 (DESIGN.md, numerics), so fp32 rounding over 6 steps is the only error.
    _fp32_against_fp64_oracle("cuda", num_layers, bidirectional, dict(rtol=1e-4, atol=1e-4))
