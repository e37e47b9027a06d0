"""The paged KV cache tensor: block-major, so one block is one contiguous span across all layers.

    cache: [num_blocks, num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]

Block i occupies bytes [i * block_bytes, (i + 1) * block_bytes) of the tensor: moving a block between
replicas is one transfer descriptor, whatever the number of layers.
"""

from __future__ import annotations

import torch

from mixquant_serve.model.config import ModelConfig


def block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * 2 * block_size * config.num_kv_heads * config.head_dim * element


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    shape = (num_blocks, config.num_layers, 2, block_size, config.num_kv_heads, config.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)


def copy_blocks(cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """Copies whole blocks src -> dst inside one cache (copy-on-write after a fork)."""
    if pairs:
        src = torch.tensor([s for s, _ in pairs], device=cache.device)
        dst = torch.tensor([d for _, d in pairs], device=cache.device)
        cache[dst] = cache[src]
