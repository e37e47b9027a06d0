"""FP8 E4M3 with one FP32 scale per row (per token for activations, per output channel for weights).

Pure-torch reference. A row is one index of all leading dims; the last dim is K. Exact fp32 math:

    amax  = max |x| over the row
    scale = max(amax, AMAX_FLOOR) / 448               fp32 division; the stored (decode) scale
    data  = e4m3(clamp(x / scale, -448, 448))         fp32 division, round to nearest even
    x_hat = data * scale                              dequantize

`scale` is the decode scale, as `torch._scaled_mm` takes it. A zero row (or one with amax below
AMAX_FLOOR = 2**-64) gets scale 2**-64 / 448: x / scale stays finite and the row decodes to zeros.
Divisions are tensor-by-tensor so CUDA does not replace them by a reciprocal multiplication.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

E4M3_MAX = 448.0
AMAX_FLOOR = 2.0**-64


@dataclass(frozen=True)
class FP8Tensor:
    """data: float8_e4m3fn, same shape as the input; scale: float32 [..., 1] decode scale per row."""

    data: Tensor
    scale: Tensor
    shape: torch.Size

    def __post_init__(self) -> None:
        if self.data.dtype != torch.float8_e4m3fn or tuple(self.data.shape) != tuple(self.shape):
            raise ValueError(f"data must be float8_e4m3fn of shape {tuple(self.shape)}, got {self.data.dtype} "
                             f"{tuple(self.data.shape)}")
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != tuple(self.shape[:-1]) + (1,):
            raise ValueError(f"scale must be float32 of shape {tuple(self.shape[:-1]) + (1,)}, got "
                             f"{self.scale.dtype} {tuple(self.scale.shape)}")
        if self.data.device != self.scale.device:
            raise ValueError("data and scale must be on one device")

    def nbytes(self) -> int:
        """Stored bytes: e4m3 values and fp32 row scales."""
        return self.data.numel() + 4 * self.scale.numel()


def row_scale(x: Tensor) -> Tensor:
    """Decode scale max(amax(row), AMAX_FLOOR) / 448 per row of x [..., K] -> float32 [..., 1]."""
    if x.shape[-1] == 0:
        amax = torch.zeros(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    else:
        amax = x.abs().amax(dim=-1, keepdim=True).float()
    floored = amax.clamp(min=AMAX_FLOOR)
    return floored / torch.full_like(floored, E4M3_MAX)


def quantize(x: Tensor, scale: Tensor | None = None, *, name: str = "x") -> FP8Tensor:
    """Quantize x [..., K] to e4m3 with per-row decode scales (computed when scale is None).

    scale: float32 [..., 1], finite and positive. name: how errors refer to x.
    Raises ValueError if x holds NaN or Inf.
    """
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"{name} must be a floating-point tensor with at least one dim, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or Inf; FP8 cannot encode it")
    x32 = x.float()
    if scale is None:
        scale = row_scale(x32)
    elif scale.dtype != torch.float32 or tuple(scale.shape) != tuple(x.shape[:-1]) + (1,) or scale.device != x.device:
        raise ValueError(f"scale must be float32 of shape {tuple(x.shape[:-1]) + (1,)} on {x.device}, got "
                         f"{scale.dtype} {tuple(scale.shape)} on {scale.device}")
    elif not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("scale must be finite and positive")
    data = (x32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return FP8Tensor(data=data, scale=scale, shape=x.shape)


def dequantize(t: FP8Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """x_hat = data * scale in fp32, cast to dtype."""
    return (t.data.float() * t.scale).to(dtype)
