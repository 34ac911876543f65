"""The kill-switch HTTP API (stream/api.py) on a real aiohttp server on 127.0.0.1.

The worker side is replaced by recording fakes of ``send_request`` / ``get_state``; the
end-to-end path through Kafka and Redis is tests/integration/test_api_e2e.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from stream.api import (
    RateLimiter,
    api_request,
    kafka_send_request,
    killswitch_cli,
    make_api,
    read_token_file,
    store_get_state,
)
from stream.config import ServiceSettings
from stream.store import MemoryStore
from stream.worker import MANUAL_PREFIX

TOKEN = "tok-3f9a1c77e2b54d0e9d1f6a8b"
WRONG = "tok-wrong-0000000000000000"
BASE = "/api/v1/killswitch"
STATE = {
    "active": True,
    "action": "rollback",
    "target_version": "v1",
    "rule": None,
    "command_id": "fraud:killswitch:manual:1",
    "since": 1.0,
    "trips": 1,
    "releases": 0,
    "matches": {"concept-rollback": [[1.0, "fraud:v2:bernoulli_cusum:region=apac:1"]]},
    "cooldown_until": {"concept-rollback": 3601.0},
}


@dataclass
class Backend:
    """Recording fakes of the worker's callables."""

    states: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    sent: list[tuple[str, str, str | None, str, str]] = field(default_factory=list)
    fail: bool = False

    async def send(
        self, model: str, action: str, target: str | None, reason: str, operator: str
    ) -> str:
        if self.fail:
            raise ConnectionError("broker at 10.0.0.1:9092 unreachable")
        self.sent.append((model, action, target, reason, operator))
        return f"req-{len(self.sent)}"

    def get(self, model: str) -> Mapping[str, Any] | None:  # a plain callable works too
        return self.states.get(model)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _app(backend: Backend, token: str | None = TOKEN, **kw: Any) -> web.Application:
    return make_api(
        ServiceSettings(api_token=token),
        send_request=backend.send,
        get_state=backend.get,
        models=("fraud", "search_ranking"),
        **kw,
    )


def _serve(app: web.Application, test: Callable[[TestClient[Any, Any]], Awaitable[None]]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await test(client)

    asyncio.run(main())


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


TRIP = {"action": "rollback", "target_version": "v1", "reason": "bad release", "operator": "al"}


# --------------------------------------------------------------------------- auth


def test_trip_with_the_token_sends_one_request_and_answers_202() -> None:
    backend = Backend()

    async def test(client: TestClient[Any, Any]) -> None:
        resp = await client.post(f"{BASE}/fraud/trip", json=TRIP, headers=_auth())
        assert resp.status == 202
        doc = await resp.json()
        assert doc["request_id"] == "req-1"
        assert (doc["model_id"], doc["action"], doc["status"]) == ("fraud", "rollback", "requested")
        assert doc["status_url"] == f"{BASE}/fraud"
        resp = await client.post(f"{BASE}/fraud/release", json={"reason": "fixed"}, headers=_auth())
        assert resp.status == 202
        assert (await resp.json())["action"] == "release"

    _serve(_app(backend), test)
    assert backend.sent == [
        ("fraud", "rollback", "v1", "bad release", "al"),
        ("fraud", "release", None, "fixed", "api"),
    ]


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, None),
        ({"Authorization": ""}, None),
        ({"Authorization": "Bearer"}, None),
        ({"Authorization": "Bearer   "}, None),
        ({"Authorization": f"Basic {TOKEN}"}, None),
        ({"Authorization": TOKEN}, None),
        ({"Authorization": f"Bearer {WRONG}"}, "invalid_token"),
        ({"Authorization": f"Bearer {TOKEN[:-1]}"}, "invalid_token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "invalid_token"),
        ({"Authorization": f"Bearer {TOKEN.upper()}"}, "invalid_token"),
        ({"Authorization": "Bearer tök-ünicode"}, "invalid_token"),
    ],
)
def test_missing_or_wrong_token_is_401_with_www_authenticate(
    headers: dict[str, str], error: str | None
) -> None:
    backend = Backend(states={"fraud": STATE})

    async def test(client: TestClient[Any, Any]) -> None:
        for method, path, body in (
            ("POST", f"{BASE}/fraud/trip", TRIP),
            ("POST", f"{BASE}/fraud/release", {"reason": "x"}),
            ("GET", f"{BASE}/fraud", None),
        ):
            resp = await client.request(method, path, json=body, headers=headers)
            assert resp.status == 401, (method, path)
            challenge = resp.headers["WWW-Authenticate"]
            assert challenge.startswith('Bearer realm="driftline"')
            assert (f'error="{error}"' in challenge) == (error is not None)
            doc = await resp.json()
            assert doc["status"] == 401 and "state" not in doc

    _serve(_app(backend), test)
    assert backend.sent == []


def test_bearer_scheme_is_case_insensitive() -> None:
    backend = Backend()

    async def test(client: TestClient[Any, Any]) -> None:
        resp = await client.post(
            f"{BASE}/fraud/trip", json=TRIP, headers={"Authorization": f"bearer {TOKEN}"}
        )
        assert resp.status == 202

    _serve(_app(backend), test)
    assert len(backend.sent) == 1


def test_no_token_configured_disables_mutations_never_opens_them() -> None:
    backend = Backend(states={"fraud": STATE})

    async def test(client: TestClient[Any, Any]) -> None:
        for headers in ({}, _auth(), _auth("")):
            for path, body in ((f"{BASE}/fraud/trip", TRIP), (f"{BASE}/fraud/release", {})):
                resp = await client.post(path, json=body, headers=headers)
                assert resp.status == 403
                msg = (await resp.json())["error"]
                assert "disabled" in msg and "DRIFTLINE_API_TOKEN" in msg
        resp = await client.get(f"{BASE}/fraud")  # read-only status stays available
        assert resp.status == 200
        assert (await resp.json())["state"]["active"] is True

    for token in (None, ""):
        _serve(_app(backend, token=token), test)
    assert backend.sent == []


def test_status_shows_the_state_without_rule_history() -> None:
    backend = Backend(states={"fraud": STATE})

    async def test(client: TestClient[Any, Any]) -> None:
        resp = await client.get(f"{BASE}/fraud", headers=_auth())
        assert resp.status == 200
        doc = await resp.json()
        assert doc["model_id"] == "fraud"
        assert doc["state"] == {
            k: v for k, v in STATE.items() if k not in ("matches", "cooldown_until")
        }
        resp = await client.get(f"{BASE}/search_ranking", headers=_auth())
        assert (await resp.json()) == {"model_id": "search_ranking", "state": None}

    _serve(_app(backend), test)


# --------------------------------------------------------------------------- models


def test_unknown_model_is_404_naming_it_and_nothing_else() -> None:
    backend = Backend()

    async def test(client: TestClient[Any, Any]) -> None:
        for method, path, body in (
            ("GET", f"{BASE}/credit", None),
            ("POST", f"{BASE}/credit/trip", TRIP),
            ("POST", f"{BASE}/credit/release", {"reason": "x"}),
        ):
            resp = await client.request(method, path, json=body, headers=_auth())
            assert resp.status == 404
            msg = (await resp.json())["error"]
            assert "'credit'" in msg
            assert "fraud" not in msg and "search_ranking" not in msg
            # unauthenticated callers cannot probe which models exist
            resp = await client.request(method, path, json=body)
            assert resp.status == 401

    _serve(_app(backend), test)
    assert backend.sent == []


def test_invalid_model_id_is_400_and_not_echoed() -> None:
    backend = Backend()

    async def test(client: TestClient[Any, Any]) -> None:
        resp = await client.post(f"{BASE}/_evil%3Cscript%3E/trip", json=TRIP, headers=_auth())
        assert resp.status == 400
        msg = (await resp.json())["error"]
        assert msg.startswith("model:") and "<script>" not in msg

    _serve(_app(backend), test)
    assert backend.sent == []


# --------------------------------------------------------------------------- validation


TV = "target_version"
FIELDS = "action, target_version, reason, operator"


@pytest.mark.parametrize(
    ("path", "body", "field", "valid"),
    [
        ("trip", b"not json", "body", "JSON object"),
        ("trip", b"", "body", FIELDS),
        ("trip", b"[1, 2]", "body", FIELDS),
        ("trip", {"reason": "x"}, "action", "rollback, fallback, throttle"),
        ("trip", {"action": "release", "reason": "x"}, "action", "rollback, fallback, throttle"),
        ("trip", {"action": "nuke", "reason": "x"}, "action", "rollback, fallback, throttle"),
        ("trip", {"action": 3, "reason": "x"}, "action", "rollback, fallback, throttle"),
        ("trip", {"action": "rollback", "reason": "x"}, "target_version", "rollback"),
        ("trip", {"action": "fallback", "target_version": 2, "reason": "x"}, TV, "string"),
        ("trip", {"action": "fallback", "target_version": "v" * 65, "reason": "x"}, TV, "64"),
        ("trip", {"action": "fallback"}, "reason", "non-empty string"),
        ("trip", {"action": "fallback", "reason": "  "}, "reason", "non-empty string"),
        ("trip", {"action": "fallback", "reason": ["x"]}, "reason", "string"),
        ("trip", {"action": "fallback", "reason": "x" * 501}, "reason", "500"),
        ("trip", {"action": "fallback", "reason": "a\nFAKE LOG LINE"}, "reason", "control"),
        ("trip", {"action": "fallback", "reason": "x", "operator": 7}, "operator", "string"),
        ("trip", {"action": "fallback", "reason": "x", "force": True}, "force", FIELDS),
        ("release", {}, "reason", "non-empty string"),
        ("release", {"reason": "x", "action": "rollback"}, "action", "reason, operator"),
        ("release", b"{", "body", "JSON object"),
    ],
)  # fmt: skip
def test_bad_bodies_are_400_naming_the_field_and_valid_values(
    path: str, body: Any, field: str, valid: str
) -> None:
    backend = Backend()

    async def test(client: TestClient[Any, Any]) -> None:
        kw: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        resp = await client.post(f"{BASE}/fraud/{path}", headers=_auth(), **kw)
        assert resp.status == 400
        msg = (await resp.json())["error"]
        assert msg.startswith(f"{field}:"), msg
        assert valid in msg, msg

    _serve(_app(backend), test)
    assert backend.sent == []


def test_oversized_body_is_413() -> None:
    backend = Backend()

    async def test(client: TestClient[Any, Any]) -> None:
        body = orjson.dumps({**TRIP, "reason": "x" * 20_000})
        resp = await client.post(f"{BASE}/fraud/trip", data=body, headers=_auth())
        assert resp.status == 413

    _serve(_app(backend), test)
    assert backend.sent == []


def test_fallback_and_throttle_need_no_target_version() -> None:
    backend = Backend()

    async def test(client: TestClient[Any, Any]) -> None:
        for action in ("fallback", "throttle"):
            body = {"action": action, "reason": "p95 latency"}
            resp = await client.post(f"{BASE}/fraud/trip", json=body, headers=_auth())
            assert resp.status == 202

    _serve(_app(backend, rate_limit=10), test)
    assert [s[1:3] for s in backend.sent] == [("fallback", None), ("throttle", None)]


# --------------------------------------------------------------------------- rate limit


def test_rate_limit_per_model_is_429_with_retry_after() -> None:
    backend = Backend()
    clock = Clock()

    async def test(client: TestClient[Any, Any]) -> None:
        async def trip(model: str) -> ClientResponse:
            return await client.post(f"{BASE}/{model}/trip", json=TRIP, headers=_auth())

        assert (await trip("fraud")).status == 202
        clock.t += 10
        resp = await client.post(f"{BASE}/fraud/release", json={"reason": "x"}, headers=_auth())
        assert resp.status == 202
        clock.t += 10
        limited = await trip("fraud")  # third mutation within 60 s
        assert limited.status == 429
        assert limited.headers["Retry-After"] == "40"
        msg = (await limited.json())["error"]
        assert "2 trip/release requests per 60 s" in msg and "'fraud'" in msg
        assert (await trip("search_ranking")).status == 202  # per model
        # validation errors and refused calls do not use up the budget of others
        clock.t += 40.5  # the first request left the window
        assert (await trip("fraud")).status == 202
        assert (await trip("fraud")).status == 429

    _serve(_app(backend, rate_limit=2, rate_window_s=60.0, clock=clock), test)
    assert [s[:2] for s in backend.sent] == [
        ("fraud", "rollback"),
        ("fraud", "release"),
        ("search_ranking", "rollback"),
        ("fraud", "rollback"),
    ]


def test_rate_limiter_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="rate_limit"):
        RateLimiter(0, 60.0)
    with pytest.raises(ValueError, match="rate_window_s"):
        RateLimiter(1, 0.0)


# --------------------------------------------------------------------------- failures


def test_send_or_state_failure_is_503_without_details() -> None:
    backend = Backend(fail=True)

    def broken_state(model: str) -> Mapping[str, Any] | None:
        raise ConnectionError("redis://:hunter2@10.0.0.2:6379 refused")

    app = make_api(
        ServiceSettings(api_token=TOKEN),
        send_request=backend.send,
        get_state=broken_state,
        models=("fraud",),
    )

    async def test(client: TestClient[Any, Any]) -> None:
        resp = await client.post(f"{BASE}/fraud/trip", json=TRIP, headers=_auth())
        assert resp.status == 503
        text = await resp.text()
        assert "10.0.0.1" not in text and "unreachable" not in text
        resp = await client.get(f"{BASE}/fraud", headers=_auth())
        assert resp.status == 503
        assert "hunter2" not in await resp.text()

    _serve(app, test)


# --------------------------------------------------------------------------- logging


def test_requests_are_logged_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    backend = Backend(states={"fraud": STATE})
    caplog.set_level(logging.DEBUG)

    async def test(client: TestClient[Any, Any]) -> None:
        await client.post(f"{BASE}/fraud/trip", json=TRIP, headers=_auth())
        await client.post(f"{BASE}/fraud/trip", json=TRIP, headers=_auth(WRONG))
        await client.post(f"{BASE}/fraud/trip", json=TRIP, headers={"Authorization": TOKEN})
        await client.post(f"{BASE}/fraud/release", json={"reason": "ok now"}, headers=_auth())
        await client.post(f"{BASE}/fraud/trip", json={"action": "x"}, headers=_auth())
        await client.post(f"{BASE}/credit/trip", json=TRIP, headers=_auth())
        await client.get(f"{BASE}/fraud", headers=_auth())
        for _ in range(6):  # into the rate limit
            await client.post(f"{BASE}/fraud/release", json={"reason": "r"}, headers=_auth())
        # a forged log line in the path (no token: logged as refused) stays on one line
        await client.post(f"{BASE}/fraud%0AFORGED%20LINE/trip", json=TRIP)

    _serve(_app(backend), test)
    text = caplog.text
    assert TOKEN not in text and WRONG not in text and "Bearer" not in text
    api_records = [r for r in caplog.records if r.name == "driftline.api"]
    messages = [r.getMessage() for r in api_records]
    assert any("rollback requested for fraud" in m and "'bad release'" in m for m in messages)
    assert any("release requested for fraud" in m and "'ok now'" in m for m in messages)
    assert sum("invalid token" in m for m in messages) == 1
    assert sum("missing bearer token" in m for m in messages) == 2
    assert "\nFORGED" not in text and "FORGED" in text
    assert any("rate limited release fraud" in m for m in messages)
    for r in api_records:  # nothing of the request's secrets in the structured parts either
        assert TOKEN not in repr(r.args) and WRONG not in repr(r.args)


# --------------------------------------------------------------------------- glue and client


def test_kafka_send_request_publishes_the_clis_manual_request() -> None:
    class Producer:
        def __init__(self) -> None:
            self.sent: list[tuple[str, bytes, bytes]] = []

        async def send_and_wait(self, topic: str, *, value: bytes, key: bytes) -> None:
            self.sent.append((topic, value, key))

    producer = Producer()
    send = kafka_send_request(producer, "t.summaries")
    rid: Any = asyncio.run(send("fraud", "rollback", "v1", "bad", "alice"))  # type: ignore[arg-type]
    [(topic, value, key)] = producer.sent
    assert (topic, key) == ("t.summaries", b"fraud")
    assert value.startswith(MANUAL_PREFIX)
    doc = orjson.loads(value)
    assert doc["request_id"] == rid
    assert (doc["model_id"], doc["action"], doc["target_version"]) == ("fraud", "rollback", "v1")
    assert doc["reason"].startswith("bad") and "alice" in doc["reason"]


def test_store_get_state_reads_the_mirror() -> None:
    store = MemoryStore()
    get = store_get_state(store)

    async def main() -> tuple[Any, Any]:
        before = await get("fraud")  # type: ignore[misc]
        await store.set_killswitch("fraud", orjson.dumps(STATE))
        return before, await get("fraud")  # type: ignore[misc]

    assert asyncio.run(main()) == (None, STATE)


def test_api_request_client_against_the_server(tmp_path: Path) -> None:
    backend = Backend(states={"fraud": STATE})
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")

    async def test(client: TestClient[Any, Any]) -> None:
        url = str(client.make_url("/")).rstrip("/")
        loop = asyncio.get_running_loop()
        token = read_token_file(token_file)

        def call(op: str, **kw: Any) -> tuple[int, dict[str, Any]]:
            return api_request(url, op, "fraud", **kw)

        status, doc = await loop.run_in_executor(None, lambda: call("status", token=token))
        assert status == 200 and doc["state"]["target_version"] == "v1"
        status, doc = await loop.run_in_executor(
            None,
            lambda: call("rollback", token=token, reason="r", target_version="v1", operator="cli"),
        )
        assert status == 202 and doc["request_id"] == "req-1"
        status, doc = await loop.run_in_executor(None, lambda: call("release", token=WRONG))
        assert status == 401 and doc["error"] == "invalid token"
        status, doc = await loop.run_in_executor(None, lambda: call("throttle", token=token))
        assert status == 400 and doc["error"].startswith("reason:")

    _serve(_app(backend), test)
    assert backend.sent == [("fraud", "rollback", "v1", "r", "cli")]


def test_api_request_and_token_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="op: 'nuke' is not valid; valid values: status"):
        api_request("http://127.0.0.1:1", "nuke", "fraud", token=TOKEN)
    with pytest.raises(ValueError, match="--api: 'file:///etc/passwd'"):
        api_request("file:///etc/passwd", "status", "fraud", token=TOKEN)
    with pytest.raises(ValueError, match=r"--token-file: cannot read .*missing"):
        read_token_file(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token_file(tmp_path / "empty")


class Applying(Backend):
    """A backend whose worker applies each request: the mirror's counters go up."""

    async def send(
        self, model: str, action: str, target: str | None, reason: str, operator: str
    ) -> str:
        rid = await super().send(model, action, target, reason, operator)
        old = dict(self.states.get(model) or {"trips": 0, "releases": 0})
        key = "releases" if action == "release" else "trips"
        self.states[model] = {**old, key: old[key] + 1, "active": action != "release"}
        return rid


def test_killswitch_cli_over_the_api(tmp_path: Path) -> None:
    backend = Applying()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    wrong_file = tmp_path / "wrong"
    wrong_file.write_text(WRONG)
    lines: list[str] = []
    errors: list[str] = []

    async def test(client: TestClient[Any, Any]) -> None:
        url = str(client.make_url("/")).rstrip("/")
        loop = asyncio.get_running_loop()

        def cli(op: str, token: Path | None = token_file, **kw: Any) -> int:
            return killswitch_cli(
                op, "fraud", api=url, token_file=None if token is None else str(token),
                out=lines.append, err=errors.append, poll_s=0.05, **kw,
            )  # fmt: skip

        async def run(op: str, **kw: Any) -> int:
            return await loop.run_in_executor(None, lambda: cli(op, **kw))

        assert await run("status") == 0
        assert lines[-1] == "fraud: no kill-switch state (never tripped)"
        assert await run("throttle", reason="cost spike", operator="bob", wait_s=5) == 0
        assert lines[-2] == "fraud: throttle requested (request req-1)"
        assert orjson.loads(lines[-1])["trips"] == 1
        assert await run("release", reason="ok", wait_s=0) == 0
        assert await run("status") == 0
        assert orjson.loads(lines[-1])["active"] is False
        n = len(backend.sent)
        assert await run("release", token=wrong_file, reason="x") == 1
        assert errors[-1] == "driftline killswitch: HTTP 401: invalid token"
        assert await run("rollback", reason="x") == 1  # no target version
        assert errors[-1].startswith("driftline killswitch: HTTP 400: target_version:")
        assert await run("status", token=tmp_path / "missing") == 2
        assert len(backend.sent) == n

    _serve(_app(backend), test)
    assert backend.sent[0] == ("fraud", "throttle", None, "cost spike", "bob")
    assert TOKEN not in "\n".join(lines + errors)


def test_killswitch_cli_reports_a_request_not_applied_in_time(tmp_path: Path) -> None:
    backend = Backend()  # accepts, never applies
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    errors: list[str] = []

    async def test(client: TestClient[Any, Any]) -> None:
        url = str(client.make_url("/")).rstrip("/")
        rc = await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: killswitch_cli(
                "fallback", "fraud", api=url, token_file=str(token_file), reason="r",
                wait_s=0.3, poll_s=0.05, out=lambda _: None, err=errors.append,
            ),
        )  # fmt: skip
        assert rc == 1

    _serve(_app(backend), test)
    assert errors == ["fraud: not applied within 0.3 s (is a worker running?)"]
    assert len(backend.sent) == 1


def test_killswitch_cli_unreachable_api() -> None:
    errors: list[str] = []
    rc = killswitch_cli(
        "status", "fraud", api="http://127.0.0.1:9", token_file=None,
        out=lambda _: None, err=errors.append,
    )  # fmt: skip
    assert rc == 1 and errors[0].startswith("driftline killswitch: error: cannot reach")
