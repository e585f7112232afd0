"""Tensor parallelism (engine/distributed): TP=2 over two gloo processes equals TP=1.

Every comparison runs in float64 on the tiny random-weight checkpoints the other tests use:
greedy tokens identical, every logprob (sampled, top-k and prompt logprobs) within 1e-9, and a
seeded sampled request identical too. The scenarios cover each supported architecture (Llama
variants, Mistral, Qwen2/3, Gemma 2/3, Phi-3, Mixtral, Qwen2/3-MoE), one KV head over two
ranks (replicated) with a vocabulary that needs padding (1027 rows), chunked prefill, prefix
caching, preemption, speculative decoding (n-gram and a draft model), int8 / int4 / GGUF
quantized weights; then the failure paths: a worker killed mid-run makes the engine raise
within seconds, shutdown and garbage collection leave no child process, a bad size fails
cleanly, and the server with `-tp 2` answers.

Each TP=2 engine spawns a worker (a few seconds on the 2-core machines); the file takes about
two to three minutes there.
"""

from __future__ import annotations

import gc
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from engine import LLM, SamplingParams
from engine.distributed.executor import TensorParallelError
from tests.family_checkpoints import FAMILY_VARIANTS, family_checkpoint
from tests.greedy_compare import assert_same_greedy_tokens

ROOT = Path(__file__).resolve().parents[1]
LOGPROB_TOL = 1e-9
PROMPT_LENGTHS = [1, 5, 9, 17, 30]
COMMON = {"dtype": "float64", "block_size": 4, "seed": 0}


def children() -> list[psutil.Process]:
    """This process's live children, but multiprocessing's resource tracker and fork server
    (one each per parent process, living as long as the parent, by design)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(p.cmdline())  # (a worker forked by the fork server has its cmdline)
            helper = p.ppid() == os.getpid() and (
                "resource_tracker" in cmdline or "forkserver" in cmdline
            )
            if p.status() != psutil.STATUS_ZOMBIE and not helper:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def child_pids() -> set[int]:
    """Taken before a test starts engines: processes other tests' fixtures keep (a server's
    helper, a Ray cluster) are not this test's to account for."""
    return {p.pid for p in children()}


def new_children(before: set[int]) -> list[psutil.Process]:
    return [p for p in children() if p.pid not in before]


def wait_no_new_children(before: set[int], timeout: float = 10.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := new_children(before)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def prompts_for(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def params_for(max_tokens: int = 10) -> list[SamplingParams]:
    """Greedy with top-2 logprobs and prompt logprobs, and one seeded sampled request."""
    common = {"max_tokens": max_tokens, "ignore_eos": True}
    greedy = SamplingParams(temperature=0.0, logprobs=2, prompt_logprobs=1, **common)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=7, logprobs=1, **common)
    return [greedy, sampled]


def generate(path: Path | str, prompts, tp: int, max_tokens: int = 10, check=None, **kwargs):
    """(outputs of each SamplingParams in params_for, engine stats) of one engine, shut down;
    `check(engine)` runs first."""
    llm = LLM(str(path), tensor_parallel_size=tp, **{**COMMON, **kwargs})
    try:
        assert len(llm.llm_engine.model.layers) > 0
        if check is not None:
            check(llm.llm_engine)
        outputs = [llm.generate(prompts, p, use_tqdm=False) for p in params_for(max_tokens)]
        return outputs, llm.llm_engine.get_stats()
    finally:
        llm.llm_engine.shutdown()


def assert_same_outputs(ours, theirs) -> None:
    for batch_a, batch_b in zip(ours, theirs, strict=True):
        for a, b in zip(batch_a, batch_b, strict=True):
            ca, cb = a.outputs[0], b.outputs[0]
            assert ca.token_ids == cb.token_ids
            assert abs(ca.cumulative_logprob - cb.cumulative_logprob) < LOGPROB_TOL
            for entry_a, entry_b in zip(ca.logprobs, cb.logprobs, strict=True):
                assert entry_a.keys() == entry_b.keys()
                for token in entry_a:
                    assert abs(entry_a[token].logprob - entry_b[token].logprob) < LOGPROB_TOL
            if a.prompt_logprobs is not None:
                for entry_a, entry_b in zip(a.prompt_logprobs, b.prompt_logprobs, strict=True):
                    if entry_a is None:
                        assert entry_b is None
                        continue
                    for token in entry_a:
                        assert abs(entry_a[token].logprob - entry_b[token].logprob) < LOGPROB_TOL


def compare(path, prompts, check=None, tp: int = 2, **kwargs):
    """TP=`tp` against TP=1 with the same arguments; returns both engines' stats.
    `check(engine)` runs on the TP=`tp` engine."""
    before = child_pids()
    ours, ours_stats = generate(path, prompts, tp, check=check, **kwargs)
    theirs, theirs_stats = generate(path, prompts, 1, **kwargs)
    assert_same_outputs(ours, theirs)
    assert not wait_no_new_children(before), "a worker outlived its engine"
    return ours_stats, theirs_stats


@pytest.fixture(scope="module")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tp-families")


LLAMA_VARIANTS = ["llama", "llama3-rope-tied", "mistral-sliding", "qwen2", "qwen3"]


@pytest.mark.parametrize("key", LLAMA_VARIANTS)
def test_llama_families_tp2_equal_tp1(checkpoints, key):
    path = checkpoints.variant(key)
    compare(path, prompts_for(1024), kv_cache_memory_bytes=2**22)


@pytest.mark.parametrize("key", list(FAMILY_VARIANTS))
def test_other_families_tp2_equal_tp1(family_root, tokenizer, key):
    path = family_checkpoint(family_root, key, tokenizer)
    kwargs = {"max_model_len": 32} if key.startswith("phi3") else {}
    lengths = [1, 4, 8, 2, 6] if key.startswith("phi3") else PROMPT_LENGTHS
    compare(path, prompts_for(1024, lengths), kv_cache_memory_bytes=2**22, **kwargs)


def test_reference_engine_and_four_ranks(checkpoints):
    """The reference path (reference scheduler and attention) sharded over 2 ranks, and the
    fast path over 4 ranks (3 workers; 2 KV heads each replicated on 2 ranks; 4 vocabulary
    pieces gathered), both equal to TP=1."""
    path = checkpoints.variant("llama")
    prompts = prompts_for(1024)[:3]
    compare(path, prompts, scheduler="reference", attention_backend="reference")

    def check(engine) -> None:
        assert len(engine.executor.processes) == 3
        attn = engine.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (1, 1)

    compare(path, prompts, check=check, tp=4, kv_cache_memory_bytes=2**22)


@pytest.fixture(scope="module")
def one_kv_head_path(checkpoints):
    """One KV head (replicated on both ranks), a vocabulary of 1027 (padded to 1028), and
    biases on every projection (row-parallel o_proj / down_proj add theirs once)."""
    return checkpoints(
        "tp-1kv-oddvocab",
        num_key_value_heads=1,
        vocab_size=1027,
        attention_bias=True,
        mlp_bias=True,
    )


def test_one_kv_head_chunked_prefill_prefix_caching_preemption(one_kv_head_path):
    """Shared prefixes (prefix-cache hits), 8-token steps (chunked prefill) and 14 blocks of 4
    tokens for 6 requests (preemption), identical on both sizes; the TP=2 engine really holds
    one KV head per rank and pads the vocabulary."""
    rng = random.Random(1)
    prefix = [rng.randrange(3, 1027) for _ in range(9)]
    prompts = [prefix + [rng.randrange(3, 1027) for _ in range(n)] for n in (1, 3, 6, 2, 11, 4)]
    kwargs = {"num_gpu_blocks_override": 14, "max_num_batched_tokens": 8, "max_num_seqs": 4}
    ours, theirs = compare(one_kv_head_path, prompts, **kwargs)
    for stats in (ours, theirs):
        assert stats.scheduler.num_preemptions_total > 0
        assert stats.scheduler.prefix_cache_hits_total > 0
    assert ours.scheduler.num_preemptions_total == theirs.scheduler.num_preemptions_total

    llm = LLM(str(one_kv_head_path), tensor_parallel_size=2, **COMMON, kv_cache_memory_bytes=2**20)
    try:
        engine = llm.llm_engine
        assert engine.runner.kv_caches[0].k.shape[2] == 1  # [blocks, block size, KV heads, D]
        attn = engine.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
        assert engine.model.embed_tokens.weight.shape[0] == 514  # 1028 / 2
        # The memory profile's dummy forward (scratch caches on every rank), then real steps.
        engine._dummy_forward()
        greedy = params_for(6)[0]
        ours = llm.generate(prompts[:3], greedy, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    theirs = LLM(str(one_kv_head_path), **COMMON).generate(prompts[:3], greedy, use_tqdm=False)
    assert_same_outputs([ours], [theirs])


def test_speculative_decoding_ngram_and_draft_model(checkpoints):
    """n-gram proposals and a draft model (unsharded, on rank 0) verified by the sharded target:
    the same tokens as TP=1 with the same speculation."""
    path = checkpoints.variant("llama")
    draft = path  # the target's own weights, unsharded on rank 0: greedy drafts get accepted
    rng = random.Random(2)
    motif = [rng.randrange(3, 1024) for _ in range(5)]
    prompts = [motif * 3, motif * 2 + [11, 12], [rng.randrange(3, 1024) for _ in range(7)]]
    for spec in (
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
        {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2},
    ):
        ours, theirs = compare(
            path, prompts, max_tokens=24, kv_cache_memory_bytes=2**22, speculative_config=spec
        )
        assert ours.spec_decode is not None and ours.spec_decode == theirs.spec_decode
        assert ours.spec_decode.num_drafts > 0  # the sharded target verified drafts
        if spec["method"] == "draft_model":  # its own weights: the drafts are kept
            assert ours.spec_decode.num_accepted_tokens > 0


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_tp2_equal_tp1(checkpoints, quantization):
    """Each rank quantizes its slice with TP=1's scales (int8: row maxima over both ranks;
    int4: groups inside a rank's columns); float64 dequantizes per call, so the weights must
    be identical for the logprobs to agree to 1e-9."""
    path = checkpoints.variant("llama")

    def check(engine) -> None:
        attn = engine.model.layers[0].self_attn
        assert attn.qkv_proj.method.name == attn.o_proj.method.name == quantization
        assert attn.o_proj.in_features == 32  # rank 0's half of the 64 inputs

    compare(
        path,
        prompts_for(1024),
        check=check,
        kv_cache_memory_bytes=2**22,
        quantization=quantization,
    )


def test_gguf_quantized_codes_tp2_equal_tp1(checkpoints, tmp_path):
    """GGUF 4-bit codes (Q4_0 / Q4_1, kept on the int4 path) and Q8_0 (int8) sliced per rank."""
    pytest.importorskip("gguf")
    from tests.gguf_factory import write_gguf

    src = checkpoints.variant("llama")
    types = {"q_proj": "Q4_0", "k_proj": "Q4_1", "v_proj": "Q4_0", "o_proj": "Q4_1"}

    def type_for(name: str) -> str:
        return next((t for key, t in types.items() if key in name), "Q8_0")

    path = write_gguf(src, tmp_path / "tp.gguf", type_for)

    def check(engine) -> None:
        layer = engine.model.layers[0]
        assert layer.self_attn.o_proj.method.name == "int4"  # the file's codes, sliced
        assert layer.mlp.down_proj.method.name == "int8"  # Q8_0, requantized per rank

    compare(path, prompts_for(1024)[:3], check=check, tokenizer=str(src), quantization="gguf")


def test_int4_group_that_does_not_divide_the_shard_is_a_clear_error(checkpoints):
    """o_proj's 64 inputs split in two are 32 per rank; groups of 64 would straddle the ranks."""
    from engine.quantization import selection

    path = checkpoints.variant("llama")
    before = child_pids()
    original = selection.Int4LinearMethod
    try:
        selection.Int4LinearMethod = lambda _g: original(64)  # type: ignore[assignment]
        with pytest.raises(Exception, match="not a multiple of the group size 64"):
            LLM(str(path), tensor_parallel_size=2, quantization="int4", **COMMON)
    finally:
        selection.Int4LinearMethod = original  # type: ignore[assignment]
    assert not wait_no_new_children(before)


def test_size_that_does_not_divide_the_heads_fails_cleanly(checkpoints):
    path = checkpoints.variant("llama")  # 4 query heads
    before = child_pids()
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 does not divide"):
        LLM(str(path), tensor_parallel_size=3, **COMMON)
    assert not wait_no_new_children(before)


def test_killed_worker_raises_within_seconds_and_nothing_is_left(checkpoints):
    path = checkpoints.variant("llama")
    before = child_pids()
    llm = LLM(str(path), tensor_parallel_size=2, **COMMON, kv_cache_memory_bytes=2**22)
    engine = llm.llm_engine
    (worker,) = engine.executor.processes
    assert [p.pid for p in new_children(before)] == [worker.pid]
    killed_at: list[float] = []

    def kill_soon() -> None:
        time.sleep(1.0)
        killed_at.append(time.monotonic())
        os.kill(worker.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) exited with code -9"):
        llm.generate([[5, 6, 7]] * 4, params, use_tqdm=False)
    raised_at = time.monotonic()
    killer.join()
    assert raised_at - killed_at[0] < 10
    # Every later step fails the same way, at once; the requests were aborted by generate.
    with pytest.raises(TensorParallelError):
        llm.generate([[5, 6]], params, use_tqdm=False)
    engine.shutdown()
    assert not wait_no_new_children(before)


def test_shutdown_and_garbage_collection_leave_no_process(checkpoints):
    path = checkpoints.variant("llama")
    before = child_pids()
    llm = LLM(str(path), tensor_parallel_size=2, **COMMON, kv_cache_memory_bytes=2**22)
    assert len(new_children(before)) == 1
    # Ctrl-C reaches the whole terminal's process group: the worker leaves it to rank 0.
    os.kill(llm.llm_engine.executor.processes[0].pid, signal.SIGINT)
    time.sleep(0.5)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    del llm, out
    gc.collect()  # the engine's finalizer stops its worker
    assert not wait_no_new_children(before)
    # ... and releases the process group: a new tensor-parallel engine can start here.
    llm = LLM(str(path), tensor_parallel_size=2, **COMMON, kv_cache_memory_bytes=2**22)
    llm.llm_engine.shutdown()
    llm.llm_engine.shutdown()  # idempotent
    assert not wait_no_new_children(before)


def start_until_serving(cmd: list[str]) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """Runs a server command (one torch thread per process) until its log says "Serving"
    (asserted within 180 s); returns the process, its stderr lines (kept growing by the
    returned reader thread) and that thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    serving = threading.Event()

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "Serving" in line:
                serving.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    if not serving.wait(180):
        stop_process(proc, reader)
        raise AssertionError("".join(lines))
    return proc, lines, reader


def stop_process(proc: subprocess.Popen, reader: threading.Thread) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    reader.join(5)


def assert_served_answer_equals_tp1(base_url: str, path: Path) -> None:
    """A greedy completion through the server equals TP=1's offline text."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
    prompt = [5, 6, 7, 8, 9]
    answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    llm = LLM(str(path), **COMMON)
    expected = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8))
    assert answer.choices[0].text == expected[0].outputs[0].text


def test_server_with_tp2_answers_a_completion(checkpoints):
    """`python -m engine.server -tp 2`: the greedy completion equals TP=1 offline; after SIGTERM
    the server and its worker are gone."""
    path = checkpoints.variant("llama")
    cmd = [
        sys.executable, "-m", "engine.server", "--model", str(path), "--port", "0", "-tp", "2",
        "--dtype", "float64", "--kv-cache-memory-bytes", "4MiB", "--served-model-name", "tiny",
        "--disable-access-log",
    ]  # fmt: skip
    proc, lines, reader = start_until_serving(cmd)
    try:
        url = re.search(r"on (http://127\.0\.0\.1:\d+)", "".join(lines))[1]
        server_children = psutil.Process(proc.pid).children(recursive=True)
        assert len(server_children) >= 1  # the rank-1 worker
        assert_served_answer_equals_tp1(url + "/v1", path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        _gone, alive = psutil.wait_procs(server_children, timeout=10)
        assert not alive, f"left behind: {alive}"
    finally:
        stop_process(proc, reader)


def test_torchrun_launch_two_ranks_on_one_machine(checkpoints):
    """The multi-node entry point, with both ranks on this machine: rank 0 serves, rank 1 runs
    the worker loop; the answer equals TP=1's; SIGTERM to torchrun leaves no rank behind."""
    path = checkpoints.variant("llama")
    from engine.server.thread import free_port

    port, master_port = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-port", str(master_port), "-m", "engine.distributed.launch",
        "--model", str(path), "-tp", "2", "--port", str(port), "--dtype", "float64",
        "--kv-cache-memory-bytes", "4MiB", "--served-model-name", "tiny", "--disable-access-log",
    ]  # fmt: skip
    proc, _lines, reader = start_until_serving(cmd)
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
        assert_served_answer_equals_tp1(f"http://127.0.0.1:{port}/v1", path)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        _gone, alive = psutil.wait_procs(ranks, timeout=15)
        assert not alive, f"left behind: {alive}"
    finally:
        stop_process(proc, reader)


def test_worker_exits_when_rank0_is_killed(checkpoints, tmp_path):
    """SIGKILL to the engine's process (no atexit, no shutdown): its worker notices and exits
    within seconds instead of lingering as an orphan."""
    path = checkpoints.variant("llama")
    script = tmp_path / "rank0.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from engine import LLM\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({str(path)!r}, tensor_parallel_size=2, dtype='float64',\n"
        "              kv_cache_memory_bytes=2**22)\n"
        "    print('READY', flush=True)\n"
        "    time.sleep(300)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert proc.stdout.readline().strip() == b"READY"
        workers = psutil.Process(proc.pid).children(recursive=True)  # + fork server, tracker
        assert len(workers) >= 1
        proc.kill()
        proc.wait(10)
        killed_at = time.monotonic()
        _gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"outlived their engine's process: {alive}"
        assert time.monotonic() - killed_at < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("quantization", "tolerance"), [(None, 1e-4), ("int8", 0.2), ("int4", 0.2)]
)
def test_float32_fast_kernels_close_to_tp1(checkpoints, quantization, tolerance):
    """float32 runs the CPU kernels (oneDNN-packed float32, int8 / int4 with bfloat16
    activations) on each rank's slice; a row-parallel layer then rounds two partial sums
    instead of one, so the rule is the suite's float32 one: identical tokens up to a first
    divergence, if any, where each side's token is in the other's top 5 with a small logprob
    gap, and logprobs within `tolerance` before it. Quantized: the int8 kernels quantize
    activations per row of each rank's input slice and both round partial sums to bfloat16;
    measured here, TP=2 moves logprobs by up to 0.1 where quantization itself moves them by
    0.45 (int8) and 0.79 (int4) from float32's (the float64 tests prove the weights equal)."""
    path = checkpoints.variant("llama")
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=5, ignore_eos=True)
    prompts = prompts_for(1024)
    runs = []
    for tp in (2, 1):
        llm = LLM(
            str(path),
            tensor_parallel_size=tp,
            dtype="float32",
            quantization=quantization,
            kv_cache_memory_bytes=2**22,
        )
        try:
            runs.append([o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)])
        finally:
            llm.llm_engine.shutdown()
    for ours, theirs in zip(*runs, strict=True):
        assert_same_greedy_tokens(ours, theirs, tolerance, tie_tol=10 * tolerance)


def test_worker_exception_reports_its_traceback(checkpoints):
    """A worker that raises (here: a message it does not know) leaves its traceback in the
    rendezvous store and exits; rank 0's next step raises with that traceback in the error."""
    path = checkpoints.variant("llama")
    before = child_pids()
    llm = LLM(str(path), tensor_parallel_size=2, **COMMON, kv_cache_memory_bytes=2**22)
    try:
        llm.llm_engine.executor.run("no-such-message", None, lambda: None)
        with pytest.raises(TensorParallelError, match="unknown step message 'no-such-message'"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    assert not wait_no_new_children(before)


def test_tp1_has_no_proxy_no_group_and_no_collective(checkpoints):
    """tensor_parallel_size 1 runs as before: the model itself (no proxy), no executor, no
    process group, every layer on the trivial group."""
    import torch.distributed as dist

    from engine.distributed.executor import TensorParallelModel
    from engine.models.layers import Linear

    before = child_pids()
    llm = LLM(str(checkpoints.variant("llama")), **COMMON, kv_cache_memory_bytes=2**22)
    engine = llm.llm_engine
    assert engine.executor is None and not isinstance(engine.model, TensorParallelModel)
    assert not dist.is_initialized()
    linears = [m for m in engine.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.parallel is None and not m.tp.is_parallel for m in linears)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not new_children(before)
