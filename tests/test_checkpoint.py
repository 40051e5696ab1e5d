"""Activation checkpointing: ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``
around an lstmgru layer (or a loop of cells) gives the same outputs and gradients (input, initial
state, every parameter) as the same call without checkpointing, and as torch.nn; in fp64 with
tight tolerances.

A forward-call counter proves that the checkpointed run really recomputed the forward during
backward, so a checkpoint that silently kept the activations could not pass for one. With
inter-layer dropout the recomputation must draw the same masks as the first forward.
"""
import random

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import lstmgru
from _parity import assert_close, weighted_loss

SAME = 1e-12    # lstmgru with and without checkpointing: the same arithmetic, replayed
TORCH = 1e-10   # lstmgru against torch.nn in fp64


def _layer_fn(module):
    def fn(x, *state):
        out, final = module(x, state if len(state) > 1 else state[0])
        finals = final if isinstance(final, tuple) else (final,)
        return (out, *finals)
    return fn


def _cell_loop_fn(cell, steps):
    """Unrolls a cell over the first dimension of x; returns every h (and the last c)."""
    def fn(x, *state):
        hs = []
        state = state if len(state) > 1 else state[0]
        for t in range(steps):
            state = cell(x[t], state)
            hs.append(state[0] if isinstance(state, tuple) else state)
        last = state if isinstance(state, tuple) else (state,)
        return (torch.stack(hs), *last)
    return fn


def _run(fn, module, inputs, checkpointed, loss_seed, rng_seed=None):
    """Forward (checkpointed or not) + backward; outputs, every gradient, forward calls."""
    calls = []
    hook = module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        module.zero_grad(set_to_none=True)
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        outs = checkpoint(fn, *leaves, use_reentrant=False) if checkpointed else fn(*leaves)
        weighted_loss(outs, seed=loss_seed).backward()
    finally:
        hook.remove()
    result = {f"out[{i}]": o.detach() for i, o in enumerate(outs)}
    result.update({f"input[{i}].grad": t.grad for i, t in enumerate(leaves)})
    result.update({f"{n}.grad": p.grad for n, p in module.named_parameters()})
    return result, len(calls)


def _compare(ours, theirs, atol, what):
    assert ours.keys() == theirs.keys()
    for key, want in theirs.items():
        assert want is not None and ours[key] is not None, f"{what}: no {key}"
        assert_close(ours[key], want, f"{what}: {key}", atol)


def _states(op, count, batch, hidden, gen, proj=0):
    h = torch.randn(count, batch, proj or hidden, generator=gen, dtype=torch.float64)
    if op.startswith("LSTM"):
        return [h, torch.randn(count, batch, hidden, generator=gen, dtype=torch.float64)]
    return [h]


LAYERS = [
    # op, kwargs
    ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("LSTM", dict(num_layers=2, proj_size=3)),
    ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("GRU", dict(num_layers=1, bias=False)),
]


@pytest.mark.parametrize("op,kwargs", LAYERS, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={w}" for k, w in v.items()))
def test_layer(op, kwargs):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    I, H, T, B = 4, 6, 5, 3
    ref = getattr(torch.nn, op)(I, H, **kwargs).double()
    ours = getattr(lstmgru, op)(I, H, **kwargs).double()
    ours.load_state_dict(ref.state_dict())
    shape = (B, T, I) if kwargs.get("batch_first") else (T, B, I)
    count = kwargs["num_layers"] * (2 if kwargs.get("bidirectional") else 1)
    inputs = [torch.randn(shape, generator=gen, dtype=torch.float64),
              *_states(op, count, B, H, gen, kwargs.get("proj_size", 0))]
    fn = _layer_fn(ours)
    plain, n_plain = _run(fn, ours, inputs, False, seed)
    ckpt, n_ckpt = _run(fn, ours, inputs, True, seed)
    theirs, _ = _run(_layer_fn(ref), ref, inputs, False, seed)
    assert (n_plain, n_ckpt) == (1, 2), "the checkpointed forward was not recomputed"
    _compare(ckpt, plain, SAME, f"{op} checkpointed vs not (seed {seed})")
    _compare(ckpt, theirs, TORCH, f"{op} checkpointed vs torch.nn (seed {seed})")


def test_original_gru_reset_before():
    """reset_after=False has no torch.nn counterpart: checkpointed against not checkpointed."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    ours = lstmgru.GRU(4, 6, num_layers=2, reset_after=False).double()
    inputs = [torch.randn(5, 3, 4, generator=gen, dtype=torch.float64),
              torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)]
    fn = _layer_fn(ours)
    plain, n_plain = _run(fn, ours, inputs, False, seed)
    ckpt, n_ckpt = _run(fn, ours, inputs, True, seed)
    assert (n_plain, n_ckpt) == (1, 2)
    _compare(ckpt, plain, SAME, f"GRU reset_after=False checkpointed vs not (seed {seed})")


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_dropout_is_replayed(op):
    """Inter-layer dropout in training mode: the recomputation draws the same masks."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    ours = getattr(lstmgru, op)(4, 6, num_layers=3, dropout=0.4).double().train()
    inputs = [torch.randn(5, 3, 4, generator=gen, dtype=torch.float64),
              *_states(op, 3, 3, 6, gen)]
    fn = _layer_fn(ours)
    plain, _ = _run(fn, ours, inputs, False, seed, rng_seed=seed)
    ckpt, n_ckpt = _run(fn, ours, inputs, True, seed, rng_seed=seed)
    assert n_ckpt == 2
    _compare(ckpt, plain, SAME, f"{op} dropout checkpointed vs not (seed {seed})")
    # The masks matter: another RNG state gives other gradients.
    other, _ = _run(fn, ours, inputs, False, seed, rng_seed=seed + 1)
    assert not torch.equal(other["input[0].grad"], plain["input[0].grad"])


@pytest.mark.parametrize("op", ["LSTMCell", "GRUCell"])
def test_cell_loop(op):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    I, H, T, B = 4, 6, 5, 3
    ref = getattr(torch.nn, op)(I, H).double()
    ours = getattr(lstmgru, op)(I, H).double()
    ours.load_state_dict(ref.state_dict())
    state = [torch.randn(B, H, generator=gen, dtype=torch.float64)
             for _ in range(2 if op == "LSTMCell" else 1)]
    inputs = [torch.randn(T, B, I, generator=gen, dtype=torch.float64), *state]
    plain, n_plain = _run(_cell_loop_fn(ours, T), ours, inputs, False, seed)
    ckpt, n_ckpt = _run(_cell_loop_fn(ours, T), ours, inputs, True, seed)
    theirs, _ = _run(_cell_loop_fn(ref, T), ref, inputs, False, seed)
    assert (n_plain, n_ckpt) == (T, 2 * T), "the checkpointed loop was not recomputed"
    _compare(ckpt, plain, SAME, f"{op} loop checkpointed vs not (seed {seed})")
    _compare(ckpt, theirs, TORCH, f"{op} loop checkpointed vs torch.nn (seed {seed})")


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_triton_backend(op):
    """The Triton kernels (Triton's interpreter on CPU tensors without a GPU) under
    checkpointing: the forward kernel runs again in backward, the gradients do not change."""
    pytest.importorskip("triton")
    from lstmgru._kernels import _launch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    ours = getattr(lstmgru, op)(3, 8, batch_first=True).to(device)
    inputs = [torch.randn(2, 3, 3, generator=gen).to(device),
              *(s.float().to(device) for s in _states(op, 1, 2, 8, gen))]
    fn = _layer_fn(ours)
    with lstmgru.use_backend("triton"):
        before = _launch.launches
        plain, _ = _run(fn, ours, inputs, False, seed)
        plain_launches = _launch.launches - before
        ckpt, _ = _run(fn, ours, inputs, True, seed)
        ckpt_launches = _launch.launches - before - plain_launches
    assert (plain_launches, ckpt_launches) == (2, 3), "forward + backward, + the recomputation"
    _compare(ckpt, plain, 1e-6, f"{op} triton checkpointed vs not (seed {seed})")
