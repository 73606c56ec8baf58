"""Load on `digitlab serve`: requests per second and p50/p95 latency, for one model and for three.

Starts the real server (uvicorn) on a free port of 127.0.0.1 in its own process, then 16
concurrent clients (threads with httpx) send 300 POST /api/predict requests in all, each
a photo-like PNG of 300-700 px. Run it on a quiet machine: the clients share the 2 cores.

    python benchmarks/serve_load.py --data-dir ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from common import cpu_name, quiet_run
from digitlab.config import TrainConfig, preset_config
from digitlab.data import read_folder
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/helpers: not shipped in the wheel
from helpers.photos import synthetic_photo

REQUESTS, CLIENTS = 300, 16


def start(runs: list[Path]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "digitlab", "serve", *map(str, runs), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(url + "/api/models", timeout=1).raise_for_status()
            return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def load(url: str, photos: list[bytes]) -> dict:
    def client(k: int) -> list[float]:
        times = []
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(REQUESTS // CLIENTS + (k < REQUESTS % CLIENTS)):
                start = time.perf_counter()
                http.post("/api/predict", files={"image": ("p.png", photos[(k + i) % len(photos)])}).raise_for_status()
                times.append(time.perf_counter() - start)
        return times

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        latencies = sorted(t for times in pool.map(client, range(CLIENTS)) for t in times)
    wall = time.perf_counter() - start
    return {"answered": len(latencies), "rps": len(latencies) / wall,
            "p50": statistics.median(latencies), "p95": latencies[int(0.95 * len(latencies)) - 1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the four MNIST files")
    args = parser.parse_args()
    data = read_folder(args.data_dir)
    rng = np.random.default_rng(0)
    photos = []
    for i in range(32):
        buffer = io.BytesIO()
        synthetic_photo(data.test_images[i].numpy(), rng).convert("L").save(buffer, format="PNG")
        photos.append(buffer.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: Path(tmp) / name for name in ("convnet", "cnn", "mlp")}
        quiet_run(preset_config("best", epochs=1, max_batches=50), data, runs["convnet"])
        quiet_run(TrainConfig(model="cnn", task="classify", epochs=1, max_batches=50), data, runs["cnn"])
        quiet_run(TrainConfig(model="mlp", epochs=1, max_batches=50), data, runs["mlp"])
        print(f"{cpu_name()}, {REQUESTS} requests from {CLIENTS} clients, photo-like PNGs of 300-700 px\n")
        print("| models loaded | answered | requests/s | p50 latency (ms) | p95 latency (ms) |\n|---|---:|---:|---:|---:|")
        for chosen in (["convnet"], ["convnet", "cnn", "mlp"]):
            process, url = start([runs[n] for n in chosen])
            try:
                r = load(url, photos)
            finally:
                process.send_signal(signal.SIGINT)
                process.wait(timeout=30)
            print(f"| {', '.join(chosen)} | {r['answered']} | {r['rps']:.1f} | {r['p50'] * 1000:.0f} | "
                  f"{r['p95'] * 1000:.0f} |", flush=True)


if __name__ == "__main__":
    main()
