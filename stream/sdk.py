"""The producer SDK serving stacks call: log predictions and labels, watch the kill switch.

Depends only on ``confluent-kafka`` and ``orjson``.

:class:`DriftlineProducer` never blocks the request path: ``log_prediction`` /
``log_label`` build a dict and put it on a bounded in-memory queue (a full queue drops the
event and counts it in :attr:`DriftlineProducer.dropped`). A background thread packs
events into Kafka messages of several events each (a JSON array — driftline's decoder
accepts both forms), because a Kafka message, not an event, is the unit the consumer pays
for. Events are grouped by their *partition*: Kafka's default (Java, murmur2) partitioner
applied to ``request_id``, so a prediction and its label meet in the same stage-1
partition exactly as if every event were its own message keyed by ``request_id``.

>>> murmur2_partition(b"req-1", 12) == murmur2_partition(b"req-1", 12)
True
>>> batch_value([{"a": 1}, {"b": 2.5}])
b'[{"a":1},{"b":2.5}]'

NaN and infinities are sent as ``null`` (orjson has no NaN literal), i.e. as missing values.

:class:`KillSwitchWatcher` reads the compacted ``driftline.control`` topic in a background
thread and answers :meth:`KillSwitchWatcher.state` for a model from memory.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as CKTopicPartition

from stream.partitioner import murmur2_partition

log = logging.getLogger("driftline.sdk")

PREDICTIONS: Final = "driftline.predictions"
LABELS: Final = "driftline.labels"
CONTROL: Final = "driftline.control"


def batch_value(events: list[bytes] | list[dict[str, Any]]) -> bytes:
    """One Kafka message value carrying several events (a JSON array)."""
    parts = [e if isinstance(e, bytes) else orjson.dumps(e) for e in events]
    return b"[" + b",".join(parts) + b"]"


def _conf(bootstrap: str, conf: Mapping[str, Any] | None, kw: Mapping[str, Any]) -> dict[str, Any]:
    """librdkafka settings: ``conf`` as given, keyword names with ``_`` for ``.``."""
    out: dict[str, Any] = {"bootstrap.servers": bootstrap}
    out.update(conf or {})
    out.update({k.replace("_", "."): v for k, v in kw.items()})
    return out


class DriftlineProducer:
    """Background-batching producer of prediction and label events.

    ``conf`` / ``**kafka_conf`` go to librdkafka unchanged (``security_protocol="SASL_SSL"``,
    ``sasl_mechanism="SCRAM-SHA-512"``, ``sasl_username=...``, ``ssl_ca_location=...``).
    ``max_queue`` bounds the events waiting in memory; ``batch_events`` and
    ``max_message_bytes`` bound one Kafka message; ``linger_s`` is how long a partial batch
    may wait. ``log_*`` return False (and count :attr:`dropped`) instead of waiting when
    the queue is full.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        predictions_topic: str = PREDICTIONS,
        labels_topic: str = LABELS,
        max_queue: int = 100_000,
        batch_events: int = 500,
        max_message_bytes: int = 900_000,
        linger_s: float = 0.05,
        autostart: bool = True,
        conf: Mapping[str, Any] | None = None,
        **kafka_conf: Any,
    ) -> None:
        if batch_events < 1:
            raise ValueError(f"batch_events: {batch_events!r} must be >= 1")
        if max_queue < 1:
            raise ValueError(f"max_queue: {max_queue!r} must be >= 1")
        settings = {
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 20,
            "compression.type": "lz4",
            **_conf(bootstrap, conf, kafka_conf),
        }
        self.topics = {"prediction": predictions_topic, "label": labels_topic}
        self.batch_events = batch_events
        self.max_message_bytes = max_message_bytes
        self.linger_s = linger_s
        self._queue: queue.Queue[tuple[str, str, dict[str, Any]] | None] = queue.Queue(max_queue)
        self._producer = Producer(settings)
        self._partitions: dict[str, int] = {}
        self._lock = threading.Lock()
        self.dropped = 0
        self.sent_events = 0
        self.sent_messages = 0
        self.delivery_errors = 0
        self.last_error: str | None = None
        self._in_flight = 0
        self._closed = False
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="driftline-producer", daemon=True)
        if autostart:
            self._thread.start()

    def start(self) -> DriftlineProducer:
        """Start the background thread (with ``autostart=False``, e.g. after a pre-fork
        server forked its workers: threads do not survive ``fork``)."""
        if not self._thread.is_alive():
            self._thread.start()
        return self

    # ----------------------------------------------------------------- request path

    def log_prediction(
        self,
        *,
        model_id: str,
        model_version: str,
        request_id: str,
        features: Mapping[str, Any],
        prediction: float | int | str | bool,
        score: float | None = None,
        latency_ms: float | None = None,
        cost_usd: float | None = None,
        slice: Mapping[str, str] | None = None,
        llm: Mapping[str, Any] | None = None,
        ts: float | None = None,
        event_id: str | None = None,
    ) -> bool:
        """Queue one prediction event; False if it was dropped (queue full or closed)."""
        ev: dict[str, Any] = {
            "event_id": event_id or uuid.uuid4().hex,
            "model_id": model_id,
            "model_version": model_version,
            "request_id": request_id,
            "ts": time.time() if ts is None else ts,
            "features": features,
            "prediction": prediction,
        }
        if score is not None:
            ev["score"] = score
        if latency_ms is not None:
            ev["latency_ms"] = latency_ms
        if cost_usd is not None:
            ev["cost_usd"] = cost_usd
        if slice is not None:
            ev["slice"] = slice
        if llm is not None:
            ev["llm"] = llm
        return self._offer("prediction", request_id, ev)

    def log_label(
        self,
        *,
        model_id: str,
        request_id: str,
        label: float | int | str | bool,
        ts: float | None = None,
        event_id: str | None = None,
    ) -> bool:
        """Queue one label event; False if it was dropped."""
        ev = {
            "event_id": event_id or uuid.uuid4().hex,
            "model_id": model_id,
            "request_id": request_id,
            "ts": time.time() if ts is None else ts,
            "label": label,
        }
        return self._offer("label", request_id, ev)

    def log_event(self, kind: str, event: Mapping[str, Any]) -> bool:
        """Queue a ready-made event dict (``kind``: prediction | label)."""
        if kind not in self.topics:
            raise ValueError(f"kind: {kind!r} is not valid; valid values: prediction, label")
        return self._offer(kind, str(event.get("request_id", "")), dict(event))

    def _offer(self, kind: str, request_id: str, ev: dict[str, Any]) -> bool:
        if self._closed:
            self.dropped += 1
            return False
        try:
            self._queue.put_nowait((kind, request_id, ev))
        except queue.Full:
            self.dropped += 1
            return False
        self._idle.clear()
        return True

    # ----------------------------------------------------------------- lifecycle

    def flush(self, timeout: float = 10.0) -> int:
        """Wait until queued events are delivered; returns how many are still pending."""
        if not self._thread.is_alive():
            return self._queue.qsize() + len(self._producer)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.wait(0.05) and self._in_flight == 0:
                left = self._producer.flush(max(0.0, deadline - time.monotonic()))
                if left == 0 and self._queue.empty():
                    return 0
            time.sleep(0.01)
        return self._queue.qsize() + len(self._producer)

    def close(self, timeout: float = 10.0) -> int:
        """Flush, stop the background thread; returns events/messages left undelivered."""
        left = self.flush(timeout) if self._thread.is_alive() else self._queue.qsize()
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        return left

    def __enter__(self) -> DriftlineProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- background thread

    def _partition_count(self, topic: str) -> int | None:
        n = self._partitions.get(topic)
        if n is None:
            try:
                meta = self._producer.list_topics(topic, timeout=5.0).topics.get(topic)
            except KafkaException as err:
                self.last_error = str(err)
                return None
            if meta is None or meta.error is not None or not meta.partitions:
                self.last_error = f"topic {topic!r}: no metadata ({meta.error if meta else ''})"
                return None
            n = self._partitions[topic] = len(meta.partitions)
        return n

    def _on_delivery(self, n_events: int) -> Callable[[KafkaError | None, Any], None]:
        def done(err: KafkaError | None, _msg: Any) -> None:
            with self._lock:
                self._in_flight -= 1
            if err is not None:
                self.delivery_errors += n_events
                self.last_error = str(err)
                log.warning("driftline producer: %d events not delivered: %s", n_events, err)
            else:
                self.sent_events += n_events

        return done

    def _send(self, topic: str, partition: int, events: list[bytes]) -> None:
        value = batch_value(events)
        with self._lock:
            self._in_flight += 1
        while True:
            try:
                self._producer.produce(
                    topic,
                    value=value,
                    partition=partition,
                    on_delivery=self._on_delivery(len(events)),
                )
                self.sent_messages += 1
                return
            except BufferError:
                self._producer.poll(0.05)  # librdkafka's own queue is full: wait a little

    def _drain(self, timeout: float) -> tuple[list[tuple[str, str, dict[str, Any]]], bool]:
        """Up to 10,000 queued events (waiting up to ``timeout`` for the first one)."""
        items: list[tuple[str, str, dict[str, Any]]] = []
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return items, self._closed
        while item is not None:
            items.append(item)
            if len(items) >= 10_000:
                return items, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items, False
        return items, True

    def _run(self) -> None:
        buffers: dict[tuple[str, int], tuple[list[bytes], int, float]] = {}
        waiting: list[tuple[str, str, dict[str, Any]]] = []  # until the metadata is known
        while True:
            timeout = self.linger_s if buffers or waiting else 0.2
            items, stop = self._drain(timeout)
            items = waiting + items
            waiting = []
            now = time.monotonic()
            for kind, request_id, ev in items:
                topic = self.topics[kind]
                n = self._partition_count(topic)
                if n is None:
                    waiting.append((kind, request_id, ev))
                    continue
                p = murmur2_partition(request_id.encode(), n)
                raw = orjson.dumps(ev, option=orjson.OPT_SERIALIZE_NUMPY)
                evs, size, since = buffers.get((topic, p), ([], 0, now))
                if evs and size + len(raw) + 1 > self.max_message_bytes:
                    self._send(topic, p, evs)
                    evs, size, since = [], 0, now
                evs.append(raw)
                size += len(raw) + 1
                if len(evs) >= self.batch_events:
                    self._send(topic, p, evs)
                    buffers.pop((topic, p), None)
                else:
                    buffers[(topic, p)] = (evs, size, since)
            for key in [
                k for k, (_, _, t0) in buffers.items() if stop or now - t0 >= self.linger_s
            ]:
                self._send(key[0], key[1], buffers.pop(key)[0])
            self._producer.poll(0)
            if stop:
                if waiting:
                    self.dropped += len(waiting)
                self._producer.flush(10.0)
                return
            if not buffers and not waiting and self._queue.empty():
                self._idle.set()


# --------------------------------------------------------------------------- kill switch


@dataclass(frozen=True)
class KillSwitchState:
    """A model's current kill-switch state as the serving stack should apply it."""

    model_id: str
    active: bool = False
    action: str | None = None  # rollback | fallback | throttle (None when released)
    target_version: str | None = None
    command_id: str | None = None
    issued_at: float | None = None
    mode: str | None = None


class KillSwitchWatcher:
    """Follows the compacted control topic; :meth:`state` answers from memory.

    >>> w = KillSwitchWatcher.__new__(KillSwitchWatcher)
    >>> w._states = {}; w._lock = threading.Lock()
    >>> w.apply(b'{"command_id":"c1","model_id":"fraud","action":"rollback",'
    ...         b'"target_version":"v1","mode":"automatic","issued_at":5.0}')
    >>> w.state("fraud").active, w.state("fraud").target_version, w.state("other").active
    (True, 'v1', False)
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        topic: str = CONTROL,
        on_change: Callable[[KillSwitchState], None] | None = None,
        conf: Mapping[str, Any] | None = None,
        **kafka_conf: Any,
    ) -> None:
        self.topic = topic
        self.on_change = on_change
        settings = {
            "group.id": f"driftline-killswitch-{uuid.uuid4().hex[:8]}",  # never committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            **_conf(bootstrap, conf, kafka_conf),
        }
        self._consumer = Consumer(settings)
        self._states: dict[str, KillSwitchState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="driftline-killswitch", daemon=True)

    def start(self) -> KillSwitchWatcher:
        """Start following the topic from its beginning (compaction keeps it short)."""
        self._thread.start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """True once the watcher has read everything that was on the topic at start."""
        return self._caught_up.wait(timeout)

    def state(self, model_id: str) -> KillSwitchState:
        """The model's current state (inactive when nothing was ever published)."""
        with self._lock:
            return self._states.get(model_id) or KillSwitchState(model_id)

    def apply(self, value: bytes | None) -> None:
        """Apply one control message (public for tests and Redis-mirror bridges)."""
        if not value:
            return
        try:
            cmd = orjson.loads(value)
            model_id = str(cmd["model_id"])
            action = str(cmd["action"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("driftline kill switch: ignoring a malformed control message")
            return
        active = action != "release"
        st = KillSwitchState(
            model_id,
            active,
            action if active else None,
            cmd.get("target_version") if active else None,
            cmd.get("command_id"),
            cmd.get("issued_at"),
            cmd.get("mode"),
        )
        with self._lock:
            changed = self._states.get(model_id) != st
            self._states[model_id] = st
        if changed and getattr(self, "on_change", None) is not None:
            assert self.on_change is not None
            self.on_change(st)

    def _run(self) -> None:
        try:
            meta = None
            while meta is None and not self._stop.is_set():
                try:
                    md = self._consumer.list_topics(self.topic, timeout=5.0).topics.get(self.topic)
                    if md is not None and md.error is None and md.partitions:
                        meta = md
                except KafkaException as err:
                    log.warning("driftline kill switch: no metadata yet (%s)", err)
                if meta is None:
                    self._stop.wait(1.0)
            if meta is None:
                return
            parts = sorted(meta.partitions)
            self._consumer.assign(
                [CKTopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts]
            )
            pending_eof = set(parts)
            while not self._stop.is_set():
                for msg in self._consumer.consume(num_messages=500, timeout=0.2):
                    problem = msg.error()
                    if problem is not None:
                        if problem.code() == KafkaError._PARTITION_EOF:
                            pending_eof.discard(msg.partition())
                            if not pending_eof:
                                self._caught_up.set()
                        else:
                            log.warning("driftline kill switch: consume error %s", problem)
                        continue
                    self.apply(msg.value())
        finally:
            self._consumer.close()

    def close(self) -> None:
        """Stop the background thread and close the consumer."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)


def killswitch_from_mirror(raw: bytes | None, model_id: str) -> KillSwitchState:
    """Interpret driftline's Redis mirror (``GET {prefix}:ks:<model>``) for a model.

    >>> killswitch_from_mirror(b'{"active":true,"action":"rollback","target_version":"v1",'
    ...     b'"command_id":"c","since":3.0}', "fraud").action
    'rollback'
    >>> killswitch_from_mirror(None, "fraud").active
    False
    """
    if not raw:
        return KillSwitchState(model_id)
    doc = orjson.loads(raw)
    active = bool(doc.get("active"))
    return KillSwitchState(
        model_id,
        active,
        doc.get("action") if active else None,
        doc.get("target_version") if active else None,
        doc.get("command_id"),
        doc.get("since"),
        None,
    )
