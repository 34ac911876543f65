"""The kill-switch HTTP API: status, manual trip and release of a model's kill switch.

Routes (``prefix`` defaults to ``/api/v1``)::

    GET  /api/v1/killswitch/{model}          → 200 {"model_id", "state": {...} | null}
    POST /api/v1/killswitch/{model}/trip     {"action": "rollback|fallback|throttle",
                                              "target_version": "v1", "reason": "...",
                                              "operator": "alice"}          → 202
    POST /api/v1/killswitch/{model}/release  {"reason": "...", "operator": "alice"} → 202

A trip or release is *requested*, not applied, when the call returns: the API hands it to
``send_request``, which in the worker wraps the manual-request path of
``driftline killswitch`` (a message on the summaries topic keyed by model id, applied
exactly once by the stage-2 partition that owns the model). The 202 answer carries the
request id; ``GET`` shows the state once stage 2 applied it (``trips`` / ``releases``
counters go up).

Security (``docs/security.md``):

* ``Authorization: Bearer <token>``, compared in constant time (:func:`hmac.compare_digest`
  on bytes) with ``settings.api_token`` (``DRIFTLINE_API_TOKEN`` or
  ``DRIFTLINE_API_TOKEN_FILE``). A missing or wrong token → 401 with ``WWW-Authenticate``.
  With a token configured, ``GET`` needs it too.
* No token configured → ``trip`` and ``release`` answer 403 and are never open; ``GET``
  stays available (read-only, the same information as the ``driftline_killswitch_active``
  gauge on ``/metrics`` of the same server).
* The model must be in the monitor config (404 naming it, listing nothing else); checked
  after authentication, so unauthenticated callers cannot probe which models exist.
* Bodies are JSON objects of at most 16 KiB; errors (400) name the field and its valid
  values; unknown fields are refused.
* A per-process, per-model rate limit on trip + release (default 5 per 60 s → 429 with
  ``Retry-After``).
* Every call is logged (logger ``driftline.api``) with method, model, outcome, remote
  address, reason and operator — never the token or the ``Authorization`` header.

Binding: the API has no listener of its own. The worker mounts it on its own web server,
which listens on ``settings.web_bind`` (``DRIFTLINE_WEB_BIND``, default ``127.0.0.1:6066``,
next to ``/healthz``, ``/readyz`` and ``/metrics``); keep that address private and restrict
callers with the NetworkPolicy. To mount, either add the worker's routes to the app that
:func:`make_api` returns, or ``app.add_subapp("/api/v1", make_api(..., prefix=""))``.
:func:`kafka_send_request` and :func:`store_get_state` build the two callables from the
worker's producer and state store.

:func:`api_request` is the client side (``driftline killswitch ... --api URL
--token-file F``).
"""

from __future__ import annotations

import getpass
import hmac
import inspect
import json
import logging
import math
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote

import orjson
from aiohttp import web

from stream.config import ServiceSettings
from stream.events import MODEL_ID_RE

log = logging.getLogger("driftline.api")

API_PREFIX: Final = "/api/v1"
TRIP_ACTIONS: Final = ("rollback", "fallback", "throttle")
TRIP_FIELDS: Final = ("action", "target_version", "reason", "operator")
RELEASE_FIELDS: Final = ("reason", "operator")
STATE_FIELDS: Final = (
    "active",
    "action",
    "target_version",
    "rule",
    "command_id",
    "since",
    "trips",
    "releases",
)
"""Kill-switch state fields shown by ``GET`` (rule match history and cooldowns are not)."""
MAX_BODY_BYTES: Final = 16 * 1024
MAX_REASON_CHARS: Final = 500
MAX_NAME_CHARS: Final = 64
REALM: Final = "driftline"

T = TypeVar("T")
SendRequest = Callable[[str, str, str | None, str, str], Awaitable[str] | str]
"""``send_request(model, action, target_version, reason, operator) -> request id``."""
GetState = Callable[[str], Awaitable[Mapping[str, Any] | None] | Mapping[str, Any] | None]
"""``get_state(model) -> kill-switch state (the Redis mirror) or None``."""


class RateLimiter:
    """At most ``limit`` events per ``window_s`` seconds per key (sliding window).

    >>> t = [0.0]
    >>> rl = RateLimiter(2, 60.0, clock=lambda: t[0])
    >>> rl.acquire("fraud"), rl.acquire("fraud"), rl.acquire("fraud"), rl.acquire("other")
    (0.0, 0.0, 60.0, 0.0)
    >>> t[0] = 60.5
    >>> rl.acquire("fraud")
    0.0
    """

    def __init__(
        self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 1:
            raise ValueError(f"rate_limit: {limit!r} must be >= 1")
        if not window_s > 0:
            raise ValueError(f"rate_window_s: {window_s!r} must be > 0")
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._hits: dict[str, deque[float]] = {}

    def acquire(self, key: str) -> float:
        """Record one event for ``key`` and return 0, or return the seconds to wait
        (nothing recorded) when the key is over its limit."""
        now = self.clock()
        hits = self._hits.setdefault(key, deque())
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        if len(hits) >= self.limit:
            return max(0.0, hits[0] + self.window_s - now)
        hits.append(now)
        return 0.0


async def _maybe_await(value: Awaitable[T] | T) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status, headers=headers)


def _remote(request: web.Request) -> str:
    return request.remote or "-"


def make_api(
    settings: ServiceSettings,
    *,
    send_request: SendRequest,
    get_state: GetState,
    models: Collection[str],
    rate_limit: int = 5,
    rate_window_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
    prefix: str = API_PREFIX,
) -> web.Application:
    """The kill-switch API as an aiohttp application (routes in the module docstring).

    ``models``: the model ids of the monitor config (anything else → 404).
    ``send_request`` and ``get_state`` may be plain or async callables.
    ``rate_limit`` trips + releases per model per ``rate_window_s`` seconds (this process).
    """
    token: bytes | None = settings.api_token.encode() if settings.api_token else None
    known = frozenset(models)
    limiter = RateLimiter(rate_limit, rate_window_s, clock)

    def authorize(request: web.Request, mutating: bool) -> web.Response | None:
        """None when the caller may proceed, else the error response (logged)."""
        what = f"{request.method} {request.raw_path[:200]!r}"  # raw: no decoded newlines
        if token is None:
            if not mutating:
                return None
            log.warning("killswitch API: refused %s from %s: API disabled", what, _remote(request))
            return _error(
                403,
                "the kill-switch API is disabled: no API token is configured (set "
                "DRIFTLINE_API_TOKEN or DRIFTLINE_API_TOKEN_FILE on the worker); use "
                "`driftline killswitch` instead",
            )
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if not header or scheme.lower() != "bearer" or not presented.strip():
            log.warning(
                "killswitch API: refused %s from %s: missing bearer token", what, _remote(request)
            )
            return _error(
                401,
                "authentication required: send 'Authorization: Bearer <token>'",
                **{"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        if not hmac.compare_digest(presented.strip().encode(), token):
            log.warning("killswitch API: refused %s from %s: invalid token", what, _remote(request))
            return _error(
                401,
                "invalid token",
                **{"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
            )
        return None

    def model_of(request: web.Request) -> tuple[str, web.Response | None]:
        model = request.match_info["model"]
        if MODEL_ID_RE.fullmatch(model) is None:
            return model, _error(
                400,
                "model: not a valid model id (1-64 characters [A-Za-z0-9_.-] starting with a "
                "letter or digit)",
            )
        if model not in known:
            return model, _error(404, f"model: {model!r} is not monitored by this worker")
        return model, None

    async def body_of(
        request: web.Request, allowed: tuple[str, ...]
    ) -> tuple[dict[str, Any], web.Response | None]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return {}, _error(413, f"body: larger than {MAX_BODY_BYTES} bytes")
        try:
            doc = orjson.loads(raw) if raw.strip() else None
        except orjson.JSONDecodeError:
            return {}, _error(400, "body: not valid JSON; expected a JSON object")
        if not isinstance(doc, dict):
            return {}, _error(
                400, f"body: expected a JSON object with the fields {', '.join(allowed)}"
            )
        unknown = sorted(k for k in doc if k not in allowed)
        if unknown:
            return {}, _error(
                400,
                f"{str(unknown[0])[:MAX_NAME_CHARS]}: unknown field; valid fields: "
                f"{', '.join(allowed)}",
            )
        return doc, None

    def text_field(
        doc: Mapping[str, Any], name: str, *, required: bool, max_chars: int
    ) -> tuple[str | None, web.Response | None]:
        v = doc.get(name)
        if v is None:
            if required:
                return None, _error(400, f"{name}: required; a non-empty string")
            return None, None
        if not isinstance(v, str) or not v.strip():
            return None, _error(400, f"{name}: expected a non-empty string")
        if len(v) > max_chars:
            return None, _error(400, f"{name}: longer than {max_chars} characters")
        if any(ord(c) < 32 and c not in "\t" for c in v):
            return None, _error(400, f"{name}: control characters are not allowed")
        return v.strip(), None

    async def request_change(  # noqa: PLR0917
        request: web.Request,
        model: str,
        action: str,
        target: str | None,
        reason: str,
        operator: str | None,
    ) -> web.Response:
        who = operator or "api"
        wait = limiter.acquire(model)
        if wait > 0:
            log.warning(
                "killswitch API: rate limited %s %s from %s (operator %r, reason %r)",
                action,
                model,
                _remote(request),
                who,
                reason,
            )
            return _error(
                429,
                f"rate limit: at most {limiter.limit} trip/release requests per "
                f"{limiter.window_s:g} s for model {model!r}; retry in {math.ceil(wait)} s",
                **{"Retry-After": str(max(1, math.ceil(wait)))},
            )
        try:
            request_id = await _maybe_await(send_request(model, action, target, reason, who))
        except Exception as err:
            log.error(
                "killswitch API: %s %s from %s could not be sent (%s)",
                action,
                model,
                _remote(request),
                type(err).__name__,
            )
            return _error(503, f"the {action} request could not be sent; retry later")
        log.warning(
            "killswitch API: %s requested for %s (target %s) by %r from %s, reason %r: request %s",
            action,
            model,
            target,
            who,
            _remote(request),
            reason,
            request_id,
        )
        return web.json_response(
            {
                "request_id": str(request_id),
                "model_id": model,
                "action": action,
                "target_version": target,
                "status": "requested",
                "status_url": f"{prefix}/killswitch/{model}",
            },
            status=202,
        )

    async def status(request: web.Request) -> web.Response:
        denied = authorize(request, mutating=False)
        if denied is not None:
            return denied
        model, bad = model_of(request)
        if bad is not None:
            return bad
        try:
            state = await _maybe_await(get_state(model))
        except Exception as err:
            log.error("killswitch API: state of %s unavailable (%s)", model, type(err).__name__)
            return _error(503, "the kill-switch state is unavailable; retry later")
        shown = None if state is None else {k: state.get(k) for k in STATE_FIELDS}
        return web.json_response({"model_id": model, "state": shown})

    async def mutation(
        request: web.Request, allowed: tuple[str, ...]
    ) -> tuple[str, dict[str, Any], web.Response | None]:
        """What trip and release check first, in this order: authorization, the model,
        the body. Returns ``(model, body, error response or None)``."""
        denied = authorize(request, mutating=True)
        if denied is not None:
            return "", {}, denied
        model, bad = model_of(request)
        if bad is not None:
            return model, {}, bad
        doc, bad = await body_of(request, allowed)
        return model, doc, bad

    async def trip(request: web.Request) -> web.Response:
        model, doc, bad = await mutation(request, TRIP_FIELDS)
        if bad is not None:
            return bad
        action = doc.get("action")
        if action not in TRIP_ACTIONS:
            got = "missing" if action is None else f"{str(action)[:MAX_NAME_CHARS]!r} is not valid"
            return _error(400, f"action: {got}; valid values: {', '.join(TRIP_ACTIONS)}")
        target, bad = text_field(doc, "target_version", required=False, max_chars=MAX_NAME_CHARS)
        if bad is not None:
            return bad
        if action == "rollback" and target is None:
            return _error(400, "target_version: required when action is rollback")
        reason, bad = text_field(doc, "reason", required=True, max_chars=MAX_REASON_CHARS)
        if bad is not None:
            return bad
        operator, bad = text_field(doc, "operator", required=False, max_chars=MAX_NAME_CHARS)
        if bad is not None:
            return bad
        assert reason is not None
        return await request_change(request, model, str(action), target, reason, operator)

    async def release(request: web.Request) -> web.Response:
        model, doc, bad = await mutation(request, RELEASE_FIELDS)
        if bad is not None:
            return bad
        reason, bad = text_field(doc, "reason", required=True, max_chars=MAX_REASON_CHARS)
        if bad is not None:
            return bad
        operator, bad = text_field(doc, "operator", required=False, max_chars=MAX_NAME_CHARS)
        if bad is not None:
            return bad
        assert reason is not None
        return await request_change(request, model, "release", None, reason, operator)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    base = prefix.rstrip("/")
    app.router.add_get(f"{base}/killswitch/{{model}}", status)
    app.router.add_post(f"{base}/killswitch/{{model}}/trip", trip)
    app.router.add_post(f"{base}/killswitch/{{model}}/release", release)
    return app


# --------------------------------------------------------------------------- worker glue


def kafka_send_request(producer: Any, summaries_topic: str) -> SendRequest:
    """``send_request`` over the worker's aiokafka producer: the same manual request as
    ``driftline killswitch`` (key = model id, on the summaries topic), awaited until the
    broker acknowledged it. The operator is recorded in the reason."""
    from stream.worker import manual_request

    async def send(
        model: str, action: str, target_version: str | None, reason: str, operator: str
    ) -> str:
        value = manual_request(
            model,
            action,
            reason=f"{reason} (operator {operator}, via the HTTP API)",
            target_version=target_version,
        )
        await producer.send_and_wait(summaries_topic, value=value, key=model.encode())
        return str(orjson.loads(value)["request_id"])

    return send


def store_get_state(store: Any) -> GetState:
    """``get_state`` reading the kill-switch mirror of a :class:`~stream.store.StateStore`."""

    async def get(model: str) -> Mapping[str, Any] | None:
        raw = await store.get_killswitch(model)
        return None if raw is None else dict(orjson.loads(raw))

    return get


# --------------------------------------------------------------------------- client


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped); errors name the file."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ValueError(f"--token-file: cannot read {path}: {err.strerror}") from None
    if not text:
        raise ValueError(f"--token-file: {path} is empty")
    return text


def api_request(
    base_url: str,
    op: str,
    model: str,
    *,
    token: str | None,
    reason: str = "",
    target_version: str | None = None,
    operator: str | None = None,
    timeout_s: float = 10.0,
) -> tuple[int, dict[str, Any]]:
    """Call the kill-switch API (``driftline killswitch OP --model M --api URL
    --token-file F``); returns (HTTP status, JSON body). ``op``: status | release |
    rollback | fallback | throttle. Network errors raise :class:`OSError`."""
    ops = ("status", "release", *TRIP_ACTIONS)
    if op not in ops:
        raise ValueError(f"op: {op!r} is not valid; valid values: {', '.join(ops)}")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"--api: {base_url!r} is not an http:// or https:// URL")
    url = f"{base_url.rstrip('/')}{API_PREFIX}/killswitch/{quote(model, safe='')}"
    data: bytes | None = None
    if op != "status":
        body: dict[str, Any] = {"reason": reason}
        if operator:
            body["operator"] = operator
        if op == "release":
            url += "/release"
        else:
            url += "/trip"
            body["action"] = op
            if target_version is not None:
                body["target_version"] = target_version
        data = json.dumps(body).encode()
    # the scheme is checked above (http/https only)
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")  # noqa: S310
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310
            status, raw = int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        status, raw = int(err.code), err.read()
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        doc = {"error": raw.decode("utf-8", "replace")[:500]}
    return status, doc if isinstance(doc, dict) else {"body": doc}


def _whoami() -> str:
    try:
        return getpass.getuser()[:MAX_NAME_CHARS] or "cli"
    except (OSError, KeyError):
        return "cli"


def killswitch_cli(
    op: str,
    model: str,
    *,
    api: str,
    token_file: str | None,
    reason: str = "",
    target_version: str | None = None,
    operator: str | None = None,
    wait_s: float = 30.0,
    poll_s: float = 0.5,
    out: Callable[[str], None] = print,
    err: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> int:
    """``driftline killswitch OP --model M --api URL --token-file F`` over the HTTP API.

    ``status`` prints the state. A trip or release prints the request, then (``wait_s`` >
    0) polls the status until stage 2 applied it (``trips`` / ``releases`` went up), like
    the Kafka path of the CLI. Exit codes: 0 done, 1 not applied in time or the API
    refused, 2 bad arguments. The token is read from ``token_file`` (never an argument).
    """
    try:
        token = read_token_file(token_file) if token_file else None
        status, doc = api_request(api, "status", model, token=token)
    except ValueError as exc:
        err(f"driftline killswitch: error: {exc}")
        return 2
    except OSError as exc:
        err(f"driftline killswitch: error: cannot reach {api}: {exc}")
        return 1
    if status != 200:
        err(f"driftline killswitch: HTTP {status}: {doc.get('error', doc)}")
        return 1
    before = doc.get("state") or {}
    if op == "status":
        out(
            orjson.dumps(doc["state"], option=orjson.OPT_INDENT_2).decode()
            if doc.get("state")
            else f"{model}: no kill-switch state (never tripped)"
        )
        return 0
    try:
        status, doc = api_request(
            api,
            op,
            model,
            token=token,
            reason=reason,
            target_version=target_version,
            operator=operator or _whoami(),
        )
    except ValueError as exc:
        err(f"driftline killswitch: error: {exc}")
        return 2
    except OSError as exc:
        err(f"driftline killswitch: error: cannot reach {api}: {exc}")
        return 1
    if status != 202:
        err(f"driftline killswitch: HTTP {status}: {doc.get('error', doc)}")
        return 1
    out(f"{model}: {op} requested (request {doc.get('request_id')})")
    if wait_s <= 0:
        return 0
    key = "releases" if op == "release" else "trips"
    seen = int(before.get(key) or 0)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        status, doc = api_request(api, "status", model, token=token)
        state = doc.get("state") or {}
        if status == 200 and int(state.get(key) or 0) > seen:
            out(orjson.dumps(state, option=orjson.OPT_INDENT_2).decode())
            return 0
        time.sleep(poll_s)
    err(f"{model}: not applied within {wait_s:g} s (is a worker running?)")
    return 1
