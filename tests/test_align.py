"""The align stage: the pure parts of the alignment measurement, and a real K = 2 run (vLLM
sampling, Ray Train NLL + DPO with LoRA) on a task a tiny proxy can learn, in which the proxy the
stage hands on beats the warm-up's log-likelihood of the teacher's held-out responses."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from proxykd.align import alignment, is_heldout, round_ids, select_point


def test_alignment_is_token_weighted():
    # two rows with 3 and 1 response tokens: log-prob sums -3.0 and -1.0, 2 and 0 top-1 hits
    point = alignment("round-1", np.array([-3.0, -1.0]), np.array([2, 0]), [[0, 1, 2, 3, 4], [0, 1]], [2, 1])
    assert point == {"model": "round-1", "rows": 2, "tokens": 4, "teacher_ll": pytest.approx(-1.0),
                     "top1": pytest.approx(0.5)}


def test_the_stage_hands_on_the_best_held_out_proxy_or_the_last():
    def point(name, ll, tokens=40):
        return {"model": name, "rows": 8, "tokens": tokens, "teacher_ll": ll, "top1": 0.8}

    overshot = [point("warmup", -0.58), point("round-1", -0.50), point("round-2", -0.56)]
    assert select_point(overshot, "best_heldout")["model"] == "round-1"  # round 2 fell: round 1 is handed on
    assert select_point(overshot, "last")["model"] == "round-2"
    rising = [point("warmup", -0.58), point("round-1", -0.51), point("round-2", -0.48)]
    assert select_point(rising, "best_heldout")["model"] == "round-2"
    worse = [point("warmup", -0.23), point("round-1", -0.26)]
    assert select_point(worse, "best_heldout")["model"] == "warmup"  # no round helped: the warm-up
    tie = [point("warmup", -0.5), point("round-1", -0.4), point("round-2", -0.4)]
    assert select_point(tie, "best_heldout")["model"] == "round-1"  # a tie goes to the earlier round
    unscored = [point("warmup", -0.58), point("round-1", 0.0, tokens=0)]  # no rows scored: 0/1 is no figure
    assert select_point(unscored, "best_heldout")["model"] == "warmup"
    assert select_point([point("warmup", 0.0, tokens=0)], "best_heldout")["model"] == "warmup"


def test_rounds_take_their_rows_in_turn():
    ids = [f"row-{i}" for i in range(10)]
    assert round_ids(ids, 1, None, 0) == ids and round_ids(ids, 3, 10, 0) == ids  # all of D_p every round
    r1, r2, r3 = (round_ids(ids, k, 4, 0) for k in (1, 2, 3))
    assert len(r1) == len(r2) == len(r3) == 4
    assert not set(r1) & set(r2) and set(r1) | set(r2) | set(r3) == set(ids)  # the rounds use D_p up in turn
    assert len(set(r3)) == 4 and len(set(r3) & set(r1)) == 2  # round 3 wraps around to the start
    assert round_ids(ids, 2, 4, 0) == r2 and round_ids(ids, 1, 4, 1) != r1  # stable; the seed picks the order


def test_heldout_draw_is_stable_and_near_its_fraction():
    ids = [f"row-{i}" for i in range(4000)]
    held = [i for i in ids if is_heldout(i, 0.1)]
    assert 0.08 < len(held) / len(ids) < 0.12
    assert held == [i for i in ids if is_heldout(i, 0.1)]
    assert set(held) <= {i for i in ids if is_heldout(i, 0.3)}  # a larger fraction only adds rows
    assert not any(is_heldout(i, 0.0) for i in ids)


# ---------------------------------------------------------------- the stage, K = 2, LoRA rounds

CAPITALS = {"France": "Paris", "Peru": "Lima", "Japan": "Tokyo", "Kenya": "Nairobi",
            "Chile": "Santiago", "Egypt": "Cairo", "Italy": "Rome", "Cuba": "Havana",
            "Spain": "Madrid", "Chad": "Ndjamena", "Nepal": "Kathmandu", "Ghana": "Accra",
            "Iran": "Tehran", "Mali": "Bamako", "Laos": "Vientiane", "Fiji": "Suva"}
QUESTIONS = ("What is the capital of {}?", "Name the capital of {}.", "{}: which city is the capital?")


def capitals_task(per_country: int, warmup_per_country: int, countries: int = len(CAPITALS)):
    """A teacher a tiny proxy can learn to imitate: the capitals of some countries, asked 3 ways.
    The first `warmup_per_country` rows of each country are D_w, the rest D_p."""
    import pyarrow as pa

    from proxykd.data import PROMPT_SCHEMA

    prompts, answers = [], []
    for country, capital in list(CAPITALS.items())[:countries]:
        for j in range(per_country):
            rid = f"{country.lower()}-{j:02d}"
            prompts.append({"id": rid, "messages": [{"role": "user", "content": QUESTIONS[j % 3].format(country)}],
                            "reference": capital, "split": "warmup" if j < warmup_per_country else "proxy",
                            "task": "capitals", "metadata": "{}"})
            answers.append({"id": rid, "response": f"The capital of {country} is {capital}.", "finish_reason": "stop"})
    return pa.Table.from_pylist(prompts, schema=PROMPT_SCHEMA), pa.Table.from_pylist(answers)


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, local_ray):
    """The align stage, K = 2: full warm-up SFT on D_w, then two rounds of vLLM sampling and
    NLL + DPO training of LoRA adapters (merged into each round's checkpoint, which the next
    round's vLLM engine loads)."""
    from conftest import tiny_config

    from proxykd import align
    from proxykd.config import parse_config
    from proxykd.models import materialize_model

    root = tmp_path_factory.mktemp("align")
    cfg = parse_config(tiny_config(root / "run", align={
        "rounds": 2, "max_length": 96, "beta": 0.1, "nll_weight": 1.0, "heldout_fraction": 0.25,
        "warmup": {"epochs": 12, "lr": 1e-2, "batch_size": 8},
        "dpo": {"epochs": 3, "lr": 1e-2, "batch_size": 8,
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}},
        "sampling": {"temperature": 0.7, "max_tokens": 40}}))
    base = materialize_model(cfg.proxy, root / "proxy-init", cfg.seed)
    prompts, answers = capitals_task(per_country=8, warmup_per_country=2)
    manifest = align.run(cfg, prompts, answers, "answers-hash", base)
    return cfg, manifest, root / "run" / "align", base


def test_k2_rounds_raise_the_proxys_teacher_log_likelihood(two_rounds):
    """Every round is reported, and the proxy handed on is the one with the best held-out teacher
    log-likelihood: it beats the warm-up's by a margin. Round 2 at LoRA lr 1e-2 is on a knife edge:
    it rose further on some machines and floating-point paths and fell back below round 1 on
    others, so the claim is on the handed-on proxy, not on every round rising. Measured rises of
    the handed-on proxy over the warm-up: +0.078 to +0.140 (round 1 alone: +0.066 to +0.097) on
    three machines, 1 or 2 torch threads, avx512 or avx2 kernels, and seeds 0 and 1; the margin
    asserted is 0.03."""
    _, manifest, folder, _ = two_rounds
    points = manifest["alignment"]
    assert [p["model"] for p in points] == ["warmup", "round-1", "round-2"]
    assert manifest["rows"]["heldout"] == points[0]["rows"] > 10
    assert manifest["rows"]["warmup"] == 32 and manifest["rows"]["proxy"] + manifest["rows"]["heldout"] == 96
    warm, best = points[0], max(points, key=lambda p: p["teacher_ll"])
    chosen = manifest["selected"]
    assert chosen == {**best, "select": "best_heldout", "path": str(folder / best["model"] / "model")}
    assert manifest["model"] == chosen["path"] and (folder / best["model"] / "model" / "config.json").exists()
    assert chosen["model"] != "warmup" and chosen["teacher_ll"] - warm["teacher_ll"] > 0.03, points
    # top-1 is not what the choice is made on; the handed-on proxy's rose by 0.022 to 0.056
    assert chosen["top1"] > warm["top1"] - 0.01, points
    assert (folder / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k in (1, 2):
        metrics = [json.loads(line) for line in (folder / f"round-{k}" / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all({"nll", "dpo", "margin"} <= set(m) for m in metrics)
        samples = pq.read_table(folder / f"round-{k}" / "samples.parquet")
        assert samples.column_names == ["id", "rejected"] and samples.num_rows == 96
        # one seed per row: the proxy's answers to the 8 countries' questions are not all one text
        assert len(set(samples["rejected"].to_pylist())) > 8


def test_lora_rounds_save_merged_checkpoints_that_the_next_rounds_vllm_engine_loads(two_rounds):
    """Round 1 trained LoRA adapters only: its checkpoint is a plain model that differs from the
    warm-up proxy in the adapted projections alone. Round 2's vLLM engine loaded it: the reference
    log-probs it computed for the teacher's responses are the round-1 model's, as transformers
    computes them."""
    import torch
    from transformers import AutoModelForCausalLM

    from proxykd.losses import sequence_logprobs
    from proxykd.training import collate

    _, _, folder, _ = two_rounds
    warm = AutoModelForCausalLM.from_pretrained(folder / "warmup" / "model").state_dict()
    round1 = AutoModelForCausalLM.from_pretrained(folder / "round-1" / "model")
    after = round1.state_dict()
    assert set(after) == set(warm) and not (folder / "round-1" / "model" / "adapter_config.json").exists()
    changed = {k for k in warm if not torch.equal(warm[k], after[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed), sorted(changed)
    assert not any("embed" in k or "norm" in k or "lm_head" in k for k in changed)

    pairs = pq.read_table(folder / "round-2" / "pairs.parquet").slice(0, 16)
    t = {k: torch.as_tensor(v) for k, v in collate("dpo", pairs, 0).items()}
    with torch.no_grad():
        seq = sequence_logprobs(round1(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits, t["labels"])
    np.testing.assert_allclose(pairs["ref_chosen_logp"].to_numpy(), seq[:16].numpy(), rtol=0, atol=2e-2)
    np.testing.assert_allclose(pairs["ref_rejected_logp"].to_numpy(), seq[16:].numpy(), rtol=0, atol=2e-2)


def test_a_run_killed_in_round_2_restarts_at_round_2(two_rounds):
    """What a kill during round 2's training leaves behind: the warm-up, round 1, and round 2's
    pairs, but no round-2 model, final measure or manifest. The rerun trains round 2 alone, from
    the stored pairs (no new samples), and arrives at the same proxy."""
    import shutil

    from proxykd import align

    cfg, manifest, folder, base = two_rounds
    kept = [folder / "warmup" / "model" / "model.safetensors", folder / "round-1" / "model" / "model.safetensors",
            folder / "round-1" / "pairs.parquet", folder / "round-2" / "pairs.parquet"]
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    for part in ("round-2/model", "round-2/_ray"):
        shutil.rmtree(folder / part)
    for part in ("final_heldout.parquet", "manifest.json", "alignment.png"):
        (folder / part).unlink()
    prompts, answers = capitals_task(per_country=8, warmup_per_country=2)
    again = align.run(cfg, prompts, answers, "answers-hash", base)
    assert {p: p.stat().st_mtime_ns for p in kept} == stamps  # nothing before round 2 was redone
    assert again["model"] == manifest["model"] and (folder / "round-2" / "model" / "model.safetensors").exists()
    assert again["selected"]["model"] == manifest["selected"]["model"]
    assert [p["model"] for p in again["alignment"]] == ["warmup", "round-1", "round-2"]
    for a, b in zip(again["alignment"], manifest["alignment"]):
        assert a["teacher_ll"] == pytest.approx(b["teacher_ll"], abs=1e-3) and a["top1"] == pytest.approx(b["top1"], abs=1e-2)
