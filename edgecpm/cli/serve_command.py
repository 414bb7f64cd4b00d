"""`edgecpm serve BUNDLE`: an OpenAI-compatible HTTP server (loopback by default)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from edgecpm.cli import app
from edgecpm.cli.options import BUNDLE, KERNELS, KV_CACHE, THREADS, existing_path


@app.command()
def serve(
    bundle: Path = BUNDLE,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs --api-key."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1 "
                                       "(default: $EDGECPM_API_KEY).", show_default=False),
    model_name: str | None = typer.Option(None, "--model-name", help="The model id clients send (default: the bundle "
                                          "directory's name).", show_default=False),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait behind the running one; more get 429."),
    max_tokens: int = typer.Option(4096, "--max-tokens-limit", help="Most tokens one request may ask for."),
    max_body_bytes: int = typer.Option(1024 * 1024, "--max-body-bytes", help="Largest request body accepted."),
    request_timeout: float = typer.Option(300.0, "--request-timeout", help="Seconds a request may take, queueing "
                                          "included; then it ends with finish_reason 'time'."),
    threads: int | None = THREADS,
    kernels: str | None = KERNELS,
    kv_cache: str | None = KV_CACHE,
) -> None:
    """Serve a bundle over HTTP: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
    from edgecpm.optional import require
    from edgecpm.serve.config import ServeConfig

    for module in ("uvicorn", "starlette", "sse_starlette", "llguidance"):
        require(module, "serve", "edgecpm serve")
    debug = "--debug" in sys.argv[1:]  # the global option, read by edgecpm.cli.main the same way
    config = ServeConfig(existing_path(bundle), host=host, port=port, api_key=api_key or os.environ.get("EDGECPM_API_KEY"),
                         model_name=model_name, max_queue=max_queue, max_tokens_limit=max_tokens,
                         max_body_bytes=max_body_bytes, request_timeout=request_timeout, threads=threads, kernels=kernels,
                         kv_cache=kv_cache, debug=debug).validate()
    from edgecpm.serve.app import serve as run_server

    run_server(config)
