"""Server vs offline at one request: decode step time offline, inter-token latency through the
server, their ratio, and the server's voluntary context switches per token, measured back to
back and interleaved in one run, with the OpenMP team fix on and off (`ENGINE_OMP_RELEASE`).

    python bench/server_overhead.py --model ~/.cache/engine/bench/smollm2-135m-instruct-f32
    python bench/server_overhead.py --quick          # the tiny demo model, seconds

Offline: one `LLMEngine` stepped on this process's main thread (as bench/latency.py does), the
median decode step of a `--output-len` request after a `--input-len` prompt. Server: `python -m
engine.server` in a subprocess, one streaming completion at a time, the median gap between SSE
chunks. Context switches are read from /proc (Linux) for the server process during the requests:
they count deterministically what a shared machine's timings blur.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

from engine.server.thread import free_port

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "it",
    "an",
    "were",
    "are",
]


def proc_switches(pid: int) -> int:
    """Voluntary context switches summed over the threads of `pid` (0 without /proc)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class Offline:
    def __init__(self, model: str | None, input_len: int, output_len: int) -> None:
        from engine import EngineArgs, LLMEngine, SamplingParams

        kwargs = {"model": model} if model else {}
        self.engine = LLMEngine(EngineArgs(**kwargs, max_num_seqs=8))
        self.params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        vocab = 1000
        self.prompt = [(17 * i + 5) % vocab + 10 for i in range(input_len)]
        self.count = 0
        self.step_ms()  # warm-up

    def step_ms(self) -> float:
        self.count += 1
        self.engine.add_request(f"r{self.count}", self.prompt, self.params)
        self.engine.step()  # the prompt and the first token
        times = []
        while self.engine.has_unfinished_requests():
            start = time.perf_counter()
            self.engine.step()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)


class Server:
    def __init__(self, model: str | None, omp_release: bool) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "engine.server", "--served-model-name", "m"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        if model:
            cmd += ["--model", model]
        env = {**os.environ, "ENGINE_OMP_RELEASE": "1" if omp_release else "0"}
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise SystemExit("server not ready")

    def itl_ms(self, input_len: int, output_len: int, seed: int) -> tuple[float, float]:
        """(median inter-chunk gap in ms, voluntary switches per token) of one request."""
        prompt = " ".join(_WORDS[(i * 7 + seed) % len(_WORDS)] for i in range(input_len))
        body = {"model": "m", "prompt": prompt, "max_tokens": output_len, "temperature": 0}
        body |= {"ignore_eos": True, "stream": True}
        before = proc_switches(self.proc.pid)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        stamps = []
        while line := response.fp.readline():
            if line.startswith(b"data: ") and b"[DONE]" not in line:
                stamps.append(time.perf_counter())
        conn.close()
        switches = (proc_switches(self.proc.pid) - before) / max(1, len(stamps))
        gaps = [b - a for a, b in itertools.pairwise(stamps[1:])]
        return 1000 * statistics.median(gaps), switches

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: demo model)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved offline/server rounds")
    p.add_argument("--quick", action="store_true", help="demo model, 1 round, 16 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.input_len, args.output_len = 1, 16, 16
    if args.model is None:
        from engine.demo import demo_model_path

        args.model = str(demo_model_path())
    offline = Offline(args.model, args.input_len, args.output_len)
    rows = []
    for omp_release in (False, True):
        server = Server(args.model, omp_release)
        try:
            server.itl_ms(args.input_len, args.output_len, seed=-1)  # warm-up
            off, srv, sw = [], [], []
            for r in range(args.rounds):
                off.append(offline.step_ms())
                itl, switches = server.itl_ms(args.input_len, args.output_len, seed=r)
                srv.append(itl)
                sw.append(switches)
        finally:
            server.close()
        rows.append(
            (omp_release, statistics.median(off), statistics.median(srv), statistics.median(sw))
        )
    print(
        f"one request, prompt {args.input_len} tokens, {args.output_len} output tokens, "
        f"{args.rounds} interleaved rounds, model {args.model or 'demo'}"
    )
    print(
        f"{'ENGINE_OMP_RELEASE':>18} | {'offline step ms':>15} | {'server ITL ms':>13} | "
        f"{'server/offline':>14} | {'vol switches/token':>18}"
    )
    for omp_release, off_ms, itl, switches in rows:
        print(
            f"{int(omp_release):>18} | {off_ms:>15.1f} | {itl:>13.1f} | {itl / off_ms:>14.2f} | "
            f"{switches:>18.0f}"
        )


if __name__ == "__main__":
    main()
