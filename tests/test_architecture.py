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


def _unit(module: str) -> str:
    """The unit the floor plan talks about: a job (``itera.jobs.serve``), else a top-level package or
    module of itera (``itera.export``, ``itera.record``)."""
    parts = module.split(".")
    return ".".join(parts[:3] if parts[1:2] == ["jobs"] else parts[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_units_or_modules():
    units: dict[str, set[str]] = {}
    for a, bs in GRAPH.items():
        units.setdefault(_unit(a), set()).update(_unit(b) for b in bs if _unit(b) != _unit(a))
    assert _cycles(units) == []
    assert _cycles(GRAPH) == []


# what each layer of the core may import from itera, beyond the foundation (errors, fsio, paths, progress, ...)
FORBIDDEN = {
    "itera.storage": ("itera.quant", "itera.export", "itera.model", "itera.runtime", "itera.record"),
    "itera.quant": ("itera.export", "itera.runtime"),
    "itera.export": ("itera.quant",),
    "itera.runtime": ("itera.export", "itera.quant"),
    "itera.record": ("itera.runtime", "itera.export", "itera.model"),
    "itera.artifacts": ("itera.runtime", "itera.record", "itera.export"),
    # the registry's decisions are pure: no SQL, no files
    "itera.registry.policy": ("itera.sqlite", "itera.registry.storage", "itera.registry.integrity", "itera.artifacts",
                              "itera.fsio"),
    "itera.registry.provenance": ("itera.sqlite", "itera.registry.storage", "itera.artifacts", "itera.fsio"),
}


def test_the_storage_layer_is_below_quantization_and_export():
    for layer, banned in FORBIDDEN.items():
        assert _edges(lambda a: _under(a, layer), lambda a, b: any(_under(b, x) for x in banned)) == [], layer


def test_every_job_has_one_entry_point_of_the_job_shape():
    """Each job (module or package) defines exactly one ``run_<verb>(opts, reporter, ...)``, and the
    CLI runs every one of them through ``execute``."""
    entries: dict[str, list[str]] = {}
    for name, path in MODULES.items():
        job = _job(name)
        if job is None:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("run_"):
                assert [a.arg for a in node.args.args[:2]] == ["opts", "reporter"], (name, node.name)
                entries.setdefault(job, []).append(node.name)
    assert {j: len(v) for j, v in entries.items()} == {j: 1 for j in {_job(m) for m in MODULES} - {None}}
    cli = "\n".join(p.read_text() for m, p in MODULES.items() if _under(m, "itera.cli"))
    for (name,) in entries.values():
        assert "execute(" in cli and name in cli, name


# The core's layers, lowest first (docs/architecture.md's table): a module imports only its own layer
# and those below. Every core module is placed, so a new one is placed on purpose.
LAYERS = [
    ("itera", "itera.errors", "itera.fsio", "itera.paths", "itera.progress", "itera.memory", "itera.options",
     "itera.sqlite", "itera.pg", "itera.configs"),
    ("itera.storage",),
    ("itera.model", "itera.tokenizer", "itera.data", "itera.chat"),
    ("itera.artifacts",),
    ("itera.record",),
    ("itera.losses", "itera.train", "itera.lora", "itera.student", "itera.prune", "itera.preference", "itera.scoring",
     "itera.feedback", "itera.teacher_cache"),
    ("itera.quant",),
    ("itera.runtime",),
    ("itera.export",),
    ("itera.power", "itera.probe", "itera.registry"),
]


def _layer(module: str) -> int | None:
    for i, units in enumerate(LAYERS):
        if any(module == u or (u != "itera" and module.startswith(u + ".")) for u in units):
            return i
    return None


def test_the_core_is_layered_as_documented():
    core = [m for m in MODULES if not (_under(m, "itera.jobs") or _under(m, "itera.cli") or m == "itera.__main__")]
    assert [m for m in core if _layer(m) is None] == []
    assert _edges(lambda a: a in core, lambda a, b: _layer(b) is None or _layer(b) > _layer(a)) == []
    doc = (REPO / "docs" / "architecture.md").read_text()
    for units in LAYERS[1:]:
        for u in units:
            assert f"`{u.removeprefix('itera.')}" in doc, u
