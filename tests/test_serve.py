"""`digitlab serve` for real: uvicorn on a free port of 127.0.0.1, its JSON API, a real Chromium
drawing on the page through Playwright, and `digitlab export` run in onnxruntime."""
from __future__ import annotations

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


@contextlib.contextmanager
def _serving(runs, *options: str):
    """`digitlab serve RUNS --port P OPTIONS` in a real process; yields its URL, then stops it with Ctrl-C."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "digitlab", "serve", *map(str, runs), "--port", str(port),
                                *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
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
    assert f"serving {len(runs)} models at {url}/" in stdout
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
          "0": [[(190, 30), (230, 50), (240, 100), (225, 160), (190, 175), (155, 160), (140, 100), (150, 50), (190, 30)]],
          "6": [[(460, 30), (420, 60), (400, 120), (410, 165), (450, 175), (485, 150), (480, 115), (445, 105), (410, 130)]]}


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
    assert re.fullmatch(r"(55,000 MNIST|the offline sample's 4,000) digits", models[0]["trained_on"])
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
    assert "value" in chapter["digits"][0] and 0 <= chapter["digit"] <= 9 and "probabilities" not in chapter["digits"][0]
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


def test_below_the_threshold_every_answer_is_not_sure(runs):
    with _serving(runs, "--threshold", "1") as url:
        answer = httpx.post(url + "/api/predict", files={"image": ("seven.png", _drawn(SEVEN))}).json()
    assert answer["threshold"] == 1 and answer["models"][0]["sure"] is False
    assert answer["models"][0]["text"] == "7"  # the best guess is still given


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


def test_three_hundred_requests_from_sixteen_clients(server, digits):
    rng = np.random.default_rng(0)
    photos = [_png(synthetic_photo(digits.test_images[i].numpy(), rng).convert("L")) for i in range(16)]

    def client(k: int) -> list[int]:
        with httpx.Client(base_url=server, timeout=120) as http:
            return [http.post("/api/predict", files={"image": ("p.png", photos[k])}).status_code
                    for _ in range(300 // 16 + (k < 300 % 16))]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = [code for codes in pool.map(client, range(16)) for code in codes]
    assert len(codes) == 300 and set(codes) == {200}


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
        sync_api.expect(page.locator("#answer")).to_have_text("2026", timeout=15000)
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
    from digitlab.reading.checkpoint import load_checkpoint
    from digitlab.reading.evaluate import evaluate

    model, meta = load_checkpoint(run_dir)
    reference = evaluate(model, data.test_images, data.test_labels, meta.task)
    assert np.abs(logits - reference.outputs.numpy()).max() < 1e-4
    accuracy = float((logits.argmax(1) == data.test_labels.numpy()).mean())
    assert accuracy == reference.accuracy
    return accuracy, float(np.abs(logits - reference.outputs.numpy()).max())


def test_onnx_export_agrees_with_pytorch(runs, digits, tmp_path, cli):
    _onnx_check(runs[0], digits, tmp_path, cli)
    import onnx

    from digitlab.reading.checkpoint import read_checkpoint

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
