"""`edgecpm serve` as a process on a loopback port, driven by the real `openai` client and by raw HTTP:
answers, streams, structured output, tools, hostile requests, concurrent clients, a soak, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import jsonschema
import openai
import psutil
import pytest

from test_api_control import COMMAND_SCHEMA, MOVE, WEATHER

API_KEY = "test-key-0123456789"
MODEL = "tiny-robot"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(bundle, *extra: str, api_key: str | None = API_KEY):
    port = free_port()
    args = [sys.executable, "-m", "edgecpm", "serve", str(bundle), "--port", str(port), "--model-name", MODEL, "--threads", "1",
            *(["--api-key", api_key] if api_key else []), *extra]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def server(tiny_long_bundle):
    with running_server(tiny_long_bundle) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(url: str, body: bytes, key: str | None = API_KEY, content_type: str = "application/json") -> tuple[int, dict]:
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def chat(client, content: str = "hi", **options):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **options)


# --------------------------------------------------------------------------------------- answers

def test_models_health_and_chat(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    answer = chat(client, max_tokens=12, seed=3, temperature=0.8, top_p=0.9)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert answer.usage.completion_tokens <= 12 and answer.usage.prompt_tokens > 5
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    again = chat(client, max_tokens=12, seed=3, temperature=0.8, top_p=0.9)
    assert again.choices[0].message.content == choice.message.content  # seeded sampling is reproducible
    health = json.loads(urllib.request.urlopen(server[1] + "/health").read())
    assert health["status"] == "ok" and health["model"] == MODEL


def test_stream_equals_the_whole_answer_and_reports_usage(client):
    whole = chat(client, "Stream me", max_completion_tokens=20)
    chunks = list(chat(client, "Stream me", max_completion_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_endpoint_and_stop(client):
    plain = client.completions.create(model=MODEL, prompt="Robot:", max_tokens=10)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens >= 1
    if len(plain.choices[0].text) > 2:
        stop = plain.choices[0].text[1:3]
        cut = client.completions.create(model=MODEL, prompt="Robot:", max_tokens=10, stop=[stop])
        assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("seed", [0, 1])
def test_json_schema_answers_validate(client, seed):
    answer = chat(client, "Command?", max_tokens=400, temperature=1.0, seed=seed,
                  response_format={"type": "json_schema", "json_schema": {"name": "command", "schema": COMMAND_SCHEMA, "strict": True}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), COMMAND_SCHEMA)


def test_tool_calls_round_trip(client):
    messages = [{"role": "user", "content": "Move the arm to 3, 4."}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, MOVE], tool_choice="required",
                                            max_tokens=200)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    schema = {"get_weather": WEATHER, "move_arm": MOVE}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, tools=[MOVE], stream=True, max_tokens=200,
                                                   tool_choice={"type": "function", "function": {"name": "move_arm"}}))
    calls = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["move_arm"]
    jsonschema.validate(json.loads(calls[0].function.arguments), MOVE["function"]["parameters"])
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": True})}]
    follow = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, MOVE], max_tokens=8)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ------------------------------------------------------------------------------ hostile requests

def test_hostile_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    process, url = server
    endpoint = url + "/v1/chat/completions"
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        (json.dumps({**good, "temperature": "hot"}).encode(), 400, "invalid_type", "temperature"),
        (json.dumps({**good, "max_tokens": "10"}).encode(), 400, "invalid_value", "max_tokens"),
        (json.dumps({**good, "max_tokens": 10**9}).encode(), 400, "invalid_value", "max_tokens"),
        (json.dumps({**good, "messages": "hi"}).encode(), 400, "invalid_type", "messages"),
        (json.dumps({**good, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "invalid_value", "messages[0].role"),
        (json.dumps({**good, "stream": "yes"}).encode(), 400, "invalid_type", "stream"),
        (json.dumps({**good, "n": 2}).encode(), 400, "unsupported_value", "n"),
        (json.dumps({**good, "tool_choice": "required"}).encode(), 400, "invalid_value", "tool_choice"),
        (json.dumps({**good, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}}).encode(),
         400, "invalid_value", "response_format"),
        (json.dumps({**good, "model": "gpt-4o"}).encode(), 404, "model_not_found", "model"),
        (json.dumps({k: v for k, v in good.items() if k != "model"}).encode(), 400, "missing_required_parameter", "model"),
        (json.dumps({**good, "messages": [{"role": "user", "content": "x" * 3000}]}).encode(), 400, "context_length_exceeded",
         "messages"),
    ]
    for body, status, code, param in cases:
        got, error = post(endpoint, body)
        assert (got, error["error"]["code"], error["error"]["param"]) == (status, code, param), body[:80]
        assert set(error["error"]) == {"message", "type", "param", "code"} and "Traceback" not in error["error"]["message"]
    # A 2 MiB body is refused from its Content-Length, before it is read (so only its start is sent here).
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {2 * 1024 * 1024}\r\n\r\n{{".encode())
        reply = b""
        while b'"}}' not in reply:  # headers and the JSON error may come in separate packets
            piece = raw.recv(65536)
            if not piece:
                break
            reply += piece
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and '"code":"request_too_large"' in reply
    assert post(endpoint, json.dumps(good).encode(), key=None)[0] == 401
    status, error = post(endpoint, json.dumps(good).encode(), key="wrong-key-123")
    assert status == 401 and error["error"]["code"] == "invalid_api_key"
    assert post(url + "/v1/nowhere", b"{}")[0] == 404
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope-nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    assert process.poll() is None
    assert chat(client, max_tokens=3).choices[0].finish_reason in ("stop", "length")
    metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    assert 'edgecpm_requests_total{status="400"}' in metrics and "edgecpm_time_to_first_token_seconds_bucket" in metrics


def test_client_disconnect_cancels_its_generation(client, server):
    url = server[1]
    never_ends = {"type": "regex", "regex": "[a-z ]{1900}"}
    stream = chat(client, "x", max_tokens=1800, stream=True, extra_body={"response_format": never_ends})
    for count, _chunk in enumerate(stream):
        if count == 5:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while 'edgecpm_generations_total{reason="cancelled"}' not in urllib.request.urlopen(url + "/metrics").read().decode():
        assert time.monotonic() < deadline, "the abandoned generation was not cancelled"
        time.sleep(0.1)
    assert chat(client, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_request_max_time_ends_with_time(client):
    answer = chat(client, "x", max_tokens=1900, extra_body={"max_time": 0.05, "response_format": {"type": "regex", "regex": "[a-z]{2000}"}})
    assert answer.choices[0].finish_reason == "time" and 0 < answer.usage.completion_tokens < 1900


# ----------------------------------------------------------------------------------- load and soak

def test_eight_concurrent_clients_ten_requests_each(client):
    prompts = [f"client {i} asks for shelf {i}" for i in range(8)]
    expected = {p: chat(client, p, max_tokens=8).choices[0].message.content for p in prompts}
    assert len(set(expected.values())) > 1, "the check needs prompts with different answers"
    answers, errors = [], []

    def worker(prompt: str) -> None:
        own = openai.OpenAI(base_url=str(client.base_url), api_key=API_KEY, max_retries=0, timeout=120)
        try:
            for _ in range(10):
                answer = chat(own, prompt, max_tokens=8)
                answers.append((prompt, answer.choices[0].message.content, answer.object, answer.usage.completion_tokens))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and len(answers) == 80
    assert all(text == expected[prompt] and kind == "chat.completion" and 1 <= used <= 8
               for prompt, text, kind, used in answers)


def test_soak_thousand_requests_memory_stays_flat(client, server):
    process = psutil.Process(server[0].pid)

    def burst(count: int) -> None:
        for i in range(count):
            client.completions.create(model=MODEL, prompt=f"soak {i % 50}", max_tokens=2)

    burst(100)  # warm-up: allocator pools, caches
    before = process.memory_info().rss
    burst(900)
    after = process.memory_info().rss
    assert after <= before * 1.10, f"resident memory grew from {before >> 20} MiB to {after >> 20} MiB"


# ----------------------------------------------------------------------- bounded queue and SIGTERM

def test_full_queue_answers_429_and_sigterm_finishes_in_flight(tiny_long_bundle):
    with running_server(tiny_long_bundle, "--max-queue", "0", api_key=None) as (process, url):
        endpoint = url + "/v1/chat/completions"
        slow = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1500, "max_time": 3,
                "response_format": {"type": "regex", "regex": "[a-z]{1600}"}}
        outcome = {}
        worker = threading.Thread(target=lambda: outcome.update(slow=post(endpoint, json.dumps(slow).encode(), key=None)))
        worker.start()
        deadline = time.monotonic() + 30
        while json.loads(urllib.request.urlopen(url + "/health").read())["in_flight"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, error = post(endpoint, json.dumps({**slow, "max_tokens": 2}).encode(), key=None)
        assert status == 429 and error["error"]["code"] == "queue_full"
        process.send_signal(signal.SIGTERM)
        worker.join(timeout=60)
        status, body = outcome["slow"]
        # Answered in full after the signal, not cut off.
        assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "time")
        assert body["usage"]["completion_tokens"] >= 1
        # uvicorn re-raises the signal once it has shut down cleanly: the exit is SIGTERM's, not a crash.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)


def test_non_loopback_host_needs_an_api_key(tiny_long_bundle):
    env = {k: v for k, v in os.environ.items() if k != "EDGECPM_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "edgecpm", "serve", str(tiny_long_bundle), "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1 and "--api-key" in result.stderr and "Traceback" not in result.stderr


ROBOT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["action", "target", "speed"],
                "properties": {"action": {"enum": ["pick", "place", "move", "stop"]},
                               "target": {"type": "string", "maxLength": 20},
                               "speed": {"type": "integer", "minimum": 1, "maximum": 10}}}


@pytest.mark.slow
def test_smollm2_answers_with_a_valid_robot_command(smollm2_bundle):
    with running_server(smollm2_bundle, api_key=None) as (_process, url):
        real = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        answer = real.chat.completions.create(
            model=MODEL, max_tokens=200,
            messages=[{"role": "system", "content": "Turn the operator's request into a robot command."},
                      {"role": "user", "content": "Please pick up the red cup."}],
            response_format={"type": "json_schema", "json_schema": {"name": "command", "schema": ROBOT_SCHEMA}})
        assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
        command = json.loads(answer.choices[0].message.content)
        jsonschema.validate(command, ROBOT_SCHEMA)
        assert command["action"] == "pick"
        called = real.chat.completions.create(model=MODEL, max_tokens=60, tools=[WEATHER], tool_choice="required",
                                              messages=[{"role": "user", "content": "What's the weather in Paris?"}])
        arguments = json.loads(called.choices[0].message.tool_calls[0].function.arguments)
        assert arguments["city"] == "Paris"
