"""The PyTorch reference models against themselves (cache), transformers, and an independent numpy loop."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecpm.arch import Architecture
from edgecpm.checkpoint import open_checkpoint
from edgecpm.errors import CheckpointError
from edgecpm.models import reference_class, reference_model
from tiny_models import TINY_CONFIGS, VOCAB, parse_tiny_config, random_tensors, write_hf_checkpoint, write_tokenizer_files

CACHE_TOLERANCE = 1e-5  # same model, cached vs uncached: only summation order differs
TRANSFORMERS_TOLERANCE = 1e-4  # fp32 reference vs transformers' fp32 eager models
NUMPY_TOLERANCE = 1e-4  # fp32 reference vs float64 numpy loop
BF16_IMPORT_TOLERANCE = 0.0  # bf16 -> fp32 widening is exact, so loading bf16 must be too

PREFILL, DECODE_STEPS = 7, 5


def token_ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB, size=(1, length)))


def max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def reference_from_checkpoint(directory: Path):
    return reference_model(open_checkpoint(directory))


@torch.no_grad()
def cached_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Our contract: one prefill forward, then one forward per token, all through the same cache."""
    cache = model.new_cache()
    steps = [model(ids[:, :prefill], cache)]
    steps += [model(ids[:, i : i + 1], cache) for i in range(prefill, ids.shape[1])]
    return torch.cat(steps, dim=1)


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def hf_cached_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for i in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


# ------------------------------------------------------------------------------------ coverage


def test_every_registered_variant_has_a_tiny_config():
    registered = {(arch.name, variant) for arch in Architecture.registry.values() for variant in arch.variants}
    assert registered == set(TINY_CONFIGS), (
        f"registered without a tiny config: {sorted(registered - set(TINY_CONFIGS))}; "
        f"tiny configs for unregistered variants: {sorted(set(TINY_CONFIGS) - registered)}"
    )


# ------------------------------------------------------------------------------- cache parity


@pytest.mark.parametrize("key", sorted(TINY_CONFIGS), ids="-".join)
def test_cached_decode_matches_full_forward(tmp_path, key):
    model = reference_from_checkpoint(write_hf_checkpoint(tmp_path, key))
    # 12 positions: well inside every tiny max_position_embeddings (dynamic NTK stays unscaled).
    ids = token_ids(PREFILL + DECODE_STEPS)
    with torch.no_grad():
        full = model(ids, model.new_cache())
    assert full.shape == (1, PREFILL + DECODE_STEPS, VOCAB) and full.dtype == torch.float32
    assert max_diff(full, cached_logits(model, ids, PREFILL)) <= CACHE_TOLERANCE


def test_load_tensors_is_strict():
    key = ("minicpm", "untied")
    _, config = parse_tiny_config(key)
    model = reference_class(key[0])(config)
    tensors = random_tensors(key)
    missing = dict(tensors)
    del missing["lm_head.weight"]
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        model.load_tensors(missing)
    with pytest.raises(CheckpointError, match="extra.weight"):
        model.load_tensors({**tensors, "extra.weight": np.zeros(3, np.float32)})
    wrong_shape = {**tensors, "model.norm.weight": np.ones(3, np.float32)}
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        model.load_tensors(wrong_shape)


# ----------------------------------------------------------------------- MiniCPM3 vs transformers


def hf_minicpm3(config_dict: dict, directory: Path, *, latent_input_scale: float = 1.0):
    """transformers' own MiniCPM3 with random weights, saved as a checkpoint directory (safetensors).

    Configs go to transformers as deep copies: its config classes edit nested rope dicts in place.
    """
    from transformers import AutoModelForCausalLM, MiniCPM3Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MiniCPM3Config(**copy.deepcopy(config_dict)), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1:  # norms start at 1.0; make them matter
                parameter.add_(0.1 * torch.randn_like(parameter))
            if name.endswith(("q_a_proj.weight", "kv_a_proj_with_mqa.weight")):
                # Tiny latents make the latent norms' eps visible in the logits.
                parameter.mul_(latent_input_scale)
    model.save_pretrained(directory)
    write_tokenizer_files(directory)
    return model


@pytest.mark.parametrize("variant", ["mla", "mla_no_q_lora"])
@pytest.mark.parametrize("latent_input_scale", [1.0, 1e-3])
def test_minicpm3_matches_transformers(tmp_path, variant, latent_input_scale):
    theirs = hf_minicpm3(TINY_CONFIGS[("minicpm3", variant)], tmp_path, latent_input_scale=latent_input_scale)
    checkpoint = open_checkpoint(tmp_path)
    # save_pretrained drops lm_head for tied models: the importer must read that as tied.
    assert checkpoint.config.tie_word_embeddings and "lm_head.weight" not in checkpoint.tensors
    ours = reference_model(checkpoint)
    # 12 < original_max_position_embeddings (256): transformers uses the short LongRoPE factors.
    ids = token_ids(PREFILL + DECODE_STEPS)
    with torch.no_grad():
        assert max_diff(ours(ids), hf_logits(theirs, ids)) <= TRANSFORMERS_TOLERANCE
    assert max_diff(cached_logits(ours, ids, PREFILL), hf_cached_logits(theirs, ids, PREFILL)) <= TRANSFORMERS_TOLERANCE


def longrope_crossing(config_dict: dict, original: int) -> dict:
    """The config with a smaller original_max_position_embeddings, so long factors and mscale kick in."""
    rope = {**config_dict["rope_scaling"], "original_max_position_embeddings": original}
    return {**config_dict, "rope_scaling": rope}


def test_minicpm3_longrope_crossing_matches_transformers(tmp_path):
    # original 8, max 256: factor 32 -> attention scaling sqrt(1 + ln 32 / ln 8) on cos and sin. Prefill of 7
    # stays short; every decode step reaches past 8 and uses the long factors, cached keys keep theirs.
    config_dict = longrope_crossing(TINY_CONFIGS[("minicpm3", "mla")], original=8)
    theirs = hf_minicpm3(config_dict, tmp_path)
    ours = reference_from_checkpoint(tmp_path)
    assert ours.config.rope.attention_scaling == pytest.approx(math.sqrt(1 + math.log(32) / math.log(8)))
    ids = token_ids(PREFILL + DECODE_STEPS)
    with torch.no_grad():
        assert max_diff(ours(ids), hf_logits(theirs, ids)) <= TRANSFORMERS_TOLERANCE
    assert max_diff(cached_logits(ours, ids, PREFILL), hf_cached_logits(theirs, ids, PREFILL)) <= TRANSFORMERS_TOLERANCE


# --------------------------------------------------------------- minicpm folded into a plain Llama


def fold_mup(tensors: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """Spec §1.9: move scale_emb, scale_depth/sqrt(L) and 1/(H/dim_model_base) into the weights."""
    folded = dict(tensors)
    embedding = tensors["model.embed_tokens.weight"]
    head = tensors.get("lm_head.weight", embedding)  # untie first: E' != lm_head'
    folded["model.embed_tokens.weight"] = embedding * np.float32(config.scale_emb)
    folded["lm_head.weight"] = head / np.float32(config.logit_scale)
    for name in tensors:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            folded[name] = tensors[name] * np.float32(config.residual_scale)
    return folded


def llama_config_dict(config_dict: dict) -> dict:
    minicpm_only = ("scale_emb", "scale_depth", "dim_model_base", "model_type")
    return {**{k: v for k, v in config_dict.items() if k not in minicpm_only}, "tie_word_embeddings": False}


def hf_llama_from_tensors(config_dict: dict, tensors: dict[str, np.ndarray]):
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(**copy.deepcopy(config_dict)), attn_implementation="eager").eval()
    model.load_state_dict({name: torch.from_numpy(array) for name, array in tensors.items()}, strict=True)
    return model


@pytest.mark.parametrize("variant", ["dense", "untied", "longrope", "dynamic"])
def test_minicpm_folded_into_llama_matches_transformers(tmp_path, variant):
    key = ("minicpm", variant)
    _, config = parse_tiny_config(key)
    assert (config.scale_emb, config.residual_scale, config.logit_scale) != (1.0, 1.0, 1.0)
    tensors = random_tensors(key, seed=3)
    ours = reference_from_checkpoint(write_hf_checkpoint(tmp_path, key, tensors=tensors))
    theirs = hf_llama_from_tensors(llama_config_dict(TINY_CONFIGS[key]), fold_mup(tensors, config))
    ids = token_ids(PREFILL + DECODE_STEPS)
    with torch.no_grad():
        assert max_diff(ours(ids), hf_logits(theirs, ids)) <= TRANSFORMERS_TOLERANCE
    assert max_diff(cached_logits(ours, ids, PREFILL), hf_cached_logits(theirs, ids, PREFILL)) <= TRANSFORMERS_TOLERANCE


PAST_THRESHOLD_CONFIGS = {
    # original 8 < 12 positions: long factors once a forward reaches past 8, mscale from factor 256/8.
    "longrope": lambda config_dict: longrope_crossing(config_dict, original=8),
    # max_position_embeddings 8 < 12 positions: the NTK base grows with every forward past 8.
    "dynamic": lambda config_dict: {**config_dict, "max_position_embeddings": 8},
}


@pytest.mark.parametrize("variant", sorted(PAST_THRESHOLD_CONFIGS))
def test_minicpm_rope_past_threshold_matches_transformers(tmp_path, variant):
    """Prefill 7 stays below the threshold; every decode step crosses it (cached keys keep their rotation)."""
    key = ("minicpm", variant)
    config_dict = PAST_THRESHOLD_CONFIGS[variant](TINY_CONFIGS[key])
    tensors = random_tensors(key, seed=4)
    write_hf_checkpoint(tmp_path, key, tensors=tensors)
    (tmp_path / "config.json").write_text(json.dumps(config_dict), encoding="utf-8")
    ours = reference_from_checkpoint(tmp_path)
    theirs = hf_llama_from_tensors(llama_config_dict(config_dict), fold_mup(tensors, ours.config))
    ids = token_ids(PREFILL + DECODE_STEPS)
    with torch.no_grad():
        assert max_diff(ours(ids), hf_logits(theirs, ids)) <= TRANSFORMERS_TOLERANCE
    assert max_diff(cached_logits(ours, ids, PREFILL), hf_cached_logits(theirs, ids, PREFILL)) <= TRANSFORMERS_TOLERANCE


@pytest.mark.parametrize("variant", ["dense", "llama3_rope"])
def test_llama_matches_transformers(tmp_path, variant):
    from transformers import LlamaForCausalLM

    key = ("llama", variant)
    directory = write_hf_checkpoint(tmp_path, key)
    checkpoint = open_checkpoint(directory)
    # Tying is read from the files (no lm_head.weight -> tied); LlamaConfig's own default is untied, so
    # transformers is told what the files say instead of inventing a random head.
    theirs, info = LlamaForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32,
        tie_word_embeddings=checkpoint.config.tie_word_embeddings, output_loading_info=True,
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = reference_model(checkpoint)
    # 12 positions; llama3's smoothing changes the frequencies themselves, independent of length.
    ids = token_ids(PREFILL + DECODE_STEPS)
    with torch.no_grad():
        assert max_diff(ours(ids), hf_logits(theirs.eval(), ids)) <= TRANSFORMERS_TOLERANCE
    assert max_diff(cached_logits(ours, ids, PREFILL), hf_cached_logits(theirs, ids, PREFILL)) <= TRANSFORMERS_TOLERANCE


# ------------------------------------------------------------- FATReLU and MoE vs a numpy loop


def numpy_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * x / np.sqrt(np.mean(x * x) + eps)


def numpy_silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def numpy_mlp(x: np.ndarray, w: dict[str, np.ndarray], prefix: str, config) -> np.ndarray:
    """One token through the layer's MLP: SiLU GLU, FATReLU GLU or softmax-top-k MoE."""
    if not config.is_moe:
        gate = w[f"{prefix}mlp.gate_proj.weight"] @ x
        if config.hidden_act == "fatrelu":
            gate = np.where(gate > config.hidden_act_param, gate, 0.0)
        else:
            gate = numpy_silu(gate)
        return w[f"{prefix}mlp.down_proj.weight"] @ (gate * (w[f"{prefix}mlp.up_proj.weight"] @ x))
    router = w[f"{prefix}mlp.gate.weight"] @ x
    probs = np.exp(router - router.max())
    probs /= probs.sum()
    chosen = np.argsort(-probs)[: config.num_experts_per_tok]
    out = np.zeros_like(x)
    for expert in chosen:
        e = f"{prefix}mlp.experts.{expert}."
        hidden = numpy_silu(w[f"{e}w1.weight"] @ x) * (w[f"{e}w3.weight"] @ x)
        out += probs[expert] / probs[chosen].sum() * (w[f"{e}w2.weight"] @ hidden)
    return out


def numpy_rope(x: np.ndarray, position: int, theta: float) -> np.ndarray:
    """Rotate-half RoPE for one head vector at one position (default frequencies)."""
    half = x.shape[0] // 2
    angles = position / theta ** (np.arange(half) * 2 / x.shape[0])
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x[:half] * cos - x[half:] * sin, x[half:] * cos + x[:half] * sin])


def numpy_minicpm_logits(tensors: dict[str, np.ndarray], config, ids: np.ndarray) -> np.ndarray:
    """A float64 token-by-token MiniCPM forward written from spec §1 (default RoPE only)."""
    w = {name: array.astype(np.float64) for name, array in tensors.items()}
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    keys: list[list[np.ndarray]] = [[] for _ in range(config.num_hidden_layers)]
    values: list[list[np.ndarray]] = [[] for _ in range(config.num_hidden_layers)]
    logits = []
    for position, token in enumerate(ids):
        h = w["model.embed_tokens.weight"][token] * config.scale_emb
        for layer in range(config.num_hidden_layers):
            p = f"model.layers.{layer}."
            a = numpy_rms_norm(h, w[f"{p}input_layernorm.weight"], config.rms_norm_eps)
            q = (w[f"{p}self_attn.q_proj.weight"] @ a).reshape(heads, d)
            k = (w[f"{p}self_attn.k_proj.weight"] @ a).reshape(kv_heads, d)
            v = (w[f"{p}self_attn.v_proj.weight"] @ a).reshape(kv_heads, d)
            keys[layer].append(np.stack([numpy_rope(k_head, position, config.rope.theta) for k_head in k]))
            values[layer].append(v)
            attended = []
            for head in range(heads):
                kv_head = head // (heads // kv_heads)
                q_head = numpy_rope(q[head], position, config.rope.theta)
                scores = np.array([q_head @ past[kv_head] for past in keys[layer]]) / math.sqrt(d)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                attended.append(sum(wt * past[kv_head] for wt, past in zip(weights, values[layer])))
            h = h + config.residual_scale * (w[f"{p}self_attn.o_proj.weight"] @ np.concatenate(attended))
            m = numpy_rms_norm(h, w[f"{p}post_attention_layernorm.weight"], config.rms_norm_eps)
            h = h + config.residual_scale * numpy_mlp(m, w, p, config)
        y = numpy_rms_norm(h, w["model.norm.weight"], config.rms_norm_eps) / config.logit_scale
        logits.append(w.get("lm_head.weight", w["model.embed_tokens.weight"]) @ y)
    return np.stack(logits)


@pytest.mark.parametrize("variant", ["fatrelu", "moe", "dense"])
def test_minicpm_matches_numpy_loop(tmp_path, variant):
    key = ("minicpm", variant)
    _, config = parse_tiny_config(key)
    assert config.rope.kind == "default"
    tensors = random_tensors(key, seed=5)
    ours = reference_from_checkpoint(write_hf_checkpoint(tmp_path, key, tensors=tensors))
    ids = token_ids(PREFILL + DECODE_STEPS, seed=2)
    expected = numpy_minicpm_logits(tensors, config, ids[0].numpy())
    with torch.no_grad():
        assert max_diff(ours(ids)[0], expected) <= NUMPY_TOLERANCE
    if variant == "fatrelu":
        # The threshold must matter here, or this test could not tell FATReLU from plain ReLU.
        relu = numpy_minicpm_logits(tensors, dataclasses.replace(config, hidden_act_param=0.0), ids[0].numpy())
        assert max_diff(relu, expected) > 10 * NUMPY_TOLERANCE


# --------------------------------------------------------------------------------- bf16 import


def bf16_rounded(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: torch.from_numpy(array).to(torch.bfloat16).float().numpy() for name, array in tensors.items()}


@pytest.mark.parametrize("key", [("minicpm", "untied"), ("minicpm", "moe"), ("minicpm3", "mla")], ids="-".join)
def test_bf16_checkpoint_imports_exactly(tmp_path, key):
    tensors = random_tensors(key, seed=6)
    checkpoint = open_checkpoint(write_hf_checkpoint(tmp_path, key, tensors=tensors, dtype="bfloat16"))
    assert set(checkpoint.stored_dtypes()) == {"BF16"}
    from_bf16 = reference_model(checkpoint)
    _, config = parse_tiny_config(key)
    from_rounded = reference_class(key[0])(config)
    from_rounded.load_tensors(bf16_rounded(tensors))
    ids = token_ids(PREFILL + DECODE_STEPS)
    with torch.no_grad():
        assert max_diff(from_bf16(ids), from_rounded.eval()(ids)) <= BF16_IMPORT_TOLERANCE
