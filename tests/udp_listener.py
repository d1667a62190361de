"""A real StatsD endpoint for tests: a UDP socket on 127.0.0.1 that collects every metric line.

In this process (e.g. around ``dag.test()``, whose tasks run in-process)::

    from tests.udp_listener import statsd_listener

    with statsd_listener() as statsd:          # sets AIRFLOW__METRICS__STATSD_* and re-reads them
        dag.test(run_conf=...)
        statsd.sync()                           # every packet sent so far has been read
        assert statsd.counters()["airflow.reindex.chunks.ready"] == 42
        assert "airflow.reindex.batches.COMPLETED" in statsd.counters()

For another process (a subprocess, ``airflow standalone``): ``StatsdListener()`` and pass
``listener.env()`` to it; call ``listener.sync()`` after it sent its metrics.

``sync`` sends a sentinel datagram to the socket and waits for it: loopback UDP keeps one socket's
queue in arrival order, so once the sentinel is read, everything sent before it was read too.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


class StatsdListener:
    """Collects StatsD lines (``name:value|type``) sent to ``127.0.0.1:<port>`` until closed."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name=f"statsd-listener-{self.port}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(65535)
            except OSError:
                return  # closed
            with self._cond:
                self._lines.extend(line for line in data.decode("utf-8", "replace").split("\n") if line)
                self._cond.notify_all()

    def env(self, prefix: str = "airflow", **extra: str) -> dict[str, str]:
        """Airflow's ``[metrics]`` settings that send StatsD here (``extra``: more ``[metrics]`` keys,
        e.g. ``metrics_allow_list="reindex"``)."""
        env = {"AIRFLOW__METRICS__STATSD_ON": "True", "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
               "AIRFLOW__METRICS__STATSD_PORT": str(self.port), "AIRFLOW__METRICS__STATSD_PREFIX": prefix}
        env.update({f"AIRFLOW__METRICS__{k.upper()}": v for k, v in extra.items()})
        return env

    def sync(self, timeout: float = 10.0) -> None:
        """Wait until every datagram sent to the socket before this call has been read."""
        marker = f"udp_listener.sync.{uuid.uuid4().hex}:1|c"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(marker.encode(), ("127.0.0.1", self.port))
        with self._cond:
            if not self._cond.wait_for(lambda: marker in self._lines, timeout):
                raise TimeoutError(f"sentinel {marker!r} not received on port {self.port} within {timeout} s")
            self._lines.remove(marker)

    def lines(self, startswith: str = "") -> list[str]:
        """Every line read so far (in arrival order), those starting with ``startswith``."""
        with self._cond:
            return [line for line in self._lines if line.startswith(startswith)]

    def counters(self, startswith: str = "") -> dict[str, int]:
        """Counter lines (``|c``) summed by name."""
        out: dict[str, int] = {}
        for line in self.lines(startswith):
            stat, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            if kind.split("|")[0] == "c":
                out[stat] = out.get(stat, 0) + int(float(value))
        return out

    def timings(self, startswith: str = "") -> dict[str, list[float]]:
        """Timing lines (``|ms``) by name, in milliseconds."""
        out: dict[str, list[float]] = {}
        for line in self.lines(startswith):
            stat, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            if kind.split("|")[0] == "ms":
                out.setdefault(stat, []).append(float(value))
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()
            self._thread.join(timeout=5)


@contextmanager
def statsd_listener(prefix: str = "airflow", **extra: str) -> Iterator[StatsdListener]:
    """A ``StatsdListener`` with THIS process's Airflow metrics pointed at it (environment set and
    the Task SDK's Stats re-initialised), restored afterwards."""
    from reindex_airflow import metrics

    listener = StatsdListener()
    env = listener.env(prefix, **extra)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    metrics.reset()
    try:
        yield listener
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        metrics.reset()
        listener.close()
