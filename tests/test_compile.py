"""torch.compile and torch.export without unrolling: a recurrence is one opaque lstmgru op in
the graph, so fullgraph=True works, a new T or B does not recompile, and an exported program
with dynamic T and B runs forward and backward."""
import pytest
import torch
from torch.export import Dim, export

import lstmgru
from _parity import assert_close

MODELS = [("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False})]


def _model(op, **kw):
    torch.manual_seed(0)
    return getattr(lstmgru, op)(4, 8, num_layers=2, bidirectional=True, **kw)


def _eager_and_compiled_step(m, compiled, x):
    results = []
    for f in (m, compiled):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out, _ = f(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out, xi.grad] + [p.grad for p in m.parameters()])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("op,kw", MODELS[:2])
def test_compile_fullgraph_inductor_no_recompile(op, kw):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = _model(op, **kw)
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    for T, B in [(5, 3), (9, 2), (3, 6)]:
        eager, comp = _eager_and_compiled_step(m, compiled, torch.randn(T, B, 4))
        for i, (a, b) in enumerate(zip(comp, eager)):
            assert_close(a, b, f"T={T} B={B} item {i}", atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, "a new T or B recompiled"


@pytest.mark.parametrize("op,kw", MODELS)
def test_graph_holds_one_op_per_layer_direction(op, kw):
    """What dynamo sees: the lstmgru op once per layer and direction, no per-step ops."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    graphs = EagerAndRecordGraphs()
    m = _model(op, **kw)
    torch.compile(m, fullgraph=True, dynamic=True, backend=graphs)(torch.randn(6, 2, 4))
    (graph,) = graphs.graphs
    ops = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    recurrences = [t for t in ops if "lstmgru" in t or "Recurrence" in t or "autograd" in t]
    assert len(recurrences) >= 4, ops
    assert len(graph.graph.nodes) < 200


@pytest.mark.parametrize("op,kw", MODELS)
def test_export_dynamic_T_and_B_forward_and_backward(op, kw):
    m = _model(op, **kw)
    program = export(m, (torch.randn(5, 3, 4),),
                     dynamic_shapes={"input": {0: Dim("T", min=2), 1: Dim("B", min=2)}})
    assert len(program.graph.nodes) < 200, "the exported program is unrolled over the steps"
    assert sum("lstmgru" in str(n.target) for n in program.graph.nodes) == 4
    exported = program.module()
    for T, B in [(9, 4), (2, 7)]:
        eager, ran = _eager_and_compiled_step(m, exported, torch.randn(T, B, 4))
        # 1e-5 as in the fp32 parity tests: eager runs torch's own kernel (native), the
        # exported program our reference op, so sums over steps round in another order.
        for i, (a, b) in enumerate(zip(ran, eager)):
            assert_close(a, b, f"T={T} B={B} item {i}", atol=1e-5)
