"""Checkpoint import: GGUF vs HF parity, every HF weight layout, tokenizer files, `inspect --json`, laziness."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy_safetensors
from safetensors.torch import save_file as save_torch_safetensors

from edgecpm.checkpoint import open_checkpoint
from gguf_writer import Q, write_gguf
from tiny_models import CHATML_TEMPLATE, TINY_CONFIGS, byte_tokenizer_json, random_tensors, write_hf_checkpoint

GGUF_KEYS = [("llama", "dense"), ("minicpm", "dense"), ("minicpm", "untied"), ("minicpm", "longrope"),
             ("minicpm3", "mla"), ("minicpm3", "mla_no_q_lora")]
# GGUF stores every float scalar (eps, scales, rope factors) as float32.
F32_REL = 1e-6


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def assert_same_config(hf_config, gguf_config) -> None:
    """Every field equal (floats to float32 precision), the derived muP scales included.

    eos ids are left out: a GGUF holds one eos id, config.json may list several.
    """
    hf, gg = flatten(hf_config.to_dict()), flatten(gguf_config.to_dict())
    hf = {k: v for k, v in hf.items() if not k.startswith("eos_token_ids")}
    gg = {k: v for k, v in gg.items() if not k.startswith("eos_token_ids")}
    assert hf.keys() == gg.keys()
    for key, value in hf.items():
        if isinstance(value, float):
            assert gg[key] == pytest.approx(value, rel=F32_REL), key
        else:
            assert gg[key] == value, key
    assert gguf_config.residual_scale == pytest.approx(hf_config.residual_scale, rel=F32_REL)
    assert gguf_config.logit_scale == pytest.approx(hf_config.logit_scale, rel=F32_REL)
    assert gguf_config.scale_emb == hf_config.scale_emb


def read_all(checkpoint) -> dict[str, np.ndarray]:
    return {name: ref.numpy() for name, ref in checkpoint.tensors.items()}


def torch_rounded(array: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return torch.from_numpy(array).to(dtype).float().numpy()


# ---------------------------------------------------------------------------------------------------
# GGUF (as llama.cpp's converter writes it) against HF safetensors holding the same weights


# llama.cpp's minicpm3 graph hard-codes MiniCPM3-4B's muP constants and the converter writes none (spec §5.3),
# so a minicpm3 GGUF only round-trips a config that uses them.
MINICPM3_GGUF_MUP = {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 256.0}


def _with_config(directory: Path, config: dict) -> Path:
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("key", GGUF_KEYS, ids=lambda k: "-".join(k))
def test_gguf_f32_config_and_tensors_equal_hf(tmp_path: Path, key):
    written = write_gguf(tmp_path / "model.gguf", key)
    hf_dir = write_hf_checkpoint(tmp_path / "hf", key, tensors=written.hf_tensors)
    if key[0] == "minicpm3":
        _with_config(hf_dir, {**TINY_CONFIGS[key], **MINICPM3_GGUF_MUP})
    hf = open_checkpoint(hf_dir)
    gg = open_checkpoint(written.path)

    assert gg.format == "gguf" and hf.format == "hf"
    assert gg.architecture.name == hf.architecture.name == key[0]
    assert_same_config(hf.config, gg.config)
    assert gg.config.tie_word_embeddings == (key != ("minicpm", "untied"))
    assert gg.config.rope.kind == ("longrope" if "rope_scaling" in TINY_CONFIGS[key] else "default")
    assert list(gg.tensors) == list(hf.tensors)
    hf_tensors, gguf_tensors = read_all(hf), read_all(gg)
    for name, array in hf_tensors.items():
        assert gguf_tensors[name].dtype == np.float32
        np.testing.assert_array_equal(gguf_tensors[name], array, err_msg=name)


def test_gguf_minicpm3_gets_llama_cpp_hard_coded_mup(tmp_path: Path):
    config = open_checkpoint(write_gguf(tmp_path / "model.gguf", ("minicpm3", "mla")).path).config
    assert TINY_CONFIGS[("minicpm3", "mla")]["dim_model_base"] != 256
    assert (config.scale_emb, config.scale_depth, config.dim_model_base) == (12.0, 1.4, 256.0)


def test_gguf_longrope_factors_come_from_the_factor_tensors(tmp_path: Path):
    raw = TINY_CONFIGS[("minicpm", "longrope")]["rope_scaling"]
    config = open_checkpoint(write_gguf(tmp_path / "model.gguf", ("minicpm", "longrope")).path).config
    assert config.rope.long_factor == pytest.approx(raw["long_factor"], rel=F32_REL)
    assert config.rope.short_factor == pytest.approx(raw["short_factor"], rel=F32_REL)
    assert config.rope.long_factor != config.rope.short_factor


@pytest.mark.parametrize("key", GGUF_KEYS, ids=lambda k: "-".join(k))
def test_gguf_f16_tensors_equal_fp16_rounded_weights(tmp_path: Path, key):
    written = write_gguf(tmp_path / "model.gguf", key, qtype=Q.F16)
    checkpoint = open_checkpoint(written.path)
    for name, array in written.hf_tensors.items():
        # The converter keeps 1-D tensors (norms) in F32 and writes matrices as F16.
        expected = torch_rounded(array, torch.float16) if array.ndim == 2 else array
        assert checkpoint.tensors[name].dtype == ("F16" if array.ndim == 2 else "F32")
        np.testing.assert_array_equal(checkpoint.tensors[name].numpy(), expected, err_msg=name)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
@pytest.mark.parametrize("key", [("llama", "dense"), ("minicpm", "untied"), ("minicpm3", "mla")], ids=lambda k: "-".join(k))
def test_gguf_quantized_tensors_equal_gguf_dequantization(tmp_path: Path, key, qtype):
    written = write_gguf(tmp_path / "model.gguf", key, qtype=qtype)
    checkpoint = open_checkpoint(written.path)
    assert qtype.name in checkpoint.stored_dtypes()
    for name, array in written.hf_tensors.items():
        got = checkpoint.tensors[name].numpy()
        np.testing.assert_array_equal(got, written.expected[name], err_msg=name)
        if checkpoint.tensors[name].dtype == qtype.name:
            # Really quantized (not a float pass-through), and within one quant step of the input.
            assert not np.array_equal(got, array), name
            step = np.abs(array).max() / (127 if qtype == Q.Q8_0 else 7)
            assert np.abs(got - array).max() <= step, name


def test_gguf_tokenizer_from_gpt2_metadata_without_merges(tmp_path: Path):
    from tokenizers import Tokenizer

    checkpoint = open_checkpoint(write_gguf(tmp_path / "model.gguf", ("minicpm", "dense")).path)
    assert checkpoint.has_tokenizer and checkpoint.has_chat_template
    files = checkpoint.tokenizer
    assert files.chat_template == CHATML_TEMPLATE
    assert (files.bos_token, files.eos_token, files.add_bos_token) == ("<s>", "<|im_end|>", False)
    text = "<|im_start|>user\nbonjour, ça va?<|im_end|>"
    ours = Tokenizer.from_str(files.tokenizer_json)
    assert ours.encode(text).ids == Tokenizer.from_str(byte_tokenizer_json()).encode(text).ids
    assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def test_gguf_fast_metadata_reader_agrees_with_gguf_py(tmp_path: Path):
    """The importer reads metadata arrays whole through gguf-py's internal hooks; same values, same types."""
    import gguf

    from edgecpm.checkpoint.gguf_file import _reader_class

    path = write_gguf(tmp_path / "model.gguf", ("minicpm", "longrope"), qtype=Q.Q8_0).path
    stock, fast = gguf.GGUFReader(path), _reader_class()(path)
    assert list(stock.fields) == list(fast.fields)
    for key, field in stock.fields.items():
        assert fast.fields[key].types == field.types, key
        assert fast.fields[key].contents() == field.contents(), key
    assert [(t.name, t.tensor_type, t.data_offset) for t in stock.tensors] == [(t.name, t.tensor_type, t.data_offset) for t in fast.tensors]
    assert isinstance(stock.fields["tokenizer.ggml.tokens"].contents(), list)
    assert isinstance(stock.fields["tokenizer.ggml.token_type"].contents(), list)


# ---------------------------------------------------------------------------------------------------
# HF directories


@pytest.mark.parametrize("dtype, torch_dtype, stored", [("float32", torch.float32, "F32"), ("float16", torch.float16, "F16"),
                                                        ("bfloat16", torch.bfloat16, "BF16")])
def test_hf_single_safetensors_dtypes(tmp_path: Path, dtype, torch_dtype, stored):
    key = ("minicpm", "dense")
    tensors = random_tensors(key)
    checkpoint = open_checkpoint(write_hf_checkpoint(tmp_path, key, dtype=dtype, tensors=tensors))
    assert checkpoint.stored_dtypes() == {stored: len(tensors)}
    for name, array in tensors.items():
        # bf16 -> fp32 is a 16-bit shift, exact; so must ours be.
        np.testing.assert_array_equal(checkpoint.tensors[name].numpy(), torch_rounded(array, torch_dtype), err_msg=name)


def test_hf_sharded_safetensors_equal_single_file(tmp_path: Path):
    key = ("minicpm", "untied")
    tensors = random_tensors(key)
    directory = write_hf_checkpoint(tmp_path, key, tensors=tensors)
    (directory / "model.safetensors").unlink()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, shard_names in shards.items():
        save_numpy_safetensors({n: tensors[n] for n in shard_names}, str(directory / shard))
    weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    checkpoint = open_checkpoint(directory)
    assert {p.name for p in checkpoint.files} >= set(shards)
    assert {ref.file.name for ref in checkpoint.tensors.values()} == set(shards)
    for name, array in tensors.items():
        np.testing.assert_array_equal(checkpoint.tensors[name].numpy(), array, err_msg=name)


def test_hf_pytorch_model_bin(tmp_path: Path):
    key = ("minicpm", "dense")
    tensors = random_tensors(key)
    directory = write_hf_checkpoint(tmp_path, key, tensors=tensors)
    (directory / "model.safetensors").unlink()
    state = {name: torch.from_numpy(array).to(torch.bfloat16) for name, array in tensors.items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # ignored buffer, as old checkpoints carry
    torch.save(state, directory / "pytorch_model.bin")

    checkpoint = open_checkpoint(directory)
    assert list(checkpoint.tensors) == list(tensors)
    assert checkpoint.stored_dtypes() == {"bfloat16": len(tensors)}
    for name, array in tensors.items():
        np.testing.assert_array_equal(checkpoint.tensors[name].numpy(), torch_rounded(array, torch.bfloat16), err_msg=name)


@pytest.mark.parametrize("key", [("minicpm", "longrope"), ("minicpm", "dynamic"), ("llama", "dense"), ("llama", "llama3_rope")],
                         ids=lambda k: "-".join(k))
def test_rope_scaling_and_rope_parameters_spellings_agree(tmp_path: Path, key):
    classic = dict(TINY_CONFIGS[key])
    v5 = {k: v for k, v in classic.items() if k not in ("rope_scaling", "rope_theta")}
    # transformers v5: theta moves into `rope_parameters`, `type` is spelled `rope_type`, default is explicit.
    block = dict(classic.get("rope_scaling") or {"rope_type": "default"})
    block["rope_type"] = block.pop("type", block.get("rope_type"))
    v5["rope_parameters"] = {**block, "rope_theta": classic.get("rope_theta", 10000.0)}

    tensors = random_tensors(key)
    a = open_checkpoint(write_hf_checkpoint(tmp_path / "classic", key, tensors=tensors)).config
    b = open_checkpoint(_with_config(write_hf_checkpoint(tmp_path / "v5", key, tensors=tensors), v5)).config
    assert a == b
    assert a.rope.kind == block["rope_type"]


def test_hf_tokenizer_json_and_config_template(tmp_path: Path):
    checkpoint = open_checkpoint(write_hf_checkpoint(tmp_path, ("minicpm", "dense")))
    assert checkpoint.has_tokenizer and checkpoint.has_chat_template
    files = checkpoint.tokenizer
    assert files.chat_template == CHATML_TEMPLATE
    assert (files.bos_token, files.eos_token, files.add_bos_token, files.add_eos_token) == ("<s>", "<|im_end|>", True, False)
    from tokenizers import Tokenizer

    text = "<|im_start|>user\nbonjour, ça va?<|im_end|>"
    ids = Tokenizer.from_str(files.tokenizer_json).encode(text).ids
    assert ids == Tokenizer.from_str(byte_tokenizer_json()).encode(text).ids
    assert ids[0] == 4 and ids[-1] == 3  # the specials stay whole


def test_hf_chat_template_jinja_file(tmp_path: Path):
    directory = write_hf_checkpoint(tmp_path, ("minicpm", "dense"))
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    del tokenizer_config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    template = "{% for m in messages %}<用户>{{ m['content'] }}<AI>{% endfor %}"
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")

    checkpoint = open_checkpoint(directory)
    assert checkpoint.has_chat_template
    assert checkpoint.tokenizer.chat_template == template


def test_hf_without_tokenizer_or_template(tmp_path: Path):
    directory = write_hf_checkpoint(tmp_path, ("minicpm", "dense"))
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer_config.json").unlink()
    checkpoint = open_checkpoint(directory)
    assert not checkpoint.has_tokenizer and not checkpoint.has_chat_template
    assert checkpoint.tokenizer is None


def test_hf_generation_config(tmp_path: Path):
    directory = write_hf_checkpoint(tmp_path, ("minicpm", "dense"))
    generation = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "eos_token_id": [2, 3]}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    assert open_checkpoint(directory).generation == generation


# ---------------------------------------------------------------------------------------------------
# `edgecpm inspect --json`


def inspect_json(path: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "edgecpm", "inspect", str(path), "--json"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_inspect_json_on_tiny_minicpm(tmp_path: Path):
    key = ("minicpm", "longrope")
    tensors = random_tensors(key)
    raw = TINY_CONFIGS[key]
    report = inspect_json(write_hf_checkpoint(tmp_path, key, tensors=tensors, dtype="bfloat16"))
    head_dim = raw["hidden_size"] // raw["num_attention_heads"]
    assert report["architecture"] == "minicpm" and report["format"] == "hf"
    assert report["parameters"] == sum(a.size for a in tensors.values())
    assert report["tensors"] == len(tensors)
    assert report["stored_dtypes"] == {"BF16": len(tensors)}
    assert report["quantization"] == "none"
    assert report["tied_embeddings"] is True
    assert report["rope"] == "longrope"
    assert report["context_length"] == raw["max_position_embeddings"]
    assert (report["layers"], report["attention_heads"], report["kv_heads"]) == (2, 4, 2)
    assert report["kv_bytes_per_token"]["fp16"] == 2 * raw["num_hidden_layers"] * raw["num_key_value_heads"] * head_dim * 2
    assert report["mup"]["scale_emb"] == 12
    assert report["mup"]["residual_scale"] == pytest.approx(1.4 / math.sqrt(2))
    assert report["mup"]["logit_scale"] == pytest.approx(64 / 16)
    assert report["eos_token_ids"] == [2, 3]
    assert report["tokenizer"] is True and report["chat_template"] is True


def test_inspect_json_on_tiny_minicpm3_reports_latent_cache(tmp_path: Path):
    key = ("minicpm3", "mla")
    tensors = random_tensors(key)
    raw = TINY_CONFIGS[key]
    report = inspect_json(write_hf_checkpoint(tmp_path, key, tensors=tensors))
    assert report["architecture"] == "minicpm3"
    assert report["parameters"] == sum(a.size for a in tensors.values())
    latent = raw["num_hidden_layers"] * (raw["kv_lora_rank"] + raw["qk_rope_head_dim"])
    assert report["kv_bytes_per_token"] == {"fp16": latent * 2, "fp32": latent * 4}


# ---------------------------------------------------------------------------------------------------
# Opening is lazy: no tensor data is read until asked for

RSS_PROBE = textwrap.dedent(
    r"""
    import json, re, sys
    from edgecpm.checkpoint import open_checkpoint
    # VmHWM: this process's peak resident memory (ru_maxrss would include the parent's, from before exec).
    peak = lambda: int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    before = peak()
    checkpoint = open_checkpoint(sys.argv[1])
    opened = peak()
    total = sum(float(ref.numpy().sum(dtype="float64")) for ref in checkpoint.tensors.values())
    print(json.dumps({"before": before, "opened": opened, "read": peak(), "numel": checkpoint.parameter_count()}))
    """
)


def test_opening_reads_no_tensor_data(tmp_path: Path):
    raw = {**TINY_CONFIGS[("llama", "dense")], "vocab_size": 96_000, "hidden_size": 512, "intermediate_size": 128,
           "num_attention_heads": 8, "num_key_value_heads": 8}
    directory = tmp_path / "big"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(raw))
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": rng.random((96_000, 512), dtype=np.float32)}
    hidden = 512
    tensors["model.norm.weight"] = np.ones(hidden, np.float32)
    for layer in range(raw["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, shape in {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,), "self_attn.q_proj": (hidden, hidden),
                            "self_attn.k_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
                            "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (128, hidden), "mlp.up_proj": (128, hidden),
                            "mlp.down_proj": (hidden, 128)}.items():
            tensors[f"{p}{name}.weight"] = rng.random(shape, dtype=np.float32)
    save_torch_safetensors({k: torch.from_numpy(v) for k, v in tensors.items()}, str(directory / "model.safetensors"))
    del tensors
    file_size = (directory / "model.safetensors").stat().st_size
    assert file_size > 190 * 2**20

    result = subprocess.run([sys.executable, "-c", RSS_PROBE, str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rss = json.loads(result.stdout)
    assert rss["numel"] * 4 > 0.99 * file_size
    # Opening parses headers only; reading every tensor then touches the whole file (the probe is sensitive).
    assert rss["opened"] - rss["before"] < 16 * 2**20
    assert rss["read"] - rss["opened"] > 0.9 * file_size
