"""Persistent block tables (engine/scheduler/block_ids.py, engine/block_table.py) against a
from-scratch rebuild, under random sequences of what happens to a request's blocks: allocation
(with prefix-cache hits), lookahead slots for drafts, rollback of rejected draft blocks, freeing
(finish, abort, preemption), and steps that hand the tables to the runner.

After every step the runner's rows equal the KV cache manager's tables, followed by padding 0,
and the step's gathered [B, M] table equals the one built from the lists; every snapshot ever
handed out still holds the ids it held then; and the runner wrote only the ids that changed.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.attention import build_block_table
from engine.block_table import PersistentBlockTable
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler.kv_cache_manager import KVCacheManager

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 7, 7], [5, 5, 5, 5, 5]]


class BlockTableMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_blocks=st.integers(4, 40),
        caching=st.booleans(),
    )
    def setup(self, block_size, num_blocks, caching):
        self.kv = KVCacheManager(num_blocks, block_size, caching)
        self.runner = PersistentBlockTable(num_rows=1, num_cols=2)  # grows as needed
        self.live: dict[str, Request] = {}  # requests holding blocks
        self.ended: list[str] = []  # freed since the last step (the runner drops their rows)
        self.snapshots: list[tuple[object, tuple[int, ...]]] = []
        self.counter = 0

    @rule(prompt=st.sampled_from(PROMPTS), extra=st.integers(0, 3))
    def admit(self, prompt, extra):
        """A new request takes its cached prefix and blocks for its prompt (+ extra tokens)."""
        request = Request(
            request_id=f"r{self.counter % 5}",  # ids come back after their request ended
            prompt_token_ids=list(prompt),
            sampling_params=SamplingParams(max_tokens=50, ignore_eos=True),
            eos_token_ids=(),
            max_model_len=100,
            sampling_seed=0,
        )
        if request.request_id in self.live:
            return
        self.counter += 1
        hits = self.kv.get_computed_blocks(request)
        request.num_computed_tokens = len(hits) * self.kv.block_size
        new = request.num_tokens - request.num_computed_tokens + extra
        if self.kv.allocate_slots(request, new, hits):
            self.live[request.request_id] = request
        else:
            request.num_computed_tokens = 0

    @precondition(lambda self: self.live)
    @rule(data=st.data(), num_tokens=st.integers(1, 6), lookahead=st.integers(0, 3))
    def grow(self, data, num_tokens, lookahead):
        """Decode / chunk steps: more tokens (and maybe lookahead slots for drafts)."""
        request = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        request.output_token_ids += [7] * num_tokens
        self.kv.allocate_slots(
            request, request.num_tokens - request.num_computed_tokens, None, lookahead
        )
        request.num_computed_tokens = min(request.num_tokens, request.num_computed_tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), keep=st.integers(0, 8))
    def reject_drafts(self, data, keep):
        """Rejected drafts: the blocks past what the kept tokens need are freed."""
        request = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        num_tokens = max(request.num_computed_tokens, request.num_tokens - keep)
        self.kv.trim(request, num_tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def end(self, data):
        """Finished, aborted or preempted: every block goes (a preempted request comes back as
        a new admission of the same id)."""
        request = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.kv.free(request)
        self.ended.append(request.request_id)

    @rule(data=st.data())
    def step(self, data):
        """A scheduled step over some live requests, through the runner's persistent table."""
        ids = data.draw(st.lists(st.sampled_from(sorted(self.live) or ["none"]), unique=True))
        ids = [i for i in ids if i in self.live]
        tables = [(i, *self.kv.ids_for_step(i)) for i in ids]
        for _, snapshot, num_unchanged in tables:
            self.snapshots.append((snapshot, tuple(snapshot)))
            assert 0 <= num_unchanged <= len(snapshot)
        self.runner.remove(self.ended)
        self.ended = []
        before = {i: self.runner.block_ids(i) for i in ids}
        written = self.runner.num_ids_written
        rows = self.runner.update(tables)
        gathered = self.runner.gather(rows)
        assert gathered.equal(build_block_table([s for _, s, _ in tables]))
        # Writes: the ids past the unchanged ones, and zeros where a row got shorter.
        assert self.runner.num_ids_written - written <= sum(
            len(s) - u + max(0, len(before[i]) - len(s)) for i, s, u in tables
        )

    @invariant()
    def runner_rows_equal_the_manager_tables_after_each_step(self):
        if not hasattr(self, "kv"):
            return
        table = self.runner.table
        for request_id in self.runner.request_ids:
            row = self.runner.row_of(request_id)
            held = self.runner.block_ids(request_id)
            assert not table[row, len(held) :].any(), "padding is not 0"
        # Free rows are all 0.
        used = {self.runner.row_of(i) for i in self.runner.request_ids}
        for row in range(table.shape[0]):
            if row not in used:
                assert not table[row].any()

    @invariant()
    def snapshots_never_change(self):
        if not hasattr(self, "kv"):
            return
        for snapshot, ids in self.snapshots:
            assert tuple(snapshot) == ids
            assert [snapshot[i] for i in range(len(ids))] == list(ids)
            assert snapshot[1:] == ids[1:] and snapshot == ids

    @invariant()
    def manager_ids_match_its_blocks(self):
        if not hasattr(self, "kv"):
            return
        for request_id in self.live:
            blocks = self.kv.blocks(request_id)
            assert self.kv.block_ids(request_id) == tuple(b.block_id for b in blocks)


BlockTableMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_block_table_machine = BlockTableMachine.TestCase
