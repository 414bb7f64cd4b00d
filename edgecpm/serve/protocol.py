"""OpenAI request bodies in, checked `CompletionRequest`s out; results back into OpenAI response bodies.

Each field is checked for its type and range here, so a wrong value is a 400 naming the field (`param`)
and never reaches the model. Fields the OpenAI API has but that change nothing here (user, metadata,
presence_penalty, ...) are accepted and ignored, as clients send them by default; fields whose meaning
we cannot honour (n > 1, logprobs) are refused rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgecpm.serve.errors import APIError, bad_request

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4
# OpenAI's finish reasons; ours that it lacks ("time", "cancelled") pass through as they are.
FINISH_REASONS = {"stop": "stop", "stop_string": "stop", "length": "length", "context": "length"}


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | None = None  # completions
    stream: bool = False
    include_usage: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # GenerationSettings fields
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    max_time: float | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _optional(body: Mapping[str, Any], name: str, check: Any, expected: str) -> Any:
    value = body.get(name)
    if value is not None and not check(value):
        raise bad_request(f"'{name}' must be {expected} (got {json.dumps(value)[:60]})", param=name, code="invalid_type")
    return value


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc.__class__.__name__}: {str(exc)[:80]})",
                          code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


def parse_request(body: Mapping[str, Any], *, chat: bool, served_model: str, max_tokens_limit: int,
                  default_max_tokens: int) -> CompletionRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string", param="model", code="missing_required_parameter"
                          if model is None else "invalid_type")
    if model != served_model:
        raise APIError(404, f"the model '{model[:100]}' does not exist; this server serves '{served_model}'", param="model",
                       code="model_not_found")
    n = _optional(body, "n", _is_int, "an integer")
    if n not in (None, 1):
        raise bad_request("only n=1 is supported", param="n", code="unsupported_value")
    if body.get("logprobs") not in (None, False) or body.get("echo") not in (None, False):
        raise bad_request("logprobs and echo are not supported", param="logprobs", code="unsupported_value")
    stream = _optional(body, "stream", lambda v: isinstance(v, bool), "a boolean") or False
    stream_options = _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object") or {}
    options = _sampling_options(body, max_tokens_limit, default_max_tokens)
    max_time = _optional(body, "max_time", lambda v: _is_number(v) and v > 0, "a positive number of seconds")
    common = dict(model=model, stream=stream, include_usage=bool(stream_options.get("include_usage")), options=options,
                  max_time=max_time)
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise bad_request("'prompt' must be a non-empty string", param="prompt",
                              code="missing_required_parameter" if prompt is None else "invalid_type")
        return CompletionRequest(prompt=prompt, **common)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", param="messages",
                          code="missing_required_parameter" if messages is None else "invalid_type")
    for index, message in enumerate(messages):
        _check_message(message, f"messages[{index}]")
    tools = _optional(body, "tools", lambda v: isinstance(v, list), "an array of tools")
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and not (tool_choice in ("none", "auto", "required") or isinstance(tool_choice, dict)):
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or a function object", param="tool_choice",
                          code="invalid_value")
    response_format = _optional(body, "response_format", lambda v: isinstance(v, dict), "an object")
    return CompletionRequest(messages=messages, tools=tools or None, tool_choice=tool_choice,
                             response_format=response_format, **common)


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise bad_request(f"'{where}' must be an object", param=where, code="invalid_type")
    if message.get("role") not in ROLES:
        raise bad_request(f"'{where}.role' must be one of {', '.join(ROLES)}", param=f"{where}.role", code="invalid_value")
    content = message.get("content")
    if content is not None and not isinstance(content, (str, list)):
        raise bad_request(f"'{where}.content' must be a string or an array of text parts", param=f"{where}.content",
                          code="invalid_type")
    if content is None and not (message["role"] == "assistant" and message.get("tool_calls")):
        raise bad_request(f"'{where}.content' is required", param=f"{where}.content", code="missing_required_parameter")


def _sampling_options(body: Mapping[str, Any], limit: int, default: int) -> dict[str, Any]:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None and (not _is_int(max_tokens) or not 1 <= max_tokens <= limit):
        raise bad_request(f"'{name}' must be an integer in 1..{limit} (got {json.dumps(max_tokens)[:40]})", param=name,
                          code="invalid_value")
    temperature = _optional(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number in 0..2")
    top_p = _optional(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    seed = _optional(body, "seed", lambda v: _is_int(v) and 0 <= v < 2**63, "a non-negative integer")
    for ignored in ("presence_penalty", "frequency_penalty"):
        _optional(body, ignored, lambda v: _is_number(v) and -2 <= v <= 2, "a number in -2..2")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES
                             or not all(isinstance(s, str) and s for s in stop)):
        raise bad_request(f"'stop' must be a non-empty string or up to {MAX_STOP_SEQUENCES} of them", param="stop",
                          code="invalid_value")
    options: dict[str, Any] = {"max_new_tokens": max_tokens or min(default, limit), "temperature": temperature,
                               "top_p": top_p, "seed": seed, "stop_strings": tuple(stop) if stop else None}
    return {key: value for key, value in options.items() if value is not None}


# ---------------------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(request_id: str, model: str, message: dict[str, Any], reason: str, token_usage: dict[str, int]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}], "usage": token_usage}


def chat_chunk(request_id: str, model: str, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}


def completion(request_id: str, model: str, text: str, reason: str | None, token_usage: dict[str, int] | None) -> dict[str, Any]:
    body = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}
    if token_usage is not None:
        body["usage"] = token_usage
    return body


def usage_chunk(request_id: str, model: str, token_usage: dict[str, int], *, chat: bool) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": token_usage}
