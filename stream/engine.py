"""The pure engine: decoded batch in, (state, messages out) back. No asyncio, no I/O.

Stage 1 (:class:`Ingest`, one per input partition) decodes, validates and accumulates tick
summaries and produces the label-join operations for the store. Stage 2 (:class:`Detect`,
one per summaries partition) merges summaries and runs the detectors and the policy (see
:mod:`stream.policy`).

Event-time ticks (stage 1)
--------------------------
``tick = floor(ts / tick_s)``. The partition's *watermark* is the largest event time seen
(predictions and labels). Tick ``t`` *closes* once ``watermark >= (t + 1) * tick_s +
lateness``. An event whose own tick had already closed when it arrived is *late*: it is
counted into the tick that holds the watermark (always still open) and in ``late``. Because
the watermark is evaluated per event in arrival order (a vectorised running maximum), every
event's *effective tick* depends only on the event order, never on batch boundaries.

Ticks that close during batch ``b`` are emitted at the start of batch ``b + 1`` (or by
:meth:`Ingest.flush`), after the joined pairs of batch ``b``'s commit were folded in with
:meth:`Ingest.absorb`: a pair is folded into the effective tick of the event that completed
it, which is then always still held. Summary ids are ``<source>:<partition>:<seq>`` with
``seq`` counting emitted summaries in (tick, model) order, so the same input yields the
same ids and contents whatever the batch sizes (float sums agree to rounding).

The caller's loop per batch::

    out = ingest.process_raw(messages, now)           # or process(events, rejects, ...)
    result = await store.commit("ingest", p, gen, state=ingest.snapshot(),
                                next_offset=out.next_offset, outbox=out.messages,
                                join_ops=out.join_ops)
    ingest.absorb(result)                               # pairs land in the next summaries
    ... publish out.messages, then store.ack_outbox(...)
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, is_, not_
from typing import Any, Final

import numpy as np
import orjson

from stream.config import MonitorConfig, Topics
from stream.detect import Detect, DetectOutput
from stream.events import Decoder, Label, Prediction, RawMessage, Reject, deadletter_record
from stream.profile import Profile, norm_target
from stream.store import JoinBatch, JoinOp, JoinResult, OutMessage
from stream.summary import GroupAcc, ModelPlan, ModelTickAcc

STATE_SCHEMA: Final = 1
_GET_MODEL: Final = attrgetter("model_id")
_GET_VERSION: Final = attrgetter("model_version")
_GET_TS: Final = attrgetter("ts")
_GET_SCORE: Final = attrgetter("score")
_GET_PREDICTION: Final = attrgetter("prediction")
_GET_REQUEST: Final = attrgetter("request_id")
_GET_LABEL: Final = attrgetter("label")

__all__ = [
    "Detect",
    "DetectOutput",
    "EngineStateError",
    "Ingest",
    "IngestOutput",
    "compile_plans",
    "tune_gc",
]


_JSON_SCALARS: Final = frozenset({float, int, bool, type(None)})


def _json_rows(cols: Sequence[list[Any]]) -> list[bytes]:
    """``orjson.dumps`` of each row of ``cols`` (as a JSON array), byte for byte, without one
    ``orjson.dumps`` call per row (that costs ~0.8 µs each): a column of numbers/null/bools
    is serialised in one call and split at the commas (none occur inside such values); any
    other column once per distinct value (versions, slice keys, label values repeat)."""
    if not cols or not cols[0]:
        return []
    parts: list[list[bytes]] = []
    for col in cols:
        if _JSON_SCALARS.issuperset(map(type, col)):
            parts.append(orjson.dumps(col)[1:-1].split(b","))
        else:
            known = {v: orjson.dumps(v) for v in set(col)}
            parts.append(list(map(known.__getitem__, col)))
    fmt = b"[" + b",".join([b"%b"] * len(cols)) + b"]"
    return list(map(fmt.__mod__, zip(*parts, strict=True)))


def _norm_targets(vals: list[Any]) -> list[str]:
    """``norm_target`` of each value, computed once per distinct value (values that compare
    equal, like ``1``, ``1.0`` and ``True``, have the same canonical string)."""
    distinct = set(vals)
    if 4 * len(distinct) > len(vals):  # mostly distinct (regression): no gain
        return list(map(norm_target, vals))
    known = dict(zip(distinct, map(norm_target, distinct), strict=True))
    return list(map(known.__getitem__, vals))


class EngineStateError(ValueError):
    """A persisted engine state cannot be loaded."""


@dataclass
class IngestOutput:
    """What one stage-1 batch produced."""

    messages: list[OutMessage] = field(default_factory=list)
    join_ops: Sequence[JoinOp] = ()
    next_offset: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    summaries: int = 0


def _json_array_into(parts: list[bytes], items: Iterable[bytes]) -> None:
    """Append a JSON array of already-encoded JSON values to ``parts`` (to be joined)."""
    parts.append(b"[")
    for i, item in enumerate(items):
        if i:
            parts.append(b",")
        parts.append(item)
    parts.append(b"]")


def tune_gc(gen0: int = 50_000) -> None:
    """Raise CPython's generation-0 GC threshold for the stage-1 hot path.

    Decoding allocates several container objects per event; with the default threshold
    (700) the cyclic GC runs every few hundred events and scans the long-lived state, which
    measured as 30-40 % of stage-1 time. Events are acyclic, so collecting rarely is safe.
    Workers call this once at start-up (the embedded runner does).
    """
    import gc

    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(max(gen0, gc.get_threshold()[0]), max(g1, 20), max(g2, 100))


def compile_plans(
    config: MonitorConfig, profiles: Mapping[str, Profile | None]
) -> dict[str, ModelPlan]:
    """One :class:`ModelPlan` per configured model."""
    return {m: ModelPlan.compile(cfg, profiles.get(m)) for m, cfg in config.models.items()}


class Ingest:
    """Stage 1 for one input partition (predictions ``p`` and labels ``p``)."""

    def __init__(
        self,
        config: MonitorConfig,
        plans: Mapping[str, ModelPlan],
        partition: int,
        *,
        topics: Topics | None = None,
        tick_s: float = 1.0,
        lateness_s: float = 5.0,
        max_future_s: float = 300.0,
        max_message_bytes: int = 1 << 20,
    ) -> None:
        if tick_s <= 0:
            raise ValueError(f"tick_s: {tick_s!r} must be > 0")
        self.config = config
        self.plans = plans
        self.partition = partition
        self.topics = topics or Topics()
        self.tick_s = float(tick_s)
        self.lateness_s = float(lateness_s)
        known = config.model_ids
        self.decoders = {
            self.topics.predictions: Decoder(
                "prediction", known, max_future_s=max_future_s, max_message_bytes=max_message_bytes
            ),
            self.topics.labels: Decoder(
                "label", known, max_future_s=max_future_s, max_message_bytes=max_message_bytes
            ),
        }
        self.watermark = -math.inf
        self.seq = 0
        self.open: dict[tuple[int, str], ModelTickAcc] = {}
        self.pending: dict[tuple[int, str], ModelTickAcc] = {}
        self.next_offset: dict[str, int] = {}
        self.counters: Counter[str] = Counter()

    # ----------------------------------------------------------------- batch entry points

    def process_raw(self, messages: Sequence[RawMessage], now: float) -> IngestOutput:
        """Decode raw Kafka messages (both topics, in arrival order) and process them."""
        events: list[Prediction | Label] = []
        dead: list[OutMessage] = []
        rejected: Counter[str] = Counter()
        for msg in messages:
            dec = self.decoders.get(msg.topic)
            self.next_offset[msg.topic] = max(self.next_offset.get(msg.topic, 0), msg.offset + 1)
            if dec is None:
                valid = ", ".join(self.decoders)
                rej = Reject(
                    "unknown_topic",
                    f"topic: {msg.topic!r} is not an input; valid values: {valid}",
                )
                dead.append(self._deadletter(rej, msg))
                rejected[rej.reason] += 1
                continue
            ok, bad = dec.decode(msg.value, now)
            events.extend(ok)
            for rej in bad:
                dead.append(self._deadletter(rej, msg))
                rejected[rej.reason] += 1
        out = self.process(events)
        out.messages.extend(dead)
        out.rejected = rejected
        self.counters.update({f"rejected:{k}": v for k, v in rejected.items()})
        return out

    def _deadletter(self, rej: Reject, msg: RawMessage) -> OutMessage:
        rec = deadletter_record(rej, msg)
        return OutMessage(
            rec["deadletter_id"],
            self.topics.deadletter,
            f"{msg.topic}:{msg.partition}".encode(),
            orjson.dumps(rec),
        )

    def process(self, events: Sequence[Prediction | Label]) -> IngestOutput:
        """Fold validated events (arrival order) into tick summaries; see the module doc."""
        out = IngestOutput(next_offset=dict(self.next_offset))
        out.messages.extend(self._emit_pending())
        out.summaries = len(out.messages)
        n = len(events)
        if n:
            self._fold(events, out)
            out.accepted = n
            self.counters["accepted"] += n
        self._close_ticks()
        return out

    def absorb(self, result: JoinResult) -> None:
        """Fold the joined pairs and join outcomes of the last commit (or claim inbox)."""
        plans = self.plans
        held = self.pending.keys() | self.open.keys()
        # the groups a pair lands in, looked up once per (tick, model, version, slices)
        targets: dict[tuple[int, str, str, tuple[str, ...]], tuple[list[GroupAcc], str, str]] = {}
        for pair in result.pairs:
            key = (pair.tick, pair.model_id, pair.version, pair.slices)
            hit = targets.get(key)
            if hit is None:
                plan = plans.get(pair.model_id)
                if plan is None:
                    continue
                acc = self._held(pair.tick, pair.model_id, plan)
                groups = [acc.group(pair.version, "*", plan)]
                groups += [acc.group(pair.version, s, plan) for s in pair.slices]
                hit = (groups, plan.model.positive_label, plan.model.task)
                if (pair.tick, pair.model_id) in held:  # else _held counts each pair as late
                    targets[key] = hit
            groups, positive, task = hit
            for g in groups:
                g.add_pair(pair, positive, task)
        if result.outcomes:
            for (model_id, tick, outcome), n in Counter(result.outcomes).items():
                plan = plans.get(model_id)
                if plan is None:
                    continue
                if (tick, model_id) in held:
                    self._held(tick, model_id, plan).outcomes[outcome] += n
                else:
                    for _ in range(n):
                        self._held(tick, model_id, plan).outcomes[outcome] += 1
        self.counters["joined"] += len(result.pairs)

    def flush(self, now: float | None = None) -> IngestOutput:
        """Idle flush: emit held ticks; with ``now``, first advance the watermark to it."""
        out = IngestOutput(next_offset=dict(self.next_offset))
        if now is not None and now > self.watermark:
            self.watermark = now
        self._close_ticks()
        out.messages.extend(self._emit_pending())
        out.summaries = len(out.messages)
        return out

    # ----------------------------------------------------------------- internals

    def _held(self, tick: int, model_id: str, plan: ModelPlan) -> ModelTickAcc:
        key = (tick, model_id)
        acc = self.pending.get(key) or self.open.get(key)
        if acc is None:
            # Cannot happen with the documented loop; keep the data anyway (as late).
            t = self._open_tick()
            acc = self.open.get((t, model_id))
            if acc is None:
                acc = self.open[(t, model_id)] = ModelTickAcc(plan)
            acc.late += 1
        return acc

    def _open_tick(self) -> int:
        if self.watermark == -math.inf:
            return 0
        return math.floor(self.watermark / self.tick_s)

    def _fold(self, events: Sequence[Prediction | Label], out: IngestOutput) -> None:
        tick_s = self.tick_s
        ts = np.fromiter(map(_GET_TS, events), np.float64, len(events))
        prev = np.empty_like(ts)
        prev[0] = self.watermark
        if ts.shape[0] > 1:
            np.maximum.accumulate(ts[:-1], out=prev[1:])
            np.maximum(prev[1:], self.watermark, out=prev[1:])
        own = np.floor(ts / tick_s)
        late = (own + 1.0) * tick_s + self.lateness_s <= prev
        with np.errstate(invalid="ignore"):
            eff = np.where(late, np.floor(prev / tick_s), own).astype(np.int64).tolist()
        late_l = late.tolist()
        self.watermark = max(self.watermark, float(ts.max()))
        open_ = self.open
        plans = self.plans
        mids: list[str] = list(map(_GET_MODEL, events))
        tick_keys = list(zip(eff, mids, strict=True))
        for key in set(tick_keys):
            if key not in open_:
                open_[key] = ModelTickAcc(plans[key[1]])
        if True in late_l:
            for key, cnt in Counter(compress(tick_keys, late_l)).items():
                open_[key].late += cnt
        kinds = set(map(type, events))
        is_pred: list[bool] = []
        if Label in kinds:
            is_pred = list(map(is_, map(type, events), repeat(Prediction)))
            preds: list[Prediction] = list(compress(events, is_pred))  # type: ignore[arg-type]
            p_ticks = list(compress(eff, is_pred))
            p_mids = list(compress(mids, is_pred))
        else:
            preds = events  # type: ignore[assignment]
            p_ticks, p_mids = eff, mids
        # group predictions by (model, version, tick), arrival order kept within a group
        groups: dict[tuple[str, str, int], list[Prediction]] = defaultdict(list)
        versions = map(_GET_VERSION, preds)
        for gkey, pe in zip(zip(p_mids, versions, p_ticks, strict=True), preds, strict=True):
            groups[gkey].append(pe)
        joining = any(plans[m].model.label_horizon_s > 0 for m in set(mids))
        skeys_of: dict[int, tuple[str, ...]] = {}  # id(prediction) -> slice keys (join ops)
        for (model_id, version, tick), evs in groups.items():
            plan = plans[model_id]
            acc = open_[(tick, model_id)]
            acc.group(version, "*", plan).add_predictions(evs, plan)
            if not plan.slices:
                continue
            cols = plan.slice_key_columns(evs)
            for col in cols:
                by_key: dict[str, list[Prediction]] = defaultdict(list)
                for sk, pe in zip(col, evs, strict=True):
                    by_key[sk].append(pe)
                for sk, sevs in by_key.items():
                    acc.group(version, sk, plan).add_predictions(sevs, plan)
            if joining and plan.model.label_horizon_s > 0:
                skeys_of.update(zip(map(id, evs), zip(*cols, strict=True), strict=True))
        if Label not in kinds and not joining:
            return
        self._join_ops(events, eff, mids, preds=preds, skeys_of=skeys_of, is_pred=is_pred, out=out)

    def _join_ops(
        self,
        events: Sequence[Prediction | Label],
        eff: list[int],
        mids: list[str],
        *,
        preds: Sequence[Prediction],
        skeys_of: Mapping[int, tuple[str, ...]],
        is_pred: list[bool],
        out: IngestOutput,
    ) -> None:
        """Count the labels into their ticks and build the batch's join ops as columns
        (arrival order; only models with a label horizon): one compact record per event,
        the bytes ``orjson.dumps`` gives for the row, built column-wise by
        :func:`_json_rows`; labels are counted per (tick, model, value). ``is_pred`` flags the
        predictions among ``events`` (empty: the batch has no labels)."""
        plans = self.plans
        open_ = self.open
        horizon_of = {m: plans[m].model.label_horizon_s for m in set(mids)}
        ttls = list(map(horizon_of.__getitem__, mids))
        precs: list[bytes] = []
        if preds and any(horizon_of.values()):
            precs = _json_rows(
                [
                    list(map(_GET_VERSION, preds)),
                    list(map(skeys_of.get, map(id, preds), repeat(()))),
                    list(map(_GET_SCORE, preds)),
                    _norm_targets(list(map(_GET_PREDICTION, preds))),
                    list(map(_GET_TS, preds)),
                ]
            )
        if is_pred:
            parks = is_pred
            is_label = list(map(not_, parks))
            labels = list(compress(events, is_label))
            labs = _norm_targets(list(map(_GET_LABEL, labels)))
            l_keys = zip(compress(eff, is_label), compress(mids, is_label), labs, strict=True)
            for (tick, model_id, lab), cnt in Counter(l_keys).items():
                open_[(tick, model_id)].add_labels(lab, cnt, plans[model_id])
            lrecs = _json_rows([labs, list(map(_GET_TS, labels))])
            if not precs:
                precs = [b""] * len(preds)  # placeholders: no prediction is parked
            # predictions take the next record of precs, labels the next of lrecs
            its = (iter(lrecs), iter(precs))
            records = list(map(next, map(its.__getitem__, parks)))
        else:
            parks = [True] * len(events)
            records = precs
        rids = list(map(_GET_REQUEST, events))
        if min(horizon_of.values()) <= 0:  # models without a label horizon send no join ops
            keep = [t > 0 for t in ttls]
            if True not in keep:
                return
            parks = list(compress(parks, keep))
            mids = list(compress(mids, keep))
            rids = list(compress(rids, keep))
            eff = list(compress(eff, keep))
            ttls = list(compress(ttls, keep))
            records = list(compress(records, keep))
        out.join_ops = JoinBatch(
            parks=parks, model_ids=mids, request_ids=rids, ticks=eff, ttl_s=ttls, records=records
        )

    def _close_ticks(self) -> None:
        limit = self.watermark - self.lateness_s
        for key in [k for k in self.open if (k[0] + 1) * self.tick_s <= limit]:
            self.pending[key] = self.open.pop(key)

    def _emit_pending(self) -> list[OutMessage]:
        msgs: list[OutMessage] = []
        source = self.topics.predictions
        for key in sorted(self.pending):
            tick, model_id = key
            acc = self.pending.pop(key)
            self.seq += 1
            sid = f"{source}:{self.partition}:{self.seq}"
            doc = {
                "summary_id": sid,
                "source": source,
                "partition": self.partition,
                "seq": self.seq,
                "model_id": model_id,
                "tick": tick,
                "tick_s": self.tick_s,
                **acc.to_doc(),
            }
            msgs.append(
                OutMessage(sid, self.topics.summaries, model_id.encode(), orjson.dumps(doc))
            )
        return msgs

    # ----------------------------------------------------------------- state

    def snapshot(self) -> bytes:
        """Versioned JSON state (no pickle): watermark, sequence, held ticks, offsets.

        Each held tick is encoded on its own and the pieces joined: the same bytes as one
        ``orjson.dumps`` of the whole document, without building the whole document as
        Python objects first (at 1,000 models x 20 features a backlog batch holds ~15k
        ticks: ~80 MB of JSON, whose document peaked at ~700 MB of objects)."""
        head = orjson.dumps(
            {
                "schema": STATE_SCHEMA,
                "kind": "ingest",
                "partition": self.partition,
                "tick_s": self.tick_s,
                "watermark": None if self.watermark == -math.inf else self.watermark,
                "seq": self.seq,
                "next_offset": self.next_offset,
            }
        )
        parts = [head[:-1]]
        for key, held in ((b',"open":', self.open), (b',"pending":', self.pending)):
            parts.append(key)
            _json_array_into(
                parts, (orjson.dumps([t, m, a.to_doc()]) for (t, m), a in sorted(held.items()))
            )
        parts.append(b"}")
        return b"".join(parts)  # one copy: the pieces and the result are all that is held

    def restore(self, state: bytes | None, inbox: JoinResult | None = None) -> None:
        """Load a :meth:`snapshot` (None = fresh) and fold the claim's inbox."""
        if state is not None:
            doc = orjson.loads(state)
            if doc.get("schema") != STATE_SCHEMA or doc.get("kind") != "ingest":
                raise EngineStateError(
                    f"state: expected ingest schema {STATE_SCHEMA}, got "
                    f"{doc.get('kind')!r} schema {doc.get('schema')!r}"
                )
            if doc["tick_s"] != self.tick_s:
                raise EngineStateError(
                    f"tick_s: state was written with {doc['tick_s']} s ticks, "
                    f"this worker uses {self.tick_s} s"
                )
            wm = doc["watermark"]
            self.watermark = -math.inf if wm is None else float(wm)
            self.seq = int(doc["seq"])
            self.next_offset = dict(doc["next_offset"])
            self.open = {}
            self.pending = {}
            for target, key in ((self.open, "open"), (self.pending, "pending")):
                for t, m, a in doc[key]:
                    plan = self.plans.get(m)
                    if plan is not None:  # a model removed from the config is dropped
                        target[(int(t), m)] = ModelTickAcc.from_doc(a, plan)
        if inbox is not None:
            self.absorb(inbox)
