"""Shared helpers: run torch.nn and lstmgru on the same weights and compare everything."""
import torch


def assert_close(actual, expected, name, atol, rtol=0.0):
    """torch.testing-style check that names the tensor and shows the worst elements."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    bad = diff > bound
    if bool(bad.any()) or bool(torch.isnan(actual).ne(torch.isnan(expected)).any()):
        idx = diff.flatten().argsort(descending=True)[:5]
        rows = [f"  at {tuple(int(i) for i in torch.unravel_index(j, diff.shape))}: "
                f"got {actual.flatten()[j].item():.6g}, want {expected.flatten()[j].item():.6g}"
                for j in idx]
        raise AssertionError(f"{name}: {int(bad.sum())} of {diff.numel()} elements differ, "
                             f"max abs diff {diff.max().item():.3g} (atol {atol}, rtol {rtol})\n"
                             + "\n".join(rows))


def weighted_loss(tensors, seed=1234):
    """A loss that weights every output element differently, so no gradient can hide."""
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for t in tensors:
        w = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
        total = total + (t * w.to(t.device)).sum()
    return total


def run_rnn(module, x, hx):
    """Forward + backward; returns outputs and every gradient, named."""
    if isinstance(x, torch.nn.utils.rnn.PackedSequence):
        leaf = x.data.detach().clone().requires_grad_()
        x_in = x._replace(data=leaf)
    else:
        leaf = x_in = x.detach().clone().requires_grad_()
    if hx is not None:
        hx = tuple(h.detach().clone().requires_grad_() for h in hx) if isinstance(hx, tuple) \
            else hx.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out, final = module(x_in, hx)
    finals = final if isinstance(final, tuple) else (final,)
    data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    weighted_loss([data, *finals]).backward()
    result = {"output": data, "x.grad": leaf.grad}
    for i, f in enumerate(finals):
        result[f"final[{i}]"] = f
    if hx is not None:
        for i, h in enumerate(hx if isinstance(hx, tuple) else (hx,)):
            result[f"hx[{i}].grad"] = h.grad
    for name, p in module.named_parameters():
        result[f"{name}.grad"] = p.grad
    return result


def compare_runs(ours, theirs, atol, rtol=0.0):
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert theirs[key] is not None, f"torch produced no {key}"
        assert ours[key] is not None, f"lstmgru produced no {key}"
        assert_close(ours[key], theirs[key], key, atol, rtol)
