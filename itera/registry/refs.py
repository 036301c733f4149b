"""Model names and version references: ``name``, ``name@3``, ``name@active``, ``name@last-good``,
``name@latest``, ``name@staging`` (a custom alias). Names, versions, alias names and the free
text an event carries (its actor, its reason) reach the storage only as bound parameters; they
are validated here besides."""

from __future__ import annotations

import re
from dataclasses import dataclass

from itera.errors import UsageError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # matched whole (re.fullmatch): no trailing newline
VERSION_RE = re.compile(r"[0-9]{1,18}")  # ASCII digits only ('١' is a digit to str.isdigit); fits SQLite's integer
MAX_VERSION = 10 ** 18 - 1
ALIASES = ("active", "last-good")  # reserved: activate/promote/rollback and mark-good move them
ALIAS_COMMANDS = {"active": "`itera registry activate`, `promote` or `rollback`",
                  "last-good": "`itera registry mark-good`"}
MAX_TEXT = 1024  # a --reason, an ITERA_ACTOR: at most this many characters


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
                         "(starting with a letter or digit, at most 128 characters)")
    return name


def validate_alias(alias: str) -> str:
    """A custom alias (``staging``, ``canary``): spelled like a model name, but not a number (that
    is a version) nor ``latest``, ``active`` or ``last-good`` (the registry sets those itself)."""
    if not isinstance(alias, str) or not NAME_RE.fullmatch(alias) or alias.isascii() and alias.isdigit():
        raise UsageError(f"invalid alias {alias!r}: use letters, digits, '.', '_' and '-' (starting with a letter or "
                         "digit, at most 128 characters, not a number)")
    if alias == "latest":
        raise UsageError("'latest' is not an alias one can set: NAME@latest is always the highest version")
    if alias in ALIAS_COMMANDS:
        raise UsageError(f"{alias!r} is reserved: {ALIAS_COMMANDS[alias]} moves it")
    return alias


def validate_text(text: str, what: str) -> str:
    """Free text an event keeps (a --reason, an ITERA_ACTOR): not empty, at most ``MAX_TEXT``
    characters, no control characters (newlines, tabs, escapes)."""
    if not text.strip() or len(text) > MAX_TEXT or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise UsageError(f"invalid {what}: one line of 1 to {MAX_TEXT} characters without control characters "
                         "(newlines, tabs)")
    return text


def is_alias(selector: str) -> bool:
    """Whether a ref's selector names an alias (reserved or custom), not a version nor ``latest``."""
    return selector != "latest" and not VERSION_RE.fullmatch(selector)


@dataclass(frozen=True)
class Ref:
    """``name``, ``name@3``, ``name@active``, ``name@last-good``, ``name@latest`` or ``name@ALIAS``
    (a custom alias, e.g. ``name@staging``)."""

    name: str
    selector: str | None = None  # a version number as text, an alias, "latest", or None

    @classmethod
    def parse(cls, text: str) -> "Ref":
        name, sep, sel = str(text).partition("@")
        validate_name(name)
        if sep and not (VERSION_RE.fullmatch(sel) and int(sel) > 0 or sel in ALIASES or sel == "latest"
                        or NAME_RE.fullmatch(sel) and not (sel.isascii() and sel.isdigit())):
            raise UsageError(f"invalid version {sel!r} in {text!r}: use NAME@N (N >= 1), NAME@active, "
                             "NAME@last-good, NAME@latest or NAME@ALIAS")
        return cls(name, sel or None)

    def __str__(self) -> str:
        return self.name + (f"@{self.selector}" if self.selector else "")
