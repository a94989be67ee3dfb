"""API keys, budgets, usage and idempotent replies, in one SQLite file.

- A key is ``bbpt-<id>-<secret>``: printed once by ``bbpt serve keys add``; the database
  holds only SHA-256(secret), compared in constant time (``hmac.compare_digest``) after the
  row is found by ``id``. Keys are never logged.
- Usage is counted per key and purpose (train / eval / side: what the client says a query
  is for), in bbpt's units; a key's budget bounds the sum over purposes.
- A charge is one transaction: the budget check, the usage update and, with an
  ``Idempotency-Key``, the stored reply. So a reply is either charged and stored, or the
  query is refused whole; a retry with the same key is answered from the stored reply and
  charged nothing (Stripe's semantics; a different body under the same key is refused).
  WAL journal: a server killed at any moment keeps every committed charge.
- What a key stores is counted per key, against quotas: the class sets it registered
  (deletable) and the images it uploaded (content-hash ids: the same image twice counts once;
  their features are stored once per model whichever key sent them).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..models.meter import BUDGET_UNITS, UNITS
IDEMPOTENCY_SECONDS = 24 * 3600  # stored replies are kept a day, as Stripe does

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, secret_sha256 TEXT NOT NULL,
    budget_api_calls INTEGER, budget_prompt_evals INTEGER, created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL, purpose TEXT NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
    api_calls INTEGER NOT NULL DEFAULT 0, prompt_evals INTEGER NOT NULL DEFAULT 0,
    images_forwarded INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (key_id, purpose));
CREATE TABLE IF NOT EXISTS replies (
    key_id TEXT NOT NULL, idem_key TEXT NOT NULL, body_sha256 TEXT NOT NULL, reply BLOB NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (key_id, idem_key));
CREATE TABLE IF NOT EXISTS class_sets (id TEXT PRIMARY KEY, names TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS image_features (model TEXT NOT NULL, id TEXT NOT NULL, feats BLOB NOT NULL,
    PRIMARY KEY (model, id));
CREATE TABLE IF NOT EXISTS key_class_sets (key_id TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (key_id, id));
CREATE TABLE IF NOT EXISTS key_images (key_id TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (key_id, id));
"""


@dataclass(frozen=True)
class Key:
    id: str
    name: str
    budget: dict  # unit -> limit or None


class OverBudget(Exception):
    def __init__(self, used: dict, budget: dict, cost: dict):
        self.used, self.budget, self.cost = used, budget, cost


class IdempotencyMismatch(Exception):
    """The same Idempotency-Key with another request body."""


class QuotaExceeded(Exception):
    """A key would store more class sets or images than its quota allows."""

    def __init__(self, what: str, stored: int, adding: int, quota: int):
        self.what, self.stored, self.adding, self.quota = what, stored, adding, quota


def _sha(s: bytes | str) -> str:
    return hashlib.sha256(s.encode() if isinstance(s, str) else s).hexdigest()


class UnusableDatabase(BadInput):
    """The serve database cannot be opened, created or written (a folder, not SQLite, read-only)."""


def _schema_columns(db: sqlite3.Connection) -> dict[str, set[str]]:
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {t: {r[0] for r in db.execute("SELECT name FROM pragma_table_info(?)", (t,))} for t in tables}


def _expected_columns() -> dict[str, set[str]]:
    mem = sqlite3.connect(":memory:")
    try:
        mem.executescript(SCHEMA)
        return _schema_columns(mem)
    finally:
        mem.close()


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = self._open(self.path)
        self._lock = threading.RLock()  # one connection, one caller at a time

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        """The database at ``path``, created with the schema if new; UnusableDatabase (one line
        naming the path, what is wrong and the fix) when it cannot be used."""
        fix = "pass --db a file path in a writable folder, e.g. --db serve.db"
        if path.is_dir():
            raise UnusableDatabase(f"serve database {path} is a folder; {fix}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UnusableDatabase(f"serve database {path}: its folder {path.parent} cannot be made, a file is in the "
                                   f"way; {fix}") from None
        except OSError as e:
            raise UnusableDatabase(f"serve database {path}: its folder {path.parent} cannot be created "
                                   f"({e.strerror or e}); {fix}") from None
        db = None
        try:
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
            have = _schema_columns(db)  # before anything is written: another application's file stays untouched
            other = sorted(t for t, cols in _expected_columns().items() if t in have and not cols <= have[t])
            if not other:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process kills
                db.executescript(SCHEMA)
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            why = str(e)
            if "not a database" in why:
                msg = f"serve database {path} is not an SQLite database ({why}); pass --db a new file or one bbpt serve made"
            elif "readonly" in why or "read-only" in why:
                msg = f"serve database {path} is read-only ({why}); {fix}, or make it writable"
            elif "unable to open" in why:
                msg = f"serve database {path} cannot be opened or created there ({why}); {fix}"
            else:
                msg = f"serve database {path} cannot be used ({type(e).__name__}: {why}); {fix}"
            raise UnusableDatabase(msg) from None
        if other:
            db.close()
            raise UnusableDatabase(f"serve database {path} is an SQLite file of another schema (table {other[0]!r} "
                                   "differs from bbpt serve's); pass --db a new file or one bbpt serve made")
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- keys ------------------------------------------------------------------------------
    def add_key(self, name: str, budget: dict | None = None) -> str:
        """A new key for ``name`` with ``budget`` ({unit: limit}); returns the key, once."""
        budget = dict(budget or {})
        bad = [u for u in budget if u not in BUDGET_UNITS]
        if bad:
            raise ValueError(f"budget unit {bad[0]!r} is not one of {', '.join(BUDGET_UNITS)}")
        kid, secret = secrets.token_hex(4), secrets.token_urlsafe(24)
        with self._lock:
            try:
                self._db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, 0)",
                                 (kid, name, _sha(secret), budget.get("api_calls"), budget.get("prompt_evals"), time.time()))
            except sqlite3.IntegrityError:
                raise ValueError(f"a key named {name!r} exists already; choose another name or revoke it") from None
        return f"bbpt-{kid}-{secret}"

    def keys(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT id, name, budget_api_calls, budget_prompt_evals, revoked FROM keys "
                                    "ORDER BY created").fetchall()
        return [{"id": r[0], "name": r[1], "budget": {"api_calls": r[2], "prompt_evals": r[3]}, "revoked": bool(r[4]),
                 "used": self.usage(r[0])["total"]} for r in rows]

    def revoke(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("UPDATE keys SET revoked = 1 WHERE name = ?", (name,)).rowcount == 1

    def authenticate(self, token: str | None) -> Key | None:
        """The key a bearer token names, or None (wrong, revoked or malformed)."""
        if not token or not token.startswith("bbpt-") or token.count("-") < 2:
            return None
        _, kid, secret = token.split("-", 2)
        with self._lock:
            row = self._db.execute("SELECT id, name, secret_sha256, budget_api_calls, budget_prompt_evals, revoked "
                                   "FROM keys WHERE id = ?", (kid,)).fetchone()
        if row is None or row[5] or not hmac.compare_digest(row[2], _sha(secret)):
            return None
        return Key(row[0], row[1], {"api_calls": row[3], "prompt_evals": row[4]})

    # ---- usage and charges -----------------------------------------------------------------
    def usage(self, key_id: str) -> dict:
        with self._lock:
            rows = self._db.execute("SELECT purpose, requests, api_calls, prompt_evals, images_forwarded FROM usage "
                                    "WHERE key_id = ?", (key_id,)).fetchall()
        purposes = {r[0]: {"requests": r[1], **dict(zip(UNITS, r[2:]))} for r in rows}
        total = {u: sum(p[u] for p in purposes.values()) for u in ("requests", *UNITS)}
        return {"purposes": purposes, "total": total}

    def check(self, key: Key, cost: dict) -> None:
        """OverBudget if ``cost`` would pass the key's budget now (a pre-check; ``charge`` decides)."""
        used = self.usage(key.id)["total"]
        if any(lim is not None and used[u] + cost[u] > lim for u, lim in key.budget.items()):
            raise OverBudget(used, key.budget, cost)

    def charge(self, key: Key, purpose: str, cost: dict, reply: bytes, idem_key: str | None, body_sha: str) -> None:
        """Charge ``cost`` and store ``reply`` under ``idem_key``, atomically; OverBudget, or
        IdempotencyMismatch, and nothing is written."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if idem_key is not None and self._reply_locked(key.id, idem_key, body_sha) is not None:
                    self._db.execute("ROLLBACK")  # a concurrent twin committed first: nothing more to charge
                    return
                used = self.usage(key.id)["total"]
                if any(lim is not None and used[u] + cost[u] > lim for u, lim in key.budget.items()):
                    raise OverBudget(used, key.budget, cost)
                self._db.execute(
                    "INSERT INTO usage (key_id, purpose, requests, api_calls, prompt_evals, images_forwarded) "
                    "VALUES (?, ?, 1, ?, ?, ?) ON CONFLICT (key_id, purpose) DO UPDATE SET requests = requests + 1, "
                    "api_calls = api_calls + excluded.api_calls, prompt_evals = prompt_evals + excluded.prompt_evals, "
                    "images_forwarded = images_forwarded + excluded.images_forwarded",
                    (key.id, purpose, cost["api_calls"], cost["prompt_evals"], cost["images_forwarded"]))
                if idem_key is not None:
                    self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?)",
                                     (key.id, idem_key, body_sha, reply, time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def reply(self, key: Key, idem_key: str, body_sha: str) -> bytes | None:
        """The stored reply to an earlier request under ``idem_key``; IdempotencyMismatch when
        that request had another body."""
        with self._lock:
            return self._reply_locked(key.id, idem_key, body_sha)

    def _reply_locked(self, key_id: str, idem_key: str, body_sha: str) -> bytes | None:
        row = self._db.execute("SELECT body_sha256, reply FROM replies WHERE key_id = ? AND idem_key = ? AND created >= ?",
                               (key_id, idem_key, time.time() - IDEMPOTENCY_SECONDS)).fetchone()
        if row is None:
            return None
        if row[0] != body_sha:
            raise IdempotencyMismatch
        return bytes(row[1])

    def prune(self, older_than: float = IDEMPOTENCY_SECONDS) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM replies WHERE created < ?", (time.time() - older_than,)).rowcount

    # ---- class sets ------------------------------------------------------------------------
    def put_class_set(self, names: list[str]) -> str:
        cid = "cs-" + _sha(json.dumps(names))[:16]
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO class_sets VALUES (?, ?)", (cid, json.dumps(names)))
        return cid

    def class_set(self, cid: str) -> list[str] | None:
        with self._lock:
            row = self._db.execute("SELECT names FROM class_sets WHERE id = ?", (cid,)).fetchone()
        return None if row is None else json.loads(row[0])

    # ---- uploaded images' features (float32 bytes), per model: they survive restarts ----------
    def put_features(self, model: str, rows: list[tuple[str, bytes]]) -> None:
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO image_features VALUES (?, ?, ?)",
                                 [(model, i, blob) for i, blob in rows])

    def features(self, model: str, ids: list[str]) -> list[tuple[str, bytes]]:
        out = []
        with self._lock:
            for at in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                part = ids[at:at + 500]
                out += self._db.execute(f"SELECT id, feats FROM image_features WHERE model = ? AND id IN "
                                        f"({','.join('?' * len(part))})", (model, *part)).fetchall()
        return [(i, bytes(b)) for i, b in out]

    # ---- what each key stores, against its quotas ------------------------------------------
    def claim_class_set(self, key_id: str, names: list[str], quota: int | None) -> str:
        """Register ``names`` for the key (its id, as :meth:`put_class_set`); QuotaExceeded if
        that would make more than ``quota`` sets (one it has already costs nothing)."""
        cid = "cs-" + _sha(json.dumps(names))[:16]
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM key_class_sets WHERE key_id = ? AND id = ?", (key_id, cid)).fetchone():
                return cid
            n = self._db.execute("SELECT COUNT(*) FROM key_class_sets WHERE key_id = ?", (key_id,)).fetchone()[0]
            if quota is not None and n + 1 > quota:
                raise QuotaExceeded("class sets", n, 1, quota)
            self._db.execute("INSERT OR IGNORE INTO class_sets VALUES (?, ?)", (cid, json.dumps(names)))
            self._db.execute("INSERT INTO key_class_sets VALUES (?, ?)", (key_id, cid))
        return cid

    def delete_class_set(self, key_id: str, cid: str) -> bool:
        """Drop the key's class set (the set itself once no key has it); False if it has none."""
        with self._lock, self._transaction():
            if self._db.execute("DELETE FROM key_class_sets WHERE key_id = ? AND id = ?", (key_id, cid)).rowcount == 0:
                return False
            self._db.execute("DELETE FROM class_sets WHERE id = ? AND NOT EXISTS "
                             "(SELECT 1 FROM key_class_sets WHERE id = ?)", (cid, cid))
        return True

    def claim_images(self, key_id: str, ids: list[str], quota: int | None) -> int:
        """Count the images ``ids`` as the key's; QuotaExceeded (nothing counted) if it would
        then have more than ``quota``. Returns how many were new to the key."""
        ids = list(dict.fromkeys(ids))
        with self._lock, self._transaction():
            have = set()
            for at in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                part = ids[at:at + 500]
                have.update(r[0] for r in self._db.execute(
                    f"SELECT id FROM key_images WHERE key_id = ? AND id IN ({','.join('?' * len(part))})", (key_id, *part)))
            new = [i for i in ids if i not in have]
            n = self._db.execute("SELECT COUNT(*) FROM key_images WHERE key_id = ?", (key_id,)).fetchone()[0]
            if new and quota is not None and n + len(new) > quota:
                raise QuotaExceeded("images", n, len(new), quota)
            self._db.executemany("INSERT INTO key_images VALUES (?, ?)", [(key_id, i) for i in new])
        return len(new)

    def stored(self, key_id: str) -> dict:
        """{"class_sets": n, "images": n} the key has stored."""
        with self._lock:
            return {what: self._db.execute(f"SELECT COUNT(*) FROM {table} WHERE key_id = ?", (key_id,)).fetchone()[0]
                    for what, table in (("class_sets", "key_class_sets"), ("images", "key_images"))}

    @contextmanager
    def _transaction(self):
        """BEGIN IMMEDIATE .. COMMIT, rolled back on any exception (the caller holds the lock)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
