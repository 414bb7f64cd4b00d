"""Option definitions shared by several commands, declared once.

Generation options default to None, meaning "not given": the defaults live in one place,
`edgecpm.generate.GenerationSettings`, and `generation_options` passes on only what the user set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

JSON_OUTPUT = typer.Option(False, "--json", help="Print one JSON object instead of human-readable output.")
CHECKPOINT_OR_BUNDLE = typer.Argument(..., help="An HF checkpoint directory, a GGUF file, or an edgecpm bundle.", show_default=False)
BUNDLE = typer.Argument(..., help="An edgecpm bundle directory (made by `edgecpm export`).", show_default=False)
THREADS = typer.Option(None, "--threads", min=1, help="CPU threads for the runtime (default: the runtime's choice).")
KERNELS = typer.Option(None, "--kernels", help="Who runs the bundle: auto (its TensorRT engine for this GPU, else edgecpm's "
                       "native kernels where they are faster, else onnxruntime), tensorrt, native, native-exact (the "
                       "native kernels with exact float activations instead of int8: fp32-exact logits of the quantized "
                       "weights, slower) or onnxruntime (default: $EDGECPM_KERNELS, else auto).",
                       show_default=False)
ATTENTION = typer.Option(None, "--attention", help="auto (the model's own choice: InfLLM v2 sparse attention where it has a "
                         "sparse_config, dense below its dense_len), dense, or sparse (on the native kernels) [default: auto]",
                         show_default=False)
KV_CACHE = typer.Option(None, "--kv-cache", help="What the KV cache stores: float32, or float16 (half the memory, so twice "
                        "the context in a budget; native kernels) [default: float32]", show_default=False)
SPARSE_CONFIG = typer.Option(None, "--sparse-config", help="Set or override a sparse_config field, KEY=VALUE (e.g. "
                             "dense_len=1024, topk=32), or a JSON file of them; repeatable.", show_default=False)
SYSTEM = typer.Option(None, "--system", help="A system message placed before the conversation.")
DEVICE = typer.Option(None, "--device", help="A device profile name (`edgecpm devices`) or a profile .toml file: export "
                      "settings tuned for it and a memory plan against its budget.", show_default=False)

# Quantized export (export). Plain strings/ints, checked by QuantSpec.validate, so a bad value is the
# same one-line error (exit 1) from the CLI and the Python API.
QUANT = typer.Option("auto", "--quant", help="Decoder weights: none, int8, int4 or ternary (BitCPM, ort flavour); auto: "
                     "the --device profile's choice, else none.")
METHOD = typer.Option("auto", "--method", help="auto: a GGUF file's own Q4_0/Q4_1/Q8_0 blocks where present, else rtn; "
                      "rtn: round to nearest; gptq: calibrated int4/int8; source: the GGUF blocks; lossless: exact "
                      "ternary packing of BitCPM weights (fails on anything else).")
BLOCK_SIZE = typer.Option(32, "--block-size", help="Weights per scale along the input dimension: 16, 32, 64 or 128.")
ASYMMETRIC = typer.Option(False, "--asymmetric", help="Per-block zero points (int4/int8, ort flavour only).")
LM_HEAD = typer.Option("auto", "--lm-head", help="LM head storage: auto (int8 with --quant int8, else int6), int8, int6 "
                       "(6-bit values in 8-bit codes; the native kernels stream 6 bits), int4 or none (with --quant).")
EMBEDDINGS = typer.Option("auto", "--embeddings", help="Embedding table storage: auto (as --lm-head's), int8, int6, int4 or "
                          "none (with --quant).")
ACCURACY_LEVEL = typer.Option(4, "--accuracy-level", help="MatMulNBits compute (ort): 4 = int8 activations, fastest on "
                              "CPU; 0 = activation dtype, exact.")
MAX_PPL_INCREASE = typer.Option(None, "--max-ppl-increase", help="Fail (and write nothing) if the quality gate measures "
                                "a larger relative perplexity increase, e.g. 0.05 for +5%.")
QUALITY_TOKENS = typer.Option(None, "--quality-tokens", min=2, help="Evaluation tokens the quality gate runs "
                              "(default: edgecpm.export.QUALITY_TOKENS, capped at --max-context).", show_default=False)

# Sampling and stopping (run, chat).
MAX_NEW_TOKENS = typer.Option(None, "--max-new-tokens", help="Most tokens to generate (default: 256).")
TEMPERATURE = typer.Option(None, "--temperature", help="Sampling temperature; 0 is greedy (default: 0).")
TOP_P = typer.Option(None, "--top-p", help="Nucleus sampling: keep tokens up to this probability mass, in (0, 1] (default: 1).")
TOP_K = typer.Option(None, "--top-k", help="Keep only the K most likely tokens; 0 is off (default: 0).")
REPETITION_PENALTY = typer.Option(None, "--repetition-penalty", help="Above 1 discourages repeating tokens (default: 1).")
SEED = typer.Option(None, "--seed", help="Seed for sampling, for reproducible output.")
STOP = typer.Option(None, "--stop", help="Stop when the text contains this string (not printed); repeatable.")


def generation_options(*, max_new_tokens: int | None, temperature: float | None, top_p: float | None, top_k: int | None,
                       repetition_penalty: float | None, seed: int | None, stop: list[str] | None,
                       truncate: bool = False) -> dict[str, Any]:
    """The options the user set, named as `GenerationSettings` fields (validated there)."""
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   repetition_penalty=repetition_penalty, seed=seed, stop_strings=tuple(stop) if stop else None,
                   truncate="left" if truncate else None)
    return {name: value for name, value in options.items() if value is not None}


def existing_path(path: Path) -> Path:
    from edgecpm.errors import EdgecpmError

    if not path.exists():
        raise EdgecpmError("no such file or directory", path=path)
    return path


def attention_choice(attention: str | None, sparse_config: list[str] | None):
    """--attention and --sparse-config as one validated edgecpm.sparse.choice.AttentionChoice."""
    from edgecpm.sparse.choice import AttentionChoice, parse_overrides

    return AttentionChoice(attention or "auto", parse_overrides(sparse_config)).validate()
