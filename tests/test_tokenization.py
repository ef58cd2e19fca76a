"""Tests for proxykd.tokenization, proxykd.encode and the vocabulary check of proxykd.models,
on tiny offline models with the byte-level tokenizer (no network, no Ray, no vLLM)."""

import shutil

import pyarrow as pa
import pytest

from proxykd.config import ModelConfig, TinyModelSpec
from proxykd.data import PROMPT_SCHEMA
from proxykd.encode import encode_responses, encode_split, join_teacher
from proxykd.models import TokenizerMismatch, check_same_vocab, load_tokenizer, materialize_model
from proxykd.tokenization import TooLong, encode_example, prompt_ids, response_ids

N_SPECIAL = 6  # <pad> <s> </s> <|system|> <|user|> <|assistant|>
VOCAB = N_SPECIAL + 256  # plus one token per byte


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return materialize_model(ModelConfig(tiny=TinyModelSpec()), tmp_path_factory.mktemp("models") / "m", seed=0)


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


MSGS = [{"role": "user", "content": "What is 2+2?"}]
MSGS_SYS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo ✓"}]


def test_materialize_model_folder(model_dir, tok, tmp_path):
    from pathlib import Path

    p = Path(model_dir)
    assert (p / "config.json").exists() and (p / "tokenizer_config.json").exists()
    assert not p.with_name(p.name + ".tmp").exists()
    assert len(tok) == VOCAB
    # a second call reuses the folder
    assert materialize_model(ModelConfig(tiny=TinyModelSpec()), p, seed=1) == model_dir
    # a configured folder is used where it is (a hub id resolves to its snapshot: tests/test_models.py)
    assert materialize_model(ModelConfig(path=model_dir), tmp_path / "x", seed=0) == model_dir
    assert not (tmp_path / "x").exists()


def test_prompt_ids_by_hand(tok):
    ids = prompt_ids(tok, MSGS)
    user, asst, eos = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "</s>"])
    # byte tokenizer without merges: <|user|>, one id per byte of the content, </s>, <|assistant|>
    assert len(ids) == 1 + len(MSGS[0]["content"].encode()) + 1 + 1
    assert ids[0] == user and ids[-2] == eos and ids[-1] == asst
    assert tok.decode(ids[1:-2]) == MSGS[0]["content"]

    ids2 = prompt_ids(tok, MSGS_SYS)
    system = tok.convert_tokens_to_ids("<|system|>")
    n_sys, n_user = len("Be brief.".encode()), len("héllo ✓".encode())
    assert len(ids2) == 1 + n_sys + 1 + 1 + n_user + 1 + 1
    assert ids2[0] == system and ids2[n_sys + 2] == user
    assert ids2.count(tok.bos_token_id) == 0  # no special tokens added twice


@pytest.mark.parametrize("messages", [MSGS, MSGS_SYS])
@pytest.mark.parametrize("response", ["The answer is 4.", "naïve — ünïcode ✓\nline two", "x"])
def test_encode_example(tok, messages, response):
    ids, start = encode_example(tok, messages, response, max_length=1000)
    p = prompt_ids(tok, messages)
    assert start == len(p)
    assert ids[:start] == p
    assert ids[start:] == response_ids(tok, response)
    assert ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")
    assert len(ids) - start == len(response.encode()) + 1  # one id per byte, plus eos
    assert tok.decode(ids[start:-1]) == response


def test_encode_example_too_long_boundary(tok):
    n = len(prompt_ids(tok, MSGS)) + len("abc".encode()) + 1
    ids, _ = encode_example(tok, MSGS, "abc", max_length=n)  # exactly max_length: fine
    assert len(ids) == n
    with pytest.raises(TooLong) as e:
        encode_example(tok, MSGS, "abc", max_length=n - 1)
    assert str(n) in str(e.value) and str(n - 1) in str(e.value)
    assert isinstance(e.value, ValueError)


def _pairs_table(rows):
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("id", pa.string()),
                ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                ("response", pa.string()),
            ]
        ),
    )


def test_encode_responses(tok):
    rows = [
        {"id": "a", "messages": MSGS, "response": "4"},
        {"id": "long", "messages": MSGS, "response": "y" * 200},
        {"id": "b", "messages": MSGS_SYS, "response": "hi there"},
    ]
    out, rejected = encode_responses(tok, _pairs_table(rows), max_length=64)
    assert out["id"].to_pylist() == ["a", "b"]
    assert out.schema.field("input_ids").type == pa.list_(pa.int32())
    assert out.schema.field("response_start").type in (pa.int32(), pa.int64())
    assert out["response"].to_pylist() == ["4", "hi there"]
    for row, src in zip(out.to_pylist(), [rows[0], rows[2]]):
        ids, start = encode_example(tok, src["messages"], src["response"], 64)
        assert row["input_ids"] == ids
        assert row["response_start"] == start
        assert tok.decode(row["input_ids"][start:-1]) == src["response"]
    assert len(rejected) == 1
    assert rejected[0]["id"] == "long"
    assert "too long" in rejected[0]["error"]


def test_encode_responses_all_rejected(tok):
    rows = [{"id": "long", "messages": MSGS, "response": "y" * 200}]
    out, rejected = encode_responses(tok, _pairs_table(rows), max_length=16)
    assert out.num_rows == 0
    assert [r["id"] for r in rejected] == ["long"]


def _prompts(rows):
    full = [
        {"id": rid, "messages": [{"role": "user", "content": f"q {rid}"}], "reference": None, "split": split,
         "task": None, "metadata": "{}"}
        for rid, split in rows
    ]
    return pa.Table.from_pylist(full, schema=PROMPT_SCHEMA)


def test_join_teacher():
    prompts = _prompts([("s3", "student"), ("s1", "student"), ("w1", "warmup"), ("s2", "student"),
                        ("s4", "student"), ("e1", "eval")])
    teacher = pa.table(
        {
            "id": ["w1", "s1", "s3", "e1", "zz", "s4"],  # s2 has no teacher response; zz is not a prompt
            "response": ["rw1", "rs1", "rs3", "re1", "rzz", "rs4 cut"],
            "finish_reason": ["stop", "stop", "stop", "stop", "stop", "length"],
        }
    )
    out, rejected = join_teacher(prompts, teacher, "student")
    assert out.column_names == ["id", "messages", "response"]
    assert out["id"].to_pylist() == ["s1", "s3"]  # sorted by id
    assert out["response"].to_pylist() == ["rs1", "rs3"]
    assert out["messages"].to_pylist() == [[{"role": "user", "content": "q s1"}], [{"role": "user", "content": "q s3"}]]
    assert {r["id"]: r["error"] for r in rejected} == {
        "s2": "no teacher response", "s4": "teacher response cut off at teacher.max_tokens"}
    w, _ = join_teacher(prompts, teacher, "warmup")
    assert w["id"].to_pylist() == ["w1"] and w["response"].to_pylist() == ["rw1"]


def test_join_teacher_empty_split():
    prompts = _prompts([("s1", "student"), ("w1", "warmup")])
    teacher = pa.table({"id": ["w1"], "response": ["rw1"], "finish_reason": ["stop"]})
    out, rejected = join_teacher(prompts, teacher, "student")
    assert out.num_rows == 0 and [r["id"] for r in rejected] == ["s1"]
    assert out.column_names == ["id", "messages", "response"]


def test_encode_split_reports_a_row_the_chat_template_refuses(tok):
    prompts = _prompts([("ok", "student"), ("bad", "student")])
    # a template that raises on a marker, as real templates do for unsupported roles
    tok2 = type(tok).from_pretrained(tok.name_or_path)
    tok2.chat_template = (
        "{% for m in messages %}{% if 'BAD' in m['content'] %}{{ raise_exception('unsupported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    prompts = prompts.set_column(1, "messages", pa.array(
        [[{"role": "user", "content": "fine"}], [{"role": "user", "content": "BAD"}]], prompts.schema.field("messages").type))
    teacher = pa.table({"id": ["ok", "bad"], "response": ["a", "b"], "finish_reason": ["stop", "stop"]})
    rows, rejected = encode_split(tok2, prompts, teacher, "student", 64)
    assert rows["id"].to_pylist() == ["ok"]
    assert [r["id"] for r in rejected] == ["bad"] and "cannot tokenise" in rejected[0]["error"]


def test_join_then_encode(tok):
    prompts = _prompts([("b", "proxy"), ("a", "proxy"), ("c", "student")])
    teacher = pa.table({"id": ["a", "b", "c"], "response": ["ra", "rb", "rc"], "finish_reason": ["stop"] * 3})
    out, rejected = encode_split(tok, prompts, teacher, "proxy", max_length=128)
    assert rejected == []
    assert out["id"].to_pylist() == ["a", "b"]
    for row in out.to_pylist():
        assert tok.decode(row["input_ids"][row["response_start"] : -1]) == "r" + row["id"]


def test_check_same_vocab_passes_for_tiny_models(model_dir, tmp_path):
    other = materialize_model(
        ModelConfig(tiny=TinyModelSpec(hidden_size=128, num_heads=4, num_layers=1)), tmp_path / "other", seed=1
    )
    check_same_vocab(model_dir, other)  # must not raise
    check_same_vocab(other, model_dir)


def test_check_same_vocab_mismatch(model_dir, tmp_path):
    t = load_tokenizer(model_dir)
    t.add_tokens(["<extra_token>"])
    bigger = tmp_path / "bigger"
    t.save_pretrained(str(bigger))
    assert len(load_tokenizer(str(bigger))) == VOCAB + 1
    with pytest.raises(TokenizerMismatch) as e:
        check_same_vocab(model_dir, str(bigger))
    msg = str(e.value)
    assert str(VOCAB) in msg and str(VOCAB + 1) in msg
    assert model_dir in msg and str(bigger) in msg
    assert isinstance(e.value, ValueError)


def test_check_same_vocab_same_size_different_ids(model_dir, tmp_path):
    """Same number of tokens but two ids swapped: still a mismatch (soft labels index by id)."""
    import json

    swapped = tmp_path / "swapped"
    shutil.copytree(model_dir, swapped)
    tj = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tj))
    assert len(load_tokenizer(str(swapped))) == VOCAB
    with pytest.raises(TokenizerMismatch):
        check_same_vocab(model_dir, str(swapped))
