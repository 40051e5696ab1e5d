"""Bad input: the same exception type as torch.nn, and a message that names what was
expected and what was given. No low-level error (``mat1 and mat2 shapes ...``) leaks.

These run on the reference backend, whose checks are ours. On "native" (what auto picks on
the CPU wherever torch computes the same function) the call IS torch.nn's forward, so its
errors are torch's own: ``test_native_errors_are_torchs`` holds that.
"""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstmgru


@pytest.fixture(autouse=True)
def _our_checks():
    with lstmgru.use_backend("reference"):
        yield


@pytest.mark.parametrize("op,hx", [("LSTM", (torch.randn(1, 2, 6), torch.randn(2, 2, 6))),
                                   ("GRU", torch.randn(1, 3, 6))])
def test_native_errors_are_torchs(op, hx):
    ours, theirs = getattr(lstmgru, op)(3, 6, num_layers=2), getattr(torch.nn, op)(3, 6, num_layers=2)
    with pytest.raises(RuntimeError) as expected:
        theirs(torch.randn(4, 2, 3), hx)
    with lstmgru.use_backend("native"), pytest.raises(RuntimeError) as got:
        ours(torch.randn(4, 2, 3), hx)
    assert str(got.value) == str(expected.value)

LOW_LEVEL = ("mat1", "mat2", "size of tensor", "mkldnn", "must match the size")


def _both(op, *args, **kwargs):
    return getattr(lstmgru, op)(*args, **kwargs), getattr(torch.nn, op)(*args, **kwargs)


def _raise_like_torch(ours_call, torch_call, *needles):
    with pytest.raises(Exception) as theirs:
        torch_call()
    with pytest.raises(type(theirs.value)) as mine:
        ours_call()
    assert type(mine.value) is type(theirs.value)
    message = str(mine.value)
    assert not any(s in message for s in LOW_LEVEL), message
    if not any(s in str(theirs.value) for s in LOW_LEVEL):
        # User suites match on torch.nn's wording: ours contains it, then explains.
        assert str(theirs.value) in message, f"{str(theirs.value)!r} not in {message!r}"
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


x3 = torch.randn(4, 2, 3)

RNN_CASES = {
    # name: (op, ctor kwargs, input, hx, words the message must contain)
    "input rank 4": ("LSTM", {}, torch.randn(4, 2, 3, 1), None, ["2D or 3D", "4D"]),
    "input rank 1": ("GRU", {}, torch.randn(3), None, ["2D or 3D", "1D"]),
    "input_size": ("LSTM", {}, torch.randn(4, 2, 5), None, ["Expected 3", "got 5"]),
    "input_size gru": ("GRU", {}, torch.randn(4, 2, 5), None, ["Expected 3", "got 5"]),
    "hx layers": ("LSTM", {"num_layers": 2}, x3,
                  (torch.randn(1, 2, 6), torch.randn(2, 2, 6)), ["(2, 2, 6)", "[1, 2, 6]"]),
    "hx batch": ("GRU", {}, x3, torch.randn(1, 3, 6), ["(1, 2, 6)", "[1, 3, 6]"]),
    "hx hidden": ("GRU", {}, x3, torch.randn(1, 2, 5), ["(1, 2, 6)", "[1, 2, 5]"]),
    "cx hidden": ("LSTM", {}, x3, (torch.randn(1, 2, 6), torch.randn(1, 2, 7)),
                  ["c_0", "(1, 2, 6)", "[1, 2, 7]"]),
    "hx proj": ("LSTM", {"proj_size": 2}, x3, (torch.randn(1, 2, 6), torch.randn(1, 2, 6)),
                ["(1, 2, 2)", "[1, 2, 6]"]),
    "hx bidirectional": ("GRU", {"bidirectional": True}, x3, torch.randn(1, 2, 6),
                         ["(2, 2, 6)", "[1, 2, 6]"]),
    "hx rank batched": ("LSTM", {}, x3, (torch.randn(2, 6), torch.randn(1, 2, 6)), ["3-D", "2-D"]),
    "hx rank unbatched": ("LSTM", {}, torch.randn(4, 3),
                          (torch.randn(1, 1, 6), torch.randn(1, 1, 6)), ["2-D", "3-D"]),
    "input dtype": ("LSTM", {}, x3.double(), None, ["torch.float64", "torch.float32"]),
    "input int": ("GRU", {}, x3.long(), None, ["torch.int64", "torch.float32"]),
    "empty sequence": ("LSTM", {}, torch.randn(0, 2, 3), None, ["larger than 0"]),
    "empty sequence gru batch_first": ("GRU", {"batch_first": True}, torch.randn(2, 0, 3), None,
                                       ["larger than 0"]),
}


@pytest.mark.parametrize("case", list(RNN_CASES))
def test_rnn_bad_input(case):
    op, kwargs, x, hx, needles = RNN_CASES[case]
    ours, ref = _both(op, 3, 6, **kwargs)
    _raise_like_torch(lambda: ours(x, hx), lambda: ref(x, hx), *needles)


def test_hx_dtype_mismatch():
    """torch.nn raises a RuntimeError from deep inside (oneDNN); ours names both dtypes."""
    ours, ref = _both("LSTM", 3, 6)
    hx = (torch.randn(1, 2, 6, dtype=torch.float64), torch.randn(1, 2, 6))
    _raise_like_torch(lambda: ours(x3, hx), lambda: ref(x3, hx), "h_0", "torch.float64",
                      "torch.float32")


def test_lstm_hx_not_a_tuple():
    """torch.nn's error here depends on the tensor's shape (IndexError or RuntimeError from
    unpacking it); ours always says what it wants."""
    with pytest.raises(RuntimeError, match=r"tuple \(h_0, c_0\)"):
        lstmgru.LSTM(3, 6)(x3, torch.randn(1, 2, 6))


def test_packed_input_size():
    ours, ref = _both("LSTM", 3, 6)
    packed = pack_padded_sequence(torch.randn(4, 2, 5), [4, 2])
    _raise_like_torch(lambda: ours(packed), lambda: ref(packed), "Expected 3", "got 5")


CELL_CASES = {
    "input rank 3": ("LSTMCell", torch.randn(2, 2, 3), None, ["1D or 2D", "3D"]),
    "input_size": ("GRUCell", torch.randn(2, 4), None, ["got 4", "expected 3"]),
    "hx batch": ("LSTMCell", torch.randn(2, 3), (torch.randn(3, 6), torch.randn(2, 6)),
                 ["batch size 2", "batch size 3"]),
    "hx hidden": ("GRUCell", torch.randn(2, 3), torch.randn(2, 5), ["got 5", "expected 6"]),
    "cx hidden": ("LSTMCell", torch.randn(2, 3), (torch.randn(2, 6), torch.randn(2, 7)),
                  ["cx", "got 7", "expected 6"]),
    "hx rank 3": ("GRUCell", torch.randn(2, 3), torch.randn(1, 2, 6), ["1D or 2D", "3D"]),
    "cx rank 3": ("LSTMCell", torch.randn(2, 3), (torch.randn(2, 6), torch.randn(1, 2, 6)),
                  ["1D or 2D", "3D"]),
    "input dtype": ("GRUCell", torch.randn(2, 3).double(), None, ["torch.float64", "torch.float32"]),
    "hx dtype": ("LSTMCell", torch.randn(2, 3), (torch.randn(2, 6).double(), torch.randn(2, 6)),
                 ["torch.float64", "torch.float32"]),
}


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_cell_bad_input(case):
    op, x, hx, needles = CELL_CASES[case]
    ours, ref = _both(op, 3, 6)
    _raise_like_torch(lambda: ours(x, hx), lambda: ref(x, hx), *needles)


CTOR_CASES = {
    "hidden_size 0": ("LSTM", (3, 0), {}),
    "input_size 0": ("GRU", (0, 5), {}),
    "bias not bool": ("LSTM", (3, 5), {"bias": 1}),
    "batch_first not bool": ("GRU", (3, 5), {"batch_first": 1}),
    "hidden_size float": ("GRU", (3, 5.0), {}),
    "num_layers 0": ("LSTM", (3, 5), {"num_layers": 0}),
    "dropout > 1": ("GRU", (3, 5), {"dropout": 1.5}),
    "proj_size >= hidden": ("LSTM", (3, 5), {"proj_size": 5}),
    "proj_size negative": ("LSTM", (3, 5), {"proj_size": -1}),
    "gru proj_size": ("GRU", (3, 5), {"proj_size": 2}),
}


@pytest.mark.parametrize("case", list(CTOR_CASES))
def test_constructor_errors(case):
    op, args, kwargs = CTOR_CASES[case]
    _raise_like_torch(lambda: getattr(lstmgru, op)(*args, **kwargs),
                      lambda: getattr(torch.nn, op)(*args, **kwargs))


def test_dropout_single_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        lstmgru.GRU(3, 5, dropout=0.3)


def test_constructor_signature_matches_torch():
    import inspect

    for op in ("LSTMCell", "GRUCell"):
        theirs = list(inspect.signature(getattr(torch.nn, op)).parameters)
        ours = list(inspect.signature(getattr(lstmgru, op)).parameters)
        assert ours[:len(theirs)] == theirs
    expected = ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                "bidirectional", "proj_size", "device", "dtype"]
    positional = [name for name, p in inspect.signature(lstmgru.LSTM).parameters.items()
                  if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert positional == expected  # the cell variants are keyword-only
    gru = list(inspect.signature(lstmgru.GRU).parameters)
    assert gru[:9] == [p for p in expected if p != "proj_size"]
    # positional use exactly as with torch.nn
    m = lstmgru.LSTM(3, 5, 2, False, True, 0.0, True, 2)
    assert (m.num_layers, m.bias, m.batch_first, m.bidirectional, m.proj_size) == (2, False, True, True, 2)
