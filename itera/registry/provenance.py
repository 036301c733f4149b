"""What the registry reads out of a record's lineage (its parent chain, :func:`itera.record.ancestors`):
the chain itself in short, the metrics measured on an artifact, how a figure was measured and
how the artifact was quantized. Pure functions of the record."""

from __future__ import annotations

import math

from itera.record import ancestors

PROTOCOL_KEYS = ("window", "stride", "bos", "max_tokens")  # which runtime computed a figure is not part of it


def lineage(record: dict) -> list[dict]:
    """The parent chain of a record, nearest first (the record itself first): command, artifact, time."""
    chain = []
    for node in ancestors(record, include_self=True):
        art = node.get("artifact") or {}
        chain.append({"command": node.get("command"), "path": art.get("path"), "format": art.get("format"),
                      "sha256": art.get("sha256"), "started_at": node.get("started_at")})
    return chain


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """{"datasets": {"x": {"perplexity": 3}}} -> {"datasets.x.perplexity": 3}; numbers only."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = v
    return out


def measured_metrics(record: dict, sha256: str) -> dict[str, float]:
    """Numbers measured on this artifact anywhere in the chain (evaluate, benchmark-power, ...).

    The nearest record wins on a clash. Records about other artifacts (the float model a
    quantized one came from) are lineage, not measurements of this one, and are skipped.
    """
    merged: dict[str, float] = {}
    for node in ancestors(record, include_self=True):
        art = node.get("artifact") or {}
        if art.get("sha256") == sha256:
            for k, v in flatten_metrics(node.get("metrics") or {}).items():
                merged.setdefault(k, v)
    return merged


def evaluation_protocol(record: dict | None, sha256: str, key: str) -> dict | None:
    """How the figure ``key`` (``datasets.<dataset>.<metric>``) of the artifact ``sha256`` was
    measured: the evaluate record behind it in the lineage, its windowing, BOS and the number of
    tokens scored. None when no record says."""
    if not key.startswith("datasets."):
        return None
    for node in ancestors(record, include_self=True):
        art = node.get("artifact") or {}
        datasets = (node.get("metrics") or {}).get("datasets") or {}
        if node.get("command") == "evaluate" and art.get("sha256") == sha256:
            for spec, figures in datasets.items():
                if key.startswith(f"datasets.{spec}.") and "." not in key[len(f"datasets.{spec}."):]:
                    params = node.get("params") or {}
                    return {"dataset": spec, **{k: params.get(k) for k in PROTOCOL_KEYS},
                            "tokens": figures.get("tokens")}
    return None


def quantization_of(record: dict | None) -> str | None:
    """A short label of how the artifact was quantized, from its lineage (None if it was not)."""
    for node in ancestors(record, include_self=True):
        p = node.get("params") or {}
        if node.get("command") == "export" and p.get("gguf_type"):
            return str(p["gguf_type"])
        if node.get("command") == "quantize" and p.get("method"):
            return f"{p['method']}-{p.get('bits')}bit"
    return None
