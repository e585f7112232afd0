"""Batch-1 decode speed: the engine and HF transformers `generate` against the memory bound.

    OMP_NUM_THREADS=2 python bench/latency.py                    # SmolLM-135M-shaped
    python bench/latency.py --quick                              # tiny model, seconds

One request decodes --output-len tokens after a --prompt-len prompt. Decoding one token at batch 1
reads every weight once (the linear layers, the LM head, the norms), so its speed is bound by
memory bandwidth. The table gives decode tokens/s, the weight bytes read per second at that rate
(plus the KV cache read, which is small at batch 1), and that figure as a fraction of the memory
read bandwidth measured in the same run (a streaming `sum` over 512 MiB: what the memory system
delivers to reads). The bounds are measured before and after the systems run, and the higher
figure of each counts. The "weight GEMMs alone" row times just the model's linear layers and LM
head at one row, back to back with nothing in between, stored and called as the engine does (on
CPU in float32: the split GEMV of engine/models/cpu_gemm.py): what the BLAS itself reaches here,
the ceiling for any system that uses it; "oneDNN only" times the same weights through oneDNN's
linear alone (the kernel the split GEMV replaced at one row).

Engine: the time of each decode step (`LLMEngine.step()` after the prefill step), median over the
run. HF: (time of generate(N tokens) - time of generate(1 token)) / (N - 1), best of 3.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (
    SMOLLM_SHAPE,
    TINY_SHAPE,
    best_bounds,
    best_time,
    build_checkpoint,
    format_table,
    measure_bounds,
    model_cost,
)


def engine_decode_seconds(path: Path, prompt: list[int], args: argparse.Namespace) -> float:
    """Median seconds per decode step for one request."""
    from engine import EngineArgs, LLMEngine, SamplingParams

    engine = LLMEngine(
        EngineArgs(
            model=str(path),
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            attention_backend=args.attention_backend,
            max_num_seqs=8,
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    step_times: list[float] = []
    for run in range(2):  # the first run warms up
        engine.add_request(f"r{run}", prompt, params)
        engine.step()  # prefill (and the first token)
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            if run:
                step_times.append(time.perf_counter() - start)
    return statistics.median(step_times)


def hf_decode_seconds(path: Path, prompt: list[int], args: argparse.Namespace) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    model.eval()
    model.generation_config.pad_token_id = 0
    input_ids = torch.tensor([prompt])

    def generate(n: int) -> None:
        with torch.no_grad():
            model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )

    one = best_time(lambda: generate(1), 3)
    many = best_time(lambda: generate(args.output_len), 3)
    return (many - one) / (args.output_len - 1)


def gemv_only_seconds(hf_config, dtype: torch.dtype, onednn_only: bool = False) -> float:
    """Best time of the model's weight GEMMs alone at one row: every linear layer and the LM head,
    stored and called as the engine's linear layers (`default_linear_method`), fed a random
    row, nothing else in between. This is what the BLAS delivers for batch-1 decode here: the
    engine's ceiling. `onednn_only`: oneDNN's linear at every row count (no split GEMV), the
    kernel the engine used before, for comparison in the same run."""
    hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    layer = [
        ((heads + 2 * kv_heads) * head_dim, hidden),  # fused q/k/v
        (hidden, heads * head_dim),  # o
        (2 * inter, hidden),  # fused gate/up
        (hidden, inter),  # down
    ]
    from engine.models.layers import Linear, default_linear_method

    shapes = layer * hf_config.num_hidden_layers + [(hf_config.vocab_size, hidden)]
    inputs = {i: torch.randn(1, i, dtype=dtype) for _, i in shapes}
    cpu = torch.device("cpu")
    method = default_linear_method(dtype, cpu)
    linears = []
    for out_features, in_features in shapes:  # stored and called as the engine's loader does
        linear = Linear(in_features, out_features, False, dtype, cpu)
        linear.weight.data = torch.randn(out_features, in_features, dtype=dtype)
        linear.process_weights_after_loading(method)
        linears.append(linear)

    if onednn_only:
        from engine.models.cpu_gemm import onednn_linear

        def chain() -> None:
            for linear in linears:
                onednn_linear(inputs[linear.in_features], linear.packed, None)

    else:

        def chain() -> None:
            for linear in linears:
                linear(inputs[linear.in_features])

    return best_time(chain, 5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: SmolLM-135M-shaped)")
    p.add_argument("--quick", action="store_true", help="tiny model, few tokens: a smoke run")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--no-hf", action="store_true", help="skip the HF baseline")
    args = p.parse_args(argv)
    if args.quick:
        args.prompt_len, args.output_len = min(args.prompt_len, 8), min(args.output_len, 8)
        args.max_model_len = min(args.max_model_len, 512)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is not None:
        path = Path(args.model)
    else:
        shape, name = (TINY_SHAPE, "tiny-llama") if args.quick else (SMOLLM_SHAPE, "smollm-135m")
        path = build_checkpoint(shape, name)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    cost = model_cost(hf_config, getattr(torch, args.dtype))
    prompt = [3 + (i * 7919) % (hf_config.vocab_size - 3) for i in range(args.prompt_len)]
    bounds = measure_bounds(quick=args.quick, read=True)
    print(bounds.describe())
    # KV bytes read per token at the mean context of the decode steps.
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    context = args.prompt_len + args.output_len / 2
    element = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    kv_bytes = 2 * cost.num_layers * kv_heads * cost.head_dim * element * context
    read_bytes = cost.weight_bytes + kv_bytes
    print(
        f"model {path.name}: {cost.weight_bytes / 1e6:.0f} MB of weights read per token, "
        f"{kv_bytes / 1e6:.1f} MB of KV cache at the mean context ({context:.0f} tokens); "
        f"bound: {bounds.read_bandwidth / read_bytes:.1f} tokens/s at the read bandwidth"
    )
    systems = [("engine", engine_decode_seconds(path, prompt, args))]
    dtype = getattr(torch, args.dtype)
    systems.append(("weight GEMMs alone", gemv_only_seconds(hf_config, dtype)))
    from engine.models.layers import OneDNNLinearMethod, default_linear_method

    if isinstance(default_linear_method(dtype, torch.device("cpu")), OneDNNLinearMethod):
        systems.append(("  oneDNN only", gemv_only_seconds(hf_config, dtype, onednn_only=True)))
    if not args.no_hf:
        systems.append(("HF generate", hf_decode_seconds(path, prompt, args)))
    if not args.quick:  # measured again after the runs; the higher figures count
        bounds = best_bounds(bounds, measure_bounds(read=True))
        print("after the runs: " + bounds.describe())
    rows = []
    for name, seconds in systems:
        rows.append(
            [
                name,
                f"{seconds * 1e3:.1f}",
                f"{1 / seconds:.1f}",
                f"{read_bytes / seconds / 1e9:.1f}",
                f"{read_bytes / seconds / bounds.read_bandwidth:.0%}",
                f"{seconds / systems[0][1]:.2f}x",
            ]
        )
    print(
        format_table(
            ["system", "ms/token", "tokens/s", "GB/s read", "of read bandwidth", "engine speedup"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
