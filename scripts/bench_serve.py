"""Load a running ``sumie serve`` with concurrent txt2img clients; print throughput, latency, 503s and failures.

    python scripts/bench_serve.py --url http://127.0.0.1:7860 --clients 8 --seconds 30 --size 32 --steps 4

Not a test: every request must complete (200) or be refused (503 with Retry-After); anything else is counted as a
failure and printed. A 200 must carry batch_size images that decode as PNGs with their seed in the infotext.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import threading
import time

import httpx
from PIL import Image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--retry-wait", type=float, default=0.5, help="seconds a refused client waits")
    args = ap.parse_args()
    lock = threading.Lock()
    latencies: list[float] = []
    refused, failures = [0], []
    stop = time.monotonic() + args.seconds

    def client(k: int) -> None:
        with httpx.Client(base_url=f"{args.url}/sdapi/v1", timeout=600) as c:
            i = 0
            while time.monotonic() < stop:
                seed = k * 1_000_000 + i
                i += 1
                t = time.monotonic()
                r = c.post("/txt2img", json={"prompt": "a red circle", "seed": seed, "width": args.size,
                                             "height": args.size, "steps": args.steps, "sampler_name": "Euler",
                                             "batch_size": args.batch_size})
                dt = time.monotonic() - t
                with lock:
                    refusal = r.status_code == 503 and r.headers.get("retry-after")
                    if refusal:
                        refused[0] += 1
                    else:
                        ok = r.status_code == 200
                        if ok:
                            body = r.json()
                            info = json.loads(body["info"])
                            ok = len(body["images"]) == args.batch_size and info["seed"] == seed and all(
                                Image.open(io.BytesIO(base64.b64decode(b))).size == (args.size, args.size)
                                for b in body["images"])
                        if ok:
                            latencies.append(dt)
                        else:
                            failures.append(f"{r.status_code}: {r.text[:200]}")
                if refusal:  # a polite client waits (at most --retry-wait, not the full Retry-After, to keep load)
                    time.sleep(args.retry_wait)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    lat = sorted(latencies)
    p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
    print(json.dumps({"clients": args.clients, "completed": len(lat), "refused_503": refused[0],
                      "failed": len(failures), "wall_s": round(wall, 2), "requests_per_s": round(len(lat) / wall, 2),
                      "images_per_s": round(len(lat) * args.batch_size / wall, 2),
                      "p50_s": round(p(0.5), 3), "p95_s": round(p(0.95), 3),
                      "mean_s": round(statistics.mean(lat), 3) if lat else None}))
    for f in failures[:5]:
        print("failure:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
