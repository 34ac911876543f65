"""Fixtures shared by the worker integration tests."""

from __future__ import annotations

import pytest

from stream.config import MonitorConfig
from stream.demo import demo_config
from stream.profile import Profile


@pytest.fixture(scope="module")
def demo() -> tuple[MonitorConfig, Profile]:
    """The demo scenario's monitors config and reference profile (one per test module)."""
    return demo_config()
