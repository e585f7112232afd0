"""The production scheduler and block pool under random add / step / abort / finish sequences.

No model runs: a step samples fake tokens from a tiny alphabet (so prompts and outputs share
prefixes and the prefix cache gets hits). After every rule the bookkeeping invariants are
checked; at teardown every request is driven to its end within a bounded number of steps and
every block must be free.

The model runner's side of the block tables runs too: every step's output goes through
`prepare_inputs` with a persistent block table (engine/block_table.py), as the runner does, and
its metadata must equal the one built from scratch from the whole tables; the snapshots of block
ids an output carries must still hold the same ids after any later allocation, rollback of
speculative blocks, preemption or end of their request.
"""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.block_table import PersistentBlockTable
from engine.config import CacheConfig, SchedulerConfig
from engine.request import Request, RequestStatus
from engine.runner import prepare_inputs
from engine.sampling_params import SamplingParams
from engine.scheduler.block_pool import hash_block_tokens
from engine.scheduler.interface import SampledToken
from engine.scheduler.scheduler import DefaultScheduler

PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 9, 9], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4]]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_blocks=st.integers(6, 24),
        budget=st.integers(4, 24),
        max_num_seqs=st.integers(1, 4),
        chunked=st.booleans(),
        caching=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def setup(self, block_size, num_blocks, budget, max_num_seqs, chunked, caching, seed):
        self.capacity = block_size * num_blocks
        self.max_model_len = min(self.capacity, 40)
        if not chunked:
            budget = max(budget, self.max_model_len)
        self.config = SchedulerConfig(
            scheduler="default",
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(budget, max_num_seqs),
            max_model_len=self.max_model_len,
            enable_chunked_prefill=chunked,
        )
        cache = CacheConfig(
            block_size=block_size,
            num_blocks=num_blocks,
            kv_cache_memory_bytes=0,
            enable_prefix_caching=caching,
        )
        self.scheduler = DefaultScheduler(self.config, cache)
        self.rng = random.Random(seed)
        self.counter = 0
        self.last_output = None
        self.block_size = block_size
        self.runner_table = PersistentBlockTable(num_rows=1, num_cols=1)  # grows as needed
        # (snapshot, its ids when handed out) of every output so far: snapshots never change.
        self.snapshots: list[tuple[object, tuple[int, ...]]] = []

    # ---- rules ---------------------------------------------------------------------------------

    @rule(
        prefix=st.sampled_from(range(len(PREFIXES))),
        suffix=st.lists(st.integers(1, 3), max_size=6),
        max_tokens=st.integers(1, 8),
        salt=st.sampled_from([None, None, "a"]),
    )
    def add(self, prefix, suffix, max_tokens, salt):
        prompt = (PREFIXES[prefix] + suffix)[: self.max_model_len - 1]
        max_tokens = min(max_tokens, self.max_model_len - len(prompt))
        request = Request(
            request_id=str(self.counter),
            prompt_token_ids=prompt,
            sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            eos_token_ids=(),
            max_model_len=self.max_model_len,
            sampling_seed=0,
            cache_salt=salt,
        )
        self.counter += 1
        self.scheduler.add_request(request)

    @rule()
    def step(self):
        self._step()

    @rule()
    def failed_step(self):
        """A step whose forward (or sampler, or proposer) raised: the engine rolls it back. It
        leaves no prefix-cache entry it made (their K/V may be unwritten), and its requests wait
        to be recomputed, holding nothing."""
        cached_before = dict(self.scheduler.kv.pool.cached)
        output = self.scheduler.schedule()
        self.last_output = output
        if output.scheduled and self.rng.random() < 0.5:
            self._run(output)  # it failed after the runner's inputs were prepared
        self.scheduler.rollback_step(output)
        for block_hash, block in self.scheduler.kv.pool.cached.items():
            assert cached_before.get(block_hash) is block, "a failed step's block stays cached"
        for item in output.scheduled:
            request = item.request
            assert request.status is RequestStatus.PREEMPTED
            assert request in self.scheduler.waiting
            assert request.num_computed_tokens == 0 and not request.spec_token_ids
            assert not self.scheduler.kv.blocks(request.request_id)

    @precondition(lambda self: self.scheduler.requests)
    @rule(
        data=st.data(),
        status=st.sampled_from([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED]),
    )
    def finish(self, data, status):
        request_id = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        found = self.scheduler.finish_requests([request_id, "unknown"], status)
        assert [r.request_id for r in found] == [request_id]
        assert found[0].status is status

    @precondition(lambda self: self.scheduler.running)
    @rule(data=st.data(), num_drafts=st.integers(1, 3))
    def propose(self, data, num_drafts):
        """Speculation: drafts for a running request that has all its tokens computed but the
        last; the next step verifies them and rolls back the rejected ones."""
        candidates = [
            r for r in self.scheduler.running if r.num_computed_tokens == r.num_tokens - 1
        ]
        if not candidates:
            return
        request = data.draw(st.sampled_from(candidates))
        room = min(
            request.sampling_params.max_tokens - request.num_output_tokens - 1,
            self.max_model_len - request.num_tokens - 1,
        )
        num_drafts = min(num_drafts, room)
        # A draft model allocates the drafts' slots now (lookahead), between steps.
        if num_drafts > 0 and data.draw(st.booleans(), label="lookahead"):
            kv = self.scheduler.kv
            if not kv.allocate_slots(request, 0, num_lookahead_tokens=num_drafts):
                return
        request.spec_token_ids = [self.rng.randint(1, 3) for _ in range(num_drafts)]

    # ---- invariants ----------------------------------------------------------------------------

    def _run(self, output):
        """What the runner does with an output, checked against a from-scratch rebuild."""
        kv, table = self.scheduler.kv, self.runner_table
        for item in output.scheduled:
            ids = tuple(item.block_ids)
            assert ids == kv.block_ids(item.request.request_id), "the snapshot is not the table"
            assert 0 <= item.num_unchanged_blocks <= len(ids)
            self.snapshots.append((item.block_ids, ids))
        table.remove(output.finished_request_ids)
        table.remove(output.preempted_request_ids)
        written = table.num_ids_written
        old_rows = {
            i.request.request_id: table.block_ids(i.request.request_id) for i in output.scheduled
        }
        persistent = prepare_inputs(output.scheduled, self.block_size, "cpu", table)
        scratch = prepare_inputs(output.scheduled, self.block_size, "cpu")
        assert persistent.meta.block_table.equal(scratch.meta.block_table)
        assert persistent.meta.slot_mapping.equal(scratch.meta.slot_mapping)
        assert persistent.input_ids.equal(scratch.input_ids)
        for item in output.scheduled:
            assert table.block_ids(item.request.request_id) == list(item.block_ids)
        # Only what changed was written: ids past the unchanged ones, and padding where a row
        # got shorter (speculative blocks rolled back, a reset request back with fewer blocks).
        assert table.num_ids_written - written <= sum(
            len(i.block_ids)
            - i.num_unchanged_blocks
            + max(0, len(old_rows[i.request.request_id]) - len(i.block_ids))
            for i in output.scheduled
        )

    def _step(self):
        output = self.scheduler.schedule()
        self.last_output = output
        if output.scheduled:
            self._run(output)
        sampled = {}
        for s in output.scheduled:
            if s.sample:  # accept a random prefix of the drafts, then one token of our own
                accepted = list(s.spec_token_ids[: self.rng.randint(0, len(s.spec_token_ids))])
                tokens = [*accepted, self.rng.randint(1, 3)]
                sampled[s.request.request_id] = [SampledToken(t, 0.0) for t in tokens]
        self.scheduler.update_from_output(output, sampled)
        self.scheduler.commit_step()
        return output

    @invariant()
    def budgets_hold(self):
        if self.last_output is None:
            return
        assert self.last_output.num_batched_tokens <= self.config.max_num_batched_tokens
        assert len(self.last_output.scheduled) <= self.config.max_num_seqs
        assert len(self.scheduler.running) <= self.config.max_num_seqs

    @invariant()
    def ref_counts_equal_live_uses(self):
        kv = self.scheduler.kv
        uses = {b.block_id: 0 for b in kv.pool.blocks}
        for request in self.scheduler.requests.values():
            blocks = kv.blocks(request.request_id)
            assert len({b.block_id for b in blocks}) == len(blocks), "block listed twice"
            if request.status is not RequestStatus.RUNNING:
                assert not blocks, "a request that is not running holds blocks"
            for block in blocks:
                uses[block.block_id] += 1
            # the table covers the computed tokens, and holds no block for rejected drafts
            assert len(blocks) * kv.block_size >= request.num_computed_tokens
            if request.status is RequestStatus.RUNNING and not request.spec_token_ids:
                assert len(blocks) <= kv.num_blocks_for(request.num_tokens)
        for block in kv.pool.blocks:
            assert block.ref_cnt == uses[block.block_id]

    @invariant()
    def snapshots_never_change(self):
        for snapshot, ids in self.snapshots:
            assert tuple(snapshot) == ids and len(snapshot) == len(ids)

    @invariant()
    def runner_rows_only_for_live_or_pending_requests(self):
        """The runner's table drops a request's row once told it ended: no rows leak."""
        live = set(self.scheduler.requests) | set(self.scheduler.finished_ids)
        assert set(self.runner_table.request_ids) <= live

    @invariant()
    def free_plus_used_is_total(self):
        pool = self.scheduler.kv.pool
        queued = list(pool.free_queue)
        assert len(queued) == pool.num_free_blocks
        assert all(b.ref_cnt == 0 for b in queued)
        used = sum(1 for b in pool.blocks if b.ref_cnt > 0)
        assert len(queued) + used == pool.num_blocks

    @invariant()
    def cached_blocks_match_their_tokens(self):
        kv = self.scheduler.kv
        for block_hash, block in kv.pool.cached.items():
            assert block.block_hash == block_hash
            assert hash_block_tokens(block.parent_hash, block.token_ids, block.extra_keys) == (
                block_hash
            )
        # a live request's cached blocks hold exactly its tokens (no hit on the wrong tokens)
        bs = kv.block_size
        for request in self.scheduler.requests.values():
            for i, block in enumerate(kv.blocks(request.request_id)):
                if block.block_hash is not None:
                    expected = request.token_ids_range(i * bs, (i + 1) * bs)
                    assert list(block.token_ids) == expected
                    assert block.extra_keys == request.cache_extra_keys

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        # No request waits forever: every one finishes within a bound of steps.
        bound = 10 * (self.counter + 1) * self.max_model_len
        steps = 0
        while self.scheduler.has_unfinished_requests():
            self._step()
            self.ref_counts_equal_live_uses()
            self.free_plus_used_is_total()
            steps += 1
            assert steps <= bound, "a request never finished"
        pool = self.scheduler.kv.pool
        assert all(b.ref_cnt == 0 for b in pool.blocks)
        assert pool.num_free_blocks == pool.num_blocks
        assert self.scheduler.kv_cache_usage == 0.0


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_scheduler_state_machine = SchedulerMachine.TestCase
