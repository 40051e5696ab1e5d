"""Data-parallel training on the CPU: two processes over gloo on the loopback interface.

Each rank trains a small model (a 2-layer lstmgru LSTM or GRU under a linear head) on its own
shard of a fresh random batch for a few SGD steps, wrapped in DistributedDataParallel or in FSDP2
(``fully_shard``). After every backward the synchronised gradients must be bitwise identical on
both ranks, and equal (fp32, atol 1e-6) to those of the same model built on torch.nn and wrapped
the same way, from the same weights and data; the outputs, losses and the input gradient of each
rank's shard too.

The ranks run as subprocesses of this file (``python test_distributed.py --worker ...``). The
process group has a timeout and the test kills both ranks after ``JOIN_TIMEOUT_S``, so a hang in
a collective cannot stall the suite. A rank records every mismatch and keeps going through all the
collectives, so one failing rank cannot leave the other waiting; it fails at the end.
"""
import json
import os
import random
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS = 3
PG_TIMEOUT_S = 60
JOIN_TIMEOUT_S = 180
BATCH, SEQ, INPUT, HIDDEN, OUT = 3, 6, 5, 7, 4  # BATCH per rank


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(wrapper, tmp_path):
    """Run both ranks; return their reports, or fail with their output."""
    port, seed = _free_port(), random.randrange(2**31)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LSTMGRU_BACKEND", None)
    procs, logs = [], []
    for rank in range(WORLD):
        log = open(tmp_path / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", wrapper, str(rank), str(port), str(seed),
             str(tmp_path / f"rank{rank}.json")],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    timed_out = False
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    detail = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{o[-6000:]}"
                       for r, (p, o) in enumerate(zip(procs, outputs)))
    assert not timed_out, f"ranks did not finish within {JOIN_TIMEOUT_S} s (seed {seed})\n{detail}"
    assert all(p.returncode == 0 for p in procs), f"a rank failed (seed {seed})\n{detail}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_data_parallel_gradients_match_torch_nn(wrapper, tmp_path):
    reports = _launch(wrapper, tmp_path)
    for rank, report in enumerate(reports):
        assert report["rank"] == rank
        assert report["checked"] == {kind: STEPS for kind in ("LSTM", "GRU")}, report


# ----------------------------------------------------------------------------------------------
# The rank processes.


def _worker(wrapper, rank, port, seed, out_path):
    import torch.distributed as dist
    from torch import nn

    import lstmgru
    from _parity import assert_close, weighted_loss

    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=PG_TIMEOUT_S))

    class Net(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn
            self.head = nn.Linear(HIDDEN, OUT)

        def forward(self, x):
            y, final = self.rnn(x)
            return self.head(y), final

    def wrap(net):
        if wrapper == "ddp":
            return nn.parallel.DistributedDataParallel(net)
        from torch.distributed.fsdp import fully_shard

        fully_shard(net.rnn)
        fully_shard(net)
        return net

    def full(grad):
        # FSDP2 leaves each rank its shard of the reduced gradient (a DTensor); gather it.
        return grad.full_tensor() if hasattr(grad, "full_tensor") else grad

    failures, checked = [], {}

    def check(fn, *args):
        try:
            fn(*args)
        except AssertionError as err:
            failures.append(str(err))

    for kind in ("LSTM", "GRU"):
        # The same seed on every rank: the same initial weights, the same global batches.
        torch.manual_seed(seed)
        ref = Net(getattr(nn, kind)(INPUT, HIDDEN, num_layers=2, batch_first=True))
        ours = Net(getattr(lstmgru, kind)(INPUT, HIDDEN, num_layers=2, batch_first=True))
        ours.load_state_dict(ref.state_dict())
        names = [n for n, _ in ref.named_parameters()]
        assert names == [n for n, _ in ours.named_parameters()]
        models = {"torch.nn": wrap(ref), "lstmgru": wrap(ours)}
        optims = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
        checked[kind] = 0
        for step in range(STEPS):
            gen = torch.Generator().manual_seed(seed + 1 + step)
            batch = torch.randn(WORLD * BATCH, SEQ, INPUT, generator=gen)
            shard = batch[rank * BATCH:(rank + 1) * BATCH]
            results = {}
            for key, model in models.items():
                x = shard.clone().requires_grad_()
                y, final = model(x)
                finals = final if isinstance(final, tuple) else (final,)
                # Different weights for every element, step and rank; scaled so that gradients
                # are O(1) and atol 1e-6 sits well above fp32 rounding.
                loss = weighted_loss([y, *finals], seed=seed + 1000 * step + rank) / (BATCH * SEQ)
                loss.backward()
                grads = {n: full(p.grad) for n, p in model.named_parameters()}
                results[key] = {"loss": loss.detach(), "y": y.detach(), "x.grad": x.grad,
                                **{f"{n}.grad": g for n, g in grads.items()}}
                # The synchronised gradients are bitwise the same on every rank.
                flat = torch.cat([g.reshape(-1) for g in grads.values()])
                gathered = [torch.empty_like(flat) for _ in range(WORLD)]
                dist.all_gather(gathered, flat)
                for other in range(1, WORLD):
                    if not torch.equal(gathered[0], gathered[other]):
                        failures.append(
                            f"{wrapper} {kind} {key} step {step}: gradients on rank {other} differ "
                            f"from rank 0 (max {(gathered[0] - gathered[other]).abs().max():.3g})")
            for name, want in results["torch.nn"].items():
                check(assert_close, results["lstmgru"][name], want,
                      f"{wrapper} {kind} step {step} rank {rank} {name}", 1e-6)
            for opt in optims.values():
                opt.step()
                opt.zero_grad(set_to_none=True)
            checked[kind] += 1
    dist.barrier()
    dist.destroy_process_group()
    Path(out_path).write_text(json.dumps({"rank": rank, "checked": checked}))
    if failures:
        raise AssertionError("\n".join(failures))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _wrapper, _rank, _port, _seed, _out = sys.argv[2:7]
    _worker(_wrapper, int(_rank), int(_port), int(_seed), _out)
