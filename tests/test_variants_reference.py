"""The reference's fused variant recurrences (``cells/*/variants_reference.py``) against the
variants' equations (``variants.lstm_steps`` / ``gru_steps``, themselves held against the
naive loops of ``test_variants.py``): every combination of the variants, both directions,
lengths, in float64, for the outputs and the first gradients; second derivatives through
gradgradcheck; the ops under opcheck, and one op per layer-direction under torch.compile."""
import itertools

import pytest
import torch

import lstmgru
from lstmgru._sequence import Lengths
from lstmgru.cells.gru.variants_reference import gru_recurrence
from lstmgru.cells.lstm.variants_reference import lstm_recurrence
from lstmgru.cells.variants import StepVariants, gru_steps, lstm_steps

T, B, H = 4, 3, 5
F64 = torch.float64
LENGTHS = torch.tensor([4, 2, 1])


def _leaf(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


def _masks(width, recurrent_dropout, zoneout_training, cut):
    mask = (torch.rand(B, width, dtype=F64) > 0.3).to(F64) / 0.7 if recurrent_dropout else None
    keep = torch.rand(T, B, width) < 0.4 if zoneout_training else None
    cuts = torch.rand(T, B) < 0.3 if cut else None
    return mask, keep, cuts


def _cut_active_only(cuts, lengths):
    # as entering_cuts leaves them: never at a position where the row is inactive
    if cuts is None or lengths is None:
        return cuts
    return cuts & (torch.arange(T).unsqueeze(1) < lengths)


def _compare(reference, fused, inputs):
    grads = [torch.randn_like(r) for r in reference]
    expected = torch.autograd.grad(reference, inputs, grads)
    got = torch.autograd.grad(fused, inputs, grads)
    for a, b in zip(list(reference) + list(expected), list(fused) + list(got)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


FLAGS = list(itertools.product([False, True], repeat=6))


@pytest.mark.parametrize("layer_norm,recurrent_dropout,zoneout,training,cut,reverse", FLAGS)
@pytest.mark.parametrize("packed", [False, True])
def test_lstm_fused_equals_steps(layer_norm, recurrent_dropout, zoneout, training, cut, reverse,
                                 packed):
    torch.manual_seed(len(FLAGS) * packed + FLAGS.index(
        (layer_norm, recurrent_dropout, zoneout, training, cut, reverse)))
    lengths = LENGTHS if packed else None
    for proj in ([0, 3] if not layer_norm else [0]):
        P = proj or H
        gates_x, h0, c0, w_hh = _leaf(T, B, 4 * H), _leaf(B, P), _leaf(B, H), _leaf(4 * H, P)
        w_hr = _leaf(P, H) if proj else None
        norms = [_leaf(4 * H), _leaf(H), _leaf(H)] if layer_norm else [None] * 3
        mask, keep, cuts = _masks(P, recurrent_dropout, zoneout and training, cut)
        variants = StepVariants(*norms, mask, 0.3 if zoneout else 0.0, keep,
                                _cut_active_only(cuts, lengths))
        inputs = [t for t in (gates_x, h0, c0, w_hh, w_hr, *norms) if t is not None]
        expected = lstm_steps(gates_x, h0, c0, w_hh, w_hr, lengths, reverse, variants)
        got = lstm_recurrence(gates_x, h0, c0, w_hh, w_hr,
                              None if lengths is None else Lengths.from_per_row(lengths, T),
                              reverse, variants)
        _compare(expected, got, inputs)


GRU_FLAGS = [f for f in itertools.product([False, True], repeat=7) if not (f[1] and not f[0])]


@pytest.mark.parametrize("reset_after,layer_norm,recurrent_dropout,zoneout,training,cut,reverse",
                         GRU_FLAGS)
def test_gru_fused_equals_steps(reset_after, layer_norm, recurrent_dropout, zoneout, training,
                                cut, reverse):
    torch.manual_seed(GRU_FLAGS.index(
        (reset_after, layer_norm, recurrent_dropout, zoneout, training, cut, reverse)))
    for lengths in (None, LENGTHS):
        gates_x, h0, w_hh = _leaf(T, B, 3 * H), _leaf(B, H), _leaf(3 * H, H)
        bias_hn = _leaf(H) if reset_after else None
        ln = _leaf(3 * H) if layer_norm else None
        mask, keep, cuts = _masks(H, recurrent_dropout, zoneout and training, cut)
        variants = StepVariants(ln, None, None, mask, 0.3 if zoneout else 0.0, keep,
                                _cut_active_only(cuts, lengths))
        inputs = [t for t in (gates_x, h0, w_hh, bias_hn, ln) if t is not None]
        expected = gru_steps(gates_x, h0, w_hh, bias_hn, lengths, reverse, reset_after, variants)
        got = gru_recurrence(gates_x, h0, w_hh, bias_hn,
                             None if lengths is None else Lengths.from_per_row(lengths, T),
                             reverse, reset_after, variants)
        _compare(expected, got, inputs)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_gradgradcheck_through_the_fused_op(cell):
    torch.manual_seed(3)
    gates = 4 if cell == "LSTM" else 3
    gates_x, h0, w_hh, ln = _leaf(T, B, gates * H), _leaf(B, H), _leaf(gates * H, H), _leaf(
        gates * H)
    mask, keep, cuts = _masks(H, True, True, True)
    if cell == "LSTM":
        c0, ln_c, ln_c_bias = _leaf(B, H), _leaf(H), _leaf(H)

        def f(gates_x, h0, c0, w_hh, ln, ln_c, ln_c_bias):
            return lstm_recurrence(gates_x, h0, c0, w_hh, None, None, True, StepVariants(
                ln, ln_c, ln_c_bias, mask, 0.3, keep, cuts))
        inputs = (gates_x, h0, c0, w_hh, ln, ln_c, ln_c_bias)
    else:
        bias_hn = _leaf(H)

        def f(gates_x, h0, w_hh, bias_hn, ln):
            return gru_recurrence(gates_x, h0, w_hh, bias_hn, None, True, True, StepVariants(
                ln, None, None, mask, 0.3, keep, cuts))
        inputs = (gates_x, h0, w_hh, bias_hn, ln)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def test_opcheck_variant_ops():
    torch.manual_seed(4)
    x, h0, c0 = torch.randn(T, B, 4 * H), torch.randn(B, H), torch.randn(B, H)
    w = torch.randn(4 * H, H, requires_grad=True)
    mask, keep, cuts = (torch.rand(B, H) > 0.5).float() * 2, torch.rand(T, B, H) < 0.3, \
        torch.rand(T, B) < 0.3
    ln = torch.randn(4 * H, requires_grad=True)
    torch.library.opcheck(torch.ops.lstmgru.lstm_variants_reference.default,
                          (x, h0, c0, w, None, ln, torch.randn(H), torch.randn(H), mask, keep,
                           cuts, None, False, 0.3, True))
    torch.library.opcheck(torch.ops.lstmgru.gru_variants_reference.default,
                          (x[..., :3 * H], h0, w[:3 * H], torch.randn(H), ln[:3 * H], mask,
                           keep, cuts, None, True, True, 0.3, True))


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_compiled_variants_are_one_op_per_layer_direction(cell):
    """Under torch.compile a variant layer is one lstmgru op, not an unrolled step loop."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    graphs = EagerAndRecordGraphs()
    torch.manual_seed(0)
    m = getattr(lstmgru, cell)(4, 8, num_layers=2, bidirectional=True, layer_norm=True,
                               zoneout=0.2, recurrent_dropout=0.2, weight_drop=0.2)
    reset = torch.zeros(12, 2, dtype=torch.bool)
    reset[5] = True
    torch.compile(m, fullgraph=True, dynamic=True, backend=graphs)(torch.randn(12, 2, 4),
                                                                   reset=reset)
    (graph,) = graphs.graphs
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    # the recurrence's autograd.Function, once per layer-direction
    assert sum("autograd_function_apply" in t or "lstmgru" in t for t in targets) == 4, targets
    assert len(graph.graph.nodes) < 400, "the graph is unrolled over the steps"
