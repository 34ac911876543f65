"""The faust-streaming App that hosts the driftline worker (``driftline worker``).

faust-streaming is driftline's service framework: ``driftline worker`` runs a
:class:`faust.Worker` over :class:`DriftlineApp`, which owns the process lifecycle
(signals, logging, start/stop order), the web server and its views (``/healthz``,
``/readyz``, ``/metrics`` as ``@app.page`` views), and starts the two stage runners of
:class:`stream.worker.Worker` as a faust service.

What faust does **not** do here is consume the input topics. driftline's offsets live in
Redis, written atomically with the state, and a partition must be sought to its Redis
offset on assignment. faust's consumer cannot be told to do that: after a rebalance its
Recovery service and Fetcher re-seek every partition to the offsets committed *in Kafka*
(faust-streaming#216, #461), overriding a seek done in ``on_partitions_assigned``. So the
stage runners keep their own aiokafka consumers (see :mod:`stream.worker`), and the App's
boot strategy starts neither faust's consumer (nor its leader assignor, conductor, table
manager) nor faust's producer: faust never subscribes to driftline's topics, never joins
driftline's consumer groups and never commits offsets. ``topic_disable_leader`` keeps it
from creating its leader-election topic, and the built-in ``/router``, ``/table``,
``/graph`` and statistics views are switched off (only driftline's views are served).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, cast

import faust
from faust.app.base import BootStrategy
from faust.web import Request, Response, View
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream.config import MonitorConfig, ServiceSettings
from stream.worker import Worker, WorkerOptions

__all__ = ["DriftlineApp", "build_app", "split_bind"]


class _Boot(BootStrategy):
    """Start the web server and sensors, not faust's Kafka consumer or producer."""

    enable_kafka_consumer = False
    enable_kafka_producer = False


class DriftlineApp(faust.App):
    """A faust App without faust's own Kafka consumer / producer (see the module doc)."""

    BootStrategy = _Boot

    driftline: Worker  # set by build_app


def split_bind(bind: str) -> tuple[str, int]:
    """``host:port`` (``DRIFTLINE_WEB_BIND``) → ``(host, port)``; an empty host is
    127.0.0.1.

    >>> split_bind("0.0.0.0:6066"), split_bind(":8080")
    (('0.0.0.0', 6066), ('127.0.0.1', 8080))
    """
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"DRIFTLINE_WEB_BIND: {bind!r} is not valid; expected host:port")
    return host or "127.0.0.1", int(port)


def build_app(
    config: MonitorConfig,
    settings: ServiceSettings,
    opts: WorkerOptions,
    *,
    worker: Worker | None = None,
    datadir: str | None = None,
) -> DriftlineApp:
    """The App: the worker's stages as a faust service, its endpoints as faust views.

    ``worker`` defaults to a :class:`Worker` that serves no HTTP itself (faust's web
    server does). ``datadir`` is faust's data directory (it creates it on start; no table
    writes anything there): default ``$DRIFTLINE_DATADIR`` or a directory under the
    system temp dir, so a read-only root filesystem works.
    """
    w = worker if worker is not None else Worker(config, settings, opts, serve_web=False)
    web_enabled = bool(settings.web_bind)
    host, port = split_bind(settings.web_bind) if web_enabled else ("127.0.0.1", 6066)
    if not 1 <= port <= 65535:
        raise ValueError(
            f"DRIFTLINE_WEB_BIND: port {port} is not valid for the faust web server; "
            "valid values: 1-65535"
        )
    servers = ";".join(f"kafka://{s.strip()}" for s in settings.kafka_bootstrap.split(","))
    app = DriftlineApp(
        f"{opts.group_prefix}-service",  # not a consumer group of ours: faust consumes nothing
        broker=servers,
        autodiscover=False,
        datadir=datadir
        or os.environ.get("DRIFTLINE_DATADIR")
        or os.path.join(tempfile.gettempdir(), "driftline-faust"),
        topic_disable_leader=True,
        web_enabled=web_enabled,
        web_bind=host,
        web_port=port,
        web_in_thread=False,
        web_router_enabled=False,
        web_tables_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_metrics_enabled=False,
    )
    app.driftline = w
    if web_enabled:  # the kill-switch API beside faust's views (same server, same bind)
        web_app = cast(Any, app.web).web_app  # faust's aiohttp driver (faust.web.drivers)
        web_app.add_subapp("/api/v1", w.api_app(prefix=""))

    @app.service
    class DriftlineStages(Service):
        """Both stage runners, the producer and the Redis store of :class:`Worker`."""

        async def on_start(self) -> None:
            await w.start()

        async def on_stop(self) -> None:
            await w.stop()

    @app.page("/healthz")
    async def healthz(view: View, request: Request) -> Response:
        ok = w.started
        return view.text("ok\n" if ok else "stopped\n", status=200 if ok else 503)

    @app.page("/readyz")
    async def readyz(view: View, request: Request) -> Response:
        ok = w.ready
        return view.text("ready\n" if ok else "not ready\n", status=200 if ok else 503)

    @app.page("/metrics")
    async def metrics(view: View, request: Request) -> Response:
        # aiohttp refuses a charset in content_type=; the header carries it
        return view.bytes(
            generate_latest(w.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    del healthz, readyz, metrics, DriftlineStages
    return app
