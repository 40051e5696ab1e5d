"""Where our kernels are measured faster than torch's cuDNN kernel: the calibration table.

``auto`` on CUDA runs torch's kernel (cuDNN) for every case cuDNN computes, unless a measurement
of *this* GPU says one of our kernel families is faster for the case's bucket. The measurements
live in two JSON tables of the same schema, read lazily (the first time ``auto`` chooses for a
CUDA case, never at import) and once per process:

* the table shipped in the package (``lstmgru/calibration.json``), committed from GPU runs;
* the user's own table, written by ``python -m lstmgru.calibrate`` on their GPU:
  ``$LSTMGRU_CACHE_DIR/calibration.json``, else ``$XDG_CACHE_HOME/lstmgru/calibration.json``,
  else ``~/.cache/lstmgru/calibration.json``. Its entries replace shipped ones with the same key.

An entry holds the measurement of one bucket on one GPU::

    {"device": "NVIDIA H100 80GB HBM3",   # torch.cuda.get_device_name; null: any GPU of ...
     "capability": "9.0",                 # ... this compute capability
     "cell": "LSTM",                      # "LSTM" or "GRU" (layers; the cells are not measured)
     "dtype": "float16",                  # the dtype the recurrence runs in
     "hidden": [513, 1024], "batch": [9, 16],   # the bucket, inclusive; null: no upper end
     "measured_at": {"hidden": 1024, "batch": 16, "seq_len": 256},
     "native_ms": {"forward": ..., "training": ...},
     "kernels": {"triton-tiled": {"forward_ms": ..., "training_ms": ...,
                                  "forward_ratio": 0.82, "training_ratio": 0.91},
                 "triton-split": {"refused": "why the family cannot take the case"}},
     "versions": {"torch": ..., "triton": ..., "cudnn": ...}, "date": "2026-...Z"}

A ratio is the kernel's median time over cuDNN's (forward under no_grad; "training" is forward
plus backward). ``auto`` prefers the kernel with the lowest ratio when both of its ratios are
below ``FASTER_THAN``; a kernel that failed, was refused or disagreed with cuDNN has no ratio.
An entry applies to cases of its cell and dtype whose hidden size and batch fall in its bucket,
without projection, variants or the original GRU (what was measured), on a machine whose GPUs
all match it: by name first, else by capability for an entry without a name.

Buckets (``HIDDEN_BUCKETS``, ``BATCH_BUCKETS``): each is measured at its upper end (the last,
which has none, at twice the end of the one before), and the measurement stands for the whole
bucket. That is a prediction for the
other sizes in it, which is why the buckets are narrow where the kernels' costs change shape
(powers of two of the hidden size; the batch at the tensor-core tile of 16 rows).
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import os
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch

SCHEMA = 1
# Both ratios must be below this for auto to prefer a kernel: 5 % faster, so that the timing
# noise of one calibration run does not flip the choice back and forth.
FASTER_THAN = 0.95
# The implementations a table may prefer over torch's kernel.
KERNELS = ("triton-tiled", "triton-split")
CELLS = ("LSTM", "GRU")
HIDDEN_BUCKETS: Tuple[Tuple[int, Optional[int]], ...] = (
    (1, 128), (129, 256), (257, 512), (513, 768), (769, 1024), (1025, 2048), (2049, None))
BATCH_BUCKETS: Tuple[Tuple[int, Optional[int]], ...] = (
    (1, 4), (5, 16), (17, 64), (65, 256), (257, None))
SHIPPED_NAME = "calibration.json"
CACHE_ENV = "LSTMGRU_CACHE_DIR"


class Gpu(NamedTuple):
    name: str
    capability: str  # "major.minor"


def bucket_of(value: int, buckets) -> Optional[Tuple[int, Optional[int]]]:
    for low, high in buckets:
        if value >= low and (high is None or value <= high):
            return (low, high)
    return None


def representative(bucket: Tuple[int, Optional[int]]) -> int:
    """The size a bucket is measured at: its upper end (twice its lower end's predecessor if
    it has none: 4096 for hidden sizes above 2048)."""
    low, high = bucket
    return 2 * (low - 1) if high is None else high


def user_cache_path() -> Path:
    """Where ``python -m lstmgru.calibrate`` writes by default, and ``auto`` reads."""
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base) / "calibration.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path.home() / ".cache"
    return root / "lstmgru" / "calibration.json"


def empty_table(about: str) -> dict:
    return {"schema": SCHEMA, "about": about,
            "buckets": {"hidden": [list(b) for b in HIDDEN_BUCKETS],
                        "batch": [list(b) for b in BATCH_BUCKETS]},
            "entries": []}


def _entry_key(entry: dict) -> tuple:
    return (entry.get("device"), entry.get("capability"), entry.get("cell"), entry.get("dtype"),
            tuple(entry.get("hidden") or ()), tuple(entry.get("batch") or ()))


def merge(base: Iterable[dict], over: Iterable[dict]) -> List[dict]:
    """``base``'s entries, each replaced by the entry of ``over`` with the same key, then the
    rest of ``over``."""
    merged: Dict[tuple, dict] = {_entry_key(e): e for e in base}
    for entry in over:
        merged[_entry_key(entry)] = entry
    return list(merged.values())


def _read(text: str, source: str) -> List[dict]:
    table = json.loads(text)
    if not isinstance(table, dict) or table.get("schema") != SCHEMA:
        raise ValueError(f"{source}: expected a calibration table with schema {SCHEMA}, got "
                         f"{table.get('schema') if isinstance(table, dict) else type(table)}")
    entries = table.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{source}: 'entries' must be a list of objects")
    return entries


def read_file(path: Path) -> List[dict]:
    return _read(Path(path).read_text(), str(path))


@functools.lru_cache(maxsize=None)
def entries() -> Tuple[dict, ...]:
    """The shipped table with the user cache merged over it; read once per process."""
    shipped = _read(importlib.resources.files("lstmgru").joinpath(SHIPPED_NAME).read_text(),
                    f"lstmgru/{SHIPPED_NAME}")
    user: List[dict] = []
    path = user_cache_path()
    if path.exists():
        try:
            user = read_file(path)
        except (OSError, ValueError) as error:
            # A broken cache must not break the modules: auto then uses what was shipped.
            warnings.warn(f"lstmgru: ignoring the calibration cache {path}: {error}",
                          RuntimeWarning, stacklevel=2)
    return tuple(merge(shipped, user))


@functools.lru_cache(maxsize=None)
def current_gpu() -> Optional[Gpu]:
    """The GPU a measurement must match: None without CUDA, or where the visible GPUs differ
    (a table entry then cannot speak for every device a module may run on)."""
    if not torch.cuda.is_available():
        return None
    gpus = set()
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        gpus.add(Gpu(torch.cuda.get_device_name(index), f"{major}.{minor}"))
    return gpus.pop() if len(gpus) == 1 else None


def reload() -> None:
    """Forget the tables and the GPU read so far (after writing a new table in-process)."""
    entries.cache_clear()
    current_gpu.cache_clear()


def _in(value: int, bucket) -> bool:
    if not isinstance(bucket, (list, tuple)) or len(bucket) != 2:
        return False
    low, high = bucket
    return value >= low and (high is None or value <= high)


def entry_for(gpu: Gpu, cell: str, dtype: torch.dtype, hidden: int, batch: int,
              table: Optional[Iterable[dict]] = None) -> Optional[dict]:
    """The measurement that speaks for this case on ``gpu``: an entry naming the GPU, else one
    for its capability only; None if there is none."""
    dtype_name = str(dtype).replace("torch.", "")
    by_capability = None
    for entry in entries() if table is None else table:
        if (entry.get("cell") != cell or entry.get("dtype") != dtype_name
                or not _in(hidden, entry.get("hidden")) or not _in(batch, entry.get("batch"))):
            continue
        if entry.get("device") == gpu.name:
            return entry
        if entry.get("device") is None and entry.get("capability") == gpu.capability:
            by_capability = by_capability or entry
    return by_capability


def fastest_kernel(entry: dict) -> Optional[str]:
    """The kernel an entry measured faster than torch's in both forward and training, if any
    (the one with the lowest worse-of-two ratio)."""
    best, best_ratio = None, FASTER_THAN
    for name, result in (entry.get("kernels") or {}).items():
        if name not in KERNELS or not isinstance(result, dict):
            continue
        ratios = (result.get("forward_ratio"), result.get("training_ratio"))
        if not all(isinstance(r, (int, float)) and r > 0 for r in ratios):
            continue
        if max(ratios) < best_ratio:
            best, best_ratio = name, max(ratios)
    return best


def preferred_kernel(case) -> Optional[str]:
    """The kernel family ``auto`` should try before torch's kernel for ``case``
    (a ``backends.Case``), or None: no measurement of this GPU says one is faster."""
    if (case.device_type != "cuda" or case.cell not in CELLS or case.proj_size
            or not case.reset_after or case.variants or case.transform or case.batch < 1):
        return None
    gpu = current_gpu()
    if gpu is None:
        return None
    entry = entry_for(gpu, case.cell, case.dtype, case.hidden_size, case.batch)
    return None if entry is None else fastest_kernel(entry)
