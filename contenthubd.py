"""contenthubd: turns schedules into published articles, unattended, on one server.

One asyncio process owns a cron loop, a bounded worker pool that runs content-creator CLI
subprocesses, a poll loop for asynchronous creators, and a Unix-socket control channel. All
state lives in one SQLite file; every state change is one short transaction.

The file reads top to bottom; each section uses only the ones above it:

    Constants and errors    names, limits, the exceptions the control channel maps to codes
    Config                  TOML + ASYNC_* environment -> frozen Config, every error listed
    Logging and sd_notify   structlog setup; systemd's notify protocol without a dependency
    Store                   schema.sql, the one writer connection, every SQL statement
    Creator runner          argv templates, process groups, capped capture, output adapters
    Executors               the registry scheduled work runs through (content, publish, cleanup)
    Scheduler               the cron loop: fire, misfire and overlap policies
    Worker pool             claims tasks, runs creators, retries, timeouts, cancel
    Poll loop               drives tasks whose creator works asynchronously
    Control server          the NDJSON Unix socket behind contenthubctl
    Built-in creator        `contenthubd create`: offline drafts or an OpenAI-compatible LLM
    App                     startup -> main_loop -> shutdown, reload, signals
    CLI entry               main()
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import grp
import hashlib
import json
import math
import os
import pwd
import random
import re
import secrets
import signal
import socket
import sqlite3
import struct
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiosqlite
import structlog

__version__ = "0.1.0"

# Constants and errors ##########################################################################

#: Next to this file in a checkout or editable install; under share/ in a wheel install.
SCHEMA_PATH = next((p for p in (Path(__file__).with_name("schema.sql"),
                                Path(sys.prefix, "share", "contenthubd", "schema.sql"))
                    if p.exists()), Path(__file__).with_name("schema.sql"))
SCHEMA_VERSION = 1
#: Ordered migrations from version N-1 to N, applied after schema.sql; version 1 is schema.sql.
MIGRATIONS: dict[int, str] = {}

TERMINAL_STATUSES = ("completed", "failed", "timeout", "cancelled")
ACTIVE_STATUSES = ("pending", "submitted", "running")
MAX_LINE_BYTES = 1 << 20  #: control-socket request limit
KILL_GRACE_S = 5.0  #: SIGTERM -> SIGKILL for a creator's process group
PIPE_DRAIN_S = 2.0  #: how long stray grandchildren may hold the pipes after the creator exits
STDERR_TAIL_CHARS = 2000
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


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


class ConfigError(ContentHubError):
    """Every problem found in a config file, one per line."""

    code = "invalid"

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors), data={"errors": errors})
        self.errors = errors


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def to_db_time(moment: datetime | None) -> str | None:
    """UTC ISO-8601 with milliseconds and a Z: sorts as text, and sqlite3 can read it."""
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{moment.microsecond // 1000:03d}Z"
    )


def from_db_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def new_task_id(now: datetime) -> str:
    """`task-` + milliseconds + random: sortable by creation, unique without coordination."""
    return f"task-{int(now.timestamp() * 1000):013d}-{secrets.token_hex(4)}"


def is_secret_name(name: str) -> bool:
    return any(marker in name.upper() for marker in SECRET_MARKERS)


# Config ########################################################################################

DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> float:
    """Seconds from `90s`, `30m`, `2h`, `1d`, `1h30m`, or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '30m', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration like '30m', got {value!r}")
    text = value.strip().lower()
    with contextlib.suppress(ValueError):
        return parse_duration(float(text))
    pos, total = 0, 0.0
    for match in DURATION_RE.finditer(text):
        if match.start() != pos and text[pos : match.start()].strip():
            break
        total += float(match.group(1)) * DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or text[pos:].strip():
        raise ValueError(f"expected a duration like '90s', '30m', '2h' or '1d', got {value!r}")
    return total


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


def _key(parse: Callable[[Any], Any], env: str | None = None, **kwargs: Any) -> Any:
    """A config field: how its TOML value is parsed, and the seed's environment override."""
    return field(metadata={"parse": parse, "env": env}, **kwargs)


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
    max_catch_up: int = _key(_positive(_typed(int)), default=24)
    max_connections: int = _key(_positive(_typed(int)), default=64)
    connection_idle_timeout: float = _key(_positive(parse_duration), default=300.0)


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
    cwd: str = _key(_typed(str), default="")
    env: dict[str, str] = _key(_str_table, default_factory=dict)
    permanent_exit_codes: list[int] = _key(_int_list, default_factory=lambda: [2])
    max_output: int = _key(parse_size, default=8 << 20)
    kill_grace: float = _key(parse_duration, default=KILL_GRACE_S)
    health_command: list[str] = _key(_str_list, default_factory=list)
    health_timeout: float = _key(_positive(parse_duration), default=10.0)
    submit_command: list[str] = _key(_str_list, default_factory=list)
    status_command: list[str] = _key(_str_list, default_factory=list)
    result_command: list[str] = _key(_str_list, default_factory=list)
    cancel_command: list[str] = _key(_str_list, default_factory=list)
    llm: LLMConfig = field(default_factory=LLMConfig, metadata={"section": LLMConfig})


@dataclass(frozen=True)
class PublishConfig:
    command: list[str] = _key(_str_list, default_factory=list)
    max_attempts: int = _key(_positive(_typed(int)), default=3)
    timeout: float = _key(_positive(parse_duration), default=300.0)


@dataclass(frozen=True)
class HookConfig:
    on: list[str] = _key(_str_list, default_factory=lambda: ["completed", "failed", "timeout"])
    command: list[str] = _key(_str_list, default_factory=list)
    timeout: float = _key(_positive(parse_duration), default=30.0)


@dataclass(frozen=True)
class AccountConfig:
    id: int = _key(_typed(int), default=0)
    name: str = _key(_typed(str), default="")
    category: str = _key(_typed(str), default="")
    enabled: bool = _key(_typed(bool), default=True)


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = _key(_typed(str), default="")
    executor: str = _key(_typed(str), default="async_content_generation")
    cron: str = _key(_typed(str), default="")
    every: Any = _key(lambda v: v, default=None)
    interval: int = _key(_positive(_typed(int)), default=0)
    interval_unit: str = _key(_typed(str), default="")
    timezone: str = _key(_parse_timezone, default="")
    misfire: str = _key(_choice("skip", "once", "all"), default="once")
    misfire_grace: float = _key(parse_duration, default=0.0)
    overlap: str = _key(_choice("skip", "allow"), default="skip")
    enabled: bool = _key(_typed(bool), default=True)
    description: str = _key(_typed(str), default="")
    params: dict = _key(_typed(dict), default_factory=dict)


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    creator: CreatorConfig = field(default_factory=CreatorConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    accounts: tuple[AccountConfig, ...] = ()
    schedules: tuple[ScheduleConfig, ...] = ()
    hooks: tuple[HookConfig, ...] = ()
    path: str = ""  #: the file it came from, "" for the embedded default
    #: where each effective daemon/creator value came from: "file", "env" or "default"
    sources: dict[str, str] = field(default_factory=dict)
    text: str = ""  #: the file's text, kept so `scheduler create` can append byte for byte

    @property
    def base_dir(self) -> Path:
        return Path(self.path).resolve().parent if self.path else Path.cwd()

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


SECTION_ENTRIES = {"accounts": AccountConfig, "schedules": ScheduleConfig, "hooks": HookConfig}


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


def _build_section(cls: type, table: Any, where: str, text: str, start: int,
                   errors: list[str], sources: dict[str, str] | None = None,
                   environ: dict[str, str] | None = None) -> Any:
    """One dataclass from one TOML table, collecting every problem into `errors`."""
    if not isinstance(table, dict):
        errors.append(f"{where}: expected a table, got {type(table).__name__}")
        return cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        line = _line_of(text, key, start)
        at = f"{where}.{key}" + (f" (line {line})" if line else "")
        spec = known.get(key)
        if spec is None:
            errors.append(f"{at}: unknown key")
            continue
        if "section" in spec.metadata:
            values[key] = _build_section(spec.metadata["section"], raw, f"{where}.{key}", text,
                                         start, errors, sources, environ)
            continue
        try:
            values[key] = spec.metadata["parse"](raw)
        except ValueError as exc:
            errors.append(f"{at}: {exc}")
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


def parse_config(text: str, path: str = "", environ: dict[str, str] | None = None,
                 validate_schedules: Callable[[Config], list[str]] | None = None) -> Config:
    """Parse and validate a whole config file; raise ConfigError listing every problem."""
    environ = dict(os.environ if environ is None else environ)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path or 'config'}: TOML syntax error: {exc}"]) from None
    errors: list[str] = []
    sources: dict[str, str] = {}
    sections: dict[str, Any] = {}
    for name, cls in (("daemon", DaemonConfig), ("creator", CreatorConfig),
                      ("publish", PublishConfig)):
        start = (_header_lines(text, name) or [0])[0]
        sections[name] = _build_section(cls, data.pop(name, {}), name, text, start, errors,
                                        sources, environ)
    for name, cls in SECTION_ENTRIES.items():
        entries = data.pop(name, [])
        if not isinstance(entries, list):
            errors.append(f"{name}: expected [[{name}]] entries")
            entries = []
        starts = _header_lines(text, name)
        sections[name] = tuple(
            _build_section(cls, entry, f"{name}[{i}]", text, starts[i] if i < len(starts) else 0,
                           errors)
            for i, entry in enumerate(entries)
        )
    for key in data:
        line = _line_of(text, key) or (_header_lines(text, key) or [-1])[0] + 1
        errors.append(f"{key}" + (f" (line {line})" if line else "") + ": unknown key")
    config = Config(**sections, path=path, sources=sources, text=text)
    errors += _check_config(config, environ)
    if validate_schedules is not None and not errors:
        errors += validate_schedules(config)
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
    seen_ids: set[int] = set()
    for i, account in enumerate(config.accounts):
        if account.id <= 0:
            errors.append(f"accounts[{i}].id: required, a positive integer")
        if not account.name:
            errors.append(f"accounts[{i}].name: required")
        if account.id in seen_ids:
            errors.append(f"accounts[{i}].id: duplicate account id {account.id}")
        seen_ids.add(account.id)
    names: set[str] = set()
    for i, schedule in enumerate(config.schedules):
        if not schedule.name:
            errors.append(f"schedules[{i}].name: required")
        elif schedule.name in names:
            errors.append(f"schedules[{i}].name: duplicate schedule name {schedule.name!r}")
        names.add(schedule.name)
    for i, hook in enumerate(config.hooks):
        if not hook.command:
            errors.append(f"hooks[{i}].command: required")
        bad = set(hook.on) - set(TERMINAL_STATUSES)
        if bad:
            errors.append(f"hooks[{i}].on: unknown status {sorted(bad)}; "
                          f"use {', '.join(TERMINAL_STATUSES)}")
    return errors


def load_config(path: str | None, environ: dict[str, str] | None = None,
                validate_schedules: Callable[[Config], list[str]] | None = None) -> Config:
    """The config at `path`, or the embedded default (built-in offline creator) when None."""
    if path is None:
        return parse_config("", "", environ, validate_schedules)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    return parse_config(text, str(path), environ, validate_schedules)


def describe_config(config: Config) -> list[dict[str, Any]]:
    """Effective daemon and creator settings with their source; secrets masked."""
    rows = []
    for section_name in ("daemon", "creator", "publish"):
        section = getattr(config, section_name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    rows.append({"key": f"{section_name}.{f.name}.{sub.name}",
                                 "value": getattr(value, sub.name),
                                 "source": "file" if f"{section_name}.{f.name}" in config.text
                                 else "default"})
                continue
            if f.name == "env":
                value = {k: ("***" if is_secret_name(k) and "${" not in v else v)
                         for k, v in value.items()}
            elif f.name == "socket_mode":
                value = f"{value:04o}"
            rows.append({"key": f"{section_name}.{f.name}", "value": value,
                         "source": config.sources.get(f"{section_name}.{f.name}", "default")})
    rows.append({"key": "accounts", "value": len(config.accounts), "source": "file"})
    rows.append({"key": "schedules", "value": len(config.schedules), "source": "file"})
    return rows


# Logging and sd_notify #########################################################################

log = structlog.get_logger("contenthubd")


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
        cache_logger_on_first_use=False,
    )


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


# Store #########################################################################################

TASK_FIELDS = ("task_id", "content_id", "account_id", "topic", "keywords", "category",
               "requirements", "tone", "target_audience", "status", "priority", "progress",
               "stage", "retry_count", "max_retries", "attempt", "auto_approve", "submitted_at",
               "started_at", "completed_at", "timeout_at", "next_attempt_at", "error_kind",
               "error_message", "external_id", "pid", "pgid", "schedule_run_id", "dedup_key",
               "created_at", "updated_at")
TASK_COLUMNS = ", ".join(f"t.{name}" for name in TASK_FIELDS) + ", a.name AS account_name"
TASK_FROM = "content_generation_tasks t LEFT JOIN accounts a ON a.id = t.account_id"
CONTENT_LIST_COLUMNS = ("c.id, c.task_id, c.account_id, a.name AS account_name, t.topic, c.title,"
                        " c.summary, c.word_count, c.images, c.quality, c.review_status,"
                        " c.review_reason, c.publish_status, c.scheduled_publish_at,"
                        " c.published_at, c.created_at")
CONTENT_FROM = ("contents c JOIN content_generation_tasks t ON t.task_id = c.task_id"
                " LEFT JOIN accounts a ON a.id = c.account_id")
TRANSIENT_DB_ERRORS = ("locked", "busy", "disk is full", "disk i/o error", "unable to open")


def _row_dict(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row)}


def _is_transient(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and any(
        marker in str(exc).lower() for marker in TRANSIENT_DB_ERRORS)


@dataclass
class Article:
    """A creator's parsed result, before it becomes a `contents` row."""

    body: str
    title: str | None = None
    images: list[str] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)
    external_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  #: kept in the task's result JSON


class Store:
    """Owns the one writer connection and every SQL statement.

    A write is a plain function that receives the sqlite3 connection; `_write` runs it inside
    BEGIN IMMEDIATE ... COMMIT on aiosqlite's thread in one hop, and retries the whole unit on
    a locked or full database: a transition is delayed, never half-done and never dropped.
    Reads go through a second connection, so a long report never holds the writer.
    """

    def __init__(self, path: Path, log_: Any = None):
        self.path = path
        self.log = log_ or log
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self.last_write_error: str | None = None  #: shown by `monitor health` while retrying

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await aiosqlite.connect(self.path, isolation_level=None)
        await self._writer.execute("PRAGMA journal_mode = WAL")
        await self._configure(self._writer)
        await self._run(self._writer, self._apply_schema)
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._configure(self._reader)

    @staticmethod
    async def _configure(connection: aiosqlite.Connection) -> None:
        # NORMAL in WAL mode: a commit survives a process crash (kill -9); only an OS crash or
        # power loss can lose the last commits, never corrupt the file. README says more.
        for pragma in ("synchronous = NORMAL", "foreign_keys = ON", "busy_timeout = 5000"):
            await connection.execute(f"PRAGMA {pragma}")

    async def close(self) -> None:
        for connection in (self._reader, self._writer):
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()
        self._reader = self._writer = None

    @staticmethod
    async def _run(connection: aiosqlite.Connection, work: Callable[..., Any], *args: Any) -> Any:
        # aiosqlite's own worker-thread queue: the whole unit of work is one round trip.
        return await connection._execute(work, connection._conn, *args)

    @staticmethod
    def _apply_schema(conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA_PATH.read_text(encoding="utf-8"))
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = row[0] or 0
        if current == 0:
            conn.execute("INSERT INTO schema_version VALUES (?, ?)",
                         (SCHEMA_VERSION, to_db_time(utc_now())))
            return
        for version in range(current + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            conn.executescript(MIGRATIONS[version])
            conn.execute("INSERT INTO schema_version VALUES (?, ?)",
                         (version, to_db_time(utc_now())))
            conn.execute("COMMIT")

    async def _write(self, work: Callable[..., Any], *args: Any) -> Any:
        delay = 0.05
        while True:
            async with self._write_lock:
                try:
                    return await self._run(self._writer, self._transaction, work, *args)
                except sqlite3.Error as exc:
                    if not _is_transient(exc):
                        raise
                    self.last_write_error = str(exc)
            self.log.warning("database_write_retry", error=self.last_write_error,
                             retry_in=round(delay, 2))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _transaction(self, conn: sqlite3.Connection, work: Callable[..., Any], *args: Any) -> Any:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.last_write_error = None
        return result

    async def _read(self, work: Callable[..., Any], *args: Any) -> Any:
        return await self._run(self._reader, work, *args)

    async def query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
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
        rows = await self.query("SELECT * FROM accounts WHERE id = ?", (account_id,))
        return rows[0] if rows else None

    # -- tasks: writes -------------------------------------------------------------------------

    @staticmethod
    def _event(conn: sqlite3.Connection, task_id: str, now: str, from_status: str | None,
               to_status: str, detail: str | None = None) -> None:
        conn.execute("INSERT INTO task_events (task_id, at, from_status, to_status, detail)"
                     " VALUES (?, ?, ?, ?, ?)", (task_id, now, from_status, to_status, detail))

    @classmethod
    def insert_tasks(cls, conn: sqlite3.Connection, tasks: list[dict[str, Any]],
                     now: datetime) -> list[str]:
        """Insert tasks inside the caller's transaction; rows whose dedup_key exists are
        skipped (a restarted firing must not double its tasks). Returns the inserted ids."""
        stamp = to_db_time(now)
        inserted = []
        for task in tasks:
            row = {"keywords": "", "category": "", "requirements": "", "tone": "",
                   "target_audience": "", "priority": 5, "auto_approve": 0, "max_retries": 3,
                   "schedule_run_id": None, "dedup_key": None, **task}
            row["task_id"] = row.get("task_id") or new_task_id(now)
            row["auto_approve"] = int(bool(row["auto_approve"]))
            cursor = conn.execute(
                "INSERT INTO content_generation_tasks (task_id, account_id, topic, keywords,"
                " category, requirements, tone, target_audience, priority, auto_approve,"
                " max_retries, schedule_run_id, dedup_key, status, next_attempt_at, created_at,"
                " updated_at) VALUES (:task_id, :account_id, :topic, :keywords, :category,"
                " :requirements, :tone, :target_audience, :priority, :auto_approve, :max_retries,"
                " :schedule_run_id, :dedup_key, 'pending', :now, :now, :now)"
                " ON CONFLICT (dedup_key) DO NOTHING", {**row, "now": stamp})
            if cursor.rowcount:
                cls._event(conn, row["task_id"], stamp, None, "pending", task.get("origin"))
                inserted.append(row["task_id"])
        return inserted

    async def add_tasks(self, tasks: list[dict[str, Any]], now: datetime) -> list[str]:
        return await self._write(self.insert_tasks, tasks, now)

    async def claim_next_tasks(self, limit: int, now: datetime, timeout_s: float,
                               per_account_limit: int = 0) -> list[dict[str, Any]]:
        """Move up to `limit` due pending tasks to running, best first, in one transaction."""

        def claim(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            stamp = to_db_time(now)
            candidates = conn.execute(
                "SELECT task_id, account_id FROM content_generation_tasks"
                " WHERE status = 'pending' AND next_attempt_at <= ?"
                " ORDER BY priority DESC, next_attempt_at, id LIMIT ?",
                (stamp, limit if not per_account_limit else limit * 20)).fetchall()
            if per_account_limit:
                running = dict(conn.execute(
                    "SELECT account_id, COUNT(*) FROM content_generation_tasks"
                    " WHERE status = 'running' GROUP BY account_id").fetchall())
                chosen = []
                for task_id, account_id in candidates:
                    if running.get(account_id, 0) < per_account_limit and len(chosen) < limit:
                        running[account_id] = running.get(account_id, 0) + 1
                        chosen.append(task_id)
            else:
                chosen = [task_id for task_id, _ in candidates]
            claimed = []
            deadline = to_db_time(now + timedelta(seconds=timeout_s))
            for task_id in chosen:
                conn.execute(
                    "UPDATE content_generation_tasks SET status = 'running', started_at = ?,"
                    " timeout_at = ?, attempt = attempt + 1, progress = NULL, stage = NULL,"
                    " pid = NULL, pgid = NULL, updated_at = ? WHERE task_id = ?",
                    (stamp, deadline, stamp, task_id))
                self._event(conn, task_id, stamp, "pending", "running")
                cursor = conn.execute(f"SELECT {TASK_COLUMNS} FROM {TASK_FROM}"
                                      " WHERE t.task_id = ?", (task_id,))
                claimed.append(_row_dict(cursor, cursor.fetchone()))
            return claimed

        return await self._write(claim)

    async def next_due_at(self) -> datetime | None:
        rows = await self.query("SELECT MIN(next_attempt_at) AS due FROM content_generation_tasks"
                                " WHERE status = 'pending'")
        return from_db_time(rows[0]["due"]) if rows else None

    async def record_process(self, task_id: str, attempt: int, pid: int) -> None:
        """Remember the creator's process group so a restart after a crash can kill it."""

        def record(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE content_generation_tasks SET pid = ?, pgid = ?"
                         " WHERE task_id = ? AND attempt = ? AND status = 'running'",
                         (pid, pid, task_id, attempt))

        await self._write(record)

    async def record_progress(self, task_id: str, attempt: int, progress: int | None,
                              stage: str | None) -> None:
        def record(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE content_generation_tasks SET progress = ?, stage = ?"
                         " WHERE task_id = ? AND attempt = ? AND status IN ('running',"
                         " 'submitted')", (progress, stage, task_id, attempt))

        await self._write(record)

    async def complete_task(self, task_id: str, attempt: int, article: dict[str, Any],
                            result: dict[str, Any], now: datetime) -> int | None:
        """running -> completed and the contents row, in one transaction. Returns the content
        id, or None when the attempt no longer owns the task (cancelled, or requeued)."""

        def complete(conn: sqlite3.Connection) -> int | None:
            stamp = to_db_time(now)
            row = conn.execute("SELECT status, auto_approve, account_id FROM"
                               " content_generation_tasks WHERE task_id = ? AND attempt = ?"
                               " AND status IN ('running', 'submitted')",
                               (task_id, attempt)).fetchone()
            if row is None:
                return None
            status, auto_approve, account_id = row
            content_id = conn.execute(
                "INSERT INTO contents (task_id, account_id, title, body, summary, word_count,"
                " images, quality, review_status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (task_id, account_id, article["title"], article["body"], article["summary"],
                 article["word_count"], json.dumps(article["images"], ensure_ascii=False),
                 json.dumps(article["quality"], ensure_ascii=False),
                 "approved" if auto_approve else "pending_review", stamp)).lastrowid
            conn.execute(
                "UPDATE content_generation_tasks SET status = 'completed', content_id = ?,"
                " completed_at = ?, progress = 100, result = ?, error_kind = NULL,"
                " error_message = NULL, pid = NULL, pgid = NULL, updated_at = ?"
                " WHERE task_id = ?",
                (content_id, stamp, json.dumps(result, ensure_ascii=False), stamp, task_id))
            self._event(conn, task_id, stamp, status, "completed", f"content {content_id}")
            return content_id

        return await self._write(complete)

    async def fail_attempt(self, task_id: str, attempt: int, now: datetime, error_kind: str,
                           message: str, retry_delay_s: float | None,
                           final_status: str = "failed") -> str | None:
        """running/submitted -> pending (retry after `retry_delay_s`) or -> final_status.
        `retry_delay_s` None means permanent. Returns the new status, None if not owned."""

        def fail(conn: sqlite3.Connection) -> str | None:
            stamp = to_db_time(now)
            row = conn.execute("SELECT status, retry_count, max_retries FROM"
                               " content_generation_tasks WHERE task_id = ? AND attempt = ?"
                               " AND status IN ('running', 'submitted')",
                               (task_id, attempt)).fetchone()
            if row is None:
                return None
            status, retry_count, max_retries = row
            if retry_delay_s is not None and retry_count < max_retries:
                conn.execute(
                    "UPDATE content_generation_tasks SET status = 'pending', retry_count ="
                    " retry_count + 1, next_attempt_at = ?, error_kind = ?, error_message = ?,"
                    " external_id = NULL, pid = NULL, pgid = NULL, updated_at = ?"
                    " WHERE task_id = ?",
                    (to_db_time(now + timedelta(seconds=retry_delay_s)), error_kind, message,
                     stamp, task_id))
                self._event(conn, task_id, stamp, status, "pending",
                            f"retry {retry_count + 1}/{max_retries} in {retry_delay_s:.0f}s:"
                            f" {error_kind}")
                return "pending"
            conn.execute(
                "UPDATE content_generation_tasks SET status = ?, completed_at = ?,"
                " error_kind = ?, error_message = ?, pid = NULL, pgid = NULL, updated_at = ?"
                " WHERE task_id = ?", (final_status, stamp, error_kind, message, stamp, task_id))
            self._event(conn, task_id, stamp, status, final_status, f"{error_kind}: {message}"[:500])
            return final_status

        return await self._write(fail)

    async def mark_submitted(self, task_id: str, attempt: int, external_id: str,
                             now: datetime) -> bool:
        def submitted(conn: sqlite3.Connection) -> bool:
            stamp = to_db_time(now)
            cursor = conn.execute(
                "UPDATE content_generation_tasks SET status = 'submitted', external_id = ?,"
                " submitted_at = ?, pid = NULL, pgid = NULL, updated_at = ?"
                " WHERE task_id = ? AND attempt = ? AND status = 'running'",
                (external_id, stamp, stamp, task_id, attempt))
            if cursor.rowcount:
                self._event(conn, task_id, stamp, "running", "submitted", external_id)
            return bool(cursor.rowcount)

        return await self._write(submitted)

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
            return before

        return await self._write(cancel)

    async def retry_task(self, task_id: str, now: datetime) -> None:
        """failed/timeout/cancelled -> pending with fresh counters; history is kept."""

        def retry(conn: sqlite3.Connection) -> None:
            before = self._get_task(conn, task_id)
            if before["status"] not in ("failed", "timeout", "cancelled"):
                raise Conflict(f"task {task_id} is {before['status']}; only failed, timeout or"
                               " cancelled tasks can be retried")
            stamp = to_db_time(now)
            conn.execute("UPDATE content_generation_tasks SET status = 'pending', retry_count = 0,"
                         " next_attempt_at = ?, completed_at = NULL, error_kind = NULL,"
                         " error_message = NULL, external_id = NULL, progress = NULL,"
                         " stage = NULL, updated_at = ? WHERE task_id = ?",
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

    async def running_tasks(self) -> list[dict[str, Any]]:
        return await self.query("SELECT task_id, pgid, attempt FROM content_generation_tasks"
                                " WHERE status = 'running'")

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

    async def list_tasks(self, *, status: str | list[str] | None = None,
                         account_id: int | None = None, limit: int = 50,
                         order: str = "t.id DESC") -> list[dict[str, Any]]:
        where, params = [], []
        if status:
            statuses = [status] if isinstance(status, str) else list(status)
            where.append(f"t.status IN ({', '.join('?' * len(statuses))})")
            params += statuses
        if account_id is not None:
            where.append("t.account_id = ?")
            params.append(account_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return await self.query(f"SELECT {TASK_COLUMNS} FROM {TASK_FROM} {clause}"
                                f" ORDER BY {order} LIMIT ?", (*params, limit))

    async def status_counts(self) -> dict[str, int]:
        rows = await self.query("SELECT status, COUNT(*) AS n FROM content_generation_tasks"
                                " GROUP BY status")
        return {row["status"]: row["n"] for row in rows}

    # -- contents ------------------------------------------------------------------------------

    async def get_content(self, key: int | str) -> dict[str, Any]:
        column = "c.task_id" if isinstance(key, str) else "c.id"
        rows = await self.query(f"SELECT {CONTENT_LIST_COLUMNS}, c.body FROM {CONTENT_FROM}"
                                f" WHERE {column} = ?", (key,))
        if not rows:
            raise NotFound(f"no content {key}")
        return rows[0]

    async def list_contents(self, *, account_id: int | None = None,
                            review_status: str | None = None, since: str | None = None,
                            ids: list[int] | None = None, limit: int = 50,
                            with_body: bool = False) -> list[dict[str, Any]]:
        where, params = [], []
        for clause, value in (("c.account_id = ?", account_id),
                              ("c.review_status = ?", review_status),
                              ("c.created_at >= ?", since)):
            if value is not None:
                where.append(clause)
                params.append(value)
        if ids:
            where.append(f"c.id IN ({', '.join('?' * len(ids))})")
            params += ids
        columns = CONTENT_LIST_COLUMNS + (", c.body" if with_body else "")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return await self.query(f"SELECT {columns} FROM {CONTENT_FROM} {clause}"
                                " ORDER BY c.id DESC LIMIT ?", (*params, limit))

    async def review_contents(self, ids: list[int], status: str,
                              reason: str | None) -> list[int]:
        def review(conn: sqlite3.Connection) -> list[int]:
            updated = []
            for content_id in ids:
                cursor = conn.execute("UPDATE contents SET review_status = ?, review_reason = ?"
                                      " WHERE id = ?", (status, reason, content_id))
                if cursor.rowcount:
                    updated.append(content_id)
            return updated

        return await self._write(review)


    # -- reports -------------------------------------------------------------------------------

    async def metrics(self) -> dict[str, Any]:
        """The seed's `monitor metrics` keys. The average covers the last day's completions
        so it stays cheap on a database of millions of tasks."""

        def collect(conn: sqlite3.Connection) -> dict[str, Any]:
            counts = dict(conn.execute("SELECT status, COUNT(*) FROM content_generation_tasks"
                                       " GROUP BY status").fetchall())
            since = to_db_time(utc_now() - timedelta(days=1))
            avg = conn.execute(
                "SELECT AVG((julianday(completed_at) - julianday(started_at)) * 86400)"
                " FROM content_generation_tasks WHERE status = 'completed'"
                " AND completed_at >= ?", (since,)).fetchone()[0]
            contents = dict(conn.execute("SELECT review_status, COUNT(*) FROM contents"
                                         " GROUP BY review_status").fetchall())
            finished = sum(counts.get(s, 0) for s in ("completed", "failed", "timeout"))
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
                "avg_completion_seconds": round(avg, 3) if avg is not None else None,
                "contents_total": sum(contents.values()),
                "pending_review": contents.get("pending_review", 0),
            }

        return await self._read(collect)

# Creator runner ################################################################################

PLACEHOLDER_RE = re.compile(r"\{(\w+)\}")
PLACEHOLDERS = ("task_id", "account_id", "account_name", "topic", "keywords", "category",
                "requirements", "tone", "target_audience", "priority", "priority_level",
                "external_id")
#: Variables that belong to the daemon's own supervisor, never to its children.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
               "LISTEN_FDNAMES")
ENV_REF_RE = re.compile(r"\$\{(\w+)\}")


def unknown_placeholders(template: list[str]) -> list[str]:
    return sorted({name for part in template for name in PLACEHOLDER_RE.findall(part)
                   if name not in PLACEHOLDERS})


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


def process_group_is_creator(pgid: int, task_id: str) -> bool:
    """Before killing a group recorded by an earlier daemon, check the pid was not reused: its
    leader (or any member we can read) still carries our CONTENTHUB_TASK_ID."""
    marker = f"CONTENTHUB_TASK_ID={task_id}".encode()
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            stat = (proc_dir / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            if marker in (proc_dir / "environ").read_bytes().split(b"\0"):
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


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
        return strip_ansi(self.stderr)[-limit:].strip()


class _PipeCapture:
    """Reads one pipe without blocking the loop, keeps at most `limit` bytes in total
    (shared with the sibling pipe through `budget`), and hands complete lines to `on_line`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, budget: list[int],
                 on_line: Callable[[str], None] | None):
        self.fd, self.loop, self.budget, self.on_line = fd, loop, budget, on_line
        self.chunks: list[bytes] = []
        self.partial = b""
        self.done: asyncio.Future[bool] = loop.create_future()  #: True when over the cap
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._finish(False)
            return
        self.budget[0] -= len(data)
        if self.budget[0] < 0:
            self._finish(True)
            return
        self.chunks.append(data)
        if self.on_line is not None:
            lines = (self.partial + data).split(b"\n")
            self.partial = lines.pop()
            for line in lines:
                self.on_line(line.decode("utf-8", "replace"))

    def _finish(self, over_limit: bool) -> None:
        self.close()
        if not self.done.done():
            self.done.set_result(over_limit)

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


async def _wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _feed_stdin(fd: int, payload: bytes) -> None:
    """Write the task to the child's stdin; a child that never reads it is not an error."""
    try:
        os.set_blocking(fd, False)
        view = memoryview(payload)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                await _wait_writable(fd)
    except (BrokenPipeError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


async def _wait_writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def run_process(argv: list[str], *, stdin: bytes = b"", cwd: Path | None = None,
                      env: dict[str, str] | None = None, timeout: float,
                      max_output: int = 8 << 20, kill_grace: float = KILL_GRACE_S,
                      stop: asyncio.Event | None = None,
                      on_stdout_line: Callable[[str], None] | None = None,
                      on_spawn: Callable[[int], Awaitable[None]] | None = None) -> ProcessResult:
    """Run one child in its own process group and always leave nothing behind.

    The child's exit is watched through a pidfd, not through its pipes: a grandchild that
    keeps stdout open cannot hold the worker slot. On timeout, stop or over-large output the
    group gets SIGTERM, then SIGKILL after `kill_grace`; after any exit the group gets SIGKILL
    so stray grandchildren die with it. Spawn failures (missing binary) raise OSError.
    """
    import subprocess

    loop = asyncio.get_running_loop()
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True,
                            close_fds=True)
    pgid = proc.pid
    budget = [max_output]
    out = _PipeCapture(loop, os.dup(proc.stdout.fileno()), budget, on_stdout_line)
    err = _PipeCapture(loop, os.dup(proc.stderr.fileno()), budget, None)
    proc.stdout.close()
    proc.stderr.close()
    feeder = asyncio.create_task(_feed_stdin(os.dup(proc.stdin.fileno()), stdin))
    proc.stdin.close()
    pidfd = os.pidfd_open(proc.pid)  # the child is not reaped yet, so this cannot fail
    result = ProcessResult(None, "", "", 0.0)
    try:
        if on_spawn is not None:
            await on_spawn(proc.pid)
        exited = asyncio.ensure_future(_wait_readable(pidfd))
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        watched = {w for w in (exited, stopper, out.done, err.done) if w is not None}
        deadline = started + timeout
        while not exited.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                result.timed_out = True
                break
            done, _ = await asyncio.wait(watched, timeout=remaining,
                                         return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                result.stopped = True
                break
            if any(pipe.done.done() and pipe.done.result() for pipe in (out, err)):
                result.output_too_large = True
                break
            watched -= {w for w in done if w is not exited}
        if not exited.done():
            kill_process_group(pgid, signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), kill_grace)
            kill_process_group(pgid, signal.SIGKILL)
            await exited
        if stopper is not None:
            stopper.cancel()
        kill_process_group(pgid, signal.SIGKILL)
        result.exit_code = proc.wait()  # a zombie by now: this returns at once
        # Whatever is still in the pipes was written before the group died: read it out,
        # but never wait on a grandchild that escaped into a session of its own.
        await asyncio.wait([out.done, err.done], timeout=PIPE_DRAIN_S)
    finally:
        kill_process_group(pgid, signal.SIGKILL)
        out.close()
        err.close()
        feeder.cancel()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if proc.returncode is None:
            await asyncio.to_thread(proc.wait)
    result.stdout, result.stderr = out.text(), err.text()
    result.duration = time.monotonic() - started
    return result


# Output adapters: a creator's stdout becomes an Article, or a CreatorFailure saying why not.

ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    return ANSI_RE.sub("", text)


@dataclass
class CreatorFailure:
    kind: str  #: error_kind: exit_code, killed, timeout, bad_output, output_too_large, ...
    message: str
    retryable: bool = True


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
    if "success" in data and isinstance(data.get("data"), dict):
        if not data["success"]:
            return CreatorFailure("creator_failed", str(data.get("error") or data))
        data = data["data"]
    elif data.get("success") is False:
        return CreatorFailure("creator_failed", str(data.get("error") or "success: false"))
    body = data.get("content") or data.get("body") or data.get("article")
    if not isinstance(body, str) or not body.strip():
        return CreatorFailure("bad_output", "JSON result has no non-empty 'content' or 'body'")
    images = data.get("images") or []
    if not isinstance(images, list):
        images = [images]
    quality = data.get("quality") if isinstance(data.get("quality"), dict) else {}
    score = data.get("quality_score", data.get("qualityScore"))
    if score is not None:
        quality = {**quality, "score": score}
    extra = {key: data[key] for key in ("generator", "model", "usage", "summary", "word_count",
                                        "wordCount") if key in data}
    title = data.get("title") if isinstance(data.get("title"), str) else None
    return Article(body=body, title=title, images=[str(i) for i in images], quality=quality,
                   external_id=data.get("task_id") or data.get("taskId"), extra=extra)


def classify_result(result: ProcessResult, creator: CreatorConfig,
                    cwd: Path) -> Article | CreatorFailure:
    """Decide what one finished creator process produced."""
    if result.output_too_large:
        return CreatorFailure("output_too_large",
                              f"creator printed more than {creator.max_output} bytes", False)
    if result.timed_out:
        return CreatorFailure("timeout", "creator did not finish within task_timeout")
    if creator.output == "content-creator-text":
        return parse_content_creator_text(result, cwd)
    if result.exit_code is not None and result.exit_code < 0:
        name = signal.Signals(-result.exit_code).name
        return CreatorFailure("killed", f"creator killed by {name}; stderr: "
                                        f"{result.stderr_tail() or '(empty)'}")
    if result.exit_code:
        permanent = result.exit_code in creator.permanent_exit_codes
        return CreatorFailure("exit_code", f"creator exited {result.exit_code}"
                              f"{' (permanent)' if permanent else ''}: "
                              f"{result.stderr_tail() or '(stderr empty)'}", not permanent)
    return parse_json_output(result.stdout)


def article_row(article: Article, topic: str) -> dict[str, Any]:
    """The contents row's derived fields, by SPEC §7's rules."""
    body = article.body.strip("\n") + "\n"
    return {
        "title": markdown_title(body) or (article.title or "").strip() or topic,
        "body": body,
        "summary": plain_summary(body),
        "word_count": count_words(body),
        "images": article.images,
        "quality": article.quality,
    }


# Worker pool ###################################################################################


def retry_delay(base_s: float, cap_s: float, retry_count: int) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, capped."""
    ceiling = min(cap_s, base_s * (2 ** retry_count))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def creator_argv(creator: CreatorConfig, template: list[str] | None = None) -> list[str]:
    """The argv template for a task; the built-in creator is this very file."""
    if creator.kind == "builtin":
        llm = creator.llm
        return [sys.executable, str(Path(__file__).resolve()), "create",
                "--llm-base-url", llm.base_url, "--llm-model", llm.model,
                "--api-key-env", llm.api_key_env, "--timeout", str(llm.timeout)]
    return list(template if template is not None else creator.command)


def task_values(task: dict[str, Any]) -> dict[str, Any]:
    """Placeholder values for a task's argv, and the JSON its creator reads on stdin."""
    values = {name: task.get(name) for name in PLACEHOLDERS}
    values["priority_level"] = priority_to_content_creator(int(task.get("priority") or 5))
    return values


@dataclass
class RunningTask:
    task: dict[str, Any]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str = ""  #: "cancel" or "shutdown"
    pgid: int | None = None
    worker: asyncio.Task | None = None


class WorkerPool:
    """Claims due tasks best-first and runs each creator in its own process group.

    At most `capacity` creators run at once (resizable live). The dispatcher sleeps on an
    event, woken by new work, a finished worker, or the next retry falling due; it never
    polls. Each outcome is one store transition fenced by the task's attempt number, so a
    cancel that lands while the creator finishes always wins.
    """

    def __init__(self, store: Store, config: Config, environ: dict[str, str],
                 clock: Callable[[], datetime] = utc_now):
        self.store = store
        self.config = config
        self.environ = environ
        self.clock = clock
        self.running: dict[str, RunningTask] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._claiming = True
        self._dispatcher: asyncio.Task | None = None
        self._watchers: dict[str, set[asyncio.Queue]] = {}
        self.on_finished: Callable[[str, str], None] | None = None  #: (task_id, status) hook

    @property
    def capacity(self) -> int:
        return self.config.daemon.max_concurrent_tasks

    def apply_config(self, config: Config) -> None:
        """Reload: new tasks use the new creator settings; running ones are untouched."""
        self.config = config
        self.wake()

    async def start(self) -> None:
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
        for queue in self._watchers.get(task_id, ()):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait({"task_id": task_id, **event})

    # -- dispatch ------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while self._claiming:
            self._wake.clear()
            free = self.capacity - len(self.running)
            delay: float | None = None
            if free > 0:
                daemon = self.config.daemon
                now = self.clock()
                claimed = await self.store.claim_next_tasks(
                    free, now, daemon.task_timeout, daemon.max_concurrent_per_account)
                for task in claimed:
                    self._start_worker(task)
                if len(claimed) == free:
                    continue
                due = await self.store.next_due_at()
                if due is not None:
                    delay = max(0.0, (due - self.clock()).total_seconds())
            if not self._claiming:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _start_worker(self, task: dict[str, Any]) -> None:
        running = RunningTask(task)
        self.running[task["task_id"]] = running
        self._idle.clear()
        running.worker = asyncio.create_task(self._run(running), name=task["task_id"])
        self.publish(task["task_id"], status="running", progress=None, stage=None)

    async def _run(self, running: RunningTask) -> None:
        task = running.task
        task_id, attempt = task["task_id"], task["attempt"]
        task_log = log.bind(task_id=task_id, attempt=attempt)
        status = None
        try:
            status = await self._attempt(running, task_log)
        except Exception:
            task_log.exception("worker_crashed")
            status = await self.store.fail_attempt(
                task_id, attempt, self.clock(), "internal", "daemon error while running the"
                " creator; see the daemon log", self._retry_delay(task))
        finally:
            self.running.pop(task_id, None)
            if not self.running:
                self._idle.set()
            self.wake()
        if status is not None:
            self.publish(task_id, status=status)
            if self.on_finished is not None and status in TERMINAL_STATUSES:
                self.on_finished(task_id, status)

    def _retry_delay(self, task: dict[str, Any]) -> float:
        daemon = self.config.daemon
        return retry_delay(daemon.retry_backoff, daemon.retry_backoff_max, task["retry_count"])

    async def _attempt(self, running: RunningTask, task_log: Any) -> str | None:
        """Run the creator once and record the outcome; returns the task's new status."""
        task = running.task
        task_id, attempt = task["task_id"], task["attempt"]
        creator = self.config.creator
        cwd = self.config.creator_cwd(self.environ)
        (cwd / "data").mkdir(parents=True, exist_ok=True)
        values = task_values(task)
        argv = render_argv(creator_argv(creator), values)
        env = child_environment(self.environ, {
            "DOTENV_CONFIG_QUIET": "true", **expand_env(creator.env, self.environ),
            "CONTENTHUB_TASK_ID": task_id})
        last_progress: list[Any] = [None]

        def on_line(line: str) -> None:
            progress = progress_from_line(line)
            if progress is not None and progress != last_progress[0]:
                last_progress[0] = progress
                self.publish(task_id, status="running", progress=progress[0], stage=progress[1])
                asyncio.ensure_future(self.store.record_progress(task_id, attempt, *progress))

        async def on_spawn(pid: int) -> None:
            running.pgid = pid
            await self.store.record_process(task_id, attempt, pid)

        try:
            result = await run_process(
                argv, stdin=json.dumps(values, ensure_ascii=False).encode() + b"\n", cwd=cwd,
                env=env, timeout=self.config.daemon.task_timeout,
                max_output=creator.max_output, kill_grace=creator.kill_grace,
                stop=running.stop, on_stdout_line=on_line, on_spawn=on_spawn)
        except OSError as exc:
            task_log.error("creator_spawn_failed", error=str(exc), argv0=argv[0])
            return await self.store.fail_attempt(task_id, attempt, self.clock(), "spawn_failed",
                                                 f"cannot start {argv[0]}: {exc}",
                                                 self._retry_delay(task))
        if result.stopped:
            if running.stop_reason == "shutdown":
                await self.store.requeue_tasks([task_id], self.clock(), "daemon stopping")
                task_log.info("task_interrupted", duration=round(result.duration, 3))
                return "pending"
            task_log.info("task_cancelled", duration=round(result.duration, 3))
            return None
        outcome = classify_result(result, creator, cwd)
        if isinstance(outcome, Article):
            row = article_row(outcome, task["topic"])
            content_id = await self.store.complete_task(
                task_id, attempt, row, self._result_json(outcome, result), self.clock())
            task_log.info("task_completed", content_id=content_id, title=row["title"],
                          words=row["word_count"], duration=round(result.duration, 3))
            return "completed" if content_id is not None else None
        final = "timeout" if outcome.kind == "timeout" else "failed"
        status = await self.store.fail_attempt(
            task_id, attempt, self.clock(), outcome.kind, outcome.message,
            self._retry_delay(task) if outcome.retryable else None, final)
        task_log.warning("task_attempt_failed", error_kind=outcome.kind, status=status,
                         exit_code=result.exit_code, duration=round(result.duration, 3),
                         error=outcome.message[:300])
        return status

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
            running.stop.set()
        self.publish(task_id, status="cancelled")
        if self.on_finished is not None:
            self.on_finished(task_id, "cancelled")
        log.info("task_cancel_requested", task_id=task_id, was=before["status"])
        return before

    async def stop(self, grace: float) -> None:
        """Stop claiming; give running creators `grace` seconds, then kill their groups and
        put their tasks back to pending without spending a retry."""
        self._claiming = False
        self.wake()
        if self._dispatcher is not None:
            await self._dispatcher
        if self.running:
            log.info("waiting_for_running_tasks", count=len(self.running), grace_s=grace)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for running in list(self.running.values()):
            running.stop_reason = "shutdown"
            running.stop.set()
        workers = [r.worker for r in self.running.values() if r.worker is not None]
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)

    def kill_all_now(self) -> None:
        """Second stop signal: no grace, the groups die and recovery requeues at next start."""
        for running in self.running.values():
            if running.pgid:
                kill_process_group(running.pgid)


# Control server ################################################################################

TIME_FIELDS = {"submitted_at", "started_at", "completed_at", "timeout_at", "next_attempt_at",
               "created_at", "updated_at", "at", "scheduled_publish_at", "published_at",
               "scheduled_for", "fired_at", "last_scheduled_for", "next_fire_at", "cutoff"}
JSON_FIELDS = {"images", "quality", "result", "params"}
BOOL_FIELDS = {"auto_approve", "paused", "enabled"}
COMMAND_GROUPS = ("content", "task", "monitor", "scheduler")


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
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise InvalidRequest(f"argument '{name}' must be {names}, got {value!r}")
    if choices is not None and value not in choices:
        raise InvalidRequest(f"argument '{name}' must be one of {', '.join(map(str, choices))}")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        raise InvalidRequest(f"argument '{name}' must be between {minimum} and {maximum}")
    return value


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


class ControlServer:
    """NDJSON over a Unix stream socket: one request per line, replies in order.

    Every request is parsed and validated before it touches anything; a bad line gets an
    error reply and the connection stays usable. Connections are bounded, idle ones time out.
    """

    def __init__(self, path: Path, config: Config, store: Store, pool: WorkerPool,
                 app_commands: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]):
        self.path = path
        self.config = config
        self.store = store
        self.pool = pool
        # `task.status` is served by cmd_task_status, `bulk_import` by cmd_bulk_import.
        self.commands = {self._command_name(name): getattr(self, name)
                         for name in dir(self) if name.startswith("cmd_")}
        self.commands.update(app_commands)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

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
        self._server = await asyncio.start_unix_server(self._serve_connection, path=self.path,
                                                       limit=MAX_LINE_BYTES + 1)
        os.chmod(self.path, self.config.daemon.socket_mode)
        if self.config.daemon.socket_group:
            with contextlib.suppress(KeyError, PermissionError):
                os.chown(self.path, -1, grp.getgrnam(self.config.daemon.socket_group).gr_gid)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for connection in list(self._connections):
                connection.cancel()
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

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        current = asyncio.current_task()
        self._connections.add(current)
        try:
            if len(self._connections) > self.config.daemon.max_connections:
                error = ContentHubError("too many connections; try again")
                error.code = "busy"
                writer.write(self._reply(None, error=error))
                return
            allowed, uid = peer_allowed(writer.get_extra_info("socket"),
                                        self.config.daemon.socket_group)
            if not allowed:
                error = ContentHubError(f"uid {uid} may not use this socket")
                error.code = "forbidden"
                writer.write(self._reply(None, error=error))
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(),
                                                  self.config.daemon.connection_idle_timeout)
                except asyncio.TimeoutError:
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
                await self._answer(line, reader, writer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(current)
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    async def _answer(self, line: bytes, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        request_id = None
        try:
            try:
                request = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidRequest(f"request is not valid JSON: {exc}") from None
            if not isinstance(request, dict):
                raise InvalidRequest("request must be a JSON object")
            request_id = request.get("id")
            if request.get("v") != 1:
                raise InvalidRequest("unsupported protocol version; expected \"v\": 1")
            cmd, args = request.get("cmd"), request.get("args", {})
            if not isinstance(args, dict):
                raise InvalidRequest("'args' must be an object")
            if cmd == "task.watch":
                await self._watch(request_id, args, reader, writer)
                return
            handler = self.commands.get(cmd) if isinstance(cmd, str) else None
            if handler is None:
                error = ContentHubError(f"unknown command {cmd!r}")
                error.code = "unknown_command"
                raise error
            result = present(await handler(args), self.tz)
            writer.write(self._reply(request_id, result))
        except ContentHubError as exc:
            writer.write(self._reply(request_id, error=exc))
        except Exception as exc:
            log.exception("control_command_failed")
            writer.write(self._reply(request_id, error=ContentHubError(
                f"internal error: {type(exc).__name__}: {exc}")))

    async def _watch(self, request_id: Any, args: dict[str, Any],
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Stream a task's changes until it is terminal or the client goes away."""
        task_id = arg(args, "task_id", str, required=True)
        queue = self.pool.subscribe(task_id)
        try:
            task = await self.store.get_task(task_id)
            while task["status"] not in TERMINAL_STATUSES:
                event = {"task_id": task_id, "status": task["status"],
                         "progress": task["progress"], "stage": task["stage"]}
                writer.write(json.dumps({"v": 1, "id": request_id, "event": event},
                                        ensure_ascii=False).encode() + b"\n")
                await writer.drain()
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
            writer.write(self._reply(request_id, present(
                await self.store.get_task(task_id, with_events=True), self.tz)))
        finally:
            self.pool.unsubscribe(task_id, queue)

    # -- commands: content ---------------------------------------------------------------------

    async def cmd_content_generate(self, args: dict[str, Any]) -> dict[str, Any]:
        task = await self.validate_new_task(args)
        [task_id] = await self.store.add_tasks([task], self.pool.clock())
        self.pool.wake()
        log.info("task_submitted", task_id=task_id, account_id=task["account_id"], origin="ctl")
        return {"task_id": task_id, "status": "pending",
                "message": "task queued; follow it with: contenthubctl task status " + task_id}

    async def validate_new_task(self, args: dict[str, Any]) -> dict[str, Any]:
        account_id = arg(args, "account_id", int, required=True)
        account = await self.store.get_account(account_id)
        if account is None or not account["enabled"]:
            raise InvalidRequest(f"unknown account {account_id}; accounts come from [[accounts]]"
                                 " in the config")
        topic = arg(args, "topic", str, required=True).strip()
        if not topic:
            raise InvalidRequest("argument 'topic' must not be empty")
        requirements = args.get("requirements")
        if isinstance(requirements, (dict, list)):
            requirements = json.dumps(requirements, ensure_ascii=False)
        args = {**args, "requirements": requirements}
        return {
            "account_id": account_id, "topic": topic,
            **{name: arg(args, name, str, default="") for name in
               ("keywords", "requirements", "tone", "target_audience")},
            "category": arg(args, "category", str, default=account["category"]),
            "priority": arg(args, "priority", int, default=5, minimum=0, maximum=10),
            "auto_approve": arg(args, "auto_approve", bool,
                                default=self.config.daemon.auto_approve),
            "max_retries": self.config.daemon.max_retries,
        }

    async def cmd_content_list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return await self._contents(args, with_body=False)

    async def cmd_content_export(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return await self._contents(args, with_body=True)

    async def _contents(self, args: dict[str, Any], with_body: bool) -> list[dict[str, Any]]:
        since = arg(args, "since", str)
        if since is not None:
            try:
                moment = datetime.fromisoformat(since)
            except ValueError:
                raise InvalidRequest(f"argument 'since' is not an ISO date/time: {since!r}")
            since = to_db_time(moment if moment.tzinfo else moment.replace(tzinfo=self.tz))
        ids = arg(args, "ids", list)
        if ids is not None and not all(isinstance(i, int) for i in ids):
            raise InvalidRequest("argument 'ids' must be a list of integers")
        return await self.store.list_contents(
            account_id=arg(args, "account_id", int),
            review_status=arg(args, "review_status", str,
                              choices=("pending_review", "approved", "rejected")),
            since=since, ids=ids, limit=arg(args, "limit", int, default=50, minimum=1,
                                            maximum=100_000), with_body=with_body)

    async def cmd_content_show(self, args: dict[str, Any]) -> dict[str, Any]:
        key = arg(args, "id", (int, str), required=True)
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        return await self.store.get_content(key)

    async def cmd_content_approve(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._review(args, "approved")

    async def cmd_content_reject(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._review(args, "rejected")

    async def _review(self, args: dict[str, Any], status: str) -> dict[str, Any]:
        ids = arg(args, "ids", list, required=True)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InvalidRequest("argument 'ids' must be a non-empty list of content ids")
        updated = await self.store.review_contents(ids, status, arg(args, "reason", str))
        return {"updated": updated, "missing": [i for i in ids if i not in updated]}

    # -- commands: tasks -----------------------------------------------------------------------

    async def cmd_task_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.store.get_task(arg(args, "task_id", str, required=True),
                                         with_events=True)

    async def cmd_task_list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        status = arg(args, "status", (str, list))
        statuses = [status] if isinstance(status, str) else status
        for name in statuses or ():
            if name not in ACTIVE_STATUSES + TERMINAL_STATUSES:
                raise InvalidRequest(f"unknown status {name!r}")
        return await self.store.list_tasks(
            status=statuses, account_id=arg(args, "account_id", int),
            limit=arg(args, "limit", int, default=50, minimum=1, maximum=100_000))

    async def cmd_task_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        task_id = arg(args, "task_id", str, required=True)
        await self.pool.cancel(task_id)
        return await self.store.get_task(task_id)

    async def cmd_task_retry(self, args: dict[str, Any]) -> dict[str, Any]:
        task_id = arg(args, "task_id", str, required=True)
        await self.store.retry_task(task_id, self.pool.clock())
        self.pool.wake()
        self.pool.publish(task_id, status="pending")
        return await self.store.get_task(task_id)

    # -- commands: monitor ---------------------------------------------------------------------

    async def cmd_monitor_metrics(self, args: dict[str, Any]) -> dict[str, Any]:
        metrics = await self.store.metrics()
        metrics.update(workers_busy=len(self.pool.running), workers_max=self.pool.capacity)
        return metrics

    async def cmd_monitor_recent(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.store.list_tasks(limit=arg(args, "limit", int, default=20, minimum=1),
                                           order="t.updated_at DESC")

    async def cmd_monitor_failed(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.store.list_tasks(status=["failed", "timeout"],
                                           limit=arg(args, "limit", int, default=20, minimum=1),
                                           order="t.updated_at DESC")

    async def cmd_monitor_pending(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.store.list_tasks(
            status=["pending", "submitted", "running"],
            limit=arg(args, "limit", int, default=20, minimum=1),
            order="t.priority DESC, t.next_attempt_at, t.id")


# Built-in creator ##############################################################################

def markdown_title(md):  # TEMP until merge
    for line in md.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return None


def plain_summary(md, limit=200):  # TEMP
    return re.sub(r"\s+", " ", re.sub(r"[#*>`]", "", md)).strip()[:limit]


def count_words(text):  # TEMP
    cjk = len(re.findall(r"[\u4e00-\u9fff]", text))
    return cjk + len(re.findall(r"[A-Za-z0-9]+", text))


def priority_to_content_creator(p):  # TEMP
    return "low" if p <= 3 else "normal" if p <= 6 else "high" if p <= 8 else "urgent"


def parse_content_creator_text(result, cwd):  # TEMP
    return CreatorFailure("bad_output", "not yet")


def run_builtin_creator(argv):  # TEMP
    task = json.loads(sys.stdin.read())
    body = f"# {task['topic']}\n\n关于{task['topic']}的草稿，关键词 {task['keywords']}。" * 1 + "\n\n## 背景\n\n" + "内容" * 80 + "\n"
    print(json.dumps({"title": task["topic"], "content": body, "generator": "offline-template"}, ensure_ascii=False))
    return 0


# App ###########################################################################################


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class App:
    """Owns the store, the loops, the pool and the control socket: all mutable state.

    serve() = startup() -> main_loop() -> shutdown(). Signal handlers only set events; the
    main loop reacts. A second SIGTERM/SIGINT kills the creators' groups and exits at once;
    the next start's recovery puts their tasks back in the queue.
    """

    def __init__(self, config: Config, environ: dict[str, str],
                 clock: Callable[[], datetime] = utc_now):
        self.config = config
        self.environ = environ
        self.clock = clock
        self.store = Store(config.database_path(environ))
        self.pool = WorkerPool(self.store, config, environ, clock)
        self.control: ControlServer | None = None
        self.should_exit = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.status_dirty = asyncio.Event()
        self.started_at: datetime | None = None
        self.last_reload_error: str | None = None
        self._lock_fd: int | None = None
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
            await self._release()
            return 1
        except BaseException:
            log.exception("startup_crashed")
            await self._release()
            raise
        await self.main_loop()
        await self.shutdown()
        return 0

    def _on_stop_signal(self) -> None:
        if self.should_exit.is_set():
            self.pool.kill_all_now()
            os._exit(1)
        self.should_exit.set()

    async def startup(self) -> None:
        state_dir = self.config.state_dir(self.environ)
        state_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock(state_dir)
        await self.store.open()
        await self.recover()
        await self.store.sync_accounts(self.config.accounts, self.clock())
        self.config.creator_cwd(self.environ).joinpath("data").mkdir(parents=True,
                                                                      exist_ok=True)
        socket_path = self.config.socket_path(self.environ)
        await self._claim_socket(socket_path)
        self.control = ControlServer(socket_path, self.config, self.store, self.pool, {
            "version": self.cmd_version, "reload": self.cmd_reload, "config": self.cmd_config,
            "monitor.health": self.cmd_health})
        await self.control.start()
        self.pool.on_finished = self._task_finished
        await self.pool.start()
        self._background.append(asyncio.create_task(self._notify_loop(), name="sd-notify"))
        self.started_at = self.clock()
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
                with contextlib.suppress(ConfigError):
                    await self.reload()

    async def shutdown(self) -> None:
        log.info("daemon_stopping", running=len(self.pool.running))
        sd_notify("STOPPING=1", environ=self.environ)
        if self.control is not None:
            await self.control.stop()
        await self.pool.stop(self.config.daemon.shutdown_grace)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._release()
        log.info("daemon_stopped")

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
        """After a crash: kill creator groups an earlier daemon left running (after checking
        the pgid still belongs to that task) and put their tasks back in the queue."""
        stale = await self.store.running_tasks()
        for row in stale:
            if row["pgid"] and process_group_is_creator(row["pgid"], row["task_id"]):
                kill_process_group(row["pgid"])
                log.warning("orphan_creator_killed", task_id=row["task_id"], pgid=row["pgid"])
        if stale:
            count = await self.store.requeue_tasks([r["task_id"] for r in stale], self.clock(),
                                                   "recovered after daemon restart")
            log.warning("tasks_recovered", count=count)

    async def reload(self) -> dict[str, Any]:
        """Validate the whole file first; on any error the running config stays as it was."""
        sd_notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                  environ=self.environ)
        try:
            new = load_config(self.config.path or None, self.environ)
        except ConfigError as exc:
            self.last_reload_error = str(exc)
            log.error("reload_rejected", errors=exc.errors)
            sd_notify("READY=1", f"STATUS=reload failed: {exc.errors[0]}", environ=self.environ)
            raise
        old, self.config = self.config, new
        await self.store.sync_accounts(new.accounts, self.clock())
        self.pool.apply_config(new)
        if self.control is not None:
            self.control.config = new
        self.last_reload_error = None
        changes = {"workers": [old.daemon.max_concurrent_tasks, new.daemon.max_concurrent_tasks],
                   "accounts": len(new.accounts), "creator_changed": old.creator != new.creator}
        log.info("config_reloaded", **changes)
        sd_notify("READY=1", f"STATUS={await self._status_line()}", environ=self.environ)
        return changes

    # -- systemd status and watchdog -----------------------------------------------------------

    def _task_finished(self, task_id: str, status: str) -> None:
        self.status_dirty.set()

    async def _status_line(self) -> str:
        rows = await self.store.query("SELECT COUNT(*) AS n FROM content_generation_tasks"
                                      " WHERE status = 'pending'")
        return f"{len(self.pool.running)} running, {rows[0]['n']} pending"

    async def _notify_loop(self) -> None:
        """WATCHDOG=1 at half of WATCHDOG_USEC from the event loop itself, so a stuck loop is
        noticed; STATUS= when tasks finish, at most once a second."""
        if not self.environ.get("NOTIFY_SOCKET"):
            return
        interval = watchdog_interval(self.environ)
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.status_dirty.wait(), interval)
            if interval:
                sd_notify("WATCHDOG=1", environ=self.environ)
            if self.status_dirty.is_set():
                self.status_dirty.clear()
                sd_notify(f"STATUS={await self._status_line()}", environ=self.environ)
                await asyncio.sleep(1)

    # -- commands that need the whole App ------------------------------------------------------

    async def cmd_version(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"version": __version__, "schema_version": SCHEMA_VERSION, "pid": os.getpid(),
                "started_at": to_db_time(self.started_at), "config_path": self.config.path}

    async def cmd_reload(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"reloaded": True, "changes": await self.reload()}

    async def cmd_config(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return describe_config(self.config)

    async def cmd_health(self, args: dict[str, Any]) -> dict[str, Any]:
        checks = [
            {"name": "database", "ok": self.store.last_write_error is None,
             "detail": self.store.last_write_error or str(self.store.path)},
            {"name": "config", "ok": self.last_reload_error is None,
             "detail": self.last_reload_error or (self.config.path or "embedded default")},
            {"name": "workers", "ok": True,
             "detail": f"{len(self.pool.running)}/{self.pool.capacity} busy"},
        ]
        checks.append(await self._creator_health())
        return {"status": "ok" if all(c["ok"] for c in checks) else "degraded",
                "checks": checks}

    async def _creator_health(self) -> dict[str, Any]:
        creator = self.config.creator
        if not creator.health_command:
            return {"name": "creator", "ok": True, "detail": f"{creator.kind} (no health_command)"}
        cwd = self.config.creator_cwd(self.environ)
        env = child_environment(self.environ, {"DOTENV_CONFIG_QUIET": "true",
                                               **expand_env(creator.env, self.environ)})
        try:
            result = await run_process(creator.health_command, cwd=cwd, env=env,
                                       timeout=creator.health_timeout, max_output=1 << 16)
        except OSError as exc:
            return {"name": "creator", "ok": False, "detail": f"cannot run: {exc}"}
        ok = result.exit_code == 0 and not result.timed_out
        detail = (strip_ansi(result.stdout).strip().splitlines() or [""])[-1] if ok else (
            "timed out" if result.timed_out else
            f"exit {result.exit_code}: {result.stderr_tail(300) or '(stderr empty)'}")
        return {"name": "creator", "ok": ok, "detail": detail}


# CLI entry #####################################################################################


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["create"]:
        return run_builtin_creator(argv[1:])
    parser = argparse.ArgumentParser(
        prog="contenthubd", description="Run the contenthubd daemon in the foreground.",
        epilog="`contenthubd create` is the built-in creator the daemon runs for each task.")
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
            load_config(options.check_config, environ)
        except ConfigError as exc:
            for error in exc.errors:
                print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"{options.check_config}: OK")
        return 0
    path = options.config or environ.get("CONTENTHUB_CONFIG") or None
    try:
        config = load_config(path, environ)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"contenthubd: config error: {error}", file=sys.stderr)
        return 1
    configure_logging(config.daemon.log_format, config.daemon.log_level, environ)
    return asyncio.run(App(config, environ).serve())


if __name__ == "__main__":
    sys.exit(main())
