"""Perplexity and bits per byte with a sliding window: the scoring protocol ``itera evaluate``
and ``itera quantize`` share.

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
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from itera.errors import DataError, UsageError
from itera.options import flag

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

    window: int | None = flag("--window", default=None)  # tokens of context + target per forward pass
    # how far each window advances; tokens scored per window after the first
    stride: int | None = flag("--stride", default=None)
    max_tokens: int | None = flag("--max-tokens", default=None)  # cut the token stream to this length (BOS included)
    bos: bool | None = flag("--bos", default=None)  # put BOS in front; None means the tokenizer's add_bos_token

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
