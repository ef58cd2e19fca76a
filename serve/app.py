"""Ray Serve entry point: `serve run serve/config.yaml` (an application builder with arguments) or
`serve run serve.app:build config=RUN_CONFIG` (Serve passes `key=value` pairs as the arguments).

Arguments (`args:` in a Serve config): `target`, a run config (YAML), a run folder or a model
folder, exactly as for `proxykd serve`; `set`, a list of `KEY=VALUE` overrides (`--set`). The app is
the one `proxykd serve` runs: the run's student (and serve.baseline_name / serve.proxy_name for A/B),
API keys, limits, replicas and autoscaling from the `serve` section. Host and port are the Serve
config's `http_options` here (Serve starts its HTTP proxy before it imports the app).

The older form still works: `serve run serve.app:app` with PROXYKD_MODEL_PATH (a model folder),
PROXYKD_MODEL_NAME and PROXYKD_USE_GPU=1 in the environment.
"""

import os

from proxykd.serving import build_app, build_target_app, resolve_target


def build(args: dict):
    """The Serve application for `args` = {"target": ..., "set": [...], "use_gpu": bool}."""
    args = dict(args or {})
    target_path = args.pop("target", None) or args.pop("config", None) or os.environ.get("PROXYKD_SERVE_TARGET")
    if not target_path:
        raise ValueError("serve.app:build needs `target`: a run config, a run folder or a model folder")
    overrides = args.pop("set", None) or []
    if isinstance(overrides, str):
        overrides = [overrides]
    use_gpu = str(args.pop("use_gpu", os.environ.get("PROXYKD_USE_GPU", "0"))).lower() in ("1", "true", "yes")
    if args:
        raise ValueError(f"serve.app:build: unknown arguments {sorted(args)} (known: target, set, use_gpu)")
    target = resolve_target(target_path, list(overrides))
    target.use_gpu = target.use_gpu or use_gpu
    return build_target_app(target)


def __getattr__(name):  # `serve.app:app`, the environment-variable form, built only when asked for
    if name == "app":
        return build_app(os.environ["PROXYKD_MODEL_PATH"], os.environ.get("PROXYKD_MODEL_NAME", "proxykd-student"),
                         use_gpu=os.environ.get("PROXYKD_USE_GPU") == "1")
    raise AttributeError(name)
