"""vLLM engines (the same classes the Ray Data actors run) against a plain transformers forward."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from proxykd.config import ModelConfig, ResourcesConfig, TinyModelSpec
from proxykd.encode import IDS
from proxykd.models import load_tokenizer, materialize_model
from proxykd.tokenization import encode_example
from proxykd.vllm_actors import Scorer, engine_kwargs

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
    s = Scorer(engine_kwargs(model, 512, 0, ResourcesConfig(), "float32"), top_k=K)
    yield s
    del s.llm


def test_scorer_matches_transformers_forward(model, scorer):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    encoded = [encode_example(tok, m, r, 512) for m, r in EXAMPLES]
    batch = pa.table({"id": ["a", "b", "c"], "input_ids": pa.array([e[0] for e in encoded], IDS),
                      "response_start": pa.array([e[1] for e in encoded], pa.int32())})
    out = scorer(batch)
    assert out.column_names == ["id", "input_ids", "response_start", "ll", "ll_sum", "topk_ids", "topk_logprobs"]
    assert out.schema.field("topk_ids").type == pa.list_(pa.list_(pa.int32()))
    assert out.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16()))
    for row, (ids, start) in zip(out.to_pylist(), encoded):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        # logits at t-1 predict token t: response positions start..len-1
        ref = logp[start - 1 : len(ids) - 1]
        top = ref.topk(K + 1)
        got_ids = np.array(row["topk_ids"])
        got_lp = np.array(row["topk_logprobs"], np.float32)
        assert got_ids.shape == (len(ids) - start, K)
        # ids must match wherever the ranking is not a near-tie
        gaps = (top.values[:, :-1] - top.values[:, 1:]).numpy()
        clear = gaps > 1e-3
        assert (got_ids == top.indices[:, :K].numpy())[clear].all()
        # float16 storage: ~1e-3 relative
        np.testing.assert_allclose(got_lp, top.values[:, :K].numpy(), rtol=2e-3, atol=2e-3)
        actual = ref[torch.arange(len(ids) - start), torch.tensor(ids[start:])].numpy()
        assert row["ll_sum"] == pytest.approx(float(actual.sum()), abs=1e-3)
        assert row["ll"] == pytest.approx(float(actual.mean()), abs=1e-4)


def test_evaluator_greedy_answers_and_teacher_scores(model, scorer):
    from transformers import AutoModelForCausalLM

    from proxykd.evaluate import Evaluator

    # Reuses the scorer's engine: one engine per module keeps this file fast.
    evaluator = Evaluator.__new__(Evaluator)
    evaluator.llm = scorer.llm
    from vllm import SamplingParams

    evaluator.params = SamplingParams(temperature=0.0, max_tokens=6)
    tok = load_tokenizer(model)
    encoded = [encode_example(tok, m, r, 512) for m, r in EXAMPLES]
    batch = pa.table({"id": ["a", "b", "c"], "input_ids": pa.array([e[0] for e in encoded], IDS),
                      "response_start": pa.array([e[1] for e in encoded], pa.int32())})
    first, second = evaluator(batch), evaluator(batch)
    assert first["sample"].to_pylist() == second["sample"].to_pylist()  # greedy: deterministic
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for row, (ids, start) in zip(first.to_pylist(), encoded):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        ref = logp[start - 1 : len(ids) - 1]
        target = torch.tensor(ids[start:])
        assert row["teacher_ll"] == pytest.approx(ref[torch.arange(len(target)), target].mean().item(), abs=1e-4)
        assert row["teacher_top1"] == pytest.approx((ref.argmax(-1) == target).float().mean().item())
