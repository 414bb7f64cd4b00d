"""ONNX export + onnxruntime backend against the PyTorch reference models, on every tiny config.

Tolerances: fp32 graphs must match the fp32 reference to 1e-4 (max abs logit difference). fp16 graphs
store weights and activations in fp16 (norm variance and softmax in fp32), so they are compared with
FP16_ATOL: on these tiny models the observed error is ~1e-3; real models sit higher, which is why the
fp16 check is a loose sanity bound rather than a parity claim.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgecpm.bundle import MANIFEST_NAME, SCHEMA_VERSION, read_manifest
from edgecpm.errors import BundleError, UnsupportedError
from edgecpm.export import export_checkpoint
from edgecpm.runtimes import load_backend
from tiny_models import TINY_CONFIGS, parse_tiny_config, write_hf_checkpoint

torch = pytest.importorskip("torch")

FP32_ATOL = 1e-4
FP16_ATOL = 2e-2
PROMPT = np.array([5, 9, 11, 40, 7, 100, 3], dtype=np.int64)
DECODE_STEPS = 20
MAX_CONTEXT = 64
FLAVOURS = ("ort", "standard")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx_export")


_checkpoints: dict = {}
_references: dict = {}


def checkpoint_dir(workdir: Path, key) -> Path:
    if key not in _checkpoints:
        _checkpoints[key] = write_hf_checkpoint(workdir / "-".join(key), key)
    return _checkpoints[key]


def reference_run(workdir: Path, key) -> tuple[list[np.ndarray], list[int]]:
    """Reference logits for the prompt then DECODE_STEPS greedy tokens (shared by all flavours)."""
    if key not in _references:
        from edgecpm.checkpoint import open_checkpoint
        from edgecpm.models import reference_model

        model = reference_model(open_checkpoint(checkpoint_dir(workdir, key)))
        cache = model.new_cache()
        with torch.no_grad():
            logits = [model(torch.from_numpy(PROMPT)[None], cache)[0, -1].numpy()]
            tokens = []
            for _ in range(DECODE_STEPS):
                tokens.append(int(logits[-1].argmax()))
                logits.append(model(torch.tensor([[tokens[-1]]]), cache)[0, -1].numpy())
        _references[key] = (logits, tokens)
    return _references[key]


def export_tiny(workdir: Path, key, flavour: str, dtype: str = "fp32", **kwargs) -> Path:
    out = workdir / f"bundle-{'-'.join(key)}-{flavour}-{dtype}"
    if not out.exists():
        export_checkpoint(checkpoint_dir(workdir, key), out, flavour=flavour, dtype=dtype, max_context=MAX_CONTEXT, **kwargs)
    return out


def max_diff_over_run(workdir: Path, key, bundle: Path) -> float:
    ref_logits, tokens = reference_run(workdir, key)
    backend = load_backend(bundle, threads=1)
    got = [backend.prefill(PROMPT)] + [backend.decode(t) for t in tokens]
    assert backend.position == len(PROMPT) + DECODE_STEPS
    assert all(g.shape == (backend.vocab_size,) and g.dtype == np.float32 for g in got)
    return max(float(np.abs(r - g).max()) for r, g in zip(ref_logits, got))


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("key", sorted(TINY_CONFIGS), ids="-".join)
def test_fp32_parity_prefill_and_decode(workdir, key, flavour):
    assert max_diff_over_run(workdir, key, export_tiny(workdir, key, flavour)) <= FP32_ATOL


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("key", [("minicpm", "dense"), ("minicpm", "moe"), ("minicpm3", "mla")], ids="-".join)
def test_fp16_parity(workdir, key, flavour):
    assert max_diff_over_run(workdir, key, export_tiny(workdir, key, flavour, "fp16")) <= FP16_ATOL


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("key", [("llama", "dense"), ("minicpm3", "mla")], ids="-".join)
def test_truncate_then_multi_token_prefill(workdir, key, flavour):
    """Chat turns: drop the tail, then prefill several tokens after a non-empty cache."""
    ref_logits, tokens = reference_run(workdir, key)
    backend = load_backend(export_tiny(workdir, key, flavour), threads=1)
    backend.prefill(PROMPT[:3])
    backend.prefill(PROMPT[3:])  # continuation prefill, past non-empty
    for token in [250, 251, 252]:  # tokens to be forgotten
        backend.decode(token)
    backend.truncate(len(PROMPT))
    got = backend.prefill(np.array(tokens[:4]))
    assert backend.position == len(PROMPT) + 4
    assert np.abs(got - ref_logits[4]).max() <= FP32_ATOL
    backend.reset()
    assert backend.position == 0
    assert np.abs(backend.prefill(PROMPT) - ref_logits[0]).max() <= FP32_ATOL


def test_prompt_longer_than_context_is_refused(workdir):
    from edgecpm.errors import GenerationError

    backend = load_backend(export_tiny(workdir, ("llama", "dense"), "ort"), threads=1)
    with pytest.raises(GenerationError, match="max context"):
        backend.prefill(np.zeros(MAX_CONTEXT + 1, np.int64))


def test_mla_caches_the_compressed_latent(workdir, monkeypatch):
    """Per layer and token: kv_lora + rope values per K and per V (GQA), or one latent (standard)."""
    # A variant whose latent width (24 + 8) meets GroupQueryAttention's multiple-of-16 head size, so
    # the ort flavour needs no padding; the stock tiny config (16 + 8) is padded to 32 there.
    raw = {**TINY_CONFIGS[("minicpm3", "mla")], "kv_lora_rank": 24}
    key = ("minicpm3", "mla_rank24")
    monkeypatch.setitem(TINY_CONFIGS, key, raw)
    _, config = parse_tiny_config(key)
    per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    layers = config.num_hidden_layers
    standard = read_manifest(export_tiny(workdir, key, "standard")).kv_layout
    assert standard["values_per_token"] == layers * per_layer == config.kv_values_per_token()
    assert standard["values_per_token_by_kind"] == {"latent": layers * per_layer}
    ort_layout = read_manifest(export_tiny(workdir, key, "ort")).kv_layout
    assert ort_layout["values_per_token_by_kind"] == {"key": layers * per_layer, "value": layers * per_layer}
    assert all(t["heads"] == 1 and t["shape"] == [1, 1, MAX_CONTEXT, per_layer] for t in ort_layout["tensors"])
    assert max_diff_over_run(workdir, key, export_tiny(workdir, key, "ort")) <= FP32_ATOL


def test_manifest_contents(workdir):
    key = ("minicpm", "dense")
    bundle = export_tiny(workdir, key, "ort")
    manifest = read_manifest(bundle)
    _, config = parse_tiny_config(key)
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.architecture == config.to_dict()
    assert (manifest.flavour, manifest.precision, manifest.max_context, manifest.quantization) == ("ort", "fp32", MAX_CONTEXT, None)
    assert manifest.model_file == "model.onnx" and manifest.data_files == ["model.onnx.data"]
    assert {p.name for p in bundle.iterdir()} == {"model.onnx", "model.onnx.data", "tokenizer.json", "chat_template.jinja",
                                                   MANIFEST_NAME}
    assert manifest.graph_inputs[:3] == ["input_ids", "seqlens_k", "total_sequence_length"]
    assert manifest.graph_outputs[0] == "logits"
    layout = manifest.kv_layout
    assert layout["mode"] == "shared_buffer" and layout["dtype"] == "float32"
    assert len(layout["tensors"]) == 2 * config.num_hidden_layers
    assert layout["tensors"][0]["shape"] == [1, config.num_key_value_heads, MAX_CONTEXT, config.head_dim]
    assert layout["values_per_token"] == config.kv_values_per_token()
    assert manifest.eos_token_ids == [2, 3]  # config [2, 3] ∪ tokenizer eos <|im_end|> (id 3)
    assert manifest.tokenizer["add_bos_token"] is True and manifest.tokenizer["bos_token"] == "<s>"
    assert manifest.tokenizer["eos_token_id"] == 3
    files = manifest.source["files"]
    assert {f["name"] for f in files} >= {"config.json", "model.safetensors"}
    import hashlib
    weights = next(f for f in files if f["name"] == "model.safetensors")
    assert weights["sha256"] == hashlib.sha256((checkpoint_dir(workdir, key) / "model.safetensors").read_bytes()).hexdigest()
    assert set(manifest.toolchain) >= {"edgecpm", "onnx", "onnxruntime"}
    standard = read_manifest(export_tiny(workdir, key, "standard")).kv_layout
    assert standard["mode"] == "append" and standard["tensors"][0]["shape"][1] == MAX_CONTEXT


def test_newer_schema_is_refused(workdir, tmp_path):
    import shutil

    bundle = tmp_path / "future"
    shutil.copytree(export_tiny(workdir, ("llama", "dense"), "ort"), bundle)
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="newer than this edgecpm understands"):
        read_manifest(bundle)


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name == name or (p.name.startswith(f".{name}.") and "partial" in p.name)]


def test_bad_max_context_writes_nothing(workdir, tmp_path):
    ckpt = checkpoint_dir(workdir, ("llama", "dense"))
    with pytest.raises(UnsupportedError, match="max_position_embeddings"):
        export_checkpoint(ckpt, tmp_path / "out", max_context=100_000)
    assert _leftovers(tmp_path, "out") == []


def test_failure_midway_leaves_no_bundle(workdir, tmp_path, monkeypatch):
    from edgecpm.exporters.onnx import models

    def failing_builder(ctx):
        ctx.weights.vector("model.norm.weight")  # something already streamed to the data file
        raise RuntimeError("boom")

    monkeypatch.setitem(models.BUILDERS, "llama", failing_builder)
    with pytest.raises(RuntimeError, match="boom"):
        export_checkpoint(checkpoint_dir(workdir, ("llama", "dense")), tmp_path / "out", max_context=32)
    assert _leftovers(tmp_path, "out") == []


def test_every_architecture_has_a_graph_builder():
    from edgecpm.arch import Architecture
    from edgecpm.exporters.onnx.models import BUILDERS

    assert set(Architecture.registry) <= set(BUILDERS)


def test_runtime_does_not_import_torch(workdir):
    bundle = export_tiny(workdir, ("minicpm", "dense"), "ort")
    code = textwrap.dedent(f"""
        import sys
        from edgecpm.runtimes import load_backend
        backend = load_backend({str(bundle)!r})
        logits = backend.prefill([1, 2, 3])
        for _ in range(3):
            logits = backend.decode(int(logits.argmax()))
        assert 'torch' not in sys.modules, 'torch was imported'
        print('ok')
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.slow
def test_smollm2_gguf_greedy_tokens_match_reference(tmp_path):
    from edgecpm.checkpoint import open_checkpoint
    from edgecpm.models import reference_model
    from edgecpm.resources import default_model_path

    checkpoint = open_checkpoint(default_model_path())
    bundle = export_checkpoint(checkpoint, tmp_path / "smollm2", flavour="ort", dtype="fp32", max_context=256)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
              198, 1, 4093, 198, 19161, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    backend = load_backend(bundle)
    logits = backend.prefill(np.array(prompt))
    ours = []
    for _ in range(32):
        ours.append(int(logits.argmax()))
        logits = backend.decode(ours[-1])
    model = reference_model(checkpoint)
    cache = model.new_cache()
    with torch.no_grad():
        ref_logits = model(torch.tensor([prompt]), cache)[0, -1]
        reference = []
        for _ in range(32):
            reference.append(int(ref_logits.argmax()))
            ref_logits = model(torch.tensor([[reference[-1]]]), cache)[0, -1]
    assert ours == reference


def _graph_ops(bundle: Path) -> list[tuple[str, str]]:
    import onnx

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    return [(node.domain, node.op_type) for node in model.graph.node]


def test_ort_graph_uses_fused_contrib_ops(workdir):
    key = ("minicpm", "dense")
    _, config = parse_tiny_config(key)
    ops = _graph_ops(export_tiny(workdir, key, "ort"))
    layers = config.num_hidden_layers
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == layers
    assert ops.count(("com.microsoft", "SkipSimplifiedLayerNormalization")) == 2 * layers
    # per layer: fused QKV, o_proj, fused gate/up, down — plus the LM head
    assert ops.count(("", "MatMul")) == 4 * layers + 1


def test_standard_graph_uses_only_standard_ops(workdir):
    import onnx

    for key in [("minicpm", "moe"), ("minicpm3", "mla")]:
        bundle = export_tiny(workdir, key, "standard")
        assert {domain for domain, _ in _graph_ops(bundle)} == {""}
        model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
        assert [o.domain for o in model.opset_import] == [""]
        onnx.checker.check_model(str(bundle / "model.onnx"))
