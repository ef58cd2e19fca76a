"""`proxykd serve` end to end: tiny offline Llamas served by Ray Serve LLM + vLLM (CPU), queried with
the real `openai` client and raw HTTP.

Two servers start together, each a `proxykd serve` subprocess with its own local Ray:
  A: `proxykd serve CONFIG` (a run config whose run folder holds a distilled student and its α = 0
     baseline): both models in one app (A/B through one endpoint), API keys on, tight limits: the
     OpenAI behaviour, auth, limits and the first request after readiness; stopped with SIGTERM.
  B: `proxykd serve MODEL_DIR --set serve.num_replicas=2` (the old one-folder form): requests spread
     over both replicas; stopped with Ctrl-C (SIGINT to its process group).
Both stops must end the command within seconds and leave no process of its Ray session behind."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("ray.serve.llm")
pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from conftest import free_port, ray_session_of, session_processes  # noqa: E402

KEYS_ENV = "PK_SERVE_TEST_KEYS"
KEY = "sk-serve-test-7f3a9c"
READY = re.compile(r"proxykd: ready at (\S+)")
START_TIMEOUT_S = 420


class Server:
    def __init__(self, name, args, tmp, env_extra=None, new_group=False):
        self.log_path = tmp / f"{name}.log"
        self.log = open(self.log_path, "w")
        # RAY_DEDUP_LOGS=0: every replica's request log line reaches the console (the spread test reads them)
        env = {**os.environ, "RAY_DEDUP_LOGS": "0", **(env_extra or {})}
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "proxykd.cli", "serve", *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=new_group)
        self.url = None
        self.ready_at = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self):
        deadline = self.started + START_TIMEOUT_S
        while self.url is None:
            found = READY.search(self.output())
            if found:
                self.url, self.ready_at = found.group(1), time.monotonic()
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                pytest.fail(f"server did not become ready:\n{self.output()[-4000:]}")
            time.sleep(0.5)
        return self

    def stop(self, sig, group=False, timeout=60):
        if self.proc.poll() is None:
            (os.killpg if group else os.kill)(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL) if group else self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self.log.close()
        return self.proc.returncode

    def session(self):
        return ray_session_of(self.output())


def _tiny(path, seed):
    from proxykd.config import ModelConfig, TinyModelSpec
    from proxykd.models import materialize_model

    return materialize_model(ModelConfig(tiny=TinyModelSpec()), path, seed=seed)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    import yaml

    tmp = tmp_path_factory.mktemp("serve")
    run = tmp / "run"
    student, baseline = _tiny(run / "distill" / "model", 0), _tiny(run / "distill" / "baseline" / "model", 1)
    (run / "distill" / "manifest.json").write_text(json.dumps({"models": {"proxykd": student, "baseline": baseline}}))
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run), "proxy": {"tiny": {}}, "student": {"tiny": {}},
        "serve": {"port": free_port(), "model_name": "student", "baseline_name": "baseline", "api_key_env": KEYS_ENV,
                  "max_tokens": 64, "max_n": 3, "max_model_len": 128, "max_body_bytes": 65536,
                  "request_timeout_s": 60},
    }))
    a = Server("a", [str(config)], tmp, {KEYS_ENV: f"{KEY},sk-second-key"})
    b = Server("b", [student, "--name", "student", "--port", str(free_port()), "--set", "serve.num_replicas=2"], tmp,
               new_group=True)
    out = {"a": a, "b": b, "student": student}
    try:
        a.wait_ready()
        b.wait_ready()
        yield out
    finally:
        for s, group in ((a, False), (b, True)):
            if s.proc.poll() is None:  # a test failed before its stop: stop it anyway, leave nothing
                s.stop(signal.SIGKILL, group=group)
                session, token = ray_session_of(s.output())
                from proxykd import reaper

                reaper.stop(token, wait_s=5)


@pytest.fixture(scope="module")
def a(servers):
    return servers["a"]


@pytest.fixture(scope="module")
def client(a):
    return openai.OpenAI(base_url=a.url, api_key=KEY, timeout=60, max_retries=0)


def _http(url, method="GET", body=None, key=KEY, raw=None, headers=None):
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, method=method, headers=h, data=data)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def _error(status_body, status):
    code, text, _ = status_body
    assert code == status, text
    body = json.loads(text)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    for leak in ("Internal exception", "ray.llm", "Traceback", "original exception", KEY):
        assert leak not in text, text
    return body["error"]


# ------------------------------------------------------------------------------ readiness ----

def test_first_request_after_ready_runs_at_normal_speed(a, client):
    assert a.ready_at is not None
    t0 = time.monotonic()
    r = client.chat.completions.create(model="student", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    first = time.monotonic() - t0
    assert r.choices[0].message.content is not None
    t0 = time.monotonic()
    client.chat.completions.create(model="student", messages=[{"role": "user", "content": "hey"}], max_tokens=8)
    second = time.monotonic() - t0
    print(f"\n[test_serve] ready after {a.ready_at - a.started:.0f} s; first chat {first:.2f} s, second {second:.2f} s")
    assert first < 10, f"the first chat after readiness took {first:.1f} s"


# ------------------------------------------------------------------------------ OpenAI behaviour ----

def test_models_and_auth_on_every_route(a, client):
    assert "student" in [m.id for m in client.models.list().data]
    second = openai.OpenAI(base_url=a.url, api_key="sk-second-key", timeout=60, max_retries=0)
    assert second.models.retrieve("student").id == "student"
    for key in (None, "sk-wrong"):
        for method, route, body in (("GET", "/models", None), ("GET", "/models/student", None),
                                    ("POST", "/completions", {"model": "student", "prompt": "x"}),
                                    ("POST", "/chat/completions", {"model": "student", "messages": []})):
            err = _error(_http(a.url + route, method, body, key=key), 401)
            assert err["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=a.url, api_key="sk-wrong", max_retries=0).models.list()
    assert KEY not in a.output()  # the key is never logged


def test_chat_applies_the_template_and_counts_usage(servers, client):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "2 + 2 ="}]
    r = client.chat.completions.create(model="student", messages=messages, max_tokens=8, temperature=0, seed=1)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    tok = AutoTokenizer.from_pretrained(servers["student"])
    templated = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert templated != "2 + 2 ="  # the test's template does something
    assert r.usage.prompt_tokens == len(tok(templated, add_special_tokens=False)["input_ids"])


def test_completions_streaming_and_not(client):
    r = client.completions.create(model="student", prompt="Once", max_tokens=12, temperature=0)
    text = r.choices[0].text
    assert r.object == "text_completion" and 1 <= r.usage.completion_tokens <= 12
    pieces = list(client.completions.create(model="student", prompt="Once", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == text  # same greedy text, streamed


def test_chat_stream_is_sse_with_done_and_usage(a):
    code, text, headers = _http(a.url + "/chat/completions", "POST", {
        "model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True,
        "stream_options": {"include_usage": True}})
    assert code == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_sampling_parameters(client):
    def ask(**kw):
        return client.completions.create(model="student", prompt="The", max_tokens=10, **kw)

    assert ask(temperature=0.9, seed=7).choices[0].text == ask(temperature=0.9, seed=7).choices[0].text
    assert len({ask(temperature=1.5, top_p=1.0, seed=s).choices[0].text for s in range(4)}) > 1
    greedy = ask(temperature=0)
    assert ask(temperature=1.0, top_p=1e-6, seed=3).choices[0].text == greedy.choices[0].text  # top_p → greedy
    n = client.chat.completions.create(model="student", messages=[{"role": "user", "content": "hi"}], n=3,
                                       max_tokens=5, temperature=1.0, seed=5)
    assert sorted(c.index for c in n.choices) == [0, 1, 2] and n.usage.completion_tokens <= 15
    # stop: the text ends before the stop string and the finish reason says so
    full = greedy.choices[0].text
    stop = full[3:5] if len(full) >= 5 and full[3:5].strip() else None
    if stop:
        cut = ask(temperature=0, stop=[stop]).choices[0]
        assert stop not in cut.text and full.startswith(cut.text) and cut.finish_reason == "stop"


def test_logprobs(client):
    r = client.completions.create(model="student", prompt="The", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens and all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(t) <= 4 for t in lp.top_logprobs)
    c = client.chat.completions.create(model="student", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


# ------------------------------------------------------------------------------ errors and limits ----

def test_bad_requests_get_openai_errors(a, client):
    _error(_http(a.url + "/chat/completions", "POST", raw=b'{"model": "student", "messages": ['), 400)
    err = _error(_http(a.url + "/completions", "POST", {"model": "gpt-9", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")
    _error(_http(a.url + "/completions", "POST", {"model": "student", "prompt": "x", "temperature": -1}), 400)
    _error(_http(a.url + "/chat/completions", "POST", {"model": "student", "messages": "hi"}), 400)
    _error(_http(a.url + "/completions", "POST", {"model": "student", "prompt": "x", "logprobs": 50}), 400)
    _error(_http(a.url + "/v2/anything"), 404)


@pytest.mark.parametrize("body,limit", [
    ({"prompt": "x", "max_tokens": 65}, "serve.max_tokens"),
    ({"prompt": "x", "n": 4}, "serve.max_n"),
    ({"prompt": "hello " * 200}, "context length is 128"),
    ({"prompt": "x" * 70000}, "serve.max_body_bytes"),
])
def test_limits_get_400_naming_the_limit(a, client, body, limit):
    err = _error(_http(a.url + "/completions", "POST", {"model": "student", **body}), 400)
    assert limit in err["message"]
    # and the server still answers
    assert client.completions.create(model="student", prompt="ok", max_tokens=2).choices


def test_requests_spread_over_both_replicas(servers):
    """Server B runs its model on 2 replicas (serve.num_replicas): concurrent requests are answered by
    both, told apart by the replica that logged each response's request id."""
    from concurrent.futures import ThreadPoolExecutor

    b = servers["b"]
    c = openai.OpenAI(base_url=b.url, api_key="unused", timeout=60, max_retries=0)

    def ask(i):
        return c.completions.create(model="student", prompt=f"n{i}", max_tokens=24, temperature=0).id

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(ask, range(24)))
    pattern = re.compile(r"WarmLLMServer:student (\w+) ([0-9a-f-]{36}) -- CALL completions OK")
    deadline = time.monotonic() + 15
    while True:  # replica log lines reach the driver's console in batches
        calls = {rid: replica for replica, rid in pattern.findall(b.output())}
        replicas = [calls.get(rid.split("-", 1)[1]) for rid in ids]
        if None not in replicas or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert None not in replicas, "a response whose request no replica logged"
    counts = {r: replicas.count(r) for r in set(replicas)}
    print(f"\n[test_serve] 24 requests per replica: {counts}")
    assert len(counts) == 2 and min(counts.values()) >= 3


# ------------------------------------------------------------------------------ A/B, stopping ----

def test_student_and_baseline_through_one_endpoint(client):
    assert sorted(m.id for m in client.models.list().data) == ["baseline", "student"]
    out = {m: client.completions.create(model=m, prompt="The", max_tokens=4, temperature=0, logprobs=1).choices[0]
           for m in ("student", "baseline")}
    assert out["student"].logprobs.token_logprobs != out["baseline"].logprobs.token_logprobs  # two models


def _assert_stops(server, sig, group):
    session, token = server.session()
    assert session_processes(session, token), "the server's Ray processes should be running"
    t0 = time.monotonic()
    rc = server.stop(sig, group=group, timeout=30)
    took = time.monotonic() - t0
    assert rc is not None, f"still running 30 s after {sig.name}:\n{server.output()[-3000:]}"
    left = session_processes(session, token)
    print(f"\n[test_serve] {sig.name}: exit {rc} after {took:.1f} s, {len(left)} process(es) left")
    assert rc == 0 and took < 20 and not left, server.output()[-3000:]
    assert "proxykd: stopped" in server.output()


def test_sigterm_stops_everything(servers):
    _assert_stops(servers["a"], signal.SIGTERM, group=False)


def test_ctrl_c_stops_everything(servers):
    _assert_stops(servers["b"], signal.SIGINT, group=True)
