"""The batch manifest: one SQLite file recording every item's state, outputs and error, so a rerun resumes.

States: ``pending`` → ``running`` → ``done`` | ``failed`` (and back to ``pending`` for a retry); ``skipped``:
a row whose inputs are identical to an earlier row's (same prompt, same file contents) — it would make the same
pixels, so it points at that row's outputs instead of running twice.

Resume rules (``sync``): a new row is ``pending``; a row whose inputs changed since it ran (its spec hash
differs) is ``pending`` again; ``running`` left by a runner that died is ``pending``; ``done`` whose output file
disappeared is ``pending``; ``failed`` stays failed unless ``retry_failed``. Only the driver writes (one
connection, WAL mode, each transition one transaction), so a kill at any point leaves a consistent file.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Optional

STATES = ("pending", "running", "done", "failed", "skipped")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
  id TEXT PRIMARY KEY, seq INTEGER, state TEXT NOT NULL, spec_hash TEXT, affinity TEXT,
  attempts INTEGER NOT NULL DEFAULT 0, server TEXT, outputs TEXT NOT NULL DEFAULT '[]', error TEXT,
  row TEXT, started REAL, finished REAL, seconds REAL, runs INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS servers (
  name TEXT PRIMARY KEY, url TEXT, pid INTEGER, host TEXT, state TEXT, restarts INTEGER DEFAULT 0,
  done INTEGER DEFAULT 0, updated REAL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class Manifest:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _tx(self, sql: str, args: Iterable = ()) -> None:
        with self.db:  # one transaction
            self.db.execute(sql, tuple(args))

    # -- set-up -----------------------------------------------------------------------------------------------
    def sync(self, items, out_dir: Path, retry_failed: bool = False) -> dict:
        """Bring the manifest in line with the table (see module doc); returns counts of what was reset."""
        out_dir = Path(out_dir)
        counts = {"new": 0, "changed": 0, "interrupted": 0, "lost_output": 0, "retry_failed": 0}
        first_of: dict = {}
        with self.db:
            self.db.execute("UPDATE servers SET state='gone'")
            for it in items:
                old = self.db.execute("SELECT * FROM items WHERE id=?", (it.id,)).fetchone()
                dup_of = first_of.setdefault(it.spec_hash, it.id)
                row = json.dumps(it.row, default=str)
                if dup_of != it.id:
                    self.db.execute(
                        "INSERT INTO items (id, seq, state, spec_hash, affinity, row, error) VALUES (?,?,?,?,?,?,?) "
                        "ON CONFLICT(id) DO UPDATE SET seq=excluded.seq, state='skipped', spec_hash=excluded.spec_hash,"
                        " affinity=excluded.affinity, row=excluded.row, error=excluded.error, outputs='[]'",
                        (it.id, it.seq, "skipped", it.spec_hash, it.affinity, row,
                         f"same inputs as row {dup_of}: see its outputs"))
                    continue
                if old is None:
                    self.db.execute("INSERT INTO items (id, seq, state, spec_hash, affinity, row) VALUES (?,?,?,?,?,?)",
                                    (it.id, it.seq, "pending", it.spec_hash, it.affinity, row))
                    counts["new"] += 1
                    continue
                state, reset = old["state"], None
                if old["spec_hash"] != it.spec_hash:
                    reset = "changed"
                elif state == "running":
                    reset = "interrupted"
                elif state == "done" and not all((out_dir / o).is_file() for o in json.loads(old["outputs"])):
                    reset = "lost_output"
                elif state == "failed" and retry_failed:
                    reset = "retry_failed"
                elif state == "skipped":
                    reset = "changed"
                if reset:
                    counts[reset] += 1
                    self.db.execute("UPDATE items SET state='pending', attempts=0, error=NULL, spec_hash=?, "
                                    "affinity=?, row=?, seq=? WHERE id=?",
                                    (it.spec_hash, it.affinity, row, it.seq, it.id))
                else:
                    self.db.execute("UPDATE items SET seq=?, row=?, affinity=? WHERE id=?",
                                    (it.seq, row, it.affinity, it.id))
        return counts

    # -- transitions (driver only) ----------------------------------------------------------------------------
    def claim(self, item_id: str, server: str) -> int:
        """pending → running on `server`; returns the attempt number (1-based)."""
        with self.db:
            self.db.execute("UPDATE items SET state='running', attempts=attempts+1, server=?, started=?, "
                            "runs=runs+1 WHERE id=? AND state='pending'", (server, time.time(), item_id))
            return self.db.execute("SELECT attempts FROM items WHERE id=?", (item_id,)).fetchone()[0]

    def done(self, item_id: str, outputs: list, server: str, seconds: float) -> None:
        self._tx("UPDATE items SET state='done', outputs=?, error=NULL, server=?, finished=?, seconds=? WHERE id=?",
                 (json.dumps(outputs), server, time.time(), seconds, item_id))

    def fail(self, item_id: str, error: str, server: Optional[str] = None) -> None:
        self._tx("UPDATE items SET state='failed', error=?, server=COALESCE(?, server), finished=? WHERE id=?",
                 (error, server, time.time(), item_id))

    def release(self, item_id: str, error: Optional[str] = None) -> None:
        """running → pending (to be retried elsewhere); the last error is kept for the report."""
        self._tx("UPDATE items SET state='pending', error=? WHERE id=?", (error, item_id))

    def server_state(self, name: str, state: str, url: Optional[str] = None, pid: Optional[int] = None,
                     host: Optional[str] = None, restarts: Optional[int] = None, done: Optional[int] = None) -> None:
        self._tx("INSERT INTO servers (name, url, pid, host, state, restarts, done, updated) "
                 "VALUES (?,?,?,?,?,COALESCE(?,0),COALESCE(?,0),?) ON CONFLICT(name) DO UPDATE SET "
                 "url=COALESCE(excluded.url, url), pid=COALESCE(?, pid), host=COALESCE(excluded.host, host), "
                 "state=excluded.state, restarts=COALESCE(?, restarts), done=COALESCE(?, done), "
                 "updated=excluded.updated",
                 (name, url, pid, host, state, restarts, done, time.time(), pid, restarts, done))

    # -- reading ----------------------------------------------------------------------------------------------
    def items(self, state: Optional[str] = None) -> list[dict]:
        sql = "SELECT * FROM items" + (" WHERE state=?" if state else "") + " ORDER BY seq"
        return [dict(r) for r in self.db.execute(sql, (state,) if state else ())]

    def counts(self) -> dict:
        out = dict.fromkeys(STATES, 0)
        for r in self.db.execute("SELECT state, COUNT(*) FROM items GROUP BY state"):
            out[r[0]] = r[1]
        return out

    def servers(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM servers ORDER BY name")]

    def set_meta(self, key: str, value) -> None:
        self._tx("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                 (key, json.dumps(value)))

    def meta(self, key: str, default=None):
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(r[0]) if r else default
