"""KV-block transfer: in-process copies and real NIXL (UCX) DRAM reads, in one and two processes.

Every test builds random caches, pulls a non-contiguous set of blocks from a source ("prefill")
cache into a destination ("decode") cache, and checks the bytes, the untouched blocks, the
notification, peer refresh after a source restart, bad input, injected faults and timeouts.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch

from mixquant_serve.transfer import InProcessHub, InProcessTransport, KVTransferError, KVTransport
from mixquant_serve.transfer.base import coalesce_block_runs
from mixquant_serve.transfer.nixl import NixlTransport, pack_metadata, unpack_metadata

# [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]; odd sizes on purpose.
BLOCK_SHAPE = (3, 2, 5, 2, 6)
NUM_SOURCE_BLOCKS = 16
NUM_DEST_BLOCKS = 11
# A non-contiguous set with one run that is adjacent on both sides (3,4,5 -> 6,7,8).
REMOTE_IDS = [9, 3, 4, 5, 15, 0]
LOCAL_IDS = [0, 6, 7, 8, 2, 10]
TIMEOUT_S = 5.0
NOTIFY_WAIT_S = 5.0
CHILD_WAIT_S = 60.0


def random_cache(num_blocks: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    return torch.randn((num_blocks, *BLOCK_SHAPE), generator=generator)


def unique_name(role: str) -> str:
    return f"{role}-{uuid.uuid4().hex[:8]}"


def wait_for_notifications(transport: KVTransport, count: int) -> list[tuple[str, bytes]]:
    received: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + NOTIFY_WAIT_S
    while len(received) < count and time.monotonic() < deadline:
        received += transport.get_notifications()
        time.sleep(0.005)
    return received


def assert_blocks_copied(
    dest: torch.Tensor,
    dest_before: torch.Tensor,
    source: torch.Tensor,
    remote: list[int],
    local: list[int],
) -> None:
    for r, l in zip(remote, local, strict=True):
        # Bitwise equality, not allclose: a transfer moves bytes.
        dest_bits, source_bits = dest[l].view(torch.int32), source[r].view(torch.int32)
        assert torch.equal(dest_bits, source_bits), f"block {r}->{l}"
    untouched = [i for i in range(dest.shape[0]) if i not in set(local)]
    assert torch.equal(dest[untouched], dest_before[untouched]), "a block outside local ids changed"


@dataclass
class FaultAt:
    """Fault injector: at `point`, raise (or sleep `sleep_s` when set) the next `times` times."""

    point: str
    sleep_s: float | None = None
    times: int = 1
    seen: list[str] = field(default_factory=list)

    def __call__(self, point: str) -> None:
        self.seen.append(point)
        if point != self.point or self.times == 0:
            return
        self.times -= 1
        if self.sleep_s is not None:
            time.sleep(self.sleep_s)
        else:
            raise ConnectionResetError(f"injected at {point}")


@dataclass
class Pair:
    source: KVTransport
    dest: KVTransport
    source_cache: torch.Tensor
    dest_cache: torch.Tensor
    new_transport: Callable[[str], KVTransport]  # same kind, same hub, no fault injector

    def restart_source(self, cache: torch.Tensor) -> KVTransport:
        """Close the source and start a new agent with the same name over `cache`."""
        name = self.source.name
        self.source.close()
        self.source = self.new_transport(name)
        self.source.register_cache(cache)
        self.source_cache = cache
        return self.source


def make_pair(kind: str, fault_injector: FaultAt | None = None) -> Pair:
    hub = InProcessHub()

    def new_transport(name: str, injector: FaultAt | None = None) -> KVTransport:
        if kind == "inprocess":
            return InProcessTransport(name, hub, fault_injector=injector)
        return NixlTransport(name, fault_injector=injector)

    source_cache = random_cache(NUM_SOURCE_BLOCKS, seed=1)
    dest_cache = random_cache(NUM_DEST_BLOCKS, seed=2)
    source = new_transport(unique_name("prefill"))
    source.register_cache(source_cache)
    dest = new_transport(unique_name("decode"), fault_injector)
    dest.register_cache(dest_cache)
    assert dest.add_peer(source.metadata()) == source.name
    return Pair(source, dest, source_cache, dest_cache, new_transport)


@pytest.fixture(params=["inprocess", "nixl"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def pair(kind: str) -> Iterator[Pair]:
    made = make_pair(kind)
    yield made
    made.dest.close()
    made.source.close()


def test_read_copies_blocks_exactly_and_notifies_source(pair: Pair) -> None:
    dest_before = pair.dest_cache.clone()
    stats = pair.dest.read_blocks(pair.source.name, REMOTE_IDS, LOCAL_IDS, b"req-1", TIMEOUT_S)
    assert_blocks_copied(pair.dest_cache, dest_before, pair.source_cache, REMOTE_IDS, LOCAL_IDS)
    block_bytes = pair.source_cache[0].numel() * pair.source_cache.element_size()
    assert (stats.num_blocks, stats.bytes) == (len(LOCAL_IDS), len(LOCAL_IDS) * block_bytes)
    assert stats.seconds > 0
    assert wait_for_notifications(pair.source, 1) == [(pair.dest.name, b"req-1")]
    assert pair.dest.get_notifications() == []


def test_send_notification_reaches_the_peer_without_moving_data(pair: Pair) -> None:
    dest_before = pair.dest_cache.clone()
    pair.dest.send_notification(pair.source.name, b"release req-9")
    assert wait_for_notifications(pair.source, 1) == [(pair.dest.name, b"release req-9")]
    assert torch.equal(pair.dest_cache, dest_before)
    with pytest.raises(KVTransferError):
        pair.dest.send_notification("nobody", b"x")


def test_peer_refresh_after_source_restart(pair: Pair, kind: str) -> None:
    pair.dest.read_blocks(pair.source.name, [1], [1], b"before", TIMEOUT_S)
    restarted = pair.restart_source(random_cache(NUM_SOURCE_BLOCKS, seed=3))
    if kind == "inprocess":  # NIXL's stale-peer failure is covered across processes below
        with pytest.raises(KVTransferError, match="refresh"):
            pair.dest.read_blocks(restarted.name, [1], [1], b"stale", TIMEOUT_S)
    assert pair.dest.add_peer(restarted.metadata()) == restarted.name
    dest_before = pair.dest_cache.clone()
    pair.dest.read_blocks(restarted.name, REMOTE_IDS, LOCAL_IDS, b"after", TIMEOUT_S)
    assert_blocks_copied(pair.dest_cache, dest_before, pair.source_cache, REMOTE_IDS, LOCAL_IDS)
    assert wait_for_notifications(restarted, 1) == [(pair.dest.name, b"after")]


@pytest.mark.parametrize(
    ("remote", "local", "msg", "timeout_s", "error"),
    [
        ([NUM_SOURCE_BLOCKS], [0], b"m", TIMEOUT_S, "remote_block_ids out of range"),
        ([-1], [0], b"m", TIMEOUT_S, "remote_block_ids out of range"),
        ([0], [NUM_DEST_BLOCKS], b"m", TIMEOUT_S, "local_block_ids out of range"),
        ([0, 1], [0], b"m", TIMEOUT_S, "equal lengths"),
        ([0, 1], [3, 3], b"m", TIMEOUT_S, "duplicates"),
        ([], [], b"m", TIMEOUT_S, "empty"),
        ([0], [0], b"", TIMEOUT_S, "notify_msg"),
        ([0], [0], "text", TIMEOUT_S, "notify_msg"),
        ([0], [0], b"m", 0.0, "timeout_s"),
    ],
)
def test_bad_requests_raise_value_error(
    pair: Pair, remote: list[int], local: list[int], msg: bytes, timeout_s: float, error: str
) -> None:
    dest_before = pair.dest_cache.clone()
    with pytest.raises(ValueError, match=error):
        pair.dest.read_blocks(pair.source.name, remote, local, msg, timeout_s)
    assert torch.equal(pair.dest_cache, dest_before)
    pair.dest.read_blocks(pair.source.name, [2], [4], b"still-works", TIMEOUT_S)
    assert torch.equal(pair.dest_cache[4], pair.source_cache[2])


def test_unknown_and_removed_peer_raise_transfer_error(pair: Pair) -> None:
    with pytest.raises(KVTransferError, match="unknown peer"):
        pair.dest.read_blocks("nobody", [0], [0], b"m", TIMEOUT_S)
    pair.dest.remove_peer(pair.source.name)
    with pytest.raises(KVTransferError, match="unknown peer"):
        pair.dest.read_blocks(pair.source.name, [0], [0], b"m", TIMEOUT_S)
    with pytest.raises(KVTransferError, match="unknown peer"):
        pair.dest.remove_peer(pair.source.name)


def test_peer_with_other_block_size_is_rejected(kind: str) -> None:
    made = make_pair(kind)
    other_cache = torch.zeros((4, 1, 2, 2, 1, 8))  # other block_bytes than BLOCK_SHAPE
    other = made.new_transport(unique_name("other"))
    other.register_cache(other_cache)
    with pytest.raises(ValueError, match="block_bytes"):
        made.dest.add_peer(other.metadata())
    for transport in (other, made.dest, made.source):
        transport.close()


@pytest.mark.parametrize("point", ["before_read", "after_post"])
def test_injected_fault_raises_and_transport_recovers(kind: str, point: str) -> None:
    fault = FaultAt(point)
    made = make_pair(kind, fault)
    with pytest.raises(KVTransferError, match=f"fault at {point}"):
        made.dest.read_blocks(made.source.name, REMOTE_IDS, LOCAL_IDS, b"broken", TIMEOUT_S)
    assert point in fault.seen
    dest_before = made.dest_cache.clone()
    made.dest.read_blocks(made.source.name, REMOTE_IDS, LOCAL_IDS, b"retry", TIMEOUT_S)
    assert_blocks_copied(made.dest_cache, dest_before, made.source_cache, REMOTE_IDS, LOCAL_IDS)
    made.dest.close()
    made.source.close()


def test_timeout_raises_and_transport_recovers(kind: str) -> None:
    fault = FaultAt("after_post", sleep_s=0.3)
    made = make_pair(kind, fault)
    started = time.monotonic()
    with pytest.raises(KVTransferError, match="exceeded"):
        made.dest.read_blocks(made.source.name, REMOTE_IDS, LOCAL_IDS, b"slow", timeout_s=0.1)
    assert time.monotonic() - started < 0.3 + TIMEOUT_S
    made.dest.read_blocks(made.source.name, [7], [3], b"fast", TIMEOUT_S)
    assert torch.equal(made.dest_cache[3], made.source_cache[7])
    made.dest.close()
    made.source.close()


def test_concurrent_reads_from_threads_all_land(pair: Pair) -> None:
    dest_before = pair.dest_cache.clone()
    # Thread t moves remote blocks 4t..4t+1 into local blocks 2t..2t+1 (disjoint targets).
    requests = [([4 * t, 4 * t + 1], [2 * t, 2 * t + 1], f"thread-{t}".encode()) for t in range(4)]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        futures = [
            pool.submit(pair.dest.read_blocks, pair.source.name, remote, local, msg, TIMEOUT_S)
            for remote, local, msg in requests
        ]
        for future in futures:
            future.result()
    remote_all = [i for remote, _, _ in requests for i in remote]
    local_all = [i for _, local, _ in requests for i in local]
    assert_blocks_copied(pair.dest_cache, dest_before, pair.source_cache, remote_all, local_all)
    received = wait_for_notifications(pair.source, len(requests))
    assert sorted(received) == sorted((pair.dest.name, msg) for _, _, msg in requests)


def test_coalesce_block_runs_merges_pairs_adjacent_on_both_sides() -> None:
    assert coalesce_block_runs([4, 5, 6, 9], [0, 1, 2, 3]) == [(4, 0, 3), (9, 3, 1)]
    assert coalesce_block_runs([1, 2], [5, 4]) == [(1, 5, 1), (2, 4, 1)]
    assert coalesce_block_runs(REMOTE_IDS, LOCAL_IDS) == [
        (9, 0, 1), (3, 6, 3), (15, 2, 1), (0, 10, 1)
    ]


def test_nixl_metadata_round_trips_and_rejects_foreign_bytes() -> None:
    transport = NixlTransport(unique_name("prefill"))
    cache = random_cache(NUM_SOURCE_BLOCKS, seed=4)
    transport.register_cache(cache)
    name, layout, agent_metadata = unpack_metadata(transport.metadata())
    assert (name, layout.base_addr, layout.num_blocks, layout.is_cuda) == (
        transport.name, cache.data_ptr(), NUM_SOURCE_BLOCKS, False
    )
    assert layout.block_bytes == cache[0].numel() * 4
    assert pack_metadata(name, layout, agent_metadata) == transport.metadata()
    with pytest.raises(ValueError, match="metadata"):
        unpack_metadata(b"not metadata at all, just some bytes of the wrong kind")
    transport.close()


# Two processes, as the Ray actors run: the source lives in a spawned child. -----------------


def run_source_process(
    name: str, seed: int, to_parent: multiprocessing.Queue, stop: multiprocessing.Event
) -> None:
    """Child: register a seeded cache, publish metadata, forward notifications until stopped."""
    transport = NixlTransport(name)
    transport.register_cache(random_cache(NUM_SOURCE_BLOCKS, seed=seed))
    to_parent.put(("metadata", transport.metadata()))
    while not stop.is_set():
        for notification in transport.get_notifications():
            to_parent.put(("notification", notification))
        time.sleep(0.005)
    transport.close()


def start_source_process(
    context: multiprocessing.context.SpawnContext, name: str, seed: int
) -> tuple[multiprocessing.Process, multiprocessing.Queue, multiprocessing.Event, bytes]:
    to_parent, stop = context.Queue(), context.Event()
    process = context.Process(target=run_source_process, args=(name, seed, to_parent, stop))
    process.start()
    kind, metadata = to_parent.get(timeout=CHILD_WAIT_S)
    assert kind == "metadata"
    return process, to_parent, stop, metadata


def test_nixl_read_across_processes_with_source_restart() -> None:
    context = multiprocessing.get_context("spawn")
    source_name = unique_name("prefill")
    dest = NixlTransport(unique_name("decode"))
    dest_cache = random_cache(NUM_DEST_BLOCKS, seed=2)
    dest.register_cache(dest_cache)
    process, to_parent, stop, metadata = start_source_process(context, source_name, seed=11)
    try:
        assert dest.add_peer(metadata) == source_name
        dest_before = dest_cache.clone()
        stats = dest.read_blocks(source_name, REMOTE_IDS, LOCAL_IDS, b"req-x", TIMEOUT_S)
        assert stats.num_blocks == len(LOCAL_IDS)
        expected_source = random_cache(NUM_SOURCE_BLOCKS, seed=11)
        assert_blocks_copied(dest_cache, dest_before, expected_source, REMOTE_IDS, LOCAL_IDS)
        assert to_parent.get(timeout=NOTIFY_WAIT_S) == ("notification", (dest.name, b"req-x"))
    finally:
        stop.set()
        process.join(CHILD_WAIT_S)
    # The source is gone: reading fails instead of hanging.
    with pytest.raises(KVTransferError):
        dest.read_blocks(source_name, [0], [0], b"dead", timeout_s=2.0)
    process, to_parent, stop, metadata = start_source_process(context, source_name, seed=12)
    try:
        assert dest.add_peer(metadata) == source_name  # restart: same name, new metadata
        dest_before = dest_cache.clone()
        dest.read_blocks(source_name, REMOTE_IDS, LOCAL_IDS, b"req-y", TIMEOUT_S)
        expected_source = random_cache(NUM_SOURCE_BLOCKS, seed=12)
        assert_blocks_copied(dest_cache, dest_before, expected_source, REMOTE_IDS, LOCAL_IDS)
        assert to_parent.get(timeout=NOTIFY_WAIT_S) == ("notification", (dest.name, b"req-y"))
    finally:
        stop.set()
        process.join(CHILD_WAIT_S)
        dest.close()
    assert process.exitcode == 0
