"""Maps checkpoint tensor names onto the engine's (possibly fused) parameters and fills them.

Every parameter gets a target under its checkpoint name (`checkpoint_name(param name)`, by
default HF's `model.` prefix, `lm_head.` as is). A fused `Linear` (layers.py) also gets one
target per named row shard, so `qkv_proj` is filled from a checkpoint's `q_proj`, `k_proj` and
`v_proj` tensors or from a fused `qkv_proj` tensor, whichever the checkpoint has. Families add
their own targets (e.g. stacked experts) with `add`.

Invariants checked by `load`: every tensor has the shape of its target rows; every parameter's
rows are all filled (else a ValueError naming the missing checkpoint tensors); a checkpoint
tensor no target takes is logged and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from engine.models.layers import Linear

logger = logging.getLogger(__name__)

# Tensors checkpoints carry that are not weights (buffers HF recomputes).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_checkpoint_name(param_name: str) -> str:
    """Our parameter name -> the HF causal-LM checkpoint's (`model.` prefix but the head)."""
    return param_name if param_name.startswith("lm_head.") else f"model.{param_name}"


@dataclass(frozen=True, slots=True)
class Target:
    param: str  # our parameter's qualified name
    offset: int  # first row filled
    rows: int  # number of rows filled
    # Tensor parallelism: full checkpoint tensor -> this rank's part (None: taken as is).
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


# param, checkpoint tensor, first row -> None; the default copies the rows.
WeightLoader = Callable[[nn.Parameter, torch.Tensor, int], None]


def copy_rows(param: nn.Parameter, tensor: torch.Tensor, offset: int) -> None:
    param.data[offset : offset + tensor.shape[0]].copy_(tensor)


class WeightMapper:
    def __init__(
        self,
        model: nn.Module,
        checkpoint_name: Callable[[str], str] = hf_checkpoint_name,
        skip_params: Iterable[str] = (),
        ignore_names: Iterable[str] = (),
    ) -> None:
        """`skip_params`: our parameters not filled from the checkpoint (e.g. a tied head);
        `ignore_names`: checkpoint tensors to drop silently."""
        self.params = dict(model.named_parameters(remove_duplicate=False))
        skip = set(skip_params)
        self.ignore_names = set(ignore_names)
        self.targets: dict[str, Target] = {}
        # Modules that shard their checkpoint tensors (tensor parallelism): param -> module.
        sharding = {
            f"{module_name}.{suffix}" if module_name else suffix: module
            for module_name, module in model.named_modules()
            if hasattr(module, "checkpoint_transform")
            for suffix in ("weight", "bias")
        }
        for name, param in self.params.items():
            if name not in skip:
                module = sharding.get(name)
                transform = (
                    module.checkpoint_transform(name.rsplit(".", 1)[-1], None)
                    if module is not None
                    else None
                )
                self.targets[checkpoint_name(name)] = Target(name, 0, param.shape[0], transform)
        for module_name, module in model.named_modules():
            if not isinstance(module, Linear) or not module.shard_names:
                continue
            parent = module_name.rsplit(".", 1)[0] if "." in module_name else ""
            for suffix in ("weight", "bias"):
                param_name = f"{module_name}.{suffix}"
                if param_name not in self.params or param_name in skip:
                    continue
                for index, (shard, offset, rows) in enumerate(module.shard_offsets()):
                    shard_name = f"{parent}.{shard}.{suffix}" if parent else f"{shard}.{suffix}"
                    transform = module.checkpoint_transform(suffix, index)
                    self.targets[checkpoint_name(shard_name)] = Target(
                        param_name, offset, rows, transform
                    )
        self.loaders: dict[str, WeightLoader] = {}
        # After `load`: param -> [(checkpoint name, first row, rows)] that filled it.
        self.sources: dict[str, list[tuple[str, int, int]]] = {}

    def add(self, checkpoint_name: str, target: Target) -> None:
        self.targets[checkpoint_name] = target

    def set_loader(self, param_name: str, loader: WeightLoader) -> None:
        """Fills `param_name` with `loader` instead of a plain row copy (e.g. to keep a
        checkpoint's quantized values)."""
        self.loaders[param_name] = loader

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        filled: dict[str, dict[int, int]] = {}  # param -> {first row: row count}
        loaded_names: set[str] = set()
        for name, tensor in weights:
            if name.endswith(IGNORED_SUFFIXES) or name in self.ignore_names:
                continue
            target = self.targets.get(name)
            if target is None:
                logger.warning("checkpoint tensor %s is not used by the model", name)
                continue
            param = self.params[target.param]
            if target.transform is not None:
                tensor = target.transform(tensor)
            expected = (target.rows, *param.shape[1:])
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected {expected}"
                )
            self.loaders.get(target.param, copy_rows)(param, tensor, target.offset)
            filled.setdefault(target.param, {})[target.offset] = target.rows
            self.sources.setdefault(target.param, []).append((name, target.offset, target.rows))
            loaded_names.add(name)
        missing = self._missing(filled, loaded_names)
        if missing:
            shown = ", ".join(missing[:8]) + (
                f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            )
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")

    def _missing(self, filled: dict[str, dict[int, int]], loaded: set[str]) -> list[str]:
        """Checkpoint names that would fill the rows still empty (shard names for fused
        parameters, as split checkpoints name them)."""
        missing: list[str] = []
        by_param: dict[str, list[tuple[str, Target]]] = {}
        for name, target in self.targets.items():
            by_param.setdefault(target.param, []).append((name, target))
        for param, entries in by_param.items():
            rows = sum(filled.get(param, {}).values())
            if rows >= self.params[param].shape[0]:
                continue
            shards = [(n, t) for n, t in entries if t.rows < self.params[param].shape[0]]
            if shards:
                done = filled.get(param, {})
                missing += [n for n, t in shards if done.get(t.offset) != t.rows]
            else:
                missing += [n for n, _ in entries if n not in loaded]
        return sorted(missing)
