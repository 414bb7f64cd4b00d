"""The Python API: `edgecpm.load(bundle)` -> Engine. Torch-free: numpy, tokenizers, jinja2, onnxruntime.

    engine = edgecpm.load("bundles/minicpm4-0.5b")
    engine.generate("Pick up the red cup", max_new_tokens=64)       # rendered as a user chat message
    for event in engine.stream("Hello", raw=True, temperature=0.7, seed=1):
        print(event.text, end="", flush=True)
    engine.chat([{"role": "user", "content": "Hi"}])

One Engine drives one sequence at a time (it is not thread-safe). It keeps the KV cache between calls,
so a call whose prompt starts like the previous one (a growing chat, a fixed system prompt) prefills only
the new tokens; starting a new stream ends any unfinished older one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecpm.bundle import CHAT_TEMPLATE_NAME, TOKENIZER_NAME, Manifest, read_manifest
from edgecpm.errors import GenerationError
from edgecpm.generate import GenerationEvent, GenerationSettings, KVSession, final_result, generate_steps

if TYPE_CHECKING:
    from edgecpm.backend import Backend
    from edgecpm.chat_template import ChatTemplate
    from edgecpm.text import TextTokenizer

Messages = Sequence[Mapping[str, Any]]


def load(path: str | Path, *, threads: int | None = None, kernels: str | None = None) -> Engine:
    """Reads a bundle's manifest, tokenizer and chat template; the runtime session starts on first use.

    `kernels`: who runs the bundle, "auto" (default, or $EDGECPM_KERNELS), "tensorrt", "native" or "onnxruntime"
    (chosen in one place: edgecpm.runtimes.select)."""
    from edgecpm.chat_template import ChatTemplate
    from edgecpm.text import TextTokenizer

    bundle = Path(path)
    manifest = read_manifest(bundle)
    tokenizer = TextTokenizer.from_file(bundle / manifest.tokenizer.get("file", TOKENIZER_NAME), manifest.tokenizer)
    template_name = manifest.tokenizer.get("chat_template_file", CHAT_TEMPLATE_NAME)
    template_path = bundle / template_name if template_name else None
    template = None
    if template_path is not None and template_path.is_file():
        template = ChatTemplate(template_path.read_text(encoding="utf-8"), bos_token=tokenizer.bos_token,
                                eos_token=tokenizer.eos_token, name=str(template_path))

    def start_backend() -> Backend:
        from edgecpm.runtimes import load_backend

        return load_backend(bundle, manifest, threads=threads, kernels=kernels)

    return Engine(manifest, tokenizer, template, backend=start_backend)


class Engine:
    def __init__(self, manifest: Manifest, tokenizer: TextTokenizer, chat_template: ChatTemplate | None, *,
                 backend: Backend | Callable[[], Backend], defaults: GenerationSettings | None = None):
        """`backend` is a Backend or a function that builds one when first needed."""
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.defaults = defaults or GenerationSettings()
        self._backend_or_factory = backend

    @cached_property
    def session(self) -> KVSession:
        source = self._backend_or_factory
        is_factory = callable(source) and not hasattr(source, "prefill")
        return KVSession(source() if is_factory else source)

    @property
    def backend(self) -> Backend:
        """The runtime backend, started now if it was not yet (useful to pay the load time up front)."""
        return self.session.backend

    def reset(self) -> None:
        """Forgets the cached conversation."""
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

    def chat_prompt_ids(self, messages: Messages) -> list[int]:
        if self.chat_template is None:
            raise GenerationError("this bundle has no chat template; feed the prompt as is (raw=True, --raw)")
        if not messages:
            raise GenerationError("the conversation is empty")
        return self.tokenizer.encode(self.chat_template.render(messages, add_generation_prompt=True))

    # --------------------------------------------------------------------------------- generation

    def stream_ids(self, prompt_ids: Sequence[int], settings: GenerationSettings | None = None,
                   **options: Any) -> Iterator[GenerationEvent]:
        return generate_steps(self.session, prompt_ids, self.settings(settings, **options), tokenizer=self.tokenizer)

    def stream(self, prompt: str, *, system: str | None = None, raw: bool = False, settings: GenerationSettings | None = None,
               **options: Any) -> Iterator[GenerationEvent]:
        """Events as tokens are generated; the last one carries `finish_reason` and `result`."""
        return self.stream_ids(self.prompt_ids(prompt, system=system, raw=raw), settings, **options)

    def generate(self, prompt: str, *, system: str | None = None, raw: bool = False, settings: GenerationSettings | None = None,
                 **options: Any) -> str:
        return final_result(self.stream(prompt, system=system, raw=raw, settings=settings, **options)).text

    def chat_stream(self, messages: Messages, *, settings: GenerationSettings | None = None,
                    **options: Any) -> Iterator[GenerationEvent]:
        """The assistant's next message for a conversation, as events. Earlier turns still in the KV cache
        are not run again."""
        return self.stream_ids(self.chat_prompt_ids(messages), settings, **options)

    def chat(self, messages: Messages, *, settings: GenerationSettings | None = None, **options: Any) -> str:
        return final_result(self.chat_stream(messages, settings=settings, **options)).text

