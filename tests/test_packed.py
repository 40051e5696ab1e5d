"""PackedSequence in and out, sorted and unsorted, against torch.nn."""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence

from _parity import compare_runs, run_rnn
from test_parity import build_pair, random_hx


@pytest.mark.parametrize("op,proj", [("LSTM", 0), ("LSTM", 2), ("GRU", 0)])
@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("give_hx", [False, True])
def test_packed(op, proj, bidir, enforce_sorted, give_hx, backend):
    torch.manual_seed(11)
    kwargs = dict(num_layers=2, bidirectional=bidir)
    if proj:
        kwargs["proj_size"] = proj
    ours, ref = build_pair(op, 3, 5, torch.float64, **kwargs)
    lengths = [7, 5, 5, 2, 1] if enforce_sorted else [2, 7, 1, 5, 5]
    padded = torch.randn(7, len(lengths), 3, dtype=torch.float64)
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=enforce_sorted)
    hx = random_hx(op, 2, 2 if bidir else 1, len(lengths), 5, proj, torch.float64) \
        if give_hx else None
    a, b = run_rnn(ours, packed, hx), run_rnn(ref, packed, hx)
    compare_runs(a, b, 1e-10)
    out, _ = ours(packed, hx)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    for mine, theirs in ((out.sorted_indices, packed.sorted_indices),
                         (out.unsorted_indices, packed.unsorted_indices)):
        assert (mine is None and theirs is None) or torch.equal(mine, theirs)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_packed_batch_first_and_equal_lengths(op):
    torch.manual_seed(12)
    ours, ref = build_pair(op, 2, 4, torch.float64, batch_first=True)
    seqs = [torch.randn(4, 2, dtype=torch.float64) for _ in range(3)]
    packed = pack_sequence(seqs)
    compare_runs(run_rnn(ours, packed, None), run_rnn(ref, packed, None), 1e-10)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_packed_fp32(op, backend):
    torch.manual_seed(13)
    ours, ref = build_pair(op, 6, 9, torch.float32, num_layers=2, bidirectional=True)
    lengths = [9, 1, 4, 8, 3, 3]
    packed = pack_padded_sequence(torch.randn(9, 6, 6), lengths, enforce_sorted=False)
    compare_runs(run_rnn(ours, packed, None), run_rnn(ref, packed, None), 1e-5)
