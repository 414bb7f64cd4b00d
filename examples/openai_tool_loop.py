"""A tool-calling loop against `edgecpm serve` with the official openai client.

    edgecpm serve bundles/smollm2-135m --port 8000 &
    python examples/openai_tool_loop.py http://127.0.0.1:8000/v1 "What's the weather in Paris?"

The model is asked to call a tool (tool_choice "required": the server constrains the call to the tool's
JSON schema), the tool runs here, its result goes back as a `tool` message, and the model answers.
"""

from __future__ import annotations

import json
import sys

import openai

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                   "properties": {"city": {"type": "string", "maxLength": 40}}}}}]


def get_weather(city: str) -> dict:
    return {"city": city, "temperature_c": 18, "sky": "clear"}  # stands in for a real service


def main(base_url: str, question: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": question}]
    for step in range(3):  # bounded: a small model may keep calling
        answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=96,
                                                tool_choice="required" if step == 0 else "auto")
        message = answer.choices[0].message
        if not message.tool_calls:
            print(message.content)
            return
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            result = get_weather(**json.loads(call.function.arguments))
            print(f"[tool] {call.function.name}({call.function.arguments}) -> {result}", file=sys.stderr)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    print(messages[-1]["content"])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} BASE_URL QUESTION")
    main(sys.argv[1], sys.argv[2])
