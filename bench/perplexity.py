"""Perplexity of the engine on a fixed text: float32 vs int8 vs int4 weights (and the GGUF file's
own formats), the quality cost of quantization.

    OMP_NUM_THREADS=2 python bench/perplexity.py                 # bundled SmolLM2 if installed
    python bench/perplexity.py --quick                           # tiny random model, seconds
    python bench/perplexity.py --model path/to/model.gguf --max-tokens 512

The text (public domain: the opening of Dickens' "A Tale of Two Cities" and of Melville's "Moby
Dick") is tokenized once and cut into windows of --window tokens; each window is one prompt with
prompt_logprobs=0, which gives log p(token | the tokens before it in the window) for every token
but the first. Perplexity = exp(-mean log p) over all windows. Rows:

    fp32  quantization "none": every weight dequantized to float32 (the reference)
    int8  quantization "int8": per-channel int8 weights (requantized from the file's values)
    int4  quantization "int4": int4 weights in groups of 32 (LM head int8)
    gguf  (GGUF files only) the file's own formats: 4-bit types on int4, Q8_0 on int8

A random-weight model's perplexity is near its vocabulary size and says nothing about quality;
only the ratios on a real model do.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us, we were all going direct "
    "to Heaven, we were all going direct the other way - in short, the period was so far like the "
    "present period, that some of its noisiest authorities insisted on its being received, for "
    "good or for evil, in the superlative degree of comparison only. There were a king with a "
    "large jaw and a queen with a plain face, on the throne of England; there were a king with a "
    "large jaw and a queen with a fair face, on the throne of France. In both countries it was "
    "clearer than crystal to the lords of the State preserves of loaves and fishes, that things "
    "in general were settled for ever. "
    "Call me Ishmael. Some years ago - never mind how long precisely - having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about a "
    "little and see the watery part of the world. It is a way I have of driving off the spleen "
    "and regulating the circulation. Whenever I find myself growing grim about the mouth; "
    "whenever it is a damp, drizzly November in my soul; whenever I find myself involuntarily "
    "pausing before coffin warehouses, and bringing up the rear of every funeral I meet; and "
    "especially whenever my hypos get such an upper hand of me, that it requires a strong moral "
    "principle to prevent me from deliberately stepping into the street, and methodically "
    "knocking people's hats off - then, I account it high time to get to sea as soon as I can. "
    "This is my substitute for pistol and ball. With a philosophical flourish Cato throws "
    "himself upon his sword; I quietly take to the ship. There is nothing surprising in this. "
    "If they but knew it, almost all men in their degree, some time or other, cherish very "
    "nearly the same feelings towards the ocean with me."
)


def perplexity(llm, token_ids: list[int], window: int) -> tuple[float, int]:
    """(perplexity, tokens scored) over consecutive windows of the token ids."""
    from engine import SamplingParams

    windows = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) > 1]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    total, count = 0.0, 0
    for out in llm.generate(windows, params, use_tqdm=False):
        for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], strict=True):
            total += entry[token].logprob
            count += 1
    return math.exp(-total / count), count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint dir or .gguf (default: bundled)")
    p.add_argument("--quick", action="store_true", help="tiny random model, few tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens of the text scored")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--methods", default=None, help="comma list of fp32,int8,int4,gguf")
    args = p.parse_args()

    from engine import LLM
    from engine.models.bundled import default_model_path

    model = args.model
    if model is None and not args.quick:
        model = default_model_path()
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import TINY_SHAPE, build_checkpoint

        model = str(build_checkpoint({**TINY_SHAPE, "hidden_size": 128}, "tiny-llama-ppl"))
    is_gguf = model.lower().endswith(".gguf")
    methods = (args.methods or ("fp32,int8,int4,gguf" if is_gguf else "fp32,int8,int4")).split(",")
    max_tokens = args.max_tokens or (64 if args.quick else 1024)
    quantization = {"fp32": "none", "int8": "int8", "int4": "int4", "gguf": None}

    print(f"model {model}")
    rows = []
    token_ids: list[int] | None = None
    for method in methods:
        start = time.perf_counter()
        llm = LLM(
            model,
            dtype="float32",
            quantization=quantization[method],
            max_model_len=args.window + 1,
            kv_cache_memory_bytes=2**26,
        )
        if token_ids is None:
            token_ids = llm.llm_engine.tokenizer.encode(TEXT)[:max_tokens]
        ppl, count = perplexity(llm, token_ids, args.window)
        rows.append((method, ppl, count, time.perf_counter() - start))
        del llm
    base = rows[0][1]
    print(
        f"{'method':8s} {'perplexity':>11s} {'vs ' + rows[0][0]:>8s} {'tokens':>7s} {'seconds':>8s}"
    )
    for method, ppl, count, seconds in rows:
        print(f"{method:8s} {ppl:11.3f} {ppl / base:8.4f} {count:7d} {seconds:8.1f}")


if __name__ == "__main__":
    main()
