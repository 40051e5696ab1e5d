"""Cell variants in the batch-tiled LSTM kernels (resets, recurrent dropout, zoneout; weight drop
reaches them as ``weight_hh * mask``) against a naive fp64 step loop with autograd.

The oracle below is written here, independently of ``lstmgru.cells.variants.lstm_steps`` (which
is checked against it too, as the kernels' spec for create_graph). The kernels run through
``triton_glue.lstm_recurrence``, i.e. the custom ops and their autograd Function: forward
results and the gradients of all four differentiable inputs are compared. Without CUDA they run
in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU tensors.
"""
import copy
import math

import pytest
import torch

pytest.importorskip("triton")

import lstmgru  # noqa: E402  (after the skip: needs triton)
from lstmgru._kernels import _launch  # noqa: E402
from lstmgru._kernels import lstm as K  # noqa: E402
from lstmgru._sequence import Lengths  # noqa: E402
from lstmgru.cells.lstm import triton_glue  # noqa: E402
from lstmgru.cells.variants import StepVariants, lstm_steps  # noqa: E402

pytestmark = pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def naive_layer_norm(v, gain, bias=None):
    """(v - mean) / sqrt(biased var + 1e-5) * gain (+ bias) over the last axis."""
    centred = v - v.mean(-1, keepdim=True)
    out = centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + 1e-5) * gain
    return out if bias is None else out + bias


def naive_lstm(gx, h0, c0, w, per_row, reverse, cuts=None, mask=None, zoneout=0.0, keep=None,
               ln=None):
    """One LSTM layer-direction with the variants, step by step (fp64 in the tests).

    cuts (T, B) bool: the state entering step t is zero (h and c); mask (B, H): the gates read
    (h * mask) W^T; zoneout p with keep (T, B, H) bool (training) or None (eval: p-weighted);
    ln = (gain_hh, gain_c, bias_c): the gates use LN(h W^T) and h~ = o tanh(LN_c(c)).
    Inactive rows (t >= per_row[b]) keep their state and output 0."""
    T, B, G = gx.shape
    H = G // 4
    h, c = h0, c0
    ys = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        if cuts is not None:
            h = torch.where(cuts[t][:, None], 0.0, h)
            c = torch.where(cuts[t][:, None], 0.0, c)
        seen = h if mask is None else h * mask
        product = seen @ w.T
        a = gx[t] + (product if ln is None else naive_layer_norm(product, ln[0]))
        i, f, g, o = torch.sigmoid(a[:, :H]), torch.sigmoid(a[:, H:2 * H]), \
            torch.tanh(a[:, 2 * H:3 * H]), torch.sigmoid(a[:, 3 * H:])
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new if ln is None else naive_layer_norm(c_new, ln[1], ln[2]))
        if zoneout > 0:
            h_new = torch.where(keep[t], h, h_new) if keep is not None else \
                zoneout * h + (1 - zoneout) * h_new
        active = torch.ones(B, 1, dtype=torch.bool) if per_row is None else \
            (t < per_row)[:, None]
        h = torch.where(active, h_new, h)
        c = torch.where(active, c_new, c)
        ys[t] = torch.where(active, h_new, 0.0)
    return torch.stack(ys), h, c


class Case:
    """Random inputs and variant masks of one test case, in the run dtype."""

    def __init__(self, T=5, B=4, H=20, dtype=torch.float32, cuts=False, mask=False, zoneout=0.0,
                 train_zoneout=True, lengths=None, reverse=False, state=True, layer_norm=False,
                 seed=0):
        gen = torch.Generator().manual_seed(seed)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

        self.T, self.B, self.H, self.dtype, self.reverse = T, B, H, dtype, reverse
        self.gx = rnd(T, B, 4 * H)
        self.w = rnd(4 * H, H, scale=1 / math.sqrt(H))
        self.h0 = rnd(B, H) if state else torch.zeros(B, H, dtype=dtype, device=DEVICE)
        self.c0 = rnd(B, H) if state else torch.zeros(B, H, dtype=dtype, device=DEVICE)
        self.per_row = None if lengths is None else torch.tensor(lengths, device=DEVICE)
        active = torch.ones(T, B, dtype=torch.bool) if lengths is None else \
            torch.arange(T)[:, None] < torch.tensor(lengths)[None, :]
        # As the caller hands them over: never set where a row is inactive.
        self.cuts = ((torch.rand(T, B, generator=gen) < 0.35) & active).to(DEVICE) \
            if cuts else None
        # Recurrent dropout with p = 0.25: entries 0 or 4/3.
        self.mask = ((torch.rand(B, H, generator=gen) > 0.25).to(torch.float32) / 0.75) \
            .to(dtype).to(DEVICE) if mask else None
        self.zoneout = zoneout
        self.keep = (torch.rand(T, B, H, generator=gen) < zoneout).to(DEVICE) \
            if zoneout > 0 and train_zoneout else None
        # Gains around 1 and a bias around 0, different per unit: a transposed index shows.
        self.ln = [1 + rnd(4 * H, scale=0.3), 1 + rnd(H, scale=0.3), rnd(H, scale=0.1)] \
            if layer_norm else []
        self.grad_weights = [torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)
                             for shape in ((T, B, H), (B, H), (B, H))]

    def variants(self, ln=None):
        ln = ln if ln is not None else self.ln
        return StepVariants(*(ln or (None, None, None)), recurrent_mask=self.mask,
                            zoneout=self.zoneout, zoneout_keep=self.keep, cuts=self.cuts)

    def inputs(self):
        return [t.clone().requires_grad_() for t in (self.gx, self.h0, self.c0, self.w,
                                                     *self.ln)]

    def loss(self, outputs):
        # Every output element weighted differently, the weights in the outputs' dtype.
        return sum((o * g.to(o.dtype)).sum() for o, g in zip(outputs, self.grad_weights))

    def kernel(self):
        inputs = self.inputs()
        gx, h0, c0, w = inputs[:4]
        lengths = None if self.per_row is None else Lengths.from_per_row(self.per_row, self.T)
        outputs = triton_glue.lstm_recurrence(gx, h0, c0, w, None, lengths, self.reverse,
                                              "tiled", self.variants(inputs[4:]))
        grads = torch.autograd.grad(self.loss(outputs), inputs)
        return outputs, grads

    def oracle(self, fn=None):
        inputs = [t.detach().cpu().double().requires_grad_() for t in self.inputs()]
        gx, h0, c0, w = inputs[:4]
        cpu = [None if t is None else t.cpu() for t in (self.per_row, self.cuts, self.keep)]
        per_row, cuts, keep = cpu
        mask = None if self.mask is None else self.mask.cpu().double()
        if fn is None:
            outputs = naive_lstm(gx, h0, c0, w, per_row, self.reverse, cuts, mask, self.zoneout,
                                 keep, inputs[4:] or None)
        else:
            outputs = fn(gx, h0, c0, w, per_row, cuts, mask, keep)
        grads = torch.autograd.grad(self.loss(outputs), inputs)
        return outputs, grads


NAMES = ("y", "h_n", "c_n", "grad gates_x", "grad h0", "grad c0", "grad weight_hh",
         "grad ln_hh_weight", "grad ln_c_weight", "grad ln_c_bias")


def assert_matches(case, tol):
    got_out, got_grads = case.kernel()
    want_out, want_grads = case.oracle()
    for name, got, want in zip(NAMES, (*got_out, *got_grads), (*want_out, *want_grads)):
        assert got.dtype == case.dtype, name
        torch.testing.assert_close(got.detach().cpu().double(), want, atol=tol, rtol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if case.per_row is not None:
        inactive = torch.arange(case.T)[:, None] >= case.per_row.cpu()[None, :]
        assert (got_out[0].detach().cpu()[inactive] == 0).all()
        assert (got_grads[0].cpu()[inactive] == 0).all()


ALL = dict(cuts=True, mask=True, zoneout=0.3)
LENGTHS = [5, 4, 4, 2, 1]  # sorted, as packed batches are
CASES = [
    pytest.param(dict(cuts=True), id="reset"),
    pytest.param(dict(mask=True), id="recurrent_dropout"),
    pytest.param(dict(zoneout=0.4), id="zoneout"),
    pytest.param(dict(zoneout=0.4, train_zoneout=False), id="zoneout-eval"),
    pytest.param(ALL, id="all"),
    pytest.param(dict(ALL, reverse=True), id="all-reverse"),
    pytest.param(dict(ALL, B=5, lengths=LENGTHS), id="all-lengths"),
    pytest.param(dict(ALL, B=5, lengths=LENGTHS, reverse=True), id="all-lengths-reverse"),
    pytest.param(dict(ALL, B=5, lengths=LENGTHS, reverse=True, train_zoneout=False),
                 id="all-eval-lengths-reverse"),
    pytest.param(dict(ALL, state=False), id="all-zero-state"),
    pytest.param(dict(ALL, T=3, B=2, H=40), id="all-two-column-chunks"),
    pytest.param(dict(layer_norm=True), id="layer_norm"),
    pytest.param(dict(ALL, layer_norm=True), id="layer_norm-all"),
    pytest.param(dict(ALL, B=5, lengths=LENGTHS, reverse=True, layer_norm=True),
                 id="layer_norm-all-lengths-reverse"),
    pytest.param(dict(ALL, train_zoneout=False, state=False, layer_norm=True),
                 id="layer_norm-all-eval-zero-state"),
    pytest.param(dict(ALL, T=3, B=2, H=40, layer_norm=True), id="layer_norm-two-column-chunks"),
]

# fp32: the kernels compute in fp32 with IEEE products in the interpreter, so only fp32 rounding
# separates them from the fp64 oracle.
FP32 = 1e-5


# LN_hh of a zero state (a zero initial state, or a reset) has zero variance: it divides by
# sqrt(1e-5), so its backward scales fp32 rounding by up to 1/sqrt(1e-5) ~ 316 (seen: 4e-5).
FP32_LAYER_NORM = 1e-4


@pytest.mark.parametrize("kw", CASES)
def test_fp32_matches_naive_fp64(kw):
    assert_matches(Case(**kw), FP32_LAYER_NORM if kw.get("layer_norm") else FP32)


# fp16: the kernels round h (times the mask) to fp16 before each recurrent product and the gate
# gradients before the backward one (tensor-core inputs), and return fp16 results (relative step
# 2^-11 ~ 5e-4); the roundings compound over the steps: test_kernel_lstm.py's tolerance (the
# variants add only exact operations or one rounding of the mask, 4/3, to fp16).
FP16 = 2e-3


@pytest.mark.parametrize("kw", [
    pytest.param(dict(ALL, B=5, lengths=LENGTHS), id="all-lengths"),
    pytest.param(dict(ALL, reverse=True, train_zoneout=False), id="all-eval-reverse"),
])
def test_fp16_matches_naive_fp64(kw):
    assert_matches(Case(dtype=torch.float16, **kw), FP16)


@pytest.mark.skipif(DEVICE != "cuda", reason="triton 3.9's interpreter gets bf16 tl.dot wrong")
def test_bf16_matches_naive_fp64():
    # bf16 has 3 fewer mantissa bits than fp16 (relative step 2^-8 ~ 4e-3): 8x the fp16 tolerance.
    assert_matches(Case(dtype=torch.bfloat16, B=5, lengths=LENGTHS, **ALL), 8 * FP16)


@pytest.mark.parametrize("kw", [
    pytest.param(dict(ALL, B=5, lengths=LENGTHS, reverse=True), id="train"),
    pytest.param(dict(ALL, B=5, lengths=LENGTHS, train_zoneout=False), id="eval"),
])
def test_spec_agrees_with_the_naive_loop(kw):
    """lstm_steps is what the kernels' backward recomputes under create_graph: it must be the
    same function as the oracle here."""
    case = Case(**kw)

    def spec(gx, h0, c0, w, per_row, cuts, mask, keep):
        variants = StepVariants(recurrent_mask=mask, zoneout=case.zoneout, zoneout_keep=keep,
                                cuts=cuts)
        return lstm_steps(gx, h0, c0, w, None, per_row, case.reverse, variants)

    got_out, got_grads = case.oracle(spec)
    want_out, want_grads = case.oracle()
    for name, got, want in zip(NAMES, (*got_out, *got_grads), (*want_out, *want_grads)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_double_backward_matches_the_oracle():
    """create_graph recomputes through the spec with the call's masks."""
    case = Case(B=5, lengths=LENGTHS, reverse=True, **ALL)
    lengths = Lengths.from_per_row(case.per_row, case.T)

    def penalty(run, inputs):
        (g_gx,) = torch.autograd.grad(case.loss(run(*inputs)), inputs[0], create_graph=True)
        return torch.autograd.grad((g_gx * g_gx).sum(), inputs[3])[0]

    got = penalty(lambda gx, h0, c0, w: triton_glue.lstm_recurrence(
        gx, h0, c0, w, None, lengths, True, "tiled", case.variants()), case.inputs())
    mask = case.mask.double()
    want = penalty(lambda gx, h0, c0, w: naive_lstm(
        gx, h0, c0, w, case.per_row, True, case.cuts, mask, case.zoneout, case.keep),
        [t.detach().double().requires_grad_() for t in case.inputs()])
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_zoneout_one_in_training_keeps_h0():
    case = Case(zoneout=1.0)
    assert case.keep.all()
    (y, h_n, c_n), _ = case.kernel()
    assert torch.equal(h_n, case.h0)
    assert torch.equal(y, case.h0.expand_as(y))
    assert not torch.equal(c_n, case.c0)  # c is not zoned out
    assert_matches(case, FP32)


def test_zero_recurrent_mask_removes_the_recurrent_term():
    case = Case(mask=True)
    case.mask = torch.zeros_like(case.mask)
    (y, h_n, c_n), (_, g_h0, _, g_w) = case.kernel()
    plain = Case()
    plain.w = torch.zeros_like(plain.w)  # same inputs (same seed), no recurrent product
    (y0, h0_n, c0_n), _ = plain.kernel()
    assert torch.equal(y, y0) and torch.equal(h_n, h0_n) and torch.equal(c_n, c0_n)
    # Nothing of h_{t-1} reaches the gates: no gradient for weight_hh, none for h0.
    assert (g_w == 0).all() and (g_h0 == 0).all()
    assert_matches(case, FP32)


@pytest.mark.parametrize("reverse", [False, True])
def test_cuts_everywhere_are_independent_steps(reverse):
    case = Case(T=4, cuts=True, reverse=reverse)
    case.cuts = torch.ones_like(case.cuts)
    (y, h_n, c_n), (g_gx, g_h0, g_c0, g_w) = case.kernel()
    assert (g_h0 == 0).all() and (g_c0 == 0).all()
    zeros = torch.zeros_like(case.h0)
    last = 0 if reverse else case.T - 1
    gy, ghn, gcn = case.grad_weights
    for t in range(case.T):
        gx = case.gx[t:t + 1].clone().requires_grad_()
        y_t, h_t, c_t = triton_glue.lstm_recurrence(gx, zeros, zeros, case.w)
        loss = (y_t[0] * gy[t]).sum()
        if t == last:  # the step that leaves the final state
            loss = loss + (h_t * ghn).sum() + (c_t * gcn).sum()
            torch.testing.assert_close(h_n, h_t, atol=FP32, rtol=FP32)
            torch.testing.assert_close(c_n, c_t, atol=FP32, rtol=FP32)
        (g,) = torch.autograd.grad(loss, gx)
        torch.testing.assert_close(y[t], y_t[0], atol=FP32, rtol=FP32)
        torch.testing.assert_close(g_gx[t], g[0], atol=FP32, rtol=FP32)
    assert_matches(case, FP32)


def test_one_launch_per_forward_and_per_backward():
    case = Case(B=5, lengths=LENGTHS, **ALL)
    gx, h0, c0, w = case.inputs()
    before = _launch.launches
    lengths = Lengths.from_per_row(case.per_row, case.T)
    outputs = triton_glue.lstm_recurrence(gx, h0, c0, w, None, lengths, False, "tiled",
                                          case.variants())
    assert _launch.launches - before == 1
    case.loss(outputs).backward()
    assert _launch.launches - before == 2


def test_launchers_without_states_take_the_variants():
    """h0 / c0 absent (zeros, HAS_H0/HAS_C0 off) with every variant, straight on the launchers."""
    case = Case(state=False, B=5, lengths=LENGTHS, reverse=True, **ALL)
    args = dict(cuts=case.cuts, recurrent_mask=case.mask, zoneout=case.zoneout,
                zoneout_keep=case.keep)
    y, h_n, c_n, saved = K.lstm_forward(case.gx, None, None, case.w, case.per_row, True, True,
                                        **args)
    (want_y, want_h, want_c), (want_gx, want_h0, want_c0, _) = case.oracle()
    gy, ghn, gcn = case.grad_weights
    g_gx, g_h0, g_c0 = K.lstm_backward(gy, ghn, gcn, saved, y, None, None, case.w, case.per_row,
                                       True, **args)
    for got, want in ((y, want_y), (h_n, want_h), (c_n, want_c), (g_gx, want_gx),
                      (g_h0, want_h0), (g_c0, want_c0)):
        torch.testing.assert_close(got.cpu().double(), want, atol=FP32, rtol=FP32)


def test_launchers_check_the_variants():
    case = Case(**ALL)
    base = (case.gx, case.h0, case.c0, case.w, None, False, True)
    with pytest.raises(ValueError, match="cuts: expected"):
        K.lstm_forward(*base, cuts=case.cuts.t())
    with pytest.raises(ValueError, match="cuts: expected"):
        K.lstm_forward(*base, cuts=case.cuts.to(torch.uint8))
    with pytest.raises(ValueError, match="recurrent_mask: expected"):
        K.lstm_forward(*base, recurrent_mask=case.mask.double())
    with pytest.raises(ValueError, match="zoneout_keep: expected"):
        K.lstm_forward(*base, zoneout=0.3, zoneout_keep=case.keep[:, :, :3])
    with pytest.raises(ValueError, match="zoneout_keep is given but zoneout is 0"):
        K.lstm_forward(*base, zoneout_keep=case.keep)
    with pytest.raises(ValueError, match="zoneout must be"):
        K.lstm_forward(*base, zoneout=1.5)
    saved = K.lstm_forward(*base)[3]
    with pytest.raises(ValueError, match="recurrent_mask: expected"):
        K.lstm_backward(None, None, None, saved, None, None, case.c0, case.w, None, False,
                        recurrent_mask=case.mask[:2])


def test_recurrence_refuses_variants_on_the_split_family():
    case = Case(**ALL, layer_norm=True)
    gx, h0, c0, w = case.inputs()[:4]
    with pytest.raises(ValueError, match="'split'.*layer_norm"):
        triton_glue.lstm_recurrence(gx, h0, c0, w, None, None, False, "split", case.variants())


def test_opcheck_with_variants():
    """torch.library's checks of the forward op's schema, fake impl and autograd, variants on."""
    for layer_norm in (False, True):
        case = Case(T=3, B=2, H=16, **ALL, layer_norm=layer_norm)
        gx, h0, c0, w, *ln = case.inputs()
        torch.library.opcheck(torch.ops.lstmgru.lstm_forward.default,
                              (gx, h0, c0, w, *(ln or (None, None, None)), case.cuts, case.mask,
                               case.keep, torch.tensor([3, 2], device=DEVICE), True, "tiled",
                               0.3, True))


@pytest.mark.parametrize("kw", [pytest.param(dict(mask=True), id="float-mask"),
                                pytest.param(ALL, id="bool-masks-too")])
def test_vmap_matches_separate_calls(kw):
    """vmap over the inputs: the slices join the batch rows, masks included (each has a row
    dimension), so the vmapped call is one launch."""
    case = Case(T=3, B=2, H=16, **kw)
    gxs = torch.stack([case.gx, case.gx.flip(0)])

    def run(gx):
        return triton_glue.lstm_recurrence(gx, case.h0, case.c0, case.w, None, None, False,
                                           "tiled", case.variants())

    before = _launch.launches
    got = torch.func.vmap(run)(gxs)
    assert _launch.launches - before == 1
    for n in range(2):
        for a, b in zip(got, run(gxs[n])):
            torch.testing.assert_close(a[n], b, atol=FP32, rtol=FP32)


# --------------------------------------------------------------------------------------------
# Through the modules: "triton-tiled" against "reference", the same masks from the same seed.
# --------------------------------------------------------------------------------------------
def _module_run(module, backend, x, reset, seed):
    module.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_() if not isinstance(x, torch.nn.utils.rnn.PackedSequence) \
        else x
    torch.manual_seed(seed)
    with lstmgru.use_backend(backend):
        before = _launch.launches
        out, (h_n, c_n) = module(xi, reset=reset)
        data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
        gen = torch.Generator().manual_seed(seed + 1)
        loss = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in (data, h_n, c_n))
        loss.backward()
        launches = _launch.launches - before
    grads = [p.grad for p in module.parameters()]
    if not isinstance(x, torch.nn.utils.rnn.PackedSequence):
        grads.append(xi.grad)
    return [data.detach(), h_n.detach(), c_n.detach(), *grads], launches


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_module_triton_tiled_matches_reference(training, packed, layer_norm):
    torch.manual_seed(5)
    m = lstmgru.LSTM(3, 12, num_layers=2, bidirectional=True, zoneout=0.3,
                     recurrent_dropout=0.25, weight_drop=0.2, layer_norm=layer_norm)
    if layer_norm:  # gains and biases away from their initial 1 and 0
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.startswith("ln_"):
                    p.add_(0.2 * torch.randn_like(p))
    m.train(training)
    T, B = 5, 4
    x = torch.randn(T, B, 3)
    reset = torch.rand(T, B) < 0.3
    if packed:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([3, 5, 2, 4]),
                                                    enforce_sorted=False)
    got, launches = _module_run(m, "triton-tiled", x, reset, seed=7)
    assert launches == 8  # (forward + backward) x 2 directions x 2 layers: all on the kernels
    want, ref_launches = _module_run(m, "reference", x, reset, seed=7)
    assert ref_launches == 0
    for a, b in zip(got, want):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # The masks really were in force: another seed gives other results in training.
    if training:
        other, _ = _module_run(m, "triton-tiled", x, reset, seed=8)
        assert not torch.allclose(other[0], got[0])


def test_layer_norm_statistics_stay_accurate_far_from_zero():
    """A large common offset in h W_hh^T (mean far from 0 relative to the spread): the row
    variance must not come from sum(x^2)/n - mean^2, which cancels in fp32 (that formula was
    off by 3.4e-1 here; fp32 torch ops are off by 1.7e-4)."""
    torch.manual_seed(0)
    m = lstmgru.LSTM(4, 16, layer_norm=True).eval()
    with torch.no_grad():
        m.weight_hh_l0.add_(30.0)
    x, h0, c0 = torch.randn(8, 2, 4), torch.full((1, 2, 16), 0.9), torch.zeros(1, 2, 16)
    with torch.no_grad(), lstmgru.use_backend("triton-tiled"):
        got = m(x, (h0, c0))[0]
    exact = copy.deepcopy(m).double()
    with torch.no_grad(), lstmgru.use_backend("reference"):
        want = exact(x.double(), (h0.double(), c0.double()))[0]
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=0)
