"""AutoGPTQ v1 checkpoints written from the format description (spec §7.2), independently of edgecpm."""

import json
from pathlib import Path

import numpy as np

from tiny_models import TINY_CONFIGS, random_tensors, write_tokenizer_files

QUANTIZED_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                      "up_proj.weight", "down_proj.weight")


def pack_gptq_v1(weight: np.ndarray, group_size: int, *, symmetric: bool, act_order: bool, seed: int = 0):
    """An AutoGPTQ v1 checkpoint layer written from the format description (spec §7.2), independently
    of edgecpm's converter. Returns (qweight, qzeros, scales, g_idx, dequantized original)."""
    rng = np.random.default_rng(seed)
    n, k = weight.shape
    groups = k // group_size
    g_idx = (np.argsort(rng.permutation(k)) // group_size if act_order else np.arange(k) // group_size).astype(np.int32)
    scales = np.zeros((groups, n), np.float16)
    zeros = np.zeros((groups, n), np.int64)
    codes = np.zeros((k, n), np.int64)
    for g in range(groups):
        members = np.nonzero(g_idx == g)[0]
        block = weight[:, members]
        if symmetric:
            scale = np.abs(block).max(axis=1) / 7.5
            zero = np.full(n, 8)
        else:
            low, high = block.min(axis=1), block.max(axis=1)
            scale = (high - low) / 15
            zero = np.clip(np.round(-low / scale), 1, 15).astype(np.int64)
        scales[g] = scale.astype(np.float16)
        zeros[g] = zero
        codes[members] = np.clip(np.round(block.T / scales[g].astype(np.float32)) + zero, 0, 15)
    qweight = np.zeros((k // 8, n), np.uint32)
    for row in range(k):
        qweight[row // 8] |= (codes[row].astype(np.uint32) << (4 * (row % 8)))
    stored = (zeros - 1).astype(np.uint32)
    qzeros = np.zeros((groups, n // 8), np.uint32)
    for col in range(n):
        qzeros[:, col // 8] |= stored[:, col] << (4 * (col % 8))
    original = np.zeros((n, k), np.float32)
    for row in range(k):
        g = g_idx[row]
        original[:, row] = scales[g].astype(np.float32) * (codes[row] - zeros[g])
    return qweight.view(np.int32), qzeros.view(np.int32), scales, g_idx, original


def write_gptq_checkpoint(directory: Path, key, *, group_size: int, symmetric: bool, act_order: bool,
                          separate_quantize_config: bool = False) -> dict[str, np.ndarray]:
    """A tiny model with every decoder linear GPTQ-packed; returns the dequantized weights it encodes."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    stored, expected = {}, {}
    for index, (name, weight) in enumerate(random_tensors(key).items()):
        if not name.endswith(QUANTIZED_SUFFIXES):
            stored[name] = torch.from_numpy(weight)
            expected[name] = weight
            continue
        qweight, qzeros, scales, g_idx, original = pack_gptq_v1(weight, group_size, symmetric=symmetric,
                                                                act_order=act_order, seed=index)
        prefix = name.removesuffix(".weight")
        stored |= {f"{prefix}.qweight": torch.from_numpy(qweight), f"{prefix}.qzeros": torch.from_numpy(qzeros),
                   f"{prefix}.scales": torch.from_numpy(scales), f"{prefix}.g_idx": torch.from_numpy(g_idx)}
        expected[name] = original
    save_file(stored, str(directory / "model.safetensors"), metadata={"format": "pt"})
    quantization = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": symmetric,
                    "desc_act": act_order, "checkpoint_format": "gptq"}
    config = dict(TINY_CONFIGS[key])
    if separate_quantize_config:
        (directory / "quantize_config.json").write_text(json.dumps(quantization))
    else:
        config["quantization_config"] = quantization
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_files(directory)
    return expected
