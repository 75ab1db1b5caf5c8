#!/usr/bin/env python3
"""contenthubctl: the command-line client of contenthubd's control socket.

It sends one NDJSON request per command over the daemon's Unix socket (docs/protocol.md) and
prints the reply as a table, JSON or CSV. Standard library only, nothing imported from
contenthubd.py, and modules that only some commands need are imported inside them, so it
starts fast and runs on hosts where the daemon's dependencies are not installed.

Sections, in order (`grep '^# .*###' contenthubctl.py`):
    Constants       exit codes, defaults, the choices the daemon accepts
    Errors          the ways a command ends badly, each carrying its exit code
    Socket client   finding the socket (flag, env, config, default), request/reply, events
    Formatting      display width (CJK counts 2), tables, key/value blocks, CSV, Prometheus
                    text, export files, the --wait progress line; all pure functions
    Commands        one function per subcommand: build the args, call, print, exit code
    Main            the argparse tree and main()
    Completion      bash and zsh completion scripts generated from that tree

Exit codes: 0 ok, 1 the command failed, 2 usage error, 69 contenthubd unreachable.
"""

import argparse
import collections
import contextlib
import json
import os
import re
import sys

#: typing and socket are imported only where needed: every import costs start-up time, and
#: mypy reads this constant as true (pyproject's always_true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any, BinaryIO

__version__ = "0.2.0.dev0"  #: equal to contenthubd.__version__ (tests check)

# Constants #####################################################################################

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  #: EX_UNAVAILABLE from sysexits.h
EXIT_INTERRUPTED = 130  #: 128 + SIGINT, as a shell reports Ctrl-C
EXIT_BROKEN_PIPE = 141  #: 128 + SIGPIPE, as a shell reports `| head` closing early

#: systemd's RuntimeDirectory=contenthubd, where the packaged service puts its socket.
DEFAULT_SOCKET = "/run/contenthubd/contenthubd.sock"
#: The daemon run without a config keeps its state (and socket) here, relative to its cwd.
EMBEDDED_DEFAULT_SOCKET = os.path.join("state", "contenthubd.sock")
DEFAULT_CONFIG_NAME = "contenthubd.toml"
REPLY_TIMEOUT_S = 120.0  #: for ordinary commands; `task.watch` waits as long as the task runs
DB_COMMAND_TIMEOUT_S = 3600.0  #: a backup or check of a large file reads all of it
MAX_REQUEST_BYTES = 1 << 20  #: the daemon rejects longer request lines

TASK_STATUSES = ("pending", "submitted", "running", "completed", "failed", "timeout",
                 "cancelled")
REVIEW_STATUSES = ("pending_review", "approved", "rejected")
TOPIC_STATUSES = ("queued", "used", "skipped")
FORMATS = ("table", "json", "csv", "prometheus")

COLUMN_GAP = "  "
MIN_COLUMN_WIDTH = 4  #: a truncated column keeps at least this many cells, "…" included
PROGRESS_BAR_WIDTH = 20
SLUG_MAX_BYTES = 150  #: keeps `<id>-<slug>.md` far below the usual 255-byte name limit

ISO_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?")
CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]+")

# Errors ########################################################################################


class CtlError(Exception):
    """A command that cannot go on; main() prints the message as one line."""

    exit_code = EXIT_FAILED


class UsageError(CtlError):
    """A bad option value argparse could not check (JSON in --params, an unreadable config)."""

    exit_code = EXIT_USAGE


class DaemonUnreachable(CtlError):
    """No daemon answers at the socket: not running, no permission, or it went away."""

    exit_code = EXIT_UNAVAILABLE


class OutcomeUnknown(DaemonUnreachable):
    """The request went out but no reply came: the daemon may or may not have applied it."""


#: How to find out what happened to a request whose reply was lost, per command.
OUTCOME_CHECKS = {
    "bulk_import": "run the same bulk-import again: its idempotency key (the file's hash, or"
                   " --idempotency-key) makes a repeat import nothing twice",
    "content.generate": "repeat it with the same --idempotency-key (safe), or look for the task"
                        " with: contenthubctl task list --limit 5",
}


class CommandFailed(CtlError):
    """The daemon answered `ok: false`."""

    def __init__(self, code: str, message: str, data=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.data = data


# Socket client #################################################################################


#: `key = "value"` or `key = 'value'` on one line, for reading a config TOML cannot parse.
LENIENT_STRING_RE = re.compile(r"""^\s*(socket|state_dir)\s*=\s*(?:"([^"\\]*)"|'([^']*)')""")
LENIENT_TABLE_RE = re.compile(r"^\s*\[\s*([^\]]*?)\s*\]")


def lenient_daemon_keys(text: str) -> dict[str, str]:
    """`socket` and `state_dir` of the [daemon] table, read line by line: a syntax error
    elsewhere in the file must not hide where the daemon listens."""
    found: dict[str, str] = {}
    table = ""
    for line in text.splitlines():
        header = LENIENT_TABLE_RE.match(line)
        if header:
            table = header.group(1)
            continue
        match = LENIENT_STRING_RE.match(line)
        if match and table == "daemon":
            found.setdefault(match.group(1), match.group(2) if match.group(2) is not None
                             else match.group(3))
    return found


def socket_from_config(config_path: str, environ, warn=None) -> str:
    """The socket a daemon started with this config listens on, by the daemon's own rules:
    a relative `socket` lives in RUNTIME_DIRECTORY, else in the state dir (STATE_DIRECTORY,
    else `state_dir` relative to the config file's directory).

    A file TOML cannot parse (an edit in progress, the error `reload` is about to report) is
    read leniently for those two keys, with a warning through `warn`.
    """
    import tomllib

    try:
        with open(config_path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise UsageError(f"cannot read config {config_path}: {exc.strerror or exc}") from None
    try:
        daemon = tomllib.loads(raw.decode("utf-8", errors="replace")).get("daemon", {})
        if not isinstance(daemon, dict):
            daemon = {}
    except tomllib.TOMLDecodeError as exc:
        daemon = lenient_daemon_keys(raw.decode("utf-8", errors="replace"))
        if warn is not None:
            warn(f"warning: {config_path} has an error ({exc}); found the socket from its"
                 " [daemon] lines anyway (see: contenthubctl monitor health)")
    socket_name = str(daemon.get("socket", "contenthubd.sock"))
    if os.path.isabs(socket_name):
        return socket_name
    base = (environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
            or environ.get("STATE_DIRECTORY", "").split(":")[0]
            or os.path.join(os.path.dirname(os.path.abspath(config_path)),
                            str(daemon.get("state_dir", "./state"))))
    return os.path.normpath(os.path.join(base, socket_name))


def discover_socket(socket_option, config_option, environ, cwd: str,
                    warn=None) -> tuple[str, str | None]:
    """(socket path, config path or None): --socket, $CONTENTHUB_SOCKET, the config
    (--config, $CONTENTHUB_CONFIG, ./contenthubd.toml), else the systemd default.

    A config describes where the daemon listens unless systemd moved the socket into
    /run/contenthubd (the shell has no RUNTIME_DIRECTORY), so when the config's socket does
    not exist but the systemd one does, that one is used.
    """
    if socket_option:
        return socket_option, None
    if environ.get("CONTENTHUB_SOCKET"):
        return environ["CONTENTHUB_SOCKET"], None
    config_path = config_option or environ.get("CONTENTHUB_CONFIG")
    if not config_path and os.path.isfile(os.path.join(cwd, DEFAULT_CONFIG_NAME)):
        config_path = os.path.join(cwd, DEFAULT_CONFIG_NAME)
    if config_path:
        candidates = [socket_from_config(config_path, environ, warn), DEFAULT_SOCKET]
    else:
        candidates = [DEFAULT_SOCKET, os.path.join(cwd, EMBEDDED_DEFAULT_SOCKET)]
    existing = [path for path in candidates if os.path.exists(path)]
    return (existing or candidates)[0], config_path


class ControlClient:
    """One connection to the daemon, opened on first use; requests go one at a time."""

    def __init__(self, path: str, config_path: str | None = None):
        self.path = path
        self.config_path = config_path
        self._sock: socket.socket | None = None
        self._lines: BinaryIO | None = None
        self._last_id = 0

    def _connect(self) -> "tuple[socket.socket, BinaryIO]":
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            start = f"contenthubd --config {self.config_path or DEFAULT_CONFIG_NAME}"
            raise DaemonUnreachable(f"cannot reach contenthubd at {self.path} (is it running?"
                                    f" start it with: {start})") from None
        except PermissionError:
            sock.close()
            raise DaemonUnreachable(f"cannot reach contenthubd at {self.path}: permission denied"
                                    " (run as root, the daemon's user, or a member of its"
                                    " socket_group)") from None
        except OSError as exc:
            sock.close()
            raise DaemonUnreachable(f"cannot reach contenthubd at {self.path}:"
                                    f" {exc.strerror or exc}") from None
        return sock, sock.makefile("rb")

    def call(self, cmd: str, args: dict | None = None, on_event=None,
             timeout: float | None = REPLY_TIMEOUT_S):
        """Send one request and return its result; streamed events go to `on_event`.

        Raises CommandFailed for `ok: false`, DaemonUnreachable when the connection fails.
        """
        self._last_id += 1
        request_id = self._last_id
        line = json.dumps({"v": 1, "id": request_id, "cmd": cmd, "args": args or {}},
                          ensure_ascii=False).encode() + b"\n"
        if len(line) > MAX_REQUEST_BYTES:
            raise CtlError(f"request is {len(line)} bytes; the daemon accepts at most"
                           f" {MAX_REQUEST_BYTES} per line (split the input)")
        if self._sock is None or self._lines is None:
            self._sock, self._lines = self._connect()
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(line)
            while True:
                raw = self._lines.readline()
                if not raw:
                    raise self._unknown(cmd, f"contenthubd at {self.path} closed the connection"
                                        " before replying (did it stop?)")
                message = self._decode(raw)
                if message.get("id") not in (request_id, None):
                    continue
                if "event" in message:
                    if on_event is not None:
                        on_event(message["event"])
                    continue
                if message.get("ok"):
                    return message.get("result")
                error = message.get("error") or {}
                if message.get("id") is None:
                    # Refused before the request was read: busy, or the peer is not allowed.
                    raise DaemonUnreachable(f"contenthubd at {self.path} refused the connection:"
                                            f" {error.get('message', error.get('code'))}")
                raise CommandFailed(error.get("code", "error"),
                                    error.get("message", "(no message)"), error.get("data"))
        except TimeoutError:
            raise self._unknown(cmd, f"contenthubd at {self.path} did not reply within"
                                f" {timeout:g} s") from None
        except (BrokenPipeError, ConnectionResetError):
            raise self._unknown(cmd, f"lost the connection to contenthubd at {self.path}"
                                " (did it stop?)") from None

    @staticmethod
    def _unknown(cmd: str, what: str) -> OutcomeUnknown:
        check = OUTCOME_CHECKS.get(cmd, "check before repeating it")
        return OutcomeUnknown(f"{what}; the request was sent, so whether {cmd} was applied is"
                              f" unknown: {check}")

    @staticmethod
    def _decode(raw: bytes) -> dict:
        try:
            message = json.loads(raw)
        except ValueError:
            raise CtlError(f"contenthubd sent a line that is not JSON: {raw[:200]!r}") from None
        if not isinstance(message, dict):
            raise CtlError(f"contenthubd sent a reply that is not an object: {raw[:200]!r}")
        return message

    def close(self) -> None:
        if self._sock is not None and self._lines is not None:
            self._lines.close()
            self._sock.close()
            self._sock = self._lines = None


# Formatting ####################################################################################


def char_width(char: str) -> int:
    """Terminal cells of one character: 2 for wide/fullwidth (CJK), 0 for combining marks."""
    import unicodedata

    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    if text.isascii():
        return len(text)
    return sum(char_width(char) for char in text)


def truncate(text: str, width: int) -> str:
    """`text` cut to at most `width` cells, ending in "…" when something was cut."""
    if display_width(text) <= width:
        return text
    if width <= 0:
        return ""
    kept, used = [], 0
    for char in text:
        cells = char_width(char)
        if used + cells > width - 1:
            break
        kept.append(char)
        used += cells
    return "".join(kept) + "…"


def pad(text: str, width: int, align: str = "left") -> str:
    gap = " " * max(0, width - display_width(text))
    return gap + text if align == "right" else text + gap


def short_time(text: str) -> str:
    """The daemon's ISO times as `YYYY-MM-DD HH:MM:SS` (already in its timezone)."""
    return f"{text[:10]} {text[11:19]}" if ISO_TIME_RE.fullmatch(text) else text


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def format_value(key: str, value) -> str:
    """One value for humans, on one line."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if key in ("success_rate", "success_ratio", "attempt_success_rate"):
            return f"{value * 100:.1f}%"
        if key == "progress":
            return f"{value}%"
        if key.endswith("_seconds"):
            return f"{value:.1f} s" if isinstance(value, float) else f"{value} s"
        return str(value)
    if isinstance(value, str):
        return CONTROL_CHARS_RE.sub(" ", short_time(value)) or "-"
    if isinstance(value, dict) and all(_is_scalar(item) for item in value.values()):
        return ", ".join(f"{k}={format_value(k, v)}" for k, v in value.items()) or "-"
    if isinstance(value, list) and all(_is_scalar(item) for item in value):
        return ", ".join(format_value(key, item) for item in value) or "-"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


#: A table column: `key` names a field of the row, or is a function of the row.
#: `short`, if set, shortens a cell (a task id to its random part) before any column is cut.
Column = collections.namedtuple("Column", "header key flex align short",
                                defaults=(False, "left", None))


def cell_text(row: dict, column: Column) -> str:
    if callable(column.key):
        return format_value("", column.key(row))
    return format_value(column.key, row.get(column.key))


def fit_widths(widths: list[int], columns, headers: list[str], max_width: int) -> list[int]:
    """Shrink columns until the row fits: the widest flexible column (topic, title) first,
    then the widest of any; no column goes below its header or MIN_COLUMN_WIDTH."""
    widths = list(widths)
    excess = sum(widths) + len(COLUMN_GAP) * (len(widths) - 1) - max_width
    floors = [max(MIN_COLUMN_WIDTH, display_width(header)) for header in headers]
    flexible = [i for i, column in enumerate(columns) if column.flex]
    for group in (flexible, range(len(widths))):
        while excess > 0:
            shrinkable = [i for i in group if widths[i] > floors[i]]
            if not shrinkable:
                break
            widest = max(shrinkable, key=widths.__getitem__)
            narrower = [widths[i] for i in shrinkable if widths[i] < widths[widest]]
            tied = len(shrinkable) - len(narrower) > 1
            target = widths[widest] - 1 if tied else max(narrower + [floors[widest]])
            step = min(excess, widths[widest] - max(target, floors[widest]))
            widths[widest] -= step
            excess -= step
    return widths


def table_lines(rows: list[dict], columns, max_width: int | None = None) -> list[str]:
    """Rows as aligned columns, measured in display cells so CJK text lines up. Too wide for
    `max_width`: ids shorten first (still accepted as input), then columns are cut."""
    headers = [column.header for column in columns]
    cells = [[cell_text(row, column) for column in columns] for row in rows]

    def measure() -> list[int]:
        return [max(display_width(text) for text in texts) for texts in zip(headers, *cells)]

    widths = measure()
    if max_width and sum(widths) + len(COLUMN_GAP) * (len(widths) - 1) > max_width:
        shortened = [i for i, column in enumerate(columns) if column.short]
        for texts in cells:
            for i in shortened:
                texts[i] = columns[i].short(texts[i])
        widths = measure()
    if max_width:
        widths = fit_widths(widths, columns, headers, max_width)
    return [COLUMN_GAP.join(pad(truncate(text, width), width, column.align)
                            for text, width, column in zip(texts, widths, columns))
            for texts in [headers, *cells]]


def auto_columns(rows: list[dict]) -> list[Column]:
    """Columns for rows no command describes: every key, long text ones flexible, numbers
    right-aligned."""
    keys = dict.fromkeys(key for row in rows if isinstance(row, dict) for key in row)
    return [Column(key.upper(), key, flex=key in FLEXIBLE_KEYS,
                   align="right" if all(_is_number(row.get(key)) for row in rows) else "left")
            for key in keys]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


FLEXIBLE_KEYS = {"topic", "title", "detail", "message", "description", "result", "value",
                 "error_message", "summary", "reason", "params"}


def object_lines(obj: dict, order=(), max_width: int | None = None) -> list[str]:
    """One object as aligned `key: value` lines; lists of objects (events, runs, checks)
    follow as tables."""
    keys = [key for key in order if key in obj] + [key for key in obj if key not in order]
    pairs, tables = [], []
    for key in keys:
        value = obj[key]
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            tables.append((key, value))
        else:
            pairs.append((key, value))
    label_width = max((display_width(key) for key, _ in pairs), default=0) + 1
    lines = []
    for key, value in pairs:
        text = format_value(key, value)
        if max_width and not _is_scalar(value):
            text = truncate(text, max_width - label_width - 1)
        lines.append(f"{pad(key + ':', label_width)} {text}")
    for key, rows in tables:
        lines += ["", f"{key}:", *table_lines(rows, auto_columns(rows), max_width)]
    return lines


def json_text(value) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2) + "\n"


def csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def csv_text(value) -> str:
    """A list of objects as a header row plus one row each; one object as key,value rows."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if isinstance(value, list):
        rows = [row if isinstance(row, dict) else {"value": row} for row in value]
        header = list(dict.fromkeys(key for row in rows for key in row))
        if header:
            writer.writerow(header)
        writer.writerows([csv_cell(row.get(key)) for key in header] for row in rows)
    elif isinstance(value, dict):
        writer.writerow(["key", "value"])
        writer.writerows([key, csv_cell(item)] for key, item in value.items())
    else:
        writer.writerows([["value"], [csv_cell(value)]])
    return buffer.getvalue()


def prometheus_up_text(up: bool) -> str:
    return ("# HELP contenthub_up Whether contenthubd answered the metrics request.\n"
            f"# TYPE contenthub_up gauge\ncontenthub_up {int(up)}\n")



#: Front-matter fields of an exported file, in this order; values are JSON (valid YAML).
FRONT_MATTER_KEYS = ("id", "task_id", "title", "account_id", "account_name", "topic",
                     "review_status", "word_count", "created_at", "images")
#: Written after those when known (not null or empty): what made the article.
FRONT_MATTER_KNOWN_KEYS = ("generator", "model", "keywords", "category", "quality", "cost")


def slugify(title: str) -> str:
    """A file-name-safe slug that keeps CJK and other letters: anything that is not a letter,
    digit, `_` or `.` becomes `-`; no leading dot, no path separators, bounded length."""
    import unicodedata

    text = unicodedata.normalize("NFKC", title).lower()
    slug = "".join(char if char.isalnum() or char in "_." else "-" for char in text)
    slug = re.sub(r"-{2,}", "-", slug).strip("-.")
    while len(slug.encode()) > SLUG_MAX_BYTES:
        slug = slug[:-1]
    return slug.strip("-.") or "untitled"


def export_file_name(content: dict) -> str:
    return f"{content['id']}-{slugify(content.get('title') or content.get('topic') or '')}.md"


#: `![alt](target "title")`, the target bare or in <>; group 2 is the target.
MARKDOWN_IMAGE_RE = re.compile(r'!\[([^\]]*)\]\(\s*<?([^)\s>]+)>?((?:\s+"[^"]*")?)\s*\)')


def _local_link(target: str, links: dict[str, str]) -> str | None:
    """The exported copy of an image the body links as `target`. A creator may print a path
    relative to its working directory (data/images/x.png) where the image list has it
    absolute, so a relative target also matches the end of a source path."""
    if target in links:
        return links[target]
    if "://" in target:
        return None
    tail = "/" + target.lstrip("./")
    return next((link for source, link in links.items() if source.endswith(tail)), None)


def export_document(content: dict, links: dict[str, str] | None = None) -> str:
    """Markdown with a front-matter header; JSON-encoded values keep quotes and newlines in
    titles safe. `links` maps an image's source (URL or path) to its exported copy: the
    body's image links are rewritten to those copies, and copies the body does not show
    (content-creator lists its images apart from the article) are appended at its end."""
    links = links or {}
    used: set[str] = set()

    def relink(match: re.Match) -> str:
        link = _local_link(match.group(2), links)
        if link is None:
            return match.group(0)
        used.add(link)
        return f"![{match.group(1)}]({link}{match.group(3)})"

    body = (content.get("body") or "").rstrip("\n")
    if links:
        body = MARKDOWN_IMAGE_RE.sub(relink, body)
        extra = [f"![]({link})" for link in dict.fromkeys(links.values()) if link not in used]
        if extra:
            body = "\n\n".join(part for part in (body, "\n".join(extra)) if part)
    fields = dict(content)
    if "images" in fields and links:
        fields["images"] = [links.get(source, source) for source in fields["images"] or []]
    header = [f"{key}: {json.dumps(fields.get(key), ensure_ascii=False)}"
              for key in FRONT_MATTER_KEYS if key in fields]
    header += [f"{key}: {json.dumps(fields[key], ensure_ascii=False)}"
               for key in FRONT_MATTER_KNOWN_KEYS if fields.get(key) not in (None, "", {})]
    return "\n".join(["---", *header, "---", "", body]) + "\n"


def _write_atomically(path: str, write) -> None:
    """Write to a temp name and rename, so a reader never sees half a file."""
    partial = f"{path}.partial-{os.getpid()}"
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def export_media(content: dict, directory: str, warn=None) -> dict[str, str]:
    """Copy the article's saved images into DIR/<id>-<slug>/; returns source -> relative
    link. Images that were not saved keep their original reference (and are named)."""
    import shutil

    bundle = export_file_name(content)[:-len(".md")]
    links: dict[str, str] = {}
    for item in content.get("media") or []:
        if item.get("status") != "saved" or not item.get("path"):
            if warn is not None:
                warn(f"content {content['id']}: image {item.get('url', '')[:100]} was not saved"
                     f" ({item.get('status')}: {item.get('error') or 'not yet downloaded'});"
                     " the export links its original address")
            continue
        os.makedirs(os.path.join(directory, bundle), exist_ok=True)
        name = os.path.basename(item["path"])
        try:
            _write_atomically(os.path.join(directory, bundle, name),
                              lambda partial, source=item["path"]: shutil.copyfile(source,
                                                                                   partial))
        except OSError as exc:
            raise CtlError(f"cannot copy the image {item['path']} of content {content['id']}:"
                           f" {exc.strerror or exc} (run contenthubctl as a user that can"
                           " read the daemon's state directory)") from None
        links[item["url"]] = f"{bundle}/{name}"
    return links


def write_export_files(contents: list[dict], directory: str, warn=None) -> list[str]:
    """One `<id>-<slug>.md` per content, its images in `<id>-<slug>/` beside it and linked
    relatively, so the directory can be moved or published as it is."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for content in contents:
        links = export_media(content, directory, warn)
        path = os.path.join(directory, export_file_name(content))

        def write(partial: str, content=content, links=links) -> None:
            with open(partial, "w", encoding="utf-8", newline="\n") as file:
                file.write(export_document(content, links))

        _write_atomically(path, write)
        paths.append(path)
    return paths


def jsonl_text(contents: list[dict]) -> str:
    return "".join(json.dumps(content, ensure_ascii=False) + "\n" for content in contents)


def progress_bar_line(status: "str | None", progress, stage) -> str:
    percent = progress if progress is not None else (100 if status == "completed" else 0)
    percent = max(0, min(100, int(percent)))
    filled = percent * PROGRESS_BAR_WIDTH // 100
    bar = "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled)
    return f"[{bar}] {percent:3d}% {status}" + (f" {stage}" if stage else "")


def progress_status_line(task_id: str, status: "str | None", progress, stage) -> str:
    parts = [task_id, str(status)]
    if progress is not None:
        parts.append(f"{progress}%")
    if stage:
        parts.append(str(stage))
    return " ".join(parts)


class ProgressReporter:
    """`--wait` output on stderr: one bar redrawn in place on a terminal, otherwise one plain
    line per change of status or stage (readable in logs, no carriage returns)."""

    def __init__(self, stream, task_id: str, width: int | None = None):
        self.stream = stream
        self.task_id = task_id
        self.width = width
        self.tty = bool(getattr(stream, "isatty", None) and stream.isatty())
        self._last_change: tuple[Any, Any] | None = None
        self._drawn = 0

    def update(self, event: dict) -> None:
        status, progress, stage = event.get("status"), event.get("progress"), event.get("stage")
        if self.tty:
            line = progress_bar_line(status, progress, stage)
            if self.width:
                line = truncate(line, self.width - 1)
            cells = display_width(line)
            self.stream.write("\r" + line + " " * max(0, self._drawn - cells))
            self._drawn = cells
        elif (status, stage) != self._last_change:
            self._last_change = (status, stage)
            self.stream.write(progress_status_line(self.task_id, status, progress, stage) + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0


def account_of(row: dict):
    return row.get("account_name") or row.get("account_id")


def error_of(row: dict):
    return ": ".join(str(part) for part in (row.get("error_kind"), row.get("error_message"))
                     if part) or None


def executor_params_of(row: dict) -> str:
    """`name*` for required parameters."""
    return ", ".join(param.get("name", "?") + ("*" if param.get("required") else "")
                     for param in row.get("params") or [])


#: task-<13 digit ms>-<8 hex>: narrow tables show the random part, which the daemon accepts
TASK_ID_RE = re.compile(r"task-\d{13}-([0-9a-f]{8})")


def short_task_id(task_id: str) -> str:
    match = TASK_ID_RE.fullmatch(task_id)
    return match.group(1) if match else task_id


def run_result_of(row: dict):
    """A schedule run's result as its message (or error), not the executor's whole record."""
    result = row.get("result")
    if not isinstance(result, dict):
        return result
    message, error = result.get("message"), result.get("error")
    if result.get("success") is False and error:
        return f"{error}: {message}" if message and message != error else error
    return message or error


def compact_time(text: str) -> str:
    """`2026-12-02 05:53:06` as `12-02 05:53`, for tables that do not fit."""
    return f"{text[5:16]}" if re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", text) else text


TASK_ID_COLUMN = Column("TASK_ID", "task_id", short=short_task_id)


def time_column(header: str, key: str) -> Column:
    return Column(header, key, short=compact_time)


def status_of(row: dict):
    """A pending task a budget holds reads `pending (waiting: budget)`; a submitted one says
    what its creator reports of the job: `submitted (remote: queued|running|unknown)`."""
    waiting, remote = row.get("waiting"), row.get("remote_status")
    if waiting:
        return f"{row.get('status')} (waiting: {waiting})"
    if remote and row.get("status") == "submitted":
        return f"submitted (remote: {remote})"
    return row.get("status")


TASK_COLUMNS = (TASK_ID_COLUMN, Column("STATUS", status_of),
                Column("PRI", "priority", align="right"),
                Column("ACCOUNT", account_of, flex=True), Column("TOPIC", "topic", flex=True),
                time_column("UPDATED", "updated_at"))
FAILED_TASK_COLUMNS = (TASK_ID_COLUMN, Column("STATUS", "status"),
                       Column("ACCOUNT", account_of, flex=True),
                       Column("TOPIC", "topic", flex=True),
                       Column("ERROR", error_of, flex=True), time_column("UPDATED", "updated_at"))


def generator_of(row: dict):
    """The GENERATOR column: an offline draft is a placeholder, and says so loudly."""
    generator = row.get("generator")
    return "offline-template (placeholder)" if generator == "offline-template" else generator


CONTENT_COLUMNS = (Column("ID", "id", align="right"), Column("REVIEW", "review_status"),
                   Column("GENERATOR", generator_of),
                   Column("ACCOUNT", account_of, flex=True),
                   Column("WORDS", "word_count", align="right"),
                   time_column("CREATED", "created_at"), Column("TITLE", "title", flex=True))
EXPORT_COLUMNS = (Column("ID", "id", align="right"), Column("FILE", "file"),
                  Column("TITLE", "title", flex=True))
#: Like `systemctl list-timers`; times are in the daemon's timezone (`show` has the schedule's).
SCHEDULE_COLUMNS = (Column("NAME", "name"), Column("EXECUTOR", "executor", flex=True),
                    Column("TRIGGER", "trigger", flex=True), Column("PAUSED", "paused"),
                    time_column("NEXT_FIRE", "next_fire_at"),
                    time_column("LAST", "last_scheduled_for"),
                    Column("LAST_STATUS", "last_status"))
RUN_COLUMNS = (Column("ID", "id", align="right"), Column("SCHEDULE", "schedule_name"),
               time_column("SCHEDULED_FOR", "scheduled_for"), time_column("FIRED_AT", "fired_at"),
               Column("TRIGGER", "trigger"), Column("STATUS", "status"),
               Column("RESULT", run_result_of, flex=True))
EXECUTOR_COLUMNS = (Column("TYPE", "type"), Column("DESCRIPTION", "description", flex=True),
                    Column("PARAMS", executor_params_of, flex=True))
TOPIC_COLUMNS = (Column("ID", "id", align="right"), Column("ACCOUNT", "account_id", align="right"),
                 Column("STATUS", "status"), Column("SOURCE", "source"),
                 Column("TOPIC", "topic", flex=True), Column("KEYWORDS", "keywords", flex=True),
                 Column("TASK_ID", "task_id"), Column("ADDED", "added_at"))
def config_value_of(row: dict):
    """A duration as the config writes it ("30m"), anything else as it is."""
    return row["display"] if "display" in row else row.get("value")


CONFIG_COLUMNS = (Column("KEY", "key"), Column("VALUE", config_value_of, flex=True),
                  Column("SOURCE", "source"))
DELIVERY_COLUMNS = (Column("ID", "id", align="right"), Column("TARGET", "target"),
                    Column("EVENT", "event"), Column("STATUS", "status"),
                    Column("TRIES", "attempts", align="right"), Column("AT", "at"),
                    Column("NEXT", "next_attempt_at"), Column("LAST", "last_response"),
                    Column("ERROR", "last_error", flex=True))

#: Key order of single objects in table format; keys not named follow in the daemon's order.
TASK_ORDER = ("task_id", "status", "remote_status", "waiting", "waiting_reason", "progress",
              "stage", "account_id", "account_name", "topic", "keywords", "category", "priority",
              "attempt", "retry_count", "max_retries", "auto_approve", "content_id", "usage",
              "error_kind", "error_message", "submitted_at",
              "started_at", "completed_at", "next_attempt_at", "timeout_at")
CONTENT_ORDER = ("id", "task_id", "title", "generator", "model", "account_id", "account_name",
                 "topic", "keywords", "category", "review_status", "review_reason",
                 "publish_status", "published_url", "word_count", "cost", "images", "summary",
                 "created_at")
METRICS_ORDER = ("total", "pending", "submitted", "running", "completed", "failed_count",
                 "timeout_count", "cancelled_count", "success_rate", "attempts_total",
                 "attempt_success_rate", "avg_completion_seconds")

# Commands ######################################################################################


def terminal_width(stream) -> int | None:
    """Columns to fit tables into: $COLUMNS, else the terminal's; None (no truncation) when
    the output goes to a pipe or file."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if getattr(stream, "isatty", None) and stream.isatty():
        import shutil

        return shutil.get_terminal_size().columns
    return None


class Session:
    """What a command works with: the daemon connection, the output format and streams."""

    def __init__(self, client: ControlClient, output_format: str, out, err):
        self.client = client
        self.format = output_format
        self.out = out
        self.err = err
        self.width = terminal_width(out)

    def call(self, cmd: str, args: dict | None = None, **kwargs):
        return self.client.call(cmd, args, **kwargs)

    def write(self, text: str) -> None:
        self.out.write(text)

    def write_lines(self, lines: list[str]) -> None:
        self.out.write("".join(line + "\n" for line in lines))

    def warn(self, message: str) -> None:
        self.err.write(f"contenthubctl: {message}\n")

    def show(self, value, columns=None, order=()) -> None:
        """Print a result in the chosen format: a list as a table, an object as key/values."""
        if self.format == "json":
            self.write(json_text(value))
        elif self.format == "csv":
            self.write(csv_text(value))
        elif isinstance(value, list):
            self.write_lines(table_lines(value, columns or auto_columns(value), self.width)
                             if value else ["(none)"])
        elif isinstance(value, dict):
            self.write_lines(object_lines(value, order, self.width))
        else:
            self.write_lines([format_value("", value)])


def show_listing(session: Session, cmd: str, args: dict, columns) -> None:
    """A listing; in table format the daemon also counts what the limit left out, and the
    table is followed (on stderr) by "showing 50 of 54 (use --limit)"."""
    if session.format != "table":
        session.show(session.call(cmd, args), columns)
        return
    reply = session.call(cmd, {**args, "with_total": True})
    rows, total = reply["rows"], reply["total"]
    session.show(rows, columns)
    if total > len(rows):
        session.warn(f"showing {len(rows)} of {total} (use --limit)")


def without_none(mapping: dict) -> dict:
    """Request args with unset options left out, so the daemon applies its defaults."""
    return {key: value for key, value in mapping.items() if value is not None}


def cmd_version(session: Session, options) -> int:
    daemon = session.call("version")
    session.show({"client_version": __version__, "daemon_version": daemon.get("version"),
                  **{key: value for key, value in daemon.items() if key != "version"}})
    return EXIT_OK


def cmd_content_generate(session: Session, options) -> int:
    submitted = session.call("content.generate", without_none({
        "account_id": options.account_id, "topic": options.topic,
        "keywords": options.keywords, "requirements": options.requirements,
        "tone": options.tone, "category": options.category,
        "target_audience": options.target_audience, "priority": options.priority,
        "auto_approve": options.auto_approve, "idempotency_key": options.idempotency_key}))
    if not options.wait:
        session.show({key: submitted.get(key) for key in ("task_id", "status", "message")})
        return EXIT_OK
    return wait_for_task(session, submitted["task_id"])


def wait_for_task(session: Session, task_id: str) -> int:
    """Follow `task.watch` to the end; exit 0 only when the task completed."""
    reporter = ProgressReporter(session.err, task_id, terminal_width(session.err))
    try:
        task = session.call("task.watch", {"task_id": task_id}, on_event=reporter.update,
                            timeout=None)
    except KeyboardInterrupt:
        reporter.finish()
        session.warn(f"stopped waiting; {task_id} keeps going"
                     f" (see: contenthubctl task status {task_id})")
        return EXIT_INTERRUPTED
    reporter.update(task)
    reporter.finish()
    completed = task.get("status") == "completed"
    if session.format != "table":
        session.show(task, order=TASK_ORDER)
    elif completed:
        content_id = task.get("content_id")
        title = ""
        if content_id is not None:
            # The task did complete; a title we cannot fetch is no reason to fail.
            with contextlib.suppress(CommandFailed):
                title = session.call("content.show", {"id": content_id}).get("title") or ""
        session.write_lines([f"{task_id} completed: content {content_id} {title}".rstrip()])
    if not completed:
        session.warn(f"task {task_id} {task.get('status')}: {error_of(task) or 'no reason given'}")
    return EXIT_OK if completed else EXIT_FAILED


def cmd_content_list(session: Session, options) -> int:
    show_listing(session, "content.list", without_none({
        "account_id": options.account_id, "review_status": options.review_status,
        "since": options.since, "limit": options.limit}), CONTENT_COLUMNS)
    return EXIT_OK


def content_key(text: str):
    """`content show` takes a content id (int) or the id of the task that made it (str)."""
    return int(text) if text.isdigit() else text


def cmd_content_show(session: Session, options) -> int:
    content = session.call("content.show", {"id": content_key(options.id)})
    if session.format != "table":
        session.show(content)
        return EXIT_OK
    header = {key: value for key, value in content.items() if key != "body"}
    if header.get("generator") == "offline-template":
        header["generator"] = "offline-template (a placeholder draft, not written by an LLM)"
    session.write_lines(object_lines(header, CONTENT_ORDER, session.width))
    session.write_lines(["", (content.get("body") or "").rstrip("\n")])
    return EXIT_OK


def review(session: Session, cmd: str, options) -> int:
    result = session.call(cmd, without_none({"ids": options.ids, "reason": options.reason,
                                             "force": options.force or None}))
    if session.format != "table":
        session.show(result)
    else:
        verb = "approved" if cmd == "content.approve" else "rejected"
        lines = []
        if result.get("updated"):
            lines.append(f"{verb}: " + ", ".join(map(str, result["updated"])))
        if result.get("unchanged"):
            lines.append(f"unchanged (already {verb}): "
                         + ", ".join(map(str, result["unchanged"])))
        session.write_lines(lines)
    if result.get("missing"):
        session.warn("no content with id " + ", ".join(map(str, result["missing"])))
        return EXIT_FAILED
    return EXIT_OK


def cmd_content_approve(session: Session, options) -> int:
    return review(session, "content.approve", options)


def cmd_content_reject(session: Session, options) -> int:
    return review(session, "content.reject", options)


def cmd_content_publish(session: Session, options) -> int:
    result = session.call("content.publish", without_none({
        "id": content_key(options.id), "force": options.force or None}))
    if session.format != "table":
        session.show(result)
    elif result["publish_status"] == "published":
        where = f" at {result['published_url']}" if result.get("published_url") else ""
        session.write_lines([f"content {result['content_id']} published{where}"])
    if result.get("error"):
        session.warn(f"content {result['content_id']} not published"
                     f" ({result['publish_status']}): {result['error']}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_content_delete(session: Session, options) -> int:
    result = session.call("content.delete", {"ids": options.ids})
    if session.format != "table":
        session.show(result)
    elif result["deleted"]:
        session.write_lines(["deleted: " + ", ".join(map(str, result["deleted"]))])
    if result.get("missing"):
        session.warn("no content with id " + ", ".join(map(str, result["missing"])))
        return EXIT_FAILED
    return EXIT_OK


def cmd_content_export(session: Session, options) -> int:
    contents = session.call("content.export", without_none({
        "ids": options.ids or None, "account_id": options.account_id,
        "review_status": options.review_status, "since": options.since,
        "limit": options.limit}))
    if options.dir and options.output:
        raise UsageError("--output is for JSON Lines; with --dir the files go in DIR")
    if options.dir:
        paths = write_export_files(contents, options.dir, session.warn)
        session.show([{"id": content.get("id"), "file": path, "title": content.get("title")}
                      for content, path in zip(contents, paths)], EXPORT_COLUMNS)
    elif options.output:
        with open(options.output, "w", encoding="utf-8", newline="\n") as file:
            file.write(jsonl_text(contents))
    else:
        session.write(jsonl_text(contents))
    return EXIT_OK


def cmd_task_status(session: Session, options) -> int:
    session.show(session.call("task.status", {"task_id": options.task_id}), order=TASK_ORDER)
    return EXIT_OK


def cmd_task_list(session: Session, options) -> int:
    status = options.status[0] if options.status and len(options.status) == 1 else options.status
    show_listing(session, "task.list", without_none({
        "account_id": options.account_id, "status": status, "limit": options.limit}),
        TASK_COLUMNS)
    return EXIT_OK


def cmd_task_cancel(session: Session, options) -> int:
    task = session.call("task.cancel", {"task_id": options.task_id})
    if session.format == "table":
        session.write_lines([f"{task['task_id']} {task['status']}"])
    else:
        session.show(task, order=TASK_ORDER)
    return EXIT_OK


def cmd_task_retry(session: Session, options) -> int:
    task = session.call("task.retry", {"task_id": options.task_id})
    if session.format == "table":
        session.write_lines([f"{task['task_id']} queued again, now {task['status']} (follow it"
                             f" with: contenthubctl task status {short_task_id(task['task_id'])})"])
    else:
        session.show(task, order=TASK_ORDER)
    return EXIT_OK


def cmd_task_cleanup(session: Session, options) -> int:
    session.show(session.call("task.cleanup", without_none({
        "days": options.days, "status": options.status, "dry_run": options.dry_run})))
    return EXIT_OK


def cmd_task_stats(session: Session, options) -> int:
    session.show(session.call("task.stats"))
    return EXIT_OK


def cmd_monitor_metrics(session: Session, options) -> int:
    """`--format prometheus` prints the daemon's own exposition (the text metrics_textfile
    holds); an unreachable daemon still yields `contenthub_up 0` for the collector."""
    if session.format != "prometheus":
        session.show(session.call("monitor.metrics"), order=METRICS_ORDER)
        return EXIT_OK
    try:
        session.write(session.call("monitor.prometheus")["text"])
    except DaemonUnreachable:
        session.write(prometheus_up_text(False))
        raise
    return EXIT_OK


def task_listing(cmd: str, columns):
    """The handler of a `monitor recent|failed|pending` listing: one cmd, one column set."""
    def show_tasks(session: Session, options) -> int:
        show_listing(session, cmd, without_none({"limit": options.limit}), columns)
        return EXIT_OK

    return show_tasks


cmd_monitor_recent = task_listing("monitor.recent", TASK_COLUMNS)
cmd_monitor_failed = task_listing("monitor.failed", FAILED_TASK_COLUMNS)
cmd_monitor_pending = task_listing("monitor.pending", TASK_COLUMNS)


def cmd_monitor_stats(session: Session, options) -> int:
    session.show(session.call("monitor.stats", without_none({"days": options.days})),
                 order=("days", "total", "completed", "failed", "timeout", "success_rate",
                        "failure_reasons"))
    return EXIT_OK


COST_KEY_COLUMNS = {"day": (Column("DAY", "day"),),
                    "account": (Column("ACCOUNT_ID", "account_id", align="right"),
                                Column("ACCOUNT", "account_name", flex=True)),
                    "model": (Column("MODEL", "model", flex=True),)}
COST_COLUMNS = (Column("ATTEMPTS", "attempts", align="right"),
                Column("TOKENS_IN", "tokens_in", align="right"),
                Column("TOKENS_OUT", "tokens_out", align="right"),
                Column("COST", "cost", align="right"),
                Column("UNPRICED", "unpriced_attempts", align="right"))


def budget_lines(budget: dict) -> list[str]:
    """One line per configured budget: spent of limit, remaining."""
    currency = budget.get("currency", "")
    windows = [("daemon", budget)] + [
        (f"account {a.get('account_name') or a.get('account_id')}", a)
        for a in budget.get("accounts", [])]
    lines = []
    for who, holder in windows:
        for name in ("daily", "monthly"):
            window = holder.get(name) or {}
            if window.get("limit"):
                lines.append(f"{who} {name}: {window['spent']:g} of {window['limit']:g}"
                             f" {currency} spent, {window['remaining']:g} left")
    return lines + [f"waiting: {reason}" for reason in budget.get("waiting", [])]


def cmd_monitor_cost(session: Session, options) -> int:
    by = options.by or "day"
    report = session.call("monitor.cost", without_none({"days": options.days, "by": by}))
    if session.format != "table":
        session.show(report)
        return EXIT_OK
    rows = report.get("rows") or []
    session.write_lines(table_lines(rows, COST_KEY_COLUMNS[by] + COST_COLUMNS, session.width)
                        if rows else ["(no usage recorded)"])
    session.write_lines([
        "", f"total: {report.get('total_cost', 0):g} {report.get('currency', '')},"
        f" {report.get('tokens_in', 0)} tokens in, {report.get('tokens_out', 0)} out"
        f" over {report.get('days')} day(s)", *budget_lines(report.get("budget") or {})])
    return EXIT_OK


def cmd_monitor_health(session: Session, options) -> int:
    health = session.call("monitor.health")
    session.show(health)
    return EXIT_OK if health.get("status") == "ok" else EXIT_FAILED


def cmd_notify_list(session: Session, options) -> int:
    show_listing(session, "notify.list", without_none({
        "status": options.status, "limit": options.limit}), DELIVERY_COLUMNS)
    return EXIT_OK


def cmd_notify_test(session: Session, options) -> int:
    result = session.call("notify.test", {"name": options.name})
    session.show(result, order=("target", "ok", "response", "error", "event_id"))
    return EXIT_OK if result.get("ok") else EXIT_FAILED


def cmd_notify_retry(session: Session, options) -> int:
    session.show(session.call("notify.retry", {"id": options.id}))
    return EXIT_OK


CREATOR_STATUS_ORDER = ("state", "reason", "error_class", "since", "failures", "next_probe_at",
                        "last_probe", "transient_streak", "claims_paused_s", "pause_reason")


def cmd_creator_status(session: Session, options) -> int:
    session.show(session.call("creator.status"), order=CREATOR_STATUS_ORDER)
    return EXIT_OK


def cmd_creator_resume(session: Session, options) -> int:
    session.show(session.call("creator.resume"), order=("was", *CREATOR_STATUS_ORDER))
    return EXIT_OK


def cmd_scheduler_list(session: Session, options) -> int:
    session.show(session.call("scheduler.list"), SCHEDULE_COLUMNS)
    return EXIT_OK


def cmd_scheduler_show(session: Session, options) -> int:
    session.show(session.call("scheduler.show", {"name": options.name}))
    return EXIT_OK


def cmd_scheduler_history(session: Session, options) -> int:
    show_listing(session, "scheduler.history", without_none({
        "name": options.name, "limit": options.limit}), RUN_COLUMNS)
    return EXIT_OK


def cmd_scheduler_pause(session: Session, options) -> int:
    session.show(session.call("scheduler.pause", {"name": options.name}))
    return EXIT_OK


def cmd_scheduler_resume(session: Session, options) -> int:
    session.show(session.call("scheduler.resume", {"name": options.name}))
    return EXIT_OK


def cmd_scheduler_trigger(session: Session, options) -> int:
    """A line: `daily-tech: run 12 fired: Successfully submitted 3 async tasks …`; exit 1
    when the executor failed."""
    run = session.call("scheduler.trigger", {"name": options.name})
    if session.format != "table":
        session.show(run)
    elif run.get("merged"):
        session.write_lines([f"{options.name}: {run.get('message')}"])
    else:
        summary = run_result_of(run)
        session.write_lines([f"{options.name}: run {run.get('run_id')} {run.get('status')}"
                             + (f": {format_value('', summary)}" if summary else "")])
    return EXIT_FAILED if run.get("status") == "failed" else EXIT_OK


def cmd_scheduler_delete(session: Session, options) -> int:
    result = session.call("scheduler.delete", {"name": options.name})
    if session.format == "table":
        session.write_lines([f"deleted schedule {result['deleted']} from"
                             f" {result['config_path']} and reloaded"])
    else:
        session.show(result)
    return EXIT_OK


def cmd_scheduler_next(session: Session, options) -> int:
    result = session.call("scheduler.next", without_none({
        "name": options.name, "count": options.count, "after": options.after}))
    if session.format != "table":
        session.show(result)
        return EXIT_OK
    session.write_lines([f"next fire times of {result.get('name')} ({result.get('timezone')}):",
                         *(short_time(instant) for instant in result.get("instants") or [])])
    return EXIT_OK


def cmd_scheduler_status(session: Session, options) -> int:
    session.show(session.call("scheduler.status"))
    return EXIT_OK


def cmd_scheduler_create(session: Session, options) -> int:
    try:
        params = json.loads(options.params)
    except ValueError as exc:
        raise UsageError(f"--params is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise UsageError("--params must be a JSON object, e.g. '{\"account_ids\": [49]}'")
    session.show(session.call("scheduler.create", without_none({
        "name": options.name, "executor": options.type, "cron": options.cron,
        "every": options.every, "timezone": options.timezone, "misfire": options.misfire,
        "overlap": options.overlap, "params": params})))
    return EXIT_OK


def cmd_executors(session: Session, options) -> int:
    session.show(session.call("executors"), EXECUTOR_COLUMNS)
    return EXIT_OK


def bulk_error_line(file_name: str, error: dict) -> str:
    """`tasks.csv:LINE: column COL: message`, the shape editors and grep understand."""
    where = f"{file_name}:{error['line']}" if error.get("line") is not None else file_name
    column = f" column {error['column']}:" if error.get("column") else ""
    return f"{where}:{column} {error.get('message', 'invalid row')}"


def read_csv_file(path: str) -> str:
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise CtlError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CtlError(f"{path}: not UTF-8 (bad byte at offset {exc.start}); save it as UTF-8"
                       ) from None


def import_csv(session: Session, cmd: str, path: str, args: dict):
    """Send a CSV import (all rows or none); on bad rows print each by line and return None."""
    try:
        return session.call(cmd, {**args, "filename": os.path.basename(path)})
    except CommandFailed as exc:
        errors = exc.data.get("errors") if isinstance(exc.data, dict) else None
        if not errors:
            raise
        session.err.write("".join(bulk_error_line(path, error) + "\n" for error in errors))
        rows = len({error.get("line") for error in errors})
        session.warn(f"nothing imported: {rows} bad row(s), {len(errors)} error(s) in {path}")
        return None


def cmd_bulk_import(session: Session, options) -> int:
    """The idempotency key defaults to the file's SHA-256: importing a file again after an
    ambiguous failure (exit 69, outcome unknown) never doubles its rows."""
    import hashlib

    text = read_csv_file(options.file)
    key = options.idempotency_key or "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    result = import_csv(session, "bulk_import", options.file,
                        {"csv": text, "idempotency_key": key})
    if result is None:
        return EXIT_FAILED
    if session.format == "table" and result.get("duplicate"):
        session.write_lines([
            f"already imported: {result['first_imported']} tasks from this content at"
            f" {result['first_seen_at']} (idempotency key {key}); nothing imported now. To"
            " import it again on purpose, pass --idempotency-key with a new value"])
    elif session.format == "table":
        ids = result["task_ids"]
        span = f": {ids[0]} … {ids[-1]}" if len(ids) > 1 else f": {ids[0]}" if ids else ""
        session.write_lines([f"imported {result['imported']} tasks from {options.file}{span}"])
    else:
        session.show(result)
    return EXIT_OK


def show_topics_added(session: Session, result: dict) -> int:
    """`topics add|import`: the ids added; each duplicate with its reason on stderr."""
    if session.format != "table":
        session.show(result)
    else:
        added = result.get("added") or []
        session.write_lines([f"added {len(added)} topic(s)"
                             + (": " + ", ".join(map(str, added)) if added else "")])
    for duplicate in result.get("duplicates") or []:
        session.warn(f"not added: {duplicate.get('topic')}: {duplicate.get('reason')}")
    return EXIT_OK


def cmd_topics_add(session: Session, options) -> int:
    return show_topics_added(session, session.call("topics.add", without_none({
        "account_id": options.account_id, "topics": options.topics,
        "keywords": options.keywords, "requirements": options.requirements,
        "tone": options.tone, "category": options.category})))


def cmd_topics_import(session: Session, options) -> int:
    text = read_csv_file(options.file)
    result = import_csv(session, "topics.import", options.file, {"csv": text})
    if result is None:
        return EXIT_FAILED
    return show_topics_added(session, result)


def cmd_topics_list(session: Session, options) -> int:
    show_listing(session, "topics.list", without_none({
        "account_id": options.account_id, "status": options.status,
        "limit": options.limit}), TOPIC_COLUMNS)
    return EXIT_OK


def cmd_topics_skip(session: Session, options) -> int:
    result = session.call("topics.skip", {"ids": options.ids})
    session.show(result)
    return EXIT_FAILED if result.get("not_skipped") else EXIT_OK


def reload_lines(changes: dict) -> list[str]:
    """What a reload changed, one fact a line."""
    workers = changes.get("workers") or [None, None]
    lines = ["reloaded the config",
             f"  workers: {workers[0]} -> {workers[1]}" if workers[0] != workers[1]
             else f"  workers: {workers[1]} (unchanged)",
             f"  accounts: {changes.get('accounts')}",
             "  creator: " + ("changed (new tasks use it)" if changes.get("creator_changed")
                              else "unchanged")]
    for key, label in (("schedules_added", "added"), ("schedules_removed", "removed"),
                       ("schedules_changed", "changed")):
        if changes.get(key):
            lines.append(f"  schedules {label}: {', '.join(changes[key])}")
    if changes.get("restart_required"):
        lines.append(f"  restart to apply: {', '.join(changes['restart_required'])}"
                     " (running values kept)")
    return lines




def cmd_db_backup(session: Session, options) -> int:
    # The daemon writes the file, from its own working directory: send an absolute path.
    path = os.path.abspath(options.path)
    session.show(session.call("db.backup", {"path": path}, timeout=options.timeout),
                 order=("path", "bytes", "duration_s", "integrity", "schema_version"))
    return EXIT_OK


def cmd_db_check(session: Session, options) -> int:
    result = session.call("db.check", timeout=options.timeout)
    session.show(result, order=("ok", "integrity", "foreign_keys", "database", "duration_s"))
    return EXIT_OK if result.get("ok") else EXIT_FAILED


def cmd_db_stats(session: Session, options) -> int:
    session.show(session.call("db.stats"))
    return EXIT_OK


def cmd_reload(session: Session, options) -> int:
    result = session.call("reload")
    if session.format == "table":
        session.write_lines(reload_lines(result.get("changes") or {}))
    else:
        session.show(result)
    return EXIT_OK


def cmd_config(session: Session, options) -> int:
    session.show(session.call("config"), CONFIG_COLUMNS)
    return EXIT_OK


# Main ##########################################################################################


def int_in_range(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


#: top-level options that take a value (argparse also accepts any prefix of them)
VALUE_OPTIONS = ("--socket", "--config", "--format")


def command_word(argv: list[str]) -> str | None:
    """The word argparse will take for the command: the first argument that is neither an
    option nor a top-level option's value; None if there is none (`--help`, say)."""
    words = iter(argv)
    for word in words:
        if word.startswith("--") and "=" not in word and any(
                option.startswith(word) for option in VALUE_OPTIONS):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command, or with `only` (a command word) the subcommands of that group alone:
    building them all takes longer than a `task status` call spends on everything else."""
    format_option = argparse.ArgumentParser(add_help=False)
    format_option.add_argument("--format", choices=FORMATS, default=argparse.SUPPRESS,
                               help="output format (may also come before the command)")
    parser = argparse.ArgumentParser(
        prog="contenthubctl", description="Control a running contenthubd.",
        epilog="Socket: --socket, $CONTENTHUB_SOCKET, [daemon] socket of the config"
               " (--config, $CONTENTHUB_CONFIG, ./contenthubd.toml), else " + DEFAULT_SOCKET
               + ". Exit codes: 0 ok, 1 failed, 2 usage, 69 daemon unreachable.")
    parser.add_argument("--socket", metavar="PATH", help="the daemon's control socket")
    parser.add_argument("--config", metavar="FILE", help="find the socket from this config")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table (default), json, csv; prometheus for monitor metrics")
    parser.add_argument("--version", action="version", version=f"contenthubctl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def group(name: str, help_text: str):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        return sub.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)

    def command(parent, name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, parents=[format_option], help=help_text,
                                description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    def wanted(group_name: str) -> bool:
        return only is None or only == group_name

    def add_limit(sub) -> None:
        sub.add_argument("--limit", type=int_in_range(1), help="at most this many rows")

    command(commands, "version", cmd_version, "client and daemon versions")

    content = group("content", "generate and review content")
    if wanted("content"):
        sub = command(content, "generate", cmd_content_generate, "queue one generation task")
        sub.add_argument("-a", "--account-id", type=int, required=True)
        sub.add_argument("-t", "--topic", required=True)
        sub.add_argument("-k", "--keywords", help="comma-separated")
        sub.add_argument("--requirements", metavar="TEXT|JSON")
        sub.add_argument("--tone")
        sub.add_argument("--category")
        sub.add_argument("--target-audience")
        sub.add_argument("--priority", type=int_in_range(0, 10), help="0-10 (daemon default 5)")
        sub.add_argument("--auto-approve", action=argparse.BooleanOptionalAction, default=None,
                         help="approve the result without review (default: the daemon's config)")
        sub.add_argument("--async", dest="async_mode", action="store_true",
                         help="accepted for compatibility: generation is always asynchronous")
        sub.add_argument("--wait", action="store_true",
                         help="follow the task to its end; exit 0 only if it completed")
        sub.add_argument("--idempotency-key", metavar="KEY",
                         help="a repeat with the same key queues nothing new: safe to retry")
        sub = command(content, "list", cmd_content_list, "list contents (without bodies)")
        sub.add_argument("--account-id", type=int)
        sub.add_argument("--review-status", choices=REVIEW_STATUSES)
        sub.add_argument("--since", metavar="ISO", help="created at or after this date/time")
        add_limit(sub)
        sub = command(content, "show", cmd_content_show, "one content with its body")
        sub.add_argument("id", metavar="ID", help="content id, or the id of the task that made it")
        for name, handler in (("approve", cmd_content_approve), ("reject", cmd_content_reject)):
            sub = command(content, name, handler, f"{name} contents")
            sub.add_argument("ids", metavar="ID", type=int, nargs="+")
            sub.add_argument("--reason", help="recorded in the review history")
            sub.add_argument("--force", action="store_true",
                             help=f"{name} even a content another review decided otherwise")
        sub = command(content, "export", cmd_content_export,
                      "write contents as Markdown files or JSON Lines")
        sub.add_argument("ids", metavar="ID", type=int, nargs="*", help="only these contents")
        target = sub.add_mutually_exclusive_group()
        target.add_argument("--dir", metavar="DIR", help="one <id>-<slug>.md per content, its"
                            " images in <id>-<slug>/")
        target.add_argument("--jsonl", action="store_true", help="JSON Lines (the default)")
        sub.add_argument("--output", metavar="FILE", help="JSON Lines to FILE instead of stdout")
        sub.add_argument("--account-id", type=int)
        sub.add_argument("--review-status", choices=("any", *REVIEW_STATUSES),
                         help="default: approved (any, when IDs are given)")
        sub.add_argument("--since", metavar="ISO")
        add_limit(sub)
        sub = command(content, "publish", cmd_content_publish,
                      "publish one approved content now with [publish] command")
        sub.add_argument("id", metavar="ID", help="content id, or the id of the task that made it")
        sub.add_argument("--force", action="store_true",
                         help="publish again, or before its images are all downloaded")
        sub = command(content, "delete", cmd_content_delete,
                      "delete contents with their history and saved images")
        sub.add_argument("ids", metavar="ID", type=int, nargs="+")

    task = group("task", "inspect and manage generation tasks")
    if wanted("task"):
        for name, handler, help_text in (
                ("status", cmd_task_status, "one task with its events"),
                ("cancel", cmd_task_cancel, "cancel a task"),
                ("retry", cmd_task_retry, "run a finished task again")):
            command(task, name, handler, help_text).add_argument("task_id", metavar="TASK_ID")
        sub = command(task, "list", cmd_task_list, "list tasks, newest first")
        sub.add_argument("--account-id", type=int)
        sub.add_argument("--status", choices=TASK_STATUSES, action="append",
                         help="repeat for several")
        add_limit(sub)
        sub = command(task, "cleanup", cmd_task_cleanup, "delete old finished tasks")
        sub.add_argument("--days", type=int_in_range(0), required=True,
                         help="older than this many days")
        sub.add_argument("--status", choices=TASK_STATUSES, nargs="+",
                         help="only these statuses (default: the terminal ones)")
        sub.add_argument("--dry-run", action="store_true", help="count, do not delete")
        command(task, "stats", cmd_task_stats, "task counts by status and account")

    monitor = group("monitor", "metrics and health")
    if wanted("monitor"):
        command(monitor, "metrics", cmd_monitor_metrics,
                "overall metrics (--format prometheus for a textfile collector)")
        for name, handler, help_text in (
                ("recent", cmd_monitor_recent, "recently updated tasks"),
                ("failed", cmd_monitor_failed, "failed and timed-out tasks"),
                ("pending", cmd_monitor_pending, "tasks not finished yet")):
            add_limit(command(monitor, name, handler, help_text))
        sub = command(monitor, "stats", cmd_monitor_stats, "daily statistics and failure reasons")
        sub.add_argument("--days", type=int_in_range(1), help="how many days back (default 7)")
        command(monitor, "health", cmd_monitor_health, "health checks; exit 1 unless all pass")
        sub = command(monitor, "cost", cmd_monitor_cost, "LLM tokens and spend, and budgets")
        sub.add_argument("--days", type=int_in_range(1), help="how many days back (default 7)")
        sub.add_argument("--by", choices=("day", "account", "model"), help="group rows by"
                         " (default day)")

    creator = group("creator", "the creator's circuit breaker")
    if wanted("creator"):
        command(creator, "status", cmd_creator_status,
                "closed, open (nothing is claimed) or probing, and why")
        command(creator, "resume", cmd_creator_resume,
                "close the circuit breaker and lift a rate-limit pause")

    scheduler = group("scheduler", "schedules and their runs")
    if wanted("scheduler"):
        command(scheduler, "list", cmd_scheduler_list, "all schedules")
        for name, handler, help_text in (
                ("show", cmd_scheduler_show, "one schedule in full"),
                ("pause", cmd_scheduler_pause, "stop firing a schedule"),
                ("resume", cmd_scheduler_resume, "fire a schedule again"),
                ("trigger", cmd_scheduler_trigger, "fire a schedule now"),
                ("delete", cmd_scheduler_delete,
                 "remove a schedule from the config file and reload")):
            command(scheduler, name, handler, help_text).add_argument("name", metavar="NAME")
        sub = command(scheduler, "history", cmd_scheduler_history, "recent runs")
        sub.add_argument("name", metavar="NAME", nargs="?", help="only this schedule")
        add_limit(sub)
        sub = command(scheduler, "next", cmd_scheduler_next, "the next fire times of a schedule")
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("--count", type=int_in_range(1), help="how many (default 5)")
        sub.add_argument("--after", metavar="ISO", help="from this time instead of now")
        command(scheduler, "status", cmd_scheduler_status, "scheduler state and the next firing")
        sub = command(scheduler, "create", cmd_scheduler_create,
                      "add a schedule to the config file and reload")
        sub.add_argument("--name", required=True)
        sub.add_argument("--type", required=True, metavar="EXECUTOR",
                         help="executor type (see: contenthubctl executors)")
        trigger = sub.add_mutually_exclusive_group(required=True)
        trigger.add_argument("--cron", metavar="EXPR", help='five fields, e.g. "0 8 * * *"')
        trigger.add_argument("--every", metavar="DURATION", help="interval, e.g. 2h")
        sub.add_argument("--timezone", help="IANA name (default: the daemon's)")
        sub.add_argument("--misfire", choices=("skip", "once", "all"))
        sub.add_argument("--overlap", choices=("skip", "allow"))
        sub.add_argument("--params", default="{}", metavar="JSON", help="executor parameters")

    topics = group("topics", "each account's topic pool")
    if wanted("topics"):
        sub = command(topics, "add", cmd_topics_add, "queue topics for an account")
        sub.add_argument("-a", "--account-id", type=int, required=True)
        sub.add_argument("topics", metavar="TOPIC", nargs="+")
        sub.add_argument("-k", "--keywords", help="comma-separated, for every topic given")
        sub.add_argument("--requirements", metavar="TEXT")
        sub.add_argument("--tone")
        sub.add_argument("--category")
        sub = command(topics, "import", cmd_topics_import,
                      "queue every row of a CSV file, all or nothing")
        sub.add_argument("--file", required=True, metavar="CSV",
                         help="columns account_id,topic [,keywords,requirements,tone,category]")
        sub = command(topics, "list", cmd_topics_list, "topics in the pool, oldest first")
        sub.add_argument("-a", "--account-id", type=int)
        sub.add_argument("--status", choices=TOPIC_STATUSES)
        add_limit(sub)
        sub = command(topics, "skip", cmd_topics_skip, "take queued topics out of the pool")
        sub.add_argument("ids", metavar="ID", type=int, nargs="+")

    notify = group("notify", "notification deliveries ([[notify]] targets)")
    if wanted("notify"):
        sub = command(notify, "list", cmd_notify_list, "deliveries, newest first")
        sub.add_argument("--status", choices=("pending", "sent", "dead"))
        add_limit(sub)
        command(notify, "test", cmd_notify_test,
                "send a test message to a target now; exit 1 unless it was accepted"
                ).add_argument("name", metavar="NAME")
        command(notify, "retry", cmd_notify_retry,
                "send a delivery again from its first attempt").add_argument(
                    "id", metavar="ID", type=int_in_range(1))
    command(commands, "executors", cmd_executors, "executor types and their parameters")
    sub = command(commands, "bulk-import", cmd_bulk_import,
                  "queue every row of a CSV file, all or nothing")
    sub.add_argument("--file", required=True, metavar="CSV",
                     help="columns account_id,topic,keywords,priority,auto_approve"
                          " [,requirements,tone,category]")
    sub.add_argument("--async", dest="async_mode", action="store_true",
                     help="accepted for compatibility: generation is always asynchronous")
    sub.add_argument("--idempotency-key", metavar="KEY",
                     help="default: the file's SHA-256, so importing a file twice imports it"
                          " once; give a new key to import the same rows again")
    db = group("db", "back up, check and measure the database file")
    if wanted("db"):
        sub = command(db, "backup", cmd_db_backup,
                      "consistent online copy to PATH (written by the daemon), then checked")
        sub.add_argument("path", metavar="PATH", help="new file; never overwritten")
        sub.add_argument("--timeout", type=float, default=DB_COMMAND_TIMEOUT_S,
                         help=f"seconds to wait (default {DB_COMMAND_TIMEOUT_S:.0f})")
        sub = command(db, "check", cmd_db_check, "integrity_check and foreign_key_check")
        sub.add_argument("--timeout", type=float, default=DB_COMMAND_TIMEOUT_S,
                         help=f"seconds to wait (default {DB_COMMAND_TIMEOUT_S:.0f})")
        command(db, "stats", cmd_db_stats, "file and WAL size, pages, rows per table")
    command(commands, "reload", cmd_reload, "re-read the config file (like SIGHUP)")
    command(commands, "config", cmd_config, "effective settings and where each came from")
    sub = commands.add_parser("completion", help="print a bash or zsh completion script",
                              description="print a bash or zsh completion script (see README:"
                                          " Install as a service)")
    sub.add_argument("shell", choices=("bash", "zsh"))
    sub.set_defaults(handler=None)
    return parser


def use_utf8(stream) -> None:
    """UTF-8 output whatever the locale says, so Chinese titles survive LANG=C."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(ValueError, OSError):
            reconfigure(encoding="utf-8", errors="replace")


def report_failure(err, exc: CommandFailed) -> None:
    """The daemon's message, its lines after the first indented; then the listed errors the
    message does not already contain, so each error is printed once."""
    first, *rest = str(exc).split("\n")
    err.write(f"contenthubctl: {first}\n" + "".join(f"  {line}\n" for line in rest))
    errors = exc.data.get("errors") if isinstance(exc.data, dict) else None
    for error in errors if isinstance(errors, list) else ():
        text = error if isinstance(error, str) else format_value("", error)
        if text not in rest:
            err.write(f"  {text}\n")


def main(argv: list[str] | None = None) -> int:
    use_utf8(sys.stdout)
    use_utf8(sys.stderr)
    out, err = sys.stdout, sys.stderr
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_word(argv))
    try:
        options = parser.parse_args(argv)
        if options.format == "prometheus" and options.handler is not cmd_monitor_metrics:
            parser.error("--format prometheus is only valid for: monitor metrics")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE if exc.code else EXIT_OK
    if options.command == "completion":  # needs no daemon
        out.write(completion_script(options.shell, build_parser()))
        return EXIT_OK
    try:
        socket_path, config_path = discover_socket(
            options.socket, options.config, os.environ, os.getcwd(),
            warn=lambda message: err.write(f"contenthubctl: {message}\n"))
        session = Session(ControlClient(socket_path, config_path), options.format, out, err)
        try:
            code = options.handler(session, options)
        finally:
            session.client.close()
        out.flush()
        return code
    except CommandFailed as exc:
        report_failure(err, exc)
        return exc.exit_code
    except CtlError as exc:
        err.write(f"contenthubctl: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        err.write("\ncontenthubctl: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`); point stdout at /dev/null so the final flush at
        # interpreter exit does not raise again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        err.write(f"contenthubctl: {type(exc).__name__}: {exc}\n")
        return EXIT_FAILED


# Completion ####################################################################################


def completion_tree(parser: argparse.ArgumentParser) -> dict[str, dict]:
    """Every command path of the parser ("" for the top level, "task list", …) with the words
    that may follow it (subcommands, then options), the options that take a value, and the
    choices of those that have them."""
    tree: dict[str, dict] = {}

    def walk(path: str, node: argparse.ArgumentParser) -> None:
        entry: dict = {"words": [], "takes_value": [], "choices": {}}
        tree[path] = entry
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    entry["words"].append(name)
                    walk(f"{path} {name}".strip(), child)
            elif action.option_strings:
                long_names = [o for o in action.option_strings if o.startswith("--")]
                entry["words"] += long_names or action.option_strings
                if action.nargs != 0:
                    entry["takes_value"] += action.option_strings
                    if action.choices:
                        for option in action.option_strings:
                            entry["choices"][option] = [str(c) for c in action.choices]
            elif action.choices:  # a positional with choices: `completion bash`
                entry["words"] += [str(c) for c in action.choices]
    walk("", parser)
    return tree


def _shell_words(words) -> str:
    return " ".join(words)


def _case_pattern(case: str) -> str:
    """`*|--format` matches any path; anything else is matched literally."""
    return f'*"{case[1:]}"' if case.startswith("*") else f'"{case}"'


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    """A bash or zsh completion function for every command, option and option choice the
    parser has: regenerate it after an upgrade (README: Install as a service)."""
    tree = completion_tree(parser)
    paths = [path for path in tree if path]
    value_options = sorted({o for entry in tree.values() for o in entry["takes_value"]})
    # An option with the same choices wherever it appears (--format) gets one case for all.
    by_option: dict[str, set] = {}
    for entry in tree.values():
        for option, choices in entry["choices"].items():
            by_option.setdefault(option, set()).add(tuple(choices))
    choice_cases = [(f"*|{option}", list(next(iter(variants))))
                    for option, variants in by_option.items() if len(variants) == 1]
    choice_cases += [(f"{path}|{option}", choices) for path, entry in tree.items()
                     for option, choices in entry["choices"].items()
                     if len(by_option[option]) > 1]
    if shell == "bash":
        lines = ["# bash completion for contenthubctl: `contenthubctl completion bash`",
                 "_contenthubctl() {",
                 '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
                 '    local cmdpath="" i word',
                 "    for ((i = 1; i < COMP_CWORD; i++)); do",
                 '        word="${COMP_WORDS[i]}"',
                 '        case "$word" in',
                 f"            {'|'.join(value_options)}) ((i++)); continue ;;",
                 "            -*) continue ;;",
                 "        esac",
                 '        case "${cmdpath:+$cmdpath }$word" in',
                 "            " + "|".join(f'"{p}"' for p in paths)
                 + ') cmdpath="${cmdpath:+$cmdpath }$word" ;;',
                 "        esac",
                 "    done",
                 '    case "$cmdpath|$prev" in']
        lines += [f'        {_case_pattern(case)})'
                  f' COMPREPLY=($(compgen -W "{_shell_words(choices)}" -- "$cur")); return ;;'
                  for case, choices in choice_cases]
        lines += ["    esac",
                  '    case "$prev" in',
                  f"        {'|'.join(value_options)}) return ;;  # a value: files, by -o default",
                  "    esac",
                  '    case "$cmdpath" in']
        lines += [f'        "{path}") COMPREPLY=($(compgen -W "{_shell_words(entry["words"])}"'
                  ' -- "$cur")) ;;' for path, entry in tree.items()]
        lines += ["    esac", "}", "complete -o default -F _contenthubctl contenthubctl", ""]
        return "\n".join(lines)
    lines = ["#compdef contenthubctl",
             "# zsh completion for contenthubctl: `contenthubctl completion zsh`",
             "_contenthubctl() {",
             '    local cmdpath="" word i',
             "    for (( i = 2; i < CURRENT; i++ )); do",
             '        word="${words[i]}"',
             '        case "$word" in',
             f"            ({'|'.join(value_options)}) (( i++ )); continue ;;",
             "            (-*) continue ;;",
             "        esac",
             '        case "${cmdpath:+$cmdpath }$word" in',
             "            (" + "|".join(f'"{p}"' for p in paths)
             + ') cmdpath="${cmdpath:+$cmdpath }$word" ;;',
             "        esac",
             "    done",
             '    local prev="${words[CURRENT-1]}"',
             '    case "$cmdpath|$prev" in']
    lines += [f'        ({_case_pattern(case)}) compadd -- {_shell_words(choices)}; return ;;'
              for case, choices in choice_cases]
    lines += ["    esac",
              '    case "$prev" in',
              f"        ({'|'.join(value_options)}) _files; return ;;",
              "    esac",
              '    case "$cmdpath" in']
    lines += [f'        ("{path}") compadd -- {_shell_words(entry["words"])} ;;'
              for path, entry in tree.items()]
    lines += ["    esac", "}", '_contenthubctl "$@"', ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
