import os
import socket

import pytest

# Tests run offline and on loopback only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    os.environ.pop(var, None)


def kill_ray_session(session_dir: str) -> None:
    """SIGKILL the daemons of one Ray session. A driver killed with SIGKILL leaves them running
    (they live in sessions of their own, and their workers exit when they go); other Ray clusters
    on this machine are left alone."""
    import signal
    import subprocess

    name = os.path.basename(session_dir.rstrip("/"))
    out = subprocess.run(["pgrep", "-f", name], capture_output=True, text=True)
    for pid in map(int, out.stdout.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray per test module, on loopback, shut down afterwards."""
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
