"""One Prometheus exposition for all engine replicas: each series labelled with its `replica`.

`/metrics` behind Ray Serve is *per replica*, not aggregated: every replica's own series (the
names of `engine.server.metrics`) appear once per replica with the extra label
`replica="<Ray Serve replica id>"`, so nothing is lost (a replica's KV-cache usage, its queue)
and totals are one PromQL `sum without (replica) (...)` away. Pure text processing, no Ray.

Invariants: the output is valid text exposition format 0.0.4: each family's HELP and TYPE lines
appear once, followed by all its samples from every replica (families are never interleaved).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["merge_replica_metrics"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _with_label(sample: str, label: str) -> str:
    """`name{a="b"} 1` -> `name{<label>,a="b"} 1`; `name 1` -> `name{<label>} 1`."""
    brace = sample.find("{")
    space = sample.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        rest = sample[brace + 1 :]
        sep = "" if rest.startswith("}") else ","
        return f"{sample[: brace + 1]}{label}{sep}{rest}"
    if space == -1:
        return sample
    return f"{sample[:space]}{{{label}}}{sample[space:]}"


def merge_replica_metrics(
    scrapes: Iterable[tuple[str, str]], extra_families: Iterable[str] = ()
) -> str:
    """(replica name, its exposition text) pairs -> one exposition; `extra_families` are
    complete families (HELP, TYPE, samples) appended as they are."""
    order: list[str] = []
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in scrapes:
        label = f'replica="{_escape(replica)}"'
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if family not in heads:
                        order.append(family)
                        heads[family], samples[family] = [], []
                    if _head_lacks(heads[family], parts[1]):
                        heads[family].append(line)
                continue
            if family not in samples:  # a sample before any HELP/TYPE: its own family
                family = line.split("{", 1)[0].split(" ", 1)[0]
                if family not in heads:
                    order.append(family)
                    heads[family], samples[family] = [], []
            samples[family].append(_with_label(line, label))
    lines = []
    for family in order:
        lines.extend(heads[family])
        lines.extend(samples[family])
    out = "\n".join(lines)
    extra = "\n".join(f.rstrip("\n") for f in extra_families)
    return (out + "\n" if out else "") + (extra + "\n" if extra else "")


def _head_lacks(head: list[str], kind: str) -> bool:
    """True when the family's head has no `# <kind>` line yet (the first replica's wins)."""
    return not any(line.split(maxsplit=2)[1] == kind for line in head)
