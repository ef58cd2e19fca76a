"""Autoscaling of a served model (slow: it starts a second vLLM engine on demand and waits for the
scale-down): serve.autoscaling min 1, max 2, target 1 request in flight per replica; under a load
of streamed requests Serve adds the second replica, and after the load it removes it again."""

import os
import threading
import time

import pytest

pytest.importorskip("ray.serve.llm")
pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from conftest import free_port  # noqa: E402

pytestmark = pytest.mark.slow


def _replicas(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications["proxykd"]
    counts = app.deployments[deployment].replica_states
    return counts.get("RUNNING", 0)


def test_a_replica_is_added_under_load_and_removed_after(tmp_path):
    from proxykd.config import ModelConfig, RayConfig, ServeConfig, TinyModelSpec
    from proxykd.models import materialize_model
    from proxykd.serving import Target, serve_target, stop_local

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    path = materialize_model(ModelConfig(tiny=TinyModelSpec()), tmp_path / "student", seed=0)
    s = ServeConfig(port=free_port(), model_name="student", max_tokens=256,
                    autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                 "upscale_delay_s": 0, "downscale_delay_s": 5})
    url = serve_target(Target({"student": path}, s, RayConfig(num_cpus=4)), blocking=False)
    try:
        deployment = "WarmLLMServer:student"
        assert _replicas(deployment) == 1
        client = openai.OpenAI(base_url=url, api_key="unused", timeout=120, max_retries=0)
        stop = threading.Event()
        errors = []

        def load():
            while not stop.is_set():
                try:
                    for _ in client.completions.create(model="student", prompt="go", max_tokens=256, stream=True,
                                                       extra_body={"ignore_eos": True}):
                        pass
                except Exception as e:
                    errors.append(e)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        peak = 1
        while time.monotonic() - t0 < 240 and peak < 2:
            peak = max(peak, _replicas(deployment))
            time.sleep(1)
        up = time.monotonic() - t0
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert peak == 2, "no second replica under load within 240 s"
        assert not errors, errors[:3]
        t1 = time.monotonic()
        while time.monotonic() - t1 < 180 and _replicas(deployment) > 1:
            time.sleep(1)
        down = time.monotonic() - t1
        print(f"\n[test_serve_autoscale] 2nd replica running {up:.0f} s into the load, back to 1 {down:.0f} s after")
        assert _replicas(deployment) == 1, "the second replica was not removed within 180 s of the load ending"
        # still serving
        assert client.completions.create(model="student", prompt="ok", max_tokens=2).choices
    finally:
        stop_local()
