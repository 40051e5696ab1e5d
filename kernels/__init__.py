"""Triton kernels for the LSTM and GRU recurrences (installed as ``lstmgru._kernels``).

Each module holds the kernels and thin launchers (allocate, grid, launch). There is no
autograd and no ``nn`` here: ``lstmgru._ops`` is the only importer and owns the glue.
Imports inside this folder are relative, because the folder is installed under another name.
"""
