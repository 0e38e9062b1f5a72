"""The votes database (SQLite, WAL): prompts, answers, items, reviewers, what each was shown, their votes.

Every vote is committed as it is cast, so a crash or a closed tab loses nothing, and a reviewer resumes at
their first item without a vote. An item is a prompt and two models; when it is first shown to a reviewer
the server draws which model goes left and records that with a random ticket. A vote must bring a ticket
the server gave that very reviewer, and takes its models from the record, never from the request; a second
vote for the same item is refused (UNIQUE) and triggers forbid changing or deleting a stored vote.
"""

from __future__ import annotations

import datetime as dt
import random
import secrets
import sqlite3
from pathlib import Path
from typing import Any, Sequence

CHOICES = ("left", "right", "tie", "both_bad")
MAX_COMMENT = 2000
MAX_NAME = 40

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE prompts(id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, text TEXT NOT NULL);
CREATE TABLE answers(prompt INTEGER NOT NULL REFERENCES prompts(id), model TEXT NOT NULL, text TEXT NOT NULL,
                     PRIMARY KEY(prompt, model));
CREATE TABLE items(id INTEGER PRIMARY KEY, prompt INTEGER NOT NULL REFERENCES prompts(id),
                   model_a TEXT NOT NULL, model_b TEXT NOT NULL, UNIQUE(prompt, model_a, model_b));
CREATE TABLE reviewers(name TEXT PRIMARY KEY, token TEXT NOT NULL UNIQUE, joined TEXT NOT NULL);
CREATE TABLE shown(ticket TEXT PRIMARY KEY, reviewer TEXT NOT NULL REFERENCES reviewers(name),
                   item INTEGER NOT NULL REFERENCES items(id), left_model TEXT NOT NULL, right_model TEXT NOT NULL,
                   shown_at TEXT NOT NULL, UNIQUE(reviewer, item));
CREATE TABLE votes(id INTEGER PRIMARY KEY, reviewer TEXT NOT NULL, item INTEGER NOT NULL,
                   left_model TEXT NOT NULL, right_model TEXT NOT NULL,
                   choice TEXT NOT NULL CHECK(choice IN ('left', 'right', 'tie', 'both_bad')),
                   comment TEXT NOT NULL DEFAULT '', cast_at TEXT NOT NULL, UNIQUE(reviewer, item),
                   FOREIGN KEY(reviewer, item) REFERENCES shown(reviewer, item));
CREATE TRIGGER votes_are_final_update BEFORE UPDATE ON votes BEGIN SELECT RAISE(ABORT, 'votes are final'); END;
CREATE TRIGGER votes_are_final_delete BEFORE DELETE ON votes BEGIN SELECT RAISE(ABORT, 'votes are final'); END;
"""


class Refused(Exception):
    """A request the database turns down; `status` is its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode: each statement is its own committed transaction. WAL lets pages
    read while a vote is written; synchronous FULL makes a committed vote survive a power cut."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def create(path: Path, prompts: Sequence[tuple[str, str]], answers: dict[str, dict[str, str]],
           items: Sequence[tuple[int, str, str]], seed: int) -> None:
    """A new database: prompts as (key, text), answers as model -> key -> text, items as (prompt index,
    model, model)."""
    db = connect(path)
    try:
        db.executescript(SCHEMA)
        with db:
            db.execute("BEGIN")
            db.executemany("INSERT INTO meta VALUES (?, ?)", [("seed", str(seed)), ("created", now()),
                                                              ("results_key", secrets.token_urlsafe(12))])
            db.executemany("INSERT INTO prompts VALUES (?, ?, ?)", [(i, k, t) for i, (k, t) in enumerate(prompts)])
            db.executemany("INSERT INTO answers VALUES (?, ?, ?)",
                           [(i, model, texts[key]) for model, texts in answers.items()
                            for i, (key, _) in enumerate(prompts)])
            db.executemany("INSERT INTO items(prompt, model_a, model_b) VALUES (?, ?, ?)", items)
    finally:
        db.close()


def meta(db: sqlite3.Connection, key: str) -> str:
    return db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]


def models(db: sqlite3.Connection) -> list[str]:
    return [r[0] for r in db.execute("SELECT DISTINCT model FROM answers ORDER BY model")]


def join(db: sqlite3.Connection, name: str, token: str | None) -> str:
    """The reviewer's token: a new reviewer gets one; a returning one must bring theirs (their cookie), so
    nobody votes, or sees progress, under another's name."""
    name = " ".join(name.split())
    if not name or len(name) > MAX_NAME:
        raise Refused(422, f"a reviewer name has 1 to {MAX_NAME} characters")
    row = db.execute("SELECT token FROM reviewers WHERE name = ?", (name,)).fetchone()
    if row is not None:
        if token is not None and secrets.compare_digest(row[0], token):
            return row[0]
        raise Refused(409, f"the name {name!r} is taken; choose another, or open your own resume link")
    new = secrets.token_urlsafe(16)
    try:
        db.execute("INSERT INTO reviewers VALUES (?, ?, ?)", (name, new, now()))
    except sqlite3.IntegrityError:
        raise Refused(409, f"the name {name!r} is taken; choose another") from None
    return new


def reviewer(db: sqlite3.Connection, token: str) -> str:
    row = db.execute("SELECT name FROM reviewers WHERE token = ?", (token,)).fetchone()
    if row is None:
        raise Refused(404, "unknown reviewer link; start again from the review's front page")
    return row[0]


def progress(db: sqlite3.Connection, name: str) -> tuple[int, int]:
    """(items this reviewer voted on, items in the review)."""
    done = db.execute("SELECT COUNT(*) FROM votes WHERE reviewer = ?", (name,)).fetchone()[0]
    return done, db.execute("SELECT COUNT(*) FROM items").fetchone()[0]


def next_item(db: sqlite3.Connection, name: str) -> dict[str, Any] | None:
    """The reviewer's first item without a vote, in their own order (shuffled by seed and name, so
    reviewers do not all start on the same items and a reload shows the same one), with its ticket and
    answers in the left/right order drawn when it was first shown; None when every item has a vote."""
    order = [r[0] for r in db.execute("SELECT id FROM items ORDER BY id")]
    random.Random(f"{meta(db, 'seed')}/{name}").shuffle(order)
    voted = {r[0] for r in db.execute("SELECT item FROM votes WHERE reviewer = ?", (name,))}
    item = next((i for i in order if i not in voted), None)
    if item is None:
        return None
    a, b = db.execute("SELECT model_a, model_b FROM items WHERE id = ?", (item,)).fetchone()
    left, right = (a, b) if secrets.randbelow(2) else (b, a)
    db.execute("INSERT OR IGNORE INTO shown VALUES (?, ?, ?, ?, ?, ?)",
               (secrets.token_urlsafe(16), name, item, left, right, now()))
    row = db.execute("""SELECT s.ticket, p.text AS prompt, l.text AS left_answer, r.text AS right_answer
                        FROM shown s JOIN items i ON i.id = s.item JOIN prompts p ON p.id = i.prompt
                        JOIN answers l ON l.prompt = i.prompt AND l.model = s.left_model
                        JOIN answers r ON r.prompt = i.prompt AND r.model = s.right_model
                        WHERE s.reviewer = ? AND s.item = ?""", (name, item)).fetchone()
    return dict(row)


def cast(db: sqlite3.Connection, name: str, ticket: str, choice: str, comment: str) -> None:
    """Store one vote, committed at once. Refused: a choice not offered, a ticket this reviewer was never
    shown (forged, or another reviewer's), a second vote on the same item (the first stays as it was)."""
    if choice not in CHOICES:
        raise Refused(422, f"choice must be one of {', '.join(CHOICES)}")
    if len(comment) > MAX_COMMENT:
        raise Refused(422, f"a comment has at most {MAX_COMMENT} characters")
    shown = db.execute("SELECT item, left_model, right_model FROM shown WHERE ticket = ? AND reviewer = ?",
                       (ticket, name)).fetchone()
    if shown is None:
        raise Refused(403, "this vote is for an item the server did not show you; reload the page")
    try:
        db.execute("INSERT INTO votes(reviewer, item, left_model, right_model, choice, comment, cast_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (name, shown["item"], shown["left_model"], shown["right_model"],
                                                    choice, comment.strip(), now()))
    except sqlite3.IntegrityError:
        raise Refused(409, "you already voted on this item; your first vote stands") from None


def all_votes(db: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every vote with its prompt, oldest first."""
    return [dict(r) for r in db.execute(
        """SELECT v.id, v.reviewer, v.item, p.key AS prompt_id, p.text AS prompt, v.left_model, v.right_model,
                  v.choice, v.comment, v.cast_at
           FROM votes v JOIN items i ON i.id = v.item JOIN prompts p ON p.id = i.prompt ORDER BY v.id""")]
