"""lstmgru: drop-in torch.nn LSTM / GRU / LSTMCell / GRUCell.

Fused Triton kernels on CUDA tensors, a plain-PyTorch reference path elsewhere, and the
original GRU (``reset_after=False``) that torch.nn and cuDNN cannot compute.
"""
from importlib import metadata as _metadata

from ._dispatch import get_backend, set_backend, use_backend
from .keras import from_keras
from .modules import GRU, LSTM, GRUCell, LSTMCell

__all__ = ["LSTM", "GRU", "LSTMCell", "GRUCell", "from_keras", "get_backend", "set_backend",
           "use_backend"]
try:
    __version__ = _metadata.version("lstmgru")
except _metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"
