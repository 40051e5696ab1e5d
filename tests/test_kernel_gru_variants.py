"""Cell variants in the batch-tiled GRU kernels (kernels/gru.py): per-step resets (cuts),
recurrent dropout, zoneout (training and eval forms), layer_norm's LN_hh (reset_after=True),
and weight drop through the modules.

The oracle is a float64 step loop written here from the equations in
``lstmgru/cells/variants.py``'s docstring (independently of ``gru_steps``, which is checked
against it too). The kernels run through ``triton_glue.gru_recurrence``, so the gradients are
the custom ops' fast backward, including the weight gradient the glue forms. Without CUDA this
runs in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1).
"""
import os

import pytest
import torch

pytest.importorskip("triton")

import lstmgru  # noqa: E402
from lstmgru._kernels import _launch as kernel_launch  # noqa: E402
from lstmgru._kernels import gru as kgru  # noqa: E402
from lstmgru._sequence import Lengths  # noqa: E402
from lstmgru.cells import variants as cell_variants  # noqa: E402
from lstmgru.cells.gru import triton_glue  # noqa: E402
from test_kernel_gru import assert_close  # noqa: E402

pytestmark = pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)


def layer_norm(v, gain):
    """LN over the last axis without bias: biased variance, eps 1e-5 (F.layer_norm's form)."""
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + 1e-5) * gain


def naive_gru(gx, h0, w, b_hn, lengths, reverse, reset_after, cuts=None, rmask=None,
              zone_p=0.0, keep=None, ln=None):
    """The GRU with variants, step by step in plain torch (differentiable).

    ln (3H,): LN_hh's gain over each row's whole recurrent product (reset_after only), before
    b_hn joins the n block.
    cuts[t, b]: the state entering step t (processing order) is zero. rmask (B, H): every
    recurrent product reads h * rmask. Zoneout: keep (T, B, H) bool picks h_{t-1} over the
    new state (training); without keep, h_t = p h_{t-1} + (1 - p) h_new (eval)."""
    T, B, G = gx.shape
    H = G // 3
    w_r, w_z, w_n = w[:H], w[H:2 * H], w[2 * H:]
    h = h0
    ys = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        if cuts is not None:
            h = torch.where(cuts[t][:, None], torch.zeros_like(h), h)
        hm = h if rmask is None else h * rmask
        x_r, x_z, x_n = gx[t, :, :H], gx[t, :, H:2 * H], gx[t, :, 2 * H:]
        r = torch.sigmoid(x_r + hm @ w_r.T)
        z = torch.sigmoid(x_z + hm @ w_z.T)
        if ln is not None:
            rec = layer_norm(hm @ w.T, ln)
            r = torch.sigmoid(x_r + rec[:, :H])
            z = torch.sigmoid(x_z + rec[:, H:2 * H])
            hn = rec[:, 2 * H:] if b_hn is None else rec[:, 2 * H:] + b_hn
            n = torch.tanh(x_n + r * hn)
        elif reset_after:
            hn = hm @ w_n.T
            if b_hn is not None:
                hn = hn + b_hn
            n = torch.tanh(x_n + r * hn)
        else:
            n = torch.tanh(x_n + (r * hm) @ w_n.T)
        h_new = (1 - z) * n + z * h
        if keep is not None:
            h_new = torch.where(keep[t], h, h_new)
        elif zone_p > 0:
            h_new = zone_p * h + (1 - zone_p) * h_new
        if lengths is None:
            ys[t] = h_new
        else:
            active = (t < lengths)[:, None]
            h_new = torch.where(active, h_new, h)
            ys[t] = torch.where(active, h_new, torch.zeros_like(h_new))
        h = h_new
    return torch.stack(ys), h


def make_case(T, B, H, reset_after, dtype=torch.float32, lengths=None, has_h0=True,
              has_bias=True, cut_p=0.0, rdrop=0.0, zone_p=0.0, zone_train=True, ln=False,
              seed=0):
    """Inputs, masks and loss weights of one case (masks drawn like the modules draw them:
    cuts cleared where a row is inactive, mask entries 0 or 1/(1-p))."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)

    def bern(p, *shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64).to(DEVICE) < p

    case = dict(
        gx=randn(T, B, 3 * H),
        h0=randn(B, H) if has_h0 else torch.zeros(B, H, device=DEVICE, dtype=dtype),
        # torch.nn's init scale keeps the recurrence in the sensitive range of the activations.
        w=randn(3 * H, H, scale=H ** -0.5),
        b_hn=randn(H, scale=0.5) if has_bias and reset_after else None,
        ln=(1 + randn(3 * H, scale=0.3)) if ln else None,
        lengths=None if lengths is None else torch.tensor(lengths, device=DEVICE),
        cuts=None, rmask=None, zone_p=zone_p, keep=None,
        w_y=randn(T, B, H), w_hn=randn(B, H))
    if cut_p:
        cuts = bern(cut_p, T, B)
        if lengths is not None:
            cuts &= torch.arange(T, device=DEVICE)[:, None] < case["lengths"][None, :]
        case["cuts"] = cuts
    if rdrop:
        case["rmask"] = (~bern(rdrop, B, H)).to(dtype) / (1 - rdrop)
    if zone_p and zone_train:
        case["keep"] = bern(zone_p, T, B, H)
    return case


LEAVES = ("gx", "h0", "w", "b_hn", "ln")  # the differentiated inputs


def step_variants(case):
    return cell_variants.StepVariants(ln_hh_weight=case["ln"], recurrent_mask=case["rmask"],
                                      zoneout=case["zone_p"], zoneout_keep=case["keep"],
                                      cuts=case["cuts"])


def kernel_run(case, reverse, reset_after):
    """Forward and fast backward through the glue; returns y, h_n and the input gradients."""
    leaves = [None if case[k] is None else case[k].clone().requires_grad_()
              for k in LEAVES]
    lengths = case["lengths"]
    if lengths is not None:
        lengths = Lengths.from_per_row(lengths, case["gx"].shape[0])
    variants = step_variants(case)._replace(ln_hh_weight=leaves[4])
    y, h_n = triton_glue.gru_recurrence(*leaves[:4], lengths, reverse, reset_after, "tiled",
                                        variants)
    ((y * case["w_y"]).sum() + (h_n * case["w_hn"]).sum()).backward()
    return y.detach(), h_n.detach(), [None if v is None else v.grad for v in leaves]


def naive_run(case, reverse, reset_after, steps=naive_gru):
    """The same in float64 from the same (possibly low-precision) values."""
    leaves = [None if case[k] is None else case[k].double().requires_grad_()
              for k in LEAVES]
    rmask = None if case["rmask"] is None else case["rmask"].double()
    if steps is naive_gru:
        y, h_n = naive_gru(*leaves[:4], case["lengths"], reverse, reset_after, case["cuts"],
                           rmask, case["zone_p"], case["keep"], leaves[4])
    else:
        variants = step_variants(case)._replace(recurrent_mask=rmask, ln_hh_weight=leaves[4])
        y, h_n = steps(*leaves[:4], case["lengths"], reverse, reset_after, variants)
    loss = (y * case["w_y"].double()).sum() + (h_n * case["w_hn"].double()).sum()
    loss.backward()
    return y.detach(), h_n.detach(), [None if v is None else v.grad for v in leaves]


def check(case, reverse, reset_after, tol):
    got = kernel_run(case, reverse, reset_after)
    want = naive_run(case, reverse, reset_after)
    for name, a, b in [("y", got[0], want[0]), ("h_n", got[1], want[1])] + [
            ("grad " + k, ga, gb) for k, ga, gb in zip(LEAVES, got[2], want[2])
            if gb is not None]:
        assert_close(name, a, b, tol)
    assert got[0].dtype == case["gx"].dtype
    if case["lengths"] is not None:
        inactive = torch.arange(case["gx"].shape[0], device=DEVICE)[:, None] >= \
            case["lengths"][None, :]
        assert (got[0][inactive] == 0).all()
    return got, want


VARIANTS = {
    "reset": dict(cut_p=0.35),
    "rdrop": dict(rdrop=0.3),
    "zoneout": dict(zone_p=0.4),
    "zoneout-eval": dict(zone_p=0.3, zone_train=False),
    "all": dict(cut_p=0.3, rdrop=0.25, zone_p=0.35),
    "all-eval-zoneout": dict(cut_p=0.3, rdrop=0.25, zone_p=0.2, zone_train=False),
}
# layer_norm exists for reset_after=True only.
LN_VARIANTS = {
    "ln": dict(ln=True),
    "ln-all": dict(ln=True, cut_p=0.3, rdrop=0.25, zone_p=0.35),
    "ln-all-eval-zoneout": dict(ln=True, cut_p=0.3, rdrop=0.25, zone_p=0.2, zone_train=False),
}
VARIANTS.update(LN_VARIANTS)


@pytest.mark.parametrize("reset_after", [True, False], ids=["ra", "rb"])
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in LN_VARIANTS])
def test_each_variant_fp32(variant, reset_after):
    check(make_case(5, 4, 20, reset_after, **VARIANTS[variant]), False, reset_after, 1e-5)


# H=80 runs the column-chunk loop of LN's passes (block_h < H), B=18 two batch tiles.
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("variant", list(LN_VARIANTS))
def test_layer_norm_fp32(variant, reverse):
    check(make_case(5, 4, 20, True, **VARIANTS[variant]), reverse, True, 1e-5)
    lengths = [3, 1, 2, 3, 1, 2, 2, 3, 1, 3, 2, 1, 3, 3, 2, 1, 2, 3]
    check(make_case(3, 18, 80, True, lengths=lengths, seed=16, **VARIANTS[variant]), reverse,
          True, 1e-5)


def test_layer_norm_no_bias_no_h0():
    case = make_case(4, 3, 16, True, has_h0=False, has_bias=False, seed=17,
                     **VARIANTS["ln-all"])
    check(case, True, True, 1e-5)


# B=5 with unsorted-looking lengths exercises inactive rows mid-tile; H=33 pads the column tile.
@pytest.mark.parametrize("reset_after", [True, False], ids=["ra", "rb"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("variant", ["reset", "zoneout", "all", "all-eval-zoneout"])
def test_lengths_reverse_fp32(variant, reverse, reset_after):
    case = make_case(6, 5, 33, reset_after, lengths=[6, 5, 3, 2, 1], seed=3,
                     **VARIANTS[variant])
    check(case, reverse, reset_after, 1e-5)


@pytest.mark.parametrize("reset_after", [True, False], ids=["ra", "rb"])
def test_no_h0_no_bias_reverse(reset_after):
    case = make_case(4, 3, 16, reset_after, has_h0=False, has_bias=False, seed=4,
                     **VARIANTS["all"])
    check(case, True, reset_after, 1e-5)


@pytest.mark.parametrize("reset_after", [True, False], ids=["ra", "rb"])
def test_fp16(reset_after):
    # As in test_kernel_gru.py's fp16 test: fp16 storage of y and fp16 operands of every
    # per-step product (h_{t-1} * m, the gate gradients, ~5e-4 relative per rounding) bound
    # the accuracy; the masks 1/(1-p) = 4/3 are themselves rounded to fp16 (~2e-4); the state
    # and the accumulation stay fp32.
    for variant in ("all", "ln-all") if reset_after else ("all",):
        case = make_case(5, 5, 20, reset_after, dtype=torch.float16, lengths=[5, 4, 4, 2, 1],
                         seed=5, **VARIANTS[variant])
        check(case, False, reset_after, 3e-3)


@pytest.mark.skipif(DEVICE == "cpu", reason="tl.dot on bf16 returns garbage in triton 3.9's "
                    "interpreter; bf16 is checked on the GPU only")
@pytest.mark.parametrize("reset_after", [True, False], ids=["ra", "rb"])
def test_bf16_gpu(reset_after):
    # bf16 keeps 8 mantissa bits (~4e-3 relative per rounding): the fp16 reasons, looser; the
    # bound is test_kernel_gru.py's bf16 one.
    case = make_case(5, 5, 20, reset_after, dtype=torch.bfloat16, lengths=[5, 4, 4, 2, 1],
                     seed=6, **VARIANTS["ln-all" if reset_after else "all"])
    check(case, True, reset_after, 5e-2)


@pytest.mark.parametrize("reset_after", [True, False], ids=["ra", "rb"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gru_steps_agrees_with_the_naive_loop(reverse, reset_after):
    case = make_case(5, 5, 12, reset_after, dtype=torch.float64, lengths=[5, 5, 3, 2, 1],
                     seed=7, **VARIANTS["ln-all" if reset_after else "all"])
    for zone_train in (True, False):
        if not zone_train:
            case["keep"] = None
        want = naive_run(case, reverse, reset_after)
        got = naive_run(case, reverse, reset_after, steps=cell_variants.gru_steps)
        for a, b in zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
            if b is not None:
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("reset_after", [True, False], ids=["ra", "rb"])
def test_zoneout_one_keeps_h0(reset_after):
    case = make_case(4, 3, 16, reset_after, zone_p=1.0, seed=8)
    case["keep"] = torch.ones_like(case["keep"])
    (y, h_n, grads), _ = check(case, False, reset_after, 1e-5)
    assert torch.equal(h_n, case["h0"]) and torch.equal(y, case["h0"].expand_as(y))
    assert (grads[0] == 0).all() and (grads[2] == 0).all()


@pytest.mark.parametrize("reset_after", [True, False], ids=["ra", "rb"])
def test_zero_recurrent_mask_removes_the_recurrent_term(reset_after):
    case = make_case(4, 3, 16, reset_after, rdrop=0.5, seed=9)
    case["rmask"] = torch.zeros_like(case["rmask"])
    (y, h_n, grads), _ = check(case, False, reset_after, 1e-5)
    # No product reads h: the weight gradient vanishes, while h still flows through z * h.
    assert (grads[2] == 0).all() and (grads[1] != 0).any()


@pytest.mark.parametrize("reset_after", [True, False], ids=["ra", "rb"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_cuts_everywhere_equal_independent_steps(reverse, reset_after):
    T, B, H = 4, 3, 16
    case = make_case(T, B, H, reset_after, cut_p=1.0, seed=10)
    assert case["cuts"].all()
    y, h_n, _ = kernel_run(case, reverse, reset_after)
    zero = torch.zeros(B, H, device=DEVICE)
    for t in range(T):
        one = dict(case, gx=case["gx"][t:t + 1], h0=zero, cuts=None, w_y=case["w_y"][t:t + 1])
        y_t, _, _ = kernel_run(one, reverse, reset_after)
        torch.testing.assert_close(y[t], y_t[0], atol=1e-6, rtol=0)
    assert torch.equal(h_n, y[0] if reverse else y[-1])


@pytest.mark.parametrize("reset_after,variant", [(True, "all"), (False, "all"),
                                                 (True, "ln-all")], ids=["ra", "rb", "ra-ln"])
def test_double_backward_through_the_variants(reset_after, variant):
    """A gradient penalty: under create_graph the backward recomputes through the spec with
    the same variants, so second-order gradients match the naive loop's."""
    case = make_case(4, 3, 12, reset_after, lengths=[4, 3, 2], seed=15, **VARIANTS[variant])
    lengths = Lengths.from_per_row(case["lengths"], 4)
    results = []
    for dtype in (torch.float32, torch.float64):
        leaves = [None if case[k] is None else
                  case[k].detach().to(dtype).clone().requires_grad_()
                  for k in LEAVES]
        variants = step_variants(case)._replace(recurrent_mask=case["rmask"].to(dtype),
                                                ln_hh_weight=leaves[4])
        if dtype == torch.float32:
            y, _ = triton_glue.gru_recurrence(*leaves[:4], lengths, False, reset_after,
                                              "tiled", variants)
        else:
            y, _ = naive_gru(*leaves[:4], case["lengths"], False, reset_after, case["cuts"],
                             variants.recurrent_mask, case["zone_p"], case["keep"], leaves[4])
        (g,) = torch.autograd.grad((y * case["w_y"].to(dtype)).sum(), leaves[0],
                                   create_graph=True)
        (g * g).sum().backward()
        results.append([v.grad for v in leaves if v is not None])
    for a, b in zip(*results):
        assert b.abs().max() > 0
        assert_close("second-order grad", a, b, 1e-5)


@pytest.fixture
def launches():
    start = kernel_launch.launches
    return lambda: kernel_launch.launches - start


@pytest.mark.parametrize("reset_after,variant", [(True, "all"), (False, "all"),
                                                 (True, "ln-all")], ids=["ra", "rb", "ra-ln"])
def test_one_launch_each_way(launches, reset_after, variant):
    case = make_case(5, 4, 20, reset_after, **VARIANTS[variant])
    kernel_run(case, False, reset_after)
    assert launches() == 2  # one forward, one backward


def test_bad_variant_arguments_are_refused():
    T, B, H = 3, 2, 16
    gx, w = torch.randn(T, B, 3 * H, device=DEVICE), torch.randn(3 * H, H, device=DEVICE)
    bad = [
        (dict(cuts=torch.zeros(T, B, dtype=torch.uint8)), "cuts should be a bool"),
        (dict(cuts=torch.zeros(B, T, dtype=torch.bool)), r"cuts should be .*shape \(3, 2\)"),
        (dict(recurrent_mask=torch.ones(B, H, dtype=torch.float64, device=DEVICE)),
         "recurrent_mask should be a torch.float32"),
        (dict(recurrent_mask=torch.ones(H, device=DEVICE)), "recurrent_mask should be"),
        (dict(zoneout=1.5), "zoneout should be a probability"),
        (dict(zoneout=0.5, zoneout_keep=torch.ones(T, B, H, device=DEVICE)),
         "zoneout_keep should be a bool"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            kgru.gru_forward(gx, None, w, None, None, False, True, True, **kwargs)


def test_layer_norm_without_reset_after_and_the_split_family_are_refused():
    T, B, H = 3, 2, 16
    gx, h0 = torch.randn(T, B, 3 * H, device=DEVICE), torch.zeros(B, H, device=DEVICE)
    w = torch.randn(3 * H, H, device=DEVICE)
    ln = cell_variants.StepVariants(ln_hh_weight=torch.ones(3 * H, device=DEVICE))
    with pytest.raises(ValueError, match="layer_norm"):
        triton_glue.gru_recurrence(gx, h0, w, None, None, False, False, "tiled", ln)
    with pytest.raises(ValueError, match="ln_hh_weight should have shape"):
        kgru.gru_forward(gx, None, w, None, None, False, True, True,
                         ln_hh_weight=torch.ones(H, device=DEVICE))
    zoned = cell_variants.StepVariants(zoneout=0.5)
    with pytest.raises(ValueError, match="split"):
        triton_glue.gru_recurrence(gx, h0, w, None, None, False, True, "split", zoned)


def test_opcheck_with_variants():
    """torch.library's checks of the forward op's schema, fake implementation and autograd
    with every variant input given (and layer_norm's gain)."""
    T, B, H = 3, 2, 16
    case = make_case(T, B, H, True, lengths=[3, 2], seed=18, **VARIANTS["ln-all"])
    args = [None if case[k] is None else case[k].clone().requires_grad_() for k in LEAVES]
    gx, h0, w, b_hn, ln = args
    op = torch.ops.lstmgru.gru_forward.default
    torch.library.opcheck(op, (gx, h0, w, b_hn, case["cuts"], case["rmask"], case["keep"], ln,
                               case["lengths"], False, True, "tiled", 0.35, True))
    torch.library.opcheck(op, (gx, h0, w, None, case["cuts"], case["rmask"], None, None,
                               case["lengths"], True, False, "tiled", 0.35, True))


@pytest.mark.parametrize("variant", ["rdrop", "ln", "all", "ln-all"])
def test_vmap_matches_separate_calls(variant):
    """vmap over gates_x: the slices join the batch rows, the masks (recurrent_mask, cuts,
    zoneout_keep) with them; the LN gain is shared."""
    case = make_case(3, 2, 16, True, seed=19, **VARIANTS[variant])
    gxs = torch.stack([case["gx"], case["gx"].flip(0)])

    def run(gx):
        return triton_glue.gru_recurrence(gx, case["h0"], case["w"], case["b_hn"], None, False,
                                          True, "tiled", step_variants(case))

    got = torch.func.vmap(run)(gxs)
    for n in range(2):
        for a, b in zip(got, run(gxs[n])):
            torch.testing.assert_close(a[n], b, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ through the module
MODULE_RESULTS = ["y", "h_n", "grad x"]


def module_run(m, x, reset, backend, seed):
    m.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the module draws its masks from torch's RNG, alike per backend
    with lstmgru.use_backend(backend):
        y, h_n = m(xi, reset=reset)
        weights = torch.arange(h_n.numel(), device=h_n.device).view_as(h_n)
        ((y * y).sum() + (h_n * weights).sum()).backward()
    return [y, h_n, xi.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("reset_after,layer_norm", [(True, False), (False, False),
                                                    (True, True)], ids=["ra", "rb", "ra-ln"])
@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
def test_module_training_matches_the_reference(launches, reset_after, layer_norm, with_reset):
    T, B, I, H = 5, 3, 4, 12
    torch.manual_seed(11)
    m = lstmgru.GRU(I, H, num_layers=2, bidirectional=True, reset_after=reset_after,
                    layer_norm=layer_norm, zoneout=0.3, recurrent_dropout=0.25,
                    weight_drop=0.2).to(DEVICE)
    x = torch.randn(T, B, I, device=DEVICE)
    reset = (torch.rand(T, B, device=DEVICE) < 0.3) if with_reset else None
    start = launches()
    got = module_run(m, x, reset, "triton-tiled", seed=12)
    assert launches() - start == 8  # (forward + backward) x 2 layers x 2 directions
    want = module_run(m, x, reset, "reference", seed=12)
    # Both runs are fp32: errors relative to each tensor's largest entry (the gradients reach
    # a few hundred here, and LN_hh's 1/sqrt(var + eps) amplifies rows of small variance).
    for name, a, b in zip(MODULE_RESULTS + [n for n, _ in m.named_parameters()], got, want):
        assert b.abs().max() > 0
        assert_close(name, a, b.double(), 2e-6)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "ln"])
def test_module_eval_zoneout_matches_the_reference(layer_norm):
    torch.manual_seed(13)
    m = lstmgru.GRU(4, 12, bidirectional=True, zoneout=0.3, recurrent_dropout=0.25,
                    weight_drop=0.2, layer_norm=layer_norm).to(DEVICE).eval()
    x = torch.randn(5, 3, 4, device=DEVICE)
    reset = torch.rand(5, 3, device=DEVICE) < 0.3
    got = module_run(m, x, reset, "triton-tiled", seed=14)
    want = module_run(m, x, reset, "reference", seed=14)
    for name, a, b in zip(MODULE_RESULTS + [n for n, _ in m.named_parameters()], got, want):
        assert_close(name, a, b.double(), 2e-6)
