"""Decoding on top of a :class:`~itera.runtime.base.Stepper`: greedy or sampled (temperature,
top-p, a seeded generator), stop strings, a token budget, and text that streams token by token
without ever cutting a UTF-8 character in half.

- :class:`SamplingParams` — what to generate; validates itself.
- :class:`Sampler` — one token from next-token logits. Temperature 0 is the argmax, the same
  choice as ``Stepper.prefill``/``step``, so greedy text here equals ``itera.runtime.base.greedy``.
- :class:`Detokenizer` — the text of generated ids as it becomes final. A byte-level or
  byte-fallback tokenizer can split one character over several tokens; the decoded text then ends
  in U+FFFD until the rest arrives, and nothing is emitted until it does (the window method of
  Hugging Face's ``TextStreamer`` and vLLM's incremental detokenizer, with ``decode`` as the only
  tokenizer call so that llama.cpp's and ``tokenizers``' tokenizers both work).
- :class:`StopStrings` — cuts the text before the first stop string and holds back a tail that
  could still become one, so streamed text never shows part of a stop string.
- :class:`Generation` — iterate it for text deltas; afterwards it holds the text, the tokens and
  why it finished (``stop``: an end-of-sequence token or a stop string; ``length``: the budget;
  ``cancelled``: the caller's ``cancelled()`` said so).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from itera.errors import UsageError
from itera.runtime.base import Stepper

MAX_STOP_STRINGS = 4  # as OpenAI's API


@dataclass(frozen=True)
class SamplingParams:
    """``max_tokens`` new tokens at most; ``temperature`` 0 is greedy; ``top_p`` < 1 samples from
    the smallest set of tokens whose probabilities add up to it (nucleus sampling, Holtzman et
    al. 2019); ``seed`` makes sampling repeatable (None: fresh entropy); ``stop`` strings end the
    text before them."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UsageError(f"max_tokens must be a whole number of at least 1 (got {self.max_tokens!r})")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and 0 <= self.temperature <= 2):
            raise UsageError(f"temperature must be between 0 and 2 (got {self.temperature!r})")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise UsageError(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise UsageError(f"seed must be a non-negative whole number (got {self.seed!r})")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
            raise UsageError(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings (got {self.stop!r})")
        object.__setattr__(self, "stop", stop)


class Sampler:
    """Picks the next token from (vocab,) logits: the argmax at temperature 0, else a draw from
    softmax(logits / T), restricted to the top-p nucleus, with a generator seeded once."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None):
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.rng = np.random.default_rng(seed)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a draw comes from (float64, sums to 1), nucleus applied."""
        x = np.asarray(logits, dtype=np.float64) / self.temperature
        p = np.exp(x - x.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")  # ties keep the lower id first
            cum = np.cumsum(p[order])
            k = int(np.searchsorted(cum, self.top_p)) + 1  # the smallest prefix reaching top_p
            q = np.zeros_like(p)
            q[order[:k]] = p[order[:k]]
            p = q / q.sum()
        return p

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        cdf = np.cumsum(self.probabilities(logits))
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(cdf) - 1))


class Detokenizer:
    """Text of a growing list of token ids, released only when it is final.

    ``push(id)`` returns the new text (often ""); ``flush()`` returns what is left at the end,
    an incomplete character included (as ``decode`` renders it). The deltas add up to
    ``decode(all ids)`` for any tokenizer whose decoding of a sequence starts with the decoding
    of its prefix once that prefix ends on a whole character."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already released
        self.read = 0

    def _pending(self) -> tuple[str, str]:
        return self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        done, now = self._pending()
        if len(now) > len(done) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(done):]
        return ""

    def flush(self) -> str:
        done, now = self._pending()
        self.prefix = self.read = len(self.ids)
        return now[len(done):] if len(now) > len(done) else ""


class StopStrings:
    """Text in, text out, cut before the first stop string; a tail that is the start of a stop
    string is held back until it is known not to be one."""

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False
        self.matched: str | None = None  # the stop string that ended the text (the earliest in it)

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        buf = self.held + text
        found = [(i, -len(s), s) for s in self.stops for i in (buf.find(s),) if i >= 0]
        if found:
            at, _, self.matched = min(found)  # the earliest; of two there, the longer
            self.hit, self.held = True, ""
            return buf[:at]
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.hit else self.held), ""
        return out


@dataclass
class Generation:
    """One generation on a stepper. Iterate it for text deltas (non-empty strings); afterwards
    ``text``, ``tokens`` (generated ids, without the end-of-sequence token), ``finish_reason``
    and ``first_token_s`` (seconds from the start to the first sampled token; None when it was
    cancelled before it started) are set.

    ``prompt`` must leave room for ``params.max_tokens`` in the model's context: the caller
    checks that, since only it knows the context."""

    stepper: Stepper
    decode: Callable[[list[int]], str]
    prompt: Sequence[int]
    params: SamplingParams
    eos_ids: frozenset = frozenset()
    cancelled: Callable[[], bool] = lambda: False
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    end_token: int | None = None  # the end-of-sequence id that ended it (None: cut, a stop string, cancelled)
    end_text: str | None = None  # the stop string that ended it (None: cut, an end-of-sequence id, cancelled)
    first_token_s: float | None = None

    def __iter__(self) -> Iterator[str]:
        p = self.params
        sample = Sampler(p.temperature, p.top_p, p.seed)
        detok, stops = Detokenizer(self.decode), StopStrings(p.stop)
        if self.cancelled():  # e.g. its client left while it waited for a slot: no work at all
            self.finish_reason = "cancelled"
            return
        t0 = time.perf_counter()
        logits = self.stepper.prefill_logits(list(self.prompt))
        reason = "length"
        while True:
            tok = sample(logits)
            if self.first_token_s is None:
                self.first_token_s = time.perf_counter() - t0
            if tok in self.eos_ids:
                reason, self.end_token = "stop", int(tok)
                break
            self.tokens.append(tok)
            delta = stops.feed(detok.push(tok))
            if delta:
                self.text += delta
                yield delta
            if stops.hit:
                reason = "stop"
                break
            if len(self.tokens) >= p.max_tokens:
                break
            if self.cancelled():
                reason = "cancelled"
                break
            logits = self.stepper.step_logits(tok)
        tail = stops.feed(detok.flush())
        tail += stops.flush()
        if stops.hit:
            reason, self.end_text = "stop", stops.matched
        self.finish_reason = reason
        if tail:
            self.text += tail
            yield tail
