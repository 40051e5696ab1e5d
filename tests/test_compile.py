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


# ------------------------------------------------------------------------------------------
# Compiled inference: every grad mode a served model runs under, and switches between them
# ------------------------------------------------------------------------------------------
CELLS = [("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False}), ("LSTMCell", {}),
         ("GRUCell", {}), ("GRUCell", {"reset_after": False})]


def _first(out):
    """The output tensor and the final states of any cell's result, as a flat list."""
    if isinstance(out, torch.Tensor):
        return [out]
    flat = []
    for item in out:
        flat += _first(item)
    return flat


def _input(op, T=5, B=3):
    return torch.randn(B, 4) if op.endswith("Cell") else torch.randn(T, B, 4)


def _cell_model(op, **kw):
    torch.manual_seed(0)
    if op.endswith("Cell"):
        return getattr(lstmgru, op)(4, 8, **kw)
    return getattr(lstmgru, op)(4, 8, bidirectional=True, **kw)


def _check_same(compiled, eager, x, what, **call):
    got, want = _first(compiled(x, **call)), _first(eager(x, **call))
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert not a.requires_grad or torch.is_grad_enabled(), f"{what}: result {i} has a graph"
        # 1e-5 as in the fp32 parity tests: eager runs torch's own kernel where it computes
        # the cell, the graph an lstmgru op, which may round sums over steps in another order.
        assert_close(a, b, f"{what}: result {i}", atol=1e-5)


def _grad_step(compiled, eager, x, what):
    eager_grads = []
    for f in (eager, compiled):
        eager.zero_grad(set_to_none=True)
        sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in _first(f(x))
            ).backward()
        eager_grads.append([p.grad for p in eager.parameters()])
    for i, (a, b) in enumerate(zip(*eager_grads)):
        assert_close(b, a, f"{what}: gradient {i}", atol=1e-5)


# inductor for the full layers; aot_eager (dynamo and AOTAutograd, where the grad mode
# matters, without inductor's code generation) for the rest, to keep the suite's time down.
@pytest.mark.parametrize("op,kw,compiler", [(op, kw, "inductor" if i < 2 else "aot_eager")
                                            for i, (op, kw) in enumerate(CELLS)])
def test_compiled_inference_in_every_grad_mode_and_switching(op, kw, compiler):
    """The first compiled call under no_grad (how a compiled model is served), then
    inference_mode, eval() + no_grad, frozen parameters, a training step (grad on), and back
    to no_grad: the same compiled module, each result equal to eager's."""
    torch._dynamo.reset()
    m = _cell_model(op, **kw)
    compiled = torch.compile(m, fullgraph=True, backend=compiler)
    with torch.no_grad():
        _check_same(compiled, m, _input(op), "first call under no_grad")
    with torch.inference_mode():
        _check_same(compiled, m, _input(op), "inference_mode")
    m.eval()
    with torch.no_grad():
        _check_same(compiled, m, _input(op), "eval() + no_grad")
    m.requires_grad_(False)
    _check_same(compiled, m, _input(op), "frozen parameters, grad mode on")
    m.requires_grad_(True)
    m.train()
    _grad_step(compiled, m, _input(op), "training step after inference")
    with torch.no_grad():
        _check_same(compiled, m, _input(op), "no_grad again after training")


@pytest.mark.parametrize("op,options", [
    ("LSTM", {}), ("GRU", {}), ("GRU", {"fullgraph": True}), ("LSTM", {"dynamic": True}),
    ("GRU", {"dynamic": True}), ("LSTM", {"mode": "reduce-overhead"})])
def test_compiled_inference_first_call_each_compile_option(op, options):
    """``mode="reduce-overhead"`` (CUDA graphs) applies on CUDA only; on the CPU it must still
    compile and run."""
    torch._dynamo.reset()
    m = _cell_model(op)
    compiled = torch.compile(m, **options)
    with torch.no_grad():
        _check_same(compiled, m, _input(op), f"{options} first call")
        _check_same(compiled, m, _input(op, T=7, B=2), f"{options} another T and B")


VARIANTS = [{"layer_norm": True}, {"zoneout": 0.3}, {"recurrent_dropout": 0.3},
            {"weight_drop": 0.3}, {"reset": True}]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: next(iter(v)))
@pytest.mark.parametrize("op", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_compiled_inference_variants(op, variant):
    """Each variant under no_grad and inference_mode, in training mode (where dropout-like
    variants are in force) and in eval. aot_eager runs the traced ATen graph with torch's own
    random ops in the traced order, so one seed draws the same masks as eager; inductor's
    generator would not."""
    torch._dynamo.reset()
    options = {k: v for k, v in variant.items() if k != "reset"}
    m = _cell_model(op, **options)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = _input(op)
    call = {}
    if "reset" in variant:
        call["reset"] = torch.rand(x.shape[:-1]) < 0.4
    for training, mode in [(True, torch.no_grad), (True, torch.inference_mode),
                           (False, torch.no_grad)]:
        m.train(training)
        with mode():
            torch.manual_seed(7)
            got = _first(compiled(x, **call))
            torch.manual_seed(7)
            want = _first(m(x, **call))
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, f"{variant} training={training} {mode.__name__}: result {i}",
                         atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("op,kw", CELLS[:3])
def test_compiled_inference_on_each_backend(op, kw, backend):
    torch._dynamo.reset()
    m = _cell_model(op, **kw)
    with lstmgru.use_backend(backend), torch.no_grad():
        compiled = torch.compile(m, fullgraph=True)
        _check_same(compiled, m, _input(op), f"backend {backend}")


@pytest.mark.interpreter
@pytest.mark.parametrize("op,kw", CELLS[:3])
def test_compiled_inference_on_triton_in_the_interpreter(op, kw):
    """The kernels' ops under no_grad (Triton's interpreter on CPU tensors without a GPU);
    aot_eager: the interpreter runs the kernels, inductor would add nothing."""
    pytest.importorskip("triton")
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = getattr(lstmgru, op)(4, 16, **kw)
    x = torch.randn(4, 2, 4)
    with lstmgru.use_backend("triton"), torch.no_grad():
        got = _first(torch.compile(m, fullgraph=True, backend="aot_eager")(x))
    with lstmgru.use_backend("reference"), torch.no_grad():
        want = _first(m(x))
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, f"triton: result {i}", atol=1e-5)


# ------------------------------------------------------------------------------------------
# Compiled on the CPU: torch's own kernels inside the graph, as eager torch.nn runs them
# ------------------------------------------------------------------------------------------
def _torch_pair(op, **kw):
    torch.manual_seed(0)
    ref = getattr(torch.nn, op)(4, 8, num_layers=2, bidirectional=True, **kw)
    ours = getattr(lstmgru, op)(4, 8, num_layers=2, bidirectional=True, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("kw", [{}, {"bias": False}], ids=["bias", "no-bias"])
@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_compiled_cpu_inference_is_torch_nn_bit_for_bit(op, kw):
    """Inference: the LSTM on oneDNN's layer, the GRU on ATen's loop, as eager torch.nn. Equal
    bit for bit (atol 0): the reference recurrence rounds differently (~1e-7), so a graph
    that fell back to it would fail here."""
    torch._dynamo.reset()
    ours, ref = _torch_pair(op, **kw)
    compiled = torch.compile(ours, fullgraph=True)
    x, h = torch.randn(9, 3, 4), torch.randn(4, 3, 8)
    hx = (h, torch.randn(4, 3, 8)) if op == "LSTM" else h
    with torch.no_grad():
        got, want = _first(compiled(x, hx)), _first(ref(x, hx))
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"result {i}: max abs diff {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("kw", [{}, {"bias": False}], ids=["bias", "no-bias"])
def test_compiled_cpu_lstm_training_is_torch_nn_bit_for_bit(kw):
    """Training: oneDNN's layer and its backward, outputs and every gradient as torch.nn's."""
    torch._dynamo.reset()
    ours, ref = _torch_pair("LSTM", **kw)
    compiled = torch.compile(ours, fullgraph=True)
    x = torch.randn(9, 3, 4)
    hx = (torch.randn(4, 3, 8), torch.randn(4, 3, 8))
    results = []
    for f, params in ((compiled, list(ours.parameters())), (ref, list(ref.parameters()))):
        xi = x.clone().requires_grad_()
        hi = tuple(t.clone().requires_grad_() for t in hx)
        out = _first(f(xi, hi))
        loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in out)
        results.append(out + list(torch.autograd.grad(loss, [xi, *hi, *params])))
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"item {i}: max abs diff {(a - b).abs().max().item():.3g}"


def test_onednn_layer_second_derivatives_and_fake_tensors():
    """The oneDNN layer op outside a graph: a differentiable backward recomputes through the
    spec (second derivatives against the spec's own), and FakeTensor / meta shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lstmgru.cells.lstm import reference, spec

    torch.manual_seed(3)
    T, B, I, H = 5, 2, 3, 4
    inputs = [torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H), torch.randn(4 * H, I),
              torch.randn(4 * H, H) * 0.5, torch.randn(4 * H), torch.randn(4 * H)]
    inputs = [t.requires_grad_() for t in inputs]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = inputs

    def second(run):
        y, h_n, c_n = run()
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + h_n.sum() + c_n.sum()
        first = torch.autograd.grad(loss, inputs, create_graph=True)
        total = sum((g * g).sum() for g in first)
        return list(first) + list(torch.autograd.grad(total, inputs))

    got = second(lambda: reference.onednn_layer(x, [w_ih, w_hh, b_ih, b_hh, None], h0, c0, True))
    want = second(lambda: spec.lstm_spec(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, True))
    for i, (a, b) in enumerate(zip(got, want)):
        # float32 (oneDNN has no float64 LSTM): first and second derivatives of two
        # implementations of the same function agree to float32 rounding.
        assert_close(a, b, f"derivative {i}", atol=1e-4, rtol=1e-4)

    plain = [t.detach() for t in inputs]
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in plain]
        y, h_n, c_n, workspace, *_ = torch.ops.lstmgru.lstm_onednn(*fake, None, False, False)
    assert (tuple(y.shape), tuple(h_n.shape), tuple(c_n.shape)) == ((T, B, H), (B, H), (B, H))
    torch.library.opcheck(torch.ops.lstmgru.lstm_onednn.default,
                          ([t.detach() for t in inputs] + [None, False, False]))
    torch.library.opcheck(torch.ops.lstmgru.gru_aten_inference.default,
                          (x.detach(), h0.detach(), torch.randn(3 * H, I), torch.randn(3 * H, H),
                           None, None, True))


@pytest.mark.parametrize("backend,expected", [("auto", "lstm_onednn"),
                                              ("reference", "lstm_reference")])
def test_only_auto_swaps_in_torchs_kernel_when_traced(backend, expected):
    """An explicit "reference" keeps the plain-PyTorch recurrence in the graph; "auto" (which
    passes over "native" under torch.compile) runs oneDNN's layer as an op."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    graphs = EagerAndRecordGraphs()
    m = _cell_model("LSTM")
    with lstmgru.use_backend(backend), torch.no_grad():
        torch.compile(m, fullgraph=True, backend=graphs)(torch.randn(5, 3, 4))
    (graph,) = graphs.graphs
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert sum(expected in t for t in targets) == 2, targets
