"""Pure-torch reference of kernels/scaled_gemm.py: a matmul whose fp32 result is scaled per row and per column."""

import torch
from torch import Tensor


def scaled_matmul(a: Tensor, w: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """fp32 [M, N] = (a @ w.T) * row_scale[:, None] * col_scale[None, :] (+ bias), in fp32.

    a: [M, K], w: [N, K] (any float dtype; widened to fp32, where products of bf16/fp16 values are
    exact); row_scale: fp32, 1 or M elements; col_scale: fp32, 1 or N elements; bias: [N] or None.
    """
    out = (a.float() @ w.float().T) * row_scale.float().reshape(-1, 1) * col_scale.float().reshape(1, -1)
    return out if bias is None else out + bias.float()
