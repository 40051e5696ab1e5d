"""Run every program of an interpreted Triton launch in its own thread.

Triton's interpreter (TRITON_INTERPRET=1) runs a grid's programs one after another, so a
kernel whose programs wait for each other (a grid barrier, dataflow flags between persistent
programs) never returns there. Inside ``parallel_programs()`` every interpreted launch starts
all of its programs together, one thread each, so such waits can complete:

    with parallel_programs(timeout_s=60.0, shake=0.0, seed=None) as stats:
        kernel[grid](...)
    assert stats.max_concurrent == P

The stock grid executor still does everything around the programs (argument copies, pre-run
hooks, patching triton.language); only the call of the kernel body inside its grid loop is
replaced, by a stand-in that collects each program's grid index and, when the last one
arrives, runs them all in threads. Program ids and the grid shape become thread-local, and
every memory access (each load, store and atomic; polls and descriptor accesses are built
from them) first checks whether the launch must stop: another program failed or the deadline
passed. That turns a deadlock into a TimeoutError and a failing program into its own
exception, raised from the launch, instead of a hang.
"""
import contextlib
import dataclasses
import inspect
import math
import random
import threading
import time

import triton
from triton.runtime import interpreter as _interpreter

_Builder = _interpreter.InterpreterBuilder
# Every global-memory access of the 3.6 and 3.9 interpreters goes through these two (plain,
# volatile and atomic loads and stores, atomic polls, tensor descriptors) ...
_MEMORY_OPS = ("create_masked_load", "create_masked_store", "create_barrier")
# ... except read-modify-write atomics, which must also not interleave with each other.
_ATOMIC_OPS = ("create_atomic_rmw", "create_atomic_cas")
# How long to wait, past the deadline, for programs to notice that they must stop.
_GRACE_S = 5.0
_MISSING = object()

_local = threading.local()  # per thread: grid_idx, grid_dim, and the launch it runs a program of
_atomic_lock = threading.Lock()
_session_lock = threading.Lock()
# The interpreter rewrites a jitted helper's source the first time a program calls it (ast.parse
# and compile). Programs are threads here, and CPython 3.11 raises "AST constructor recursion
# depth mismatch" when threads build ASTs at once: the first rewrite of each helper is serialized.
_rewrite_lock = threading.Lock()
_session = None  # the active parallel_programs(), if any


@dataclasses.dataclass
class ParallelStats:
    """What parallel_programs() ran, so a test can tell it from the stock sequential loop."""

    launches: int = 0  # interpreted launches whose programs ran in threads
    programs: int = 0  # programs run, all launches together
    max_concurrent: int = 0  # most programs of one launch running at the same moment


@dataclasses.dataclass
class _Session:
    timeout_s: float
    shake: float
    seed: object
    stats: ParallelStats
    owner: threading.Thread


class _Stop(BaseException):
    """Unwinds a program that must stop. Not an Exception, so that no `except Exception` on
    the way (the interpreter wraps errors of nested jit functions) can turn it into an error."""


class _Launch:

    def __init__(self, name, session):
        self.name = name
        self.session = session
        self.number = session.stats.launches
        self.grid = None
        self.programs = []  # (grid index, kernel arguments) in the stock loop's order
        self.finished = set()  # grid indices whose programs returned
        self.error = None  # the first exception raised by a program
        self.stop = False
        self.running = 0
        self.lock = threading.Lock()

    def collect(self, fn, args):
        builder = _interpreter.interpreter_builder
        self.grid = tuple(builder.grid_dim)
        self.programs.append((builder.grid_idx, args))
        if len(self.programs) == math.prod(self.grid):
            self._run_all(fn)

    def _run_all(self, fn):
        self.start = time.monotonic()
        deadline = self.start + self.session.timeout_s
        go = threading.Event()
        threads = [
            threading.Thread(target=self._program, args=(fn, idx, args, go), name=f"{self.name}{list(idx)}",
                             daemon=True)  # a program stuck outside memory ops must not block exit
            for idx, args in self.programs
        ]
        for thread in threads:
            thread.start()
        go.set()  # all programs start together, so their memory ops interleave from the first
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.stop = True  # any program still running has outlived the deadline: make it give up
        for thread in threads:
            thread.join(_GRACE_S)
        self.session.stats.launches += 1
        self.session.stats.programs += len(threads)

    def _program(self, fn, idx, args, go):
        _local.grid_idx, _local.grid_dim, _local.launch = idx, self.grid, self
        # One generator per program, seeded by its place rather than shared, so that with a
        # seed every program makes the same yield decisions however the threads are scheduled.
        seed = self.session.seed
        _local.rng = random.Random(None if seed is None else f"{seed}/{self.number}/{idx}")
        go.wait()
        with self.lock:
            self.running += 1
            stats = self.session.stats
            stats.max_concurrent = max(stats.max_concurrent, self.running)
        try:
            fn(**args)
            self.finished.add(idx)
        except _Stop:
            pass
        except BaseException as e:  # whatever a program raises goes to the caller
            with self.lock:
                if self.error is None:
                    self.error = e
            self.stop = True
        finally:
            with self.lock:
                self.running -= 1
            _local.launch = None

    def checkpoint(self):
        if self.stop:
            raise _Stop
        if self.session.shake and _local.rng.random() < self.session.shake:
            time.sleep(0)  # let another thread take the GIL here

    def raise_failure(self, expected):
        if self.error is not None:
            raise self.error
        if len(self.programs) != expected:
            raise RuntimeError(f"{self.name}: the interpreter handed over {len(self.programs)} of {expected} "
                               "programs; parallel_programs() does not support this triton's grid loop")
        waiting = [idx for idx, _ in self.programs if idx not in self.finished]
        if waiting:
            raise TimeoutError(f"{self.name}[grid={self.grid}]: programs {waiting} still waiting after "
                               f"{time.monotonic() - self.start:.1f} s (timeout_s={self.session.timeout_s:g})")


class _Programs:
    """Stands in for the kernel body in the stock grid loop (which also reads its signature
    and globals) and hands each call over to the launch instead of running it."""

    def __init__(self, fn, launch):
        self.__signature__ = inspect.signature(fn)
        self.__globals__ = fn.__globals__
        self.__name__ = fn.__name__
        self._fn = fn
        self._launch = launch

    def __call__(self, **args):
        self._launch.collect(self._fn, args)


def _parallel_call(stock_call):

    def call(self, *args, **kwargs):
        session = _session
        if session is None or threading.current_thread() is not session.owner:
            raise RuntimeError("a Triton launch from another thread while parallel_programs() is active; "
                               "it supports one thread at a time")
        launch = _Launch(self.fn.__name__, session)
        kernel, self.fn = self.fn, _Programs(self.fn, launch)
        _local.grid_dim = None
        try:
            stock_call(self, *args, **kwargs)
        finally:
            self.fn = kernel
        launch.raise_failure(expected=math.prod(_local.grid_dim or (0, )))

    return call


def _thread_local(name):
    return property(lambda self: getattr(_local, name, None), lambda self, value: setattr(_local, name, value))


def _serialized(method, lock):

    def serialized(self, *args, **kwargs):
        with lock:
            return method(self, *args, **kwargs)

    return serialized


def _guarded(method, lock=None):

    def guarded(self, *args, **kwargs):
        launch = getattr(_local, "launch", None)
        if launch is not None:
            launch.checkpoint()
        if lock is None:
            return method(self, *args, **kwargs)
        with lock:
            return method(self, *args, **kwargs)

    return guarded


@contextlib.contextmanager
def parallel_programs(timeout_s=60.0, shake=0.0, seed=None):
    """Run each interpreted launch in the body with one thread per program.

    timeout_s: the longest one launch may take; past it the launch raises TimeoutError.
    shake: probability of yielding the GIL before each memory op, to vary interleavings.
    seed: makes the yield decisions reproducible (None: fresh randomness each launch).
    Yields a ParallelStats. Not re-entrant, and only for the thread that entered it.
    """
    global _session
    if not triton.knobs.runtime.interpret:
        raise RuntimeError("parallel_programs() needs Triton's interpreter (TRITON_INTERPRET=1 before triton "
                           "is imported)")
    if not timeout_s > 0 or not 0.0 <= shake <= 1.0:
        raise ValueError(f"need timeout_s > 0 and 0 <= shake <= 1, got {timeout_s=}, {shake=}")
    for name in ("set_grid_idx", "set_grid_dim") + _MEMORY_OPS + _ATOMIC_OPS:
        if not hasattr(_Builder, name):
            raise RuntimeError(f"this triton's interpreter has no {name}; parallel_programs() does not support it")
    with _session_lock:
        if _session is not None:
            raise RuntimeError(f"parallel_programs() is already active (in thread {_session.owner.name}); it is "
                               "not re-entrant")
        _session = _Session(timeout_s, shake, seed, ParallelStats(), threading.current_thread())
    executor = _interpreter.GridExecutor
    patches = [(executor, "__call__", _parallel_call(executor.__call__))]
    patches += [(_Builder, name, _thread_local(name)) for name in ("grid_idx", "grid_dim")]
    patches += [(_Builder, name, _guarded(getattr(_Builder, name))) for name in _MEMORY_OPS]
    patches += [(_Builder, name, _guarded(getattr(_Builder, name), _atomic_lock)) for name in _ATOMIC_OPS]
    patches += [(_interpreter.InterpretedFunction, "rewrite",
                 _serialized(_interpreter.InterpretedFunction.rewrite, _rewrite_lock))]
    # The builder's own grid_idx/grid_dim stay in its instance dict, hidden while the
    # thread-local properties (data descriptors win over instance attributes) are in place.
    originals = []
    try:
        for obj, name, value in patches:
            originals.append((obj, name, obj.__dict__.get(name, _MISSING)))
            setattr(obj, name, value)
        yield _session.stats
    finally:
        for obj, name, value in reversed(originals):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
        _session = None
