"""`edgecpm chat BUNDLE`: a multi-turn conversation in the terminal.

Each turn renders the whole conversation with the chat template; the engine keeps the KV cache of the
earlier turns and prefills only the tokens after the common prefix, so a turn costs its own length, not
the conversation's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from edgecpm.cli import app
from edgecpm.cli.options import (
    ATTENTION, BUNDLE, KERNELS, KV_CACHE, MAX_NEW_TOKENS, REPETITION_PENALTY, SEED, STOP, SYSTEM, TEMPERATURE, THREADS, TOP_K, TOP_P,
    SPARSE_CONFIG, attention_choice, existing_path, generation_options,
)

HELP = "Type a message. /reset starts over, /exit (or Ctrl-D) quits."


@app.command()
def chat(
    bundle: Path = BUNDLE,
    system: str | None = SYSTEM,
    max_new_tokens: int | None = MAX_NEW_TOKENS,
    temperature: float | None = TEMPERATURE,
    top_p: float | None = TOP_P,
    top_k: int | None = TOP_K,
    repetition_penalty: float | None = REPETITION_PENALTY,
    seed: int | None = SEED,
    stop: list[str] | None = STOP,
    threads: int | None = THREADS,
    kernels: str | None = KERNELS,
    attention: str | None = ATTENTION,
    sparse_config: list[str] | None = SPARSE_CONFIG,
    kv_cache: str | None = KV_CACHE,
    speed: bool = typer.Option(False, "--speed", help="Print prefill and decode speeds after each answer."),
) -> None:
    """Chat with a bundle; earlier turns stay in the KV cache."""
    from rich.console import Console

    from edgecpm.api import load
    from edgecpm.cli.streaming import print_stream, speed_line
    from edgecpm.errors import EdgecpmError

    console = Console(stderr=True)
    choice = attention_choice(attention, sparse_config)
    engine = load(existing_path(bundle), threads=threads, kernels=kernels, attention=choice.mode, sparse_config=choice.overrides,
                  kv_cache=kv_cache)
    options = generation_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 repetition_penalty=repetition_penalty, seed=seed, stop=stop)
    engine.settings(**options)  # bad values fail now, not after the first message
    with console.status("loading the model"):
        engine.backend  # noqa: B018  (starts the runtime session before the first prompt)
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    console.print(HELP, style="dim")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            messages = list(opening)
            engine.reset()
            console.print("(conversation cleared)", style="dim")
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        try:
            result = print_stream(engine.chat_stream(messages, **options))
        except EdgecpmError as exc:
            messages.pop()
            console.print(f"error: {exc}" + (" (/reset starts over)" if "context" in str(exc) else ""), style="red")
            continue
        print()
        messages.append({"role": "assistant", "content": result.text})
        if speed:
            console.print(speed_line(result), style="dim")
        sys.stdout.flush()
