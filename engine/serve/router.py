"""`PrefixAffinityRouter`: Ray Serve's request-router extension point with the policy of
`engine.serve.routing` (prefer the replica that owns the prompt's prefix, least loaded otherwise).

Ray Serve (>= 2.45) lets a deployment name its router class (`request_router_config`); the
router runs in every process that holds a handle to the engine deployment (here: the ingress
replicas) and is asked, per request, for ranked candidate replicas (`choose_replicas`). Ray then
takes the least loaded replica with room from the first rank that has one, probing queue lengths
where its cache has none, and retries with backoff when none has room.

The ingress passes the routing key as the keyword argument `routing_key` of the call (it parses
the body anyway); the router reads it from `PendingRequest.kwargs` and never touches the body.
Queue lengths come from Ray's per-router cache (requests this router sent, corrected by each
replica's reply), so the "overloaded" test costs no extra round trip.
"""

from __future__ import annotations

import logging

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

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
        cache = self.replica_queue_len_cache
        queue_lens = {name: cache.get(r.replica_id) for name, r in by_name.items()}
        threshold = getattr(self, "imbalance_threshold", DEFAULT_IMBALANCE_THRESHOLD)
        ranks = rank_replicas(key if isinstance(key, str) else None, queue_lens, threshold)
        return [[by_name[name] for name in rank] for rank in ranks]
