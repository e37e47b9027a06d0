"""The KV-transfer contract shared by every transport, and the checks they all apply.

A replica's KV cache is ONE contiguous, block-major tensor:

    cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]

so block i is one contiguous span of `block_bytes = cache[0].numel() * element_size` bytes at
byte offset `i * block_bytes`. Moving KV from a prefill replica to a decode replica is therefore a
list of (remote block id -> local block id) copies, one descriptor per block.

The decode side initiates: it pulls `remote_block_ids` of a peer (the prefill replica) into its own
`local_block_ids`, and the same call notifies the peer with `notify_msg` once the data has landed,
so the prefill side can unpin those blocks. The prefill side reads those messages with
`get_notifications()`.

Peers are reached through opaque `metadata()` bytes that app replicas hand to each other; a
restarted prefill replica has a new agent with the same name and new metadata, and `add_peer` with
that metadata replaces the old entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

# Named points where a transport calls its fault injector (tests inject failures and delays there).
FAULT_POINT_BEFORE_READ = "before_read"  # ids validated, nothing posted yet
FAULT_POINT_AFTER_POST = "after_post"  # the copy/transfer has been started, completion not yet seen
FAULT_POINT_BEFORE_NOTIFY = "before_notify"  # send_notification: peer checked, message not yet sent

FaultInjector = Callable[[str], None]

# A KV cache tensor has exactly these dimensions (see the module docstring).
KV_CACHE_NDIM = 6


class KVTransferError(RuntimeError):
    """A transfer did not complete: peer unknown or gone, transport error, or timeout.

    The caller's recovery is the same for all of them: treat the target local blocks as garbage,
    refresh the peer's metadata or fall back to prefilling locally.
    """


@dataclass(frozen=True)
class TransferStats:
    """What one `read_blocks` call moved."""

    num_blocks: int
    bytes: int
    seconds: float  # wall time of the whole call, validation and waiting included


@dataclass(frozen=True)
class CacheLayout:
    """Where a registered cache lives: enough to address any of its blocks."""

    base_addr: int  # data_ptr() of block 0
    block_bytes: int  # bytes of one block (cache[0])
    num_blocks: int
    is_cuda: bool
    device_index: int  # CUDA device ordinal in the owning process; 0 for CPU memory

    @staticmethod
    def of(cache: torch.Tensor) -> CacheLayout:
        """Validate a KV cache tensor and describe it. Raises ValueError naming `cache`."""
        if not isinstance(cache, torch.Tensor):
            raise ValueError(f"cache must be a torch.Tensor, got {type(cache).__name__}")
        if cache.dim() != KV_CACHE_NDIM:
            raise ValueError(
                "cache must be [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], "
                f"got shape {tuple(cache.shape)}"
            )
        if not cache.is_contiguous():
            raise ValueError("cache must be contiguous (one block = one contiguous byte span)")
        if cache.numel() == 0:
            raise ValueError(f"cache must not be empty, got shape {tuple(cache.shape)}")
        return CacheLayout(
            base_addr=cache.data_ptr(),
            block_bytes=cache[0].numel() * cache.element_size(),
            num_blocks=cache.shape[0],
            is_cuda=cache.is_cuda,
            device_index=cache.get_device() if cache.is_cuda else 0,
        )

    def block_addr(self, block_id: int) -> int:
        return self.base_addr + block_id * self.block_bytes


class KVTransport(Protocol):
    """Moves KV blocks between the registered caches of two agents (see the module docstring)."""

    name: str  # this agent's name, unique among all replicas of the app

    def register_cache(self, cache: torch.Tensor) -> None:
        """Register the whole KV cache once (DRAM for CPU tensors, VRAM for CUDA tensors)."""
        ...

    def metadata(self) -> bytes:
        """What a peer passes to `add_peer` to reach this agent's registered cache."""
        ...

    def add_peer(self, metadata: bytes) -> str:
        """Make a peer reachable; returns its name. Same name again replaces it (restart)."""
        ...

    def remove_peer(self, name: str) -> None:
        """Forget a peer. Raises KVTransferError if it is unknown."""
        ...

    def read_blocks(
        self,
        peer: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        notify_msg: bytes,
        timeout_s: float,
    ) -> TransferStats:
        """Copy peer blocks `remote_block_ids[k]` into local blocks `local_block_ids[k]`, then
        deliver `notify_msg` to the peer. Blocks until done; raises KVTransferError on failure or
        when `timeout_s` passes, ValueError on bad ids."""
        ...

    def get_notifications(self) -> list[tuple[str, bytes]]:
        """Notifications received since the last call, as (peer name, message), oldest first."""
        ...

    def send_notification(self, peer: str, msg: bytes) -> None:
        """Deliver `msg` to a known peer without moving data (e.g. "release these blocks" after a
        failed pull). Raises KVTransferError if the peer is unknown or unreachable."""
        ...

    def close(self) -> None:
        """Release every resource; the transport is unusable afterwards."""
        ...


def validate_block_ids(
    remote_block_ids: Sequence[int],
    local_block_ids: Sequence[int],
    num_remote_blocks: int,
    num_local_blocks: int,
) -> tuple[list[int], list[int]]:
    """Check a read request and return the ids as plain int lists.

    Non-empty, equal lengths, every id in range, no local id twice (two sources into one block
    would race).
    A remote id may repeat: reading one block into two places is well defined.
    """
    remote = [int(i) for i in remote_block_ids]
    local = [int(i) for i in local_block_ids]
    if not remote:
        raise ValueError("remote_block_ids is empty: a read must move at least one block")
    if len(remote) != len(local):
        raise ValueError(
            f"remote_block_ids and local_block_ids must have equal lengths, "
            f"got {len(remote)} and {len(local)}"
        )
    bad_remote = [i for i in remote if not 0 <= i < num_remote_blocks]
    if bad_remote:
        raise ValueError(
            f"remote_block_ids out of range [0, {num_remote_blocks}): {bad_remote[:8]}"
        )
    bad_local = [i for i in local if not 0 <= i < num_local_blocks]
    if bad_local:
        raise ValueError(f"local_block_ids out of range [0, {num_local_blocks}): {bad_local[:8]}")
    if len(set(local)) != len(local):
        seen: set[int] = set()
        duplicates = sorted({i for i in local if i in seen or seen.add(i)})
        raise ValueError(f"local_block_ids has duplicates: {duplicates[:8]}")
    return remote, local


def coalesce_block_runs(remote: Sequence[int], local: Sequence[int]) -> list[tuple[int, int, int]]:
    """Merge pairs that advance together into runs: [(remote_start, local_start, num_blocks)].

    remote=[4, 5, 6, 9], local=[0, 1, 2, 3] -> [(4, 0, 3), (9, 3, 1)]. Order is kept.
    """
    runs: list[tuple[int, int, int]] = []
    for r, l in zip(remote, local, strict=True):
        if runs:
            r0, l0, n = runs[-1]
            if r == r0 + n and l == l0 + n:
                runs[-1] = (r0, l0, n + 1)
                continue
        runs.append((r, l, 1))
    return runs


def deadline_after(timeout_s: float) -> float:
    """time.monotonic() deadline for a call that may take `timeout_s` seconds."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    return time.monotonic() + timeout_s


def check_notify_msg(notify_msg: bytes) -> bytes:
    """The peer needs a message to know which blocks to unpin; NIXL sends none for b""."""
    if not isinstance(notify_msg, bytes) or not notify_msg:
        raise ValueError(f"notify_msg must be non-empty bytes, got {notify_msg!r}")
    return notify_msg
