"""The parts every engine is made of: KV cache, block manager, scheduler, model runner."""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from mixquant_serve.engine.block_manager import BlockManager
from mixquant_serve.engine.config import EngineConfig
from mixquant_serve.engine.kv_cache import allocate_kv_cache
from mixquant_serve.engine.runner import ModelRunner
from mixquant_serve.engine.scheduler import Scheduler
from mixquant_serve.model.llama import LlamaForCausalLM
from mixquant_serve.quant.precision import Precision


class EngineCore:
    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, precision: Precision, device: torch.device):
        self.model = model
        self.config = config
        self.precision = precision
        # KV is stored in the model's compute dtype (bf16 on GPU, fp32 on CPU), never quantized
        self.kv_cache = allocate_kv_cache(model.config, config.num_kv_blocks, config.block_size, model.dtype, device)
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv_cache, config.block_size, precision)
        # Positions past max_position_embeddings have no row in the rotary table: never schedule them.
        self.max_model_len = min(
            config.max_model_len or model.config.max_position_embeddings,
            model.config.max_position_embeddings,
            config.num_kv_blocks * config.block_size,
        )

    def validate_tokens(self, token_ids: Seq[int], total_len: int, field: str) -> None:
        """Rejects requests that could never run: empty, out-of-vocabulary, or longer than the cache allows."""
        if not token_ids:
            raise ValueError(f"{field}: prompt must contain at least one token")
        vocab = self.model.config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"{field}: token id {bad} is outside the vocabulary [0, {vocab})")
        if total_len > self.max_model_len:
            raise ValueError(
                f"{field}: {total_len} tokens (prompt {len(token_ids)} + output) exceed the maximum context "
                f"length {self.max_model_len}"
            )
