#!/usr/bin/env python
"""ONNX export of lstmgru's LSTM / GRU against torch.nn's own, as a Markdown table.

For each model (2 layers, bidirectional, input 32, hidden 64, batch_first=False, no hx): the
wall time of ``torch.onnx.export(model, (x,), dynamic_shapes=({0: T, 1: B},), dynamo=True)``
(one export each, after one warm-up export that pays the exporter's imports), the number of
nodes in the ONNX graph, how many of them are ONNX LSTM / GRU nodes, the dimensions of the
exported output (a name is a dynamic dimension), and the largest difference between
onnxruntime and PyTorch at B=3 and T=5 (the traced length) and T=10 (fp32). lstmgru's models hold
torch.nn's weights (load_state_dict), so the rows compute the same function.

    python benchmarks/onnx_export.py
"""
from __future__ import annotations

import time
import warnings

import onnxruntime as ort
import torch
from torch.export import Dim

import lstmgru

INPUT, HIDDEN, LAYERS = 32, 64, 2


def _export(model):
    x = torch.randn(5, 2, INPUT)
    dims = ({0: Dim("T", min=2), 1: Dim("B", min=2)},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        program = torch.onnx.export(model, (x,), dynamic_shapes=dims, dynamo=True,
                                    verbose=False)
        seconds = time.perf_counter() - start
    return program.model_proto, seconds


def _max_diff(model, proto, steps):
    """Largest |onnxruntime - PyTorch| at T=steps, B=3, or why it cannot be compared."""
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = torch.randn(steps, 3, INPUT)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        y, state = model(x)
    expected = [y, *(state if isinstance(state, tuple) else (state,))]
    if any(tuple(g.shape) != tuple(e.shape) for g, e in zip(got, expected)):
        return f"wrong shape {tuple(got[0].shape)}"
    return f"{max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected)):.1e}"


def _output_dims(proto):
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    return "(" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + ")"


def main() -> None:
    torch.manual_seed(0)
    _export(torch.nn.GRU(INPUT, HIDDEN).eval())  # warm-up: the exporter's imports
    rows = []
    for cell in ("LSTM", "GRU"):
        reference = getattr(torch.nn, cell)(INPUT, HIDDEN, LAYERS, bidirectional=True).eval()
        ours = getattr(lstmgru, cell)(INPUT, HIDDEN, LAYERS, bidirectional=True).eval()
        ours.load_state_dict(reference.state_dict())
        for name, model in ((f"torch.nn.{cell}", reference), (f"lstmgru.{cell}", ours)):
            proto, seconds = _export(model)
            ops = [node.op_type for node in proto.graph.node]
            rows.append((name, seconds, len(ops), ops.count(cell), _output_dims(proto),
                         _max_diff(model, proto, 5), _max_diff(model, proto, 10)))
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}; {LAYERS} layers, "
          f"bidirectional, input {INPUT}, hidden {HIDDEN}, dynamic T and B\n")
    print("| model | export (s) | ONNX nodes | LSTM/GRU nodes | output dims | max diff T=5 "
          "| max diff T=10 |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for name, seconds, nodes, cells, dims, diff5, diff10 in rows:
        print(f"| {name} | {seconds:.2f} | {nodes} | {cells} | {dims} | {diff5} | {diff10} |")


if __name__ == "__main__":
    main()
