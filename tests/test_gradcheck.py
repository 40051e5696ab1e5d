"""gradcheck of the explicit backward on tiny fp64 shapes, through the modules and directly
on the recurrences (packed prefixes and reverse included)."""
import pytest
import torch

import lstmgru
from lstmgru._sequence import Lengths
from lstmgru.cells.gru import reference as gru_reference
from lstmgru.cells.lstm import reference as lstm_reference

F64 = torch.float64


@pytest.mark.parametrize("batch_sizes", [None, [3, 3, 2, 1]])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj", [0, 2])
def test_lstm_recurrence(batch_sizes, reverse, proj):
    torch.manual_seed(31)
    T, B, H = 4, 3, 4
    P = proj or H
    args = [torch.randn(T, B, 4 * H, dtype=F64), torch.randn(B, P, dtype=F64),
            torch.randn(B, H, dtype=F64), torch.randn(4 * H, P, dtype=F64),
            torch.randn(P, H, dtype=F64) if proj else None]
    args = [a.requires_grad_() if a is not None else None for a in args]
    lengths = None if batch_sizes is None else Lengths.from_batch_sizes(batch_sizes, B, "cpu")
    fn = lambda *a: lstm_reference.lstm_recurrence(*a, lengths=lengths, reverse=reverse)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("batch_sizes", [None, [3, 2, 2, 1]])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_recurrence(batch_sizes, reverse, reset_after):
    torch.manual_seed(32)
    T, B, H = 4, 3, 4
    args = [torch.randn(T, B, 3 * H, dtype=F64), torch.randn(B, H, dtype=F64),
            torch.randn(3 * H, H, dtype=F64), torch.randn(H, dtype=F64) if reset_after else None]
    args = [a.requires_grad_() if a is not None else None for a in args]
    lengths = None if batch_sizes is None else Lengths.from_batch_sizes(batch_sizes, B, "cpu")
    fn = lambda *a: gru_reference.gru_recurrence(*a, lengths=lengths, reverse=reverse,  # noqa: E731
                                                 reset_after=reset_after)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_module_gradcheck(op):
    torch.manual_seed(33)
    m = getattr(lstmgru, op)(2, 3, num_layers=2, bidirectional=True).double()
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x)[0], (x,))


@pytest.mark.parametrize("op", ["LSTMCell", "GRUCell"])
def test_cell_gradcheck(op):
    torch.manual_seed(34)
    m = getattr(lstmgru, op)(2, 3).double()
    x = torch.randn(2, 2, dtype=F64, requires_grad=True)
    out = lambda x: m(x)[0] if op == "LSTMCell" else m(x)  # noqa: E731
    assert torch.autograd.gradcheck(out, (x,))
