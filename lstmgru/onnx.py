"""ONNX export: lstmgru's LSTM and GRU become ONNX's own ``LSTM`` and ``GRU`` operators.

Nothing to pass: ``torch.onnx.export(model, args, dynamic_shapes=..., dynamo=True)`` works as
it is. While that export traces (``torch.onnx.is_in_onnx_export()``), the modules hand each
layer, both directions at once, to :func:`lstm_layer` / :func:`gru_layer`, which emit one ONNX
node through ``torch.onnx.ops.symbolic_multi_out`` (torch's public way to place an ONNX
operator in the traced graph). Everywhere else, ``torch.export`` included, the modules run
as before. The weights are only reordered here: torch stacks the LSTM gates i, f, g, o and
ONNX i, o, f, c; torch stacks the GRU gates r, z, n and ONNX z, r, h. ONNX's GRU computes
both forms: ``linear_before_reset=1`` is torch's (``reset_after=True``), 0 the original GRU
(``reset_after=False``).

Per-row lengths (``lengths=``) become the nodes' ``sequence_lens``; onnxruntime then zeroes
the output past each length and takes each row's final state at its last step (in reverse,
each row starts at its own last step), as lstmgru does, and a row of length 0 gets its
initial state back (:func:`_keep_initial_state`).

What cannot be exported raises :class:`NotImplementedError` naming it: ``proj_size`` (ONNX's
LSTM has no projection) and ``PackedSequence`` input (its batch sizes are data, which
``torch.export`` cannot trace through ``pad_packed_sequence``: pass the padded input with
``lengths=`` instead).
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence, Tuple

import torch

from ._compiler import assume_constant_result
from ._sequence import keep_initial_state

__all__ = ["is_exporting", "lstm_layer", "gru_layer", "unsupported"]

# torch's gate blocks in ONNX's order: LSTM i, f, g, o -> i, o, f, c; GRU r, z, n -> z, r, h.
_LSTM_ORDER = (0, 3, 1, 2)
_GRU_ORDER = (1, 0, 2)
_OPSET = 14  # LSTM-14 and GRU-14, the current versions of both operators


@assume_constant_result  # lstmgru._compiler: without importing torch._dynamo
def is_exporting() -> bool:
    """Whether ``torch.onnx.export`` is tracing this call (then the modules emit ONNX nodes)."""
    # Called for real also under dynamo (the exporter's strict capture), which would
    # otherwise fold torch.onnx.is_in_onnx_export() to False. torch.onnx is imported lazily:
    # until something imports it nothing is exporting, and asking it costs two imports per
    # call (microseconds on every small call).
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def unsupported(feature: str, mode: str) -> NotImplementedError:
    return NotImplementedError(
        f"lstmgru {mode}: ONNX export does not support {feature}: ONNX's {mode} operator cannot "
        "express it")


def _onnx_gate_order(t: torch.Tensor, dim: int, order: Sequence[int]) -> torch.Tensor:
    """``t`` with the gate blocks along ``dim`` in ONNX's order: one Gather (the exporter
    folds only small constants, so on large weights the reordering stays in the graph, and
    a Gather keeps it short)."""
    index = torch.tensor(order, device=t.device)
    return t.unflatten(dim, (len(order), -1)).index_select(dim, index).flatten(dim, dim + 1)


def _stack(tensors: List[torch.Tensor], order: Sequence[int]) -> torch.Tensor:
    """The directions' (G*H, K) weights as ONNX's (D, G*H, K)."""
    return _onnx_gate_order(torch.stack(tensors), 1, order)


def _direction(directions: int, reverse: bool) -> str:
    return "bidirectional" if directions == 2 else "reverse" if reverse else "forward"


def _bias(bias_ih: List[Optional[torch.Tensor]], bias_hh: List[Optional[torch.Tensor]],
          order: Sequence[int]) -> Optional[torch.Tensor]:
    """ONNX's (D, 2*G*H) bias: each direction's [b_ih; b_hh]."""
    if bias_ih[0] is None:
        return None
    both = torch.stack([torch.stack([bi, bh]) for bi, bh in zip(bias_ih, bias_hh)])
    return _onnx_gate_order(both, 2, order).flatten(1, 2)


def lstm_layer(x: torch.Tensor, weights: Sequence[Sequence[Optional[torch.Tensor]]],
               h0: torch.Tensor, c0: torch.Tensor, reverse: bool = False, *,
               sequence_lens: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer as one ONNX ``LSTM`` node.

    x (T, B, I); ``weights`` one (weight_ih, weight_hh, bias_ih, bias_hh) per direction (one,
    or two for a bidirectional layer; biases None without bias); h0, c0 (D, B, H); ``reverse``
    for a single direction run backwards; ``sequence_lens`` None or the (B,) row lengths
    (``lengths=``, see ``_keep_initial_state``). Returns y (T, B, D*H), h_n (D, B, H),
    c_n (D, B, H).
    """
    D = len(weights)
    T, B, _ = x.shape
    H = h0.shape[2]
    w_ih, w_hh, b_ih, b_hh = (list(w) for w in zip(*weights))
    y, h_n, c_n = torch.onnx.ops.symbolic_multi_out(
        "LSTM",
        [x, _stack(w_ih, _LSTM_ORDER), _stack(w_hh, _LSTM_ORDER),
         _bias(b_ih, b_hh, _LSTM_ORDER), _int32(sequence_lens), h0, c0],
        {"hidden_size": H, "direction": _direction(D, reverse)},
        dtypes=[x.dtype] * 3, shapes=[(T, D, B, H), (D, B, H), (D, B, H)], version=_OPSET)
    return (_merge_directions(y), _keep_initial_state(h_n, h0, sequence_lens),
            _keep_initial_state(c_n, c0, sequence_lens))


def gru_layer(x: torch.Tensor, weights: Sequence[Sequence[Optional[torch.Tensor]]],
              h0: torch.Tensor, reset_after: bool = True, reverse: bool = False, *,
              sequence_lens: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One GRU layer as one ONNX ``GRU`` node; arguments as :func:`lstm_layer`'s.
    Returns y (T, B, D*H), h_n (D, B, H)."""
    D = len(weights)
    T, B, _ = x.shape
    H = h0.shape[2]
    w_ih, w_hh, b_ih, b_hh = (list(w) for w in zip(*weights))
    y, h_n = torch.onnx.ops.symbolic_multi_out(
        "GRU",
        [x, _stack(w_ih, _GRU_ORDER), _stack(w_hh, _GRU_ORDER), _bias(b_ih, b_hh, _GRU_ORDER),
         _int32(sequence_lens), h0],
        {"hidden_size": H, "direction": _direction(D, reverse),
         "linear_before_reset": int(reset_after)},
        dtypes=[x.dtype] * 2, shapes=[(T, D, B, H), (D, B, H)], version=_OPSET)
    return _merge_directions(y), _keep_initial_state(h_n, h0, sequence_lens)


def _int32(sequence_lens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # ONNX's LSTM and GRU take sequence_lens as int32 only.
    return None if sequence_lens is None else sequence_lens.to(torch.int32)


def _keep_initial_state(final: torch.Tensor, initial: torch.Tensor,
                        sequence_lens: Optional[torch.Tensor]) -> torch.Tensor:
    """onnxruntime gives a row of length 0 the final state 0; lstmgru's (and torch.nn's rule
    of no step) is its initial state. Past each row's length onnxruntime's Y is 0 and the
    final state is taken at the row's last step in both directions, as lstmgru's."""
    if sequence_lens is None:
        return final
    return keep_initial_state(final, initial, sequence_lens)


def _merge_directions(y: torch.Tensor) -> torch.Tensor:
    # ONNX's Y is (T, D, B, H); torch's output is (T, B, D*H), directions side by side.
    T, D, B, H = y.shape
    return y.transpose(1, 2).reshape(T, B, D * H)



def refuse_variants(mode: str, variants) -> None:
    """ONNX has no operator for the cell variants: name the one that stops the export."""
    if variants:
        raise unsupported(", ".join(variants) + " (ONNX has no such operator option)", mode)
