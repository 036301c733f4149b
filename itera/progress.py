"""How library jobs tell people what they are doing, without printing anything themselves.

Every ``run_<verb>(opts, reporter)`` takes a :class:`Reporter`: ``log(line)`` for a message and
``task(description, total)`` for a unit of work with progress. The CLI passes one that writes to
stderr (``itera.cli._console``); tests and scripts pass nothing and get :data:`SILENT`.
"""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    def update(self, completed: int, **fields: float) -> None:
        """``completed`` units of ``total`` done; ``fields`` are figures to show (loss, tokens_per_s)."""

    def close(self) -> None:
        """The task is over (finished or abandoned)."""


class Reporter(Protocol):
    def log(self, message: str) -> None:
        """One line for people."""

    def task(self, description: str, total: int | None = None, unit: str = "steps") -> Task:
        """Start a unit of work of ``total`` ``unit``s (None when unknown)."""


class _SilentTask:
    def update(self, completed: int, **fields: float) -> None:
        pass

    def close(self) -> None:
        pass


class _Silent:
    def log(self, message: str) -> None:
        pass

    def task(self, description: str, total: int | None = None, unit: str = "steps") -> Task:
        return _SilentTask()


SILENT: Reporter = _Silent()
