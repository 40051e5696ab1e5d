#!/usr/bin/env python
"""Per-call cost of small calls: cells and T=1 layer calls, the step-by-step rollouts of RL
acting, decoding and sampled forecasts, against torch.nn's plain call.

    python benchmarks/step_bench.py                  # CPU, one thread, about two minutes
    python benchmarks/step_bench.py --device cuda    # the same on the GPU
    python benchmarks/step_bench.py --tiny --no-save # smoke test, seconds

Cases (H = I = 64 unless --size): ``LSTMCell``/``GRUCell`` at B = 1, 8, 64; ``LSTM``/``GRU``
layer calls with T=1 at the same B, and with T=16 (for resets that all fall at t=0). Each
call passes the state in (``hx``), as a rollout does. Forward only, under ``torch.no_grad()``
(acting), modules in training mode (so the dropout-like variants are in force).

Contenders per case, each timed as the median over interleaved rounds of the mean of a block
of calls (a block lasts a few milliseconds; the contenders take turns block by block; on the
CPU the clock is the thread's CPU time, which on a shared machine leaves out waiting for a
core):
  nn                 torch.nn's plain call: the baseline
  plain              lstmgru, no variant (auto)
  reset              ``reset=`` with about half the rows reset (B=1: the row); with T=16 only
                     at t=0 ("reset_t0"), and anywhere ("reset_any", the reference recurrence)
  layer_norm, zoneout, recurrent_dropout, weight_drop
                     lstmgru with that variant (``zoneout=0.1``, the others 0.25)
The ratio is the contender's time over nn's (lower is better). Results:
benchmarks/results/step-<device>-<date>.{json,md} with device, versions, commit, date and the
load average before and after.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (DEFAULT_OUT_DIR, _loadavg, device_name, git_commit,  # noqa: E402
                   import_lstmgru, triton_version)

lstmgru = import_lstmgru()

VARIANT_OPTIONS = {
    "layer_norm": {"layer_norm": True},
    "zoneout": {"zoneout": 0.1},
    "recurrent_dropout": {"recurrent_dropout": 0.25},
    "weight_drop": {"weight_drop": 0.25},
}
GOALS = {"plain": 1.10, "reset": 1.10, "reset_t0": 1.10, "layer_norm": 2.0, "zoneout": 2.0,
         "recurrent_dropout": 2.0}


def _cases(args):
    cases = []
    for cell in ("LSTMCell", "GRUCell"):
        cases += [{"cell": cell, "batch": b, "steps": None} for b in args.batch]
    for cell in ("LSTM", "GRU"):
        cases += [{"cell": cell, "batch": b, "steps": 1} for b in args.batch]
        cases += [{"cell": cell, "batch": b, "steps": args.long_steps} for b in args.batch[-1:]]
    return cases


def _contender_names(case):
    if case["steps"] is not None and case["steps"] > 1:
        return ["nn", "plain", "reset_t0", "reset_any"]
    return ["nn", "plain", "reset"] + list(VARIANT_OPTIONS)


def _make_calls(case, size, device, seed):
    """{contender: a no-argument function doing one call}; all modules on the same weights."""
    cell, batch, steps = case["cell"], case["batch"], case["steps"]
    factory = {"device": device}
    torch.manual_seed(seed)
    reference = getattr(nn, cell)(size, size, **factory)
    state = reference.state_dict()

    def ours(**options):
        module = getattr(lstmgru, cell)(size, size, **factory, **options)
        module.load_state_dict(state, strict=False)  # layer-norm parameters stay at 1 and 0
        return module.train()

    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    randn = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    rows = torch.rand(batch, generator=g) < 0.5
    rows[0] = True
    if steps is None:
        x = randn(batch, size)
        hx = (randn(batch, size), randn(batch, size)) if cell == "LSTMCell" else randn(batch, size)
        reset = rows.to(device)
    else:
        x = randn(steps, batch, size)
        h = randn(1, batch, size)
        hx = (h, randn(1, batch, size)) if cell == "LSTM" else h
        reset = torch.zeros(steps, batch, dtype=torch.bool)
        reset[0] = rows
        reset_any = reset.clone()
        reset_any[steps // 2] = rows
        reset, reset_any = reset.to(device), reset_any.to(device)

    plain = ours()
    calls = {"nn": lambda: reference(x, hx), "plain": lambda: plain(x, hx)}
    if steps is not None and steps > 1:
        calls["reset_t0"] = lambda: plain(x, hx, reset=reset)
        calls["reset_any"] = lambda: plain(x, hx, reset=reset_any)
        return calls
    calls["reset"] = lambda: plain(x, hx, reset=reset)
    for name, options in VARIANT_OPTIONS.items():
        module = ours(**options)
        calls[name] = lambda module=module: module(x, hx)
    return calls


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(device):
    # On the CPU with one thread, the thread's CPU time: the same as the wall time on a quiet
    # machine, and on a shared one it leaves out the time the thread waits for a core. CUDA
    # work is asynchronous to the thread: wall time there.
    return time.perf_counter if device.type == "cuda" else time.thread_time


def _time_block(call, calls_per_block, device) -> float:
    """Mean seconds of one call over a block of calls."""
    clock = _clock(device)
    _sync(device)
    start = clock()
    for _ in range(calls_per_block):
        call()
    _sync(device)
    return (clock() - start) / calls_per_block


def bench_case(case, args, device):
    calls = _make_calls(case, args.size, device, args.seed)
    names = [n for n in _contender_names(case) if n in calls]
    with torch.no_grad():
        for name in names:  # warm-up: first-call costs (caches, allocations)
            for _ in range(5):
                calls[name]()
        # A block lasts about --block-ms for the baseline.
        per_call = _time_block(calls["nn"], 20, device)
        calls_per_block = max(1, int(args.block_ms * 1e-3 / per_call))
        samples = {name: [] for name in names}
        for round_index in range(args.rounds):
            # Rotate the order every round, so that no contender always follows another.
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(_time_block(calls[name], calls_per_block, device))
    medians = {name: statistics.median(v) for name, v in samples.items()}
    implementation = {}
    for name in names:  # what ran (auto's choice), recorded outside the timed region
        implementation[name] = _implementation_of(calls[name])
    record = dict(case)
    record["calls_per_block"] = calls_per_block
    record["us"] = {name: round(medians[name] * 1e6, 3) for name in names}
    record["ratio"] = {name: round(medians[name] / medians["nn"], 3) for name in names
                       if name != "nn"}
    record["implementation"] = implementation
    return record


def _implementation_of(call) -> str:
    """The lstmgru implementation a call ran on (the registry's choice), or "torch.nn"."""
    chosen = []
    original = lstmgru.backends.select

    def noting(case):
        implementation = original(case)
        chosen.append(implementation.name)
        return implementation

    lstmgru.backends.select = noting
    try:
        with torch.no_grad():
            call()
    finally:
        lstmgru.backends.select = original
    return chosen[0] if chosen else "torch.nn"


def _label(record) -> str:
    steps = "cell" if record["steps"] is None else f"T={record['steps']}"
    return f"{record['cell']} {steps} B={record['batch']}"


def render_markdown(meta, records) -> str:
    columns = []
    for record in records:
        columns += [n for n in record["ratio"] if n not in columns]
    lines = [
        f"# Small calls: lstmgru against torch.nn ({meta['device']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}, "
        f"threads {meta['threads']}, commit {meta['commit']}, {meta['date']}, "
        f"load average {meta['loadavg_start']} before, {meta['loadavg_end']} after.",
        f"H = I = {meta['size']}; forward with the state passed in, no_grad, training mode; "
        f"medians of {meta['rounds']} interleaved rounds of call blocks (~{meta['block_ms']} ms), "
        f"clock {meta['clock']}.",
        "Ratios: time / torch.nn's plain call (lower is better); goals: plain and resets at "
        "t=0 <= 1.10x, layer_norm/zoneout/recurrent_dropout <= 2x.",
        "",
        "| case | nn µs | " + " | ".join(columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for record in records:
        cells = []
        for name in columns:
            ratio = record["ratio"].get(name)
            cells.append("" if ratio is None else f"{ratio:.2f}x")
        lines.append(f"| {_label(record)} | {record['us']['nn']:.1f} | " + " | ".join(cells)
                     + " |")
    lines += ["", "Implementation auto ran: " + "; ".join(
        f"{_label(r)}: " + ", ".join(f"{n}={i}" for n, i in r["implementation"].items()
                                     if n != "nn") for r in records[:1]) + " (all cases: JSON)."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--size", type=int, default=64, help="input and hidden size")
    p.add_argument("--long-steps", type=int, default=16, help="T of the reset-at-t=0 case")
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--block-ms", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a smoke test: few rounds, B=1 and 8")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    p.add_argument("--name", default=None, help="results file name (without extension)")
    args = p.parse_args(argv)
    if args.tiny:
        args.rounds, args.block_ms, args.batch, args.long_steps = 3, 0.5, [1, 8], 4
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    meta = {
        "device": device_name(device), "torch": torch.__version__, "triton": triton_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "lstmgru": lstmgru.__version__,
        "threads": torch.get_num_threads(), "size": args.size, "rounds": args.rounds,
        "block_ms": args.block_ms, "backend": lstmgru.get_backend(), "argv": sys.argv[1:],
        "clock": _clock(device).__name__,
        "loadavg_start": _loadavg(),
    }
    records = []
    for case in _cases(args):
        record = bench_case(case, args, device)
        records.append(record)
        print(f"{_label(record):24s} nn {record['us']['nn']:8.1f} us  " + "  ".join(
            f"{n} {r:.2f}x" for n, r in record["ratio"].items()), flush=True)
    meta["loadavg_end"] = _loadavg()
    markdown = render_markdown(meta, records)
    print(markdown)
    if not args.no_save:
        name = args.name or (f"step-{device.type}-{args.threads}thread-"
                             f"{_dt.date.today().strftime('%Y%m%d')}")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{name}.json").write_text(
            json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
        (args.out_dir / f"{name}.md").write_text(markdown)
        print(f"wrote {args.out_dir / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
