"""Deadlines, cancellation, concurrent callers, asyncio, structured output and tool calls through the
Python API, on the tiny random model (whose text only the constraints can make well-formed)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time

import jsonschema
import pytest

import edgecpm
from edgecpm.control import CancelToken
from edgecpm.errors import GenerationError
from edgecpm.generate import final_result
from edgecpm.structured import ResponseFormat, ResponseFormatError
from edgecpm.tool_calls import GenericToolFormat, MiniCPMToolFormat, normalize_tools

# The random model may pick eos at any step; a format that cannot end before 1600 characters keeps it going.
LONG = dict(max_new_tokens=1500, raw=True, response_format=ResponseFormat.regex("[a-z ]{1600}"))
# Generous: the bound is "one decode step", which is a millisecond here, on a shared 2-core machine.
SLACK_SECONDS = 1.0

COMMAND_SCHEMA = {
    "type": "object",
    "properties": {
        "action": {"enum": ["pick", "place", "move", "stop"]},
        "target": {"type": "string", "maxLength": 12},
        "speed": {"type": "number", "minimum": 0, "maximum": 1},
        "waypoints": {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": -5, "maximum": 5}},
        "gripper": {"type": "object", "properties": {"open": {"type": "boolean"}}, "required": ["open"],
                    "additionalProperties": False},
    },
    "required": ["action", "target", "speed", "waypoints", "gripper"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "default": 1, "minimum": 1, "maximum": 7}},
        "required": ["city"], "additionalProperties": False}}}
MOVE = {"type": "function", "function": {
    "name": "move_arm", "description": "Move the arm.",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                    "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                   "required": ["x", "y"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def engine(tiny_long_bundle):
    return edgecpm.load(tiny_long_bundle, threads=1)


# ------------------------------------------------------------------------------ deadline and cancel

def test_cancel_from_another_thread_stops_within_one_step(engine):
    tokens_after_cancel = None
    events = engine.stream("Tell me a story", **LONG)
    for count, event in enumerate(events, 1):
        if count == 3:
            canceller = threading.Thread(target=engine.cancel)
            canceller.start()
            canceller.join()
            tokens_after_cancel = 0
        elif event.token_id is not None and tokens_after_cancel is not None:
            tokens_after_cancel += 1
        if event.result is not None:
            assert event.result.finish_reason == "cancelled"
            assert event.result.new_tokens == 3
    assert tokens_after_cancel == 0


def test_cancel_token_and_callback(engine):
    token = CancelToken()
    seen = []
    for event in engine.stream("abc", cancel=token, **LONG):
        seen.append(event)
        if len(seen) == 5:
            token.cancel()
    assert seen[-1].finish_reason == "cancelled" and seen[-1].result.new_tokens == 5
    counter = iter(range(1000))
    result = final_result(engine.stream("abc", cancel=lambda: next(counter) >= 7, **LONG))
    assert result.finish_reason == "cancelled" and result.new_tokens == 7


def test_max_time_and_deadline_end_with_time(engine):
    started = time.monotonic()
    # 1900 tokens take the tiny model well over 0.05 s even unloaded (about 0.2 s at 10k tok/s).
    result = final_result(engine.stream("abc", max_time=0.05, **{**LONG, "max_new_tokens": 1900,
                                                                  "response_format": ResponseFormat.regex("[a-z]{2000}")}))
    elapsed = time.monotonic() - started
    assert result.finish_reason == "time" and 0 < result.new_tokens < 1900
    assert 0.05 <= elapsed < 0.05 + SLACK_SECONDS
    past = final_result(engine.stream("abc", deadline=time.monotonic() - 1, **LONG))
    assert past.finish_reason == "time" and past.new_tokens == 0 and past.text == ""
    with pytest.raises(GenerationError, match="max_time must be a positive"):
        engine.generate("abc", max_time=0)


# ----------------------------------------------------------------------------------- concurrency

def test_concurrent_callers_get_their_own_answers(engine):
    prompts = [f"request {i}: go to shelf {i}" for i in range(4)]
    expected = {p: engine.generate(p, raw=True, max_new_tokens=24) for p in prompts}
    answers: dict[tuple[str, int], str] = {}
    errors = []

    def worker(prompt: str) -> None:
        try:
            for repeat in range(3):
                answers[(prompt, repeat)] = engine.generate(prompt, raw=True, max_new_tokens=24)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(answers) == 12
    assert all(text == expected[prompt] for (prompt, _), text in answers.items())
    assert len(set(expected.values())) > 1, "the check needs prompts with different answers"


def test_a_waiting_request_leaves_the_queue_at_its_deadline(engine):
    holder = engine.stream("abc", **LONG)
    next(holder)  # this stream now holds the engine's turn
    outcome = {}

    def waiter() -> None:
        started = time.monotonic()
        outcome["result"] = final_result(engine.stream("xyz", raw=True, max_time=0.2))
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=waiter)
    thread.start()
    thread.join(timeout=30)
    assert outcome["result"].finish_reason == "time" and outcome["result"].new_tokens == 0
    assert outcome["seconds"] < 0.2 + SLACK_SECONDS
    with pytest.raises(GenerationError, match="unfinished stream"):
        next(engine.stream("same thread", raw=True))  # would wait for itself forever
    holder.close()
    assert final_result(engine.stream("after", raw=True, max_new_tokens=2)).new_tokens >= 1


def test_astream_matches_stream_and_cancels_when_left(engine):
    expected = final_result(engine.stream("hello", raw=True, max_new_tokens=16))

    async def collect():
        return [event async for event in engine.astream("hello", raw=True, max_new_tokens=16)]

    events = asyncio.run(collect())
    assert events[-1].result.token_ids == expected.token_ids
    assert "".join(e.text for e in events) == expected.text

    async def leave_early():
        count = 0
        async for _event in engine.astream("hello", **LONG):
            count += 1
            if count == 4:
                break
        started = time.monotonic()
        # The abandoned generation was cancelled: the engine is free again at once.
        text = await asyncio.to_thread(engine.generate, "next", raw=True, max_new_tokens=2)
        return text, time.monotonic() - started

    text, seconds = asyncio.run(leave_early())
    assert isinstance(text, str) and seconds < SLACK_SECONDS + 1


# ------------------------------------------------------------------------------ structured output

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_always_validates(engine, seed):
    result = final_result(engine.stream("command:", raw=True, max_new_tokens=400, temperature=1.0, seed=seed,
                                        response_format=ResponseFormat.json_schema(COMMAND_SCHEMA)))
    assert result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), COMMAND_SCHEMA)


def test_openai_shaped_format_regex_and_grammar(engine):
    shaped = {"type": "json_schema", "json_schema": {"name": "cmd", "schema": COMMAND_SCHEMA}}
    jsonschema.validate(json.loads(engine.generate("x", raw=True, max_new_tokens=400, response_format=shaped)), COMMAND_SCHEMA)
    assert isinstance(json.loads(engine.generate("x", raw=True, max_new_tokens=300, response_format={"type": "json_object"})),
                      dict)
    import re

    text = engine.generate("x", raw=True, max_new_tokens=50, response_format=ResponseFormat.regex(r"(left|right) [0-9]{1,3}"))
    assert re.fullmatch(r"(left|right) [0-9]{1,3}", text)
    lark = 'start: "MOVE " DIR " " NUM\nDIR: "north" | "south"\nNUM: /[1-9][0-9]?/\n'
    assert re.fullmatch(r"MOVE (north|south) [1-9][0-9]?", engine.generate("x", raw=True, max_new_tokens=30,
                                                                            response_format=ResponseFormat.from_grammar(lark)))


def test_structured_output_reports_length_and_bad_formats(engine):
    cut = final_result(engine.stream("x", raw=True, max_new_tokens=3, response_format=ResponseFormat.json_schema(COMMAND_SCHEMA)))
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3
    with pytest.raises(ResponseFormatError, match="response_format"):
        engine.generate("x", response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}})
    with pytest.raises(ResponseFormatError, match="type must be one of"):
        engine.generate("x", response_format={"type": "yaml"})
    with pytest.raises(ResponseFormatError, match="regex"):
        engine.generate("x", response_format={"type": "regex", "regex": "("})


# ------------------------------------------------------------------------------------ tool calls

def test_required_tool_call_is_well_formed_minicpm_format(engine):
    assert engine.tool_format.name == "minicpm"
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for seed in range(3):
        reply = engine.respond(messages, tools=[WEATHER, MOVE], tool_choice="required", max_new_tokens=200, temperature=1.0,
                               seed=seed)
        assert reply.finish_reason == "tool_calls" and len(reply.tool_calls) == 1
        call = reply.tool_calls[0]
        schema = {"get_weather": WEATHER, "move_arm": MOVE}[call.name]["function"]["parameters"]
        jsonschema.validate(call.arguments, schema)
    named = engine.respond(messages, tools=[WEATHER, MOVE], tool_choice={"type": "function", "function": {"name": "move_arm"}},
                           max_new_tokens=200)
    assert [c.name for c in named.tool_calls] == ["move_arm"]
    # The result goes back as a tool message and the conversation continues.
    follow = [*messages, named.message, {"role": "tool", "tool_call_id": named.tool_calls[0].id, "content": '{"ok": true}'}]
    assert isinstance(engine.respond(follow, tools=[WEATHER, MOVE], max_new_tokens=5).result.text, str)
    prompt = engine.tokenizer.decode(engine.chat_prompt_ids(follow, tools=normalize_tools([WEATHER, MOVE])),
                                     skip_special_tokens=False)
    assert "def get_weather(city, unit=None, days=1):" in prompt
    assert "<|im_start|>tool\n{\"ok\": true}<|im_end|>" in prompt and "```python\nmove_arm(x=" in prompt


def test_tool_choice_errors_name_the_field(engine):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(GenerationError, match="tool_choice names no tool"):
        engine.respond(messages, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "fly"}})
    with pytest.raises(GenerationError, match=r"tools\[0\].*function.name"):
        engine.respond(messages, tools=[{"type": "function", "function": {"name": "1bad"}}])


def test_minicpm_stub_history_and_parser_follow_the_spec():
    fmt = MiniCPMToolFormat()
    weather = normalize_tools([{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "City name"}, "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "default": 1}}}}}])
    assert ('class Unit(Enum):\n    enum_0 = "celsius"\n    enum_1 = "fahrenheit"\n\n\ndef get_weather(city, unit=None, days=1):\n'
            '    """Get the current weather for a city.\n\n    Args:\n        city: str = Field(..., description="City name")\n'
            '        unit: Optional[Unit] = None\n        days: Optional[int] = 1\n    """\n') in fmt.describe(weather)
    history = fmt.render_calls([("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "unit": "celsius"})])
    assert history == ('<|tool_call_start|>\n```python\nget_weather(city="Paris")\nget_weather(city="Rome",unit="celsius")\n'
                       '```\n<|tool_call_end|>\n')
    content, calls = fmt.parse('<|thought_start|>\nhmm\n<|thought_end|>\n<|tool_call_start|>\n```python\n'
                               'search("x", from="a", n=-3, who=Paris, flag=true)\n```\n<|tool_call_end|>\nDone.')
    assert content == "Done." and [(c.name, c.arguments) for c in calls] == [
        ("search", {"from": "a", "n": -3, "who": "Paris", "flag": True})]
    assert fmt.parse("<|tool_call_start|>\n```python\nbroken(\n```\n<|tool_call_end|>\nafter") == ("after", [])


def test_generic_format_parses_calls_and_keeps_text():
    content, calls = GenericToolFormat().parse('Sure. <tool_call>{"name": "move_arm", "arguments": {"x": 1, "y": 2}}</tool_call>'
                                               '<tool_call>{"name": "stop", "arguments": "{}"}</tool_call><tool_call>{bad')
    assert content == "Sure." and [(c.name, c.arguments) for c in calls] == [("move_arm", {"x": 1, "y": 2}), ("stop", {})]


def test_structured_and_tools_stay_torch_free(tiny_long_bundle):
    script = textwrap.dedent(f"""
        import sys, json
        import edgecpm
        engine = edgecpm.load({str(tiny_long_bundle)!r}, threads=1)
        schema = {{"type": "object", "properties": {{"go": {{"enum": ["left", "right"]}}}}, "required": ["go"]}}
        fmt = {{"type": "json_schema", "json_schema": {{"name": "go", "schema": schema}}}}
        assert json.loads(engine.generate("x", raw=True, max_new_tokens=200, response_format=fmt))["go"] in ("left", "right")
        import edgecpm.serve.app
        heavy = sorted(m for m in ("torch", "transformers", "onnx", "gguf") if m in sys.modules)
        print(",".join(heavy) or "none")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"
