"""Conventions every kernel file here follows, in one place.

* Absent optional tensors are passed as ``None`` with a ``HAS_<NAME>: tl.constexpr`` flag;
  the kernel never touches them.
* Launchers take tensors of any strides and make them contiguous (``contiguous``): kernels
  index dense row-major memory.
* Offsets that grow with T, B or H are int64 inside the kernels (row indices are widened
  before they are multiplied), so no size limit comes from 32-bit offsets.
* The recurrent product runs in the weights' dtype with an fp32 accumulator; for fp32 weights
  its precision is ``dot_precision``.
* Tile shapes and launch options are one ``Blocks`` tuple per launch.
"""
from typing import NamedTuple, Optional

import torch


class Blocks(NamedTuple):
    block_b: int     # batch rows per program (>= 16 where tl.dot forms the product)
    block_h: int     # hidden columns produced per chunk (N of the recurrent product)
    block_k: int     # reduction slice of the recurrent product (K)
    num_warps: int
    num_stages: int


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``input_precision`` of tl.dot for weights of ``dtype``.

    fp32 follows ``torch.backends.cudnn.allow_tf32``, as torch.nn's cuDNN RNN does (its
    descriptor takes that flag): TF32 tensor cores when it is set, exact IEEE products when it
    is not, and always IEEE in the interpreter (CPU tensors). fp16/bf16 ignore the option.
    """
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def contiguous(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A dense row-major copy when needed; None stays None (an absent argument)."""
    return None if tensor is None else tensor.contiguous()
