"""A character-level language model (lstmgru GRU or LSTM) on real text that is always offline.

The text is the Python Language Reference as CPython ships it for ``help()``: the module
``pydoc_data.topics`` of the standard library holds about 465,000 characters of English
prose and code examples, so nothing is downloaded and no extra package is needed. The last
5% is held out; the loss is reported in bits per character on it. At the end the model
writes a few samples at several temperatures from a seeded generator. Figure: char_lm_loss.png.

    python examples/char_lm.py                        # GRU, about 1 min on a 2-core CPU
    python examples/char_lm.py --cell gru --original-gru   # the article's GRU (reset_after=False)
    python examples/char_lm.py --tiny                 # smoke test, seconds
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import lstmgru


def load_text() -> str:
    from pydoc_data.topics import topics

    # Sorted keys: the same text, in the same order, on every Python build.
    return "\n\n".join(topics[key].strip() for key in sorted(topics))


class CharModel(torch.nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, cell: str,
                 reset_after: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, embed)
        if cell == "gru":
            self.rnn = lstmgru.GRU(embed, hidden, num_layers=layers, batch_first=True,
                                   reset_after=reset_after)
        else:
            self.rnn = lstmgru.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens, state=None):
        y, state = self.rnn(self.embed(tokens), state)
        return self.head(y), state


def random_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    """`batch` random windows of seq_len + 1 characters: inputs and next-character targets."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def bits_per_char(model, data: torch.Tensor, seq_len: int, batch: int, device) -> float:
    """Mean cross-entropy over the whole held-out text, in bits (state reset per chunk)."""
    model.eval()
    usable = (data.numel() - 1) // seq_len * seq_len
    inputs = data[:usable].view(-1, seq_len)
    targets = data[1 : usable + 1].view(-1, seq_len)
    total, count = 0.0, 0
    for start in range(0, inputs.shape[0], batch):
        x = inputs[start : start + batch].to(device)
        y = targets[start : start + batch].to(device)
        logits, _ = model(x)
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        ).item()
        count += y.numel()
    model.train()
    return total / count / math.log(2)


@torch.no_grad()
def sample(model, prompt: str, length: int, temperature: float, stoi, itos, device,
           gen: torch.Generator) -> str:
    """Feed the prompt, then draw one character at a time, carrying the recurrent state."""
    model.eval()
    tokens = torch.tensor([[stoi[c] for c in prompt]], device=device)
    logits, state = model(tokens)
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen).item()
        out.append(itos[nxt])
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    model.train()
    return prompt + "".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="gru", choices=["gru", "lstm"])
    p.add_argument("--original-gru", action="store_true",
                   help="GRU with reset_after=False: the reset gate acts on h before the "
                        "recurrent product (the article's / Cho et al.'s form)")
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--sample-length", type=int, default=300)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 0.8, 1.0])
    p.add_argument("--prompt", default="The ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"],
                   help="lstmgru backend (auto: the Triton kernels on CUDA, the reference elsewhere)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; at these sizes extra threads gain little and, on a "
                        "busy machine, cost a lot (0 = torch's default)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--tiny", action="store_true", help="a few seconds: for smoke tests")
    args = p.parse_args(argv)
    if args.original_gru and args.cell != "gru":
        p.error("--original-gru needs --cell gru")
    if args.tiny:
        args.hidden, args.embed, args.seq_len, args.batch_size = 16, 8, 16, 8
        args.steps, args.eval_every, args.sample_length = 6, 3, 40
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

    text = load_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    itos = dict(enumerate(chars))
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(len(data) * 0.95)
    train, held_out = data[:split], data[split:]
    if args.tiny:
        held_out = held_out[: 20 * args.seq_len]
    print(f"text: {len(text):,} characters, {len(chars)} distinct; "
          f"{len(train):,} train / {len(held_out):,} held out")

    model = CharModel(len(chars), args.embed, args.hidden, args.layers, args.cell,
                      reset_after=not args.original_gru).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    batches = torch.Generator().manual_seed(args.seed + 1)
    train_curve, eval_curve = [], []
    name = f"lstmgru.{args.cell.upper()}" + (" (reset_after=False)" if args.original_gru else "")
    t0 = time.perf_counter()
    with lstmgru.use_backend(args.backend):
        for step in range(1, args.steps + 1):
            x, y = random_batch(train, args.batch_size, args.seq_len, batches)
            x, y = x.to(device), y.to(device)
            logits, _ = model(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(chars)), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            sched.step()
            train_curve.append(loss.item() / math.log(2))
            if step % args.eval_every == 0 or step == args.steps:
                bpc = bits_per_char(model, held_out, args.seq_len, 256, device)
                eval_curve.append((step, bpc))
                print(f"step {step:5d}/{args.steps}  train {train_curve[-1]:.3f} bits/char  "
                      f"held-out {bpc:.3f} bits/char  ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
        seconds = time.perf_counter() - t0
        print(f"{name}: trained {args.steps} steps in {seconds:.1f} s; "
              f"held-out {eval_curve[-1][1]:.3f} bits/char "
              f"(uniform over {len(chars)} characters: {math.log2(len(chars)):.2f})")

        gen = torch.Generator().manual_seed(args.seed + 2)
        for temperature in args.temperatures:
            text_out = sample(model, args.prompt, args.sample_length, temperature, stoi, itos,
                              device, gen)
            print(f"\n--- sample, temperature {temperature} ---\n{text_out}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(range(1, len(train_curve) + 1), train_curve, lw=1, alpha=0.6, label="train batch")
    steps, bpcs = zip(*eval_curve)
    ax.plot(steps, bpcs, "o-", color="C3", label="held-out text")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits per character")
    ax.set_title(f"{name} on the Python Language Reference")
    ax.legend()
    fig.tight_layout()
    path = args.out_dir / "char_lm_loss.png"
    fig.savefig(path, dpi=120)
    print(f"\nfigure written to {path}")


if __name__ == "__main__":
    main()
