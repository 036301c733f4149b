"""What the registry's read commands print: a compact table in human units on a terminal (run
under a real pseudo-terminal here, as a person's shell runs them), the unchanged JSON object in a
pipe or with --json; records indented on a terminal; a rollback that changes nothing says so;
`serve --model NAME` hints at NAME@active."""

from __future__ import annotations

import getpass
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_usage_error, clean_environ, run_itera
from itera import record
from itera.artifacts import describe
from itera.registry.display import change, number, short_dataset, size

MiB = 1 << 20


def run_on_terminal(*args, cols: int = 100, env: dict | None = None, timeout: float = 120) -> tuple[int, str, str]:
    """Run the CLI with stdout on a pseudo-terminal of ``cols`` columns (stderr a pipe, stdin
    empty): (exit code, what the terminal showed, stderr)."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    full_env = {**clean_environ(), "COLUMNS": str(cols), **(env or {})}
    p = subprocess.Popen([sys.executable, "-m", "itera", *map(str, args)], stdin=subprocess.DEVNULL, stdout=slave,
                         stderr=subprocess.PIPE, env=full_env, cwd=REPO)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if p.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        err = p.stderr.read().decode()
        code = p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
    return code, b"".join(chunks).decode().replace("\r\n", "\n"), err


# --------------------------------------------------------------------------- three versions, as a pipeline leaves them

BENCH = {"runs": 5, "prompt_tokens": 64, "gen_tokens": 64, "ttft_ms_p50": 1.5, "ttft_ms_p50_iqr": 0.1,
         "ttft_ms_p50_cv": 0.05, "prefill_tokens_per_s": 42000.0, "prefill_tokens_per_s_iqr": 900.0,
         "prefill_tokens_per_s_cv": 0.04, "decode_tokens_per_s_iqr": 80.0, "decode_tokens_per_s_cv": 0.02,
         "decode_latency_ms_p50": 0.2, "decode_latency_ms_p95": 0.25, "decode_latency_ms_p99": 0.3,
         "per_run": {"decode_tokens_per_s": [4900.0, 5000.0], "ttft_ms": [1.4, 1.5]}, "wall_s": 0.1, "cpu_s": 0.1,
         "peak_rss_bytes": 60_000_000, "load_seconds": 0.2, "runtime": "llama.cpp", "threads": 2, "usable_cores": 2,
         "loadavg_start": 0.3, "loadavg_end": 0.4, "runnable_start": 0, "runnable_end": 1, "cpu_wait_fraction": 0.01,
         "stable": True, "stability_reason": None, "energy_method": "unavailable", "energy_reason": "no RAPL domains",
         "energy_j": None, "j_per_token": None, "tokens_per_j": None}


def pipeline_record(path: Path, gguf_type: str, bpw: float, kl: float, max_kl: float, ppl: dict, step: float,
                    wall: float) -> dict:
    """export -> evaluate -> benchmark-power of one GGUF file, as the commands print them."""
    art = describe(path)
    export = record.Run("export").record(
        art, {"max_abs_logit_diff": 0.01, "mean_abs_logit_diff": 0.001, "top1_agreement": 0.99, "verify_tokens": 128,
              "verified": True, "kl_to_source": kl, "bits_per_weight": bpw, "file_bytes": art["bytes"],
              "tolerance": {"max_abs_logit_diff": 0.05, "max_kl": max_kl}},
        {"model": "m", "out": str(path), "format": "gguf", "gguf_type": gguf_type, "allow_mismatch": False,
         "extra_outputs": []})
    evaluate = record.Run("evaluate", parent=export).record(
        art, {"datasets": {ds: {"perplexity": p, "bits_per_byte": 2.0, "tokens": 1000, "bytes": 4000,
                                "tokens_per_s": 900.0} for ds, p in ppl.items()}},
        {"window": 512, "stride": 256, "bos": True, "model": str(path), "runtime": "llama.cpp"})
    return record.Run("benchmark-power", parent=evaluate).record(
        art, {**BENCH, "decode_tokens_per_s": step, "decode_tokens_per_s_wall": wall},
        {"model": str(path), "compare": [], "prompt_tokens": 64, "gen_tokens": 64, "runs": 5, "warmup": 1,
         "threads": 2, "meter": "auto", "estimate": None})


NOTES = "/data/corpora/notes.txt"
DEV = {"ITERA_ACTOR": "dev"}  # who the fixture's events say made them (not the OS user: a table's width is fixed)


@pytest.fixture
def three(tmp_path):
    """A registry holding three versions of pydocs-demo with sizes, perplexities, speeds and
    verification; @1 active and last-good."""
    db = tmp_path / "r.db"
    specs = [("F16", 2 * MiB + 300_000, 16.0, 1e-5, 0.05, {"pydocs@test": 113.354, NOTES: 80.5}, 2029.4, 10.4),
             ("Q4_0", 700_000, 4.51, 0.0123, 3.0, {"pydocs@test": 128.15, NOTES: 90.25}, 3001.0, 14.2),
             ("Q4_0", 690_000, 4.51, 0.0119, 3.0, {"pydocs@test": 127.9, NOTES: 89.0}, 2980.0, 25.0)]
    for i, (t, n, *figures) in enumerate(specs, 1):
        f = tmp_path / f"pydocs-demo-{i}.gguf"
        f.write_bytes(b"GGUF" + bytes([i]) * (n - 4))
        rec = tmp_path / f"rec{i}.json"
        rec.write_text(record.dumps(pipeline_record(f, t, *figures)))
        assert run_itera("registry", "register", "--name", "pydocs-demo", "--record", rec, "--registry", db,
                         "--tag", "stage=dev", env=DEV).returncode == 0
    for cmd in ("activate", "mark-good"):
        assert run_itera("registry", cmd, "pydocs-demo@1", "--registry", db, env=DEV).returncode == 0
    return db


# --------------------------------------------------------------------------- the read commands


def test_list_on_a_terminal_is_a_short_table_and_json_is_what_a_pipe_gets(three):
    code, shown, err = run_on_terminal("registry", "list", "--registry", three)
    assert code == 0 and err == ""
    lines = shown.splitlines()
    assert len(lines) <= 15 and len(lines) == 4, shown  # the header and one line per version, no JSON after it
    assert "{" not in shown
    head = lines[0].split()
    assert head[:5] == ["version", "aliases", "format", "size", "bits/w"]
    assert "ppl pydocs@test" in lines[0] and "ppl notes.txt" in lines[0] and "wall tok/s" in lines[0]
    one = lines[1]
    assert one.startswith("pydocs-demo@1") and "active,last-good" in one and "gguf F16" in one
    for cell in ("2.3 MiB", "16.00", "113.4", "80.50", "2,029", "10.40", "yes, KL 1e-05"):
        assert cell in one, (cell, one)
    for cell in ("683.6 KiB", "4.510", "128.2", "3,001", "14.20", "yes, KL 0.012"):
        assert cell in lines[2], (cell, lines[2])
    assert "path" not in lines[0]  # too wide for 100 columns: the date and path give way to the figures
    code, wide, _ = run_on_terminal("registry", "list", "--registry", three, cols=250)
    assert wide.splitlines()[0].split()[-2:] == ["created", "path"] and len(wide.splitlines()) == 4
    assert wide.splitlines()[3].endswith(str(three.parent / "pydocs-demo-3.gguf"))

    piped = run_itera("registry", "list", "--registry", three)
    assert piped.returncode == 0 and piped.stderr == ""
    assert len(piped.stdout.splitlines()) == 1
    listed = json.loads(piped.stdout)
    assert [v["version"] for v in listed["versions"]] == [1, 2, 3] and "record" not in listed["versions"][0]
    assert set(listed["versions"][0]) == {"name", "version", "path", "kind", "format", "bytes", "sha256",
                                          "quantization", "params", "metrics", "lineage", "git_commit",
                                          "created_at", "tags", "aliases", "archived", "store"}
    code, as_json, err = run_on_terminal("registry", "list", "--json", "--registry", three)
    assert code == 0 and as_json == piped.stdout and err == ""  # byte for byte
    code, as_json, _ = run_on_terminal("--json", "registry", "list", "--registry", three)
    assert as_json == piped.stdout

    # an archived version leaves the table; --all brings it back, marked
    assert run_itera("registry", "archive", "pydocs-demo@2", "--reason", "superseded", "--registry",
                     three).returncode == 0
    code, shown, _ = run_on_terminal("registry", "list", "--registry", three)
    assert [line.split()[0] for line in shown.splitlines()[1:]] == ["pydocs-demo@1", "pydocs-demo@3"]
    code, shown, _ = run_on_terminal("registry", "list", "--all", "--registry", three)
    assert shown.splitlines()[2].split()[:2] == ["pydocs-demo@2", "(archived)"], shown
    code, shown, _ = run_on_terminal("registry", "show", "pydocs-demo@2", "--registry", three)
    archived = next(line for line in shown.splitlines() if line.startswith("archived"))
    assert archived.endswith(f" by {getpass.getuser()}: superseded"), archived


def test_compare_on_a_terminal_shows_the_curated_figures_in_human_units(three):
    code, shown, err = run_on_terminal("registry", "compare", "pydocs-demo@1", "pydocs-demo@2", "pydocs-demo@3",
                                       "--registry", three)
    assert code == 0 and err == ""
    assert "loadavg" not in shown and "tolerance" not in shown and "max_kl" not in shown and "e+0" not in shown
    rows = {line.split("  ")[0]: line for line in shown.splitlines()}
    assert list(rows)[:7] == ["metric", "size", "bits/weight", "ppl notes.txt", "ppl pydocs@test", "decode tok/s",
                              "wall tok/s"]
    assert "2.3 MiB" in rows["size"] and "683.6 KiB (-70.8%)" in rows["size"] and "673.8 KiB (-71.2%)" in rows["size"]
    assert "128.2 (+13.1%)" in rows["ppl pydocs@test"]
    assert "2,029" in rows["decode tok/s"] and "3,001 (+47.9%)" in rows["decode tok/s"]
    assert "25.00 (×2.4)" in rows["wall tok/s"]
    assert rows["verified"].split()[1:] == ["yes", "yes", "yes"] and "0.012" in rows["KL to source"]
    assert len(shown.splitlines()) <= 12
    assert shown.splitlines()[-1].endswith("more metrics with --json)")

    piped = run_itera("registry", "compare", "pydocs-demo@1", "pydocs-demo@2", "--registry", three)
    result = json.loads(piped.stdout)
    assert result["metrics"]["tolerance.max_kl"]["pydocs-demo@2"]["value"] == 3.0  # all of it, as before
    assert result["metrics"]["bytes"]["pydocs-demo@2"]["delta"] == 700_000 - (2 * MiB + 300_000)
    assert run_on_terminal("registry", "compare", "pydocs-demo@1", "pydocs-demo@2", "--json",
                           "--registry", three)[1] == piped.stdout


def test_compare_shows_no_speed_change_against_an_unstable_benchmark(three, tmp_path):
    f = tmp_path / "busy.gguf"
    f.write_bytes(b"GGUF" + b"\x07" * 600_000)
    rec = pipeline_record(f, "Q4_0", 4.51, 0.012, 3.0, {"pydocs@test": 128.0}, 4535.3, 380.0)
    rec["metrics"].update(stable=False, stability_reason="decode steps were delayed: tokens over wall time "
                          "(380.0/s) are 11.9x below the rate of a median step (4535.3/s); load average 7.0")
    (tmp_path / "busy.json").write_text(record.dumps(rec))
    assert run_itera("registry", "register", "--name", "pydocs-demo", "--record", tmp_path / "busy.json",
                     "--registry", three, env=DEV).returncode == 0
    code, shown, err = run_on_terminal("registry", "compare", "pydocs-demo@1", "pydocs-demo@4", "--registry", three)
    assert code == 0 and err == ""
    rows = {line.split("  ")[0]: line for line in shown.splitlines()}
    assert rows["decode tok/s"].split()[2:] == ["2,029", "4,535"]  # the figures, no ratio between them
    assert rows["wall tok/s"].split()[2:] == ["10.40", "380.0"]
    assert "(-" in rows["size"]  # other rows keep their change
    assert ("no tok/s change shown: pydocs-demo@4's benchmark was not stable (decode steps were delayed: tokens "
            "over wall time (380.0/s) are 11.9x below the rate of a median step (4535.3/s))") in shown


def test_history_on_a_terminal_says_each_event_in_one_short_line(three, tmp_path):
    assert run_itera("registry", "promote", "pydocs-demo@2", "--metric", "pydocs@test.perplexity",
                     "--max-regression", "2%", "--registry", three, env=DEV).returncode == 3
    assert run_itera("registry", "promote", "pydocs-demo@3", "--metric", "pydocs@test.perplexity",
                     "--max-regression", "20%", "--registry", three, env=DEV).returncode == 0
    code, shown, err = run_on_terminal("registry", "history", "pydocs-demo", "--registry", three)
    assert code == 0 and err == ""
    lines = shown.splitlines()
    assert len(lines) == 1 + 3 + 2 + 2 and max(map(len, lines)) <= 100, shown
    assert "{" not in shown
    refused = next(line for line in lines if "promote-refused" in line)
    assert refused.endswith("  @2   dev  ppl pydocs@test 128.2 vs 113.4 (13.1% worse, max 2%)"), refused
    promoted = next(line for line in lines if " promote " in line)
    assert promoted.endswith("  @3   dev  ppl pydocs@test 127.9 vs 113.4 (12.8% worse, max 20%)"), promoted
    assert lines[0].split() == ["at", "event", "ver", "by", "what"]
    assert [line.split()[2:] for line in lines[4:6]] == [["activate", "@1", "dev", "active", "unset", "->", "@1"],
                                                         ["mark-good", "@1", "dev", "last-good", "unset", "->", "@1"]]
    assert "pydocs-demo-1.gguf, sha256 " in lines[1]
    code, narrow, _ = run_on_terminal("registry", "history", "pydocs-demo", "--registry", three, cols=72)
    assert max(map(len, narrow.splitlines())) <= 72

    piped = run_itera("registry", "history", "pydocs-demo", "--registry", three)
    events = json.loads(piped.stdout)["events"]
    assert events[5]["event"] == "promote-refused" and "more than the allowed 2.00%" in events[5]["detail"]["reason"]
    assert run_on_terminal("registry", "history", "pydocs-demo", "--json", "--registry", three)[1] == piped.stdout

    # who and why: ITERA_ACTOR and --reason, on the line of the event they belong to
    assert run_itera("registry", "alias", "pydocs-demo@3", "staging", "--reason", "canary for a day", "--registry",
                     three, env={"ITERA_ACTOR": "ci-bot"}).returncode == 0
    assert run_itera("registry", "tag", "pydocs-demo@3", "stage=prod", "--remove", "stage", "--registry",
                     three).returncode == 2  # both set and removed: nothing logged
    assert run_itera("registry", "tag", "pydocs-demo@3", "stage=prod", "--registry", three,
                     env={"ITERA_ACTOR": "ana"}).returncode == 0
    code, shown, _ = run_on_terminal("registry", "history", "pydocs-demo", "--registry", three)
    *_, aliased, tagged = shown.splitlines()
    assert aliased.split()[2:] == ["alias", "@3", "ci-bot", "staging", "unset", "->", "@3;", "reason:", "canary",
                                   "for", "a", "day"], aliased
    assert tagged.split()[2:] == ["tag", "@3", "ana", "stage=prod"], tagged


def test_show_on_a_terminal(three):
    code, shown, err = run_on_terminal("registry", "show", "pydocs-demo@active", "--registry", three)
    assert code == 0 and err == "" and "{" not in shown
    lines = shown.splitlines()
    assert len(lines) <= 15 and lines[0].split() == ["version", "pydocs-demo@1", "(active,", "last-good)"]
    rows = {line[:17].strip(): line[17:] for line in lines}
    assert rows["artifact"] == "gguf F16, 2.3 MiB, 16.00 bits/weight" and rows["tags"] == "stage=dev"
    assert rows["decode tok/s"] == "2,029 per step, 10.40 over wall time"
    assert rows["verified"] == "yes (KL 1.0e-05)" and rows["ppl pydocs@test"] == "113.4"
    assert "lineage" in shown and "benchmark-power <- evaluate <- export" in shown
    piped = run_itera("registry", "show", "pydocs-demo@active", "--registry", three)
    assert json.loads(piped.stdout)["record"]["command"] == "benchmark-power"
    assert run_on_terminal("registry", "show", "pydocs-demo@active", "--json", "--registry", three)[1] == piped.stdout


def test_a_name_with_control_characters_cannot_reach_the_terminal(tmp_path):
    db, f = tmp_path / "r.db", tmp_path / "evil\x1b[2J\n.gguf"
    f.write_bytes(b"GGUF weights")
    assert run_itera("registry", "register", "--name", "m", "--path", f, "--registry", db).returncode == 0
    for args in (["list"], ["show", "m@1"], ["history", "m"]):
        code, shown, _ = run_on_terminal("registry", *args, "--registry", db, cols=250)
        assert code == 0 and "\x1b" not in shown and "evil\\x1b[2J\\n.gguf" in shown, shown
        assert len(shown.splitlines()) == 2 or args[0] == "show", shown


def test_units():
    assert [size(n) for n in (900, 1536, 17_527_424, 3 << 30)] == ["900 B", "1.5 KiB", "16.7 MiB", "3.0 GiB"]
    assert [number(v) for v in (2029.4, 113.354, 45.678, 4.5123, 0.0123, 0.00012, None)] == \
        ["2,029", "113.4", "45.68", "4.512", "0.012", "1.2e-04", "–"]
    assert [change(100, v) for v in (113.1, 29.4, 100, 250, 20300)] == ["+13.1%", "-70.6%", "=", "×2.5", "×203"]
    assert change(0.05, 3) == "×60" and change(None, 3) == ""
    assert short_dataset("hf:org/TinyStories@validation") == "TinyStories@validation"


# --------------------------------------------------------------------------- records on a terminal


def test_a_record_on_a_terminal_is_indented_and_one_line_in_a_pipe(three):
    code, shown, err = run_on_terminal("registry", "activate", "pydocs-demo@2", "--registry", three)
    assert code == 0 and err == ""
    assert len(shown.splitlines()) > 10 and shown.startswith('{\n  "itera": 1,')
    rec = json.loads(shown)
    assert rec["command"] == "registry activate" and rec["params"]["version"] == 2
    piped = run_itera("registry", "activate", "pydocs-demo@2", "--registry", three)
    assert len(piped.stdout.splitlines()) == 1 and json.loads(piped.stdout)["params"]["version"] == 2

    again = ("registry", "register", "--name", "pydocs-demo", "--record", three.parent / "rec3.json", "--registry",
             three)  # the same bytes again: no new version, a record all the same, with a parent
    code, shown, _ = run_on_terminal(*again)
    assert code == 0 and shown.startswith('{\n  "itera": 1,')
    assert json.loads(shown)["parent"].startswith("benchmark-power /") and " <- evaluate /" in shown
    code, full, _ = run_on_terminal("--json", *again)
    assert code == 0 and full.startswith('{\n  "itera": 1,') and json.loads(full)["parent"]["command"] == "benchmark-power"
    piped = run_itera(*again)
    assert len(piped.stdout.splitlines()) == 1 and json.loads(piped.stdout)["parent"] == json.loads(full)["parent"]


# --------------------------------------------------------------------------- item 11


def test_a_rollback_that_changes_nothing_says_so(three):
    res = run_itera("registry", "rollback", "pydocs-demo", "--registry", three)
    assert res.returncode == 0 and res.record["params"]["version"] == 1
    assert res.stderr == "pydocs-demo@1 is already active and last-good; nothing to roll back\n"
    assert run_itera("registry", "activate", "pydocs-demo@2", "--registry", three).returncode == 0
    res = run_itera("registry", "rollback", "pydocs-demo", "--registry", three)
    assert res.stderr == "pydocs-demo@active -> version 1\n" and res.record["params"]["version"] == 1
    res = run_itera("registry", "rollback", "pydocs-demo", "--to", "1", "--registry", three)
    assert res.stderr == "pydocs-demo@1 is already active and last-good; nothing to roll back\n"
    assert run_itera("registry", "activate", "pydocs-demo@3", "--registry", three).returncode == 0
    res = run_itera("registry", "rollback", "pydocs-demo", "--to", "3", "--registry", three)
    assert res.stderr == "pydocs-demo@3 is already active; nothing to roll back\n"


def test_serve_a_registered_name_hints_at_its_active_alias(three, tmp_path):
    line = assert_usage_error(run_itera("serve", "--model", "pydocs-demo", "--port", "0",
                                        env={"ITERA_REGISTRY": str(three)}, cwd=tmp_path),
                              "pydocs-demo does not exist", "did you mean pydocs-demo@active?")
    assert line == (f"itera: error: pydocs-demo does not exist; did you mean pydocs-demo@active? "
                    f"(registry {three} has a model of that name)")
    assert_usage_error(run_itera("serve", "--model", "pydocs-demo", "--registry", three, cwd=tmp_path),
                       "--registry applies to a registry ref", "did you mean pydocs-demo@active?")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(three, home / "registry.db")  # the default registry, $ITERA_HOME/registry.db
    env = {"ITERA_HOME": str(home), "ITERA_REGISTRY": ""}
    assert_usage_error(run_itera("serve", "--model", "pydocs-demo", env=env, cwd=tmp_path),
                       f"did you mean pydocs-demo@active? (registry {home / 'registry.db'} has a model")
    # not a registered name: the message as it was
    assert_usage_error(run_itera("serve", "--model", "nosuch", "--port", "0", env={"ITERA_REGISTRY": str(three)},
                                 cwd=tmp_path),
                       "nosuch does not exist; pass a checkpoint directory, .gguf or .onnx file")


def test_history_table_gives_the_summary_room_before_the_actor():
    from itera.registry.display import history_lines

    gate = {"reason": "x" * 40}
    ev = [{"at": "2026-12-06T01:17:52Z", "event": "rollback-refused", "version": 2, "actor": "a-very-long-actor-name",
           "reason": None, "detail": gate},
          {"at": "2026-12-06T01:18:00Z", "event": "activate", "version": 2, "actor": "bob", "reason": "why not",
           "detail": {"alias": "active", "previous": None}}]
    lines = history_lines(ev, "m", 84)
    assert lines == ["at                event             ver  by      what",
                     "2026-12-06 01:17  rollback-refused  @2   a-ver…  " + "x" * 34 + "…",
                     "2026-12-06 01:18  activate          @2   bob     active unset -> @2; reason: why not"]
    # events logged before itera recorded who: no "by" column
    old = history_lines([{**e, "actor": None, "reason": None} for e in ev], "m", 80)
    assert old[0].split() == ["at", "event", "ver", "what"] and old[2].endswith("@2   active unset -> @2")
