"""Schedule timing: cron meaning, DST, interval anchoring, missed instants, misfire plans."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

import contenthubd
from contenthubd import (
    MisfirePlan,
    missed_instants,
    next_instants,
    parse_duration,
    parse_trigger,
    plan_misfires,
)

UTC = UTC


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local(tz: str, *args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(tz), fold=fold)


def firings_on(cron: str, tz: str, day: date) -> list[str]:
    """Local wall times (with UTC offset) at which `cron` fires during the local `day`."""
    zone = ZoneInfo(tz)
    start = datetime.combine(day, datetime.min.time(), zone).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), zone).astimezone(UTC)
    trigger = parse_trigger(cron, None, tz)
    result = []
    for instant in trigger.iter_after(start - timedelta(microseconds=1)):
        if instant >= end:
            return result
        result.append(instant.astimezone(zone).strftime("%H:%M%z"))


# Durations ###################################################################


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("1.5h", 5400),
        (" 45 ", 45),
        ("2.5", 2.5),
        (90, 90),
        (0.25, 0.25),
        (0, 0),
    ],
)
def test_parse_duration_accepts_units_and_bare_seconds(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["", "2x", "h", "1.h", "-5", -5, "2 hours", "1w", "1H", True, None, float("inf"), "nan"]
)
def test_parse_duration_rejects_anything_else_with_the_accepted_forms(value):
    with pytest.raises(ValueError, match=r"invalid duration .*90s, 30m, 2h, 1d"):
        parse_duration(value)


# Cron meaning ################################################################


@pytest.mark.parametrize(
    ("cron", "expected"),
    [
        ("*/20 * * * *", ["01-01 00:20", "01-01 00:40", "01-01 01:00"]),
        ("5,35 * * * *", ["01-01 00:05", "01-01 00:35", "01-01 01:05"]),
        ("0 9-11 * * *", ["01-01 09:00", "01-01 10:00", "01-01 11:00", "01-02 09:00"]),
        ("1-10/3 0 * * *", ["01-01 00:01", "01-01 00:04", "01-01 00:07", "01-01 00:10", "01-02 00:01"]),
        ("0 0 * * sun", ["01-04 00:00", "01-11 00:00"]),
        ("0 0 * * 0", ["01-04 00:00", "01-11 00:00"]),
        ("0 0 * * 7", ["01-04 00:00", "01-11 00:00"]),
        ("0 0 * * 5-7", ["01-02 00:00", "01-03 00:00", "01-04 00:00", "01-09 00:00"]),
        ("0 0 * * Mon,FRI", ["01-02 00:00", "01-05 00:00", "01-09 00:00", "01-12 00:00"]),
        ("0 0 1 JAN,jul *", ["07-01 00:00", "01-01 00:00"]),
        ("0 9 * jan,jul mon", ["01-05 09:00", "01-12 09:00", "01-19 09:00", "01-26 09:00"]),
        # Both day fields restricted: the 13th OR any Friday.
        ("0 0 13 * 5", ["01-02 00:00", "01-09 00:00", "01-13 00:00", "01-16 00:00", "01-23 00:00"]),
        # A day field starting with '*' restricts nothing on its own: both must match.
        ("0 0 */10 * 1", ["05-11 00:00", "06-01 00:00", "08-31 00:00", "09-21 00:00"]),
        ("@hourly", ["01-01 01:00", "01-01 02:00"]),
        ("@daily", ["01-02 00:00", "01-03 00:00"]),
        ("@midnight", ["01-02 00:00", "01-03 00:00"]),
        ("@weekly", ["01-04 00:00", "01-11 00:00"]),
        ("@monthly", ["02-01 00:00", "03-01 00:00"]),
        ("@yearly", ["01-01 00:00", "01-01 00:00"]),
        ("@Annually", ["01-01 00:00", "01-01 00:00"]),
    ],
)
def test_cron_fields_have_crontab5_meaning(cron, expected):
    """Firings after 2026-01-01 00:00 UTC (a Thursday), shown as month-day hour:minute."""
    trigger = parse_trigger(cron, None, "UTC")
    instants = next_instants(trigger, utc(2026, 1, 1), len(expected))
    assert [instant.strftime("%m-%d %H:%M") for instant in instants] == expected


def test_yearly_fires_once_a_year():
    instants = next_instants(parse_trigger("@yearly", None, "UTC"), utc(2026, 1, 1), 2)
    assert instants == [utc(2027, 1, 1), utc(2028, 1, 1)]


def test_next_after_is_strictly_after_and_returns_aware_utc():
    trigger = parse_trigger("0 8 * * *", None, "UTC")
    assert trigger.next_after(utc(2026, 5, 1, 8, 0)) == utc(2026, 5, 2, 8, 0)
    assert trigger.next_after(utc(2026, 5, 1, 7, 59, 59)) == utc(2026, 5, 1, 8, 0)
    east = datetime(2026, 5, 1, 15, 0, tzinfo=timezone(timedelta(hours=8)))
    assert trigger.next_after(east).tzinfo is UTC


def test_asia_shanghai_has_no_dst_so_8am_is_always_midnight_utc():
    trigger = parse_trigger("0 8 * * *", None, "Asia/Shanghai")
    instants = next_instants(trigger, utc(2026, 3, 1), 300)
    assert {(i.hour, i.minute) for i in instants} == {(0, 0)}
    assert len({i.date() for i in instants}) == 300


# DST #########################################################################


@pytest.mark.parametrize(
    ("tz", "day", "fired_at", "utc_instant"),
    [
        ("America/New_York", date(2026, 3, 8), "03:00-0400", utc(2026, 3, 8, 7, 0)),
        ("Europe/Berlin", date(2026, 3, 29), "03:00+0200", utc(2026, 3, 29, 1, 0)),
    ],
)
def test_fixed_time_in_spring_forward_gap_fires_once_right_after_the_gap(
    tz, day, fired_at, utc_instant
):
    assert firings_on("30 2 * * *", tz, day) == [fired_at]
    trigger = parse_trigger("30 2 * * *", None, tz)
    assert trigger.next_after(utc_instant - timedelta(hours=12)) == utc_instant


def test_several_gap_times_of_one_schedule_are_one_firing():
    assert firings_on("*/15 2 * * *", "America/New_York", date(2026, 3, 8)) == ["03:00-0400"]
    assert firings_on("0 2,3 * * *", "America/New_York", date(2026, 3, 8)) == ["03:00-0400"]


@pytest.mark.parametrize(
    ("cron", "tz", "day", "expected"),
    [
        ("30 1 * * *", "America/New_York", date(2026, 11, 1), ["01:30-0400"]),
        ("30 2 * * *", "Europe/Berlin", date(2026, 10, 25), ["02:30+0200"]),
        (
            "*/15 1 * * *",
            "America/New_York",
            date(2026, 11, 1),
            ["01:00-0400", "01:15-0400", "01:30-0400", "01:45-0400"],
        ),
    ],
)
def test_fixed_time_in_fall_back_overlap_fires_once_at_first_occurrence(cron, tz, day, expected):
    assert firings_on(cron, tz, day) == expected


def test_fixed_time_after_first_pass_of_overlap_is_not_repeated():
    trigger = parse_trigger("30 1 * * *", None, "America/New_York")
    first_pass = local("America/New_York", 2026, 11, 1, 1, 45, fold=0)
    assert trigger.next_after(first_pass) == local("America/New_York", 2026, 11, 2, 1, 30)


@pytest.mark.parametrize(
    ("tz", "spring", "fall"),
    [
        ("America/New_York", date(2026, 3, 8), date(2026, 11, 1)),
        ("Europe/Berlin", date(2026, 3, 29), date(2026, 10, 25)),
    ],
)
def test_hourly_schedule_follows_real_hours_across_dst(tz, spring, fall):
    assert len(firings_on("0 * * * *", tz, spring)) == 23
    assert len(firings_on("0 * * * *", tz, fall)) == 25
    assert len(firings_on("@hourly", tz, fall)) == 25


def test_hourly_schedule_fires_both_one_oclocks_in_new_york_fall_back():
    fired = firings_on("0 * * * *", "America/New_York", date(2026, 11, 1))
    assert fired[:4] == ["00:00-0400", "01:00-0400", "01:00-0500", "02:00-0500"]


def test_hourly_schedule_skips_the_missing_hour_without_extra_firing():
    fired = firings_on("0 * * * *", "America/New_York", date(2026, 3, 8))
    assert fired[:3] == ["00:00-0500", "01:00-0500", "03:00-0400"]
    assert firings_on("30 * * * *", "Europe/Berlin", date(2026, 3, 29))[:3] == [
        "00:30+0100",
        "01:30+0100",
        "03:30+0200",
    ]


def test_step_hour_and_quarter_hour_schedules_follow_elapsed_time_in_overlap():
    every_two_hours = firings_on("0 */2 * * *", "Europe/Berlin", date(2026, 10, 25))
    assert every_two_hours[:3] == ["00:00+0200", "02:00+0200", "02:00+0100"]
    quarter = firings_on("*/15 * * * *", "America/New_York", date(2026, 11, 1))
    assert len(quarter) == 25 * 4
    assert quarter[4:9] == ["01:00-0400", "01:15-0400", "01:30-0400", "01:45-0400", "01:00-0500"]


def test_next_after_inside_first_pass_of_overlap_finds_the_repeated_hour():
    trigger = parse_trigger("0 * * * *", None, "America/New_York")
    first_pass = local("America/New_York", 2026, 11, 1, 1, 30, fold=0)
    second_pass = local("America/New_York", 2026, 11, 1, 1, 30, fold=1)
    assert trigger.next_after(first_pass) == utc(2026, 11, 1, 6, 0)  # 01:00 EST
    assert trigger.next_after(second_pass) == utc(2026, 11, 1, 7, 0)  # 02:00 EST


# Intervals ###################################################################


def test_interval_is_anchored_to_the_last_scheduled_instant():
    trigger = parse_trigger(None, "2h", "UTC")
    assert trigger.next_after(utc(2026, 5, 1, 13, 37), anchor_utc=utc(2026, 5, 1, 10)) == utc(
        2026, 5, 1, 14
    )
    assert trigger.next_after(utc(2026, 5, 1, 14), anchor_utc=utc(2026, 5, 1, 10)) == utc(
        2026, 5, 1, 16
    )


def test_interval_without_anchor_fires_one_period_after_start():
    trigger = parse_trigger(None, "90s", "UTC")
    assert trigger.next_after(utc(2026, 5, 1, 12)) == utc(2026, 5, 1, 12, 1, 30)


def test_interval_never_fires_at_or_before_its_anchor_when_the_clock_went_back():
    trigger = parse_trigger(None, 3600, "UTC")
    assert trigger.next_after(utc(2026, 5, 1, 8), anchor_utc=utc(2026, 5, 1, 10)) == utc(
        2026, 5, 1, 11
    )


@pytest.mark.parametrize(
    ("interval", "unit", "period"),
    [
        (2, "hours", timedelta(hours=2)),
        (1, "hour", timedelta(hours=1)),
        (30, "minutes", timedelta(minutes=30)),
        (45, "seconds", timedelta(seconds=45)),
        (1.5, "days", timedelta(hours=36)),
        (2, "Hours", timedelta(hours=2)),
    ],
)
def test_seed_interval_form_is_accepted(interval, unit, period):
    trigger = parse_trigger(None, None, "Asia/Shanghai", interval=interval, interval_unit=unit)
    assert trigger.period == period


def test_next_instants_lists_the_coming_firings():
    trigger = parse_trigger(None, "2h", "UTC")
    assert next_instants(trigger, utc(2026, 5, 1, 13, 37), 3, anchor_utc=utc(2026, 5, 1, 10)) == [
        utc(2026, 5, 1, 14),
        utc(2026, 5, 1, 16),
        utc(2026, 5, 1, 18),
    ]


# Invalid input ###############################################################


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(cron="0 25 * * *"), r"hour field '25' is invalid \(allowed: 0-23"),
        (dict(cron="61 * * * *"), r"minute field '61' is invalid"),
        (dict(cron="0 0 32 * *"), r"day-of-month field '32' is invalid"),
        (dict(cron="0 0 * foo *"), r"month field 'foo' is invalid"),
        (dict(cron="0 0 * * 8"), r"day-of-week field '8' is invalid \(allowed: 0-7 or sun-sat"),
        (dict(cron="0 0 L * *"), r"day-of-month field 'L' is invalid"),
        (dict(cron="0 0 * * 1#2"), r"day-of-week field '1#2' is invalid"),
        (dict(cron="H 0 * * *"), r"minute field 'H' is invalid"),
        (dict(cron="*/0 * * * *"), r"minute field '\*/0' is invalid"),
        (dict(cron="0 8 * *"), r"must have 5 fields .* got 4"),
        (dict(cron="0 0 8 * * *"), r"must have 5 fields .* got 6"),
        (dict(cron="0 0 30 2 *"), r"never matches"),
        (dict(cron="@reboot"), r"'@reboot' is not supported"),
        (dict(cron="@fortnightly"), r"unknown macro; use one of @yearly"),
        (dict(cron="0 8 * * *", every="2h"), r"exactly one of .* \(got cron and every\)"),
        (dict(), r"exactly one of cron, every, or interval"),
        (dict(every="soon"), r"every: invalid duration 'soon'"),
        (dict(every="0s"), r"at least 1 second"),
        (dict(every=0), r"at least 1 second"),
        (dict(interval=0, interval_unit="hours"), r"interval must be positive"),
        (dict(interval=-2, interval_unit="hours"), r"interval must be positive"),
        (dict(interval=2, interval_unit="weeks"), r"interval_unit must be one of seconds"),
        (dict(interval=2), r"interval_unit must be one of"),
        (dict(interval="2", interval_unit="hours"), r"interval must be a number"),
        (dict(interval_unit="hours", every="2h"), r"interval_unit is set but interval is missing"),
        (dict(cron="0 8 * * *", timezone="Mars/Olympus"), r"unknown timezone 'Mars/Olympus'"),
        (dict(cron="0 8 * * *", timezone="America"), r"unknown timezone 'America'"),
        (dict(cron="0 8 * * *", timezone="../etc/passwd"), r"unknown timezone"),
    ],
)
def test_invalid_schedule_is_rejected_naming_the_problem(kwargs, message):
    cron = kwargs.pop("cron", None)
    every = kwargs.pop("every", None)
    tz = kwargs.pop("timezone", "Asia/Shanghai")
    with pytest.raises(ValueError, match=message):
        parse_trigger(cron, every, tz, **kwargs)


def test_naive_datetimes_are_refused():
    trigger = parse_trigger("0 8 * * *", None, "UTC")
    with pytest.raises(ValueError, match="after_utc must be a timezone-aware datetime"):
        trigger.next_after(datetime(2026, 5, 1))


# Missed instants #############################################################


@pytest.fixture
def cron_steps(monkeypatch) -> list[int]:
    """How many wall times the cron triggers walk (one _wall_to_utc each), as a one-item list."""
    steps = [0]
    wall_to_utc = contenthubd._wall_to_utc

    def counted(*args, **kwargs):
        steps[0] += 1
        return wall_to_utc(*args, **kwargs)

    monkeypatch.setattr(contenthubd, "_wall_to_utc", counted)
    return steps


#: Whole days are counted, not walked: only the two edge days, DST-change days and the window
#: of kept instants are, a few days' worth of minutes.
CHEAP_STEPS = 5 * 24 * 60


def test_minute_schedule_down_for_30_days_counts_all_and_keeps_latest_quickly(cron_steps):
    trigger = parse_trigger("* * * * *", None, "America/New_York")
    now = utc(2026, 3, 20, 12, 0, 30)
    kept, total = missed_instants(trigger, now - timedelta(days=30), now, 24)
    assert cron_steps[0] < CHEAP_STEPS  # enumerating would walk 43,200
    assert total == 30 * 24 * 60  # real minutes, DST change included
    assert kept == [utc(2026, 3, 20, 11, 37) + timedelta(minutes=k) for k in range(24)]


def test_minute_schedule_down_for_a_year_is_still_cheap(cron_steps):
    trigger = parse_trigger("* * * * *", None, "Europe/Berlin")
    now = utc(2026, 12, 31, 23, 59, 59)
    kept, total = missed_instants(trigger, utc(2025, 12, 31, 23, 59, 59), now, 5)
    assert cron_steps[0] < CHEAP_STEPS  # enumerating would walk 525,600
    assert total == 365 * 24 * 60
    assert kept[-1] == utc(2026, 12, 31, 23, 59)


@pytest.mark.parametrize(
    ("cron", "tz"),
    [
        ("0 * * * *", "America/New_York"),
        ("*/20 * * * *", "Europe/Berlin"),
        ("30 2 * * *", "America/New_York"),
        ("*/10 1,2 * * *", "America/New_York"),
        ("*/10 1,2 * * *", "Europe/Berlin"),
        ("0 0 13 * 5", "Asia/Shanghai"),
        ("0 0 * * *", "America/Santiago"),
        ("*/30 * * * *", "Australia/Lord_Howe"),
    ],
)
def test_counting_across_a_year_of_dst_changes_matches_enumeration(cron, tz):
    trigger = parse_trigger(cron, None, tz)
    last, now = utc(2026, 1, 1, 3, 17), utc(2027, 1, 2, 5, 41)
    enumerated = []
    for instant in trigger.iter_after(last):
        if instant > now:
            break
        enumerated.append(instant)
    kept, total = missed_instants(trigger, last, now, 7)
    assert total == len(enumerated)
    assert kept == enumerated[-7:]


def test_interval_missed_instants_are_arithmetic_and_anchored():
    trigger = parse_trigger(None, "1m", "UTC")
    last = utc(2025, 1, 1, 0, 0, 15)
    kept, total = missed_instants(trigger, last, utc(2026, 1, 1, 0, 0, 20), 3)
    assert total == 365 * 24 * 60
    assert kept == [utc(2025, 12, 31, 23, 58, 15), utc(2025, 12, 31, 23, 59, 15), utc(2026, 1, 1, 0, 0, 15)]


def test_few_missed_instants_are_all_kept():
    trigger = parse_trigger("0 */6 * * *", None, "UTC")
    kept, total = missed_instants(trigger, utc(2026, 5, 1, 0), utc(2026, 5, 1, 13), 24)
    assert (kept, total) == ([utc(2026, 5, 1, 6), utc(2026, 5, 1, 12)], 2)


def test_schedule_that_never_fired_has_missed_nothing():
    trigger = parse_trigger(None, "2h", "UTC")
    assert missed_instants(trigger, None, utc(2026, 5, 1), 24) == ([], 0)


# Misfire plans ###############################################################

NOW = utc(2026, 5, 1, 12, 0, 5)
HOURS = [utc(2026, 5, 1, h) for h in range(3, 13)]  # 03:00 .. 12:00, the last one due now
LATE = HOURS[:-1]  # 03:00 .. 11:00, the last one an hour late


def test_skip_fires_only_the_due_instant_and_records_the_rest_missed():
    plan = plan_misfires("skip", HOURS, 10, NOW, None, 24)
    assert plan == MisfirePlan(fire=(HOURS[-1],), missed=tuple(LATE), more_missed=0)
    assert plan_misfires("skip", LATE, 9, NOW, None, 24).fire == ()


def test_once_fires_the_latest_missed_instant():
    plan = plan_misfires("once", LATE, 9, NOW, None, 24)
    assert plan.fire == (utc(2026, 5, 1, 11),)
    assert plan.missed == tuple(LATE[:-1])


def test_once_fires_nothing_extra_when_an_instant_is_due_anyway():
    plan = plan_misfires("once", HOURS, 10, NOW, None, 24)
    assert plan.fire == (HOURS[-1],)
    assert plan.missed == tuple(LATE)


def test_once_respects_grace():
    within = plan_misfires("once", LATE, 9, NOW, timedelta(hours=2), 24)
    assert within.fire == (utc(2026, 5, 1, 11),)
    beyond = plan_misfires("once", LATE, 9, NOW, timedelta(minutes=30), 24)
    assert beyond.fire == ()
    assert beyond.missed == tuple(LATE)


def test_all_fires_each_missed_instant_up_to_the_cap_newest_first_kept():
    plan = plan_misfires("all", LATE, 9, NOW, None, 24)
    assert plan.fire == tuple(LATE) and plan.missed == ()
    capped = plan_misfires("all", HOURS, 10, NOW, None, 4)
    assert capped.fire == tuple(HOURS[-4:])
    assert capped.missed == tuple(HOURS[:-4])


def test_all_never_fires_instants_older_than_grace():
    plan = plan_misfires("all", LATE, 9, NOW, timedelta(hours=3, seconds=10), 24)
    assert plan.fire == (utc(2026, 5, 1, 9), utc(2026, 5, 1, 10), utc(2026, 5, 1, 11))
    assert plan.missed == tuple(LATE[:-3])


def test_missed_instants_beyond_the_kept_list_are_only_counted():
    plan = plan_misfires("skip", LATE, 500_000, NOW, None, 24)
    assert plan.more_missed == 500_000 - len(LATE)


def test_unknown_policy_and_bad_cap_are_rejected():
    with pytest.raises(ValueError, match="misfire must be one of skip, once, all, got 'some'"):
        plan_misfires("some", HOURS, 10, NOW, None, 24)
    with pytest.raises(ValueError, match="max_catch_up must be at least 1"):
        plan_misfires("all", HOURS, 10, NOW, None, 0)


# DST oracle ##################################################################


def oracle_firings(cron: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    """The documented rule applied minute by minute of real time, independently of Trigger."""
    zone = ZoneInfo(tz)
    follows_elapsed = cron.split()[1].startswith("*") or "/" in cron.split()[1]
    fired = []
    minute = timedelta(minutes=1)
    instant = start
    while instant < end:
        wall = instant.astimezone(zone)
        previous_wall = (instant - minute).astimezone(zone)
        naive = wall.replace(tzinfo=None)
        fires = croniter.match(cron, naive) and (follows_elapsed or wall.fold == 0)
        if not follows_elapsed and wall.utcoffset() > previous_wall.utcoffset():
            # Just past a spring-forward gap: any wall time inside the gap fires now.
            gap = previous_wall.replace(tzinfo=None) + minute
            while gap < naive and not fires:
                fires = croniter.match(cron, gap)
                gap += minute
        if fires:
            fired.append(instant)
        instant += minute
    return fired


def takewhile_before(end: datetime, instants):
    for instant in instants:
        if instant >= end:
            return
        yield instant


@pytest.mark.parametrize(
    "cron", ["30 2 * * *", "0 0 * * *", "*/15 1,2 * * *", "0 * * * *", "10 0-3/2 * * *"]
)
@pytest.mark.parametrize(
    ("tz", "day"),
    [
        ("America/New_York", date(2026, 3, 8)),
        ("America/New_York", date(2026, 11, 1)),
        ("Europe/Berlin", date(2026, 3, 29)),
        ("Europe/Berlin", date(2026, 10, 25)),
        ("Australia/Lord_Howe", date(2026, 4, 5)),  # 30-minute DST
        ("Australia/Lord_Howe", date(2026, 10, 4)),
        ("America/Santiago", date(2026, 4, 5)),  # changes at midnight
        ("America/Santiago", date(2026, 9, 6)),
    ],
)
def test_dst_days_fire_exactly_as_the_documented_rule(cron, tz, day):
    start = datetime.combine(day, datetime.min.time(), ZoneInfo(tz)).astimezone(UTC)
    start, end = start - timedelta(hours=3), start + timedelta(hours=27)
    trigger = parse_trigger(cron, None, tz)
    fired = list(takewhile_before(end, trigger.iter_after(start - timedelta(microseconds=1))))
    assert fired == oracle_firings(cron, tz, start, end)
