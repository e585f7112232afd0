"""The cost of structured outputs: decode tok/s with and without a JSON schema, batch 1 and 32,
in one run (issue 16's target: at most 10% slower at batch 32).

    python bench/structured.py              # SmolLM2-135M-Instruct fp32 if cached, else a
                                            # random-weight SmolLM-shaped model (vocab 49152)
    python bench/structured.py --model DIR  # any checkpoint directory
    python bench/structured.py --quick      # tiny model, batch 1 and 4, a few seconds

Each row generates `--output-len` tokens per request (sampled, seeded, ignore_eos) from the same
prompts, once unconstrained and once under the JSON schema below; a constrained request may end
earlier (its grammar completes), so rows report tokens generated and tok/s = tokens / seconds.
`mask ms/step` is the time spent computing and applying grammar bitmasks, measured in the same
run by timing the engine's own calls (`bitmasks_for` and the sampler's `apply_grammar`).
Absolute numbers depend on the machine; compare the ratio column.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python bench/structured.py`

from common import SMOLLM_SHAPE, TINY_SHAPE, build_checkpoint, cache_dir, format_table

import engine.sampler as sampler_module
from engine import LLM, SamplingParams
from engine.structured.manager import StructuredOutputManager

# Long-running by design: a list of records, so a request rarely completes the value early.
SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "value": {"type": "number"},
                    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
                },
                "required": ["name", "value"],
            },
        }
    },
    "required": ["records"],
}
PROMPT = "Write a JSON object listing many records with a name, a value and tags:"


@dataclass(frozen=True, slots=True)
class Row:
    batch: int
    constrained: bool
    tokens: int
    seconds: float
    tok_per_s: float
    mask_ms_per_step: float


class MaskTimer:
    """Wraps the engine's two grammar calls and adds up their time."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._bitmasks = StructuredOutputManager.bitmasks_for
        self._apply = sampler_module.apply_grammar

    def __enter__(self) -> MaskTimer:
        timer = self

        def bitmasks_for(requests):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return timer._bitmasks(requests)
            finally:
                timer.seconds += time.perf_counter() - start
                timer.calls += 1

        def apply_grammar(processed, raw, rows):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return timer._apply(processed, raw, rows)
            finally:
                timer.seconds += time.perf_counter() - start

        StructuredOutputManager.bitmasks_for = staticmethod(bitmasks_for)  # type: ignore[method-assign]
        sampler_module.apply_grammar = apply_grammar
        return self

    def __exit__(self, *exc: object) -> None:
        StructuredOutputManager.bitmasks_for = staticmethod(self._bitmasks)  # type: ignore[method-assign]
        sampler_module.apply_grammar = self._apply


def run(llm: LLM, batch: int, constrained: bool, args: argparse.Namespace) -> Row:
    structured = {"json": SCHEMA} if constrained else None
    params = [
        SamplingParams(
            temperature=0.8,
            seed=i,
            max_tokens=args.output_len,
            ignore_eos=True,
            structured_outputs=structured,
        )
        for i in range(batch)
    ]
    prompts = [PROMPT] * batch
    llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up (and compile the schema)
    with MaskTimer() as timer:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = max(timer.calls, 1)
    return Row(batch, constrained, tokens, seconds, tokens / seconds, 1e3 * timer.seconds / steps)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, small batches (smoke test)")
    p.add_argument("--model", type=str, default=None, help="checkpoint directory")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 32])
    args.output_len = args.output_len or (16 if args.quick else 128)
    return args


def default_model(quick: bool) -> str:
    if quick:
        return str(build_checkpoint(TINY_SHAPE, "tiny-llama"))
    real = cache_dir() / "smollm2-135m-instruct-f32"
    if (real / "model.safetensors").is_file():
        return str(real)
    return str(build_checkpoint(SMOLLM_SHAPE, "smollm-shaped"))


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    model = args.model or default_model(args.quick)
    llm = LLM(model, dtype="float32", seed=0, max_model_len=512)
    rows = []
    for batch in args.batch_sizes:
        plain = run(llm, batch, False, args)
        constrained = run(llm, batch, True, args)
        rows += [plain, constrained]
    print(f"model {model}; {args.output_len} tokens per request, sampled, ignore_eos")
    table = []
    for plain, constrained in zip(rows[::2], rows[1::2], strict=True):
        for row in (plain, constrained):
            ratio = row.tok_per_s / plain.tok_per_s
            table.append(
                [
                    row.batch,
                    "json schema" if row.constrained else "none",
                    row.tokens,
                    row.seconds,
                    row.tok_per_s,
                    ratio,
                    row.mask_ms_per_step,
                ]
            )
    print(
        format_table(
            ["batch", "constraint", "tokens", "seconds", "tok/s", "vs none", "mask ms/step"], table
        )
    )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
