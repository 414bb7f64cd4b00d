"""A robot command loop: natural-language requests in, one validated action per line out.

    python examples/robot_command_loop.py bundles/smollm2-135m
    > pick up the red cup
    ACTION pick(red cup)

The model is asked for exactly one line `ACTION verb(argument)` with a fixed set of verbs. Three things
make this dependable on a small edge model:

- greedy decoding (temperature 0): the same request gives the same action;
- a stop string at the end of the line and a small token budget: the robot waits for one short line,
  never a paragraph;
- the fixed preamble (system prompt and worked examples) comes first in every request, so the engine
  keeps it in the KV cache and each request prefills only its own tokens (the "cached" count in the log).

Anything that does not parse as a known action is refused rather than guessed at.
"""

from __future__ import annotations

import re
import sys

import edgecpm

VERBS = ("pick", "place", "move", "stop")
SYSTEM = ("You control a robot arm. Answer every request with exactly one line of the form ACTION verb(argument) "
          f"where verb is one of: {', '.join(VERBS)}.")
# Worked examples as earlier chat turns: small models follow a format they have just "answered" in far
# more reliably than one described in prose.
EXAMPLES = [
    ("pick up the blue block", "ACTION pick(blue block)"),
    ("put it on the shelf", "ACTION place(shelf)"),
    ("go to the door", "ACTION move(door)"),
    ("halt!", "ACTION stop(now)"),
]
PREAMBLE = [{"role": "system", "content": SYSTEM}]
for example_request, example_answer in EXAMPLES:
    PREAMBLE += [{"role": "user", "content": example_request}, {"role": "assistant", "content": example_answer}]
ACTION = re.compile(r"ACTION\s+(" + "|".join(VERBS) + r")\(([^()]{1,60})\)")


def parse_action(text: str) -> tuple[str, str] | None:
    match = ACTION.search(text)
    return (match.group(1), match.group(2).strip()) if match else None


def main(bundle: str) -> None:
    engine = edgecpm.load(bundle)
    print("robot ready; type a request (Ctrl-D to quit)", file=sys.stderr)
    for line in sys.stdin:
        request = line.strip()
        if not request:
            continue
        result = None
        messages = [*PREAMBLE, {"role": "user", "content": request}]
        for event in engine.chat_stream(messages, max_new_tokens=24, stop_strings=["\n"]):
            result = event.result or result
        action = parse_action(result.text)
        cached = len(result.prompt_token_ids) - result.prefill_tokens
        print(f"[{result.prefill_seconds * 1000:.0f} ms prefill, {cached} tokens cached, "
              f"{result.decode_tokens_per_second:.0f} tok/s]", file=sys.stderr)
        if action is None:
            print(f"REFUSED {result.text.strip()!r}", flush=True)
        else:
            print(f"ACTION {action[0]}({action[1]})", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} BUNDLE")
    main(sys.argv[1])
