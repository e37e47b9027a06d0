"""NVFP4: 4-bit E2M1 values, one E4M3 scale per 16 elements along K, one FP32 scale per tensor.

This is the pure-torch reference. Every other NVFP4 path (the Triton quantize kernel, future
GEMM backends) must reproduce it bit for bit, so the exact fp32 operation order is part of the
format's definition here:

    amax  = max |x| over the tensor (or over each row: see "Global scale per tensor or per row")
    gs    = 2688 / max(amax, AMAX_FLOOR)              fp32 division; 2688 = 448 * 6 (the encode scale)
    bamax = max |x| over a block of 16 consecutive elements along K
    s_raw = min((bamax * gs) / 6, 448)                fp32 multiply, then fp32 division
    s     = e4m3(s_raw)                               round to nearest, ties to even; stored scale
    f     = gs / s if s > 0 else 0                    fp32 division, once per block
    y     = x * f                                     fp32 multiply, once per element
    q     = e2m1(y)                                   nearest, ties to even, saturating at +-6;
                                                      the sign bit of y is kept (so -0 exists)
    x_hat = (q * s) / gs                              dequantize: exact product, fp32 division

Every division is a correctly rounded fp32 division of two tensors on the same device: on CUDA,
torch turns `tensor / python_number` into a multiplication by the reciprocal (one rounding more),
which would break bit-exactness with the kernel, which uses `tl.div_rn`.

Edge cases, all decoding without NaN:
- A block whose scale is 0 (all zeros, or so small next to the tensor's amax that e4m3 underflows)
  stores scale 0 and nibbles of magnitude 0; it decodes to (signed) zeros.
- An all-zero tensor (or one with amax below AMAX_FLOOR = 2**-64) gets gs = 2688 * 2**64: finite,
  so every formula above stays NaN-free; its blocks decode to zeros or tiny values as usual.
- K not a multiple of 16 is padded with zeros to Kp = 16 * ceil(K / 16): `packed` is [..., Kp/2]
  and `block_scale` is [..., Kp/16]; `shape` keeps the original K and dequantize drops the padding.

Global scale per tensor or per row. `global_scale` is either one fp32 value for the whole tensor
(weights: quantized once at load) or one value per row, shape [..., 1] (activations:
`row_encode_scales`). Per-row scales make each token's quantized activations independent of the
other tokens in its forward pass, so KV computed for a prefix is bit-identical whether the prefix
was prefilled alone, inside a longer prompt, or batched with other requests: what the prefix cache
and continuous batching require. A GEMM applies it as a per-row factor on the fp32 accumulator.
A fused projection (q/k/v or gate/up stacked into one weight, quant/linear.py) keeps each
checkpoint tensor's own global scale by storing it on every row of that part: the same bits as
quantizing the parts one by one.

Packing: two E2M1 nibbles per byte, the even element in the low nibble. Nibble = sign << 3 | code,
code 0..7 indexing E2M1_GRID.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
AMAX_FLOOR = 2.0**-64
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Rounding |y| to E2M1_GRID, ties to even: the magnitude code is the number of midpoints below |y|.
# A midpoint counts when |y| equals it only if the grid value above it has an even code (1.0, 2.0,
# 4.0: mantissa bit 0); 6.0 is the last code, so anything above 5 saturates to it.
E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


@dataclass(frozen=True)
class NVFP4Tensor:
    """A quantized tensor. packed: uint8 [..., Kp/2]; block_scale: float8_e4m3fn [..., Kp/16];
    global_scale: float32 encode scale gs, 0-dim (per tensor) or [..., 1] (per row);
    shape: the original (unpadded) shape."""

    packed: Tensor
    block_scale: Tensor
    global_scale: Tensor
    shape: torch.Size

    def __post_init__(self) -> None:
        if self.packed.dtype != torch.uint8:
            raise ValueError(f"packed must be uint8, got {self.packed.dtype}")
        if self.block_scale.dtype != torch.float8_e4m3fn:
            raise ValueError(f"block_scale must be float8_e4m3fn, got {self.block_scale.dtype}")
        padded_k = padded_size(self.shape[-1])
        lead = tuple(self.shape[:-1])
        if self.global_scale.dtype != torch.float32 or tuple(self.global_scale.shape) not in ((), lead + (1,)):
            raise ValueError(f"global_scale must be a float32 tensor of shape () or {lead + (1,)}, got "
                             f"{self.global_scale.dtype} {tuple(self.global_scale.shape)}")
        if tuple(self.packed.shape) != lead + (padded_k // 2,):
            raise ValueError(f"packed shape {tuple(self.packed.shape)} does not match shape {tuple(self.shape)}")
        if tuple(self.block_scale.shape) != lead + (padded_k // BLOCK_SIZE,):
            raise ValueError(f"block_scale shape {tuple(self.block_scale.shape)} does not match shape "
                             f"{tuple(self.shape)}")
        if not (self.packed.device == self.block_scale.device == self.global_scale.device):
            raise ValueError("packed, block_scale and global_scale must be on one device")

    def nbytes(self) -> int:
        """Stored bytes: packed values, block scales and the global scale."""
        return self.packed.numel() + self.block_scale.numel() + 4 * self.global_scale.numel()


def padded_size(k: int) -> int:
    """K rounded up to a whole number of 16-element blocks."""
    return -(-k // BLOCK_SIZE) * BLOCK_SIZE


def global_encode_scale(x: Tensor) -> Tensor:
    """gs = 2688 / max(amax(x), AMAX_FLOOR) as a 0-dim float32 tensor on x's device, without a host sync.

    A non-finite amax (x holds NaN or Inf) gives a NaN gs: the Triton kernel turns a NaN gs into
    NaN block scales, so bad activations show up as NaN outputs instead of finite garbage.
    """
    # vector_norm(inf) is max |x| in one pass (abs().amax() would write |x| out first).
    amax = (torch.linalg.vector_norm(x, float("inf")).float() if x.numel() > 0
            else torch.zeros((), dtype=torch.float32, device=x.device))
    floored = amax.clamp(min=AMAX_FLOOR)
    gs = torch.full_like(floored, E2M1_MAX * E4M3_MAX) / floored
    return torch.where(torch.isfinite(amax), gs, torch.full_like(gs, float("nan")))


def row_encode_scales(x: Tensor) -> Tensor:
    """gs per row: [..., 1] float32, 2688 / max(amax(row), AMAX_FLOOR); NaN for a row holding NaN/Inf."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True) if x.shape[-1] > 0 else x32.new_zeros(*x.shape[:-1], 1)
    gs = torch.full_like(amax, E2M1_MAX * E4M3_MAX) / amax.clamp(min=AMAX_FLOOR)
    return torch.where(torch.isfinite(amax), gs, torch.full_like(gs, float("nan")))


def e2m1_nibbles(y: Tensor) -> Tensor:
    """Round fp32 y to E2M1 (nearest, ties to even, saturating at 6) -> uint8 nibbles sign << 3 | code."""
    magnitude = y.abs()
    code = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    for midpoint, tie_rounds_up in E2M1_MIDPOINTS:
        code += (magnitude >= midpoint) if tie_rounds_up else (magnitude > midpoint)
    return code | (torch.signbit(y).to(torch.uint8) << 3)


def pack_nibbles(nibbles: Tensor) -> Tensor:
    """nibbles: uint8 [..., 2n] in 0..15 -> uint8 [..., n], even element in the low nibble."""
    pairs = nibbles.reshape(*nibbles.shape[:-1], nibbles.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """packed: uint8 [..., n] -> nibbles uint8 [..., 2n]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _check_global_scale(global_scale: Tensor, x: Tensor) -> Tensor:
    """One value (returned 0-dim) or one per row (returned [..., 1])."""
    per_row = tuple(x.shape[:-1]) + (1,)
    if not isinstance(global_scale, Tensor) or global_scale.dtype != torch.float32:
        raise ValueError("global_scale must be a float32 tensor")
    if global_scale.numel() != 1 and tuple(global_scale.shape) != per_row:
        raise ValueError(f"global_scale must have one element or shape {per_row}, got {tuple(global_scale.shape)}")
    if global_scale.device != x.device:
        raise ValueError(f"global_scale is on {global_scale.device}, x on {x.device}")
    if not (torch.isfinite(global_scale).all() and (global_scale > 0).all()):
        raise ValueError("global_scale must be finite and positive")
    return global_scale.reshape(()) if tuple(global_scale.shape) != per_row else global_scale


def quantize(x: Tensor, global_scale: Tensor | None = None, *, name: str = "x") -> NVFP4Tensor:
    """Quantize x [..., K] to NVFP4 along its last dim (see the module docstring for the exact math).

    global_scale: the encode scale gs (float32, one element, or one per row with shape [..., 1]);
    computed per tensor from x when None.
    name: how errors refer to x. Raises ValueError if x holds NaN or Inf.
    """
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"{name} must be a floating-point tensor with at least one dim, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or Inf; NVFP4 cannot encode it")
    x32 = x.float()
    gs = global_encode_scale(x32) if global_scale is None else _check_global_scale(global_scale, x)

    k = x.shape[-1]
    padded_k = padded_size(k)
    # blocks: [..., Kp/16, 16]
    blocks = torch.nn.functional.pad(x32, (0, padded_k - k)).reshape(*x.shape[:-1], padded_k // BLOCK_SIZE, BLOCK_SIZE)
    block_amax = blocks.abs().amax(dim=-1)
    scale_raw = ((block_amax * gs) / torch.full_like(gs, E2M1_MAX)).clamp(max=E4M3_MAX)
    block_scale = scale_raw.to(torch.float8_e4m3fn)
    scale = block_scale.float()
    has_scale = scale > 0
    factor = torch.where(has_scale, gs / torch.where(has_scale, scale, 1.0), 0.0)
    nibbles = e2m1_nibbles(blocks * factor.unsqueeze(-1))
    packed = pack_nibbles(nibbles.reshape(*x.shape[:-1], padded_k))
    return NVFP4Tensor(packed=packed, block_scale=block_scale, global_scale=gs, shape=x.shape)


def block_values(t: NVFP4Tensor) -> Tensor:
    """q * s in fp32, [..., Kp] (padding kept): the values before the global scale. Exact, and exact in
    bf16 and fp16 too (at most 2 x 4 significant bits, magnitudes 2**-10 .. 2688): what a GEMM can
    multiply on 16-bit tensor cores, applying 1 / gs once to its fp32 accumulator."""
    signed_grid = torch.tensor(E2M1_GRID + tuple(-v for v in E2M1_GRID), dtype=torch.float32, device=t.packed.device)
    q = signed_grid[unpack_nibbles(t.packed).long()]
    # q: [..., Kp/16, 16] times s: [..., Kp/16, 1]; the product is exact (2 x 4 significant bits).
    q_blocks = q.reshape(*t.block_scale.shape, BLOCK_SIZE)
    values = q_blocks * t.block_scale.float().unsqueeze(-1)
    return values.reshape(*t.packed.shape[:-1], t.packed.shape[-1] * 2)


def dequantize(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """x_hat = (q * s) / gs in fp32, padding dropped, cast to dtype; shape t.shape."""
    x_hat = block_values(t) / t.global_scale  # global_scale: 0-dim, or [..., 1] per row
    return x_hat[..., : t.shape[-1]].to(dtype)
