"""Convert trained Keras 3 ``LSTM`` / ``GRU`` layers into ``lstmgru`` modules.

Keras and torch compute the same recurrences but store the weights differently:

* Keras keeps ``kernel`` as (input, gates * units) and ``recurrent_kernel`` as
  (units, gates * units); torch keeps ``weight_ih`` as (gates * hidden, input) and
  ``weight_hh`` as (gates * hidden, hidden). So every matrix is transposed.
* Keras LSTM gate order is i, f, c, o, which is torch's i, f, g, o. It has one bias of
  4 * units; torch has two that are simply added, so the Keras bias goes into
  ``bias_ih`` and ``bias_hh`` is zero.
* Keras GRU gate order is z, r, h; torch's is r, z, n, so the first two blocks swap.
  Keras updates ``h = z * h_prev + (1 - z) * hh`` and torch ``h = (1 - z) * n + z * h_prev``:
  the same function of the same z, so no sign change is needed.
  With ``reset_after=True`` (the Keras default, cuDNN's form) the bias is (2, 3 * units):
  row 0 is the input bias, row 1 the recurrent bias, which sits inside ``r * (...)``
  exactly like torch's ``b_hn``. With ``reset_after=False`` (the original GRU, reset gate
  applied to ``h`` before the product) there is one bias of 3 * units; the module is built
  with ``reset_after=False`` and ``bias_hh`` is zero.

Keras is imported only when a conversion is asked for, so ``import lstmgru`` stays light
and Keras stays an optional dependency (``pip install lstmgru[keras]``).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["from_keras"]


def _name_of(fn) -> str:
    """A readable name for an activation, for error messages."""
    return getattr(fn, "__name__", repr(fn))


def _refuse(attribute: str, value, supported: str) -> None:
    raise ValueError(
        f"from_keras: {attribute}={value!r} cannot be represented by lstmgru; "
        f"supported: {supported}"
    )


def _check_layer(layer, keras) -> str:
    """Return "lstm" or "gru", or raise for anything the conversion would not reproduce."""
    # GRU is checked by class, not by name, so subclasses of keras.layers.LSTM/GRU that keep
    # the cell math convert too; anything else (Dense, SimpleRNN, Bidirectional wrappers,
    # bare cells) is a different kind of object, hence TypeError rather than ValueError.
    if isinstance(layer, keras.layers.LSTM):
        kind = "lstm"
    elif isinstance(layer, keras.layers.GRU):
        kind = "gru"
    else:
        raise TypeError(
            "from_keras expects a keras.layers.LSTM or keras.layers.GRU layer, "
            f"got {type(layer).__module__}.{type(layer).__qualname__}"
        )

    if not layer.built:
        raise ValueError(
            f"from_keras: layer {layer.name!r} is not built (built=False), so it has no "
            "weights yet; call it on an input or call layer.build(input_shape) first"
        )
    # The torch modules hard-code tanh and sigmoid; any other choice changes the function.
    # Identity, not name, is compared: a user function that happens to be called "tanh"
    # is not known to be tanh. keras.ops.* are the same functions under another name.
    if layer.activation not in (keras.activations.tanh, keras.ops.tanh):
        _refuse("activation", _name_of(layer.activation), "'tanh'")
    if layer.recurrent_activation not in (keras.activations.sigmoid, keras.ops.sigmoid):
        _refuse("recurrent_activation", _name_of(layer.recurrent_activation), "'sigmoid'")
    # go_backwards also reverses the order of the returned sequence, which no torch.nn
    # LSTM/GRU option reproduces; stateful carries hidden state between calls, which a
    # torch module does not do implicitly (pass h0 / (h0, c0) yourself instead).
    if layer.go_backwards:
        _refuse("go_backwards", True, "go_backwards=False (reverse the input yourself)")
    if layer.stateful:
        _refuse("stateful", True, "stateful=False (pass the initial state to forward instead)")
    # dropout / recurrent_dropout act only in training (recurrent_dropout is carried over),
    # unroll and use_cudnn only choose how Keras runs the same function: all are accepted.
    return kind


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _reorder_gru(matrix_or_vector: np.ndarray, units: int) -> np.ndarray:
    """Keras z, r, h blocks along the last axis -> torch r, z, n."""
    z = matrix_or_vector[..., :units]
    r = matrix_or_vector[..., units : 2 * units]
    h = matrix_or_vector[..., 2 * units :]
    return np.concatenate([r, z, h], axis=-1)


def from_keras(layer) -> torch.nn.Module:
    """Build an ``lstmgru.LSTM`` / ``lstmgru.GRU`` that computes what a Keras layer computes.

    Args:
        layer: a built Keras 3 ``keras.layers.LSTM`` or ``keras.layers.GRU`` from any Keras
            backend (weights are read with ``layer.get_weights()`` as numpy arrays).

    Returns:
        A float32 module with ``batch_first=True``, one layer, one direction, on the CPU.
        ``module(x)[0]`` equals the Keras layer's output with ``return_sequences=True``; for a
        layer built with ``return_sequences=False`` take ``module(x)[0][:, -1]``. Move it
        with ``.to(device)`` as usual. With a Keras ``recurrent_dropout`` call
        ``module.eval()`` first: in training mode the module drops out as Keras' training does.

    Raises:
        TypeError: ``layer`` is not a Keras LSTM or GRU layer.
        ValueError: the layer is not built, or uses something the torch recurrence cannot
            compute exactly: an activation other than tanh, a recurrent activation other
            than sigmoid, ``go_backwards=True`` or ``stateful=True``.

    ``recurrent_dropout`` becomes the module's ``recurrent_dropout`` (one mask per call, batch
    row and unit, fixed over the steps, on ``h`` in the recurrent products only; training
    only, so ``module.eval()`` computes what Keras' inference computes). Not ported, because
    they do not affect inference: ``dropout`` (set dropout on your own torch layers if you
    keep training), regularizers, constraints, initializers, ``unroll``, ``use_cudnn`` and
    ``implementation``. Also not representable per layer: masks that Keras receives from an
    ``Embedding(mask_zero=True)`` or ``Masking`` layer upstream (use
    ``torch.nn.utils.rnn.pack_padded_sequence`` on the torch side), and mixed-precision
    compute policies (the result is float32).

    Example::

        import os
        os.environ.setdefault("KERAS_BACKEND", "torch")
        import keras, numpy as np, torch
        import lstmgru

        model = keras.Sequential([keras.Input((10, 1)), keras.layers.LSTM(50),
                                  keras.layers.Dense(1)])
        lstm = lstmgru.from_keras(model.layers[0])          # lstmgru.LSTM(1, 50)
        kernel, bias = model.layers[1].get_weights()
        head = torch.nn.Linear(50, 1)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(kernel.T))
            head.bias.copy_(torch.from_numpy(bias))
        x = np.random.rand(4, 10, 1).astype("float32")
        y = head(lstm(torch.from_numpy(x))[0][:, -1])       # == model.predict(x)
    """
    import keras  # noqa: PLC0415 - optional dependency, imported only when used

    kind = _check_layer(layer, keras)
    weights = layer.get_weights()
    units = int(layer.units)
    use_bias = bool(layer.use_bias)
    kernel, recurrent_kernel = weights[0], weights[1]
    bias = weights[2] if use_bias else None
    input_size = int(kernel.shape[0])

    from . import GRU, LSTM  # noqa: PLC0415 - the package imports this module

    recurrent_dropout = float(getattr(layer, "recurrent_dropout", 0.0) or 0.0)

    if kind == "lstm":
        module = LSTM(input_size, units, bias=use_bias, batch_first=True, dtype=torch.float32,
                      recurrent_dropout=recurrent_dropout)
        w_ih, w_hh = kernel.T, recurrent_kernel.T
        b_ih = bias
        b_hh = None if bias is None else np.zeros_like(bias)
    else:
        reset_after = bool(layer.reset_after)
        module = GRU(
            input_size,
            units,
            bias=use_bias,
            batch_first=True,
            dtype=torch.float32,
            reset_after=reset_after,
            recurrent_dropout=recurrent_dropout,
        )
        w_ih = _reorder_gru(kernel, units).T
        w_hh = _reorder_gru(recurrent_kernel, units).T
        if bias is None:
            b_ih = b_hh = None
        elif reset_after:
            b_ih, b_hh = _reorder_gru(bias[0], units), _reorder_gru(bias[1], units)
        else:
            # The original GRU has no recurrent bias in Keras; torch's b_hn would sit
            # inside W_hn (r * h) + b_hn, so zero reproduces Keras exactly.
            b_ih, b_hh = _reorder_gru(bias, units), np.zeros_like(bias)

    with torch.no_grad():
        module.weight_ih_l0.copy_(_tensor(w_ih))
        module.weight_hh_l0.copy_(_tensor(w_hh))
        if use_bias:
            module.bias_ih_l0.copy_(_tensor(b_ih))
            module.bias_hh_l0.copy_(_tensor(b_hh))
    return module
