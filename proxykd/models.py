"""Model folders: build tiny Llamas and a byte-level tokenizer offline, resolve configured models to
Hugging Face folders, and check that proxy and student share a vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

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
    """Return a Hugging Face folder (or hub id) for the configured model; tiny models are built
    into `out_dir` once (atomically, so a crash never leaves a half-built model behind)."""
    if cfg.path is not None:
        return cfg.path
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return str(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = build_byte_tokenizer(tmp)
    build_tiny_llama(cfg.tiny, tokenizer, tmp, seed)
    os.replace(tmp, out_dir)
    return str(out_dir)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
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

    cfg = AutoConfig.from_pretrained(path)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(getattr(text_cfg, "max_position_embeddings", None) or 2048)
