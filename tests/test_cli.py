"""The CLI root: the command list, start-up imports, version."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_itera
from itera.cli import COMMANDS, GROUPS

HEAVY = ("torch", "onnxruntime", "llama_cpp", "transformers")


def _listed_commands(help_text: str) -> set[str]:
    # Rows of the "Commands:" section look like "  evaluate  Perplexity and ..."
    section = help_text.split("\nCommands:\n", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"^  ([a-z][a-z-]+)\s{2,}", section, flags=re.M))


def test_help_lists_exactly_the_registered_commands():
    res = run_itera("--help", env={"COLUMNS": "100"})
    assert res.returncode == 0
    assert _listed_commands(res.stdout) == set(COMMANDS) | set(GROUPS)


def _modules_after(argv: list[str]) -> set[str]:
    code = (
        "import sys\n"
        f"sys.argv = ['itera'] + {argv!r}\n"
        "from itera.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    return set(filter(None, p.stderr.strip().splitlines()[-1].split(","))) if p.stderr.strip() else set()


def test_help_and_version_import_no_heavy_packages():
    for argv in (["--help"], ["--version"], ["evaluate", "--help"], ["schema"]):
        assert _modules_after(argv) == set(), argv


def test_version():
    res = run_itera("--version")
    assert res.returncode == 0 and re.fullmatch(r"itera \d+\.\d+\.\d+\n", res.stdout)


def test_schema_command_prints_the_published_schema():
    from itera.record import schema

    res = run_itera("schema")
    assert res.returncode == 0 and json.loads(res.stdout) == schema()


# The console script pip installed beside the Python that runs the tests (a virtualenv's bin/).
CONSOLE_SCRIPT = Path(sys.executable).parent / "itera"


@pytest.mark.skipif(not CONSOLE_SCRIPT.is_file(), reason=f"no itera console script beside {sys.executable} "
                    "(install the package with pip into this environment)")
def test_python_dash_m_and_console_script_agree():
    out = subprocess.run([str(CONSOLE_SCRIPT), "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"itera \d+\.\d+\.\d+\n", out.stdout)
    assert out.stdout == run_itera("--version").stdout
    help_ = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, env={**os.environ,
                                                                                               "COLUMNS": "100"})
    assert help_.returncode == 0 and _listed_commands(help_.stdout) == set(COMMANDS) | set(GROUPS)


# ----------------------------------------------------------------- one spelling per meaning (#28 item 8)


def test_distill_takes_model_and_data_aliases_and_threads(tiny_ckpt, corpus_file, tmp_path):
    rec = run_itera("distill", "-m", tiny_ckpt, "-d", corpus_file, "--layers", "1", "--out", tmp_path / "s",
                    "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "64",
                    "--threads", "1").record
    p = rec["params"]
    assert p["teacher"] == str(tiny_ckpt) and p["data"] == str(corpus_file) and p["threads"] == 1
    assert rec["metrics"]["teacher_params"] > rec["metrics"]["student_params"]


def test_quantize_takes_data_for_calib_and_threads(tiny_ckpt, corpus_file, tmp_path):
    rec = run_itera("quantize", "--model", tiny_ckpt, "--method", "rtn", "--bits", "8", "--data", corpus_file,
                    "--eval-tokens", "64", "--out", tmp_path / "q", "--threads", "1").record
    assert rec["params"]["calib"] == str(corpus_file) and rec["params"]["threads"] == 1
    assert rec["metrics"]["perplexity_after"] is not None  # the held-out tail of --data was scored
    res = run_itera("quantize", "--model", tiny_ckpt, "--out", tmp_path / "q2", "--threads", "0")
    assert res.returncode == 2 and "--threads" in res.stderr and "Traceback" not in res.stderr


def test_evaluate_takes_data_and_eval_tokens(tiny_ckpt, corpus_file):
    rec = run_itera("evaluate", "--model", tiny_ckpt, "--data", corpus_file, "--eval-tokens", "40",
                    "--window", "16").record
    assert rec["params"]["max_tokens"] == 40
    (scores,) = rec["metrics"]["datasets"].values()
    assert scores["tokens"] <= 40


def test_export_format_any_case_and_a_missing_directory_is_created(tiny_ckpt, corpus_file, tmp_path):
    out = tmp_path / "new" / "deeper" / "m.gguf"
    rec = run_itera("export", "--model", tiny_ckpt, "--format", "GGUF", "--out", out).record
    assert rec["params"]["format"] == "gguf" and rec["artifact"]["format"] == "gguf" and out.is_file()
    # a failed export leaves no directory it made behind
    gone = tmp_path / "other" / "m.gguf"
    res = run_itera("export", "--model", tiny_ckpt, "--format", "Gguf", "--gguf-type", "q8_0", "--max-kl", "0",
                    "--out", gone)
    assert res.returncode == 1 and not (tmp_path / "other").exists(), res.stderr
    # --data is export's --calib: the same refusal names it
    res = run_itera("export", "--model", tiny_ckpt, "--format", "ONNX", "--data", corpus_file,
                    "--out", tmp_path / "m.onnx")
    assert res.returncode == 2 and "--calib (importance data" in res.stderr
