"""Each option is declared once: every field of a job's options dataclass says which flag of its
command sets it, or that none does and why (:mod:`itera.options`), and this test holds the Typer
commands to that. A field that is neither a flag the command has nor internal fails; so does a
flag whose default differs from the field's (unless the field gives the CLI's default and the
reason), a command option that sets no field (unless it is on the short list of CLI-only flags
below), and an error message of an options class that names a flag its command does not have."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Annotated, Optional

import pytest
import typer

from itera.cli import COMMANDS, GROUPS, SUBCOMMANDS, app
from itera.options import SAME, Flag, Internal, argument, declared, flag, internal, nested

# command -> its options dataclass
OPTIONS = {
    "benchmark-power": "itera.jobs.benchmark:BenchmarkOptions",
    "discover-cluster": "itera.jobs.cluster:DiscoverOptions",
    "distill": "itera.jobs.distill:DistillOptions",
    "distill cache": "itera.jobs.distill_cache:CacheOptions",
    "dpo-train": "itera.jobs.dpo:DPOOptions",
    "env": "itera.jobs.env:EnvOptions",
    "evaluate": "itera.jobs.evaluate:EvaluateOptions",
    "export": "itera.jobs.export:ExportOptions",
    "quantize": "itera.jobs.quantize:QuantizeOptions",
    "report": "itera.jobs.report:ReportOptions",
    "serve": "itera.jobs.serve.options:ServeOptions",
}
# commands whose job takes no options dataclass
WITHOUT_OPTIONS = {"schema": "prints the published schema; no options"}
# flags that are the CLI's own and set no field, on every command that has them
CLI_ONLY = {"--metrics-out": "also writes the record to a file: the CLI's job (execute), not the job's"}


def _click_command(name: str):
    return typer.main.get_command(app).commands[name]


def _options_class(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _norm(value, multiple: bool):
    """A repeatable option's "none given" (None) is the field's empty list or tuple."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return () if multiple and value is None else value


def problems(command, cls: type) -> list[str]:
    """What is wrong between a click command (its params) and an options dataclass (its marks)."""
    by_name = {}
    for p in command.params:
        for opt in (*p.opts, *p.secondary_opts):
            by_name[opt] = p
    found, setters = [], {}
    for d in declared(cls):
        where = f"{cls.__name__}.{d.path}"
        m = d.mark
        if m is None:
            found.append(f"{where}: neither a flag of `{command.name}` nor marked internal")
            continue
        if isinstance(m, Internal):
            continue
        assert isinstance(m, Flag), where
        p = by_name.get(m.name)
        kind = "argument" if m.argument else "option"
        if p is None or p.param_type_name != kind:
            found.append(f"{where}: `{command.name}` has no {kind} {m.name}")
            continue
        setters.setdefault(p.name, []).append(where)
        multiple = bool(getattr(p, "multiple", False) or getattr(p, "nargs", 1) == -1)
        if m.cli_default is not SAME:
            if _norm(m.cli_default, multiple) == _norm(d.default, multiple):
                found.append(f"{where}: cli_default {m.cli_default!r} is the field's own default; drop it")
            expected = m.cli_default
        else:
            expected = d.default
        if expected is MISSING or p.required:
            continue
        if _norm(p.default, multiple) != _norm(expected, multiple):
            found.append(f"{where}: `{command.name} {m.name}` defaults to {p.default!r}, the field to {expected!r}"
                         + ("" if m.cli_default is SAME else " (its declared cli_default)"))
    for p in command.params:
        name = p.opts[0]
        if p.name not in setters and name not in CLI_ONLY:
            found.append(f"`{command.name} {name}` sets no field of {cls.__name__} and is not on CLI_ONLY")
        if len(setters.get(p.name, ())) > 1:
            found.append(f"`{command.name} {name}` sets several fields: {', '.join(setters[p.name])}")
    return found


def test_every_command_is_checked():
    assert set(OPTIONS) | set(WITHOUT_OPTIONS) == set(COMMANDS) | set(SUBCOMMANDS)
    assert not set(OPTIONS) & set(WITHOUT_OPTIONS)
    assert set(GROUPS) == {"registry"}  # its subcommands call the registry directly, without an options dataclass


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_each_field_is_a_flag_of_its_command_or_internal(command):
    assert problems(_click_command(command), _options_class(OPTIONS[command])) == []


def _classes(cls: type) -> list[type]:
    """The options class and the nested dataclasses of its fields."""
    out = [cls]
    for f in dataclasses.fields(cls):
        if f.default_factory is not MISSING:
            v = f.default_factory()
            if dataclasses.is_dataclass(v):
                out += _classes(type(v))
    return out


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def test_error_messages_name_flags_the_command_has():
    """A flag named in an options class (its validation errors) exists on a command using it:
    ExportOptions once told users to pass --max-kl, which `itera export` did not have."""
    flags_of: dict[type, set[str]] = {}
    for command, spec in OPTIONS.items():
        opts = {o for p in _click_command(command).params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        for cls in _classes(_options_class(spec)):
            flags_of.setdefault(cls, set()).update(opts)
    missing = {cls.__name__: sorted(set(FLAG.findall(inspect.getsource(cls))) - flags)
               for cls, flags in flags_of.items()}
    assert {k: v for k, v in missing.items() if v} == {}


# ------------------------------------------------------------------------- the check itself can fail


def _command(fn) -> object:
    one = typer.Typer()
    one.command("x")(fn)
    one.command("y")(lambda: None)  # two commands, so that get_command gives a group
    return typer.main.get_command(one).commands["x"]


@dataclass
class _Inner:
    steps: int = flag("--steps", default=10)
    floor: float = internal("a recipe constant", default=0.1)


@dataclass
class _Opts:
    out: Path = flag("--out")
    items: list = argument("items", default_factory=list)
    size: int = flag("--size", default=4)
    device: str = flag("--device", default="cpu", cli_default="auto", why="the job resolves auto")
    note: str = internal("the CLI fills it in", default="")
    inner: _Inner = nested(default_factory=lambda: _Inner(steps=20))


def _good(out: Annotated[Path, typer.Option("--out")], items: Annotated[Optional[list[str]], typer.Argument()] = None,
          size: Annotated[int, typer.Option()] = 4, device: Annotated[str, typer.Option()] = "auto",
          steps: Annotated[int, typer.Option()] = 20,
          metrics_out: Annotated[Optional[Path], typer.Option("--metrics-out")] = None) -> None:
    pass


def test_the_check_passes_an_agreeing_pair():
    assert problems(_command(_good), _Opts) == []
    assert [d.path for d in declared(_Opts)] == ["out", "items", "size", "device", "note", "inner.steps", "inner.floor"]


def test_the_check_catches_drift():
    def drifted(out: Annotated[Path, typer.Option("--out")], size: Annotated[int, typer.Option()] = 8,
                device: Annotated[str, typer.Option()] = "cpu", steps: Annotated[int, typer.Option()] = 10,
                extra: Annotated[int, typer.Option()] = 0) -> None:
        pass

    @dataclass
    class Unmarked:
        out: Path = flag("--out")
        size: int = 8

    found = problems(_command(drifted), _Opts)
    assert any("_Opts.items: `x` has no argument items" in f for f in found), found
    assert any("_Opts.size: `x --size` defaults to 8, the field to 4" in f for f in found), found
    assert any("_Opts.device: `x --device` defaults to 'cpu', the field to 'auto'" in f for f in found), found
    assert any("_Opts.inner.steps: `x --steps` defaults to 10, the field to 20" in f for f in found), found
    assert any("`x --extra` sets no field" in f for f in found), found
    found = problems(_command(drifted), Unmarked)
    assert any("Unmarked.size: neither a flag of `x` nor marked internal" in f for f in found), found


def test_marks_need_their_reasons():
    with pytest.raises(ValueError):
        internal("")
    with pytest.raises(ValueError):
        flag("--device", default="cpu", cli_default="auto")
    with pytest.raises(ValueError):
        flag("size", default=1)
    assert dataclasses.asdict(_Opts(out=Path("o"))) == {"out": Path("o"), "items": [], "size": 4, "device": "cpu",
                                                         "note": "", "inner": {"steps": 20, "floor": 0.1}}


# ------------------------------------------------------------------------- aliases (#28 item 8)

# command -> {alias: the option's name in records, errors and docs}. The same meaning has the
# same spelling everywhere: the text a command reads is --data (-d, --dataset) wherever it is one
# text; the checkpoint it starts from is --model (-m); "score at most N tokens" is --eval-tokens.
ALIASES = {
    "distill": {"--model": "--teacher", "-m": "--teacher", "--dataset": "--data", "-d": "--data"},
    "quantize": {"--data": "--calib", "--dataset": "--calib", "-d": "--calib"},
    "export": {"--data": "--calib", "--dataset": "--calib", "-d": "--calib"},
    "evaluate": {"--data": "--dataset", "--eval-tokens": "--max-tokens"},
}


def _params_by_opt(command) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in command.params:
        for opt in (*p.opts, *p.secondary_opts):
            assert opt not in out, f"`{command.name}`: {opt} is declared twice"
            out[opt] = p
    return out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_aliases_are_the_options_they_name_and_every_alias_is_listed(command):
    cmd = _click_command(command)
    by_opt = _params_by_opt(cmd)
    listed = ALIASES.get(command, {})
    for alias, name in listed.items():
        assert by_opt[alias] is by_opt[name], f"`{command} {alias}` is not {name}"
    for p in cmd.params:
        longs = [o for o in p.opts if o.startswith("--")]
        for o in longs[1:]:
            assert listed.get(o) == p.opts[0], f"`{command} {o}` is an alias of {p.opts[0]} missing from ALIASES"


def test_one_spelling_per_meaning():
    """--threads on every command that computes on the CPU, --model/-m on every command that reads
    a model, and --format GGUF like --gguf-type q4_k_m: case does not matter."""
    for name in ("distill", "quantize", "export", "evaluate", "benchmark-power", "serve"):
        assert "--threads" in _params_by_opt(_click_command(name)), name
    for name in ("distill", "quantize", "export", "evaluate", "benchmark-power", "dpo-train", "serve"):
        by_opt = _params_by_opt(_click_command(name))
        assert by_opt["--model"] is by_opt["-m"], name


def test_the_alias_check_can_fail():
    def two(a: Annotated[int, typer.Option("--alpha", "--beta")] = 0,
            b: Annotated[int, typer.Option("--beta")] = 0) -> None:
        pass

    with pytest.raises(AssertionError, match="declared twice"):
        _params_by_opt(_command(two))


# ------------------------------------------------------------------------- the registry's subcommands (#29)

# `itera registry` subcommands that change the registry: each takes --reason (the history keeps it
# with the actor, ITERA_ACTOR or the OS user) and --metrics-out (they print a record); no reading one
# takes either. A new subcommand goes in one list or the other.
REGISTRY_CHANGES = {"register", "activate", "mark-good", "alias", "unalias", "tag", "archive", "unarchive",
                    "rollback", "promote"}
REGISTRY_READS = {"list", "show", "compare", "history", "resolve"}
REGISTRY_MAINTENANCE = {"migrate"}  # upgrades the schema: no version or alias changes, no event, no record
REGISTRY_TRANSFERS = {"pull"}  # writes a copy of an artifact and its record: no registry change, no reason
REGISTRY_BETWEEN = {"copy"}  # from one registry into another: --from and --to, no --registry


def _registry_commands() -> dict:
    return typer.main.get_command(app).commands["registry"].commands


def test_every_registry_change_takes_a_reason_and_no_read_does():
    commands = _registry_commands()
    assert set(commands) == REGISTRY_CHANGES | REGISTRY_READS | REGISTRY_MAINTENANCE | REGISTRY_TRANSFERS | \
        REGISTRY_BETWEEN
    for name, cmd in commands.items():
        by_opt = _params_by_opt(cmd)  # also: no option declared twice
        assert ("--reason" in by_opt) == (name in REGISTRY_CHANGES), name
        assert ("--metrics-out" in by_opt) == (name in REGISTRY_CHANGES | REGISTRY_TRANSFERS), name
        if name in REGISTRY_BETWEEN:
            assert {"--from", "--to"} <= set(by_opt) and "--registry" not in by_opt, name
        else:
            assert "--registry" in by_opt and by_opt["--registry"].envvar == "ITERA_REGISTRY", name
        for p in cmd.params:  # one long spelling per option: none of them has aliases
            assert len([o for o in p.opts if o.startswith("--")]) <= 1, (name, p.opts)
