"""`digitlab serve`: a local page to draw a digit and watch every loaded network read it.

FastAPI (on Starlette, served by uvicorn) does the HTTP; the page uses the same two API calls
that anyone may (their OpenAPI schema is at /openapi.json; /docs is off, as it would fetch its
scripts from a CDN):

    GET  /api/models          the loaded models: name, model, task, parameters, test accuracy, data
    POST /api/predict         a multipart form with `image` (PNG, JPEG, WebP, BMP, GIF, TIFF): each
                              model's reading of the whole picture, as `digitlab predict --json`
                              gives it (text, sure, and each digit with its confidence, top 3,
                              box and probabilities), and the 28x28 digits the models saw;
         /api/predict?maps=1  the same, with each conv layer's feature maps for each digit

It is safe on a laptop: bound to 127.0.0.1 unless told otherwise; a request whose Host is not
this server's (a DNS-rebinding page) or whose Origin is another site's is refused unless allowed
(--allow-host, --cors); a body over 10 MB is refused with a 413 that any client can read; the
server reads no file a request names.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from importlib import resources

from fastapi import FastAPI, File, Query, Request, UploadFile  # module level: FastAPI reads the annotations
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

import digitlab
from digitlab.errors import UserError
from digitlab.files import one_line, reason
from digitlab.options import ServeOptions
from digitlab.serving.backends import ServedModel
from digitlab.serving.reader import Reader

MAX_BODY = 10 * 1024 * 1024  # bytes; a phone photo is 2-5 MB
DRAIN = 64 * 1024 * 1024  # a refused body up to this size is read and dropped, so that the client reads the 413
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
SHUTDOWN_WAIT = 3  # seconds that Ctrl-C (or SIGTERM) leaves the requests in flight to finish


def create_app(models: list[ServedModel], options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI application serving these loaded models (`backends.load_models`)."""
    options = options or ServeOptions()
    reader = Reader(models, options.threshold)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        reader.close()  # its picture workers

    app = FastAPI(title="digitlab", description="Draw a digit; every loaded network reads it.",
                  version=digitlab.__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.reader = reader
    app.add_exception_handler(RequestValidationError, _one_sentence)  # type: ignore[arg-type]  # starlette's stubs
    page = resources.files("digitlab.serving").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/api/models")
    def models_list() -> list[dict]:
        """The loaded models, in the order given: parameters, test accuracy, and what they were trained on."""
        return [m.info() for m in models]

    @app.post("/api/predict")
    async def predict(image: UploadFile = File(..., description="PNG, JPEG, WebP, BMP, GIF or TIFF"),
                      maps: bool = Query(False, description="add each conv layer's feature maps for each digit")):
        """Every model's reading of the whole picture (as `digitlab predict --json`), and the 28x28 digits
        they saw side by side (a PNG data URL)."""
        data = await image.read()  # BodyLimit has already refused anything over MAX_BODY
        if not data:
            return JSONResponse({"error": "the picture is empty"}, status_code=400)
        try:
            return JSONResponse(await reader.read(data, maps))
        except UserError as e:
            return JSONResponse({"error": one_line(str(e))}, status_code=400)

    _guard(app, options)
    return app


async def _one_sentence(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request FastAPI could not take apart: what to send instead, in one line."""
    missing = any(e.get("type") == "missing" for e in exc.errors())
    message = ("send the picture as a multipart form field named 'image'" if missing
               else "the request is not a multipart form with a picture in the field 'image'")
    return JSONResponse({"error": message}, status_code=422)


def _guard(app: FastAPI, options: ServeOptions) -> None:
    """The middleware that keeps the server to itself (outermost first): other sites' names and pages
    refused, big bodies refused, CORS headers only for --cors origins."""
    if options.cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=options.cors, allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    hosts = {options.host.strip("[]").lower(), *LOCAL_NAMES, *(h.lower() for h in options.allow_hosts)}
    app.add_middleware(OnlyThisSite, hosts=hosts, origins=options.cors)


def _hostname(value: str) -> str:
    """'example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'."""
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class OnlyThisSite:
    """ASGI middleware: answers only requests meant for this server from its own pages.

    A Host header that is not one of `hosts` (a page of another site whose name was pointed at
    127.0.0.1: DNS rebinding) gets 421; an Origin header of another site (a page elsewhere posting a
    form here) gets 403 unless it is one of `origins` (--cors)."""

    def __init__(self, app, hosts: set[str], origins: list[str]):
        self.app, self.hosts, self.origins = app, hosts, set(origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if _hostname(host).lower() not in self.hosts:
            return await _answer(send, 421, f"this server does not answer to the name {one_line(host)[:80]!r}; "
                                            "start digitlab serve with --allow-host NAME to allow it")
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and origin not in self.origins and origin.split("://", 1)[-1] != host:
            return await _answer(send, 403, f"pages of {one_line(origin)[:80]} may not use this server; start "
                                            "digitlab serve with --cors ORIGIN to allow them")
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before it is read into memory.

    A declared Content-Length is checked up front; a chunked body is counted as it arrives. The
    refused body is then read and dropped (up to DRAIN bytes), so that a client that sends its whole
    body before reading the answer (urllib, requests) reads the 413 instead of a reset connection; a
    client that asked `Expect: 100-continue` gets the 413 before sending anything.
    """

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            if length.isdigit() and int(length) <= DRAIN and headers.get(b"expect", b"").lower() != b"100-continue":
                await _drain(receive, int(length))
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
                        if message.get("more_body"):
                            await _drain(receive, DRAIN - seen)
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
        await _answer(send, 413, f"the upload is over {self.limit // 1024 // 1024} MB; send a smaller picture")


async def _drain(receive, most: int) -> None:
    """Reads and drops a request's body, up to `most` bytes."""
    while most > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        most -= len(message.get("body", b""))
        if not message.get("more_body"):
            return


async def _answer(send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _cancelled_at_shutdown(record: logging.LogRecord) -> bool:
    """A logging filter: False for uvicorn's records of the requests it cancels when its shutdown's wait
    is over (SHUTDOWN_WAIT)."""
    cancelled = record.exc_info is not None and isinstance(record.exc_info[1], asyncio.CancelledError)
    return not (cancelled or "timeout graceful shutdown exceeded" in record.getMessage())


def serve(paths: list, options: ServeOptions) -> None:
    """Load the runs (or .onnx files) and serve the page until Ctrl-C."""
    import socket

    import uvicorn

    from digitlab.serving.backends import load_models

    models = load_models(paths)
    app = create_app(models, options)
    host, port = options.host, options.port
    try:  # uvicorn would log a failed bind and exit 1; say it in one line instead
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {reason(e)}; pick another --port "
                        "(or --host)") from None
    shown = f"[{host}]" if ":" in host else host
    print(f"digitlab: serving {len(models)} model{'s' * (len(models) > 1)} at http://{shown}:{port}/ (Ctrl-C stops)",
          flush=True)
    # After Ctrl-C, uvicorn waits for the requests in flight, and without a bound it waits forever for a
    # client that sent half a request (measured: still running 15 s after the signal). Those it then
    # cancels are the stop's doing, not errors: no traceback for them.
    logging.getLogger("uvicorn.error").addFilter(_cancelled_at_shutdown)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_WAIT)
    finally:
        logging.getLogger("uvicorn.error").removeFilter(_cancelled_at_shutdown)
