"""Kafka security settings for every client driftline uses, and the ACLs each role needs.

:func:`kafka_client_config` maps :class:`~stream.config.ServiceSettings` (the
``DRIFTLINE_KAFKA_SECURITY_PROTOCOL``, ``..._SASL_*`` and ``..._SSL_*`` variables) to the
settings of one client library, so SASL and TLS reach every connection the same way:

* ``"confluent"``: librdkafka properties (the producer SDK, the kill-switch watcher, the
  manual kill-switch request, admin tools);
* ``"aiokafka"``: ``AIOKafkaConsumer`` / ``AIOKafkaProducer`` / ``AIOKafkaAdminClient``
  keyword arguments (the worker);
* ``"faust"``: ``faust.App`` keyword arguments (``broker`` and ``broker_credentials``).

>>> from stream.config import ServiceSettings
>>> s = ServiceSettings.from_env({
...     "DRIFTLINE_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
...     "DRIFTLINE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
...     "DRIFTLINE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
...     "DRIFTLINE_KAFKA_SASL_USERNAME": "driftline",
...     "DRIFTLINE_KAFKA_SASL_PASSWORD": "s3cret"})
>>> conf = kafka_client_config(s, "confluent")
>>> conf["security.protocol"], conf["sasl.mechanism"], conf["sasl.username"]
('SASL_PLAINTEXT', 'SCRAM-SHA-512', 'driftline')
>>> kw = kafka_client_config(s, "aiokafka")
>>> kw["bootstrap_servers"], kw["sasl_plain_username"], "ssl_context" in kw
('k1:9092,k2:9092', 'driftline', False)

Settings that would be silently ignored are errors instead (a TLS CA file with a
non-TLS protocol, a SASL user with a non-SASL one, a SASL protocol without credentials):
an operator who believes traffic is encrypted or authenticated must not be wrong about it.

The ACL helpers describe least privilege for each driftline principal
(:func:`driftline_acls`) and create the ACLs through Kafka's Admin API
(:func:`create_acls`, confluent-kafka, run as an admin principal).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from stream.config import ConfigError, ServiceSettings, Topics

__all__ = [
    "ACL_OPERATIONS",
    "ACL_RESOURCE_TYPES",
    "CLIENTS",
    "REDIS_ROLES",
    "REDIS_STORE_COMMANDS",
    "ROLES",
    "AclGrant",
    "create_acls",
    "driftline_acls",
    "faust_app_acls",
    "kafka_client_config",
    "redis_acl_rules",
    "ssl_context",
]

Client = Literal["confluent", "aiokafka", "faust"]
CLIENTS: Final = ("confluent", "aiokafka", "faust")
_TLS: Final = ("SSL", "SASL_SSL")
_SASL: Final = ("SASL_PLAINTEXT", "SASL_SSL")


# --------------------------------------------------------------------------- client config


def _check(settings: ServiceSettings) -> None:
    proto = settings.security_protocol
    sasl = proto in _SASL
    tls = proto in _TLS
    where = f"DRIFTLINE_KAFKA_SECURITY_PROTOCOL is {proto}"
    if sasl:
        if settings.sasl_mechanism is None:
            raise ConfigError(
                f"DRIFTLINE_KAFKA_SASL_MECHANISM: required when {where}; valid values: "
                "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"
            )
        for var, value in (
            ("DRIFTLINE_KAFKA_SASL_USERNAME", settings.sasl_username),
            ("DRIFTLINE_KAFKA_SASL_PASSWORD", settings.sasl_password),
        ):
            if not value:
                raise ConfigError(f"{var}: required when {where}")
    else:
        for var, value in (
            ("DRIFTLINE_KAFKA_SASL_MECHANISM", settings.sasl_mechanism),
            ("DRIFTLINE_KAFKA_SASL_USERNAME", settings.sasl_username),
            ("DRIFTLINE_KAFKA_SASL_PASSWORD", settings.sasl_password),
        ):
            if value:
                raise ConfigError(
                    f"{var}: set, but {where}, which does not authenticate with SASL; "
                    "valid protocols for SASL: SASL_PLAINTEXT, SASL_SSL"
                )
    if not tls:
        for var, value in (
            ("DRIFTLINE_KAFKA_SSL_CAFILE", settings.ssl_cafile),
            ("DRIFTLINE_KAFKA_SSL_CERTFILE", settings.ssl_certfile),
            ("DRIFTLINE_KAFKA_SSL_KEYFILE", settings.ssl_keyfile),
        ):
            if value:
                raise ConfigError(
                    f"{var}: set, but {where}, which does not use TLS; valid protocols for "
                    "TLS: SSL, SASL_SSL"
                )
    if settings.ssl_keyfile and not settings.ssl_certfile:
        raise ConfigError(
            "DRIFTLINE_KAFKA_SSL_KEYFILE: set without DRIFTLINE_KAFKA_SSL_CERTFILE "
            "(a client key needs its certificate)"
        )


def ssl_context(settings: ServiceSettings) -> ssl.SSLContext:
    """A client TLS context: the CA file (else the system CAs), hostname checking on,
    and the client certificate/key when configured (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.ssl_cafile)
    if settings.ssl_certfile:
        context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    return context


def kafka_client_config(
    settings: ServiceSettings, client: Client = "confluent", *, bootstrap: str | None = None
) -> dict[str, Any]:
    """Connection and security settings for ``client`` (confluent | aiokafka | faust).

    ``bootstrap`` overrides ``settings.kafka_bootstrap``. Raises
    :class:`~stream.config.ConfigError` naming the variable for incomplete or contradictory
    security settings. The result holds the SASL password: never log it.
    """
    if client not in CLIENTS:
        raise ValueError(f"client: {client!r} is not valid; valid values: {', '.join(CLIENTS)}")
    _check(settings)
    servers = bootstrap or settings.kafka_bootstrap
    proto = settings.security_protocol
    sasl = proto in _SASL
    tls = proto in _TLS
    if client == "confluent":
        conf: dict[str, Any] = {"bootstrap.servers": servers, "security.protocol": proto}
        if sasl:
            conf["sasl.mechanism"] = settings.sasl_mechanism
            conf["sasl.username"] = settings.sasl_username
            conf["sasl.password"] = settings.sasl_password
        if tls:
            conf["ssl.endpoint.identification.algorithm"] = "https"
            if settings.ssl_cafile:
                conf["ssl.ca.location"] = settings.ssl_cafile
            if settings.ssl_certfile:
                conf["ssl.certificate.location"] = settings.ssl_certfile
            if settings.ssl_keyfile:
                conf["ssl.key.location"] = settings.ssl_keyfile
        return conf
    context = ssl_context(settings) if tls else None
    if client == "aiokafka":
        kw: dict[str, Any] = {"bootstrap_servers": servers, "security_protocol": proto}
        if sasl:
            kw["sasl_mechanism"] = settings.sasl_mechanism
            kw["sasl_plain_username"] = settings.sasl_username
            kw["sasl_plain_password"] = settings.sasl_password
        if context is not None:
            kw["ssl_context"] = context
        return kw
    import faust

    brokers = [f"kafka://{h.strip()}" for h in servers.split(",") if h.strip()]
    credentials: Any = None
    if sasl:
        credentials = faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=context,
        )
    elif context is not None:
        credentials = faust.SSLCredentials(context)
    out: dict[str, Any] = {"broker": brokers}
    if credentials is not None:
        out["broker_credentials"] = credentials
    return out


# --------------------------------------------------------------------------- ACLs

ACL_RESOURCE_TYPES: Final = ("topic", "group", "transactional_id", "cluster")
ACL_OPERATIONS: Final = (
    "read",
    "write",
    "describe",
    "create",
    "delete",
    "alter",
    "describe_configs",
    "alter_configs",
    "idempotent_write",
    "cluster_action",
    "all",
)
ROLES: Final = ("worker", "producer", "watcher", "operator")


@dataclass(frozen=True, slots=True)
class AclGrant:
    """One ALLOW ACL: ``principal`` may ``operation`` on a resource (literal or prefix)."""

    principal: str
    resource_type: str
    resource_name: str
    operation: str
    pattern_type: str = "literal"
    host: str = "*"

    def __post_init__(self) -> None:
        if not self.principal.startswith("User:") or len(self.principal) <= 5:
            raise ValueError(f"principal: {self.principal!r} must look like 'User:<name>'")
        if self.resource_type not in ACL_RESOURCE_TYPES:
            raise ValueError(
                f"resource_type: {self.resource_type!r} is not valid; valid values: "
                + ", ".join(ACL_RESOURCE_TYPES)
            )
        if self.operation not in ACL_OPERATIONS:
            raise ValueError(
                f"operation: {self.operation!r} is not valid; valid values: "
                + ", ".join(ACL_OPERATIONS)
            )
        if self.pattern_type not in ("literal", "prefixed"):
            raise ValueError(
                f"pattern_type: {self.pattern_type!r} is not valid; valid values: literal, prefixed"
            )
        if not self.resource_name:
            raise ValueError("resource_name: must not be empty")

    def __str__(self) -> str:
        star = "*" if self.pattern_type == "prefixed" else ""
        return (
            f"ALLOW {self.principal} {self.operation.upper()} on "
            f"{self.resource_type}:{self.resource_name}{star} from {self.host}"
        )


def _grants(principal: str, kind: str, names: Iterable[str], ops: Sequence[str]) -> list[AclGrant]:
    return [AclGrant(principal, kind, n, op) for n in dict.fromkeys(names) for op in ops]


def driftline_acls(
    role: str,
    principal: str,
    topics: Topics | None = None,
    *,
    group_prefix: str = "driftline",
) -> tuple[AclGrant, ...]:
    """Least-privilege ACLs for one driftline principal.

    * ``worker``: READ predictions, labels, summaries (stage 1 and 2 inputs) and its two
      consumer groups ``<group_prefix>-ingest`` / ``-detect``; WRITE + DESCRIBE summaries,
      alerts, control, deadletter. No transactional ids (the worker does not use Kafka
      transactions; its idempotent producer needs only WRITE on a topic, KIP-679), no
      CREATE (topics are created by an admin job).
    * ``producer`` (a serving stack with the SDK): WRITE + DESCRIBE predictions, labels.
    * ``watcher`` (the SDK's kill-switch watcher; it assigns partitions and never commits,
      so it needs no group): READ control.
    * ``operator`` (``driftline killswitch``): WRITE + DESCRIBE summaries, where manual
      kill-switch requests travel, and READ control. Note that this lets an operator
      write summaries too (see docs/security.md).

    >>> for grant in driftline_acls("producer", "User:serving"):
    ...     print(grant)
    ALLOW User:serving WRITE on topic:driftline.predictions from *
    ALLOW User:serving DESCRIBE on topic:driftline.predictions from *
    ALLOW User:serving WRITE on topic:driftline.labels from *
    ALLOW User:serving DESCRIBE on topic:driftline.labels from *
    """
    t = topics or Topics()
    write = ("write", "describe")
    if role == "worker":
        return tuple(
            _grants(principal, "topic", (t.predictions, t.labels, t.summaries), ("read",))
            + _grants(principal, "topic", (t.summaries, t.alerts, t.control, t.deadletter), write)
            + _grants(
                principal, "group", (f"{group_prefix}-ingest", f"{group_prefix}-detect"), ("read",)
            )
        )
    if role == "producer":
        return tuple(_grants(principal, "topic", (t.predictions, t.labels), write))
    if role == "watcher":
        return tuple(_grants(principal, "topic", (t.control,), ("read",)))
    if role == "operator":
        return tuple(
            _grants(principal, "topic", (t.summaries,), write)
            + _grants(principal, "topic", (t.control,), ("read",))
        )
    raise ValueError(f"role: {role!r} is not valid; valid values: {', '.join(ROLES)}")


def faust_app_acls(
    principal: str, app_id: str, sources: Sequence[str], sinks: Sequence[str] = ()
) -> tuple[AclGrant, ...]:
    """ACLs for a faust app run with ``topic_allow_declare=False`` and
    ``topic_disable_leader=True`` (it then creates no topics): READ its sources and its
    consumer group (the app id), WRITE + DESCRIBE its sinks."""
    return tuple(
        _grants(principal, "topic", sources, ("read",))
        + _grants(principal, "topic", sinks, ("write", "describe"))
        + _grants(principal, "group", (app_id,), ("read",))
    )


def create_acls(
    admin_conf: dict[str, Any], grants: Iterable[AclGrant], timeout: float = 30.0
) -> int:
    """Create ``grants`` through the Admin API as the principal in ``admin_conf``
    (confluent-kafka settings, e.g. ``kafka_client_config(admin_settings)``); returns how
    many were created. Raises RuntimeError naming every grant the broker refused."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.admin._acl import AclBinding, AclOperation, AclPermissionType
    from confluent_kafka.admin._resource import ResourcePatternType, ResourceType

    wanted = list(dict.fromkeys(grants))
    if not wanted:
        return 0
    bindings = [
        AclBinding(
            ResourceType[g.resource_type.upper()],
            "kafka-cluster" if g.resource_type == "cluster" else g.resource_name,
            ResourcePatternType[g.pattern_type.upper()],
            g.principal,
            g.host,
            AclOperation[g.operation.upper()],
            AclPermissionType.ALLOW,
        )
        for g in wanted
    ]
    admin = AdminClient(admin_conf)
    futures = admin.create_acls(bindings, request_timeout=timeout)
    failed: list[str] = []
    for grant, binding in zip(wanted, bindings, strict=True):
        try:
            futures[binding].result()
        except Exception as err:  # collected and reported together
            failed.append(f"{grant}: {err}")
    if failed:
        raise RuntimeError("create_acls: the broker refused:\n" + "\n".join(failed))
    return len(wanted)


# --------------------------------------------------------------------------- Redis ACL

REDIS_STORE_COMMANDS: Final = (
    # connection
    "ping",
    # scripts: every checkpoint and outbox ack is one EVALSHA; SCRIPT LOAD after a restart
    "evalsha",
    "eval",
    "script|load",
    # the claim transaction, and what the scripts call (ACLs apply inside scripts too)
    "multi",
    "exec",
    "discard",
    "get",
    "set",
    "incr",
    "incrby",  # redis-py sends INCRBY for incr()
    "hget",
    "hset",
    "hgetall",
    "hdel",
    "hmget",  # the label-join buffer: lookups in the partition's join hashes
    "pexpireat",  # one expiry per join-buffer hash
    "time",  # the commit script reads the server clock for join-buffer expiries
)
"""Every command :class:`~stream.redis_store.RedisStore` sends or runs inside its scripts."""


REDIS_ROLES: Final = ("store", "killswitch_reader")


def redis_acl_rules(prefix: str = "dl", role: str = "store") -> tuple[str, ...]:
    """ACL SETUSER rules limiting a Redis user to what one driftline role needs.

    * ``store`` (the worker): every key under ``<prefix>:`` and :data:`REDIS_STORE_COMMANDS`;
    * ``killswitch_reader`` (a serving stack reading the kill-switch mirror, or a
      dashboard): GET on ``<prefix>:ks:*`` only, read-only (Redis 7 ``%R~``).

    >>> " ".join(redis_acl_rules("dl"))[:60]
    'resetkeys ~dl:* resetchannels -@all +ping +evalsha +eval +sc'
    >>> redis_acl_rules("dl", "killswitch_reader")
    ('resetkeys', '%R~dl:ks:*', 'resetchannels', '-@all', '+ping', '+get')

    Create the user with e.g. ``ACL SETUSER driftline reset on >PASSWORD`` followed by
    these rules (or a ``user`` line in an ACL file).
    """
    if not prefix or any(c in prefix for c in "*?[]\\ \t\n"):
        raise ValueError(f"prefix: {prefix!r} must be non-empty without glob characters or spaces")
    if role == "store":
        commands = tuple(f"+{c}" for c in REDIS_STORE_COMMANDS)
        return ("resetkeys", f"~{prefix}:*", "resetchannels", "-@all", *commands)
    if role == "killswitch_reader":
        return ("resetkeys", f"%R~{prefix}:ks:*", "resetchannels", "-@all", "+ping", "+get")
    raise ValueError(f"role: {role!r} is not valid; valid values: {', '.join(REDIS_ROLES)}")


# --------------------------------------------------------------------------- secrets in logs
