"""Measure this GPU: where our kernels beat torch's cuDNN kernel, written as the table that
``auto`` reads (``lstmgru.calibration`` documents the table and the buckets).

    python -m lstmgru.calibrate                  # writes the user cache auto reads
    python -m lstmgru.calibrate --output FILE    # writes FILE instead (merged into it)
    python -m lstmgru.calibrate --dry-run        # CPU, tiny shapes: the kernels in Triton's
                                                 # interpreter, torch's CPU kernel standing in
                                                 # for cuDNN (prints the table unless --output)

For each bucket (cell, dtype, hidden size, batch) it times ``native`` (cuDNN),
``triton-tiled`` and ``triton-split`` on one layer at the bucket's representative size: the
forward under no_grad, and forward plus backward; medians of interleaved runs (the order
rotates every round), CUDA events on the GPU. A kernel whose output disagrees with cuDNN's, or
which fails or refuses the case, gets no ratio, so auto never prefers it there. The table is
rewritten after every bucket, so an interrupted run keeps what it measured; ``--max-seconds``
stops starting buckets after that long. The default grid (3 dtypes x 6 hidden sizes x 4 batch
sizes x 2 cells, T=256) compiles many kernels: expect tens of minutes on a GPU. It runs the
most used buckets first (float16, hidden 768, batch 16), so a run cut short has those.
A bucket torch's kernel cannot run is skipped: auto does not take torch's kernel there anyway.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import calibration

CONTENDERS = ("native",) + calibration.KERNELS
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# How far a kernel's forward output may be from cuDNN's before it counts as disagreeing,
# relative to the output's largest magnitude: a sanity gate, not the tests' accuracy check
# (fp32 may run TF32 products on both sides, as torch.backends.cudnn.rnn.fp32_precision says).
AGREEMENT = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}
# Tiny: the interpreter runs every program of every step in Python. Hidden 8 keeps the split
# family at one program, which the interpreter (one program after another) can run.
DRY_RUN = dict(cells=["LSTM", "GRU"], dtypes=["float32"], hidden=[8], batch=[2], seq_len=3,
               repeats=2)


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lstmgru.calibrate",
        description="Time lstmgru's Triton kernels against torch's cuDNN kernel on this GPU and "
                    "write the calibration table that backend 'auto' reads.")
    parser.add_argument("--output", type=Path, default=None,
                        help="table to write (merged into it if it exists); default: the user "
                             f"cache, {calibration.user_cache_path()}")
    parser.add_argument("--dry-run", action="store_true",
                        help="run on the CPU with tiny shapes (the kernels in Triton's "
                             "interpreter, torch's CPU kernel standing in for cuDNN); prints "
                             "the table unless --output is given")
    parser.add_argument("--cells", nargs="+", choices=calibration.CELLS, default=None)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--hidden", nargs="+", type=int, default=None,
                        help="hidden sizes to measure (each stands for its bucket); default: "
                             "768 1024 512 256 128 2048")
    parser.add_argument("--batch", nargs="+", type=int, default=None,
                        help="batch sizes to measure; default: 16 64 4 256")
    parser.add_argument("--seq-len", type=int, default=None, help="steps per call (256)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (7)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no bucket after this many seconds")
    args = parser.parse_args(argv)
    defaults = DRY_RUN if args.dry_run else dict(
        cells=list(calibration.CELLS), dtypes=["float16", "bfloat16", "float32"],
        hidden=[768, 1024, 512, 256, 128, 2048], batch=[16, 64, 4, 256],
        seq_len=256, repeats=7)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds one call of ``fn`` takes: CUDA events on the GPU, the clock on the CPU."""
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
    return timed


def _versions(device: torch.device) -> Dict[str, object]:
    import triton  # present: the kernels need it

    versions: Dict[str, object] = {"torch": torch.__version__, "triton": triton.__version__,
                                   "cudnn": torch.backends.cudnn.version()
                                   if device.type == "cuda" else None}
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and hasattr(rnn, "fp32_precision"):
        versions["cudnn_rnn_fp32_precision"] = rnn.fp32_precision
    return versions


def _device_fields(device: torch.device) -> Dict[str, object]:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}
    return {"device": "cpu (dry run: Triton's interpreter against torch's CPU kernel)",
            "capability": None}


def measure(cell: str, dtype: torch.dtype, hidden: int, batch: int, seq_len: int,
            repeats: int, device: torch.device) -> Tuple[Optional[dict], str]:
    """One bucket's entry (without the device fields): every contender's medians and ratios;
    or None and why, where torch's kernel cannot run the bucket (nothing to compare with)."""
    import lstmgru
    from lstmgru import backends

    torch.manual_seed(0)
    module = getattr(lstmgru, cell)(hidden, hidden, device=device, dtype=dtype)
    x = torch.randn(seq_len, batch, hidden, device=device, dtype=dtype)
    grad = torch.randn(seq_len, batch, hidden, device=device, dtype=dtype)
    case = backends.Case(cell, device.type, dtype, hidden, batch)

    def forward():
        with torch.no_grad():
            return module(x)[0]

    def training():
        module(x)[0].backward(grad)

    kernels: Dict[str, dict] = {}
    runnable = []
    expected = None
    for name in CONTENDERS:
        try:
            reason = backends.supports(name, case)
        except Exception as error:  # the split family asks the device; report, don't stop
            reason = f"{type(error).__name__}: {error}"
        if reason is not None:
            if name == "native":
                return None, f"torch's kernel cannot run it: {reason}"
            kernels[name] = {"refused": reason}
            continue
        try:
            with lstmgru.use_backend(name):
                out = forward().float()  # also the warm-up: compiles the kernels
                training()
                training()
        except Exception as error:
            if name == "native":  # then auto does not take it either (the native probe)
                return None, f"torch's kernel failed: {type(error).__name__}: {error}"
            kernels[name] = {"failed": f"{type(error).__name__}: {error}"}
            continue
        if expected is None:
            expected = out
        else:
            scale = expected.abs().max().item() or 1.0
            error = (out - expected).abs().max().item() / scale
            if not error <= AGREEMENT[dtype]:
                kernels[name] = {"disagrees": f"max |y - cuDNN's y| / max |y| = {error:.3g} > "
                                              f"{AGREEMENT[dtype]}"}
                continue
        runnable.append(name)

    timed = _timer(device)
    times: Dict[str, Dict[str, List[float]]] = {n: {"forward": [], "training": []}
                                               for n in runnable}
    for round_ in range(repeats):
        shift = round_ % len(runnable)
        for name in runnable[shift:] + runnable[:shift]:  # rotate: no contender always first
            with lstmgru.use_backend(name):
                times[name]["forward"].append(timed(forward))
                times[name]["training"].append(timed(training))
    medians = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    native = medians["native"]
    for name in runnable:
        if name == "native":
            continue
        mine = medians[name]
        kernels[name] = {"forward_ms": round(mine["forward"], 5),
                         "training_ms": round(mine["training"], 5),
                         "forward_ratio": round(mine["forward"] / native["forward"], 4),
                         "training_ratio": round(mine["training"] / native["training"], 4)}
    return {"cell": cell, "dtype": str(dtype).replace("torch.", ""),
            "hidden": list(calibration.bucket_of(hidden, calibration.HIDDEN_BUCKETS)),
            "batch": list(calibration.bucket_of(batch, calibration.BATCH_BUCKETS)),
            "measured_at": {"hidden": hidden, "batch": batch, "seq_len": seq_len,
                            "repeats": repeats},
            "native_ms": {k: round(v, 5) for k, v in native.items()},
            "kernels": kernels}, ""


def _write(path: Path, table: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(partial, path)  # a reader never sees half a table


def _summary_line(entry: dict) -> str:
    parts = []
    for name, result in entry["kernels"].items():
        if "forward_ratio" in result:
            parts.append(f"{name} {result['forward_ratio']:.2f}x/{result['training_ratio']:.2f}x")
        else:
            parts.append(f"{name} {next(iter(result))}")
    at = entry["measured_at"]
    return (f"{entry['cell']:4} {entry['dtype']:8} H{at['hidden']:<5} B{at['batch']:<4} "
            f"native {entry['native_ms']['forward']:.3f}/{entry['native_ms']['training']:.3f} ms "
            f"| {', '.join(parts)} | auto: {calibration.fastest_kernel(entry) or 'native'}")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            # Triton fixes interpreter or compiler when it is imported (importing lstmgru may
            # have done that already): run again in a process that has the interpreter on.
            argv = sys.argv[1:] if argv is None else list(argv)
            return subprocess.call([sys.executable, "-m", "lstmgru.calibrate", *argv],
                                   env=dict(os.environ, TRITON_INTERPRET="1"))
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("python -m lstmgru.calibrate: no CUDA device (use --dry-run to try it on the CPU)",
              file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    output = args.output if args.output is not None or args.dry_run else \
        calibration.user_cache_path()

    table = calibration.empty_table(
        "Measured by python -m lstmgru.calibrate; lstmgru/calibration.py documents the schema.")
    if output is not None and output.exists():
        try:
            table["entries"] = calibration.read_file(output)
        except (OSError, ValueError) as error:
            print(f"not merging into {output} ({error}); it will be replaced", file=sys.stderr)
    common = dict(_device_fields(device), versions=_versions(device),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    started = time.monotonic()
    measured = 0
    # The most used buckets first (the defaults' order), so that a run cut short has them.
    grid = [(cell, dtype_name, hidden, batch) for dtype_name in args.dtypes
            for hidden in args.hidden for batch in args.batch for cell in args.cells]
    for cell, dtype_name, hidden, batch in grid:
        if args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
            print(f"stopping after {args.max_seconds} s ({measured} of {len(grid)} buckets)",
                  file=sys.stderr)
            break
        entry, why_not = measure(cell, DTYPES[dtype_name], hidden, batch, args.seq_len,
                                 args.repeats, device)
        if entry is None:
            print(f"{cell:4} {dtype_name:8} H{hidden:<5} B{batch:<4} skipped: {why_not}",
                  flush=True)
            continue
        entry = dict(common, **entry)
        table["entries"] = calibration.merge(table["entries"], [entry])
        measured += 1
        print(_summary_line(entry), flush=True)
        if output is not None:
            _write(output, table)
    return _finish(table, output)


def _finish(table: dict, output: Optional[Path]) -> int:
    if output is None:
        print(json.dumps(table, indent=1))
    else:
        _write(output, table)
        print(f"wrote {output} ({len(table['entries'])} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
