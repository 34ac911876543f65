"""Smoke tests: the clients driftline uses work against the real services of the session.

Kafka: confluent-kafka and aiokafka round trips (lz4 included) and a faust-streaming agent.
Redis: MULTI/EXEC and Lua. Launcher hygiene: nothing outlives its owner, AOF survives
restarts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, KafkaError, Producer

from scripts.services import (
    KAFKA_VERSION,
    REPO_ROOT,
    KafkaService,
    RedisService,
    kafka_api_versions,
)
from tests.fixtures.services import KafkaEndpoint, PrefixedRedis, PrometheusFactory, TopicFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _consume(
    bootstrap: str, topic: str, group: str, expected: int, timeout: float = 60.0
) -> list[Any]:
    """Read ``expected`` messages from ``topic`` from the beginning (fails on timeout)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    messages: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                err = msg.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    raise AssertionError(f"consume error: {err}")
                if err is None:
                    messages.append(msg)
    finally:
        consumer.close()
    assert len(messages) == expected, f"got {len(messages)} of {expected} messages from {topic}"
    return messages


def _process_gone(pid: int) -> bool:
    """True when ``pid`` does not exist or is a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _process_gone(pid):
            return True
        time.sleep(0.05)
    return _process_gone(pid)


# --------------------------------------------------------------------------- Kafka


def test_confluent_kafka_round_trip_keeps_per_partition_order(
    kafka_bootstrap: str, topic_factory: TopicFactory, unique_id: str
) -> None:
    topic = topic_factory(partitions=3)
    keys = [f"key-{k}" for k in range(12)]
    produced: dict[int, list[tuple[bytes, bytes, int]]] = defaultdict(list)
    failures: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            produced[msg.partition()].append((msg.key(), msg.value(), msg.offset()))

    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    total = 360
    for i in range(total):
        key = keys[i % len(keys)]
        producer.produce(topic, key=key, value=f"{key}|{i}".encode(), on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert failures == []
    assert sum(len(v) for v in produced.values()) == total
    assert len(produced) > 1, "keys should spread over more than one partition"

    messages = _consume(kafka_bootstrap, topic, f"smoke-{unique_id}", total)
    consumed: dict[int, list[tuple[bytes, bytes, int]]] = defaultdict(list)
    for msg in messages:
        consumed[msg.partition()].append((msg.key(), msg.value(), msg.offset()))

    # Same messages, same order, same offsets, partition by partition.
    assert dict(consumed) == {p: sorted(v, key=lambda m: m[2]) for p, v in produced.items()}
    # Each key lives in one partition and its sequence numbers only go up.
    partitions_of_key: dict[bytes, set[int]] = defaultdict(set)
    last_seq: dict[bytes, int] = {}
    for partition, records in consumed.items():
        for raw_key, value, _offset in records:
            partitions_of_key[raw_key].add(partition)
            prefix, seq = value.decode().split("|")
            assert prefix.encode() == raw_key
            assert int(seq) > last_seq.get(raw_key, -1)
            last_seq[raw_key] = int(seq)
    assert all(len(p) == 1 for p in partitions_of_key.values())
    assert sorted(last_seq) == sorted(k.encode() for k in keys)


def test_aiokafka_round_trip_with_lz4_batch(
    kafka_bootstrap: str, topic_factory: TopicFactory, unique_id: str
) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = topic_factory(partitions=2)
    plain = [(f"p{i}".encode(), f"plain-{i}".encode() * 10) for i in range(50)]
    batched = [(f"b{i}".encode(), f"lz4-{i}".encode() * 20) for i in range(200)]

    async def run() -> list[tuple[int, bytes, bytes]]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        lz4_producer = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap, compression_type="lz4", max_batch_size=1 << 16
        )
        await producer.start()
        await lz4_producer.start()
        try:
            for key, value in plain:
                await producer.send_and_wait(topic, value=value, key=key, partition=0)
            batch = lz4_producer.create_batch()
            for key, value in batched:
                assert batch.append(key=key, value=value, timestamp=None) is not None
            delivered = await (await lz4_producer.send_batch(batch, topic, partition=1))
            assert delivered.partition == 1
        finally:
            await producer.stop()
            await lz4_producer.stop()

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=f"smoke-aio-{unique_id}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        got: list[tuple[int, bytes, bytes]] = []
        try:
            async with asyncio.timeout(60):
                while len(got) < len(plain) + len(batched):
                    records = await consumer.getmany(timeout_ms=500)
                    for tp, msgs in records.items():
                        got.extend((tp.partition, m.key, m.value) for m in msgs)
        finally:
            await consumer.stop()
        return got

    got = asyncio.run(run())
    assert [(k, v) for p, k, v in got if p == 0] == plain
    assert [(k, v) for p, k, v in got if p == 1] == batched


def test_lz4_batch_is_stored_compressed(
    kafka_service: KafkaService, topic_factory: TopicFactory
) -> None:
    """The broker keeps aiokafka's lz4 batch as one lz4 record batch (read from disk)."""
    from aiokafka import AIOKafkaProducer

    topic = topic_factory(partitions=1)

    async def run() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_service.bootstrap_servers, compression_type="lz4"
        )
        await producer.start()
        try:
            batch = producer.create_batch()
            for i in range(100):
                batch.append(key=None, value=b"x" * 100 + str(i).encode(), timestamp=None)
            await (await producer.send_batch(batch, topic, partition=0))
        finally:
            await producer.stop()

    asyncio.run(run())
    segment = kafka_service.data_dir / "data" / f"{topic}-0" / "00000000000000000000.log"
    data = segment.read_bytes()
    # Record batch v2 header: baseOffset i64, length i32, leaderEpoch i32, magic i8,
    # crc u32, attributes i16 (bits 0-2: compression, 3 = lz4), lastOffsetDelta i32.
    _base, length, _epoch, magic, _crc, attributes, last_delta = struct.unpack_from(
        ">qiibIhi", data, 0
    )
    assert magic == 2
    assert attributes & 0x7 == 3, f"compression bits {attributes & 0x7}, want 3 (lz4)"
    assert last_delta == 99  # all 100 records in that one batch
    assert length < 100 * 100 // 2  # and it is actually smaller than the raw values


def test_faust_agent_consumes_and_produces(
    kafka_bootstrap: str, topic_factory: TopicFactory, unique_id: str
) -> None:
    import faust

    source = topic_factory(partitions=1)
    sink = topic_factory(partitions=1)
    inputs = [f"event-{i}".encode() for i in range(50)]

    async def run() -> None:
        app = faust.App(
            f"smoke-faust-{unique_id}",
            broker=f"kafka://{kafka_bootstrap}",
            store="memory://",
            web_enabled=False,
            value_serializer="raw",
            key_serializer="raw",
            topic_partitions=1,
            topic_replication_factor=1,
            broker_commit_interval=0.5,
        )
        in_topic = app.topic(source, value_serializer="raw", key_serializer="raw")
        out_topic = app.topic(sink, value_serializer="raw", key_serializer="raw")

        @app.agent(in_topic)
        async def shout(stream: Any) -> None:
            async for event in stream.events():
                await out_topic.send(key=event.key, value=event.value.upper())

        await app.start()
        try:
            loop = asyncio.get_running_loop()

            def produce() -> None:
                producer = Producer({"bootstrap.servers": kafka_bootstrap})
                for i, value in enumerate(inputs):
                    producer.produce(source, key=str(i).encode(), value=value)
                assert producer.flush(30) == 0

            await loop.run_in_executor(None, produce)
            outputs = await loop.run_in_executor(
                None,
                lambda: _consume(kafka_bootstrap, sink, f"smoke-out-{unique_id}", len(inputs)),
            )
        finally:
            await app.stop()
        assert [(m.key(), m.value()) for m in outputs] == [
            (str(i).encode(), value.upper()) for i, value in enumerate(inputs)
        ]

    asyncio.run(run())


def test_session_kafka_reports_the_version_it_runs(kafka_endpoint: KafkaEndpoint) -> None:
    host, port = kafka_endpoint.bootstrap.split(",")[0].rsplit(":", 1)
    fetch_min = kafka_api_versions(host, int(port))[1][0]
    runs_4x = fetch_min >= 4  # Kafka 4.0 removed Fetch v0-v3 (KIP-896)
    if kafka_endpoint.source == "local":
        assert kafka_endpoint.service is not None
        assert kafka_endpoint.version == kafka_endpoint.service.version == KAFKA_VERSION
        assert runs_4x
    else:
        assert ("4.0+" in kafka_endpoint.version) == runs_4x
    assert kafka_endpoint.version in kafka_endpoint.describe()


# --------------------------------------------------------------------------- Redis


def test_redis_multi_exec_transaction(redis_client: PrefixedRedis) -> None:
    counter, record, seen = (redis_client.key(n) for n in ("counter", "record", "seen"))
    redis_client.set(counter, 41)
    pipe = redis_client.pipeline(transaction=True)
    pipe.incr(counter)
    pipe.hset(record, mapping={"model": "m1", "n": "3"})
    pipe.sadd(seen, "a", "b", "a")
    pipe.expire(record, 60)
    results = pipe.execute()
    assert results == [42, 2, 2, True]
    assert redis_client.get(counter) == b"42"
    assert redis_client.hgetall(record) == {b"model": b"m1", b"n": b"3"}
    assert 0 < redis_client.ttl(record) <= 60

    # Optimistic locking: a write between WATCH and EXEC aborts the transaction.
    other = redis.Redis(connection_pool=redis_client.connection_pool)
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.watch(counter)  # type: ignore[no-untyped-call]
        other.set(counter, 100)
        pipe.multi()
        pipe.incr(counter)
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert redis_client.get(counter) == b"100"


def test_redis_lua_script(redis_client: PrefixedRedis) -> None:
    # Checkpoint-like: set the state only if the stored offset is older, return the offset.
    script = """
    local current = tonumber(redis.call('HGET', KEYS[1], 'offset') or '-1')
    local proposed = tonumber(ARGV[1])
    if proposed > current then
        redis.call('HSET', KEYS[1], 'offset', proposed, 'state', ARGV[2])
        return proposed
    end
    return current
    """
    key = redis_client.key("{model-a}", "checkpoint")
    assert redis_client.eval(script, 1, key, 10, "s10") == 10
    assert redis_client.eval(script, 1, key, 7, "s7") == 10
    checkpoint = redis_client.register_script(script)
    assert checkpoint(keys=[key], args=[12, "s12"]) == 12
    assert redis_client.hgetall(key) == {b"offset": b"12", b"state": b"s12"}


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_target_and_evaluates_rules(
    prometheus: PrometheusFactory, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()
    requests = Counter("smoke_requests", "Requests seen by the smoke test", registry=registry)
    requests.inc(7)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n"
        "  - name: smoke\n"
        "    interval: 1s\n"
        "    rules:\n"
        "      - record: smoke:requests:sum\n"
        "        expr: sum(smoke_requests_total)\n"
    )
    try:
        handle = prometheus([f"127.0.0.1:{server.server_port}"], rule_files=[rules])
        checked = subprocess.run(
            [handle.promtool, "check", "rules", str(rules)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        scraped = handle.wait_for("smoke_requests_total", timeout=30)
        assert float(scraped[0]["value"][1]) == 7.0
        assert scraped[0]["metric"]["instance"] == f"127.0.0.1:{server.server_port}"
        recorded = handle.wait_for("smoke:requests:sum", timeout=30)
        assert float(recorded[0]["value"][1]) == 7.0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------- launchers


def test_redis_service_stop_leaves_no_process() -> None:
    service = RedisService()
    service.start()
    pid = service.pid
    data_dir = service.data_dir
    assert pid is not None and not _process_gone(pid)
    assert redis.Redis.from_url(service.url).ping()
    service.stop()
    assert _process_gone(pid)
    assert not data_dir.exists()
    assert service.pid is None


def test_redis_service_dies_with_a_sigkilled_parent() -> None:
    code = (
        "import sys, time\n"
        "from scripts.services import RedisService\n"
        "svc = RedisService().start()\n"
        "print(svc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    redis_pid = None
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"child printed {line!r}"
        redis_pid = int(line)
        assert not _process_gone(redis_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone(redis_pid), f"redis-server {redis_pid} outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if redis_pid is not None and not _process_gone(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)


def test_redis_service_restart_keeps_data_in_aof() -> None:
    with RedisService() as service:
        client = redis.Redis.from_url(service.url)
        client.set("before-restart", "kept")
        first_pid = service.pid
        service.restart()
        assert service.pid != first_pid
        assert redis.Redis.from_url(service.url).get("before-restart") == b"kept"

        # After SIGKILL too, once the write is older than appendfsync's 1 s.
        client = redis.Redis.from_url(service.url)
        client.set("before-kill", "kept")
        time.sleep(1.5)
        service.kill()
        assert service.pid is None
        service.start()
        client = redis.Redis.from_url(service.url)
        assert client.get("before-kill") == b"kept"
        assert client.get("before-restart") == b"kept"
        assert (service.data_dir / "appendonlydir").is_dir()


def test_services_cli_runs_redis_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "scripts" / "services.py"), "redis"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("redis://127.0.0.1:"), url
        client = redis.Redis.from_url(url)
        assert client.ping()
        server_pid = int(client.info("server")["process_id"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert _wait_gone(server_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
