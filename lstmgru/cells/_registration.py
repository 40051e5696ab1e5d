"""What every cell's registration shares: the implementations it offers and their order of
checks. A cell supplies only what is its own (its native call, its recurrences, and any
reason of its own why the kernels cannot take a case)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

from .. import _triton, backends


def _variants_reason(case: backends.Case, family: str, implemented, elsewhere: str) -> Optional[str]:
    missing = [name for name in case.variants if name not in implemented]
    if not missing:
        return None
    return f"the {family} kernels do not implement {', '.join(missing)} ({elsewhere})"


def triton_reason(case: backends.Case, own_reason: Callable) -> Optional[str]:
    """Why no Triton kernel family can take ``case`` (whatever its variants), or None."""
    return _triton.unavailable_reason(case.device_type, case.dtype) or own_reason(case)


def register(cells, native, reference_recurrence, family_recurrence, kernel_cell: str,
             own_reason: Callable = lambda case: None,
             kernel_variants: Tuple[str, ...] = ()) -> None:
    """Register native, reference, triton, triton-tiled and triton-split for each of
    ``cells``: (name, native forward) pairs. ``family_recurrence(family)`` returns the
    recurrence on a kernel family (None: the cost model picks per call). The reference takes
    every cell variant; ``kernel_variants`` names those the tiled kernels take ("triton"
    runs every call with variants on the tiled family); the split family takes weight drop."""
    def kernels(case):
        return (triton_reason(case, own_reason)
                or _variants_reason(case, "tiled", kernel_variants, "the reference does"))

    def split(case):
        # Weight drop only changes the weights the kernels are given. The other variants are
        # elementwise (no extra sync per step) but not written for this family yet, except
        # LayerNorm, whose row statistics span all programs: an extra grid sync per step.
        return (triton_reason(case, own_reason)
                or _variants_reason(case, "split-hidden", ("weight_drop",),
                                    "backend 'triton' runs them on the tiled family")
                or _triton.split_reason(kernel_cell, case.batch, case.hidden_size, case.dtype,
                                        case.device_type))

    for cell, native_forward in cells:
        backends.register(cell, backends.Implementation(
            "native", native.supports, module_forward=native_forward, probe=native.probe))
        backends.register(cell, backends.Implementation(
            "reference", lambda case: None, recurrence=reference_recurrence))
        # "triton" picks the family per call from the cost model; the others name one.
        backends.register(cell, backends.Implementation(
            "triton", kernels, recurrence=family_recurrence(None)))
        backends.register(cell, backends.Implementation(
            "triton-tiled", kernels, recurrence=family_recurrence("tiled")))
        backends.register(cell, backends.Implementation(
            "triton-split", split, recurrence=family_recurrence("split")))
