"""``lengths=`` on LSTM and GRU: per-row lengths of a padded batch.

The call must equal ``pack_padded_sequence(x, lengths, enforce_sorted=False)`` -> module ->
``pad_packed_sequence(total_length=T)``, bit for bit where the same implementation runs:
against torch.nn on torch's kernel ("native"), and against lstmgru's own packed path on the
reference and on both Triton kernel families (in the interpreter). torch refuses rows of
length 0; here they take no step: output 0, final state hx (or 0).
"""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmgru
from _parity import assert_close, weighted_loss
from test_parity import build_pair, random_hx


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def _run(module, x, hx, lengths, packed, weights=None):
    """Forward (``lengths=``, or pack -> module -> pad) and backward of a loss that weights
    every output element differently (``weights``: one tensor per output and final state);
    every result and gradient, named."""
    x = _leaf(x)
    hx = None if hx is None else tuple(_leaf(h) for h in hx) if isinstance(hx, tuple) \
        else _leaf(hx)
    module.zero_grad(set_to_none=True)
    first = module.batch_first
    T = x.shape[1 if first else 0]
    if packed:
        out, final = module(pack_padded_sequence(x, torch.as_tensor(lengths).cpu(),
                                                 batch_first=first, enforce_sorted=False), hx)
        out = pad_packed_sequence(out, batch_first=first, total_length=T)[0]
    else:
        out, final = module(x, hx, lengths=lengths)
    finals = final if isinstance(final, tuple) else (final,)
    if weights is None:
        weighted_loss([out, *finals]).backward()
    else:
        sum((t * w).sum() for t, w in zip([out, *finals], weights)).backward()
    result = {"output": out, "x.grad": x.grad}
    result.update({f"final[{i}]": f for i, f in enumerate(finals)})
    if hx is not None:
        result.update({f"hx[{i}].grad": h.grad
                       for i, h in enumerate(hx if isinstance(hx, tuple) else (hx,))})
    result.update({f"{n}.grad": p.grad for n, p in module.named_parameters()})
    return result


def _equal(ours, theirs, what):
    assert ours.keys() == theirs.keys()
    for key, want in theirs.items():
        assert want is not None and ours[key] is not None, key
        assert torch.equal(ours[key], want), \
            f"{what}: {key} differs, max {(ours[key] - want).abs().max().item():.3g}"


def _close(ours, theirs, atol):
    assert ours.keys() == theirs.keys()
    for key, want in theirs.items():
        assert_close(ours[key], want, key, atol)


CASES = [("LSTM", {}), ("LSTM", {"proj_size": 3}), ("GRU", {})]


@pytest.mark.parametrize("op,kw", CASES)
@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("give_hx", [False, True])
def test_lengths_equal_pack_pad(op, kw, bidir, batch_first, give_hx, backend):
    """native: torch.nn's pack/pad bit for bit. reference: lstmgru's packed call bit for bit,
    and torch.nn's to fp64 rounding. Lengths as a tensor, unsorted with ties, max = T."""
    torch.manual_seed(21)
    ours, ref = build_pair(op, 3, 5, torch.float64, num_layers=2, bidirectional=bidir,
                           batch_first=batch_first, **kw)
    lengths = torch.tensor([4, 7, 1, 4, 6])
    T, B = 7, 5
    x = torch.randn((B, T, 3) if batch_first else (T, B, 3), dtype=torch.float64)
    hx = random_hx(op, 2, 2 if bidir else 1, B, 5, kw.get("proj_size", 0), torch.float64) \
        if give_hx else None
    got = _run(ours, x, hx, lengths, packed=False)
    want = _run(ref, x, hx, lengths, packed=True)
    if backend == "native":
        _equal(got, want, "torch.nn pack/pad")
    else:
        _equal(got, _run(ours, x, hx, lengths, packed=True), "lstmgru pack/pad")
        _close(got, want, 1e-10)
    first = 1 if batch_first else 0
    for row, n in enumerate(lengths.tolist()):  # zero past each length, at T = the input's
        assert got["output"].select(1 - first, row)[n:].abs().max() == 0 if n < T else True


@pytest.mark.parametrize("op,kw", CASES + [("GRU", {"reset_after": False})])
def test_zero_lengths_and_steps_past_the_longest(op, kw, backend):
    """Rows of length 0: output 0, final state hx, hx's gradient the final state's; the other
    rows equal pack/pad of those rows alone. T is longer than every length: the output is
    padded to T."""
    if backend == "native" and kw.get("reset_after") is False:
        pytest.skip("torch's kernel has no reset_after=False")
    torch.manual_seed(22)
    ours, _ = build_pair(op if kw.get("reset_after") is not False else "GRU", 3, 5,
                         torch.float64, num_layers=2, bidirectional=True)
    if kw:
        ours = getattr(lstmgru, op)(3, 5, num_layers=2, bidirectional=True,
                                    dtype=torch.float64, **kw)
    T, lengths = 8, [3, 0, 6, 0, 1]
    x = torch.randn(T, 5, 3, dtype=torch.float64)
    hx = random_hx(op, 2, 2, 5, 5, kw.get("proj_size", 0), torch.float64)
    hxs = hx if isinstance(hx, tuple) else (hx,)
    weights = [torch.randn(T, 5, 10 if not kw.get("proj_size") else 6, dtype=torch.float64)]
    weights += [torch.randn_like(h) for h in hxs]
    got = _run(ours, x, hx, torch.tensor(lengths), packed=False, weights=weights)
    kept = torch.tensor([0, 2, 4])
    sub_hx = tuple(h[:, kept] for h in hx) if isinstance(hx, tuple) else hx[:, kept]
    want = _run(ours, x[:, kept], sub_hx, [3, 6, 1], packed=True,
                weights=[w[:, kept] for w in weights])
    for key in ("output", "x.grad"):
        assert_close(got[key][:, kept], want[key], key, 1e-12)
        assert got[key][:, [1, 3]].abs().max() == 0, key
    for i, h in enumerate(hxs):
        assert_close(got[f"final[{i}]"][:, kept], want[f"final[{i}]"], f"final[{i}]", 1e-12)
        assert_close(got[f"hx[{i}].grad"][:, kept], want[f"hx[{i}].grad"], "hx grad", 1e-12)
        assert torch.equal(got[f"final[{i}]"][:, [1, 3]], h[:, [1, 3]])
        assert got[f"hx[{i}].grad"][:, [1, 3]].abs().min() > 0  # the identity's gradient
    for name, _ in ours.named_parameters():
        assert_close(got[f"{name}.grad"], want[f"{name}.grad"], name, 1e-12)
    # Without hx the zero-length rows' final state is 0.
    out, final = ours(x, lengths=lengths)
    for f in final if isinstance(final, tuple) else (final,):
        assert f[:, [1, 3]].abs().max() == 0 and f[:, kept].abs().min() > 0


@pytest.mark.parametrize("batch_first", [False, True])
def test_padded_to_the_input_steps(batch_first, backend):
    """Every row shorter than T: the output keeps the input's T, as pad_packed_sequence's
    total_length gives, and equals pack/pad on torch.nn."""
    torch.manual_seed(29)
    ours, ref = build_pair("GRU", 3, 4, torch.float64, bidirectional=True,
                           batch_first=batch_first)
    x = torch.randn((2, 7, 3) if batch_first else (7, 2, 3), dtype=torch.float64)
    got = _run(ours, x, None, [3, 5], packed=False)
    assert got["output"].shape == x.shape[:2] + (8,)
    _close(got, _run(ref, x, None, [3, 5], packed=True), 1e-10)


def test_all_rows_empty(backend):
    m = lstmgru.LSTM(3, 4, bidirectional=True, dtype=torch.float64)
    hx = random_hx("LSTM", 1, 2, 2, 4, 0, torch.float64)
    out, (h, c) = m(torch.randn(5, 2, 3, dtype=torch.float64), hx, lengths=[0, 0])
    assert out.shape == (5, 2, 8) and out.abs().max() == 0
    assert torch.equal(h, hx[0]) and torch.equal(c, hx[1])


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_variants_reset_and_dropout_equal_the_packed_call(op):
    """Variants, reset= and inter-layer dropout with lengths= draw the masks the packed call
    draws (same seed, rows in the same sorted order): the same result bit for bit."""
    kw = dict(layer_norm=True, zoneout=0.2, recurrent_dropout=0.3, weight_drop=0.1,
              dropout=0.4, num_layers=2, bidirectional=True, batch_first=True)
    torch.manual_seed(23)
    m = getattr(lstmgru, op)(3, 6, dtype=torch.float64, **kw).train()
    lengths = [5, 2, 6, 3]
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    reset = torch.rand(4, 6) < 0.3
    results = []
    for packed in (False, True):
        torch.manual_seed(5)
        module_reset = reset
        if packed:  # a packed call's reset is (T, B) in the original batch order
            module_reset = reset.t()
        x_leaf = x.clone().requires_grad_()
        if packed:
            p = pack_padded_sequence(x_leaf, torch.tensor(lengths), batch_first=True,
                                     enforce_sorted=False)
            out, final = m(p, reset=module_reset)
            out = pad_packed_sequence(out, batch_first=True, total_length=6)[0]
        else:
            out, final = m(x_leaf, lengths=lengths, reset=module_reset)
        finals = final if isinstance(final, tuple) else (final,)
        m.zero_grad(set_to_none=True)
        weighted_loss([out, *finals]).backward()
        results.append([out, *finals, x_leaf.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op,kw", [("LSTM", {}), ("GRU", {"reset_after": False})])
def test_second_order_gradients(op, kw):
    """gradgradcheck through lengths= (reverse direction, a zero-length row) on the reference."""
    torch.manual_seed(24)
    m = getattr(lstmgru, op)(2, 3, bidirectional=True, dtype=torch.float64, **kw)
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 4, 0])

    def f(x, h):
        out, final = m(x, (h, h.tanh()) if op == "LSTM" else h, lengths=lengths)
        return out, *(final if isinstance(final, tuple) else (final,))

    with lstmgru.use_backend("reference"):
        assert torch.autograd.gradcheck(f, (x, h))
        assert torch.autograd.gradgradcheck(f, (x, h))


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([3, -1, 2]), r"lengths must lie in \[0, 5\].*got -1 at row 1"),
    ([3, 6, 2], r"lengths must lie in \[0, 5\].*got 6 at row 1"),
    (torch.tensor([3, 2]), r"expected lengths of shape \(3,\).*got \(2,\)"),
    (torch.tensor([[3, 2, 1]]), r"expected lengths of shape \(3,\).*got \(1, 3\)"),
    (torch.tensor([3.0, 2.0, 1.0]), r"integer tensor or a list of ints, got a torch.float32"),
    (torch.tensor([True, True, False]), r"integer tensor .*torch.bool"),
    ([3, 2.5, 1], r"list holding 2.5 \(float\)"),
    ("3", r"integer tensor or a list of ints, got str"),
])
@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_bad_lengths_raise_naming_them(bad, message, op, backend):
    m = getattr(lstmgru, op)(2, 4)
    with pytest.raises(ValueError, match=message):
        m(torch.randn(5, 3, 2), lengths=bad)


def test_lengths_refused_where_they_mean_nothing(backend):
    m = lstmgru.GRU(2, 4)
    with pytest.raises(ValueError, match=r"lengths= needs batched 3-D input.*\(5, 2\)"):
        m(torch.randn(5, 2), lengths=[5])
    packed = pack_padded_sequence(torch.randn(5, 2, 2), [5, 3])
    with pytest.raises(ValueError, match="a PackedSequence carries its own lengths"):
        m(packed, lengths=[5, 3])
    with pytest.raises(TypeError, match="lengths"):  # cells take one step: no lengths
        lstmgru.GRUCell(2, 4)(torch.randn(3, 2), lengths=[1, 1, 1])


@pytest.mark.parametrize("make", [
    lambda: lstmgru.GRU(3, 5, num_layers=2, dropout=0.5, reset_after=False, device="meta"),
    lambda: lstmgru.GRU(3, 5, device="meta"),
    lambda: lstmgru.LSTM(3, 5, proj_size=2, bidirectional=True, device="meta"),
])
def test_meta_device(make):
    """A PackedSequence on the meta device (its batch sizes are on the host) and lengths= on
    the meta device: shapes only, no copy out of a meta tensor."""
    m = make()
    x = torch.randn(6, 3, 3, device="meta")
    packed = pack_padded_sequence(x, torch.tensor([6, 2, 4]), enforce_sorted=False)
    out, _ = m(packed)
    assert out.data.shape == (12, m.proj_size or 5) if not m.bidirectional else True
    assert out.data.device.type == "meta" and torch.equal(out.batch_sizes, packed.batch_sizes)
    with lstmgru.use_backend("reference"):
        out, _ = m(x, lengths=torch.tensor([6, 2, 4], device="meta"))
    assert out.shape[:2] == (6, 3) and out.device.type == "meta"


# ------------------------------------------------------------------ compile and export
@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_compile_fullgraph_dynamic(op):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(25)
    # input_size 6 is no batch or step count here: dynamo gives equal sizes one symbol.
    m = getattr(lstmgru, op)(6, 5, num_layers=2, bidirectional=True, batch_first=True)
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    for T, B, lengths in [(5, 3, [5, 0, 2]), (7, 4, [1, 7, 3, 7]), (4, 2, [4, 4])]:
        x = torch.randn(B, T, 6)
        got = compiled(x, lengths=torch.tensor(lengths))
        with lstmgru.use_backend("reference"):
            want = m(x, lengths=torch.tensor(lengths))
        for g, w in zip(torch.utils._pytree.tree_leaves(got),
                        torch.utils._pytree.tree_leaves(want)):
            assert torch.equal(g, w)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_export_dynamic_T_and_B(op):
    from torch.export import Dim

    torch.manual_seed(26)
    m = getattr(lstmgru, op)(3, 5, bidirectional=True)
    T, B = Dim("T", min=2), Dim("B", min=2)
    program = torch.export.export(m, (torch.randn(6, 3, 3),),
                                  {"lengths": torch.tensor([6, 1, 3])},
                                  dynamic_shapes={"input": {0: T, 1: B}, "lengths": {0: B}})
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("lstmgru.") for t in targets), targets
    for T_, lengths in [(9, [9, 0, 4, 2]), (4, [1, 4])]:
        x = torch.randn(T_, len(lengths), 3)
        got = program.module()(x, lengths=torch.tensor(lengths))
        with lstmgru.use_backend("reference"):  # what the exported program holds
            want = m(x, lengths=torch.tensor(lengths))
        for g, w in zip(torch.utils._pytree.tree_leaves(got),
                        torch.utils._pytree.tree_leaves(want)):
            assert torch.equal(g, w)


# ------------------------------------------------------------------ the Triton kernels
def _interpreter():
    triton = pytest.importorskip("triton")
    if not lstmgru._triton.interpreter_enabled():
        pytest.skip("runs the kernels in Triton's interpreter (TRITON_INTERPRET=1)")
    from _parallel_interpreter import parallel_programs
    from lstmgru._kernels import _launch

    return triton, parallel_programs, _launch


KERNEL_CASES = [("triton-tiled", "LSTM", {}), ("triton-tiled", "GRU", {}),
                ("triton-split", "LSTM", {}), ("triton-split", "GRU", {"reset_after": False})]


@pytest.mark.interpreter
@pytest.mark.parametrize("backend_name,op,kw", KERNEL_CASES)
def test_kernels_equal_their_packed_call(backend_name, op, kw):
    """On each kernel family: lengths= equals lstmgru's packed call on the same family bit for
    bit (outputs, final states, every gradient); with rows of length 0 and T past the longest
    row it equals the fp64 reference's lengths= call (checked against pack/pad above)."""
    _, parallel_programs, _launch = _interpreter()
    torch.manual_seed(27)
    m = getattr(lstmgru, op)(5, 40, bidirectional=True, batch_first=True, **kw)
    oracle = getattr(lstmgru, op)(5, 40, bidirectional=True, batch_first=True,
                                  dtype=torch.float64, **kw)
    oracle.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x = torch.randn(3, 6, 5)
    hx = random_hx(op, 1, 2, 3, 40, 0, torch.float32)
    with lstmgru.use_backend(backend_name), parallel_programs(timeout_s=300):
        before = _launch.launches
        got = _run(m, x, hx, torch.tensor([4, 6, 4]), packed=False)
        assert _launch.launches - before == 4  # (forward + backward) x 2 directions
        _equal(got, _run(m, x, hx, torch.tensor([4, 6, 4]), packed=True), "packed call")
        got = _run(m, x, hx, torch.tensor([0, 5, 2]), packed=False)
    hx64 = tuple(h.double() for h in hx) if isinstance(hx, tuple) else hx.double()
    with lstmgru.use_backend("reference"):
        want = _run(oracle, x.double(), hx64, torch.tensor([0, 5, 2]), packed=False)
    _close({k: v.double() for k, v in got.items()}, want, 2e-5)


class _HostSyncGuard:
    """Makes every Python-level way of reading a tensor's values on the host raise, except
    inside a kernel launch (there Triton's interpreter, standing in for the GPU, reads them).
    Catches what a call would do to a CUDA lengths tensor: .item(), .tolist(), .cpu(),
    .numpy(), bool()/int()/float()/index use, nonzero() and the like."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__",
               "__index__", "nonzero", "masked_select", "unique")

    def __init__(self, monkeypatch, launch_module):
        self.inside_launch = 0
        # The lengths are a CPU tensor here: have the module treat them as a device's (whose
        # values it must not read), which is all that differs for a CUDA tensor.
        read = lstmgru.modules.lengths_argument
        monkeypatch.setattr(lstmgru.modules, "lengths_argument",
                            lambda *args: (read(*args)[0], False))
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._refuse(getattr(torch.Tensor, name), name))
        launch = launch_module.launch

        def guarded_launch(*args, **kwargs):
            self.inside_launch += 1
            try:
                return launch(*args, **kwargs)
            finally:
                self.inside_launch -= 1
        monkeypatch.setattr(launch_module, "launch", guarded_launch)

    def _refuse(self, method, name):
        def refuse(tensor, *args, **kwargs):
            if not self.inside_launch:
                raise AssertionError(f"host sync: Tensor.{name} outside a kernel launch")
            return method(tensor, *args, **kwargs)
        return refuse


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_no_host_sync_on_the_kernel_path(op, monkeypatch):
    """lengths= on the tiled kernels reads no lengths on the host, forward and backward,
    through two bidirectional layers, batch_first, hx and reset= (the lengths tensor stands
    for a CUDA one). The reference (which slices active rows by host counts) does read them:
    the guard catches it, so the guard works."""
    _, parallel_programs, _launch = _interpreter()
    torch.manual_seed(28)
    m = getattr(lstmgru, op)(5, 20, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 6, 5, requires_grad=True)
    hx = random_hx(op, 2, 2, 3, 20, 0, torch.float32)
    lengths, reset = torch.tensor([4, 0, 6]), torch.rand(3, 6) < 0.3
    guard = _HostSyncGuard(monkeypatch, _launch)
    with lstmgru.use_backend("triton-tiled"), parallel_programs(timeout_s=300):
        for kwargs in ({}, {"reset": reset}):
            out, final = m(x, hx, lengths=lengths, **kwargs)
            finals = final if isinstance(final, tuple) else (final,)
            sum(f.sum() for f in finals).add(out.sum()).backward()
    assert guard.inside_launch == 0
    with lstmgru.use_backend("reference"), pytest.raises(AssertionError, match="host sync"):
        m(x, hx, lengths=lengths)


@pytest.mark.interpreter
def test_no_host_sync_on_the_split_kernels(monkeypatch):
    _, parallel_programs, _launch = _interpreter()
    m = lstmgru.LSTM(5, 40)
    guard = _HostSyncGuard(monkeypatch, _launch)  # raises at any host read outside launches
    # The split launches' error words are read back by split.check_errors from host memory
    # (pinned, behind a CUDA event, on a GPU): no sync, so the guard lets it read them.
    from lstmgru._kernels import split
    check_errors = split.check_errors

    def check_errors_unguarded(*args, **kwargs):
        guard.inside_launch += 1
        try:
            return check_errors(*args, **kwargs)
        finally:
            guard.inside_launch -= 1
    monkeypatch.setattr(split, "check_errors", check_errors_unguarded)
    with lstmgru.use_backend("triton-split"), parallel_programs(timeout_s=300):
        m(torch.randn(6, 3, 5), lengths=torch.tensor([4, 0, 6]))


# ------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_cuda_lengths_without_sync(op):
    """CUDA lengths on the tiled kernels: forward and backward under
    ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises), and the rows equal
    torch.nn's fp64 pack/pad of the non-empty rows (fp32 rounding)."""
    torch.manual_seed(30)
    ours, exact = build_pair(op, 8, 64, torch.float32, num_layers=2, bidirectional=True,
                             batch_first=True)
    exact = exact.double()
    ours, exact = ours.cuda(), exact.cuda()
    lengths = torch.tensor([5, 17, 0, 17, 9, 1], device="cuda")
    x = torch.randn(6, 17, 8, device="cuda")
    with lstmgru.use_backend("triton-tiled"):
        ours(x, lengths=lengths)[0].sum().backward()  # compiles the kernels first
        torch.cuda.synchronize()
        xi = x.clone().requires_grad_()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, final = ours(xi, lengths=lengths)
            finals = final if isinstance(final, tuple) else (final,)
            (out.sum() + sum(f.sum() for f in finals)).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    kept = torch.tensor([0, 1, 3, 4, 5], device="cuda")
    packed = pack_padded_sequence(x[kept].double(), lengths[kept].cpu(), batch_first=True,
                                  enforce_sorted=False)
    want, want_final = exact(packed)
    want = pad_packed_sequence(want, batch_first=True, total_length=17)[0]
    assert (out[kept].double() - want).abs().max() < 1e-4
    assert out[2].abs().max() == 0
    want_finals = want_final if isinstance(want_final, tuple) else (want_final,)
    for f, w in zip(finals, want_finals):
        assert (f[:, kept].double() - w).abs().max() < 1e-4
        assert f[:, 2].abs().max() == 0
