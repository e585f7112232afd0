"""`python -m engine.generate`: offline generation from the command line.

With no --model it runs the embedded demo model (random weights: the text is noise, the
machinery is real). Engine flags use vLLM's names. `--attention-backend` and the
`--speculative-config` method take registered plug-in names (modules listed in $ENGINE_PLUGINS
are imported first) or `package.module:Factory` references. `--logits-processors` takes
`package.module:Class` references of custom logits processors (engine/logits_process.py), and
`--extra-args` the JSON object every prompt's `SamplingParams.extra_args` gets. A sampling flag
not given takes the model's generation-config default (`--generation-config`,
`--override-generation-config`, as the server's), else this tool's (greedy, 32 tokens). The
backend in use, and with speculation the drafts and acceptance, are logged to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engine import LLM, SamplingParams

logger = logging.getLogger("engine.generate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument(
        "--attention-backend",
        default="auto",
        help="auto, torch, reference, flash-attn, xformers, a registered name or pkg.mod:Factory",
    )
    p.add_argument(
        "--speculative-config",
        default=None,
        help='JSON, e.g. \'{"method": "suffix", "num_speculative_tokens": 4}\'',
    )
    p.add_argument("--quantization", "-q", default=None, help="int8, int4, gguf or none")
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="shard the model over this many processes (engine/distributed)",
    )
    p.add_argument(
        "--logits-processors",
        nargs="+",
        default=None,
        help="custom logits processors, each pkg.module:Class",
    )
    p.add_argument(
        "--extra-args",
        default=None,
        help="JSON object for SamplingParams.extra_args (logits processors), e.g. '{\"ban\": 7}'",
    )
    p.add_argument(
        "--generation-config",
        default="auto",
        help='"auto": the model\'s generation_config.json sets the sampling defaults; "vllm": '
        "this tool's own; or a folder holding a generation_config.json",
    )
    p.add_argument(
        "--override-generation-config",
        default=None,
        help="JSON merged over the generation config, e.g. '{\"temperature\": 0.5}'",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="default: the model's, else 32")
    p.add_argument("--temperature", type=float, default=None, help="default: the model's, else 0")
    p.add_argument("--top-p", type=float, default=None, help="default: the model's, else 1")
    p.add_argument("--top-k", type=int, default=None, help="default: the model's, else -1")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = args.prompt or ["Once upon a time"]
    try:
        llm = LLM(
            args.model,
            dtype=args.dtype,
            seed=args.seed,
            max_model_len=args.max_model_len,
            block_size=args.block_size,
            max_num_seqs=args.max_num_seqs,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            attention_backend=args.attention_backend,
            speculative_config=args.speculative_config,
            quantization=args.quantization,
            logits_processors=args.logits_processors,
            tensor_parallel_size=args.tensor_parallel_size,
            generation_config=args.generation_config,
            override_generation_config=args.override_generation_config,
        )
        engine = llm.llm_engine
        backend = getattr(engine.attention_backend, "name", type(engine.attention_backend).__name__)
        logger.info("attention backend: %s", backend)
        params = sampling_params(llm, args)
        if args.chat:
            conversations = [[{"role": "user", "content": p}] for p in prompts]
            outputs = llm.chat(conversations, params)
        else:
            outputs = llm.generate(prompts, params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = engine.get_stats().spec_decode
    engine.shutdown()  # tensor-parallel workers, if any
    if stats is not None:
        logger.info(
            "speculative decoding: %d drafts, %d draft tokens, %d accepted (%.1f%%)",
            stats.num_drafts,
            stats.num_draft_tokens,
            stats.num_accepted_tokens,
            100 * stats.acceptance_rate,
        )
    for prompt, out in zip(prompts, outputs, strict=True):
        completion = out.outputs[0]
        if args.json:
            record = {
                "prompt": prompt,
                "text": completion.text,
                "token_ids": completion.token_ids,
                "finish_reason": completion.finish_reason,
            }
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(f"--- prompt: {prompt!r}\n{completion.text!r} ({completion.finish_reason})")
    return 0


# This tool's own defaults (greedy, 32 tokens), for the fields neither a flag nor the model's
# generation config sets.
_TOOL_DEFAULTS = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 32}


def sampling_params(llm: LLM, args: argparse.Namespace) -> SamplingParams:
    """The flags given, else the model's generation-config defaults, else _TOOL_DEFAULTS."""
    fields = {**_TOOL_DEFAULTS, **llm.llm_engine.generation_defaults.fields}
    for name in _TOOL_DEFAULTS:
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return SamplingParams(**fields, extra_args=_json_object("extra_args", args.extra_args))


def _json_object(name: str, text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
