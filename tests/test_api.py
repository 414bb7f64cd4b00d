"""The Python API on an exported tiny bundle (onnxruntime backend), checked against the reference model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

import edgecpm
from edgecpm.errors import BundleError, GenerationError
from edgecpm.generate import final_result
from reference_backend import greedy_chain, single_torch_thread
from tiny_bundle import TINY_MAX_CONTEXT, export_tiny_bundle

PROMPT = "Pick up the red cup"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with single_torch_thread():
        yield export_tiny_bundle(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def reference(tiny):
    return tiny.reference_model()


def _reference_until_eos(reference, prompt_ids, steps):
    """The independent greedy chain, cut where the bundle's eos ids (2, 3) would stop generation."""
    chain = greedy_chain(reference, prompt_ids, steps)
    return chain[:next((i for i, t in enumerate(chain) if t in (2, 3)), len(chain))]


@pytest.fixture
def engine(tiny):
    return edgecpm.load(tiny.bundle, threads=1)


def test_load_reads_manifest_tokenizer_and_template(engine):
    assert engine.manifest.max_context == TINY_MAX_CONTEXT
    assert engine.manifest.eos_token_ids == [2, 3]
    assert engine.tokenizer.add_bos_token and engine.tokenizer.bos_token == "<s>"
    assert engine.chat_template is not None


def test_generate_raw_matches_reference_greedy(engine, reference):
    result = final_result(engine.stream(PROMPT, raw=True, max_new_tokens=12))
    prompt_ids = engine.tokenizer.encode(PROMPT)
    assert result.prompt_token_ids == prompt_ids
    # The bundle's eos ids always stop generation (stop_token_ids only adds to them).
    assert result.token_ids == _reference_until_eos(reference, prompt_ids, 12)
    assert len(result.token_ids) >= 6, "the check needs a real chain"
    assert engine.generate(PROMPT, raw=True, max_new_tokens=12) == result.text


def test_default_renders_a_user_message_with_the_chat_template(engine):
    events = list(engine.stream(PROMPT, system="You are a robot.", max_new_tokens=4))
    result = events[-1].result
    expected = ("<|im_start|>system\nYou are a robot.<|im_end|>\n"
                f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    assert result.prompt_token_ids == engine.tokenizer.encode(expected)
    assert result.prompt_token_ids[0] == engine.tokenizer.bos_token_id
    assert result.prompt_token_ids.count(engine.tokenizer.bos_token_id) == 1
    assert "".join(e.text for e in events) == result.text


def test_chat_turns_reuse_the_kv_cache(engine, reference):
    messages = [{"role": "user", "content": "Hi"}]
    first = final_result(engine.chat_stream(messages, max_new_tokens=6))
    assert first.prefill_tokens == len(first.prompt_token_ids)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Go left"}]
    second = final_result(engine.chat_stream(messages, max_new_tokens=6))
    assert second.prompt_token_ids[:len(first.prompt_token_ids)] == first.prompt_token_ids
    # At least the whole first prompt came from the cache.
    assert second.prefill_tokens <= len(second.prompt_token_ids) - len(first.prompt_token_ids)
    # Reusing the cache changes nothing in the answer.
    assert second.token_ids == _reference_until_eos(reference, second.prompt_token_ids, 6)
    assert second.token_ids, "the check needs a real answer"
    engine.reset()
    fresh = final_result(engine.chat_stream(messages, max_new_tokens=6))
    assert fresh.prefill_tokens == len(fresh.prompt_token_ids) and fresh.token_ids == second.token_ids


def test_api_errors(engine):
    with pytest.raises(GenerationError, match="the prompt is empty"):
        engine.stream("")
    with pytest.raises(GenerationError, match="temperature"):
        engine.generate(PROMPT, temperature=-1)
    with pytest.raises(GenerationError, match="unknown generation option 'max_tokens'"):
        engine.generate(PROMPT, max_tokens=3)
    with pytest.raises(GenerationError, match="system message needs the chat template"):
        engine.generate(PROMPT, raw=True, system="x")
    with pytest.raises(GenerationError, match=f"context holds {TINY_MAX_CONTEXT}"):
        engine.generate("x" * 200, raw=True)
    assert engine.generate("x" * 200, raw=True, truncate="left", max_new_tokens=2) is not None


def edit_manifest(bundle, change):
    path = bundle / "edgecpm.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_bundle_without_chat_template_needs_raw(tiny, tmp_path):
    bundle = shutil.copytree(tiny.bundle, tmp_path / "no_template")
    edit_manifest(bundle, lambda manifest: manifest["tokenizer"].update(chat_template_file=None))
    (bundle / "chat_template.jinja").unlink()
    engine = edgecpm.load(bundle)
    with pytest.raises(GenerationError, match="no chat template"):
        engine.generate(PROMPT)
    assert isinstance(engine.generate(PROMPT, raw=True, max_new_tokens=2), str)


def test_newer_schema_bundle_is_refused(tiny, tmp_path):
    bundle = shutil.copytree(tiny.bundle, tmp_path / "newer")
    edit_manifest(bundle, lambda manifest: manifest.update(schema_version=manifest["schema_version"] + 1))
    with pytest.raises(BundleError, match="newer than this edgecpm understands"):
        edgecpm.load(bundle)


def test_load_and_generate_without_torch_or_transformers(tiny):
    script = textwrap.dedent(f"""
        import sys
        import edgecpm
        engine = edgecpm.load({str(tiny.bundle)!r}, threads=1)
        text = engine.generate("hello", max_new_tokens=3)
        events = list(engine.stream("hello", raw=True, max_new_tokens=3))
        engine.chat([{{"role": "user", "content": "hi"}}], max_new_tokens=2)
        heavy = sorted(m for m in ("torch", "transformers", "onnx", "gguf") if m in sys.modules)
        print(",".join(heavy) or "none")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"

