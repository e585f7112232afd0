"""Collectives of the sharded layers, and the step broadcast from rank 0 to the workers.

Layer collectives (no-ops on the trivial group, so a TP=1 model never calls torch.distributed):

    all_reduce(x)          sum over the ranks, in place: after a row-parallel linear, the
                           vocab-parallel embedding and an MoE block
    gather_last_dim(x)     rank 0 gets the ranks' [..., n] pieces concatenated to [..., n * size]
                           (the vocab-parallel logits); other ranks get None
    all_reduce_max(x)      element-wise max (int8 scales of a row-parallel linear)

Step broadcast: rank 0 sends (kind, payload) where the payload is any structure of tuples,
lists, dicts, dataclasses (rebuilt field by field through their constructor, so new fields of
AttentionMetadata travel without a change here) and tensors. CPU tensors travel inline in the
pickled header (one gloo broadcast of a fixed-size buffer, a second only when the header is
larger); device tensors (CUDA) follow one broadcast each over the compute group (NCCL).
"""

from __future__ import annotations

import dataclasses
import pickle
import struct
from typing import Any

import torch

from engine.distributed.parallel_state import TPGroup

HEADER_BYTES = 1 << 15  # the first broadcast's size; a larger header takes a second one


def all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size > 1:
        import torch.distributed as dist

        dist.all_reduce(x, group=tp.group)
    return x


def all_reduce_max(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size > 1:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=tp.group)
    return x


def gather_last_dim(x: torch.Tensor, tp: TPGroup) -> torch.Tensor | None:
    """[..., n] on every rank -> [..., n * size] on rank 0 (rank r's piece r-th), None elsewhere."""
    if tp.size == 1:
        return x
    import torch.distributed as dist

    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(tp.size)] if tp.rank == 0 else None
    dist.gather(x, pieces, dst=0, group=tp.group)
    return torch.cat(pieces, dim=-1) if pieces is not None else None


# ---- step broadcast ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _HostTensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class _DeviceTensor:
    index: int  # position among the step's device tensors
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class _Dataclass:
    cls: type
    fields: dict[str, Any]


def _pack(obj: Any, device_tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            flat = obj.detach().contiguous().reshape(-1).view(torch.uint8)
            return _HostTensor(obj.dtype, tuple(obj.shape), flat.numpy().tobytes())
        device_tensors.append(obj.contiguous())
        return _DeviceTensor(len(device_tensors) - 1, obj.dtype, tuple(obj.shape))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _Dataclass(
            type(obj),
            {
                f.name: _pack(getattr(obj, f.name), device_tensors)
                for f in dataclasses.fields(obj)
                if f.init
            },
        )
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v, device_tensors) for v in obj)
    if isinstance(obj, dict):
        return {k: _pack(v, device_tensors) for k, v in obj.items()}
    return obj


def _unpack(obj: Any, device_tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _HostTensor):
        raw = torch.frombuffer(bytearray(obj.data), dtype=torch.uint8) if obj.data else None
        if raw is None:
            return torch.empty(obj.shape, dtype=obj.dtype)
        return raw.view(obj.dtype).reshape(obj.shape)
    if isinstance(obj, _DeviceTensor):
        return device_tensors[obj.index]
    if isinstance(obj, _Dataclass):
        return obj.cls(**{k: _unpack(v, device_tensors) for k, v in obj.fields.items()})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v, device_tensors) for v in obj)
    if isinstance(obj, dict):
        return {k: _unpack(v, device_tensors) for k, v in obj.items()}
    return obj


def send_step(tp: TPGroup, kind: str, payload: Any = None) -> None:
    """Rank 0: broadcasts one step message to every worker."""
    import torch.distributed as dist

    device_tensors: list[torch.Tensor] = []
    packed = _pack(payload, device_tensors)
    meta = [(t.dtype, tuple(t.shape)) for t in device_tensors]
    body = pickle.dumps((kind, packed, meta), protocol=pickle.HIGHEST_PROTOCOL)
    data = struct.pack("<Q", len(body)) + body
    head = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    first = data[:HEADER_BYTES]
    head[: len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
    dist.broadcast(head, src=0, group=tp.control)
    if len(data) > HEADER_BYTES:
        rest = torch.frombuffer(bytearray(data[HEADER_BYTES:]), dtype=torch.uint8)
        dist.broadcast(rest, src=0, group=tp.control)
    for t in device_tensors:
        dist.broadcast(t, src=0, group=tp.group)


def recv_step(tp: TPGroup) -> tuple[str, Any]:
    """A worker: waits (without a timeout) for rank 0's next step message."""
    import torch.distributed as dist

    head = torch.empty(HEADER_BYTES, dtype=torch.uint8)
    dist.broadcast(head, src=0, group=tp.control)
    raw = head.numpy().tobytes()
    (length,) = struct.unpack("<Q", raw[:8])
    data = raw[8 : 8 + length]
    if 8 + length > HEADER_BYTES:
        rest = torch.empty(8 + length - HEADER_BYTES, dtype=torch.uint8)
        dist.broadcast(rest, src=0, group=tp.control)
        data += rest.numpy().tobytes()
    kind, packed, meta = pickle.loads(data)
    device_tensors = []
    for dtype, shape in meta:
        t = torch.empty(shape, dtype=dtype, device=tp.device)
        dist.broadcast(t, src=0, group=tp.group)
        device_tensors.append(t)
    return kind, _unpack(packed, device_tensors)
