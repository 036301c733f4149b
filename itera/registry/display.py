"""What ``itera registry list/show/compare/history`` show a person at a terminal: compact tables of
the figures people compare models on, in human units. Pure functions from the rows and JSON
objects the commands print (which stay the same for pipes, files and ``--json``) to lines of text.

The curated figures: the artifact's size (KiB/MiB), bits per weight, perplexity per dataset,
decode tokens/s per step and over wall time, and the export's verification (pass, KL to the
source). Everything else (loads, tolerances, timestamps, per-run spreads) stays in the JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from itera.record import ancestors

STEP_TPS, WALL_TPS = "decode_tokens_per_s", "decode_tokens_per_s_wall"
HISTORY_WIDTH = 100  # the history table's lines, at most


# --------------------------------------------------------------------------- units


def size(n: Any) -> str:
    """17527424 -> '16.7 MiB'; 1536 -> '1.5 KiB'; 900 -> '900 B'."""
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "–"  # pragma: no cover - the loop always returns


def number(v: Any) -> str:
    """A figure with about four significant digits and no exponent unless it is tiny:
    2029.4 -> '2,029'; 113.354 -> '113.4'; 4.5123 -> '4.512'; 0.00012 -> '1.2e-04'."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "–"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 10:
        return f"{v:.2f}"
    if a >= 0.01 or a == 0:
        return f"{v:.3f}"
    return f"{v:.1e}"


def change(base: Any, value: Any) -> str:
    """How ``value`` differs from ``base``: '+13.1%', '-70.6%', or '×203' once it is over twice as
    large (a percentage of thousands reads badly); '' when there is nothing to compare."""
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (base, value)):
        return ""
    if base == 0:
        return "" if value else "="
    if value == base:
        return "="
    if base > 0 and value / base >= 2:
        return f"×{value / base:.3g}"
    return f"{(value - base) / abs(base):+.1%}"


def short_dataset(spec: str) -> str:
    """A dataset as a column header: 'pydocs@test' stays; '/home/a/notes.txt' -> 'notes.txt';
    'hf:org/TinyStories@validation' -> 'TinyStories@validation'."""
    return spec.rstrip("/").rsplit("/", 1)[-1] or spec


def short_path(path: str, cwd: Path | None = None) -> str:
    """A path relative to the working directory when it is below it, else with ~ for home."""
    cwd = cwd or Path.cwd()
    p = Path(path)
    try:
        return str(p.relative_to(cwd))
    except ValueError:
        pass
    try:
        return "~/" + str(p.relative_to(Path.home()))
    except (ValueError, RuntimeError):
        return str(path)


def _ppl_dataset(key: str) -> str | None:
    """'datasets.pydocs@test.perplexity' -> 'pydocs@test' (dataset names may hold dots)."""
    head, tail = "datasets.", ".perplexity"
    if key.startswith(head) and key.endswith(tail) and len(key) > len(head) + len(tail):
        return key[len(head):-len(tail)]
    return None


def metric_label(key: str) -> str:
    """A metric key as a person reads it: 'datasets.pydocs@test.perplexity' -> 'ppl pydocs@test'."""
    ds = _ppl_dataset(key)
    if ds is not None:
        return f"ppl {short_dataset(ds)}"
    return {"bytes": "size", "bits_per_weight": "bits/weight", STEP_TPS: "decode tok/s", WALL_TPS: "wall tok/s",
            "kl_to_source": "KL to source"}.get(key, key)


# --------------------------------------------------------------------------- what a version says


def verification(v: dict) -> tuple[bool, float | None] | None:
    """(verified, KL to the source) from the export that wrote this version's artifact, or None
    when no export record in its lineage describes these bytes."""
    for node in ancestors(v.get("record"), include_self=True):
        art = node.get("artifact") or {}
        if node.get("command") == "export" and art.get("sha256") == v.get("sha256"):
            m = node.get("metrics") or {}
            if isinstance(m.get("verified"), bool):
                kl = m.get("kl_to_source")
                return m["verified"], kl if isinstance(kl, (int, float)) and not isinstance(kl, bool) else None
    return None


def unstable_benchmark(v: dict) -> str | None:
    """Why the benchmark that measured this version's bytes is ``stable: false`` (its first
    reason), or None when it is stable or there is none."""
    for node in ancestors(v.get("record"), include_self=True):
        art = node.get("artifact") or {}
        if node.get("command") == "benchmark-power" and art.get("sha256") == v.get("sha256"):
            m = node.get("metrics") or {}
            if m.get("stable") is False:
                return str(m.get("stability_reason") or "not stable").split(" | ")[0].split("; ")[0]
            return None
    return None


def verification_text(v: dict) -> str:
    found = verification(v)
    if found is None:
        return "–"
    ok, kl = found
    return ("yes" if ok else "NO") + (f" (KL {number(kl)})" if kl is not None else "")


def format_text(v: dict) -> str:
    """'gguf Q4_0', 'checkpoint gptq-4bit', 'gguf'."""
    return " ".join(str(x) for x in (v.get("format"), v.get("quantization")) if x)


def _datasets(metric_dicts: Iterable[dict]) -> list[str]:
    return sorted({ds for m in metric_dicts for k in m if (ds := _ppl_dataset(k)) is not None})


# --------------------------------------------------------------------------- tables


def printable(text: str) -> str:
    """``text`` with control characters escaped: a path or a reason stays on its line and cannot
    send the terminal escape sequences."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def render(columns: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> list[str]:
    """Columns aligned with two spaces between them; ``right`` says which are right-aligned."""
    right = right or [False] * len(columns)
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return [line(columns), *(line(r) for r in rows)]


def _drop_empty(columns: list[str], rows: list[list[str]], right: list[bool], keep: int):
    """Leave out the columns (after the first ``keep``) that no row fills."""
    idx = [i for i in range(len(columns)) if i < keep or any(r[i] not in ("", "–") for r in rows)]
    return [columns[i] for i in idx], [[r[i] for i in idx] for r in rows], [right[i] for i in idx]


def list_lines(versions: list[dict], registry: str, cwd: Path | None = None, width: int | None = None) -> list[str]:
    """``registry list`` on a terminal: one line per version with the curated figures. Wider than
    ``width``, the creation date goes, then the path (``registry show`` has both)."""
    if not versions:
        return [f"no versions in {registry} (add one with `itera registry register`)"]
    datasets = _datasets(v["metrics"] for v in versions)
    columns = ["version", "aliases", "format", "size", "bits/w", *[f"ppl {short_dataset(d)}" for d in datasets],
               "tok/s", "wall tok/s", "verified", "created", "path"]
    right = [False, False, False, True, True, *[True] * len(datasets), True, True, False, False, False]
    rows = []
    for v in versions:
        m = v["metrics"]
        found = verification(v)
        verified = "–" if found is None else ("yes" if found[0] else "NO") + (
            f", KL {found[1]:.2g}" if found[1] is not None else "")
        rows.append([f"{v['name']}@{v['version']}",
                     ",".join(v["aliases"]) or ("(archived)" if v.get("archived") else "–"), format_text(v) or "–",
                     size(v["bytes"]), number(m.get("bits_per_weight")),
                     *[number(m.get(f"datasets.{d}.perplexity")) for d in datasets],
                     number(m.get(STEP_TPS)), number(m.get(WALL_TPS)), verified,
                     str(v["created_at"])[:10], short_path(v["path"], cwd)])
    columns, rows, right = _drop_empty(columns, rows, right, keep=4)
    lines = render(columns, rows, right)
    for optional in ("created", "path"):
        if width is None or max(map(len, lines)) <= width:
            break
        i = columns.index(optional)
        columns, right = columns[:i] + columns[i + 1:], right[:i] + right[i + 1:]
        rows = [r[:i] + r[i + 1:] for r in rows]
        lines = render(columns, rows, right)
    return lines


CURATED = ("bytes", "bits_per_weight", "<perplexities>", STEP_TPS, WALL_TPS)


def compare_lines(result: dict, versions: list[dict]) -> list[str]:
    """``registry compare`` on a terminal: the curated figures of each version, with the change
    against the first; environment figures (loads, tolerances, timestamps) are left to --json."""
    labels = result["versions"]
    table = result["metrics"]
    keys: list[str] = []
    for k in CURATED:
        if k == "<perplexities>":
            keys += [f"datasets.{d}.perplexity" for d in _datasets([table])]
        elif k in table:
            keys.append(k)
    rows = []
    unstable = [(label, why) for label, v in zip(labels, versions) if (why := unstable_benchmark(v))]
    for k in keys:
        entries = [table[k][label] for label in labels]
        base = entries[0]["value"]
        cells = [size(base) if k == "bytes" else number(base)]
        for e in entries[1:]:
            text = size(e["value"]) if k == "bytes" else number(e["value"])
            # a speed-up between benchmarks that were not stable would be noise: no ratio, and a note says why
            delta = None if unstable and k in (STEP_TPS, WALL_TPS) else change(base, e["value"])
            cells.append(f"{text} ({delta})" if delta and text != "–" else text)
        rows.append([metric_label(k), *cells])
    if any(verification(v) is not None for v in versions):
        found = [verification(v) for v in versions]
        rows.append(["verified", *[("–" if f is None else "yes" if f[0] else "NO") for f in found]])
        rows.append(["KL to source", *[number(f[1]) if f is not None else "–" for f in found]])
    lines = render(["metric", *labels], rows, [False, *[True] * len(labels)])
    if unstable and any(k in (STEP_TPS, WALL_TPS) for k in keys):
        lines += [f"no tok/s change shown: {label}'s benchmark was not stable ({why})" for label, why in unstable]
    shown = set(keys) | {"kl_to_source"}
    more = len([k for k in table if k not in shown])
    if more:
        lines.append(f"({more} more metric{'' if more == 1 else 's'} with --json)")
    return lines


def _pct(x: float) -> str:
    """0.02 -> '2%'; 0.131 -> '13.1%'."""
    text = f"{x:.1%}"
    return text.replace(".0%", "%")


def _gate_text(d: dict) -> str:
    """A promotion gate's verdict: 'ppl pydocs@test 128.2 vs 113.4 (13.1% worse, max 2%)'."""
    metric = metric_label(str(d.get("metric", "?")))
    cand = d.get("candidate")
    role = "baseline" if "baseline" in d else "active"
    other = d.get(role)
    if other is None:
        return f"{metric} {number(cand)}" + (f"; {d['reason']}" if d.get("reason") else "")
    reg, allowed = d.get("regression"), d.get("max_regression")
    if isinstance(reg, (int, float)) and math.isfinite(reg) and reg != 0:
        verdict = f"{_pct(abs(reg))} {'worse' if reg > 0 else 'better'}"
    else:
        verdict = "worse without bound" if isinstance(reg, float) and math.isinf(reg) else "no worse"
    margin = f", max {_pct(allowed)}" if isinstance(allowed, (int, float)) else ""
    against = f" of baseline v{d.get('baseline_version')}" if role == "baseline" else ""
    return f"{metric} {number(cand)} vs {number(other)}{against} ({verdict}{margin})"


def event_summary(e: dict) -> str:
    """One short phrase for an audit event (the full detail is in the JSON): the gate's verdict,
    the alias that moved, the refusal's reason, the file registered."""
    d = e.get("detail") if isinstance(e.get("detail"), dict) else {}
    ev, v = e.get("event"), e.get("version")
    if ev == "register":
        sha = str(d.get("sha256") or "")[:12]
        return f"{Path(str(d.get('path', '?'))).name}" + (f", sha256 {sha}…" if sha else "")
    if ev in ("promote", "promote-refused") and (d.get("metric") == "preference" or
                                                 "candidate" in d and ("active" in d or ev == "promote")):
        return "; ".join(str(x.get("summary", "")) if x.get("metric") == "preference" else _gate_text(x)
                         for x in (d, *d.get("also", [])))
    if ev in ("promote-refused", "rollback-refused"):
        return str(d.get("reason", ""))
    if ev == "unalias":
        return f"{d.get('alias')} @{v} removed"
    if ev == "tag":
        sets = [f"{k}={val}" for k, val in (d.get("set") or {}).items()]
        return ", ".join(sets + [f"-{k}" for k in d.get("removed") or []])
    if ev in ("archive", "unarchive"):
        return ""
    if "alias" in d:
        prev = d.get("previous")
        if prev == v:
            return f"{d['alias']} stays @{v}"
        return f"{d['alias']} {'@' + str(prev) if prev is not None else 'unset'} -> @{v}"
    return json.dumps(d, default=str) if d else ""


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


ACTOR_WIDTH = 12  # the history table's "by" column, at most


def event_what(e: dict) -> str:
    """An event's summary and the reason given for it: 'staging unset -> @2; reason: canary'."""
    what, why = event_summary(e), e.get("reason")
    if not why:
        return what
    return f"{what}; reason: {why}" if what else f"reason: {why}"


def history_lines(events: list[dict], name: str, width: int = HISTORY_WIDTH) -> list[str]:
    """``registry history`` on a terminal: one line per event, at most ``width`` characters: when
    (to the minute; the JSON has the rest), what happened, to which version, who did it (a column
    only when some event says; events logged before itera recorded it do not) and what it did,
    with the reason given. The "what" is clipped last: a long actor is cut first."""
    if not events:
        return [f"no events for {name}"]
    by = any(e.get("actor") for e in events)
    rows = [[str(e.get("at", ""))[:16].replace("T", " "), str(e.get("event", "")),
             "" if e.get("version") is None else f"@{e['version']}",
             *([_clip(printable(str(e.get("actor") or "–")), ACTOR_WIDTH)] if by else []),
             printable(event_what(e))] for e in events]
    head = ["at", "event", "ver", *(["by"] if by else []), "what"]
    n = len(head) - 1
    fixed = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(head[:n])]
    if by:  # the actors give way (to 6 characters) before the summaries do
        want = max(len(r[n]) for r in rows)
        fixed[3] = max(min(fixed[3], fixed[3] - (sum(fixed) + 2 * n + want - width)), min(fixed[3], 6))
        rows = [[*r[:3], _clip(r[3], fixed[3]), *r[4:]] for r in rows]
    room = max(width - sum(fixed) - 2 * n, 10)
    rows = [[*r[:n], _clip(r[n], room)] for r in rows]
    return render(head, rows)


def show_lines(v: dict, cwd: Path | None = None) -> list[str]:
    """``registry show`` on a terminal: the version's identity and curated figures, one per line."""
    m = v.get("metrics") or {}
    aliases = ", ".join(v.get("aliases") or [])
    out = [("version", f"{v['name']}@{v['version']}" + (f" ({aliases})" if aliases else "")),
           ("path", short_path(v["path"], cwd)),
           ("artifact", ", ".join(x for x in (format_text(v), size(v.get("bytes")),
                                              f"{number(m['bits_per_weight'])} bits/weight"
                                              if "bits_per_weight" in m else "") if x)),
           ("stored", f"in {v['store']} (any machine that mounts it can pull it)" if v.get("store")
            else "local path only (registered without --store)"),
           ("sha256", str(v.get("sha256"))),
           ("created", str(v.get("created_at"))[:19].replace("T", " ")
            + (f" (git {str(v['git_commit'])[:12]})" if v.get("git_commit") else ""))]
    if v.get("tags"):
        out.append(("tags", ", ".join(f"{k}={val}" for k, val in v["tags"].items())))
    if v.get("archived"):
        a = v["archived"]
        out.append(("archived", str(a.get("at"))[:19].replace("T", " ")
                    + (f" by {a['by']}" if a.get("by") else "") + (f": {a['reason']}" if a.get("reason") else "")))
    if verification(v) is not None:
        out.append(("verified", verification_text(v)))
    for d in _datasets([m]):
        out.append((f"ppl {short_dataset(d)}", number(m[f"datasets.{d}.perplexity"])))
    if STEP_TPS in m or WALL_TPS in m:
        out.append(("decode tok/s", f"{number(m.get(STEP_TPS))} per step, {number(m.get(WALL_TPS))} over wall time"))
    chain = [str(n.get("command")) for n in (v.get("lineage") or [])]
    if chain:
        out.append(("lineage", " <- ".join(chain)))
    shown = {"bits_per_weight", STEP_TPS, WALL_TPS} | {f"datasets.{d}.perplexity" for d in _datasets([m])}
    more = len([k for k in m if k not in shown])
    if more:
        out.append(("", f"({more} more metric{'' if more == 1 else 's'} and the full record with --json)"))
    w = max(len(printable(k)) for k, _ in out)
    return [f"{printable(k).ljust(w)}  {printable(val)}".rstrip() for k, val in out]
