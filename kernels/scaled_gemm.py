"""Dense 16-bit GEMM with fp32 per-row and per-column output scales: out = (a @ w.T) * r[:, None] * c[None, :] (+ bias).

The NVFP4 linear's second GEMM on GPUs without FP4 tensor cores (quant/linear.py): `a` and `w` hold
exactly decoded NVFP4 block values (kernels/nvfp4_decode.py, q * s in bf16), `r` = 1 / gs_a per token
and `c` = 1 / gs_w per output channel. Products of two bf16 values are exact in fp32 and the sum is
accumulated in fp32 on the tensor cores, so

    out[m, n] = fp32_sum_k(a[m, k] * w[n, k]) * r[m] * c[n]   (+ bias[n]), rounded once to out dtype

is the reference (`reference_linear`: both operands decoded to fp32 and divided by their global
scales, fp32 matmul) up to summation order and the roundings of the scale factors. torch.mm cannot
do this: it rounds the bf16 output before any scale could be applied, and an fp32 output costs a
second pass over [M, N]. Pure-torch reference: mixquant_serve.quant.matmul.scaled_matmul.

Tiles are autotuned per (M bucket, N, K) among a few Hopper-sized configs (wgmma, 3-4 stage
software pipelines); tail rows and columns read the last valid row again and are masked at the store.
"""

import torch
import triton
import triton.language as tl

from kernels.nvfp4_gemm import GemmConfig  # one tile/launch description for both GEMMs


# Candidates for prefill-sized products on Hopper (M >= 512); the autotuner keeps the fastest per shape.
CONFIGS = (
    GemmConfig(128, 256, 64, 8, 3),
    GemmConfig(256, 128, 64, 8, 3),
    GemmConfig(128, 128, 64, 8, 4),
    GemmConfig(128, 256, 64, 8, 4),
)
# For tests and the interpreter: small tiles, any shape.
SMALL_CONFIG = GemmConfig(16, 32, 32, 4, 1)


def m_bucket(m: int) -> int:
    """M rounded up to a power of two, at most 32768: the autotuning key for the token count."""
    return min(triton.next_power_of_2(max(m, 1)), 32768)


@triton.jit
def _scaled_gemm_kernel(
    a_ptr,  # [M, K] bf16/fp16, contiguous
    w_ptr,  # [N, K] same dtype, contiguous
    row_scale_ptr,  # [M] fp32, or [1] when not ROW_SCALE_PER_ROW
    col_scale_ptr,  # [N] fp32, or [1] when not COL_SCALE_PER_COL
    bias_ptr,  # [N] or unused
    out_ptr,  # [M, N], row stride stride_out
    M,
    N,
    K,
    M_BUCKET,  # autotuning key only
    stride_out,
    ROW_SCALE_PER_ROW: tl.constexpr,
    COL_SCALE_PER_COL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K: no K mask
):
    # Grouped order: GROUP_M consecutive programs along M reuse one band of w from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * num_pid_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_rows = tl.minimum(rows, M - 1).to(tl.int64)  # tail rows read the last valid row (never stored)
    w_rows = tl.minimum(cols, N - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * K + ks[None, :]  # [BM, BK]
    w_ptrs = w_ptr + w_rows[:, None] * K + ks[None, :]  # [BN, BK]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = (ks + k < K)[None, :]
            a = tl.load(a_ptrs, mask=k_mask, other=0.0)
            w = tl.load(w_ptrs, mask=k_mask, other=0.0)
        acc = tl.dot(a, tl.trans(w), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if ROW_SCALE_PER_ROW:
        acc = acc * tl.load(row_scale_ptr + a_rows)[:, None]
    else:
        acc = acc * tl.load(row_scale_ptr)
    if COL_SCALE_PER_COL:
        acc = acc * tl.load(col_scale_ptr + w_rows)[None, :]
    else:
        acc = acc * tl.load(col_scale_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + w_rows).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


def _even_k(args: dict) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


_fixed_kernel = triton.heuristics({"EVEN_K": _even_k})(_scaled_gemm_kernel)
_autotuned_kernel = triton.autotune(
    configs=[c.as_triton() for c in CONFIGS],
    key=["M_BUCKET", "N", "K", "ROW_SCALE_PER_ROW", "COL_SCALE_PER_COL", "HAS_BIAS"],
)(_fixed_kernel)


def _check_scale(name: str, scale: torch.Tensor, length: int, device: torch.device) -> None:
    if scale.dtype != torch.float32 or scale.numel() not in (1, length) or scale.device != device:
        raise ValueError(f"{name} must be a float32 tensor of 1 or {length} elements on {device}, got "
                         f"{scale.dtype} {tuple(scale.shape)} on {scale.device}")


def scaled_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """out [M, N] = (a @ w.T) * row_scale[:, None] * col_scale[None, :] (+ bias), fp32 accumulation.

    a: [M, K] and w: [N, K], both contiguous bf16 or both fp16; row_scale: fp32, 1 or M elements;
    col_scale: fp32, 1 or N elements; bias: [N] or None; out_dtype: float32, bfloat16 or float16.
    config: None autotunes per (M bucket, N, K); a GemmConfig runs that tile (tests, the interpreter).
    """
    if a.dim() != 2 or w.dim() != 2 or not a.is_contiguous() or not w.is_contiguous():
        raise ValueError(f"a and w must be contiguous 2-D tensors, got {tuple(a.shape)} strides {a.stride()} and "
                         f"{tuple(w.shape)} strides {w.stride()}")
    if a.dtype != w.dtype or a.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"a and w must both be bfloat16 or both float16, got {a.dtype} and {w.dtype}")
    if a.shape[1] != w.shape[1] or a.device != w.device:
        raise ValueError(f"a [M, K] and w [N, K] must share K and device, got {tuple(a.shape)} on {a.device} and "
                         f"{tuple(w.shape)} on {w.device}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    (m, k), n = a.shape, w.shape[0]
    _check_scale("row_scale", row_scale, m, a.device)
    _check_scale("col_scale", col_scale, n, a.device)
    if bias is not None and (tuple(bias.shape) != (n,) or bias.device != a.device or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor on {a.device}, got {tuple(bias.shape)} on "
                         f"{bias.device}")
    if config is not None and (config.block_k % 16 != 0 or config.block_m < 16 or config.block_n < 16):
        raise ValueError(f"config needs block_k a multiple of 16 and block_m, block_n >= 16, got {config}")
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.to(out_dtype).expand(m, n))
    row_scale, col_scale = row_scale.reshape(-1), col_scale.reshape(-1)
    args = (a, w, row_scale, col_scale, bias if bias is not None else row_scale, out, m, n, k, m_bucket(m),
            out.stride(0))
    flags = {"ROW_SCALE_PER_ROW": row_scale.numel() != 1, "COL_SCALE_PER_COL": col_scale.numel() != 1,
             "HAS_BIAS": bias is not None}

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if config is None:
        _autotuned_kernel[grid](*args, **flags)
    else:
        _fixed_kernel[grid](*args, **flags, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                            GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages)
    return out
