"""The article's toy problem: learn y = sum of a sequence of 10 uniform numbers.

X ~ U(0, 1) with shape (1000, 10, 1), y = X.sum(1). Two models, each a recurrent layer of 50
units read at the last step plus a Linear(50, 1) head: lstmgru.LSTM and lstmgru.GRU. Adam
(lr 1e-3, Keras's defaults), MSE, 20 epochs, batches of 32 shuffled by a seeded generator,
and Keras's default initialization (the article's model was a Keras one; see --init).

Beside each model trains a torch.nn twin (torch.nn.LSTM / torch.nn.GRU) that starts from the
same weights (state_dict copied) and sees the same batches: the two loss curves coincide,
which is the drop-in claim in practice. Figures: predictions vs truth on a held-out set
(seed_sum_predictions.png) and both loss curves (seed_sum_loss.png).

    python examples/seed_sum.py               # about 10 s on a 2-core CPU
    python examples/seed_sum.py --tiny        # smoke test, seconds
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lstmgru


def init_like_keras(model: "LastStepRegressor") -> None:
    """Keras's default initialization, which the article's model had.

    torch's default (uniform +-1/sqrt(H) everywhere) also learns this task, but within the
    article's 20 epochs it gets little past predicting the mean; Keras's glorot-uniform
    kernels, orthogonal recurrent matrices, zero biases and unit forget-gate bias train
    much faster here. The layout follows torch's names: weight_ih is Keras's kernel
    transposed, so glorot's fan_in + fan_out is the same sum.
    """
    rnn, gates = model.rnn, 4 if isinstance(model.rnn, (lstmgru.LSTM, torch.nn.LSTM)) else 3
    hidden = rnn.hidden_size
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight_ih"):
                torch.nn.init.xavier_uniform_(p)
            elif name.startswith("weight_hh"):
                # Keras: orthogonal (H, gates*H) with orthonormal rows; here its transpose.
                torch.nn.init.orthogonal_(p)
            else:
                p.zero_()
                if gates == 4 and name.startswith("bias_ih"):
                    p[hidden : 2 * hidden] = 1.0  # unit_forget_bias=True (gate order i,f,g,o)
        torch.nn.init.xavier_uniform_(model.head.weight)
        model.head.bias.zero_()


class LastStepRegressor(torch.nn.Module):
    """Recurrent layer read at the last time step, then a linear head (Keras's LSTM + Dense)."""

    def __init__(self, rnn: torch.nn.Module, hidden: int):
        super().__init__()
        self.rnn = rnn
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def build_pair(kind: str, hidden: int, device, seed: int, init: str):
    """An lstmgru model and its torch.nn twin holding identical weights."""
    ours_cls = {"LSTM": lstmgru.LSTM, "GRU": lstmgru.GRU}[kind]
    twin_cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}[kind]
    torch.manual_seed(seed)
    ours = LastStepRegressor(ours_cls(1, hidden, batch_first=True), hidden)
    if init == "keras":
        init_like_keras(ours)
    ours = ours.to(device)
    twin = LastStepRegressor(twin_cls(1, hidden, batch_first=True), hidden).to(device)
    # Same parameter names, so the state_dict moves over as is.
    twin.load_state_dict(ours.state_dict())
    return ours, twin


def train_pair(kind, ours, twin, x, y, args):
    """Train both models on the same shuffled batches; return per-step losses of each."""
    # eps=1e-7 is Keras's Adam default (torch's is 1e-8): the article's optimizer.
    opt_ours = torch.optim.Adam(ours.parameters(), lr=args.lr, eps=1e-7)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=args.lr, eps=1e-7)
    shuffle = torch.Generator().manual_seed(args.seed + 1)
    losses_ours, losses_twin = [], []
    n = x.shape[0]
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=shuffle).to(x.device)
        epoch_ours, epoch_twin = [], []
        for start in range(0, n, args.batch_size):
            idx = order[start : start + args.batch_size]
            xb, yb = x[idx], y[idx]
            for model, opt, sink in ((ours, opt_ours, epoch_ours), (twin, opt_twin, epoch_twin)):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                loss.backward()
                opt.step()
                sink.append(loss.item())
        losses_ours += epoch_ours
        losses_twin += epoch_twin
        # Like Keras's progress line: the mean training loss over the epoch's batches.
        mean_ours = sum(epoch_ours) / len(epoch_ours)
        mean_twin = sum(epoch_twin) / len(epoch_twin)
        print(f"{kind} epoch {epoch + 1:2d}/{args.epochs}  loss {mean_ours:.6f}"
              f"  (torch.nn twin {mean_twin:.6f})", flush=True)
    return losses_ours, losses_twin


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--test-samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=10, help="sequence length")
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="keras", choices=["keras", "torch"],
                   help="initialization: Keras's defaults (the article's) or torch.nn's")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; at this size, syncing threads costs more than "
                        "they save (0 = torch's default)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"],
                   help="lstmgru backend (auto: the Triton kernels on CUDA, the reference elsewhere)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--tiny", action="store_true", help="a few seconds: for smoke tests")
    args = p.parse_args(argv)
    if args.tiny:
        args.samples, args.test_samples, args.hidden, args.epochs = 64, 32, 8, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.samples, args.steps, 1, generator=data)
    x_test = torch.rand(args.test_samples, args.steps, 1, generator=data)
    x, x_test = x.to(device), x_test.to(device)
    y, y_test = x.sum(1), x_test.sum(1)

    results = {}
    with lstmgru.use_backend(args.backend):
        for kind in ("LSTM", "GRU"):
            ours, twin = build_pair(kind, args.hidden, device, args.seed, args.init)
            t0 = time.perf_counter()
            losses, twin_losses = train_pair(kind, ours, twin, x, y, args)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                pred, pred_twin = ours(x_test), twin(x_test)
            mse = torch.nn.functional.mse_loss(pred, y_test).item()
            mse_twin = torch.nn.functional.mse_loss(pred_twin, y_test).item()
            diff = max(abs(a - b) for a, b in zip(losses, twin_losses))
            print(f"{kind}: test MSE {mse:.6f} (torch.nn twin {mse_twin:.6f}); "
                  f"max |loss - twin loss| over {len(losses)} steps = {diff:.3e}; "
                  f"both trained in {seconds:.1f} s")
            results[kind] = (losses, twin_losses, pred.cpu().flatten(), mse)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    truth = y_test.cpu().flatten()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    lo, hi = truth.min().item(), truth.max().item()
    for ax, (kind, (_, _, pred, mse)) in zip(axes, results.items()):
        ax.scatter(truth, pred, s=10, alpha=0.6, label="held-out samples")
        ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="y = x")
        ax.set_title(f"lstmgru.{kind}: test MSE {mse:.4f}")
        ax.set_xlabel("true sum")
        ax.legend(loc="upper left")
    axes[0].set_ylabel("predicted sum")
    fig.tight_layout()
    fig.savefig(args.out_dir / "seed_sum_predictions.png", dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (kind, (losses, twin_losses, _, _)) in zip(axes, results.items()):
        ax.plot(losses, lw=2.5, alpha=0.6, label=f"lstmgru.{kind}")
        ax.plot(twin_losses, lw=1, ls="--", color="black", label=f"torch.nn.{kind}")
        ax.set_yscale("log")
        ax.set_title(f"{kind} training loss: same init, same batches")
        ax.set_xlabel("optimizer step")
        ax.legend()
    axes[0].set_ylabel("MSE")
    fig.tight_layout()
    fig.savefig(args.out_dir / "seed_sum_loss.png", dpi=120)
    print(f"figures written to {args.out_dir}")


if __name__ == "__main__":
    main()
