"""`digitlab serve` for real: uvicorn on a free port of 127.0.0.1, its JSON API, a real Chromium
drawing on the page through Playwright, and `digitlab export` run in onnxruntime."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import ROOT
from helpers.photos import synthetic_photo
from helpers.processes import tree_peak_mb

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def runs(served_model, chapter_model):
    """The session's shared models: a calibrated classifier that reads hand-drawn digits (the fast
    recipe; on the full set where there is one) and the chapter's regression cnn."""
    return [served_model, chapter_model]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served(str):
    """A server's URL, and the process serving it."""

    pid: int


@contextlib.contextmanager
def _serving(runs, *options: str, python: str = sys.executable):
    """`digitlab serve RUNS --port P OPTIONS` in a real process; yields its URL, then stops it with Ctrl-C."""
    port = _free_port()
    process = subprocess.Popen([python, "-m", "digitlab", "serve", *map(str, runs), "--port", str(port),
                                *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    url = Served(f"http://127.0.0.1:{port}")
    url.pid = process.pid
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/api/models", timeout=2).raise_for_status()
            break
        except httpx.HTTPError:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the server did not start within 60 s"
            time.sleep(0.3)
    yield url
    process.send_signal(signal.SIGINT)  # Ctrl-C stops it: one line, exit 130
    stdout, stderr = process.communicate(timeout=30)
    assert f"serving {len(runs)} model{'s' * (len(runs) > 1)} at {url}/" in stdout
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("digitlab: interrupted")


@pytest.fixture(scope="module")
def server(runs):
    with _serving(runs) as url:
        yield url


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _drawn(strokes: list[list[tuple[int, int]]], size: int = 280, width: int = 18) -> bytes:
    page = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(page)
    for line in strokes:
        draw.line(line, fill=0, width=width, joint="curve")
    return _png(page)


SEVEN = [[(70, 60), (210, 60), (120, 230)]]
# 2026 in pen strokes, in a 560x200 box: each digit 100 px wide
NUMBER = {"2": [[(30, 60), (70, 30), (110, 60), (100, 100), (30, 170), (120, 170)]],
          "0": [[(190, 30), (230, 50), (240, 100), (225, 160), (190, 175), (155, 160), (140, 100), (150, 50),
                 (190, 30)]],
          "6": [[(460, 30), (420, 60), (400, 120), (410, 165), (450, 175), (485, 150), (480, 115), (445, 105),
                 (410, 130)]]}


def _number_png() -> bytes:
    page = Image.new("L", (560, 200), 255)
    draw = ImageDraw.Draw(page)
    for digit, x in zip("2026", (0, 130, 260, 390)):
        first = min(x for line in NUMBER[digit] for x, _ in line)
        for line in NUMBER[digit]:
            draw.line([(px - first + x + 30, py) for px, py in line], fill=0, width=14, joint="curve")
    return _png(page)


def _seen(answer: dict) -> Image.Image:
    return Image.open(io.BytesIO(__import__("base64").b64decode(answer["image"].split(",", 1)[1])))


def test_the_api_reads_a_drawing_with_every_model(server):
    models = httpx.get(server + "/api/models").json()
    assert [m["model"] for m in models] == ["convnet_small", "cnn"]
    assert models[0]["params"] == 29178 and 0.9 < models[0]["test_accuracy"] <= 1
    assert re.fullmatch(r"[\d,]+ MNIST digits|the offline sample's 4,000 digits", models[0]["trained_on"])
    assert models[1]["task"] == "regress" and models[1]["conv_layers"] == ["conv1", "conv2"]
    answer = httpx.post(server + "/api/predict", files={"image": ("seven.png", _drawn(SEVEN))}).json()
    first, chapter = answer["models"]
    assert first["text"] == "7" and first["digit"] == 7 and len(first["digits"]) == 1
    seven = first["digits"][0]
    assert seven["digit"] == 7 and len(seven["probabilities"]) == 10 and abs(sum(seven["probabilities"]) - 1) < 1e-3
    assert answer["threshold"] == 0.8 and first["calibrated"] is True  # the preset validates, so it is calibrated
    assert first["sure"] == seven["sure"] == (max(seven["probabilities"]) >= 0.8) and chapter["sure"] is None
    assert seven["confidence"] == first["confidence"] == max(seven["probabilities"]) or \
        abs(seven["confidence"] - max(seven["probabilities"])) < 1e-5
    assert [t["digit"] for t in seven["top3"]][0] == 7 and len(seven["box"]) == 4
    assert "value" in chapter["digits"][0] and 0 <= chapter["digit"] <= 9
    assert "probabilities" not in chapter["digits"][0]
    assert _seen(answer).size == (28, 28) and _seen(answer).mode == "L"
    assert "feature_maps" not in seven  # only when asked
    schema = httpx.get(server + "/openapi.json").json()
    assert {p["name"] for p in schema["paths"]["/api/predict"]["post"]["parameters"]} == {"maps"}
    assert httpx.get(server + "/docs").status_code == 404  # it would fetch its scripts from a CDN


def test_feature_maps_only_when_asked(server):
    answer = httpx.post(server + "/api/predict?maps=1", files={"image": ("seven.png", _drawn(SEVEN))}).json()
    first, chapter = (m["digits"][0] for m in answer["models"])
    assert [f["layer"] for f in chapter["feature_maps"]] == ["conv1", "conv2"]
    assert chapter["feature_maps"][0]["shape"] == [20, 28, 28] and len(first["feature_maps"]) == 3
    grid = Image.open(io.BytesIO(__import__("base64").b64decode(chapter["feature_maps"][0]["grid"].split(",", 1)[1])))
    assert grid.size == (8 * 29 - 1, 3 * 29 - 1)  # 20 maps of 28x28 in rows of 8, a pixel apart
    plain = httpx.post(server + "/api/predict", files={"image": ("seven.png", _drawn(SEVEN))}).json()
    assert plain["models"][0]["digits"][0]["probabilities"] == answer["models"][0]["digits"][0]["probabilities"]


def test_a_number_is_read_whole_as_predict_reads_it(server, runs, tmp_path, cli):
    number = _number_png()
    answer = httpx.post(server + "/api/predict", files={"image": ("2026.png", number)}).json()["models"][0]
    (tmp_path / "2026.png").write_bytes(number)
    predicted = cli("predict", str(runs[0]), str(tmp_path / "2026.png"), "--json")
    assert predicted.returncode == 0, predicted.stderr
    reading = json.loads(predicted.stdout)[0]
    assert answer["text"] == reading["text"] == "2026"
    for key in ("sure", "confidence", "digits"):
        assert answer[key] == reading[key], key


def test_only_this_servers_own_page_reaches_it(server):
    # a page of another site whose name was pointed at 127.0.0.1 (DNS rebinding) reads nothing
    refused = httpx.get(server + "/api/models", headers={"host": "attacker.example"})
    assert refused.status_code == 421 and "--allow-host" in refused.json()["error"]
    # a page of another site posting a form (a "simple" request: no preflight) is refused before it is read
    form = {"image": ("seven.png", _drawn(SEVEN))}
    posted = httpx.post(server + "/api/predict", files=form, headers={"origin": "http://evil.example"})
    assert posted.status_code == 403 and "--cors" in posted.json()["error"]
    preflight = httpx.options(server + "/api/predict", headers={"origin": "http://evil.example",
                                                                 "access-control-request-method": "POST"})
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    # the server's own page (and any client that sends no Origin) is answered, with no CORS headers
    own = httpx.post(server + "/api/predict", files=form, headers={"origin": server})
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers
    assert httpx.get(server.replace("127.0.0.1", "localhost") + "/api/models").status_code == 200


def test_allowed_hosts_and_origins_and_the_threshold(runs):
    with _serving(runs, "--threshold", "1", "--allow-host", "digits.example", "--allow-host", "lab.example",
                  "--cors", "http://trusted.example") as url:
        answer = httpx.post(url + "/api/predict", files={"image": ("seven.png", _drawn(SEVEN))}).json()
        port = url.rsplit(":", 1)[1]
        named = [httpx.get(url + "/api/models", headers={"host": f"{name}:{port}"}).status_code
                 for name in ("digits.example", "lab.example", "other.example")]
        trusted = httpx.post(url + "/api/predict", files={"image": ("seven.png", _drawn(SEVEN))},
                             headers={"origin": "http://trusted.example"})
        preflight = httpx.options(url + "/api/predict", headers={"origin": "http://trusted.example",
                                                                  "access-control-request-method": "POST"})
        other = httpx.get(url + "/api/models", headers={"origin": "http://evil.example"})
    assert answer["threshold"] == 1 and answer["models"][0]["sure"] is False
    assert answer["models"][0]["text"] == "7"  # the best guess is still given
    assert named == [200, 200, 421] and other.status_code == 403
    assert trusted.status_code == 200 and trusted.headers["access-control-allow-origin"] == "http://trusted.example"
    assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]


def test_ctrl_c_stops_a_server_that_a_client_sent_half_a_request(runs):
    from digitlab.serving.server import SHUTDOWN_WAIT

    with socket.socket() as half, _serving(runs[:1]) as url:  # the socket stays open until the server is gone
        half.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        half.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     b"boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n")  # and never the rest
        time.sleep(0.5)
        stopping = time.monotonic()
    # _serving sent Ctrl-C and saw one line and exit 130 (uvicorn waited for the request forever before)
    assert SHUTDOWN_WAIT - 0.5 < time.monotonic() - stopping < SHUTDOWN_WAIT + 15  # it waited for the request


def test_a_plain_client_reads_the_413_of_a_30_mb_upload(server):
    import urllib.error
    import urllib.request

    body = (b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + bytes(30 * 1024 * 1024) + b"\r\n--x--\r\n")
    request = urllib.request.Request(server + "/api/predict", data=body, method="POST",
                                     headers={"content-type": "multipart/form-data; boundary=x"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413 and "over 10 MB" in json.loads(refused.value.read())["error"]
    assert httpx.get(server + "/api/models").status_code == 200


def test_eight_huge_uploads_at_once_cost_about_one(server):
    # 6300x6300 RGBA (40 megapixels, 160 MB decoded) in a 170 kB PNG: one picture per core is decoded at a time
    pixels = np.full((6300, 6300, 4), 255, np.uint8)
    pixels[1500:4800, 3000:3400, :3] = 0  # a 1
    huge = _png(Image.fromarray(pixels))
    del pixels

    def upload(_) -> int:
        return httpx.post(server + "/api/predict", files={"image": ("huge.png", huge)}, timeout=300).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(upload, range(8)))
    assert codes == [200] * 8
    assert httpx.post(server + "/api/predict", files={"image": ("seven.png", _drawn(SEVEN))}).status_code == 200
    peak = tree_peak_mb(server.pid)
    assert peak < 1500, f"the server and its workers peaked at {peak:.0f} MB"


def test_micro_batched_answers_are_one_at_a_times(runs, digits):
    from digitlab.serving.backends import load_models
    from digitlab.serving.reader import Reader
    from digitlab.serving.workers import LOOP_BYTES, LOOP_PIXELS

    rng = np.random.default_rng(1)
    pictures = [_drawn(SEVEN), _number_png()]
    pictures += [_png(synthetic_photo(digits.test_images[i].numpy(), rng).convert("L")) for i in range(24)]
    small = sum(len(p) <= LOOP_BYTES and np.prod(Image.open(io.BytesIO(p)).size) <= LOOP_PIXELS for p in pictures)
    assert 2 < small < len(pictures)  # 300-700 px photos: some of each size
    reader = Reader(load_models(runs), wait=0.02)

    async def read_all() -> tuple[list, list]:
        alone = [await reader.read(p) for p in pictures]  # one at a time: a forward pass each
        assert all(b.batches == len(pictures) for b in reader.batchers)
        # each the server's only work: the small ones were read on its loop, the others by a worker
        assert reader.workers.read_on_loop == small
        together = await asyncio.gather(*(reader.read(p) for p in pictures))  # all at once
        assert reader.workers.read_on_loop == small + 1  # the first one alone; the rest by the workers
        return alone, together

    try:
        alone, together = asyncio.run(read_all())
    finally:
        reader.close()
    batched = reader.batchers[0]
    assert batched.batches < 2 * len(pictures) - 1  # some requests shared a forward pass
    for one, other in zip(alone, together):
        assert one["image"] == other["image"]
        for a, b in zip(one["models"], other["models"]):
            assert a["text"] == b["text"] and a["sure"] == b["sure"]
            for x, y in zip(a["digits"], b["digits"]):
                assert x["digit"] == y["digit"] and x["box"] == y["box"]
                # float noise between a batch and a single pass can tip the shown rounding (5 decimals for a
                # probability, 4 for a value) by one unit, and no more
                unit = 1e-5 if "probabilities" in x else 1e-4
                assert np.allclose(x.get("probabilities", x.get("value")), y.get("probabilities", y.get("value")),
                                   rtol=0, atol=unit * 1.01)


def test_bad_uploads_get_a_json_error_and_the_server_goes_on(server, tmp_path):
    whole = _drawn(SEVEN)
    huge = Image.new("1", (8000, 6000), 1)  # 48 megapixels, a few kB as PNG
    cases = [
        ({"image": ("notes.png", b"this is not an image")}, 400, "not an image"),
        ({"image": ("cut.png", whole[: len(whole) // 2])}, 400, "broken or truncated"),
        ({"image": ("blank.png", _png(Image.new("L", (200, 200), 255)))}, 400, "no digit found"),
        ({"image": ("huge.png", _png(huge))}, 400, "megapixels"),
        ({"picture": ("seven.png", whole)}, 422, "field named 'image'"),
        ({"image": ("big.bin", bytes(11 * 1024 * 1024))}, 413, "over 10 MB"),
    ]
    for files, status, fragment in cases:
        response = httpx.post(server + "/api/predict", files=files, timeout=30)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert fragment in error and "\n" not in error
        assert httpx.post(server + "/api/predict", files={"image": ("seven.png", whole)}).status_code == 200

    def chunks():  # no Content-Length: counted as it arrives, and cut off at 10 MB
        yield (b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(12):
            yield bytes(1024 * 1024)
        yield b"\r\n--x--\r\n"

    response = httpx.post(server + "/api/predict", content=chunks(), timeout=30,
                          headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413
    assert httpx.get(server + "/api/models").status_code == 200


def test_sixteen_clients_at_once_are_all_answered(server, digits):
    rng = np.random.default_rng(0)
    photos = [_png(synthetic_photo(digits.test_images[i].numpy(), rng).convert("L")) for i in range(16)]

    def client(k: int) -> list[int]:
        with httpx.Client(base_url=server, timeout=120) as http:
            return [http.post("/api/predict", files={"image": ("p.png", photos[k])}).status_code for _ in range(8)]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = [code for codes in pool.map(client, range(16)) for code in codes]
    assert len(codes) == 128 and set(codes) == {200}


# ---------------------------------------------------------------------------- a real browser

def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install -y chromium)")
    return path


def _draw(page, strokes: list[list[tuple[float, float]]]) -> None:
    """Mouse strokes on #pad, in fractions of its size."""
    box = page.locator("#pad").bounding_box()
    for line in strokes:
        x, y = line[0]
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        for (x0, y0), (x1, y1) in zip(line, line[1:]):
            for t in np.linspace(0, 1, 12)[1:]:
                page.mouse.move(box["x"] + (x0 + t * (x1 - x0)) * box["width"],
                                box["y"] + (y0 + t * (y1 - y0)) * box["height"])
        page.mouse.up()


DRAWINGS = {
    "1": [[(0.5, 0.15), (0.5, 0.85)]],
    "7": [[(0.25, 0.2), (0.75, 0.2), (0.42, 0.85)]],
    "0": [[(0.5, 0.15), (0.72, 0.3), (0.75, 0.6), (0.55, 0.85), (0.35, 0.75), (0.28, 0.45), (0.36, 0.22),
           (0.5, 0.15)]],
}


def _number_strokes() -> list[list[tuple[float, float]]]:
    """2026 (NUMBER) drawn across the 280-px pad, in fractions of its size: each digit 0.16 of it wide."""
    strokes = []
    for digit, left in zip("2026", (0.04, 0.29, 0.54, 0.79)):
        first = min(x for line in NUMBER[digit] for x, _ in line)
        strokes += [[(left + (x - first) / 90 * 0.16, 0.1 + y / 200 * 0.8) for x, y in line] for line in NUMBER[digit]]
    return strokes


def test_a_real_browser_draws_and_uploads(server, digits, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    rng = np.random.default_rng(3)
    photo = tmp_path / "photo.png"
    synthetic_photo(digits.test_images[int((digits.test_labels == 3).nonzero()[0, 0])].numpy(), rng).save(photo)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        statuses: list[int] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        # JavaScript errors; Chromium also logs each 4xx answer as a console error, counted apart below
        page.on("console", lambda m: errors.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
        page.on("response", lambda r: statuses.append(r.status) if "/api/" in r.url else None)
        page.goto(server + "/")
        # before anything is drawn: the models, with what they were trained on, and no broken picture
        sync_api.expect(page.locator(".model .waiting")).to_have_count(2)
        assert "trained on" in page.locator(".model h2").first.inner_text()
        assert not page.locator("#seen").is_visible() or page.evaluate("!document.getElementById('seen').src")
        answers = {}
        for digit, strokes in DRAWINGS.items():
            page.click("#clear")
            _draw(page, strokes)
            try:  # readings come as the stroke grows; the one after the last stroke must be right
                sync_api.expect(page.locator("#answer")).to_have_text(digit, timeout=15000)
            except AssertionError:
                pass
            page.wait_for_timeout(1000)  # and no later reading changes it
            answers[digit] = page.locator("#answer").inner_text()
        assert answers == {d: d for d in DRAWINGS}, answers
        assert page.locator(".model").count() == 2
        assert page.locator(".model").first.locator(".bar").count() == 10
        assert page.locator(".maps img").count() == 3 + 2  # convnet_small's 3 conv layers, the cnn's 2
        page.click("#clear")
        _draw(page, _number_strokes())  # a whole number, read whole
        sync_api.expect(page.locator("#answer")).to_have_text(re.compile(r"^\d{4}$"), timeout=15000)
        page.wait_for_timeout(1000)  # the reading after the last stroke
        if httpx.get(server + "/api/models").json()[0]["trained_on"] == "55,000 MNIST digits":
            # read right, or honestly unsure with it among the two guesses: the narrow 0 is a near thing
            # for a one-epoch model (measured: 0 at 39%, 8 at 47%, on some runs), and the small set's
            # model may misread it outright
            label = page.locator("#answer-label").inner_text()
            assert page.locator("#answer").inner_text() == "2026" or (
                label.startswith("first model is not sure: ") and "2026" in label.split(": ")[1].split(" or ")), label
        assert page.locator(".model").first.locator(".digit-row").count() == 4
        assert page.evaluate("document.getElementById('seen').naturalWidth") == 4 * 28
        screenshot_dir = os.environ.get("DIGITLAB_SCREENSHOT_DIR")
        if screenshot_dir:
            page.screenshot(path=str(Path(screenshot_dir) / "serve.png"), full_page=True)
        page.click("#clear")
        _draw(page, [[(0.2, 0.5), (0.35, 0.3), (0.45, 0.7), (0.6, 0.25), (0.7, 0.75), (0.8, 0.4)]])  # a scribble
        page.wait_for_timeout(1500)  # the reading after the last stroke has arrived
        verdict = page.locator(".model .verdict").first.inner_text()  # "reads 7 (93.1%)" or "not sure: 74 or 14 (..."
        confidence = float(verdict.split("(")[1].split("%")[0])
        if confidence < 80:
            assert re.fullmatch(r"not sure: (\d+) or (?!\1)\d+ \(\d+\.\d%, below 80\.0%\)", verdict), verdict
            assert page.locator("#answer-label").inner_text().startswith("first model is not sure: ")
        else:
            assert re.fullmatch(r"reads \d+ \(\d+\.\d%\)", verdict), verdict
        page.click("#clear")
        assert page.locator("#answer").inner_text() == "" and page.locator(".model .waiting").count() == 2
        page.set_input_files("#upload", str(photo))
        sync_api.expect(page.locator("#answer")).to_have_text("3", timeout=15000)
        assert page.locator(".model").first.locator(".bar").count() == 10
        assert page.evaluate("document.getElementById('seen').naturalWidth") == 28
        browser.close()
    assert errors == []
    assert statuses.count(200) >= 6 and set(statuses) <= {200, 400}, statuses


# ---------------------------------------------------------------------------- ONNX

def _onnx_check(run_dir: Path, data, tmp_path: Path, cli) -> tuple[float, float]:
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    result = cli("export", str(run_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(str(out))
    assert [i.name for i in session.get_inputs()] == ["image"]
    pixels = data.test_images.float().unsqueeze(1).numpy()  # (N, 1, 28, 28), 0-255, as MNIST stores them
    logits = np.concatenate([session.run(None, {"image": pixels[i:i + 1000]})[0] for i in range(0, len(pixels), 1000)])
    from digitlab.checkpoint import load_checkpoint
    from digitlab.evaluate import evaluate

    model, meta = load_checkpoint(run_dir)
    reference = evaluate(model, data.test_images, data.test_labels, meta.task)
    assert np.abs(logits - reference.outputs.numpy()).max() < 1e-4
    accuracy = float((logits.argmax(1) == data.test_labels.numpy()).mean())
    assert accuracy == reference.accuracy
    return accuracy, float(np.abs(logits - reference.outputs.numpy()).max())


def test_onnx_export_agrees_with_pytorch(runs, digits, tmp_path, cli):
    _onnx_check(runs[0], digits, tmp_path, cli)
    import onnx

    from digitlab.checkpoint import read_checkpoint

    props = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert float(props["temperature"]) == read_checkpoint(runs[0])[1].temperature
    out = tmp_path / "value.onnx"
    assert cli("export", str(runs[1]), "--out", str(out)).returncode == 0
    graph = onnx.load(str(out)).graph
    assert [o.name for o in graph.output] == ["value"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # any batch size


def test_onnx_on_the_full_test_set(runs, mnist, tmp_path, cli):
    accuracy, difference = _onnx_check(runs[0], mnist, tmp_path, cli)
    assert accuracy > 0.98


def test_export_does_not_depend_on_grad_mode(runs, tmp_path):
    import onnx

    from digitlab.serving.export import export_onnx

    export_onnx(runs[1], tmp_path / "a.onnx")
    with torch.no_grad():
        export_onnx(runs[1], tmp_path / "b.onnx")
    ops = [[n.op_type for n in onnx.load(str(tmp_path / f"{k}.onnx")).graph.node] for k in "ab"]
    assert ops[0] == ops[1] and "MaxPool" not in ops[0]


def test_an_exported_model_is_served_without_pytorch(server, runs, digits, tmp_path, cli):
    # a real venv holding requirements/serve-onnx.txt's libraries and digitlab, and no PyTorch
    pytest.importorskip("onnxruntime")
    from helpers.venv import build

    python = build(tmp_path / "venv", ROOT / "requirements" / "serve-onnx.txt", ROOT / "src")
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0
    model = tmp_path / "served.onnx"
    assert cli("export", str(runs[0]), "--out", str(model)).returncode == 0
    rng = np.random.default_rng(2)
    pictures = [_drawn(SEVEN), _number_png()] + [
        _png(synthetic_photo(digits.test_images[i].numpy(), rng).convert("L")) for i in range(6)]
    with _serving([model], python=str(python)) as onnx_url:
        info = httpx.get(onnx_url + "/api/models").json()[0]
        answers = [httpx.post(onnx_url + "/api/predict?maps=1", files={"image": ("p.png", p)}).json() for p in pictures]
    torch_info = httpx.get(server + "/api/models").json()[0]
    for key in ("model", "params", "test_accuracy", "trained_on"):
        assert info[key] == torch_info[key], key
    for picture, onnx_answer in zip(pictures, answers):
        (ours,) = onnx_answer["models"]
        theirs = httpx.post(server + "/api/predict", files={"image": ("p.png", picture)}).json()["models"][0]
        assert ours["text"] == theirs["text"] and ours["sure"] == theirs["sure"] and ours["calibrated"]
        assert abs(ours["confidence"] - theirs["confidence"]) < 1e-4
        for a, b in zip(ours["digits"], theirs["digits"]):
            assert a["feature_maps"] == []  # an ONNX graph has no layers to show
            assert np.abs(np.array(a["probabilities"]) - b["probabilities"]).max() < 1e-4


def test_a_file_that_is_no_exported_model_gets_one_line(tmp_path, cli):
    (tmp_path / "notes.onnx").write_text("not a model")
    for path, fragment in ((tmp_path / "notes.onnx", "not an ONNX model onnxruntime can run"),
                           (tmp_path / "missing.onnx", "no such file")):
        result = cli("serve", str(path), "--port", str(_free_port()))
        assert result.returncode == 2 and fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_export_writes_only_a_file_of_its_own(runs, tmp_path, cli):
    import stat

    for out, fragment in ((".", "names a folder"), ("", "names a folder"), ("/", "names a folder"),
                          ("/dev/null", "not a regular file"),
                          (str(tmp_path / "missing" / "m.onnx"), "folder does not exist")):
        result = cli("export", str(runs[1]), "--out", out)
        assert result.returncode == 2 and fragment in result.stderr, (out, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # a device is never replaced
    long = tmp_path / ("m" * 245 + ".onnx")  # 250 characters: the temporary name must fit too
    assert cli("export", str(runs[1]), "--out", str(long)).returncode == 0 and long.stat().st_size > 0
    taken = tmp_path / "notes.onnx"
    taken.write_text("my notes")
    refused = cli("export", str(runs[1]), "--out", str(taken))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and taken.read_text() == "my notes"
    assert cli("export", str(runs[1]), "--out", str(taken), "--overwrite").returncode == 0
    assert taken.read_bytes()[:2] != b"my"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([long.name, taken.name])
