"""Compile the split kernels for sm_90 without a GPU and print registers, spills, shared memory.

    python benchmarks/split_resources.py                   # a default set of layouts
    python benchmarks/split_resources.py lstm:16:1024:float16 gru-original:8:512:bfloat16

Each case is CELL:B:H:DTYPE with CELL one of lstm, gru (reset_after=True), gru-original.
Uses the layout ``split_plan`` picks for 132 SMs, every optional input present (lengths, h0,
c0, bias) and training on: the largest variant. fp32 is compiled as "ieee" unless --tf32
(torch's default lets cuDNN use TF32, and the launchers follow that flag). Registers and
spills come from ``ptxas -v`` on Triton's PTX (the ptxas bundled with Triton); nothing runs.
"""
import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lstmgru._kernels import split as K

DEFAULT = ["lstm:1:1024:float16", "lstm:16:1024:float16", "lstm:16:768:bfloat16",
           "lstm:64:256:float16", "gru:16:1024:float16", "gru-original:16:1024:float16",
           "gru:1:1024:float32"]
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _ptxas():
    # Triton 3.9's PTX needs the newer of the two bundled assemblers; 3.6 ships one.
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise RuntimeError("no ptxas next to triton")


def _signature(fn, dtype):
    """Pointer and scalar types by argument name; everything else is a constexpr."""
    sig = {}
    for name in fn.arg_names:
        if name in ("T", "B", "H", "max_spins"):
            sig[name] = "i32"
        elif name == "len_ptr":
            sig[name] = "*i64"
        elif name in ("flag_ptr", "err_ptr"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            fp32 = name in ("act_ptr", "c_seq_ptr", "ring_ptr", "part_ptr", "rh_ptr", "gates_ptr",
                            "ghn_ptr", "dgx_ptr", "dh0_ptr", "dc0_ptr", "ggx_ptr", "ggh_ptr",
                            "gh0_ptr")
            sig[name] = "*fp32" if fp32 else _PTR[dtype]
        else:
            sig[name] = "constexpr"
    return sig


def compile_case(kernel, cell, B, H, dtype, tf32):
    gru = cell.startswith("gru")
    reset_after = cell == "gru"
    plan = K.split_plan(B, H, dtype, 132, "gru" if gru else "lstm")
    sig = _signature(kernel, dtype)
    const = dict(SLICES=plan.slices, SLICES_PAD=triton.next_power_of_2(plan.slices),
                 FLAG_STRIDE=K._FLAG_STRIDE, USE_DOT=plan.use_dot, BLOCK_B=plan.block_b,
                 BLOCK_J=plan.block_j, SPLIT_K=plan.split_k,
                 BLOCK_K=plan.block_k - plan.k_tail, SPLIT_K_TAIL=plan.split_k_tail,
                 K_TAIL=plan.k_tail, POLL=K.POLL_LD_ACQUIRE.value,
                 PRECISION="tf32" if tf32 and dtype == torch.float32 else "ieee",
                 REVERSE=False, TRAINING=True, RESET_AFTER=reset_after, HAS_BHN=reset_after,
                 PART_CHUNK=K._part_chunk(plan))
    if gru:
        const["BLOCK_N"] = K._gru_n_rows(plan)
        # Passed as None: the original GRU has no b_hn and saves no gh_n; only it needs r*h.
        absent = ("bhn_ptr", "ghn_ptr") if not reset_after else ("rh_ptr",)
        for name in absent:
            if name in sig:
                sig[name], const[name] = "constexpr", None
    const = {name: value for name, value in const.items() if name in kernel.arg_names}
    for name in kernel.arg_names:
        if sig[name] == "constexpr" and name not in const:
            const[name] = True  # HAS_* flags: every optional input present
    compiled = triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=plan.num_warps, num_stages=1))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        info = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", ptx, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", info).group(1)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info).groups()
    return plan, regs, spills, compiled.metadata.shared


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=DEFAULT)
    parser.add_argument("--tf32", action="store_true", help="compile fp32 products as TF32")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_90a, 132 SMs")
    print("| case | kernel | P | block_j | block_b | warps | dot | registers | spill st/ld (B) "
          "| shared (B) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        cell, B, H, dtype = case.split(":")
        dtype = getattr(torch, dtype)
        kernels = ((K._gru_fwd_kernel, K._gru_bwd_kernel) if cell.startswith("gru")
                   else (K._lstm_fwd_kernel, K._lstm_bwd_kernel))
        for kernel in kernels:
            plan, regs, (st, ld), shared = compile_case(kernel, cell, int(B), int(H), dtype,
                                                        args.tf32)
            print(f"| {case} | {kernel.__name__} | {plan.programs} | {plan.block_j} | "
                  f"{plan.block_b} | {plan.num_warps} | {plan.use_dot} | {regs} | {st}/{ld} | "
                  f"{shared} |", flush=True)


if __name__ == "__main__":
    main()
