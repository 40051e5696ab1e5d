"""Which implementation runs a module call: the registry, and the backend switch.

Every cell (``LSTM``, ``GRU``, ``LSTMCell``, ``GRUCell``) registers its implementations here
(see ``lstmgru/cells/``). Each implementation declares ``supports(case) -> None | reason``:
the one place that knows what it can take (devices, dtypes, projections, variants, sizes).

Backend names:
    ``"auto"``       the default: the first implementation that supports the case, in the order
                     ``AUTO_ORDER`` gives for the device (CUDA: triton, native, reference;
                     elsewhere: native, reference). Why an implementation was passed over is
                     logged once per reason (logger ``lstmgru``).
    ``"reference"``  plain PyTorch (``lstmgru/cells/*/reference.py``): every case, any device.
    ``"native"``     torch's own ATen kernels, called exactly as torch.nn calls them (oneDNN
                     for the LSTM and ATen's loop for the GRU on the CPU, cuDNN on CUDA); only
                     what torch computes identically.
    ``"triton"``     our fused Triton kernels (CUDA, or CPU tensors in Triton's interpreter).

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
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import torch

from ._compiler import assume_constant_result

ENV_VAR = "LSTMGRU_BACKEND"
# Tried in this order by "auto"; a device type not listed uses the default order. The
# interpreter runs the kernels orders of magnitude slower than the reference, so "auto"
# never picks "triton" for CPU tensors.
AUTO_ORDER = {"cuda": ("triton", "native", "reference")}
DEFAULT_AUTO_ORDER = ("native", "reference")

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
    transform: str = ""       # "torch.compile" or "torch.func" while one is tracing the call


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
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
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


@functools.lru_cache(maxsize=4096)
def _select(backend: str, case: Case) -> Implementation:
    # Cached: a module call must cost no more than torch.nn's, so the decision is made once
    # per (backend, case). Whether triton imports and whether the interpreter is on do not
    # change within a process.
    impls = _REGISTRY[case.cell]
    if backend != "auto":
        impl = impls.get(backend)
        reason = "it does not implement this cell" if impl is None else impl.supports(case)
        if reason is not None:
            raise RuntimeError(f"lstmgru backend {backend!r} was requested but cannot run this "
                               f"{case.cell}: {reason}")
        return impl
    passed_over = []
    for name in AUTO_ORDER.get(case.device_type, DEFAULT_AUTO_ORDER):
        impl = impls[name]
        reason = impl.supports(case)
        if reason is None:
            for skipped, why in passed_over:
                _log_once(f"lstmgru: {case.cell} not on {skipped!r} ({why}); using {name!r}")
            return impl
        passed_over.append((name, reason))
    raise RuntimeError(f"no lstmgru implementation can run this {case.cell}: "
                       + "; ".join(f"{n}: {r}" for n, r in passed_over))


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    _logger.info(message)
