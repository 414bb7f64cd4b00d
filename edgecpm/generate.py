"""One generation loop over any Backend, in three layers.

    generate_steps(backend, prompt_ids, settings, tokenizer=...)  token ids in, one event per token out
    stream(backend, tokenizer, prompt, settings)                  text in, the same events out
    generate(backend, tokenizer, prompt, settings) -> str         the text alone

Every event carries the token id, the text it completed (possibly '' while a UTF-8 character or a
possible stop string is held back) and how long it took; the last event has no token and carries the
finish reason and a `GenerationResult` with the timings.

Stop token ids are taken from the settings only: callers that know the model (the Engine) add the
bundle's eos ids. An `Interrupt` (edgecpm.control) stops a generation from outside within one decode
step ("cancelled", "time"); a `TokenConstraint` (edgecpm.structured) masks the logits so the text
follows a JSON schema, regex or grammar. Passing a `KVSession` instead of a bare backend lets consecutive calls reuse the KV
cache of their common prefix (chat turns, a robot loop with a fixed system prompt).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgecpm.control import Interrupt
from edgecpm.errors import GenerationError
from edgecpm.sampling import Sampler, build_sampler

if TYPE_CHECKING:
    from edgecpm.backend import Backend
    from edgecpm.text import TextTokenizer

TRUNCATE_POLICIES = (None, "left")


@dataclass(frozen=True)
class GenerationSettings:
    """How to pick tokens and when to stop. Temperature 0 is greedy; top_k 0 and top_p 1 disable those."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    truncate: str | None = None  # None: a prompt too long for the context is an error; "left": keep its end
    max_time: float | None = None  # seconds from the call (queueing included); then finish_reason "time"

    def validate(self) -> GenerationSettings:
        checks = [
            (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
             f"max_new_tokens must be at least 1 (got {self.max_new_tokens})"),
            (_is_number(self.temperature) and self.temperature >= 0,
             f"temperature must be 0 (greedy) or positive (got {self.temperature})"),
            (_is_int(self.top_k) and self.top_k >= 0, f"top_k must be 0 (off) or a positive integer (got {self.top_k})"),
            (_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be positive (got {self.repetition_penalty})"),
            (self.seed is None or _is_int(self.seed) and self.seed >= 0,
             f"seed must be a non-negative integer (got {self.seed})"),
            (all(isinstance(s, str) and s for s in self.stop_strings), "stop strings must be non-empty strings"),
            (all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop token ids must be non-negative integers"),
            (self.truncate in TRUNCATE_POLICIES, f"truncate must be None or 'left' (got {self.truncate!r})"),
            (self.max_time is None or _is_number(self.max_time) and self.max_time > 0,
             f"max_time must be a positive number of seconds (got {self.max_time})"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(message)
        return self

    def with_options(self, **options: Any) -> GenerationSettings:
        """A copy with the given fields changed (None means "not given"); unknown names are an error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise GenerationError(f"unknown generation option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        for name in ("stop_token_ids", "stop_strings"):
            if name in options and options[name] is not None:
                value = options[name]
                options[name] = (value,) if isinstance(value, (str, int)) else tuple(value)
        return replace(self, **{k: v for k, v in options.items() if v is not None})

    def sampler(self) -> Sampler:
        return build_sampler(temperature_value=self.temperature, top_k_value=self.top_k, top_p_value=self.top_p,
                             repetition=self.repetition_penalty, seed=self.seed)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # `x == x` is False for NaN, which would otherwise slip through every comparison.
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and value == value


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens; a stop token that ended generation is not included
    prompt_token_ids: list[int]
    finish_reason: str
    prefill_tokens: int  # prompt tokens actually run (fewer than the prompt when a cached prefix was reused)
    prefill_seconds: float
    decode_steps: int
    decode_seconds: float

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "new_tokens": self.new_tokens, "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


@dataclass(frozen=True)
class GenerationEvent:
    text: str  # text completed by this step ('' while held back); concatenated, the events give the answer
    token_id: int | None = None  # None on the final event
    seconds: float = 0.0  # time to produce this token: prefill (first token) or one decode step, plus sampling
    # final event only: "stop" (eos, or a response format completed), "stop_string", "length", "context",
    # "time" (deadline or max_time) or "cancelled"
    finish_reason: str | None = None
    result: GenerationResult | None = field(default=None, repr=False)  # set on the final event only


class TokenConstraint(Protocol):
    """Decides which tokens may come next (structured output). One instance serves one generation."""

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token that may not come next set to -inf (stop tokens allowed only
        where the constrained text may end)."""
        ...

    def advance(self, token_id: int) -> None: ...

    @property
    def finished(self) -> bool:
        """The constrained text is complete and nothing may follow it."""
        ...


class KVSession:
    """A backend plus the token ids its KV state holds, so the next prompt prefills only what is new.

    While a backend call runs the contents are unknown: if it is interrupted (Ctrl-C) or fails, the next
    prompt starts from an empty state instead of trusting a half-written cache.
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self._tokens: list[int] | None = None  # None: unknown, reset before use
        self.generation = 0  # bumped by every prefill, so an older, unfinished stream knows it lost the state

    @property
    def max_context(self) -> int:
        return self.backend.max_context

    @property
    def position(self) -> int:
        return self.backend.position

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens or [])

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[np.ndarray, int]:
        """Logits after the whole prompt and how many prompt tokens had to run (the rest were cached)."""
        reused = self._reusable_prefix(prompt_ids)
        held, self._tokens = self._tokens, None
        if reused == 0:
            self.backend.reset()
        elif reused < len(held or []):
            self.backend.truncate(reused)
        self.generation += 1
        logits = self.backend.prefill(np.asarray(prompt_ids[reused:], dtype=np.int64))
        self._tokens = list(prompt_ids)
        return logits, len(prompt_ids) - reused

    def decode(self, token_id: int) -> np.ndarray:
        held, self._tokens = self._tokens, None  # unknown until the step returns (Ctrl-C mid-step)
        logits = self.backend.decode(int(token_id))
        if held is not None:
            held.append(int(token_id))  # in place: copying the history every token is quadratic
        self._tokens = held
        return logits

    def reset(self) -> None:
        self.generation += 1
        self._tokens = None
        self.backend.reset()
        self._tokens = []

    def _reusable_prefix(self, prompt_ids: Sequence[int]) -> int:
        held = self._tokens
        # Someone may have driven the backend directly; then its contents are not what we recorded.
        if held is None or self.backend.position != len(held):
            return 0
        common = 0
        for a, b in zip(held, prompt_ids):
            if a != b:
                break
            common += 1
        # At least one token must run: the backend only returns logits for the tokens it is given.
        return min(common, len(prompt_ids) - 1)


def fit_to_context(prompt_ids: Sequence[int], max_context: int, settings: GenerationSettings) -> list[int]:
    """The prompt, checked against the context; with truncate='left' its oldest tokens are dropped.

    Left truncation keeps room for the answer (max_new_tokens, but never more than half the context),
    since a prompt that fills the context could produce one token at most.
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise GenerationError("the prompt is empty")
    if settings.truncate == "left":
        budget = max_context - min(settings.max_new_tokens, max_context // 2)
        return prompt[-budget:] if len(prompt) > budget else prompt
    if len(prompt) > max_context:
        raise GenerationError(f"the prompt has {len(prompt)} tokens but the context holds {max_context}; "
                              "shorten it or let it be truncated (--truncate, truncate='left')")
    return prompt


class StopStringFilter:
    """Holds back text that could be the start of a stop string; reports the first complete one.

    Text is released only once it cannot be part of a stop string, so a stop string split over several
    tokens is never emitted, not even its first characters.
    """

    def __init__(self, stop_strings: Sequence[str]):
        self.stop_strings = [s for s in stop_strings if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found); after a hit the rest is dropped."""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            released, self._pending = self._pending[:min(hits)], ""
            return released, True
        keep = self._longest_partial_match()
        cut = len(self._pending) - keep
        released, self._pending = self._pending[:cut], self._pending[cut:]
        return released, False

    def release(self) -> str:
        """At the end of generation a partial match is just text."""
        released, self._pending = self._pending, ""
        return released

    def _longest_partial_match(self) -> int:
        longest = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest


def generate_steps(backend: Backend | KVSession, prompt_ids: Sequence[int], settings: GenerationSettings, *,
                   tokenizer: TextTokenizer, interrupt: Interrupt | None = None,
                   constraint: TokenConstraint | None = None) -> Iterator[GenerationEvent]:
    """Events for each generated token, then a final event. Arguments are checked here, before the first
    event is requested, so bad input fails at the call and not somewhere inside a consumer's loop.

    `interrupt` defaults to the settings' max_time counted from this call."""
    settings.validate()
    session = backend if isinstance(backend, KVSession) else KVSession(backend)
    prompt = fit_to_context(prompt_ids, session.max_context, settings)
    interrupt = interrupt if interrupt is not None else Interrupt.build(max_time=settings.max_time)
    return _steps(session, prompt, settings, tokenizer, interrupt, constraint)


def _steps(session: KVSession, prompt: list[int], settings: GenerationSettings, tokenizer: TextTokenizer,
           interrupt: Interrupt, constraint: TokenConstraint | None) -> Iterator[GenerationEvent]:
    early = interrupt.reason()
    if early is not None:  # cancelled or out of time before it began (e.g. while queued): no tokens
        result = GenerationResult(text="", token_ids=[], prompt_token_ids=prompt, finish_reason=early, prefill_tokens=0,
                                  prefill_seconds=0.0, decode_steps=0, decode_seconds=0.0)
        yield GenerationEvent(text="", finish_reason=early, result=result)
        return
    sample = settings.sampler()
    stop_ids = set(settings.stop_token_ids)
    stops = StopStringFilter(settings.stop_strings)
    detokenizer = tokenizer.detokenizer()
    history = list(prompt)  # what the repetition penalty looks at
    generated: list[int] = []
    texts: list[str] = []
    decode_steps, decode_seconds = 0, 0.0

    started = time.perf_counter()
    logits, prefill_tokens = session.prefill(prompt)
    prefill_seconds = time.perf_counter() - started
    generation = session.generation
    while True:
        if constraint is not None:
            logits = constraint.mask(logits)
        token = sample(logits, history)
        step_seconds = time.perf_counter() - started
        if decode_steps:
            decode_seconds += step_seconds
        if token in stop_ids:
            finish_reason = "stop"
            break
        if constraint is not None:
            constraint.advance(token)
        generated.append(token)
        history.append(token)
        text, hit_stop_string = stops.feed(detokenizer.add(token))
        texts.append(text)
        yield GenerationEvent(text=text, token_id=token, seconds=step_seconds)
        if hit_stop_string:
            finish_reason = "stop_string"
            break
        if constraint is not None and constraint.finished:
            finish_reason = "stop"  # the structured text is complete: the eos step it would take is saved
            break
        if len(generated) >= settings.max_new_tokens:
            finish_reason = "length"
            break
        if session.generation != generation:
            raise GenerationError("another generation started on the same backend; this stream cannot continue")
        if session.position >= session.max_context:
            finish_reason = "context"
            break
        interrupted = interrupt.reason()
        if interrupted is not None:
            finish_reason = interrupted
            break
        started = time.perf_counter()
        logits = session.decode(token)
        decode_steps += 1

    tail = ""
    if finish_reason != "stop_string":
        tail, hit_stop_string = stops.feed(detokenizer.flush())
        if hit_stop_string:
            finish_reason = "stop_string"
        else:
            tail += stops.release()
    texts.append(tail)
    result = GenerationResult(text="".join(texts), token_ids=generated, prompt_token_ids=prompt, finish_reason=finish_reason,
                              prefill_tokens=prefill_tokens, prefill_seconds=prefill_seconds, decode_steps=decode_steps,
                              decode_seconds=decode_seconds)
    yield GenerationEvent(text=tail, finish_reason=finish_reason, result=result)


def stream(backend: Backend | KVSession, tokenizer: TextTokenizer, prompt: str,
           settings: GenerationSettings) -> Iterator[GenerationEvent]:
    """Events for a text prompt, fed as is (BOS added per the tokenizer facts)."""
    if not isinstance(prompt, str) or not prompt:
        raise GenerationError("the prompt is empty")
    return generate_steps(backend, tokenizer.encode(prompt), settings, tokenizer=tokenizer)


def generate(backend: Backend | KVSession, tokenizer: TextTokenizer, prompt: str, settings: GenerationSettings) -> str:
    return "".join(event.text for event in stream(backend, tokenizer, prompt, settings))


def final_result(events: Iterator[GenerationEvent]) -> GenerationResult:
    """Runs a stream to the end and returns its result."""
    for event in events:
        if event.result is not None:
            return event.result
    raise GenerationError("the generation stream ended without a result")
