"""systemd integration: the sd_notify protocol as systemd sees it, and the unit file.

The notify tests bind a real AF_UNIX datagram socket, hand it to the real daemon as
NOTIFY_SOCKET and read what arrives, the way systemd does.
"""

from __future__ import annotations

import contextlib
import json
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest import CREATORS, DAEMON, ROOT, command_creator, kill_leftover_creators, wait_until

from contenthubd import DaemonConfig, parse_duration, watchdog_interval

UNIT = ROOT / "systemd" / "contenthubd.service"
SYSUSERS = ROOT / "systemd" / "contenthubd.sysusers.conf"
STATUS_RE = re.compile(r"\d+ running, \d+ pending")
#: Variables that belong to systemd's relationship with the daemon, never to its children.
SUPERVISOR_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class NotifyListener:
    """systemd's end of sd_notify: a bound datagram socket drained by a thread that records
    each message (parsed KEY=VALUE fields) with the CLOCK_MONOTONIC time it arrived."""

    def __init__(self, address: str):
        self.address = address
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            with self._changed:
                self.messages.append((time.monotonic(), fields))
                self._changed.notify_all()

    def wait_for(self, key: str, value: str | None = None, after: int = -1,
                 daemon=None, timeout: float = 15) -> int:
        """Index of the first message after index `after` carrying `key` (= `value`)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(after + 1, len(self.messages)):
                    fields = self.messages[index][1]
                    if key in fields and (value is None or fields[key] == value):
                        return index
                if daemon is not None and daemon.proc.poll() is not None:
                    pytest.fail(f"daemon exited {daemon.proc.returncode} before {key}:\n"
                                f"{daemon.log()[-4000:]}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"no {key}={value or '*'} after message {after} within "
                                f"{timeout}s; got {[m for _, m in self.messages]}")
                self._changed.wait(min(remaining, 0.2))

    def snapshot(self) -> list[tuple[float, dict[str, str]]]:
        with self._changed:
            return list(self.messages)

    def times_of(self, key: str, value: str) -> list[float]:
        return [at for at, fields in self.snapshot() if fields.get(key) == value]

    def fields(self, index: int) -> dict[str, str]:
        return self.snapshot()[index][1]

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self._sock.close()


@pytest.fixture
def notify(tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


def start_notified(daemon_factory, listener: NotifyListener, watchdog_usec: int | None = None,
                   env: dict[str, str] | None = None, **kwargs):
    """The daemon as systemd starts it: NOTIFY_SOCKET (and WATCHDOG_USEC) set, WATCHDOG_PID
    unset; returns it with the index of its READY=1 message."""
    supervisor = {"NOTIFY_SOCKET": listener.address}
    if watchdog_usec is not None:
        supervisor["WATCHDOG_USEC"] = str(watchdog_usec)
    daemon = daemon_factory(env={**supervisor, **(env or {})}, **kwargs)
    if "WATCHDOG_PID" not in (env or {}):
        daemon.env.pop("WATCHDOG_PID", None)
    daemon.start(wait=False)
    return daemon, listener.wait_for("READY", "1", daemon=daemon)


# sd_notify ###################################################################################


def test_ready_is_sent_once_the_control_socket_answers(daemon_factory, notify):
    daemon, ready = start_notified(daemon_factory, notify)
    # No retry: at the moment systemd hears READY=1, contenthubctl must already work.
    reply = daemon.request("version")
    assert reply["ok"] and reply["result"]["pid"] == daemon.proc.pid
    assert STATUS_RE.fullmatch(notify.fields(ready)["STATUS"])
    assert daemon.stop() == 0


def test_a_firing_interrupted_by_a_crash_resumes_after_ready(daemon_factory, notify, tmp_path):
    """A publish run that a kill -9 cut short is finished by the next start, after READY=1:
    a long run never holds start-up (and the watchdog) hostage."""
    publish = f"""
[publish]
command = ["{CREATORS / 'publisher.py'}", "--id", "{{content_id}}"]

[[schedules]]
name = "publisher"
executor = "publish"
cron = "0 9 * * *"
"""
    daemon, _ready = start_notified(daemon_factory, notify, extra=publish,
                                    creator=command_creator("json_article.py"),
                                    env={"PUBLISH_SLEEP": "60"})
    daemon.wait_status(daemon.submit("发布中断", auto_approve=True), "completed")
    def trigger_publisher() -> None:
        with contextlib.suppress(OSError, ValueError):  # the kill -9 cuts the reply
            daemon.request("scheduler.trigger", {"name": "publisher"})

    trigger = threading.Thread(target=trigger_publisher, daemon=True)
    trigger.start()
    wait_until(lambda: list(tmp_path.glob("publishing.*")), 20, message="the publisher")
    daemon.kill9()
    kill_leftover_creators(tmp_path)
    for marker in tmp_path.glob("publishing.*"):
        marker.unlink()

    daemon.env["PUBLISH_SLEEP"] = "3"
    seen = len(notify.snapshot())
    daemon.start(wait=False)
    ready = notify.wait_for("READY", "1", after=seen - 1, daemon=daemon)
    assert not (tmp_path / "published.jsonl").exists(), "READY=1 came after the resumed run"
    assert daemon.request("version")["ok"]
    wait_until(lambda: (tmp_path / "published.jsonl").exists(), 30, message="the resumed run")
    assert '"schedule_run_resumed"' in daemon.log() and ready > seen - 1
    assert daemon.stop() == 0


def test_status_reports_running_and_pending_counts(daemon_factory, notify):
    daemon, ready = start_notified(daemon_factory, notify,
                                   creator=command_creator("json_article.py"))
    daemon.wait_status(daemon.submit("状态行"), "completed")
    update = notify.wait_for("STATUS", "0 running, 0 pending", after=ready, daemon=daemon)
    statuses = [fields["STATUS"] for _, fields in notify.snapshot()[:update + 1]
                if "STATUS" in fields]
    assert all(STATUS_RE.fullmatch(status) for status in statuses), statuses


def test_watchdog_pings_at_half_of_watchdog_usec(daemon_factory, notify):
    assert watchdog_interval({"WATCHDOG_USEC": "400000"}) == 0.2
    daemon, ready = start_notified(daemon_factory, notify, watchdog_usec=400_000)
    index = ready
    for _ in range(5):
        index = notify.wait_for("WATCHDOG", "1", after=index, daemon=daemon)
    pings = [at for at, fields in notify.snapshot()[ready:index + 1] if "WATCHDOG" in fields]
    # Every 0.2 s: 4 gaps take 0.8 s, longer on a loaded machine. Under 0.4 s would mean the
    # daemon ignores the interval.
    assert pings[-1] - pings[0] >= 0.4, pings
    assert daemon.request("version")["ok"]


def test_watchdog_meant_for_another_pid_is_ignored(daemon_factory, notify):
    daemon, ready = start_notified(daemon_factory, notify, watchdog_usec=400_000,
                                   env={"WATCHDOG_PID": "1", "CREATOR_SLEEP": "1"},
                                   creator=command_creator("instant_article.sh"))
    daemon.wait_status(daemon.submit("别人的看门狗"), "completed")
    # The STATUS update after a task of 1 s: five watchdog intervals have passed since
    # READY=1, and a ping sent meanwhile would have arrived before it.
    notify.wait_for("STATUS", "0 running, 0 pending", after=ready, daemon=daemon)
    assert notify.times_of("WATCHDOG", "1") == []


def test_watchdog_keeps_its_interval_while_tasks_finish(daemon_factory, notify):
    daemon, ready = start_notified(daemon_factory, notify, watchdog_usec=1_000_000,
                                   creator=command_creator("json_article.py"))
    task_ids = [daemon.submit(f"看门狗 {i}") for i in range(3)]
    for task_id in task_ids:
        daemon.wait_status(task_id, "completed")
    index = len(notify.snapshot()) - 1
    for _ in range(2):
        index = notify.wait_for("WATCHDOG", "1", after=index, daemon=daemon)
    # systemd's watchdog timer starts at READY=1 and fires when WATCHDOG_USEC (1 s) passes
    # without a ping; the daemon pings every 0.5 s.
    messages = notify.snapshot()[:index + 1]
    pings = [messages[ready][0], *(at for at, fields in messages if "WATCHDOG" in fields)]
    gaps = [round(later - earlier, 3) for earlier, later in zip(pings, pings[1:])]
    assert max(gaps) < 1.0, gaps


def test_sighup_sends_reloading_with_monotonic_usec_then_ready(daemon_factory, notify):
    daemon, ready = start_notified(daemon_factory, notify)
    before_us = time.monotonic_ns() // 1000
    daemon.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", after=ready, daemon=daemon)
    ready_again = notify.wait_for("READY", "1", after=reloading, daemon=daemon)
    after_us = time.monotonic_ns() // 1000
    fields = notify.fields(reloading)
    # CLOCK_MONOTONIC is shared by every process: systemd compares it with its own.
    assert re.fullmatch(r"\d+", fields["MONOTONIC_USEC"])
    assert before_us <= int(fields["MONOTONIC_USEC"]) <= after_us
    assert "READY" not in fields
    assert STATUS_RE.fullmatch(notify.fields(ready_again)["STATUS"])
    assert daemon.request("version")["ok"]
    assert daemon.stop() == 0


def test_ctl_reload_notifies_like_sighup(daemon_factory, notify):
    daemon, ready = start_notified(daemon_factory, notify)
    assert daemon.call("reload")["reloaded"]
    reloading = notify.wait_for("RELOADING", "1", after=ready, daemon=daemon)
    assert re.fullmatch(r"\d+", notify.fields(reloading)["MONOTONIC_USEC"])
    notify.wait_for("READY", "1", after=reloading, daemon=daemon)


def test_broken_config_on_sighup_keeps_old_config_and_reports_failure(daemon_factory, notify):
    daemon, ready = start_notified(daemon_factory, notify, workers=4)
    good = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(good.replace("max_concurrent_tasks = 4",
                                               'max_concurrent_tasks = "many"'), encoding="utf-8")
    daemon.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", after=ready, daemon=daemon)
    ready_again = notify.wait_for("READY", "1", after=reloading, daemon=daemon)
    status = notify.fields(ready_again)["STATUS"]
    assert "reload failed" in status and "max_concurrent_tasks" in status, status

    effective = {row["key"]: row["value"] for row in daemon.call("config")}
    assert effective["daemon.max_concurrent_tasks"] == 4
    checks = {check["name"]: check for check in daemon.call("monitor.health")["checks"]}
    assert not checks["config"]["ok"] and "max_concurrent_tasks" in checks["config"]["detail"]

    daemon.config_path.write_text(good.replace("max_concurrent_tasks = 4",
                                               "max_concurrent_tasks = 2"), encoding="utf-8")
    daemon.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", after=ready_again, daemon=daemon)
    fixed = notify.wait_for("READY", "1", after=reloading, daemon=daemon)
    assert STATUS_RE.fullmatch(notify.fields(fixed)["STATUS"])
    effective = {row["key"]: row["value"] for row in daemon.call("config")}
    assert effective["daemon.max_concurrent_tasks"] == 2
    checks = {check["name"]: check for check in daemon.call("monitor.health")["checks"]}
    assert checks["config"]["ok"]
    assert daemon.stop() == 0


def test_sigterm_sends_stopping_and_exits_zero(daemon_factory, notify):
    daemon, ready = start_notified(daemon_factory, notify)
    daemon.signal(signal.SIGTERM)
    stopping = notify.wait_for("STOPPING", "1", after=ready)
    assert daemon.proc.wait(15) == 0
    assert all("READY" not in fields for _, fields in notify.snapshot()[stopping:])


def test_abstract_namespace_notify_socket(daemon_factory):
    listener = NotifyListener(f"@contenthubd-test-{uuid.uuid4().hex}")
    try:
        daemon, ready = start_notified(daemon_factory, listener)
        assert STATUS_RE.fullmatch(listener.fields(ready)["STATUS"])
        daemon.signal(signal.SIGTERM)
        listener.wait_for("STOPPING", "1", after=ready)
        assert daemon.proc.wait(15) == 0
    finally:
        listener.close()


def test_unreachable_notify_socket_does_not_stop_the_daemon(daemon_factory, tmp_path):
    daemon = daemon_factory(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock"),
                                 "WATCHDOG_USEC": "400000"})
    daemon.env.pop("WATCHDOG_PID", None)
    daemon.start()

    def failed_notifications() -> int:
        return daemon.log().count('"sd_notify_failed"')

    # READY=1 and watchdog pings went nowhere, and the daemon went on pinging.
    wait_until(lambda: failed_notifications() >= 4, message="failed notifications")
    failed = failed_notifications()
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: '"config_reloaded"' in daemon.log() and failed_notifications() >= failed + 2,
               message="a reload whose RELOADING=1 and READY=1 went nowhere")
    assert daemon.request("version")["ok"]
    assert daemon.stop() == 0


def test_creators_do_not_inherit_notify_socket_or_watchdog(daemon_factory, notify):
    daemon, _ = start_notified(
        daemon_factory, notify, watchdog_usec=400_000,
        env={"WATCHDOG_PID": "1", "CONTENTHUB_TEST_MARKER": "inherited"},
        creator=command_creator("env_dump.py"))
    task_id = daemon.submit("环境变量")
    daemon.wait_status(task_id, "completed")
    child_env = json.loads(daemon.call("content.show", {"id": task_id})["body"])
    assert [name for name in SUPERVISOR_ENV if name in child_env] == []
    assert child_env["CONTENTHUB_TEST_MARKER"] == "inherited"
    assert child_env["CONTENTHUB_TASK_ID"] == task_id


# Unit file ###################################################################################


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file (all sections), in order; comments skipped."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_keeps_the_settings_the_daemon_relies_on():
    unit = unit_settings(UNIT.read_text(encoding="utf-8"))
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillMode"] == ["mixed"]
    # systemd must not SIGKILL the daemon while it is still giving creators their grace.
    assert parse_duration(unit["TimeoutStopSec"][0]) > DaemonConfig().shutdown_grace
    assert unit["StateDirectory"] == ["contenthubd"] and unit["RuntimeDirectory"] == ["contenthubd"]
    assert parse_duration(unit["WatchdogSec"][0]) >= 2
    assert set(unit["RestrictAddressFamilies"][0].split()) >= {"AF_UNIX", "AF_INET", "AF_INET6"}
    # Node's JIT needs writable+executable memory.
    assert "MemoryDenyWriteExecute" not in unit
    assert unit["User"] == ["contenthub"]
    sysusers = SYSUSERS.read_text(encoding="utf-8").split("\n")
    assert any(line.split()[:2] == ["u", "contenthub"] for line in sysusers if line.strip())


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: package systemd)")
    # The installed path /usr/local/bin/contenthubd does not exist here: point ExecStart at the
    # daemon this test suite runs, so verify checks everything else.
    text = re.sub(r"(?m)^ExecStart=.*$",
                  f"ExecStart={sys.executable} {DAEMON} --config /etc/contenthubd/contenthubd.toml",
                  UNIT.read_text(encoding="utf-8"))
    unit = tmp_path / "contenthubd.service"
    unit.write_text(text, encoding="utf-8")
    command = [analyze, "verify", "--man=no"]
    help_text = subprocess.run([analyze, "--help"], capture_output=True, text=True).stdout
    if "--recursive-errors" in help_text:
        # Only our unit: problems in the host's own units (reached through WantedBy=/After=)
        # are not ours to fix.
        command.append("--recursive-errors=no")
    result = subprocess.run([*command, str(unit)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    try:
        pwd.getpwnam("contenthub")
    except KeyError:
        # The contenthub user comes from contenthubd.sysusers.conf at install time; some
        # systemd versions report that it does not exist on this machine.
        problems = [line for line in problems if not re.search(r"(?i)\buser\b.*contenthub",
                                                               line)]
    assert problems == [], "\n".join(problems)


def test_unit_hardening_exposure_stays_low(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: package systemd)")
    if "--offline" not in subprocess.run([analyze, "--help"], capture_output=True,
                                         text=True).stdout:
        pytest.skip("this systemd-analyze cannot rate a unit file offline (needs systemd 250+)")
    unit = tmp_path / "contenthubd.service"
    shutil.copy(UNIT, unit)
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    # 1.7 when written; a network service that runs Node cannot go much lower (it needs
    # AF_INET, W^X memory and chown). Above 3.0 means hardening was lost.
    assert float(match.group(1)) <= 3.0, result.stdout


def test_sysusers_snippet_creates_the_service_user(tmp_path):
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed (Debian/Ubuntu: package systemd)")
    (tmp_path / "etc").mkdir()
    result = subprocess.run([sysusers, f"--root={tmp_path}", str(SYSUSERS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":")
             for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":")
              for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    assert users["contenthub"][5] == "/var/lib/contenthubd"
    assert users["contenthub"][3] == groups["contenthub"][2]
    # The daemon can only give its socket a group it belongs to (it has no CAP_CHOWN).
    assert "contenthub" in groups["contenthub-ctl"][3].split(",")
