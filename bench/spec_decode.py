"""Speculative decoding: acceptance and end-to-end speed-up against no speculation, in one run.

For each batch size, the same greedy workload runs without speculation, with n-gram prompt
lookup, and with a draft model made of the target's own first layers (it shares the target's
embeddings and vocabulary, and most of its early computation). Each row prints the generated
tokens/s, the speed-up over the no-speculation row of the same batch size, the draft acceptance
rate, the mean tokens per verification step, and whether the output equals the baseline's token
for token (it must: greedy speculation never changes tokens).

The workload is "repetitive text": prompts made of a short random phrase repeated, the case
n-gram lookup is built for. The models have random weights, so acceptance depends on how much
their own continuations repeat, and a random model's first layers predict little of its output:
with the plain random target both proposers are rejected almost always, and the rows show the
cost of speculating for nothing. The "damped" target is the same model with the residual
contributions of its layers past the draft's scaled by 0.02 (o_proj and down_proj weights): a
synthetic target whose output its first layers mostly determine, as a trained model's early
layers partly do, which shows what the machinery gains when drafts are accepted.

    python bench/spec_decode.py                 # SmolLM-135M-shaped target, 4-layer draft
    python bench/spec_decode.py --quick         # tiny model, a few seconds
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SMOLLM_SHAPE, TINY_SHAPE, build_checkpoint, cache_dir, format_table
from engine import LLM, SamplingParams
from engine.demo import make_layer_truncated_checkpoint


def damped_target(target: Path, path: Path, first: int, scale: float = 0.02) -> Path:
    """`target` with layers >= first contributing `scale` times as much to the residual."""
    import shutil

    from safetensors.torch import load_file, save_file

    if (path / "model.safetensors").is_file():
        return path
    shutil.copytree(target, path, dirs_exist_ok=True)
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        for name, tensor in tensors.items():
            parts = name.split(".")
            late = len(parts) > 3 and parts[1] == "layers" and int(parts[2]) >= first
            if late and parts[-2] in ("o_proj", "down_proj"):
                tensors[name] = tensor * scale
        save_file(tensors, file, metadata={"format": "pt"})
    return path


def repetitive_prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        phrase = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 8))]
        prompts.append(phrase * rng.randint(3, 6))
    return prompts


def run(path: Path, prompts: list[list[int]], args: argparse.Namespace, spec: dict | None):
    llm = LLM(
        str(path),
        dtype="float32",
        max_model_len=512,
        max_num_seqs=max(len(prompts), 1),
        speculative_config=spec,
    )
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:1], params.replace(max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outputs]
    return tokens, seconds, llm.llm_engine.get_stats().spec_decode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and workload (smoke test)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--draft-layers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 16])
    args.output_len = args.output_len or (16 if args.quick else 64)
    args.draft_layers = args.draft_layers or (1 if args.quick else 4)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape, name = (TINY_SHAPE, "tiny-llama") if args.quick else (SMOLLM_SHAPE, "smollm-135m")
    target = build_checkpoint(shape, name)
    draft = cache_dir() / f"{name}-first{args.draft_layers}"
    if not (draft / "model.safetensors").is_file():
        make_layer_truncated_checkpoint(target, draft, args.draft_layers)
    configs: list[tuple[str, dict | None]] = [
        ("none", None),
        (
            f"ngram k={args.k}",
            {
                "method": "ngram",
                "num_speculative_tokens": args.k,
                "prompt_lookup_min": 1,
                "prompt_lookup_max": 4,
            },
        ),
        (
            f"draft {args.draft_layers}/{shape['num_hidden_layers']} layers k={args.k}",
            {"method": "draft_model", "model": str(draft), "num_speculative_tokens": args.k},
        ),
    ]
    damped = damped_target(
        target, cache_dir() / f"{name}-damped{args.draft_layers}", args.draft_layers
    )
    damped_draft = cache_dir() / f"{name}-damped{args.draft_layers}-first{args.draft_layers}"
    if not (damped_draft / "model.safetensors").is_file():
        make_layer_truncated_checkpoint(damped, damped_draft, args.draft_layers)
    damped_configs: list[tuple[str, dict | None]] = [
        ("none", None),
        (configs[2][0], {**configs[2][1], "model": str(damped_draft)}),  # type: ignore[dict-item]
    ]
    rows = []
    for target_label, target_path, target_configs in (
        ("random", target, configs),
        ("damped", damped, damped_configs),
    ):
        for batch in args.batch_sizes:
            prompts = repetitive_prompts(batch, shape["vocab_size"], args.seed)
            baseline_tokens, baseline_s = None, None
            for label, spec in target_configs:
                tokens, seconds, stats = run(target_path, prompts, args, spec)
                if baseline_tokens is None:
                    baseline_tokens, baseline_s = tokens, seconds
                generated = sum(len(t) for t in tokens)
                rows.append(
                    [
                        target_label,
                        batch,
                        label,
                        f"{generated / seconds:.1f}",
                        f"{baseline_s / seconds:.2f}x",
                        f"{100 * stats.acceptance_rate:.1f}%" if stats else "-",
                        f"{stats.mean_acceptance_length:.2f}" if stats else "1.00",
                        "yes" if tokens == baseline_tokens else "NO",
                    ]
                )
                print(
                    f"{target_label} target, batch {batch}, {label}: {seconds:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    headers = [
        "target",
        "batch",
        "speculation",
        "tok/s",
        "speed-up",
        "acceptance",
        "tokens/step",
        "same",
    ]
    print(format_table(headers, rows))
    return 0 if all(r[-1] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
