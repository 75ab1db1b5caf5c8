"""Test harness: the real daemon on a temp dir, a real socket, real creator subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CREATORS = Path(__file__).resolve().parent / "creators"
DAEMON = ROOT / "contenthubd.py"
CTL = ROOT / "contenthubctl.py"
ACCOUNTS = """
[[accounts]]
id = 49
name = "车界显眼包"
category = "技术"

[[accounts]]
id = 50
name = "产品观察室"
category = "产品"
"""
BASE_CONFIG = """
[daemon]
state_dir = "state"
timezone = "Asia/Shanghai"
max_concurrent_tasks = {workers}
task_timeout = "{task_timeout}"
retry_backoff = "{retry_backoff}"
retry_backoff_max = "1s"
max_retries = {max_retries}
shutdown_grace = "{shutdown_grace}"
log_format = "json"
log_level = "debug"
""" + ACCOUNTS


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, message: str = ""):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


async def wait_until_async(predicate, timeout: float = 30.0, interval: float = 0.02,
                           message: str = ""):
    """wait_until for a test that runs the App in its own loop: `predicate` is a coroutine
    function, awaited until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message or predicate}")
        await asyncio.sleep(interval)


class Daemon:
    """One contenthubd process on its own directory."""

    def __init__(self, directory: Path, creator: str = "", extra: str = "", workers: int = 4,
                 task_timeout: str = "60s", retry_backoff: str = "0.1s", max_retries: int = 3,
                 shutdown_grace: str = "5s", env: dict[str, str] | None = None):
        self.dir = directory
        self.config_path = directory / "contenthubd.toml"
        self.config_path.write_text(
            BASE_CONFIG.format(workers=workers, task_timeout=task_timeout,
                               retry_backoff=retry_backoff, max_retries=max_retries,
                               shutdown_grace=shutdown_grace)
            + textwrap.dedent(creator) + textwrap.dedent(extra), encoding="utf-8")
        self.state = directory / "state"
        self.socket = self.state / "contenthubd.sock"
        self.db_path = self.state / "contenthub.db"
        self.log_path = directory / "daemon.log"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("LLM_API_KEY", "NOTIFY_SOCKET", "STATE_DIRECTORY",
                                 "RUNTIME_DIRECTORY", "CONTENTHUB_SOCKET", "COLUMNS")}
        self.env.update(CREATOR_STATE_DIR=str(directory), **(env or {}))
        self.proc: subprocess.Popen | None = None
        self._next_id = 0

    def set_options(self, **options) -> None:
        """Add keys to the [daemon] table of the config before the daemon starts."""
        lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())
        text = self.config_path.read_text(encoding="utf-8")
        self.config_path.write_text(text.replace("[daemon]\n", "[daemon]\n" + lines, 1),
                                    encoding="utf-8")
        if "socket" in options:
            self.socket = Path(options["socket"])

    def start(self, wait: bool = True) -> Daemon:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(DAEMON), "--config",
                                      str(self.config_path)], cwd=self.dir, env=self.env,
                                     stdout=log, stderr=log)
        log.close()
        if wait:
            wait_until(self._ready, 30, message="daemon socket")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"daemon exited {self.proc.returncode}:\n{self.log()}")
        try:
            self.request("version")
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, cmd: str, args: dict | None = None, timeout: float = 30) -> dict:
        """One raw protocol round trip; returns the whole reply."""
        self._next_id += 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket))
            sock.sendall(json.dumps({"v": 1, "id": self._next_id, "cmd": cmd,
                                     "args": args or {}}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    def call(self, cmd: str, args: dict | None = None):
        reply = self.request(cmd, args)
        assert reply["ok"], reply
        return reply["result"]

    def ctl(self, *args: str, input: str | None = None, timeout: float = 60):
        return subprocess.run([sys.executable, str(CTL), "--socket", str(self.socket), *args],
                              capture_output=True, text=True, input=input, timeout=timeout,
                              env=self.env)

    def submit(self, topic: str = "AI 技术解析", account_id: int = 49, **args) -> str:
        return self.call("content.generate", {"account_id": account_id, "topic": topic,
                                              **args})["task_id"]

    def task(self, task_id: str) -> dict:
        return self.call("task.status", {"task_id": task_id})

    def wait_status(self, task_id: str, *statuses: str, timeout: float = 30) -> dict:
        return wait_until(lambda: (t := self.task(task_id))["status"] in statuses and t,
                          timeout, message=f"{task_id} to reach {statuses}")

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=30)

    def scalar(self, sql: str, params=()):
        with self.db() as conn:
            return conn.execute(sql, params).fetchone()[0]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"daemon did not stop within {timeout}s:\n{self.log()[-4000:]}")

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


def command_creator(script: str, output: str = "json", extra: str = "") -> str:
    """A [creator] block running one of tests/creators with the task's topic and tone as argv,
    each bound to its option in one element (`--topic=<topic>`), as docs/creators.md says."""
    return f"""
[creator]
kind = "command"
command = ["{CREATORS / script}", "--topic={{topic}}", "--tone={{tone}}"]
output = "{output}"
{extra}
"""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; one reaped while we look is gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.fixture
def daemon_factory(tmp_path):
    started: list[Daemon] = []

    def make(**kwargs) -> Daemon:
        daemon = Daemon(tmp_path, **kwargs)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
    kill_leftover_creators(tmp_path)


def kill_leftover_creators(directory: Path) -> None:
    """A test that ends with its daemon killed leaves creators behind; they all carry the
    harness's CREATOR_STATE_DIR in their environment."""
    marker = f"CREATOR_STATE_DIR={directory}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue
