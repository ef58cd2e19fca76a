"""A run killed with SIGKILL in the middle of training resumes from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from conftest import tiny_config


def _proxykd(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "proxykd.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _ray_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "ray::|raylet|gcs_server|ray/dashboard"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def test_align_killed_mid_warmup_resumes_from_checkpoint(tmp_path):
    config = tmp_path / "config.yaml"
    tree = tiny_config(tmp_path / "run", align={"rounds": 1, "warmup": {"epochs": 6, "batch_size": 4},
                                                "dpo": {"epochs": 1, "batch_size": 8},
                                                "sampling": {"max_tokens": 16}})
    config.write_text(yaml.safe_dump(tree))
    first = _proxykd("teacher", str(config))
    assert first.wait(timeout=300) == 0, first.stdout.read()

    ray_before = _ray_pids()
    proc = _proxykd("align", str(config))
    ckpts = tmp_path / "run" / "align" / "warmup" / "_ray" / "align-warmup"
    deadline = time.time() + 300
    snapshot = ckpts / "checkpoint_manager_snapshot.json"

    def registered() -> bool:  # Ray Train has recorded a finished checkpoint
        try:
            return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
        except (OSError, ValueError):
            return False

    while not registered() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert registered(), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray's own daemons run in sessions of their own: stop what the killed run left behind.
    for pid in _ray_pids() - ray_before:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (tmp_path / "run" / "align" / "manifest.json").exists()
    assert not (tmp_path / "run" / "align" / "warmup" / "model").exists()

    again = _proxykd("align", str(config))
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-5000:]
    assert "[align-warmup] resumed from step" in out
    manifest = json.loads((tmp_path / "run" / "align" / "manifest.json").read_text())
    assert manifest["model"].endswith("round-1/model")
    metrics = [json.loads(l) for l in (tmp_path / "run" / "align" / "warmup" / "metrics.jsonl").read_text().splitlines()]
    # every step exactly once across the two processes: no repeated or skipped epoch
    assert [m["epoch"] for m in metrics] == sorted(m["epoch"] for m in metrics)
    assert sorted({m["epoch"] for m in metrics}) == list(range(6))
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
