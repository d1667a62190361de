"""An in-process Google Cloud Storage emulator (``gcp-storage-emulator``) for tests and demos.

``start_gcs_emulator()`` starts the emulator's HTTP server in a background thread, on a free port
unless one is given, and returns ``(url, stop)``. Storage is in memory unless ``data_dir`` is given.
With ``set_env=True`` (the default) it also sets ``STORAGE_EMULATOR_HOST`` to the URL, which
google-cloud-storage honours, and ``stop()`` restores the previous value. ``gcs_emulator()`` is the
same as a context manager. ``anonymous_client(url)`` is a ``storage.Client`` that talks to it
without credentials.

The emulator's server handles one request at a time; that is plenty for tests.

Command line: ``python -m reindex.emulators.gcs --port 9023 [--bucket NAME ...] [--data-dir DIR]``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

ENV_VAR = "STORAGE_EMULATOR_HOST"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_gcs_emulator(host: str = "127.0.0.1", port: int = 0, *, buckets: Iterable[str] = (),
                       data_dir: str | None = None, set_env: bool = True) -> tuple[str, Callable[[], None]]:
    """Start gcp-storage-emulator in this process; return ``(url, stop)``.

    ``port=0`` binds a free port chosen by the OS. ``buckets`` are created up front. ``stop()`` is
    idempotent; it shuts the server down and restores ``STORAGE_EMULATOR_HOST`` when it was set.
    """
    from gcp_storage_emulator.handlers import buckets as bucket_handlers
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    server = create_server(host, port, in_memory=data_dir is None, data_dir=data_dir)
    server.start()
    try:
        bound = server._api._httpd.server_address[1]  # the real port when port=0
    except AttributeError:  # pragma: no cover - a future emulator without these attributes
        if not port:
            server.stop()
            return start_gcs_emulator(host, free_port(host), buckets=buckets, data_dir=data_dir,
                                      set_env=set_env)
        bound = port
    url = f"http://{host}:{bound}"
    for name in buckets:
        bucket_handlers.create_bucket(name, server._storage)

    previous = os.environ.get(ENV_VAR)
    if set_env:
        os.environ[ENV_VAR] = url
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        server.stop()
        if set_env and os.environ.get(ENV_VAR) == url:
            if previous is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = previous

    log.info("GCS emulator listening on %s", url)
    return url, stop


@contextlib.contextmanager
def denied_downloads(object_names: Iterable[str]) -> Iterator[None]:
    """While inside, the emulator (every instance in this process) answers a download of any of
    ``object_names`` (``bucket/object``) with 403 Forbidden, as GCS does for a caller without
    ``storage.objects.get`` on it; listing and metadata still work, as they do with a listing-only role."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    denied = set(object_names)

    def guard(handler):
        def handle(request, response, storage, *args, **kwargs):
            media = handler is objects.download or (request.query.get("alt") or [""])[0] == "media"
            name = f"{request.params.get('bucket_name')}/{request.params.get('object_id')}"
            if media and name in denied:
                response.status = HTTPStatus.FORBIDDEN
                response.json({"error": {"code": 403, "message": f"caller does not have storage.objects.get "
                                                                 f"access to the Google Cloud Storage object {name}"}})
                return None
            return handler(request, response, storage, *args, **kwargs)
        return handle

    original = server.HANDLERS
    server.HANDLERS = tuple((regex, {m: guard(h) if h in (objects.download, objects.get) else h
                                     for m, h in handlers.items()}) for regex, handlers in original)
    try:
        yield
    finally:
        server.HANDLERS = original


@contextlib.contextmanager
def gcs_emulator(host: str = "127.0.0.1", port: int = 0, *, buckets: Iterable[str] = (),
                 data_dir: str | None = None, set_env: bool = True) -> Iterator[str]:
    """Context manager around ``start_gcs_emulator``; yields the URL."""
    url, stop = start_gcs_emulator(host, port, buckets=buckets, data_dir=data_dir, set_env=set_env)
    try:
        yield url
    finally:
        stop()


def anonymous_client(url: str | None = None, project: str = "emulator"):
    """A ``google.cloud.storage.Client`` without credentials, pointed at ``url`` when given
    (otherwise at ``STORAGE_EMULATOR_HOST`` or real GCS)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    options = {"api_endpoint": url} if url else None
    return storage.Client(project=project, credentials=AnonymousCredentials(), client_options=options)


def serve_until_stopped(*stops: Callable[[], None]) -> None:
    """Block until Ctrl-C or SIGTERM (``docker stop``), then run ``stops`` in order."""
    import signal
    import threading

    stopped = threading.Event()
    # The handler only sets an event: a signal delivered while a server thread runs Python can no longer be
    # lost in the main thread's long sleep (docker stop, the launcher's SIGTERM).
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        while not stopped.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for stop in stops:
            stop()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m reindex.emulators.gcs", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9023)
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    parser.add_argument("--data-dir", default=None, help="keep objects on disk here (default: in memory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url, stop = start_gcs_emulator(args.host, args.port, buckets=args.bucket, data_dir=args.data_dir,
                                   set_env=False)
    print(f"GCS emulator on {url}  (export {ENV_VAR}={url})", flush=True)
    serve_until_stopped(stop)


if __name__ == "__main__":
    main()
