"""The REST app (Starlette): Open Inference Protocol health, metadata and inference, and
Triton's model configuration, statistics and model repository endpoints, as thin handlers over
the engine and the OIP adapter."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from rnnstream.server._settings import Settings
from rnnstream.server.core import Engine, InvalidArgument, NotFound
from rnnstream.server.transport.grpc._auth import Authenticator
from rnnstream.server.transport.grpc._oip import OipServicer
from rnnstream.server.transport.grpc._oip_config import (
    model_config,
    model_statistics,
    parse_version,
)
from rnnstream.server.transport.grpc._oip_models import EXTENSIONS
from rnnstream.server.transport.grpc._rate import oip_frames
from rnnstream.server.transport.http._auth import READINESS_PATHS, Authentication
from rnnstream.server.transport.http._json import infer_request, infer_response, metadata
from rnnstream.server.transport.http._status import error_response

__all__ = ["rest_app"]

Handler = Callable[[Request], Awaitable[Response]]


class _Handlers:
    def __init__(self, engine: Engine, oip: OipServicer, settings: Settings, version: str):
        self._engine = engine
        self._oip = oip
        self._settings = settings
        self._version = version

    # -- server --------------------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self._engine.ready
        return JSONResponse({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        extensions = list(EXTENSIONS)
        return JSONResponse(
            {"name": "rnnstream", "version": self._version, "extensions": extensions}
        )

    # -- models --------------------------------------------------------------------------------
    def _model(self, request: Request) -> Any:
        params = request.path_params
        return self._engine.model(params["name"], parse_version(params.get("version", "")))

    async def model_metadata(self, request: Request) -> Response:
        return JSONResponse(metadata(self._model(request)))

    async def model_ready(self, request: Request) -> Response:
        name = request.path_params["name"]
        wanted = parse_version(request.path_params.get("version", ""))
        ready = self._engine.ready and any(
            s.model == name and wanted in (None, s.version)
            for s in self._engine.repository_index(ready_only=True)
        )
        return JSONResponse({"name": name, "ready": ready}, 200 if ready else 503)

    async def model_config(self, request: Request) -> Response:
        config = model_config(self._model(request), self._settings)
        return JSONResponse(json_format.MessageToDict(config, preserving_proto_field_name=True))

    async def model_stats(self, request: Request) -> Response:
        name = request.path_params.get("name")
        index = self._engine.repository_index(ready_only=True)
        if name:
            model = self._model(request)
            index = [s for s in index if (s.model, s.version) == (name, model.version)]
        engine = self._engine
        stats = [model_statistics(s.model, s.version, engine.model_stats(s.model, s.version))
                 for s in index]  # fmt: skip
        as_json = [json_format.MessageToDict(s, preserving_proto_field_name=True) for s in stats]
        return JSONResponse({"model_stats": as_json})

    # -- inference -----------------------------------------------------------------------------
    async def infer(self, request: Request) -> Response:
        params = request.path_params
        body = await _json_body(request, self._settings.max_message_bytes)
        oip_request = infer_request(params["name"], params.get("version", ""), body)
        principal = request.scope["state"]["principal"]
        self._engine.limits.admit(principal, oip_frames(oip_request))
        _, answer = await self._oip.submit(oip_request, principal)
        return JSONResponse(infer_response(await answer))

    # -- the model repository ------------------------------------------------------------------
    async def repository_index(self, request: Request) -> Response:
        body = await _json_body(request, self._settings.max_message_bytes, empty={})
        ready = body.get("ready", False) if isinstance(body, dict) else None
        if not isinstance(ready, bool):
            raise InvalidArgument('the index request is {"ready": true|false}, both optional')
        index = self._engine.repository_index(ready)
        return JSONResponse(
            [{"name": s.model, **({"version": str(s.version)} if s.version else {}),
              "state": s.state, "reason": s.reason} for s in index]
        )  # fmt: skip

    async def load(self, request: Request) -> Response:
        await self._control(request, ())
        await self._engine.load_model(request.path_params["name"])
        return JSONResponse({})

    async def unload(self, request: Request) -> Response:
        await self._control(request, ("unload_dependents",))
        await self._engine.unload_model(request.path_params["name"])
        return JSONResponse({})

    async def _control(self, request: Request, allowed: tuple[str, ...]) -> None:
        body = await _json_body(request, self._settings.max_message_bytes, empty={})
        parameters = body.get("parameters", {}) if isinstance(body, dict) else None
        if not isinstance(parameters, dict):
            raise InvalidArgument('the request is {"parameters": {...}}, or empty')
        unknown = sorted(k for k in parameters if k not in allowed)
        if unknown:
            raise InvalidArgument(
                f"parameters {unknown[:8]} are not taken here: rnnstream loads models from the "
                "repository's files only (no config or file overrides)"
            )


class _TooLarge(InvalidArgument):
    """A body over --max-message-bytes: answered 413, it is never read whole."""


async def _json_body(request: Request, limit: int, empty: Any = None) -> Any:
    """The JSON body, read up to `limit` bytes (--max-message-bytes)."""
    if request.headers.get("inference-header-content-length") is not None:
        raise InvalidArgument("the binary tensor data extension is not served: send JSON data")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(f"the body has {declared} bytes, over {limit} (--max-message-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(f"the body is over {limit} bytes (--max-message-bytes)")
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data.strip() and empty is not None:
        return empty
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the body is not JSON: {exc}") from None


def _answering(handler: Handler) -> Handler:
    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except _TooLarge as exc:
            return JSONResponse({"error": exc.message}, 413)
        except Exception as exc:
            return error_response(exc)

    return answer


async def _not_found(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException) and exc.status_code == 405:
        return JSONResponse(
            {"error": f"{request.method} is not allowed on {request.url.path}"}, 405
        )
    return error_response(NotFound(f"no endpoint {request.url.path}; the API is under /v2"))


def _route(path: str, handler: Handler, method: str = "GET") -> Route:
    return Route(path, _answering(handler), methods=[method])


def rest_app(engine: Engine, oip: OipServicer, settings: Settings, auth: Authenticator) -> ASGIApp:
    """The REST API behind authentication: readiness is open only with
    --readiness-without-auth, as the gRPC side's ServerLive and ServerReady."""
    h = _Handlers(engine, oip, settings, oip.server_version)
    routes = [
        _route("/v2", h.server_metadata),
        _route("/v2/health/live", h.live),
        _route("/v2/health/ready", h.ready),
        _route("/v2/models/stats", h.model_stats),
        _route("/v2/repository/index", h.repository_index, "POST"),
        _route("/v2/repository/models/{name}/load", h.load, "POST"),
        _route("/v2/repository/models/{name}/unload", h.unload, "POST"),
    ]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            _route(base, h.model_metadata),
            _route(f"{base}/ready", h.model_ready),
            _route(f"{base}/config", h.model_config),
            _route(f"{base}/stats", h.model_stats),
            _route(f"{base}/infer", h.infer, "POST"),
        ]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found})
    open_paths = READINESS_PATHS if settings.readiness_without_auth else frozenset()
    return Authentication(app, auth, open_paths)
