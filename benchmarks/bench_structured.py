"""Structured-output overhead per token, and decode speed through `edgecpm serve` vs in-process.

    python benchmarks/bench_structured.py BUNDLE [--tokens 64] [--runs 3]

1. Grammar engines on the bundle's tokenizer (SmolLM2: 49,152 tokens), same JSON schema, same token
   sequence (a valid answer, replayed): time to compile the schema, and per token the mask computation
   plus advancing the state. llguidance always; outlines-core when installed (pip install outlines-core).
2. Greedy decode tok/s for the same prompt: in-process free text, in-process under the schema, and the
   same request through the OpenAI endpoint of a server on a loopback port (openai client).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import numpy as np

import edgecpm
from edgecpm.generate import final_result

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["action", "target", "speed", "waypoints"],
          "properties": {"action": {"enum": ["pick", "place", "move", "stop"]}, "target": {"type": "string", "maxLength": 40},
                         "speed": {"type": "integer", "minimum": 1, "maximum": 10},
                         "waypoints": {"type": "array", "maxItems": 4, "items": {"type": "integer"}}}}
ANSWER = '{"action":"pick","target":"the red cup on the left shelf","speed":3,"waypoints":[1,2,3,4]}'
MESSAGES = [{"role": "system", "content": "Turn the operator's request into a robot command."},
            {"role": "user", "content": "Please pick up the red cup on the left shelf, slowly."}]


def bench_llguidance(engine, ids: list[int], runs: int) -> tuple[float, float]:
    from edgecpm.structured import ResponseFormat

    engine.constraints.ll_tokenizer  # built once per engine, not per schema
    logits = np.zeros(engine.manifest.architecture["vocab_size"], dtype=np.float32)
    compiles, per_token = [], []
    for _ in range(runs):
        started = time.perf_counter()
        constraint = engine.constraints.constraint(ResponseFormat.json_schema(SCHEMA))
        compiles.append(time.perf_counter() - started)
        started = time.perf_counter()
        for token in ids:
            constraint.mask(logits)
            constraint.advance(token)
        per_token.append((time.perf_counter() - started) / len(ids))
    return statistics.median(compiles), statistics.median(per_token)


def bench_outlines(engine, ids: list[int], runs: int) -> tuple[float, float] | None:
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return None
    # Byte-level BPE token strings back to bytes (GPT-2's byte <-> unicode table).
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)})
    vocab: dict[bytes, list[int]] = {}
    eos = engine.manifest.eos_token_ids[0]
    for token, index in json.loads(engine.tokenizer.to_json())["model"]["vocab"].items():
        if index != eos and all(ch in table for ch in token):
            vocab.setdefault(bytes(table[ch] for ch in token), []).append(index)
    vocabulary = Vocabulary(eos, vocab)
    compiles, per_token = [], []
    for _ in range(runs):
        started = time.perf_counter()
        index = Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=""), vocabulary)
        compiles.append(time.perf_counter() - started)
        guide = Guide(index)
        mask = np.zeros(engine.manifest.architecture["vocab_size"], dtype=bool)
        started = time.perf_counter()
        for token in ids:
            mask[:] = False
            mask[guide.get_tokens()] = True  # the allowed list, as a sampler would apply it
            guide.advance(token)
        per_token.append((time.perf_counter() - started) / len(ids))
    return statistics.median(compiles), statistics.median(per_token)


def decode_rate(result) -> float:
    return result.decode_tokens_per_second


def bench_server(bundle: str, tokens: int, runs: int) -> float:
    import openai

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "edgecpm", "serve", bundle, "--port", str(port), "--model-name", "m"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        rates = []
        for _ in range(runs + 1):  # decode rate from the first streamed token on (prefill excluded), first run a warm-up
            first = None
            count = 0
            for chunk in client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=tokens, stream=True,
                                                        extra_body={"response_format": {"type": "regex", "regex": f"[a-z ]{{{tokens * 8}}}"}}):
                if chunk.choices and chunk.choices[0].delta.content:
                    count += 1
                    first = first or time.perf_counter()
            rates.append((count - 1) / (time.perf_counter() - first))
        return statistics.median(rates[1:])
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    engine = edgecpm.load(args.bundle)
    ids = engine.tokenizer.encode(ANSWER, add_bos=False)
    print(f"tokenizer vocabulary {engine.tokenizer.vocab_size}; replayed answer {len(ids)} tokens")
    compile_s, token_s = bench_llguidance(engine, ids, args.runs)
    print(f"llguidance: compile {compile_s * 1e3:.2f} ms, mask+advance {token_s * 1e6:.0f} us/token")
    outlines = bench_outlines(engine, ids, args.runs)
    if outlines:
        print(f"outlines-core: compile {outlines[0] * 1e3:.2f} ms, mask+advance {outlines[1] * 1e6:.0f} us/token")
    # Free text and a never-ending regex both decode exactly --tokens tokens, so the rates compare.
    never_ends = {"type": "regex", "regex": f"[a-z ]{{{args.tokens * 8}}}"}
    free = [final_result(engine.chat_stream(MESSAGES, max_new_tokens=args.tokens, response_format=never_ends))
            for _ in range(args.runs + 1)][1:]
    print(f"in-process decode (regex-constrained): {statistics.median(map(decode_rate, free)):.1f} tok/s")
    schema = [final_result(engine.chat_stream(MESSAGES, max_new_tokens=args.tokens,
                                              response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}}))
              for _ in range(args.runs + 1)][1:]
    print(f"in-process decode (json schema, {schema[0].new_tokens} tokens): {statistics.median(map(decode_rate, schema)):.1f} tok/s")
    print(f"server decode (stream, same regex): {bench_server(args.bundle, args.tokens, args.runs):.1f} tok/s")


if __name__ == "__main__":
    main()
