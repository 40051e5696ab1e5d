"""The thread-parallel grid executor for Triton's interpreter (tests/_parallel_interpreter.py).

The kernels here are the pattern of the split-hidden persistent RNN kernels: P programs each
own a slice of h, exchange it every step through a ring buffer in global memory, and signal
with one epoch flag per producer (release after the stores, acquire polls by the consumers).
The stock interpreter runs the programs one after another, so the first wait never returns.
Every spin is bounded (MAX_SPIN), so even a broken executor cannot hang the run: the kernel
then carries on with stale data and the comparison fails.
"""
import os
import threading
import time
import traceback

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter"),
]

from triton.runtime import interpreter  # noqa: E402
from _parallel_interpreter import parallel_programs  # noqa: E402

FLAG_STRIDE = 32  # int32s: each flag on its own 128-byte line, as on the GPU
# Failed polls per program: correct runs here need a few hundred at most; a sequential
# executor spends them in a few seconds per program (a poll costs about 0.1-0.5 ms).
MAX_SPIN = 4000
# For kernels that must be stopped by the executor: far longer than their timeouts.
MAX_SPIN_STOPPED = 50_000


@triton.jit
def _wait_for_all(flags_ptr, epoch, P, spins, MAX_SPIN: tl.constexpr):
    # Acquire-poll every producer's flag until it reaches epoch. spins counts the failed polls
    # of the whole kernel: once MAX_SPIN is spent, waits give up and the data goes stale.
    for q in range(P):
        while (tl.atomic_add(flags_ptr + q * 32, 0, sem="acquire") < epoch) & (spins < MAX_SPIN):
            spins += 1
    return spins


@triton.jit
def _exchange_kernel(w_ptr, x_ptr, ring_ptr, out_ptr, flags_ptr, spins_ptr, T, H: tl.constexpr, B: tl.constexpr,
                     WAIT: tl.constexpr, RELEASE_FIRST: tl.constexpr, MAX_SPIN: tl.constexpr):
    # Program p owns rows p*B .. p*B+B of h. Step t: h_t = leaky_relu(W h_{t-1} + x_t), h_{t-1}
    # read whole from ring slot (t-1)%2, the own slice written to slot t%2 (and to out).
    p = tl.program_id(0)
    P = tl.num_programs(0)
    rows = p * B + tl.arange(0, B)
    cols = tl.arange(0, H)
    w = tl.load(w_ptr + rows[:, None] * H + cols[None, :])
    spins = 0
    for t in range(1, T + 1):
        if WAIT:
            spins = _wait_for_all(flags_ptr, t - 1, P, spins, MAX_SPIN)
        h = tl.load(ring_ptr + ((t - 1) % 2) * H + cols)
        a = tl.sum(w * h[None, :], axis=1) + tl.load(x_ptr + t * H + rows)
        h_new = tl.where(a > 0, a, 0.5 * a)
        if RELEASE_FIRST:  # planted bug: the flag says "ready" before the data is there
            tl.atomic_xchg(flags_ptr + p * 32, t, sem="release")
        tl.store(ring_ptr + (t % 2) * H + rows, h_new)
        tl.store(out_ptr + t * H + rows, h_new)
        tl.debug_barrier()
        if not RELEASE_FIRST:
            tl.atomic_xchg(flags_ptr + p * 32, t, sem="release")
    tl.store(spins_ptr + p, spins)


def _problem(P, T, B=4, seed=0):
    H = P * B
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)
    x = rng.standard_normal((T + 1, H)).astype(np.float32)
    return w, x


def _reference(w, x, T):
    # The kernel's operations in the same order and shapes, in fp32: the result is bitwise.
    h = x[0]
    out = np.zeros((T + 1, w.shape[0]), np.float32)
    out[0] = h
    for t in range(1, T + 1):
        a = np.sum(w * h[None, :], axis=1) + x[t]
        h = np.where(a > 0, a, np.float32(0.5) * a)
        out[t] = h
    return out


def _run_exchange(w, x, T, P, wait=True, release_first=False):
    H = w.shape[0]
    ring = torch.zeros(2, H)
    ring[0] = torch.from_numpy(x[0])
    out = torch.zeros(T + 1, H)
    out[0] = ring[0]
    flags = torch.zeros(P * FLAG_STRIDE, dtype=torch.int32)
    spins = torch.zeros(P, dtype=torch.int32)
    _exchange_kernel[(P, )](torch.from_numpy(w), torch.from_numpy(x), ring, out, flags, spins, T, H=H, B=H // P,
                            WAIT=wait, RELEASE_FIRST=release_first, MAX_SPIN=MAX_SPIN)
    return out.numpy(), spins.numpy()


def _check_exchange(P, T, shake=0.0, seed=None, **bug):
    """Runs the exchange kernel: (whether it matched the step loop bitwise, ParallelStats)."""
    w, x = _problem(P, T)
    with parallel_programs(timeout_s=120.0, shake=shake, seed=seed) as stats:
        got, spins = _run_exchange(w, x, T, P, **bug)
    assert spins.max() < MAX_SPIN, "a wait gave up"
    return np.array_equal(got, _reference(w, x, T)), stats


@pytest.mark.parametrize("P,T", [(2, 64), (4, 32), (8, 16), (16, 32)])
def test_dataflow_exchange_bitwise(P, T):
    matched, stats = _check_exchange(P, T)
    assert matched
    assert (stats.launches, stats.programs, stats.max_concurrent) == (1, P, P)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dataflow_exchange_bitwise_shaken(seed):
    matched, stats = _check_exchange(8, 16, shake=0.3, seed=seed)
    assert matched
    assert stats.max_concurrent == 8


@pytest.mark.parametrize("bug", [dict(wait=False), dict(release_first=True)], ids=["no_wait", "release_first"])
def test_missing_synchronisation_is_caught(bug):
    # The same check as above, on planted bugs: shaken, a few seeds expose each of them (in
    # practice every seed does; without shake, release_first goes unnoticed).
    assert not all(_check_exchange(4, 8, shake=0.5, seed=seed, **bug)[0] for seed in range(4))


@triton.jit
def _wait_forever_kernel(flags_ptr, POLL: tl.constexpr, MAX_SPIN: tl.constexpr):
    # Waits for a flag nobody sets, for far longer than the timeout.
    if POLL:
        tl.atomic_poll(flags_ptr, 1, sem="acquire", timeout_ns=MAX_SPIN * 1_000_000)  # MAX_SPIN ms
    else:
        spins = 0
        while (tl.atomic_add(flags_ptr, 0, sem="acquire") < 1) & (spins < MAX_SPIN):
            spins += 1


@pytest.mark.parametrize("poll", [False, True], ids=["atomic_add", "atomic_poll"])
def test_deadlock_raises_timeout(poll):
    if poll and not hasattr(tl, "atomic_poll"):
        pytest.skip("tl.atomic_poll needs triton >= 3.9")
    flags = torch.zeros(FLAG_STRIDE, dtype=torch.int32)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"_wait_forever_kernel\[grid=\(3, 1, 1\)\].* after 2\.\d s"):
        with parallel_programs(timeout_s=2.0):
            _wait_forever_kernel[(3, )](flags, POLL=poll, MAX_SPIN=MAX_SPIN_STOPPED)
    assert time.monotonic() - start < 4.0
    assert not _program_threads("_wait_forever_kernel")


@triton.jit
def _one_fails_kernel(flags_ptr, marks_ptr, MAX_SPIN: tl.constexpr):
    # Program 1 fails before setting its flag; the others wait for it, then would leave a mark.
    p = tl.program_id(0)
    if p == 1:
        tl.arange(0, 4) + tl.arange(0, 8)  # a Python error in the interpreter: shapes differ
    spins = 0
    while (tl.atomic_add(flags_ptr + 32, 0, sem="acquire") < 1) & (spins < MAX_SPIN):
        spins += 1
    tl.store(marks_ptr + p, 1)


def test_program_error_is_reraised_and_stops_the_others():
    flags = torch.zeros(2 * FLAG_STRIDE, dtype=torch.int32)
    marks = torch.zeros(4, dtype=torch.int32)
    start = time.monotonic()
    with pytest.raises(ValueError, match="incompatible dimensions") as failure:
        with parallel_programs(timeout_s=60.0):
            _one_fails_kernel[(4, )](flags, marks, MAX_SPIN=MAX_SPIN_STOPPED)
    assert time.monotonic() - start < 10.0
    assert "_one_fails_kernel" in [frame.name for frame in traceback.extract_tb(failure.tb)]
    assert not _program_threads("_one_fails_kernel")
    assert marks.tolist() == [0, 0, 0, 0]


@triton.jit
def _ticket_kernel(counter_ptr, tickets_ptr, K: tl.constexpr):
    # Each program draws K tickets from one atomic counter.
    p = tl.program_id(0)
    for k in range(K):
        tl.store(tickets_ptr + p * K + k, tl.atomic_add(counter_ptr, 1))


def _draw_tickets(P, K):
    counter = torch.zeros(1, dtype=torch.int32)
    tickets = torch.full((P, K), -1, dtype=torch.int32)
    _ticket_kernel[(P, )](counter, tickets, K=K)
    return counter.item(), tickets


def _load_yield_store_add(self, rmw_op, ptr, val, mask, sem, scope):
    # An atomic add that lets go of the GIL between its read and its write, standing in for an
    # interpreter whose atomics are not one uninterruptible call (3.6 and 3.9 keep the GIL).
    dtype = interpreter._get_np_dtype(ptr.get_element_ty())
    old = interpreter._interpreter.load(ptr.data, mask.data, np.zeros(ptr.data.shape, dtype), dtype)
    time.sleep(0)
    interpreter._interpreter.store(ptr.data, old + val.data, mask.data)
    return interpreter.TensorHandle(old, val.dtype.scalar)


def test_atomics_stay_atomic(monkeypatch):
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_atomic_rmw", _load_yield_store_add)
    with parallel_programs(shake=0.5, seed=0) as stats:
        count, tickets = _draw_tickets(8, 25)
    assert stats.max_concurrent > 1
    assert count == 200
    assert sorted(tickets.flatten().tolist()) == list(range(200))


def _patched_state():
    return dict(interpreter.InterpreterBuilder.__dict__), interpreter.GridExecutor.__call__


def test_stock_interpreter_is_back_after_exit():
    before = _patched_state()
    with parallel_programs():
        _draw_tickets(4, 1)
    with pytest.raises(KeyError):
        with parallel_programs():
            raise KeyError("body failed")
    assert _patched_state() == before
    # Sequentially, in grid order, program p draws tickets p*K .. p*K+K-1.
    count, tickets = _draw_tickets(4, 3)
    assert count == 12
    assert tickets.flatten().tolist() == list(range(12))
    assert interpreter.interpreter_builder.grid_idx == (3, 0, 0)


def test_misuse_fails_loudly():
    errors = []

    def launch_from_another_thread():
        try:
            _draw_tickets(2, 1)
        except RuntimeError as e:
            errors.append(e)

    with parallel_programs():
        with pytest.raises(RuntimeError, match="not re-entrant"):
            with parallel_programs():
                pass
        thread = threading.Thread(target=launch_from_another_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "another thread" in str(errors[0])
    with pytest.raises(ValueError):
        with parallel_programs(shake=2.0):
            pass


def _program_threads(kernel_name):
    return [t for t in threading.enumerate() if t.name.startswith(kernel_name) and t.is_alive()]
