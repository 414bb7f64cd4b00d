"""The memory and context planner against arithmetic done by hand from the released configs (spec §2), and
against the bytes real exports write (every registered tiny architecture, float and quantized)."""

from __future__ import annotations

import numpy as np
import pytest

from edgecpm.arch import get_architecture
from edgecpm.arch.fields import ConfigFields
from edgecpm.bundle import read_manifest
from edgecpm.checkpoint import open_checkpoint
from edgecpm.devices.profile import load_profile
from edgecpm.errors import UnsupportedError
from edgecpm.export import export_checkpoint
from edgecpm.export_plan import plan_export
from edgecpm.planner import RUNTIME_BYTES, Storage, plan_memory
from edgecpm.quant.spec import QuantSpec
from tiny_models import TINY_CONFIGS, write_hf_checkpoint

MUP = {"scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256, "rms_norm_eps": 1e-5, "bos_token_id": 1,
       "eos_token_id": [2, 73440], "vocab_size": 73448}


def _longrope(half: int, original: int) -> dict:
    factors = list(np.linspace(1.0, 2.0, half))
    return {"rope_type": "longrope", "long_factor": factors, "short_factor": factors, "original_max_position_embeddings": original}


# The released configs' shapes (spec §2); rope factor values do not change any byte count.
MINICPM4_05B = {**MUP, "model_type": "minicpm", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                "num_key_value_heads": 2, "intermediate_size": 4096, "max_position_embeddings": 32768,
                "rope_scaling": _longrope(32, 32768)}
MINICPM4_8B = {**MUP, "model_type": "minicpm", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 2, "intermediate_size": 16384, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
               "rope_scaling": _longrope(64, 32768)}
MINICPM3_4B = {**MUP, "model_type": "minicpm3", "hidden_size": 2560, "num_hidden_layers": 62, "num_attention_heads": 40,
               "num_key_value_heads": 40, "intermediate_size": 6400, "max_position_embeddings": 32768, "q_lora_rank": 768,
               "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "rope_scaling": _longrope(16, 32768)}


def config(raw: dict, *, tied: bool):
    names = frozenset() if tied else frozenset({"lm_head.weight"})
    return get_architecture(raw["model_type"]).parse_config(ConfigFields(raw, "config.json"), names)


INT4 = QuantSpec(scheme="int4", block_size=32)  # tables: int6 values in 8-bit codes


def test_minicpm4_05b_by_hand():
    # per layer: q 1024*1024 + k,v 2*1024*128 + o 1024*1024 + gate,up,down 3*1024*4096 = 14,942,208; x24 = 358,612,992
    # table 73448*1024 = 75,210,752 (tied); norms (2*24 + 1)*1024 = 50,176
    cfg = config(MINICPM4_05B, tied=True)
    fp32 = plan_memory(cfg, Storage("fp32"))
    assert fp32.weight_bytes_by_role == {"layers": 358_612_992 * 4, "embeddings": 75_210_752 * 4,
                                         "lm_head": 75_210_752 * 4,  # the ort default duplicates the tied table for the head
                                         "norms": 50_176 * 4, "rope_bytes_per_position": 2 * 32 * 4}
    assert fp32.kv_bytes_per_token == 2 * 24 * 2 * 64 * 4 == 24_576
    int4 = plan_memory(cfg, Storage("fp16", INT4))
    # int4 codes 358,612,992 / 2 + one fp16 scale per 32: 11,206,656 * 2; the int6 table in 8-bit codes, read by the head
    assert int4.weight_bytes == (179_306_496 + 22_413_312) + (75_210_752 + 2_350_336 * 2) + 50_176 * 2 == 281_731_584
    assert int4.weight_bytes_by_role["lm_head"] == 0
    assert int4.kv_bytes_per_token == 12_288


def test_minicpm4_8b_fp16_is_refused_on_the_orin_nano_naming_int4():
    # per layer: q,o 2*4096^2 + k,v 2*4096*256 + mlp 3*4096*16384 = 236,978,176; x32 = 7,583,301,632
    # untied: table and head 2 * 73448*4096 = 601,686,016; norms 65*4096 = 266,240 -> 8,185,253,888 parameters
    cfg = config(MINICPM4_8B, tied=False)
    nano = load_profile("jetson-orin-nano-8gb")
    fp16 = plan_memory(cfg, Storage("fp16"), nano)
    assert fp16.weight_bytes == 8_185_253_888 * 2 and not fp16.fits and fp16.max_context == 0
    assert fp16.kv_bytes_per_token == 2 * 32 * 2 * 128 * 2 == 32_768
    int4 = plan_memory(cfg, Storage("fp16", INT4), nano)
    # layers 3,791,650,816 + 236,978,176 * 2; table and head each 300,843,008 + 9,401,344 * 2; norms 266,240 * 2
    assert int4.weight_bytes == 4_265_607_168 + 2 * 319_645_696 + 532_480 == 4_905_431_040
    room = nano.budget_bytes - int4.weight_bytes - RUNTIME_BYTES["gpu"]
    per_position = 32_768 + 32 * int4.prefill_pass_tokens * 4 + 2 * 64 * 2
    assert int4.max_context == min(room // per_position, nano.export.max_context or 1 << 30) and int4.fits


def test_minicpm3_latent_cache_by_hand():
    cfg = config(MINICPM3_4B, tied=True)
    plan = plan_memory(cfg, Storage("fp16"))
    assert plan.kv_bytes_per_token == 62 * (256 + 32) * 2 == 35_712  # the latent, not 40 heads * (96 + 64)
    # per layer: q_a 2560*768 + q_b 768*40*96 + kv_a 2560*288 + kv_b 256*40*128 + o 40*64*2560 + mlp 3*2560*6400
    # = 1,966,080 + 2,949,120 + 737,280 + 1,310,720 + 6,553,600 + 49,152,000 = 62,668,800; x62 = 3,885,465,600
    assert plan.weight_bytes_by_role["layers"] == 3_885_465_600 * 2
    # kv_b_proj is absorbed into per-head matmuls and stays float under int4: 62 * 1,310,720 at fp16
    int4 = plan_memory(cfg, Storage("fp16", INT4))
    quantized = 3_885_465_600 - 62 * 1_310_720
    assert int4.weight_bytes_by_role["layers"] == quantized // 2 + quantized // 32 * 2 + 62 * 1_310_720 * 2


def test_bitcpm4_ternary_by_hand():
    cfg = config(MINICPM4_05B, tied=True)  # BitCPM4-0.5B has MiniCPM4-0.5B's shapes
    plan = plan_memory(cfg, Storage("fp32", QuantSpec(scheme="ternary", block_size=64)))
    assert plan.weight_bytes_by_role["layers"] == 358_612_992 // 4 + 358_612_992 // 64 * 4  # 2-bit codes, fp32 scales
    assert plan.weight_bytes_by_role["embeddings"] == 75_210_752 + 75_210_752 // 64 * 4  # int6 table: 8-bit codes


def test_largest_context_fits_the_budget_exactly():
    cfg = config(MINICPM4_05B, tied=True)
    orin = load_profile("jetson-agx-orin-64gb")
    plan = plan_memory(cfg, Storage("fp16", INT4), orin)
    assert plan.max_context == min(orin.export.max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    assert plan.total_bytes(plan.max_context) <= orin.budget_bytes
    cpu = load_profile("arm-cpu")
    big = plan_memory(config(MINICPM4_8B, tied=False), Storage("fp32", QuantSpec(scheme="int8")), cpu)
    if big.max_context and big.max_context < (cpu.export.max_context or 1 << 30):
        assert big.total_bytes(big.max_context) <= cpu.budget_bytes < big.total_bytes(big.max_context + 1)


@pytest.mark.parametrize("key", sorted(TINY_CONFIGS), ids=lambda key: "-".join(key))
def test_plan_bytes_are_what_the_export_writes(tmp_path, key):
    """Every registered architecture and variant: the plan's bytes equal the exported tensor index, float and int4."""
    checkpoint = open_checkpoint(write_hf_checkpoint(tmp_path / "ck", key))
    for flavour, dtype, quant in (("ort", "fp32", None), ("standard", "fp16", None), ("ort", "fp32", INT4),
                                  ("standard", "fp16", INT4)):
        if quant is not None and checkpoint.config.is_moe:
            continue  # experts are exported float (the quantizer skips them)
        out = tmp_path / f"{flavour}-{dtype}-{quant is not None}"
        export_checkpoint(checkpoint, out, flavour=flavour, dtype=dtype, max_context=64, quant=quant, quality_tokens=8)
        manifest = read_manifest(out)
        spec = QuantSpec.from_dict(manifest.quantization) if manifest.quantization else None
        plan = plan_memory(checkpoint.config, Storage(dtype, spec))
        written = sum(entry["length"] for entry in manifest.tensors.values())
        assert plan.weight_bytes + plan.rope_bytes(64) == written, (flavour, dtype, quant)


def test_export_plan_resolves_flags_then_profile_then_defaults(tmp_path):
    checkpoint = open_checkpoint(write_hf_checkpoint(tmp_path / "ck", ("minicpm", "dense")))
    plain = plan_export(checkpoint)
    assert (plain.options.flavour, plain.options.precision, plain.quant) == ("ort", "fp32", None)
    assert plain.options.max_context == 256  # the smaller of the default 2048 and the model's 256 positions
    assert plain.chosen_by["max_context"] == "model" and plain.device is None
    orin = plan_export(checkpoint, device="jetson-agx-orin-64gb")
    assert (orin.options.flavour, orin.options.precision, orin.quant.scheme, orin.quant.symmetric) == ("standard", "fp16", "int4", True)
    assert orin.chosen_by == {"flavour": "profile", "dtype": "profile", "quant": "profile", "max_context": "plan"}
    assert orin.device.name == "jetson-agx-orin-64gb" and len(orin.device.sha256) == 64
    flagged = plan_export(checkpoint, device="jetson-agx-orin-64gb", flavour="ort", dtype="fp32", quant=QuantSpec("int8"),
                          max_context=128)
    assert (flagged.options.flavour, flagged.options.precision, flagged.quant.scheme, flagged.options.max_context) == (
        "ort", "fp32", "int8", 128)
    assert set(flagged.chosen_by.values()) == {"flag"}
    with pytest.raises(UnsupportedError, match="exceeds the model's max_position_embeddings"):
        plan_export(checkpoint, device="x86-avx2", max_context=512)
