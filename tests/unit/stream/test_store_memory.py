"""MemoryStore passes the StateStore contract."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from stream.store import MemoryStore, StateStore
from tests.unit.stream.store_contract import Factory, StoreContract


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def make_store(self) -> Factory:
        async def factory(clock: Callable[[], float]) -> StateStore:
            return MemoryStore(clock=clock)

        return factory


def test_unknown_stage_is_rejected_with_valid_values() -> None:
    import asyncio

    with pytest.raises(ValueError, match="valid values: ingest, detect"):
        asyncio.run(MemoryStore().claim("bogus", 0, "w"))
