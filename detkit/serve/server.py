"""Run a detection server with uvicorn: what ``tools/serve.py`` does.

:func:`serve` binds the socket first (a port in use fails before the model loads), builds the
predictor and the app, prints one line with the URL and serves until interrupted.
"""

from __future__ import annotations

import socket

from ..errors import UsageError
from .settings import ServeOptions, build_predictor, check_serve_extra

__all__ = ["bind_socket", "serve", "server_url"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port); one-line :class:`UsageError` if not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: cannot resolve it ({e.strerror}); use e.g. 127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another "
                         "--port (0: any free port)") from None
    return sock


def server_url(sock: socket.socket) -> str:
    """``http://host:port/`` of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def connection_limits(opts: ServeOptions) -> dict[str, int]:
    """uvicorn's connection limits for ``opts``: at most the queue, a batch being predicted, the uploads
    decoding and a few health / page requests open at once (more get 503 from uvicorn before any byte of
    their body is read), and idle keep-alive connections closed after 5 s."""
    return {"limit_concurrency": opts.queue_size + opts.max_batch + 16, "timeout_keep_alive": 5}


def serve(opts: ServeOptions) -> None:
    """Serve ``opts.config`` on ``opts.host:opts.port`` until interrupted (Ctrl-C: graceful shutdown)."""
    check_serve_extra()
    opts.validate()
    import uvicorn

    from .app import create_app

    sock = bind_socket(opts.host, opts.port)
    try:
        predictor = build_predictor(opts)
        app = create_app(predictor, opts)
        print(f"serving {opts.config} ({predictor.cfg.model.meta_architecture}, {predictor.precision}, "
              f"{predictor.device}) on {server_url(sock)} (max batch {opts.max_batch}, max wait "
              f"{opts.max_wait_ms:g} ms, queue {opts.queue_size})", flush=True)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10,
                                **connection_limits(opts))
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
