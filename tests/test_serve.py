"""End-to-end test of the student server: a tiny offline Llama served by Ray Serve LLM + vLLM (CPU),
queried with the real `openai` client."""

from __future__ import annotations

import os
import socket
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

MODEL_NAME = "proxykd-student-test"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from ray import serve

    from proxykd.config import ModelConfig, TinyModelSpec
    from proxykd.models import materialize_model
    from proxykd.serving import build_app

    # Small KV cache and a loopback host for the vLLM CPU engine; set before Ray starts so the
    # workers inherit them (build_app also forwards them through the runtime_env).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

    path = materialize_model(ModelConfig(tiny=TinyModelSpec()), tmp_path_factory.mktemp("serve") / "student", seed=0)
    port = _free_port()
    # Logical CPUs may exceed physical ones: this leaves room for the ingress and the engine bundle.
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        t0 = time.time()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(path, MODEL_NAME, max_model_len=256), name="proxykd", route_prefix="/")
        print(f"\n[test_serve] deployed in {time.time() - t0:.1f}s on port {port}")
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_models_lists_student(client):
    ids = [m.id for m in client.models.list().data]
    assert MODEL_NAME in ids


def test_completion(client):
    r = client.completions.create(model=MODEL_NAME, prompt="2 + 2 =", max_tokens=8, temperature=0)
    assert r.choices and r.choices[0].text
    assert 1 <= r.usage.completion_tokens <= 8


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.content is not None
    assert 1 <= r.usage.completion_tokens <= 8


def test_greedy_is_deterministic(client):
    def ask():
        return client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
        ).choices[0].message.content

    assert ask() == ask()
