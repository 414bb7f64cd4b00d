"""Chat templates rendered the way transformers renders them, inside Jinja's immutable sandbox.

A template comes from a checkpoint someone published, so it is untrusted code: it runs in
`ImmutableSandboxedEnvironment` (no attribute access to Python internals, no mutation of our objects), it
sees only plain JSON-like copies of the messages, and both its size and the size of what it renders are
bounded. The environment matches transformers' `apply_chat_template` (trim_blocks, lstrip_blocks,
loopcontrols, the `{% generation %}` tag, `raise_exception`, `strftime_now`, a non-escaping `tojson`,
`dict`, a `namespace` that refuses underscore names) so a bundle renders the prompts its model was
trained on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

from edgecpm.errors import EdgecpmError

MAX_TEMPLATE_CHARS = 1024 * 1024
MAX_RENDERED_CHARS = 4 * 1024 * 1024


class ChatTemplateError(EdgecpmError):
    """A chat template that cannot be compiled or rendered (syntax, sandbox violation, raise_exception)."""


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None, name: str = "chat template"):
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(f"template is longer than {MAX_TEMPLATE_CHARS} characters", path=name)
        self.source = source
        self.name = name
        self.special_tokens = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    @cached_property
    def _template(self) -> Any:
        import jinja2

        try:
            return _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"line {exc.lineno}: {exc.message}", path=self.name) from None

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]); extra variables reach the template."""
        import jinja2

        for message in messages:
            if not isinstance(message, Mapping) or "role" not in message:
                raise ChatTemplateError("each message must be a mapping with a 'role' and a 'content'", path=self.name)
        context = {**self.special_tokens, **_plain(variables), "messages": _plain(list(messages)),
                   "add_generation_prompt": add_generation_prompt}
        pieces: list[str] = []
        length = 0
        try:
            # Rendered piece by piece so a template that loops to produce megabytes stops early.
            for piece in self._template.generate(**context):
                length += len(piece)
                if length > MAX_RENDERED_CHARS:
                    raise ChatTemplateError(f"rendered prompt is longer than {MAX_RENDERED_CHARS} characters", path=self.name)
                pieces.append(piece)
        except jinja2.exceptions.SecurityError as exc:
            message = f"the template tried something the sandbox forbids: {_one_line(exc)}"
            raise ChatTemplateError(message, path=self.name) from None
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(_one_line(exc), path=self.name) from None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as exc:
            raise ChatTemplateError(f"rendering failed ({exc.__class__.__name__}: {_one_line(exc)})", path=self.name) from None
        return "".join(pieces)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else exc.__class__.__name__


def _plain(value: Any) -> Any:
    """A copy made of JSON types only: the sandbox guards attribute access, but a rich object handed to a
    template (an array, a path) could still expose methods the sandbox does not know are dangerous."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"


def _environment() -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)  # the `generation` name itself
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any):  # same signature trick as Jinja's Namespace
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    def make_dict(*args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationTag, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=make_dict, namespace=Namespace)
    return environment
