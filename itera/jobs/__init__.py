"""The jobs: one module (or package) per command, each with one entry point
``run_<verb>(opts, reporter) -> Outcome`` (the :class:`Job` protocol below).

A job reads its validated options, does the work with the core components (``itera.model``,
``itera.tokenizer``, ``itera.data``, ``itera.runtime``, ``itera.train``, ``itera.losses``,
``itera.lora``, ``itera.quant``, ``itera.export``, ``itera.storage``, ``itera.registry``, ...)
and returns an :class:`~itera.record.Outcome`; the CLI (:mod:`itera.cli`) turns that into the
record. A job never imports another job, and the core never imports a job
(``tests/test_architecture.py``). See ``docs/architecture.md``.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from itera.progress import Reporter
from itera.record import Outcome

Opts = TypeVar("Opts", contravariant=True)


class Job(Protocol[Opts]):
    """What every command's entry point is: options in (validated before anything expensive
    runs), progress out through the reporter, one :class:`Outcome` back. Jobs never print."""

    def __call__(self, opts: Opts, reporter: Reporter, /) -> Outcome: ...
