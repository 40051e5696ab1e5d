"""ONNX export (``lstmgru.onnx``): plain ``torch.onnx.export(..., dynamo=True)`` gives ONNX's own
LSTM / GRU nodes, one per layer, with dynamic T and B, and onnxruntime computes what PyTorch
does. Each export takes seconds, so the cases are few and each covers several options."""
import warnings

import pytest
import torch
from torch.export import Dim
from torch.nn.utils.rnn import pack_padded_sequence

import lstmgru

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

HIDDEN, INPUT = 7, 5
SHAPES = ((6, 2), (9, 3))  # (T, B) run through onnxruntime: neither is the traced one


def _export(model, args, dynamic_shapes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, dynamic_shapes=dynamic_shapes, dynamo=True,
                                    verbose=False)
    return program.model_proto


def _run(proto, tensors):
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(tensors)
    return [torch.from_numpy(o) for o in
            session.run(None, {n: t.numpy() for n, t in zip(names, tensors)})]


def _flat(outputs):
    flat = []
    for o in outputs if isinstance(outputs, tuple) else (outputs,):
        flat.extend(_flat(o) if isinstance(o, tuple) else [o])
    return flat


@pytest.mark.parametrize("cell, batch_first, with_hx, reset_after", [
    ("LSTM", False, False, True),
    ("LSTM", True, True, True),
    ("GRU", False, True, True),
    ("GRU", True, False, True),
    ("GRU", True, True, False),
])
def test_export_matches_onnxruntime(cell, batch_first, with_hx, reset_after):
    torch.manual_seed(0)
    layers, directions = 2, 2
    kwargs = {} if cell == "LSTM" else {"reset_after": reset_after}
    model = getattr(lstmgru, cell)(INPUT, HIDDEN, num_layers=layers, bidirectional=True,
                                   batch_first=batch_first, **kwargs).eval()
    T, B = Dim("T", min=2), Dim("B", min=2)

    def inputs(t, b):
        x = torch.randn((b, t, INPUT) if batch_first else (t, b, INPUT))
        if not with_hx:
            return (x,)
        h = [torch.randn(layers * directions, b, HIDDEN) for _ in range(2 if cell == "LSTM"
                                                                       else 1)]
        return (x, tuple(h) if cell == "LSTM" else h[0])

    dynamic = [{0: B, 1: T} if batch_first else {0: T, 1: B}]
    if with_hx:
        dynamic.append(({1: B}, {1: B}) if cell == "LSTM" else {1: B})
    proto = _export(model, inputs(4, 3), tuple(dynamic))

    ops = [node.op_type for node in proto.graph.node]
    assert ops.count(cell) == layers, ops                # one node per layer, both directions
    assert len(ops) <= 20, ops                           # reshapes and concats around them
    assert not any(n.domain.startswith("lstmgru") for n in proto.graph.node)
    if cell == "GRU":
        attrs = {a.name: a.i for n in proto.graph.node if n.op_type == "GRU" for a in n.attribute}
        assert attrs["linear_before_reset"] == int(reset_after)

    with torch.no_grad():
        for t, b in SHAPES:
            args = inputs(t, b)
            expected = _flat(model(*args))
            got = _run(proto, _flat(args))
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                assert g.shape == e.shape
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


class _WithLengths(torch.nn.Module):
    """Per-row lengths as a model input: ``rnn(x, hx, lengths=lengths)``."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths, h0):
        hx = (h0, h0.tanh()) if isinstance(self.rnn, lstmgru.LSTM) else h0
        return self.rnn(x, hx, lengths=lengths)


@pytest.mark.parametrize("cell, batch_first, reset_after", [
    ("LSTM", True, True), ("GRU", False, True), ("GRU", True, False)])
def test_lengths_export_to_sequence_lens(cell, batch_first, reset_after):
    """lengths= becomes the nodes' sequence_lens. onnxruntime zeroes Y past each length and
    takes the final state at each row's last step in both directions, as lstmgru does; only
    rows of length 0 (final state 0 there, hx here) are fixed in the graph. Checked at two T
    and two B neither of which was traced, with unsorted lengths, ties, 0, T and T past the
    longest row."""
    torch.manual_seed(1)
    kwargs = {} if cell == "LSTM" else {"reset_after": reset_after}
    model = _WithLengths(getattr(lstmgru, cell)(INPUT, HIDDEN, num_layers=2, bidirectional=True,
                                               batch_first=batch_first, **kwargs)).eval()
    T, B = Dim("T", min=2), Dim("B", min=2)

    def inputs(t, lengths):
        b = len(lengths)
        x = torch.randn((b, t, INPUT) if batch_first else (t, b, INPUT))
        return x, torch.tensor(lengths), torch.randn(4, b, HIDDEN)

    proto = _export(model, inputs(4, [4, 2, 3]),
                    ({0: B, 1: T} if batch_first else {0: T, 1: B}, {0: B}, {1: B}))
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count(cell) == 2, ops
    assert all(len(n.input) > 4 and n.input[4] for n in proto.graph.node if n.op_type == cell)
    with torch.no_grad():
        for t, lengths in ((6, [6, 0, 3, 3]), (9, [2, 7, 5])):
            args = inputs(t, lengths)
            expected = _flat(model(*args))
            got = _run(proto, list(args))
            for g, e in zip(got, expected):
                assert g.shape == e.shape
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
            if 0 in lengths:
                row = lengths.index(0)
                assert torch.equal(got[1][:, row], args[2][:, row])  # h_n = h0


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell"])
def test_cell_export_matches_onnxruntime(cell):
    torch.manual_seed(0)
    model = getattr(lstmgru, cell)(INPUT, HIDDEN).eval()
    B = Dim("B", min=2)
    hx = (torch.randn(3, HIDDEN), torch.randn(3, HIDDEN)) if cell == "LSTMCell" \
        else torch.randn(3, HIDDEN)
    dynamic = ({0: B}, ({0: B}, {0: B}) if cell == "LSTMCell" else {0: B})
    proto = _export(model, (torch.randn(3, INPUT), hx), dynamic)
    assert [n.op_type for n in proto.graph.node].count(cell[:-4]) == 1
    with torch.no_grad():
        for b in (2, 5):
            args = (torch.randn(b, INPUT), tuple(torch.randn(b, HIDDEN) for _ in hx)
                    if cell == "LSTMCell" else torch.randn(b, HIDDEN))
            for g, e in zip(_run(proto, _flat(args)), _flat(model(*args))):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


class _Packed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = lstmgru.GRU(INPUT, HIDDEN)

    def forward(self, x, lengths):
        return self.rnn(pack_padded_sequence(x, lengths))[1]


@pytest.mark.parametrize("model, args, feature", [
    (lstmgru.LSTM(INPUT, HIDDEN, proj_size=3), (torch.randn(4, 3, INPUT),), "proj_size"),
    (_Packed(), (torch.randn(4, 3, INPUT), torch.tensor([4, 3, 2])), "PackedSequence"),
])
def test_unsupported_raises_naming_the_feature(model, args, feature):
    with pytest.raises(Exception) as info:
        _export(model, args, None)
    chain, error = [], info.value
    while error is not None:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    assert any("NotImplementedError" in e and feature in e for e in chain), chain


def test_torch_export_keeps_lstmgru_ops():
    # The ONNX path is taken only inside torch.onnx.export: torch.export still sees our ops.
    program = torch.export.export(lstmgru.LSTM(INPUT, HIDDEN), (torch.randn(4, 3, INPUT),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "lstmgru.lstm_reference.default" in targets, targets
