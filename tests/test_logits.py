"""The logits stage: length policy, streaming pass 2 (μ, σ, weights), and the whole stage through
Ray Data + vLLM against a plain transformers forward on a tiny model."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_topk_matches, student_split, tiny_config

from proxykd import artifacts, logits
from proxykd.config import ConfigError, ModelConfig, TinyModelSpec, parse_config
from proxykd.logits import add_weights, limit_length, merge_moments, moments
from proxykd.models import load_tokenizer, materialize_model
from proxykd.tokenization import encode_example
from proxykd.training import collate

IDS16 = pa.list_(pa.uint16())


# ---------------------------------------------------------------- pure parts ----

def _rows():
    return pa.table({
        "id": ["short", "long", "huge_prompt"],
        "input_ids": pa.array([[1, 2, 3, 4, 5], [1, 2, 3, 10, 11, 12, 13, 14, 15, 16], [1] * 8 + [20, 21]], IDS16),
        "response_start": pa.array([2, 3, 8], pa.int32()),
    })


def test_limit_length_reject():
    out, rejected, truncated = limit_length(_rows(), 6, "reject")
    assert out["id"].to_pylist() == ["short"] and out["input_ids"].to_pylist() == [[1, 2, 3, 4, 5]]
    assert [r["id"] for r in rejected] == ["long", "huge_prompt"] and truncated == []
    assert "10 tokens > max_length 6" in rejected[0]["error"]


def test_limit_length_truncate_keeps_the_prompt_and_cuts_the_response():
    out, rejected, truncated = limit_length(_rows(), 6, "truncate")
    assert out["id"].to_pylist() == ["short", "long"]
    assert out["input_ids"].to_pylist() == [[1, 2, 3, 4, 5], [1, 2, 3, 10, 11, 12]]
    assert out["response_start"].to_pylist() == [2, 3]
    assert out.schema.field("input_ids").type == IDS16
    assert [r["id"] for r in truncated] == ["long"]
    # a prompt that leaves no room for a response token cannot be truncated
    assert [r["id"] for r in rejected] == ["huge_prompt"] and "prompt alone is 8 tokens" in rejected[0]["error"]


def test_limit_length_at_the_boundary():
    out, rejected, truncated = limit_length(_rows(), 10, "truncate")
    assert out["id"].to_pylist() == ["short", "long", "huge_prompt"] and not rejected and not truncated


def test_merge_moments_equals_numpy_over_the_concatenation():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(-3, 2, n) for n in (5, 0, 1, 17, 3)] + [np.full(4, -1e3 + 0.5)]
    acc = (0, 0.0, 0.0)
    for c in chunks:
        acc = merge_moments(acc, moments(c))
    allv = np.concatenate(chunks)
    assert acc[0] == len(allv)
    assert acc[1] == pytest.approx(allv.mean(), rel=1e-12)
    assert math.sqrt(acc[2] / acc[0]) == pytest.approx(allv.std(), rel=1e-10)


def test_moments_by_hand():
    assert moments(np.array([1.0, 3.0])) == (2, 2.0, 2.0)
    assert merge_moments((2, 2.0, 2.0), (1, 5.0, 0.0)) == (3, 3.0, 8.0)  # {1, 3, 5}: mean 3, Σ(x−3)² = 8
    assert merge_moments((0, 0.0, 0.0), (0, 0.0, 0.0)) == (0, 0.0, 0.0)


def _shard(path, ids, ll, errors=None, weight=None, row_group_size=2):
    cols = {"id": ids, "input_ids": pa.array([[1, 2]] * len(ids), IDS16),
            "ll": pa.array(ll, pa.float64())}
    if errors is not None:
        cols["error"] = pa.array(errors, pa.string())
    if weight is not None:
        cols["weight"] = pa.array(weight, pa.float64())
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)


def test_add_weights_streams_shards_and_moves_failed_rows_out(tmp_path):
    # ll values: 1, 2, 3, 4, 5 (good rows) -> μ = 3, σ = sqrt(2)
    _shard(tmp_path / "a.parquet", ["a1", "a2", "a3"], [1.0, 2.0, 3.0], [None, None, None])
    _shard(tmp_path / "b.parquet", ["b1", "bad", "b2"], [4.0, math.nan, 5.0], [None, "scoring failed: x", None])
    _shard(tmp_path / "c.parquet", ["worse"], [math.nan], ["scoring failed: y"])
    _shard(tmp_path / "d.parquet", [], [], [])  # an empty block
    mean, std, failed = add_weights(tmp_path)
    assert (mean, std) == (3.0, pytest.approx(math.sqrt(2)))
    assert failed == [{"id": "bad", "error": "scoring failed: x"}, {"id": "worse", "error": "scoring failed: y"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet"]  # no temp file left
    table = artifacts.read_shards(tmp_path)
    assert table.column_names == ["id", "input_ids", "ll", "weight"]
    assert table["id"].to_pylist() == ["a1", "a2", "a3", "b1", "b2"]
    w = dict(zip(table["id"].to_pylist(), table["weight"].to_pylist()))
    assert w["a3"] == pytest.approx(0.5)  # ll = μ
    assert w["b1"] == pytest.approx(0.6698, abs=1e-4)  # sigmoid(1/√2)
    assert w["a1"] == pytest.approx(0.1955, abs=1e-4)  # sigmoid(−2/√2)
    assert pq.read_metadata(tmp_path / "a.parquet").schema.to_arrow_schema().field("input_ids").type == IDS16
    # Running pass 2 again (a resumed run) replaces the weights instead of adding a column.
    _shard(tmp_path / "e.parquet", ["e1"], [9.0], [None])
    mean2, _, failed2 = add_weights(tmp_path)
    assert failed2 == [] and mean2 == pytest.approx(24 / 6)
    assert artifacts.read_shards(tmp_path).column_names == ["id", "input_ids", "ll", "weight"]


@pytest.mark.parametrize("key,value", [("overlong", "cut"), ("logprob_dtype", "bfloat16")])
def test_logits_config_keys_are_validated(tmp_path, key, value):
    assert parse_config(tiny_config(tmp_path)).logits.overlong == "reject"  # the documented defaults
    assert parse_config(tiny_config(tmp_path)).logits.logprob_dtype == "float16"
    with pytest.raises(ConfigError, match=f"logits.{key}"):
        parse_config(tiny_config(tmp_path, logits={key: value}))


# ---------------------------------------------------------------- the stage, for real ----

K = 5
MAX_LENGTH = 64
ROWS = [
    ("r0", "Calculate 2 + 3.", "The answer is 5.", "stop"),
    ("r1", "What is 12 + 30?", "The answer is 42, since 12 + 30 = 42.", "stop"),
    ("r2", "Calculate 9 - 7.", "2", "stop"),
    ("r3", "Say something long.", "and so on " * 12, "stop"),  # over 64 tokens: response cut
    ("r4", "x" * 80, "too late", "stop"),  # the prompt alone is over 64: rejected
    ("r5", "Calculate 1 + 1.", "The answer", "length"),  # cut off by the teacher: rejected
    ("r6", "Calculate 4 + 4.", "The answer is 8.", "stop"),
]


@pytest.fixture(scope="module")
def stage(tmp_path_factory, local_ray):
    root = tmp_path_factory.mktemp("logits")
    spec = ModelConfig(tiny=TinyModelSpec())
    proxy = materialize_model(spec, root / "proxy", seed=3)
    student = materialize_model(spec, root / "student", seed=4)  # another model, the same tokenizer
    cfg = parse_config(tiny_config(root / "run", logits={"top_k": K, "max_length": MAX_LENGTH, "batch_size": 2,
                                                         "overlong": "truncate", "logprob_dtype": "float32"}))
    prompts, teacher = student_split(ROWS)
    manifest = logits.run(cfg, prompts, teacher, proxy, "align-hash")
    folder = root / "run" / "logits"
    table = artifacts.read_shards(folder).sort_by("id")
    return {"cfg": cfg, "proxy": proxy, "student": student, "manifest": manifest, "folder": folder, "table": table,
            "prompts": prompts, "teacher": teacher}


def test_stage_schema_and_one_row_per_id(stage):
    t = stage["table"]
    assert t["id"].to_pylist() == ["r0", "r1", "r2", "r3", "r6"]
    assert t.schema.field("input_ids").type == IDS16  # vocabulary of 262 tokens
    assert t.schema.field("topk_ids").type == pa.list_(IDS16)
    assert t.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float32()))
    assert {"response_start", "ll", "weight"} <= set(t.column_names) and "error" not in t.column_names
    m = stage["manifest"]
    assert (m["token_id_type"], m["logprob_dtype"], m["rows"]) == ("uint16", "float32", {"scored": 5, "new": 5})
    for f in artifacts.shard_files(stage["folder"]):
        group = pq.ParquetFile(f).metadata.row_group(0)
        columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
        assert all(c.compression == "ZSTD" for c in columns.values())
        assert "BYTE_STREAM_SPLIT" in columns["topk_logprobs.list.element.list.element"].encodings


def test_stage_topk_equals_transformers_forward_within_1e3(stage):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(stage["proxy"], dtype=torch.float32).eval()
    for row in stage["table"].to_pylist():
        ids, start = row["input_ids"], row["response_start"]
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)[start - 1 : len(ids) - 1]
        assert_topk_matches(np.array(row["topk_ids"]), np.array(row["topk_logprobs"], np.float32), ref, K, 1e-3)
        actual = ref[torch.arange(len(ids) - start), torch.tensor(ids[start:])]
        assert row["ll"] == pytest.approx(actual.mean().item(), abs=1e-4)


def test_stored_input_ids_are_what_distill_feeds_the_student(stage):
    tok = load_tokenizer(stage["student"])
    responses = dict(zip(stage["teacher"]["id"].to_pylist(), stage["teacher"]["response"].to_pylist()))
    messages = dict(zip(stage["prompts"]["id"].to_pylist(), stage["prompts"]["messages"].to_pylist()))
    t = stage["table"]
    for row in t.to_pylist():
        ids, start = encode_example(tok, messages[row["id"]], responses[row["id"]], math.inf)
        assert row["response_start"] == start
        assert row["input_ids"] == ids[:MAX_LENGTH]  # r3 is cut to max_length, the others whole
        # the prompt is the chat template applied exactly as the student sees it
        assert tok.decode(ids[:start]) == tok.apply_chat_template(messages[row["id"]], add_generation_prompt=True,
                                                                  tokenize=False)
        assert len(row["topk_ids"]) == len(row["input_ids"]) - start
    # distill reads the shards and collates them: the student's input and labels are these ids,
    # and the top-k entries sit at exactly the label positions
    batch = collate("kd", t, pad_id=tok.pad_token_id)
    for b, row in enumerate(t.to_pylist()):
        n, start = len(row["input_ids"]), row["response_start"]
        assert batch["input_ids"][b, :n].tolist() == row["input_ids"]
        assert batch["labels"][b, start:n].tolist() == row["input_ids"][start:]
        assert (batch["labels"][b, :start] == -100).all() and (batch["labels"][b, n:] == -100).all()
        assert batch["topk_ids"][b, start:n].tolist() == row["topk_ids"]
        np.testing.assert_array_equal(batch["topk_logprobs"][b, start:n], np.array(row["topk_logprobs"], np.float32))


def test_stage_reports_truncated_and_rejected_rows_with_their_id(stage):
    m, folder = stage["manifest"], stage["folder"]
    assert [r["id"] for r in m["truncated_first"]] == ["r3"] and m["truncated_count"] == 1
    rejected = pq.read_table(folder / "rejected.parquet").to_pylist()
    assert sorted(r["id"] for r in rejected) == ["r4", "r5"] and m["rejected_count"] == 2
    reasons = {r["id"]: r["error"] for r in rejected}
    assert "prompt alone" in reasons["r4"] and "cut off" in reasons["r5"]
    r3 = stage["table"].filter(pa.compute.equal(stage["table"]["id"], "r3")).to_pylist()[0]
    assert len(r3["input_ids"]) == MAX_LENGTH


def test_stage_weights_are_sigmoid_of_standardised_ll(stage):
    t, m = stage["table"], stage["manifest"]
    ll = t["ll"].to_numpy()
    assert m["ll_mean"] == pytest.approx(ll.mean()) and m["ll_std"] == pytest.approx(ll.std())
    expected = 1 / (1 + np.exp(-(ll - ll.mean()) / ll.std()))
    np.testing.assert_allclose(t["weight"].to_numpy(), expected, rtol=1e-9)


def test_stage_rerun_is_skipped(stage):
    again = logits.run(stage["cfg"], stage["prompts"], stage["teacher"], stage["proxy"], "align-hash")
    assert again == stage["manifest"]
