"""Per-request block tables over the block pool, with automatic prefix caching.

A request's block table covers its computed tokens plus the tokens scheduled this step (plus any
lookahead slots for speculative tokens). Full blocks are registered in the prefix cache as soon as
they are allocated for a step that fills them: in one forward every layer writes all new K/V
before any attention reads, so a request that hits such a block later in the same schedule()
reads K/V written in that same forward. This is what lets the n samples of one prompt, admitted
together, share the prompt's blocks.

A registration is provisional until the step that writes the block succeeds: the engine calls
`commit()` after a successful step and `discard_uncommitted()` when a step fails, which drops every
entry registered since the last commit (the step may have written some layers' K/V, or none), so
a block is served from the prefix cache only once a step that wrote it completed.

Block ids: beside its blocks, each request has a `BlockIdList` of their ids (same order), kept
up to date as blocks are added and cut, never rebuilt: `ids_for_step` hands a scheduled step the
whole table as a snapshot (no copy) and how many leading ids the request's previous scheduled step
carried unchanged, so the per-step work on block tables does not grow with a request's length.

Invariants: `blocks(request)` lists distinct blocks, each holding one reference for this request;
`_ids[request_id]` holds their ids in the same order;
`_hashes[request_id][i]` is the chain hash of the request's i-th block, for its first
len(_hashes) full blocks; a cache hit never covers a request's last token (its logits must be
computed), so at most num_tokens - 1 tokens hit.
"""

from __future__ import annotations

from engine.request import Request
from engine.scheduler.block_ids import BlockIdList, BlockIdsSnapshot
from engine.scheduler.block_pool import NONE_HASH, BlockHash, BlockPool, KVBlock


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._ids: dict[str, BlockIdList] = {}  # the same blocks' ids, kept incrementally
        self._hashes: dict[str, list[BlockHash]] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found
        # Blocks registered in the prefix cache since the last commit() (the current step's).
        self._uncommitted: list[KVBlock] = []

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks(self, request_id: str) -> list[KVBlock]:
        return self._blocks.get(request_id, [])

    def block_ids(self, request_id: str) -> tuple[int, ...]:
        """The request's block ids in table order (a copy)."""
        ids = self._ids.get(request_id)
        return ids.as_tuple() if ids is not None else ()

    def ids_for_step(self, request_id: str) -> tuple[BlockIdsSnapshot, int]:
        """For a scheduled step: the request's whole block table (a snapshot, no copy) and how
        many of its leading ids the request's previous scheduled step carried unchanged (0 for
        a request whose blocks were freed since, or never scheduled). Counts this step as the
        request's previous one from now on."""
        ids = self._ids.get(request_id)
        if ids is None:
            return BlockIdsSnapshot([], 0), 0
        return ids.take_for_step()

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> list[KVBlock]:
        """The longest run of cached blocks matching the request's first tokens.

        Counted in the prefix-cache counters. Requests asking for prompt logprobs skip the cache:
        their logprobs need the logits of every prompt position.
        """
        if not self.enable_caching or request.skip_prefix_cache:
            return []
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        parent = NONE_HASH
        hits: list[KVBlock] = []
        for i in range(max_blocks):
            tokens = tuple(request.token_ids_range(i * bs, (i + 1) * bs))
            block = self.pool.lookup(parent, tokens, request.cache_extra_keys)
            if block is None:
                break
            hits.append(block)
            assert block.block_hash is not None
            parent = block.block_hash
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += len(hits) * bs
        return hits

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[KVBlock] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> bool:
        """Makes the block table cover num_computed + num_new (+ lookahead) tokens.

        `computed_blocks` are prefix-cache hits for a request not yet holding blocks; the
        request's num_computed_tokens must already count them. Returns False, changing nothing,
        when the free blocks do not suffice.
        """
        computed_blocks = computed_blocks or []
        blocks = self._blocks.setdefault(request.request_id, [])
        ids = self._ids.setdefault(request.request_id, BlockIdList())
        num_tokens = request.num_computed_tokens + num_new_tokens
        need = (
            self.num_blocks_for(num_tokens + num_lookahead_tokens)
            - len(blocks)
            - len(computed_blocks)
        )
        # Hits nobody holds sit in the free queue: taking them uses up free blocks too.
        unheld_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if max(need, 0) + unheld_hits > self.pool.num_free_blocks:
            if not blocks:
                del self._blocks[request.request_id]
                del self._ids[request.request_id]
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
            ids.extend(b.block_id for b in computed_blocks)
        if need > 0:
            new_blocks = self.pool.allocate(need)
            blocks.extend(new_blocks)
            ids.extend(b.block_id for b in new_blocks)
        # Speculative tokens are not the request's tokens yet: never cache them.
        self._cache_full_blocks(request, min(num_tokens, request.num_tokens))
        return True

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        bs = self.block_size
        hashes = self._hashes.setdefault(request.request_id, [])
        blocks = self._blocks[request.request_id]
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[-1] if hashes else NONE_HASH
            tokens = tuple(request.token_ids_range(i * bs, (i + 1) * bs))
            block = blocks[i]
            was_cached = block.block_hash is not None
            hashes.append(self.pool.cache_block(block, parent, tokens, request.cache_extra_keys))
            if not was_cached and block.block_hash is not None:
                self._uncommitted.append(block)

    def commit(self) -> None:
        """The step that wrote the blocks registered since the last commit succeeded."""
        self._uncommitted.clear()

    def discard_uncommitted(self) -> None:
        """The step failed: drops the prefix-cache entries registered since the last commit.
        Requests still holding those blocks must be reset (their K/V is not trusted either)."""
        for block in self._uncommitted:
            self.pool.uncache(block)
        self._uncommitted.clear()

    def free(self, request: Request) -> None:
        """Releases the request's blocks, last block first, so that when they are evicted the
        end of a prefix goes before its beginning."""
        blocks = self._blocks.pop(request.request_id, [])
        self._ids.pop(request.request_id, None)
        self._hashes.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def trim(self, request: Request, num_tokens: int) -> None:
        """Frees blocks beyond those num_tokens tokens need (after rejected speculative tokens),
        and forgets hashes of blocks that are no longer full of computed tokens. The freed
        blocks held only draft slots: registrations never cover speculative tokens and a
        request's tokens only grow, so no registered block is trimmed (and a rejected draft's
        K/V in a kept block is overwritten by the step that computes the real token there, the
        same step whose success commits that block's registration)."""
        blocks = self._blocks.get(request.request_id)
        if blocks is None:
            return
        keep = self.num_blocks_for(num_tokens)
        extra = blocks[keep:]
        del blocks[keep:]
        self._ids[request.request_id].truncate(keep)
        self.pool.free(reversed(extra))
        hashes = self._hashes.get(request.request_id)
        if hashes is not None:
            del hashes[num_tokens // self.block_size :]
