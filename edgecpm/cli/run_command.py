"""`edgecpm run BUNDLE --prompt TEXT`: one answer, streamed to stdout (or one JSON object with --json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from edgecpm.cli import app
from edgecpm.cli.options import (
    ATTENTION, BUNDLE, JSON_OUTPUT, KERNELS, KV_CACHE, MAX_NEW_TOKENS, REPETITION_PENALTY, SEED, STOP, SYSTEM, TEMPERATURE, THREADS, TOP_K,
    TOP_P, SPARSE_CONFIG, attention_choice, existing_path, generation_options,
)

JSON_FIELDS = ("text", "token_ids", "prompt_token_ids", "finish_reason", "new_tokens", "prefill_seconds",
               "prefill_tokens_per_second", "decode_tokens_per_second")


def read_prompt(prompt: str) -> str:
    """The prompt text; `-` reads stdin (UTF-8, one trailing newline dropped as `echo` adds it)."""
    if prompt != "-":
        return prompt
    from edgecpm.errors import GenerationError

    try:
        text = sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GenerationError(f"stdin is not UTF-8 text (bad byte at offset {exc.start})") from None
    return text[:-1] if text.endswith("\n") else text


@app.command()
def run(
    bundle: Path = BUNDLE,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt; `-` reads it from stdin.", show_default=False),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is instead of as a user message in the chat template."),
    system: str | None = SYSTEM,
    max_new_tokens: int | None = MAX_NEW_TOKENS,
    temperature: float | None = TEMPERATURE,
    top_p: float | None = TOP_P,
    top_k: int | None = TOP_K,
    repetition_penalty: float | None = REPETITION_PENALTY,
    seed: int | None = SEED,
    stop: list[str] | None = STOP,
    truncate: bool = typer.Option(False, "--truncate", help="Drop the oldest prompt tokens when they do not fit the context."),
    threads: int | None = THREADS,
    kernels: str | None = KERNELS,
    attention: str | None = ATTENTION,
    sparse_config: list[str] | None = SPARSE_CONFIG,
    kv_cache: str | None = KV_CACHE,
    json_output: bool = JSON_OUTPUT,
) -> None:
    """Generate one answer for a prompt, streaming it to stdout; speeds go to stderr."""
    from edgecpm.api import load
    from edgecpm.cli.streaming import print_stream, speed_line

    choice = attention_choice(attention, sparse_config)
    engine = load(existing_path(bundle), threads=threads, kernels=kernels, attention=choice.mode, sparse_config=choice.overrides,
                  kv_cache=kv_cache)
    options = generation_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 repetition_penalty=repetition_penalty, seed=seed, stop=stop, truncate=truncate)
    events = engine.stream(read_prompt(prompt), system=system, raw=raw, **options)
    result = print_stream(events, echo=not json_output)
    if json_output:
        summary = result.to_dict()
        report = {name: summary[name] for name in JSON_FIELDS}
        report["kernels"] = getattr(engine.backend, "kernels", None)
        print(json.dumps(report, ensure_ascii=False))
        return
    print()
    print(speed_line(result), file=sys.stderr)
