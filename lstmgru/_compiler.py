"""What lstmgru tells torch.compile, without importing ``torch._dynamo`` at ``import lstmgru``.

``torch.compiler.assume_constant_result`` imports ``torch._dynamo`` (about 2 s, and triton
with it) the moment it decorates a function, so used at import time it would make
``import lstmgru`` cost that much more. Its whole effect is one attribute on the function,
read by dynamo when it meets a call to it; ``assume_constant_result`` below sets that
attribute directly. ``tests/test_import_time.py`` checks that torch's decorator still sets
exactly this attribute, so a torch that changes the mechanism fails there, not silently.
"""
from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

# The attribute torch._dynamo.decorators.assume_constant_result sets (torch 2.11 to 2.13).
CONSTANT_RESULT_MARK = "_dynamo_marked_constant"


def assume_constant_result(fn: F) -> F:
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo``:
    dynamo calls ``fn`` for real while tracing and bakes its result into the graph."""
    setattr(fn, CONSTANT_RESULT_MARK, True)
    return fn
