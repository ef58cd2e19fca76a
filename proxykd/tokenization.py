"""The one place that turns (messages, response) into token ids. Alignment, logits, distillation
and sampling all call it, so the proxy's soft labels index exactly the ids the student is fed."""

from __future__ import annotations


class TooLong(ValueError):
    pass


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already places any special tokens it wants (bos etc.); do not add them twice.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_ids(tokenizer, response: str) -> list[int]:
    """Response tokens plus eos, so the model learns to stop. Tokenised on their own and
    concatenated to the prompt ids: the prompt/response boundary is exact for every tokenizer."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_example(tokenizer, messages: list[dict], response: str, max_length: int) -> tuple[list[int], int]:
    """Return (input_ids, response_start); raise TooLong when prompt + response exceed max_length."""
    p = prompt_ids(tokenizer, messages)
    ids = p + response_ids(tokenizer, response)
    if len(ids) > max_length:
        raise TooLong(f"{len(ids)} tokens > max_length {max_length}")
    return ids, len(p)
