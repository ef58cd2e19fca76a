import os
import socket
from pathlib import Path

import pytest

# Tests run offline and on loopback only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    os.environ.pop(var, None)


def session_processes(session_dir: str | None, token: str | None = None) -> list[int]:
    """Live processes (not zombies) of one Ray session: those with the session's name in their
    command line (its daemons) and, given the mark proxykd's init_ray puts on a run
    (PROXYKD_RAY_RUN=token in the environment, see proxykd/reaper.py), those carrying it: agents,
    workers, vLLM engines, which carry no session dir and are re-parented to init once the raylet
    is gone. Read from /proc here, independently of proxykd.reaper."""
    name = os.path.basename(session_dir.rstrip("/")).encode() if session_dir else None
    mark = f"PROXYKD_RAY_RUN={token}".encode() if token else None
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                ours = name is not None and name in f.read()
            if not ours and mark:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    ours = mark in f.read().split(b"\0")
        except (OSError, IndexError):
            continue
        if ours:
            pids.append(int(entry))
    return pids


def ray_session_of(output: str) -> tuple[str, str]:
    """(session dir, run mark) from the `ray session: DIR (PROXYKD_RAY_RUN=TOKEN)` line init_ray logs."""
    import re

    found = re.search(r"ray session: (\S+) \(PROXYKD_RAY_RUN=(\w+)\)", output)
    assert found, "the driver logged no ray session line"
    return found.group(1), found.group(2)


# Tracebacks Ray Train prints for reasons outside proxykd, seen on a 2-core machine shared with other
# Ray clusters: (1) its autoscaling request misses a 5 s timeout when the CPU is overloaded (the
# message says so itself); (2) its PlacementGroupCleaner asks the state API without an address,
# which resolves to the newest Ray on the machine or /tmp/ray/ray_current_cluster (another run's,
# or one long gone): its monitor thread dies when that does not answer, and stopping it times out.
TOLERATED_TRACEBACKS = ("Failed to send resource request for train-", "in thread PlacementGroupCleanerMonitor",
                        "Failed to stop PlacementGroupCleaner gracefully")


def unexpected_tracebacks(output: str) -> list[str]:
    """The lines around each traceback in `output`, except those Ray logs after a message in
    TOLERATED_TRACEBACKS."""
    lines = output.splitlines()
    found = []
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            if i and any(t in lines[i - 1] for t in TOLERATED_TRACEBACKS):
                continue
            found.append("\n".join(lines[max(0, i - 2):i + 12]))
    return found


def run_logs(run_dir) -> tuple[str, str]:
    """(driver.log, workers.log) of the last command that ran on `run_dir` (proxykd/console.py):
    what the driver and the Ray workers wrote that no longer reaches the console (the workers'
    lines, tracebacks among them, and Ray's, Ray Data's and the libraries' own)."""
    from proxykd.console import DRIVER_LOG, LOG_DIR, WORKERS_LOG, last_run

    folder = Path(run_dir) / LOG_DIR
    return tuple(last_run((folder / name).read_text()) if (folder / name).exists() else ""
                 for name in (DRIVER_LOG, WORKERS_LOG))


def kill_ray_session(session_dir: str, token: str | None = None) -> None:
    """SIGKILL the processes of one Ray session (`session_processes`); other Ray clusters on this
    machine are left alone. Without the run's mark only its daemons are found: a driver killed
    with SIGKILL also leaves agents and workers, which exit on their own (the agents after about
    60 s)."""
    import signal

    for pid in session_processes(session_dir, token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_BUCKET = "proxykd-test"


@pytest.fixture(scope="session", autouse=True)
def object_store(tmp_path_factory):
    """An S3-compatible server (moto, in a process of its own) on 127.0.0.1 for the session, with
    bucket S3_BUCKET, and the environment pyarrow reads it from (endpoint, test credentials) and a
    mirror root of the session's own. Autouse and started before any Ray: the Ray workers of
    `local_ray` and `ray_head` inherit that environment. Returns the endpoint URL."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "PROXYKD_MIRROR": str(tmp_path_factory.mktemp("mirror"))})
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{S3_BUCKET}", method="PUT"), timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "the moto S3 server did not start"
                time.sleep(0.2)
        yield endpoint
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def ray_head(object_store):
    """One `ray start --head` cluster on 127.0.0.1 for the session's job-submission tests: the
    address of its dashboard (http://127.0.0.1:PORT). In a process group of its own, stopped by
    signalling that group (never `ray stop --force`, which would stop every Ray on this machine).
    Not `--block`: that kills the whole head when one of its processes dies, and under load its
    Ray Client server gives up (after 30 s) waiting for the head's node to register."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    port, dash, agent = free_port(), free_port(), free_port()
    # A temp dir of its own: a job's driver finds its cluster through TEMP_DIR/ray_current_cluster,
    # which any other `ray start` on this machine overwrites in the shared /tmp/ray.
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    head = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
         "--temp-dir", temp_dir,
         "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "4",
         "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(free_port()),
         "--disable-usage-stats"],
        # (no 30 s drain on SIGTERM: nothing of this head needs to be handed over)
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    session = None
    try:
        out, _ = head.communicate(timeout=180)
        assert head.returncode == 0, f"ray start --head failed:\n{out[-3000:]}"
        deadline = time.time() + 120
        while True:
            try:
                session = json.loads(urllib.request.urlopen(f"{address}/api/version", timeout=2).read())["session_name"]
                break
            except OSError:
                assert time.time() < deadline, "the Ray head did not come up in 120 s"
                time.sleep(0.5)
        yield address
    finally:
        head.poll() is None and head.kill()
        stop_process_group(head.pid)
        if session:  # workers that left the group
            kill_ray_session(f"{temp_dir}/{session}")
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_process_group(pgid: int) -> None:
    """SIGTERM to a process group, SIGKILL to what is left after 5 s (a Ray head's GCS server and
    autoscaler monitor do not stop on SIGTERM)."""
    import signal
    import time

    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@pytest.fixture(scope="session")
def local_ray(object_store):
    """One local Ray for the session's in-process tests, on loopback, shut down at the end (a start
    costs 5 to 10 s on 2 cores). Tests that kill a Ray or check what is left of one start their
    own, in a process of their own."""
    import ray

    # address="local": a cluster of its own even while a `ray start` cluster runs on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def tiny_config(run_dir, **sections) -> dict:
    """A small, fast run config tree (override sections by keyword)."""
    tree = {
        "run_dir": str(run_dir),
        "data": {
            "tasks": [{"name": "basic_arithmetic", "size": 60,
                       "kwargs": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}],
            "eval_fraction": 0.15,
            "split": {"warmup": 0.2, "proxy": 0.4, "student": 0.4},
        },
        "teacher": {"max_tokens": 32, "max_retries": 0, "timeout_s": 10},
        "proxy": {"tiny": {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128}},
        "student": {"tiny": {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128}},
        "align": {"rounds": 1, "max_length": 96, "warmup": {"epochs": 2, "batch_size": 8},
                  "dpo": {"epochs": 1, "batch_size": 8},
                  "sampling": {"max_tokens": 16}},
        "logits": {"top_k": 5, "batch_size": 8},
        "distill": {"alpha": 1.0, "train": {"epochs": 1, "batch_size": 8}},
        "eval": {"max_tokens": 16},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return tree


def assert_topk_matches(got_ids, got_lp, ref, k: int, atol: float) -> None:
    """Stored top-k (`got_ids`, `got_lp` [n, k]) against reference log-probs `ref` [n, V] (a torch
    tensor from a plain transformers forward). Values: entry j is the j-th largest log-prob. Ids:
    equal to the reference top-k wherever the rank is clear of its neighbours by 2·atol; inside a
    near-tie two engines may order the tied ids differently, so every stored id must also carry
    the stored log-prob under the reference (a wrong id cannot pass that)."""
    import numpy as np
    import torch

    top = ref.topk(k + 1)
    assert got_ids.shape == got_lp.shape == (ref.shape[0], k)
    np.testing.assert_allclose(got_lp, top.values[:, :k].numpy(), rtol=0, atol=atol)
    gaps = (top.values[:, :-1] - top.values[:, 1:]).numpy()
    clear = (gaps[:, :k] > 2 * atol) & np.concatenate([np.ones((len(gaps), 1), bool), gaps[:, : k - 1] > 2 * atol], 1)
    assert clear.mean() > 0.5  # the test must actually compare ids
    assert (got_ids == top.indices[:, :k].numpy())[clear].all()
    np.testing.assert_allclose(ref.gather(1, torch.as_tensor(got_ids, dtype=torch.long)).numpy(), got_lp,
                               rtol=0, atol=atol)
    assert all(len(set(r)) == k for r in got_ids.tolist())  # k distinct ids per position


def student_split(rows):
    """(prompts, teacher) tables for the logits stage from [(id, user message, response,
    finish_reason)], every row in the student split."""
    import pyarrow as pa

    from proxykd.data import PROMPT_SCHEMA

    prompts = pa.Table.from_pylist(
        [{"id": rid, "messages": [{"role": "user", "content": msg}], "reference": None, "split": "student",
          "task": None, "metadata": "{}"} for rid, msg, _, _ in rows], schema=PROMPT_SCHEMA)
    teacher = pa.table({"id": [r[0] for r in rows], "response": [r[2] for r in rows],
                        "finish_reason": [r[3] for r in rows]})
    return prompts, teacher


# ---------------------------------------------------------------- the session's pipeline run

# Bad rows among the good ones of the pipeline run's prompt file, each with a reference (the local
# teacher would answer it): (line text, the id it is rejected under, what its error says).
BAD_ROWS = [
    (b'{"id": "not-utf8", "prompt": "caf\xe9", "reference": "1"}', "<line {n}>", "not valid UTF-8"),
    (b'{"id": "surrogate", "prompt": "1 + \\ud800 = ?", "reference": "1"}', "surrogate", "lone surrogate"),
    (b'{"id": "task-number", "prompt": "1 + 1 = ?", "reference": "2", "task": 7}', "task-number", "unknown task 7"),
    (b'{"id": "metadata-list", "prompt": "1 + 1 = ?", "reference": "2", "metadata": [1]}', "metadata-list",
     "must be a JSON object"),
    (b'{"id": "hash#1", "prompt": "1 + 1 = ?", "reference": "2"}', "hash#1", "contains '#'"),
    (b'{"id": "basic_arithmetic-0-0", "prompt": "2 + 2 = ?", "reference": "4"}', "basic_arithmetic-0-0",
     "duplicate `id` (first on line 1)"),
    (b'{"id": "truncated", "prompt": ', "<line {n}>", "not valid JSON"),
]


def prompt_file_with_bad_rows(path, tree: dict) -> list[tuple[str, str, str]]:
    """The config's reasoning-gym rows as a JSONL prompt file with BAD_ROWS between them; returns
    (id, where, error fragment) of each bad row."""
    import json

    from proxykd.config import DataConfig
    from proxykd.data import reasoning_gym_rows

    lines = [json.dumps(r).encode() for r in reasoning_gym_rows(DataConfig(**tree["data"]))]
    expected = []
    for i, (line, rid, why) in enumerate(BAD_ROWS):
        n = 2 + 3 * i  # 1-based line number once inserted: every third line, after the first
        lines.insert(n - 1, line)
        expected.append((rid.format(n=n), f"line {n}: ", why))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def submit_and_wait(address: str, config, timeout_s: float = 900) -> str:
    """`proxykd submit CONFIG` to the cluster at `address`, waited for: the job's output. Fails the
    test with the output's tail unless the job succeeded."""
    from proxykd import jobs

    return wait_for_job(address, jobs.submit(config, address), timeout_s)


def wait_for_job(address: str, job_id: str, timeout_s: float = 900) -> str:
    """The output of job `job_id` once it ended; fails the test with its tail unless it succeeded."""
    from proxykd import jobs

    info = jobs.wait(job_id, address, timeout_s=timeout_s, poll_s=1.0)
    out = jobs.job_logs(job_id, address)
    assert str(getattr(info.status, "value", info.status)) == "SUCCEEDED", out[-5000:]
    return out


@pytest.fixture(scope="session")
def pipeline_job(ray_head, tmp_path_factory):
    """The whole pipeline on tiny models, submitted (not waited for) as a Ray job to the session's
    head, from a prompt file with BAD_ROWS among two reasoning-gym tasks, with a dev split and one
    DPO round, its run folder in object storage (the session's S3 server: `run_uri`; `run_dir` is
    the job's mirror of it on this machine, where the tests read it). `pipeline_run` waits for it."""
    import yaml

    from proxykd import storage

    root = tmp_path_factory.mktemp("pipeline")
    run_uri = f"s3://{S3_BUCKET}/pipeline"
    tree = tiny_config(
        run_uri,
        data={"tasks": [{"name": "basic_arithmetic", "size": 60,
                         "kwargs": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
                        {"name": "syllogism", "size": 40}],
              "eval_fraction": 0.2, "dev_fraction": 0.15, "split_by": "question",
              "split": {"warmup": 0.2, "proxy": 0.4, "student": 0.4}},
        # syllogisms run to about 250 byte-level tokens
        align={"rows_per_round": 8, "max_length": 256, "heldout_fraction": 0.25},
        logits={"max_length": 256},
        # a job joins a cluster: its local teacher would listen on the node's address, not loopback
        teacher={"local_host": "127.0.0.1"},
        # one seed: each further seed adds two trainings and two vLLM engines (the real report runs two)
        report={"seeds": [0], "lrs": [1e-3, 3e-3], "alphas": [1.0], "bootstrap_samples": 300},
    )
    bad = prompt_file_with_bad_rows(root / "prompts.jsonl", tree)
    tree["data"] = {**tree["data"], "source": "file", "path": str(root / "prompts.jsonl")}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    from proxykd import jobs

    return {"cluster": ray_head, "config": config, "tree": tree, "run_dir": storage.local_path(run_uri),
            "run_uri": run_uri, "bad": bad, "job_id": jobs.submit(config, ray_head)}


@pytest.fixture(scope="session")
def pipeline_run(pipeline_job):
    """The session's pipeline job (`pipeline_job`), ended: its output and logs added. Shared:
    tests/test_pipeline.py checks its artifacts, tests/test_report_run.py runs `proxykd report` on
    from its stages (the same config; only the report's own parts are new)."""
    out = wait_for_job(pipeline_job["cluster"], pipeline_job["job_id"], timeout_s=1800)
    return {**pipeline_job, "output": out, "logs": run_logs(pipeline_job["run_dir"])}


@pytest.fixture(scope="session", autouse=True)
def pipeline_job_starts_early(request):
    """When a test of the session's pipeline job is selected, the job is submitted before the first
    test and runs on the Ray head while the tests before its own run (about 3 minutes of a
    setup that is largely waiting: process starts, Ray's polls). The serve servers are not started
    early: idle until their module, their 4 engines held about 8 GB the whole session (README,
    "Test suite")."""
    if {"test_pipeline.py", "test_report_run.py"} & {item.path.name for item in request.session.items}:
        request.getfixturevalue("pipeline_job")

