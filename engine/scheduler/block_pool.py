"""The block pool: reference-counted KV blocks, an O(1) LRU free queue, and the prefix-cache map.

A block is in exactly one of three states:

    in use        ref_cnt > 0; not in the free queue
    free, cached  ref_cnt == 0; in the free queue; still holds a full block's K/V and its hash,
                  so a prefix-cache hit can take it back out of the queue
    free, empty   ref_cnt == 0; in the free queue; no hash

Invariants (checked by tests/property/test_scheduler_state_machine.py after every rule):
- ref_cnt equals the number of live requests whose block table lists the block;
- len(free queue) + number of blocks with ref_cnt > 0 == num_blocks;
- `block.block_hash is not None` exactly when `cached[block.block_hash] is block`, and that hash
  is the hash of the block's tokens chained from its parent's hash.

Eviction order is the free queue's order: blocks are appended when their last user frees them
(requests free their blocks tail first, so a prefix's last blocks go before its first ones) and
new blocks are taken from the front, so the least recently freed block is evicted first.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# A block's hash: sha256 over (parent hash, the block's token ids, extra keys such as a
# cache salt). Chaining the parent makes a block's hash stand for its whole prefix.
BlockHash = bytes

NONE_HASH: BlockHash = b"\x00" * 32  # the "parent" of a request's first block


def hash_block_tokens(
    parent_hash: BlockHash, token_ids: Sequence[int], extra_keys: tuple[str, ...] = ()
) -> BlockHash:
    h = hashlib.sha256(parent_hash)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    for key in extra_keys:
        h.update(b"\x1f" + key.encode())
    return h.digest()


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    # Set while the block holds a full, cached block of K/V; with the tokens that confirm a hit.
    block_hash: BlockHash | None = None
    parent_hash: BlockHash | None = None
    token_ids: tuple[int, ...] = ()
    extra_keys: tuple[str, ...] = ()
    # Links of the doubly linked free queue (None when not in the queue, or at an end).
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """A doubly linked list of free blocks: O(1) popleft, append and remove-from-the-middle
    (a cache hit takes a free cached block out wherever it is)."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)  # sentinels: no None checks at the ends
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is None or block is self._tail:
            raise RuntimeError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise RuntimeError(f"block {block.block_id} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def __iter__(self):
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, count: int) -> list[KVBlock]:
        """Takes `count` blocks from the front of the free queue, evicting cached content."""
        if count > self.num_free_blocks:
            raise RuntimeError(f"asked for {count} blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(count):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def uncache(self, block: KVBlock) -> None:
        """Drops the block's prefix-cache entry (its K/V turned out not to be written); the
        block itself stays where it is (in use or free)."""
        if block.block_hash is not None and self.cached.get(block.block_hash) is block:
            self._evict(block)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        del self.cached[block.block_hash]
        block.block_hash = block.parent_hash = None
        block.token_ids = block.extra_keys = ()

    def lookup(
        self, parent_hash: BlockHash, token_ids: tuple[int, ...], extra_keys: tuple[str, ...]
    ) -> KVBlock | None:
        """The cached block holding exactly these tokens after this parent, if any.

        The hash finds a candidate; the stored parent hash, tokens and extra keys confirm it, so
        a hash collision can never return another prefix's K/V.
        """
        if not self.enable_caching:
            return None
        block = self.cached.get(hash_block_tokens(parent_hash, token_ids, extra_keys))
        if block is None:
            return None
        if (block.parent_hash, block.token_ids, block.extra_keys) != (
            parent_hash,
            token_ids,
            extra_keys,
        ):
            return None
        return block

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Takes a reference on cache-hit blocks (out of the free queue if nobody held them)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drops one reference from each block, in the given order; a block whose last
        reference goes joins the tail of the free queue (keeping its cached content)."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(
        self,
        block: KVBlock,
        parent_hash: BlockHash,
        token_ids: tuple[int, ...],
        extra_keys: tuple[str, ...],
    ) -> BlockHash:
        """Registers a full block and returns its hash. If the same content is already cached in
        another block (two requests computed the same prefix), that one stays the entry."""
        block_hash = hash_block_tokens(parent_hash, token_ids, extra_keys)
        if not self.enable_caching or block.block_hash is not None:
            return block_hash  # off, or the block is itself a cache hit
        if block_hash not in self.cached:
            block.block_hash = block_hash
            block.parent_hash = parent_hash
            block.token_ids = token_ids
            block.extra_keys = extra_keys
            self.cached[block_hash] = block
        return block_hash
