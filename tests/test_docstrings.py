"""help() on the public classes documents what a user can pass: every constructor argument
(variants included), forward's arguments, shapes and returns."""
import inspect
import re

import pytest
import torch

import lstmgru

CLASSES = [lstmgru.LSTM, lstmgru.GRU, lstmgru.LSTMCell, lstmgru.GRUCell]


def _documented(doc: str, name: str) -> bool:
    """An ``Args:`` entry for ``name`` (alone, or as in ``device, dtype:``)."""
    return re.search(rf"^\s+(\w+, )*{name}(, \w+)*: \S", doc, re.MULTILINE) is not None


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_constructor_argument_is_documented(cls):
    doc = inspect.getdoc(cls)
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    missing = [n for n in names if not _documented(doc, n)]
    assert not missing, f"{cls.__name__}'s docstring lacks {missing}"
    # what auto does, not the stale "Triton on CUDA, reference elsewhere"
    assert "cuDNN" in doc and "torch's own kernel" in doc
    assert "reference elsewhere" not in doc


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_forward_has_its_own_docstring(cls):
    doc = inspect.getdoc(cls.forward)
    assert doc != inspect.getdoc(torch.nn.Module.forward)
    names = [p for p in inspect.signature(cls.forward).parameters if p != "self"]
    # lengths= is documented for the layers before every branch has it in the signature
    if cls in (lstmgru.LSTM, lstmgru.GRU):
        names = list(dict.fromkeys(names + ["lengths"]))
    missing = [n for n in names if not _documented(doc, n)]
    assert not missing, f"{cls.__name__}.forward's docstring lacks {missing}"
    assert "Returns:" in doc
