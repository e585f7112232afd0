"""Rank 0's side of tensor parallelism: the workers, the model proxy, failures and shutdown.

`TensorParallelExecutor.create(args, device)` either
  * starts ranks 1 .. n-1 on this machine (daemon processes from multiprocessing's forkserver
    on CPU, spawn on CUDA or with ENGINE_TP_START_METHOD=spawn), with a TCPStore rendezvous on
    127.0.0.1 (a port the OS picks), and joins them in a process group (gloo on CPU, NCCL on
    CUDA); or
  * when torch.distributed is already initialized by `engine.distributed.launch` (torchrun:
    RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, other ranks running the worker loop on
    their machines), takes that group.

The engine loads rank 0's shard inside `model_parallel(executor.tp)` and wraps it in
`TensorParallelModel`, which has the model's interface (`model(input_ids, positions, kv_caches,
meta)`, `compute_logits(hidden)`), so the runner, the sampler, the scheduler and the dummy
forward of the memory profile run on rank 0 unchanged: each call first broadcasts its inputs,
then runs rank 0's shard, whose collectives the workers join with theirs.

Failures: before every call the executor checks its workers' exit codes (a cheap waitpid); a
collective that fails (gloo reports a closed peer within about a second) or any exception in a
call marks the executor failed: rank 0 and the workers can no longer agree on the next
collective, so every later call raises the same RuntimeError naming the dead rank, its exit
code and its traceback when it left one. `shutdown()` (idempotent; also run when the engine is
collected and at interpreter exit) tells the workers to stop, joins them, terminates any that
linger, and destroys the process group: no process is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from engine.config import EngineArgs
from engine.distributed.communication import send_step
from engine.distributed.parallel_state import (
    TPGroup,
    collective_timeout,
    destroy_groups,
    init_groups,
)
from engine.distributed.worker import ERROR_KEY, READY_KEY, spawned_worker_main

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The group `engine.distributed.launch` created for rank 0 (torchrun); see `create`.
_launched: TPGroup | None = None
# Executors not yet shut down (launch stops them when its server returns).
_live: weakref.WeakSet[TensorParallelExecutor] = weakref.WeakSet()


def shutdown_all() -> None:
    for executor in list(_live):
        executor.shutdown()


def set_launched_group(tp: TPGroup | None) -> None:
    global _launched
    _launched = tp


# Modules a forkserver imports once, so that each worker forks with them loaded.
_PRELOAD = ["engine.distributed.worker", "engine.models.loader", "engine.fast.registry"]


def _start_context(device: torch.device) -> Any:
    """How workers start: ENGINE_TP_START_METHOD, by default on CPU forkserver where the
    platform has it (a clean single-threaded server process started once per engine process,
    with the engine imported: a worker then starts in about a second instead of re-importing
    torch and transformers, 5-15 s on the 2-core machines), else spawn; on CUDA spawn (a fork
    server that touched the CUDA driver while importing could not hand it to its children).
    Never fork: the engine process has threads (OpenMP, the server's loop)."""
    has_forkserver = "forkserver" in multiprocessing.get_all_start_methods()
    default = "forkserver" if has_forkserver and device.type == "cpu" else "spawn"
    method = os.environ.get("ENGINE_TP_START_METHOD", default)
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"ENGINE_TP_START_METHOD must be forkserver or spawn, got {method!r}")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank failed; the engine cannot run another step."""


class TensorParallelExecutor:
    def __init__(
        self,
        tp: TPGroup,
        processes: list[Any],
        store: Any = None,
        owns_group: bool = True,
    ) -> None:
        self.tp = tp
        self.processes = processes
        self.store = store
        self.owns_group = owns_group
        self.failure: str | None = None
        self.closed = False
        _live.add(self)

    # ---- start-up ----------------------------------------------------------------------------

    @classmethod
    def create(cls, args: EngineArgs, device: torch.device) -> TensorParallelExecutor:
        size = args.tensor_parallel_size
        if _launched is not None:
            if _launched.size != size:
                raise ValueError(
                    f"tensor_parallel_size ({size}) differs from the launched world size "
                    f"({_launched.size})"
                )
            return cls(_launched, [], owns_group=False)
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(
                f"tensor_parallel_size {size} needs {size} CUDA devices; "
                f"{torch.cuda.device_count()} visible"
            )
        return cls._spawn(args, size, device)

    @classmethod
    def _spawn(cls, args: EngineArgs, size: int, device: torch.device) -> TensorParallelExecutor:
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError(
                "tensor_parallel_size: this process already holds a torch.distributed process "
                "group (one tensor-parallel engine per process; shut the other one down first)"
            )
        addr = "127.0.0.1"
        store = dist.TCPStore(  # port 0: the OS picks a free one, no race with other processes
            addr, 0, size, is_master=True, wait_for_workers=False, timeout=collective_timeout()
        )
        port = store.port
        # Workers need only what loads the model: logits processors stay on rank 0.
        worker_args = args.replace(logits_processors=None, speculative_config=None)
        ctx = _start_context(device)
        processes = []
        executor = cls(TPGroup(0, size), processes, store)
        try:
            for rank in range(1, size):
                threads = torch.get_num_threads()
                process = ctx.Process(
                    target=spawned_worker_main,
                    args=(rank, size, addr, port, worker_args, threads, os.getpid()),
                    name=f"engine-tp-rank{rank}",
                    daemon=True,
                )
                process.start()
                processes.append(process)
            executor._wait_for_workers()
            executor.tp = init_groups(0, size, device, store=store)
        except BaseException:
            executor.shutdown()
            raise
        logger.info(
            "tensor parallelism: %d ranks (%s), workers pid %s",
            size,
            dist.get_backend(),
            ", ".join(str(p.pid) for p in processes),
        )
        return executor

    def _wait_for_workers(self) -> None:
        """Until every spawned worker has reached the rendezvous; raises if one dies first."""
        deadline = time.monotonic() + collective_timeout().total_seconds() + 300
        keys = [READY_KEY.format(rank=rank) for rank in range(1, self.tp.size)]
        while not self.store.check(keys):
            self.check_workers()
            if time.monotonic() > deadline:
                raise TensorParallelError("tensor-parallel workers did not start in time")
            time.sleep(0.05)

    # ---- failures ----------------------------------------------------------------------------

    def _dead_worker(self) -> str | None:
        for rank, process in enumerate(self.processes, start=1):
            if process.exitcode is not None:
                message = f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with "
                message += f"code {process.exitcode}"
                trace = self._worker_traceback(rank)
                return message + (f"; its traceback:\n{trace}" if trace else "")
        return None

    def _worker_traceback(self, rank: int) -> str | None:
        if self.store is None:
            return None
        key = ERROR_KEY.format(rank=rank)
        with contextlib.suppress(Exception):
            if self.store.check([key]):
                return self.store.get(key).decode(errors="replace")
        return None

    def check_workers(self) -> None:
        """Raises TensorParallelError when a call failed before or a worker has exited."""
        if self.failure is not None:
            raise TensorParallelError(self.failure)
        if self.closed:
            raise TensorParallelError("the tensor-parallel executor is shut down")
        dead = self._dead_worker()
        if dead is not None:
            self._fail(dead)
            raise TensorParallelError(dead)

    def _fail(self, message: str) -> None:
        self.failure = message + " (the engine cannot run another step; restart it)"
        logger.error("%s", self.failure)
        for process in self.processes:  # the survivors cannot resynchronise: stop them
            if process.exitcode is None:
                process.kill()

    def run(self, kind: str, payload: Any, local: Callable[[], T]) -> T:
        """Broadcasts one call to the workers, then runs rank 0's part of it."""
        self.check_workers()
        try:
            send_step(self.tp, kind, payload)
            return local()
        except BaseException as e:
            # Which rank went? A dead peer's exit code shows within moments of the error.
            deadline = time.monotonic() + 2.0
            dead = self._dead_worker()
            while dead is None and self.processes and time.monotonic() < deadline:
                time.sleep(0.05)
                dead = self._dead_worker()
            message = dead or f"tensor-parallel step failed on rank 0: {type(e).__name__}: {e}"
            self._fail(message)
            raise TensorParallelError(self.failure) from e

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        self.run("init_cache", (num_blocks, block_size), lambda: None)

    def time_all_reduce(
        self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, repeats: int = 100
    ) -> float:
        """Seconds per all-reduce of a `shape` tensor over the group, every rank taking part
        (what each row-parallel layer and the embedding pay per step)."""
        from engine.distributed.worker import time_all_reduce

        return self.run(
            "time_all_reduce",
            (tuple(shape), dtype, repeats),
            lambda: time_all_reduce(self.tp, tuple(shape), dtype, repeats),
        )

    # ---- shutdown ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stops the workers and releases the process group; safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        if self.failure is None and self.tp.group is not None:
            with contextlib.suppress(Exception):
                send_step(self.tp, "stop")
        for process in self.processes:
            process.join(timeout=10 if self.failure is None else 1)
            if process.exitcode is None:
                process.terminate()
                process.join(timeout=2)
            if process.exitcode is None:
                process.kill()
                process.join(timeout=2)
        if self.owns_group:
            destroy_groups()
        self.store = None


class TensorParallelModel:
    """Rank 0's model: the shard's interface, each call broadcast to the workers first.

    `kv_caches` is rank 0's paged cache (set by the engine); a forward over any other cache (the
    memory profile's scratch) asks the workers for a scratch cache of the same shape. Other
    attributes are the shard's (its layers, its config), for logging and tools.
    """

    def __init__(self, shard: torch.nn.Module, executor: TensorParallelExecutor) -> None:
        self.shard = shard
        self.executor = executor
        self.kv_caches: list[Any] | None = None

    def __call__(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[Any],
        meta: Any,
    ) -> torch.Tensor:  # [T, H]
        cache = None  # the workers' own caches, unless this is another (scratch) cache
        own = self.kv_caches
        if own is None or kv_caches[0].k is not own[0].k:
            cache = (kv_caches[0].k.shape[0], kv_caches[0].k.shape[1])
        return self.executor.run(
            "forward",
            (input_ids, positions, meta, cache),
            lambda: self.shard(input_ids, positions, kv_caches, meta),
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V]
        return self.executor.run("logits", hidden, lambda: self.shard.compute_logits(hidden))

    def __getattr__(self, name: str) -> Any:
        if name in ("shard", "executor", "kv_caches"):
            raise AttributeError(name)
        return getattr(self.shard, name)
