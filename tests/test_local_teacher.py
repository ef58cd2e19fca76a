"""The local teacher, exercised through the real `openai` client on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest

from proxykd.local_teacher import Faults, LocalTeacher, load_responses, lookup_key

MODEL = "local-teacher"
TABLE = {
    "What is the capital of France?": "The capital of France is Paris.",
    "Count to five.": "one two three four five",
}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # Requests to 127.0.0.1 must not be routed through a proxy configured in the environment.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def teacher():
    with LocalTeacher(TABLE, fallback="No idea.") as t:
        yield t


@pytest.fixture
def client(teacher):
    with openai.OpenAI(base_url=teacher.base_url, api_key="x", max_retries=0, timeout=10) as c:
        yield c


def _port(base_url: str) -> int:
    return urlsplit(base_url).port


def _raw_post(base_url: str, path: str, body: bytes) -> tuple[int, dict]:
    """POST without the openai client (no Authorization header, arbitrary body)."""
    conn = http.client.HTTPConnection("127.0.0.1", _port(base_url), timeout=10)
    try:
        conn.request("POST", f"/v1{path}", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------ chat


def test_chat_answers_from_table_with_usage(client):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},  # 5 words
        {"role": "user", "content": "  What is the capital of France?\n"},  # 6 words
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.7)
    assert r.object == "chat.completion"
    assert r.id and r.created > 0 and r.model == MODEL
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 6, 17)


def test_lookup_key_uses_last_user_message_stripped():
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "  second \n"},
        {"role": "assistant", "content": "not me"},
    ]
    assert lookup_key(messages) == "second"
    assert lookup_key([{"role": "user", "content": [{"type": "text", "text": " parts "}]}]) == "parts"
    assert lookup_key([{"role": "system", "content": "only system"}]) == ""


def test_n_gives_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=_user("Count to five."), n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == "one two three four five" for c in r.choices)
    assert r.usage.completion_tokens == 3 * 5


def test_unknown_prompt_gets_fallback(client):
    r = client.chat.completions.create(model=MODEL, messages=_user("What is the meaning of life?"))
    assert r.choices[0].message.content == "No idea."
    assert r.choices[0].finish_reason == "stop"


def test_default_fallback():
    with LocalTeacher({}) as t, openai.OpenAI(base_url=t.base_url, api_key="x", max_retries=0) as c:
        r = c.chat.completions.create(model=MODEL, messages=_user("anything"))
    assert r.choices[0].message.content == "I don't know."


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_truncates_with_length(client, param):
    r = client.chat.completions.create(model=MODEL, messages=_user("Count to five."), **{param: 3})
    assert r.choices[0].message.content == "one two three"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_max_tokens_not_reached_is_stop(client):
    r = client.chat.completions.create(model=MODEL, messages=_user("Count to five."), max_tokens=5)
    assert r.choices[0].message.content == "one two three four five"
    assert r.choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------------- completions


def test_completions_route(client):
    r = client.completions.create(model=MODEL, prompt="Count to five.", n=2)
    assert r.object == "text_completion"
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.text == "one two three four five" and c.finish_reason == "stop" for c in r.choices)
    assert r.choices[0].logprobs is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 10, 13)

    r = client.completions.create(model=MODEL, prompt="Count to five.", max_tokens=2)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("one two", "length")

    r = client.completions.create(model=MODEL, prompt="unknown prompt")
    assert r.choices[0].text == "No idea."


# ---------------------------------------------------------------------------------------- errors


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=_user("Count to five."))
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"
    assert e.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Count to five.")


def test_malformed_body_is_400(teacher, client):
    status, body = _raw_post(teacher.base_url, "/chat/completions", json.dumps({"model": MODEL}).encode())
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "messages" in body["error"]["message"]

    status, body = _raw_post(teacher.base_url, "/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def test_no_api_key_needed(teacher):
    body = json.dumps({"model": MODEL, "messages": _user("Count to five.")}).encode()
    status, r = _raw_post(teacher.base_url, "/chat/completions", body)  # no Authorization header
    assert status == 200
    assert r["choices"][0]["message"]["content"] == "one two three four five"


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


# ---------------------------------------------------------------------------------- async client


def test_async_client(teacher):
    async def ask_all():
        async with openai.AsyncOpenAI(base_url=teacher.base_url, api_key="x", max_retries=0) as c:
            return await asyncio.gather(
                *(c.chat.completions.create(model=MODEL, messages=_user(p)) for p in [*TABLE, "??"])
            )

    answers = [r.choices[0].message.content for r in asyncio.run(ask_all())]
    assert answers == [*TABLE.values(), "No idea."]
    assert teacher.request_count == len(TABLE) + 1


# ------------------------------------------------------------------------------------- lifecycle


def test_request_count_counts_requests(teacher, client):
    assert teacher.request_count == 0
    client.chat.completions.create(model=MODEL, messages=_user("Count to five."), n=3)
    client.completions.create(model=MODEL, prompt="Count to five.")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=_user("Count to five."))
    client.models.list()  # not a completion request
    assert teacher.request_count == 3

    def ask(k):
        for _ in range(k):
            client.chat.completions.create(model=MODEL, messages=_user("Count to five."))

    threads = [threading.Thread(target=ask, args=(5,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert teacher.request_count == 3 + 20


def test_stop_frees_port_and_is_idempotent():
    t = LocalTeacher(TABLE)
    base_url = t.start()
    port = _port(base_url)
    with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0) as c:
        c.chat.completions.create(model=MODEL, messages=_user("Count to five."))  # leaves a keep-alive connection
        t.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    t.stop()  # idempotent

    # The port can be taken again right away.
    with LocalTeacher(TABLE, port=port) as again:
        assert _port(again.base_url) == port


def test_two_servers_get_different_ports():
    with LocalTeacher({"q": "from a"}) as a, LocalTeacher({"q": "from b"}) as b:
        assert _port(a.base_url) != _port(b.base_url)
        for t, expected in ((a, "from a"), (b, "from b")):
            with openai.OpenAI(base_url=t.base_url, api_key="x", max_retries=0) as c:
                assert c.chat.completions.create(model=MODEL, messages=_user("q")).choices[0].message.content == expected


def test_start_errors(teacher):
    with pytest.raises(RuntimeError, match="already running"):
        teacher.start()
    with pytest.raises(OSError):  # the port is taken by the running teacher
        LocalTeacher(TABLE, port=_port(teacher.base_url)).start()
    with pytest.raises(RuntimeError, match="not been started"):
        LocalTeacher(TABLE).base_url


# ------------------------------------------------------------------------------------------- CLI


def test_load_responses(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "a", "response": "1"}\n\n{"prompt": "b", "response": "2"}\n')
    assert load_responses(path) == {"a": "1", "b": "2"}
    path.write_text('{"prompt": "a", "response": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_responses(path)


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_cli_serves_until_ctrl_c(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "ping", "response": "pong"}) + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxykd.local_teacher", "--responses", str(path), "--model", "cli-teacher"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        line = proc.stdout.readline()
        assert " at http://" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base_url = line.rsplit(" at ", 1)[1].strip()
        with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=10) as c:
            r = c.chat.completions.create(model="cli-teacher", messages=_user("ping"))
        assert r.choices[0].message.content == "pong"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# ------------------------------------------------------------------------------ fault injection

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Count to five."}]}


@pytest.mark.parametrize(
    "faults, error",
    [
        (Faults(rate_limit=1.0, retry_after_s=7), openai.RateLimitError),
        (Faults(server_error=1.0), openai.InternalServerError),
        (Faults(timeout=1.0, hang_s=2.0), openai.APITimeoutError),
        (Faults(truncated_json=1.0), json.JSONDecodeError),
        (Faults(insufficient_quota=1.0), openai.RateLimitError),
        (Faults(dropped=1.0), openai.APIConnectionError),
    ],
)
def test_each_fault_reaches_the_client_as_a_real_api_would_send_it(faults, error):
    with LocalTeacher(TABLE, faults=faults) as t, openai.OpenAI(
            base_url=t.base_url, api_key="x", max_retries=0, timeout=1.0) as c:
        with pytest.raises(error) as info:
            c.chat.completions.create(**CHAT)
        if faults.rate_limit:
            assert info.value.response.headers["retry-after"] == "7"
        if faults.insufficient_quota:  # what tells it apart from a rate limit
            assert info.value.code == "insufficient_quota" and "retry-after" not in info.value.response.headers
        if faults.dropped:
            assert "incomplete" in str(info.value.__cause__) or "peer closed" in str(info.value.__cause__)
        assert t.request_count == 1 and sum(t.fault_counts.values()) == 1 and not t.billed
        assert t.received["Count to five."] == 1


def test_empty_content_and_latency():
    with LocalTeacher(TABLE, faults=Faults(empty_content=1.0, latency_s=0.3)) as t, openai.OpenAI(
            base_url=t.base_url, api_key="x", max_retries=0) as c:
        start = time.monotonic()
        resp = c.chat.completions.create(**CHAT)
        assert time.monotonic() - start >= 0.3
        assert resp.choices[0].message.content == "" and t.fault_counts["empty_content"] == 1 and not t.billed


@pytest.mark.parametrize("fault, finish_reason", [("length", "length"), ("content_filter", "content_filter"),
                                                  ("refusal", "stop")])
def test_final_but_unusable_answers_are_billed_answers(fault, finish_reason):
    with LocalTeacher(TABLE, faults=Faults(**{fault: 1.0})) as t, openai.OpenAI(
            base_url=t.base_url, api_key="x", max_retries=0) as c:
        msg = c.chat.completions.create(**CHAT).choices[0]
        text = c.completions.create(model=MODEL, prompt="Count to five.").choices[0]
        assert msg.finish_reason == text.finish_reason == finish_reason
        if fault == "refusal":
            assert msg.message.content is None and text.text is None and "can't help" in msg.message.refusal
        else:  # cut in half
            assert msg.message.content == text.text == "one two"
        assert t.fault_counts[fault] == 2 and sorted(t.billed.values()) == [1, 1]


def test_one_empty_sample_among_n():
    with LocalTeacher(TABLE, faults=Faults(empty_sample=1.0)) as t, openai.OpenAI(
            base_url=t.base_url, api_key="x", max_retries=0) as c:
        resp = c.chat.completions.create(**CHAT, n=3)
        assert [ch.message.content for ch in resp.choices] == ["one two three four five"] * 2 + [""]
        assert list(t.billed.values()) == [1] and t.samples_billed["Count to five."] == 2


def test_fault_rates_are_drawn_per_request_and_clean_answers_are_billed_once_per_body():
    faults = Faults(rate_limit=0.1, server_error=0.1, seed=3)
    with LocalTeacher(TABLE, faults=faults) as t, openai.OpenAI(
            base_url=t.base_url, api_key="x", max_retries=0) as c:
        clean = 0
        for i in range(200):
            try:
                c.chat.completions.create(**CHAT, max_tokens=i + 1)  # 200 different bodies
                clean += 1
            except (openai.RateLimitError, openai.InternalServerError):
                pass
        assert t.request_count == 200 and 200 - clean == sum(t.fault_counts.values())
        assert 20 <= t.fault_counts["rate_limit"] + t.fault_counts["server_error"] <= 60
        assert len(t.billed) == clean and set(t.billed.values()) == {1}
    with LocalTeacher(TABLE) as t, openai.OpenAI(base_url=t.base_url, api_key="x", max_retries=0) as c:
        c.chat.completions.create(**CHAT)
        c.chat.completions.create(**CHAT)  # the same body again is billed again
        c.chat.completions.create(**CHAT, max_tokens=3)
        assert sorted(t.billed.values()) == [1, 2]


def test_fault_rates_are_validated():
    with pytest.raises(ValueError, match="sum to at most 1"):
        Faults(rate_limit=0.6, server_error=0.6)
    with pytest.raises(ValueError):
        Faults(latency_s=-1)
    assert Faults(rate_limit=0.2, timeout=0.1).draw(0.25) == "timeout"
    assert Faults(rate_limit=0.2).draw(0.1) == "rate_limit" and Faults(rate_limit=0.2).draw(0.5) is None


def test_stats_route_counts_requests_faults_and_billing():
    with LocalTeacher(TABLE, faults=Faults(server_error=0.5, seed=1)) as t, openai.OpenAI(
            base_url=t.base_url, api_key="x", max_retries=0) as c:
        for i in range(20):
            try:
                c.chat.completions.create(**CHAT, max_tokens=i + 1)
            except openai.InternalServerError:
                pass
        conn = http.client.HTTPConnection("127.0.0.1", _port(t.base_url), timeout=10)
        conn.request("GET", "/stats")
        stats = json.loads(conn.getresponse().read())
        conn.close()
        assert stats["requests"] == 20 and stats["faults"]["server_error"] + stats["billed"] == 20
        assert 0 < stats["span_s"] and stats == t.stats()
