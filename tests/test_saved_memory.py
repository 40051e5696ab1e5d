"""What the reference recurrences keep for the backward, counted with autograd's own
saved-tensor hooks (benchmarks/memory_bench.py counts the same way), against the formulas:

* LSTM: gates_x (4H), the cell states (H) and the output y (P), per step and row: cuDNN's
  reserve space (5H: the gates and c) plus y, which cuDNN's caller keeps too;
* GRU: gates_x (3H) and y (H): less than cuDNN's reserve alone (6H).

and the reference ops under torch.library.opcheck (their signatures changed with that).
"""
import pytest
import torch

import lstmgru
from lstmgru._sequence import Lengths

T, B, H = 32, 4, 16


def _saved_storages(fn):
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return storages, out


@pytest.mark.parametrize("proj", [0, 8])
def test_lstm_reference_keeps_gates_x_cells_and_y(proj):
    from lstmgru.cells.lstm.reference import lstm_recurrence

    P = proj or H
    gates_x = torch.randn(T, B, 4 * H, requires_grad=True)
    h0, c0 = torch.randn(B, P, requires_grad=True), torch.randn(B, H, requires_grad=True)
    w_hh = torch.randn(4 * H, P, requires_grad=True)
    w_hr = torch.randn(P, H, requires_grad=True) if proj else None
    storages, (y, h_n, c_n) = _saved_storages(
        lambda: lstm_recurrence(gates_x, h0, c0, w_hh, w_hr))
    per_step = (4 * H + H + P) * T * B * 4
    small = (B * P + B * H + w_hh.numel() + (w_hr.numel() if proj else 0)) * 4
    assert sum(storages.values()) <= per_step + small, storages
    ((y * torch.randn_like(y)).sum() + c_n.sum()).backward()  # what was kept suffices


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_reference_keeps_gates_x_and_y(reset_after):
    from lstmgru.cells.gru.reference import gru_recurrence

    gates_x = torch.randn(T, B, 3 * H, requires_grad=True)
    h0 = torch.randn(B, H, requires_grad=True)
    w_hh = torch.randn(3 * H, H, requires_grad=True)
    b_hn = torch.randn(H, requires_grad=True) if reset_after else None
    storages, (y, h_n) = _saved_storages(
        lambda: gru_recurrence(gates_x, h0, w_hh, b_hn, reset_after=reset_after))
    per_step = (3 * H + H) * T * B * 4
    small = (B * H + w_hh.numel() + H) * 4
    assert sum(storages.values()) <= per_step + small, storages
    (y * torch.randn_like(y)).sum().backward()


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_module_total_is_at_most_cudnns(op):
    """The whole module (input projection included) at the issue's shape, scaled down: the
    reference keeps no more than cuDNN's reserve plus what torch's cuDNN path saves besides
    it (input, output, weights)."""
    Tm, Bm, I, Hm = 64, 8, 16, 32
    m = getattr(lstmgru, op)(I, Hm)
    x = torch.randn(Tm, Bm, I, requires_grad=True)
    with lstmgru.use_backend("reference"):
        storages, out = _saved_storages(lambda: m(x))
    weights = sum(p.numel() for p in m.parameters())
    reserve = (5 if op == "LSTM" else 6) * Hm
    states = (2 if op == "LSTM" else 1) * Bm * Hm  # hx (and cx), which torch's cuDNN path saves
    cudnn_total = (reserve + Hm + I) * Tm * Bm * 4 + (weights + states) * 4
    assert sum(storages.values()) <= cudnn_total


def test_reference_ops_opcheck():
    torch.manual_seed(3)
    lengths = Lengths.from_batch_sizes([3, 3, 2, 1], 3, "cpu")
    for per_row in (None, lengths.per_row):
        args = (torch.randn(4, 3, 16), torch.randn(3, 4), torch.randn(3, 4),
                torch.randn(16, 4), None, per_row, False, True)
        torch.library.opcheck(torch.ops.lstmgru.lstm_reference.default, args)
        for reset_after in (True, False):
            args = (torch.randn(4, 3, 12), torch.randn(3, 4), torch.randn(12, 4),
                    torch.randn(4) if reset_after else None, per_row, True, reset_after, True)
            torch.library.opcheck(torch.ops.lstmgru.gru_reference.default, args)
