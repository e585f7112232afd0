"""The tensor-parallel group a model is built for, and the process groups behind it.

A model's layers read the group once, at construction (`current_tp()`), inside
`model_parallel(tp)`; outside that block the group is the trivial one (rank 0 of 1), so a
model built without it (TP=1, a draft model) has no collective anywhere and runs exactly as
before. The group is stored on the layers, never looked up per call: a test process may hold a
TP=1 engine next to rank 0 of a TP=2 engine.

Process groups: `world` is torch.distributed's default group (every rank; the TP group itself,
as the engine has no pipeline or data parallelism), with backend gloo on CPU and NCCL on CUDA
and a timeout of `ENGINE_TP_TIMEOUT_S` seconds (default 120) for the collectives of a step;
`control` is a gloo group with a long timeout over which rank 0 broadcasts each step's header,
so that an idle worker may wait for the next step for days. One process holds at most one
default group: one tensor-parallel engine per process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_TIMEOUT_S = 120.0
# The control group's timeout: how long an idle worker waits for the next step.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


def collective_timeout() -> datetime.timedelta:
    seconds = float(os.environ.get("ENGINE_TP_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    return datetime.timedelta(seconds=seconds)


@dataclass(frozen=True)
class TPGroup:
    """A rank of a tensor-parallel group. `group` is None for the trivial group (size 1)."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup of the TP ranks (compute collectives)
    control: Any = None  # gloo ProcessGroup with a long timeout (step headers)
    device: torch.device | None = None

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and gathers the logits."""
        return self.rank == 0


TRIVIAL = TPGroup()
_current: TPGroup = TRIVIAL


def current_tp() -> TPGroup:
    """The group the model under construction is sharded over (TRIVIAL outside
    `model_parallel`)."""
    return _current


@contextlib.contextmanager
def model_parallel(tp: TPGroup) -> Iterator[TPGroup]:
    """Layers built inside this block shard themselves over `tp`."""
    global _current
    previous, _current = _current, tp
    try:
        yield tp
    finally:
        _current = previous


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_groups(
    rank: int,
    world_size: int,
    device: torch.device,
    store: Any = None,
    init_method: str | None = None,
) -> TPGroup:
    """Joins the default process group (from a TCPStore, or `init_method`, e.g. "env://")
    and creates the control group; returns this rank's TPGroup."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError(
            "tensor_parallel_size: this process already holds a torch.distributed process group "
            "(one tensor-parallel engine per process; shut the other one down first)"
        )
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {"rank": rank, "world_size": world_size}
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = init_method or "env://"
    dist.init_process_group(backend_for(device), timeout=collective_timeout(), **kwargs)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TPGroup(rank, world_size, dist.group.WORLD, control, device)


def destroy_groups() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
