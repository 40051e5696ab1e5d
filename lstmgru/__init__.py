"""lstmgru: drop-in torch.nn LSTM / GRU / LSTMCell / GRUCell.

Fused Triton kernels on CUDA tensors, torch's own kernels where they compute the same
function, a plain-PyTorch reference for everything else, and the original GRU
(``reset_after=False``) that torch.nn and cuDNN cannot compute. ``lstmgru.backends`` says
which implementation runs a call.
"""
from importlib import metadata as _metadata

from . import cells as _cells  # noqa: F401  (registers every cell's implementations)
from .backends import get_backend, set_backend, use_backend
from .convert import convert, to_torch
from .keras import from_keras
from .modules import GRU, LSTM, GRUCell, LSTMCell

__all__ = ["LSTM", "GRU", "LSTMCell", "GRUCell", "convert", "to_torch", "from_keras",
           "get_backend", "set_backend", "use_backend"]
try:
    __version__ = _metadata.version("lstmgru")
except _metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"
