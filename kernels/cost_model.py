"""Which kernel family runs a case: a cost model of one time step, in microseconds.

PREDICTIONS, not measurements. The constants are estimates from public figures (the design
notes: H100 L2 bandwidth per SM, a grid-wide sync of about a microsecond, the tensor-core and
CUDA-core rates); the first GPU run recalibrates them from the measured barrier and step times
(``benchmarks/gpu_check.sh``). ``benchmarks/cost_model_table.py`` prints the predictions over
the GPU grid.

Per step, a family is bound by the slowest of: the bytes each program reads from L2 (the
tiled family re-reads all of ``weight_hh``; the split family keeps its slice in registers and
reads only h), its share of the FLOPs, and, for the split family, the syncs between programs.
"""
import math

import torch

from . import _common
from .split import split_plan

L2_BYTES_PER_US_PER_SM = 120e3    # 100-150 GB/s per SM reading from L2
TENSOR_FLOPS_PER_US_PER_SM = 3.7e6  # dense fp16/bf16 HMMA (16-row tiles: about half of peak)
FFMA_FLOPS_PER_US_PER_SM = 0.5e6    # fp32 on the CUDA cores (~67 TFLOP/s over 132 SMs)
SYNC_US = 1.0                     # one dataflow sync between the programs of a group
STEP_OVERHEAD_US = 0.3            # gate math, stores and loop control of one step
GATES = {"lstm": 4, "gru": 3}


def _rate(dtype: torch.dtype, tensor_cores: bool) -> float:
    return TENSOR_FLOPS_PER_US_PER_SM if tensor_cores and dtype != torch.float32 \
        else FFMA_FLOPS_PER_US_PER_SM


def tiled_step_us(cell: str, B: int, H: int, dtype: torch.dtype, sms: int) -> float:
    """One step of the batch-tiled family (``lstm.py``/``gru.py``)."""
    gates = GATES[cell]
    blocks = _common.Blocks(16, 0, 0, 0, 0)
    programs = math.ceil(max(B, 1) / blocks.block_b)
    waves = math.ceil(programs / sms)
    read_us = gates * H * H * dtype.itemsize / L2_BYTES_PER_US_PER_SM
    compute_us = 2 * blocks.block_b * gates * H * H / _rate(dtype, True)
    return waves * (max(read_us, compute_us) + STEP_OVERHEAD_US)


def split_step_us(cell: str, B: int, H: int, dtype: torch.dtype, sms: int,
                  reset_after: bool = True) -> float:
    """One step of the split-hidden family (``split.py``); inf where it has no layout."""
    try:
        plan = split_plan(B, H, dtype, sms, cell)
    except ValueError:
        return math.inf
    gates = GATES[cell]
    rows = plan.block_b if plan.use_dot else max(B, 1)
    read_us = rows * H * 4 / L2_BYTES_PER_US_PER_SM        # all of h_{t-1}, fp32
    compute_us = 2 * rows * gates * plan.block_j * H / _rate(dtype, plan.use_dot)
    syncs = 2 if cell == "gru" and not reset_after else 1
    return syncs * SYNC_US + max(read_us, compute_us) + STEP_OVERHEAD_US


def choose(cell: str, B: int, H: int, dtype: torch.dtype, sms: int,
           reset_after: bool = True) -> str:
    """"split" or "tiled": the family with the lower predicted step time."""
    split = split_step_us(cell, B, H, dtype, sms, reset_after)
    return "split" if split < tiled_step_us(cell, B, H, dtype, sms) else "tiled"
