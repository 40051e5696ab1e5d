#!/usr/bin/env python
"""Training time of lstmgru's cell variants against torch.nn's plain LSTM/GRU, against the
per-step LayerNorm loop a user would otherwise write, and (resets) against the pack/pad round
trip that torch.nn and cuDNN need for episode boundaries.

    python benchmarks/variants_bench.py                      # CPU grid, a few minutes on 2 cores
    python benchmarks/variants_bench.py --device cuda        # the same on the GPU
    python benchmarks/variants_bench.py --tiny --no-save     # smoke test, seconds

Contenders, for each cell (LSTM, GRU) and shape (T, B, I=H), all training (forward and backward
of a fixed random weighting of the outputs, gradients cleared outside the timed region):
  nn          torch.nn.LSTM/GRU (oneDNN or ATen on the CPU, cuDNN on CUDA): the baseline
  plain       lstmgru with no variant (auto: torch's kernels on the CPU, Triton on CUDA)
  layer_norm, zoneout, recurrent_dropout, weight_drop, reset, all
              lstmgru with that variant (``all``: every one at once) on ``auto``; the
              implementation auto picked is recorded
  hand_ln     a LayerNorm cell as a per-step loop of nn.Linear/nn.LayerNorm ops (HandLN*)
  pack_pad    torch.nn with resets done the torch.nn way: cut every row into its episodes,
              pad and pack them, run, unpack, scatter back (pack_pad_with_resets)
Timing as bench.py: warm-up, then the contenders interleaved for --rounds rounds, medians.
Ratios: ``x nn`` is time / nn's time (lower is better); ``hand/ours`` and ``pack/ours`` are the
baselines' time over ours (higher is better). Results: benchmarks/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (DEFAULT_OUT_DIR, _loadavg, _Timer, cudnn_version, device_name,  # noqa: E402
                   git_commit, import_lstmgru, triton_version)

lstmgru = import_lstmgru()

VARIANTS = {
    "layer_norm": {"layer_norm": True},
    "zoneout": {"zoneout": 0.1},
    "recurrent_dropout": {"recurrent_dropout": 0.25},
    "weight_drop": {"weight_drop": 0.25},
    "reset": {},
    "all": {"layer_norm": True, "zoneout": 0.1, "recurrent_dropout": 0.25, "weight_drop": 0.25},
}
RESET_PROBABILITY = 1 / 8  # a new episode starts at a step with this probability


class HandLNLSTM(nn.Module):
    """A LayerNorm LSTM layer as one writes it by hand: nn.Linear + nn.LayerNorm per step."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size)
        self.ln_ih = nn.LayerNorm(4 * hidden_size, bias=False)
        self.ln_hh = nn.LayerNorm(4 * hidden_size, bias=False)
        self.ln_c = nn.LayerNorm(hidden_size)

    def forward(self, x):
        T, B, _ = x.shape
        h = x.new_zeros(B, self.ln_c.normalized_shape[0])
        c = torch.zeros_like(h)
        gx = self.ln_ih(x @ self.ih.weight.t()) + self.ih.bias
        ys = []
        for t in range(T):
            a = gx[t] + self.ln_hh(h @ self.hh.weight.t()) + self.hh.bias
            i, f, g, o = a.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
            ys.append(h)
        return torch.stack(ys), (h, c)


class HandLNGRU(nn.Module):
    """A LayerNorm GRU layer (torch's form) as one writes it by hand."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.ih = nn.Linear(input_size, 3 * hidden_size)
        self.hh = nn.Linear(hidden_size, 3 * hidden_size)
        self.ln_ih = nn.LayerNorm(3 * hidden_size, bias=False)
        self.ln_hh = nn.LayerNorm(3 * hidden_size, bias=False)
        self.hidden_size = hidden_size

    def forward(self, x):
        T, B, _ = x.shape
        h = x.new_zeros(B, self.hidden_size)
        gx = self.ln_ih(x @ self.ih.weight.t()) + self.ih.bias
        ys = []
        for t in range(T):
            gh = self.ln_hh(h @ self.hh.weight.t()) + self.hh.bias
            xr, xz, xn = gx[t].chunk(3, 1)
            hr, hz, hn = gh.chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h = (1 - z) * n + z * h
            ys.append(h)
        return torch.stack(ys), h


def pack_pad_with_resets(module: nn.Module, x: torch.Tensor, reset: torch.Tensor):
    """``module(x, reset=reset)``'s output for a torch.nn module, the way torch.nn users get
    it: every row is cut into its episodes (a new one where ``reset[t, b]``), the episodes
    become the rows of a padded batch that is packed, run from a zero state, unpacked and
    scattered back into (T, B, H)."""
    T, B, _ = x.shape
    starts = reset.clone()
    starts[0] = True
    # position (t, b) -> its episode's number and its step within the episode
    flat_starts = starts.t().reshape(-1)                        # row-major over (b, t)
    episode = torch.cumsum(flat_starts.long(), 0) - 1
    first = torch.nonzero(flat_starts).squeeze(1)
    step = torch.arange(T * B, device=x.device) - first[episode]
    lengths = torch.bincount(episode)
    num_episodes, longest = len(lengths), int(lengths.max())
    source = x.transpose(0, 1).reshape(T * B, -1)
    padded = x.new_zeros(longest, num_episodes, x.shape[2])
    padded[step, episode] = source
    packed = pack_padded_sequence(padded, lengths.cpu(), enforce_sorted=False)
    out, _ = pad_packed_sequence(module(packed)[0], total_length=longest)
    return out[step, episode].view(B, T, -1).transpose(0, 1)


def _weighting(T, B, H, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(1)
    return torch.randn(T, B, H, generator=g).to(device=device, dtype=dtype)


def contenders(cell: str, T: int, B: int, H: int, device, dtype, seed: int):
    """name -> (module, call(module, x) -> y, implementation) for one cell and shape."""
    torch.manual_seed(seed)
    nn_cls, our_cls = getattr(nn, cell), getattr(lstmgru, cell)
    hand_cls = HandLNLSTM if cell == "LSTM" else HandLNGRU
    g = torch.Generator(device="cpu").manual_seed(seed)
    reset = (torch.rand(T, B, generator=g) < RESET_PROBABILITY).to(device)
    plain = nn_cls(H, H).to(device, dtype)
    result = {"nn": (plain, lambda m, x: m(x)[0], "torch.nn")}
    ours = our_cls(H, H).to(device, dtype)
    ours.load_state_dict(plain.state_dict())
    result["plain"] = (ours, lambda m, x: m(x)[0], None)
    for name, kw in VARIANTS.items():
        m = our_cls(H, H, **kw).to(device, dtype)
        if name in ("reset", "all"):
            result[name] = (m, lambda m, x: m(x, reset=reset)[0], None)
        else:
            result[name] = (m, lambda m, x: m(x)[0], None)
    result["hand_ln"] = (hand_cls(H, H).to(device, dtype), lambda m, x: m(x)[0], "per-step loop")
    result["pack_pad"] = (plain, lambda m, x: pack_pad_with_resets(m, x, reset), "torch.nn")
    return result, reset


def _implementation(module, x, reset_used: bool) -> str:
    """The implementation ``auto`` runs for ``module`` on x in training (lstmgru's registry)."""
    names = module.variants + (("reset",) if reset_used else ())
    return module._implementation(x, names).name


def bench_shape(cell, T, B, H, device, dtype, rounds, seed):
    table, reset = contenders(cell, T, B, H, device, dtype, seed)
    x = torch.randn(T, B, H, device=device, dtype=dtype)
    w = _weighting(T, B, H, device, dtype)
    timer = _Timer(device)
    steps = {}
    for name, (module, call, impl) in table.items():
        module.train()
        if impl is None:
            impl = _implementation(module, x, name in ("reset", "all"))

        def step(module=module, call=call):
            (call(module, x) * w).sum().backward()

        def clear(module=module):
            module.zero_grad(set_to_none=True)
        steps[name] = (step, clear, impl)
    for step, clear, _ in steps.values():  # warm-up: compiles, allocates
        clear()
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, clear, _) in steps.items():
            times[name].append(timer.time(step, clear))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    # the pack/pad round trip computes what reset= does: the check that makes it a baseline
    m = table["reset"][0]
    m.load_state_dict(table["nn"][0].state_dict())
    with torch.no_grad():
        diff = (m(x, reset=reset)[0] - pack_pad_with_resets(table["nn"][0], x, reset)).abs().max()
    return {
        "cell": cell, "seq_len": T, "batch": B, "hidden_size": H, "input_size": H,
        "dtype": str(dtype).replace("torch.", ""), "rounds": rounds,
        "ms": {name: round(v, 4) for name, v in medians.items()},
        "implementation": {name: s[2] for name, s in steps.items()},
        "resets": int(reset.sum()), "pack_pad_max_abs_diff": float(diff),
    }


def render(meta, records) -> str:
    lines = [f"# Cell variants, training time ({meta['device']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, cuDNN {meta['cudnn']}, "
             f"commit {meta['commit']}, {meta['date']}, {meta['threads']} threads, load average "
             f"{meta['loadavg_start']}. Median of {records[0]['rounds'] if records else 0} "
             "interleaved rounds. `x nn`: time over torch.nn's plain cell of the same size "
             "(lower is better); `hand/ours`, `pack/ours`: the baseline's time over ours.", "",
             "| cell | T | B | H | nn ms | plain | layer_norm | zoneout | recurrent_dropout | "
             "weight_drop | reset | all | hand_ln ms | hand/ours (LN) | pack_pad ms | "
             "pack/ours (reset) |",
             "|" + "---|" * 16]
    for r in records:
        ms = r["ms"]
        base = ms["nn"]
        cols = [f"{ms[k] / base:.2f}x" for k in ("plain", *VARIANTS)]
        lines.append(
            f"| {r['cell']} | {r['seq_len']} | {r['batch']} | {r['hidden_size']} | {base:.2f} | "
            + " | ".join(cols)
            + f" | {ms['hand_ln']:.2f} | {ms['hand_ln'] / ms['layer_norm']:.2f} | "
            f"{ms['pack_pad']:.2f} | {ms['pack_pad'] / ms['reset']:.2f} |")
    lines += ["", "Implementations auto ran: " + "; ".join(
        sorted({f"{k}: {v}" for r in records for k, v in r["implementation"].items()
                if k in VARIANTS or k == "plain"}))]
    lines += ["", "pack/pad agrees with `reset=` to within max abs diff "
              f"{max((r['pack_pad_max_abs_diff'] for r in records), default=0):.2e}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--cells", nargs="+", default=["LSTM", "GRU"])
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="T:B:H triples (default: a grid for the device)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="one small shape, 3 rounds")
    parser.add_argument("--name", default=None)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.tiny:
        shapes, args.rounds = [(8, 4, 16)], 3
    elif args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes]
    elif device.type == "cuda":
        shapes = [(16, 128, 256), (128, 16, 768), (128, 64, 512)]
    else:
        shapes = [(50, 32, 128), (50, 8, 64), (50, 64, 256), (16, 128, 128)]
    meta = {"device": device_name(device), "torch": torch.__version__,
            "triton": triton_version(), "cudnn": cudnn_version(), "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "loadavg_start": _loadavg(), "argv": sys.argv[1:] if argv is None else argv}
    records = []
    for cell in args.cells:
        for T, B, H in shapes:
            records.append(bench_shape(cell, T, B, H, device, getattr(torch, args.dtype),
                                       args.rounds, args.seed))
            print(f"{cell} T={T} B={B} H={H}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in records[-1]["ms"].items()) + " ms", file=sys.stderr)
    text = render(meta, records)
    print(text)
    if not args.no_save:
        name = args.name or f"variants-{device.type}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{name}.json").write_text(
            json.dumps({"meta": meta, "records": records}, indent=1))
        (args.out_dir / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
