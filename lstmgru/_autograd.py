"""The autograd.Function every recurrence implementation runs through, and its vmap rules.

A recurrence is two ``torch.library`` custom ops (forward, backward) without autograd of their
own: opaque to ``torch.compile`` and ``torch.export``, which then never trace the time loop.
``recurrence_function`` wraps such a pair into one ``autograd.Function`` with ``setup_context``
(so ``torch.func`` transforms accept it) and ``generate_vmap_rule`` (vmap goes through the ops'
own rules, ``register_row_vmap``):

* the first backward runs the implementation's fast backward op;
* a backward that must itself be differentiable (``create_graph=True``: double backward,
  Hessians, ``torch.func.grad``, which always asks for it) recomputes the step through the
  cell's spec, a composition of differentiable torch ops, and differentiates that. Nothing
  returns zeros where a higher derivative exists;
* forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``hessian``, ``torch.autograd.forward_ad``
  dual tensors) runs the ``jvp`` rule: the cell's spec linearised around the primal inputs
  (``_spec_jvp``), the same tangent recurrence whichever implementation ran the forward.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import torch
from torch.autograd import forward_ad


def recurrence_function(name: str, qualname: str, fast_backward: Callable, spec: Callable,
                        num_inputs: int, num_outputs: int):
    """Build the autograd.Function for one implementation of one cell's recurrence, and give
    the forward op the same autograd formula (``torch.export`` keeps the op, not the Function,
    so an exported program differentiates the op itself).

    ``qualname`` names the forward op, ``forward_op(*inputs, *options, save)``, which returns ``num_outputs`` results followed by the
    tensors its backward needs (empty when ``save`` is False). ``inputs`` are the first
    ``num_inputs`` arguments (tensors or None, in the order ``spec`` takes them; the last one
    is the per-row lengths, never differentiated); ``options`` are plain flags.
    ``fast_backward(grads, saved, inputs, outputs, options)`` returns one gradient per input
    but the lengths; ``outputs`` holds the first result only (y, the states of every step:
    the final states are not kept, since no backward reads them).
    ``spec(*inputs, *options)`` returns the same ``num_outputs`` results.

    Returns an object whose ``apply`` runs the Function (``_Recurrence``).
    """

    namespace, op_name = qualname.split("::")
    forward_op = getattr(getattr(torch.ops, namespace), op_name)

    def forward(*args):
        return forward_op(*args)

    # forward takes no ctx (setup_context does the bookkeeping). Dynamo, tracing a Function
    # whose inputs need no gradient (no_grad, inference_mode, frozen weights), inlines its
    # forward and decides whether to pass a ctx by counting forward's parameters against the
    # arguments of apply: a bare *args would get the ctx as its first argument, and the op
    # would fail on it. Declaring the op's own parameters tells it forward takes none.
    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(argument.name, inspect.Parameter.POSITIONAL_ONLY)
         for argument in forward_op.default._schema.arguments])

    def setup_context(ctx, inputs, output):
        tensors, options = inputs[:num_inputs], inputs[num_inputs:-1]
        results, saved = output[:num_outputs], output[num_outputs:]
        ctx.mark_non_differentiable(*saved)
        ctx.save_for_backward(*tensors, results[0], *saved)
        # Forward-mode AD (``jvp``) reads the inputs only.
        ctx.save_for_forward(*tensors)
        ctx.options = options
        ctx.num_saved = len(saved)

    def backward(ctx, *grads):
        stored = ctx.saved_tensors
        tensors = stored[:num_inputs]
        results = stored[num_inputs:num_inputs + 1]
        saved = stored[num_inputs + 1:]
        grads = grads[:num_outputs]
        if torch.is_grad_enabled():
            input_grads = _differentiable_backward(ctx, spec, tensors, grads, num_inputs)
        else:
            input_grads = fast_backward(grads, saved, tensors, results, ctx.options)
        return (*input_grads, None) + (None,) * (len(ctx.options) + 1)

    def jvp(ctx, *tangents):
        tensors = ctx.saved_tensors[:num_inputs]
        result_tangents = _spec_jvp(spec, tensors, tangents[:num_inputs - 1], ctx.options)
        # The tensors kept for the backward are not differentiable: no tangent.
        return (*result_tangents,) + (None,) * ctx.num_saved

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    methods = {
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    }
    traced = type(name, (torch.autograd.Function,), methods)
    eager = type(name, (torch.autograd.Function,), {**methods, "jvp": staticmethod(jvp)})
    return _Recurrence(eager, traced)


class _Recurrence:
    """``apply`` runs the autograd.Function with the ``jvp`` rule, except while dynamo traces
    (torch.compile, torch.export): dynamo refuses Functions that define ``jvp``, so it gets
    the same Function without it (forward-mode AD of a compiled call is not supported)."""

    def __init__(self, eager, traced):
        self.eager, self.traced = eager, traced

    def apply(self, *args):
        if torch.compiler.is_compiling():
            return self.traced.apply(*args)
        return self.eager.apply(*args)


def _spec_jvp(spec, tensors: Sequence, tangents: Sequence, options) -> tuple:
    """The tangents of the recurrence's results: the recurrence linearised around the primal
    inputs, as forward-mode AD of the cell's spec (``torch.func.jvp`` of its step loop).

    One definition for every implementation (the reference, the kernels, the variants): the
    tangent depends only on the function, not on how its forward was computed. It costs about
    two forward passes of the spec in plain PyTorch (the primal is recomputed alongside)."""
    wanted = [i for i, tangent in enumerate(tangents)
              if tangent is not None and tensors[i] is not None]

    def spec_of(*chosen):
        args = list(tensors)
        for i, tensor in zip(wanted, chosen):
            args[i] = tensor
        return tuple(spec(*args, *options))

    if not wanted:
        return tuple(torch.zeros_like(result) for result in spec_of())
    primals = tuple(tensors[i] for i in wanted)
    chosen_tangents = tuple(tangents[i] for i in wanted)
    if torch._C._functorch.peek_interpreter_stack() is not None:
        # Under torch.func (jvp, jacfwd, hessian): a level of its own, like any transform.
        return torch.func.jvp(spec_of, primals, chosen_tangents)[1]
    # Dual tensors of torch.autograd.forward_ad: only one dual level may be open, and this
    # rule runs inside it (with forward grad switched off), so the spec runs on dual tensors
    # of that level, made from the inputs' primals (the saved inputs are the dual ones).
    with forward_ad._set_fwd_grad_enabled(True):
        results = spec_of(*(forward_ad.make_dual(forward_ad.unpack_dual(p).primal, t)
                            for p, t in zip(primals, chosen_tangents)))
        return tuple(forward_ad.unpack_dual(result).tangent for result in results)


def _differentiable_backward(ctx, spec, tensors: Sequence, grads: Sequence, num_inputs: int):
    # torch.func.vjp rather than torch.autograd.grad: under torch.func transforms the saved
    # tensors of an autograd.Function live one level down, where autograd.grad sees no graph;
    # vjp opens its own level and composes with autograd and with torch.func alike.
    wanted = [i for i in range(num_inputs - 1)
              if tensors[i] is not None and ctx.needs_input_grad[i]]

    def spec_of(*chosen):
        args = list(tensors)
        for i, tensor in zip(wanted, chosen):
            args[i] = tensor
        return tuple(spec(*args, *ctx.options))

    _, pullback = torch.func.vjp(spec_of, *[tensors[i] for i in wanted])
    found = pullback(tuple(grads))
    result = [None] * (num_inputs - 1)
    for i, grad in zip(wanted, found):
        result[i] = grad
    return result


def register_row_vmap(op, row_dims: Sequence, out_row_dims: Optional[Sequence]) -> None:
    """vmap for a recurrence op whose batch rows are independent: the vmapped dimension joins
    the batch rows (one call over N * B rows), which is exact because no row reads another.

    ``row_dims[i]`` is the batch-row dimension of argument i, or None for an argument that is
    shared by all rows (weights, flags); ``out_row_dims`` likewise for the results. Where a
    shared argument is itself vmapped (per-sample weights), or rows are packed (sorted by
    length, which merging would break), the op runs once per vmapped slice instead; and
    always where ``out_row_dims`` is None (an op with results summed over rows, such as a
    weight gradient, whose per-sample values merging would add up).
    """

    def rule(info, in_dims, *args):
        n = info.batch_size
        mergeable = all(d is None or row is not None for d, row in zip(in_dims, row_dims))
        # Integer tensors are per-row lengths (bool ones are masks, which merge like the rest).
        packed = any(isinstance(a, torch.Tensor) and not a.is_floating_point()
                     and a.dtype != torch.bool for a in args)
        if out_row_dims is None or not mergeable or packed:
            return _loop(op, n, in_dims, args)
        merged = []
        for arg, d, row in zip(args, in_dims, row_dims):
            if row is not None and isinstance(arg, torch.Tensor):
                if d is None:
                    arg = arg.unsqueeze(0).expand(n, *arg.shape)
                else:
                    arg = arg.movedim(d, 0)
                # (N, ..., B, ...) -> (..., N * B, ...)
                arg = arg.movedim(0, row).flatten(row, row + 1)
            merged.append(arg)
        outputs = op(*merged)
        results, dims = [], []
        for out, row in zip(outputs, out_row_dims):
            if row is None or out.numel() == 0:
                results.append(out)
                dims.append(None)
            else:
                results.append(out.unflatten(row, (n, -1)))
                dims.append(row)
        return tuple(results), tuple(dims)

    torch.library.register_vmap(op, rule)


def _loop(op, n, in_dims, args):
    per_slice = []
    for k in range(n):
        sliced = [a.select(d, k) if d is not None else a for a, d in zip(args, in_dims)]
        per_slice.append(op(*sliced))
    results = tuple(torch.stack(parts) for parts in zip(*per_slice))
    return results, (0,) * len(results)
