"""Backend choice: which implementation runs a recurrence, and why.

Names:
    ``"auto"``       the default: the Triton kernels for CUDA tensors when the case is
                     supported, else the plain-PyTorch reference (the reason is logged once).
    ``"reference"``  always the plain-PyTorch reference.
    ``"triton"``     always the Triton kernels; raises ``RuntimeError`` with the reason when
                     they cannot run. It never falls back.

The default comes from the environment variable ``LSTMGRU_BACKEND``, read at every call, so
it can be changed without re-importing. ``set_backend`` overrides it for the process and
``use_backend`` for a ``with`` block.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "LSTMGRU_BACKEND"

_logger = logging.getLogger("lstmgru")
_explicit_backend: Optional[str] = None
_reasons_logged: set = set()


def _validate(name, source: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown lstmgru {source} {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend in force: ``set_backend``/``use_backend`` if used, else ``$LSTMGRU_BACKEND``."""
    if _explicit_backend is not None:
        return _explicit_backend
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    return _validate(name, f"backend from the environment variable {ENV_VAR}:")


def set_backend(name: str) -> None:
    """Select the backend for this process: ``"auto"``, ``"reference"`` or ``"triton"``."""
    global _explicit_backend
    _explicit_backend = _validate(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with lstmgru.use_backend("reference"): ...`` runs the block on that backend."""
    global _explicit_backend
    _validate(name)
    previous = _explicit_backend
    _explicit_backend = name
    try:
        yield
    finally:
        _explicit_backend = previous


def interpreter_enabled() -> bool:
    """Triton's interpreter runs kernels on CPU tensors when ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _missing_kernels() -> Optional[str]:
    """Whether triton and the kernels are importable. Asked once: ``find_spec`` searches the
    file system, which would cost more than a small forward pass on every call."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if importlib.util.find_spec("lstmgru._kernels") is None:
        # kernels/ becomes lstmgru._kernels only when the package is installed.
        return "the kernels are not installed: install the package (pip install -e .)"
    return None


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on tensors of ``device`` (None when they can)."""
    missing = _missing_kernels()
    if missing is not None:
        return missing
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    if device.type == "cpu":
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    return f"tensors are on {device.type}, and the Triton kernels run on CUDA only"


def choose(device: torch.device, unsupported: Optional[str]) -> str:
    """Pick ``"triton"`` or ``"reference"`` for one recurrence call.

    ``unsupported`` is the caller's reason why the kernels cannot take this particular case
    (a feature they lack), or None.
    """
    backend = get_backend()
    # auto: the interpreter is a correctness tool, orders of magnitude slower than the
    # reference, so auto only takes the kernels on real GPUs.
    if backend == "reference" or (backend == "auto" and device.type != "cuda"):
        return "reference"
    reason = triton_unavailable_reason(device) or unsupported
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"lstmgru backend 'triton' was requested but cannot run: {reason}")
        return "triton"
    if reason is not None:
        if reason not in _reasons_logged:
            _reasons_logged.add(reason)
            _logger.info("lstmgru: using the reference path: %s", reason)
        return "reference"
    return "triton"
