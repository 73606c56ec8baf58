"""Load on `digitlab serve`, against the floor of its own stack: the README's serving table.

The floor is a bare FastAPI endpoint on the same uvicorn that reads the same multipart upload
and answers a constant. Both servers run in processes of their own on 127.0.0.1; the clients
(threads with httpx) post 280x280 canvas PNGs as the page sends them (MNIST test digits drawn as
solid black strokes on white, RGBA). Each row is measured with its floor, interleaved; the ratio
is the figure to trust on a shared machine. Then 8 and 32 concurrent uploads of a 6300x6300
RGBA PNG (40 megapixels in 170 kB): every one answered, the server's peak memory, and whether it
still answers. Run it on a quiet machine: the clients share the 2 cores. Each row takes --rounds
turns of the floor and ours (the order alternating) and shows their medians, and the median of the
rounds' ratios (so a ratio need not be the ratio of the medians beside it): one turn alone moved by
1.5x on these shared VMs. The last column is where the time goes: the CPU per request of the server
with its picture workers, and of the clients, which share the cores with it.

    python benchmarks/serve_load.py --data-dir ../shared/data/mnist [--rounds 3]
    python benchmarks/serve_load.py --bare PORT      (the floor's server, started by the above)
"""

import argparse
import concurrent.futures
import io
import resource
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
from PIL import Image

from common import cpu_name, quiet_run
from digitlab.config import TrainConfig, preset_config
from digitlab.data import read_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/helpers: not shipped in the wheel
from helpers.processes import tree_cpu_seconds, tree_peak_mb  # noqa: E402

REQUESTS = 300


def bare(port: int) -> None:
    """The floor: FastAPI on uvicorn, reading the upload and answering a constant. (No `from __future__
    import annotations` in this file: FastAPI reads these annotations at run time.)"""
    import uvicorn
    from fastapi import FastAPI, File, UploadFile

    app = FastAPI()

    @app.post("/api/predict")
    async def predict(image: UploadFile = File(...)):
        await image.read()
        return {"text": "7"}

    @app.get("/api/models")
    def models():
        return []

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str]) -> tuple[subprocess.Popen, str]:
    port = _port()
    process = subprocess.Popen([*command, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/api/models", timeout=1).raise_for_status()
            return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not start: {' '.join(command)}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)


def load(url: str, pictures: list[bytes], clients: int, path: str = "/api/predict", server: int | None = None) -> dict:
    """Requests/s, p50 and p95 under `clients`; with the `server`'s pid, the CPU per request (ms) of the
    server with its workers and of the clients (this process), which share the cores."""
    def client(k: int) -> list[float]:
        times = []
        with httpx.Client(base_url=url, timeout=300) as http:
            for i in range(REQUESTS // clients + (k < REQUESTS % clients)):
                start = time.perf_counter()
                http.post(path, files={"image": ("pad.png", pictures[(k + i) % len(pictures)])}).raise_for_status()
                times.append(time.perf_counter() - start)
        return times

    def cpu() -> tuple[float, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return (tree_cpu_seconds(server) if server else 0.0), own.ru_utime + own.ru_stime

    before, start = cpu(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = sorted(t for times in pool.map(client, range(clients)) for t in times)
    elapsed, after = time.perf_counter() - start, cpu()
    return {"rps": len(latencies) / elapsed, "p50": statistics.median(latencies),
            "p95": latencies[int(0.95 * len(latencies)) - 1],
            "server_cpu": (after[0] - before[0]) / len(latencies) * 1000,
            "client_cpu": (after[1] - before[1]) / len(latencies) * 1000}


def row(commands: dict, pictures: list[bytes], clients: int, rounds: int) -> tuple[dict, dict, dict]:
    """`rounds` turns of each server (a fresh process each, the order alternating), under `clients`: the
    median of each figure per server, and the median of the rounds' ours-to-bare ratios."""
    runs = {name: [] for name in commands}
    for turn in range(rounds):
        for name in sorted(commands, reverse=bool(turn % 2)):
            command, path = commands[name]
            process, url = start(command)
            try:
                load(url, pictures[:4], clients, path)  # warm-up
                runs[name].append(load(url, pictures, clients, path, server=process.pid))
            finally:
                stop(process)
    medians = {name: {k: statistics.median(r[k] for r in results) for k in results[0]}
               for name, results in runs.items()}
    ratios = {k: statistics.median(o[k] / b[k] for o, b in zip(runs["ours"], runs["bare"])) for k in ("rps", "p95")}
    return medians["ours"], medians["bare"], ratios


def canvases(data, count: int = 32) -> list[bytes]:
    """MNIST test digits as the page's canvas sends a drawing: 280x280, solid black strokes with smooth
    edges on white (the page draws 18-px lines), RGBA PNG."""
    pictures = []
    for i in range(count):
        ink = Image.fromarray(data.test_images[i].numpy()).resize((280, 280), Image.Resampling.BICUBIC)
        grey = 255 - np.clip((np.asarray(ink, dtype=np.int32) - 96) * 4, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)])).save(buffer, "PNG")
        pictures.append(buffer.getvalue())
    return pictures


def huge_uploads(command: list[str]) -> None:
    pixels = np.full((6300, 6300, 4), 255, np.uint8)
    pixels[1500:4800, 3000:3400, :3] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    huge = buffer.getvalue()
    del pixels
    print(f"\n{len(huge) // 1024} kB PNG of 6300x6300 RGBA (40 MP, 160 MB decoded), uploaded at once:\n")
    print("| uploads at once | answered (200 or 400) | server peak memory (with its workers) | alive after |\n"
          "|---:|---:|---:|---|")
    for count in (8, 32):
        process, url = start(command)
        try:
            def upload(_, url=url) -> int:
                try:
                    return httpx.post(url + "/api/predict", files={"image": ("huge.png", huge)},
                                      timeout=600).status_code
                except httpx.HTTPError:
                    return 0

            with concurrent.futures.ThreadPoolExecutor(count) as pool:
                codes = list(pool.map(upload, range(count)))
            alive = process.poll() is None and httpx.get(url + "/api/models", timeout=10).status_code == 200
            answered = sum(c in (200, 400) for c in codes)
            print(f"| {count} | {answered} of {count} | {tree_peak_mb(process.pid):,.0f} MB | "
                  f"{'yes' if alive else 'no'} |", flush=True)
        finally:
            if process.poll() is None:
                stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder with the four MNIST files")
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 21), metavar="N",
                        help="turns of each server per row, 1-20 (default: %(default)s)")
    parser.add_argument("--bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        return bare(args.bare)
    if not args.data_dir:
        parser.error("--data-dir is required")
    data = read_folder(args.data_dir)
    pictures = canvases(data)
    floor = [sys.executable, __file__, "--bare"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: Path(tmp) / name for name in ("fast", "cnn", "mlp")}
        quiet_run(preset_config("fast", epochs=1, max_batches=100), data, runs["fast"])
        quiet_run(TrainConfig(model="cnn", task="classify", epochs=1, max_batches=50), data, runs["cnn"])
        quiet_run(TrainConfig(model="mlp", epochs=1, max_batches=50), data, runs["mlp"])
        from digitlab.serving.export import export_onnx

        onnx = export_onnx(runs["fast"], Path(tmp) / "fast.onnx")  # the same model, on onnxruntime
        ours = {"1 model": [runs["fast"]], "3 models": list(runs.values()), "1 model, ONNX": [onnx]}
        print(f"{cpu_name()}; {REQUESTS} requests per turn, 280x280 canvas PNGs; each row the median of "
              f"{args.rounds} turns of ours and the bare endpoint, alternating\n")
        print("| server | clients | requests/s | p50 (ms) | p95 (ms) | bare endpoint: req/s, p50, p95 | "
              "req/s vs bare | p95 vs bare | CPU ms a request (server, clients): ours; bare |\n"
              "|---|---:|---:|---:|---:|---|---:|---:|---|")
        for label, chosen, clients, path in (("1 model", "1 model", 1, "/api/predict"),
                                             ("1 model", "1 model", 16, "/api/predict"),
                                             ("1 model, ONNX", "1 model, ONNX", 1, "/api/predict"),
                                             ("1 model, ONNX", "1 model, ONNX", 16, "/api/predict"),
                                             ("3 models", "3 models", 16, "/api/predict"),
                                             ("1 model, feature maps", "1 model", 16, "/api/predict?maps=1")):
            commands = {"bare": (floor, "/api/predict"),
                        "ours": ([sys.executable, "-m", "digitlab", "serve", *map(str, ours[chosen]), "--port"], path)}
            o, b, ratios = row(commands, pictures, clients, args.rounds)
            print(f"| {label} | {clients} | {o['rps']:.0f} | {o['p50'] * 1000:.1f} | {o['p95'] * 1000:.0f} | "
                  f"{b['rps']:.0f}, {b['p50'] * 1000:.1f}, {b['p95'] * 1000:.0f} | {ratios['rps']:.2f}x | "
                  f"{ratios['p95']:.2f}x | {o['server_cpu']:.1f}, {o['client_cpu']:.1f}; {b['server_cpu']:.1f}, "
                  f"{b['client_cpu']:.1f} |",
                  flush=True)
        huge_uploads([sys.executable, "-m", "digitlab", "serve", str(runs["fast"]), "--port"])


if __name__ == "__main__":
    main()
