"""Which itera database a SQLite file is. The registry and the feedback store are both SQLite
files that users pass by path, so one can be given where the other belongs; each kind is marked
with its own ``PRAGMA application_id`` when it is created (files made before the mark are told
apart by their tables), and the wrong kind is refused when it is opened, before anything is
migrated or written into it."""

from __future__ import annotations

from pathlib import Path

from itera.errors import InputError

# kind: (application_id, a table only that kind has, what it is called, the option that takes it)
KINDS = {
    "registry": (0x69745247, "versions", "an itera registry", "--registry"),  # 'itRG'
    "feedback": (0x69744642, "responses", "an itera feedback store", "--feedback-db"),  # 'itFB'
}


def check(db, path: Path, kind: str) -> None:
    """Refuse ``path`` (open as ``db``) unless it is empty or a database of ``kind``."""
    app_id, _, name, option = KINDS[kind]
    (found_id,) = db.execute("PRAGMA application_id").fetchone()
    if found_id == app_id:
        return
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    other = next((k for k, (i, table, _, _) in KINDS.items() if found_id == i or (found_id == 0 and table in tables)),
                 None)
    if other == kind:
        return  # made before the mark
    if other is not None:
        what, their = KINDS[other][2], KINDS[other][3]
        raise InputError(f"{path} is {what}, not {name}; pass it with {their}, and give {option} the {kind} file")
    if found_id != 0:
        raise InputError(f"{path} is another application's SQLite file (application_id {found_id:#x}), not {name}; "
                         f"pass another {option} path")
    if tables:
        raise InputError(f"{path} is a SQLite database of something else (tables: {', '.join(sorted(tables)[:5])}), "
                         f"not {name}; pass another {option} path")


def mark(db, kind: str) -> None:
    """Set the file's application_id to ``kind``'s (inside the transaction that creates its tables)."""
    db.execute(f"PRAGMA application_id = {KINDS[kind][0]}")
