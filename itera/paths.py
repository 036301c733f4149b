"""Where itera keeps its own state: ``$ITERA_HOME`` (default ``~/.itera``)."""

from __future__ import annotations

import os
from pathlib import Path


def itera_home() -> Path:
    return Path(os.environ.get("ITERA_HOME") or Path.home() / ".itera")


def cache_dir() -> Path:
    return itera_home() / "cache"
