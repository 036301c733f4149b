"""``itera report``: tables and charts from records, following their lineage.

Every number in the report is copied from a record: a row per artifact with its size, bits
per weight (the quantize step's, or for a GGUF file the file's own over all its weights),
perplexity and bits per byte per dataset (evaluate), decode tokens/s at the median step and over
wall time with the spread and stability, J/token with the energy method (benchmark-power, one
artifact or several compared in one run), and export parity (max |logit diff|, top-1 agreement).
No speed-up ratio is computed: where a benchmark was not stable, a note under the table says why.

Rows are labelled by their registry reference when one was registered, else by the shortest
path suffix that tells them apart (two ``model.gguf`` files in different directories differ).
Columns are named by the dataset as typed (a file by its name, not its absolute path), with
the protocol in a note under the table. Perplexities measured with different windows, strides
or BOS are never put in one column: each protocol gets its own, numbered. The same protocol on
the same text is one column even when two tokenizers cut it into different numbers of tokens;
such a cell is marked ``†`` and the note gives each count.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from itera.errors import InputError, UsageError
from itera.options import argument, flag, internal
from itera.progress import SILENT, Reporter
from itera.record import Outcome, ancestors

MARK = "†"  # a cell whose perplexity scored another number of tokens than the column's others


def plural(n: int, word: str, many: str | None = None) -> str:
    """1 artifact, 2 artifacts."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


@dataclass
class Row:
    path: str
    format: str
    bytes: int | None = None
    bits_per_weight: float | None = None
    perplexity: dict = field(default_factory=dict)  # (dataset, protocol) -> value
    bits_per_byte: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)  # (dataset, protocol) -> tokens scored
    decode_tokens_per_s: float | None = None
    decode_iqr: float | None = None
    decode_tokens_per_s_wall: float | None = None
    decode_wall_iqr: float | None = None
    stable: bool | None = None
    stability_reason: str | None = None
    runtime: str | None = None
    j_per_token: float | None = None
    energy_method: str | None = None
    max_abs_logit_diff: float | None = None
    top1_agreement: float | None = None
    made_by: str | None = None
    ref: str | None = None  # name@version when registered
    label: str = ""


def chain(record: dict) -> list[dict]:
    """The record and its ancestors, nearest first."""
    return list(ancestors(record, include_self=True))


def _protocol(node: dict) -> tuple:
    """What makes two perplexities comparable: windowing and BOS (not the runtime; the tokens
    scored are kept beside the figure and noted where they differ)."""
    p = node.get("params") or {}
    return (p.get("window"), p.get("stride"), p.get("bos"))


def _bench(row: Row, m: dict) -> None:
    row.decode_tokens_per_s, row.runtime = m.get("decode_tokens_per_s"), m.get("runtime")
    row.decode_iqr, row.stable = m.get("decode_tokens_per_s_iqr"), m.get("stable")
    row.decode_tokens_per_s_wall, row.decode_wall_iqr = m.get("decode_tokens_per_s_wall"), \
        m.get("decode_tokens_per_s_wall_iqr")
    row.stability_reason = m.get("stability_reason")
    row.j_per_token, row.energy_method = m.get("j_per_token"), m.get("energy_method")


def collect(records: list[dict]) -> list[Row]:
    """One row per artifact seen anywhere in the records' lineage, in order of first appearance
    from the oldest record (a report's own record adds no row; its lineage does)."""
    rows: dict[str, Row] = {}
    by_path: dict[str, Row] = {}
    seen: set[int] = set()
    nodes = []
    for rec in records:
        for node in reversed(chain(rec)):
            if id(node) not in seen:
                seen.add(id(node))
                nodes.append(node)
    compared: list[tuple[str, dict]] = []
    bpw_by_sha: dict[str, float] = {}  # a quantize record's bits per weight describes what is exported from it
    for node in nodes:
        art = node.get("artifact") or {}
        key = art.get("sha256") or art.get("path")
        if not key or node.get("command") == "report":
            continue
        row = rows.setdefault(key, Row(path=art["path"], format=art.get("format", "?"), bytes=art.get("bytes")))
        by_path[os.path.abspath(art["path"])] = row
        m, cmd, params = node.get("metrics") or {}, node.get("command"), node.get("params") or {}
        parent_art = next(ancestors(node), {}).get("artifact") or {}
        if cmd == "quantize":
            row.bits_per_weight = m.get("bits_per_weight")
            bpw_by_sha[art.get("sha256")] = row.bits_per_weight
            row.made_by = f"quantize {params.get('method')}"
        elif cmd == "export":
            row.max_abs_logit_diff, row.top1_agreement = m.get("max_abs_logit_diff"), m.get("top1_agreement")
            row.bits_per_weight = m.get("bits_per_weight") or row.bits_per_weight or \
                bpw_by_sha.get(parent_art.get("sha256"))
            row.made_by = f"export {params.get('format')}" + (
                f" {params.get('gguf_type')}" if params.get("format") == "gguf" else "")
        elif cmd == "distill":
            row.made_by = "distill"
        elif cmd == "evaluate":
            for ds, v in (m.get("datasets") or {}).items():
                k = (ds, _protocol(node))
                row.perplexity[k], row.bits_per_byte[k] = v.get("perplexity"), v.get("bits_per_byte")
                row.tokens[k] = v.get("tokens")
        elif cmd == "benchmark-power":
            if "compare" in m:  # several artifacts measured in one run: each figure to its own artifact,
                # matched once every record's artifacts are known (a compared file may be described later)
                compared.extend(m["compare"].items())
            else:
                _bench(row, m)
        elif cmd == "registry register":
            row.ref = f"{params.get('name')}@{params.get('version')}"
    for key, figures in compared:  # keyed by name and content (a.gguf#9e1c04d2), or by path in older records
        path = figures.get("path") or key
        target = rows.get(figures.get("sha256") or "") or by_path.get(os.path.abspath(path)) or \
            _by_suffix(path, list(rows.values()))
        if target is None:
            target = rows.setdefault(path, Row(path=path, format=Path(path).suffix[1:] or "?"))
            by_path[os.path.abspath(path)] = target
        _bench(target, figures)
    _label(list(rows.values()))
    return list(rows.values())


def _by_suffix(path: str, rows: list[Row]) -> Row | None:
    """The one row whose path ends with ``path``, a relative path as `benchmark-power --compare`
    was given it (the report may run from another directory than the benchmark did)."""
    if os.path.isabs(path):
        return None
    tail = Path(os.path.normpath(path)).parts
    hits = [r for r in rows if os.path.isabs(r.path) and Path(r.path).parts[-len(tail):] == tail]
    return hits[0] if len(hits) == 1 else None


def _suffixes(paths: list[str]) -> dict[str, str]:
    """Each path's shortest suffix of components that no other path in ``paths`` ends with."""
    out = {}
    for path in paths:
        parts = Path(path).parts
        for n in range(1, len(parts) + 1):
            suffix = "/".join(parts[-n:])
            if sum(1 for o in paths if "/".join(Path(o).parts[-n:]) == suffix) == 1:
                break
        out[path] = suffix
    return out


def _label(rows: list[Row]) -> None:
    """The registry reference, else the shortest path suffix no other row shares."""
    short = _suffixes([r.path for r in rows])
    for r in rows:
        r.label = f"{r.ref} ({short[r.path]})" if r.ref else short[r.path]


def size(n: int | None) -> str:
    """1536 -> 1.5 KiB."""
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt(v, spec: str = ".4g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


@dataclass
class Column:
    """One perplexity (and bits-per-byte) column: a dataset measured with one protocol."""

    key: tuple  # (dataset as recorded, (window, stride, bos))
    name: str  # what the header says: the dataset's short name, numbered when it has several protocols
    note: str  # the dataset in full, its protocol and the tokens scored
    odd: set = field(default_factory=set)  # labels of rows that scored another number of tokens


_CONTENT_KEY = re.compile(r"#[0-9a-f]{8}$")  # itera.data.dataset_key's content hash


def _dataset_names(datasets: list[str]) -> dict[str, str]:
    """A local file by its name: recorded by name and content (``notes.txt#3f2a9c1b``), its name
    alone unless other contents share it (then the key in full); recorded by its absolute path
    (older records), as many trailing components as tell it from another file of that name.
    ``pydocs@test`` and hub names as they are."""
    files = [d for d in datasets if os.path.isabs(d)]
    short = _suffixes(files)
    named = {d: _CONTENT_KEY.sub("", d) for d in datasets if not os.path.isabs(d) and _CONTENT_KEY.search(d)}
    taken = Counter([*named.values(), *short.values()])
    return {d: short.get(d) or (named[d] if d in named and taken[named[d]] == 1 else d) for d in datasets}


def _protocol_text(proto: tuple) -> str:
    w, st, bos = proto
    if w is None and st is None and bos is None:
        return "protocol not recorded"
    return f"window {w}, stride {st}, BOS {'on' if bos else 'off' if bos is not None else '?'}"


def _columns(rows: list[Row]) -> list[Column]:
    """One column per dataset, or per protocol of a dataset measured more than one way
    ("notes.txt (protocol 1)", "(protocol 2)"); the note says what each is."""
    keys = sorted({k for r in rows for k in r.perplexity},  # protocols in numeric order, an unrecorded one last
                  key=lambda k: (k[0], [(v is None, v if isinstance(v, (int, float)) else 0) for v in k[1]]))
    names = _dataset_names(sorted({ds for ds, _ in keys}))
    out = []
    for ds, proto in keys:
        protos = [p for d, p in keys if d == ds]
        name = names[ds] + (f" (protocol {protos.index(proto) + 1})" if len(protos) > 1 else "")
        counts = {r.label: r.tokens.get((ds, proto)) for r in rows if r.perplexity.get((ds, proto)) is not None}
        common = Counter(counts.values()).most_common(1)[0][0] if counts else None
        odd = {lab for lab, n in counts.items() if n != common}
        tokens = "tokens scored not recorded" if common is None else f"{common:,} tokens scored"
        if odd:
            tokens += " (" + ", ".join(f"{MARK} {lab}: {fmt(counts[lab], ',')}" for lab in counts if lab in odd) + \
                "; another tokenizer cuts the same text differently, so compare bits per byte)"
        full = f"{ds}, " if ds != names[ds] else ""
        out.append(Column((ds, proto), name, f"{name}: {full}{_protocol_text(proto)}; {tokens}", odd))
    return out


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    cols = _columns(rows)
    head = ["artifact", "made by", "format", "size", "bits/weight", *[f"ppl {c.name}" for c in cols],
            *[f"bpb {c.name}" for c in cols], "decode tok/s", "wall tok/s", "stable", "runtime", "J/token",
            "energy method", "max abs Δlogit", "top-1 agree"]
    body = []

    def cell(r: Row, c: Column, values: dict, spec: str) -> str:
        v = fmt(values.get(c.key), spec)
        return f"{v} {MARK}" if r.label in c.odd and v != "–" else v

    for r in rows:
        tps = fmt(r.decode_tokens_per_s, ".1f") + (f" ± {r.decode_iqr / 2:.1f}" if r.decode_iqr is not None else "")
        wall = fmt(r.decode_tokens_per_s_wall, ".1f") + (
            f" ± {r.decode_wall_iqr / 2:.1f}" if r.decode_wall_iqr is not None and r.decode_tokens_per_s_wall else "")
        body.append([r.label, r.made_by or "", r.format, size(r.bytes), fmt(r.bits_per_weight, ".3f"),
                     *[cell(r, c, r.perplexity, ".3f") for c in cols],
                     *[cell(r, c, r.bits_per_byte, ".4f") for c in cols],
                     tps, wall, {True: "yes", False: "no"}.get(r.stable, "–"), r.runtime or "–",
                     fmt(r.j_per_token, ".4g"), r.energy_method or "–", fmt(r.max_abs_logit_diff, ".3g"),
                     fmt(r.top1_agreement, ".3f")])
    return head, body


def notes(rows: list[Row]) -> list[str]:
    """What the table's columns mean where the header cannot say it: each dataset column's
    protocol, the two decode rates, and why a benchmark was not stable."""
    out = [f"ppl/bpb {c.note}." for c in _columns(rows)]
    if any(r.decode_tokens_per_s for r in rows):
        out.append("decode tok/s: the rate at each run's median step (median over runs, ± half the IQR); wall "
                   "tok/s: decode tokens over decode time, what someone waiting for a whole answer sees.")
    for r in rows:
        if r.stable is False:
            reasons = (r.stability_reason or "no reason recorded").split("; ")
            more = f"; and {plural(len(reasons) - 2, 'more reason')} in the record" if len(reasons) > 2 else ""
            out.append(f"{r.label}: benchmark not stable, so no speed-up against another artifact is claimed "
                       f"({'; '.join(reasons[:2])}{more}).")
    return out


_MD_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")
_MD_SPECIAL = re.compile(r"([`*\[\]|])")


def _md_cell(text: str) -> str:
    """A table cell that stays one cell and stays text: line breaks and other control characters
    become a space (a newline would end the table and start a heading); pipes, backticks,
    asterisks and brackets are backslash-escaped (no cell splits, code, emphasis, links or images;
    underscores only emphasise whole words, so ``Q4_0`` and file names stay as they are); angle
    brackets become entities."""
    return _MD_SPECIAL.sub(r"\\\1", escape(_MD_CONTROL.sub(" ", str(text)), quote=False))


# --------------------------------------------------------------------------- charts

FIGSIZE, DPI, NOTE_PT = (7, 4.5), 100, 7


@dataclass
class Chart:
    name: str  # frontier, throughput, energy
    fig: object  # the matplotlib Figure
    note: str = ""  # what the chart leaves out and why (also printed under it in the figure)


def _short_list(labels: list[str], limit: int = 6) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")


def _note_on(fig, note: str) -> float:
    """Write ``note`` in small type along the figure's foot; the fraction of its height it takes."""
    if not note:
        return 0.0
    width = int(fig.get_figwidth() * 72 / (NOTE_PT * 0.55))  # characters of that size in a line
    lines = textwrap.wrap(note, width)[:4]
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=NOTE_PT, va="bottom", ha="left", color="#444444")
    return (len(lines) * NOTE_PT * 1.25 + 6) / (fig.get_figheight() * 72)


def frontier(rows: list[Row]) -> Chart | None:
    """Size (MiB, log scale) against perplexity on the dataset column most artifacts were scored
    on; each point labelled, labels placed so that none overlaps another or a point; the
    artifacts left out are named in a note, with the reason."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    cols = _columns(rows)
    if not cols:
        return None
    col = max(cols, key=lambda c: sum(1 for r in rows if r.bytes and r.perplexity.get(c.key) is not None))
    pts, left_out = [], {}
    for r in rows:
        if r.perplexity.get(col.key) is None:
            other = any(ds == col.key[0] for ds, _ in r.perplexity)
            left_out.setdefault("perplexity measured with another protocol" if other else
                                f"no perplexity on {col.name}", []).append(r.label)
        elif not r.bytes:
            left_out.setdefault("size not recorded", []).append(r.label)
        else:
            pts.append((r.bytes / 2**20, r.perplexity[col.key], r.label))
    note = ""
    if left_out:
        note = f"{len(pts)} of {plural(len(rows), 'artifact')} plotted; not plotted: " + "; ".join(
            f"{why} ({_short_list(labels)})" for why, labels in left_out.items()) + "."
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=40, zorder=3)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.margins(x=0.25, y=0.2)
    ax.set_xlabel("artifact size (MiB, log scale)")
    ax.set_ylabel("\n".join(textwrap.wrap(f"perplexity on {col.name}", 40)))
    ax.set_title(f"Size–quality frontier ({plural(len(pts), 'artifact')})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout(rect=(0, _note_on(fig, note), 1, 1))
    _place_labels(ax, pts)
    return Chart("frontier", fig, note)


# offsets (points) and alignments tried for a point's label, nearest first
_CANDIDATES = [(dx, dy, ha, va) for r in (1, 2, 3) for dx, dy, ha, va in (
    (5, 5 * r, "left", "bottom"), (-5, 5 * r, "right", "bottom"), (5, -5 * r, "left", "top"),
    (-5, -5 * r, "right", "top"), (0, 6 + 6 * r, "center", "bottom"), (0, -6 - 6 * r, "center", "top"))]


def _place_labels(ax, pts: list[tuple[float, float, str]]) -> None:
    """Label each point at the first candidate offset whose text box stays inside the axes and
    overlaps no label placed before it and no point; failing that, where it overlaps least."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the limits and the layout, so window extents are final
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = []
    for x, y in ax.transData.transform([(p[0], p[1]) for p in pts]) if pts else []:
        taken.append((x - 5, y - 5, x + 5, y + 5))  # the marker

    def cost(b) -> float:
        box = (b.x0, b.y0, b.x1, b.y1)
        over = sum(max(0, min(box[2], t[2]) - max(box[0], t[0])) * max(0, min(box[3], t[3]) - max(box[1], t[1]))
                   for t in taken)
        outside = b.width * b.height - max(0, min(b.x1, inside.x1) - max(b.x0, inside.x0)) * \
            max(0, min(b.y1, inside.y1) - max(b.y0, inside.y0))
        return over + 2 * outside

    for x, y, text in sorted(pts, key=lambda p: (p[0], p[1])):
        best = None
        for dx, dy, ha, va in _CANDIDATES:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=8)
            b = ann.get_window_extent(renderer)
            c = cost(b)
            if best is None or c < best[0]:
                if best is not None:
                    best[1].remove()
                best = (c, ann, b)
            else:
                ann.remove()
            if c == 0:
                break
        taken.append((best[2].x0, best[2].y0, best[2].x1, best[2].y1))


def throughput(rows: list[Row]) -> Chart | None:
    """Per artifact, decode tokens/s at the median step and over wall time side by side, each bar
    with its value written on it and its IQR as an error bar; unstable runs in red."""
    import matplotlib.pyplot as plt

    bench = [r for r in rows if r.decode_tokens_per_s]
    if not bench:
        return None
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    xs = range(len(bench))
    width = 0.38
    unstable = [r.stable is False for r in bench]
    for shift, attr, iqr, name, colors in (
            (-width / 2, "decode_tokens_per_s", "decode_iqr", "median step", ("#4477aa", "#cc6677")),
            (width / 2, "decode_tokens_per_s_wall", "decode_wall_iqr", "wall time", ("#99bbdd", "#eebbcc"))):
        values = [getattr(r, attr) or 0 for r in bench]
        errs = [(getattr(r, iqr) or 0) / 2 if getattr(r, attr) else 0 for r in bench]
        ax.bar([x + shift for x in xs], values, width, label=name, color=[colors[u] for u in unstable],
               edgecolor=[colors[1] if u else colors[0] for u in unstable], yerr=errs, capsize=3)
        for x, v, e, r in zip(xs, values, errs, bench):  # above the error bar, so a 2.7 beside 9,000 is read
            ax.annotate(fmt(getattr(r, attr), ",.1f"), (x + shift, v + e), textcoords="offset points",
                        xytext=(0, 3), ha="center", va="bottom", fontsize=7)
    labels = [f"{r.label}\n({r.runtime}{', UNSTABLE' if r.stable is False else ''})" for r in bench]
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("decode tokens/s (median over runs)")
    ax.set_title("Decode throughput: median step and wall time (error bars: IQR; red: unstable)", fontsize=10)
    ax.margins(y=0.12)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    note = ""
    if any(unstable):
        note = (f"Not stable: {_short_list([r.label for r in bench if r.stable is False])} (the report's notes "
                "say why); these rates say little about the files, and no speed-up is claimed from them.")
    fig.tight_layout(rect=(0, _note_on(fig, note), 1, 1))
    return Chart("throughput", fig, note)


def energy(rows: list[Row]) -> Chart | None:
    import matplotlib.pyplot as plt

    items = [r for r in rows if r.j_per_token is not None]
    if not items:
        return None
    methods = sorted({r.energy_method for r in items})
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    bars = ax.bar(range(len(items)), [r.j_per_token for r in items], color="#4477aa")
    ax.bar_label(bars, labels=[fmt(r.j_per_token, ".4g") for r in items], padding=2, fontsize=7)
    ax.set_xticks(range(len(items)), [r.label for r in items], fontsize=8)
    ax.set_ylabel("J/token")
    ax.set_title(f"Energy per token ({', '.join(methods)})")
    ax.margins(y=0.12)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return Chart("energy", fig)


def charts(rows: list[Row], out: Path) -> list[tuple[Path, str]]:
    """PNG charts: the size-quality frontier, decode throughput, energy per token (each when a
    record has its figures); (path, note) for each written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for make in (frontier, throughput, energy):
        chart = make(rows)
        if chart is None:
            continue
        path = out / f"{chart.name}.png"
        chart.fig.savefig(path)
        plt.close(chart.fig)
        written.append((path, chart.note))
    return written


def render(records: list[dict], out: Path, fmt_name: str = "md") -> dict:
    """Write report.md (and PNGs) or a self-contained report.html into ``out``; returns what was written."""
    from itera.fsio import atomic_dir

    if not records:
        raise InputError("no records to report; pass record files or pipe records on stdin")
    rows = collect(records)
    head, body = table(rows)
    foot = notes(rows)
    summary = f"{plural(len(rows), 'artifact')} from {plural(len(records), 'record')}."
    with atomic_dir(out) as tmp:
        pngs = charts(rows, tmp)
        if fmt_name == "html":
            # Every name in a record (artifact paths, formats, dataset names) is text, never markup.
            cells = lambda r, tag: "".join(f"<{tag}>{escape(c)}</{tag}>" for c in r)  # noqa: E731
            imgs = "".join(f'<h2>{escape(p.stem)}</h2><img alt="{escape(p.stem)}" src="data:image/png;base64,'
                           f'{base64.b64encode(p.read_bytes()).decode()}">'
                           + (f"<p class='note'>{escape(note)}</p>" if note else "") for p, note in pngs)
            html = ("<!doctype html><html><head><meta charset='utf-8'><title>itera report</title><style>"
                    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid "
                    "#ccc;padding:4px 8px;font-size:13px}.note{font-size:12px;color:#444}</style></head><body>"
                    f"<h1>itera report</h1><p>{escape(summary)}</p><table><tr>"
                    + cells(head, "th") + "</tr>" + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in body)
                    + "</table>" + "".join(f"<p class='note'>{escape(n)}</p>" for n in foot)
                    + imgs + "</body></html>\n")
            (tmp / "report.html").write_text(html)
            for p, _ in pngs:
                p.unlink()
            name = "report.html"
        else:
            md = ["# itera report", "", summary, "",
                  "| " + " | ".join(_md_cell(c) for c in head) + " |", "|" + "---|" * len(head)]
            md += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in body]
            md += [""] + [f"- {_md_cell(n)}" for n in foot] + ([""] if foot else [])
            for p, note in pngs:
                md += [f"![{p.stem}]({p.name})", ""] + ([_md_cell(note), ""] if note else [])
            (tmp / "report.md").write_text("\n".join(md).rstrip("\n") + "\n")
            name = "report.md"
    return {"report": str(Path(out) / name), "charts": [p.name for p, _ in pngs] if fmt_name != "html" else [],
            "artifacts": len(rows)}


# --------------------------------------------------------------------------- the job


@dataclass
class ReportOptions:
    out: Path = flag("--out")
    # record files; none: the JSON lines of ``stdin``
    records: list[Path] = argument("records", default_factory=list)
    format: str = flag("--format", default="md")
    stdin: bytes = internal("the CLI reads stdin into it when no record file is given", default=b"")
    force: bool = flag("--force", default=False)

    def inputs(self) -> list[Path]:
        return list(self.records)

    def outputs(self) -> list:
        from itera.fsio import Output

        return [Output(self.out, "dir", "--out", self.force)]

    def validate(self) -> "ReportOptions":
        if self.format not in ("md", "html"):
            raise UsageError(f"unknown --format {self.format!r}; use md or html")
        return self

    @functools.cached_property
    def parsed(self) -> list[dict]:
        """The records, read once. Files that are not itera records are left out (see
        :attr:`skipped`, and :attr:`left_out` for the one line that names them) when others are
        records (``runs/demo/*.json`` holds `registry compare`'s and `history`'s JSON, and the empty
        output of a refused `promote`, too); when none is, that is a RecordError naming the first
        of them and why."""
        from itera.errors import RecordError
        from itera.record import parse_record, read_record_file

        self.skipped: list[str] = []
        self.left_out: list[str] = []
        if not self.records:
            try:
                text = self.stdin.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(f"stdin is not UTF-8 text (byte {e.start}); pipe the JSON records itera "
                                  "commands printed") from None
            return [parse_record(line.encode()) for line in text.splitlines() if line.strip()]
        out, reasons = [], []
        for p in self.records:
            try:
                out.append(read_record_file(p))
            except RecordError as e:  # e.g. `registry compare`'s JSON beside the records in runs/demo/
                why = str(e).split(";")[0]
                self.skipped.append(why if str(p) in why else f"{p}: {why}")  # the path once
                self.left_out.append(f"{Path(p).name} ({_what_it_is(Path(p))})")
                reasons.append(why if str(p) in why else f"{p} is not an itera record: {why}")
        if reasons and not out:
            n = len(reasons) - 1
            more = f" (and {n} more file{'s' if n > 1 else ''} that {'are' if n > 1 else 'is'} not an itera record)" \
                if n else ""
            raise RecordError(f"{reasons[0]}{more}; pass record files written with --metrics-out")
        return out


def _what_it_is(path: Path) -> str:
    """What a file that is not a record holds, in a few words: empty (a command that failed or was
    refused wrote nothing), the JSON a registry read command prints, or something else."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return "not text"
    if not text:
        return "empty"
    try:
        obj = json.loads(text)
    except ValueError:
        return "not JSON"
    if isinstance(obj, dict):
        if "events" in obj and "name" in obj:
            return "registry history output"
        if "versions" in obj and "metrics" in obj:
            return "registry compare output"
        if "versions" in obj and "registry" in obj:
            return "registry list output"
    return "JSON, not a record"


def run_report(opts: ReportOptions, reporter: Reporter = SILENT) -> Outcome:
    from itera.artifacts import describe_artifact

    opts.validate()
    records = opts.parsed
    result = render(records, opts.out, opts.format)
    # one line, on the happy path too: what was written and, in the same line, what was left out
    left = opts.left_out
    reporter.log(f"wrote {result['report']}: {plural(result['artifacts'], 'artifact')} from "
                 f"{plural(len(records), 'record')}" + (
                     f"; left out {plural(len(left), 'file')} without a record: {', '.join(left)}" if left else ""))
    params = {"records": [str(p) for p in opts.records], "format": opts.format, "charts": result["charts"],
              "skipped": opts.skipped}
    return Outcome(describe_artifact(opts.out, "report", opts.format), {"artifacts": result["artifacts"]}, params)
