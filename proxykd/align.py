"""Stage 2, align: make the white-box proxy imitate the black-box teacher.

a. warm-up SFT on the teacher's responses of split D_w;
b. `rounds` times over D_p: the current proxy samples its own answer ŷ (vLLM in Ray Data, one
   seed per row), the same engine scores log p_ref(y_teacher) and log p_ref(ŷ) once, then Ray
   Train minimises nll_weight·NLL(y) + DPO(y ≻ ŷ) with the proxy of the previous round as
   reference. `align.warmup.lora` / `align.dpo.lora` train LoRA adapters instead of all weights;
   each checkpoint is saved merged, so the next round's vLLM engine loads a plain model.

The reference costs no training memory: it is two float64 columns of pairs.parquet (16 bytes a
pair), scored by the sampling engine (one extra teacher-forced pass over chosen and rejected).
Keeping a second, frozen model resident beside the policy instead would cost its weights again
on every training worker (2 bytes a parameter in bf16: 140 GB for the paper's 70B proxy) plus
a forward pass each step; with LoRA the policy with its adapters switched off would serve without
extra weights, still at one more forward each step. The price of precomputing: the reference
comes from the engine, not the training forward, so in different precisions (bf16 vLLM, bf16
autocast) the first step's margin is not exactly 0 (README, "bf16 on a GPU").

Alignment is measured, not assumed: a held-out slice of D_p (`align.heldout_fraction`, never
trained on) is scored by the warm-up proxy and after every round: the proxy's mean per-token
log-likelihood of the teacher's responses and its top-1 agreement with the teacher's tokens (the
paper's App. A.2 metric). Round k's sampler scores the held-out rows with the round k-1 proxy
in the same engine pass; the last round's proxy gets one scoring pass of its own. The figures go to
the manifest (`alignment`) and `align/alignment.png`.

The stage hands on (manifest `model`, `selected`) the proxy with the best held-out teacher
log-likelihood among the warm-up and every round (`align.select: best_heldout`), or the last one
(`last`; also the fallback when nothing is held out). A round can overshoot: at a large step size
whether round k beats round k-1 may turn on the machine's floating-point path.

Layout: `align/warmup/model`, `align/round-<k>/{model, samples.parquet, pairs.parquet}`,
`align/final_heldout.parquet`. Each part is reused on rerun once its model folder exists, so a run
killed in round k restarts at k.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from proxykd import artifacts, storage, training
from proxykd.config import RunConfig, fingerprint
from proxykd.encode import encode_split
from proxykd.models import load_tokenizer, model_max_length
from proxykd.vllm_actors import RoundSampler, Scorer, engine_kwargs, map_kwargs, top1_hits

log = logging.getLogger("proxykd")


def round_ids(ids: list[str], k: int, per_round: int | None, seed: int) -> list[str]:
    """The D_p rows of round k (1-based): all of `ids`, or `per_round` of them taken in turn from an
    order seeded by `seed` (round 1 the first per_round, round 2 the next, wrapping around)."""
    if per_round is None or per_round >= len(ids):
        return list(ids)
    order = sorted(ids, key=lambda i: hashlib.sha256(f"align-rounds:{seed}:{i}".encode()).digest())
    start = (k - 1) * per_round % len(order)
    return (order + order)[start:start + per_round]


def is_heldout(row_id: str, fraction: float) -> bool:
    """A stable draw from the id (salted, so it is independent of the split draw)."""
    return int.from_bytes(hashlib.sha256(f"align-heldout:{row_id}".encode()).digest()[:8], "big") / 2**64 < fraction


def alignment(name: str, token_logp_sum: np.ndarray, top1: np.ndarray, input_ids, starts) -> dict:
    """Token-level mean log-likelihood of the teacher's responses and top-1 agreement."""
    tokens = int(sum(len(ids) - s for ids, s in zip(input_ids, starts)))
    return {"model": name, "rows": len(starts), "tokens": tokens,
            "teacher_ll": float(np.sum(token_logp_sum)) / max(tokens, 1),
            "top1": float(np.sum(top1)) / max(tokens, 1)}


def _pairs_alignment(name: str, pairs: pa.Table) -> dict:
    return alignment(name, pairs["ref_chosen_logp"].to_numpy(), pairs["chosen_top1_hits"].to_numpy(),
                     pairs["chosen_input_ids"].to_pylist(), pairs["chosen_response_start"].to_pylist())


def _measure(cfg: RunConfig, model: str, rows: pa.Table, path: Path) -> tuple[pa.Table, list[dict]]:
    """Score `rows` (teacher answers) under `model`: ll_sum and top-1 hits per row; kept in `path`
    with the rows vLLM refused (and why), which come back apart as [{id, error}]: left out of the
    measure rather than counted as misses."""
    if not path.exists():
        ds = artifacts.to_dataset(rows.select(["id", "input_ids", "response_start"]), 64).map_batches(
            Scorer,
            fn_constructor_kwargs={
                "engine": engine_kwargs(model, model_max_length(model), cfg.seed, cfg.resources, cfg.proxy.dtype),
                "top_k": 1, "kv_cache_gb": cfg.resources.vllm_kv_cache_gb},
            **map_kwargs(cfg.resources, batch_size=64),
        )
        scored = artifacts.collect(ds, "held-out measure", rows.num_rows)
        top1 = [0 if e else top1_hits(t, x, s) for t, x, s, e in zip(
            scored["topk_ids"].to_pylist(), scored["input_ids"].to_pylist(), scored["response_start"].to_pylist(),
            scored["error"].to_pylist())]
        artifacts.write_table_atomic(scored.select(["id", "input_ids", "response_start", "ll_sum", "error"])
                                     .append_column("top1_hits", pa.array(top1, pa.int64())), path)
    table = pq.read_table(path)
    if "error" not in table.column_names:  # written before refused rows were kept in it
        return table, []
    return split_refused(table)


def select_point(points: list[dict], rule: str) -> dict:
    """The point (of the warm-up and each round, in order) whose model the stage hands on: the
    best held-out teacher log-likelihood per token (the earlier one on a tie; points with no
    scored tokens do not count), or the last."""
    measured = [p for p in points if p["tokens"]]
    return max(measured, key=lambda p: p["teacher_ll"]) if rule == "best_heldout" and measured else points[-1]


def plot_alignment(points: list[dict], path: Path, chosen: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p["model"] for p in points]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key in ((ax1, "teacher_ll"), (ax2, "top1")):
        ax.plot(names, [p[key] for p in points], marker="o")
        ax.plot([chosen], [p[key] for p in points if p["model"] == chosen], marker="*", markersize=14,
                linestyle="", label="handed on")
    ax1.set_title("teacher log-likelihood / token")
    ax1.legend(loc="lower right")
    ax2.set_title("top-1 agreement with the teacher")
    fig.suptitle("proxy alignment on held-out D_p")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    storage.push(path)
    plt.close(fig)


def config_hash(cfg: RunConfig, teacher_hash: str) -> str:
    return fingerprint(teacher_hash, cfg.proxy, cfg.align, cfg.seed)


def _sample_round(cfg: RunConfig, model: str, rows: pa.Table, max_length: int, out: Path,
                  k: int) -> tuple[pa.Table, list[dict]]:
    """Round k's pairs, and the rows vLLM refused as [{id, error}] (kept in the round's
    rejected.parquet, written before pairs.parquet marks the round sampled)."""
    s = cfg.align.sampling
    ds = artifacts.to_dataset(rows.select(["id", "input_ids", "response_start"]), 64).map_batches(
        RoundSampler,
        fn_constructor_kwargs={
            "engine": engine_kwargs(model, model_max_length(model), cfg.seed, cfg.resources, cfg.proxy.dtype),
            "sampling": {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens},
            "max_length": max_length,
            "seed": f"{cfg.seed}:round-{k}",
            "kv_cache_gb": cfg.resources.vllm_kv_cache_gb,
        },
        **map_kwargs(cfg.resources, batch_size=64),
    )
    pairs, failed = split_refused(artifacts.collect(ds, f"round {k} sampling", rows.num_rows).sort_by("id"))
    artifacts.write_rejected(out, failed)
    artifacts.write_table_atomic(pairs.select(["id", "rejected"]), out / "samples.parquet")
    artifacts.write_table_atomic(pairs, out / "pairs.parquet")
    return pairs, failed


def split_refused(table: pa.Table) -> tuple[pa.Table, list[dict]]:
    """(the rows an engine actor answered, without `error`; the rows it refused, as [{id, error}])."""
    bad = pc.is_valid(table["error"])
    return table.filter(pc.invert(bad)).drop_columns(["error"]), table.filter(bad).select(["id", "error"]).to_pylist()


def _round_failures(rdir: Path) -> list[dict]:
    path = rdir / artifacts.REJECTED_FILE
    return pq.read_table(path).to_pylist() if path.exists() else []


def _refused(failed: list[dict], where: str) -> list[dict]:
    """Rows vLLM refused, as the stage's rejected rows: kept out of training and of the measure."""
    for r in failed:
        log.warning("align: %s: %s rejected: %s", where, r["id"], r["error"])
    return [{"id": r["id"], "error": f"{where}: {r['error']}"} for r in failed]


def run(cfg: RunConfig, prompts: pa.Table, teacher: pa.Table, teacher_hash: str, base: str) -> dict:
    folder = artifacts.stage_dir(cfg.run_dir, "align")
    h = config_hash(cfg, teacher_hash)
    if done := artifacts.finished_or_begin(folder, h):
        return done
    started = time.time()
    tokenizer = load_tokenizer(base)
    # One position is kept free: vLLM scores a full-length sequence by generating one token after it.
    max_length = min(cfg.align.max_length, model_max_length(base) - 1)

    warm_rows, rejected = encode_split(tokenizer, prompts, teacher, "warmup", max_length)
    proxy_rows, rej = encode_split(tokenizer, prompts, teacher, "proxy", max_length)
    rejected += rej
    if warm_rows.num_rows == 0:
        raise RuntimeError("align: the warm-up split has no teacher responses; add data or raise data.split.warmup")
    if cfg.align.rounds and proxy_rows.num_rows == 0:
        raise RuntimeError("align: the proxy split has no teacher responses; add data or set align.rounds=0")

    heldout_mask = pa.array([is_heldout(i, cfg.align.heldout_fraction) for i in proxy_rows["id"].to_pylist()],
                            pa.bool_())
    heldout = proxy_rows.filter(heldout_mask)
    log.info("align: %d of %d proxy rows held out to measure alignment", heldout.num_rows, proxy_rows.num_rows)
    trainable = proxy_rows.filter(pc.invert(heldout_mask))["id"].to_pylist()

    current = folder / "warmup" / "model"
    if not current.exists():
        log.info("align: warm-up SFT on %d rows", warm_rows.num_rows)
        training.fit(name="align-warmup", objective="sft", model_path=base,
                     table=warm_rows.select(["id", "input_ids", "response_start"]),
                     out_dir=folder / "warmup", train=cfg.align.warmup, resources=cfg.resources, loss={})
    points, name = [], "warmup"
    for k in range(1, cfg.align.rounds + 1):
        rdir = folder / f"round-{k}"
        rdir.mkdir(exist_ok=True)
        pairs_path = rdir / "pairs.parquet"
        if pairs_path.exists():
            pairs, failed = pq.read_table(pairs_path), _round_failures(rdir)
        else:
            # this round's training rows, and the held-out rows (their scores measure the current proxy)
            take = pa.array(round_ids(trainable, k, cfg.align.rows_per_round, cfg.seed) + heldout["id"].to_pylist())
            rows = proxy_rows.filter(pc.is_in(proxy_rows["id"], take))
            log.info("align: round %d, sampling %d proxy answers", k, rows.num_rows)
            pairs, failed = _sample_round(cfg, storage.location(current), rows, max_length, rdir, k)
        rejected += _refused(failed, f"round {k}")
        in_heldout = pc.is_in(pairs["id"], heldout["id"])
        if heldout.num_rows:
            points.append(_pairs_alignment(name, pairs.filter(in_heldout)))
            log.info("align: %s proxy on held-out D_p: teacher ll %.4f/token, top-1 %.3f",
                     name, points[-1]["teacher_ll"], points[-1]["top1"])
        if not (rdir / "model").exists():
            training.fit(name=f"align-round-{k}", objective="dpo", model_path=storage.location(current),
                         table=pairs.filter(pc.invert(in_heldout)).drop_columns(
                             ["rejected", "chosen_ll", "chosen_top1_hits"]),
                         out_dir=rdir, train=cfg.align.dpo, resources=cfg.resources,
                         loss={"beta": cfg.align.beta, "nll_weight": cfg.align.nll_weight})
        current, name = rdir / "model", f"round-{k}"
    if heldout.num_rows:
        final, failed = _measure(cfg, storage.location(current), heldout, folder / "final_heldout.parquet")
        rejected += _refused(failed, f"{name} held-out measure")
        points.append(alignment(name, final["ll_sum"].to_numpy(), final["top1_hits"].to_numpy(),
                                final["input_ids"].to_pylist(), final["response_start"].to_pylist()))
        log.info("align: %s proxy on held-out D_p: teacher ll %.4f/token, top-1 %.3f",
                 name, points[-1]["teacher_ll"], points[-1]["top1"])
        chosen = {**select_point(points, cfg.align.select), "select": cfg.align.select}
        plot_alignment(points, folder / "alignment.png", chosen["model"])
    else:
        log.warning("align: no held-out proxy rows (align.heldout_fraction=%s): alignment not measured, "
                    "the last model is handed on", cfg.align.heldout_fraction)
        chosen = {"model": name, "select": "last"}
    chosen["path"] = storage.location(folder / chosen["model"] / "model")  # (s3://... for a run there)
    log.info("align: handing on the %s proxy (align.select=%s)", chosen["model"], chosen["select"])

    return artifacts.write_manifest(
        folder, "align", h, started,
        inputs={"teacher": teacher_hash, "proxy_init": base},
        model=chosen["path"],
        rows={"warmup": warm_rows.num_rows, "proxy": proxy_rows.num_rows - heldout.num_rows,
              "per_round": min(cfg.align.rows_per_round or len(trainable), len(trainable)),
              "heldout": heldout.num_rows},
        **artifacts.write_rejected(folder, rejected),
        alignment=points,
        selected=chosen,
    )
