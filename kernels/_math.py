"""Numerically safe activations shared by the LSTM and GRU kernels."""
import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    # 1 / (1 + exp(-x)) saturates cleanly at both ends in fp32: exp(-x) -> inf gives 0, -> 0 gives 1.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # tanh(x) = sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: never overflows,
    # unlike the textbook (exp(2x) - 1) / (exp(2x) + 1), which turns into inf / inf = NaN.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)
