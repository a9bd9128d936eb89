"""Settings: one typed, frozen object built at the edge and passed down.

Precedence, lowest first: defaults < TOML file < environment (``POLLER_*``) <
command-line flags. Every key is ``section.name`` (or a bare top-level name);
its environment variable is ``POLLER_SECTION_NAME``. Unknown keys and values of
the wrong form stop the program with a message naming the key and the form
expected, e.g.::

    >>> load(env={"POLLER_POLLING_INTERVAL_S": "soon"}, config_path=None)
    Traceback (most recent call last):
    ...
    poller.errors.ConfigError: polling.interval_s: expected a number of seconds, got 'soon'
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from poller.errors import ConfigError
from poller.netpolicy import DEFAULT_DENIED_NETWORKS, parse_network

DEFAULT_CONFIG_PATH = Path("/etc/poller/poller.toml")
ENV_PREFIX = "POLLER_"
# Environment variables that are read elsewhere and are not configuration keys.
NON_CONFIG_ENV = frozenset(
    {"POLLER_CONFIG", "POLLER_SECRET_KEY", "POLLER_DEVICE_PASSWORD", "POLLER_SCHEMA_DIR",
     "POLLER_API_TOKEN", "POLLER_DEMO_DEVICES",
     # Read when poller is first imported (poller.build): no setting.
     "POLLER_PURE"}
)
REDACTED = "***"

_T = TypeVar("_T")


def _opt(
    default: _T,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    form: str | None = None,
) -> _T:
    # Typed as the default, not Any: `port: int = _opt("8640", ...)` is a mypy error.
    meta = {"help": help, "min": min, "max": max, "choices": choices, "secret": secret,
            "form": form}
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class Shard:
    """This instance's part of a registry shared by ``n`` instances: the devices
    whose id % n == k. Parsed once, from ``polling.shard``.

    >>> Shard(1, 4), str(Shard(1, 4)), Shard(1, 4).owns(5)
    (Shard(k=1, n=4), '1/4', True)
    """

    k: int
    n: int

    def owns(self, device_id: int) -> bool:
        return device_id % self.n == self.k

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"


# The shard of a lone instance (no polling.shard): every device.
EVERY_DEVICE = Shard(0, 1)


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    url: str = _opt("", "PostgreSQL URL; empty: the embedded server", form="url")
    pool_max: int = _opt(8, "largest connection pool", min=1, max=200)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = _opt("", "Redis URL; empty: the embedded Valkey", form="url")


@dataclass(frozen=True, slots=True)
class S3Settings:
    endpoint_url: str = _opt("", "S3 endpoint URL; empty: the embedded SeaweedFS, "
                             "'aws': Amazon's default endpoints", form="url")
    bucket: str = _opt("poller-archive", "archive bucket", form="bucket")
    prefix: str = _opt("poller", "key prefix inside the bucket", form="prefix")
    region: str = _opt("us-east-1", "S3 region")
    access_key_id: str = _opt("", "access key id; empty: the default credential chain")
    secret_access_key: str = _opt("", "secret access key", secret=True)


@dataclass(frozen=True, slots=True)
class PollingSettings:
    interval_s: float = _opt(6.0, "seconds between two polls of a device", min=0.05, max=86400)
    timeout_s: float = _opt(4.0, "per-poll deadline, below interval_s", min=0.01, max=3600)
    max_in_flight: int = _opt(20000, "global cap on polls in flight", min=1, max=1_000_000)
    connections_per_host: int = _opt(512, "keep-alive connections per device host",
                                     min=1, max=100_000)
    # Overload (more devices than the CPU can poll): shed before sending,
    # keep connections, cap connects; README "Overload".
    shed_after_s: float = _opt(1.0, "a tick not started this late is skipped (counted in "
                               "poller_shed_ticks_total), never sent late; a device skipped "
                               "k times in a row waits up to k+1 times this; at most half "
                               "the poll timeout", min=0.01, max=3600)
    keep_after_timeout_s: float = _opt(2.0, "a connection whose answer missed the poll's "
                                       "deadline stays open this long to read it and be "
                                       "reused; 0: closed at once", min=0, max=600)
    max_connects_per_s: float = _opt(2000.0, "new device connections a second, all hosts "
                                     "together (the fast transport); 0: no cap", min=0,
                                     max=1_000_000)
    auth_failed_interval_s: float = _opt(300.0, "poll interval of a device whose "
                                         "credentials were rejected", min=1, max=86400)
    backoff_max_s: float = _opt(300.0, "cap of the back-off after network failures",
                                min=0.1, max=86400)
    totals_every: int = _opt(10, "read meter totals every N-th poll (eagle-cloud)",
                             min=1, max=100_000)
    cloud_base_url: str = _opt("https://rainforestcloud.com:9445",
                               "base URL of the Rainforest cloud API", form="url")
    phase_seed: str = _opt("", "mixed into each device's phase hash; empty: instance_id")
    resync_interval_s: float = _opt(30.0, "full registry resync period", min=1, max=86400)
    wheel_resolution_s: float = _opt(0.02, "tick granularity: devices due within one slot "
                                     "are dispatched together", min=0.001, max=1.0)
    # Text "k/n" in the file and environment; parsed once, here at the edge.
    shard: Shard | None = _opt(None, "k/n: poll only the devices whose id % n == k (one of n "
                               "instances sharing a registry); empty: every device")
    # Where device URLs may connect (poller.netpolicy): checked at
    # registration and again on every new connection.
    allowed_networks: tuple[str, ...] = _opt(
        (), "CIDR networks device URLs may reach (comma-separated in the environment); "
        "when set, only these; the most specific network of the two lists decides, so "
        "127.0.0.0/8 here re-admits loopback", form="networks")
    denied_networks: tuple[str, ...] = _opt(
        DEFAULT_DENIED_NETWORKS, "CIDR networks device URLs may not reach: loopback, "
        "link-local (cloud metadata), unspecified, multicast", form="networks")
    # Bounds of a reading (drivers/bounds.py): a field outside them is stored
    # as null and counted under the outcome naming why; the rest is kept.
    # The time window's cap keeps every stored time within Postgres' range.
    device_time_max_behind_s: float = _opt(
        30 * 86400.0, "a device time further behind the poll is stored as null "
        "(device_time_out_of_range); a cloud answer may echo a meter days offline, "
        "older is a reset clock", min=60, max=100 * 365 * 86400)
    device_time_max_ahead_s: float = _opt(
        86400.0, "a device time further ahead of the poll is stored as null; a day "
        "covers a clock kept in local time (UTC+14)", min=60, max=100 * 365 * 86400)
    max_demand_w: float = _opt(
        1_000_000.0, "|demand| above this is stored as null (value_out_of_range): ten "
        "times a 400 A service, while a kW/W or scaling slip lands above", min=1, max=1e12)
    max_total_wh: float = _opt(
        1e12, "a meter total above this, or below 0, is stored as null: a 9-digit kWh "
        "register", min=1, max=1e18)
    max_price: float = _opt(1e6, "|price| per kWh above this is stored as null (any "
                            "currency)", min=1e-6, max=1e15)


@dataclass(frozen=True, slots=True)
class IngestSettings:
    batch_rows: int = _opt(5000, "flush when this many readings wait", min=1, max=1_000_000)
    flush_interval_s: float = _opt(1.0, "flush at least this often", min=0.01, max=3600)
    buffer_max_rows: int = _opt(200_000, "readings held in memory at most; beyond, "
                                "polling waits on the spool", min=1, max=100_000_000)
    disk_warn_percent: float = _opt(85.0, "warn when the spool's disk is this full",
                                    min=1, max=100)
    shutdown_grace_s: float = _opt(20.0, "seconds to flush and upload at shutdown",
                                   min=0, max=3600)
    # The spool's hard ceiling (ingest/spool.py). The percent is of the file
    # system as df counts: 90 leaves a tenth of the disk to the rest of the
    # host (the journal, and Postgres itself when it shares the state
    # directory and must write as it comes back), and comes after the 85 %
    # warning. No byte figure by default: the right one depends on the fleet
    # (100k devices at 6 s write about 1 MB/s), the percent fits any disk.
    spool_max_bytes: int = _opt(0, "hard ceiling of the spool's segment files in bytes; "
                                "0: none (spool_max_percent alone)", min=0, max=2**62)
    spool_max_percent: float = _opt(90.0, "the spool writes nothing that would take its "
                                    "file system past this share in use (as df counts); 100: "
                                    "until the disk is full", min=1, max=100)
    # Half: Postgres outages up to half the ceiling load from local disk as
    # always; past it S3 takes the closed segments, and the other half absorbs
    # an S3 outage on top, or the hour still open, before ticks are skipped.
    spool_high_water_percent: float = _opt(
        50.0, "past this share of the ceiling, segments already verified in S3 leave the "
        "disk before Postgres loads them (loaded from S3 later) and the open hour closes "
        "early to follow", min=1, max=100)
    # The archive is the complete record: by default nothing leaves the disk
    # before S3 has it, so a long S3 outage that fills the spool skips ticks.
    # An operator who prefers Postgres to go on filling may shed instead.
    shed_unarchived: bool = _opt(
        False, "at the spool ceiling with S3 away, delete segments Postgres has loaded "
        "although S3 lacks them (polling goes on, the archive misses them); false: skip "
        "ticks instead, counted")


@dataclass(frozen=True, slots=True)
class ApiSettings:
    enabled: bool = _opt(True, "serve the HTTP API, /metrics and health checks")
    host: str = _opt("127.0.0.1", "address the API binds", form="host")
    port: int = _opt(8640, "API port; 0 picks a free one", min=0, max=65535)
    admin_token: str = _opt("", "bearer token for writes", secret=True)
    read_token: str = _opt("", "bearer token for reads", secret=True)
    pool_max: int = _opt(4, "connections of the API's own Postgres pool (the loader has "
                         "its own)", min=1, max=100)
    statement_timeout_s: float = _opt(5.0, "Postgres cancels an API or readiness query "
                                      "running longer", min=0.01, max=3600)


# Storage classes a lifecycle rule may move archive objects to (AWS names,
# lower case here as every choice is; the rule sends them upper case).
STORAGE_CLASSES = ("standard_ia", "onezone_ia", "intelligent_tiering", "glacier_ir",
                   "glacier", "deep_archive")


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    # Defaults argued in the README ("Data lifecycle"): raw rows are the
    # costliest and S3 keeps them all; rollups are small and answer the
    # long charts. A coarser level never goes before a finer one.
    raw_days: int = _opt(14, "days of raw readings kept in PostgreSQL (whole UTC days before "
                         "today; a day goes only once S3 holds all of it); 0: forever",
                         min=0, max=36500)
    minute_days: int = _opt(90, "days of per-minute rollups kept; 0: forever", min=0, max=36500)
    hour_days: int = _opt(0, "days of per-hour rollups kept; 0: forever", min=0, max=36500)
    run_at_hour_utc: int = _opt(3, "UTC hour at which serve applies retention each day",
                                min=0, max=23)
    compact: bool = _opt(True, "after the daily retention run, pack each closed day's raw "
                         "readings into one row per device and hour (schema/007: about a "
                         "tenth of the bytes, every reading kept exactly)")
    replay_hold_days: int = _opt(7, "days a raw day reloaded by poller replay stays before "
                                 "retention may drop it again", min=0, max=36500)
    archive_cold_after_days: int = _opt(30, "poller archive lifecycle: days after upload at "
                                        "which archive objects move to archive_storage_class",
                                        min=1, max=36500)
    archive_storage_class: str = _opt("glacier_ir", "the colder S3 storage class archive "
                                      "objects move to (glacier_ir: read in milliseconds, "
                                      "so poller replay needs no restore)",
                                      choices=STORAGE_CLASSES)
    archive_expire_days: int = _opt(0, "poller archive lifecycle: days after upload at which "
                                    "S3 deletes archive objects; 0: never (the default: the "
                                    "archive is the complete record)", min=0, max=36500)


@dataclass(frozen=True, slots=True)
class RollupSettings:
    enabled: bool = _opt(True, "keep the per-minute and per-hour rollups (a worker in serve)")
    settle_s: float = _opt(30.0, "seconds after a minute (or an hour) ends before its rollup "
                           "is computed; later data marks it again", min=0, max=86400)
    interval_s: float = _opt(5.0, "seconds between two looks for dirty buckets", min=0.1,
                             max=3600)
    batch_minutes: int = _opt(10, "minutes recomputed per transaction", min=1, max=1440)


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    # Membership in Redis, devices by rendezvous hashing (poller.cluster);
    # the README's "Running a cluster" argues the defaults.
    enabled: bool = _opt(False, "share the fleet with the live instances of the same "
                         "cluster.name, by themselves (instead of polling.shard)")
    name: str = _opt("poller", "the cluster's name: its Redis keys and, unless "
                     "polling.phase_seed is set, the devices' phase seed (the same on every "
                     "member, so a moved device keeps its ticks)", form="instance")
    heartbeat_s: float = _opt(1.0, "seconds between two renewals of this instance's lease "
                              "(and looks at the view)", min=0.05, max=60)
    lease_s: float = _opt(3.0, "a member not renewed for this long is gone and its devices "
                          "move; lease_s + heartbeat_s below the shortest poll interval "
                          "gives failover within two intervals", min=0.2, max=600)
    handoff_timeout_s: float = _opt(10.0, "a graceful stop waits at most this long for the "
                                    "other members to take its devices over", min=0, max=600)


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = _opt("info", "log level", choices=("debug", "info", "warning", "error"))
    format: str = _opt("text", "log line format", choices=("text", "json"))


@dataclass(frozen=True, slots=True)
class Settings:
    state_dir: Path = _opt(Path("var"), "state directory (embedded servers, spool, key file)")
    instance_id: str = _opt("", "this instance's name in archive keys; empty: the host name",
                            form="instance")
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    polling: PollingSettings = field(default_factory=PollingSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    rollups: RollupSettings = field(default_factory=RollupSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    log: LogSettings = field(default_factory=LogSettings)


_SECTIONS: dict[str, type[Any]] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Settings)
    if f.default_factory is not dataclasses.MISSING
}
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_SHARD_RE = re.compile(r"([0-9]{1,6})/([0-9]{1,6})")


def _fields_of(cls: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def all_keys() -> list[str]:
    """Every configuration key, dotted, in declaration order."""
    keys: list[str] = []
    for f in dataclasses.fields(Settings):
        if f.name in _SECTIONS:
            keys.extend(f"{f.name}.{sub}" for sub in _fields_of(_SECTIONS[f.name]))
        else:
            keys.append(f.name)
    return keys


def env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


def _field_for(key: str) -> dataclasses.Field[Any]:
    section, _, name = key.partition(".")
    if name:
        cls = _SECTIONS.get(section)
        found = _fields_of(cls).get(name) if cls else None
    else:
        found = _fields_of(Settings).get(section)
        if found is not None and found.name in _SECTIONS:
            found = None
    if found is None:
        raise ConfigError(key, "unknown key (known keys: see `poller config show`)")
    return found


def _coerce(key: str, f: dataclasses.Field[Any], raw: Any, from_text: bool) -> Any:
    """Turn a TOML value (typed) or an env/flag string into the field's type."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    meta = f.metadata
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str) and raw.lower() in {"true", "1", "yes", "on",
                                                                  "false", "0", "no", "off"}:
            return raw.lower() in {"true", "1", "yes", "on"}
        raise ConfigError(key, f"expected true or false, got {raw!r}")
    if kind in ("int", "float"):
        value: float
        if isinstance(raw, bool):
            raise ConfigError(key, f"expected a number, got {raw!r}")
        try:
            if kind == "int":
                if isinstance(raw, float) or (isinstance(raw, str) and not from_text):
                    raise ValueError
                value = int(raw)
            else:
                if isinstance(raw, str) and not from_text:
                    raise ValueError
                value = float(raw)
        except (TypeError, ValueError):
            unit = " of seconds" if key.endswith("_s") else ""
            form = "a whole number" if kind == "int" else f"a number{unit}"
            raise ConfigError(key, f"expected {form}, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(key, f"expected a finite number, got {raw!r}")
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(key, f"expected a value between {lo:g} and {hi:g}, got {raw!r}")
        return value
    if kind == "Path":
        if not isinstance(raw, str) or not raw.strip():
            raise ConfigError(key, f"expected a path, got {raw!r}")
        return Path(raw)
    if kind == "tuple[str, ...]":
        return _coerce_list(key, raw, from_text)
    if not isinstance(raw, str):
        raise ConfigError(key, f"expected a string, got {raw!r}")
    if kind == "Shard | None":
        return parse_shard(key, raw) if raw else None
    return _check_string(key, raw, meta)


def _coerce_list(key: str, raw: Any, from_text: bool) -> tuple[str, ...]:
    """A TOML array of strings, or comma-separated text from the environment
    or ``--set``; each a CIDR network (the only list form so far), normalised.

    >>> _coerce_list("polling.allowed_networks", "127.0.0.0/8, ::1", True)
    ('127.0.0.0/8', '::1/128')
    """
    if from_text and isinstance(raw, str):
        items = [item for item in raw.split(",") if item.strip()]
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = raw
    else:
        raise ConfigError(key, f"expected a list of CIDR networks such as "
                          f"[\"10.0.0.0/8\", \"fd00::/8\"], got {raw!r}")
    networks: list[str] = []
    for item in items:
        try:
            networks.append(str(parse_network(item)))
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    return tuple(networks)


def _check_string(key: str, raw: str, meta: Mapping[str, Any]) -> str:
    choices = meta.get("choices")
    if choices and raw.lower() not in choices:
        raise ConfigError(key, f"expected one of {', '.join(choices)}, got {raw!r}")
    if choices:
        return raw.lower()
    form = meta.get("form")
    if form == "url" and raw and raw != "aws":
        parts = urlsplit(raw)
        if not parts.scheme or not (parts.netloc or parts.query or parts.path):
            raise ConfigError(key, f"expected a URL such as scheme://host:port/..., got {raw!r}")
    elif form == "bucket" and not _BUCKET_RE.match(raw):
        raise ConfigError(key, f"expected an S3 bucket name (3-63 of a-z 0-9 . -), got {raw!r}")
    elif form == "prefix" and raw and not _PREFIX_RE.match(raw):
        raise ConfigError(key, f"expected a key prefix like 'poller' or 'a/b', got {raw!r}")
    elif form == "instance" and raw and not _INSTANCE_RE.match(raw):
        raise ConfigError(key, f"expected 1-63 of A-Z a-z 0-9 _ . - , got {raw!r}")
    elif form == "host" and (not raw or any(c.isspace() for c in raw)):
        raise ConfigError(key, f"expected a host name or address, got {raw!r}")
    return raw


def parse_shard(key: str, raw: str) -> Shard:
    """``"k/n"`` -> ``Shard(k, n)`` with ``0 <= k < n``; ConfigError otherwise.

    >>> parse_shard("polling.shard", "1/4")
    Shard(k=1, n=4)
    """
    match = _SHARD_RE.fullmatch(raw.strip())
    if match is None:
        raise ConfigError(key, f"expected k/n such as 0/2 (this instance of n), got {raw!r}")
    k, n = int(match[1]), int(match[2])
    if not 0 <= k < n:
        raise ConfigError(key, f"expected 0 <= k < n in k/n, got {raw!r}")
    return Shard(k, n)


def _flatten_toml(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            if name not in _SECTIONS:
                raise ConfigError(name, f"unknown section in {source}")
            for sub, subvalue in value.items():
                flat[f"{name}.{sub}"] = subvalue
        else:
            flat[name] = value
    return flat


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("--config", f"no such file: {path}") from None
    except PermissionError:
        raise ConfigError("--config", f"cannot read {path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    return _flatten_toml(data, str(path))


def load(
    *,
    config_path: Path | None = DEFAULT_CONFIG_PATH,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from defaults, file, environment and flag overrides.

    ``config_path`` None: no file. The default path is read only if it exists;
    a path given explicitly must exist. ``overrides`` are ``key -> text`` from
    flags and win over everything else.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_path
    if "POLLER_CONFIG" in env and config_path == DEFAULT_CONFIG_PATH:
        path = Path(env["POLLER_CONFIG"])
    if path is not None and (path != DEFAULT_CONFIG_PATH or path.exists()):
        for key, raw in read_toml(path).items():
            values[key] = _coerce(key, _field_for(key), raw, from_text=False)
    known_env = {env_name(k): k for k in all_keys()}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        found = known_env.get(name)
        if found is None:
            raise ConfigError(name, "unknown environment variable (a typo? see "
                              "`poller config show --keys`)")
        values[found] = _coerce(found, _field_for(found), raw, from_text=True)
    for key, raw in (overrides or {}).items():
        values[key] = _coerce(key, _field_for(key), raw, from_text=True)
    return _build(values)


def _build(values: Mapping[str, Any]) -> Settings:
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    top: dict[str, Any] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        if name:
            sections[section][name] = value
        else:
            top[key] = value
    built = {name: cls(**sections[name]) for name, cls in _SECTIONS.items()}
    settings = Settings(**top, **built)
    if not settings.instance_id:
        host = socket.gethostname().split(".")[0] or "poller"
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", host)[:63]
        settings = dataclasses.replace(settings, instance_id=host)
    _cross_check(settings)
    return settings


def _cross_check(s: Settings) -> None:
    if s.polling.timeout_s >= s.polling.interval_s:
        raise ConfigError("polling.timeout_s", f"must be below polling.interval_s "
                          f"({s.polling.interval_s:g}), got {s.polling.timeout_s:g}")
    if s.api.enabled and not (s.api.admin_token or s.api.read_token) and \
            s.api.host not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError("api.host", "with no api.admin_token or api.read_token the API "
                          f"binds only to loopback (127.0.0.1, ::1), got {s.api.host!r}")
    _check_retention(s.retention)
    _check_cluster(s)
    for key in ("admin_token", "read_token"):
        token = getattr(s.api, key)
        if token and len(token) < 16:
            raise ConfigError(f"api.{key}", "expected a token of at least 16 characters")


def _check_cluster(s: Settings) -> None:
    c = s.cluster
    if c.enabled and s.polling.shard is not None:
        raise ConfigError("polling.shard", "must be empty with cluster.enabled (the cluster "
                          f"assigns devices itself), got {s.polling.shard}")
    if c.lease_s < 2 * c.heartbeat_s:
        raise ConfigError("cluster.lease_s", "must be at least twice cluster.heartbeat_s "
                          f"({c.heartbeat_s:g}), so one late heartbeat does not end the "
                          f"lease; got {c.lease_s:g}")


def _check_retention(r: RetentionSettings) -> None:
    """A coarser level is kept at least as long as a finer one (0: forever),
    so a chart never finds a finer level where the coarser one is gone."""
    def keep(days: int) -> float:
        return float("inf") if days == 0 else days

    for finer, coarser in (("raw_days", "minute_days"), ("minute_days", "hour_days")):
        if keep(getattr(r, coarser)) < keep(getattr(r, finer)):
            shown = getattr(r, finer) or "0 (forever)"
            raise ConfigError(f"retention.{coarser}", f"must keep at least as long as "
                              f"retention.{finer} ({shown}), or 0 for forever; got "
                              f"{getattr(r, coarser)}")
    if r.archive_storage_class in ("standard_ia", "onezone_ia") and \
            r.archive_cold_after_days < 30:
        # S3 refuses such a rule: the infrequent-access classes bill 30 days anyway.
        raise ConfigError("retention.archive_cold_after_days", "must be at least 30 for "
                          f"{r.archive_storage_class}; got {r.archive_cold_after_days}")
    if r.archive_expire_days and r.archive_expire_days <= r.archive_cold_after_days:
        raise ConfigError("retention.archive_expire_days", "must be 0 (never delete) or later "
                          f"than retention.archive_cold_after_days "
                          f"({r.archive_cold_after_days}); got {r.archive_expire_days}")


def parse_override(text: str) -> tuple[str, str]:
    """``section.key=value`` from ``--set`` -> (key, value)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"expected KEY=VALUE such as polling.interval_s=10, "
                          f"got {text!r}")
    key = key.strip()
    _field_for(key)
    return key, value


def as_dict(settings: Settings, *, redact: bool = True) -> dict[str, Any]:
    """The effective settings, nested like the TOML file, secrets redacted."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name in _SECTIONS:
            sub: dict[str, Any] = {}
            for g in dataclasses.fields(value):
                item = getattr(value, g.name)
                if redact and g.metadata.get("secret") and item:
                    item = REDACTED
                elif g.type == "Shard | None":
                    item = "" if item is None else str(item)  # as the file writes it: "k/n"
                sub[g.name] = item
            out[f.name] = sub
        else:
            out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, environment variable, help) for every key."""
    rows = []
    for key in all_keys():
        rows.append((key, env_name(key), str(_field_for(key).metadata.get("help", ""))))
    return rows


def to_toml(data: Mapping[str, Any]) -> str:
    """Render :func:`as_dict` output as TOML (flat values and lists of strings)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for name, value in data.items():
        if isinstance(value, Mapping):
            tables.append((name, value))
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
