"""Prefix-affinity routing policy for engine replicas (pure Python: no Ray import).

Each replica keeps its own prefix cache, so a request is cheapest on the replica that already
served its prompt's first blocks. The ingress turns a request body into a *routing key*, a hash
of the first `prefix_chars` characters of the prompt's text (the prompt string; chat messages as
`role\\ncontent\\n` per message; token-id prompts as their ids joined by commas), and the router
ranks replicas for that key:

* the preferred replica is the one with the highest rendezvous score `hash(key, replica)`
  (highest-random-weight hashing): every router computes the same choice without sharing state,
  and when a replica leaves or joins only the keys it owned move;
* it is taken unless it has more requests in flight than the least loaded replica by more than
  `imbalance_threshold` (then the least loaded replica takes the request) or it is full
  (`max_ongoing_requests`; Ray then tries the next rank: the least loaded of the others);
* a request without a key (GET routes, a body that is not JSON) goes to the least loaded replica.

Invariants: `routing_key` is a pure function of (path, body, prefix_chars), stable across
processes and Python versions (blake2b, never `hash()`); `rank_replicas` returns each known
replica exactly once, one per rank, the preferred first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_IMBALANCE_THRESHOLD",
    "DEFAULT_PREFIX_CHARS",
    "ROUTED_PATHS",
    "prompt_text",
    "rank_replicas",
    "rendezvous_order",
    "routing_key",
]

# ~64 tokens of English text: four 16-token KV blocks, the first blocks a prefix cache reuses.
DEFAULT_PREFIX_CHARS = 256
# Requests a preferred replica may have in flight beyond the least loaded one's.
DEFAULT_IMBALANCE_THRESHOLD = 8
# Routes whose body carries a prompt; every other route gets no key (least loaded).
ROUTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/tokenize"})


def _content_text(content: Any) -> str:
    """A chat message's content as text: a string, or the text of an array of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (p.get("text") for p in content if isinstance(p, dict))
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def prompt_text(path: str, body: Any) -> str | None:
    """The text a request's prompt starts with, as the router sees it; None when there is none
    (the replica validates the body; routing never rejects a request)."""
    if path not in ROUTED_PATHS or not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and path != "/v1/completions":
        pieces = []
        for m in messages:
            if isinstance(m, dict):
                pieces.append(f"{m.get('role', '')}\n{_content_text(m.get('content'))}\n")
        return "".join(pieces) or None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):  # one prompt of token ids
            return ",".join(map(str, prompt))
        prompt = prompt[0]  # several prompts: the first one decides
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return ",".join(map(str, prompt)) or None
    if isinstance(prompt, str) and prompt:
        return prompt
    return None


def routing_key(path: str, body: Any, prefix_chars: int = DEFAULT_PREFIX_CHARS) -> str | None:
    """Hex hash of the first `prefix_chars` characters of the request's prompt text; None for a
    request without a prompt. Prompts that share those characters share the key."""
    if prefix_chars <= 0:
        raise ValueError(f"prefix_chars must be positive, got {prefix_chars}")
    text = prompt_text(path, body)
    if text is None:
        return None
    digest = hashlib.blake2b(text[:prefix_chars].encode("utf-8", "surrogatepass"), digest_size=8)
    return digest.hexdigest()


def _score(key: str, replica: str) -> int:
    digest = hashlib.blake2b(f"{key}|{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """Replicas by descending rendezvous score for `key` (ties by name): the first is the key's
    preferred replica, for every router that sees the same replica set."""
    return sorted(replicas, key=lambda r: (-_score(key, r), r))


def rank_replicas(
    key: str | None,
    loads: Mapping[str, int | None],
    imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD,
) -> list[list[str]]:
    """Every replica once, one per rank, most preferred first (Ray tries the ranks in order and
    takes the first replica with room).

    `loads`: each live replica's requests in flight (None where unknown: counted as 0). With a
    key, the key's owner comes first unless its load exceeds the least loaded replica's by more
    than `imbalance_threshold`; the others follow, least loaded first. Without a key, or when the
    owner is overloaded, all replicas come least loaded first (ties by name).
    """
    if not loads:
        return []
    load = {name: q or 0 for name, q in loads.items()}
    by_load = sorted(load, key=lambda name: (load[name], name))
    if key is None:
        return [[name] for name in by_load]
    owner = rendezvous_order(key, list(load))[0]
    if load[owner] - load[by_load[0]] > imbalance_threshold:
        return [[name] for name in by_load]  # overloaded next to the least loaded: that one first
    return [[owner], *([name] for name in by_load if name != owner)]
