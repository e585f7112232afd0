"""Extracts the operations the server implements from OpenAI's OpenAPI description.

    python tests/openapi/extract.py [SPEC] > tests/openapi/openai_subset.json

(SPEC defaults to ../shared/openai/openapi.yaml next to the repository.)

Keeps `listModels`, `retrieveModel`, `createCompletion` and `createChatCompletion` with every
component schema they reference (transitively), the servers and the security scheme; the
result is the spec `tests/test_conformance.py` runs schemathesis against. OpenAI's description
is MIT-licensed (github.com/openai/openai-openapi, info.version as kept below).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

OPERATIONS = {
    ("/models", "get"),
    ("/models/{model}", "get"),
    ("/completions", "post"),
    ("/chat/completions", "post"),
}
DEFAULT_SPEC = Path(__file__).resolve().parents[3] / "shared" / "openai" / "openapi.yaml"


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/"):
                found.add(ref)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def extract(spec: dict[str, Any]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, method in sorted(OPERATIONS):
        item = spec["paths"][path]
        paths.setdefault(path, {})[method] = item[method]
        if "parameters" in item:
            paths[path]["parameters"] = item["parameters"]
    components: dict[str, dict[str, Any]] = {}
    todo = _refs(paths)
    seen: set[str] = set()
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, _, kind, name = ref.split("/", 3)
        value = spec["components"][kind][name]
        components.setdefault(kind, {})[name] = value
        todo |= _refs(value) - seen
    if "securitySchemes" in spec.get("components", {}):
        components["securitySchemes"] = spec["components"]["securitySchemes"]
    return {
        "openapi": spec["openapi"],
        "info": {**spec["info"], "title": spec["info"]["title"] + " (server subset)"},
        "servers": spec.get("servers", []),
        "security": spec.get("security", []),
        "paths": paths,
        "components": {k: dict(sorted(v.items())) for k, v in sorted(components.items())},
    }


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else DEFAULT_SPEC
    with open(source, encoding="utf-8") as f:
        spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    json.dump(extract(spec), sys.stdout, indent=1, sort_keys=False, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
