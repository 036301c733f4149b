"""``--help`` as plain text that reads the same on a terminal, in a pipe and in a CI log.

No boxes, no colours, nothing elided: paragraphs of the docstrings are reflowed to the width
(``COLUMNS``, else the terminal's, else 80; at most 100), option descriptions wrap in their own
column, and the lines after a docstring's ``Examples:`` line are printed as they are written, one
command a line, so that each can be pasted into a shell. An example line starts with ``itera``
(a pipeline's later stages may follow ``|``); a line starting with ``#`` says what the next one
does. ``tests/test_help.py`` renders every command's help at 80 columns and holds it to this.

Typer (0.2x, with its vendored click) would draw rich panels; the command classes here replace
its ``format_help`` with :func:`render`. Stdlib only, so ``itera --help`` stays light.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap

import typer
from typer.core import TyperCommand, TyperGroup

MAX_WIDTH = 100  # wider paragraphs are hard to read; narrower terminals get their own width
DEFAULT_WIDTH = 80  # when the width is unknown (a pipe, a CI log)
TERM_COLUMN = 26  # option names wider than this go on their own line, the description below
EXAMPLES = re.compile(r"^\s*Examples?:\s*$")


def width() -> int:
    """Columns to wrap to: $COLUMNS, else the terminal's, else 80; between 40 and 100."""
    w = 0
    try:
        w = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        pass
    if w <= 0:
        try:
            w = os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else DEFAULT_WIDTH
        except (OSError, ValueError, AttributeError):
            w = DEFAULT_WIDTH
    return max(40, min(w or DEFAULT_WIDTH, MAX_WIDTH))


def split_help(text: str) -> tuple[str, list[str]]:
    """A docstring's description and its example lines (after a line ``Examples:``), dedented."""
    text = (text or "").split("\f", 1)[0]
    lines = textwrap.dedent(text).strip("\n").splitlines()
    for i, line in enumerate(lines):
        if EXAMPLES.match(line):
            body = textwrap.dedent("\n".join(lines[i + 1:])).strip("\n").splitlines()
            out: list[str] = []
            for ln in body:
                if ln.strip() or (out and out[-1]):
                    out.append(ln.rstrip())
            return "\n".join(lines[:i]).strip(), out
    return "\n".join(lines).strip(), []


def first_paragraph(text: str) -> str:
    desc, _ = split_help(text)
    return " ".join(desc.split("\n\n", 1)[0].split())


def _wrap(text: str, w: int, indent: str = "", hang: str | None = None) -> list[str]:
    return textwrap.wrap(text, w, initial_indent=indent, subsequent_indent=indent if hang is None else hang,
                         break_long_words=False, break_on_hyphens=False) or [indent.rstrip()]


def _paragraphs(text: str, w: int, indent: str = "  ") -> list[str]:
    """Reflow each paragraph (blank-line separated); a paragraph indented deeper than the text
    around it, or one of ``- `` items, keeps its line breaks."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text.strip()):
        lines = para.splitlines()
        if not lines:
            continue
        if out:
            out.append("")
        if all(ln.startswith((" ", "\t")) for ln in lines):  # a block kept as written
            out += [indent + ln.rstrip() for ln in lines]
        elif all(ln.lstrip().startswith(("- ", "* ")) or ln.startswith("  ") for ln in lines):
            items: list[str] = []
            for ln in lines:
                if ln.lstrip().startswith(("- ", "* ")):
                    items.append(ln.strip())
                else:
                    items[-1] += " " + ln.strip()
            for it in items:
                out += _wrap(it, w, indent, indent + "  ")
        else:
            out += _wrap(" ".join(" ".join(lines).split()), w, indent)
    return out


def _is_bool(p) -> bool:
    return bool(getattr(p, "is_flag", False)) or getattr(p, "count", False)


def metavar(p) -> str:
    """A readable placeholder: the declared metavar, else PATH/FILE, N, NUM, or the option's last word."""
    if p.metavar:
        return p.metavar
    bare = p.bare_type()
    base = bare[5:-1] if bare.startswith("list[") else bare
    if p.param_type_name == "argument":
        name = p.name.upper()
    elif base.lower() == "path":
        dir_ok = getattr(p.type_descriptor.parameter_info, "dir_okay", True)
        name = "PATH" if dir_ok else "FILE"
    elif base == "int":
        name = "N"
    elif base == "float":
        name = "NUM"
    else:
        long = max(p.opts, key=len).lstrip("-")
        name = long.split("-")[-1].upper()
    return name


def term(p) -> str:
    """``-m, --model PATH`` / ``--bos / --no-bos`` / ``REF``."""
    if p.param_type_name == "argument":
        return metavar(p) + ("..." if p.nargs != 1 else "")
    names = sorted(p.opts, key=lambda o: (o.startswith("--"), p.opts.index(o)))
    text = ", ".join(names)
    if p.secondary_opts:
        text += " / " + ", ".join(p.secondary_opts)
    if not _is_bool(p):
        text += " " + metavar(p)
    return text


def _describe(p, ctx) -> str:
    rec = p.get_help_record(ctx)
    text = rec[1] if rec else (p.help or "")
    # "[default: 128]" and the like stay on one line (textwrap does not break at a no-break space)
    text = re.sub(r"\[[^\[\]]*\]$", lambda m: m.group(0).replace(" ", "\xa0"), text)
    if getattr(p, "multiple", False) and "repeat" not in text.lower():
        text += " (repeatable)"
    return text


def _definitions(rows: list[tuple[str, str]], w: int) -> list[str]:
    col = min(max((len(t) for t, _ in rows), default=0), TERM_COLUMN, max(12, w // 3))
    out: list[str] = []
    for t, d in rows:
        lead = "  " + t
        text_w = w - 2 - col - 2
        if len(t) > col:
            out.append(lead)
            out += _wrap(d, w, " " * (col + 4)) if d else []
            continue
        wrapped = _wrap(d, text_w) if d else [""]
        out.append((lead.ljust(col + 4) + wrapped[0]).rstrip())
        out += [" " * (col + 4) + ln for ln in wrapped[1:]]
    return [ln.replace("\xa0", " ") for ln in out]


def usage(cmd, ctx) -> str:
    pieces = [ctx.command_path, "[OPTIONS]"]
    for p in cmd.get_params(ctx):
        if p.param_type_name == "argument" and not p.hidden:
            mv = metavar(p) + ("..." if p.nargs != 1 else "")
            pieces.append(mv if p.required else f"[{mv}]")
    if isinstance(cmd, TyperGroup):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def render(cmd, ctx) -> str:
    """The whole help of a command or group as plain text."""
    w = width() - 1  # a line as wide as the terminal makes some terminals add a blank line
    desc, examples = split_help(cmd.help or "")
    out = _wrap("Usage: " + usage(cmd, ctx), w, "", "    ")
    if desc:
        out += [""] + _paragraphs(desc, w)
    params = [p for p in cmd.get_params(ctx) if not p.hidden]
    args = [(term(p), _describe(p, ctx)) for p in params if p.param_type_name == "argument"]
    opts = [(term(p), _describe(p, ctx)) for p in params if p.param_type_name == "option"]
    for title, rows in (("Arguments", args), ("Options", opts)):
        if rows:
            out += ["", f"{title}:"] + _definitions(rows, w)
    if isinstance(cmd, TyperGroup):
        rows = [(name, first_paragraph(sub.help or "")) for name, sub in cmd.commands.items() if not sub.hidden]
        if rows:
            out += ["", "Commands:"] + _definitions(rows, w)
    if examples:
        out += ["", "Examples:"] + ["  " + ln if ln else "" for ln in examples]
    return "\n".join(out) + "\n"


class _Help:
    def format_help(self, ctx, formatter) -> None:  # noqa: D401 - click's hook
        formatter.write(render(self, ctx))

    def get_short_help_str(self, limit: int = 45) -> str:  # never elided
        return first_paragraph(self.help or "")


class Command(_Help, TyperCommand):
    """A command whose ``--help`` is :func:`render`'s plain text."""


class Group(_Help, TyperGroup):
    """A group (``itera``, ``itera registry``) whose ``--help`` is :func:`render`'s plain text."""


class App(typer.Typer):
    """A Typer app whose group and commands render their help with :func:`render`."""

    def __init__(self, **kwargs):
        kwargs.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        super().__init__(cls=Group, rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False,
                         **kwargs)

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or Command, **kwargs)
