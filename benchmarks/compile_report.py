"""Compile every kernel the launchers would launch on the GPU, offline, and report its resources.

    python benchmarks/compile_report.py --arch sm_90 --json OUT.json [--md OUT.md] [--subset small|full]

No GPU is needed: the kernels are compiled for the target architecture with Triton's own
compiler and its bundled ptxas.

How the kernels and their arguments are found (nothing is listed by hand):

1. Recording. For every configuration the family's real launchers (``lstm_forward``,
   ``gru_backward``, ...) are called on small CPU tensors (T = 2 steps, the real B and H) with
   ``lstmgru._kernels._launch.launch`` replaced by a recorder, so they allocate their outputs and
   scratch exactly as on the GPU, pick block shapes with their own functions (``lstm_blocks``,
   ``gru_blocks``, ``split_plan``) and hand ``(kernel, grid, *args, **meta)`` to the recorder
   instead of launching. A backward configuration first calls the forward (recorded and dropped)
   to get the saved tensors. The few places where a launcher asks "am I on a GPU?" (the fp32
   dot precision, the SM count, the split kernels' device check) are patched per family to
   answer as on the GPU (``Family.patches``).
2. Specialisation. The recorded arguments go through Triton's own binder, the one
   ``kernel[grid](...)`` uses, built for the target instead of the active driver: it turns
   tensors into ``*fp32``/``*bf16``/... pointers with their 16-byte alignment, None into a
   constexpr, ints into i32/i64 (with Triton's divisibility-by-16 specialisation), and the
   launcher's keyword arguments into constexprs and compile options. Kernels whose
   specialisation is identical compile once (T only enters as a non-specialised int).
3. Compilation with ``triton.compile`` for ``cuda:<arch>`` and analysis of what comes out:
   registers, spill bytes (ptxas' own ``-v`` log), shared memory (Triton's metadata), SASS from
   ``cuobjdump -sass`` and the PTX.

Loop heuristic (SASS): every branch to a lower address closes a loop [target, branch]. The time
loop is the widest such interval: in every kernel here the time loop encloses all the per-step
work, and the loops outside it (state copies before and after) are short. ``loop_ldl`` /
``loop_stl`` count local-memory loads/stores inside that interval; ``*_any_loop`` inside any loop.

Adding a kernel family is one entry in ``FAMILIES``.
"""
import argparse
import concurrent.futures as cf
import contextlib
import datetime
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
DEFAULT_SMS = 132     # H100 / H200


# --------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------
def _gpu_dot_precision(dtype, device):
    from lstmgru._kernels._common import dot_precision
    return dot_precision(dtype, torch.device("cuda"))


@dataclass
class Family:
    name: str
    lstm_module: str          # module holding lstm_forward / lstm_backward
    gru_module: str           # module holding gru_forward / gru_backward
    # Module attributes replaced while recording so that the launchers decide as on the GPU
    # (attributes a module lacks are skipped). Values are factories taking the run's options.
    patches: Dict[str, Callable] = field(default_factory=dict)
    # Launch keywords the launcher adds only on CUDA devices.
    cuda_meta: Dict[str, object] = field(default_factory=dict)
    optional: bool = False    # skipped (with a note) when the module does not import
    gate: bool = False        # the CI gate fails on loop spills of this family


FAMILIES = [
    Family("tiled", "lstmgru._kernels.lstm", "lstmgru._kernels.gru",
           patches={"dot_precision": lambda opts: _gpu_dot_precision}),
    Family("split", "lstmgru._kernels.split", "lstmgru._kernels.split", optional=True, gate=True,
           patches={"supports": lambda opts: (lambda *a, **k: None),
                    "_num_sms": lambda opts: (lambda device: opts["num_sms"]),
                    "_interpreting": lambda opts: (lambda: False),
                    "dot_precision": lambda opts: _gpu_dot_precision},
           cuda_meta={"launch_cooperative_grid": True}),
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CELLS = ("lstm", "gru", "gru_orig")  # gru: reset_after=True (torch.nn); gru_orig: False


@dataclass(frozen=True)
class Config:
    cell: str
    direction: str    # fwd | bwd
    B: int
    H: int
    dtype: str
    training: bool    # forward only; a backward always follows a training forward
    lengths: bool = False
    reverse: bool = False
    tf32: bool = True  # torch.backends.cudnn.allow_tf32 (fp32 only)
    family: Optional[str] = None  # only this family compiles it (None: every family)

    def label(self):
        flags = [f for f, on in (("lengths", self.lengths), ("reverse", self.reverse),
                                 ("ieee", self.dtype == "fp32" and not self.tf32)) if on]
        mode = "train" if self.training else "infer"
        return (f"{self.cell} {self.direction} {mode} B={self.B} H={self.H} {self.dtype}"
                + (" " + ",".join(flags) if flags else ""))


def configs(subset: str) -> List[Config]:
    out = []
    if subset == "small":
        # A few cases the CI gate compiles in a few minutes on two cores: one small shape per
        # cell, and the published point (LSTM, B16 T1024 H768, fp16 and bf16, forward and
        # backward), where the split family must keep its time loop free of local memory.
        for cell in ("lstm", "gru"):
            out.append(Config(cell, "fwd", 16, 128, "fp16", True))
            out.append(Config(cell, "bwd", 16, 128, "fp16", True))
        out.append(Config("gru_orig", "fwd", 1, 256, "fp32", False, lengths=True, reverse=True))
        for dtype in ("fp16", "bf16"):
            out.append(Config("lstm", "fwd", 16, 768, dtype, True, family="split"))
            out.append(Config("lstm", "bwd", 16, 768, dtype, True, family="split"))
        return out
    batches = (1, 16, 64, 256)
    hiddens = (128, 256, 512, 768, 1024)
    for cell in CELLS:
        for dtype in DTYPES:
            for B in batches:
                for H in hiddens:
                    out.append(Config(cell, "fwd", B, H, dtype, False))
                    out.append(Config(cell, "fwd", B, H, dtype, True))
                    out.append(Config(cell, "bwd", B, H, dtype, True))
    # Flags that change the code, on one shape per cell and dtype: lengths, reverse, and fp32
    # with TF32 off (exact products).
    for cell in CELLS:
        for dtype in DTYPES:
            for direction, training in (("fwd", True), ("bwd", True)):
                out.append(Config(cell, direction, 64, 512, dtype, training, lengths=True))
                out.append(Config(cell, direction, 64, 512, dtype, training, reverse=True))
        for direction, training in (("fwd", False), ("fwd", True), ("bwd", True)):
            for B in batches:
                out.append(Config(cell, direction, B, 512, "fp32", training, tf32=False))
    return out


# --------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    meta: dict


@contextlib.contextmanager
def _recording(family: Family, modules, opts, sink: List[Launch]):
    from lstmgru._kernels import _launch
    saved = []

    def record(kernel, grid, *args, **meta):
        sink.append(Launch(kernel, tuple(grid), args, dict(family.cuda_meta, **meta)))

    saved.append((_launch, "launch", _launch.launch))
    _launch.launch = record
    for mod in modules:
        for attr, factory in family.patches.items():
            if hasattr(mod, attr):
                saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, factory(opts))
    try:
        yield
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)


def record_config(family: Family, cfg: Config, opts) -> List[Launch]:
    lstm_mod = importlib.import_module(family.lstm_module)
    gru_mod = importlib.import_module(family.gru_module)
    mod = lstm_mod if cfg.cell == "lstm" else gru_mod
    dtype = DTYPES[cfg.dtype]
    T, B, H = 2, cfg.B, cfg.H
    gates = 4 if cfg.cell == "lstm" else 3
    reset_after = cfg.cell == "gru"
    # As the modules call them: initial states always given (zeros when the user gives none),
    # bias_hn for the default bias=True GRU, every output gradient materialised by autograd.
    gx = torch.zeros(T, B, gates * H, dtype=dtype)
    w = torch.zeros(gates * H, H, dtype=dtype)
    h0 = torch.zeros(B, H, dtype=dtype)
    c0 = torch.zeros(B, H, dtype=dtype)
    bias_hn = torch.zeros(H, dtype=dtype) if reset_after else None
    lengths = torch.full((B,), T, dtype=torch.int64) if cfg.lengths else None
    training = cfg.training or cfg.direction == "bwd"
    launches: List[Launch] = []
    old_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    try:
        with _recording(family, {lstm_mod, gru_mod}, opts, launches):
            if cfg.cell == "lstm":
                y, h_n, c_n, saved = mod.lstm_forward(gx, h0, c0, w, lengths, cfg.reverse,
                                                      training)
            else:
                y, h_n, saved = mod.gru_forward(gx, h0, w, bias_hn, lengths, cfg.reverse,
                                                reset_after, training)
            if cfg.direction == "bwd":
                del launches[:]
                gy, ghn, gcn = torch.zeros_like(y), torch.zeros_like(h_n), torch.zeros_like(h0)
                if cfg.cell == "lstm":
                    mod.lstm_backward(gy, ghn, gcn, saved, y, h0, c0, w, lengths, cfg.reverse)
                else:
                    mod.gru_backward(gy, ghn, saved, y, h0, w, bias_hn, lengths, cfg.reverse,
                                     reset_after)
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32
    return launches


# --------------------------------------------------------------------------------------
# Specialisation and compilation
# --------------------------------------------------------------------------------------
def parse_arch(arch: str) -> int:
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise SystemExit(f"--arch must look like sm_90, got {arch!r}")
    return int(m.group(1))


_binders = {}


def specialise(launch: Launch, target):
    """signature, constexprs, attrs, options exactly as ``kernel[grid](*args, **meta)`` builds
    them on a device of ``target`` (Triton's binder, not a hand-written list)."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    kernel = launch.kernel
    key = id(kernel)
    if key not in _binders:
        backend = make_backend(target)
        _binders[key] = (backend, create_function_from_signature(kernel.signature, kernel.params,
                                                                 backend))
    backend, binder = _binders[key]
    kwargs = dict(launch.meta)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args,
                                                             specialization, options)
    return signature, constexprs, attrs, options


def _tool(name: str) -> Optional[str]:
    import triton
    from triton import knobs
    tool = getattr(knobs.nvidia, name, None)
    path = getattr(tool, "path", None) if tool is not None else None
    if path and os.path.exists(path):
        return path
    cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return cand if os.path.exists(cand) else shutil.which(name)


# ptxas' -v log, captured from the compiler's own ptxas call (its stderr goes to a file).
_ptxas_log = threading.local()


class _SubprocessShim:
    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, cmd, *args, **kwargs):
        result = subprocess.run(cmd, *args, **kwargs)
        err = kwargs.get("stderr")
        if isinstance(cmd, (list, tuple)) and "-v" in cmd and hasattr(err, "name"):
            try:
                with open(err.name) as f:
                    _ptxas_log.text = f.read()
            except OSError:
                pass
        return result


def _install_shim():
    from triton.backends.nvidia import compiler as nv
    if not isinstance(nv.subprocess, _SubprocessShim):
        nv.subprocess = _SubprocessShim()


def _ptxas_version() -> Optional[str]:
    try:
        out = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    except (OSError, TypeError):
        return None
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return m.group(2) if m else None


def ptxas_available() -> bool:
    try:
        return _tool("ptxas") is not None
    except Exception:
        return False


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_RE_TARGET = re.compile(r"0x([0-9a-f]+)")


def analyse_sass(sass: str) -> dict:
    ins = []  # (address, opcode, operands)
    for m in _RE_SASS.finditer(sass):
        ins.append((int(m.group(1), 16), m.group(3), m.group(4)))
    loops = []
    for addr, op, operands in ins:
        if op.split(".")[0] in ("BRA", "JMP"):
            t = _RE_TARGET.search(operands)
            # (a branch to itself is the trap loop after EXIT, not a loop of the kernel)
            if t and int(t.group(1), 16) < addr:
                loops.append((int(t.group(1), 16), addr))

    def count(prefixes, lo=None, hi=None):
        n = 0
        for addr, op, _ in ins:
            if lo is not None and not (lo <= addr <= hi):
                continue
            if op.split(".")[0] in prefixes:
                n += 1
        return n

    def in_any_loop(prefixes):
        return sum(1 for addr, op, _ in ins if op.split(".")[0] in prefixes
                   and any(lo <= addr <= hi for lo, hi in loops))

    out = {
        "sass_instructions": len(ins),
        "HMMA": count({"HMMA"}), "HGMMA": count({"HGMMA"}), "FFMA": count({"FFMA"}),
        "LDL": count({"LDL"}), "STL": count({"STL"}),
        "loops": len(loops),
        "LDL_any_loop": in_any_loop({"LDL"}), "STL_any_loop": in_any_loop({"STL"}),
    }
    if loops:
        lo, hi = max(loops, key=lambda l: l[1] - l[0])
        out.update(time_loop_sass=[lo, hi], loop_ldl=count({"LDL"}, lo, hi),
                   loop_stl=count({"STL"}, lo, hi), loop_HMMA=count({"HMMA"}, lo, hi),
                   loop_HGMMA=count({"HGMMA"}, lo, hi), loop_FFMA=count({"FFMA"}, lo, hi))
    else:
        out.update(time_loop_sass=None, loop_ldl=0, loop_stl=0, loop_HMMA=0, loop_HGMMA=0,
                   loop_FFMA=0)
    return out


def compile_one(launch: Launch, target, workdir: str) -> dict:
    import triton
    from triton.compiler import ASTSource
    _install_shim()
    signature, constexprs, attrs, options = specialise(launch, target)
    _ptxas_log.text = None
    t0 = time.perf_counter()
    ck = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                        options=options.__dict__)
    compile_s = time.perf_counter() - t0
    md = ck.metadata
    rec = {"compile_s": round(compile_s, 3), "shared_bytes": int(md.shared),
           "num_warps": md.num_warps, "num_stages": md.num_stages}
    log = _ptxas_log.text
    if log is None:  # the compiler did not call ptxas through subprocess.run: run it again
        ptx = os.path.join(workdir, "k.ptx")
        with open(ptx, "w") as f:
            f.write(ck.asm["ptx"])
        arch = f"sm_{target.arch}a" if target.arch >= 90 else f"sm_{target.arch}"
        log = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={arch}", ptx, "-o",
                              ptx + ".o"], capture_output=True, text=True).stderr
    regs = _RE_REGS.search(log or "")
    spill = _RE_SPILL.search(log or "")
    rec["registers"] = int(regs.group(1)) if regs else None
    rec["stack_bytes"] = int(spill.group(1)) if spill else None
    rec["spill_store_bytes"] = int(spill.group(2)) if spill else None
    rec["spill_load_bytes"] = int(spill.group(3)) if spill else None
    ptx = ck.asm["ptx"]
    rec["ptx_mma_sync"] = len(re.findall(r"\bmma\.sync\.", ptx))
    rec["ptx_wgmma"] = len(re.findall(r"\bwgmma\.mma_async\.", ptx))
    cuobjdump = _tool("cuobjdump")
    if cuobjdump:
        cubin = os.path.join(workdir, f"k{threading.get_ident()}.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
        rec.update(analyse_sass(sass))
    rec["product"] = ("HGMMA" if rec.get("HGMMA") or rec["ptx_wgmma"] else
                      "HMMA" if rec.get("HMMA") or rec["ptx_mma_sync"] else "FFMA")
    rec["signature"] = {k: v for k, v in signature.items() if v != "constexpr"}
    # By parameter name: the kernel's constexpr parameters, and the arguments the binder
    # specialised to constants (None pointers, ints equal to 1).
    rec["constexprs"] = {launch.kernel.params[k[0]].name: _plain(v)
                         for k, v in constexprs.items() if len(k) == 1}
    return rec


def _plain(v):
    return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------
_JOBS: List[tuple] = []   # (key, launch) per unique compilation, inherited by forked workers


def _work(index):
    key, launch, target = _JOBS[index]
    with tempfile.TemporaryDirectory() as d:
        try:
            return index, compile_one(launch, target, d), None
        except Exception as e:  # a kernel that does not compile is a result, not a crash
            return index, None, f"{type(e).__name__}: {str(e)[:2000]}"


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def _source_ids(fams):
    """git blob id of every family module's file, and whether it differs from HEAD: the
    report says which source it compiled even when a module is not committed yet."""
    out = {}
    for fam in fams:
        for name in {fam.lstm_module, fam.gru_module}:
            path = importlib.import_module(name).__file__
            d = os.path.dirname(path)
            blob = subprocess.run(["git", "-C", d, "hash-object", path], capture_output=True,
                                  text=True).stdout.strip() or None
            head = subprocess.run(["git", "-C", d, "ls-files", "-s", os.path.basename(path)],
                                  capture_output=True, text=True).stdout.split()
            out[name] = {"blob": blob, "committed": bool(head) and head[1] == blob}
    return out


def run(arch: str, subset: str, jobs: int = 1, num_sms: int = DEFAULT_SMS,
        families: Optional[List[str]] = None, limit: Optional[int] = None, progress=True,
        select: Optional[Callable[[Config], bool]] = None):
    import triton
    from triton.backends.compiler import GPUTarget
    target = GPUTarget("cuda", parse_arch(arch), 32)
    opts = {"num_sms": num_sms}
    t_start = time.perf_counter()
    notes, fams = [], []
    for fam in FAMILIES:
        if families and fam.name not in families:
            continue
        try:
            importlib.import_module(fam.lstm_module)
            importlib.import_module(fam.gru_module)
        except ImportError as e:
            if not fam.optional:
                raise
            notes.append(f"family {fam.name} skipped: {e}")
            continue
        fams.append(fam)

    rows, unique = [], {}
    for fam in fams:
        for cfg in [c for c in configs(subset) if (select is None or select(c))
                    and c.family in (None, fam.name)][:limit]:
            try:
                launches = record_config(fam, cfg, opts)
            except (ValueError, RuntimeError) as e:
                # e.g. a split layout that does not fit: part of the report
                rows.append({"family": fam.name, "config": cfg.__dict__, "label": cfg.label(),
                             "error": f"launcher refused: {e}"})
                continue
            for ln in launches:
                try:
                    sig, constexprs, attrs, options = specialise(ln, target)
                    key = (ln.kernel.fn.__module__, ln.kernel.__name__, repr(sorted(sig.items())),
                           repr(sorted((str(k), str(v)) for k, v in constexprs.items())),
                           repr(sorted((str(k), str(v)) for k, v in attrs.items())),
                           repr(sorted(options.__dict__.items())))
                except Exception as e:
                    rows.append({"family": fam.name, "config": cfg.__dict__, "label": cfg.label(),
                                 "kernel": ln.kernel.__name__, "error": f"binder: {e}"})
                    continue
                if key not in unique:
                    unique[key] = len(_JOBS)
                    _JOBS.append((key, ln, target))
                rows.append({"family": fam.name, "kernel": ln.kernel.__name__,
                             "config": cfg.__dict__, "label": cfg.label(),
                             "grid": list(ln.grid), "job": unique[key],
                             "launch_options": {k: _plain(v) for k, v in ln.meta.items()
                                                if k in options.__dict__}})
    record_s = time.perf_counter() - t_start
    if progress:
        print(f"{len(rows)} kernel launches recorded in {record_s:.1f} s, "
              f"{len(_JOBS)} distinct compilations", file=sys.stderr)

    results: Dict[int, tuple] = {}
    t_compile = time.perf_counter()
    if jobs > 1:
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
            for n, (i, rec, err) in enumerate(pool.map(_work, range(len(_JOBS)))):
                results[i] = (rec, err)
                if progress:
                    print(f"[{n + 1}/{len(_JOBS)}] {_JOBS[i][1].kernel.__name__}", file=sys.stderr)
    else:
        for i in range(len(_JOBS)):
            results[i] = _work(i)[1:]
            if progress:
                r = results[i][0]
                print(f"[{i + 1}/{len(_JOBS)}] {_JOBS[i][1].kernel.__name__} "
                      + (f"{r['compile_s']:.1f}s regs={r['registers']}" if r else results[i][1]),
                      file=sys.stderr)
    compile_wall = time.perf_counter() - t_compile
    for row in rows:
        if "job" in row:
            rec, err = results[row["job"]]
            if err:
                row["error"] = err
            else:
                row.update(rec)
    meta = {
        "arch": arch, "triton": triton.__version__, "torch": torch.__version__,
        "python": sys.version.split()[0], "date": datetime.datetime.now(
            datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _git_commit(), "subset": subset, "num_sms": num_sms, "jobs": jobs,
        "families": [f.name for f in fams], "sources": _source_ids(fams), "notes": notes,
        "launches": len(rows), "compilations": len(_JOBS),
        "record_s": round(record_s, 1), "compile_wall_s": round(compile_wall, 1),
        "compile_cpu_s": round(sum(r[0]["compile_s"] for r in results.values() if r[0]), 1),
        "ptxas": _ptxas_version(), "smem_limit_bytes": SMEM_LIMIT,
        "loop_heuristic": "SASS backward branches; the time loop is the widest loop",
    }
    return {"meta": meta, "records": rows}


def summary(report) -> Dict[str, dict]:
    out = {}
    for row in report["records"]:
        s = out.setdefault(row["family"], {"launches": 0, "refused": 0, "errors": 0,
                                           "max_registers": 0,
                                           "max_shared_bytes": 0, "spilling": 0,
                                           "loop_spilling": 0, "product": {}})
        if "error" in row:
            s["refused" if row["error"].startswith("launcher refused") else "errors"] += 1
            continue
        s["launches"] += 1
        s["max_registers"] = max(s["max_registers"], row["registers"] or 0)
        s["max_shared_bytes"] = max(s["max_shared_bytes"], row["shared_bytes"])
        s["spilling"] += bool(row["spill_store_bytes"] or row["spill_load_bytes"])
        s["loop_spilling"] += bool(row.get("loop_ldl") or row.get("loop_stl"))
        d = s["product"].setdefault(row["config"]["dtype"] + (
            "" if row["config"].get("tf32", True) or row["config"]["dtype"] != "fp32" else "-ieee"),
            {})
        d[row["product"]] = d.get(row["product"], 0) + 1
    return out


def gate_failures(report, smem_limit: int = SMEM_LIMIT) -> List[str]:
    """What the CI gate fails on: any kernel over the shared-memory limit, any local-memory
    access inside the time loop of a gated family, any kernel that did not compile."""
    gated = {f.name for f in FAMILIES if f.gate}
    bad = []
    for row in report["records"]:
        what = f"{row['family']} {row.get('kernel', '?')} [{row['label']}]"
        if "error" in row:
            if not row["error"].startswith("launcher refused"):
                bad.append(f"{what}: {row['error'][:300]}")
            continue
        if row["shared_bytes"] > smem_limit:
            bad.append(f"{what}: {row['shared_bytes']} bytes of shared memory > {smem_limit}")
        if row["family"] in gated and (row.get("loop_ldl") or row.get("loop_stl")):
            bad.append(f"{what}: {row['loop_ldl']} LDL / {row['loop_stl']} STL in the time loop")
    return bad


def markdown(report) -> str:
    m = report["meta"]
    lines = [f"# Offline compile report: {m['arch']}, triton {m['triton']}", "",
             f"{m['date']}, commit {m['commit']}, torch {m['torch']}, subset `{m['subset']}`, "
             f"{m['launches']} launches ({m['compilations']} distinct compilations) in "
             f"{m['compile_wall_s']} s wall on {m['jobs']} process(es), "
             f"{m['compile_cpu_s']} s summed compile time. SMs assumed: {m['num_sms']}."
             + (f" ptxas {m['ptxas']}." if m.get("ptxas") else "")
             + (f" Arguments: `{' '.join(m['argv'])}`." if m.get("argv") else ""), ""]
    for n in m["notes"]:
        lines.append(f"- {n}")
    lines += ["", "## Summary", "",
              "| family | launches | configs refused | errors | max regs | launches spilling "
              "| launches with loop LDL/STL | max smem (bytes) | product per dtype |",
              "|---|---|---|---|---|---|---|---|---|"]
    for fam, s in summary(report).items():
        prod = "; ".join(f"{d}: " + ", ".join(f"{k} x{v}" for k, v in p.items())
                         for d, p in s["product"].items())
        lines.append(f"| {fam} | {s['launches']} | {s['refused']} | {s['errors']} | "
                     f"{s['max_registers']} | "
                     f"{s['spilling']} | {s['loop_spilling']} | {s['max_shared_bytes']} | {prod} |")
    lines += ["", "Per kernel (over all its configurations):", "",
              "| family | kernel | launches | regs min-max | spilling | max spill st/ld bytes "
              "| loop LDL/STL (launches) | max smem | product |", "|---|---|---|---|---|---|---|---|---|"]
    per = {}
    for r in report["records"]:
        if "error" not in r:
            per.setdefault((r["family"], r["kernel"]), []).append(r)
    for (fam, kern), rs in sorted(per.items()):
        regs = [r["registers"] or 0 for r in rs]
        prods = sorted({r["product"] for r in rs})
        lines.append(
            f"| {fam} | {kern} | {len(rs)} | {min(regs)}-{max(regs)} | "
            f"{sum(bool(r['spill_store_bytes'] or r['spill_load_bytes']) for r in rs)} | "
            f"{max(r['spill_store_bytes'] or 0 for r in rs)}/"
            f"{max(r['spill_load_bytes'] or 0 for r in rs)} | "
            f"{sum(bool(r.get('loop_ldl') or r.get('loop_stl')) for r in rs)} | "
            f"{max(r['shared_bytes'] for r in rs)} | {', '.join(prods)} |")
    spillers = sorted((r for rs in per.values() for r in rs if r.get("loop_ldl") or r.get("loop_stl")),
                      key=lambda r: -(r["loop_ldl"] + r["loop_stl"]))
    if spillers:
        lines += ["", "Most local-memory instructions inside the time loop:", ""]
        lines += [f"- {r['family']} {r['kernel']} [{r['label']}]: {r['loop_ldl']} LDL / "
                  f"{r['loop_stl']} STL, {r['registers']} registers, spills "
                  f"{r['spill_store_bytes']}/{r['spill_load_bytes']} bytes" for r in spillers[:10]]
    bad = gate_failures(report)
    lines += ["", f"Gate (smem <= {SMEM_LIMIT} bytes everywhere, no LDL/STL in the time loop of "
              f"the gated families, everything compiles): " + ("pass" if not bad else
                                                                 f"{len(bad)} failure(s)"), ""]
    lines += [f"- {b}" for b in bad[:50]]
    lines += ["", "## Kernels", "",
              "Spills: ptxas spill store/load bytes. Loop LDL/STL: local-memory instructions "
              "inside the time loop (widest backward-branch interval of the SASS). "
              "Product: HGMMA (wgmma), HMMA (mma.sync) or FFMA (neither).", "",
              "| family | kernel | config | blocks (B,H/J,K) | warps | stages | regs | spill st/ld "
              "| smem | product (loop HMMA/HGMMA/FFMA) | loop LDL/STL | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["records"]:
        if "error" in r:
            lines.append(f"| {r['family']} | {r.get('kernel', '')} | {r['label']} | | | | | | | "
                         f"error: {r['error'][:120].replace('|', '/')} | | |")
            continue
        c = r["constexprs"]
        blocks = ",".join(str(c.get(k)) for k in ("BLOCK_B", "BLOCK_H", "BLOCK_J", "BLOCK_K")
                          if k in c)
        lines.append(
            f"| {r['family']} | {r['kernel']} | {r['label']} | {blocks} | {r['num_warps']} | "
            f"{r['num_stages']} | {r['registers']} | {r['spill_store_bytes']}/"
            f"{r['spill_load_bytes']} | {r['shared_bytes']} | {r['product']} "
            f"({r.get('loop_HMMA', '?')}/{r.get('loop_HGMMA', '?')}/{r.get('loop_FFMA', '?')}) | "
            f"{r.get('loop_ldl', '?')}/{r.get('loop_stl', '?')} | {r['compile_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--json")
    p.add_argument("--md")
    p.add_argument("--subset", choices=("small", "full"), default="full")
    p.add_argument("--jobs", type=int, default=1, help="compile processes")
    p.add_argument("--num-sms", type=int, default=DEFAULT_SMS,
                   help="SM count the split plans assume (132: H100/H200)")
    p.add_argument("--family", nargs="*", help="only these families")
    p.add_argument("--limit", type=int, help="only the first N configs (smoke runs)")
    p.add_argument("--dtype", nargs="*", choices=sorted(DTYPES), help="only these dtypes")
    p.add_argument("--batch", nargs="*", type=int, help="only these batch sizes")
    p.add_argument("--hidden", nargs="*", type=int, help="only these hidden sizes")
    p.add_argument("--from-json", help="re-render the Markdown of an earlier JSON report")
    p.add_argument("--gate", action="store_true",
                   help="exit 1 when the gate fails (see gate_failures)")
    p.add_argument("--smem-limit", type=int, default=SMEM_LIMIT,
                   help=f"shared-memory limit of the gate in bytes (default {SMEM_LIMIT})")
    p.add_argument("--cache-dir", help="Triton cache (default: a fresh temporary one, so the "
                                       "compile times are real)")
    a = p.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            report = json.load(f)
        md = markdown(report)
        if a.md:
            with open(a.md, "w") as f:
                f.write(md)
        print(md.split("## Kernels")[0])
        return 0

    def select(c):
        return ((not a.dtype or c.dtype in a.dtype) and (not a.batch or c.B in a.batch)
                and (not a.hidden or c.H in a.hidden))
    tmp = None
    if a.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = a.cache_dir
    else:
        tmp = tempfile.mkdtemp(prefix="compile-report-cache-")
        os.environ["TRITON_CACHE_DIR"] = tmp
    try:
        report = run(a.arch, a.subset, a.jobs, a.num_sms, a.family, a.limit, select=select)
        # file arguments by name only: the report does not carry this machine's paths
        report["meta"]["argv"] = [os.path.basename(x) if os.sep in x else x
                                  for x in (sys.argv[1:] if argv is None else list(argv))]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    md = markdown(report)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    print(md.split("## Kernels")[0])
    if a.gate:
        bad = gate_failures(report, a.smem_limit)
        for b in bad:
            print("GATE:", b, file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
