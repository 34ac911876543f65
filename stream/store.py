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
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import orjson

Stage = Literal["ingest", "detect"]
STAGES: tuple[str, ...] = ("ingest", "detect")


class Fenced(RuntimeError):
    """The caller's generation is stale: another owner claimed the partition since."""


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


@dataclass
class _Entry:
    kind: Literal["pred", "label", "joined"]
    record: Mapping[str, Any]
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
                f"(current {p.generation}, owner {p.owner!r})"
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
        now = self.clock()
        self._sweep(now)
        pairs: list[JoinedPair] = []
        outcomes: list[JoinOutcome] = []
        for op in ops:
            key = (partition, op.model_id, op.request_id)
            e = self._get(key, now)
            if op.op == "park":
                if e is None:
                    if op.ttl_s > 0:
                        self._put(key, _Entry("pred", op.record, now + op.ttl_s))
                elif e.kind == "label":
                    pairs.append(_pair(op, op.record, e.record))
                    outcomes.append(JoinOutcome(op.model_id, op.tick, "joined"))
                    self._put(key, _Entry("joined", {}, now + op.ttl_s))
                else:
                    outcomes.append(JoinOutcome(op.model_id, op.tick, "duplicate_request"))
            elif e is None:
                outcomes.append(JoinOutcome(op.model_id, op.tick, "early"))
                if op.ttl_s > 0:
                    self._put(key, _Entry("label", op.record, now + op.ttl_s))
            elif e.kind == "pred":
                pairs.append(_pair(op, e.record, op.record))
                outcomes.append(JoinOutcome(op.model_id, op.tick, "joined"))
                self._put(key, _Entry("joined", {}, now + op.ttl_s))
            else:  # joined already, or a second early label for the same request
                outcomes.append(JoinOutcome(op.model_id, op.tick, "duplicate"))
        return JoinResult(tuple(pairs), tuple(outcomes))

    def join_size(self) -> int:
        """Entries currently held in the join buffer (tests, metrics)."""
        return len(self._join)


def _pair(op: JoinOp, pred: Mapping[str, Any], label: Mapping[str, Any]) -> JoinedPair:
    return JoinedPair(
        op.model_id,
        op.request_id,
        op.tick,
        str(pred["v"]),
        tuple(pred["s"]),
        pred["sc"],
        str(pred["p"]),
        str(label["y"]),
        float(pred["ts"]),
        float(label["ts"]),
    )
