"""The README and docs' quantize, export and evaluate examples run as written.

Each line below is copied from the README and docs (README.md, docs/**/*.md: the test fails if
none of them has it any more) and run unchanged in a scratch directory where ``M`` and
``runs/demo/teacher`` are a small trained model and ``notes.txt`` is a text file: the names a
reader substitutes, nothing else. Lines that train (distill, dpo-train) or need other machines are
left to their own tests."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

from conftest import REPO, run_itera

EXAMPLES = [
    "itera quantize --model M --method rtn --bits 8 --out runs/int8",
    "itera quantize --model M --method gptq --gguf-type Q4_K --calib notes.txt --out runs/q4k",
    "itera quantize --model M --method auto --target-bpw 5 --calib notes.txt --out runs/mixed",
    "itera quantize --model M --method auto --plan runs/mixed/quant_plan.json --calib notes.txt --out runs/again",
    "itera export --model runs/mixed --format gguf --out mixed.gguf",
    "itera quantize --model runs/demo/teacher --method gptq --bits 4 --group-size 32 --calib pydocs@test --out runs/q4",
    "itera export --model runs/q4 --format gguf --out runs/q4.gguf",
    "itera export --model M --format gguf --gguf-type Q4_K_M --calib notes.txt --out m.gguf",
    "itera export --model M --format pt2 --out m.pt2",
    "itera evaluate --model m.gguf -d notes.txt",
    "itera evaluate --model runs/demo/teacher -d pydocs@test",
]


def _readme_and_docs() -> str:
    """README.md followed by every docs/**/*.md, in path order."""
    paths = [REPO / "README.md"] + sorted((REPO / "docs").glob("**/*.md"))
    return "\n".join(p.read_text() for p in paths)


def test_readme_examples_run_as_written(lm, corpus_file, tmp_path):
    readme = _readme_and_docs()
    for line in EXAMPLES:
        assert line in readme, f"the README and docs no longer have: {line}"
    (tmp_path / "M").symlink_to(lm)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "teacher").symlink_to(lm)
    (tmp_path / "notes.txt").write_text(corpus_file.read_text())
    records = {}
    for line in EXAMPLES:
        res = run_itera(*shlex.split(line)[1:], cwd=tmp_path)
        assert res.returncode == 0, (line, res.stderr)
        records[line] = rec = res.record
        if rec["artifact"] is not None and "--out" in line:
            out = shlex.split(line)[shlex.split(line).index("--out") + 1]
            assert (tmp_path / out).exists(), line
    # what the README and docs say each does
    plan = json.loads((tmp_path / "runs" / "mixed" / "quant_plan.json").read_text())
    again = records[EXAMPLES[3]]["metrics"]["plan_types"]
    assert again == records[EXAMPLES[2]]["metrics"]["plan_types"] and set(again.values()) <= set(plan["types"].values())
    assert records[EXAMPLES[2]]["metrics"]["gguf_bits_per_weight"] <= 5
    assert records[EXAMPLES[4]]["metrics"]["file_bytes"] == records[EXAMPLES[2]]["metrics"]["gguf_bytes"]
    assert records[EXAMPLES[6]]["metrics"]["direct_from_codes"] > 0  # Q4_0 blocks straight from GPTQ's codes
    assert records[EXAMPLES[7]]["metrics"]["importance"] is not None
    (scores,) = records[EXAMPLES[9]]["metrics"]["datasets"].values()  # keyed by the file's name and content
    assert 1 < scores["perplexity"] < 5000


def _block_after(text: str, heading: str) -> str:
    """The first code block after ``heading``."""
    return re.search(r"```\n(.*?)```", text[text.index(heading):], flags=re.S).group(1)


def _bits_per_weight(path) -> float:
    """Bits per weight over every tensor of a GGUF file, read from the file itself."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    return sum(int(t.n_bytes) for t in tensors) * 8 / sum(int(t.n_elements) for t in tensors)


def test_the_quick_start_and_the_main_recipe_make_real_4_bit_files(lm, corpus_file, tmp_path):
    """The README's quick start and the main recipe (docs/commands.md, "Your own model and data") run
    as written in bash with pipefail, the reader's model and text replaced by a small trained model
    and a text file: each 4-bit GGUF is 4-bit over every tensor, within 10% of Q4_0's 4.5 bits per
    weight (embeddings and head included), not mostly F16."""
    quick = [ln for ln in _block_after((REPO / "README.md").read_text(), "## Quick start").splitlines()
             if ln.startswith("itera ")]
    recipe = _block_after((REPO / "docs" / "commands.md").read_text(), "## Your own model and data")
    recipe = recipe.replace("~/models/SmolLM-135M", shlex.quote(str(lm)))
    assert any("--gguf-type Q4_0 --out runs/q4.gguf" in ln for ln in quick) and "--gguf-type Q4_0" in recipe
    (tmp_path / "notes.txt").write_text(corpus_file.read_text())
    script = "\n".join(["set -eo pipefail", f'itera() {{ {shlex.quote(sys.executable)} -m itera "$@"; }}',
                        f"M={shlex.quote(str(lm))}", *quick, recipe])
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("runs/q4.gguf", "runs/smol-half-q4.gguf"):
        assert _bits_per_weight(tmp_path / name) <= 4.5 * 1.1, name
    assert json.loads(p.stdout.strip().splitlines()[-1])["command"] == "registry register"  # the last stage ran
