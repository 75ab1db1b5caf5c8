"""A reload costs what changed: the file is cut into its [[schedules]] blocks, unchanged blocks
keep their parsed schedules, an unchanged file is not parsed at all, and the result is always
what parsing the whole file gives."""

from __future__ import annotations

import dataclasses
import random
import tomllib

import pytest
from conftest import ACCOUNTS

import contenthubd
from contenthubd import ConfigError, ScheduleConfig, split_schedule_blocks

REST = """# contenthubd
[daemon]
timezone = "Asia/Shanghai"

[creator]
kind = "command"
command = ["/bin/echo", "{topic}"]
"""


def block(name: str, body: str = 'cron = "0 8 * * *"\n') -> str:
    return (f'[[schedules]]\nname = "{name}"\nexecutor = "cleanup"\n{body}'
            "params = { days = 7 }\n\n")


def check_same_as_whole(text: str) -> bool:
    """split_schedule_blocks gives what tomllib gives for the whole text, or gives up (None),
    as it must when the whole text is not valid TOML. Returns whether it split."""
    try:
        whole = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        assert split_schedule_blocks(text, {}) is None
        return False
    split = split_schedule_blocks(text, {})
    if split is None:
        return False
    rest, schedules, blocks = split
    assert rest == {key: value for key, value in whole.items() if key != "schedules"}
    assert [dataclasses.asdict(s) for s in schedules] == [
        dataclasses.asdict(ScheduleConfig(**entry)) for entry in whole.get("schedules", [])]
    assert sum(map(len, blocks.schedules)) + len(blocks.rest) == len(text)
    again = split_schedule_blocks(text, dict(zip(blocks.schedules, schedules)))
    assert again is not None and all(a is b for a, b in zip(again[1], schedules))
    return True


TRICKY = {
    "plain": (REST + ACCOUNTS + block("a") + block("b"), True),
    "sub-tables": (REST + '[[schedules]]\nname = "a"\nexecutor = "cleanup"\ncron = "0 8 * * *"\n'
                   "[schedules.params]\ndays = 3\n[[schedules.params.statuses]]\nx = 1\n"
                   + block("b"), True),
    "comments, spaces and a header comment": (
        REST + "  [[ schedules ]]   # the first\n" + 'name = "a"\nexecutor = "cleanup"\n'
        'cron = "0 8 * * *"\n# a comment above the next one\n\n' + block("b"), True),
    "CRLF": ((REST + block("a") + block("b")).replace("\n", "\r\n"), True),
    "rest after and between blocks": (REST + block("a") + ACCOUNTS + block("b")
                                      + "[media]\nenabled = false\n", True),
    "no trailing newline": (REST + block("a").rstrip("\n"), True),
    "schedules only": (block("a") + block("b"), True),
    "empty": ("", True),
    "header inside a multi-line string": (
        REST + '[[schedules]]\nname = "a"\nexecutor = "cleanup"\ncron = "0 8 * * *"\n'
        'description = """\n[[schedules]]\nname = "ghost"\n[daemon]\n"""\n' + block("b"), False),
    "header inside a literal multi-line string in the rest": (
        "[daemon]\nstate_dir = '''\n[[schedules]]\nname = \"ghost\"\n'''\n" + block("a"), False),
    # The rest between two blocks is parsed as one text: a cut inside it does no harm.
    "a line of a multi-line array in the rest that starts with [": (
        "[budget]\nx = [\n[1, 2],\n[3],\n]\n" + block("a"), True),
    "a line of a multi-line array in a block that starts with [": (
        '[[schedules]]\nname = "a"\nparams.x = [\n[1, 2],\n]\n' + block("b"), False),
    "schedules as an inline array": ('schedules = [{ name = "a" }]\n' + REST, False),
    "schedules as a key of a table": (REST + 'schedules = [{ name = "a" }]\n', True),
    "quoted schedules header": (REST + '[["schedules"]]\nname = "a"\n', False),
    "sub-table before any block": (REST + "[schedules.params]\ndays = 1\n" + block("a"), False),
    "sub-table after the rest": (REST + block("a") + "[media]\nenabled = true\n"
                                 "[schedules.params]\nkeep = 1\n", False),
    "a table defined in two stretches": (
        "[daemon]\ntimezone = \"UTC\"\n" + block("a") + "[daemon]\nmax_batch = 3\n", False),
    "syntax error in one block": (REST + block("a") + "[[schedules]]\nname = \n", False),
    "syntax error in the rest": ("[daemon\n" + block("a"), False),
}


@pytest.mark.parametrize("label", sorted(TRICKY))
def test_split_parse_is_the_whole_parse_on_tricky_files(label):
    text, splits = TRICKY[label]
    assert check_same_as_whole(text) is splits


def test_split_parse_is_the_whole_parse_on_random_files():
    """Random files from pieces that cut well and pieces that only look like headers."""
    rng = random.Random(21)
    pieces = [
        lambda i: block(f"s{i}"),
        lambda i: block(f"s{i}", 'every = "2h"\n# note\n'),
        lambda i: f'[[schedules]]\nname = "s{i}"\n[schedules.params]\ndays = {i}\n',
        lambda i: f'[[accounts]]\nid = {i}\nname = "a{i}"\n',
        lambda i: f'[[schedules]]\nname = "s{i}"\ndescription = """\n[[schedules]]\n"""\n',
        lambda i: f"[media]\nmax_attempts = {i}\n",
        lambda i: f"[schedules.params]\nx = {i}\n",
        lambda i: f'description = """\n[x{i}]\n"""\n',
        lambda i: "\n# comment\n\n",
        lambda i: f"[[schedules.params.topics]]\ntopic = 't{i}'\n",
        lambda i: '[[schedules]]\nname = "dup"\nname = "dup"\n',
    ]
    splits = 0
    for _ in range(400):
        text = "".join(rng.choice(pieces)(i) for i in range(rng.randint(0, 8)))
        if rng.random() < 0.2:
            text = text.replace("\n", "\r\n")
        splits += check_same_as_whole(text)
    assert splits > 40  # the cut was taken often enough to mean something


def config_text(**edits: str) -> str:
    blocks = {f"s{i}": block(f"s{i}", f'cron = "{i} 8 * * *"\n') for i in range(20)}
    blocks.update(edits)
    return REST + "".join(blocks.values())


def test_a_parse_reuses_the_unchanged_schedules_of_the_one_before():
    first = contenthubd.parse_config(config_text(), "c.toml", {}, contenthubd.check_schedules)
    assert first.blocks is not None and len(first.blocks.schedules) == 20
    edited = block("s3", 'cron = "3 9 * * *"\n')
    second = contenthubd.parse_config(config_text(s3=edited), "c.toml", {},
                                      contenthubd.check_schedules, previous=first)
    reused = [new is old for new, old in zip(second.schedules, first.schedules)]
    assert reused == [i != 3 for i in range(20)]
    assert second.schedules[3].cron == "3 9 * * *"
    assert second.schedules == contenthubd.parse_config(config_text(s3=edited), "c.toml",
                                                        {}).schedules


def test_an_error_reads_the_same_whether_or_not_a_parse_came_before():
    first = contenthubd.parse_config(config_text(), "c.toml", {}, contenthubd.check_schedules)
    bad = config_text(s5=block("s5", 'cron = "61 8 * * *"\nmisfire = "later"\n'),
                      s9=block("s9", 'cron = "9 8 * * *"\ntags = 1\n'))
    with pytest.raises(ConfigError) as alone:
        contenthubd.parse_config(bad, "c.toml", {}, contenthubd.check_schedules)
    with pytest.raises(ConfigError) as after:
        contenthubd.parse_config(bad, "c.toml", {}, contenthubd.check_schedules, first)
    assert after.value.errors == alone.value.errors
    assert [e.split(":")[0] for e in alone.value.errors] == [
        "schedules[5].misfire (line 42)", "schedules[9].tags (line 67)",
        "schedules[5].cron (line 41) 's5'"]


def test_an_unchanged_schedule_is_checked_again_when_the_rest_changes():
    """Params are checked against [[accounts]]: an account that goes away fails the
    schedules that name it, unchanged as they are."""
    schedule = ('[[schedules]]\nname = "x"\nexecutor = "async_content_generation"\n'
                'cron = "0 8 * * *"\nparams = { account_ids = [50] }\n')
    first = contenthubd.parse_config(REST + ACCOUNTS + schedule, "c.toml", {},
                                     contenthubd.check_schedules)
    without = ACCOUNTS.split("[[accounts]]\nid = 50")[0]
    with pytest.raises(ConfigError, match="account 50 is not in"):
        contenthubd.parse_config(REST + without + schedule, "c.toml", {},
                                 lambda c: contenthubd.check_schedules(c, None, first), first)


def test_reload_of_the_unchanged_file_changes_nothing_and_clears_a_rejected_reload(
        daemon_factory):
    many = "".join(block(f"s{i}", f'every = "{i + 1}h"\n') for i in range(30))
    daemon = daemon_factory(extra=many).start()
    daemon.call("scheduler.pause", {"name": "s4"})
    before = {s["name"]: s for s in daemon.call("scheduler.list")}
    good = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(good + "[[schedules]]\nname = \n", encoding="utf-8")
    assert daemon.request("reload")["ok"] is False
    assert daemon.call("monitor.health")["status"] == "degraded"
    daemon.config_path.write_text(good, encoding="utf-8")
    changes = daemon.call("reload")["changes"]
    assert (changes["schedules_added"], changes["schedules_removed"],
            changes["schedules_changed"], changes["creator_changed"]) == ([], [], [], False)
    assert '"file_unchanged": true' in daemon.log()
    assert daemon.call("monitor.health")["status"] == "ok"
    assert {s["name"]: s for s in daemon.call("scheduler.list")} == before


def test_reload_replans_only_the_schedules_whose_timing_changed(daemon_factory):
    many = "".join(block(f"s{i}", f'every = "{i + 1}h"\n') for i in range(30))
    daemon = daemon_factory(extra=many).start()
    daemon.call("scheduler.pause", {"name": "s7"})
    before = {s["name"]: s for s in daemon.call("scheduler.list")}
    text = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(
        text.replace('"s2"\nexecutor = "cleanup"\nevery = "3h"',
                     '"s2"\nexecutor = "cleanup"\nevery = "10800s"')  # the same timing
        .replace('"s5"\nexecutor = "cleanup"\nevery = "6h"', '"s5"\nexecutor = "cleanup"\n'
                 'every = "6h"\ndescription = "edited"')
        .replace('"s7"\nexecutor = "cleanup"\nevery = "8h"', '"s7"\nexecutor = "cleanup"\n'
                 'every = "9h"')
        .replace('"s9"\nexecutor = "cleanup"\nevery = "10h"', '"s9"\nexecutor = "cleanup"\n'
                 'every = "11h"'), encoding="utf-8")
    changes = daemon.call("reload")["changes"]
    assert changes["schedules_changed"] == ["s2", "s5", "s7", "s9"]
    after = {s["name"]: s for s in daemon.call("scheduler.list")}
    assert after["s7"]["paused"] is True and after["s7"]["next_fire_at"] is None
    assert after["s9"]["next_fire_at"] > before["s9"]["next_fire_at"]
    assert [after[n]["next_fire_at"] for n in after if n not in ("s7", "s9")] == [
        before[n]["next_fire_at"] for n in before if n not in ("s7", "s9")]
    assert {n: after[n] for n in after if n not in ("s2", "s7", "s9")} == {
        n: before[n] for n in before if n not in ("s2", "s7", "s9")}
    daemon.call("scheduler.resume", {"name": "s7"})
    assert daemon.call("scheduler.show", {"name": "s7"})["next_fire_at"]


def test_the_change_list_names_renamed_moved_and_edited_schedules():
    first = contenthubd.parse_config(config_text(), "c.toml", {}, contenthubd.check_schedules)

    def changes(text: str) -> tuple[list[str], list[str], list[str]]:
        new = contenthubd.parse_config(text, "c.toml", {}, None, first)
        found = contenthubd.App._reload_changes(first, new)
        return found["schedules_added"], found["schedules_removed"], found["schedules_changed"]

    assert changes(config_text()) == ([], [], [])
    assert changes(config_text(s4=block("s4", 'cron = "4 9 * * *"\n'))) == ([], [], ["s4"])
    assert changes(config_text(s4=block("renamed", 'cron = "4 8 * * *"\n'))) == (
        ["renamed"], ["s4"], [])
    moved = config_text().replace(block("s1", 'cron = "1 8 * * *"\n'), "") + block(
        "s1", 'cron = "1 8 * * *"\n')
    assert changes(moved) == ([], [], [])
    assert changes(moved + block("s20")) == (["s20"], [], [])
