"""The whole run: prompts → teacher → align → logits → distill → eval, each skipped when its
manifest matches the config. Stage hashes chain (each includes its inputs' hashes), so changing a
key reruns exactly the stages downstream of it."""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from proxykd import align, artifacts, console, distill, evaluate, logits, reaper, storage, teacher
from proxykd.config import RunConfig, fingerprint
from proxykd.data import build_prompts
from proxykd.models import check_same_vocab, materialize_model

log = logging.getLogger("proxykd")

STAGES = ("prompts", "teacher", "align", "logits", "distill", "eval")
_watchdog: reaper.Watchdog | None = None  # of the local Ray this process started


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=console.LOG_FORMAT, force=False)
    logging.getLogger("proxykd").setLevel(logging.INFO)


def init_ray(cfg: RunConfig) -> None:
    """Local Ray by default; `ray.address` (or RAY_ADDRESS, set by `ray job submit`) joins a cluster.
    A local Ray is stopped with the driver however it ends: `shutdown_ray` after a normal run (also
    run at exit), the watchdog of proxykd/reaper.py after a `kill -9`."""
    import ray

    global _watchdog
    if ray.is_initialized():
        return
    if joins_cluster(cfg):
        ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"])
        _attach_console()
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
    _attach_console()
    session = ray._private.worker._global_node.get_session_dir_path()
    if _watchdog is not None:
        _watchdog.tell(f"session {session}")
    log.info("ray session: %s (%s=%s)", session, reaper.ENV, token)


def _attach_console() -> None:
    """Under a command's console (proxykd/console.py) the Ray workers' output goes to
    RUN_DIR/logs/workers.log (and, only with --verbose, to the console as well)."""
    if (c := console.current()) is not None:
        c.attach_ray()


def joins_cluster(cfg: RunConfig) -> bool:
    """The run joins a running Ray cluster (`ray.address`, or RAY_ADDRESS as `ray job submit` sets
    it) rather than starting a local Ray."""
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def local_teacher_host(cfg: RunConfig) -> str:
    """Where the local teacher listens: `teacher.local_host`; else, when the run joins a cluster,
    the driver node's address, so caller actors on every node reach it; else loopback."""
    if cfg.teacher.local_host:
        return cfg.teacher.local_host
    if joins_cluster(cfg):
        return teacher.driver_node_address()
    return "127.0.0.1"


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
    root = storage.local_path(cfg.run_dir) / "models"
    proxy = materialize_model(cfg.proxy, root / f"proxy-init-{fingerprint(cfg.proxy, cfg.seed)}", cfg.seed)
    student = materialize_model(cfg.student, root / f"student-init-{fingerprint(cfg.student, cfg.seed)}", cfg.seed + 1)
    check_same_vocab(proxy, student)
    return proxy, student


class Upstream:
    """What the stages hand on, filled in as the loop goes: the prompts and their fingerprints,
    each stage's fingerprint and manifest, and what they stand for (the teacher's answers, the
    initial and the aligned models)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.prompts, self.prompts_hash, self.content_hash = run_prompts(cfg)
        self.hashes: dict[str, str] = {}
        self.manifests: dict[str, dict] = {}

    @functools.cached_property
    def responses(self) -> pa.Table:
        return teacher.answers(self.cfg.teacher, self.prompts, artifacts.stage_dir(self.cfg.run_dir, "teacher"))

    @property
    def answers_hash(self) -> str:
        # Downstream fingerprints follow the answers actually bought (a retry that adds some reruns
        # them) and the splits (which live in the prompts' fingerprint).
        return fingerprint(self.prompts_hash, self.manifests["teacher"]["responses_hash"])

    @functools.cached_property
    def initial_models(self) -> tuple[str, str]:
        return initial_models(self.cfg)

    @property
    def proxy(self) -> str:
        return self.manifests["align"]["model"]


# Each stage after prompts: (its fingerprint: its config slice and its inputs' fingerprints; its run).
STAGE_STEPS = {
    "teacher": (lambda u: teacher.config_hash(u.cfg.teacher, u.content_hash),
                lambda u: teacher.run(u.cfg.teacher, u.prompts, u.content_hash, u.cfg.run_dir, u.cfg.resources.teacher,
                                      local_teacher_host(u.cfg))),
    "align": (lambda u: align.config_hash(u.cfg, u.answers_hash),
              lambda u: align.run(u.cfg, u.prompts, u.responses, u.answers_hash, u.initial_models[0])),
    "logits": (lambda u: logits.config_hash(u.cfg, u.hashes["align"]),
               lambda u: logits.run(u.cfg, u.prompts, u.responses, u.proxy, u.hashes["align"])),
    "distill": (lambda u: distill.config_hash(u.cfg, u.hashes["logits"]),
                lambda u: distill.run(u.cfg, u.proxy, u.initial_models[1], u.hashes["logits"])),
    "eval": (lambda u: evaluate.config_hash(u.cfg, u.hashes["distill"]),
             lambda u: evaluate.run(u.cfg, u.prompts, u.responses, u.manifests["distill"]["models"], u.hashes["distill"])),
}


def run(cfg: RunConfig, stages: tuple[str, ...] = STAGES) -> dict:
    """Run `stages` in pipeline order. A stage that is not selected must already be done for this
    config (its manifest is read); otherwise the message says which command to run first."""
    return run_upstream(cfg, stages).manifests


def run_upstream(cfg: RunConfig, stages: tuple[str, ...] = STAGES) -> Upstream:
    """`run`, returning what the stages handed on (for `proxykd report`, which goes on from there)."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
    last = max(STAGES.index(s) for s in stages)
    run_dir = storage.local_path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A run folder in object storage: what the store holds (finished stages, what a killed run
    # left), in this machine's mirror before any stage looks. Ray Train's state stays in the store.
    storage.pull(run_dir, exclude=("_ray", console.LOG_DIR))
    up = Upstream(cfg)
    if last == 0:
        return up
    init_ray(cfg)
    if last >= STAGES.index("align"):
        up.initial_models  # noqa: B018 - built, fetched and vocabulary-checked before any answer is bought
    for name in STAGES[1:last + 1]:
        fingerprint_of, work = STAGE_STEPS[name]
        up.hashes[name] = fingerprint_of(up)
        folder = artifacts.stage_dir(cfg.run_dir, name)
        if name in stages:
            with console.stage(name) as shown:
                up.manifests[name] = work(up)
                shown.skipped = finished_before(up.manifests[name], shown.started)
        elif artifacts.is_done(folder, up.hashes[name]):
            up.manifests[name] = artifacts.read_manifest(folder)
        else:
            raise StageNotRun(f"stage '{name}' has not run for this config: run `proxykd {name} CONFIG` "
                              "or `proxykd run CONFIG` first")
    return up


def finished_before(manifest: dict, t: float) -> bool:
    """The manifest was written before `t` (the stage was done already and skipped)."""
    import calendar

    try:
        return calendar.timegm(time.strptime(manifest["finished_at"], "%Y-%m-%dT%H:%M:%SZ")) < int(t)
    except (KeyError, TypeError, ValueError):
        return False


def summary(cfg: RunConfig, manifests: dict) -> str:
    run_dir = storage.local_path(cfg.run_dir)
    lines = [f"proxykd run finished: {cfg.run_dir if storage.is_remote(cfg.run_dir) else run_dir}"]
    for stage in STAGES:
        folder = run_dir / stage
        if (folder / "manifest.json").exists():
            lines.append(f"  {stage:8s} {storage.location(folder)}")
    if "distill" in manifests:
        for name, path in manifests["distill"]["models"].items():
            lines.append(f"  student ({name}): {path}")
    if (run_dir / console.LOG_DIR).is_dir():
        lines.append(f"  logs     {run_dir / console.LOG_DIR}")
    if "eval" in manifests:
        lines += ["", manifests["eval"]["table"], "", f"report: {run_dir / 'eval' / 'report.md'}"]
    return "\n".join(lines)
