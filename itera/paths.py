"""Where itera keeps its own state (``$ITERA_HOME``, default ``~/.itera``) and where its
presets live: the ``itera.configs`` package data, read with :mod:`importlib.resources` so
that a plain ``pip install .`` finds them as a checkout does."""

from __future__ import annotations

import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path


def itera_home() -> Path:
    return Path(os.environ.get("ITERA_HOME") or Path.home() / ".itera")


def cache_dir() -> Path:
    return itera_home() / "cache"


def state_dir(path: Path, what: str = "") -> Path:
    """Create directory ``path`` (under ``$ITERA_HOME``, or a file's parent) for itera's state; a
    home that is a file, unwritable or on /proc is one line naming it and the fix."""
    from itera.errors import UsageError

    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        home = itera_home()
        inside = str(path).startswith(str(home))
        where = f"ITERA_HOME {home}" if inside else str(path)
        fix = "set ITERA_HOME to a writable directory" if inside else f"pass a path whose directory can be written{what}"
        raise UsageError(f"{where} cannot hold itera's files ({e.strerror or e}: {path}); {fix}") from None
    return path


def config_file(*parts: str) -> Traversable:
    """A file shipped in ``itera.configs`` (e.g. ``config_file("cluster.yaml")``)."""
    return resources.files("itera.configs").joinpath(*parts)


def preset_path(name_or_path: str, group: str, kind: str) -> Traversable | Path:
    """A YAML preset: a path ending in .yaml/.yml, or a name looked up in ``itera.configs/<group>``.

    Raises UsageError naming the known presets when there is none, and when a named file is missing
    or is not a regular file (a FIFO would block the read)."""
    from itera.errors import UsageError

    def known() -> str:
        return ", ".join(sorted(p.name[: -len(".yaml")] for p in config_file(group).iterdir()
                                if p.name.endswith(".yaml")))

    if Path(name_or_path).suffix in (".yaml", ".yml"):
        from itera.fsio import check_input_file

        path = Path(name_or_path)
        check_input_file(path, kind, f"pass a YAML file or one of {known()}", UsageError)
        return path
    path = config_file(group, f"{name_or_path}.yaml")
    if not path.is_file():
        raise UsageError(f"unknown {kind} {name_or_path!r}; use one of {known()} or a YAML file")
    return path


def load_preset(name_or_path: str, group: str, kind: str, fields: str) -> tuple[Traversable | Path, dict]:
    """(path, mapping) of a YAML preset (see :func:`preset_path`). A file that is not UTF-8, not
    YAML, or not a mapping is a UsageError naming it and ``fields`` (what the mapping holds)."""
    import yaml

    from itera.errors import UsageError

    path = preset_path(name_or_path, group, kind)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{kind} {path} is not UTF-8 text; save it as UTF-8 YAML with {fields}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{kind} {path} is not valid YAML ({' '.join(str(e).split())[:160]}); "
                         f"write a mapping with {fields}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        name = type(data).__name__
        raise UsageError(f"{kind} {path} must be a YAML mapping with {fields}, not {'an' if name[0] in 'aeiou' else 'a'} "
                         f"{name}")
    return path, data
