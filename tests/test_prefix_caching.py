"""Exact behaviour of the block pool and prefix cache: which ids are reused, the free queue's
order after frees, what is evicted first."""

from __future__ import annotations

import pytest

from engine.config import CacheConfig, SchedulerConfig
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler.block_pool import BlockPool
from engine.scheduler.interface import SampledToken
from engine.scheduler.kv_cache_manager import KVCacheManager
from engine.scheduler.scheduler import DefaultScheduler

BS = 4


def make_request(request_id: str, prompt: list[int], salt: str | None = None, **params) -> Request:
    params.setdefault("max_tokens", 4)
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(ignore_eos=True, **params),
        eos_token_ids=(),
        max_model_len=128,
        sampling_seed=0,
        cache_salt=salt,
    )


def admit(kv: KVCacheManager, request: Request) -> list[int]:
    """Allocates the whole prompt as a scheduler would; returns the block ids."""
    hits = kv.get_computed_blocks(request)
    request.num_computed_tokens = len(hits) * BS
    assert kv.allocate_slots(request, request.num_tokens - request.num_computed_tokens, hits)
    return list(kv.block_ids(request.request_id))


def free_order(kv: KVCacheManager) -> list[int]:
    return [b.block_id for b in kv.pool.free_queue]


def test_shared_prefix_reuses_the_same_block_ids():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    a = make_request("a", list(range(1, 11)))  # 2 full blocks + 2 tokens
    b = make_request("b", [*list(range(1, 9)), 50, 51, 52])  # same first 2 blocks
    assert admit(kv, a) == [0, 1, 2]
    assert admit(kv, b) == [0, 1, 3]
    assert [blk.ref_cnt for blk in kv.pool.blocks[:4]] == [2, 2, 1, 1]
    assert kv.prefix_cache_queries == 10 + 11
    assert kv.prefix_cache_hits == 8


def test_hit_never_covers_the_last_token():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    admit(kv, make_request("a", list(range(1, 9))))  # exactly 2 blocks
    again = make_request("b", list(range(1, 9)))
    hits = kv.get_computed_blocks(again)
    assert [blk.block_id for blk in hits] == [0]  # the last token's logits must be computed


def test_free_queue_order_and_lru_eviction():
    kv = KVCacheManager(num_blocks=6, block_size=BS, enable_caching=True)
    a = make_request("a", list(range(1, 13)))  # 3 full blocks: 0, 1, 2
    b = make_request("b", list(range(20, 28)))  # 2 full blocks: 3, 4
    admit(kv, a)
    admit(kv, b)
    assert free_order(kv) == [5]
    kv.free(a)  # tail first
    assert free_order(kv) == [5, 2, 1, 0]
    kv.free(b)
    assert free_order(kv) == [5, 2, 1, 0, 4, 3]
    # a hit takes a cached block out of the middle of the queue
    c = make_request("c", [*list(range(20, 25)), 99])  # b's first block + more
    assert admit(kv, c) == [3, 5]  # hit 3, then the first free block (5, never cached)
    assert free_order(kv) == [2, 1, 0, 4]
    # the next allocation evicts the least recently freed cached block: a's last block
    d = make_request("d", [70, 71, 72, 73, 74])
    assert admit(kv, d) == [2, 1]
    # a's blocks 2 and 1 lost their content; block 2 now caches d's first block
    assert sorted(blk.block_id for blk in kv.pool.cached.values()) == [0, 2, 3, 4]
    e = make_request("e", list(range(1, 13)))
    assert [blk.block_id for blk in kv.get_computed_blocks(e)] == [0]  # block 1 is gone


def test_cache_salt_separates_entries():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    admit(kv, make_request("a", list(range(1, 10)), salt="alice"))
    assert kv.get_computed_blocks(make_request("b", list(range(1, 10)), salt="bob")) == []
    assert kv.get_computed_blocks(make_request("c", list(range(1, 10)))) == []
    assert len(kv.get_computed_blocks(make_request("d", list(range(1, 10)), salt="alice"))) == 2


def test_caching_off_gives_no_hits():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=False)
    admit(kv, make_request("a", list(range(1, 10))))
    assert kv.get_computed_blocks(make_request("b", list(range(1, 10)))) == []
    assert kv.pool.cached == {}


def test_double_free_is_an_error():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free(blocks[:1])


def scheduler(num_blocks=8, budget=8, max_num_seqs=4, chunked=True, caching=True):
    return DefaultScheduler(
        SchedulerConfig(
            scheduler="default",
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=64,
            enable_chunked_prefill=chunked,
        ),
        CacheConfig(
            block_size=BS,
            num_blocks=num_blocks,
            kv_cache_memory_bytes=0,
            enable_prefix_caching=caching,
        ),
    )


def step(s: DefaultScheduler, token: int = 7):
    out = s.schedule()
    sampled = {x.request.request_id: SampledToken(token, 0.0) for x in out.scheduled if x.sample}
    s.update_from_output(out, sampled)
    return out


def test_chunked_prefill_shares_steps_with_decodes():
    s = scheduler(num_blocks=16, budget=8)
    s.add_request(make_request("short", [1, 2, 3], max_tokens=10))
    s.add_request(make_request("long", list(range(10, 30)), max_tokens=2))
    out = step(s)
    assert [(x.request.request_id, x.num_new_tokens, x.sample) for x in out.scheduled] == [
        ("short", 3, True),
        ("long", 5, False),
    ]
    out = step(s)  # the decode goes first, the prompt continues with what is left
    assert [
        (x.request.request_id, x.num_computed_tokens, x.num_new_tokens) for x in out.scheduled
    ] == [
        ("short", 3, 1),
        ("long", 5, 7),
    ]


def test_without_chunking_a_prompt_waits_for_a_step_with_room():
    s = scheduler(num_blocks=16, budget=24, chunked=False)
    s.add_request(make_request("a", list(range(1, 21)), max_tokens=3))
    s.add_request(make_request("b", list(range(30, 50)), max_tokens=3))
    out = step(s)
    assert [x.request.request_id for x in out.scheduled] == ["a"]
    out = step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [
        ("a", 1),
        ("b", 20),
    ]


def test_preemption_takes_the_newest_and_requeues_it_first():
    s = scheduler(num_blocks=5, budget=64)
    for name, start in (("a", 1), ("b", 20)):
        s.add_request(make_request(name, list(range(start, start + 8)), max_tokens=8))
    step(s)  # a: blocks 2, b: 2 -> 1 free
    step(s)  # both grow into a 3rd block: only one fits
    assert [r.request_id for r in s.running] == ["a"]
    assert [r.request_id for r in s.waiting] == ["b"]
    assert s.requests["b"].status is RequestStatus.PREEMPTED
    assert s.requests["b"].num_computed_tokens == 0
    assert s.num_preemptions == 1


def test_n_samples_admitted_together_share_prompt_blocks():
    s = scheduler(num_blocks=16, budget=64)
    prompt = list(range(1, 11))
    for i in range(3):
        s.add_request(make_request(f"x#{i}", prompt, max_tokens=2))
    out = step(s)
    tables = [x.block_ids for x in out.scheduled]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]  # the 2 full prompt blocks
    assert len({t[2] for t in tables}) == 3  # each sample has its own partial block
    assert [x.num_computed_tokens for x in out.scheduled] == [0, 8, 8]


def test_abort_frees_at_once_and_keeps_the_cache():
    s = scheduler(num_blocks=8, budget=64)
    s.add_request(make_request("a", list(range(1, 10)), max_tokens=50))
    step(s)
    assert s.kv_cache_usage > 0
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert s.kv_cache_usage == 0.0 and not s.has_unfinished_requests()
    assert len(s.kv.pool.cached) == 2
