"""One slice per cell. Each package holds a cell's math and every implementation of it:

    spec.py         the equations as a plain step loop (the readable specification and the
                    tests' oracle; differentiable by autograd)
    reference.py    the fast plain-PyTorch recurrence with an explicit backward
    native.py       torch's own kernels, called exactly as torch.nn calls them
    triton_glue.py  torch.library ops around the fused kernels in ``lstmgru._kernels``
                    (imported only when a kernel runs, so triton is optional)
    __init__.py     one layer-direction (the input projection as one GEMM, then the
                    recurrence) and the registration of the implementations

What the cells share (step order, lengths, previous states, the weight gradient as one GEMM)
is ``lstmgru._sequence``; which implementation runs a call is ``lstmgru.backends``.
"""
from . import gru, lstm  # noqa: F401  (registers the implementations)
