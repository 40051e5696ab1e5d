"""Which implementation runs a module call: the registry, and the backend switch.

Every cell (``LSTM``, ``GRU``, ``LSTMCell``, ``GRUCell``) registers its implementations here
(see ``lstmgru/cells/``). Each implementation declares ``supports(case) -> None | reason``:
the one place that knows what it can take (devices, dtypes, projections, variants, sizes).

Backend names:
    ``"auto"``          the default; the policy below.
    ``"reference"``     plain PyTorch (``lstmgru/cells/*/reference.py``): every case, any device.
    ``"native"``        torch's own ATen kernels, called exactly as torch.nn calls them (oneDNN
                        for the LSTM and ATen's loop for the GRU on the CPU, cuDNN on CUDA);
                        only what torch computes identically.
    ``"triton"``        our fused Triton kernels (CUDA, or CPU tensors in Triton's interpreter),
                        the family picked per call by the cost model;
    ``"triton-tiled"``, ``"triton-split"``  one kernel family each.

``auto`` takes the first implementation that supports the case, in this order:
    CUDA:       the kernel family that a measurement of this GPU says is faster than cuDNN for
                the case's bucket (``lstmgru.calibration``: the table shipped in the package,
                with the user's own from ``python -m lstmgru.calibrate`` merged over it);
                then ``native`` (cuDNN), ``triton``, ``reference``. So without a measurement
                cuDNN runs whatever it computes, our kernels what only they compute (the cell
                variants, the original GRU ``reset_after=False``, one op under torch.compile),
                and the reference only what neither can.
    elsewhere:  ``native``, then ``reference`` (the interpreter is far slower than either).
``native`` is taken only where a one-time probe (``lstmgru/cells/_native.py``) saw torch's
kernel run the case's dtype on this machine, under autocast when the call is; an explicit
``"native"`` skips the probe, so that torch's own error reaches the user. Why an implementation
was passed over is logged once per reason (logger ``lstmgru``).

If one of our kernels fails to run under ``auto`` (an error from the Triton launch path: a
refused cooperative launch, a sync timeout, a compilation or resource error), the failing call
finishes on the next implementation in auto's order that runs a layer's recurrence and is not
one of our kernels (the reference: torch's whole-module kernel cannot take over inside a module
call), with a one-time ``RuntimeWarning`` naming the error; later calls of that case start at the
next implementation in auto's order (cuDNN where it computes the case). Out-of-memory errors
and errors in the backward pass are not caught.

An explicit name that cannot take a case raises ``RuntimeError`` with the reason; it never
falls back. The choice is context-local (a ``ContextVar``): ``set_backend`` affects the
current thread or task, ``use_backend`` a ``with`` block; new threads start from the default,
which is ``$LSTMGRU_BACKEND`` (read at every call) or ``"auto"``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Dict, FrozenSet, Iterator, NamedTuple, Optional, Tuple

import torch

from ._compiler import assume_constant_result

ENV_VAR = "LSTMGRU_BACKEND"
# Tried in this order by "auto"; a device type not listed uses the default order. On CUDA a
# calibration entry puts a kernel family first (``auto_order``). The interpreter runs the
# kernels orders of magnitude slower than the reference, so "auto" never picks "triton" for
# CPU tensors.
AUTO_ORDER = {"cuda": ("native", "triton", "reference")}
DEFAULT_AUTO_ORDER = ("native", "reference")
# Our kernels. A launch of theirs may fail on hardware they have never run on, so auto falls
# back from them (``_with_fallback``).
KERNELS = frozenset({"triton", "triton-tiled", "triton-split"})
# The dtypes autocast computes in: only for these does a case record whether autocast is on.
_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)

_logger = logging.getLogger("lstmgru")
_choice: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lstmgru_backend",
                                                                        default=None)


class Case(NamedTuple):
    """What an implementation needs to know to say whether it can run a module call."""

    cell: str                 # "LSTM", "GRU", "LSTMCell" or "GRUCell"
    device_type: str          # of the input
    dtype: torch.dtype        # the dtype the recurrence runs in (after autocast)
    hidden_size: int
    batch: int                # 0 while torch.compile traces: the choice must not specialize on it
    proj_size: int = 0
    reset_after: bool = True  # GRU: False is the original GRU, which torch cannot compute
    variants: Tuple[str, ...] = ()  # cell variants in force (names); torch computes none
    transform: str = ""       # "torch.compile", "torch.func" or "forward-mode AD" (dual tensors)
    autocast: bool = False    # float16/bfloat16: autocast is on for device_type (``select``)


@dataclass(frozen=True)
class Implementation:
    """One way to run a cell. Exactly one of ``module_forward`` and ``recurrence`` is set.

    ``module_forward(module, input, hx)`` runs the whole call itself, as torch.nn would
    (native). ``recurrence`` runs one layer-direction after the module has checked the
    arguments and projected the input; its signature is the cell's reference recurrence.
    """

    name: str
    supports: Callable[[Case], Optional[str]]
    module_forward: Optional[Callable] = None
    recurrence: Optional[Callable] = None
    # Asked by "auto" only, after ``supports``: whether the implementation really runs the
    # case on this machine (native: a probe of torch's kernel). An explicit request skips it,
    # so that the implementation's own error reaches the user.
    probe: Optional[Callable[[Case], Optional[str]]] = None


_REGISTRY: Dict[str, Dict[str, Implementation]] = {}
_NAMES: Tuple[str, ...] = ("auto",)


def register(cell: str, implementation: Implementation) -> None:
    global _NAMES
    if (implementation.module_forward is None) == (implementation.recurrence is None):
        raise ValueError(f"{implementation.name}: set exactly one of module_forward, recurrence")
    _REGISTRY.setdefault(cell, {})[implementation.name] = implementation
    registered = {name for impls in _REGISTRY.values() for name in impls}
    _NAMES = ("auto",) + tuple(sorted(registered))
    _select.cache_clear()


def names() -> Tuple[str, ...]:
    """Every backend name: "auto" and each registered implementation."""
    return _NAMES


def _validate(name, source: str = "backend") -> str:
    if name not in _NAMES:
        raise ValueError(f"unknown lstmgru {source} {name!r}; expected one of "
                         f"{', '.join(names())}")
    return name


def get_backend() -> str:
    """The backend in force here: ``set_backend``/``use_backend``, else ``$LSTMGRU_BACKEND``,
    else ``"auto"``."""
    chosen = _choice.get()
    if chosen is not None:
        return chosen
    raw = _ENVIRONMENT.get(_ENV_KEY) if _ENVIRONMENT is not None else os.environ.get(ENV_VAR)
    return "auto" if raw is None else _backend_from_environment(raw)


# Every module call reads $LSTMGRU_BACKEND; os.environ.get costs microseconds (it encodes the
# key and decodes the value), a sizeable part of a small call. os.environ keeps a plain dict of
# the encoded entries (``_data``) in step with itself: looking the encoded key up there is the
# same read at a dict lookup's cost.
_ENVIRONMENT = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else ENV_VAR


@functools.lru_cache(maxsize=64)
def _backend_from_environment(raw) -> str:
    value = os.environ.decodevalue(raw) if hasattr(os.environ, "decodevalue") else raw
    name = value.strip().lower() or "auto"
    return _validate(name, f"backend from the environment variable {ENV_VAR}:")


def set_backend(name: str) -> None:
    """Select the backend for the current context (thread or task): a name from ``names()``."""
    _choice.set(_validate(name))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with lstmgru.use_backend("reference"): ...`` runs the block on that backend."""
    token = _choice.set(_validate(name))
    try:
        yield
    finally:
        _choice.reset(token)


def supports(name: str, case: Case) -> Optional[str]:
    """Why implementation ``name`` cannot run ``case``, or None."""
    return _REGISTRY[case.cell][name].supports(case)


def select(case: Case) -> Implementation:
    """The implementation that runs ``case`` under the backend in force."""
    if torch.compiler.is_compiling():
        return _REGISTRY[case.cell][_name_while_compiling(*case)]
    if case.dtype in _AUTOCAST_DTYPES and torch._C._is_any_autocast_enabled() \
            and case.device_type in ("cpu", "cuda"):
        # Whether torch's kernel runs a reduced dtype can depend on autocast (oneDNN's bf16
        # LSTM does not run under it on CPUs without AVX-512 bf16). Checked in that order
        # because the dtype test is the cheaper one, and float32 is the common case.
        case = case._replace(autocast=torch.is_autocast_enabled(case.device_type))
    return _select(get_backend(), case)


@assume_constant_result  # lstmgru._compiler: without importing torch._dynamo
def _name_while_compiling(*fields) -> str:
    # Dynamo cannot trace ContextVar.get: the choice is made once, when the graph is built,
    # and baked into it (a backend changed later applies to graphs compiled later). The case
    # travels as its fields: constants that dynamo hands over as they are.
    return _select(get_backend(), Case(*fields)).name


@assume_constant_result
def auto_while_compiling() -> bool:
    """Whether the backend in force is ``"auto"``, read (like ``_name_while_compiling``) once,
    when torch.compile builds a graph. Under ``"auto"`` a traced layer may run torch's own
    kernel as an op (``lstmgru.cells.lstm.reference.onednn_layer``); an explicit
    ``"reference"`` keeps the plain-PyTorch recurrence."""
    return get_backend() == "auto"


# The kernels that failed to run a case under auto (``_with_fallback``); auto skips them.
_failed: Dict[Case, FrozenSet[str]] = {}


def auto_order(case: Case) -> Tuple[str, ...]:
    """The implementations "auto" tries for ``case``, first to last (the module's doc)."""
    order = AUTO_ORDER.get(case.device_type, DEFAULT_AUTO_ORDER)
    if case.device_type == "cuda":
        from . import calibration  # read on the first CUDA choice, never at import

        faster = calibration.preferred_kernel(case)
        if faster is not None:
            order = (faster,) + tuple(name for name in order if name != faster)
    failed = _failed.get(case)
    if failed:
        order = tuple(name for name in order if name not in failed)
    return order


@functools.lru_cache(maxsize=4096)
def _select(backend: str, case: Case) -> Implementation:
    # Cached: a module call must cost no more than torch.nn's, so the decision is made once
    # per (backend, case). Whether triton imports and whether the interpreter is on do not
    # change within a process; the calibration table and the native probe are read once.
    impls = _REGISTRY[case.cell]
    if backend != "auto":
        impl = impls.get(backend)
        reason = "it does not implement this cell" if impl is None else impl.supports(case)
        if reason is not None:
            raise RuntimeError(f"lstmgru backend {backend!r} was requested but cannot run this "
                               f"{case.cell}: {reason}")
        return impl
    passed_over = []
    chosen = None
    for name in auto_order(case):
        impl = impls.get(name)
        if impl is None:
            continue
        if chosen is not None and (impl.recurrence is None or name in KERNELS):
            continue  # cannot take over a kernel's recurrence (the module's doc)
        reason = impl.supports(case)
        if reason is None and impl.probe is not None:
            reason = impl.probe(case)
        if reason is not None:
            if chosen is None:
                passed_over.append((name, reason))
            continue
        if chosen is not None:
            return replace(chosen, recurrence=_with_fallback(case, chosen, impl))
        chosen = impl
        for skipped, why in passed_over:
            _log_once(f"lstmgru: {case.cell} not on {skipped!r} ({why}); using {name!r}")
        if name not in KERNELS:
            return impl
    if chosen is not None:
        return chosen  # a kernel with nothing to fall back to
    raise RuntimeError(f"no lstmgru implementation can run this {case.cell}: "
                       + "; ".join(f"{n}: {r}" for n, r in passed_over))


def _is_launch_failure(error: BaseException) -> bool:
    """Whether ``error``, raised while one of our kernels ran, is the kernel failing to run
    (auto falls back) rather than something no implementation would get past."""
    if isinstance(error, torch.OutOfMemoryError):
        return False  # the next implementation needs the memory too
    if type(error).__module__.split(".")[0] == "triton":
        return True  # compilation, resources, launch
    return isinstance(error, RuntimeError)  # the driver's launch errors, the sync timeout


def _with_fallback(case: Case, kernel: Implementation, fallback: Implementation) -> Callable:
    """``kernel``'s recurrence, finishing on ``fallback``'s where the kernel fails to run. The
    failure is recorded, so that later choices for ``case`` skip the kernel."""
    run_kernel, run_fallback = kernel.recurrence, fallback.recurrence

    def recurrence(*args, **kwargs):
        if kernel.name in _failed.get(case, ()):  # it failed on an earlier layer of this call
            return run_fallback(*args, **kwargs)
        try:
            return run_kernel(*args, **kwargs)
        except Exception as error:
            if not _is_launch_failure(error):
                raise
            _failed[case] = _failed.get(case, frozenset()) | {kernel.name}
            _select.cache_clear()
            later = _select("auto", case).name
            warnings.warn(f"lstmgru: the {kernel.name!r} kernels failed to run this {case.cell} "
                          f"(hidden size {case.hidden_size}, batch {case.batch}, {case.dtype}): "
                          f"{type(error).__name__}: {error}. This call finishes on "
                          f"{fallback.name!r}; later calls of this case run on {later!r}.",
                          RuntimeWarning, stacklevel=2)
        return run_fallback(*args, **kwargs)

    return recurrence


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    _logger.info(message)
