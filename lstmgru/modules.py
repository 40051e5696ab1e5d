"""Drop-in ``torch.nn`` LSTM / GRU / LSTMCell / GRUCell.

Same constructor arguments (order, meaning, defaults), same parameter names, shapes,
registration order and initialisation as torch.nn, so ``state_dict``s move both ways with
``strict=True``; same forward inputs (batched or not, ``batch_first``, ``PackedSequence``,
``hx`` given or None) and outputs.

A call first asks ``lstmgru.backends`` which implementation runs it. ``native`` is torch.nn's
own forward, run on this module (which keeps torch.nn's flat-weight bookkeeping for that);
the others get the arguments checked here, with torch.nn's exception types, then the loop over
layers and directions below, one layer-direction at a time (``lstmgru.cells.<cell>.layer``).
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
from torch.autograd import forward_ad
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import backends
from . import onnx as _onnx
from ._sequence import (Lengths, check_length_values, invert_permutation, keep_initial_state,
                        lengths_argument, may_hold_empty_rows, pack_rows, unpack_rows)
from ._torchscript import refuse_torchscript
from .cells import gru as gru_cell
from .cells import lstm as lstm_cell
from .cells import variants as cell_variants

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
    if not torch._C._is_any_autocast_enabled():
        return False
    # Devices without an autocast mode (meta, for one) make torch's query raise.
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def _run_dtype(x: torch.Tensor, autocast_covers_cpu: bool) -> torch.dtype:
    """The dtype torch.nn computes in: the autocast dtype where autocast covers the op
    (every RNN op on CUDA; on the CPU only the LSTM layer), else the input's dtype."""
    covered = x.device.type == "cuda" or (x.device.type == "cpu" and autocast_covers_cpu)
    if covered and _autocast_on(x.device):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _device_type(t: torch.Tensor) -> str:
    # t.device builds a torch.device object: the flags are cheaper on the common devices.
    return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type


def _case_dtype(t: torch.Tensor, autocast_covers_cpu: bool) -> torch.dtype:
    """``_run_dtype`` without its cost when no autocast is on at all (the common case)."""
    if not torch._C._is_any_autocast_enabled():
        return t.dtype
    return _run_dtype(t, autocast_covers_cpu)


def _transform() -> str:
    """Which tracing transform, if any, runs this call (``Case.transform``)."""
    if torch.compiler.is_compiling():
        return "torch.compile"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "torch.func"
    if forward_ad._current_level >= 0:  # inside torch.autograd.forward_ad.dual_level()
        return "forward-mode AD"
    return ""


def _autocast_off(device: torch.device):
    """Inside, dtypes are chosen explicitly (``_run_dtype``), not op by op by autocast."""
    if _autocast_on(device):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _ln_shapes(mode: str, hidden_size: int):
    """The layer-norm parameters of one layer-direction (or cell), in registration order."""
    gates = _GATES[mode.replace("Cell", "")] * hidden_size
    shapes = [("ln_ih_weight", gates), ("ln_hh_weight", gates)]
    if mode.startswith("LSTM"):
        shapes += [("ln_c_weight", hidden_size), ("ln_c_bias", hidden_size)]
    return shapes


def _set_variant_options(module, layer_norm, zoneout, recurrent_dropout, weight_drop,
                         reset_after, proj_size) -> None:
    """Checks and stores the cell-variant options (``lstmgru.cells.variants``)."""
    _check_bool_arg("layer_norm", layer_norm)
    module.zoneout = cell_variants.check_probability("zoneout", zoneout)
    module.recurrent_dropout = cell_variants.check_probability("recurrent_dropout",
                                                               recurrent_dropout)
    module.weight_drop = cell_variants.check_probability("weight_drop", weight_drop)
    if layer_norm and not reset_after:
        raise ValueError("layer_norm=True is defined for the GRU with reset_after=True only")
    if layer_norm and proj_size:
        raise ValueError("layer_norm=True does not support proj_size > 0")
    module.layer_norm = layer_norm
    # The options that are set (whatever the training flag): lstmgru.to_torch refuses them.
    module.variants = cell_variants.Options(layer_norm, module.zoneout, module.recurrent_dropout,
                                            module.weight_drop).in_force()


def _variants_repr(module) -> str:
    s = ", layer_norm=True" if module.layer_norm else ""
    for name in cell_variants.NAMES[1:]:
        if getattr(module, name):
            s += f", {name}={getattr(module, name)}"
    return s


def _variants_of_call(module, reset) -> Tuple[cell_variants.Options, Tuple[str, ...]]:
    """The variants in force for this call and their names (``Case.variants``): dropout-like
    ones only in training, "reset" where a reset tensor is given."""
    if not (module.layer_norm or module.zoneout or module.recurrent_dropout
            or module.weight_drop) and reset is None:
        return _NO_OPTIONS, ()
    options = cell_variants.Options.of(module, module.training)
    names = options.in_force()
    if reset is not None:
        names += ("reset",)
    return options, names


_NO_OPTIONS = cell_variants.Options()


def _unbatched_lengths_error(mode: str, input: torch.Tensor) -> ValueError:
    # An unbatched input is one sequence: its length is its number of steps.
    return ValueError(f"{mode}: lengths= needs batched 3-D input (one length per row), got "
                      f"unbatched input of shape {_shape(input)}; slice the sequence instead")


def _check_reset(reset, mode: str, expected: tuple, device) -> torch.Tensor:
    if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool:
        raise ValueError(f"{mode}: reset must be a bool tensor, got "
                         f"{getattr(reset, 'dtype', type(reset).__name__)}")
    if _shape(reset) != expected:
        raise ValueError(f"{mode}: expected reset of shape {expected}, got {_shape(reset)}")
    return reset.to(device)


def _resets_only_at_start(reset, expected: tuple, time_dim: Optional[int]) -> bool:
    """Whether ``reset`` is a well-formed reset tensor whose resets all fall at t=0 (a cell's
    have no time axis: ``time_dim`` None). Reading the tensor is a host sync on an
    accelerator, so there only T=1 counts."""
    if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool \
            or reset.shape != expected:
        return False  # the call's own checks raise
    steps = 1 if time_dim is None else expected[time_dim]
    if steps <= 1:
        return True
    return reset.is_cpu and not reset.narrow(time_dim, 1, steps - 1).any()


def _reset_cut(reset: torch.Tensor, shape: tuple, device: torch.device) -> torch.Tensor:
    """``reset`` viewed as ``shape`` (to broadcast over the states) on the states' device (a
    device comparison costs less than even a no-op ``.to()``)."""
    cut = reset.reshape(shape)
    return cut if cut.device == device else cut.to(device)


def _fold_resets_possible() -> bool:
    # Tracing transforms and ONNX export keep the reset tensor: the check above reads data.
    return not (torch.compiler.is_compiling() or _onnx.is_exporting()
                or torch._C._functorch.peek_interpreter_stack() is not None)


class _RNNBase(nn.Module):
    mode: str
    reset_after = True  # the GRU's form; a class attribute, so that reading it is cheap
    # Cell-variant options (instances set them; these defaults serve modules pickled before)
    layer_norm, zoneout, recurrent_dropout, weight_drop, variants = False, 0.0, 0.0, 0.0, ()

    # torch.nn.RNNBase's flat-weight bookkeeping and argument checks, taken as they are (they
    # are plain functions of the module's attributes), so that torch.nn's own forward can run
    # on this module ("native") and code that reads these attributes finds torch.nn's.
    _init_flat_weights = nn.RNNBase._init_flat_weights
    _weights_have_changed = nn.RNNBase._weights_have_changed
    _update_flat_weights = nn.RNNBase._update_flat_weights
    flatten_parameters = nn.RNNBase.flatten_parameters
    check_input = nn.RNNBase.check_input
    get_expected_hidden_size = nn.RNNBase.get_expected_hidden_size
    check_hidden_size = nn.RNNBase.check_hidden_size
    check_forward_args = nn.RNNBase.check_forward_args
    permute_hidden = nn.RNNBase.permute_hidden
    # torch.jit.script calls this first: a clear error instead of a cryptic one
    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None,
                 *, layer_norm: bool = False, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_drop: float = 0.0,
                 reset_after: bool = True):
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
        _set_variant_options(self, layer_norm, zoneout, recurrent_dropout, weight_drop,
                             reset_after, proj_size)
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
        self._flat_weights_names: List[str] = []
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
                self._flat_weights_names.extend(names)
                if layer_norm:  # not flat weights: torch's kernels never see them
                    for kind, size in _ln_shapes(mode, hidden_size):
                        setattr(self, kind + suffix,
                                nn.Parameter(torch.empty(size, **factory)))
        self._init_flat_weights()
        self.reset_parameters()

    def __setattr__(self, name, value) -> None:
        # Assigning a weight (a parameter, a plain tensor, a parametrization's result) keeps
        # _flat_weights, which both the native and our own paths read, in step.
        names = self.__dict__.get("_flat_weights_names")
        if names is not None and name in names:
            self._flat_weights[names.index(name)] = value
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() replace the parameters: rebuild the flat list afterwards.
        self._flat_weight_refs = []
        result = super()._apply(fn, recurse)
        self._init_flat_weights()
        return result

    def __getstate__(self):
        self._update_flat_weights()
        state = self.__dict__.copy()
        del state["_flat_weight_refs"]  # weak references neither pickle nor deep-copy
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._init_flat_weights()

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        # Replicas share the flat lists' structure, not the lists themselves.
        replica._flat_weights = replica._flat_weights[:]
        replica._flat_weights_names = replica._flat_weights_names[:]
        return replica

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)); the layer
        norms' gains 1 and biases 0 (drawing nothing, so the others match torch.nn's)."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for name, weight in self.named_parameters(recurse=False):
            if name.startswith("ln_"):
                with torch.no_grad():
                    weight.fill_(0.0 if "_bias" in name else 1.0)
            else:
                nn.init.uniform_(weight, -stdv, stdv)

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
        return s.format(**self.__dict__) + _variants_repr(self)

    # ---------------------------------------------------------------- argument checks
    def _check_input(self, x: torch.Tensor, what: str = "input") -> None:
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype and not (x.is_floating_point() and _autocast_on(x.device)):
            raise ValueError(f"RNN input dtype ({x.dtype}) does not match weight dtype "
                             f"({weight.dtype}). Convert input: input.to({weight.dtype}), or "
                             f"convert model: model.to({x.dtype}) ({self.mode}: the {what})")
        if x.device != weight.device:
            raise RuntimeError(f"{self.mode}: {what} is on {x.device} but the weights are on "
                               f"{weight.device}; move one of them")
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"{self.mode}: input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {x.shape[-1]}")

    def _check_state(self, state: torch.Tensor, name: str, torch_name: str, expected: tuple,
                     x: torch.Tensor, batched: bool):
        if _shape(state) != expected:
            # torch.nn's wording first (user suites match on it); it states unbatched states
            # with their batch dimension of 1.
            shown, got = expected, list(state.shape)
            if not batched:
                shown, got = expected[:1] + (1,) + expected[1:], got[:1] + [1] + got[1:]
            raise RuntimeError(f"Expected {torch_name} size {shown}, got {got} ({self.mode}: "
                               f"{name} is (num_layers * num_directions, batch, size))")
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
        torch_names = ["hidden[0]", "hidden[1]"] if self.mode == "LSTM" else ["hidden"]
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
            if self.mode == "LSTM":
                got = ", ".join(f"{d}-D" for d in dims)
                wording = f"hx and cx should also be {want_dim}-D but got ({got}) tensors"
            else:
                wording = f"hx should also be {want_dim}-D but got {dims[0]}-D tensor"
            raise RuntimeError(f"For {kind} input, {wording} ({self.mode}: "
                               f"{' and '.join(names)})")
        for state, name, torch_name, size in zip(states, names, torch_names, sizes):
            expected = (self.num_layers * directions,) + ((batch,) if batched else ()) + (size,)
            self._check_state(state, name, torch_name, expected, x, batched)
        if not batched:
            states = [s.unsqueeze(1) for s in states]
        if sorted_indices is not None:
            states = [s.index_select(1, sorted_indices) for s in states]
        return states

    # ---------------------------------------------------------------- forward
    def _fold_resets(self, input, hx, reset):
        """``reset`` whose resets all fall at t=0 is the same call as no reset with those rows'
        initial state zeroed, in the forward direction of every layer: in reverse a reset at
        t=0 cuts the state leaving step 0, which nothing reads (``lstmgru.cells.variants``),
        and a reverse direction's initial state is never cut. So such a call runs where a plain
        call does (torch's kernel on the CPU). Returns (hx, reset), folded where that holds;
        a malformed ``reset`` or ``hx`` is left to the call's own checks."""
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        if not isinstance(data, torch.Tensor) or not _fold_resets_possible():
            return hx, reset
        if packed:
            batch = len(input.sorted_indices) if input.sorted_indices is not None \
                else int(input.batch_sizes[0])
            expected, time_dim = (len(input.batch_sizes), batch), 0
        elif data.dim() == 3:
            expected = _shape(data)[:2]
            time_dim = 1 if self.batch_first else 0
        elif data.dim() == 2:
            expected, time_dim = (data.shape[0],), 0
        else:
            return hx, reset
        if not _resets_only_at_start(reset, expected, time_dim):
            return hx, reset
        if hx is None:
            return None, None
        states = list(hx) if self.mode == "LSTM" and isinstance(hx, (tuple, list)) else [hx]
        batched = len(expected) == 2
        directions = 2 if self.bidirectional else 1
        rows = reset.select(time_dim, 0) if batched else reset[0]  # (B,) or ()
        want = (self.num_layers * directions,) + ((rows.shape[0],) if batched else ())
        if len(states) != (2 if self.mode == "LSTM" else 1) or not all(
                isinstance(s, torch.Tensor) and _shape(s)[:-1] == want for s in states):
            return hx, reset
        cut = _reset_cut(rows, (1, -1, 1) if batched else (1, 1), states[0].device)
        if directions == 2:  # forward directions only: rows 0, 2, 4, ... of hx
            forward = torch.arange(want[0], device=cut.device).remainder(2).eq(0)
            cut = cut & forward.reshape((-1,) + (1,) * (cut.dim() - 1))
        states = [s.masked_fill(cut, 0) for s in states]
        return (tuple(states) if self.mode == "LSTM" else states[0]), None

    def _implementation(self, input, variants: Tuple[str, ...] = ()) -> backends.Implementation:
        """The implementation that runs this call. Cheap (a cached decision per case): on the
        native path this is all a call costs beyond torch.nn's own forward."""
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"{self.mode}: input must be a Tensor or a PackedSequence, got "
                            f"{type(input).__name__}")
        transform = _transform()
        if transform == "torch.compile":
            batch = 0  # a traced size: the choice must not specialize the graph on it
        elif packed:
            batch = len(input.sorted_indices) if input.sorted_indices is not None \
                else int(input.batch_sizes[0])
        else:
            batch = 1 if data.dim() != 3 else data.shape[0 if self.batch_first else 1]
        return backends.select(backends.Case(
            self.mode, _device_type(data), _case_dtype(data, self.mode == "LSTM"),
            self.hidden_size, batch, self.proj_size, self.reset_after, variants, transform))

    def forward(self, input, hx=None, *, lengths=None, reset=None):
        """Runs every layer and direction over a sequence: torch.nn's call, plus ``lengths=``
        and ``reset=``.

        Args:
            input: ``(T, B, input_size)``; ``(B, T, input_size)`` with ``batch_first=True``;
                ``(T, input_size)`` unbatched; or a ``PackedSequence``.
            hx: the initial state; zeros when None. GRU: ``h_0``. LSTM: a tuple
                ``(h_0, c_0)``. ``h_0`` is ``(D * num_layers, B, H_out)`` and ``c_0``
                ``(D * num_layers, B, hidden_size)``, without the B axis for unbatched input,
                where ``D`` is 2 if bidirectional else 1 and ``H_out`` is ``proj_size`` if it
                is > 0, else ``hidden_size``. Rows are in the input's batch order, also for a
                ``PackedSequence``.
            lengths: keyword-only. Per-row lengths of a padded batch: an integer tensor on any
                device, or a list, of B entries between 0 and T. Zero-length rows are allowed
                (their ``h_n`` is ``hx``, or zero). Outputs past a row's length are zero (as
                ``pad_packed_sequence`` gives), and ``h_n`` (and ``c_n``) are taken at each
                row's last valid step; the reverse direction starts each row at its own last
                valid step. The same result as packing with
                ``pack_padded_sequence(enforce_sorted=False)`` and padding back.
                On the Triton kernels device lengths are never read on the host (no sync),
                so their values are checked only where they are on the host (a list or a CPU
                tensor); torch's kernel and the reference copy them to the host. Not for
                unbatched input or a ``PackedSequence``. Default None: every row has length T.
            reset: keyword-only. A bool tensor shaped like the input's first two axes:
                ``(T, B)``, ``(B, T)`` with ``batch_first``, ``(T,)`` unbatched, ``(T_max, B)``
                in the original batch order for a ``PackedSequence``. Where ``reset[t, b]`` is
                True, the state entering step t of row b is zero (h and c), whatever ``hx``
                was, and no gradient flows across it. In the reverse direction a reset at t
                zeroes the state the direction carries from step t into step t-1, so a reset
                splits a sequence into ``[0, t)`` and ``[t, T)`` in both directions. Outputs
                and ``h_n`` are never zeroed. Default None: no resets.

        Returns:
            GRU: ``(output, h_n)``; LSTM: ``(output, (h_n, c_n))``.
            ``output`` is ``(T, B, D * H_out)`` (``(B, T, D * H_out)`` with ``batch_first``,
            ``(T, D * H_out)`` unbatched, a ``PackedSequence`` for packed input): the last
            layer's h at every step, both directions concatenated. ``h_n`` and ``c_n`` have the
            shapes of ``h_0`` and ``c_0``: each layer-direction's state after its last step
            (for the reverse direction, after step 0).
        """
        if reset is not None and lengths is None:
            # (with lengths=, a row of length 0 must keep hx: the fold would zero it)
            hx, reset = self._fold_resets(input, hx, reset)
        options, variants = _variants_of_call(self, reset)
        implementation = self._implementation(input, variants)
        if implementation.module_forward is not None:
            if lengths is None:
                return implementation.module_forward(self, input, hx)
            return self._native_with_lengths(implementation.module_forward, input, hx, lengths)
        exporting = _onnx.is_exporting()
        if exporting:
            _onnx.refuse_variants(self.mode, variants)
            self._check_onnx(input)
        packed_input = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = None
        if packed_input:
            if lengths is not None:
                raise ValueError(f"{self.mode}: lengths= is for padded input; a PackedSequence "
                                 "carries its own lengths")
            data, batch_sizes_t, sorted_indices, unsorted_indices = input
            if data.dim() != 2:
                raise ValueError(f"{self.mode}: PackedSequence data must be 2-D (sum of lengths, "
                                 f"input_size), got {data.dim()}-D")
            self._check_input(data, "PackedSequence data")
            batch_sizes = batch_sizes_t.tolist()
            lengths = Lengths.from_batch_sizes(batch_sizes, batch_sizes[0], data.device)
            x = lengths.pad(data)  # not pad_packed_sequence: it has no forward-mode AD
            batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{self.mode}: Expected input to be 2D or 3D, got "
                                 f"{input.dim()}D instead")
            self._check_input(input)
            batched = input.dim() == 3
            if not batched:
                if lengths is not None:
                    raise _unbatched_lengths_error(self.mode, input)
                x = input.unsqueeze(1)
            elif self.batch_first:
                x = input.transpose(0, 1)
            else:
                x = input
            if lengths is not None:
                x, lengths, sorted_indices, unsorted_indices = self._rows_by_length(
                    x, lengths, exporting)
        if x.shape[0] == 0:
            raise RuntimeError(f"{self.mode}: Expected sequence length to be larger than 0 in RNN "
                               f"(input has shape {_shape(x if packed_input else input)})")
        batch = x.shape[1]
        states = self._initial_states(hx, x, batch, batched, sorted_indices)
        if reset is not None:
            # reset follows the input's layout: (T, B), (B, T) with batch_first, (T,)
            # unbatched, and (T_max, B) in the original batch order for a PackedSequence.
            if packed_input:
                expected = (x.shape[0], batch)
            elif not batched:
                expected = (x.shape[0],)
            else:
                expected = _shape(input)[:2]
            reset = _check_reset(reset, self.mode, expected, x.device)
            if not batched:
                reset = reset.unsqueeze(1)
            elif not packed_input and self.batch_first:
                reset = reset.t()
            if sorted_indices is not None:
                reset = reset.index_select(1, sorted_indices.to(x.device))
        dtype = _run_dtype(x, autocast_covers_cpu=self.mode == "LSTM")
        if exporting:  # ONNX's own LSTM / GRU nodes, one per layer (lstmgru.onnx)
            output, final = self._onnx_layers(x.to(dtype), [s.to(dtype) for s in states],
                                              dtype, lengths)
        else:
            with _autocast_off(x.device):
                output, final = self._layers(x.to(dtype).contiguous(),
                                             [s.to(dtype) for s in states], lengths, dtype,
                                             implementation.recurrence,
                                             options if variants else None, reset)

        if unsorted_indices is not None:
            final = [f.index_select(1, unsorted_indices) for f in final]
        if packed_input:
            output = PackedSequence(pack_rows(output, lengths.host), batch_sizes_t,
                                    sorted_indices, unsorted_indices)
        elif not batched:
            output = output.squeeze(1)
            final = [f.squeeze(1) for f in final]
        else:
            if unsorted_indices is not None:  # lengths=: the rows back in the caller's order
                output = output.index_select(1, unsorted_indices)
            if self.batch_first:
                output = output.transpose(0, 1)
        return output, (tuple(final) if self.mode == "LSTM" else final[0])

    def _rows_by_length(self, x: torch.Tensor, lengths, exporting: bool):
        """``lengths=``: x (T, B, I) with its rows sorted by length, exactly as
        ``pack_padded_sequence(enforce_sorted=False)`` sorts them (so every implementation
        then runs what it runs for that packed input, bit for bit), the ``Lengths``, and
        the permutation and its inverse.

        Nothing here reads the lengths' values on the host when they are on a device: they
        are sorted there, and the Triton kernels take them there. (The reference's loop
        slices the active rows by host counts, so it copies them inside its op.)
        """
        T = x.shape[0]
        tracing = torch.compiler.is_compiling()
        per_row, on_host = lengths_argument(lengths, x.shape[1], self.mode)
        if on_host and not tracing:
            check_length_values(per_row, T, self.mode)
        if exporting:  # ONNX's sequence_lens takes rows in any order
            return x, Lengths(None, per_row.to(x.device)), None, None
        ordered, sorted_indices = torch.sort(per_row, descending=True)
        sorted_indices = sorted_indices.to(x.device)
        # Host lengths let inter-layer dropout draw its mask on the packed rows, as torch.nn's
        # packed call does (_inter_layer_dropout); a traced call keeps to tensor ops.
        host = ordered if on_host and not tracing else None
        return (x.index_select(1, sorted_indices), Lengths(None, ordered.to(x.device), host),
                sorted_indices, invert_permutation(sorted_indices))

    def _native_with_lengths(self, module_forward, input, hx, lengths):
        """``lengths=`` on torch's own kernel: ``pack_padded_sequence(enforce_sorted=False)``,
        torch.nn's forward, ``pad_packed_sequence(total_length=T)``, so the result is torch.nn's
        on that packed input, bit for bit. Packing takes the lengths on the host: a copy (and
        a wait) where they are on a device. Rows of length 0, which packing refuses, take no
        step: their output is 0 and their final state is hx (or 0)."""
        if isinstance(input, PackedSequence):
            raise ValueError(f"{self.mode}: lengths= is for padded input; a PackedSequence "
                             "carries its own lengths")
        if not isinstance(input, torch.Tensor) or input.dim() != 3:
            if isinstance(input, torch.Tensor) and input.dim() == 2:
                raise _unbatched_lengths_error(self.mode, input)
            return module_forward(self, input, hx)  # torch.nn's own error for the input
        batch_dim = 0 if self.batch_first else 1
        T, B = input.shape[1 - batch_dim], input.shape[batch_dim]
        per_row, _ = lengths_argument(lengths, B, self.mode)
        if per_row.is_meta:
            raise ValueError(f"{self.mode}: torch's kernel packs the rows by their lengths, and "
                             "lengths on the meta device have no values; pass them on the CPU "
                             "or run lstmgru.use_backend('reference')")
        host = per_row.cpu()
        check_length_values(host, T, self.mode)
        if B == 0 or bool((host > 0).all()):
            packed = pack_padded_sequence(input, host, batch_first=self.batch_first,
                                          enforce_sorted=False)
            output, final = module_forward(self, packed, hx)
            return pad_packed_sequence(output, batch_first=self.batch_first,
                                       total_length=T)[0], final
        x = input.transpose(0, 1) if self.batch_first else input
        self._check_input(x)
        states = self._initial_states(hx, x, B, True, None)  # checked; zeros for None
        directions = 2 if self.bidirectional else 1
        width = directions * (self.proj_size or self.hidden_size)
        output = input.new_zeros((B, T, width) if self.batch_first else (T, B, width))
        kept = (host > 0).nonzero().squeeze(1)
        if kept.numel() == 0:
            final = states
        else:
            rows = kept.to(input.device)
            packed = pack_padded_sequence(input.index_select(batch_dim, rows), host[kept],
                                          batch_first=self.batch_first, enforce_sorted=False)
            kept_hx = [s.index_select(1, rows) for s in states]
            kept_output, kept_final = module_forward(
                self, packed, tuple(kept_hx) if self.mode == "LSTM" else kept_hx[0])
            kept_output = pad_packed_sequence(kept_output, batch_first=self.batch_first,
                                              total_length=T)[0]
            output = output.index_copy(batch_dim, rows, kept_output)
            kept_final = kept_final if self.mode == "LSTM" else (kept_final,)
            final = [s.index_copy(1, rows, f) for s, f in zip(states, kept_final)]
        return output, (tuple(final) if self.mode == "LSTM" else final[0])

    def _layers(self, x, states, lengths, dtype, recurrence, options=None, reset=None):
        """All layers and directions: x (T, B, I) -> output (T, B, D*P), final states.
        With ``options`` (variants in force) each layer-direction gets its own masks
        (``lstmgru.cells.variants.layer_variants``), drawn here in layer-direction order."""
        directions = 2 if self.bidirectional else 1
        self._update_flat_weights()  # parametrizations and functional_call swap the weights
        per_layer = len(self._all_weights[0])
        finals: List[List[torch.Tensor]] = [[] for _ in states]
        empty_rows = may_hold_empty_rows(lengths)
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                weights = [w.to(dtype) for w in
                           self._flat_weights[index * per_layer:(index + 1) * per_layer]]
                layer_states = [s[index] for s in states]
                variants = None
                if options is not None:
                    variants = cell_variants.layer_variants(
                        options, self._norms(layer, direction, dtype), weights[1],
                        layer_input.shape[0], layer_input.shape[1], layer_states[0].shape[1],
                        reset, None if lengths is None else lengths.per_row, direction == 1)
                y, *last = self._run_layer(layer_input, weights, layer_states, lengths,
                                           direction == 1, recurrence, variants)
                if empty_rows:
                    last = [keep_initial_state(f, s, lengths.per_row)
                            for f, s in zip(last, layer_states)]
                outputs.append(y)
                for kept, state in zip(finals, last):
                    kept.append(state)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, 2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = self._inter_layer_dropout(layer_input, lengths)
        return layer_input, [torch.stack(kept) for kept in finals]

    def _inter_layer_dropout(self, layer_input, lengths):
        """Dropout where torch.nn applies it: on the packed rows where the lengths are on the
        host (so the same seed draws torch.nn's mask for the packed call), else on the whole
        output, where the zeros past each length stay zero (lengths= on a device: packing
        would wait for it)."""
        if lengths is None or lengths.host is None:
            return F.dropout(layer_input, self.dropout, training=True)
        data = F.dropout(pack_rows(layer_input, lengths.host), self.dropout, training=True)
        return unpack_rows(data, lengths.host, layer_input)

    def _norms(self, layer: int, direction: int, dtype) -> Optional[list]:
        if not self.layer_norm:
            return None
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        return [getattr(self, kind + suffix).to(dtype)
                for kind, _ in _ln_shapes(self.mode, self.hidden_size)]

    def _split_weights(self, weights):
        weight_ih, weight_hh, *rest = weights
        bias_ih, bias_hh = (rest[0], rest[1]) if self.bias else (None, None)
        weight_hr = rest[-1] if self.proj_size > 0 else None
        return weight_ih, weight_hh, bias_ih, bias_hh, weight_hr


    def _check_onnx(self, input) -> None:
        if isinstance(input, PackedSequence):
            # Its batch sizes are data: torch.export cannot trace pad_packed_sequence (torch's
            # own pack -> pad fails there alone), so the padded input and lengths= are the way.
            raise _onnx.unsupported("PackedSequence input (pass the padded input and lengths=, "
                                    "which become the node's sequence_lens)", self.mode)
        if self.proj_size > 0:
            raise _onnx.unsupported(f"proj_size={self.proj_size} (ONNX's LSTM has no projection)",
                                    self.mode)

    def _onnx_layers(self, x, states, dtype, lengths):
        """``_layers`` while ``torch.onnx.export`` traces: one ONNX node per layer, both
        directions in it; ``lengths`` become the nodes' ``sequence_lens``."""
        sequence_lens = None if lengths is None else lengths.per_row
        directions = 2 if self.bidirectional else 1
        self._update_flat_weights()
        per_layer = len(self._all_weights[0])
        finals: List[List[torch.Tensor]] = [[] for _ in states]
        layer_input = x
        for layer in range(self.num_layers):
            weights = []
            for direction in range(directions):
                index = layer * directions + direction
                w = [w.to(dtype) for w in
                     self._flat_weights[index * per_layer:(index + 1) * per_layer]]
                weights.append(w[:4] if self.bias else [w[0], w[1], None, None])
            rows = slice(layer * directions, (layer + 1) * directions)
            layer_input, *last = self._onnx_layer(layer_input, weights,
                                                  [s[rows] for s in states], sequence_lens)
            for kept, state in zip(finals, last):
                kept.append(state)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return layer_input, [torch.cat(kept) for kept in finals]


class LSTM(_RNNBase):
    r"""Drop-in :class:`torch.nn.LSTM` (same arguments, parameters, inputs and outputs), with
    optional cell variants.

    For each step, with gates stacked i, f, g, o in ``weight_ih_l{k}`` / ``weight_hh_l{k}``::

        i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)     g = tanh(W_ig x + b_ig + W_hg h + b_hg)
        f = sigmoid(W_if x + b_if + W_hf h + b_hf)     o = sigmoid(W_io x + b_io + W_ho h + b_ho)
        c' = f * c + i * g                             h' = o * tanh(c')   (then W_hr h' if proj_size)

    Args:
        input_size: the number of features in the input ``x``.
        hidden_size: the number of features in the hidden state ``h``.
        num_layers: stacked recurrent layers; the output of each feeds the next. Default 1.
        bias: if False, no ``bias_ih_l{k}`` / ``bias_hh_l{k}``. Default True.
        batch_first: if True, input and output are ``(B, T, feature)`` instead of
            ``(T, B, feature)``; the states are not affected. Default False.
        dropout: if non-zero, dropout with this probability on the outputs of every layer but
            the last, in training. Default 0.
        bidirectional: if True, each layer runs forwards and backwards and concatenates both
            outputs. Default False.
        proj_size: if > 0, an LSTM with projections: ``h`` is ``W_hr (o * tanh(c'))`` of size
            ``proj_size`` (parameters ``weight_hr_l{k}``). Default 0.
        device, dtype: where and in which dtype the parameters are created.
        layer_norm: keyword-only. Layer normalisation (Ba et al. 2016) of ``x W_ih^T`` and of
            ``h W_hh^T`` over the whole gate vector before the biases; also normalises ``c'``
            inside ``tanh``. Adds the parameters ``ln_ih_weight_l{k}``, ``ln_hh_weight_l{k}``,
            ``ln_c_weight_l{k}``, ``ln_c_bias_l{k}`` per layer-direction (``_reverse`` for the
            reverse direction). Default False.
        zoneout: keyword-only. Zoneout probability on h (Krueger et al. 2016): in training each
            unit keeps its previous value with this probability, per step and row; in eval h is
            the mix ``p * h_prev + (1 - p) * h_new``. The cell state c is not zoned out. Default 0.
        recurrent_dropout: keyword-only. Training only: dropout on h where it enters the
            recurrent product, one mask per call, row and unit, fixed over the steps (Keras'
            ``recurrent_dropout``). Default 0.
        weight_drop: keyword-only. Training only: DropConnect on ``weight_hh`` (AWD-LSTM), one
            mask per call over the matrix, scaled 1/(1-p); the parameter is not changed.
            Default 0.

    Call it as ``output, (h_n, c_n) = lstm(input, (h_0, c_0))``; see :meth:`forward` for the
    shapes, ``lengths=`` and ``reset=``. Parameters have torch.nn's names, shapes, order and
    initialisation (``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``; layer-norm gains 1, biases
    0), so a ``state_dict`` moves between this module and ``torch.nn.LSTM`` with ``strict=True``
    (without the variants' parameters). ``isinstance(module, torch.nn.LSTM)`` is False.

    Which implementation runs a call is decided per call by ``lstmgru.backends`` (default
    ``"auto"``; ``lstmgru.set_backend`` / ``lstmgru.use_backend`` choose another). On the CPU,
    ``auto`` runs torch's own kernel wherever it computes the same function (the result is then
    torch.nn's, bit for bit) and lstmgru's plain-PyTorch reference for the rest (the original
    GRU, the cell variants). On CUDA, ``auto`` runs cuDNN for what cuDNN computes, unless a
    calibration measured on that GPU says lstmgru's Triton kernels are faster for the case
    (``python -m lstmgru.calibrate``), and the Triton kernels for what only they compute. An
    explicitly named backend runs that implementation or raises, naming the reason.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, layer_norm: bool = False,
                 zoneout: float = 0.0, recurrent_dropout: float = 0.0,
                 weight_drop: float = 0.0):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype, layer_norm=layer_norm,
                         zoneout=zoneout, recurrent_dropout=recurrent_dropout,
                         weight_drop=weight_drop)

    check_forward_args = nn.LSTM.check_forward_args
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    permute_hidden = nn.LSTM.permute_hidden

    def _run_layer(self, layer_input, weights, states, lengths, reverse, recurrence,
                   variants=None):
        return lstm_cell.layer(layer_input, self._split_weights(weights), states[0], states[1],
                               lengths, reverse, recurrence, variants)

    def _onnx_layer(self, layer_input, weights, states, sequence_lens=None):
        return _onnx.lstm_layer(layer_input, weights, states[0], states[1],
                                sequence_lens=sequence_lens)


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

    Args:
        input_size: the number of features in the input ``x``.
        hidden_size: the number of features in the hidden state ``h``.
        num_layers: stacked recurrent layers; the output of each feeds the next. Default 1.
        bias: if False, no ``bias_ih_l{k}`` / ``bias_hh_l{k}``. Default True.
        batch_first: if True, input and output are ``(B, T, feature)`` instead of
            ``(T, B, feature)``; the states are not affected. Default False.
        dropout: if non-zero, dropout with this probability on the outputs of every layer but
            the last, in training. Default 0.
        bidirectional: if True, each layer runs forwards and backwards and concatenates both
            outputs. Default False.
        device, dtype: where and in which dtype the parameters are created.
        proj_size: keyword-only, accepted for torch.nn's signature; must be 0 (projections
            exist for the LSTM only).
        reset_after: keyword-only. True (default) is torch.nn's and cuDNN's GRU; False is the
            original GRU (see above), which torch.nn cannot compute.
        layer_norm: keyword-only. Layer normalisation (Ba et al. 2016) of ``x W_ih^T`` and of
            ``h W_hh^T`` over the whole gate vector before the biases (``reset_after=True``
            only). Adds the parameters ``ln_ih_weight_l{k}``, ``ln_hh_weight_l{k}`` per
            layer-direction (``_reverse`` for the reverse direction). Default False.
        zoneout: keyword-only. Zoneout probability on h (Krueger et al. 2016): in training each
            unit keeps its previous value with this probability, per step and row; in eval h is
            the mix ``p * h_prev + (1 - p) * h_new``. Default 0.
        recurrent_dropout: keyword-only. Training only: dropout on h where it enters the
            recurrent product, one mask per call, row and unit, fixed over the steps (Keras'
            ``recurrent_dropout``). Default 0.
        weight_drop: keyword-only. Training only: DropConnect on ``weight_hh`` (AWD-LSTM), one
            mask per call over the matrix, scaled 1/(1-p); the parameter is not changed.
            Default 0.

    Call it as ``output, h_n = gru(input, h_0)``; see :meth:`forward` for the shapes,
    ``lengths=`` and ``reset=``. Parameters have torch.nn's names, shapes, order and
    initialisation (``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``; layer-norm gains 1, biases
    0), so a ``state_dict`` moves between this module and ``torch.nn.GRU`` with ``strict=True``
    (without the variants' parameters). ``isinstance(module, torch.nn.GRU)`` is False.

    Which implementation runs a call is decided per call by ``lstmgru.backends`` (default
    ``"auto"``; ``lstmgru.set_backend`` / ``lstmgru.use_backend`` choose another). On the CPU,
    ``auto`` runs torch's own kernel wherever it computes the same function (the result is then
    torch.nn's, bit for bit) and lstmgru's plain-PyTorch reference for the rest (the original
    GRU, the cell variants). On CUDA, ``auto`` runs cuDNN for what cuDNN computes, unless a
    calibration measured on that GPU says lstmgru's Triton kernels are faster for the case
    (``python -m lstmgru.calibrate``), and the Triton kernels for what only they compute. An
    explicitly named backend runs that implementation or raises, naming the reason.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, proj_size: int = 0, reset_after: bool = True,
                 layer_norm: bool = False, zoneout: float = 0.0, recurrent_dropout: float = 0.0,
                 weight_drop: float = 0.0):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype, layer_norm=layer_norm,
                         zoneout=zoneout, recurrent_dropout=recurrent_dropout,
                         weight_drop=weight_drop, reset_after=reset_after)
        self.reset_after = bool(reset_after)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.reset_after else ", reset_after=False")

    def _run_layer(self, layer_input, weights, states, lengths, reverse, recurrence,
                   variants=None):
        return gru_cell.layer(layer_input, self._split_weights(weights)[:4], states[0], lengths,
                              reverse, self.reset_after, recurrence, variants)

    def _onnx_layer(self, layer_input, weights, states, sequence_lens=None):
        return _onnx.gru_layer(layer_input, weights, states[0], self.reset_after,
                               sequence_lens=sequence_lens)


class _CellBase(nn.Module):
    mode: str
    reset_after = True  # as in _RNNBase
    layer_norm, zoneout, recurrent_dropout, weight_drop, variants = False, 0.0, 0.0, 0.0, ()
    __prepare_scriptable__ = refuse_torchscript  # as in _RNNBase

    def __init__(self, mode: str, input_size: int, hidden_size: int, bias: bool = True,
                 device=None, dtype=None, *, layer_norm: bool = False, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_drop: float = 0.0,
                 reset_after: bool = True):
        super().__init__()
        _check_size_arg("input_size", input_size, 1)
        _check_size_arg("hidden_size", hidden_size, 0)  # torch's cells accept 0
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
        _set_variant_options(self, layer_norm, zoneout, recurrent_dropout, weight_drop,
                             reset_after, 0)
        if layer_norm:
            for kind, size in _ln_shapes(mode, hidden_size):
                setattr(self, kind, nn.Parameter(torch.empty(size, **factory)))
        self.reset_parameters()

    reset_parameters = _RNNBase.reset_parameters

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        return s.format(**self.__dict__) + _variants_repr(self)

    def _norms(self, dtype) -> Optional[list]:
        if not self.layer_norm:
            return None
        return [getattr(self, kind).to(dtype) for kind, _ in _ln_shapes(self.mode,
                                                                      self.hidden_size)]

    def _cell_reset(self, reset, x: torch.Tensor, batched: bool) -> Optional[torch.Tensor]:
        if reset is None:
            return None
        expected = (x.shape[0],) if batched else ()
        return _check_reset(reset, self.mode, expected, x.device).reshape(1, x.shape[0])

    def _step_variants(self, options, variants, weights, x, reset, batched):
        """The one step's variants (``lstmgru.cells.variants.layer_variants``), or None."""
        if not variants:
            return None
        return cell_variants.layer_variants(options, self._norms(x.dtype), weights[1], 1,
                                            x.shape[0], self.hidden_size,
                                            self._cell_reset(reset, x, batched), None, False)

    def _fold_resets(self, input, hx, reset):
        """A cell's ``reset`` (B,) zeroes the state entering its one step: the same call as no
        reset with those rows of ``hx`` zeroed, which runs where a plain call does (torch's
        kernel on the CPU). Returns (hx, reset); malformed arguments are left to the checks.
        (Every call with a reset passes here: kept to few Python steps.)"""
        if not isinstance(input, torch.Tensor) or not _fold_resets_possible():
            return hx, reset
        expected = input.shape[:1] if input.dim() == 2 else ()
        if not _resets_only_at_start(reset, expected, None):
            return hx, reset
        if hx is None:
            return None, None
        shape = (-1, 1) if expected else (1,)
        if self.mode == "GRUCell":
            if isinstance(hx, torch.Tensor) and hx.shape[:-1] == expected:
                return hx.masked_fill(_reset_cut(reset, shape, hx.device), 0), None
        elif isinstance(hx, (tuple, list)) and len(hx) == 2:
            h, c = hx
            if isinstance(h, torch.Tensor) and isinstance(c, torch.Tensor) \
                    and h.shape[:-1] == expected and c.shape[:-1] == expected:
                cut = _reset_cut(reset, shape, h.device)
                return (h.masked_fill(cut, 0), c.masked_fill(cut, 0)), None
        return hx, reset

    def _implementation(self, input, variants: Tuple[str, ...] = ()) -> backends.Implementation:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{self.mode}: input must be a Tensor, got {type(input).__name__}")
        transform = _transform()
        batch = 0 if transform == "torch.compile" else input.shape[0] if input.dim() == 2 else 1
        return backends.select(backends.Case(
            self.mode, _device_type(input), _case_dtype(input, autocast_covers_cpu=False),
            self.hidden_size, batch, 0, self.reset_after, variants, transform))

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
        for index, (state, name) in enumerate(zip(states, names)):
            # torch.nn's names for the states in its messages
            rank_name = f"hx[{index}]" if len(names) > 1 else "hidden"
            hidden_name = f"hidden{index}"
            if state.dim() not in (1, 2):
                raise ValueError(f"{self.mode}: Expected {rank_name} to be 1D or 2D, got "
                                 f"{state.dim()}D instead ({name})")
            if state.dim() != input.dim():
                raise RuntimeError(f"{self.mode}: {name} must be {input.dim()}-D like the input, "
                                   f"got {state.dim()}-D of shape {_shape(state)}")
            if batched and state.shape[0] != x.shape[0]:
                raise RuntimeError(f"Input batch size {x.shape[0]} doesn't match {hidden_name} "
                                   f"batch size {state.shape[0]} ({self.mode}: {name})")
            if state.shape[-1] != self.hidden_size:
                raise RuntimeError(f"{hidden_name} has inconsistent hidden_size: got "
                                   f"{state.shape[-1]}, expected {self.hidden_size} "
                                   f"({self.mode}: {name})")
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
    """Drop-in :class:`torch.nn.LSTMCell`: one step of :class:`lstmgru.LSTM`, with optional cell
    variants.

    Args:
        input_size: the number of features in the input ``x``.
        hidden_size: the number of features in the hidden state ``h``.
        bias: if False, no ``bias_ih`` / ``bias_hh``. Default True.
        device, dtype: where and in which dtype the parameters are created.
        layer_norm: keyword-only. Layer normalisation (Ba et al. 2016) of ``x W_ih^T`` and of
            ``h W_hh^T`` over the whole gate vector before the biases; also normalises ``c'``
            inside ``tanh``. Adds the parameters ``ln_ih_weight``, ``ln_hh_weight``,
            ``ln_c_weight``, ``ln_c_bias``. Default False.
        zoneout: keyword-only. Zoneout probability on h (Krueger et al. 2016): in training each
            unit keeps its previous value with this probability, per step and row; in eval h is
            the mix ``p * h_prev + (1 - p) * h_new``. The cell state c is not zoned out. Default 0.
        recurrent_dropout: keyword-only. Training only: dropout on h where it enters the
            recurrent product, one mask per call, row and unit, fixed over the steps (Keras'
            ``recurrent_dropout``). Default 0.
        weight_drop: keyword-only. Training only: DropConnect on ``weight_hh`` (AWD-LSTM), one
            mask per call over the matrix, scaled 1/(1-p); the parameter is not changed.
            Default 0.

    Parameters have torch.nn's names, shapes and initialisation, so a ``state_dict`` moves
    between this module and ``torch.nn.LSTMCell`` with ``strict=True`` (without the variants'
    parameters). ``isinstance(cell, torch.nn.LSTMCell)`` is False.

    Which implementation runs a call is decided per call by ``lstmgru.backends`` (default
    ``"auto"``; ``lstmgru.set_backend`` / ``lstmgru.use_backend`` choose another). On the CPU,
    ``auto`` runs torch's own kernel wherever it computes the same function (the result is then
    torch.nn's, bit for bit) and lstmgru's plain-PyTorch reference for the rest (the original
    GRU, the cell variants). On CUDA, ``auto`` runs cuDNN for what cuDNN computes, unless a
    calibration measured on that GPU says lstmgru's Triton kernels are faster for the case
    (``python -m lstmgru.calibrate``), and the Triton kernels for what only they compute. An
    explicitly named backend runs that implementation or raises, naming the reason.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, layer_norm: bool = False, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_drop: float = 0.0):
        super().__init__("LSTMCell", input_size, hidden_size, bias, device, dtype,
                         layer_norm=layer_norm, zoneout=zoneout,
                         recurrent_dropout=recurrent_dropout, weight_drop=weight_drop)

    def forward(self, input: torch.Tensor,
                hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, *, reset=None):
        """One step: torch.nn's call, plus ``reset=``.

        Args:
            input: ``(B, input_size)``, or ``(input_size,)`` unbatched.
            hx: a tuple ``(h, c)``, each ``(B, hidden_size)`` (``(hidden_size,)`` unbatched);
            zeros when None.
            reset: keyword-only. A bool tensor ``(B,)`` (``()`` unbatched): where True, the
                row's incoming state is zero, whatever ``hx`` was, and no gradient flows
                across it. Default None.

        Returns:
            ``(h', c')``, each shaped like ``h``: the state after the step.
        """
        if reset is not None:
            hx, reset = self._fold_resets(input, hx, reset)
        options, variants = _variants_of_call(self, reset)
        implementation = self._implementation(input, variants)
        if implementation.module_forward is not None:
            return implementation.module_forward(self, input, hx)
        x, (h0, c0), batched = self._prepare(input, hx, ("hx", "cx"))
        if _onnx.is_exporting():  # one step of ONNX's LSTM
            _onnx.refuse_variants(self.mode, variants)
            _, h, c = _onnx.lstm_layer(x.unsqueeze(0), [self._weights(x.dtype)], h0.unsqueeze(0),
                                       c0.unsqueeze(0))
            h, c = h[0], c[0]
            return (h, c) if batched else (h.squeeze(0), c.squeeze(0))
        with _autocast_off(x.device):
            weights = self._weights(x.dtype)
            _, h, c = lstm_cell.layer(x.unsqueeze(0), weights + [None], h0, c0, None, False,
                                      implementation.recurrence,
                                      self._step_variants(options, variants, weights, x, reset,
                                                          batched))
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_CellBase):
    """Drop-in :class:`torch.nn.GRUCell`: one step of :class:`lstmgru.GRU`, including the
    original ``reset_after=False`` form (see :class:`lstmgru.GRU`), with optional cell variants.

    Args:
        input_size: the number of features in the input ``x``.
        hidden_size: the number of features in the hidden state ``h``.
        bias: if False, no ``bias_ih`` / ``bias_hh``. Default True.
        device, dtype: where and in which dtype the parameters are created.
        reset_after: keyword-only. True (default) is torch.nn's GRU cell; False is the original
            GRU, which torch.nn cannot compute.
        layer_norm: keyword-only. Layer normalisation (Ba et al. 2016) of ``x W_ih^T`` and of
            ``h W_hh^T`` over the whole gate vector before the biases (``reset_after=True``
            only). Adds the parameters ``ln_ih_weight``, ``ln_hh_weight``. Default False.
        zoneout: keyword-only. Zoneout probability on h (Krueger et al. 2016): in training each
            unit keeps its previous value with this probability, per step and row; in eval h is
            the mix ``p * h_prev + (1 - p) * h_new``. Default 0.
        recurrent_dropout: keyword-only. Training only: dropout on h where it enters the
            recurrent product, one mask per call, row and unit, fixed over the steps (Keras'
            ``recurrent_dropout``). Default 0.
        weight_drop: keyword-only. Training only: DropConnect on ``weight_hh`` (AWD-LSTM), one
            mask per call over the matrix, scaled 1/(1-p); the parameter is not changed.
            Default 0.

    Parameters have torch.nn's names, shapes and initialisation, so a ``state_dict`` moves
    between this module and ``torch.nn.GRUCell`` with ``strict=True`` (without the variants'
    parameters). ``isinstance(cell, torch.nn.GRUCell)`` is False.

    Which implementation runs a call is decided per call by ``lstmgru.backends`` (default
    ``"auto"``; ``lstmgru.set_backend`` / ``lstmgru.use_backend`` choose another). On the CPU,
    ``auto`` runs torch's own kernel wherever it computes the same function (the result is then
    torch.nn's, bit for bit) and lstmgru's plain-PyTorch reference for the rest (the original
    GRU, the cell variants). On CUDA, ``auto`` runs cuDNN for what cuDNN computes, unless a
    calibration measured on that GPU says lstmgru's Triton kernels are faster for the case
    (``python -m lstmgru.calibrate``), and the Triton kernels for what only they compute. An
    explicitly named backend runs that implementation or raises, naming the reason.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, reset_after: bool = True, layer_norm: bool = False,
                 zoneout: float = 0.0, recurrent_dropout: float = 0.0, weight_drop: float = 0.0):
        super().__init__("GRUCell", input_size, hidden_size, bias, device, dtype,
                         layer_norm=layer_norm, zoneout=zoneout,
                         recurrent_dropout=recurrent_dropout, weight_drop=weight_drop,
                         reset_after=reset_after)
        self.reset_after = bool(reset_after)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.reset_after else ", reset_after=False")

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None, *, reset=None):
        """One step: torch.nn's call, plus ``reset=``.

        Args:
            input: ``(B, input_size)``, or ``(input_size,)`` unbatched.
            hx: ``h``, ``(B, hidden_size)`` (``(hidden_size,)`` unbatched); zeros when None.
            reset: keyword-only. A bool tensor ``(B,)`` (``()`` unbatched): where True, the
                row's incoming state is zero, whatever ``hx`` was, and no gradient flows
                across it. Default None.

        Returns:
            ``h'``, shaped like ``h``: the state after the step.
        """
        if reset is not None:
            hx, reset = self._fold_resets(input, hx, reset)
        options, variants = _variants_of_call(self, reset)
        implementation = self._implementation(input, variants)
        if implementation.module_forward is not None:
            return implementation.module_forward(self, input, hx)
        x, (h0,), batched = self._prepare(input, hx, ("hx",))
        if _onnx.is_exporting():  # one step of ONNX's GRU
            _onnx.refuse_variants(self.mode, variants)
            h = _onnx.gru_layer(x.unsqueeze(0), [self._weights(x.dtype)], h0.unsqueeze(0),
                                self.reset_after)[1][0]
            return h if batched else h.squeeze(0)
        with _autocast_off(x.device):
            weights = self._weights(x.dtype)
            _, h = gru_cell.layer(x.unsqueeze(0), weights, h0, None, False, self.reset_after,
                                  implementation.recurrence,
                                  self._step_variants(options, variants, weights, x, reset,
                                                      batched))
        return h if batched else h.squeeze(0)
