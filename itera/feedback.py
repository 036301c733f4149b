"""What the server said and what people thought of it: one SQLite file (``$ITERA_HOME/feedback.db``
by default) holding every response (prompt, text, model version, sampling parameters) and every
feedback event on them.

Feedback names responses by id; the texts are filled in when the events are read back
(:meth:`FeedbackStore.events`) in the shape ``itera.preference.pairs_from_events`` takes, so
``dpo-train --feedback-db`` applies the same rules, and counts the same drops, as ``--feedback``.

Durability: WAL journal, ``synchronous = FULL`` (a commit is on disk before the server answers
``201``), every write one ``BEGIN IMMEDIATE`` transaction. A server killed outright loses no
committed row and leaves no half-written one. This module imports nothing heavy: ``dpo-train``
reads the store without the serving stack.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import threading
from pathlib import Path

from itera import sqlite
from itera.errors import InputError
from itera.paths import itera_home
from itera.record import utc_now

BUSY_TIMEOUT_S = 30.0
EVENT_TYPES = ("thumbs", "rating", "ab", "correction")

MIGRATIONS = [
    # 1: the initial schema
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT NOT NULL,
        version INTEGER,
        sha256 TEXT NOT NULL,
        prompt TEXT NOT NULL,
        response TEXT NOT NULL,
        finish_reason TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        request TEXT NOT NULL
    );
    CREATE TABLE feedback (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at TEXT NOT NULL,
        type TEXT NOT NULL CHECK (type IN ('thumbs', 'rating', 'ab', 'correction')),
        response_id TEXT NOT NULL REFERENCES responses(id),
        other_id TEXT REFERENCES responses(id),
        vote TEXT CHECK (vote IS NULL OR vote IN ('up', 'down')),
        rating REAL,
        winner TEXT CHECK (winner IS NULL OR winner IN ('a', 'b')),
        corrected TEXT
    );
    CREATE INDEX feedback_by_response ON feedback(response_id)
    """,
]


def default_path() -> Path:
    return itera_home() / "feedback.db"


class FeedbackError(InputError):
    """A feedback event the store refuses; ``param`` names the request field, ``status`` the HTTP status."""

    def __init__(self, message: str, param: str, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class FeedbackStore:
    """One store file. Thread-safe: one connection, writes serialised by a lock (each is short)."""

    def __init__(self, path: Path | None = None, create: bool = True):
        self.path = Path(path) if path is not None else default_path()
        if self.path.is_dir():
            raise InputError(f"feedback store {self.path} is a directory; pass a file path")
        if not create and not self.path.is_file():
            raise InputError(f"no feedback store at {self.path}; serve a model with `itera serve` and post feedback "
                             "to /v1/feedback first, or pass the server's --feedback-db")
        self._lock = threading.Lock()
        try:
            self.db = sqlite.connect(self.path, "feedback", MIGRATIONS, timeout_s=BUSY_TIMEOUT_S, synchronous="FULL",
                                     newer=lambda found, known: f"feedback store {self.path} was written by a newer "
                                                                f"itera (schema {found}); upgrade itera", threads=True)
        except sqlite3.DatabaseError as e:
            raise InputError(f"feedback store {self.path} is not a usable SQLite database ({e}); "
                             "pass another --feedback-db") from None

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> "FeedbackStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self):
        """One write transaction under the lock: committed when the block ends, else rolled back."""
        with self._lock, sqlite.write(self.db) as db:
            yield db

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ writes

    def add_response(self, row: dict) -> None:
        """Store one response: id, endpoint, model, version, sha256, prompt (the text the model
        was given), response, finish_reason, prompt_tokens, completion_tokens, request (a dict)."""
        with self._write() as db:
            db.execute("INSERT INTO responses (id, created_at, endpoint, model, version, sha256, prompt, response, "
                       "finish_reason, prompt_tokens, completion_tokens, request) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (row["id"], utc_now(), row["endpoint"], row["model"], row["version"], row["sha256"],
                        row["prompt"], row["response"], row["finish_reason"], row["prompt_tokens"],
                        row["completion_tokens"], json.dumps(row["request"], ensure_ascii=False)))

    def add_feedback(self, event: dict) -> dict:
        """Check and store one event as the API takes it (response ids, no texts); return it with
        its ``id`` and ``created_at``. Raises :class:`FeedbackError` naming the field at fault."""
        kind = event.get("type")
        if kind not in EVENT_TYPES:
            raise FeedbackError(f"type must be one of {', '.join(EVENT_TYPES)}", "type")
        ids = ("a_id", "b_id") if kind == "ab" else ("response_id",)
        for key in ids:
            if not isinstance(event.get(key), str) or not event[key]:
                raise FeedbackError(f"{key} must be the id of a response from this server", key)
        if kind == "ab" and event["a_id"] == event["b_id"]:
            raise FeedbackError("a_id and b_id are the same response; an A/B vote compares two", "b_id")
        if kind == "thumbs" and event.get("vote") not in ("up", "down"):
            raise FeedbackError("vote must be \"up\" or \"down\"", "vote")
        if kind == "ab" and event.get("winner") not in ("a", "b"):
            raise FeedbackError("winner must be \"a\" or \"b\"", "winner")
        if kind == "correction" and not (isinstance(event.get("corrected"), str) and event["corrected"]):
            raise FeedbackError("corrected must be the corrected response text", "corrected")
        if kind == "rating":
            r = event.get("rating")
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise FeedbackError("rating must be a number", "rating")
        values = {"vote": event.get("vote"), "rating": event.get("rating"), "winner": event.get("winner"),
                  "corrected": event.get("corrected")}
        with self._write() as db:
            prompts = []
            for key in ids:
                row = db.execute("SELECT prompt, endpoint FROM responses WHERE id = ?", (event[key],)).fetchone()
                if row is None:
                    raise FeedbackError(f"{key} {event[key]!r} is not a response this server stored", key, 404)
                prompts.append(tuple(row))
            if kind == "ab" and prompts[0] != prompts[1]:  # the same text as a chat and as a completion differs
                raise FeedbackError("a_id and b_id answer different prompts; an A/B vote compares two responses to "
                                    "the same prompt", "b_id")
            created = utc_now()
            cur = db.execute("INSERT INTO feedback (created_at, type, response_id, other_id, vote, rating, winner, "
                             "corrected) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (created, kind, event[ids[0]], event["b_id"] if kind == "ab" else None, values["vote"],
                              values["rating"], values["winner"], values["corrected"]))
            return {"id": cur.lastrowid, "created_at": created, **event}

    # ------------------------------------------------------------------ reads

    def response(self, response_id: str) -> dict | None:
        rows = self._read("SELECT * FROM responses WHERE id = ?", (response_id,))
        row = rows[0] if rows else None
        return {**dict(row), "request": json.loads(row["request"])} if row else None

    def events(self) -> list[dict]:
        """Every feedback event, oldest first, as ``pairs_from_events`` takes them: ``prompt`` is
        the text the model was given (a chat's rendered template, marked ``"chat": true``) and
        responses are texts."""
        rows = self._read(
            "SELECT f.type, f.vote, f.rating, f.winner, f.corrected, a.prompt, a.endpoint, a.response AS a_text, "
            "b.response AS b_text FROM feedback f JOIN responses a ON a.id = f.response_id "
            "LEFT JOIN responses b ON b.id = f.other_id ORDER BY f.id")
        out = []
        for r in rows:
            if r["type"] == "thumbs":
                ev = {"type": "thumbs", "prompt": r["prompt"], "response": r["a_text"], "vote": r["vote"]}
            elif r["type"] == "rating":
                ev = {"type": "rating", "prompt": r["prompt"], "response": r["a_text"], "rating": r["rating"]}
            elif r["type"] == "ab":
                ev = {"type": "ab", "prompt": r["prompt"], "a": r["a_text"], "b": r["b_text"], "winner": r["winner"]}
            else:
                ev = {"type": "correction", "prompt": r["prompt"], "response": r["a_text"], "corrected": r["corrected"]}
            if r["endpoint"] == "/v1/chat/completions":  # the prompt is the rendered template
                ev["chat"] = True
            out.append(ev)
        return out

    def counts(self) -> dict[str, int]:
        (responses,) = self._read("SELECT COUNT(*) FROM responses")[0]
        (feedback,) = self._read("SELECT COUNT(*) FROM feedback")[0]
        return {"responses": responses, "feedback": feedback}

    def integrity_ok(self) -> bool:
        return self._read("PRAGMA integrity_check")[0][0] == "ok"


def read_events(path: Path) -> list[dict]:
    """The feedback events of the store at ``path`` (which must exist), texts filled in."""
    if not os.path.lexists(path):
        raise InputError(f"no feedback store at {path}; serve a model with `itera serve` and post feedback to "
                         "/v1/feedback first, or pass the server's --feedback-db")
    with FeedbackStore(path, create=False) as store:
        return store.events()
