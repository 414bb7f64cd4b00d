"""Stream an answer token by token with the Python API and time it.

    python examples/streaming_consumer.py bundles/smollm2-135m "What is the capital of France?"

Each event carries the text it completed (empty while a multi-byte character or a possible stop string is
held back), the token id and how long that token took; the last event carries the finish reason and the
prefill/decode speeds. `import edgecpm` pulls in neither torch nor transformers.
"""

from __future__ import annotations

import sys

import edgecpm


def main(bundle: str, question: str) -> None:
    engine = edgecpm.load(bundle)
    slowest = 0.0
    # Greedy by default; e.g. temperature=0.7, top_p=0.9, seed=0 samples reproducibly instead.
    for event in engine.stream(question, max_new_tokens=128, stop_strings=["\n\n"]):
        print(event.text, end="", flush=True)
        if event.token_id is not None:
            slowest = max(slowest, event.seconds)
        if event.result is not None:
            result = event.result
            print(f"\n\n[{result.finish_reason}] {result.new_tokens} tokens; first token after {result.prefill_seconds:.3f}s "
                  f"({result.prefill_tokens_per_second:.0f} tok/s prefill), {result.decode_tokens_per_second:.1f} tok/s decode, "
                  f"slowest step {slowest * 1000:.0f} ms", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} BUNDLE QUESTION")
    main(sys.argv[1], sys.argv[2])
