"""Operate runs on a Ray cluster: `proxykd submit|status|logs|stop`, and what a run folder holds.

- `submit(config, address)` sends a pipeline run (or one stage, or `check`) to a cluster's job
  server with Ray's `JobSubmissionClient`: the runtime env is the repository as `working_dir`
  (Ray leaves out what `.gitignore` excludes, and `.git`, `.venv`, `__pycache__`) and, for a
  config file outside it, the config's text. Never a secret: the teacher key is read by the job's
  driver, which Ray runs on the head node (no entrypoint resources are asked for, so it stays
  there), from the head's own environment (a Kubernetes Secret on the head pod, or exported before
  `ray start --head`); proxykd then hands it to the teacher actors through the object store.
  `submit` refuses environment variables that look like secrets.
- `job_status`, `job_logs`, `stop_job`: the job server's view of a submitted job.
- `run_status(run_dir)`: every stage's state read from its folder (manifest, shards, journals,
  the run lock), strictly read-only: nothing is quarantined, locked or written.

`python -m proxykd.jobs COMMAND CONFIG [--set k=v ...]` is the entrypoint `submit` gives the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import yaml

from proxykd import storage

# The stages in pipeline order (proxykd.pipeline.STAGES, which imports torch; tests check they agree),
# then the report's.
STAGES = ("prompts", "teacher", "align", "logits", "distill", "eval")
EXTRA_STAGES = ("report",)
CONFIG_ENV = "PROXYKD_CONFIG_YAML"  # a submitted config's text, when the file is outside the working dir
ENTRY_MODULE = "proxykd.jobs"
COMMANDS = ("run", "teacher", "align", "logits", "distill", "eval", "report", "check")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """A submission refused before anything reached the cluster; the message says why."""


def repo_root() -> Path:
    """The checkout this package runs from (an editable install): the default working_dir."""
    return Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _explicit_address(address: Optional[str]):
    """Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override an address it is given; an
    address given on the command line should win, so they are hidden while the client starts."""
    names = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
    saved = {n: os.environ.pop(n) for n in names if address and n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # a head on this machine, or one reached through `ray dashboard` / port-forward


def client(address: Optional[str] = None):
    """A JobSubmissionClient for `address` (http://HEAD:8265); None: RAY_API_SERVER_ADDRESS, then
    RAY_ADDRESS, then DEFAULT_ADDRESS (never a guess from /tmp/ray, which may name a dead cluster)."""
    from ray.job_submission import JobSubmissionClient

    if address is None and not (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")):
        address = DEFAULT_ADDRESS
    with _explicit_address(address):
        return JobSubmissionClient(address)


def entrypoint(command: str, config_ref: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    parts = ["python", "-m", ENTRY_MODULE, command, config_ref]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts)


def prepare(config: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *, command: str = "run",
            working_dir: str | os.PathLike | None = None, env: Optional[dict] = None,
            check: bool = True) -> dict:
    """Everything `submit` sends, without sending it: {entrypoint, runtime_env, metadata}.
    Refuses (SubmitError) an unknown command, a config that does not validate here (`check`), a
    relative run_dir (it would land inside the job's temporary copy of the working dir), and env
    entries that look like secrets."""
    from proxykd.config import ConfigError, apply_overrides, load_config

    if command not in COMMANDS:
        raise SubmitError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    config = Path(config)
    if not config.is_file():
        raise SubmitError(f"config file not found: {config}")
    wd = Path(working_dir).resolve() if working_dir is not None else repo_root()
    if not (wd / "proxykd" / "jobs.py").is_file():
        raise SubmitError(f"working dir {wd} is not a proxykd checkout (no proxykd/jobs.py): the job runs "
                          "`python -m proxykd.jobs` from it")
    text = config.read_text()
    try:
        tree = apply_overrides(yaml.safe_load(text) or {}, list(overrides))
    except (ConfigError, yaml.YAMLError) as e:
        raise SubmitError(f"{config}: {e}") from None
    if check:
        # Validated here first: a typo fails now, not after the upload and a cluster-side start.
        # (A model path that exists only on the cluster fails too: pass check=False / --no-check.)
        try:
            load_config(config, list(overrides))
        except ConfigError as e:
            raise SubmitError(f"{e}\n(--no-check submits without validating here)") from None
    run_dir = str(tree.get("run_dir", "runs/default")) if isinstance(tree, dict) else "runs/default"
    if command != "check" and "://" not in run_dir and not os.path.isabs(run_dir):
        raise SubmitError(f"run_dir {run_dir!r} is relative: on the cluster it would point into the job's temporary "
                          "copy of the working dir and be lost. Use a path every node sees, e.g. "
                          "--set run_dir=/mnt/shared/runs/NAME")
    env = dict(env or {})
    key_env = ((tree.get("teacher") or {}).get("api_key_env") if isinstance(tree, dict) else None) or "OPENAI_API_KEY"
    for name in env:
        if name == key_env or SECRET_NAME.search(name):
            raise SubmitError(f"{name}: secrets never go into a job's runtime env (Ray records it in its logs and "
                              "dashboard). The job's driver runs on the head node and reads "
                              f"{key_env} there: a Kubernetes Secret on the head pod, or exported on the head "
                              "before `ray start --head`")
    try:
        ref = config.resolve().relative_to(wd).as_posix()
    except ValueError:  # outside the working dir: its text travels in the runtime env
        ref = f"env:{CONFIG_ENV}"
        env[CONFIG_ENV] = text
    runtime_env = {"working_dir": str(wd)}
    if env:
        runtime_env["env_vars"] = {k: str(v) for k, v in env.items()}
    metadata = {"proxykd_command": command, "proxykd_config": str(config), "proxykd_run_dir": run_dir}
    return {"entrypoint": entrypoint(command, ref, overrides), "runtime_env": runtime_env, "metadata": metadata}


def submit(config: str | os.PathLike, address: Optional[str] = None, overrides: list[str] | tuple[str, ...] = (), *,
           command: str = "run", working_dir: str | os.PathLike | None = None, submission_id: Optional[str] = None,
           env: Optional[dict] = None, check: bool = True, agent_wait_s: float = 60.0) -> str:
    """Submit `proxykd COMMAND CONFIG --set ...` as a Ray job to the cluster at `address`
    (http://HEAD:8265) and return its submission id. The job's driver runs on the head node.
    `agent_wait_s`: how long to retry while a freshly started head's job agent is not up yet."""
    job = prepare(config, overrides, command=command, working_dir=working_dir, env=env, check=check)
    c = client(address)
    deadline = time.time() + agent_wait_s
    while True:
        try:
            return c.submit_job(entrypoint=job["entrypoint"], runtime_env=job["runtime_env"],
                                metadata=job["metadata"], submission_id=submission_id)
        except RuntimeError as e:  # (a head whose job agent is still starting answers this)
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def job_info(job_id: str, address: Optional[str] = None):
    return client(address).get_job_info(job_id)


def wait(job_id: str, address: Optional[str] = None, timeout_s: float = 3600, poll_s: float = 1.0):
    """Block until the job ends and return its details (status SUCCEEDED, FAILED or STOPPED);
    TimeoutError after `timeout_s`."""
    c = client(address)
    deadline = time.time() + timeout_s
    while True:
        info = c.get_job_info(job_id)
        if str(getattr(info.status, "value", info.status)) in TERMINAL:
            return info
        if time.time() > deadline:
            raise TimeoutError(f"job {job_id} still {info.status} after {timeout_s:g} s")
        time.sleep(poll_s)


def _ms(ts: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts / 1000)) if ts else "-"


def format_job(info) -> str:
    status = getattr(info.status, "value", info.status)
    lines = [f"job {info.submission_id or info.job_id}: {status}"]
    if info.message:
        lines.append(f"  message:    {info.message}")
    lines.append(f"  entrypoint: {info.entrypoint}")
    took = ""
    if info.start_time:
        took = f" ({((info.end_time or time.time() * 1000) - info.start_time) / 1000:.0f} s)"
    lines.append(f"  started:    {_ms(info.start_time)}   ended: {_ms(info.end_time)}{took}")
    if info.driver_exit_code is not None:
        lines.append(f"  exit code:  {info.driver_exit_code}")
    run_dir = (info.metadata or {}).get("proxykd_run_dir")
    if run_dir:
        lines.append(f"  run_dir:    {run_dir}")
    return "\n".join(lines)


def job_logs(job_id: str, address: Optional[str] = None, follow: bool = False, out=None) -> Iterator[str] | str:
    """The job's output so far; with `follow`, printed to `out` as it comes until the job ends."""
    c = client(address)
    if not follow:
        return c.get_job_logs(job_id)
    import asyncio

    out = out or sys.stdout

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return ""


def stop_job(job_id: str, address: Optional[str] = None, wait_s: float = 30.0) -> str:
    """Ask the job to stop (SIGTERM to its driver, SIGKILL later) and wait up to `wait_s` for it to
    end; returns its status then. proxykd's run lock and watchdog make a stopped run resumable."""
    c = client(address)
    c.stop_job(job_id)
    deadline = time.time() + wait_s
    while True:
        status = c.get_job_status(job_id)
        status = str(getattr(status, "value", status))
        if status in TERMINAL or time.time() > deadline:
            return status
        time.sleep(1)


# ----------------------------------------------------------------------- a run folder's state


def _manifest(folder: Path) -> Optional[dict]:
    """The manifest, read-only (artifacts.read_manifest would quarantine a damaged one)."""
    try:
        m = json.loads((folder / "manifest.json").read_text())
        return m if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None


def _shards(folder: Path) -> tuple[int, int, int, int]:
    """(readable shard files, their rows, prompt tokens, completion tokens); unreadable ones
    (being written, cut short) are skipped, not quarantined."""
    import pyarrow.parquet as pq

    files = rows = pt = ct = 0
    for path in sorted(folder.glob("*.parquet")):
        if path.name == "rejected.parquet" or path.name.startswith("."):
            continue
        try:
            meta = pq.read_metadata(path)
        except Exception:  # noqa: BLE001 - a shard being written or broken: not counted
            continue
        files += 1
        rows += meta.num_rows
        names = set(meta.schema.names)
        if {"prompt_tokens", "completion_tokens"} <= names:
            try:
                t = pq.read_table(path, columns=["prompt_tokens", "completion_tokens"])
                pt += sum(v or 0 for v in t["prompt_tokens"].to_pylist())
                ct += sum(v or 0 for v in t["completion_tokens"].to_pylist())
            except Exception:  # noqa: BLE001
                pass
    return files, rows, pt, ct


def _journals(folder: Path) -> tuple[int, int, int]:
    """Teacher journal lines not yet folded into shards: (answers ok, prompt tokens, completion tokens)."""
    from proxykd.teacher import journal_rows, row_tokens

    ok = pt = ct = 0
    for path in folder.glob("journal-*.jsonl"):
        try:
            rows = [row for _, row in journal_rows(path) if row is not None]
        except OSError:  # folded away while we read
            continue
        for row in rows:
            p, c = row_tokens(row)
            pt, ct, ok = pt + p, ct + c, ok + (row.get("error") is None)
    return ok, pt, ct


def _lock(run_dir: Path) -> dict:
    from proxykd import runlock

    path = run_dir / runlock.LOCK_NAME
    info = runlock._read(path)
    if info is None:
        return {"held": False}
    stale = runlock._stale_reason(path, info)
    return {"held": stale is None, "stale": stale, "host": info.get("host"), "pid": info.get("pid"),
            "heartbeat_age_s": round(time.time() - float(info.get("heartbeat", 0)), 1) if info else None}


def _rows_text(stage: str, m: dict) -> str:
    rows = m.get("rows")
    if stage == "teacher" and isinstance(rows, dict):
        text = f"ok {rows.get('ok')}/{rows.get('prompts')} prompts"
        extra = [f"{k} {rows[k]}" for k in ("failed", "not_asked", "rejected", "rejected_answers") if rows.get(k)]
        return ", ".join([text, *extra])
    if isinstance(rows, dict):
        first = [k for k in ("total", "scored", "prompts") if k in rows]  # (manifests store keys sorted)
        text = ", ".join(f"{k} {rows[k]}" for k in first + [k for k in rows if k not in first])
    elif stage == "distill":
        text = f"{len(m.get('models') or {})} model(s)"
    else:
        text = "-"
    if m.get("rejected_count"):
        text += f", rejected {m['rejected_count']}"
    return text


def _artifacts(stage: str, folder: Path, m: Optional[dict]) -> list[str]:
    m = m or {}
    if stage == "align" and m.get("model"):
        return [f"proxy: {m['model']}"]
    if stage == "distill" and m.get("models"):
        return [f"{k}: {v}" for k, v in m["models"].items()]
    for name in ("report.md", "results.parquet", "prompts.parquet"):
        if (folder / name).exists():
            return [storage.location(folder / name)]
    return [storage.location(folder)]


def run_status(run_dir: str | os.PathLike, cfg=None) -> dict:
    """What `proxykd status RUN_DIR` prints, as data: {run_dir, lock, stages: [{stage, state, rows,
    seconds, finished_at, cost_usd, tokens, artifacts}]}. state: done (its manifest is there),
    running (work on disk, no manifest, the run lock held), stopped (the same, the lock free or
    stale: rerun to resume), not started. cost_usd: the teacher's spend on everything stored,
    from its manifest; while it runs, from its shards and journals at `cfg`'s prices (None
    without a config). Read-only (a run folder in object storage is read through this machine's
    mirror of it: manifests, shards and journals, not its models or Ray Train's state)."""
    if storage.is_remote(run_dir):
        storage.pull(storage.local_path(run_dir), exclude=("_ray", "logs", "model", "models"))
    run_dir = storage.local_path(run_dir)
    lock = _lock(run_dir)
    stages = []
    names = list(STAGES) + [s for s in EXTRA_STAGES if (run_dir / s).is_dir()]
    for stage in names:
        folder = run_dir / stage
        m = _manifest(folder)
        entry = {"stage": stage, "folder": storage.location(folder), "state": "not started", "rows": "-", "seconds": None,
                 "finished_at": None, "cost_usd": None, "tokens": None, "artifacts": []}
        if m is not None:
            entry.update(state="done", rows=_rows_text(stage, m), seconds=m.get("seconds"),
                         finished_at=m.get("finished_at"), artifacts=_artifacts(stage, folder, m))
            if stage == "teacher":
                entry["cost_usd"] = (m.get("cost") or {}).get("all_stored")
                entry["tokens"] = (m.get("tokens") or {}).get("all_stored")
        elif folder.is_dir():
            entry["state"] = "running" if lock["held"] else "stopped"
            marker = folder / ".config_hash"  # written when the stage (re)started
            if marker.exists():
                entry["seconds"] = round(time.time() - marker.stat().st_mtime, 1)
            files, rows, pt, ct = _shards(folder)
            text = f"{rows} rows in {files} shard(s) so far"
            if stage == "teacher":
                ok, jpt, jct = _journals(folder)
                pt, ct = pt + jpt, ct + jct
                text = f"{rows + ok} answers stored so far"
                entry["tokens"] = pt + ct
                if cfg is not None:
                    entry["cost_usd"] = round(_teacher_cost(cfg.teacher, folder, pt, ct), 6)
            entry.update(rows=text, artifacts=[str(folder)])
        stages.append(entry)
    return {"run_dir": storage.location(run_dir), "lock": lock, "stages": stages}


def _teacher_cost(tcfg, folder: Path, pt: int, ct: int) -> float:
    """Priced as the teacher stage prices what it stored (teacher._spent): tokens of collected
    batches at the batch price, the rest at the online price."""
    from proxykd import teacher, teacher_batch

    bpt, bct = teacher_batch.collected_tokens(folder)
    return teacher.cost(tcfg, max(0, pt - bpt), max(0, ct - bct)) + teacher.batch_cost(tcfg, bpt, bct)


def _duration(s: Optional[float]) -> str:
    if s is None:
        return "-"
    s = float(s)
    return f"{s:.1f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"


def format_run_status(status: dict) -> str:
    lock = status["lock"]
    if lock["held"]:
        held = f"held by pid {lock['pid']} on {lock['host']} (heartbeat {lock['heartbeat_age_s']} s ago)"
    elif lock.get("stale"):
        held = f"stale ({lock['stale']}): a rerun takes it over and resumes"
    else:
        held = "free"
    lines = [f"run folder {status['run_dir']}  (lock: {held})",
             f"{'stage':8s}  {'state':11s}  {'time':>9s}  {'cost':>10s}  rows"]
    for e in status["stages"]:
        cost = "-" if e["cost_usd"] is None else f"${e['cost_usd']:.4f}"
        if e["stage"] == "teacher" and e["tokens"] is not None:
            cost += f" ({e['tokens']:,} tok)"
        when = _duration(e["seconds"]) + (" so far" if e["state"] in ("running", "stopped") else "")
        lines.append(f"{e['stage']:8s}  {e['state']:11s}  {when:>9s}  {cost:>10s}  {e['rows']}")
        for a in e["artifacts"]:
            lines.append(f"{'':8s}  -> {a}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- job entrypoint

SECRETS_FILE_ENV = "PROXYKD_SECRETS_FILE"
DEFAULT_SECRETS_FILE = "~/.proxykd/secrets.env"


def load_secrets_file(path: Optional[str] = None) -> list[str]:
    """On a VM cluster the teacher key lives in a file on the head node only (`ray rsync-up`, which
    copies to the head alone; never `file_mounts`, which reach every node): `NAME=value` lines
    (`#` comments, an `export ` prefix and quotes allowed). The job's driver, which Ray runs on the
    head, loads it into its own environment; no other Ray process sees it. Variables already set
    win. Returns the names loaded (never the values); no file, nothing loaded."""
    file = Path(os.path.expanduser(path or os.environ.get(SECRETS_FILE_ENV) or DEFAULT_SECRETS_FILE))
    if not file.is_file():
        return []
    if file.stat().st_mode & 0o077:
        print(f"proxykd: warning: {file} is readable by other users (chmod 600 it)", file=sys.stderr)
    loaded = []
    for line in file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.removeprefix("export ").split("=", 1)
        name, value = name.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name not in os.environ:
            os.environ[name] = value
            loaded.append(name)
    return loaded



def entry(argv: list[str]) -> int:
    """`python -m proxykd.jobs COMMAND CONFIG [--set k=v ...]` on the cluster (what `submit` sends).
    CONFIG is a path in the working dir or `env:NAME`, a config submitted from outside it whose
    text is in that environment variable. The head's secrets file (`load_secrets_file`) is read
    first. Runs through `proxykd.cli.main`, so the job takes the run folder's lock like any run."""
    import tempfile

    from proxykd.cli import main as cli

    if len(argv) < 2:
        print("usage: python -m proxykd.jobs COMMAND CONFIG [--set k=v ...]", file=sys.stderr)
        return 2
    command, config, rest = argv[0], argv[1], argv[2:]
    if loaded := load_secrets_file():
        print(f"proxykd: loaded {', '.join(loaded)} from the head's secrets file", file=sys.stderr, flush=True)
    if not config.startswith("env:"):
        return cli([command, config, *rest])
    text = os.environ.get(config[4:])
    if text is None:
        print(f"proxykd: {config[4:]} is not set in the job's environment", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="proxykd-job-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        return cli([command, str(path), *rest])


if __name__ == "__main__":
    sys.exit(entry(sys.argv[1:]))
