"""Where itera keeps its own state: ``$ITERA_HOME`` (default ``~/.itera``)."""

from __future__ import annotations

import os
from pathlib import Path


def itera_home() -> Path:
    return Path(os.environ.get("ITERA_HOME") or Path.home() / ".itera")


def cache_dir() -> Path:
    return itera_home() / "cache"


def preset_path(name_or_path: str, directory: Path, kind: str) -> Path:
    """A YAML preset: a path ending in .yaml/.yml, or a name looked up in ``directory``.

    Raises UsageError naming the known presets when there is none."""
    from itera.errors import UsageError

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(directory) / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in Path(directory).glob("*.yaml")))
        raise UsageError(f"unknown {kind} {name_or_path!r}; use one of {known} or a YAML file")
    return path
