"""What a server keeps on disk: images in A1111's folders and names, and job records in SQLite (WAL).

Images go to ``OUTPUT_DIR/txt2img-images/YYYY-MM-DD/00000-SEED.png`` (``img2img-images`` for img2img), numbered as
A1111 numbers them, written atomically with their infotext (:func:`sumie.pipelines.output.save_image`). Job records
(id, kind, state, times, error, output paths) live in one SQLite file in WAL mode, so a crash loses no finished
record; at start, jobs a previous process left queued or running are marked failed with the reason (queued jobs
are not resumed) and the temporary files of writes it left unfinished are removed (:meth:`OutputStore.clean_temp`).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from sumie.pipelines.output import next_free_path, save_image

__all__ = ["JobRecord", "JobRecords", "OutputStore"]

_TEMP = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # sumie.pipelines.output._write_tmp's names
_EXT = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp"}


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
            path = next_free_path(folder, str(seed), ext=_EXT.get(fmt.lower(), ".png"))
            return save_image(image, path, infotext, quality=quality)


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

    def add(self, job_id: str, kind: str, request: dict[str, Any]) -> None:
        """A new queued job."""
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, kind, state, created, request) VALUES (?, ?, 'queued', ?, ?)",
                             (job_id, kind, time.time(), json.dumps(request, default=str)))

    def start(self, job_id: str) -> None:
        """The job began running."""
        with self._lock:
            self._db.execute("UPDATE jobs SET state='running', started=? WHERE id=?", (time.time(), job_id))

    def finish(self, job_id: str, state: str, *, error: str | None = None, outputs: list[str] | None = None) -> None:
        """The job ended (done, interrupted, failed or cancelled)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET state=?, finished=?, error=?, outputs=? WHERE id=?",
                             (state, time.time(), error, json.dumps(outputs or []), job_id))

    def get(self, job_id: str) -> JobRecord | None:
        """One job's record, or None."""
        with self._lock:
            row = self._db.execute("SELECT id, kind, state, created, started, finished, error, outputs, request "
                                   "FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return None
        return JobRecord(*row[:7], json.loads(row[7]), json.loads(row[8]))

    def exists(self, job_id: str) -> bool:
        """Whether a record with this id exists."""
        return self.get(job_id) is not None

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
