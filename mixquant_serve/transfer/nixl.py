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
    rest    the NIXL agent's own metadata (getLocalMD: connection info + registered memory keys)

Why the agent is built from `nixl._bindings` and not with `nixl._api.nixl_agent`: the python
wrapper hard-codes the progress thread's poll delay to 0, and with nixl 1.5.1 that thread then
spins on poll(timeout=0), one full CPU core per agent for the life of the process (measured here:
two idle agents use 2.0 CPU-s per second; with a 1 ms delay 0.03, and on this 2-core machine a
1-block read dropped from up to 8 ms to 0.16 ms). The thread still wakes at once on UCX events
(it polls the worker's event fd); the delay only bounds an idle wait. `nixl_agent` offers no way
to set it, so this module makes the same binding calls the wrapper makes, with the delay set:

    cfg = nixlAgentConfig(); cfg.useProgThread = True; cfg.pthrDelay = 1000 (us) ...
    agent = nixlAgent(name, cfg); agent.createBackend("UCX", {})
    agent.registerMem(nixlRegDList(DRAM_SEG | VRAM_SEG, [(addr, len, dev, "")]))
    agent.getLocalMD(); agent.loadRemoteMD(md) -> name (bytes); agent.makeConnection(name, [])
    agent.prepXferDlist(peer, nixlXferDList(mem, Nx3 [addr, len, dev])) once per peer for all
      its blocks, and prepXferDlist(NIXL_INIT_AGENT, ...) once for all local blocks
    agent.makeXferReq(NIXL_READ, local_dlist, local_ids, remote_dlist, remote_ids, msg)
    agent.postXferReq(h, msg); agent.getXferStatus(h); agent.releaseXferReq(h)
    agent.getNotifs({}) -> {peer: [msg, ...]}; agent.releasedDlistH(dlist);
    agent.invalidateRemoteMD(name); agent.deregisterMem(reg)

Quirks seen with nixl 1.5.1 on this machine (CPU only):
- No environment tweaks are needed: UCX picks `cma` (cross-memory attach, zero copy) for
  DRAM->DRAM between processes of one host and `tcp` for its control messages.
- With cma, `postXferReq` usually performs the whole copy before returning NIXL_SUCCESS.
- Errors surface both as status codes and as binding exceptions (nixlNotAllowedError,
  nixlRemoteDisconnectError, ...) that share no base class: every NIXL call is wrapped and
  turned into KVTransferError.
- `loadRemoteMD` of a name that is already loaded fails (NIXL_ERR_NOT_ALLOWED): a restarted
  peer is replaced by releasing its prepped list, `invalidateRemoteMD`, then loading the new one.
- NIXL merges descriptors that are adjacent on both sides when it builds a request (a run of
  consecutive blocks became one descriptor in its telemetry), so per-block prepped lists cost
  nothing extra and this module does not coalesce runs itself.
- The progress thread stops only when the agent is destroyed: `close()` drops the agent.

Threading: the agent runs with NIXL_THREAD_SYNC_NONE (what the wrapper uses without a listener
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

import nixl._bindings as nixl_bindings
import numpy as np
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
    deadline_after,
    validate_block_ids,
)

logger = logging.getLogger(__name__)

METADATA_MAGIC = b"MQKV"
METADATA_VERSION = 1
_METADATA_HEADER = struct.Struct("<4sHBxIQQQH")
NIXL_BACKEND = "UCX"
# Idle wait of NIXL's progress thread between polls of the UCX event fd (see module docstring);
# NIXL rounds it up to whole milliseconds.
PROGRESS_THREAD_IDLE_WAIT_US = 1000
# Sleep between completion checks of a posted read: short against a KV transfer (ms), long
# enough to leave the GIL and the agent lock to other threads.
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
    """Inverse of pack_metadata: (agent name, its cache layout, NIXL agent metadata)."""
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
        raise ValueError("metadata lacks the agent name or the NIXL agent metadata")
    layout = CacheLayout(
        base_addr=base_addr,
        block_bytes=block_bytes,
        num_blocks=num_blocks,
        is_cuda=bool(is_cuda),
        device_index=device_index,
    )
    return metadata[_METADATA_HEADER.size : name_end].decode("utf-8"), layout, agent_metadata


def _mem_segment(layout: CacheLayout) -> nixl_bindings.nixl_mem_t:
    return nixl_bindings.VRAM_SEG if layout.is_cuda else nixl_bindings.DRAM_SEG


def _block_descriptors(layout: CacheLayout) -> nixl_bindings.nixlXferDList:
    """A nixlXferDList with one descriptor per block: (address, length, device index)."""
    # rows: [num_blocks, 3] uint64
    rows = np.empty((layout.num_blocks, 3), dtype=np.uint64)
    block_ids = np.arange(layout.num_blocks, dtype=np.uint64)
    rows[:, 0] = np.uint64(layout.base_addr) + block_ids * np.uint64(layout.block_bytes)
    rows[:, 1] = layout.block_bytes
    rows[:, 2] = layout.device_index
    return nixl_bindings.nixlXferDList(_mem_segment(layout), rows)


def _new_agent(name: str) -> nixl_bindings.nixlAgent:
    config = nixl_bindings.nixlAgentConfig()
    config.useProgThread = True
    config.useListenThread = False  # metadata travels through the app, not NIXL's listener
    config.syncMode = nixl_bindings.NIXL_THREAD_SYNC_NONE  # NixlTransport serializes calls
    config.pthrDelay = PROGRESS_THREAD_IDLE_WAIT_US
    config.captureTelemetry = False
    agent = nixl_bindings.nixlAgent(name, config)
    if NIXL_BACKEND not in agent.getAvailPlugins():
        raise RuntimeError(f"the NIXL {NIXL_BACKEND} backend plugin is not installed")
    agent.createBackend(NIXL_BACKEND, {})
    return agent


@dataclass
class _Peer:
    name: str
    layout: CacheLayout
    remote_dlist: int  # prepped handle over all of the peer's blocks, indexed by block id
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
        # None once closed: dropping the last reference destroys it and stops its threads.
        self._agent: nixl_bindings.nixlAgent | None = _new_agent(name)
        # Guards every agent call, the peer table and the handle lists; waited on for peers in
        # replacement and for in-flight reads of a peer being replaced.
        self._lock = threading.Condition()
        self._peers: dict[str, _Peer] = {}
        self._peers_in_replacement: set[str] = set()
        self._layout: CacheLayout | None = None
        self._cache: torch.Tensor | None = None  # held so its memory outlives the registration
        self._registered: nixl_bindings.nixlRegDList | None = None  # given to registerMem
        self._local_dlist: int | None = None
        self._unreleased_xfers: list[int] = []  # releaseXferReq failed; retried later

    # registration and metadata ---------------------------------------------------------------

    def register_cache(self, cache: torch.Tensor) -> None:
        layout = CacheLayout.of(cache)
        cache_bytes = layout.num_blocks * layout.block_bytes
        region = [(layout.base_addr, cache_bytes, layout.device_index, "")]
        registered = nixl_bindings.nixlRegDList(_mem_segment(layout), region)
        with self._lock:
            agent = self._open_agent()
            if self._layout is not None:
                raise RuntimeError(f"{self.name}: a cache is already registered")
            self._nixl("registerMem", lambda: agent.registerMem(registered))
            try:
                local_dlist = self._nixl(
                    "prepXferDlist(local)",
                    lambda: agent.prepXferDlist(
                        nixl_bindings.NIXL_INIT_AGENT, _block_descriptors(layout)
                    ),
                )
            except BaseException:
                self._best_effort("deregisterMem", lambda: agent.deregisterMem(registered))
                raise
            self._layout, self._cache = layout, cache
            self._registered, self._local_dlist = registered, local_dlist

    def metadata(self) -> bytes:
        with self._lock:
            agent = self._open_agent()
            layout = self._registered_layout()
            agent_metadata = self._nixl("getLocalMD", agent.getLocalMD)
        return pack_metadata(self.name, layout, agent_metadata)

    # peers ----------------------------------------------------------------------------------

    def add_peer(self, metadata: bytes) -> str:
        name, layout, agent_metadata = unpack_metadata(metadata)
        with self._lock:
            self._open_agent()
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
                    self._lock.wait()  # those reads end by their own deadlines
                if old is not None:
                    self._forget_peer(old)
                self._peers[name] = self._load_peer(name, layout, agent_metadata)
            finally:
                self._peers_in_replacement.discard(name)
                self._lock.notify_all()
        return name

    def remove_peer(self, name: str) -> None:
        with self._lock:
            self._open_agent()
            while name in self._peers_in_replacement:
                self._lock.wait()
            peer = self._peers.pop(name, None)
            if peer is None:
                raise KVTransferError(f"{self.name}: unknown peer {name!r}")
            while peer.active_reads > 0:
                self._lock.wait()
            self._forget_peer(peer)

    def _load_peer(self, name: str, layout: CacheLayout, agent_metadata: bytes) -> _Peer:
        agent = self._open_agent()
        loaded = self._nixl("loadRemoteMD", lambda: agent.loadRemoteMD(agent_metadata))
        loaded_name = loaded.decode("utf-8") if isinstance(loaded, bytes) else str(loaded)
        if loaded_name != name:
            self._best_effort("invalidateRemoteMD", lambda: agent.invalidateRemoteMD(loaded_name))
            raise ValueError(
                f"metadata header names {name!r} but its NIXL part is {loaded_name!r}"
            )
        try:
            remote_dlist = self._nixl(
                "prepXferDlist(remote)",
                lambda: agent.prepXferDlist(name, _block_descriptors(layout)),
            )
        except BaseException:
            self._best_effort("invalidateRemoteMD", lambda: agent.invalidateRemoteMD(name))
            raise
        try:
            # Optional in NIXL; connecting now keeps the handshake out of the first read.
            self._nixl("makeConnection", lambda: agent.makeConnection(name, []))
        except BaseException:
            self._best_effort("releasedDlistH", lambda: agent.releasedDlistH(remote_dlist))
            self._best_effort("invalidateRemoteMD", lambda: agent.invalidateRemoteMD(name))
            raise
        return _Peer(name=name, layout=layout, remote_dlist=remote_dlist)

    def _forget_peer(self, peer: _Peer) -> None:
        """Release what was prepared for a peer and unload it; called with no reads in flight."""
        agent = self._open_agent()
        try:
            self._nixl("releasedDlistH", lambda: agent.releasedDlistH(peer.remote_dlist))
        finally:
            # A peer that died may fail this; nothing of it is left to free on our side.
            self._best_effort("invalidateRemoteMD", lambda: agent.invalidateRemoteMD(peer.name))

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
            self._open_agent()
            local_layout = self._registered_layout()
            self._retry_unreleased_xfers()
            while peer in self._peers_in_replacement:
                if not self._lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise KVTransferError(
                        f"{self.name}: peer {peer!r} was still being replaced at timeout"
                    )
            entry = self._peers.get(peer)
            if entry is None:
                raise KVTransferError(f"{self.name}: unknown peer {peer!r}; call add_peer first")
            remote, local = validate_block_ids(
                remote_block_ids,
                local_block_ids,
                num_remote_blocks=entry.layout.num_blocks,
                num_local_blocks=local_layout.num_blocks,
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
            agent = self._open_agent()
            handle = self._nixl(
                "makeXferReq",
                lambda: agent.makeXferReq(
                    nixl_bindings.NIXL_READ,
                    self._local_dlist,
                    local,
                    peer.remote_dlist,
                    remote,
                    notify_msg,
                ),
            )
        try:
            with self._lock:
                status = self._nixl("postXferReq", lambda: agent.postXferReq(handle, notify_msg))
            self._inject(FAULT_POINT_AFTER_POST)
            while True:  # _nixl raised already if the status is an error
                if time.monotonic() > deadline:
                    raise KVTransferError(
                        f"{self.name}: READ from {peer.name!r} exceeded {timeout_s} s"
                    )
                if status == nixl_bindings.NIXL_SUCCESS:
                    return
                time.sleep(self._poll_interval_s)
                with self._lock:
                    status = self._nixl("getXferStatus", lambda: agent.getXferStatus(handle))
        finally:
            with self._lock:
                self._release_xfer(handle)

    def _release_xfer(self, handle: int) -> None:
        """Release a request; NIXL cancels it if still running. If it cannot, keep it and retry."""
        try:
            self._open_agent().releaseXferReq(handle)
        except Exception as error:
            logger.warning(
                "%s: releaseXferReq(0x%x) failed (%s); will retry", self.name, handle, error
            )
            self._unreleased_xfers.append(handle)

    def _retry_unreleased_xfers(self) -> None:
        pending, self._unreleased_xfers = self._unreleased_xfers, []
        for handle in pending:
            self._release_xfer(handle)

    # notifications and shutdown -------------------------------------------------------------

    def send_notification(self, peer: str, msg: bytes) -> None:
        check_notify_msg(msg)
        self._inject(FAULT_POINT_BEFORE_NOTIFY)  # outside the lock: a delay must not stall other calls
        with self._lock:
            agent = self._open_agent()
            if peer not in self._peers:
                raise KVTransferError(f"{self.name}: cannot notify {peer!r}: unknown peer; call add_peer first")
            self._nixl("genNotif", lambda: agent.genNotif(peer, msg))

    def get_notifications(self) -> list[tuple[str, bytes]]:
        with self._lock:
            agent = self._open_agent()
            by_peer = self._nixl("getNotifs", lambda: agent.getNotifs({}))
        return [(peer, msg) for peer, messages in by_peer.items() for msg in messages]

    def close(self) -> None:
        """Release every handle, unload peers, deregister the cache, destroy the agent.

        Waits for reads in flight (they end by their deadlines). Safe to call twice.
        """
        with self._lock:
            if self._agent is None:
                return
            while any(peer.active_reads for peer in self._peers.values()):
                self._lock.wait()
            try:
                for peer in list(self._peers.values()):
                    self._forget_peer(peer)
                self._peers.clear()
                self._retry_unreleased_xfers()
                agent, local_dlist, registered = self._agent, self._local_dlist, self._registered
                if local_dlist is not None:
                    self._nixl("releasedDlistH", lambda: agent.releasedDlistH(local_dlist))
                if registered is not None:
                    self._nixl("deregisterMem", lambda: agent.deregisterMem(registered))
            finally:
                self._local_dlist = self._registered = self._cache = None
                self._agent = None  # the last reference: its destructor stops the progress thread

    # helpers --------------------------------------------------------------------------------

    def _nixl(self, what: str, call: Callable[[], _T]) -> _T:
        """Run one NIXL call. Binding exceptions and returned error statuses (anything but
        NIXL_SUCCESS and NIXL_IN_PROG) become KVTransferError."""
        try:
            result = call()
        except Exception as error:
            raise KVTransferError(
                f"{self.name}: NIXL {what} failed: {type(error).__name__}: {error}"
            ) from error
        if isinstance(result, nixl_bindings.nixl_status_t) and result not in (
            nixl_bindings.NIXL_SUCCESS,
            nixl_bindings.NIXL_IN_PROG,
        ):
            raise KVTransferError(f"{self.name}: NIXL {what} returned {result}")
        return result

    def _best_effort(self, what: str, call: Callable[[], object]) -> None:
        """A cleanup call on an error path: log its failure instead of masking the first one."""
        try:
            self._nixl(what, call)
        except KVTransferError as error:
            logger.warning("%s", error)

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

    def _open_agent(self) -> nixl_bindings.nixlAgent:
        if self._agent is None:
            raise RuntimeError(f"{self.name}: transport is closed")
        return self._agent
