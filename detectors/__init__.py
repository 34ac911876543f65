"""driftline.detectors: pure online drift tests and mergeable sketches (no I/O).

Importing the package registers every sequential detector, so ``build`` and ``load``
know all kinds:

>>> import detectors
>>> detectors.kinds()
['adwin', 'bernoulli_cusum', 'cusum', 'page_hinkley']
>>> det = detectors.build({"kind": "cusum", "target_mean": 0.0, "sigma": 1.0})
>>> type(det).__name__
'CUSUM'
"""

from detectors.adwin import ADWIN, ADWINSpec
from detectors.base import (
    Detection,
    Detector,
    Spec,
    SpecError,
    StateError,
    build,
    kinds,
    load,
    spec_from_dict,
)
from detectors.binary import BernoulliCUSUM, BernoulliCUSUMSpec
from detectors.cusum import CUSUM, CUSUMSpec, PageHinkley, PageHinkleySpec
from detectors.psi import PSI, PSIResult, PSISpec, WindowedCounts
from detectors.sketches import (
    Cardinality,
    FrequentItems,
    Histogram,
    Moments,
    QualityCounters,
    QuantileSketch,
)

__all__ = [
    "ADWIN",
    "CUSUM",
    "PSI",
    "ADWINSpec",
    "BernoulliCUSUM",
    "BernoulliCUSUMSpec",
    "CUSUMSpec",
    "Cardinality",
    "Detection",
    "Detector",
    "FrequentItems",
    "Histogram",
    "Moments",
    "PSIResult",
    "PSISpec",
    "PageHinkley",
    "PageHinkleySpec",
    "QualityCounters",
    "QuantileSketch",
    "Spec",
    "SpecError",
    "StateError",
    "WindowedCounts",
    "build",
    "kinds",
    "load",
    "spec_from_dict",
]
