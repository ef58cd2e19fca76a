"""Load benchmark of `proxykd serve`: N concurrent clients send a fixed number of streamed
completions to the server on 127.0.0.1 (the whole app: ingress with API keys and limits, Ray Serve,
one vLLM replica), then the same workload runs through a vLLM engine in this process. Prints
requests/s, output tokens/s, latency and time-to-first-token percentiles, the error count, and the
serving overhead as a ratio: Serve output tokens/s ÷ in-process output tokens/s (target >= 0.8).
The workload runs twice against the server: whole responses (the ratio), then streamed (SSE, for
time to first token; its ratio is printed beside).

    python benchmarks/serve_load.py                          # models/smollm2-135m-cut10 if built, else a tiny Llama
    python benchmarks/serve_load.py --model PATH --clients 8 --requests 64 --max-tokens 32

Same workload both ways: the same prompts, greedy, `ignore_eos` with a fixed max_tokens (every
request makes exactly max_tokens tokens), at most N requests in flight (N client threads against the
server; batches of N prompts in process). Bounded: a fixed request count and --timeout-s overall.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def prompts(n: int) -> list[str]:
    topics = ["the sea", "a small town", "numbers", "the moon", "a library", "rain", "trains", "bread"]
    return [f"Write a few sentences about {topics[i % len(topics)]} (request {i})." for i in range(n)]


def run_serve(model: str, args, key: str) -> dict:
    import openai

    from proxykd.config import RayConfig, ServeConfig
    from proxykd.serving import Target, serve_target, stop_local

    os.environ["PK_BENCH_KEYS"] = key
    s = ServeConfig(port=_free_port(), model_name="bench", api_key_env="PK_BENCH_KEYS", max_tokens=args.max_tokens,
                    max_ongoing_requests=max(16, args.clients), max_model_len=args.max_model_len,
                    request_timeout_s=args.timeout_s)
    t0 = time.monotonic()
    url = serve_target(Target({"bench": model}, s, RayConfig(num_cpus=4)), blocking=False)
    started = time.monotonic() - t0
    client = openai.OpenAI(base_url=url, api_key=key, timeout=args.timeout_s, max_retries=0)
    deadline = time.monotonic() + args.timeout_s
    lock, errors = threading.Lock(), []

    def one(prompt, stream, results):
        if time.monotonic() > deadline:
            with lock:
                errors.append("deadline")
            return
        t = time.monotonic()
        first, tokens = None, 0
        try:
            kw = dict(model="bench", prompt=prompt, max_tokens=args.max_tokens, temperature=0,
                      extra_body={"ignore_eos": True})
            if stream:
                for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
                    if chunk.choices and chunk.choices[0].text and first is None:
                        first = time.monotonic() - t
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
            else:
                tokens = client.completions.create(**kw).usage.completion_tokens
            with lock:
                results.append((time.monotonic() - t, first if first is not None else float("nan"), tokens))
        except Exception as e:  # counted, never hidden
            with lock:
                errors.append(f"{type(e).__name__}: {e}")

    def phase(stream):
        results = []
        t = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(lambda p: one(p, stream, results), prompts(args.requests)))
        wall = time.monotonic() - t
        lat, tokens = [r[0] for r in results], sum(r[2] for r in results)
        out = {"wall_s": wall, "requests": len(results), "output_tokens": tokens, "requests_per_s": len(results) / wall,
               "tokens_per_s": tokens / wall, "p50_s": _pct(lat, 50), "p99_s": _pct(lat, 99)}
        if stream:
            ttft = [r[1] for r in results]
            out.update(ttft_p50_s=_pct(ttft, 50), ttft_p99_s=_pct(ttft, 99))
        return out

    try:
        # the server warmed itself before it said ready: nothing here is left out of the count
        whole = phase(stream=False)
        streamed = phase(stream=True)
    finally:
        stop_local()
    return {"started_s": started, **whole, "streamed": streamed, "errors": len(errors), "error_samples": errors[:3]}


def run_in_process(model: str, args) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, enforce_eager=True, max_model_len=args.max_model_len, seed=0)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    ps = prompts(args.requests)
    llm.generate(ps[: args.clients], sp, use_tqdm=False)  # warm, not counted (as the server's warm-up)
    t = time.monotonic()
    tokens = 0
    for i in range(0, len(ps), args.clients):
        out = llm.generate(ps[i:i + args.clients], sp, use_tqdm=False)
        tokens += sum(len(o.outputs[0].token_ids) for o in out)
    wall = time.monotonic() - t
    del llm
    return {"wall_s": wall, "requests": len(ps), "output_tokens": tokens, "requests_per_s": len(ps) / wall,
            "tokens_per_s": tokens / wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a Hugging Face folder (default: models/smollm2-135m-cut10 if "
                   "built by `proxykd models`, else a tiny random Llama)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    for k, v in {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
                 "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(k, v)

    model = args.model
    if model is None:
        cut = REPO / "models" / "smollm2-135m-cut10"
        if (cut / "config.json").is_file():
            model = str(cut)
        else:
            from proxykd.config import ModelConfig, TinyModelSpec
            from proxykd.models import materialize_model

            model = materialize_model(ModelConfig(tiny=TinyModelSpec()), Path(tempfile.mkdtemp()) / "tiny", seed=0)
    print(f"model {model}; {args.clients} clients, {args.requests} requests x {args.max_tokens} tokens", flush=True)
    serve = run_serve(model, args, key="sk-bench-" + os.urandom(8).hex())
    print("serve:", json.dumps(serve), flush=True)
    local = run_in_process(model, args)
    print("in-process:", json.dumps(local), flush=True)
    ratio = serve["tokens_per_s"] / local["tokens_per_s"]
    st = serve["streamed"]
    print(f"\nServe over HTTP: {serve['requests_per_s']:.2f} requests/s, {serve['tokens_per_s']:.1f} output tokens/s, "
          f"latency p50 {serve['p50_s']:.2f} s p99 {serve['p99_s']:.2f} s, errors {serve['errors']} "
          f"(ready in {serve['started_s']:.0f} s)")
    print(f"  streamed: {st['requests_per_s']:.2f} requests/s, {st['tokens_per_s']:.1f} output tokens/s, latency "
          f"p50 {st['p50_s']:.2f} s p99 {st['p99_s']:.2f} s, time to first token p50 {st['ttft_p50_s']:.3f} s "
          f"p99 {st['ttft_p99_s']:.3f} s")
    print(f"in-process vLLM: {local['requests_per_s']:.2f} requests/s, {local['tokens_per_s']:.1f} output tokens/s")
    print(f"serving overhead: Serve / in-process output tokens/s = {ratio:.3f} (target >= 0.8); streamed "
          f"{st['tokens_per_s'] / local['tokens_per_s']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "args": vars(args), "serve": serve, "in_process": local,
                                               "ratio": ratio}, indent=1))
    return 0 if serve["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
