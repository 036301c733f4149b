"""A user's first hour: gates that mean what they say, records that tell the whole story, and
terminal output that fits logs and pipes."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import SMALL, assert_usage_error, file_key, run_itera


def reg(db, *args, **kw):
    return run_itera("registry", *args, "--registry", db, **kw)


@pytest.fixture(scope="module")
def gguf_versions(tiny_ckpt, tmp_path_factory, corpus_file):
    """Two GGUF exports of the tiny model, evaluated on the same text with two protocols."""
    d = tmp_path_factory.mktemp("gate")
    text = d / "notes.txt"
    shutil.copy(corpus_file, text)
    out = {}
    for t in ("F32", "Q8_0"):
        ex = run_itera("export", "--model", tiny_ckpt, "--format", "gguf", "--gguf-type", t, "--out", d / f"{t}.gguf")
        for max_tokens in (300, 2000):
            ev = run_itera("evaluate", "-d", text, "--max-tokens", str(max_tokens), stdin=ex.stdout, cwd=d)
            out[t, max_tokens] = ev.stdout
    return d, out


def test_a_bare_number_margin_is_refused(gguf_versions, tmp_path):
    d, recs = gguf_versions
    db = tmp_path / "r.db"
    reg(db, "register", "--name", "m", stdin=recs["F32", 2000]).record
    reg(db, "register", "--name", "m", stdin=recs["Q8_0", 2000]).record
    assert reg(db, "activate", "m@1").returncode == 0
    assert_usage_error(reg(db, "promote", "m@2", "--metric", "perplexity", "--max-regression", "2"),
                       "--max-regression '2' is ambiguous", "2%")
    assert reg(db, "promote", "m@2", "--metric", "perplexity", "--max-regression", "2%").returncode == 0


def test_promote_refuses_figures_measured_with_different_protocols(gguf_versions, tmp_path):
    d, recs = gguf_versions
    db = tmp_path / "r.db"
    reg(db, "register", "--name", "m", stdin=recs["F32", 2000]).record
    reg(db, "register", "--name", "m", stdin=recs["Q8_0", 300]).record
    assert reg(db, "activate", "m@1").returncode == 0
    res = reg(db, "promote", "m@2", "--metric", "perplexity", "--max-regression", "50%")
    assert res.returncode == 3 and "measured differently" in res.stderr
    assert "max_tokens 300 vs 2000" in res.stderr and "tokens 299 vs 1999" in res.stderr
    events = json.loads(reg(db, "history", "m").stdout)["events"]
    assert events[-1]["event"] == "promote-refused"


def test_dataset_keys_are_canonical_whatever_was_typed(tiny_ckpt, tmp_path, corpus_file):
    shutil.copy(corpus_file, tmp_path / "notes.txt")
    a = run_itera("evaluate", "--model", tiny_ckpt, "-d", "notes.txt", "--max-tokens", "100", cwd=tmp_path).record
    b = run_itera("evaluate", "--model", tiny_ckpt, "-d", "./notes.txt", "--max-tokens", "100", cwd=tmp_path).record
    key = file_key(tmp_path / "notes.txt")
    assert re.fullmatch(r"notes\.txt#[0-9a-f]{8}", key)
    assert list(a["metrics"]["datasets"]) == list(b["metrics"]["datasets"]) == [key]
    assert a["params"]["datasets_typed"] == {key: "notes.txt"} and b["params"]["datasets_typed"] == {key: "./notes.txt"}
    assert a["params"]["datasets_paths"] == {key: str((tmp_path / "notes.txt").resolve())}
    c = run_itera("evaluate", "--model", tiny_ckpt, "-d", "pydocs", "--max-tokens", "50").record
    assert list(c["metrics"]["datasets"]) == ["pydocs@test"]


def test_a_file_dataset_is_named_by_its_content_so_promote_works_from_another_checkout(gguf_versions, tmp_path):
    """One text in two checkouts is one metric; another text under the same name is another."""
    d, _ = gguf_versions
    a, b, c = (tmp_path / x for x in ("ci-a", "home-b", "other-c"))
    for x in (a, b, c):
        x.mkdir()
    shutil.copy(d / "notes.txt", a / "notes.txt")
    shutil.copy(d / "notes.txt", b / "notes.txt")
    (c / "notes.txt").write_text((d / "notes.txt").read_text()[::-1])
    db = tmp_path / "r.db"
    ev = {}
    for where, gguf in ((a, "F32.gguf"), (b, "Q8_0.gguf")):
        ev[where] = run_itera("evaluate", "--model", d / gguf, "-d", "notes.txt", "--max-tokens", "300", cwd=where)
        reg(db, "register", "--name", "m", stdin=ev[where].stdout).record
    key = file_key(a / "notes.txt")
    assert list(ev[a].record["metrics"]["datasets"]) == list(ev[b].record["metrics"]["datasets"]) == [key]
    assert str(a) not in key and ev[a].record["params"]["datasets_paths"][key] == str((a / "notes.txt").resolve())
    assert reg(db, "activate", "m@1").returncode == 0
    res = reg(db, "promote", "m@2", "--metric", "notes.txt.perplexity", "--max-regression", "50%")
    assert res.returncode == 0, res.stderr
    assert res.record["params"]["gate"]["metric"] == f"datasets.{key}.perplexity"
    assert json.loads(reg(db, "show", "m@active").stdout)["version"] == 2
    # other text under the same name: another key; the bare name is then ambiguous, in one line
    other = run_itera("evaluate", "--model", d / "Q8_0.gguf", "-d", a / "notes.txt", "-d", c / "notes.txt",
                      "--max-tokens", "300")
    keys = list(other.record["metrics"]["datasets"])
    assert keys == [key, file_key(c / "notes.txt")] and keys[0] != keys[1]
    reg(db, "register", "--name", "two", stdin=other.stdout).record
    assert_usage_error(reg(db, "promote", "two@1", "--metric", "notes.txt.perplexity"),
                       "names 2 different contents of one file", f"datasets.{keys[1]}.perplexity")
    assert reg(db, "promote", "two@1", "--metric", f"datasets.{keys[1]}.perplexity").returncode == 0


def test_read_commands_never_create_a_database(tmp_path):
    db = tmp_path / "wrong" / "path.db"
    for args in (["list"], ["show", "m@1"], ["history", "m"], ["resolve", "m@active"], ["compare", "m@1", "m@2"]):
        assert_usage_error(reg(db, *args), f"registry {db} does not exist")
    assert not db.exists() and not db.parent.exists()


def test_unknown_names_are_bad_input_and_a_missing_artifact_is_reported(tiny_ckpt, tmp_path):
    db = tmp_path / "r.db"
    gguf = tmp_path / "m.gguf"
    run_itera("export", "--model", tiny_ckpt, "--format", "gguf", "--out", gguf).record
    reg(db, "register", "--name", "m", "--path", gguf).record
    assert_usage_error(reg(db, "rollback", "nosuchname"), "no model named 'nosuchname'")
    assert_usage_error(reg(db, "activate", "nosuch@9"), "no model named 'nosuch'")
    assert_usage_error(reg(db, "rollback", "m", "--to", "9"), "has no version 9")
    again = reg(db, "register", "--name", "m", "--path", gguf)
    assert again.record["params"]["version"] == 1 and again.record["params"]["duplicate_of"] == 1
    assert "already holds these bytes" in again.stderr
    dup = reg(db, "register", "--name", "m", "--path", gguf, "--allow-duplicate").record
    assert dup["params"]["version"] == 2
    gguf.unlink()
    assert_usage_error(reg(db, "resolve", "m@1"), "no longer exists")


def test_compare_puts_size_and_key_metrics_first(gguf_versions, tmp_path):
    d, recs = gguf_versions
    db = tmp_path / "r.db"
    reg(db, "register", "--name", "m", stdin=recs["F32", 2000]).record
    reg(db, "register", "--name", "m", stdin=recs["Q8_0", 2000]).record
    keys = list(json.loads(reg(db, "compare", "m@1", "m@2").stdout)["metrics"])
    assert keys[0] == "bytes" and keys[1].endswith(".perplexity") and keys[2].endswith(".bits_per_byte")


def test_k_quant_record_says_what_the_file_holds(tiny_ckpt, tmp_path):
    import gguf

    rec = run_itera("export", "--model", tiny_ckpt, "--format", "gguf", "--gguf-type", "q4_k_m",
                    "--out", tmp_path / "k.gguf").record
    m = rec["metrics"]
    found: dict[str, int] = {}
    reader = gguf.GGUFReader(str(tmp_path / "k.gguf"))
    for t in reader.tensors:
        found[t.tensor_type.name] = found.get(t.tensor_type.name, 0) + 1
    assert m["tensor_types"] == found and rec["params"]["gguf_type"] == "Q4_K_M"
    # hidden 32: no row is a multiple of 256, so every 2-D tensor fell back, each listed
    two_d = [t.name for t in reader.tensors if len(t.shape) == 2]
    assert sorted(fb["tensor"] for fb in m["fallbacks"]) == sorted(two_d)
    total = sum(int(t.n_bytes) for t in reader.tensors) * 8 / sum(int(t.n_elements) for t in reader.tensors)
    assert m["bits_per_weight"] == pytest.approx(total)


def test_requantizing_to_the_same_type_is_not_a_fallback(tiny_ckpt, tmp_path):
    run_itera("quantize", "--model", tiny_ckpt, "--method", "rtn", "--bits", "4", "--out", tmp_path / "q").record
    rec = run_itera("export", "--model", tmp_path / "q", "--format", "gguf", "--gguf-type", "Q8_0",
                    "--out", tmp_path / "q.gguf").record
    assert rec["metrics"]["fallbacks"] == [] and rec["metrics"]["requantized"]


def test_logs_get_plain_untruncated_lines_and_periodic_progress(distill_corpus, tmp_path, tiny_ckpt):
    """stderr to a file (as under nohup or CI): no ANSI codes, no cut cells, progress lines."""
    res = run_itera("distill", "--teacher", tiny_ckpt, "--student", "half", "--data", distill_corpus, "--out",
                    tmp_path / "s", "--steps", "30", *SMALL, env={"ITERA_PROGRESS_EVERY": "0", "COLUMNS": "80"})
    res.record
    assert "\x1b[" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("distill: steps ")]
    assert len(lines) >= 2 and all(re.search(r"loss [\d.]+, tok/s [\d.]+", ln) for ln in lines), res.stderr
    assert "loss nan" not in res.stderr
    gguf = tmp_path / "a-rather-long-artifact-name-that-would-be-elided-in-a-narrow-table.gguf"
    run_itera("export", "--model", tiny_ckpt, "--format", "gguf", "--out", gguf).record
    bench = run_itera("benchmark-power", "--model", gguf, "--runs", "2", "--prompt-tokens", "8", "--gen-tokens", "8",
                      env={"COLUMNS": "80"})
    bench.record
    assert str(gguf) in bench.stderr and "…" not in bench.stderr and "\x1b[" not in bench.stderr


def test_mistyped_file_and_options_that_do_not_apply(tiny_ckpt, tmp_path, corpus_file):
    shutil.copy(corpus_file, tmp_path / "notes.txt")
    res = run_itera("evaluate", "--model", tiny_ckpt, "-d", "notes.tx", cwd=tmp_path)
    assert_usage_error(res, "notes.tx does not exist", "did you mean notes.txt?")
    gguf = tmp_path / "m.gguf"
    run_itera("export", "--model", tiny_ckpt, "--format", "gguf", "--out", gguf).record
    assert_usage_error(run_itera("evaluate", "--model", gguf, "-d", tmp_path / "notes.txt", "--dtype", "bfloat16"),
                       "--dtype bfloat16 applies to checkpoints")
    run_itera("export", "--model", tiny_ckpt, "--format", "pt2", "--out", tmp_path / "m.pt2").record
    assert_usage_error(run_itera("evaluate", "--model", tmp_path / "m.pt2", "-d", tmp_path / "notes.txt"),
                       "torch.export program for PyTorch deployments")


def test_discover_cluster_refuses_an_unknown_launch_and_fails_with_no_reachable_host(tmp_path):
    assert_usage_error(run_itera("discover-cluster", "localhost", "--launch", "train --steps 5"),
                       "does not start with an itera command")
    policy = tmp_path / "policy.yaml"
    policy.write_text("networks: []\nnames: []\n")
    assert_usage_error(run_itera("discover-cluster", "10.0.0.5", "--config", policy), "no host is reachable")


def test_dpo_merge_record_points_at_the_merged_checkpoint_and_an_empty_holdout_is_reported(tiny_ckpt, tmp_path):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}", "chosen": " yes.", "rejected": " no."}) + "\n"
                             for i in range(5)))
    res = run_itera("dpo-train", "--model", tiny_ckpt, "--pairs", pairs, "--out", tmp_path / "a", "--steps", "2",
                    "--batch-size", "2", "--merge", "--lora-targets", "q_proj,v_proj")
    rec = res.record
    assert rec["artifact"]["path"] == str(tmp_path / "a" / "merged") and rec["artifact"]["adapter"] == str(tmp_path / "a")
    if rec["metrics"]["pairs_heldout"] == 0:
        assert "held-out split is empty" in res.stderr and rec["metrics"]["heldout_note"]
    ex = run_itera("export", "--format", "gguf", "--out", tmp_path / "m.gguf", stdin=res.stdout).record
    assert ex["metrics"]["verified"]
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
