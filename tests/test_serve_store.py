"""The server's disk state: job records that survive a restart, outputs numbered and written atomically."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from PIL import Image

from sumie.serve.store import JobRecords, OutputStore


def test_records_survive_a_restart_and_unfinished_jobs_are_marked_failed(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    first = JobRecords(db)
    first.add("done-1", "txt2img", {"prompt": "a"})
    first.start("done-1")
    first.finish("done-1", "done", outputs=["/x/00000-1.png"])
    first.add("running-1", "txt2img", {})
    first.start("running-1")
    first.add("queued-1", "img2img", {})
    # no close(): the process "dies" here; WAL keeps what was committed
    second = JobRecords(db)
    assert second.recover() == 2
    done = second.get("done-1")
    assert done is not None and done.state == "done" and done.outputs == ["/x/00000-1.png"]
    assert done.request == {"prompt": "a"} and done.finished is not None and done.finished >= done.started
    for jid in ("running-1", "queued-1"):
        rec = second.get(jid)
        assert rec is not None and rec.state == "failed" and "stopped" in (rec.error or "")
    assert second.get("nope") is None
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    first.close()
    second.close()


def test_outputs_are_numbered_like_a1111_from_many_threads(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    day = tmp_path / "txt2img-images" / "2026-01-02"
    day.mkdir(parents=True)
    (day / "00041-7.png").write_bytes(b"")  # numbering continues after what is there
    when = 1767355200.0  # 2026-01-02 12:00 UTC; the folder is the local date
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    paths: list[Path] = []
    lock = threading.Lock()

    def save(k: int) -> None:
        p = store.save("txt2img", img, 100 + k, f"seed {100 + k}", when=when)
        with lock:
            paths.append(p)

    threads = [threading.Thread(target=save, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    folder = paths[0].parent
    assert folder.parent == tmp_path / "txt2img-images"
    numbers = sorted(int(p.name[:5]) for p in paths)
    start = 42 if folder == day else 0
    assert numbers == list(range(start, start + 8))
    for p in paths:
        seed = int(p.stem.split("-")[1])
        with Image.open(p) as im:
            assert im.info["parameters"] == f"seed {seed}"
    assert sorted(f.name for f in folder.iterdir() if not f.name.endswith(".png")) == []
    jpg = store.save("img2img", img, 5, "text", fmt="jpg", when=when)
    assert jpg.suffix == ".jpg" and jpg.parent.parent.name == "img2img-images"
