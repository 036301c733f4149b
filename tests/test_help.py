"""Every --help as a CI log or a pipe gets it: rendered at 80 columns with TERM=dumb and stdout a
pipe, it has no boxes, nothing elided, no line wider than the terminal, paragraphs reflowed (no
hard line break mid-sentence), and examples one can paste: each names a real command and only
flags that command has. `itera --help | head -1` exits 0 under pipefail."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import typer

from conftest import REPO, run_itera
from itera.cli import app

WIDTH = 80
BOX = re.compile("[\u2500-\u257f]")
ELIDED = re.compile(r"…|(?<![A-Z\]])\.\.\.")  # "REF..." and "[ARGS]..." say "one or more", not "cut here"


def _tree():
    root = typer.main.get_command(app)
    out = {(): root}

    def walk(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            here = path + tuple(name.split())  # "distill cache": a subcommand typed as two words
            out[here] = sub
            walk(sub, here)

    walk(root, ())
    return out


TREE = _tree()


def _flags(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}


def _help(path: tuple[str, ...]) -> str:
    res = run_itera(*path, "--help", env={"COLUMNS": str(WIDTH), "TERM": "dumb"})
    assert res.returncode == 0, (path, res.stderr)
    assert res.stderr == "", res.stderr
    return res.stdout


def _sections(text: str) -> dict[str, list[str]]:
    """Lines under each heading ("Usage", "description", "Options", "Examples", ...)."""
    out: dict[str, list[str]] = {"description": []}
    current = "description"
    for line in text.splitlines():
        if line.startswith("Usage: "):
            out["Usage"] = [line]
            current = "Usage"
        elif re.fullmatch(r"[A-Z][a-z]+:", line):
            current = line[:-1]
            out[current] = []
        else:
            out.setdefault(current, []).append(line)
    return out


def examples(text: str) -> list[str]:
    """The example commands of a help text: the lines of its Examples section that start with
    `itera` (a trailing backslash continues one on the next line); `#` lines are comments."""
    lines = _sections(text).get("Examples", [])
    found, buf = [], ""
    for line in lines:
        s = line.strip()
        if not s or (s.startswith("#") and not buf):
            continue
        buf = f"{buf} {s}" if buf else s
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        assert buf.startswith("itera "), f"an Examples line that is neither a command nor a # comment: {line!r}"
        found.append(buf)
        buf = ""
    assert not buf, buf
    return found


def check_command_line(line: str) -> list[tuple[str, ...]]:
    """Every `itera ...` in a shell line (pipeline stages, $(...)) names a real command and only
    its flags; returns the command paths it names."""
    words = shlex.split(line)
    named = []
    stages, cur = [], []
    for w in words:
        if w in ("|", "&&", ";"):
            stages.append(cur)
            cur = []
        elif w.startswith("$(") and w.endswith(")"):
            named += check_command_line(w[2:-1])
        elif w in (">", "<", "2>"):
            cur.append(None)  # a redirection: the next word is a file
        else:
            cur.append(w)
    stages.append(cur)
    for stage in stages:
        if not stage or stage[0] != "itera":
            continue
        words = stage[1:]
        path: tuple[str, ...] = ()
        while words and words[0] is not None and path + (words[0],) in TREE and not words[0].startswith("-"):
            path += (words.pop(0),)
        assert path and not hasattr(TREE[path], "commands"), f"{line!r}: no itera command in {stage!r}"
        flags = _flags(TREE[path])
        skip = False
        for w in words:
            if skip or w is None:
                skip = w is None
                continue
            if w.startswith("-") and not re.fullmatch(r"-[\d.]+", w):
                assert w.split("=")[0] in flags, f"{line!r}: `itera {' '.join(path)}` has no {w}"
        named.append(path)
    return named


PATHS = sorted(TREE)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(("itera",) + p))
def test_help_reads_well_at_80_columns_in_a_log(path):
    text = _help(path)
    assert not BOX.search(text), "box-drawing characters"
    for line in text.splitlines():
        assert len(line) <= WIDTH, f"{len(line)} columns: {line!r}"
        assert not ELIDED.search(line), f"elided: {line!r}"
    # reflowed: in a paragraph, the next line's first word would not have fitted on this line
    desc = _sections(text)["description"]
    for a, b in zip(desc, desc[1:]):
        if a.strip() and b.strip() and not a.startswith("    ") and not b.startswith("    "):
            assert len(a) + 1 + len(b.split()[0]) > WIDTH - 1, f"a hard line break mid-paragraph after {a!r}"
    assert "<" not in "".join(_sections(text).get("Options", [])).split("  ", 1)[0]
    assert not re.search(r"<(path|str|int|float|list\[|bool)", text) and "{ref}" not in text, "a raw type as metavar"
    assert "\\[" not in text, "a rich markup escape shown as is"
    found = examples(text)
    assert found, "no examples"
    for line in found:
        named = check_command_line(line)
        if path:
            assert any(n[:len(path)] == path for n in named), \
                f"an example of `itera {' '.join(path)}` that does not run it: {line!r}"


def test_the_example_check_can_fail():
    assert check_command_line("itera export --model m --format gguf --out m.gguf") == [("export",)]
    assert check_command_line('itera evaluate --model "$(itera registry resolve a@active)" -d x') == [
        ("registry", "resolve"), ("evaluate",)]
    for bad in ("itera export --modle m", "itera exprt --model m", "itera registry --name x",
                "itera quantize -o q | itera evaluate --window 1 --no-such"):
        with pytest.raises(AssertionError):
            check_command_line(bad)
    with pytest.raises(AssertionError):
        examples("Usage: itera x\n\nExamples:\n  itera env\n  python -c 1\n")
    assert examples("Examples:\n  # what\n  itera env \\\n    --no-smoke\n") == ["itera env --no-smoke"]


def test_help_head_exits_0_under_pipefail():
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    itera = f"{shlex.quote(sys.executable)} -m itera"
    for cmd in (f"{itera} --help | head -1", f"{itera} registry --help | head -1", f"{itera} schema | head -1"):
        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, cwd=REPO, env=env)
        assert p.returncode == 0 and p.stderr == "", (cmd, p.returncode, p.stderr)
        assert len(p.stdout.splitlines()) == 1


def test_a_closed_stdout_is_not_an_error():
    """Written to a pipe whose reader is already gone (EPIPE on the first write): exit 0, nothing on stderr."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "itera", "distill", "--help"], stdout=w, stderr=subprocess.PIPE,
                           cwd=REPO, env={**os.environ, "COLUMNS": "80"})
    finally:
        os.close(w)
    assert p.returncode == 0 and p.stderr == b"", (p.returncode, p.stderr)


def test_columns_is_respected():
    narrow = run_itera("export", "--help", env={"COLUMNS": "60", "TERM": "dumb"}).stdout.split("Examples:")[0]
    wide = run_itera("export", "--help", env={"COLUMNS": "100", "TERM": "dumb"}).stdout.split("Examples:")[0]
    assert max(map(len, narrow.splitlines())) <= 60 < max(map(len, wide.splitlines())) <= 100


def test_a_group_alone_prints_its_help_and_exits_2():
    for path in ((), ("registry",)):
        res = run_itera(*path, env={"COLUMNS": "80", "TERM": "dumb"})
        assert res.returncode == 2 and res.stdout == _help(path) and res.stderr == "", path
