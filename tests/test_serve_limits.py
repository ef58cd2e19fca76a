"""The serving front without Ray or vLLM: API keys, request limits, OpenAI-shaped errors, timeouts
(proxykd/serve_ingress.py, through FastAPI's TestClient over a fake engine), the `serve` config
section and what `proxykd serve TARGET` resolves to (proxykd/serving.py, proxykd/cli.py)."""

import asyncio
import json
import logging

import pytest

pytest.importorskip("ray.serve.llm")
from starlette.testclient import TestClient  # noqa: E402

from proxykd.serve_ingress import ApiError, Limits, clean_message, create_app, load_keys  # noqa: E402

KEY = "sk-test-0123456789abcdef"
RAY_WRAPPED = ("Message: This model's maximum context length is 64 tokens. However, your prompt contains 99 input "
               "tokens. (Request ID: 1234), Internal exception: ray.llm._internal.serve.foo.BarError: boom "
               "(Request ID: 1234), original exception: Traceback (most recent call last): ...")


class FakeBackend:
    """Stands in for the model deployments: records the requests it gets; `script` says what each
    request yields (a list of items, or a callable making an async generator)."""

    def __init__(self, names=("student",)):
        self.names = list(names)
        self.seen = []
        self.closed = 0
        self.script = None

    def model_ids(self):
        return self.names

    async def model_card(self, model):
        return {"id": model, "object": "model", "owned_by": "proxykd"}

    def generate(self, kind, body, request):
        self.seen.append((kind, body))
        backend = self

        async def gen():
            try:
                if callable(backend.script):
                    async for item in backend.script(body):
                        yield item
                    return
                for item in backend.script or [_completion(body)]:
                    yield item
            finally:
                backend.closed += 1

        return gen()


def _completion(body):
    return {"id": "cmpl-1", "object": "text_completion", "model": body.model,
            "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _client(backend=None, api_key_env=None, **limits):
    backend = backend or FakeBackend()
    base = dict(max_tokens=32, max_n=2, max_body_bytes=4096, request_timeout_s=5.0, max_model_len={"student": 64})
    app = create_app(backend, Limits(**{**base, **limits}), api_key_env)
    return TestClient(app, raise_server_exceptions=False), backend


def _error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Internal exception" not in r.text and "ray.llm" not in r.text and "Traceback" not in r.text
    return body["error"]


def _chat(**kw):
    return {"model": "student", "messages": [{"role": "user", "content": "hi"}], **kw}


# ------------------------------------------------------------------------------ API keys ----

def test_every_route_needs_a_valid_key(monkeypatch):
    monkeypatch.setenv("PK_TEST_KEYS", f"{KEY}, sk-other")
    client, backend = _client(api_key_env="PK_TEST_KEYS")
    routes = [("GET", "/v1/models", None), ("GET", "/v1/models/student", None),
              ("POST", "/v1/completions", {"model": "student", "prompt": "x"}),
              ("POST", "/v1/chat/completions", _chat()), ("GET", "/v1/nothing", None), ("GET", "/", None)]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY}x"}):
        for method, route, body in routes:
            r = client.request(method, route, json=body, headers=headers)
            err = _error(r, 401)
            assert err["code"] == "invalid_api_key" and KEY not in r.text
            assert r.headers["www-authenticate"] == "Bearer"
    assert backend.seen == []  # nothing reached the engine
    for key in (KEY, "sk-other"):
        ok = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/models", headers=ok).json()["data"][0]["id"] == "student"
        assert client.post("/v1/completions", json={"model": "student", "prompt": "x"}, headers=ok).status_code == 200
    assert len(backend.seen) == 2


def test_no_keys_configured_means_open_and_missing_variable_fails_closed(monkeypatch):
    client, _ = _client()
    assert client.get("/v1/models").status_code == 200
    monkeypatch.delenv("PK_TEST_KEYS", raising=False)
    with pytest.raises(RuntimeError, match="PK_TEST_KEYS"):
        load_keys("PK_TEST_KEYS")
    monkeypatch.setenv("PK_TEST_KEYS", " , ")
    with pytest.raises(RuntimeError, match="unset or empty"):
        load_keys("PK_TEST_KEYS")
    r = _client(api_key_env="PK_TEST_KEYS")[0].get("/v1/models")  # the app refuses to serve at all
    assert r.status_code == 500 and "student" not in r.text


# ------------------------------------------------------------------------------ limits ----

def test_body_size_limit_by_header_and_by_bytes_read():
    client, backend = _client(max_body_bytes=4096)
    big = {"model": "student", "prompt": "x" * 5000}
    err = _error(client.post("/v1/completions", json=big), 400)
    assert "4096 bytes" in err["message"] and "serve.max_body_bytes" in err["message"]

    def chunks():  # no Content-Length: the limit is counted on the bytes as they arrive
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    err = _error(client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}), 400)
    assert "serve.max_body_bytes" in err["message"]
    assert backend.seen == []
    small = client.post("/v1/completions", json={"model": "student", "prompt": "x" * 3000})
    assert small.status_code == 200 and backend.seen[-1][1].prompt == "x" * 3000


@pytest.mark.parametrize("route,body,param,limit", [
    ("/v1/completions", {"model": "student", "prompt": "x", "max_tokens": 33}, "max_tokens", "serve.max_tokens"),
    ("/v1/chat/completions", _chat(max_tokens=100), "max_tokens", "serve.max_tokens"),
    ("/v1/chat/completions", _chat(max_completion_tokens=33), "max_completion_tokens", "serve.max_tokens"),
    ("/v1/completions", {"model": "student", "prompt": "x", "n": 3}, "n", "serve.max_n"),
    ("/v1/chat/completions", _chat(n=5), "n", "serve.max_n"),
])
def test_a_request_over_a_limit_gets_400_naming_it(route, body, param, limit):
    client, backend = _client()
    err = _error(client.post(route, json=body), 400)
    assert err["param"] == param and limit in err["message"] and err["code"] == "limit_exceeded"
    assert backend.seen == []


def test_max_tokens_is_capped_by_the_context_and_filled_in_when_missing():
    client, backend = _client(max_tokens=100, max_model_len={"student": 64})
    err = _error(client.post("/v1/completions", json={"model": "student", "prompt": "x", "max_tokens": 64}), 400)
    assert "context length of 64" in err["message"] and err["code"] == "context_length_exceeded"
    client.post("/v1/chat/completions", json=_chat())
    assert backend.seen[-1][1].max_tokens == 63  # serve.max_tokens, cut to the context
    client.post("/v1/completions", json={"model": "student", "prompt": "x"})
    assert backend.seen[-1][1].max_tokens == 16  # the completions API's own default
    client, backend = _client(max_tokens=16)
    client.post("/v1/chat/completions", json=_chat())
    assert backend.seen[-1][1].max_tokens == 16
    client.post("/v1/chat/completions", json=_chat(max_tokens=7))
    assert backend.seen[-1][1].max_tokens == 7


# ------------------------------------------------------------------------------ errors ----

def test_malformed_and_invalid_requests_get_400_in_openai_shape():
    client, backend = _client()
    err = _error(client.post("/v1/completions", content=b'{"model": "student", "prompt": ',
                             headers={"Content-Type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    err = _error(client.post("/v1/chat/completions", json={"model": "student", "messages": "hi"}), 400)
    assert "messages" in err["message"]
    err = _error(client.post("/v1/completions", json={"model": "student", "prompt": "x", "max_tokens": "many"}), 400)
    assert "max_tokens" in err["param"]
    _error(client.post("/v1/completions", json={"model": "student", "prompt": "x", "max_tokens": 0}), 400)
    _error(client.post("/v1/completions", json={"model": "student", "prompt": "x", "n": 0}), 400)
    assert backend.seen == []


def test_unknown_model_and_route_get_404():
    client, backend = _client(FakeBackend(["student", "baseline"]))
    err = _error(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    assert _error(client.get("/v1/models/gpt-9"), 404)["code"] == "model_not_found"
    assert client.get("/v1/models/baseline").json()["id"] == "baseline"
    assert _error(client.get("/v1/nothing"), 404)["code"] == "not_found"
    assert _error(client.get("/v1/completions"), 405)
    # two models: `model` is required
    assert _error(client.post("/v1/completions", json={"prompt": "x"}), 400)["param"] == "model"
    assert backend.seen == []


def test_engine_errors_lose_rays_internal_text(caplog):
    backend = FakeBackend()
    backend.script = [{"error": {"message": RAY_WRAPPED, "code": 400, "type": "BadRequestError", "param": "input_tokens"}}]
    client, _ = _client(backend)
    err = _error(client.post("/v1/completions", json={"model": "student", "prompt": "x"}), 400)
    assert err["message"] == ("This model's maximum context length is 64 tokens. However, your prompt contains 99 "
                              "input tokens.")
    assert err["param"] == "input_tokens" and backend.closed == 1
    backend.script = [{"error": {"message": "CUDA out of memory at /site-packages/x.py", "code": 500}}]
    err = _error(client.post("/v1/completions", json={"model": "student", "prompt": "x"}), 500)
    assert err["message"] == "internal server error" and err["type"] == "server_error"

    async def explode(body):
        raise ValueError("secret internal state /site-packages/vllm/x.py")
        yield  # noqa: unreachable - makes this an async generator

    backend.script = explode
    with caplog.at_level(logging.ERROR, logger="proxykd.serve"):
        r = client.post("/v1/chat/completions", json=_chat())
    err = _error(r, 500)
    assert "secret" not in r.text and "internal server error" in err["message"]
    assert "secret internal state" in caplog.text  # the server's log keeps it


def test_clean_message():
    assert clean_message(RAY_WRAPPED).startswith("This model's maximum context length is 64")
    assert clean_message("plain message (Request ID: abc)") == "plain message"
    assert clean_message('Traceback (most recent call last):\n  File "x.py"') == "the request failed"
    assert clean_message(None, "fallback") == "fallback"
    assert ApiError(401, "m").body() == {"error": {"message": "m", "type": "invalid_request_error", "param": None,
                                                   "code": None}}


# ------------------------------------------------------------------------------ timeouts, streams ----

def test_timeout_before_the_first_token_is_408_and_cancels_the_engine_request():
    backend = FakeBackend()
    cancelled = []

    async def hang(body):
        try:
            await asyncio.sleep(30)
            yield _completion(body)
        except asyncio.CancelledError:
            cancelled.append(body.model)
            raise

    backend.script = hang
    client, _ = _client(backend, request_timeout_s=0.3)
    err = _error(client.post("/v1/completions", json={"model": "student", "prompt": "x"}), 408)
    assert "serve.request_timeout_s" in err["message"] and "0.3 s" in err["message"]
    assert cancelled == ["student"] and backend.closed == 1


def _events(text):
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def test_streams_pass_through_and_end_with_done():
    backend = FakeBackend()
    chunk = 'data: {"choices": [{"index": 0, "text": "a"}]}\n\n'
    backend.script = [[chunk, chunk], chunk]  # the engine batches chunks into lists
    client, _ = _client(backend)
    r = client.post("/v1/completions", json={"model": "student", "prompt": "x", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events[-1] == "[DONE]" and len(events) == 4 and events.count("[DONE]") == 1
    backend.script = [chunk, "data: [DONE]\n\n"]  # the engine's own [DONE] is not doubled
    assert _events(client.post("/v1/completions", json={"model": "student", "prompt": "x", "stream": True}).text
                   ).count("[DONE]") == 1


def test_a_stream_over_the_timeout_ends_with_an_error_event():
    backend = FakeBackend()

    async def slow(body):
        yield 'data: {"choices": [{"index": 0, "text": "a"}]}\n\n'
        await asyncio.sleep(30)
        yield 'data: {"choices": [{"index": 0, "text": "b"}]}\n\n'

    backend.script = slow
    client, _ = _client(backend, request_timeout_s=0.5)
    r = client.post("/v1/chat/completions", json=_chat(stream=True))
    events = _events(r.text)
    assert json.loads(events[0])["choices"][0]["text"] == "a"
    assert json.loads(events[1])["error"]["code"] == "timeout" and events[-1] == "[DONE]"
    assert backend.closed == 1


# ------------------------------------------------------------------------------ config, targets, CLI ----

def test_serve_section_is_validated_and_operational():
    from pydantic import ValidationError

    from proxykd.config import ServeAutoscalingConfig, ServeConfig, is_operational

    assert all(is_operational(f) for f in ServeConfig.model_fields.values())
    assert all(is_operational(f) for f in ServeAutoscalingConfig.model_fields.values())
    assert all(f.description for f in ServeConfig.model_fields.values() if f.annotation is not int)
    for bad in ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, {"baseline_name": "proxykd-student"},
                {"api_key_env": "sk-live 123"}, {"max_n": 0}, {"port": 70000}, {"max_tokens": 0},
                {"request_timeout_s": 0}, {"typo": 1}, {"autoscaling": {"target_ongoing_requests": 0}}):
        with pytest.raises(ValidationError):
            ServeConfig.model_validate(bad)


def _fake_run(tmp_path, baseline=True):
    """A run folder as distill and align leave it (manifests pointing at model folders)."""
    run = tmp_path / "run"
    models = {}
    for name in ("distill/model", "distill/baseline/model", "align/round-1/model"):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    models = {"proxykd": str(run / "distill/model")}
    if baseline:
        models["baseline"] = str(run / "distill/baseline/model")
    (run / "distill/manifest.json").write_text(json.dumps({"models": models}))
    (run / "align/manifest.json").write_text(json.dumps({"model": str(run / "align/round-1/model")}))
    return run


def test_targets_a_run_folder_a_config_and_a_model_folder(tmp_path, monkeypatch):
    import yaml

    from proxykd.config import ConfigError
    from proxykd.serving import ServeError, resolve_target

    run = _fake_run(tmp_path)
    t = resolve_target(str(run))
    assert t.models == {"proxykd-student": str(run / "distill/model")}
    t = resolve_target(str(run), ["serve.baseline_name=bb", "serve.proxy_name=px", "serve.port=9001"],
                       api_key_env="PK_KEYS", port=None)
    assert t.models == {"proxykd-student": str(run / "distill/model"), "bb": str(run / "distill/baseline/model"),
                        "px": str(run / "align/round-1/model")}
    assert t.serve.port == 9001 and t.serve.api_key_env == "PK_KEYS"
    with pytest.raises(ConfigError, match="only serve"):
        resolve_target(str(run), ["distill.alpha=3"])
    # a model folder: the old `proxykd serve MODEL_DIR`
    t = resolve_target(str(run / "distill/model"), model_name="mine", port=8123)
    assert t.models == {"mine": str(run / "distill/model")} and t.serve.port == 8123
    # a run config: its run_dir and serve section
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run), "proxy": {"tiny": {}}, "student": {"tiny": {}},
                                   "serve": {"model_name": "s", "baseline_name": "b", "max_n": 2,
                                             "autoscaling": {"min_replicas": 1, "max_replicas": 3}}}))
    t = resolve_target(str(cfg), ["serve.max_tokens=99"])
    assert t.models == {"s": str(run / "distill/model"), "b": str(run / "distill/baseline/model")}
    assert (t.serve.max_tokens, t.serve.max_n, t.serve.autoscaling.max_replicas) == (99, 2, 3)
    with pytest.raises(ConfigError, match="serve.autoscaling"):
        resolve_target(str(cfg), ["serve.autoscaling.min_replicas=5"])
    # what cannot be served says why
    with pytest.raises(ServeError, match="no such"):
        resolve_target(str(tmp_path / "missing"))
    with pytest.raises(ServeError, match="proxykd distill"):
        resolve_target(str(tmp_path))
    with pytest.raises(ServeError, match="baseline"):
        resolve_target(str(_fake_run(tmp_path / "nb", baseline=False)), ["serve.baseline_name=bb"])


def test_cli_reports_what_it_cannot_serve(tmp_path, monkeypatch, capsys):
    from proxykd.cli import main

    run = _fake_run(tmp_path)
    monkeypatch.delenv("PK_NO_SUCH_KEYS", raising=False)
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "no such config file, run folder or model folder" in capsys.readouterr().err
    # auth asked for, variable missing: refused before anything starts
    assert main(["serve", str(run), "--api-key-env", "PK_NO_SUCH_KEYS"]) == 2
    assert "PK_NO_SUCH_KEYS" in capsys.readouterr().err
    assert main(["serve", str(run), "--set", "serve.max_n=0"]) == 2
    assert "max_n" in capsys.readouterr().err


def test_app_wiring_from_the_serve_section(tmp_path):
    """The Serve application graph carries the config's replicas, autoscaling, limits and key
    variable (built, not deployed: no Ray needed)."""
    from proxykd.config import ServeConfig
    from proxykd.serving import build_models_app

    run = _fake_run(tmp_path)
    s = ServeConfig(api_key_env="PK_KEYS", max_ongoing_requests=3, max_tokens=50, max_n=3, max_model_len=100,
                    autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1.5})
    app = build_models_app({"a": str(run / "distill/model"), "b": str(run / "distill/baseline/model")}, s)
    ingress = app._bound_deployment
    kwargs = ingress.init_kwargs
    assert kwargs["api_key_env"] == "PK_KEYS" and "PK_KEYS" not in json.dumps(kwargs["limits"])
    assert kwargs["limits"] == {"max_tokens": 50, "max_n": 3, "max_body_bytes": 1_000_000, "request_timeout_s": 120.0,
                                "max_model_len": {"a": 100, "b": 100}}
    for name, model_app in kwargs["llm_deployments"].items():
        d = model_app._bound_deployment
        assert d.max_ongoing_requests == 3
        auto = d._deployment_config.autoscaling_config
        assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 1.5)
    fixed = build_models_app({"a": str(run / "distill/model")}, ServeConfig(num_replicas=2))
    d = fixed._bound_deployment.init_kwargs["llm_deployments"]["a"]._bound_deployment
    assert d.num_replicas == 2 and d._deployment_config.autoscaling_config is None


def test_serve_config_and_rayservice_build_the_same_app_with_keys_on(tmp_path):
    """serve/config.yaml and the RayService are valid Serve configs whose builder arguments resolve to
    the app `proxykd serve` runs; the RayService turns API keys on, from a Secret on the head only."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from proxykd.config import ServeConfig, apply_overrides

    repo = Path(__file__).resolve().parents[1]
    local = yaml.safe_load((repo / "serve/config.yaml").read_text())
    service = yaml.safe_load((repo / "cluster/kuberay/rayservice.yaml").read_text())
    remote = yaml.safe_load(service["spec"]["serveConfigV2"])
    for doc in (local, remote):
        ServeDeploySchema.model_validate(doc)
        (app,) = doc["applications"]
        assert app["import_path"] == "serve.app:build" and set(app["args"]) <= {"target", "set", "use_gpu"}
    sets = remote["applications"][0]["args"]["set"]
    s = ServeConfig.model_validate(apply_overrides({}, [x for x in sets if x.startswith("serve.")])["serve"])
    assert s.api_key_env and s.ingress_resources
    cluster = service["spec"]["rayClusterConfig"]
    head_env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    (entry,) = [e for e in head_env if e["name"] == s.api_key_env]
    assert set(entry) == {"name", "valueFrom"} and entry["valueFrom"]["secretKeyRef"]["name"]
    assert all(r in cluster["headGroupSpec"]["rayStartParams"]["resources"] for r in s.ingress_resources)
    for group in cluster["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            assert s.api_key_env not in json.dumps(c.get("env"))

    # serve.app:build with the local config's arguments, pointed at a run folder
    import importlib

    run = _fake_run(tmp_path)
    app_module = importlib.import_module("serve.app")
    args = {**local["applications"][0]["args"], "target": str(run)}
    built = app_module.build(args)
    kwargs = built._bound_deployment.init_kwargs
    assert kwargs["api_key_env"] == "PROXYKD_SERVE_KEYS" and list(kwargs["llm_deployments"]) == ["proxykd-student"]
    with pytest.raises(ValueError, match="unknown arguments"):
        app_module.build({"target": str(run), "bogus": 1})
