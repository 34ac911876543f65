"""The kill-switch HTTP API (stream/api.py) beside a real worker on the real Kafka + Redis.

The API is the one the worker mounts on its own web server (``Worker.api_app``):
``send_request`` = :func:`stream.api.kafka_send_request` over the worker's own producer
(the manual request of ``driftline killswitch`` on the summaries topic, keyed by model
id), ``get_state`` = :func:`stream.api.store_get_state` over the worker's RedisStore (the
kill-switch mirror). A trip over HTTP must reach the control topic and the Redis mirror,
a release must release it, and a wrong token must change nothing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from stream.demo import demo_config
from stream.worker import Worker
from tests.fixtures.services import TopicFactory
from tests.fixtures.worker_harness import TopicReader, make_env, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOKEN = "e2e-token-5d1c0b8f3a"


def test_trip_and_release_over_http_reach_control_topic_and_mirror(
    kafka_bootstrap: str, redis_url: str, topic_factory: TopicFactory, unique_id: str
) -> None:
    env = make_env(kafka_bootstrap, redis_url, topic_factory, unique_id, "api")
    topics = env.topics
    cfg, profile = demo_config()
    settings = env.settings(fast=False, api_token=TOKEN)
    opts = env.opts()

    async def main() -> None:
        worker = Worker(cfg, settings, opts, profiles={"fraud": profile})
        await worker.start()
        control = TopicReader(kafka_bootstrap, topics.control)
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            port = worker.web_port  # the API is mounted on the worker's own server
            base = f"http://127.0.0.1:{port}/api/v1/killswitch/fraud"
            good = {"Authorization": f"Bearer {TOKEN}"}
            bad = {"Authorization": "Bearer not-the-token"}
            trip = {"action": "rollback", "target_version": "v1", "reason": "e2e trip",
                    "operator": "oncall"}  # fmt: skip

            async with aiohttp.ClientSession() as http:

                async def state() -> dict[str, Any] | None:
                    async with http.get(base, headers=good) as resp:
                        assert resp.status == 200
                        doc: dict[str, Any] = await resp.json()
                    shown: dict[str, Any] | None = doc["state"]
                    return shown

                async def mirror() -> dict[str, Any] | None:
                    raw = await worker.store.get_killswitch("fraud")
                    return None if raw is None else dict(orjson.loads(raw))

                assert await state() is None

                # a wrong token changes nothing
                async with http.post(f"{base}/trip", json=trip, headers=bad) as resp:
                    assert resp.status == 401
                await asyncio.sleep(3.0)  # longer than the worker needs to apply a request
                await asyncio.get_running_loop().run_in_executor(None, control.poll, 1.0)
                assert control.values == []
                assert await mirror() is None
                assert worker.stats.counters["manual_applied"] == 0

                # trip
                t0 = time.perf_counter()
                async with http.post(f"{base}/trip", json=trip, headers=good) as resp:
                    assert resp.status == 202
                    trip_id = (await resp.json())["request_id"]
                await until("the trip on the control topic", lambda: bool(control.values),
                            30, control.poll)  # fmt: skip
                print(f"\ntrip over HTTP → control topic in {time.perf_counter() - t0:.2f} s")
                [cmd] = control.values
                assert (cmd["model_id"], cmd["action"], cmd["target_version"], cmd["mode"]) == (
                    "fraud", "rollback", "v1", "manual"
                )  # fmt: skip
                assert "e2e trip" in cmd["reason"] and "oncall" in cmd["reason"]
                m = await mirror()
                assert m is not None and m["active"] is True and m["target_version"] == "v1"
                shown = await state()
                assert shown is not None
                assert (shown["active"], shown["action"], shown["trips"]) == (True, "rollback", 1)
                assert trip_id  # the request id the API answered with

                # a wrong-token release changes nothing either
                async with http.post(
                    f"{base}/release", json={"reason": "forged"}, headers=bad
                ) as resp:
                    assert resp.status == 401
                await asyncio.sleep(3.0)
                await asyncio.get_running_loop().run_in_executor(None, control.poll, 1.0)
                assert len(control.values) == 1
                m = await mirror()
                assert m is not None and m["active"] is True and m["releases"] == 0

                # release
                async with http.post(
                    f"{base}/release", json={"reason": "e2e release"}, headers=good
                ) as resp:
                    assert resp.status == 202
                await until("the release on the control topic",
                            lambda: len(control.values) == 2, 30, control.poll)  # fmt: skip
                rel = control.values[-1]
                assert (rel["model_id"], rel["action"], rel["mode"]) == (
                    "fraud",
                    "release",
                    "manual",
                )
                assert "e2e release" in rel["reason"]
                m = await mirror()
                assert m is not None and m["active"] is False and m["releases"] == 1
                shown = await state()
                assert shown is not None and shown["active"] is False
                assert worker.stats.counters["manual_applied"] == 2
                assert worker.stats.counters["manual_rejected"] == 0
        finally:
            control.close()
            await worker.stop()

    asyncio.run(main())
