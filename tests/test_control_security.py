"""The control socket: who may connect, how much it takes, and what bad input gets back.
Real daemon, real Unix socket, other uids through fork + setuid (root only).

Sizes (seeded, so every run sends the same bytes):
- fuzz, seed 1729: 3,000 messages pipelined over 30 connections of 100: 572 argument
  mutations (every wrong type of every argument of every command in docs/protocol.md, ints
  beyond 64 bits, lone surrogates, out-of-range dates, bad CSV, missing and null required
  arguments), 56 broken envelopes (version, args, cmd, top level, duplicate keys, huge ids),
  and 2,372 random lines: ~1,070 of random bytes, ~380 with invalid UTF-8, ~450 truncated
  requests, ~480 with an argument nested 10-200, 900-1,100 or 100,000 deep.
- half-closed, seed 4242: 40 connections ending mid-line (101 lines); slow: 4 writers
  sending 2 lines one byte per millisecond.
- limits: max_connections 4 with 9 idle clients, connection_idle_timeout 2 s; one line of
  1 MiB + 58 bytes and one just under 1 MiB.
- input safety: 7 tasks through content.generate and 1 through bulk_import.
Tests marked xfail(strict=True) state a promise the daemon does not keep yet; the reason says
where it breaks. Remove the mark with the fix.
"""
from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import random
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import CREATORS, command_creator

KNOWN_ERRORS = {"invalid", "unknown_command", "not_found", "conflict", "too_large", "busy"}
NOBODY = 65534


def connect(daemon, timeout: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(daemon.socket))
    return sock


def read_replies(sock: socket.socket, expected: int | None = None) -> list[dict]:
    """Reply lines until `expected` of them arrived, or until the daemon closes."""
    data = b""
    while expected is None or data.count(b"\n") < expected:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def request_line(cmd, args=(), request_id=1) -> bytes:
    body = {"v": 1, "id": request_id, "cmd": cmd, "args": {} if args == () else args}
    return json.dumps(body).encode()


def exchange(daemon, line: bytes) -> list[dict]:
    with connect(daemon) as sock:
        sock.sendall(line + b"\n")
        sock.shutdown(socket.SHUT_WR)
        return read_replies(sock)


def assert_log_clean(daemon) -> None:
    log = daemon.log()
    assert "Traceback" not in log and '"control_command_failed"' not in log, log[-3000:]


# -- who may connect ------------------------------------------------------------------------


needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="switching to another uid (setuid) needs root")


def connect_as(path: Path, uid: int, gid: int, groups: list[int], line: bytes) -> dict:
    """Connect from a forked child running as uid/gid; returns its reply or its errno."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome: dict = {}
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(path))
                # Refused peers get their reply at once and may be hung up on.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(line + b"\n")
                outcome["replies"] = read_replies(sock, 1)
        except OSError as exc:
            outcome["errno"] = exc.errno
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, never raised
            outcome["error"] = repr(exc)
        finally:
            os.write(write_end, json.dumps(outcome).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert "error" not in outcome, outcome
    return outcome


@pytest.fixture
def public_socket_dir():
    """A directory every uid can traverse (tmp_path's parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="chd-sock-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def socket_group_member():
    """A throwaway group and a user whose supplementary group it is: (user, group)."""
    if os.geteuid() != 0:
        pytest.skip("creating a group and a user needs root")
    if not (shutil.which("groupadd") and shutil.which("useradd")):
        pytest.skip("groupadd/useradd are not installed")
    group, user = f"chdsock{os.getpid()}", f"chdmem{os.getpid()}"
    made = subprocess.run(["groupadd", group], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"groupadd {group} failed: {made.stderr.strip()}")
    made = subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-G", group, user],
                          capture_output=True, text=True)
    try:
        if made.returncode != 0:
            pytest.skip(f"useradd {user} failed: {made.stderr.strip()}")
        yield user, group
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)


def test_socket_is_0660_by_default(daemon_factory):
    daemon = daemon_factory().start()
    assert stat.S_ISSOCK(daemon.socket.stat().st_mode)
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660


def test_socket_mode_from_config_is_honoured(daemon_factory):
    daemon = daemon_factory()
    daemon.set_options(socket_mode="0600")
    daemon.start()
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600


def test_reload_applies_the_socket_mode_and_keeps_restart_only_keys(daemon_factory):
    daemon = daemon_factory().start()
    text = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(
        text.replace('state_dir = "state"', 'state_dir = "elsewhere"\nsocket_mode = "0600"')
        .replace('log_level = "debug"', 'log_level = "info"'), encoding="utf-8")
    changes = daemon.call("reload")["changes"]
    assert changes["restart_required"] == ["state_dir", "log_level"]
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    rows = {row["key"]: row for row in daemon.call("config")}
    assert rows["daemon.socket_mode"]["value"] == "0600"
    assert rows["daemon.state_dir"]["value"] == "state"
    assert "restart" in rows["daemon.state_dir"]["source"]
    assert '"reload_needs_restart"' in daemon.log()
    # Creators still run in the running state dir, and their tasks land in its database.
    task_id = daemon.submit("重载之后")
    assert daemon.wait_status(task_id, "completed")["content_id"]
    assert not (daemon.dir / "elsewhere").exists()


@needs_root
def test_default_mode_keeps_other_users_off_the_socket(daemon_factory, public_socket_dir):
    daemon = daemon_factory()
    daemon.set_options(socket=str(public_socket_dir / "contenthubd.sock"))
    daemon.start()
    outcome = connect_as(daemon.socket, NOBODY, NOBODY, [], request_line("version"))
    assert outcome == {"errno": 13}  # EACCES: the file mode alone stops them
    assert daemon.call("version")["pid"] == daemon.proc.pid


@needs_root
def test_peer_of_another_uid_is_forbidden_even_when_the_mode_lets_it_connect(
        daemon_factory, public_socket_dir):
    daemon = daemon_factory()
    daemon.set_options(socket=str(public_socket_dir / "contenthubd.sock"),
                       socket_mode="0666")
    daemon.start()
    outcome = connect_as(daemon.socket, NOBODY, NOBODY, [], request_line("task.list"))
    assert "replies" in outcome, outcome
    [reply] = outcome["replies"]
    assert reply["ok"] is False and reply["error"]["code"] == "forbidden"
    assert str(NOBODY) in reply["error"]["message"]
    assert daemon.call("version")["pid"] == daemon.proc.pid


def test_member_of_socket_group_is_allowed_and_others_are_not(
        daemon_factory, public_socket_dir, socket_group_member):
    user, group = socket_group_member
    member, group_id = pwd.getpwnam(user), grp.getgrnam(group).gr_gid
    daemon = daemon_factory()
    daemon.set_options(socket=str(public_socket_dir / "contenthubd.sock"),
                       socket_group=group)
    daemon.start()
    assert daemon.socket.stat().st_gid == group_id
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
    # Primary group elsewhere: the daemon must find the membership in the group's member list.
    outcome = connect_as(daemon.socket, member.pw_uid, member.pw_gid, [group_id],
                         request_line("version"))
    [reply] = outcome["replies"]
    assert reply["ok"] is True and reply["result"]["pid"] == daemon.proc.pid
    assert connect_as(daemon.socket, NOBODY, NOBODY, [], request_line("version")) == {
        "errno": 13}


# -- how much it takes ----------------------------------------------------------------------


def test_connections_beyond_the_limit_get_busy_and_idle_ones_time_out(daemon_factory):
    daemon = daemon_factory()
    # The first-line timeout is far longer: only the idle timeout can close the held ones soon.
    daemon.set_options(max_connections=4, connection_idle_timeout="2s",
                       connection_first_line_timeout="60s")
    daemon.start()
    held = [connect(daemon) for _ in range(4)]
    opened = time.monotonic()
    # Accepted in the order they connected: the held four have the slots.
    extra = [connect(daemon) for _ in range(5)]
    for sock in extra:
        replies = read_replies(sock)  # one reply, then the daemon hangs up
        assert [r["error"]["code"] for r in replies] == ["busy"]
        sock.close()
    for sock in held:
        sock.settimeout(0.05)
        with pytest.raises(socket.timeout):
            sock.recv(1)
    for sock in held:
        sock.settimeout(30)
        assert sock.recv(1) == b"", "an idle connection must be closed without a reply"
        sock.close()
    assert time.monotonic() - opened > 1.7
    # A connection that keeps talking outlives the idle timeout; capacity is back.
    with connect(daemon) as sock:
        talking = time.monotonic()
        for i in range(4):
            sock.sendall(request_line("version", request_id=i) + b"\n")
            assert read_replies(sock, 1)[0]["ok"] is True
            time.sleep(0.7)  # the client's pace, well inside the idle timeout, is the workload
        assert time.monotonic() - talking > 2
    assert_log_clean(daemon)


def test_line_over_one_mib_gets_too_large_and_the_daemon_keeps_serving(daemon_factory):
    daemon = daemon_factory().start()
    oversized = request_line("version", {"pad": "x" * (1 << 20)}) + b"\n"
    with connect(daemon) as sock:
        sender = threading.Thread(target=lambda: _send_ignoring_hangup(sock, oversized))
        sender.start()
        replies = read_replies(sock)
        sender.join()
    assert [r["error"]["code"] for r in replies] == ["too_large"]
    padding = (1 << 20) - len(request_line("version", {"pad": ""}, 7)) - 64
    [reply] = exchange(daemon, request_line("version", {"pad": "y" * padding}, 7))
    assert reply["ok"] is True and reply["id"] == 7
    assert daemon.call("version")["pid"] == daemon.proc.pid
    assert_log_clean(daemon)


def _send_ignoring_hangup(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the daemon hung up after its too_large reply
        sock.sendall(data)


# -- what bad input gets back ---------------------------------------------------------------

WRONG_TYPES = {
    "int": ["49", 4.5, True, [], {}, "", [1], 1e308, 2 ** 70, -(2 ** 70)],
    "str": [5, 5.5, True, [], {}, ["x"], {"a": "b"}, "x\udcff"],
    "bool": ["true", 1, 0, [], {}, "yes"],
    "list": ["x", 5, {}, True],
    "dict": [[], "x", 5, True],
    "int|str": [[], {}, 1.5, True],
    "str|json": [5, 5.5, True],
    "str|list": [5, {}, True, 1.5],
}
SINCE_BAD = ["yesterday", "2020-13-45", "", "2020-01-01T00:00:00+25:00",
             "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"]
LIMIT_BAD = [0, -1, -(2 ** 63), 100_001]
MIN1_BAD = [0, -1, -(2 ** 63)]
BAD_CSV = ["", "\ufeff", "topic\nx\n", "account_id,topic\n", "account_id,topic\nabc,x\n",
           "account_id,topic\n999,x\n", "account_id,topic,colour\n49,x,red\n",
           "account_id,topic\n49,x,extra\n", "account_id,topic\n49,\n",
           "account_id,topic,priority\n49,x,11\n", "account_id,topic,auto_approve\n49,x,maybe\n",
           "account_id,topic\n49," + "长" * 140_000 + "\n"]

#: cmd -> (arguments that make it valid, {arg: (kind, required, extra bad values)}), from
#: docs/protocol.md. Every message built from this table changes exactly one argument for the
#: worse, so each must be refused. Commands without arguments accept anything and are left out.
COMMANDS = {
    "content.generate": ({"account_id": 49, "topic": "x"}, {
        "account_id": ("int", True, [999, 0, -1]), "topic": ("str", True, ["", "   "]),
        "keywords": ("str", False, []), "requirements": ("str|json", False, []),
        "tone": ("str", False, []), "category": ("str", False, []),
        "target_audience": ("str", False, []), "priority": ("int", False, [-1, 11, 2 ** 63 - 1]),
        "auto_approve": ("bool", False, [])}),
    "content.list": ({}, {
        "account_id": ("int", False, []), "review_status": ("str", False, ["maybe", ""]),
        "since": ("str", False, SINCE_BAD), "limit": ("int", False, LIMIT_BAD)}),
    "content.export": ({}, {
        "ids": ("list", False, [["1"], [1.5], [None]]), "account_id": ("int", False, []),
        "review_status": ("str", False, ["maybe"]), "since": ("str", False, SINCE_BAD),
        "limit": ("int", False, LIMIT_BAD)}),
    "content.show": ({"id": "task-nope"}, {"id": ("int|str", True, ["9" * 30])}),
    "content.approve": ({"ids": [1]}, {
        "ids": ("list", True, [[], ["1"], [1.5], [None], [True]]), "reason": ("str", False, []),
        "force": ("bool", False, [])}),
    "content.reject": ({"ids": [1]}, {
        "ids": ("list", True, [[], ["1"], [None]]), "reason": ("str", False, []),
        "force": ("bool", False, [])}),
    "content.delete": ({"ids": [1]}, {"ids": ("list", True, [[], ["1"], [1.5], [None]])}),
    "task.status": ({"task_id": "task-nope"}, {"task_id": ("str", True, [])}),
    "task.list": ({}, {
        "account_id": ("int", False, []), "status": ("str|list", False, ["nope", ["nope"], [5]]),
        "limit": ("int", False, LIMIT_BAD)}),
    "task.cancel": ({"task_id": "task-nope"}, {"task_id": ("str", True, [])}),
    "task.retry": ({"task_id": "task-nope"}, {"task_id": ("str", True, [])}),
    "task.watch": ({"task_id": "task-nope"}, {"task_id": ("str", True, [])}),
    "task.cleanup": ({"days": 0, "dry_run": True}, {
        "days": ("int", True, [-1, -(2 ** 63), 1_000_000]),
        "status": ("list", False, [["pending"], [5], ["completed", None]]),
        "dry_run": ("bool", False, [])}),
    "monitor.recent": ({}, {"limit": ("int", False, MIN1_BAD)}),
    "monitor.failed": ({}, {"limit": ("int", False, MIN1_BAD)}),
    "monitor.pending": ({}, {"limit": ("int", False, MIN1_BAD)}),
    "monitor.stats": ({}, {"days": ("int", False, [0, 3651, -5])}),
    "scheduler.show": ({"name": "nope"}, {"name": ("str", True, [])}),
    "scheduler.history": ({}, {"name": ("str", False, []), "limit": ("int", False, MIN1_BAD)}),
    "scheduler.pause": ({"name": "nope"}, {"name": ("str", True, [])}),
    "scheduler.resume": ({"name": "nope"}, {"name": ("str", True, [])}),
    "scheduler.trigger": ({"name": "nope"}, {"name": ("str", True, [])}),
    "scheduler.next": ({"name": "nope"}, {
        "name": ("str", True, []), "count": ("int", False, [0, 1001]),
        "after": ("str", False, ["later"])}),
    "scheduler.create": ({"name": "fuzz", "executor": "cleanup", "every": "1h"}, {
        "name": ("str", True, []), "executor": ("str", True, ["nope"]),
        "every": ("str", False, ["soon", "-1h"]), "cron": ("str", False, ["61 * * * *"]),
        "timezone": ("str", False, ["Mars/Base"]), "misfire": ("str", False, ["sometimes"]),
        "overlap": ("str", False, ["maybe"]), "description": ("str", False, []),
        "params": ("dict", False, [{"days": "x"}, {"colour": 1}])}),
    "bulk_import": ({"csv": "account_id,topic\n49,x\n"}, {
        "csv": ("str", True, BAD_CSV), "filename": ("str", False, [])}),
}
NO_ARG_COMMANDS = ["version", "config", "executors", "task.stats", "monitor.metrics",
                   "monitor.health", "scheduler.list", "scheduler.status"]


def argument_mutations() -> list[tuple[str, dict]]:
    """Every command with one argument wrong, missing or null (null only where required)."""
    messages = []
    for cmd, (valid, spec) in COMMANDS.items():
        for name, (kind, required, extra) in spec.items():
            for value in WRONG_TYPES[kind] + extra:
                messages.append((cmd, {**valid, name: value}))
            if required:
                messages.append((cmd, {k: v for k, v in valid.items() if k != name}))
                messages.append((cmd, {**valid, name: None}))
    return messages


def envelope_mutations(rng: random.Random) -> list[bytes]:
    """Requests for a command that would succeed, broken in the envelope instead."""
    lines = []
    for version in ("missing", 0, 2, "1", None, 1.5, 10 ** 30, [], {}):
        body = {"id": rng.randrange(1 << 30), "cmd": "version", "args": {}}
        if version != "missing":
            body["v"] = version
        lines.append(json.dumps(body).encode())
    for args in ([], "x", 5, None, True, 1.5):
        lines.append(request_line("version", args, rng.randrange(1 << 30)))
    for cmd in (None, 5, [], {}, True, "", "VERSION", "version ", "version\u0000", "../version",
                "cmd_version", "task", "task.", ".status", "content.generate.now", "task_status",
                "内容.生成", "\U0001F600", "x" * 5000):
        lines.append(request_line(cmd, {}, rng.randrange(1 << 30)))
    lines.append(b'{"v": 1, "id": 3, "cmd": "version"')  # missing the brace: not JSON
    lines += [b"[]", b"5", b'"version"', b"null", b"true", b"1e999", b"[1, 2]", b"{}",
              b'{"v": 1, "cmd": "version", "v": 2}', b'{"v": 1, "cmd": "version"} trailing',
              b'{"v": 1, "cmd": "version"}{"v": 1, "cmd": "version"}', b"{'v': 1}",
              b'{"v": 1, "id": ' + b"1" * 5000 + b', "cmd": "version"}', b"\xef\xbb\xbf{}",
              b'{"v": 1, "id": 1e308, "cmd": "nope"}', b'{"v": 1, "id": -0.0, "cmd": "nope"}',
              b'{"v": 1, "id": 123456789012345678901234567890, "cmd": "nope"}',
              b'{"v": 1, "id": {"a": [1, {"b": null}]}, "cmd": "nope"}', b"\x00", b"\x7f{",
              b'{"v": 1, "id": 9, "cmd": "version", "args": {"x": NaN}, "v": 0}']
    return lines


NOT_NEWLINE = [byte for byte in range(256) if byte != 0x0A]


def random_line(rng: random.Random) -> bytes:
    """Random bytes, invalid UTF-8 inside JSON, truncated JSON, or a nested wrong argument."""
    kind = rng.random()
    if kind < 0.45:
        while True:
            data = bytes(rng.choice(NOT_NEWLINE) for _ in range(rng.randint(1, 300)))
            if data.strip():
                return data
    if kind < 0.6:
        junk = bytes(rng.randint(0x80, 0xFF) for _ in range(rng.randint(1, 20)))
        return b'{"v": 1, "id": 4, "cmd": "task.status", "args": {"task_id": "' + junk + b'"}}'
    if kind < 0.8:
        cmd, args = rng.choice(argument_mutations())
        full = request_line(cmd, args, rng.randrange(1 << 30))
        return full[:rng.randint(1, len(full) - 1)]
    depth = rng.choice([rng.randint(10, 200), rng.randint(900, 1100), 100_000])
    nested = "[" * depth + "1" + "]" * depth if rng.random() < 0.5 else (
        '{"a": ' * depth + "1" + "}" * depth)
    cmd, (valid, spec) = rng.choice(list(COMMANDS.items()))
    # requirements and params legitimately take JSON of any shape
    name = rng.choice([n for n, (kind, _, _) in spec.items() if kind not in ("str|json", "dict")])
    args = {**valid, name: "NESTED"}
    return request_line(cmd, args, rng.randrange(1 << 30)).replace(b'"NESTED"', nested.encode())


def expected_ids(line: bytes) -> list:
    """The ids a reply to `line` may carry: the request's own, or None when it has none."""
    try:
        request = json.loads(line)
    except RecursionError:  # too deep for this stack; the daemon's may cope
        leading_id = re.match(rb'{"v": 1, "id": (\d+),', line)
        return [None] + ([int(leading_id.group(1))] if leading_id else [])
    except (ValueError, UnicodeDecodeError):
        return [None]
    if not isinstance(request, dict):
        return [None]
    # A request refused as a whole (a lone surrogate, nesting near the recursion limit) may be
    # answered before its id is read.
    if b"\\ud" in line.lower() or line.count(b"[") + line.count(b"{") > 500:
        return [request.get("id"), None]
    return [request.get("id")]


def pipeline(daemon, lines: list[bytes]) -> list[dict]:
    """Send every line on one connection while reading the replies."""
    with connect(daemon, timeout=30) as sock:
        payload = b"".join(line + b"\n" for line in lines)
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        replies = read_replies(sock, len(lines))
        sender.join()
        sock.shutdown(socket.SHUT_WR)
        replies += read_replies(sock)
    return replies


def assert_refused(reply: dict, line: bytes) -> None:
    assert reply["ok"] is False, (line[:200], reply)
    assert reply["error"]["code"] in KNOWN_ERRORS, (line[:200], reply)
    assert reply["error"]["message"], reply


def test_thousands_of_bad_messages_each_get_one_known_error_reply(daemon_factory):
    daemon = daemon_factory(creator=command_creator("instant_article.sh")).start()
    config_digest = hashlib.sha256(daemon.config_path.read_bytes()).hexdigest()
    rng = random.Random(1729)
    lines = [request_line(cmd, args, i) for i, (cmd, args) in enumerate(argument_mutations())]
    lines += envelope_mutations(rng)
    assert len(lines) > 500
    lines += [random_line(rng) for _ in range(3000 - len(lines))]
    rng.shuffle(lines)

    codes: dict[str, int] = {}
    for start in range(0, len(lines), 100):
        chunk = lines[start:start + 100]
        replies = pipeline(daemon, chunk)
        assert len(replies) == len(chunk), "every line gets exactly one reply"
        for line, reply in zip(chunk, replies):
            assert_refused(reply, line)
            assert reply["id"] in expected_ids(line), (line[:200], reply)
            codes[reply["error"]["code"]] = codes.get(reply["error"]["code"], 0) + 1
    assert {"invalid", "unknown_command", "not_found"} <= set(codes)

    assert daemon.call("version")["pid"] == daemon.proc.pid
    daemon.wait_status(daemon.submit("模糊测试之后"), "completed")
    assert daemon.call("scheduler.list") == []
    assert daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks") == 1
    assert hashlib.sha256(daemon.config_path.read_bytes()).hexdigest() == config_digest
    assert_log_clean(daemon)


def test_half_closed_and_slow_clients_get_one_reply_per_line(daemon_factory):
    daemon = daemon_factory().start()
    rng = random.Random(4242)
    mutations = argument_mutations()
    for _ in range(40):
        complete = [request_line(*rng.choice(mutations), i) for i in range(rng.randint(0, 3))]
        fragment = request_line("task.status", {"task_id": "task-nope"}, 99)
        fragment = fragment[:rng.randint(1, len(fragment) - 1)]
        with connect(daemon) as sock:
            sock.sendall(b"".join(line + b"\n" for line in complete) + fragment)
            sock.shutdown(socket.SHUT_WR)  # end of input mid-line
            replies = read_replies(sock)
        # The unfinished last line is answered too: it is not valid JSON.
        assert len(replies) == len(complete) + 1
        for line, reply in zip(complete + [fragment], replies):
            assert_refused(reply, line)

    def slow_writer(results: list) -> None:
        lines = [request_line("no.such.command", {}, 1),
                 request_line("task.list", {"limit": -1}, 2)]
        with connect(daemon, timeout=30) as sock:
            for byte in b"".join(line + b"\n" for line in lines):
                sock.send(bytes([byte]))
                time.sleep(0.001)  # a client this slow is the workload
            results.extend(read_replies(sock, 2))

    results: list[list] = [[] for _ in range(4)]
    writers = [threading.Thread(target=slow_writer, args=(r,)) for r in results]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    for replies in results:
        assert [(r["id"], r["error"]["code"]) for r in replies] == [
            (1, "unknown_command"), (2, "invalid")]
    # A client that vanishes mid-line leaves nothing behind.
    with connect(daemon) as sock:
        sock.sendall(b'{"v": 1, "id": 1, "cmd": "vers')
    assert daemon.call("version")["pid"] == daemon.proc.pid
    assert_log_clean(daemon)


# -- classes of input that used to reach `internal`, one test each --------------------------


def assert_not_internal(daemon, line: bytes) -> None:
    replies = exchange(daemon, line)
    assert len(replies) == 1, f"{line[:80]!r} got {len(replies)} replies"
    assert replies[0]["ok"] or replies[0]["error"]["code"] in KNOWN_ERRORS, (line[:80], replies)


def test_deeply_nested_json_is_invalid_not_internal(daemon_factory):
    daemon = daemon_factory().start()
    assert_not_internal(daemon, b"[" * 100_000 + b"]" * 100_000)
    assert_not_internal(daemon, request_line("task.list", {"limit": 1})[:-2]
                        + b', "x": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_002)
    assert_log_clean(daemon)


def test_integers_beyond_64_bits_are_refused_not_internal(daemon_factory):
    daemon = daemon_factory().start()
    huge = 2 ** 70
    for cmd, args in [("content.show", {"id": huge}), ("content.show", {"id": "9" * 30}),
                      ("content.list", {"account_id": huge}), ("task.list", {"account_id": huge}),
                      ("monitor.recent", {"limit": huge}), ("scheduler.history", {"limit": huge}),
                      ("content.approve", {"ids": [huge]}),
                      ("content.generate", {"account_id": huge, "topic": "x"}),
                      ("task.cleanup", {"days": huge})]:
        assert_not_internal(daemon, request_line(cmd, args))
    assert_log_clean(daemon)


def test_out_of_range_dates_are_refused_not_internal(daemon_factory):
    daemon = daemon_factory().start()
    for cmd, args in [("task.cleanup", {"days": 1_000_000, "dry_run": True}),
                      ("content.list", {"since": "9999-12-31T23:59:59-05:00"}),
                      ("content.export", {"since": "0001-01-01T00:00:00+05:00"})]:
        assert_not_internal(daemon, request_line(cmd, args))
    assert_log_clean(daemon)


def test_lone_surrogates_get_an_error_reply(daemon_factory):
    daemon = daemon_factory().start()
    assert_not_internal(daemon, request_line("content.generate", {"account_id": 49,
                                                                  "topic": "x\udcff"}))
    assert_not_internal(daemon, request_line("no.such.command", {}, "\udcff"))
    assert_log_clean(daemon)


def test_bulk_import_with_an_oversized_field_is_invalid(daemon_factory):
    daemon = daemon_factory().start()
    text = "account_id,topic\n49," + "长" * 140_000 + "\n"
    assert_not_internal(daemon, request_line("bulk_import", {"csv": text}))
    assert daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks") == 0
    assert_log_clean(daemon)


def strict_json(text: bytes):
    """RFC 8259 JSON only: NaN and Infinity are Python extensions other clients reject."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_replies_are_strict_json_even_for_non_finite_ids(daemon_factory):
    daemon = daemon_factory().start()
    for line in (b'{"v": 1, "id": 1e999, "cmd": "nope"}', b'{"v": 1, "id": NaN, "cmd": "version"}',
                 b'{"v": 1, "id": -Infinity, "cmd": "version"}'):
        with connect(daemon) as sock:
            sock.sendall(line + b"\n")
            sock.shutdown(socket.SHUT_WR)
            reply = strict_json(sock.makefile("rb").read())
        assert reply["v"] == 1  # refused as invalid or answered with a finite id: either is JSON


def test_bulk_import_refuses_a_header_that_repeats_a_column(daemon_factory):
    daemon = daemon_factory().start()
    reply = daemon.request("bulk_import", {"csv": "account_id,topic,account_id\n49,x,50\n"})
    assert reply["ok"] is False and reply["error"]["code"] == "invalid"
    assert reply["error"]["data"]["errors"][0]["line"] == 1
    assert daemon.scalar("SELECT COUNT(*) FROM content_generation_tasks") == 0


# -- input safety ---------------------------------------------------------------------------

DANGEROUS = ["$(touch {marker}-dollar)", "`touch {marker}-backtick`", "a; touch {marker}-semi",
             "it's \"quoted\" 'twice'", "line one\nline two; touch {marker}-newline",
             "-rf --help", "{{keywords}} {{task_id}} ${{HOME}} | touch {marker}-pipe && exit 3"]


def test_shell_metacharacters_reach_the_creator_as_literal_argv(daemon_factory, tmp_path):
    marker = tmp_path / "pwned"
    creator = f"""
[creator]
kind = "command"
command = ["{CREATORS / 'dump_argv.py'}", "--topic", "{{topic}}", "--keywords", "{{keywords}}",
           "--requirements", "{{requirements}}", "--tone", "{{tone}}", "{{topic}}"]
output = "json"
"""
    daemon = daemon_factory(creator=creator).start()
    submitted = {}
    for i, template in enumerate(DANGEROUS):
        value = template.format(marker=marker)
        fields = {"keywords": DANGEROUS[(i + 1) % len(DANGEROUS)].format(marker=marker),
                  "requirements": DANGEROUS[(i + 2) % len(DANGEROUS)].format(marker=marker),
                  "tone": "-" + value}
        submitted[daemon.submit(value, **fields)] = {"topic": value, **fields}
    [csv_task] = daemon.call("bulk_import", {"csv": "account_id,topic,tone\n49,\"$(touch "
                                             f"{marker}-csv)\"\"; `id`\",-n\n"})["task_ids"]
    submitted[csv_task] = {"topic": f"$(touch {marker}-csv)\"; `id`", "keywords": "",
                           "requirements": "", "tone": "-n"}
    for task_id, fields in submitted.items():
        daemon.wait_status(task_id, "completed")
        record = json.loads((tmp_path / f"argv-{task_id}.json").read_text(encoding="utf-8"))
        expected = ["--topic", fields["topic"]]
        for flag in ("keywords", "requirements", "tone"):
            if fields[flag]:
                expected += [f"--{flag}", fields[flag]]
        assert record["argv"] == expected + [fields["topic"]]
        assert {k: record["stdin"][k] for k in fields} == fields
    assert not list(tmp_path.glob("pwned*")), "a task field was executed by a shell"
