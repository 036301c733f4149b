"""How library jobs tell people what they are doing, without printing anything themselves.

Every ``run_<verb>(opts, reporter)`` takes a :class:`Reporter`: ``log(line)`` for a message and
``task(description, total)`` for a unit of work with progress. The CLI passes one that writes to
stderr (``itera.cli._console``); tests and scripts pass nothing and get :data:`SILENT`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol


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


@contextmanager
def running(reporter: Reporter, description: str, total: int | None = None, unit: str = "steps") -> Iterator[Task]:
    """``reporter.task(...)`` closed however the block ends."""
    task = reporter.task(description, total=total, unit=unit)
    try:
        yield task
    finally:
        task.close()
