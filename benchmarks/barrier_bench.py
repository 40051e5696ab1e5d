#!/usr/bin/env python
"""Microseconds per sync between P co-resident programs, for each sync scheme, on a GPU.

Schemes (each kernel runs ROUNDS syncs back to back in one launch, nothing else):
  flags     the split kernels' own protocol (kernels/split.py ``_publish``/``_wait``): every
            program bumps its own epoch flag (one 128-byte line each) with a release atomic,
            then polls all P flags with acquire atomics until they reach the round;
  counter   a counting barrier: one release atomic add on a shared counter, then poll that one
            counter until it reaches P * round.
The figure is (kernel time) / ROUNDS, the median over repeats (triton.testing.do_bench), so it
includes the poll loop's own cost: what a step of a persistent kernel pays per sync. It feeds
``SYNC_US`` in kernels/cost_model.py. ``--smoke`` runs a tiny case in Triton's interpreter
(TRITON_INTERPRET=1, CPU) to check the kernels finish and count right; it times nothing.

    python benchmarks/barrier_bench.py --json OUT.json [--programs 32 64 132] [--rounds 2000]
"""
import argparse
import datetime
import json
import sys

import torch
import triton
import triton.language as tl

from lstmgru._kernels import _launch
from lstmgru._kernels.split import _FLAG_STRIDE, _MAX_SPINS, _publish, _wait


@triton.jit
def _flags_kernel(flag_ptr, err_ptr, rounds, max_spins, P, FLAG_STRIDE: tl.constexpr,
                  P_PAD: tl.constexpr):
    pid = tl.program_id(0)
    spins = max_spins
    for r in range(1, rounds + 1):
        _publish(flag_ptr, pid, FLAG_STRIDE)
        spins = _wait(flag_ptr, 0, P, r, spins, err_ptr, r, FLAG_STRIDE, P_PAD)


@triton.jit
def _counter_kernel(count_ptr, err_ptr, rounds, max_spins, P):
    spins_left = max_spins
    for r in range(1, rounds + 1):
        tl.debug_barrier()
        tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")
        seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        spins = 0
        while (seen < P * r) & (spins < spins_left):
            seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
            spins += 1
        if seen < P * r:
            tl.atomic_max(err_ptr, r)
            spins_left = 0
        tl.debug_barrier()


def run(scheme: str, programs: int, rounds: int, device) -> torch.Tensor:
    """One launch; returns the sync state after it (for checking)."""
    err = torch.zeros(1, dtype=torch.int32, device=device)
    meta = {"launch_cooperative_grid": True} if device.type == "cuda" else {}
    if scheme == "flags":
        state = torch.zeros(programs, _FLAG_STRIDE, dtype=torch.int32, device=device)
        _launch.launch(_flags_kernel, (programs,), state, err, rounds, _MAX_SPINS, programs,
                       FLAG_STRIDE=_FLAG_STRIDE, P_PAD=triton.next_power_of_2(programs),
                       num_warps=4, **meta)
    else:
        state = torch.zeros(1, dtype=torch.int32, device=device)
        _launch.launch(_counter_kernel, (programs,), state, err, rounds, _MAX_SPINS, programs,
                       num_warps=4, **meta)
    if int(err.item()):
        raise RuntimeError(f"{scheme}, P={programs}: a wait timed out at round {int(err.item())}")
    return state


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--programs", type=int, nargs="+", default=[32, 64, 132])
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--smoke", action="store_true", help="tiny run in the interpreter, no timing")
    args = p.parse_args()
    if args.smoke:
        for scheme in ("flags", "counter"):
            state = run(scheme, 1, 3, torch.device("cpu"))
            expected = 3 if scheme == "flags" else 3
            assert int(state.flatten()[0]) == expected, (scheme, state)
        print("smoke: both schemes finish and count right in the interpreter")
        return 0
    if not torch.cuda.is_available():
        print("barrier_bench: needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rows = []
    for P in args.programs:
        if P > sms:
            rows.append({"programs": P, "skipped": f"more programs than the {sms} SMs"})
            continue
        for scheme in ("flags", "counter"):
            state = run(scheme, P, args.rounds, device)  # warm-up, compile, and a check
            total = int(state.sum()) if scheme == "flags" else int(state.item())
            assert total == P * args.rounds, (scheme, P, total)
            ms = triton.testing.do_bench(lambda: run(scheme, P, args.rounds, device),
                                         warmup=5, rep=200)
            rows.append({"scheme": scheme, "programs": P, "rounds": args.rounds,
                         "us_per_sync": ms * 1e3 / args.rounds})
            print(f"{scheme:8s} P={P:4d}: {ms * 1e3 / args.rounds:.3f} us per sync")
    meta = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.datetime.now().isoformat()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
