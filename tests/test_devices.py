"""Device profiles: the shipped data, its validation, detection on captured machines, `edgecpm devices`."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgecpm.devices import DeviceProfileError, list_profiles, load_profile
from edgecpm.devices.detect import CPUINFO_FLAGS, detect
from edgecpm.devices.profile import BACKENDS, GIB, ISA_FEATURES, SCHEMA_VERSION
from edgecpm.errors import EdgecpmError

ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = ROOT / "device_profiles"
FIXTURES = Path(__file__).parent / "data" / "devices"
SHIPPED = {
    "jetson-agx-orin-64gb": "jetson", "jetson-agx-orin-32gb": "jetson", "jetson-orin-nx-16gb": "jetson",
    "jetson-orin-nano-8gb": "jetson", "rtx-4090": "gpu", "arm-cpu": "cpu", "x86-avx2": "cpu", "x86-avx512": "cpu",
}


# --- the shipped profiles -------------------------------------------------------------------------------


def test_list_profiles_is_exactly_the_shipped_eight():
    assert list_profiles() == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_profile_loads_and_validates(name):
    profile = load_profile(name)
    assert profile.name == name and profile.kind == SHIPPED[name]
    assert profile.schema_version == SCHEMA_VERSION and re.fullmatch(r"\d+\.\d+\.\d+", profile.version)
    assert 0 < profile.budget_bytes < profile.hardware.memory_bytes
    assert profile.backends and set(profile.backends) <= set(BACKENDS)
    assert set(profile.hardware.cpu.isa) <= set(ISA_FEATURES)
    data = Path(profile.path).read_bytes()
    import hashlib

    assert profile.sha256 == hashlib.sha256(data).hexdigest()
    assert profile.manifest_record() == {"name": name, "version": profile.version, "sha256": profile.sha256}
    report = json.loads(json.dumps(profile.to_dict()))
    assert report["name"] == name and report["kind"] == SHIPPED[name]
    assert report["memory"]["budget_bytes"] == profile.budget_bytes
    if profile.kind == "cpu":
        assert profile.tensorrt is None and "tensorrt" not in profile.backends
        assert profile.export.flavour == "ort" and profile.export.dtype == "fp32" and profile.threads == 0
    else:
        # Jetsons: the native kernels (NEON + dotprod) on the Arm cores before onnxruntime
        expected = ("tensorrt", "native", "onnxruntime") if profile.kind == "jetson" else ("tensorrt", "onnxruntime", "native")
        assert profile.backends == expected
        assert profile.export.flavour == "standard" and profile.export.dtype == "fp16"
        assert profile.tensorrt is not None and profile.tensorrt.strongly_typed
    assert (profile.kind == "jetson") == (profile.hardware.unified_memory and profile.hardware.jetson_model is not None)


def test_key_facts_match_their_public_sources():
    agx = load_profile("jetson-agx-orin-64gb").hardware
    assert agx.memory_bytes == 64 * GIB and agx.memory_bandwidth_gbps == 204.8 and agx.unified_memory
    assert (agx.gpu.sm, agx.gpu.cuda_cores, agx.gpu.sm_count, agx.cpu.cores) == ("8.7", 2048, 16, 12)
    assert [mode.name for mode in agx.power_modes] == ["15W", "30W", "50W", "MAXN"]
    nano = load_profile("jetson-orin-nano-8gb").hardware
    assert (nano.memory_bandwidth_gbps, nano.gpu.cuda_cores, nano.cpu.cores) == (68.0, 1024, 6)
    assert load_profile("jetson-orin-nx-16gb").hardware.memory_bandwidth_gbps == 102.4
    rtx = load_profile("rtx-4090").hardware
    assert (rtx.gpu.sm, rtx.gpu.sm_count, rtx.gpu.cuda_cores, rtx.memory_bandwidth_gbps) == ("8.9", 128, 16384, 1008.0)
    assert not rtx.unified_memory and rtx.memory_bytes == 24 * GIB


def _hardware_keys_without_source(text: str) -> list[str]:
    """Keys in [hardware] and its sub-tables with no http(s) URL in a comment on their line or the line above."""
    missing, table, previous = [], "", ""
    for line in text.splitlines():
        stripped = line.strip()
        header = re.match(r"^\[([^\]]+)\]", stripped)
        if header:
            table = header.group(1).strip()
        elif table == "hardware" or table.startswith("hardware."):
            key = re.match(r"^([A-Za-z0-9_]+)\s*=", stripped)
            if key:
                comment = line.split("#", 1)[1] if "#" in line.split("=", 1)[1] else ""
                above = previous if previous.startswith("#") else ""
                if "http" not in comment and "http" not in above:
                    missing.append(f"{table}.{key.group(1)}")
        previous = stripped
    return missing


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_hardware_fact_cites_a_public_source(name):
    text = (PROFILES_DIR / f"{name}.toml").read_text()
    assert "[hardware]" in text
    assert _hardware_keys_without_source(text) == []
    assert "_gib are binary GiB" in text  # the units are stated in every file


def test_source_check_catches_an_uncited_fact():
    assert _hardware_keys_without_source("[hardware]\n# no link here\nmemory_gib = 8\n") == ["hardware.memory_gib"]


def test_budget_is_memory_minus_reserve():
    nano = load_profile("jetson-orin-nano-8gb")
    assert nano.reserved_bytes == int(2.5 * GIB)
    assert nano.budget_bytes == 8 * GIB - int(2.5 * GIB) == int(5.5 * GIB)
    assert load_profile("jetson-agx-orin-64gb").budget_bytes == 56 * GIB


def test_budget_applies_max_model_fraction(tmp_path):
    path = _write_variant(tmp_path, "rtx-4090", ("reserved_gib = 1.5", "reserved_gib = 4\nmax_model_fraction = 0.75"))
    profile = load_profile(path)
    assert profile.max_model_fraction == 0.75
    assert profile.budget_bytes == int((24 - 4) * GIB * 0.75)
    assert profile.to_dict()["memory"]["budget_bytes"] == profile.budget_bytes


def test_every_isa_feature_is_detectable():
    assert set(CPUINFO_FLAGS) == set(ISA_FEATURES)


# --- bad profiles: one line naming the file and the field --------------------------------------------


def _write_variant(tmp_path: Path, base: str, *edits: tuple[str, str], name: str = "board.toml") -> Path:
    text = (PROFILES_DIR / f"{base}.toml").read_text()
    for old, new in edits:  # new=None cuts the file from `old` to its end (drops the last table)
        assert text.count(old) == 1, f"{old!r} must occur once in {base}.toml"
        text = text[: text.index(old)] + "\n" if new is None else text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


BAD_PROFILES = [
    # (id, base profile, edit, dotted field in the message, text in the message)
    ("unknown-top-key", "x86-avx2", ('version = "1.0.0"', 'version = "1.0.0"\ncolour = "red"'), "colour", "unknown key"),
    ("unknown-nested-key", "x86-avx2", ("cores = 4", "cores = 4\nspeed_ghz = 3.4"), "hardware.cpu.speed_ghz",
     "unknown key"),
    ("negative-memory", "x86-avx2", ("memory_gib = 16", "memory_gib = -1"), "hardware.memory_gib",
     "must be a positive number, got -1"),
    ("memory-not-a-number", "x86-avx2", ("memory_gib = 16", 'memory_gib = "16"'), "hardware.memory_gib",
     "must be a positive number, got '16'"),
    ("kv-dtype-not-the-graphs", "rtx-4090", ('kv_dtype = "fp16"', 'kv_dtype = "fp32"'), "export.kv_dtype", "must equal dtype"),
    ("memory-is-bool", "x86-avx2", ("memory_gib = 16", "memory_gib = true"), "hardware.memory_gib", "got true"),
    ("memory-nan", "x86-avx2", ("memory_gib = 16", "memory_gib = nan"), "hardware.memory_gib", "got nan"),
    ("reserve-exceeds-memory", "x86-avx2", ("reserved_gib = 4", "reserved_gib = 16"), "memory.reserved_gib",
     "must be less than hardware.memory_gib (16)"),
    ("fraction-above-one", "x86-avx2", ("reserved_gib = 4", "reserved_gib = 4\nmax_model_fraction = 1.5"),
     "memory.max_model_fraction", "no larger than 1"),
    ("optimization-level", "rtx-4090", ("optimization_level = 3", "optimization_level = 7"),
     "tensorrt.optimization_level", "must be an integer in 0..5, got 7"),
    ("threads-wrong-type", "x86-avx2", ("threads = 0", 'threads = "all"'), "runtime.threads", "must be an integer"),
    ("threads-negative", "x86-avx2", ("threads = 0", "threads = -1"), "runtime.threads", "at least 0, got -1"),
    ("unknown-backend", "x86-avx2", ('backends = ["native", "onnxruntime"]', 'backends = ["native", "openvino"]'),
     "runtime.backends", "unknown value 'openvino'"),
    ("duplicate-backend", "x86-avx2", ('backends = ["native", "onnxruntime"]', 'backends = ["native", "native"]'),
     "runtime.backends", "more than once"),
    ("unknown-flavour", "x86-avx2", ('flavour = "ort"', 'flavour = "gguf"'), "export.flavour", "unknown value 'gguf'"),
    ("unknown-dtype", "x86-avx2", ('\ndtype = "fp32"', '\ndtype = "fp8"'), "export.dtype", "unknown value 'fp8'"),
    ("unknown-weights", "x86-avx2", ('weights = "int4"', 'weights = "int3"'), "export.weights", "unknown value 'int3'"),
    ("bad-sm", "rtx-4090", ('sm = "8.9"', 'sm = "89"'), "hardware.gpu.sm", "must look like '8.7', got '89'"),
    ("bad-isa", "x86-avx2", ('isa = ["avx2", "fma"]', 'isa = ["avx2", "amx"]'), "hardware.cpu.isa",
     "unknown value 'amx'"),
    ("bad-version", "x86-avx2", ('version = "1.0.0"', 'version = "one"'), "version", "must look like '1.0.0'"),
    ("newer-schema", "x86-avx2", ("schema_version = 1", "schema_version = 2"), "schema_version",
     "written for schema version 2; this edgecpm reads up to 1 (upgrade edgecpm)"),
    ("missing-table", "x86-avx2", ("\n[export]\n", None), "export", "required table is missing"),
    ("missing-key", "x86-avx2", ("memory_bandwidth_gbps = 25.6", ""), "hardware.memory_bandwidth_gbps",
     "required key is missing"),
    ("table-is-a-value", "x86-avx2", (("\n[export]\n", None), ('version = "1.0.0"', 'version = "1.0.0"\nexport = "ort"')),
     "export", "must be a table, got 'ort'"),
    ("gpu-without-tensorrt-table", "rtx-4090", ("\n[tensorrt]\n", None), "tensorrt",
     "required table is missing (runtime.backends lists tensorrt)"),
    ("cpu-lists-tensorrt", "x86-avx2", ('backends = ["native", "onnxruntime"]', 'backends = ["tensorrt", "native"]'),
     "runtime.backends", "needs an NVIDIA GPU"),
    ("tensorrt-with-ort-flavour", "rtx-4090", ('flavour = "standard"', 'flavour = "ort"'), "export.flavour",
     "must be 'standard'"),
    ("flags-on-strongly-typed", "rtx-4090", ("precision_flags = []", 'precision_flags = ["fp16"]'),
     "tensorrt.precision_flags", "must be empty when strongly_typed = true"),
    ("unknown-precision-flag", "rtx-4090", ("precision_flags = []\nstrongly_typed = true",
                                            'precision_flags = ["tf32"]\nstrongly_typed = false'),
     "tensorrt.precision_flags", "unknown value 'tf32'"),
    ("power-mode-key", "rtx-4090", ('{ name = "TGP", watts = 450 }', '{ name = "TGP", volts = 12 }'),
     "hardware.power_modes[0].volts", "unknown key"),
    ("jetson-model-on-dgpu", "rtx-4090", ("memory_bandwidth_gbps = 1008",
                                          'memory_bandwidth_gbps = 1008\njetson_model = "NVIDIA Jetson AGX Orin"'),
     "hardware.jetson_model", "unified_memory = true"),
]


@pytest.mark.parametrize("base, edit, field, message", [case[1:] for case in BAD_PROFILES],
                         ids=[case[0] for case in BAD_PROFILES])
def test_bad_profile_is_one_line_naming_file_and_field(tmp_path, base, edit, field, message):
    path = _write_variant(tmp_path, base, *(edit if isinstance(edit[0], tuple) else (edit,)))
    with pytest.raises(DeviceProfileError) as caught:
        load_profile(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: {field}: "), text
    assert message in text, text
    assert isinstance(caught.value, EdgecpmError) and caught.value.field == field


def test_malformed_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('schema_version = 1\nname = "broken\n')
    with pytest.raises(DeviceProfileError) as caught:
        load_profile(path)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"{path}: malformed TOML: ")


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "blob.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DeviceProfileError, match="not UTF-8 text"):
        load_profile(path)


def test_unknown_name_lists_the_shipped_profiles():
    with pytest.raises(DeviceProfileError) as caught:
        load_profile("jetson-thor")
    text = str(caught.value)
    assert "\n" not in text and text.startswith("jetson-thor: no such device profile")
    assert all(name in text for name in SHIPPED)


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(DeviceProfileError, match="no such file"):
        load_profile(tmp_path / "absent.toml")


# --- a user's own profile, by path -----------------------------------------------------------------------


def test_user_profile_by_relative_path(tmp_path, monkeypatch):
    _write_variant(tmp_path, "jetson-orin-nano-8gb", ('name = "jetson-orin-nano-8gb"', 'name = "my-board"'),
                   ("reserved_gib = 2.5", "reserved_gib = 3"), name="my-board.toml")
    monkeypatch.chdir(tmp_path)
    profile = load_profile("./my-board.toml")
    assert profile.name == "my-board" and profile.kind == "jetson"
    assert profile.budget_bytes == 5 * GIB
    assert profile.path == "my-board.toml" or profile.path.endswith("my-board.toml")
    assert load_profile(Path("my-board.toml")).sha256 == profile.sha256
    assert load_profile("my-board.toml").name == "my-board"  # a .toml name is a path, not a shipped name


def test_shipped_name_must_match_its_file(tmp_path):
    from edgecpm.devices.profile import parse_profile

    data = (PROFILES_DIR / "x86-avx2.toml").read_bytes()
    with pytest.raises(DeviceProfileError, match="must match the file name 'x86-avx512'"):
        parse_profile(data, "device_profiles/x86-avx512.toml", expected_name="x86-avx512")


# --- detection on captured machines --------------------------------------------------------------------


class NVMLError(Exception):
    """pynvml's exception type, by name: what its functions raise."""


class CapturedNvml:
    """Real NVML answers from a JSON capture, served under pynvml's function names."""

    def __init__(self, name: str):
        self.answers = json.loads((FIXTURES / "nvml" / name).read_text())
        self.shut_down = False

    def nvmlInit(self):
        error = self.answers.get("nvmlInit", {}).get("error")
        if error:
            raise NVMLError(error)

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return self.answers["nvmlDeviceGetCount"]

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.answers["devices"][index]

    def nvmlDeviceGetName(self, handle):
        return handle["nvmlDeviceGetName"]

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return tuple(handle["nvmlDeviceGetCudaComputeCapability"])

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(**handle["nvmlDeviceGetMemoryInfo"])


NO_DRIVER = "no-driver.json"


def test_detects_jetson_agx_orin_64gb():
    found = detect(FIXTURES / "jetson-agx-orin-64gb", nvml=CapturedNvml(NO_DRIVER))
    assert found.profile == "jetson-agx-orin-64gb"
    assert found.facts["device_tree_model"] == "NVIDIA Jetson AGX Orin Developer Kit"  # NUL stripped
    assert found.facts["l4t"] == "36.4.4"
    assert found.facts["mem_total_bytes"] == 64349016 * 1024
    assert any("NVIDIA Jetson AGX Orin Developer Kit" in r and "64.0 GiB module" in r for r in found.reasons)
    assert any("L4T 36.4.4" in r for r in found.reasons)


def test_agx_orin_without_meminfo_assumes_the_smaller_module(tmp_path):
    root = tmp_path / "agx"
    shutil.copytree(FIXTURES / "jetson-agx-orin-64gb", root)
    (root / "proc" / "meminfo").unlink()
    found = detect(root, nvml=CapturedNvml(NO_DRIVER))
    assert found.profile == "jetson-agx-orin-32gb"
    assert any("MemTotal unknown" in r for r in found.reasons)


def test_detects_jetson_orin_nano_8gb():
    found = detect(FIXTURES / "jetson-orin-nano-8gb", nvml=CapturedNvml(NO_DRIVER))
    assert found.profile == "jetson-orin-nano-8gb"
    assert found.facts["l4t"] == "36.4.3"
    assert any("Orin Nano" in r and "7.4 GiB" in r for r in found.reasons)
    assert not any("well below" in r for r in found.reasons)  # 7.4 of 8 GiB is what an 8 GB module shows


def test_jetson_without_release_file_says_so(tmp_path):
    root = tmp_path / "nano"
    shutil.copytree(FIXTURES / "jetson-orin-nano-8gb", root)
    (root / "etc" / "nv_tegra_release").unlink()
    found = detect(root, nvml=CapturedNvml(NO_DRIVER))
    assert found.profile == "jetson-orin-nano-8gb" and found.facts["l4t"] is None
    assert any("L4T release unknown" in r for r in found.reasons)


def test_detects_raspberry_pi_5_as_arm_cpu():
    found = detect(FIXTURES / "raspberry-pi-5", nvml=CapturedNvml(NO_DRIVER))
    assert found.profile == "arm-cpu"
    assert any("'Raspberry Pi 5 Model B Rev 1.0'" in r and "not a Jetson" in r for r in found.reasons)
    assert any("NVML did not start (NVML Shared Library Not Found)" in r for r in found.reasons)
    assert any(r.startswith("aarch64 CPU with armv8.2-a, neon, dotprod") for r in found.reasons)
    assert found.facts["cpu"] == {"arch": "aarch64", "logical_cpus": 4}


def test_detects_x86_avx512():
    found = detect(FIXTURES / "x86-avx512", nvml=CapturedNvml(NO_DRIVER))
    assert found.profile == "x86-avx512"
    assert any("avx512f, avx512bw, avx512vl" in r for r in found.reasons)


def test_detects_x86_avx2():
    found = detect(FIXTURES / "x86-avx2", nvml=CapturedNvml(NO_DRIVER))
    assert found.profile == "x86-avx2"
    assert any(r.startswith("x86_64 CPU with avx2, fma (/proc/cpuinfo)") for r in found.reasons)


def test_x86_without_avx2_gets_the_closest_profile_and_says_it_is_below_the_floor():
    found = detect(FIXTURES / "x86-no-avx", nvml=CapturedNvml(NO_DRIVER))
    assert found.profile == "x86-avx2"
    assert any("lacks avx2, fma" in r and "below the floor of x86-avx2" in r for r in found.reasons)


def test_detects_rtx_4090_through_nvml():
    nvml = CapturedNvml("rtx-4090.json")
    found = detect(FIXTURES / "x86-avx2", nvml=nvml)
    assert found.profile == "rtx-4090"
    assert any("'NVIDIA GeForce RTX 4090' (SM 8.9, 24.0 GiB): matches rtx-4090 by name" in r for r in found.reasons)
    assert found.facts["gpu"] == {"count": 1, "name": "NVIDIA GeForce RTX 4090", "sm": "8.9",
                                  "memory_bytes": 25757220864}
    assert nvml.shut_down


def test_unknown_gpu_gets_the_nearest_profile_with_the_reason():
    found = detect(FIXTURES / "x86-avx512", nvml=CapturedNvml("h200.json"))
    assert found.profile == "rtx-4090"
    assert any("'NVIDIA H200' (SM 9.0" in r and "nearest by compute capability and memory is rtx-4090" in r
               for r in found.reasons)


def test_jetson_is_found_before_nvml_is_asked():
    found = detect(FIXTURES / "jetson-orin-nano-8gb", nvml=CapturedNvml("rtx-4090.json"))
    assert found.profile == "jetson-orin-nano-8gb" and "gpu" not in found.facts


def test_missing_pynvml_is_a_reason_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # what `import pynvml` sees where it is not installed
    found = detect(FIXTURES / "x86-avx2")
    assert found.profile == "x86-avx2"
    assert "no NVIDIA GPU check: nvidia-ml-py (pynvml) is not installed" in found.reasons


def test_detection_to_dict_is_json():
    found = detect(FIXTURES / "jetson-orin-nano-8gb", nvml=CapturedNvml(NO_DRIVER))
    report = json.loads(json.dumps(found.to_dict()))
    assert report["profile"] == "jetson-orin-nano-8gb" and report["reasons"] == list(found.reasons)


# --- the CLI -----------------------------------------------------------------------------------------------


def _edgecpm() -> list[str]:
    script = Path(sys.executable).parent / "edgecpm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgecpm"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*_edgecpm(), *args], check=False, capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_cli_devices_json_lists_the_eight():
    result = run_cli("devices", "--json")
    assert result.returncode == 0, result.stderr
    assert [entry["name"] for entry in json.loads(result.stdout)] == sorted(SHIPPED)
    listed = run_cli("devices", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == json.loads(result.stdout)


def test_cli_devices_table():
    result = run_cli("devices", "list")
    assert result.returncode == 0, result.stderr
    assert "x86-avx512" in result.stdout and "1008 GB/s" in result.stdout


def test_cli_show_unknown_profile_is_one_line_on_stderr():
    result = run_cli("devices", "show", "nope")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: nope: no such device profile") and "jetson-orin-nano-8gb" in result.stderr


def test_cli_show_by_name_and_by_path(tmp_path):
    shown = run_cli("devices", "show", "jetson-orin-nano-8gb", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["memory"]["budget_bytes"] == int(5.5 * GIB)
    _write_variant(tmp_path, "x86-avx2", ('name = "x86-avx2"', 'name = "my-board"'), name="my-board.toml")
    by_path = run_cli("devices", "show", "./my-board.toml", "--json", cwd=tmp_path)
    assert by_path.returncode == 0, by_path.stderr
    assert json.loads(by_path.stdout)["name"] == "my-board"
    human = run_cli("devices", "show", "./my-board.toml", cwd=tmp_path)
    assert human.returncode == 0 and "my-board" in human.stdout


def test_cli_show_bad_profile_is_one_line(tmp_path):
    _write_variant(tmp_path, "x86-avx2", ("threads = 0", "threads = -1"), name="bad.toml")
    result = run_cli("devices", "show", "./bad.toml", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: bad.toml: runtime.threads: must be an integer at least 0, got -1"


def test_cli_detect_json():
    result = run_cli("devices", "detect", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["profile"] in SHIPPED and report["reasons"]
