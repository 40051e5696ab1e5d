"""The kernels' launch path never waits for the device (no host sync).

A host sync between launches stops the CPU from queueing ahead and breaks CUDA-graph capture.
Here the launchers of both families run in Triton's interpreter while every way the host
could read a device value is forbidden outside the kernels themselves: ``Tensor.item``,
``tolist``, ``cpu``, ``torch.cuda.synchronize``, event and stream synchronisation, and the
dispatcher ops behind ``int(t)``, ``bool(t)``, ``torch.equal`` and friends. Inside a launch
(the interpreter's stand-in for the GPU) anything goes. The GPU side of the same promise is
tests/test_gpu_graphs.py (capture in a CUDA graph, sync debug mode).

The split family's error word is read from host memory once its launch has finished (see
``check_errors``); a timed-out wait still raises (test_kernel_split.py) and reads no device
value to do so.
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from lstmgru._kernels import _launch as kernel_launch  # noqa: E402
from lstmgru._kernels import gru as tiled_gru  # noqa: E402
from lstmgru._kernels import lstm as tiled_lstm  # noqa: E402
from lstmgru._kernels import split  # noqa: E402
from _parallel_interpreter import parallel_programs  # noqa: E402

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="CPU check; the GPU's is test_gpu_graphs.py")]

# Dispatcher ops that read a tensor's value on the host (a sync for a device tensor).
_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
          torch.ops.aten.equal.default, torch.ops.aten.nonzero.default,
          torch.ops.aten.allclose.default}


class _HostSyncs(TorchDispatchMode):
    """Records every forbidden call made outside a kernel launch."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.in_launch = 0

    def note(self, what):
        if not self.in_launch:
            self.calls.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            self.note(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def forbid_host_syncs(monkeypatch):
    watch = _HostSyncs()
    real_launch = kernel_launch.launch

    def launch(*args, **kwargs):  # the device's own work: reads there are not host syncs
        watch.in_launch += 1
        try:
            with torch.utils._python_dispatch._disable_current_modes():
                return real_launch(*args, **kwargs)
        finally:
            watch.in_launch -= 1

    def forbidden(name, real):
        def call(*args, **kwargs):
            watch.note(name)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(kernel_launch, "launch", launch)
    for owner, name in ((torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "cpu"),
                        (torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"),
                        (torch.cuda.Stream, "synchronize")):
        monkeypatch.setattr(owner, name, forbidden(f"{getattr(owner, '__name__', owner)}.{name}",
                                                   getattr(owner, name)))
    with watch:
        yield watch


def _inputs(T, B, H, gates, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gates_x = torch.randn(T, B, gates * H, generator=gen).to(dtype)
    weight_hh = (torch.randn(gates * H, H, generator=gen) / H ** 0.5).to(dtype)
    h0 = torch.randn(B, H, generator=gen).to(dtype)
    c0 = torch.randn(B, H, generator=gen).to(dtype)
    lengths = torch.tensor([T, T - 1, 1][:B], dtype=torch.int64)
    grad_y = torch.randn(T, B, H, generator=gen)
    return gates_x, weight_hh, h0, c0, lengths, grad_y


def test_split_launches_make_no_host_sync(monkeypatch):
    T, B, H = 3, 3, 40
    gx, w, h0, c0, lengths, gy = _inputs(T, B, H, 4)
    gx3, w3, _, _, _, _ = _inputs(T, B, H, 3, seed=1)
    with parallel_programs(timeout_s=120.0), forbid_host_syncs(monkeypatch) as watch:
        y, h_n, c_n, saved = split.lstm_forward(gx, h0, c0, w, lengths, False, True)
        split.lstm_backward(gy, None, None, saved, y, h0, c0, w, lengths, False)
        for reset_after in (True, False):
            y, h_n, saved = split.gru_forward(gx3, h0, w3, None, lengths, True, reset_after, True)
            split.gru_backward(gy, h_n.float(), saved, y, h0, w3, None, lengths, True,
                               reset_after)
        launches = kernel_launch.launches
    assert watch.calls == []
    assert launches >= 6


def test_tiled_launches_make_no_host_sync(monkeypatch):
    T, B, H = 3, 3, 16
    gx, w, h0, c0, lengths, gy = _inputs(T, B, H, 4)
    gx3, w3, _, _, _, _ = _inputs(T, B, H, 3, seed=1)
    with forbid_host_syncs(monkeypatch) as watch:
        y, h_n, c_n, saved = tiled_lstm.lstm_forward(gx, h0, c0, w, lengths, False, True)
        tiled_lstm.lstm_backward(gy, None, None, saved, y, h0, c0, w, lengths, False)
        for reset_after in (True, False):
            y, h_n, saved = tiled_gru.gru_forward(gx3, h0, w3, None, lengths, True, reset_after,
                                                  True)
            tiled_gru.gru_backward(gy, None, saved, y, h0, w3, None, lengths, True, reset_after)
    assert watch.calls == []


def test_the_watch_sees_a_host_sync(monkeypatch):
    """The check itself can fail: a value read on the host outside a launch is caught."""
    with forbid_host_syncs(monkeypatch) as watch:
        t = torch.ones(2)
        int(t.sum())
        t.tolist()
    assert len(watch.calls) == 2


class _FakeEvent:
    """Stands in for a CUDA event: not done until ``finish``."""

    def __init__(self):
        self.finished = False
        self.waited = False

    def query(self):
        return self.finished

    def synchronize(self):
        self.waited = True
        self.finished = True


def test_error_word_is_read_only_after_its_launch_finished(monkeypatch):
    """A timed-out launch is reported by the first check after it has finished (the next
    launch, or check_errors), never by waiting for it, unless asked to wait."""
    monkeypatch.setattr(split, "_pending", [])
    plan = split.split_plan(1, 40, torch.float32, 132)
    event = _FakeEvent()
    split._pending.append(split._PendingError(event, torch.tensor([7], dtype=torch.int32),
                                              "LSTM forward", plan))
    split.check_errors()  # still running: nothing read, nothing raised
    assert len(split._pending) == 1 and not event.waited
    event.finished = True
    with pytest.raises(RuntimeError, match=r"split LSTM forward: .*epoch 7; P=5 programs"):
        split.check_errors()
    assert split._pending == []
    split.check_errors()  # reported once

    event = _FakeEvent()
    split._pending.append(split._PendingError(event, torch.tensor([0], dtype=torch.int32),
                                              "GRU backward", plan))
    split.check_errors(wait=True)  # waits, reads 0: fine
    assert event.waited and split._pending == []
