"""Tick summaries: what stage 1 accumulates per (model, version, slice, tick) and ships.

A :class:`ModelPlan` is compiled once per model from its config and reference profile (bin
edges, category indexes, slice values); accumulators are plain numpy arrays so a batch is
folded in with a few vectorised calls per feature, and merge/serialise trivially.

Group ``slice == "*"`` carries everything (features, score, latency, cost, LLM counters,
joined-pair errors and calibration); a slice group ``"<dim>=<value>"`` carries only the event
count, the score distribution and the joined-pair errors/calibration — what per-slice
concept-drift and calibration checks need — to keep stage-1 cost bounded.

Summary layout (one per model, tick and source partition; ``summary.schema.json``)::

    {summary_id, source, partition, seq, model_id, tick, tick_s, late,
     labels: {n, counts[], positives, outcomes{joined, duplicate, early, duplicate_request}},
     groups: [{version, slice, n, score{counts[], n, sum, sumsq},
               joined{n, errors, calib_n[], calib_pos[], calib_score[]},
               features?{name: numeric{counts[], n, sum, sumsq, min, max, missing, nan,
                                       out_of_range, wrong_type}
                             | categorical{counts[], missing, wrong_type, not_allowed}},
               latency?{counts[], n, sum}, cost?{n, sum}, llm?{n, input_tokens,
               output_tokens, retrieval_hits, flags{},
               prompts?{<prompt_version>: {n, signals{name: numeric}}}}}]}

LLM signals: a model that lists features named ``llm.input_tokens``, ``llm.output_tokens``,
``llm.retrieval_hits`` or ``llm.flags.<flag>`` (see :func:`stream.config.is_llm_signal`)
gets them accumulated *per prompt version* in ``llm.prompts`` of the ``"*"`` group, with the
numeric layout of features (histogram over the profile's bins, moments, missing...); a
flag is 1.0 when the event's ``llm.flags`` has it true, else 0.0, so its mean is the flag
rate. Events without ``llm`` are not LLM calls and are not counted there. At most
``MAX_PROMPT_VERSIONS`` prompt versions per group and tick; more fold into ``"other"``
(events without a prompt version count as ``"-"``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from detectors.sketches import numeric_bin_counts
from stream.config import ModelConfig, is_llm_signal
from stream.events import LLMInfo, Prediction
from stream.profile import Profile, norm_target
from stream.store import JoinedPair

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

LATENCY_EDGES_MS: Final = np.geomspace(1.0, 60_000.0, 41)
"""Interior edges of the latency histogram (ms): 42 log-spaced bins from <1 ms to >60 s."""
DEFAULT_SCORE_EDGES: Final = np.linspace(0.1, 0.9, 9)
CALIB_BINS: Final = 10
MAX_LLM_FLAGS: Final = 32
MAX_PROMPT_VERSIONS: Final = 8
_NUMERIC_TYPES: Final = frozenset({float, int, type(None)})
_FINITE_TYPES: Final = frozenset({float, int})
# C-level field getters of Prediction (a NamedTuple), for whole-batch columns
_F = Prediction._fields
_GET_FEATURES: Final = itemgetter(_F.index("features"))
_GET_SCORE: Final = itemgetter(_F.index("score"))
_GET_LATENCY: Final = itemgetter(_F.index("latency_ms"))
_GET_COST: Final = itemgetter(_F.index("cost_usd"))
_GET_LLM: Final = itemgetter(_F.index("llm"))
_GET_SLICE: Final = itemgetter(_F.index("slice"))
# numeric layout: n, sum, sumsq, min, max, missing, nan, out_of_range, wrong_type
_N, _SUM, _SQ, _MIN, _MAX, _MISS, _NAN, _OOR, _WT = range(9)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class NumPlan:
    name: str
    edges: FloatArray
    lo: float
    hi: float
    required: bool


@dataclass(frozen=True)
class CatPlan:
    name: str
    categories: tuple[str, ...]
    index: Mapping[str, int]
    allowed: frozenset[str] | None
    required: bool


@dataclass(frozen=True)
class SlicePlan:
    name: str
    values: frozenset[str]
    # value -> "dim=value" key, and the key of every other value (built once, not per event)
    keys: Mapping[str, str] = field(init=False, compare=False, repr=False)
    other: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", {v: f"{self.name}={v}" for v in self.values})
        object.__setattr__(self, "other", f"{self.name}=other")


@dataclass(frozen=True)
class ModelPlan:
    """Everything stage 1 needs to accumulate one model, compiled once."""

    model: ModelConfig
    profile: Profile | None
    numeric: tuple[NumPlan, ...]
    categorical: tuple[CatPlan, ...]
    score_edges: FloatArray
    label_categories: tuple[str, ...]
    label_index: Mapping[str, int]
    slices: tuple[SlicePlan, ...]
    feature_names: frozenset[str]
    llm: tuple[NumPlan, ...] = ()  # LLM signals, accumulated per prompt version
    # all numeric + categorical names in one C-level getter (one pass over a batch)
    columns: Callable[[Mapping[str, Any]], Any] | None = field(
        default=None, compare=False, repr=False
    )
    # where each feature's histogram lives in a group's flat numeric / categorical counts
    num_bins: tuple[slice, ...] = field(init=False, compare=False, repr=False)
    cat_bins: tuple[slice, ...] = field(init=False, compare=False, repr=False)
    num_index: Mapping[str, int] = field(init=False, compare=False, repr=False)
    cat_index: Mapping[str, int] = field(init=False, compare=False, repr=False)
    # the numeric features' values of one event as a tuple (None: fewer than 2 numeric),
    # their ranges as column vectors, and one getter per categorical feature
    num_getter: Callable[[Mapping[str, Any]], Any] | None = field(
        init=False, compare=False, repr=False
    )
    num_lo: FloatArray = field(init=False, compare=False, repr=False)
    num_hi: FloatArray = field(init=False, compare=False, repr=False)
    cat_getters: tuple[Callable[[Mapping[str, Any]], Any], ...] = field(
        init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        def spans(sizes: Sequence[int]) -> tuple[slice, ...]:
            ends = np.cumsum([0, *sizes]).tolist()
            return tuple(slice(a, b) for a, b in itertools.pairwise(ends))

        object.__setattr__(self, "num_bins", spans([p.edges.shape[0] + 1 for p in self.numeric]))
        object.__setattr__(
            self, "cat_bins", spans([len(c.categories) + 1 for c in self.categorical])
        )
        object.__setattr__(self, "num_index", {p.name: i for i, p in enumerate(self.numeric)})
        object.__setattr__(self, "cat_index", {c.name: i for i, c in enumerate(self.categorical)})
        object.__setattr__(self, "num_getter", _columns_getter([p.name for p in self.numeric]))
        object.__setattr__(self, "num_lo", np.array([[p.lo] for p in self.numeric], np.float64))
        object.__setattr__(self, "num_hi", np.array([[p.hi] for p in self.numeric], np.float64))
        object.__setattr__(self, "cat_getters", tuple(itemgetter(c.name) for c in self.categorical))

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @classmethod
    def compile(cls, model: ModelConfig, profile: Profile | None) -> ModelPlan:
        numeric: list[NumPlan] = []
        llm: list[NumPlan] = []
        categorical: list[CatPlan] = []
        for f in model.features:
            if f.type == "numeric":
                ref = profile.numeric.get(f.name) if profile else None
                if ref is not None:
                    edges = np.asarray(ref.edges, dtype=np.float64)
                elif f.range is not None:
                    edges = np.linspace(f.range[0], f.range[1], model.detectors.bins + 1)[1:-1]
                else:
                    edges = np.zeros(0, dtype=np.float64)
                lo, hi = f.range if f.range is not None else (-np.inf, np.inf)
                target = llm if is_llm_signal(f.name) else numeric
                target.append(NumPlan(f.name, edges, float(lo), float(hi), f.required))
            else:
                cref = profile.categorical.get(f.name) if profile else None
                cats = cref.categories if cref is not None else (f.categories or ())
                categorical.append(
                    CatPlan(
                        f.name,
                        tuple(cats),
                        {c: i for i, c in enumerate(cats)},
                        frozenset(f.categories) if f.categories is not None else None,
                        f.required,
                    )
                )
        if profile is not None and profile.score is not None:
            score_edges = np.asarray(profile.score.edges, dtype=np.float64)
        else:
            score_edges = DEFAULT_SCORE_EDGES
        if profile is not None and profile.labels is not None:
            labels = tuple(profile.labels.categories)
        elif model.task == "binary":
            labels = ("0", "1")
        else:
            labels = ()
        slices: list[SlicePlan] = []
        for s in model.slices:
            if s.values is not None:
                vals = s.values
            elif profile is not None and s.name in profile.categorical:
                vals = profile.categorical[s.name].categories[: s.max_values]
            else:
                vals = ()
            slices.append(SlicePlan(s.name, frozenset(vals)))
        return cls(
            model,
            profile,
            tuple(numeric),
            tuple(categorical),
            score_edges,
            labels,
            {c: i for i, c in enumerate(labels)},
            tuple(slices),
            frozenset(f.name for f in model.features),
            tuple(llm),
            _columns_getter([p.name for p in numeric] + [c.name for c in categorical]),
        )

    def slice_keys(self, ev: Prediction) -> tuple[str, ...]:
        """The bounded slice keys ``"dim=value"`` of one prediction (unknown → ``other``)."""
        out: list[str] = []
        sl = ev.slice
        for s in self.slices:
            v = sl.get(s.name) if sl is not None else None
            if v is None:
                fv = ev.features.get(s.name)
                v = None if fv is None else norm_target(fv)
            out.append(f"{s.name}={v if v in s.values else 'other'}")
        return tuple(out)

    def slice_key_columns(self, evs: Sequence[Prediction]) -> list[list[str]]:
        """:meth:`slice_keys` of many predictions, one list per slice dimension."""
        slcs: list[dict[str, str] | None] = list(map(_GET_SLICE, evs))
        has_none = None in slcs
        out: list[list[str]] = []
        for s in self.slices:
            if has_none:
                vals: list[Any] = [sl.get(s.name) if sl is not None else None for sl in slcs]
            else:
                vals = list(map(dict.get, slcs, repeat(s.name)))  # type: ignore[arg-type]
            if None in vals:
                vals = [
                    v if v is not None else _feature_slice_value(e, s.name)
                    for v, e in zip(vals, evs, strict=True)
                ]
            out.append(list(map(s.keys.get, vals, repeat(s.other))))
        return out


def _feature_slice_value(ev: Prediction, name: str) -> str | None:
    fv = ev.features.get(name)
    return None if fv is None else norm_target(fv)


def _columns_getter(names: Sequence[str]) -> Callable[[Mapping[str, Any]], Any] | None:
    """``itemgetter`` returning a tuple of ``names``' values (None when it cannot)."""
    if len(names) < 2:  # itemgetter of one name returns the value, not a 1-tuple
        return None
    return itemgetter(*names)


def _feature_columns(
    plan: ModelPlan, feats: Sequence[Mapping[str, Any]]
) -> tuple[list[Sequence[Any]], bool]:
    """Per-feature value columns (numeric plans first, then categorical; None = missing)
    and whether every event carries exactly the contract's features (no unexpected ones).

    Fast path: one C-level ``itemgetter`` pass and a transpose; an event missing a feature
    makes it fall back to one ``dict.get`` pass per feature.
    """
    getter = plan.columns
    if getter is not None and feats:
        try:
            cols: list[Sequence[Any]] = list(zip(*map(getter, feats), strict=True))
        except KeyError:
            pass
        else:
            # every event has all the names: no extra key iff every length equals them
            return cols, sum(map(len, feats)) == len(cols) * len(feats)
    names = [p.name for p in plan.numeric] + [c.name for c in plan.categorical]
    return [[f.get(name) for f in feats] for name in names], False


def _numeric_matrix(
    plan: ModelPlan, feats: Sequence[Mapping[str, Any]]
) -> tuple[FloatArray, list[Sequence[Any]]] | None:
    """The numeric features of a batch as one ``(features, events)`` array and the
    categorical value columns, when every event has every feature and every numeric value is
    a finite int or float (the common case); else None (the per-feature path handles it)."""
    getter = plan.num_getter
    if getter is None or not feats:
        return None
    try:
        rows = list(map(getter, feats))
        cat_cols: list[Sequence[Any]] = [list(map(g, feats)) for g in plan.cat_getters]
    except KeyError:
        return None
    if not _FINITE_TYPES.issuperset(map(type, itertools.chain.from_iterable(rows))):
        return None
    k = len(plan.numeric)
    flat = np.fromiter(itertools.chain.from_iterable(rows), np.float64, len(rows) * k)
    if not np.isfinite(flat).all():
        return None
    return np.ascontiguousarray(flat.reshape(len(rows), k).T), cat_cols


def _fold_matrix(plan: ModelPlan, mat: FloatArray, nhist: IntArray, nacc: FloatArray) -> None:
    """:func:`_fold_numeric` of every numeric feature at once (rows of ``mat``, all values
    finite): the same histograms and, bit for bit, the same moments (a row's ``sum`` and
    ``dot`` are those of the 1-D column; min/max are taken as ``min``/``max`` would)."""
    n = mat.shape[1]
    srt = np.sort(mat, axis=1)
    for i, p in enumerate(plan.numeric):
        span = plan.num_bins[i]
        # bounds[j] = #values < edge j (0 and n at the ends): the bin counts are its steps
        bounds = np.empty(span.stop - span.start + 1, np.int64)
        bounds[0] = 0
        bounds[-1] = n
        bounds[1:-1] = np.searchsorted(srt[i], p.edges, side="left")
        nhist[span] += bounds[1:] - bounds[:-1]
    sq = np.array([np.dot(row, row) for row in mat], np.float64)
    oor = np.count_nonzero((mat < plan.num_lo) | (mat > plan.num_hi), axis=1)
    nacc[:, _N] += n
    nacc[:, _SUM] += mat.sum(axis=1)
    nacc[:, _SQ] += sq
    mins, maxs = srt[:, 0], srt[:, -1]
    if not (mins.all() and maxs.all()):  # a zero: which of 0.0/-0.0 sorts first is arbitrary
        mins = np.array([row.min() for row in mat], np.float64)
        maxs = np.array([row.max() for row in mat], np.float64)
    cur = nacc[:, _MIN]
    nacc[:, _MIN] = np.where(mins < cur, mins, cur)  # as min(cur, m): cur unless m < cur
    cur = nacc[:, _MAX]
    nacc[:, _MAX] = np.where(maxs > cur, maxs, cur)
    nacc[:, _OOR] += oor


# --------------------------------------------------------------------------- accumulators


def _moments(arr: FloatArray) -> tuple[int, float, float, float, float]:
    if arr.shape[0] == 0:
        return 0, 0.0, 0.0, np.inf, -np.inf
    return (
        int(arr.shape[0]),
        float(arr.sum()),
        float(np.dot(arr, arr)),
        float(arr.min()),
        float(arr.max()),
    )


def _to_numeric(vals: Sequence[Any]) -> tuple[FloatArray, int, int]:
    """(array with NaN for missing/wrong type, n_missing, n_wrong_type)."""
    if _NUMERIC_TYPES.issuperset(map(type, vals)):
        missing = vals.count(None)
        return np.array(vals, dtype=np.float64), missing, 0
    out = np.full(len(vals), np.nan, dtype=np.float64)
    missing = wrong = 0
    for i, v in enumerate(vals):
        t = type(v)
        if t is float or t is int:
            out[i] = v
        elif v is None:
            missing += 1
        else:
            wrong += 1
    return out, missing, wrong


_NUMERIC_ZERO: Final = np.array([0, 0.0, 0.0, np.inf, -np.inf, 0, 0, 0, 0], np.float64)
_NO_FEATURES: Final[dict[str, list[Any]]] = {}  # shared empty (replaced on first write)
_NO_CALIB: Final = np.zeros((3, CALIB_BINS), np.float64)  # read only: no joined pairs yet
_NO_CALIB.flags.writeable = False


class GroupAcc:
    """Accumulator of one (model, version, slice) group within one tick.

    Features live in four arrays per group (not one pair of small arrays per feature): the
    numeric histograms back to back (``nhist``, spans ``plan.num_bins``), their moments
    (``nacc``, one row of ``n, sum, sumsq, min, max, missing, nan, out_of_range, wrong_type``
    per feature), the categorical histograms (``chist``, spans ``plan.cat_bins``) and their
    ``missing, wrong_type, not_allowed`` counters (``cextra``). Features a restored document
    carries that the plan does not know stay in ``num``/``cat`` (old layout) and are emitted
    after the plan's own.
    """

    __slots__ = (
        "calib",
        "cat",
        "cextra",
        "chist",
        "cost",
        "full",
        "joined",
        "lat",
        "llm",
        "n",
        "nacc",
        "nhist",
        "num",
        "plan",
        "prompts",
        "score",
        "unexpected",
    )

    def __init__(self, plan: ModelPlan, full: bool) -> None:
        self.plan = plan
        self.full = full
        self.n = 0
        k = plan.score_edges.shape[0] + 1
        self.score: list[Any] = [np.zeros(k, np.int64), 0, 0.0, 0.0]
        self.joined = [0, 0]  # n, errors
        self.calib: FloatArray | None = None  # n, positives, score sum (made by add_pair)
        self.num: dict[str, list[Any]] = _NO_FEATURES  # features the plan does not know
        self.cat: dict[str, list[Any]] = _NO_FEATURES
        self.nhist: IntArray | None = None
        self.nacc: FloatArray | None = None
        self.chist: IntArray | None = None
        self.cextra: IntArray | None = None
        self.lat: list[Any] = []
        self.cost = [0, 0.0]
        self.llm: list[Any] = []
        self.prompts: dict[str, list[Any]] = _NO_FEATURES  # version -> [n, {signal: [h, acc]}]
        self.unexpected = 0  # events carrying a feature the contract does not list
        if full:
            nb, cb = plan.num_bins, plan.cat_bins
            self.nhist = np.zeros(nb[-1].stop if nb else 0, np.int64)
            self.nacc = np.tile(_NUMERIC_ZERO, (len(plan.numeric), 1))
            self.chist = np.zeros(cb[-1].stop if cb else 0, np.int64)
            self.cextra = np.zeros((len(plan.categorical), 3), np.int64)
            self.lat = [np.zeros(LATENCY_EDGES_MS.shape[0] + 1, np.int64), 0, 0.0]
            self.llm = [0, 0, 0, 0, Counter()]

    # ----------------------------------------------------------------- folding

    def add_predictions(self, evs: Sequence[Prediction], plan: ModelPlan) -> None:
        self.n += len(evs)
        raw_scores: list[Any] = list(map(_GET_SCORE, evs))
        if None in raw_scores:
            raw_scores = [
                e.score if e.score is not None else _num_or_none(e.prediction) for e in evs
            ]
        scores, _, _ = _to_numeric(raw_scores)
        s = scores[np.isfinite(scores)]
        counts, _ = numeric_bin_counts(plan.score_edges, s)
        sc = self.score
        sc[0] += counts
        sc[1] += int(s.shape[0])
        sc[2] += float(s.sum())
        sc[3] += float(np.dot(s, s))
        if not self.full:
            return
        feats: list[dict[str, Any]] = list(map(_GET_FEATURES, evs))
        nnum = len(plan.numeric)
        nhist, nacc, chist, cextra = self.nhist, self.nacc, self.chist, self.cextra
        assert nhist is not None and nacc is not None and chist is not None
        assert cextra is not None
        fast = _numeric_matrix(plan, feats)
        if fast is not None:
            mat, cat_cols = fast
            exact = sum(map(len, feats)) == (nnum + len(cat_cols)) * len(feats)
            _fold_matrix(plan, mat, nhist, nacc)
        else:
            cols, exact = _feature_columns(plan, feats)
            for i, (p, col) in enumerate(zip(plan.numeric, cols, strict=False)):
                _fold_numeric(p, col, nhist[plan.num_bins[i]], nacc[i])
            cat_cols = cols[nnum:]
        if not exact:
            known = plan.feature_names
            self.unexpected += sum(1 for f in feats if not f.keys() <= known)
        for i, (c, col) in enumerate(zip(plan.categorical, cat_cols, strict=True)):
            hist = chist[plan.cat_bins[i]]
            k = hist.shape[0] - 1
            missing = wrong = not_allowed = 0
            for raw, cnt in Counter(col).items():
                if raw is None:
                    missing += cnt
                    continue
                t = type(raw)
                if t is str:
                    v: str = raw
                elif t is int or t is bool:
                    v = norm_target(raw)
                else:
                    wrong += cnt
                    continue
                hist[c.index.get(v, k)] += cnt
                if c.allowed is not None and v not in c.allowed:
                    not_allowed += cnt
            if missing or wrong or not_allowed:
                cextra[i] += (missing, wrong, not_allowed)
        lat, _, _ = _to_numeric(list(map(_GET_LATENCY, evs)))
        lat = lat[np.isfinite(lat)]
        if lat.shape[0]:
            self.lat[0] += numeric_bin_counts(LATENCY_EDGES_MS, lat)[0]
            self.lat[1] += int(lat.shape[0])
            self.lat[2] += float(lat.sum())
        costs = list(map(_GET_COST, evs))
        if None in costs:
            costs = [c for c in costs if c is not None]
        if costs:
            self.cost[0] += len(costs)
            self.cost[1] += float(np.sum(costs))
        llms: list[LLMInfo] = list(filter(None, map(_GET_LLM, evs)))  # LLMInfo is never empty
        if llms:
            lm = self.llm
            lm[0] += len(llms)
            for info in llms:
                lm[1] += info.input_tokens or 0
                lm[2] += info.output_tokens or 0
                lm[3] += info.retrieval_hits or 0
                if info.flags:
                    flags: Counter[str] = lm[4]
                    for name, on in info.flags.items():
                        if on and (name in flags or len(flags) < MAX_LLM_FLAGS):
                            flags[name] += 1
            if plan.llm:
                self._add_llm_signals(evs, plan)

    def _add_llm_signals(self, evs: Sequence[Prediction], plan: ModelPlan) -> None:
        by_prompt: dict[str, list[LLMInfo]] = {}
        for e in evs:
            info = e.llm
            if info is None:
                continue
            pv = info.prompt_version if info.prompt_version is not None else "-"
            known = pv in by_prompt or pv in self.prompts
            if not known and len(self.prompts.keys() | by_prompt.keys()) >= MAX_PROMPT_VERSIONS:
                pv = "other"
            by_prompt.setdefault(pv, []).append(info)
        for pv, infos in by_prompt.items():
            slot = self.prompts.get(pv)
            if slot is None:
                if self.prompts is _NO_FEATURES:
                    self.prompts = {}
                slot = self.prompts[pv] = [0, {p.name: _new_numeric(p) for p in plan.llm}]
            slot[0] += len(infos)
            for p in plan.llm:
                hist, acc = slot[1][p.name]
                _fold_numeric(p, _llm_values(p.name, infos), hist, acc)

    def add_pair(self, pair: JoinedPair, positive: str, task: str) -> None:
        self.joined[0] += 1
        if task != "regression" and pair.prediction != pair.label:
            self.joined[1] += 1
        sc = pair.score
        if sc is not None and 0.0 <= sc <= 1.0:
            b = min(int(sc * CALIB_BINS), CALIB_BINS - 1)
            calib = self.calib
            if calib is None:
                calib = self.calib = np.zeros((3, CALIB_BINS), np.float64)
            calib[0, b] += 1
            calib[1, b] += pair.label == positive
            calib[2, b] += sc

    # ----------------------------------------------------------------- (de)serialisation

    def to_doc(self) -> dict[str, Any]:
        sc = self.score
        calib = self.calib if self.calib is not None else _NO_CALIB
        doc: dict[str, Any] = {
            "n": self.n,
            "score": {"counts": sc[0].tolist(), "n": sc[1], "sum": sc[2], "sumsq": sc[3]},
            "joined": {
                "n": self.joined[0],
                "errors": self.joined[1],
                "calib_n": calib[0].astype(np.int64).tolist(),
                "calib_pos": calib[1].astype(np.int64).tolist(),
                "calib_score": calib[2].tolist(),
            },
        }
        if not self.full:
            return doc
        plan = self.plan
        nhist, nacc, chist, cextra = self.nhist, self.nacc, self.chist, self.cextra
        assert nhist is not None and nacc is not None and chist is not None
        assert cextra is not None
        feats: dict[str, Any] = {}
        for i, p in enumerate(plan.numeric):
            feats[p.name] = _numeric_doc(nhist[plan.num_bins[i]], nacc[i])
        for name, (hist, a) in self.num.items():
            feats[name] = _numeric_doc(hist, a)
        extras = cextra.tolist()
        for i, c in enumerate(plan.categorical):
            feats[c.name] = _categorical_doc(chist[plan.cat_bins[i]], extras[i])
        for name, (hist, extra) in self.cat.items():
            feats[name] = _categorical_doc(hist, extra)
        doc["features"] = feats
        doc["unexpected_features"] = self.unexpected
        doc["latency"] = {"counts": self.lat[0].tolist(), "n": self.lat[1], "sum": self.lat[2]}
        doc["cost"] = {"n": self.cost[0], "sum": self.cost[1]}
        lm = self.llm
        doc["llm"] = {
            "n": lm[0],
            "input_tokens": lm[1],
            "output_tokens": lm[2],
            "retrieval_hits": lm[3],
            "flags": dict(sorted(lm[4].items())),
        }
        if self.prompts:
            doc["llm"]["prompts"] = {
                pv: {"n": n, "signals": {k: _numeric_doc(h, a) for k, (h, a) in sig.items()}}
                for pv, (n, sig) in sorted(self.prompts.items())
            }
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], plan: ModelPlan) -> GroupAcc:
        acc = cls(plan, "features" in doc)
        acc.n = int(doc["n"])
        s = doc["score"]
        acc.score = [np.asarray(s["counts"], np.int64), s["n"], s["sum"], s["sumsq"]]
        j = doc["joined"]
        acc.joined = [j["n"], j["errors"]]
        acc.calib = np.array([j["calib_n"], j["calib_pos"], j["calib_score"]], np.float64)
        if not acc.full:
            return acc
        assert acc.nhist is not None and acc.nacc is not None and acc.chist is not None
        assert acc.cextra is not None
        for name, f in doc["features"].items():
            if f["type"] == "numeric":
                hist, a = _numeric_from_doc(f)
                i = plan.num_index.get(name)
                if i is not None and hist.shape[0] == acc.nhist[plan.num_bins[i]].shape[0]:
                    acc.nhist[plan.num_bins[i]] = hist
                    acc.nacc[i] = a
                else:  # a feature (or binning) this plan does not know: kept as it came
                    acc.num = acc.num if acc.num is not _NO_FEATURES else {}
                    acc.num[name] = [hist, a]
            else:
                hist = np.asarray(f["counts"], np.int64)
                extra = [f["missing"], f["wrong_type"], f["not_allowed"]]
                i = plan.cat_index.get(name)
                if i is not None and hist.shape[0] == acc.chist[plan.cat_bins[i]].shape[0]:
                    acc.chist[plan.cat_bins[i]] = hist
                    acc.cextra[i] = extra
                else:
                    acc.cat = acc.cat if acc.cat is not _NO_FEATURES else {}
                    acc.cat[name] = [hist, extra]
        lat = doc["latency"]
        acc.lat = [np.asarray(lat["counts"], np.int64), lat["n"], lat["sum"]]
        acc.cost = [doc["cost"]["n"], doc["cost"]["sum"]]
        acc.unexpected = int(doc.get("unexpected_features", 0))
        lm = doc["llm"]
        acc.llm = [
            lm["n"],
            lm["input_tokens"],
            lm["output_tokens"],
            lm["retrieval_hits"],
            Counter(lm["flags"]),
        ]
        acc.prompts = {
            pv: [int(d["n"]), {k: _numeric_from_doc(f) for k, f in d["signals"].items()}]
            for pv, d in lm.get("prompts", {}).items()
        }
        return acc


def _categorical_doc(hist: IntArray, extra: Sequence[int]) -> dict[str, Any]:
    return {
        "type": "categorical",
        "counts": hist.tolist(),
        "missing": extra[0],
        "wrong_type": extra[1],
        "not_allowed": extra[2],
    }


def _new_numeric(p: NumPlan) -> list[Any]:
    return [
        np.zeros(p.edges.shape[0] + 1, np.int64),
        np.array([0, 0.0, 0.0, np.inf, -np.inf, 0, 0, 0, 0], np.float64),
    ]


def _fold_numeric(p: NumPlan, vals: Sequence[Any], hist: IntArray, acc: FloatArray) -> None:
    """Fold raw values (None = missing) into a numeric histogram + moments accumulator."""
    arr, missing, wrong = _to_numeric(vals)
    fin = arr[np.isfinite(arr)]
    if p.edges.shape[0]:
        hist += numeric_bin_counts(p.edges, fin)[0]
    else:
        hist[0] += fin.shape[0]
    n, tot, sq, mn, mx = _moments(fin)
    acc[_N] += n
    acc[_SUM] += tot
    acc[_SQ] += sq
    acc[_MIN] = min(acc[_MIN], mn)
    acc[_MAX] = max(acc[_MAX], mx)
    acc[_MISS] += missing
    acc[_NAN] += arr.shape[0] - fin.shape[0] - missing - wrong
    acc[_WT] += wrong
    acc[_OOR] += int(np.count_nonzero((fin < p.lo) | (fin > p.hi)))


def _llm_values(name: str, infos: Sequence[LLMInfo]) -> list[Any]:
    """Values of one LLM signal (flags: 1.0 when set and true, else 0.0)."""
    if name.startswith("llm.flags."):
        flag = name[len("llm.flags.") :]
        return [1.0 if i.flags and i.flags.get(flag) else 0.0 for i in infos]
    attr = name[len("llm.") :]
    return [getattr(i, attr) for i in infos]


def _numeric_doc(hist: IntArray, a: FloatArray) -> dict[str, Any]:
    return {
        "type": "numeric",
        "counts": hist.tolist(),
        "n": int(a[_N]),
        "sum": float(a[_SUM]),
        "sumsq": float(a[_SQ]),
        "min": float(a[_MIN]) if a[_N] else None,
        "max": float(a[_MAX]) if a[_N] else None,
        "missing": int(a[_MISS]),
        "nan": int(a[_NAN]),
        "out_of_range": int(a[_OOR]),
        "wrong_type": int(a[_WT]),
    }


def _numeric_from_doc(f: Mapping[str, Any]) -> list[Any]:
    return [
        np.asarray(f["counts"], np.int64),
        np.array(
            [
                f["n"],
                f["sum"],
                f["sumsq"],
                np.inf if f["min"] is None else f["min"],
                -np.inf if f["max"] is None else f["max"],
                f["missing"],
                f["nan"],
                f["out_of_range"],
                f["wrong_type"],
            ],
            np.float64,
        ),
    ]


def _num_or_none(v: object) -> float | None:
    t = type(v)
    if t is float or t is int:
        return v  # type: ignore[return-value]
    return None


class ModelTickAcc:
    """All groups of one model in one tick, plus model-level label counters."""

    __slots__ = ("groups", "label_counts", "label_n", "label_pos", "late", "outcomes")

    def __init__(self, plan: ModelPlan) -> None:
        self.groups: dict[tuple[str, str], GroupAcc] = {}
        self.label_counts = np.zeros(len(plan.label_categories) + 1, np.int64)
        self.label_n = 0
        self.label_pos = 0
        self.late = 0
        self.outcomes: Counter[str] = Counter()

    def group(self, version: str, slice_key: str, plan: ModelPlan) -> GroupAcc:
        g = self.groups.get((version, slice_key))
        if g is None:
            g = self.groups[(version, slice_key)] = GroupAcc(plan, slice_key == "*")
        return g

    def add_label(self, norm_label: str, plan: ModelPlan) -> None:
        self.label_n += 1
        self.label_counts[plan.label_index.get(norm_label, len(plan.label_categories))] += 1
        if norm_label == plan.model.positive_label:
            self.label_pos += 1

    def add_labels(self, norm_label: str, count: int, plan: ModelPlan) -> None:
        """:meth:`add_label` ``count`` times (one label value, counted per batch)."""
        self.label_n += count
        self.label_counts[plan.label_index.get(norm_label, len(plan.label_categories))] += count
        if norm_label == plan.model.positive_label:
            self.label_pos += count

    def to_doc(self) -> dict[str, Any]:
        return {
            "late": self.late,
            "labels": {
                "n": self.label_n,
                "counts": self.label_counts.tolist(),
                "positives": self.label_pos,
                "outcomes": dict(sorted(self.outcomes.items())),
            },
            "groups": [
                {"version": v, "slice": s, **g.to_doc()}
                for (v, s), g in sorted(self.groups.items())
            ],
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], plan: ModelPlan) -> ModelTickAcc:
        acc = cls(plan)
        acc.late = int(doc["late"])
        lab = doc["labels"]
        acc.label_n = int(lab["n"])
        acc.label_counts = np.asarray(lab["counts"], np.int64)
        acc.label_pos = int(lab["positives"])
        acc.outcomes = Counter(lab["outcomes"])
        for g in doc["groups"]:
            acc.groups[(g["version"], g["slice"])] = GroupAcc.from_doc(g, plan)
        return acc
