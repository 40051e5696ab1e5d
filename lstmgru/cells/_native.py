"""What every cell's native implementation shares: what torch's own kernels cannot compute,
and the probe of whether they run a dtype on this machine."""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..backends import Case

# torch's kernels run float32 and float64 everywhere; these are the dtypes that depend on the
# machine (oneDNN's bf16 LSTM needs AVX-512 bf16 under autocast; cuDNN's bf16 RNN a recent
# cuDNN), so auto probes them before taking torch's kernel.
PROBED_DTYPES = (torch.float16, torch.bfloat16)


def variants_reason(case: Case) -> Optional[str]:
    if case.transform == "torch.compile":
        # Traced, torch's RNN op decomposes into per-step ops: a graph unrolled over a fixed T.
        return ("under torch.compile/torch.export torch's RNN op is unrolled over the steps; "
                "the recurrence runs as one lstmgru op instead")
    if case.transform == "torch.func":
        return "torch's RNN kernels have no torch.func (vmap) rules"
    if case.transform == "forward-mode AD":
        # oneDNN's LSTM (float32 on the CPU) raises: mkldnn_rnn_layer has no forward-AD formula
        return "torch's oneDNN LSTM kernel has no forward-mode AD formula"
    if case.variants:
        return f"torch's kernels compute none of the cell variants ({', '.join(case.variants)})"
    return None


def probe(case: Case) -> Optional[str]:
    """Why torch's kernel does not run ``case``'s dtype on this machine (as seen by a tiny
    forward and backward of it, once per cell, device type, dtype and autocast), or None.
    Asked by auto only (``Implementation.probe``); where probing is not safe (a trace, a CUDA
    graph capture, a dispatch mode) it answers None unprobed, as torch.nn would run."""
    if case.dtype not in PROBED_DTYPES or case.transform:
        return None
    if case.device_type == "cuda":
        if not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
            return None
    elif case.device_type != "cpu":
        return None
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return None
    return _probe(case.cell, case.device_type, case.dtype, case.autocast)


@functools.lru_cache(maxsize=None)
def _probe(cell: str, device_type: str, dtype: torch.dtype, autocast: bool) -> Optional[str]:
    try:
        # Normal tensors with autograd whatever the caller's mode (inference_mode, no_grad).
        with torch.inference_mode(False), torch.enable_grad():
            _run_torch_kernel(cell, device_type, dtype, autocast)
    except RuntimeError as error:
        where = f"under {device_type} autocast" if autocast else "with weights in that dtype"
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"torch's {cell} kernel does not run {dtype} {where} on this machine ({first_line})"
    return None


def _run_torch_kernel(cell: str, device_type: str, dtype: torch.dtype, autocast: bool) -> None:
    """One step of torch.nn's ``cell``, forward and backward. Under autocast it runs as the
    user's call does: float32 weights and input, cast by the caller's autocast, which is in
    force here. Otherwise everything is in ``dtype``. The weights are constants: the probe must
    not draw from the user's random streams."""
    layer = not cell.endswith("Cell")
    module = getattr(torch.nn, cell)(2, 2, device="meta").to_empty(device=device_type)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.linspace(-0.5, 0.5, parameter.numel()).view_as(parameter))
    if not autocast:
        module.to(dtype)
    if layer:
        module.flatten_parameters()
    x = torch.linspace(-1.0, 1.0, 2).reshape((1, 1, 2) if layer else (1, 2))
    x = x.to(device_type, torch.float32 if autocast else dtype).requires_grad_(True)
    out = module(x)
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()
