"""TorchScript (``torch.jit.script``) cannot compile lstmgru's modules: say so, and what works.

A module's call chooses its implementation in Python at run time (``lstmgru.backends``) and
runs the recurrence as ``torch.library`` ops inside an ``autograd.Function``; TorchScript can
express neither. Left to itself, ``torch.jit.script`` fails deep inside its type inference
with ``ValueError: Unknown type annotation: 'str' at`` and no location.

``torch.jit.script`` calls ``__prepare_scriptable__()`` on the module it is given and on every
submodule before it compiles anything (``torch.jit._script.call_prepare_scriptable_func``), so
that hook is where a clear error can be raised, also for an lstmgru module deep inside a model.
Nothing else in torch calls it: ``torch.jit.trace``, ``torch.compile`` and ``torch.export`` are
unaffected.
"""
from __future__ import annotations


def _public_name(cls: type) -> str:
    if cls.__module__.startswith("lstmgru."):
        return f"lstmgru.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def refuse_torchscript(module) -> None:
    """``__prepare_scriptable__`` of every lstmgru module: raise instead of a cryptic failure."""
    raise RuntimeError(
        f"torch.jit.script cannot compile {_public_name(type(module))}: lstmgru chooses its "
        "implementation per call in Python and runs the recurrence as torch.library ops, which "
        "TorchScript cannot express. Use torch.compile(model) or torch.export.export(model, "
        "args) instead (both keep the recurrence as one op per layer-direction), or "
        "torch.jit.trace(model, example_inputs). lstmgru.to_torch(model) turns lstmgru's modules "
        "back into torch.nn's, which reach TorchScript where your torch still scripts them "
        "(not possible for reset_after=False or the cell variants).")
