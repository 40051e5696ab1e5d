"""lstmgru.from_keras against real Keras 3 layers (torch backend) on random weights and inputs."""
from __future__ import annotations

import os

# Keras reads its backend once, at import; the torch backend needs no extra framework.
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch

keras = pytest.importorskip("keras")

# Keras's own variables trip numpy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

import lstmgru  # noqa: E402
from lstmgru.keras import from_keras  # noqa: E402

# float32 on both sides, a handful of steps: differences are a few ulps of O(1) values.
TOL = dict(rtol=1e-5, atol=1e-5)
BATCH, STEPS, FEATURES, UNITS = 4, 9, 5, 6


def _randomize(layer, seed, scale=0.5):
    # Keras initializes biases to zero (and the LSTM forget bias to one); random normal
    # weights AND biases make every bias conversion (and the GRU z/r swap) visible.
    rng = np.random.default_rng(seed)
    layer.set_weights([
        (rng.standard_normal(w.shape) * scale).astype(w.dtype) for w in layer.get_weights()
    ])


def _inputs(seed, shape=(BATCH, STEPS, FEATURES)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _keras_out(layer, x):
    return keras.ops.convert_to_numpy(layer(x))


def _torch_out(module, x):
    with torch.no_grad():
        y, state = module(torch.from_numpy(x))
    return y.numpy(), state


def _built(layer, seed):
    layer.build((None, STEPS, FEATURES))
    _randomize(layer, seed)
    return layer


@pytest.mark.parametrize("use_bias", [True, False])
def test_lstm(use_bias):
    layer = _built(keras.layers.LSTM(UNITS, return_sequences=True, use_bias=use_bias), 1)
    module = from_keras(layer)
    assert isinstance(module, lstmgru.LSTM)
    assert module.batch_first and module.hidden_size == UNITS and module.input_size == FEATURES
    assert module.bias is use_bias
    assert all(p.dtype == torch.float32 for p in module.parameters())
    x = _inputs(2)
    y, (h, c) = _torch_out(module, x)
    want = _keras_out(layer, x)
    np.testing.assert_allclose(y, want, **TOL)
    np.testing.assert_allclose(h[0].numpy(), want[:, -1], **TOL)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
def test_gru(reset_after, use_bias):
    layer = _built(
        keras.layers.GRU(UNITS, return_sequences=True, reset_after=reset_after,
                         use_bias=use_bias),
        3 + reset_after + 2 * use_bias,
    )
    module = from_keras(layer)
    assert isinstance(module, lstmgru.GRU)
    assert module.reset_after is reset_after
    assert module.bias is use_bias
    x = _inputs(4)
    y, h = _torch_out(module, x)
    want = _keras_out(layer, x)
    np.testing.assert_allclose(y, want, **TOL)
    np.testing.assert_allclose(h[0].numpy(), want[:, -1], **TOL)


def test_gru_reset_after_false_is_not_reset_after_true():
    # The converted original GRU must not silently be run as the cuDNN form.
    layer = _built(keras.layers.GRU(UNITS, return_sequences=True, reset_after=False), 5)
    module = from_keras(layer)
    twin = lstmgru.GRU(FEATURES, UNITS, batch_first=True, reset_after=True)
    twin.load_state_dict(module.state_dict())
    x = _inputs(6)
    assert np.abs(_torch_out(twin, x)[0] - _keras_out(layer, x)).max() > 1e-3


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_return_sequences_false_is_last_step(cls):
    layer = _built(getattr(keras.layers, cls)(UNITS), 7)
    x = _inputs(8)
    y, _ = _torch_out(from_keras(layer), x)
    np.testing.assert_allclose(y[:, -1], _keras_out(layer, x), **TOL)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_training_only_options_are_accepted(cls):
    # dropout / recurrent_dropout act in training only; unroll only changes how Keras runs.
    layer = _built(
        getattr(keras.layers, cls)(UNITS, return_sequences=True, dropout=0.3,
                                   recurrent_dropout=0.2, unroll=True),
        9,
    )
    x = _inputs(10)
    module = from_keras(layer)
    assert module.recurrent_dropout == pytest.approx(0.2)
    np.testing.assert_allclose(_torch_out(module.eval(), x)[0], _keras_out(layer, x), **TOL)


def test_converted_module_trains_and_state_dict_moves_to_torch_nn():
    # The result is an ordinary lstmgru module: its state_dict loads into torch.nn.LSTM.
    layer = _built(keras.layers.LSTM(UNITS, return_sequences=True), 11)
    module = from_keras(layer)
    ref = torch.nn.LSTM(FEATURES, UNITS, batch_first=True)
    ref.load_state_dict(module.state_dict())
    x = _inputs(12)
    with torch.no_grad():
        np.testing.assert_allclose(ref(torch.from_numpy(x))[0].numpy(), _keras_out(layer, x),
                                   **TOL)
    y, _ = module(torch.from_numpy(x))
    y.square().sum().backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize(
    "kwargs,attribute,value",
    [
        (dict(activation="relu"), "activation", "relu"),
        (dict(recurrent_activation="hard_sigmoid"), "recurrent_activation", "hard_sigmoid"),
        (dict(go_backwards=True), "go_backwards", "True"),
        (dict(stateful=True), "stateful", "True"),
    ],
)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_refuses_what_cannot_be_represented(cls, kwargs, attribute, value):
    layer = getattr(keras.layers, cls)(UNITS, **kwargs)
    # stateful layers need a fixed batch size to build
    layer.build((BATCH, STEPS, FEATURES))
    with pytest.raises(ValueError) as info:
        from_keras(layer)
    message = str(info.value)
    assert attribute in message and value in message and "supported" in message


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_refuses_unbuilt_layer(cls):
    with pytest.raises(ValueError, match="not built"):
        from_keras(getattr(keras.layers, cls)(UNITS))


@pytest.mark.parametrize(
    "layer",
    [
        lambda: keras.layers.Dense(3),
        lambda: keras.layers.SimpleRNN(3),
        lambda: keras.layers.Bidirectional(keras.layers.LSTM(3)),
        lambda: keras.layers.LSTMCell(3),
        lambda: torch.nn.LSTM(3, 3),
    ],
    ids=["Dense", "SimpleRNN", "Bidirectional", "LSTMCell", "torch.nn.LSTM"],
)
def test_refuses_other_layers(layer):
    with pytest.raises(TypeError, match="keras.layers.LSTM or keras.layers.GRU"):
        from_keras(layer())


def test_exported_from_package():
    assert lstmgru.from_keras is from_keras


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_article_sequential_model(cls):
    """The article's model, Sequential([Input((10, 1)), LSTM(50), Dense(1)]), moved to torch."""
    model = keras.Sequential(
        [keras.Input((10, 1)), getattr(keras.layers, cls)(50), keras.layers.Dense(1)]
    )
    _randomize(model.layers[0], 13, scale=0.3)
    _randomize(model.layers[1], 14, scale=0.3)
    x = np.random.default_rng(15).random((64, 10, 1)).astype(np.float32)  # U(0,1) as in §5
    want = model.predict(x, verbose=0)

    rnn = from_keras(model.layers[0])
    kernel, bias = model.layers[1].get_weights()
    head = torch.nn.Linear(50, 1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(kernel.T))
        head.bias.copy_(torch.from_numpy(bias))
        got = head(rnn(torch.from_numpy(x))[0][:, -1]).numpy()
    np.testing.assert_allclose(got, want, **TOL)
