"""`itera registry ...`: versions, aliases, tags, promotion gates, rollback and archiving on SQLite.

Changing subcommands (register, activate, mark-good, rollback, promote, alias, unalias, tag,
archive, unarchive) print an itera record, and each takes ``--reason TEXT``: the history keeps
it with who made the change (``ITERA_ACTOR``, else the OS user);
reading subcommands (list, show, compare, history) print a compact table in human units when
stdout is a terminal (:mod:`itera.registry.display`), else, or with --json, one JSON object on one
line; resolve prints a bare path for shell use. None of them imports torch.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Iterable, Optional

import typer

from itera.cli._help import App
from itera.cli._options import MetricsOut
from itera.errors import UsageError

app = App(help="""Versioned models with lineage, aliases (active, last-good, your own), tags, promotion gates, rollback and archiving.

Examples:

  itera export --model runs/q4 --format gguf --out runs/q4.gguf \\
    | itera registry register --name demo --tag stage=ci
  itera registry promote demo@latest --metric perplexity --max-regression 2%
  itera registry rollback demo
""", no_args_is_help=True)

RegistryPath = Annotated[Optional[str], typer.Option(
    "--registry", envvar="ITERA_REGISTRY", metavar="PATH|URL",
    help="A SQLite file (or sqlite:///PATH), or a team's PostgreSQL database: postgresql://USER@HOST:PORT/DB "
         "(the password from the URL, PGPASSWORD or ~/.pgpass; never printed). Default: $ITERA_HOME/registry.db "
         "(~/.itera).")]
RefArg = Annotated[str, typer.Argument(help="NAME, NAME@N, NAME@active, NAME@last-good, NAME@latest or "
                                        "NAME@ALIAS (e.g. NAME@staging).")]
Tags = Annotated[Optional[list[str]], typer.Option("--tag", metavar="KEY=VALUE", help="A tag; repeat for "
                                                   "several.")]
Reason = Annotated[Optional[str], typer.Option("--reason", metavar="TEXT", help="Why: the history keeps it, with "
                                               "who made the change ($ITERA_ACTOR, else the OS user).")]


TAG_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_tags(items: Iterable[str], how: str = "--tag key=value") -> dict[str, str]:
    """``--tag key=value`` flags (or ``key=value`` arguments, ``how`` says which) as a dict."""
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not TAG_RE.match(key):
            raise UsageError(f"invalid tag {item!r}: use {how} (key of letters, digits, '_', '.', '-')")
        if any(ord(c) < 32 or ord(c) == 127 for c in value) or len(value) > 1024:
            raise UsageError(f"invalid tag value for {key!r}: at most 1024 characters and no control characters "
                             "(newlines, tabs)")
        tags[key] = value
    return tags


def parse_margin(text: str) -> float:
    """'2%' -> 0.02; '0.02' -> 0.02. Must be >= 0. A bare number of 1 or more is refused: '2'
    would otherwise allow a 200% regression where 2% was meant."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise UsageError(f"invalid --max-regression {text!r}: use a percentage like 2% or a fraction like 0.02") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"--max-regression must be a non-negative number, got {text!r}")
    if not s.endswith("%") and value >= 1:
        raise UsageError(f"--max-regression {text!r} is ambiguous: write {s}% for {s} percent, or a fraction "
                         f"below 1 (e.g. {value / 100:g})")
    return value


def _open(path: str | None, create: bool = True):
    """The registry; reading commands pass ``create=False`` so a mistyped path is an error, not a new database."""
    from itera.registry import Registry

    return Registry(path, create=create)


def _finite(obj):
    """A copy with non-finite floats as null: JSON has no NaN, and a database written by an older
    itera may hold one."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


JsonFlag = Annotated[bool, typer.Option("--json", help="Print the JSON object on a terminal too, as pipes and "
                                        "files get it, instead of the table.")]


def _for_person(json_: bool) -> bool:
    """Whether to print the compact table: stdout is a terminal and no --json (nor `itera --json`)
    asked for the JSON object, which pipes and files always get."""
    from itera import record

    if json_ or record.FULL_ON_TERMINAL:
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _print_json(obj) -> None:
    """The JSON object on one line, the same on a terminal (with --json) as in a pipe."""
    sys.stdout.write(json.dumps(_finite(obj), default=str, allow_nan=False) + "\n")


def _columns() -> int:
    """The terminal's width ($COLUMNS first), 100 when it cannot be told."""
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


def _print_lines(lines: list[str]) -> None:
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _say(message: str) -> None:
    from itera.cli._console import Console

    Console().log(message)


def _summary(v: dict) -> dict:
    """A version without its bulky stored record."""
    return {k: v[k] for k in v if k != "record"}


def _change(sub: str, registry: str | None, metrics_out: Path | None, change, parent: dict | None = None,
            extra_params=lambda v: {}, say=lambda v: None, reason: str | None = None, create: bool = True,
            ahead=lambda reg: None) -> None:
    """Run ``change(reg) -> version`` and build its record in one transaction, so that anything
    that can fail (a number JSON cannot hold, a record the schema refuses) fails before the
    commit; ``--metrics-out``, ``--reason`` and ``ITERA_ACTOR`` are checked first, before the
    registry is opened, and the record is written, like stdout, after the commit. ``create=False``:
    the registry must exist (the commands that change a version already registered). ``ahead(reg)``
    runs before the transaction: :meth:`Registry.check_ahead` of the version about to be pointed at,
    so that fetching and hashing its artifact does not hold the write lock."""
    from itera import record
    from itera.fsio import check_writable_file
    from itera.registry import current_actor, validate_text

    if metrics_out is not None:
        check_writable_file(metrics_out)
    if reason is not None:
        validate_text(reason, "--reason")
    actor = current_actor()
    run = record.Run(f"registry {sub}", parent=parent)
    with _open(registry, create=create) as reg:
        ahead(reg)
        with reg.transaction():
            v = change(reg)
            artifact = {k: v[k] for k in ("path", "kind", "format", "bytes", "sha256")}
            params = {"name": v["name"], "version": v["version"], "registry": str(reg.path),
                      "aliases": v["aliases"], **extra_params(v), "actor": actor, "reason": reason}
            rec = run.record(artifact, {}, params)
            record.dumps(rec)  # serialisable, or the transaction rolls back
    say(v)
    record.emit(rec, metrics_out=metrics_out)


@app.command()
def register(
    name: Annotated[str, typer.Option("--name", "-n", help="Model name: letters, digits, '.', '_', '-'.")],
    record_file: Annotated[Optional[Path], typer.Option("--record", help="Read the record from this file "
                                                        "instead of stdin.")] = None,
    path: Annotated[Optional[Path], typer.Option("--path", help="Register a bare artifact (file or "
                                                 "directory) without a record.")] = None,
    tag: Tags = None,
    allow_duplicate: Annotated[bool, typer.Option("--allow-duplicate", help="Add a new version even when NAME "
                                                  "already has one with these exact bytes (by default that "
                                                  "version is reported and nothing is added).")] = False,
    reason: Reason = None,
    store: Annotated[Optional[str], typer.Option(
        "--store", envvar="ITERA_STORE", metavar="URL",
        help="Copy the artifact into this content-addressed store (file:///shared/path), so that any machine "
             "can resolve, pull, roll back to and serve the version. Default: $ITERA_STORE; without either, "
             "the version names the local path only.")] = None,
    registry: RegistryPath = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Add the next version of NAME from the record on stdin, --record FILE or --path ARTIFACT.

    Stores the artifact's path, kind, format, size and sha256 (verified against the record), the
    record's params, the metrics measured on this artifact along the lineage, the lineage itself,
    tags, the git commit of the working directory and the time. With --store the artifact's bytes
    are copied into the store first (by sha256; a directory file by file) and the version is
    reachable from every machine that mounts it; without, from this machine's path only.

    Examples:

      itera export --model runs/q4 --format gguf --out runs/q4.gguf \\
        | itera registry register --name demo --tag stage=ci

      itera registry register --name demo --record runs/q4-export.json

      itera registry register --name demo --path runs/q4.gguf

      itera registry register --name demo --path runs/q4.gguf \\
        --store file:///mnt/team/itera-store \\
        --registry postgresql://ci@db.internal/itera
    """
    from itera import record as rec
    from itera.errors import UsageError
    from itera.registry import git_commit, registration, validate_name

    validate_name(name)
    tags = parse_tags(tag or [])
    if record_file is not None and path is not None:
        raise UsageError("pass either --record FILE or --path ARTIFACT, not both")
    parent = None
    if path is None:
        parent = rec.read_record_file(record_file) if record_file is not None else rec.read_parent()
    artifact = registration(parent, path)
    commit = git_commit()
    stored: dict = {}

    def put(reg):
        """After the cheap checks, before the write transaction: copy the bytes into the store."""
        if store is not None:
            from itera.registry.store import put_artifact

            stored["url"] = put_artifact(store, artifact)

    def say(v):
        if v.get("duplicate_of"):
            _say(f"{name}@{v['version']} already holds these bytes (sha256 {v['sha256'][:12]}…); nothing added "
                 "(pass --allow-duplicate for a new version)"
                 + (f"; it is archived: `itera registry unarchive {name}@{v['version']}` brings it back"
                    if v.get("archived") else ""))
        else:
            _say(f"registered {name}@{v['version']} ({v['path']}" + (f"; stored in {v['store']})" if v["store"]
                                                                     else ")"))

    _change("register", registry, metrics_out,
            lambda reg: reg.register(name, artifact, parent, tags=tags, commit=commit, allow_duplicate=allow_duplicate,
                                     reason=reason, store=stored.get("url")),
            parent, extra_params=lambda v: {"tags": tags, "git_commit": v["git_commit"], "store": v["store"],
                                            "duplicate_of": v.get("duplicate_of")}, say=say, reason=reason, ahead=put)


@app.command("list")
def list_(
    name: Annotated[Optional[str], typer.Option("--name", "-n", help="Only versions of this model.")] = None,
    tag: Tags = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="Artifact format, e.g. safetensors, gguf.")] = None,
    quantization: Annotated[Optional[str], typer.Option(metavar="TYPE", help="Quantization, e.g. gptq-4bit, "
                                                        "Q4_0.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Archived versions too (hidden by default).")] = False,
    registry: RegistryPath = None,
    json_: JsonFlag = False,
) -> None:
    """List registered versions, optionally filtered by name, tag, format or quantization.

    Archived versions (`itera registry archive`) are left out unless --all is given.

    Examples:

      itera registry list

      itera registry list --name demo --format gguf --tag stage=ci

      itera registry list --name demo --all
    """
    with _open(registry, create=False) as reg:
        versions = reg.list(name, parse_tags(tag or []), fmt, quantization, archived=all_)
        if _for_person(json_):
            from itera.registry.display import list_lines

            _print_lines(list_lines(_finite(versions), str(reg.path), width=_columns()))
        else:
            _print_json({"registry": str(reg.path), "versions": [_summary(v) for v in versions]})


@app.command()
def show(ref: RefArg, registry: RegistryPath = None, json_: JsonFlag = False) -> None:
    """Everything stored about one version, including its lineage and the full record.

    Examples:

      itera registry show demo@active

      itera registry show demo@2 --registry runs/demo/registry.db
    """
    from itera.registry import Ref

    with _open(registry, create=False) as reg:
        v = reg.get(Ref.parse(ref))
        if _for_person(json_):
            from itera.registry.display import show_lines

            _print_lines(show_lines(_finite(v)))
        else:
            _print_json(v)


@app.command()
def compare(refs: Annotated[list[str], typer.Argument(help="Two or more versions, e.g. demo@1 demo@2.")],
            registry: RegistryPath = None, json_: JsonFlag = False) -> None:
    """Metrics of several versions side by side, with deltas against the first.

    Examples:

      itera registry compare demo@1 demo@2

      itera registry compare demo@active demo@latest
    """
    from itera.errors import UsageError
    from itera.registry import Ref

    if len(refs) < 2:
        raise UsageError("compare needs at least two versions, e.g. demo@1 demo@2")
    with _open(registry, create=False) as reg:
        parsed = [Ref.parse(r) for r in refs]
        result = reg.compare(parsed)
        if _for_person(json_):
            from itera.registry.display import compare_lines

            _print_lines(compare_lines(_finite(result), [_finite(reg.get(r)) for r in parsed]))
        else:
            _print_json(result)


@app.command()
def migrate(registry: RegistryPath = None) -> None:
    """Upgrade a registry written by an older itera to this itera's schema, in one transaction.

    No other command migrates a registry as a side effect: each refuses an older one and names this
    command. Afterwards older itera versions cannot open the file. Prints the schema versions before
    and after (the same when there was nothing to do).

    Examples:

      itera registry migrate --registry runs/registry.db
    """
    from itera.registry import Registry
    from itera.registry.storage import MIGRATIONS

    with Registry(registry, create=False, upgrade=True) as reg:
        before, after = reg.storage.schema_found, len(MIGRATIONS)
        _say(f"registry {reg.path}: schema {before} -> {after}" if before != after
             else f"registry {reg.path} is already at schema {after}; nothing to do")
        _print_json({"registry": str(reg.path), "schema_before": before, "schema_after": after})


@app.command()
def history(name: Annotated[str, typer.Argument(help="Model name.")], registry: RegistryPath = None,
            json_: JsonFlag = False) -> None:
    """The audit log of NAME: registrations, alias and tag changes, archiving, refused promotions and
    rollbacks, each with who made it and the reason given.

    Examples:

      itera registry history demo
    """
    with _open(registry, create=False) as reg:
        events = reg.history(name)
        if _for_person(json_):
            from itera.registry.display import HISTORY_WIDTH, history_lines

            _print_lines(history_lines(_finite(events), name, min(HISTORY_WIDTH, max(_columns(), 60))))
        else:
            _print_json({"name": name, "events": events})


@app.command()
def activate(ref: RefArg, reason: Reason = None, registry: RegistryPath = None,
             metrics_out: MetricsOut = None) -> None:
    """Point NAME@active at a version.

    Refused (exit 2, aliases unchanged) when the version is archived or its artifact is gone or
    changed since it was registered.

    Examples:

      itera registry activate demo@2

      itera registry activate demo@staging --reason "canary looked fine"
    """
    from itera.registry import Ref

    r = Ref.parse(ref)
    _change("activate", registry, metrics_out, lambda reg: reg.activate(r, reason=reason), reason=reason,
            ahead=lambda reg: reg.check_ahead(r.name, reg.resolve_version(r)))


@app.command("mark-good")
def mark_good(ref: RefArg, reason: Reason = None, registry: RegistryPath = None,
              metrics_out: MetricsOut = None) -> None:
    """Point NAME@last-good at a version: the one rollback returns to.

    Refused (exit 2) like activate when the version is archived or its artifact is gone or changed.

    Examples:

      itera registry mark-good demo@active
    """
    from itera.registry import Ref

    r = Ref.parse(ref)
    _change("mark-good", registry, metrics_out, lambda reg: reg.mark_good(r, reason=reason), reason=reason,
            ahead=lambda reg: reg.check_ahead(r.name, reg.resolve_version(r)))


@app.command("alias")
def alias_(
    ref: RefArg,
    alias: Annotated[str, typer.Argument(help="The alias: letters, digits, '.', '_', '-' (not active, last-good "
                                              "or latest).")],
    reason: Reason = None,
    registry: RegistryPath = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Point a custom alias (staging, canary) of NAME at a version; NAME@ALIAS then works wherever a
    version is taken (show, resolve, compare, serve --model).

    active and last-good are the registry's own: activate, promote and rollback move active,
    mark-good moves last-good. Refused (exit 2) like activate when the version is archived or its
    artifact is gone or changed.

    Examples:

      itera registry alias demo@3 staging

      itera registry alias demo@latest canary --reason "nightly build"
    """
    from itera.registry import Ref, validate_alias

    r = Ref.parse(ref)
    validate_alias(alias)
    _change("alias", registry, metrics_out, lambda reg: reg.set_alias(r, alias, reason=reason),
            extra_params=lambda v: {"alias": alias}, say=lambda v: _say(f"{r.name}@{alias} -> version {v['version']}"),
            reason=reason, create=False, ahead=lambda reg: reg.check_ahead(r.name, reg.resolve_version(r)))


@app.command()
def unalias(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="The custom alias to remove.")],
    reason: Reason = None,
    registry: RegistryPath = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Remove a custom alias of NAME (the version it pointed at stays).

    Examples:

      itera registry unalias demo staging
    """
    from itera.registry import validate_alias, validate_name

    validate_name(name)
    validate_alias(alias)
    _change("unalias", registry, metrics_out, lambda reg: reg.remove_alias(name, alias, reason=reason),
            extra_params=lambda v: {"alias": alias},
            say=lambda v: _say(f"removed {name}@{alias} (it pointed at version {v['version']})"),
            reason=reason, create=False)


@app.command()
def tag(
    ref: RefArg,
    tags: Annotated[Optional[list[str]], typer.Argument(metavar="KEY=VALUE", help="Tags to set (a key it "
                                                        "has gets the new value).", show_default=False)] = None,
    remove: Annotated[Optional[list[str]], typer.Option("--remove", metavar="KEY", help="A tag to remove; repeat "
                                                        "for several.")] = None,
    reason: Reason = None,
    registry: RegistryPath = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Set or remove tags of a version, in one logged event.

    Examples:

      itera registry tag demo@3 stage=prod owner=ml-team

      itera registry tag demo@3 --remove owner --reason "team renamed"
    """
    from itera.registry import Ref

    r = Ref.parse(ref)
    new = parse_tags(tags or [], how="KEY=VALUE")
    for key in remove or []:
        if not TAG_RE.match(key):
            raise UsageError(f"invalid tag key {key!r} for --remove: letters, digits, '_', '.', '-'")

    def say(v):
        _say(f"tags of {v['name']}@{v['version']}: "
             + (", ".join(f"{k}={val}" for k, val in v["tags"].items()) or "none"))

    _change("tag", registry, metrics_out, lambda reg: reg.tag(r, new, list(remove or []), reason=reason),
            extra_params=lambda v: {"tags": v["tags"]}, say=say, reason=reason, create=False)


@app.command()
def archive(ref: RefArg, reason: Reason = None, registry: RegistryPath = None,
            metrics_out: MetricsOut = None) -> None:
    """Hide a version from `list` (--all shows it) and keep it from being activated or promoted
    until `unarchive`; --reason is required. Nothing is deleted: the artifact stays on disk and
    the version in the registry.

    Refused (exit 2) for a version an alias points at: activate another version first (for
    active), mark another good (last-good), or unalias it.

    Examples:

      itera registry archive demo@2 --reason "trained on the leaked split"
    """
    from itera.registry import Ref

    r = Ref.parse(ref)
    if reason is None:
        raise UsageError("say why with --reason TEXT: the history keeps it")
    _change("archive", registry, metrics_out, lambda reg: reg.archive(r, reason),
            extra_params=lambda v: {"archived": v["archived"]},
            say=lambda v: _say(f"archived {v['name']}@{v['version']}; nothing deleted ({v['path']} stays)"),
            reason=reason, create=False)


@app.command()
def unarchive(ref: RefArg, reason: Reason = None, registry: RegistryPath = None,
              metrics_out: MetricsOut = None) -> None:
    """Bring an archived version back into `list`; it may be activated and promoted again.

    Examples:

      itera registry unarchive demo@2 --reason "the split was fine after all"
    """
    from itera.registry import Ref

    r = Ref.parse(ref)
    _change("unarchive", registry, metrics_out, lambda reg: reg.unarchive(r, reason=reason),
            say=lambda v: _say(f"unarchived {v['name']}@{v['version']}"), reason=reason, create=False)


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    to: Annotated[Optional[int], typer.Option("--to", help="Version to roll back to. Default: last-good.")] = None,
    reason: Reason = None,
    registry: RegistryPath = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Point NAME@active back at last-good (or --to V) after checking its artifact's sha256.

    Refused (exit 3, aliases unchanged, an event logged) when the version does not exist, there
    is no last-good, the version is archived, or the artifact's bytes changed or are gone.

    Examples:

      itera registry rollback demo

      itera registry rollback demo --to 1 --reason "p95 latency doubled"
    """
    from itera.registry import validate_name

    validate_name(name)
    before: dict = {}

    def change(reg):
        before["active"] = reg.alias(name, "active")
        return reg.rollback(name, to, reason=reason)

    def say(v):
        if before.get("active") != v["version"]:
            _say(f"{name}@active -> version {v['version']}")
        else:  # exit 0 and the record all the same: active is where it was asked to be
            also = " and last-good" if "last-good" in v["aliases"] else ""
            _say(f"{name}@{v['version']} is already active{also}; nothing to roll back")

    from itera.registry import policy

    policy.check_rollback_to(to)  # before anything looks the version up
    _change("rollback", registry, metrics_out, change, say=say, reason=reason,
            ahead=lambda reg: reg.check_ahead(name, to if to is not None else reg.alias(name, "last-good")))


@app.command()
def promote(
    ref: RefArg,
    metric: Annotated[list[str], typer.Option(help="A gate: a metric (perplexity, datasets.x.perplexity) no "
                                              "worse than the active version's by more than --max-regression, or "
                                              "preference: what users preferred, on held-out feedback in "
                                              "--feedback-db. Repeat for several gates; all must pass.")],
    max_regression: Annotated[str, typer.Option(metavar="MARGIN", help="Allowed worsening against active: 2% "
                                                "or 0.02.")] = "0%",
    higher_is_better: Annotated[Optional[bool], typer.Option(
        "--higher-is-better/--lower-is-better", help="Direction, for metrics itera does not know.")] = None,
    feedback_db: Annotated[Optional[str], typer.Option(
        "--feedback-db", metavar="PATH|URL", help="With --metric preference: the store `itera serve` keeps "
        "responses and feedback in (SQLite file or PostgreSQL URL).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for scoring with --metric preference "
                                                   "(default: the runtime's).")] = None,
    baseline: Annotated[Optional[str], typer.Option(
        metavar="REF", help="Metric gates compare with this version (NAME@1, NAME@last-good) instead of the "
        "active one, so that regressions within the margin do not add up over promotions.")] = None,
    reason: Reason = None,
    registry: RegistryPath = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Activate a version only if it passes every gate against the active version.

    A metric gate passes when METRIC is no worse than the active version's by more than the
    margin. The preference gate scores feedback the candidate did not train on (its dpo-train
    run's held-out share, and feedback that came later) with both versions: reward accuracy on
    held-out pairs and the desirable-minus-undesirable margin on responses judged alone, each
    with a 95% interval. It passes when one interval lies above chance and none below; it refuses,
    saying how much more feedback is needed, when there is too little to decide.

    Exit 3 with the reason when a gate fails: the CI step that keeps a worse model from going live.
    Exit 2, like activate, when the version is archived or its artifact is gone or changed.

    Examples:

      itera registry promote demo@latest --metric perplexity --max-regression 2%

      itera registry promote demo@3 --metric datasets.pydocs@test.perplexity

      itera registry promote demo@latest --metric preference \\
        --feedback-db feedback.db --metric perplexity --max-regression 5%

      # never more than 5% worse than version 1, however many promotions on
      itera registry promote demo@latest --metric perplexity \\
        --max-regression 5% --baseline demo@1
    """
    from itera.registry import Ref

    margin = parse_margin(max_regression)
    direction = None if higher_is_better is None else ("higher" if higher_is_better else "lower")
    r = Ref.parse(ref)
    if "preference" in metric and feedback_db is None:
        raise UsageError("--metric preference judges feedback the users gave: pass --feedback-db (the store "
                         "`itera serve --feedback-db` wrote)")
    if feedback_db is not None and "preference" not in metric:
        raise UsageError("--feedback-db is read by the preference gate only: add --metric preference")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1 (got {threads})")
    if baseline is not None and all(m == "preference" for m in metric):
        raise UsageError("--baseline is read by metric gates only (the preference gate compares with the active "
                         "version): add --metric perplexity or another metric")
    base = Ref.parse(baseline) if baseline is not None else None
    measured: dict = {}

    def ahead(reg):
        v = reg.resolve_version(r)
        reg.check_ahead(r.name, v)
        active = reg.alias(r.name, "active")
        if "preference" in metric and active is not None:  # scored before the write lock is taken
            from itera.registry.preference import measure

            cand, act = reg.get(Ref(r.name, str(v))), reg.get(Ref(r.name, str(active)))
            reg.check_ahead(r.name, active)
            measured["preference"] = measure(cand, reg.local_path(cand), act, reg.local_path(act), feedback_db,
                                             threads=threads, progress=_say)

    def say(v):
        g = v["gate"]
        gates = [g, *g.get("also", [])]
        _say(f"promoted {v['name']}@{v['version']}: " + "; ".join(
            x["summary"] if x.get("metric") == "preference" else
            f"{x['metric']} {x['candidate']:.6g}" + next(
                (f" vs {x[k]:.6g} ({k} v{x[k + '_version']})" for k in ("baseline", "active") if k in x),
                f" ({x.get('reason')})")
            for x in gates))

    _change("promote", registry, metrics_out,
            lambda reg: reg.promote(r, metric, margin, direction, reason=reason,
                                    preference=measured.get("preference"), baseline=base),
            extra_params=lambda v: {"gate": v["gate"]}, say=say, reason=reason, ahead=ahead)


@app.command()
def resolve(ref: RefArg, registry: RegistryPath = None) -> None:
    """Print the artifact path of a version, for shell use (exit 2 when the artifact is gone).

    A version registered with --store is fetched into the local cache ($ITERA_HOME/cache/artifacts)
    first, unless the cache holds it, its bytes checked against the registered sha256; the path
    printed is the cached copy.

    Examples:

      itera evaluate --model "$(itera registry resolve stories@active)" -d notes.txt
    """
    from itera.errors import InputError
    from itera.registry import Ref

    with _open(registry, create=False) as reg:
        v = reg.get(Ref.parse(ref))
        path = reg.local_path(v)  # a stored version: fetched into the local cache, every byte checked
    if not path.exists():
        raise InputError(f"{v['name']}@{v['version']}'s artifact {v['path']} no longer exists; register it again "
                         "or roll back to another version")
    print(path)


@app.command()
def pull(
    ref: RefArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the artifact: a file path for a file, "
                                      "a directory path for a checkpoint.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    registry: RegistryPath = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Copy a version's artifact to --out, its bytes checked against the registered sha256.

    A version registered with --store is fetched from the store into the local cache
    ($ITERA_HOME/cache/artifacts) unless the cache already holds it, then copied; one registered
    without a store is copied from its registered path, on this machine. An ONNX graph's
    companion files (its KV-cache graph, external data) go beside --out, whose file name must
    then be the registered one: the graph names them. Prints a `registry pull` record whose
    artifact is the copy.

    Examples:

      itera registry pull demo@active --out deploy/model.gguf

      itera registry pull demo@3 --out /tmp/demo-3 \\
        --registry postgresql://ci@db.internal/itera
    """
    import shutil

    from itera import record
    from itera.artifacts import companions, describe, digest
    from itera.errors import InputError, UsageError
    from itera.fsio import atomic_dir, atomic_file, check_output, check_writable_file
    from itera.registry import Ref, integrity_problem

    if metrics_out is not None:
        check_writable_file(metrics_out)
    r = Ref.parse(ref)
    with _open(registry, create=False) as reg:
        v = reg.get(r)
        label = f"{v['name']}@{v['version']}"
        check_output(out, [] if v["store"] else [Path(v["path"])], force=force,
                     kind="file" if v["kind"] == "file" else "dir")
        local = reg.local_path(v)  # fetched from the store (each blob checked), or the registered path
        problem = integrity_problem(label, {**v, "path": str(local)})
        if problem is not None:
            raise InputError(f"{problem}; pull another version")
        shown = str(reg.path)
    extra = companions(local)
    if extra and out.name != local.name:
        raise UsageError(f"{label} is {local.name} with {len(extra)} companion file(s) that its graph names; pass "
                         f"--out DIR/{local.name} (or a directory of its own)")
    for c in extra:
        check_output(out.parent / c.name, [local], force=force, kind="file")
    if local.is_dir():
        with atomic_dir(out) as tmp:
            shutil.copytree(local, tmp, dirs_exist_ok=True)
            _check_copy(tmp, [], v)
    else:
        for c in extra:
            with atomic_file(out.parent / c.name) as tmp:
                shutil.copyfile(c, tmp)
        with atomic_file(out) as tmp:
            shutil.copyfile(local, tmp)
            if not extra:
                _check_copy(tmp, [], v)
    if extra and digest(out)[1] != v["sha256"]:  # the graph and its companions, under their own names
        for p in (out, *(out.parent / c.name for c in extra)):
            p.unlink(missing_ok=True)
        raise InputError(f"the copy of {label} at {out} changed while it was written; pull it again")
    rec = record.Run("registry pull").record(
        describe(out), {}, {"name": v["name"], "version": v["version"], "registry": shown, "aliases": v["aliases"],
                            "store": v["store"], "source": str(local)})
    _say(f"pulled {label} to {out}" + (f" from {v['store']}" if v["store"] else f" (from {local})"))
    record.emit(rec, metrics_out=metrics_out)


def _check_copy(tmp: Path, extra: list[Path], v: dict) -> None:
    """Refuse a copy whose bytes are not the version's (before it is renamed into place)."""
    from itera.errors import InputError
    from itera.fsio import artifact_digest

    if artifact_digest(tmp, extra)[1] != v["sha256"]:
        raise InputError(f"the copy of {v['name']}@{v['version']} changed while it was written; pull it again")


@app.command()
def copy(
    from_: Annotated[str, typer.Option("--from", metavar="PATH|URL", help="The registry to copy from: a SQLite "
                                       "file (or sqlite:///PATH), or postgresql://USER@HOST:PORT/DB.")],
    to: Annotated[str, typer.Option("--to", metavar="PATH|URL", help="The registry to copy into, e.g. the team's "
                                    "postgresql://USER@HOST:PORT/DB; created where needed.")],
) -> None:
    """Copy a registry's versions, tags, aliases, archiving and history into another, in one transaction.

    Moves a local history into the team's database: version numbers, who changed what and when
    are kept, and each model gets a `copy` event naming the source. Refused, with nothing written,
    when the target already has a model of the same name. Artifacts are not copied: versions
    registered with --store stay reachable from anywhere; the others name this machine's paths.
    Prints what was copied as one JSON object.

    Examples:

      itera registry copy --from sqlite:///home/me/.itera/registry.db \\
        --to postgresql://ci@db.internal/itera
    """
    from itera.errors import UsageError
    from itera.registry import Registry, open_storage, sqlite_path

    src_local, dst_local = sqlite_path(from_), sqlite_path(to)
    if (src_local is not None and dst_local is not None and src_local.resolve() == dst_local.resolve()) or from_ == to:
        raise UsageError("--from and --to are the same registry; pass another --to")
    with Registry(storage=open_storage(from_, create=False)) as src:
        with Registry(storage=open_storage(to, create=True)) as dst:
            done = dst.copy_from(src)
            _say(f"copied {done['versions']} version(s) of {len(done['names'])} model(s) and {done['events']} "
                 f"event(s) from {src.path} to {dst.path}")
            _print_json({"from": str(src.path), "to": str(dst.path), **done})
