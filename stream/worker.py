"""The driftline worker: stage 1 and stage 2 over Kafka, state and offsets in Redis.

This is the Kafka + Redis twin of :class:`stream.embedded.EmbeddedRunner`: the same pure
engine (:class:`~stream.engine.Ingest`, :class:`~stream.detect.Detect`) and the same
consistency protocol (claim → process → ONE atomic commit of state + next offsets +
outbox + join ops → publish → ack), with the I/O around it.

Why aiokafka consumers and not faust agents
-------------------------------------------
Offsets live in Redis, written atomically with the state; Kafka's committed offsets are
informational only (they are committed for lag dashboards and autoscaling, never read).
That needs *seek on assignment*, which faust-streaming 0.15 does not support reliably:
after a rebalance its Recovery service and its Fetcher call ``Consumer.perform_seek()``,
which seeks every partition back to the offsets committed *in Kafka*
(``faust/transport/consumer.py``: "getmany called while flow not active. Seek back to
committed offsets"; faust-streaming#216: recovery resumes before seeking; #461: storing
offsets in an external database is an open question with no supported answer), so a seek
done in ``on_partitions_assigned`` is silently overridden. Add the open bookkeeping bugs
in FIELD-NOTES (#606, #596, #502, #629, #316) and faust's fixed per-message cost (10–13k
messages/s against ~300k/s for a raw ``getmany`` loop), and the robust choice is what
Kafka's own documentation prescribes for external offsets: a plain aiokafka consumer per
stage with a :class:`~aiokafka.abc.ConsumerRebalanceListener` that claims each assigned
partition in Redis (fencing), restores the engine and seeks to the stored offsets.

faust-streaming remains the service framework: ``driftline worker`` runs these stage
runners inside a faust App (:mod:`stream.app`) as a faust service, with ``/healthz``,
``/readyz`` and ``/metrics`` as faust views; faust's own consumer and producer are not
started, so faust never touches the input topics or the consumer groups. :class:`Worker`
can also run without faust (tests, :func:`run_worker`), serving the same endpoints itself.

What the FIELD-NOTES ask of faust still holds here: one batch at a time per stage
(concurrency 1), static group membership (``group_instance_id``), ``RangePartitionAssignor``
so that predictions-p and labels-p (co-partitioned by ``request_id``) go to the same worker,
and HTTP endpoints bound to the configured address only (no ``/table``, ``/router``).

Metrics: :class:`stream.metrics.Metrics` is fed after each successful commit (a batch
re-processed after a failed commit is counted once), after broker acks, on claims and
revokes, and every ``metrics_interval_s`` (consumer lag = high watermark − Redis
checkpoint, owned partitions, readiness, store round trips); see docs/observability.md.

Per stage-1 batch (records from ``getmany`` gathered for up to ``batch_within_s`` or
``batch_size`` records, like faust's ``stream.take``)::

    for each owned partition p: out = ingest[p].process_raw(messages, now)
    results = gather(store.commit(p, ...))        # one Redis round trip per partition
    ingest[p].absorb(result)
    publish every outbox message, wait for the broker's acks, then store.ack_outbox(...)

Records below the partition's stored next offset are dropped (a batch fetched before a
rebalance may be handed over after the partition was re-claimed), so nothing is counted
twice whatever the rebalance timing.

Failures: a commit raising :class:`~stream.store.Fenced` means another worker owns the
partition — it is paused and dropped, with an error log naming it — unless Redis holds no
generation for it at all (keys deleted or flushed while the worker ran) and the partition is
still assigned here: then it is re-claimed, and the claim's checkpoint check replays or
resets it (ERROR log, ``<stage>_state_lost_running``). Redis connection errors
are retried with backoff inside :class:`~stream.redis_store.RedisStore` (the worker stalls,
it does not crash-loop). Any other commit error re-claims the partition from Redis, so the
in-memory engine never runs ahead of the durable state. Kafka publish errors are retried
with backoff; the messages are safe in the Redis outbox meanwhile.

Manual kill-switch operations (``driftline killswitch release``) are messages on the
summaries topic keyed by model id, so they reach the stage-2 partition that owns the model
and are applied exactly once, in order with the summaries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordListTooLargeError,
    UnknownProducerId,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from stream.config import MonitorConfig, ServiceSettings, Topics, load_config
from stream.detect import Detect, DetectOutput
from stream.engine import Ingest, IngestOutput, compile_plans, tune_gc
from stream.events import RawMessage, Reject, deadletter_record
from stream.heap import HeapTrimmer
from stream.metrics import Metrics
from stream.partitioner import murmur2_partition
from stream.profile import Profile, profile_for
from stream.redis_store import RedisStore
from stream.store import Fenced, JoinResult, OutMessage, StateStore
from stream.summary import ModelPlan

log = logging.getLogger("driftline.worker")

_VERIFY_TIMEOUT_S: Final = 10.0
"""How long a claim waits for Kafka's committed / log-start offsets before it resumes from
the Redis checkpoint unverified."""

MANUAL_PREFIX: Final = b'{"driftline_manual":1,'
"""Stage-2 input messages starting with this are manual kill-switch requests."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class WorkerOptions:
    """Worker knobs that are not (yet) in :class:`ServiceSettings`."""

    group_prefix: str = "driftline"
    instance_id: str | None = None  # static membership; None = dynamic
    redis_prefix: str = "dl"
    start_from: str = "earliest"  # where a never-checkpointed partition starts
    stages: tuple[str, ...] = ("ingest", "detect")
    idle_check_s: float = 0.25
    kafka_commit_interval_s: float = 5.0
    commit_kafka_offsets: bool = True  # informational mirror of the Redis offsets
    max_future_s: float = 300.0
    max_message_bytes: int = 1 << 20
    session_timeout_ms: int = 30_000
    metrics_interval_s: float = 1.0  # consumer lag, partitions, readiness, store counters

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerOptions:
        """``DRIFTLINE_GROUP_PREFIX``, ``DRIFTLINE_INSTANCE_ID`` (else ``POD_NAME``),
        ``DRIFTLINE_REDIS_PREFIX``, ``DRIFTLINE_START_FROM`` (earliest | latest)."""
        e = os.environ if env is None else env
        start = e.get("DRIFTLINE_START_FROM") or "earliest"
        if start not in ("earliest", "latest"):
            raise ValueError(
                f"DRIFTLINE_START_FROM: {start!r} is not valid; valid values: earliest, latest"
            )
        return cls(
            group_prefix=e.get("DRIFTLINE_GROUP_PREFIX") or "driftline",
            instance_id=e.get("DRIFTLINE_INSTANCE_ID") or e.get("POD_NAME") or None,
            redis_prefix=e.get("DRIFTLINE_REDIS_PREFIX") or "dl",
            start_from=start,
        )


def kafka_client_kwargs(settings: ServiceSettings) -> dict[str, Any]:
    """aiokafka security settings (SASL / TLS) from the service settings."""
    kw: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        kw["ssl_context"] = create_ssl_context(
            cafile=settings.ssl_cafile,
            certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile,
        )
    if settings.sasl_mechanism is not None:
        kw["sasl_mechanism"] = settings.sasl_mechanism
        kw["sasl_plain_username"] = settings.sasl_username
        kw["sasl_plain_password"] = settings.sasl_password
    return kw


@dataclass
class WorkerStats:
    """In-process counters (tests, logs); Prometheus metrics are :class:`Metrics`."""

    counters: Counter[str] = field(default_factory=Counter)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n


# --------------------------------------------------------------------------- publishing


class Publisher:
    """Sends outbox messages and waits for the broker's acks (retrying until they land);
    acknowledged messages are counted in ``metrics`` (``driftline_messages_published``).

    A message the broker refuses as too large (``MESSAGE_TOO_LARGE``, ``RECORD_LIST_TOO_LARGE``,
    e.g. an output topic whose ``max.message.bytes`` is below a summary's size) or that the
    producer refuses before sending (larger than ``max_request_size``) can never be
    delivered: retrying it would stall its stage forever. It is sent alone once more (a
    refusal of a whole batch may hit messages that were only batched with it), and if it is
    refused alone it becomes a dead-letter record (reason ``output_too_large``, raw bytes
    capped as for input dead letters) and ``driftline_output_too_large_total`` counts it.

    A refusal breaks the idempotent producer's sequence numbers (the next batch of that
    partition fails with ``OUT_OF_ORDER_SEQUENCE_NUMBER``), so the producer is replaced by a
    new one from ``factory`` (``on_producer`` is told); without a factory the producer is
    kept, which only suits a non-idempotent producer. So that a misconfigured topic does not
    cost a producer per message, the smallest size refused alone is remembered per topic
    for ``relearn_s``: messages at least that large are dead-lettered without being sent.

    ``limits`` (each output topic's ``max.message.bytes``, :func:`topic_message_limits`)
    makes refusals rare: a message whose one-record batch is larger is dead-lettered before
    it is sent. That matters for order: after a refused batch the broker may still append
    the partition's next batch, so a refused message re-sent alone lands after later ones,
    and stage 2 drops a summary whose seq is not above the last one it applied. With the
    limits known (and the producer's batch size capped to the smallest), nothing is
    refused and order holds; without them (no DescribeConfigs permission, or a limit
    lowered at run time) a refusal can cost the order of that publish's messages.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        backoff_s: tuple[float, float] = (0.1, 5.0),
        metrics: Metrics | None = None,
        *,
        factory: Callable[[], AIOKafkaProducer] | None = None,
        on_producer: Callable[[AIOKafkaProducer], None] | None = None,
        deadletter_topic: str | None = None,
        relearn_s: float = 60.0,
        limits: Mapping[str, int] | None = None,
    ):
        self.producer = producer
        self.backoff_s = backoff_s
        self.metrics = metrics
        self.factory = factory
        self.on_producer = on_producer
        self.deadletter_topic = deadletter_topic
        self.resets = 0
        self.too_large: Counter[str] = Counter()  # topic -> dead-lettered (tests, logs)
        self.relearn_s = relearn_s
        self.limits: dict[str, int] = dict(limits or {})
        self._warned: set[str] = set()
        self._refused: dict[str, tuple[int, float]] = {}  # topic -> (size, monotonic time)
        self._reset_lock = asyncio.Lock()
        # one publish at a time (both stages share the producer): a producer replaced by one
        # caller must not fail or reorder another caller's messages in flight on it
        self._lock = asyncio.Lock()

    def _known_too_large(self, m: OutMessage) -> bool:
        limit = self.limits.get(m.topic)
        if limit is not None and _batch_bytes(m) > limit:
            return True
        seen = self._refused.get(m.topic)
        if seen is None:
            return False
        if time.monotonic() - seen[1] > self.relearn_s:
            del self._refused[m.topic]  # the topic's limit may have been raised: try again
            return False
        return len(m.key) + len(m.value) >= seen[0]

    def _learn_refused(self, m: OutMessage) -> None:
        size = len(m.key) + len(m.value)
        seen = self._refused.get(m.topic)
        if seen is None or size < seen[0]:
            self._refused[m.topic] = (size, time.monotonic())

    async def publish(self, msgs: Sequence[OutMessage]) -> None:
        """Publish ``msgs``; return once each is acknowledged or dead-lettered as too large."""
        if not msgs:
            return
        async with self._lock:
            await self._publish(msgs)

    async def _publish(self, msgs: Sequence[OutMessage]) -> None:
        pending = list(msgs)
        delay, cap = self.backoff_s
        while pending:
            producer = self.producer
            futs: list[tuple[OutMessage, Any]] = []
            failed: dict[int, BaseException] = {}  # position in pending -> error
            for i, m in enumerate(pending):
                if self._known_too_large(m):
                    await self._dead_letter(m, _LEARNED)
                    continue
                try:
                    futs.append((m, await producer.send(m.topic, value=m.value, key=m.key)))
                except _TOO_LARGE as err:  # larger than max_request_size: never sent
                    await self._dead_letter(m, err)
                except KafkaError as err:
                    failed[i] = err
            results = await asyncio.gather(*[f for _, f in futs], return_exceptions=True)
            position = {id(m): i for i, m in enumerate(pending)}
            sent: list[OutMessage] = []
            for (m, _), res in zip(futs, results, strict=True):
                if isinstance(res, KafkaError | asyncio.CancelledError):  # cancelled: producer
                    failed[position[id(m)]] = res  # stopped under it; retry on the new one
                elif isinstance(res, BaseException):
                    raise res
                else:
                    sent.append(m)
            if sent and self.metrics is not None:
                self.metrics.observe_published(sent)
            if not failed:
                return
            # Retried in their original order. A transient failure fails the partition's
            # later batches too (idempotent producer), so order holds; after a refusal the
            # broker may already have appended later batches (seen on Kafka 4 with a fresh
            # producer id): hence the size checks before sending (class docstring).
            rest = [pending[i] for i in sorted(failed)]
            errors = list(failed.values())
            if any(isinstance(e, _TOO_LARGE + _BROKEN_SEQUENCE) for e in errors):
                await self._reset(producer)
            if any(isinstance(e, _TOO_LARGE) for e in errors):
                # refused as too large, maybe with innocent batch mates: one at a time
                for m in rest:
                    await self._send_alone(m)
                return
            log.warning(
                "publish of %d messages failed (%s); retry in %.1f s", len(rest), errors[0], delay
            )
            await asyncio.sleep(delay)
            delay = min(cap, delay * 2)
            pending = rest

    async def _send_alone(self, m: OutMessage) -> None:
        """Send ``m`` on its own until acknowledged; dead letter if it is refused alone."""
        delay, cap = self.backoff_s
        while True:
            if self._known_too_large(m):
                await self._dead_letter(m, _LEARNED)
                return
            producer = self.producer
            try:
                fut = await producer.send(m.topic, value=m.value, key=m.key)
            except _TOO_LARGE as err:
                await self._dead_letter(m, err)
                return
            got: tuple[Any, ...] = await asyncio.gather(fut, return_exceptions=True)
            res = got[0]  # an exception instance or the record metadata (own cancel raises)
            if isinstance(res, _TOO_LARGE):
                self._learn_refused(m)
                await self._reset(producer)
                await self._dead_letter(m, res)
                return
            if isinstance(res, KafkaError | asyncio.CancelledError):
                if isinstance(res, _BROKEN_SEQUENCE):
                    await self._reset(producer)
                log.warning("publish of %s failed (%r); retry in %.1f s", m.id, res, delay)
                await asyncio.sleep(delay)
                delay = min(cap, delay * 2)
                continue
            if isinstance(res, BaseException):
                raise res
            if self.metrics is not None:
                self.metrics.observe_published([m])
            return

    async def _dead_letter(self, m: OutMessage, err: BaseException | str) -> None:
        """Replace undeliverable ``m`` by its dead-letter record (never recursively)."""
        dl = self.deadletter_topic
        first = m.topic not in self._warned  # known-too-large: one ERROR per topic, then DEBUG
        self._warned.add(m.topic)
        log.log(
            logging.DEBUG if err is _LEARNED and not first else logging.ERROR,
            "output %s (%d bytes) to %s refused as too large (%s); %s",
            m.id,
            len(m.value),
            m.topic,
            err,
            "dead-lettered" if dl and m.topic != dl else "DROPPED (dead-letter topic refused it)",
        )
        if dl is None or m.topic == dl:
            if self.metrics is not None:
                self.metrics.observe_output_too_large(m.topic, dead_lettered=False)
            self.too_large[m.topic] += 1
            return
        partition = -1
        with contextlib.suppress(Exception):
            parts = await self.producer.partitions_for(m.topic)
            partition = murmur2_partition(m.key, len(parts)) if m.key and parts else min(parts)
        raw = RawMessage(m.topic, max(partition, 0), -1, m.value)
        reject = Reject(
            "output_too_large",
            f"message: {len(m.value)} bytes to topic {m.topic!r} refused by the producer or "
            f"broker as too large ({err if isinstance(err, str) else type(err).__name__}); "
            "raise the topic's max.message.bytes",
        )
        rec = deadletter_record(reject, raw)
        rec["deadletter_id"] = f"output:{m.id}"
        await self._send_alone(
            OutMessage(rec["deadletter_id"], dl, m.topic.encode(), orjson.dumps(rec))
        )
        if self.metrics is not None:
            self.metrics.observe_output_too_large(m.topic, dead_lettered=True)
        self.too_large[m.topic] += 1

    async def _reset(self, broken: AIOKafkaProducer) -> None:
        """Replace ``broken`` (its sequence numbers are out of step after a refusal)."""
        if self.factory is None:
            return
        async with self._reset_lock:
            if self.producer is not broken:
                return  # another publish replaced it already
            fresh = self.factory()
            await fresh.start()
            self.producer = fresh
            self.resets += 1
            if self.on_producer is not None:
                self.on_producer(fresh)
            log.warning("producer replaced after a refused batch (reset %d)", self.resets)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broken.stop(), 10.0)


def _batch_bytes(m: OutMessage) -> int:
    """Size of a record batch holding only ``m`` (what ``max.message.bytes`` limits)."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(m.key, m.value, [])
    return size


async def topic_message_limits(settings: ServiceSettings, topics: Sequence[str]) -> dict[str, int]:
    """``max.message.bytes`` of each topic (DescribeConfigs); topics whose config cannot be
    read (no permission, error) are left out: the publisher then learns from refusals."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    limits: dict[str, int] = {}
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
    try:
        await admin.start()
        wanted = [
            ConfigResource(ConfigResourceType.TOPIC, t, {"max.message.bytes": None})
            for t in dict.fromkeys(topics)
        ]
        for resp in await asyncio.wait_for(admin.describe_configs(wanted), 15.0):
            for error_code, _, _, name, entries in resp.resources:
                for entry in entries if not error_code else ():
                    if entry[0] == "max.message.bytes" and entry[1]:
                        limits[name] = int(entry[1])
    except Exception as err:  # the limits are an optimisation: never fail the start on them
        log.warning("output topics' max.message.bytes unknown (%r); learning from refusals", err)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return limits


_TOO_LARGE: Final = (MessageSizeTooLargeError, RecordListTooLargeError)
_LEARNED: Final = "larger than the topic's max.message.bytes or than a message it refused"
_BROKEN_SEQUENCE: Final = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)


# --------------------------------------------------------------------------- stages


class _Listener(ConsumerRebalanceListener):
    def __init__(self, stage: StageRunner) -> None:
        self.stage = stage

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.stage.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.stage.on_assigned(set(assigned))


class StageRunner:
    """One stage's consumer loop; subclasses hold the per-partition engines."""

    stage: str = ""
    # None: gather for the whole ``batch_within_s``; a number: close the batch as soon as
    # a fetch finds nothing new within that many seconds (the stage is caught up)
    settle_s: float | None = None

    def __init__(
        self,
        worker: Worker,
        topics: Sequence[str],
        group_id: str,
    ) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.opts = worker.opts
        self.store: StateStore = worker.store
        self.stats = worker.stats
        self.metrics: Metrics = worker.metrics
        self.input_topics = list(topics)
        self.group_id = group_id
        self.lock = asyncio.Lock()
        self.generation: dict[int, int] = {}
        self.fenced: set[int] = set()
        self.consumer: AIOKafkaConsumer | None = None
        self.task: asyncio.Task[None] | None = None
        self.assigned_once = asyncio.Event()
        self._checkpointed: dict[TopicPartition, int] = {}
        self.seeks: dict[TopicPartition, int] = {}  # last seek per partition (observability)
        self._last_kafka_commit = 0.0
        self._kafka_committed: dict[TopicPartition, int] = {}
        self._lag_base: dict[TopicPartition, int] = {}  # start of never-checkpointed partitions
        self.owner = worker.owner

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        instance = self.opts.instance_id
        self.consumer = AIOKafkaConsumer(
            group_id=self.group_id,
            group_instance_id=f"{instance}-{self.stage}" if instance else None,
            enable_auto_commit=False,
            auto_offset_reset=self.opts.start_from,
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=self.opts.session_timeout_ms,
            max_partition_fetch_bytes=max(
                self.settings.fetch_partition_bytes, self.opts.max_message_bytes + 4096
            ),
            fetch_max_bytes=max(
                50 << 20, self.settings.fetch_partition_bytes, self.opts.max_message_bytes + 4096
            ),
            client_id=f"{self.owner}-{self.stage}",
            **kafka_client_kwargs(self.settings),
        )
        await self.consumer.start()
        self.consumer.subscribe(self.input_topics, listener=_Listener(self))
        self.task = asyncio.create_task(self._run(), name=f"driftline-{self.stage}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            # bounded: a batch stuck in an await that swallows the cancellation (a publish
            # retrying against an unreachable broker) must not hold the shutdown past the
            # pod's grace period; what it did not commit is redone from Redis by the next owner
            await asyncio.wait({self.task}, timeout=STAGE_STOP_TIMEOUT_S)
            if not self.task.done():
                log.error(
                    "%s: the stage loop did not stop within %.0f s of its cancellation; "
                    "abandoned (its uncommitted batch is redone from the Redis checkpoint)",
                    self.stage,
                    STAGE_STOP_TIMEOUT_S,
                )
            elif not self.task.cancelled() and self.task.exception() is not None:
                log.error("%s: the stage loop ended with %r", self.stage, self.task.exception())
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self._commit_kafka_offsets()
            try:  # leaving the group is a courtesy: Redis holds the checkpoints
                await asyncio.wait_for(self.consumer.stop(), CONSUMER_STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning(
                    "%s: consumer did not stop within %.0f s; abandoned (the group evicts it "
                    "after its session timeout; nothing acknowledged depends on it)",
                    self.stage,
                    CONSUMER_STOP_TIMEOUT_S,
                )

    # ----------------------------------------------------------------- rebalance

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self.lock:
            for p in sorted({tp.partition for tp in revoked}):
                self._release_metrics(p)
                self._drop(p)
            self.metrics.set_assigned_partitions(self.stage, len(self.owned()))
            log.info(
                "%s: revoked partitions %s", self.stage, sorted({tp.partition for tp in revoked})
            )

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self.lock:
            parts = sorted({tp.partition for tp in assigned})
            for p in parts:
                try:
                    await self._claim(p)
                except Exception as err:  # e.g. a state this version cannot load
                    self._claim_failed(p, err)
            log.info(
                "%s: claimed partitions %s (generations %s)",
                self.stage,
                parts,
                [self.generation.get(p) for p in parts],
            )
            self.assigned_once.set()
            self.metrics.set_assigned_partitions(self.stage, len(self.owned()))
            self.metrics.set_ready(self.worker.ready)

    async def _claim(self, p: int) -> None:
        assert self.consumer is not None
        claim = await self.store.claim(self.stage, p, self.owner)
        self.generation[p] = claim.generation
        self.fenced.discard(p)
        offsets = self._restore(p, claim.state, claim.inbox)
        stored = claim.next_offset or {}
        resume = await self._verify_checkpoint(
            p,
            claim.generation,
            claim.state is not None,
            {t: offsets.get(t, stored.get(t)) for t in self.input_topics},
        )
        for topic in self.input_topics:
            tp = TopicPartition(topic, p)
            if tp not in self.consumer.assignment():
                continue
            off = resume.get(topic)
            if off is not None:
                self.consumer.seek(tp, int(off))
                self._checkpointed[tp] = int(off)
                self.seeks[tp] = int(off)
            elif self.opts.start_from == "latest":
                await self.consumer.seek_to_end(tp)
            else:
                await self.consumer.seek_to_beginning(tp)
        with contextlib.suppress(Exception):
            self.consumer.resume(
                *[
                    TopicPartition(t, p)
                    for t in self.input_topics
                    if TopicPartition(t, p) in self.consumer.assignment()
                ]
            )
        if claim.outbox:
            log.info(
                "%s/%d: republishing %d outbox messages left by the previous owner (%s)",
                self.stage,
                p,
                len(claim.outbox),
                dict(Counter(m.topic for m in claim.outbox)),
            )
            await self.worker.publisher.publish(claim.outbox)
            await self.store.ack_outbox(
                self.stage, p, claim.generation, [m.id for m in claim.outbox]
            )
            self.stats.inc(f"{self.stage}_republished", len(claim.outbox))
        self._claimed_metrics(p)

    async def _verify_checkpoint(
        self, p: int, generation: int, has_state: bool, stored: Mapping[str, int | None]
    ) -> dict[str, int | None]:
        """Check the Redis checkpoint of partition ``p`` against the group's Kafka-committed
        offsets; return the offset to resume each input topic from (None: ``start_from``).

        Kafka's committed offsets mirror Redis checkpoints that were durable when they were
        committed, so they are a lower bound of what Redis must hold:

        * Redis offset >= committed (the normal case) or nothing committed: resume from Redis.
        * Redis offset < committed: Redis rolled back (lost AOF tail, restore of an older
          RDB / DUMP). State and offsets are still one consistent older checkpoint, so the
          stage replays from it; outputs are re-emitted with the same deterministic ids.
          WARNING log, ``<stage>_state_rollbacks``, ``driftline_state_recoveries_total
          {outcome="rollback"}``.
        * State missing (flushed or new Redis) but the committed offset is past the log
          start: the state is lost. If the log still starts at offset 0 the stage replays
          everything with fresh state (exact; ERROR log, outcome ``replay``). Otherwise it
          resumes from the committed offset with fresh state and publishes a ``state_reset``
          alert naming the stage, partition and offsets skipped (CRITICAL log, outcome
          ``reset``) — never silently.

        If Kafka cannot answer within ``_VERIFY_TIMEOUT_S`` the Redis checkpoint is used
        unverified (WARNING, ``<stage>_checkpoint_unverified``).
        """
        assert self.consumer is not None
        consumer = self.consumer
        tps = [
            TopicPartition(t, p)
            for t in self.input_topics
            if TopicPartition(t, p) in consumer.assignment()
        ]
        resume: dict[str, int | None] = dict(stored)
        if not tps:
            return resume
        try:
            got = await asyncio.wait_for(
                asyncio.gather(*[consumer.committed(tp) for tp in tps]), _VERIFY_TIMEOUT_S
            )
            committed: dict[TopicPartition, int | None] = dict(zip(tps, got, strict=True))
            # the log start (a ListOffsets round trip, up to ~0.5 s in aiokafka) matters only
            # where an offset has no Redis offset to be compared with
            need_start = any(
                (committed[tp] is not None or stored.get(tp.topic) is not None)
                and (not has_state or stored.get(tp.topic) is None)
                for tp in tps
            )
            begin: dict[TopicPartition, int] = {}
            if need_start:
                begin = await asyncio.wait_for(consumer.beginning_offsets(tps), _VERIFY_TIMEOUT_S)
        except (KafkaError, TimeoutError) as err:
            log.warning(
                "%s/%d: cannot read the group's committed offsets (%r); resuming from the Redis "
                "checkpoint unverified",
                self.stage,
                p,
                err,
            )
            self.stats.inc(f"{self.stage}_checkpoint_unverified")
            return resume
        start = {tp: int(begin.get(tp, 0)) for tp in tps}
        if has_state:
            behind = {
                tp.topic: (stored.get(tp.topic), c)
                for tp, c in committed.items()
                if c is not None and c > (stored.get(tp.topic) or start[tp])
            }
            if behind:
                log.warning(
                    "%s/%d: STATE ROLLBACK — the Redis checkpoint is behind the offsets "
                    "committed to Kafka after later checkpoints (topic: (redis, kafka) %s): "
                    "Redis lost acknowledged commits (AOF tail, older RDB / DUMP). It is still "
                    "one consistent checkpoint: replaying from it, outputs re-emitted with the "
                    "same ids",
                    self.stage,
                    p,
                    behind,
                )
                self.stats.inc(f"{self.stage}_state_rollbacks")
                self.metrics.observe_state_recovery(self.stage, "rollback")
            return resume
        # no state: offsets committed (to Kafka, or left in Redis without their state) past
        # the log start mean that state existed and is gone
        lost: dict[TopicPartition, int] = {}
        for tp in tps:
            seen = [x for x in (committed.get(tp), stored.get(tp.topic)) if x is not None]
            if seen and max(seen) > start[tp]:
                lost[tp] = max(seen)
        if not lost:
            return {t: None for t in stored}  # a partition never checkpointed: start_from
        where = {tp.topic: {"log_start": start[tp], "committed": lost.get(tp)} for tp in tps}
        if all(start[tp] == 0 for tp in tps):
            log.error(
                "%s/%d: STATE LOST — no state in Redis but offsets were committed (%s); the "
                "log still holds everything since offset 0: replaying it with fresh state "
                "(exact, outputs re-emitted with the same ids)",
                self.stage,
                p,
                where,
            )
            self.stats.inc(f"{self.stage}_state_replays")
            self.metrics.observe_state_recovery(self.stage, "replay")
            return {t: (0 if TopicPartition(t, p) in start else None) for t in stored}
        for tp in tps:
            resume[tp.topic] = max(lost.get(tp, start[tp]), start[tp])
        log.critical(
            "%s/%d: STATE RESET — no state in Redis but offsets were committed, and the log no "
            "longer starts at offset 0 (%s): the state cannot be rebuilt; resuming from the "
            "committed offsets %s with FRESH state and publishing a state_reset alert",
            self.stage,
            p,
            where,
            {t: o for t, o in resume.items() if o is not None},
        )
        self.stats.inc(f"{self.stage}_state_resets")
        self.metrics.observe_state_recovery(self.stage, "reset")
        self._after_reset(p)
        await self.worker.publisher.publish(self._reset_alerts(p, generation, where, resume))
        return resume

    def _after_reset(self, p: int) -> None:
        """Hook: partition ``p`` restarts from fresh state (:meth:`_verify_checkpoint`)."""
        return None

    def _reset_models(self, p: int) -> list[str]:
        """Models whose alerts a reset of partition ``p`` concerns (all, for stage 1)."""
        return sorted(self.worker.config.models)

    def _reset_alerts(
        self,
        p: int,
        generation: int,
        where: Mapping[str, Mapping[str, int | None]],
        resume: Mapping[str, int | None],
    ) -> list[OutMessage]:
        """One ``state_reset`` alert per concerned model (alert.schema.json); the id is
        deterministic per loss (stage, partition, resume offsets), so a reset detected again
        after a crash re-publishes the same id."""
        now = time.time()
        sig = "-".join(f"{resume.get(t)}" for t in self.input_topics)
        skipped = {t: {**w, "resumed_at": resume.get(t)} for t, w in where.items()}
        n = sum(int(resume.get(t) or 0) for t in where)
        msgs = []
        for model in self._reset_models(p):
            alert_id = f"{model}:*:checkpoint:{self.stage}/{p}:reset@{sig}"
            alert = {
                "alert_id": alert_id,
                "model_id": model,
                "model_version": "*",
                "kind": "state_reset",
                "detector": "checkpoint",
                "feature": None,
                "slice": None,
                "severity": "critical",
                "statistic": float(n),
                "threshold": 0.0,
                "window": {"start": now, "end": now, "n": n},
                "reference_id": "",
                "config_hash": self.worker.config.config_hash,
                "detected_at": now,
                "message": (
                    f"{self.stage} partition {p}: state lost in Redis and the input log no "
                    f"longer starts at offset 0; restarted with fresh state from offsets "
                    f"{dict(resume)}: the events before them are missing from this model's "
                    "windows and detectors"
                    + (
                        "; alert sequence numbers restart (ids may repeat older alerts' ids)"
                        if self.stage == "detect"
                        else ""
                    )
                ),
                "runbook": (
                    "Find why Redis lost the keys (FLUSHALL, eviction: maxmemory-policy must be "
                    "noeviction, a new or restored instance). Detectors rebuild their windows "
                    "from new traffic; treat drift verdicts of the next window as provisional."
                ),
                "detail": {
                    "stage": self.stage,
                    "partition": p,
                    "generation": generation,
                    "offsets": skipped,
                },
            }
            msgs.append(
                OutMessage(
                    alert_id,
                    self.worker.topics.alerts,
                    model.encode(),
                    orjson.dumps(alert),
                )
            )
        self.stats.alerts.extend(orjson.loads(m.value) for m in msgs)
        return msgs

    async def _on_fenced(self, p: int, err: Fenced) -> None:
        """A commit or ack of partition ``p`` was refused. Another owner: stop here. The
        store lost the partition (no generation at all) while it is still assigned here:
        re-claim it, and the checkpoint check of the claim decides between a replay and a
        reset (:meth:`_verify_checkpoint`)."""
        assigned = self.consumer is not None and any(
            TopicPartition(t, p) in self.consumer.assignment() for t in self.input_topics
        )
        if not (err.state_lost and assigned):
            self._fence(p, err)
            return
        log.error(
            "%s/%d: STATE LOST WHILE RUNNING — %s (FLUSHDB, DEL, a replaced or restored-empty "
            "instance); re-claiming the partition",
            self.stage,
            p,
            err,
        )
        self.stats.inc(f"{self.stage}_state_lost_running")
        await self._reclaim(p)

    def _fence(self, p: int, err: Exception) -> None:
        log.error(
            "%s/%d: FENCED — another worker claimed this partition; stopping its "
            "processing here (%s)",
            self.stage,
            p,
            err,
        )
        self.stats.inc(f"{self.stage}_fenced")
        self._pause(p)

    def _claim_failed(self, p: int, err: Exception) -> None:
        """Partition ``p`` cannot be (re-)claimed: pause it, loudly, until a rebalance."""
        log.critical(
            "%s/%d: cannot take over the partition (%s: %s); it stays paused "
            "until the next rebalance — fix the cause and restart the worker",
            self.stage,
            p,
            type(err).__name__,
            err,
        )
        self.stats.inc(f"{self.stage}_claim_errors")
        self._pause(p)

    def _pause(self, p: int) -> None:
        """Stop processing partition ``p`` here until the next rebalance: drop its engine,
        fence it, pause its input partitions."""
        self._release_metrics(p)
        self._drop(p)
        self.fenced.add(p)
        if self.consumer is not None:
            tps = [TopicPartition(t, p) for t in self.input_topics]
            with contextlib.suppress(Exception):
                self.consumer.pause(*[tp for tp in tps if tp in self.consumer.assignment()])

    async def _recover(self, p: int, err: Exception) -> None:
        """A commit failed for another reason: reload the partition from Redis.

        Never raises: if the re-claim fails too, the partition is paused (its records are
        not fetched and silently skipped meanwhile) and the other partitions of the batch
        are still absorbed and published by the caller."""
        log.exception("%s/%d: commit failed (%s); re-claiming from Redis", self.stage, p, err)
        self.stats.inc(f"{self.stage}_recoveries")
        await self._reclaim(p)

    async def _reclaim(self, p: int) -> None:
        """Drop partition ``p``'s engine and claim it again from the store (after 1 s);
        never raises: a failed claim pauses the partition."""
        await asyncio.sleep(1.0)
        self._drop(p)
        try:
            await self._claim(p)
        except Exception as claim_err:
            self._claim_failed(p, claim_err)

    # ----------------------------------------------------------------- loop

    async def _run(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        size = self.settings.batch_size
        within = self.settings.batch_within_s
        while True:
            try:
                records = await self._take(consumer, size, within)
                async with self.lock:
                    if records:
                        with self.metrics.batch(self.stage, sum(map(len, records.values()))):
                            await self.process(records)
                    await self.on_idle()
                # outside the lock: a Kafka commit must never wait on a rebalance callback
                await self._maybe_commit_kafka()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad batch kill the worker
                log.exception("%s: batch failed; continuing", self.stage)
                self.stats.inc(f"{self.stage}_batch_errors")
                await asyncio.sleep(1.0)

    async def _take(
        self, consumer: AIOKafkaConsumer, size: int, within: float
    ) -> dict[TopicPartition, list[Any]]:
        """Up to ``size`` records gathered for at most ``within`` seconds (faust's take).

        Records, not events or bytes: closing batches at a byte limit (8 or 32 MiB, i.e.
        ~20k or ~80k events) was measured slower than gathering for the whole ``within``
        (``load_tests/results/batching.json``): every batch pays a fixed checkpoint and
        publish cost, so the larger batches of a full ``within`` cost less CPU per event."""
        first_wait = int(max(self.opts.idle_check_s, 0.01) * 1000)
        got: dict[TopicPartition, list[Any]] = await consumer.getmany(
            timeout_ms=first_wait, max_records=size
        )
        n = sum(len(v) for v in got.values())
        if not n:
            return got
        deadline = time.monotonic() + within
        settle = self.settle_s
        while n < size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            wait = left if settle is None else min(left, settle)
            more = await consumer.getmany(timeout_ms=int(wait * 1000), max_records=size - n)
            if settle is not None and not more:
                break  # caught up: nothing more within ``settle_s``
            for tp, recs in more.items():
                got.setdefault(tp, []).extend(recs)
                n += len(recs)
        return got

    def _fresh(self, tp: TopicPartition, recs: list[Any], expected: int) -> list[Any]:
        """Records at or after the partition's next offset, each offset once, in order.

        A rebalance or a seek can happen between two ``getmany`` calls of one batch (the
        first assignment seeks to the beginning while the fetcher may already have
        returned records from there), so a batch may hold an offset range twice.
        """
        kept: list[Any] = []
        nxt = expected
        for r in recs:
            if r.offset >= nxt:
                kept.append(r)
                nxt = r.offset + 1
        if len(kept) != len(recs):
            self.stats.inc(f"{self.stage}_stale_records_dropped", len(recs) - len(kept))
        return kept

    # ----------------------------------------------------------------- kafka offsets (info)

    async def _maybe_commit_kafka(self) -> None:
        now = time.monotonic()
        if now - self._last_kafka_commit < self.opts.kafka_commit_interval_s:
            return
        self._last_kafka_commit = now
        await self._commit_kafka_offsets()

    async def _commit_kafka_offsets(self) -> None:
        """Mirror the Redis checkpoints into Kafka for lag monitoring (never read back)."""
        if self.consumer is None or not self.opts.commit_kafka_offsets:
            return
        owned = self.consumer.assignment()
        offsets = {
            tp: off
            for tp, off in self._checkpointed.items()
            if tp in owned and self._kafka_committed.get(tp) != off
        }
        if not offsets:
            return
        try:
            # bounded: aiokafka retries a commit while the group coordinator is unavailable
            # or rebalancing, and the stage loop (or a shutdown) must not wait on that
            await asyncio.wait_for(self.consumer.commit(offsets), KAFKA_COMMIT_TIMEOUT_S)
            self._kafka_committed.update(offsets)
        except (KafkaError, TimeoutError) as err:  # informational: the next round retries
            log.debug("%s: kafka offset commit skipped (%r)", self.stage, err)

    # ----------------------------------------------------------------- metrics

    async def _checkpoint(self, p: int, **kw: Any) -> JoinResult:
        """One timed ``store.commit`` of partition ``p`` (errors counted by class)."""
        with self.metrics.checkpoint(self.stage):
            return await self.store.commit(self.stage, p, self.generation[p], **kw)

    def _release_metrics(self, p: int) -> None:
        """Partition ``p`` left this worker: drop its lag series (its new owner reports)."""
        for topic in self.input_topics:
            self.metrics.clear_consumer_lag(topic, p)

    def _claimed_metrics(self, p: int) -> None:
        """Hook after a successful claim of partition ``p``."""
        return None

    async def report(self) -> None:
        """Consumer lag (high watermark − Redis checkpoint) per owned partition, and the
        number of owned partitions."""
        consumer = self.consumer
        owned = self.owned()
        self.metrics.set_assigned_partitions(self.stage, len(owned))
        if consumer is None:
            return
        tps = [tp for tp in consumer.assignment() if tp.partition in owned]
        unknown = [tp for tp in tps if tp not in self._checkpointed and tp not in self._lag_base]
        if unknown and self.opts.start_from == "earliest":
            # never checkpointed: it starts at the beginning of the log
            try:
                begin = await asyncio.wait_for(consumer.beginning_offsets(unknown), 5.0)
            except (KafkaError, TimeoutError) as err:
                log.debug("%s: beginning offsets unavailable (%r)", self.stage, err)
            else:
                self._lag_base.update({tp: int(off) for tp, off in begin.items()})
        for tp in tps:
            hw = consumer.highwater(tp)
            done = self._checkpointed.get(tp, self._lag_base.get(tp))
            if hw is not None and done is not None:
                self.metrics.set_consumer_lag(tp.topic, tp.partition, hw - done)

    # ----------------------------------------------------------------- subclass API

    def owned(self) -> set[int]:
        """Partitions this stage currently processes (claimed, not fenced)."""
        raise NotImplementedError

    def _drop(self, p: int) -> None:
        raise NotImplementedError

    def _restore(self, p: int, state: bytes | None, inbox: JoinResult) -> dict[str, int]:
        raise NotImplementedError

    async def process(self, records: Mapping[TopicPartition, list[Any]]) -> None:
        raise NotImplementedError

    async def on_idle(self) -> None:
        return None


class IngestRunner(StageRunner):
    """Stage 1: predictions + labels (co-partitioned) → tick summaries, dead letters."""

    stage = "ingest"

    def __init__(self, worker: Worker) -> None:
        t = worker.topics
        super().__init__(worker, [t.predictions, t.labels], f"{worker.opts.group_prefix}-ingest")
        self.engines: dict[int, Ingest] = {}
        self._base: dict[int, tuple[float, float]] = {}  # p -> (watermark, monotonic)
        self._last_idle = 0.0
        self._chunk_bytes: dict[int, int] = {}  # p -> input bytes per commit (learnt)
        self._first_chunk = (
            FIRST_CHUNK_SCALE_BYTES
            * self.settings.max_summaries_per_commit
            // max(1, len(worker.plans))
        )

    def _new_engine(self, p: int) -> Ingest:
        w = self.worker
        return Ingest(
            w.config,
            w.plans,
            p,
            topics=w.topics,
            tick_s=self.settings.tick_s,
            lateness_s=self.settings.allowed_lateness_s,
            max_future_s=self.opts.max_future_s,
            max_message_bytes=self.opts.max_message_bytes,
        )

    def owned(self) -> set[int]:
        return set(self.engines)

    def _drop(self, p: int) -> None:
        self.engines.pop(p, None)
        self.generation.pop(p, None)
        self._base.pop(p, None)

    def _restore(self, p: int, state: bytes | None, inbox: JoinResult) -> dict[str, int]:
        eng = self._new_engine(p)
        eng.restore(state, inbox)
        self.engines[p] = eng
        if eng.watermark != float("-inf"):
            self._base[p] = (eng.watermark, time.monotonic())
        return dict(eng.next_offset)

    def _after_reset(self, p: int) -> None:
        """Fresh state after a reset: summary sequence numbers restart above any the lost
        state can have used (wall-clock milliseconds), or stage 2 would drop the new
        summaries as already applied (it keeps the highest seq per source partition)."""
        eng = self.engines.get(p)
        if eng is not None:
            eng.seq = max(eng.seq, int(time.time() * 1000))

    async def process(self, records: Mapping[TopicPartition, list[Any]]) -> None:
        by_p: dict[int, list[list[tuple[int, RawMessage]]]] = {}
        for tp, recs in records.items():
            eng = self.engines.get(tp.partition)
            if eng is None:
                continue  # revoked or fenced meanwhile
            fresh = self._fresh(tp, recs, eng.next_offset.get(tp.topic, 0))
            if fresh:
                by_p.setdefault(tp.partition, []).append(
                    [
                        (r.timestamp, RawMessage(tp.topic, tp.partition, r.offset, r.value or b""))
                        for r in fresh
                    ]
                )
        if not by_p:
            return
        now = self.worker.clock()
        todo = {p: (self.engines[p], _arrival_order(lists)) for p, lists in by_p.items()}
        while todo:  # one commit per round; more rounds only when ticks pile up (see below)
            outs = {}
            for p, (eng, msgs) in list(todo.items()):
                if self.engines.get(p) is not eng:
                    # fenced or re-claimed by the last round: the rest is fetched again
                    # from the restored checkpoint (or belongs to another worker now)
                    del todo[p]
                    continue
                chunk, n_bytes, rest = _split_bytes(
                    msgs, self._chunk_bytes.get(p, self._first_chunk)
                )
                outs[p] = out = eng.process_raw(chunk, now)
                self._learn_output_rate(p, n_bytes)
                if rest:
                    todo[p] = (eng, rest)
                else:
                    del todo[p]
                self.stats.inc("events_accepted", out.accepted)
                self.stats.inc("events_rejected", sum(out.rejected.values()))
                self.stats.inc("messages_in", len(chunk))
            if outs:
                await self._commit_publish(outs)
            for p in outs:
                eng = self.engines.get(p)
                if eng is not None and eng.watermark != float("-inf"):
                    self._base[p] = (eng.watermark, time.monotonic())

    def _learn_output_rate(self, p: int, n_bytes: int) -> None:
        """Size partition ``p``'s next commit so that it closes about
        ``max_summaries_per_commit`` ticks.

        A backlog batch spans many seconds of event time: with 1,000 models it closed ~15k
        ticks into one commit (60 MB of summaries, an 80 MB snapshot of the held ticks) and
        the worker peaked above 3 GB. The ticks this chunk closed per input byte set how
        many bytes (``n_bytes`` went into this one) the next commit takes; with few models
        (or live traffic)
        the limit is far above a batch and every batch stays one commit (and the first chunk,
        sized from the number of models, too)."""
        limit = self.settings.max_summaries_per_commit
        closed = len(self.engines[p].pending)  # emitted by the next commit
        if closed and n_bytes:
            self._chunk_bytes[p] = max(MIN_CHUNK_BYTES, int(n_bytes * limit / closed))
        elif n_bytes >= self._chunk_bytes.get(p, self._first_chunk):
            # no tick closed in a full chunk: grow back
            self._chunk_bytes[p] = min(2 * self._chunk_bytes.get(p, self._first_chunk), 1 << 30)

    async def _commit_publish(self, outs: Mapping[int, IngestOutput]) -> None:
        parts = list(outs)
        results = await asyncio.gather(
            *[
                self._checkpoint(
                    p,
                    state=self.engines[p].snapshot(),
                    next_offset=outs[p].next_offset,
                    outbox=outs[p].messages,
                    join_ops=outs[p].join_ops,
                )
                for p in parts
            ],
            return_exceptions=True,
        )
        published: list[tuple[int, list[OutMessage]]] = []
        for p, res in zip(parts, results, strict=True):
            if isinstance(res, Fenced):
                await self._on_fenced(p, res)
                continue
            if isinstance(res, BaseException):
                await self._recover(p, res)  # type: ignore[arg-type]
                continue
            self.engines[p].absorb(res)
            # observed after the commit: a batch re-processed after a failure counts once
            self.metrics.observe_ingest(outs[p])
            self.metrics.observe_join(res)
            self.stats.inc("commits")
            self.stats.inc("pairs_joined", len(res.pairs))
            for topic, off in outs[p].next_offset.items():
                self._checkpointed[TopicPartition(topic, p)] = off
            if outs[p].messages:
                published.append((p, outs[p].messages))
        all_msgs = [m for _, msgs in published for m in msgs]
        await self.worker.publisher.publish(all_msgs)
        for m in all_msgs:
            self.stats.inc(f"published:{m.topic}")
        await asyncio.gather(*[self._ack(p, msgs) for p, msgs in published])

    async def _ack(self, p: int, msgs: Sequence[OutMessage]) -> None:
        gen = self.generation.get(p)
        if gen is None:
            return
        try:
            await self.store.ack_outbox(self.stage, p, gen, [m.id for m in msgs])
        except Fenced as err:
            await self._on_fenced(p, err)

    async def _caught_up(self, p: int) -> bool:
        """Whether the consumer returned every record of partition ``p`` the log holds (its
        position is at the last fetch's high watermark, for each input topic).

        Idle flushes close ticks by wall time, so they only run on caught-up partitions:
        while a backlog is read (a restarted worker, a replay, a lagging one), ticks close
        on event time alone and the summaries equal an uninterrupted run's."""
        consumer = self.consumer
        if consumer is None:
            return False
        for topic in self.input_topics:
            tp = TopicPartition(topic, p)
            if tp not in consumer.assignment():
                continue
            hw = consumer.highwater(tp)
            if hw is None:
                return False  # not fetched since the claim
            try:
                pos = await asyncio.wait_for(consumer.position(tp), 1.0)
            except (KafkaError, TimeoutError):
                return False
            if pos < hw:
                return False
        return True

    async def on_idle(self) -> None:
        """Idle flush: advance an idle, caught-up partition's event time by the wall time
        elapsed (see :meth:`_caught_up`)."""
        now_m = time.monotonic()
        if now_m - self._last_idle < self.opts.idle_check_s:
            return
        self._last_idle = now_m
        tick = self.settings.tick_s
        outs = {}
        for p, eng in self.engines.items():
            base = self._base.get(p)
            if base is None or now_m - base[1] < tick:
                continue
            if not await self._caught_up(p):
                continue  # a backlog is being read: ticks close on event time only
            target = base[0] + (now_m - base[1])
            out = eng.flush(target)
            if out.messages:
                outs[p] = out
        if outs:
            self.stats.inc("idle_flushes", len(outs))
            await self._commit_publish(outs)


MIN_CHUNK_BYTES: Final = 64 << 10
"""The least input one stage-1 commit takes when the ticks it closes are limited."""
FIRST_CHUNK_SCALE_BYTES: Final = 512 << 10
"""A partition's first commit, before its rate of closed ticks is known, takes this many
bytes x ``max_summaries_per_commit`` / configured models of input: 1 MiB at 1,000 models
and the default 2,000 (a backlog of ~2,500 events), 256 MiB at 4 models (a batch is never
split for a small fleet, whose commits cannot pile up ticks)."""


def _split_bytes(
    msgs: list[RawMessage], max_bytes: int
) -> tuple[list[RawMessage], int, list[RawMessage]]:
    """The longest head of ``msgs`` within ``max_bytes`` of values (at least one message),
    its size in bytes, and the rest.

    >>> ms = [RawMessage("t", 0, i, b"x" * 10) for i in range(5)]
    >>> [(len(h), n, len(r)) for h, n, r in (_split_bytes(ms, 25), _split_bytes(ms, 5))]
    [(2, 20, 3), (1, 10, 4)]
    >>> head, n, rest = _split_bytes(ms, 1000)
    >>> len(head), n, len(rest)
    (5, 50, 0)
    """
    total = 0
    for i, m in enumerate(msgs):
        size = len(m.value)
        if total + size > max_bytes and i:
            return msgs[:i], total, msgs[i:]
        total += size
    return msgs, total, []


def _arrival_order(lists: Sequence[list[tuple[int, RawMessage]]]) -> list[RawMessage]:
    """Merge the two topics' records of one partition by their Kafka timestamps.

    Each topic keeps its own offset order (``heapq.merge`` never reorders an input), and
    records of the two topics interleave by producer timestamp, i.e. arrival order.
    """
    if len(lists) == 1:
        return [m for _, m in lists[0]]
    return [m for _, m in heapq.merge(*lists, key=lambda x: x[0])]


class DetectRunner(StageRunner):
    """Stage 2: summaries → detectors → alerts and kill-switch commands."""

    stage = "detect"
    # Summaries arrive in one burst per closed tick: waiting out ``batch_within_s`` after
    # the burst only delays the alerts (p50 summary -> alert 0.49 s with the full wait).
    settle_s = 0.02

    def __init__(self, worker: Worker) -> None:
        t = worker.topics
        super().__init__(worker, [t.summaries], f"{worker.opts.group_prefix}-detect")
        self.engines: dict[int, Detect] = {}
        # manual requests: ids applied per partition (bounded, persisted with the state)
        self.manual_ids: dict[int, dict[str, None]] = {}
        self._request_outcomes: list[tuple[str, str]] = []  # counted after the commit

    def owned(self) -> set[int]:
        return set(self.engines)

    def _drop(self, p: int) -> None:
        self.engines.pop(p, None)
        self.generation.pop(p, None)

    def _restore(self, p: int, state: bytes | None, inbox: JoinResult) -> dict[str, int]:
        w = self.worker
        det = Detect(w.config, w.plans, p, topics=w.topics, tick_s=self.settings.tick_s)
        det.restore(state)
        self.engines[p] = det
        self.manual_ids[p] = _manual_ids_of(state)
        return dict(det.next_offset)

    def _reset_models(self, p: int) -> list[str]:
        """The configured models whose summaries (key = model id) land in partition ``p``."""
        parts = None
        if self.consumer is not None:
            parts = self.consumer.partitions_for_topic(self.input_topics[0])
        models = sorted(self.worker.config.models)
        if not parts:
            return models
        return [m for m in models if murmur2_partition(m.encode(), len(parts)) == p]

    async def process(self, records: Mapping[TopicPartition, list[Any]]) -> None:
        topic = self.worker.topics.summaries
        for tp, recs in records.items():
            det = self.engines.get(tp.partition)
            if det is None:
                continue
            fresh = self._fresh(tp, recs, det.next_offset.get(topic, 0))
            if not fresh:
                continue
            out = self._apply(det, fresh)
            await self._commit_publish(tp.partition, det, out)

    def _apply(self, det: Detect, recs: Sequence[Any]) -> DetectOutput:
        """Summaries through the engine; manual requests in order between them."""
        topic = self.worker.topics.summaries
        total = DetectOutput()
        segment: list[tuple[int, bytes]] = []
        self._request_outcomes.clear()  # of a batch whose commit failed
        # The worker's only use of findings is the drift gauges, where the latest finding
        # per (model, version, detector, subject) wins: keep just that, chunk by chunk, so
        # a batch of thousands of summaries does not hold every evaluation (~60 findings
        # per summary) until its commit.
        latest: dict[str, tuple[str, Any]] = {}

        def run_segment() -> None:
            for i in range(0, len(segment), SUMMARY_CHUNK):
                out = det.process_raw(segment[i : i + SUMMARY_CHUNK])
                for model_id, f in out.findings:
                    latest[f.key(model_id)] = (model_id, f)
                out.findings.clear()
                _merge(total, out)
            self.stats.inc("summaries_in", len(segment))
            segment.clear()

        for r in recs:
            value: bytes = r.value or b""
            if value.startswith(MANUAL_PREFIX):
                run_segment()
                det.next_offset[topic] = max(det.next_offset.get(topic, 0), r.offset + 1)
                seen = self.manual_ids.setdefault(det.partition, {})
                rid: Any = None
                try:
                    req = orjson.loads(value)
                    rid = req.get("request_id")
                    if isinstance(rid, str) and rid in seen:
                        log.info(
                            "detect: manual request %s at offset %d already applied; dropped",
                            rid,
                            r.offset,
                        )
                        self.stats.inc("manual_duplicates")
                        self._request_outcomes.append((str(req.get("model_id")), "duplicate"))
                        continue
                    out = det.manual(
                        str(req["model_id"]),
                        str(req["action"]),
                        float(req["issued_at"]),
                        target_version=req.get("target_version"),
                        reason=str(req.get("reason", "")),
                    )
                except (ValueError, KeyError, TypeError, AttributeError) as err:
                    log.error("detect: bad manual request at offset %d: %s", r.offset, err)
                    self.stats.inc("manual_rejected")
                    self._request_outcomes.append(("", "invalid"))
                    continue
                if isinstance(rid, str):
                    seen[rid] = None
                    while len(seen) > MANUAL_IDS_KEPT:
                        del seen[next(iter(seen))]
                self.stats.inc("manual_applied")
                self._request_outcomes.append((str(req["model_id"]), "applied"))
                _merge(total, out)
            else:
                segment.append((r.offset, value))
        run_segment()
        total.findings.extend(latest.values())
        total.next_offset = dict(det.next_offset)
        return total

    def _release_metrics(self, p: int) -> None:
        super()._release_metrics(p)
        det = self.engines.get(p)
        if det is not None:  # only the owner of a model reports its kill switch
            for model_id in det.models:
                self.metrics.observe_killswitch_active(model_id, False, None)

    def _claimed_metrics(self, p: int) -> None:
        det = self.engines.get(p)
        if det is not None:  # restored kill-switch states and CUSUM statistics
            self.metrics.observe_detector_state(det)

    async def _commit_publish(self, p: int, det: Detect, out: DetectOutput) -> None:
        try:
            await self._checkpoint(
                p,
                state=_with_manual_ids(det.snapshot(), self.manual_ids.get(p)),
                next_offset=out.next_offset,
                outbox=out.messages,
                killswitch=out.killswitch,
            )
        except Fenced as err:
            await self._on_fenced(p, err)
            return
        except Exception as err:
            await self._recover(p, err)
            return
        self.stats.inc("commits")
        self.metrics.observe_detect(out)
        for model_id, outcome in self._request_outcomes:
            self.metrics.observe_killswitch_request(model_id, outcome)
        self._request_outcomes.clear()
        self.metrics.observe_detector_state(det, out.models)
        for topic, off in out.next_offset.items():
            self._checkpointed[TopicPartition(topic, p)] = off
        self.stats.alerts.extend(out.alerts)
        self.stats.commands.extend(out.commands)
        self.stats.inc("alerts", len(out.alerts))
        self.stats.inc("commands", len(out.commands))
        for a in out.alerts:
            log.warning(
                "ALERT %s %s %s %s %s feature=%s slice=%s stat=%.4g",
                a["severity"],
                a["kind"],
                a["model_id"],
                a["model_version"],
                a["detector"],
                a.get("feature"),
                a.get("slice"),
                a["statistic"],
            )
        for c in out.commands:
            log.warning(
                "KILL-SWITCH %s %s target=%s mode=%s",
                c["action"],
                c["model_id"],
                c.get("target_version"),
                c["mode"],
            )
        if out.messages:
            await self.worker.publisher.publish(out.messages)
            try:
                await self.store.ack_outbox(
                    "detect", p, self.generation[p], [m.id for m in out.messages]
                )
            except Fenced as err:
                await self._on_fenced(p, err)


MANUAL_IDS_KEPT: Final = 1024
"""Manual request ids remembered per stage-2 partition (a replay older than that many later
requests would be applied again; requests are rare operator actions)."""

_MANUAL_IDS_KEY: Final = b',"manual_request_ids":'


def _with_manual_ids(snapshot: bytes, ids: Mapping[str, None] | None) -> bytes:
    """The stage-2 snapshot (a JSON object) with the applied manual request ids added as
    ``manual_request_ids`` (spliced in: the snapshot is not parsed again). Detect.restore
    ignores the key; :func:`_manual_ids_of` reads it back."""
    if not ids or not snapshot.endswith(b"}"):
        return snapshot
    return snapshot[:-1] + _MANUAL_IDS_KEY + orjson.dumps(list(ids)) + b"}"


def _manual_ids_of(state: bytes | None) -> dict[str, None]:
    """The applied manual request ids stored by :func:`_with_manual_ids` (oldest first)."""
    if not state or _MANUAL_IDS_KEY not in state:
        return {}
    ids = orjson.loads(state).get("manual_request_ids") or []
    return dict.fromkeys(str(i) for i in ids)


KAFKA_COMMIT_TIMEOUT_S = 5.0  # the informational Kafka offset mirror
CONSUMER_STOP_TIMEOUT_S = 15.0
STAGE_STOP_TIMEOUT_S = 30.0
PRODUCER_STOP_TIMEOUT_S = 20.0
# stages stop together: 30 + 5 (Kafka offset mirror) + 15 s, then the producer: 70 s at
# most, inside k8s/base/statefulset.yaml's terminationGracePeriodSeconds (90)
SUMMARY_CHUNK = 256  # summaries per Detect.process_raw call inside one stage-2 batch


def _merge(total: DetectOutput, out: DetectOutput) -> None:
    total.messages.extend(out.messages)
    total.alerts.extend(out.alerts)
    total.commands.extend(out.commands)
    total.findings.extend(out.findings)
    total.killswitch.update(out.killswitch)
    total.applied += out.applied
    total.duplicates += out.duplicates
    total.invalid += out.invalid
    total.models |= out.models


# --------------------------------------------------------------------------- worker


class Worker:
    """Both stages, the producer, the Redis store and the HTTP endpoints of one process."""

    def __init__(
        self,
        config: MonitorConfig,
        settings: ServiceSettings,
        opts: WorkerOptions | None = None,
        *,
        profiles: Mapping[str, Profile | None] | None = None,
        store: StateStore | None = None,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
        serve_web: bool = True,
    ) -> None:
        """``registry``: where the ``driftline_*`` metrics are registered and served from
        on ``/metrics`` (default: a new registry with the process and GC collectors).
        ``serve_web``: serve ``/healthz``, ``/readyz``, ``/metrics`` on ``web_bind`` from
        here (False when a faust App serves them, see :mod:`stream.app`)."""
        self.serve_web = serve_web
        self.config = config
        self.settings = settings
        self.opts = opts or WorkerOptions()
        self.topics: Topics = settings.topics
        if profiles is None:
            profiles = {m: profile_for(cfg) for m, cfg in config.models.items()}
        self.plans: dict[str, ModelPlan] = compile_plans(config, profiles)
        self._own_store = store is None
        self.store: StateStore = store or RedisStore(
            settings.redis_url, prefix=self.opts.redis_prefix
        )
        self.clock = clock
        self.owner = (
            f"{self.opts.instance_id or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        )
        self.stats = WorkerStats()
        if registry is None:
            from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self.metrics = Metrics(config, registry, plans=self.plans, topics=self.topics)
        self._reporter: asyncio.Task[None] | None = None
        self.heap = HeapTrimmer(settings.heap_trim_s)
        self.producer: AIOKafkaProducer | None = None
        self.publisher: Publisher
        self.stages: list[StageRunner] = []
        self._web: Any = None
        self.started = False

    async def start(self) -> None:
        """Start the producer, both stage consumers and the HTTP endpoints."""
        tune_gc()  # stage 1's hot path: 30-40 % of its time is cyclic GC otherwise
        await self._check_topics()
        if isinstance(self.store, RedisStore):
            await self.store.ping()  # waits (with backoff) while Redis is down

        t = self.topics
        limits = await topic_message_limits(
            self.settings, [t.summaries, t.alerts, t.control, t.deadletter]
        )
        # a batch never larger than the smallest output limit: only an oversized message
        # (dead-lettered before sending) could be refused, never its batch mates
        batch_bytes = min([16384, *limits.values()])

        def new_producer() -> AIOKafkaProducer:
            return AIOKafkaProducer(
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                max_batch_size=batch_bytes,
                max_request_size=max(1 << 20, 4 * self.opts.max_message_bytes),
                client_id=f"{self.owner}-producer",
                **kafka_client_kwargs(self.settings),
            )

        def replaced(producer: AIOKafkaProducer) -> None:
            self.producer = producer

        self.producer = new_producer()
        await self.producer.start()
        self.publisher = Publisher(
            self.producer,
            metrics=self.metrics,
            factory=new_producer,
            on_producer=replaced,
            deadletter_topic=self.topics.deadletter,
            limits=limits,
        )
        if "ingest" in self.opts.stages:
            self.stages.append(IngestRunner(self))
        if "detect" in self.opts.stages:
            self.stages.append(DetectRunner(self))
        for s in self.stages:
            await s.start()
        if self.settings.web_bind and self.serve_web:
            await self._start_web()
        self.started = True
        self.metrics.set_up(True)
        self.metrics.set_ready(self.ready)
        self._reporter = asyncio.create_task(self._report_loop(), name="driftline-metrics")
        log.info(
            "driftline worker %s started: stages %s, settings %s",
            self.owner,
            [s.stage for s in self.stages],
            self.settings.redacted(),
        )

    async def stop(self) -> None:
        """Stop consuming (the last batch finishes), then the producer and the store."""
        self.metrics.set_up(False)
        self.metrics.set_ready(False)
        if self._reporter is not None:
            self._reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reporter
            self._reporter = None
        await asyncio.gather(*(s.stop() for s in self.stages))  # each bounded, see below
        if self.producer is not None:
            try:  # its unacknowledged sends are still in the Redis outboxes
                await asyncio.wait_for(self.producer.stop(), PRODUCER_STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning(
                    "producer did not stop within %.0f s; abandoned (what it had not "
                    "delivered is republished from the outbox by the next owner)",
                    PRODUCER_STOP_TIMEOUT_S,
                )
        if self._web is not None:
            await self._web.cleanup()
        if self._own_store and isinstance(self.store, RedisStore):
            await self.store.close()
        self.started = False

    async def wait_assigned(self) -> None:
        """Wait until every stage got its first assignment (tests, readiness)."""
        for s in self.stages:
            await s.assigned_once.wait()

    @property
    def ready(self) -> bool:
        """Started, every stage assigned at least once, and the store answering (a Redis
        outage or write refusal makes the worker not-ready, never dead: it retries)."""
        return (
            self.started
            and all(s.assigned_once.is_set() for s in self.stages)
            and getattr(self.store, "failing_since", None) is None
        )

    async def report(self) -> None:
        """Set the periodic gauges: consumer lag, owned partitions, readiness, store
        counters (called every ``metrics_interval_s``; tests may call it directly)."""
        self.metrics.set_ready(self.ready)
        self.metrics.observe_store_counters(
            int(getattr(self.store, "round_trips", 0)), int(getattr(self.store, "retries", 0))
        )
        for s in self.stages:
            await s.report()

    async def _report_loop(self) -> None:
        while True:
            try:
                await self.report()
            except asyncio.CancelledError:
                raise
            except Exception:  # metrics must never stop the worker
                log.exception("metrics report failed; continuing")
            self.heap.maybe_trim()  # releases free pages only: safe whatever the stages hold
            await asyncio.sleep(self.opts.metrics_interval_s)

    async def _check_topics(self) -> None:
        await check_topics(self.settings)

    def api_app(self, prefix: str = "/api/v1") -> Any:
        """The kill-switch HTTP API (:mod:`stream.api`) over this worker's producer and store,
        as an aiohttp application with routes under ``prefix``. Mutations answer 403 unless
        an API token is configured. Served on ``web_bind`` by :meth:`_start_web` or, under
        ``driftline worker``, by the faust App (:mod:`stream.app`)."""
        from stream.api import kafka_send_request, make_api, store_get_state

        async def send(
            model: str, action: str, target_version: str | None, reason: str, operator: str
        ) -> str:
            if self.producer is None:
                raise RuntimeError("the worker has not started its producer yet")
            request = kafka_send_request(self.producer, self.topics.summaries)
            sent = request(model, action, target_version, reason, operator)
            return sent if isinstance(sent, str) else await sent

        return make_api(
            self.settings,
            send_request=send,
            get_state=store_get_state(self.store),
            models=self.config.models,
            prefix=prefix,
        )

    async def _start_web(self) -> None:
        from aiohttp import web

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(
                text="ok\n" if self.started else "stopped\n", status=200 if self.started else 503
            )

        async def readyz(_: web.Request) -> web.Response:
            return web.Response(
                text="ready\n" if self.ready else "not ready\n", status=200 if self.ready else 503
            )

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        app = self.api_app()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = self.settings.web_bind.rpartition(":")
        site = web.TCPSite(runner, host or "127.0.0.1", int(port))
        await site.start()
        self._web = runner
        self.web_port = runner.addresses[0][1] if runner.addresses else int(port)


async def check_topics(settings: ServiceSettings) -> None:
    """Every topic exists (never creating one); predictions and labels have equal partition
    counts. Raises :class:`ValueError` naming the missing or mismatched topics."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
    await admin.start()
    try:
        t = settings.topics
        names = [t.predictions, t.labels, t.summaries, t.alerts, t.control, t.deadletter]
        # list first: naming a missing topic in a metadata request (describe_topics)
        # makes a broker with auto.create.topics.enable=true create it, 1 partition
        existing = set(await admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if missing:
            raise ValueError(
                f"topics do not exist: {', '.join(repr(n) for n in missing)} (create them "
                "first, e.g. with k8s/components/topics/create_topics.py; the worker never "
                "creates topics)"
            )
        described = {d["topic"]: d for d in await admin.describe_topics(names)}
        counts = {}
        for name in names:
            d = described.get(name)
            if d is None or d.get("error_code") or not d.get("partitions"):
                raise ValueError(
                    f"topic {name!r} cannot be described (error code "
                    f"{None if d is None else d.get('error_code')}); check its ACLs"
                )
            counts[name] = len(d["partitions"])
        if counts[t.predictions] != counts[t.labels]:
            raise ValueError(
                f"topics: {t.predictions!r} has {counts[t.predictions]} partitions and "
                f"{t.labels!r} has {counts[t.labels]}; they must be equal (labels join "
                "predictions by request_id in the same partition)"
            )
    finally:
        await admin.close()


# --------------------------------------------------------------------------- manual ops


def manual_request(
    model_id: str,
    action: str,
    *,
    reason: str = "",
    target_version: str | None = None,
    issued_at: float | None = None,
) -> bytes:
    """A manual kill-switch request as stage 2 reads it from the summaries topic."""
    valid = ("rollback", "fallback", "throttle", "release")
    if action not in valid:
        raise ValueError(f"action: {action!r} is not valid; valid values: {', '.join(valid)}")
    body = orjson.dumps(
        {
            "request_id": uuid.uuid4().hex,
            "model_id": model_id,
            "action": action,
            "target_version": target_version,
            "reason": reason,
            "issued_at": time.time() if issued_at is None else issued_at,
        }
    )
    return MANUAL_PREFIX + body[1:]


def send_manual_request(settings: ServiceSettings, model_id: str, action: str, **kw: Any) -> None:
    """Publish a manual request (key = model id → the stage-2 partition owning the model)."""
    from confluent_kafka import Producer

    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "acks": "all",
        "security.protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism:
        conf.update(
            {
                "sasl.mechanism": settings.sasl_mechanism,
                "sasl.username": settings.sasl_username or "",
                "sasl.password": settings.sasl_password or "",
            }
        )
    if settings.ssl_cafile:
        conf["ssl.ca.location"] = settings.ssl_cafile
    if settings.ssl_certfile:
        conf["ssl.certificate.location"] = settings.ssl_certfile
    if settings.ssl_keyfile:
        conf["ssl.key.location"] = settings.ssl_keyfile
    producer = Producer(conf)
    errors: list[str] = []
    producer.produce(
        settings.topics.summaries,
        key=model_id.encode(),
        value=manual_request(model_id, action, **kw),
        on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
    )
    if producer.flush(30) != 0 or errors:
        raise RuntimeError(f"manual request for {model_id!r} not delivered: {errors or 'timeout'}")


# --------------------------------------------------------------------------- CLI


def add_worker_commands(subparsers: Any) -> None:
    """Register ``driftline worker`` and ``driftline killswitch`` on the CLI's subparsers.

    Each parser sets ``func``; the CLI's ``main`` calls ``args.func(args)`` for them.
    """
    w = subparsers.add_parser("worker", help="run the Kafka + Redis worker (both stages)")
    w.add_argument("--config", default=None, help="monitors.yaml (default $DRIFTLINE_CONFIG)")
    w.add_argument("--stages", default="ingest,detect", help="ingest,detect (default both)")
    w.add_argument("--log-level", default="INFO")
    w.set_defaults(func=_cmd_worker)
    ks = subparsers.add_parser("killswitch", help="show or operate a model's kill switch")
    ks.add_argument("op", choices=("status", "release", "rollback", "fallback", "throttle"))
    ks.add_argument("--model", required=True, help="model id")
    ks.add_argument("--target-version", default=None)
    ks.add_argument("--reason", default="")
    ks.add_argument(
        "--wait",
        type=float,
        default=30.0,
        help="seconds to wait for the worker to apply it (0 = do not wait)",
    )
    ks.add_argument("--api", default=None, help="worker URL: use the HTTP API, not Kafka")
    ks.add_argument("--token-file", default=None, help="file holding the API token")
    ks.set_defaults(func=_cmd_killswitch)


def _cmd_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = ServiceSettings.from_env()
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in ("ingest", "detect")]
    if bad or not stages:
        print(
            f"driftline worker: error: --stages: {bad or stages!r} is not valid; "
            "valid values: ingest, detect",
            file=sys.stderr,
        )
        return 2
    config = load_config(args.config or settings.config_path)
    opts = WorkerOptions.from_env()
    opts = WorkerOptions(**{**opts.__dict__, "stages": stages})
    try:  # fail fast, with the topics named, before faust starts anything
        asyncio.run(check_topics(settings))
    except ValueError as err:
        print(f"driftline worker: error: {err}", file=sys.stderr)
        return 2
    return run_app(config, settings, opts, loglevel=args.log_level)


def run_app(
    config: MonitorConfig, settings: ServiceSettings, opts: WorkerOptions, *, loglevel: str
) -> int:
    """Run the worker inside the faust-streaming App (:mod:`stream.app`) until SIGTERM /
    SIGINT; exit code 0 on a clean stop."""
    import faust

    from stream.app import build_app

    app = build_app(config, settings, opts)
    fw = faust.Worker(app, loglevel=loglevel.upper(), quiet=True)
    try:
        fw.execute_from_commandline()
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else 1
    return 0


async def run_worker(config: MonitorConfig, settings: ServiceSettings, opts: WorkerOptions) -> int:
    """Run without faust (plain asyncio) until SIGTERM / SIGINT; exit code 0 on a clean
    stop. ``driftline worker`` uses :func:`run_app` (faust-streaming) instead."""
    worker = Worker(config, settings, opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await worker.start()
    try:
        await stop.wait()
    finally:
        await worker.stop()
    return 0


def _cmd_killswitch(args: argparse.Namespace) -> int:
    if args.api:
        from stream.api import killswitch_cli

        return killswitch_cli(
            args.op,
            args.model,
            api=args.api,
            token_file=args.token_file,
            reason=args.reason,
            target_version=args.target_version,
            wait_s=args.wait,
        )
    settings = ServiceSettings.from_env()
    opts = WorkerOptions.from_env()

    async def state() -> dict[str, Any] | None:
        store = RedisStore(settings.redis_url, prefix=opts.redis_prefix, retry_for_s=10.0)
        try:
            raw = await store.get_killswitch(args.model)
        finally:
            await store.close()
        return None if raw is None else dict(orjson.loads(raw))

    before = asyncio.run(state())
    if args.op == "status":
        print(
            orjson.dumps(before, option=orjson.OPT_INDENT_2).decode()
            if before
            else f"{args.model}: no kill-switch state (never tripped)"
        )
        return 0
    send_manual_request(
        settings, args.model, args.op, reason=args.reason, target_version=args.target_version
    )
    print(f"{args.model}: {args.op} requested")
    if args.wait <= 0:
        return 0
    key = "releases" if args.op == "release" else "trips"
    seen = (before or {}).get(key, 0)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        now = asyncio.run(state())
        if now is not None and now.get(key, 0) > seen:
            print(orjson.dumps(now, option=orjson.OPT_INDENT_2).decode())
            return 0
        time.sleep(0.5)
    print(
        f"{args.model}: not applied within {args.wait:.0f} s (is a worker running?)",
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stream.worker worker|killswitch ...`` (the same commands as the CLI's)."""
    parser = argparse.ArgumentParser(prog="driftline")
    add_worker_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
