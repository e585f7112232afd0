"""Rejection sampling of draft tokens against the target (Leviathan et al. 2023, Chen et al. 2023).

For one request with drafts d_1..d_m (m <= k), target distributions p_0..p_m at the verify
positions (p_i is the target's distribution for the token after d_1..d_i) and draft
distributions q_1..q_m:

    for i = 1..m: accept d_i with probability min(1, p_{i-1}(d_i) / q_i(d_i));
                  on the first rejection emit a token drawn from normalize(max(0, p_{i-1} - q_i))
                  and stop;
    if all m are accepted, emit a bonus token drawn from p_m.

Every emitted token is then distributed exactly as the target's, whatever q is. A one-hot q
(n-gram drafts) accepts with probability p_{i-1}(d_i) and resamples from p_{i-1} with d_i removed.
Greedy requests accept while d_i == argmax p_{i-1} and emit the argmax.

Randomness is passed in (`uniforms`, `noise`), so callers control seeding: the engine seeds both
per (request seed, output position), which keeps seeded requests reproducible in any batch.
Draws use the exponential race argmax(probs / E), E ~ Exp(1), as the sampler does.
"""

from __future__ import annotations

import torch


def acceptance_probs(
    target_probs: torch.Tensor,  # [B, k, V]: p_0..p_{k-1}
    draft_token_ids: torch.Tensor,  # [B, k]
    draft_probs: torch.Tensor | None,  # [B, k, V] or None for one-hot drafts
) -> torch.Tensor:  # [B, k]
    """min(1, p(d) / q(d)) per draft position."""
    p = target_probs.gather(2, draft_token_ids[..., None])[..., 0]
    if draft_probs is None:
        return p.clamp(max=1.0)
    q = draft_probs.gather(2, draft_token_ids[..., None])[..., 0]
    return torch.where(q > 0, (p / q.clamp(min=torch.finfo(q.dtype).tiny)).clamp(max=1.0), 1.0)


def residual_distribution(
    target_probs: torch.Tensor,  # [..., V]
    draft_token_ids: torch.Tensor,  # [...]
    draft_probs: torch.Tensor | None,  # [..., V] or None for one-hot drafts
) -> torch.Tensor:  # [..., V]
    """normalize(max(0, p - q)); falls back to p where the residual has no mass (p == q, where
    a rejection cannot happen anyway)."""
    if draft_probs is None:
        draft_probs = torch.zeros_like(target_probs).scatter_(-1, draft_token_ids[..., None], 1.0)
    residual = (target_probs - draft_probs).clamp(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    normalized = residual / mass.clamp(min=torch.finfo(mass.dtype).tiny)
    return torch.where(mass > 0, normalized, target_probs)


def rejection_sample(
    target_probs: torch.Tensor,  # [B, k + 1, V]
    draft_token_ids: torch.Tensor,  # [B, k], any value past a request's num_drafts
    num_drafts: torch.Tensor,  # [B] int64, 0..k
    draft_probs: torch.Tensor | None,  # [B, k, V] or None (one-hot drafts)
    greedy: torch.Tensor,  # [B] bool
    uniforms: torch.Tensor,  # [B, k] U(0, 1)
    noise: torch.Tensor,  # [B, k + 1, V] Exp(1): the draw at each position
) -> list[list[int]]:
    """The tokens each request emits this step: its accepted drafts, then one more."""
    batch, k_plus_1, _vocab = target_probs.shape
    k = k_plus_1 - 1
    positions = torch.arange(k, device=target_probs.device)
    valid = positions[None, :] < num_drafts[:, None]  # [B, k]
    drafts = torch.where(valid, draft_token_ids, 0)

    target_argmax = target_probs.argmax(dim=-1)  # [B, k + 1]
    accept_sampled = uniforms < acceptance_probs(target_probs[:, :k], drafts, draft_probs)
    accept_greedy = drafts == target_argmax[:, :k]
    accept = torch.where(greedy[:, None], accept_greedy, accept_sampled) & valid  # [B, k]
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # [B]: the first rejection's index

    rows = torch.arange(batch, device=target_probs.device)
    p_final = target_probs[rows, num_accepted]  # [B, V]: where the last token is drawn
    rejected = num_accepted < num_drafts  # [B]
    if bool(rejected.any()):
        at = num_accepted.clamp(max=max(k - 1, 0))
        q_final = draft_probs[rows, at] if draft_probs is not None else None
        residual = residual_distribution(p_final, drafts[rows, at], q_final)
        p_final = torch.where(rejected[:, None], residual, p_final)
    drawn = (p_final / noise[rows, num_accepted]).argmax(dim=-1)  # [B]
    final = torch.where(greedy, target_argmax[rows, num_accepted], drawn)

    out = []
    for b, (n, last) in enumerate(zip(num_accepted.tolist(), final.tolist(), strict=True)):
        out.append([*drafts[b, :n].tolist(), last])
    return out
