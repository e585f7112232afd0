"""`python -m engine.diff`: do the reference engine, the fast engine (and HF transformers) agree?

Runs the same prompts greedily (ignoring end-of-sequence, so every side generates the same number
of tokens) through the reference engine (reference attention + reference scheduler), the fast
engine (`--attention-backend`, default auto, + the production scheduler) and, with `--hf`,
Hugging Face transformers' `generate`, and prints one row per request:

    first divergent position   the first output position where a side's token differs from the
                               reference's ("-" when none)
    gap                        at that position, how far apart the two tokens are in logprob
                               (under each side's own distribution; the larger): a near-tie
                               gives a tiny gap, a real disagreement a large one
    max |dlogprob|             the largest difference in the chosen token's logprob before it

A request agrees when max |dlogprob| and the gap are within the tolerance (default by dtype:
1e-9 in float64, 1e-3 in float32, 5e-2 in 16-bit). The exit status is 0 when every request agrees
and 1 otherwise, so a CI pipeline can use the command as a gate (2: bad arguments).

Prompts: `--prompts FILE` with one prompt per line (text), or JSON lines holding
{"prompt": "..."} or {"prompt_token_ids": [...]}; by default a built-in set of texts.

`--layers` compares *inside* the network instead: one packed step through two sides
(`--reference`, default `backend=reference`; `--candidate`, default the fast backend; each
`backend=NAME,dtype=D,quantization=Q` or `hf`), with per-layer and per-sub-step errors, the
first place beyond tolerance, `--json` and `--plot out.png` (see engine/layer_diff.py). Same
exit statuses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import LLM, SamplingParams

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "1, 2, 3, 5, 8,",
    "Translate to German: the cat sits on the mat.",
    "A",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "Q: What is the boiling point of water at sea level?\nA:",
]
DEFAULT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}
HALF_TOLERANCE = 5e-2


@dataclass(frozen=True, slots=True)
class Trace:
    """One side's greedy output for one request."""

    token_ids: list[int]
    logprobs: list[dict[int, float]]  # per position: the chosen token and the top-k


@dataclass(frozen=True, slots=True)
class Comparison:
    first_divergence: int | None  # output position, None when the tokens are identical
    gap: float  # logprob gap at the divergence (0 when none; inf when a token is not in top-k)
    max_logprob_diff: float  # of the chosen tokens, over the common prefix

    def agrees(self, tolerance: float) -> bool:
        return self.max_logprob_diff <= tolerance and self.gap <= tolerance


def compare(reference: Trace, other: Trace) -> Comparison:
    ref, oth = reference.token_ids, other.token_ids
    common = min(len(ref), len(oth))
    diverge = next((i for i in range(common) if ref[i] != oth[i]), None)
    if diverge is None and len(ref) != len(oth):
        diverge = common  # one side stopped early: nothing to weigh, a disagreement
    end = common if diverge is None else diverge
    max_diff = max(
        (abs(reference.logprobs[i][ref[i]] - other.logprobs[i][ref[i]]) for i in range(end)),
        default=0.0,
    )
    gap = 0.0
    if diverge is not None:
        gap = math.inf
        if diverge < common:
            a, b = ref[diverge], oth[diverge]
            gaps = [
                abs(side[a] - side[b])
                for side in (reference.logprobs[diverge], other.logprobs[diverge])
                if a in side and b in side
            ]
            gap = max(gaps) if len(gaps) == 2 else math.inf
    return Comparison(first_divergence=diverge, gap=gap, max_logprob_diff=max_diff)


def read_prompts(path: str | None) -> list[str | dict[str, Any]]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts: list[str | dict[str, Any]] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"prompts: line {n} of {path} is not valid JSON: {e}") from e
            if not isinstance(record, dict) or not (
                "prompt" in record or "prompt_token_ids" in record
            ):
                raise ValueError(f"prompts: line {n} needs 'prompt' or 'prompt_token_ids'")
            prompts.append(record)
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompts: {path} holds no prompt")
    return prompts


def engine_traces(llm: LLM, prompts: list, max_tokens: int, top_k: int) -> tuple[list, list]:
    """(prompt token ids, Trace) per prompt from a greedy run that ignores end-of-sequence."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=top_k)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    prompt_ids = [out.prompt_token_ids for out in outputs]
    traces = [
        Trace(
            token_ids=list(out.outputs[0].token_ids),
            logprobs=[{t: lp.logprob for t, lp in pos.items()} for pos in out.outputs[0].logprobs],
        )
        for out in outputs
    ]
    return prompt_ids, traces


def hf_source(model_path: str) -> tuple[str, dict[str, Any]]:
    """Where `from_pretrained` finds the model: a directory, or a GGUF file's folder + gguf_file."""
    path = Path(model_path)
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    return model_path, {}


def hf_traces(
    model_path: str, prompt_ids: list[list[int]], lengths: list[int], dtype: torch.dtype, top_k: int
) -> list[Trace]:
    """Greedy HF `generate`, one prompt at a time, exactly `lengths[i]` new tokens each."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source, kwargs = hf_source(model_path)
    config = AutoConfig.from_pretrained(source, **kwargs)
    if any(getattr(config, name, None) for name in ("num_local_experts", "num_experts")):
        # transformers' grouped-mm experts have no float64 kernel; its eager loop is exact.
        kwargs["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    model.eval()
    traces = []
    with torch.no_grad():
        for ids, length in zip(prompt_ids, lengths, strict=True):
            result = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=length,
                min_new_tokens=length,
                do_sample=False,
                return_dict_in_generate=True,
            )
            tokens = result.sequences[0, len(ids) :].tolist()
            # generate() hands back float32 logits whatever the model dtype: score the tokens
            # with one forward over the whole sequence instead, in the model's own dtype.
            logits = model(result.sequences).logits[0, len(ids) - 1 : -1]  # [length, V]
            lp_all = torch.log_softmax(logits.to(torch.float64), dim=-1)
            logprobs = []
            for token, lp in zip(tokens, lp_all, strict=True):
                top = lp.topk(top_k)
                entry = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                entry[token] = lp[token].item()
                logprobs.append(entry)
            traces.append(Trace(token_ids=tokens, logprobs=logprobs))
    return traces


def _cell(c: Comparison) -> str:
    first = "-" if c.first_divergence is None else str(c.first_divergence)
    gap = "-" if c.first_divergence is None else f"{c.gap:.2e}"
    return f"{first:>6} {gap:>9} {c.max_logprob_diff:>9.2e}"


def format_table(
    prompt_ids: list[list[int]],
    reference: list[Trace],
    sides: dict[str, list[Comparison]],
    tolerance: float,
) -> str:
    header = f"{'req':>4} {'prompt':>6} {'gen':>4}"
    sub = " " * len(header)
    for name in sides:
        header += f" | {name + ' vs reference':^26}"
        sub += f" | {'first':>6} {'gap':>9} {'max|dlp|':>9}"
    lines = [header + " | verdict", sub + " |"]
    for i, (ids, ref) in enumerate(zip(prompt_ids, reference, strict=True)):
        row = f"{i:>4} {len(ids):>6} {len(ref.token_ids):>4}"
        ok = True
        for comparisons in sides.values():
            row += " | " + _cell(comparisons[i])
            ok &= comparisons[i].agrees(tolerance)
        lines.append(row + f" | {'ok' if ok else 'DISAGREE'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m engine.diff",
        description="Compare the reference engine, the fast engine and (--hf) HF transformers.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompts", default=None, help="text lines or JSON lines (default: built-in)")
    p.add_argument("--tokenizer", default=None, help="default: the model's own (a GGUF's too)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float64, bfloat16, float16")
    p.add_argument("--hf", action="store_true", help="also compare HF transformers generate")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=5, help="logprobs kept per position")
    p.add_argument("--tolerance", type=float, default=None, help="default: by dtype")
    p.add_argument("--attention-backend", default="auto", help="the fast engine's backend")
    p.add_argument("--scheduler", default="default", help="the fast engine's scheduler")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    layers = p.add_argument_group("layer-by-layer diff (--layers)")
    layers.add_argument("--layers", action="store_true", help="compare every layer's outputs")
    layers.add_argument(
        "--reference",
        default="backend=reference",
        help="side A: backend=,dtype=,quantization= or hf",
    )
    layers.add_argument(
        "--candidate", default=None, help="side B (default: backend=<--attention-backend>)"
    )
    layers.add_argument("--json", action="store_true", help="print the report as JSON")
    layers.add_argument("--plot", default=None, help="write the error per layer to this PNG")
    return p.parse_args(argv)


def prompt_token_ids(model: str, prompts: list) -> list[list[int]]:
    """Token ids of text / JSON prompts with the model's tokenizer (for --layers)."""
    if all(isinstance(p, dict) and "prompt_token_ids" in p for p in prompts):
        return [list(p["prompt_token_ids"]) for p in prompts]
    from engine.config import EngineArgs
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(EngineArgs(model=model).create_model_config().tokenizer_path)
    ids = []
    for p in prompts:
        if isinstance(p, dict) and "prompt_token_ids" in p:
            ids.append(list(p["prompt_token_ids"]))
        else:
            ids.append(tokenizer.encode(p["prompt"] if isinstance(p, dict) else p))
    if any(not i for i in ids):
        raise ValueError("prompts: a prompt has no tokens")
    return ids


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.layers:
        from engine.layer_diff import run_layers

        try:
            return run_layers(args, prompt_token_ids(args.model, read_prompts(args.prompts)))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        prompts = read_prompts(args.prompts)
        common = dict(
            dtype=args.dtype,
            block_size=args.block_size,
            max_model_len=args.max_model_len,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            tokenizer=args.tokenizer,
        )
        reference_llm = LLM(
            args.model, scheduler="reference", attention_backend="reference", **common
        )
        fast_llm = LLM(
            args.model, scheduler=args.scheduler, attention_backend=args.attention_backend, **common
        )
        prompt_ids, reference = engine_traces(reference_llm, prompts, args.max_tokens, args.top_k)
        _, fast = engine_traces(fast_llm, prompts, args.max_tokens, args.top_k)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = reference_llm.llm_engine.model_config.dtype
    backend = fast_llm.llm_engine.attention_backend.name
    del reference_llm, fast_llm
    sides = {"fast": [compare(r, f) for r, f in zip(reference, fast, strict=True)]}
    if args.hf:
        lengths = [len(r.token_ids) for r in reference]
        hf = hf_traces(args.model, prompt_ids, lengths, dtype, args.top_k)
        sides["hf"] = [compare(r, h) for r, h in zip(reference, hf, strict=True)]
    tolerance = args.tolerance
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE.get(dtype, HALF_TOLERANCE)

    print(
        f"model {args.model} | dtype {str(dtype).removeprefix('torch.')} | fast engine: "
        f"{backend} attention, {args.scheduler} scheduler | tolerance {tolerance:g}"
    )
    print(format_table(prompt_ids, reference, sides, tolerance))
    bad = sum(
        not all(side[i].agrees(tolerance) for side in sides.values()) for i in range(len(reference))
    )
    print(f"{len(reference) - bad}/{len(reference)} requests agree")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
