"""itera benchmark-power: meters on fake powercap trees and recorded samples, exact estimates and
per-run medians, the stability rules, and real runs over torch, onnxruntime and llama.cpp, one of
them while busy loops occupy every core."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_usage_error, run_itera, save_tiny
from itera.jobs.benchmark import MAX_CPU_WAIT, MAX_CV, speedup, stability, usable_cores
from itera.power import (MeterUnavailable, PowerProfile, RaplMeter, RunTiming, Workload, integrate_power, open_meter,
                         percentile, sched_delta, summarize)
from itera.record import validate


def _rapl_readable() -> bool:
    """Whether this machine has RAPL counters this user can read (then `--meter auto` measures)."""
    return open_meter("auto")[0] is not None


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
    # throughput is per run first (4 tokens in 0.4 s, then in 0.8 s), then the median over runs
    assert m["per_run"]["decode_tokens_per_s"] == pytest.approx([10.0, 5.0], rel=1e-12)
    assert m["decode_tokens_per_s"] == pytest.approx(7.5, rel=1e-12)
    assert m["decode_tokens_per_s_iqr"] == pytest.approx(2.5, rel=1e-12)  # 8.75 - 6.25, numpy's interpolation
    assert m["decode_tokens_per_s_cv"] == pytest.approx(statistics.stdev([10, 5]) / 7.5, rel=1e-12)
    assert m["ttft_ms_p50"] == pytest.approx(375.0) and m["prefill_tokens_per_s"] == pytest.approx(30.0)
    assert m["decode_latency_ms_p50"] == pytest.approx(150.0) and m["decode_latency_ms_p50_cv"] == pytest.approx(
        statistics.stdev([100, 200]) / 150)


def test_medians_over_runs_ignore_one_descheduled_run():
    """Four clean runs at 1 ms a token and one with a 500 ms stall: the headline is the clean rate,
    the stall shows in the wall-time rate's spread, and total-over-total (the old figure) would
    have been 12x off."""
    clean = [RunTiming(prefill_s=0.01, decode_latencies_s=[0.001] * 9, wall_s=0.02) for _ in range(4)]
    stalled = RunTiming(prefill_s=0.01, decode_latencies_s=[0.001] * 8 + [0.5], wall_s=0.52)
    runs = clean[:2] + [stalled] + clean[2:]
    m = summarize(runs, Workload(prompt_tokens=4, gen_tokens=10, runs=5), "unavailable", "none", None, None, 1, "x")
    assert m["decode_tokens_per_s"] == pytest.approx(1000.0)
    assert m["per_run"]["decode_tokens_per_s"][2] == pytest.approx(1000.0)  # its median step was not delayed
    assert m["per_run"]["decode_tokens_per_s_wall"][2] == pytest.approx(9 / 0.508)
    assert m["decode_tokens_per_s_wall"] == pytest.approx(1000.0)  # the median run is a clean one
    assert 45 / (4 * 0.009 + 0.508) < m["decode_tokens_per_s"] / 12
    assert m["decode_tokens_per_s_wall_cv"] > MAX_CV and m["decode_tokens_per_s_wall_iqr"] == pytest.approx(0.0)
    assert m["decode_tokens_per_s_cv"] == pytest.approx(0.0)


def test_a_run_whose_every_step_stalls_a_little_is_flagged():
    """Steps at 1 ms, every fourth delayed to 5 ms: the median step is 1 ms (1,000 tokens/s), wall
    time says 500; the record keeps both and calls the run unstable."""
    runs = [RunTiming(prefill_s=0.01, decode_latencies_s=[0.001, 0.001, 0.001, 0.005] * 5, wall_s=0.05)
            for _ in range(5)]
    m = summarize(runs, Workload(prompt_tokens=4, gen_tokens=21, runs=5), "unavailable", "none", None, None, 1, "x")
    assert m["decode_tokens_per_s"] == pytest.approx(1000.0) and m["decode_tokens_per_s_wall"] == pytest.approx(500.0)
    stable, reason = stability({**_figures(), **m})
    assert stable is False and "decode steps were delayed: tokens over wall time (500.0/s) are 2.0x below" in reason
    # the delayed quarter of the steps shows in the tail latencies, not in the median
    assert m["decode_latency_ms_p50"] == pytest.approx(1.0) and m["decode_latency_ms_p95"] == pytest.approx(5.0)


def _figures(**kw):
    m = {"runs": 5, "decode_tokens_per_s_cv": 0.01, "loadavg_start": 0.2, "loadavg_end": 0.3, "usable_cores": 2,
         "runnable_start": 0, "runnable_end": 1, "cpu_wait_fraction": 0.0}
    return {**m, **kw}


def test_stability_rules_each_say_why():
    assert stability(_figures()) == (True, None)
    cases = {"only 2 measured run": _figures(runs=2), "CV 0.25": _figures(decode_tokens_per_s_cv=0.25),
             "load average 2.00 at the start": _figures(loadavg_start=2.0),
             "load average 3.50 at the end": _figures(loadavg_end=3.5),
             "2 other tasks were runnable at the start": _figures(runnable_start=2),
             "5 other tasks were runnable at the end": _figures(runnable_end=5),
             "waited for a CPU 40%": _figures(cpu_wait_fraction=0.4)}
    for needle, m in cases.items():
        stable, reason = stability(m)
        assert stable is False and needle in reason, (needle, reason)
    assert stability(_figures(cpu_wait_fraction=MAX_CPU_WAIT, decode_tokens_per_s_cv=MAX_CV))[0] is True
    assert stability(_figures(loadavg_start=1.99, loadavg_end=None, runnable_end=None, cpu_wait_fraction=None))[0]
    both = stability(_figures(runs=1, cpu_wait_fraction=0.9))[1]
    assert "only 1 measured run" in both and "waited for a CPU 90%" in both


def test_run_queue_wait_is_summed_per_thread():
    before = {"10": (1_000_000_000, 0), "11": (0, 5_000_000)}
    after = {"10": (1_500_000_000, 250_000_000), "11": (100_000_000, 5_000_000), "12": (50_000_000, 50_000_000)}
    on_cpu, waiting = sched_delta(before, after)  # thread 12 started in between: counted from zero
    assert on_cpu == pytest.approx(0.65) and waiting == pytest.approx(0.30)
    assert sched_delta(None, after) is None


@pytest.fixture(scope="module")
def artifacts(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("power")
    for fmt, name in (("onnx", "m.onnx"), ("gguf", "m.gguf")):
        run_itera("export", "--model", tiny_ckpt, "--format", fmt, "--out", d / name).record
    return {"torch": tiny_ckpt, "onnxruntime": d / "m.onnx", "llama.cpp": d / "m.gguf"}


def test_real_run_over_three_runtimes_without_a_meter(artifacts):
    res = run_itera("benchmark-power", "--model", artifacts["torch"], "--compare", artifacts["onnxruntime"],
                    "--compare", artifacts["llama.cpp"], "--prompt-tokens", "16", "--gen-tokens", "24", "--runs", "3",
                    "--meter", "none")
    rec = res.record
    validate(rec)
    assert "energy not measured" in res.stderr
    assert rec["params"]["threads"] == usable_cores() == len(os.sched_getaffinity(0))  # the default, as a number
    per = rec["metrics"]["compare"]
    assert [m["runtime"] for m in per.values()] == ["torch", "onnxruntime", "llama.cpp"]
    # each result keyed by what the artifact is (its name and sha256), not where it sits; the path inside
    assert [m["path"] for m in per.values()] == [str(artifacts[r]) for r in ("torch", "onnxruntime", "llama.cpp")]
    assert list(per) == [f"{Path(m['path']).name}#{m['sha256'][:8]}" for m in per.values()]
    assert next(iter(per.values()))["sha256"] == rec["artifact"]["sha256"]
    assert not any("/" in k for k in per)
    for m in per.values():
        assert m["decode_tokens_per_s"] > 0 and m["decode_latency_ms_p50"] > 0 and m["ttft_ms_p50"] > 0
        # an odd number of runs: the median run's wall-time tokens/s is exactly 1 / its mean latency,
        # and the headline exactly 1 / the median run's median step
        assert m["decode_tokens_per_s_wall"] * m["decode_latency_ms_mean"] / 1e3 == pytest.approx(1.0, rel=1e-9)
        assert m["decode_tokens_per_s"] * m["decode_latency_ms_p50"] / 1e3 == pytest.approx(1.0, rel=1e-9)
        assert m["decode_tokens_per_s"] in m["per_run"]["decode_tokens_per_s"]
        assert len(m["per_run"]["decode_tokens_per_s"]) == 3 and m["decode_tokens_per_s_iqr"] >= 0
        assert m["decode_latency_ms_p50"] <= m["decode_latency_ms_p95"] <= m["decode_latency_ms_p99"]
        # no meter asked for: nothing invented
        assert m["energy_method"] == "unavailable" and m["energy_reason"] == "no meter requested (--meter none)"
        assert m["energy_j"] is None and m["j_per_token"] is None and m["tokens_per_j"] is None
        assert m["peak_rss_bytes"] > 0 and m["cpu_utilisation"] > 0 and m["load_seconds"] > 0
        assert m["threads"] == rec["params"]["threads"] and m["usable_cores"] == usable_cores()
        assert m["runtime_threads"] == {"decode": m["threads"], "prompt": m["threads"]}
        assert isinstance(m["stable"], bool) and (m["stable"] or m["stability_reason"])
    # a speed-up against the first only between stable runs; the table has both rates of each
    base = next(iter(per.values()))
    base_path = base["path"]
    lines = res.stderr.splitlines()
    assert "wall tok/s" in next(line for line in lines if line.startswith("artifact"))
    for m in list(per.values())[1:]:
        path = m["path"]
        row = next(line for line in lines if line.startswith(path + " "))
        assert f"{m['decode_tokens_per_s']:.1f}" in row and f"{m['decode_tokens_per_s_wall']:.1f}" in row
        if base["stable"] and m["stable"]:
            assert m["speedup"] == pytest.approx(m["decode_tokens_per_s"] / base["decode_tokens_per_s"])
            assert m["speedup_withheld_reason"] is None and f"{m['speedup']:.2f}x" in row
        else:
            assert m["speedup"] is None and m["speedup_wall"] is None and "withheld" in row
            assert f"{base_path if not base['stable'] else path} is not stable (" in m["speedup_withheld_reason"]
    assert sum(line.startswith("no speed-up") for line in lines) <= 1
    # each artifact in its own process: torch's process holds torch, the others do not
    rss = {m["runtime"]: m["peak_rss_bytes"] for m in per.values()}
    assert rss["torch"] > rss["llama.cpp"] and rss["torch"] > rss["onnxruntime"]


def test_auto_meter_measures_or_says_why(artifacts):
    m = run_itera("benchmark-power", "--model", artifacts["llama.cpp"], "--prompt-tokens", "8", "--gen-tokens", "8",
                  "--runs", "1").record["metrics"]
    if _rapl_readable():  # a meter here: energy is measured, and positive
        assert m["energy_method"] == "rapl" and m["energy_j"] > 0 and m["energy_reason"] is None
    else:
        assert m["energy_method"] == "unavailable" and "rapl:" in m["energy_reason"] and m["energy_j"] is None


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
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    assert_usage_error(run_itera("benchmark-power", "--model", bad), "llama.cpp could not load")
    bad_onnx = tmp_path / "broken.onnx"
    bad_onnx.write_bytes(b"\x00\x01 not a protobuf")
    assert_usage_error(run_itera("benchmark-power", "--model", bad_onnx), "onnxruntime could not load")


@pytest.mark.skipif(_rapl_readable(), reason="this machine has readable RAPL counters: --meter rapl measures here")
def test_meter_rapl_is_refused_where_there_is_none(artifacts):
    assert_usage_error(run_itera("benchmark-power", "--model", artifacts["torch"], "--meter", "rapl"),
                       "--meter rapl cannot measure here")


# ------------------------------------------------------------------------------- under load


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory, tokenizer_dir):
    """Two GGUF files 90x apart in size (a tiny checkpoint and a wider, deeper random one)."""
    d = tmp_path_factory.mktemp("sizes")
    small = save_tiny(d / "small", tokenizer_dir)
    big = save_tiny(d / "big", tokenizer_dir, seed=1, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4)
    for ckpt in (small, big):
        run_itera("export", "--model", ckpt, "--format", "gguf", "--out", d / f"{ckpt.name}.gguf").record
    return d / "small.gguf", d / "big.gguf"


def test_the_same_bytes_under_the_same_name_are_one_key_and_refused(two_sizes, tmp_path):
    """Compared results are keyed by file name and sha256: one file compared with a copy of itself
    under its own name would be one key, so it is refused before anything runs."""
    import shutil

    small, _ = two_sizes
    (tmp_path / "x").mkdir()
    shutil.copy(small, tmp_path / "x" / "small.gguf")
    assert_usage_error(run_itera("benchmark-power", "--model", small, "--compare", tmp_path / "x" / "small.gguf",
                                 *BENCH), "same bytes under the same name")


def _cores_busy(seconds: float = 1.0) -> float:
    """How many cores' worth of CPU the whole machine used over ``seconds`` (``/proc/stat``)."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # busy (all but idle and iowait), total
    (b0, t0), _ = sample(), time.sleep(seconds)
    b1, t1 = sample()
    return os.cpu_count() * (b1 - b0) / max(1, t1 - t0)


BENCH = ["--prompt-tokens", "8", "--gen-tokens", "16", "--runs", "9", "--meter", "none"]


@pytest.fixture(scope="module")
def under_busy_loops(two_sizes):
    """The two GGUFs benchmarked while busy loops occupy the cores (two on this project's 2-core
    machines; one per usable core, at least two, elsewhere): once with the default threads (every
    usable core), once with one thread. Also how busy the machine was before."""
    small, big = two_sizes
    before = _cores_busy()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(2, usable_cores()))]
    try:
        default = run_itera("benchmark-power", "--model", small, "--compare", big, *BENCH)
        one = run_itera("benchmark-power", "--model", small, "--compare", big, *BENCH, "--threads", "1").record
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return before, default, one


def test_busy_cores_are_reported_unstable_with_each_artifacts_own_memory(under_busy_loops, two_sizes):
    small, big = two_sizes
    _, res, one = under_busy_loops
    rec = res.record
    per = rec["metrics"]["compare"]
    assert rec["params"]["threads"] == usable_cores() and one["params"]["threads"] == 1
    for m in one["metrics"]["compare"].values():  # llama.cpp's prompt threads too, not every core
        assert m["threads"] == 1 and m["runtime_threads"] == {"decode": 1, "prompt": 1}
    for path, m in per.items():
        assert isinstance(m["threads"], int) and m["threads"] == usable_cores()
        # the busy loops are seen at once (runnable count) and in what the runs lost (run-queue wait)
        assert m["stable"] is False and "waited for a CPU" in m["stability_reason"], m["stability_reason"]
        assert "other tasks were runnable at the start" in m["stability_reason"]
        assert m["cpu_wait_fraction"] > MAX_CPU_WAIT and m["runnable_start"] >= usable_cores()
    assert rec["metrics"]["stable"] is False and str(big) in rec["metrics"]["stability_reason"]
    # each artifact in its own process: the bigger model's peak RSS is bigger by most of its size
    size = big.stat().st_size - small.stat().st_size
    for r in (rec, one):
        grew = by_path(r)[str(big)]["peak_rss_bytes"] - by_path(r)[str(small)]["peak_rss_bytes"]
        assert grew > size / 2, (grew, size)


def test_medians_stay_within_2x_of_the_step_latency_under_busy_loops(under_busy_loops):
    """The headline decode_tokens_per_s is the rate at each run's median step, so descheduled steps
    do not move it: within 2x of 1000 / p50 step latency for the default threads and for one
    thread. What the busy loops cost shows in decode_tokens_per_s_wall (tokens over wall time),
    which falls well below, and in the reasons the record gives for ``stable: false``."""
    _, res, one = under_busy_loops
    for r in (res.record, one):
        for path, m in r["metrics"]["compare"].items():
            ratio = (1000 / m["decode_latency_ms_p50"]) / m["decode_tokens_per_s"]
            assert 0.5 < ratio < 2, (path, ratio, m["per_run"])
            assert m["decode_tokens_per_s_wall"] <= m["decode_tokens_per_s"] * 1.01, m["per_run"]
            assert m["stable"] is False


def test_an_unstable_comparison_prints_no_ratio_and_says_why(under_busy_loops, two_sizes):
    """Under busy loops both runs are unstable: the record keeps both rates of each artifact and
    withholds the speed-up with the reason; the table shows the per-step and the wall-time rate
    side by side, no ratio anywhere, and one line says why."""
    small, big = two_sizes
    _, res, one = under_busy_loops
    for r in (res.record, one):
        compared = by_path(r)
        assert "speedup" not in compared[str(small)]  # the first artifact is what the others are compared with
        m = compared[str(big)]
        assert m["speedup"] is None and m["speedup_wall"] is None
        assert m["speedup_withheld_reason"].startswith(f"no speed-up of {big} against {small}: ")
        assert "is not stable (" in m["speedup_withheld_reason"]
    lines = res.stderr.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("artifact"))
    assert "decode tok/s" in lines[head] and "wall tok/s" in lines[head]
    rows = {line.split()[0]: line for line in lines[head + 2:head + 4]}
    for m in res.record["metrics"]["compare"].values():
        path = m["path"]
        assert f"{m['decode_tokens_per_s']:.1f}" in rows[path] and f"{m['decode_tokens_per_s_wall']:.1f}" in rows[path]
    assert "withheld" in rows[str(big)]
    assert not re.search(r"\d\.\d\dx", res.stderr), res.stderr  # no ratio printed anywhere
    why = [line for line in lines if line.startswith("no speed-up")]
    assert why == [by_path(res.record)[str(big)]["speedup_withheld_reason"]]


def by_path(rec: dict) -> dict:
    """A comparison's results by the path each artifact was measured at (they are keyed by name and sha256)."""
    return {m["path"]: m for m in rec["metrics"]["compare"].values()}


def _result(rate, wall, stable=True, reason=None):
    return {"runtime": "llama.cpp", "ttft_ms_p50": 1.0, "decode_tokens_per_s": rate, "decode_tokens_per_s_wall": wall,
            "decode_tokens_per_s_cv": 0.01, "decode_latency_ms_p50": 1000 / rate, "decode_latency_ms_p95": 2.0,
            "decode_latency_ms_p99": 3.0, "peak_rss_bytes": 2**26, "j_per_token": None, "energy_method": "unavailable",
            "energy_reason": "no meter requested (--meter none)", "stable": stable, "stability_reason": reason}


def test_speedup_only_between_stable_runs():
    a, b = _result(2000.0, 1800.0), _result(5000.0, 3600.0)
    assert speedup("a.gguf", a, "b.gguf", b) == {"speedup": 2.5, "speedup_wall": 2.0, "speedup_withheld_reason": None}
    stalled = _result(2029.0, 10.4, False, "decode steps were delayed: tokens over wall time (10.4/s) are 195.1x "
                      "below the rate of a median step (2029.0/s); load average 3.10 at the start is at or above "
                      "the 2 usable cores")
    out = speedup("a.gguf", stalled, "b.gguf", b)
    assert out["speedup"] is None and out["speedup_wall"] is None
    assert out["speedup_withheld_reason"] == ("no speed-up of b.gguf against a.gguf: a.gguf is not stable (decode "
                                              "steps were delayed: tokens over wall time (10.4/s) are 195.1x below "
                                              "the rate of a median step (2029.0/s))")
    both = speedup("a.gguf", stalled, "b.gguf", _result(5000.0, 3600.0, False, "only 1 measured run(s); x"))
    assert "a.gguf is not stable" in both["speedup_withheld_reason"] and "b.gguf is not stable (only 1 measured " \
        "run(s))" in both["speedup_withheld_reason"]


def test_the_table_shows_a_ratio_of_stable_runs_and_withholds_the_others():
    import io

    from itera.cli._console import Console
    from itera.cli.benchmark_power import _table

    a, b, c = _result(2000.0, 1800.0), _result(5000.0, 3600.0), _result(6000.0, 30.0, False, "steps were delayed")
    for r, p in ((b, "b.gguf"), (c, "c.gguf")):
        r.update(speedup("a.gguf", a, p, r))
    metrics = {**a, "compare": {"a.gguf": a, "b.gguf": b, "c.gguf": c}, "stable": False,
               "stability_reason": "c.gguf: steps were delayed"}
    out = io.StringIO()
    _table(Console(out, enabled=True), [Path("a.gguf"), Path("b.gguf"), Path("c.gguf")], metrics)
    lines = out.getvalue().splitlines()
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0].endswith(".gguf")}
    assert "2000.0" in rows["a.gguf"] and "1800.0" in rows["a.gguf"] and "(first)" in rows["a.gguf"]
    assert "2.50x (wall 2.00x)" in rows["b.gguf"]
    assert "withheld" in rows["c.gguf"] and "6000.0" in rows["c.gguf"] and "30.0" in rows["c.gguf"]
    assert "x" not in rows["c.gguf"].split("llama.cpp")[1].replace("withheld", "")
    assert [line for line in lines if line.startswith("no speed-up")] == [
        "no speed-up of c.gguf against a.gguf: c.gguf is not stable (steps were delayed)"]
