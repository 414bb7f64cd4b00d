"""One measuring process: loads one bundle, runs its prompts and decode steps, reports raw samples (the parent,
edgecpm.report.runner, starts one per bundle and round so each has its own resident-memory peak and load time).

    python -m edgecpm.report.worker SPEC.json      # prints MARK-prefixed JSON lines: progress, then the result

Spec: bundle, kernels, threads, prompt_lengths, new_tokens, mode ("run" | "native_phases" | "onnxruntime_phases"),
phase_steps. Prompts are the shipped evaluation text's tokens; tokens are chosen greedily and stop tokens are ignored,
so every run decodes exactly `new_tokens` steps after the first token.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

MARK = "@edgecpm-profile "


def emit(kind: str, **data: Any) -> None:
    sys.stdout.write(MARK + json.dumps({"type": kind, **data}) + "\n")
    sys.stdout.flush()


def prompt_tokens(tokenizer, count: int) -> list[int]:
    from edgecpm.resources import shipped_text

    ids = tokenizer.encode(shipped_text("evaluation.txt", "evaluation_extra.txt"))
    while len(ids) < count:
        ids = ids + ids
    return [int(t) for t in ids[:count]]


def decoder_of(backend):
    """The native kernels' decoder where they decode (a NativeBackend, or the decode half of a split), else None."""
    return getattr(getattr(backend, "steps", backend), "decoder", None)


def _fits(length: int, new_tokens: int, max_context: int) -> str | None:
    if length + new_tokens > max_context:
        return f"{length} prompt + {new_tokens} new tokens exceed the bundle's max context {max_context}"
    return None


def run(spec: dict) -> dict:
    """Load time, then per prompt length: prefill, the first token, `new_tokens` timed decode steps (+ energy)."""
    from edgecpm.api import load
    from edgecpm.generate import GenerationSettings
    from edgecpm.report.energy import energy_meter
    from edgecpm.report.machine import process_memory

    bundle = Path(spec["bundle"])
    before = process_memory()
    started = time.perf_counter()
    engine = load(bundle, threads=spec.get("threads"), kernels=spec.get("kernels"))
    backend = engine.backend
    load_seconds = time.perf_counter() - started
    after_load = process_memory()
    sample = GenerationSettings(temperature=0.0).sampler()
    max_context = int(engine.manifest.max_context)
    lengths = [int(n) for n in spec["prompt_lengths"]]
    new_tokens = int(spec["new_tokens"])
    ids = prompt_tokens(engine.tokenizer, max(lengths))
    meter = energy_meter()

    warm = ids[:min(16, max_context - 4)]  # not recorded: first-touch page faults, thread pool start
    backend.reset()
    logits = backend.prefill(warm)
    for _ in range(min(4, max_context - len(warm))):
        logits = backend.decode(int(logits.argmax()))

    prompts, skipped = [], []
    for length in lengths:
        reason = _fits(length, new_tokens, max_context)
        if reason:
            skipped.append({"prompt_tokens": length, "reason": reason})
            emit("progress", advance=1 + new_tokens)
            continue
        prompt = ids[:length]
        history = list(prompt)
        backend.reset()
        with meter.measure() as prefill_energy:
            t0 = time.perf_counter()
            logits = backend.prefill(prompt)
            t1 = time.perf_counter()
        token = sample(logits, history)
        t2 = time.perf_counter()
        emit("progress", advance=1)
        forward, sampling = [], []
        with meter.measure() as decode_energy:
            d0 = time.perf_counter()
            for step in range(new_tokens):
                history.append(token)
                s0 = time.perf_counter()
                logits = backend.decode(token)
                s1 = time.perf_counter()
                token = sample(logits, history)
                s2 = time.perf_counter()
                forward.append(s1 - s0)
                sampling.append(s2 - s1)
                if step % 16 == 15:
                    emit("progress", advance=16)
            d1 = time.perf_counter()
        emit("progress", advance=new_tokens % 16)
        prompts.append({
            "prompt_tokens": length, "prefill_seconds": t1 - t0, "first_sampling_seconds": t2 - t1, "ttft_seconds": t2 - t0,
            "decode_steps": new_tokens, "decode_seconds": d1 - d0, "step_forward_seconds": forward,
            "step_sampling_seconds": sampling,
            "prefill_energy_joules": prefill_energy.joules, "decode_energy_joules": decode_energy.joules,
            "decode_energy_by_domain": decode_energy.by_domain or None, "end_position": int(backend.position),
        })
    finished = process_memory()
    kv = getattr(backend, "kv", None)
    kv_bytes = int(sum(a.nbytes for a in kv.arrays)) if kv is not None else None
    decoder = decoder_of(backend)
    data_file = bundle / engine.manifest.data_files[0] if engine.manifest.data_files else None
    return {
        "load_seconds": load_seconds, "kernels": dict(backend.kernels), "max_context": max_context,
        "threads": spec.get("threads"), "prompts": prompts, "skipped": skipped,
        "memory": {"rss_before_load_bytes": before["rss_bytes"], "rss_after_load_bytes": after_load["rss_bytes"],
                   "rss_end_bytes": finished["rss_bytes"], "peak_rss_bytes": finished["peak_rss_bytes"],
                   "kv_allocated_bytes": kv_bytes, "kv_bytes_per_token": kv_bytes // max_context if kv_bytes else None},
        "weights": {"streamed_bytes_per_token": int(decoder.streamed_bytes) if decoder else
                    (data_file.stat().st_size if data_file and data_file.is_file() else None),
                    "source": "native kernels' streamed_bytes (the weights one decode step reads)" if decoder else
                    "size of the bundle's data file (every weight read once per step)"},
        "energy": meter.describe(),
    }


def phases(spec: dict, mode: str) -> dict:
    """A separate, instrumented run at the first prompt length that fits: phase seconds per decode step."""
    from edgecpm.generate import GenerationSettings
    from edgecpm.report import phases as ph
    from edgecpm.runtimes import load_backend

    bundle, new_tokens = Path(spec["bundle"]), int(spec["phase_steps"])
    profiling = None
    if mode == "native_phases":
        from edgecpm.runtimes.native.decoder import PHASE_TIMERS_ENV

        os.environ[PHASE_TIMERS_ENV] = "1"  # this process only: the kernels built with phase timers
        backend = load_backend(bundle, threads=spec.get("threads"), kernels=spec.get("kernels"))
    else:
        with ph.onnxruntime_profiling() as profiling:
            backend = load_backend(bundle, threads=spec.get("threads"), kernels=spec.get("kernels"))
    from edgecpm.api import load

    tokenizer = load(bundle).tokenizer
    max_context = int(backend.max_context)
    length = next((n for n in spec["prompt_lengths"] if not _fits(n, new_tokens, max_context)), None)
    if length is None:
        return {"source": None, "reason": "no prompt length leaves room for the phase steps"}
    prompt = prompt_tokens(tokenizer, length)
    sample = GenerationSettings(temperature=0.0).sampler()
    history = list(prompt)
    logits = backend.prefill(prompt)
    token = sample(logits, history)
    decoder = decoder_of(backend)
    if mode == "native_phases" and (decoder is None or decoder.phase_seconds(reset=True) is None):
        return {"source": None, "reason": "the native kernels do not decode this bundle here"}
    forward, sampling = [], []
    for _ in range(new_tokens):
        history.append(token)
        s0 = time.perf_counter()
        logits = backend.decode(token)
        s1 = time.perf_counter()
        token = sample(logits, history)
        forward.append(s1 - s0)
        sampling.append(time.perf_counter() - s1)
    emit("progress", advance=1)
    steps = len(forward)
    forward_mean, sampling_mean = sum(forward) / steps, sum(sampling) / steps
    if mode == "native_phases":
        native = decoder.phase_seconds()
        measured = ph.native_breakdown(native, steps)
        source = "native kernels' phase timers (kernels.c built with -DEC_PHASE_TIMERS, a separate run)"
        extra: dict[str, Any] = {}
    else:
        result = ph.onnxruntime_phases(ph.read_profile(backend.session.end_profiling()), steps)
        shutil.rmtree(profiling, ignore_errors=True)
        measured = result["per_step_seconds"]
        source = "onnxruntime's profiler, node kernel times by op type (a separate run; the profiler slows steps)"
        extra = {"session_run_seconds": result["session_run_seconds"], "ops_per_step": result["ops"]}
    return {"source": source, "reason": None, "prompt_tokens": length, "steps": steps, "kernels": dict(backend.kernels),
            "measured_seconds_per_step": measured, "forward_seconds_per_step": forward_mean,
            "sampling_seconds_per_step": sampling_mean,
            "per_step_seconds": ph.complete(measured, forward_mean, sampling_mean),
            "step_forward_seconds": forward, "step_sampling_seconds": sampling, **extra}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    mode = spec.get("mode", "run")
    try:
        result = run(spec) if mode == "run" else phases(spec, mode)
    except Exception as error:  # noqa: BLE001 (the parent turns it into one line naming the bundle)
        emit("error", message=str(error) or type(error).__name__, kind=type(error).__name__)
        return 1
    emit("result", data=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
