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

Unpaired feedback (KTO, Ethayarajh et al. 2024): :func:`examples_from_events` also gives
:class:`Single` examples, one response judged desirable or undesirable on its own. With
``mode="kto"`` every event becomes singles (a pair's winner desirable, its loser undesirable);
with ``mode="auto"`` the pairs are kept as pairs and only what no pair uses (a thumbs with no
opposite vote on its prompt, a rating with none to compare by the gap) becomes a single, a rating
by ``rating_threshold``: above it desirable, below it undesirable, at it neutral (dropped).

End of turn: an event's ``finish_reason`` (``"stop"``: the model ended the response itself) and
``end_token`` (the id that ended it, when known) say whether the response's end-of-turn token is
scored. A response that a stop string ended (``end_text``, the string) is scored with that string's
tokens after it: ending there is what the model did, and a preference for answers that end where
they should is learnt from it. A response cut at ``max_tokens`` (``"length"``) is scored without an
end; a correction, a text a person wrote whole, ends. ``Pair.chosen_end``/``rejected_end`` and
``Single.end`` hold the id, ``EOS`` (the tokenizer's end-of-sequence id), the stop string, or None.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from itera.data import is_text
from itera.errors import DataError


EOS = -1  # an end marker meaning "the tokenizer's end-of-sequence id"


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    chat: bool = False  # the prompt is a rendered chat template (special-token strings are tokens)
    chosen_end: int | str | None = None  # the end scored after the response: an id, EOS, a stop string; None: cut
    rejected_end: int | str | None = None

    def as_dict(self) -> dict:
        d = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.chosen_end is not None or self.rejected_end is not None:
            d.update(chosen_end=self.chosen_end, rejected_end=self.rejected_end)
        return {**d, "chat": True} if self.chat else d


@dataclass(frozen=True)
class Single:
    """One response judged on its own (KTO): desirable (a thumbs up, a rating above the threshold,
    a pair's winner) or not."""

    prompt: str
    response: str
    desirable: bool
    chat: bool = False
    end: int | str | None = None

    def as_dict(self) -> dict:
        d = {"prompt": self.prompt, "response": self.response, "desirable": self.desirable}
        if self.end is not None:
            d["end"] = self.end
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
    return [_pair(obj, f"{path}:{i}") for i, obj in _lines(path)]


def _pair(obj: dict, where: str) -> Pair:
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(obj.get(key), str):
            raise DataError(f"{where}: missing \"{key}\" (a string); each line needs prompt, chosen and rejected")
    if obj["chosen"] == obj["rejected"]:
        raise DataError(f"{where}: chosen and rejected are identical; a pair must prefer one response over another")
    ends = [_end_field(obj, k, where) for k in ("chosen_end", "rejected_end")]
    return Pair(obj["prompt"], obj["chosen"], obj["rejected"], _chat(obj, where), *ends)


def _end_field(obj: dict, key: str, where: str) -> int | str | None:
    v = obj.get(key)
    if v is None or (isinstance(v, str) and v):
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < EOS:
        raise DataError(f"{where}: \"{key}\" is {json.dumps(v)}; it must be a token id, -1 (the tokenizer's "
                        "end-of-sequence), the stop string that ended the response, or null (it was cut)")
    return v


def _end(ev: dict, prefix: str = "") -> int | str | None:
    """The end marker of an event's response (``prefix`` ``a_``/``b_`` for an A/B vote's two):
    ``finish_reason`` "stop" ends it with ``end_token`` when that is an id; else with ``end_text``,
    the stop string that ended it, when there is one; else with nothing when ``end_token`` is
    present and null (a stop string ended it, not known which), or with the tokenizer's EOS
    (``end_token`` -1 or absent). Anything else was cut."""
    if ev.get(f"{prefix}finish_reason") != "stop":
        return None
    key, tok, text = f"{prefix}end_token", ev.get(f"{prefix}end_token"), ev.get(f"{prefix}end_text")
    if isinstance(tok, int) and not isinstance(tok, bool) and tok >= 0:
        return tok
    if isinstance(text, str) and text:
        return text
    return None if key in ev and tok is None else EOS


def read_examples(path: Path) -> tuple[list[Pair], list[Single]]:
    """A pairs file that may also hold responses judged alone (``{"prompt", "response",
    "desirable": true|false}`` lines, as ``--save-pairs`` writes them): (pairs, singles)."""
    pairs, singles = [], []
    for i, obj in _lines(path):
        where = f"{path}:{i}"
        if "desirable" in obj and "chosen" not in obj:
            if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("response"), str):
                raise DataError(f"{where}: a judged response needs \"prompt\" and \"response\" (strings)")
            if not isinstance(obj["desirable"], bool):
                raise DataError(f"{where}: \"desirable\" is {json.dumps(obj['desirable'])}; it must be true or false")
            singles.append(Single(obj["prompt"], obj["response"], obj["desirable"], _chat(obj, where),
                                  _end_field(obj, "end", where)))
            continue
        pairs.append(_pair(obj, where))
    return pairs, singles


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
        # keyed by (prompt, chat): the same text as a chat template and as plain text are two prompts;
        # a response is (text, end marker)
        self.votes: dict[tuple, dict[str, set]] = defaultdict(lambda: {"up": set(), "down": set()})
        self.ratings: dict[tuple, list[tuple[float, tuple]]] = defaultdict(list)
        self.singles: list[Single] = []  # from votes and ratings no pair uses (mode auto) or from everything (kto)

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
                self.votes[ev["prompt"], chat][ev["vote"]].add((ev["response"], _end(ev)))
        elif kind == "ab" and self._need(ev, "prompt", "a", "b"):
            if ev.get("winner") not in ("a", "b"):
                self.dropped["ab: winner is not a or b"] += 1
            else:
                a, b = (ev["a"], _end(ev, "a_")), (ev["b"], _end(ev, "b_"))
                win, lose = (a, b) if ev["winner"] == "a" else (b, a)
                self.pairs.append(Pair(ev["prompt"], win[0], lose[0], chat, win[1], lose[1]))
        elif kind == "correction" and self._need(ev, "prompt", "response", "corrected"):
            # the correction is a whole answer a person wrote: it ends
            self.pairs.append(Pair(ev["prompt"], ev["corrected"], ev["response"], chat, EOS, _end(ev)))
        elif kind == "rating" and self._need(ev, "prompt", "response"):
            r = _finite(ev.get("rating"))
            if r is None:  # not a number, NaN or Infinity (which JSON does not have), or beyond a float
                self.dropped["rating: rating is not a number"] += 1
            else:
                self.ratings[ev["prompt"], chat].append((r, (ev["response"], _end(ev))))
        elif kind not in ("thumbs", "ab", "correction", "rating"):
            self.dropped["unknown event type"] += 1

    def vote_pairs(self, keep_unpaired: bool) -> list[Pair]:
        """Every up-voted response beats every down-voted one to the same prompt; votes with no
        opposite one become singles with ``keep_unpaired``, else are dropped."""
        out = []
        for (prompt, chat), v in self.votes.items():
            texts_up, texts_down = {t for t, _ in v["up"]}, {t for t, _ in v["down"]}
            both = texts_up & texts_down
            if both:
                self.dropped["thumbs: same response voted up and down"] += len(both)
            ups = sorted(r for r in v["up"] if r[0] not in both)
            downs = sorted(r for r in v["down"] if r[0] not in both)
            if not (ups and downs):
                if keep_unpaired:
                    self.singles += [Single(prompt, t, up, chat, e) for rs, up in ((ups, True), (downs, False))
                                     for t, e in rs]
                else:
                    self.dropped["thumbs: no opposite vote for the same prompt"] += len(ups) + len(downs)
            out += [Pair(prompt, u, d, chat, ue, de) for u, ue in ups for d, de in downs]
        return out

    def rating_pairs(self, min_gap: float, threshold: float | None) -> list[Pair]:
        """Between responses to the same prompt, the higher rating wins by at least ``min_gap``;
        with a ``threshold``, a rated response no pair uses is a single (desirable above it)."""
        out = []
        for (prompt, chat), rs in self.ratings.items():
            paired = set()
            for hi_r, hi in rs:
                for lo_r, lo in rs:
                    if hi_r - lo_r >= min_gap and hi[0] != lo[0]:
                        out.append(Pair(prompt, hi[0], lo[0], chat, hi[1], lo[1]))
                        paired |= {hi[0], lo[0]}
            unpaired = [(r, resp) for r, resp in rs if resp[0] not in paired]
            if threshold is None:
                if unpaired:
                    self.dropped["rating: no response to compare with by the rating gap"] += len({x[1][0] for x in unpaired})
                continue
            self.singles += self.rated_singles(prompt, chat, unpaired, threshold)
        return out

    def rated_singles(self, prompt: str, chat: bool, rated: list, threshold: float) -> list[Single]:
        out = []
        for r, (text, end) in rated:
            if r == threshold:
                self.dropped["rating: at the threshold (neutral)"] += 1
            else:
                out.append(Single(prompt, text, r > threshold, chat, end))
        return out


def _dedup(raw: list, key: Callable, bad: Callable, dropped: Counter) -> list:
    """The first of each ``key`` kept; what ``bad`` gives a reason for, and repeats, dropped and counted."""
    out, seen = [], set()
    for x in raw:
        why = bad(x)
        if why:
            dropped[why] += 1
        elif key(x) in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key(x))
            out.append(x)
    return out


def _dedup_pairs(raw: list[Pair], dropped: Counter) -> list[Pair]:
    """Identical responses, pairs that contradict each other, and repeats are dropped, counted."""
    keys = Counter((p.prompt, p.chosen, p.rejected, p.chat) for p in raw)
    return _dedup(raw, lambda p: (p.prompt, p.chosen, p.rejected, p.chat),
                  lambda p: "chosen and rejected identical" if p.chosen == p.rejected else
                  "contradicts another event" if (p.prompt, p.rejected, p.chosen, p.chat) in keys else None, dropped)


def _dedup_singles(raw: list[Single], dropped: Counter) -> list[Single]:
    """A response judged both desirable and undesirable is dropped (both events); repeats once."""
    verdicts: dict[tuple, set] = defaultdict(set)
    for x in raw:
        verdicts[x.prompt, x.response, x.chat].add(x.desirable)
    return _dedup(raw, lambda x: (x.prompt, x.response, x.chat),
                  lambda x: "contradicts another event" if len(verdicts[x.prompt, x.response, x.chat]) > 1 else None,
                  dropped)


def pairs_from_events(events: Iterable[dict], min_rating_gap: float = 1.0) -> tuple[list[Pair], dict[str, int]]:
    """Pairs from feedback events (dicts as in a feedback file), and {reason: count} of what was dropped:
    identical responses, pairs that contradict each other, and repeats are dropped last."""
    pairs, _, dropped = examples_from_events(events, "pairs", min_rating_gap)
    return pairs, dropped


MODES = ("pairs", "kto", "auto")


def as_singles(p: Pair) -> tuple[Single, Single]:
    """A pair as KTO sees it: its chosen response desirable, its rejected one not."""
    return (Single(p.prompt, p.chosen, True, p.chat, p.chosen_end),
            Single(p.prompt, p.rejected, False, p.chat, p.rejected_end))


def default_threshold(events: list[dict], given: float | None = None) -> float | None:
    """``given``, else the middle of the ratings among ``events`` ((lowest + highest) / 2), else None."""
    if given is not None:
        return given
    rated = [r for ev in events if ev.get("type") == "rating" and (r := _finite(ev.get("rating"))) is not None]
    return (min(rated) + max(rated)) / 2 if rated else None


def examples_from_events(events: Iterable[dict], mode: str = "pairs", min_rating_gap: float = 1.0,
                         rating_threshold: float | None = None) -> tuple[list[Pair], list[Single], dict[str, int]]:
    """(pairs, singles, {reason: count dropped}) from feedback events.

    ``pairs``: DPO's pairs only (unpaired votes and ratings are dropped, counted). ``auto``: the
    same pairs, and every vote or rating no pair uses as a single. ``kto``: no pairs; every event
    as singles (a pair's chosen desirable, its rejected undesirable). A rating's threshold is
    ``rating_threshold``, or the middle of the ratings seen ((lowest + highest) / 2)."""
    if mode not in MODES:
        raise ValueError(mode)
    c = _Collected()
    events = list(events)
    for ev in events:
        c.add(ev)
    threshold = default_threshold(events, rating_threshold) if mode != "pairs" else None
    if mode == "kto":
        singles = [x for p in c.pairs for x in as_singles(p)]
        for (prompt, chat), v in c.votes.items():
            singles += [Single(prompt, t, vote == "up", chat, e) for vote in ("up", "down") for t, e in sorted(v[vote])]
        for (prompt, chat), rs in c.ratings.items():
            singles += c.rated_singles(prompt, chat, rs, threshold)
        return [], _dedup_singles(singles, c.dropped), dict(c.dropped)
    raw = c.pairs + c.vote_pairs(keep_unpaired=mode == "auto") + c.rating_pairs(min_rating_gap, threshold)
    pairs = _dedup_pairs(raw, c.dropped)
    return pairs, _dedup_singles(c.singles, c.dropped), dict(c.dropped)


# --------------------------------------------------------------------------- held out, and tokens


def held_out(key: str, seed: int, holdout: float) -> bool:
    """Whether the example with this ``key`` is held out: a hash of seed and key, so the split is
    stable when examples are added and anyone holding the seed can redo it (the preference gate does)."""
    return int(hashlib.sha256(f"{seed}|{key}".encode()).hexdigest(), 16) % 1000 < holdout * 1000


def pair_key(p: Pair) -> str:
    return f"{p.prompt}|{p.chosen}|{p.rejected}"


def single_key(x: Single) -> str:
    return f"{x.prompt}|{x.response}|{x.desirable}"


def split_pairs(pairs: list[Pair], holdout: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A fixed held-out share, chosen by a hash of each pair (stable when pairs are added)."""
    held = [p for p in pairs if held_out(pair_key(p), seed, holdout)]
    held_set = set(held)
    return [p for p in pairs if p not in held_set], held


def split_singles(singles: list[Single], holdout: float, seed: int) -> tuple[list[Single], list[Single]]:
    held = [x for x in singles if held_out(single_key(x), seed, holdout)]
    held_set = set(held)
    return [x for x in singles if x not in held_set], held


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    """A prompt's ids: BOS as the tokenizer says; a chat prompt as the server tokenized it (special
    tokens parsed)."""
    from itera.chat import encode_rendered

    return encode_rendered(tok, prompt) if chat else tok.encode(prompt)


def response_ids(tok, text: str, end: int | str | None) -> list[int]:
    """A response's tokens, then the end-of-turn id that ended it (EOS: the tokenizer's) if it ended;
    a response a stop string ended is tokenized with that string after it, as one text."""
    if isinstance(end, str):
        return tok.encode(text + end, add_bos=False)
    ids = tok.encode(text, add_bos=False)
    if end == EOS:
        end = tok.eos_id
    return ids + [end] if end is not None else ids
