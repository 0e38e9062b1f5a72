"""Tokenizers loaded the same way everywhere: with a pad token and right padding, as training needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmops.errors import UsageError, first_line


def prepare_tokenizer(tok: Any) -> Any:
    """Training needs a pad token and right padding; GGUF tokenizers often come with neither."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise cannot_load(path, err) from None
    return prepare_tokenizer(tok)


def tokenizer_folder(adapter: Path | None, base: str) -> str:
    """An adapter's own tokenizer when it saved one (slmops does, with any added tokens), else the base's."""
    if adapter is not None and (adapter / "tokenizer_config.json").is_file():
        return str(adapter)
    return base


def cannot_load(path: str, err: Exception) -> UsageError:
    return UsageError(f"cannot load model {path!r} ({first_line(err)}); pass a local Hugging Face folder, a .gguf "
                      f"file, a catalogue alias (slmops models list), or a hub id already in the Hugging "
                      f"Face cache (HF_HUB_OFFLINE=1 skips the network look-up)")
