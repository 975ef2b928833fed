"""config.yaml as msgspec Structs.

The YAML is parsed once into nodes so that an error can name the line of the
key it is about; ``${VAR}`` and ``${VAR:-default}`` are expanded in scalar
values (never in keys), and a plain (unquoted) value that is one whole
reference is read again as YAML so that ``port: ${PORT:-8080}`` is still an
integer; a quoted one stays a string, so ``write_keys: ["${KEY}"]`` works
when the key happens to be all digits.
"""

from __future__ import annotations

import os
import re
import weakref
from pathlib import Path
from typing import Any, Callable, Literal

import msgspec
import yaml

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
         "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
         "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
         "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4}


class ConfigError(Exception):
    """A config file that cannot be used; the message names the key and line."""


class ByteSize(int):
    """A size written as ``65536``, ``64KiB``, ``10GiB`` or ``500KB``."""


def parse_size(value: Any) -> ByteSize:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576 or 10GiB")
    if isinstance(value, int):
        return ByteSize(value)
    m = SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 1048576 or 10GiB, got {value!r}")
    return ByteSize(int(float(m.group(1)) * UNITS[(m.group(2) or "").lower()]))


class ReserveSize(int):
    """``storage.min_free_bytes``: a size, or ``auto`` (written -1): a share of the filesystem."""


AUTO_RESERVE = ReserveSize(-1)


def parse_reserve(value: Any) -> ReserveSize:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return AUTO_RESERVE
    return ReserveSize(parse_size(value))


class Duration(float):
    """Seconds, written as ``3600``, ``90m``, ``24h`` or ``7d``."""


DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)
DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(value: Any) -> Duration:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 3600, 90m, 24h or 7d")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration may not be negative")
        return Duration(value)
    m = DURATION.match(str(value))
    if not m:
        raise ValueError(f"expected a duration such as 3600, 90m, 24h or 7d, got {value!r}")
    return Duration(float(m.group(1)) * DURATION_UNITS[(m.group(2) or "").lower()])


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is ByteSize:
        return parse_size(obj)
    if type_ is Duration:
        return parse_duration(obj)
    if type_ is ReserveSize:
        return parse_reserve(obj)
    raise NotImplementedError


class Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class AdminConfig(Base):
    """Who may open the debugger (``/debugger``, Basic auth)."""

    user: str
    password: str


class TlsConfig(Base):
    """``server.tls``: serve HTTPS on the same port (PEM files, read at ``gateway serve``)."""

    cert: str
    key: str


class ServerConfig(Base):
    host: str = "127.0.0.1"
    port: int = 8080
    max_event_bytes: ByteSize = ByteSize(65536)
    max_batch_bytes: ByteSize = ByteSize(1048576)
    cors_origins: list[str] = msgspec.field(default_factory=lambda: ["*"])
    #: peers whose X-Forwarded-For / -Host / -Proto are believed (IPs or CIDRs)
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    #: the URL SDKs reach the gateway at, for the settings documents
    public_url: str | None = None
    #: seconds SIGTERM waits for in-flight requests and sends
    shutdown_timeout: float = 10.0
    access_log: bool = False
    tls: TlsConfig | None = None
    #: the default of every source's ``strict``, and the mode of requests
    #: whose write key matches no source (docs/pipelines-api.md)
    strict: bool = False
    #: the debugger's credentials; None: every /debugger path answers 404
    admin: AdminConfig | None = None


class NatsConfig(Base):
    """``storage.nats``: the JetStream cluster of ``storage.backend: nats``
    (gateway/spool/nats.py)."""

    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    #: prefix of every stream and consumer the gateway creates
    stream: str = "GATEWAY"
    #: copies of each stream; 3 survives the loss of any one node
    replicas: int = 3
    user: str | None = None
    password: str | None = None
    token: str | None = None
    #: a .creds file (JWT and NKey seed)
    creds: str | None = None
    #: CA certificate(s) that signed the servers' TLS certificates
    tls_ca: str | None = None
    #: a destination no running gateway has had in its config for this long
    #: loses its consumers (its read position and its queued retries)
    cleanup_after: Duration = Duration(3600)


class StorageConfig(Base):
    backend: Literal["sqlite", "nats"] = "sqlite"
    #: backend: nats only
    nats: NatsConfig | None = None
    path: str = "./data"
    max_bytes: ByteSize = ByteSize(10 * 1024**3)
    #: below this much free space on the spool's filesystem new calls get 503,
    #: so that acks, retries, dead letters, purges and checkpoints always
    #: have room; auto: a share of the filesystem (gateway/spool/disk_room.py)
    min_free_bytes: ReserveSize = AUTO_RESERVE
    #: seconds a delivered call stays in the spool before it is removed
    retention: float = 0.0
    #: a call whose messageId was stored within this window is answered 200
    #: and not stored again; 0 turns deduplication off
    dedup_window: Duration = Duration(24 * 3600)


class TrackApiConfig(Base):
    """The Basic ``SITE_ID:API_KEY`` a ``kind: track_api`` source accepts."""

    site_id: str
    api_key: str


class SourceConfig(Base):
    name: str
    #: pipelines: the Pipelines API with write keys; track_api: Customer.io's
    #: classic Track API (docs/track-api-coming-in.md)
    kind: Literal["pipelines", "track_api"] = "pipelines"
    write_keys: list[str] = msgspec.field(default_factory=list)
    track_api: TrackApiConfig | None = None
    #: None (unset) takes ``server.strict``; read it through ``strict_for``
    strict: bool | None = None
    #: browser origins allowed for this source; falls back to server.cors_origins
    cors_origins: list[str] | None = None


class TransformConfig(Base):
    type: str
    settings: dict[str, Any] = msgspec.field(default_factory=dict)


class FilterConfig(Base):
    types: list[str] | None = None
    #: event names to include (track); None means every name
    events: list[str] | None = None
    exclude_events: list[str] = msgspec.field(default_factory=list)
    sources: list[str] | None = None


class RetryConfig(Base):
    #: attempts before a call is dead-lettered
    max_attempts: int = 10
    #: seconds after the first failure before a call is dead-lettered
    max_age: float = 6 * 3600.0
    #: backoff: full jitter over min(cap, base * 2**attempt) seconds
    backoff_base: float = 1.0
    backoff_cap: float = 60.0


class BatchConfig(Base):
    #: None takes the destination type's own limit
    max_calls: int | None = None
    max_bytes: ByteSize | None = None
    #: seconds a partial batch waits for more calls
    max_wait: float = 0.05


class RateLimitConfig(Base):
    requests: float
    per_seconds: float = 1.0


class DestinationConfig(Base):
    name: str
    type: str
    settings: dict[str, Any] = msgspec.field(default_factory=dict)
    filter: FilterConfig = msgspec.field(default_factory=FilterConfig)
    aliases: list[str] = msgspec.field(default_factory=list)
    transforms: list[TransformConfig] = msgspec.field(default_factory=list)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    batch: BatchConfig = msgspec.field(default_factory=BatchConfig)
    rate_limit: RateLimitConfig | None = None
    #: batches in flight at once
    concurrency: int = 4
    #: seconds one send may take before it counts as a network error
    timeout: float = 30.0
    enabled: bool = True


class Config(Base, weakref=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    sources: list[SourceConfig] = msgspec.field(default_factory=list)
    transforms: list[TransformConfig] = msgspec.field(default_factory=list)
    destinations: list[DestinationConfig] = msgspec.field(default_factory=list)
    plugins: list[str] = msgspec.field(default_factory=list)


def strict_for(cfg: Config, source: SourceConfig | None) -> bool:
    """Whether requests of ``source`` are strict: its own ``strict`` when set,
    else ``server.strict``, which also judges a key that matches no source
    (otherwise a mistyped key would always be lax)."""
    if source is None or source.strict is None:
        return cfg.server.strict
    return source.strict


def _expand(value: str, line: int, env: dict[str, str], typed: bool = True) -> Any:
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        got = env.get(name)
        if got is None or (got == "" and default is not None):
            if default is None:
                raise ConfigError(f"line {line}: environment variable {name} is not set "
                                  f"(write ${{{name}:-default}} to give a default)")
            return default
        return got

    whole = typed and ENV_REF.fullmatch(value)
    out = ENV_REF.sub(sub, value)
    if whole:
        try:
            parsed = yaml.safe_load(out) if out else out
        except yaml.YAMLError:
            return out
        return parsed if isinstance(parsed, (int, float, bool, str)) else out
    return out


def _construct(node: yaml.Node, env: dict[str, str]) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for k, v in node.value:
            key = _construct(k, {})
            if key in out:
                raise ConfigError(f"line {k.start_mark.line + 1}: duplicate key {key!r}")
            out[key] = _construct(v, env)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, env) for v in node.value]
    value = yaml.SafeLoader.construct_scalar(yaml.SafeLoader(""), node)  # type: ignore[arg-type]
    if node.tag == "tag:yaml.org,2002:str" and "${" in value:
        # Only a plain scalar is typed; "${X}" and '${X}' say "a string".
        return _expand(value, node.start_mark.line + 1, env, typed=node.style is None)
    loader = yaml.SafeLoader("")
    return loader.construct_object(node, deep=True)


_PATH_PART = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]|\.`([^`]*)`")


def _line_of(root: yaml.Node | None, path: str, extra_key: str | None) -> int | None:
    """The line of the node at msgspec's error path ``$.a.b[0]``."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    parts = [m.group(1) or m.group(3) or int(m.group(2)) for m in _PATH_PART.finditer(path[1:])]
    if extra_key is not None:
        parts.append(extra_key)
    for part in parts:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for k, v in node.value:
                if k.value == part:
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def to_struct(data: Any, type_: type, root: yaml.Node | None = None, where: str = "", base: str = "$") -> Any:
    """msgspec.convert with an error that names the key, and its line when
    known; ``base`` is where ``data`` sits in the YAML (``$.destinations[0].settings``)."""
    try:
        return msgspec.convert(data, type_, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        msg = str(e)
        m = re.search(r"at `(\$[^`]*)`", msg)
        path = m.group(1) if m else "$"
        unknown = re.match(r"Object contains unknown field `([^`]*)`", msg)
        line = _line_of(root, base + path[1:], unknown.group(1) if unknown else None)
        key = path[1:].lstrip(".") if path != "$" else ""
        if unknown:
            key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
            msg = f"unknown key {key!r}"
        elif key:
            msg = f"{key}: {msg.split(' - at ')[0]}"
        prefix = f"line {line}: " if line else ""
        raise ConfigError(f"{where}{prefix}{msg}") from None


#: each loaded config's YAML nodes (by id; Structs are not hashable), so that
#: plugin settings errors can name lines too
_NODES: dict[int, tuple["weakref.ref[Config]", yaml.Node]] = {}


def node_of(cfg: Config) -> yaml.Node | None:
    """The YAML a config was read from, for line numbers in later errors."""
    got = _NODES.get(id(cfg))
    return got[1] if got is not None and got[0]() is cfg else None


def loads(text: str, env: dict[str, str] | None = None) -> Config:
    """Parse config text; relative paths in it are relative to the working directory."""
    env = dict(os.environ) if env is None else env
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}") from None
    data = _construct(root, env) if root is not None else {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of keys to values")
    cfg: Config = to_struct(data, Config, root)
    if root is not None:
        key = id(cfg)
        _NODES[key] = (weakref.ref(cfg, lambda _: _NODES.pop(key, None)), root)
    check(cfg, root)
    return cfg


def load(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror}") from None
    try:
        return loads(text)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def check(cfg: Config, root: yaml.Node | None = None) -> None:
    """Rules that types alone cannot say."""
    def fail(path: str, msg: str) -> None:
        line = _line_of(root, path, None)
        raise ConfigError(f"{'line %d: ' % line if line else ''}{path[2:]}: {msg}")

    if cfg.server.admin is not None and not (cfg.server.admin.user and cfg.server.admin.password):
        fail("$.server.admin", "needs a user and a password that are not empty")
    seen: set[str] = set()
    keys: set[str] = set()
    credentials: set[tuple[str, str]] = set()
    for i, s in enumerate(cfg.sources):
        if s.name in seen:
            fail(f"$.sources[{i}].name", f"source name {s.name!r} is used twice")
        seen.add(s.name)
        if s.kind == "track_api":
            _check_track_api_source(s, i, fail, credentials)
            continue
        if s.track_api is not None:
            fail(f"$.sources[{i}].track_api", "only a source of kind: track_api takes track_api")
        if not s.write_keys:
            fail(f"$.sources[{i}].write_keys", "a source needs at least one write key")
        for k in s.write_keys:
            if not k:
                fail(f"$.sources[{i}].write_keys", "a write key may not be empty")
            if k in keys:
                fail(f"$.sources[{i}].write_keys", "a write key may belong to one source only")
            keys.add(k)
    names: set[str] = set()
    for i, d in enumerate(cfg.destinations):
        if d.name in names:
            fail(f"$.destinations[{i}].name", f"destination name {d.name!r} is used twice")
        names.add(d.name)
        if d.concurrency < 1:
            fail(f"$.destinations[{i}].concurrency", "must be at least 1")
        for s in d.filter.sources or ():
            if s not in seen:
                fail(f"$.destinations[{i}].filter.sources", f"no source is named {s!r}")
    if cfg.server.max_event_bytes > cfg.server.max_batch_bytes:
        fail("$.server.max_event_bytes", "may not be larger than server.max_batch_bytes")
    if cfg.server.tls is not None:
        for part in ("cert", "key"):
            if not getattr(cfg.server.tls, part):
                fail(f"$.server.tls.{part}", "needs the path of a PEM file")
    _check_nats(cfg.storage, fail)


NATS_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
NATS_URL = re.compile(r"^(nats|tls|ws|wss)://[^\s/]+$")


def _check_nats(storage: StorageConfig, fail: Any) -> None:
    """``storage.nats`` is there exactly when ``storage.backend`` is nats, and usable."""
    n = storage.nats
    if storage.backend != "nats":
        if n is not None:
            fail("$.storage.nats", "is for storage.backend: nats (the backend is sqlite)")
        return
    if n is None:
        fail("$.storage.backend", "nats needs storage.nats (servers, stream, replicas)")
        return
    if not n.servers:
        fail("$.storage.nats.servers", "needs at least one server, such as nats://10.0.0.1:4222")
    for i, url in enumerate(n.servers):
        if not NATS_URL.match(url):
            fail(f"$.storage.nats.servers[{i}]", f"{url!r} is not a server URL such as nats://10.0.0.1:4222")
    if not NATS_NAME.match(n.stream):
        fail("$.storage.nats.stream", f"{n.stream!r}: 1 to 32 letters, digits, '_' or '-'")
    if not 1 <= n.replicas <= 5:
        fail("$.storage.nats.replicas", "must be 1 to 5 (JetStream keeps at most 5 copies)")
    if (n.user is None) != (n.password is None):
        fail("$.storage.nats.user" if n.user is not None else "$.storage.nats.password",
             "user and password go together")
    if sum(x is not None for x in (n.user, n.token, n.creds)) > 1:
        fail("$.storage.nats.token" if n.token is not None else "$.storage.nats.creds",
             "give one of user/password, token or creds")
    for key in ("creds", "tls_ca"):
        path = getattr(n, key)
        if path is not None and not os.path.isfile(path):
            fail(f"$.storage.nats.{key}", f"no such file: {path}")
    if n.cleanup_after < 1:
        fail("$.storage.nats.cleanup_after", "must be at least 1 second (an hour is the default)")


def _check_track_api_source(s: SourceConfig, i: int, fail: Callable[[str, str], None],
                            credentials: set[tuple[str, str]]) -> None:
    """A track_api source authenticates with its site id and API key, never with write keys."""
    if s.write_keys:
        fail(f"$.sources[{i}].write_keys", "a track_api source has no write keys "
             "(Track clients send track_api.site_id and track_api.api_key)")
    if s.track_api is None:
        fail(f"$.sources[{i}].kind", "a track_api source needs track_api: {site_id: ..., api_key: ...}")
    assert s.track_api is not None  # fail() raised
    for part in ("site_id", "api_key"):
        if not getattr(s.track_api, part):
            fail(f"$.sources[{i}].track_api.{part}", "may not be empty")
    if ":" in s.track_api.site_id:
        fail(f"$.sources[{i}].track_api.site_id", "may not contain ':' (Basic auth splits SITE_ID:API_KEY there)")
    pair = (s.track_api.site_id, s.track_api.api_key)
    if pair in credentials:
        fail(f"$.sources[{i}].track_api", "a site id and API key may belong to one source only")
    credentials.add(pair)
