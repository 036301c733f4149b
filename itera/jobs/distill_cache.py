"""``itera distill cache``: one pass of a teacher over the training token stream, kept as its
top-K distribution at every position (:mod:`itera.teacher_cache`) for any number of students.

The teacher is a float checkpoint (run through torch) or a GGUF file (run through llama.cpp, the
runtime that ships it); a GGUF teacher needs ``--tokenizer``, the tokenizer the students will
share, and is checked to tokenize the training text exactly as that tokenizer does.
``itera distill --teacher-cache DIR`` uses the same functions to build a missing cache on the
way, and to check an existing one against the run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from itera.errors import DataError, InputError, UsageError
from itera.options import flag
from itera.progress import SILENT, Reporter
from itera.record import Outcome
from itera.teacher_cache import DEFAULT_TOP_K, true_vocab


@dataclass
class CacheOptions:
    """Everything ``itera distill cache`` was asked to do."""

    teacher: Path = flag("--teacher")
    data: str = flag("--data")
    out: Path = flag("--out")
    top_k: int = flag("--top-k", default=DEFAULT_TOP_K)
    seq_len: int = flag("--seq-len", default=128)
    holdout: float = flag("--holdout", default=0.05)
    text_field: str = flag("--text-field", default="text")
    tokenizer: Path | None = flag("--tokenizer", default=None)  # a GGUF teacher's tokenizer (file or directory)
    batch_size: int = flag("--batch-size", default=8)  # windows per teacher forward pass
    device: str = flag("--device", default="cpu", cli_default="auto",
                       why="the CLI resolves auto (cuda when available) for its process and sets the field")
    threads: int | None = flag("--threads", default=None)
    force: bool = flag("--force", default=False)

    def validate(self) -> "CacheOptions":
        if self.top_k < 1:
            raise UsageError(f"--top-k must be at least 1 (got {self.top_k})")
        if self.seq_len < 1 or self.batch_size < 1:
            raise UsageError("--seq-len and --batch-size must be at least 1")
        if not 0 < self.holdout < 0.5:
            raise UsageError(f"--holdout must be between 0 and 0.5 (got {self.holdout})")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {self.threads})")
        if is_gguf(self.teacher) and self.tokenizer is None:
            raise UsageError(f"a GGUF teacher ({self.teacher}) needs --tokenizer: the tokenizer.json (or checkpoint "
                             "directory) of the model it was made from, which the students will share")
        return self

    def inputs(self) -> list[Path]:
        from itera.data import local_path

        return [p for p in (self.teacher, local_path(self.data), self.tokenizer) if p is not None]

    def outputs(self) -> list:
        from itera.fsio import Output

        return [Output(self.out, "dir", "--out", self.force)]

    def as_params(self) -> dict:
        d = asdict(self)
        for k in ("teacher", "out", "tokenizer"):
            d[k] = str(d[k]) if d[k] is not None else None
        return d


def is_gguf(path: Path | None) -> bool:
    if path is None:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        return False


def check_gguf_tokenizer(rt, tok, text: str, where: Path) -> None:
    """The GGUF's own tokenizer must split ``text`` into the same ids as the students' tokenizer."""
    sample = text[:4000]
    ours, theirs = tok.encode(sample, add_bos=False), rt.tokenizer.encode(sample, add_bos=False)
    n_vocab = rt.llm.n_vocab()
    if n_vocab < true_vocab(tok) or ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        why = (f"it has {n_vocab} tokens and --tokenizer {true_vocab(tok)}" if n_vocab < true_vocab(tok)
               else f"they split the training text differently from token {at}")
        raise UsageError(f"the GGUF teacher {where} does not share --tokenizer's vocabulary ({why}); pass the "
                         "tokenizer of the model the GGUF was made from")


def gguf_teacher(rt, k: int, vocab: int):
    """:func:`itera.teacher_cache.top_k` of a GGUF teacher through llama.cpp, one window at a time."""
    from itera.teacher_cache import top_k

    def targets(x: torch.Tensor):
        parts = [top_k(torch.from_numpy(rt.logits(row.tolist())), k, vocab) for row in x]
        return tuple(torch.stack([p[j] for p in parts]) for j in range(4))

    return targets


def _tokenizer_source(opts: CacheOptions) -> tuple[object, Path | None]:
    """(tokenizer, directory its files are copied from) for the teacher."""
    from itera.tokenizer import Tokenizer

    if opts.tokenizer is not None:
        p = Path(opts.tokenizer)
        return (Tokenizer.from_dir(p), p) if p.is_dir() else (Tokenizer.from_path(p), None)
    return Tokenizer.from_dir(opts.teacher), Path(opts.teacher)


def run_cache(opts: CacheOptions, reporter: Reporter = SILENT) -> Outcome:
    """Check everything cheap, then run the teacher once and write the cache."""
    from itera.artifacts import describe_artifact
    from itera.data import load_text, split_heldout
    from itera.teacher_cache import build_cache, key_for, summary, teacher_sha256, torch_teacher

    opts.validate()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    gguf = is_gguf(opts.teacher)
    if not gguf and not (Path(opts.teacher) / "config.json").is_file():
        raise InputError(f"--teacher {opts.teacher} is neither a checkpoint directory (no config.json) nor a GGUF "
                         "file")
    tok, tok_dir = _tokenizer_source(opts)
    model = None
    if not gguf:
        from itera.model.checkpoint import load_checked_config

        cfg, _ = load_checked_config(opts.teacher)
        tok.check_fits(cfg.vocab_size, str(opts.teacher))
    src = load_text(opts.data, purpose="train", field=opts.text_field)
    train_text, _ = split_heldout(src.text, opts.holdout)
    ids = torch.tensor(tok.encode(train_text, add_bos=False), dtype=torch.long)
    if ids.numel() < opts.seq_len + 1:
        raise DataError(f"{opts.data} gives {ids.numel()} training tokens; at least --seq-len + 1 = "
                        f"{opts.seq_len + 1} are needed (pass more text or a smaller --seq-len)")
    if opts.top_k > true_vocab(tok):
        raise UsageError(f"--top-k {opts.top_k} is more than the tokenizer's {true_vocab(tok)} tokens")
    key = key_for(teacher_sha256(opts.teacher), tok, train_text, opts.holdout, opts.text_field, opts.seq_len)
    if not gguf:
        from itera.model.checkpoint import load_model

        model, _ = load_model(opts.teacher, device=opts.device)
        model.requires_grad_(False)
    rt = None
    try:
        if gguf:
            from itera.runtime.llamacpp_backend import LlamaCppRuntime

            rt = LlamaCppRuntime(opts.teacher, threads=opts.threads, n_ctx=opts.seq_len + 8)
            check_gguf_tokenizer(rt, tok, tok.decode(ids[:2000].tolist()), opts.teacher)
            source, runtime = gguf_teacher(rt, opts.top_k, true_vocab(tok)), "llama.cpp"
        else:
            source, runtime = torch_teacher(model, opts.top_k, true_vocab(tok)), "torch"
        reporter.log(f"data: {src.description}: {ids.numel():,} training tokens in "
                     f"{(ids.numel() - 1) // opts.seq_len:,} windows of {opts.seq_len}; teacher through {runtime}, "
                     f"top {opts.top_k}")
        manifest = build_cache(opts.out, source, runtime, opts.teacher, tok, ids, key, opts.top_k, opts.seq_len,
                               opts.batch_size, "cpu" if gguf else opts.device, reporter, overwrite=opts.force,
                               tokenizer_dir=tok_dir, config_from=None if gguf else Path(opts.teacher))
    finally:
        if rt is not None:
            rt.close()
    metrics = summary(manifest, opts.out, hit=False)
    metrics.pop("hit")
    artifact = describe_artifact(opts.out, "teacher-cache", "itera-teacher-cache")
    return Outcome(artifact, metrics, {**opts.as_params(), "threads": torch.get_num_threads()}, device=opts.device)
