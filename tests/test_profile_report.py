"""`edgecpm profile`: the report against its schema, its figures against their raw samples, bundles compared,
the HTML's plots rendered by headless Chromium, and the small parts (plots, energy meters, profiler parsing)."""

from __future__ import annotations

import json
import shutil
import statistics
import struct
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest
from tiny_models import write_hf_checkpoint

from edgecpm.quant.spec import QuantSpec
from edgecpm.report import SCHEMA, svg, validate
from edgecpm.report.energy import energy_meter
from edgecpm.report.phases import PHASES, complete, onnxruntime_phases, op_phase
from edgecpm.report.summary import decode_rate, step_seconds

MAX_CONTEXT = 64
LENGTHS = (8, 32, 4096)  # 4096 does not fit: listed as skipped
NEW_TOKENS = 8
RUNS = 2
SCHEMES = {"int4": QuantSpec("int4"), "ternary": QuantSpec("ternary", block_size=64), "fp32": None}


def profile_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecpm", "profile", *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    from edgecpm.export import export_checkpoint
    from edgecpm.quant.plan import QuantizationWarning

    work = tmp_path_factory.mktemp("profile")
    checkpoint = write_hf_checkpoint(work / "checkpoint", ("minicpm", "dense"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizationWarning)  # ternary of random weights is lossy, as it says
        return {name: export_checkpoint(checkpoint, work / f"tiny-{name}", flavour="ort", max_context=MAX_CONTEXT, quant=spec,
                                        quality_tokens=8)
                for name, spec in SCHEMES.items()}


@pytest.fixture(scope="module")
def report_dir(bundles, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    result = profile_cli(*(str(bundles[name]) for name in SCHEMES), "--prompt-lengths", ",".join(map(str, LENGTHS)),
                         "--new-tokens", str(NEW_TOKENS), "--runs", str(RUNS), "--compare", "--device", "x86-avx2",
                         "--bandwidth-probe-gib", "0.05", "--threads", "2", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "Compared with tiny-int4" in result.stderr
    return out


@pytest.fixture(scope="module")
def report(report_dir) -> dict:
    return json.loads((report_dir / "report.json").read_text())


def test_report_files_and_schema(report_dir, report):
    assert {p.name for p in report_dir.iterdir()} >= {"report.json", "report.schema.json", "report.md", "report.html"}
    assert validate(report) == []
    assert json.loads((report_dir / "report.schema.json").read_text()) == SCHEMA
    assert report["schema_version"] == 1 and report["device_profile"]["name"] == "x86-avx2"
    assert report["device_profile"]["chosen_by"] == "--device"
    broken = json.loads(json.dumps(report))
    del broken["bundles"][0]["runs"][0]["load_seconds"]
    broken["bundles"][1]["summary"]["decode_tokens_per_second"] = "fast"
    problems = validate(broken)
    assert any("load_seconds" in p for p in problems) and any("decode_tokens_per_second" in p for p in problems)


def test_every_run_is_recorded_raw(report):
    for entry in report["bundles"]:
        assert [run["round"] for run in entry["runs"]] == list(range(RUNS))
        assert "tensors" in entry["manifest"] and entry["manifest"]["tensors"]["count"] > 0
        for run in entry["runs"]:
            assert [p["prompt_tokens"] for p in run["prompts"]] == [8, 32]
            assert [s["prompt_tokens"] for s in run["skipped"]] == [4096]
            assert "max context 64" in run["skipped"][0]["reason"]
            for prompt in run["prompts"]:
                assert prompt["decode_steps"] == NEW_TOKENS == len(prompt["step_forward_seconds"])
                assert prompt["end_position"] == prompt["prompt_tokens"] + NEW_TOKENS
    # alternating rounds: the second round starts with the second bundle
    orders = {entry["label"]: [run["order_in_round"] for run in entry["runs"]] for entry in report["bundles"]}
    assert orders == {"tiny-int4": [0, 2], "tiny-ternary": [1, 0], "tiny-fp32": [2, 1]}


def test_figures_are_consistent_with_the_samples(report):
    for entry in report["bundles"]:
        summary = entry["summary"]
        for prompt_summary in summary["prompts"]:
            samples = [p for run in entry["runs"] for p in run["prompts"] if p["prompt_tokens"] == prompt_summary["prompt_tokens"]]
            rates = [decode_rate(p) for p in samples]
            for p, rate in zip(samples, rates):
                # decode time = tokens / rate; the loop's wall time holds every step (and little else)
                assert p["decode_seconds"] == pytest.approx(p["decode_steps"] / rate, rel=1e-12)
                assert sum(step_seconds(p)) <= p["decode_seconds"]
                assert p["ttft_seconds"] >= p["prefill_seconds"]
            assert prompt_summary["decode_tokens_per_second"] == pytest.approx(statistics.median(rates))
            assert prompt_summary["prefill_tokens_per_second"] == pytest.approx(
                statistics.median(p["prompt_tokens"] / p["prefill_seconds"] for p in samples))
            steps_ms = [1000 * s for p in samples for s in step_seconds(p)]
            assert prompt_summary["step_ms"]["p50"] == pytest.approx(float(np.percentile(steps_ms, 50)))
            assert prompt_summary["step_ms"]["p50"] <= prompt_summary["step_ms"]["p90"] <= prompt_summary["step_ms"]["p99"]
        memory = summary["memory"]
        assert memory["kv_allocated_bytes"] == memory["kv_bytes_per_token"] * MAX_CONTEXT
        assert memory["peak_rss_bytes"] >= memory["rss_before_load_bytes"] > 0
        for roof in summary["roofline"]:
            assert roof["bytes_per_token"] == roof["weight_bytes_per_token"] + roof["kv_bytes_read_per_token"]
            assert roof["percent_of_roofline"] == pytest.approx(
                100 * roof["decode_tokens_per_second"] * roof["bytes_per_token"] / (roof["measured_gb_per_second"] * 1e9))
            assert roof["projection_profile_gb_per_second"] == 25.6  # x86-avx2's profile: a projection, labelled so


def test_phases_sum_to_the_step(report):
    for entry in report["bundles"]:
        phases = entry["phases"]
        assert phases["source"].startswith("native kernels' phase timers")  # every tiny bundle decodes natively
        assert set(phases["per_step_seconds"]) == set(PHASES)
        assert all(value >= 0 for value in phases["per_step_seconds"].values())
        step = phases["forward_seconds_per_step"] + phases["sampling_seconds_per_step"]
        measured = sum(phases["measured_seconds_per_step"].values())
        # the kernels' phases lie inside the Python-timed forward pass; runtime is the rest
        assert measured <= phases["forward_seconds_per_step"] * 1.02 + 20e-6
        assert sum(phases["per_step_seconds"].values()) == pytest.approx(step, rel=0.02, abs=20e-6)
        assert phases["measured_seconds_per_step"]["linear"] > 0 and phases["measured_seconds_per_step"]["attention"] > 0
        shares = entry["summary"]["phases"]["share"]
        assert sum(shares.values()) == pytest.approx(1.0)


def test_compare_int4_ternary_fp32(report):
    kernels = {e["label"]: (e["summary"]["kernels"]["prefill"], e["summary"]["kernels"]["decode"]) for e in report["bundles"]}
    assert kernels == {"tiny-int4": ("native", "native"), "tiny-ternary": ("native", "native"),
                       "tiny-fp32": ("onnxruntime", "native")}
    comparison = report["comparison"]
    assert comparison["baseline"] == "tiny-int4"
    base = report["bundles"][0]
    for row, entry in zip(comparison["bundles"], report["bundles"][1:]):
        assert row["bundle"] == entry["label"]
        ratio = row["ratios"]["decode_tokens_per_second@8"]
        expected = [decode_rate(mine["prompts"][0]) / decode_rate(theirs["prompts"][0])
                    for mine, theirs in zip(entry["runs"], base["runs"])]
        assert ratio["per_round"] == pytest.approx(expected)
        assert ratio["median"] == pytest.approx(statistics.median(expected))
    weights = {e["label"]: e["summary"]["roofline"][0]["weight_bytes_per_token"] for e in report["bundles"]}
    assert weights["tiny-ternary"] < weights["tiny-int4"] < weights["tiny-fp32"]


def test_markdown_holds_the_tables(report_dir, report):
    text = (report_dir / "report.md").read_text()
    for title in ("## Overview", "## Speed per prompt length", "## Memory", "## Memory roofline", "## Where a decode step goes",
                  "## Compared with tiny-int4", "## Where the numbers come from"):
        assert title in text
    first = report["bundles"][0]["summary"]
    assert f"| {first['decode_tokens_per_second']:,.1f} |" in text
    assert "skipped: 4096 prompt" in text
    assert "projection" in text and ("not available on this machine" in text) != report["energy"]["available"]


def test_html_is_self_contained(report_dir):
    text = (report_dir / "report.html").read_text()
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text
    assert text.count("<svg") == 6 and "no data" not in text


def chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)


def read_png(path: Path) -> np.ndarray:
    """A non-interlaced 8-bit RGB/RGBA PNG as an [h, w, channels] uint8 array (enough for Chromium's screenshots)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            chunks.append(body)
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * bpp
    out = np.zeros((height, stride), np.uint8)
    previous = np.zeros(stride, np.int32)
    for y in range(height):
        kind, row = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        if kind == 0:
            line = row
        elif kind == 1:
            line = np.cumsum(row.reshape(-1, bpp), axis=0).reshape(-1) & 255
        elif kind == 2:
            line = (row + previous) & 255
        else:
            line = row.copy()
            up = previous
            for i in range(stride):
                a = int(line[i - bpp]) if i >= bpp else 0
                if kind == 3:
                    line[i] = (line[i] + (a + int(up[i])) // 2) & 255
                else:
                    b, c = int(up[i]), int(up[i - bpp]) if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out[y], previous = line, line
    return out.reshape(height, width, bpp)[..., :3]


@pytest.mark.skipif(chromium() is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_html_plots_render_in_chromium(report_dir, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,3800", (report_dir / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = read_png(shot).astype(np.int32)
    assert pixels.shape[:2] == (3800, 1280)
    # every bundle's series colour is drawn (lines, histogram bars, memory and roofline bars)
    for color in svg.PALETTE[:3]:
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        close = (np.abs(pixels - rgb).sum(axis=2) < 24).sum()
        assert close > 400, f"{color}: {close} pixels"
    # and each plot box is not blank: its share of non-white pixels (axes, grid, text, marks)
    inked = (pixels.sum(axis=2) < 720).mean()
    assert inked > 0.02


def test_one_line_errors(tmp_path, bundles):
    missing = profile_cli(str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert missing.returncode == 1 and "no such file or directory" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    alone = profile_cli(str(bundles["int4"]), "--compare", "-o", str(tmp_path / "out"))
    assert alone.returncode == 1 and "--compare needs at least two bundles" in alone.stderr
    bad = profile_cli(str(bundles["int4"]), "--prompt-lengths", "8,x", "-o", str(tmp_path / "out"))
    assert bad.returncode == 1 and "--prompt-lengths" in bad.stderr


def test_onnxruntime_decode_is_broken_down_by_its_profiler(bundles, tmp_path):
    result = profile_cli(str(bundles["int4"]), "--kernels", "onnxruntime", "--prompt-lengths", "8", "--new-tokens", "4",
                         "--runs", "1", "--bandwidth-probe-gib", "0.02", "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert validate(report) == []
    phases = report["bundles"][0]["phases"]
    assert phases["source"].startswith("onnxruntime's profiler")
    assert phases["measured_seconds_per_step"]["linear"] > 0  # MatMulNBits
    assert phases["measured_seconds_per_step"]["attention"] > 0  # GroupQueryAttention
    assert "MatMulNBits" in phases["ops_per_step"]["linear"]


# ---- the parts ------------------------------------------------------------------------------------------------------

def test_nice_ticks_and_plots_are_valid_svg():
    assert svg.nice_ticks(0, 97) == [0, 20, 40, 60, 80, 100]
    assert svg.nice_ticks(0, 0.3)[-1] >= 0.3
    assert svg.nice_ticks(0, 16.93) == [0, 5, 10, 15, 20]
    plots = [
        svg.line_chart([{"label": "a", "points": [(8, 10.0), (32, 12.5)]}, {"label": "b", "points": [(8, 3.0), (32, 2.0)]}],
                       title="t", x_label="prompt tokens", y_label="tok/s", log_x=True),
        svg.histogram([{"label": "a", "values": list(np.linspace(1, 2, 50))}], title="h", x_label="ms"),
        svg.bar_chart(["a", "b"], [{"label": "rss", "values": [100.0, 250.0]}, {"label": "p", "values": [None, 3.0], "hatched": True}],
                      title="m", x_label="MB", references=[{"value": 400.0, "label": "budget"}]),
        svg.stacked_bars([("a", {"x": 1.0, "y": 2.0})], ["x", "y"], title="s", x_label="ms"),
    ]
    for text in plots:
        root = ET.fromstring(text)
        assert root.tag.endswith("svg") and root.find("{http://www.w3.org/2000/svg}title") is not None
        assert "no data" not in text
    assert text.count("<rect") >= 3
    assert "no data" in svg.line_chart([], title="e", x_label="x", y_label="y")
    assert "&lt;b&gt;" in svg.line_chart([{"label": "<b>", "points": [(1, 1.0)]}], title="t", x_label="x", y_label="y")


def test_rapl_energy_from_a_powercap_tree(tmp_path):
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    (zone / "intel-rapl:0:0").mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("999000\n")
    meter = energy_meter(tmp_path)
    assert meter.available and meter.source == "rapl" and meter.domains() == ["package-0"]
    with meter.measure() as reading:
        (zone / "energy_uj").write_text("4000\n")  # wrapped: 1000 + 4000 uJ
    assert reading.joules == pytest.approx(0.005)


def test_ina3221_rails_are_integrated(tmp_path):
    hwmon = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hwmon.mkdir(parents=True)
    for channel, (label, mv, ma) in enumerate((("VDD_GPU_SOC", 5000, 400), ("VIN_SYS_5V0", 5000, 1000), ("sum of shunt", 1, 1)), 1):
        (hwmon / f"in{channel}_label").write_text(label)
        (hwmon / f"in{channel}_input").write_text(str(mv))
        (hwmon / f"curr{channel}_input").write_text(str(ma))
    meter = energy_meter(tmp_path)
    assert meter.source == "ina3221" and meter.domains() == ["VIN_SYS_5V0"]  # the input rail: the whole module
    with meter.measure() as reading:
        import time

        time.sleep(0.1)
    assert reading.joules == pytest.approx(5.0 * reading.seconds, rel=1e-6)  # 5 V x 1 A


def test_no_energy_meter_says_why(tmp_path):
    meter = energy_meter(tmp_path)
    assert not meter.available and "powercap" in meter.reason
    with meter.measure() as reading:
        pass
    assert reading.joules is None


def test_onnxruntime_profile_events_by_phase():
    def node(op, ts, dur, shapes=((1, 1, 64), (64, 64))):
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op, "input_type_shape": [{"float": list(s)} for s in shapes]}}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},  # the prefill: ignored
              node("MatMulNBits", 10, 50),
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 40},
              node("MatMulNBits", 201, 10), node("GroupQueryAttention", 211, 5), node("SimplifiedLayerNormalization", 216, 2),
              node("MatMul", 218, 3, ((1, 4, 1, 16), (1, 4, 16, 9))), node("Sigmoid", 221, 1)]
    result = onnxruntime_phases(events, decode_runs=1)
    assert result["per_step_seconds"] == pytest.approx({"linear": 10e-6, "attention": 8e-6, "norm": 2e-6, "other_ops": 1e-6})
    assert result["session_run_seconds"] == pytest.approx(40e-6)
    assert op_phase("MatMul", [[1, 1, 64], [64, 64]]) == "linear"
    full = complete(result["per_step_seconds"], forward_seconds=30e-6, sampling_seconds=5e-6)
    assert sum(full.values()) == pytest.approx(35e-6) and full["runtime"] == pytest.approx(9e-6)
