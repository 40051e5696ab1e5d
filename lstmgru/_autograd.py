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
  returns zeros where a higher derivative exists.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import torch


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
    but the lengths. ``spec(*inputs, *options)`` returns the same ``num_outputs`` results.
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
        ctx.save_for_backward(*tensors, *results, *saved)
        ctx.options = options

    def backward(ctx, *grads):
        stored = ctx.saved_tensors
        tensors = stored[:num_inputs]
        results = stored[num_inputs:num_inputs + num_outputs]
        saved = stored[num_inputs + num_outputs:]
        grads = grads[:num_outputs]
        if torch.is_grad_enabled():
            input_grads = _differentiable_backward(ctx, spec, tensors, grads, num_inputs)
        else:
            input_grads = fast_backward(grads, saved, tensors, results, ctx.options)
        return (*input_grads, None) + (None,) * (len(ctx.options) + 1)

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    return type(name, (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })


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
