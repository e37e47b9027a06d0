"""The configurations compared: which precision computes the prompt's KV, which computes every output token.

    name             prefill (KV of prompt[:-1])   decode (last prompt token and every generated token)
    bf16             bf16                          bf16         the reference
    mixquant-nvfp4   nvfp4                         bf16         Mix-Quant: quantized prefill, precise decoding
    all-nvfp4        nvfp4                         nvfp4        the whole inference quantized
    mixquant-fp8     fp8                           bf16
    all-fp8          fp8                           fp8

"bf16" is the model's unquantized compute dtype: bf16 on CUDA, fp32 on CPU (which has no fast bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

from mixquant_serve.quant.precision import Precision


@dataclass(frozen=True)
class EvalConfig:
    name: str
    prefill_precision: Precision
    decode_precision: Precision


REFERENCE = EvalConfig("bf16", "bf16", "bf16")
CONFIGS: tuple[EvalConfig, ...] = (
    REFERENCE,
    EvalConfig("mixquant-nvfp4", "nvfp4", "bf16"),
    EvalConfig("all-nvfp4", "nvfp4", "nvfp4"),
    EvalConfig("mixquant-fp8", "fp8", "bf16"),
    EvalConfig("all-fp8", "fp8", "fp8"),
)
CONFIG_NAMES: tuple[str, ...] = tuple(config.name for config in CONFIGS)
# Mix-Quant against full quantization, per format: (mix-quant config, all-quantized config)
MIXQUANT_PAIRS: tuple[tuple[str, str], ...] = (("mixquant-nvfp4", "all-nvfp4"), ("mixquant-fp8", "all-fp8"))


def configs_by_name(names: list[str]) -> list[EvalConfig]:
    """The named configurations in CONFIGS order; ValueError for an unknown or repeated name."""
    unknown = [name for name in names if name not in CONFIG_NAMES]
    if unknown:
        raise ValueError(f"configs must be among {', '.join(CONFIG_NAMES)}; unknown: {', '.join(unknown)}")
    if len(set(names)) != len(names):
        raise ValueError(f"configs must not repeat a name, got {names}")
    if not names:
        raise ValueError("configs must name at least one configuration")
    return [config for config in CONFIGS if config.name in names]
