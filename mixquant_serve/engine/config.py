"""Engine settings shared by the prefill and decode engines."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV-cache block; equal on both pools.")
    num_kv_blocks: int = Field(
        512, ge=2, description="KV-cache blocks this engine allocates (capacity = num_kv_blocks * block_size tokens)."
    )
    max_num_seqs: int = Field(32, ge=1, description="Most sequences computed in one engine step.")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Token budget of one engine step; longer prompts are prefilled in chunks of this size."
    )
    max_model_len: int | None = Field(
        None, ge=2, description="Longest prompt + output accepted; default: the model's max_position_embeddings."
    )
    kv_lease_seconds: float = Field(
        30.0, gt=0, description="Prefill engine: how long finished KV stays pinned for a pull before it is released."
    )
