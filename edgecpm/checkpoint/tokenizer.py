"""Tokenizer files from an HF directory: tokenizer.json (or a converted tokenizer.model) and chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgecpm.checkpoint.base import TokenizerFiles
from edgecpm.errors import CheckpointError

MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
MAX_TEMPLATE_CHARS = 1024 * 1024


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def pick_chat_template(value: Any, path: Path) -> str | None:
    """A template string, or the `default` entry of a list of named templates."""
    if value is None:
        return None
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        value = named.get("default", next(iter(named.values()), None))
    if not isinstance(value, str):
        raise CheckpointError("chat_template is not a string", path=path, field="chat_template")
    if len(value) > MAX_TEMPLATE_CHARS:
        raise CheckpointError(f"chat_template is longer than {MAX_TEMPLATE_CHARS} characters", path=path, field="chat_template")
    return value


def has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    config_path = directory / "tokenizer_config.json"
    return config_path.is_file() and '"chat_template"' in config_path.read_text(encoding="utf-8", errors="replace")


def read_hf_tokenizer(directory: Path) -> TokenizerFiles | None:
    from edgecpm.checkpoint.hf import read_json

    config_path = directory / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise CheckpointError("expected a JSON object", path=config_path)
    tokenizer_json = _read_tokenizer_json(directory)
    if tokenizer_json is None:
        return None
    template = pick_chat_template(config.get("chat_template"), config_path)
    jinja_path = directory / "chat_template.jinja"
    json_template_path = directory / "chat_template.json"
    if template is None and jinja_path.is_file():
        template = pick_chat_template(jinja_path.read_text(encoding="utf-8"), jinja_path)
    elif template is None and json_template_path.is_file():
        template = pick_chat_template(read_json(json_template_path).get("chat_template"), json_template_path)
    add_bos = config.get("add_bos_token")
    return TokenizerFiles(
        tokenizer_json=tokenizer_json,
        chat_template=template,
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
        # LlamaTokenizer (every MiniCPM release) adds BOS unless the config says otherwise (spec §8).
        add_bos_token=bool(add_bos) if add_bos is not None else config.get("tokenizer_class", "").startswith("Llama"),
        add_eos_token=bool(config.get("add_eos_token", False)),
        source=str(directory),
    )


def _read_tokenizer_json(directory: Path) -> str | None:
    path = directory / "tokenizer.json"
    if path.is_file():
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise CheckpointError(f"file is larger than {MAX_TOKENIZER_BYTES >> 20} MiB", path=path)
        text = path.read_text(encoding="utf-8")
        _check_tokenizer(text, path)
        return text
    spm_path = directory / "tokenizer.model"
    if spm_path.is_file():
        return _convert_sentencepiece(spm_path)
    return None


def _check_tokenizer(text: str, path: Path) -> None:
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception subclass from Rust
        raise CheckpointError(f"cannot be parsed by tokenizers: {str(exc)[:200]}", path=path) from None


def _convert_sentencepiece(path: Path) -> str:
    """SentencePiece model -> tokenizers JSON with transformers' Llama converter (the HF-standard mapping)."""
    from edgecpm.optional import require

    for module in ("transformers", "sentencepiece"):  # before the try: missing packages are not a bad model file
        require(module, "export", "converting a SentencePiece tokenizer.model")
    try:
        from transformers import LlamaTokenizer

        tokenizer = LlamaTokenizer(vocab_file=str(path), legacy=True)
        return tokenizer.backend_tokenizer.to_str()
    except Exception as exc:
        raise CheckpointError(f"cannot convert the SentencePiece model: {str(exc)[:200]}", path=path) from None


def tokenizer_json_from_object(tokenizer: Any) -> str:
    return tokenizer.to_str() if hasattr(tokenizer, "to_str") else json.dumps(tokenizer)
