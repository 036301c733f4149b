"""``itera report``: tables and charts from records, following their lineage.

Every number in the report is copied from a record: a row per artifact with its size, bits
per weight (from the quantize step that produced it or its source), perplexity and bits per
byte per dataset (evaluate), decode tokens/s and J/token with the energy method
(benchmark-power), and export parity (max |logit diff|, top-1 agreement).
"""

from __future__ import annotations

import base64
import functools
import math
from html import escape
from dataclasses import dataclass, field
from pathlib import Path

from itera.errors import InputError, UsageError
from itera.progress import SILENT, Reporter
from itera.record import Outcome


@dataclass
class Row:
    path: str
    format: str
    bytes: int | None = None
    bits_per_weight: float | None = None
    perplexity: dict = field(default_factory=dict)
    bits_per_byte: dict = field(default_factory=dict)
    decode_tokens_per_s: float | None = None
    runtime: str | None = None
    j_per_token: float | None = None
    energy_method: str | None = None
    max_abs_logit_diff: float | None = None
    top1_agreement: float | None = None
    made_by: str | None = None


def chain(record: dict) -> list[dict]:
    out, node = [], record
    while isinstance(node, dict):
        out.append(node)
        node = node.get("parent")
    return out


def collect(records: list[dict]) -> list[Row]:
    """One row per artifact seen anywhere in the records' lineage, in order of first appearance
    from the oldest record."""
    rows: dict[str, Row] = {}
    seen: set[int] = set()
    nodes = []
    for rec in records:
        for node in reversed(chain(rec)):
            if id(node) not in seen:
                seen.add(id(node))
                nodes.append(node)
    # a quantize record's bits per weight also describes what is exported from its artifact
    bpw_by_sha: dict[str, float] = {}
    for node in nodes:
        art = node.get("artifact") or {}
        key = art.get("sha256") or art.get("path")
        if not key:
            continue
        row = rows.setdefault(key, Row(path=art["path"], format=art.get("format", "?"), bytes=art.get("bytes")))
        m, cmd = node.get("metrics") or {}, node.get("command")
        parent_art = ((node.get("parent") or {}).get("artifact") or {})
        if cmd == "quantize":
            row.bits_per_weight = m.get("bits_per_weight")
            bpw_by_sha[art.get("sha256")] = row.bits_per_weight
            row.made_by = f"quantize {node['params'].get('method')}"
        elif cmd == "export":
            row.max_abs_logit_diff, row.top1_agreement = m.get("max_abs_logit_diff"), m.get("top1_agreement")
            row.bits_per_weight = row.bits_per_weight or bpw_by_sha.get(parent_art.get("sha256"))
            row.made_by = f"export {node['params'].get('format')}" + (
                f" {node['params'].get('gguf_type')}" if node["params"].get("format") == "gguf" else "")
        elif cmd == "distill":
            row.made_by = "distill"
        elif cmd == "evaluate":
            for ds, v in (m.get("datasets") or {}).items():
                row.perplexity[ds], row.bits_per_byte[ds] = v.get("perplexity"), v.get("bits_per_byte")
        elif cmd == "benchmark-power":
            row.decode_tokens_per_s, row.runtime = m.get("decode_tokens_per_s"), m.get("runtime")
            row.j_per_token, row.energy_method = m.get("j_per_token"), m.get("energy_method")
    return list(rows.values())


def fmt(v, spec: str = ".4g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    datasets = sorted({d for r in rows for d in r.perplexity})
    head = ["artifact", "made by", "format", "bytes", "bits/weight", *[f"ppl {d}" for d in datasets],
            *[f"bpb {d}" for d in datasets], "decode tok/s", "runtime", "J/token", "energy method",
            "max abs Δlogit", "top-1 agree"]
    body = []
    for r in rows:
        body.append([Path(r.path).name, r.made_by or "", r.format, fmt(r.bytes, "d"), fmt(r.bits_per_weight, ".3f"),
                     *[fmt(r.perplexity.get(d), ".3f") for d in datasets],
                     *[fmt(r.bits_per_byte.get(d), ".4f") for d in datasets],
                     fmt(r.decode_tokens_per_s, ".1f"), r.runtime or "–", fmt(r.j_per_token, ".4g"),
                     r.energy_method or "–", fmt(r.max_abs_logit_diff, ".3g"), fmt(r.top1_agreement, ".3f")])
    return head, body


def _md_cell(text: str) -> str:
    """A table cell that stays one cell and stays text: pipes escaped, angle brackets as entities."""
    return escape(str(text), quote=False).replace("|", "\\|")


def charts(rows: list[Row], out: Path) -> list[Path]:
    """PNG charts for what the records hold: size vs perplexity, decode throughput, energy per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ds = next((d for r in rows for d in r.perplexity), None)
    pts = [(r.bytes, r.perplexity[ds], Path(r.path).name) for r in rows if ds and r.bytes and r.perplexity.get(ds)]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=40)
        for x, y, label in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("artifact size (bytes)")
        ax.set_ylabel(f"perplexity on {ds}")
        ax.set_title("Size–quality frontier")
        ax.grid(True, alpha=0.3)
        written.append(_save(fig, out / "frontier.png"))
    bars = [(f"{Path(r.path).name}\n({r.runtime})", r.decode_tokens_per_s) for r in rows if r.decode_tokens_per_s]
    if bars:
        written.append(_bar(bars, "decode tokens/s", "Decode throughput per runtime", out / "throughput.png"))
    energy = [(Path(r.path).name, r.j_per_token) for r in rows if r.j_per_token is not None]
    if energy:
        methods = sorted({r.energy_method for r in rows if r.j_per_token is not None})
        written.append(_bar(energy, "J/token", f"Energy per token ({', '.join(methods)})", out / "energy.png"))
    return written


def _bar(items, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.bar(range(len(items)), [v for _, v in items], color="#4477aa")
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
    out: Path
    records: list[Path] = field(default_factory=list)  # record files; none: the JSON lines of ``stdin``
    format: str = "md"
    stdin: bytes = b""
    force: bool = False

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
        """The records, read once."""
        from itera.record import parse_record, read_record_file

        if self.records:
            return [read_record_file(p) for p in self.records]
        lines = self.stdin.decode("utf-8", "strict").splitlines() if self.stdin.strip() else []
        return [parse_record(line.encode()) for line in lines if line.strip()]


def run_report(opts: ReportOptions, reporter: Reporter = SILENT) -> Outcome:
    from itera.record import describe_artifact

    opts.validate()
    result = render(opts.parsed, opts.out, opts.format)
    reporter.log(f"wrote {result['report']} ({result['artifacts']} artifacts)")
    params = {"records": [str(p) for p in opts.records], "format": opts.format, "charts": result["charts"]}
    return Outcome(describe_artifact(opts.out, "report", opts.format), {"artifacts": result["artifacts"]}, params)
