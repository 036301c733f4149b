"""itera benchmark-power: meters on fake powercap trees and recorded samples, exact estimates,
percentiles against numpy, and real runs over torch, onnxruntime and llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import assert_usage_error, run_itera
from itera.power import (MeterUnavailable, PowerProfile, RaplMeter, RunTiming, Workload, integrate_power,
                         percentile, summarize)
from itera.record import validate


def _zone(root: Path, name: str, label: str, energy: int, max_range: int) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "name").write_text(label + "\n")
    (z / "energy_uj").write_text(f"{energy}\n")
    (z / "max_energy_range_uj").write_text(f"{max_range}\n")
    return z


def test_rapl_reads_package_and_dram_and_unwraps_a_counter(tmp_path):
    pkg = _zone(tmp_path, "intel-rapl:0", "package-0", 262_143_000_000, 262_143_999_999)
    _zone(tmp_path, "intel-rapl:0:0", "core", 5, 10**12)  # a sub-domain of the package: not added again
    dram = _zone(tmp_path, "intel-rapl:0:1", "dram", 1_000_000, 65_712_999_999)
    meter = RaplMeter(tmp_path)
    assert sorted(d.name for d in meter.domains) == ["dram", "package-0"]
    before = meter.read()
    (pkg / "energy_uj").write_text("500000\n")  # wrapped: 999,999 uJ to the top, then 500,000 more
    (dram / "energy_uj").write_text("3500000\n")
    joules = meter.joules(before, meter.read())
    assert joules == pytest.approx((999_999 + 500_000 + 2_500_000) / 1e6)


def test_rapl_unavailable_reasons(tmp_path, monkeypatch):
    with pytest.raises(MeterUnavailable, match="no RAPL domains"):
        RaplMeter(tmp_path / "nothing")
    _zone(tmp_path, "intel-rapl:0", "package-0", 1, 10)
    real = Path.read_text

    def denied(self, *a, **k):  # what a non-root user gets on kernels that restrict RAPL
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(MeterUnavailable, match="not readable by this user"):
        RaplMeter(tmp_path)


def test_nvml_power_samples_integrate_by_trapezoids():
    # recorded (seconds, watts) samples: 2 s at 50 W, then a ramp from 50 W to 150 W over 1 s
    samples = [(0.0, 50.0), (1.0, 50.0), (2.0, 50.0), (2.5, 100.0), (3.0, 150.0)]
    assert integrate_power(samples) == pytest.approx(100.0 + 37.5 + 62.5)
    assert integrate_power(samples[:1]) == 0.0


def test_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    for values in (rng.exponential(3.0, 257).tolist(), [1.0], [2.0, 1.0], list(range(100))):
        for q in (0, 50, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_estimate_is_exact_arithmetic_on_profile_and_cpu_time():
    p = PowerProfile.load("laptop")
    assert (p.tdp_w, p.idle_w, p.cores) == (28.0, 4.0, 8)
    runs = [RunTiming(prefill_s=0.5, decode_latencies_s=[0.1] * 4, prefill_cpu_s=0.8, decode_cpu_s=0.6, wall_s=0.9),
            RunTiming(prefill_s=0.25, decode_latencies_s=[0.2] * 4, prefill_cpu_s=0.4, decode_cpu_s=1.2, wall_s=1.05)]
    m = summarize(runs, Workload(prompt_tokens=10, gen_tokens=5, runs=2), "estimate-tdp", None, None, p, 2, "torch")
    prefill_j = 4 * (0.5 + 0.25) + 24 * (0.8 + 0.4) / 8
    decode_j = 4 * (0.4 + 0.8) + 24 * (0.6 + 1.2) / 8
    assert m["energy_prefill_j"] == pytest.approx(prefill_j, rel=1e-12)
    assert m["energy_decode_j"] == pytest.approx(decode_j, rel=1e-12)
    assert m["j_per_token"] == pytest.approx((prefill_j + decode_j) / 30, rel=1e-12)
    assert m["profile"]["name"] == "laptop" and m["energy_method"] == "estimate-tdp"
    assert m["decode_tokens_per_s"] == pytest.approx(8 / 1.2)


@pytest.fixture(scope="module")
def artifacts(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("power")
    for fmt, name in (("onnx", "m.onnx"), ("gguf", "m.gguf")):
        run_itera("export", "--model", tiny_ckpt, "--format", fmt, "--out", d / name).record
    return {"torch": tiny_ckpt, "onnxruntime": d / "m.onnx", "llama.cpp": d / "m.gguf"}


def test_real_run_over_three_runtimes_without_a_meter(artifacts):
    res = run_itera("benchmark-power", "--model", artifacts["torch"], "--compare", artifacts["onnxruntime"],
                    "--compare", artifacts["llama.cpp"], "--prompt-tokens", "16", "--gen-tokens", "24", "--runs", "3")
    rec = res.record
    validate(rec)
    assert "energy not measured" in res.stderr
    per = rec["metrics"]["compare"]
    assert [m["runtime"] for m in per.values()] == ["torch", "onnxruntime", "llama.cpp"]
    for m in per.values():
        assert m["decode_tokens_per_s"] > 0 and m["decode_latency_ms_p50"] > 0 and m["ttft_ms_p50"] > 0
        assert abs(m["decode_tokens_per_s"] * m["decode_latency_ms_mean"] / 1e3 - 1) < 0.05
        assert m["decode_latency_ms_p50"] <= m["decode_latency_ms_p95"] <= m["decode_latency_ms_p99"]
        # no meter here: nothing invented
        assert m["energy_method"] == "unavailable" and m["energy_reason"]
        assert m["energy_j"] is None and m["j_per_token"] is None and m["tokens_per_j"] is None
        assert m["peak_rss_bytes"] > 0 and m["cpu_utilisation"] > 0


def test_estimate_run_from_a_parent_record(artifacts):
    ev = run_itera("evaluate", "--model", artifacts["llama.cpp"], "-d", "pydocs@test", "--max-tokens", "100")
    rec = run_itera("benchmark-power", "--estimate", "embedded", "--prompt-tokens", "8", "--gen-tokens", "8",
                    "--runs", "2", stdin=ev.stdout).record
    m = rec["metrics"]
    assert rec["parent"]["command"] == "evaluate" and rec["artifact"]["format"] == "gguf"
    assert m["energy_method"] == "estimate-tdp" and m["profile"]["name"] == "embedded"
    assert m["energy_j"] == pytest.approx(3 * m["wall_s"] + 9 * m["cpu_s"] / 4, rel=1e-9)
    assert m["tokens_per_j"] == pytest.approx(32 / m["energy_j"])


def test_bad_input(artifacts, tmp_path):
    base = ["benchmark-power", "--model", artifacts["torch"]]
    assert_usage_error(run_itera(*base, "--meter", "geiger"), "unknown --meter 'geiger'")
    assert_usage_error(run_itera(*base, "--estimate", "toaster"), "unknown power profile 'toaster'")
    assert_usage_error(run_itera(*base, "--runs", "0"), "--runs must be at least 1")
    assert_usage_error(run_itera(*base, "--gen-tokens", "-3"), "--gen-tokens must be at least 1")
    assert_usage_error(run_itera(*base, "--meter", "rapl"), "--meter rapl cannot measure here")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    assert_usage_error(run_itera("benchmark-power", "--model", bad), "llama.cpp could not load")
    bad_onnx = tmp_path / "broken.onnx"
    bad_onnx.write_bytes(b"\x00\x01 not a protobuf")
    assert_usage_error(run_itera("benchmark-power", "--model", bad_onnx), "onnxruntime could not load")
