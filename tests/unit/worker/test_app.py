"""The faust-streaming App hosting the worker (stream/app.py), without Kafka or Redis:
faust starts no Kafka consumer or producer of its own, serves only driftline's views, and
runs the stage runners as a faust service."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from typing import Any, cast

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter

from stream.api import make_api
from stream.app import build_app, split_bind
from stream.config import ServiceSettings
from stream.demo import demo_config
from stream.worker import Worker, WorkerOptions


class FakeWorker:
    """Stands in for :class:`Worker` (no Kafka / Redis): records start and stop."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        Counter("driftline_probe", "probe", registry=self.registry).inc(3)
        self.started = False
        self.ready = False
        self.calls: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")
        self.started = self.ready = True

    async def stop(self) -> None:
        self.calls.append("stop")
        self.started = self.ready = False

    def api_app(self, prefix: str = "/api/v1") -> Any:
        async def get_state(model: str) -> dict[str, Any] | None:
            return {"model_id": model, "active": True, "action": "rollback"}

        async def send(*_: Any) -> str:
            raise AssertionError("no token is configured: mutations must be refused")

        cfg, _ = demo_config()
        settings = _settings("127.0.0.1:1")
        return make_api(
            settings, send_request=send, get_state=get_state, models=cfg.models, prefix=prefix
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(bind: str) -> ServiceSettings:
    return ServiceSettings(
        kafka_bootstrap="127.0.0.1:9,127.0.0.1:10", redis_url="redis://127.0.0.1:9/0",
        web_bind=bind,
    )  # fmt: skip


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, "", ""


def test_app_starts_no_faust_consumer_or_producer_and_serves_only_driftline_views(
    tmp_path: Any,
) -> None:
    cfg, _ = demo_config()
    port = _free_port()
    fake = FakeWorker()
    app = build_app(
        cfg, _settings(f"127.0.0.1:{port}"), WorkerOptions(group_prefix="g"),
        worker=cast(Worker, fake), datadir=str(tmp_path),
    )  # fmt: skip
    assert app.conf.topic_disable_leader is True
    assert app.conf.broker[1].port == 10  # every bootstrap server
    assert app.conf.id == "g-service"  # not one of the stage runners' consumer groups

    children: set[str] = set()

    async def main() -> list[tuple[int, str, str]]:
        await app.start()
        try:
            loop = asyncio.get_running_loop()
            for _ in range(100):  # extra services start once the app is up
                if fake.started:
                    break
                await asyncio.sleep(0.05)
            # what the App runs: faust's Kafka consumer, producer, conductor, leader
            # assignor and tables are not among them (and were never started)
            children.update(type(c).__name__ for c in app._children)
            services: list[Any] = [app._consumer, app._producer]
            for svc in services:
                assert svc is None or not svc._started.is_set()
            base = f"http://127.0.0.1:{port}"
            return [
                await loop.run_in_executor(None, _get, base + path)
                for path in ("/healthz", "/readyz", "/metrics", "/table", "/router", "/graph")
            ] + [await loop.run_in_executor(None, _get, base + "/api/v1/killswitch/fraud")]
        finally:
            await app.stop()

    got = asyncio.run(main())
    assert fake.calls == ["start", "stop"]
    assert "DriftlineStages" in children and "Web" in children
    kafka = {"Consumer", "Producer", "Conductor", "TableManager", "LeaderAssignor", "ReplyConsumer"}
    assert children.isdisjoint(kafka), children
    health, ready, metrics, *faust_views, api_status = got
    assert api_status[0] == 200 and '"active":true' in api_status[2].replace(" ", "")
    assert health[::2] == (200, "ok\n") and ready[::2] == (200, "ready\n")
    assert metrics[0] == 200 and metrics[1] == CONTENT_TYPE_LATEST
    assert "driftline_probe_total 3.0" in metrics[2]
    assert [s for s, _, _ in faust_views] == [404, 404, 404]


def test_web_bind_is_validated() -> None:
    assert split_bind("0.0.0.0:6066") == ("0.0.0.0", 6066)
    with pytest.raises(ValueError, match=r"DRIFTLINE_WEB_BIND.*host:port"):
        split_bind("localhost")
    cfg, _ = demo_config()
    with pytest.raises(ValueError, match="valid values: 1-65535"):
        build_app(cfg, _settings("127.0.0.1:0"), WorkerOptions(), worker=cast(Worker, None))
