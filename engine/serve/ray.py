"""`python -m engine.serve.ray`: N engine replicas behind Ray Serve's HTTP proxy.

    python -m engine.serve.ray --model PATH --replicas 2 --num-threads-per-replica 1 \\
        --host 127.0.0.1 --port 8000 [any flag of python -m engine.server]

serves the OpenAI API of `python -m engine.server` (same routes, streaming included) from N
replicas, each one engine in its own Ray actor. The application has two deployments:

* `OpenAIIngress` (`engine.serve.ingress`) takes the proxy's HTTP requests, computes the prompt's
  prefix routing key and streams the chosen replica's answer back (header `x-engine-replica`);
  it also answers `GET /metrics` with every replica's series (label `replica`).
* `EngineReplica` (`engine.serve.replica`), `--replicas` of them, each serving one
  `OpenAIServer` on loopback, placed by `PrefixAffinityRouter` (`engine.serve.router`): the
  replica that owns the prompt's first `--routing-prefix-chars` characters (rendezvous hashing),
  unless it has more than `--routing-imbalance-threshold` requests in flight beyond the least
  loaded replica (or is full), then the least loaded one.

Without `--address` a local Ray cluster is started (and stopped on exit); `--address auto` joins
the running one (`ray start --head` / a multi-node cluster). For `serve run` / `serve deploy`,
`app_builder` takes the same flags as a mapping (see examples/ray_serve.yaml).

Ray is an optional extra: `pip install -e .[ray]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from engine.serve.ingress import IngressConfig, OpenAIIngress
from engine.serve.replica import EngineReplica
from engine.serve.router import ROUTER_CLASS_PATH
from engine.serve.routing import DEFAULT_IMBALANCE_THRESHOLD, DEFAULT_PREFIX_CHARS
from engine.server import __main__ as server_cli
from engine.server.thread import free_port

__all__ = ["app_builder", "build_app", "build_parser", "main"]

APP_NAME = "engine"
INGRESS_NAME = "OpenAIIngress"
REPLICA_NAME = "EngineReplica"


def build_parser() -> argparse.ArgumentParser:
    """`python -m engine.server`'s parser (every engine and server flag) plus Ray Serve's."""
    p = server_cli.build_parser()
    p.prog = "python -m engine.serve.ray"
    p.description = __doc__.split("\n\n")[0]
    ray_group = p.add_argument_group("Ray Serve (--host/--port are the Serve HTTP proxy's)")
    ray_group.add_argument("--replicas", type=int, default=1, help="engine replicas (default 1)")
    ray_group.add_argument(
        "--num-threads-per-replica",
        type=int,
        default=1,
        help="torch threads of each replica, also its Ray num_cpus (default 1)",
    )
    ray_group.add_argument(
        "--num-gpus-per-replica",
        type=float,
        default=None,
        help="Ray num_gpus of each replica (default: 1 with --device cuda, else 0)",
    )
    ray_group.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="requests Ray sends one replica at a time; more wait in the router, which places "
        "each on the replica that frees first (default: --max-num-seqs, 256)",
    )
    ray_group.add_argument(
        "--routing-prefix-chars",
        type=int,
        default=DEFAULT_PREFIX_CHARS,
        help="characters of the prompt the routing key hashes (default %(default)s)",
    )
    ray_group.add_argument(
        "--routing-imbalance-threshold",
        type=int,
        default=DEFAULT_IMBALANCE_THRESHOLD,
        help="requests in flight the preferred replica may have beyond the least loaded one "
        "before the least loaded takes the request (default %(default)s)",
    )
    ray_group.add_argument(
        "--num-ingress-replicas", type=int, default=1, help="OpenAIIngress replicas (default 1)"
    )
    ray_group.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join ('auto': the running one); default: start a local cluster",
    )
    ray_group.add_argument("--app-name", default=APP_NAME, help="Serve application name")
    return p


def _positive(name: str, value: float) -> None:
    if value < 1:
        raise ValueError(f"--{name} must be at least 1, got {value}")


def build_app(ns: argparse.Namespace) -> Application:
    """The Serve application for parsed flags (ValueError naming the flag when one is wrong)."""
    _positive("replicas", ns.replicas)
    _positive("num-threads-per-replica", ns.num_threads_per_replica)
    _positive("num-ingress-replicas", ns.num_ingress_replicas)
    _positive("routing-prefix-chars", ns.routing_prefix_chars)
    if ns.routing_imbalance_threshold < 0:
        raise ValueError("--routing-imbalance-threshold must be >= 0")
    engine_args = server_cli.engine_args_from(ns)
    server_config = server_cli.server_config_from(ns)
    # Each replica's server listens on loopback; its connection limits apply there.
    server_config = dataclasses.replace(server_config, host="127.0.0.1", port=0)
    max_ongoing = ns.max_ongoing_requests or engine_args.max_num_seqs
    _positive("max-ongoing-requests", max_ongoing)
    gpus = ns.num_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if str(engine_args.device or "").startswith("cuda") else 0.0
    replica = serve.deployment(EngineReplica, name=REPLICA_NAME).options(
        num_replicas=ns.replicas,
        max_ongoing_requests=max_ongoing,
        # Past this many requests waiting in a router for a replica: 503, as the server answers.
        max_queued_requests=server_config.max_waiting_requests or -1,
        ray_actor_options={"num_cpus": ns.num_threads_per_replica, "num_gpus": gpus},
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASS_PATH,
            request_router_kwargs={"imbalance_threshold": ns.routing_imbalance_threshold},
        ),
        graceful_shutdown_timeout_s=server_config.shutdown_timeout + 5,
        health_check_period_s=10,
    )
    ingress = serve.deployment(OpenAIIngress, name=INGRESS_NAME).options(
        num_replicas=ns.num_ingress_replicas,
        # The ingress only relays: it holds every request waiting for or streaming from a replica.
        max_ongoing_requests=max(1000, 2 * max_ongoing * ns.replicas),
        ray_actor_options={"num_cpus": 0},
    )
    config = IngressConfig(
        prefix_chars=ns.routing_prefix_chars,
        max_request_body_bytes=server_config.max_request_body_bytes,
        request_body_timeout=server_config.request_body_timeout,
    )
    return ingress.bind(
        replica.bind(engine_args, server_config, ns.num_threads_per_replica), config
    )


def args_to_argv(args: Mapping[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """A `serve run` / config-file mapping ({"model": "demo", "replicas": 2, ...}, flag names
    with `_` or `-`) as command-line flags, so both paths share the parser's checks."""
    actions = {s: a for a in parser._actions for s in a.option_strings}
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None:
            raise ValueError(f"unknown setting {key!r} (not a flag of {parser.prog})")
        if isinstance(value, str) and value.lower() in ("true", "false"):  # `serve run k=v`
            value = value.lower() == "true"
        if isinstance(value, bool):
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else "--no-" + flag[2:])
            elif value:
                argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application builder (`import_path: engine.serve.ray:app_builder`): `args` holds
    the flags of `python -m engine.serve.ray` by name."""
    parser = build_parser()
    ns = parser.parse_args(args_to_argv(args or {}, parser))
    return build_app(ns)


def main(argv: list[str] | None = None) -> int:
    import ray

    ns = build_parser().parse_args(argv)
    try:
        app = build_app(ns)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    port = ns.port or free_port(ns.host)
    # Workers import `engine` from where this process found it (a source checkout included).
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(address=ns.address, runtime_env={"env_vars": {"PYTHONPATH": path}})
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": ns.host, "port": port})
        serve.run(app, name=ns.app_name, route_prefix="/")
        host = f"[{ns.host}]" if ":" in ns.host else ns.host
        print(
            f"Serving {ns.replicas} engine replica(s) on http://{host}:{port} "
            f"(OpenAI API under http://{host}:{port}/v1); Ctrl-C stops",
            flush=True,
        )
        stop.wait()
    finally:
        if ns.address is None:
            serve.shutdown()
        else:
            serve.delete(ns.app_name)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
