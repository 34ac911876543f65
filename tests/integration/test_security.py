"""Kafka SASL/SCRAM + ACLs and Redis ACLs, on servers of their own (not the session's).

Kafka: a local KRaft broker whose listeners all require SASL (SCRAM-SHA-512 for clients),
with the StandardAuthorizer, ``super.users=User:admin`` and deny-by-default. The ACLs are
driftline's least-privilege roles (:func:`stream.security.driftline_acls`). Checked:
authenticated clients work within their ACLs through every client library driftline
uses (confluent-kafka, aiokafka, faust, the producer SDK and kill-switch watcher, all
configured from ``ServiceSettings`` by :func:`stream.security.kafka_client_config`), and
are refused outside them; unauthenticated clients and wrong passwords are refused.

Redis: a TLS-only redis-server whose default user is the admin and whose ``driftline`` user
is limited to the key prefix and RedisStore's commands (:func:`stream.security.redis_acl_rules`);
RedisStore connects with a ``rediss://...?ssl_ca_certs=`` URL, as ``DRIFTLINE_REDIS_URL``
would give it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from scripts.services import (
    KafkaService,
    RedisAclUser,
    RedisService,
    kafka_broker_count,
)
from stream.config import ServiceSettings, Topics
from stream.redis_store import RedisStore
from stream.security import (
    create_acls,
    driftline_acls,
    faust_app_acls,
    kafka_client_config,
    redis_acl_rules,
)
from stream.store import JoinOp, OutMessage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

USERS = {
    "admin": "admin-pw",
    "driftline": "worker-pw",
    "serving": "serving-pw",
    "watcher": "watcher-pw",
    "faustapp": "faust-pw",
    "nobody": "nobody-pw",  # authenticated, but no ACLs at all
}
GROUP_PREFIX = "dlsec"


class SecureKafka:
    """The SASL broker, its unique topic names, and per-user settings."""

    def __init__(self, service: KafkaService, topics: Topics, faust_source: str) -> None:
        self.service = service
        self.topics = topics
        self.faust_source = faust_source

    @property
    def bootstrap(self) -> str:
        return self.service.bootstrap_servers

    def settings(
        self, user: str, password: str | None = None, *, tls: bool = False
    ) -> ServiceSettings:
        """ServiceSettings exactly as the worker reads them from its environment
        (``tls``: SASL_SSL on the TLS listener, trusting the test CA)."""
        env = {
            "DRIFTLINE_KAFKA_BOOTSTRAP": self.bootstrap,
            "DRIFTLINE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "DRIFTLINE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "DRIFTLINE_KAFKA_SASL_USERNAME": user,
            "DRIFTLINE_KAFKA_SASL_PASSWORD": password or USERS[user],
        }
        if tls:
            env["DRIFTLINE_KAFKA_BOOTSTRAP"] = self.service.tls_bootstrap_servers
            env["DRIFTLINE_KAFKA_SECURITY_PROTOCOL"] = "SASL_SSL"
            env["DRIFTLINE_KAFKA_SSL_CAFILE"] = str(self.service.ca_file)
        for key, name in vars(self.topics).items():
            env[f"DRIFTLINE_TOPIC_{key.upper()}"] = name
        return ServiceSettings.from_env(env)

    def conf(self, user: str, **extra: Any) -> dict[str, Any]:
        """confluent-kafka settings for ``user`` (through kafka_client_config)."""
        return {**kafka_client_config(self.settings(user), "confluent"), **extra}


@pytest.fixture(scope="module")
def secure_kafka() -> Iterator[SecureKafka]:
    uid = uuid.uuid4().hex[:8]
    topics = Topics(**{k: f"{v}-{uid}" for k, v in vars(Topics()).items()})
    faust_source = f"faust-src-{uid}"
    service = KafkaService(sasl_scram_users=USERS, acls=True, tls=True, heap="384m")
    service.start()
    try:
        admin = AdminClient(service.client_config("admin"))
        names = [*vars(topics).values(), faust_source]
        for future in admin.create_topics([NewTopic(n, 1, 1) for n in names]).values():
            future.result(30)
        grants = (
            driftline_acls("worker", "User:driftline", topics, group_prefix=GROUP_PREFIX)
            + driftline_acls("producer", "User:serving", topics)
            + driftline_acls("watcher", "User:watcher", topics)
            + faust_app_acls("User:faustapp", f"faust-{uid}", [faust_source])
        )
        assert create_acls(service.client_config("admin"), grants) == len(grants)
        kafka = SecureKafka(service, topics, faust_source)
        _wait_visible(kafka, "driftline", topics.predictions)
        yield kafka
    finally:
        service.stop()


def _wait_visible(kafka: SecureKafka, user: str, topic: str, timeout: float = 30.0) -> None:
    """ACLs reach the broker's authorizer through the metadata log: wait until they do."""
    admin = AdminClient(kafka.conf(user))
    deadline = time.monotonic() + timeout
    while True:
        meta = admin.list_topics(topic, timeout=10).topics.get(topic)
        if meta is not None and meta.error is None:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{user} cannot describe {topic}: {meta and meta.error}")
        time.sleep(0.2)


def _produce(conf: dict[str, Any], topic: str, value: bytes) -> KafkaError | None:
    """Produce one message; return the delivery error (None when delivered)."""
    producer = Producer({**conf, "message.timeout.ms": 15000})
    errors: list[KafkaError] = []
    producer.produce(
        topic,
        key=b"k",
        value=value,
        on_delivery=lambda err, _m: errors.append(err) if err else None,
    )
    assert producer.flush(30) == 0
    return errors[0] if errors else None


def _consume(conf: dict[str, Any], topic: str, group: str, want: int, timeout: float = 30.0) -> Any:
    """Consume ``want`` messages (or the first error) with a committing group member."""
    consumer = Consumer(
        {**conf, "group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )
    consumer.subscribe([topic])
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                return msg.error()
            got.append(msg.value() or b"")
        if got:
            consumer.commit(asynchronous=False)  # OffsetCommit needs READ on the group
        return got
    finally:
        consumer.close()


# --------------------------------------------------------------------------- authentication


def test_unauthenticated_client_is_refused(secure_kafka: SecureKafka) -> None:
    # Raw protocol: a Metadata request before SASL makes the broker drop the connection.
    with pytest.raises((ConnectionError, OSError)):
        kafka_broker_count("127.0.0.1", secure_kafka.service.broker_port, timeout=5.0)
    # librdkafka over PLAINTEXT gets no metadata at all.
    errors: list[KafkaError] = []
    conf: dict[str, Any] = {"bootstrap.servers": secure_kafka.bootstrap, "error_cb": errors.append}
    admin = AdminClient(conf)
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)
    del admin


def test_wrong_password_is_refused(secure_kafka: SecureKafka) -> None:
    port = secure_kafka.service.broker_port
    with pytest.raises(ConnectionError, match="error code 58"):  # SASL_AUTHENTICATION_FAILED
        kafka_broker_count(
            "127.0.0.1", port, timeout=5.0, sasl=("SCRAM-SHA-512", "driftline", "wrong")
        )
    assert kafka_broker_count(  # the same call with the right password works
        "127.0.0.1", port, timeout=5.0, sasl=("SCRAM-SHA-512", "driftline", USERS["driftline"])
    )
    errors: list[KafkaError] = []
    settings = secure_kafka.settings("driftline", password="wrong")
    conf: dict[str, Any] = {**kafka_client_config(settings), "error_cb": errors.append}
    admin = AdminClient(conf)
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)
    admin.poll(1.0)  # serves error_cb
    del admin
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors


def test_authenticated_user_without_acls_sees_nothing(secure_kafka: SecureKafka) -> None:
    t = secure_kafka.topics
    meta = AdminClient(secure_kafka.conf("nobody")).list_topics(timeout=10)
    assert not set(meta.topics) & set(vars(t).values())  # no DESCRIBE: topics are hidden
    err = _produce(secure_kafka.conf("nobody"), t.predictions, b"x")
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


# --------------------------------------------------------------------------- authorization


def test_worker_reads_inputs_and_writes_outputs(secure_kafka: SecureKafka) -> None:
    t = secure_kafka.topics
    assert _produce(secure_kafka.conf("serving"), t.predictions, b"p1") is None
    got = _consume(secure_kafka.conf("driftline"), t.predictions, f"{GROUP_PREFIX}-ingest", 1)
    assert got == [b"p1"]
    for topic in (t.summaries, t.alerts, t.control, t.deadletter):
        assert _produce(secure_kafka.conf("driftline"), topic, b"out") is None, topic
    got = _consume(secure_kafka.conf("driftline"), t.summaries, f"{GROUP_PREFIX}-detect", 1)
    assert got == [b"out"]


def test_worker_is_refused_write_on_its_inputs(secure_kafka: SecureKafka) -> None:
    t = secure_kafka.topics
    for topic in (t.predictions, t.labels):
        err = _produce(secure_kafka.conf("driftline"), topic, b"forged")
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, topic


def test_worker_is_refused_other_groups(secure_kafka: SecureKafka) -> None:
    err = _consume(secure_kafka.conf("driftline"), secure_kafka.topics.predictions, "other", 1)
    assert isinstance(err, KafkaError) and err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED


def test_serving_producer_cannot_read_or_trip_the_kill_switch(secure_kafka: SecureKafka) -> None:
    t = secure_kafka.topics
    err = _produce(secure_kafka.conf("serving"), t.control, b'{"action":"release"}')
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    err = _produce(secure_kafka.conf("serving"), t.summaries, b"forged summary")
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    got = _consume(secure_kafka.conf("serving"), t.predictions, "serving-reader", 1)
    assert isinstance(got, KafkaError)
    assert got.code() in (
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
    )


# --------------------------------------------------------------------------- client libraries


async def _aio_consume(
    kw: dict[str, Any],
    topic: str,
    group: str,
    done: Callable[[list[bytes]], bool],
    *,
    commit: bool = False,
    refused: tuple[type[BaseException], ...] = (),
) -> list[bytes]:
    """Values read by an aiokafka group member until ``done(values)`` (30 s at most), then
    committed if ``commit``; a ``refused`` error while reading adds ``b"refused"``."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, group_id=group, auto_offset_reset="earliest", enable_auto_commit=False, **kw
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while not done(got):
                for msgs in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(m.value for m in msgs if m.value is not None)
        if commit:
            await consumer.commit()
    except refused:
        got.append(b"refused")
    finally:
        await consumer.stop()
    return got


def test_aiokafka_scram_within_acls(secure_kafka: SecureKafka) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import TopicAuthorizationFailedError

    t = secure_kafka.topics
    kw = kafka_client_config(secure_kafka.settings("driftline"), "aiokafka")
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"

    async def run() -> list[bytes]:
        producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **kw)
        await producer.start()
        try:
            await producer.send_and_wait(t.alerts, b"aio-alert", key=b"m")
            with pytest.raises(TopicAuthorizationFailedError):
                await producer.send_and_wait(t.labels, b"forged", key=b"m")
        finally:
            await producer.stop()
        return await _aio_consume(
            kw,
            t.alerts,
            f"{GROUP_PREFIX}-detect",
            lambda got: b"aio-alert" in got,
            refused=(TopicAuthorizationFailedError,),
        )

    got = asyncio.run(run())
    # alerts is an output topic: the worker may write it but not read it.
    assert got == [b"refused"]


def test_aiokafka_consumes_its_input_with_scram(secure_kafka: SecureKafka) -> None:
    t = secure_kafka.topics
    assert _produce(secure_kafka.conf("serving"), t.labels, b"label-1") is None
    kw = kafka_client_config(secure_kafka.settings("driftline"), "aiokafka")

    got = asyncio.run(_aio_consume(kw, t.labels, f"{GROUP_PREFIX}-ingest", bool, commit=True))
    assert got == [b"label-1"]


def test_faust_app_consumes_under_acls(secure_kafka: SecureKafka) -> None:
    import faust

    source = secure_kafka.faust_source
    app_id = "faust-" + source.rsplit("-", 1)[1]
    admin_conf = secure_kafka.service.client_config("admin")
    assert _produce(admin_conf, source, b"hello-faust") is None
    settings = secure_kafka.settings("faustapp")
    kw = kafka_client_config(settings, "faust")
    assert isinstance(kw["broker_credentials"], faust.SASLCredentials)

    async def run() -> bytes:
        received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        app = faust.App(
            app_id,
            store="memory://",
            web_enabled=False,
            value_serializer="raw",
            key_serializer="raw",
            topic_allow_declare=False,  # no CreateTopics: the ACLs grant no CREATE
            topic_disable_leader=True,  # no <app>-__assignor-__leader topic
            broker_commit_interval=0.5,
            **kw,
        )
        topic = app.topic(source, value_serializer="raw", key_serializer="raw")

        @app.agent(topic)
        async def take(stream: Any) -> None:
            async for value in stream:
                if not received.done():
                    received.set_result(value)

        await app.start()
        try:
            return await asyncio.wait_for(received, 60)
        finally:
            await app.stop()

    assert asyncio.run(run()) == b"hello-faust"


def test_sdk_producer_and_watcher_with_settings(secure_kafka: SecureKafka) -> None:
    from stream.sdk import DriftlineProducer, KillSwitchWatcher

    t = secure_kafka.topics
    producer = DriftlineProducer(
        secure_kafka.bootstrap,
        predictions_topic=t.predictions,
        labels_topic=t.labels,
        conf=kafka_client_config(secure_kafka.settings("serving")),
    )
    try:
        assert producer.log_label(model_id="fraud", request_id="r-sdk", label=1)
        assert producer.flush(30) == 0
        assert producer.delivery_errors == 0 and producer.sent_events == 1
    finally:
        producer.close()
    command = (
        b'{"command_id":"c-sec","model_id":"fraud","action":"rollback",'
        b'"target_version":"v1","mode":"automatic","issued_at":1.0}'
    )
    assert _produce(secure_kafka.conf("driftline"), t.control, command) is None
    watcher = KillSwitchWatcher(
        secure_kafka.bootstrap,
        topic=t.control,
        conf=kafka_client_config(secure_kafka.settings("watcher")),
    ).start()
    try:
        assert watcher.wait_ready(30)
        state = watcher.state("fraud")
        assert state.active and state.command_id == "c-sec" and state.target_version == "v1"
    finally:
        watcher.close()


# --------------------------------------------------------------------------- TLS (SASL_SSL)


def test_sasl_ssl_from_settings_with_confluent_and_aiokafka(secure_kafka: SecureKafka) -> None:
    from aiokafka import AIOKafkaProducer

    t = secure_kafka.topics
    conf = kafka_client_config(secure_kafka.settings("serving", tls=True))
    assert conf["security.protocol"] == "SASL_SSL"
    assert _produce(conf, t.predictions, b"over-tls") is None
    kw = kafka_client_config(secure_kafka.settings("driftline", tls=True), "aiokafka")

    async def run() -> list[bytes]:
        producer = AIOKafkaProducer(acks="all", **kw)
        await producer.start()
        try:
            await producer.send_and_wait(t.deadletter, b"tls-out")
        finally:
            await producer.stop()
        return await _aio_consume(
            kw, t.predictions, f"{GROUP_PREFIX}-ingest", lambda got: b"over-tls" in got
        )

    assert b"over-tls" in asyncio.run(run())


def test_tls_listener_refuses_untrusted_or_plaintext_clients(secure_kafka: SecureKafka) -> None:
    tls_bootstrap = secure_kafka.service.tls_bootstrap_servers
    trusted = secure_kafka.service.client_config("driftline", tls=True)
    untrusted = {k: v for k, v in trusted.items() if k != "ssl.ca.location"}  # system CAs only
    plaintext = {**trusted, "security.protocol": "SASL_PLAINTEXT"}
    plaintext.pop("ssl.ca.location")
    seen: dict[str, list[KafkaError]] = {}
    for name, conf in (("untrusted", untrusted), ("plaintext", plaintext)):
        errors: list[KafkaError] = []
        with_cb: dict[str, Any] = {**conf, "error_cb": errors.append}
        admin = AdminClient(with_cb)
        with pytest.raises(KafkaException):
            admin.list_topics(timeout=5)
        admin.poll(0.5)
        del admin
        seen[name] = errors
    assert any("certificate verify failed" in e.str() for e in seen["untrusted"]), seen
    assert seen["plaintext"], seen
    assert AdminClient(trusted).list_topics(timeout=10).brokers  # and the right one works
    assert tls_bootstrap in str(AdminClient(trusted).list_topics(timeout=10).brokers[1])


# --------------------------------------------------------------------------- Redis


class SecureRedis:
    def __init__(self, service: RedisService, prefix: str) -> None:
        self.service = service
        self.prefix = prefix


@pytest.fixture(scope="module")
def secure_redis() -> Iterator[SecureRedis]:
    prefix = f"dl{uuid.uuid4().hex[:6]}"
    users = [
        RedisAclUser("driftline", "redis-worker-pw", redis_acl_rules(prefix)),
        RedisAclUser("ksreader", "redis-reader-pw", redis_acl_rules(prefix, "killswitch_reader")),
    ]
    with RedisService(acl_users=users, password="redis-admin-pw", tls=True) as service:
        yield SecureRedis(service, prefix)


def _park(req: str, tick: int) -> JoinOp:
    record = {"v": "v1", "s": ["region=eu"], "sc": 0.8, "p": "1", "ts": 10.0}
    return JoinOp("park", "fraud", req, tick, 60.0, record)


def _label(req: str, tick: int) -> JoinOp:
    return JoinOp("label", "fraud", req, tick, 60.0, {"y": "1", "ts": 20.0})


def test_redis_store_works_as_the_limited_user(secure_redis: SecureRedis) -> None:
    url = secure_redis.service.url_for("driftline")

    async def run() -> None:
        store = RedisStore(url, prefix=secure_redis.prefix, retry_for_s=5.0)
        try:
            claim = await store.claim("ingest", 0, "w1")
            gen = claim.generation
            out = OutMessage("m1", "driftline.summaries", b"fraud", b"{}")
            first = await store.commit(
                "ingest",
                0,
                gen,
                state=b"s1",
                next_offset={"p": 5},
                outbox=[out],
                join_ops=[_park("r1", 1), _label("r2", 1)],
                killswitch={"fraud": b'{"active":true}'},
            )
            assert [o.outcome for o in first.outcomes] == ["early"]  # r1 parked, r2 early
            second = await store.commit(
                "ingest",
                0,
                gen,
                state=b"s2",
                next_offset={"p": 9},
                join_ops=[_label("r1", 2), _park("r2", 2)],
            )
            assert sorted(p.request_id for p in second.pairs) == ["r1", "r2"]
            assert await store.get_killswitch("fraud") == b'{"active":true}'
            await store.ack_outbox("ingest", 0, gen, ["m1"])
            again = await store.claim("ingest", 0, "w2")
            assert again.generation == gen + 1
            assert (again.state, again.next_offset, again.outbox) == (b"s2", {"p": 9}, [])
        finally:
            await store.close()

    asyncio.run(run())


def test_limited_redis_user_is_refused_outside_its_prefix(secure_redis: SecureRedis) -> None:
    client = redis.Redis.from_url(secure_redis.service.url_for("driftline"))
    prefix = secure_redis.prefix
    try:
        assert client.ping()
        client.set(f"{prefix}:probe", "ok")
        assert client.get(f"{prefix}:probe") == b"ok"
        refusals: list[Callable[[], Any]] = [
            lambda: client.get("other:key"),
            lambda: client.set(f"{prefix}x:key", "1"),  # same characters, no ':' after prefix
            lambda: client.eval("return redis.call('GET', KEYS[1])", 1, "other:key"),
            lambda: client.eval("return redis.call('SET', 'other:key', '1')", 0),
            client.flushall,
            lambda: client.config_get("*"),
            lambda: client.config_set("appendonly", "no"),
            lambda: client.keys("*"),
            client.acl_list,
            client.script_flush,  # only SCRIPT LOAD is allowed
            client.client_list,
        ]
        for refused in refusals:
            with pytest.raises(redis.exceptions.ResponseError, match=r"permission|can.t access"):
                refused()
    finally:
        client.close()
    admin = redis.Redis.from_url(secure_redis.service.url)
    try:
        assert admin.get(f"{prefix}:probe") == b"ok"
        assert admin.exists("other:key", f"{prefix}x:key") == 0  # nothing was written
    finally:
        admin.close()


def test_redis_without_or_with_wrong_credentials_is_refused(secure_redis: SecureRedis) -> None:
    service = secure_redis.service
    anonymous = redis.Redis.from_url(service.url_for(None))
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.get(f"{secure_redis.prefix}:x")
    wrong = redis.Redis.from_url(service.url_for("driftline", "not-the-password"))
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()
    acl_text = (service.data_dir / "users.acl").read_text()
    assert "redis-worker-pw" not in acl_text and "redis-admin-pw" not in acl_text
    assert (service.data_dir / "users.acl").stat().st_mode & 0o077 == 0


def test_killswitch_reader_may_only_read_the_mirror(secure_redis: SecureRedis) -> None:
    prefix = secure_redis.prefix
    writer = redis.Redis.from_url(secure_redis.service.url_for("driftline"))
    reader = redis.Redis.from_url(secure_redis.service.url_for("ksreader"))
    try:
        writer.set(f"{prefix}:ks:fraud", b'{"active":true}')
        writer.set(f"{prefix}:{{ingest:0}}:state", b"state")
        assert reader.get(f"{prefix}:ks:fraud") == b'{"active":true}'
        with pytest.raises(redis.exceptions.NoPermissionError):
            reader.set(f"{prefix}:ks:fraud", b'{"active":false}')
        with pytest.raises(redis.exceptions.NoPermissionError):
            reader.get(f"{prefix}:{{ingest:0}}:state")
        assert writer.get(f"{prefix}:ks:fraud") == b'{"active":true}'
    finally:
        writer.close()
        reader.close()


def test_redis_tls_refuses_plaintext_and_untrusted_clients(secure_redis: SecureRedis) -> None:
    url = secure_redis.service.url_for("driftline")
    assert url.startswith("rediss://") and "ssl_ca_certs=" in url
    plaintext = "redis://" + url.split("://", 1)[1].split("?", 1)[0]
    untrusted = url.split("?", 1)[0]  # TLS, but only the system CAs
    for bad in (plaintext, untrusted):
        client = redis.Redis.from_url(bad, socket_timeout=5)
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
        client.close()
    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis.from_url(untrusted, socket_timeout=5).ping()
    good = redis.Redis.from_url(url)
    assert good.ping()
    good.close()
