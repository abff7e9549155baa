"""Loopback load test of `sde-ray serve`: `sde-ray bench serve [--quick] [--json PATH]`.

A tiny-clip export (built in code, random weights: the cost is the model's, not its quality) is
served by one replica on a fresh local Ray cluster, Serve's HTTP proxy on a free loopback port.
For each request size b in 1, 4, 16, 64 items (half texts, half 32×32 PNG data URLs), `clients`
threads send `requests` requests in all, each waiting for its answer before the next (closed
loop); reported: requests/s, items/s, p50 / p99 latency, and the mean `serve.batch` size the
replica formed. Bounded: loopback only, a fixed number of requests per size. Ratios are items/s
against b = 1.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = (1, 4, 16, 64)


def _items(count: int) -> list:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        if i % 2:
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
            out.append({"image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()})
        else:
            out.append(f"a small red circle left of {i} blue squares")
    return out


def _post(url: str, body: bytes) -> float:
    start = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        response.read()
    return time.perf_counter() - start


def measure(url: str, size: int, requests: int, clients: int) -> dict:
    body = json.dumps({"input": _items(size)}).encode()
    _post(url, body)  # warm-up
    with urllib.request.urlopen(url.replace("/v1/embeddings", "/stats"), timeout=60) as response:
        seen = len(json.loads(response.read())["batch_sizes"])
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda _: _post(url, body), range(requests)))
    seconds = time.perf_counter() - start
    with urllib.request.urlopen(url.replace("/v1/embeddings", "/stats"), timeout=60) as response:
        batches = json.loads(response.read())["batch_sizes"][seen:]
    ordered = sorted(latencies)
    return {"items_per_request": size, "requests": requests, "clients": clients,
            "requests_per_s": round(requests / seconds, 2), "items_per_s": round(requests * size / seconds, 1),
            "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
            "mean_batch": round(float(np.mean(batches)), 1) if batches else None}


def main(json_path: str | None = None, config=None, quick: bool = False, clients: int = 4) -> list[dict]:
    import ray
    from ray import serve

    from sde_ray.config import Config, ModelConfig, with_values
    from sde_ray.embed.serve import start_service
    from sde_ray.models import build_model
    from sde_ray.ray_cluster import start_local

    config = with_values(config or Config(), {"serve.port": 0, "serve.max_items": max(SIZES)})
    requests = 8 if quick else 64
    sizes = SIZES[:2] if quick else SIZES
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(ModelConfig(name_or_path="tiny-clip"), seed=0).save_pretrained(Path(tmp) / "model")
        started = start_local(2, log_to_driver=False, fresh=True)
        try:
            url = start_service(config, str(folder)) + "/v1/embeddings"
            rows = [measure(url, size, requests, clients) for size in sizes]
        finally:
            serve.shutdown()
            if started:
                ray.shutdown()
    base = rows[0]["items_per_s"]
    print(f"tiny-clip, 1 CPU replica, serve.max_batch_size={config.serve.max_batch_size}, "
          f"{clients} closed-loop clients, {requests} requests per size, loopback HTTP")
    print(f"{'items/req':>10}{'req/s':>9}{'items/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'mean batch':>12}{'items/s ×b=1':>14}")
    for row in rows:
        row["items_per_s_ratio"] = round(row["items_per_s"] / base, 2)
        print(f"{row['items_per_request']:>10}{row['requests_per_s']:>9.1f}{row['items_per_s']:>10.1f}"
              f"{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}{str(row['mean_batch']):>12}{row['items_per_s_ratio']:>14.2f}")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
