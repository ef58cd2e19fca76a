"""The whole run: prompts → teacher → align → logits → distill → eval, each skipped when its
manifest matches the config. Stage hashes chain (each includes its inputs' hashes), so changing a
key reruns exactly the stages downstream of it."""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from proxykd import align, artifacts, distill, evaluate, logits, reaper, teacher
from proxykd.config import RunConfig, fingerprint
from proxykd.data import build_prompts
from proxykd.models import check_same_vocab, materialize_model

log = logging.getLogger("proxykd")

STAGES = ("prompts", "teacher", "align", "logits", "distill", "eval")
_watchdog: reaper.Watchdog | None = None  # of the local Ray this process started


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=False)
    logging.getLogger("proxykd").setLevel(logging.INFO)


def init_ray(cfg: RunConfig) -> None:
    """Local Ray by default; `ray.address` (or RAY_ADDRESS, set by `ray job submit`) joins a cluster.
    A local Ray is stopped with the driver however it ends: `shutdown_ray` after a normal run (also
    run at exit), the watchdog of proxykd/reaper.py after a `kill -9`."""
    import ray

    global _watchdog
    if ray.is_initialized():
        return
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"])
        return
    # A local cluster: keep vLLM and Ray on loopback.
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if _watchdog is not None:  # an earlier local Ray of this process, shut down without shutdown_ray
        shutdown_ray()
    # Mark every process of this Ray (see proxykd/reaper.py): the daemons take the mark from this
    # environment, the workers and whatever they spawn from the raylet's. Only while Ray starts:
    # what this process starts later is not part of the run.
    token = reaper.new_token() if os.path.isdir("/proc") else None
    if token:
        _watchdog = reaper.Watchdog(token)  # first: a kill during ray.init leaves nothing behind either
        atexit.unregister(shutdown_ray)
        atexit.register(shutdown_ray)  # drivers that do not call it (Ray's own atexit shutdown runs first)
    previous = os.environ.pop(reaper.ENV, None)
    if token:
        os.environ[reaper.ENV] = token
    try:
        # address="local": never join a `ray start` cluster that happens to run on this machine.
        # kill_child_processes_on_worker_exit off: by default a Ray worker SIGKILLs its children
        # as it exits and only then runs Python's teardown. For a vLLM actor that kills the engine
        # before vLLM can stop it (its shared memory stays in /dev/shm) and kills multiprocessing's
        # resource tracker, which the teardown then restarts; the new tracker is told to forget
        # segments it never saw and prints `KeyError: '/psm_...'` tracebacks (forwarded to this
        # console by log_to_driver). With it off vLLM's own shutdown stops the engine; whatever
        # still runs when the run ends is stopped by shutdown_ray.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _system_config={"kill_child_processes_on_worker_exit": False})
    finally:
        if previous is None:
            os.environ.pop(reaper.ENV, None)
        else:
            os.environ[reaper.ENV] = previous
    session = ray._private.worker._global_node.get_session_dir_path()
    if _watchdog is not None:
        _watchdog.tell(f"session {session}")
    log.info("ray session: %s (%s=%s)", session, reaper.ENV, token)


def shutdown_ray() -> None:
    """Shut a local Ray down and wait until none of its processes is left: a worker may still be
    stopping its vLLM engine after the raylet is gone (a few seconds); what is still there after
    that is stopped. Then the watchdog is told the run ended cleanly."""
    global _watchdog
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if _watchdog is None:
        return
    watchdog, _watchdog = _watchdog, None
    stopped = reaper.stop(watchdog.token, wait_s=20)
    if stopped:
        log.warning("stopped %d process(es) of the local Ray still running 20 s after shutdown", stopped)
    watchdog.done()


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_prompts(cfg: RunConfig) -> tuple[pa.Table, str, str]:
    """Returns (prompts, hash of the prompts stage, hash of the prompt texts alone). The teacher
    depends only on the texts: re-splitting never re-buys its answers."""
    folder = artifacts.stage_dir(cfg.run_dir, "prompts")
    source = _file_digest(cfg.data.path) if cfg.data.source == "file" else None
    h = fingerprint(cfg.data, source)
    if not artifacts.finished_or_begin(folder, h):
        started = time.time()
        table, rejected = build_prompts(cfg.data)
        artifacts.write_table_atomic(table, folder / "prompts.parquet")
        counts = {v["values"]: v["counts"] for v in pc.value_counts(table["split"]).to_pylist()}
        content = fingerprint(table.select(["id", "messages"]).to_pylist())
        artifacts.write_manifest(folder, "prompts", h, started,
                                 inputs={"source": cfg.data.source, "path": cfg.data.path, "file_sha256": source},
                                 rows={"total": table.num_rows, **counts}, content_hash=content,
                                 **artifacts.write_rejected(folder, rejected))
        log.info("prompts: %d rows %s, %d rejected", table.num_rows, counts, len(rejected))
    manifest = artifacts.read_manifest(folder)
    return pq.read_table(folder / "prompts.parquet"), h, manifest["content_hash"]


class StageNotRun(RuntimeError):
    pass


def initial_models(cfg: RunConfig) -> tuple[str, str]:
    """Proxy and student before any training (tiny ones are built once per spec), and the
    vocabulary check DESIGN.md asks for at start, before any GPU time is spent."""
    root = Path(cfg.run_dir).resolve() / "models"
    proxy = materialize_model(cfg.proxy, root / f"proxy-init-{fingerprint(cfg.proxy, cfg.seed)}", cfg.seed)
    student = materialize_model(cfg.student, root / f"student-init-{fingerprint(cfg.student, cfg.seed)}", cfg.seed + 1)
    check_same_vocab(proxy, student)
    return proxy, student


def run(cfg: RunConfig, stages: tuple[str, ...] = STAGES) -> dict:
    """Run `stages` in pipeline order. A stage that is not selected must already be done for this
    config (its manifest is read); otherwise the message says which command to run first."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
    last = max(STAGES.index(s) for s in stages)
    manifests: dict[str, dict] = {}

    def stage(name: str, h: str, work):
        folder = artifacts.stage_dir(cfg.run_dir, name)
        if name in stages:
            manifests[name] = work()
        elif artifacts.is_done(folder, h):
            manifests[name] = artifacts.read_manifest(folder)
        else:
            raise StageNotRun(f"stage '{name}' has not run for this config: run `proxykd {name} CONFIG` "
                              "or `proxykd run CONFIG` first")
        return manifests[name]

    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    prompts, prompts_hash, content_hash = run_prompts(cfg)
    if last == 0:
        return manifests
    init_ray(cfg)

    teacher_hash = teacher.config_hash(cfg.teacher, content_hash)
    stage("teacher", teacher_hash, lambda: teacher.run(cfg.teacher, prompts, content_hash, cfg.run_dir))
    if last == 1:
        return manifests
    teacher_folder = artifacts.stage_dir(cfg.run_dir, "teacher")
    responses = teacher.answers(cfg.teacher, prompts, teacher_folder)
    # Downstream hashes follow the responses actually bought (a retry that adds some reruns them)
    # and the splits (which live in the prompts hash).
    answers_hash = fingerprint(prompts_hash, manifests["teacher"]["responses_hash"])
    proxy_init, student_init = initial_models(cfg)

    align_hash = align.config_hash(cfg, answers_hash)
    stage("align", align_hash, lambda: align.run(cfg, prompts, responses, answers_hash, proxy_init))
    proxy_path = manifests["align"]["model"]
    if last == 2:
        return manifests

    logits_hash = logits.config_hash(cfg, align_hash)
    stage("logits", logits_hash, lambda: logits.run(cfg, prompts, responses, proxy_path, align_hash))
    if last == 3:
        return manifests

    distill_hash = distill.config_hash(cfg, logits_hash)
    stage("distill", distill_hash, lambda: distill.run(cfg, proxy_path, student_init, logits_hash))
    if last == 4:
        return manifests

    stage("eval", evaluate.config_hash(cfg, distill_hash),
          lambda: evaluate.run(cfg, prompts, responses, manifests["distill"]["models"], distill_hash))
    return manifests


def summary(cfg: RunConfig, manifests: dict) -> str:
    run_dir = Path(cfg.run_dir).resolve()
    lines = [f"proxykd run finished: {run_dir}"]
    for stage in STAGES:
        folder = run_dir / stage
        if (folder / "manifest.json").exists():
            lines.append(f"  {stage:8s} {folder}")
    if "distill" in manifests:
        for name, path in manifests["distill"]["models"].items():
            lines.append(f"  student ({name}): {path}")
    if "eval" in manifests:
        lines += ["", manifests["eval"]["table"], "", f"report: {run_dir / 'eval' / 'report.md'}"]
    return "\n".join(lines)
