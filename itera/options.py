"""Where each field of a job's options dataclass comes from: a flag of its command, or nowhere
on the command line (internal, with the reason).

Every field of an options dataclass (``ExportOptions``, ``QuantizeOptions``, ...) is declared
with one of these instead of a bare default::

    max_kl: float | None = flag("--max-kl", default=None)
    commands: tuple[str, ...] = internal("the CLI fills it in from its command list", default=())
    train: TrainOptions = nested(default_factory=TrainOptions, internal={"min_lr_ratio": "..."})

``tests/test_options.py`` reads these marks and the Typer commands together: every field must be
a flag (or argument) its command really has, with the same default, or be marked internal; and
every option of a command must set a field, unless it is on the test's short list of CLI-only
flags. The marks change nothing at run time: they are ``dataclasses.field`` metadata.

Stdlib only: the CLI's light modules and ``itera --help`` may import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING
from typing import Any, Callable, Iterator

KEY = "itera.option"


class _Same:
    def __repr__(self) -> str:
        return "SAME"


SAME: Any = _Same()  # the CLI's default is the field's default


@dataclasses.dataclass(frozen=True)
class Flag:
    """The field is set by this option of the command (``--max-kl``), or by its positional
    argument of that name (``argument=True``). ``cli_default``, when not :data:`SAME`, is the
    command's own default where it deliberately differs from the field's, and ``why`` says why."""

    name: str
    argument: bool = False
    cli_default: Any = SAME
    why: str = ""


@dataclasses.dataclass(frozen=True)
class Internal:
    """No flag sets the field; ``why`` says what does (the CLI, from the record on stdin; a
    fixed part of the recipe; ...)."""

    why: str


@dataclasses.dataclass(frozen=True)
class Nested:
    """The field is another options dataclass whose fields carry their own marks. ``internal``
    names those of its fields this command has no flag for, with the reason."""

    internal: dict = dataclasses.field(default_factory=dict)


def _field(mark, default, default_factory) -> Any:
    kwargs: dict = {"metadata": {KEY: mark}}
    if default is not MISSING:
        kwargs["default"] = default
    if default_factory is not MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def flag(name: str, *, default: Any = MISSING, default_factory: Callable[[], Any] | Any = MISSING,
         cli_default: Any = SAME, why: str = "") -> Any:
    """A field set by the option ``name`` (e.g. ``"--max-kl"``). Pass ``cli_default`` (and
    ``why``) only where the command's default deliberately differs from ``default``."""
    if not name.startswith("--"):
        raise ValueError(f"flag({name!r}): a flag starts with --; use argument() for a positional argument")
    if cli_default is not SAME and not why:
        raise ValueError(f"flag({name!r}): a cli_default that differs needs the reason (why=...)")
    return _field(Flag(name, False, cli_default, why), default, default_factory)


def argument(name: str, *, default: Any = MISSING, default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A field set by the command's positional argument ``name`` (its parameter name, e.g. ``"hosts"``)."""
    return _field(Flag(name, True), default, default_factory)


def internal(why: str, *, default: Any = MISSING, default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A field no flag sets; ``why`` says what sets it or why it is fixed."""
    if not why.strip():
        raise ValueError("internal(): say why the field has no flag")
    return _field(Internal(why), default, default_factory)


def nested(*, default_factory: Callable[[], Any], internal: dict[str, str] | None = None) -> Any:
    """A field holding another options dataclass (e.g. ``TrainOptions``), built by ``default_factory``
    with this command's defaults. ``internal`` maps its fields that this command has no flag for
    to the reason."""
    return _field(Nested(dict(internal or {})), MISSING, default_factory)


def mark(f: dataclasses.Field) -> Flag | Internal | Nested | None:
    """The mark of a field, None when it has none."""
    return f.metadata.get(KEY)


@dataclasses.dataclass(frozen=True)
class Declared:
    """One leaf field of an options dataclass, nested fields flattened: ``path`` like
    ``train.steps``, its mark (None: unmarked), and its default as the command's options get it
    (:data:`dataclasses.MISSING` when it has none)."""

    path: str
    mark: Flag | Internal | None
    default: Any


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def declared(cls: type, prefix: str = "", instance: Any = None,
             overrides: dict[str, str] | None = None) -> Iterator[Declared]:
    """Every leaf field of the options dataclass ``cls``, nested dataclasses expanded. A nested
    field's defaults are those of the instance its parent's ``default_factory`` builds (DPO's
    training options are not ``TrainOptions()``'s), and its parent's ``internal`` map overrides
    the marks of the fields it names."""
    for f in dataclasses.fields(cls):
        m = mark(f)
        path = prefix + f.name
        if overrides and f.name in overrides:
            m = Internal(overrides[f.name])
        default = getattr(instance, f.name) if instance is not None else _default(f)
        if isinstance(m, Nested):
            if default is MISSING or not dataclasses.is_dataclass(default):
                raise TypeError(f"{cls.__name__}.{f.name}: nested() needs a default_factory building the dataclass")
            unknown = set(m.internal) - {g.name for g in dataclasses.fields(default)}
            if unknown:
                raise TypeError(f"{cls.__name__}.{f.name}: internal names no field of "
                                f"{type(default).__name__}: {', '.join(sorted(unknown))}")
            yield from declared(type(default), path + ".", default, m.internal)
        else:
            yield Declared(path, m, default)
