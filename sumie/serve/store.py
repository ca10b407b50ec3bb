"""What a server keeps on disk: images in A1111's folders and names, and job records in SQLite (WAL).

Images go to ``OUTPUT_DIR/txt2img-images/YYYY-MM-DD/00000-SEED.png`` (``img2img-images`` for img2img), numbered as
A1111 numbers them, written atomically with their infotext (:func:`sumie.pipelines.output.save_image`). Job records
(id, kind, state, times, error, output paths, A1111's info, which process ran it, and the progress of a running
job) live in one SQLite file in WAL mode, so a crash loses no finished record and every process that opens the
file (the replicas of ``sumie serve --ray``, all on one machine: SQLite's WAL needs shared memory) sees every
job. At start, jobs a previous process left queued or running are marked failed with the reason (queued jobs are
not resumed) and the temporary files of writes it left unfinished are removed (:meth:`OutputStore.clean_temp`;
with several processes on one store: :func:`prepare_shared`, once, before they start). Two processes numbering
images in one folder cannot overwrite each other: the loser of a name takes the next one.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from sumie.errors import SumieError
from sumie.pipelines.output import next_free_path, save_image

__all__ = ["JobRecord", "JobRecords", "OutputStore", "prepare_shared", "recover_dead"]

_TEMP = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # sumie.pipelines.output._write_tmp's names
_CLAIM_TRIES = 20
_EXT = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what the output folder serves


class OutputStore:
    """Numbered image files under one output folder; one writer at a time so numbers never collide."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    def clean_temp(self) -> list[Path]:
        """Remove the temporary files of writes a killed process left (``.NAME.HEX.tmp`` in the image folders;
        a finished image is renamed into place, so a temporary one is never a result); returns them."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for folder in self.root.iterdir():
            if not folder.is_dir() or not folder.name.endswith("-images"):
                continue
            for tmp in folder.rglob(".*.tmp"):
                if _TEMP.fullmatch(tmp.name) and tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
        return removed

    def save(self, kind: str, image: Image.Image, seed: int, infotext: str | None, *, fmt: str = "png",
             quality: int = 80, when: float | None = None) -> Path:
        """Write one image of a ``kind`` ("txt2img" / "img2img" / "extras") job; returns its path."""
        day = datetime.fromtimestamp(when if when is not None else time.time()).strftime("%Y-%m-%d")
        folder = self.root / f"{kind}-images" / day
        with self._lock:
            for _ in range(_CLAIM_TRIES):  # another process (a Ray replica) may take the same number first
                path = next_free_path(folder, str(seed), ext=_EXT.get(fmt.lower(), ".png"))
                try:
                    return save_image(image, path, infotext, quality=quality)
                except FileExistsError:
                    continue
        raise SumieError(f"{folder}: no free file name after {_CLAIM_TRIES} tries (other writers took each)")


    def find(self, rel: str) -> Path | None:
        """The image file at ``rel`` (a path relative to the output folder), or None for anything else: other
        files, absolute paths, paths that leave the folder (also through links)."""
        text = rel.replace("\\", "/")
        parts = PurePosixPath(text).parts
        if not text or text.startswith("/") or ".." in parts or "\x00" in text or (len(text) > 1 and text[1] == ":"):
            return None
        root = os.path.realpath(self.root)
        real = os.path.realpath(os.path.join(root, *parts))
        if os.path.commonpath([root, real]) != root or not real.lower().endswith(IMAGE_SUFFIXES) \
                or not os.path.isfile(real):
            return None
        return Path(real)

    def read(self, rel: str) -> bytes | None:
        """The bytes of the image file at ``rel`` (see :meth:`find`), or None."""
        path = self.find(rel)
        try:
            return None if path is None else path.read_bytes()
        except OSError:
            return None


@dataclass(frozen=True)
class JobRecord:
    """One row of the job table."""

    id: str
    kind: str
    state: str  # queued, running, done, interrupted, failed, cancelled
    created: float
    started: float | None
    finished: float | None
    error: str | None
    outputs: list[str]
    request: dict[str, Any]
    info: dict[str, Any] | None = None  # A1111's info of a finished job
    worker: str | None = None  # the process that ran it: HOST:PID
    progress: dict[str, Any] | None = None  # a running job's progress as its process last wrote it
    cancel: bool = False  # a cancel asked of the process that runs it


_COLUMNS = "id, kind, state, created, started, finished, error, outputs, request, info, worker, progress, cancel"
_ADDED = {"info": "TEXT", "worker": "TEXT", "progress": "TEXT", "cancel": "INTEGER NOT NULL DEFAULT 0"}


class JobRecords:
    """The job table in a SQLite file (WAL); safe to use from any thread."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, "
                             "state TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL, error TEXT, "
                             "outputs TEXT NOT NULL DEFAULT '[]', request TEXT NOT NULL DEFAULT '{}')")
            have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for name, kind in _ADDED.items():  # a file written by an older Sumie
                if name not in have:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def recover(self) -> int:
        """Mark jobs left queued or running by a previous process as failed, with the reason; returns how many.
        Queued jobs are not resumed: their clients (an A1111 client waits on its HTTP answer) are gone."""
        now = time.time()
        with self._lock:
            ran = self._db.execute("UPDATE jobs SET state='failed', finished=?, error=? WHERE state='running'",
                                   (now, "the server stopped while the job ran"))
            queued = self._db.execute("UPDATE jobs SET state='failed', finished=?, error=? WHERE state='queued'",
                                      (now, "the server stopped before the job started; submit it again"))
            return ran.rowcount + queued.rowcount

    def add(self, job_id: str, kind: str, request: dict[str, Any], worker: str | None = None) -> None:
        """A new job, queued in process ``worker`` (HOST:PID)."""
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, kind, state, created, request, worker) VALUES "
                             "(?, ?, 'queued', ?, ?, ?)", (job_id, kind, time.time(),
                                                           json.dumps(request, default=str), worker))

    def unfinished_workers(self, host: str) -> list[str]:
        """The processes (HOST:PID) of ``host`` that hold queued or running jobs."""
        with self._lock:
            return [w for (w,) in self._db.execute(
                "SELECT DISTINCT worker FROM jobs WHERE state IN ('queued', 'running') AND worker LIKE ?",
                (f"{host}:%",))]

    def fail_workers(self, workers: list[str]) -> int:
        """Mark failed the unfinished jobs of ``workers``, processes that stopped; returns how many."""
        now, count = time.time(), 0
        with self._lock:
            for w in workers:
                count += self._db.execute("UPDATE jobs SET state='failed', finished=?, error=? WHERE worker=? AND "
                                          "state IN ('queued', 'running')",
                                          (now, f"the process that held the job ({w}) stopped", w)).rowcount
        return count

    def start(self, job_id: str, worker: str | None = None) -> None:
        """The job began running in process ``worker`` (HOST:PID)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET state='running', started=?, worker=? WHERE id=?",
                             (time.time(), worker, job_id))

    def finish(self, job_id: str, state: str, *, error: str | None = None, outputs: list[str] | None = None,
               info: dict[str, Any] | None = None) -> None:
        """The job ended (done, interrupted, failed or cancelled)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET state=?, finished=?, error=?, outputs=?, info=?, progress=NULL "
                             "WHERE id=?", (state, time.time(), error, json.dumps(outputs or []),
                                            None if info is None else json.dumps(info), job_id))

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> bool:
        """Write a running job's progress; returns whether a cancel was asked of it (by any process)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET progress=? WHERE id=? AND state='running'",
                             (json.dumps(progress), job_id))
            row = self._db.execute("SELECT cancel FROM jobs WHERE id=?", (job_id,)).fetchone()
        return bool(row and row[0])

    def request_cancel(self, job_id: str) -> bool:
        """Ask the process that has a queued or running job to cancel it; False when it has ended (or is unknown)."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET cancel=1 WHERE id=? AND state IN ('queued', 'running')",
                                   (job_id,))
        return cur.rowcount > 0

    def running(self) -> JobRecord | None:
        """The running job that started first (any process), or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state='running' ORDER BY started LIMIT 1"
                                   ).fetchone()
        return _record(row)

    def get(self, job_id: str) -> JobRecord | None:
        """One job's record, or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _record(row)

    def exists(self, job_id: str) -> bool:
        """Whether a record with this id exists."""
        return self.get(job_id) is not None

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


def _record(row: tuple[Any, ...] | None) -> JobRecord | None:
    if row is None:
        return None
    return JobRecord(*row[:7], json.loads(row[7]), json.loads(row[8]), _loads(row[9]), row[10], _loads(row[11]),
                     bool(row[12]))


def recover_dead(records: JobRecords, host: str) -> int:
    """Mark failed the unfinished jobs of processes of ``host`` (this machine) that no longer run: a replica that
    died while others share the records; returns how many. ``records`` may be another machine's
    (:mod:`sumie.serve.store_actor`): the processes are looked up here."""
    dead = [w for w in records.unfinished_workers(host)
            if w.rpartition(":")[2].isdigit() and not _alive(int(w.rpartition(":")[2]))]
    return records.fail_workers(dead) if dead else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def prepare_shared(output_dir: Path, database: Path) -> tuple[int, list[Path]]:
    """What a single server does at start, done once before the processes of a shared store start (they skip
    it, or each would fail the others' running jobs): (unfinished records marked failed, temp files removed)."""
    records = JobRecords(database)
    try:
        return records.recover(), OutputStore(output_dir).clean_temp()
    finally:
        records.close()
