"""Tests for proxykd.data: split assignment, prompt building/validation, answer extraction, scoring."""

import json
import math
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from proxykd import scoring
from proxykd.config import DataConfig, SplitConfig, TaskConfig
from proxykd.data import (
    PROMPT_SCHEMA,
    SPLITS,
    assign_split,
    build_prompts,
    extract_answer,
    score,
    teacher_style_response,
)

# ------------------------------------------------------------------ assign_split ----


def test_assign_split_deterministic_and_valid():
    cfg = DataConfig()
    ids = [f"row-{i}" for i in range(500)]
    first = [assign_split(i, cfg) for i in ids]
    second = [assign_split(i, DataConfig()) for i in ids]
    assert first == second
    assert set(first) <= set(SPLITS)


def test_assign_split_independent_of_order():
    cfg = DataConfig()
    ids = [f"q{i}" for i in range(300)]
    forward = {i: assign_split(i, cfg) for i in ids}
    backward = {i: assign_split(i, cfg) for i in reversed(ids)}
    interleaved = {i: assign_split(i, cfg) for i in ids[1::2] + ids[::2]}
    assert forward == backward == interleaved


@pytest.mark.parametrize(
    "eval_fraction, split",
    [(0.1, (0.1, 0.45, 0.45)), (0.2, (0.5, 0.25, 0.25)), (0.0, (0.3, 0.3, 0.4))],
)
def test_assign_split_fractions(eval_fraction, split):
    cfg = DataConfig(eval_fraction=eval_fraction, split=SplitConfig(warmup=split[0], proxy=split[1], student=split[2]))
    n = 20_000
    counts = Counter(assign_split(f"synthetic-{i}", cfg) for i in range(n))
    expected = {
        "eval": eval_fraction,
        "warmup": (1 - eval_fraction) * split[0],
        "proxy": (1 - eval_fraction) * split[1],
        "student": (1 - eval_fraction) * split[2],
    }
    for name, frac in expected.items():
        assert abs(counts[name] / n - frac) <= 0.02, (name, counts[name] / n, frac)
    if eval_fraction == 0:
        assert counts["eval"] == 0


def test_assign_split_degenerate_fractions():
    ids = [f"d{i}" for i in range(200)]
    all_warm = DataConfig(eval_fraction=0.0, split=SplitConfig(warmup=1.0, proxy=0.0, student=0.0))
    assert {assign_split(i, all_warm) for i in ids} == {"warmup"}
    all_student = DataConfig(eval_fraction=0.0, split=SplitConfig(warmup=0.0, proxy=0.0, student=1.0))
    assert {assign_split(i, all_student) for i in ids} == {"student"}


def test_growing_eval_fraction_only_moves_rows_into_eval():
    small, large = DataConfig(eval_fraction=0.1), DataConfig(eval_fraction=0.3)
    for i in range(2000):
        rid = f"m{i}"
        if assign_split(rid, small) == "eval":
            assert assign_split(rid, large) == "eval"


# ------------------------------------------------------------------ build_prompts (file) ----


def _write_jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


GOOD_1 = {"id": "good-1", "messages": [{"role": "user", "content": "What is 2+2?"}], "reference": "4"}
GOOD_2 = {
    "id": "good-2",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another?"},
    ],
}
FROM_PROMPT = {"id": "from-prompt", "prompt": "Say hi.", "reference": 7}


def _file_rows(tmp_path, name="p.jsonl"):
    lines = [
        GOOD_1,
        {"messages": [{"role": "user", "content": "no id here"}]},  # line 2
        "{this is not json",  # line 3
        {"id": "bad-role", "messages": [{"role": "bot", "content": "hello"}]},
        {"id": "empty-prompt", "messages": [{"role": "user", "content": "   "}]},
        GOOD_2,
        {"id": "good-1", "messages": [{"role": "user", "content": "duplicate"}]},
        FROM_PROMPT,
        {"id": "no-messages"},
        {"id": "ends-with-assistant", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    return _write_jsonl(tmp_path / name, lines)


def test_build_prompts_from_file(tmp_path):
    path = _file_rows(tmp_path)
    cfg = DataConfig(source="file", path=str(path))
    table, rejected = build_prompts(cfg)

    assert table.schema.equals(PROMPT_SCHEMA)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["from-prompt", "good-1", "good-2"]
    assert rows["good-1"]["messages"] == GOOD_1["messages"]  # the first of the duplicates is kept
    assert rows["good-1"]["reference"] == "4"
    assert rows["good-2"]["messages"] == GOOD_2["messages"]
    assert rows["good-2"]["reference"] is None
    assert rows["from-prompt"]["messages"] == [{"role": "user", "content": "Say hi."}]
    assert rows["from-prompt"]["reference"] == "7"  # references are strings
    for rid, row in rows.items():
        assert row["split"] == assign_split(rid, cfg)
        assert row["split"] in SPLITS

    errors = {r["id"]: r["error"] for r in rejected}
    assert len(rejected) == 7  # nothing good dropped, nothing bad silently skipped
    assert "<line 3>" in errors and "JSON" in errors["<line 3>"]
    assert "bot" in errors["bad-role"]
    assert "empty prompt" in errors["empty-prompt"]
    assert "duplicate" in errors["good-1"]
    assert "messages" in errors["no-messages"]
    assert "user" in errors["ends-with-assistant"]
    # the row without an id is rejected (once) with an error naming `id`
    named = {"<line 3>", "bad-role", "empty-prompt", "good-1", "no-messages", "ends-with-assistant"}
    no_id = [r for r in rejected if r["id"] not in named]
    assert len(no_id) == 1 and "`id`" in no_id[0]["error"]


def test_a_file_row_names_only_a_registered_task(tmp_path):
    """`task` picks the scorer that reads the row's reference, metadata and the model's answer, so a
    prompt file may only name reasoning-gym's own datasets; other rows are rejected with their id."""
    rows = [{**GOOD_1, "id": "countdown", "task": "countdown", "metadata": {"numbers": [1, 2], "target": 3}},
            {**GOOD_1, "id": "no-task"},
            {**GOOD_1, "id": "typo", "task": "countdwn"},
            {**GOOD_1, "id": "number", "task": 42},
            {**GOOD_1, "id": "empty", "task": ""}]
    table, rejected = build_prompts(DataConfig(source="file", path=str(_write_jsonl(tmp_path / "p.jsonl", rows))))
    assert dict(zip(table["id"].to_pylist(), table["task"].to_pylist())) == {"countdown": "countdown", "no-task": None}
    errors = {r["id"]: r["error"] for r in rejected}
    assert errors.keys() == {"typo", "number", "empty"}
    assert errors["typo"].startswith("line 3: unknown task 'countdwn': `task` must name a reasoning-gym dataset")
    assert "unknown task 42" in errors["number"]


def _rejected_file_rows(tmp_path):
    """A JSONL file of two good rows and, between them, one bad row of each kind, to be rejected alone."""
    lines = [
        json.dumps(GOOD_1).encode(),
        b'{"id": "latin-1", "prompt": "caf\xe9"}',  # line 2: not UTF-8
        b'{"id": "surrogate-content", "prompt": "x \\ud800 y"}',  # a JSON escape that json.loads accepts
        b'{"id": "surrogate-\\udfff", "prompt": "x"}',  # line 4: in the id itself
        json.dumps({**GOOD_1, "id": "surrogate-reference", "reference": "\ud83d"}).encode(),
        json.dumps({**GOOD_1, "id": "surrogate-metadata", "metadata": {"k": ["\udc80"]}}).encode(),
        json.dumps({**GOOD_1, "id": "surrogate-role", "messages": [{"role": "user\ud800", "content": "q"}]}).encode(),
        json.dumps({**GOOD_1, "id": "task-list", "task": ["countdown"]}).encode(),
        json.dumps({**GOOD_1, "id": "metadata-list", "metadata": [1, 2]}).encode(),
        json.dumps({**GOOD_1, "id": "metadata-text", "metadata": "not json"}).encode(),
        b'{"id": "metadata-nan", "prompt": "q", "metadata": {"x": NaN}}',
        json.dumps({**GOOD_1, "id": "has#hash"}).encode(),
        json.dumps({**GOOD_1, "messages": [{"role": "user", "content": "a duplicate"}]}).encode(),  # line 13
        json.dumps({"id": "good-3", "prompt": "\u00e9t\u00e9 \U0001F600", "metadata": '{"n": 1}'}).encode(),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_bad_row_is_rejected_alone_with_its_line_or_id(tmp_path):
    table, rejected = build_prompts(DataConfig(source="file", path=str(_rejected_file_rows(tmp_path))))
    assert table["id"].to_pylist() == ["good-1", "good-3"]
    good3 = table.to_pylist()[1]
    assert good3["messages"][0]["content"] == "\u00e9t\u00e9 \U0001F600"  # valid UTF-8 beyond ASCII is kept
    assert json.loads(good3["metadata"]) == {"n": 1}  # metadata given as JSON text of an object
    errors = {r["id"]: r["error"] for r in rejected}
    assert len(rejected) == len(errors) == 12
    assert errors["<line 2>"].startswith("line 2: not valid UTF-8")  # the line is unreadable: no id
    assert errors["surrogate-content"] == ("line 3: `prompt` holds '\\ud800', a lone surrogate that UTF-8 "
                                           "cannot encode")
    assert errors["<line 4>"].startswith("line 4: `id` holds '\\udfff'")  # not reported under that id
    assert "`reference`" in errors["surrogate-reference"] and "\\ud83d" in errors["surrogate-reference"]
    assert "`metadata`.k[0]" in errors["surrogate-metadata"]
    assert "`messages`[0].role" in errors["surrogate-role"]
    assert "unknown task ['countdown']" in errors["task-list"]
    assert "`metadata` must be a JSON object, got list" in errors["metadata-list"]
    assert "`metadata` is text but not JSON" in errors["metadata-text"]
    assert "`metadata` is not plain JSON" in errors["metadata-nan"]
    assert "contains '#'" in errors["has#hash"]
    assert errors["good-1"] == "line 13: duplicate `id` (first on line 1)"
    # the rejected file and the prompts table hold every row: nothing breaks Arrow's UTF-8
    pa.Table.from_pylist(rejected, schema=pa.schema([("id", pa.string()), ("error", pa.string())]))


def test_metadata_must_round_trip_through_json():
    from proxykd.data import _metadata_json

    assert _metadata_json(None) == "{}" and _metadata_json({"a": [1, {"b": None}]}) == '{"a": [1, {"b": null}]}'
    for bad, why in [({1: "int key"}, "changes through JSON"), ({"t": (1, 2)}, "changes through JSON"),
                     ({"d": {1, 2}}, "not plain JSON"), ({"x": float("inf")}, "not plain JSON"),
                     ("[1]", "must be a JSON object, got list"), (3, "must be a JSON object, got int")]:
        with pytest.raises(ValueError, match=why):
            _metadata_json(bad)


def test_a_parquet_row_with_invalid_utf8_is_rejected_alone(tmp_path):
    """Arrow reads a Parquet string column without checking its UTF-8; the row fails alone."""
    data = b"good-1" + b"bad\xff" + b"p2"
    offsets = pa.array([0, 6, 10, 12], pa.int32()).buffers()[1]
    ids = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(data)])
    messages = pa.array([GOOD_1["messages"]] * 3)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ids, "messages": messages}), path)
    table, rejected = build_prompts(DataConfig(source="file", path=str(path)))
    assert table["id"].to_pylist() == ["good-1", "p2"]
    assert [r["id"] for r in rejected] == ["<row 2>"] and rejected[0]["error"].startswith("row 2: not valid UTF-8")


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_1).encode() + b"\r\n" + json.dumps(FROM_PROMPT).encode() + b"\r\n")
    table, rejected = build_prompts(DataConfig(source="file", path=str(path)))
    assert rejected == [] and table["id"].to_pylist() == ["good-1", "from-prompt"]


def test_row_without_id_reported_with_line_marker(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [GOOD_1, {"messages": [{"role": "user", "content": "x"}]}])
    _, rejected = build_prompts(DataConfig(source="file", path=str(path)))
    assert [r["id"] for r in rejected] == ["<line 2>"]


def test_non_object_json_line_is_rejected_not_fatal(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [GOOD_1, "42", "[1, 2]"])
    table, rejected = build_prompts(DataConfig(source="file", path=str(path)))
    assert table.column("id").to_pylist() == ["good-1"]
    assert len(rejected) == 2


def test_build_prompts_system_prompt_for_prompt_rows(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [FROM_PROMPT, GOOD_1])
    table, rejected = build_prompts(DataConfig(source="file", path=str(path), system_prompt="SYS"))
    assert rejected == []
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["from-prompt"]["messages"] == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Say hi."},
    ]
    # explicit messages are kept as given
    assert rows["good-1"]["messages"] == GOOD_1["messages"]


def test_build_prompts_split_independent_of_row_order(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"question {i}"} for i in range(60)]
    a, _ = build_prompts(DataConfig(source="file", path=str(_write_jsonl(tmp_path / "a.jsonl", rows))))
    b, _ = build_prompts(DataConfig(source="file", path=str(_write_jsonl(tmp_path / "b.jsonl", rows[::-1]))))
    split_a = dict(zip(a["id"].to_pylist(), a["split"].to_pylist()))
    split_b = dict(zip(b["id"].to_pylist(), b["split"].to_pylist()))
    assert len(split_a) == 60 and split_a == split_b


def test_build_prompts_from_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD_1, {"id": "p2", "messages": [{"role": "user", "content": "hi"}], "reference": None}]), path)
    table, rejected = build_prompts(DataConfig(source="file", path=str(path)))
    assert rejected == []
    assert sorted(table["id"].to_pylist()) == ["good-1", "p2"]


# ------------------------------------------------------------------ build_prompts (reasoning-gym) ----


def test_build_prompts_reasoning_gym():
    cfg = DataConfig(source="reasoning_gym", tasks=[TaskConfig(name="basic_arithmetic", size=20)], seed=3)
    table, rejected = build_prompts(cfg)
    assert rejected == []
    assert table.num_rows == 20
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"basic_arithmetic-3-{i}" for i in range(20)]
    for r in rows:
        assert r["task"] == "basic_arithmetic"
        assert r["reference"] is not None and r["reference"] != ""
        assert r["messages"][-1]["role"] == "user" and r["messages"][-1]["content"].strip()
        assert r["split"] == assign_split(r["id"], cfg)
        assert json.loads(r["metadata"])["source_dataset"] == "basic_arithmetic"  # a JSON object, not JSON text of one
        assert score(r["task"], r["reference"], r["reference"], r["metadata"]) == 1.0
        wrong = str(int(r["reference"]) + 1) if r["reference"].lstrip("-").isdigit() else r["reference"] + "0"
        assert score(r["task"], wrong, r["reference"], r["metadata"]) < 1.0
        # the local teacher's phrasing, after extraction, scores full marks
        assert score(r["task"], extract_answer(teacher_style_response(r["reference"])), r["reference"], r["metadata"]) == 1.0


def test_reasoning_gym_seed_changes_questions():
    a, _ = build_prompts(DataConfig(tasks=[TaskConfig(name="basic_arithmetic", size=5)], seed=0))
    b, _ = build_prompts(DataConfig(tasks=[TaskConfig(name="basic_arithmetic", size=5)], seed=1))
    qa = [m[-1]["content"] for m in a["messages"].to_pylist()]
    qb = [m[-1]["content"] for m in b["messages"].to_pylist()]
    assert qa != qb
    assert a["id"].to_pylist()[0] == "basic_arithmetic-0-0" and b["id"].to_pylist()[0] == "basic_arithmetic-1-0"


# ------------------------------------------------------------------ answers and scores ----


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is -4.", "-4"),
        ("answer is 12", "12"),
        ("Let me think. 3 + 4 = 7. The answer is 7", "7"),
        ("  42  ", "42"),  # no marker: the whole text, stripped
        ("no marker here.", "no marker here."),
        ("The answer is 3, no wait, the answer is 5.", "5"),  # the last marker wins
        ("The Answer is 9.", "9"),
        ("The answer is 3.5.", "3.5"),
        ("The answer is   x + 1  .  ", "x + 1"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_upper_case_marker():
    assert extract_answer("ANSWER IS 7") == "7"


@pytest.mark.parametrize("reference", ["-4", "12", "3.5", "Yes.", "a b c", "x\ny", "[1, 2]", "wait..."])
def test_teacher_style_round_trip(reference):
    response = teacher_style_response(reference)
    assert response != reference
    assert extract_answer(response) == reference


@pytest.fixture(autouse=True, scope="module")
def _stop_the_scoring_server():
    yield
    scoring.close()


def test_score_without_task_is_exact_match():
    assert score(None, " 7 ", "7", "{}") == 1.0
    assert score(None, "8", "7", "{}") == 0.0
    assert score("no_such_task_xyz", "7", "7", "{}") == 1.0
    assert score("no_such_task_xyz", "6", "7", "{}") == 0.0
    assert math.isnan(score(None, "7", None, "{}"))


def test_dev_split_takes_its_fraction_and_leaves_the_other_splits_as_they_were():
    plain, with_dev = DataConfig(eval_fraction=0.2), DataConfig(eval_fraction=0.2, dev_fraction=0.1)
    ids = [f"synthetic-{i}" for i in range(20_000)]
    a, b = [assign_split(i, plain) for i in ids], [assign_split(i, with_dev) for i in ids]
    assert abs(b.count("dev") / len(ids) - 0.1) <= 0.01 and "dev" not in a
    assert [x for x, y in zip(a, b) if y == "eval"] == ["eval"] * b.count("eval")  # eval items stay eval
    assert all(y in ("dev", x) for x, y in zip(a, b) if x != "eval")  # the rest only loses rows to dev


def test_split_by_question_puts_identical_questions_in_one_split():
    cfg = DataConfig(split_by="question", eval_fraction=0.3, dev_fraction=0.2)
    splits = {assign_split(f"id-{i}", cfg, "What is 2 + 2?") for i in range(200)}
    assert len(splits) == 1
    assert len({assign_split(f"id-{i}", DataConfig(eval_fraction=0.3), "What is 2 + 2?") for i in range(200)}) > 1


def test_held_out_fractions_must_leave_training_rows():
    with pytest.raises(ValueError, match="eval_fraction \\+ dev_fraction"):
        DataConfig(eval_fraction=0.6, dev_fraction=0.4)
