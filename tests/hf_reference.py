"""HF transformers as the tests' outside oracle: greedy continuations with their logprobs."""

from __future__ import annotations

import torch


def hf_greedy(
    model, prompts: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy continuations and per-step logprobs [steps, V] (float64) from an HF model, one
    prompt at a time (no padding, so nothing but the prompt shapes the result)."""
    model.eval()
    outs, logprobs = [], []
    with torch.no_grad():
        for prompt in prompts:
            result = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
            outs.append(result.sequences[0, len(prompt) :].tolist())
            logits = torch.cat(result.logits, dim=0).to(torch.float64)  # [steps, V]
            logprobs.append(torch.log_softmax(logits, dim=-1))
    return outs, logprobs
