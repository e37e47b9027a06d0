"""Block manager invariants, prefix hashing and eviction, without a device."""

import random

import pytest

from mixquant_serve.engine.block_manager import BlockManager, chain_hash, prefix_block_hashes
from mixquant_serve.engine.sequence import Sequence


def make_seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), sampling=None)


def compute_all(manager: BlockManager, seq: Sequence) -> None:
    """Marks every token computed, as the runner + postprocess would, and registers full blocks."""
    manager.append_slots(seq, len(seq))
    seq.num_computed_tokens = len(seq)
    manager.register_computed_blocks(seq)


def test_chain_hash_depends_on_prefix_and_is_stable():
    a = chain_hash([1, 2, 3, 4], -1)
    assert a == chain_hash([1, 2, 3, 4], -1)
    assert a != chain_hash([1, 2, 3, 5], -1)
    assert chain_hash([9, 9, 9, 9], a) != chain_hash([9, 9, 9, 9], -1)
    assert prefix_block_hashes(list(range(10)), 4) == [
        chain_hash([0, 1, 2, 3], -1),
        chain_hash([4, 5, 6, 7], chain_hash([0, 1, 2, 3], -1)),
    ]
    # stable across processes: a fixed value, not Python's salted hash()
    assert chain_hash([1, 2, 3, 4], -1) == 3375788291951307020


def test_prefix_reuse_after_free_and_eviction_order():
    manager = BlockManager(num_blocks=6, block_size=4)
    first = make_seq("a", list(range(10)))  # 2 full blocks + 2 tokens
    manager.allocate(first, len(first), max_cached_tokens=len(first))
    assert first.num_cached_tokens == 0 and len(first.block_table) == 3
    compute_all(manager, first)
    full_blocks = first.block_table[:2]
    manager.free(first)
    manager.check_invariants([])
    assert manager.num_free_blocks == 6

    second = make_seq("b", list(range(8)) + [77, 78, 79])  # same two full blocks, different tail
    assert manager.num_cached_tokens(second.token_ids, len(second)) == 8
    manager.allocate(second, len(second), max_cached_tokens=len(second) - 1)
    assert second.num_cached_tokens == 8 and second.num_computed_tokens == 8
    assert second.block_table[:2] == full_blocks
    manager.check_invariants([second.block_table])

    # a generating sequence must compute its last token: an exactly block-aligned prompt keeps one block back
    third = make_seq("c", list(range(8)))
    manager.allocate(third, len(third), max_cached_tokens=len(third) - 1)
    assert third.num_cached_tokens == 4
    manager.check_invariants([second.block_table, third.block_table])


def test_cached_blocks_are_evicted_only_when_needed():
    manager = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq("a", [1, 2, 3, 4])
    manager.allocate(seq, 4, 4)
    compute_all(manager, seq)
    manager.free(seq)
    other = make_seq("b", [9, 9, 9, 9, 9, 9])  # needs 3 blocks: takes the 2 never-used ones first, then 1 cached
    manager.allocate(other, 6, 6)
    # freed in reverse, so the tail block was handed out first and the head block is still cached
    assert manager.num_cached_tokens([1, 2, 3, 4], 4) == 2
    manager.free(other)
    manager.check_invariants([])


def test_fork_shares_full_blocks_and_copies_partial():
    manager = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq("p", list(range(6)))
    manager.allocate(parent, 6, 6)
    compute_all(manager, parent)
    child = make_seq("c", list(range(6)))
    copies = manager.fork(parent, child)
    assert child.block_table[0] == parent.block_table[0]
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert manager.blocks[parent.block_table[0]].ref_count == 2
    manager.check_invariants([parent.block_table, child.block_table])
    manager.free(parent)
    manager.free(child)
    manager.check_invariants([])
    assert manager.num_free_blocks == 8


def test_allocation_refused_when_full():
    manager = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq("a", list(range(12)))
    assert not manager.can_allocate(seq.token_ids, 12, 11)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        manager.allocate(seq, 12, 11)
    assert manager.num_free_blocks == 2 and not seq.block_table


@pytest.mark.parametrize("seed", range(5))
def test_random_allocate_free_fork_never_leaks(seed):
    rng = random.Random(seed)
    manager = BlockManager(num_blocks=40, block_size=4)
    live: list[Sequence] = []
    vocab = [1, 2, 3]  # a small vocabulary makes prefixes collide and share blocks often
    for step in range(600):
        action = rng.random()
        if action < 0.4:
            prefix = rng.choice(live).token_ids[: rng.randrange(1, 12)] if live and rng.random() < 0.5 else []
            tokens = prefix + [rng.choice(vocab) for _ in range(rng.randrange(1, 14))]
            seq = make_seq(f"s{step}", tokens)
            if manager.can_allocate(tokens, len(tokens), len(tokens) - 1):
                manager.allocate(seq, len(tokens), len(tokens) - 1)
                compute_all(manager, seq)
                live.append(seq)
        elif action < 0.6 and live:
            seq = rng.choice(live)
            seq.token_ids.append(rng.choice(vocab))
            if manager.can_append(seq, len(seq)):
                compute_all(manager, seq)
            else:
                seq.token_ids.pop()
        elif action < 0.75 and live:
            parent = rng.choice(live)
            child = make_seq(f"f{step}", parent.token_ids)
            if manager.num_free_blocks >= 1:
                manager.fork(parent, child)
                live.append(child)
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            manager.free(seq)
        manager.check_invariants([s.block_table for s in live])
        # every live sequence's registered hashes point at blocks with its own content
        for seq in live:
            for index, block_hash in enumerate(seq.block_hashes):
                block_id = manager.hash_to_block.get(block_hash)
                if block_id is not None:
                    assert manager.blocks[block_id].token_ids == tuple(seq.token_ids[index * 4 : index * 4 + 4])
    for seq in live:
        manager.free(seq)
    manager.check_invariants([])
    assert manager.num_free_blocks == manager.num_blocks
