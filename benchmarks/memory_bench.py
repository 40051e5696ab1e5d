#!/usr/bin/env python
"""What each implementation keeps for the backward: bytes per step and batch row, in units of
H values of the model's dtype (H fp32 values = 4H bytes for float32), input and weights included.

Counted with ``torch.autograd.graph.saved_tensors_hooks`` around one training forward: every
tensor autograd packs is counted once per storage (a tensor saved twice, or a view of a saved
tensor, costs its storage once), which is what stays alive until the backward frees it. On
CUDA the peak of ``torch.cuda.max_memory_allocated`` during the forward, above what was
allocated before it (the output included), is reported beside it, and for torch.nn the bytes
of cuDNN's reserve tensor (``torch._cudnn_rnn``'s fourth result).

Also times the plain training step (forward + backward of a fixed random weighting of the
output) of each contender, interleaved, median of the rounds.

Contenders: torch.nn (``native``: oneDNN / ATen on the CPU, cuDNN on CUDA), lstmgru's
``reference``, and its kernel families (``triton-tiled``, ``triton-split``; on CPU tensors in
Triton's interpreter, where only the bytes are meaningful: pass ``--backends``).

Examples:
  python benchmarks/memory_bench.py                        # T=256 B=16 I=64 H=128 fp32, CPU
  python benchmarks/memory_bench.py --dry-run              # a tiny CPU form, seconds
  TRITON_INTERPRET=1 python benchmarks/memory_bench.py --backends reference triton-tiled \
      --seq-len 16 --batch 4 --rounds 0                    # kernels' bytes in the interpreter
  python benchmarks/memory_bench.py --device cuda          # the GPU check's point: T=1024
      B=16 I=H=768 float16; torch.nn (cuDNN, with its reserve bytes), triton, reference
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

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import lstmgru  # noqa: E402

# The CPU measurement, and the GPU check's point (FlashRNN's published shape).
CPU_POINT = {"dtype": "float32", "seq_len": 256, "batch": 16, "input_size": 64,
             "hidden_size": 128, "backends": ["torch.nn", "reference"]}
GPU_POINT = {"dtype": "float16", "seq_len": 1024, "batch": 16, "input_size": 768,
             "hidden_size": 768, "backends": ["torch.nn", "triton", "reference"]}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


class SavedBytes:
    """Bytes of the distinct storages autograd saves inside the ``with`` block."""

    def __init__(self):
        self.storages = {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if tensor.device.type != "meta":
            self.storages[(storage.data_ptr(), tensor.device)] = storage.nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def make_model(cell: str, backend: str, args, dtype, device, **options):
    cls = getattr(torch.nn if backend == "torch.nn" else lstmgru, cell)
    model = cls(args.input_size, args.hidden_size, dtype=dtype, device=device, **options)
    return model


def run_step(model, backend: str, x, weights, backward: bool = True):
    context = lstmgru.use_backend(backend) if backend != "torch.nn" else _null()
    with context:
        y = model(x)[0]
        if backward:
            (y * weights).sum().backward()
    return y


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def saved_per_step_row(model, backend, x, weights, unit_bytes) -> dict:
    """Saved bytes of one forward, in units of H values per (step, row)."""
    T, B = x.shape[:2]
    with SavedBytes() as saved:
        context = lstmgru.use_backend(backend) if backend != "torch.nn" else _null()
        with context:
            y = model(x)[0]
    result = {"saved_bytes": saved.total,
              "saved_H_per_step_row": saved.total / (T * B * unit_bytes)}
    (y * weights).sum().backward()  # frees the graph
    return result


def cuda_peak_per_step_row(model, backend, x, weights, unit_bytes) -> dict:
    """On CUDA: the forward's peak allocation above what was allocated before it."""
    T, B = x.shape[:2]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    context = lstmgru.use_backend(backend) if backend != "torch.nn" else _null()
    with context:
        y = model(x)[0]
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    (y * weights).sum().backward()
    return {"cuda_kept_bytes": kept, "cuda_peak_bytes": peak,
            "cuda_kept_H_per_step_row": kept / (T * B * unit_bytes)}


def cudnn_reserve_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """The bytes of cuDNN's reserve space for this call (torch._cudnn_rnn's 4th result)."""
    mode = {"LSTM": 2, "GRU": 3}[type(model).__name__]
    layers = model.num_layers * (2 if model.bidirectional else 1)
    B = x.shape[1]
    hx = x.new_zeros(layers, B, model.hidden_size)
    cx = hx if mode == 2 else None
    # (input, weights, weight_stride0, weight_buf, hx, cx, mode, hidden_size, proj_size,
    #  num_layers, batch_first, dropout, train, bidirectional, batch_sizes, dropout_state)
    with torch.no_grad():
        out = torch._cudnn_rnn(x, list(model._flat_weights), len(model._all_weights[0]), None,
                               hx, cx, mode, model.hidden_size, 0, model.num_layers, False, 0.0,
                               True, model.bidirectional, [], None)
    return out[3].numel() * out[3].element_size()


def time_steps(contenders, rounds: int) -> dict:
    """Interleaved medians (ms) of the training step of each contender."""
    times = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in contenders.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items() if values}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=["LSTM", "GRU"])
    parser.add_argument("--backends", nargs="+",
                        help="torch.nn and lstmgru backend names (default: torch.nn reference; "
                             "on CUDA also triton)")
    parser.add_argument("--device", default="cpu")
    # Defaults per device: CPU_POINT or GPU_POINT where a flag is not given.
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (0: no timing)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny CPU shape, 1 round")
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    point = GPU_POINT if args.device.startswith("cuda") else CPU_POINT
    for name, value in point.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dry_run:
        args.seq_len, args.batch, args.input_size, args.hidden_size = 8, 2, 4, 8
        args.rounds = min(args.rounds, 1)
        if args.dtype not in ("float32", "float64"):
            args.dtype = "float32"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    unit = args.hidden_size * torch.tensor([], dtype=dtype).element_size()
    torch.manual_seed(0)
    x = torch.randn(args.seq_len, args.batch, args.input_size, dtype=dtype, device=device)
    records = []
    for cell in args.cells:
        steps = {}
        for backend in args.backends:
            model = make_model(cell, backend, args, dtype, device)
            weights = torch.randn(args.seq_len, args.batch, args.hidden_size, dtype=dtype,
                                  device=device)
            record = {"cell": cell, "backend": backend}
            record.update(saved_per_step_row(model, backend, x, weights, unit))
            if device.type == "cuda":
                record.update(cuda_peak_per_step_row(model, backend, x, weights, unit))
                if backend == "torch.nn":
                    try:
                        record["cudnn_reserve_bytes"] = cudnn_reserve_bytes(model, x)
                        record["cudnn_reserve_H_per_step_row"] = (
                            record["cudnn_reserve_bytes"] / (args.seq_len * args.batch * unit))
                    except RuntimeError as error:  # reported in the table, not hidden
                        record["cudnn_reserve_error"] = str(error).splitlines()[0]
            records.append(record)
            steps[backend] = (lambda m=model, b=backend, w=weights: run_step(m, b, x, w))
        if args.rounds:
            for backend, ms in time_steps(steps, args.rounds).items():
                for record in records:
                    if record["cell"] == cell and record["backend"] == backend:
                        record["step_ms"] = ms
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__, "dtype": args.dtype, "T": args.seq_len, "B": args.batch,
            "I": args.input_size, "H": args.hidden_size, "threads": torch.get_num_threads(),
            "loadavg": _loadavg(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    print(json.dumps(meta))
    print(f"| cell | implementation | kept for backward (H {args.dtype} per step and row) "
          f"| step (ms) |")
    print("|---|---|---:|---:|")
    for r in records:
        ms = f"{r['step_ms']:.2f}" if "step_ms" in r else "-"
        print(f"| {r['cell']} | {r['backend']} | {r['saved_H_per_step_row']:.2f} | {ms} |")
        if "cuda_kept_H_per_step_row" in r:
            print(f"| {r['cell']} | {r['backend']}: CUDA memory kept after the forward | "
                  f"{r['cuda_kept_H_per_step_row']:.2f} | |")
        if "cudnn_reserve_H_per_step_row" in r:
            print(f"| {r['cell']} | cuDNN reserve alone | "
                  f"{r['cudnn_reserve_H_per_step_row']:.2f} | |")
        if "cudnn_reserve_error" in r:
            print(f"| {r['cell']} | cuDNN reserve: {r['cudnn_reserve_error']} | - | |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return records


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
