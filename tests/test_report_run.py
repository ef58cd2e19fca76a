"""`proxykd report` end to end on tiny models: the machinery (every arm on the same rows and
steps, hyperparameters picked on dev only, the same eval items for every arm, the statistics,
the plots, resume). The real-model figures come from `configs/report.yaml` (README, "Figures")."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from proxykd import artifacts, report, storage, training
from proxykd.artifacts import read_shards
from proxykd.config import parse_config


@pytest.fixture(scope="module")
def done(pipeline_run, local_ray):
    """The report on from the session's pipeline run (conftest.pipeline_run: two tasks, a dev split
    by question, one DPO round): its stages up to logits are done for this config, so the report
    adds the unaligned proxy's logits, the arms and their evals."""
    cfg = parse_config(pipeline_run["tree"])
    upstream = {s: json.loads((storage.local_path(cfg.run_dir) / s / "manifest.json").read_text())["finished_at"]
                for s in ("prompts", "teacher", "align", "logits")}
    manifest = report.run(cfg)
    return cfg, manifest, storage.local_path(cfg.run_dir) / "report", upstream


def test_the_report_goes_on_from_the_runs_stages_without_redoing_them(done):
    cfg, manifest, folder, upstream = done
    assert {s: json.loads((storage.local_path(cfg.run_dir) / s / "manifest.json").read_text())["finished_at"]
            for s in upstream} == upstream
    assert (storage.local_path(cfg.run_dir) / "unaligned" / "logits" / "manifest.json").exists()  # the report's own


def test_every_arm_is_reported_on_the_same_eval_items(done):
    cfg, manifest, folder, _ = done
    rep = json.loads((folder / "report.json").read_text())
    arms = set(rep["arms"])
    assert set(report.ARMS) | set(report.REFERENCES) <= arms
    ids = {k: set(pq.read_table(folder / "results" / "eval" / f"{k}.parquet")["id"].to_pylist()) for k in arms}
    assert len({frozenset(v) for v in ids.values()}) == 1 and rep["data"]["eval_items"] == len(ids["proxykd"])
    for key, a in rep["arms"].items():
        assert 0 <= a["lo"] <= a["accuracy"] <= a["hi"] <= 1 and a["n"] == rep["data"]["eval_items"]
    assert rep["arms"]["teacher"]["accuracy"] == 1.0  # the local teacher answers from the references
    assert set(rep["differences"]) == {"proxykd − blackbox-kd", "proxykd − proxykd-unaligned",
                                       "proxykd − proxykd-unweighted"}
    for name in rep["differences"]:
        d = rep["differences"][name]
        assert d["lo"] <= d["diff"] <= d["hi"] and d["items"] == rep["data"]["eval_items"]
    assert "always right" in rep["teacher"]["note"]
    md = (folder / "report.md").read_text()
    assert "e. Proxy-KD (full)" in md and "Paired differences" in md
    for png in ("accuracy.png", "curves.png"):
        assert (folder / png).stat().st_size > 1000


def test_arms_train_on_the_same_rows_steps_and_batches(done):
    cfg, _, folder, _ = done
    rep = json.loads((folder / "report.json").read_text())
    seed0 = [k for k in report.ARMS if k != "student-untrained"]
    batches = {k: [r["batch"] for r in training.read_metrics(Path(rep["arms"][k]["dir"]))] for k in seed0}
    assert len({tuple(b) for b in batches.values()}) == 1 and batches["proxykd"]  # same rows, order, steps
    assert {rep["arms"][k]["lr"] for k in seed0} == {rep["hyperparameters"]["chosen"]["blackbox-kd"]["lr"]}
    for arm in ("proxykd", "proxykd-unaligned", "proxykd-unweighted"):
        assert all("kl" in r for r in training.read_metrics(Path(rep["arms"][arm]["dir"])))
    assert not any("kl" in r for r in training.read_metrics(Path(rep["arms"]["blackbox-kd"]["dir"])))


def test_hyperparameters_are_picked_on_dev_items_that_are_not_eval_items(done):
    cfg, _, folder, _ = done
    rep = json.loads((folder / "report.json").read_text())
    dev = [c for c in rep["hyperparameters"]["dev"] if c["arm"] == "blackbox-kd"]
    assert sorted(c["lr"] for c in dev) == [1e-3, 3e-3]
    assert rep["hyperparameters"]["chosen"]["blackbox-kd"]["lr"] == report.pick_best(dev)["lr"]
    prompts = pq.read_table(storage.local_path(cfg.run_dir) / "prompts" / "prompts.parquet")
    dev_ids = set(pq.read_table(next((folder / "results" / "dev").glob("*.parquet")))["id"].to_pylist())
    eval_ids = set(pq.read_table(folder / "results" / "eval" / "proxykd.parquet")["id"].to_pylist())
    assert dev_ids and not dev_ids & eval_ids
    text = lambda ids: {json.dumps(m) for m in prompts.filter(pc.is_in(prompts["id"], pa.array(sorted(ids))))["messages"].to_pylist()}  # noqa: E731
    assert not text(dev_ids) & text(eval_ids)  # disjoint by content too (split_by: question)
    train_ids = set(read_shards(storage.local_path(cfg.run_dir) / "logits", ["id"])["id"].to_pylist())
    assert not train_ids & (eval_ids | dev_ids)


def test_a_rerun_is_skipped_and_a_killed_report_redoes_only_what_is_missing(done):
    cfg, manifest, folder, _ = done
    assert report.run(cfg)["finished_at"] == manifest["finished_at"]  # done: nothing rerun
    kept = folder / "results" / "eval" / "blackbox-kd.parquet"
    lost = folder / "results" / "eval" / "proxykd.parquet"
    before = kept.stat().st_mtime_ns, (folder / "arms").stat().st_mtime_ns
    # as a kill before the end leaves it: neither here nor in the store (the run folder is in S3)
    artifacts.remove(lost)
    artifacts.remove(folder / "manifest.json")
    again = report.run(cfg)
    assert lost.exists() and kept.stat().st_mtime_ns == before[0]
    assert again["table"] == manifest["table"]  # greedy generation of the same model: the same scores
