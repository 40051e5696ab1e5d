"""CPU training time of lstmgru's LayerNorm LSTM/GRU (``layer_norm=True``) against torch.nn's
plain LSTM/GRU of the same size and against the per-step loop a user would write by hand.

    python benchmarks/variants_bench.py [--seq-len 50] [--batch 32] [--hidden 128] [--repeats 5]

Each timing is forward + backward of ``y.sum()``, median of ``--repeats`` runs after one warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import lstmgru


class HandLNLSTM(nn.Module):
    """A LayerNorm LSTM layer the way one writes it by hand: nn.Linear + nn.LayerNorm per step."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size)
        self.ln_ih = nn.LayerNorm(4 * hidden_size, elementwise_affine=True, bias=False)
        self.ln_hh = nn.LayerNorm(4 * hidden_size, elementwise_affine=True, bias=False)
        self.ln_c = nn.LayerNorm(hidden_size)

    def forward(self, x):
        T, B, _ = x.shape
        H = self.ln_c.normalized_shape[0]
        h = x.new_zeros(B, H)
        c = x.new_zeros(B, H)
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


def time_training(module, x, repeats):
    def once():
        module.zero_grad(set_to_none=True)
        y = module(x)[0]
        y.sum().backward()

    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.seq_len, args.batch, args.input)
    print(f"CPU training (forward+backward), T={args.seq_len} B={args.batch} I={args.input} "
          f"H={args.hidden}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| cell | torch.nn plain | lstmgru layer_norm | hand-written LN loop |")
    print("|---|---|---|---|")
    for name, plain, ours, hand in (
            ("LSTM", nn.LSTM, lambda i, h: lstmgru.LSTM(i, h, layer_norm=True), HandLNLSTM),
            ("GRU", nn.GRU, lambda i, h: lstmgru.GRU(i, h, layer_norm=True), HandLNGRU)):
        t_plain = time_training(plain(args.input, args.hidden), x, args.repeats)
        t_ours = time_training(ours(args.input, args.hidden), x, args.repeats)
        t_hand = time_training(hand(args.input, args.hidden), x, args.repeats)
        print(f"| {name} | {t_plain * 1e3:.1f} ms | {t_ours * 1e3:.1f} ms | "
              f"{t_hand * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
