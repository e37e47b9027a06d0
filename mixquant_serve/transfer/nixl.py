"""KV transfer between processes and hosts with NIXL (UCX backend), DRAM and VRAM caches.

    prefill replica                                   decode replica
    NixlTransport("prefill-0")                        NixlTransport("decode-3")
      register_cache(cache)  --- metadata() bytes --->  add_peer(md)  (again after a restart)
                                                        read_blocks("prefill-0", [..], [..], msg)
      cache blocks  ========== NIXL READ (UCX) =======>  cache blocks
      get_notifications() <------ msg ------------------ (sent by NIXL once the data has landed)

The metadata bytes are produced and consumed only by app replicas (never by HTTP clients):

    header  struct "<4sHBxIQQQH": magic b"MQKV", format version, is_cuda, device index,
            base address, block_bytes, num_blocks, length of the agent name
    name    the agent name, UTF-8
    rest    nixl_agent.get_agent_metadata() (connection info + registered memory keys)

NIXL calls used, all on `nixl._api.nixl_agent`:
    nixl_agent(name, nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False,
                                       backends=["UCX"]))
    register_memory([(addr, len, dev, "")], "DRAM" | "VRAM") / deregister_memory(reg_descs)
    get_agent_metadata(); add_remote_agent(md) -> name (bytes in 1.5.1); make_connection(name);
    remove_remote_agent(name)
    prep_xfer_dlist(peer, Nx3 [addr, len, dev] of all its blocks, mem) once per peer, and
    prep_xfer_dlist("NIXL_INIT_AGENT", ... of all local blocks, mem) once at registration
    make_prepped_xfer("READ", local_dlist, local_ids, remote_dlist, remote_ids, notify_msg)
    transfer(handle) -> "DONE" | "PROC" | "ERR"; check_xfer_state(handle); handle.release()
    get_new_notifs() -> {peer name: [msg, ...]}; dlist_handle.release()

Quirks seen with nixl 1.5.1 on this machine (CPU only):
- No environment tweaks are needed: UCX picks `cma` (cross-memory attach, zero copy) for
  DRAM->DRAM between processes of one host and `tcp` for its control messages.
- With cma, `transfer()` usually performs the whole copy before returning "DONE".
- Errors surface both as "ERR" states and as exceptions from the bindings (nixlNotAllowedError,
  nixlRemoteDisconnectError, ...), which share no base class: every NIXL call is wrapped and
  turned into KVTransferError.
- `add_remote_agent` with a name that is already loaded fails (NIXL_ERR_NOT_ALLOWED): a restarted
  peer is replaced by releasing its prepped list, `remove_remote_agent`, then loading the new one.
- NIXL merges descriptors that are adjacent on both sides when it builds a request (a run of
  consecutive blocks becomes one descriptor), so per-block prepped lists cost nothing extra.

Threading: the agent runs with NIXL_THREAD_SYNC_NONE (the python default without a listener
thread), so this class serializes every agent call with one lock. Reads from several threads
interleave their polls; a peer being replaced waits until its in-flight reads end.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from nixl._api import nixl_agent, nixl_agent_config, nixl_prepped_dlist_handle, nixl_xfer_handle

from mixquant_serve.transfer.base import (
    FAULT_POINT_AFTER_POST,
    FAULT_POINT_BEFORE_READ,
    CacheLayout,
    FaultInjector,
    KVTransferError,
    TransferStats,
    check_notify_msg,
    deadline_after,
    validate_block_ids,
)

logger = logging.getLogger(__name__)

METADATA_MAGIC = b"MQKV"
METADATA_VERSION = 1
_METADATA_HEADER = struct.Struct("<4sHBxIQQQH")
NIXL_BACKEND = "UCX"
# Sleep between completion checks: short against a KV transfer (ms), long enough to leave the
# GIL and the agent lock to other threads.
POLL_INTERVAL_S = 1e-4

_T = TypeVar("_T")


def pack_metadata(name: str, layout: CacheLayout, agent_metadata: bytes) -> bytes:
    name_bytes = name.encode("utf-8")
    header = _METADATA_HEADER.pack(
        METADATA_MAGIC,
        METADATA_VERSION,
        int(layout.is_cuda),
        layout.device_index,
        layout.base_addr,
        layout.block_bytes,
        layout.num_blocks,
        len(name_bytes),
    )
    return header + name_bytes + agent_metadata


def unpack_metadata(metadata: bytes) -> tuple[str, CacheLayout, bytes]:
    """Inverse of pack_metadata: (agent name, its cache layout, nixl agent metadata)."""
    if not isinstance(metadata, bytes) or len(metadata) < _METADATA_HEADER.size:
        raise ValueError("metadata is not NixlTransport metadata (too short or not bytes)")
    magic, version, is_cuda, device_index, base_addr, block_bytes, num_blocks, name_len = (
        _METADATA_HEADER.unpack_from(metadata)
    )
    if magic != METADATA_MAGIC or version != METADATA_VERSION:
        raise ValueError(
            f"metadata has magic {magic!r} version {version}, expected "
            f"{METADATA_MAGIC!r} version {METADATA_VERSION}"
        )
    name_end = _METADATA_HEADER.size + name_len
    agent_metadata = metadata[name_end:]
    if not name_len or not agent_metadata:
        raise ValueError("metadata lacks the agent name or the nixl agent metadata")
    layout = CacheLayout(
        base_addr=base_addr,
        block_bytes=block_bytes,
        num_blocks=num_blocks,
        is_cuda=bool(is_cuda),
        device_index=device_index,
    )
    return metadata[_METADATA_HEADER.size : name_end].decode("utf-8"), layout, agent_metadata


def _nixl_mem_type(layout: CacheLayout) -> str:
    return "VRAM" if layout.is_cuda else "DRAM"


def _block_descriptors(layout: CacheLayout) -> np.ndarray:
    """One NIXL descriptor per block: rows of (address, length, device index)."""
    # descriptors: [num_blocks, 3] uint64
    descriptors = np.empty((layout.num_blocks, 3), dtype=np.uint64)
    descriptors[:, 0] = layout.base_addr + np.arange(layout.num_blocks, dtype=np.uint64) * np.uint64(
        layout.block_bytes
    )
    descriptors[:, 1] = layout.block_bytes
    descriptors[:, 2] = layout.device_index
    return descriptors


@dataclass
class _Peer:
    name: str
    layout: CacheLayout
    remote_dlist: nixl_prepped_dlist_handle  # all of the peer's blocks, indexed by block id
    active_reads: int = 0


class NixlTransport:
    """KVTransport over a NIXL agent with the UCX backend (see the module docstring)."""

    def __init__(
        self,
        name: str,
        fault_injector: FaultInjector | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        if not name:
            raise ValueError("name must be a non-empty string")
        if not poll_interval_s >= 0:
            raise ValueError(f"poll_interval_s must be >= 0, got {poll_interval_s}")
        self.name = name
        self._fault_injector = fault_injector
        self._poll_interval_s = poll_interval_s
        config = nixl_agent_config(
            enable_prog_thread=True, enable_listen_thread=False, backends=[NIXL_BACKEND]
        )
        self._agent = nixl_agent(name, config)
        if NIXL_BACKEND not in self._agent.backends:
            raise RuntimeError(f"the NIXL {NIXL_BACKEND} backend plugin is not available")
        # Guards every agent call, the peer table and the handle lists; waited on for peers in
        # replacement and for in-flight reads of a peer being replaced.
        self._lock = threading.Condition()
        self._peers: dict[str, _Peer] = {}
        self._peers_in_replacement: set[str] = set()
        self._layout: CacheLayout | None = None
        self._cache: torch.Tensor | None = None  # held so its memory outlives the registration
        self._registered_descs: object | None = None  # nixlRegDList from register_memory
        self._local_dlist: nixl_prepped_dlist_handle | None = None
        self._unreleased_xfers: list[nixl_xfer_handle] = []  # release failed; retried later
        self._closed = False

    # registration and metadata ---------------------------------------------------------------

    def register_cache(self, cache: torch.Tensor) -> None:
        layout = CacheLayout.of(cache)
        mem_type = _nixl_mem_type(layout)
        region = [(layout.base_addr, layout.num_blocks * layout.block_bytes, layout.device_index, "")]
        with self._lock:
            self._check_open()
            if self._layout is not None:
                raise RuntimeError(f"{self.name}: a cache is already registered")
            registered = self._nixl("register_memory", lambda: self._agent.register_memory(region, mem_type))
            try:
                local_dlist = self._nixl(
                    "prep_xfer_dlist(local)",
                    lambda: self._agent.prep_xfer_dlist(
                        "NIXL_INIT_AGENT", _block_descriptors(layout), mem_type
                    ),
                )
            except BaseException:
                self._agent.deregister_memory(registered)
                raise
            self._layout, self._cache = layout, cache
            self._registered_descs, self._local_dlist = registered, local_dlist

    def metadata(self) -> bytes:
        with self._lock:
            self._check_open()
            layout = self._registered_layout()
            agent_metadata = self._nixl("get_agent_metadata", self._agent.get_agent_metadata)
        return pack_metadata(self.name, layout, agent_metadata)

    # peers ----------------------------------------------------------------------------------

    def add_peer(self, metadata: bytes) -> str:
        name, layout, agent_metadata = unpack_metadata(metadata)
        with self._lock:
            self._check_open()
            local = self._registered_layout()
            if name == self.name:
                raise ValueError(f"metadata is this agent's own ({name!r}); a peer must differ")
            if layout.block_bytes != local.block_bytes:
                raise ValueError(
                    f"peer {name!r} block_bytes {layout.block_bytes} != local "
                    f"{local.block_bytes}: caches of different layouts cannot exchange blocks"
                )
            while name in self._peers_in_replacement:
                self._lock.wait()
            self._peers_in_replacement.add(name)
            try:
                old = self._peers.pop(name, None)
                while old is not None and old.active_reads > 0:
                    self._lock.wait()  # their reads end by their own deadlines
                if old is not None:
                    self._forget_peer(old)
                self._peers[name] = self._load_peer(name, layout, agent_metadata)
            finally:
                self._peers_in_replacement.discard(name)
                self._lock.notify_all()
        return name

    def remove_peer(self, name: str) -> None:
        with self._lock:
            while name in self._peers_in_replacement:
                self._lock.wait()
            peer = self._peers.pop(name, None)
            if peer is None:
                raise KVTransferError(f"{self.name}: unknown peer {name!r}")
            while peer.active_reads > 0:
                self._lock.wait()
            self._forget_peer(peer)

    def _load_peer(self, name: str, layout: CacheLayout, agent_metadata: bytes) -> _Peer:
        loaded = self._nixl("add_remote_agent", lambda: self._agent.add_remote_agent(agent_metadata))
        loaded_name = loaded.decode("utf-8") if isinstance(loaded, bytes) else str(loaded)
        if loaded_name != name:
            self._agent.remove_remote_agent(loaded_name)
            raise ValueError(f"metadata header names {name!r} but its NIXL part is {loaded_name!r}")
        try:
            remote_dlist = self._nixl(
                "prep_xfer_dlist(remote)",
                lambda: self._agent.prep_xfer_dlist(name, _block_descriptors(layout), _nixl_mem_type(layout)),
            )
        except BaseException:
            self._agent.remove_remote_agent(name)
            raise
        try:
            # Optional in NIXL; connecting now keeps the handshake out of the first read.
            self._nixl("make_connection", lambda: self._agent.make_connection(name))
        except BaseException:
            remote_dlist.release()
            self._agent.remove_remote_agent(name)
            raise
        return _Peer(name=name, layout=layout, remote_dlist=remote_dlist)

    def _forget_peer(self, peer: _Peer) -> None:
        """Release what was prepared for a peer and unload it; called with no reads in flight."""
        try:
            peer.remote_dlist.release()
        finally:
            try:
                self._agent.remove_remote_agent(peer.name)
            except Exception as error:  # the peer may be gone already; nothing is left to free
                logger.warning("%s: remove_remote_agent(%r) failed: %s", self.name, peer.name, error)

    # transfer -------------------------------------------------------------------------------

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
        with self._lock:
            self._check_open()
            local_layout = self._registered_layout()
            self._retry_unreleased_xfers()
            while peer in self._peers_in_replacement:
                if not self._lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise KVTransferError(f"{self.name}: peer {peer!r} still being replaced at timeout")
            entry = self._peers.get(peer)
            if entry is None:
                raise KVTransferError(f"{self.name}: unknown peer {peer!r}; call add_peer first")
            remote, local = validate_block_ids(
                remote_block_ids, local_block_ids, entry.layout.num_blocks, local_layout.num_blocks
            )
            entry.active_reads += 1
        try:
            self._read(entry, remote, local, notify_msg, deadline, timeout_s)
        finally:
            with self._lock:
                entry.active_reads -= 1
                self._lock.notify_all()
        return TransferStats(
            num_blocks=len(local),
            bytes=len(local) * local_layout.block_bytes,
            seconds=time.perf_counter() - started,
        )

    def _read(
        self,
        peer: _Peer,
        remote: list[int],
        local: list[int],
        notify_msg: bytes,
        deadline: float,
        timeout_s: float,
    ) -> None:
        self._inject(FAULT_POINT_BEFORE_READ)
        with self._lock:
            handle = self._nixl(
                "make_prepped_xfer",
                lambda: self._agent.make_prepped_xfer(
                    "READ", self._local_dlist, local, peer.remote_dlist, remote, notify_msg
                ),
            )
        try:
            with self._lock:
                state = self._nixl("transfer", lambda: self._agent.transfer(handle))
            self._inject(FAULT_POINT_AFTER_POST)
            while True:
                if state == "ERR":
                    raise KVTransferError(f"{self.name}: READ from {peer.name!r} failed")
                if time.monotonic() > deadline:
                    raise KVTransferError(f"{self.name}: READ from {peer.name!r} exceeded {timeout_s} s")
                if state == "DONE":
                    return
                time.sleep(self._poll_interval_s)
                with self._lock:
                    state = self._nixl("check_xfer_state", lambda: self._agent.check_xfer_state(handle))
        finally:
            with self._lock:
                self._release_xfer(handle)

    def _release_xfer(self, handle: nixl_xfer_handle) -> None:
        """Release a request; NIXL cancels it if still running. If it cannot, keep it and retry."""
        try:
            handle.release()
        except Exception as error:
            logger.warning("%s: releasing %r failed (%s); will retry", self.name, handle, error)
            self._unreleased_xfers.append(handle)

    def _retry_unreleased_xfers(self) -> None:
        pending, self._unreleased_xfers = self._unreleased_xfers, []
        for handle in pending:
            self._release_xfer(handle)

    # notifications and shutdown -------------------------------------------------------------

    def get_notifications(self) -> list[tuple[str, bytes]]:
        with self._lock:
            self._check_open()
            by_peer = self._nixl("get_new_notifs", self._agent.get_new_notifs)
        return [(peer, msg) for peer, messages in by_peer.items() for msg in messages]

    def close(self) -> None:
        """Release every handle, unload peers, deregister the cache. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while any(peer.active_reads for peer in self._peers.values()):
                self._lock.wait()
            for peer in list(self._peers.values()):
                self._forget_peer(peer)
            self._peers.clear()
            self._retry_unreleased_xfers()
            if self._local_dlist is not None:
                self._local_dlist.release()
                self._local_dlist = None
            if self._registered_descs is not None:
                self._agent.deregister_memory(self._registered_descs)
                self._registered_descs = None
            self._cache = None

    # helpers --------------------------------------------------------------------------------

    def _nixl(self, what: str, call: Callable[[], _T]) -> _T:
        """Run one NIXL call; its binding exceptions become KVTransferError."""
        try:
            return call()
        except Exception as error:
            raise KVTransferError(f"{self.name}: nixl {what} failed: {type(error).__name__}: {error}") from error

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
