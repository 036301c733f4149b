"""``itera report``: tables and charts from records, following their lineage.

Every number in the report is copied from a record: a row per artifact with its size, bits
per weight (the quantize step's, or for a GGUF file the file's own over all its weights),
perplexity and bits per byte per dataset and evaluation protocol (evaluate), median decode
tokens/s with its spread and stability, J/token with the energy method (benchmark-power, one
artifact or several compared in one run), and export parity (max |logit diff|, top-1 agreement).

Rows are labelled by their registry reference when one was registered, else by the shortest
path suffix that tells them apart (two ``model.gguf`` files in different directories differ).
Perplexities measured with different protocols (window, stride, BOS, tokens scored)
are never put in one column: each protocol gets its own, labelled.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import re
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from itera.errors import InputError, UsageError
from itera.options import argument, flag, internal
from itera.progress import SILENT, Reporter
from itera.record import Outcome, ancestors


@dataclass
class Row:
    path: str
    format: str
    bytes: int | None = None
    bits_per_weight: float | None = None
    perplexity: dict = field(default_factory=dict)  # (dataset, protocol) -> value
    bits_per_byte: dict = field(default_factory=dict)
    decode_tokens_per_s: float | None = None
    decode_iqr: float | None = None
    stable: bool | None = None
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


def _protocol(node: dict, figures: dict) -> tuple:
    """What makes two perplexities comparable: windowing, BOS and tokens scored (not the runtime)."""
    p = node.get("params") or {}
    return (p.get("window"), p.get("stride"), p.get("bos"), figures.get("tokens"))


def _bench(row: Row, m: dict) -> None:
    row.decode_tokens_per_s, row.runtime = m.get("decode_tokens_per_s"), m.get("runtime")
    row.decode_iqr, row.stable = m.get("decode_tokens_per_s_iqr"), m.get("stable")
    row.j_per_token, row.energy_method = m.get("j_per_token"), m.get("energy_method")


def collect(records: list[dict]) -> list[Row]:
    """One row per artifact seen anywhere in the records' lineage, in order of first appearance
    from the oldest record."""
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
        if not key:
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
                proto = _protocol(node, v)
                row.perplexity[ds, proto], row.bits_per_byte[ds, proto] = v.get("perplexity"), v.get("bits_per_byte")
        elif cmd == "benchmark-power":
            if "compare" in m:  # several artifacts measured in one run: each figure to its own artifact,
                # matched once every record's artifacts are known (a compared file may be described later)
                compared.extend(m["compare"].items())
            else:
                _bench(row, m)
        elif cmd == "registry register":
            row.ref = f"{params.get('name')}@{params.get('version')}"
    for path, figures in compared:
        target = by_path.get(os.path.abspath(path))
        if target is None:
            target = rows.setdefault(path, Row(path=path, format=Path(path).suffix[1:] or "?"))
            by_path[os.path.abspath(path)] = target
        _bench(target, figures)
    _label(list(rows.values()))
    return list(rows.values())


def _label(rows: list[Row]) -> None:
    """The registry reference, else the shortest path suffix no other row shares."""
    for r in rows:
        parts = Path(r.path).parts
        for n in range(1, len(parts) + 1):
            suffix = "/".join(parts[-n:])
            if sum(1 for o in rows if "/".join(Path(o.path).parts[-n:]) == suffix) == 1:
                break
        r.label = f"{r.ref} ({suffix})" if r.ref else suffix


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


def _columns(rows: list[Row]) -> list[tuple[str, tuple]]:
    """(header label, (dataset, protocol)) per perplexity column: one per dataset, or one per
    protocol of a dataset measured more than one way, each labelled with its protocol."""
    keys = sorted({k for r in rows for k in r.perplexity}, key=lambda k: (k[0], str(k[1])))
    out = []
    for ds, proto in keys:
        several = sum(1 for d, _ in keys if d == ds) > 1
        w, st, bos, tokens = proto
        label = ds + (f" (window {w}, stride {st}, bos {bos}, {tokens} tokens)" if several else "")
        out.append((label, (ds, proto)))
    return out


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    cols = _columns(rows)
    head = ["artifact", "made by", "format", "size", "bits/weight", *[f"ppl {c}" for c, _ in cols],
            *[f"bpb {c}" for c, _ in cols], "decode tok/s", "stable", "runtime", "J/token", "energy method",
            "max abs Δlogit", "top-1 agree"]
    body = []
    for r in rows:
        tps = fmt(r.decode_tokens_per_s, ".1f") + (f" ± {r.decode_iqr / 2:.1f}" if r.decode_iqr is not None else "")
        body.append([r.label, r.made_by or "", r.format, size(r.bytes), fmt(r.bits_per_weight, ".3f"),
                     *[fmt(r.perplexity.get(k), ".3f") for _, k in cols],
                     *[fmt(r.bits_per_byte.get(k), ".4f") for _, k in cols],
                     tps, {True: "yes", False: "no"}.get(r.stable, "–"), r.runtime or "–",
                     fmt(r.j_per_token, ".4g"), r.energy_method or "–", fmt(r.max_abs_logit_diff, ".3g"),
                     fmt(r.top1_agreement, ".3f")])
    return head, body


_MD_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")
_MD_SPECIAL = re.compile(r"([`*\[\]|])")


def _md_cell(text: str) -> str:
    """A table cell that stays one cell and stays text: line breaks and other control characters
    become a space (a newline would end the table and start a heading); pipes, backticks,
    asterisks and brackets are backslash-escaped (no cell splits, code, emphasis, links or images;
    underscores only emphasise whole words, so ``Q4_0`` and file names stay as they are); angle
    brackets become entities."""
    return _MD_SPECIAL.sub(r"\\\1", escape(_MD_CONTROL.sub(" ", str(text)), quote=False))


def charts(rows: list[Row], out: Path) -> list[Path]:
    """PNG charts: the size-quality frontier (every artifact with a perplexity, one protocol),
    decode throughput (medians with IQR bars, unstable runs marked), energy per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cols = _columns(rows)
    if cols:  # the protocol most artifacts were measured with
        label, key = max(cols, key=lambda c: sum(1 for r in rows if r.perplexity.get(c[1])))
        pts = [(r.bytes, r.perplexity[key], r.label) for r in rows if r.bytes and r.perplexity.get(key)]
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=40)
        # neighbours in size alternate above and below their points, and labels in the right half
        # of the axis run leftwards, so that they neither overlap nor leave the chart
        xs = sorted(math.log(p[0]) for p in pts)
        mid = (xs[0] + xs[-1]) / 2
        for i, (x, y, text) in enumerate(sorted(pts)):
            right = math.log(x) > mid
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(-5 if right else 5, 6 if i % 2 == 0 else -13),
                        ha="right" if right else "left", fontsize=8)
        ax.set_xscale("log")
        ax.margins(x=0.08, y=0.15)
        ax.set_xlabel("artifact size (bytes)")
        ax.set_ylabel(f"perplexity on {label}")
        ax.set_title(f"Size–quality frontier ({len(pts)} artifacts)")
        ax.grid(True, alpha=0.3)
        written.append(_save(fig, out / "frontier.png"))
    bench = [r for r in rows if r.decode_tokens_per_s]
    if bench:
        labels = [f"{r.label}\n({r.runtime}{', UNSTABLE' if r.stable is False else ''})" for r in bench]
        errs = [(r.decode_iqr or 0) / 2 for r in bench]
        colors = ["#cc6677" if r.stable is False else "#4477aa" for r in bench]
        written.append(_bar(list(zip(labels, [r.decode_tokens_per_s for r in bench])), "decode tokens/s (median)",
                            "Decode throughput (bars: IQR across runs; red: unstable)", out / "throughput.png",
                            errs, colors))
    energy = [(r.label, r.j_per_token) for r in rows if r.j_per_token is not None]
    if energy:
        methods = sorted({r.energy_method for r in rows if r.j_per_token is not None})
        written.append(_bar(energy, "J/token", f"Energy per token ({', '.join(methods)})", out / "energy.png"))
    return written


def _bar(items, ylabel: str, title: str, path: Path, errors=None, colors=None) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.bar(range(len(items)), [v for _, v in items], color=colors or "#4477aa", yerr=errors, capsize=4)
    ax.set_xticks(range(len(items)), [k for k, _ in items], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def render(records: list[dict], out: Path, fmt_name: str = "md") -> dict:
    """Write report.md (and PNGs) or a self-contained report.html into ``out``; returns what was written."""
    from itera.fsio import atomic_dir

    if not records:
        raise InputError("no records to report; pass record files or pipe records on stdin")
    rows = collect(records)
    head, body = table(rows)
    with atomic_dir(out) as tmp:
        pngs = charts(rows, tmp)
        if fmt_name == "html":
            # Every name in a record (artifact paths, formats, dataset names) is text, never markup.
            cells = lambda r, tag: "".join(f"<{tag}>{escape(c)}</{tag}>" for c in r)  # noqa: E731
            imgs = "".join(f'<h2>{escape(p.stem)}</h2><img alt="{escape(p.stem)}" src="data:image/png;base64,'
                           f'{base64.b64encode(p.read_bytes()).decode()}">' for p in pngs)
            html = ("<!doctype html><html><head><meta charset='utf-8'><title>itera report</title><style>"
                    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid "
                    "#ccc;padding:4px 8px;font-size:13px}</style></head><body><h1>itera report</h1><table><tr>"
                    + cells(head, "th") + "</tr>" + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in body)
                    + "</table>" + imgs + "</body></html>\n")
            (tmp / "report.html").write_text(html)
            for p in pngs:
                p.unlink()
            name = "report.html"
        else:
            md = ["# itera report", "", f"{len(rows)} artifacts from {len(records)} records.", "",
                  "| " + " | ".join(_md_cell(c) for c in head) + " |", "|" + "---|" * len(head)]
            md += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in body]
            md += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
            (tmp / "report.md").write_text("\n".join(md) + "\n")
            name = "report.md"
    return {"report": str(Path(out) / name), "charts": [p.name for p in pngs] if fmt_name != "html" else [],
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
        """The records, read once. Files that are not itera records are skipped (see :attr:`skipped`)
        when others are records (``runs/demo/*.json`` holds `registry compare`'s JSON too); when none
        is, that is a RecordError naming the first of them and why."""
        from itera.errors import RecordError
        from itera.record import parse_record, read_record_file

        self.skipped: list[str] = []
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
                reasons.append(why if str(p) in why else f"{p} is not an itera record: {why}")
        if reasons and not out:
            n = len(reasons) - 1
            more = f" (and {n} more file{'s' if n > 1 else ''} that {'are' if n > 1 else 'is'} not an itera record)" \
                if n else ""
            raise RecordError(f"{reasons[0]}{more}; pass record files written with --metrics-out")
        return out


def run_report(opts: ReportOptions, reporter: Reporter = SILENT) -> Outcome:
    from itera.artifacts import describe_artifact

    opts.validate()
    records = opts.parsed
    for note in opts.skipped:
        reporter.log(f"skipped: {note}")
    result = render(records, opts.out, opts.format)
    reporter.log(f"wrote {result['report']} ({result['artifacts']} artifacts)")
    params = {"records": [str(p) for p in opts.records], "format": opts.format, "charts": result["charts"],
              "skipped": opts.skipped}
    return Outcome(describe_artifact(opts.out, "report", opts.format), {"artifacts": result["artifacts"]}, params)
