"""Which matmul precision a phase runs in, and the compute dtype of a device.

"bf16" means unquantized weights in the model's compute dtype (bf16 on CUDA, fp32 on CPU, which
has no fast bf16 arithmetic). "fp8" is W8A8 e4m3, "nvfp4" is W4A4 NVFP4.
"""

from typing import Literal, get_args

import torch

Precision = Literal["bf16", "fp8", "nvfp4"]
PrefillPrecisionChoice = Literal["auto", "bf16", "fp8", "nvfp4"]

PRECISIONS: tuple[Precision, ...] = get_args(Precision)
QUANTIZED_PRECISIONS: tuple[Precision, ...] = ("fp8", "nvfp4")

# Compute capabilities (major * 10 + minor) from which the auto choice uses a format natively.
NATIVE_FP4_MIN_SM = 100  # Blackwell: FP4 tensor cores
NATIVE_FP8_MIN_SM = 89  # Ada / Hopper: FP8 tensor cores


def check_precision(precision: str) -> Precision:
    """precision itself if it is a Precision, else ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision  # type: ignore[return-value]


def resolve_precision(choice: PrefillPrecisionChoice, device: torch.device) -> Precision:
    """The prefill precision for device: an explicit choice as is; "auto" picks nvfp4 on sm_100+,
    fp8 on sm_89/sm_90, bf16 on older GPUs and nvfp4 (emulated by the reference backend) on CPU."""
    if choice != "auto":
        if choice not in PRECISIONS:
            raise ValueError(f"choice must be 'auto' or one of {PRECISIONS}, got {choice!r}")
        return choice
    if device.type == "cpu":
        return "nvfp4"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        sm = major * 10 + minor
        if sm >= NATIVE_FP4_MIN_SM:
            return "nvfp4"
        if sm >= NATIVE_FP8_MIN_SM:
            return "fp8"
        return "bf16"
    raise ValueError(f"device must be cpu or cuda, got {device}")


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA."""
    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16
    raise ValueError(f"device must be cpu or cuda, got {device}")
