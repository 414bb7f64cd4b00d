"""Tool (function) calling: OpenAI-style `tools` in, structured `tool_calls` out, results fed back.

Two wire formats, picked per bundle by `tool_format_for`:

- MiniCPM (MiniCPM3/MiniCPM4, spec §8.1): tools are described in the system turn as Python stubs, the
  model answers `<|tool_call_start|>\\n```python\\nname(k=v,...)\\n```\\n<|tool_call_end|>` (after an
  optional `<|thought_start|>...<|thought_end|>`), results come back as `tool` turns, matched by order.
  Parsing follows the reference `fc2dict`, except that `true`/`false`/`null` become JSON values instead
  of the strings "true"/"false"/"null" (the history renders arguments with JSON literals, so the
  reference parser would turn its own booleans into strings).
- generic (any other chat template): tools described as JSON schemas in the system turn, calls written as
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the form Hermes/Qwen templates use). A
  template that renders `tools` itself gets them as the `tools` variable instead.

`tool_choice` "required" or a named function turns the call into a grammar (edgecpm.structured): the
answer is then exactly one call to an allowed tool with arguments valid for its JSON schema. "auto" lets
the model choose and parses what it wrote; "none" describes no tools.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgecpm.errors import GenerationError
from edgecpm.structured import ResponseFormat, lark_json

if TYPE_CHECKING:
    from edgecpm.chat_template import ChatTemplate
    from edgecpm.generate import GenerationResult

MAX_TOOLS = 128


class ToolError(GenerationError):
    def __init__(self, message: str, field: str = "tools"):
        super().__init__(message, field=field)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass(frozen=True)
class Reply:
    """An assistant message: text content and/or tool calls. finish_reason is "tool_calls" when the model
    called tools and nothing cut it short, else the generation's own reason."""

    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str
    result: GenerationResult = field(repr=False)

    @property
    def message(self) -> dict[str, Any]:
        """The OpenAI-shaped assistant message, to append to the conversation."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return message


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]] | None  # normalized function specs to describe, None for none
    response_format: ResponseFormat | None  # the call grammar when a call is required


# --------------------------------------------------------------------------------- normalizing input

def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Function specs {name, description, parameters} from OpenAI tools ({"type": "function", "function": {...}})
    or bare specs; checked so that a bad tool is a one-line error naming it."""
    if tools is None:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ToolError("must be a list of tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"at most {MAX_TOOLS} tools are supported (got {len(tools)})")
    specs = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, Mapping):
            raise ToolError("must be an object", where)
        if tool.get("type", "function") != "function":
            raise ToolError(f"type must be 'function' (got {tool.get('type')!r})", where)
        spec = tool.get("function", tool)
        name = spec.get("name") if isinstance(spec, Mapping) else None
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}", name):
            raise ToolError("function.name must be 1-64 letters, digits, '_', '.' or '-', not starting with a digit", where)
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
            raise ToolError("function.parameters must be a JSON schema of type object", where)
        description = spec.get("description") or ""
        if not isinstance(description, str):
            raise ToolError("function.description must be a string", where)
        specs.append({"name": name, "description": description, "parameters": dict(parameters)})
    if len({spec["name"] for spec in specs}) != len(specs):
        raise ToolError("tool names must be unique")
    return specs


def chosen_tools(specs: list[dict[str, Any]], tool_choice: Any) -> tuple[list[dict[str, Any]], bool]:
    """The tools the model may call and whether it must call one, from OpenAI's tool_choice."""
    if tool_choice in (None, "auto"):
        return specs, False
    if tool_choice == "none":
        return [], False
    if tool_choice == "required":
        if not specs:
            raise ToolError("tool_choice 'required' needs at least one tool", "tool_choice")
        return specs, True
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        match = [spec for spec in specs if spec["name"] == name]
        if tool_choice.get("type") != "function" or not match:
            raise ToolError(f"tool_choice names no tool in tools (got {name!r})", "tool_choice")
        return match, True
    raise ToolError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
                    "tool_choice")


def text_content(content: Any) -> str:
    """Message content as text: OpenAI allows a list of parts ({"type": "text", "text": ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise GenerationError("only text content parts are supported", field="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise GenerationError("message content must be a string or a list of text parts", field="messages")


def call_arguments(call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, arguments dict) of an OpenAI tool call in the history; arguments arrive as a JSON string."""
    function = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise GenerationError("each tool call needs function.name", field="messages")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise GenerationError(f"tool call {function['name']!r}: arguments are not valid JSON", field="messages") from None
    if not isinstance(arguments, Mapping):
        raise GenerationError(f"tool call {function['name']!r}: arguments must be a JSON object", field="messages")
    return function["name"], dict(arguments)


# ---------------------------------------------------------------------------------------- formats

class ToolFormat:
    """How one family of chat templates describes tools, writes calls and gets results back."""

    name = "base"
    call_start = ""

    def __init__(self, template_renders_tools: bool = False):
        self.template_renders_tools = template_renders_tools

    # ---- prompt side
    def prepare(self, messages: Sequence[Mapping[str, Any]],
                tools: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Messages as the chat template should see them, and extra template variables."""
        prepared = []
        for message in messages:
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise GenerationError("each message must be an object with a 'role'", field="messages")
            role, content = message["role"], text_content(message.get("content"))
            if role == "assistant" and message.get("tool_calls"):
                calls = [call_arguments(call) for call in message["tool_calls"]]
                if self.template_renders_tools:
                    prepared.append({"role": role, "content": content,
                                     "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]})
                else:
                    prepared.append({"role": role, "content": self.render_calls(calls) + content})
            else:
                prepared.append({"role": role, "content": content})
        if not tools:
            return prepared, {}
        if self.template_renders_tools:
            return prepared, {"tools": [{"type": "function", "function": spec} for spec in tools]}
        block = self.describe(tools)
        if prepared and prepared[0]["role"] == "system":
            prepared[0] = {"role": "system", "content": prepared[0]["content"] + block}
        else:
            prepared.insert(0, {"role": "system", "content": block.lstrip("\n")})
        return prepared, {}

    def plan(self, tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any, response_format: Any) -> ToolPlan:
        specs = normalize_tools(tools)
        allowed, required = chosen_tools(specs, tool_choice)
        if required and response_format is not None:
            raise ToolError("a required tool call cannot be combined with response_format", "tool_choice")
        grammar = ResponseFormat.from_grammar(self.call_grammar(allowed)) if required else None
        return ToolPlan(specs if allowed else None, grammar)

    # ---- answer side
    def reply(self, result: GenerationResult, tools: Sequence[Mapping[str, Any]] | None) -> Reply:
        specs = normalize_tools(tools)
        if not specs:
            return Reply(result.text, [], result.finish_reason, result)
        content, calls = self.parse(result.text)
        known = {spec["name"] for spec in specs}
        calls = [call for call in calls if call.name in known]
        finish = "tool_calls" if calls and result.finish_reason in ("stop", "stop_string") else result.finish_reason
        return Reply(content if content or not calls else None, calls, finish, result)

    # ---- per format
    def describe(self, tools: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        raise NotImplementedError

    def call_grammar(self, tools: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError


class GenericToolFormat(ToolFormat):
    name = "generic"
    call_start, call_end = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def describe(self, tools: list[dict[str, Any]]) -> str:
        listing = "\n".join(json.dumps({"type": "function", "function": spec}, ensure_ascii=False) for spec in tools)
        return ("\n\n# Tools\nYou may call one or more functions. Their signatures are JSON schemas:\n<tools>\n"
                f"{listing}\n</tools>\nTo call a function, write only "
                '<tool_call>{"name": <function-name>, "arguments": <arguments-object>}</tool_call>; '
                "otherwise answer normally.")

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return "".join(f"{self.call_start}{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}{self.call_end}\n"
                       for n, a in calls)

    def call_grammar(self, tools: list[dict[str, Any]]) -> str:
        one_of = [{"type": "object", "properties": {"name": {"const": spec["name"]}, "arguments": spec["parameters"]},
                   "required": ["name", "arguments"], "additionalProperties": False} for spec in tools]
        schema = one_of[0] if len(one_of) == 1 else {"anyOf": one_of}
        return f"start: {json.dumps(self.call_start)} call {json.dumps(self.call_end)}\ncall: {lark_json(schema)}\n"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        calls = []
        for body in self._CALL.findall(text):
            try:
                data = json.loads(body)
            except json.JSONDecodeError:
                continue
            if isinstance(data, Mapping) and isinstance(data.get("name"), str):
                arguments = data.get("arguments", data.get("parameters", {}))
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except json.JSONDecodeError:
                        continue
                if isinstance(arguments, Mapping):
                    calls.append(ToolCall(data["name"], dict(arguments)))
        return self._CALL.sub("", text).strip(), calls


class MiniCPMToolFormat(ToolFormat):
    """MiniCPM3/MiniCPM4 function calling (spec §8.1.2-8.1.4)."""

    name = "minicpm"
    call_start, call_end = "<|tool_call_start|>", "<|tool_call_end|>"
    thought_start, thought_end = "<|thought_start|>", "<|thought_end|>"

    def describe(self, tools: list[dict[str, Any]]) -> str:
        stubs = "".join(_python_stub(spec) for spec in tools)
        return ("\n# Functions\nHere is a list of functions that you can invoke:\n```python\nfrom enum import Enum\n"
                f"from typing import List, Dict, Optional\nfrom pydantic import BaseModel, Field\n{stubs}\n```\n\n"
                "# Function Call Rule and Output Format\n"
                "- If the user's question can be answered without calling any function, answer it directly.\n"
                "- If a function is needed but the user did not give enough information, ask for it.\n"
                "- If a function is needed and the information is there, call the functions.\n"
                "- Use default parameters unless the user has specified otherwise.\n"
                "- You should answer in the following format:\n\n"
                f"{self.thought_start}\n{{explain your plan}}\n{self.thought_end}\n{self.call_start}\n```python\n"
                f"func1(params_name=params_value, params_name2=params_value2...)\nfunc2(params)\n```\n{self.call_end}\n"
                "{answer the user's question directly or ask the user for more information}")

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        lines = "".join(f"{name}({','.join(f'{k}={json.dumps(v, ensure_ascii=False)}' for k, v in arguments.items())})\n"
                        for name, arguments in calls)
        return f"{self.call_start}\n```python\n{lines}```\n{self.call_end}\n"

    def call_grammar(self, tools: list[dict[str, Any]]) -> str:
        rules = [f"start: {json.dumps(self.call_start + chr(10) + '```python' + chr(10))} call "
                 f"{json.dumps(chr(10) + '```' + chr(10) + self.call_end)}",
                 "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        for i, spec in enumerate(tools):
            properties = spec["parameters"].get("properties") or {}
            required = set(spec["parameters"].get("required") or [])
            names = list(properties)
            rules.append(f"call_{i}: {json.dumps(spec['name'] + '(')} args_{i}_0_first {json.dumps(')')}")
            # args_{i}_{k}_{first|rest}: the arguments from the k-th on, after none (first) or some (rest).
            for k in range(len(names) + 1):
                for position in ("first", "rest"):
                    head = f"args_{i}_{k}_{position}"
                    if k == len(names):
                        rules.append(f'{head}: ""')
                        continue
                    separator = "" if position == "first" else '"," '
                    value = f"arg_{i}_{k}"
                    take = f"{separator}{json.dumps(names[k] + '=')} {value} args_{i}_{k + 1}_rest"
                    skip = f"args_{i}_{k + 1}_{position}"
                    rules.append(f"{head}: {take}" if names[k] in required else f"{head}: {take} | {skip}")
            for k, name in enumerate(names):
                rules.append(f"arg_{i}_{k}: {lark_json(properties[name] or {})}")
        return "\n".join(rules) + "\n"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """fc2dict: thought, call block, keyword arguments through Python's own parser."""
        rest = text
        if self.thought_start in rest and self.thought_end in rest:
            rest = rest[rest.rindex(self.thought_end) + len(self.thought_end):]
        if self.call_start not in rest or self.call_end not in rest:
            return rest.strip(), []
        block = rest[rest.index(self.call_start) + len(self.call_start):rest.rindex(self.call_end)]
        content = rest[rest.rindex(self.call_end) + len(self.call_end):].strip()
        block = block.strip()
        block = block.removeprefix("```").removeprefix("python").removesuffix("```").strip()
        return content, _parse_python_calls(block)


def _parse_python_calls(block: str) -> list[ToolCall]:
    renamed = {f"{kw}_": kw for kw in keyword.kwlist}
    for kw in keyword.kwlist:  # `from=` is a keyword argument name a tool may well have
        block = re.sub(rf"([,( ]){kw}=", rf"\1{kw}_=", block)
    try:
        tree = ast.parse(block)
    except SyntaxError:
        return []
    calls = []
    for statement in tree.body:
        if not isinstance(statement, ast.Expr) or not isinstance(statement.value, ast.Call):
            return []
        try:
            name = _dotted_name(statement.value.func)
            arguments = {renamed.get(kw.arg, kw.arg): _literal(kw.value) for kw in statement.value.keywords if kw.arg}
        except ValueError:
            return []
        calls.append(ToolCall(name, arguments))
    return calls


def _dotted_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise ValueError("not a name")


JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.Name):
        return JSON_NAMES.get(node.id, node.id)
    if isinstance(node, ast.Call):
        return {"name": _dotted_name(node.func), "arguments": {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg}}
    raise ValueError("unsupported value")


PYTHON_TYPES = {"string": "str", "number": "float", "integer": "int", "boolean": "bool", "null": "None"}


def _python_type(name: str, schema: Mapping[str, Any]) -> str:
    if schema.get("enum"):
        return name.title()
    kind = schema.get("type")
    if isinstance(kind, str) and kind in PYTHON_TYPES:
        return PYTHON_TYPES[kind]
    if kind == "array":
        return f"List[{_python_type(name, schema.get('items') or {})}]"
    if kind == "object":
        return "Dict[str, Any]"
    return "Any"


def _python_stub(spec: Mapping[str, Any]) -> str:
    """The tool as the Python stub MiniCPM was trained to read (spec §8.1.2): enums as Enum classes,
    optional parameters as Optional[...] with their defaults."""
    parameters = spec["parameters"]
    properties: Mapping[str, Any] = parameters.get("properties") or {}
    required = set(parameters.get("required") or [])
    classes, signature, fields = [], [], []
    for name, schema in properties.items():
        schema = schema or {}
        if schema.get("enum"):
            options = "".join(f"    enum_{i} = {json.dumps(value, ensure_ascii=False)}\n" for i, value in enumerate(schema["enum"]))
            classes.append(f"\n\nclass {name.title()}(Enum):\n{options}")
        default = json.dumps(schema["default"]) if isinstance(schema.get("default"), str) else str(schema.get("default"))
        signature.append(name if name in required else f"{name}={default}")
        kind = _python_type(name, schema)
        line = f"        {name}: {kind if name in required else f'Optional[{kind}]'}"
        if schema.get("description"):
            line += f" = Field({'...' if name in required else default}, description={json.dumps(schema['description'], ensure_ascii=False)})"
        elif name not in required:
            line += f" = {default}"
        fields.append(line + "\n")
    args = "\n    Args:\n" + "".join(fields) if properties else "\n"
    return f"{''.join(classes)}\n\ndef {spec['name']}({', '.join(signature)}):\n    \"\"\"{spec['description']}\n{args}    \"\"\"\n"


def tool_format_for(template: ChatTemplate | None, architecture: str = "") -> ToolFormat:
    """MiniCPM's format for MiniCPM models and templates written for it, else the generic one; either
    lets a template that renders `tools` itself do so."""
    source = template.source if template is not None else ""
    renders_tools = bool(re.search(r"\btools\b", source))
    if "tool_call_start" in source or architecture.startswith("minicpm"):
        return MiniCPMToolFormat(renders_tools and "tool_call_start" in source)
    return GenericToolFormat(renders_tools)
