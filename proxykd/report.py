"""`proxykd report CONFIG`: the evidence a user decides on. The same data, steps and seeds through
every arm, scored on the same eval items:

  a. the student before training;
  b. black-box KD: α = 0, plain SFT on the teacher's answers;
  c. Proxy-KD with the *unaligned* proxy (the proxy as it came, no warm-up, no DPO rounds);
  d. Proxy-KD without sample weights (the paper's "standard KL");
  e. full Proxy-KD;
plus the aligned and the unaligned proxy themselves, and the teacher, as reference rows.

The stages before distillation run as in `proxykd run` (and are shared with it); the unaligned
proxy's soft labels are a logits stage of their own under `<run_dir>/unaligned/`. Every arm trains
on the same rows (the ids both logits tables hold) with the same `distill.train` block; only the
loss differs. Hyperparameters are picked on the dev split (`data.dev_fraction`), never on eval:
each learning rate of `report.lrs` is tried with b and the best dev accuracy wins (ties: the higher
dev teacher log-likelihood); every arm then trains at that lr. Each α of `report.alphas` is tried
with e at that lr, and c and d use e's choice. `report.seeds[1:]` retrain b and e with other seeds.

Layout: `report/arms/<arm>/<setting>/` (model, metrics.jsonl), `report/results/<split>/<model>.parquet`
(per-item generations and scores), `report/report.{md,json}`, `report/accuracy.png`,
`report/curves.png`. Every model and every result file is reused on rerun, so a killed report
resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from proxykd import artifacts, evaluate, logits, pipeline, storage, training
from proxykd.config import RunConfig, fingerprint

log = logging.getLogger("proxykd")

ARMS = {  # name: (what it is, objective, soft labels from, sample weighting)
    "student-untrained": ("a. the student before training", None, None, None),
    "blackbox-kd": ("b. black-box KD (α = 0, SFT on the teacher's text)", "sft", "aligned", None),
    "proxykd-unaligned": ("c. Proxy-KD, unaligned proxy", "kd", "unaligned", True),
    "proxykd-unweighted": ("d. Proxy-KD, no sample weights", "kd", "aligned", False),
    "proxykd": ("e. Proxy-KD (full)", "kd", "aligned", True),
}
REFERENCES = {"proxy-aligned": "aligned proxy (reference)", "proxy-unaligned": "unaligned proxy (reference)",
              "teacher": "teacher (reference)"}
DIFFERENCES = (("proxykd", "blackbox-kd"), ("proxykd", "proxykd-unaligned"), ("proxykd", "proxykd-unweighted"))


# ---------------------------------------------------------------- statistics (pure, tested) ----

def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% at the default z)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)  # exact 0 and 1 at the ends (no rounding below)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int = 10000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """Mean of a − b over paired items and a percentile bootstrap interval: the items are
    resampled with replacement, the same draw for both arms."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired_bootstrap needs two equal-length, non-empty 1-D arrays")
    diff = a - b
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(samples, len(diff)))
    means = diff[idx].mean(1)
    tail = (1 - confidence) / 2
    return {"diff": float(diff.mean()), "lo": float(np.quantile(means, tail)),
            "hi": float(np.quantile(means, 1 - tail)), "items": int(len(diff)),
            "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum())}


def accuracy_summary(results: pa.Table) -> dict:
    """Accuracy (score 1 = right) with its Wilson 95% interval, per task too, and the mean teacher
    log-likelihood / top-1 agreement of one model's results."""
    right = results["score"].to_numpy(zero_copy_only=False) >= 1.0
    lo, hi = wilson_interval(int(right.sum()), len(right))
    tasks = [str(t) for t in results["task"].to_pylist()]  # rows without a task group under "None"
    per_task = {t: float(np.mean([r for r, tt in zip(right, tasks) if tt == t])) for t in sorted(set(tasks))}
    means = {c: evaluate.known_mean(results[c].to_numpy(zero_copy_only=False)) for c in ("teacher_ll", "teacher_top1")}
    return {"accuracy": float(right.mean()) if len(right) else math.nan, "lo": lo, "hi": hi, "n": len(right),
            "right": int(right.sum()), "per_task": per_task,
            **{c: None if math.isnan(m) else m for c, m in means.items()}}  # (None: the teacher's own rows)


def correct_by_id(results: pa.Table) -> dict[str, float]:
    return dict(zip(results["id"].to_pylist(), (results["score"].to_numpy(zero_copy_only=False) >= 1.0).astype(float)))


def pick_best(candidates: list[dict]) -> dict:
    """The candidate with the best dev accuracy; ties go to the higher dev teacher log-likelihood,
    then to the first listed."""
    def key(c):
        ll = c.get("teacher_ll")
        return (c["accuracy"], -math.inf if ll is None or math.isnan(ll) else ll)
    return max(candidates, key=key)  # the first of equal maxima


# ---------------------------------------------------------------- the run ----

class Report:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.folder = artifacts.stage_dir(cfg.run_dir, "report")

    def _timed(self, key: str, fn):
        """Run `fn`, adding its seconds to `key` in timings.json (kept across a resumed report)."""
        t0 = time.time()
        out = fn()
        timings = self._timings()
        timings[key] = round(timings.get(key, 0.0) + time.time() - t0, 1)
        artifacts.write_json_atomic(self.folder / "timings.json", timings)
        return out

    def _timings(self) -> dict[str, float]:
        path = self.folder / "timings.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def upstream(self) -> None:
        """prompts → teacher → align → logits as `proxykd run` does, and the unaligned proxy's logits."""
        cfg = self.cfg
        up = pipeline.run_upstream(cfg, ("prompts", "teacher", "align", "logits"))
        self.manifests, self.prompts, self.responses = up.manifests, up.prompts, up.responses
        self.proxy_init, self.student_init = up.initial_models
        self.proxy_aligned = up.proxy
        sub = cfg.model_copy(update={"run_dir": storage.join(cfg.run_dir, "unaligned")})
        unaligned_hash = fingerprint("unaligned", self.proxy_init, up.prompts_hash, self.manifests["teacher"]["responses_hash"])
        self.unaligned_manifest = logits.run(sub, self.prompts, self.responses, self.proxy_init, unaligned_hash)
        self.logits_dirs = {"aligned": artifacts.stage_dir(cfg.run_dir, "logits"),
                            "unaligned": artifacts.stage_dir(sub.run_dir, "logits")}
        self.hash = fingerprint(self.manifests["logits"]["config_hash"], self.unaligned_manifest["config_hash"],
                                cfg.student, cfg.distill, cfg.eval, cfg.report, cfg.seed)

    def training_rows(self) -> dict[str, training.ParquetRows]:
        """Both logits tables, cut to the ids both hold, so every arm trains on the same rows. The
        rows stay in their shards (training reads them in place); each table's index is built once
        and serves every arm that trains on it."""
        ids = {k: artifacts.read_shards(d, ["id"])["id"] for k, d in self.logits_dirs.items()}
        common = pc.filter(ids["aligned"], pc.is_in(ids["aligned"], value_set=ids["unaligned"].combine_chunks()))
        return {k: training.ParquetRows.from_folder(d, ids=common) for k, d in self.logits_dirs.items()}

    def train(self, settings: list[tuple[str, float, float, int]], rows: dict[str, training.ParquetRows]) -> list[str]:
        """The model folder of each (arm, α, lr, seed), trained where not yet on disk; the trainings
        are independent, so they run side by side as far as the cluster holds them."""
        d, runs, arms, paths = self.cfg.distill, [], [], []
        for arm, alpha, lr, seed in settings:
            _, objective, source, weighting = ARMS[arm]
            out_dir = self.folder / "arms" / arm / setting_name(arm, alpha, lr, seed)
            paths.append(storage.location(out_dir / training.MODEL_DIR))
            if not (out_dir / training.MODEL_DIR).exists():
                log.info("report: training %s (%s)", arm, out_dir.name)
                arms.append(arm)
                runs.append(dict(
                    name=f"report-{arm}-{out_dir.name}", objective=objective, model_path=self.student_init,
                    table=rows[source], out_dir=out_dir, train=d.train.model_copy(update={"lr": lr, "seed": seed}),
                    resources=self.cfg.resources,
                    loss={"alpha": alpha if objective == "kd" else 0.0, "sample_weighting": bool(weighting),
                          "divergence": d.divergence, "tail": d.tail, "jsd_beta": d.jsd_beta}))
        if runs:
            self._timed(f"train {' + '.join(dict.fromkeys(arms))}",
                        lambda: training.fit_concurrently(runs, self.cfg.resources))
        return paths

    def results(self, split: str, models: dict[str, str], rows: pa.Table) -> dict[str, pa.Table]:
        """Per-item results of each model (key: path, or "teacher") on one split. The models not yet
        evaluated go through one call, so models of one shape share one vLLM engine (it swaps their
        weights in place) instead of starting an engine each."""
        paths = {key: self.folder / "results" / split / f"{key}.parquet" for key in models}
        todo = {key: model for key, model in models.items() if not paths[key].exists()}
        if "teacher" in todo:
            self._write_results(paths["teacher"], evaluate.teacher_results(self.prompts, rows))
            del todo["teacher"]
        if todo:
            log.info("report: %s on %d %s items", ", ".join(todo), rows.num_rows, split)
            out = self._timed(f"eval ({split})", lambda: evaluate.models_results(self.cfg, self.prompts, todo, rows))
            for key, results in out.items():
                self._write_results(paths[key], results)
        return {key: pq.read_table(path) for key, path in paths.items()}

    @staticmethod
    def _write_results(path: Path, results: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_table_atomic(pa.Table.from_pylist(results), path)

    def choose(self, arm: str, candidates: list[tuple[float, float]], rows: dict[str, training.ParquetRows],
               dev: pa.Table) -> tuple[tuple[float, float], list[dict]]:
        """(α, lr) for `arm` at the first seed: the only candidate, or the best on the dev split."""
        seed = self.cfg.report.seeds[0]
        if len(candidates) == 1:
            return candidates[0], []
        paths = self.train([(arm, alpha, lr, seed) for alpha, lr in candidates], rows)
        models = {f"{arm}-{setting_name(arm, alpha, lr, seed)}": path for (alpha, lr), path in zip(candidates, paths)}
        tried = []
        for (alpha, lr), results in zip(candidates, self.results("dev", models, dev).values()):
            summary = accuracy_summary(results)
            tried.append({"arm": arm, "alpha": alpha, "lr": lr, **summary})
            log.info("report: dev %s α=%g lr=%g: accuracy %.3f", arm, alpha, lr, summary["accuracy"])
        best = pick_best(tried)
        return (best["alpha"], best["lr"]), tried

    def run(self) -> dict:
        started = time.time()
        self.upstream()
        if done := artifacts.finished_or_begin(self.folder, self.hash):
            return done
        cfg, rc = self.cfg, self.cfg.report
        rows = self.training_rows()
        if rows["aligned"].num_rows == 0:
            raise RuntimeError("report: the two logits tables share no row; nothing to train on")
        eval_rows, rejected = evaluate.split_rows(self.prompts, self.responses, "eval", self.student_init)
        dev_rows, _ = evaluate.split_rows(self.prompts, self.responses, "dev", self.student_init)
        if eval_rows.num_rows == 0:
            raise RuntimeError("report: the eval split has no item with a teacher answer; raise data.eval_fraction")
        sweeping = len(rc.lrs) > 1 or len(rc.alphas) > 1
        if sweeping and dev_rows.num_rows == 0:
            raise RuntimeError("report: report.lrs / report.alphas list several candidates but the dev split is "
                               "empty; set data.dev_fraction (hyperparameters are never picked on eval items)")

        # The lr is the student's and the data's: picked with black-box KD, then shared by every arm
        # (the same budget); α is picked with full Proxy-KD at that lr and shared by c and d.
        (_, lr), dev_b = self.choose("blackbox-kd", [(0.0, lr) for lr in rc.lrs], rows, dev_rows)
        (alpha, _), dev_e = self.choose("proxykd", [(a, lr) for a in rc.alphas], rows, dev_rows)
        chosen = {"blackbox-kd": (0.0, lr), "proxykd": (alpha, lr), "proxykd-unaligned": (alpha, lr),
                  "proxykd-unweighted": (alpha, lr)}
        models = {"student-untrained": self.student_init}
        settings = {}
        # a–e at the first seed, then b and e at each further seed
        runs = [(arm, seed, arm) for arm in chosen for seed in rc.seeds[:1]]
        runs += [(arm, seed, f"{arm}@seed{seed}") for seed in rc.seeds[1:] for arm in ("blackbox-kd", "proxykd")]
        runs.sort(key=lambda r: (r[2] != r[0], list(ARMS).index(r[0])))
        paths = self.train([(arm, *chosen[arm], seed) for arm, seed, _ in runs], rows)
        for (arm, seed, key), path in zip(runs, paths):
            a, lr = chosen[arm]
            models[key] = path
            settings[key] = {"alpha": a, "lr": lr, "seed": seed, "dir": str(storage.local_path(path).parent)}
        references = {"proxy-aligned": self.proxy_aligned, "proxy-unaligned": self.proxy_init, "teacher": "teacher"}

        results = self.results("eval", {**models, **references}, eval_rows)
        summaries = {key: accuracy_summary(r) for key, r in results.items()}
        differences = {}
        for i, seed in enumerate(rc.seeds):
            suffix = "" if i == 0 else f"@seed{seed}"
            for a, b in DIFFERENCES:
                if f"{a}{suffix}" in results and f"{b}{suffix}" in results:
                    differences[f"{a}{suffix} − {b}{suffix}"] = paired(results[f"{a}{suffix}"], results[f"{b}{suffix}"],
                                                                        rc.bootstrap_samples, cfg.seed)
        curves = {key: training.read_metrics(Path(s["dir"])) for key, s in settings.items()}
        report = {
            "run_dir": cfg.run_dir if storage.is_remote(cfg.run_dir) else str(Path(cfg.run_dir).resolve()),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(),
            "teacher": {"base_url": cfg.teacher.base_url, "model": cfg.teacher.model,
                        "note": teacher_note(cfg)},
            "models": {"proxy": self.proxy_init, "proxy_aligned": self.proxy_aligned, "student": self.student_init},
            "data": {"tasks": [t.model_dump() for t in cfg.data.tasks], "seed": cfg.data.seed,
                     "split_rows": split_counts(self.prompts), "train_rows": rows["aligned"].num_rows,
                     "eval_items": eval_rows.num_rows, "dev_items": dev_rows.num_rows},
            "hyperparameters": {"chosen": {k: {"alpha": v[0], "lr": v[1]} for k, v in chosen.items()},
                                "dev": dev_b + dev_e, "train": cfg.distill.train.model_dump(),
                                "divergence": cfg.distill.divergence, "tail": cfg.distill.tail},
            "arms": {key: {**summaries[key], **settings.get(key, {}), "model": path}
                     for key, path in {**models, **references}.items()},
            "differences": differences,
            "alignment": {"points": self.manifests["align"].get("alignment", []),
                          "selected": self.manifests["align"].get("selected")},
            # stage times from their manifests (the run that did the work), then this report's own parts
            "timings_s": {**stage_seconds(cfg, self.unaligned_manifest), **self._timings()},
            "final_train_step": {key: (c[-1] if c else None) for key, c in curves.items()},
        }
        plot_accuracy(report["arms"], self.folder / "accuracy.png")
        plot_curves(curves, self.folder / "curves.png")
        artifacts.write_json_atomic(self.folder / "report.json", report)
        artifacts.write_text_atomic(self.folder / "report.md", render_markdown(report))
        log.info("report: %s", self.folder / "report.md")
        return artifacts.write_manifest(self.folder, "report", self.hash, started,
                                        inputs={"logits": self.manifests["logits"]["config_hash"],
                                                "logits_unaligned": self.unaligned_manifest["config_hash"]},
                                        **artifacts.write_rejected(self.folder, rejected),
                                        table=markdown_table(report))


def setting_name(arm: str, alpha: float, lr: float, seed: int) -> str:
    return (f"alpha{alpha:g}-" if ARMS[arm][1] == "kd" else "") + f"lr{lr:g}-seed{seed}"


def paired(a: pa.Table, b: pa.Table, samples: int, seed: int) -> dict:
    ca, cb = correct_by_id(a), correct_by_id(b)
    ids = sorted(set(ca) & set(cb))
    return paired_bootstrap(np.array([ca[i] for i in ids]), np.array([cb[i] for i in ids]), samples, seed)


def split_counts(prompts: pa.Table) -> dict[str, int]:
    return {v["values"]: v["counts"] for v in pc.value_counts(prompts["split"]).to_pylist()}


def teacher_note(cfg: RunConfig) -> str:
    if cfg.teacher.base_url is None:
        return ("proxykd's local teacher, answering every prompt from its reference answer ('The answer is X.'): "
                "a teacher that is always right, not a real LLM")
    return f"{cfg.teacher.model} at {cfg.teacher.base_url}"


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}"


def stage_seconds(cfg: RunConfig, unaligned: dict) -> dict[str, float]:
    out = {}
    for stage in ("prompts", "teacher", "align", "logits"):
        m = artifacts.read_manifest(artifacts.stage_dir(cfg.run_dir, stage)) or {}
        out[f"stage {stage}"] = m.get("seconds")
    out["stage logits (unaligned proxy)"] = unaligned.get("seconds")
    return out


# ---------------------------------------------------------------- output ----

def arm_order(key: str) -> tuple:
    """a–e, then the further seeds, then the references (report.json keeps its keys sorted)."""
    base = key.split("@")[0]
    names = list(ARMS) + list(REFERENCES)
    return (base in REFERENCES, "@" in key, names.index(base) if base in names else len(names), key)


def _fmt(v, digits=3):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(report: dict) -> str:
    lines = ["| arm | accuracy | 95% interval | right / items | teacher ll/token | teacher top-1 | α | lr | seed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, a in sorted(report["arms"].items(), key=lambda kv: arm_order(kv[0])):
        base = key.split("@")[0]
        name = ARMS[base][0] if base in ARMS else REFERENCES.get(base, key)
        if "@" in key:
            name += f" (seed {a.get('seed')})"
        lines.append(f"| {name} | {_fmt(a['accuracy'])} | [{_fmt(a['lo'])}, {_fmt(a['hi'])}] | {a['right']} / {a['n']} "
                     f"| {_fmt(a['teacher_ll'])} | {_fmt(a['teacher_top1'])} | {a.get('alpha', '–')} "
                     f"| {a.get('lr', '–')} | {a.get('seed', '–')} |")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    diff_lines = ["| difference (same eval items) | mean | paired-bootstrap 95% interval | items | wins / losses |",
                  "| --- | --- | --- | --- | --- |"]
    for name, d in report["differences"].items():
        diff_lines.append(f"| {name} | {d['diff']:+.3f} | [{d['lo']:+.3f}, {d['hi']:+.3f}] | {d['items']} "
                          f"| {d['wins']} / {d['losses']} |")
    align = ["| proxy | held-out teacher ll/token | top-1 agreement |", "| --- | --- | --- |"]
    for p in report["alignment"]["points"]:
        align.append(f"| {p['model']} | {p['teacher_ll']:.4f} | {p['top1']:.3f} |")
    selected = report["alignment"].get("selected")
    tasks = sorted({t for a in report["arms"].values() for t in a["per_task"]})
    per_task = ["| arm | " + " | ".join(tasks) + " |", "|" + " --- |" * (len(tasks) + 1)]
    for key, a in sorted(report["arms"].items(), key=lambda kv: arm_order(kv[0])):
        per_task.append(f"| {key} | " + " | ".join(_fmt(a["per_task"].get(t)) for t in tasks) + " |")
    dev = ["| arm | α | lr | dev accuracy | dev teacher ll |", "| --- | --- | --- | --- | --- |"]
    for c in report["hyperparameters"]["dev"]:
        dev.append(f"| {c['arm']} | {c['alpha']:g} | {c['lr']:g} | {c['accuracy']:.3f} | {_fmt(c['teacher_ll'])} |")
    times = ["| part | seconds |", "| --- | --- |"] + [f"| {k} | {_fmt(v, 0)} |" for k, v in report["timings_s"].items()]
    times.append(f"| all of the above | {_fmt(sum(v or 0 for v in report['timings_s'].values()), 0)} |")
    d = report["data"]
    return "\n".join([
        "# proxykd report: Proxy-KD against black-box KD", "",
        f"{report['date']} · {report['machine']} · run `{report['run_dir']}`", "",
        f"**Teacher:** {report['teacher']['note']}.  ",
        f"**Proxy:** `{report['models']['proxy']}` (aligned: `{report['models']['proxy_aligned']}`).  ",
        f"**Student:** `{report['models']['student']}`.  ",
        f"**Data:** {', '.join(t['name'] + ' × ' + str(t['size']) for t in d['tasks'])} (reasoning-gym, seed "
        f"{d['seed']}); splits {d['split_rows']}; every arm trains on the same {d['train_rows']} rows; "
        f"{d['eval_items']} eval items, {d['dev_items']} dev items (hyperparameters are picked on dev only).", "",
        "## Accuracy on the eval items", "", markdown_table(report), "",
        "Accuracy counts an answer right when reasoning-gym's scorer gives it 1; the interval is Wilson's. "
        "Teacher ll/token and top-1: how closely the model reproduces the teacher's answers, teacher-forced.", "",
        "![accuracy](accuracy.png)", "",
        "## Paired differences", "", *diff_lines, "",
        "## Accuracy per task", "", *per_task, "",
        "## Proxy alignment (held-out D_p)", "", *align, "",
        f"Handed on to the logits stage: {selected['model'] if selected else 'the last round'}.", "",
        "## Hyperparameters picked on the dev split", "",
        *(dev if len(dev) > 2 else ["One candidate each: nothing was swept."]), "",
        "Chosen: " + "; ".join(f"{arm} α = {c['alpha']:g}, lr = {c['lr']:g}"
                               for arm, c in report["hyperparameters"]["chosen"].items()), "",
        "## Training curves", "", "![curves](curves.png)", "",
        "## Where the time went", "", *times, "",
    ])


def plot_accuracy(arms: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(arms, key=arm_order)
    acc = np.array([arms[n]["accuracy"] for n in names])
    err = np.array([[arms[n]["accuracy"] - arms[n]["lo"] for n in names], [arms[n]["hi"] - arms[n]["accuracy"] for n in names]])
    colors = ["tab:gray" if n.split("@")[0] in REFERENCES or n == "student-untrained"
              else "tab:blue" if n.startswith("proxykd") else "tab:orange" for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 3.8))
    ax.bar(range(len(names)), acc, yerr=err, capsize=4, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("eval accuracy (95% interval)")
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    storage.push(path)


def plot_curves(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for i, (key, rows) in enumerate(sorted(curves.items(), key=lambda kv: arm_order(kv[0]))):
        steps, color = [r["step"] for r in rows], f"C{i}"  # one colour per arm in both panels
        ax1.plot(steps, [r["nll"] for r in rows], label=key, color=color)
        if any("kl" in r for r in rows):
            ax2.plot(steps, [r.get("kl", math.nan) for r in rows], label=key, color=color)
    ax1.set_title("NLL of the teacher's answer", fontsize=10)
    ax2.set_title("top-k KL(proxy ‖ student) as trained (× w if weighted)", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    storage.push(path)


def run(cfg: RunConfig) -> dict:
    return Report(cfg).run()
