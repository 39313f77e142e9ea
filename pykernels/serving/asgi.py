"""The Starlette app of the embeddings server: HTTP in, ``EmbeddingService`` calls, HTTP out.

``create_app(model, batcher)`` serves ``POST /v1/embeddings`` (OpenAI's
embeddings API), ``GET /v1/models[/{id}]``, ``GET /metrics`` and ``GET
/healthz``. This module reads requests (body size cap and time limit, headers)
and maps ``ApiError`` to OpenAI-shaped JSON errors; validation, batching and
answers are the service's. The app owns the service: its lifespan shutdown
drains the batcher. Starlette is imported when the app is built (extra
``pykernels[serve]``). See docs/serving.md.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Dict, Optional

from ..models import MiniLM
from .batcher import DynamicBatcher
from .service import (
    MODEL_ID,
    SLO_HEADER,
    ApiError,
    EmbeddingService,
    Limits,
    check_content_length,
    make_batcher,
)

log = logging.getLogger("pykernels.serving.asgi")


async def _read_body(request, limits: Limits) -> bytes:
    """The request body, refused past ``max_body_bytes`` (from Content-Length
    before reading, else as it arrives) or after ``body_timeout_s``."""
    check_content_length(request.headers.get("content-length"), limits)

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit max_body_bytes="
                                    f"{limits.max_body_bytes}", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout=limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within body_timeout_s="
                            f"{limits.body_timeout_s:g} s", code="body_timeout") from None


def create_app(model=None, batcher: Optional[DynamicBatcher] = None, *, api_key: Optional[str] = None,
               limits: Limits = Limits(), model_id: str = MODEL_ID,
               precision: str = "fp32", interactive_p99_ms: float = 50.0,
               bulk_throughput: Optional[float] = None, profile=None, **batcher_kw):
    """The ASGI app (Starlette). ``model``: a loaded ``MiniLM`` (None: loaded at
    startup with ``precision``); ``batcher``: a DynamicBatcher whose fn is
    ``make_encode_fn(model)`` (None: ``make_batcher(model, ...)`` at startup
    with the SLO arguments and ``batcher_kw``). The app owns the batcher: its
    lifespan shutdown closes it with ``drain=True``. ``api_key``: require
    ``Authorization: Bearer <api_key>`` on every endpoint but /healthz."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    holder: Dict[str, EmbeddingService] = {}

    def build() -> EmbeddingService:
        m = model
        if m is None:
            m = MiniLM.load(precision=precision)
        b = batcher
        if b is None:
            b = make_batcher(m, interactive_p99_ms=interactive_p99_ms,
                             bulk_throughput=bulk_throughput, profile=profile, **batcher_kw)
        return EmbeddingService(m, b, limits=limits, api_key=api_key, model_id=model_id)

    if model is not None and batcher is not None:
        holder["svc"] = build()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if "svc" not in holder:
            holder["svc"] = await asyncio.get_running_loop().run_in_executor(None, build)
        app.state.service = holder["svc"]
        try:
            yield
        finally:
            svc = holder["svc"]
            svc.closing = True
            # Every HTTP request uvicorn waited for has its answer; whatever is
            # still queued (a request cancelled by the graceful timeout) runs.
            await asyncio.get_running_loop().run_in_executor(None, svc.close)

    def error_response(e: ApiError) -> Response:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def embeddings(request: Request) -> Response:
        svc: EmbeddingService = holder["svc"]
        status = 500
        try:
            with svc.in_flight_request():
                svc.check_auth(request.headers.get("authorization"))
                body = await _read_body(request, svc.limits)
                req = svc.parse(body, request.headers.get(SLO_HEADER))
                results = await svc.embed(req)
                if len(results) > 8:  # large answers: format off the event loop
                    payload = await asyncio.get_running_loop().run_in_executor(
                        None, svc.render, results, req)
                else:
                    payload = svc.render(results, req)
            status = 200
            return Response(payload, media_type="application/json")
        except ApiError as e:
            status = e.status
            return error_response(e)
        except asyncio.CancelledError:
            # uvicorn cancels requests still running past --graceful-timeout:
            # answer 503 (retry elsewhere or later), not the 500 it would send;
            # the texts still queued left the queue with the cancellation
            status = 503
            return error_response(ApiError(
                503, "the server is shutting down: this request did not finish within the "
                     "graceful timeout; retry it", code="shutting_down",
                headers={"Retry-After": "1", "Connection": "close"}))
        except Exception as e:  # noqa: BLE001 - a bug: one line a minute per kind, 500
            status = 500
            return error_response(svc.internal_error("request failed", e))
        finally:
            svc.count("/v1/embeddings", status)

    def simple(endpoint: str, fn, auth: bool = True):
        async def handler(request: Request) -> Response:
            svc: EmbeddingService = holder["svc"]
            try:
                if auth:
                    svc.check_auth(request.headers.get("authorization"))
                resp = fn(svc, request)
                svc.count(endpoint, resp.status_code)
                return resp
            except ApiError as e:
                svc.count(endpoint, e.status)
                return error_response(e)
        return handler

    routes = [
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", simple("/v1/models", lambda s, r: JSONResponse(s.models())),
              methods=["GET"]),
        Route("/v1/models/{model_id:path}",
              simple("/v1/models/{id}",
                     lambda s, r: JSONResponse(s.model_card(r.path_params["model_id"]))),
              methods=["GET"]),
        Route("/metrics", simple("/metrics", lambda s, r: PlainTextResponse(
            s.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")),
              methods=["GET"]),
        Route("/healthz", simple("/healthz", lambda s, r: JSONResponse(
            s.health(), status_code=503 if s.closing else 200), auth=False), methods=["GET"]),
    ]

    async def http_error(request, exc: HTTPException) -> Response:
        return error_response(ApiError(exc.status_code, f"{exc.detail}: {request.method} "
                                                        f"{request.url.path}",
                                       code="not_found" if exc.status_code == 404 else None))

    async def server_error(request, exc: Exception) -> Response:
        svc = holder.get("svc")
        if svc is not None:
            return error_response(svc.internal_error(
                f"{request.method} {request.url.path} failed", exc))
        log.error("internal error on %s %s: %r", request.method, request.url.path, exc)
        return error_response(ApiError(500, f"internal server error: {type(exc).__name__}",
                                       code="internal_error", headers={"Connection": "close"}))

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


__all__ = ["create_app"]
