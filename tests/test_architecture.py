"""The floor plan holds (docs/architecture.md): the CLI sits on the jobs, the jobs on the core;
a job never imports another job, the core never imports a job or the CLI, and the storage-format
layer sits below quantization and export, which never import each other's way up.

Every ``import`` in the package counts, the ones inside functions included: a lazy import is
still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "itera"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = [x for x in p.relative_to(REPO).with_suffix("").parts if x != "__init__"]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The itera modules ``name`` imports (``from itera.x import y`` counts as itera.x.y when that is
    a module, else itera.x)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "itera"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "itera":
                continue
            for a in node.names:
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _job(module: str) -> str | None:
    """The job a module belongs to (``itera.jobs.serve.app`` -> ``serve``), None outside the jobs."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["itera", "jobs"] else None


def _edges(where, to):
    return sorted(f"{a} -> {b}" for a, bs in GRAPH.items() if where(a) for b in bs if to(a, b))


def test_the_graph_is_read():
    """The test reads the real tree: the CLI imports every job's package, lazily or not."""
    assert len(MODULES) > 60
    jobs = {_job(m) for m in MODULES} - {None}
    assert {"distill", "quantize", "export", "evaluate", "benchmark", "dpo", "cluster", "report", "serve",
            "env"} <= jobs
    used = {_job(b) for a, bs in GRAPH.items() if _under(a, "itera.cli") for b in bs}
    assert jobs <= used


def test_a_job_never_imports_another_job():
    assert _edges(lambda a: _job(a) is not None, lambda a, b: _job(b) not in (None, _job(a))) == []


def test_the_core_never_imports_a_job_or_the_cli():
    def core(m):
        return not (_under(m, "itera.jobs") or _under(m, "itera.cli") or m == "itera.__main__")

    assert _edges(core, lambda a, b: _under(b, "itera.jobs") or _under(b, "itera.cli")) == []


def test_jobs_never_import_the_cli():
    assert _edges(lambda a: _under(a, "itera.jobs"), lambda a, b: _under(b, "itera.cli")) == []
