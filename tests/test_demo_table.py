"""The demo's figures in docs/commands.md are generated from a demo run's records, and checked.

tests/fixtures/demo/ holds the records of the `make demo` run the docs quote (as
``scripts/demo_table.py runs/demo --write docs/commands.md`` wrote them). These tests fail when
the docs' block is edited by hand away from those records, and show that ``--check`` (which
`make demo` runs) tells a drift in a repeatable figure from noise in a timing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "demo"
DOC = ROOT / "docs" / "commands.md"


def _script():
    spec = importlib.util.spec_from_file_location("demo_table", ROOT / "scripts" / "demo_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


demo_table = _script()


def test_the_docs_block_is_what_the_records_render():
    block = demo_table.block_of(DOC.read_text("utf-8"), str(DOC))
    assert block == demo_table.render(demo_table.figures(FIXTURE))


def test_check_passes_on_the_docs_records_and_names_a_drifted_perplexity(tmp_path, capsys):
    assert demo_table.main([str(FIXTURE), "--check", str(DOC)]) == 0
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURE, runs)
    path = runs / "student-q4-gguf-eval.json"
    rec = json.loads(path.read_text())
    rec["metrics"]["datasets"]["pydocs@test"]["perplexity"] += 0.5
    path.write_text(json.dumps(rec))
    capsys.readouterr()
    assert demo_table.main([str(runs), "--check", str(DOC)]) == 1
    err = capsys.readouterr().err
    assert "demo figures differ from this run's" in err
    assert "student, GGUF Q4_0" in err


def test_check_ignores_timings(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURE, runs)
    path = runs / "compare-power.json"
    rec = json.loads(path.read_text())
    for result in rec["metrics"]["compare"].values():
        result["decode_tokens_per_s"] *= 3
        result["decode_tokens_per_s_wall"] = 1.0
    path.write_text(json.dumps(rec))
    assert demo_table.main([str(runs), "--check", str(DOC)]) == 0


def test_no_speed_up_is_quoted_from_an_unstable_benchmark():
    f = demo_table.figures(FIXTURE)
    stable = copy.deepcopy(f)
    stable["speed"], stable["unstable"] = 2.5, None
    assert "2.5x faster to decode" in demo_table.render(stable)
    unstable = copy.deepcopy(f)
    unstable["speed"], unstable["unstable"] = None, "decode steps were delayed"
    text = demo_table.render(unstable)
    assert "faster" not in text
    assert "no speed-up is quoted, because the benchmark says `stable: false` (decode steps were delayed)" in text


def test_a_missing_record_says_to_run_the_demo(tmp_path, capsys):
    assert demo_table.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("teacher.json: No such file or directory; run `make demo` first")


def test_a_comparison_keyed_by_name_and_sha256_renders_the_same(tmp_path):
    """`benchmark-power --compare` now keys each result by the file's name and sha256 (the path and
    the sha256 inside); the block reads those records as it reads the older, path-keyed ones."""
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURE, runs)
    path = runs / "compare-power.json"
    rec = json.loads(path.read_text())
    shas = {Path(json.loads((runs / f).read_text())["artifact"]["path"]).name:
            json.loads((runs / f).read_text())["artifact"]["sha256"]
            for f in ("teacher-f16-eval.json", "student-q4-gguf-eval.json")}
    rec["metrics"]["compare"] = {f"{Path(p).name}#{shas[Path(p).name][:8]}": {**r, "path": p, "sha256": shas[Path(p).name]}
                                 for p, r in rec["metrics"]["compare"].items()}
    path.write_text(json.dumps(rec))
    assert demo_table.render(demo_table.figures(runs)) == demo_table.render(demo_table.figures(FIXTURE))
