"""The state-store contract and its in-memory implementation.

A stage checkpoints by ONE atomic :meth:`StateStore.commit`: its state, the next input
offsets, the messages it is about to publish (outbox) and — for stage 1 — the label-join
operations of the batch. The store performs the join inside the same atomic step and
returns the joined pairs, so the hot path costs one store round trip per batch.

Fencing: every :meth:`StateStore.claim` increments the partition's *generation*; a commit
or ack carrying an older generation raises :class:`Fenced` (a zombie worker that lost the
partition can never overwrite the new owner's state).

Label join (per claimed stage-1 partition; predictions and labels are co-partitioned by
``request_id``), applied in the order of ``join_ops``:

* ``park`` (a prediction): if an early label is waiting for this ``(model, request_id)`` the
  pair is formed at once (outcome ``joined``); if the request was already parked or joined
  the op is ignored (outcome ``duplicate_request``); otherwise the compact record is parked
  with TTL = the model's label horizon.
* ``label``: matched against the parked prediction → pair (outcome ``joined``; the
  prediction is removed and a "joined" marker kept for the horizon); a label for an already
  joined request → ``duplicate``; otherwise the label is parked as *early* (outcome
  ``early``) with the same TTL, waiting for its prediction. A label for an unknown request
  and a label arriving after its prediction's TTL both end up as early labels that expire
  unmatched: they are counted as ``early`` when seen; expiry itself is not reported.
* a pair carries the ``tick`` of the op that completed it (the later one in arrival order),
  so stage 1 folds it into that tick whatever the batch boundaries were.

The result of the last commit is kept as the partition's *inbox* and returned by
:meth:`StateStore.claim`: a worker that crashed between commit and folding the pairs into
its state loses nothing (the next commit replaces the inbox).

``join_ops`` is any sequence of :class:`JoinOp`; stage 1 passes a :class:`JoinBatch`, the
same operations held as columns with each record already serialised in the compact form
(park ``[v, s, sc, p, ts]``, label ``[y, ts]``, JSON), which the stores use without
building a :class:`JoinOp` per operation. Records parked by earlier versions (JSON objects
``{"v": ..}`` / ``{"y": ..}``) are still read.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple, Protocol, overload

import orjson

Stage = Literal["ingest", "detect"]
STAGES: tuple[str, ...] = ("ingest", "detect")


class Fenced(RuntimeError):
    """The caller's generation is stale: another owner claimed the partition since — or,
    with ``state_lost``, the store holds no generation for it at all (its keys were
    deleted, the database flushed or replaced while the caller ran): nobody owns it."""

    def __init__(self, message: str, *, state_lost: bool = False) -> None:
        super().__init__(message)
        self.state_lost = state_lost


class OutMessage(NamedTuple):
    """A message to publish; ``id`` is deterministic (consumers drop ids they applied)."""

    id: str
    topic: str
    key: bytes
    value: bytes


class JoinOp(NamedTuple):
    """One label-join operation of a stage-1 batch (see the module docstring)."""

    op: Literal["park", "label"]
    model_id: str
    request_id: str
    tick: int
    ttl_s: float
    record: Mapping[str, Any]  # park: {v, s, sc, p, ts}; label: {y, ts}


class JoinedPair(NamedTuple):
    """A prediction matched with its label."""

    model_id: str
    request_id: str
    tick: int
    version: str
    slices: tuple[str, ...]
    score: float | None
    prediction: str
    label: str
    pred_ts: float
    label_ts: float


class JoinOutcome(NamedTuple):
    """How one join op was classified: joined | duplicate | early | duplicate_request."""

    model_id: str
    tick: int
    outcome: str


JOIN_OUTCOMES: tuple[str, ...] = ("joined", "duplicate", "early", "duplicate_request")
_PARK_FIELDS: Final = ("v", "s", "sc", "p", "ts")
_LABEL_FIELDS: Final = ("y", "ts")


def encode_record(op: str, record: Mapping[str, Any]) -> bytes:
    """The compact serialised form of a join record: park ``[v, s, sc, p, ts]``, label
    ``[y, ts]`` (JSON; numbers exactly as orjson prints them).

    >>> encode_record("park", {"v": "v1", "s": ["r=eu"], "sc": 0.5, "p": "1", "ts": 2.5})
    b'["v1",["r=eu"],0.5,"1",2.5]'
    >>> encode_record("label", {"y": "0", "ts": 3.0})
    b'["0",3.0]'
    """
    names = _PARK_FIELDS if op == "park" else _LABEL_FIELDS
    try:
        return orjson.dumps([record[n] for n in names])
    except KeyError as err:
        raise ValueError(
            f"record: {op} records need the fields {', '.join(names)}; missing {err}"
        ) from None


def decode_record(op: str, raw: bytes | str | Any) -> dict[str, Any]:
    """A record as a mapping, from its compact form or the older JSON-object form.

    >>> decode_record("label", b'["0",3.0]')
    {'y': '0', 'ts': 3.0}
    """
    doc = orjson.loads(raw) if isinstance(raw, bytes | str) else raw
    if isinstance(doc, dict):
        return doc
    return dict(zip(_PARK_FIELDS if op == "park" else _LABEL_FIELDS, doc, strict=True))


def make_pair(model_id: str, request_id: str, tick: int, pred: Any, label: Any) -> JoinedPair:
    """The :class:`JoinedPair` of a decoded prediction and label record (either form)."""
    if type(pred) is list:
        v, s, sc, p, pts = pred
    else:
        v, s, sc, p, pts = pred["v"], pred["s"], pred["sc"], pred["p"], pred["ts"]
    if type(label) is list:
        y, lts = label
    else:
        y, lts = label["y"], label["ts"]
    return JoinedPair(
        model_id, request_id, tick, str(v), tuple(s), sc, str(p), str(y), float(pts), float(lts)
    )


class _LazyRecord(Mapping[str, Any]):
    """A serialised record decoded on first access (iterating a JoinBatch only for model
    ids and op kinds, as metrics do, decodes nothing)."""

    __slots__ = ("_doc", "_kind", "_raw")

    def __init__(self, kind: str, raw: bytes) -> None:
        self._kind = kind
        self._raw = raw
        self._doc: dict[str, Any] | None = None

    def _get(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = decode_record(self._kind, self._raw)
        return self._doc

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


class JoinBatch(Sequence[JoinOp]):
    """A batch's join operations as columns (what stage 1 produces; see the module doc).

    ``records[i]`` is the op's compact serialised record (:func:`encode_record`). Indexing or
    iterating yields :class:`JoinOp` values with the record decoded, so a JoinBatch can be
    passed wherever a ``Sequence[JoinOp]`` is expected.

    >>> b = JoinBatch.from_ops([JoinOp("label", "m", "r1", 7, 60.0, {"y": "1", "ts": 2.0})])
    >>> len(b), b.records[0], dict(b[0].record)
    (1, b'["1",2.0]', {'y': '1', 'ts': 2.0})
    """

    __slots__ = ("model_ids", "parks", "records", "request_ids", "ticks", "ttl_s")

    def __init__(
        self,
        *,
        parks: list[bool],
        model_ids: list[str],
        request_ids: list[str],
        ticks: list[int],
        ttl_s: list[float],
        records: list[bytes],
    ) -> None:
        n = len(parks)
        cols = (model_ids, request_ids, ticks, ttl_s, records)
        if any(len(c) != n for c in cols):
            lens = ", ".join(str(len(c)) for c in (parks, *cols))
            raise ValueError(f"JoinBatch: columns must have equal lengths, got {lens}")
        self.parks = parks
        self.model_ids = model_ids
        self.request_ids = request_ids
        self.ticks = ticks
        self.ttl_s = ttl_s
        self.records = records

    @classmethod
    def from_ops(cls, ops: Sequence[JoinOp]) -> JoinBatch:
        """The columns of ``ops`` (returned as is when already a JoinBatch)."""
        if isinstance(ops, JoinBatch):
            return ops
        parks: list[bool] = []
        for i, op in enumerate(ops):
            if op.op not in ("park", "label"):
                raise ValueError(
                    f"join_ops[{i}].op: {op.op!r} is not valid; valid values: park, label"
                )
            parks.append(op.op == "park")
        return cls(
            parks=parks,
            model_ids=[op.model_id for op in ops],
            request_ids=[op.request_id for op in ops],
            ticks=[op.tick for op in ops],
            ttl_s=[op.ttl_s for op in ops],
            records=[encode_record(op.op, op.record) for op in ops],
        )

    def __len__(self) -> int:
        return len(self.parks)

    def _op(self, i: int) -> JoinOp:
        kind: Literal["park", "label"] = "park" if self.parks[i] else "label"
        return JoinOp(
            kind,
            self.model_ids[i],
            self.request_ids[i],
            self.ticks[i],
            self.ttl_s[i],
            _LazyRecord(kind, self.records[i]),
        )

    @overload
    def __getitem__(self, i: int) -> JoinOp: ...

    @overload
    def __getitem__(self, i: slice) -> JoinBatch: ...

    def __getitem__(self, i: int | slice) -> JoinOp | JoinBatch:
        if isinstance(i, slice):
            return JoinBatch(
                parks=self.parks[i],
                model_ids=self.model_ids[i],
                request_ids=self.request_ids[i],
                ticks=self.ticks[i],
                ttl_s=self.ttl_s[i],
                records=self.records[i],
            )
        if i < 0:
            i += len(self.parks)
        if not 0 <= i < len(self.parks):
            raise IndexError("JoinBatch index out of range")
        return self._op(i)

    def __iter__(self) -> Iterator[JoinOp]:
        return map(self._op, range(len(self.parks)))

    def __repr__(self) -> str:
        return f"JoinBatch({len(self)} ops: {sum(self.parks)} park)"

    def op_counts(self) -> dict[tuple[str, str], int]:
        """Operations per ``(model_id, "park" | "label")`` (metrics; no record decoding)."""
        out: dict[tuple[str, str], int] = {}
        for m, p in zip(self.model_ids, self.parks, strict=True):
            k = (m, "park" if p else "label")
            out[k] = out.get(k, 0) + 1
        return out


@dataclass(frozen=True)
class JoinResult:
    """Pairs formed and outcomes of one commit's join ops."""

    pairs: tuple[JoinedPair, ...] = ()
    outcomes: tuple[JoinOutcome, ...] = ()

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {"pairs": [list(p) for p in self.pairs], "outcomes": [list(o) for o in self.outcomes]}
        )

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> JoinResult:
        if not raw:
            return cls()
        doc = orjson.loads(raw)
        pairs = tuple(
            JoinedPair(p[0], p[1], p[2], p[3], tuple(p[4]), p[5], p[6], p[7], p[8], p[9])
            for p in doc["pairs"]
        )
        outcomes = tuple(JoinOutcome(*o) for o in doc["outcomes"])
        return cls(pairs, outcomes)


class Claim(NamedTuple):
    """What a new owner of a partition gets back from :meth:`StateStore.claim`."""

    generation: int
    state: bytes | None
    next_offset: dict[str, int] | None
    outbox: list[OutMessage]
    inbox: JoinResult


class StateStore(Protocol):
    """Durable state of driftline's stages (Redis in production, memory in embedded mode)."""

    async def claim(self, stage: str, partition: int, owner: str) -> Claim:
        """Take ownership; increments and returns the generation (fencing token)."""
        ...

    async def commit(
        self,
        stage: str,
        partition: int,
        generation: int,
        *,
        state: bytes,
        next_offset: Mapping[str, int],
        outbox: Sequence[OutMessage] = (),
        join_ops: Sequence[JoinOp] = (),
        killswitch: Mapping[str, bytes] | None = None,
    ) -> JoinResult:
        """Atomically write state + offsets + outbox (+ kill-switch states), apply the
        join ops and keep their result as the inbox; raise :class:`Fenced` if stale."""
        ...

    async def ack_outbox(
        self, stage: str, partition: int, generation: int, ids: Sequence[str]
    ) -> None:
        """Drop published outbox entries; raise :class:`Fenced` if stale."""
        ...

    async def get_killswitch(self, model_id: str) -> bytes | None:
        """The model's latest kill-switch state (JSON bytes) or None."""
        ...

    async def set_killswitch(self, model_id: str, state: bytes) -> None:
        """Overwrite the model's kill-switch state (operator tooling)."""
        ...


# --------------------------------------------------------------------------- memory store


@dataclass
class _Partition:
    generation: int = 0
    owner: str | None = None
    state: bytes | None = None
    next_offset: dict[str, int] | None = None
    outbox: dict[str, OutMessage] = field(default_factory=dict)
    inbox: bytes | None = None


class _Entry(NamedTuple):
    kind: Literal["pred", "label", "joined"]
    record: bytes  # compact serialised record (b"" for "joined")
    expires_at: float


class MemoryStore:
    """:class:`StateStore` in process memory (embedded mode and tests).

    ``clock`` gives the time TTLs are measured in (default wall clock; replays pass event
    time). Not shared between processes; thread-unsafe by design (one event loop).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._parts: dict[tuple[str, int], _Partition] = {}
        self._join: dict[tuple[int, str, str], _Entry] = {}
        self._expiry: list[tuple[float, tuple[int, str, str]]] = []
        self._killswitch: dict[str, bytes] = {}
        self.commits = 0

    def _part(self, stage: str, partition: int) -> _Partition:
        if stage not in STAGES:
            raise ValueError(f"stage: {stage!r} is not valid; valid values: {', '.join(STAGES)}")
        return self._parts.setdefault((stage, partition), _Partition())

    async def claim(self, stage: str, partition: int, owner: str) -> Claim:
        p = self._part(stage, partition)
        p.generation += 1
        p.owner = owner
        return Claim(
            p.generation,
            p.state,
            dict(p.next_offset) if p.next_offset is not None else None,
            list(p.outbox.values()),
            JoinResult.from_bytes(p.inbox),
        )

    def _check(self, p: _Partition, stage: str, partition: int, generation: int) -> None:
        # a partition nobody claimed is fenced for every generation, as in RedisStore
        if p.owner is None or generation != p.generation:
            raise Fenced(
                f"{stage}/{partition}: generation {generation} is stale "
                f"(current {p.generation}, owner {p.owner!r})",
                state_lost=p.owner is None,  # as RedisStore: no generation for it at all
            )

    async def commit(
        self,
        stage: str,
        partition: int,
        generation: int,
        *,
        state: bytes,
        next_offset: Mapping[str, int],
        outbox: Sequence[OutMessage] = (),
        join_ops: Sequence[JoinOp] = (),
        killswitch: Mapping[str, bytes] | None = None,
    ) -> JoinResult:
        p = self._part(stage, partition)
        self._check(p, stage, partition, generation)
        # Nothing below can fail half-way: compute the join first, then apply everything.
        result = self._apply_join(partition, join_ops) if join_ops else JoinResult()
        p.state = state
        p.next_offset = dict(next_offset)
        for m in outbox:
            p.outbox[m.id] = m
        p.inbox = result.to_bytes()
        if killswitch:
            self._killswitch.update(killswitch)
        self.commits += 1
        return result

    async def ack_outbox(
        self, stage: str, partition: int, generation: int, ids: Sequence[str]
    ) -> None:
        p = self._part(stage, partition)
        self._check(p, stage, partition, generation)
        for i in ids:
            p.outbox.pop(i, None)

    async def get_killswitch(self, model_id: str) -> bytes | None:
        return self._killswitch.get(model_id)

    async def set_killswitch(self, model_id: str, state: bytes) -> None:
        self._killswitch[model_id] = state

    # ----------------------------------------------------------------- join

    def _get(self, key: tuple[int, str, str], now: float) -> _Entry | None:
        e = self._join.get(key)
        if e is not None and e.expires_at <= now:
            del self._join[key]
            return None
        return e

    def _put(self, key: tuple[int, str, str], entry: _Entry) -> None:
        self._join[key] = entry
        heapq.heappush(self._expiry, (entry.expires_at, key))

    def _sweep(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, key = heapq.heappop(self._expiry)
            e = self._join.get(key)
            if e is not None and e.expires_at <= now:
                del self._join[key]

    def _apply_join(self, partition: int, ops: Sequence[JoinOp]) -> JoinResult:
        batch = JoinBatch.from_ops(ops)
        now = self.clock()
        self._sweep(now)
        joined: list[tuple[str, str, int, bytes, bytes]] = []  # model, request, tick, P, L
        outcomes: list[JoinOutcome] = []
        for is_park, model_id, request_id, tick, ttl_s, rec in zip(
            batch.parks,
            batch.model_ids,
            batch.request_ids,
            batch.ticks,
            batch.ttl_s,
            batch.records,
            strict=True,
        ):
            key = (partition, model_id, request_id)
            e = self._get(key, now)
            if is_park:
                if e is None:
                    if ttl_s > 0:
                        self._put(key, _Entry("pred", rec, now + ttl_s))
                elif e.kind == "label":
                    joined.append((model_id, request_id, tick, rec, e.record))
                    outcomes.append(JoinOutcome(model_id, tick, "joined"))
                    self._put(key, _Entry("joined", b"", now + ttl_s))
                else:
                    outcomes.append(JoinOutcome(model_id, tick, "duplicate_request"))
            elif e is None:
                outcomes.append(JoinOutcome(model_id, tick, "early"))
                if ttl_s > 0:
                    self._put(key, _Entry("label", rec, now + ttl_s))
            elif e.kind == "pred":
                joined.append((model_id, request_id, tick, e.record, rec))
                outcomes.append(JoinOutcome(model_id, tick, "joined"))
                self._put(key, _Entry("joined", b"", now + ttl_s))
            else:  # joined already, or a second early label for the same request
                outcomes.append(JoinOutcome(model_id, tick, "duplicate"))
        pairs: tuple[JoinedPair, ...] = ()
        if joined:
            # two orjson.loads for all pairs instead of two per pair
            preds = orjson.loads(b"[" + b",".join([j[3] for j in joined]) + b"]")
            labels = orjson.loads(b"[" + b",".join([j[4] for j in joined]) + b"]")
            pairs = tuple(
                make_pair(j[0], j[1], j[2], pr, la)
                for j, pr, la in zip(joined, preds, labels, strict=True)
            )
        return JoinResult(pairs, tuple(outcomes))

    def join_size(self) -> int:
        """Entries currently held in the join buffer (tests, metrics)."""
        return len(self._join)
