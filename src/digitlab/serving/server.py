"""`digitlab serve`: a local page to draw a digit and watch every loaded network read it.

FastAPI (on Starlette, served by uvicorn) does the HTTP; this module holds the models and
answers two API calls, which the page itself uses:

    GET  /api/models    the loaded runs: model, task, parameter count, test accuracy
    POST /api/predict   a multipart form with `image` (PNG, JPEG, WebP, BMP ...): for each model
                        its digit, whether it is sure, and 10 calibrated probabilities (or, for a
                        regression model, its value), its conv layers' feature maps, and the
                        28x28 picture the networks saw

An upload goes through the same preparation as `digitlab predict`. The server reads no
file a request names; a body over 10 MB is refused (413) before it is read.
"""
from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from fastapi import (  # module level: FastAPI reads the annotations
    FastAPI,
    File,
    Request,
    UploadFile,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from torch import nn

from digitlab import __version__
from digitlab.config import THRESHOLD
from digitlab.errors import UserError
from digitlab.files import one_line
from digitlab.reading.checkpoint import CheckpointMeta, describe, load_checkpoint
from digitlab.reading.evaluate import model_outputs
from digitlab.reading.image import load_grey
from digitlab.reading.segment import preprocess

MAX_BODY = 10 * 1024 * 1024  # bytes; a phone photo is 2-5 MB
MAX_MAPS = 32  # feature maps drawn per layer: enough to see what a layer does, small enough to send


@dataclass
class Loaded:
    name: str  # the run folder's name, which tells two runs of one model apart
    model: nn.Module
    meta: CheckpointMeta
    checkpoint: str
    convs: list[tuple[str, nn.Conv2d]]

    def info(self) -> dict:
        results = self.meta.results or {}
        return {"name": self.name, "model": self.meta.model, "task": self.meta.task.name,
                "params": sum(p.numel() for p in self.model.parameters()),
                "test_accuracy": results.get("test_accuracy"), "val_accuracy": self.meta.val_accuracy,
                "checkpoint": self.checkpoint, "conv_layers": [name for name, _ in self.convs]}


def load_runs(runs: list[str | Path]) -> list[Loaded]:
    loaded, names = [], set()
    for run in runs:
        model, meta = load_checkpoint(run)
        name = Path(run).name if Path(run).is_dir() else Path(run).parent.name
        while name in names:  # two folders of one name in different places
            name += "'"
        names.add(name)
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        loaded.append(Loaded(name, model, meta, describe(run, meta), convs))
    return loaded


def png_data_url(image: np.ndarray) -> str:
    """uint8 (H, W) grey -> a PNG data URL."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def feature_grid(maps: torch.Tensor) -> np.ndarray:
    """(C, H, W) activations -> one uint8 picture of up to MAX_MAPS maps in a grid, each map
    scaled to its own range, with a one-pixel gap."""
    maps = maps[:MAX_MAPS].float()
    c, h, w = maps.shape
    low = maps.amin((1, 2), keepdim=True)
    span = (maps.amax((1, 2), keepdim=True) - low).clamp(min=1e-6)
    scaled = ((maps - low) / span * 255).round().to(torch.uint8).numpy()
    cols = min(c, 8)
    rows = -(-c // cols)
    grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), 0, np.uint8)
    for k in range(c):
        r, q = divmod(k, cols)
        grid[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = scaled[k]
    return grid


class Reader:
    """The loaded models, and one picture read by all of them."""

    def __init__(self, loaded: list[Loaded], threshold: float = THRESHOLD):
        self.loaded, self.threshold = loaded, threshold
        self.lock = threading.Lock()  # torch already uses both cores; requests take turns

    def read(self, data: bytes) -> dict:
        digit = preprocess(load_grey(data, name="the picture"), source="the picture")  # (28, 28) uint8
        batch = torch.from_numpy(digit)[None]
        answers = []
        with self.lock:
            for entry in self.loaded:
                captured: dict[str, torch.Tensor] = {}
                hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: captured.__setitem__(n, out[0].detach()))
                         for n, m in entry.convs]
                try:
                    out = model_outputs(entry.model, batch, normalization=entry.meta.normalization)[0]
                finally:
                    for h in hooks:
                        h.remove()
                answer = {"name": entry.name, "model": entry.meta.model, "task": entry.meta.task.name,
                          "feature_maps": [{"layer": n, "shape": list(captured[n].shape),
                                            "shown": min(len(captured[n]), MAX_MAPS),
                                            "grid": png_data_url(feature_grid(captured[n]))} for n, _ in entry.convs]}
                read = entry.meta.task.answers(out[None], entry.meta.temperature, self.threshold)[0]
                answer.update(digit=read.digit, **read.details)
                answers.append(answer)
        return {"image": png_data_url(digit), "threshold": self.threshold, "models": answers}


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before it is read into memory.

    A declared Content-Length is checked up front; a chunked body is counted as it arrives,
    and the request is cut off as soon as it passes the limit.
    """

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        seen, refused, started = 0, False, False

        async def counting_receive():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit and not refused:
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return  # the 413 went out already
            started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _refuse(self, send):
        import json

        body = json.dumps({"error": f"the upload is over {self.limit // 1024 // 1024} MB; send a smaller picture"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})


def create_app(runs: list[str | Path], threshold: float = THRESHOLD):
    """The FastAPI application for these run folders (or checkpoint files); an answer below
    `threshold` confidence is "not sure"."""
    if not runs:
        raise UserError("serve needs at least one run folder or checkpoint")
    reader = Reader(load_runs(runs), threshold)
    app = FastAPI(title="digitlab", description="Draw a digit; every loaded network reads it.",
                  version=__version__)
    page = resources.files("digitlab.serving").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestValidationError)
    async def one_sentence(request: Request, exc: RequestValidationError):
        missing = any(e.get("type") == "missing" for e in exc.errors())
        message = ("send the picture as a multipart form field named 'image'" if missing
                   else "the request is not a multipart form with a picture in the field 'image'")
        return JSONResponse({"error": message}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/api/models")
    def models() -> list[dict]:
        """The loaded models, in the order given, with their parameter counts and accuracy."""
        return [entry.info() for entry in reader.loaded]

    @app.post("/api/predict")
    def predict(image: UploadFile = File(..., description="PNG, JPEG, WebP, BMP, GIF or TIFF")) -> JSONResponse:
        """Every loaded model's reading of the picture, the 28x28 image they saw, and feature maps."""
        data = image.file.read()  # BodyLimit has already refused anything over MAX_BODY
        if not data:
            return JSONResponse({"error": "the picture is empty"}, status_code=400)
        try:
            return JSONResponse(reader.read(data))
        except UserError as e:
            return JSONResponse({"error": one_line(str(e))}, status_code=400)

    app.add_middleware(BodyLimit, limit=MAX_BODY)
    return app


def serve(runs: list[str | Path], host: str = "127.0.0.1", port: int = 8000, threshold: float = THRESHOLD) -> None:
    """Load the runs and serve the page until Ctrl-C."""
    import socket

    import uvicorn

    app = create_app(runs, threshold)
    try:  # uvicorn would log a failed bind and exit 1; say it in one line instead
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}; pick another --port "
                        "(or --host)") from None
    print(f"digitlab: serving {len(runs)} model{'s' * (len(runs) > 1)} at http://{host}:{port}/ (Ctrl-C stops)",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
