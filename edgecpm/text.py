"""Text <-> token ids with the bundle's `tokenizer.json` (the `tokenizers` library; no transformers).

BOS follows the tokenizer facts recorded at export (spec §8): MiniCPM chat templates do not emit `<s>`,
the tokenizer adds it when `add_bos_token` is set. We encode without the tokenizer's own post-processor
and add BOS ourselves, exactly once, so the result does not depend on how a tokenizer.json happened to
configure its post-processor, and a prompt that already starts with BOS does not get a second one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgecpm.errors import BundleError

# A token's text is complete once it does not end in U+FFFD, which the byte-level decoders produce for
# a UTF-8 sequence cut in the middle (a multi-byte character split over several tokens).
INCOMPLETE_CHARACTER = "\ufffd"


class TextTokenizer:
    def __init__(self, tokenizer: Any, *, bos_token: str | None = None, eos_token: str | None = None,
                 add_bos_token: bool = False):
        self._tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        if add_bos_token and self.bos_token_id is None:
            raise BundleError(f"add_bos_token is set but the BOS token {bos_token!r} is not in the vocabulary", field="tokenizer")

    @classmethod
    def from_json(cls, tokenizer_json: str, facts: Mapping[str, Any], *, path: str | Path | None = None) -> TextTokenizer:
        """`facts` holds bos_token, eos_token and add_bos_token (the manifest's `tokenizer` entry)."""
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception subclass from Rust
            raise BundleError(f"cannot be parsed by tokenizers: {str(exc)[:200]}", path=path) from None
        return cls(tokenizer, bos_token=facts.get("bos_token"), eos_token=facts.get("eos_token"),
                   add_bos_token=bool(facts.get("add_bos_token", False)))

    @classmethod
    def from_checkpoint(cls, files) -> TextTokenizer:
        """From a checkpoint's TokenizerFiles (export-time calibration and evaluation)."""
        facts = {"bos_token": files.bos_token, "eos_token": files.eos_token, "add_bos_token": files.add_bos_token}
        return cls.from_json(files.tokenizer_json, facts)

    @classmethod
    def from_file(cls, path: str | Path, facts: Mapping[str, Any]) -> TextTokenizer:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"cannot read the tokenizer ({exc.__class__.__name__})", path=path) from None
        return cls.from_json(text, facts, path=path)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) map to their ids."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos_token if add_bos is None else add_bos
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The tokenizer.json text (the grammar engine of structured output reads the vocabulary from it)."""
        return self._tokenizer.to_str()

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character.

    Decoding one token alone is wrong twice over: byte-level tokens may hold part of a UTF-8 character,
    and SentencePiece decoders drop a token's leading space at the start of a string. So we decode a
    short window of recent tokens with and without the new ones and emit the difference, and only once
    it is complete (the approach of vLLM's and transformers' streamers).
    """

    def __init__(self, tokenizer: TextTokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # tokens before this were already turned into text

    def add(self, token_id: int) -> str:
        """Appends a token; returns the newly completed text (often '' while a character is incomplete)."""
        self._ids.append(token_id)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._tokenizer.decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(INCOMPLETE_CHARACTER):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD, as a full decode gives)."""
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._tokenizer.decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""
