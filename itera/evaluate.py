"""Perplexity and bits per byte with a sliding window (the protocol of ``itera evaluate``).

The text is tokenized without special tokens, optionally a BOS token is put in front, and the
stream is cut to ``max_tokens``. The first window covers tokens [0, window) and scores every
token that has a predecessor; each next window ends ``stride`` tokens later, is at most
``window`` tokens long and scores only its last ``stride`` tokens (the final one may score
fewer). So every token after the first is scored exactly once, with up to ``window - 1``
tokens of context.

    perplexity    = exp(sum(nll) / tokens_scored)
    bits_per_byte = sum(nll) / ln(2) / utf8_bytes(evaluated text)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from itera.errors import DataError, UsageError
from itera.progress import SILENT, Reporter
from itera.record import Outcome

PROTOCOL = ("tokenize without special tokens; optional BOS in front; cut to max_tokens; "
            "windows of `window` tokens advancing by `stride`, each scoring only its last `stride` "
            "tokens (the first window scores all tokens after the first); "
            "ppl = exp(mean nll); bpb = sum nll / ln 2 / UTF-8 bytes")


DEFAULT_WINDOW = 512


@dataclass
class EvalOptions:
    """How text is scored; recorded in the record's ``params``.

    ``window`` defaults to 512 or the model's context if that is shorter; ``stride`` to half
    the window. :meth:`resolve` fills both in once the model's context is known.
    """

    window: int | None = None  # tokens of context + target per forward pass
    stride: int | None = None  # how far each window advances; tokens scored per window after the first
    max_tokens: int | None = None  # cut the token stream to this length (BOS included)
    bos: bool | None = None  # put BOS in front; None means the tokenizer's add_bos_token

    def validate(self) -> "EvalOptions":
        """Check what was given; cheap, so commands call it before touching the model."""
        if self.window is not None and self.window < 2:
            raise UsageError(f"--window must be at least 2 (got {self.window})")
        if self.stride is not None and (self.stride < 1 or (self.window is not None and self.stride >= self.window)):
            raise UsageError(f"--stride must be at least 1 and smaller than --window {self.window} (got {self.stride})")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise UsageError(f"--max-tokens must be at least 2 (got {self.max_tokens})")
        return self

    def resolve(self, max_context: int | None = None) -> "EvalOptions":
        """Concrete window and stride for a model whose context is ``max_context`` tokens."""
        self.validate()
        if self.window is not None and max_context is not None and self.window > max_context:
            raise UsageError(f"--window {self.window} exceeds the model's max_position_embeddings "
                             f"({max_context}); pass --window {max_context} or less")
        window = self.window or min(DEFAULT_WINDOW, max_context or DEFAULT_WINDOW)
        stride = self.stride or max(1, window // 2)
        return EvalOptions(window=window, stride=stride, max_tokens=self.max_tokens, bos=self.bos).validate()

    def as_params(self) -> dict:
        return {**asdict(self), "protocol": PROTOCOL}


def windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, n_score) for each forward pass over a stream of ``n`` tokens."""
    end = min(window, n)
    yield 0, end, end - 1
    prev_end = end
    while prev_end < n:
        end = min(prev_end + stride, n)
        yield max(0, end - window), end, end - prev_end
        prev_end = end


def resolve_bos(tokenizer, opts: EvalOptions) -> bool:
    """Whether BOS goes in front: the option if given, else the tokenizer's ``add_bos_token``."""
    bos = tokenizer.add_bos if opts.bos is None else opts.bos
    if bos and tokenizer.bos_id is None:
        raise UsageError("the tokenizer defines no BOS token; pass --no-bos")
    return bool(bos)


def evaluate_text(runtime, text: str, opts: EvalOptions, source: str = "text",
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Score ``text`` with ``runtime``; returns the per-dataset metrics of the record."""
    opts = opts.resolve(runtime.max_context)
    tok = runtime.tokenizer
    ids, offsets = tok.encode_with_offsets(text)
    bos = resolve_bos(tok, opts)
    if bos:
        ids = [tok.bos_id] + ids
    n_bytes = len(text.encode("utf-8"))
    if opts.max_tokens is not None and len(ids) > opts.max_tokens:
        ids = ids[: opts.max_tokens]
        kept = opts.max_tokens - int(bos)  # real tokens kept; their text ends at the last one's offset
        n_bytes = len(text[: offsets[kept - 1][1]].encode("utf-8")) if kept > 0 else 0
    if len(ids) < 2 or n_bytes == 0:
        raise DataError(f"{source} gives {len(ids)} token(s); at least 2 are needed to score anything")
    plan = list(windows(len(ids), opts.window, opts.stride))
    total_nll, scored = 0.0, 0
    t0 = time.perf_counter()
    for i, (begin, end, n_score) in enumerate(plan):
        nll = runtime.nll(ids[begin:end], n_score)
        total_nll += math.fsum(nll)
        scored += n_score
        if progress:
            progress(i + 1, len(plan))
    seconds = time.perf_counter() - t0
    assert scored == len(ids) - 1
    return {
        "perplexity": math.exp(total_nll / scored),
        "bits_per_byte": total_nll / math.log(2) / n_bytes,
        "tokens": scored,
        "bytes": n_bytes,
        "tokens_per_s": scored / seconds,
        "nll_sum": total_nll,
        "windows": len(plan),
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- the job


@dataclass
class EvaluateOptions:
    """What ``itera evaluate`` was asked: a model, datasets, and the scoring protocol."""

    model: Path
    datasets: list[str]
    protocol: EvalOptions = field(default_factory=EvalOptions)
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    text_field: str = "text"

    def inputs(self) -> list[Path]:
        from itera.data import local_path

        return [self.model, *(p for p in map(local_path, self.datasets) if p is not None)]

    def outputs(self) -> list:
        return []

    def validate(self) -> "EvaluateOptions":
        self.protocol.validate()
        if not self.datasets:
            raise UsageError("pass at least one --dataset")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {self.threads})")
        return self


def run_evaluate(opts: EvaluateOptions, reporter: Reporter = SILENT) -> Outcome:
    """Cheap checks of the model, then the data, then the expensive load; score every dataset.

    Figures are keyed by the dataset's canonical name (:func:`itera.data.canonical`); what was
    typed is kept in params."""
    from itera.data import canonical, load_text
    from itera.model.checkpoint import load_checked_config
    from itera.runtime import check_model_path, describe, open_runtime, resolve_device

    opts.validate()
    fmt = check_model_path(opts.model)
    if fmt == "checkpoint":
        opts.protocol.resolve(load_checked_config(opts.model)[0].max_position_embeddings)
        opts.device = resolve_device(opts.device)
    else:
        if opts.dtype != "float32":
            raise UsageError(f"--dtype {opts.dtype} applies to checkpoints run in torch; a .{fmt} file runs in "
                             "the types it was exported with (drop --dtype)")
        if opts.device not in ("cpu", "auto"):
            raise UsageError(f"--device {opts.device} applies to checkpoints run in torch; itera runs .{fmt} files "
                             "on the CPU (drop --device)")
        opts.device = "cpu"
    typed = {}
    for spec in opts.datasets:
        typed.setdefault(canonical(spec), spec)
    sources = {key: load_text(spec, purpose="eval", field=opts.text_field) for key, spec in typed.items()}
    results, protocol = {}, None
    if fmt == "gguf":  # llama.cpp's buffers are sized for the window, not for what the file declares
        from itera.runtime.llamacpp_backend import context_length

        protocol = opts.protocol.resolve(context_length(opts.model))
    with open_runtime(opts.model, dtype=opts.dtype, device=opts.device, threads=opts.threads,
                      n_ctx=protocol.window if protocol else 0) as rt:
        protocol = protocol or opts.protocol.resolve(rt.max_context)
        used_bos = resolve_bos(rt.tokenizer, protocol)
        for key, src in sources.items():
            task = reporter.task(f"evaluate {typed[key]}", unit="windows")
            try:
                results[key] = evaluate_text(rt, src.text, protocol, source=typed[key],
                                             progress=lambda done, total, t=task: t.update(done))
            finally:
                task.close()
        runtime = rt.name
        threads = _threads_used(rt, opts.threads)
    params = {**protocol.as_params(), "bos": used_bos, "model": str(opts.model), "runtime": runtime,
              "dtype": opts.dtype if fmt == "checkpoint" else None, "device": opts.device, "threads": threads,
              "datasets": {key: src.description for key, src in sources.items()},
              "datasets_typed": {key: typed[key] for key in sources}}
    return Outcome(describe(opts.model), {"datasets": results}, params, device=opts.device)


def _threads_used(rt, asked: int | None) -> int:
    """The CPU threads the runtime computed with (its default when none were asked for)."""
    if asked:
        return asked
    if rt.name == "torch":
        import torch

        return torch.get_num_threads()
    return getattr(rt, "threads", None) or len(os.sched_getaffinity(0))
