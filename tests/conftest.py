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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray per test module, on loopback, shut down afterwards."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
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
