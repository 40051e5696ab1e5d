"""One-step-ahead forecasting of a real time series with an lstmgru LSTM or GRU.

Data ship with statsmodels, so nothing is downloaded:
  * sunspots: yearly mean sunspot number, 1700-2008 (309 values; the ~11-year cycle);
  * co2: Mauna Loa CO2 in ppm, weekly 1958-2001, averaged to months (526 values; trend plus
    a yearly cycle).
Each sample is a window of the last --window values; the model predicts the change to the
next value (forecasting changes rather than levels keeps a trending series such as co2
inside the range seen in training). The first 80% of the series trains, the last 20% tests.
The test RMSE is printed beside the naive forecast "next = last value", which any useful
model must beat. Figure: forecast_<dataset>.png.

    python examples/forecast.py                       # sunspots, LSTM, about 10 s on a CPU
    python examples/forecast.py --dataset co2 --cell gru
    python examples/forecast.py --tiny                # smoke test, seconds
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import lstmgru


def load_series(name: str):
    """(time axis as floats in years, values) for one bundled data set."""
    import statsmodels.api as sm

    if name == "sunspots":
        data = sm.datasets.sunspots.load_pandas().data
        return data["YEAR"].to_numpy(float), data["SUNACTIVITY"].to_numpy(float), "sunspot number"
    # co2 is weekly with 59 missing weeks: monthly means, then fill the rare empty month.
    weekly = sm.datasets.co2.load_pandas().data["co2"]
    monthly = weekly.resample("MS").mean().interpolate()
    years = monthly.index.year + (monthly.index.month - 1) / 12.0
    return np.asarray(years, float), monthly.to_numpy(float), "CO2 (ppm)"


def make_windows(values: np.ndarray, window: int, mean: float, scale: float, dscale: float):
    """Inputs (N, window, 2): [level, change] per step, normalized; target: next change.

    Sample k covers values[k : k + window] and predicts values[k + window].
    """
    level = (values - mean) / scale
    change = np.diff(values, prepend=values[0]) / dscale
    feats = np.stack([level, change], axis=-1)
    n = len(values) - window
    x = np.stack([feats[k : k + window] for k in range(n)])
    y = (values[window:] - values[window - 1 : -1]) / dscale
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y[:, None], dtype=torch.float32)


class Forecaster(torch.nn.Module):
    def __init__(self, cell: str, hidden: int, layers: int):
        super().__init__()
        rnn_cls = {"lstm": lstmgru.LSTM, "gru": lstmgru.GRU}[cell]
        self.rnn = rnn_cls(2, hidden, num_layers=layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="sunspots", choices=["sunspots", "co2"])
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru"])
    p.add_argument("--window", type=int, default=None,
                   help="input length (default: 22 for sunspots = two cycles, 24 for co2)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"],
                   help="lstmgru backend (auto: the Triton kernels on CUDA, the reference elsewhere)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; at this size, syncing threads costs more than "
                        "they save (0 = torch's default)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--tiny", action="store_true", help="a few seconds: for smoke tests")
    args = p.parse_args(argv)
    if args.window is None:
        args.window = 22 if args.dataset == "sunspots" else 24
    if args.tiny:
        args.epochs, args.hidden = 3, 8
    return args


def main(argv=None):
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    years, values, unit = load_series(args.dataset)
    split = int(round(len(values) * (1 - args.test_fraction)))  # first test target index
    train_vals = values[:split]
    # Normalization from the training part only, so no test information leaks in.
    mean, scale = train_vals.mean(), train_vals.std()
    dscale = np.diff(train_vals).std()
    x, y = make_windows(values, args.window, mean, scale, dscale)
    target_index = np.arange(args.window, len(values))
    is_test = target_index >= split
    x_train, y_train = x[~is_test].to(device), y[~is_test].to(device)
    x_test = x[is_test].to(device)

    model = Forecaster(args.cell, args.hidden, args.layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(args.epochs, 1))
    shuffle = torch.Generator().manual_seed(args.seed + 1)
    n = x_train.shape[0]
    t0 = time.perf_counter()
    with lstmgru.use_backend(args.backend):
        for epoch in range(args.epochs):
            model.train()
            order = torch.randperm(n, generator=shuffle).to(device)
            total = 0.0
            for start in range(0, n, args.batch_size):
                idx = order[start : start + args.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(model(x_train[idx]), y_train[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            sched.step()
            if epoch == 0 or (epoch + 1) % max(args.epochs // 10, 1) == 0:
                print(f"epoch {epoch + 1:4d}/{args.epochs}  train MSE (normalized) {total / n:.4f}",
                      flush=True)
        model.eval()
        with torch.no_grad():
            change = model(x_test).squeeze(-1).cpu().numpy() * dscale
    seconds = time.perf_counter() - t0

    last = values[target_index[is_test] - 1]
    truth = values[target_index[is_test]]
    forecast = last + change
    rmse = math.sqrt(np.mean((forecast - truth) ** 2))
    naive = math.sqrt(np.mean((last - truth) ** 2))
    print(f"{args.dataset}: {args.cell.upper()} one-step-ahead test RMSE {rmse:.3f} vs naive "
          f"last-value {naive:.3f} ({rmse / naive:.2f}x) on {len(truth)} test points; "
          f"trained in {seconds:.1f} s")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    test_years = years[target_index[is_test]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7))
    top.plot(years, values, color="gray", lw=1, label="series")
    top.plot(test_years, forecast, color="C3", lw=1.5,
             label=f"lstmgru {args.cell.upper()} forecast")
    top.axvline(years[split], color="black", ls=":", lw=1, label="train | test")
    top.set_ylabel(unit)
    top.set_title(f"{args.dataset}: one-step-ahead forecasts on the held-out last "
                  f"{args.test_fraction:.0%}")
    top.legend(loc="upper left", ncol=3, fontsize="small")
    bottom.plot(test_years, truth, "o-", color="black", ms=3, lw=1, label="truth")
    bottom.plot(test_years, forecast, "-", color="C3", lw=1.5,
                label=f"{args.cell.upper()} (RMSE {rmse:.2f})")
    bottom.plot(test_years, last, "--", color="C0", lw=1,
                label=f"naive last value (RMSE {naive:.2f})")
    bottom.set_xlabel("year")
    bottom.set_ylabel(unit)
    # Above the axes: inside, it would hide the cycle peaks.
    bottom.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    path = args.out_dir / f"forecast_{args.dataset}.png"
    fig.savefig(path, dpi=120)
    print(f"figure written to {path}")


if __name__ == "__main__":
    main()
