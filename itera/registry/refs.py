"""Model names and version references: ``name``, ``name@3``, ``name@active``, ``name@last-good``,
``name@latest``. Names and versions reach the storage only as bound parameters; they are
validated here besides."""

from __future__ import annotations

import re
from dataclasses import dataclass

from itera.errors import UsageError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # matched whole (re.fullmatch): no trailing newline
VERSION_RE = re.compile(r"[0-9]{1,18}")  # ASCII digits only ('١' is a digit to str.isdigit); fits SQLite's integer
MAX_VERSION = 10 ** 18 - 1
ALIASES = ("active", "last-good")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
                         "(starting with a letter or digit, at most 128 characters)")
    return name


@dataclass(frozen=True)
class Ref:
    """``name``, ``name@3``, ``name@active``, ``name@last-good`` or ``name@latest``."""

    name: str
    selector: str | None = None  # a version number as text, an alias, "latest", or None

    @classmethod
    def parse(cls, text: str) -> "Ref":
        name, sep, sel = str(text).partition("@")
        validate_name(name)
        if sep and not (VERSION_RE.fullmatch(sel) and int(sel) > 0 or sel in ALIASES or sel == "latest"):
            raise UsageError(f"invalid version {sel!r} in {text!r}: use NAME@N (N >= 1), NAME@active, "
                             "NAME@last-good or NAME@latest")
        return cls(name, sel or None)

    def __str__(self) -> str:
        return self.name + (f"@{self.selector}" if self.selector else "")
