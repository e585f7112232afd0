"""`PrefixAffinityRouter`: Ray Serve's request-router extension point with the policy of
`engine.serve.routing` (prefer the replica that owns the prompt's prefix, least loaded otherwise).

Ray Serve lets a deployment name its router class (`request_router_config`); the router runs in
every process that holds a handle to the engine deployment (here: the ingress replicas) and is
asked, per request, for ranked candidate replicas (`choose_replicas`). Ray takes the first
ranked replica with room (probing a replica whose queue it believes full) and retries with
backoff when none has room.

The ingress passes the routing key as the keyword argument `routing_key` of the call (it parses
the body anyway); the router reads it from `PendingRequest.kwargs` and never touches the body.

Load: Ray's queue-length cache is updated only after a routed request is sent, and a burst of
requests is routed before any of them is sent, so on its own it would show every replica idle
for the whole burst. The router therefore also counts the requests it placed itself: +1 when
`choose_replicas` names a replica first (moved if Ray picks another, dropped if the request is
cancelled), -1 when Ray reports the attempt completed (`on_request_completed`, once per send).
A replica's load is the larger of that count and Ray's cached queue length (which also holds
other routers' requests).

Invariants: `_in_flight[r]` equals the number of entries of `_placed` naming r; every placed
request leaves `_placed` once its attempt completes, its routing is cancelled or its replica dies.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from engine.serve.routing import DEFAULT_IMBALANCE_THRESHOLD, rank_replicas

logger = logging.getLogger(__name__)

__all__ = ["ROUTER_CLASS_PATH", "PrefixAffinityRouter"]

ROUTER_CLASS_PATH = "engine.serve.router.PrefixAffinityRouter"


class PrefixAffinityRouter(RequestRouter):
    """Rendezvous hashing of the prompt's prefix, falling back to the least loaded replica."""

    def initialize_state(self, imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD) -> None:
        if not isinstance(imbalance_threshold, int) or imbalance_threshold < 0:
            raise ValueError(
                f"imbalance_threshold must be a non-negative int, got {imbalance_threshold!r}"
            )
        self.imbalance_threshold = imbalance_threshold

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.imbalance_threshold = DEFAULT_IMBALANCE_THRESHOLD
        self._in_flight: Counter[ReplicaID] = Counter()
        self._placed: dict[str, ReplicaID] = {}  # internal request id -> replica

    def load(self, replica_id: ReplicaID) -> int:
        cached = self.replica_queue_len_cache.get(replica_id) or 0
        return max(cached, self._in_flight[replica_id])

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = None
        if pending_request is not None:
            # Back off between rounds when every rank is full (else Ray re-asks at once).
            pending_request.routing_context.should_backoff = True
            key = pending_request.kwargs.get("routing_key")
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {name: self.load(r.replica_id) for name, r in by_name.items()}
        key = key if isinstance(key, str) else None
        ranks = rank_replicas(key, loads, self.imbalance_threshold)
        ranked = [[by_name[name] for name in rank] for rank in ranks]
        if pending_request is not None and ranked:
            self._place(pending_request, ranked[0][0].replica_id)
        return ranked

    def _place(self, pending_request: PendingRequest, replica_id: ReplicaID) -> None:
        request_id = pending_request.metadata.internal_request_id
        previous = self._placed.get(request_id)
        if previous == replica_id:
            return
        if previous is None:  # a new attempt (Ray gives each attempt a fresh future)
            pending_request.future.add_done_callback(functools.partial(self._on_routed, request_id))
        else:
            self._in_flight[previous] -= 1
        self._placed[request_id] = replica_id
        self._in_flight[replica_id] += 1

    def _on_routed(self, request_id: str, future: asyncio.Future) -> None:
        """Ray chose a replica (maybe not the first rank's) or gave up on the request."""
        placed = self._placed.get(request_id)
        if placed is None:
            return
        if future.cancelled() or future.exception() is not None:
            self._release(request_id)
            return
        chosen = future.result().replica_id
        if chosen != placed:
            self._in_flight[placed] -= 1
            self._in_flight[chosen] += 1
            self._placed[request_id] = chosen

    def _release(self, request_id: str) -> None:
        replica_id = self._placed.pop(request_id, None)
        if replica_id is not None:
            self._in_flight[replica_id] -= 1
            if self._in_flight[replica_id] <= 0:
                del self._in_flight[replica_id]

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._release(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for request_id in [r for r, placed in self._placed.items() if placed == replica_id]:
            self._release(request_id)
