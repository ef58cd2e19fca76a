"""Serve the finished student (a Hugging Face folder) over HTTP with an OpenAI-compatible API.

Built on Ray Serve LLM (`ray.serve.llm.build_openai_app` + `LLMConfig`), which runs vLLM inside a
Serve deployment behind an OpenAI ingress: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.
The same app runs on a GPU cluster (`use_gpu=True`) or on CPUs with the vLLM CPU build.

    from proxykd.serving import serve_student
    serve_student("runs/x/student", "proxykd-student", port=8000)   # blocks until Ctrl-C

or, with a Ray Serve config file: `PROXYKD_MODEL_PATH=... serve run serve/config.yaml`.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

# vLLM CPU settings forwarded to the engine when the caller has not set them.
# KV cache in GiB: 1 GiB is plenty for small students; raise VLLM_CPU_KVCACHE_SPACE for long contexts.
_CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# Forwarded from the driver's environment when set (e.g. VLLM_HOST_IP=127.0.0.1 on a laptop).
_FORWARDED_ENV = (
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_NUM_OF_RESERVED_CPU",
    "VLLM_HOST_IP",
    "VLLM_LOGGING_LEVEL",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


def _engine_env(use_gpu: bool) -> dict[str, str]:
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    if not use_gpu:
        for k, v in _CPU_ENV_DEFAULTS.items():
            env.setdefault(k, v)
    return env


def build_llm_config(
    model_path: str,
    model_name: str = "proxykd-student",
    *,
    use_gpu: bool = False,
    num_replicas: int = 1,
    max_model_len: int | None = None,
    engine_kwargs: dict | None = None,
):
    """The `ray.serve.llm.LLMConfig` for one student model (exposed for callers that compose apps)."""
    from ray.serve.llm import LLMConfig

    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    model_source = os.path.abspath(model_path) if os.path.isdir(model_path) else model_path
    kwargs: dict[str, Any] = {}
    if max_model_len is not None:
        kwargs["max_model_len"] = int(max_model_len)
    kwargs.update(copy.deepcopy(engine_kwargs or {}))

    deployment_config: dict[str, Any] = {"num_replicas": num_replicas}
    if use_gpu:
        placement_group_config = None  # Ray Serve LLM's default: one {"GPU": 1, "CPU": 1} bundle per worker
    else:
        # Without a CPU-only bundle Ray Serve LLM asks for a GPU. The engine's bundle holds the CPU
        # the replica runs on, so the replica actor itself claims none: one model replica then needs
        # a single logical CPU (plus one for the ingress) and fits a default 2-CPU `ray.init()`.
        placement_group_config = {"bundles": [{"CPU": 1}]}
        deployment_config["ray_actor_options"] = {"num_cpus": 0}

    return LLMConfig(
        model_loading_config={"model_id": model_name, "model_source": model_source},
        engine_kwargs=kwargs,
        deployment_config=deployment_config,
        placement_group_config=placement_group_config,
        runtime_env={"env_vars": _engine_env(use_gpu)},
    )


def build_app(model_path: str, model_name: str = "proxykd-student", **llm_config_kwargs):
    """An OpenAI-compatible Ray Serve application serving `model_path` under the name `model_name`
    (keyword arguments as for `build_llm_config`)."""
    from ray.serve.llm import build_openai_app

    llm_config = build_llm_config(model_path, model_name, **llm_config_kwargs)
    return build_openai_app({"llm_configs": [llm_config]})


def serve_student(
    model_path: str,
    model_name: str = "proxykd-student",
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = True,
    **kw,
) -> str:
    """Deploy the student on the current (or a new local) Ray cluster and return the base URL
    (`http://host:port/v1`). With `blocking=True`, wait until Ctrl-C, then shut Serve down."""
    from ray import serve

    app = build_app(model_path, model_name, **kw)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="proxykd", route_prefix="/")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/v1"
    print(f"proxykd: serving {model_name!r} from {model_path} at {url}", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("proxykd: shutting down", flush=True)
        finally:
            serve.shutdown()
    return url
