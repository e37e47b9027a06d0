"""KV transfer inside one process: direct tensor copies between caches found through a hub.

Used by `mixquant generate` (prefill and decode engines in one process) and by tests. It obeys the
same contract as the NIXL transport (see base.py): the decode side pulls blocks, the source side
receives the notification, a peer that closed must be refreshed with `add_peer`.

    hub = InProcessHub()
    prefill = InProcessTransport("prefill-0", hub); prefill.register_cache(prefill_cache)
    decode = InProcessTransport("decode-0", hub);   decode.register_cache(decode_cache)
    decode.add_peer(prefill.metadata())
    decode.read_blocks("prefill-0", [7, 3], [0, 1], b"req-42", timeout_s=5.0)
    prefill.get_notifications()  # [("decode-0", b"req-42")]

Metadata is the agent name (UTF-8); the hub maps names to live transports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from mixquant_serve.transfer.base import (
    FAULT_POINT_AFTER_POST,
    FAULT_POINT_BEFORE_NOTIFY,
    FAULT_POINT_BEFORE_READ,
    CacheLayout,
    FaultInjector,
    KVTransferError,
    TransferStats,
    check_notify_msg,
    coalesce_block_runs,
    deadline_after,
    validate_block_ids,
)


class InProcessHub:
    """The registry of live in-process transports, by name. Pass one to every transport."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._transports: dict[str, InProcessTransport] = {}

    def join(self, transport: InProcessTransport) -> None:
        with self._lock:
            if transport.name in self._transports:
                raise ValueError(f"name {transport.name!r} is already used by a live transport")
            self._transports[transport.name] = transport

    def leave(self, transport: InProcessTransport) -> None:
        with self._lock:
            if self._transports.get(transport.name) is transport:
                del self._transports[transport.name]

    def lookup(self, name: str) -> InProcessTransport | None:
        with self._lock:
            return self._transports.get(name)


class InProcessTransport:
    """KVTransport by `Tensor.copy_` between caches of transports sharing one InProcessHub."""

    def __init__(
        self, name: str, hub: InProcessHub, fault_injector: FaultInjector | None = None
    ) -> None:
        if not name:
            raise ValueError("name must be a non-empty string")
        self.name = name
        self._hub = hub
        self._fault_injector = fault_injector
        self._cache: torch.Tensor | None = None
        self._layout: CacheLayout | None = None
        # The transport object each peer name resolved to at add_peer time: a peer that was
        # closed and recreated stays unreachable until add_peer is called again, as with NIXL.
        self._peers: dict[str, InProcessTransport] = {}
        self._inbox: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._closed = False
        hub.join(self)

    def register_cache(self, cache: torch.Tensor) -> None:
        self._check_open()
        if self._cache is not None:
            raise RuntimeError(f"{self.name}: a cache is already registered")
        self._layout = CacheLayout.of(cache)
        self._cache = cache

    def metadata(self) -> bytes:
        self._registered_layout()
        return self.name.encode("utf-8")

    def add_peer(self, metadata: bytes) -> str:
        self._check_open()
        local = self._registered_layout()
        name = metadata.decode("utf-8")
        peer = self._hub.lookup(name)
        if peer is None or peer._layout is None:
            raise KVTransferError(f"{self.name}: no live in-process agent {name!r} with a cache")
        if peer._layout.block_bytes != local.block_bytes:
            raise ValueError(
                f"peer {name!r} block_bytes {peer._layout.block_bytes} != local "
                f"{local.block_bytes}: caches of different layouts cannot exchange blocks"
            )
        with self._lock:
            self._peers[name] = peer
        return name

    def remove_peer(self, name: str) -> None:
        with self._lock:
            if self._peers.pop(name, None) is None:
                raise KVTransferError(f"{self.name}: unknown peer {name!r}")

    def read_blocks(
        self,
        peer: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        notify_msg: bytes,
        timeout_s: float,
    ) -> TransferStats:
        started = time.perf_counter()
        deadline = deadline_after(timeout_s)
        check_notify_msg(notify_msg)
        self._check_open()
        local_layout = self._registered_layout()
        with self._lock:
            source = self._peers.get(peer)
        if source is None:
            raise KVTransferError(f"{self.name}: unknown peer {peer!r}; call add_peer first")
        source_cache, local_cache = source._cache, self._cache
        if source._closed or source_cache is None:
            raise KVTransferError(
                f"{self.name}: peer {peer!r} has closed; refresh it with add_peer"
            )
        assert local_cache is not None  # registered, checked above
        remote, local = validate_block_ids(
            remote_block_ids,
            local_block_ids,
            num_remote_blocks=source_cache.shape[0],
            num_local_blocks=local_layout.num_blocks,
        )
        self._inject(FAULT_POINT_BEFORE_READ)
        # caches: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        for remote_start, local_start, run in coalesce_block_runs(remote, local):
            local_cache[local_start : local_start + run].copy_(
                source_cache[remote_start : remote_start + run]
            )
        self._inject(FAULT_POINT_AFTER_POST)
        if time.monotonic() > deadline:
            raise KVTransferError(f"{self.name}: read from {peer!r} exceeded {timeout_s} s")
        source._deliver(self.name, notify_msg)
        return TransferStats(
            num_blocks=len(local),
            bytes=len(local) * local_layout.block_bytes,
            seconds=time.perf_counter() - started,
        )

    def send_notification(self, peer: str, msg: bytes) -> None:
        check_notify_msg(msg)
        self._check_open()
        with self._lock:
            target = self._peers.get(peer)
        if target is None or target._closed:
            raise KVTransferError(f"{self.name}: cannot notify {peer!r}: unknown or closed peer")
        self._inject(FAULT_POINT_BEFORE_NOTIFY)
        target._deliver(self.name, msg)

    def get_notifications(self) -> list[tuple[str, bytes]]:
        with self._lock:
            received, self._inbox = self._inbox, []
        return received

    def close(self) -> None:
        self._closed = True
        self._hub.leave(self)
        with self._lock:
            self._peers.clear()
        self._cache = None

    def _deliver(self, sender: str, msg: bytes) -> None:
        with self._lock:
            self._inbox.append((sender, msg))

    def _inject(self, point: str) -> None:
        if self._fault_injector is None:
            return
        try:
            self._fault_injector(point)
        except Exception as error:
            raise KVTransferError(f"{self.name}: fault at {point}: {error}") from error

    def _registered_layout(self) -> CacheLayout:
        if self._layout is None:
            raise RuntimeError(f"{self.name}: call register_cache first")
        return self._layout

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name}: transport is closed")
