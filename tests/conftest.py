"""Test configuration: the service fixtures live in tests/fixtures/services.py.

Hypothesis: no per-example deadline (this suite runs on small shared machines, where a
slow example is load, not a bug); under CI (``CI`` set) examples are derandomized so a
landing run is reproducible — explore locally with ``HYPOTHESIS_PROFILE=dev``.
"""

import os

from hypothesis import settings

settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)

pytest_plugins = ["tests.fixtures.services"]
