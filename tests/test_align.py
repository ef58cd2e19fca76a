"""The align stage: the pure parts of the alignment measurement, and a real K = 2 run (vLLM
sampling, Ray Train NLL + DPO with LoRA) on a task a tiny proxy can learn, in which the proxy's
log-likelihood of the teacher's held-out responses rises round after round."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from proxykd.align import alignment, is_heldout, top1_hits


def test_top1_hits_counts_response_tokens_that_are_the_models_first_choice():
    input_ids = [[5, 6, 7, 8, 9], [1, 2, 3]]
    starts = [2, 1]
    # score(..., k=1) rows: (topk_ids [n, 1], topk_logprobs [n, 1], token_logprobs [n])
    scored = [(np.array([[7], [0], [9]]), None, None), (np.array([[2], [3]]), None, None)]
    assert top1_hits(scored, input_ids, starts) == [2, 2]


def test_alignment_is_token_weighted():
    # two rows with 3 and 1 response tokens: log-prob sums -3.0 and -1.0, 2 and 0 top-1 hits
    point = alignment("round-1", np.array([-3.0, -1.0]), np.array([2, 0]), [[0, 1, 2, 3, 4], [0, 1]], [2, 1])
    assert point == {"model": "round-1", "rows": 2, "tokens": 4, "teacher_ll": pytest.approx(-1.0),
                     "top1": pytest.approx(0.5)}


def test_heldout_draw_is_stable_and_near_its_fraction():
    ids = [f"row-{i}" for i in range(4000)]
    held = [i for i in ids if is_heldout(i, 0.1)]
    assert 0.08 < len(held) / len(ids) < 0.12
    assert held == [i for i in ids if is_heldout(i, 0.1)]
    assert set(held) <= {i for i in ids if is_heldout(i, 0.3)}  # a larger fraction only adds rows
    assert not any(is_heldout(i, 0.0) for i in ids)


# ---------------------------------------------------------------- the stage, K = 2, LoRA rounds

CAPITALS = {"France": "Paris", "Peru": "Lima", "Japan": "Tokyo", "Kenya": "Nairobi",
            "Chile": "Santiago", "Egypt": "Cairo", "Italy": "Rome", "Cuba": "Havana"}
QUESTIONS = ("What is the capital of {}?", "Name the capital of {}.", "{}: which city is the capital?")


def capitals_task(per_country: int, warmup_per_country: int):
    """A teacher a tiny proxy can learn to imitate: the capital of 8 countries, asked 3 ways.
    The first `warmup_per_country` rows of each country are D_w, the rest D_p."""
    import pyarrow as pa

    from proxykd.data import PROMPT_SCHEMA

    prompts, answers = [], []
    for country, capital in CAPITALS.items():
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
        "warmup": {"epochs": 1, "lr": 3e-3, "batch_size": 8},
        "dpo": {"epochs": 2, "lr": 1e-2, "batch_size": 8,
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}},
        "sampling": {"temperature": 1.0, "max_tokens": 40}}))
    base = materialize_model(cfg.proxy, root / "proxy-init", cfg.seed)
    prompts, answers = capitals_task(per_country=14, warmup_per_country=2)
    manifest = align.run(cfg, prompts, answers, "answers-hash", base)
    return cfg, manifest, root / "run" / "align", base


def test_k2_rounds_raise_the_proxys_teacher_log_likelihood(two_rounds):
    _, manifest, folder, _ = two_rounds
    points = manifest["alignment"]
    assert [p["model"] for p in points] == ["warmup", "round-1", "round-2"]
    assert manifest["rows"]["heldout"] == points[0]["rows"] > 10
    assert manifest["rows"]["warmup"] == 16 and manifest["rows"]["proxy"] + manifest["rows"]["heldout"] == 96
    ll = [p["teacher_ll"] for p in points]
    assert ll[0] < ll[1] < ll[2], ll
    assert ll[2] - ll[0] > 0.1, ll
    assert points[2]["top1"] >= points[0]["top1"]
    assert (folder / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k in (1, 2):
        metrics = [json.loads(line) for line in (folder / f"round-{k}" / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all({"nll", "dpo", "margin"} <= set(m) for m in metrics)
        samples = pq.read_table(folder / f"round-{k}" / "samples.parquet")
        assert samples.column_names == ["id", "rejected"] and samples.num_rows == 96


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
