"""contenthubctl imports nothing from the daemon, so what it copies must be checked here."""

import re

import contenthubctl as ctl
import contenthubd as daemon


def test_versions_match():
    assert ctl.__version__ == daemon.__version__


def test_statuses_and_limits_match():
    assert ctl.TASK_STATUSES == daemon.ACTIVE_STATUSES + daemon.TERMINAL_STATUSES
    assert ctl.TOPIC_STATUSES == daemon.TOPIC_STATUSES
    assert ctl.MAX_REQUEST_BYTES == daemon.MAX_LINE_BYTES


def test_review_statuses_match_the_schema():
    schema = daemon.SCHEMA_PATH.read_text(encoding="utf-8")
    check = re.search(r"review_status IN \(([^)]*)\)", schema)
    assert check is not None
    assert tuple(re.findall(r"'([a-z_]+)'", check.group(1))) == ctl.REVIEW_STATUSES


def test_default_socket_names_match():
    assert ctl.EMBEDDED_DEFAULT_SOCKET.endswith(daemon.DaemonConfig().socket)
    assert f"/run/contenthubd/{daemon.DaemonConfig().socket}" == ctl.DEFAULT_SOCKET
