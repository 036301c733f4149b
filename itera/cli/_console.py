"""Everything the CLI says to people, on stderr: messages, tables and progress.

One :class:`Console` per command. Under torchrun only rank 0 speaks. On a terminal, tables and
progress bars are drawn with rich (cells wrap, never elide); when stderr is a file or a CI log,
tables are plain aligned text that is never cut and progress is a plain line every few seconds
(step, figures, rate, ETA), so a ``nohup`` run's log shows how it is going.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence, TextIO

PLAIN_EVERY_S = float(os.environ.get("ITERA_PROGRESS_EVERY", "10"))  # seconds between plain progress lines


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _fmt(v: Any) -> str:
    return "" if v is None else str(v)


class Console:
    """Messages, tables and progress for people (an :class:`itera.progress.Reporter`)."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = (_rank() == 0) if enabled is None else enabled
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False

    # ------------------------------------------------------------------ messages

    def log(self, message: str) -> None:
        if self.enabled:
            self.stream.write(message.rstrip("\n") + "\n")
            self.stream.flush()

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not self.enabled:
            return
        cells = [[_fmt(c) for c in r] for r in rows]
        if self.tty:
            from rich.console import Console as RichConsole
            from rich.table import Table

            t = Table(title=title)
            for c in columns:
                t.add_column(c, overflow="fold")
            for r in cells:
                t.add_row(*r)
            RichConsole(file=self.stream).print(t)
            return
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    # ------------------------------------------------------------------ progress

    def task(self, description: str, total: int | None = None, unit: str = "steps"):
        if not self.enabled:
            return _NullTask()
        if self.tty:
            return _RichTask(self.stream, description, total)
        return _PlainTask(self, description, total, unit)


class _NullTask:
    def update(self, completed: int, **fields: float) -> None:
        pass

    def close(self) -> None:
        pass


def _figures(fields: dict) -> str:
    parts = []
    for k, v in fields.items():
        if v is None:
            continue
        label = k.replace("_", " ").replace("tokens per s", "tok/s")
        parts.append(f"{label} {v:.4g}" if isinstance(v, float) else f"{label} {v}")
    return ", ".join(parts)


class _RichTask:
    def __init__(self, stream: TextIO, description: str, total: int | None):
        from rich.console import Console as RichConsole
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[figures]}"), TimeRemainingColumn(),
                                 console=RichConsole(file=stream), transient=True)
        self.progress.start()
        self.id = self.progress.add_task(description, total=total, figures="")

    def update(self, completed: int, **fields: float) -> None:
        self.progress.update(self.id, completed=completed, figures=_figures(fields))

    def close(self) -> None:
        self.progress.stop()


class _PlainTask:
    """A line like ``distill: step 120/500 (24%), loss 3.412, tok/s 5021, ETA 1m17s`` every few seconds."""

    def __init__(self, console: Console, description: str, total: int | None, unit: str):
        self.console, self.description, self.total, self.unit = console, description, total, unit
        self.t0 = time.monotonic()
        self.last = self.t0
        self.line: str | None = None
        self.printed: str | None = None

    def update(self, completed: int, **fields: float) -> None:
        now = time.monotonic()
        where = f"{completed}/{self.total}" if self.total else str(completed)
        pct = f" ({100 * completed / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.total and completed:
            left = (now - self.t0) / completed * (self.total - completed)
            eta = f", ETA {int(left // 60)}m{int(left % 60):02d}s"
        figures = _figures(fields)
        self.line = f"{self.description}: {self.unit} {where}{pct}" + (f", {figures}" if figures else "") + eta
        if now - self.last >= PLAIN_EVERY_S:
            self._emit()
            self.last = now

    def _emit(self) -> None:
        if self.line and self.line != self.printed:
            self.console.log(self.line)
            self.printed = self.line

    def close(self) -> None:
        self._emit()
