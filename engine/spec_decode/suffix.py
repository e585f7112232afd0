"""Suffix decoding (`speculative_config={"method": "suffix", ...}`): model-free drafts from
frequency-counted suffix tries over the request's own tokens and over recent outputs of other
requests (the idea of Arctic Inference's suffix decoding, Oliaro et al. 2024; vLLM's `suffix`).

Data structure: a `SuffixTrie` of depth D (`suffix_decoding_max_tree_depth`) holds every
substring of length <= D of the sequences inserted into it, each node counting how many times
its substring occurs. Two kinds of trie:

    per request   the request's prompt and output so far, extended by the new tokens after each
                  step (each token costs O(D): the D open suffixes each grow by one node);
    global        the outputs of the last `suffix_decoding_max_cached_requests` finished
                  requests (insert O(n D) when a request finishes; evicted oldest first by
                  decrementing the same counts).

Proposal, for each trie: the longest tail of the context (length m <= max(1, D - k), leaving
depth for k drafts) that occurs in the trie with a continuation is found; from its node, the
most frequent child is followed while the product of conditional frequencies (child count /
sum of sibling counts) stays >= `suffix_decoding_min_token_prob`, for at most
min(max_tokens, floor(`suffix_decoding_max_spec_factor` x m)) tokens (longer matches speculate
further; the trie depth bounds it too). The trie whose path has the larger expected number of
accepted tokens (the sum of the path's probabilities) wins; ties go to the request's own trie.

Invariants: a trie's node counts equal the number of occurrences of their substrings among the
inserted sequences (tests/test_suffix.py checks it against a brute-force count, also after
evictions); proposals depend only on tokens, so they are deterministic; the target verifies
every draft, so greedy output is unchanged (the lockstep property test runs this proposer).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import SpeculativeConfig
    from engine.request import Request

# Requests whose trie is kept although the speculator never saw them finish (aborted ones) are
# swept every this many proposals.
_SWEEP_EVERY = 256


class _Node:
    __slots__ = ("children", "count", "depth")

    def __init__(self, depth: int) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0
        self.depth = depth


class SuffixTrie:
    """Counted trie of every substring (length <= max_depth) of the inserted sequences."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = _Node(0)
        self._open: list[_Node] = []  # append(): nodes of the suffixes still shorter than D

    # ---- building ----------------------------------------------------------------------------

    def append(self, token: int) -> None:
        """Extends the sequence being built incrementally by one token."""
        grown: list[_Node] = []
        for node in [*self._open, self.root]:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node(node.depth + 1)
            child.count += 1
            if child.depth < self.max_depth:
                grown.append(child)
        self._open = grown

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.append(token)

    def add_sequence(self, tokens: Sequence[int], sign: int = 1) -> None:
        """Inserts (sign 1) or removes (sign -1) a whole sequence independently of the one
        `append` builds; a node whose count reaches 0 is dropped."""
        n = len(tokens)
        for start in range(n):
            node = self.root
            for token in tokens[start : min(n, start + self.max_depth)]:
                child = node.children.get(token)
                if child is None:
                    if sign < 0:
                        raise ValueError("removing a sequence that was never added")
                    child = node.children[token] = _Node(node.depth + 1)
                child.count += sign
                if child.count == 0:
                    del node.children[token]
                    break  # its whole subtree counted only this occurrence
                node = child

    # ---- querying ----------------------------------------------------------------------------

    def count(self, tokens: Sequence[int]) -> int:
        """Occurrences of `tokens` (len <= max_depth) among the inserted sequences."""
        node = self.root
        for token in tokens:
            node = node.children.get(token)
            if node is None:
                return 0
        return node.count if tokens else 0

    def longest_match(
        self, context: Sequence[int], max_len: int | None = None
    ) -> tuple[_Node | None, int]:
        """(node, m) for the longest tail context[-m:] (m <= max_len, default max_depth - 1)
        present in the trie with at least one continuation; (None, 0) if none. If a tail is
        absent, so is every longer one (its own tail is a substring), so the search stops at
        the first miss."""
        best: tuple[_Node | None, int] = (None, 0)
        n = len(context)
        limit = self.max_depth - 1 if max_len is None else min(max_len, self.max_depth - 1)
        for m in range(1, min(n, limit) + 1):
            node: _Node | None = self.root
            for token in context[n - m :]:
                node = node.children.get(token)
                if node is None:
                    return best
            if node.children:
                best = (node, m)
        return best

    @staticmethod
    def greedy_path(node: _Node, max_tokens: int, min_token_prob: float) -> tuple[list[int], float]:
        """The most frequent continuation from `node`: (tokens, sum of path probabilities)."""
        tokens: list[int] = []
        prob, score = 1.0, 0.0
        while len(tokens) < max_tokens and node.children:
            total = sum(child.count for child in node.children.values())
            # most frequent child; ties to the smallest token id, for determinism
            token, child = max(node.children.items(), key=lambda kv: (kv[1].count, -kv[0]))
            prob *= child.count / total
            if prob < min_token_prob:
                break
            tokens.append(token)
            score += prob
            node = child
        return tokens, score


class SuffixDecodingProposer:
    """Per-request tries plus one global trie of finished requests' outputs; see the module
    docstring. Registered as the built-in method `suffix` (engine/spec_decode/registry.py)."""

    def __init__(
        self,
        num_speculative_tokens: int,
        max_tree_depth: int = 24,
        max_cached_requests: int = 10000,
        max_spec_factor: float = 1.0,
        min_token_prob: float = 0.1,
    ) -> None:
        self.k = num_speculative_tokens
        self.max_tree_depth = max_tree_depth
        self.max_cached_requests = max_cached_requests
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob
        self.global_trie = SuffixTrie(max_tree_depth)
        self._cached: OrderedDict[str, list[int]] = OrderedDict()  # id -> output, oldest first
        # request id -> (request, its trie, tokens of it already in the trie)
        self._requests: dict[str, tuple[Request, SuffixTrie, int]] = {}
        self._calls = 0

    @classmethod
    def from_config(cls, spec: SpeculativeConfig) -> SuffixDecodingProposer:
        return cls(
            spec.num_speculative_tokens,
            max_tree_depth=spec.suffix_decoding_max_tree_depth,
            max_cached_requests=spec.suffix_decoding_max_cached_requests,
            max_spec_factor=spec.suffix_decoding_max_spec_factor,
            min_token_prob=spec.suffix_decoding_min_token_prob,
        )

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0:
            self._sweep()
        tokens = request.all_token_ids
        trie = self._request_trie(request, tokens)
        limit = min(self.k, max_tokens)
        if limit <= 0:
            return []
        return self.propose_from(tokens, limit, trie)

    def propose_from(
        self, context: Sequence[int], limit: int, own: SuffixTrie | None = None
    ) -> list[int]:
        """The better of the proposals from `own` (the request's trie) and the global trie."""
        best: list[int] = []
        best_score = 0.0
        for trie in (own, self.global_trie):
            if trie is None:
                continue
            # Leave room in the trie's depth for `limit` drafts after the match.
            node, m = trie.longest_match(context, max(1, self.max_tree_depth - limit))
            if node is None:
                continue
            budget = min(limit, int(self.max_spec_factor * m))
            tokens, score = trie.greedy_path(node, budget, self.min_token_prob)
            if score > best_score:
                best, best_score = tokens, score
        return best

    def finish(self, request: Request) -> None:
        """Drops the request's trie and caches its output in the global trie."""
        self._requests.pop(request.request_id, None)
        output = list(request.output_token_ids)
        if not output or self.max_cached_requests == 0 or request.request_id in self._cached:
            return
        self._cached[request.request_id] = output
        self.global_trie.add_sequence(output)
        while len(self._cached) > self.max_cached_requests:
            _, evicted = self._cached.popitem(last=False)
            self.global_trie.add_sequence(evicted, sign=-1)

    def _request_trie(self, request: Request, tokens: list[int]) -> SuffixTrie:
        entry = self._requests.get(request.request_id)
        if entry is None or entry[0] is not request or entry[2] > len(tokens):
            trie, indexed = SuffixTrie(self.max_tree_depth), 0
        else:
            _, trie, indexed = entry
        trie.extend(tokens[indexed:])
        self._requests[request.request_id] = (request, trie, len(tokens))
        return trie

    def _sweep(self) -> None:
        for request, _, _ in list(self._requests.values()):
            if request.is_finished:
                self.finish(request)

    @property
    def num_tracked_requests(self) -> int:
        return len(self._requests)
