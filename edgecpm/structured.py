"""Structured output: a JSON schema, a regex or a grammar enforced while decoding (llguidance).

    engine.generate("Pick up the red cup", response_format=ResponseFormat.json_schema(COMMAND_SCHEMA))
    engine.generate("...", response_format={"type": "json_schema", "json_schema": {"name": "cmd", "schema": {...}}})

Before each token is sampled, every token that cannot continue a text matching the format gets logit
-inf, and stop tokens are allowed only where the text may end. The answer therefore always matches, or
generation ended first for a reason the result names ("length", "time", "cancelled", "context").

Why llguidance (docs/BENCHMARKS.md has the numbers): it computes each mask lazily from the tokenizer's
token trie with an Earley parser, so nothing is precomputed per schema (outlines-core builds an index
over the whole vocabulary for every new schema, which costs seconds for a real schema on a 49k
vocabulary), its per-token mask is tens of microseconds, it takes JSON schema, regex, Lark and GBNF in
one library, and it needs neither torch nor transformers (xgrammar requires both).

JSON is generated compact (no free whitespace): a small model given free whitespace can emit newlines
until it runs out of tokens, and a robot parses compact JSON just as well.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecpm.errors import GenerationError

if TYPE_CHECKING:
    from edgecpm.text import TextTokenizer

FORMAT_KINDS = ("text", "json_object", "json_schema", "regex", "grammar")
# llguidance's JSON compiler options: compact separators, see the module docstring.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
MAX_FORMAT_CHARS = 256 * 1024


class ResponseFormatError(GenerationError):
    """A response format that is malformed or that the grammar compiler rejects."""

    def __init__(self, message: str):
        super().__init__(message, field="response_format")


@dataclass(frozen=True)
class ResponseFormat:
    """What the answer must look like. `kind`: text (anything), json_object (any JSON object),
    json_schema (`schema`), regex (`pattern`, matched in full) or grammar (`grammar`: Lark or GBNF)."""

    kind: str = "text"
    schema: Mapping[str, Any] | None = None
    pattern: str | None = None
    grammar: str | None = None
    name: str | None = None

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], name: str | None = None) -> ResponseFormat:
        return cls("json_schema", schema=schema, name=name).validate()

    @classmethod
    def json_object(cls) -> ResponseFormat:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> ResponseFormat:
        return cls("regex", pattern=pattern).validate()

    @classmethod
    def from_grammar(cls, grammar: str) -> ResponseFormat:
        return cls("grammar", grammar=grammar).validate()

    @classmethod
    def parse(cls, value: ResponseFormat | Mapping[str, Any] | None) -> ResponseFormat | None:
        """A ResponseFormat from itself or the OpenAI request shape:
        {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}, {"type": "json_object"},
        {"type": "text"}, and the extensions {"type": "regex", "regex": ...}, {"type": "grammar", "grammar": ...}."""
        if value is None or isinstance(value, ResponseFormat):
            return value.validate() if value is not None else None
        if not isinstance(value, Mapping):
            raise ResponseFormatError(f"must be an object with a 'type' (got {type(value).__name__})")
        kind = value.get("type")
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
                raise ResponseFormatError("json_schema must be an object with a 'schema' object")
            return cls("json_schema", schema=spec.get("schema", {}), name=spec.get("name")).validate()
        if kind in ("regex", "grammar"):
            text = value.get(kind)
            return cls(kind, pattern=text if kind == "regex" else None, grammar=text if kind == "grammar" else None).validate()
        if kind in ("text", "json_object"):
            return cls(kind)
        raise ResponseFormatError(f"type must be one of {', '.join(FORMAT_KINDS)} (got {kind!r})")

    def validate(self) -> ResponseFormat:
        if self.kind not in FORMAT_KINDS:
            raise ResponseFormatError(f"kind must be one of {', '.join(FORMAT_KINDS)} (got {self.kind!r})")
        if self.kind == "json_schema":
            if not isinstance(self.schema, Mapping):
                raise ResponseFormatError("a json_schema format needs a schema object")
            if len(json.dumps(self.schema)) > MAX_FORMAT_CHARS:
                raise ResponseFormatError(f"the schema is longer than {MAX_FORMAT_CHARS} characters")
        for kind, text in (("regex", self.pattern), ("grammar", self.grammar)):
            if self.kind == kind and (not isinstance(text, str) or not text or len(text) > MAX_FORMAT_CHARS):
                raise ResponseFormatError(f"a {kind} format needs a non-empty string of at most {MAX_FORMAT_CHARS} characters")
        return self

    @property
    def constrains(self) -> bool:
        return self.kind != "text"

    def llguidance_grammar(self) -> str:
        """The grammar text llguidance's matcher takes."""
        import llguidance

        try:
            if self.kind == "json_object":
                return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
            if self.kind == "json_schema":
                return llguidance.LLMatcher.grammar_from_json_schema(dict(self.schema or {}), defaults=JSON_OPTIONS)
            if self.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.pattern or "")
            if self.kind == "grammar":
                return llguidance.grammar_from("grammar", self.grammar or "")
        except (ValueError, TypeError) as exc:
            raise ResponseFormatError(_one_line(exc)) from None
        raise ResponseFormatError(f"a {self.kind} format constrains nothing")


def lark_json(schema: Mapping[str, Any]) -> str:
    """A Lark rule body that matches JSON valid for `schema` (compact), for grammars built around JSON."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, separators=(",", ":"))


class GrammarConstraint:
    """One generation's constraint: an llguidance matcher plus a reusable bitmask buffer."""

    def __init__(self, matcher: Any, mask_words: int):
        self._matcher = matcher
        self._bits = np.zeros((mask_words,), dtype=np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:logits.shape[-1]].view(bool)
        if not allowed.any():
            raise GenerationError(f"response_format: no token can continue the text ({self._error() or 'dead end'})")
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def advance(self, token_id: int) -> None:
        if not self._matcher.consume_token(int(token_id)):
            raise GenerationError(f"response_format: token {token_id} was refused ({self._error()})")

    @property
    def finished(self) -> bool:
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    def _error(self) -> str:
        return _one_line(self._matcher.get_error() or "")


class ConstraintCompiler:
    """Builds constraints for one tokenizer. llguidance's tokenizer view (a token trie over the whole
    vocabulary) is built once, on first use, and shared by every constraint."""

    def __init__(self, tokenizer: TextTokenizer, *, vocab_size: int, stop_token_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = [int(t) for t in stop_token_ids]
        self._lock = threading.Lock()
        self._compiled: Any = None
        self._mask_words = 0

    @property
    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._compiled is None:
                from edgecpm.optional import require

                llguidance = require("llguidance", "serve", "structured output (response_format)")
                tokenizer_json = self._tokenizer.to_json()
                compiled = llguidance.LLTokenizer(tokenizer_json, n_vocab=self._vocab_size,
                                                  eos_token=self._stop_token_ids or None)
                self._mask_words = (compiled.vocab_size + 31) // 32  # the only size the matcher accepts
                self._compiled = compiled
            return self._compiled

    def constraint(self, response_format: ResponseFormat | Mapping[str, Any] | None) -> GrammarConstraint | None:
        """A fresh constraint for one generation, or None for free text. Bad formats fail here, at the call."""
        chosen = ResponseFormat.parse(response_format)
        if chosen is None or not chosen.constrains:
            return None
        return self.from_grammar(chosen.llguidance_grammar())

    def from_grammar(self, grammar: str) -> GrammarConstraint:
        import llguidance

        tokenizer = self.ll_tokenizer
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ResponseFormatError(_one_line(messages[0] if messages else "the grammar is invalid"))
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ResponseFormatError(_one_line(matcher.get_error()))
        return GrammarConstraint(matcher, self._mask_words)


def _one_line(value: Any) -> str:
    text = str(value).strip()
    return text.splitlines()[0][:300] if text else "unknown error"
