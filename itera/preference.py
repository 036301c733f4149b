"""Preference pairs for DPO: strict reading of pairs files, and conversion of user feedback.

Pairs file (``--pairs``): JSONL, one ``{"prompt", "chosen", "rejected"}`` object per line.
Any malformed line is an error naming the file and line (nothing is trained).

A pair or event may say ``"chat": true``: its prompt is a rendered chat template, whose special-token
strings (``<|im_start|>``, ``<s>``) are tokenized as the special tokens they name, as ``itera serve``
tokenized it (the feedback store marks its chat requests so). Otherwise a prompt is plain text.

Feedback file (``--feedback``): JSONL events, each with a ``type``:

- ``{"type": "thumbs", "prompt", "response", "vote": "up"|"down"}``: every up-voted response to a
  prompt beats every down-voted response to the same prompt;
- ``{"type": "ab", "prompt", "a", "b", "winner": "a"|"b"}``: the winner beats the other;
- ``{"type": "correction", "prompt", "response", "corrected"}``: the edit beats the original;
- ``{"type": "rating", "prompt", "response", "rating": number}``: between responses to the same
  prompt, the higher rating beats the lower when they differ by at least ``min_rating_gap``.

Malformed JSON is still an error; events that are well-formed JSON but unusable (unknown type,
missing fields, identical responses) and pairs that contradict each other or repeat are dropped
and counted with their reason.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from itera.data import is_text
from itera.errors import DataError


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    chat: bool = False  # the prompt is a rendered chat template (special-token strings are tokens)

    def as_dict(self) -> dict:
        d = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        return {**d, "chat": True} if self.chat else d


def _lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; strict about encoding and JSON."""
    from itera.fsio import check_input_file

    path = Path(path)
    check_input_file(path, fix="pass a JSONL file", error=DataError)
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raise DataError(f"{path}:1: the file starts with a UTF-8 byte-order mark; save it as UTF-8 without BOM")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            last = i == len(lines) and not text.endswith("\n")
            what = "is truncated (the last line ends mid-object)" if last else "is not valid JSON"
            raise DataError(f"{path}:{i}: the line {what}; each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        if not is_text(obj):
            raise DataError(f"{path}:{i}: a string holds a lone surrogate (an unpaired \\uD800-\\uDFFF escape), "
                            "which is not text; fix the line")
        out.append((i, obj))
    if not out:
        raise DataError(f"{path} holds no lines; pass a JSONL file with at least one object")
    return out


def read_pairs(path: Path) -> list[Pair]:
    pairs = []
    for i, obj in _lines(path):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{path}:{i}: missing \"{key}\" (a string); each line needs prompt, chosen and rejected")
        if obj["chosen"] == obj["rejected"]:
            raise DataError(f"{path}:{i}: chosen and rejected are identical; a pair must prefer one response over another")
        pairs.append(Pair(obj["prompt"], obj["chosen"], obj["rejected"], _chat(obj, f"{path}:{i}")))
    return pairs


def pairs_from_feedback(path: Path, min_rating_gap: float = 1.0) -> tuple[list[Pair], dict[str, int]]:
    """Pairs derived from the feedback events of a JSONL file, and {reason: count} of what was dropped."""
    return pairs_from_events((ev for _, ev in _lines(path)), min_rating_gap)


def _finite(v) -> float | None:
    """``v`` as a finite float, or None when it is not a number (bools, NaN and Infinity included)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _chat_flag(obj: dict) -> bool | None:
    """The ``"chat"`` field: absent or null is plain text; None when it is not a boolean."""
    chat = False if obj.get("chat") is None else obj["chat"]
    return chat if isinstance(chat, bool) else None


def _chat(obj: dict, where: str) -> bool:
    chat = _chat_flag(obj)
    if chat is None:
        raise DataError(f"{where}: \"chat\" is {json.dumps(obj['chat'])}; it must be true (the prompt is a rendered "
                        "chat template) or false")
    return chat


class _Collected:
    """Feedback events sorted by what they say: direct pairs, votes and ratings per prompt."""

    def __init__(self):
        self.dropped: Counter = Counter()
        self.pairs: list[Pair] = []
        # keyed by (prompt, chat): the same text as a chat template and as plain text are two prompts
        self.votes: dict[tuple, dict[str, set]] = defaultdict(lambda: {"up": set(), "down": set()})
        self.ratings: dict[tuple, list[tuple[float, str]]] = defaultdict(list)

    def _need(self, ev: dict, *keys: str) -> bool:
        ok = all(isinstance(ev.get(k), str) for k in keys)
        if not ok:
            self.dropped[f"{ev.get('type')}: missing field"] += 1
        return ok

    def add(self, ev: dict) -> None:
        kind = ev.get("type")
        chat = _chat_flag(ev)
        if chat is None:
            self.dropped["chat is not true or false"] += 1
            return
        if kind == "thumbs" and self._need(ev, "prompt", "response"):
            if ev.get("vote") not in ("up", "down"):
                self.dropped["thumbs: vote is not up or down"] += 1
            else:
                self.votes[ev["prompt"], chat][ev["vote"]].add(ev["response"])
        elif kind == "ab" and self._need(ev, "prompt", "a", "b"):
            if ev.get("winner") not in ("a", "b"):
                self.dropped["ab: winner is not a or b"] += 1
            else:
                win, lose = (ev["a"], ev["b"]) if ev["winner"] == "a" else (ev["b"], ev["a"])
                self.pairs.append(Pair(ev["prompt"], win, lose, chat))
        elif kind == "correction" and self._need(ev, "prompt", "response", "corrected"):
            self.pairs.append(Pair(ev["prompt"], ev["corrected"], ev["response"], chat))
        elif kind == "rating" and self._need(ev, "prompt", "response"):
            r = _finite(ev.get("rating"))
            if r is None:  # not a number, NaN or Infinity (which JSON does not have), or beyond a float
                self.dropped["rating: rating is not a number"] += 1
            else:
                self.ratings[ev["prompt"], chat].append((r, ev["response"]))
        elif kind not in ("thumbs", "ab", "correction", "rating"):
            self.dropped["unknown event type"] += 1

    def vote_pairs(self) -> list[Pair]:
        """Every up-voted response beats every down-voted one to the same prompt."""
        out = []
        for (prompt, chat), v in self.votes.items():
            both = v["up"] & v["down"]
            if both:
                self.dropped["thumbs: same response voted up and down"] += len(both)
            ups, downs = v["up"] - both, v["down"] - both
            if not (ups and downs):
                self.dropped["thumbs: no opposite vote for the same prompt"] += len(ups) + len(downs)
            out += [Pair(prompt, u, d, chat) for u in sorted(ups) for d in sorted(downs)]
        return out

    def rating_pairs(self, min_gap: float) -> list[Pair]:
        """Between responses to the same prompt, the higher rating wins by at least ``min_gap``."""
        out = []
        for (prompt, chat), rs in self.ratings.items():
            paired = set()
            for hi_r, hi in rs:
                for lo_r, lo in rs:
                    if hi_r - lo_r >= min_gap and hi != lo:
                        out.append(Pair(prompt, hi, lo, chat))
                        paired |= {hi, lo}
            unpaired = len({resp for _, resp in rs} - paired)
            if unpaired:
                self.dropped["rating: no response to compare with by the rating gap"] += unpaired
        return out


def pairs_from_events(events: Iterable[dict], min_rating_gap: float = 1.0) -> tuple[list[Pair], dict[str, int]]:
    """Pairs from feedback events (dicts as in a feedback file), and {reason: count} of what was dropped:
    identical responses, pairs that contradict each other, and repeats are dropped last."""
    c = _Collected()
    for ev in events:
        c.add(ev)
    raw = c.pairs + c.vote_pairs() + c.rating_pairs(min_rating_gap)
    out, seen = [], set()
    keys = Counter(raw)
    for p in raw:
        if p.chosen == p.rejected:
            c.dropped["chosen and rejected identical"] += 1
        elif Pair(p.prompt, p.rejected, p.chosen, p.chat) in keys:
            c.dropped["contradicts another event"] += 1
        elif p in seen:
            c.dropped["duplicate"] += 1
        else:
            seen.add(p)
            out.append(p)
    return out, dict(c.dropped)
