"""The engine's host cost per step against the output length: flat, not growing with it.

One run generates long outputs for a batch of requests and times every step twice: the whole
`LLMEngine.step()` and, inside it, the model's forward (whose attention does grow with the
length: that is the model's work, not the engine's). The difference is the engine's own work
per step: scheduling, input packing, logits and sampling (penalties included), detokenization,
stop-string checks and the outputs. The table compares the median of that host time over a
window of steps early in the outputs (around `--early` tokens) with one at the end (around
`--output-len` tokens), for each `output_kind`:

* DELTA outputs carry only the new tokens, text and logprobs: the host time should stay flat
  (ratio near 1).
* CUMULATIVE outputs copy every request's whole token list, logprobs and text each step: the
  copies grow with the length (the row shows how much that costs).

Timings are noisy on a shared machine, so each row also counts the engine's Python-level calls
per step (functions of the `engine` package entered, plus builtins / C methods they call, by a
profiler hook) over `block_size` steps right next to each timed window (those steps are not
timed): a count that grows with the length is work per step that grows with it, whatever the
noise. Detokenization and logprob texts are left out of the count: their tokenizer caches make
it vary with the tokens drawn, not with the length.

The requests use what makes per-step work depend on the length when done naively: logprobs,
repetition / presence / frequency penalties (counted incrementally per request), and a stop
string (that never matches) so the stop checker runs.

    python bench/output_cost.py            # 8 requests, outputs of 2048 tokens, tiny model
    python bench/output_cost.py --quick    # 4 requests, 256 tokens (a few seconds)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import TINY_SHAPE, build_checkpoint, format_table
from engine import EngineArgs, LLMEngine, SamplingParams
from engine.sampling_params import RequestOutputKind

PROMPT_LEN = 16


@dataclass(frozen=True, slots=True)
class Row:
    output_kind: str
    early_len: int  # output length at the middle of the early window
    late_len: int
    host_us_early: float  # median engine time per step outside the model forward, µs
    host_us_late: float
    ratio: float  # host_us_late / host_us_early
    forward_ms_early: float  # median model forward per step, ms (for scale)
    forward_ms_late: float
    calls_early: float  # engine Python-level calls per step (mean over block_size steps)
    calls_late: float


class ForwardTimer:
    """Accumulates the wall time spent inside a module's forward (pre / post hooks)."""

    def __init__(self, module) -> None:
        self.total = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_) -> None:
        self._start = time.perf_counter()

    def _post(self, *_) -> None:
        self.total += time.perf_counter() - self._start


ENGINE_DIR = str(Path(__file__).resolve().parent.parent / "engine") + "/"
NOT_COUNTED = tuple(ENGINE_DIR + name for name in ("tokenizer.py", "logprobs.py"))


def count_calls(fn: Callable[[], object]) -> int:
    """The engine's Python-level calls during fn(): its functions entered and the builtins / C
    methods they call (detokenization and logprob texts left out)."""
    count = 0

    def hook(frame, event, arg) -> None:
        nonlocal count
        if event == "call" or event == "c_call":
            filename = frame.f_code.co_filename
            if filename.startswith(ENGINE_DIR) and not filename.startswith(NOT_COUNTED):
                count += 1

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def start_engine(model: Path, kind: RequestOutputKind, args: argparse.Namespace) -> LLMEngine:
    """An engine with the benchmark's requests added."""
    max_len = PROMPT_LEN + args.output_len + 1
    engine = LLMEngine(
        EngineArgs(model=str(model), dtype="float32", max_model_len=max_len, seed=args.seed)
    )
    rng = random.Random(args.seed)
    for i in range(args.batch_size):
        prompt = [rng.randrange(3, TINY_SHAPE["vocab_size"]) for _ in range(PROMPT_LEN)]
        params = SamplingParams(
            temperature=0.8,
            top_p=0.95,
            seed=i,
            max_tokens=args.output_len,
            ignore_eos=True,
            logprobs=5,
            repetition_penalty=1.1,
            presence_penalty=0.2,
            frequency_penalty=0.2,
            stop=["\x00never\x00"],
            output_kind=kind,
        )
        engine.add_request(str(i), prompt, params)
    return engine


def warm_up(model: Path, args: argparse.Namespace) -> None:
    """The first steps of the process's first engine run slower (kernel and allocator caches
    warming up for each new shape), which would inflate the first row's early window: run
    those steps once, untimed."""
    engine = start_engine(model, RequestOutputKind.DELTA, args)
    for _ in range(args.early + args.window):
        engine.step()


def measure(model: Path, kind: RequestOutputKind, args: argparse.Namespace) -> Row:
    engine = start_engine(model, kind, args)
    timer = ForwardTimer(engine.runner.model)
    # Steps whose calls are counted (not timed): block_size steps (every request starts one
    # new block in them) right after the early window and right before the late one.
    block_size = engine.cache_config.block_size
    half = args.window // 2
    late_center = args.output_len - half
    counted_early = range(args.early + half, args.early + half + block_size)
    counted_late = range(late_center - half - block_size, late_center - half)
    calls: dict[int, int] = {}
    # (output length after the step, host seconds, forward seconds); without speculation every
    # request gains one token per step, the first in the prefill step.
    steps: list[tuple[int, float, float]] = []
    while engine.has_unfinished_requests():
        number = len(steps) + len(calls) + 1
        if number in counted_early or number in counted_late:
            calls[number] = count_calls(engine.step)
            continue
        forward_before = timer.total
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        forward = timer.total - forward_before
        steps.append((number, elapsed - forward, forward))

    def window(center: int) -> list[tuple[int, float, float]]:
        return [s for s in steps if center - half <= s[0] < center + half]

    def mean_calls(numbers: range) -> float:
        return statistics.mean(calls[n] for n in numbers)

    early, late = window(args.early), window(late_center)
    host_early = statistics.median(s[1] for s in early) * 1e6
    host_late = statistics.median(s[1] for s in late) * 1e6
    return Row(
        output_kind=kind.name,
        early_len=args.early,
        late_len=late_center,
        host_us_early=host_early,
        host_us_late=host_late,
        ratio=host_late / host_early,
        forward_ms_early=statistics.median(s[2] for s in early) * 1e3,
        forward_ms_late=statistics.median(s[2] for s in late) * 1e3,
        calls_early=mean_calls(counted_early),
        calls_late=mean_calls(counted_late),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny workload (smoke test)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--early", type=int, default=None, help="output length of the early window")
    p.add_argument("--window", type=int, default=None, help="steps per window")
    p.add_argument(
        "--output-kinds",
        nargs="+",
        default=["DELTA", "CUMULATIVE"],
        choices=["DELTA", "CUMULATIVE"],
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (4 if args.quick else 8)
    args.output_len = args.output_len or (256 if args.quick else 2048)
    args.early = args.early or (32 if args.quick else 64)
    args.window = args.window or (16 if args.quick else 32)
    if not args.window < args.early < args.output_len - 2 * args.window - 16:
        p.error("need --window < --early < --output-len - 2 * --window - 16")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    max_pos = 1 << (PROMPT_LEN + args.output_len + 1).bit_length()
    model = build_checkpoint(
        {**TINY_SHAPE, "max_position_embeddings": max_pos}, f"tiny-llama-{max_pos}"
    )
    warm_up(model, args)
    rows = [measure(model, RequestOutputKind[kind], args) for kind in args.output_kinds]
    print(
        f"{args.batch_size} requests, outputs of {args.output_len} tokens, tiny model; host = "
        "engine step time outside the model forward (median over a window of steps)"
    )
    print(
        format_table(
            [
                "output_kind",
                "early len",
                "late len",
                "host us/step early",
                "host us/step late",
                "late / early",
                "forward ms early",
                "forward ms late",
                "calls/step early",
                "calls/step late",
            ],
            [list(asdict(r).values()) for r in rows],
        )
    )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
