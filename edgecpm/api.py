"""The Python API: `edgecpm.load(bundle)` -> Engine. Torch-free: numpy, tokenizers, jinja2, onnxruntime.

    engine = edgecpm.load("bundles/minicpm4-0.5b")
    engine.generate("Pick up the red cup", max_new_tokens=64)       # rendered as a user chat message
    for event in engine.stream("Hello", raw=True, temperature=0.7, seed=1):
        print(event.text, end="", flush=True)
    engine.chat([{"role": "user", "content": "Hi"}])

    engine.generate("Go to the door", response_format=ResponseFormat.json_schema(SCHEMA), max_time=2.0)
    reply = engine.respond(messages, tools=TOOLS, tool_choice="required")   # reply.tool_calls
    async for event in engine.astream("Hello"): ...

One Engine drives one sequence at a time and may be shared by threads: requests wait their turn in
arrival order, so none sees another's KV state. It keeps the KV cache between calls, so a call whose
prompt starts like the previous one (a growing chat, a fixed system prompt) prefills only the new tokens.
Close a stream you abandon (`events.close()`, or let it be garbage-collected): it holds the turn until then.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecpm.aio import iterate_in_thread
from edgecpm.bundle import CHAT_TEMPLATE_NAME, TOKENIZER_NAME, Manifest, read_manifest
from edgecpm.control import CancelCheck, CancelToken, Interrupt, RequestQueue
from edgecpm.errors import GenerationError
from edgecpm.generate import GenerationEvent, GenerationSettings, KVSession, final_result, generate_steps
from edgecpm.runtimes.kv import KV_CACHES
from edgecpm.structured import ConstraintCompiler, ResponseFormat

if TYPE_CHECKING:
    from edgecpm.backend import Backend
    from edgecpm.chat_template import ChatTemplate
    from edgecpm.text import TextTokenizer
    from edgecpm.tool_calls import Reply, ToolFormat

Messages = Sequence[Mapping[str, Any]]


def load(path: str | Path, *, threads: int | None = None, kernels: str | None = None, attention: str | None = None,
         sparse_config: Mapping[str, Any] | None = None, kv_cache: str | None = None) -> Engine:
    """Reads a bundle's manifest, tokenizer and chat template; the runtime session starts on first use.

    `kernels`: who runs the bundle, "auto" (default, or $EDGECPM_KERNELS), "tensorrt", "native", "native-exact" (float
    activations instead of int8 ones) or "onnxruntime" (chosen in one place: edgecpm.runtimes.select). `attention`: "auto" (default: the bundle's recorded choice),
    "dense" or "sparse" (InfLLM v2, on the native kernels); `sparse_config`: sparse_config fields to set or override,
    e.g. {"dense_len": 1024} (edgecpm.sparse.choice). `kv_cache`: "float32" (default) or "float16" (half the KV memory,
    on the native kernels; edgecpm.runtimes.select)."""
    from edgecpm.chat_template import ChatTemplate
    from edgecpm.text import TextTokenizer

    from edgecpm.sparse.choice import AttentionChoice

    bundle = Path(path)
    manifest = read_manifest(bundle)
    choice = AttentionChoice(attention or "auto", dict(sparse_config or {})).validate()
    if kv_cache is not None and kv_cache not in KV_CACHES:
        raise GenerationError(f"unknown KV cache {kv_cache!r} (choose from {', '.join(KV_CACHES)})")
    tokenizer = TextTokenizer.from_file(bundle / manifest.tokenizer.get("file", TOKENIZER_NAME), manifest.tokenizer)
    template_name = manifest.tokenizer.get("chat_template_file", CHAT_TEMPLATE_NAME)
    template_path = bundle / template_name if template_name else None
    template = None
    if template_path is not None and template_path.is_file():
        template = ChatTemplate(template_path.read_text(encoding="utf-8"), bos_token=tokenizer.bos_token,
                                eos_token=tokenizer.eos_token, name=str(template_path))

    def start_backend() -> Backend:
        from edgecpm.runtimes import load_backend

        return load_backend(bundle, manifest, threads=threads, kernels=kernels, attention=choice, kv_cache=kv_cache)

    return Engine(manifest, tokenizer, template, backend=start_backend)


class Engine:
    """One model, shared safely: callers from any thread wait their turn in arrival order (one KV state,
    one sequence at a time), and each can be bounded (`deadline`, `max_time`) or cancelled (`cancel`,
    `engine.cancel()`) without touching anyone else's request."""

    def __init__(self, manifest: Manifest, tokenizer: TextTokenizer, chat_template: ChatTemplate | None, *,
                 backend: Backend | Callable[[], Backend], defaults: GenerationSettings | None = None):
        """`backend` is a Backend or a function that builds one when first needed."""
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.defaults = defaults or GenerationSettings()
        self._backend_or_factory = backend
        self._session: KVSession | None = None
        self._constraints: ConstraintCompiler | None = None
        self._start_lock = threading.Lock()  # two first callers must not each start a backend
        self._queue = RequestQueue()
        self._requests: weakref.WeakSet[CancelToken] = weakref.WeakSet()  # running or waiting, for cancel()

    @property
    def session(self) -> KVSession:
        with self._start_lock:
            if self._session is None:
                source = self._backend_or_factory
                is_factory = callable(source) and not hasattr(source, "prefill")
                self._session = KVSession(source() if is_factory else source)
            return self._session

    @property
    def backend(self) -> Backend:
        """The runtime backend, started now if it was not yet (useful to pay the load time up front)."""
        return self.session.backend

    @property
    def constraints(self) -> ConstraintCompiler:
        """Compiles response formats for this tokenizer (its vocabulary view is built on first use)."""
        with self._start_lock:
            if self._constraints is None:
                vocab_size = int(self.manifest.architecture.get("vocab_size") or self.tokenizer.vocab_size)
                self._constraints = ConstraintCompiler(self.tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=self.manifest.eos_token_ids)
            return self._constraints

    @property
    def queue_depth(self) -> int:
        """Requests waiting for their turn (the running one not counted)."""
        return self._queue.depth

    def cancel(self) -> int:
        """Cancels every generation running or waiting now (each ends with finish_reason "cancelled", the
        running one within one decode step); later calls are not affected. Returns how many were cancelled."""
        requests = list(self._requests)
        for token in requests:
            token.cancel()
        return len(requests)

    def reset(self) -> None:
        """Forgets the cached conversation (waits for the running generation to finish)."""
        with self._queue.turn():
            self.session.reset()

    # ------------------------------------------------------------------------------------ prompts

    def settings(self, settings: GenerationSettings | None = None, **options: Any) -> GenerationSettings:
        """Settings for one call: defaults, then `settings`, then keyword options; the bundle's eos ids
        are always stop tokens."""
        chosen = (settings or self.defaults).with_options(**options)
        stop_ids = tuple(dict.fromkeys([*self.manifest.eos_token_ids, *chosen.stop_token_ids]))
        return chosen.with_options(stop_token_ids=stop_ids).validate()

    def prompt_ids(self, prompt: str, *, system: str | None = None, raw: bool = False) -> list[int]:
        """Token ids for a prompt: as is when `raw`, else as a user message (after `system`) in the chat template."""
        if not isinstance(prompt, str) or not prompt:
            raise GenerationError("the prompt is empty")
        if raw:
            if system is not None:
                raise GenerationError("a system message needs the chat template; it cannot be combined with raw")
            return self.tokenizer.encode(prompt)
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
        return self.chat_prompt_ids(messages)

    def chat_prompt_ids(self, messages: Messages, *, tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """The prompt for a conversation; with `tools`, described the way this model was trained to see them
        (edgecpm.tool_calls), and earlier tool calls and results rendered in that format."""
        if self.chat_template is None:
            raise GenerationError("this bundle has no chat template; feed the prompt as is (raw=True, --raw)")
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
            raise GenerationError("the conversation is empty")
        rendered, variables = self.tool_format.prepare(messages, tools)
        return self.tokenizer.encode(self.chat_template.render(rendered, add_generation_prompt=True, **variables))

    @cached_property
    def tool_format(self) -> ToolFormat:
        from edgecpm.tool_calls import tool_format_for

        return tool_format_for(self.chat_template, str(self.manifest.architecture.get("architecture", "")))

    # --------------------------------------------------------------------------------- generation

    def stream_ids(self, prompt_ids: Sequence[int], settings: GenerationSettings | None = None, *,
                   cancel: CancelCheck | None = None, deadline: float | None = None,
                   response_format: ResponseFormat | Mapping[str, Any] | None = None,
                   **options: Any) -> Iterator[GenerationEvent]:
        """Events for a prompt of token ids. Everything is checked at the call; the generation waits for
        its turn when the first event is asked for.

        `cancel`: a CancelToken or any function returning True to stop (checked once per token);
        `deadline`: a time.monotonic() instant; `max_time` (an option): seconds from this call. Either
        ends the generation with finish_reason "cancelled" or "time". `response_format`: a JSON schema,
        regex or grammar the text must follow (edgecpm.structured)."""
        chosen = self.settings(settings, **options)
        constraint = self.constraints.constraint(response_format) if response_format is not None else None
        own = CancelToken()  # what engine.cancel() and astream's early exit use
        interrupt = Interrupt.build(own, cancel, deadline=deadline, max_time=chosen.max_time)
        steps = generate_steps(self.session, prompt_ids, chosen, tokenizer=self.tokenizer, interrupt=interrupt,
                               constraint=constraint)
        self._requests.add(own)
        return self._in_turn(steps, interrupt, own)

    def _in_turn(self, steps: Iterator[GenerationEvent], interrupt: Interrupt, own: CancelToken) -> Iterator[GenerationEvent]:
        try:
            with self._queue.turn(interrupt):
                yield from steps  # when the interrupt fired while waiting, the steps end at once, with no tokens
        finally:
            self._requests.discard(own)

    def stream(self, prompt: str, *, system: str | None = None, raw: bool = False, settings: GenerationSettings | None = None,
               **options: Any) -> Iterator[GenerationEvent]:
        """Events as tokens are generated; the last one carries `finish_reason` and `result`.
        Options: GenerationSettings fields, plus cancel, deadline and response_format (see stream_ids)."""
        return self.stream_ids(self.prompt_ids(prompt, system=system, raw=raw), settings, **options)

    def generate(self, prompt: str, *, system: str | None = None, raw: bool = False, settings: GenerationSettings | None = None,
                 **options: Any) -> str:
        return final_result(self.stream(prompt, system=system, raw=raw, settings=settings, **options)).text

    def chat_stream(self, messages: Messages, *, settings: GenerationSettings | None = None,
                    tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: Any = None,
                    **options: Any) -> Iterator[GenerationEvent]:
        """The assistant's next message for a conversation, as events. Earlier turns still in the KV cache
        are not run again. With `tools`, `tool_choice` "required" or {"type": "function", "function":
        {"name": ...}} constrains the answer to a well-formed call (its arguments valid for the tool's
        schema); "auto" (default) lets the model choose, "none" forbids calls. `respond` parses the calls."""
        plan = self.tool_format.plan(tools, tool_choice, options.get("response_format"))
        if plan.response_format is not None:
            options["response_format"] = plan.response_format
        return self.stream_ids(self.chat_prompt_ids(messages, tools=plan.tools), settings, **options)

    def chat(self, messages: Messages, *, settings: GenerationSettings | None = None, **options: Any) -> str:
        return final_result(self.chat_stream(messages, settings=settings, **options)).text

    def respond(self, messages: Messages, *, settings: GenerationSettings | None = None,
                tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: Any = None, **options: Any) -> Reply:
        """The assistant's next message, with tool calls parsed out of the text (`reply.tool_calls`) and an
        OpenAI-shaped `reply.message` to append to the conversation before the tool results."""
        result = final_result(self.chat_stream(messages, settings=settings, tools=tools, tool_choice=tool_choice, **options))
        return self.tool_format.reply(result, tools if tool_choice != "none" else None)

    # -------------------------------------------------------------------------------------- asyncio

    async def astream(self, prompt: str, **options: Any) -> AsyncIterator[GenerationEvent]:
        """`stream` for asyncio: the model runs in a worker thread; leaving the loop early (break, task
        cancelled) cancels the generation within one decode step."""
        own = CancelToken()
        async for event in iterate_in_thread(lambda: self.stream(prompt, **_with_cancel(options, own)), own):
            yield event

    async def achat_stream(self, messages: Messages, **options: Any) -> AsyncIterator[GenerationEvent]:
        """`chat_stream` for asyncio (see astream)."""
        own = CancelToken()
        async for event in iterate_in_thread(lambda: self.chat_stream(messages, **_with_cancel(options, own)), own):
            yield event

    async def arespond(self, messages: Messages, *, tools: Sequence[Mapping[str, Any]] | None = None,
                       tool_choice: Any = None, **options: Any) -> Reply:
        """`respond` for asyncio."""
        result = None
        async for event in self.achat_stream(messages, tools=tools, tool_choice=tool_choice, **options):
            result = event.result or result
        if result is None:
            raise GenerationError("the generation stream ended without a result")
        return self.tool_format.reply(result, tools if tool_choice != "none" else None)


def _with_cancel(options: dict[str, Any], own: CancelToken) -> dict[str, Any]:
    """Options whose cancel check also fires when the async consumer goes away."""
    theirs = options.get("cancel")
    return {**options, "cancel": own if theirs is None else (lambda: own() or bool(theirs()))}
