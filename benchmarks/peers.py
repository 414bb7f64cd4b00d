"""Peer engines for the decode benchmark: one function per engine, all with the same contract.

    fn(paths, prompt_ids, new_tokens=128, runs=3, threads=2) -> dict

``paths`` is the dict from ``prepare_weights.paths()``; ``prompt_ids`` a list of token ids (already
chat-formatted, shared by all engines: every engine here uses the same vocabulary, the GGUF's).

Measurement contract (keep it for any engine added later, e.g. edgecpm):

* greedy decoding; EOS is suppressed (its logit is never picked) so every run makes exactly ``new_tokens``
  tokens and every engine's token ids are comparable;
* prefill = wall time to process the whole prompt and produce the first logits (+ pick token 1);
* decode  = wall time of the following ``new_tokens - 1`` single-token forward passes (+ greedy pick),
  i.e. tokens 2..new_tokens; ``decode_tokens_per_second = (new_tokens - 1) / decode_time``;
* the model/session is loaded once, outside the timings; one warm-up run, then ``runs`` timed runs, and the
  reported numbers are medians over the timed runs (per-run numbers are kept under ``"runs"``).

Returned dict keys: ``engine, prefill_tokens_per_second, decode_tokens_per_second, prompt_tokens,
new_tokens, token_ids, prefill_seconds, decode_seconds, runs``.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from pathlib import Path
from typing import Callable

EOS_ID = 2  # <|im_end|> (SmolLM2-Instruct); suppressed so every engine generates exactly new_tokens tokens

# The fixed prompt (chat formatted by the model's own template; ~100 tokens incl. the default system turn).
PROMPT_MESSAGES = [
    {
        "role": "user",
        "content": (
            "I am planning a week-long hiking trip in the mountains with two friends. "
            "We will carry our own tents and cook our own food, and the weather there can change quickly. "
            "Could you explain, step by step, what equipment we should pack, how we should plan our daily "
            "distances and water supply, and what we should do if a storm arrives while we are far from shelter?"
        ),
    }
]


def prompt_ids(hf_dir: str | Path) -> list[int]:
    """Chat-formatted token ids of the fixed prompt, from the prepared HF tokenizer (no model load)."""
    from tokenizers import Tokenizer
    import jinja2
    import json

    hf_dir = Path(hf_dir)
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    template = tc.get("chat_template") or (hf_dir / "chat_template.jinja").read_text()
    text = jinja2.Environment().from_string(template).render(messages=PROMPT_MESSAGES, add_generation_prompt=True)
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    return tok.encode(text, add_special_tokens=False).ids


def decode_text(hf_dir: str | Path, ids: list[int]) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json")).decode(ids, skip_special_tokens=False)


# ------------------------------------------------------------------------------------------------------ helpers


def _summarize(engine: str, per_run: list[dict], n_prompt: int, new_tokens: int) -> dict:
    pre = statistics.median(r["prefill_seconds"] for r in per_run)
    dec = statistics.median(r["decode_seconds"] for r in per_run)
    ids = per_run[-1]["token_ids"]
    if any(r["token_ids"] != ids for r in per_run):
        print(f"[{engine}] warning: token ids differ between runs", flush=True)
    return {
        "engine": engine,
        "prefill_tokens_per_second": statistics.median(n_prompt / r["prefill_seconds"] for r in per_run),
        "decode_tokens_per_second": statistics.median((new_tokens - 1) / r["decode_seconds"] for r in per_run),
        "prompt_tokens": n_prompt,
        "new_tokens": new_tokens,
        "token_ids": ids,
        "prefill_seconds": pre,
        "decode_seconds": dec,
        "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in per_run],
    }


def _repeat(engine: str, one_run: Callable[[], dict], n_prompt: int, new_tokens: int, runs: int) -> dict:
    one_run()  # warm-up (allocations, kernel selection, page faults on the weights)
    per_run = [one_run() for _ in range(runs)]
    return _summarize(engine, per_run, n_prompt, new_tokens)


def _argmax_no_eos(logits) -> int:
    """Greedy pick over a 1-D numpy float array with EOS masked."""
    import numpy as np

    row = np.array(logits, dtype=np.float32, copy=True).reshape(-1)
    row[EOS_ID] = -np.inf
    return int(row.argmax())


# ------------------------------------------------------------------------------------------------ transformers


def run_transformers(paths: dict, prompt: list[int], new_tokens: int = 128, runs: int = 3, threads: int = 2) -> dict:
    """transformers eager, fp32, attn_implementation="eager", torch threads = ``threads``; manual greedy loop
    with a DynamicCache (the same work model.generate does, but with prefill and decode timed apart)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(paths["hf"]), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids0 = torch.tensor([prompt], dtype=torch.long)

    def pick(logits: torch.Tensor) -> int:
        logits = logits[0, -1].clone()
        logits[EOS_ID] = -float("inf")
        return int(logits.argmax())

    @torch.inference_mode()
    def one_run() -> dict:
        out_ids: list[int] = []
        t0 = time.perf_counter()
        out = model(input_ids=ids0, use_cache=True, logits_to_keep=1)
        nxt = pick(out.logits)
        t1 = time.perf_counter()
        out_ids.append(nxt)
        past = out.past_key_values
        for _ in range(new_tokens - 1):
            out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = pick(out.logits)
            out_ids.append(nxt)
        t2 = time.perf_counter()
        return {"prefill_seconds": t1 - t0, "decode_seconds": t2 - t1, "token_ids": out_ids}

    try:
        return _repeat("transformers-eager-fp32", one_run, len(prompt), new_tokens, runs)
    finally:
        del model
        gc.collect()


# ------------------------------------------------------------------------------------------- onnxruntime-genai


def _run_ortgenai(engine: str, model_dir: Path, prompt: list[int], new_tokens: int, runs: int, threads: int) -> dict:
    import json

    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()  # CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    total = len(prompt) + new_tokens

    def one_run() -> dict:
        params = og.GeneratorParams(model)
        # min_length == max_length: EOS is masked until the end, exactly new_tokens tokens are made.
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        gen = og.Generator(model, params)
        out_ids: list[int] = []
        t0 = time.perf_counter()
        gen.append_tokens(prompt)  # runs the prompt through the model (first logits)
        gen.generate_next_token()  # greedy pick from the prefill logits (no forward pass)
        out_ids.append(int(gen.get_next_tokens()[0]))
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            gen.generate_next_token()  # one single-token forward + greedy pick
            out_ids.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        del gen
        return {"prefill_seconds": t1 - t0, "decode_seconds": t2 - t1, "token_ids": out_ids}

    try:
        return _repeat(engine, one_run, len(prompt), new_tokens, runs)
    finally:
        del model
        gc.collect()


def run_ortgenai_fp32(paths: dict, prompt: list[int], new_tokens: int = 128, runs: int = 3, threads: int = 2) -> dict:
    return _run_ortgenai("onnxruntime-genai-fp32", Path(paths["ortgenai_fp32"]), prompt, new_tokens, runs, threads)


def run_ortgenai_int4(paths: dict, prompt: list[int], new_tokens: int = 128, runs: int = 3, threads: int = 2) -> dict:
    return _run_ortgenai("onnxruntime-genai-int4", Path(paths["ortgenai_int4"]), prompt, new_tokens, runs, threads)


# ---------------------------------------------------------------------------------------------------- llama.cpp


def _run_llama_cpp(engine: str, gguf: Path, prompt: list[int], new_tokens: int, runs: int, threads: int) -> dict:
    """llama-cpp-python, ``Llama.eval`` (prompt in one n_batch=512 batch, then one token per call); greedy pick
    in numpy from the last-position logits. n_ctx 2048, ``threads`` for both batch and single-token work."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)

    import llama_cpp
    import numpy as np

    n_vocab = llm.n_vocab()

    def last_logits():
        # Llama.eval() only copies logits into llm.scores when logits_all=True; read the last output row
        # straight from the context instead (no copy; _argmax_no_eos copies once).
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))

    def one_run() -> dict:
        llm.reset()  # n_tokens = 0; eval() drops KV cells past n_tokens
        out_ids: list[int] = []
        t0 = time.perf_counter()
        llm.eval(prompt)
        nxt = _argmax_no_eos(last_logits())
        t1 = time.perf_counter()
        out_ids.append(nxt)
        for _ in range(new_tokens - 1):
            llm.eval([nxt])
            nxt = _argmax_no_eos(last_logits())
            out_ids.append(nxt)
        t2 = time.perf_counter()
        return {"prefill_seconds": t1 - t0, "decode_seconds": t2 - t1, "token_ids": out_ids}

    try:
        return _repeat(engine, one_run, len(prompt), new_tokens, runs)
    finally:
        llm.close()
        del llm
        gc.collect()


def run_llama_cpp_f32(paths: dict, prompt: list[int], new_tokens: int = 128, runs: int = 3, threads: int = 2) -> dict:
    return _run_llama_cpp("llama.cpp-f32", Path(paths["gguf_f32"]), prompt, new_tokens, runs, threads)


def run_llama_cpp_q4_0(paths: dict, prompt: list[int], new_tokens: int = 128, runs: int = 3, threads: int = 2) -> dict:
    return _run_llama_cpp("llama.cpp-q4_0", Path(paths["gguf_q4_0"]), prompt, new_tokens, runs, threads)
