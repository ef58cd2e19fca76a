"""Teacher stage throughput against the local teacher with a fixed latency.

Prints requests/s of the teacher stage (Ray Data actors, async openai clients) and of a plain
sequential `openai` loop (the baseline most tools ship), their ratio, and the fraction of the
theoretical maximum, total concurrency / latency. Then runs the stage again under a
`requests_per_minute` limit and prints the rate it held.

    python benchmarks/teacher_throughput.py [--requests 2000] [--latency 0.1] [--actors 2] [--concurrency 32]

The server runs in its own process, as a real API would. "End to end" is the whole
`teacher.run` call (actor start-up, writing, compaction, manifest); "steady" is first to last
request seen by the server. The sequential baseline is timed on
`--baseline-requests` requests (its rate does not depend on how many).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import pyarrow as pa
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from proxykd import teacher  # noqa: E402
from proxykd.config import TeacherConfig  # noqa: E402
from proxykd.data import MESSAGES_TYPE  # noqa: E402


def prompts(n: int, offset: int = 0) -> pa.Table:
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"What is {i} + 1?"}]}
            for i in range(offset, offset + n)]
    return pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("messages", MESSAGES_TYPE)]))


class ServerProcess:
    """The local teacher in its own process (as a real API is), so that its work does not compete
    with the driver for one GIL; `stats()` reads its counters over HTTP."""

    def __init__(self, table: dict[str, str], latency: float, tmp: str):
        path = Path(tmp) / "responses.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in table.items()))
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "proxykd.local_teacher", "--responses", str(path),
                                      "--port", str(self.port), "--latency-s", str(latency)],
                                     stdout=subprocess.PIPE, text=True)
        self.proc.stdout.readline()  # "local teacher serving ..." once it accepts connections
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats") as r:
            return json.loads(r.read())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sequential_rps(base_url: str, n: int) -> float:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    start = time.perf_counter()
    for i in range(n):
        client.chat.completions.create(model="local-teacher", messages=[{"role": "user", "content": f"What is {i} + 1?"}],
                                       max_tokens=32)
    return n / (time.perf_counter() - start)


def stage(cfg: TeacherConfig, table: pa.Table, server: ServerProcess) -> tuple[float, float, int]:
    """(end-to-end requests/s, steady requests/s, requests) of one teacher.run on a fresh server."""
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        manifest = teacher.run(cfg, table, "bench", run_dir)
        seconds = time.perf_counter() - start
    assert manifest["rows"]["ok"] == table.num_rows, manifest["rows"]
    stats = server.stats()
    return stats["requests"] / seconds, (stats["requests"] - 1) / stats["span_s"], stats["requests"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.1, help="seconds the server takes per request")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32, help="in flight per actor")
    ap.add_argument("--baseline-requests", type=int, default=100)
    ap.add_argument("--rpm", type=float, default=6000, help="limit for the rate-limit run")
    ap.add_argument("--rpm-requests", type=int, default=1000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    table = {f"What is {i} + 1?": f"The answer is {i + 1}." for i in range(args.requests + args.rpm_requests)}
    ray.init(address="local", num_cpus=max(4, args.actors), include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        with ServerProcess(table, args.latency, tmp) as server:
            seq = sequential_rps(server.base_url, args.baseline_requests)
        with ServerProcess(table, args.latency, tmp) as server:
            cfg = TeacherConfig(base_url=server.base_url, max_tokens=32, num_actors=args.actors,
                                concurrency=args.concurrency, progress_every_s=1e9)
            os.environ.setdefault(cfg.api_key_env, "unused")
            end_to_end, steady, n = stage(cfg, prompts(args.requests), server)
        with ServerProcess(table, args.latency, tmp) as server:
            limited_cfg = cfg.model_copy(update={"base_url": server.base_url, "requests_per_minute": args.rpm})
            _, limited, n_limited = stage(limited_cfg, prompts(args.rpm_requests, offset=args.requests), server)
    ray.shutdown()

    total = args.actors * args.concurrency
    ceiling = total / args.latency
    limit = args.rpm / 60
    print(f"teacher stage, {n} requests, {args.actors} actors x {args.concurrency} in flight, "
          f"{args.latency * 1000:.0f} ms latency; theoretical max {ceiling:.0f} req/s")
    print(f"  sequential openai loop ({args.baseline_requests} requests): {seq:8.1f} req/s")
    print(f"  stage, end to end:                     {end_to_end:8.1f} req/s  "
          f"x{end_to_end / seq:.1f} vs sequential, {end_to_end / ceiling:.0%} of max")
    print(f"  stage, steady (first to last request): {steady:8.1f} req/s  "
          f"x{steady / seq:.1f} vs sequential, {steady / ceiling:.0%} of max")
    print(f"rate limit {args.rpm:.0f} rpm = {limit:.1f} req/s, {n_limited} requests: held {limited:.1f} req/s "
          f"({(limited - limit) / limit:+.1%} vs the limit)")


if __name__ == "__main__":
    main()
