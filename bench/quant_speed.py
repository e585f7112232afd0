"""Batch-1 decode speed with quantized weights: none / int8 / int4 at float32 and bfloat16
activations (and a GGUF file's own formats), side by side in one run.

    OMP_NUM_THREADS=2 python bench/quant_speed.py                # bundled SmolLM2 if installed
    python bench/quant_speed.py --quick                          # tiny random model, seconds
    python bench/quant_speed.py --model path/to/model.gguf --output-len 128

One request decodes --output-len tokens after a --prompt-len prompt; the figure is the median
time of a decode step (`LLMEngine.step()` after the prefill step) over the second of two runs
(the first warms up). Batch-1 decode reads every weight once per token, so the weight bytes
(the start-up log's figure, printed here too) bound it: fewer bytes, faster steps, until the
kernels' own overheads dominate. The lead compares these figures with llama.cpp's
`llama-bench` on the same GGUF file (q8_0 vs int8, q4_1 vs int4/gguf) on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROWS = [
    ("none", "float32"),
    ("int8", "float32"),
    ("int4", "float32"),
    ("none", "bfloat16"),
    ("int8", "bfloat16"),
    ("int4", "bfloat16"),
]


def decode_step_seconds(engine, prompt: list[int], output_len: int) -> float:
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    times: list[float] = []
    for run in range(2):  # the first run warms up
        engine.add_request(f"r{run}", prompt, params)
        engine.step()  # prefill and the first token
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            if run:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint dir or .gguf (default: bundled)")
    p.add_argument("--quick", action="store_true", help="tiny random model, few tokens")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    args = p.parse_args()

    from engine import EngineArgs, LLMEngine
    from engine.models.bundled import default_model_path
    from engine.models.loader import format_weight_bytes, weight_bytes_by_dtype

    model = args.model
    if model is None and not args.quick:
        model = default_model_path()
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import SMOLLM_SHAPE, TINY_SHAPE, build_checkpoint

        shape, name = (TINY_SHAPE, "tiny-llama") if args.quick else (SMOLLM_SHAPE, "smollm-135m")
        model = str(build_checkpoint(shape, name))
    prompt_len = args.prompt_len or (8 if args.quick else 32)
    output_len = args.output_len or (8 if args.quick else 64)
    rows = list(ROWS)
    if model.lower().endswith(".gguf"):
        rows += [("gguf", "float32"), ("gguf", "bfloat16")]

    print(f"model {model}: batch 1, prompt {prompt_len} tokens, {output_len} decoded")
    results = []
    for quantization, dtype in rows:
        engine = LLMEngine(
            EngineArgs(
                model=model,
                dtype=dtype,
                quantization=None if quantization == "gguf" else quantization,
                max_model_len=prompt_len + output_len + 8,
                kv_cache_memory_bytes=2**24,
                max_num_seqs=4,
            )
        )
        vocab = engine.model_config.vocab_size
        prompt = [(7 * i + 3) % vocab for i in range(prompt_len)]
        seconds = decode_step_seconds(engine, prompt, output_len)
        weights = format_weight_bytes(weight_bytes_by_dtype(engine.model))
        results.append((quantization, dtype, seconds, weights))
        del engine
    base = results[0][2]
    print(
        f"{'weights':8s} {'activations':11s} {'ms/token':>9s} {'tok/s':>8s} {'speed-up':>8s}"
        "  memory"
    )
    for quantization, dtype, seconds, weights in results:
        print(
            f"{quantization:8s} {dtype:11s} {seconds * 1e3:9.2f} {1 / seconds:8.1f} "
            f"{base / seconds:8.2f}  {weights}"
        )


if __name__ == "__main__":
    main()
