"""Tiny random checkpoints in the real on-disk formats, one per registered architecture and variant.

`TINY_CONFIGS[(architecture, variant)]` is a config.json dict; `write_hf_checkpoint` writes it with
random weights (safetensors, chosen dtype) and a small byte-level tokenizer with ChatML specials, so the
same files go through the same import path as a real release.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edgecpm.arch import get_architecture
from edgecpm.arch.fields import ConfigFields

VOCAB = 272  # 256 byte tokens + specials, padded
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=[2, 3],
    torch_dtype="float32",
)
_MUP = dict(scale_emb=12, scale_depth=1.4, dim_model_base=16)


def _longrope_factors(half: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(x) for x in np.sort(1.0 + rng.random(half) * 4.0)]


TINY_CONFIGS: dict[tuple[str, str], dict] = {
    ("minicpm", "dense"): {**_BASE, **_MUP, "model_type": "minicpm", "tie_word_embeddings": True},
    ("minicpm", "untied"): {**_BASE, **_MUP, "model_type": "minicpm", "tie_word_embeddings": False},
    ("minicpm", "longrope"): {
        **_BASE, **_MUP, "model_type": "minicpm",
        "rope_scaling": {"rope_type": "longrope", "long_factor": _longrope_factors(8, 1), "short_factor": _longrope_factors(8, 2),
                         "original_max_position_embeddings": 256},
    },
    ("minicpm", "dynamic"): {
        **_BASE, **_MUP, "model_type": "minicpm", "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 4.0},
    },
    ("minicpm", "fatrelu"): {**_BASE, **_MUP, "model_type": "minicpm", "hidden_act": "fatrelu", "hidden_act_param": 0.03},
    ("minicpm", "moe"): {**_BASE, **_MUP, "model_type": "minicpm", "num_experts": 4, "num_experts_per_tok": 2},
    ("llama", "dense"): {**_BASE, "model_type": "llama", "rope_theta": 100000.0, "tie_word_embeddings": True},
    ("llama", "llama3_rope"): {
        **_BASE, "model_type": "llama", "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
    },
    ("minicpm3", "mla"): {
        **_BASE, **_MUP, "model_type": "minicpm3", "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "rope_scaling": {"rope_type": "longrope", "long_factor": _longrope_factors(4, 3), "short_factor": _longrope_factors(4, 4),
                         "original_max_position_embeddings": 256},
    },
    ("minicpm3", "mla_no_q_lora"): {
        **_BASE, **_MUP, "model_type": "minicpm3", "num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16,
    },
}


def parse_tiny_config(key: tuple[str, str]):
    raw = TINY_CONFIGS[key]
    architecture = get_architecture(raw["model_type"])
    names = frozenset() if raw.get("tie_word_embeddings", True) else frozenset({"lm_head.weight"})
    return architecture, architecture.parse_config(ConfigFields(raw, "tiny"), names)


def random_tensors(key: tuple[str, str], seed: int = 0) -> dict[str, np.ndarray]:
    """fp32 random weights for every tensor the architecture expects, scaled to give lively logits."""
    architecture, config = parse_tiny_config(key)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in architecture.tensor_shapes(config).items():
        if len(shape) == 1:
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)
    return tensors


def byte_tokenizer_json() -> str:
    """Byte-level BPE without merges: every byte is a token, plus ChatML specials. Real `tokenizers` object."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert len(vocab) <= VOCAB
    return tokenizer.to_str()


def write_tokenizer_files(directory: Path, *, add_bos: bool = True) -> None:
    (directory / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "add_bos_token": add_bos,
        "chat_template": CHATML_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")


def write_hf_checkpoint(directory: Path, key: tuple[str, str], *, seed: int = 0, dtype: str = "float32",
                        tensors: dict[str, np.ndarray] | None = None) -> Path:
    """config.json + model.safetensors (fp32/fp16/bf16 through torch's writer) + tokenizer files."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(key, seed) if tensors is None else tensors
    torch_dtype = getattr(torch, {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}[dtype])
    save_file({name: torch.from_numpy(array).to(torch_dtype).contiguous() for name, array in tensors.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = dict(TINY_CONFIGS[key])
    config["torch_dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    write_tokenizer_files(directory)
    return directory


def bitcpm_fake_quantized(shape, group, seed=0) -> np.ndarray:
    """Ternary weights stored as bf16-representable floats, like BitCPM4's fake-quantized release."""
    import torch

    rng = np.random.default_rng(seed)
    n, k = shape
    group = k if group is None else group
    scales = np.abs(rng.standard_normal((n, k // group))).astype(np.float32) * 0.05 + 0.01
    signs = rng.integers(-1, 2, size=shape).astype(np.float32)
    weight = signs * np.repeat(scales, group, axis=1)
    return torch.from_numpy(weight).to(torch.bfloat16).float().numpy()


BITCPM = ("minicpm", "bitcpm")


def write_bitcpm_checkpoint(directory: Path, monkeypatch) -> Path:
    """A MiniCPM checkpoint whose decoder projections are BitCPM-style ternary in bf16, layers alternating one
    scale per row and one per 64 weights (hidden 128, so the two differ). No architecture registers this
    variant, so its config enters TINY_CONFIGS only through `monkeypatch`."""
    monkeypatch.setitem(TINY_CONFIGS, BITCPM, {**TINY_CONFIGS[("minicpm", "dense")], "hidden_size": 128,
                                               "intermediate_size": 192})
    tensors = random_tensors(BITCPM)
    for index, name in enumerate(sorted(tensors)):
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            tensors[name] = bitcpm_fake_quantized(tensors[name].shape, None if index % 2 else 64, seed=index)
    return write_hf_checkpoint(directory, BITCPM, tensors=tensors, dtype="bfloat16")
