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


# torch >= 2.9 keeps one fp32 precision per (backend, op): "ieee", "tf32", or "none" for
# "ask the parent" (cuDNN's RNN -> cuDNN's "all" -> the global setting). This is the getter
# behind torch.backends.cudnn.rnn.fp32_precision and its parents, without their attribute
# plumbing (3 us for the rnn property, 0.2 us here: dot_precision runs on every launch).
_fp32_precision_of = getattr(torch._C, "_get_fp32_precision_getter", None)
# Where it is resolved, most specific first: the chain ATen's Context::float32Precision(CUDA,
# RNN) walks for cuDNN's RNN. Recent torch's getter already returns the resolved value (so the
# walk stops at the first entry); walking it here keeps the answer right if a version does not.
_RNN_PRECISION_CHAIN = (("cuda", "rnn"), ("cuda", "all"), ("generic", "all"))


def fp32_rnn_allows_tf32() -> bool:
    """Whether torch.nn's cuDNN RNN would use TF32 for fp32 now; never raises.

    torch >= 2.9: ``torch.backends.cudnn.rnn.fp32_precision``, where "none" inherits from
    ``torch.backends.cudnn.fp32_precision`` and then ``torch.backends.fp32_precision``; TF32
    only where the first setting that is not "none" says "tf32". The legacy
    ``torch.backends.cudnn.allow_tf32`` is not read there: its getter raises RuntimeError once
    the RNN and convolution precisions differ (e.g. after ``cudnn.rnn.fp32_precision =
    "ieee"``), and setting it writes the new per-op settings anyway. Older torch: the legacy
    flag, which is all it has."""
    if _fp32_precision_of is None:
        return bool(torch.backends.cudnn.allow_tf32)
    for backend, op in _RNN_PRECISION_CHAIN:
        precision = _fp32_precision_of(backend, op)
        if precision != "none":
            return precision == "tf32"
    return False


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``input_precision`` of tl.dot for weights of ``dtype``.

    fp32 follows the precision torch.nn's cuDNN RNN uses (``fp32_rnn_allows_tf32``): TF32
    tensor cores where the user's settings allow TF32 for cuDNN RNNs, exact IEEE products
    where they do not, and always IEEE in the interpreter (CPU tensors). fp16/bf16 ignore
    the option."""
    if dtype == torch.float32 and device.type == "cuda" and fp32_rnn_allows_tf32():
        return "tf32"
    return "ieee"


def contiguous(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A dense row-major copy when needed; None stays None (an absent argument)."""
    return None if tensor is None else tensor.contiguous()
