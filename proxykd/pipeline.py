"""The whole run: prompts → teacher → align → logits → distill → eval, each skipped when its
manifest matches the config. Stage hashes chain (each includes its inputs' hashes), so changing a
key reruns exactly the stages downstream of it."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from proxykd import align, artifacts, distill, evaluate, logits, teacher
from proxykd.config import RunConfig, fingerprint
from proxykd.data import build_prompts

log = logging.getLogger("proxykd")

STAGES = ("prompts", "teacher", "align", "logits", "distill", "eval")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=False)
    logging.getLogger("proxykd").setLevel(logging.INFO)


def init_ray(cfg: RunConfig) -> None:
    """Local Ray by default; `ray.address` (or RAY_ADDRESS, set by `ray job submit`) joins a cluster."""
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"])
        return
    # A local cluster: keep vLLM and Ray on loopback.
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")


def run_prompts(cfg: RunConfig) -> tuple[pa.Table, str]:
    folder = artifacts.stage_dir(cfg.run_dir, "prompts")
    h = fingerprint(cfg.data)
    if not artifacts.finished_or_begin(folder, h):
        started = time.time()
        table, rejected = build_prompts(cfg.data)
        artifacts.write_table_atomic(table, folder / "prompts.parquet")
        counts = {v["values"]: v["counts"] for v in pc.value_counts(table["split"]).to_pylist()}
        artifacts.write_manifest(folder, "prompts", h, started, rows={"total": table.num_rows, **counts},
                                 rejected=rejected[:1000], rejected_count=len(rejected))
        log.info("prompts: %d rows %s, %d rejected", table.num_rows, counts, len(rejected))
    return pq.read_table(folder / "prompts.parquet"), h


class StageNotRun(RuntimeError):
    pass


def run(cfg: RunConfig, stages: tuple[str, ...] = STAGES) -> dict:
    """Run `stages` in pipeline order. A stage that is not selected must already be done for this
    config; otherwise the message says which command to run first."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
    last = max(STAGES.index(s) for s in stages)
    manifests: dict[str, dict] = {}

    def need(stage: str, h: str) -> None:
        if stage not in stages and not artifacts.is_done(artifacts.stage_dir(cfg.run_dir, stage), h):
            raise StageNotRun(f"stage '{stage}' has not run for this config: run `proxykd {stage} CONFIG` "
                              "or `proxykd run CONFIG` first")

    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    prompts, prompts_hash = run_prompts(cfg)
    if last == 0:
        return manifests
    init_ray(cfg)

    teacher_hash = teacher.config_hash(cfg.teacher, prompts_hash)
    need("teacher", teacher_hash)
    manifests["teacher"] = teacher.run(cfg.teacher, prompts, prompts_hash, cfg.run_dir)
    if last == 1:
        return manifests
    responses = teacher.responses(artifacts.stage_dir(cfg.run_dir, "teacher"))

    align_hash = align.config_hash(cfg, teacher_hash)
    need("align", align_hash)
    manifests["align"] = align.run(cfg, prompts, responses, teacher_hash)
    proxy_path = manifests["align"]["model"]
    if last == 2:
        return manifests

    logits_hash = logits.config_hash(cfg, align_hash)
    need("logits", logits_hash)
    manifests["logits"] = logits.run(cfg, prompts, responses, proxy_path, align_hash)
    if last == 3:
        return manifests

    distill_hash = distill.config_hash(cfg, logits_hash)
    need("distill", distill_hash)
    manifests["distill"] = distill.run(cfg, proxy_path, logits_hash)
    if last == 4:
        return manifests

    manifests["eval"] = evaluate.run(cfg, prompts, responses, manifests["distill"]["models"], distill_hash)
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
