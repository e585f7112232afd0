"""A worker rank (1 .. n-1): loads its shard of the model, then runs the steps rank 0 sends.

Messages (communication.send_step / recv_step), in the order rank 0's model proxy sends them:

    ("forward", (input_ids [T], positions [T], meta, cache))   the shard's forward; `cache` None
                       means the rank's own paged KV cache, (num_blocks, block_size) a scratch
                       cache of that shape (the memory profile's dummy run)
    ("logits", hidden [N, H])   the shard's LM head rows, gathered on rank 0
    ("init_cache", (num_blocks, block_size))   allocates the rank's KV cache: rank 0's block
                       count, this rank's KV heads
    ("time_all_reduce", (shape, dtype, repeats))   times all-reduces with rank 0 (benchmarks)
    ("stop", None)     returns

A worker that fails writes its traceback to the rendezvous store (`engine_tp_error/<rank>`,
workers the engine started) and exits, which breaks rank 0's next collective: rank 0 raises a
clear error instead of waiting. A worker whose rank 0 is gone exits too (its wait for the next
message fails when the connection closes; workers the engine started also poll its pid).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import traceback
from typing import Any

import torch

from engine.config import CacheConfig, EngineArgs, ModelConfig, resolve_device
from engine.distributed.communication import recv_step
from engine.distributed.parallel_state import (
    TPGroup,
    collective_timeout,
    destroy_groups,
    init_groups,
    model_parallel,
)

logger = logging.getLogger(__name__)

ERROR_KEY = "engine_tp_error/{rank}"
READY_KEY = "engine_tp_ready/{rank}"


def rank_device(args: EngineArgs, local_rank: int) -> EngineArgs:
    """The args of a rank: on CUDA each rank takes the device of its local rank."""
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        return args.replace(device=f"cuda:{local_rank}")
    return args


def load_shard(args: EngineArgs, tp: TPGroup) -> tuple[ModelConfig, torch.nn.Module]:
    """This rank's model config and its shard of the model (every rank calls this)."""
    from engine.fast.registry import get_attention_backend
    from engine.models.loader import load_model

    model_config = args.create_model_config()
    backend = get_attention_backend(
        args.attention_backend,
        model_config.device,
        needs_softcap=getattr(model_config.hf_config, "attn_logit_softcapping", None) is not None,
    )
    with model_parallel(tp):
        model = load_model(model_config, backend)
    return model_config, model


def run_worker(args: EngineArgs, tp: TPGroup) -> None:
    """The worker loop (ranks 1 .. n-1), until rank 0 says stop."""
    from engine.kv_cache import allocate_kv_cache

    model_config, model = load_shard(args, tp)
    kv_caches: Any = None
    with torch.inference_mode():
        while True:
            kind, payload = recv_step(tp)
            if kind == "forward":
                input_ids, positions, meta, cache = payload
                if cache is None:
                    if kv_caches is None:
                        raise RuntimeError("forward before init_cache")
                    caches = kv_caches
                else:  # the profile's scratch cache
                    num_blocks, block_size = cache
                    caches = allocate_kv_cache(
                        model_config, CacheConfig(block_size, num_blocks, kv_cache_memory_bytes=0)
                    )
                model(input_ids, positions, caches, meta)
            elif kind == "logits":
                model.compute_logits(payload)
            elif kind == "init_cache":
                num_blocks, block_size = payload
                kv_caches = allocate_kv_cache(
                    model_config, CacheConfig(block_size, num_blocks, kv_cache_memory_bytes=0)
                )
            elif kind == "time_all_reduce":
                time_all_reduce(tp, *payload)
            elif kind == "stop":
                return
            else:
                raise RuntimeError(f"unknown step message {kind!r}")


def time_all_reduce(tp: TPGroup, shape: tuple[int, ...], dtype: torch.dtype, repeats: int) -> float:
    """Seconds per all-reduce of a tensor of `shape` (every rank runs this in step; the
    benchmark's measure of what one row-parallel layer's communication costs)."""
    from engine.distributed.communication import all_reduce

    x = torch.zeros(shape, dtype=dtype, device=tp.device)
    all_reduce(x, tp)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        all_reduce(x, tp)
    return (time.perf_counter() - start) / repeats


def _watch_engine_process(engine_pid: int) -> None:
    """Exits this process when rank 0's process is gone (it may not be the parent: with the
    forkserver start method, the parent is the fork server)."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(engine_pid, 0)
            except ProcessLookupError:
                os._exit(3)
            except PermissionError:  # the pid was reused by another user's process
                os._exit(3)

    threading.Thread(target=watch, name="engine-tp-parent-watch", daemon=True).start()


def spawned_worker_main(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    args: EngineArgs,
    num_threads: int,
    parent_pid: int,
) -> None:
    """Entry point of a worker the executor spawned on this machine."""
    import torch.distributed as dist

    _watch_engine_process(parent_pid)
    # Ctrl-C in a terminal reaches every process of the foreground group: rank 0 decides what
    # it means (the server drains its requests first) and stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(num_threads)
    logging.basicConfig(level=logging.WARNING)
    store = dist.TCPStore(
        master_addr, master_port, world_size, is_master=False, timeout=collective_timeout()
    )
    code = 0
    try:
        store.set(READY_KEY.format(rank=rank), str(os.getpid()))
        args = rank_device(args, rank)
        tp = init_groups(rank, world_size, resolve_device(args.device), store=store)
        run_worker(args, tp)
    except BaseException:
        code = 1
        with contextlib.suppress(Exception):
            store.set(ERROR_KEY.format(rank=rank), traceback.format_exc())
    finally:
        if code == 0:
            destroy_groups()
        os._exit(code)  # no interpreter teardown under live gloo threads
