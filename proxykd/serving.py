"""Serve what a run produced over an OpenAI-compatible HTTP API (Ray Serve LLM + vLLM).

    proxykd serve CONFIG_OR_RUN_DIR         # the run's Proxy-KD student (+ baseline / proxy for A/B)
    proxykd serve RUN_DIR/distill/model     # any Hugging Face folder

One app: an ingress deployment (`proxykd.serve_ingress.ProxyKDIngress`: API keys, request limits,
OpenAI-shaped errors) in front of one Ray Serve LLM `LLMServer` deployment per served model (one
vLLM engine per replica; fixed replicas or autoscaling). Routes: `/v1/models`, `/v1/models/{id}`,
`/v1/completions`, `/v1/chat/completions`. Everything comes from the `serve` section of the run
config (`ServeConfig`); the same app runs from `serve run serve/config.yaml` and the RayService.

What a run folder serves: `distill/manifest.json` `models.proxykd` (the Proxy-KD student) as
`serve.model_name`; `models.baseline` (the α = 0 black-box-KD student, `distill/baseline/model`)
as `serve.baseline_name`; `align/manifest.json` `model` (the aligned proxy) as `serve.proxy_name`.

    from proxykd.serving import serve_student
    serve_student("runs/x/distill/model", "proxykd-student", port=8000)   # blocks until Ctrl-C
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from proxykd import storage

log = logging.getLogger("proxykd")

# vLLM CPU settings forwarded to the engine when the caller has not set them.
# KV cache in GiB: 1 GiB is plenty for small students; raise VLLM_CPU_KVCACHE_SPACE for long contexts.
_CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# Forwarded from the driver's environment when set (e.g. VLLM_HOST_IP=127.0.0.1 on a laptop).
# API keys are never forwarded: the ingress reads them from its own environment.
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
APP_NAME = "proxykd"


class ServeError(ValueError):
    """What to serve cannot be resolved (no such folder, a stage not run); the message says why."""


def _engine_env(use_gpu: bool) -> dict[str, str]:
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    if not use_gpu:
        for k, v in _CPU_ENV_DEFAULTS.items():
            env.setdefault(k, v)
    return env


def context_length(model_path: str) -> Optional[int]:
    """The model's own context length from its config.json (None when it does not say)."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def build_llm_config(
    model_path: str,
    model_name: str = "proxykd-student",
    *,
    use_gpu: bool = False,
    num_replicas: int = 1,
    autoscaling: Optional[dict] = None,
    max_ongoing_requests: Optional[int] = None,
    max_model_len: Optional[int] = None,
    engine_kwargs: Optional[dict] = None,
    warmup: bool = True,
):
    """The `ray.serve.llm.LLMConfig` for one model (exposed for callers that compose apps).
    `autoscaling` (Ray Serve's autoscaling_config: min_replicas, max_replicas,
    target_ongoing_requests, upscale_delay_s, downscale_delay_s) replaces the fixed `num_replicas`."""
    from ray.serve.llm import LLMConfig

    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    model_source = os.path.abspath(model_path) if os.path.isdir(model_path) else model_path
    kwargs: dict[str, Any] = {}
    if max_model_len is not None:
        kwargs["max_model_len"] = int(max_model_len)
    if not use_gpu:
        # No graph compilation on CPU: it adds ~20 s to every replica start and, done lazily, made
        # the first requests after readiness slow; eager mode serves small models as fast.
        kwargs["enforce_eager"] = True
    kwargs.update(copy.deepcopy(engine_kwargs or {}))

    deployment_config: dict[str, Any] = {}
    if autoscaling:
        deployment_config["autoscaling_config"] = dict(autoscaling)
    else:
        deployment_config["num_replicas"] = num_replicas
    if max_ongoing_requests is not None:
        deployment_config["max_ongoing_requests"] = int(max_ongoing_requests)
    # A stopping replica waits this long for its requests before it is killed (Serve's default, 20 s,
    # made every scale-down and shutdown wait).
    deployment_config["graceful_shutdown_timeout_s"] = 5
    if use_gpu:
        placement_group_config = None  # Ray Serve LLM's default: one {"GPU": 1, "CPU": 1} bundle per worker
    else:
        # Without a CPU-only bundle Ray Serve LLM asks for a GPU. The engine's bundle holds the CPU
        # the replica runs on, so the replica actor itself claims none: one model replica then needs
        # a single logical CPU.
        placement_group_config = {"bundles": [{"CPU": 1}]}
        deployment_config["ray_actor_options"] = {"num_cpus": 0}

    from proxykd.serve_ingress import WarmLLMServer

    return LLMConfig(
        model_loading_config={"model_id": model_name, "model_source": model_source},
        engine_kwargs=kwargs,
        deployment_config=deployment_config,
        placement_group_config=placement_group_config,
        runtime_env={"env_vars": _engine_env(use_gpu)},
        server_cls=WarmLLMServer,
        experimental_configs={"proxykd_warmup": bool(warmup)},
    )


def _serve_config(serve_cfg=None, **overrides):
    from proxykd.config import ServeConfig

    base = serve_cfg.model_dump() if serve_cfg is not None else {}
    return ServeConfig.model_validate({**base, **{k: v for k, v in overrides.items() if v is not None}})


def build_models_app(models: dict[str, str], serve_cfg=None, *, use_gpu: bool = False,
                     engine_kwargs: Optional[dict] = None):
    """The Serve application for `models` ({name clients send: Hugging Face folder}) with the
    replicas, limits and API keys of `serve_cfg` (a ServeConfig; defaults when None)."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import build_llm_deployment

    from proxykd.serve_ingress import Limits, ProxyKDIngress

    s = _serve_config(serve_cfg)
    if not models:
        raise ServeError("nothing to serve")
    autoscaling = s.autoscaling.model_dump() if s.autoscaling is not None else None
    configs = {name: build_llm_config(path, name, use_gpu=use_gpu, num_replicas=s.num_replicas, autoscaling=autoscaling,
                                      max_ongoing_requests=s.max_ongoing_requests, max_model_len=s.max_model_len,
                                      engine_kwargs=engine_kwargs, warmup=s.warmup)
               for name, path in models.items()}
    contexts = {}
    for name, path in models.items():
        own = context_length(path)
        contexts[name] = min(x for x in (s.max_model_len, own) if x) if (s.max_model_len or own) else None
    limits = Limits.from_config(s, {k: v for k, v in contexts.items() if v})
    deployments = {name: build_llm_deployment(c) for name, c in configs.items()}
    cards = {name: to_model_metadata(name, c) for name, c in configs.items()}
    ingress = serve.deployment(
        serve.ingress()(ProxyKDIngress),
        name="ProxyKDIngress",
        num_replicas=1,
        # The ingress only forwards: it must never be what queues requests (the model replicas'
        # max_ongoing_requests is the limit), and it needs no CPU of its own.
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0, **({"resources": dict(s.ingress_resources)} if s.ingress_resources else {})},
        graceful_shutdown_timeout_s=5,
    )
    return ingress.bind(llm_deployments=deployments, model_cards=cards, limits=dataclasses.asdict(limits),
                        api_key_env=s.api_key_env)


def build_app(model_path: str, model_name: str = "proxykd-student", *, use_gpu: bool = False, num_replicas: int = 1,
              max_model_len: Optional[int] = None, engine_kwargs: Optional[dict] = None, serve_cfg=None):
    """One model folder served as `model_name` (the `proxykd serve MODEL_DIR` form)."""
    s = _serve_config(serve_cfg, model_name=model_name, num_replicas=num_replicas if serve_cfg is None else None,
                      max_model_len=max_model_len)
    return build_models_app({s.model_name: model_path}, s, use_gpu=use_gpu, engine_kwargs=engine_kwargs)


# ------------------------------------------------------------------ what a target serves ----

@dataclass
class Target:
    """What `proxykd serve TARGET` serves: the models by name, the serve section, Ray and engine settings."""

    models: dict[str, str]
    serve: Any  # ServeConfig
    ray: Any  # RayConfig
    use_gpu: bool = False
    kv_cache_gb: Optional[int] = None
    source: str = ""
    notes: list[str] = field(default_factory=list)


def run_models(run_dir: str | Path, serve_cfg) -> tuple[dict[str, str], list[str]]:
    """{name: model folder} of a finished run (see the module docstring), and notes on what is not served.
    A run folder in object storage: its manifests are read from the store, and the models served
    are downloaded to this machine's mirror of it."""
    remote = storage.is_remote(run_dir)
    run_dir = storage.local_path(run_dir)
    if remote:
        for stage in ("distill", "align"):
            storage.pull(run_dir / stage, exclude=("_ray", "model"))
    notes = []
    distill = _manifest(run_dir / "distill")
    if distill is None or "proxykd" not in (distill.get("models") or {}):
        raise ServeError(f"{run_dir}: no distilled student (distill/manifest.json): run `proxykd distill CONFIG` "
                         "(or `proxykd run CONFIG`) first, or serve a model folder")
    models = {serve_cfg.model_name: distill["models"]["proxykd"]}
    if serve_cfg.baseline_name:
        baseline = (distill.get("models") or {}).get("baseline")
        if baseline is None:
            raise ServeError(f"{run_dir}: serve.baseline_name is set but the run trained no α = 0 baseline "
                             "(distill.baseline false, or distill.alpha = 0, when the student is the baseline)")
        models[serve_cfg.baseline_name] = baseline
    if serve_cfg.proxy_name:
        align = _manifest(run_dir / "align")
        if align is None or not align.get("model"):
            raise ServeError(f"{run_dir}: serve.proxy_name is set but the align stage has not run")
        models[serve_cfg.proxy_name] = align["model"]
    models = {name: storage.fetch(path) for name, path in models.items()}
    for name, path in models.items():
        if not (Path(path) / "config.json").is_file():
            raise ServeError(f"{name}: {path} is not a model folder (no config.json)")
    return models, notes


def _manifest(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def resolve_target(target: str, overrides: Optional[list[str]] = None, **serve_overrides) -> Target:
    """A run config (YAML file), a run folder (a path, or `s3://`/`gs://` for one in object storage)
    or a model folder, with `--set` overrides (a run config's keys; for folders only `serve.*`) and
    command-line serve keys (None: not given)."""
    from proxykd.config import ConfigError, RayConfig, ServeConfig, apply_overrides, load_config

    path, remote = Path(target), storage.is_remote(target)
    if not remote and path.is_file():
        cfg = load_config(path, overrides)
        s = _serve_config(cfg.serve, **serve_overrides)
        models, notes = run_models(cfg.run_dir, s)
        return Target(models, s, cfg.ray, cfg.resources.use_gpu, cfg.resources.vllm_kv_cache_gb,
                      f"run {cfg.run_dir if storage.is_remote(cfg.run_dir) else Path(cfg.run_dir).resolve()}", notes)
    if not remote and not path.is_dir():
        raise ServeError(f"{target}: no such config file, run folder or model folder")
    tree = apply_overrides({}, overrides or [])
    if set(tree) - {"serve"}:
        raise ConfigError(f"--set {sorted(set(tree) - {'serve'})}: only serve.* keys apply without a run config")
    try:
        s = _serve_config(ServeConfig.model_validate(tree.get("serve", {})), **serve_overrides)
    except ValueError as e:
        raise ConfigError(f"invalid serve settings: {e}") from None
    if not remote and (path / "config.json").is_file():
        return Target({s.model_name: str(path.resolve())}, s, RayConfig(), source=f"model {path.resolve()}")
    models, notes = run_models(target if remote else path, s)
    return Target(models, s, RayConfig(), source=f"run {target if remote else path.resolve()}", notes=notes)


def build_target_app(target: Target):
    return build_models_app(target.models, target.serve, use_gpu=target.use_gpu)


# ------------------------------------------------------------------ the command ----

class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def _wait_ready(base_url: str, models: list[str], api_key: Optional[str], timeout_s: float = 60.0) -> None:
    """GET /v1/models, then one short completion per model, through the HTTP front: what a client
    will do first must already answer at normal speed when readiness is announced."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    deadline = time.monotonic() + timeout_s
    last = None
    requests = [("GET", "/models", None)] + [
        ("POST", "/completions", {"model": m, "prompt": "Hello", "max_tokens": 2, "temperature": 0}) for m in models]
    for method, route, body in requests:
        while True:
            try:
                req = urllib.request.Request(base_url + route, method=method, headers=headers,
                                             data=json.dumps(body).encode() if body is not None else None)
                with urllib.request.urlopen(req, timeout=30) as r:
                    r.read()
                break
            except urllib.error.HTTPError as e:
                if e.code != 404 and e.code < 500:  # a 4xx other than "no route yet": the request is wrong
                    raise RuntimeError(f"{method} {route} answered {e.code}: {e.read()[:500]!r}") from None
                last = e
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer {method} {route} within {timeout_s:.0f} s: {last}")
                time.sleep(0.5)
            except OSError as e:  # the HTTP proxy may take a moment to route to a new app
                last = e
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer {method} {route} within {timeout_s:.0f} s: {last}")
                time.sleep(0.5)


def serve_target(target: Target, blocking: bool = True) -> str:
    """Start a local Ray (or join `ray.address`), deploy the target and return the base URL. With
    `blocking`, serve until Ctrl-C or SIGTERM, then stop everything this command started (the
    local Ray's processes included) within seconds."""
    from types import SimpleNamespace

    from proxykd import pipeline, reaper

    s = target.serve
    if target.kv_cache_gb and not target.use_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(target.kv_cache_gb))
    from proxykd.serve_ingress import load_keys

    keys = load_keys(s.api_key_env)  # fail before anything starts when the variable is missing
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if blocking else {}
    if blocking and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_stop)
        signal.signal(signal.SIGINT, _raise_stop)
    started = time.monotonic()
    try:
        pipeline.init_ray(SimpleNamespace(ray=target.ray))
        if blocking and threading.current_thread() is threading.main_thread():
            # again: ray.init installs its own SIGTERM handler in the driver (it aborts the process)
            signal.signal(signal.SIGTERM, _raise_stop)
            signal.signal(signal.SIGINT, _raise_stop)
        from ray import serve

        serve.start(http_options={"host": s.host, "port": s.port})
        serve.run(build_target_app(target), name=APP_NAME, route_prefix="/")
        shown = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
        url = f"http://{shown}:{s.port}/v1"
        _wait_ready(url, list(target.models), keys[0].decode() if keys else None)
        auth = f"API keys from ${s.api_key_env}" if s.api_key_env else "no API keys (serve.api_key_env unset)"
        for name, path in target.models.items():
            print(f"proxykd: model {name!r}: {path}", flush=True)
        print(f"proxykd: ready at {url} ({auth}; started in {time.monotonic() - started:.0f} s); "
              "Ctrl-C stops it", flush=True)
        if not blocking:
            return url
        while True:
            time.sleep(3600)
    except (_Stop, KeyboardInterrupt) as e:
        print(f"proxykd: stopping ({e or 'SIGINT'})", flush=True)
        return ""
    except BaseException:
        blocking = True  # a failed start leaves nothing running either
        raise
    finally:
        if blocking:
            t0 = time.monotonic()
            stop_local(pipeline, reaper)
            print(f"proxykd: stopped in {time.monotonic() - t0:.1f} s", flush=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def stop_local(pipeline=None, reaper=None) -> None:
    """Stop a Ray this process started: ray.shutdown, then every process still carrying its mark
    (agents, replicas, vLLM engine cores) is stopped right away (SIGTERM, then SIGKILL), then the
    watchdog is told. A joined cluster is only disconnected from."""
    import ray

    if pipeline is None:
        from proxykd import pipeline, reaper
    # Ignore further Ctrl-C while stopping: a second one must not leave the stop half done.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ray.is_initialized():
        ray.shutdown()
    watchdog = getattr(pipeline, "_watchdog", None)
    if watchdog is not None:
        reaper.stop(watchdog.token, wait_s=2.0, grace_s=2.0)
    pipeline.shutdown_ray()


def serve_student(model_path: str, model_name: str = "proxykd-student", host: str = "127.0.0.1", port: int = 8000,
                  blocking: bool = True, use_gpu: bool = False, **serve_keys) -> str:
    """Serve one model folder (defaults for everything not given); see `serve_target`."""
    from proxykd.config import RayConfig

    s = _serve_config(None, model_name=model_name, host=host, port=port, **serve_keys)
    return serve_target(Target({s.model_name: model_path}, s, RayConfig(), use_gpu, source=f"model {model_path}"),
                        blocking=blocking)
