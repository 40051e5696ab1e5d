"""What every cell's registration shares: the implementations it offers and their order of
checks. A cell supplies only what is its own (its native call, its recurrences, and any
reason of its own why the kernels cannot take a case)."""
from __future__ import annotations

from typing import Callable, Optional

from .. import _triton, backends


def triton_reason(case: backends.Case, own_reason: Callable) -> Optional[str]:
    """Why the Triton kernels (either family) cannot take ``case``, or None."""
    reason = _triton.unavailable_reason(case.device_type, case.dtype) or own_reason(case)
    if reason is None and case.variants:
        reason = f"the kernels do not implement {', '.join(case.variants)} yet"
    return reason


def register(cells, native, reference_recurrence, family_recurrence, kernel_cell: str,
             own_reason: Callable = lambda case: None) -> None:
    """Register native, reference, triton, triton-tiled and triton-split for each of
    ``cells``: (name, native forward) pairs. ``family_recurrence(family)`` returns the
    recurrence on a kernel family (None: the cost model picks per call)."""
    def kernels(case):
        return triton_reason(case, own_reason)

    def split(case):
        return kernels(case) or _triton.split_reason(kernel_cell, case.batch, case.hidden_size,
                                                     case.dtype, case.device_type)

    for cell, native_forward in cells:
        backends.register(cell, backends.Implementation(
            "native", native.supports, module_forward=native_forward))
        backends.register(cell, backends.Implementation(
            "reference", lambda case: None, recurrence=reference_recurrence))
        # "triton" picks the family per call from the cost model; the others name one.
        backends.register(cell, backends.Implementation(
            "triton", kernels, recurrence=family_recurrence(None)))
        backends.register(cell, backends.Implementation(
            "triton-tiled", kernels, recurrence=family_recurrence("tiled")))
        backends.register(cell, backends.Implementation(
            "triton-split", split, recurrence=family_recurrence("split")))
