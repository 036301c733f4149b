"""A teacher's top-K distribution over a training token stream, computed once and reused by
every student that shares the teacher's tokenizer (``itera distill --teacher-cache DIR``).

The layout: the training tokens are cut into windows of ``seq_len + 1`` tokens at a stride of
``seq_len`` (consecutive windows share one token, so every training token is a target once); the
teacher reads each window's first ``seq_len`` tokens and, at every position, the cache keeps

- the ``K`` most likely next-token ids (uint16 when the tokenizer has at most 65,536 tokens,
  else uint32),
- their log-probabilities at temperature 1 (float16),
- the log of the mass of every other token (float32), so that the K ids and "the rest" are a
  proper distribution over ``K + 1`` buckets and a sparse KL is a real divergence,
- and, for tempering, the rest's power sums ``log sum_rest p^b`` at ``b`` in :data:`REST_BETAS`
  (float32; temperatures 4, 3, 2 and 1.5): what the rest's mass becomes at temperature ``T = 1/b``
  before renormalising. At those temperatures the sparse loss's tempering is exact; between them
  it interpolates ``log sum_rest p^b`` linearly in ``b`` (a convex function: an upper bound that
  the grid keeps tight), with ``b = 0`` (the rest's token count) and ``b = 1`` (its mass) as exact
  end points. A version 1 cache, without them, takes the rest as flat.

Log-probabilities are over the tokenizer's true vocabulary: rows of an embedding table padded past
it (Qwen's 151,936 rows for 151,665 tokens) are not tokens and are left out, for teacher and
student alike.

On disk, a directory: ``manifest.json`` (the key, the layout and one entry per shard with its
bytes and sha256), ``tokenizer/`` (the teacher's tokenizer, so a student needs no teacher),
``config.json`` (the teacher's, when it has one) and ``shard-NNNNN.bin`` files, each the
zlib-compressed ids, log-probabilities and remainders of up to :data:`SHARD_WINDOWS` windows.
The key is the teacher's content hash, the tokenizer's, the training text's, the sequence
layout and K; :meth:`TeacherCache.check` refuses a cache whose key differs from what a run
would compute, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from itera.errors import InputError, UsageError

FORMAT = "itera-teacher-cache"
VERSION = 2
READS = (1, 2)  # version 1: no rest power sums (the rest is taken as flat when tempering)
REST_BETAS = (0.25, 1 / 3, 0.5, 2 / 3)  # 1 / T for T = 4, 3, 2, 1.5
SHARD_WINDOWS = 256
DEFAULT_TOP_K = 64  # what `itera distill cache` keeps, and `distill --teacher-cache` builds, by default
REMAINDER_FLOOR = -80.0  # log of the rest's mass when the K ids hold all of it (exp(-80) ~ 1e-35)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_sha256(tok) -> str:
    """The tokenizer's identity: its vocabulary, merges, pre-tokenizer and special tokens, as the
    tokenizers library serialises them (the same for a copy of the same tokenizer.json)."""
    return hashlib.sha256(tok.backend.to_str().encode("utf-8")).hexdigest()


def window_grid(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(windows, seq_len + 1): the training stream cut at a stride of ``seq_len``."""
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise UsageError(f"the training text has {ids.numel()} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
    return ids[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len).contiguous()


def top_k(logits: torch.Tensor, k: int, vocab: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, log-probabilities, log remainder, the remainder's power sums) of the ``k`` most likely
    of the first ``vocab`` entries of ``logits`` (..., V) at temperature 1; the power sums are
    ``log sum_rest p^b`` for ``b`` in :data:`REST_BETAS` (..., len(REST_BETAS))."""
    logp = torch.log_softmax(logits[..., :vocab].float(), dim=-1)
    top, ids = logp.topk(k, dim=-1)
    if k < vocab:
        others = logp.scatter(-1, ids, float("-inf"))
        rest = others.logsumexp(-1)
        powers = torch.stack([(others * b).logsumexp(-1) for b in REST_BETAS], -1)
    else:
        rest = torch.full_like(top[..., 0], -math.inf)
        powers = torch.full(top.shape[:-1] + (len(REST_BETAS),), -math.inf, device=top.device)
    return ids, top, rest.clamp(min=REMAINDER_FLOOR), powers.clamp(min=REMAINDER_FLOOR)


def id_dtype(vocab: int) -> np.dtype:
    return np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<u4")


@dataclass
class Targets:
    """The teacher's sparse distribution for a batch of windows: (B, T, K) ids and log-probs, (B, T) remainder."""

    ids: torch.Tensor
    logp: torch.Tensor
    rest: torch.Tensor
    rest_powers: torch.Tensor | None = None  # (B, T, len(REST_BETAS)); None from a version 1 cache

    def to(self, device) -> "Targets":
        powers = self.rest_powers.to(device) if self.rest_powers is not None else None
        return Targets(self.ids.to(device), self.logp.to(device), self.rest.to(device), powers)


# --------------------------------------------------------------------------- reading


def _refuse(path: Path, what: str) -> InputError:
    return InputError(f"{path} {what}; rebuild it with `itera distill cache` (or delete it and pass "
                      "--teacher with --teacher-cache)")


class TeacherCache:
    """An existing cache directory: its manifest on open, its shards on :meth:`load`."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest
        self.k, self.vocab = int(manifest["top_k"]), int(manifest["vocab"])
        self.seq_len, self.windows = int(manifest["layout"]["seq_len"]), int(manifest["layout"]["windows"])
        self.ids: np.ndarray | None = None
        self.logp: np.ndarray | None = None
        self.rest: np.ndarray | None = None
        self.rest_powers: np.ndarray | None = None
        self.version = int(manifest.get("version", VERSION))

    @classmethod
    def open(cls, path: Path) -> "TeacherCache":
        path = Path(path)
        mf = path / "manifest.json"
        if not path.is_dir():
            raise InputError(f"--teacher-cache {path} is not a directory; build one with `itera distill cache`")
        try:
            manifest = json.loads(mf.read_text())
        except FileNotFoundError:
            raise _refuse(path, "holds no manifest.json, so it is not a teacher cache (or its build did not "
                          "finish)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _refuse(path, f"has an unreadable manifest.json ({type(e).__name__})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise _refuse(path, "is not a teacher cache (its manifest.json names another format)")
        if manifest.get("version") not in READS:
            raise _refuse(path, f"is a teacher cache of format version {manifest.get('version')}, and this itera "
                          f"reads versions {', '.join(map(str, READS))}")
        try:
            cache = cls(path, manifest)
            shards = manifest["shards"]
            if sum(int(s["windows"]) for s in shards) != cache.windows:
                raise ValueError
            if cache.version >= 2 and [round(float(b), 9) for b in manifest["rest_betas"]] != \
                    [round(b, 9) for b in REST_BETAS]:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise _refuse(path, "has a manifest.json with missing or inconsistent fields") from None
        for s in shards:  # a truncated or missing shard is found before anything is loaded
            f = path / s["file"]
            try:
                size = f.stat().st_size
            except OSError:
                raise _refuse(path, f"is missing its shard {s['file']}") from None
            if size != s["bytes"]:
                raise _refuse(path, f"has a truncated or altered shard {s['file']} ({size:,} bytes, the manifest "
                              f"says {s['bytes']:,})")
        return cache

    @property
    def bytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.manifest["shards"])

    def check(self, expected: dict) -> None:
        """Refuse when the run's key (same fields as the manifest's ``key``) differs, naming what."""
        have = self.manifest["key"]
        names = {"tokenizer_sha256": "tokenizer", "teacher_sha256": "teacher", "text_field": "--text-field",
                 "holdout": "--holdout", "data_sha256": "training text", "seq_len": "--seq-len (sequence layout)"}
        for field, name in names.items():
            if field in expected and expected[field] is not None and have.get(field) != expected[field]:
                a, b = have.get(field), expected[field]
                shown = (f"{str(a)[:12]}... here, {str(b)[:12]}... now" if field.endswith("sha256")
                         else f"{a} here, {b} now")
                fix = ("pass the same --teacher, --data, --holdout and --seq-len it was built with, or another "
                       "--teacher-cache directory")
                raise UsageError(f"--teacher-cache {self.path} was built with another {name} ({shown}); {fix}")

    def load(self) -> "TeacherCache":
        """Read every shard, check its sha256 and layout, and keep the arrays in memory."""
        L, K, dt = self.seq_len, self.k, id_dtype(self.vocab)
        ids = np.empty((self.windows, L, K), dt)
        logp = np.empty((self.windows, L, K), np.float16)
        rest = np.empty((self.windows, L), np.float32)
        G = len(REST_BETAS) if self.version >= 2 else 0
        powers = np.empty((self.windows, L, G), np.float32) if G else None
        at = 0
        for s in self.manifest["shards"]:
            raw = (self.path / s["file"]).read_bytes()
            if len(raw) != s["bytes"] or hashlib.sha256(raw).hexdigest() != s["sha256"]:
                raise _refuse(self.path, f"has a corrupt shard {s['file']} (its sha256 is not the manifest's)")
            n = int(s["windows"])
            try:
                body = zlib.decompress(raw)
            except zlib.error:
                raise _refuse(self.path, f"has a corrupt shard {s['file']} (it does not decompress)") from None
            sizes = (n * L * K * dt.itemsize, n * L * K * 2, n * L * 4, n * L * G * 4)
            if len(body) != sum(sizes):
                raise _refuse(self.path, f"has a shard {s['file']} of the wrong size for its layout")
            a, b, c = sizes[0], sizes[0] + sizes[1], sizes[0] + sizes[1] + sizes[2]
            ids[at:at + n] = np.frombuffer(body[:a], dt).reshape(n, L, K)
            logp[at:at + n] = np.frombuffer(body[a:b], np.float16).reshape(n, L, K)
            rest[at:at + n] = np.frombuffer(body[b:c], np.float32).reshape(n, L)
            if G:
                powers[at:at + n] = np.frombuffer(body[c:], np.float32).reshape(n, L, G)
            at += n
        if int(ids.max(initial=0)) >= self.vocab:
            raise _refuse(self.path, f"holds token ids past its vocabulary of {self.vocab}")
        self.ids, self.logp, self.rest, self.rest_powers = ids, logp, rest, powers
        return self

    def targets(self, rows: torch.Tensor, k: int | None = None) -> Targets:
        """The cached distribution of windows ``rows`` (B,), truncated to the ``k`` most likely
        ids (the rest's mass grows by what is cut) when ``k`` is smaller than the cache's."""
        idx = rows.cpu().numpy()
        ids = torch.from_numpy(self.ids[idx].astype(np.int64))
        logp = torch.from_numpy(self.logp[idx].astype(np.float32))
        rest = torch.from_numpy(self.rest[idx])
        powers = torch.from_numpy(self.rest_powers[idx]) if self.rest_powers is not None else None
        if k is not None and k < self.k:
            cut = logp[..., k:]
            rest = torch.logaddexp(rest, cut.logsumexp(-1)).clamp(min=REMAINDER_FLOOR)
            if powers is not None:
                cut_powers = torch.stack([(cut * b).logsumexp(-1) for b in REST_BETAS], -1)
                powers = torch.logaddexp(powers, cut_powers).clamp(min=REMAINDER_FLOOR)
            ids, logp = ids[..., :k].contiguous(), logp[..., :k].contiguous()
        return Targets(ids, logp, rest, powers)


# --------------------------------------------------------------------------- writing


def build(out: Path, windows: torch.Tensor, teacher: Callable, k: int, vocab: int,
          key: dict, extra: dict, batch: int = 8, on_progress: Callable[[int], None] | None = None,
          files: Callable[[Path], None] | None = None, overwrite: bool = False) -> dict:
    """Write a cache for ``windows`` (N, L+1) into ``out`` (written beside it and renamed when complete;
    an existing ``out`` is replaced only with ``overwrite``). ``teacher(x)`` gives the :func:`top_k`
    tuple for token rows ``x`` (B, L); ``files(tmp)`` adds the tokenizer and config.
    Returns the manifest."""
    import time

    from itera.fsio import atomic_dir

    n, L = windows.shape[0], windows.shape[1] - 1
    if not 1 <= k <= vocab:
        raise UsageError(f"--top-k must be between 1 and the tokenizer's {vocab} tokens (got {k})")
    dt = id_dtype(vocab)
    t0 = time.perf_counter()
    shards: list[dict] = []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        buf: list[tuple[np.ndarray, ...]] = []

        def flush() -> None:
            if not buf:
                return
            ids = np.concatenate([b[0] for b in buf])
            body = (ids.astype(dt).tobytes() + np.concatenate([b[1] for b in buf]).astype(np.float16).tobytes()
                    + np.concatenate([b[2] for b in buf]).astype(np.float32).tobytes()
                    + np.concatenate([b[3] for b in buf]).astype(np.float32).tobytes())
            raw = zlib.compress(body, 1)
            name = f"shard-{len(shards):05d}.bin"
            (tmp / name).write_bytes(raw)
            shards.append({"file": name, "windows": int(ids.shape[0]), "bytes": len(raw),
                           "sha256": hashlib.sha256(raw).hexdigest()})
            buf.clear()

        done = 0
        for i in range(0, n, batch):
            x = windows[i:i + batch, :-1]
            buf.append(tuple(t.cpu().numpy() for t in teacher(x)))
            done += x.shape[0]
            if sum(b[0].shape[0] for b in buf) >= SHARD_WINDOWS:
                flush()
            if on_progress:
                on_progress(done)
        flush()
        seconds = time.perf_counter() - t0
        manifest = {"format": FORMAT, "version": VERSION, "key": key, "top_k": k, "vocab": vocab,
                    "rest_betas": list(REST_BETAS),
                    "layout": {"seq_len": L, "stride": L, "windows": n, "tokens": n * L},
                    "build": {**extra, "seconds": seconds, "teacher_tokens_per_s": n * L / seconds if seconds else None},
                    "shards": shards}
        if files:
            files(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def torch_teacher(model, k: int, vocab: int, chunk: int = 128
                  ) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """:func:`top_k` of a float teacher for token rows (B, L), on the teacher's device, the head applied
    in chunks of positions so that (B, L, V) logits never exist at once."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def targets(x: torch.Tensor):
        h = model(x.to(device), return_hidden=True)
        parts = [top_k(model.lm_head(h[:, i:i + chunk]), k, vocab) for i in range(0, h.shape[1], chunk)]
        return tuple(torch.cat([p[j] for p in parts], 1) for j in range(4))

    return targets


# --------------------------------------------------------------------------- what jobs share


def teacher_sha256(path: Path) -> str:
    """The teacher's content hash: the file's sha256, or a checkpoint directory's manifest digest."""
    from itera.artifacts import digest

    return digest(Path(path))[1]


def true_vocab(tok) -> int:
    """The tokenizer's size as ids go (largest id + 1), not the embedding table's padded rows."""
    return tok.max_id + 1


def key_for(teacher_digest: str | None, tok, train_text: str, holdout: float, text_field: str, seq_len: int) -> dict:
    return {"teacher_sha256": teacher_digest, "tokenizer_sha256": tokenizer_sha256(tok),
            "data_sha256": text_sha256(train_text), "holdout": holdout, "text_field": text_field, "seq_len": seq_len}


def build_cache(out: Path, source: Callable, runtime: str, teacher_path: Path, tok, train_ids: torch.Tensor,
                key: dict, k: int, seq_len: int, batch: int, device: str, reporter=None, overwrite: bool = False,
                tokenizer_dir: Path | None = None, config_from: Path | None = None) -> dict:
    """Run ``source`` (:func:`torch_teacher`, or a job's own runtime) over ``train_ids``' windows and
    write the cache with the tokenizer (copied from ``tokenizer_dir``, else saved) and the teacher's
    config.json (from ``config_from``); returns the manifest."""
    import shutil

    from itera.progress import SILENT

    reporter = reporter or SILENT
    windows = window_grid(train_ids, seq_len)
    vocab = true_vocab(tok)
    if k > vocab:
        raise UsageError(f"--top-k {k} is more than the tokenizer's {vocab} tokens")

    def files(tmp: Path) -> None:
        from itera.model.checkpoint import TOKENIZER_FILES

        (tmp / "tokenizer").mkdir()
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, tmp / "tokenizer" / name)
        else:
            tok.save(tmp / "tokenizer")
        if config_from is not None and (config_from / "config.json").is_file():
            shutil.copyfile(config_from / "config.json", tmp / "config.json")

    task = reporter.task("teacher cache (windows)", total=windows.shape[0])
    try:
        return build(out, windows, source, k, vocab, key,
                     {"runtime": runtime, "teacher": str(teacher_path), "device": device},
                     batch=batch, on_progress=task.update, files=files, overwrite=overwrite)
    finally:
        task.close()


def summary(manifest: dict, path: Path, hit: bool) -> dict:
    """The record's figures of a cache: what it holds, its size and what building it cost."""
    lay, b = manifest["layout"], manifest["build"]
    size = sum(s["bytes"] for s in manifest["shards"])
    return {"path": str(path), "hit": hit, "top_k": manifest["top_k"], "vocab": manifest["vocab"],
            "windows": lay["windows"], "tokens": lay["tokens"], "bytes": size,
            "bytes_per_token": size / lay["tokens"], "build_seconds": b["seconds"],
            "teacher_tokens_per_s": b["teacher_tokens_per_s"], "runtime": b["runtime"]}


