"""Episode resets in RL-style rollouts: ``lstmgru.LSTM(..., layer_norm=True)`` with ``reset=``.

A partially observable memory task, generated here. Each of B rows is a stream of concatenated
episodes of random length (--min-len to --max-len steps). At an episode's first step the agent
sees a cue, one of K symbols; at every later step it sees a distractor (a random symbol of the
same K) with probability --distractor, else a blank. At the episode's last step it must name
the cue. Nothing in the observation marks where an episode begins: the boundary is known only
to the environment, as RL's "done" / "is_init" flags are, and reaches the model through
``forward(x, reset=episode_starts)``, which zeroes the state entering each episode's first step.

Training uses rollouts of T steps (default 64) from B rows (default 32), each holding several
episode boundaries (episodes cut off by the end of the rollout have no recall step), and
cross-entropy at the recall steps only. Two models, same initial weights, same rollouts:
  * with reset: the state entering each episode is zero, so "the first symbol since the state
    was zero" is the cue;
  * without reset: the state leaks across episodes. Only the rollout's first episode starts from
    a zero state (hx=None); after it, a cue cannot be told from a distractor.
Held-out accuracy at recall steps is printed for both, the rollouts' first episodes apart from
the others.

Then the torch.nn way to get the same values (cuDNN has no per-step reset): cut every row into
its episodes, pad them into a batch, pack it (pack_padded_sequence), run from a zero state,
unpack and scatter back. The script checks that this gives what ``reset=`` gives (max abs
difference of the outputs on one rollout) and times a training step (forward and backward) both
ways on this machine's CPU: the trained LayerNorm LSTM fed a PackedSequence, and torch.nn.LSTM
against an lstmgru.LSTM of the same weights with ``reset=``. Median of interleaved runs.

Figure: rl_resets.png (held-out recall accuracy during training, both models; the timings).

    python examples/rl_resets.py          # about a minute on one CPU thread
    python examples/rl_resets.py --tiny   # smoke test, seconds
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmgru


def make_rollouts(num_rows: int, args, generator: torch.Generator):
    """One rollout of T steps for each of num_rows rows, time-major.

    Returns x (T, B, K) one-hot observations (blank = all zero), starts (T, B) bool (episode
    first steps, t = 0 included), recall (T, B) bool (last steps of the episodes that end inside
    the rollout), cue (T, B) long (the cue of the episode each step belongs to) and first (T, B)
    bool (the step belongs to the row's first episode).
    """
    T, K = args.steps, args.symbols
    starts = torch.zeros(T, num_rows, dtype=torch.bool)
    recall = torch.zeros(T, num_rows, dtype=torch.bool)
    episode = torch.zeros(T, num_rows, dtype=torch.long)  # episode number within its row
    for b in range(num_rows):
        t, k = 0, 0
        while t < T:
            length = int(torch.randint(args.min_len, args.max_len + 1, (), generator=generator))
            starts[t, b] = True
            episode[t : t + length, b] = k
            if t + length <= T:
                recall[t + length - 1, b] = True
            t, k = t + length, k + 1
    cues = torch.randint(K, (int(episode.max()) + 1, num_rows), generator=generator)
    cue = cues.gather(0, episode)
    distractor = torch.randint(K, (T, num_rows), generator=generator)
    shown = torch.rand(T, num_rows, generator=generator) < args.distractor
    symbol = torch.where(starts, cue, torch.where(shown, distractor, K))  # K = blank
    x = torch.nn.functional.one_hot(symbol, K + 1)[..., :K].float()
    return x, starts, recall, cue, episode == 0


class Agent(torch.nn.Module):
    """An lstmgru.LSTM over the observations and a linear head naming a symbol at every step."""

    def __init__(self, args):
        super().__init__()
        self.rnn = lstmgru.LSTM(args.symbols, args.hidden, layer_norm=True, zoneout=args.zoneout,
                                recurrent_dropout=args.recurrent_dropout)
        self.head = torch.nn.Linear(args.hidden, args.symbols)

    def forward(self, x, reset=None):
        y, _ = self.rnn(x, reset=reset)
        return self.head(y)


def pack_pad_with_resets(rnn: torch.nn.Module, x: torch.Tensor, reset: torch.Tensor):
    """``rnn(x, reset=reset)[0]`` computed the torch.nn way, with no reset argument.

    Every row of the (T, B, I) input is cut into episodes (a new one where ``reset[t, b]``, and
    at t = 0); the episodes become the columns of a padded (longest, E, I) batch, which is
    packed, run from a zero state, unpacked and scattered back into (T, B, H).
    """
    T, B, _ = x.shape
    starts = reset.clone()
    starts[0] = True
    flat = starts.t().reshape(-1)                          # (b, t) order: episodes in sequence
    episode = torch.cumsum(flat.long(), 0) - 1             # each position's episode number
    first = torch.nonzero(flat).squeeze(1)                 # where each episode starts
    step = torch.arange(T * B) - first[episode]            # each position's step in its episode
    lengths = torch.bincount(episode)
    padded = x.new_zeros(int(lengths.max()), len(lengths), x.shape[2])
    padded[step, episode] = x.transpose(0, 1).reshape(T * B, -1)
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
    out, _ = pad_packed_sequence(rnn(packed)[0], total_length=padded.shape[0])
    return out[step, episode].view(B, T, -1).transpose(0, 1)


def accuracy(model, data, use_reset: bool):
    """Accuracy at recall steps: all of them, the rows' first episodes, the later ones."""
    x, starts, recall, cue, first = data
    was_training = model.training
    model.eval()
    with torch.no_grad():
        right = model(x, starts if use_reset else None).argmax(-1) == cue
    model.train(was_training)
    pick = lambda mask: right[recall & mask].float().mean().item()
    return pick(torch.ones_like(first)), pick(first), pick(~first)


def train(model, use_reset, args, evaluation):
    """Adam on fresh rollouts (the same sequence for every model); held-out accuracy curve."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rollouts = torch.Generator().manual_seed(args.seed + 1)
    curve = [(0, accuracy(model, evaluation, use_reset)[0])]
    for update in range(1, args.updates + 1):
        x, starts, recall, cue, _ = make_rollouts(args.batch_size, args, rollouts)
        logits = model(x, starts if use_reset else None)
        loss = torch.nn.functional.cross_entropy(logits[recall], cue[recall])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if update % args.eval_every == 0 or update == args.updates:
            curve.append((update, accuracy(model, evaluation, use_reset)[0]))
    return curve


def time_steps(contenders, rounds):
    """Median seconds of each forward + backward, the contenders interleaved round by round."""
    times = {name: [] for name in contenders}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (params, step) in contenders.items():
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            step().backward()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--symbols", type=int, default=4, help="K, the number of cue symbols")
    p.add_argument("--min-len", type=int, default=6, help="shortest episode (steps)")
    p.add_argument("--max-len", type=int, default=20, help="longest episode (steps)")
    p.add_argument("--distractor", type=float, default=0.5,
                   help="probability that a step after the first shows a random symbol")
    p.add_argument("--steps", type=int, default=64, help="T, rollout length")
    p.add_argument("--batch-size", type=int, default=32, help="B, rows per rollout")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--zoneout", type=float, default=0.0, help="zoneout probability on h")
    p.add_argument("--recurrent-dropout", type=float, default=0.0)
    p.add_argument("--updates", type=int, default=400, help="optimizer steps per model")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-rows", type=int, default=256, help="held-out rows (one rollout each)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--timing-rounds", type=int, default=21)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; at this size, syncing threads costs more than "
                        "they save (0 = torch's default)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"],
                   help="lstmgru backend (auto: the Triton kernels on CUDA where they take the "
                        "variants, the reference elsewhere)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--tiny", action="store_true", help="a few seconds: for smoke tests")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.updates, args.eval_every, args.eval_rows = 16, 10, 5, 32
        args.timing_rounds = 1
    if not 1 <= args.min_len <= args.max_len:
        p.error("need 1 <= --min-len <= --max-len")
    return args


def main(argv=None):
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    evaluation = make_rollouts(args.eval_rows, args, torch.Generator().manual_seed(args.seed))
    chance = 1.0 / args.symbols

    with lstmgru.use_backend(args.backend):
        torch.manual_seed(args.seed)
        with_reset = Agent(args)
        without = Agent(args)
        without.load_state_dict(with_reset.state_dict())
        curves, final, seconds = {}, {}, {}
        for name, model, use_reset in (("with reset", with_reset, True),
                                       ("without reset", without, False)):
            t0 = time.perf_counter()
            curves[name] = train(model, use_reset, args, evaluation)
            seconds[name] = time.perf_counter() - t0
            final[name] = accuracy(model, evaluation, use_reset)

        # The torch.nn way to the same values, on one held-out rollout of training size.
        x, starts = evaluation[0][:, : args.batch_size], evaluation[1][:, : args.batch_size]
        rnn = with_reset.rnn.eval()  # eval: no zoneout / dropout masks, so both are comparable
        torch.manual_seed(args.seed)
        ours_plain = lstmgru.LSTM(args.symbols, args.hidden)
        torch_lstm = torch.nn.LSTM(args.symbols, args.hidden)
        torch_lstm.load_state_dict(ours_plain.state_dict())
        with torch.no_grad():
            diff_ln = (rnn(x, reset=starts)[0] - pack_pad_with_resets(rnn, x, starts)).abs().max()
            diff_nn = (ours_plain(x, reset=starts)[0]
                       - pack_pad_with_resets(torch_lstm, x, starts)).abs().max()
        weight = torch.randn(args.steps, args.batch_size, args.hidden,
                             generator=torch.Generator().manual_seed(args.seed + 2))
        ln_params, plain_params = list(rnn.parameters()), list(ours_plain.parameters())
        nn_params = list(torch_lstm.parameters())
        times = time_steps({
            "LN LSTM, reset=": (ln_params, lambda: (rnn(x, reset=starts)[0] * weight).sum()),
            "LN LSTM, pack/pad": (ln_params,
                                  lambda: (pack_pad_with_resets(rnn, x, starts) * weight).sum()),
            "lstmgru.LSTM, reset=": (plain_params,
                                     lambda: (ours_plain(x, reset=starts)[0] * weight).sum()),
            "torch.nn.LSTM, pack/pad": (nn_params, lambda: (
                pack_pad_with_resets(torch_lstm, x, starts) * weight).sum()),
        }, args.timing_rounds)

    episodes = int(evaluation[2].sum())
    print(f"task: K={args.symbols} cues, episodes of {args.min_len}-{args.max_len} steps, "
          f"rollouts T={args.steps}; {args.updates} updates of B={args.batch_size}; held-out "
          f"accuracy on {episodes} recall steps (chance {chance:.2f})")
    for name, (acc, acc_first, acc_later) in final.items():
        print(f"  {name:13s}: {acc:.3f}  (rows' first episodes {acc_first:.3f}, later "
              f"episodes {acc_later:.3f}); trained in {seconds[name]:.1f} s")
    print(f"pack/pad vs reset= on one rollout ({int(starts.sum())} episode starts in "
          f"{args.steps}x{args.batch_size}): max abs diff {diff_ln.item():.2e} (LayerNorm LSTM), "
          f"{diff_nn.item():.2e} (torch.nn.LSTM vs lstmgru.LSTM, same weights)")
    ms = {name: 1e3 * t for name, t in times.items()}
    print(f"forward + backward on this machine's CPU, {torch.get_num_threads()} thread(s), "
          f"median of {args.timing_rounds}:")
    print(f"  LayerNorm LSTM: reset= {ms['LN LSTM, reset=']:.1f} ms, pack/pad "
          f"{ms['LN LSTM, pack/pad']:.1f} ms "
          f"(pack/pad / reset= = {ms['LN LSTM, pack/pad'] / ms['LN LSTM, reset=']:.2f})")
    print(f"  plain LSTM: lstmgru reset= {ms['lstmgru.LSTM, reset=']:.1f} ms, torch.nn pack/pad "
          f"{ms['torch.nn.LSTM, pack/pad']:.1f} ms (pack/pad / reset= = "
          f"{ms['torch.nn.LSTM, pack/pad'] / ms['lstmgru.LSTM, reset=']:.2f})")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2),
                                      gridspec_kw={"width_ratios": [1.6, 1]})
    for (name, curve), color in zip(curves.items(), ("C0", "C3")):
        steps, accs = zip(*curve)
        left.plot(steps, accs, "o-", ms=3, color=color, label=f"lstmgru.LSTM(layer_norm=True), "
                  f"{name}")
    left.axhline(chance, color="gray", ls=":", lw=1, label=f"chance (1/{args.symbols})")
    left.set_ylim(0, 1.02)
    left.set_xlabel("optimizer step")
    left.set_ylabel("held-out accuracy at recall steps")
    left.set_title(f"Recall the episode's cue: rollouts of T={args.steps} across episodes")
    left.legend(loc="lower right", fontsize="small")
    names = list(ms)
    bars = right.barh(range(len(names)), [ms[n] for n in names],
                      color=["C0", "C1", "C2", "C7"])
    right.bar_label(bars, fmt="%.1f ms", fontsize="small", padding=2)
    right.set_yticks(range(len(names)), names)
    right.invert_yaxis()
    right.set_xlim(0, max(ms.values()) * 1.3)
    right.set_xlabel("ms per forward + backward (median)")
    right.set_title(f"Training step, this machine's CPU ({torch.get_num_threads()} thread(s))\n"
                    f"T={args.steps}, B={args.batch_size}, H={args.hidden}, "
                    f"median of {args.timing_rounds}", fontsize="medium")
    fig.tight_layout()
    path = args.out_dir / "rl_resets.png"
    fig.savefig(path, dpi=120)
    print(f"figure written to {path}")


if __name__ == "__main__":
    main()
