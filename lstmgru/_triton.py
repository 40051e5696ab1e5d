"""Whether the Triton kernels can run at all here, asked without importing triton."""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    """Triton's interpreter runs kernels on CPU tensors when ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _missing() -> Optional[str]:
    # Asked once, and only when a kernel could run (never by auto for CPU tensors): it
    # imports triton, which takes a second.
    if importlib.util.find_spec("triton") is None:
        return ("the triton package is not installed (pip install 'lstmgru[triton]'; CUDA "
                "builds of torch bring it)")
    if importlib.util.find_spec("lstmgru._kernels") is None:
        # kernels/ becomes lstmgru._kernels only when the package is installed.
        return "the kernels are not installed: install the package (pip install -e .)"
    try:
        importlib.import_module("lstmgru._kernels.lstm")
    except ImportError as error:  # a triton that is there but broken
        return f"the kernels do not import: {error}"
    return None


def unavailable_reason(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """Why no Triton kernel can run on tensors of this device type and dtype, or None."""
    missing = _missing()
    if missing is not None:
        return missing
    if device_type == "cpu" and not interpreter_enabled():
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    if device_type not in ("cuda", "cpu"):
        return f"tensors are on {device_type}, and the Triton kernels run on CUDA only"
    if dtype not in KERNEL_DTYPES:
        return f"the kernels support float32, float16 and bfloat16, not {dtype}"
    return None


def split_reason(cell: str, batch: int, hidden: int, dtype: torch.dtype,
                 device_type: str) -> Optional[str]:
    """Why the split-hidden family cannot take this case (None when it can). Imports the
    kernels: ask only after ``unavailable_reason`` said None."""
    from lstmgru._kernels import split

    return split.supports(max(batch, 1), hidden, dtype, device_type, cell)


def cost_model_family(cell: str, gates_x: torch.Tensor, hidden: int, reset_after: bool,
                      variants=None) -> str:
    """The family ``"triton"`` runs a call on: the cost model's pick (lstmgru._kernels.cost_model)
    among the families that can take it. Cell variants run on the tiled family (the split
    family's registration says why)."""
    from lstmgru._kernels import cost_model, split

    batch = gates_x.shape[1]
    if variants is not None or gates_x.device.type != "cuda":
        # Triton's stock interpreter runs programs one after another, so the split family's
        # programs would wait for each other until their polls time out: on CPU tensors
        # "triton" is the tiled family ("triton-split" names the other one explicitly).
        return "tiled"
    if split.supports(max(batch, 1), hidden, gates_x.dtype, gates_x.device, cell) is not None:
        return "tiled"
    return cost_model.choose(cell, batch, hidden, gates_x.dtype,
                             split._num_sms(gates_x.device), reset_after)
