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


def config_file(*parts: str) -> Traversable:
    """A file shipped in ``itera.configs`` (e.g. ``config_file("cluster.yaml")``)."""
    return resources.files("itera.configs").joinpath(*parts)


def preset_path(name_or_path: str, group: str, kind: str) -> Traversable | Path:
    """A YAML preset: a path ending in .yaml/.yml, or a name looked up in ``itera.configs/<group>``.

    Raises UsageError naming the known presets when there is none."""
    from itera.errors import UsageError

    if Path(name_or_path).suffix in (".yaml", ".yml"):
        path: Traversable | Path = Path(name_or_path)
    else:
        path = config_file(group, f"{name_or_path}.yaml")
    if not path.is_file():
        known = ", ".join(sorted(p.name[: -len(".yaml")] for p in config_file(group).iterdir()
                                 if p.name.endswith(".yaml")))
        raise UsageError(f"unknown {kind} {name_or_path!r}; use one of {known} or a YAML file")
    return path
