"""`python -m engine.diff --layers`: where in the network do two paths part?

The same packed step (every prompt's tokens prefilled together, as the engine's first step does)
runs through two *sides*, and the activations at each module boundary are compared:

    embedding            the token embeddings (after a family's embedding scale, Gemma)
    attention  (layer i) the attention block's output (after o_proj, before the residual add)
    mlp        (layer i) the MLP / MoE block's output
    layer      (layer i) the residual stream leaving the layer
    final_norm           the final norm's output (the hidden states the head reads)
    logits               the LM head's output at every position

A side is `key=value,...` with keys `backend` (an attention backend name or `pkg.mod:Factory`),
`dtype`, `quantization` (int8, int4, none), or `hf` (Hugging Face transformers' model, sdpa
attention, eager for soft-capped models, one prompt at a time; its activations are concatenated
in the packed order).

Capture is explicit and costs nothing when unused: torch `register_forward_hook`s on the named
modules (the per-family names below), removed after the step; the engine's model code is not
changed and, without hooks, pays nothing.

Errors per (sub-step, layer), in float64: `max_abs` = max |candidate - reference| over every
element; `max_rel` = max_abs / max |reference| (relative to the tensor's scale, which is stable
where element-wise ratios are not). A row is beyond tolerance when max_rel > tolerance (default
by the less precise side: see DEFAULT_TOLERANCE); the report names the first such row in network
order and the token (prompt, position) of its largest error. Exit status: 0 within tolerance,
1 beyond, 2 bad arguments.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# Module names per side. The engine's families all build CausalLM-shaped models
# (engine/models/base.py, llama.py): embed_tokens, layers[i].self_attn / .mlp, norm. HF's sit
# under `.model`; older transformers name Mixtral's MoE `block_sparse_moe`.
ENGINE_NAMES = {
    "embedding": ("embed_tokens",),
    "layers": ("layers",),
    "attention": ("self_attn",),
    "mlp": ("mlp", "block_sparse_moe"),
    "final_norm": ("norm",),
}
HF_NAMES = {
    "embedding": ("model.embed_tokens",),
    "layers": ("model.layers",),
    "attention": ("self_attn",),
    "mlp": ("mlp", "block_sparse_moe"),
    "final_norm": ("model.norm",),
}
STEPS = ("embedding", "attention", "mlp", "layer", "final_norm", "logits")
DEFAULT_TOLERANCE = {  # relative to the tensor's scale
    "float64": 1e-9,
    "float32": 1e-3,
    "bfloat16": 5e-2,
    "float16": 5e-2,
    "int8": 2e-1,
    "int4": 5e-1,
}


@dataclass(frozen=True, slots=True)
class Side:
    """One path through the model."""

    backend: str = "reference"
    dtype: str | None = None  # None: the command's --dtype
    quantization: str | None = None
    hf: bool = False

    @classmethod
    def parse(cls, text: str, field_name: str) -> Side:
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if key == "hf" and (not sep or value.strip().lower() in ("1", "true", "yes")):
                values["hf"] = True
            elif key in ("backend", "dtype", "quantization") and sep and value.strip():
                values[key] = value.strip()
            else:
                raise ValueError(
                    f"{field_name}: {part!r} is not backend=NAME, dtype=D, quantization=Q or hf"
                )
        return cls(**values)

    def describe(self) -> str:
        if self.hf:
            return f"hf transformers, dtype={self.dtype}"
        quant = f", quantization={self.quantization}" if self.quantization else ""
        return f"engine, backend={self.backend}, dtype={self.dtype}{quant}"


@dataclass(frozen=True, slots=True)
class Capture:
    """One side's activations: (step, layer or None) -> float64 tensor [T, ...]."""

    tensors: dict[tuple[str, int | None], torch.Tensor]
    num_layers: int
    dtype: str


@dataclass(frozen=True, slots=True)
class Row:
    step: str
    layer: int | None
    max_abs: float
    max_rel: float
    prompt: int  # where the largest error is: prompt index and position in it
    position: int
    ok: bool


@dataclass(slots=True)
class LayerReport:
    model: str
    reference: str
    candidate: str
    num_prompts: int
    num_tokens: int
    tolerance: float
    rows: list[Row] = field(default_factory=list)

    @property
    def first_beyond(self) -> Row | None:
        return next((row for row in self.rows if not row.ok), None)

    def to_json(self) -> dict[str, Any]:
        first = self.first_beyond
        return {
            "model": self.model,
            "reference": self.reference,
            "candidate": self.candidate,
            "num_prompts": self.num_prompts,
            "num_tokens": self.num_tokens,
            "tolerance": self.tolerance,
            "agree": first is None,
            "first_beyond_tolerance": None if first is None else asdict(first),
            "rows": [asdict(row) for row in self.rows],
        }


# ---- capture ---------------------------------------------------------------------------------


def _module(root: torch.nn.Module, names: tuple[str, ...]) -> torch.nn.Module | None:
    for name in names:
        try:
            return root.get_submodule(name)
        except AttributeError:
            continue
    return None


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


class _Hooks:
    """Forward hooks storing each named module's output (float64, on CPU, batch dim dropped);
    `with` removes them all."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, int | None], list[torch.Tensor]] = {}
        self._handles: list[Any] = []

    def add(self, module: torch.nn.Module, key: tuple[str, int | None], scale: float = 1.0):
        def hook(_module, _inputs, output):
            tensor = _first_tensor(output).detach().to(torch.float64).cpu()
            if tensor.dim() == 3:  # HF: [1, t, H]
                tensor = tensor[0]
            self.store.setdefault(key, []).append(tensor * scale)

        self._handles.append(module.register_forward_hook(hook))

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()

    def tensors(self) -> dict[tuple[str, int | None], torch.Tensor]:
        return {key: torch.cat(parts) for key, parts in self.store.items()}


def _hook_model(hooks: _Hooks, model: torch.nn.Module, names: dict, embed_scale: float) -> int:
    embed = _module(model, names["embedding"])
    layers = _module(model, names["layers"])
    norm = _module(model, names["final_norm"])
    if embed is None or layers is None or norm is None:
        raise ValueError(f"layer diff: {type(model).__name__} lacks the expected module names")
    hooks.add(embed, ("embedding", None), embed_scale)
    for i, layer in enumerate(layers):
        attn, mlp = _module(layer, names["attention"]), _module(layer, names["mlp"])
        if attn is None or mlp is None:
            raise ValueError(f"layer diff: layer {i} of {type(model).__name__} has no attn/mlp")
        hooks.add(attn, ("attention", i))
        hooks.add(mlp, ("mlp", i))
        hooks.add(layer, ("layer", i))
    hooks.add(norm, ("final_norm", None))
    return len(layers)


def engine_capture(
    model: str, side: Side, prompts: list[list[int]], block_size: int, max_model_len: int | None
) -> Capture:
    """Loads the engine's model for `side` and runs one packed step over all prompts."""
    from engine.attention import pack_sequences
    from engine.config import CacheConfig, EngineArgs
    from engine.fast.registry import get_attention_backend
    from engine.kv_cache import allocate_kv_cache
    from engine.models.loader import load_model

    args = EngineArgs(
        model=model,
        dtype=side.dtype or "auto",
        attention_backend=side.backend,
        quantization=side.quantization,
        max_model_len=max_model_len,
        block_size=block_size,
    )
    config = args.create_model_config()
    softcap = getattr(config.hf_config, "attn_logit_softcapping", None) is not None
    net = load_model(config, get_attention_backend(side.backend, config.device, softcap))
    sequences, next_block = [], 0
    for ids in prompts:
        num_blocks = -(-len(ids) // block_size)
        sequences.append((list(ids), 0, tuple(range(next_block, next_block + num_blocks))))
        next_block += num_blocks
    cache = allocate_kv_cache(
        config, CacheConfig(block_size=block_size, num_blocks=next_block, kv_cache_memory_bytes=0)
    )
    input_ids, positions, meta = pack_sequences(sequences, block_size, config.device)
    embed_scale = getattr(net, "embed_scale", None) or 1.0
    with _Hooks() as hooks, torch.inference_mode():
        num_layers = _hook_model(hooks, net, ENGINE_NAMES, embed_scale)
        hidden = net(input_ids, positions, cache, meta)  # [T, H]
        logits = net.compute_logits(hidden)  # [T, V]
    tensors = hooks.tensors()
    tensors[("logits", None)] = logits.detach().to(torch.float64).cpu()
    return Capture(tensors, num_layers, str(config.dtype).removeprefix("torch."))


def hf_capture(model: str, side: Side, prompts: list[list[int]]) -> Capture:
    """HF transformers, one prompt at a time, concatenated in packed order."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, side.dtype or "float32")
    from engine.diff import hf_source

    source, source_kwargs = hf_source(model)
    config = AutoConfig.from_pretrained(source, **source_kwargs)
    # sdpa computes in the model's dtype; eager's softmax runs in float32 even in float64 runs.
    # Soft-capped attention (Gemma 2) needs eager.
    capped = getattr(config, "attn_logit_softcapping", None) is not None
    kwargs: dict[str, Any] = {"attn_implementation": "eager" if capped else "sdpa", **source_kwargs}
    if any(getattr(config, name, None) for name in ("num_local_experts", "num_experts")):
        kwargs["experts_implementation"] = "eager"  # the exact float64 loop (see engine.diff)
    net = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).eval()
    embed = _module(net, HF_NAMES["embedding"])
    scale = 1.0
    # Gemma scales the embeddings outside the module unless it is a scaled embedding.
    if config.model_type.startswith("gemma") and "Scaled" not in type(embed).__name__:
        scale = float(torch.tensor(config.hidden_size**0.5, dtype=dtype))
    with _Hooks() as hooks, torch.no_grad():
        num_layers = _hook_model(hooks, net, HF_NAMES, scale)
        logits = [net(torch.tensor([ids])).logits[0].to(torch.float64) for ids in prompts]
    tensors = hooks.tensors()
    tensors[("logits", None)] = torch.cat(logits)
    return Capture(tensors, num_layers, str(dtype).removeprefix("torch."))


# ---- comparing -------------------------------------------------------------------------------


def step_keys(num_layers: int) -> list[tuple[str, int | None]]:
    """Network order: embedding, then attention / mlp / layer per layer, final norm, logits."""
    keys: list[tuple[str, int | None]] = [("embedding", None)]
    for i in range(num_layers):
        keys += [("attention", i), ("mlp", i), ("layer", i)]
    return [*keys, ("final_norm", None), ("logits", None)]


def compare_captures(
    reference: Capture, candidate: Capture, prompt_lens: list[int], tolerance: float
) -> list[Row]:
    if reference.num_layers != candidate.num_layers:
        raise ValueError(f"the sides have {reference.num_layers} and {candidate.num_layers} layers")
    starts = [0]
    for n in prompt_lens:
        starts.append(starts[-1] + n)
    rows = []
    for key in step_keys(reference.num_layers):
        ref, cand = reference.tensors[key], candidate.tensors[key]
        if ref.shape != cand.shape:
            raise ValueError(f"{key}: shapes {tuple(ref.shape)} and {tuple(cand.shape)} differ")
        err = (cand - ref).abs().reshape(ref.shape[0], -1)  # [T, ...]
        per_token = err.amax(dim=1)
        token = int(per_token.argmax())
        max_abs = float(per_token[token])
        scale = float(ref.abs().max())
        max_rel = max_abs / scale if scale > 0 else max_abs
        if math.isnan(max_abs):
            max_rel = math.inf
        prompt = max(i for i, s in enumerate(starts[:-1]) if s <= token)
        rows.append(
            Row(
                key[0],
                key[1],
                max_abs,
                max_rel,
                prompt,
                token - starts[prompt],
                max_rel <= tolerance,
            )
        )
    return rows


def default_tolerance(*sides: Side, dtypes: tuple[str, ...]) -> float:
    keys = list(dtypes) + [s.quantization for s in sides if s.quantization not in (None, "none")]
    return max(DEFAULT_TOLERANCE.get(k, 5e-2) for k in keys)


# ---- output ----------------------------------------------------------------------------------


def format_table(report: LayerReport) -> str:
    lines = [
        f"model {report.model} | {report.num_prompts} prompts, {report.num_tokens} tokens in one "
        f"packed step | tolerance {report.tolerance:g} (max_rel)",
        f"reference: {report.reference}",
        f"candidate: {report.candidate}",
        "",
        "| layer | sub-step | max abs | max rel | at (prompt, pos) | ok |",
        "|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        layer = "-" if row.layer is None else str(row.layer)
        lines.append(
            f"| {layer} | {row.step} | {row.max_abs:.3e} | {row.max_rel:.3e} | "
            f"({row.prompt}, {row.position}) | {'ok' if row.ok else 'BEYOND'} |"
        )
    first = report.first_beyond
    if first is None:
        lines.append("\nevery sub-step within tolerance")
    else:
        where = "" if first.layer is None else f"layer {first.layer} "
        lines.append(
            f"\nfirst beyond tolerance: {where}{first.step} (max rel {first.max_rel:.3e}, "
            f"prompt {first.prompt} position {first.position})"
        )
    return "\n".join(lines)


def plot(report: LayerReport, path: str) -> None:
    """Error per layer on a log scale; ValueError with install advice without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError(
            f"--plot needs matplotlib, which could not be imported ({e}); pip install matplotlib"
        ) from e
    fig, ax = plt.subplots(figsize=(8, 4.5))
    by_step: dict[str, list[tuple[float, float]]] = {}
    exact: list[str] = []  # rows with no error at all: nothing to draw on a log axis
    num_layers = max((r.layer for r in report.rows if r.layer is not None), default=-1) + 1
    x_of = {"embedding": -1, "final_norm": num_layers, "logits": num_layers + 1}
    for row in report.rows:
        x = row.layer if row.layer is not None else x_of[row.step]
        if row.max_rel == 0:
            exact.append(row.step if row.layer is None else f"{row.step} {row.layer}")
            continue
        by_step.setdefault(row.step, []).append((x, row.max_rel))
    for step, points in by_step.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o" if len(points) == 1 else ".", label=step)
    if exact:
        shown = ", ".join(exact[:6]) + (", ..." if len(exact) > 6 else "")
        ax.text(0.01, 0.02, f"exact (error 0): {shown}", transform=ax.transAxes, fontsize=8)
    ax.axhline(report.tolerance, color="red", linestyle="--", linewidth=1, label="tolerance")
    ax.set_yscale("log")
    ax.set_xlabel("layer (embedding at -1; final norm and logits after the last layer)")
    ax.set_ylabel("max |error| / max |reference|")
    ax.set_title(
        f"{Path(report.model).name}: {report.candidate}\nvs {report.reference}", fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_layers(args: Any, prompts: list[list[int]]) -> int:
    """The `--layers` mode of engine.diff (args from its parser); returns the exit status."""
    default_dtype = None if args.dtype == "auto" else args.dtype
    reference = Side.parse(args.reference, "--reference")
    candidate = Side.parse(args.candidate or f"backend={args.attention_backend}", "--candidate")
    reference = Side(
        reference.backend, reference.dtype or default_dtype, reference.quantization, reference.hf
    )
    candidate = Side(
        candidate.backend, candidate.dtype or default_dtype, candidate.quantization, candidate.hf
    )
    captures = []
    for side in (reference, candidate):
        if side.hf:
            captures.append(hf_capture(args.model, side, prompts))
        else:
            captures.append(
                engine_capture(args.model, side, prompts, args.block_size, args.max_model_len)
            )
    tolerance = args.tolerance
    if tolerance is None:
        tolerance = default_tolerance(
            reference, candidate, dtypes=(captures[0].dtype, captures[1].dtype)
        )
    reference = Side(reference.backend, captures[0].dtype, reference.quantization, reference.hf)
    candidate = Side(candidate.backend, captures[1].dtype, candidate.quantization, candidate.hf)
    report = LayerReport(
        model=args.model,
        reference=reference.describe(),
        candidate=candidate.describe(),
        num_prompts=len(prompts),
        num_tokens=sum(map(len, prompts)),
        tolerance=tolerance,
        rows=compare_captures(captures[0], captures[1], [len(p) for p in prompts], tolerance),
    )
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print(format_table(report))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0 if report.first_beyond is None else 1
