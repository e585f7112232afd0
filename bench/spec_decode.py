"""Speculative decoding: acceptance and end-to-end speed-up against no speculation, in one run.

For each batch size, the same greedy workload runs without speculation, with n-gram prompt
lookup, with suffix decoding, and with a draft model made of the target's own first layers (it
shares the target's embeddings and vocabulary, and most of its early computation). Each row
prints the generated tokens/s, the speed-up over the no-speculation row of the same batch size,
the draft acceptance rate, the mean tokens per verification step, and whether the output equals
the baseline's token for token (it must: greedy speculation never changes tokens).

The workload is "repetitive text": prompts made of a short random phrase repeated, the case
n-gram lookup is built for. The models have random weights, so acceptance depends on how much
their own continuations repeat, and a random model's first layers predict little of its output:
with the plain random target both proposers are rejected almost always, and the rows show the
cost of speculating for nothing. The "damped" target is the same model with the residual
contributions of its layers past the draft's scaled by 0.02 (o_proj and down_proj weights): a
synthetic target whose output its first layers mostly determine, as a trained model's early
layers partly do, which shows what the machinery gains when drafts are accepted.

The "code" workload is real: SmolLM2-135M-Instruct (float32, from
~/.cache/engine/bench/smollm2-135m-instruct-f32 or --code-model) asked, through its chat
template, to rewrite or continue code it is given; its answers repeat much of the prompt, which
is what n-gram lookup and suffix decoding exploit. It compares none / ngram / suffix. Answers end
at the model's end-of-sequence (at most --code-output-len tokens).

    python bench/spec_decode.py                 # SmolLM-135M-shaped target, 4-layer draft,
                                                # then the SmolLM2 code workload
    python bench/spec_decode.py --workload code --batch-sizes 1 4
    python bench/spec_decode.py --quick         # tiny model, a few seconds (synthetic only)
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


CODE_SNIPPETS = [
    """def merge_intervals(intervals):
    intervals = sorted(intervals, key=lambda x: x[0])
    merged = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged
""",
    """class LRUCache:
    def __init__(self, capacity):
        self.capacity = capacity
        self.items = {}
        self.order = []

    def get(self, key):
        if key not in self.items:
            return -1
        self.order.remove(key)
        self.order.append(key)
        return self.items[key]

    def put(self, key, value):
        if key in self.items:
            self.order.remove(key)
        elif len(self.items) >= self.capacity:
            oldest = self.order.pop(0)
            del self.items[oldest]
        self.items[key] = value
        self.order.append(key)
""",
    """def word_counts(path):
    counts = {}
    with open(path) as f:
        for line in f:
            for word in line.split():
                word = word.lower().strip(".,;:!?")
                if word:
                    counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda kv: kv[1], reverse=True)
""",
]
CODE_TASKS = [
    "Rewrite this Python code with type hints and a docstring. Reply with the whole code.",
    "Rename the variables of this Python code to clearer names and show the full result.",
    "Here is some Python code. Repeat it, then continue it with a short usage example.",
]
DEFAULT_CODE_MODEL = Path.home() / ".cache/engine/bench/smollm2-135m-instruct-f32"


def code_prompts(model: Path, count: int) -> list[list[int]]:
    """Chat prompts asking the model to rewrite or continue one of the code snippets."""
    from engine.tokenizer import apply_chat_template, load_tokenizer

    tokenizer = load_tokenizer(model)
    prompts = []
    for i in range(count):
        task = CODE_TASKS[i % len(CODE_TASKS)]
        code = CODE_SNIPPETS[(i // len(CODE_TASKS) + i) % len(CODE_SNIPPETS)]
        messages = [{"role": "user", "content": f"{task}\n\n```python\n{code}```"}]
        prompts.append(apply_chat_template(tokenizer, messages))
    return prompts


def run(
    path: Path,
    prompts: list[list[int]],
    args: argparse.Namespace,
    spec: dict | None,
    max_model_len: int = 512,
    ignore_eos: bool = True,
):
    llm = LLM(
        str(path),
        dtype="float32",
        max_model_len=max_model_len,
        max_num_seqs=max(len(prompts), 1),
        speculative_config=spec,
    )
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=ignore_eos)
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
    p.add_argument(
        "--workload",
        choices=["synthetic", "code", "all"],
        default=None,
        help="default: all (synthetic with --quick)",
    )
    p.add_argument("--code-model", type=Path, default=DEFAULT_CODE_MODEL)
    p.add_argument("--code-output-len", type=int, default=None)
    p.add_argument(
        "--suffix-max-spec-factor",
        type=float,
        default=1.0,
        help="suffix_decoding_max_spec_factor of the suffix rows",
    )
    args = p.parse_args(argv)
    args.workload = args.workload or ("synthetic" if args.quick else "all")
    args.code_output_len = args.code_output_len or (24 if args.quick else 160)
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 16])
    args.output_len = args.output_len or (16 if args.quick else 64)
    args.draft_layers = args.draft_layers or (1 if args.quick else 4)
    return args


SUFFIX_FACTOR = 1.0  # vLLM's default suffix_decoding_max_spec_factor; --suffix-max-spec-factor


def suffix_config(k: int) -> dict:
    return {
        "method": "suffix",
        "num_speculative_tokens": k,
        "suffix_decoding_max_spec_factor": SUFFIX_FACTOR,
    }


def row(target, batch, label, tokens, seconds, stats, baseline_tokens, baseline_s) -> list:
    generated = sum(len(t) for t in tokens)
    return [
        target,
        batch,
        label,
        f"{generated / seconds:.1f}",
        f"{baseline_s / seconds:.2f}x",
        f"{100 * stats.acceptance_rate:.1f}%" if stats else "-",
        f"{stats.mean_acceptance_length:.2f}" if stats else "1.00",
        "yes" if tokens == baseline_tokens else "NO",
    ]


def code_rows(args: argparse.Namespace) -> list[list]:
    """none / ngram / suffix on SmolLM2 rewriting and continuing code (greedy)."""
    if not (args.code_model / "config.json").is_file():
        print(f"code workload skipped: no checkpoint at {args.code_model}", file=sys.stderr)
        return []
    ngram = {
        "method": "ngram",
        "num_speculative_tokens": args.k,
        "prompt_lookup_min": 1,
        "prompt_lookup_max": 4,
    }
    configs = [
        ("none", None),
        (f"ngram k={args.k}", ngram),
        (f"suffix k={args.k}", suffix_config(args.k)),
    ]
    coded = argparse.Namespace(**{**vars(args), "output_len": args.code_output_len})
    rows = []
    for batch in args.batch_sizes:
        prompts = code_prompts(args.code_model, batch)
        baseline_tokens, baseline_s = None, None
        for label, spec in configs:
            # The answer ends at end-of-sequence: what follows it would not be the workload.
            tokens, seconds, stats = run(args.code_model, prompts, coded, spec, 1024, False)
            if baseline_tokens is None:
                baseline_tokens, baseline_s = tokens, seconds
            rows.append(
                row(
                    "smollm2 code",
                    batch,
                    label,
                    tokens,
                    seconds,
                    stats,
                    baseline_tokens,
                    baseline_s,
                )
            )
            print(
                f"code workload, batch {batch}, {label}: {seconds:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global SUFFIX_FACTOR
    SUFFIX_FACTOR = args.suffix_max_spec_factor
    rows = [] if args.workload == "code" else synthetic_rows(args)
    if args.workload in ("code", "all"):
        rows += code_rows(args)
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


def synthetic_rows(args: argparse.Namespace) -> list[list]:
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
        (f"suffix k={args.k}", suffix_config(args.k)),
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
        (configs[3][0], {**configs[3][1], "model": str(damped_draft)}),  # type: ignore[dict-item]
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
                result = (tokens, seconds, stats, baseline_tokens, baseline_s)
                rows.append(row(target_label, batch, label, *result))
                print(
                    f"{target_label} target, batch {batch}, {label}: {seconds:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    sys.exit(main())
