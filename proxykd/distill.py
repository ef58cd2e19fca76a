"""Stage 4, distill: train the student on D_s with L = NLL + α · w · KL(π_proxy ‖ p_student) over
the proxy's top-k support (Ray Train, the shared loop in `training.py`; `distill.divergence` and
`distill.tail` pick the divergence and what happens to the mass outside the top-k). With `distill.baseline`
the same student is also trained with α = 0 (black-box KD: plain SFT on the teacher's text), the
comparison every report shows.

The students train on the logits shards read in place (`training.ParquetRows`): a table larger than
memory or Ray's object store trains in bounded memory, in the same order as from memory.

Layout: `distill/model` (Proxy-KD student), `distill/baseline/model`, each with metrics.jsonl and
loss.png beside it.
"""

from __future__ import annotations

import logging
import time

from proxykd import artifacts, storage, training
from proxykd.config import RunConfig, fingerprint
from proxykd.models import check_same_vocab

log = logging.getLogger("proxykd")


def config_hash(cfg: RunConfig, logits_hash: str) -> str:
    return fingerprint(logits_hash, cfg.student, cfg.distill, cfg.seed)


def run(cfg: RunConfig, proxy_path: str, student: str, logits_hash: str) -> dict:
    folder = artifacts.stage_dir(cfg.run_dir, "distill")
    h = config_hash(cfg, logits_hash)
    if done := artifacts.finished_or_begin(folder, h):
        return done
    started = time.time()
    check_same_vocab(proxy_path, student)  # the aligned proxy's tokenizer, as saved by align

    # Read in place: the index (ids, lengths, places) is built once for both students, and each
    # training worker reads only its own micro-batches' rows from the shards.
    rows = training.ParquetRows.from_folder(artifacts.stage_dir(cfg.run_dir, "logits"))
    d = cfg.distill
    runs = {"proxykd": (folder, "kd" if d.alpha > 0 else "sft")}
    if d.baseline and d.alpha > 0:  # with alpha = 0 the student *is* the baseline
        runs["baseline"] = (folder / "baseline", "sft")
    todo = {name: run for name, run in runs.items() if not (run[0] / "model").exists()}
    for name, (_, objective) in todo.items():
        log.info("distill: training the %s student (%s)", name, objective)
    # the two students are independent: trained side by side where the cluster holds both
    training.fit_concurrently([dict(
        name=f"distill-{name}", objective=objective, model_path=student, table=rows, out_dir=out_dir,
        train=d.train, resources=cfg.resources,
        loss={"alpha": d.alpha, "sample_weighting": d.sample_weighting, "divergence": d.divergence,
              "tail": d.tail, "jsd_beta": d.jsd_beta}) for name, (out_dir, objective) in todo.items()], cfg.resources)
    models, final_loss = {}, {}
    for name, (out_dir, _) in runs.items():
        if name in todo:
            training.plot_metrics(out_dir)
        models[name] = storage.location(out_dir / "model")  # (s3://... for a run folder there)
        metrics = training.read_metrics(out_dir)
        final_loss[name] = metrics[-1] if metrics else None
    return artifacts.write_manifest(
        folder, "distill", h, started,
        inputs={"logits": logits_hash, "proxy": proxy_path, "student_init": student},
        models=models, final_step=final_loss,
    )
