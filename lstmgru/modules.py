"""Drop-in ``torch.nn`` LSTM / GRU / LSTMCell / GRUCell.

Same constructor arguments (order, meaning, defaults), same parameter names, shapes,
registration order and initialisation as torch.nn, so ``state_dict``s move both ways with
``strict=True``; same forward inputs (batched or not, ``batch_first``, ``PackedSequence``,
``hx`` given or None) and outputs. Arguments are checked here, with the same exception
types as torch.nn, so that no low-level error reaches the user. The loop over layers and
directions lives here; one layer-direction is ``lstmgru.functional``.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import functional
from .reference import lengths_from_batch_sizes

_GATES = {"LSTM": 4, "GRU": 3}


def _check_size_arg(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be greater than {'zero' if minimum == 1 else minimum - 1}, "
                         f"got {value}")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _check_bool_arg(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")


def _autocast_on(device: torch.device) -> bool:
    """Under autocast torch.nn accepts inputs and states in another dtype than the weights."""
    return torch.is_autocast_enabled(device.type)


def _run_dtype(x: torch.Tensor, autocast_covers_cpu: bool) -> torch.dtype:
    """The dtype torch.nn computes in: the autocast dtype where autocast covers the op
    (every RNN op on CUDA; on the CPU only the LSTM layer), else the input's dtype."""
    covered = x.device.type == "cuda" or (x.device.type == "cpu" and autocast_covers_cpu)
    if covered and _autocast_on(x.device):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _autocast_off(device: torch.device):
    """Inside, dtypes are chosen explicitly (``_run_dtype``), not op by op by autocast."""
    if _autocast_on(device):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _RNNBase(nn.Module):
    mode: str

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None):
        super().__init__()
        _check_size_arg("input_size", input_size, 1)
        _check_size_arg("hidden_size", hidden_size, 1)
        _check_size_arg("num_layers", num_layers, 1)
        _check_bool_arg("bias", bias)
        _check_bool_arg("batch_first", batch_first)
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
                or not 0 <= dropout <= 1):
            raise ValueError("dropout should be a number in range [0, 1] representing the "
                             f"probability of an element being zeroed, got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          f"non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)
        if not isinstance(proj_size, int) or isinstance(proj_size, bool) or proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable "
                             f"projections, got {proj_size!r}")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size has to be smaller than hidden_size, got proj_size="
                             f"{proj_size} and hidden_size={hidden_size}")
        if proj_size and mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        factory = {"device": device, "dtype": dtype}
        gate_size = _GATES[mode] * hidden_size
        real_hidden = proj_size if proj_size > 0 else hidden_size
        directions = 2 if bidirectional else 1
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            for direction in range(directions):
                layer_input = input_size if layer == 0 else real_hidden * directions
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (gate_size, layer_input)),
                          ("weight_hh", (gate_size, real_hidden))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                names = []
                for kind, shape in shapes:
                    name = kind + suffix
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """Kept for drop-in compatibility: there is no flat cuDNN weight buffer to compact."""

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    # ---------------------------------------------------------------- argument checks
    def _check_input(self, x: torch.Tensor, what: str = "input") -> None:
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype and not (x.is_floating_point() and _autocast_on(x.device)):
            raise ValueError(f"{self.mode}: {what} dtype ({x.dtype}) does not match weight dtype "
                             f"({weight.dtype}). Convert input: input.to({weight.dtype}), or "
                             f"convert model: model.to({x.dtype})")
        if x.device != weight.device:
            raise RuntimeError(f"{self.mode}: {what} is on {x.device} but the weights are on "
                               f"{weight.device}; move one of them")
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"{self.mode}: input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {x.shape[-1]}")

    def _check_state(self, state: torch.Tensor, name: str, expected: tuple, x: torch.Tensor):
        if _shape(state) != expected:
            raise RuntimeError(f"{self.mode}: expected {name} of shape {expected} (num_layers * "
                               f"num_directions, batch, size), got {_shape(state)}")
        if state.dtype != x.dtype and not _autocast_on(x.device):
            raise RuntimeError(f"{self.mode}: {name} dtype ({state.dtype}) does not match input "
                               f"dtype ({x.dtype})")
        if state.device != x.device:
            raise RuntimeError(f"{self.mode}: {name} is on {state.device} but input is on "
                               f"{x.device}")

    def _initial_states(self, hx, x: torch.Tensor, batch: int, batched: bool,
                        sorted_indices: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """hx as a list of (L*D, B, size) tensors: [h_0] for the GRU, [h_0, c_0] for the LSTM."""
        directions = 2 if self.bidirectional else 1
        names = ["h_0", "c_0"] if self.mode == "LSTM" else ["h_0"]
        sizes = [self.proj_size or self.hidden_size, self.hidden_size][:len(names)]
        if hx is None:
            return [x.new_zeros(self.num_layers * directions, batch, size) for size in sizes]
        if self.mode == "LSTM":
            if (not isinstance(hx, (tuple, list)) or len(hx) != 2
                    or not all(isinstance(t, torch.Tensor) for t in hx)):
                raise RuntimeError("LSTM: hx must be a tuple (h_0, c_0) of two tensors, got "
                                   f"{type(hx).__name__}")
            states = list(hx)
        else:
            if not isinstance(hx, torch.Tensor):
                raise RuntimeError(f"GRU: hx must be a tensor h_0, got {type(hx).__name__}")
            states = [hx]
        want_dim = 3 if batched else 2
        dims = [s.dim() for s in states]
        if any(d != want_dim for d in dims):
            kind = "batched 3-D" if batched else "unbatched 2-D"
            got = ", ".join(f"{d}-D" for d in dims)
            raise RuntimeError(f"{self.mode}: for {kind} input, {' and '.join(names)} should also "
                               f"be {want_dim}-D but got ({got}) tensors")
        for state, name, size in zip(states, names, sizes):
            expected = (self.num_layers * directions,) + ((batch,) if batched else ()) + (size,)
            self._check_state(state, name, expected, x)
        if not batched:
            states = [s.unsqueeze(1) for s in states]
        if sorted_indices is not None:
            states = [s.index_select(1, sorted_indices) for s in states]
        return states

    # ---------------------------------------------------------------- forward
    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            data, batch_sizes_t, sorted_indices, unsorted_indices = input
            if data.dim() != 2:
                raise ValueError(f"{self.mode}: PackedSequence data must be 2-D (sum of lengths, "
                                 f"input_size), got {data.dim()}-D")
            self._check_input(data, "PackedSequence data")
            batch_sizes = batch_sizes_t.tolist()
            x, _ = pad_packed_sequence(PackedSequence(data, batch_sizes_t))
            batched = True
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"{self.mode}: input must be a Tensor or a PackedSequence, got "
                                f"{type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{self.mode}: Expected input to be 2D or 3D, got "
                                 f"{input.dim()}D instead")
            self._check_input(input)
            batched = input.dim() == 3
            batch_sizes = sorted_indices = unsorted_indices = None
            if not batched:
                x = input.unsqueeze(1)
            elif self.batch_first:
                x = input.transpose(0, 1)
            else:
                x = input
        if x.shape[0] == 0:
            raise RuntimeError(f"{self.mode}: Expected sequence length to be larger than 0 in RNN "
                               f"(input has shape {_shape(input if not batch_sizes else x)})")
        batch = x.shape[1]
        states = self._initial_states(hx, x, batch, batched, sorted_indices)
        dtype = _run_dtype(x, autocast_covers_cpu=self.mode == "LSTM")
        with _autocast_off(x.device):
            output, final = self._layers(x.to(dtype).contiguous(),
                                         [s.to(dtype) for s in states], batch_sizes, dtype)

        if batch_sizes is not None:
            lengths = lengths_from_batch_sizes(batch_sizes, batch, "cpu")
            packed = pack_padded_sequence(output, lengths, enforce_sorted=True)
            output = PackedSequence(packed.data, batch_sizes_t, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                final = [f.index_select(1, unsorted_indices) for f in final]
        elif not batched:
            output = output.squeeze(1)
            final = [f.squeeze(1) for f in final]
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (tuple(final) if self.mode == "LSTM" else final[0])

    def _layers(self, x, states, batch_sizes, dtype):
        """All layers and directions: x (T, B, I) -> output (T, B, D*P), final states."""
        directions = 2 if self.bidirectional else 1
        finals: List[List[torch.Tensor]] = [[] for _ in states]
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                weights = [self._parameters[n].to(dtype) for n in self._all_weights[index]]
                y, *last = self._run_layer(layer_input, weights, [s[index] for s in states],
                                           batch_sizes, direction == 1)
                outputs.append(y)
                for kept, state in zip(finals, last):
                    kept.append(state)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, 2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return layer_input, [torch.stack(kept) for kept in finals]


class LSTM(_RNNBase):
    r"""Drop-in :class:`torch.nn.LSTM` (same arguments, parameters, inputs and outputs).

    For each step, with gates stacked i, f, g, o in ``weight_ih_l{k}`` / ``weight_hh_l{k}``::

        i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)     g = tanh(W_ig x + b_ig + W_hg h + b_hg)
        f = sigmoid(W_if x + b_if + W_hf h + b_hf)     o = sigmoid(W_io x + b_io + W_ho h + b_ho)
        c' = f * c + i * g                             h' = o * tanh(c')   (then W_hr h' if proj_size)

    Runs the fused Triton kernels on CUDA tensors and the plain-PyTorch reference elsewhere
    (see ``lstmgru.set_backend``).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)

    def _run_layer(self, layer_input, weights, states, batch_sizes, reverse):
        weight_ih, weight_hh, *rest = weights
        bias_ih, bias_hh = (rest[0], rest[1]) if self.bias else (None, None)
        weight_hr = rest[-1] if self.proj_size > 0 else None
        return functional.lstm_layer(layer_input, weight_ih, weight_hh, bias_ih, bias_hh,
                                     weight_hr, states[0], states[1], batch_sizes, reverse)


class GRU(_RNNBase):
    r"""Drop-in :class:`torch.nn.GRU`, plus the original GRU with ``reset_after=False``.

    Gates are stacked r, z, n in ``weight_ih_l{k}`` / ``weight_hh_l{k}``. For each step::

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))     reset_after=True (default: torch.nn, cuDNN)
        n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)     reset_after=False (the original GRU)
        h' = (1 - z) * n + z * h

    ``reset_after=False`` is the formulation of Cho et al. (2014) and of Keras'
    ``GRU(reset_after=False)``: the reset gate acts on ``h`` before the recurrent product.
    torch.nn and cuDNN cannot compute it. Parameter names and shapes are the same in both
    forms. Articles often write the update as ``h' = (1 - z) * h + z * h~``; that is the same
    function with ``z`` replaced by ``1 - z``, i.e. with z's weights and biases negated
    (``sigmoid(-a) = 1 - sigmoid(a)``).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, proj_size: int = 0, reset_after: bool = True):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)
        self.reset_after = bool(reset_after)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.reset_after else ", reset_after=False")

    def _run_layer(self, layer_input, weights, states, batch_sizes, reverse):
        weight_ih, weight_hh, *rest = weights
        bias_ih, bias_hh = (rest[0], rest[1]) if self.bias else (None, None)
        return functional.gru_layer(layer_input, weight_ih, weight_hh, bias_ih, bias_hh,
                                    states[0], batch_sizes, reverse, self.reset_after)


class _CellBase(nn.Module):
    mode: str

    def __init__(self, mode: str, input_size: int, hidden_size: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        _check_size_arg("input_size", input_size, 1)
        _check_size_arg("hidden_size", hidden_size, 1)
        _check_bool_arg("bias", bias)
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        gate_size = _GATES[mode.replace("Cell", "")] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gate_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(gate_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gate_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(gate_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    reset_parameters = _RNNBase.reset_parameters

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        return s.format(**self.__dict__)

    def _weights(self, dtype: torch.dtype) -> list:
        """weight_ih, weight_hh, bias_ih, bias_hh in the dtype the step runs in."""
        return [None if w is None else w.to(dtype)
                for w in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)]

    def _prepare(self, input, hx, names: Sequence[str]) -> Tuple[torch.Tensor, list, bool]:
        """Checks and batches (input, hx): returns x (B, I) and states [(B, H)...] in the
        dtype the step runs in (autocast covers torch's cells on CUDA only), and batched."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{self.mode}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{self.mode}: Expected input to be 1D or 2D, got {input.dim()}D "
                             "instead")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"{self.mode}: input has inconsistent input_size: got "
                               f"{input.shape[-1]} expected {self.input_size}")
        autocast = _autocast_on(input.device)
        if input.dtype != self.weight_ih.dtype and not autocast:
            raise RuntimeError(f"{self.mode}: input dtype ({input.dtype}) does not match weight "
                               f"dtype ({self.weight_ih.dtype})")
        if input.device != self.weight_ih.device:
            raise RuntimeError(f"{self.mode}: input is on {input.device} but the weights are on "
                               f"{self.weight_ih.device}")
        batched = input.dim() == 2
        dtype = _run_dtype(input, autocast_covers_cpu=False)
        x = (input if batched else input.unsqueeze(0)).to(dtype)
        if hx is None:
            return x, [x.new_zeros(x.shape[0], self.hidden_size) for _ in names], batched
        states = list(hx) if len(names) > 1 and isinstance(hx, (tuple, list)) else [hx]
        if len(states) != len(names) or not all(isinstance(s, torch.Tensor) for s in states):
            wanted = "a tuple (hx, cx) of tensors" if len(names) > 1 else "a tensor"
            raise RuntimeError(f"{self.mode}: hx must be {wanted}, got {type(hx).__name__}")
        for state, name in zip(states, names):
            if state.dim() not in (1, 2):
                raise ValueError(f"{self.mode}: Expected {name} to be 1D or 2D, got "
                                 f"{state.dim()}D instead")
            if state.dim() != input.dim():
                raise RuntimeError(f"{self.mode}: {name} must be {input.dim()}-D like the input, "
                                   f"got {state.dim()}-D of shape {_shape(state)}")
            if batched and state.shape[0] != x.shape[0]:
                raise RuntimeError(f"{self.mode}: Input batch size {x.shape[0]} doesn't match "
                                   f"{name} batch size {state.shape[0]}")
            if state.shape[-1] != self.hidden_size:
                raise RuntimeError(f"{self.mode}: {name} has inconsistent hidden_size: got "
                                   f"{state.shape[-1]}, expected {self.hidden_size}")
            if state.dtype != input.dtype and not autocast:
                raise RuntimeError(f"{self.mode}: {name} dtype ({state.dtype}) does not match "
                                   f"input dtype ({input.dtype})")
            if state.device != input.device:
                raise RuntimeError(f"{self.mode}: {name} is on {state.device} but input is on "
                                   f"{input.device}")
        if not batched:
            states = [s.unsqueeze(0) for s in states]
        return x, [s.to(dtype) for s in states], batched


class LSTMCell(_CellBase):
    """Drop-in :class:`torch.nn.LSTMCell`: one step of :class:`lstmgru.LSTM`."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__("LSTMCell", input_size, hidden_size, bias, device, dtype)

    def forward(self, input: torch.Tensor,
                hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        x, (h0, c0), batched = self._prepare(input, hx, ("hx", "cx"))
        with _autocast_off(x.device):
            _, h, c = functional.lstm_layer(x.unsqueeze(0), *self._weights(x.dtype), None, h0, c0)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_CellBase):
    """Drop-in :class:`torch.nn.GRUCell`: one step of :class:`lstmgru.GRU`, including the
    original ``reset_after=False`` form (see :class:`lstmgru.GRU`)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, reset_after: bool = True):
        super().__init__("GRUCell", input_size, hidden_size, bias, device, dtype)
        self.reset_after = bool(reset_after)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.reset_after else ", reset_after=False")

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None):
        x, (h0,), batched = self._prepare(input, hx, ("hx",))
        with _autocast_off(x.device):
            _, h = functional.gru_layer(x.unsqueeze(0), *self._weights(x.dtype), h0,
                                        reset_after=self.reset_after)
        return h if batched else h.squeeze(0)
