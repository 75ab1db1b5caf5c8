"""contenthubd: turns schedules into published articles, unattended, on one server.

One asyncio process owns a cron loop, a bounded worker pool that runs content-creator CLI
subprocesses, a poll loop for asynchronous creators, and a Unix-socket control channel. All
state lives in one SQLite file; every state change is one short transaction.

The file reads top to bottom; each section uses only the ones above it:

    Constants and errors    names, limits, the exceptions the control channel maps to codes
    Config                  TOML + ASYNC_* environment -> frozen Config, every error listed;
                            LiveConfig, the running one that a reload swaps
    Logging and sd_notify   structlog setup; systemd's notify protocol without a dependency
    Topics                  topic normalisation, a firing's topic slots, research replies
    Failure classes         the error-class vocabulary, structured errors, the circuit breaker
    Store                   schema.sql, the writer thread and the loop's short writes, every
                            SQL statement
    Creator runner          argv templates, process groups, capped capture, output adapters
    Spend                   usage per attempt, prices, budget windows, creator pacing
    Executors               the registry scheduled work runs through (content, research, publish,
                            cleanup)
    Scheduler               the cron loop: fire, misfire and overlap policies
    Media capture           saves articles' images under state_dir/media before URLs expire
    Worker pool             claims tasks, runs creators, retries, timeouts, cancel
    Poll loop               drives tasks whose creator works asynchronously
    Metrics                 Prometheus text: gauges, the schema's monotonic counters, textfile
    Control server          the NDJSON Unix socket behind contenthubctl
    Notifications           [[notify]] and [[hooks]]: the outbox's delivery loop, formats,
                            signatures
    Built-in creator        `contenthubd create`: offline drafts or an OpenAI-compatible LLM;
                            `contenthubd research-topics`: topics from the same LLM
    App                     startup -> main_loop -> shutdown, reload, signals
    CLI entry               main()
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import errno
import fcntl
import functools
import grp
import heapq
import importlib.util
import ipaddress
import json
import math
import os
import pwd
import re
import shutil
import signal
import struct
import sys
import threading
import time
import types
import unicodedata
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import islice, takewhile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def lazy_import(name: str) -> types.ModuleType:
    """What `import name` binds (the top-level package), with `name` itself executed only at
    its first attribute access (importlib's LazyLoader); an imported module is returned as is."""
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None, name
        spec.loader = importlib.util.LazyLoader(spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    return sys.modules[name.partition(".")[0]]


#: Imported at first use, not here, so that a `contenthubd create` process (one per task, see
#: creator_argv) never loads what only the daemon needs: an offline draft takes the light half
#: of the standard library. The daemon loads them all at start (main), on one thread, since
#: a lazy module's first load is not thread-safe. mypy reads the real imports.
DAEMON_MODULES = ("aiosqlite", "asyncio", "croniter", "ctypes", "email.utils", "hashlib", "hmac",
                  "http.client", "queue", "random", "secrets", "socket", "sqlite3", "ssl",
                  "structlog", "subprocess", "tomllib", "urllib.error", "urllib.request")
if TYPE_CHECKING:
    import asyncio
    import ctypes
    import email.utils
    import hashlib
    import hmac
    import http.client
    import queue
    import random
    import secrets
    import socket
    import sqlite3
    import ssl
    import subprocess
    import tomllib
    import urllib.error
    import urllib.request

    import aiosqlite
    import croniter
    import structlog
else:
    aiosqlite = lazy_import("aiosqlite")
    asyncio = lazy_import("asyncio")
    croniter = lazy_import("croniter")
    ctypes = lazy_import("ctypes")
    email = lazy_import("email.utils")
    hashlib = lazy_import("hashlib")
    hmac = lazy_import("hmac")
    http = lazy_import("http.client")
    queue = lazy_import("queue")
    random = lazy_import("random")
    secrets = lazy_import("secrets")
    socket = lazy_import("socket")
    sqlite3 = lazy_import("sqlite3")
    ssl = lazy_import("ssl")
    structlog = lazy_import("structlog")
    subprocess = lazy_import("subprocess")
    tomllib = lazy_import("tomllib")
    urllib = lazy_import("urllib.error")
    urllib = lazy_import("urllib.request")

__version__ = "0.2.0.dev0"

# Constants and errors ##########################################################################

#: Next to this file in a checkout or editable install; under share/ in a wheel install.
SCHEMA_PATH = next((p for p in (Path(__file__).with_name("schema.sql"),
                                Path(sys.prefix, "share", "contenthubd", "schema.sql"))
                    if p.exists()), Path(__file__).with_name("schema.sql"))
#: A line of schema.sql that starts the step to schema version N (see schema.sql's header).
MIGRATION_HEADER = re.compile(r"^-- migration (\d+): (.+)$", re.MULTILINE)

TERMINAL_STATUSES = ("completed", "failed", "timeout", "cancelled")
ACTIVE_STATUSES = ("pending", "submitted", "running")
MAX_LINE_BYTES = 1 << 20  #: control-socket request limit
TASK_ID_MATCHES_SHOWN = 5  #: an ambiguous abbreviated task id names this many candidates
KILL_GRACE_S = 5.0  #: SIGTERM -> SIGKILL for a creator's process group
PIPE_DRAIN_S = 2.0  #: how long stray grandchildren may hold the pipes after the creator exits
POLL_COMMAND_TIMEOUT_S = 60.0  #: an async creator's submit/status/result/cancel command
ASYNC_RESULT_READS = 3  #: result command runs for a completed remote job before giving up
POLL_BACKOFF_MAX = 8  #: an unchanging job is polled at least every this many poll_intervals
POLL_ROUND_FACTOR = 4  #: status commands per poll round: this times max_concurrent_tasks
STATUS_BATCH_MAX = 100  #: external ids one status_batch_command run is asked about
ASYNC_RESULT_REREAD_S = 1.0  #: wait before the next read, times the reads so far
PROGRESS_LINE_MAX = 4096  #: longer stdout lines are never progress reports
PID_RECORD_DELAY_S = 1.0  #: a creator running longer than this gets its pid in the database
PIPE_WATCH_DELAY_S = 0.05  #: a creator's pipes are read live once it has run this long
STDERR_TAIL_CHARS = 2000
MEDIA_DIR = "media"  #: under state_dir: media/<content_id>/<position>-<name>.<ext>
EX_CONFIG = 78  #: sysexits.h; the unit's RestartPreventExitStatus= stops restarts on it
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
ENV_REF_RE = re.compile(r"\$\{(\w+)\}")  #: `${VAR}` in creator.env and [[notify]]


class ContentHubError(Exception):
    """An error with a control-protocol code; its message is shown to the operator."""

    code = "internal"

    def __init__(self, message: str, data: Any = None):
        super().__init__(message)
        self.data = data


class InvalidRequest(ContentHubError):
    code = "invalid"


class NotFound(ContentHubError):
    code = "not_found"


class Conflict(ContentHubError):
    code = "conflict"


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do, `exit_code` how to end."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(ContentHubError):
    """Every problem found in a config file, one per line."""

    code = "invalid"

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors), data={"errors": errors})
        self.errors = errors


def utc_now() -> datetime:
    return datetime.now(UTC)


#: The GIL switch interval while a thread computes for long (Python's is 5 ms)
BUSY_THREAD_SWITCH_INTERVAL_S = 0.0001
NORMAL_SWITCH_INTERVAL_S = sys.getswitchinterval()
_Result = TypeVar("_Result")


async def in_thread_sharing_gil(work: Callable[..., _Result], *args: Any) -> _Result:
    """`work(*args)` in a thread that computes for long (a parse of 10,000 schedules), with
    the event loop's thread never waiting long for the GIL meanwhile. The loop's thread gives
    the GIL up in every system call and SQLite call, and getting it back from a computing
    thread takes up to the switch interval: at 5 ms, a reload of 10,000 edited schedules made
    a short write of eight rows on the loop take 16-53 ms. So the interval is 0.1 ms until
    `work` returns, then the normal one again (of two that overlap, the later one may end at
    the normal interval; the short one never outlasts them)."""

    def run() -> _Result:
        sys.setswitchinterval(BUSY_THREAD_SWITCH_INTERVAL_S)
        try:
            return work(*args)
        finally:
            sys.setswitchinterval(NORMAL_SWITCH_INTERVAL_S)

    return await asyncio.to_thread(run)


@overload
def to_db_time(moment: datetime) -> str: ...
@overload
def to_db_time(moment: datetime | None) -> str | None: ...
def to_db_time(moment: datetime | None) -> str | None:
    """UTC ISO-8601 with milliseconds and a Z: sorts as text, and sqlite3 can read it."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@overload
def from_db_time(text: str) -> datetime: ...
@overload
def from_db_time(text: str | None) -> datetime | None: ...
def from_db_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def new_task_id(now: datetime) -> str:
    """`task-` + milliseconds + random: sortable by creation, unique without coordination."""
    return f"task-{int(now.timestamp() * 1000):013d}-{secrets.token_hex(4)}"


def new_event_id(now: datetime) -> str:
    """`evt-` + milliseconds + random: a notification's id, the same on every attempt."""
    return f"evt-{int(now.timestamp() * 1000):013d}-{secrets.token_hex(4)}"


def is_secret_name(name: str) -> bool:
    return any(marker in name.upper() for marker in SECRET_MARKERS)


class BackgroundLoop:
    """A long-lived loop that sleeps on an event between rounds: start(), wake(), stop().
    Subclasses write `_loop()`, checking `is_running`, and sleep with `_sleep()`."""

    loop_name = "loop"

    def __init__(self) -> None:
        self._wake = asyncio.Event()
        self._running = False
        self._loop_task: asyncio.Task | None = None

    @property
    def is_running(self) -> bool:
        return self._running

    async def start(self) -> None:
        self._running = True
        self._loop_task = asyncio.create_task(self._loop(), name=self.loop_name)

    async def stop(self) -> None:
        """Idempotent: the current round finishes, then the loop ends."""
        self._running = False
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
            self._loop_task = None

    def wake(self) -> None:
        self._wake.set()

    async def _sleep(self, seconds: float | None) -> None:
        """Until woken or `seconds` pass (None: until woken)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _loop(self) -> None:
        raise NotImplementedError

# Config ########################################################################################

_DURATION_UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_DURATION_TEXT = re.compile(r"(?:\d+(?:\.\d+)?[dhms]\s*)+")
_DURATION_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(value: str | int | float) -> float:
    """Seconds in `value`: bare seconds (90, 1.5, "90") or units d/h/m/s ("90s", "2h", "1h30m")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value) and value >= 0:
            return float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _DURATION_NUMBER.fullmatch(text):
            return float(text)
        if _DURATION_TEXT.fullmatch(text):
            return sum(float(n) * _DURATION_UNIT_S[u] for n, u in _DURATION_PART.findall(text))
    raise ValueError(
        f"invalid duration {value!r}: use seconds (90) or a number with a unit d, h, m or s"
        " (90s, 30m, 2h, 1d, 1h30m)"
    )


def parse_size(value: Any) -> int:
    """Bytes from `8MiB`, `512KiB`, `1GB`, or a bare integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B|B)?\s*", str(value), re.IGNORECASE)
    if not match or isinstance(value, bool):
        raise ValueError(f"expected a size like '8MiB', got {value!r}")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}[unit]
    return int(match.group(1)) * scale


def _parse_mode(value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    raise ValueError(f"expected an octal mode like '0660', got {value!r}")


def _parse_timezone(value: Any) -> str:
    try:
        ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {value!r}") from None
    return str(value)


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return value

    return parse


def _typed(kind: type) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise ValueError(f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return value

    return parse


def _str_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return list(value)


def _int_list(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"expected a list of integers, got {value!r}")
    return list(value)


def _str_table(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"expected a table of strings, got {value!r}")
    return dict(value)


def _non_negative(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        parsed = parse(value)
        if parsed < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        return parsed

    return check


def _positive(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        parsed = parse(value)
        if parsed <= 0:
            raise ValueError(f"must be positive, got {value!r}")
        return parsed

    return check


_RATE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*")
_RATE_UNIT_S = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
                "h": 3600.0, "hour": 3600.0}


def parse_rate(value: Any) -> float:
    """Events per second from "4/s", "240/min" or "1000/h"; "" or 0 means no limit (0.0)."""
    if value in ("", 0) and not isinstance(value, bool):
        return 0.0
    match = _RATE_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"expected a rate like \"4/s\", \"240/min\" or \"1000/h\", got {value!r}")
    return float(match[1]) / _RATE_UNIT_S[match[2]]


def _clock_minutes(text: str) -> int:
    hours, _, minutes = text.partition(":")
    if not (hours.isdigit() and minutes.isdigit() and int(hours) < 24 and int(minutes) < 60):
        raise ValueError(f"expected HH:MM, got {text!r}")
    return int(hours) * 60 + int(minutes)


@dataclass(frozen=True)
class ModelPrice:
    """Price per million tokens; off-peak (local time window "HH:MM-HH:MM") scales both."""

    input: float
    output: float
    off_peak: tuple[int, int] | None = None  #: (start, end) minutes after local midnight
    off_peak_factor: float = 1.0

    def cost(self, tokens_in: int, tokens_out: int, local: datetime) -> float:
        factor = 1.0
        if self.off_peak is not None:
            start, end = self.off_peak
            minute = local.hour * 60 + local.minute
            inside = start <= minute < end if start <= end else (minute >= start or minute < end)
            factor = self.off_peak_factor if inside else 1.0
        return (tokens_in * self.input + tokens_out * self.output) * factor / 1_000_000


def _parse_prices(value: Any) -> dict[str, ModelPrice]:
    """[budget.prices]: "model" = { input = 2.0, output = 8.0 [, off_peak = "00:30-08:30",
    off_peak_factor = 0.5] }, prices per million tokens."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of models, got {value!r}")
    prices = {}
    for model, entry in value.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{model!r}: expected {{ input = ..., output = ... }}, got {entry!r}")
        unknown = set(entry) - {"input", "output", "off_peak", "off_peak_factor"}
        if unknown:
            raise ValueError(f"{model!r}: unknown key(s) {', '.join(sorted(unknown))}; use"
                             " input, output, off_peak, off_peak_factor")
        numbers = {}
        for name, default in (("input", None), ("output", None), ("off_peak_factor", 1.0)):
            number = entry.get(name, default)
            if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
                raise ValueError(f"{model!r}.{name}: expected a number >= 0, got {number!r}")
            numbers[name] = float(number)
        window = None
        if "off_peak" in entry:
            text = entry["off_peak"]
            start, dash, end = text.partition("-") if isinstance(text, str) else ("", "", "")
            if not dash:
                raise ValueError(f"{model!r}.off_peak: expected \"HH:MM-HH:MM\", got {text!r}")
            try:
                window = (_clock_minutes(start.strip()), _clock_minutes(end.strip()))
            except ValueError as exc:
                raise ValueError(f"{model!r}.off_peak: {exc}") from None
        prices[model] = ModelPrice(numbers["input"], numbers["output"], window,
                                   numbers["off_peak_factor"])
    return prices


def _key(parse: Callable[[Any], Any], env: str | None = None, **kwargs: Any) -> Any:
    """A config field: how its TOML value is parsed, and ContentHub's environment override."""
    return field(metadata={"parse": parse, "env": env}, **kwargs)


def _interval_value(value: Any) -> int | float | str:
    if isinstance(value, str) or (isinstance(value, (int, float))
                                  and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError(f"expected a duration like \"2h\" or a positive number with"
                     f" interval_unit, got {value!r}")


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: str = _key(_typed(str), default="./state")
    database: str = _key(_typed(str), default="contenthub.db")
    socket: str = _key(_typed(str), default="contenthubd.sock")
    socket_mode: int = _key(_parse_mode, default=0o660)
    socket_group: str = _key(_typed(str), default="")
    timezone: str = _key(_parse_timezone, default="Asia/Shanghai")
    max_concurrent_tasks: int = _key(_positive(_typed(int)), "ASYNC_MAX_CONCURRENT_TASKS",
                                     default=5)
    max_concurrent_per_account: int = _key(_non_negative(_typed(int)), default=0)
    task_timeout: float = _key(_positive(parse_duration), "ASYNC_TASK_TIMEOUT", default=1800.0)
    poll_interval: float = _key(_positive(parse_duration), "ASYNC_POLL_INTERVAL", default=30.0)
    max_retries: int = _key(_non_negative(_typed(int)), "ASYNC_MAX_RETRIES", default=3)
    retry_backoff: float = _key(parse_duration, "ASYNC_RETRY_BACKOFF", default=60.0)
    retry_backoff_max: float = _key(parse_duration, default=3600.0)
    auto_approve: bool = _key(_typed(bool), "ASYNC_AUTO_APPROVE", default=False)
    shutdown_grace: float = _key(parse_duration, default=10.0)
    log_format: str = _key(_choice("auto", "json", "console"), default="auto")
    log_level: str = _key(_choice("debug", "info", "warning", "error"), default="info")
    retention_days: int = _key(_non_negative(_typed(int)), default=30)
    max_batch: int = _key(_positive(_typed(int)), default=100)
    #: a firing never gives an account a topic it had within this many days; 0 = off
    topic_repeat_days: int = _key(_non_negative(_typed(int)), default=90)
    max_catch_up: int = _key(_positive(_typed(int)), default=24)
    max_connections: int = _key(_positive(_typed(int)), default=64)
    connection_idle_timeout: float = _key(_positive(parse_duration), default=300.0)
    #: node_exporter textfile (e.g. /var/lib/node_exporter/textfile/contenthub.prom), written
    #: every 15 s and on change; relative to state_dir; "" writes none
    metrics_textfile: str = _key(_typed(str), default="")
    #: Fair share of the control socket: no one uid holds more than this many connections.
    max_connections_per_uid: int = _key(_positive(_typed(int)), default=16)
    #: A connection that has not sent one full request line by then is closed.
    connection_first_line_timeout: float = _key(_positive(parse_duration), default=10.0)
    #: A reply the client does not read for this long closes the connection.
    connection_write_timeout: float = _key(_positive(parse_duration), default=30.0)


@dataclass(frozen=True)
class LLMConfig:
    base_url: str = _key(_typed(str), default="https://api.deepseek.com/v1")
    model: str = _key(_typed(str), default="deepseek-chat")
    api_key_env: str = _key(_typed(str), default="LLM_API_KEY")
    timeout: float = _key(_positive(parse_duration), default=120.0)


@dataclass(frozen=True)
class CreatorConfig:
    kind: str = _key(_choice("builtin", "command"), default="builtin")
    mode: str = _key(_choice("sync", "async"), default="sync")
    command: list[str] = _key(_str_list, default_factory=list)
    output: str = _key(_choice("json", "content-creator-text"), default="json")
    #: content-creator requires -r; a task without requirements gets this instead.
    default_requirements: str = _key(_typed(str), default="")
    cwd: str = _key(_typed(str), default="")
    env: dict[str, str] = _key(_str_table, default_factory=dict)
    permanent_exit_codes: list[int] = _key(_int_list, default_factory=lambda: [2])
    max_output: int = _key(parse_size, default=8 << 20)
    kill_grace: float = _key(parse_duration, default=KILL_GRACE_S)
    health_command: list[str] = _key(_str_list, default_factory=list)
    health_timeout: float = _key(_positive(parse_duration), default=10.0)
    #: how often an open circuit breaker tries the creator again
    breaker_probe: float = _key(_positive(parse_duration), default=300.0)
    submit_command: list[str] = _key(_str_list, default_factory=list)
    status_command: list[str] = _key(_str_list, default_factory=list)
    #: many jobs' status in one run: `{external_ids}` is one argv element per id
    status_batch_command: list[str] = _key(_str_list, default_factory=list)
    result_command: list[str] = _key(_str_list, default_factory=list)
    cancel_command: list[str] = _key(_str_list, default_factory=list)
    #: what `topic_research` runs instead of the built-in LLM request: the request as JSON on
    #: stdin, a JSON array of topics on stdout
    topics_command: list[str] = _key(_str_list, default_factory=list)
    topics_timeout: float = _key(_positive(parse_duration), default=300.0)
    #: creator starts per second across the pool ("4/s", "240/min"); 0 = unlimited
    rate_limit: float = _key(parse_rate, default=0.0)
    llm: LLMConfig = field(default_factory=LLMConfig, metadata={"section": LLMConfig})


def _network_list(value: Any) -> list[str]:
    """CIDR ranges ("127.0.0.0/8", "10.1.2.3", "fd00::/8"), each checked, kept as text."""
    for network in _str_list(value):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"{network!r} is not an IP address or CIDR range") from None
    return list(value)


@dataclass(frozen=True)
class MediaConfig:
    """[media]: images of completed articles are saved under state_dir/media/<content_id>/."""

    enabled: bool = _key(_typed(bool), default=True)
    max_bytes: int = _key(parse_size, default=20 << 20)
    timeout: float = _key(_positive(parse_duration), default=60.0)
    max_redirects: int = _key(_non_negative(_typed(int)), default=3)
    max_attempts: int = _key(_positive(_typed(int)), default=5)
    retry_backoff: float = _key(_positive(parse_duration), default=60.0)
    concurrency: int = _key(_positive(_typed(int)), default=2)
    #: Only these hosts (and their subdomains) when set; any public host when empty.
    allowed_hosts: list[str] = _key(_str_list, default_factory=list)
    #: Loopback, private and link-local addresses are refused unless listed here.
    allow_private: list[str] = _key(_network_list, default_factory=list)


@dataclass(frozen=True)
class PublishConfig:
    command: list[str] = _key(_str_list, default_factory=list)
    max_attempts: int = _key(_positive(_typed(int)), default=3)
    timeout: float = _key(_positive(parse_duration), default=300.0)


@dataclass(frozen=True)
class BudgetConfig:
    """Spend limits (0 = none) in `currency`, calendar days and months of daemon.timezone."""

    currency: str = _key(_typed(str), default="CNY")
    daily: float = _key(_non_negative(_typed(float)), default=0.0)
    monthly: float = _key(_non_negative(_typed(float)), default=0.0)
    #: the cost a task is expected to have before any attempt has reported one
    estimate: float = _key(_non_negative(_typed(float)), default=0.0)
    prices: dict[str, ModelPrice] = _key(_parse_prices, default_factory=dict)


@dataclass(frozen=True)
class HookConfig:
    on: list[str] = _key(_str_list, default_factory=lambda: ["completed", "failed", "timeout"])
    command: list[str] = _key(_str_list, default_factory=list)
    timeout: float = _key(_positive(parse_duration), default=30.0)


#: Every event a [[notify]] target may list. Issues other than notifications emit the
#: creator.*, budget.* and topics.* ones through Store.enqueue_event.
NOTIFY_EVENTS = ("content.ready", "task.failed", "schedule.failed", "schedule.missed",
                 "creator.tripped", "creator.recovered", "budget.exhausted", "topics.low",
                 "digest")
NOTIFY_FORMATS = ("json", "wecom", "feishu", "dingtalk", "slack")
#: What [[hooks]] entries receive: every terminal transition of a task, with the task and its
#: content (not listed in NOTIFY_EVENTS: a hook is a command target the daemon makes).
HOOK_EVENT = "task.finished"


@dataclass(frozen=True)
class NotifyConfig:
    """One [[notify]] target: a URL (HTTP POST) or a command (the body on stdin)."""

    name: str = _key(_typed(str), default="")
    url: str = _key(_typed(str), default="")
    command: list[str] = _key(_str_list, default_factory=list)
    format: str = _key(_choice(*NOTIFY_FORMATS), default="json")
    #: every event but digest unless listed; digest is sent at digest_cron when listed
    events: list[str] = _key(_str_list, default_factory=lambda: [
        e for e in NOTIFY_EVENTS if e != "digest"])
    secret: str = _key(_typed(str), default="")
    timeout: float = _key(_positive(parse_duration), default=10.0)
    max_attempts: int = _key(_positive(_typed(int)), default=10)
    retry_backoff: float = _key(_positive(parse_duration), default=5.0)
    accounts: list[int] = _key(_int_list, default_factory=list)
    schedules: list[str] = _key(_str_list, default_factory=list)
    digest_cron: str = _key(_typed(str), default="0 9 * * *")


@dataclass(frozen=True)
class AccountConfig:
    id: int = _key(_typed(int), default=0)
    name: str = _key(_typed(str), default="")
    category: str = _key(_typed(str), default="")
    enabled: bool = _key(_typed(bool), default=True)
    daily_budget: float = _key(_non_negative(_typed(float)), default=0.0)
    monthly_budget: float = _key(_non_negative(_typed(float)), default=0.0)


@dataclass(frozen=True, slots=True)
class ScheduleConfig:
    name: str = _key(_typed(str), default="")
    executor: str = _key(_typed(str), default="async_content_generation")
    cron: str = _key(_typed(str), default="")
    every: Any = _key(lambda v: v, default=None)
    #: a duration ("2m", like `every`) or ContentHub's number with `interval_unit`
    interval: Any = _key(_interval_value, default=None)
    interval_unit: str = _key(_typed(str), default="")
    timezone: str = _key(_parse_timezone, default="")
    misfire: str = _key(_choice("skip", "once", "all"), default="once")
    misfire_grace: float = _key(parse_duration, default=0.0)
    overlap: str = _key(_choice("skip", "allow"), default="skip")
    enabled: bool = _key(_typed(bool), default=True)
    description: str = _key(_typed(str), default="")
    params: dict = _key(_typed(dict), default_factory=dict)


@dataclass(frozen=True)
class ScheduleBlocks:
    """A config file cut at its table headers (split_schedule_blocks): the text of each
    [[schedules]] block, from its header through its sub-tables to the next table, and the
    rest of the file, in order."""

    rest: str
    schedules: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    creator: CreatorConfig = field(default_factory=CreatorConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    accounts: tuple[AccountConfig, ...] = ()
    schedules: tuple[ScheduleConfig, ...] = ()
    hooks: tuple[HookConfig, ...] = ()
    notify: tuple[NotifyConfig, ...] = ()
    path: str = ""  #: the file it came from, "" for the embedded default
    #: where each effective daemon/creator value came from: "file", "env" or "default"
    sources: dict[str, str] = field(default_factory=dict)
    text: str = ""  #: the file's text, kept so `scheduler create` can append byte for byte
    #: how `text` splits into its [[schedules]] blocks and the rest (split_schedule_blocks);
    #: None when it was parsed whole
    blocks: ScheduleBlocks | None = None

    @property
    def base_dir(self) -> Path:
        return Path(self.path).resolve().parent if self.path else Path.cwd()

    @functools.cached_property
    def accounts_by_id(self) -> dict[int, AccountConfig]:
        """[[accounts]] by id, built once per config: every schedule's check looks them up."""
        return {account.id: account for account in self.accounts}

    def state_dir(self, environ: dict[str, str]) -> Path:
        """systemd's STATE_DIRECTORY wins; a relative state_dir is relative to the config."""
        if environ.get("STATE_DIRECTORY"):
            return Path(environ["STATE_DIRECTORY"].split(":")[0])
        return (self.base_dir / self.daemon.state_dir).resolve()

    def database_path(self, environ: dict[str, str]) -> Path:
        return self.state_dir(environ) / self.daemon.database

    def socket_path(self, environ: dict[str, str]) -> Path:
        base = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        return (Path(base) if base else self.state_dir(environ)) / self.daemon.socket

    def creator_cwd(self, environ: dict[str, str]) -> Path:
        if self.creator.cwd:
            return (self.base_dir / self.creator.cwd).resolve()
        return self.state_dir(environ) / "creator"


PLACEHOLDER_RE = re.compile(r"\{(\w+)\}")
PLACEHOLDERS = ("task_id", "account_id", "account_name", "topic", "keywords", "category",
                "requirements", "tone", "target_audience", "priority", "priority_level",
                "external_id")
PUBLISH_PLACEHOLDERS = ("content_id", "task_id", "account_id", "title")
#: status_batch_command's one placeholder, a whole argv element: the ids, one element each
STATUS_BATCH_IDS = "{external_ids}"
TOPICS_PLACEHOLDERS = ("account_id", "account_name", "category", "count", "hint")


def unknown_placeholders(template: list[str], allowed: tuple[str, ...]) -> list[str]:
    return sorted({name for part in template for name in PLACEHOLDER_RE.findall(part)
                   if name not in allowed})


SECTION_ENTRIES = {"accounts": AccountConfig, "schedules": ScheduleConfig, "hooks": HookConfig,
                   "notify": NotifyConfig}


def _line_of(text: str, key: str, after: int = 0) -> int:
    """The 1-based line where `key =` first appears at or after line `after` (0 if unknown)."""
    pattern = re.compile(rf"^\s*(\"?){re.escape(key)}\1\s*=")
    for number, line in enumerate(text.splitlines()[after:], start=after + 1):
        if pattern.match(line):
            return number
    return 0


def _header_lines(text: str, header: str) -> list[int]:
    """0-based line numbers of every `[header]` or `[[header]]` line."""
    pattern = re.compile(rf"^\s*\[\[?\s*{re.escape(header)}\s*\]\]?\s*(#.*)?$")
    return [i for i, line in enumerate(text.splitlines()) if pattern.match(line)]


#: `schedules[3].cron` at the start of an error about one key of one entry.
_ENTRY_KEY = re.compile(r"^(\w+\[\d+\])\.(\w+)")
#: Keys that together make one trigger: an error in one is an error in the trigger.
_TRIGGER_KEYS = ("cron", "every", "interval", "interval_unit")


def _error_subject(error: str) -> tuple[str, str] | None:
    """(entry, key) an error is about, the trigger keys counting as one."""
    match = _ENTRY_KEY.match(error)
    if match is None:
        return None
    key = match.group(2)
    return match.group(1), "trigger" if key in _TRIGGER_KEYS else key


def _entry_line_of(text: str, section: str, start: int, key: str) -> int:
    """The 1-based line of `key` in the [[section]] entry whose header is line `start`
    (0-based): its `key =` line, else its [section.key] sub-table, else the header itself.
    The search ends with the entry, so a key the entry lacks never names the next one's."""
    own_key = re.compile(rf"^\s*(\"?){re.escape(key)}\1\s*=")
    own_table = re.compile(rf"^\s*\[\[?\s*{re.escape(section)}\s*\.\s*(\"?)"
                           rf"{re.escape(key)}\1\s*\]")
    sub_table = re.compile(rf"^\s*\[\[?\s*{re.escape(section)}\s*\.")
    in_sub_table = False
    for number, line in enumerate(text.splitlines()[start + 1:], start=start + 2):
        if line.lstrip().startswith("["):
            if not sub_table.match(line):
                break
            if own_table.match(line):
                return number
            in_sub_table = True
        elif not in_sub_table and own_key.match(line):
            return number
    return start + 1


def entry_key_location(config: Config, section: str, index: int, key: str) -> str:
    """`schedules[2].cron (line 31)`: where an error about one key of one entry points; a
    key the entry lacks points at the entry's header."""
    starts = _header_lines(config.text, section)
    line = _entry_line_of(config.text, section, starts[index], key) if index < len(starts) else 0
    return f"{section}[{index}].{key}" + (f" (line {line})" if line else "")


def _build_section(cls: type, table: Any, where: str, text: str, start: Callable[[], int],
                   errors: list[str], sources: dict[str, str] | None = None,
                   environ: dict[str, str] | None = None) -> Any:
    """One dataclass from one TOML table, collecting every problem into `errors`. `start`
    gives the 0-based line the table starts at; only an error asks for it."""
    if not isinstance(table, dict):
        errors.append(f"{where}: expected a table, got {type(table).__name__}")
        return cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}

    def located(key: str) -> str:
        # Line numbers cost a scan of the text: only an error pays for one.
        line = _line_of(text, key, start())
        return f"{where}.{key}" + (f" (line {line})" if line else "")

    for key, raw in table.items():
        spec = known.get(key)
        if spec is None:
            errors.append(f"{located(key)}: unknown key")
            continue
        if "section" in spec.metadata:
            values[key] = _build_section(spec.metadata["section"], raw, f"{where}.{key}", text,
                                         start, errors, sources, environ)
            continue
        try:
            values[key] = spec.metadata["parse"](raw)
        except ValueError as exc:
            errors.append(f"{located(key)}: {exc}")
            continue
        if sources is not None:
            sources[f"{where}.{key}"] = "file"
    for name, spec in known.items():
        env_name = spec.metadata.get("env")
        if env_name and environ is not None and environ.get(env_name, "") != "":
            raw_env: Any = environ[env_name]
            if spec.type in ("int", int):
                raw_env = int(raw_env) if raw_env.lstrip("-").isdigit() else raw_env
            elif spec.type in ("bool", bool):
                raw_env = {"true": True, "1": True, "yes": True, "false": False, "0": False,
                           "no": False}.get(raw_env.lower(), raw_env)
            try:
                values[name] = spec.metadata["parse"](raw_env)
            except ValueError as exc:
                errors.append(f"environment {env_name}: {exc}")
                continue
            if sources is not None:
                sources[f"{where}.{name}"] = f"env {env_name}"
        elif sources is not None and "section" not in spec.metadata:
            sources.setdefault(f"{where}.{name}", "default")
    try:
        return cls(**values)
    except TypeError as exc:
        errors.append(f"{where}: {exc}")
        return cls()


#: The line break before a line that may open a table. Inside a multi-line string or array it
#: does not; the piece it would start then fails to parse on its own, and the file is parsed
#: whole.
_TABLE_LINE_BREAK = re.compile(r"\n(?=[ \t]*\[)")
_SCHEDULES_LINE_BREAK = re.compile(r"\n(?=[ \t]*\[\[[ \t]*schedules[ \t]*\]\])")
_SCHEDULES_HEADER = re.compile(r"[ \t]*\[\[[ \t]*schedules[ \t]*\]\][ \t]*(?:#.*)?\r?(?:\n|\Z)")
_SCHEDULES_SUBTABLE = re.compile(r"[ \t]*\[\[?[ \t]*schedules[ \t]*\.")


def split_schedule_blocks(text: str, known: dict[str, ScheduleConfig]) -> tuple[
        dict[str, Any], tuple[ScheduleConfig, ...], ScheduleBlocks] | None:
    """The TOML data of the file less its schedules, and its schedules: each [[schedules]]
    block parsed on its own, or taken from `known` (block text -> its schedule) when its
    text is unchanged. None when a piece has any problem, or the result could differ from
    parsing the whole text: the caller parses it whole, and names each problem with its line.

    Why it is the same result: each piece is parsed on its own from a line where the whole
    file's parser stands between statements (the first piece starts the file, and a piece
    that parses to its end leaves that parser between statements), so a line that only
    looks like a header, inside a multi-line string or array, leaves its piece unparsed. A
    block holds [[schedules]] and its [schedules.*] sub-tables only: it defines one new
    last entry, and TOML forgets the sub-tables of the entry before at each [[schedules]].
    The rest must not define `schedules` at all, so the two never meet; it is parsed as
    one text too, for what its pieces say together (a table defined twice)."""
    runs: list[list[str]] = [[]]  #: the rest's pieces, one list per stretch between blocks
    blocks: list[str] = []
    found: list[ScheduleConfig | None] = []  #: each block's schedule, if known already
    in_block = False
    # A stretch from one [[schedules]] line to the next is most often a known block whole.
    chunks = _SCHEDULES_LINE_BREAK.split(text)
    for chunk in [chunk + "\n" for chunk in chunks[:-1]] + chunks[-1:]:
        schedule = known.get(chunk)
        if schedule is not None:
            blocks.append(chunk)
            found.append(schedule)
            in_block = True
            continue
        parts = _TABLE_LINE_BREAK.split(chunk)
        for piece in [part + "\n" for part in parts[:-1]] + parts[-1:]:
            if _SCHEDULES_HEADER.match(piece):
                blocks.append(piece)
                found.append(None)
                in_block = True
            elif in_block and _SCHEDULES_SUBTABLE.match(piece):
                blocks[-1] += piece
            else:
                if in_block:
                    runs.append([])
                runs[-1].append(piece)
                in_block = False
    try:
        stretches = [tomllib.loads("".join(run)) for run in runs]
        rest = "".join(piece for run in runs for piece in run)
        data = stretches[0] if len(stretches) == 1 else tomllib.loads(rest)
        if "schedules" in data:
            return None
        for index in [i for i, schedule in enumerate(found) if schedule is None]:
            schedule = known.get(blocks[index])
            if schedule is None:
                parsed = tomllib.loads(blocks[index])
                entries = parsed.get("schedules")
                if len(parsed) != 1 or not (isinstance(entries, list) and len(entries) == 1):
                    return None
                errors: list[str] = []
                schedule = _build_section(ScheduleConfig, entries[0], "schedules",
                                          blocks[index], lambda: 0, errors)
                if errors:
                    return None
            found[index] = schedule
    except tomllib.TOMLDecodeError:
        return None
    return data, tuple(filter(None, found)), ScheduleBlocks(rest, tuple(blocks))  # all found


def parse_config(text: str, path: str = "", environ: dict[str, str] | None = None,
                 validate_schedules: Callable[[Config], list[str]] | None = None,
                 previous: Config | None = None) -> Config:
    """Parse and validate a whole config file; raise ConfigError listing every problem.
    `previous`: a config parsed before; its schedules whose block is unchanged are reused
    (not parsed again), so the cost follows what changed, not the size of the file."""
    environ = dict(os.environ if environ is None else environ)
    known = (dict(zip(previous.blocks.schedules, previous.schedules))
             if previous is not None and previous.blocks is not None else {})
    split = split_schedule_blocks(text, known)
    blocks = schedules = None
    if split is not None:
        data, schedules, blocks = split
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path or 'config'}: TOML syntax error: {exc}"]) from None
    errors: list[str] = []
    sources: dict[str, str] = {}
    sections: dict[str, Any] = {}
    header_lines: dict[str, list[int]] = {}

    def start_of(header: str, index: int = 0) -> Callable[[], int]:
        def start() -> int:
            # A scan of the text: only an error pays for it.
            if header not in header_lines:
                header_lines[header] = _header_lines(text, header)
            found = header_lines[header]
            return found[index] if index < len(found) else 0

        return start

    for name, cls in (("daemon", DaemonConfig), ("creator", CreatorConfig),
                      ("publish", PublishConfig), ("budget", BudgetConfig),
                      ("media", MediaConfig)):
        sections[name] = _build_section(cls, data.pop(name, {}), name, text, start_of(name),
                                        errors, sources, environ)
    for name, entry_cls in SECTION_ENTRIES.items():
        if name == "schedules" and schedules is not None:
            sections[name] = schedules
            continue
        entries = data.pop(name, [])
        if not isinstance(entries, list):
            errors.append(f"{name}: expected [[{name}]] entries")
            entries = []
        sections[name] = tuple(
            _build_section(entry_cls, entry, f"{name}[{i}]", text, start_of(name, i), errors)
            for i, entry in enumerate(entries)
        )
    for key in data:
        line = _line_of(text, key) or (_header_lines(text, key) or [-1])[0] + 1
        errors.append(f"{key}" + (f" (line {line})" if line else "") + ": unknown key")
    config = Config(**sections, path=path, sources=sources, text=text, blocks=blocks)
    errors += _check_config(config, environ)
    if validate_schedules is not None:
        # One pass: a bad key elsewhere does not hide a bad cron. A key that already failed
        # is not judged again on what is left of its entry (a cron of the wrong type would
        # come back as "needs exactly one of cron, every …").
        reported = {_error_subject(error) for error in errors}
        errors += [error for error in validate_schedules(config)
                   if _error_subject(error) not in reported]
    if errors:
        raise ConfigError(errors)
    return config


def _check_config(config: Config, environ: dict[str, str]) -> list[str]:
    """Cross-field rules that one key alone cannot express."""
    errors = []
    creator = config.creator
    if creator.kind == "command" and not (creator.command or creator.submit_command):
        errors.append("creator.command: required when creator.kind = \"command\"")
    if creator.mode == "async" and not (creator.submit_command and creator.status_command):
        errors.append("creator: mode = \"async\" needs submit_command and status_command")
    batch = creator.status_batch_command
    if batch and creator.mode != "async":
        errors.append("creator.status_batch_command: only for mode = \"async\"")
    if any(STATUS_BATCH_IDS in part and part != STATUS_BATCH_IDS for part in batch):
        errors.append(f"creator.status_batch_command: {STATUS_BATCH_IDS} must be a whole"
                      " element (it becomes one argument per id)")
    templates: list[tuple[str, Any, tuple[str, ...]]] = [
        (f"creator.{name}", getattr(creator, name), PLACEHOLDERS) for name in
                 ("command", "submit_command", "status_command", "result_command",
                  "cancel_command", "health_command")]
    templates.append(("publish.command", config.publish.command, PUBLISH_PLACEHOLDERS))
    templates.append(("creator.status_batch_command", batch, ("external_ids",)))
    templates.append(("creator.topics_command", creator.topics_command, TOPICS_PLACEHOLDERS))
    templates += [(f"hooks[{i}].command", h.command, PLACEHOLDERS)
                  for i, h in enumerate(config.hooks)]
    for where, template, allowed in templates:
        unknown = unknown_placeholders(template, allowed)
        if unknown:
            errors.append(f"{where}: unknown placeholder(s) {', '.join(unknown)}; use "
                          + " ".join(f"{{{name}}}" for name in allowed))
    seen_ids: set[int] = set()
    for i, account in enumerate(config.accounts):
        if account.id <= 0:
            errors.append(f"accounts[{i}].id: required, a positive integer")
        if not account.name:
            errors.append(f"accounts[{i}].name: required")
        if account.id in seen_ids:
            errors.append(f"accounts[{i}].id: duplicate account id {account.id}")
        seen_ids.add(account.id)
    names = [schedule.name for schedule in config.schedules]
    if "" in names or len(set(names)) < len(names):  # 10,000 names: look closer only then
        seen: set[str] = set()
        for i, name in enumerate(names):
            if not name:
                errors.append(f"schedules[{i}].name: required")
            elif name in seen:
                errors.append(f"schedules[{i}].name: duplicate schedule name {name!r}")
            seen.add(name)
    for i, hook in enumerate(config.hooks):
        if not hook.command:
            errors.append(f"hooks[{i}].command: required")
        bad = set(hook.on) - set(TERMINAL_STATUSES)
        if bad:
            errors.append(f"hooks[{i}].on: unknown status {sorted(bad)}; "
                          f"use {', '.join(TERMINAL_STATUSES)}")
    return errors + _check_notify(config, environ)


def _check_notify(config: Config, environ: dict[str, str]) -> list[str]:
    errors = []
    names: set[str] = set()
    known_accounts = config.accounts_by_id.keys()
    for i, target in enumerate(config.notify):
        def where(key: str, index: int = i) -> str:
            return entry_key_location(config, "notify", index, key)

        if not re.fullmatch(r"[A-Za-z0-9_.-]+", target.name):
            errors.append(f"{where('name')}: required: letters, digits, '_', '.' or '-'")
        elif target.name in names:
            errors.append(f"{where('name')}: duplicate target name {target.name!r}")
        names.add(target.name)
        if bool(target.url) == bool(target.command):
            errors.append(f"{where('url')}: set exactly one of url or command")
        if target.url and not re.match(r"https?://[^/?#\s]+", target.url):
            errors.append(f"{where('url')}: must start with http:// or https:// and a host")
        if target.command and target.format != "json":
            errors.append(f"{where('format')}: a command target gets the json format")
        bad = sorted(set(target.events) - set(NOTIFY_EVENTS))
        if bad:
            errors.append(f"{where('events')}: unknown event(s) {', '.join(bad)}; use "
                          + ", ".join(NOTIFY_EVENTS))
        for key in ("url", "secret"):
            missing = sorted({m for m in ENV_REF_RE.findall(getattr(target, key))
                              if not environ.get(m)})
            if missing:
                errors.append(f"{where(key)}: ${{{missing[0]}}} is not set in the daemon's"
                              " environment")
        unknown = sorted(set(target.accounts) - known_accounts)
        if unknown:
            errors.append(f"{where('accounts')}: {unknown} not in [[accounts]]")
    return errors


#: An argv element that is a flag alone (`-t`, `--topic`), so the next element is its value.
_FLAG_ALONE_RE = re.compile(r"^--?[A-Za-z][\w-]*$")


def config_warnings(config: Config, environ: dict[str, str]) -> list[str]:
    """What is valid but likely wrong: `${VAR}` references the daemon's environment leaves
    unset or empty (they reach the creator as ""), and `"-x", "{value}"` pairs, where a
    value starting with "-" would be read as an option: bind it as `--x={value}`."""
    warnings = []
    creator = config.creator
    for key, value in creator.env.items():
        for name in ENV_REF_RE.findall(value):
            if name not in environ:
                warnings.append(f"creator.env.{key}: ${{{name}}} is not set in the daemon's"
                                " environment; the creator gets an empty value")
            elif not environ[name].strip():
                warnings.append(f"creator.env.{key}: ${{{name}}} is empty in the daemon's"
                                " environment; the creator gets an empty value")
    for name in ("command", "submit_command", "status_command", "result_command",
                 "cancel_command"):
        template = getattr(creator, name)
        for flag, value in zip(template, template[1:]):
            if _FLAG_ALONE_RE.match(flag) and PLACEHOLDER_RE.match(value):
                long_flag = flag if flag.startswith("--") else "--<option>"
                warnings.append(f"creator.{name}: \"{flag}\", \"{value}\" passes the value as"
                                " its own argument, so a value starting with \"-\" becomes an"
                                f" option; bind it to the flag: \"{long_flag}={value}\"")
    return warnings


def read_config_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None


def load_config(path: str | None, environ: dict[str, str] | None = None,
                validate_schedules: Callable[[Config], list[str]] | None = None) -> Config:
    """The config at `path`, or the embedded default (built-in offline creator) when None."""
    if path is None:
        return parse_config("", "", environ, validate_schedules)
    return parse_config(read_config_text(path), str(path), environ, validate_schedules)


#: [daemon] keys only a restart can change: the open database, the bound socket and the
#: configured logger stay as they are, so a reload keeps their running values and names them.
RESTART_ONLY_KEYS = ("state_dir", "database", "socket", "log_format", "log_level")


def keep_restart_only_keys(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new`, with the running values of the RESTART_ONLY_KEYS it changes, and those keys."""
    changed = [key for key in RESTART_ONLY_KEYS
               if getattr(running.daemon, key) != getattr(new.daemon, key)]
    if not changed:
        return new, []
    kept = {key: getattr(running.daemon, key) for key in changed}
    sources = {**new.sources, **{
        f"daemon.{key}": f"running value; restart to apply {key} ="
                         f" {json.dumps(getattr(new.daemon, key), ensure_ascii=False)}"
                         f" from {new.sources.get(f'daemon.{key}', 'the file')}"
        for key in changed}}
    return dataclasses.replace(new, daemon=dataclasses.replace(new.daemon, **kept),
                               sources=sources), changed


def format_duration(seconds: float) -> str:
    """Seconds the way a config writes them: 1800 -> "30m", 5400 -> "1h30m", 0.5 -> "0.5s"."""
    if seconds == 0:
        return "0s"
    parts, rest = [], seconds
    for unit, size in _DURATION_UNIT_S.items():
        if unit != "s" and rest >= size:
            count = int(rest // size)
            parts.append(f"{count}{unit}")
            rest -= count * size
    if rest:
        parts.append(f"{rest:g}s")
    return "".join(parts)


def _is_duration(spec: dataclasses.Field) -> bool:
    """A key parsed by parse_duration (possibly wrapped): it reads "1m" as 60 seconds."""
    try:
        return spec.metadata["parse"]("1m") == 60.0
    except (ValueError, TypeError, KeyError):
        return False


def describe_config(config: Config) -> list[dict[str, Any]]:
    """Effective daemon and creator settings with their source; secrets masked. Durations
    carry `display` ("30m") next to their value in seconds."""
    rows = []

    def add(key: str, spec: dataclasses.Field, value: Any) -> None:
        row = {"key": key, "value": value, "source": config.sources.get(key, "default")}
        if _is_duration(spec) and isinstance(value, (int, float)):
            row["display"] = format_duration(value)
        rows.append(row)

    for section_name in ("daemon", "creator", "publish", "budget", "media"):
        section = getattr(config, section_name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    add(f"{section_name}.{f.name}.{sub.name}", sub, getattr(value, sub.name))
                continue
            if f.name == "env":
                value = {k: ("***" if is_secret_name(k) and "${" not in v else v)
                         for k, v in value.items()}
            elif f.name == "socket_mode":
                value = f"{value:04o}"
            elif f.name == "prices":
                value = {model: {"input": price.input, "output": price.output}
                         for model, price in value.items()}
            add(f"{section_name}.{f.name}", f, value)
    rows.append({"key": "accounts", "value": len(config.accounts), "source": "file"})
    rows.append({"key": "schedules", "value": len(config.schedules), "source": "file"})
    return rows


#: A hook LiveConfig.swap() calls with the new config; an async one is awaited.
ConfigHook = Callable[[Config], Awaitable[None] | None]


class LiveConfig:
    """The running Config, one for the whole daemon. App creates it and hands it to every
    component; they read `live.current` whenever they need a setting, so a reload that swaps
    it here is seen by all of them at once, and none keeps a copy that could go stale.

    What a component derives from the config (the pool's encoded creator environment, the
    notifier's targets, the media fetcher, the schedule plan, the socket's permissions) it
    derives in a hook; swap() calls the hooks in the order App added them."""

    def __init__(self, config: Config):
        self.current = config
        self._hooks: list[ConfigHook] = []

    def on_swap(self, *hooks: ConfigHook) -> None:
        self._hooks.extend(hooks)

    async def swap(self, new: Config) -> Config:
        """Make `new` the running config, then run every hook on it; returns the old one."""
        old, self.current = self.current, new
        for hook in self._hooks:
            derived = hook(new)
            if derived is not None:
                await derived
        return old


class FollowsConfig:
    """A component that App hands the LiveConfig: `self.config` is always the running one."""

    live: LiveConfig

    @property
    def config(self) -> Config:
        return self.live.current


# Logging and sd_notify #########################################################################


class _Log:
    """structlog's logger for the daemon, fetched at the first call, so that a process that
    never logs (the built-in creator) never imports structlog."""

    @functools.cached_property
    def _logger(self) -> Any:
        return structlog.get_logger("contenthubd")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


log = _Log()


def configure_logging(log_format: str, level: str, environ: dict[str, str]) -> None:
    """JSON lines off a TTY, console on a TTY; under journald, no timestamp of our own."""
    on_tty = sys.stderr.isatty()
    under_journald = bool(environ.get("JOURNAL_STREAM"))
    renderer_json = log_format == "json" or (log_format == "auto" and not on_tty)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if not under_journald:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors.append(structlog.processors.format_exc_info if renderer_json
                      else structlog.dev.set_exc_info)
    processors.append(structlog.processors.JSONRenderer(ensure_ascii=False) if renderer_json
                      else structlog.dev.ConsoleRenderer(colors=on_tty))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            {"debug": 10, "info": 20, "warning": 30, "error": 40}[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


_M_MMAP_THRESHOLD = -3  #: glibc's mallopt() parameter number
#: Blocks from this size up (article bodies, export pages) are mmap'd, so freeing them
#: returns the memory to the system at once.
HEAP_MMAP_THRESHOLD_BYTES = 1 << 20


def bound_heap_retention() -> None:
    """Pin glibc's mmap threshold. By default glibc raises it to the size of the first large
    block freed, after which large blocks come from per-thread arenas that keep the memory:
    RSS stayed at its peak after the clients of a big export had gone. No-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD_BYTES)


def sd_notify(*fields: str, environ: dict[str, str] | None = None) -> bool:
    """Send one datagram to systemd's NOTIFY_SOCKET; a no-op without it; never raises."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
        return True
    except OSError as exc:
        log.debug("sd_notify_failed", error=str(exc))
        return False


def watchdog_interval(environ: dict[str, str]) -> float | None:
    """Half of WATCHDOG_USEC, when the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


# Topics ########################################################################################

#: Unicode categories a topic key drops: punctuation, separators, controls, format characters
#: (a zero-width space must not make a repeat look new).
_TOPIC_KEY_DROPPED = ("P", "Z", "Cc", "Cf")
#: The `{i}` of a template topic while the Store picks its number.
TOPIC_NUMBER_HOLE = "\0"
TOPIC_STATUSES = ("queued", "used", "skipped")
_TOPIC_REPLY_FENCE_RE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n(.*?)\n[ \t]*```", re.S | re.I)


def topic_key(topic: str) -> str:
    """What the no-repeat rule compares: NFKC (full-width letters become plain ones),
    case-folded, without whitespace or punctuation. "ＡＩ 技术，解析" and "ai技术解析" are one."""
    text = unicodedata.normalize("NFKC", topic).casefold()
    return "".join(char for char in text
                   if not char.isspace() and not unicodedata.category(char).startswith(
                       _TOPIC_KEY_DROPPED))


@dataclass
class TopicSlots:
    """One account's share of a firing, before the Store picks its topics (in the same
    transaction that inserts the tasks, so a pool topic is drawn exactly once).

    `source` says where topics come from: "pool" (the oldest queued), "list" (`topics`, each
    one), or "template" (`count` numbered topics; `render(n)` is the topic numbered n and
    `numbering` names the counter it continues)."""

    account_id: int
    source: str
    count: int
    fields: dict[str, Any]  #: the tasks' other fields (category, priority, tone, ...)
    topics: list[dict[str, Any]] = field(default_factory=list)
    render: Callable[[int], str] | None = None
    numbering: str = ""


def parse_topic_reply(text: str) -> list[dict[str, str]]:
    """Topics from a research reply: a JSON array (inside a ```json fence or not) of strings
    or {"topic", "keywords"} objects; keywords may be a list. Raises ValueError saying what
    was wrong."""
    text = re.sub(r"^\s*<think>.*?</think>", "", text, flags=re.S).strip()
    fenced = _TOPIC_REPLY_FENCE_RE.search(text)
    if fenced:
        text = fenced.group(1)
    elif not text.startswith("["):
        start, end = text.find("["), text.rfind("]")
        text = text[start:end + 1] if 0 <= start < end else text
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not a JSON array of topics: {exc}") from None
    if not isinstance(items, list):
        raise ValueError(f"expected a JSON array of topics, got {type(items).__name__}")
    topics = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            item = {"topic": item}
        if not isinstance(item, dict) or not isinstance(item.get("topic"), str):
            raise ValueError(f"item {index} is neither a string nor an object with a 'topic'")
        keywords = item.get("keywords") or ""
        if isinstance(keywords, list):
            keywords = ",".join(str(word).strip() for word in keywords if str(word).strip())
        topic = " ".join(item["topic"].split())
        if topic:
            topics.append({"topic": topic, "keywords": str(keywords).strip()})
    return topics


# Failure classes ###############################################################################

#: One vocabulary for why a creator failed, whatever the creator (docs/creators.md). A finer
#: error_kind (exit_code, killed, creator_failed, ...) is kept next to its class.
ERROR_CLASSES = ("transient", "rate_limited", "auth_failed", "misconfigured", "quota_exhausted",
                 "invalid_input", "quality_failed", "bad_output", "timeout", "crashed")
#: Failures of the creator itself, not of one task: they count toward the circuit breaker and
#: spend no task's retries.
CREATOR_WIDE_CLASSES = frozenset({"misconfigured", "auth_failed", "quota_exhausted"})
#: No retry can fix these; the task fails at once.
PERMANENT_CLASSES = frozenset({"invalid_input", "quality_failed"})
#: The finer error kinds the runner and adapters report, and the class each belongs to.
KIND_CLASSES = {
    "exit_code": "transient", "creator_failed": "transient", "internal": "crashed",
    "killed": "crashed", "spawn_failed": "misconfigured", "timeout": "timeout",
    "bad_output": "bad_output", "output_too_large": "bad_output",
    "invalid_arguments": "invalid_input", "creator_cancelled": "invalid_input",
    "remote_unknown": "crashed",
}
#: sysexits.h codes a creator may exit with to name its class without printing JSON.
SYSEXITS_CLASSES = {75: "transient", 77: "auth_failed", 78: "misconfigured"}
RATE_LIMIT_PAUSE_S = 30.0  #: how long the pool stops claiming after a rate_limited failure
RATE_LIMIT_PAUSE_MAX_S = 900.0  #: a creator's retry_after is capped at this
BREAKER_TRIP_TASKS = 2  #: creator-wide failures from this many distinct tasks in a row
TRANSIENT_DEGRADED_STREAK = 10  #: transient failures in a row that degrade health


def error_class_of(kind: str) -> str:
    """The class of an error kind: itself when it is a class, else its mapping (transient)."""
    return kind if kind in ERROR_CLASSES else KIND_CLASSES.get(kind, "transient")


def structured_error(data: dict[str, Any] | None) -> tuple[str, str, float | None] | None:
    """(class, message, retry_after) of a creator's `{"error": {"kind", "message",
    "retry_after"}}` object, or None when `data` is not one. An unknown kind is transient, and
    the message says which kind it was."""
    if not isinstance(data, dict) or not isinstance(data.get("error"), dict):
        return None
    error = data["error"]
    kind = str(error.get("kind") or "")
    message = str(error.get("message") or "").strip() or f"creator reported {kind or 'an error'}"
    if kind not in ERROR_CLASSES:
        message = f"{message} (unknown error kind {kind!r}, treated as transient)"
        kind = "transient"
    retry_after = error.get("retry_after")
    if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)) \
            or not math.isfinite(retry_after) or retry_after < 0:
        retry_after = None
    return kind, message, float(retry_after) if retry_after is not None else None


class CircuitBreaker:
    """Whether the creator as a whole is known broken (SPEC §13, docs/creators.md).

    closed: tasks are claimed. Creator-wide failures (misconfigured, auth_failed,
    quota_exhausted) from BREAKER_TRIP_TASKS distinct tasks in a row open it; any other outcome
    breaks the row. open: nothing is claimed until a probe is due. probing: the pool runs the
    health_command, or lets exactly one task through; success closes the breaker, another
    creator-wide failure opens it again. Opening and closing are stored (snapshot()): a
    daemon that starts with it open probes first (restore()) rather than running the queue
    into the broken creator again.
    """

    def __init__(self, clock: Callable[[], datetime] = utc_now):
        self.clock = clock
        self.state = "closed"
        self.since: datetime | None = None  #: when it last opened
        self.error_class: str | None = None
        self.reason: str | None = None  #: the creator's own message, in full
        self.failures = 0  #: creator-wide failures in a row
        self.streak_tasks: list[str] = []  #: the tasks those failures came from
        self.transient_streak = 0
        self.last_transient: str | None = None
        self.probe_interval = 300.0  #: [creator] breaker_probe
        self.probe_at: datetime | None = None  #: when an open breaker is next probed
        self.last_probe: str | None = None
        self.probe_task: str | None = None  #: the task let through while probing

    @property
    def claim_limit(self) -> int | None:
        """How many tasks may be claimed now: None for any number."""
        if self.state == "closed":
            return None
        if self.state == "probing" and self.probe_task is None:
            return 1
        return 0

    def record_failure(self, task_id: str, error_class: str, message: str) -> tuple[bool, bool]:
        """Count one failed attempt. Returns (spend_retry, tripped): a creator-wide failure
        spends no retry unless this same task already failed so in the current row (one task
        alone in the queue must still run out of retries)."""
        if task_id == self.probe_task:
            self.probe_task = None
        if error_class not in CREATOR_WIDE_CLASSES:
            if error_class == "transient":
                self.transient_streak += 1
                self.last_transient = message
            if self.state == "probing":
                self._close()
            self.failures, self.streak_tasks = 0, []
            return True, False
        repeated = task_id in self.streak_tasks
        self.failures += 1
        if not repeated:
            self.streak_tasks.append(task_id)
        self.error_class, self.reason = error_class, message
        if self.state == "probing":
            self._open()
            return False, False
        if self.state == "closed" and len(self.streak_tasks) >= BREAKER_TRIP_TASKS:
            self._open()
            return False, True
        return repeated and self.state == "closed", False

    def record_success(self, task_id: str) -> bool:
        """A completed task; True when it closed an open or probing breaker."""
        if task_id == self.probe_task:
            self.probe_task = None
        self.failures, self.streak_tasks = 0, []
        self.transient_streak, self.last_transient = 0, None
        if self.state == "closed":
            return False
        self._close()
        return True

    def release(self, task_id: str) -> None:
        """A claimed task ended without an outcome (cancel, shutdown): it probed nothing."""
        if task_id == self.probe_task:
            self.probe_task = None

    def _open(self) -> None:
        if self.state == "closed":
            self.since = self.clock()
        self.state = "open"
        self.probe_task = None
        self.probe_at = self.clock() + timedelta(seconds=self.probe_interval)

    def begin_probe(self) -> None:
        self.state = "probing"

    def probe_result(self, ok: bool, detail: str) -> None:
        """The health_command's verdict on a probing breaker."""
        self.last_probe = f"{to_db_time(self.clock())}: {'ok' if ok else 'failed'}: {detail}"
        if self.state != "probing":
            return
        if ok:
            self._close()
        else:
            self._open()

    def _close(self) -> None:
        self.state, self.since, self.probe_at, self.probe_task = "closed", None, None, None
        self.failures, self.streak_tasks = 0, []

    def resume(self) -> bool:
        """The operator's `creator resume`; True when it was not closed."""
        was_closed = self.state == "closed"
        self._close()
        self.error_class = self.reason = None
        return not was_closed

    def snapshot(self) -> dict[str, Any]:
        """What is stored of it: probing is open for a daemon that starts anew."""
        is_open = self.state != "closed"
        return {"state": "open" if is_open else "closed",
                "error_class": self.error_class if is_open else None,
                "reason": self.reason if is_open else None,
                "since": to_db_time(self.since) if is_open and self.since else None,
                "failures": self.failures if is_open else 0}

    def restore(self, stored: dict[str, Any]) -> bool:
        """The stored state at start-up: an open breaker stays open, with its probe due at
        once. True when it was open."""
        if stored.get("state") != "open":
            return False
        self.state = "open"
        self.since = from_db_time(stored.get("since")) or self.clock()
        self.error_class, self.reason = stored.get("error_class"), stored.get("reason")
        self.failures = int(stored.get("failures") or 0)
        self.probe_at = self.clock()
        return True

    def describe(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason if self.state != "closed" else None,
                "error_class": self.error_class if self.state != "closed" else None,
                "since": to_db_time(self.since) if self.since else None,
                "failures": self.failures, "transient_streak": self.transient_streak,
                "next_probe_at": to_db_time(self.probe_at) if self.probe_at else None,
                "last_probe": self.last_probe}


# Store #########################################################################################

TASK_FIELDS = ("task_id", "content_id", "account_id", "topic", "keywords", "category",
               "requirements", "tone", "target_audience", "status", "priority", "progress",
               "stage", "retry_count", "max_retries", "attempt", "auto_approve", "submitted_at",
               "started_at", "completed_at", "timeout_at", "next_attempt_at", "error_kind",
               "error_class", "error_message", "external_id", "remote_status", "pid", "pgid",
               "schedule_run_id", "dedup_key", "created_at", "updated_at")
TASK_COLUMNS = ", ".join(f"t.{name}" for name in TASK_FIELDS) + ", a.name AS account_name"
TASK_FROM = "content_generation_tasks t LEFT JOIN accounts a ON a.id = t.account_id"
#: The orders list_tasks offers, by name.
TASK_ORDERS = {"newest": "t.id DESC", "submitted": "t.submitted_at, t.id",
               "recently_updated": "t.updated_at DESC",
               "queue": "t.priority DESC, t.next_attempt_at, t.id"}
#: A claimed task as UPDATE ... RETURNING gives it (RETURNING cannot join).
CLAIM_RETURNING = (", ".join(TASK_FIELDS) + ", (SELECT name FROM accounts"
                   " WHERE accounts.id = account_id) AS account_name")
CONTENT_LIST_COLUMNS = ("c.id, c.task_id, c.account_id, a.name AS account_name, t.topic, c.title,"
                        " c.summary, c.word_count, c.images, c.quality, c.review_status,"
                        " c.review_reason, c.publish_status, c.scheduled_publish_at,"
                        " c.published_at, c.created_at, c.generator, c.model, c.keywords,"
                        " c.category, c.cost, c.published_url, c.publish_error")
CONTENT_FROM = ("contents c LEFT JOIN content_generation_tasks t ON t.task_id = c.task_id"
                " LEFT JOIN accounts a ON a.id = c.account_id")
#: Every connection's settings. NORMAL in WAL mode: a commit survives a process crash
#: (kill -9); only an OS crash or power loss can lose the last commits, never corrupt the
#: file. README says more.
DB_PRAGMAS = ("synchronous = NORMAL", "foreign_keys = ON", "busy_timeout = 5000")
#: A reader that holds one snapshot (a long report, a backup, an open sqlite3 transaction)
#: keeps SQLite's automatic checkpoints from reusing the WAL, which then grows with every
#: write. Past this size the writer tries a TRUNCATE checkpoint whenever its queue is empty,
#: waiting at most WAL_TRUNCATE_WAIT_MS for readers (writes wait meanwhile), and again
#: WAL_TRUNCATE_RETRY_S later if one still holds on; `monitor health` says so until it
#: succeeds. journal_size_limit trims the file to WAL_KEEP_BYTES after SQLite's own resets.
#: A reader that opens each snapshot the instant it closes the last can still hold the WAL:
#: no checkpoint mode can reset a WAL that some snapshot always needs.
WAL_TRUNCATE_BYTES = 64 << 20
WAL_TRUNCATE_WAIT_MS = 500
WAL_TRUNCATE_RETRY_S = 5.0
WAL_KEEP_BYTES = 16 << 20  #: journal_size_limit: what a reset WAL file is trimmed to
WRITER_PRAGMAS = ("journal_mode = WAL", f"journal_size_limit = {WAL_KEEP_BYTES}")
#: The event-loop thread's connection, for short writes: it never waits for a lock (a
#: locked database sends the writes to the writer thread) and never checkpoints, so no
#: fsync runs on the loop. Checkpoints are the writer thread's.
LOOP_WRITER_PRAGMAS = ("synchronous = NORMAL", "foreign_keys = ON", "busy_timeout = 0",
                       "wal_autocheckpoint = 0", f"journal_size_limit = {WAL_KEEP_BYTES}")
#: Every this many short writes committed on the loop, the writer thread is asked for a
#: checkpoint (and runs the WAL-size policy above). A completion adds 10-25 pages, so the
#: WAL stays within ~2,500 pages (10 MiB) however few writes the thread sees otherwise;
#: every 50 cost spawn-bound 1-2 % more.
LOOP_WRITES_PER_CHECKPOINT = 100
#: That request in the writer's queue, beside the writes.
CHECKPOINT_REQUEST = ("checkpoint", (), None)
#: How long the checkpoint's catch-up waits for the write lock before it tries next time.
CHECKPOINT_CATCH_UP_WAIT_MS = 100
#: A completion whose article is longer than this many characters is written by the writer
#: thread: copying it into the WAL must not stall the loop.
SHORT_ARTICLE_MAX_CHARS = 100_000
#: The copies the backup executor writes and rotates: contenthub-20261201T080000.000Z.db
BACKUP_NAME_RE = re.compile(r"^contenthub-\d{8}T\d{6}\.\d{3}Z\.db$")
CLOSE_WAIT_S = 10.0  #: how long close() lets the writer retry before failing what is queued
#: The fence on a task's row (task_id, attempt): a cancelled or requeued task is no longer
#: this attempt's to change.
OWNED_BY_ATTEMPT = "task_id = ? AND attempt = ? AND status IN ('running', 'submitted')"
TRANSIENT_DB_ERRORS = ("locked", "busy", "disk is full", "disk i/o error", "unable to open")
#: Errors that retrying cannot cure: the file is damaged or cannot be written.
DAMAGE_DB_ERRORS = ("malformed", "corrupt", "not a database", "readonly")
#: The start's PRAGMA quick_check stops after this; a huge file is then checked only in part.
QUICK_CHECK_BUDGET_S = 5.0
#: What an operator does about a damaged database (README "Damaged database").
DAMAGE_NEXT_STEP = ("stop the daemon and restore the newest `contenthubctl db backup` copy, or"
                    " salvage the file with the recover procedure in README (Damaged"
                    " database)")


#: JSON text as stored: UTF-8 as is (Chinese stays readable in sqlite3), one encoder for all.
json_text = json.JSONEncoder(ensure_ascii=False).encode


def _settle(future: asyncio.Future, ok: bool, value: Any) -> None:
    """Resolve `future` unless its waiter gave up (cancelled) meanwhile."""
    if not future.done():
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _settle_all(batch: list[tuple], outcomes: list[tuple[bool, Any]]) -> None:
    for (_work, _args, done), (ok, value) in zip(batch, outcomes):
        _settle(done, ok, value)


def _fsync_directory(path: Path) -> None:
    """Make a rename or link in `path` survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _row_dict(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row)}


def _damage(exc: BaseException) -> str | None:
    """The message of an SQLite error that says the file is damaged or read-only, else None."""
    if isinstance(exc, sqlite3.DatabaseError) and any(
            marker in str(exc).lower() for marker in DAMAGE_DB_ERRORS):
        return str(exc)
    return None


def _is_transient(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and any(
        marker in str(exc).lower() for marker in TRANSIENT_DB_ERRORS)


def schema_steps(text: str) -> list[tuple[int, str, list[str]]]:
    """schema.sql as its steps: (version, title, statements), version 1 first.

    Statements are split where sqlite3 sees one complete (a trigger's BEGIN ... END stays
    whole), because executescript() would commit the step's transaction half-way.
    """
    headers = list(MIGRATION_HEADER.finditer(text))
    bounds = [(1, "release 0.1.0 schema", 0)] + [
        (int(match[1]), match[2].strip(), match.start()) for match in headers]
    steps = []
    for index, (version, title, start) in enumerate(bounds):
        if version != index + 1:
            raise StartupError(f"{SCHEMA_PATH}: migration {version} follows {index};"
                               " steps must be numbered 2, 3, ... in order")
        end = bounds[index + 1][2] if index + 1 < len(bounds) else len(text)
        statements, pending = [], ""
        for line in text[start:end].splitlines(keepends=True):
            pending += line
            if sqlite3.complete_statement(pending):
                if pending.strip(" \t\n;"):
                    statements.append(pending.strip())
                pending = ""
        if pending.strip() and not all(
                part.strip().startswith("--") for part in pending.splitlines() if part.strip()):
            raise StartupError(f"{SCHEMA_PATH}: step {version} ends inside a statement")
        steps.append((version, title, statements))
    return steps


#: Longest accepted text per task field: a topic is a headline; requirements may be a brief.
#: Linux refuses any single argv element over 128 KiB, and fields become argv elements.
TASK_FIELD_LIMITS = {"topic": 1_000, "keywords": 2_000, "category": 200, "tone": 200,
                     "target_audience": 500, "requirements": 40_000}


def check_task_fields(task: dict[str, Any]) -> list[str]:
    """Problems with a new task's text fields: too long, or holding a NUL (no argv can)."""
    problems = []
    for name, limit in TASK_FIELD_LIMITS.items():
        value = task.get(name)
        if not isinstance(value, str):
            continue
        if "\0" in value:
            problems.append(f"'{name}' contains a NUL character")
        if len(value) > limit:
            problems.append(f"'{name}' is {len(value)} characters; the limit is {limit}")
    return problems

@dataclass
class Article:
    """A creator's parsed result, before it becomes a `contents` row."""

    body: str
    title: str | None = None
    images: list[str] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)
    external_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  #: kept in the task's result JSON


@dataclass
class Usage:
    """What one attempt spent, as its creator reported it. `cost` is the creator's own figure
    until the pool prices it from [budget.prices]; None when neither knows."""

    tokens_in: int = 0
    tokens_out: int = 0
    model: str | None = None
    cost: float | None = None
    currency: str = ""


#: How many of the latest costed attempts the spend estimate of a task averages.
ESTIMATE_SAMPLE = 200
#: Budget comparisons forgive float rounding (0.005 * 4 is not exactly 0.02).
BUDGET_EPSILON = 1e-9


@dataclass
class BudgetGate:
    """What a claim transaction needs to keep spend within every budget that applies: the
    limits (0 = none), where the current day and month began (UTC, as stored) and the
    fallback estimate. The claim fills `holds`: each budget a further task would break,
    "daemon" or "account:<id>", with the reason an operator reads."""

    day_start: str
    month_start: str
    daily: float
    monthly: float
    accounts: dict[int, tuple[float, float]]  #: account id -> (daily, monthly), limited ones
    estimate: float
    currency: str
    holds: dict[str, str] = field(default_factory=dict)


class Store:
    """Owns the writer connections and every SQL statement.

    A write is a plain function that receives the sqlite3 connection. `_write` queues it
    for the writer thread, which owns the writer connection and commits in batches: one
    BEGIN IMMEDIATE ... COMMIT holding every write queued meanwhile (group commit). Each
    write is still all-or-nothing and its caller resumes only after the COMMIT, but eight
    workers finishing together cost one commit, not eight; and the thread starts the next
    batch as soon as one is committed, without waiting for the event loop to come round.
    A locked or full database rolls the batch back and retries it: a transition is delayed,
    never half-done or dropped. Reads go through a second connection (aiosqlite), so a long
    report never holds the writer.

    The writes of the task hot path (claim, completion, failure, pid, progress) are short:
    a few rows by key. `_write_short` commits them on the event-loop thread instead, through
    a connection of its own, all those made in one loop iteration in one transaction,
    whenever nothing is queued for the writer thread. The hop to that thread and back cost
    more than the SQL: two wake-ups and GIL hand-offs, ~0.1 ms of CPU per write, and
    milliseconds of waiting on a busy host. Writes still commit in the order they were
    made: one made while another is queued is queued behind it, and a queued one first
    commits the short writes made before it.
    """

    def __init__(self, path: Path, log_: Any = None):
        self.path = path
        self.log = log_ or log
        self._reader: aiosqlite.Connection | None = None
        #: (work, args, future) or CHECKPOINT_REQUEST for the writer thread; None tells it
        #: to close and stop
        self._writes: queue.SimpleQueue = queue.SimpleQueue()
        self._writer_thread: threading.Thread | None = None
        self._loop_writer: sqlite3.Connection | None = None  #: the loop thread's connection
        self._queued = 0  #: writes handed to the writer thread and not yet settled on the loop
        self._loop_writes = 0  #: short writes taken on the loop since the last checkpoint request
        self._checkpoint_wanted = False  #: set on the writer thread by a CHECKPOINT_REQUEST
        #: set by the writer thread while a checkpoint catches up: the loop's short writes
        #: wait for it
        self._loop_writes_held = False
        self._short_writes: list[tuple] = []  #: (work, args, future) the loop commits next
        self._closing = False
        self.last_write_error: str | None = None  #: shown by `monitor health` while retrying
        self.schema_version = 0  #: the newest step of schema.sql, known once open
        #: Events some [[notify]] target wants (the Notifier sets it on start and reload);
        #: enqueue_event writes nothing for the others.
        self.notify_subscribed: frozenset[str] = frozenset()
        #: Called on the event loop after a commit that wrote notification events.
        self.on_events_written: Callable[[], None] = lambda: None
        self._events_written = False  #: set on the writer thread by enqueue_event
        self.wal_warning: str | None = None  #: set while readers keep the WAL from shrinking
        #: the first damage error a read or write met (malformed, corrupt, read-only): health
        #: stays not ok until a restart, since retrying cannot cure it
        self.damage: str | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        opened = loop.create_future()
        self._writer_thread = threading.Thread(target=self._write_forever, args=(loop, opened),
                                               name="store-writer", daemon=True)
        self._writer_thread.start()
        try:
            await opened
        except BaseException:
            self._writer_thread = None
            raise
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in DB_PRAGMAS:
            await self._reader.execute(f"PRAGMA {pragma}")
        self._loop_writer = sqlite3.connect(self.path, isolation_level=None)
        self._loop_writer.create_function("topic_key", 1, topic_key, deterministic=True)
        for pragma in LOOP_WRITER_PRAGMAS:
            self._loop_writer.execute(f"PRAGMA {pragma}")

    async def close(self) -> None:
        """Commit what is queued (a disk-full retry gives up after CLOSE_WAIT_S), then close."""
        if self._loop_writer is not None:
            self._commit_or_hand_over_short_writes()
            self._loop_writer.close()
            self._loop_writer = None
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.close()
            self._reader = None
        thread, self._writer_thread = self._writer_thread, None
        if thread is not None:
            self._writes.put(None)
            await asyncio.to_thread(thread.join, CLOSE_WAIT_S)
            self._closing = True
            await asyncio.to_thread(thread.join)

    async def _run(self, connection: aiosqlite.Connection, work: Callable[..., Any],
                   *args: Any) -> Any:
        # aiosqlite's own worker-thread queue: the whole unit of work is one round trip.
        try:
            return await connection._execute(work, connection._conn, *args)
        except sqlite3.DatabaseError as exc:
            self._note_damage(exc)
            raise

    def _note_damage(self, exc: BaseException) -> None:
        found = _damage(exc)
        if found is not None and self.damage is None:
            self.damage = found
            self.log.error("database_damaged", error=found, database=str(self.path),
                           next_step=DAMAGE_NEXT_STEP)

    # -- the writer thread ---------------------------------------------------------------------

    def _write_forever(self, loop: asyncio.AbstractEventLoop, opened: asyncio.Future) -> None:
        """The writer thread: opens the database, then commits batches until told to stop."""
        conn = lock_holder = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.create_function("topic_key", 1, topic_key, deterministic=True)
            for pragma in WRITER_PRAGMAS + DB_PRAGMAS:
                conn.execute(f"PRAGMA {pragma}")
            self._quick_check(conn)
            self._apply_schema(conn)
            #: holds the write lock during a checkpoint's catch-up
            lock_holder = sqlite3.connect(self.path, isolation_level=None)
            lock_holder.execute(f"PRAGMA busy_timeout = {CHECKPOINT_CATCH_UP_WAIT_MS}")
        except Exception as exc:
            for opened_connection in (conn, lock_holder):
                if opened_connection is not None:
                    opened_connection.close()
            if _damage(exc) is not None:
                exc = StartupError(f"database {self.path} is unusable: {exc}; {DAMAGE_NEXT_STEP}",
                                   EX_CONFIG)
            loop.call_soon_threadsafe(_settle, opened, False, exc)
            return
        loop.call_soon_threadsafe(_settle, opened, True, None)
        try:
            stopping = False
            next_truncate = 0.0
            while not stopping:
                # A held WAL is retried even when no write comes to trigger it.
                wait = (None if self.wal_warning is None
                        else max(0.0, next_truncate - time.monotonic()))
                batch, stopping = self._next_batch(block=True, timeout=wait)
                if batch:
                    outcomes = self._commit_retrying(conn, batch)
                    loop.call_soon_threadsafe(self._settled, batch, outcomes)
                    if self._events_written:
                        self._events_written = False
                        loop.call_soon_threadsafe(self.on_events_written)
                if self._checkpoint_wanted:
                    self._checkpoint_wanted = False
                    self._checkpoint_beside_loop(conn, lock_holder)
                    loop.call_soon_threadsafe(self._commit_short_writes)  # those it held
                if (self._writes.empty() and time.monotonic() >= next_truncate
                        and not self._truncate_wal(conn)):
                    next_truncate = time.monotonic() + WAL_TRUNCATE_RETRY_S
        finally:
            lock_holder.close()
            conn.close()

    def _checkpoint_beside_loop(self, conn: sqlite3.Connection,
                                lock_holder: sqlite3.Connection) -> None:
        """Copy the WAL into the database while the loop goes on writing, then catch up with
        the write lock held for a moment (the loop holds its short writes meanwhile), so
        that the next write starts the WAL from its beginning. A checkpoint that blocked the
        loop's writes stalled every completion for its few milliseconds (spawn-bound: -8 %);
        one without the catch-up never lets the WAL restart while writes go on, since the
        loop adds pages during each, and the file grows with every write."""
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            # Else the loop's writes would win the lock from SQLite's busy handler, which
            # only polls. At most one of its commits is under way now.
            self._loop_writes_held = True
            lock_holder.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                lock_holder.execute("ROLLBACK")
        except sqlite3.Error as exc:  # another session writes: the next request will do
            self._note_damage(exc)
            self.log.debug("wal_checkpoint_deferred", error=str(exc))
        finally:
            self._loop_writes_held = False

    def _quick_check(self, conn: sqlite3.Connection) -> None:
        """PRAGMA quick_check, stopped after QUICK_CHECK_BUDGET_S: a damaged file refuses to
        start (exit 78) instead of starting "ok" and failing every query."""
        deadline = time.monotonic() + QUICK_CHECK_BUDGET_S
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        try:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        except sqlite3.OperationalError as exc:
            if "interrupted" not in str(exc):
                raise
            self.log.warning("quick_check_incomplete", budget_s=QUICK_CHECK_BUDGET_S,
                             hint="run contenthubctl db check for a full check")
            return
        finally:
            conn.set_progress_handler(None, 0)
        if problems != ["ok"]:
            raise StartupError(f"database {self.path} is damaged (quick_check:"
                               f" {'; '.join(problems)}); {DAMAGE_NEXT_STEP}", EX_CONFIG)

    def _truncate_wal(self, conn: sqlite3.Connection) -> bool:
        """Checkpoint and truncate a WAL over WAL_TRUNCATE_BYTES; False if a reader held it."""
        try:
            small = os.stat(f"{self.path}-wal").st_size <= WAL_TRUNCATE_BYTES
        except FileNotFoundError:
            small = True
        if small:
            self.wal_warning = None
            return True
        conn.execute(f"PRAGMA busy_timeout = {WAL_TRUNCATE_WAIT_MS}")
        try:
            busy, wal_pages, done_pages = conn.execute(
                "PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError as exc:
            busy, wal_pages, done_pages = 1, -1, -1
            self.log.debug("wal_truncate_failed", error=str(exc))
        finally:
            conn.execute(f"PRAGMA {DB_PRAGMAS[-1]}")
        self.log.info("wal_checkpoint", truncated=not busy, wal_pages=wal_pages,
                      checkpointed_pages=done_pages)
        self.wal_warning = None if not busy else (
            f"WAL is {wal_pages * 4096 >> 20} MiB or more and a reader keeps it from being"
            " truncated: end long read transactions (sqlite3 sessions, reports)")
        return not busy

    def _next_batch(self, block: bool, timeout: float | None = None
                    ) -> tuple[list[tuple], bool]:
        """Every write queued now (waiting up to `timeout` for the first one if `block`), and
        whether the stop marker came among them."""
        batch: list[tuple] = []
        try:
            item = self._writes.get(timeout=timeout) if block else self._writes.get_nowait()
            while item is not None:
                if item is CHECKPOINT_REQUEST:
                    self._checkpoint_wanted = True
                else:
                    batch.append(item)
                item = self._writes.get_nowait()
        except queue.Empty:
            return batch, False
        return batch, True

    def _commit_retrying(self, conn: sqlite3.Connection, batch: list[tuple]
                         ) -> list[tuple[bool, Any]]:
        delay = 0.05
        while True:
            try:
                outcomes = self._commit_batch(conn, batch)
                self.last_write_error = None
                return outcomes
            except sqlite3.Error as exc:
                if not _is_transient(exc) or self._closing:
                    self._note_damage(exc)
                    return [(False, exc)] * len(batch)
                self.last_write_error = str(exc)
            except Exception as exc:  # a bug here must fail the batch, not the thread
                self.log.exception("database_write_failed")
                return [(False, exc)] * len(batch)
            self.log.warning("database_write_retry", error=self.last_write_error,
                             pending=len(batch), retry_in=round(delay, 2))
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            # Writes queued meanwhile join the retry; a stop marker is put back for later.
            more, stopping = self._next_batch(block=False)
            batch += more
            if stopping:
                self._writes.put(None)

    def _apply_schema(self, conn: sqlite3.Connection) -> None:
        """Bring the database to the newest schema version, one step per transaction.

        Each step (N-1 -> N) runs its statements and records its schema_version row in one
        BEGIN IMMEDIATE ... COMMIT, so a kill -9 anywhere leaves the database at N-1 or at N,
        and the next start resumes from there. Foreign keys are off during a step (a table
        rebuild must not cascade) and checked before its COMMIT.
        """
        steps = schema_steps(SCHEMA_PATH.read_text(encoding="utf-8"))
        self.schema_version = newest = steps[-1][0]
        current = self._schema_version_of(conn)
        if current > newest:
            raise StartupError(
                f"database {self.path} is at schema version {current}, newer than this"
                f" contenthubd {__version__} knows ({newest}): run the release that wrote it,"
                " or restore a backup taken before the upgrade", EX_CONFIG)
        for version, title, statements in steps:
            if version <= current:
                continue
            self.log.info("schema_migrating", version=version, step=title,
                          database=str(self.path))
            conn.execute("PRAGMA foreign_keys = OFF")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements:
                    conn.execute(statement)
                broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise StartupError(f"schema step {version} ({title}) leaves foreign keys"
                                       f" broken in {sorted({row[0] for row in broken})}")
                conn.execute("INSERT INTO schema_version VALUES (?, ?)",
                             (version, to_db_time(utc_now())))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                conn.execute("PRAGMA foreign_keys = ON")
            self.log.info("schema_migrated", version=version, step=title,
                          database=str(self.path))
        if conn.execute("SELECT COUNT(*) FROM counters WHERE substr(name, 1, 5) = 'task:'"
                        " OR substr(name, 1, 8) = 'content:'").fetchone()[0] == 0:
            # Counters of a database from before the counters table, or an empty one.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO counters SELECT 'task:' || status, COUNT(*)"
                         " FROM content_generation_tasks GROUP BY status")
            conn.execute("INSERT INTO counters SELECT 'content:' || review_status, COUNT(*)"
                         " FROM contents GROUP BY review_status")
            conn.execute("COMMIT")

    @staticmethod
    def _schema_version_of(conn: sqlite3.Connection) -> int:
        """The newest step recorded; 0 for a new file (or one a crash left before step 1)."""
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                        " AND name = 'schema_version'").fetchone() is None:
            return 0
        return conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]

    async def _write(self, work: Callable[..., Any], *args: Any) -> Any:
        if self._writer_thread is None:
            raise RuntimeError("the store is closed")
        self._commit_or_hand_over_short_writes()  # made earlier: they commit first
        done = asyncio.get_running_loop().create_future()
        self._hand_to_writer([(work, args, done)])
        return await done

    def _hand_to_writer(self, batch: list[tuple]) -> None:
        self._queued += len(batch)
        for item in batch:
            self._writes.put(item)

    def _settled(self, batch: list[tuple], outcomes: list[tuple[bool, Any]]) -> None:
        """On the loop: the writer thread is done with `batch` (committed, or failed)."""
        self._queued -= len(batch)
        _settle_all(batch, outcomes)

    async def _write_short(self, work: Callable[..., Any], *args: Any) -> Any:
        """`_write` for a write of a few rows: committed on the loop thread, with the other
        short writes made in the same loop iteration (group commit, as the writer thread
        does), when nothing is queued for the writer thread; else queued like any other.
        Every LOOP_WRITES_PER_CHECKPOINT-th asks the writer thread for a checkpoint."""
        if self._loop_writer is None or self._queued:
            return await self._write(work, *args)
        self._loop_writes += 1
        if self._loop_writes >= LOOP_WRITES_PER_CHECKPOINT:
            self._loop_writes = 0
            self._writes.put(CHECKPOINT_REQUEST)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if not self._short_writes:
            loop.call_soon(self._commit_short_writes)
        self._short_writes.append((work, args, done))
        return await done

    def _commit_short_writes(self) -> None:
        """On the loop: commit the short writes made since the last call in one transaction.
        While a checkpoint catches up they wait for it, which calls this again when done. A
        locked or full database hands them, in order, to the writer thread, which waits and
        retries; the loop never waits on a lock (busy_timeout 0)."""
        if self._loop_writes_held or not self._short_writes:
            return
        batch, self._short_writes = self._short_writes, []
        assert self._loop_writer is not None  # close() commits what is left before closing it
        try:
            outcomes = self._commit_batch(self._loop_writer, batch)
        except sqlite3.Error as exc:
            if _is_transient(exc):
                self._hand_to_writer(batch)
                return
            self._note_damage(exc)
            outcomes = [(False, exc)] * len(batch)
        except Exception as exc:  # a bug here must fail the writes, not leave them waiting
            log.exception("database_write_failed")
            outcomes = [(False, exc)] * len(batch)
        if self._events_written:
            self._events_written = False
            self.on_events_written()
        _settle_all(batch, outcomes)

    def _commit_or_hand_over_short_writes(self) -> None:
        """Before a write that must come after them: the pending short writes commit now,
        or, while a checkpoint holds them, go first to the writer thread."""
        self._commit_short_writes()
        if self._short_writes:
            self._hand_to_writer(self._short_writes)
            self._short_writes = []

    @classmethod
    def _commit_batch(cls, conn: sqlite3.Connection, batch: list[tuple],
                      savepoints: bool = False) -> list[tuple[bool, Any]]:
        """One transaction for a batch of writes, each all-or-nothing. It first runs without
        savepoints (two statements fewer per write); if a write raises (a Conflict, say), the
        batch is rolled back and run again with a savepoint around each write, so that one
        alone is undone. A transient error undoes the batch and is raised."""
        outcomes: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for work, args, _done in batch:
                if savepoints:
                    conn.execute("SAVEPOINT unit")
                try:
                    outcomes.append((True, work(conn, *args)))
                except Exception as exc:
                    if isinstance(exc, sqlite3.Error) and _is_transient(exc):
                        raise
                    if not savepoints:
                        conn.execute("ROLLBACK")
                        return ([(False, exc)] if len(batch) == 1
                                else cls._commit_batch(conn, batch, savepoints=True))
                    conn.execute("ROLLBACK TO unit")
                    outcomes.append((False, exc))
                if savepoints:
                    conn.execute("RELEASE unit")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    async def _read(self, work: Callable[..., Any], *args: Any) -> Any:
        if self._reader is None:
            raise RuntimeError("the store is closed")
        return await self._run(self._reader, work, *args)

    async def _query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        def fetch(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            cursor = conn.execute(sql, params)
            return [_row_dict(cursor, row) for row in cursor.fetchall()]

        return await self._read(fetch)

    # -- accounts ------------------------------------------------------------------------------

    async def sync_accounts(self, accounts: tuple[AccountConfig, ...], now: datetime) -> None:
        """Config is the source of truth; an account removed from it is disabled, not deleted,
        so its tasks and contents keep their name."""

        def sync(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE accounts SET enabled = 0")
            conn.executemany(
                "INSERT INTO accounts (id, name, category, enabled, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name,"
                " category = excluded.category, enabled = excluded.enabled,"
                " updated_at = excluded.updated_at",
                [(a.id, a.name, a.category, int(a.enabled), to_db_time(now)) for a in accounts])

        await self._write(sync)

    async def get_account(self, account_id: int) -> dict[str, Any] | None:
        rows = await self._query("SELECT * FROM accounts WHERE id = ?", (account_id,))
        return rows[0] if rows else None

    # -- tasks: writes -------------------------------------------------------------------------

    @staticmethod
    def _event(conn: sqlite3.Connection, task_id: str, now: str, from_status: str | None,
               to_status: str, detail: str | None = None) -> None:
        conn.execute("INSERT INTO task_events (task_id, at, from_status, to_status, detail)"
                     " VALUES (?, ?, ?, ?, ?)", (task_id, now, from_status, to_status, detail))

    @staticmethod
    def insert_tasks(conn: sqlite3.Connection, tasks: list[dict[str, Any]],
                     now: datetime) -> list[str]:
        """Insert tasks inside the caller's transaction; rows whose dedup_key exists (or
        comes twice) are skipped: a restarted firing must not double its tasks. Returns the
        inserted ids. Four statements however many tasks: a firing of 100 commits at once."""
        stamp = to_db_time(now)
        rows = []
        # The ids of one batch share their millisecond: 5,000 rows differ in 32 random bits
        # only, and two of them collide in one import of 300.
        generated: set[str] = set()
        for task in tasks:
            row = {"keywords": "", "category": "", "requirements": "", "tone": "",
                   "target_audience": "", "priority": 5, "auto_approve": 0, "max_retries": 3,
                   "schedule_run_id": None, "dedup_key": None, "origin": None, **task,
                   "now": stamp}
            if not row.get("task_id"):
                row["task_id"] = new_task_id(now)
                while row["task_id"] in generated:
                    row["task_id"] = new_task_id(now)
                generated.add(row["task_id"])
            row["auto_approve"] = int(bool(row["auto_approve"]))
            rows.append(row)
        keys = [row["dedup_key"] for row in rows if row["dedup_key"] is not None]
        if keys:
            seen = {key for (key,) in conn.execute(
                "SELECT dedup_key FROM content_generation_tasks WHERE dedup_key IN"
                " (SELECT value FROM json_each(?))", (json_text(keys),))}
            fresh = []
            for row in rows:
                if row["dedup_key"] not in seen:
                    fresh.append(row)
                    if row["dedup_key"] is not None:
                        seen.add(row["dedup_key"])
            rows = fresh
        conn.executemany(
            "INSERT INTO content_generation_tasks (task_id, account_id, topic, keywords,"
            " category, requirements, tone, target_audience, priority, auto_approve,"
            " max_retries, schedule_run_id, dedup_key, status, next_attempt_at, created_at,"
            " updated_at) VALUES (:task_id, :account_id, :topic, :keywords, :category,"
            " :requirements, :tone, :target_audience, :priority, :auto_approve, :max_retries,"
            " :schedule_run_id, :dedup_key, 'pending', :now, :now, :now)", rows)
        if rows:  # counted here, not by a trigger: one statement, not one per row
            conn.execute("INSERT INTO counters VALUES ('task:pending', ?) ON CONFLICT (name)"
                         " DO UPDATE SET value = value + excluded.value", (len(rows),))
        conn.executemany("INSERT INTO task_events (task_id, at, to_status, detail)"
                         " VALUES (:task_id, :now, 'pending', :origin)", rows)
        conn.executemany("INSERT INTO topic_history (account_id, topic_key, topic, task_id,"
                         " used_at) VALUES (?, ?, ?, ?, ?)",
                         [(row["account_id"], topic_key(row["topic"]), row["topic"],
                           row["task_id"], stamp) for row in rows])
        return [row["task_id"] for row in rows]

    async def add_tasks(self, tasks: list[dict[str, Any]], now: datetime) -> list[str]:
        return await self._write(self.insert_tasks, tasks, now)

    async def add_tasks_once(self, tasks: list[dict[str, Any]], now: datetime, key: str | None,
                             command: str, reply: Callable[[list[str]], dict[str, Any]]
                             ) -> tuple[dict[str, Any], bool]:
        """add_tasks under an idempotency key: the tasks, the key and the reply they got are
        one transaction. A key seen before adds nothing and returns its first reply, with
        True: so a request repeated after an ambiguous failure cannot double its tasks."""

        def add(conn: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
            if key is not None:
                row = conn.execute("SELECT command, reply, created_at FROM idempotency_keys"
                                   " WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    if row[0] != command:
                        raise Conflict(f"idempotency key {key!r} was used by {row[0]} at"
                                       f" {row[2]}; use another key")
                    return {**json.loads(row[1]), "first_seen_at": row[2]}, True
            result = reply(self.insert_tasks(conn, tasks, now))
            if key is not None:
                conn.execute("INSERT INTO idempotency_keys (key, command, reply, created_at)"
                             " VALUES (?, ?, ?, ?)", (key, command, json_text(result),
                                                      to_db_time(now)))
            return result, False

        return await self._write(add)

    async def claim_next_tasks(self, limit: int, now: datetime, timeout_s: float,
                               per_account_limit: int = 0, budget: BudgetGate | None = None
                               ) -> list[dict[str, Any]]:
        # A budget's sums read the month's usage: not a short write.
        write = self._write if budget is not None else self._write_short
        return await write(self._claim_due, limit, now, timeout_s, per_account_limit, budget)

    def _claim_due(self, conn: sqlite3.Connection, limit: int, now: datetime, timeout_s: float,
                   per_account_limit: int, budget: BudgetGate | None = None
                   ) -> list[dict[str, Any]]:
        """Move up to `limit` due pending tasks to running, best first (inside a write),
        within the budgets of `budget` when given."""
        stamp = to_db_time(now)
        admit = self._budget_admission(conn, budget, now) if budget is not None else None
        if budget is not None and "daemon" in budget.holds:
            return []
        held = [int(scope[8:]) for scope in budget.holds] if budget is not None else []
        # The tasks of an account over its budget are not even read: they would crowd the
        # candidates of the accounts that may still run.
        skip_held = " AND account_id NOT IN (SELECT value FROM json_each(?))" if held else ""
        candidates = conn.execute(
            "SELECT task_id, account_id FROM content_generation_tasks"
            f" WHERE status = 'pending' AND next_attempt_at <= ?{skip_held}"
            " ORDER BY priority DESC, next_attempt_at, id LIMIT ?",
            (stamp, *([json_text(held)] if held else []),
             limit if not (per_account_limit or admit) else limit * 20)).fetchall()
        running: dict[int, int] = {}
        if per_account_limit:
            running = dict(conn.execute(
                "SELECT account_id, COUNT(*) FROM content_generation_tasks"
                " WHERE status = 'running' GROUP BY account_id").fetchall())
        chosen: list[str] = []
        for task_id, account_id in candidates:
            if len(chosen) == limit:
                break
            if per_account_limit and running.get(account_id, 0) >= per_account_limit:
                continue
            if admit is not None and not admit(account_id):
                continue
            running[account_id] = running.get(account_id, 0) + 1
            chosen.append(task_id)
        if not chosen:
            return []
        deadline = to_db_time(now + timedelta(seconds=timeout_s))
        cursor = conn.execute(
            "UPDATE content_generation_tasks SET status = 'running', started_at = ?,"
            " timeout_at = ?, attempt = attempt + 1, progress = NULL, stage = NULL,"
            " pid = NULL, pgid = NULL, updated_at = ?"
            f" WHERE task_id IN ({', '.join('?' * len(chosen))})"
            f" RETURNING {CLAIM_RETURNING}", (stamp, deadline, stamp, *chosen))
        claimed = {row["task_id"]: row for row in
                   (_row_dict(cursor, values) for values in cursor.fetchall())}
        conn.executemany("INSERT INTO task_events (task_id, at, from_status, to_status)"
                         " VALUES (?, ?, 'pending', 'running')",
                         [(task_id, stamp) for task_id in chosen])
        return [claimed[task_id] for task_id in chosen]

    def _budget_admission(self, conn: sqlite3.Connection, gate: BudgetGate, now: datetime
                          ) -> Callable[[int], bool]:
        """Fill `gate.holds` and return the test one more task of an account must pass: the
        spend of the window so far, plus the estimates of the tasks running, plus its own
        estimate, stays within every limit that applies. An admitted task's estimate counts
        for the tasks after it in the same claim. A budget that holds tasks raises one
        budget.exhausted notification per window, in this transaction."""
        day_total, month_total = conn.execute(
            "SELECT COALESCE(SUM(CASE WHEN at >= ? THEN cost END), 0), COALESCE(SUM(cost), 0)"
            " FROM task_usage WHERE at >= ?", (gate.day_start, gate.month_start)).fetchone()
        by_account = {account_id: (day or 0.0, month or 0.0) for account_id, day, month in
                      conn.execute("SELECT account_id, SUM(CASE WHEN at >= ? THEN cost END),"
                                   " SUM(cost) FROM task_usage WHERE at >= ?"
                                   " GROUP BY account_id", (gate.day_start, gate.month_start))}
        recent = conn.execute(
            "SELECT account_id, cost FROM task_usage WHERE cost IS NOT NULL"
            " ORDER BY id DESC LIMIT ?", (ESTIMATE_SAMPLE,)).fetchall()
        overall = (sum(cost for _, cost in recent) / len(recent)) if recent else gate.estimate
        costs: dict[int, list[float]] = {}
        for account_id, cost in recent:
            costs.setdefault(account_id, []).append(cost)
        estimates = {account_id: sum(values) / len(values) for account_id, values in costs.items()}

        def estimate(account_id: int) -> float:
            return estimates.get(account_id, overall)

        committed: dict[int, float] = {}  #: account id -> estimates of its running tasks
        for account_id, count in conn.execute(
                "SELECT account_id, COUNT(*) FROM content_generation_tasks"
                " WHERE status IN ('running', 'submitted') GROUP BY account_id"):
            committed[account_id] = count * estimate(account_id)
        currency = gate.currency

        def over(limit: float, spent: float, more: float) -> bool:
            return bool(limit) and spent + more > limit + BUDGET_EPSILON

        def reason(window: str, limit: float, spent: float, whose: str) -> str:
            return (f"{window} budget{whose} reached: {spent:.4f} of {limit:g} {currency} spent"
                    f" (running tasks and the next one's estimate would exceed it)")

        def hold(scope: str, window: str, limit: float, spent: float) -> None:
            account_id = int(scope[8:]) if scope != "daemon" else None
            whose = f" of account {account_id}" if account_id is not None else ""
            gate.holds[scope] = reason(window, limit, spent, whose)
            began = gate.day_start if window == "daily" else gate.month_start
            self.enqueue_event(conn, "budget.exhausted", {
                "budget": window, "scope": "account" if account_id is not None else "daemon",
                "account_id": account_id, "limit": limit, "spent": round(spent, 6),
                "currency": currency, "message": f"{'每日' if window == 'daily' else '每月'}预算"
                f"已用完{f'（账号 {account_id}）' if account_id is not None else ''}：已花费"
                f" {spent:.4f} / {limit:g} {currency}，任务等待中"},
                now, key=f"budget.exhausted:{scope}:{window}:{began}")

        gate.holds = {}
        running_total = sum(committed.values())
        for window, limit, spent in (("daily", gate.daily, day_total),
                                     ("monthly", gate.monthly, month_total)):
            if over(limit, spent, running_total + overall) and "daemon" not in gate.holds:
                hold("daemon", window, limit, spent)
        for account_id, limits in gate.accounts.items():
            spent_day, spent_month = by_account.get(account_id, (0.0, 0.0))
            more = committed.get(account_id, 0.0) + estimate(account_id)
            for window, limit, spent in (("daily", limits[0], spent_day),
                                         ("monthly", limits[1], spent_month)):
                scope = f"account:{account_id}"
                if over(limit, spent, more) and scope not in gate.holds:
                    hold(scope, window, limit, spent)

        def admit(account_id: int) -> bool:
            cost = estimate(account_id)
            total = sum(committed.values())
            if over(gate.daily, day_total, total + cost) or over(gate.monthly, month_total,
                                                                  total + cost):
                return False
            daily, monthly = gate.accounts.get(account_id, (0.0, 0.0))
            spent_day, spent_month = by_account.get(account_id, (0.0, 0.0))
            mine = committed.get(account_id, 0.0) + cost
            if over(daily, spent_day, mine) or over(monthly, spent_month, mine):
                return False
            committed[account_id] = mine
            return True

        return admit

    async def next_due_at(self) -> datetime | None:
        rows = await self._query("SELECT MIN(next_attempt_at) AS due FROM content_generation_tasks"
                                " WHERE status = 'pending'")
        return from_db_time(rows[0]["due"]) if rows else None

    async def record_process(self, task_id: str, attempt: int, pid: int) -> None:
        """Remember the creator's process group so a restart after a crash can kill it."""

        def record(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE content_generation_tasks SET pid = ?, pgid = ?"
                         " WHERE task_id = ? AND attempt = ? AND status = 'running'",
                         (pid, pid, task_id, attempt))

        await self._write_short(record)

    async def record_progress(self, task_id: str, attempt: int, progress: int | None,
                              stage: str | None) -> None:
        def record(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE content_generation_tasks SET progress = ?, stage = ?"
                         f" WHERE {OWNED_BY_ATTEMPT}", (progress, stage, task_id, attempt))

        await self._write_short(record)

    @staticmethod
    def _owned(conn: sqlite3.Connection, task_id: str, attempt: int, columns: str) -> tuple | None:
        """The task's `columns` if this attempt still owns it (running or submitted): the
        fence that keeps a cancelled or requeued task from being completed by a late worker."""
        return conn.execute(f"SELECT {columns} FROM content_generation_tasks"
                            f" WHERE {OWNED_BY_ATTEMPT}", (task_id, attempt)).fetchone()

    @staticmethod
    def _record_usage(conn: sqlite3.Connection, task_id: str, attempt: int,
                      usage: Usage | None, outcome: str, stamp: str) -> None:
        """The attempt's spend, inside the transaction that records its outcome."""
        if usage is None:
            return
        conn.execute(
            "INSERT INTO task_usage (task_id, attempt, account_id, model, tokens_in, tokens_out,"
            " cost, currency, outcome, at) SELECT task_id, ?, account_id, ?, ?, ?, ?, ?, ?, ?"
            " FROM content_generation_tasks WHERE task_id = ? ON CONFLICT DO NOTHING",
            (attempt, usage.model, usage.tokens_in, usage.tokens_out, usage.cost,
             usage.currency, outcome, stamp, task_id))

    async def complete_task(self, task_id: str, attempt: int, article: dict[str, Any],
                            result: dict[str, Any], now: datetime,
                            then_claim: dict[str, Any] | None = None,
                            usage: Usage | None = None
                            ) -> tuple[int | None, list[dict[str, Any]]]:
        """running -> completed and the contents row, in one transaction. Returns the content
        id (None when the attempt no longer owns the task: cancelled, or requeued) and, with
        `then_claim` (_claim_due's arguments), the tasks claimed in the same transaction."""

        def complete_and_claim(conn: sqlite3.Connection
                               ) -> tuple[int | None, list[dict[str, Any]]]:
            content_id = complete(conn)
            return content_id, (self._claim_due(conn, now=now, **then_claim)
                                if then_claim else [])

        stamp = to_db_time(now)
        # Encoded here, outside the transaction: the writer's thread does SQL, little else.
        encoded = self._encode_article(article, stamp)
        result_text = json_text(result)

        def complete(conn: sqlite3.Connection) -> int | None:
            content_id = self._insert_content(conn, task_id, attempt, encoded, stamp, None)
            if content_id is None:
                return None
            conn.execute("INSERT INTO task_events (task_id, at, from_status, to_status, detail)"
                         " SELECT task_id, ?, status, 'completed', ? FROM"
                         " content_generation_tasks WHERE task_id = ?",
                         (stamp, f"content {content_id}", task_id))
            conn.execute(
                "UPDATE content_generation_tasks SET status = 'completed', content_id = ?,"
                " completed_at = ?, progress = 100, result = ?, error_kind = NULL,"
                " error_class = NULL, error_message = NULL, pid = NULL, pgid = NULL, updated_at = ?"
                " WHERE task_id = ?", (content_id, stamp, result_text, stamp, task_id))
            self._task_finished_events(conn, task_id, "completed", now)
            self._record_usage(conn, task_id, attempt, usage, "completed", stamp)
            self._note_content_cost(conn, task_id, content_id, usage)
            return content_id

        short = ((not then_claim or then_claim.get("budget") is None)
                 and len(article["body"]) <= SHORT_ARTICLE_MAX_CHARS)
        return await (self._write_short if short else self._write)(complete_and_claim)

    @staticmethod
    def _encode_article(article: dict[str, Any], stamp: str) -> tuple[tuple, list]:
        """An article_row as the contents INSERT takes it, and its media (position, url)."""
        return ((article["title"], article["body"], article["summary"], article["word_count"],
                 json_text(article["images"]), json_text(article["quality"]), stamp,
                 article["generator"], article["model"], article["cost"]),
                list(enumerate(article.get("media", ()))))

    @staticmethod
    def _insert_content(conn: sqlite3.Connection, task_id: str, attempt: int,
                        encoded: tuple[tuple, list], stamp: str, draft_note: str | None
                        ) -> int | None:
        """The contents row of this attempt's article, its 'created' event and its media
        queue; None when the attempt no longer owns the task (the fence is in the SELECT).
        A draft (`draft_note`: why it is one) is pending_review whatever auto_approve says."""
        values, media = encoded
        cursor = conn.execute(
            "INSERT INTO contents (task_id, account_id, title, body, summary, word_count,"
            " images, quality, created_at, generator, model, cost, keywords, category,"
            " review_status, review_reason) SELECT task_id, account_id, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?, ?, keywords, category, CASE WHEN auto_approve AND ? IS NULL THEN"
            " 'approved' ELSE 'pending_review' END, ? FROM content_generation_tasks"
            f" WHERE {OWNED_BY_ATTEMPT}", (*values, draft_note, draft_note, task_id, attempt))
        if not cursor.rowcount:
            return None
        content_id = cursor.lastrowid
        conn.execute("INSERT INTO content_events (content_id, at, action, actor, to_status,"
                     " reason) SELECT id, created_at, 'created', 'contenthubd', review_status,"
                     " review_reason FROM contents WHERE id = ?", (content_id,))
        if media:
            # The media loop's queue, in this transaction: a kill -9 loses no image.
            conn.executemany(
                "INSERT INTO content_media (content_id, position, url, next_attempt_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?)",
                [(content_id, position, url, stamp, stamp) for position, url in media])
        return content_id

    @staticmethod
    def _note_content_cost(conn: sqlite3.Connection, task_id: str, content_id: int,
                           usage: Usage | None) -> None:
        if usage is not None:
            # What the article cost: every attempt's spend, failed ones included.
            conn.execute("UPDATE contents SET cost = COALESCE((SELECT SUM(cost) FROM"
                         " task_usage WHERE task_id = ?), cost), model = COALESCE(model, ?)"
                         " WHERE id = ?", (task_id, usage.model, content_id))

    async def fail_attempt(self, task_id: str, attempt: int, now: datetime, error_kind: str,
                           message: str, retry_delay_s: float | None,
                           final_status: str = "failed", usage: Usage | None = None,
                           error_class: str | None = None,
                           draft: dict[str, Any] | None = None) -> str | None:
        """running/submitted -> pending (retry after `retry_delay_s`) or -> final_status.
        `retry_delay_s` None means permanent. Returns the new status, None if not owned.
        A failed attempt's `usage` is recorded too: it cost money all the same. A `draft`
        (an article_row) of a task that fails for good becomes its contents row, pending
        review with a note of the failure."""
        error_class = error_class or error_class_of(error_kind)
        stamp = to_db_time(now)
        encoded = self._encode_article(draft, stamp) if draft is not None else None
        note = f"kept for review: the task failed ({error_class}): {message}"[:500]

        def fail(conn: sqlite3.Connection) -> str | None:
            outcome, content_id = fail_once(conn)
            if outcome is not None:
                self._record_usage(conn, task_id, attempt, usage, outcome, stamp)
            if content_id is not None:
                self._note_content_cost(conn, task_id, content_id, usage)
            return outcome

        def fail_once(conn: sqlite3.Connection) -> tuple[str | None, int | None]:
            row = self._owned(conn, task_id, attempt, "status, retry_count, max_retries")
            if row is None:
                return None, None
            status, retry_count, max_retries = row
            if retry_delay_s is not None and retry_count < max_retries:
                conn.execute(
                    "UPDATE content_generation_tasks SET status = 'pending', retry_count ="
                    " retry_count + 1, next_attempt_at = ?, error_kind = ?, error_class = ?,"
                    " error_message = ?, external_id = NULL, pid = NULL, pgid = NULL,"
                    " updated_at = ? WHERE task_id = ?",
                    (to_db_time(now + timedelta(seconds=retry_delay_s)), error_kind,
                     error_class, message, stamp, task_id))
                self._event(conn, task_id, stamp, status, "pending",
                            f"retry {retry_count + 1}/{max_retries} in {retry_delay_s:.0f}s:"
                            f" {error_kind}")
                return "pending", None
            # Inserted while the fence still holds: the task is this attempt's until the UPDATE.
            content_id = (self._insert_content(conn, task_id, attempt, encoded, stamp, note)
                          if encoded is not None else None)
            conn.execute(
                "UPDATE content_generation_tasks SET status = ?, completed_at = ?,"
                " error_kind = ?, error_class = ?, error_message = ?, pid = NULL, pgid = NULL,"
                " content_id = COALESCE(?, content_id), updated_at = ? WHERE task_id = ?",
                (final_status, stamp, error_kind, error_class, message, content_id, stamp,
                 task_id))
            kept = f" (article kept for review: content {content_id})" if content_id else ""
            self._event(conn, task_id, stamp, status, final_status,
                        f"{error_kind}: {message}"[:500 - len(kept)] + kept)
            self._task_finished_events(conn, task_id, final_status, now)
            return final_status, content_id

        return await self._write_short(fail)

    async def release_attempt(self, task_id: str, attempt: int, now: datetime,
                              next_attempt_at: datetime, error_kind: str, error_class: str,
                              message: str, why: str, usage: Usage | None = None,
                              notify: tuple[str, dict[str, Any]] | None = None,
                              breaker: dict[str, Any] | None = None) -> str | None:
        """running/submitted -> pending WITHOUT spending a retry: the failure was the
        creator's (rate limit, circuit breaker), not the task's. Returns "pending", None if
        the attempt no longer owns the task. The attempt's `usage` is recorded all the same,
        and `notify` (event, data) and the circuit breaker's new state (`breaker`, the
        CircuitBreaker's snapshot) are written in the same transaction."""

        def release(conn: sqlite3.Connection) -> str | None:
            stamp = to_db_time(now)
            row = self._owned(conn, task_id, attempt, "status")
            if row is None:
                return None
            self._record_usage(conn, task_id, attempt, usage, "pending", stamp)
            conn.execute(
                "UPDATE content_generation_tasks SET status = 'pending', next_attempt_at = ?,"
                " error_kind = ?, error_class = ?, error_message = ?, external_id = NULL,"
                " pid = NULL, pgid = NULL, progress = NULL, stage = NULL, updated_at = ?"
                " WHERE task_id = ?", (to_db_time(next_attempt_at), error_kind, error_class,
                                       message, stamp, task_id))
            self._event(conn, task_id, stamp, row[0], "pending",
                        f"{why}, no retry spent: {error_class}: {message}"[:500])
            if notify is not None:
                self.enqueue_event(conn, notify[0], notify[1], now)
            if breaker is not None:
                self._save_breaker(conn, breaker, stamp)
            return "pending"

        return await self._write_short(release)

    async def notify_creator(self, event: str, data: dict[str, Any], now: datetime,
                             breaker: dict[str, Any] | None = None) -> None:
        """creator.recovered (or tripped) when no task changes with it (resume, a probe),
        with the circuit breaker's new state."""

        def notify(conn: sqlite3.Connection) -> None:
            self.enqueue_event(conn, event, data, now)
            if breaker is not None:
                self._save_breaker(conn, breaker, to_db_time(now))

        await self._write(notify)

    @staticmethod
    def _save_breaker(conn: sqlite3.Connection, breaker: dict[str, Any], stamp: str) -> None:
        conn.execute(
            "INSERT INTO creator_breaker (id, state, error_class, reason, since, failures,"
            " updated_at) VALUES (1, :state, :error_class, :reason, :since, :failures, :at)"
            " ON CONFLICT (id) DO UPDATE SET state = excluded.state, error_class ="
            " excluded.error_class, reason = excluded.reason, since = excluded.since,"
            " failures = excluded.failures, updated_at = excluded.updated_at",
            {**breaker, "at": stamp})

    async def load_breaker(self) -> dict[str, Any] | None:
        """The circuit breaker as the last daemon left it; None if it never opened."""
        rows = await self._query("SELECT state, error_class, reason, since, failures"
                                 " FROM creator_breaker WHERE id = 1")
        return rows[0] if rows else None

    async def mark_submitted(self, task_id: str, attempt: int, external_id: str,
                             now: datetime) -> bool:
        """running -> submitted: the remote job is accepted, and queued until its status
        says otherwise."""

        def submitted(conn: sqlite3.Connection) -> bool:
            stamp = to_db_time(now)
            cursor = conn.execute(
                "UPDATE content_generation_tasks SET status = 'submitted', external_id = ?,"
                " remote_status = 'queued', submitted_at = ?, pid = NULL, pgid = NULL,"
                " updated_at = ? WHERE task_id = ? AND attempt = ? AND status = 'running'",
                (external_id, stamp, stamp, task_id, attempt))
            if cursor.rowcount:
                self._event(conn, task_id, stamp, "running", "submitted", external_id)
            return bool(cursor.rowcount)

        return await self._write_short(submitted)

    async def record_remote_status(self, task_id: str, attempt: int, remote_status: str,
                                   detail: str, now: datetime) -> bool:
        """A submitted task's job changed state remotely (queued, running, unknown): the
        column and its event, if this attempt still holds the task. True when it changed."""

        def record(conn: sqlite3.Connection) -> bool:
            stamp = to_db_time(now)
            cursor = conn.execute(
                "UPDATE content_generation_tasks SET remote_status = ?, updated_at = ?"
                " WHERE task_id = ? AND attempt = ? AND status = 'submitted'"
                " AND remote_status IS NOT ?", (remote_status, stamp, task_id, attempt,
                                                remote_status))
            if cursor.rowcount:
                self._event(conn, task_id, stamp, "submitted", "submitted",
                            f"remote job {remote_status}: {detail}"[:500])
            return bool(cursor.rowcount)

        return await self._write(record)

    async def cancel_task(self, task_id: str, now: datetime) -> dict[str, Any]:
        """Any non-terminal status -> cancelled. Returns the task as it was before."""

        def cancel(conn: sqlite3.Connection) -> dict[str, Any]:
            before = self._get_task(conn, task_id)
            if before["status"] in TERMINAL_STATUSES:
                raise Conflict(f"task {task_id} is already {before['status']}")
            stamp = to_db_time(now)
            conn.execute("UPDATE content_generation_tasks SET status = 'cancelled',"
                         " completed_at = ?, error_kind = 'cancelled', error_message ="
                         " 'cancelled by operator', updated_at = ? WHERE task_id = ?",
                         (stamp, stamp, task_id))
            self._event(conn, task_id, stamp, before["status"], "cancelled", "operator")
            self._task_finished_events(conn, task_id, "cancelled", now)
            return before

        return await self._write(cancel)

    async def retry_task(self, task_id: str, now: datetime) -> None:
        """failed/timeout/cancelled -> pending with fresh counters; history is kept."""

        def retry(conn: sqlite3.Connection) -> None:
            before = self._get_task(conn, task_id)
            if before["status"] not in ("failed", "timeout", "cancelled"):
                raise Conflict(f"task {task_id} is {before['status']}; only failed, timeout or"
                               " cancelled tasks can be retried")
            # An article is kept per task: the draft a failed attempt left comes first.
            kept = conn.execute("SELECT id FROM contents WHERE task_id = ?",
                                (task_id,)).fetchone()
            if kept is not None:
                raise Conflict(f"task {task_id} failed but its article was kept for review as"
                               f" content {kept[0]}; approve that one, or delete it"
                               f" (contenthubctl content delete {kept[0]}) and retry")
            stamp = to_db_time(now)
            conn.execute("UPDATE content_generation_tasks SET status = 'pending', retry_count = 0,"
                         " next_attempt_at = ?, completed_at = NULL, error_kind = NULL,"
                         " error_class = NULL, error_message = NULL, external_id = NULL,"
                         " progress = NULL, stage = NULL, updated_at = ? WHERE task_id = ?",
                         (stamp, stamp, task_id))
            self._event(conn, task_id, stamp, before["status"], "pending", "operator retry")

        await self._write(retry)

    async def requeue_tasks(self, task_ids: list[str], now: datetime, reason: str) -> int:
        """running -> pending without spending a retry (graceful stop, crash recovery)."""

        def requeue(conn: sqlite3.Connection) -> int:
            stamp = to_db_time(now)
            count = 0
            for task_id in task_ids:
                cursor = conn.execute(
                    "UPDATE content_generation_tasks SET status = 'pending', next_attempt_at = ?,"
                    " pid = NULL, pgid = NULL, progress = NULL, stage = NULL, updated_at = ?"
                    " WHERE task_id = ? AND status = 'running'", (stamp, stamp, task_id))
                if cursor.rowcount:
                    self._event(conn, task_id, stamp, "running", "pending", reason)
                    count += 1
            return count

        return await self._write(requeue)

    async def existing_task_ids(self, task_ids: list[str]) -> set[str]:
        """Which of these ids are tasks of this database."""
        found: set[str] = set()
        for start in range(0, len(task_ids), 500):
            chunk = task_ids[start:start + 500]
            rows = await self._query("SELECT task_id FROM content_generation_tasks WHERE task_id"
                                    f" IN ({', '.join('?' * len(chunk))})", tuple(chunk))
            found.update(row["task_id"] for row in rows)
        return found

    async def running_task_ids(self) -> list[str]:
        rows = await self._query("SELECT task_id FROM content_generation_tasks"
                                " WHERE status = 'running'")
        return [row["task_id"] for row in rows]

    # -- tasks: reads --------------------------------------------------------------------------

    @staticmethod
    def _get_task(conn: sqlite3.Connection, task_id: str) -> dict[str, Any]:
        cursor = conn.execute(f"SELECT {TASK_COLUMNS}, t.result FROM {TASK_FROM}"
                              " WHERE t.task_id = ?", (task_id,))
        row = cursor.fetchone()
        if row is None:
            raise NotFound(f"no task {task_id}")
        return _row_dict(cursor, row)

    async def get_task(self, task_id: str, with_events: bool = False) -> dict[str, Any]:
        def get(conn: sqlite3.Connection) -> dict[str, Any]:
            task = self._get_task(conn, task_id)
            if with_events:
                cursor = conn.execute("SELECT at, from_status, to_status, detail FROM task_events"
                                      " WHERE task_id = ? ORDER BY id", (task_id,))
                task["events"] = [_row_dict(cursor, row) for row in cursor.fetchall()]
            return task

        return await self._read(get)

    @staticmethod
    def _task_filter(status: str | list[str] | None,
                     account_id: int | None) -> tuple[str, list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if status:
            statuses = [status] if isinstance(status, str) else list(status)
            where.append(f"t.status IN ({', '.join('?' * len(statuses))})")
            params += statuses
        if account_id is not None:
            where.append("t.account_id = ?")
            params.append(account_id)
        return (f"WHERE {' AND '.join(where)}" if where else ""), params

    async def list_tasks(self, *, status: str | list[str] | None = None,
                         account_id: int | None = None, limit: int = 50,
                         order: str = "newest") -> list[dict[str, Any]]:
        """Tasks in one of TASK_ORDERS (by name: callers never pass SQL)."""
        clause, params = self._task_filter(status, account_id)
        return await self._query(f"SELECT {TASK_COLUMNS} FROM {TASK_FROM} {clause}"
                                 f" ORDER BY {TASK_ORDERS[order]} LIMIT ?", (*params, limit))

    async def count_tasks(self, *, status: str | list[str] | None = None,
                          account_id: int | None = None) -> int:
        """How many rows list_tasks would return without its limit."""
        clause, params = self._task_filter(status, account_id)
        rows = await self._query(
            f"SELECT COUNT(*) AS n FROM content_generation_tasks t {clause}", tuple(params))
        return rows[0]["n"]

    async def find_task_ids(self, abbreviation: str, limit: int) -> list[str]:
        """Task ids that start with `abbreviation`, or whose random part (after
        `task-<ms>-`, what narrow tables show) does. Each step uses an index, and a full id
        costs one lookup."""
        end = abbreviation + "\U0010ffff"

        def find(conn: sqlite3.Connection) -> list[str]:
            for sql, params in (
                    ("SELECT task_id FROM content_generation_tasks WHERE task_id = ?",
                     (abbreviation,)),
                    ("SELECT task_id FROM content_generation_tasks WHERE task_id >= ?"
                     " AND task_id < ? ORDER BY task_id LIMIT ?", (abbreviation, end, limit)),
                    ("SELECT task_id FROM content_generation_tasks WHERE substr(task_id, 20)"
                     " >= ? AND substr(task_id, 20) < ? AND task_id GLOB 'task-[0-9]*-*'"
                     " ORDER BY substr(task_id, 20) LIMIT ?", (abbreviation, end, limit))):
                found = [row[0] for row in conn.execute(sql, params).fetchall()]
                if found:
                    return found
            return []

        return await self._read(find)

    async def status_counts(self) -> dict[str, int]:
        rows = await self._query("SELECT substr(name, 6) AS status, value FROM counters"
                                " WHERE name LIKE 'task:%' AND value > 0")
        return {row["status"]: row["value"] for row in rows}

    # -- contents ------------------------------------------------------------------------------

    async def get_content(self, key: int | str, with_history: bool = False) -> dict[str, Any]:
        column = "c.task_id" if isinstance(key, str) else "c.id"

        def get(conn: sqlite3.Connection) -> dict[str, Any]:
            cursor = conn.execute(f"SELECT {CONTENT_LIST_COLUMNS}, c.body FROM {CONTENT_FROM}"
                                  f" WHERE {column} = ?", (key,))
            row = cursor.fetchone()
            if row is None:
                raise NotFound(f"no content {key}")
            content = _row_dict(cursor, row)
            if with_history:
                cursor = conn.execute(
                    "SELECT at, action, actor, actor_uid, from_status, to_status, reason"
                    " FROM content_events WHERE content_id = ? ORDER BY id", (content["id"],))
                content["history"] = [_row_dict(cursor, row) for row in cursor.fetchall()]
            content["media"] = self._media_of(conn, [content["id"]]).get(content["id"], [])
            return content

        return await self._read(get)

    @staticmethod
    def _content_filter(account_id: int | None, review_status: str | None, since: str | None,
                        ids: list[int] | None) -> tuple[str, list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (("c.account_id = ?", account_id),
                              ("c.review_status = ?", review_status),
                              ("c.created_at >= ?", since)):
            if value is not None:
                where.append(clause)
                params.append(value)
        if ids:
            where.append(f"c.id IN ({', '.join('?' * len(ids))})")
            params += ids
        return (f"WHERE {' AND '.join(where)}" if where else ""), params

    async def list_contents(self, *, account_id: int | None = None,
                            review_status: str | None = None, since: str | None = None,
                            ids: list[int] | None = None, limit: int = 50,
                            with_body: bool = False,
                            before_id: int | None = None) -> list[dict[str, Any]]:
        """Newest first; `before_id` pages on from the last id of the previous page."""
        clause, params = self._content_filter(account_id, review_status, since, ids)
        if before_id is not None:
            clause = f"{clause} AND c.id < ?" if clause else "WHERE c.id < ?"
            params.append(before_id)
        columns = CONTENT_LIST_COLUMNS + (", c.body" if with_body else "")

        def fetch(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            cursor = conn.execute(f"SELECT {columns} FROM {CONTENT_FROM} {clause}"
                                  " ORDER BY c.id DESC LIMIT ?", (*params, limit))
            contents = [_row_dict(cursor, row) for row in cursor.fetchall()]
            if with_body:  # an export: the article with its saved images
                media = self._media_of(conn, [content["id"] for content in contents])
                for content in contents:
                    content["media"] = media.get(content["id"], [])
            return contents

        return await self._read(fetch)

    @staticmethod
    def _media_of(conn: sqlite3.Connection, ids: list[int]) -> dict[int, list[dict[str, Any]]]:
        cursor = conn.execute(
            "SELECT content_id, url, path, bytes, content_type, status, attempts, error"
            " FROM content_media WHERE content_id IN (SELECT value FROM json_each(?))"
            " ORDER BY content_id, position", (json_text(ids),))
        media: dict[int, list[dict[str, Any]]] = {}
        for row in cursor.fetchall():
            item = _row_dict(cursor, row)
            media.setdefault(item.pop("content_id"), []).append(item)
        return media

    async def delete_contents(self, ids: list[int]) -> list[int]:
        """Delete contents with their history and media rows; returns the ids deleted (the
        caller removes their media directories once this has committed)."""

        def delete(conn: sqlite3.Connection) -> list[int]:
            return [row[0] for row in conn.execute(
                "DELETE FROM contents WHERE id IN (SELECT value FROM json_each(?))"
                " RETURNING id", (json_text(ids),)).fetchall()]

        return await self._write(delete)

    async def existing_content_ids(self, ids: list[int]) -> set[int]:
        rows = await self._query("SELECT id FROM contents WHERE id IN"
                                " (SELECT value FROM json_each(?))", (json_text(ids),))
        return {row["id"] for row in rows}

    # -- media ---------------------------------------------------------------------------------

    async def due_media(self, now: datetime, limit: int) -> list[dict[str, Any]]:
        return await self._query(
            "SELECT id, content_id, position, url, attempts FROM content_media"
            " WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at, id"
            " LIMIT ?", (to_db_time(now), limit))

    async def media_counts(self, since: datetime) -> dict[str, Any]:
        """Images waiting for a download, and those given up on since `since` (with the
        newest such article, for the operator to look at)."""
        [row] = await self._query(
            "SELECT SUM(status = 'pending') AS pending,"
            " SUM(status = 'failed' AND updated_at >= :since) AS failed,"
            " MAX(CASE WHEN status = 'failed' AND updated_at >= :since THEN content_id END)"
            " AS latest_failed FROM content_media WHERE status IN ('pending', 'failed')",
            {"since": to_db_time(since)})
        return {"pending": row["pending"] or 0, "failed": row["failed"] or 0,
                "latest_failed": row["latest_failed"]}

    async def next_media_due(self) -> datetime | None:
        rows = await self._query("SELECT MIN(next_attempt_at) AS due FROM content_media"
                                " WHERE status = 'pending'")
        return from_db_time(rows[0]["due"]) if rows else None

    async def record_media(self, media_id: int, now: datetime, *, status: str,
                           path: str | None = None, size: int | None = None,
                           content_type: str | None = None, error: str | None = None,
                           retry_at: datetime | None = None) -> bool:
        """One attempt's outcome: saved, failed, or (with `retry_at`) pending again. False
        when the row is gone (its article was deleted meanwhile)."""

        def record(conn: sqlite3.Connection) -> bool:
            stamp = to_db_time(now)
            return bool(conn.execute(
                "UPDATE content_media SET status = ?, path = ?, bytes = ?, content_type = ?,"
                " error = ?, attempts = attempts + 1, next_attempt_at = COALESCE(?, ?),"
                " updated_at = ? WHERE id = ? AND status = 'pending'",
                (status, path, size, content_type, error, to_db_time(retry_at), stamp, stamp,
                 media_id)).rowcount)

        return await self._write(record)

    async def count_contents(self, *, account_id: int | None = None,
                             review_status: str | None = None, since: str | None = None,
                             ids: list[int] | None = None) -> int:
        clause, params = self._content_filter(account_id, review_status, since, ids)
        rows = await self._query(f"SELECT COUNT(*) AS n FROM contents c {clause}", tuple(params))
        return rows[0]["n"]

    async def review_contents(self, ids: list[int], status: str, reason: str | None,
                              actor: tuple[int | None, str], now: datetime,
                              force: bool = False) -> dict[str, list[int]]:
        """Approve or reject contents, each change with its content_events row (who, when,
        from, to, reason). A content already in `status` is left as it is ("unchanged").
        Approving a rejected content or rejecting an approved one undoes someone's decision:
        without `force` that is a Conflict and nothing in the request changes."""
        stamp = to_db_time(now)
        action = "approve" if status == "approved" else "reject"

        def review(conn: sqlite3.Connection) -> dict[str, list[int]]:
            found = dict(conn.execute(
                "SELECT id, review_status FROM contents WHERE id IN"
                " (SELECT value FROM json_each(?))", (json_text(ids),)).fetchall())
            opposite = "rejected" if status == "approved" else "approved"
            conflicts = [i for i in ids if found.get(i) == opposite]
            if conflicts and not force:
                raise Conflict(
                    f"content {', '.join(map(str, conflicts))} is {opposite}; {action} with"
                    f" --force to overturn that review (see its history: contenthubctl content"
                    f" show {conflicts[0]})", data={"conflicts": conflicts})
            outcome: dict[str, list[int]] = {"updated": [], "unchanged": [], "missing": []}
            for content_id in dict.fromkeys(ids):
                before = found.get(content_id)
                if before is None:
                    outcome["missing"].append(content_id)
                    continue
                if before == status:
                    outcome["unchanged"].append(content_id)
                    continue
                conn.execute("UPDATE contents SET review_status = ?, review_reason = ?"
                             " WHERE id = ?", (status, reason, content_id))
                conn.execute("INSERT INTO content_events (content_id, at, action, actor_uid,"
                             " actor, from_status, to_status, reason)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (content_id, stamp, action, *actor, before, status, reason))
                outcome["updated"].append(content_id)
            return outcome

        return await self._write(review)


    # -- topics --------------------------------------------------------------------------------

    @staticmethod
    def _had_topic(conn: sqlite3.Connection, account_id: int, key: str, since: str) -> bool:
        return conn.execute("SELECT 1 FROM topic_history WHERE account_id = ? AND topic_key = ?"
                            " AND used_at >= ? LIMIT 1", (account_id, key, since)
                            ).fetchone() is not None

    @classmethod
    def _fresh_topic(cls, conn: sqlite3.Connection, since: str | None, account_id: int,
                     topic: str, taken: set[str]) -> bool:
        """Not had by the account since `since` (None: the rule is off), nor earlier in this
        firing."""
        if since is None:
            return True
        key = topic_key(topic)
        return key not in taken and not cls._had_topic(conn, account_id, key, since)

    async def add_firing(self, slots: list[TopicSlots], run_id: int | None, schedule: str,
                         instant: str, now: datetime, repeat_days: int
                         ) -> dict[int, dict[str, Any]]:
        """Pick each account's topics and insert the firing's tasks, in one transaction: pool
        topics become `used` with their task_id, template numbers move on, and the topics
        enter the history. Returns per account {"short": pool topics missing, "repeated":
        topics left out because the account had them within `repeat_days`}. A pool that ran
        short, or cannot serve the next firing, writes a topics.low event in the same
        transaction. A firing whose run already has tasks (resumed after a crash) adds
        nothing."""
        return await self._write(self._add_firing, slots, run_id, schedule, instant, now,
                                 repeat_days)

    def _add_firing(self, conn: sqlite3.Connection, slots: list[TopicSlots], run_id: int | None,
                    schedule: str, instant: str, now: datetime, repeat_days: int
                    ) -> dict[int, dict[str, Any]]:
        outcome: dict[int, dict[str, Any]] = {slot.account_id: {"short": 0, "repeated": []}
                                              for slot in slots}
        if run_id is not None and conn.execute(
                "SELECT 1 FROM content_generation_tasks WHERE schedule_run_id = ? LIMIT 1",
                (run_id,)).fetchone():
            return outcome
        since = to_db_time(now - timedelta(days=repeat_days)) if repeat_days else None
        tasks: list[dict[str, Any]] = []
        drawn: list[tuple[int, str]] = []  #: (pool topic id, task_id)
        repeats_in_pool: list[int] = []
        numbers: list[tuple[int, str, int]] = []

        def add_task(slot: TopicSlots, topic: dict[str, Any]) -> str:
            task = {**slot.fields, **{k: v for k, v in topic.items() if v},
                    "account_id": slot.account_id, "task_id": new_task_id(now),
                    "dedup_key": f"{schedule}:{instant}:{slot.account_id}:{len(tasks) + 1}"}
            tasks.append(task)
            return task["task_id"]

        for slot in slots:
            taken: set[str] = set()
            report = outcome[slot.account_id]
            if slot.source == "pool":
                need, after = slot.count, 0
                while need > 0:
                    rows = conn.execute(
                        "SELECT id, topic, keywords, requirements, tone, category FROM topics"
                        " WHERE account_id = ? AND status = 'queued' AND id > ? ORDER BY id"
                        " LIMIT ?", (slot.account_id, after, need)).fetchall()
                    if not rows:
                        break
                    for topic_id, topic, keywords, requirements, tone, category in rows:
                        after = topic_id
                        if not self._fresh_topic(conn, since, slot.account_id, topic, taken):
                            repeats_in_pool.append(topic_id)
                            report["repeated"].append(topic)
                            continue
                        taken.add(topic_key(topic))
                        drawn.append((topic_id, add_task(slot, {
                            "topic": topic, "keywords": keywords, "requirements": requirements,
                            "tone": tone, "category": category})))
                        need -= 1
                report["short"] = need
            elif slot.source == "list":
                for topic in slot.topics:
                    if self._fresh_topic(conn, since, slot.account_id, topic["topic"], taken):
                        taken.add(topic_key(topic["topic"]))
                        add_task(slot, topic)
                    else:
                        report["repeated"].append(topic["topic"])
            else:
                assert slot.render is not None
                row = conn.execute("SELECT last_number FROM topic_numbers WHERE account_id = ?"
                                   " AND template = ?", (slot.account_id, slot.numbering)
                                   ).fetchone()
                number = row[0] if row else 0
                for _ in range(slot.count):
                    number += 1
                    topic = slot.render(number)
                    # A number the account already had (a database from before numbering
                    # continued, or a hand-made task) is passed over; a bounded search.
                    for _attempt in range(1000):
                        if self._fresh_topic(conn, since, slot.account_id, topic, taken):
                            break
                        number += 1
                        topic = slot.render(number)
                    else:
                        report["repeated"].append(topic)
                        continue
                    taken.add(topic_key(topic))
                    add_task(slot, {"topic": topic})
                numbers.append((slot.account_id, slot.numbering, number))
        inserted = set(self.insert_tasks(conn, tasks, now))
        stamp = to_db_time(now)
        conn.executemany("UPDATE topics SET status = 'used', task_id = ?, used_at = ?"
                         " WHERE id = ? AND status = 'queued'",
                         [(task_id, stamp, topic_id) for topic_id, task_id in drawn
                          if task_id in inserted])
        conn.executemany("UPDATE topics SET status = 'skipped', used_at = ? WHERE id = ?",
                         [(stamp, topic_id) for topic_id in repeats_in_pool])
        conn.executemany("INSERT INTO topic_numbers (account_id, template, last_number)"
                         " VALUES (?, ?, ?) ON CONFLICT (account_id, template) DO UPDATE SET"
                         " last_number = MAX(last_number, excluded.last_number)", numbers)
        for slot in slots:
            if slot.source == "pool":
                self._topics_low_event(conn, slot, outcome[slot.account_id]["short"], schedule,
                                       now)
        return outcome

    def _topics_low_event(self, conn: sqlite3.Connection, slot: TopicSlots, short: int,
                          schedule: str, now: datetime) -> None:
        """topics.low when this firing was short, or the next one will be: once per account
        and day."""
        queued = conn.execute("SELECT COUNT(*) FROM topics WHERE account_id = ? AND"
                              " status = 'queued'", (slot.account_id,)).fetchone()[0]
        if not short and queued >= slot.count:
            return
        row = conn.execute("SELECT name FROM accounts WHERE id = ?", (slot.account_id,)
                           ).fetchone()
        name = row[0] if row else str(slot.account_id)
        message = (f"账号 {name}（{slot.account_id}）的选题池" + (f"本次缺 {short} 个选题，"
                   if short else "不够下一次使用，") + f"剩余 {queued} 个，每次取 {slot.count} 个。"
                   f"补充：contenthubctl topics add -a {slot.account_id} 选题…")
        self.enqueue_event(conn, "topics.low", {
            "account_id": slot.account_id, "account_name": name, "schedule": schedule,
            "short": short, "queued": queued, "per_firing": slot.count, "message": message},
            now, key=f"topics.low:{slot.account_id}:{now.date().isoformat()}")

    async def add_topics(self, topics: list[dict[str, Any]], source: str, now: datetime,
                         repeat_days: int, limit: int | None = None) -> dict[str, Any]:
        """Queue topics in the pool, in one transaction. A topic the account has queued
        already, or had within `repeat_days`, is a duplicate and is not added. With `limit`,
        new topics past that many are left out."""

        def add(conn: sqlite3.Connection) -> dict[str, Any]:
            since = to_db_time(now - timedelta(days=repeat_days)) if repeat_days else None
            stamp = to_db_time(now)
            added: list[int] = []
            duplicates: list[dict[str, str]] = []
            seen: set[tuple[int, str]] = set()
            for topic in topics:
                if limit is not None and len(added) >= limit:
                    break
                account_id, key = topic["account_id"], topic_key(topic["topic"])
                queued = conn.execute("SELECT id FROM topics WHERE account_id = ? AND"
                                      " topic_key = ? AND status = 'queued'",
                                      (account_id, key)).fetchone()
                reason = None
                if (account_id, key) in seen:
                    reason = f"given twice for account {account_id}"
                elif queued:
                    reason = f"already queued for account {account_id} (topic {queued[0]})"
                elif since is not None and self._had_topic(conn, account_id, key, since):
                    reason = f"account {account_id} had it within {repeat_days} days"
                if reason:
                    duplicates.append({"topic": topic["topic"], "reason": reason})
                    continue
                seen.add((account_id, key))
                [(topic_id,)] = conn.execute(
                    "INSERT INTO topics (account_id, topic, topic_key, keywords, requirements,"
                    " tone, category, source, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " RETURNING id",
                    (account_id, topic["topic"], key, topic.get("keywords") or "",
                     topic.get("requirements") or "", topic.get("tone") or "",
                     topic.get("category") or "", source, stamp)).fetchall()
                added.append(topic_id)
            return {"added": added, "duplicates": duplicates}

        return await self._write(add)

    @staticmethod
    def _topic_filter(account_id: int | None, status: str | None) -> tuple[str, list[Any]]:
        where, params = [], []
        for clause, value in (("account_id = ?", account_id), ("status = ?", status)):
            if value is not None:
                where.append(clause)
                params.append(value)
        return (f"WHERE {' AND '.join(where)}" if where else ""), params

    async def list_topics(self, account_id: int | None, status: str | None,
                          limit: int) -> list[dict[str, Any]]:
        clause, params = self._topic_filter(account_id, status)
        return await self._query("SELECT id, account_id, topic, keywords, status, task_id,"
                                f" added_at, used_at, source FROM topics {clause}"
                                " ORDER BY id LIMIT ?", (*params, limit))

    async def count_topics(self, account_id: int | None, status: str | None) -> int:
        clause, params = self._topic_filter(account_id, status)
        rows = await self._query(f"SELECT COUNT(*) AS n FROM topics {clause}", tuple(params))
        return rows[0]["n"]

    async def skip_topics(self, ids: list[int], now: datetime) -> dict[str, Any]:
        """queued -> skipped; the ids that were not queued are named with their status."""

        def skip(conn: sqlite3.Connection) -> dict[str, Any]:
            skipped, not_skipped = [], []
            for topic_id in ids:
                row = conn.execute("SELECT status FROM topics WHERE id = ?", (topic_id,)
                                   ).fetchone()
                if row is None or row[0] != "queued":
                    not_skipped.append({"id": topic_id, "reason": "no such topic" if row is None
                                        else f"topic is {row[0]}, not queued"})
                    continue
                conn.execute("UPDATE topics SET status = 'skipped', used_at = ? WHERE id = ?",
                             (to_db_time(now), topic_id))
                skipped.append(topic_id)
            return {"skipped": skipped, "not_skipped": not_skipped}

        return await self._write(skip)

    async def queued_topic_counts(self) -> dict[int, int]:
        rows = await self._query("SELECT account_id, COUNT(*) AS n FROM topics"
                                " WHERE status = 'queued' GROUP BY account_id")
        return {row["account_id"]: row["n"] for row in rows}

    async def topics_to_avoid(self, account_id: int, limit: int) -> list[str]:
        """What a research request lists as taken: the account's queued topics, its latest
        topics and its latest article titles, `limit` of each at most, each once."""
        rows = await self._query(
            "SELECT topic AS text FROM (SELECT topic FROM topics WHERE account_id = ? AND"
            " status = 'queued' ORDER BY id LIMIT ?) UNION ALL"
            " SELECT * FROM (SELECT topic FROM topic_history WHERE account_id = ?"
            " ORDER BY used_at DESC, id DESC LIMIT ?) UNION ALL"
            " SELECT * FROM (SELECT title FROM contents WHERE account_id = ?"
            " ORDER BY id DESC LIMIT ?)", (account_id, limit, account_id, limit, account_id,
                                          limit))
        seen: dict[str, str] = {}
        for row in rows:
            seen.setdefault(topic_key(row["text"]), row["text"])
        return list(seen.values())

    # -- reports -------------------------------------------------------------------------------

    async def metrics(self) -> dict[str, Any]:
        """ContentHub's `monitor metrics` keys. The average covers the last day's completions
        so it stays cheap on a database of millions of tasks."""

        def collect(conn: sqlite3.Connection) -> dict[str, Any]:
            counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
            counts = {name[5:]: n for name, n in counters.items() if name.startswith("task:")}
            contents = {name[8:]: n for name, n in counters.items()
                        if name.startswith("content:")}
            since = to_db_time(utc_now() - timedelta(days=1))
            avg = conn.execute(
                "SELECT AVG((julianday(completed_at) - julianday(started_at)) * 86400)"
                " FROM content_generation_tasks WHERE status = 'completed'"
                " AND completed_at >= ?", (since,)).fetchone()[0]
            finished = sum(counts.get(s, 0) for s in ("completed", "failed", "timeout"))
            # A task that completes on its third try is one success in three attempts: the
            # task rate alone reads 100% while every first attempt fails.
            attempts = sum(counters.get(f"attempt:{kind}", 0)
                           for kind in ("success", "retry", "failed", "timeout"))
            return {
                "total": sum(counts.values()),
                "pending": counts.get("pending", 0),
                "submitted": counts.get("submitted", 0),
                "running": counts.get("running", 0),
                "completed": counts.get("completed", 0),
                "failed_count": counts.get("failed", 0),
                "timeout_count": counts.get("timeout", 0),
                "cancelled_count": counts.get("cancelled", 0),
                "success_rate": round(counts.get("completed", 0) / finished, 4) if finished
                else None,
                "attempts_total": attempts,
                "attempt_success_rate": round(counters.get("attempt:success", 0) / attempts, 4)
                if attempts else None,
                "avg_completion_seconds": round(avg, 3) if avg is not None else None,
                "contents_total": sum(contents.values()),
                "pending_review": contents.get("pending_review", 0),
            }

        return await self._read(collect)

    async def stats(self, days: int, now: datetime, tz: ZoneInfo) -> dict[str, Any]:
        """`monitor stats`: outcomes of the tasks created in the last `days` days."""
        since = to_db_time(now - timedelta(days=days))
        utc_offset = now.astimezone(tz).utcoffset() or timedelta()
        offset = f"{int(utc_offset.total_seconds())} seconds"

        def collect(conn: sqlite3.Connection) -> dict[str, Any]:
            def rows(sql: str, *params: Any) -> list[dict[str, Any]]:
                cursor = conn.execute(sql, params)
                return [_row_dict(cursor, row) for row in cursor.fetchall()]

            outcome = ("COUNT(*) AS total, SUM(t.status = 'completed') AS completed,"
                       " SUM(t.status IN ('failed', 'timeout')) AS failed")
            [totals] = rows(f"SELECT {outcome}, SUM(t.status = 'timeout') AS timeout"
                            " FROM content_generation_tasks t WHERE t.created_at >= ?", since)
            reasons = rows("SELECT COALESCE(error_kind, 'unknown') AS kind, COUNT(*) AS n FROM"
                           " content_generation_tasks WHERE created_at >= ? AND status IN"
                           " ('failed', 'timeout') GROUP BY kind ORDER BY n DESC", since)
            per_day = rows(f"SELECT date(t.created_at, ?) AS day, {outcome}"
                           " FROM content_generation_tasks t WHERE t.created_at >= ?"
                           " GROUP BY day ORDER BY day", offset, since)
            per_account = rows(f"SELECT t.account_id, a.name AS account_name, {outcome}"
                               f" FROM {TASK_FROM} WHERE t.created_at >= ?"
                               " GROUP BY t.account_id ORDER BY t.account_id", since)
            finished = (totals["completed"] or 0) + (totals["failed"] or 0)
            return {"days": days, **{k: v or 0 for k, v in totals.items()},
                    "success_rate": round((totals["completed"] or 0) / finished, 4)
                    if finished else None,
                    "failure_reasons": {r["kind"]: r["n"] for r in reasons},
                    "per_day": per_day, "per_account": per_account}

        return await self._read(collect)

    async def usage_totals(self, task_id: str) -> dict[str, Any]:
        """What a task's attempts spent: `task status` and `content show` show it."""
        [row] = await self._query(
            "SELECT COUNT(*) AS attempts, COALESCE(SUM(tokens_in), 0) AS tokens_in,"
            " COALESCE(SUM(tokens_out), 0) AS tokens_out, SUM(cost) AS cost,"
            " MAX(currency) AS currency, SUM(cost IS NULL) AS unpriced_attempts"
            " FROM task_usage WHERE task_id = ?", (task_id,))
        row["unpriced_attempts"] = row["unpriced_attempts"] or 0
        return row

    async def cost_report(self, since: str, offset: str, by: str) -> dict[str, Any]:
        """Spend since `since` grouped by local day (`offset` from UTC), account or model."""
        key, columns = {"day": ("date(u.at, :offset)", "date(u.at, :offset) AS day"),
                        "account": ("u.account_id",
                                    "u.account_id AS account_id, a.name AS account_name"),
                        "model": ("u.model", "u.model AS model")}[by]
        sums = ("COUNT(*) AS attempts, COALESCE(SUM(u.tokens_in), 0) AS tokens_in,"
                " COALESCE(SUM(u.tokens_out), 0) AS tokens_out,"
                " ROUND(COALESCE(SUM(u.cost), 0), 6) AS cost,"
                " SUM(u.cost IS NULL) AS unpriced_attempts")
        params = {"since": since, "offset": offset}
        rows = await self._query(
            f"SELECT {columns}, {sums} FROM task_usage u LEFT JOIN accounts a"
            f" ON a.id = u.account_id WHERE u.at >= :since GROUP BY {key} ORDER BY {key}",
            params)
        [totals] = await self._query(f"SELECT {sums} FROM task_usage u WHERE u.at >= :since",
                                    params)
        return {**totals, "rows": rows}

    async def spend_totals(self) -> dict[str, list[dict[str, Any]]]:
        """Tokens per account, model and direction, and cost per account and currency, over
        every attempt ever recorded."""
        tokens = await self._query(
            "SELECT account_id, COALESCE(model, '') AS model, SUM(tokens_in) AS tokens_in,"
            " SUM(tokens_out) AS tokens_out FROM task_usage GROUP BY account_id, model"
            " ORDER BY account_id, model")
        cost = await self._query(
            "SELECT account_id, currency, ROUND(SUM(cost), 6) AS cost FROM task_usage"
            " WHERE cost IS NOT NULL GROUP BY account_id, currency ORDER BY account_id, currency")
        return {"tokens": tokens, "cost": cost}

    async def spend_since(self, day_start: str, month_start: str) -> dict[str, Any]:
        """Spend of the current day and month, in total and per account."""
        rows = await self._query(
            "SELECT account_id, COALESCE(SUM(CASE WHEN at >= ? THEN cost END), 0) AS day,"
            " COALESCE(SUM(cost), 0) AS month FROM task_usage WHERE at >= ?"
            " GROUP BY account_id", (day_start, month_start))
        return {"day": sum(r["day"] for r in rows), "month": sum(r["month"] for r in rows),
                "accounts": {r["account_id"]: (r["day"], r["month"]) for r in rows}}

    async def task_stats(self) -> dict[str, Any]:
        by_status = await self.status_counts()
        by_account = await self._query(
            "SELECT t.account_id, a.name AS account_name, COUNT(*) AS total,"
            " SUM(t.status = 'completed') AS completed,"
            f" SUM(t.status IN ('failed', 'timeout')) AS failed FROM {TASK_FROM}"
            " GROUP BY t.account_id ORDER BY t.account_id")
        return {"by_status": by_status, "by_account": by_account}

    # -- database operations: db backup | check | stats ---------------------------------------

    async def backup_to(self, destination: Path) -> dict[str, Any]:
        """A consistent copy of the live database at `destination`, checked, never replacing a
        file. VACUUM INTO reads one snapshot on a connection of its own, so writers go on."""
        return await asyncio.to_thread(self._backup_to, destination)

    def _backup_to(self, destination: Path) -> dict[str, Any]:
        started = time.monotonic()
        if not destination.is_absolute():
            raise InvalidRequest(f"backup path {destination} must be absolute")
        if destination.exists():
            raise Conflict(f"{destination} exists; a backup never overwrites a file")
        if not destination.parent.is_dir():
            raise InvalidRequest(f"directory {destination.parent} does not exist")
        partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
        try:
            # An empty file of the daemon's own, mode 0600: VACUUM INTO fills it.
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600))
        except OSError as exc:
            raise InvalidRequest(f"cannot write {destination}: {exc.strerror}") from None
        try:
            source = sqlite3.connect(self.path, isolation_level=None)
            try:
                source.execute(f"PRAGMA {DB_PRAGMAS[-1]}")
                source.execute("VACUUM INTO ?", (str(partial),))
            finally:
                source.close()
            copy = sqlite3.connect(partial, isolation_level=None)
            try:
                integrity = [row[0] for row in copy.execute("PRAGMA integrity_check")]
                version = copy.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            finally:
                copy.close()
            if integrity != ["ok"]:
                raise ContentHubError(f"the copy failed integrity_check: {integrity[:5]}")
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            os.link(partial, destination)  # fails, rather than replaces, if it appeared
        except sqlite3.Error as exc:
            raise ContentHubError(f"backup failed: {exc}") from None
        except FileExistsError:
            raise Conflict(f"{destination} exists; a backup never overwrites a file") from None
        finally:
            partial.unlink(missing_ok=True)
        _fsync_directory(destination.parent)
        return {"path": str(destination), "bytes": destination.stat().st_size,
                "duration_s": round(time.monotonic() - started, 3), "integrity": "ok",
                "schema_version": version}

    async def check(self) -> dict[str, Any]:
        """integrity_check and foreign_key_check of the live file, on a read-only connection."""
        return await asyncio.to_thread(self._check)

    def _check(self) -> dict[str, Any]:
        started = time.monotonic()
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        try:
            conn.execute(f"PRAGMA {DB_PRAGMAS[-1]}")
            integrity = [row[0] for row in conn.execute("PRAGMA integrity_check")]
            foreign_keys = [{"table": table, "rowid": rowid, "parent": parent}
                            for table, rowid, parent, _fkid
                            in conn.execute("PRAGMA foreign_key_check")]
        finally:
            conn.close()
        return {"ok": integrity == ["ok"] and not foreign_keys, "integrity": integrity,
                "foreign_keys": foreign_keys, "database": str(self.path),
                "duration_s": round(time.monotonic() - started, 3)}

    async def database_stats(self) -> dict[str, Any]:
        """Sizes and page counts of the file and its WAL, and the rows of every table."""
        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            pragmas = {name: conn.execute(f"PRAGMA {name}").fetchone()[0]
                       for name in ("page_size", "page_count", "freelist_count",
                                    "journal_mode")}
            tables = [row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name")]
            quoted = {name: '"' + name.replace('"', '""') + '"' for name in tables}
            rows = {name: conn.execute(f"SELECT COUNT(*) FROM {quoted[name]}").fetchone()[0]
                    for name in tables}
            return {**pragmas, "rows": rows}

        stats = await self._read(work)
        wal = Path(f"{self.path}-wal")
        return {"database": str(self.path), "file_bytes": self.path.stat().st_size,
                "wal_bytes": wal.stat().st_size if wal.exists() else 0,
                "schema_version": self.schema_version, **stats}

    async def cleanup_tasks(self, cutoff: datetime, statuses: list[str],
                            dry_run: bool) -> int:
        """Delete terminal tasks last updated before `cutoff` with their events. Contents
        (the articles) are kept: they are the product, not bookkeeping."""
        where = (f"status IN ({', '.join('?' * len(statuses))}) AND updated_at < ?")
        params = (*statuses, to_db_time(cutoff))

        def cleanup(conn: sqlite3.Connection) -> int:
            if dry_run:
                return conn.execute(f"SELECT COUNT(*) FROM content_generation_tasks WHERE"
                                    f" {where}", params).fetchone()[0]
            return conn.execute(f"DELETE FROM content_generation_tasks WHERE {where}",
                                params).rowcount

        return await (self._read(cleanup) if dry_run else self._write(cleanup))

    # -- schedules -----------------------------------------------------------------------------

    async def schedule_states(self, names: list[str] | None = None
                              ) -> dict[str, dict[str, Any]]:
        """The saved state of the schedules called `names`, or of every schedule."""
        if names is None:
            rows = await self._query("SELECT * FROM schedule_state")
        else:
            rows = await self._query("SELECT * FROM schedule_state WHERE name IN"
                                     " (SELECT value FROM json_each(?))", (json_text(names),))
        return {row["name"]: row for row in rows}

    async def save_schedule_state(self, name: str, **values: Any) -> None:
        columns = ", ".join(values)
        updates = ", ".join(f"{column} = excluded.{column}" for column in values)

        def save(conn: sqlite3.Connection) -> None:
            conn.execute(f"INSERT INTO schedule_state (name, {columns}) VALUES"
                         f" (?, {', '.join('?' * len(values))}) ON CONFLICT (name) DO UPDATE"
                         f" SET {updates}", (name, *values.values()))

        await self._write(save)

    async def rewind_schedule_states(self, now: datetime) -> None:
        """After a backward clock jump: no schedule's last instant lies in the future."""

        def rewind(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE schedule_state SET last_scheduled_for = ?"
                         " WHERE last_scheduled_for > ?", (to_db_time(now), to_db_time(now)))

        await self._write(rewind)

    async def shift_wall_deadlines(self, seconds: float, now: datetime) -> int:
        """After a backward clock jump of `seconds` (< 0): retries (`next_attempt_at`) and
        timeouts (`timeout_at`) still ahead were set on the old clock; move them by the jump,
        never before `now`. Returns how many tasks moved."""
        stamp = to_db_time(now)

        def shift(conn: sqlite3.Connection) -> int:
            moved = 0
            for column, statuses in (("next_attempt_at", ("pending",)),
                                     ("timeout_at", ("running", "submitted"))):
                rows = conn.execute(
                    f"SELECT task_id, {column} FROM content_generation_tasks WHERE status IN"
                    f" ({', '.join('?' * len(statuses))}) AND {column} > ?",
                    (*statuses, stamp)).fetchall()
                conn.executemany(
                    f"UPDATE content_generation_tasks SET {column} = ? WHERE task_id = ?",
                    [(to_db_time(max(now, from_db_time(value) + timedelta(seconds=seconds))),
                      task_id) for task_id, value in rows])
                moved += len(rows)
            return moved

        return await self._write(shift)

    async def restart_schedule_states(self, rows: list[tuple[str, int, str, str | None]]
                                      ) -> None:
        """New or edited schedules (name, paused, config_hash, last_scheduled_for) start
        from now; one transaction for all of them."""

        def restart(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO schedule_state (name, paused, config_hash, last_scheduled_for)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET paused = excluded.paused,"
                " config_hash = excluded.config_hash,"
                " last_scheduled_for = excluded.last_scheduled_for", rows)

        if rows:
            await self._write(restart)

    async def begin_run(self, name: str, scheduled_for: datetime, now: datetime,
                        trigger: str, check_overlap: bool = False) -> tuple[int, str, bool]:
        """Claim one schedule instant. UNIQUE(schedule_name, scheduled_for) makes a second
        claim return the existing run: ('firing' means a crash interrupted it). With
        `check_overlap`, also says (in the same transaction, so one round trip) whether the
        schedule's previous run still has unfinished tasks."""

        def begin(conn: sqlite3.Connection) -> tuple[int, str, bool]:
            instant = to_db_time(scheduled_for)
            existing = conn.execute("SELECT id, status FROM schedule_runs WHERE"
                                    " schedule_name = ? AND scheduled_for = ?",
                                    (name, instant)).fetchone()
            if existing:
                run_id, state = existing
                return run_id, state, (check_overlap and state == "firing"
                                       and self._previous_run_unfinished(conn, name, run_id))
            run_id = conn.execute(
                "INSERT INTO schedule_runs (schedule_name, scheduled_for, fired_at, trigger,"
                " status) VALUES (?, ?, ?, ?, 'firing')",
                (name, instant, to_db_time(now), trigger)).lastrowid
            assert run_id is not None  # an INSERT always sets it
            if trigger != "manual":
                conn.execute("UPDATE schedule_state SET last_scheduled_for = ? WHERE name = ?"
                             " AND (last_scheduled_for IS NULL OR last_scheduled_for < ?)",
                             (instant, name, instant))
            return run_id, "new", check_overlap and self._previous_run_unfinished(conn, name,
                                                                                 run_id)

        return await self._write(begin)

    async def finish_run(self, run_id: int, status: str, result: dict[str, Any],
                         now: datetime) -> None:
        """Record a run's outcome; with it, schedule.failed for a firing that failed or
        queued nothing, or content.ready if its tasks all ended before the run was recorded."""

        def finish(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE schedule_runs SET status = ?, result = ? WHERE id = ?",
                         (status, json.dumps(result, ensure_ascii=False, default=str), run_id))
            data = result.get("data") or {}
            if status == "failed" or (status == "fired" and data.get("total_submitted") == 0):
                run = self._run_summary(conn, run_id)
                self.enqueue_event(conn, "schedule.failed", {
                    **run, "status": status, "message": result.get("message"),
                    "error": result.get("error")}, now, key=f"schedule.failed:run:{run_id}")
            elif status == "fired":
                self._run_content_ready(conn, run_id, now)

        await self._write(finish)

    async def record_missed_runs(self, name: str, instants: list[datetime], now: datetime,
                                 trigger: str, total: int, first: datetime,
                                 rows_max: int) -> None:
        """Record `total` missed instants, from `first` to the last of `instants` (the
        newest ones, in order): a 'missed' run per instant while there are at most
        `rows_max`, else one summary run at the last instant whose result holds the count,
        the first and the last. Either way nothing missed goes unrecorded."""
        last = instants[-1]

        def record(conn: sqlite3.Connection) -> None:
            sql = ("INSERT INTO schedule_runs (schedule_name, scheduled_for, fired_at, trigger,"
                   " status, result) VALUES (?, ?, ?, ?, 'missed', ?) ON CONFLICT DO NOTHING")
            if total <= rows_max:
                conn.executemany(sql, [(name, to_db_time(i), to_db_time(now), trigger, None)
                                       for i in instants])
            else:
                conn.execute(sql, (name, to_db_time(last), to_db_time(now), trigger, json_text({
                    "success": False, "error": "missed",
                    "message": f"{total} instants missed, {to_db_time(first)} to"
                               f" {to_db_time(last)}",
                    "data": {"missed": total, "first_missed": to_db_time(first),
                             "last_missed": to_db_time(last)}})))
            conn.execute("UPDATE schedule_state SET last_scheduled_for = ? WHERE name = ?"
                         " AND (last_scheduled_for IS NULL OR last_scheduled_for < ?)",
                         (to_db_time(last), name, to_db_time(last)))
            # One event per misfire decision, however many instants it skipped.
            self.enqueue_event(conn, "schedule.missed", {
                "schedule": name, "missed": total, "first_missed": to_db_time(first),
                "last_missed": to_db_time(last)}, now)

        await self._write(record)

    async def interrupted_runs(self) -> list[dict[str, Any]]:
        return await self._query("SELECT * FROM schedule_runs WHERE status = 'firing'"
                                " ORDER BY id")

    @staticmethod
    def _previous_run_unfinished(conn: sqlite3.Connection, name: str, before_run_id: int
                                 ) -> bool:
        return bool(conn.execute(
            "SELECT EXISTS (SELECT 1 FROM content_generation_tasks WHERE schedule_run_id ="
            " (SELECT MAX(id) FROM schedule_runs WHERE schedule_name = ? AND id < ?"
            " AND status = 'fired') AND status IN ('pending', 'submitted', 'running'))",
            (name, before_run_id)).fetchone()[0])

    async def count_runs(self, name: str | None) -> int:
        if name is None:
            rows = await self._query("SELECT COUNT(*) AS n FROM schedule_runs")
        else:
            rows = await self._query("SELECT COUNT(*) AS n FROM schedule_runs"
                                    " WHERE schedule_name = ?", (name,))
        return rows[0]["n"]

    async def list_runs(self, name: str | None, limit: int) -> list[dict[str, Any]]:
        if name is None:
            return await self._query("SELECT * FROM schedule_runs ORDER BY id DESC LIMIT ?",
                                    (limit,))
        return await self._query("SELECT * FROM schedule_runs WHERE schedule_name = ?"
                                " ORDER BY id DESC LIMIT ?", (name, limit))

    async def counter_values(self) -> dict[str, int]:
        """Every row of `counters` (schema.sql says what each name counts)."""
        rows = await self._query("SELECT name, value FROM counters")
        return {row["name"]: row["value"] for row in rows}

    async def last_runs(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """The newest run of each schedule (of `names`, or all), by schedule name."""
        columns = "schedule_name, scheduled_for, fired_at, status"
        if names is None:
            rows = await self._query(
                f"SELECT {columns} FROM schedule_runs"
                " WHERE id IN (SELECT MAX(id) FROM schedule_runs GROUP BY schedule_name)")
        else:
            rows = [row for name in names for row in await self._query(
                f"SELECT {columns} FROM schedule_runs WHERE schedule_name = ?"
                " ORDER BY id DESC LIMIT 1", (name,))]
        return {row["schedule_name"]: row for row in rows}

    async def tasks_for_run(self, run_id: int) -> list[dict[str, Any]]:
        return await self._query(f"SELECT {TASK_COLUMNS} FROM {TASK_FROM}"
                                " WHERE t.schedule_run_id = ? ORDER BY t.id", (run_id,))

    # -- publishing ----------------------------------------------------------------------------

    async def due_for_publish(self, now: datetime, max_attempts: int,
                              limit: int) -> list[dict[str, Any]]:
        """Approved contents whose time has come and whose images are all settled (saved or
        given up): a publisher gets the files, not URLs that are still downloading."""
        def fetch(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            cursor = conn.execute(
                f"SELECT {CONTENT_LIST_COLUMNS}, c.body FROM {CONTENT_FROM}"
                " WHERE c.review_status = 'approved'"
                " AND c.publish_status IN ('draft', 'scheduled')"
                " AND (c.scheduled_publish_at IS NULL OR c.scheduled_publish_at <= ?)"
                " AND c.publish_attempts < ? AND NOT EXISTS (SELECT 1 FROM content_media m"
                " WHERE m.content_id = c.id AND m.status = 'pending') ORDER BY c.id LIMIT ?",
                (to_db_time(now), max_attempts, limit))
            contents = [_row_dict(cursor, row) for row in cursor.fetchall()]
            media = self._media_of(conn, [content["id"] for content in contents])
            for content in contents:
                content["media"] = media.get(content["id"], [])
            return contents

        return await self._read(fetch)

    async def record_publish(self, content_id: int, ok: bool, error: str | None,
                             max_attempts: int, now: datetime, *, url: str | None = None,
                             actor: tuple[int | None, str] = (None, "contenthubd")) -> str:
        """One publish attempt's outcome, with its content_events row; returns the new
        publish_status (a failure stays retryable until `max_attempts`)."""

        def record(conn: sqlite3.Connection) -> str:
            before = conn.execute("SELECT publish_status FROM contents WHERE id = ?",
                                  (content_id,)).fetchone()
            if before is None:
                raise NotFound(f"no content {content_id}")
            if ok:
                conn.execute("UPDATE contents SET publish_status = 'published', published_at = ?,"
                             " published_url = ?, publish_error = NULL,"
                             " publish_attempts = publish_attempts + 1 WHERE id = ?",
                             (to_db_time(now), url, content_id))
            else:
                conn.execute("UPDATE contents SET publish_attempts = publish_attempts + 1,"
                             " publish_error = ?, publish_status = CASE WHEN publish_attempts"
                             " + 1 >= ? THEN 'failed' ELSE publish_status END WHERE id = ?",
                             (error, max_attempts, content_id))
            status = conn.execute("SELECT publish_status FROM contents WHERE id = ?",
                                  (content_id,)).fetchone()[0]
            conn.execute("INSERT INTO content_events (content_id, at, action, actor_uid, actor,"
                         " from_status, to_status, reason) VALUES (?, ?, 'publish', ?, ?, ?,"
                         " ?, ?)", (content_id, to_db_time(now), *actor, before[0], status,
                                    url if ok else (error or "")[:500]))
            return status

        return await self._write(record)

    # -- notifications -------------------------------------------------------------------------

    def enqueue_event(self, conn: sqlite3.Connection, event: str, data: dict[str, Any],
                      now: datetime, *, key: str | None = None,
                      target: str | None = None) -> str | None:
        """Record a notification inside the caller's own write transaction, so the event
        commits (or rolls back) together with the change it reports; a kill -9 can never
        keep one and lose the other. The Notifier delivers it later, at least once.

        Call it from a Store write function, with that function's connection:

            def trip(conn):
                conn.execute("UPDATE ...")
                self.enqueue_event(conn, "creator.tripped", {"error_kind": kind,
                                   "message": "连续 5 次认证失败"}, now)

        `event` is one of NOTIFY_EVENTS. `data` is a JSON object; chat formats show its
        "message" (a short Chinese sentence) when it has one. Keys the target filters read:
        "account_id" or "account_ids" (a target's `accounts`) and "schedule" (its
        `schedules`). `key` coalesces: while an event with the same key exists, no second
        one is written (e.g. "budget.exhausted:2026-12-01"). `target` sends it to that
        [[notify]] target only. Returns the event id, or None when no target wants this
        event or the key already exists. Writes nothing when no target listens.
        """
        if target is None and event not in self.notify_subscribed:
            return None
        event_id = new_event_id(now)
        cursor = conn.execute(
            "INSERT INTO notify_events (event_id, event, at, data, coalesce_key, target)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (event_id, event, to_db_time(now), json.dumps(data, ensure_ascii=False,
                                                          default=str), key, target))
        self._events_written = True
        return event_id if cursor.rowcount else None

    def _task_finished_events(self, conn: sqlite3.Connection, task_id: str, status: str,
                              now: datetime) -> None:
        """task.failed, and content.ready once a task's run (or the manual task) is done."""
        wanted = self.notify_subscribed
        if not ({"task.failed", "content.ready", HOOK_EVENT} & wanted):
            return
        cursor = conn.execute(
            "SELECT t.task_id, t.account_id, a.name AS account_name, t.topic, t.status,"
            " t.error_kind, t.error_message, t.retry_count, t.content_id, t.schedule_run_id,"
            " r.schedule_name AS schedule FROM content_generation_tasks t"
            " LEFT JOIN accounts a ON a.id = t.account_id"
            " LEFT JOIN schedule_runs r ON r.id = t.schedule_run_id WHERE t.task_id = ?",
            (task_id,))
        task = _row_dict(cursor, cursor.fetchone())
        if status in ("failed", "timeout"):
            self.enqueue_event(conn, "task.failed", {
                key: task[key] for key in ("task_id", "account_id", "account_name", "topic",
                                           "status", "error_kind", "error_message",
                                           "retry_count", "schedule")}
                | {"run_id": task["schedule_run_id"]}, now)
        if HOOK_EVENT in wanted:
            content = None
            if task["content_id"] is not None:
                cursor = conn.execute(f"SELECT {CONTENT_LIST_COLUMNS}, c.body FROM"
                                      f" {CONTENT_FROM} WHERE c.id = ?", (task["content_id"],))
                content = _row_dict(cursor, cursor.fetchone())
            self.enqueue_event(conn, HOOK_EVENT, {
                "event": status, "task": self._get_task(conn, task_id), "content": content,
                "account_id": task["account_id"], "schedule": task["schedule"]}, now)
        if "content.ready" not in wanted:
            return
        if task["schedule_run_id"] is not None:
            self._run_content_ready(conn, task["schedule_run_id"], now)
        elif status == "completed":
            articles = self._articles(conn, "c.task_id = ?", task_id)
            self.enqueue_event(conn, "content.ready", {
                "schedule": None, "run_id": None, "task_id": task_id,
                "account_ids": [task["account_id"]], "articles": articles,
                "counts": {"tasks": 1, "completed": 1, "failed": 0}},
                now, key=f"content.ready:task:{task_id}")

    @staticmethod
    def _articles(conn: sqlite3.Connection, where: str, *params: Any) -> list[dict[str, Any]]:
        cursor = conn.execute(
            "SELECT c.id, c.title, c.account_id, a.name AS account_name, c.word_count,"
            " c.task_id, c.review_status FROM contents c"
            " JOIN content_generation_tasks t ON t.task_id = c.task_id"
            f" LEFT JOIN accounts a ON a.id = c.account_id WHERE {where} ORDER BY c.id",
            params)
        return [_row_dict(cursor, row) for row in cursor.fetchall()]

    @staticmethod
    def _run_summary(conn: sqlite3.Connection, run_id: int) -> dict[str, Any]:
        row = conn.execute("SELECT schedule_name, scheduled_for, trigger FROM schedule_runs"
                           " WHERE id = ?", (run_id,)).fetchone()
        return {"schedule": row[0], "run_id": run_id, "scheduled_for": row[1],
                "trigger": row[2]}

    def _run_content_ready(self, conn: sqlite3.Connection, run_id: int, now: datetime) -> None:
        """content.ready for a recorded run whose tasks are all terminal, if it made at
        least one article: one event per run, however its tasks ended."""
        if "content.ready" not in self.notify_subscribed:
            return
        counts = dict(conn.execute(
            "SELECT status, COUNT(*) FROM content_generation_tasks WHERE schedule_run_id = ?"
            " GROUP BY status", (run_id,)).fetchall())
        if any(status in ACTIVE_STATUSES for status in counts):
            return
        run = self._run_summary(conn, run_id)
        state = conn.execute("SELECT status FROM schedule_runs WHERE id = ?",
                             (run_id,)).fetchone()[0]
        if state != "fired":  # still firing: finish_run checks again
            return
        articles = self._articles(conn, "t.schedule_run_id = ?", run_id)
        if not articles:
            return
        self.enqueue_event(conn, "content.ready", {
            **run, "account_ids": sorted({a["account_id"] for a in articles}),
            "articles": articles,
            "counts": {"tasks": sum(counts.values()), "completed": counts.get("completed", 0),
                       "failed": counts.get("failed", 0) + counts.get("timeout", 0),
                       "cancelled": counts.get("cancelled", 0)}},
            now, key=f"content.ready:run:{run_id}")

    async def route_events(self, route: Callable[[str, str | None, dict[str, Any]], list[str]],
                           now: datetime, limit: int = 500) -> int:
        """Turn new events into one outbox row per target `route` picks; returns how many
        events it routed (`limit` at most: call again while it returns `limit`)."""
        stamp = to_db_time(now)

        def fan_out(conn: sqlite3.Connection) -> int:
            events = conn.execute("SELECT id, event_id, event, target, data FROM notify_events"
                                  " WHERE routed = 0 ORDER BY id LIMIT ?", (limit,)).fetchall()
            rows = [(event_id, target, stamp, stamp, stamp)
                    for _id, event_id, event, only, data in events
                    for target in route(event, only, json.loads(data))]
            conn.executemany("INSERT INTO notify_outbox (event_id, target, next_attempt_at,"
                             " created_at, updated_at) VALUES (?, ?, ?, ?, ?)"
                             " ON CONFLICT DO NOTHING", rows)
            conn.executemany("UPDATE notify_events SET routed = 1 WHERE id = ?",
                             [(row[0],) for row in events])
            return len(events)

        return await self._write(fan_out)

    async def due_deliveries(self, now: datetime, per_target: int,
                             exclude: list[int]) -> list[dict[str, Any]]:
        """Due pending deliveries, oldest first, at most `per_target` of each target (so a
        backlog for a dead receiver never hides the others'), leaving out `exclude`."""
        return await self._query(
            "SELECT o.id, o.event_id, o.target, o.attempts, e.event, e.at, e.data FROM"
            " (SELECT id, ROW_NUMBER() OVER (PARTITION BY target ORDER BY next_attempt_at, id)"
            " AS n FROM notify_outbox WHERE status = 'pending' AND next_attempt_at <= ?"
            " AND id NOT IN (SELECT value FROM json_each(?))) due"
            " JOIN notify_outbox o ON o.id = due.id"
            " JOIN notify_events e ON e.event_id = o.event_id"
            " WHERE due.n <= ? ORDER BY o.next_attempt_at, o.id",
            (to_db_time(now), json_text(exclude), per_target))

    async def next_delivery_at(self, exclude: list[int]) -> datetime | None:
        """When the next pending delivery falls due, leaving out those being sent."""
        rows = await self._query("SELECT MIN(next_attempt_at) AS due FROM notify_outbox"
                                " WHERE status = 'pending' AND id NOT IN"
                                " (SELECT value FROM json_each(?))", (json_text(exclude),))
        return from_db_time(rows[0]["due"]) if rows else None

    async def prune_notifications(self, cutoff: datetime) -> int:
        """Delete events older than `cutoff` with their deliveries, unless one is pending."""

        def prune(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM notify_events WHERE at < ? AND routed = 1 AND NOT EXISTS"
                " (SELECT 1 FROM notify_outbox o WHERE o.event_id = notify_events.event_id"
                " AND o.status = 'pending')", (to_db_time(cutoff),)).rowcount

        return await self._write(prune)

    async def add_digest(self, target: str, instant: datetime, tz: ZoneInfo,
                         now: datetime) -> str | None:
        """The `digest` event of one target: the day up to `instant` in numbers."""
        since, until = to_db_time(instant - timedelta(days=1)), to_db_time(instant)

        def add(conn: sqlite3.Connection) -> str | None:
            finished = dict(conn.execute(
                "SELECT status, COUNT(*) FROM content_generation_tasks WHERE status IN"
                " ('completed', 'failed', 'timeout') AND completed_at >= ? AND completed_at < ?"
                " GROUP BY status", (since, until)).fetchall())
            counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
            articles = conn.execute("SELECT COUNT(*) FROM contents WHERE created_at >= ?"
                                    " AND created_at < ?", (since, until)).fetchone()[0]
            dead = conn.execute("SELECT COUNT(*) FROM notify_outbox WHERE status = 'dead'"
                                " AND updated_at >= ? AND updated_at < ?",
                                (since, until)).fetchone()[0]
            return self.enqueue_event(conn, "digest", {
                "date": f"{instant.astimezone(tz):%Y-%m-%d}", "since": since, "until": until,
                "articles": articles, "completed": finished.get("completed", 0),
                "failed": finished.get("failed", 0) + finished.get("timeout", 0),
                "pending": counters.get("task:pending", 0),
                "pending_review": counters.get("content:pending_review", 0),
                "notify_dead": dead}, now, key=f"digest:{target}:{until}", target=target)

        return await self._write(add)

    async def record_delivery(self, delivery_id: int, now: datetime, response: str,
                              error: str | None, retry_at: datetime | None) -> str:
        """One attempt's outcome: sent (no error), pending until `retry_at`, or dead (an
        error and no `retry_at`). Returns the new status."""
        status = "sent" if error is None else "pending" if retry_at is not None else "dead"
        stamp = to_db_time(now)

        def record(conn: sqlite3.Connection) -> str:
            conn.execute(
                "UPDATE notify_outbox SET status = ?, attempts = attempts + 1,"
                " next_attempt_at = COALESCE(?, next_attempt_at), last_response = ?,"
                " last_error = ?, updated_at = ?, sent_at = ? WHERE id = ?",
                (status, to_db_time(retry_at), response, error, stamp,
                 stamp if error is None else None, delivery_id))
            return status

        return await self._write(record)

    async def list_deliveries(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        where = "WHERE o.status = ?" if status else ""
        return await self._query(
            "SELECT o.id, o.target, e.event, o.status, o.attempts, o.next_attempt_at,"
            " o.last_response, o.last_error, o.event_id, e.at, o.sent_at"
            " FROM notify_outbox o JOIN notify_events e ON e.event_id = o.event_id"
            f" {where} ORDER BY o.id DESC LIMIT ?", (*([status] if status else []), limit))

    async def count_deliveries(self, status: str | None) -> int:
        rows = await self._query("SELECT COUNT(*) AS n FROM notify_outbox"
                                 + (" WHERE status = ?" if status else ""),
                                 (status,) if status else ())
        return rows[0]["n"]

    async def retry_delivery(self, delivery_id: int, now: datetime) -> dict[str, Any]:
        """A dead (or sent) delivery back to pending with fresh attempts, due now."""

        def retry(conn: sqlite3.Connection) -> dict[str, Any]:
            row = conn.execute("SELECT status FROM notify_outbox WHERE id = ?",
                               (delivery_id,)).fetchone()
            if row is None:
                raise NotFound(f"no delivery {delivery_id}; see contenthubctl notify list")
            stamp = to_db_time(now)
            conn.execute("UPDATE notify_outbox SET status = 'pending', attempts = 0,"
                         " next_attempt_at = ?, updated_at = ? WHERE id = ?",
                         (stamp, stamp, delivery_id))
            return {"id": delivery_id, "was": row[0], "status": "pending"}

        return await self._write(retry)

# Creator runner ################################################################################

#: Variables that belong to the daemon's own supervisor, never to its children.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
               "LISTEN_FDNAMES")


# -- argv, environment and process groups ----------------------------------------------------------


def render_argv(template: list[str], values: dict[str, Any]) -> list[str]:
    """Fill `{placeholders}` into an argv template, never through a shell.

    An element whose placeholders are all empty is dropped, and so is the `--flag` just
    before it: `["--tone", "{tone}"]` with no tone gives nothing rather than `--tone ""`.
    """
    argv: list[str] = []
    flag_pending = False
    for part in template:
        names = PLACEHOLDER_RE.findall(part)
        if names and all(str(values.get(name) or "") == "" for name in names):
            if flag_pending and not part.startswith("-"):
                argv.pop()
            flag_pending = False
            continue
        argv.append(PLACEHOLDER_RE.sub(lambda m: str(values.get(m.group(1)) or ""), part))
        flag_pending = part.startswith("-") and not names
    return argv


def expand_env(template: dict[str, str], environ: dict[str, str]) -> dict[str, str]:
    """`${VAR}` from the daemon's environment, at spawn time; a missing VAR becomes ""."""
    return {key: ENV_REF_RE.sub(lambda m: environ.get(m.group(1), ""), value)
            for key, value in template.items()}


def child_environment(environ: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k not in PRIVATE_ENV}
    env.update(extra)
    return env


def creator_environment(creator: CreatorConfig, environ: dict[str, str]) -> dict[str, str]:
    """What every creator process gets (tasks, health command, topic research): the daemon's
    environment without systemd's private variables, plus [creator.env] with ${VAR} expanded.
    DOTENV_CONFIG_QUIET keeps a Node creator's dotenv from printing a banner into its output."""
    return child_environment(environ, {"DOTENV_CONFIG_QUIET": "true",
                                       **expand_env(creator.env, environ)})


def mask_values(text: str, values: Iterable[str]) -> str:
    """`text` with each of `values` (a key, a token) replaced by ***; "" masks nothing."""
    for value in values:
        if value and value in text:
            text = text.replace(value, "***")
    return text


#: Under state_dir: this file as bytecode, which the built-in creator's processes run.
BUILTIN_BYTECODE = Path("bytecode", f"contenthubd.{sys.implementation.cache_tag}.pyc")


def write_builtin_bytecode(state_dir: Path) -> Path:
    """Compile this file into state_dir, unless the bytecode there is of this very source.
    Every task spawns a built-in creator; started from the source, each would compile this
    whole file again (0.1 s), since Python never caches a script's bytecode and
    PYTHONDONTWRITEBYTECODE may forbid writing any. `python FILE.pyc` runs the compiled
    module directly, with no lookup. A child process compiles: compiling this file leaves
    30 MB of freed heap that the daemon's RSS would keep for good."""
    source = str(Path(__file__).resolve())
    target = state_dir / BUILTIN_BYTECODE
    # The header py_compile writes: what Python's import checks a .pyc by (the source's
    # modification time and size), so a start after an upgrade compiles again.
    stat = os.stat(source)
    header = importlib.util.MAGIC_NUMBER + struct.pack(
        "<III", 0, int(stat.st_mtime) & 0xFFFFFFFF, stat.st_size & 0xFFFFFFFF)
    with contextlib.suppress(OSError), open(target, "rb") as compiled:
        if compiled.read(len(header)) == header:
            return target
    compiler = subprocess.run(
        [sys.executable, "-I", "-c", "import py_compile, sys; py_compile.compile(sys.argv[1],"
         " cfile=sys.argv[2], dfile=sys.argv[1], doraise=True)", source, str(target)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if compiler.returncode != 0:
        raise OSError(compiler.stderr.strip().splitlines()[-1] if compiler.stderr.strip()
                      else f"the compiler exited {compiler.returncode}")
    return target


def builtin_argv(subcommand: str, config: Config, environ: dict[str, str]) -> list[str]:
    """`contenthubd create` or `research-topics` with the [creator.llm] settings, as the
    daemon runs it: on the bytecode that write_builtin_bytecode wrote at start."""
    llm = config.creator.llm
    return [sys.executable, str(config.state_dir(environ) / BUILTIN_BYTECODE), subcommand,
            "--llm-base-url", llm.base_url, "--llm-model", llm.model,
            "--api-key-env", llm.api_key_env, "--timeout", str(llm.timeout)]


def scrub_secrets(text: str, environ: dict[str, str]) -> str:
    """Replace the values of secret-looking variables (…KEY, …TOKEN, …) with ***, so a creator
    that prints its credentials in an error does not get them stored or logged."""
    return mask_values(text, (value for name, value in environ.items()
                              if len(value) >= 8 and is_secret_name(name)))


def kill_process_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("kill_denied", pgid=pgid)
        return False


def find_task_processes(task_ids: set[str] | None = None) -> dict[str, list[tuple[int, int]]]:
    """(pid, pgid) of every process carrying CONTENTHUB_TASK_ID=<id>, by id; all ids when
    `task_ids` is None. Found by that marker, never by a pid from the database alone, so a
    reused pid is never hit. Processes that escaped the creator's group (setsid) carry it
    too: the environment is inherited."""
    prefix = b"CONTENTHUB_TASK_ID="
    found: dict[str, list[tuple[int, int]]] = {}
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            for entry in (proc_dir / "environ").read_bytes().split(b"\0"):
                if entry.startswith(prefix):
                    task_id = entry[len(prefix):].decode()
                    if task_ids is None or task_id in task_ids:
                        stat = (proc_dir / "stat").read_text()
                        pgid = int(stat.rsplit(")", 1)[1].split()[2])
                        found.setdefault(task_id, []).append((int(proc_dir.name), pgid))
                    break
        except (OSError, ValueError, IndexError, UnicodeDecodeError):
            continue
    return found


def kill_task_processes(found: dict[str, list[tuple[int, int]]]) -> dict[str, list[int]]:
    """SIGKILL each process `find_task_processes` found; the pids killed, by task id."""
    killed: dict[str, list[int]] = {}
    for task_id, processes in found.items():
        for pid, _pgid in processes:
            if pid == os.getpid():
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.setdefault(task_id, []).append(pid)
    return killed


ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    return ANSI_RE.sub("", text)


# -- running one process: pipes, caps, timeouts ----------------------------------------------------


@dataclass
class ProcessResult:
    """What one creator process did. `exit_code` < 0 means killed by that signal."""

    exit_code: int | None
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False
    stopped: bool = False  #: the caller's stop event fired (cancel, shutdown)
    output_too_large: bool = False

    def stderr_tail(self, limit: int = STDERR_TAIL_CHARS) -> str:
        """The end of stderr without colours; "(stderr empty)" when it printed nothing."""
        return strip_ansi(self.stderr)[-limit:].strip() or "(stderr empty)"

    def failure(self, timeout: float, limit: int = STDERR_TAIL_CHARS,
                detail: str | None = None) -> str | None:
        """Why a command failed, the way every message about one says it, or None when it
        exited 0: "timed out after 30s", or "exit 2: " then `detail` or stderr's tail."""
        if self.timed_out:
            return f"timed out after {timeout:g}s"
        if self.exit_code == 0:
            return None
        return f"exit {self.exit_code}: {detail or self.stderr_tail(limit)}"


class _PipeCapture:
    """Reads one pipe without blocking the loop, keeps at most `limit` bytes in total
    (shared with the sibling pipe through `budget`), and hands `on_line` each complete line
    that could be a progress report: short, and mentioning "progress".

    It reads as the child writes only once `watch()` is called; until then the pipe buffers
    the output (a child that fills it just waits) and `drain_now()` collects it after exit.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, budget: list[int],
                 on_line: Callable[[str], None] | None):
        self.fd, self.loop, self.budget, self.on_line = fd, loop, budget, on_line
        self.chunks: list[bytes] = []
        self.partial = b""
        self.skipping = False  #: inside a line too long to be a progress report
        self.watching = False
        self.done: asyncio.Future[bool] = loop.create_future()  #: True when over the cap
        os.set_blocking(fd, False)

    def watch(self) -> None:
        if self.fd >= 0 and not self.watching:
            self.loop.add_reader(self.fd, self._read_once)
            self.watching = True

    def drain_now(self) -> None:
        """Read whatever the pipe holds right now, without waiting."""
        while self._read_once():
            pass

    def _read_once(self) -> bool:
        """Read one chunk; False when nothing more can be read now (empty, EOF, over cap)."""
        if self.fd < 0:
            return False
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._finish(False)
            return False
        self.budget[0] -= len(data)
        if self.budget[0] < 0:
            self._finish(True)
            return False
        self.chunks.append(data)
        if self.on_line is not None:
            self._scan_lines(data)
        return True

    def _scan_lines(self, data: bytes) -> None:
        # Linear in the output however long its lines are: a line longer than
        # PROGRESS_LINE_MAX is skipped, never accumulated.
        start = 0
        while (newline := data.find(b"\n", start)) >= 0:
            line = self.partial + data[start:newline]
            if self.on_line is not None and not self.skipping and b'"progress"' in line:
                self.on_line(line.decode("utf-8", "replace"))
            self.partial, self.skipping, start = b"", False, newline + 1
        if not self.skipping:
            self.partial += data[start:]
            if len(self.partial) > PROGRESS_LINE_MAX:
                self.partial, self.skipping = b"", True

    def _finish(self, over_limit: bool) -> None:
        self.close()
        if not self.done.done():
            self.done.set_result(over_limit)

    def close(self) -> None:
        if self.fd >= 0:
            if self.watching:
                self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


def _over_cap(*pipes: _PipeCapture) -> bool:
    return any(pipe.done.done() and pipe.done.result() for pipe in pipes)


class _ExitWatch:
    """A child's pidfd becoming readable (the child exited) as a future, `exited`. The
    reader callback also resolves `waiter`, the future a wait for the exit is on, itself:
    the waiting task then runs in the next loop iteration, where a done-callback of
    `exited` would take one more. The reader is removed at once: a readable pidfd would
    wake the loop on every iteration until the caller is done."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pidfd: int):
        self.loop, self.pidfd = loop, pidfd
        self.exited: asyncio.Future = loop.create_future()
        self.waiter: asyncio.Future | None = None
        loop.add_reader(pidfd, self._readable)

    def _readable(self) -> None:
        self.loop.remove_reader(self.pidfd)
        _settle(self.exited, True, None)
        if self.waiter is not None:
            _settle(self.waiter, True, None)


async def _first_done(loop: asyncio.AbstractEventLoop, futures: set[asyncio.Future],
                      timeout: float, woken: asyncio.Future) -> None:
    """Wait until `woken` or one of `futures` is done, or `timeout` seconds pass:
    asyncio.wait's FIRST_COMPLETED for plain futures, without its copies, checks and
    result sets."""

    def wake(_: Any = None) -> None:
        if not woken.done():
            woken.set_result(None)

    timer = loop.call_later(timeout, wake)
    for future in futures:
        future.add_done_callback(wake)
    try:
        await woken
    finally:
        timer.cancel()
        for future in futures:
            future.remove_done_callback(wake)


def _feed_stdin(loop: asyncio.AbstractEventLoop, fd: int, payload: bytes) -> asyncio.Task | None:
    """Write the task to the child's stdin. A payload that fits the pipe is written at once;
    a larger one is finished by a task. A child that never reads stdin is not an error."""
    os.set_blocking(fd, False)
    try:
        written = os.write(fd, payload) if payload else 0
    except BlockingIOError:
        written = 0
    except OSError:
        os.close(fd)
        return None
    if written == len(payload):
        os.close(fd)
        return None
    return loop.create_task(_feed_rest(loop, fd, memoryview(payload)[written:]))


async def _feed_rest(loop: asyncio.AbstractEventLoop, fd: int, rest: memoryview) -> None:
    try:
        while rest:
            ready = loop.create_future()
            loop.add_writer(fd, _settle, ready, True, None)
            try:
                await ready
            finally:
                loop.remove_writer(fd)
            try:
                rest = rest[os.write(fd, rest):]
            except BlockingIOError:
                continue
    except OSError:
        pass
    finally:
        os.close(fd)


async def run_process(argv: list[str], *, stdin: bytes = b"", cwd: Path | None = None,
                      env: dict[str, str] | dict[bytes, bytes] | None = None, timeout: float,
                      max_output: int = 8 << 20, kill_grace: float = KILL_GRACE_S,
                      stop: asyncio.Future | None = None,
                      on_stdout_line: Callable[[str], None] | None = None,
                      on_spawn: Callable[[int], None] | None = None) -> ProcessResult:
    """Run one child in its own process group and always leave nothing behind.

    The child's exit is watched through a pidfd, not through its pipes: a grandchild that
    keeps stdout open cannot hold the worker slot. On timeout, stop or over-large output the
    group gets SIGTERM, then SIGKILL after `kill_grace`; after any exit the group gets SIGKILL
    so stray grandchildren die with it. Spawn failures (missing binary) raise OSError.
    """
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen(argv, stdin=stdin_r, stdout=out_w, stderr=err_w, cwd=cwd,
                                env=env, start_new_session=True, close_fds=True)
    except BaseException:
        for fd in (stdin_w, out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (stdin_r, out_w, err_w):
            os.close(fd)
    pgid = proc.pid
    budget = [max_output]
    out = _PipeCapture(loop, out_r, budget, on_stdout_line)
    err = _PipeCapture(loop, err_r, budget, None)
    # Most creators that finish at once are read after they exit, which spares four selector
    # registrations per child; a slower one is read as it writes (progress, the output cap).
    def watch_pipes() -> None:
        out.watch()
        err.watch()

    start_watching = loop.call_later(PIPE_WATCH_DELAY_S, watch_pipes)
    feeder = _feed_stdin(loop, stdin_w, stdin)
    pidfd = os.pidfd_open(proc.pid)  # the child is not reaped yet, so this cannot fail
    exit_watch = _ExitWatch(loop, pidfd)
    exited = exit_watch.exited
    result = ProcessResult(None, "", "", 0.0)
    group_killed = False
    try:
        if on_spawn is not None:
            on_spawn(proc.pid)
        # Plain futures, no tasks: this runs once per creator and must stay cheap.
        watched = {w for w in (stop, out.done, err.done) if w is not None}
        deadline = started + timeout
        while not exited.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                result.timed_out = True
                break
            exit_watch.waiter = loop.create_future()
            await _first_done(loop, watched, remaining, exit_watch.waiter)
            if stop is not None and stop.done():
                result.stopped = True
                break
            if _over_cap(out, err):
                result.output_too_large = True
                break
            watched = {w for w in watched if not w.done()}
        if not exited.done():
            kill_process_group(pgid, signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), kill_grace)
            kill_process_group(pgid, signal.SIGKILL)
            await exited
        kill_process_group(pgid, signal.SIGKILL)
        group_killed = True  # not again once reaped: the pgid may then be another's
        result.exit_code = proc.wait()  # a zombie by now: this returns at once
        # Whatever is still in the pipes was written before the group died: read it out,
        # but never wait on a grandchild that escaped into a session of its own.
        start_watching.cancel()
        out.drain_now()
        err.drain_now()
        if not (out.done.done() and err.done.done()):
            out.watch()
            err.watch()
            await asyncio.wait([out.done, err.done], timeout=PIPE_DRAIN_S)
        # A quick child's output is first read here, so the cap may only show now.
        result.output_too_large = result.output_too_large or _over_cap(out, err)
    finally:
        start_watching.cancel()
        if not group_killed:
            kill_process_group(pgid, signal.SIGKILL)
        out.close()
        err.close()
        if feeder is not None:
            feeder.cancel()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if proc.returncode is None:
            await asyncio.to_thread(proc.wait)
    result.stdout, result.stderr = out.text(), err.text()
    result.duration = time.monotonic() - started
    return result


# Markdown: what the contents row derives from an article body.

#: One CJK "word" each: ideographs (URO, extensions A-G, compatibility), kana, Hangul. CJK
#: punctuation (U+3000-303F, the katakana middle dot, fullwidth forms) deliberately not.
_CJK_CLASS = ("[\u1100-\u11ff\u3040-\u309f\u30a0-\u30fa\u30fc-\u30ff\u3130-\u318f\u3400-\u4dbf"
              "\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff\uf900-\ufaff"
              "\U00020000-\U0003134f]")
CJK_CHAR_RE = re.compile(_CJK_CLASS)
_CJK_RUN_RE = re.compile(_CJK_CLASS + "+")
_FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_H1_RE = re.compile(r"^ {0,3}#[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_HEADING_MARK_RE = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+|$)")
_CLOSING_HASHES_RE = re.compile(r"[ \t]+#+[ \t]*$")
_RULE_RE = re.compile(r"^ {0,3}([-=*_])(?:[ \t]*\1){2,}[ \t]*$")  #: also setext underlines
_TABLE_RULE_RE = re.compile(r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)+\|?[ \t]*$")
_BLOCK_PREFIX_RE = re.compile(r"^[ \t]*(?:>[ \t]?)*[ \t]*(?:(?:[-*+]|\d{1,9}[.)])[ \t]+"
                              r"(?:\[[ xX]\][ \t]+)?)?")
_LETTER_OR_DIGIT_RE = re.compile(r"[^\W_]")
_ESCAPED_RE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!~|<>])")
#: Escaped ASCII punctuation is parked in a block of 128 Private Use code points while the
#: rules run: the first block the text does not use itself, so its own such characters stay.
_PRIVATE_USE_RE = re.compile("[\ue000-\uf8ff\U000f0000-\U0010fffd]")
_PARKING_BASES = (*range(0xE000, 0xF900, 0x80), *range(0xF0000, 0x10FF80, 0x80))
#: (literals one of which every match contains, pattern, replacement), applied in order. A
#: rule whose literals are absent is skipped: most articles use few kinds of markup.
_INLINE_RULES = (
    (("<!--",), re.compile(r"<!--.*?-->", re.S), ""),
    (("![",), re.compile(r"!\[[^\]]*\]\([^)]*\)"), ""),                 # images
    (("![",), re.compile(r"!\[[^\]]*\]\[[^\]]*\]"), ""),
    (("](",), re.compile(r"\[([^\]]*)\]\([^)]*\)"), r"\1"),             # [text](url) -> text
    (("][",), re.compile(r"\[([^\]]+)\]\[[^\]]*\]"), r"\1"),            # [text][ref] -> text
    (("<",), re.compile(r"<((?:https?|mailto):[^>\s]+)>"), r"\1"),     # autolinks
    (("<",), re.compile(r"</?[A-Za-z][^>]*>"), ""),                    # inline HTML tags
    (("`",), re.compile(r"(`+)(.+?)\1"), r"\2"),                       # inline code
    (("**", "__"), re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),
    (("*",), re.compile(r"\*(?=\S)(.+?)(?<=\S)\*"), r"\1"),
    (("_",), re.compile(r"(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)"), r"\1"),  # not inside snake_case
    (("~~",), re.compile(r"~~(?=\S)(.+?)(?<=\S)~~"), r"\1"),
)
#: The first characters of those literals: a text without any needs no rule.
_INLINE_MARK_RE = re.compile("[" + "".join(sorted({re.escape(literal[0]) for literals, _, _
                                                   in _INLINE_RULES for literal in literals}))
                             + "]")


# -- Markdown: title, summary, word count ----------------------------------------------------------


def _prose_lines(md: str) -> list[str]:
    """The lines of `md` outside fenced code blocks; an unclosed fence runs to the end, as in
    CommonMark, so a `# comment` in code is never taken for a title."""
    lines: list[str] = []
    fence = ""
    for line in md.lstrip("\ufeff").splitlines():
        opening = _FENCE_RE.match(line)
        if fence:
            closing = line.strip()
            if closing.startswith(fence) and not closing.strip(fence[0]):
                fence = ""
        elif opening:
            fence = opening.group(1)
        else:
            lines.append(line)
    return lines


def _inline_text(text: str) -> str:
    """`text` without inline Markdown: links keep their text, images and HTML go."""
    base = None
    if "\\" in text:
        used = {ord(ch) & ~0x7F for ch in _PRIVATE_USE_RE.findall(text)}
        base = next((b for b in _PARKING_BASES if b not in used), None)
        if base is not None:  # else a text that fills every block keeps its backslashes
            text = _ESCAPED_RE.sub(lambda m: chr(base + ord(m.group(1))), text)
    if _INLINE_MARK_RE.search(text):  # most paragraphs have no inline markup at all
        for literals, pattern, replacement in _INLINE_RULES:
            if any(literal in text for literal in literals):
                text = pattern.sub(replacement, text)
    if base is not None:
        text = re.sub(f"[{chr(base)}-{chr(base + 0x7F)}]",
                      lambda m: chr(ord(m.group()) - base), text)
    return text


def markdown_title(md: str, lines: list[str] | None = None) -> str | None:
    """The text of the first ATX H1 (`# Title`) outside fenced code, inline markup stripped;
    None when there is none. `lines`: _prose_lines(md), when the caller has them already."""
    for line in _prose_lines(md) if lines is None else lines:
        match = _H1_RE.match(line)
        if match:
            title = " ".join(_inline_text(match.group(1)).split())
            if title:
                return title
    return None


_SETEXT_RE = re.compile(r"^ {0,3}(?:=+|-+)[ \t]*$")
_LIST_ITEM_RE = re.compile(r"^[ \t]*(?:>[ \t]?)*[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+")
#: Where a sentence ends: CJK full stops need no space after them, ASCII ones do (so "3.5"
#: and "example.com" go on); closing quotes and brackets stay with their sentence.
_SENTENCE_END_RE = re.compile(r"(?:[。！？；…]+|[.!?]+(?=[\"'”’)\]]*(?:\s|$)))[\"'”’」』）)\]]*")
#: Characters after which a CJK line may be cut mid-sentence without splitting a word.
_CJK_PUNCTUATION_RE = re.compile("[\u3000-\u303f\uff01-\uff0f\uff1a-\uff20…”’]")
_CJK_BREAK_RE = re.compile(_CJK_CLASS[:-1] + ",:\u3000-\u303f\uff01-\uff0f\uff1a-\uff20]")
SUMMARY_ELLIPSIS = "…"


def _prose_paragraphs(lines: list[str]) -> Iterator[str]:
    """The body's prose as plain-text paragraphs (list items are paragraphs of their own):
    headings (ATX and setext), rules, tables and lines that are only images are left out."""
    current: list[str] = []

    def paragraph() -> str:
        text = " ".join(_inline_text(" ".join(current)).split())
        current.clear()
        return text

    for index, line in enumerate(lines):
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if (not line.strip() or _HEADING_MARK_RE.match(line) or _RULE_RE.match(line)
                or line.lstrip().startswith("|") or _TABLE_RULE_RE.match(line)
                or (not current and _SETEXT_RE.match(following))):
            if current and (text := paragraph()):
                yield text
            continue
        if current and _LIST_ITEM_RE.match(line) and (text := paragraph()):
            yield text
        current.append(_BLOCK_PREFIX_RE.sub("", line).strip())
    if current and (text := paragraph()):
        yield text


def _join_prose(left: str, right: str) -> str:
    """Two pieces of prose as one text: Chinese and Japanese run on without a space."""
    if not left:
        return right
    if ((CJK_CHAR_RE.match(right[:1]) or right[:1] in "“‘「『（《")
            and _CJK_PUNCTUATION_RE.match(left[-1:])):
        return left + right
    return f"{left} {right}"


def plain_summary(md: str, limit: int = 200, lines: list[str] | None = None) -> str:
    """The first sentences of the body's prose as plain text, at most `limit` characters.

    No title, no headings, no Markdown: code, images, rules and tables are left out and
    inline markup is stripped (link texts kept). Whole sentences are taken while they fit
    (a paragraph's end ends a sentence too); when even the first one does not fit, it is cut
    at a word boundary (a space, or between CJK characters) and ends with an ellipsis.
    """
    text = ""
    for paragraph in _prose_paragraphs(_prose_lines(md) if lines is None else lines):
        text = _join_prose(text, paragraph)
        if len(text) > limit:
            break
    if len(text) <= limit:
        return text
    ends = [match.end() for match in _SENTENCE_END_RE.finditer(text, 0, limit + 1)
            if match.end() <= limit]
    # Whole sentences, unless that leaves less than half the room: then a cut sentence.
    if ends and ends[-1] >= limit // 2:
        return text[:ends[-1]].rstrip()
    room = limit - len(SUMMARY_ELLIPSIS)
    breaks = [i for i in range(1, room + 1)
              if text[i].isspace() or _CJK_BREAK_RE.match(text[i - 1])]
    # After a comma reads better than between two characters, if one is near the end.
    commas = [i for i in breaks if _CJK_PUNCTUATION_RE.match(text[i - 1]) or text[i - 1] == ","]
    cut = (commas[-1] if commas and commas[-1] >= room * 3 // 4 else
           breaks[-1] if breaks else room)
    return text[:cut].rstrip(" ，、,:：;；") + SUMMARY_ELLIPSIS


def count_words(text: str) -> int:
    """Words as a reader of mixed text counts them: each CJK character is one word, and so is
    each whitespace-separated run of other text that holds a letter or digit ("GPT-4")."""
    # Runs, not characters, are replaced: a few matches instead of one per character.
    others, runs = _CJK_RUN_RE.subn(" ", text)
    words = sum(1 for token in others.split()
                if token.isalnum() or _LETTER_OR_DIGIT_RE.search(token))
    return len(text) - len(others) + runs + words

# Output adapters: a creator's stdout becomes an Article, or a CreatorFailure saying why not.

# -- the json adapter ------------------------------------------------------------------------------


@dataclass
class CreatorFailure:
    kind: str  #: error_kind: exit_code, killed, timeout, bad_output, output_too_large, ...
    message: str
    retryable: bool = True
    error_class: str = ""  #: one of ERROR_CLASSES; derived from `kind` when not given
    retry_after: float | None = None  #: seconds, from a rate_limited creator
    #: the article a quality_failed creator printed all the same, kept for review
    draft: Article | None = None

    def __post_init__(self) -> None:
        self.error_class = self.error_class or error_class_of(self.kind)
        if self.error_class in PERMANENT_CLASSES:
            self.retryable = False

    @classmethod
    def from_structured(cls, parsed: tuple[str, str, float | None],
                        data: dict[str, Any]) -> CreatorFailure:
        """The failure an error object names; with quality_failed, the article printed in
        the same object (the success shape's keys) is its draft."""
        error_class, message, retry_after = parsed
        draft = _json_article(data) if error_class == "quality_failed" else None
        return cls(error_class, message, error_class not in PERMANENT_CLASSES, error_class,
                   retry_after, draft if isinstance(draft, Article) else None)


def progress_from_line(line: str) -> tuple[int, str | None] | None:
    """`{"progress": 40, "stage": "writing"}` lines stream the task's progress."""
    line = line.strip()
    if not line.startswith("{") or '"progress"' not in line:
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("progress"), (int, float)):
        return None
    if any(key in data for key in ("content", "body", "data")):
        return None
    stage = data.get("stage")
    return max(0, min(100, int(data["progress"]))), (str(stage) if stage is not None else None)


def _last_json_object(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict) and progress_from_line(line) is None:
                    return data
    with contextlib.suppress(ValueError):
        data = json.loads(stdout)
        if isinstance(data, dict):
            return data
    return None


def parse_json_output(stdout: str) -> Article | CreatorFailure:
    """The json adapter: the last JSON object on stdout, flat or in the content-creator HTTP
    envelope `{"success": true, "data": {...}}`; snake_case and camelCase keys."""
    data = _last_json_object(stdout)
    if data is None:
        return CreatorFailure("bad_output", "exit 0 but no JSON object on stdout")
    error = structured_error(data)
    if error is not None:
        return CreatorFailure.from_structured(error, data)
    if "success" in data and isinstance(data.get("data"), dict):
        if not data["success"]:
            return CreatorFailure("creator_failed", str(data.get("error") or data))
        data = data["data"]
    elif data.get("success") is False:
        return CreatorFailure("creator_failed", str(data.get("error") or "success: false"))
    return _json_article(data)


def _json_article(data: dict[str, Any]) -> Article | CreatorFailure:
    """The article in a json creator's result object."""
    body = (data.get("content") or data.get("body") or data.get("article")
            or data.get("finalArticleContent") or data.get("articleContent"))
    if not isinstance(body, str) or not body.strip():
        return CreatorFailure("bad_output", "JSON result has no non-empty 'content' or 'body'")
    images = data.get("images") or []
    if not isinstance(images, list):
        images = [images]
    quality: dict[str, Any] = data["quality"] if isinstance(data.get("quality"), dict) else {}
    score = data.get("quality_score", data.get("qualityScore"))
    if score is not None:
        quality = {**quality, "score": score}
    extra: dict[str, Any] = {key: data[key] for key in ("generator", "model", "usage", "cost",
                                                        "summary", "word_count", "wordCount")
                             if key in data}
    title = data.get("title") if isinstance(data.get("title"), str) else None
    return Article(body=body, title=title, images=[str(i) for i in images], quality=quality,
                   external_id=data.get("task_id") or data.get("taskId"), extra=extra)


# content-creator's text output (the real CLI, see tests/fixtures/content-creator).

CC_SEPARATOR = "\u2500" * 40
#: The CLI prints the quality score as "<score>/100", but the score is a 0-10 weighted average.
CC_SCORE_SCALE = "0-10 (printed as x/100 by content-creator 0.2.0)"
CC_STDERR_TAIL_CHARS = 2000
CC_STDOUT_TAIL_LINES = 8

_CC_STATUS_HEADER = "✅ 执行成功"
_CC_ARTICLE_HEADER = "📝 生成的内容:"
_CC_IMAGES_HEADER = "🖼️ 生成的配图:"
_CC_QUALITY_HEADER = "🔍 文本质检:"
_CC_COMPLETED = ("已完成", "completed")
_CC_FAILED = ("失败", "failed")
_CC_CANCELLED = ("已取消", "cancelled")

_CC_DEV_LOG_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:\.\d+)?Z? \[(?P<level>[a-z]+)\]: (?P<rest>.*)$")
_CC_KEY_VALUE_RE = re.compile(r"^(?P<key>[^:：]+)[:：] ?(?P<value>.*)$")
_CC_DURATION_RE = re.compile(r"^(?:(?P<m>\d+)分)?(?P<s>\d+)秒$")
_CC_SCORE_RE = re.compile(r"^(?P<score>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*/\s*100$")
_CC_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# commander's argument errors and create.ts's own "must provide" checks: retrying cannot help.
_CC_USAGE_ERROR_RE = re.compile(
    r"^(?:error: (?:unknown option|unknown command|missing required argument|option '.*' "
    r"argument missing|required option|too many arguments|option '.*' argument '.*' is "
    r"invalid)|❌ 错误: 必须提供)", re.MULTILINE)


_CC_ENV_DUMP = "Environment variable validation failed:"
#: One issue of zod's dump: `path: [ 'TAVILY_API_KEY' ],` then `message: '…'`.
_CC_ENV_ISSUE_RE = re.compile(r"path: \[ '([^']+)'[^\]]*\],\s*message: '([^']*)'")
_CC_QUALITY_FAILED_RE = re.compile(r"Text quality check failed after \d+ attempts")
#: axios' "status code 401", "HTTP 401", "401 Unauthorized" and the like.
_CC_HTTP_STATUS_RE = re.compile(r"(?:status code|HTTP|status)[ :]*([1-5]\d\d)\b"
                                r"|\b([1-5]\d\d) (?=Unauthorized|Forbidden|Too Many Requests"
                                r"|Payment Required)", re.I)
_CC_QUOTA_RE = re.compile(r"insufficient[_ ]quota|exceeded your current quota|quota exceeded"
                          r"|insufficient[_ ]balance|余额不足|arrearage|欠费", re.I)
_CC_RATE_LIMIT_RE = re.compile(r"rate[_ ]limit|too many requests", re.I)


# -- the content-creator-text adapter --------------------------------------------------------------


def priority_to_content_creator(priority: int) -> str:
    """Map a task priority (0-10, higher first) onto content-creator's `--priority` levels.

    0-3 -> "low", 4-6 -> "normal" (the daemon's default 5 and the CLI's default agree),
    7-8 -> "high", 9-10 -> "urgent". Values outside 0-10 are clamped first.
    """
    priority = max(0, min(10, int(priority)))
    if priority <= 3:
        return "low"
    if priority <= 6:
        return "normal"
    if priority <= 8:
        return "high"
    return "urgent"


def parse_content_creator_run(stdout: str, stderr: str, exit_code: int,
                              cwd: str | None) -> dict:
    """Turn one finished `content-creator create --mode sync` run into an article or a failure.

    Success: {"ok": True, "title", "body", "images", "quality", "external_id",
    "duration_seconds", "status_text"}. `body` is exactly the text the CLI printed between the
    article's two separators: console.log adds one line break after the article, so a body
    that ended with "\\n" shows as a trailing empty line and is kept as that "\\n"; nothing is
    stripped. Relative image paths (the repo-head CLI prints downloaded files such as
    data/images/x.png) are made absolute against `cwd`; the body's own links stay as printed.

    Failure: {"ok": False, "error_kind", "error_message", "retryable", "error_class"} with
    error_kind one of creator_failed (状态: 失败; the reason comes from the log lines),
    creator_cancelled, invalid_arguments (commander/usage errors, not retryable), exit_code,
    killed (negative exit code: a signal) and bad_output (exit 0 without a usable result
    block). A quality_failed run that printed its article all the same also has "draft":
    that article's title, body, images and quality.
    """
    if exit_code != 0:
        return _cc_exit_failure(stdout, stderr, exit_code)
    lines = strip_ansi(stdout.replace("\r\n", "\n")).split("\n")
    status_block = _cc_find_block(lines, _CC_STATUS_HEADER, 0, first_key="任务ID")
    if status_block is None:
        return _cc_failure("bad_output", "content-creator exited 0 without a '✅ 执行成功' "
                           f"result block; stdout ends with: {_cc_stdout_tail(lines)}", True)
    fields = _cc_key_values(status_block[0])
    external_id = fields.get("任务ID") or None
    task = f"content-creator task {external_id}" if external_id else "content-creator task"
    if "状态" not in fields:
        return _cc_failure("bad_output", f"{task}: result block has no '状态:' line", True)
    status_text = fields["状态"]
    if status_text in _CC_CANCELLED:
        return _cc_failure("creator_cancelled", f"{task} was cancelled (状态: {status_text})",
                           False)
    article = _cc_article(lines, status_block[1])
    if status_text not in _CC_COMPLETED:
        reason = _cc_failure_reason(lines) or "no error detail in its log lines"
        shown = status_text if status_text in _CC_FAILED else f"unexpected {status_text!r}"
        failure = _cc_failure("creator_failed", f"{reason} ({task}, 状态: {shown})", True,
                              _cc_reason_class(reason))
        # The quality gate gave up on an article it printed all the same: kept for review.
        if failure["error_class"] == "quality_failed" and article and article[0].strip():
            failure["draft"] = _cc_article_fields(lines, article, cwd)
        return failure
    if article is None:
        return _cc_failure("bad_output", f"{task} reported 状态: {status_text} but printed no "
                           "'📝 生成的内容:' article", True)
    if not article[0].strip():
        return _cc_failure("bad_output", f"{task} printed an empty article", True)
    return {
        "ok": True,
        **_cc_article_fields(lines, article, cwd),
        "external_id": external_id,
        "duration_seconds": _cc_duration_seconds(fields.get("耗时", "")),
        "status_text": status_text,
    }


def _cc_article_fields(lines: list[str], article: tuple[str, int],
                       cwd: str | None) -> dict[str, Any]:
    """title, body, images and quality of a printed article and the blocks after it."""
    body, article_end = article
    images_block = _cc_find_block(lines, _CC_IMAGES_HEADER, article_end)
    quality_block = _cc_find_block(lines, _CC_QUALITY_HEADER, article_end)
    return {"title": markdown_title(body), "body": body,
            "images": _cc_images(images_block[0] if images_block else [], cwd),
            "quality": _cc_quality(quality_block[0] if quality_block else [])}


def _cc_failure(kind: str, message: str, retryable: bool, error_class: str = "") -> dict:
    error_class = error_class or error_class_of(kind)
    return {"ok": False, "error_kind": kind, "error_message": message,
            "retryable": retryable and error_class not in PERMANENT_CLASSES,
            "error_class": error_class}


def _cc_reason_class(reason: str) -> str:
    """The class a content-creator error text names: its quality gate giving up, an HTTP
    status of an upstream (LLM, Tavily, ARK), a quota or balance message; else transient."""
    if _CC_QUALITY_FAILED_RE.search(reason):
        return "quality_failed"
    statuses = {int(a or b) for a, b in _CC_HTTP_STATUS_RE.findall(reason)}
    if _CC_QUOTA_RE.search(reason) or 402 in statuses:
        return "quota_exhausted"
    if statuses & {401, 403}:
        return "auth_failed"
    if 429 in statuses or _CC_RATE_LIMIT_RE.search(reason):
        return "rate_limited"
    return "transient"


def _cc_env_failure(err: str) -> str | None:
    """The variables zod's `Environment variable validation failed:` dump names, with why."""
    if _CC_ENV_DUMP not in err:
        return None
    dump = err.split(_CC_ENV_DUMP, 1)[1]
    problems = [f"{name} ({message})" for name, message in _CC_ENV_ISSUE_RE.findall(dump)]
    named = ", ".join(problems) or "(the dump names none)"
    return (f"content-creator refused its environment: {named}; set the variable(s) in the"
            " daemon's environment and reference them in [creator.env] as NAME = \"${NAME}\"")


def _cc_exit_failure(stdout: str, stderr: str, exit_code: int) -> dict:
    """A non-zero exit: argument and env errors, or an exception outside the executor."""
    err = strip_ansi(stderr.replace("\r\n", "\n")).strip()
    if len(err) > CC_STDERR_TAIL_CHARS:
        err = "…" + err[-CC_STDERR_TAIL_CHARS:]
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return _cc_failure("killed", f"content-creator killed by {name}; stderr: "
                           f"{err or '(empty)'}", True)
    env_problem = _cc_env_failure(err)
    if env_problem is not None:
        return _cc_failure("env_invalid", f"{env_problem}. content-creator exited {exit_code}:"
                           f" {err}", True, "misconfigured")
    usage = _CC_USAGE_ERROR_RE.search(err)
    if usage:
        # An option the CLI does not know comes from the command template, not from a task.
        template_fault = usage.group().startswith(("error: unknown option",
                                                   "error: unknown command"))
        return _cc_failure("invalid_arguments", f"content-creator rejected its arguments "
                           f"(exit {exit_code}): {err}", False,
                           "misconfigured" if template_fault else "invalid_input")
    if err:
        return _cc_failure("exit_code", f"content-creator exited {exit_code}: {err}", True,
                           _cc_reason_class(err))
    # An uncaught error at start-up (e.g. no ./data directory for SQLite in the working
    # directory) goes to winston's ./logs/app.exceptions.log, not to stderr.
    lines = strip_ansi(stdout.replace("\r\n", "\n")).split("\n")
    return _cc_failure("exit_code", f"content-creator exited {exit_code} with empty stderr "
                       "(start-up errors go to ./logs/app.exceptions.log in its working "
                       "directory; a missing ./data directory is the usual cause); stdout "
                       f"ends with: {_cc_stdout_tail(lines)}", True)


def _cc_stdout_tail(lines: list[str]) -> str:
    tail = [line.strip() for line in lines if line.strip()][-CC_STDOUT_TAIL_LINES:]
    return " | ".join(tail)[-CC_STDERR_TAIL_CHARS:] or "(empty)"


def _cc_log_record(line: str) -> tuple[str, str, dict] | None:
    """(level, message, metadata) of a winston log line, in either format, else None."""
    match = _CC_DEV_LOG_RE.match(line)
    if match:
        rest = match["rest"]
        start = rest.find("{")
        while start != -1:
            try:
                meta = json.loads(rest[start:])
            except ValueError:
                meta = None
            if isinstance(meta, dict):
                return match["level"], rest[:start].strip(), meta
            start = rest.find("{", start + 1)
        return match["level"], rest.strip(), {}
    if line.startswith("{") and '"level"' in line:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if (isinstance(record, dict) and isinstance(record.get("level"), str)
                and isinstance(record.get("message"), str)):
            return record["level"], record["message"], record
    return None


def _cc_is_noise(line: str) -> bool:
    """Blank lines and log lines, which may land between (not inside) the CLI's lines."""
    return not line.strip() or _cc_log_record(line) is not None


def _cc_is_separator(line: str) -> bool:
    return line.strip() == CC_SEPARATOR


def _cc_next_meaningful(lines: list[str], start: int) -> int | None:
    for index in range(start, len(lines)):
        if not _cc_is_noise(lines[index]):
            return index
    return None


def _cc_find_block(lines: list[str], header: str, start: int,
                   first_key: str | None = None) -> tuple[list[str], int] | None:
    """The first `header` block at or after `start`: its non-log lines and the index after
    its closing separator. With `first_key`, the block's first line must be that key, so a
    header echoed inside user text (a topic, a requirement) is not mistaken for the block."""
    for index in range(start, len(lines) - 1):
        if lines[index].strip() != header:
            continue
        opening = _cc_next_meaningful(lines, index + 1)
        if opening is None or not _cc_is_separator(lines[opening]):
            continue
        content: list[str] = []
        closing = opening + 1
        while closing < len(lines) and not _cc_is_separator(lines[closing]):
            if not _cc_is_noise(lines[closing]):
                content.append(lines[closing].strip())
            closing += 1
        if closing == len(lines):
            return None
        if first_key and not (content and content[0].startswith(first_key)):
            continue
        return content, closing + 1
    return None


def _cc_article(lines: list[str], start: int) -> tuple[str, int] | None:
    """The article between its separators, verbatim, and the index after the closing one.

    The article is printed by one console.log call, so nothing can interleave with it, but
    the text itself may contain a 40 x U+2500 line: the closing separator is the first one
    after which only whole image/quality blocks and log lines follow (failing that, the
    first one, so unknown trailing output from another CLI version still parses)."""
    header = next((i for i in range(start, len(lines))
                   if lines[i].strip() == _CC_ARTICLE_HEADER), None)
    if header is None:
        return None
    opening = _cc_next_meaningful(lines, header + 1)
    if opening is None or not _cc_is_separator(lines[opening]):
        return None
    candidates = [i for i in range(opening + 1, len(lines)) if _cc_is_separator(lines[i])]
    if not candidates:
        return None
    closing = next((i for i in candidates if _cc_only_result_blocks_follow(lines, i + 1)),
                   candidates[0])
    return "\n".join(lines[opening + 1:closing]), closing + 1


def _cc_only_result_blocks_follow(lines: list[str], start: int) -> bool:
    index = _cc_next_meaningful(lines, start)
    while index is not None:
        if lines[index].strip() not in (_CC_IMAGES_HEADER, _CC_QUALITY_HEADER):
            return False
        opening = _cc_next_meaningful(lines, index + 1)
        if opening is None or not _cc_is_separator(lines[opening]):
            return False
        closing = next((i for i in range(opening + 1, len(lines))
                        if _cc_is_separator(lines[i])), None)
        if closing is None:
            return False
        index = _cc_next_meaningful(lines, closing + 1)
    return True


def _cc_key_values(block: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in block:
        match = _CC_KEY_VALUE_RE.match(line)
        if match:
            fields.setdefault(match["key"].strip(), match["value"].strip())
    return fields


def _cc_failure_reason(lines: list[str]) -> str | None:
    """The error of the last `[SyncExecutor] Task execution failed` log line, else of the last
    log line carrying an error string (e.g. `Task marked as failed`'s errorMessage)."""
    fallback = None
    for line in reversed(lines):
        record = _cc_log_record(line)
        if record is None:
            continue
        _level, message, meta = record
        error = meta.get("error") or meta.get("errorMessage")
        if isinstance(error, dict):
            error = error.get("message") or json.dumps(error, ensure_ascii=False)
        if not error or not isinstance(error, str):
            continue
        if "Task execution failed" in message:
            return error
        fallback = fallback or error
    return fallback


def _cc_images(block: list[str], cwd: str | None) -> list[str]:
    """One image per line: URLs as printed, relative local paths made absolute against cwd.
    The CLI prints `img.url` (0.2.0) or `localPath || url` (repo head) unchecked, so a missing
    value shows as "undefined"; such lines are dropped."""
    images = []
    for line in block:
        if line in ("undefined", "null"):
            continue
        if not (_CC_URL_RE.match(line) or os.path.isabs(line) or cwd is None):
            line = os.path.normpath(os.path.join(cwd, line))
        images.append(line)
    return images


def _cc_quality(block: list[str]) -> dict:
    fields = _cc_key_values(block)
    passed = {"通过": True, "未通过": False}.get(fields.get("状态", ""))
    score_match = _CC_SCORE_RE.match(fields.get("评分", ""))
    suggestions = [s.strip() for s in fields.get("建议", "").split(", ") if s.strip()]
    return {"passed": passed, "score": float(score_match["score"]) if score_match else None,
            "score_scale": CC_SCORE_SCALE, "suggestions": suggestions}


def _cc_duration_seconds(text: str) -> int | None:
    """`耗时:` as printed by formatDuration: `N秒` or `M分N秒` (M may exceed 59)."""
    match = _CC_DURATION_RE.match(text.strip())
    return int(match["m"] or 0) * 60 + int(match["s"]) if match else None

# -- from a finished process to an outcome ---------------------------------------------------------


def content_creator_text_outcome(result: ProcessResult, cwd: Path) -> Article | CreatorFailure:
    """The content-creator-text adapter on one finished run."""
    parsed = parse_content_creator_run(result.stdout, result.stderr, result.exit_code or 0,
                                       str(cwd))
    if not parsed["ok"]:
        draft = parsed.get("draft")
        return CreatorFailure(parsed["error_kind"], parsed["error_message"], parsed["retryable"],
                              parsed.get("error_class", ""), draft=draft and Article(
                                  **draft, extra={"generator": "content-creator"}))
    return Article(body=parsed["body"], title=parsed["title"], images=parsed["images"],
                   quality=parsed["quality"], external_id=parsed["external_id"],
                   extra={"generator": "content-creator",
                          "duration_seconds_reported": parsed["duration_seconds"],
                          "status_text": parsed["status_text"]})

def classify_result(result: ProcessResult, creator: CreatorConfig,
                    cwd: Path) -> Article | CreatorFailure:
    """Decide what one finished creator process produced."""
    if result.output_too_large:
        return CreatorFailure("output_too_large", "creator printed more than creator.max_output"
                              f" ({creator.max_output} bytes); it was killed", False)
    if result.timed_out:
        return CreatorFailure("timeout", f"creator did not finish within task_timeout"
                              f" ({result.duration:.0f}s); its process group was killed")
    if creator.output == "content-creator-text":
        return content_creator_text_outcome(result, cwd)
    if result.exit_code is not None and result.exit_code < 0:
        name = signal.Signals(-result.exit_code).name
        return CreatorFailure("killed", f"creator killed by {name}: {result.stderr_tail()}")
    if result.exit_code:
        return exit_failure(result, creator)
    return parse_json_output(result.stdout)


def exit_failure(result: ProcessResult, creator: CreatorConfig) -> CreatorFailure:
    """A non-zero exit of a json creator: its structured error object if it printed one, else
    the class its sysexits code names, else permanent (permanent_exit_codes) or transient."""
    data = _last_json_object(result.stdout)
    error = structured_error(data)
    if data is not None and error is not None:
        return CreatorFailure.from_structured(error, data)
    code = result.exit_code or 0
    detail = result.stderr_tail()
    if code in SYSEXITS_CLASSES:
        return CreatorFailure("exit_code", f"creator exited {code}: {detail}",
                              error_class=SYSEXITS_CLASSES[code])
    if code in creator.permanent_exit_codes:
        return CreatorFailure("exit_code", f"creator exited {code} (permanent): {detail}",
                              False, "invalid_input")
    return CreatorFailure("exit_code", f"creator exited {code}: {detail}")


#: What an asynchronous creator's status words mean; any other word means running.
ASYNC_STATES = {
    "completed": "completed", "complete": "completed", "success": "completed",
    "succeeded": "completed", "done": "completed", "已完成": "completed", "成功": "completed",
    "failed": "failed", "error": "failed", "失败": "failed",
    "cancelled": "cancelled", "canceled": "cancelled", "已取消": "cancelled",
    "queued": "queued", "pending": "queued", "submitted": "queued", "scheduled": "queued",
    "待处理": "queued", "排队中": "queued",
    "running": "running", "processing": "running", "in_progress": "running",
    "运行中": "running",
}
EXTERNAL_ID_KEYS = ("external_id", "task_id", "taskId", "id", "job_id", "jobId")


def parse_external_id(stdout: str) -> str | None:
    """The id an asynchronous creator's submit command printed: a JSON object's id key,
    content-creator's `任务ID: …` line, or a last line that is one bare token."""
    data = _last_json_object(stdout)
    if data is not None:
        if isinstance(data.get("data"), dict):
            data = data["data"]
        for key in EXTERNAL_ID_KEYS:
            if data.get(key):
                return str(data[key])
    text = strip_ansi(stdout)
    match = re.search(r"任务ID:\s*(\S+)", text)
    if match:
        return match.group(1)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and re.fullmatch(r"[\w.:-]{1,200}", lines[-1]):
        return lines[-1]
    return None


def parse_async_status(stdout: str) -> tuple[str, int | None, str | None]:
    """(state, progress, message) from a status command: `{"status": …, "progress": …,
    "error": …}` or content-creator's `状态: …` line. The state is queued, running or a final
    one (completed, failed, cancelled); unknown words mean running."""
    data = _last_json_object(stdout)
    if data is not None:
        if isinstance(data.get("data"), dict):
            data = data["data"]
        raw = str(data.get("status") or data.get("state") or "").lower()
        progress = data.get("progress")
        message = data.get("error") or data.get("message")
        return (ASYNC_STATES.get(raw, "running"),
                int(progress) if isinstance(progress, (int, float)) else None,
                str(message) if message else None)
    text = strip_ansi(stdout)
    # content-creator prints `状态: ✅ 已完成` and, for a failure, `错误信息:` + the message.
    for line in reversed(re.findall(r"状态:\s*(.+)", text)):
        for word, state in ASYNC_STATES.items():
            if word in line:
                error = re.search(r"错误信息:\s*\n(.+)", text)
                return state, None, error.group(1).strip() if error else None
    return "running", None, None


def parse_status_batch(stdout: str, asked: set[str]) -> dict[str, str]:
    """Each asked id's line in a status_batch_command's output: one JSON object per line
    naming its job (external_id, task_id, id, job_id, … as a submit reply does) beside
    status_command's keys. Other lines and ids not asked are ignored; the last line wins."""
    replies = {}
    for line in stdout.splitlines():
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        job = next((str(data[key]) for key in EXTERNAL_ID_KEYS
                    if isinstance(data.get(key), (str, int)) and str(data[key]) in asked), None)
        if job is not None:
            replies[job] = line
    return replies


def article_row(article: Article, topic: str) -> dict[str, Any]:
    """The contents row's derived fields, by SPEC §7's rules."""
    body = article.body.strip("\n") + "\n"
    lines = _prose_lines(body)
    return {
        "title": markdown_title(body, lines) or (article.title or "").strip() or topic,
        "body": body,
        "summary": plain_summary(body, lines=lines),
        "word_count": count_words(body),
        "images": article.images,
        "quality": article.quality,
        # What made the article, as the creator said: "offline-template" marks a placeholder.
        "generator": _text_or_none(article.extra.get("generator")),
        "model": _text_or_none(article.extra.get("model")),
        "cost": _finite_or_none(article.extra.get("cost")),
    }


def _text_or_none(value: Any) -> str | None:
    return str(value)[:200] if isinstance(value, (str, int, float)) and str(value) else None


def _finite_or_none(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# Spend #########################################################################################

#: Where creators report tokens: OpenAI's snake_case, camelCase, and the input/output names.
USAGE_INPUT_KEYS = ("prompt_tokens", "promptTokens", "input_tokens", "inputTokens")
USAGE_OUTPUT_KEYS = ("completion_tokens", "completionTokens", "output_tokens", "outputTokens")
#: content-creator logs one line with this message per LLM call, tokens and cost in its meta.
CC_CHAT_COMPLETED = "Chat request completed"
#: The variable content-creator reads its model from; its log lines do not name the model.
CC_MODEL_ENV = "LLM_MODEL_NAME"
#: A token count above this is nonsense from a creator, not usage (and no SQLite integer).
MAX_REPORTED_TOKENS = 10**15
MODEL_NAME_CHARS = 200


def _token_count(values: dict[str, Any], keys: tuple[str, ...]) -> int:
    for key in keys:
        value = values.get(key)
        if (isinstance(value, (int, float)) and not isinstance(value, bool)
                and 0 <= value <= MAX_REPORTED_TOKENS):
            return int(value)
    return 0


def _reported_cost(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value) if value >= 0 else None
    return None


def json_usage(stdout: str) -> Usage | None:
    """The json adapter's usage: `usage` of the last JSON object (flat, in the HTTP envelope's
    `data`, or beside a structured error), with optional `model` and `cost` next to it."""
    data = _last_json_object(stdout)
    if data is None:
        return None
    if isinstance(data.get("data"), dict):
        data = {**data, **data["data"]}
    usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
    cost = _reported_cost(data.get("cost", usage.get("cost")))
    if not usage and cost is None:
        return None
    model = data.get("model") or usage.get("model")
    return Usage(_token_count(usage, USAGE_INPUT_KEYS), _token_count(usage, USAGE_OUTPUT_KEYS),
                 model[:MODEL_NAME_CHARS] if isinstance(model, str) else None, cost)


def content_creator_usage(output: str) -> Usage | None:
    """The sum of content-creator's `Chat request completed {...}` log lines, in its plain and
    its JSON log format; cost is the sum of the costs it printed (None if it printed none)."""
    calls = 0
    usage = Usage()
    for line in output.splitlines():
        if CC_CHAT_COMPLETED not in line:
            continue
        record = _cc_log_record(strip_ansi(line).strip())
        if record is None or CC_CHAT_COMPLETED not in record[1]:
            continue
        meta = record[2]
        calls += 1
        usage.tokens_in += _token_count(meta, USAGE_INPUT_KEYS)
        usage.tokens_out += _token_count(meta, USAGE_OUTPUT_KEYS)
        cost = _reported_cost(meta.get("cost"))
        if cost is not None:
            usage.cost = (usage.cost or 0.0) + cost
        if isinstance(meta.get("model"), str):
            usage.model = meta["model"][:MODEL_NAME_CHARS]
    return usage if calls else None


def attempt_usage(result: ProcessResult, output: str, default_model: str | None
                  ) -> Usage | None:
    """What one finished creator process reported spending, whatever its outcome."""
    if output == "content-creator-text":
        usage = content_creator_usage(result.stdout + "\n" + result.stderr)
    else:
        usage = json_usage(result.stdout)
    if usage is not None and usage.model is None:
        usage.model = default_model
    return usage


def price_usage(usage: Usage, budget: BudgetConfig, local_now: datetime) -> bool:
    """Give `usage` its cost and currency: the creator's own cost wins; else [budget.prices]
    for its model. False when neither knows (the tokens still count; the cost stays None)."""
    usage.currency = budget.currency
    if usage.cost is not None:
        return True
    price = budget.prices.get(usage.model or "")
    if price is None:
        return False
    usage.cost = price.cost(usage.tokens_in, usage.tokens_out, local_now)
    return True


def budget_windows(now: datetime, tz: ZoneInfo) -> tuple[datetime, datetime, datetime]:
    """The start of the current local day and month, and the start of the next day."""
    day = now.astimezone(tz).replace(hour=0, minute=0, second=0, microsecond=0)
    next_day = day + timedelta(days=1)
    return day, day.replace(day=1), next_day


def budget_gate(config: Config, now: datetime) -> BudgetGate | None:
    """The limits a claim must respect now; None when no budget is configured."""
    budget = config.budget
    accounts = {a.id: (a.daily_budget, a.monthly_budget) for a in config.accounts
                if a.daily_budget or a.monthly_budget}
    if not (budget.daily or budget.monthly or accounts):
        return None
    day, month, _ = budget_windows(now, ZoneInfo(config.daemon.timezone))
    return BudgetGate(to_db_time(day) or "", to_db_time(month) or "", budget.daily,
                      budget.monthly, accounts, budget.estimate, budget.currency)


class AdaptiveConcurrency:
    """How many creators may run while a provider's limit is unknown: a rate_limited result
    halves it (once per pause: the results of one burst arrive together), and every `limit`
    completions in a row without one add a slot back, up to the pool's size. Additive
    increase, multiplicative decrease, as TCP probes a link: the pool settles just under the
    limit instead of meeting it with every worker at once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.ceiling: int | None = None  #: None: the whole pool
        self._completions = 0
        self._cut_until = 0.0

    def limit(self, capacity: int) -> int:
        return capacity if self.ceiling is None else min(self.ceiling, capacity)

    def rate_limited(self, capacity: int, pause_s: float) -> int:
        """A creator was refused by its provider; the pool pauses `pause_s`. Returns the
        new limit."""
        now = self.clock()
        if now >= self._cut_until:
            self.ceiling = max(1, self.limit(capacity) // 2)
            self._cut_until = now + max(pause_s, 1.0)
        self._completions = 0
        return self.limit(capacity)

    def completed(self, capacity: int) -> None:
        if self.ceiling is None:
            return
        self._completions += 1
        if self._completions >= self.ceiling:
            self.ceiling, self._completions = self.ceiling + 1, 0
            if self.ceiling >= capacity:
                self.ceiling = None


class RateLimiter:
    """A token bucket for creator starts, shared by the whole pool: `rate` starts per second,
    evenly spaced (a bucket of one token), so a provider's per-second limit is never met in a
    burst. Rate 0 lets everything through."""

    def __init__(self, rate: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.rate = rate
        self.tokens = 1.0
        self.updated = clock()

    def set_rate(self, rate: float) -> None:
        self._refill()
        self.rate = rate

    def _refill(self) -> None:
        now = self.clock()
        if self.rate:
            self.tokens = min(1.0, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, wanted: int) -> int:
        """Up to `wanted` starts allowed now (each one spends a token)."""
        if not self.rate:
            return wanted
        self._refill()
        granted = min(wanted, int(self.tokens + BUDGET_EPSILON))
        self.tokens -= granted
        return granted

    def give_back(self, count: int) -> None:
        """Tokens taken for starts that found no task."""
        if self.rate and count > 0:
            self.tokens = min(1.0, self.tokens + count)

    def wait_s(self) -> float:
        """Seconds until the next start is allowed."""
        if not self.rate:
            return 0.0
        self._refill()
        return max(0.0, (1.0 - self.tokens) / self.rate)


# Executors #####################################################################################

#: Topic templates per category (as ContentHub had them): topic i of an account is
#: "{account_name} - {template} {i}", cycling through the category's templates.
TOPIC_TEMPLATES = {
    "技术": ("技术解析", "实践指南", "趋势分析"),
    "产品": ("产品评测", "使用体验", "功能介绍"),
    "运营": ("运营策略", "增长技巧", "案例分析"),
    "营销": ("营销方法", "获客策略", "转化优化"),
}
DEFAULT_TOPIC_FORMAT = "{account_name} - {template} {i}"


class ExecutorNotFound(ContentHubError):
    code = "not_found"


class InvalidParameters(ContentHubError):
    """An executor's params are wrong: at config load each problem is listed under this
    name; at run time (`task cleanup`) it is the control error."""

    code = "invalid"


@dataclass
class ExecutionResult:
    """What one executor run did (ContentHub's TaskExecutionResult)."""

    success: bool
    message: str
    data: dict[str, Any] | None = None
    error: str | None = None
    duration: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ExecutionContext:
    """What an executor may touch: the store, the config, and the run it belongs to."""

    store: Store
    config: Config
    environ: dict[str, str]
    now: datetime
    schedule_name: str = ""
    scheduled_for: datetime | None = None
    run_id: int | None = None
    wake_pool: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class ParamDoc:
    name: str
    type: str
    required: bool
    doc: str


class Executor:
    """Base of the registry: a type name, documented params, validation, and execute()."""

    executor_type = ""
    description = ""
    params: tuple[ParamDoc, ...] = ()

    def validate_params(self, params: dict[str, Any], config: Config) -> list[str]:
        """Every problem with `params`, in words an operator can act on; [] when fine."""
        known = {p.name for p in self.params}
        return [f"unknown parameter '{name}'" for name in params if name not in known]

    async def execute(self, ctx: ExecutionContext, params: dict[str, Any]) -> ExecutionResult:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"type": self.executor_type, "description": self.description,
                "params": [dataclasses.asdict(p) for p in self.params]}


def _check_type(problems: list[str], params: dict[str, Any], name: str, kind: type | tuple,
                what: str) -> Any:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        problems.append(f"'{name}' must be {what}, got {value!r}")
        return None
    return value


def _check_account_ids(problems: list[str], params: dict[str, Any], config: Config) -> list[Any]:
    """`account_ids`: a non-empty list of ids from [[accounts]]; [] when it is not a list."""
    accounts = config.accounts_by_id
    account_ids = _check_type(problems, params, "account_ids", list, "a list of account ids")
    if not account_ids:
        if "account_ids" not in params or account_ids == []:
            problems.append("'account_ids' is required: a non-empty list of account ids")
        return []
    for account_id in account_ids:
        if not isinstance(account_id, int) or isinstance(account_id, bool):
            problems.append(f"'account_ids' has a non-integer {account_id!r}")
        elif account_id not in accounts:
            problems.append(f"account {account_id} is not in [[accounts]]")
    return account_ids


class ContentGenerationExecutor(Executor):
    """Turns one firing into tasks: one per account x count (or per listed topic)."""

    executor_type = "async_content_generation"
    description = "Queue article generation tasks for accounts."
    params = (
        ParamDoc("account_ids", "list[int]", True, "accounts from [[accounts]]"),
        ParamDoc("count_per_account", "int", False, "articles per account (default 1)"),
        ParamDoc("category", "str", False, "技术|产品|运营|营销; default: the account's"),
        ParamDoc("topics", "list[{topic,keywords,requirements,tone}]", False,
                 "explicit topics; each account gets each topic"),
        ParamDoc("topic_format", "str", False,
                 "overrides \"{account_name} - {template} {i}\""),
        ParamDoc("keywords", "str", False, "comma-separated keywords for generated topics"),
        ParamDoc("requirements", "str", False, "writing requirements for every task"),
        ParamDoc("tone", "str", False, "tone for every task"),
        ParamDoc("target_audience", "str", False, "audience for every task"),
        ParamDoc("priority", "int", False, "0-10, default 5"),
        ParamDoc("auto_approve", "bool", False, "approve contents on completion"),
        ParamDoc("topic_source", "str", False,
                 "\"pool\": each account's oldest queued topics (contenthubctl topics)"),
    )

    def validate_params(self, params: dict[str, Any], config: Config) -> list[str]:
        problems = super().validate_params(params, config)
        accounts = config.accounts_by_id
        account_ids = _check_account_ids(problems, params, config)
        count = _check_type(problems, params, "count_per_account", int, "a positive integer")
        if count is not None and count < 1:
            problems.append("'count_per_account' must be at least 1")
        priority = _check_type(problems, params, "priority", int, "an integer 0-10")
        if priority is not None and not 0 <= priority <= 10:
            problems.append("'priority' must be between 0 and 10")
        _check_type(problems, params, "auto_approve", bool, "true or false")
        for name in ("category", "topic_format", "keywords", "requirements", "tone",
                     "target_audience"):
            _check_type(problems, params, name, str, "a string")
        topics = _check_type(problems, params, "topics", list, "a list of tables")
        for i, topic in enumerate(topics or []):
            if not isinstance(topic, dict) or not isinstance(topic.get("topic"), str) \
                    or not topic["topic"].strip():
                problems.append(f"'topics[{i}]' needs a non-empty 'topic' string")
                continue
            extra = set(topic) - {"topic", "keywords", "requirements", "tone", "category",
                                  "target_audience"}
            if extra:
                problems.append(f"'topics[{i}]' has unknown keys {sorted(extra)}")
        if not topics and "topic_format" not in params \
                and params.get("topic_source") != "pool":
            for account_id in account_ids:
                account = accounts.get(account_id)
                category = params.get("category") or (account.category if account else "")
                if account and category not in TOPIC_TEMPLATES:
                    problems.append(f"no topic templates for category {category!r} (account"
                                    f" {account_id}); use one of {', '.join(TOPIC_TEMPLATES)},"
                                    " or give 'topics' or 'topic_format'")
        for i, topic in enumerate(topics or []):
            if isinstance(topic, dict):
                problems += [f"'topics[{i}]': {p}" for p in check_task_fields(topic)]
        problems += check_task_fields(params)
        fmt = params.get("topic_format")
        if isinstance(fmt, str):
            try:
                numbered = (fmt.format(account_name="a", template="t", i=1, category="c")
                            != fmt.format(account_name="a", template="t", i=2, category="c"))
                if not numbered and config.daemon.topic_repeat_days:
                    problems.append("'topic_format' must use {i}: without a number every"
                                    " firing repeats the last one's topics, which"
                                    " topic_repeat_days refuses")
            except (KeyError, IndexError, ValueError) as exc:
                problems.append(f"'topic_format' has a bad placeholder: {exc}")
        source = params.get("topic_source")
        if source is not None and source != "pool":
            problems.append(f"'topic_source' must be \"pool\" (or left out: topics from"
                            f" 'topics', else from templates), got {source!r}")
        if source == "pool" and (topics or "topic_format" in params):
            problems.append("'topic_source = \"pool\"' takes topics from the pool; drop"
                            " 'topics' and 'topic_format'")
        total = len(account_ids) * (len(topics) if topics else (count or 1))
        if total > config.daemon.max_batch:
            problems.append(f"one firing would create {total} tasks, over max_batch ="
                            f" {config.daemon.max_batch}; raise [daemon] max_batch to allow it")
        return problems

    @staticmethod
    def plan_slots(params: dict[str, Any], ctx: ExecutionContext) -> list[TopicSlots]:
        """Each account's share of the firing, in a stable order (so dedup keys are stable);
        the Store picks the topics in the transaction that inserts the tasks."""
        config = ctx.config
        accounts = config.accounts_by_id
        slots = []
        for account_id in params["account_ids"]:
            account = accounts[account_id]
            category = params.get("category") or account.category
            fields = {"category": category, "keywords": params.get("keywords", ""),
                      "requirements": params.get("requirements", ""),
                      "tone": params.get("tone", ""),
                      "target_audience": params.get("target_audience", ""),
                      "priority": params.get("priority", 5),
                      "auto_approve": params.get("auto_approve", config.daemon.auto_approve),
                      "max_retries": config.daemon.max_retries, "schedule_run_id": ctx.run_id,
                      "origin": f"schedule {ctx.schedule_name}"}
            count = params.get("count_per_account", 1)
            if params.get("topic_source") == "pool":
                slots.append(TopicSlots(account_id, "pool", count, fields))
            elif params.get("topics"):
                slots.append(TopicSlots(account_id, "list", len(params["topics"]), fields,
                                        topics=list(params["topics"])))
            else:
                fmt = params.get("topic_format") or DEFAULT_TOPIC_FORMAT
                slots.append(TopicSlots(account_id, "template", count, fields,
                                        render=_template_topic(fmt, account.name, category),
                                        numbering=f"{category}:{fmt}"))
        return slots

    async def execute(self, ctx: ExecutionContext, params: dict[str, Any]) -> ExecutionResult:
        accounts = ctx.config.accounts_by_id
        slots = self.plan_slots(params, ctx)
        instant = to_db_time(ctx.scheduled_for or ctx.now)
        outcome = await ctx.store.add_firing(slots, ctx.run_id, ctx.schedule_name, instant,
                                             ctx.now, ctx.config.daemon.topic_repeat_days)
        ctx.wake_pool()
        queued = await ctx.store.tasks_for_run(ctx.run_id) if ctx.run_id else []
        from_pool = params.get("topic_source") == "pool"
        stats: dict[str, dict[str, Any]] = {}
        for slot in slots:
            report = outcome[slot.account_id]
            entry = stats[str(slot.account_id)] = {
                "account_name": accounts[slot.account_id].name, "success": 0, "failed": 0,
                "total": 0}
            if report["repeated"]:
                entry["topics_repeated"] = len(report["repeated"])
            if from_pool:
                entry["topics_short"] = report["short"]
        for task in queued:
            stats[str(task["account_id"])]["success"] += 1
            stats[str(task["account_id"])]["total"] += 1
        repeated = [{"account_id": account_id, "topic": topic}
                    for account_id, report in outcome.items() for topic in report["repeated"]]
        data: dict[str, Any] = {
            "total_submitted": len(queued),
            "total_failed": 0,
            "tasks": [{"task_id": t["task_id"], "account_id": t["account_id"],
                       "account_name": t["account_name"], "topic": t["topic"],
                       "category": t["category"]} for t in queued],
            "errors": [],
            "account_stats": stats,
            "topics_repeated": repeated,
        }
        message = f"Successfully submitted {len(queued)} async tasks for {len(stats)} accounts"
        if from_pool:
            data["topics_short"] = short = sum(report["short"] for report in outcome.values())
            if short:
                message += f"; the topic pool was {short} topic(s) short"
                log.warning("topics_short", schedule=ctx.schedule_name, short=short,
                            accounts=[a for a, r in outcome.items() if r["short"]])
        if repeated:
            message += f"; {len(repeated)} topic(s) left out as repeats"
        return ExecutionResult(True, message, data)


def _template_topic(fmt: str, account_name: str, category: str) -> Callable[[int], str]:
    """Topic number n of a template: the category's templates in rotation."""
    templates = TOPIC_TEMPLATES.get(category, ("",))

    def render(number: int) -> str:
        return fmt.format(account_name=account_name, template=templates[(number - 1)
                                                                        % len(templates)],
                          i=number, category=category)

    return render


def _published_url(stdout: str) -> str | None:
    """The `url` of the last JSON object a publisher printed, if any (docs/creators.md)."""
    data = _last_json_object(stdout)
    url = data.get("url") if data else None
    return url[:2000] if isinstance(url, str) and url.strip() else None


async def publish_content(store: Store, config: Config, environ: dict[str, str],
                          content: dict[str, Any], now: datetime,
                          actor: tuple[int | None, str] = (None, "contenthubd")
                          ) -> dict[str, Any]:
    """Run `[publish] command` for one content and record the outcome. The publisher reads
    the article as JSON on stdin, its saved images by absolute path (docs/creators.md)."""
    publish = config.publish
    media_dir = config.state_dir(environ) / MEDIA_DIR / str(content["id"])
    article = {**content, "media_dir": str(media_dir), "media": [
        {**item, "path": str(config.state_dir(environ) / item["path"]) if item["path"]
         else None} for item in content.get("media", ())]}
    argv = render_argv(publish.command, {
        "content_id": content["id"], "task_id": content["task_id"],
        "account_id": content["account_id"], "title": content["title"]})
    error = url = None
    try:
        result = await run_process(
            argv, stdin=json.dumps(article, ensure_ascii=False, default=str).encode(),
            env=child_environment(environ, {"CONTENTHUB_CONTENT_ID": str(content["id"]),
                                            "CONTENTHUB_MEDIA_DIR": str(media_dir)}),
            timeout=publish.timeout)
        error = result.failure(publish.timeout, 500)
        if error is None:
            url = _published_url(result.stdout)
    except OSError as exc:
        error = f"cannot run {argv[0]}: {exc}"
    status = await store.record_publish(content["id"], error is None, error,
                                        publish.max_attempts, now, url=url, actor=actor)
    log.info("content_publish_attempted", content_id=content["id"], status=status, url=url,
             error=error, by=actor[1])
    return {"content_id": content["id"], "publish_status": status, "published_url": url,
            "error": error}


class PublishExecutor(Executor):
    """Runs `[publish] command` for approved contents that are due, with retries."""

    executor_type = "publish"
    description = "Publish approved, due contents with [publish] command."
    params = (ParamDoc("limit", "int", False, "contents per run (default 20)"),)

    def validate_params(self, params: dict[str, Any], config: Config) -> list[str]:
        problems = super().validate_params(params, config)
        limit = _check_type(problems, params, "limit", int, "a positive integer")
        if limit is not None and limit < 1:
            problems.append("'limit' must be at least 1")
        if not config.publish.command:
            problems.append("[publish] command is not set")
        return problems

    async def execute(self, ctx: ExecutionContext, params: dict[str, Any]) -> ExecutionResult:
        publish = ctx.config.publish
        due = await ctx.store.due_for_publish(ctx.now, publish.max_attempts,
                                              params.get("limit", 20))
        counts = {"published": 0, "failed": 0, "retrying": 0}
        errors = []
        for content in due:
            outcome = await publish_content(ctx.store, ctx.config, ctx.environ, content,
                                            ctx.now)
            status = outcome["publish_status"]
            counts["published" if status == "published" else
                   "failed" if status == "failed" else "retrying"] += 1
            if outcome["error"]:
                errors.append({"content_id": content["id"], "error": outcome["error"]})
        return ExecutionResult(not errors, f"published {counts['published']} of {len(due)}",
                               {**counts, "errors": errors})


class CleanupExecutor(Executor):
    """ContentHub's retention job: prune old terminal tasks (articles are kept)."""

    executor_type = "cleanup"
    description = "Delete terminal tasks older than N days with their events."
    params = (ParamDoc("days", "int", False, "default: [daemon] retention_days"),
              ParamDoc("statuses", "list[str]", False, "default: all terminal statuses"),
              ParamDoc("dry_run", "bool", False, "count only"))

    def validate_params(self, params: dict[str, Any], config: Config) -> list[str]:
        problems = super().validate_params(params, config)
        days = _check_type(problems, params, "days", int, "a non-negative integer")
        if days is not None and days < 0:
            problems.append("'days' must not be negative")
        _check_type(problems, params, "dry_run", bool, "true or false")
        for status in _check_type(problems, params, "statuses", list, "a list") or []:
            if status not in TERMINAL_STATUSES:
                problems.append(f"'statuses' may hold only {', '.join(TERMINAL_STATUSES)};"
                                f" got {status!r}")
        return problems

    async def execute(self, ctx: ExecutionContext, params: dict[str, Any]) -> ExecutionResult:
        days = params.get("days", ctx.config.daemon.retention_days)
        statuses = params.get("statuses") or list(TERMINAL_STATUSES)
        cutoff = ctx.now - timedelta(days=days)
        dry_run = params.get("dry_run", False)
        count = await ctx.store.cleanup_tasks(cutoff, statuses, dry_run)
        verb = "would delete" if dry_run else "deleted"
        return ExecutionResult(True, f"{verb} {count} tasks older than {days} days",
                               {"matched": count, "deleted": 0 if dry_run else count,
                                "dry_run": dry_run, "cutoff": to_db_time(cutoff),
                                "statuses": statuses})


#: How many of an account's latest topics, titles and queued topics a research request
#: lists as taken.
RESEARCH_AVOID_LIMIT = 50
RESEARCH_OUTPUT_LIMIT = 1 << 20


def research_argv(config: Config, environ: dict[str, str]) -> list[str]:
    """`[creator] topics_command`, else the built-in research (`contenthubd research-topics`)
    with the `[creator.llm]` settings, whatever the creator kind."""
    if config.creator.topics_command:
        return config.creator.topics_command
    return builtin_argv("research-topics", config, environ)


class TopicResearchExecutor(Executor):
    """Fills accounts' topic pools: one research request per account (an LLM chat completion,
    or `[creator] topics_command`), its answer deduplicated against pool and history."""

    executor_type = "topic_research"
    description = "Research new topics into each account's pool ([creator.llm] or" \
                  " topics_command)."
    params = (
        ParamDoc("account_ids", "list[int]", True, "accounts from [[accounts]]"),
        ParamDoc("count", "int", True, "new topics wanted per account (1-100)"),
        ParamDoc("category", "str", False, "default: the account's"),
        ParamDoc("hint", "str", False, "a direction for the research, e.g. 新能源汽车"),
    )

    def validate_params(self, params: dict[str, Any], config: Config) -> list[str]:
        problems = super().validate_params(params, config)
        _check_account_ids(problems, params, config)
        count = _check_type(problems, params, "count", int, "an integer 1-100")
        if "count" not in params:
            problems.append("'count' is required: how many new topics per account")
        elif count is not None and not 1 <= count <= 100:
            problems.append("'count' must be between 1 and 100")
        for name in ("category", "hint"):
            _check_type(problems, params, name, str, "a string")
        return problems + check_task_fields(params)

    async def execute(self, ctx: ExecutionContext, params: dict[str, Any]) -> ExecutionResult:
        creator = ctx.config.creator
        if not creator.topics_command and not ctx.environ.get(creator.llm.api_key_env, "").strip():
            return ExecutionResult(False, "no topic research source: set the API key in"
                                   f" ${creator.llm.api_key_env} (for [creator.llm]) or"
                                   " [creator] topics_command; nothing was changed",
                                   error="offline")
        accounts = ctx.config.accounts_by_id
        env = creator_environment(creator, ctx.environ)
        report: dict[str, dict[str, Any]] = {}
        for account_id in params["account_ids"]:
            account = accounts[account_id]
            request = {"account_id": account_id, "account_name": account.name,
                       "category": params.get("category") or account.category,
                       "count": params["count"], "hint": params.get("hint", ""),
                       "avoid": await ctx.store.topics_to_avoid(account_id,
                                                                RESEARCH_AVOID_LIMIT)}
            entry = report[str(account_id)] = {"account_name": account.name, "added": [],
                                               "duplicates": [], "error": None}
            try:
                found = await self._research(ctx, request, env)
            except ContentHubError as exc:
                entry["error"] = scrub_secrets(str(exc), env)
                log.warning("topic_research_failed", account_id=account_id, error=entry["error"])
                continue
            topics = [{"account_id": account_id, "topic": topic["topic"],
                       "keywords": topic["keywords"],
                       "category": params.get("category", "")} for topic in found
                      if topic_key(topic["topic"]) and not check_task_fields(topic)]
            added = await ctx.store.add_topics(topics, "research", ctx.now,
                                               ctx.config.daemon.topic_repeat_days,
                                               limit=params["count"])
            entry.update(added)
        total = sum(len(entry["added"]) for entry in report.values())
        failed = [account_id for account_id, entry in report.items() if entry["error"]]
        message = f"added {total} researched topic(s) for {len(report)} account(s)"
        if failed:
            message += f"; research failed for account(s) {', '.join(failed)}"
        return ExecutionResult(not failed, message, {"total_added": total, "accounts": report},
                               error="; ".join(f"{a}: {report[a]['error']}" for a in failed)
                               or None)

    @staticmethod
    async def _research(ctx: ExecutionContext, request: dict[str, Any],
                        env: dict[str, str]) -> list[dict[str, str]]:
        """Run the research command for one account; its topics, or a ContentHubError."""
        creator = ctx.config.creator
        argv = render_argv(research_argv(ctx.config, ctx.environ), {
            name: request.get(name) for name in TOPICS_PLACEHOLDERS})
        try:
            result = await run_process(
                argv, stdin=json_text(request).encode(), env=env,
                cwd=ctx.config.creator_cwd(ctx.environ), timeout=creator.topics_timeout,
                max_output=RESEARCH_OUTPUT_LIMIT, kill_grace=creator.kill_grace)
        except OSError as exc:
            raise ContentHubError(f"cannot run {argv[0]}: {exc}") from None
        if result.timed_out:
            raise ContentHubError(f"{argv[0]} timed out after {creator.topics_timeout:g}s")
        if result.output_too_large:
            raise ContentHubError(f"{argv[0]} printed more than {RESEARCH_OUTPUT_LIMIT} bytes")
        if result.exit_code != 0:
            raise ContentHubError(f"{argv[0]} exited {result.exit_code}:"
                                  f" {result.stderr_tail(500)}")
        try:
            return parse_topic_reply(result.stdout)
        except ValueError as exc:
            raise ContentHubError(f"{argv[0]} printed no usable topics: {exc}") from None


class BackupExecutor(Executor):
    """A checked copy of the database into a folder, keeping the newest `keep` copies."""

    executor_type = "backup"
    description = "Copy the database (VACUUM INTO, checked) into dir; keep the newest N."
    params = (ParamDoc("dir", "str", True, "folder for the copies (created if missing)"),
              ParamDoc("keep", "int", False, "copies to keep, default 7"))

    def validate_params(self, params: dict[str, Any], config: Config) -> list[str]:
        problems = super().validate_params(params, config)
        if "dir" not in params:
            problems.append("'dir' is required")
        _check_type(problems, params, "dir", str, "a folder path")
        keep = _check_type(problems, params, "keep", int, "a positive integer")
        if keep is not None and keep < 1:
            problems.append("'keep' must be at least 1")
        return problems

    async def execute(self, ctx: ExecutionContext, params: dict[str, Any]) -> ExecutionResult:
        folder = Path(params["dir"])
        if not folder.is_absolute():
            folder = ctx.config.state_dir(ctx.environ) / folder
        folder.mkdir(parents=True, exist_ok=True)
        stamp = ctx.now.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
        copy = await ctx.store.backup_to(folder / f"contenthub-{stamp}.db")
        copies = sorted(p for p in folder.iterdir() if BACKUP_NAME_RE.match(p.name))
        removed = copies[:-params.get("keep", 7)]
        for old in removed:
            old.unlink(missing_ok=True)
        return ExecutionResult(True, f"backed up to {copy['path']} ({copy['bytes']} bytes);"
                                     f" removed {len(removed)} old copies",
                               {**copy, "removed": [str(p) for p in removed]})


EXECUTORS: dict[str, Executor] = {executor.executor_type: executor for executor in (
    ContentGenerationExecutor(), PublishExecutor(), CleanupExecutor(),
    TopicResearchExecutor(), BackupExecutor())}


def get_executor(executor_type: str) -> Executor:
    try:
        return EXECUTORS[executor_type]
    except KeyError:
        raise ExecutorNotFound(f"ExecutorNotFound: {executor_type}") from None

# Scheduler #####################################################################################

_UTC = UTC
_CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_CRON_ALLOWED = ("0-59", "0-23", "1-31", "1-12 or jan-dec", "0-7 or sun-sat")
#: One list item of a crontab(5) field; croniter's extensions (L, W, #, ?, H) do not match.
_CRON_ITEM = re.compile(r"(\*|(\d+|[a-z]{3})(-(\d+|[a-z]{3}))?)(/\d+)?", re.IGNORECASE)
_CRON_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: Any satisfiable cron expression matches within 8 years of this; used to reject "0 0 30 2 *".
_CRON_PROBE_START = datetime(2000, 1, 1)
_INTERVAL_UNIT_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_MIN_PERIOD = timedelta(seconds=1)
#: Less than the spacing of any two instants, for turning [a, b) into (a - tick, b - tick].
_TICK = timedelta(microseconds=1)


@dataclass(frozen=True)
class Trigger:
    """When a schedule fires: a cron expression in an IANA timezone, or a fixed period.

    Cron has crontab(5) meaning: five fields (minute hour day-of-month month day-of-week) with
    names, ranges, steps and lists; 0 and 7 are Sunday; when day-of-month and day-of-week are
    both restricted (neither starts with ``*``) a day matching either one fires, otherwise a day
    must match both; @hourly @daily @midnight @weekly @monthly @yearly @annually stand for their
    five fields. Fields match the wall clock in ``timezone``. Across DST changes:

    - A schedule whose hour field is fixed (``8``, ``1,13``, ``9-17``) follows the wall clock. A
      time that does not exist (spring-forward gap) fires once, at the end of the gap:
      ``30 2 * * *`` fires at 03:00 EDT in New York on 2026-03-08, and several times inside one
      gap are one firing. A time that occurs twice (fall-back overlap) fires once, at its first
      occurrence.
    - A schedule whose hour field is ``*`` or a step (``*/2``, ``1-23/2``) follows elapsed time:
      it fires at every real instant whose wall time matches, so ``0 * * * *`` fires 23 times on
      spring-forward day (the missing hour is skipped) and 25 times on fall-back day.

    This is Vixie cron's rule, except that Vixie decides by the minute *or* hour field starting
    with ``*``; deciding by the hour field alone keeps ``*/15 2 * * *`` firing once after the gap
    instead of not at all that day.

    Interval instants are ``anchor + k * period`` (k >= 1), anchored at the last scheduled
    instant, not at when the loop woke, so lateness never drifts the schedule. Without an anchor
    (a schedule that has never fired) the first instant is one period after ``after``: a new
    schedule does not fire the moment the daemon starts.

    Misfires: the cron loop takes every instant in (last scheduled, now] (`missed_instants`) and
    `plan_misfires` decides. The latest instant, if at most ``on_time`` old, is simply due and
    fires under every policy. The others are missed: ``skip`` records them all as missed;
    ``once`` fires only the latest one (unless an on-time one already fired), like systemd's
    ``Persistent=``; ``all`` fires each of them, at most ``max_catch_up`` in all, newest kept.
    With ``misfire_grace`` set, an instant older than the grace is never fired, only recorded.
    Whatever is not fired is recorded as missed; instants beyond the kept list are only counted.
    Overlap with a still-running previous firing is the caller's decision, not timing's.
    """

    timezone: str
    cron: str | None = None
    period: timedelta | None = None

    @functools.cached_property
    def timing_hash(self) -> str:
        """What schedule_state.config_hash compares: the timing alone, as parsed (`every =
        "60s"` and `"1m"` are one timing). Editing params, misfire or a description keeps the
        anchor. Cached: a reload compares it for every schedule."""
        period = None if self.period is None else self.period.total_seconds()
        text = json.dumps([self.timezone, self.cron, period])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def next_after(self, after_utc: datetime, anchor_utc: datetime | None = None) -> datetime:
        """The first fire instant strictly after `after_utc` (anchor: see the class docstring)."""
        return next(self.iter_after(after_utc, anchor_utc))

    def iter_after(
        self, after_utc: datetime, anchor_utc: datetime | None = None
    ) -> Iterator[datetime]:
        """Fire instants strictly after `after_utc`, in order, without end."""
        after = _as_utc(after_utc, "after_utc")
        if self.period is not None:
            anchor = after if anchor_utc is None else _as_utc(anchor_utc, "anchor_utc")
            return _interval_instants(anchor, self.period, after)
        return self._cron_instants(after)

    def _cron_instants(self, after: datetime) -> Iterator[datetime]:
        # Candidates come from croniter on naive wall times; each maps to zero, one or two UTC
        # instants. Their earliest instants never decrease, but in a fall-back overlap the second
        # occurrences of one hour interleave with the next hour's, so instants wait in a heap
        # until a candidate's earliest instant reaches them: no later candidate comes before.
        assert self.cron is not None  # interval triggers never get here
        zone = ZoneInfo(self.timezone)
        follows_elapsed = _hour_follows_elapsed_time(self.cron)
        local = after.astimezone(zone)
        # If `after` is in the first pass of an overlap, the repeated wall times come round again.
        rewind = ((local.utcoffset() or timedelta())
                  - (local.replace(fold=1).utcoffset() or timedelta()))
        candidates = croniter.croniter(
            self.cron, local.replace(tzinfo=None) - rewind, day_or=_cron_day_or(self.cron)
        )
        pending: list[datetime] = []
        last_yielded = None
        while True:
            instants = _wall_to_utc(candidates.get_next(datetime), zone, follows_elapsed)
            if not instants:
                continue
            for instant in instants:
                if instant > after:
                    heapq.heappush(pending, instant)
            while pending and pending[0] <= instants[0]:
                instant = heapq.heappop(pending)
                if instant != last_yielded:
                    yield instant
                    last_yielded = instant

    def count_between(self, after_utc: datetime, until_utc: datetime) -> int:
        """How many fire instants lie in (after_utc, until_utc], anchored at `after_utc`.

        Cron counts whole days arithmetically (minutes x hours per matching day) and walks
        instants only on the two edge days and on days with a UTC offset change.
        """
        after = _as_utc(after_utc, "after_utc")
        until = _as_utc(until_utc, "until_utc")
        if until <= after:
            return 0
        if self.period is not None:
            return (until - after) // self.period
        assert self.cron is not None  # a trigger has a period or a cron expression
        zone = ZoneInfo(self.timezone)
        first_day = after.astimezone(zone).date() + timedelta(days=1)
        end_day = until.astimezone(zone).date()
        first_start, end_start = _day_start(first_day, zone), _day_start(end_day, zone)
        if not after < first_start <= end_start <= until:
            return self._walk_count(after, until)
        _, _, dom, month, dow = self.cron.split()
        minutes, hours = croniter.croniter(self.cron).expanded[:2]
        per_day = (60 if minutes == ["*"] else len(minutes)) * (
            24 if hours == ["*"] else len(hours)
        )
        days = croniter.croniter(
            f"0 0 {dom} {month} {dow}",
            datetime(first_day.year, first_day.month, first_day.day) - _TICK,
            day_or=_cron_day_or(self.cron),
        )
        count = self._walk_count(after, first_start - _TICK)
        while (day := days.get_next(datetime).date()) < end_day:
            start, end = _day_start(day, zone), _day_start(day + timedelta(days=1), zone)
            if start.astimezone(zone).utcoffset() == end.astimezone(zone).utcoffset():
                count += per_day
            else:
                count += self._walk_count(start - _TICK, end - _TICK)
        return count + self._walk_count(end_start - _TICK, until)

    def _walk_count(self, after: datetime, until: datetime) -> int:
        return sum(1 for _ in takewhile(lambda instant: instant <= until, self.iter_after(after)))


def parse_trigger(
    cron: str | None,
    every: str | int | float | None,
    timezone: str,
    *,
    interval: int | float | None = None,
    interval_unit: str | None = None,
) -> Trigger:
    """A Trigger from a schedule's keys: cron, every, or ContentHub's interval + interval_unit."""
    given = [
        name
        for name, value in (("cron", cron), ("every", every), ("interval", interval))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(
            "a schedule needs exactly one of cron, every, or interval with interval_unit"
            + (f" (got {' and '.join(given)})" if given else "")
        )
    if interval_unit is not None and interval is None:
        raise ValueError("interval_unit is set but interval is missing")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise ValueError(
            f"unknown timezone {timezone!r}: use an IANA name such as 'Asia/Shanghai' or 'UTC'"
        ) from None
    if cron is not None:
        return Trigger(timezone=timezone, cron=_parse_cron(cron))
    if every is not None:
        try:
            seconds = parse_duration(every)
        except ValueError as error:
            raise ValueError(f"every: {error}") from None
        return Trigger(timezone=timezone, period=_period(seconds, f"every = {every!r}"))
    return Trigger(timezone=timezone, period=_seed_period(interval, interval_unit))


def _parse_cron(text: str) -> str:
    """The five-field form of a crontab(5) expression, or ValueError naming the bad part."""
    if not isinstance(text, str):
        raise ValueError(f"cron must be a string, got {text!r}")
    expression = text.strip()
    if expression.startswith("@"):
        macro = expression.lower()
        if macro == "@reboot":
            raise ValueError(
                "cron '@reboot' is not supported: schedules fire at recurring times, not at startup"
            )
        if macro not in _CRON_MACROS:
            raise ValueError(f"cron {text!r}: unknown macro; use one of {', '.join(_CRON_MACROS)}")
        expression = _CRON_MACROS[macro]
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"cron {text!r} must have 5 fields (minute hour day-of-month month day-of-week),"
            f" got {len(fields)}"
        )
    expression = " ".join(fields)
    day_or = _cron_day_or(expression)
    try:
        # One expansion validates every field; a field at a time only finds which one is bad.
        candidates = croniter.croniter(expression, _CRON_PROBE_START, day_or=day_or)
    except croniter.CroniterError:
        candidates = None
    if candidates is None or not all(
        _CRON_ITEM.fullmatch(item) for part in fields for item in part.split(",")
    ):
        for index, part in enumerate(fields):
            probe = ["*"] * 5
            probe[index] = part
            if not all(_CRON_ITEM.fullmatch(item) for item in part.split(",")) or not (
                croniter.croniter.is_valid(" ".join(probe))
            ):
                raise ValueError(
                    f"cron {text!r}: {_CRON_FIELDS[index]} field {part!r} is invalid"
                    f" (allowed: {_CRON_ALLOWED[index]}; lists with ',', ranges with '-',"
                    " steps with '/')"
                )
        candidates = croniter.croniter(expression, _CRON_PROBE_START, day_or=day_or)
    # Only a day-of-month within a restricted month ("0 0 30 2 *") can never come round; a
    # day-of-week OR-ed with the day-of-month comes every week.
    if fields[2] != "*" and fields[3] != "*" and not day_or:
        try:
            candidates.get_next(datetime)
        except croniter.CroniterBadDateError:
            raise ValueError(f"cron {text!r} never matches a real date") from None
    return expression


def _period(seconds: float, source: str) -> timedelta:
    period = timedelta(seconds=seconds)
    if period < _MIN_PERIOD:
        raise ValueError(f"{source}: the interval must be at least 1 second")
    return period


def _seed_period(interval: object, unit: object) -> timedelta:
    """ContentHub's `interval = 2, interval_unit = "hours"` form."""
    unit_name = unit.strip().lower().removesuffix("s") if isinstance(unit, str) else None
    if unit_name not in _INTERVAL_UNIT_S:
        units = ", ".join(f"{name}s" for name in _INTERVAL_UNIT_S)
        raise ValueError(f"interval_unit must be one of {units} (or singular), got {unit!r}")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        raise ValueError(f"interval must be a number, got {interval!r}")
    if not (math.isfinite(interval) and interval > 0):
        raise ValueError(f"interval must be positive, got {interval!r}")
    return _period(interval * _INTERVAL_UNIT_S[unit_name], f"interval = {interval!r} {unit}")


def _cron_day_or(expression: str) -> bool:
    """crontab(5): day-of-month OR day-of-week only when neither field starts with '*'."""
    fields = expression.split()
    return not (fields[2].startswith("*") or fields[4].startswith("*"))


def _hour_follows_elapsed_time(expression: str) -> bool:
    hour = expression.split()[1]
    return hour.startswith("*") or "/" in hour


def _as_utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value!r}")
    return value.astimezone(_UTC)


def _day_start(day: date, zone: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(_UTC)


def _wall_to_utc(wall: datetime, zone: ZoneInfo, follows_elapsed: bool) -> list[datetime]:
    """The UTC instants at which a matching naive wall time fires (see Trigger)."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(_UTC)
    second = wall.replace(tzinfo=zone, fold=1).astimezone(_UTC)
    if first == second:
        return [first]
    if first < second:  # occurs twice: the offset drops across a fall-back overlap
        return [first, second] if follows_elapsed else [first]
    # Does not exist: zoneinfo maps a gap time with the old offset (fold=0) past the
    # transition and with the new one (fold=1) before it.
    return [] if follows_elapsed else [_transition_between(second, first, zone)]


def _transition_between(before: datetime, after: datetime, zone: ZoneInfo) -> datetime:
    """The first whole UTC second in (before, after] with `after`'s offset.

    Bisection on whole seconds is exact because tz rules change offsets on whole seconds.
    """
    new_offset = after.astimezone(zone).utcoffset()
    while after - before > timedelta(seconds=1):
        middle = before + timedelta(seconds=(after - before).total_seconds() // 2)
        if middle.astimezone(zone).utcoffset() == new_offset:
            after = middle
        else:
            before = middle
    return after


def _interval_instants(anchor: datetime, period: timedelta, after: datetime) -> Iterator[datetime]:
    # k >= 1: never at or before the anchor, even if the clock went back behind it.
    instant = anchor + max(1, (after - anchor) // period + 1) * period
    while True:
        yield instant
        instant += period


def next_instants(
    trigger: Trigger, after_utc: datetime, count: int, anchor_utc: datetime | None = None
) -> list[datetime]:
    """The next `count` fire instants after `after_utc` (for `scheduler next --count N`)."""
    return list(islice(trigger.iter_after(after_utc, anchor_utc), count))


# Misfires: what to do with the instants a sleeping or stopped daemon did not see.

MISFIRE_POLICIES = ("skip", "once", "all")
#: An instant at most this old when the loop sees it is due, not missed (cron's resolution).
ON_TIME_TOLERANCE = timedelta(seconds=60)
#: First window before `now` walked for the latest missed instants; grows 8x until it holds them.
_LATEST_WINDOW = timedelta(hours=1)


def missed_instants(
    trigger: Trigger, last_scheduled_for_utc: datetime | None, now_utc: datetime, limit: int
) -> tuple[list[datetime], int]:
    """Instants in (last, now], the due one included: the latest `limit` in order, and the total.

    Interval instants are anchored at `last`. A schedule that never fired (`last` None) has
    missed nothing. The total is exact and cheap: a cron schedule down for a year is counted
    day by day, and only windows near `now` are walked to collect the kept instants.
    """
    if last_scheduled_for_utc is None:
        return [], 0
    last = _as_utc(last_scheduled_for_utc, "last_scheduled_for_utc")
    now = _as_utc(now_utc, "now_utc")
    total = trigger.count_between(last, now)
    if total <= limit:
        return list(islice(trigger.iter_after(last, last), total)), total
    if trigger.period is not None:
        first_kept = total - limit + 1
        return [last + k * trigger.period for k in range(first_kept, total + 1)], total
    window = _LATEST_WINDOW
    while True:
        start = max(last, now - window)
        found = list(takewhile(lambda instant: instant <= now, trigger.iter_after(start)))
        if len(found) >= limit:
            return found[len(found) - limit :], total
        window *= 8


@dataclass(frozen=True)
class MisfirePlan:
    """What to do with the instants `missed_instants` returned."""

    fire: tuple[datetime, ...]  #: fire these now, oldest first
    missed: tuple[datetime, ...]  #: record these as missed runs
    more_missed: int  #: missed instants older than the kept list: log the count only


def plan_misfires(
    policy: str,
    missed: list[datetime],
    total: int,
    now_utc: datetime,
    grace: timedelta | None,
    max_catch_up: int,
    *,
    on_time: timedelta = ON_TIME_TOLERANCE,
) -> MisfirePlan:
    """Apply a misfire policy (skip | once | all, stated on Trigger) to instants in (last, now]."""
    if policy not in MISFIRE_POLICIES:
        raise ValueError(f"misfire must be one of {', '.join(MISFIRE_POLICIES)}, got {policy!r}")
    if max_catch_up < 1:
        raise ValueError(f"max_catch_up must be at least 1, got {max_catch_up!r}")
    now = _as_utc(now_utc, "now_utc")
    due = [instant for instant in missed[-1:] if now - instant <= on_time]
    late = missed[: len(missed) - len(due)]
    within_grace = [instant for instant in late if grace is None or now - instant <= grace]
    if policy == "skip":
        fire = due
    elif policy == "once":
        fire = due or within_grace[-1:]
    else:
        fire = (within_grace + due)[-max_catch_up:]
    fired = set(fire)
    return MisfirePlan(
        fire=tuple(fire),
        missed=tuple(instant for instant in missed if instant not in fired),
        more_missed=total - len(missed),
    )


#: The loop never sleeps longer than this, so a wall-clock jump or a host that slept is
#: noticed within a minute; monotonic sleeps stop while the host is suspended.
MAX_SLEEP_S = 60.0
#: Wall minus monotonic time moving by more than this between two looks is a clock jump.
CLOCK_JUMP_THRESHOLD_S = 5.0
#: apply_config plans schedules for at most this long between two yields to the event loop.
PLAN_SLICE_S = 0.005


class ClockWatch:
    """Notices wall-clock jumps. Wall time minus monotonic time stays put while the clock just
    runs (NTP slews it by milliseconds); settimeofday, a large NTP step or a resumed host moves
    it at once."""

    def __init__(self, clock: Callable[[], datetime]):
        self.clock = clock
        self._offset = self._measure()

    def _measure(self) -> float:
        return self.clock().timestamp() - time.monotonic()

    def jumped(self) -> float:
        """Seconds the wall clock jumped since the last look (< 0: backwards), or 0.0."""
        offset = self._measure()
        jump, self._offset = offset - self._offset, offset
        return jump if abs(jump) > CLOCK_JUMP_THRESHOLD_S else 0.0


def schedule_trigger(schedule: ScheduleConfig, default_tz: str) -> Trigger:
    """`interval = "2m"` (a duration) means `every = "2m"`; a bare number is ContentHub's
    `interval = 2, interval_unit = "hours"` form and needs its unit."""
    interval, every = schedule.interval, schedule.every
    if isinstance(interval, str):
        if schedule.interval_unit:
            raise ValueError(f"interval = {interval!r} is a duration; drop interval_unit, or"
                             " give a number: interval = 2, interval_unit = \"hours\"")
        if every is not None:
            raise ValueError("interval and every are the same key; keep one")
        try:
            parse_duration(interval)
        except ValueError as error:
            raise ValueError(f"interval: {error}; or write every = \"2h\"") from None
        interval, every = None, interval
    elif interval is not None and not schedule.interval_unit and every is None and not (
            schedule.cron):
        raise ValueError(f"interval = {interval!r} needs interval_unit (seconds, minutes,"
                         " hours, days), or write it as every = \"2h\"")
    return parse_trigger(schedule.cron or None, every,
                         schedule.timezone or default_tz, interval=interval,
                         interval_unit=schedule.interval_unit or None)


def timing_key(schedule: ScheduleConfig, default_tz: str) -> tuple[Any, ...] | None:
    """What schedule_trigger reads, as a dict key; None when a value cannot be one (a list
    where a string belongs: schedule_trigger says what is wrong with it)."""
    key = (schedule.cron, schedule.every, schedule.interval, schedule.interval_unit,
           schedule.timezone or default_tz)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def known_trigger(schedule: ScheduleConfig, default_tz: str,
                  known: dict[tuple[Any, ...], Trigger] | None) -> Trigger:
    """schedule_trigger, or the one in `known` (triggers by timing_key) for the same timing;
    a trigger it parses is added to `known`. Parsing cron is most of a schedule's validation:
    start-up parses each timing once, a reload only the timings that changed."""
    key = timing_key(schedule, default_tz)
    if known is None or key is None:
        return schedule_trigger(schedule, default_tz)
    trigger = known.get(key)
    if trigger is None:
        trigger = known[key] = schedule_trigger(schedule, default_tz)
    return trigger


def _trigger_key(schedule: ScheduleConfig) -> str:
    """The key a trigger error is about, for its line number."""
    for key in ("cron", "every", "interval"):
        if getattr(schedule, key) not in (None, ""):
            return key
    return "cron"


def check_schedules(config: Config, known: dict[tuple[Any, ...], Trigger] | None = None,
                    checked: Config | None = None) -> list[str]:
    """Load-time validation of every schedule: trigger, executor, params (SPEC §8); each
    error names the entry's key and its line. `known`: see known_trigger. `checked`: a
    config that passed this check; the schedules `config` took from it unchanged (see
    parse_config's `previous`) are not checked again while the rest of the file is the
    same, since params are checked against the accounts and sections there."""
    errors = []
    passed = ({id(schedule) for schedule in checked.schedules}
              if checked is not None and checked.blocks is not None and config.blocks
              is not None and checked.blocks.rest == config.blocks.rest else set())
    unchecked = [(i, schedule) for i, schedule in enumerate(config.schedules)
                 if id(schedule) not in passed]
    for i, schedule in unchecked:
        def where(key: str, index: int = i) -> str:
            return entry_key_location(config, "schedules", index, key)

        name = f" {schedule.name!r}" if schedule.name else ""
        try:
            known_trigger(schedule, config.daemon.timezone, known)
        except ValueError as exc:
            errors.append(f"{where(_trigger_key(schedule))}{name}: {exc}")
        try:
            executor = get_executor(schedule.executor)
        except ExecutorNotFound as exc:
            errors.append(f"{where('executor')}{name}: {exc}")
            continue
        errors += [f"{where('params')}{name}: InvalidParameters: {problem}"
                   for problem in executor.validate_params(schedule.params, config)]
    for i, target in enumerate(config.notify):
        if "digest" in target.events:
            try:
                parse_trigger(target.digest_cron, None, config.daemon.timezone)
            except ValueError as exc:
                errors.append(f"{entry_key_location(config, 'notify', i, 'digest_cron')}: {exc}")
    return errors


@dataclass(slots=True)
class PlannedSchedule:
    config: ScheduleConfig
    trigger: Trigger
    paused: bool = False
    last_scheduled_for: datetime | None = None
    next_fire_at: datetime | None = None
    timing: tuple[Any, ...] | None = None  #: the timing_key `trigger` was found by

    @property
    def trigger_kind(self) -> str:
        return "cron" if self.config.cron else "interval"


class Scheduler(BackgroundLoop, FollowsConfig):
    """The cron loop.

    Semantics, stated once:
    - Instants come from the schedule's trigger in its IANA timezone (see parse_trigger for
      cron and DST rules). Interval schedules are anchored to the last scheduled instant.
    - Every instant is claimed in schedule_runs, UNIQUE(schedule_name, scheduled_for), before
      the executor runs; a run left 'firing' by a crash is resumed at start, and the
      executor's dedup keys make the resumed firing add only what is missing.
    - Misfires (daemon down, host asleep, clock jump): the instants since last_scheduled_for
      go through the schedule's policy: skip records them as missed, once fires the latest
      (within misfire_grace if set), all fires each (at most max_catch_up).
    - Overlap: skip records skipped_overlap while the previous run still has unfinished
      tasks; allow fires anyway.
    - A new schedule, or one whose timing (cron, every/interval, timezone) changed, starts
      from now: no catch-up for time before it existed. Other edits keep its anchor.
    - A paused schedule fires nothing; resuming skips what fell in the pause. An interval
      schedule stays on its anchor's grid (anchor + k * period).
    """

    loop_name = "cron-loop"

    def __init__(self, store: Store, live: LiveConfig, environ: dict[str, str],
                 wake_pool: Callable[[], None], clock: Callable[[], datetime] = utc_now,
                 triggers: dict[tuple[Any, ...], Trigger] | None = None):
        super().__init__()
        self.store = store
        self.live = live
        self.environ = environ
        self.wake_pool = wake_pool
        self.clock = clock
        self.schedules: dict[str, PlannedSchedule] = {}
        #: the planned schedules' triggers by timing_key (known_trigger); at first, those
        #: that validating the config at start-up parsed
        self.triggers: dict[tuple[Any, ...], Trigger] = triggers or {}
        self.clock_watch = ClockWatch(clock)
        #: told of a backward jump (seconds, now), to move the deadlines other parts keep
        self.on_clock_jump: Callable[[float, datetime], Awaitable[None]] | None = None

    async def _resume_interrupted(self) -> None:
        """Finish the firings a crash interrupted. The loop does it first, so a long one (a
        publish run) never holds up start-up. apply_config() must have planned the schedules
        (the App does it before opening the control socket)."""
        for run in await self.store.interrupted_runs():
            planned = self.schedules.get(run["schedule_name"])
            if planned is not None and self._running:
                log.warning("schedule_run_resumed", schedule=run["schedule_name"],
                            scheduled_for=run["scheduled_for"])
                await self._execute(planned, run["id"], from_db_time(run["scheduled_for"]))

    async def apply_config(self, config: Config) -> None:
        """(Re)plan every schedule; pause state is kept. A schedule already planned with the
        same timing keeps its anchor and its planned instant (its very entry when its config
        is the same object, as parse_config reuses unchanged ones), so a reload plans and
        writes only what changed."""
        timezone = config.daemon.timezone
        # Only schedules new to the plan read their saved state; at start-up, all at once.
        unplanned = [schedule.name for schedule in config.schedules
                     if schedule.enabled and schedule.name not in self.schedules]
        states = {} if not unplanned else await self.store.schedule_states(
            unplanned if self.schedules else None)
        now = self.clock()
        now_text = to_db_time(now)
        planned: dict[str, PlannedSchedule] = {}
        fresh: list[tuple[str, int, str, str | None]] = []
        known, triggers = dict(self.triggers), {}
        #: (trigger, anchor) -> next instant: schedules of one timing that fired together
        #: (or never) share it, and cron takes croniter a while
        next_instants: dict[tuple[Trigger, datetime], datetime] = {}
        yielded = time.monotonic()
        for schedule in config.schedules:
            if time.monotonic() - yielded > PLAN_SLICE_S:
                await asyncio.sleep(0)  # 10,000 schedules: let the loop answer meanwhile
                yielded = time.monotonic()
            if not schedule.enabled:
                continue
            previous = self.schedules.get(schedule.name)
            if (previous is not None and previous.config is schedule
                    and previous.trigger.timezone == (schedule.timezone or timezone)):
                # The same object in the same zone has the same timing: nothing to plan.
                planned[schedule.name] = previous
                if previous.timing is not None:
                    triggers[previous.timing] = previous.trigger
                continue
            key = timing_key(schedule, timezone)
            trigger = known_trigger(schedule, timezone, known)
            if key is not None:
                triggers[key] = trigger
            if previous is not None and previous.trigger == trigger:
                # Edited but not in its timing (or `every = "60s"` for "1m"): it keeps its
                # anchor and its planned instant.
                planned[schedule.name] = dataclasses.replace(previous, config=schedule,
                                                             timing=key)
                continue
            entry = PlannedSchedule(schedule, trigger, timing=key)
            state = states.get(schedule.name)
            digest = trigger.timing_hash
            # A new timing for a planned schedule, or one the database has no anchor for,
            # starts from now.
            if previous is not None or state is None or state["config_hash"] != digest:
                entry.last_scheduled_for = now
                entry.paused = previous.paused if previous is not None else bool(
                    state and state["paused"])
                fresh.append((schedule.name, int(entry.paused), digest, now_text))
            else:
                entry.paused = bool(state["paused"])
                entry.last_scheduled_for = from_db_time(state["last_scheduled_for"]) or now
            anchor = entry.last_scheduled_for
            if (trigger, anchor) not in next_instants:
                next_instants[trigger, anchor] = trigger.next_after(anchor, anchor)
            entry.next_fire_at = next_instants[trigger, anchor]
            planned[schedule.name] = entry
        await self.store.restart_schedule_states(fresh)
        self.schedules = planned
        self.triggers = triggers
        self._wake.set()

    @staticmethod
    def _plan_next(entry: PlannedSchedule, now: datetime) -> None:
        last = entry.last_scheduled_for or now
        entry.next_fire_at = entry.trigger.next_after(last, last)

    async def _clock_jumped(self, jump: float, now: datetime) -> None:
        """A forward jump is a misfire like any other (this look records or fires what it
        skipped). After a backward one, instants planned on the old clock would all come
        late by the jump: every schedule's last instant is brought back to now and its next
        one planned from there. Instants that already fired keep their runs, so
        UNIQUE(schedule_name, scheduled_for) stops them firing twice as the clock repeats."""
        log.warning("clock_jump", seconds=round(jump, 1),
                    direction="backward" if jump < 0 else "forward")
        if jump > 0:
            return
        for entry in self.schedules.values():
            if entry.last_scheduled_for is not None and entry.last_scheduled_for > now:
                entry.last_scheduled_for = now
            self._plan_next(entry, now)
        await self.store.rewind_schedule_states(now)
        if self.on_clock_jump is not None:
            await self.on_clock_jump(jump, now)

    async def _loop(self) -> None:
        await self._resume_interrupted()
        while self._running:
            self._wake.clear()
            now = self.clock()
            jump = self.clock_watch.jumped()
            if jump:
                try:
                    await self._clock_jumped(jump, now)
                except sqlite3.Error:
                    log.exception("clock_jump_not_applied")
            due = [e for e in self.schedules.values()
                   if not e.paused and e.next_fire_at is not None and e.next_fire_at <= now]
            for entry in due:
                try:
                    await self._fire_due(entry, now)
                except Exception:
                    log.exception("schedule_fire_failed", schedule=entry.config.name)
                    entry.last_scheduled_for = now
                self._plan_next(entry, now)
                with contextlib.suppress(sqlite3.Error):
                    await self.store.save_schedule_state(
                        entry.config.name, next_fire_at=to_db_time(entry.next_fire_at))
            if due:
                continue
            upcoming = [e.next_fire_at for e in self.schedules.values()
                        if not e.paused and e.next_fire_at is not None]
            delay = MAX_SLEEP_S
            if upcoming:
                delay = min(delay, max(0.0, (min(upcoming) - self.clock()).total_seconds()))
            await self._sleep(delay)

    async def _fire_due(self, entry: PlannedSchedule, now: datetime) -> None:
        schedule = entry.config
        catch_up = self.config.daemon.max_catch_up
        # One instant more than `all` may fire: the newest of those not fired is then always
        # in the list, so the record of what was missed can name its last instant.
        missed, total = missed_instants(entry.trigger, entry.last_scheduled_for, now,
                                        catch_up + 1)
        if not missed:
            return
        grace = timedelta(seconds=schedule.misfire_grace) if schedule.misfire_grace else None
        plan = plan_misfires(schedule.misfire, missed, total, now, grace, catch_up)
        if plan.missed:
            count = len(plan.missed) + plan.more_missed
            last = entry.last_scheduled_for or missed[0]
            log.warning("schedule_misfire", schedule=schedule.name, policy=schedule.misfire,
                        missed=count, firing=len(plan.fire))
            await self.store.record_missed_runs(
                schedule.name, list(plan.missed), now, entry.trigger_kind, count,
                plan.missed[0] if not plan.more_missed else entry.trigger.next_after(last, last),
                catch_up)
        for instant in plan.fire:
            on_time = instant == missed[-1] and now - instant <= ON_TIME_TOLERANCE
            await self.fire(entry, instant, entry.trigger_kind if on_time else "catch_up")
        entry.last_scheduled_for = max(missed[-1], entry.last_scheduled_for or missed[-1])

    async def fire(self, entry: PlannedSchedule, scheduled_for: datetime,
                   trigger: str) -> dict[str, Any]:
        """Claim one instant, apply the overlap policy, run the executor, record the run."""
        now = self.clock()
        run_id, state, busy = await self.store.begin_run(
            entry.config.name, scheduled_for, now, trigger,
            check_overlap=entry.config.overlap == "skip")
        if state != "new" and trigger == "manual":
            # Two triggers in one millisecond claim one instant: the second started nothing,
            # and says so rather than reporting the other's run as its own.
            return {"run_id": run_id, "status": state, "merged": True,
                    "message": f"another trigger in the same millisecond started run {run_id};"
                    " this one started nothing"}
        if state not in ("new", "firing"):
            return {"run_id": run_id, "status": state}
        if busy:
            result = ExecutionResult(False, "previous run still has unfinished tasks",
                                     error="skipped_overlap")
            await self.store.finish_run(run_id, "skipped_overlap", result.to_dict(),
                                        self.clock())
            log.info("schedule_skipped_overlap", schedule=entry.config.name)
            return {"run_id": run_id, "status": "skipped_overlap", "result": result.to_dict()}
        return await self._execute(entry, run_id, scheduled_for)

    async def _execute(self, entry: PlannedSchedule, run_id: int,
                       scheduled_for: datetime) -> dict[str, Any]:
        schedule = entry.config
        started = time.monotonic()
        ctx = ExecutionContext(self.store, self.config, self.environ, self.clock(),
                               schedule.name, scheduled_for, run_id, self.wake_pool)
        try:
            result = await get_executor(schedule.executor).execute(ctx, schedule.params)
        except Exception as exc:
            log.exception("executor_failed", schedule=schedule.name)
            result = ExecutionResult(False, "executor raised", error=f"{type(exc).__name__}:"
                                                                      f" {exc}")
        result.duration = round(time.monotonic() - started, 4)
        status = "fired" if result.success else "failed"
        await self.store.finish_run(run_id, status, result.to_dict(), self.clock())
        log.info("schedule_fired", schedule=schedule.name, run_id=run_id, status=status,
                 scheduled_for=to_db_time(scheduled_for), message=result.message)
        return {"run_id": run_id, "status": status, "result": result.to_dict()}

    # -- operator actions ----------------------------------------------------------------------

    def get(self, name: str) -> PlannedSchedule:
        try:
            return self.schedules[name]
        except KeyError:
            raise NotFound(f"no schedule {name!r}") from None

    async def set_paused(self, name: str, paused: bool) -> PlannedSchedule:
        entry = self.get(name)
        now = self.clock()
        entry.paused = paused
        if not paused:
            last = entry.last_scheduled_for or now
            period = entry.trigger.period
            if period is not None and last <= now:
                entry.last_scheduled_for = last + ((now - last) // period) * period
            else:
                entry.last_scheduled_for = max(last, now)
        self._plan_next(entry, now)
        await self.store.save_schedule_state(
            name, paused=int(paused), last_scheduled_for=to_db_time(entry.last_scheduled_for),
            next_fire_at=to_db_time(entry.next_fire_at))
        self._wake.set()
        return entry

    async def trigger_now(self, name: str) -> dict[str, Any]:
        entry = self.get(name)
        return await self.fire(entry, self.clock(), "manual")

    def describe(self, entry: PlannedSchedule,
                 last_run: dict[str, Any] | None = None) -> dict[str, Any]:
        """A schedule as `scheduler list` shows it. `last_scheduled_for` is the instant of its
        newest run, None until it has fired (the anchor of a fresh schedule is not a firing)."""
        schedule = entry.config
        return {"name": schedule.name, "executor": schedule.executor,
                "trigger": schedule.cron or f"every {schedule.every or schedule.interval}"
                           f"{(' ' + schedule.interval_unit) if schedule.interval_unit else ''}",
                "timezone": entry.trigger.timezone, "paused": entry.paused,
                "next_fire_at": None if entry.paused else to_db_time(entry.next_fire_at),
                "last_scheduled_for": last_run["scheduled_for"] if last_run else None,
                "last_status": last_run["status"] if last_run else None}

    async def describe_many(self, entries: list[PlannedSchedule]) -> list[dict[str, Any]]:
        runs = await self.store.last_runs(None if len(entries) > 1 else
                                          [e.config.name for e in entries])
        return [self.describe(entry, runs.get(entry.config.name)) for entry in entries]

# Media capture #################################################################################

MEDIA_CHUNK_BYTES = 64 << 10
MEDIA_RETRY_CAP_S = 6 * 3600.0  #: the longest wait between two attempts at one image
MEDIA_NAME_MAX = 60  #: characters of the source's own file name kept in the saved name
MEDIA_USER_AGENT = f"contenthubd/{__version__} (media capture)"
#: Image types a file extension may stand for when a creator printed a local path.
MEDIA_LOCAL_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                     ".gif": "image/gif", ".webp": "image/webp", ".svg": "image/svg+xml",
                     ".bmp": "image/bmp", ".avif": "image/avif"}
MEDIA_TYPE_EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif",
                         "image/webp": ".webp", "image/svg+xml": ".svg", "image/bmp": ".bmp",
                         "image/avif": ".avif"}


class MediaFailure(Exception):
    """One attempt at an image failed; `retryable` says whether a later attempt may work."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class SavedMedia:
    path: str  #: relative to state_dir
    size: int
    content_type: str


def _pinned_connection(https: bool, host: str, port: int, address: str,
                       timeout: float) -> http.client.HTTPConnection:
    """A connection already open to the address that was checked, not to whatever the name
    resolves to next (a second lookup could answer with a private address)."""
    sock = socket.create_connection((address, port), timeout)
    connection: http.client.HTTPConnection
    if https:
        tls = ssl.create_default_context()
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except OSError:
            sock.close()
            raise
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    connection.sock = sock  # http.client connects only when it has no socket
    return connection


def _media_name(position: int, source: str, content_type: str) -> str:
    """`<position>-<the source's own name>.<ext>`: readable, unique within the article."""
    stem = Path(urllib.parse.urlsplit(source).path if "://" in source else source).stem
    stem = re.sub(r"[^\w.-]+", "-", stem).strip("-.")[:MEDIA_NAME_MAX] or "image"
    extension = MEDIA_TYPE_EXTENSIONS.get(content_type) or ".img"
    return f"{position}-{stem}{extension}"


class MediaFetcher:
    """One image to a file, bounded: size, time, redirects, content type, and where it may
    come from. Runs in a worker thread (blocking sockets with timeouts)."""

    def __init__(self, config: MediaConfig, state_dir: Path, creator_cwd: Path):
        self.config = config
        self.state_dir = state_dir
        self.creator_cwd = creator_cwd
        self.networks = [ipaddress.ip_network(n, strict=False) for n in config.allow_private]

    def fetch(self, content_id: int, position: int, source: str) -> SavedMedia:
        target_dir = self.state_dir / MEDIA_DIR / str(content_id)
        if re.match(r"(?i)https?://", source):
            return self._download(source, target_dir, position)
        if _CC_URL_RE.match(source):  # data:, ftp:, file: ...
            raise MediaFailure(f"unsupported image reference {source[:80]!r}", False)
        return self._copy_local(source, target_dir, position)

    # -- local files a creator wrote ------------------------------------------------------------

    def _copy_local(self, source: str, target_dir: Path, position: int) -> SavedMedia:
        path = (self.creator_cwd / source).resolve()
        if not path.is_relative_to(self.creator_cwd.resolve()):
            raise MediaFailure(f"local image {source!r} is outside the creator's working"
                               f" directory {self.creator_cwd}", False)
        content_type = MEDIA_LOCAL_TYPES.get(path.suffix.lower())
        if content_type is None:
            raise MediaFailure(f"local file {source!r} does not have an image extension"
                               f" ({', '.join(MEDIA_LOCAL_TYPES)})", False)
        try:
            with open(path, "rb") as file:
                return self._store(target_dir, _media_name(position, source, content_type),
                                   content_type, iter(lambda: file.read(MEDIA_CHUNK_BYTES), b""))
        except FileNotFoundError:
            raise MediaFailure(f"local image {path} does not exist", False) from None
        except IsADirectoryError:
            raise MediaFailure(f"local image {path} is a directory", False) from None
        except PermissionError as exc:
            raise MediaFailure(f"cannot read local image {path}: {exc}", False) from None

    # -- downloads -------------------------------------------------------------------------------

    def _download(self, url: str, target_dir: Path, position: int) -> SavedMedia:
        deadline = time.monotonic() + self.config.timeout
        for _hop in range(self.config.max_redirects + 1):
            connection, response = self._request(url, deadline)
            try:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.getheader("Location")
                    if not location:
                        raise MediaFailure(f"HTTP {response.status} without a Location", False)
                    url = urllib.parse.urljoin(url, location)
                    continue
                if response.status != 200:
                    # A signed URL past its expiry answers 403: retrying cannot help.
                    retryable = response.status in (408, 425, 429) or response.status >= 500
                    raise MediaFailure(f"HTTP {response.status} {response.reason}".strip(),
                                       retryable)
                content_type = (response.getheader("Content-Type") or "").split(";")[0]
                content_type = content_type.strip().lower()
                if not content_type.startswith("image/"):
                    raise MediaFailure(f"content type {content_type or '(none)'!r} is not an"
                                       " image", False)
                length = response.getheader("Content-Length")
                if length and length.isdigit() and int(length) > self.config.max_bytes:
                    raise MediaFailure(f"image is {length} bytes; [media] max_bytes is"
                                       f" {self.config.max_bytes}", False)
                return self._store(target_dir, _media_name(position, url, content_type),
                                   content_type, self._body(response, deadline))
            except (OSError, http.client.HTTPException) as exc:
                raise MediaFailure(f"download failed: {exc}", True) from None
            finally:
                connection.close()
        raise MediaFailure(f"more than [media] max_redirects ({self.config.max_redirects})"
                           " redirects", False)

    def _body(self, response: http.client.HTTPResponse, deadline: float) -> Iterator[bytes]:
        while chunk := response.read(MEDIA_CHUNK_BYTES):
            if time.monotonic() > deadline:
                raise MediaFailure(f"download took longer than [media] timeout"
                                   f" ({self.config.timeout:.0f}s)", True)
            yield chunk

    def _request(self, url: str, deadline: float
                 ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme.lower() not in ("http", "https") or not host:
            raise MediaFailure(f"redirected to an unsupported URL {url[:120]!r}", False)
        if self.config.allowed_hosts and not any(
                host == allowed or host.endswith("." + allowed.lstrip("."))
                for allowed in self.config.allowed_hosts):
            raise MediaFailure(f"host {host!r} is not in [media] allowed_hosts", False)
        https = parts.scheme.lower() == "https"
        try:
            port = parts.port or (443 if https else 80)
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            raise MediaFailure(f"cannot resolve {host!r}: {exc}", True) from None
        address = str(addresses[0][4][0])
        for *_info, sockaddr in addresses:
            ip = ipaddress.ip_address(sockaddr[0])
            if not ip.is_global and not any(ip in network for network in self.networks):
                raise MediaFailure(f"{host} resolves to {ip}, a private, loopback or reserved"
                                   " address; list it in [media] allow_private to allow it",
                                   False)
        timeout = max(0.1, deadline - time.monotonic())
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        try:
            connection = _pinned_connection(https, host, port, address, timeout)
        except OSError as exc:
            raise MediaFailure(f"download failed: {exc}", True) from None
        try:
            connection.request("GET", target, headers={"User-Agent": MEDIA_USER_AGENT,
                                                       "Accept": "image/*"})
            return connection, connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise MediaFailure(f"download failed: {exc}", True) from None

    # -- files -----------------------------------------------------------------------------------

    def _store(self, target_dir: Path, name: str, content_type: str,
               chunks: Iterator[bytes]) -> SavedMedia:
        """Write to a temporary name, fsync, rename: a saved file is always whole."""
        target_dir.mkdir(parents=True, exist_ok=True)
        final = target_dir / name
        partial = target_dir / f".{name}.partial"
        size = 0
        try:
            with open(partial, "wb") as file:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.config.max_bytes:
                        raise MediaFailure(f"image is over [media] max_bytes"
                                           f" ({self.config.max_bytes} bytes)", False)
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, final)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return SavedMedia(str(final.relative_to(self.state_dir)), size, content_type)


class MediaCapture(BackgroundLoop, FollowsConfig):
    """Saves the images of completed articles before their URLs expire.

    A completion queues its images as `content_media` rows in its own transaction (so a
    kill -9 loses none, and the completion never waits on the network); this loop downloads
    or copies them, `concurrency` at a time, and records each outcome. A failed attempt is
    retried with exponential backoff (with jitter) up to `max_attempts`; an answer that no
    retry can change (403 on an expired URL, not an image, too large) fails at once.
    """

    loop_name = "media-capture"

    def __init__(self, store: Store, live: LiveConfig, environ: dict[str, str],
                 clock: Callable[[], datetime] = utc_now):
        super().__init__()
        self.store = store
        self.live = live
        self.environ = environ
        self.clock = clock
        self.apply_config(live.current)

    def apply_config(self, config: Config) -> None:
        self.state_dir = config.state_dir(self.environ)
        self.fetcher = MediaFetcher(config.media, self.state_dir,
                                    config.creator_cwd(self.environ))

    @property
    def root(self) -> Path:
        return self.state_dir / MEDIA_DIR

    def file_of(self, path: str | None) -> str | None:
        """A saved image's absolute path (the database keeps it relative to state_dir)."""
        return str(self.state_dir / path) if path else None

    async def start(self) -> None:
        await self._sweep_orphans()
        await super().start()

    async def stop(self) -> None:
        """Downloads under way are abandoned, not awaited: their rows stay pending and the
        next start takes them up again."""
        self._running = False
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None

    @staticmethod
    def _in_thread(work: Callable[..., Any], *args: Any) -> asyncio.Future:
        """`work` in a daemon thread of its own: a download that runs until its timeout must
        not hold up the exit (asyncio.to_thread's executor is joined when the loop closes)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run() -> None:
            try:
                outcome: tuple[bool, Any] = (True, work(*args))
            except BaseException as exc:
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_settle, future, *outcome)

        threading.Thread(target=run, name="media-fetch", daemon=True).start()
        return future

    async def remove(self, content_ids: list[int]) -> None:
        """Delete the media directories of articles that were deleted."""
        def remove_all() -> None:
            for content_id in content_ids:
                shutil.rmtree(self.root / str(content_id), ignore_errors=True)

        await asyncio.to_thread(remove_all)

    async def _sweep_orphans(self) -> None:
        """Directories of articles deleted just before a crash, and half-written files."""
        if not self.root.is_dir():
            return
        named = {int(entry.name): entry for entry in self.root.iterdir()
                 if entry.is_dir() and entry.name.isdigit()}
        kept = await self.store.existing_content_ids(list(named)) if named else set()
        await self.remove([content_id for content_id in named if content_id not in kept])
        for directory in (named[i] for i in kept):
            for partial in directory.glob(".*.partial"):
                partial.unlink(missing_ok=True)

    async def _loop(self) -> None:
        while self.is_running:
            self._wake.clear()
            try:
                due = await self.store.due_media(self.clock(), self.config.media.concurrency * 4)
                next_due = None if due else await self.store.next_media_due()
            except Exception:  # a damaged or vanished database: health says so; try later
                log.exception("media_queue_read_failed")
                await self._sleep(self.config.media.retry_backoff)
                continue
            if due:
                slots = asyncio.Semaphore(self.config.media.concurrency)
                outcomes = await asyncio.gather(*(self._capture(item, slots) for item in due),
                                                return_exceptions=True)
                errors = [str(o) for o in outcomes if isinstance(o, Exception)]
                if errors:  # their rows stay pending, to be tried again after a pause
                    log.error("media_outcome_not_recorded", errors=errors[:5])
                    await self._sleep(self.config.media.retry_backoff)
                continue
            await self._sleep(None if next_due is None else
                              max(0.0, (next_due - self.clock()).total_seconds()))

    async def _capture(self, item: dict[str, Any], slots: asyncio.Semaphore) -> None:
        media_log = log.bind(content_id=item["content_id"], url=item["url"][:200])
        async with slots:
            try:
                saved = await self._in_thread(self.fetcher.fetch, item["content_id"],
                                              item["position"], item["url"])
            except MediaFailure as exc:
                await self._failed(item, exc, media_log)
                return
            except Exception as exc:  # a bug must cost one image, not the loop
                media_log.exception("media_capture_crashed")
                await self._failed(item, MediaFailure(f"internal error: {exc}", True),
                                   media_log)
                return
        if await self.store.record_media(item["id"], self.clock(), status="saved",
                                         path=saved.path, size=saved.size,
                                         content_type=saved.content_type):
            media_log.info("media_saved", path=saved.path, bytes=saved.size)
        else:  # the article was deleted while its image downloaded
            saved_file = self.state_dir / saved.path
            saved_file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                saved_file.parent.rmdir()  # only if nothing else is left in it

    async def _failed(self, item: dict[str, Any], failure: MediaFailure, media_log: Any) -> None:
        attempts = item["attempts"] + 1
        retry_at = None
        if failure.retryable and attempts < self.config.media.max_attempts:
            delay = min(self.config.media.retry_backoff * 2 ** (attempts - 1), MEDIA_RETRY_CAP_S)
            retry_at = self.clock() + timedelta(seconds=delay * random.uniform(0.8, 1.2))
        await self.store.record_media(item["id"], self.clock(),
                                      status="pending" if retry_at else "failed",
                                      error=str(failure)[:500], retry_at=retry_at)
        media_log.warning("media_attempt_failed", error=str(failure)[:300], attempt=attempts,
                          retry_at=to_db_time(retry_at))


# Worker pool ###################################################################################


def _encoded(environ: dict[str, str]) -> dict[bytes, bytes]:
    return {os.fsencode(key): os.fsencode(value) for key, value in environ.items()}


def retry_delay(base_s: float, cap_s: float, retry_count: int) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, capped."""
    ceiling = min(cap_s, base_s * (2 ** retry_count))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def creator_argv(config: Config, environ: dict[str, str]) -> list[str]:
    """The argv template for a task: `[creator] command`, or the built-in creator."""
    if config.creator.kind == "builtin":
        return builtin_argv("create", config, environ)
    return config.creator.command


def task_values(task: dict[str, Any], default_requirements: str = "") -> dict[str, Any]:
    """Placeholder values for a task's argv, and the JSON its creator reads on stdin."""
    values = {name: task.get(name) for name in PLACEHOLDERS}
    values["requirements"] = values["requirements"] or default_requirements
    values["priority_level"] = priority_to_content_creator(int(task.get("priority") or 5))
    return values


@dataclass(frozen=True)
class CreatorSpawn:
    """How one creator process for a task is started."""

    argv: list[str]
    env: dict[bytes, bytes]
    cwd: Path
    stdin: bytes


@dataclass
class RunningTask:
    task: dict[str, Any]
    #: resolved to stop the creator (cancel or shutdown); a future, not an Event, so that
    #: run_process can wait on it without a task of its own
    stop: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop()
                                 .create_future())
    stop_reason: str = ""  #: "cancel" or "shutdown"
    pgid: int | None = None
    worker: asyncio.Task | None = None
    next_task: dict[str, Any] | None = None  #: claimed with this one's completion

    def request_stop(self) -> None:
        if not self.stop.done():
            self.stop.set_result(None)


#: Ended tasks are swept together, at most once per this: one /proc scan for a burst.
ORPHAN_SWEEP_INTERVAL_S = 1.0


class OrphanSweeper:
    """Kills every process still carrying a task's CONTENTHUB_TASK_ID once the task's attempt
    has ended (completed, failed, timed out, cancelled, stopped): a creator's descendant that
    escaped its process group (setsid) outlives the group kill, not this. Ended ids are
    batched so a burst of completions costs one /proc scan in a thread. A task running again
    by the time of the sweep (a retry) is left alone: its new creator carries the same id."""

    def __init__(self, is_running: Callable[[str], bool]) -> None:
        self.is_running = is_running
        self._ended: set[str] = set()
        self._pending = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    def task_ended(self, task_id: str) -> None:
        self._ended.add(task_id)
        self._pending.set()

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="orphan-sweeper")

    async def stop(self) -> None:
        """A last sweep for the tasks that ended during shutdown."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        await self._sweep()

    async def _loop(self) -> None:
        while True:
            await self._pending.wait()
            await self._sweep()
            await asyncio.sleep(ORPHAN_SWEEP_INTERVAL_S)

    async def _sweep(self) -> None:
        self._pending.clear()
        ended = set(self._ended)  # dropped only once swept: a cancelled sweep loses nothing
        if not ended:
            return
        found = await asyncio.to_thread(find_task_processes, ended)
        self._ended -= ended
        killed = kill_task_processes({task_id: processes for task_id, processes in found.items()
                                      if not self.is_running(task_id)})
        for task_id, pids in killed.items():
            log.warning("orphan_process_killed", task_id=task_id, pids=pids,
                        hint="a creator's descendant outlived the task (setsid?); it carried"
                        " CONTENTHUB_TASK_ID")


class WorkerPool(FollowsConfig):
    """Claims due tasks best-first and runs each creator in its own process group.

    At most `capacity` creators run at once (resizable live). The dispatcher sleeps on an
    event, woken by new work, a finished worker, or the next retry falling due; it never
    polls. Each outcome is one store transition fenced by the task's attempt number, so a
    cancel that lands while the creator finishes always wins.
    """

    def __init__(self, store: Store, live: LiveConfig, environ: dict[str, str],
                 clock: Callable[[], datetime] = utc_now):
        self.store = store
        self.live = live
        self.environ = environ
        self.clock = clock
        self.running: dict[str, RunningTask] = {}
        self.orphans = OrphanSweeper(lambda task_id: task_id in self.running)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._claiming = True
        self._dispatcher: asyncio.Task | None = None
        self._watchers: dict[str, set[asyncio.Queue]] = {}
        self.on_finished: Callable[[str, str], None] | None = None  #: (task_id, status) hook
        self.limiter = RateLimiter()
        #: fewer workers than `capacity` after a provider said rate_limited, growing back
        self.pacing = AdaptiveConcurrency()
        #: budgets that keep tasks waiting now ("daemon" or "account:<id>" -> why), from the
        #: latest claim
        self.budget_holds: dict[str, str] = {}
        self.unpriced_models: set[str] = set()  #: models seen without a price, warned once
        self.on_media_queued: Callable[[], None] | None = None  #: a completion queued images
        self.breaker = CircuitBreaker(clock)
        self._health_probe: asyncio.Task | None = None
        self.claims_paused_until: datetime | None = None
        self.pause_reason: str | None = None
        self.apply_config(live.current)

    @property
    def capacity(self) -> int:
        return self.config.daemon.max_concurrent_tasks

    def apply_config(self, config: Config) -> None:
        """Start and reload: new tasks use the new creator settings; running ones are
        untouched. What every task would otherwise recompute is derived here, once."""
        self.creator_cwd = config.creator_cwd(self.environ)
        self.creator_env = creator_environment(config.creator, self.environ)
        #: encoded once: Popen would encode every variable again for every child
        self.creator_env_bytes = _encoded(self.creator_env)
        self.limiter.set_rate(config.creator.rate_limit)
        #: the model an attempt used when its output does not say
        self.default_model = (config.creator.llm.model if config.creator.kind == "builtin"
                              else self.creator_env.get(CC_MODEL_ENV))
        self.breaker.probe_interval = config.creator.breaker_probe
        self.wake()

    async def start(self) -> None:
        stored = await self.store.load_breaker()
        if stored is not None and self.breaker.restore(stored):
            # The restart may be the fix, or not: one probe tells, not the whole queue.
            log.warning("creator_breaker_restored", error_class=self.breaker.error_class,
                        since=stored["since"], reason=self.breaker.reason,
                        hint="probing the creator before claiming tasks")
        await self.orphans.start()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="worker-pool")

    def wake(self) -> None:
        self._wake.set()

    # -- watchers: task.watch streams ----------------------------------------------------------

    def subscribe(self, task_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=256)
        self._watchers.setdefault(task_id, set()).add(queue)
        return queue

    def unsubscribe(self, task_id: str, queue: asyncio.Queue) -> None:
        watchers = self._watchers.get(task_id, set())
        watchers.discard(queue)
        if not watchers:
            self._watchers.pop(task_id, None)

    def publish(self, task_id: str, **event: Any) -> None:
        for watcher in self._watchers.get(task_id, ()):
            with contextlib.suppress(asyncio.QueueFull):
                watcher.put_nowait({"task_id": task_id, **event})

    # -- dispatch ------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while self._claiming:
            self._wake.clear()
            try:
                delay = await self._claim_free_slots()
            except Exception:
                log.exception("dispatch_failed")
                delay = 1.0
            if delay == 0.0:
                continue
            if delay is None:
                await self._wake.wait()  # the common case, without wait_for's extra task
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _claim_free_slots(self) -> float | None:
        """Start workers for due tasks; return how long the dispatcher may sleep (None: until
        woken, 0: claim again at once)."""
        free = self.pacing.limit(self.capacity) - len(self.running)
        if free <= 0 or not self._claiming:
            return None
        paused = self.claim_pause_remaining()
        if paused > 0:
            return paused
        limit = self.breaker.claim_limit
        if limit == 0:
            return self._probe_when_due()
        if limit is not None:
            free = min(free, limit)
        allowed = self.limiter.take(free)
        if not allowed:
            return self.limiter.wait_s()
        daemon = self.config.daemon
        now = self.clock()
        gate = budget_gate(self.config, now)
        claimed = await self.store.claim_next_tasks(allowed, now, daemon.task_timeout,
                                                    daemon.max_concurrent_per_account, gate)
        self._note_budget(gate)
        self.limiter.give_back(allowed - len(claimed))
        if claimed and self.breaker.state == "probing":
            self.breaker.probe_task = claimed[0]["task_id"]
            log.info("creator_probe_task", task_id=claimed[0]["task_id"])
        for task in claimed:
            self._start_worker(task)
        if len(claimed) == allowed:
            return 0.0 if allowed == free else self.limiter.wait_s()
        # A task that is due but was not claimed waits for a per-account slot (a finishing
        # worker wakes us) or for money: the next day (or a reload) may bring some. Only a
        # retry due in the future, or a budget window ending, needs a timer.
        due = await self.store.next_due_at()
        if due is not None and due > now:
            # Not due when claimed; it may be by now (a short backoff on a busy host), and
            # waiting for a wake-up would then sleep past it: claim again at once.
            remaining = max((due - self.clock()).total_seconds(), 0.0)
            if remaining == 0.0:
                return 0.0
        else:
            remaining = 0.0
        if self.budget_holds:
            _, _, next_day = budget_windows(now, ZoneInfo(self.config.daemon.timezone))
            until_window = (next_day - now).total_seconds()
            remaining = min(remaining, until_window) if remaining > 0 else until_window
        return remaining if remaining > 0 else None

    def _note_budget(self, gate: BudgetGate | None) -> None:
        """Keep the holds of the latest claim; log each budget once when it starts holding."""
        holds = gate.holds if gate is not None else {}
        for scope in holds.keys() - self.budget_holds.keys():
            log.warning("budget_exhausted", budget=scope, reason=holds[scope])
        for scope in self.budget_holds.keys() - holds.keys():
            log.info("budget_released", budget=scope)
        self.budget_holds = dict(holds)

    def waiting_reason(self, task: dict[str, Any]) -> str | None:
        """Why a pending task is not claimed although due: the budget holding it, if any."""
        if task.get("status") != "pending":
            return None
        return (self.budget_holds.get("daemon")
                or self.budget_holds.get(f"account:{task.get('account_id')}"))

    def _start_worker(self, task: dict[str, Any]) -> None:
        running = self._register(task)
        running.worker = asyncio.create_task(self._run(running), name=task["task_id"])

    def _register(self, task: dict[str, Any]) -> RunningTask:
        running = RunningTask(task, worker=asyncio.current_task())
        self.running[task["task_id"]] = running
        self._idle.clear()
        self.publish(task["task_id"], status="running", progress=None, stage=None)
        return running

    async def _run(self, running: RunningTask) -> None:
        """One worker: runs its task, then the next one claimed with its completion (one
        transaction instead of two while there is a backlog), until there is none."""
        try:
            while True:
                task_id = running.task["task_id"]
                status = await self._attempt_safely(running)
                self.running.pop(task_id, None)
                self.orphans.task_ended(task_id)
                self.finished(task_id, status)
                chained = running.next_task
                if chained is None:
                    break
                if not self._claiming:  # stop() began while this task completed
                    await self.store.requeue_tasks([chained["task_id"]], self.clock(),
                                                   "daemon stopping")
                    break
                running = self._register(chained)
        finally:
            if not self.running:
                self._idle.set()
            self.wake()

    async def _attempt_safely(self, running: RunningTask) -> str | None:
        task = running.task
        task_log = log.bind(task_id=task["task_id"], attempt=task["attempt"])
        try:
            return await self._attempt(running, task_log)
        except Exception:
            task_log.exception("worker_crashed")
            running.next_task = None
            return await self.store.fail_attempt(
                task["task_id"], task["attempt"], self.clock(), "internal", "daemon error"
                " while running the creator; see the daemon log", self._retry_delay(task))

    def finished(self, task_id: str, status: str | None) -> None:
        """Tell watchers and the App's hooks about a transition made outside a worker."""
        if status is not None:
            self.publish(task_id, status=status)
            if self.on_finished is not None and status in TERMINAL_STATUSES:
                self.on_finished(task_id, status)

    def _retry_delay(self, task: dict[str, Any]) -> float:
        """The task's backoff, doubled for every TRANSIENT_DEGRADED_STREAK transient failures
        in a row: a creator failing everything is given more room, but not stopped."""
        daemon = self.config.daemon
        strain = 2 ** min(self.breaker.transient_streak // TRANSIENT_DEGRADED_STREAK, 10)
        return retry_delay(daemon.retry_backoff * strain, daemon.retry_backoff_max,
                           task["retry_count"])

    # -- claim pause and circuit breaker -------------------------------------------------------

    def pause_claims(self, seconds: float | None, reason: str) -> float:
        """Claim nothing new for `seconds` (None: RATE_LIMIT_PAUSE_S; capped at
        RATE_LIMIT_PAUSE_MAX_S); a longer pause already in force stays. Running creators go
        on. The one place the pool is paused: rate_limited failures and pacing use it.
        Returns the pause applied, in seconds."""
        seconds = min(max(RATE_LIMIT_PAUSE_S if seconds is None else seconds, 0.0),
                      RATE_LIMIT_PAUSE_MAX_S)
        until = self.clock() + timedelta(seconds=seconds)
        if self.claims_paused_until is None or until > self.claims_paused_until:
            self.claims_paused_until, self.pause_reason = until, reason
            log.warning("claims_paused", seconds=seconds, reason=reason[:300])
        self.wake()
        return seconds

    def claim_pause_remaining(self) -> float:
        """Seconds until claiming resumes; 0 when it is not paused."""
        if self.claims_paused_until is None:
            return 0.0
        remaining = (self.claims_paused_until - self.clock()).total_seconds()
        if remaining <= 0:
            self.claims_paused_until = self.pause_reason = None
            return 0.0
        return remaining

    def _probe_when_due(self) -> float | None:
        """With the breaker open: start the probe once due (the health_command, else one
        task), else sleep until it is."""
        breaker = self.breaker
        if breaker.state != "open" or breaker.probe_at is None:
            return None
        remaining = (breaker.probe_at - self.clock()).total_seconds()
        if remaining > 0:
            return remaining
        breaker.begin_probe()
        if not self.config.creator.health_command:
            log.info("creator_probe", by="one task")
            return 0.0
        self._health_probe = asyncio.create_task(self._probe_health(), name="creator-probe")
        return None

    async def _recovered(self, how: str) -> None:
        log.info("creator_recovered", how=how)
        await self.store.notify_creator("creator.recovered", {
            "message": f"内容生成器已恢复（{how}），继续领取任务", "how": how}, self.clock(),
            self.breaker.snapshot())

    async def _probe_health(self) -> None:
        ok, detail = await self.run_health_command()
        was = self.breaker.state
        self.breaker.probe_result(ok, detail)
        if was != "closed" and self.breaker.state == "closed":
            await self._recovered("health_command probe succeeded")
        (log.info if ok else log.warning)("creator_probe", by="health_command", ok=ok,
                                          detail=detail[:300])
        self.wake()

    async def run_health_command(self) -> tuple[bool, str]:
        """The creator's health_command with a short timeout: (ok, its last line or why not)."""
        creator = self.config.creator
        if not creator.health_command:
            return True, f"{creator.kind} (no health_command)"
        try:
            result = await run_process(creator.health_command, cwd=self.creator_cwd,
                                       env=self.creator_env_bytes, timeout=creator.health_timeout,
                                       max_output=1 << 16)
        except OSError as exc:
            return False, f"cannot run {creator.health_command[0]}: {exc}"
        failure = result.failure(creator.health_timeout,
                                 detail=_cc_env_failure(strip_ansi(result.stderr).strip()))
        if failure is None:
            return True, (strip_ansi(result.stdout).strip().splitlines() or [""])[-1]
        return False, scrub_secrets(failure, self.creator_env)

    def creator_status(self) -> dict[str, Any]:
        status = self.breaker.describe()
        paused = self.claim_pause_remaining()
        status.update(claims_paused_s=round(paused, 1) if paused else 0,
                      pause_reason=self.pause_reason)
        return status

    async def resume_creator(self) -> dict[str, Any]:
        """`creator resume`: close the breaker and lift a claim pause; the queue drains."""
        was = self.breaker.state
        self.breaker.resume()
        self.claims_paused_until = self.pause_reason = None
        log.info("creator_resumed", was=was)
        if was != "closed":
            await self._recovered("operator resume")
        self.wake()
        return {"was": was, **self.creator_status()}

    async def run_creator_command(self, template: list[str], task: dict[str, Any], *,
                                  timeout: float, stop: asyncio.Future | None = None,
                                  on_line: Callable[[str], None] | None = None,
                                  on_spawn: Callable[[int], None] | None = None
                                  ) -> ProcessResult:
        """One creator command for a task (see creator_spawn)."""
        creator = self.config.creator
        spawn = self.creator_spawn(template, task)
        return await run_process(
            spawn.argv, cwd=spawn.cwd, env=spawn.env, timeout=timeout, stdin=spawn.stdin,
            max_output=creator.max_output, kill_grace=creator.kill_grace, stop=stop,
            on_stdout_line=on_line, on_spawn=on_spawn)

    def creator_spawn(self, template: list[str], task: dict[str, Any]) -> CreatorSpawn:
        """argv from the template, the task as JSON on stdin, CONTENTHUB_TASK_ID in the
        environment, in creator.cwd (with the data/ it needs)."""
        cwd = self.creator_cwd
        data_dir = os.path.join(cwd, "data")
        if not os.path.isdir(data_dir):  # content-creator dies without ./data
            os.makedirs(data_dir, exist_ok=True)
        values = task_values(task, self.config.creator.default_requirements)
        env = {**self.creator_env_bytes, b"CONTENTHUB_TASK_ID": task["task_id"].encode()}
        return CreatorSpawn(render_argv(template, values), env, cwd,
                            json_text(values).encode() + b"\n")

    async def run_status_batch(self, tasks: list[dict[str, Any]]) -> ProcessResult:
        """status_batch_command for many submitted tasks: {external_ids} becomes one argv
        element per job, and stdin holds one {"task_id", "external_id"} line per task."""
        creator = self.config.creator
        ids = [task["external_id"] for task in tasks]
        argv = [arg for part in creator.status_batch_command
                for arg in (ids if part == STATUS_BATCH_IDS else [part])]
        stdin = "".join(json_text({"task_id": task["task_id"], "external_id": task["external_id"]})
                        + "\n" for task in tasks)
        return await run_process(argv, cwd=self.creator_cwd, env=self.creator_env_bytes,
                                 timeout=POLL_COMMAND_TIMEOUT_S, stdin=stdin.encode(),
                                 max_output=creator.max_output, kill_grace=creator.kill_grace)

    async def _attempt(self, running: RunningTask, task_log: Any) -> str | None:
        """Run the creator (or submit to an asynchronous one) once and record the outcome;
        returns the task's new status."""
        task = running.task
        task_id, attempt = task["task_id"], task["attempt"]
        creator = self.config.creator
        last_progress: list[Any] = [None]

        def on_line(line: str) -> None:
            progress = progress_from_line(line)
            if progress is not None and progress != last_progress[0]:
                last_progress[0] = progress
                self.report_progress(task_id, attempt, *progress)

        recording: list[asyncio.Future] = []
        timers: list[asyncio.TimerHandle] = []

        def record_pid() -> None:
            assert running.pgid is not None  # set by on_spawn, which schedules this
            recording.append(asyncio.ensure_future(
                self.store.record_process(task_id, attempt, running.pgid)))

        def on_spawn(pid: int) -> None:
            # The pid is for operators (`task status`); recovery finds orphans by their
            # CONTENTHUB_TASK_ID. So only a creator still running after a second costs a write.
            running.pgid = pid
            timers.append(asyncio.get_running_loop().call_later(PID_RECORD_DELAY_S, record_pid))

        template = (creator.submit_command if creator.mode == "async"
                    else creator_argv(self.config, self.environ))
        try:
            result = await self.run_creator_command(
                template, task, timeout=self.config.daemon.task_timeout, stop=running.stop,
                on_line=on_line, on_spawn=on_spawn)
        except (OSError, ValueError) as exc:
            task_log.error("creator_spawn_failed", error=str(exc), argv0=template[0])
            if isinstance(exc, ValueError) or exc.errno == errno.E2BIG:
                spawn_failure = CreatorFailure(
                    "invalid_input", f"the task's fields cannot be passed to {template[0]}"
                    f" ({exc}); shorten the topic or requirements", False)
            else:  # a missing or unusable binary: every task would fail the same way
                spawn_failure = CreatorFailure("spawn_failed",
                                               f"cannot start {template[0]}: {exc}")
            return await self.record_outcome(task, spawn_failure, ProcessResult(None, "", "", 0.0),
                                             task_log, running)
        finally:
            for timer in timers:
                timer.cancel()
        await asyncio.gather(*recording)
        if result.stopped:
            self.breaker.release(task_id)
            if running.stop_reason == "shutdown":
                await self.store.requeue_tasks([task_id], self.clock(), "daemon stopping")
                task_log.info("task_interrupted", duration=round(result.duration, 3))
                return "pending"
            task_log.info("task_cancelled", duration=round(result.duration, 3))
            return None
        if creator.mode == "async" and not (result.exit_code or result.timed_out):
            external_id = parse_external_id(result.stdout)
            if external_id is not None:
                if await self.store.mark_submitted(task_id, attempt, external_id, self.clock()):
                    task_log.info("task_submitted_to_creator", external_id=external_id)
                    return "submitted"
                return None
            outcome: Article | CreatorFailure = CreatorFailure(
                "bad_output", "submit command printed no task id")
        else:
            outcome = classify_result(result, creator, self.creator_cwd)
        return await self.record_outcome(task, outcome, result, task_log, running)

    def report_progress(self, task_id: str, attempt: int, progress: int,
                        stage: str | None) -> None:
        self.publish(task_id, status="running", progress=progress, stage=stage)
        # Progress is advisory: a write lost at shutdown is not worth a warning.
        write = asyncio.ensure_future(self.store.record_progress(task_id, attempt, progress,
                                                                 stage))
        write.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def record_outcome(self, task: dict[str, Any], outcome: Article | CreatorFailure,
                             result: ProcessResult, task_log: Any,
                             running: RunningTask | None = None) -> str | None:
        """The one place an attempt's outcome becomes a transition: completed with its
        contents row, a retry, or a terminal failure."""
        task_id, attempt = task["task_id"], task["attempt"]
        usage = self._priced_usage(result, task_log)
        if isinstance(outcome, Article):
            row = article_row(outcome, task["topic"])
            if self.config.media.enabled:
                row["media"] = row["images"]
            daemon = self.config.daemon
            now = self.clock()
            gate = budget_gate(self.config, now)
            if self.breaker.record_success(task_id):
                await self._recovered(f"task {task_id} completed")
            before = self.pacing.limit(self.capacity)
            self.pacing.completed(self.capacity)
            if self.pacing.limit(self.capacity) != before:
                log.info("concurrency_raised", workers=self.pacing.limit(self.capacity),
                         of=self.capacity)
            then_claim = ({"limit": 1, "timeout_s": daemon.task_timeout,
                           "per_account_limit": daemon.max_concurrent_per_account,
                           "budget": gate}
                          if running is not None and self._claiming
                          and len(self.running) <= self.pacing.limit(self.capacity)
                          and self.breaker.claim_limit is None
                          and self.claim_pause_remaining() <= 0 and self.limiter.take(1)
                          else None)
            content_id, claimed = await self.store.complete_task(
                task_id, attempt, row, self._result_json(outcome, result), now,
                then_claim, usage)
            if then_claim is not None:
                self._note_budget(gate)
                self.limiter.give_back(1 - len(claimed))
            if claimed and running is not None:
                running.next_task = claimed[0]
            if content_id is not None and row.get("media") and self.on_media_queued:
                self.on_media_queued()
            task_log.info("task_completed", content_id=content_id, title=row["title"],
                          words=row["word_count"], duration=round(result.duration, 3),
                          **self._usage_fields(usage))
            return "completed" if content_id is not None else None
        outcome.message = scrub_secrets(outcome.message, self.creator_env)
        status = await self._record_failure(task, outcome, usage)
        if status in TERMINAL_STATUSES and outcome.draft is not None:
            task_log.info("draft_kept_for_review", error_class=outcome.error_class)
            if outcome.draft.images and self.config.media.enabled and self.on_media_queued:
                self.on_media_queued()
        task_log.warning("task_attempt_failed", error_kind=outcome.kind,
                         error_class=outcome.error_class, status=status,
                         exit_code=result.exit_code, duration=round(result.duration, 3),
                         error=outcome.message[:300], **self._usage_fields(usage))
        return status

    def _priced_usage(self, result: ProcessResult, task_log: Any) -> Usage | None:
        """The attempt's usage with its cost; a model without a price is warned about once."""
        usage = attempt_usage(result, self.config.creator.output, self.default_model)
        if usage is None:
            return None
        tz = ZoneInfo(self.config.daemon.timezone)
        if not price_usage(usage, self.config.budget, self.clock().astimezone(tz)):
            model = usage.model or ""
            if model not in self.unpriced_models:
                self.unpriced_models.add(model)
                task_log.warning("model_price_unknown", model=model or None,
                                 hint="add it to [budget.prices]; its cost counts as unknown")
        return usage

    @staticmethod
    def _usage_fields(usage: Usage | None) -> dict[str, Any]:
        if usage is None:
            return {}
        return {"tokens_in": usage.tokens_in, "tokens_out": usage.tokens_out,
                "model": usage.model, "cost": usage.cost}

    async def _record_failure(self, task: dict[str, Any], outcome: CreatorFailure,
                              usage: Usage | None) -> str | None:
        """A failed attempt by its class: rate_limited pauses the pool and creator-wide
        classes feed the circuit breaker, both without spending the task's retries; any other
        class retries with backoff or fails."""
        task_id, attempt = task["task_id"], task["attempt"]
        now, error_class = self.clock(), outcome.error_class
        was = self.breaker.state
        spend_retry, tripped = self.breaker.record_failure(task_id, error_class, outcome.message)
        if was != "closed" and self.breaker.state == "closed":
            await self._recovered(f"probe task {task_id} reached the creator ({error_class})")
        if error_class == "rate_limited":
            pause = self.pause_claims(outcome.retry_after, outcome.message)
            before = self.pacing.limit(self.capacity)
            if self.pacing.rate_limited(self.capacity, pause) != before:
                log.warning("concurrency_reduced", workers=self.pacing.limit(self.capacity),
                            of=self.capacity, hint="grows back as tasks complete")
            return await self.store.release_attempt(
                task_id, attempt, now, now + timedelta(seconds=pause), outcome.kind,
                error_class, outcome.message, f"rate limited, claims paused {pause:g}s",
                usage)
        if error_class in CREATOR_WIDE_CLASSES and not spend_retry:
            notify = None
            if tripped:
                log.error("creator_tripped", error_class=error_class, tasks=BREAKER_TRIP_TASKS,
                          reason=outcome.message, probe_in_s=self.breaker.probe_interval)
                notify = ("creator.tripped", {
                    "message": f"内容生成器已熔断（{error_class}），暂停领取任务："
                               f"{outcome.message}"[:500],
                    "error_class": error_class, "reason": outcome.message,
                    "failures": self.breaker.failures})
            # Closed: this task waits its backoff while another task confirms or clears the
            # failure. Open: it waits for the breaker, first in line again.
            delay = self._retry_delay(task) if self.breaker.state == "closed" else 0.0
            return await self.store.release_attempt(
                task_id, attempt, now, now + timedelta(seconds=delay), outcome.kind,
                error_class, outcome.message,
                "creator-wide failure" if self.breaker.state == "closed"
                else "circuit breaker open", usage, notify,
                self.breaker.snapshot() if tripped else None)
        retryable = outcome.retryable or error_class in CREATOR_WIDE_CLASSES
        draft = None
        if outcome.draft is not None:
            draft = article_row(outcome.draft, task["topic"])
            if self.config.media.enabled:
                draft["media"] = draft["images"]
        return await self.store.fail_attempt(
            task_id, attempt, now, outcome.kind, outcome.message,
            self._retry_delay(task) if retryable else None,
            "timeout" if outcome.kind == "timeout" else "failed", usage, error_class, draft)

    @staticmethod
    def _result_json(article: Article, result: ProcessResult) -> dict[str, Any]:
        return {"external_id": article.external_id, "duration_seconds": round(result.duration, 3),
                "exit_code": result.exit_code, **article.extra}

    # -- operator actions ----------------------------------------------------------------------

    async def cancel(self, task_id: str) -> dict[str, Any]:
        before = await self.store.cancel_task(task_id, self.clock())
        running = self.running.get(task_id)
        if running is not None:
            running.stop_reason = "cancel"
            running.request_stop()
        elif before["status"] == "submitted":
            await self.cancel_remote(before)
        self.finished(task_id, "cancelled")
        log.info("task_cancel_requested", task_id=task_id, was=before["status"])
        return before

    async def cancel_remote(self, task: dict[str, Any]) -> str | None:
        """Ask an asynchronous creator to drop a job; None when it did, else why not (logged,
        not fatal)."""
        template = self.config.creator.cancel_command
        if not template or not task.get("external_id"):
            return "no cancel_command" if not template else "no external id"
        try:
            result = await self.run_creator_command(template, task, timeout=POLL_COMMAND_TIMEOUT_S)
        except OSError as exc:
            log.warning("creator_cancel_failed", task_id=task["task_id"], error=str(exc))
            return f"cannot run {template[0]}: {exc}"
        failure = result.failure(POLL_COMMAND_TIMEOUT_S, 300)
        if failure is not None:
            log.warning("creator_cancel_failed", task_id=task["task_id"], error=failure)
        return failure

    async def stop(self, grace: float) -> None:
        """Stop claiming; give running creators `grace` seconds, then kill their groups and
        put their tasks back to pending without spending a retry."""
        self._claiming = False
        self.wake()
        if self._dispatcher is not None:
            await self._dispatcher
        if self._health_probe is not None:
            self._health_probe.cancel()
            await asyncio.gather(self._health_probe, return_exceptions=True)
        if self.running:
            log.info("waiting_for_running_tasks", count=len(self.running), grace_s=grace)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for running in list(self.running.values()):
            running.stop_reason = "shutdown"
            running.request_stop()
        workers = [r.worker for r in self.running.values() if r.worker is not None]
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        await self.orphans.stop()

    def kill_all_now(self) -> None:
        """Second stop signal: no grace, the groups die and recovery requeues at next start."""
        for running in self.running.values():
            if running.pgid:
                kill_process_group(running.pgid)



# Poll loop #####################################################################################

class PollLoop(BackgroundLoop, FollowsConfig):
    """Drives tasks that an asynchronous creator holds (status 'submitted').

    Every poll_interval (with ±10 % jitter, so many daemons do not poll in step) it runs the
    status command for the submitted tasks that are due, at most max_concurrent_tasks at once
    and POLL_ROUND_FACTOR times that per round; a job whose status did not change is polled
    half as often each time, down to once per POLL_BACKOFF_MAX poll intervals. With a
    status_batch_command, one run asks about up to STATUS_BATCH_MAX due jobs, and a job its
    reply leaves out is asked alone, within the same bound of commands per round. A finished
    job's result command goes through the same output adapter and record_outcome as a
    synchronous run. A job past task_timeout is cancelled remotely and times out. Submitted
    tasks survive a restart: only the polling cadence lives in memory.
    """

    loop_name = "poll-loop"

    def __init__(self, store: Store, live: LiveConfig, pool: WorkerPool,
                 clock: Callable[[], datetime] = utc_now):
        super().__init__()
        self.store = store
        self.live = live
        self.pool = pool
        self.clock = clock
        #: task_id -> (monotonic time of its next check, its interval, what the last one saw)
        self._cadence: dict[str, tuple[float, float, Any]] = {}

    async def _loop(self) -> None:
        while self._running:
            self._wake.clear()
            config = self.config
            base = config.daemon.poll_interval
            if config.creator.status_command:
                submitted = await self.store.list_tasks(status="submitted", limit=10_000,
                                                        order="submitted")
                self._cadence = {task["task_id"]: self._cadence[task["task_id"]]
                                 for task in submitted if task["task_id"] in self._cadence}
                now, wall = time.monotonic(), self.clock()
                due = [task for task in submitted
                       if self._cadence.get(task["task_id"], (0.0,))[0] <= now
                       or from_db_time(task["timeout_at"]) <= wall]
                await self._poll(due, config, base)
            await self._sleep(base * random.uniform(0.9, 1.1))

    async def _poll(self, due: list[dict[str, Any]], config: Config, base: float) -> None:
        """One round over the due jobs: at most POLL_ROUND_FACTOR x max_concurrent_tasks
        commands, max_concurrent_tasks at a time. Jobs past task_timeout are checked alone;
        a job left over waits for the next round, still due."""
        workers = config.daemon.max_concurrent_tasks
        calls = workers * POLL_ROUND_FACTOR
        slots = asyncio.Semaphore(workers)

        async def check(task: dict[str, Any], reply: ProcessResult | None = None) -> None:
            async with slots:
                seen = await self.check(task, reply)
            self._reschedule(task["task_id"], seen, base)

        if not config.creator.status_batch_command:
            await asyncio.gather(*(check(task) for task in due[:calls]))
            return
        wall = self.clock()
        expired = [task for task in due if from_db_time(task["timeout_at"]) <= wall][:calls]
        asked = [task for task in due if from_db_time(task["timeout_at"]) > wall]
        batches = [asked[start:start + STATUS_BATCH_MAX]
                   for start in range(0, len(asked), STATUS_BATCH_MAX)][:calls - len(expired)]
        unanswered: list[dict[str, Any]] = []

        async def batch(tasks: list[dict[str, Any]]) -> None:
            async with slots:
                replies = await self._status_batch(tasks)
            unanswered.extend(task for task in tasks if task["external_id"] not in replies)
            await asyncio.gather(*(check(task, replies[task["external_id"]])
                                   for task in tasks if task["external_id"] in replies))

        await asyncio.gather(*(check(task) for task in expired),
                             *(batch(tasks) for tasks in batches))
        # Left out of a reply: asked alone, as far as this round's commands go.
        await asyncio.gather(*(check(task) for task in
                               unanswered[:calls - len(expired) - len(batches)]))

    async def _status_batch(self, tasks: list[dict[str, Any]]) -> dict[str, ProcessResult]:
        """One status_batch_command run: each answered job's line as its status reply. A
        failed run answers none (each job is then asked alone)."""
        try:
            result = await self.pool.run_status_batch(tasks)
        except OSError as exc:
            log.error("status_batch_command_failed", jobs=len(tasks), error=str(exc))
            return {}
        failure = result.failure(POLL_COMMAND_TIMEOUT_S, 300)
        if failure is not None:
            log.warning("status_batch_command_failed", jobs=len(tasks), error=failure)
            return {}
        lines = parse_status_batch(result.stdout, {task["external_id"] for task in tasks})
        if len(lines) < len(tasks):
            log.info("status_batch_reply_incomplete", jobs=len(tasks), answered=len(lines))
        return {job: ProcessResult(0, line, "", result.duration) for job, line in lines.items()}

    def _reschedule(self, task_id: str, seen: Any, base: float) -> None:
        """Double a job's polling interval while what its status says stays the same."""
        previous = self._cadence.get(task_id)
        interval = (min(previous[1] * 2, base * POLL_BACKOFF_MAX)
                    if previous is not None and previous[2] == seen else base)
        self._cadence[task_id] = (time.monotonic() + interval * 0.95, interval, seen)

    async def check(self, task: dict[str, Any], reply: ProcessResult | None = None) -> Any:
        """One status check, or what a status_batch_command `reply` said of the job; returns
        what it saw while the job goes on (state and progress, or the failing status
        command's exit code), for the polling cadence."""
        creator = self.config.creator
        task_log = log.bind(task_id=task["task_id"], external_id=task["external_id"])
        try:
            if reply is None and from_db_time(task["timeout_at"]) <= self.clock():
                result = ProcessResult(None, "", "", 0.0)
                await self._record(task, await self._timed_out(task), result, task_log)
                return None
            result = reply or await self.pool.run_creator_command(
                creator.status_command, task, timeout=POLL_COMMAND_TIMEOUT_S)
            return await self._apply_status(task, result, task_log)
        except OSError as exc:
            task_log.error("poll_command_failed", error=str(exc))
            return ("poll_failed", str(exc))

    async def _apply_status(self, task: dict[str, Any], result: ProcessResult,
                            task_log: Any) -> Any:
        """What one status reply says of a job: queued or running (the task stays submitted,
        its remote_status follows), or final (the outcome is recorded)."""
        failure = result.failure(POLL_COMMAND_TIMEOUT_S, 300)
        if failure is not None:
            task_log.warning("status_command_failed", error=failure)
            await self._note_remote(task, "unknown", f"its status command failed ({failure})")
            return ("status_failed", result.exit_code)
        state, progress, message = parse_async_status(result.stdout)
        if state in ("queued", "running"):
            await self._note_remote(task, state, message or f"the creator says {state}")
            if state == "running" and progress is not None and progress != task["progress"]:
                self.pool.report_progress(task["task_id"], task["attempt"], progress, None)
            return (state, progress)
        await self._record(task, await self._final_outcome(task, state, message, result),
                           result, task_log)
        return None

    async def _note_remote(self, task: dict[str, Any], remote_status: str, detail: str) -> None:
        if task.get("remote_status") == remote_status:
            return
        if await self.store.record_remote_status(task["task_id"], task["attempt"],
                                                 remote_status, detail, self.clock()):
            task["remote_status"] = remote_status
            log.info("remote_status_changed", task_id=task["task_id"],
                     external_id=task["external_id"], remote_status=remote_status)
            self.pool.publish(task["task_id"], status="submitted", remote_status=remote_status)

    async def _record(self, task: dict[str, Any], outcome: Article | CreatorFailure,
                      result: ProcessResult, task_log: Any) -> None:
        status = await self.pool.record_outcome(task, outcome, result, task_log)
        self.pool.finished(task["task_id"], status)
        self.pool.wake()

    async def _final_outcome(self, task: dict[str, Any], state: str, message: str | None,
                             status_result: ProcessResult) -> Article | CreatorFailure:
        creator = self.config.creator
        if state == "failed":
            return CreatorFailure("creator_failed", message or "creator reported failure")
        if state == "cancelled":
            return CreatorFailure("creator_cancelled", message or "cancelled in the creator",
                                  False)
        if not creator.result_command:
            return classify_result(status_result, creator, self.pool.creator_cwd)
        # The remote job is done: a result that does not parse is read again, never
        # regenerated; a retry of the task would submit (and pay for) the article twice.
        failure = CreatorFailure("bad_output", "no result read")
        for reading in range(1, ASYNC_RESULT_READS + 1):
            result = await self.pool.run_creator_command(creator.result_command, task,
                                                         timeout=POLL_COMMAND_TIMEOUT_S)
            outcome = classify_result(result, creator, self.pool.creator_cwd)
            if isinstance(outcome, Article):
                return outcome
            failure = outcome
            log.warning("async_result_unusable", task_id=task["task_id"], reading=reading,
                        error=failure.message[:300])
            if reading < ASYNC_RESULT_READS:
                await asyncio.sleep(ASYNC_RESULT_REREAD_S * reading)
        return CreatorFailure(failure.kind, f"remote job {task['external_id']} completed but its"
                              f" result could not be read after {ASYNC_RESULT_READS} tries"
                              f" ({failure.message}); not resubmitted, which would generate it"
                              " again: fix the result command, then `task retry`", False,
                              failure.error_class)

    async def _timed_out(self, task: dict[str, Any]) -> CreatorFailure:
        """Past task_timeout: a retry may submit again only when the remote job is known to
        have stopped (its cancel succeeded, or its status is terminal); otherwise two jobs
        could run for one task, so the task ends with remote_unknown."""
        why = await self.pool.cancel_remote(task)
        if why is None:
            return CreatorFailure("timeout", "asynchronous creator did not finish within"
                                  " task_timeout; its job was cancelled")
        creator = self.config.creator
        try:
            status = await self.pool.run_creator_command(creator.status_command, task,
                                                         timeout=POLL_COMMAND_TIMEOUT_S)
            state = (parse_async_status(status.stdout)[0]
                     if not (status.exit_code or status.timed_out) else "unknown")
        except OSError:
            state = "unknown"
        if state in ("completed", "failed", "cancelled"):
            return CreatorFailure("timeout", "asynchronous creator did not finish within"
                                  f" task_timeout; its job is {state}")
        return CreatorFailure(
            "remote_unknown", f"asynchronous creator did not finish within task_timeout and"
            f" remote job {task['external_id']} may still be running (cancel failed: {why};"
            f" status: {state}); the task is not resubmitted so that the article cannot be"
            " generated twice: stop the job yourself, then `task retry`", False)

# Metrics #######################################################################################

#: (metric, help) for one gauge per `monitor.metrics` key.
PROMETHEUS_GAUGES = {
    "success_rate": ("contenthub_success_ratio",
                     "Completed tasks over finished ones (completed, failed, timeout)."),
    "attempt_success_rate": ("contenthub_attempt_success_ratio",
                             "Attempts that completed their task over all ended attempts."),
    "avg_completion_seconds": ("contenthub_avg_completion_seconds",
                               "Mean run time of the tasks completed in the last day."),
    "contents_total": ("contenthub_contents_total", "Contents in the content pool."),
    "pending_review": ("contenthub_contents_pending_review", "Contents awaiting review."),
    "workers_busy": ("contenthub_workers_busy", "Workers running a task now."),
    "workers_max": ("contenthub_workers_max", "Size of the worker pool."),
    "uptime_seconds": ("contenthub_uptime_seconds", "Seconds since the daemon started."),
}
#: contenthub_tasks{status=…} (now) from these metrics keys.
PROMETHEUS_TASK_KEYS = {"pending": "pending", "submitted": "submitted", "running": "running",
                        "completed": "completed", "failed": "failed_count",
                        "timeout": "timeout_count", "cancelled": "cancelled_count"}
#: How an attempt ended (schema.sql, migration 7): every class is exported from zero.
ATTEMPT_CLASSES = ("success", "retry", "interrupted", "failed", "timeout", "cancelled")
RUN_STATUSES = ("fired", "failed", "missed", "skipped_overlap")
#: Upper bounds of contenthub_task_duration_seconds; migration 14's trigger uses the same.
DURATION_BUCKETS_S = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
METRICS_TEXTFILE_EVERY_S = 15.0  #: metrics_textfile is rewritten this often, and on change
METRICS_TEXTFILE_MIN_GAP_S = 1.0  #: ...but not more often than this


def _prometheus_number(value: Any) -> str:
    if value is None:
        return "NaN"
    return str(int(value)) if isinstance(value, bool) else repr(value)


def _label(value: Any) -> str:
    """A label value as the exposition format quotes it."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _spend_lines(spend: dict[str, Any]) -> list[str]:
    """contenthub_tokens_total, contenthub_cost_total and contenthub_budget_remaining."""
    lines = ["# HELP contenthub_tokens_total LLM tokens the creators reported, every attempt.",
             "# TYPE contenthub_tokens_total counter"]
    for row in spend.get("tokens", []):
        for direction in ("in", "out"):
            lines.append(f'contenthub_tokens_total{{account="{_label(row["account_id"])}",'
                         f'model="{_label(row["model"])}",direction="{direction}"}}'
                         f' {_prometheus_number(row[f"tokens_{direction}"])}')
    lines += ["# HELP contenthub_cost_total LLM spend of every attempt with a known cost.",
              "# TYPE contenthub_cost_total counter"]
    lines += [f'contenthub_cost_total{{account="{_label(row["account_id"])}",'
              f'currency="{_label(row["currency"])}"}} {_prometheus_number(row["cost"])}'
              for row in spend.get("cost", [])]
    lines += ["# HELP contenthub_budget_remaining What a budget has left in its current day or"
              " month (account empty: the daemon's budget).",
              "# TYPE contenthub_budget_remaining gauge"]
    lines += [f'contenthub_budget_remaining{{account="{_label(row["account"])}",'
              f'window="{row["window"]}",currency="{_label(spend.get("currency", ""))}"}}'
              f' {_prometheus_number(row["value"])}' for row in spend.get("budget_remaining", [])]
    return lines


def prometheus_text(metrics: dict[str, Any], counters: dict[str, int],
                    last_runs: dict[str, dict[str, Any]], schedules: list[str]) -> str:
    """The text exposition format (for node_exporter's textfile collector or a scrape).
    Every series an alert may name exists from the start, at 0."""
    lines = ["# HELP contenthub_up Whether contenthubd answered the metrics request.",
             "# TYPE contenthub_up gauge", "contenthub_up 1",
             "# HELP contenthub_tasks Tasks by status, now.", "# TYPE contenthub_tasks gauge"]
    lines += [f'contenthub_tasks{{status="{status}"}} {_prometheus_number(metrics[key])}'
              for status, key in PROMETHEUS_TASK_KEYS.items() if key in metrics]
    for key, (name, help_text) in PROMETHEUS_GAUGES.items():
        if key in metrics:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
                      f"{name} {_prometheus_number(metrics[key])}"]

    def counter(name: str, help_text: str, samples: list[tuple[str, int]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} counter"])
        lines.extend(f"{name}{{{labels}}} {value}" for labels, value in samples)

    counter("contenthub_tasks_total", "Tasks that reached a final status.",
            [(f'status="{status}"', counters.get(f"finished:{status}", 0))
             for status in TERMINAL_STATUSES])
    counter("contenthub_task_attempts_total", "Creator attempts by how they ended.",
            [(f'class="{kind}"', counters.get(f"attempt:{kind}", 0)) for kind in ATTEMPT_CLASSES])
    counter("contenthub_schedule_runs_total", "Schedule runs by outcome.",
            [(f'schedule="{_label(name)}",status="{status}"',
              counters.get(f"run:{status}:{name}", 0))
             for name in schedules for status in RUN_STATUSES])
    name = "contenthub_task_duration_seconds"
    lines += [f"# HELP {name} Run time of completed tasks (their last attempt).",
              f"# TYPE {name} histogram"]
    # Stored per bucket (a completion adds to one); Prometheus buckets are cumulative.
    count = 0
    for le in DURATION_BUCKETS_S:
        count += counters.get(f"duration_in:{le}", 0)
        lines.append(f'{name}_bucket{{le="{le}"}} {count}')
    count += counters.get("duration_in:inf", 0)
    lines += [f'{name}_bucket{{le="+Inf"}} {count}',
              f"{name}_sum {counters.get('duration_ms_sum', 0) / 1000:g}", f"{name}_count {count}"]
    name = "contenthub_schedule_last_success_timestamp_seconds"
    lines += [f"# HELP {name} When the schedule last fired successfully (0: never).",
              f"# TYPE {name} gauge"]
    lines += [f'{name}{{schedule="{_label(s)}"}} {counters.get(f"last_success:{s}", 0)}'
              for s in schedules]
    name = "contenthub_schedule_last_run_status"
    lines += [f"# HELP {name} 1 if the schedule's newest run fired, 0 if it failed, was missed"
              " or skipped, or there is none.", f"# TYPE {name} gauge"]
    lines += [f'{name}{{schedule="{_label(s)}"}}'
              f' {int((last_runs.get(s) or {}).get("status") == "fired")}' for s in schedules]
    if "spend" in metrics:
        lines += _spend_lines(metrics["spend"])
    return "\n".join(lines) + "\n"


# Control server ################################################################################

TIME_FIELDS = {"submitted_at", "started_at", "completed_at", "timeout_at", "next_attempt_at",
               "created_at", "updated_at", "at", "scheduled_publish_at", "published_at",
               "scheduled_for", "fired_at", "last_scheduled_for", "next_fire_at", "cutoff",
               "added_at", "used_at", "sent_at"}
JSON_FIELDS = {"images", "quality", "result", "params"}
BOOL_FIELDS = {"auto_approve", "paused", "enabled"}
COMMAND_GROUPS = ("content", "task", "monitor", "scheduler", "topics", "db", "creator",
                  "notify")
#: Commands whose handler also gets the caller (uid, user name): they record who acted.
PEER_COMMANDS = frozenset({"content.approve", "content.reject", "content.publish"})


def present(value: Any, tz: ZoneInfo) -> Any:
    """A store row as the protocol shows it: local times, parsed JSON, real booleans."""
    if isinstance(value, list):
        return [present(item, tz) for item in value]
    if not isinstance(value, dict):
        return value
    shown = {}
    for key, item in value.items():
        if key in TIME_FIELDS and isinstance(item, str):
            item = from_db_time(item).astimezone(tz).isoformat(timespec="seconds")
        elif key in JSON_FIELDS and isinstance(item, str):
            with contextlib.suppress(ValueError):
                item = json.loads(item)
        elif key in BOOL_FIELDS and item is not None:
            item = bool(item)
        elif isinstance(item, (dict, list)):
            item = present(item, tz)
        shown[key] = item
    return shown


def arg(args: dict[str, Any], name: str, kind: type | tuple, *, required: bool = False,
        default: Any = None, choices: tuple | None = None, minimum: int | None = None,
        maximum: int | None = None) -> Any:
    """One validated argument of a control request; InvalidRequest names what was wrong."""
    if name not in args or args[name] is None:
        if required:
            raise InvalidRequest(f"missing argument '{name}'")
        return default
    value = args[name]
    if isinstance(value, int) and not -(1 << 63) <= value < (1 << 63):
        raise InvalidRequest(f"argument '{name}' is out of range")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise InvalidRequest(f"argument '{name}' must be {names}, got {value!r}")
    if choices is not None and value not in choices:
        raise InvalidRequest(f"argument '{name}' must be one of {', '.join(map(str, choices))}")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        raise InvalidRequest(f"argument '{name}' must be between {minimum} and {maximum}")
    return value


def _strict_json(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
        return True
    except (ValueError, UnicodeEncodeError):
        return False


def content_ids(values: list[Any], kind: str = "content") -> list[int]:
    """The `ids` argument: content (or topic) ids are positive 64-bit integers."""
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < (1 << 63)
               for i in values):
        raise InvalidRequest(f"argument 'ids' must be a list of {kind} ids (positive integers)")
    return values


def peer_name(uid: int) -> tuple[int, str]:
    """(uid, user name) of a control-socket peer, as review history records who acted."""
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, f"uid {uid}"


def peer_allowed(sock: socket.socket, group: str) -> tuple[bool, int]:
    """SO_PEERCRED: root, the daemon's own user, or members of `socket_group`."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, gid = struct.unpack("3i", creds)
    if uid in (0, os.getuid()):
        return True, uid
    if group:
        with contextlib.suppress(KeyError):
            entry = grp.getgrnam(group)
            if gid == entry.gr_gid or pwd.getpwuid(uid).pw_name in entry.gr_mem:
                return True, uid
    return False, uid


IDEMPOTENCY_KEY_MAX = 200


def idempotency_key(args: dict[str, Any]) -> str | None:
    """The optional `idempotency_key` argument: 1-200 printable characters."""
    key = arg(args, "idempotency_key", str)
    if key is not None and not (0 < len(key) <= IDEMPOTENCY_KEY_MAX and key.isprintable()):
        raise InvalidRequest(f"argument 'idempotency_key' must be 1-{IDEMPOTENCY_KEY_MAX}"
                             " printable characters")
    return key


CSV_COLUMNS = ("account_id", "topic", "keywords", "priority", "auto_approve", "requirements",
               "tone", "category", "target_audience")
CSV_TRUE = ("true", "1", "yes", "y")
CSV_FALSE = ("false", "0", "no", "n", "")


def bad_rows(errors: list[dict[str, Any]]) -> int:
    """Rows with at least one error: a row with three bad fields is one bad row."""
    return len({error["line"] for error in errors})


#: parse_task_csv and parse_topic_csv: (text, enabled account ids) -> (rows, errors by line)
CsvParser = Callable[[str, set[int]], tuple[list[dict[str, Any]], list[dict[str, Any]]]]


def parse_task_csv(text: str, accounts: set[int]) -> tuple[list[dict[str, Any]],
                                                           list[dict[str, Any]]]:
    """Tasks from a bulk-import CSV (ContentHub's columns + requirements, tone, category,
    target_audience), and every error as {line, column, message}."""
    import csv
    import io

    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    errors = []
    unknown = [c for c in header if c not in CSV_COLUMNS]
    for column in sorted({c for c in header if header.count(c) > 1}):
        errors.append({"line": 1, "column": column, "message": "column appears more than once"})
    missing = [c for c in ("account_id", "topic") if c not in header]
    for column in unknown:
        errors.append({"line": 1, "column": column, "message": "unknown column; expected "
                       + ", ".join(CSV_COLUMNS)})
    for column in missing:
        errors.append({"line": 1, "column": column, "message": "required column missing"})
    if errors:
        return [], errors
    rows = []
    line = 1
    records = iter(reader)
    while True:
        try:
            record = next(records)
        except StopIteration:
            break
        except csv.Error as exc:
            return [], [{"line": line + 1, "column": "-", "message": f"unreadable CSV: {exc}"}]
        line_start, line = line + 1, reader.line_num
        row: dict[str, Any] = {}

        def bad(column: str, message: str, line_start: int = line_start) -> None:
            errors.append({"line": line_start, "column": column, "message": message})

        if None in record:
            bad("-", f"{len(record[None])} more field(s) than the header has")
        values = {k: (v or "").strip() for k, v in record.items() if k is not None}
        if not values.get("account_id", "").isdigit():
            bad("account_id", f"expected a positive integer, got {values.get('account_id')!r}")
        elif int(values["account_id"]) not in accounts:
            bad("account_id", f"unknown account {values['account_id']}; see [[accounts]]")
        else:
            row["account_id"] = int(values["account_id"])
        if not values.get("topic"):
            bad("topic", "must not be empty")
        row["topic"] = values.get("topic", "")
        priority = values.get("priority", "") or "5"
        if not (priority.isdigit() and 0 <= int(priority) <= 10):
            bad("priority", f"expected an integer 0-10, got {priority!r}")
        else:
            row["priority"] = int(priority)
        approve = values.get("auto_approve", "").lower()
        if approve not in CSV_TRUE + CSV_FALSE:
            bad("auto_approve", f"expected true or false, got {values['auto_approve']!r}")
        row["auto_approve"] = approve in CSV_TRUE
        for column in ("keywords", "requirements", "tone", "category", "target_audience"):
            row[column] = values.get(column, "")
        for problem in check_task_fields(row):
            bad(problem.split("'")[1], problem)
        row["origin"] = f"bulk-import line {line_start}"
        rows.append(row)
    return rows, errors

TOPIC_CSV_COLUMNS = ("account_id", "topic", "keywords", "requirements", "tone", "category")


def parse_topic_csv(text: str, accounts: set[int]) -> tuple[list[dict[str, Any]],
                                                            list[dict[str, Any]]]:
    """Pool topics from a `topics import` CSV (account_id,topic + optional keywords,
    requirements, tone, category), and every error as {line, column, message}."""
    import csv
    import io

    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    errors = [{"line": 1, "column": column, "message": "unknown column; expected "
               + ", ".join(TOPIC_CSV_COLUMNS)} for column in header
              if column not in TOPIC_CSV_COLUMNS]
    errors += [{"line": 1, "column": column, "message": "column appears more than once"}
               for column in sorted({c for c in header if header.count(c) > 1})]
    errors += [{"line": 1, "column": column, "message": "required column missing"}
               for column in ("account_id", "topic") if column not in header]
    if errors:
        return [], errors
    rows = []
    line = 1
    try:
        for record in reader:
            line_start, line = line + 1, reader.line_num
            values = {k: (v or "").strip() for k, v in record.items() if k is not None}
            row: dict[str, Any] = {column: values.get(column, "")
                                   for column in TOPIC_CSV_COLUMNS[1:]}
            row["topic"] = " ".join(row["topic"].split())
            problems = []
            if None in record:
                problems.append(("-", f"{len(record[None])} more field(s) than the header has"))
            account = values.get("account_id", "")
            if not (account.isascii() and account.isdigit()):
                problems.append(("account_id", f"expected a positive integer, got {account!r}"))
            elif int(account) not in accounts:
                problems.append(("account_id", f"unknown account {account}; see [[accounts]]"))
            else:
                row["account_id"] = int(account)
            if not topic_key(row["topic"]):
                problems.append(("topic", "must not be empty (nor only punctuation)"))
            problems += [(p.split("'")[1], p) for p in check_task_fields(row)]
            errors += [{"line": line_start, "column": c, "message": m} for c, m in problems]
            rows.append(row)
    except csv.Error as exc:
        return [], [{"line": line + 1, "column": "-", "message": f"unreadable CSV: {exc}"}]
    return rows, errors


#: The transport's high-water mark: a client that does not read holds at most this much of
#: a reply (plus one chunk) in the daemon.
CONTROL_QUEUED_BYTES = 256 << 10
CONTROL_WRITE_CHUNK_BYTES = 256 << 10
#: The last slots of max_connections are kept for root and the daemon's own user.
CONTROL_RESERVED_SLOTS = 2
#: Replies with article bodies stream at most this many at a time, so clients that do not
#: read hold at most this many articles in memory.
CONTROL_BODY_STREAMS = 4
#: Rows of an export page grow while a page's bodies stay under this, shrink above it.
EXPORT_PAGE_BYTES = 4 << 20
EXPORT_PAGE_ROWS_MAX = 256
CONTROL_CLOSE_S = 1.0  #: how long a closing connection may flush what it still holds


class ClientTooSlow(Exception):
    """The client took none of its reply within connection_write_timeout."""


class ControlServer(FollowsConfig):
    """NDJSON over a Unix stream socket: one request per line, replies in order.

    Every request is parsed and validated before it touches anything; a bad line gets an
    error reply and the connection stays usable. Admission is fair: at most
    max_connections_per_uid per peer uid, max_connections in all, the last
    CONTROL_RESERVED_SLOTS of them only for root and the daemon's user. A connection must send
    its first line within connection_first_line_timeout and may then idle for
    connection_idle_timeout. Replies go out in chunks under a bounded write buffer; a client
    that takes nothing for connection_write_timeout is cut off. Article exports stream page by
    page, never the whole reply in memory. stop() cuts every connection at once.
    """


    def __init__(self, path: Path, live: LiveConfig, store: Store, pool: WorkerPool,
                 scheduler: Scheduler, media: MediaCapture,
                 app_commands: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]):
        self.path = path
        self.live = live
        self.store = store
        self.pool = pool
        self.scheduler = scheduler
        self.media = media
        # `task.status` is served by cmd_task_status, `bulk_import` by cmd_bulk_import.
        self.commands = {self._command_name(name): getattr(self, name)
                         for name in dir(self) if name.startswith("cmd_")}
        self.commands.update(app_commands)
        self._server: asyncio.base_events.Server | None = None
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._per_uid: dict[int, int] = {}
        self._body_streams = asyncio.Semaphore(CONTROL_BODY_STREAMS)
        self.started_monotonic = time.monotonic()
        self._socket_permissions: tuple[int, str] | None = None  #: (mode, group) last applied

    @staticmethod
    def _command_name(method: str) -> str:
        group, _, rest = method[len("cmd_"):].partition("_")
        if group in COMMAND_GROUPS and rest:
            return f"{group}.{rest}"
        return method[len("cmd_"):]

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.config.daemon.timezone)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.started_monotonic = time.monotonic()
        self._server = await asyncio.start_unix_server(self._serve_connection, path=self.path,
                                                       limit=MAX_LINE_BYTES + 1)
        self._apply_socket_permissions()

    def apply_config(self, config: Config) -> None:
        """Reload: limits and peer rules are read from the running config; the socket file
        gets a new mode and group, so the file and the peer check never disagree."""
        if (config.daemon.socket_mode, config.daemon.socket_group) != self._socket_permissions:
            self._apply_socket_permissions()

    def _apply_socket_permissions(self) -> None:
        """A failure is logged, not raised: the socket keeps serving as it was."""
        daemon = self.config.daemon
        self._socket_permissions = (daemon.socket_mode, daemon.socket_group)
        try:
            os.chmod(self.path, daemon.socket_mode)
            if daemon.socket_group:
                os.chown(self.path, -1, grp.getgrnam(daemon.socket_group).gr_gid)
        except (KeyError, OSError) as exc:
            log.warning("socket_permissions_not_applied", mode=f"{daemon.socket_mode:04o}",
                        group=daemon.socket_group, error=str(exc),
                        hint="the daemon's user must own the socket and be a member of"
                        " socket_group")

    async def stop(self) -> None:
        """Stop accepting and cut every connection now: a client that does not read its reply
        must not hold up the shutdown."""
        if self._server is not None:
            self._server.close()
            for connection, writer in list(self._connections.items()):
                connection.cancel()
                writer.transport.abort()
            await asyncio.gather(*self._connections, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @staticmethod
    def _reply(request_id: Any, result: Any = None, error: ContentHubError | None = None) -> bytes:
        body: dict[str, Any] = {"v": 1, "id": request_id}
        if error is None:
            body.update(ok=True, result=result)
        else:
            body.update(ok=False, error={"code": error.code, "message": str(error)})
            if error.data is not None:
                body["error"]["data"] = error.data
        return json.dumps(body, ensure_ascii=False, default=str).encode() + b"\n"

    def _refusal(self, uid: int) -> str | None:
        """Why a new connection from `uid` may not be served now, or None."""
        daemon = self.config.daemon
        if self._per_uid.get(uid, 0) >= daemon.max_connections_per_uid:
            return (f"uid {uid} already holds {daemon.max_connections_per_uid} connections"
                    " (max_connections_per_uid); close one and try again")
        free = daemon.max_connections - len(self._connections)
        reserved = 0 if uid in (0, os.getuid()) else min(CONTROL_RESERVED_SLOTS,
                                                         daemon.max_connections - 1)
        if free <= reserved:
            return "too many connections; try again"
        return None

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        current = asyncio.current_task()
        assert current is not None  # asyncio runs each connection as a task
        uid = None
        try:
            allowed, peer_uid = peer_allowed(writer.get_extra_info("socket"),
                                             self.config.daemon.socket_group)
            if not allowed:
                error = ContentHubError(f"uid {peer_uid} may not use this socket")
                error.code = "forbidden"
                writer.write(self._reply(None, error=error))
                return
            refusal = self._refusal(peer_uid)
            if refusal is not None:
                error = ContentHubError(refusal)
                error.code = "busy"
                writer.write(self._reply(None, error=error))
                return
            uid = peer_uid
            self._connections[current] = writer
            self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
            writer.transport.set_write_buffer_limits(high=CONTROL_QUEUED_BYTES)
            daemon = self.config.daemon
            timeout = min(daemon.connection_first_line_timeout, daemon.connection_idle_timeout)
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), timeout)
                except TimeoutError:
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    error = ContentHubError(f"request line over {MAX_LINE_BYTES} bytes")
                    error.code = "too_large"
                    writer.write(self._reply(None, error=error))
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                timeout = self.config.daemon.connection_idle_timeout
                await self._answer(line, reader, writer, uid)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except ClientTooSlow:
            writer.transport.abort()
            log.info("control_client_too_slow", uid=uid,
                     timeout=self.config.daemon.connection_write_timeout)
        finally:
            if uid is not None:
                del self._connections[current]
                self._per_uid[uid] -= 1
                if not self._per_uid[uid]:
                    del self._per_uid[uid]
            await self._close(writer)

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        """Close, letting the kernel take what is queued for a moment; then drop it."""
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), CONTROL_CLOSE_S)
        except Exception:
            writer.transport.abort()

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write `data` in chunks, waiting while the client is behind: the daemon never queues
        more than CONTROL_QUEUED_BYTES + one chunk per connection."""
        view = memoryview(data)
        for start in range(0, len(view), CONTROL_WRITE_CHUNK_BYTES):
            writer.write(view[start:start + CONTROL_WRITE_CHUNK_BYTES])
            if writer.transport.get_write_buffer_size() > CONTROL_QUEUED_BYTES:
                try:
                    await asyncio.wait_for(writer.drain(),
                                           self.config.daemon.connection_write_timeout)
                except TimeoutError:
                    raise ClientTooSlow from None

    async def _answer(self, line: bytes, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, uid: int) -> None:
        request_id = None
        try:
            try:
                request = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidRequest(f"request is not valid JSON: {exc}") from None
            except RecursionError:
                raise InvalidRequest("request is nested too deeply") from None
            if not isinstance(request, dict):
                raise InvalidRequest("request must be a JSON object")
            # Python's json accepts NaN/Infinity and lone surrogates (\udcff); neither can be
            # stored or echoed in a strict JSON reply. Echo the id only when it is clean.
            if _strict_json(request.get("id")):
                request_id = request.get("id")
            if not _strict_json(request):
                raise InvalidRequest("request contains NaN, Infinity or a lone UTF-16"
                                     " surrogate")
            if request.get("v") != 1:
                raise InvalidRequest("unsupported protocol version; expected \"v\": 1")
            cmd, args = request.get("cmd"), request.get("args", {})
            if not isinstance(args, dict):
                raise InvalidRequest("'args' must be an object")
            if cmd == "task.watch":
                await self._watch(request_id, args, reader, writer)
                return
            if cmd == "content.export":
                await self._export(request_id, args, writer)
                return
            handler = self.commands.get(cmd) if isinstance(cmd, str) else None
            if handler is None:
                error = ContentHubError(f"unknown command {cmd!r}")
                error.code = "unknown_command"
                raise error
            result = present(await (handler(args, peer_name(uid)) if cmd in PEER_COMMANDS
                                    else handler(args)), self.tz)
            reply = self._reply(request_id, result)
        except ContentHubError as exc:
            reply = self._reply(request_id, error=exc)
        except (ConnectionError, ClientTooSlow):
            raise
        except Exception as exc:
            log.exception("control_command_failed")
            reply = self._reply(request_id, error=ContentHubError(
                f"internal error: {type(exc).__name__}: {exc}"))
        await self._send(writer, reply)

    async def _watch(self, request_id: Any, args: dict[str, Any],
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Stream a task's changes until it is terminal or the client goes away."""
        task_id = await self.task_id(args)
        queue = self.pool.subscribe(task_id)
        try:
            task = await self.store.get_task(task_id)
            while task["status"] not in TERMINAL_STATUSES:
                event = {"task_id": task_id, "status": task["status"],
                         "progress": task["progress"], "stage": task["stage"]}
                await self._send(writer, json.dumps({"v": 1, "id": request_id, "event": event},
                                                    ensure_ascii=False).encode() + b"\n")
                getter = asyncio.ensure_future(queue.get())
                gone = asyncio.ensure_future(reader.read(1))
                done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                getter.cancel()
                gone.cancel()
                if gone in done:
                    return
                change = getter.result()
                task = await self.store.get_task(task_id)
                if change.get("progress") is not None and task["status"] == "running":
                    task["progress"], task["stage"] = change["progress"], change.get("stage")
            await self._send(writer, self._reply(request_id, present(
                await self.store.get_task(task_id, with_events=True), self.tz)))
        finally:
            self.pool.unsubscribe(task_id, queue)

    async def _export(self, request_id: Any, args: dict[str, Any],
                      writer: asyncio.StreamWriter) -> None:
        """`content.export` as one reply line written page by page: the daemon holds one page
        of articles, not the whole export. Page sizes adapt to the bodies' size. An error
        after the first bytes went out can only be told by closing the connection."""
        filters = self._content_filters(args, export=True)
        remaining = filters.pop("limit")
        async with self._body_streams:
            page, before_id, separator = 1, None, b""
            rows = await self.store.list_contents(**filters, limit=min(page, remaining),
                                                  with_body=True)
            await self._send(writer, self._reply(request_id, [])[:-len(b"]}\n")])
            try:
                while rows:
                    remaining -= len(rows)
                    before_id = rows[-1]["id"]
                    body_bytes = sum(len(row["body"]) for row in rows)
                    for row in rows:
                        self._media_files(row)
                    for encoded in await asyncio.to_thread(self._encode_rows, rows, self.tz):
                        await self._send(writer, separator)
                        await self._send(writer, encoded)
                        separator = b","
                    del rows, encoded
                    if body_bytes > EXPORT_PAGE_BYTES:
                        page = max(1, page // 2)
                    elif body_bytes * 2 <= EXPORT_PAGE_BYTES:
                        page = min(EXPORT_PAGE_ROWS_MAX, page * 2)
                    rows = [] if remaining <= 0 else await self.store.list_contents(
                        **filters, limit=min(page, remaining), with_body=True,
                        before_id=before_id)
            except (ConnectionError, ClientTooSlow):
                raise
            except Exception as exc:
                log.exception("content_export_failed")
                raise ConnectionAbortedError("export failed after its reply began") from exc
            await self._send(writer, b"]}\n")

    @staticmethod
    def _encode_rows(rows: list[dict[str, Any]], tz: ZoneInfo) -> list[bytes]:
        return [json.dumps(present(row, tz), ensure_ascii=False, default=str).encode()
                for row in rows]

    async def task_id(self, args: dict[str, Any]) -> str:
        """The `task_id` argument, which may be abbreviated to a unique prefix of the id or of
        its random part (the 8 hex digits narrow tables show)."""
        text = arg(args, "task_id", str, required=True)
        matches = await self.store.find_task_ids(text, TASK_ID_MATCHES_SHOWN + 1)
        if text in matches or len(matches) == 1:
            return text if text in matches else matches[0]
        if not matches:
            raise NotFound(f"no task {text}")
        shown = ", ".join(matches[:TASK_ID_MATCHES_SHOWN])
        more = ", …" if len(matches) > TASK_ID_MATCHES_SHOWN else ""
        raise InvalidRequest(f"task id {text!r} is ambiguous: it matches {shown}{more};"
                             " give more characters")

    async def _with_total(self, args: dict[str, Any], rows: list[dict[str, Any]], limit: int,
                          count: Callable[[], Awaitable[int]]) -> Any:
        """With `with_total`, a listing says how many rows its limit left out: {rows, total}.
        Counting costs a query, paid only when the limit was reached."""
        if not arg(args, "with_total", bool, default=False):
            return rows
        return {"rows": rows, "total": len(rows) if len(rows) < limit else await count()}

    # -- commands: content ---------------------------------------------------------------------

    async def cmd_content_generate(self, args: dict[str, Any]) -> dict[str, Any]:
        """With `idempotency_key`, a repeat (after an ambiguous failure) returns the task the
        first request queued, marked `"duplicate": true`, and queues nothing."""
        key = idempotency_key(args)
        task = await self.validate_new_task(args)
        result, duplicate = await self.store.add_tasks_once(
            [task], self.pool.clock(), key, "content.generate",
            lambda ids: {"task_id": ids[0], "status": "pending",
                         "message": "task queued; follow it with: contenthubctl task status "
                         + ids[0]})
        if duplicate:
            return {**result, "duplicate": True,
                    "message": f"already queued as {result['task_id']} by an earlier request"
                    f" with idempotency key {key!r}; nothing new was queued"}
        self.pool.wake()
        log.info("task_submitted", task_id=result["task_id"], account_id=task["account_id"],
                 origin="ctl")
        return result

    async def _enabled_account(self, args: dict[str, Any]) -> dict[str, Any]:
        """The request's `account_id`, which must be an enabled account of the config."""
        account_id = arg(args, "account_id", int, required=True)
        account = await self.store.get_account(account_id)
        if account is None or not account["enabled"]:
            raise InvalidRequest(f"unknown account {account_id}; accounts come from [[accounts]]"
                                 " in the config")
        return account

    async def validate_new_task(self, args: dict[str, Any]) -> dict[str, Any]:
        account = await self._enabled_account(args)
        account_id = account["id"]
        topic = arg(args, "topic", str, required=True).strip()
        if not topic:
            raise InvalidRequest("argument 'topic' must not be empty")
        requirements = args.get("requirements")
        if isinstance(requirements, (dict, list)):
            requirements = json.dumps(requirements, ensure_ascii=False)
        args = {**args, "requirements": requirements}
        task = {
            "account_id": account_id, "topic": topic,
            **{name: arg(args, name, str, default="") for name in
               ("keywords", "requirements", "tone", "target_audience")},
            "category": arg(args, "category", str, default=account["category"]),
            "priority": arg(args, "priority", int, default=5, minimum=0, maximum=10),
            "auto_approve": arg(args, "auto_approve", bool,
                                default=self.config.daemon.auto_approve),
            "max_retries": self.config.daemon.max_retries,
        }
        problems = check_task_fields(task)
        if problems:
            raise InvalidRequest("; ".join(problems))
        return task

    async def cmd_content_list(self, args: dict[str, Any]) -> Any:
        filters = self._content_filters(args)
        limit = filters.pop("limit")
        rows = await self.store.list_contents(**filters, limit=limit)
        return await self._with_total(args, rows, limit,
                                      lambda: self.store.count_contents(**filters))

    def _content_filters(self, args: dict[str, Any], export: bool = False) -> dict[str, Any]:
        since = arg(args, "since", str)
        if since is not None:
            try:
                moment = datetime.fromisoformat(since)
                since = to_db_time(moment if moment.tzinfo else moment.replace(tzinfo=self.tz))
            except (ValueError, OverflowError):
                raise InvalidRequest(f"argument 'since' is not a usable ISO date/time:"
                                     f" {since!r}") from None
        ids = arg(args, "ids", list)
        if ids is not None:
            ids = content_ids(ids)
        # An export is for publishing: approved articles unless asked otherwise.
        review_status = arg(args, "review_status", str,
                            default="approved" if export and not ids else "any",
                            choices=("any", "pending_review", "approved", "rejected"))
        return {"account_id": arg(args, "account_id", int),
                "review_status": None if review_status == "any" else review_status,
                "since": since, "ids": ids,
                "limit": arg(args, "limit", int, default=50, minimum=1, maximum=100_000)}

    def _media_files(self, content: dict[str, Any]) -> dict[str, Any]:
        """Saved images by their absolute path: the database keeps them relative to
        state_dir, a reader of the reply needs the file."""
        for item in content.get("media", ()):
            item["path"] = self.media.file_of(item["path"])
        return content

    async def cmd_content_show(self, args: dict[str, Any]) -> dict[str, Any]:
        key = arg(args, "id", (int, str), required=True)
        if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 19:
            key = int(key)
        if isinstance(key, str):
            key = await self.task_id({"task_id": key})
        content = self._media_files(await self.store.get_content(key, with_history=True))
        content["usage"] = await self.store.usage_totals(content["task_id"])
        return content

    async def cmd_content_publish(self, args: dict[str, Any],
                                  peer: tuple[int, str]) -> dict[str, Any]:
        """Publish one approved content now with `[publish] command`, whatever its schedule."""
        if not self.config.publish.command:
            raise InvalidRequest("[publish] command is not set in the config")
        key = arg(args, "id", (int, str), required=True)
        if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 19:
            key = int(key)
        if isinstance(key, str):
            key = await self.task_id({"task_id": key})
        force = arg(args, "force", bool, default=False)
        content = await self.store.get_content(key)
        if content["review_status"] != "approved":
            raise Conflict(f"content {content['id']} is {content['review_status']}; only"
                           " approved contents are published")
        pending = sum(item["status"] == "pending" for item in content["media"])
        if not force and content["publish_status"] == "published":
            raise Conflict(f"content {content['id']} was published at"
                           f" {content['published_at']}; --force publishes it again")
        if not force and pending:
            raise Conflict(f"content {content['id']} has {pending} image(s) still downloading;"
                           " wait for them (content show) or --force")
        return await publish_content(self.store, self.config, self.pool.environ, content,
                                     self.pool.clock(), actor=peer)

    async def cmd_content_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        ids = content_ids(arg(args, "ids", list, required=True))
        if not ids:
            raise InvalidRequest("argument 'ids' must be a non-empty list of content ids")
        deleted = await self.store.delete_contents(ids)
        await self.media.remove(deleted)
        log.info("contents_deleted", ids=deleted)
        return {"deleted": deleted, "missing": [i for i in ids if i not in deleted]}

    async def cmd_content_approve(self, args: dict[str, Any],
                                  peer: tuple[int, str]) -> dict[str, Any]:
        return await self._review(args, "approved", peer)

    async def cmd_content_reject(self, args: dict[str, Any],
                                 peer: tuple[int, str]) -> dict[str, Any]:
        return await self._review(args, "rejected", peer)

    async def _review(self, args: dict[str, Any], status: str,
                      peer: tuple[int, str]) -> dict[str, Any]:
        ids = content_ids(arg(args, "ids", list, required=True))
        if not ids:
            raise InvalidRequest("argument 'ids' must be a non-empty list of content ids")
        reason = arg(args, "reason", str)
        force = arg(args, "force", bool, default=False)
        outcome = await self.store.review_contents(ids, status, reason, peer, self.pool.clock(),
                                                   force)
        log.info("content_reviewed", status=status, updated=outcome["updated"],
                 unchanged=outcome["unchanged"], by=peer[1], forced=force)
        return outcome

    # -- commands: tasks -----------------------------------------------------------------------

    async def cmd_task_status(self, args: dict[str, Any]) -> dict[str, Any]:
        task = self._with_waiting(await self.store.get_task(await self.task_id(args),
                                                            with_events=True))
        task["usage"] = await self.store.usage_totals(task["task_id"])
        return task

    def _with_waiting(self, task: dict[str, Any]) -> dict[str, Any]:
        """A pending task a budget holds says so: `waiting: budget` and the budget's reason."""
        reason = self.pool.waiting_reason(task)
        if reason is not None:
            task.update(waiting="budget", waiting_reason=reason)
        return task

    async def cmd_task_list(self, args: dict[str, Any]) -> Any:
        status = arg(args, "status", (str, list))
        statuses = [status] if isinstance(status, str) else status
        for name in statuses or ():
            if name not in ACTIVE_STATUSES + TERMINAL_STATUSES:
                raise InvalidRequest(f"unknown status {name!r}")
        filters = {"status": statuses, "account_id": arg(args, "account_id", int)}
        limit = arg(args, "limit", int, default=50, minimum=1, maximum=100_000)
        tasks = [self._with_waiting(task)
                 for task in await self.store.list_tasks(**filters, limit=limit)]
        return await self._with_total(args, tasks, limit,
                                      lambda: self.store.count_tasks(**filters))

    async def cmd_task_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        task_id = await self.task_id(args)
        await self.pool.cancel(task_id)
        return await self.store.get_task(task_id)

    async def cmd_task_retry(self, args: dict[str, Any]) -> dict[str, Any]:
        task_id = await self.task_id(args)
        await self.store.retry_task(task_id, self.pool.clock())
        self.pool.wake()
        self.pool.publish(task_id, status="pending")
        return await self.store.get_task(task_id)

    # -- commands: creator ---------------------------------------------------------------------

    async def cmd_creator_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.pool.creator_status()

    async def cmd_creator_resume(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.pool.resume_creator()

    # -- commands: monitor ---------------------------------------------------------------------

    async def cmd_monitor_metrics(self, args: dict[str, Any]) -> dict[str, Any]:
        metrics = await self.store.metrics()
        metrics.update(workers_busy=len(self.pool.running), workers_max=self.pool.capacity,
                       uptime_seconds=round(time.monotonic() - self.started_monotonic, 1))
        if arg(args, "spend", bool, default=False):
            metrics["spend"] = await self.spend_series()
        return metrics

    async def spend_series(self) -> dict[str, Any]:
        """The Prometheus spend series: tokens and cost since the database began (counters:
        usage rows are never deleted), and what every budget has left in its window."""
        totals = await self.store.spend_totals()
        status = await self.budget_status(self.pool.clock())
        remaining = [{"account": "", "window": name, "value": status[name]["remaining"]}
                     for name in ("daily", "monthly") if status[name]["limit"]]
        remaining += [{"account": str(a["account_id"]), "window": name,
                       "value": a[name]["remaining"]}
                      for a in status["accounts"] for name in ("daily", "monthly")
                      if a[name]["limit"]]
        return {**totals, "currency": status["currency"], "budget_remaining": remaining}

    async def cmd_monitor_prometheus(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"text": prometheus_text(await self.cmd_monitor_metrics({"spend": True}),
                                        await self.store.counter_values(),
                                        await self.store.last_runs(),
                                        [s.name for s in self.config.schedules])}

    async def cmd_monitor_recent(self, args: dict[str, Any]) -> Any:
        return await self._task_listing(args, None, "t.updated_at DESC")

    async def cmd_monitor_failed(self, args: dict[str, Any]) -> Any:
        return await self._task_listing(args, ["failed", "timeout"], "recently_updated")

    async def cmd_monitor_pending(self, args: dict[str, Any]) -> Any:
        return await self._task_listing(args, ["pending", "submitted", "running"], "queue")

    async def _task_listing(self, args: dict[str, Any], statuses: list[str] | None,
                            order: str) -> Any:
        limit = arg(args, "limit", int, default=20, minimum=1)
        rows = await self.store.list_tasks(status=statuses, limit=limit, order=order)
        return await self._with_total(args, rows, limit,
                                      lambda: self.store.count_tasks(status=statuses))


    async def cmd_monitor_cost(self, args: dict[str, Any]) -> dict[str, Any]:
        """Spend of the last `days` days by day, account or model, and where every budget
        stands now."""
        days = arg(args, "days", int, default=7, minimum=1, maximum=3650)
        by = arg(args, "by", str, default="day", choices=("day", "account", "model"))
        now = self.pool.clock()
        local = now.astimezone(self.tz)
        offset = f"{int((local.utcoffset() or timedelta()).total_seconds())} seconds"
        since = local.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days - 1)
        report = await self.store.cost_report(to_db_time(since) or "", offset, by)
        budget = self.config.budget
        return {"currency": budget.currency, "total_cost": report["cost"],
                "tokens_in": report["tokens_in"], "tokens_out": report["tokens_out"],
                "attempts": report["attempts"], "unpriced_attempts": report["unpriced_attempts"],
                "days": days, "by": by, "rows": report["rows"],
                "budget": await self.budget_status(now)}

    async def budget_status(self, now: datetime) -> dict[str, Any]:
        """Each configured budget: limit, spent in its current window, remaining."""
        day, month, _ = budget_windows(now, self.tz)
        spend = await self.store.spend_since(to_db_time(day) or "", to_db_time(month) or "")
        budget = self.config.budget

        def window(limit: float, spent: float) -> dict[str, Any]:
            return {"limit": limit or None, "spent": round(spent, 6),
                    "remaining": round(max(limit - spent, 0.0), 6) if limit else None}

        accounts = []
        for account in self.config.accounts:
            if account.daily_budget or account.monthly_budget:
                spent_day, spent_month = spend["accounts"].get(account.id, (0.0, 0.0))
                accounts.append({"account_id": account.id, "account_name": account.name,
                                 "daily": window(account.daily_budget, spent_day),
                                 "monthly": window(account.monthly_budget, spent_month)})
        return {"currency": budget.currency, "daily": window(budget.daily, spend["day"]),
                "monthly": window(budget.monthly, spend["month"]), "accounts": accounts,
                "waiting": sorted(self.pool.budget_holds.values())}

    async def cmd_monitor_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        days = arg(args, "days", int, default=7, minimum=1, maximum=3650)
        return await self.store.stats(days, self.pool.clock(), self.tz)

    async def cmd_task_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.store.task_stats()

    async def cmd_db_backup(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.store.backup_to(Path(arg(args, "path", str, required=True)))

    async def cmd_db_check(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.store.check()

    async def cmd_db_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.store.database_stats()

    async def cmd_task_cleanup(self, args: dict[str, Any]) -> dict[str, Any]:
        params = {"days": arg(args, "days", int, required=True, minimum=0, maximum=36_500),
                  "statuses": arg(args, "status", list, default=list(TERMINAL_STATUSES)),
                  "dry_run": arg(args, "dry_run", bool, default=False)}
        problems = EXECUTORS["cleanup"].validate_params(params, self.config)
        if problems:
            raise InvalidParameters("; ".join(problems))
        ctx = ExecutionContext(self.store, self.config, {}, self.pool.clock())
        return (await EXECUTORS["cleanup"].execute(ctx, params)).data or {}

    # -- commands: bulk import -----------------------------------------------------------------

    def _csv_rows(self, args: dict[str, Any], parse: CsvParser,
                  default_name: str) -> tuple[list[dict[str, Any]], str]:
        """The rows of a request's `csv`, every one valid, and the file's name; a bad row
        refuses the whole file, listing every error by line."""
        filename = arg(args, "filename", str, default=default_name)
        rows, errors = parse(arg(args, "csv", str, required=True).lstrip("\ufeff"),
                             {a.id for a in self.config.accounts if a.enabled})
        if errors:
            raise InvalidRequest(f"{filename}: {bad_rows(errors)} bad row(s); nothing imported",
                                 data={"errors": errors})
        if not rows:
            raise InvalidRequest(f"{filename}: no rows to import")
        return rows, filename

    async def cmd_bulk_import(self, args: dict[str, Any]) -> dict[str, Any]:
        """All rows are validated first; any bad row imports nothing."""
        tasks, filename = self._csv_rows(args, parse_task_csv, "tasks.csv")
        key = idempotency_key(args)
        max_retries = self.config.daemon.max_retries
        result, duplicate = await self.store.add_tasks_once(
            [{**t, "max_retries": max_retries} for t in tasks], self.pool.clock(), key,
            "bulk_import", lambda ids: {"imported": len(ids), "task_ids": ids})
        if duplicate:
            log.info("bulk_import_repeated", idempotency_key=key, file=filename)
            return {**result, "first_imported": result["imported"], "imported": 0,
                    "duplicate": True}
        self.pool.wake()
        log.info("bulk_imported", count=result["imported"], file=filename)
        return result

    # -- commands: topics ----------------------------------------------------------------------

    async def cmd_topics_add(self, args: dict[str, Any]) -> dict[str, Any]:
        account = await self._enabled_account(args)
        account_id = account["id"]
        texts = arg(args, "topics", list, required=True)
        if not texts or not all(isinstance(text, str) for text in texts):
            raise InvalidRequest("argument 'topics' must be a non-empty list of strings")
        common = {name: arg(args, name, str, default="")
                  for name in ("keywords", "requirements", "tone", "category")}
        topics = []
        for text in texts:
            topic = {**common, "account_id": account_id, "topic": " ".join(text.split())}
            if not topic_key(topic["topic"]):
                raise InvalidRequest(f"topic {text!r} is empty once whitespace and punctuation"
                                     " are removed")
            problems = check_task_fields(topic)
            if problems:
                raise InvalidRequest(f"topic {text[:50]!r}: {'; '.join(problems)}")
            topics.append(topic)
        return await self.store.add_topics(topics, "manual", self.pool.clock(),
                                           self.config.daemon.topic_repeat_days)

    async def cmd_topics_import(self, args: dict[str, Any]) -> dict[str, Any]:
        """All rows are validated first; any bad row imports nothing. Duplicates are not
        errors: they are reported and left out."""
        topics, filename = self._csv_rows(args, parse_topic_csv, "topics.csv")
        result = await self.store.add_topics(topics, "import", self.pool.clock(),
                                             self.config.daemon.topic_repeat_days)
        log.info("topics_imported", added=len(result["added"]),
                 duplicates=len(result["duplicates"]), file=filename)
        return result

    async def cmd_topics_list(self, args: dict[str, Any]) -> Any:
        account_id = arg(args, "account_id", int)
        status = arg(args, "status", str, choices=TOPIC_STATUSES)
        limit = arg(args, "limit", int, default=200, minimum=1, maximum=100_000)
        rows = await self.store.list_topics(account_id, status, limit)
        return await self._with_total(args, rows, limit,
                                      lambda: self.store.count_topics(account_id, status))

    async def cmd_topics_skip(self, args: dict[str, Any]) -> dict[str, Any]:
        ids = content_ids(arg(args, "ids", list, required=True), "topic")
        if not ids:
            raise InvalidRequest("argument 'ids' must be a non-empty list of topic ids")
        return await self.store.skip_topics(ids, self.pool.clock())

    # -- commands: notify ----------------------------------------------------------------------

    async def cmd_notify_list(self, args: dict[str, Any]) -> Any:
        status = arg(args, "status", str, choices=("pending", "sent", "dead"))
        limit = arg(args, "limit", int, default=50, minimum=1, maximum=10_000)
        return await self._with_total(args, await self.store.list_deliveries(status, limit),
                                      limit, lambda: self.store.count_deliveries(status))

    # -- commands: scheduler -------------------------------------------------------------------

    async def cmd_scheduler_list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.scheduler.describe_many(list(self.scheduler.schedules.values()))

    async def cmd_scheduler_show(self, args: dict[str, Any]) -> dict[str, Any]:
        entry = self.scheduler.get(arg(args, "name", str, required=True))
        schedule = entry.config
        [described] = await self.scheduler.describe_many([entry])
        return {**described, "params": schedule.params,
                "misfire": schedule.misfire, "misfire_grace": schedule.misfire_grace,
                "overlap": schedule.overlap, "description": schedule.description,
                "recent_runs": await self.store.list_runs(schedule.name, 5)}

    async def cmd_scheduler_history(self, args: dict[str, Any]) -> Any:
        name, limit = arg(args, "name", str), arg(args, "limit", int, default=20, minimum=1)
        return await self._with_total(args, await self.store.list_runs(name, limit), limit,
                                      lambda: self.store.count_runs(name))

    async def cmd_scheduler_pause(self, args: dict[str, Any]) -> dict[str, Any]:
        entry = await self.scheduler.set_paused(arg(args, "name", str, required=True), True)
        return (await self.scheduler.describe_many([entry]))[0]

    async def cmd_scheduler_resume(self, args: dict[str, Any]) -> dict[str, Any]:
        entry = await self.scheduler.set_paused(arg(args, "name", str, required=True), False)
        return (await self.scheduler.describe_many([entry]))[0]

    async def cmd_scheduler_trigger(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.scheduler.trigger_now(arg(args, "name", str, required=True))

    async def cmd_scheduler_next(self, args: dict[str, Any]) -> dict[str, Any]:
        entry = self.scheduler.get(arg(args, "name", str, required=True))
        count = arg(args, "count", int, default=5, minimum=1, maximum=1000)
        after = arg(args, "after", str)
        if after is None:
            start = entry.last_scheduled_for or self.pool.clock()
        else:
            try:
                start = datetime.fromisoformat(after)
                if start.tzinfo is None:
                    start = start.replace(tzinfo=ZoneInfo(entry.trigger.timezone))
                start.astimezone(UTC)
            except (ValueError, OverflowError):
                raise InvalidRequest(f"argument 'after' is not a usable ISO date/time:"
                                     f" {after!r}") from None
        instants = next_instants(entry.trigger, start.astimezone(UTC), count,
                                 entry.last_scheduled_for)
        tz = ZoneInfo(entry.trigger.timezone)
        return {"name": entry.config.name, "timezone": entry.trigger.timezone,
                "instants": [i.astimezone(tz).isoformat() for i in instants]}

    async def cmd_scheduler_status(self, args: dict[str, Any]) -> dict[str, Any]:
        active = [e for e in self.scheduler.schedules.values() if not e.paused]
        upcoming = min((e for e in active if e.next_fire_at is not None),
                       key=lambda e: e.next_fire_at or datetime.max, default=None)
        return {"running": self.scheduler.is_running, "schedules": len(self.scheduler.schedules),
                "paused": len(self.scheduler.schedules) - len(active),
                "next": {"name": upcoming.config.name, "at": to_db_time(upcoming.next_fire_at)}
                if upcoming else None}

    async def cmd_executors(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [executor.describe() for executor in EXECUTORS.values()]

# Notifications #################################################################################

NOTIFY_CONCURRENCY = 8  #: deliveries in flight at once, all targets together
NOTIFY_PER_TARGET = 2  #: in flight per target: a dead receiver cannot take every slot
NOTIFY_RETRY_CAP_S = 3600.0  #: the longest wait between two attempts of one delivery
NOTIFY_RESPONSE_MAX = 64 << 10  #: bytes of a receiver's answer that are read
NOTIFY_ROUTE_BATCH = 500  #: events turned into outbox rows per transaction
NOTIFY_MAX_TITLES = 10  #: article titles (or failed tasks) listed in one chat message
NOTIFY_MAX_MERGED = 50  #: due rows read per target and round, and the most one message carries
#: Events whose due rows for one chat target go as one message, however many there are.
MERGED_EVENTS = ("task.failed", "content.ready")
NOTIFY_PRUNE_EVERY = timedelta(hours=1)  #: how often events past retention_days are deleted
NOTIFY_BRAND = "【ContentHub】"  #: starts every chat title; a DingTalk bot keyword can match it
#: What a chat message calls an event that has no text of its own below.
NOTIFY_TITLES = {"creator.tripped": "创作器已熔断", "creator.recovered": "创作器已恢复",
                 "budget.exhausted": "预算已用尽", "topics.low": "选题库存不足",
                 "test": "测试通知"}


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def http_post(url: str, body: bytes, headers: dict[str, str], timeout: float,
                    ssl_context: ssl.SSLContext | None = None) -> HttpResponse:
    """One HTTP/1.1 POST on asyncio streams, the whole exchange within `timeout`.

    No thread is held while a receiver thinks: a thousand slow receivers cost sockets, not
    the executor that aiosqlite and DNS share. Raises OSError, asyncio.TimeoutError, or
    ValueError for an answer that is not HTTP.
    """
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname or ""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    async def exchange() -> HttpResponse:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=(ssl_context or ssl.create_default_context()) if secure else None,
            limit=NOTIFY_RESPONSE_MAX)
        try:
            head = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc.rpartition('@')[2]}",
                    f"Content-Length: {len(body)}", "Connection: close",
                    *(f"{name}: {value}" for name, value in headers.items())]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await writer.drain()
            status_line = (await reader.readline()).decode("latin-1")
            match = re.match(r"HTTP/1\.[01] (\d{3})", status_line)
            if not match:
                raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
            answer: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                answer[name.strip().lower()] = value.strip()
            if answer.get("transfer-encoding", "").lower() == "chunked":
                data = b""
                while len(data) < NOTIFY_RESPONSE_MAX:
                    size = int((await reader.readline()).split(b";")[0] or b"0", 16)
                    if size == 0:
                        break
                    data += await reader.readexactly(size)
                    await reader.readline()
            elif "content-length" in answer:
                length = min(int(answer["content-length"]), NOTIFY_RESPONSE_MAX)
                data = await reader.readexactly(length)
            else:
                data = await reader.read(NOTIFY_RESPONSE_MAX)
            return HttpResponse(int(match[1]), answer, data)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    return await asyncio.wait_for(exchange(), timeout)


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """X-ContentHub-Signature, Stripe's scheme: t=<unix seconds>,v1=<hex HMAC-SHA256 of
    "<t>." + body>. A receiver recomputes v1 and rejects an old t (replays)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def feishu_sign(secret: str, timestamp: int) -> str:
    """Feishu custom bot: HMAC-SHA256 keyed with "<seconds>\\n<secret>" over nothing, base64."""
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk robot: HMAC-SHA256 keyed with the secret over "<ms>\\n<secret>", base64
    (the caller URL-encodes it into the webhook's query)."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256)
    return base64.b64encode(digest.digest()).decode()


def _local(text: str | None, tz: ZoneInfo) -> str:
    moment = from_db_time(text)
    return moment.astimezone(tz).strftime("%m-%d %H:%M") if moment else "?"


def _clip(text: Any, limit: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def event_text(event: str, data: dict[str, Any], tz: ZoneInfo) -> tuple[str, list[str]]:
    """A chat message for an event: a title and a few short lines in Chinese, ending with
    the command an editor runs next."""
    if event == "content.ready":
        articles, counts = data.get("articles") or [], data.get("counts") or {}
        where = data.get("schedule") or "手动任务"
        lines = [f"{i}. {_clip(a.get('title'), 60)}（{a.get('account_name') or a.get('account_id')}"
                 f"，{a.get('word_count', 0)} 字）"
                 for i, a in enumerate(articles[:NOTIFY_MAX_TITLES], start=1)]
        if len(articles) > NOTIFY_MAX_TITLES:
            lines.append(f"…另有 {len(articles) - NOTIFY_MAX_TITLES} 篇")
        tally = f"任务 {counts.get('tasks', len(articles))} 个：完成 {counts.get('completed', 0)}"
        tally += f"，失败 {counts.get('failed', 0)}"
        if counts.get("cancelled"):
            tally += f"，取消 {counts['cancelled']}"
        lines.append(tally)
        pending = any(a.get("review_status") == "pending_review" for a in articles)
        lines.append("审核：contenthubctl content list --review-status pending_review" if pending
                     else "查看：contenthubctl content list")
        return f"{where}：{len(articles)} 篇新文章", lines
    if event == "task.failed" and "tasks" in data:  # several at once: one message
        tasks = data["tasks"]
        lines = [f"{i}. {_clip(t.get('topic'), 40)}（{t.get('account_name') or t.get('account_id')}"
                 f"）：{t.get('error_kind')}" for i, t in enumerate(tasks[:NOTIFY_MAX_TITLES], 1)]
        if len(tasks) > NOTIFY_MAX_TITLES:
            lines.append(f"…另有 {len(tasks) - NOTIFY_MAX_TITLES} 个")
        kinds: dict[str, int] = {}
        for t in tasks:
            kinds[str(t.get("error_kind"))] = kinds.get(str(t.get("error_kind")), 0) + 1
        lines.append("原因：" + "，".join(f"{kind} ×{n}" for kind, n in
                                         sorted(kinds.items(), key=lambda item: -item[1])))
        lines.append("查看：contenthubctl monitor failed")
        return f"{len(tasks)} 个任务失败", lines
    if event == "task.failed":
        task_id = data.get("task_id")
        lines = [f"账号：{data.get('account_name') or ''}（{data.get('account_id')}）",
                 f"原因：{data.get('error_kind')}：{_clip(data.get('error_message'), 200)}"]
        if data.get("schedule"):
            lines.append(f"计划：{data['schedule']}")
        lines += [f"查看：contenthubctl task status {task_id}",
                  f"重试：contenthubctl task retry {task_id}"]
        status = "超时" if data.get("status") == "timeout" else "失败"
        return f"任务{status}：{_clip(data.get('topic'), 60)}", lines
    if event == "schedule.failed":
        reason = data.get("error") or data.get("message") or "没有创建任何任务"
        return f"计划 {data.get('schedule')} 执行失败", [
            f"计划时间：{_local(data.get('scheduled_for'), tz)}", f"原因：{_clip(reason, 200)}",
            f"历史：contenthubctl scheduler history {data.get('schedule')}"]
    if event == "schedule.missed":
        return f"计划 {data.get('schedule')} 错过 {data.get('missed')} 次触发", [
            f"最近一次：{_local(data.get('last_missed'), tz)}",
            f"历史：contenthubctl scheduler history {data.get('schedule')}"]
    if event == "digest":
        lines = [f"新文章 {data.get('articles', 0)} 篇，待审核 {data.get('pending_review', 0)} 篇",
                 f"任务：完成 {data.get('completed', 0)}，失败 {data.get('failed', 0)}"
                 f"，排队 {data.get('pending', 0)}"]
        if data.get("notify_dead"):
            lines.append(f"通知投递失败 {data['notify_dead']} 条：contenthubctl notify list"
                         " --status dead")
        lines.append("审核：contenthubctl content list --review-status pending_review")
        return f"每日摘要 {data.get('date', '')}", lines
    lines = ([_clip(data["message"], 300)] if data.get("message") else
             [f"{key}：{_clip(value, 80)}" for key, value in list(data.items())[:6]
              if not isinstance(value, (dict, list))])
    return NOTIFY_TITLES.get(event, event), lines


def _utf8_clip(text: str, limit: int) -> str:
    """At most `limit` UTF-8 bytes, cut on a character boundary (WeCom counts bytes)."""
    raw = text.encode()
    return text if len(raw) <= limit else raw[:limit - 3].decode(errors="ignore") + "…"


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def chat_body(fmt: str, title: str, lines: list[str], secret: str,
              now: datetime) -> dict[str, Any]:
    """The vendor's documented message shape for one chat format."""
    title = NOTIFY_BRAND + title
    if fmt == "wecom":  # group bot: markdown content up to 4096 bytes
        return {"msgtype": "markdown",
                "markdown": {"content": _utf8_clip(f"**{title}**\n" + "\n".join(lines), 4000)}}
    if fmt == "dingtalk":  # paragraphs need blank lines in DingTalk's markdown
        return {"msgtype": "markdown", "markdown": {
            "title": title, "text": _utf8_clip(f"#### {title}\n\n" + "\n\n".join(lines), 18000)}}
    if fmt == "feishu":
        body: dict[str, Any] = {"msg_type": "post", "content": {"post": {"zh_cn": {
            "title": title, "content": [[{"tag": "text", "text": line}] for line in lines]}}}}
        if secret:
            stamp = int(now.timestamp())
            body = {"timestamp": str(stamp), "sign": feishu_sign(secret, stamp), **body}
        return body
    text = f"*{_slack_escape(title)}*\n" + "\n".join(_slack_escape(line) for line in lines)
    return {"text": title + "\n" + "\n".join(lines),
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}]}


def chat_error(fmt: str, response: HttpResponse) -> str | None:
    """WeCom, DingTalk and Feishu answer 200 with an error code in the body."""
    if fmt not in ("wecom", "dingtalk", "feishu"):
        return None
    try:
        answer = json.loads(response.body)
    except ValueError:
        return None
    if not isinstance(answer, dict):
        return None
    code = answer.get("errcode", answer.get("code", answer.get("StatusCode", 0)))
    if code in (0, None):
        return None
    return f"{fmt} error {code}: {answer.get('errmsg') or answer.get('msg') or ''}"[:300]


def merge_event_data(event: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Several events of one MERGED_EVENTS kind as the data of one chat message."""
    if event == "task.failed":
        return {"tasks": items}
    schedules = {item.get("schedule") for item in items}
    counts: dict[str, int] = {}
    for item in items:
        for key, value in (item.get("counts") or {}).items():
            counts[key] = counts.get(key, 0) + value
    return {"schedule": schedules.pop() if len(schedules) == 1 else "多个计划",
            "articles": [a for item in items for a in item.get("articles") or []],
            "counts": counts}


def target_matches(target: NotifyConfig, data: dict[str, Any]) -> bool:
    """A target's `accounts` and `schedules` filters; an event that names no account (or no
    schedule) passes that filter."""
    accounts = data.get("account_ids") or ([data["account_id"]] if data.get("account_id")
                                           is not None else [])
    if target.accounts and accounts and not set(accounts) & set(target.accounts):
        return False
    return not (target.schedules and "schedule" in data
                and data["schedule"] not in target.schedules)


@dataclass
class SendOutcome:
    response: str  #: "HTTP 200", "exit 1", "timed out", ""
    error: str | None = None  #: None: delivered
    retry_after: float | None = None  #: the receiver's Retry-After, in seconds


class Notifier(BackgroundLoop, FollowsConfig):
    """The delivery loop behind [[notify]]: at least once, from the outbox.

    Events are rows written in the transaction of the change they report
    (Store.enqueue_event). Each round: new events become one notify_outbox row per target
    that wants them; due rows are sent, at most NOTIFY_CONCURRENCY at once and
    NOTIFY_PER_TARGET per target, each within the target's timeout; digests fall due at
    their targets' digest_cron. A failure waits `retry_backoff`, doubling with jitter up to
    an hour (or the receiver's Retry-After); after `max_attempts` the row is dead with its
    last error. A row stays pending while it is sent, so a crash resends it after restart;
    every attempt carries the same event id for receivers to deduplicate. Secrets and URLs
    (a WeCom key is in its URL) are never logged or stored. [[hooks]] entries are command
    targets named hooks[N] that get HOOK_EVENT with their old payload. Events older than
    retention_days go, with their deliveries, once none of those is pending.
    """

    loop_name = "notify-loop"

    def __init__(self, store: Store, live: LiveConfig, environ: dict[str, str],
                 clock: Callable[[], datetime] = utc_now):
        super().__init__()
        self.store = store
        self.live = live
        self.environ = environ
        self.clock = clock
        self._in_flight: dict[int, asyncio.Task] = {}  #: outbox id -> the attempt sending it
        self._sending = 0  #: attempts in flight (one may carry several rows)
        self._busy: dict[str, int] = {}
        self._ssl: ssl.SSLContext | None = None
        self._digests: dict[str, tuple[Trigger, datetime]] = {}
        self._next_prune = clock()
        self.last_error: str | None = None  #: the latest dead delivery, for `monitor health`
        #: the latest failed [[hooks]] attempt, until one succeeds
        self.last_hook_error: str | None = None
        self._hook_statuses: dict[str, frozenset[str]] = {}
        store.on_events_written = self.wake
        self.apply_config(live.current)

    def apply_config(self, config: Config) -> None:
        """Start and reload: new targets and filters route from the next event on."""
        # [[hooks]] are command targets named hooks[N] (a name [[notify]] cannot take).
        hooks = [NotifyConfig(name=f"hooks[{i}]", command=hook.command, events=[HOOK_EVENT],
                              timeout=hook.timeout) for i, hook in enumerate(config.hooks)]
        self._hook_statuses = {f"hooks[{i}]": frozenset(hook.on)
                               for i, hook in enumerate(config.hooks)}
        self.targets = {target.name: target for target in (*config.notify, *hooks)}
        self.store.notify_subscribed = frozenset(
            event for target in self.targets.values() for event in target.events)
        now = self.clock()
        digests = {}
        for target in config.notify:
            if "digest" in target.events:
                trigger = parse_trigger(target.digest_cron, None, config.daemon.timezone)
                kept = self._digests.get(target.name)
                digests[target.name] = (kept if kept and kept[0] == trigger
                                        else (trigger, trigger.next_after(now)))
        self._digests = digests
        self.wake()

    def route(self, event: str, only: str | None, data: dict[str, Any]) -> list[str]:
        """The targets an event goes to (runs on the store's writer thread: pure)."""
        targets, hooks = self.targets, self._hook_statuses
        if only is not None:
            return [only] if only in targets else []
        return [t.name for t in targets.values()
                if event in t.events and target_matches(t, data)
                and (t.name not in hooks or data.get("event") in hooks[t.name])]

    async def stop(self) -> None:
        """In-flight deliveries are abandoned, still pending: the next start resends them."""
        await super().stop()
        attempts = set(self._in_flight.values())
        for task in attempts:
            task.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)

    async def _loop(self) -> None:
        while self._running:
            self._wake.clear()
            delay = MAX_SLEEP_S
            try:
                now = self.clock()
                await self._emit_due_digests(now)
                if now >= self._next_prune and self.config.daemon.retention_days:
                    self._next_prune = now + NOTIFY_PRUNE_EVERY
                    pruned = await self.store.prune_notifications(
                        now - timedelta(days=self.config.daemon.retention_days))
                    if pruned:
                        log.info("notify_events_pruned", count=pruned)
                while await self.store.route_events(self.route, now) == NOTIFY_ROUTE_BATCH:
                    pass
                if not await self._start_due(now):
                    due = await self.store.next_delivery_at(exclude=list(self._in_flight))
                    if due is not None:
                        delay = min(delay, (due - self.clock()).total_seconds())
                for _trigger, instant in self._digests.values():
                    delay = min(delay, (instant - self.clock()).total_seconds())
            except Exception:
                log.exception("notify_round_failed")
                delay = 5.0
            if delay > 0:
                await self._sleep(delay)

    async def _start_due(self, now: datetime) -> bool:
        """Start deliveries for due rows; True when some wait for a free slot (a finishing
        delivery wakes the loop). A chat target's due task.failed rows go as one message."""
        free = NOTIFY_CONCURRENCY - self._sending
        if free <= 0:
            return True
        rows = await self.store.due_deliveries(now, NOTIFY_MAX_MERGED, list(self._in_flight))
        batches: list[list[dict[str, Any]]] = []
        merged: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in rows:
            target = self.targets.get(row["target"])
            key = (row["target"], row["event"])
            if target is None or target.format == "json" or row["event"] not in MERGED_EVENTS:
                batches.append([row])
            elif key in merged:
                merged[key].append(row)
            else:
                merged[key] = [row]
                batches.append(merged[key])
        waiting = False
        for batch in batches:
            name = batch[0]["target"]
            if free <= 0 or self._busy.get(name, 0) >= NOTIFY_PER_TARGET:
                waiting = True
                continue
            free -= 1
            self._sending += 1
            self._busy[name] = self._busy.get(name, 0) + 1
            task = asyncio.create_task(self._deliver(batch), name=f"notify-{batch[0]['id']}")
            for row in batch:
                self._in_flight[row["id"]] = task
        return waiting

    async def _deliver(self, batch: list[dict[str, Any]]) -> None:
        """One attempt for one row, or for several task.failed rows as one chat message;
        each row records the outcome against its own attempts."""
        first, name = batch[0], batch[0]["target"]
        try:
            target = self.targets.get(name)
            if target is None:
                for row in batch:
                    await self.store.record_delivery(row["id"], self.clock(), "", "no [[notify]]"
                                                     f" target named {name!r} any more", None)
                return
            data = json.loads(first["data"])
            if len(batch) > 1:
                data = merge_event_data(first["event"], [json.loads(r["data"]) for r in batch])
            outcome = await self.send(target, first["event_id"], first["event"], first["at"],
                                      data)
            for row in batch:
                await self._record(target, row, outcome, len(batch))
        except Exception:
            log.exception("notify_delivery_failed", delivery=first["id"], target=name)
        finally:
            for row in batch:
                self._in_flight.pop(row["id"], None)
            self._sending -= 1
            self._busy[name] = self._busy.get(name, 1) - 1
            self.wake()

    async def _record(self, target: NotifyConfig, row: dict[str, Any], outcome: SendOutcome,
                      merged: int) -> None:
        attempts = row["attempts"] + 1
        retry_at = None
        if outcome.error is not None and attempts < target.max_attempts:
            delay = retry_delay(target.retry_backoff, NOTIFY_RETRY_CAP_S, attempts - 1)
            if outcome.retry_after:
                delay = max(delay, min(outcome.retry_after, NOTIFY_RETRY_CAP_S))
            retry_at = self.clock() + timedelta(seconds=delay)
        status = await self.store.record_delivery(row["id"], self.clock(), outcome.response,
                                                  outcome.error, retry_at)
        name = target.name
        fields = {"delivery": row["id"], "event_id": row["event_id"], "kind": row["event"],
                  "target": name, "attempt": attempts, "response": outcome.response,
                  "merged": merged}
        if name in self._hook_statuses:
            self.last_hook_error = None if status == "sent" else (
                f"{target.command[0]}: {outcome.error}")
        if status == "sent":
            log.info("notify_sent", **fields)
        elif status == "dead":
            if name not in self._hook_statuses:
                self.last_error = (f"{name}: {row['event']} dead after {attempts}"
                                   f" attempts: {outcome.error}")
            log.warning("notify_dead", error=outcome.error, **fields)
        else:
            log.info("notify_retry", error=outcome.error, retry_at=to_db_time(retry_at),
                     **fields)

    def render(self, target: NotifyConfig, event_id: str, event: str, at: str,
               data: dict[str, Any], now: datetime) -> tuple[str, dict[str, str], bytes]:
        """The URL, headers and body of one attempt, signed at `now`."""
        secret = ENV_REF_RE.sub(lambda m: self.environ.get(m.group(1), ""), target.secret)
        url = ENV_REF_RE.sub(lambda m: self.environ.get(m.group(1), ""), target.url)
        tz = ZoneInfo(self.config.daemon.timezone)
        if target.name in self._hook_statuses:  # the payload [[hooks]] always had
            payload: dict[str, Any] = {"event": data["event"], "task": present(data["task"], tz),
                                       "content": present(data["content"], tz)}
        elif target.format == "json":
            payload = {"id": event_id, "event": event, "at": at, "data": data}
        else:
            title, lines = event_text(event, data, tz)
            payload = chat_body(target.format, title, lines, secret, now)
        body = json.dumps(payload, ensure_ascii=False, default=str).encode()
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "User-Agent": f"contenthubd/{__version__}", "X-ContentHub-Event": event,
                   "X-ContentHub-Delivery": event_id}
        if secret:
            headers["X-ContentHub-Signature"] = signature_header(secret, int(now.timestamp()),
                                                                 body)
            if target.format == "dingtalk":
                stamp = int(now.timestamp() * 1000)
                url += ("&" if "?" in url else "?") + urllib.parse.urlencode(
                    {"timestamp": stamp, "sign": dingtalk_sign(secret, stamp)})
        return url, headers, body

    async def send(self, target: NotifyConfig, event_id: str, event: str, at: str,
                   data: dict[str, Any]) -> SendOutcome:
        """One attempt to one target; never raises for the receiver's faults."""
        url, headers, body = self.render(target, event_id, event, at, data, self.clock())
        if target.command:
            env = child_environment(self.environ, {
                "CONTENTHUB_EVENT": event, "CONTENTHUB_DELIVERY": event_id,
                "CONTENTHUB_SIGNATURE": headers.get("X-ContentHub-Signature", "")})
            try:
                argv = (render_argv(target.command, task_values(data["task"]))
                        if target.name in self._hook_statuses else target.command)
                result = await run_process(argv, stdin=body, env=env,
                                           timeout=target.timeout, max_output=1 << 16)
            except (OSError, ValueError) as exc:
                return SendOutcome("", f"cannot run {target.command[0]}: {exc}")
            failure = result.failure(target.timeout, 300)
            if failure is not None:
                return SendOutcome("timed out" if result.timed_out
                                   else f"exit {result.exit_code}", failure)
            return SendOutcome("exit 0")
        if url.startswith("https://") and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            response = await http_post(url, body, headers, target.timeout, self._ssl)
        except TimeoutError:
            return SendOutcome("timed out", f"no answer within {target.timeout:g}s")
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            return SendOutcome("", f"{type(exc).__name__}: {exc}"[:300])
        shown = f"HTTP {response.status}"
        retry_after = response.headers.get("retry-after", "")
        wait = float(retry_after) if re.fullmatch(r"\d+(\.\d+)?", retry_after) else None
        if not 200 <= response.status < 300:
            detail = response.body[:200].decode(errors="replace").strip()
            return SendOutcome(shown, f"{shown}" + (f": {detail}" if detail else ""), wait)
        return SendOutcome(shown, chat_error(target.format, response))

    async def _emit_due_digests(self, now: datetime) -> None:
        for name, (trigger, instant) in list(self._digests.items()):
            if instant > now:
                continue
            await self.store.add_digest(name, instant, ZoneInfo(self.config.daemon.timezone),
                                        now)
            self._digests[name] = (trigger, trigger.next_after(now))

    # -- operator actions ----------------------------------------------------------------------

    async def test(self, name: str) -> dict[str, Any]:
        """`notify test NAME`: a test event now, straight to the target, not via the outbox."""
        configured = {target.name: target for target in self.config.notify}
        target = configured.get(name)
        if target is None:
            raise NotFound(f"no [[notify]] target named {name!r}; configured: "
                           + (", ".join(configured) or "none"))
        now = self.clock()
        event_id = new_event_id(now)
        outcome = await self.send(target, event_id, "test", to_db_time(now), {
            "message": f"来自 contenthubd {__version__} 的测试消息：收到即表示 {name} 配置正确。"})
        return {"target": name, "event_id": event_id, "ok": outcome.error is None,
                "response": outcome.response, "error": outcome.error}

# Built-in creator ##############################################################################

CREATOR_EXIT_RETRYABLE = 1  #: the daemon retries the task with backoff
CREATOR_EXIT_PERMANENT = 2  #: in the default `permanent_exit_codes`: fail the task at once
LLM_RETRY_AFTER_CAP_S = 30.0  #: a longer Retry-After is better handled by the daemon's retry
LLM_MAX_RESPONSE_BYTES = 16 << 20
LLM_TEMPERATURE = 0.7
LLM_RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})  #: plus every 5xx
#: Other 4xx answers, by what they say about the creator (default: this task's request).
LLM_STATUS_CLASSES = {401: "auth_failed", 403: "auth_failed", 402: "quota_exhausted",
                      404: "misconfigured"}
_THINK_BLOCK_RE = re.compile(r"^\s*<think>.*?</think>\s*", re.S)
_WRAPPING_FENCE_RE = re.compile(r"^\s*```[ \t]*(?:markdown|md)?[ \t]*\n(.*?)\n[ \t]*```\s*$",
                                re.S | re.I)
_CATEGORY_KEYS = {"技术": "技术", "tech": "技术", "technology": "技术",
                  "产品": "产品", "product": "产品",
                  "运营": "运营", "operations": "运营", "ops": "运营",
                  "营销": "营销", "marketing": "营销"}
_CATEGORY_NAMES_EN = {"技术": "Tech", "产品": "Product", "运营": "Operations", "营销": "Marketing"}

#: Per language and category: the title's subtitle and the sections (heading, opening text).
#: "" is the outline for any other category. {topic} and {audience} are filled in.
_OFFLINE_OUTLINES: dict[str, dict[str, tuple[str, tuple[tuple[str, str], ...]]]] = {
    "zh": {
        "技术": ("原理、实践与趋势", (
            ("背景", "{topic}之所以受到关注，是因为它正在改变团队解决问题的方式。对{audience}而言，"
                     "先弄清它出现的背景和要解决的痛点，才能判断它是否值得投入。"),
            ("原理解析", "理解{topic}，关键在于拆开它的核心机制：输入是什么、经过哪些处理、"
                         "输出又如何被验证。把每一层的职责讲清楚，复杂的系统也就有了清晰的脉络。"),
            ("实践要点", "落地{topic}时，建议从一个边界清晰的小场景开始，先跑通流程、建立评估指标，"
                         "再逐步扩大范围，同时关注稳定性、成本与可维护性。"),
            ("趋势展望", "展望未来，{topic}会朝着更易用、更可靠、更低成本的方向演进。"
                         "持续跟踪社区动态、保留可替换的架构设计，是应对变化的稳妥做法。"))),
        "产品": ("体验、功能与价值", (
            ("产品定位", "评价{topic}，首先要回答它为谁解决什么问题。清晰的定位决定了功能取舍，"
                         "也决定了{audience}能否在第一时间感受到价值。"),
            ("核心功能", "{topic}的核心功能可以从高频场景出发梳理：哪些能力每天都会用到，"
                         "哪些只是锦上添花。主次分明，产品才不会变得臃肿。"),
            ("使用体验", "真实的使用体验藏在细节里：上手是否顺畅、反馈是否及时、"
                         "出错时能否快速恢复。这些细节共同构成了用户对{topic}的整体印象。"),
            ("优化建议", "针对{topic}，可以从数据和用户反馈两条线同时入手，"
                         "优先解决影响面最大的问题，再逐步打磨体验细节。"))),
        "运营": ("策略、执行与复盘", (
            ("现状分析", "做好{topic}，第一步是看清现状：用户从哪里来、在哪里流失、"
                         "哪些环节贡献了主要价值。数据是判断的起点，而不是事后的装饰。"),
            ("策略制定", "在现状基础上，{topic}的策略应当聚焦少数关键目标，"
                         "把资源投入到最能撬动增长的环节，并为每个目标设定可衡量的指标。"),
            ("执行落地", "策略需要拆解成具体动作：谁负责、什么时候完成、用什么标准验收。节奏稳定、"
                         "分工清晰，{topic}才能真正落地。"),
            ("复盘优化", "每个周期结束后都应复盘{topic}的结果，保留有效做法、淘汰低效动作，"
                         "让运营形成持续改进的闭环。"))),
        "营销": ("洞察、策略与转化", (
            ("市场洞察", "{topic}的出发点是对市场的准确判断：需求在哪里、竞争者在做什么、"
                         "还有哪些未被满足的空白。"),
            ("目标人群", "明确目标人群，才能让{topic}的信息触达真正需要的人。对{audience}来说，"
                         "画像越具体，沟通就越有效。"),
            ("策略打法", "围绕{topic}，可以把内容、渠道与活动组合起来，形成前后呼应的节奏，"
                         "让每一次触达都为下一次转化做铺垫。"),
            ("转化优化", "转化是检验{topic}成效的最终标准。持续测试文案、页面与流程，"
                         "把每一步的流失降到最低，投入才能产生可衡量的回报。"))),
        "": ("要点与实践", (
            ("背景", "{topic}并不是一个孤立的话题，它与行业的发展和用户需求的变化紧密相连。"
                     "先了解来龙去脉，才能把握讨论的重点。"),
            ("核心要点", "梳理{topic}，可以抓住几个核心要点：它解决什么问题、依赖哪些条件、"
                     "可能带来哪些影响。"),
            ("实践建议", "在实际工作中推进{topic}，建议先小范围尝试，及时总结经验，再逐步推广。"),
            ("未来展望", "展望未来，{topic}仍有很大的发展空间，值得{audience}持续关注与投入。"))),
    },
    "en": {
        "技术": ("Principles, Practice and Trends", (
            ("Background", "{topic} draws attention because it changes how teams approach a "
                           "familiar problem. For {audience}, knowing where it comes from and "
                           "which pain points it addresses is the first step in deciding whether "
                           "it deserves investment."),
            ("How It Works", "Understanding {topic} means taking its core mechanism apart: what "
                             "goes in, how it is processed and how the output is verified. Once "
                             "each layer's job is clear, even a complex system becomes easy to "
                             "follow."),
            ("Putting It into Practice", "When adopting {topic}, start with a small, well-bounded "
                                         "use case, get it running end to end and define how "
                                         "success is measured before widening the scope, keeping "
                                         "an eye on reliability, cost and maintainability."),
            ("Looking Ahead", "Looking ahead, {topic} will keep moving toward being easier to use, "
                              "more dependable and cheaper to run. Following the community closely "
                              "and keeping the architecture replaceable is the safe way to ride "
                              "that change."))),
        "产品": ("Experience, Features and Value", (
            ("Positioning", "Evaluating {topic} starts with one question: whom does it serve, and "
                            "which problem does it solve? A clear position drives every feature "
                            "decision and decides whether {audience} see its value right away."),
            ("Core Features", "The core features of {topic} are best mapped from high-frequency "
                              "scenarios: which capabilities are used every day and which are "
                              "nice-to-have extras. Clear priorities keep a product from "
                              "bloating."),
            ("User Experience", "Real user experience lives in the details: how smooth onboarding "
                                "is, how quickly the product responds and how easily users recover "
                                "from mistakes. Together they shape how people feel about "
                                "{topic}."),
            ("Recommendations", "To improve {topic}, work from both data and user feedback, fix "
                                "the issues with the widest impact first, then polish the "
                                "details."))),
        "运营": ("Strategy, Execution and Review", (
            ("Where Things Stand", "Doing {topic} well starts with an honest look at the current "
                                   "state: where users come from, where they drop off and which "
                                   "steps create most of the value. Data is where judgment starts, "
                                   "not decoration added afterwards."),
            ("Strategy", "Building on that picture, the strategy for {topic} should focus on a few "
                         "key goals, put resources where they move growth the most and give every "
                         "goal a measurable target."),
            ("Execution", "A strategy only works once it is broken down into concrete actions: who "
                          "owns them, when they are due and how they are accepted. A steady rhythm "
                          "and clear ownership turn {topic} into results."),
            ("Review and Iterate", "At the end of each cycle, review the results of {topic}: keep "
                                   "what worked, drop what did not and let operations improve in a "
                                   "continuous loop."))),
        "营销": ("Insight, Strategy and Conversion", (
            ("Market Insight", "{topic} begins with an accurate reading of the market: where the "
                               "demand is, what competitors are doing and which needs remain "
                               "unmet."),
            ("Target Audience", "A clearly defined audience lets {topic} reach the people who "
                                "actually need it. For {audience}, the sharper the persona, the "
                                "more effective the message."),
            ("Playbook", "Around {topic}, combine content, channels and campaigns into a "
                         "coordinated rhythm so that every touchpoint prepares the next "
                         "conversion."),
            ("Conversion", "Conversion is the final test of {topic}. Keep testing copy, landing "
                           "pages and flows, and cut drop-off at every step so the investment "
                           "produces measurable returns."))),
        "": ("Key Points and Practice", (
            ("Background", "{topic} is not an isolated subject; it is closely tied to how the "
                           "industry is evolving and how user needs are changing. Knowing the "
                           "context makes it easier to focus on what matters."),
            ("Key Points", "A few key points frame {topic}: which problem it solves, which "
                           "conditions it depends on and what impact it may have."),
            ("In Practice", "To move {topic} forward in day-to-day work, start with a small trial, "
                            "capture the lessons quickly and then roll out step by step."),
            ("Outlook", "Looking ahead, {topic} still has plenty of room to grow and deserves "
                        "continued attention from {audience}."))),
    },
}
#: Openings for sections the requirements name ("sections": [...]), used in rotation.
_CUSTOM_SECTION_TEXTS = {
    "zh": ("谈到{heading}，首先要把它放回{topic}的整体语境中理解，弄清它解决的问题和适用的边界。",
           "从{heading}的角度看，{topic}已经在多个场景中展现出价值，"
           "关键在于找到与自身需求匹配的切入点。",
           "{heading}这一部分值得{audience}重点关注：它直接关系到{topic}能否真正产生效果。",
           "围绕{heading}，建议保持开放而审慎的态度，既积极尝试，也用数据检验每一步的成效。"),
    "en": ("When it comes to {heading}, it helps to place it in the wider context of {topic} and "
           "be clear about the problem it solves and where its limits lie.",
           "From the angle of {heading}, {topic} has already shown its value in several scenarios; "
           "the key is finding the entry point that matches your own needs.",
           "{heading} deserves particular attention from {audience}, because it decides whether "
           "{topic} delivers real results.",
           "Around {heading}, keep an open but careful attitude: experiment actively and check "
           "every step against data."),
}
#: How a section's share of the keywords is woven in, used in rotation.
_KEYWORD_SENTENCES = {
    "zh": ("这一部分需要特别关注{keywords}。", "结合{keywords}来看，这一点体现得尤为明显。",
           "在实践中，对{keywords}的把握往往决定了最终效果的上限。", "围绕{keywords}的新进展，"
                                               "同样值得持续关注。"),
    "en": ("In this part, pay particular attention to {keywords}.",
           "Seen through {keywords}, this point becomes especially clear.",
           "In practice, the handling of {keywords} often sets the ceiling for the result.",
           "Developments around {keywords} are also worth following closely."),
}


class BuiltinCreatorError(Exception):
    """Why `contenthubd create` gives up: printed as the structured error object, with an exit
    code that says the same to a daemon reading only exit codes (sysexits where one fits)."""

    def __init__(self, message: str, error_class: str = "invalid_input",
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.retry_after = retry_after

    @property
    def exit_code(self) -> int:
        sysexit = {cls: code for code, cls in SYSEXITS_CLASSES.items()}.get(self.error_class)
        if sysexit is not None:
            return sysexit
        return (CREATOR_EXIT_PERMANENT if self.error_class in PERMANENT_CLASSES
                else CREATOR_EXIT_RETRYABLE)

    def error_object(self, api_key: str) -> dict[str, Any]:
        # Masked: some APIs echo the key they rejected.
        error: dict[str, Any] = {"kind": self.error_class,
                                 "message": mask_values(str(self), [api_key])}
        if self.retry_after is not None:
            error["retry_after"] = self.retry_after
        return {"error": error}


class _RetryableLLMError(Exception):
    """One failed LLM attempt that another attempt may fix."""

    def __init__(self, reason: str, retry_after_s: float | None = None,
                 rate_limited: bool = False) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s
        self.rate_limited = rate_limited


@dataclass(frozen=True)
class ArticleBrief:
    """A task's fields, normalised, with a JSON `requirements` text taken apart."""

    topic: str
    keywords: tuple[str, ...]
    category: str
    account_name: str
    tone: str
    audience: str
    requirements: str  #: the free-text requirement, or "" when it was a JSON object without one
    style: str
    length: str
    sections: tuple[str, ...]  #: section headings the requirements ask for, in order
    other_requirements: tuple[tuple[str, str], ...]  #: any other JSON keys, as (key, text)
    chinese: bool  #: the topic holds CJK text, so the article is written in Chinese


def _field_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(_field_text(item) for item in value)
    return " ".join(str(value).split())


def _split_list(value: Any) -> tuple[str, ...]:
    """Keywords or sections from a list or a comma/、-separated string; blanks and repeats go."""
    items = (value if isinstance(value, (list, tuple))
             else re.split(r"[,，、;；]", _field_text(value)))
    return tuple(dict.fromkeys(text for text in map(_field_text, items) if text))


def parse_creator_task(raw: str) -> ArticleBrief:
    """The task the daemon wrote on stdin; anything unusable is a permanent error."""
    if not raw.strip():
        raise BuiltinCreatorError("no task on stdin (expected one JSON object)")
    try:
        task = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BuiltinCreatorError(f"task on stdin is not valid JSON: {exc}") from None
    if not isinstance(task, dict):
        raise BuiltinCreatorError("task on stdin must be a JSON object")
    topic = _field_text(task.get("topic"))
    if not topic:
        raise BuiltinCreatorError("task has no topic")
    requirements = task.get("requirements")
    requirements_text = "" if isinstance(requirements, dict) else str(requirements or "").strip()
    spec: dict[str, Any] = requirements if isinstance(requirements, dict) else {}
    if requirements_text.startswith("{"):
        with_json = _json_object_or_none(requirements_text)
        if with_json is not None:
            spec, requirements_text = with_json, ""
    known = {"style", "length", "sections", "tone", "audience", "target_audience", "requirements"}
    chinese = bool(CJK_CHAR_RE.search(topic))
    return ArticleBrief(
        topic=topic,
        keywords=_split_list(task.get("keywords")),
        category=_field_text(task.get("category")),
        account_name=_field_text(task.get("account_name")),
        tone=(_field_text(task.get("tone")) or _field_text(spec.get("tone"))
              or ("专业" if chinese else "professional")),
        audience=(_field_text(task.get("target_audience")) or _field_text(spec.get("audience"))
                  or _field_text(spec.get("target_audience"))
                  or ("普通读者" if chinese else "general readers")),
        requirements=requirements_text or _field_text(spec.get("requirements")),
        style=_field_text(spec.get("style")),
        length=_field_text(spec.get("length")),
        sections=_split_list(spec.get("sections")),
        other_requirements=tuple(
            (key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
            for key, value in spec.items() if key not in known and value not in (None, "")),
        chinese=chinese)


def _json_object_or_none(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# Offline draft ---------------------------------------------------------------------------------


def _join_words(items: tuple[str, ...] | list[str], chinese: bool) -> str:
    """"A、B和C" or "A, B and C"."""
    if len(items) < 2:
        return "".join(items)
    head = ("、".join(items[:-1]) + "和") if chinese else (", ".join(items[:-1]) + " and ")
    return head + items[-1]


def _category_key(category: str) -> str:
    return _CATEGORY_KEYS.get(category.strip().lower(), "")


def offline_article_markdown(brief: ArticleBrief) -> str:
    """A structured Markdown draft built only from the task's fields: same task, same text."""
    lang = "zh" if brief.chinese else "en"
    zh = brief.chinese
    subtitle, outline = _OFFLINE_OUTLINES[lang][_category_key(brief.category)]
    if brief.sections:
        texts = _CUSTOM_SECTION_TEXTS[lang]
        outline = tuple((heading, texts[i % len(texts)])
                        for i, heading in enumerate(brief.sections))
    topic_ref = f"“{brief.topic}”" if zh else brief.topic
    has_subtitle = not brief.sections and not re.search("[:：]", brief.topic)
    title = f"{brief.topic}{'：' if zh else ': '}{subtitle}" if has_subtitle else brief.topic
    headings = [heading for heading, _ in outline]
    keywords_bold = _join_words([f"**{word}**" for word in brief.keywords], zh)

    source = "「" + brief.account_name + "」" if brief.account_name else ""
    if zh:
        column = f"的「{brief.category}」栏目" if source and brief.category else (
            f"「{brief.category}」栏目" if brief.category else "")
        origin = f"来自{source}{column}，" if source or column else ""
        intro = (f"本文{origin}面向{brief.audience}，以{brief.tone}的语气探讨{topic_ref}。"
                 + (f"文章围绕{keywords_bold}展开，" if brief.keywords else "文章")
                 + f"依次讨论{_join_words(headings, zh)}。")
    else:
        category = _CATEGORY_NAMES_EN.get(_category_key(brief.category), brief.category)
        origin = (f" from {brief.account_name}" if brief.account_name else "") + (
            f" ({category})" if category else "")
        intro = (f"This article{origin} is written for {brief.audience} in a {brief.tone} tone and "
                 f"explores {brief.topic}. "
                 + (f"It focuses on {keywords_bold} and covers " if brief.keywords
                    else "It covers ")
                 + f"{_join_words(headings, zh)} in turn.")
    parts = [f"# {title}", intro]

    sentences = _KEYWORD_SENTENCES[lang]
    for index, (heading, text) in enumerate(outline):
        share = brief.keywords[index::len(outline)]
        paragraph = text.format(topic=topic_ref, audience=brief.audience, heading=heading)
        if share:
            woven = sentences[index % len(sentences)].format(
                keywords=_join_words([f"**{word}**" for word in share], zh))
            paragraph += woven if zh else " " + woven
        parts += [f"## {heading}", paragraph]

    asks = [(("风格", "Style"), brief.style), (("篇幅", "Length"), brief.length)]
    bullets = [f"- {label[0] if zh else label[1]}{'：' if zh else ': '}{value}"
               for label, value in asks if value]
    bullets += [f"- {key}{'：' if zh else ': '}{value}" for key, value in brief.other_requirements]
    if brief.requirements or bullets:
        parts.append("## 本文侧重" if zh else "## Focus of This Article")
        if brief.requirements:
            parts.append(f"本文遵循的写作要求是：“{brief.requirements}”。前文各部分均围绕这一要求组织内容，"
                         "力求观点清晰、信息准确。" if zh else
                         f"This article follows the brief “{brief.requirements}”: every section "
                         "above is organised around it, aiming for clear points and accurate "
                         "information.")
        if bullets:
            parts.append("\n".join(bullets))

    if zh:
        start = f"：从{keywords_bold}入手，" if brief.keywords else "，"
        closing = (f"总的来看，{topic_ref}既有清晰的方法可循，也需要结合实际不断打磨。希望本文能为"
                   f"{brief.audience}提供一个起点{start}在实践中持续验证与迭代。")
    else:
        start = f": begin with {keywords_bold}, then keep" if brief.keywords else " for"
        closing = (f"{brief.topic} comes with clear methods to follow, yet it still needs "
                   f"refining against real conditions. Hopefully this article gives "
                   f"{brief.audience} a useful starting point{start} testing and iterating in "
                   "practice.")
    parts += ["## 结语" if zh else "## Conclusion", closing]
    return "\n\n".join(parts) + "\n"


# LLM -------------------------------------------------------------------------------------------


def llm_messages(brief: ArticleBrief) -> list[dict[str, str]]:
    """The chat messages asking for one publishable Markdown article in the topic's language."""
    zh = brief.chinese
    if zh:
        system = ("你是一名资深中文内容编辑，为内容账号撰写可直接发布的原创文章。要求：\n"
                  "1. 只输出文章本身，使用 Markdown，不要任何解释，也不要用代码块包裹全文。\n"
                  "2. 第一行是一级标题（# 标题），正文用 ## 二级标题分节，最后一节为“## 结语”。\n"
                  "3. 使用简体中文写作。\n"
                  "4. 自然融入全部关键词，遵守写作要求、语气和目标读者；"
                  "要求中给出章节时，按顺序用作二级标题。\n"
                  "5. 内容准确、结构清晰，不编造具体数据、引用或来源。")
    else:
        system = ("You are a senior content editor writing original, ready-to-publish articles for "
                  "a publishing account. Rules:\n"
                  "1. Output only the article in Markdown: no explanations, no code fence"
                  " around it.\n"
                  "2. The first line is an H1 title (# Title); use ## headings for sections"
                  " and end with a conclusion section.\n"
                  "3. Write in English.\n"
                  "4. Use every keyword naturally and follow the requirements, tone and target "
                  "audience; when the requirements list sections, use them as the ## headings in "
                  "that order.\n"
                  "5. Be accurate and well structured; do not invent figures, quotes or sources.")
    labels = (("主题", "Topic"), ("关键词", "Keywords"), ("栏目", "Category"), ("账号", "Account"),
              ("目标读者", "Target audience"), ("语气", "Tone"), ("写作要求", "Requirements"),
              ("风格", "Style"), ("篇幅", "Length"), ("章节", "Sections"))
    values = (brief.topic, ("、" if zh else ", ").join(brief.keywords), brief.category,
              brief.account_name, brief.audience, brief.tone, brief.requirements, brief.style,
              brief.length, ("、" if zh else ", ").join(brief.sections))
    lines = [f"{label[0] if zh else label[1]}{'：' if zh else ': '}{value}"
             for label, value in zip(labels, values) if value]
    lines += [f"{key}{'：' if zh else ': '}{value}" for key, value in brief.other_requirements]
    ask = "请根据以下信息写一篇文章：" if zh else "Write an article from this brief:"
    return [{"role": "system", "content": system},
            {"role": "user", "content": ask + "\n" + "\n".join(lines)}]


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds to wait (delta-seconds or an HTTP date), capped; None if absent."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), LLM_RETRY_AFTER_CAP_S)


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The API's own error message (OpenAI shape) or the start of the body, on one line."""
    try:
        body = exc.read(4096).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return ""
    parsed = _json_object_or_none(body) or {}
    error = parsed.get("error")
    message = error.get("message") if isinstance(error, dict) else error or parsed.get("message")
    return " ".join(str(message or body).split())[:300]


def _post_chat_completion(url: str, payload: bytes, api_key: str, timeout: float) -> dict[str, Any]:
    """One POST; raises _RetryableLLMError or a permanent BuiltinCreatorError."""
    request = urllib.request.Request(url, data=payload, method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json",
        "Authorization": f"Bearer {api_key}", "User-Agent": "contenthubd-builtin-creator"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read(LLM_MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        detail = _error_detail(exc)
        reason = f"HTTP {exc.code}" + (f": {detail}" if detail else "")
        if exc.code >= 500 or exc.code in LLM_RETRYABLE_STATUSES:
            retry_after = _retry_after_s(exc.headers.get("Retry-After"))
            raise _RetryableLLMError(reason, retry_after, exc.code == 429) from None
        raise BuiltinCreatorError(f"LLM rejected the request ({reason})",
                                  LLM_STATUS_CLASSES.get(exc.code, "invalid_input")) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise BuiltinCreatorError(
                f"TLS certificate of {url} not trusted: {exc.reason}", "misconfigured") from None
        if isinstance(exc.reason, TimeoutError):
            raise _RetryableLLMError(f"timed out after {timeout:g}s") from None
        raise _RetryableLLMError(f"cannot reach {url}: {exc.reason}") from None
    except TimeoutError:
        raise _RetryableLLMError(f"timed out after {timeout:g}s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _RetryableLLMError(f"connection failed: {type(exc).__name__}: {exc}") from None
    if len(raw) > LLM_MAX_RESPONSE_BYTES:
        raise _RetryableLLMError(f"response larger than {LLM_MAX_RESPONSE_BYTES} bytes")
    data = _json_object_or_none(raw.decode("utf-8", "replace"))
    if data is None:
        raise _RetryableLLMError("response is not a JSON object")
    return data


def _completion_markdown(data: dict[str, Any]) -> str:
    """choices[0].message.content without a reasoning preamble or a fence around the whole."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _RetryableLLMError("response has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise _RetryableLLMError("choices[0].message.content is not text")
    content = _THINK_BLOCK_RE.sub("", content)
    fenced = _WRAPPING_FENCE_RE.match(content)
    content = (fenced.group(1) if fenced else content).strip()
    if not content:
        raise _RetryableLLMError("the model returned an empty article")
    return content + "\n"


def llm_article(brief: ArticleBrief, options: argparse.Namespace, api_key: str) -> dict[str, Any]:
    """Ask the OpenAI-compatible endpoint, retrying 429/5xx/network errors with backoff."""
    base_url = options.llm_base_url.strip().rstrip("/")
    if not re.match(r"https?://", base_url, re.I):
        raise BuiltinCreatorError(f"--llm-base-url must be an http(s) URL, got {base_url!r}",
                                  "misconfigured")
    url = f"{base_url}/chat/completions"
    payload = json.dumps({"model": options.llm_model, "messages": llm_messages(brief),
                          "temperature": LLM_TEMPERATURE, "stream": False},
                         ensure_ascii=False).encode()
    attempts = options.retries + 1
    reported: list[dict[str, Any]] = []  #: the usage of every answer, a useless one too
    for attempt in range(1, attempts + 1):
        _emit_progress(20, f"calling LLM {options.llm_model} (attempt {attempt} of {attempts})")
        try:
            data = _post_chat_completion(url, payload, api_key, options.timeout)
            if isinstance(data.get("usage"), dict):
                reported.append(data["usage"])
            content = _completion_markdown(data)
            break
        except _RetryableLLMError as exc:
            if attempt == attempts:
                raise BuiltinCreatorError(
                    f"LLM request failed after {attempts} attempt(s): {exc}",
                    "rate_limited" if exc.rate_limited else "transient",
                    exc.retry_after_s if exc.rate_limited else None) from None
            delay = (exc.retry_after_s if exc.retry_after_s is not None
                     else options.retry_backoff * 2 ** (attempt - 1))
            _emit_progress(20, mask_values(f"{exc}; retrying in {delay:g}s", [api_key]))
            time.sleep(delay)
    _emit_progress(90, "formatting article")
    return {"title": markdown_title(content) or brief.topic, "content": content,
            "summary": plain_summary(content), "word_count": count_words(content), "images": [],
            "quality_score": None, "generator": "llm",
            "model": data.get("model") or options.llm_model, "usage": summed_usage(reported)}


def summed_usage(reported: list[dict[str, Any]]) -> dict[str, Any]:
    """One answer's usage as the API gave it; several (an empty article was asked again)
    summed, since each one was billed."""
    if len(reported) == 1:
        return reported[0]
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {key: sum(u[key] for u in reported if isinstance(u.get(key), int)) for key in keys
            if any(key in u for u in reported)}


def offline_article(brief: ArticleBrief) -> dict[str, Any]:
    _emit_progress(50, "writing offline draft")
    content = offline_article_markdown(brief)
    return {"title": markdown_title(content) or brief.topic, "content": content,
            "summary": plain_summary(content), "word_count": count_words(content), "images": [],
            "quality_score": None, "generator": "offline-template", "model": None}


# Entry -----------------------------------------------------------------------------------------


def _print_json_line(obj: dict[str, Any]) -> None:
    """One JSON line, UTF-8 whatever the locale, flushed so the daemon sees progress live."""
    line = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
    stream = getattr(sys.stdout, "buffer", None)
    if stream is None:
        sys.stdout.write(line.decode())
        sys.stdout.flush()
    else:
        stream.write(line)
        stream.flush()


def _emit_progress(progress: int, stage: str) -> None:
    _print_json_line({"progress": progress, "stage": stage})


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _builtin_creator_parser() -> argparse.ArgumentParser:
    llm = LLMConfig()  # the defaults of [creator.llm]: one set for the daemon and this CLI
    parser = argparse.ArgumentParser(
        prog="contenthubd create",
        description="Write one article for the task given as a JSON object on stdin. Prints "
                    '{"progress", "stage"} lines, then the article as one JSON line. Without an '
                    "API key (or with --offline) the article is an offline draft from the "
                    "task's fields. Exit 0 done; on failure an {\"error\": {...}} line and exit"
                    " 75 transient, 77 auth failed, 78 misconfigured, 2 bad task, 1 other.")
    parser.add_argument("--llm-base-url", default=llm.base_url,
                        help="OpenAI-compatible API root; /chat/completions is appended")
    parser.add_argument("--llm-model", default=llm.model,
                        help="model name sent in the request")
    parser.add_argument("--api-key-env", default=llm.api_key_env, metavar="VAR",
                        help="environment variable holding the API key (never pass the key itself)")
    parser.add_argument("--timeout", type=_positive_float, default=llm.timeout, metavar="SECONDS",
                        help="per HTTP request")
    parser.add_argument("--retries", type=_non_negative_int, default=3,
                        help="extra attempts after a 429, 5xx, timeout or connection error")
    parser.add_argument("--retry-backoff", type=_positive_float, default=1.0, metavar="SECONDS",
                        help="wait before the first retry, doubled for each next one, unless the "
                             "server sends Retry-After")
    parser.add_argument("--offline", action="store_true", help="write the offline draft even "
                                                               "when the API key is set")
    return parser


def run_builtin_creator(argv: list[str]) -> int:
    """`contenthubd create`: 0 = article printed; on failure the reason goes to stderr and a
    `{"error": {"kind", "message", "retry_after"}}` line to stdout, and the exit code is 75
    (transient), 77 (auth_failed), 78 (misconfigured), 2 (this task cannot be done) or 1."""
    try:
        options = _builtin_creator_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else CREATOR_EXIT_PERMANENT
    api_key = "" if options.offline else os.environ.get(options.api_key_env, "").strip()
    try:
        if sys.stdin is None:
            raw = ""
        else:
            if sys.stdin.isatty():
                print("contenthubd create: reading the task as JSON from stdin", file=sys.stderr)
            raw = sys.stdin.buffer.read().decode("utf-8-sig", "replace")
        brief = parse_creator_task(raw)
        _emit_progress(10, "task parsed")
        article = llm_article(brief, options, api_key) if api_key else offline_article(brief)
    except BuiltinCreatorError as exc:
        print(f"contenthubd create: {mask_values(str(exc), [api_key])}", file=sys.stderr)
        _print_json_line(exc.error_object(api_key))
        return exc.exit_code
    _emit_progress(100, "done")
    _print_json_line(article)
    return 0


# Topic research ---------------------------------------------------------------------------------


def research_messages(request: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages asking for `count` new topics for one account, listing the topics
    and titles it already has so the model proposes others."""
    name, category = _field_text(request.get("account_name")), _field_text(request.get("category"))
    hint, count = _field_text(request.get("hint")), int(request.get("count") or 5)
    avoid = [_field_text(text) for text in request.get("avoid") or [] if _field_text(text)]
    if CJK_CHAR_RE.search(name + category + hint) or not (name + category + hint):
        system = ("你是内容平台的选题编辑。只输出一个 JSON 数组，不要任何解释。每个元素是对象"
                  '{"topic": "选题标题", "keywords": "关键词1,关键词2"}。选题要具体、新颖、'
                  "适合写成一篇文章。")
        lines = [f"请为账号「{name}」策划 {count} 个新选题。"]
        lines += [f"栏目：{category}"] if category else []
        lines += [f"方向：{hint}"] if hint else []
        if avoid:
            lines.append("以下选题和标题已经用过或已排期，不要重复，也不要只换个说法：")
            lines += [f"- {text}" for text in avoid]
    else:
        system = ("You are the topic editor of a content platform. Output only a JSON array, no "
                  'explanation. Each item is an object {"topic": "headline", "keywords": '
                  '"keyword1,keyword2"}. Topics are specific, fresh, and fit one article each.')
        lines = [f"Plan {count} new topics for the account \"{name}\"."]
        lines += [f"Category: {category}"] if category else []
        lines += [f"Direction: {hint}"] if hint else []
        if avoid:
            lines.append("These topics and titles are used or planned already; do not repeat"
                         " them or merely reword them:")
            lines += [f"- {text}" for text in avoid]
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]


def run_builtin_research(argv: list[str]) -> int:
    """`contenthubd research-topics`: the research request as JSON on stdin, one chat
    completion, the topics as a JSON array on stdout. 0 = printed, else the exit codes of
    `contenthubd create` (75 transient, 77/78 key or endpoint rejected, 2 bad request)."""
    parser = _builtin_creator_parser()
    parser.prog = "contenthubd research-topics"
    parser.description = ("Ask the OpenAI-compatible endpoint for new topics for the account in"
                          " the JSON request on stdin; print them as a JSON array.")
    try:
        options = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else CREATOR_EXIT_PERMANENT
    api_key = os.environ.get(options.api_key_env, "").strip()
    try:
        if not api_key:
            raise BuiltinCreatorError(f"no API key in ${options.api_key_env}; research needs"
                                      " the LLM")
        raw = sys.stdin.buffer.read().decode("utf-8-sig", "replace") if sys.stdin else ""
        request = _json_object_or_none(raw)
        if request is None:
            raise BuiltinCreatorError("expected the research request as a JSON object on stdin")
        base_url = options.llm_base_url.strip().rstrip("/")
        if not re.match(r"https?://", base_url, re.I):
            raise BuiltinCreatorError(f"--llm-base-url must be an http(s) URL, got {base_url!r}")
        payload = json.dumps({"model": options.llm_model, "messages": research_messages(request),
                              "temperature": LLM_TEMPERATURE, "stream": False},
                             ensure_ascii=False).encode()
        attempts = options.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                data = _post_chat_completion(f"{base_url}/chat/completions", payload, api_key,
                                             options.timeout)
                content = _completion_markdown(data)
            except _RetryableLLMError as exc:
                if attempt == attempts:
                    raise BuiltinCreatorError(f"LLM research failed after {attempts}"
                                              f" attempt(s): {exc}", "transient") from None
                time.sleep(exc.retry_after_s if exc.retry_after_s is not None
                           else options.retry_backoff * 2 ** (attempt - 1))
                continue
            try:
                topics = parse_topic_reply(content)
            except ValueError as exc:
                # Asked for a JSON array and answered otherwise: the same prompt again is
                # unlikely to do better; the next scheduled research run asks afresh.
                raise BuiltinCreatorError(f"the LLM's reply holds no topics ({exc}):"
                                          f" {' '.join(content.split())[:200]}") from None
            break
    except BuiltinCreatorError as exc:
        print(f"contenthubd research-topics: {mask_values(str(exc), [api_key])}", file=sys.stderr)
        return exc.exit_code
    sys.stdout.buffer.write(json.dumps(topics, ensure_ascii=False).encode() + b"\n")
    return 0


# App ###########################################################################################


#: `monitor health` warns when an account's pool holds fewer topics than this many firings take
TOPICS_LOW_FIRINGS = 3


def toml_value(value: Any) -> str:
    """A TOML literal for the plain values a schedule holds (str, number, bool, list, table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else json.dumps(k, ensure_ascii=False)}"
                 f" = {toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    raise InvalidRequest(f"cannot write {value!r} to TOML")


def write_atomically(path: Path, text: str, *, unchanged_from: str | None = None) -> None:
    """Replace `path` so a reader sees the old file or the new one, never half of it. A
    symlink stays a symlink: its target is replaced. With `unchanged_from`, a file that no
    longer holds that text (an editor saved meanwhile) is left alone: Conflict."""
    target = path.resolve()
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(OSError):
            os.chmod(temp, target.stat().st_mode & 0o7777)
        if unchanged_from is not None and target.read_text(encoding="utf-8") != unchanged_from:
            raise Conflict(f"{path} changed while it was being edited; nothing was written,"
                           " try again")
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_directory(target.parent)

def without_schedule_block(text: str, index: int) -> str:
    """`text` without its `index`-th [[schedules]] block: from that header up to the next
    table that is not one of its own sub-tables ([schedules.params]), less the comment lines
    right above that table (they belong to it). Everything else is kept byte for byte."""
    lines = text.splitlines(keepends=True)
    start = _header_lines(text, "schedules")[index]
    own = re.compile(r"^\s*\[\[?\s*schedules\s*\.")
    end = start + 1
    while end < len(lines) and not (lines[end].lstrip().startswith("[")
                                    and not own.match(lines[end])):
        end += 1
    if end < len(lines):
        while lines[end - 1].lstrip().startswith("#"):
            end -= 1
    else:
        while start > 0 and not lines[start - 1].strip():
            start -= 1  # the last block: the blank lines before it go with it
    return "".join(lines[:start] + lines[end:])


class App(FollowsConfig):
    """Owns the running config, the store, the loops, the pool and the control socket: all
    mutable state.

    serve() = startup() -> main_loop() -> shutdown(). Signal handlers only set events; the
    main loop reacts. A second SIGTERM/SIGINT kills the creators' groups and exits at once;
    the next start's recovery puts their tasks back in the queue.
    """

    def __init__(self, config: Config, environ: dict[str, str],
                 clock: Callable[[], datetime] = utc_now,
                 triggers: dict[tuple[Any, ...], Trigger] | None = None):
        self.live = LiveConfig(config)
        self.environ = environ
        self.clock = clock
        self.store = Store(config.database_path(environ))
        self.pool = WorkerPool(self.store, self.live, environ, clock)
        self.scheduler = Scheduler(self.store, self.live, environ, self.pool.wake, clock,
                                   triggers)
        self.poll_loop = PollLoop(self.store, self.live, self.pool, clock)
        self.notifier = Notifier(self.store, self.live, environ, clock)
        self.media = MediaCapture(self.store, self.live, environ, clock)
        self.control: ControlServer | None = None
        # At start the pool, notifier and media derive theirs as they are built; startup()
        # plans the schedules once the database is open. A reload re-derives in this order:
        # creator settings, delivery targets and the media fetcher (no await, so no task
        # starts in between), then the schedule plan (it may fire at once), the socket's
        # permissions last.
        self.live.on_swap(self.pool.apply_config, self.notifier.apply_config,
                          self.media.apply_config, self.scheduler.apply_config,
                          self._apply_control_config)
        self.should_exit = asyncio.Event()
        self.force_exit = asyncio.Event()  #: a second stop signal during shutdown
        self.reload_requested = asyncio.Event()
        self.status_dirty = asyncio.Event()
        self.metrics_dirty = asyncio.Event()
        self.started_at: datetime | None = None
        self.last_reload_error: str | None = None
        self._lock_fd: int | None = None
        #: Reloads and schedule edits read, write and apply the file across awaits: one at a
        #: time, so a SIGHUP cannot interleave with `scheduler create`.
        self._config_lock = asyncio.Lock()
        self._background: list[asyncio.Task] = []

    # -- lifecycle -----------------------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)
        try:
            await self.startup()
        except StartupError as exc:
            log.error("startup_failed", error=str(exc))
            await self._stop_components()
            return exc.exit_code
        except sqlite3.DatabaseError as exc:
            if _damage(exc) is None:
                log.exception("startup_crashed")
                await self._stop_components()
                raise
            # Met after the open (a read-only file already in WAL mode fails its first write).
            log.error("startup_failed", error=f"database {self.store.path} is unusable: {exc};"
                      f" {DAMAGE_NEXT_STEP}")
            await self._stop_components()
            return EX_CONFIG
        except BaseException:
            log.exception("startup_crashed")
            await self._stop_components()
            raise
        try:
            await self.main_loop()
        except BaseException:
            log.exception("daemon_crashed")
            await self._stop_components()
            raise
        await self.shutdown()
        return 0

    def _on_stop_signal(self) -> None:
        """The first stop signal asks for a graceful stop; a second one, for a forced exit
        (shutdown() honours it). A handler only sets flags."""
        (self.force_exit if self.should_exit.is_set() else self.should_exit).set()

    async def startup(self) -> None:
        state_dir = self.config.state_dir(self.environ)
        state_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock(state_dir)
        try:
            write_builtin_bytecode(state_dir)
        except OSError as exc:
            raise StartupError(f"cannot write the built-in creator's bytecode under"
                               f" {state_dir}: {exc}") from None
        await self.store.open()
        await self.recover()
        await self.store.sync_accounts(self.config.accounts, self.clock())
        self.config.creator_cwd(self.environ).joinpath("data").mkdir(parents=True,
                                                                      exist_ok=True)
        await self.scheduler.apply_config(self.config)
        socket_path = self.config.socket_path(self.environ)
        await self._claim_socket(socket_path)
        self.control = ControlServer(socket_path, self.live, self.store, self.pool,
                                     self.scheduler, self.media, {
            "version": self.cmd_version, "reload": self.cmd_reload, "config": self.cmd_config,
            "monitor.health": self.cmd_health, "scheduler.create": self.cmd_scheduler_create,
            "scheduler.delete": self.cmd_scheduler_delete,
            "notify.test": self.cmd_notify_test, "notify.retry": self.cmd_notify_retry})
        await self.control.start()
        self.pool.on_finished = self._task_finished
        self.scheduler.on_clock_jump = self._clock_jumped
        self.pool.on_media_queued = self.media.wake
        await self.media.start()
        await self.pool.start()
        await self.poll_loop.start()
        await self.notifier.start()
        if self.config.hooks:
            log.info("hooks_delivered_by_notify", hooks=len(self.config.hooks),
                     hint="[[hooks]] run as [[notify]] command targets hooks[0], hooks[1], ...:"
                     " kept across crashes and retried; see contenthubctl notify list")
        await self.scheduler.start()
        self._background.append(asyncio.create_task(self._metrics_textfile_loop(),
                                                    name="metrics-textfile"))
        if self.environ.get("NOTIFY_SOCKET"):
            self._background.append(asyncio.create_task(self._status_loop(), name="sd-status"))
            interval = watchdog_interval(self.environ)
            if interval:
                self._background.append(asyncio.create_task(self._watchdog_loop(interval),
                                                            name="sd-watchdog"))
        self.started_at = self.clock()
        for warning in config_warnings(self.config, self.environ):
            log.warning("config_warning", warning=warning)
        self._background.append(asyncio.create_task(self._startup_health_check(),
                                                    name="startup-health"))
        sd_notify("READY=1", f"STATUS={await self._status_line()}", environ=self.environ)
        log.info("daemon_started", version=__version__, pid=os.getpid(),
                 database=str(self.store.path), socket=str(socket_path),
                 workers=self.pool.capacity, creator=self.config.creator.kind)

    async def main_loop(self) -> None:
        while not self.should_exit.is_set():
            stop = asyncio.ensure_future(self.should_exit.wait())
            reload = asyncio.ensure_future(self.reload_requested.wait())
            await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            reload.cancel()
            if self.reload_requested.is_set() and not self.should_exit.is_set():
                self.reload_requested.clear()
                try:
                    await self.reload()
                except ConfigError:
                    pass  # reload() logged it and kept the old config
                except Exception as exc:
                    log.exception("reload_failed")
                    self.last_reload_error = f"reload failed: {exc}"
                    sd_notify("READY=1", f"STATUS=reload failed: {exc}", environ=self.environ)

    async def shutdown(self) -> None:
        """The graceful stop; a second stop signal meanwhile kills the creators' groups and
        exits 1 at once (the next start's recovery requeues their tasks)."""
        log.info("daemon_stopping", running=len(self.pool.running),
                 hint="press Ctrl-C again to force (or send a second SIGTERM): creators are"
                      " killed and their tasks requeued at the next start")
        sd_notify("STOPPING=1", environ=self.environ)
        steps = asyncio.ensure_future(self._stop_components())
        forced = asyncio.ensure_future(self.force_exit.wait())
        await asyncio.wait({steps, forced}, return_when=asyncio.FIRST_COMPLETED)
        if not steps.done():
            log.warning("forced_exit", running=len(self.pool.running),
                        hint="a second stop signal: creators killed, tasks requeued at start")
            self.pool.kill_all_now()
            sys.stderr.flush()
            os._exit(1)
        forced.cancel()
        await steps
        log.info("daemon_stopped")

    async def _stop_components(self) -> None:
        """Stop what startup() started, in reverse order; each stop is idempotent, so this
        also releases a start-up that failed half-way."""
        if self.control is not None:
            await self.control.stop()
        await self.scheduler.stop()
        await self.poll_loop.stop()
        await self.pool.stop(self.config.daemon.shutdown_grace)
        await self.notifier.stop()
        await self.media.stop()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._release()

    async def _release(self) -> None:
        await self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _acquire_lock(self, state_dir: Path) -> None:
        """One daemon per database: an flock that the kernel drops when we die, even by -9."""
        path = self.store.path.with_name(self.store.path.name + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(f"another contenthubd (pid {holder}) is already running on "
                               f"{self.store.path}; stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    @staticmethod
    async def _claim_socket(path: Path) -> None:
        """A socket file left by a crash is removed; one that answers belongs to a live daemon."""
        if not path.exists():
            return
        try:
            _reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError:
            path.unlink(missing_ok=True)
            return
        writer.close()
        raise StartupError(f"socket {path} is in use by another contenthubd; stop it or set a"
                           " different [daemon] socket")

    async def recover(self) -> None:
        """After a crash: kill the creator groups an earlier daemon left running and put their
        tasks back in the queue. Before any task runs, every process carrying the id of one
        of this database's tasks is left over (escaped creators of ended tasks too): killed."""
        stale = await self.store.running_task_ids()
        carriers = find_task_processes()
        ours = await self.store.existing_task_ids(list(carriers)) if carriers else set()
        for task_id in set(stale) & ours:
            for pgid in {pgid for _pid, pgid in carriers[task_id]}:
                if pgid != os.getpgrp():
                    kill_process_group(pgid)
                    log.warning("orphan_creator_killed", task_id=task_id, pgid=pgid)
        for task_id, pids in kill_task_processes(
                {t: carriers[t] for t in ours - set(stale)}).items():
            log.warning("orphan_process_killed", task_id=task_id, pids=pids,
                        hint="left by a creator of an ended task; it carried"
                        " CONTENTHUB_TASK_ID")
        if not stale:
            return
        count = await self.store.requeue_tasks(stale, self.clock(),
                                               "recovered after daemon restart")
        log.warning("tasks_recovered", count=count)

    async def _clock_jumped(self, seconds: float, now: datetime) -> None:
        """Backward clock jump: retries and timeouts set on the old clock move with it."""
        moved = await self.store.shift_wall_deadlines(seconds, now)
        log.warning("task_deadlines_moved", seconds=round(seconds, 1), tasks=moved)
        self.pool.wake()

    async def reload(self) -> dict[str, Any]:
        """SIGHUP and `contenthubctl reload`; one at a time with schedule edits."""
        async with self._config_lock:
            return await self._reload_file()

    def _check_schedules(self, config: Config) -> list[str]:
        # A copy: a file that fails validation must leave the running triggers as they were.
        return check_schedules(config, dict(self.scheduler.triggers), self.config)

    def _parse(self, text: str, previous: Config | None = None) -> Config:
        """`text` as the config file, validated; the schedules it shares with `previous`
        (default: the running config) are not parsed or validated again."""
        return parse_config(text, self.config.path, self.environ, self._check_schedules,
                            previous or self.config)

    def _config_file_now(self) -> Config:
        """The file as a reload finds it: the running config itself while its text is the
        running text (the daemon's environment, which ${VAR} values come from, cannot
        change), else its parse."""
        text = read_config_text(self.config.path) if self.config.path else ""
        return self.config if text == self.config.text else self._parse(text)

    async def _reload_file(self, parsed: Config | None = None) -> dict[str, Any]:
        """Validate the whole file first; on any error the running config stays as it was.
        `parsed`: the file as the caller just wrote and validated it. A file whose text did
        not change changes nothing: nothing is parsed or applied. The caller holds
        _config_lock."""
        sd_notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                  environ=self.environ)
        try:
            # In a thread: reading and parsing a file of 10,000 schedules must not stall the
            # loop.
            new = parsed if parsed is not None else await in_thread_sharing_gil(
                self._config_file_now)
        except ConfigError as exc:
            self.last_reload_error = "; ".join(exc.errors)
            log.error("reload_rejected", errors=exc.errors)
            sd_notify("READY=1", f"STATUS=reload failed: {exc.errors[0]}", environ=self.environ)
            raise
        new, needs_restart = keep_restart_only_keys(self.config, new)
        if needs_restart:
            log.warning("reload_needs_restart", keys=needs_restart,
                        hint="these keys keep their running values until a restart")
        unchanged = new is self.config
        if not unchanged:
            # The accounts table first: the new schedules and tasks name its accounts.
            await self.store.sync_accounts(new.accounts, self.clock())
        old = self.config if unchanged else await self.live.swap(new)
        self.last_reload_error = None
        # In a thread: 10,000 schedules that all changed are compared field by field.
        changes = {**await in_thread_sharing_gil(self._reload_changes, old, new),
                   "restart_required": needs_restart}
        log.info("config_reloaded", file_unchanged=unchanged, **changes)
        self.metrics_dirty.set()
        sd_notify("READY=1", f"STATUS={await self._status_line()}", environ=self.environ)
        return changes

    def _apply_control_config(self, config: Config) -> None:
        if self.control is not None:  # None only until startup() opens the socket
            self.control.apply_config(config)

    @staticmethod
    def _reload_changes(old: Config, new: Config) -> dict[str, Any]:
        """What a reload changed, as `reload` answers it (restart_required aside)."""
        differ = [(before, after) for before, after in zip(old.schedules, new.schedules)
                  if before is not after]
        if len(old.schedules) == len(new.schedules) and all(
                before.name == after.name for before, after in differ):
            # Edited in place (parse_config reused every unchanged schedule): compare those.
            added, removed = [], []
            changed = [after.name for before, after in differ if before != after]
        else:
            old_schedules = {s.name: s for s in old.schedules}
            new_schedules = {s.name: s for s in new.schedules}
            added = list(new_schedules.keys() - old_schedules.keys())
            removed = list(old_schedules.keys() - new_schedules.keys())
            changed = [n for n in new_schedules.keys() & old_schedules.keys()
                       if new_schedules[n] is not old_schedules[n]
                       and new_schedules[n] != old_schedules[n]]
        return {
            "workers": [old.daemon.max_concurrent_tasks, new.daemon.max_concurrent_tasks],
            "accounts": len(new.accounts), "creator_changed": old.creator != new.creator,
            "schedules_added": sorted(added), "schedules_removed": sorted(removed),
            "schedules_changed": sorted(changed)}

    # -- systemd status and watchdog -----------------------------------------------------------

    def _task_finished(self, task_id: str, status: str) -> None:
        self.status_dirty.set()
        self.metrics_dirty.set()

    async def _status_line(self) -> str:
        pending = await self.store.count_tasks(status="pending")
        return f"{len(self.pool.running)} running, {pending} pending"

    async def _watchdog_loop(self, interval: float) -> None:
        """WATCHDOG=1 at half of WATCHDOG_USEC from the event loop itself: a stuck loop stops
        the pings and systemd restarts us."""
        while True:
            sd_notify("WATCHDOG=1", environ=self.environ)
            await asyncio.sleep(interval)

    async def _metrics_textfile_loop(self) -> None:
        """[daemon] metrics_textfile: the Prometheus text written for node_exporter's textfile
        collector every METRICS_TEXTFILE_EVERY_S and when a task finishes (at most once per
        METRICS_TEXTFILE_MIN_GAP_S), by rename so the collector never reads half a file. The
        key is read on every round, so a reload turns it on, off or elsewhere."""
        failed_with = None
        while True:
            target = self.config.daemon.metrics_textfile
            if target and self.control is not None:
                path = self.config.state_dir(self.environ) / target
                try:
                    text = (await self.control.cmd_monitor_prometheus({}))["text"]
                    await asyncio.to_thread(write_atomically, path, text)
                    failed_with = None
                except OSError as exc:
                    if str(exc) != failed_with:  # once per distinct problem, not every 15 s
                        log.warning("metrics_textfile_not_written", path=str(path),
                                    error=str(exc))
                    failed_with = str(exc)
            self.metrics_dirty.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.metrics_dirty.wait(),
                                       METRICS_TEXTFILE_EVERY_S if target else None)
            await asyncio.sleep(METRICS_TEXTFILE_MIN_GAP_S)

    async def _status_loop(self) -> None:
        """STATUS= ("3 running, 12 pending") when tasks finish, at most once a second."""
        while True:
            await self.status_dirty.wait()
            self.status_dirty.clear()
            sd_notify(f"STATUS={await self._status_line()}", environ=self.environ)
            await asyncio.sleep(1)

    # -- commands that need the whole App ------------------------------------------------------

    async def cmd_version(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"version": __version__, "schema_version": self.store.schema_version,
                "pid": os.getpid(), "started_at": to_db_time(self.started_at),
                "config_path": self.config.path}

    async def cmd_reload(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"reloaded": True, "changes": await self.reload()}
        except ConfigError as exc:
            raise InvalidRequest("\n".join([
                f"reload rejected, the running config is unchanged; {len(exc.errors)} error(s)"
                f" in {self.config.path or 'the config'}:", *exc.errors]),
                data={"errors": exc.errors}) from None

    async def cmd_notify_test(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.notifier.test(arg(args, "name", str, required=True))

    async def cmd_notify_retry(self, args: dict[str, Any]) -> dict[str, Any]:
        delivery_id = arg(args, "id", int, required=True, minimum=1, maximum=(1 << 63) - 1)
        result = await self.store.retry_delivery(delivery_id, self.clock())
        self.notifier.last_error = None
        self.notifier.wake()
        return result

    async def cmd_config(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return describe_config(self.config)

    async def cmd_health(self, args: dict[str, Any]) -> dict[str, Any]:
        checks = [
            {"name": "database",
             "ok": (self.store.damage is None and self.store.last_write_error is None
                    and self.store.wal_warning is None),
             "detail": (f"damaged: {self.store.damage}; {DAMAGE_NEXT_STEP}"
                        if self.store.damage else self.store.last_write_error
                        or self.store.wal_warning or str(self.store.path))},
            await self._config_health(),
            {"name": "workers", "ok": True,
             "detail": f"{len(self.pool.running)}/{self.pool.capacity} busy" + (
                 f"; {self.pool.pacing.limit(self.pool.capacity)} allowed since the provider"
                 " rate-limited" if self.pool.pacing.ceiling is not None else "")},
            {"name": "hooks", "ok": self.notifier.last_hook_error is None,
             "detail": self.notifier.last_hook_error or f"{len(self.config.hooks)} configured"},
            {"name": "scheduler", "ok": self.scheduler.is_running,
             "detail": f"{len(self.scheduler.schedules)} schedules"},
            {"name": "notify", "ok": self.notifier.last_error is None,
             "detail": self.notifier.last_error or f"{len(self.config.notify)} targets"},
        ]
        budget, unpriced = self._budget_health()
        checks.append(budget)
        checks.append(await self._creator_health())
        topics, warnings = await self._topics_health()
        checks.append(topics)
        warnings += unpriced
        media = await self.store.media_counts(self.clock() - timedelta(days=1))
        checks.append({"name": "media", "ok": True, "detail": (
            f"{'on' if self.config.media.enabled else 'off'}; {media['pending']} image(s)"
            f" waiting, {media['failed']} given up in the last day")})
        if media["failed"]:
            warnings.append(f"{media['failed']} image(s) could not be saved in the last day;"
                            f" see contenthubctl content show {media['latest_failed']}")
        return {"status": "ok" if all(c["ok"] for c in checks) else "degraded",
                "checks": checks, "warnings": warnings}

    async def _topics_health(self) -> tuple[dict[str, Any], list[str]]:
        """Failed when a pool schedule's account has no queued topic left (its firings create
        nothing); warnings for pools that last fewer than TOPICS_LOW_FIRINGS firings and for
        schedules that only ever make numbered placeholder topics."""
        queued = await self.store.queued_topic_counts()
        accounts = self.config.accounts_by_id
        per_firing: dict[int, int] = {}
        warnings, empty = [], []
        for schedule in self.config.schedules:
            params = schedule.params
            if not schedule.enabled or schedule.executor != "async_content_generation":
                continue
            if params.get("topic_source") == "pool":
                for account_id in params.get("account_ids", []):
                    per_firing[account_id] = (per_firing.get(account_id, 0)
                                              + params.get("count_per_account", 1))
            elif not params.get("topics"):
                warnings.append(f"schedule {schedule.name!r} runs on placeholder templates"
                                " only (\"{account_name} - {template} {i}\"); give it"
                                " topic_source = \"pool\" (contenthubctl topics add) or a"
                                " topics list")
        for account_id, need in sorted(per_firing.items()):
            have = queued.get(account_id, 0)
            name = accounts[account_id].name if account_id in accounts else "?"
            if have == 0:
                empty.append(f"account {account_id} ({name}): topic pool empty; pool"
                             f" schedules take {need} per firing")
            elif have < need * TOPICS_LOW_FIRINGS:
                warnings.append(f"account {account_id} ({name}): topic pool low, {have}"
                                f" queued; pool schedules take {need} per firing")
        detail = "; ".join(empty) or (f"{sum(queued.values())} topics queued for"
                                      f" {len(queued)} accounts")
        return {"name": "topics", "ok": not empty, "detail": detail}, empty + warnings

    async def _config_health(self) -> dict[str, Any]:
        """A failed reload, or a file edited since it was loaded: an error in it shows here
        (with its line and column) before anyone reloads, so the operator is never guessing."""
        if self.last_reload_error is not None:
            return {"name": "config", "ok": False,
                    "detail": f"reload rejected, running the previous config: "
                              f"{self.last_reload_error}"}
        path = self.config.path
        if not path:
            return {"name": "config", "ok": True, "detail": "embedded default"}
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return {"name": "config", "ok": False, "detail": f"{path}: cannot read: {exc}"}
        if text == self.config.text:
            return {"name": "config", "ok": True, "detail": path}
        try:
            await in_thread_sharing_gil(self._parse, text)
        except ConfigError as exc:
            return {"name": "config", "ok": False,
                    "detail": f"{path} changed since it was loaded and has {len(exc.errors)}"
                              f" error(s): {'; '.join(exc.errors)}"}
        return {"name": "config", "ok": True,
                "detail": f"{path} changed since it was loaded; contenthubctl reload applies it"}

    def _budget_health(self) -> tuple[dict[str, Any], list[str]]:
        """Degraded while a budget keeps tasks waiting, naming it; a model without a price
        is a warning (its tokens count, its cost cannot)."""
        holds = self.pool.budget_holds
        check: dict[str, Any] = {"name": "budget", "ok": not holds}
        if holds:
            check["detail"] = "; ".join(holds[scope] for scope in sorted(holds))
        else:
            budget = self.config.budget
            limited = sum(1 for a in self.config.accounts if a.daily_budget or a.monthly_budget)
            check["detail"] = (f"daily {budget.daily or 'none'}, monthly"
                               f" {budget.monthly or 'none'} {budget.currency};"
                               f" {limited} account budget(s)")
        warnings = []
        if self.pool.unpriced_models:
            names = ", ".join(sorted(m or "(unnamed)" for m in self.pool.unpriced_models))
            warnings.append(f"budget: no price in [budget.prices] for model(s) {names}; their"
                            " tokens are counted, their cost is unknown")
        return check, warnings

    async def _creator_health(self) -> dict[str, Any]:
        """Not ok while the creator is known broken (breaker not closed, a run of transient
        failures) or its health_command fails; the detail is the creator's message in full."""
        breaker = self.pool.breaker
        if breaker.state != "closed":
            since = present({"since": to_db_time(breaker.since)},
                            ZoneInfo(self.config.daemon.timezone))["since"]
            return {"name": "creator", "ok": False,
                    "detail": f"circuit breaker {breaker.state} since {since} after"
                              f" {breaker.failures} {breaker.error_class} failure(s); nothing"
                              f" is claimed (contenthubctl creator resume): {breaker.reason}"}
        if breaker.transient_streak >= TRANSIENT_DEGRADED_STREAK:
            return {"name": "creator", "ok": False,
                    "detail": f"{breaker.transient_streak} transient failures in a row (retry"
                              f" backoff raised); last: {breaker.last_transient}"}
        ok, detail = await self.pool.run_health_command()
        return {"name": "creator", "ok": ok, "detail": detail}

    async def _startup_health_check(self) -> None:
        """Run the health_command once at start so a broken creator shows in the log at once."""
        if not self.config.creator.health_command:
            return
        ok, detail = await self.pool.run_health_command()
        if ok:
            log.info("creator_health_ok", detail=detail[:300])
        else:
            log.warning("creator_health_failed", detail=detail,
                        hint="tasks will fail until this is fixed; see monitor health")


    async def _config_on_disk(self) -> tuple[str, Config]:
        """The config file as it is now, which an edit starts from: edits saved since the
        last reload are kept, not overwritten with the text that reload read. If those edits
        do not validate, nothing can be merged into them: Conflict, naming the errors."""
        path = self.config.path
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise Conflict(f"cannot read {path}: {exc}") from None
        if text == self.config.text:
            return text, self.config
        try:
            return text, await in_thread_sharing_gil(self._parse, text)
        except ConfigError as exc:
            raise Conflict("\n".join([
                f"{path} was changed since the last reload and is not valid now; fix it (or"
                " undo the change) and try again. Nothing was written:", *exc.errors]),
                data={"errors": exc.errors}) from None

    async def cmd_scheduler_create(self, args: dict[str, Any]) -> dict[str, Any]:
        async with self._config_lock:
            return await self._create_schedule(args)

    async def cmd_scheduler_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        async with self._config_lock:
            return await self._delete_schedule(args)

    async def _create_schedule(self, args: dict[str, Any]) -> dict[str, Any]:
        """Append a validated [[schedules]] block to the config file as it is on disk, then
        reload. The rest of the file stays byte for byte; the write is atomic (temp file +
        rename, through a symlink to its target)."""
        if not self.config.path:
            raise Conflict("the daemon runs on the embedded default config; start it with"
                           " --config FILE to create schedules")
        name = arg(args, "name", str, required=True)
        text, on_disk = await self._config_on_disk()
        if any(s.name == name for s in on_disk.schedules):
            raise Conflict(f"schedule {name!r} already exists")
        block = {"name": name, "executor": arg(args, "executor", str, required=True)}
        for key in ("cron", "every", "timezone", "misfire", "overlap", "description"):
            if args.get(key) is not None:
                block[key] = arg(args, key, str)
        block["params"] = arg(args, "params", dict, default={})
        new_text = (text + ("" if text.endswith("\n") or not text else "\n") + "\n"
                    + "[[schedules]]\n"
                    + "".join(f"{key} = {toml_value(value)}\n" for key, value in block.items()))
        try:
            parsed = await in_thread_sharing_gil(self._parse, new_text, on_disk)
        except ConfigError as exc:
            raise InvalidRequest("\n".join([
                f"schedule {name!r} is not valid; the config file is unchanged:", *exc.errors]),
                data={"errors": exc.errors}) from None
        # In a thread: the fsyncs of a large file must not stall the loop.
        await asyncio.to_thread(write_atomically, Path(self.config.path), new_text,
                                unchanged_from=text)
        await self._reload_file(parsed)
        return (await self.scheduler.describe_many([self.scheduler.get(name)]))[0]

    async def _delete_schedule(self, args: dict[str, Any]) -> dict[str, Any]:
        """Remove a [[schedules]] block from the config file, then reload: the rest of the
        file stays byte for byte, the write is atomic. Its runs stay in the history."""
        if not self.config.path:
            raise Conflict("the daemon runs on the embedded default config; there is no file"
                           " to delete a schedule from")
        name = arg(args, "name", str, required=True)
        text, on_disk = await self._config_on_disk()
        names = [s.name for s in on_disk.schedules]
        if name not in names:
            raise NotFound(f"no schedule {name!r} in {self.config.path}")
        new_text = without_schedule_block(text, names.index(name))
        try:
            remaining = await in_thread_sharing_gil(self._parse, new_text, on_disk)
        except ConfigError as exc:
            raise InvalidRequest("\n".join([
                f"without schedule {name!r} the file would not be valid; it is unchanged:",
                *exc.errors]), data={"errors": exc.errors}) from None
        if [s.name for s in remaining.schedules] != [n for n in names if n != name]:
            raise Conflict(f"cannot tell where schedule {name!r} ends in {self.config.path};"
                           " remove it by hand and run contenthubctl reload")
        await asyncio.to_thread(write_atomically, Path(self.config.path), new_text,
                                unchanged_from=text)
        await self._reload_file(remaining)
        return {"deleted": name, "config_path": self.config.path}

# CLI entry #####################################################################################


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["create"]:
        return run_builtin_creator(argv[1:])
    if argv[:1] == ["research-topics"]:
        return run_builtin_research(argv[1:])
    for name in DAEMON_MODULES:  # loaded here, on one thread (see DAEMON_MODULES)
        importlib.import_module(name)
    parser = argparse.ArgumentParser(
        prog="contenthubd", description="Run the contenthubd daemon in the foreground.",
        epilog="`contenthubd create` is the built-in creator the daemon runs for each task;"
               " `contenthubd research-topics` the built-in topic research.")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML config (default: $CONTENTHUB_CONFIG, else the embedded"
                             " default: built-in offline creator, state in ./state)")
    parser.add_argument("--check-config", metavar="FILE",
                        help="validate FILE, list every error, exit 0 or 1")
    parser.add_argument("--version", action="version", version=f"contenthubd {__version__}")
    options = parser.parse_args(argv)
    environ = dict(os.environ)
    if options.check_config:
        try:
            config = load_config(options.check_config, environ, check_schedules)
        except ConfigError as exc:
            for error in exc.errors:
                print(f"error: {error}", file=sys.stderr)
            return 1
        for warning in config_warnings(config, environ):
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{options.check_config}: OK")
        return 0
    path = options.config or environ.get("CONTENTHUB_CONFIG") or None
    triggers: dict[tuple[Any, ...], Trigger] = {}
    try:
        config = load_config(path, environ, lambda parsed: check_schedules(parsed, triggers))
    except ConfigError as exc:
        for error in exc.errors:
            print(f"contenthubd: config error: {error}", file=sys.stderr)
        return EX_CONFIG
    configure_logging(config.daemon.log_format, config.daemon.log_level, environ)
    bound_heap_retention()
    return asyncio.run(App(config, environ, triggers=triggers).serve())


if __name__ == "__main__":
    sys.exit(main())
