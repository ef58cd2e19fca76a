"""Scoring never executes data: reasoning-gym's scorers run in an isolated, limited process; an
item that hangs, crashes or tries to act is a recorded failure with its id, and normal items score
exactly as reasoning-gym scores them."""

import json
import math
import time

import pyarrow as pa
import pytest

from proxykd import scoring
from proxykd.data import PROMPT_SCHEMA
from proxykd.scoring import Scored, score_many


def _row(rid, task, answer, reference, **metadata):
    return {"id": rid, "task": task, "answer": answer, "reference": reference, "metadata": json.dumps(metadata)}


def test_normal_items_score_exactly_as_reasoning_gym_scores_them():
    import reasoning_gym

    rows, expected = [], []
    for task in ("basic_arithmetic", "bitwise_arithmetic", "number_sorting", "countdown"):
        for i, entry in enumerate(reasoning_gym.create_dataset(task, size=3, seed=1)):
            meta = json.loads(json.dumps(entry["metadata"], default=str))
            for answer in (str(entry["answer"]), "0", ""):
                rows.append({"id": f"{task}-{i}", "task": task, "answer": answer, "reference": str(entry["answer"]),
                             "metadata": json.dumps(meta)})
                # (in this process: trusted, generated rows)
                expected.append(float(reasoning_gym.get_score_answer_fn(task)(
                    answer, {"answer": str(entry["answer"]), "metadata": meta})))
    got = score_many(rows)
    assert [s.score for s in got] == expected and not any(s.error for s in got)
    assert expected.count(1.0) >= 12 and min(expected) < 1.0  # right and wrong answers both checked


def test_rows_without_a_task_or_a_reference_are_scored_without_a_process(monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("no scoring process for these rows")

    monkeypatch.setattr(scoring, "_ask", no_process)
    got = score_many([_row("a", None, " 7 ", "7"), _row("b", None, "8", "7"), _row("c", "countdown", "7", None)])
    assert got[:2] == [Scored(1.0, None), Scored(0.0, None)]
    assert math.isnan(got[2].score) and got[2].error is None


def test_code_in_metadata_references_or_answers_is_refused_and_recorded(tmp_path):
    marks = [tmp_path / f"pwned-{i}" for i in range(3)]
    victim = tmp_path / "paid-for.parquet"
    victim.write_bytes(b"keep me")
    rows = [
        # bitwise_arithmetic evals its metadata's problem
        _row("meta-open", "bitwise_arithmetic", "1", "1", problem=f"open({str(marks[0])!r}, 'w').write('x') and 1"),
        # number_sorting evals a reference that is not JSON
        _row("ref-system", "number_sorting", "[1]", f"__import__('os').system('touch {marks[1]}')", direction="ascending"),
        # countdown parses the model's answer with sympy
        _row("answer-popen", "countdown", f"__import__('subprocess').Popen(['touch', '{marks[2]}'])", "3",
             numbers=[1, 2], target=3),
        _row("meta-remove", "bitwise_arithmetic", "1", "1", problem=f"__import__('os').remove({str(victim)!r})"),
        _row("crash", "bitwise_arithmetic", "1", "1", problem="__import__('os')._exit(3)"),
        _row("normal", "countdown", "1+2", "3", numbers=[1, 2], target=3),  # a fresh worker scores it
    ]
    got = score_many(rows)
    for row, s in zip(rows[:4], got[:4]):
        assert s.score == 0.0 and s.error.startswith(f"score of {row['id']} failed: the scorer tried ")
        assert "(refused)" in s.error
    assert "open(" in got[0].error and "os.system" in got[1].error and "subprocess.Popen" in got[2].error
    assert "os.remove" in got[3].error
    assert got[4].score == 0.0 and "crash failed: the scoring worker died" in got[4].error
    assert got[5] == Scored(1.0, None)
    assert not any(m.exists() for m in marks) and victim.read_bytes() == b"keep me"


def test_an_answer_that_hangs_the_scorer_is_a_timeout_failure_within_the_limit():
    rows = [_row("warm", "countdown", "1+2", "3", numbers=[1, 2], target=3),  # the server is up
            _row("bomb", "countdown", "9**9**9**9", "3", numbers=[9, 9, 9, 9], target=3),
            _row("meta-bomb", "bitwise_arithmetic", "1", "1", problem="9**9**9**9"),
            _row("after", "countdown", "1+2", "3", numbers=[1, 2], target=3)]
    score_many(rows[:1], timeout_s=2.0)
    started = time.monotonic()
    got = score_many(rows, timeout_s=2.0)
    assert time.monotonic() - started < 2 * 2.0 + 8  # two timeouts, two cheap re-forks
    assert got[1] == Scored(0.0, "score of bomb failed: timed out after 2 s (counted as wrong)")
    assert got[2] == Scored(0.0, "score of meta-bomb failed: timed out after 2 s (counted as wrong)")
    assert got[0] == got[3] == Scored(1.0, None)


def test_memory_is_limited():
    # Without the limit this allocates 1 GiB and scores 1 (the answer is right); with it the
    # allocation fails inside the scorer, which then counts the answer wrong.
    got = score_many([_row("big", "bitwise_arithmetic", "1", "1", problem="len(bytearray(2**30)) // 2**30")],
                     memory_mb=256)
    assert got == [Scored(0.0, None)]
    assert score_many([_row("small", "bitwise_arithmetic", "1", "1", problem="len(bytearray(2**20)) // 2**20")],
                      memory_mb=256) == [Scored(1.0, None)]


def test_the_scoring_process_has_no_secrets(monkeypatch):
    monkeypatch.setenv("PROXYKD_SCORING_SECRET", "sk-do-not-leak")
    scoring.close()  # a new server, started with the secret in this process's environment
    probe = "__import__('os').environ.get('PROXYKD_SCORING_SECRET', 'absent') == 'absent'"
    assert score_many([_row("env", "bitwise_arithmetic", "1", "1", problem=f"int({probe})")]) == [Scored(1.0, None)]


def test_scored_results_carry_score_errors_with_the_columns_report_reads():
    from proxykd.evaluate import scored_results

    prompts = pa.Table.from_pylist([
        {"id": "ok", "messages": [{"role": "user", "content": "1+2 from [1, 2]"}], "reference": "3", "split": "eval",
         "task": "countdown", "metadata": json.dumps({"numbers": [1, 2], "target": 3})},
        {"id": "evil", "messages": [{"role": "user", "content": "x"}], "reference": "3", "split": "eval",
         "task": "countdown", "metadata": json.dumps({"numbers": [1, 2], "target": 3})},
        {"id": "plain", "messages": [{"role": "user", "content": "y"}], "reference": "yes", "split": "eval",
         "task": None, "metadata": "{}"},
    ], schema=PROMPT_SCHEMA)
    out = scored_results(prompts, "student", [
        {"id": "ok", "text": "The answer is 1+2.", "teacher_ll": -0.5},
        {"id": "evil", "text": "The answer is __import__('os').system('true')."},
        {"id": "plain", "text": "The answer is yes."},
    ])
    assert [list(r) for r in out] == [["id", "model", "generation", "answer", "reference", "task", "score",
                                       "teacher_ll", "teacher_top1", "score_error"]] * 3
    assert [(r["id"], r["score"]) for r in out] == [("ok", 1.0), ("evil", 0.0), ("plain", 1.0)]
    assert out[0]["score_error"] is None and out[2]["score_error"] is None
    assert out[1]["score_error"].startswith("score of evil failed: the scorer tried os.system")
    assert out[0]["teacher_ll"] == -0.5 and math.isnan(out[1]["teacher_ll"])


@pytest.fixture(autouse=True, scope="module")
def _stop_the_server():
    yield
    scoring.close()
