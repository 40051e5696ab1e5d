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

Points are P programs of W warps each (``P:W``; a bare P has ``--warps``). The default list
includes 96:8, the split kernels' layout at the published point (B=16, H=768, fp16 LSTM on a
132-SM H100/H200: 96 slices of 8 units, 8 warps each); a poll by more warps costs more.
benchmarks/gpu_check.py measures the published point's P and the full SM count, both with the
warp count the kernels use there.

    python benchmarks/barrier_bench.py --json OUT.json [--programs 32 64 96:8 132] [--rounds 2000]
"""
import argparse
import datetime
import inspect
import json
import sys

import torch
import triton
import triton.language as tl

from lstmgru._kernels import _launch, split
from lstmgru._kernels.split import _FLAG_STRIDE, _MAX_SPINS, _publish, _wait

# Where the split kernels' wait takes a poll form (the POLL constexpr: an acquire-load spin on
# the GPU, acquire atomics in the interpreter), the benchmark passes the one the kernels use,
# so that it measures their own poll.
_WAIT_TAKES_POLL = "POLL" in inspect.signature(getattr(_wait, "fn", _wait)).parameters


@triton.jit
def _flags_kernel(flag_ptr, err_ptr, rounds, max_spins, P, FLAG_STRIDE: tl.constexpr,
                  P_PAD: tl.constexpr, WAIT_TAKES_POLL: tl.constexpr, POLL: tl.constexpr):
    pid = tl.program_id(0)
    spins = max_spins
    for r in range(1, rounds + 1):
        _publish(flag_ptr, pid, FLAG_STRIDE)
        if WAIT_TAKES_POLL:  # a compile-time choice: only one of the calls is compiled
            spins = _wait(flag_ptr, 0, P, r, spins, err_ptr, r, FLAG_STRIDE, P_PAD, POLL)
        else:
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


SCHEMES = ("flags", "counter")


def run(scheme: str, programs: int, rounds: int, device, num_warps: int = 4) -> torch.Tensor:
    """One launch; returns the sync state after it (for checking)."""
    err = torch.zeros(1, dtype=torch.int32, device=device)
    meta = {"launch_cooperative_grid": True} if device.type == "cuda" else {}
    if scheme == "flags":
        state = torch.zeros(programs, _FLAG_STRIDE, dtype=torch.int32, device=device)
        _launch.launch(_flags_kernel, (programs,), state, err, rounds, _MAX_SPINS, programs,
                       FLAG_STRIDE=_FLAG_STRIDE, P_PAD=triton.next_power_of_2(programs),
                       WAIT_TAKES_POLL=_WAIT_TAKES_POLL,
                       POLL=split._poll_form() if _WAIT_TAKES_POLL else 0,
                       num_warps=num_warps, **meta)
    else:
        state = torch.zeros(1, dtype=torch.int32, device=device)
        _launch.launch(_counter_kernel, (programs,), state, err, rounds, _MAX_SPINS, programs,
                       num_warps=num_warps, **meta)
    if int(err.item()):
        raise RuntimeError(f"{scheme}, P={programs}: a wait timed out at round {int(err.item())}")
    return state


def check_count(scheme: str, state: torch.Tensor, programs: int, rounds: int) -> None:
    """Every program took part in every round: the sync state counts programs x rounds."""
    total = int(state.sum())
    if total != programs * rounds:
        raise AssertionError(f"{scheme}, P={programs}: the sync state counts {total}, "
                             f"expected {programs} x {rounds}")


def measure(scheme: str, programs: int, num_warps: int, rounds: int, device) -> float:
    """Microseconds per sync: one checked launch (which also compiles), then the median of
    repeated launches over ``rounds``."""
    check_count(scheme, run(scheme, programs, rounds, device, num_warps), programs, rounds)
    ms = triton.testing.do_bench(lambda: run(scheme, programs, rounds, device, num_warps),
                                 warmup=5, rep=200)
    return ms * 1e3 / rounds


def _point(text: str) -> tuple:
    programs, _, warps = text.partition(":")
    return int(programs), (int(warps) if warps else None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--programs", type=_point, nargs="+", metavar="P[:W]",
                   default=[(32, None), (64, None), (96, 8), (132, None)],
                   help="programs, each with its own warp count after a colon")
    p.add_argument("--warps", type=int, default=4, help="warps of a point given without one")
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--smoke", action="store_true", help="tiny run in the interpreter, no timing")
    args = p.parse_args()
    if args.smoke:
        for scheme in SCHEMES:
            check_count(scheme, run(scheme, 1, 3, torch.device("cpu")), 1, 3)
        print("smoke: both schemes finish and count right in the interpreter")
        return 0
    if not torch.cuda.is_available():
        print("barrier_bench: needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rows = []
    for P, warps in args.programs:
        warps = warps or args.warps
        if P > sms:
            rows.append({"programs": P, "warps": warps,
                         "skipped": f"more programs than the {sms} SMs"})
            continue
        for scheme in SCHEMES:
            us = measure(scheme, P, warps, args.rounds, device)
            rows.append({"scheme": scheme, "programs": P, "warps": warps, "rounds": args.rounds,
                         "us_per_sync": us})
            print(f"{scheme:8s} P={P:4d} warps={warps}: {us:.3f} us per sync")
    meta = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.datetime.now().isoformat()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
