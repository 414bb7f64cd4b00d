"""`edgecpm export`, `run`, `chat` and `demo` as a user runs them: subprocesses, exit codes, stdout/stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reference_backend import greedy_chain, single_torch_thread
from test_native_decode import KERNELS_MISSING
from tiny_bundle import TINY_MAX_CONTEXT, export_tiny_bundle
from tiny_models import write_hf_checkpoint

EDGECPM = [sys.executable, "-m", "edgecpm"]


def run_cli(*args: str, input: str | bytes | None = None, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    data = input.encode("utf-8") if isinstance(input, str) else input
    result = subprocess.run([*EDGECPM, *args], input=data, capture_output=True, timeout=300,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    result.stdout, result.stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    return result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with single_torch_thread():
        yield export_tiny_bundle(tmp_path_factory.mktemp("cli"))


def test_run_json_greedy_equals_reference(tiny):
    result = run_cli("run", str(tiny.bundle), "--prompt", "Hello robot", "--raw", "--temperature", "0", "--max-new-tokens", "10",
                     "--json", "--threads", "1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "new_tokens", "prefill_seconds",
                            "prefill_tokens_per_second", "decode_tokens_per_second", "kernels"}
    assert summary["prompt_token_ids"][0] == 1  # BOS, added once
    with single_torch_thread():
        chain = greedy_chain(tiny.reference_model(), summary["prompt_token_ids"], 10)
    expected = chain[:next((i for i, t in enumerate(chain) if t in (2, 3)), len(chain))]
    assert summary["token_ids"] == expected
    assert summary["new_tokens"] == len(expected)
    assert summary["finish_reason"] == ("length" if len(expected) == 10 else "stop")
    assert summary["prefill_tokens_per_second"] > 0


def test_run_streams_text_and_reports_speed_on_stderr(tiny):
    result = run_cli("run", str(tiny.bundle), "--prompt", "Hi", "--max-new-tokens", "5", "--system", "Be brief.")
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stderr and "tok/s" not in result.stdout


def test_run_stop_string_and_stdin_prompt(tiny):
    plain = run_cli("run", str(tiny.bundle), "--prompt", "-", "--raw", "--max-new-tokens", "12", "--json", input="Hello robot\n")
    assert plain.returncode == 0, plain.stderr
    plain = json.loads(plain.stdout)
    # stdin gives the same prompt as --prompt (its trailing newline dropped).
    direct = run_cli("run", str(tiny.bundle), "--prompt", "Hello robot", "--raw", "--max-new-tokens", "12", "--json")
    direct = json.loads(direct.stdout)
    assert plain["prompt_token_ids"] == direct["prompt_token_ids"]
    text = plain["text"]
    start = next((i for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2] and text[:i].find(text[i:i + 2]) < 0), None)
    if start is None:
        pytest.skip("the tiny model's answer has no usable stop string")
    stopped = run_cli("run", str(tiny.bundle), "--prompt", "Hello robot", "--raw", "--max-new-tokens", "12", "--json",
                      "--stop", "never-there", "--stop", text[start:start + 2])
    summary = json.loads(stopped.stdout)
    assert summary["finish_reason"] == "stop_string"
    assert summary["text"] == text[:start]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "temperature must be 0"),
        (["--top-p", "0"], r"top_p must be in (0, 1]"),
        (["--repetition-penalty", "0"], "repetition_penalty must be positive"),
        (["--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
        (["--prompt", ""], "the prompt is empty"),
    ],
)
def test_run_errors_are_one_line(tiny, args, message):
    result = run_cli("run", str(tiny.bundle), "--prompt", "Hi", *args)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_run_non_utf8_stdin_and_too_long_prompt(tiny):
    result = run_cli("run", str(tiny.bundle), "--prompt", "-", input=b"caf\xe9\n")
    assert result.returncode == 1 and "stdin is not UTF-8 text" in result.stderr
    long_prompt = "x" * (TINY_MAX_CONTEXT + 10)
    result = run_cli("run", str(tiny.bundle), "--prompt", long_prompt, "--raw")
    assert result.returncode == 1 and f"context holds {TINY_MAX_CONTEXT}" in result.stderr
    result = run_cli("run", str(tiny.bundle), "--prompt", long_prompt, "--raw", "--truncate", "--max-new-tokens", "3", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["prompt_token_ids"]) == TINY_MAX_CONTEXT - 3


def test_run_missing_bundle(tmp_path):
    result = run_cli("run", str(tmp_path / "nope"), "--prompt", "Hi")
    assert result.returncode == 1 and "no such file or directory" in result.stderr


def test_chat_repl_turns_reset_and_eof(tiny):
    result = run_cli("chat", str(tiny.bundle), "--max-new-tokens", "4", "--speed", input="Hello\nGo left\n/reset\nHi again\n")
    assert result.returncode == 0, result.stderr
    speeds = [line for line in result.stderr.splitlines() if line.startswith("prefill ")]
    assert len(speeds) == 3
    assert "(conversation cleared)" in result.stderr
    first_prompt = int(speeds[0].split()[1])
    assert "cached" not in speeds[0] and "cached" not in speeds[2]
    # The second turn found at least the whole first prompt in the KV cache.
    assert int(speeds[1].split("(+")[1].split()[0]) >= first_prompt
    assert int(speeds[2].split()[1]) == first_prompt - len("Hello") + len("Hi again")
    assert run_cli("chat", str(tiny.bundle), input="/exit\nnever read\n").returncode == 0


def test_export_from_the_local_hf_cache(tmp_path):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-cpm" / "snapshots" / "0123abcd"
    write_hf_checkpoint(snapshot, ("minicpm", "dense"))
    (cache / "models--acme--tiny-cpm" / "refs").mkdir()
    (cache / "models--acme--tiny-cpm" / "refs" / "main").write_text("0123abcd")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "bundle"
    result = run_cli("export", "acme/tiny-cpm", "-o", str(out), "--max-context", "64", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "edgecpm.json").read_text())["max_context"] == 64
    again = run_cli("export", "acme/tiny-cpm", "-o", str(out), "--max-context", "64", env=env)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    missing = run_cli("export", "acme/not-cached", "-o", str(tmp_path / "b2"), env=env)
    assert missing.returncode == 1 and "--download" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "b2").exists()


def test_demo_exports_smollm2_and_answers_paris(tmp_path):
    result = run_cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "tok/s" in result.stderr
    assert (tmp_path / "bundles" / "smollm2-135m" / "edgecpm.json").is_file()
    # A second run reuses the bundle; a directory there that is not a bundle is never overwritten.
    assert "exporting" not in run_cli("demo", cwd=tmp_path).stderr
    shutil.rmtree(tmp_path / "bundles" / "smollm2-135m")
    (tmp_path / "bundles" / "smollm2-135m").mkdir()
    (tmp_path / "bundles" / "smollm2-135m" / "notes.txt").write_text("mine")
    refused = run_cli("demo", cwd=tmp_path)
    assert refused.returncode == 1 and "not an edgecpm bundle" in refused.stderr
    assert (tmp_path / "bundles" / "smollm2-135m" / "notes.txt").read_text() == "mine"


# smollm2_bundle: the session fixture in conftest.py (shared with the server tests).


def test_run_smollm2_answers_paris(smollm2_bundle):
    result = run_cli("run", str(smollm2_bundle), "--prompt", "What is the capital of France?", "--json", "--max-new-tokens", "32")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert "Paris" in summary["text"] and summary["finish_reason"] == "stop"


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_examples_run_on_smollm2(smollm2_bundle):
    streamed = subprocess.run([sys.executable, str(EXAMPLES / "streaming_consumer.py"), str(smollm2_bundle),
                               "What is the capital of France?"], capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0, streamed.stderr
    assert "Paris" in streamed.stdout and "tok/s decode" in streamed.stderr
    robot = subprocess.run([sys.executable, str(EXAMPLES / "robot_command_loop.py"), str(smollm2_bundle)],
                           input="pick up the red cup\n\nstop moving\n", capture_output=True, text=True, timeout=120)
    assert robot.returncode == 0, robot.stderr
    lines = robot.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith(("ACTION ", "REFUSED ")) for line in lines)
    # The second request found the system prompt and worked examples in the KV cache.
    cached = [int(line.split(" tokens cached")[0].rsplit(" ", 1)[1]) for line in robot.stderr.splitlines() if "cached" in line]
    assert cached[0] == 0 and cached[1] > 100


def test_ctrl_c_during_generation_exits_130(smollm2_bundle):
    import signal

    process = subprocess.Popen([*EDGECPM, "run", str(smollm2_bundle), "--prompt", "Write a long story about robots.",
                                "--max-new-tokens", "400"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               # A runner started in the background may ignore SIGINT; Python would inherit that.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert process.stdout.read(1)  # generation is under way
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr.decode().strip().splitlines()[-1] == "edgecpm: interrupted"
    assert b"Traceback" not in stderr


def test_model_id_resolution_in_the_cache_layout(tmp_path, monkeypatch):
    from edgecpm.errors import EdgecpmError
    from edgecpm.hf_cache import cached_snapshot, hub_cache_dir, resolve_checkpoint

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    repo = hub_cache_dir() / "models--acme--cpm-gguf"
    (repo / "snapshots" / "old").mkdir(parents=True)
    newest = repo / "snapshots" / "new"
    newest.mkdir()
    os.utime(repo / "snapshots" / "old", (1, 1))
    assert cached_snapshot("acme/cpm-gguf") == newest  # no refs/main: the newest snapshot
    (newest / "model.Q4_0.gguf").write_bytes(b"GGUF")
    assert resolve_checkpoint("acme/cpm-gguf") == newest / "model.Q4_0.gguf"
    (newest / "model.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(EdgecpmError, match="several GGUF files"):
        resolve_checkpoint("acme/cpm-gguf")
    with pytest.raises(EdgecpmError, match="not a model id"):
        resolve_checkpoint("./no/such/dir/here")


def test_run_kernels_option_chooses_who_decodes(tiny):
    bad = run_cli("run", str(tiny.bundle), "--prompt", "Hi", "--kernels", "fast")
    assert bad.returncode == 1 and "unknown kernels 'fast'" in bad.stderr and "Traceback" not in bad.stderr
    if KERNELS_MISSING:
        pytest.skip(f"native kernels unavailable: {KERNELS_MISSING}")
    runs = [run_cli("run", str(tiny.bundle), "--prompt", "Hello robot", "--raw", "--temperature", "0", "--max-new-tokens",
                    "10", "--json", "--kernels", kernels) for kernels in ("native", "onnxruntime")]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    native, graph = (json.loads(r.stdout) for r in runs)
    assert native["token_ids"] == graph["token_ids"]
    assert graph["kernels"] == {"prefill": "onnxruntime", "decode": "onnxruntime", "native_unavailable": "not requested",
                                "attention": "dense"}
    assert native["kernels"]["decode"] == "native" and native["kernels"]["native_unavailable"] is None
