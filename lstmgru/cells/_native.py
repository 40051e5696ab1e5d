"""What every cell's native implementation shares: what torch's own kernels cannot compute."""
from __future__ import annotations

from typing import Optional

from ..backends import Case


def variants_reason(case: Case) -> Optional[str]:
    if case.variants:
        return f"torch's kernels compute none of the cell variants ({', '.join(case.variants)})"
    return None
