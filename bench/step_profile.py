"""One batch-1 decode step under torch.profiler: op calls per step and self-CPU time by module.

    OMP_NUM_THREADS=2 python bench/step_profile.py --model DIR     # e.g. SmolLM2-135M fp32
    python bench/step_profile.py --quick                # tiny model, seconds

The engine runs one request (a --prompt-len prompt) through prefill, then --steps decode steps are
recorded. Every op is attributed to the innermost engine module it ran in (record_function
scopes per module: norm, attention's projections, rope, KV write, attention kernel, MLP
activation, residual adds, logits, sampler). Self-CPU shares are what to trust on a noisy shared
machine; op counts are exact.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--top", type=int, default=25)
    return p.parse_args(argv)


def _label(name: str) -> str:
    """A module's qualified name -> its kind (layers.3.self_attn.qkv_proj -> attn.qkv_proj)."""
    parts = [p for p in name.split(".") if not p.isdigit() and p != "layers"]
    return ".".join(parts[-2:]) if parts else "model"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from common import TINY_SHAPE, build_checkpoint

    from engine import EngineArgs, LLMEngine, SamplingParams

    path = Path(args.model) if args.model else build_checkpoint(TINY_SHAPE, "tiny-llama")
    if args.quick:
        args.steps = min(args.steps, 2)
        args.prompt_len = min(args.prompt_len, 8)
    engine = LLMEngine(
        EngineArgs(model=str(path), dtype=args.dtype, max_model_len=512, max_num_seqs=8)
    )
    model = engine.runner.model
    # record_function scope per module, so every op lands in the module that ran it.
    handles = []
    for name, module in model.named_modules():
        label = _label(name)

        def pre(_m, _a, label=label):
            ctx = torch.autograd.profiler.record_function("mod::" + label)
            ctx.__enter__()
            _m._prof_ctx = ctx

        def post(_m, _a, _o):
            _m._prof_ctx.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    # The attention module's glue: rope, KV write and the attention kernel get scopes of their own.
    def scoped(fn, label):
        def wrapper(*a, **k):
            with torch.autograd.profiler.record_function("mod::" + label):
                return fn(*a, **k)

        return wrapper

    backends = set()
    for module in model.modules():
        if hasattr(module, "backend") and hasattr(module, "rotary") and callable(module.rotary):
            module.rotary = scoped(module.rotary, "self_attn.rope")
            backends.add(module.backend)
    for backend in backends:
        backend.write_kv = scoped(backend.write_kv, "self_attn.kv_write")
        backend.forward = scoped(backend.forward, "self_attn.backend")
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 3, ignore_eos=True)
    engine.add_request("r", [3 + (i * 7919) % 1000 for i in range(args.prompt_len)], params)
    engine.step()
    engine.step()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    for h in handles:
        h.remove()
    # Attribute each op to its innermost module scope (events are nested by time on one thread).
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    scopes = sorted(
        (e for e in events if e.name.startswith("mod::")), key=lambda e: e.time_range.start
    )
    ops = [e for e in events if e.name.startswith("aten::") or e.name.startswith("mkldnn::")]
    by_scope: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    top_ops: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    total_ops = 0
    for op in ops:
        inner = None
        for s in scopes:  # innermost = latest start containing the op
            if s.time_range.start <= op.time_range.start and op.time_range.end <= s.time_range.end:
                inner = s
            elif s.time_range.start > op.time_range.start:
                break
        key = inner.name[5:] if inner is not None else "(outside model)"
        by_scope[key][0] += 1
        by_scope[key][1] += op.self_cpu_time_total
        top_ops[op.name][0] += 1
        top_ops[op.name][1] += op.self_cpu_time_total
        total_ops += 1
    total_us = sum(v[1] for v in by_scope.values())
    print(
        f"op calls per decode step: {total_ops / args.steps:.0f} (aten/mkldnn, {args.steps} steps)"
    )
    print(f"{'module':32s} {'ops/step':>9s} {'self ms/step':>13s} {'share':>6s}")
    for key, (n, us) in sorted(by_scope.items(), key=lambda kv: -kv[1][1]):
        print(f"{key:32s} {n / args.steps:9.0f} {us / 1e3 / args.steps:13.2f} {us / total_us:6.1%}")
    print(f"\n{'op':40s} {'calls/step':>10s} {'self ms/step':>13s}")
    for name, (n, us) in sorted(top_ops.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{name:40s} {n / args.steps:10.0f} {us / 1e3 / args.steps:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
