"""The one interface every driftline detector shares.

A detector is built from a frozen, validated *spec* (a dataclass whose class
attribute ``kind`` names it), consumes either raw values (``update_many``) or
weighted summaries (``update(count, total, total_sq)``), returns the
:class:`Detection` objects it raised, and serialises to JSON-safe state with a
schema version (``to_state`` / ``from_state``) that round-trips exactly.

Nothing here does I/O.

>>> from detectors.base import SpecError, check_choice
>>> try:
...     check_choice("on_detect", "restart", ("reset", "continue"))
... except SpecError as err:
...     print(err)
on_detect: 'restart' is not valid; valid values: 'reset', 'continue'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

STATE_SCHEMA_VERSION = 1
"""Version of every ``to_state()`` payload; bumped on incompatible changes."""

ON_DETECT_CHOICES = ("reset", "continue")


class SpecError(ValueError):
    """A spec field is invalid. The message names the field and the valid values."""


class StateError(ValueError):
    """A state payload cannot be loaded (wrong kind, schema version or shape)."""


@dataclass(frozen=True, slots=True)
class Detection:
    """One alarm raised by a sequential detector.

    ``index`` is the 0-based position, in the detector's whole input stream
    (weighted inputs count ``count`` events), of the last event consumed when
    the alarm fired. ``reset`` says explicitly whether the detector restarted
    its statistic afterwards (``spec.on_detect == "reset"``); nothing resets
    silently.
    """

    detector: str
    index: int
    statistic: float
    threshold: float
    direction: str  # "up" | "down" | "change"
    reset: bool
    detail: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector,
            "index": self.index,
            "statistic": self.statistic,
            "threshold": self.threshold,
            "direction": self.direction,
            "reset": self.reset,
            "detail": dict(self.detail),
        }


# --------------------------------------------------------------------- validation helpers


def check_choice(field: str, value: object, choices: Sequence[object]) -> None:
    """Raise :class:`SpecError` naming ``field`` unless ``value`` is in ``choices``."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise SpecError(f"{field}: {value!r} is not valid; valid values: {valid}")


def check_number(
    field: str,
    value: object,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise :class:`SpecError` unless ``value`` is a finite number inside the bounds."""
    kind = "an integer" if integer else "a finite number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        raise SpecError(f"{field}: {value!r} is not {kind}")
    if not math.isfinite(value):
        raise SpecError(f"{field}: {value!r} is not {kind}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        op = ">" if lo_open else ">="
        raise SpecError(f"{field}: {value!r} must be {op} {lo}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        op = "<" if hi_open else "<="
        raise SpecError(f"{field}: {value!r} must be {op} {hi}")


# --------------------------------------------------------------------- specs and registry


@dataclass(frozen=True)
class Spec:
    """Base class of frozen detector specs. Subclasses set ``kind`` and override ``validate``."""

    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SpecError` naming the first invalid field."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, ``{"kind": ..., <fields>}``; ``spec_from_dict`` inverts it."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


SpecT = TypeVar("SpecT", bound=Spec)


@runtime_checkable
class Detector(Protocol):
    """What every sequential detector offers (ADWIN, CUSUM, Page-Hinkley, binary)."""

    @property
    def spec(self) -> Spec: ...

    @property
    def n_seen(self) -> int: ...

    def update(self, count: float, total: float, total_sq: float | None = None) -> list[Detection]:
        """Insert a weighted summary of ``count`` events with the given sum and sum of squares."""
        ...

    def update_many(self, values: npt.ArrayLike) -> list[Detection]:
        """Insert events one by one (vectorised); same result as calling per event."""
        ...

    def to_state(self) -> dict[str, Any]: ...


_SPECS: dict[str, type[Spec]] = {}
_BUILDERS: dict[str, Callable[[Any], Detector]] = {}
_LOADERS: dict[str, Callable[[Mapping[str, Any]], Detector]] = {}


def register(spec_cls: type[Spec], cls: Any) -> None:
    """Register detector class ``cls`` (built as ``cls(spec)``, loaded with ``cls.from_state``)."""
    _SPECS[spec_cls.kind] = spec_cls
    _BUILDERS[spec_cls.kind] = cls
    _LOADERS[spec_cls.kind] = cls.from_state


def kinds() -> list[str]:
    """Registered detector kinds, sorted."""
    return sorted(_SPECS)


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    """Build a spec from ``{"kind": ..., **params}``; errors name the kind or field."""
    kind = data.get("kind")
    if kind not in _SPECS:
        check_choice("kind", kind, kinds())
    spec_cls = _SPECS[str(kind)]
    names = [f.name for f in dataclasses.fields(spec_cls)]
    params = {k: v for k, v in data.items() if k != "kind"}
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise SpecError(
            f"{kind}.{unknown[0]}: unknown parameter; valid parameters: {', '.join(names)}"
        )
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    try:
        return spec_cls(**fixed)
    except TypeError as err:  # missing required field
        raise SpecError(f"{kind}: {err}") from None


def build(spec: Spec | Mapping[str, Any]) -> Detector:
    """Build a detector from a spec or its dict form."""
    if not isinstance(spec, Spec):
        spec = spec_from_dict(spec)
    return _BUILDERS[spec.kind](spec)


def load(state: Mapping[str, Any]) -> Detector:
    """Rebuild any registered detector from its ``to_state()`` payload."""
    kind = state.get("kind") if isinstance(state, Mapping) else None
    if kind not in _LOADERS:
        raise StateError(f"kind: {kind!r} is not a registered detector; valid: {kinds()}")
    return _LOADERS[str(kind)](state)


# --------------------------------------------------------------------- state helpers


def state_header(kind: str) -> dict[str, Any]:
    """The fields every state payload starts with."""
    return {"schema": STATE_SCHEMA_VERSION, "kind": kind}


def check_state(state: Mapping[str, Any], kind: str) -> None:
    """Raise :class:`StateError` unless ``state`` is a payload of ``kind`` at our schema version."""
    if not isinstance(state, Mapping):
        raise StateError(f"state: expected a mapping, got {type(state).__name__}")
    if state.get("kind") != kind:
        raise StateError(f"kind: expected {kind!r}, got {state.get('kind')!r}")
    if state.get("schema") != STATE_SCHEMA_VERSION:
        raise StateError(
            f"schema: version {state.get('schema')!r} is not supported "
            f"(this build reads {STATE_SCHEMA_VERSION})"
        )


def as_float_array(values: npt.ArrayLike, field: str = "values") -> npt.NDArray[np.float64]:
    """1-D float64 view of ``values``; raises ValueError naming ``field`` otherwise."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{field}: expected a 1-D array, got shape {arr.shape}")
    return arr


def finite_or_none(x: float) -> float | None:
    """JSON-safe float: non-finite values become ``None``."""
    return x if math.isfinite(x) else None
