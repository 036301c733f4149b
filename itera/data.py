"""Text data sources (docs/formats.md, "Data sources").

A source spec is one of:

- a local file: ``.txt`` (one text), ``.jsonl`` (one JSON object per line with a ``text``
  field) or ``.parquet`` (a ``text`` column);
- ``pydocs[@train|@test|@all]``: the built-in corpus, the docstrings of the running
  Python's standard library (read with ``ast``, never imported). Python itself carries it, so
  the demo needs no download and no third-party data. ``test`` is a fixed ~10% of docstrings;
- ``wikitext-2`` (``wikitext``/``wikitext-2-raw-v1``), ``tinystories``
  (``roneneldan/TinyStories``), or any Hugging Face ``datasets`` name as
  ``name[:config][@split]``.

Rows are joined with a blank line into one text. Without network and without a local cache a
hub name fails within seconds with a message that says how to pass a local file instead.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import sys
import sysconfig
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from itera.errors import DataError
from itera.paths import cache_dir

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
ROW_SEPARATOR = "\n\n"
BUILTIN = "pydocs"
# alias -> (hub path, config, split for training, split for evaluation)
HUB_ALIASES = {
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1", "train", "test"),
    "tinystories": ("roneneldan/TinyStories", None, "train", "validation"),
}
_LOCAL_HINT = ("pass a local file instead (.txt, .jsonl with a \"text\" field, or .parquet with a "
               "\"text\" column), e.g. --dataset path/to/text.txt")


@dataclass
class TextSource:
    """Rows of text from one source; ``text`` joins them with a blank line."""

    spec: str
    rows: list[str]
    description: str

    @property
    def text(self) -> str:
        return ROW_SEPARATOR.join(self.rows)


def local_path(spec: str) -> Path | None:
    """The file a data spec names, or None for the built-in corpus and hub names. A hub name can
    hold a slash (org/name), so only these count as paths when nothing exists there."""
    spec = str(spec).strip()
    path = Path(spec)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists() or spec.startswith(("/", "./", "../", "~")):
        return path.expanduser()
    return None


def canonical(spec: str, purpose: str = "eval") -> str:
    """One name per text, whatever was typed: a local file's resolved path; ``pydocs@<split>``;
    a hub dataset as ``name[:config]@split`` with aliases expanded and the default split filled
    in. A file's path says where it sits here, not what it is: records key figures by
    :func:`dataset_key`."""
    spec = str(spec).strip()
    path = local_path(spec)
    if path is not None:
        return os.path.realpath(path)  # unlike Path.resolve, no error on a symlink loop: reading it says so
    name, _, split = spec.partition("@")
    if name == BUILTIN:
        return f"{BUILTIN}@{split or ('test' if purpose == 'eval' else 'train')}"
    if name in HUB_ALIASES:
        hub, config, train_split, eval_split = HUB_ALIASES[name]
    else:
        hub, _, config = name.partition(":")
        train_split, eval_split = "train", "test"
    split = split or (train_split if purpose == "train" else eval_split)
    return f"{hub}{':' + config if config else ''}@{split}"


KEY_SEP = "#"  # a file dataset's key: its name as given, this, the first 8 hex digits of its sha256
KEY_HASH_CHARS = 8


def dataset_key(spec: str, purpose: str = "eval") -> str:
    """The name records key a dataset's figures by, the same on every machine: a built-in or hub
    name as :func:`canonical` writes it; a local file by what it is, never where it sits: its
    file name as given plus the first 8 hex digits of the sha256 of its bytes
    (``notes.txt#3f2a9c1b``, what ``sha256sum notes.txt | cut -c1-8`` prints). The same text
    in two checkouts is one key; other text under the same name is another. ``#`` because a
    metric name is a dotted path (``datasets.notes.txt#3f2a9c1b.perplexity``) and ``@`` and
    ``:`` already mean a split and a config. Read the file (:func:`load_text`) first: a
    missing one raises OSError here."""
    path = local_path(spec)
    if path is None:
        return canonical(spec, purpose)
    from itera.fsio import sha256_file

    return f"{path.name}{KEY_SEP}{sha256_file(path)[:KEY_HASH_CHARS]}"


def load_text(spec: str, purpose: str = "eval", field: str = "text") -> TextSource:
    """Read the source named by ``spec``. ``purpose`` ("train" or "eval") picks the default split;
    ``field`` is the column (.jsonl, .parquet, hub datasets) that holds the text: a string, or chat
    ``messages`` (a list of ``{"role", "content"}``) whose contents are joined by newlines."""
    spec = str(spec).strip()
    if not spec:
        raise DataError("empty data source; pass a file path or a dataset name")
    path = local_path(spec)
    if path is not None:
        return _load_local(path, field)
    _refuse_mistyped_file(spec)
    name, _, split = spec.partition("@")
    if name == BUILTIN:
        return _load_pydocs(split or ("test" if purpose == "eval" else "train"), spec)
    return _load_hub(spec, name, split or None, purpose, field)


def _refuse_mistyped_file(spec: str) -> None:
    """A spec that is neither a file that exists nor a plausible dataset name: a mistyped file
    (``notes.tx``) is reported as a missing file, with the closest name that exists beside it."""
    import difflib

    p = Path(spec).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    names = [c.name for c in parent.iterdir() if c.is_file()] if parent.is_dir() else []
    close = difflib.get_close_matches(p.name, names, n=1, cutoff=0.75)
    looks_like_file = bool(p.suffix) and "/" not in spec and "@" not in spec and spec.split(":")[0] not in HUB_ALIASES
    if close or looks_like_file:
        hint = f"did you mean {parent / close[0]}?" if close else \
            "pass an existing .txt, .jsonl or .parquet file, or a dataset name"
        raise DataError(f"data file {spec} does not exist (no such file); {hint}")


def split_heldout(text: str, holdout: float) -> tuple[str, str]:
    """The head of ``text`` for training or calibration and its tail (a ``holdout`` fraction of
    its characters) held out for evaluation."""
    cut = int(len(text) * (1 - holdout))
    return text[:cut], text[cut:]


def heldout_split(source: str, text: str, holdout: float, head_tokens: int, tail_tokens: int, scored: int | None,
                  excluded_from: str) -> dict:
    """The record's description of the held-out tail :func:`split_heldout` cut from ``text`` (the one
    rule distill, quantize and export share; each command keeps its own ``holdout`` fraction):
    which source, which share, which characters and tokens, how many tokens a figure scored, and
    what the tail was kept out of ("training", "calibration"). Tokens count the head's tokens
    then the tail's, each tokenized on its own, as the command did."""
    cut = len(split_heldout(text, holdout)[0])
    return {"source": source, "rule": "tail", "fraction": holdout, "chars": [cut, len(text)],
            "tokens": [head_tokens, head_tokens + tail_tokens], "tokens_scored": scored,
            "excluded_from": excluded_from}


def describe_heldout(split: dict) -> str:
    """``the last 5% of pydocs@train (characters 1,425,000–1,500,000, tokens 190,000–200,000; 8,192
    scored; not used for training)``: which tokens a held-out figure stands on, for stderr."""
    a, b = split["chars"]
    t0, t1 = split["tokens"]
    scored = f"; {split['tokens_scored']:,} scored" if split.get("tokens_scored") is not None else ""
    return (f"the last {split['fraction'] * 100:g}% of {split['source']} (characters {a:,}–{b:,}, tokens {t0:,}–{t1:,}"
            f"{scored}; not used for {split['excluded_from']})")


def _nonempty(source: TextSource) -> TextSource:
    if not any(r.strip() for r in source.rows):
        raise DataError(f"data source {source.spec} holds no text; pass a file or dataset with text in it")
    return source


# --------------------------------------------------------------------------- local files


def _load_local(path: Path, field: str = "text") -> TextSource:
    from itera.fsio import check_regular

    if not path.exists() and not path.is_symlink():
        raise DataError(f"data file {path} does not exist; pass an existing .txt, .jsonl or .parquet file")
    check_regular(path, "data file")
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass a .txt, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            rows = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    elif suffix == ".jsonl":
        rows = _read_jsonl(path, field)
    elif suffix == ".parquet":
        rows = _read_parquet(path, field)
    else:
        raise DataError(f"{path} has an unsupported extension {suffix or '(none)'}; use .txt, .jsonl or .parquet")
    return _nonempty(TextSource(str(path), rows, f"local {suffix[1:]} file"))


def is_text(obj) -> bool:
    """Whether every string in a parsed JSON value is encodable text: JSON's \\uXXXX escapes can spell
    half of a surrogate pair, which no tokenizer (and no UTF-8 file) can hold."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(obj, dict):
        return all(is_text(k) and is_text(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(is_text(v) for v in obj)
    return True


def _row_text(value, field: str) -> str | None:
    """A row's text: a string, or chat messages' contents joined by newlines; None otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in value):
        return "\n".join(m["content"] for m in value)
    return None


def _read_jsonl(path: Path, field: str = "text") -> list[str]:
    rows = []
    need = f"each line needs {{\"{field}\": ...}} (or pass --text-field NAME)"
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise DataError(f"{path} line {lineno} is not a JSON object; {need}") from None
            text = _row_text(obj.get(field), field) if isinstance(obj, dict) else None
            if text is None:
                raise DataError(f"{path} line {lineno} has no string \"{field}\" field; {need}")
            if not is_text(text):
                raise DataError(f"{path} line {lineno}: the text holds a lone surrogate (an unpaired \\uD800-\\uDFFF "
                                "escape); fix the line")
            rows.append(text)
    return rows


def _read_parquet(path: Path, field: str = "text") -> list[str]:
    import pyarrow.parquet as pq  # installed with `datasets`

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path} is not a readable parquet file ({e})") from None
    if field not in table.column_names:
        raise DataError(f"{path} has no \"{field}\" column (columns: {', '.join(table.column_names)}); pass "
                        "--text-field NAME")
    return [t for t in (_row_text(v, field) for v in table.column(field).to_pylist()) if t is not None]


# --------------------------------------------------------------------------- built-in corpus


def _load_pydocs(split: str, spec: str) -> TextSource:
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r} for {BUILTIN}; use {BUILTIN}@train, {BUILTIN}@test or {BUILTIN}@all")
    docs = dict.fromkeys(d for _, d in pydocs_corpus())  # de-duplicated: some modules share docstrings
    rows = [d for d in docs if split == "all" or (split == "test") == _is_test_row(d)]
    desc = f"docstrings of the Python {sys.version_info.major}.{sys.version_info.minor} standard library ({split})"
    return _nonempty(TextSource(spec, rows, desc))


def _is_test_row(doc: str) -> bool:
    """A fixed ~10% of docstrings, chosen by a hash of their text, are held out."""
    return zlib.crc32(doc.encode()) % 10 == 0


def pydocs_corpus() -> list[tuple[str, str]]:
    """(module path, docstring) pairs from the standard library, cached under ``$ITERA_HOME/cache``."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    cache = cache_dir() / f"pydocs-{ver}.json"
    if cache.is_file():
        try:
            return [tuple(x) for x in json.loads(cache.read_text("utf-8"))]
        except (ValueError, UnicodeDecodeError):
            pass  # a damaged cache is rebuilt below
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/")) or "/test" in rel or "/tests/" in rel:
            continue
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append((rel, doc))
    from itera.fsio import write_text_atomic

    try:
        write_text_atomic(cache, json.dumps(docs))
    except OSError:
        pass  # no writable cache ($ITERA_HOME): the corpus is read again next time
    return docs


# --------------------------------------------------------------------------- Hugging Face hub


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within ``timeout`` seconds (DNS included)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    result = [False]

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = True
        except OSError:
            pass

    # getaddrinfo ignores socket timeouts, so the whole probe runs in a thread we stop waiting for.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result[0]


def _maybe_cached(hub: str) -> bool:
    """Whether `datasets`' or the hub's cache holds anything under this dataset's name (a cheap
    look before the expensive import; `datasets` decides what is usable)."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    roots = [Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets"),
             Path(os.environ.get("HF_HUB_CACHE") or home / "hub")]
    stems = {hub.replace("/", "___"), "datasets--" + hub.replace("/", "--")}
    return any((root / stem).exists() for root in roots for stem in stems)


def _load_hub(spec: str, name: str, split: str | None, purpose: str, field: str = "text") -> TextSource:
    config = None
    if name in HUB_ALIASES:
        hub, config, train_split, eval_split = HUB_ALIASES[name]
    else:
        hub, _, config = name.partition(":")
        config = config or None
        train_split, eval_split = "train", "test"
        if not hub or any(c in hub for c in " \t\n"):
            raise DataError(f"invalid dataset name {spec!r}; use name[:config][@split] or a local file")
    split = split or (train_split if purpose == "train" else eval_split)
    online = _hub_reachable()
    if not online:
        if not _maybe_cached(hub):  # nothing to find: say so without importing `datasets` (seconds)
            raise DataError(f"dataset {spec!r} is not in the local cache and the Hugging Face Hub is unreachable; "
                            f"{_LOCAL_HINT}")
        # Let `datasets` look in its local cache only; it reads these at import time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets

        ds = datasets.load_dataset(hub, config, split=split)
    except Exception as e:
        if not online:
            raise DataError(
                f"dataset {spec!r} is not in the local cache and the Hugging Face Hub is unreachable; {_LOCAL_HINT}"
            ) from None
        raise DataError(f"dataset {spec!r} could not be loaded ({type(e).__name__}: {e}); {_LOCAL_HINT}") from None
    if field not in ds.column_names:
        raise DataError(f"dataset {spec!r} has no \"{field}\" column (columns: {', '.join(ds.column_names)}); pass "
                        "--text-field NAME")
    rows = [t for t in (_row_text(v, field) for v in ds[field]) if t is not None]
    return _nonempty(TextSource(spec, rows, f"hub dataset {hub}" + (f":{config}" if config else "") + f"@{split}"))
