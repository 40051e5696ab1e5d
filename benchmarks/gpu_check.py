#!/usr/bin/env python3
"""The GPU check: named stages, each in its own process with its own time limit, one log, one
summary.json and one tarball, rewritten as it goes. Run it through ``gpu_check.sh``:

    bash benchmarks/gpu_check.sh OUTDIR                       # on the GPU machine
    GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh OUTDIR   # anywhere: tiny shapes on the CPU

OUTDIR then holds exactly three files (the device tool returns at most 8):
  gpu_check.log    everything every stage printed, appended as it is printed
  summary.json     every stage (status, seconds, limit) and every case with its result;
                   rewritten at the start, during each stage and after it
  details.tar.gz   the stages' own outputs (per-stage output and results, pytest's JUnit XML,
                   the calibration table, the benchmarks' JSON/Markdown), re-packed after every
                   stage, so a run killed from outside still leaves what it finished.
The stages' working files live in a temporary folder outside OUTDIR. A compact summary is
printed last. Nothing here touches the network.

Stages, in order (``STAGES``). The first block answers within about 2 minutes on an H100/H200:
  env          device, capability, SMs, torch / CUDA / triton / cuDNN, every TF32 setting (read
               without raising), commit, date, how the package was installed
  smoke        lstmgru._kernels imports; a small LSTM runs forward and backward on auto and on
               each kernel family, against the reference
  correctness  one case per family (triton-tiled, triton-split) x cell (LSTM, GRU, the original
               GRU) x shape (B16 H768 fp16; B1 H128 fp32; B18 H40 fp32 with lengths,
               bidirectional), forward and backward against float64; and split against tiled.
               fp32 with IEEE products; fp16 no worse than twice torch.nn's (cuDNN's) own error
  race         the split LSTM at B16 T1024 H768 fp16, forward and backward 10 times:
               bit-identical, every launch's error word 0
  headline     B16 T1024 H768 fp16 LSTM, forward and forward+backward: cuDNN, triton-split,
               triton-tiled and auto, interleaved, medians of CUDA-event timings, ratios
  barrier      us per grid sync at the published point's P and at P = SM count, with the warp
               count the split kernels use there (benchmarks/barrier_bench.py)
Then:
  calibrate    python3 -m lstmgru.calibrate --output <calibration.json in the tarball>
  pytest       the split protocol tests first, then tests/test_gpu.py and the kernel suites on
               CUDA; per-test timeouts (pytest-timeout, if installed), SIGINT before the
               stage's limit so that pytest prints its failures (-rfE --tb=short)
  grid         about 10 chosen configs per family against cuDNN; a config a family refuses is
               "refused", not a failure
  variants     benchmarks/variants_bench.py on the device
  compile      benchmarks/compile_report.py --subset small --gate on the device's architecture

Time: the whole run ends within GPU_CHECK_TOTAL_S (default 280 s, counted from the start of
gpu_check.sh), so the first call fits in 5 minutes and a second one in the same window. Each
stage runs at most its own limit and at most what is left; a stage that would get less than
its minimum is recorded as skipped. A stage past its limit gets SIGTERM, then SIGKILL, to its
whole process group; the next stage runs regardless. Statuses: ok, failed (an exception, a
non-zero exit, or a failed case), timeout, skipped, absent (the stage's subject is not there,
e.g. no lstmgru.calibrate), interrupted (the driver itself was stopped). Cases: pass, fail,
error, refused, skipped, "not run" (declared, but its stage ended first). Each stage's wall
seconds and CPU seconds are recorded: on a shared machine the first can be many times the
second.

Processes: the driver imports torch, lstmgru and triton once (never touching CUDA) and forks
one child per stage, which starts its own session (process group) and writes to its own output
file; the driver copies that into the log and onto the console. GPU_CHECK_FORK=0 starts each
stage as a fresh ``python3 gpu_check.py --child STAGE`` instead.

Dry run (GPU_CHECK_DRY_RUN=1): every stage with tiny shapes on the CPU, the kernels in
Triton's interpreter (TRITON_INTERPRET=1), the split family under the thread-parallel executor
(tests/_parallel_interpreter.py), torch.nn on the CPU standing in for cuDNN; nothing is timed
that means anything. tests/test_gpu_check.py runs it.

Knobs (environment):
  GPU_CHECK_TOTAL_S        the whole run's budget in seconds (default 280; dry run 400)
  GPU_CHECK_STAGES         comma-separated stages to run; the others are "skipped"
                           (e.g. a second call: pytest,grid,variants,compile)
  GPU_CHECK_LIMITS         per-stage limits, e.g. "pytest=400,grid=120"
  GPU_CHECK_FORCE_HANG     a stage that hangs instead of running (ignoring SIGINT and SIGTERM),
                           to see it cut by its limit while the next stage still runs
  GPU_CHECK_FORK=0         a fresh interpreter per stage instead of a fork

Adding a stage: a function taking a ``Context``, decorated with ``@stage(name, limit_s=...,
dry_limit_s=...)`` at the place in this file where it should run. It records results with
``ctx.case(name, fn)`` (fn returns a dict of fields; ``verdict`` turns checks into a status)
and may declare its case names up front (``cases=``) so a killed stage lists what it missed.
Its files go in ``ctx.work``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
TESTS = REPO / "tests"

LOG_NAME, SUMMARY_NAME, TARBALL_NAME = "gpu_check.log", "summary.json", "details.tar.gz"
MAX_OUTDIR_FILES = 8           # what the device tool returns
DEFAULT_TOTAL_S = 280.0        # the first call must end within 5 minutes, install included
DRY_TOTAL_S = 400.0
FINAL_RESERVE_S = 6.0          # kept back for the last tarball, summary and report
KILL_GRACE_S = 4.0             # between SIGTERM and SIGKILL
SUMMARY_EVERY_S = 10.0         # summary.json is rewritten this often during a stage
POLL_S = 0.2


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


DRY_RUN = _env_flag("GPU_CHECK_DRY_RUN")


# =============================================================================================
# Stages: the registry and what a stage's function gets
# =============================================================================================
@dataclasses.dataclass
class Stage:
    name: str
    run: Callable[["Context"], None]
    limit_s: float                 # on the GPU
    dry_limit_s: float             # in the dry run
    block: str = "then"            # "first": the part that answers within about 2 minutes
    min_s: float = 10.0            # skipped when it would get less than this
    sigint_s: float = 0.0          # SIGINT this long before the limit (pytest prints failures)
    cases: Optional[Callable[[bool], list]] = None  # case names declared up front (dry_run)


STAGES: list = []


def stage(name: str, limit_s: float, dry_limit_s: float, **options):
    """Register the decorated function as the next stage (see the module docstring)."""
    def register(fn):
        STAGES.append(Stage(name, fn, limit_s, dry_limit_s, **options))
        return fn
    return register


class Refused(Exception):
    """A family declined a case it does not implement: recorded as "refused", not a failure."""


def verdict(fields: dict, checks) -> dict:
    """``fields`` with a status: "pass", or "fail" and the messages of the checks that failed.
    ``checks`` are (ok, message) pairs."""
    failed = [message for ok, message in checks if not ok]
    fields["status"] = "fail" if failed else "pass"
    if failed:
        fields["failed"] = failed
    return fields


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class Context:
    """What a stage's function works with, in the stage's own process."""

    def __init__(self, stage_: Stage, work: Path, limit_s: float):
        self.name = stage_.name
        self.work = work
        self.dry_run = DRY_RUN
        self.deadline = time.monotonic() + limit_s
        self.cases: list = []
        self.info: dict = {}
        self.status: Optional[str] = None  # "absent" or "skipped" where the stage decides so
        self.note = ""

    def left(self) -> float:
        """Seconds until this stage's limit."""
        return self.deadline - time.monotonic()

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry_run else "cuda")

    def programs(self):
        """Where kernel launches run: the GPU, or in the dry run one thread per program, so
        that the split family's programs can wait for each other in the interpreter."""
        if not self.dry_run:
            return contextlib.nullcontext()
        from _parallel_interpreter import parallel_programs

        return parallel_programs(timeout_s=120.0)

    def case(self, name: str, fn: Callable[[], dict], **fields) -> dict:
        """Run one case in its own try/except, record it and print one line."""
        t0 = time.perf_counter()
        try:
            result = dict(fn() or {})
            status = result.pop("status", "pass")
        except Refused as refusal:
            status, result = "refused", {"reason": str(refusal)}
        except Exception as error:  # recorded, and the next case runs
            status, result = "error", {"error": _first_line(error)}
            traceback.print_exc(limit=-3, file=sys.stdout)
        record = {"name": name, "status": status,
                  "seconds": round(time.perf_counter() - t0, 2), **fields, **result}
        self.cases.append(record)
        self.save()
        shown = {k: v for k, v in record.items() if k not in ("name", "status", "failed")}
        print(f"  {status.upper():8s} {name}  {_compact(shown)}", flush=True)
        for message in record.get("failed", ()):
            print(f"           {message}", flush=True)
        return record

    def save(self) -> None:
        _write_json(self.work / f"{self.name}.json",
                    {"cases": self.cases, "info": self.info, "status": self.status,
                     "note": self.note})

    def run_main(self, argv: list, module: str = None, path: Path = None) -> int:
        """``python3 -m MODULE ARGV`` or ``python3 PATH ARGV`` in this process (runpy: what
        the interpreter itself does for them), so torch is not imported again. Returns the
        exit status."""
        import runpy

        shown = f"-m {module}" if module else str(Path(path).relative_to(REPO))
        print(f"$ python3 {shown} {' '.join(map(str, argv))}", flush=True)
        saved_argv = sys.argv
        sys.argv = [module or str(path)] + [str(a) for a in argv]
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(path), run_name="__main__")
            return 0
        except SystemExit as exit_:
            code = exit_.code
            if code is None or isinstance(code, int):
                return code or 0
            print(code, flush=True)
            return 1
        finally:
            sys.argv = saved_argv
            sys.stdout.flush()


def _compact(fields: dict) -> str:
    def show(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)
    return " ".join(f"{k}={show(v)}" for k, v in fields.items() if v is not None)


# =============================================================================================
# Helpers shared by the stages (imported lazily: the driver itself needs only the stdlib)
# =============================================================================================
# The published point (DESIGN.md section 4): FlashRNN's plot, H100 SXM, cuDNN fp16 LSTM.
PUBLISHED = dict(batch=16, seq_len=1024, hidden_size=768, dtype="float16")
PUBLISHED_CUDNN_MS = {"inference": 2.01, "training": 5.19}
FAMILIES = ("triton-tiled", "triton-split")
CELLS = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "gru_original": ("GRU", {"reset_after": False})}


@contextlib.contextmanager
def fp32_products(precision: str):
    """fp32 products in ``precision`` ("ieee" or "tf32") inside the block, through the API
    torch has: ``torch.backends.cudnn.rnn.fp32_precision`` (torch >= 2.9; what cuDNN's RNN and
    the kernels follow), else the legacy ``torch.backends.cudnn.allow_tf32``. Restored after."""
    import torch

    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and isinstance(getattr(rnn, "fp32_precision", None), str):
        saved = rnn.fp32_precision
        rnn.fp32_precision = precision
        try:
            yield
        finally:
            rnn.fp32_precision = saved
    else:
        saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = saved


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", type(kernel).__name__)


@contextlib.contextmanager
def recorded_launches():
    """Every kernel launch inside the block, as {"kernel", "error_word"}: the split family's
    error word (the int32 after its flags, see kernels/split.py ``_run``) where there is one."""
    from lstmgru._kernels import _launch, split

    calls = []
    original = _launch.launch

    def recorder(kernel, grid, *args, **meta):
        calls.append({"kernel": _kernel_name(kernel), "error_word": _error_word(args, split)})
        return original(kernel, grid, *args, **meta)

    _launch.launch = recorder
    try:
        yield calls
    finally:
        _launch.launch = original


def _error_word(args, split):
    import torch

    stride = getattr(split, "_FLAG_STRIDE", None)
    for flags, word in zip(args, args[1:]):
        if (isinstance(flags, torch.Tensor) and isinstance(word, torch.Tensor)
                and flags.dtype == word.dtype == torch.int32 and flags.dim() == 2
                and flags.shape[-1] == stride and word.numel() == 1):
            return word
    return None


def _max_err(a, b) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def _rel_err(a, b) -> float:
    """Largest difference relative to the larger of 1 and the reference's largest value."""
    if b.numel() == 0:
        return 0.0
    return _max_err(a, b) / max(1.0, b.double().abs().max().item())


def _run_rnn(module, x, hx, lengths, dtype, backend=None, programs=contextlib.nullcontext):
    """Forward and backward of a weighted sum of every output (y, h_n[, c_n]); returns the
    outputs and the gradients of the input, the initial states and every parameter."""
    import torch
    import lstmgru

    x = x.detach().to(dtype).requires_grad_()
    hx = tuple(h.detach().to(dtype).requires_grad_() for h in hx)
    inp = x
    if lengths is not None:
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    module.zero_grad(set_to_none=True)
    chosen = lstmgru.use_backend(backend) if backend else contextlib.nullcontext()
    with chosen, programs():
        out, state = module(inp, hx if len(hx) == 2 else hx[0])
        outputs = [out.data if lengths is not None else out]
        outputs += list(state) if isinstance(state, tuple) else [state]
        loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), device=o.device,
                                                dtype=torch.float64).view_as(o)).sum()
                   for o in outputs)
        loss.backward()
    grads = [x.grad] + [h.grad for h in hx] + [p.grad for p in module.parameters()]
    return [o.detach() for o in outputs], grads


def _errors(got, want) -> dict:
    outputs, grads = got
    outputs64, grads64 = want
    return {"out_err": max(_max_err(a, b) for a, b in zip(outputs, outputs64)),
            "grad_err": max(_rel_err(a, b) for a, b in zip(grads, grads64))}


def _raise(error: BaseException):
    raise error


def _dtype(name: str):
    import torch

    return getattr(torch, name)


# =============================================================================================
# The stages, in the order they run
# =============================================================================================
@stage("env", limit_s=30, dry_limit_s=60, block="first", min_s=5)
def env_stage(ctx: Context) -> None:
    import torch

    import bench
    import lstmgru

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": bench.git_commit(),
        "dry_run": ctx.dry_run,
        "install": os.environ.get("GPU_CHECK_INSTALL_NOTE", "not run through gpu_check.sh"),
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": bench.triton_version(),
        "cudnn": bench.cudnn_version(),
        "lstmgru": f"{lstmgru.__version__} {Path(lstmgru.__file__).parent}",
        "pytest_timeout": importlib.util.find_spec("pytest_timeout") is not None,
        "tf32": bench.tf32_flags(),
    }
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
        if shutil.which("nvidia-smi"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                info["nvidia_smi"] = subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                     "--format=csv,noheader"], capture_output=True, text=True,
                    timeout=15).stdout.strip()
    else:
        info["device"] = f"{bench.cpu_name()} (dry run: Triton's interpreter)"
    try:
        from lstmgru._kernels._common import dot_precision

        info["kernels_fp32_products"] = dot_precision(torch.float32, ctx.device)
    except Exception as error:
        info["kernels_fp32_products"] = f"raises: {_first_line(error)}"
    ctx.info.update(info)
    for key, value in info.items():
        print(f"{key}: {value}")


@stage("smoke", limit_s=45, dry_limit_s=90, block="first", min_s=10)
def smoke_stage(ctx: Context) -> None:
    import torch

    import lstmgru

    def kernels_import():
        import lstmgru._kernels as kernels
        from lstmgru._kernels import lstm, split  # noqa: F401

        return {"path": str(Path(kernels.__file__).parent)}

    ctx.case("import lstmgru._kernels", kernels_import)
    torch.manual_seed(0)
    model = lstmgru.LSTM(8, 16, device=ctx.device)
    x = torch.randn(4, 2, 8, device=ctx.device)
    hx = (torch.randn(1, 2, 16, device=ctx.device), torch.randn(1, 2, 16, device=ctx.device))
    with fp32_products("ieee"):
        want = _run_rnn(model, x, hx, None, torch.float32, "reference")
        for backend in ("auto",) + FAMILIES:
            def run(backend=backend):
                with recorded_launches() as launched:
                    got = _run_rnn(model, x, hx, None, torch.float32, backend, ctx.programs)
                errors = _errors(got, want)
                kernels = sorted({c["kernel"] for c in launched})
                fields = {**errors, "kernels": ",".join(kernels) or "none"}
                return verdict(fields, [
                    (errors["out_err"] < 1e-4 and errors["grad_err"] < 1e-3,
                     "differs from the reference beyond fp32 rounding"),
                    (backend == "auto" or kernels, f"{backend} launched no kernel")])
            ctx.case(f"LSTM forward+backward on {backend}", run)


# --- correctness ---------------------------------------------------------------------------
# Shape name -> (GPU shape, dry-run shape). The published point comes first: if compiling
# takes the stage past its limit, the shapes cut are the others. T=64 is a multiple of 16 like
# the headline's 1024, so the race check and the headline reuse these kernels' compilations.
CORRECTNESS_SHAPES = {
    "B16-H768-fp16": (dict(T=64, B=16, I=768, H=768, dtype="float16"),
                      dict(T=2, B=2, I=4, H=16, dtype="float16")),
    "B1-H128-fp32": (dict(T=64, B=1, I=64, H=128, dtype="float32"),
                     dict(T=3, B=1, I=4, H=16, dtype="float32")),
    "B18-H40-fp32-lengths-bidirectional": (
        dict(T=32, B=18, I=24, H=40, dtype="float32", lengths=True, bidirectional=True),
        dict(T=3, B=3, I=4, H=8, dtype="float32", lengths=True, bidirectional=True)),
}
# fp32 with IEEE products: only fp32 rounding separates the kernels from float64 (as in
# tests/test_gpu.py). fp16: no worse than twice torch.nn's own error at the same dtype (cuDNN on
# the GPU) plus 1e-3 (DESIGN.md section 6); for the original GRU, which torch cannot compute,
# torch's GRU of the same shape and dtype gives that yardstick.
FP32_OUT_TOL, FP32_GRAD_TOL, HALF_SLACK = 1e-4, 1e-3, 1e-3


def _correctness_cases(dry_run: bool) -> list:
    names = []
    for shape in CORRECTNESS_SHAPES:
        for cell in CELLS:
            names += [f"{family} {cell} {shape}" for family in FAMILIES]
            names.append(f"split vs tiled {cell} {shape}")
    return names


@stage("correctness", limit_s=90, dry_limit_s=150, block="first", min_s=20,
       cases=_correctness_cases)
def correctness_stage(ctx: Context) -> None:
    import torch

    with fp32_products("ieee"):
        for shape_name, shapes in CORRECTNESS_SHAPES.items():
            shape = shapes[1] if ctx.dry_run else shapes[0]
            for cell in CELLS:
                try:
                    _correctness_cell(ctx, cell, shape_name, shape)
                except Exception as error:  # the setup failed: each case it left says so
                    done = {c["name"] for c in ctx.cases}
                    for name in [f"{f} {cell} {shape_name}" for f in FAMILIES] + \
                            [f"split vs tiled {cell} {shape_name}"]:
                        if name not in done:
                            ctx.case(name, lambda error=error: _raise(error))
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()


def _correctness_cell(ctx: Context, cell: str, shape_name: str, shape: dict) -> None:
    import torch

    import lstmgru

    cls_name, kwargs = CELLS[cell]
    dtype, device = _dtype(shape["dtype"]), ctx.device
    T, B, I, H = shape["T"], shape["B"], shape["I"], shape["H"]
    directions = 2 if shape.get("bidirectional") else 1
    torch.manual_seed(T * 1000 + H)
    ours = getattr(lstmgru, cls_name)(I, H, bidirectional=directions == 2, device=device,
                                      dtype=dtype, **kwargs)
    state = {k: v.double() for k, v in ours.state_dict().items()}

    def torch_model(dtype_):
        model = getattr(torch.nn, cls_name)(I, H, bidirectional=directions == 2, device=device,
                                            dtype=dtype_)
        model.load_state_dict(state)
        return model

    # The oracle: torch.nn in float64 where torch computes the function, else our reference.
    if kwargs:
        oracle = getattr(lstmgru, cls_name)(I, H, bidirectional=directions == 2, device=device,
                                            dtype=torch.float64, **kwargs)
        oracle.load_state_dict(state)
        oracle_backend = "reference"
    else:
        oracle, oracle_backend = torch_model(torch.float64), None
    # Inputs drawn in float64, rounded once to the dtype; everyone starts from those values.
    gen = torch.Generator(device="cpu").manual_seed(T + B + H)

    def draw(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(device, dtype).double()

    x = draw(T, B, I)
    hx = tuple(draw(directions, B, H) for _ in range(2 if cls_name == "LSTM" else 1))
    lengths = None
    if shape.get("lengths"):
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        lengths[0] = T
    want = _run_rnn(oracle, x, hx, lengths, torch.float64, oracle_backend)
    fields = {"shape": f"T{T} B{B} I{I} H{H} {shape['dtype']}"
                       + (" lengths" if lengths is not None else "")
                       + (" bidirectional" if directions == 2 else "")}

    if dtype == torch.float32:
        out_tol, grad_tol = FP32_OUT_TOL, FP32_GRAD_TOL
    else:
        # torch's own error at this dtype, against its own float64 run (the oracle itself,
        # except for the original GRU, where torch's GRU stands in)
        torch_want = want if not kwargs else _run_rnn(torch_model(torch.float64), x, hx,
                                                      lengths, torch.float64)
        yardstick = _errors(_run_rnn(torch_model(dtype), x, hx, lengths, dtype), torch_want)
        out_tol = 2 * yardstick["out_err"] + HALF_SLACK
        grad_tol = 2 * yardstick["grad_err"] + HALF_SLACK
        fields.update(torch_out_err=yardstick["out_err"], torch_grad_err=yardstick["grad_err"])
    fields.update(out_tol=out_tol, grad_tol=grad_tol)

    results = {}
    for family in FAMILIES:
        def run(family=family):
            with recorded_launches() as launched:
                try:
                    got = _run_rnn(ours, x, hx, lengths, dtype, family, ctx.programs)
                except RuntimeError as error:
                    if "was requested but cannot run" in str(error):
                        raise Refused(str(error)) from None
                    raise
            results[family] = got
            errors = _errors(got, want)
            return verdict({**fields, **errors, "launches": len(launched)}, [
                (len(launched) > 0, "no kernel was launched"),
                (errors["out_err"] <= out_tol, f"outputs off by {errors['out_err']:.3g}"),
                (errors["grad_err"] <= grad_tol, f"gradients off by {errors['grad_err']:.3g}")])
        ctx.case(f"{family} {cell} {shape_name}", run)

    def split_vs_tiled():
        missing = [f for f in FAMILIES if f not in results]
        if missing:
            raise RuntimeError(f"no result from {', '.join(missing)}")
        split, tiled = results["triton-split"], results["triton-tiled"]
        errors = _errors(split, tiled)
        identical = all(torch.equal(a, b) for a, b in zip(split[0] + split[1],
                                                          tiled[0] + tiled[1]))
        return verdict({**fields, **errors, "bitwise_equal": identical}, [
            (errors["out_err"] <= out_tol, f"outputs differ by {errors['out_err']:.3g}"),
            (errors["grad_err"] <= grad_tol, f"gradients differ by {errors['grad_err']:.3g}")])
    ctx.case(f"split vs tiled {cell} {shape_name}", split_vs_tiled)


# --- race ----------------------------------------------------------------------------------
RACE_RUNS = 10
DRY_RACE_RUNS = 3
RACE_CASE = "split LSTM B16 T1024 H768 fp16: 10 runs bit-identical, error words 0"


@stage("race", limit_s=40, dry_limit_s=60, block="first", min_s=10,
       cases=lambda dry_run: [RACE_CASE])
def race_stage(ctx: Context) -> None:
    import torch

    from lstmgru._kernels import split

    T, B, H = (3, 2, 16) if ctx.dry_run else (1024, 16, 768)
    runs = DRY_RACE_RUNS if ctx.dry_run else RACE_RUNS
    dtype, device = torch.float16, ctx.device
    gen = torch.Generator(device="cpu").manual_seed(7)

    def draw(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype)

    gates_x = draw(T, B, 4 * H)
    weight_hh = draw(4 * H, H, scale=H ** -0.5)
    h0, c0 = draw(B, H), draw(B, H)
    grad_y, grad_hn, grad_cn = draw(T, B, H), draw(B, H), draw(B, H)

    def once():
        y, h_n, c_n, saved = split.lstm_forward(gates_x, h0, c0, weight_hh, None, False, True)
        grads = split.lstm_backward(grad_y, grad_hn, grad_cn, saved, y, h0, c0, weight_hh,
                                    None, False)
        return [y, h_n, c_n, *grads]

    def run():
        first, mismatched = None, []
        with recorded_launches() as launched, ctx.programs():
            for i in range(runs):
                results = once()
                if first is None:
                    first = results
                elif not all(torch.equal(a, b) for a, b in zip(first, results)):
                    mismatched.append(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        words = [c["error_word"] for c in launched if c["error_word"] is not None]
        worst = max((int(w.item()) for w in words), default=None)
        fields = {"runs": runs, "launches": len(launched), "error_words_read": len(words),
                  "max_error_word": worst, "mismatched_runs": mismatched or None,
                  "shape": f"T{T} B{B} H{H} fp16"}
        if not words:
            fields["note"] = ("no error word found in the launch arguments: the launcher's "
                              "own check was relied on")
        return verdict(fields, [
            (not mismatched, f"runs {mismatched} differ from run 0"),
            (len(launched) >= 2 * runs, f"{len(launched)} launches, expected {2 * runs}"),
            (not worst, f"an error word is {worst}")])
    ctx.case(RACE_CASE, run)


# --- headline ------------------------------------------------------------------------------
HEADLINE_CONTENDERS = ("cudnn", "triton-split", "triton-tiled", "auto")
MODES = ("inference", "training")


@stage("headline", limit_s=50, dry_limit_s=90, block="first", min_s=15,
       cases=lambda dry_run: [f"{m} {c}" for m in MODES for c in HEADLINE_CONTENDERS])
def headline_stage(ctx: Context) -> None:
    import torch

    import bench
    import lstmgru

    device = ctx.device
    shape = dict(PUBLISHED, batch=2, seq_len=3, hidden_size=16) if ctx.dry_run else PUBLISHED
    config = dict(op="lstm", input_size=shape["hidden_size"], num_layers=1,
                  bidirectional=False, **shape)
    dtype = _dtype(shape["dtype"])
    ours, ref = bench._make_pair(lstmgru, config, device, dtype, seed=0)
    x, hx, w = bench._make_inputs(config, device, dtype, seed=0)
    timer = bench._Timer(device)
    label = f"T{shape['seq_len']} B{shape['batch']} H{shape['hidden_size']} {shape['dtype']}"
    print(f"LSTM {label}; cuDNN published (H100 SXM, FlashRNN's plot): "
          f"{PUBLISHED_CUDNN_MS['inference']} / {PUBLISHED_CUDNN_MS['training']} ms")

    for mode in MODES:
        budget = 0.01 if ctx.dry_run else max(1.0, min(8.0, (ctx.left() - 15) / 2))
        for m in (ours, ref):
            m.train(mode == "training")
        contenders, first_calls = {}, {}
        for name in HEADLINE_CONTENDERS:
            module = ref if name == "cudnn" else ours
            step, reset = bench._make_step(module, mode, x, hx, w)
            if name != "cudnn":
                step = _on_backend(step, name, ctx)
            try:  # the first call compiles; it also says what ran
                with recorded_launches() as launched:
                    reset()
                    _, impl = bench._call_noting_rnn_impl(step)
                kernels = sorted({c["kernel"] for c in launched})
                first_calls[name] = {"ran": "+".join(kernels) if kernels else impl}
                contenders[name] = (step, reset)
            except Exception as error:
                first_calls[name] = {"error": _first_line(error)}
        times = bench.measure_interleaved(contenders, timer, budget,
                                          warmup=2 if ctx.dry_run else 3,
                                          min_rounds=1 if ctx.dry_run else 5, max_rounds=200)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        for name in HEADLINE_CONTENDERS:
            def result(name=name):
                if "error" in first_calls[name]:
                    raise RuntimeError(first_calls[name]["error"])
                fields = {"ms": round(medians[name], 4), "min_ms": round(min(times[name]), 4),
                          "rounds": len(times[name]), "shape": label, **first_calls[name]}
                if name == "cudnn":
                    fields["published_h100_ms"] = PUBLISHED_CUDNN_MS[mode]
                elif "cudnn" in medians:
                    fields["speedup_vs_cudnn"] = round(medians["cudnn"] / medians[name], 3)
                return fields
            ctx.case(f"{mode} {name}", result)


def _on_backend(step, backend, ctx):
    import lstmgru

    def on_backend():
        with lstmgru.use_backend(backend), ctx.programs():
            return step()
    return on_backend


# --- barrier -------------------------------------------------------------------------------
BARRIER_POINTS = ("published point", "all SMs")


@stage("barrier", limit_s=30, dry_limit_s=60, block="first", min_s=10,
       cases=lambda dry_run: [f"{s} {p}" for p in BARRIER_POINTS for s in ("flags", "counter")])
def barrier_stage(ctx: Context) -> None:
    import torch

    import barrier_bench
    from lstmgru._kernels import split

    if ctx.dry_run:  # P=2 and 3 programs, a few rounds: counts checked, nothing timed
        sms, plan = 3, split.split_plan(2, 16, torch.float16, 132, "lstm")
    else:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        plan = split.split_plan(PUBLISHED["batch"], PUBLISHED["hidden_size"],
                                _dtype(PUBLISHED["dtype"]), sms, "lstm")
    rounds = 3 if ctx.dry_run else 2000
    for point, programs in zip(BARRIER_POINTS, (plan.programs, sms)):
        for scheme in barrier_bench.SCHEMES:
            def run(scheme=scheme, programs=programs):
                fields = {"programs": programs, "warps": plan.num_warps, "rounds": rounds}
                if ctx.dry_run:
                    with ctx.programs():
                        state = barrier_bench.run(scheme, programs, rounds, ctx.device,
                                                  plan.num_warps)
                    barrier_bench.check_count(scheme, state, programs, rounds)
                    return fields
                us = barrier_bench.measure(scheme, programs, plan.num_warps, rounds, ctx.device)
                return {**fields, "us_per_sync": round(us, 4)}
            ctx.case(f"{scheme} {point}", run)


# --- then: calibration, the test suites, the grid, variants, compile report ---------------
@stage("calibrate", limit_s=60, dry_limit_s=90, min_s=15)
def calibrate_stage(ctx: Context) -> None:
    if importlib.util.find_spec("lstmgru.calibrate") is None:
        ctx.status, ctx.note = "absent", "lstmgru.calibrate is not in this checkout"
        print(ctx.note)
        return
    output = ctx.work / "calibration.json"
    argv = ["--output", output] + (["--dry-run"] if ctx.dry_run else [])
    # It writes the table after every bucket; where it can stop starting buckets, it stops in
    # time to end within this stage's limit with what it measured.
    source = Path(importlib.util.find_spec("lstmgru.calibrate").origin).read_text()
    if "--max-seconds" in source:
        argv += ["--max-seconds", round(max(5.0, ctx.left() - 20), 1)]

    def run():
        code = ctx.run_main(argv, module="lstmgru.calibrate")
        fields = {"exit": code, "output": output.name,
                  "bytes": output.stat().st_size if output.exists() else None}
        return verdict(fields, [(code == 0, f"exit status {code}"),
                                (output.exists(), f"{output.name} was not written")])
    ctx.case("python3 -m lstmgru.calibrate --output calibration.json", run)


# The split protocol tests first: they matter most and a limit cuts the end of the list.
GPU_TEST_FILES = ["tests/test_kernel_split.py", "tests/test_gpu.py", "tests/test_kernel_lstm.py",
                  "tests/test_kernel_gru.py", "tests/test_kernel_lstm_variants.py",
                  "tests/test_kernel_gru_variants.py"]
DRY_TEST_FILES = ["tests/test_kernel_split.py::test_lstm_fp32_matches_fp64_reference[H40-B1]",
                  "tests/test_gpu.py"]
PER_TEST_TIMEOUT_S = 60


@stage("pytest", limit_s=150, dry_limit_s=150, min_s=30, sigint_s=20)
def pytest_stage(ctx: Context) -> None:
    import pytest

    xml = ctx.work / "pytest.xml"
    args = ["-p", "no:cacheprovider", "-q", "-rfE", "--tb=short", f"--junitxml={xml}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args.append(f"--timeout={PER_TEST_TIMEOUT_S}")
    else:
        ctx.note = "pytest-timeout is not installed: no per-test timeout"
        print(ctx.note)
    args += DRY_TEST_FILES if ctx.dry_run else GPU_TEST_FILES
    print(f"$ python3 -m pytest {' '.join(args)}", flush=True)
    # The kernel suites' fp32 tolerances assume IEEE products (tests/test_gpu.py sets its own).
    with fp32_products("ieee"):
        code = int(pytest.main(args))
    ctx.info["exit"] = code
    for case in _junit_cases(xml):
        ctx.cases.append(case)
    ctx.save()
    counts = {}
    for case in ctx.cases:
        counts[case["status"]] = counts.get(case["status"], 0) + 1
    print(f"pytest exit {code}; cases: {_compact(counts)}")
    if code not in (0, 5):  # 5: nothing collected (e.g. every GPU test deselected)
        ctx.status = "failed"


def _junit_cases(xml: Path) -> list:
    import xml.etree.ElementTree as ET

    if not xml.exists():
        return []
    cases = []
    for tc in ET.parse(xml).getroot().iter("testcase"):
        module = tc.get("classname", "").replace(".", "/")
        name = f"{module}.py::{tc.get('name')}" if module else tc.get("name")
        status, message = "pass", None
        for tag, meaning in (("failure", "fail"), ("error", "error"), ("skipped", "skipped")):
            found = tc.find(tag)
            if found is not None:
                status, message = meaning, (found.get("message") or "")[:300]
                break
        case = {"name": name, "status": status, "seconds": round(float(tc.get("time", 0)), 2)}
        if message:
            case["message"] = message
        cases.append(case)
    return cases


# About 10 configs per family: the published point, both cells and the original GRU, each
# dtype, batch 1 to 256, and wide batch tiles at the edge of the split family's layouts (B256
# H512 half, B128 H512 fp32). A config a family refuses is recorded as refused.
# (op, mode, dtype, batch, hidden); T = 512, I = H.
GRID = [
    ("lstm", "inference", "float16", 16, 768),
    ("lstm", "training", "bfloat16", 16, 512),
    ("gru", "training", "float16", 16, 768),
    ("lstm", "inference", "float16", 1, 256),
    ("gru", "inference", "bfloat16", 64, 1024),
    ("lstm", "training", "float32", 16, 256),
    ("lstm", "inference", "float16", 256, 512),
    ("gru", "training", "float32", 128, 512),
    ("lstm", "inference", "bfloat16", 64, 128),
    ("gru_original", "training", "float16", 16, 512),
]
GRID_T = 512
# The dry run: three tiny configs for both families, and one the split family refuses (its
# weight slice would not fit in registers) for that family only.
DRY_GRID = {family: [("lstm", "inference", "float32", 1, 8), ("gru", "training", "float32", 2, 8),
                     ("gru_original", "inference", "float32", 1, 8)] for family in FAMILIES}
DRY_GRID["triton-split"] = DRY_GRID["triton-split"] + [("lstm", "inference", "float32", 1, 1536)]
DRY_GRID_T = 2


def _grid(dry_run: bool) -> list:
    """(family, config) pairs, config by config so that a limit cuts both families alike."""
    if not dry_run:
        return [(family, c) for c in GRID for family in FAMILIES]
    longest = max(len(v) for v in DRY_GRID.values())
    return [(family, DRY_GRID[family][i]) for i in range(longest) for family in FAMILIES
            if i < len(DRY_GRID[family])]


def _grid_name(family, config, dry_run) -> str:
    op, mode, dtype, batch, hidden = config
    return f"{family} {op} {mode} {dtype} B{batch} H{hidden} T{DRY_GRID_T if dry_run else GRID_T}"


@stage("grid", limit_s=70, dry_limit_s=90, min_s=20,
       cases=lambda dry_run: [_grid_name(f, c, dry_run) for f, c in _grid(dry_run)])
def grid_stage(ctx: Context) -> None:
    import types

    import torch

    import bench
    import lstmgru

    pairs = _grid(ctx.dry_run)
    # compile=False: the grid times the kernels eagerly against cuDNN (bench.py's --compile off)
    args = types.SimpleNamespace(seed=0, warmup=2, min_rounds=1 if ctx.dry_run else 3,
                                 max_rounds=100, compile=False)
    for i, (family, (op, mode, dtype, batch, hidden)) in enumerate(pairs):
        config = dict(op=op, mode=mode, dtype=dtype, batch=batch,
                      seq_len=DRY_GRID_T if ctx.dry_run else GRID_T, input_size=hidden,
                      hidden_size=hidden, num_layers=1, bidirectional=False)
        budget = 0.01 if ctx.dry_run else min(2.0, max(0.2, (ctx.left() - 10) / (len(pairs) - i)))

        def run(family=family, config=config, budget=budget):
            try:
                with lstmgru.use_backend(family), ctx.programs():
                    record = bench.bench_config(lstmgru, config, ctx.device, args, budget)
            except RuntimeError as error:
                if "was requested but cannot run" in str(error):
                    raise Refused(str(error).split(": ", 1)[-1]) from None
                raise
            finally:
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
            return {k: record[k] for k in ("ours_ms", "baseline_ms", "speedup", "max_abs_diff",
                                           "baseline_impl", "rounds")}
        ctx.case(_grid_name(family, (op, mode, dtype, batch, hidden), ctx.dry_run), run)


@stage("variants", limit_s=50, dry_limit_s=90, min_s=20)
def variants_stage(ctx: Context) -> None:
    argv = ["--out-dir", ctx.work] + (["--device", "cpu", "--cells", "LSTM", "--shapes", "3:2:8",
                                       "--rounds", "1", "--name", "variants-dry"]
                                      if ctx.dry_run else
                                      ["--device", "cuda", "--rounds", "10", "--name",
                                       "variants-gpu"])

    def run():
        code = ctx.run_main(argv, path=BENCHMARKS / "variants_bench.py")
        return verdict({"exit": code}, [(code == 0, f"exit status {code}")])
    ctx.case("benchmarks/variants_bench.py", run)


@stage("compile", limit_s=60, dry_limit_s=120, min_s=20)
def compile_stage(ctx: Context) -> None:
    import torch

    import compile_report

    if not compile_report.ptxas_available():
        ctx.status, ctx.note = "skipped", "triton's ptxas is not available"
        print(ctx.note)
        return
    argv = ["--gate", "--json", ctx.work / "compile.json", "--md", ctx.work / "compile.md"]
    if ctx.dry_run:  # one kernel, to see the report run
        argv += ["--arch", "sm_90", "--limit", "1", "--family", "tiled", "--dtype", "fp32",
                 "--batch", "1", "--hidden", "128"]
    else:
        major, minor = torch.cuda.get_device_capability(0)
        argv += ["--arch", f"sm_{major}{minor}", "--subset", "small",
                 "--num-sms", torch.cuda.get_device_properties(0).multi_processor_count,
                 "--jobs", max(1, min(8, (os.cpu_count() or 2) - 2))]
    # A fresh interpreter: compiling needs triton's real JIT, not the dry run's interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run():
        print(f"$ python3 benchmarks/compile_report.py {' '.join(map(str, argv))}", flush=True)
        code = subprocess.run([sys.executable, str(BENCHMARKS / "compile_report.py"),
                               *map(str, argv)], env=env, cwd=REPO,
                              stdin=subprocess.DEVNULL).returncode
        return verdict({"exit": code}, [(code == 0, f"exit status {code} (--gate: see "
                                                    "compile.md in the tarball)")])
    ctx.case("benchmarks/compile_report.py --gate", run)


# =============================================================================================
# A stage's process
# =============================================================================================
def _child(stage_: Stage, work: Path, limit_s: float) -> int:
    """Run one stage in this (new) process; returns its exit status."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.environ.get("GPU_CHECK_FORCE_HANG") == stage_.name:
        # A stand-in for a kernel that never returns: deaf to SIGINT and SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("hanging on purpose (GPU_CHECK_FORCE_HANG)", flush=True)
        while True:
            time.sleep(60)
    _prepare_imports()
    ctx = Context(stage_, work, limit_s)
    ctx.save()
    try:
        stage_.run(ctx)
        code = 0
    except KeyboardInterrupt:
        print(f"stage {stage_.name}: interrupted", flush=True)
        ctx.status, code = "timeout", 130
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        ctx.status, code = "failed", 1
    ctx.save()
    return code


def _prepare_imports() -> None:
    for path in (BENCHMARKS, TESTS) if DRY_RUN else (BENCHMARKS,):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def _preload() -> Optional[str]:
    """Import once in the driver what every stage needs, so that a forked stage starts at
    once. Nothing here may initialise CUDA: a forked child could not use it then."""
    _prepare_imports()
    try:
        import torch

        import bench  # noqa: F401
        import lstmgru  # noqa: F401

        if importlib.util.find_spec("triton") is not None:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            if DRY_RUN:
                import _parallel_interpreter  # noqa: F401
        if torch.cuda.is_initialized():
            return "CUDA was initialised while importing"
    except Exception as error:
        return _first_line(error)
    return None


# =============================================================================================
# The driver
# =============================================================================================
class Driver:

    def __init__(self, outdir: Path):
        self.outdir = outdir
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())
        self.total_s = float(os.environ.get("GPU_CHECK_TOTAL_S")
                             or (DRY_TOTAL_S if DRY_RUN else DEFAULT_TOTAL_S))
        # The deadline on the monotonic clock; the wall clock only tells when the wrapper began.
        self.deadline = time.monotonic() - max(0.0, time.time() - self.t0) + self.total_s
        selected = os.environ.get("GPU_CHECK_STAGES", "").replace(" ", "")
        self.selected = set(selected.split(",")) if selected else None
        self.limits = {}
        for item in filter(None, os.environ.get("GPU_CHECK_LIMITS", "").replace(" ", "")
                           .split(",")):
            name, _, seconds = item.partition("=")
            self.limits[name] = float(seconds)
        unknown = (set(self.limits) | (self.selected or set())) - {s.name for s in STAGES}
        if unknown:
            raise SystemExit(f"gpu_check: unknown stage(s) {', '.join(sorted(unknown))}; "
                             f"stages: {', '.join(s.name for s in STAGES)}")
        self.fork = os.environ.get("GPU_CHECK_FORK", "1") != "0"
        self.log = open(outdir / LOG_NAME, "a", encoding="utf-8")
        self.summary = {
            "dry_run": DRY_RUN,
            "complete": False,
            "started": _dt.datetime.fromtimestamp(self.t0, _dt.timezone.utc)
            .isoformat(timespec="seconds"),
            "total_budget_s": self.total_s,
            "elapsed_s": 0.0,
            "processes": "fork" if self.fork else "exec",
            "environment": {},
            "stages": [{"name": s.name, "block": s.block, "status": "pending", "seconds": None,
                        "limit_s": None} for s in STAGES],
            "cases": [],
            "outdir_files": None,
        }
        self.declared = {s.name: (s.cases(DRY_RUN) if s.cases else []) for s in STAGES}
        for s in STAGES:
            self._set_cases(s.name, [])

    # --- output ---------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.log.write(text + "\n")
        self.log.flush()
        _console(text + "\n")

    def elapsed(self) -> float:
        return round(time.monotonic() - (self.deadline - self.total_s), 1)

    def write_summary(self) -> None:
        self.summary["elapsed_s"] = self.elapsed()
        _write_json(self.outdir / SUMMARY_NAME, self.summary)

    def pack(self) -> None:
        tmp = self.outdir / f".{TARBALL_NAME}.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(self.work.iterdir()):
                if not path.name.startswith("."):
                    tar.add(path, arcname=f"gpu_check/{path.name}")
        os.replace(tmp, self.outdir / TARBALL_NAME)

    def _set_cases(self, stage_name: str, cases: list) -> None:
        """The stage's cases: those it reported, then any declared ones it did not reach."""
        reported = {c["name"] for c in cases}
        missing = [{"name": n, "status": "not run"} for n in self.declared[stage_name]
                   if n not in reported]
        others = [c for c in self.summary["cases"] if c["stage"] != stage_name]
        self.summary["cases"] = others + [{"stage": stage_name, **c} for c in cases + missing]

    def _read_child_results(self, stage_name: str) -> dict:
        path = self.work / f"{stage_name}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    # --- one stage ------------------------------------------------------------------------
    def run_stage(self, index: int, stage_: Stage) -> None:
        entry = self.summary["stages"][index]
        limit = self.limits.get(stage_.name, stage_.dry_limit_s if DRY_RUN else stage_.limit_s)
        left = self.deadline - time.monotonic() - FINAL_RESERVE_S - KILL_GRACE_S
        if self.selected is not None and stage_.name not in self.selected:
            entry.update(status="skipped", note="not in GPU_CHECK_STAGES")
            return
        if left < min(stage_.min_s, limit):
            entry.update(status="skipped",
                         note=f"{max(0, left):.0f}s left, needs {stage_.min_s:.0f}s")
            self.say(f"=== {stage_.name}: skipped ({entry['note']})")
            return
        limit = min(limit, left)
        entry.update(status="running", limit_s=round(limit, 1))
        self.write_summary()
        self.say(f"\n=== [{_dt.datetime.now(_dt.timezone.utc):%H:%M:%S} +{self.elapsed():.0f}s] "
                 f"{stage_.name} (limit {limit:.0f}s)")
        out_path = self.work / f"{stage_.name}.out"
        t0 = time.monotonic()
        pid, poll = self._start(stage_, out_path, limit)
        try:
            code, timed_out = self._supervise(stage_, pid, poll, out_path, limit, t0)
        finally:
            _signal_group(pid, signal.SIGKILL)  # whatever the stage left running
        seconds = round(time.monotonic() - t0, 1)
        results = self._read_child_results(stage_.name)
        cases = results.get("cases", [])
        self._set_cases(stage_.name, cases)
        if stage_.name == "env":
            self.summary["environment"] = results.get("info", {})
        failed = [c for c in cases if c["status"] in ("fail", "error")]
        if timed_out:
            status = "timeout"
        elif code != 0 or results.get("status") == "failed" or failed:
            status = "failed"
        else:
            status = results.get("status") or "ok"
        entry.update(status=status, seconds=seconds, cpu_s=poll.cpu_s, exit=code)
        if results.get("note"):
            entry["note"] = results["note"]
        if results.get("info") and stage_.name != "env":
            entry["info"] = results["info"]
        counts = {}
        for c in self.summary["cases"]:
            if c["stage"] == stage_.name:
                counts[c["status"]] = counts.get(c["status"], 0) + 1
        entry["cases"] = counts
        self.say(f"=== {stage_.name}: {status} in {seconds:.1f}s"
                 + (f" ({_compact(counts)})" if counts else ""))

    def _supervise(self, stage_: Stage, pid: int, poll, out_path: Path, limit: float,
                   t0: float):
        """Wait for the stage, copying its output, and stop it at its limit: SIGINT first
        where the stage asks for it, then SIGTERM, then SIGKILL to its process group."""
        offset, code, timed_out, sent = 0, None, False, set()
        next_summary = t0 + SUMMARY_EVERY_S
        while code is None:
            time.sleep(POLL_S)
            offset = self._copy_output(out_path, offset)
            code = poll()
            now = time.monotonic() - t0
            if code is not None:
                break
            if stage_.sigint_s and now >= limit - stage_.sigint_s and "INT" not in sent:
                self.say(f"--- {stage_.name}: SIGINT, {stage_.sigint_s:.0f}s before its limit")
                _signal_group(pid, signal.SIGINT)
                sent.add("INT")
            if now >= limit and "TERM" not in sent:
                self.say(f"--- {stage_.name}: past its limit of {limit:.0f}s: SIGTERM")
                _signal_group(pid, signal.SIGTERM)
                sent.add("TERM")
                timed_out = True
            if now >= limit + KILL_GRACE_S and "KILL" not in sent:
                self.say(f"--- {stage_.name}: still running: SIGKILL")
                _signal_group(pid, signal.SIGKILL)
                sent.add("KILL")
            if time.monotonic() >= next_summary:
                self._set_cases(stage_.name, self._read_child_results(stage_.name).get("cases", []))
                self.write_summary()
                next_summary += SUMMARY_EVERY_S
        self._copy_output(out_path, offset)
        return code, timed_out

    def _start(self, stage_: Stage, out_path: Path, limit: float):
        """Start the stage in a new session; returns (pid, poll) where poll() gives the exit
        status once it has ended (negative: killed by that signal), else None."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.log.flush()
        if not self.fork:
            with open(out_path, "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--child", stage_.name,
                     str(self.work), str(limit)],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=REPO, start_new_session=True)
            return proc.pid, _poller(proc.pid, proc)
        pid = os.fork()
        if pid == 0:  # the stage's process
            code = 70
            try:
                os.setsid()
                fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                code = _child(stage_, self.work, limit)
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        return pid, _poller(pid)

    def _copy_output(self, path: Path, offset: int) -> int:
        """Copy what the stage printed since ``offset`` into the log and onto the console."""
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return offset
        if data:
            text = data.decode("utf-8", "replace")
            self.log.write(text)
            self.log.flush()
            _console(text)
        return offset + len(data)

    # --- the whole run --------------------------------------------------------------------
    def run(self) -> int:
        self.say(f"=== gpu_check{' (dry run)' if DRY_RUN else ''}: {len(STAGES)} stages, "
                 f"budget {self.total_s:.0f}s, work files in {self.work}")
        self.write_summary()
        if self.fork:
            problem = _preload()
            if problem:
                self.say(f"=== preloading failed ({problem}): a fresh process per stage")
                self.fork = False
                self.summary["processes"] = "exec"
        interrupted = None
        try:
            for index, stage_ in enumerate(STAGES):
                self.run_stage(index, stage_)
                self.write_summary()
                self.pack()
                if stage_.block == "first" and (index + 1 == len(STAGES)
                                                or STAGES[index + 1].block != "first"):
                    self.summary["first_block_s"] = self.elapsed()
        except KeyboardInterrupt as error:  # SIGINT or SIGTERM to the driver: report anyway
            interrupted = error
            for entry in self.summary["stages"]:
                if entry["status"] == "running":
                    entry["status"] = "interrupted"
            self.say("=== interrupted: writing what was done")
        self.summary["complete"] = interrupted is None
        self.pack()
        self.write_summary()
        files = sorted(str(p.relative_to(self.outdir)) for p in self.outdir.rglob("*")
                       if p.is_file())
        self.summary["outdir_files"] = files
        self.write_summary()
        report = self.report()
        self.say(report)
        shutil.rmtree(self.work, ignore_errors=True)
        bad = [s for s in self.summary["stages"] if s["status"] in ("failed", "timeout")]
        return 1 if (bad or interrupted or len(files) > MAX_OUTDIR_FILES) else 0

    def report(self) -> str:
        """The compact summary printed last."""
        env = self.summary["environment"]
        load = None
        with contextlib.suppress(OSError, AttributeError):
            load = round(os.getloadavg()[0], 2)
        lines = ["", "=" * 78,
                 f"gpu_check summary{' (DRY RUN: tiny shapes on the CPU)' if DRY_RUN else ''}: "
                 f"{env.get('device', '?')} | torch {env.get('torch')} | triton "
                 f"{env.get('triton')} | cuDNN {env.get('cudnn')} | {env.get('commit')} | "
                 f"{env.get('date')}",
                 f"{'stage':12s} {'status':9s} {'seconds':>8s} {'cpu s':>6s}  cases"]
        for s in self.summary["stages"]:
            seconds = f"{s['seconds']:.1f}" if s.get("seconds") is not None else "-"
            cpu = f"{s['cpu_s']:.1f}" if s.get("cpu_s") is not None else "-"
            detail = _compact(s.get("cases") or {}) or s.get("note", "")
            lines.append(f"{s['name']:12s} {s['status']:9s} {seconds:>8s} {cpu:>6s}  {detail}")
        headline = {c["name"]: c for c in self.summary["cases"] if c["stage"] == "headline"}
        for mode in MODES:
            parts = []
            for name in HEADLINE_CONTENDERS:
                c = headline.get(f"{mode} {name}", {})
                if "ms" in c:
                    ratio = f" {c['speedup_vs_cudnn']:.2f}x" if "speedup_vs_cudnn" in c else ""
                    ran = f" [{c['ran']}]" if name == "auto" and c.get("ran") else ""
                    parts.append(f"{name} {c['ms']:.3f} ms{ratio}{ran}")
                elif c:
                    parts.append(f"{name} {c['status']}")
            if any(" ms" in part for part in parts):
                lines.append(f"headline {mode}: " + " | ".join(parts))
        barrier = [c for c in self.summary["cases"] if c["stage"] == "barrier"
                   and "us_per_sync" in c]
        if barrier:
            lines.append("barrier: " + " | ".join(
                f"{c['name']} (P={c['programs']}, {c['warps']} warps) {c['us_per_sync']:.3f} us"
                for c in barrier))
        bad = [c for c in self.summary["cases"] if c["status"] in ("fail", "error")]
        for c in bad[:25]:
            why = c.get("failed") or c.get("error") or c.get("message") or ""
            lines.append(f"  {c['status'].upper()} [{c['stage']}] {c['name']}: {why}")
        if len(bad) > 25:
            lines.append(f"  ... and {len(bad) - 25} more in summary.json")
        files = self.summary["outdir_files"] or []
        lines.append(f"OUTDIR: {len(files)} files ({', '.join(files)})"
                     + ("" if len(files) <= MAX_OUTDIR_FILES
                        else f"  MORE THAN {MAX_OUTDIR_FILES}"))
        lines.append(f"first block {self.summary.get('first_block_s', '-')}s, total "
                     f"{self.elapsed():.0f}s of {self.total_s:.0f}s, load average {load}")
        return "\n".join(lines)


def _console(text: str) -> None:
    """Echo to stdout; a console that went away (a closed pipe) leaves the log to carry on."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError:
        sys.stdout = open(os.devnull, "w")


def _poller(pid: int, proc: subprocess.Popen = None):
    """poll() for a child: its exit status once it has ended (negative: the signal that killed
    it), else None; ``poll.cpu_s`` is then the CPU time it used (not its own children's)."""
    def poll():
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if not done:
            return None
        poll.cpu_s = round(usage.ru_utime + usage.ru_stime, 1)
        code = os.waitstatus_to_exitcode(status)
        if proc is not None:
            proc.returncode = code  # reaped here, not by Popen
        return code
    poll.cpu_s = None
    return poll


def _signal_group(pid: int, sig) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _stop_driver(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # GPU_CHECK_FORK=0: one stage in this fresh process
        name, work, limit = argv[1], Path(argv[2]), float(argv[3])
        return _child(next(s for s in STAGES if s.name == name), work, limit)
    if argv[:1] == ["--list"]:
        for s in STAGES:
            print(f"{s.name:12s} {s.block:6s} limit {s.limit_s:.0f}s "
                  f"(dry run {s.dry_limit_s:.0f}s)")
        return 0
    if len(argv) != 1:
        print("usage: gpu_check.py OUTDIR | --list (normally run through gpu_check.sh)",
              file=sys.stderr)
        return 2
    outdir = Path(argv[0])
    outdir.mkdir(parents=True, exist_ok=True)
    if DRY_RUN:
        # Before torch and triton are imported: the CPU only, kernels in the interpreter.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["TRITON_INTERPRET"] = "1"
    signal.signal(signal.SIGTERM, _stop_driver)
    return Driver(outdir).run()


if __name__ == "__main__":
    sys.exit(main())
