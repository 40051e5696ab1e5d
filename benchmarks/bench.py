#!/usr/bin/env python
"""Benchmark lstmgru.LSTM / lstmgru.GRU against torch.nn on the device at hand.

Baseline: torch.nn.LSTM / torch.nn.GRU on the same device ("cudnn" on CUDA, "torch-cpu" on CPU),
holding the SAME weights (ours.load_state_dict(ref.state_dict())) and fed the SAME random inputs.

Timing (DESIGN.md section 7): warm up, then interleave the contenders (ours, baseline, ours,
baseline, ...) for N rounds and report the median of each. Every timed region holds exactly one call
of one contender: perf_counter on CPU, a CUDA event pair with a synchronize on each side on CUDA.
N adapts to the cost of one round and the per-config time budget.

Outputs (in --out-dir, default benchmarks/runs/, which git ignores; file stem --name):
  NAME.json  {"meta": {...}, "records": [...]}, rewritten after every config so that a killed run
             still leaves its finished records behind
  NAME.md    one row per record + geometric-mean / worst-case summary (also printed to stdout)
  NAME.png   speedup per config grouped by op/mode (skipped, with a note, without matplotlib)

Examples:
  python benchmarks/bench.py                                  # default preset, ~1-2 min on 2 CPU cores
  python benchmarks/bench.py --preset cpu                     # CPU parity grid (~10 min on 2 cores)
  python benchmarks/bench.py --preset gpu --total-budget 300  # H100 grid
  python benchmarks/bench.py --op lstm --mode training --batch 1 16 --sizes 64:128 --seq-len 100
  python benchmarks/bench.py --preset gpu --list              # print the configs, run nothing
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# Git-ignored, so that a run leaves a clone clean; results meant to be kept are written to
# benchmarks/results/ with --out-dir and committed.
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "runs"

META_KEYS = ("device", "torch", "triton", "cudnn", "commit", "date")
RECORD_KEYS = (
    "op", "mode", "dtype", "batch", "seq_len", "input_size", "hidden_size", "num_layers",
    "bidirectional", "ours_ms", "baseline_ms", "baseline", "speedup",
)
SHAPE_KEYS = ("batch", "seq_len", "input_size", "hidden_size", "num_layers", "bidirectional")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF_DTYPES = ("float16", "bfloat16")

# ---------------------------------------------------------------------------------------------
# Presets. "axes" are crossed (sizes is a list of (input_size, hidden_size) pairs); "extra" are
# additional shapes, each crossed with the op/mode/dtype axes only. CLI grid flags replace axes;
# overriding any shape axis drops the extras. Budgets are seconds.
# ---------------------------------------------------------------------------------------------
PRESETS = {
    # Small: exercises both ops and modes, 1 and 2 layers, both directions. ~1-2 min on 2 CPU cores.
    "default": {
        "axes": {
            "op": ["lstm", "gru"], "mode": ["inference", "training"], "dtype": ["float32"],
            "batch": [1, 32], "seq_len": [50], "sizes": [(32, 64), (128, 128)],
            "num_layers": [1], "bidirectional": [False],
        },
        "extra": [
            # the seed article's case
            {"batch": 32, "seq_len": 10, "input_size": 1, "hidden_size": 50, "num_layers": 1,
             "bidirectional": False},
            {"batch": 8, "seq_len": 20, "input_size": 32, "hidden_size": 64, "num_layers": 2,
             "bidirectional": True},
        ],
        "budget": 2.0, "total_budget": 45.0,
    },
    # CPU grid: 3 x 3 x 4 shapes + seed case, x 3 ops x 2 modes = 222 configs, ~12 min.
    "cpu": {
        "axes": {
            "op": ["lstm", "gru", "gru_original"], "mode": ["inference", "training"], "dtype": ["float32"],
            "batch": [1, 8, 64], "seq_len": [10, 50, 200],
            "sizes": [(1, 50), (32, 64), (128, 128), (256, 256)],
            "num_layers": [1], "bidirectional": [False],
        },
        "extra": [
            {"batch": 32, "seq_len": 10, "input_size": 1, "hidden_size": 50, "num_layers": 1,
             "bidirectional": False},
        ],
        "budget": 5.0, "total_budget": 720.0,
    },
    # GPU grid: 2 ops x 4 B x 4 H x 3 dtypes x 2 modes = 192 configs at T=512. dtype is the
    # outer loop (bf16 first) so that a deadline cuts fp32 before the low-precision headline cases.
    "gpu": {
        "axes": {
            "dtype": ["bfloat16", "float16", "float32"], "op": ["lstm", "gru"],
            "mode": ["inference", "training"],
            "sizes": [(128, 128), (256, 256), (512, 512), (1024, 1024)],
            "batch": [1, 16, 64, 256], "seq_len": [512],
            "num_layers": [1], "bidirectional": [False],
        },
        "extra": [],
        "budget": 2.0, "total_budget": None,
    },
}
AXIS_ORDER_DEFAULT = ("op", "mode", "dtype", "sizes", "batch", "seq_len", "num_layers", "bidirectional")


# ---------------------------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------------------------
def note(msg: str) -> None:
    """Diagnostics go to stderr; stdout carries only the final Markdown."""
    Progress.clear_line()
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _str2bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "y", "bi", "bidirectional"):
        return True
    if v in ("0", "false", "no", "n", "uni", "unidirectional"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {s!r}")


def _size_pair(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[:x,]\s*(\d+)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"expected INPUT:HIDDEN, e.g. 32:64, got {s!r}")
    return int(m.group(1)), int(m.group(2))


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _fmt_s(sec: float) -> str:
    sec = max(0, int(round(sec)))
    return f"{sec // 60}m{sec % 60:02d}s" if sec >= 60 else f"{sec}s"


def config_label(c: dict, short: bool = False) -> str:
    direction = "bi" if c["bidirectional"] else "uni"
    shape = f"B={c['batch']} T={c['seq_len']} I={c['input_size']} H={c['hidden_size']}"
    if c["num_layers"] != 1 or c["bidirectional"] or not short:
        shape += f" L={c['num_layers']} {direction}"
    if short:
        return shape
    return f"{c['op']} {c['mode']} {c['dtype']} {shape}"


class Progress:
    """A one-line progress bar on stderr ('\\r'-redrawn on a terminal, one line per step in logs)."""

    _active = False

    def __init__(self, total: int, width: int = 24):
        self.total, self.width, self.t0 = total, width, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, index: int, label: str) -> None:
        done = index  # configs finished before this one
        frac = done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.t0
        eta = f" eta {_fmt_s(elapsed / done * (self.total - done))}" if done else ""
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {index + 1}/{self.total} "
                f"{_fmt_s(elapsed)}{eta} | {label}")
        if self.tty:
            cols = 160
            with contextlib.suppress(OSError):
                cols = os.get_terminal_size(sys.stderr.fileno()).columns
            sys.stderr.write("\r\x1b[K" + line[: max(20, cols - 1)])
            Progress._active = True
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self, done: int) -> None:
        Progress.clear_line()
        print(f"[bench] {done}/{self.total} configs measured in "
              f"{_fmt_s(time.perf_counter() - self.t0)}", file=sys.stderr, flush=True)

    @staticmethod
    def clear_line() -> None:
        if Progress._active:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            Progress._active = False


# ---------------------------------------------------------------------------------------------
# environment / metadata
# ---------------------------------------------------------------------------------------------
def import_lstmgru():
    """Import the package under test; fall back to the repo checkout when it is not installed."""
    try:
        import lstmgru  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        import lstmgru  # noqa: F401
    import lstmgru

    missing = [n for n in ("LSTM", "GRU", "use_backend") if not hasattr(lstmgru, n)]
    if missing:
        raise SystemExit(f"bench.py: lstmgru ({lstmgru.__file__}) lacks {', '.join(missing)}")
    return lstmgru


def cpu_name() -> str:
    name = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    if not name:
        name = platform.processor() or platform.machine() or "unknown CPU"
    return f"{name} ({os.cpu_count()} cores)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def triton_version() -> str | None:
    # Read the installed distribution instead of importing triton (importing has side effects,
    # e.g. TRITON_INTERPRET is read at import time).
    for dist in ("triton", "pytorch-triton", "triton-nightly"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return None


def cudnn_version() -> int | None:
    with contextlib.suppress(Exception):
        if torch.backends.cudnn.is_available():
            return torch.backends.cudnn.version()
    return None


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=20).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    try:
        # Untracked files count as dirty (a new kernel file changes behaviour), our own results do not.
        dirty = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("-dirty" if dirty else "")


def tf32_flags() -> dict:
    """Every TF32 setting torch has, read without raising.

    torch >= 2.9 keeps an fp32 precision per backend and op (``fp32_precision``: "ieee",
    "tf32" or "none", which inherits); cuDNN's RNN obeys ``torch.backends.cudnn.rnn``'s. The
    legacy ``cudnn.allow_tf32`` getter raises RuntimeError once the RNN and convolution
    settings differ, so it is recorded as the error it raised."""
    flags = {}
    for key, read in (("cuda_matmul_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                      ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32)):
        try:
            flags[key] = bool(read())
        except RuntimeError as error:
            flags[key] = f"raises: {str(error).splitlines()[0][:120]}"
    backends = torch.backends
    for key, obj in (("fp32_precision", backends),
                     ("cuda_matmul_fp32_precision", backends.cuda.matmul),
                     ("cudnn_fp32_precision", backends.cudnn),
                     ("cudnn_rnn_fp32_precision", getattr(backends.cudnn, "rnn", None)),
                     ("cudnn_conv_fp32_precision", getattr(backends.cudnn, "conv", None))):
        val = getattr(obj, "fp32_precision", None)
        if isinstance(val, str):
            flags[key] = val
    return flags


def _loadavg() -> list | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def build_meta(args, device: torch.device, lstmgru) -> dict:
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cudnn": cudnn_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # extras
        "device_type": device.type,
        "backend": args.backend,
        "lstmgru": getattr(lstmgru, "__version__", None),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "timing": ("cuda-events" if device.type == "cuda" else "perf_counter")
        + ", interleaved, median",
        "argv": sys.argv[1:],
        # a busy machine (other jobs) distorts timings; readers should see it
        "loadavg_start": _loadavg(),
        "complete": False,
        "errors": [],
        "skipped": [],
    }
    if device.type == "cuda":
        meta["tf32"] = tf32_flags()
        meta["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    return meta


# ---------------------------------------------------------------------------------------------
# grid
# ---------------------------------------------------------------------------------------------
def build_configs(args, device: torch.device) -> list[dict]:
    preset = PRESETS[args.preset]
    axes = {k: list(v) for k, v in preset["axes"].items()}
    extras = [dict(e) for e in preset["extra"]]

    shape_override = False
    for key in ("op", "mode", "dtype", "batch", "seq_len", "num_layers", "bidirectional"):
        val = getattr(args, key)
        if val is not None:
            axes[key] = list(dict.fromkeys(val))
            shape_override |= key not in ("op", "mode", "dtype")
    if args.sizes is not None:
        axes["sizes"] = list(dict.fromkeys(args.sizes))
        shape_override = True
    elif args.input_size is not None or args.hidden_size is not None:
        hidden = args.hidden_size or sorted({h for _, h in axes["sizes"]})
        inputs = args.input_size or [None]  # None: input_size = hidden_size
        axes["sizes"] = list(dict.fromkeys((i if i is not None else h, h)
                                           for h in hidden for i in inputs))
        shape_override = True
    if shape_override:
        extras = []

    if device.type == "cpu":
        dropped = [d for d in axes["dtype"] if d in HALF_DTYPES]
        if dropped:
            note(f"skipping {', '.join(dropped)} on CPU (half types are benchmarked on CUDA only)")
        axes["dtype"] = [d for d in axes["dtype"] if d not in HALF_DTYPES]

    order = [k for k in preset["axes"] if k in AXIS_ORDER_DEFAULT]
    configs = []
    for combo in itertools.product(*(axes[k] for k in order)):
        c = dict(zip(order, combo))
        i, h = c.pop("sizes")
        c["input_size"], c["hidden_size"] = i, h
        configs.append(c)
    for e in extras:
        for op, mode, dtype in itertools.product(axes["op"], axes["mode"], axes["dtype"]):
            configs.append({"op": op, "mode": mode, "dtype": dtype, **e})

    out, seen = [], set()
    for c in configs:
        c = {k: c[k] for k in ("op", "mode", "dtype") + SHAPE_KEYS}
        key = tuple(c.values())
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# one config
# ---------------------------------------------------------------------------------------------
def _call_noting_rnn_impl(fn):
    """Run fn() once and return (its result, which RNN implementation ran): torch's "cudnn",
    "mkldnn" or "native" (ATen's own loop), or lstmgru's "lstmgru-reference" or
    "lstmgru-triton".

    torch silently leaves cuDNN for cases it does not accept (e.g. bf16 on older cuDNN); a
    baseline named "cudnn" that is not cuDNN must at least be visible in the record, and so
    must what lstmgru's `auto` chose. The ops are seen through a TorchDispatchMode, on the
    (untimed) first call of each contender."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(f"{func.namespace}::{func.overloadpacket.__name__}")
            return func(*args, **(kwargs or {}))

    try:
        with _Ops() as ops:
            out = fn()
    except Exception as exc:  # diagnostics only: the call is repeated without the mode below
        note(f"could not trace the RNN kernels ({type(exc).__name__}: {exc})")
        return fn(), "unknown"
    ours = [n for n in ops.names if n.startswith("lstmgru::")]
    if ours:
        return out, ("lstmgru-reference" if any("reference" in n for n in ours)
                     else "lstmgru-triton")
    if any("cudnn_rnn" in n for n in ops.names):
        return out, "cudnn"
    if any("mkldnn_rnn" in n for n in ops.names):
        return out, "mkldnn"
    return out, "native"


def _make_pair(lstmgru, c: dict, device: torch.device, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    ref_cls = torch.nn.LSTM if c["op"] == "lstm" else torch.nn.GRU
    ours_cls = lstmgru.LSTM if c["op"] == "lstm" else lstmgru.GRU
    kw = dict(input_size=c["input_size"], hidden_size=c["hidden_size"],
              num_layers=c["num_layers"], bidirectional=c["bidirectional"])
    ref = ref_cls(**kw).to(device=device, dtype=dtype)
    # gru_original: our original GRU (reset_after=False, which torch cannot compute) against
    # torch's GRU of the same size: what the original form costs a user, not a parity check.
    ours_kw = dict(kw, reset_after=False) if c["op"] == "gru_original" else kw
    ours = ours_cls(**ours_kw).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())  # same weights, by name
    return ours, ref


def _make_inputs(c: dict, device: torch.device, dtype: torch.dtype, seed: int):
    # drawn on the device itself: the GPU grid's largest inputs have 10^8 elements
    g = torch.Generator(device=device).manual_seed(seed + 1)
    T, B, I, H = c["seq_len"], c["batch"], c["input_size"], c["hidden_size"]
    D = 2 if c["bidirectional"] else 1

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    x = randn(T, B, I)
    h0 = randn(c["num_layers"] * D, B, H)
    hx = (h0, randn(c["num_layers"] * D, B, H)) if c["op"] == "lstm" else h0
    w = randn(T, B, D * H)  # fixed loss weights: every output element weighted differently
    return x, hx, w


def _make_step(module: torch.nn.Module, mode: str, x, hx, w):
    if mode == "inference":
        def step():
            with torch.no_grad():
                return module(x, hx)[0]
        return step, (lambda: None)

    xg = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        y = module(xg, hx)[0]
        (y * w).sum().backward()
        return y

    def reset():  # outside the timed region
        xg.grad = None
        for p in params:
            p.grad = None

    return step, reset


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def time(self, step, reset) -> float:
        """Milliseconds of one call of `step`, alone in its timed region."""
        reset()
        if self.cuda:
            torch.cuda.synchronize()
            self.start.record()
            step()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3


def measure_interleaved(contenders: dict, timer: _Timer, budget: float, warmup: int,
                        min_rounds: int, max_rounds: int) -> dict:
    """Milliseconds of each contender's calls, {name: [ms, ...]}, from interleaved rounds.

    ``contenders`` maps a name to ``(step, reset)``; each has been called once already
    (compiled, allocated). Timed warm-up rounds come first, the last of them the cost
    estimate (cut short for expensive contenders); then as many rounds as ``budget`` seconds
    allow, within ``min_rounds`` .. ``max_rounds``, each calling every contender once in turn."""
    t0 = time.perf_counter()
    for _ in range(max(1, warmup - 1)):
        est = {name: timer.time(st, rs) for name, (st, rs) in contenders.items()}
        if time.perf_counter() - t0 > 0.25 * budget:
            break
    round_ms = max(1e-3, sum(est.values()))
    rounds = max(min_rounds, min(max_rounds, int(budget * 1e3 / round_ms)))

    times = {name: [] for name in contenders}
    for _ in range(rounds):  # interleaved: ours, baseline, ours, baseline, ...
        for name, (step, reset) in contenders.items():
            times[name].append(timer.time(step, reset))
    return times


def bench_config(lstmgru, c: dict, device: torch.device, args, budget: float) -> dict:
    dtype = DTYPES[c["dtype"]]
    ours, ref = _make_pair(lstmgru, c, device, dtype, args.seed)
    for m in (ours, ref):
        m.train(c["mode"] == "training")
    if args.compile:
        # --compile: torch.compile(lstmgru) against eager torch.nn. A fresh dynamo state per
        # config, so that no config runs on a graph (or a recompile limit) left by another.
        torch._dynamo.reset()
        ours = torch.compile(ours)
    x, hx, w = _make_inputs(c, device, dtype, args.seed)
    contenders = {
        "ours": _make_step(ours, c["mode"], x, hx, w),
        "baseline": _make_step(ref, c["mode"], x, hx, w),
    }
    timer = _Timer(device)

    # first call of each: compiles / autotunes / allocates; untimed, also checks the outputs agree
    (step, reset), (bstep, breset) = contenders["ours"], contenders["baseline"]
    reset()
    out_ours, ours_impl = _call_noting_rnn_impl(step)
    out_ours = out_ours.detach()
    breset()
    out_base, baseline_impl = _call_noting_rnn_impl(bstep)
    max_abs_diff = (out_ours.float() - out_base.detach().float()).abs().max().item()
    if not math.isfinite(max_abs_diff):
        note(f"non-finite output difference in {config_label(c)}")
        max_abs_diff = None  # JSON has no NaN
    del out_ours, out_base

    times = measure_interleaved(contenders, timer, budget, args.warmup, args.min_rounds,
                                args.max_rounds)
    rounds = len(times["ours"])

    ours_ms = round(statistics.median(times["ours"]), 6)
    base_ms = round(statistics.median(times["baseline"]), 6)
    ours_ms = max(ours_ms, 1e-6)
    record = dict(c)
    record.update(
        ours_ms=ours_ms,
        baseline_ms=base_ms,
        baseline="cudnn" if device.type == "cuda" else "torch-cpu",
        speedup=base_ms / ours_ms,
        # extras
        rounds=rounds,
        ours_ms_min=round(min(times["ours"]), 6),
        baseline_ms_min=round(min(times["baseline"]), 6),
        max_abs_diff=max_abs_diff,
        baseline_impl=baseline_impl,
        ours_impl=ours_impl,
    )
    return record


# ---------------------------------------------------------------------------------------------
# --compile: the first compiled call, in a fresh process with an empty inductor cache
# ---------------------------------------------------------------------------------------------
_FIRST_CALL_SCRIPT = """
import json, sys, time
import torch
which, mode = sys.argv[1], sys.argv[2]
if which == "lstmgru":
    import lstmgru
    rnn = lstmgru.LSTM(64, 128)
else:
    rnn = torch.nn.LSTM(64, 128)

class Model(torch.nn.Module):  # Linear - LSTM - Linear
    def __init__(self):
        super().__init__()
        self.inp, self.rnn, self.out = torch.nn.Linear(32, 64), rnn, torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.out(self.rnn(self.inp(x))[0])

torch.manual_seed(0)
model = torch.compile(Model())
x = torch.randn(50, 8, 32)
start = time.perf_counter()
if mode == "training":
    model(x).square().sum().backward()
else:
    with torch.no_grad():
        model(x)
first = time.perf_counter() - start
start = time.perf_counter()
if mode == "training":
    model(x).square().sum().backward()
else:
    with torch.no_grad():
        model(x)
print(json.dumps({"first_s": first, "second_s": time.perf_counter() - start}))
"""


def first_compiled_calls() -> list[dict]:
    """torch.compile(Linear-LSTM-Linear), lstmgru's LSTM against torch.nn's: seconds of the
    first call (dynamo, AOTAutograd, inductor's code generation and C++ compile) in a fresh
    process whose inductor cache is an empty folder, so nothing is reused from earlier runs."""
    import tempfile

    results = []
    for mode, which in itertools.product(("inference", "training"), ("lstmgru", "torch.nn")):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=cache)
            # the same model again in another fresh process, now with the cache the first
            # one left: what a rerun of a script costs
            for cache_state in ("empty", "warm"):
                done = subprocess.run([sys.executable, "-c", _FIRST_CALL_SCRIPT, which, mode],
                                      env=env, capture_output=True, text=True, timeout=900)
                if done.returncode != 0:
                    raise RuntimeError(f"first compiled call ({which}, {mode}) failed: "
                                       f"{done.stderr.strip().splitlines()[-1:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                results.append({"contender": which, "mode": mode, "cache": cache_state, **row})
    return results


def render_first_calls(rows: list[dict]) -> str:
    L = ["", "## First compiled call", "",
         "torch.compile(Linear-LSTM-Linear), T=50, B=8, I=32, H=128: seconds of the first call "
         "in a fresh process, with an empty inductor cache and again with the cache the first "
         "process left; and of the second call. torch.nn's LSTM is not compiled: dynamo breaks "
         "the graph around it and compiles only the Linear layers.", "",
         "| mode | contender | inductor cache | first call s | second call s |",
         "|---|---|---|---:|---:|"]
    for r in rows:
        L.append(f"| {r['mode']} | {r['contender']} | {r['cache']} | {r['first_s']:.2f} | "
                 f"{r['second_s']:.4f} |")
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------
def geomean(values) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _group(records, keys):
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _fmt_diff(r: dict) -> str:
    if r["op"] == "gru_original":
        return "n/a"  # another function than the baseline's (see _DIFF_NOTE)
    v = r["max_abs_diff"]
    return "non-finite" if v is None else f"{v:.2e}"


_DIFF_NOTE = ("max abs diff: between the two contenders' outputs, where both compute the same "
              "function. `gru_original` is the original GRU (`reset_after=False`), which "
              "torch.nn cannot compute: it is timed against torch's GRU of the same size, and "
              "its outputs are checked against a float64 spec by the tests "
              "(`tests/test_article_gru.py`), not here.")

# What the recorded implementation names mean, for people
IMPL_NAMES = {
    "mkldnn": "oneDNN's LSTM", "cudnn": "cuDNN", "native": "ATen's own loop",
    "lstmgru-reference": "lstmgru's plain-PyTorch reference",
    "lstmgru-triton": "lstmgru's Triton kernels", "unknown": "(not recorded)",
}


def what_ran(records: list[dict], short: bool = False) -> list[str]:
    """One line per op: which implementation each contender ran (the records say)."""
    lines = []
    for (op,), rs in _group(records, ("op",)).items():
        ours = sorted({r.get("ours_impl", "unknown") for r in rs})
        base = sorted({r.get("baseline_impl", "unknown") for r in rs})
        ours_s = " / ".join(IMPL_NAMES.get(i, i) for i in ours)
        base_s = " / ".join(IMPL_NAMES.get(i, i) for i in base)
        if op == "gru_original":
            lines.append(f"{op}: lstmgru's GRU(reset_after=False) on {ours_s} vs torch.nn's GRU "
                         f"on {base_s} " + ("(different functions)" if short else
                                            "(a different function of the same size)"))
        elif ours == base:
            lines.append(f"{op}: both sides run {base_s}, the same kernel" + (
                "" if short else " (the ratio is lstmgru's call overhead plus timing noise)"))
        else:
            lines.append(f"{op}: lstmgru on {ours_s} vs torch.nn on {base_s}")
    return lines


def render_markdown(meta: dict, records: list[dict]) -> str:
    L = []
    L.append(f"# lstmgru vs {records[0]['baseline'] if records else 'baseline'}: {meta['device']}")
    L.append("")
    head = (f"torch {meta['torch']}, triton {meta['triton']}, cuDNN {meta['cudnn']}, "
            f"commit {meta['commit']}, {meta['date']}, backend `{meta.get('backend')}`, "
            f"threads {meta.get('threads')}")
    if "tf32" in meta:
        head += ", TF32 " + ", ".join(f"{k}={v}" for k, v in meta["tf32"].items())
    L.append(head + ".")
    L.append("Median ms of interleaved runs; speedup = baseline_ms / ours_ms (> 1: lstmgru faster).")
    if records:
        L.append("")
        L.append("What runs on each side:")
        L.append("")
        L.extend(f"- {line}" for line in what_ran(records))
    load = meta.get("loadavg_end")
    if meta.get("device_type") == "cpu" and load and load[0] > (os.cpu_count() or 1):
        L.append("")
        L.append(f"**Busy machine**: 1-min load average {load[0]} on {os.cpu_count()} cores at the "
                 "end of the run; CPU timings are unreliable.")
    if not meta.get("complete", True):
        L.append("")
        L.append("**Incomplete run** (interrupted or past its deadline).")
    L.append("")
    if not records:
        L.append("No records.")
    else:
        L.append("## Summary")
        L.append("")
        L.append("| op | mode | dtype | configs | geomean speedup | worst speedup | worst case |")
        L.append("|---|---|---|---:|---:|---:|---|")
        multi_dtype = len({r["dtype"] for r in records}) > 1
        rows = []
        for (op, mode), rs in _group(records, ("op", "mode")).items():
            rows.append((op, mode, "all" if multi_dtype else rs[0]["dtype"], rs))
            if multi_dtype:
                for (dt,), rd in _group(rs, ("dtype",)).items():
                    rows.append((op, mode, dt, rd))
        for op, mode, dt, rs in rows:
            worst = min(rs, key=lambda r: r["speedup"])
            label = config_label(worst, short=True) + (f" {worst['dtype']}" if dt == "all" else "")
            L.append(f"| {op} | {mode} | {dt} | {len(rs)} | {geomean(r['speedup'] for r in rs):.3f} "
                     f"| {worst['speedup']:.3f} | {label} |")
        L.append("")
        L.append("| mode | configs | overall geomean speedup |")
        L.append("|---|---:|---:|")
        for (mode,), rs in _group(records, ("mode",)).items():
            L.append(f"| {mode} | {len(rs)} | {geomean(r['speedup'] for r in rs):.3f} |")
        L.append("")
        L.append("## All configs")
        L.append("")
        L.append("| op | mode | dtype | B | T | I | H | layers | bidir | ours ms | "
                 "baseline ms | speedup | max abs diff |")
        L.append("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
        for r in records:
            L.append(f"| {r['op']} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['seq_len']} "
                     f"| {r['input_size']} | {r['hidden_size']} | {r['num_layers']} "
                     f"| {'yes' if r['bidirectional'] else 'no'} | {r['ours_ms']:.4f} "
                     f"| {r['baseline_ms']:.4f} | {r['speedup']:.3f} | {_fmt_diff(r)} |")
        L.append("")
        L.append(_DIFF_NOTE)
    for title, key in (("Errors", "errors"), ("Skipped (deadline)", "skipped")):
        if meta.get(key):
            L.append("")
            L.append(f"## {title}")
            L.append("")
            for e in meta[key]:
                L.append(f"- {e['config'] if isinstance(e, dict) else e}"
                         + (f": {e['error']}" if isinstance(e, dict) and "error" in e else ""))
    return "\n".join(L) + "\n"


# Labelled ticks of the ratio axis, and the span it always shows at least: on a log axis a 3%
# gap must look like 3%, not fill the panel.
RATIO_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.33, 0.5, 0.67, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0,
               4.0, 5.0, 10.0, 20.0, 50.0, 100.0)
FINE_TICKS = (0.67, 0.8, 1.25, 1.5)  # dropped when the span is wider than 10x
MEDIUM_TICKS = (0.25, 0.33, 3.0, 4.0)  # dropped when it is wider than 100x
MIN_RATIO_SPAN = (1 / 1.5, 1.5)


def ratio_axis(ratios, headroom: float = 1.1) -> tuple[float, float, list[float]]:
    """The shared y range (log scale) and its labelled ticks for these speedups."""
    lo = min(min(ratios, default=1.0) / headroom, MIN_RATIO_SPAN[0])
    hi = max(max(ratios, default=1.0) * headroom, MIN_RATIO_SPAN[1])
    ticks = [t for t in RATIO_TICKS if lo <= t <= hi]
    if hi / lo > 10:
        ticks = [t for t in ticks if t not in FINE_TICKS]
    if hi / lo > 100:
        ticks = [t for t in ticks if t not in MEDIUM_TICKS]
    return lo, hi, ticks


def render_plot(meta: dict, records: list[dict], path: Path) -> bool:
    """Speedup per config, one panel per (op, mode), all on one shared log axis.

    Bars grow from the 1x line: up, lstmgru is faster; down, slower. Panels share the x axis
    (the union of the configs, in run order), so the labels sit under the bottom row only."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        note("matplotlib is not installed: skipping the PNG plot (pip install matplotlib)")
        return False
    if not records:
        return False
    multi_dtype = len({r["dtype"] for r in records}) > 1

    def shape_of(r):
        return config_label(r, short=True) + (f" {r['dtype']}" if multi_dtype else "")

    shapes = list(dict.fromkeys(shape_of(r) for r in records))
    ops = list(dict.fromkeys(r["op"] for r in records))
    modes = list(dict.fromkeys(r["mode"] for r in records))
    groups = _group(records, ("op", "mode"))
    annotate = len(shapes) <= 12  # the value over each bar, where there is room for it
    lo, hi, ticks = ratio_axis([r["speedup"] for r in records], headroom=1.4 if annotate else 1.1)

    label_inches = 0.075 * max(len(s) for s in shapes) + 0.3  # 9-pt labels, rotated
    panel_w = max(4.0, 0.32 * len(shapes) + 1.0)
    fig_w = panel_w * len(modes) + 0.8
    fig, axes = plt.subplots(
        len(ops), len(modes), sharex=True, sharey=True, squeeze=False, layout="constrained",
        figsize=(fig_w, 2.6 * len(ops) + label_inches + 1.2 + 0.2 * len(ops)))
    xs = list(range(len(shapes)))
    for row, op in enumerate(ops):
        for col, mode in enumerate(modes):
            ax = axes[row][col]
            rs = groups.get((op, mode), [])
            pos = [shapes.index(shape_of(r)) for r in rs]
            sp = [r["speedup"] for r in rs]
            ax.bar(pos, [v - 1.0 for v in sp], bottom=1.0, width=0.7,
                   color=["tab:green" if v >= 1 else "tab:red" for v in sp])
            ax.axhline(1.0, color="black", linewidth=1.2)
            if annotate:
                for x, v in zip(pos, sp):
                    ax.annotate(f"{v:.2f}" if v < 10 else f"{v:.3g}", (x, v),
                                xytext=(0, 2 if v >= 1 else -2),
                                textcoords="offset points", ha="center",
                                va="bottom" if v >= 1 else "top", fontsize=8)
            title = f"{op} {mode}"
            if rs:
                title += f": geomean {geomean(sp):.2f}x"
            ax.set_title(title, fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            if col == 0:
                ax.set_ylabel("speedup (x, log)", fontsize=9)
    ax0 = axes[0][0]
    ax0.set_yscale("log")
    ax0.set_ylim(lo, hi)
    ax0.yaxis.set_major_locator(FixedLocator(ticks))
    ax0.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax0.yaxis.set_minor_locator(NullLocator())
    ax0.set_xlim(-0.6, len(shapes) - 0.4)
    ax0.set_xticks(xs)
    for ax in axes[-1]:
        ax.set_xticks(xs)
        ax.set_xticklabels(shapes, rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
    for row in axes:
        for ax in row:
            ax.tick_params(axis="y", labelsize=9)

    baseline = "cuDNN" if meta.get("device_type") == "cuda" else "torch.nn's CPU kernels"
    lines = [f"lstmgru (backend {meta.get('backend')}) vs torch.nn ({baseline}) on "
             f"{meta['device']}, same weights and inputs; above 1x: lstmgru faster"]
    lines += what_ran(records, short=True)
    lines.append(f"torch {meta['torch']}, triton {meta['triton']}, cuDNN {meta['cudnn']}; "
                 f"{meta['commit']}, {meta['date']}; load average {meta.get('loadavg_start')} "
                 f"at the start")
    load = meta.get("loadavg_end")
    if meta.get("device_type") == "cpu" and load and load[0] > (os.cpu_count() or 1):
        lines.append(f"BUSY MACHINE: load average {load[0]} on {os.cpu_count()} cores at the end; "
                     "these CPU timings are unreliable")
    width = int(fig_w * 15)  # characters of 9-pt text across the figure
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in lines), fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_json(path: Path, meta: dict, records: list[dict]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark lstmgru.LSTM/GRU against torch.nn (cuDNN on CUDA, torch CPU kernels "
                    "on CPU) with identical weights and inputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="named grid; the grid flags below replace its axes")
    g = p.add_argument_group("grid (each flag takes a list and replaces the preset's axis)")
    g.add_argument("--op", nargs="+", choices=["lstm", "gru", "gru_original"],
                   help="gru_original: lstmgru.GRU(reset_after=False) against torch's GRU")
    g.add_argument("--mode", nargs="+", choices=["inference", "training"])
    g.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="half types run on CUDA only")
    g.add_argument("--batch", nargs="+", type=_positive_int)
    g.add_argument("--seq-len", nargs="+", type=_positive_int)
    g.add_argument("--sizes", nargs="+", type=_size_pair, metavar="I:H",
                   help="(input_size, hidden_size) pairs, e.g. 1:50 128:128")
    g.add_argument("--input-size", nargs="+", type=_positive_int,
                   help="crossed with --hidden-size (or the preset's hidden sizes)")
    g.add_argument("--hidden-size", nargs="+", type=_positive_int,
                   help="crossed with --input-size; alone it means input_size = hidden_size")
    g.add_argument("--num-layers", nargs="+", type=_positive_int)
    g.add_argument("--bidirectional", nargs="+", type=_str2bool, metavar="{0,1}")
    t = p.add_argument_group("timing")
    t.add_argument("--budget", type=float, default=None,
                   help="seconds of timed rounds per config (preset default: default 2, cpu 5, gpu 2)")
    t.add_argument("--total-budget", type=float, default=None,
                   help="soft target for the whole run in seconds: the per-config budget shrinks "
                        "to (time left / configs left) (preset default: default 45, cpu 720, gpu none)")
    t.add_argument("--deadline", type=float, default=None,
                   help="hard limit in seconds: configs not started by then are skipped and listed "
                        "in meta.skipped")
    t.add_argument("--warmup", type=_positive_int, default=3,
                   help="warm-up calls per contender (the first is untimed, later ones estimate the "
                        "cost; fewer when they use up a quarter of the budget)")
    t.add_argument("--min-rounds", type=_positive_int, default=3,
                   help="timed rounds even when one round exceeds the budget")
    t.add_argument("--max-rounds", type=_positive_int, default=1000)
    e = p.add_argument_group("environment")
    e.add_argument("--backend", default="auto", choices=import_lstmgru().backends.names(),
                   help="lstmgru.use_backend(...) for ours (names from lstmgru.backends)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads")
    e.add_argument("--tf32", default="default", choices=["default", "on", "off"],
                   help="CUDA only: set torch.backends.cuda.matmul.allow_tf32 and "
                        "cudnn.allow_tf32 (recorded in meta either way)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--compile", action="store_true",
                   help="time torch.compile(lstmgru module) against eager torch.nn (the first, "
                        "compiling call untimed), and report the first compiled call of a "
                        "Linear-LSTM-Linear model in a fresh process with an empty inductor cache")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    o.add_argument("--name", default=None, help="file stem (default: DEVICE-YYYYmmdd-HHMMSS)")
    o.add_argument("--no-plot", action="store_true", help="skip the PNG")
    o.add_argument("--list", action="store_true", help="print the configs and exit")
    o.add_argument("--replot", type=Path, metavar="JSON",
                   help="write the Markdown and the PNG of a saved result again, next to its "
                        "JSON, and exit (nothing is timed)")
    return p.parse_args(argv)


class _Stop(BaseException):
    """SIGTERM (e.g. from `timeout`): a BaseException so the per-config error handler lets it through."""


def _on_sigterm(signum, frame):
    raise _Stop(f"signal {signum}")


def replot(json_path: Path, plot: bool) -> int:
    data = json.loads(json_path.read_text())
    meta, records = data["meta"], data["records"]
    md = render_markdown(meta, records)
    json_path.with_suffix(".md").write_text(md)
    if plot:
        render_plot(meta, records, json_path.with_suffix(".png"))
    sys.stdout.write(md)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args.replot, not args.no_plot)
    preset = PRESETS[args.preset]
    budget = args.budget if args.budget is not None else preset["budget"]
    total_budget = args.total_budget if args.total_budget is not None else preset["total_budget"]

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("bench.py: --device cuda but CUDA is not available")
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and args.tf32 != "default":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = args.tf32 == "on"

    configs = build_configs(args, device)
    if args.list:
        for i, c in enumerate(configs):
            print(f"{i + 1:4d} {config_label(c)}")
        print(f"{len(configs)} configs", file=sys.stderr)
        return 0
    if not configs:
        raise SystemExit("bench.py: empty grid")

    lstmgru = import_lstmgru()
    meta = build_meta(args, device, lstmgru)
    if args.name is None:
        tag = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
        args.name = f"{tag}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"{args.name}.json"
    md_path = args.out_dir / f"{args.name}.md"
    png_path = args.out_dir / f"{args.name}.png"
    note(f"{len(configs)} configs on {meta['device']} ({device.type}), backend={args.backend}, "
         f"budget {budget:g}s/config" + (f", total ~{total_budget:g}s" if total_budget else "")
         + (f", deadline {args.deadline:g}s" if args.deadline else "") + f" -> {json_path}")

    records: list[dict] = []
    signal.signal(signal.SIGTERM, _on_sigterm)
    progress = Progress(len(configs))
    t_start = time.perf_counter()
    interrupted = None
    try:
        with lstmgru.use_backend(args.backend):
            for i, c in enumerate(configs):
                elapsed = time.perf_counter() - t_start
                if args.deadline is not None and elapsed > args.deadline:
                    meta["skipped"] = [config_label(s) for s in configs[i:]]
                    note(f"deadline {args.deadline:g}s reached: skipping {len(configs) - i} configs")
                    break
                b = budget
                if total_budget is not None:
                    b = min(budget, max(0.0, total_budget - elapsed) / (len(configs) - i))
                if args.deadline is not None:
                    b = min(b, max(0.0, args.deadline - elapsed) / (len(configs) - i))
                progress.update(i, config_label(c))
                try:
                    records.append(bench_config(lstmgru, c, device, args, b))
                except Exception as exc:
                    # Recorded, not hidden: e.g. an unsupported case under --backend triton, out of
                    # memory, a Triton compile error. The run goes on with the next config.
                    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    note(f"FAILED {config_label(c)}: {msg}")
                    meta["errors"].append({"config": config_label(c), "error": msg})
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                write_json(json_path, meta, records)
            else:
                meta["complete"] = True
    except (KeyboardInterrupt, _Stop) as exc:
        interrupted = exc
        note(f"interrupted ({exc or 'KeyboardInterrupt'}): writing the {len(records)} finished records")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    progress.finish(len(records))

    if args.compile and interrupted is None:
        note("first compiled calls, each in a fresh process with an empty inductor cache")
        meta["first_compiled_call"] = first_compiled_calls()
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    meta["loadavg_end"] = _loadavg()
    if device.type == "cpu" and meta["loadavg_end"] and meta["loadavg_end"][0] > (os.cpu_count() or 1):
        note(f"load average {meta['loadavg_end'][0]} exceeds {os.cpu_count()} cores: other jobs "
             "shared the CPU, so these CPU timings are unreliable")
    write_json(json_path, meta, records)
    md = render_markdown(meta, records)
    if meta.get("first_compiled_call"):
        md += render_first_calls(meta["first_compiled_call"])
    md_path.write_text(md)
    wrote = [json_path, md_path]
    if not args.no_plot and render_plot(meta, records, png_path):
        wrote.append(png_path)
    note("wrote " + ", ".join(str(p) for p in wrote))
    sys.stdout.write(md)
    sys.stdout.flush()
    if interrupted is not None:
        return 130
    return 1 if meta["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
