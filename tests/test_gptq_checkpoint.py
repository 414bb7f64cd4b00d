"""GPTQ checkpoints (AutoGPTQ v1) import without re-quantizing: the codes survive, the floats match."""

import json

import numpy as np
import pytest

from edgecpm.checkpoint import open_checkpoint
from edgecpm.errors import CheckpointError, UnsupportedError
from gptq_writer import write_gptq_checkpoint

KEY = ("minicpm", "dense")  # hidden 64, intermediate 96: group sizes 16 and 32 divide every input dimension


@pytest.mark.parametrize("group_size,symmetric,act_order,separate", [(32, True, False, False), (16, False, False, True),
                                                                       (32, False, True, False), (16, True, True, False)])
def test_gptq_checkpoint_imports_exactly(tmp_path, group_size, symmetric, act_order, separate):
    expected = write_gptq_checkpoint(tmp_path, KEY, group_size=group_size, symmetric=symmetric, act_order=act_order,
                                     separate_quantize_config=separate)
    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.quantization == {"method": "gptq", "bits": 4, "group_size": group_size, "symmetric": symmetric,
                                       "act_order": act_order}
    assert set(checkpoint.tensors) == set(expected)
    for name, weight in expected.items():
        assert np.array_equal(checkpoint.tensors[name].numpy(), weight), name
    q_proj = "model.layers.1.self_attn.q_proj.weight"
    assert checkpoint.tensors[q_proj].dtype == "GPTQ-int4"
    layer = checkpoint.prequantized[q_proj]()
    order = np.arange(64) if layer.input_order is None else layer.input_order
    assert (layer.input_order is not None) == act_order
    assert np.array_equal(layer.quantized.dequantize(), expected[q_proj][:, order])
    assert len(checkpoint.prequantized) == 2 * 7


def test_gptq_config_without_gptq_tensors_is_refused(tmp_path):
    from tiny_models import write_hf_checkpoint

    plain = write_hf_checkpoint(tmp_path / "plain", KEY)
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="qweight"):
        open_checkpoint(plain)


@pytest.mark.parametrize("change,field", [({"bits": 3}, "bits"), ({"group_size": 48}, "group_size"),
                                          ({"checkpoint_format": "gptq_v2"}, "checkpoint_format"),
                                          ({"quant_method": "awq"}, "quant_method")])
def test_unsupported_gptq_settings_name_the_field(tmp_path, change, field):
    write_gptq_checkpoint(tmp_path, KEY, group_size=32, symmetric=True, act_order=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError) as error:
        open_checkpoint(tmp_path)
    assert error.value.field == field
    assert "config.json" in str(error.value)


def test_gptq_missing_part_names_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    write_gptq_checkpoint(tmp_path, KEY, group_size=32, symmetric=True, act_order=False)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.scales"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.scales"):
        open_checkpoint(tmp_path)
